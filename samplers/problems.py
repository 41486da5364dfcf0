"""Analytic test problems: Gaussian mixtures with the exact score and denoiser under any Gaussian SDE.

The marginal of a Gaussian mixture under x_t = alpha x0 + sigma eps is again a mixture, so score,
x0 and eps are exact (in forms that stay finite as alpha or sigma goes to 0); each covariance is
diagonalised once, so per-sample times cost a rotation, not a Cholesky factorisation.  Also here:
fixed 2-D and 64-D mixtures, sample-based distances and a tight DOP853 reference solution for
pathwise errors.  Formulas: docs/problems.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from sde.parametrization import PREDICTIONS
from sde.validation import check_count, check_positive, check_predicts

__all__ = [
    "GaussianMixture",
    "gaussian",
    "mixture_2d",
    "mixture_64d",
    "mixture_widths",
    "mixture_weights",
    "sliced_wasserstein",
    "moment_error",
    "mode_statistics",
    "mode_error",
    "mode_error_floor",
    "rms_distance",
    "reference_solution",
    "reference_endpoint",
    "probability_flow_rhs",
]

_F64 = torch.float64


def _as_f64(value, name: str) -> torch.Tensor:
    try:
        out = torch.as_tensor(value, dtype=_F64) if not isinstance(value, torch.Tensor) else value.detach().to(_F64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}: {exc}") from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite, got non-finite entries")
    return out.cpu().clone()


class GaussianMixture:
    """Data distribution sum_k w_k N(mu_k, Sigma_k) in R^d, stored in float64.

    ``means`` (K, d); exactly one of ``covs`` (K, d, d) full covariances or ``stds`` (K,)
    isotropic / (K, d) diagonal standard deviations; ``weights`` (K,) positive (normalised
    here; uniform when omitted).
    """

    def __init__(self, means, covs=None, weights=None, *, stds=None):
        means = _as_f64(means, "means")
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1, got {tuple(means.shape)}")
        k, d = means.shape
        if (covs is None) == (stds is None):
            raise ValueError("pass exactly one of covs (K, d, d) or stds (K,) / (K, d)")

        if stds is not None:
            stds = _as_f64(stds, "stds")
            if stds.shape == (k,):
                stds = stds[:, None].expand(k, d).clone()
            elif stds.shape != (k, d):
                raise ValueError(f"stds must have shape (K,) = ({k},) or (K, d) = ({k}, {d}), got {tuple(stds.shape)}")
            if not bool((stds > 0).all()):
                raise ValueError("stds must be positive")
            self._eigvals = stds**2
            self._eigvecs = None  # diagonal: no rotation needed
            covs = torch.diag_embed(self._eigvals)
        else:
            covs = _as_f64(covs, "covs")
            if covs.shape != (k, d, d):
                raise ValueError(f"covs must have shape (K, d, d) = ({k}, {d}, {d}), got {tuple(covs.shape)}")
            scale = covs.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)
            if not bool(((covs - covs.transpose(1, 2)).abs() <= 1e-10 * scale).all()):
                raise ValueError("covs must be symmetric")
            covs = 0.5 * (covs + covs.transpose(1, 2))
            eigvals, eigvecs = torch.linalg.eigh(covs)
            # a relative floor: eigenvalues at rounding level make C_k^{-1} meaningless at small t
            bad = eigvals.amin(dim=1) <= 1e-12 * eigvals.abs().amax(dim=1)
            if bool(bad.any()):
                idx = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"covs must be positive definite; component {idx} has smallest eigenvalue "
                    f"{float(eigvals[idx].min()):.3g}"
                )
            if bool((covs == torch.diag_embed(torch.diagonal(covs, dim1=1, dim2=2))).all()):
                self._eigvals = torch.diagonal(covs, dim1=1, dim2=2).clone()
                self._eigvecs = None
            else:
                self._eigvals, self._eigvecs = eigvals, eigvecs

        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=_F64)
        else:
            weights = _as_f64(weights, "weights")
            if weights.shape != (k,):
                raise ValueError(f"weights must have shape (K,) = ({k},), got {tuple(weights.shape)}")
            if not bool((weights > 0).all()):
                raise ValueError("weights must be positive")
            weights = weights / weights.sum()

        self.means = means
        self.covs = covs
        self.weights = weights
        self._log_weights = torch.log(weights)
        self.dim = int(d)
        self.num_components = int(k)

    def __repr__(self) -> str:
        kind = "diagonal" if self._eigvecs is None else "full"
        return f"GaussianMixture(K={self.num_components}, d={self.dim}, {kind} covariances)"

    # -- exact moments ------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """E[x0] = sum_k w_k mu_k."""
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """Cov[x0] = sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T."""
        m = self.mean
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        cov = second - torch.outer(m, m)
        return 0.5 * (cov + cov.T)

    def marginal_mean_cov(self, sde, t: float):
        """Moments of p_t: mean alpha m, covariance alpha^2 Cov[x0] + sigma^2 I."""
        tt = torch.as_tensor(float(t), dtype=_F64)
        a, s = float(sde.alpha(tt)), float(sde.sigma(tt))
        return a * self.mean, a * a * self.covariance + s * s * torch.eye(self.dim, dtype=_F64)

    # -- sampling and densities -----------------------------------------------------------------
    def sample(self, n: int, *, generator=None, dtype=torch.float64) -> torch.Tensor:
        """n exact draws of x0: component k ~ w, then mu_k + U_k diag(sqrt(lam_k)) z."""
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        z = z * torch.sqrt(self._eigvals[comp])
        if self._eigvecs is not None:
            # loop over the (few) components, not the samples, to avoid an (n, d, d) gather
            for k in range(self.num_components):
                sel = comp == k
                z[sel] = z[sel] @ self._eigvecs[k].T
        return (self.means[comp] + z).to(dtype)

    def log_prob(self, x) -> torch.Tensor:
        """log p_data(x), shape (n,)."""
        x2, _ = self._flatten(x)
        one = torch.ones(x2.shape[0], dtype=_F64, device=x2.device)
        return self._posterior(x2, one, torch.zeros_like(one))[0].to(self._out_dtype(x))

    def marginal_log_prob(self, sde, x, t) -> torch.Tensor:
        """log p_t(x) = logsumexp_k [log w_k + log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)]."""
        x2, _ = self._flatten(x)
        a, s = self._coefficients(sde, t, x2)
        return self._posterior(x2, a, s)[0].to(self._out_dtype(x))

    def score(self, sde, x, t) -> torch.Tensor:
        """grad_x log p_t(x) = -sum_k r_k C_k^{-1} (x - alpha mu_k)."""
        return self._quantity(sde, x, t, "score")

    def denoiser(self, sde, x, t) -> torch.Tensor:
        """E[x0 | x_t = x] = sum_k r_k (mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k))."""
        return self._quantity(sde, x, t, "x0")

    def eps(self, sde, x, t) -> torch.Tensor:
        """E[eps | x_t = x] = (x - alpha x0hat) / sigma = sum_k r_k sigma C_k^{-1} (x - alpha mu_k)."""
        return self._quantity(sde, x, t, "eps")

    def net(self, sde, predicts: str = "x0") -> ExactNet:
        """The exact network net(x, t) predicting ``predicts`` (one of sde.parametrization.PREDICTIONS)."""
        return ExactNet(self, sde, predicts)

    # -- internals --------------------------------------------------------------------------------
    def _flatten(self, x):
        x = torch.as_tensor(x)
        if x.dim() < 1 or x[0].numel() != self.dim or (x.dim() == 1 and self.dim != 1):
            raise ValueError(f"x must have shape (B, d) or (B, *dims) with prod(dims) = d = {self.dim}, "
                             f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(_F64), x.shape

    @staticmethod
    def _out_dtype(x):
        x = torch.as_tensor(x)
        return x.dtype if x.is_floating_point() else _F64

    @staticmethod
    def _coefficients(sde, t, x2):
        t = torch.as_tensor(t).to(device=x2.device, dtype=_F64)
        n = x2.shape[0]
        if t.dim() == 0:
            t = t.expand(n)
        elif t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({n},), got {tuple(t.shape)}")
        a, s = sde.alpha(t).to(_F64), sde.sigma(t).to(_F64)
        if not bool(((a >= 0) & (s >= 0) & (a + s > 0)).all()):
            raise ValueError("need alpha(t) >= 0, sigma(t) >= 0, not both zero")
        return a, s

    def _posterior(self, x2, a, s):
        """log p_t(x) (B,), log-responsibilities (B, K), rotated residuals y, variances var (B, K, d)."""
        mu = self.means.to(x2.device)
        lam = self._eigvals.to(x2.device)
        diff = x2[:, None, :] - a[:, None, None] * mu[None]
        y = diff if self._eigvecs is None else torch.einsum("kji,bkj->bki", self._eigvecs.to(x2.device), diff)
        var = (a * a)[:, None, None] * lam[None] + (s * s)[:, None, None]
        log_n = -0.5 * (self.dim * math.log(2 * math.pi) + torch.log(var).sum(-1) + (y * y / var).sum(-1))
        joint = self._log_weights.to(x2.device)[None] + log_n
        log_p = torch.logsumexp(joint, dim=1)
        return log_p, joint - log_p[:, None], y, var

    def _quantity(self, sde, x, t, what: str) -> torch.Tensor:
        x2, shape = self._flatten(x)
        a, s = self._coefficients(sde, t, x2)
        out = self._mix(x2, a, s, what)
        return out.reshape(shape).to(self._out_dtype(x))

    def _mix(self, x2, a, s, what: str) -> torch.Tensor:
        _, log_r, y, var = self._posterior(x2, a, s)
        r = torch.exp(log_r)
        if what == "score":
            z = -y / var
        elif what == "eps":
            z = s[:, None, None] * y / var
        else:  # x0
            z = a[:, None, None] * self._eigvals.to(x2.device)[None] * y / var
        z = z * r[:, :, None]
        if self._eigvecs is not None:
            z = torch.einsum("kij,bkj->bki", self._eigvecs.to(x2.device), z)
        out = z.sum(1)
        if what == "x0":
            out = out + r @ self.means.to(x2.device)
        return out


class ExactNet:
    """net(x, t) -> exact prediction of ``predicts`` for ``mixture`` under ``sde``.

    x: (B, d) or (B, *dims) with prod(dims) = d, any float dtype; t: (B,) or scalar.  Computes
    in float64 and returns x's dtype and shape.  With x0hat, epshat exact:
    score = -epshat/sigma (computed per component, finite at small sigma), v = alpha eps - sigma x0,
    velocity = alpha' x0 + sigma' eps.
    """

    def __init__(self, mixture: GaussianMixture, sde, predicts: str = "x0"):
        check_predicts(predicts, PREDICTIONS, "ExactNet")
        self.mixture = mixture
        self.sde = sde
        self.predicts = predicts

    def __call__(self, x, t) -> torch.Tensor:
        m = self.mixture
        x2, shape = m._flatten(x)
        a, s = m._coefficients(self.sde, t, x2)
        if self.predicts in ("x0", "eps", "score"):
            out = m._mix(x2, a, s, self.predicts)
        else:
            x0, eps = m._mix(x2, a, s, "x0"), m._mix(x2, a, s, "eps")
            if self.predicts == "v":
                out = a[:, None] * eps - s[:, None] * x0
            else:
                tt = torch.as_tensor(t).to(device=x2.device, dtype=_F64).expand(x2.shape[0])
                da, ds = self.sde.dalpha_dt(tt).to(_F64), self.sde.dsigma_dt(tt).to(_F64)
                out = da[:, None] * x0 + ds[:, None] * eps
        return out.reshape(shape).to(m._out_dtype(x))

    def __repr__(self) -> str:
        return f"ExactNet({self.mixture!r}, {self.sde!r}, predicts={self.predicts!r})"


# -- fixed problems ------------------------------------------------------------------------------
def gaussian(mean, std, dim=None) -> GaussianMixture:
    """A single isotropic Gaussian N(mean, std^2 I); a scalar ``mean`` needs ``dim``."""
    mean = _as_f64(mean, "mean")
    if mean.dim() == 0:
        if dim is None:
            raise ValueError("dim is required when mean is a scalar")
        mean = mean.expand(int(dim)).clone()
    elif mean.dim() != 1:
        raise ValueError(f"mean must be a scalar or have shape (d,), got {tuple(mean.shape)}")
    if dim is not None and int(dim) != mean.shape[0]:
        raise ValueError(f"dim={dim} does not match mean of length {mean.shape[0]}")
    std = check_positive("std", std)
    return GaussianMixture(mean[None], stds=torch.tensor([std], dtype=_F64))


def mixture_2d() -> GaussianMixture:
    """8 components on the circle of radius 2 (angles 2 pi k / 8), std 0.2, weights proportional to 1..8."""
    angles = torch.arange(8, dtype=_F64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(means, stds=torch.full((8,), 0.2, dtype=_F64),
                           weights=torch.arange(1, 9, dtype=_F64))


def mixture_64d(seed: int = 0) -> GaussianMixture:
    """4 components in R^64: means of norm 3 in random directions, diagonal stds uniform in [0.2, 1],
    weights (0.1, 0.2, 0.3, 0.4); all drawn from torch.Generator().manual_seed(seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    means = torch.randn(4, 64, generator=gen, dtype=_F64)
    means = 3.0 * means / means.norm(dim=1, keepdim=True)
    stds = 0.2 + 0.8 * torch.rand(4, 64, generator=gen, dtype=_F64)
    return GaussianMixture(means, stds=stds, weights=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=_F64))


