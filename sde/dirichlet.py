"""The Dirichlet diffusion (DDSM, Avdeyev et al. 2023): categorical data on the probability simplex.

The simplex is written in stick-breaking coordinates v, each an independent Jacobi process whose
stationary laws make the flat Dirichlet; the state a solver carries is v and the network is a
score network in v.  The transition density is the Jacobi-polynomial series, built by the
normalised three-term recurrence and truncated per call from a bound on its terms, with the score
as the ratio of the differentiated series to the series (no autograd), in float64.  Formulas and
accuracy: docs/dirichlet.md.
"""

from __future__ import annotations

import math

import torch

from .base import SDE, _as_time, broadcast_to_state, check_eta
from .validation import check_count, check_flag, check_in_range, check_positive

__all__ = ["DirichletSDE"]

#: terms are dropped once their bound exp(lambda_n t) max|p_n|^2 falls below this (float64 rounding)
_TERM_TOLERANCE = 1e-17
#: the series is taken as unresolved where it is below this many units of rounding of its terms
_ROUNDING_UNITS = 64.0


def _check_positive_vector(name: str, value, length: int) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if tensor.numel() == 1:
        tensor = tensor.expand(length).clone()
    if tensor.numel() != length or not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
        raise ValueError(f"{name} must be a positive finite number or {length} of them (one per stick-breaking "
                         f"coordinate), got {value!r}")
    return tensor


