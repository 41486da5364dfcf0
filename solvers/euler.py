"""Euler-Maruyama for the reverse-time family, Euler and Heun for the probability-flow ODE.

Between the probability-flow ODE (eta = 0) and the reverse SDE (eta = 1) lies the family
    dx = [f x - (1 + eta^2)/2 g^2 score] dt + eta g dw,
integrated backwards in time.  Its drift is written as
    F = velocity - eta^2/2 g^2 score,   velocity = alpha' x0 + sigma' eps,
because the velocity form stays finite where f and g^2 do not (rectified flow at t = 1).
Both velocity and score are linear in (x, net output), so a step is x <- a x + b out + c z.
"""

from __future__ import annotations

import torch

from sde import check_eta

from .base import Solver, grid_draw, identity_clock

__all__ = ["EulerMaruyama", "Euler", "Heun", "reverse_drift_coefficients"]


def reverse_drift_coefficients(model, t: torch.Tensor, eta: float):
    """(p, q, g) with reverse drift F = p x + q out and noise scale g = eta * g(t); float64."""
    p, q = model.coefficients("velocity", t)
    if eta == 0.0:
        return p, q, torch.zeros_like(t)
    g2 = model.sde.g2(t)
    ps, qs = model.coefficients("score", t)
    k = 0.5 * eta * eta * g2
    return p - k * ps, q - k * qs, eta * torch.sqrt(g2)


class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time process with noise scale ``eta`` (1: reverse SDE).

    One network call per step: x <- x + F(x, t) dt + eta g(t) sqrt(|dt|) z.  Weak order 1.
    With ``eta=0`` it is the Euler method on the probability-flow ODE (pathwise order 1).
    """

    convergence_order = 1
    nfe_per_step = 1

    def __init__(self, eta: float = 1.0):
        self.eta = check_eta(eta)
        self.stochastic = self.eta > 0
        self.convergence_mode = "weak" if self.stochastic else "pathwise"

    @property
    def score_weight(self) -> float:
        return 1.0 + self.eta**2

    def prepare(self, model, times):
        t, dt = times[:-1], times[1:] - times[:-1]
        p, q, g = reverse_drift_coefficients(model, t, self.eta)
        tables = {"x": 1.0 + dt * p, "out": dt * q}
        if self.stochastic:
            tables["noise"] = g * torch.sqrt(-dt)
        return tables

    def table_names(self):
        return frozenset({"x", "out", "noise"} if self.stochastic else {"x", "out"})

    def brownian_draws(self, model, times):
        """The noise g(t_k) sqrt(|dt|) z is g(t_k) times a Brownian increment in the SDE time itself."""
        return [grid_draw(identity_clock, times)] if self.stochastic else []

    def step(self, k, x, ctx):
        out = ctx.output(x, k)
        x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("out", k), out)
        if self.stochastic:
            x.addcmul_(ctx.coef("noise", k), ctx.noise(k))
        return x

    def fused_step(self):
        """The fused CUDA kernel of this step (:mod:`solvers.kernels`)."""
        from .kernels import LinearStep

        return LinearStep(noise=self.stochastic)

    def __repr__(self):
        return f"{type(self).__name__}(eta={self.eta:g})"


class Euler(EulerMaruyama):
    """Euler's method on the probability-flow ODE (``eta=0``; ``eta>0`` adds reverse-SDE noise)."""

    def __init__(self, eta: float = 0.0):
        super().__init__(eta)


class Heun(Solver):
    """Heun's method (improved Euler, 2 network calls per step), EDM-style.

    On the probability-flow ODE (``eta=0``) it is second order.  With ``eta>0`` it is the
    stochastic improved Euler scheme for additive noise: both stages share one Gaussian draw,
    x' = x + F(x, t) dt + eta g(t) dW,  x_next = x + [F(x, t) dt + eta g(t) dW
    + F(x', t') dt + eta g(t') dW]/2.  As in EDM, the step into sigma = 0 is an Euler step:
    that is the sampler's final denoising step (``final_denoise=True``), which adds one call.
    """

    convergence_order = 2
    nfe_per_step = 2

    def __init__(self, eta: float = 0.0):
        self.eta = check_eta(eta)
        self.stochastic = self.eta > 0
        if self.stochastic:  # the stochastic improved Euler scheme is weak order 1
            self.convergence_order, self.convergence_mode = 1, "weak"

    @property
    def score_weight(self) -> float:
        return 1.0 + self.eta**2

    def prepare(self, model, times):
        t0, t1 = times[:-1], times[1:]
        dt = t1 - t0
        p0, q0, g0 = reverse_drift_coefficients(model, t0, self.eta)
        p1, q1, g1 = reverse_drift_coefficients(model, t1, self.eta)
        tables = {
            "pred_x": 1.0 + dt * p0,
            "pred_out": dt * q0,
            # x_next = x/2 + (1/2 + dt p1/2) x' + dt q1/2 out' (+ noise): the first stage's
            # increment is x' - x, so F(x, t) dt need not be kept
            "next_pred": 0.5 + 0.5 * dt * p1,
            "next_out": 0.5 * dt * q1,
        }
        if self.stochastic:
            sqrt_dt = torch.sqrt(-dt)
            tables["pred_noise"] = g0 * sqrt_dt
            tables["next_noise"] = 0.5 * g1 * sqrt_dt
        return tables

    def brownian_draws(self, model, times):
        """Both stages share one increment in the SDE time (as Euler-Maruyama)."""
        return [grid_draw(identity_clock, times)] if self.stochastic else []

    def table_names(self):
        names = {"pred_x", "pred_out", "next_pred", "next_out"}
        return frozenset(names | {"pred_noise", "next_noise"} if self.stochastic else names)

    def step(self, k, x, ctx):
        out = ctx.output(x, k)
        pred = torch.mul(x, ctx.coef("pred_x", k), out=ctx.scratch("heun_pred"))
        pred.addcmul_(ctx.coef("pred_out", k), out)
        if self.stochastic:
            z = ctx.noise(k)
            pred.addcmul_(ctx.coef("pred_noise", k), z)
        out = ctx.output(pred, k + 1)
        x.mul_(0.5).addcmul_(ctx.coef("next_pred", k), pred).addcmul_(ctx.coef("next_out", k), out)
        if self.stochastic:
            x.addcmul_(ctx.coef("next_noise", k), z)
        return x

    def fused_step(self):
        """The fused CUDA kernels of this step (:mod:`solvers.kernels`)."""
        from .kernels import HeunStep

        return HeunStep(noise=self.stochastic)

    def __repr__(self):
        return f"Heun(eta={self.eta:g})"
