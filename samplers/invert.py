"""Inversion: the latent (and solver state) that regenerates a given x0.

For :class:`solvers.Reversible` the inverse is exact: each step's algebraic inverse is applied from
the data end of the grid back to its noise end, with the same network calls and (for the SDE) the
same keyed Brownian increments, so ``sample`` from the returned pair reproduces x0 up to rounding.
For any other deterministic fixed-grid solver the probability-flow ODE is integrated backwards with
that solver on the reversed grid (DDIM inversion for ``DPMSolver(order=1)``): an approximation whose
error shrinks with the step, not to rounding.  Stochastic solvers other than Reversible cannot be
inverted (their noise is not recoverable from x0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from solvers import Solver
from solvers.reversible import Reversible

from .driver import NonFiniteError, check_solver_state, fixed_grid_context, plan_run
from .model import Model

__all__ = ["invert", "Inversion"]


@dataclass
class Inversion:
    """What :func:`invert` found."""

    x_T: torch.Tensor  #: the latent at the grid's first (noisiest) time
    #: the solver's state besides x at that time ({"x_hat": ...} for Reversible, else None)
    solver_state: dict | None
    exact: bool  #: True for a reversible solver (exact up to rounding), False for ODE run backwards
    times: torch.Tensor  #: the forward grid (N+1,) or (N+1, B), float64: regenerate with grid=times
    seed: object  #: the noise seed (SDE solvers must regenerate with the same seed)
    nfe: int  #: network calls spent


def invert(model: Model, solver: Solver, x0: torch.Tensor, *, steps: int | None = None, grid=None,
           grid_kind: str | None = None, seed=0, sample_index=None, cond: dict | None = None,
           x0_hat: torch.Tensor | None = None, dtype: torch.dtype | None = None, noise: str = "step") -> Inversion:
    """The latent x_T (and solver state) from which ``sample(model, solver, ...)`` regenerates ``x0``.

    ``x0`` is the state at the grid's last time (``sample(..., final_denoise=False)`` returns it).
    The grid (``steps``/``grid``/``grid_kind``) is the forward one, as handed to ``sample``.

    * :class:`solvers.Reversible`: exact (to rounding).  Its pair at x0 is (x0, ``x0_hat``), by
      default x0_hat = x0; pass the x_hat of a forward run to undo that run exactly.  Regenerate with
      ``sample(model, solver, x_T=inv.x_T, solver_state=inv.solver_state, grid=inv.times,
      seed=inv.seed, final_denoise=False)``.  SDE variants need the same seed, sample indices and
      ``noise`` mode (``"step"`` or ``"path"``, as :func:`samplers.sample`).
    * any other deterministic solver: the probability-flow ODE integrated backwards with that solver
      on the reversed grid (``DPMSolver(order=1)``: DDIM inversion).  Approximate: the error is the
      solver's global error in both directions, not rounding; it falls with the solver's order, best
      on a log-SNR grid (``grid_kind="log_snr"``, see docs/inversion.md).

    Records no autograd graph, in any grad mode (the steps run under ``torch.no_grad()``, as in
    :func:`samplers.sample.builds_no_graph`).
    """
    plan = plan_run(model, solver, x=x0, state_name="x0", steps=steps, grid=grid, grid_kind=grid_kind, seed=seed,
                    sample_index=sample_index, cond=cond, dtype=dtype, fixed_grid_for="invert", noise_mode=noise)
    table_times, times, keyed, cond, dtype = plan.table_times, plan.times, plan.noise, plan.cond, plan.dtype
    x = plan.x
    n_steps = table_times.shape[0] - 1
    with torch.no_grad():
        if isinstance(solver, Reversible):
            ctx = fixed_grid_context(model, solver, x, table_times, cond, keyed, dtype)
            x_hat = x.clone() if x0_hat is None else check_solver_state(solver, {"x_hat": x0_hat}, x)["x_hat"]
            # sample() carries the pair of a float32 run in float64; so does the inverse
            steps = solver.float64_context(ctx, x)
            x, x_hat = x.to(torch.float64), x_hat.to(torch.float64)
            for k in reversed(range(n_steps)):
                x, x_hat = solver.inverse_step(k, x, x_hat, steps)
            state, exact = {"x_hat": x_hat.to(dtype)}, True
        else:
            if solver.stochastic:
                raise ValueError(
                    f"invert: {solver!r} draws noise that x0 does not determine; invert a deterministic solver "
                    "(the probability-flow ODE) or use solvers.Reversible(eta=1), which inverts exactly"
                )
            if x0_hat is not None:
                raise ValueError(f"x0_hat is the second state of solvers.Reversible; {solver!r} carries none")
            backward = table_times.flip(0)
            ctx = fixed_grid_context(model, solver, x, backward, cond, keyed, dtype)
            for k in range(n_steps):
                x = solver.step(k, x, ctx)
            state, exact = None, False
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"invert: the latent became NaN or Inf with {solver!r} on {model.sde!r}; use more steps, "
                             "float64, or (for Reversible) predicts='x0'")
    return Inversion(x_T=x.to(dtype), solver_state=state, exact=exact, times=times, seed=seed, nfe=ctx.nfe)
