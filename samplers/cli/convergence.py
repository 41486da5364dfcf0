"""Measured convergence orders: the slope of log error against log steps, beside the theory.

``fitted_order`` is the one order fit of the project (the tests use it too).  ``measure_orders``
runs every fixed-step solver of ``bench quality`` (the demo's list and the parametrised variants):

- deterministic solvers (the probability-flow ODE): pathwise RMS error at t_min against a tight
  DOP853 solution from the same x_T, on a smooth three-component 2-D mixture (well separated
  modes make coarse grids switch modes, which is not the asymptotic regime);
- stochastic solvers: weak error |mean - exact| + |variance - exact| of the samples at t_min for
  data N(1, 0.5^2), started from the exact marginal at t_max, from ``weak_samples`` scalar samples
  (the dynamics are elementwise); the Monte Carlo standard error is reported beside it, and a
  slope is flagged ``mc_limited`` when the finest error is within 3 standard errors of it.

The theoretical order is the solver's ``convergence_order`` (``convergence_mode``: pathwise for ODE
solvers, weak for SDE solvers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .registry import ORDER_MIXTURE, SDES, quality_solvers

__all__ = ["fitted_order", "measure_orders", "DEFAULT_ODE_STEPS", "DEFAULT_SDE_STEPS"]

_F64 = torch.float64

DEFAULT_ODE_STEPS = (16, 32, 64, 128)
DEFAULT_SDE_STEPS = (16, 32, 64, 128)
_WEAK_WIDTH = 1000  # scalar samples per row of the weak-error runs (one row is one sample of dimension 1000)


def fitted_order(steps, errors) -> float:
    """Least-squares slope of -log(error) against log(steps): the observed convergence order."""
    steps = np.asarray(steps, dtype=float)
    errors = np.asarray(errors, dtype=float)
    if steps.shape != errors.shape or steps.size < 2:
        raise ValueError(f"steps and errors must be sequences of the same length >= 2, got {steps.shape} and "
                         f"{errors.shape}")
    if not (np.all(errors > 0) and np.all(np.isfinite(errors))):
        raise ValueError(f"errors must be positive and finite, got {errors.tolist()}")
    if not np.all(steps > 0):
        raise ValueError(f"steps must be positive, got {steps.tolist()}")
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def _ode_errors(solver, sde, steps, batch: int = 16, seed: int = 1) -> list[float]:
    from ..grid import grid
    from ..model import Model
    from ..problems import probability_flow_rhs, reference_solution
    from ..sample import sample

    mixture = ORDER_MIXTURE()
    x_T = torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=_F64) * sde.prior_std
    ref = reference_solution(probability_flow_rhs(mixture, sde), x_T, sde.t_max, sde.t_min, rtol=1e-12, atol=1e-12)
    model = Model(mixture.net(sde, "x0"), sde, predicts="x0")
    errors = []
    for n in steps:
        x = sample(model, solver, x_T=x_T, grid=grid(sde, n), final_denoise=False, dtype=_F64)
        errors.append((x - ref).pow(2).mean().sqrt().item())
    return errors


def _weak_errors(solver, sde, steps, samples: int, seed: int = 0, mu: float = 1.0, s: float = 0.5):
    from ..grid import grid
    from ..model import Model
    from ..problems import gaussian
    from ..sample import sample

    t = torch.tensor([sde.t_max, sde.t_min], dtype=_F64)
    a, sg = sde.alpha(t), sde.sigma(t)
    mean_T, var_T = float(a[0]) * mu, float(a[0] ** 2 * s * s + sg[0] ** 2)
    mean_0, var_0 = float(a[1]) * mu, float(a[1] ** 2 * s * s + sg[1] ** 2)
    width = _WEAK_WIDTH
    rows = samples // width
    gen = torch.Generator().manual_seed(seed + 3)
    x_T = mean_T + math.sqrt(var_T) * torch.randn(rows, width, generator=gen, dtype=_F64)
    model = Model(gaussian(mu, s, dim=width).net(sde, "x0"), sde, predicts="x0")
    n = rows * width
    errors = []
    for k in steps:
        x = sample(model, solver, x_T=x_T, grid=grid(sde, k), seed=seed, final_denoise=False, dtype=_F64)
        errors.append(abs(x.mean().item() - mean_0) + abs(x.var().item() - var_0))
    standard_error = math.sqrt(var_0 / n) + var_0 * math.sqrt(2.0 / n)
    return errors, standard_error


def measure_orders(sdes=("edm", "vp"), solver_list=None, ode_steps=DEFAULT_ODE_STEPS, sde_steps=DEFAULT_SDE_STEPS,
                   weak_samples: int = 1_000_000, log: Callable[[str], None] | None = None) -> list[dict]:
    """One row per (SDE, solver): measured order, theoretical order, errors and steps.

    Adaptive solvers have no fixed steps and are left out.  ``sdes`` are names of
    :data:`samplers.cli.registry.SDES`; each SDE uses its default grid.
    """
    for name, steps in (("ode_steps", ode_steps), ("sde_steps", sde_steps)):
        if len(steps) < 2 or len(set(steps)) < 2 or any(int(n) != n or n < 1 for n in steps):
            raise ValueError(f"{name} must hold at least 2 different positive step counts (a slope needs 2 "
                             f"points), got {tuple(steps)}")
    if weak_samples < _WEAK_WIDTH:
        raise ValueError(f"weak_samples must be >= {_WEAK_WIDTH} (samples are drawn in rows of {_WEAK_WIDTH}), "
                         f"got {weak_samples}")
    solver_list = quality_solvers() if solver_list is None else solver_list
    rows = []
    for sde_name in sdes:
        if sde_name not in SDES:
            raise ValueError(f"sdes must be among {sorted(SDES)}, got {sde_name!r}")
        sde = SDES[sde_name]()
        for label, factory in solver_list:
            solver = factory()
            if getattr(solver, "adaptive", False):
                continue
            row = {"sde": sde_name, "solver": label, "theory": float(solver.convergence_order),
                   "kind": solver.convergence_mode}
            try:
                if solver.stochastic:
                    errors, se = _weak_errors(solver, sde, sde_steps, weak_samples)
                    row.update(steps=list(sde_steps), errors=errors, standard_error=se,
                               mc_limited=bool(errors[-1] < 3 * se))
                else:
                    errors = _ode_errors(solver, sde, ode_steps)
                    row.update(steps=list(ode_steps), errors=errors)
                row["measured"] = fitted_order(row["steps"], errors)
            except (ValueError, RuntimeError) as exc:
                row.update(measured=float("nan"), error=str(exc).splitlines()[0])
            rows.append(row)
            if log is not None:
                log(format_order_row(row))
    return rows


def format_order_row(row: dict) -> str:
    """One markdown table row: | SDE | solver | kind | theory | measured | errors | note |"""
    errs = " ".join(f"{e:.2e}" for e in row.get("errors", []))
    note = row.get("error", "")
    if row.get("mc_limited"):
        note = f"Monte Carlo limited (standard error {row['standard_error']:.1e})"
    return (f"| {row['sde']} | {row['solver']} | {row['kind']} | {row['theory']:g} | {row['measured']:.2f} "
            f"| {errs} | {note} |")
