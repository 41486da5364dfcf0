"""The mean-reverting SDE of image restoration (IR-SDE, Luo et al. 2023).

dx = theta(t) (mu - x) dt + sigma(t) dw pulls the clean image towards the mean state mu (the
degraded image).  In the shifted state y = x - mu it is an ordinary Gaussian-marginal SDE, so the
class is a :class:`GaussianSDE` in y and every solver that uses only alpha, sigma and the log-SNR
integrates it unchanged; mu travels as the condition ``cond={"mu": mu}``, and ``samplers.sample``
and ``samplers.Model`` shift, so networks and users only ever see x.  The theta schedules are
IR-SDE's discrete ones in continuous time.  Marginal, shift and schedules: docs/mean-reverting.md.
"""

from __future__ import annotations

import math

import torch

from .base import GaussianSDE, _as_time, broadcast_to_state
from .validation import check_choice, check_in_range, check_positive

__all__ = ["MeanRevertingSDE", "THETA_SCHEDULES"]

THETA_SCHEDULES = ("cosine", "linear", "constant")

#: IR-SDE's linear schedule runs theta from 1e-4 to 0.02 (times 1000/(T+1)): slope 199 in units of its start
_LINEAR_SLOPE = 0.02 / 1e-4 - 1.0


def _x_minus_sin(x: torch.Tensor) -> torch.Tensor:
    """x - sin(x) without the cancellation at small x (Taylor series below 0.1, error < 1e-19 x^3)."""
    x2 = x * x
    series = x * x2 / 6.0 * (1.0 - x2 / 20.0 * (1.0 - x2 / 42.0 * (1.0 - x2 / 72.0 * (1.0 - x2 / 110.0))))
    return torch.where(x.abs() < 0.1, series, x - torch.sin(x))


