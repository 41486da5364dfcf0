"""Gotta Go Fast: adaptive step size for the reverse SDE, with a step size per sample.

Jolicoeur-Martineau et al. (2021): Euler-Maruyama and improved Euler share one Brownian increment,
their difference is the error estimate, and the improved-Euler state is kept.  Two things differ
from the reference code, both needed for a correct per-sample method: the increment comes from the
run's virtual Brownian tree, so a retried step integrates the same path (a fresh draw biases the
accepted steps towards small noise), and each sample has its own t, h and decision, a rejected
sample reusing its drift at the step's start.  Details: docs/solvers.md, "Gotta Go Fast on the
reverse SDE, per sample".
"""

from __future__ import annotations

import torch

from sde.validation import check_count, check_in_range, check_positive

from .adaptive import AdaptiveSolver, Attempt, StepControl, batch_independent, lands_on_end
from .euler import reverse_drift_coefficients

__all__ = ["AdaptiveEM", "GGF_ATOL"]

#: the paper's absolute tolerances: 1/128 for data in [-1, 1] (its VP runs), 1/256 for data in
#: [0, 1] (its VE runs)
GGF_ATOL = {"VPSDE": 0.0078, "VESDE": 0.0039}


class AdaptiveEM(AdaptiveSolver):
    """Adaptive Euler-Maruyama / improved Euler on the reverse SDE (Gotta Go Fast), per sample.

    Parameters (defaults are the paper's)
    ----------
    rtol:
        relative tolerance (0.05; the paper sweeps 0.01-0.1, its code's default is 0.01).
    atol:
        absolute tolerance; ``None`` takes the paper's value for the SDE's data range
        (:data:`GGF_ATOL`: 0.0039 on :class:`sde.VESDE`, whose runs used data in [0, 1], else 0.0078).
    h_init:
        the first step, as a fraction of each sample's time span (0.01: the paper's, whose span is
        about 1).
    safety, exponent:
        the step-size rule h <- safety h E^(-exponent) (0.9 and 0.9).
    max_steps:
        attempts per sample before :class:`StepSizeError`.
    min_step:
        smallest step in t before :class:`StepSizeError`; ``None``: a step shorter in t
        than the Brownian tree's resolution (span / 2^depth), below which its path is
        interpolated and no longer Brownian.
    depth:
        bisections of the virtual Brownian tree; ``None``: the driver's default (24, a resolution
        of 6e-8 of the span).
    """

    convergence_order = 1
    convergence_mode = "weak"
    nfe_per_step = 2
    stochastic = True
    gaussian_only = True

    def __init__(self, rtol: float = 0.05, atol: float | None = None, h_init: float = 0.01, safety: float = 0.9,
                 exponent: float = 0.9, max_steps: int = 100_000, min_step: float | None = None,
                 depth: int | None = None):
        super().__init__(rtol, 0.0078 if atol is None else atol, max_steps, 1.0 if min_step is None else min_step)
        self.atol_given = atol is not None
        self.min_step_given = min_step is not None
        self.h_init = check_in_range("h_init", h_init, 0.0, 1.0, closed="right")
        self.safety = check_in_range("safety", safety, 0.0, 1.0, closed="right")
        self.exponent = check_positive("exponent", exponent)
        self.depth = None if depth is None else check_count("depth", depth, maximum=30, why=" (or None)")

    def with_tolerance(self, rtol, atol):
        other = super().with_tolerance(rtol, atol)
        other.atol_given = True
        return other

    def tolerances_for(self, sde) -> tuple[float, float]:
        """(rtol, atol) on ``sde``: an unset atol is the paper's for that SDE."""
        atol = self.atol if self.atol_given else GGF_ATOL.get(type(sde).__name__, GGF_ATOL["VPSDE"])
        return self.rtol, atol

    def solve(self, model, x, t_start, t_end, ctx):
        rtol, atol = self.tolerances_for(model.sde)
        batch = x.shape[0]
        span = t_start - t_end
        depth = ctx.brownian_depth if self.depth is None else self.depth
        resolution = float(ctx.t_high - ctx.t_low) * 2.0 ** -depth
        self._check_finite(model, t_start)
        t = t_start.clone()
        h = self.h_init * span
        x_prev = x.clone()  # the Euler proposal of each sample's last accepted step
        drift_start = torch.empty_like(x)  # F(x, t) of each sample's current state
        g_start = torch.empty((batch,) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        drift_valid = torch.zeros(batch, dtype=torch.bool)

        def drift(xs, ts, idx):
            p, q, g = batch_independent(lambda u: reverse_drift_coefficients(model, u, 1.0), ts)
            return xs * ctx.column(p, xs) + ctx.output(xs, ts, idx) * ctx.column(q, xs), ctx.column(g, xs)

        def attempt(idx):
            stale = idx[~drift_valid[idx]]
            if stale.numel():
                drift_start[stale], g_start[stale] = drift(x[stale], t[stale], stale)
                drift_valid[stale] = True
            xs, t_i, h_i = x[idx], t[idx], h[idx]
            # a step that would end within rounding of the end lands on it exactly
            final = lands_on_end(t_i - h_i, t_end[idx], direction=-1.0)
            t_next = torch.where(final, t_end[idx], t_i - h_i)
            step = t_i - t_next
            dw = ctx.brownian(t_next, t_i, idx, xs, depth=depth)
            minus_h = ctx.column(-step, xs)
            k1 = drift_start[idx] * minus_h + g_start[idx] * dw
            x_euler = xs + k1
            f2, g2 = drift(x_euler, t_next, idx)
            x_heun = xs + 0.5 * (k1 + f2 * minus_h + g2 * dw)
            err = self.error_norm(x_heun, x_euler, x_prev[idx], rtol, atol)
            remaining = (t_next - t_end[idx], t_i - t_end[idx])
            return Attempt(x_heun, err, t_i, t_next, final, step, remaining, x_low=x_euler)

        def accepted(idx, accept, a):
            acc = idx[accept]
            x_prev[acc] = a.x_low[accept]
            drift_valid[acc] = False

        def floor(proposal, accept, a):
            if self.min_step_given:
                return proposal < self.min_step, f"min_step={self.min_step:.3g}"
            remaining = torch.where(accept, *a.remaining)
            return ((proposal < remaining) & (proposal < resolution),
                    f"the Brownian tree's resolution {resolution:.3g} in t (depth={depth})")

        control = StepControl(safety=self.safety, exponent=self.exponent)
        return self.per_sample_loop(x, t, h, t <= t_end, ctx, control, attempt, accepted, floor)

    def _check_finite(self, model, t_start):
        p, q, g = reverse_drift_coefficients(model, t_start, 1.0)
        if not bool(torch.isfinite(torch.stack([p, q, g])).all()):
            raise ValueError(
                f"{self!r}: the reverse SDE's drift or diffusion is not finite at the start time "
                f"t={float(t_start.max()):g} of {model.sde!r} (e.g. alpha = 0 there): start the grid below it")

    def __repr__(self):
        args = [f"rtol={self.rtol:g}"]
        if self.atol_given:
            args.append(f"atol={self.atol:g}")
        return f"AdaptiveEM({', '.join(args)})"
