"""The Gaussian-marginal SDE families: VP, sub-VP, VE, EDM, cosine VP, discrete DDPM, rectified flow."""

from __future__ import annotations

import math

import torch

from .base import GaussianSDE, _as_time
from .validation import check_in_range, check_positive

__all__ = [
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "EDMSDE",
    "CosineVPSDE",
    "DiscreteVPSDE",
    "RectifiedFlowSDE",
]


def _sigma_from_log_alpha(log_alpha: torch.Tensor) -> torch.Tensor:
    # sqrt(1 - alpha^2) without cancellation when alpha is close to 1
    return torch.sqrt(-torch.expm1(2.0 * log_alpha))


def _log_alpha_from_log_snr_vp(log_snr: torch.Tensor) -> torch.Tensor:
    # alpha^2 + sigma^2 = 1  =>  log alpha = -1/2 log(1 + exp(-2 lambda))
    return -0.5 * torch.nn.functional.softplus(-2.0 * log_snr)


class _VPFamily(GaussianSDE):
    """Shared parts of the variance-preserving schedules: sigma = sqrt(1 - alpha^2), prior N(0, I)."""

    # alpha(0) = 1; for a discrete schedule t = 0 is the step past timestep 0 to alpha = 1 that diffusers'
    # schedulers end on (final_alpha_cumprod = 1)
    zero_noise_time = 0.0

    def log_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def dlog_alpha_dt(self, t) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t):
        return torch.exp(self.log_alpha(_as_time(t)))

    def sigma(self, t):
        return _sigma_from_log_alpha(self.log_alpha(_as_time(t)))

    def dalpha_dt(self, t):
        t = _as_time(t)
        return self.alpha(t) * self.dlog_alpha_dt(t)

    def dsigma_dt(self, t):
        t = _as_time(t)
        a = self.alpha(t)
        return -a * self.dalpha_dt(t) / self.sigma(t)

    def f(self, t):
        return self.dlog_alpha_dt(_as_time(t))

    def log_snr(self, t):
        la = self.log_alpha(_as_time(t))
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    @property
    def prior_std(self) -> float:
        return 1.0


