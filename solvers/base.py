"""The solver contract: a small object that declares what it is and takes one step.

Everything the driver and the kernels may ask of a solver is declared here with a default:
:class:`SolverBase` for every solver, :class:`Solver` for the fixed-grid ones (``solvers.AdaptiveSolver``
for the adaptive ones), :class:`StepContext` for what a step may ask of the run.  A fixed-grid solver
turns a time grid into per-step coefficient tables once (``prepare``, float64 on the host), then
``step`` updates the state in place with a few fused torch operations.  All the per-grid arithmetic,
including the conversion from what the network predicts, is in the tables, so a step costs the
network calls plus a handful of passes over the batch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from sde import GaussianSDE
from sde.validation import check_in_range

__all__ = ["SolverBase", "Solver", "Plan", "StepContext", "DynamicThresholding", "X0Hooks", "first_true",
           "check_coefficients_finite", "BrownianDraw", "grid_draw"]


def _left_to_subclasses(method):
    """Mark a base-class method that a solver must implement (see :meth:`Solver.check_implemented`)."""
    method.left_to_subclasses = True
    return method


def first_true(mask: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the first True entry of a mask shaped (N,) or (N, C, ...), rows first: the step
    and the sample a per-sample error is about (column 0 for a mask without columns)."""
    rows = mask.reshape(mask.shape[0], -1) if mask.dim() > 1 else mask[:, None]
    row = int(torch.nonzero(rows.any(dim=1))[0])
    return row, int(torch.nonzero(rows[row])[0])


def check_coefficients_finite(solver, name: str, table: torch.Tensor, where: Callable[[int, int], str]) -> None:
    """The one refusal of a singular step, shared by every solver: a coefficient ``name`` (a table whose
    rows are steps or samples) that is not finite means the SDE or the network's parametrisation is
    singular there.  ``where(row, column)`` describes the first such entry (its step/sample and times)."""
    bad = ~torch.isfinite(torch.as_tensor(table))
    if bool(bad.any()):
        raise ValueError(
            f"{solver!r}: {where(*first_true(bad))} has a non-finite coefficient {name!r}; the SDE or the model's "
            f"parametrisation is singular there (e.g. a reverse SDE at alpha = 0, or predicts='eps' where "
            f"alpha = 0): start the grid away from that time or use another solver/parametrisation"
        )