class MeanRevertingSDE(GaussianSDE):
    """IR-SDE's mean-reverting SDE, a Gaussian-marginal SDE in y = x - mu (see the module).

    Parameters
    ----------
    theta_schedule:
        ``"cosine"`` (default, as IR-SDE), ``"linear"`` or ``"constant"``: the shape of theta(t).
    lam:
        the stationary standard deviation lambda (IR-SDE: max_sigma/255 for images in [0, 1]; the
        default 10/255 is its deblurring/deraining setting).
    T:
        the time horizon t_max.
    eps:
        e^{-thetabar(T)}, how far the marginal at T is from the stationary N(mu, lam^2 I).
    t_min:
        the smallest time (default T/1000); sigma(t_min) must be positive for the log-SNR.
    s:
        the offset of the cosine schedule.

    Notes
    -----
    The mean state travels as the condition ``cond={"mu": mu}`` (see :meth:`state_offset`).  The
    methods inherited from :class:`GaussianSDE` (``alpha``, ``sigma``, ``log_snr``, ``f``, ``g2``)
    describe y = x - mu; :meth:`marginal`, :meth:`drift`, :meth:`prior_sample` and
    :meth:`prior_logp` take an optional ``mu`` and then describe x (``mu=None`` means mu = 0, i.e. y).
    """

    #: the key of the condition that carries the mean state
    mean_key = "mu"
    zero_noise_time = 0.0  # thetabar(0) = 0: y is the data's y_0

    def __init__(self, theta_schedule: str = "cosine", lam: float = 10.0 / 255.0, T: float = 1.0,
                 eps: float = 0.005, t_min: float | None = None, s: float = 0.008):
        name = type(self).__name__
        check_choice("theta_schedule", theta_schedule, THETA_SCHEDULES, name)
        for arg, value in (("lam", lam), ("T", T)):
            check_positive(arg, value, name)
        check_in_range("eps", eps, 0.0, 1.0, name, closed="neither", why=" (eps = exp(-thetabar(T)))")
        check_in_range("s", s, 0.0, 1.0, name, closed="left", why=" (the cosine schedule's offset)")
        self.theta_schedule = theta_schedule
        self.lam = float(lam)
        self.T = float(T)
        self.eps = float(eps)
        self.s = float(s)
        self._angle_scale = math.pi / (2.0 * (1.0 + self.s))  # a: the cosine's angle is a (u + s)
        self._cos2_s = math.cos(self._angle_scale * self.s) ** 2
        self._theta_bar_max = -math.log(self.eps)
        self._shape_one = float(self._shape(torch.tensor(1.0, dtype=torch.float64)))
        t_min = self.T / 1000.0 if t_min is None else t_min
        check_in_range("t_min", t_min, 0.0, self.T, name, closed="neither", why=" (0 < t_min < T)")
        super().__init__(float(t_min), self.T)

    # -- the schedule -----------------------------------------------------------------------------
    def _shape(self, u: torch.Tensor) -> torch.Tensor:
        """int_0^u of theta's shape (unnormalised)."""
        if self.theta_schedule == "constant":
            return u.clone()
        if self.theta_schedule == "linear":
            return u + 0.5 * _LINEAR_SLOPE * u * u
        # int_0^u 1 - cos^2(a (v + s))/cos^2(a s) dv, written without cancellation at small u:
        # [cos(2as) (2au - sin(2au))/(2a) + sin(2as) sin^2(au)/a] / (2 cos^2(as))
        a, s = self._angle_scale, self.s
        au = a * u
        return (math.cos(2 * a * s) * _x_minus_sin(2.0 * au) / (2.0 * a)
                + math.sin(2 * a * s) * torch.sin(au) ** 2 / a) / (2.0 * self._cos2_s)

    def _shape_rate(self, u: torch.Tensor) -> torch.Tensor:
        """theta's shape, d shape / du."""
        if self.theta_schedule == "constant":
            return torch.ones_like(u)
        if self.theta_schedule == "linear":
            return 1.0 + _LINEAR_SLOPE * u
        # 1 - cos^2(a (u + s))/cos^2(a s) = sin(a (u + 2s)) sin(a u)/cos^2(a s)
        a, s = self._angle_scale, self.s
        return torch.sin(a * (u + 2.0 * s)) * torch.sin(a * u) / self._cos2_s

    def theta_bar(self, t) -> torch.Tensor:
        """thetabar(t) = int_0^t theta, with thetabar(T) = -log(eps)."""
        return self._shape(_as_time(t) / self.T) * (self._theta_bar_max / self._shape_one)

    def theta(self, t) -> torch.Tensor:
        """The mean-reversion rate theta(t)."""
        return self._shape_rate(_as_time(t) / self.T) * (self._theta_bar_max / (self._shape_one * self.T))

    def t_from_theta_bar(self, theta_bar) -> torch.Tensor:
        """Inverse of :meth:`theta_bar` (closed form for constant and linear, bisection for cosine)."""
        v = _as_time(theta_bar) * (self._shape_one / self._theta_bar_max)
        if self.theta_schedule == "constant":
            return v * self.T
        if self.theta_schedule == "linear":
            # the positive root of slope/2 u^2 + u - v = 0, written without cancellation
            return 2.0 * v / (1.0 + torch.sqrt(1.0 + 2.0 * _LINEAR_SLOPE * v)) * self.T
        lo, hi = torch.zeros_like(v), torch.ones_like(v)
        for _ in range(64):  # 2^-64 of [0, 1]: below float64 resolution
            mid = 0.5 * (lo + hi)
            below = self._shape(mid) < v
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi) * self.T

    # -- GaussianSDE in y = x - mu -------------------------------------------------------------------
    def alpha(self, t):
        return torch.exp(-self.theta_bar(t))

    def sigma(self, t):
        return self.lam * torch.sqrt(-torch.expm1(-2.0 * self.theta_bar(t)))

    def dalpha_dt(self, t):
        t = _as_time(t)
        return -self.theta(t) * self.alpha(t)

    def dsigma_dt(self, t):
        # d/dt lam^2 (1 - alpha^2) = 2 lam^2 theta alpha^2
        t = _as_time(t)
        a = self.alpha(t)
        return self.lam**2 * self.theta(t) * a * a / self.sigma(t)

    def f(self, t):
        return -self.theta(_as_time(t))

    def g2(self, t):
        return 2.0 * self.lam**2 * self.theta(_as_time(t))

    def log_snr(self, t):
        tb = self.theta_bar(_as_time(t))
        return -tb - math.log(self.lam) - 0.5 * torch.log(-torch.expm1(-2.0 * tb))

    def t_from_log_snr(self, log_snr):
        # e^{2 l} lam^2 = alpha^2/(1 - alpha^2)  =>  thetabar = 1/2 log(1 + e^{-2 l} / lam^2)
        lam = _as_time(log_snr)
        return self.t_from_theta_bar(0.5 * torch.nn.functional.softplus(-2.0 * (lam + math.log(self.lam))))

    @property
    def prior_std(self) -> float:
        """lambda: the prior is the stationary law N(mu, lam^2 I)."""
        return self.lam

    # -- the mean state --------------------------------------------------------------------------------
    def state_offset(self, cond: dict | None) -> torch.Tensor:
        """The mean state mu from the sampling condition ``cond`` (``cond["mu"]``): the offset between
        the state x the user and the network see and the state y = x - mu the solvers integrate."""
        mu = None if cond is None else cond.get(self.mean_key)
        if mu is None:
            raise ValueError(
                f"{self!r} needs the mean state (the degraded input): pass cond={{{self.mean_key!r}: mu}}, "
                f"a tensor shaped like the state (B, ...) or like one sample (...)"
            )
        if not isinstance(mu, torch.Tensor) or not mu.is_floating_point():
            raise TypeError(f"cond[{self.mean_key!r}] must be a floating torch.Tensor, got "
                            f"{getattr(mu, 'dtype', type(mu).__name__)}")
        return mu

    @staticmethod
    def _shift(mu, like: torch.Tensor):
        return 0.0 if mu is None else torch.as_tensor(mu, dtype=like.dtype, device=like.device)

    def marginal(self, x0: torch.Tensor, t, mu: torch.Tensor | None = None):
        """Mean mu + (x0 - mu) e^{-thetabar(t)} and standard deviation lam sqrt(1 - e^{-2 thetabar(t)})
        of x_t given x_0 (``mu=None``: mu = 0, the marginal of y)."""
        m = self._shift(mu, x0)
        mean, std = super().marginal(x0 - m, t)
        return mean + m, std

    def marginal_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None,
                        mu: torch.Tensor | None = None) -> torch.Tensor:
        m = self._shift(mu, x0)
        return super().marginal_sample(x0 - m, t, noise) + m

    def drift(self, x: torch.Tensor, t, mu: torch.Tensor | None = None) -> torch.Tensor:
        """theta(t) (mu - x)."""
        m = self._shift(mu, x)
        return super().drift(x - m, t)

    def reverse_drift(self, x: torch.Tensor, t, score: torch.Tensor, eta: float = 1.0,
                      mu: torch.Tensor | None = None) -> torch.Tensor:
        return super().reverse_drift(x - self._shift(mu, x), t, score, eta)

    def prior_sample(self, shape, *, normal: torch.Tensor | None = None, generator=None, dtype=None, device=None,
                     mu: torch.Tensor | None = None) -> torch.Tensor:
        """mu + lam z (``mu=None``: the prior of y, lam z)."""
        y = super().prior_sample(shape, normal=normal, generator=generator, dtype=dtype, device=device)
        return y if mu is None else y + self._shift(mu, y)

    def prior_logp(self, z: torch.Tensor, mu: torch.Tensor | None = None) -> torch.Tensor:
        return super().prior_logp(z - self._shift(mu, z))

    def optimal_reverse_state(self, x_t: torch.Tensor, x0: torch.Tensor, t, s,
                              mu: torch.Tensor | None = None) -> torch.Tensor:
        """IR-SDE's maximum-likelihood reverse state x*_s from x_t (s < t) given x_0: the mean of
        q(x_s | x_t, x_0),

            x*_s = [(1 - e^{-2 thetabar_s})/(1 - e^{-2 thetabar_t})] e^{-(thetabar_t - thetabar_s)} (x_t - mu)
                 + [(1 - e^{-2 (thetabar_t - thetabar_s)})/(1 - e^{-2 thetabar_t})] e^{-thetabar_s} (x_0 - mu) + mu,

        the target of IR-SDE's training loss.  :class:`solvers.OptimalReverse` takes this step with
        the network's x_0 estimate."""
        t, s = _as_time(t, x_t), _as_time(s, x_t)
        if not bool(((s >= 0) & (s <= t) & (t > 0) & torch.isfinite(t)).all()):
            # t = 0 divides by 1 - e^{0}; s > t is no reverse step (its coefficients are not a posterior)
            raise ValueError(f"optimal_reverse_state needs times 0 <= s <= t with t > 0 (a reverse step from t to s), "
                             f"got t in [{float(t.min()):g}, {float(t.max()):g}], s in [{float(s.min()):g}, "
                             f"{float(s.max()):g}]")
        tb_t, tb_s = self.theta_bar(t), self.theta_bar(s)
        tb_ts = tb_t - tb_s
        denominator = -torch.expm1(-2.0 * tb_t)
        c_x = -torch.expm1(-2.0 * tb_s) / denominator * torch.exp(-tb_ts)
        c_x0 = -torch.expm1(-2.0 * tb_ts) / denominator * torch.exp(-tb_s)
        m = self._shift(mu, x_t)
        return (broadcast_to_state(c_x.to(x_t.dtype), x_t) * (x_t - m)
                + broadcast_to_state(c_x0.to(x_t.dtype), x_t) * (x0 - m) + m)

    def __repr__(self):
        return (f"MeanRevertingSDE(theta_schedule={self.theta_schedule!r}, lam={self.lam:g}, T={self.T:g}, "
                f"eps={self.eps:g}, t_min={self.t_min:g})")