def mixture_widths(dim: int = 8, seed: int = 0) -> GaussianMixture:
    """8 isotropic components in R^dim with stds spaced geometrically from 0.05 to 0.8 (narrow and wide
    modes in one problem), means of norm 3 in random directions, equal weights; drawn from
    torch.Generator().manual_seed(seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    means = torch.randn(8, int(dim), generator=gen, dtype=_F64)
    means = 3.0 * means / means.norm(dim=1, keepdim=True)
    stds = 0.05 * 16.0 ** (torch.arange(8, dtype=_F64) / 7)
    return GaussianMixture(means, stds=stds)


def mixture_weights(dim: int = 16, seed: int = 0) -> GaussianMixture:
    """6 components in R^dim with weights 0.5, 0.25, ..., 1/32 and 1/32 (a rare mode a sampler can
    starve or inflate), diagonal stds uniform in [0.15, 0.45], means of norm 2.5 in random directions;
    drawn from torch.Generator().manual_seed(seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    means = torch.randn(6, int(dim), generator=gen, dtype=_F64)
    means = 2.5 * means / means.norm(dim=1, keepdim=True)
    stds = 0.15 + 0.3 * torch.rand(6, int(dim), generator=gen, dtype=_F64)
    weights = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], dtype=_F64)
    return GaussianMixture(means, stds=stds, weights=weights)