class DirichletSDE(SDE):
    """K - 1 independent Jacobi processes in stick-breaking coordinates (the DDSM forward process).

    Parameters
    ----------
    categories:
        K >= 2, the number of categories (the state has K - 1 stick-breaking coordinates).
    alpha, beta:
        the Beta(a_i, b_i) stationary law of each coordinate; default a_i = 1, b_i = K - i
        (i = 1 ... K-1), whose stick-breaking is the flat Dirichlet(1, ..., 1).
    speed_balanced:
        speed s_i = 2 / (a_i + b_i) so that every coordinate relaxes at the same rate
        (lambda_1 = -1); otherwise s_i = 1.
    speed_factor:
        multiplies every s_i.
    t_min, t_max:
        the time range: data at t_min (the score is singular at t = 0), the Beta prior at t_max.
    max_terms:
        the most series terms a density evaluation may use; times so small that the series needs
        more raise a ValueError rather than return a truncated density.
    """

    default_grid = "uniform"
    #: states are confined to (0, 1)^(K-1): a step rule that does not know the boundary (a Langevin
    #: corrector, a generic Euler-Maruyama) must refuse this SDE
    constrained_state = True

    def __init__(self, categories: int, *, alpha=None, beta=None, speed_balanced: bool = True,
                 speed_factor: float = 1.0, t_min: float = 0.01, t_max: float = 4.0, max_terms: int = 4000):
        categories = check_count("categories", categories, minimum=2)
        super().__init__(t_min, t_max)
        if not self.t_min > 0:
            raise ValueError(f"DirichletSDE: t_min must be positive (the transition density is a point mass at "
                             f"t = 0), got {t_min!r}")
        max_terms = check_count("max_terms", max_terms, minimum=2)
        check_flag("speed_balanced", speed_balanced)
        check_positive("speed_factor", speed_factor)
        self.categories = categories
        dims = categories - 1
        index = torch.arange(1, categories, dtype=torch.float64)
        self.alpha = _check_positive_vector("alpha", 1.0 if alpha is None else alpha, dims)
        self.beta = _check_positive_vector("beta", categories - index if beta is None else beta, dims)
        self.speed_balanced = speed_balanced
        self.speed_factor = float(speed_factor)
        base = 2.0 / (self.alpha + self.beta) if speed_balanced else torch.ones(dims, dtype=torch.float64)
        self.speed = base * self.speed_factor
        self.max_terms = max_terms
        self._build_series_tables(max_terms)
        self._cast_cache: dict = {}

    # -- constants in the state's dtype ----------------------------------------------------------
    def coefficients_like(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, s) as (K-1,) tensors in v's dtype and device (cached)."""
        key = (v.dtype, v.device)
        cast = self._cast_cache.get(key)
        if cast is None:
            cast = self._cast_cache[key] = tuple(c.to(device=v.device, dtype=v.dtype)
                                                 for c in (self.alpha, self.beta, self.speed))
        return cast

    def _check_state(self, v: torch.Tensor, name: str = "v") -> None:
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor of stick-breaking coordinates, got "
                            f"{type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}")
        if v.dim() == 0 or v.shape[-1] != self.categories - 1:
            raise ValueError(f"{name} must have a last dimension of K - 1 = {self.categories - 1} stick-breaking "
                             f"coordinates, got shape {tuple(v.shape)}")

    def _check_open_unit(self, v: torch.Tensor, name: str = "v") -> None:
        self._check_state(v, name)
        if not bool(((v > 0) & (v < 1)).all()):
            bad = v[~((v > 0) & (v < 1))].flatten()[0].item()
            raise ValueError(f"{name} must lie in the open interval (0, 1) (inside the simplex), found {bad!r}")

    # -- stick-breaking -------------------------------------------------------------------------------
    def to_simplex(self, v: torch.Tensor) -> torch.Tensor:
        """Stick-breaking coordinates (..., K-1) -> points of the simplex (..., K)."""
        self._check_state(v)
        return self._break_stick(v)[0]

    @staticmethod
    def _break_stick(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, before): the simplex point of v and the stick left before each coordinate (x_k = v_k before_k)."""
        remaining = torch.cumprod(1.0 - v, dim=-1)
        before = torch.cat([torch.ones_like(v[..., :1]), remaining[..., :-1]], dim=-1)
        return torch.cat([v * before, remaining[..., -1:]], dim=-1), before

    def from_simplex(self, x: torch.Tensor) -> torch.Tensor:
        """Points of the simplex (..., K) -> stick-breaking coordinates v_k = x_k / sum_{j>=k} x_j.

        Where nothing of the stick is left (a vertex: the coordinates after its category) v_k = 0,
        the convention of DDSM, which makes a one-hot vertex e_c the v with a single 1 at c
        (all zeros for the last category)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating tensor of points of the simplex")
        if x.dim() == 0 or x.shape[-1] != self.categories:
            raise ValueError(f"x must have a last dimension of K = {self.categories} categories, got shape "
                             f"{tuple(x.shape)}")
        tol = 1e-5 if x.dtype != torch.float64 else 1e-10
        if not bool((x >= 0).all()) or not bool(((x.sum(-1) - 1).abs() <= tol).all()):
            raise ValueError("x must lie on the simplex: entries >= 0 summing to 1 along the last dimension")
        tails = torch.flip(torch.cumsum(torch.flip(x, [-1]), dim=-1), [-1])[..., :-1]
        safe = torch.where(tails > 0, tails, torch.ones_like(tails))
        return torch.where(tails > 0, (x[..., :-1] / safe).clamp(0.0, 1.0), torch.zeros_like(tails))

    def stick_from_categories(self, categories: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Integer categories (...,) in [0, K) -> the stick-breaking coordinates of their vertices (..., K-1)."""
        if not isinstance(categories, torch.Tensor) or categories.is_floating_point() or categories.is_complex():
            raise TypeError("categories must be an integer tensor")
        if bool((categories < 0).any()) or bool((categories >= self.categories).any()):
            raise ValueError(f"categories must lie in [0, {self.categories}), got values in "
                             f"[{int(categories.min())}, {int(categories.max())}]")
        index = torch.arange(self.categories - 1, device=categories.device)
        return (categories[..., None] == index).to(dtype)

    def log_det_to_stick(self, v: torch.Tensor) -> torch.Tensor:
        """log |det d(x_1..x_{K-1}) / dv| = sum_i (K-1-i) log(1 - v_i), summed over the last dimension."""
        self._check_state(v)
        weights = torch.arange(self.categories - 2, -1, -1, dtype=v.dtype, device=v.device)
        return (weights * torch.log1p(-v)).sum(-1)

    def simplex_score_to_stick(self, score_x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A score in simplex coordinates (..., K) -> the score in v: J^T s_x + grad_v log|det dx/dv|.

        s_x is centred first (only its part tangent to the simplex is defined)."""
        self._check_state(v)
        if score_x.shape != v.shape[:-1] + (self.categories,):
            raise ValueError(f"score_x must have shape {tuple(v.shape[:-1]) + (self.categories,)}, got "
                             f"{tuple(score_x.shape)}")
        score_x = score_x - score_x.mean(-1, keepdim=True)
        x, before = self._break_stick(v)
        # dx_j/dv_k = x_j / v_k for j = k, -x_j / (1 - v_k) for j > k, 0 for j < k
        tail_sum = torch.flip(torch.cumsum(torch.flip(x * score_x, [-1]), dim=-1), [-1])  # sum_{j>=k}
        own = x[..., :-1] * score_x[..., :-1]
        later = tail_sum[..., 1:]
        safe_v = torch.where(v > 0, v, torch.ones_like(v))
        # x_k / v_k is the stick left before k; written as such it stays finite at v_k = 0
        jt_s = torch.where(v > 0, own / safe_v, before * score_x[..., :-1]) - later / (1.0 - v)
        weights = torch.arange(self.categories - 2, -1, -1, dtype=v.dtype, device=v.device)
        return jt_s - weights / (1.0 - v)

    # -- the forward process ------------------------------------------------------------------------------
    def drift(self, v: torch.Tensor, t) -> torch.Tensor:
        a, b, s = self.coefficients_like(v)
        return 0.5 * s * (a * (1.0 - v) - b * v)

    def diffusion(self, v: torch.Tensor, t) -> torch.Tensor:
        _, _, s = self.coefficients_like(v)
        return torch.sqrt(s * v * (1.0 - v))

    def reverse_drift(self, v: torch.Tensor, t, score: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
        """f - (1 + eta^2)/2 (d(g^2)/dv + g^2 score): the state-dependent diffusion adds the divergence term."""
        eta = check_eta(eta)
        _, _, s = self.coefficients_like(v)
        return self.drift(v, t) - 0.5 * (1.0 + eta**2) * s * ((1.0 - 2.0 * v) + v * (1.0 - v) * score)

    def forward_sample(self, v0: torch.Tensor, t, *, steps: int = 1000, boundary_eps: float = 1e-5,
                       generator=None) -> torch.Tensor:
        """Simulate v_t from v_0 by Euler-Maruyama with ``steps`` steps of t/steps each, clamping to
        [boundary_eps, 1 - boundary_eps] after every step (the DDSM noise factory).  ``t``: a number or
        per-sample times (B,)."""
        self._check_state(v0, "v0")
        steps = check_count("steps", steps)
        check_in_range("boundary_eps", boundary_eps, 0.0, 0.5, closed="neither")
        if not bool(((v0 >= 0) & (v0 <= 1)).all()):
            raise ValueError("v0 must lie in [0, 1]")
        t = _as_time(t, v0)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError("t must be finite and >= 0")
        v = v0.clone()
        h = broadcast_to_state(t.to(v.dtype) / steps, v)
        root_h = torch.sqrt(h)
        for _ in range(steps):
            z = torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)
            v = (v + self.drift(v, None) * h + self.diffusion(v, None) * root_h * z).clamp_(boundary_eps,
                                                                                             1 - boundary_eps)
        return v

    # -- the prior (the stationary Beta laws) -------------------------------------------------------------
    def prior_sample(self, shape, *, normal: torch.Tensor | None = None, generator=None, dtype=None,
                     device=None) -> torch.Tensor:
        """Independent Beta(a_i, b_i) coordinates by the inverse CDF of standard normals (so keyed normals
        give keyed Beta draws).  The tail above the median is inverted through 1 - v ~ Beta(b, a), which
        keeps v's distance to 1 accurate."""
        import numpy as np
        from scipy.special import betaincinv, ndtr

        shape = tuple(shape)
        if not shape or shape[-1] != self.categories - 1:
            raise ValueError(f"shape must end with K - 1 = {self.categories - 1} stick-breaking coordinates, "
                             f"got {shape}")
        if normal is None:
            normal = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        elif tuple(normal.shape) != shape:
            raise ValueError(f"normal must have shape {shape}, got {tuple(normal.shape)}")
        z = normal.detach().to("cpu", torch.float64).numpy()
        a, b = self.alpha.numpy(), self.beta.numpy()
        lower = betaincinv(a, b, ndtr(z))
        upper = 1.0 - betaincinv(b, a, ndtr(-z))
        v = torch.from_numpy(np.where(z <= 0, lower, upper)).to(device=normal.device, dtype=normal.dtype)
        # a draw within half a unit of rounding of 0 or 1 rounds onto the boundary (float32: about 3e-8 of
        # Beta(1, 1) draws), where the score is infinite: the nearest representable point inside is the
        # correctly rounded value in the open interval the Beta law lives on
        info = torch.finfo(v.dtype)
        return v.clamp(info.tiny, 1.0 - info.eps / 2)

    def beta_logpdf(self, v: torch.Tensor) -> torch.Tensor:
        """Elementwise log Beta(v_i; a_i, b_i)."""
        a, b, _ = self.coefficients_like(v)
        log_norm = torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)
        return log_norm + torch.xlogy(a - 1.0, v) + torch.xlogy(b - 1.0, 1.0 - v)

    def beta_score(self, v: torch.Tensor) -> torch.Tensor:
        """Elementwise d/dv log Beta(v; a, b) = (a-1)/v - (b-1)/(1-v): the stationary score."""
        a, b, _ = self.coefficients_like(v)
        return (a - 1.0) / v - (b - 1.0) / (1.0 - v)

    def prior_logp(self, v: torch.Tensor) -> torch.Tensor:
        """Log-density of the Beta prior in v, summed over all but the batch dimension."""
        self._check_state(v)
        return self.beta_logpdf(v).reshape(v.shape[0], -1).sum(dim=1)

    # -- the transition density series ----------------------------------------------------------------------
    def _build_series_tables(self, terms: int) -> None:
        """Recurrence p_n = (A_n y + B_n) p_{n-1} - C_n p_{n-2} of the normalised Jacobi polynomials
        (y = 2v - 1), their eigenvalues and a bound on the size of each term, as (terms, K-1) float64."""
        a, b = self.alpha, self.beta
        al, be = b - 1.0, a - 1.0  # P_n^(al, be): weight (1 - y)^al (1 + y)^be
        ab = al + be
        n = torch.arange(terms, dtype=torch.float64)[:, None]
        lgamma = torch.lgamma
        # log d_n = log E_Beta[P_n(2V - 1)^2] (d_0 = 1)
        log_d = (lgamma(a + n) - lgamma(a) + lgamma(b + n) - lgamma(b) - (lgamma(a + b + n - 1) - lgamma(a + b))
                 - torch.log(2 * n + a + b - 1) - lgamma(n + 1))
        log_d[0] = 0.0
        ratio1 = torch.exp(0.5 * (log_d[:-1] - log_d[1:]))  # r_{n-1} / r_n for n >= 1
        A = torch.zeros(terms, len(a), dtype=torch.float64)
        B = torch.zeros_like(A)
        C = torch.zeros_like(A)
        A[1] = 0.5 * (ab + 2) * ratio1[0]
        B[1] = 0.5 * (al - be) * ratio1[0]
        if terms > 2:
            m = n[2:]
            den = 2 * m * (m + ab) * (2 * m + ab - 2)
            a1 = (2 * m + ab - 1) * (2 * m + ab) * (2 * m + ab - 2) / den
            a0 = (2 * m + ab - 1) * (al * al - be * be) / den
            a2 = 2 * (m + al - 1) * (m + be - 1) * (2 * m + ab) / den
            A[2:] = a1 * ratio1[1:]
            B[2:] = a0 * ratio1[1:]
            C[2:] = a2 * torch.exp(0.5 * (log_d[:-2] - log_d[2:]))
        self._rec_a, self._rec_b, self._rec_c = A, B, C
        self._eigen = -0.5 * self.speed * n * (n - 1 + a + b)  # lambda_n (terms, K-1)
        # p_n at the ends: p_n(1) = (b)_n / n! / r_n, |p_n(-1)| = (a)_n / n! / r_n
        log_end_one = lgamma(b + n) - lgamma(b) - lgamma(n + 1) - 0.5 * log_d
        log_end_zero = lgamma(a + n) - lgamma(a) - lgamma(n + 1) - 0.5 * log_d
        sign_zero = torch.where(n.to(torch.long) % 2 == 1, -1.0, 1.0).expand_as(log_end_zero)
        self._end_values = {1.0: torch.exp(log_end_one), 0.0: sign_zero * torch.exp(log_end_zero)}
        # sup |p_n| on [-1, 1] is at an end when max(al, be) >= -1/2; otherwise it is O(1)
        self._log_bound = 2 * torch.maximum(torch.maximum(log_end_one, log_end_zero), torch.zeros(()))

    def terms_needed(self, t_min: float) -> int:
        """Series terms needed at times >= t_min: every dropped term is below 1e-17 (relative to the
        stationary density)."""
        t_min = float(t_min)
        if not (math.isfinite(t_min) and t_min > 0):
            raise ValueError(f"the transition density needs times t > 0, got {t_min!r}")
        log_terms = self._eigen * t_min + self._log_bound  # (max_terms, K-1)
        big = (log_terms > math.log(_TERM_TOLERANCE)).any(dim=1)
        # the bound is eventually decreasing: the last big term fixes the truncation
        last = int(torch.nonzero(big).max()) if bool(big.any()) else 0
        if last >= self.max_terms - 1:
            raise ValueError(
                f"{self!r}: the transition density at t = {t_min:g} needs more than max_terms = {self.max_terms} "
                f"series terms; use larger times or DirichletSDE(max_terms=...)"
            )
        return max(last + 1, 2)

    def _series(self, v: torch.Tensor, t: torch.Tensor, starts: list):
        """Sum over n of exp(lambda_n t) c_n p_n(y) and of its derivative in v, for each start.

        v, t: float64 tensors (t broadcast to v); a start is a float64 tensor v_0 (broadcast to v)
        or 0.0 / 1.0 for a vertex (the end values come from the tables).
        Returns per start (sum, d sum / dv, sum of |terms|)."""
        terms = self.terms_needed(float(t.min()))
        A, B, C = (tab[:terms].to(v.device) for tab in (self._rec_a, self._rec_b, self._rec_c))
        eigen = self._eigen[:terms].to(v.device)
        ends = {key: val[:terms].to(v.device) for key, val in self._end_values.items()}
        y = 2.0 * v - 1.0
        tensor_starts = [2.0 * s - 1.0 if isinstance(s, torch.Tensor) else None for s in starts]
        p_prev, p = torch.ones_like(y), A[1] * y + B[1]  # p_0, p_1
        dp_prev, dp = torch.zeros_like(y), A[1].expand_as(y)
        q = [(torch.ones_like(y0), A[1] * y0 + B[1]) if y0 is not None else None for y0 in tensor_starts]
        sums = [torch.ones_like(y) for _ in starts]
        dsums = [torch.zeros_like(y) for _ in starts]
        abs_sums = [torch.ones_like(y) for _ in starts]
        for n in range(1, terms):
            if n >= 2:
                lin = A[n] * y + B[n]
                p_prev, p, dp_prev, dp = p, lin * p - C[n] * p_prev, dp, A[n] * p + lin * dp - C[n] * dp_prev
                q = [(qq[1], (A[n] * y0 + B[n]) * qq[1] - C[n] * qq[0])
                     if qq is not None and y0 is not None else None
                     for qq, y0 in zip(q, tensor_starts, strict=True)]
            weight = torch.exp(eigen[n] * t)
            for j, start in enumerate(starts):
                qj = q[j]
                c = qj[1] if qj is not None else ends[float(start)][n]
                wc = weight * c
                term = wc * p
                sums[j] = sums[j] + term
                dsums[j] = dsums[j] + wc * dp
                abs_sums[j] = abs_sums[j] + term.abs()
        return [(s, 2.0 * ds, a) for s, ds, a in zip(sums, dsums, abs_sums, strict=True)]

    def _log_density_and_score(self, v64: torch.Tensor, t64: torch.Tensor, v0, series):
        total, dtotal, abs_total = series
        # where cancellation leaves the sum below its own rounding (far in the tail at small t) it
        # carries no digits: the density is reported at that rounding level (an upper bound) and the
        # score is the small-time asymptotic of a reversible diffusion in the angle phi = arcsin(sqrt(v)),
        # where the noise is additive (variance s/4): p ~ sqrt(pi(phi)) exp(-(phi - phi0)^2 / (2 (s/4) t))
        floor = _ROUNDING_UNITS * torch.finfo(torch.float64).eps * abs_total
        resolved = total > floor
        total = torch.where(resolved, total, floor)
        _, _, speed = self.coefficients_like(v64)
        v0 = torch.as_tensor(v0, dtype=torch.float64, device=v64.device)
        spread = torch.sqrt(v64 * (1.0 - v64))
        gap = torch.asin(torch.sqrt(v64)) - torch.asin(torch.sqrt(v0))
        asymptotic = (-0.5 * self.beta_score(v64) - (1.0 - 2.0 * v64) / (4.0 * spread * spread)
                      - 2.0 * gap / (speed * t64 * spread))
        score = torch.where(resolved, self.beta_score(v64) + dtotal / total, asymptotic + self.beta_score(v64))
        return self.beta_logpdf(v64) + torch.log(total), score

    def _prepare_inputs(self, v: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_open_unit(v)
        t64 = _as_time(t, v).to(device=v.device, dtype=torch.float64)
        if not bool(torch.isfinite(t64).all()) or not bool((t64 > 0).all()):
            raise ValueError(f"t must be finite and > 0 (the transition density is a point mass at t = 0), got "
                             f"values in [{t64.min().item():g}, {t64.max().item():g}]")
        v64 = v.to(torch.float64)
        return v64, broadcast_to_state(t64, v64)

    def transition(self, v: torch.Tensor, v0, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Elementwise log p(v_t = v | v_0) and its score d/dv log p, each shaped like v (float64).

        v: (B, ..., K-1) in (0, 1); v0: a tensor broadcastable to v with entries in [0, 1], or 0.0 / 1.0;
        t: a number or per-sample times (B,), all > 0."""
        v64, t64 = self._prepare_inputs(v, t)
        if isinstance(v0, torch.Tensor):
            v0 = v0.to(device=v.device, dtype=torch.float64)
            if not bool(((v0 >= 0) & (v0 <= 1)).all()):
                raise ValueError("v0 must lie in [0, 1]")
            if torch.broadcast_shapes(v0.shape, v.shape) != v.shape:
                raise ValueError(f"v0 of shape {tuple(v0.shape)} does not broadcast to v's {tuple(v.shape)}")
        elif v0 not in (0.0, 1.0):
            raise ValueError(f"v0 must be a tensor or one of the vertices 0.0 / 1.0, got {v0!r}")
        else:
            v0 = float(v0)
        (series,) = self._series(v64, t64, [v0])
        return self._log_density_and_score(v64, t64, v0, series)

    def transition_density(self, v: torch.Tensor, v0, t) -> torch.Tensor:
        """p(v_t = v | v_0), elementwise (see :meth:`transition`)."""
        return torch.exp(self.transition(v, v0, t)[0])

    def categorical_marginal(self, v: torch.Tensor, t, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_t(v) and grad_v log p_t(v) when the data are categories with probabilities ``probs``.

        The data's vertex e_c has stick coordinates v_0 = [i == c], so p_t is the mixture over c of
        products of one-coordinate transition densities from 0 or 1.  v: (B, ..., K-1); probs: (K,) or
        broadcastable to (B, ..., K) (one distribution per position).  Returns the log-density summed
        over the last dimension (B, ...) and the score shaped like v, both float64."""
        v64, t64 = self._prepare_inputs(v, t)
        probs = torch.as_tensor(probs, dtype=torch.float64, device=v.device)
        if probs.dim() == 0 or probs.shape[-1] != self.categories or bool((probs < 0).any()) or not bool(
                ((probs.sum(-1) - 1).abs() < 1e-6).all()):
            raise ValueError(f"probs must be probabilities over the last dimension of size K = {self.categories}")
        from_zero, from_one = self._series(v64, t64, [0.0, 1.0])
        log0, score0 = self._log_density_and_score(v64, t64, 0.0, from_zero)
        log1, score1 = self._log_density_and_score(v64, t64, 1.0, from_one)
        base = log0.sum(-1, keepdim=True)
        # vertex c < K-1 replaces its own coordinate's density from 0 by the one from 1
        log_vertex = base + torch.cat([log1 - log0, torch.zeros_like(base)], dim=-1)
        joint = torch.log(probs) + log_vertex
        log_p = torch.logsumexp(joint, dim=-1)
        posterior = torch.softmax(joint, dim=-1)
        return log_p, score0 + posterior[..., :-1] * (score1 - score0)

    def __repr__(self) -> str:
        return (f"DirichletSDE(categories={self.categories}, speed_balanced={self.speed_balanced}, "
                f"t_min={self.t_min:g}, t_max={self.t_max:g})")
