"""IR-SDE's maximum-likelihood reverse step (Luo et al. 2023), on any Gaussian-marginal SDE.

IR-SDE steps to the mean of the reverse transition q(x_s | x_t, x_0) with the network's x_0
estimate, and its posterior sampler adds that transition's noise.  In alpha/sigma form this is the
DDPM posterior step that :class:`solvers.AncestralSampling` (``variance="posterior"``) computes, so
this solver is that step under IR-SDE's name, plus the noise-free variant.  Formulas:
docs/mean-reverting.md, "solvers.OptimalReverse".
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

    @property
    def score_weight(self) -> None:
        # with or without its noise the step follows no reverse process of the eta family (noise=False is
        # the posterior mean, not the probability-flow ODE), so the adjoint has no drift to differentiate
        return None

    def __repr__(self):
        return f"OptimalReverse(noise={self.noise})"