class VPSDE(_VPFamily):
    """Variance-preserving SDE (Song et al. 2021): beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        name = type(self).__name__
        self.beta_min = check_positive("beta_min", beta_min, name)
        self.beta_max = check_positive("beta_max", beta_max, name)
        if self.beta_max < self.beta_min:
            raise ValueError(f"{name}: expected beta_max >= beta_min, got {beta_max} < {beta_min}")
        super().__init__(t_min, t_max)

    def beta(self, t):
        return self.beta_min + _as_time(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        t = _as_time(t)
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def dlog_alpha_dt(self, t):
        return -0.5 * self.beta(t)

    def _t_from_log_alpha(self, log_alpha):
        # solve 1/2 (beta_max - beta_min) t^2 + beta_min t = -2 log alpha, written without cancellation
        big_l = -2.0 * log_alpha
        db = self.beta_max - self.beta_min
        return 2.0 * big_l / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * big_l))

    def t_from_log_snr(self, log_snr):
        return self._t_from_log_alpha(_log_alpha_from_log_snr_vp(_as_time(log_snr)))

    def __repr__(self):
        return (f"VPSDE(beta_min={self.beta_min:g}, beta_max={self.beta_max:g}, t_min={self.t_min:g}, "
                f"t_max={self.t_max:g})")


class SubVPSDE(VPSDE):
    """sub-VP SDE: VP drift, sigma(t) = 1 - alpha(t)^2 (no square root), prior N(0, I)."""

    def sigma(self, t):
        return -torch.expm1(2.0 * self.log_alpha(_as_time(t)))

    def dsigma_dt(self, t):
        t = _as_time(t)
        return -2.0 * self.alpha(t) * self.dalpha_dt(t)

    def log_snr(self, t):
        la = self.log_alpha(_as_time(t))
        return la - torch.log(-torch.expm1(2.0 * la))

    def t_from_log_snr(self, log_snr):
        lam = _as_time(log_snr)
        # alpha / (1 - alpha^2) = e^lambda; the positive root, written without cancellation
        e = torch.exp(lam)
        alpha = 2.0 * e / (1.0 + torch.sqrt(1.0 + 4.0 * e * e))
        return self._t_from_log_alpha(torch.log(alpha))

    def __repr__(self):
        return super().__repr__().replace("VPSDE", "SubVPSDE", 1)


class VESDE(GaussianSDE):
    """Variance-exploding SDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1."""

    default_grid = "log_snr"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, t_max: float = 1.0):
        name = type(self).__name__
        self.sigma_min = check_positive("sigma_min", sigma_min, name)
        self.sigma_max = check_positive("sigma_max", sigma_max, name)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"{name}: expected sigma_max > sigma_min, got {sigma_max} <= {sigma_min}")
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        super().__init__(t_min, t_max)

    def alpha(self, t):
        return torch.ones_like(_as_time(t))

    def dalpha_dt(self, t):
        return torch.zeros_like(_as_time(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(_as_time(t) * self._log_ratio)

    def dsigma_dt(self, t):
        return self.sigma(t) * self._log_ratio

    def log_snr(self, t):
        return -(math.log(self.sigma_min) + _as_time(t) * self._log_ratio)

    def t_from_log_snr(self, log_snr):
        return (-_as_time(log_snr) - math.log(self.sigma_min)) / self._log_ratio

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def __repr__(self):
        return (f"VESDE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, t_min={self.t_min:g}, "
                f"t_max={self.t_max:g})")


class EDMSDE(GaussianSDE):
    """The EDM parametrisation (Karras et al. 2022): alpha = 1, sigma(t) = t on [sigma_min, sigma_max]."""

    default_grid = "karras"
    zero_noise_time = 0.0

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        name = type(self).__name__
        self.sigma_min = check_positive("sigma_min", sigma_min, name)
        self.sigma_max = check_positive("sigma_max", sigma_max, name)
        super().__init__(self.sigma_min, self.sigma_max)

    def alpha(self, t):
        return torch.ones_like(_as_time(t))

    def dalpha_dt(self, t):
        return torch.zeros_like(_as_time(t))

    def sigma(self, t):
        return _as_time(t).clone()

    def dsigma_dt(self, t):
        return torch.ones_like(_as_time(t))

    def log_snr(self, t):
        return -torch.log(_as_time(t))

    def t_from_log_snr(self, log_snr):
        return torch.exp(-_as_time(log_snr))

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def __repr__(self):
        return f"EDMSDE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"


class CosineVPSDE(_VPFamily):
    """Cosine schedule (Nichol & Dhariwal 2021) in continuous time.

    alpha(t) = cos((t + s)/(1 + s) pi/2) / cos(s/(1 + s) pi/2).  t_max defaults to 0.9946, where
    DPM-Solver's continuous cosine schedule stops, because alpha -> 0 (log-SNR -> -inf) at t = 1.
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s = check_in_range("s", s, 0.0, 1.0, "CosineVPSDE", closed="left")
        if not t_max < 1.0:
            raise ValueError(f"CosineVPSDE: t_max must be below 1 (alpha(1) = 0), got {t_max!r}")
        self._log_alpha_0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))
        super().__init__(t_min, t_max)

    def _angle(self, t):
        return (_as_time(t) + self.s) / (1 + self.s) * (math.pi / 2)

    def log_alpha(self, t):
        return torch.log(torch.cos(self._angle(t))) - self._log_alpha_0

    def dlog_alpha_dt(self, t):
        return -torch.tan(self._angle(t)) * (math.pi / 2) / (1 + self.s)

    def t_from_log_snr(self, log_snr):
        log_alpha = _log_alpha_from_log_snr_vp(_as_time(log_snr))
        cos_angle = torch.exp(log_alpha + self._log_alpha_0)
        return torch.arccos(cos_angle) * (2 / math.pi) * (1 + self.s) - self.s

    def __repr__(self):
        return f"CosineVPSDE(s={self.s:g}, t_min={self.t_min:g}, t_max={self.t_max:g})"


