"""IR-SDE's maximum-likelihood reverse step (Luo et al. 2023), on any Gaussian-marginal SDE.

Given x_0, the reverse transition q(x_s | x_t, x_0) (s < t) of a Gaussian-marginal SDE is Gaussian.  IR-SDE
takes its mean, the maximum-likelihood reverse state, as the step: on the mean-reverting SDE
(alpha = e^{-thetabar}, sigma^2 = lam^2 (1 - alpha^2), y = x - mu)

    y*_s = [(1 - e^{-2 thetabar_s})/(1 - e^{-2 thetabar_t})] e^{-(thetabar_t - thetabar_s)} y_t
         + [(1 - e^{-2 (thetabar_t - thetabar_s)})/(1 - e^{-2 thetabar_t})] e^{-thetabar_s} y0_hat,

with the network's x_0 estimate in place of x_0, and its posterior sampler adds the posterior noise of
variance lam^2 (1 - e^{-2 (thetabar_t - thetabar_s)}) (1 - e^{-2 thetabar_s})/(1 - e^{-2 thetabar_t}).
In alpha/sigma form this is the DDPM posterior: mean (a sigma_s^2/sigma_t^2) y_t + (alpha_s G^2/sigma_t^2)
y0_hat and variance G^2 sigma_s^2/sigma_t^2, a = alpha_t/alpha_s, G^2 = sigma_t^2 - a^2 sigma_s^2, which
:class:`solvers.AncestralSampling` (``variance="posterior"``) already computes: this solver is that
step, named and documented for the mean-reverting SDE, plus the noise-free variant.
"""

from __future__ import annotations

from sde.validation import check_flag

from .pc import AncestralSampling

__all__ = ["OptimalReverse"]


class OptimalReverse(AncestralSampling):
    """IR-SDE's maximum-likelihood reverse step: the mean of q(x_s | x_t, x0_hat) (see the module).

    ``noise=True`` (default) is IR-SDE's posterior sampler: the mean plus the posterior noise, a sampler
    of the data distribution (weak order 1, one network call per step).  ``noise=False`` takes the
    maximum-likelihood state itself, deterministically: the paper's reverse step, which keeps the
    posterior mean of each step and so draws no variance below the network's x0 estimate (a
    deterministic restoration, not a sampler of the distribution).  ``noise`` is not an ``eta``:
    without its noise the step is not the probability-flow ODE's.

    Works on every Gaussian-marginal SDE; on :class:`sde.MeanRevertingSDE` the driver runs it on
    y = x - mu as every other solver.
    """

    def __init__(self, noise: bool = True):
        super().__init__(variance="posterior")
        self.noise = check_flag("noise", noise, "OptimalReverse")
        self.stochastic = noise
        if not noise:  # a deterministic step: it converges, pathwise, to the noise-free reverse SDE
            self.convergence_mode = "pathwise"

    def prepare(self, model, times):
        tables = super().prepare(model, times)
        if not self.noise:
            del tables["noise"]
        return tables

    def table_names(self):
        return frozenset({"x", "out", "noise"} if self.noise else {"x", "out"})

    def step(self, k, x, ctx):
        if self.noise:
            return super().step(k, x, ctx)
        out = ctx.output(x, k)
        return x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("out", k), out)

    def __repr__(self):
        return f"OptimalReverse(noise={self.noise})"
