"""Solvers for the Dirichlet diffusion: reverse-time steps in stick-breaking coordinates that keep
every state inside the simplex (each coordinate in (0, 1))."""

from __future__ import annotations

import torch

from sde import DirichletSDE, check_eta
from sde.validation import check_in_range, check_positive

from .base import Plan, Solver

__all__ = ["JacobiEulerMaruyama"]


class JacobiEulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time Jacobi processes of a :class:`sde.DirichletSDE` (DDSM's sampler).

    The state is the stick-breaking coordinates v (B, ..., K-1) and the network a score in v.  Per step,
    with h = time_dilation * (t_k - t_{k+1}) and the score s evaluated at (v, t_k):

        v_mean = v - h [f(v) - (1 + eta^2)/2 (d(g^2)/dv + g^2 s)],   g^2 = s_i v (1 - v)
        v      = clamp(v_mean + eta sqrt(h) g(v) z, boundary_eps, 1 - boundary_eps)

    The last step adds no noise.  Clamping is the paper's boundary handling: the Jacobi process
    never reaches 0 or 1 for a, b >= 1, but an Euler step from near the boundary can overshoot it.

    Parameters
    ----------
    time_dilation:
        c >= 1: each step integrates c times the grid's time step, with the score still taken at the
        undilated grid time (the paper's time dilation; pass c times as many steps to keep the step
        size).  It lengthens the reverse process at every noise level, which sharpens samples.
    dilation_start:
        dilate only steps starting at t_k <= dilation_start (default: every step).
    boundary_eps:
        the clamp margin (default 1e-5, as in DDSM); it must exceed the state dtype's resolution near 1.
    eta:
        1: the reverse SDE; 0: Euler on the probability-flow ODE.
    """

    convergence_order = 1
    convergence_mode = "weak"
    nfe_per_step = 1
    gaussian_only = False

    def __init__(self, time_dilation: float = 1.0, dilation_start: float | None = None, boundary_eps: float = 1e-5,
                 eta: float = 1.0):
        self.time_dilation = check_positive("time_dilation", time_dilation)
        if self.time_dilation < 1:
            raise ValueError(f"time_dilation must be >= 1 (it stretches the reverse process), got {time_dilation!r}")
        self.dilation_start = None if dilation_start is None else check_positive("dilation_start", dilation_start)
        self.boundary_eps = check_in_range("boundary_eps", boundary_eps, 0.0, 0.5, closed="neither")
        self.eta = check_eta(eta)
        self.stochastic = self.eta > 0
        if not self.stochastic:
            self.convergence_mode = "pathwise"

    @property
    def score_weight(self) -> float:
        return 1.0 + self.eta**2

    def check_sde(self, sde) -> None:
        if not isinstance(sde, DirichletSDE):
            raise ValueError(f"{type(self).__name__} integrates the Jacobi processes of an sde.DirichletSDE "
                             f"(stick-breaking coordinates); {sde!r} is not one")

    def prepare(self, model, times):
        self.check_sde(model.sde)
        self._sde = model.sde
        start = times[:-1]
        dilation = torch.full_like(start, self.time_dilation)
        if self.dilation_start is not None:
            dilation = torch.where(start <= self.dilation_start, dilation, torch.ones_like(dilation))
        h = (times[:-1] - times[1:]) * dilation
        noise = self.eta * torch.sqrt(h)
        noise[-1] = 0.0  # no noise on the last step: the output is the mean of the final transition
        return {"h": h, "noise": noise, "noisy": Plan([self.stochastic] * (h.shape[0] - 1) + [False])}

    def table_names(self):
        return frozenset({"h", "noise"} if self.stochastic else {"h"})

    def plan_names(self):
        return frozenset({"noisy"})

    def step(self, k, v, ctx):
        if k == 0:
            # a state on or outside the boundary (x_T = a vertex, a NaN) would reach the network and turn
            # into a NaN far from its cause; the clamp below is for overshoots of the steps, not for inputs
            self._sde._check_open_unit(v, "x_T")
        score = ctx.output(v, k)
        if score.dtype != v.dtype:
            score = score.to(v.dtype)
        sde = self._sde
        drift = sde.reverse_drift(v, None, score, self.eta)
        if ctx.plan("noisy")[k]:
            spread = ctx.coef("noise", k) * sde.diffusion(v, None)
            v = v.sub_(ctx.coef("h", k) * drift).addcmul_(spread, ctx.noise(k))
        else:
            v = v.sub_(ctx.coef("h", k) * drift)
        return v.clamp_(self.boundary_eps, 1.0 - self.boundary_eps)

    def __repr__(self):
        return (f"{type(self).__name__}(time_dilation={self.time_dilation:g}, dilation_start={self.dilation_start}, "
                f"boundary_eps={self.boundary_eps:g}, eta={self.eta:g})")