# -- sample-based errors -------------------------------------------------------------------------------
def _samples_2d(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to(_F64).cpu()
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n, ...) with n >= 1, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def sliced_wasserstein(x, y, *, projections: int = 256, seed: int = 0) -> float:
    """Sliced W2: sqrt(mean_theta W2^2(<theta, x>, <theta, y>)) over ``projections`` random unit
    directions drawn from torch.Generator().manual_seed(seed).

    Each 1-D W2^2 = int_0^1 (F_x^{-1}(u) - F_y^{-1}(u))^2 du, computed exactly for the empirical
    quantile functions (sample sizes n and m may differ).
    """
    x, y = _samples_2d(x, "x"), _samples_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    gen = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(x.shape[1], int(projections), generator=gen, dtype=_F64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    n, m = px.shape[0], py.shape[0]
    if n == m:
        w2 = (px - py).pow(2).mean(dim=0)
    else:
        # the quantile functions are piecewise constant between the merged levels i/n, j/m
        levels = torch.sort(torch.cat([torch.arange(1, n + 1, dtype=_F64) / n,
                                       torch.arange(1, m + 1, dtype=_F64) / m]))[0]
        widths = torch.diff(levels, prepend=levels.new_zeros(1))
        mid = levels - 0.5 * widths
        ix = torch.clamp((mid * n).long(), max=n - 1)
        iy = torch.clamp((mid * m).long(), max=m - 1)
        w2 = (widths[:, None] * (px[ix] - py[iy]).pow(2)).sum(dim=0)
    return float(torch.sqrt(w2.mean()))


def moment_error(x, mixture_or_mean_cov) -> dict:
    """Errors of the sample moments of x (n, ...) against exact ones.

    ``mixture_or_mean_cov``: a GaussianMixture or a (mean (d,), cov (d, d)) pair.  Returns
    mean_error = ||mean_x - mean||_2, cov_error = ||cov_x - cov||_F and
    cov_rel_error = cov_error / ||cov||_F, with cov_x the unbiased sample covariance.
    """
    x = _samples_2d(x, "x")
    if isinstance(mixture_or_mean_cov, GaussianMixture):
        mean, cov = mixture_or_mean_cov.mean, mixture_or_mean_cov.covariance
    else:
        try:
            mean, cov = mixture_or_mean_cov
        except (TypeError, ValueError):
            raise ValueError("mixture_or_mean_cov must be a GaussianMixture or a (mean, cov) pair") from None
        mean, cov = _as_f64(mean, "mean"), _as_f64(cov, "cov")
    d = x.shape[1]
    if mean.shape != (d,) or cov.shape != (d, d):
        raise ValueError(f"expected mean ({d},) and cov ({d}, {d}), got {tuple(mean.shape)} and {tuple(cov.shape)}")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples for a covariance")
    mean_x = x.mean(dim=0)
    xc = x - mean_x
    cov_x = xc.T @ xc / (x.shape[0] - 1)
    cov_error = float(torch.linalg.matrix_norm(cov_x - cov))
    return {
        "mean_error": float(torch.linalg.vector_norm(mean_x - mean)),
        "cov_error": cov_error,
        "cov_rel_error": cov_error / max(float(torch.linalg.matrix_norm(cov)), 1e-300),
    }


def mode_statistics(x, mixture: GaussianMixture) -> dict:
    """Per-mode statistics of samples x (n, ...): each sample is assigned to the component of
    ``mixture`` with the highest posterior probability (the nearest mode, for equal isotropic
    components); returns ``weights`` (K,) (the fraction assigned to each), ``means`` (K, d) and
    ``stds`` (K, d) (per coordinate, about the mode's own sample mean; NaN for a mode with fewer than 2
    samples), ``counts`` (K,), all float64."""
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a samplers.problems.GaussianMixture, got {type(mixture).__name__}")
    x = _samples_2d(x, "x")
    if x.shape[1] != mixture.dim:
        raise ValueError(f"x has dimension {x.shape[1]}, the mixture {mixture.dim}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    one = torch.ones(x.shape[0], dtype=_F64)
    assigned = mixture._posterior(x, one, torch.zeros_like(one))[1].argmax(dim=1)
    k = mixture.num_components
    counts = torch.bincount(assigned, minlength=k).to(_F64)
    sums = torch.zeros(k, mixture.dim, dtype=_F64).index_add_(0, assigned, x)
    means = sums / counts.clamp_min(1.0)[:, None]
    centred = x - means[assigned]
    squares = torch.zeros(k, mixture.dim, dtype=_F64).index_add_(0, assigned, centred * centred)
    stds = torch.sqrt(squares / (counts - 1.0).clamp_min(1.0)[:, None])
    stds[counts < 2] = float("nan")
    means[counts < 1] = float("nan")
    return {"weights": counts / x.shape[0], "means": means, "stds": stds, "counts": counts}


def mode_error(x, mixture: GaussianMixture) -> dict:
    """Errors of samples x against the exact mixture, from :func:`mode_statistics`, without the Monte
    Carlo floor of a distance between two sample sets:

    - ``mode_error`` = sum_k w_k (|mean_k - mu_k|^2 + sum_i (std_ki - s_ki)^2) / d, a per-mode Frechet
      distance (s_ki = sqrt(Sigma_k,ii)), weighted by the exact weights; a mode no sample reached
      counts its whole |mu_k|^2 / d + sum_i s_ki^2 / d;
    - ``weight_tv`` = (1/2) sum_k |w_hat_k - w_k|, the total variation between the weights.

    Exact samples score about K (mean s^2) / n on ``mode_error`` (each mode's sample mean and std
    fluctuate by s / sqrt(n_k)) and about sqrt(K / n) / 2 on ``weight_tv``.
    """
    stats = mode_statistics(x, mixture)
    exact_stds = torch.sqrt(torch.diagonal(mixture.covs, dim1=1, dim2=2))
    per_mode = ((stats["means"] - mixture.means).pow(2) + (stats["stds"] - exact_stds).pow(2)).sum(dim=1)
    empty = (mixture.means.pow(2) + exact_stds.pow(2)).sum(dim=1)
    per_mode = torch.where(stats["counts"] >= 2, per_mode, empty)
    return {"mode_error": float((mixture.weights * per_mode).sum()) / mixture.dim,
            "weight_tv": 0.5 * float((stats["weights"] - mixture.weights).abs().sum())}


def mode_error_floor(mixture: GaussianMixture, n: int) -> dict:
    """The expected :func:`mode_error` of n exact samples (its Monte Carlo floor), to first order in 1/n:
    ``mode_error`` = 1.5 sum_k mean_i s_ki^2 / n (a mode's sample mean errs by s^2 / n_k per coordinate,
    its std by s^2 / (2 n_k)) and ``weight_tv`` = (1/2) sum_k sqrt(2 w_k (1 - w_k) / (pi n)) (the mean
    absolute deviation of a binomial fraction).  Samples the mixture assigns to another mode add to both;
    for well separated modes that is negligible."""
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a samplers.problems.GaussianMixture, got {type(mixture).__name__}")
    n = check_count("n", n, minimum=2)
    variances = torch.diagonal(mixture.covs, dim1=1, dim2=2)
    w = mixture.weights
    return {"mode_error": 1.5 * float(variances.mean(dim=1).sum()) / n,
            "weight_tv": 0.5 * float(torch.sqrt(2.0 * w * (1.0 - w) / (math.pi * n)).sum())}


def rms_distance(x, y) -> float:
    """sqrt(mean over samples and coordinates of (x - y)^2): the pathwise distance between two runs from
    the same starting noise (for example a solver's samples and :func:`reference_endpoint`)."""
    x, y = _samples_2d(x, "x"), _samples_2d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return float((x - y).pow(2).mean().sqrt())


# -- reference ODE solutions -------------------------------------------------------------------------------
def reference_solution(ode_rhs: Callable, x, t_start: float, t_end: float, *,
                       rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
    """Solve dx/dt = ode_rhs(x, t) from t_start to t_end (either direction) with scipy DOP853.

    The whole batch is one flattened float64 system; ``ode_rhs`` gets x in its original shape
    (float64) and t as a (B,) float64 tensor.  Returns float64 of x's shape.
    """
    from scipy.integrate import solve_ivp

    x = torch.as_tensor(x).detach().to(_F64).cpu()
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension")
    shape, b = x.shape, x.shape[0]
    t_start, t_end = float(t_start), float(t_end)
    if t_start == t_end:
        return x.clone()

    def fun(t, y):
        xt = torch.from_numpy(y).reshape(shape)
        out = ode_rhs(xt, torch.full((b,), t, dtype=_F64))
        return torch.as_tensor(out).detach().to(_F64).cpu().reshape(-1).numpy()

    sol = solve_ivp(fun, (t_start, t_end), x.reshape(-1).numpy().copy(), method="DOP853",
                    rtol=rtol, atol=atol, t_eval=[t_end])
    if not sol.success:
        raise RuntimeError(f"reference_solution: solve_ivp failed: {sol.message}")
    return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape)


def reference_endpoint(mixture: GaussianMixture, sde, x_T, t_start: float | None = None, *,
                       rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
    """The exact probability-flow ODE solution at noise level 0 (the data end) from x_T at ``t_start``
    (default: sde.t_max), float64: where a sampler whose last step reaches sigma = 0 should land.

    The ODE is the same on every Gaussian SDE in the scaled state y = x / alpha against the noise level
    s = sigma / alpha: dy/ds = (y - x0hat(y, s)) / s.  It is solved with DOP853 in log s from s(t_start)
    down to s = 1e-9 (the last stretch moves y by about s^2 / std^2), then y is replaced by x0hat(y, s).
    """
    from sde import EDMSDE, GaussianSDE

    if not isinstance(sde, GaussianSDE):
        raise ValueError(f"reference_endpoint needs a Gaussian-marginal SDE, got {sde!r}")
    t_start = sde.t_max if t_start is None else float(t_start)
    tt = torch.tensor(t_start, dtype=_F64)
    alpha, sigma = float(sde.alpha(tt)), float(sde.sigma(tt))
    if not (alpha > 0 and sigma > 0):
        raise ValueError(f"reference_endpoint: alpha and sigma must be positive at t_start={t_start:g}, got "
                         f"alpha={alpha:g}, sigma={sigma:g}")
    s_start, s_end = sigma / alpha, 1e-9
    edm = EDMSDE(sigma_min=s_end, sigma_max=max(s_start, 1.0))
    y = torch.as_tensor(x_T).detach().to(_F64).cpu() / alpha

    def rhs(y, log_s):
        s = torch.exp(log_s)
        return y - mixture.denoiser(edm, y.reshape(y.shape[0], -1), s).reshape(y.shape)

    y_end = reference_solution(rhs, y, math.log(s_start), math.log(s_end), rtol=rtol, atol=atol)
    flat = y_end.reshape(y_end.shape[0], -1)
    return mixture.denoiser(edm, flat, torch.full((flat.shape[0],), s_end, dtype=_F64)).reshape(y_end.shape)


def probability_flow_rhs(mixture: GaussianMixture, sde) -> ExactNet:
    """The exact probability-flow ODE velocity dx/dt = alpha' x0hat + sigma' epshat."""
    return mixture.net(sde, "velocity")