class DiscreteVPSDE(_VPFamily):
    """A discrete DDPM schedule (from ``betas`` or ``alphas_cumprod``) in continuous time.

    As in DPM-Solver: timestep n (0 ... N-1) sits at t = (n + 1)/N and log alpha is
    piecewise linear in t between the knots, so t lies in [1/N, 1].  Networks trained on
    integer timesteps get them through :meth:`timestep` (``Model(..., time_input="discrete")``).
    """

    def __init__(self, betas=None, alphas_cumprod=None, t_min: float | None = None, t_max: float = 1.0):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("DiscreteVPSDE: pass exactly one of betas or alphas_cumprod")
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
            if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("DiscreteVPSDE: betas must hold at least 2 values, each in (0, 1)")
            log_alphas_cumprod = torch.cumsum(torch.log1p(-betas), dim=0)
        else:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
            if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
                raise ValueError("DiscreteVPSDE: alphas_cumprod must hold at least 2 values, each in (0, 1)")
            if not bool((ac[1:] < ac[:-1]).all()):
                raise ValueError("DiscreteVPSDE: alphas_cumprod must be strictly decreasing")
            log_alphas_cumprod = torch.log(ac)
        self.num_timesteps = n = log_alphas_cumprod.numel()
        self._knots_t = torch.arange(1, n + 1, dtype=torch.float64) / n
        self._knots_log_alpha = 0.5 * log_alphas_cumprod
        self._slopes = torch.diff(self._knots_log_alpha) * n
        t_min = 1.0 / n if t_min is None else float(t_min)
        # checked before the base class evaluates sigma(t_min): below the first knot the
        # schedule is an extrapolation and sigma may be NaN
        if t_min < 1.0 / n or float(t_max) > 1.0:
            raise ValueError(
                f"DiscreteVPSDE: the time range must lie in [1/N, 1] = [{1.0 / n:g}, 1], got [{t_min:g}, {t_max:g}]"
            )
        super().__init__(t_min, t_max)

    def _segment(self, t):
        k = torch.searchsorted(self._knots_t.to(t.device), t.detach(), right=True) - 1
        return k.clamp(0, self.num_timesteps - 2)

    def log_alpha(self, t):
        t = _as_time(t)
        k = self._segment(t)
        knots_t = self._knots_t.to(device=t.device, dtype=t.dtype)
        knots = self._knots_log_alpha.to(device=t.device, dtype=t.dtype)
        slopes = self._slopes.to(device=t.device, dtype=t.dtype)
        return knots[k] + slopes[k] * (t - knots_t[k])

    def dlog_alpha_dt(self, t):
        t = _as_time(t)
        return self._slopes.to(device=t.device, dtype=t.dtype)[self._segment(t)]

    def t_from_log_snr(self, log_snr):
        log_alpha = _log_alpha_from_log_snr_vp(_as_time(log_snr))
        # log alpha decreases along the knots: search the negated (increasing) table
        knots = -self._knots_log_alpha.to(device=log_alpha.device, dtype=log_alpha.dtype)
        k = (torch.searchsorted(knots, -log_alpha.detach(), right=True) - 1).clamp(0, self.num_timesteps - 2)
        slopes = self._slopes.to(device=log_alpha.device, dtype=log_alpha.dtype)
        knots_t = self._knots_t.to(device=log_alpha.device, dtype=log_alpha.dtype)
        return knots_t[k] + (log_alpha + knots[k]) / slopes[k]

    def timestep(self, t) -> torch.Tensor:
        """The (fractional) discrete timestep n = N t - 1 the network was trained with."""
        return self.num_timesteps * _as_time(t) - 1.0

    def t_from_timestep(self, n) -> torch.Tensor:
        return (_as_time(n) + 1.0) / self.num_timesteps

    def __repr__(self):
        return f"DiscreteVPSDE(N={self.num_timesteps}, t_min={self.t_min:g}, t_max={self.t_max:g})"


class RectifiedFlowSDE(GaussianSDE):
    """Rectified flow / flow matching: x_t = (1 - t) x_0 + t eps on [t_min, 1].

    alpha(1) = 0, so at t = 1 the log-SNR is -inf and the reverse SDE's diffusion is infinite:
    ODE solvers start at t = 1 (a velocity network is finite there); stochastic solvers need
    a grid that starts below 1.
    """

    zero_noise_time = 0.0

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0):
        if not t_max <= 1.0:
            raise ValueError(f"RectifiedFlowSDE: t_max must be at most 1, got {t_max!r}")
        super().__init__(t_min, t_max)

    def alpha(self, t):
        return 1.0 - _as_time(t)

    def sigma(self, t):
        return _as_time(t).clone()

    def dalpha_dt(self, t):
        return -torch.ones_like(_as_time(t))

    def dsigma_dt(self, t):
        return torch.ones_like(_as_time(t))

    def t_from_log_snr(self, log_snr):
        return torch.sigmoid(-_as_time(log_snr))

    def __repr__(self):
        return f"RectifiedFlowSDE(t_min={self.t_min:g}, t_max={self.t_max:g})"
