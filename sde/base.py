"""Forward SDEs: the abstract contract and the Gaussian-marginal family.

Every time argument is a tensor (any shape, typically (B,) per-sample times) and every
coefficient is computed in that tensor's dtype, so callers that want float64 coefficients
pass float64 times.  States ``x`` have shape (B, ...) and per-sample coefficients are
broadcast over the trailing dimensions.
"""

from __future__ import annotations

import math

import torch

from .validation import check_in_range

__all__ = ["SDE", "GaussianSDE", "broadcast_to_state", "check_eta"]


def broadcast_to_state(coefficient: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample coefficient of shape (B,) (or a scalar) so that it broadcasts over x."""
    coefficient = torch.as_tensor(coefficient)
    if coefficient.dim() == 0:
        return coefficient
    return coefficient.reshape(coefficient.shape + (1,) * (x.dim() - coefficient.dim()))


def _as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


class SDE:
    """A forward SDE dx = f(x, t) dt + g(x, t) dw on [t_min, t_max].

    Subclasses implement :meth:`drift`, :meth:`diffusion`, :meth:`prior_sample` and
    :meth:`prior_logp`.  ``reverse_drift`` gives the family of reverse-time processes between
    the probability-flow ODE (``eta=0``) and the reverse SDE (``eta=1``):
    drift f - (1 + eta^2)/2 g^2 score, diffusion eta g.
    """

    #: whether states must stay inside a domain (the simplex of :class:`sde.DirichletSDE`), which generic
    #: Langevin correctors would leave.  Gaussian marginals are not a flag: they are the type
    #: :class:`GaussianSDE` (``isinstance(sde, GaussianSDE)``), which adds alpha, sigma and the log-SNR.
    constrained_state: bool = False
    #: the ``cond`` key of the mean state an SDE is integrated around (:class:`sde.MeanRevertingSDE`:
    #: "mu"); None: the state is integrated as it is
    mean_key: str | None = None

    def __init__(self, t_min: float, t_max: float):
        if not (math.isfinite(t_min) and math.isfinite(t_max)) or not t_min < t_max:
            raise ValueError(
                f"{type(self).__name__}: expected finite t_min < t_max, got t_min={t_min}, t_max={t_max}"
            )
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    # -- contract -------------------------------------------------------------------------
    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, x: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def prior_sample(self, shape, *, normal: torch.Tensor | None = None, generator=None,
                     dtype=None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_offset(self, cond: dict | None) -> torch.Tensor | None:
        """The offset mu between the state x the user and the network see and the state y = x - mu the
        solvers integrate, from ``cond`` (under :attr:`mean_key`); None when there is none."""
        return None

    # -- derived ----------------------------------------------------------------------------
    def reverse_drift(self, x: torch.Tensor, t, score: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
        """Drift of the reverse-time process with noise scale ``eta`` (in forward-time units)."""
        eta = check_eta(eta)
        t = _as_time(t, x)
        g = self.diffusion(x, t)
        return self.drift(x, t) - 0.5 * (1.0 + eta**2) * g**2 * score

    def reverse_diffusion(self, x: torch.Tensor, t, eta: float = 1.0) -> torch.Tensor:
        return check_eta(eta) * self.diffusion(x, _as_time(t, x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


def check_eta(eta, owner: str | None = None, *, hint: str = "") -> float:
    """Validate the noise scale of the reverse-time family (0: probability-flow ODE, 1: reverse SDE);
    ``hint`` is added to the rule in the message (e.g. where another convention lives)."""
    return check_in_range("eta", eta, 0.0, 1.0, owner, why=f" (0: probability-flow ODE, 1: reverse SDE{hint})")


class GaussianSDE(SDE):
    """An SDE whose marginals are x_t = alpha(t) x_0 + sigma(t) eps, eps ~ N(0, I).

    Subclasses give alpha, sigma, their time derivatives and the inverse of the half
    log-SNR lambda(t) = log(alpha / sigma).  Drift and diffusion follow:
    f(t) = alpha'/alpha,  g(t)^2 = 2 sigma sigma' - 2 (alpha'/alpha) sigma^2.
    """

    #: the grid kind a sampler uses when the user gives only a number of steps
    default_grid: str = "uniform"
    #: the time where sigma = 0 and the state is the data itself (alpha = 1), below t_min: a grid may end
    #: there with a step that calls no network at it (samplers.grid(..., to_zero=True)); None (the default,
    #: so a subclass must say so) for an SDE whose noise never reaches 0, such as VESDE (sigma_min > 0)
    zero_noise_time: float | None = None

    def __init__(self, t_min: float, t_max: float):
        super().__init__(t_min, t_max)
        sigma_min = float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))
        if not sigma_min > 0:
            raise ValueError(
                f"{type(self).__name__}: sigma(t_min) must be positive so the model can be "
                f"evaluated on every grid point, got sigma({self.t_min:g}) = {sigma_min:g}; raise t_min"
            )

    # -- schedule: implemented by subclasses ---------------------------------------------------
    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def dalpha_dt(self, t) -> torch.Tensor:
        raise NotImplementedError

    def dsigma_dt(self, t) -> torch.Tensor:
        raise NotImplementedError

    def t_from_log_snr(self, log_snr) -> torch.Tensor:
        """Inverse of :meth:`log_snr`; the default solves it by bisection on [t_min, t_max]."""
        lam = _as_time(log_snr)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(100):  # 2^-100 of the interval: below float64 resolution
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # log_snr decreases in t
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    # -- derived schedule quantities -------------------------------------------------------------
    def log_snr(self, t) -> torch.Tensor:
        t = _as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def f(self, t) -> torch.Tensor:
        """Linear drift coefficient f(t) = d log alpha / dt."""
        t = _as_time(t)
        return self.dalpha_dt(t) / self.alpha(t)

    def g2(self, t) -> torch.Tensor:
        """Squared diffusion g(t)^2 = 2 sigma sigma' - 2 f sigma^2."""
        t = _as_time(t)
        s = self.sigma(t)
        return 2.0 * s * self.dsigma_dt(t) - 2.0 * self.f(t) * s * s

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        t = _as_time(t, x)
        return broadcast_to_state(self.f(t).to(x.dtype), x) * x

    def diffusion(self, x: torch.Tensor, t) -> torch.Tensor:
        t = _as_time(t, x)
        return broadcast_to_state(torch.sqrt(self.g2(t)).to(x.dtype), x)

    # -- marginals and prior ------------------------------------------------------------------
    def marginal(self, x0: torch.Tensor, t):
        """Mean and standard deviation of x_t given x_0 (shapes broadcastable to x0)."""
        t = _as_time(t, x0)
        a = broadcast_to_state(self.alpha(t).to(x0.dtype), x0)
        s = broadcast_to_state(self.sigma(t).to(x0.dtype), x0)
        return a * x0, s

    def marginal_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = self.marginal(x0, t)
        if noise is None:
            noise = torch.randn_like(x0)
        return mean + std * noise

    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) at t_max."""
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def prior_sample(self, shape, *, normal: torch.Tensor | None = None, generator=None,
                     dtype=None, device=None) -> torch.Tensor:
        if normal is None:
            normal = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        elif tuple(normal.shape) != tuple(shape):
            raise ValueError(f"normal must have shape {tuple(shape)}, got {tuple(normal.shape)}")
        return normal * self.prior_std

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior, summed over all but the batch dimension."""
        dims = z[0].numel()
        var = self.prior_std**2
        sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * dims * math.log(2 * math.pi * var) - sq / (2 * var)