class StepContext(Protocol):
    """What the sampling driver hands to :meth:`Solver.step`: the run's network, tables, plans and noise."""

    #: the prepared coefficient tables: name -> (N, C, 1, ...) on the state's device and dtype
    tables: dict[str, torch.Tensor]
    #: the prepared per-step plans: name -> a host-side list (one entry per step, e.g. step orders)
    plans: dict[str, list]
    #: the solver's state besides x at the grid's first time (``sample(..., solver_state=)``), or None
    solver_state: dict | None
    #: network calls so far
    nfe: int

    def output(self, x: torch.Tensor, time_index: int, stage: str | None = None) -> torch.Tensor:
        """The network output at state x and grid time ``time_index`` (counts one NFE); with
        ``stage``, at row ``time_index`` of the solver's stage-time table of that name (see
        :meth:`Solver.stage_times`)."""

    def model_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output at state x and SDE times ``t`` (float64, shape (C,) with C = 1 or the
        batch size), for a solver that calls the network off the grid and off its stage tables
        (Restart's backward passes); counts one NFE."""

    def noise(self, step: int, draw: int = 0) -> torch.Tensor:
        """Keyed standard normals shaped like the state for ``step`` (the same for every call); draws
        1, 2, ... of the same step are independent of draw 0 and of each other (a corrector's noise,
        restart jumps).  Draws >= 1 share one buffer: use each before asking for the next."""

    def coef(self, name: str, step: int) -> torch.Tensor:
        """Row ``step`` of a prepared table, shaped to broadcast against the state."""

    def scratch(self, name: str) -> torch.Tensor:
        """A reusable buffer shaped like the state."""

    def plan(self, name: str) -> list:
        """A per-step plan that ``prepare`` returned under ``name`` (a :class:`Plan`)."""


class BrownianDraw:
    """Where a solver's noise draw is a Brownian increment (``sample(..., noise="path")``).

    Draw ``draw`` of step k (``ctx.noise(k, draw)``) is then (W(clock(end)) - W(clock(start))) /
    sqrt(|clock(end) - clock(start)|) for ``(start, end) = steps[k]``: a standard normal, the normalised
    increment of Brownian path number ``path`` of the sample in the solver's Brownian ``clock`` (a
    monotone map of float64 SDE times, the clock in which the step's noise term is a Brownian
    increment: its variance is a coefficient times the clock's change).  Paths 0, 1, ... are
    independent; two draws on one path must not overlap in time.  Steps not in ``steps`` keep the
    per-step keyed draw.
    """

    def __init__(self, clock: Callable[[torch.Tensor], torch.Tensor], steps: Mapping[int, tuple[float, float]], *,
                 draw: int = 0, path: int = 0):
        self.clock, self.steps, self.draw, self.path = clock, dict(steps), int(draw), int(path)

    def __repr__(self) -> str:
        return f"BrownianDraw(draw={self.draw}, path={self.path}, steps={len(self.steps)})"


def grid_draw(clock: Callable[[torch.Tensor], torch.Tensor], times: torch.Tensor, draw: int = 0) -> BrownianDraw:
    """The usual case: draw ``draw`` of every step k is the increment of path 0 over the grid step
    [times[k], times[k+1]] (one grid for the batch: column 0)."""
    column = times[:, 0].tolist()
    return BrownianDraw(clock, {k: (column[k], column[k + 1]) for k in range(len(column) - 1)}, draw=draw)


def identity_clock(t: torch.Tensor) -> torch.Tensor:
    """The SDE time itself: the clock of a step whose noise is g(t_k) sqrt(|dt|) z (Euler-Maruyama)."""
    return t


class Plan(list):
    """A per-step host-side list that :meth:`Solver.prepare` returns beside its coefficient tables (each
    step's order, Restart's segments): the driver keeps it on the host and hands it out with
    ``ctx.plan(name)``.  Everything else ``prepare`` returns is a coefficient table."""


class SolverBase:
    """What every solver declares, fixed-grid (:class:`Solver`) or adaptive
    (:class:`solvers.AdaptiveSolver`): ``isinstance(x, SolverBase)`` is the test for "a solver".

    The sampling driver and the kernels read these attributes and nothing else; a subclass overrides
    the ones that differ from the defaults.
    """

    #: the order of convergence the tests measure (a solver's ``order``, where it takes one, is the
    #: order of its formula, which the noise may cap: see ``convergence_mode``)
    convergence_order: int = 1
    #: "pathwise" (error on one noise path, or on the ODE) or "weak" (error in distribution)
    convergence_mode: str = "pathwise"
    #: network calls per step
    nfe_per_step: int = 1
    #: whether the step draws noise (``stochastic`` may depend on parameters such as eta)
    stochastic: bool = False
    #: whether the solver needs a Gaussian-marginal SDE (alpha, sigma, log-SNR)
    gaussian_only: bool = True
    #: whether the solver chooses its own steps (True exactly for :class:`solvers.AdaptiveSolver`)
    adaptive: bool = False
    #: the x0 hooks (:class:`X0Hooks`: thresholding, correct_x0) the driver also applies to the final
    #: denoised sample; None for a solver without them
    hooks: X0Hooks | None = None
    #: the methods a run calls: a subclass implements them
    run_methods: tuple[str, ...] = ()

    @property
    def score_weight(self) -> float | None:
        """The score term of the drift the steps follow, in units of the probability-flow ODE's: 1 + eta^2
        for the reverse-time process with diffusion eta g (1: the ODE, 2: the reverse SDE); None where the
        steps follow no member of that family (the adjoint gradient of :func:`samplers.sample_grad` needs it)."""
        return None if self.stochastic else 1.0

    def check_sde(self, sde) -> None:
        """Refuse an SDE this solver cannot integrate, with the reason."""
        if self.gaussian_only and not isinstance(sde, GaussianSDE):
            raise ValueError(
                f"{type(self).__name__} needs a Gaussian-marginal SDE (alpha(t), sigma(t), log-SNR); "
                f"{sde!r} is not one"
            )

    def steps_for_nfe(self, nfe: int, final_denoise: bool = True) -> int:
        """The most steps whose network calls (``nfe_per_step`` each, + 1 for the final denoise) fit in
        ``nfe``; 0 when not even one step fits.  Solvers with a fixed cost besides the steps (Restart)
        override it."""
        return max((int(nfe) - int(bool(final_denoise))) // max(int(self.nfe_per_step), 1), 0)

    def for_grid(self, *, ends_at_zero: bool) -> SolverBase:
        """The solver a run on a grid ending at t_min (``ends_at_zero`` False) or at sigma = 0 (True, the
        last step then being the data estimate) uses: a solver whose options default by where the run
        ends (the multistep solvers' ``lower_order_final=None``) returns a copy with them set.
        Default: itself."""
        return self

    def check_implemented(self) -> None:
        """Refuse a solver whose class leaves a method a run calls (:attr:`run_methods`) to a base class
        (``Solver()`` itself, or an incomplete subclass), before any work is done."""
        missing = [name for name in self.run_methods if getattr(getattr(type(self), name), "left_to_subclasses", False)]
        if not self.run_methods or missing:
            raise TypeError(self._unimplemented(missing or ["prepare", "step"]))

    def _unimplemented(self, missing: list[str]) -> str:
        run_methods = self.run_methods or ("prepare", "step")
        return (f"solver: {type(self).__name__} does not implement {', '.join(m + '()' for m in missing)}; pass a "
                f"solver from solvers (Euler(), DPMSolver(), ...) or a subclass that implements "
                f"{', '.join(run_methods)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Solver(SolverBase):
    """A fixed-grid solver: ``prepare`` turns a grid into tables once, ``step`` takes one step of it."""

    run_methods = ("prepare", "step")
    #: the solver's state besides x (Reversible's ("x_hat",)), read by :meth:`read_state`
    state_names: tuple[str, ...] = ()
    #: the noise draws of a step are ``ctx.noise(k, draw)`` with draw < ``draw_end``; a composite solver
    #: (predictor-corrector) draws its own from there on.  0: the solver leaves the choice to the default
    draw_end: int = 0

    def brownian_draws(self, model, times: torch.Tensor) -> list[BrownianDraw]:
        """The draws of a run on grid ``times`` (N+1, C) that are increments of the sample's Brownian path
        when the run asks for one (``noise="path"``): each stochastic solver declares its clock here.
        Default: none (every draw is the per-step keyed normal)."""
        return []

    def stage_times(self, model, times: torch.Tensor) -> dict[str, torch.Tensor]:
        """Times off the grid where ``step`` calls the network: name -> (N, C) float64 SDE times
        (row k for step k), for ``ctx.output(x, k, stage=name)``.  Most solvers need none."""
        return {}

    @_left_to_subclasses
    def prepare(self, model, times: torch.Tensor) -> dict[str, torch.Tensor | Plan]:
        """Coefficient tables for a grid ``times`` of shape (N+1, C), float64; each table (N, C).
        A :class:`Plan` value (one entry per step) is a plan, read with ``ctx.plan``."""
        raise NotImplementedError(self._unimplemented(["prepare"]))

    @_left_to_subclasses
    def step(self, k: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Advance x from grid time k to k+1 (in place where possible) and return it."""
        raise NotImplementedError(self._unimplemented(["step"]))

    def table_names(self) -> frozenset[str]:
        """The coefficient tables ``step`` (and the fused kernel) read with ``ctx.coef``: names ``prepare``
        must return as tensors, checked by :meth:`check_prepared` right after ``prepare``, so that a
        misspelt or missing name fails before any network call.  A table a step reads only where a plan
        written beside it says so (the conversion tables of :func:`solvers.multistep.history_tables`,
        chosen with its "history" plan) may be left out.  Default: none declared, nothing checked."""
        return frozenset()

    def plan_names(self) -> frozenset[str]:
        """The plans ``step`` reads with ``ctx.plan``: names ``prepare`` must return as a :class:`Plan`
        (see :meth:`table_names`).  Default: none declared."""
        return frozenset()

    def check_prepared(self, prepared: Mapping[str, object]) -> None:
        """Refuse what ``prepare`` returned when a declared table (:meth:`table_names`) or plan
        (:meth:`plan_names`) is missing or of the other kind, naming the solver, the names and the
        prepared ones.  The driver calls it on every fixed-grid run before the first step."""
        missing_tables = sorted(n for n in self.table_names() if n not in prepared or isinstance(prepared[n], Plan))
        missing_plans = sorted(n for n in self.plan_names() if not isinstance(prepared.get(n), Plan))
        if not missing_tables and not missing_plans:
            return
        tables = sorted(n for n, v in prepared.items() if not isinstance(v, Plan))
        plans = sorted(n for n, v in prepared.items() if isinstance(v, Plan))

        def described(names: list[str], kind: str, other_kind: str) -> str:
            parts = []
            for name in names:
                if name in prepared:
                    parts.append(f"{name!r} (prepare returned it as a {other_kind})")
                else:
                    close = difflib.get_close_matches(name, list(prepared), n=1)
                    parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            return f"the {kind} {', '.join(parts)}"

        wanted = [described(missing_tables, "coefficient tables", "solvers.Plan")] if missing_tables else []
        if missing_plans:
            wanted.append(described(missing_plans, "plans", "coefficient table, not a solvers.Plan"))
        raise ValueError(f"{self!r}: its steps read {' and '.join(wanted)}, missing from what prepare returned: "
                         f"the tables {tables} and the plans {plans}")

    def read_state(self, ctx: StepContext, dtype: torch.dtype | None = None) -> dict | None:
        """The state besides x after the last step (:attr:`state_names` -> tensors), or None for a solver
        that carries none (``SampleInfo.solver_state``)."""
        return None

    def fused_step(self):
        """The fused CUDA kernel of this configuration (a :class:`solvers.kernels.FusedStep`); raises
        :class:`solvers.kernels.KernelUnsupported` where there is none (the default)."""
        from .kernels import KernelUnsupported

        raise KernelUnsupported(f"{type(self).__name__} has no fused kernel")


class DynamicThresholding:
    """Dynamic thresholding of the x0 estimate (Saharia et al. 2022, Imagen).

    Per sample, s = the ``ratio`` quantile of |x0| over its elements, clamped to
    [1, ``max_value``]; x0 is clipped to [-s, s] and divided by s.  Meant for pixel-space
    models with data in [-1, 1] at high guidance scales; it changes the sampled distribution,
    so it is off unless asked for.
    """

    def __init__(self, ratio: float = 0.995, max_value: float = 1.0):
        self.ratio = check_in_range("ratio", ratio, 0.0, 1.0, "DynamicThresholding", closed="right",
                                    why=" (a quantile)")
        self.max_value = check_in_range("max_value", max_value, 1.0, math.inf, "DynamicThresholding",
                                        why=" (the threshold never shrinks below 1)")

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        # torch.quantile needs float32/float64
        work = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.abs().float()
        s = torch.quantile(work, self.ratio, dim=1).clamp_(1.0, self.max_value).to(x0.dtype)
        s = s.reshape((-1,) + (1,) * (x0.dim() - 1))
        return torch.maximum(torch.minimum(x0, s), -s).div_(s)

    def __repr__(self):
        return f"DynamicThresholding(ratio={self.ratio:g}, max_value={self.max_value:g})"


class X0Hooks:
    """The data-prediction hooks a solver applies to each x0 estimate before using it:
    dynamic thresholding, then a user ``correct_x0(x0, t) -> x0`` (t: the SDE times, shape (C,)
    with C = 1 or the batch size).  Built from a solver's ``thresholding``/``correct_x0`` arguments.
    """

    def __init__(self, thresholding=False, correct_x0=None):
        if thresholding is True:
            thresholding = DynamicThresholding()
        elif thresholding is False or thresholding is None:
            thresholding = None
        elif not isinstance(thresholding, DynamicThresholding):
            raise ValueError(
                f"thresholding must be True, False or a solvers.DynamicThresholding, got {thresholding!r}"
            )
        if correct_x0 is not None and not callable(correct_x0):
            raise ValueError(f"correct_x0 must be a callable (x0, t) -> x0, got {type(correct_x0).__name__}")
        self.thresholding = thresholding
        self.correct_x0 = correct_x0

    @property
    def active(self) -> bool:
        return self.thresholding is not None or self.correct_x0 is not None

    def time_table(self, times: torch.Tensor) -> dict[str, torch.Tensor]:
        """The table the hooks read a step's time from (the grid ``times`` without its last row);
        empty when ``correct_x0`` is unset."""
        return {"x0_hook_t": times[:-1]} if self.correct_x0 is not None else {}

    def table_names(self, name: str = "x0_hook_t") -> frozenset[str]:
        """The time table the hooks read under ``name`` (see :meth:`time_table`), for a solver's
        :meth:`Solver.table_names`; empty when ``correct_x0`` is unset."""
        return frozenset({name}) if self.correct_x0 is not None else frozenset()

    def stage_time_table(self, name: str, stage_times: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same for estimates taken at (N, C) stage times, under table ``name``."""
        return {name: stage_times} if self.correct_x0 is not None else {}

    def apply(self, x0: torch.Tensor, k: int, ctx, time_name: str = "x0_hook_t") -> torch.Tensor:
        """Apply the hooks to the x0 estimate of step k (taken at the times of table ``time_name``);
        x0 may be overwritten."""
        t = ctx.coef(time_name, k).reshape(-1) if self.correct_x0 is not None else None
        return self.apply_at(x0, t)

    def apply_at(self, x0: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Apply the hooks to an x0 estimate taken at SDE times t (shape (C,)); x0 may be overwritten."""
        if self.thresholding is not None:
            x0.copy_(self.thresholding(x0))
        if self.correct_x0 is not None:
            corrected = self.correct_x0(x0, t)
            if not isinstance(corrected, torch.Tensor) or corrected.shape != x0.shape:
                raise ValueError(
                    f"correct_x0 must return a tensor shaped like x0 {tuple(x0.shape)}, got "
                    f"{getattr(corrected, 'shape', type(corrected).__name__)}"
                )
            if corrected is not x0:
                x0.copy_(corrected)
        return x0

    def repr_args(self) -> str:
        """', thresholding=..., correct_x0=...' for a solver's repr ('' when inactive)."""
        out = ""
        if self.thresholding is not None:
            out += f", thresholding={self.thresholding!r}"
        if self.correct_x0 is not None:
            out += f", correct_x0={getattr(self.correct_x0, '__name__', type(self.correct_x0).__name__)}"
        return out
