"""Restart sampling (Xu et al., NeurIPS 2023): an ODE sampler that, at a few noise levels, jumps
forward with exact noise and integrates the ODE back again.

The main pass runs ``ode_solver`` on the driver's grid; each interval, snapped to the nearest grid
point, adds forward jumps (the SDE's exact transition, keyed noise) and backward ODE passes on a
Karras grid with a separate copy of the solver.  Intervals are noise levels sigma/alpha, so the
paper's configurations carry over to every Gaussian SDE; the grid is cut at every restart so that
multistep solvers restart their history.  ``Restart()`` scales the paper's restarts with the steps
because a fixed count was measured to cost too much at few steps.  Details: docs/solvers.md,
"Restart sampling" and "Restart: the details"; numbers: docs/measurements.md, "Restart".
"""

from __future__ import annotations

import copy
import itertools
from typing import NamedTuple

import torch

from sde.validation import check_count, check_positive

from .base import BrownianDraw, Plan, Solver, SolverBase
from .spacing import KARRAS_RHO, karras_roots

__all__ = ["Restart", "RestartInterval", "RESTART_PRESETS", "DEFAULT_INTERVALS", "DEFAULT_RESTARTS_PER_STEPS"]



class RestartInterval(NamedTuple):
    """One restart interval: noise levels (or times) t_min < t_max, ODE steps per backward pass,
    and the number of restarts."""

    t_min: float
    t_max: float
    n_steps: int
    n_restarts: int


#: the paper's configurations (Xu et al. 2023, benchmarks/params_*.txt), in noise levels sigma; each
#: entry: intervals as (t_min, t_max, n_steps = N_restart - 1, K), s_noise, and the main-pass settings
#: (steps = N_main - 1 on a Karras grid, plus the final denoise) with the NFE of the paper (Heun).
RESTART_PRESETS: dict[str, dict] = {
    # CIFAR-10 VP (EDM baseline VP model): N_main = 18, [N_restart=3, K, 0.06, 0.30]
    "cifar10_vp": dict(intervals=[(0.06, 0.30, 2, 2)], s_noise=1.0, steps=17, nfe=43),
    "cifar10_vp_nfe55": dict(intervals=[(0.06, 0.30, 2, 5)], s_noise=1.0, steps=17, nfe=55),
    "cifar10_vp_nfe75": dict(intervals=[(0.06, 0.30, 2, 10)], s_noise=1.0, steps=17, nfe=75),
    "cifar10_vp_nfe115": dict(intervals=[(0.06, 0.30, 2, 20)], s_noise=1.0, steps=17, nfe=115),
    # N_main = 20, [9, 30, 0.06, 0.20]
    "cifar10_vp_nfe519": dict(intervals=[(0.06, 0.20, 8, 30)], s_noise=1.0, steps=19, nfe=519),
    # CIFAR-10 EDM: N_main = 18, [3, 2, 0.14, 0.30]
    "cifar10_edm": dict(intervals=[(0.14, 0.30, 2, 2)], s_noise=1.0, steps=17, nfe=43),
    # ImageNet-64 EDM (class-conditional), S_noise = 1.003, N_main = 36: NFE 71 + 132 = 203, FID 1.41
    "imagenet64": dict(intervals=[(19.35, 40.79, 3, 1), (1.09, 1.92, 3, 1), (0.59, 1.09, 3, 5),
                                  (0.30, 0.59, 3, 5), (0.06, 0.30, 5, 6)], s_noise=1.003, steps=35, nfe=203),
}


#: ``Restart()``'s interval (t_min, t_max, n_steps) per SDE kind: the paper's CIFAR-10 EDM configuration
#: where alpha = 1 (VE, EDM), its VP configuration otherwise (noise levels sigma/alpha)
DEFAULT_INTERVALS: dict[str, tuple[float, float, int]] = {
    "alpha=1": RESTART_PRESETS["cifar10_edm"]["intervals"][0][:3],
    "alpha<1": RESTART_PRESETS["cifar10_vp"]["intervals"][0][:3],
}
#: ``Restart()`` restarts K = DEFAULT_RESTARTS_PER_STEPS[0] * steps // DEFAULT_RESTARTS_PER_STEPS[1]
#: times: the paper's 2 restarts per 17 main steps (N_main = 18)
DEFAULT_RESTARTS_PER_STEPS = (2, 17)
(_DEFAULT_N_STEPS,) = {iv[2] for iv in DEFAULT_INTERVALS.values()}  # one value: the default's cost is SDE-free


def _default_restarts(steps: int) -> int:
    per, every = DEFAULT_RESTARTS_PER_STEPS
    return per * steps // every


def _check_intervals(intervals, units: str) -> tuple[RestartInterval, ...]:
    try:
        items = list(intervals)
    except TypeError:
        raise ValueError(f"intervals must be a list of (t_min, t_max, n_steps, n_restarts), "
                         f"got {intervals!r}") from None
    if not items:
        raise ValueError("intervals must hold at least one (t_min, t_max, n_steps, n_restarts)")
    out = []
    for i, item in enumerate(items):
        try:
            t_min, t_max, n_steps, n_restarts = item
        except (TypeError, ValueError):
            raise ValueError(f"intervals[{i}] must be (t_min, t_max, n_steps, n_restarts), got {item!r}") from None
        for name, v in (("t_min", t_min), ("t_max", t_max)):
            check_positive(name, v, f"intervals[{i}]",
                           why=f" ({'a noise level sigma/alpha' if units == 'sigma' else 'an SDE time'})")
        if not t_min < t_max:
            raise ValueError(f"intervals[{i}]: expected t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")
        check_count("n_steps", n_steps, f"intervals[{i}]", why=" (ODE steps per backward pass)")
        check_count("n_restarts", n_restarts, f"intervals[{i}]", minimum=0)
        out.append(RestartInterval(float(t_min), float(t_max), int(n_steps), int(n_restarts)))
    out.sort(key=lambda iv: -iv.t_max)
    for hi, lo in itertools.pairwise(out):
        if lo.t_max > hi.t_min:
            raise ValueError(f"intervals overlap: ({lo.t_min:g}, {lo.t_max:g}) and ({hi.t_min:g}, {hi.t_max:g}) "
                             "(intervals may touch, not overlap)")
    return tuple(out)


class _Layout(NamedTuple):
    """How a run on a given grid is organised (host-side, computed from the grid only)."""

    intervals: tuple[RestartInterval, ...]  # the run's intervals (Restart()'s default depends on SDE and grid)
    boundaries: list[int]  # main-grid indices where the main pass is cut: [0, j_1, ..., N]
    snapped: list[int]  # per interval (in self.intervals order): its grid index j
    sub_grids: dict[int, torch.Tensor]  # per interval with restarts: its (n_steps + 1, C) times
    t_upper: dict[int, torch.Tensor]  # per interval with restarts: T = t(t_max), (C,)


class _PassContext:
    """The StepContext an ODE solver sees in one pass of Restart: its step indices are local to the pass;
    its tables and plans live under a prefix.  The main pass calls the network at the outer grid's times
    (``offset`` + local index) and stages; a restart pass at its own sub-grid's times ``pass_times``
    (``ctx.model_output``)."""

    __slots__ = ("ctx", "offset", "pass_times", "prefix", "stage_prefix")

    def __init__(self, ctx, prefix: str, offset: int = 0, pass_times: dict | None = None, stage_prefix: str = ""):
        self.ctx, self.prefix, self.offset = ctx, prefix, offset
        self.pass_times, self.stage_prefix = pass_times, stage_prefix

    @property
    def tables(self):
        return {name[len(self.prefix):]: tab for name, tab in self.ctx.tables.items() if name.startswith(self.prefix)}

    @property
    def plans(self):
        return {name[len(self.prefix):]: plan for name, plan in self.ctx.plans.items() if name.startswith(self.prefix)}

    @property
    def solver_state(self):
        return None  # a pass starts from the state it is handed, without a second state

    @property
    def nfe(self):
        return self.ctx.nfe

    def output(self, x, time_index, stage=None):
        if self.pass_times is None:  # main pass: grid point offset + m, stages of the cut grid
            if stage is None:
                return self.ctx.output(x, self.offset + time_index)
            return self.ctx.output(x, self.offset + time_index, stage=f"{self.stage_prefix}{stage}")
        # restart pass: its sub-grid point m (or row m of a stage table of the sub-grid)
        return self.ctx.model_output(x, self.pass_times["grid" if stage is None else stage][time_index])

    def model_output(self, x, t):
        return self.ctx.model_output(x, t)

    def noise(self, step, draw=0):
        raise RuntimeError("Restart's ODE solver drew noise: it must be deterministic")

    def coef(self, name, step):
        return self.ctx.coef(self.prefix + name, step)

    def plan(self, name):
        return self.ctx.plan(self.prefix + name)

    def scratch(self, name):
        # shared with the outer context: a pass never needs another pass's buffers (the main pass is cut
        # at every restart, so no history crosses a restart)
        return self.ctx.scratch(name)


class Restart(Solver):
    """Restart sampling: ``ode_solver`` on the grid, plus restarts (forward jump + backward ODE pass).

    Every argument is a keyword.  ``intervals``: a list of (t_min, t_max, n_steps, n_restarts), t_min <
    t_max noise levels sigma/alpha (the paper's convention; :meth:`in_time` takes SDE times, and needs
    them); n_steps >= 1 ODE steps per backward pass (the paper's N_restart - 1); n_restarts >= 0.
    Intervals may touch but not overlap.  ``None`` (default): the paper's configuration for the run's SDE,
    with restarts in proportion to the grid's steps (:meth:`intervals_for`, the module docstring); then
    :attr:`intervals` is ``None``.  ``s_noise`` > 0 multiplies the jump noise (EDM's S_noise: the paper
    uses 1, and 1.003 on ImageNet; it is not an ``eta``: the jump is an exact forward transition and
    the backward passes are ODE passes whatever it is).  ``ode_solver``: any deterministic fixed-grid
    solver (default :class:`Heun`).

    Cost: :meth:`nfe` (``steps`` main steps at the ODE solver's ``nfe_per_step``, the final denoise,
    and the restarts' :meth:`restart_nfe`); :meth:`steps_for_nfe` inverts it.  The paper's
    configurations: :meth:`preset` and :data:`RESTART_PRESETS` (:meth:`preset_kwargs` gives the main
    pass's steps and grid kind).  See the module docstring for the jump, the snapping and the cuts.
    """

    gaussian_only = True

    def __init__(self, *, ode_solver: Solver | None = None, intervals=None, s_noise: float = 1.0):
        self._setup(ode_solver, intervals, s_noise, "sigma")

    @classmethod
    def in_time(cls, intervals, *, ode_solver: Solver | None = None, s_noise: float = 1.0) -> Restart:
        """Restart with ``intervals`` (t_min, t_max, n_steps, n_restarts) whose t_min, t_max are SDE times
        t, not noise levels (``units == "time"``); the other arguments as for :class:`Restart`."""
        solver = cls.__new__(cls)
        solver._setup(ode_solver, intervals, s_noise, "time")
        return solver

    def _setup(self, ode_solver, intervals, s_noise, units: str) -> None:
        if ode_solver is None:
            from .euler import Heun

            ode_solver = Heun()
        if isinstance(ode_solver, SolverBase) and not isinstance(ode_solver, Solver):
            raise ValueError(f"ode_solver must be a fixed-grid ODE solver; {ode_solver!r} is adaptive "
                             "(it chooses its own steps)")
        if not isinstance(ode_solver, Solver):
            raise TypeError(f"ode_solver must be a solvers.Solver instance, got {type(ode_solver).__name__}")
        if isinstance(ode_solver, Restart):
            raise ValueError("ode_solver must be an ODE solver, not another Restart")
        if ode_solver.score_weight != 1.0:
            why = "is stochastic" if ode_solver.stochastic else "does not follow the probability-flow ODE"
            raise ValueError(f"ode_solver must be a deterministic ODE solver (e.g. Heun(), Euler(), DPMSolver(), "
                             f"UniPC()); {ode_solver!r} {why}")
        self.s_noise = check_positive("s_noise", s_noise, "Restart")
        self.ode_solver = ode_solver
        #: a separate instance for the backward passes (no state of the main pass reaches them)
        self.restart_solver = copy.copy(ode_solver)
        # the passes the last prepare laid out (main-pass segments, intervals with restarts): the prefixes
        # of the parts' tables, for table_names/plan_names
        self._passes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        #: "sigma": the intervals are noise levels sigma/alpha; "time": SDE times (:meth:`in_time`)
        self.units = units
        if intervals is None and units != "sigma":
            raise ValueError("Restart.in_time needs intervals (SDE times): Restart()'s default intervals are "
                             "noise levels sigma/alpha")
        #: the intervals given, or None: the default, chosen per run by :meth:`intervals_for`
        self.intervals = None if intervals is None else _check_intervals(intervals, units)
        #: the main pass's steps recommended for this configuration (set by :meth:`preset`)
        self.recommended_steps: int | None = None
        self.nfe_per_step = int(ode_solver.nfe_per_step)
        # the default restarts on grids of DEFAULT_RESTARTS_PER_STEPS[1] // 2 + 1 steps or more
        self.stochastic = self.intervals is None or any(iv.n_restarts > 0 for iv in self.intervals)
        # without restarts: the ODE solver's order.  With restarts, none in the main steps: each backward
        # pass has its own fixed number of steps, whose error stays however fine the main grid
        # (tests/test_orders.py measures slopes 0.3-0.8 that flatten out)
        self.convergence_order = 0 if self.stochastic else ode_solver.convergence_order
        self.convergence_mode = "weak" if self.stochastic else "pathwise"
        # the final denoise applies the ODE solver's x0 hooks (thresholding, correct_x0) too
        self.hooks = ode_solver.hooks

    # -- presets and cost --------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, ode_solver: Solver | None = None) -> Restart:
        """The paper's configuration ``name`` (see :data:`RESTART_PRESETS`); its main step count is
        ``.recommended_steps`` (and :meth:`preset_kwargs`)."""
        if name not in RESTART_PRESETS:
            raise ValueError(f"unknown Restart preset {name!r}; known: {sorted(RESTART_PRESETS)}")
        cfg = RESTART_PRESETS[name]
        solver = cls(ode_solver=ode_solver, intervals=cfg["intervals"], s_noise=cfg["s_noise"])
        solver.recommended_steps = cfg["steps"]
        return solver

    @staticmethod
    def preset_kwargs(name: str) -> dict:
        """The ``samplers.sample`` settings of preset ``name``'s main pass: {"steps", "grid_kind"}."""
        if name not in RESTART_PRESETS:
            raise ValueError(f"unknown Restart preset {name!r}; known: {sorted(RESTART_PRESETS)}")
        return {"steps": RESTART_PRESETS[name]["steps"], "grid_kind": "karras"}

    def intervals_for(self, sde, steps: int) -> tuple[RestartInterval, ...]:
        """The intervals of a run of ``steps`` main steps on ``sde``: those given, or the default: the
        paper's CIFAR-10 EDM interval where alpha = 1 (VE, EDM), its VP interval otherwise
        (:data:`DEFAULT_INTERVALS`), restarted 2 steps // 17 times (:data:`DEFAULT_RESTARTS_PER_STEPS`)."""
        if self.intervals is not None:
            return self.intervals
        check_count("steps", steps)
        ends = torch.tensor([sde.t_min, sde.t_max], dtype=torch.float64)
        kind = "alpha=1" if bool((sde.alpha(ends) == 1).all()) else "alpha<1"
        return (RestartInterval(*DEFAULT_INTERVALS[kind], _default_restarts(steps)),)

    def restart_nfe(self, steps: int) -> int:
        """Network calls of all restarts of a run with ``steps`` main steps: sum_k n_restarts_k
        n_steps_k nfe_per_step (independent of ``steps`` when intervals were given; the default's
        counts are the same for every SDE)."""
        if self.intervals is None:
            check_count("steps", steps)
            return _default_restarts(steps) * _DEFAULT_N_STEPS * self.nfe_per_step
        return sum(iv.n_restarts * iv.n_steps for iv in self.intervals) * self.nfe_per_step

    def nfe(self, steps: int, final_denoise: bool = True) -> int:
        """Network calls of a run with ``steps`` main steps (``info.nfe``): steps nfe_per_step
        + final_denoise + :meth:`restart_nfe`.  (A singlestep DPM-Solver step that starts at alpha = 0,
        rectified flow at t = 1, costs one call instead of its order, as without restarts.)"""
        check_count("steps", steps)
        return steps * self.nfe_per_step + int(bool(final_denoise)) + self.restart_nfe(steps)

    def steps_for_nfe(self, nfe: int, final_denoise: bool = True) -> int:
        """The most main steps whose run fits in ``nfe`` network calls (0 if none does)."""
        # nfe(steps) grows strictly with steps: bisect on [0, the steps that fit without restarts]
        lo, hi = 0, max((int(nfe) - int(bool(final_denoise))) // self.nfe_per_step, 0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.nfe(mid, final_denoise) <= nfe:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # -- layout ------------------------------------------------------------------------------------

    def check_sde(self, sde) -> None:
        super().check_sde(sde)
        self.ode_solver.check_sde(sde)

    def _level(self, sde, t: torch.Tensor) -> torch.Tensor:
        """The variable intervals are given in, at SDE times t."""
        return torch.exp(-sde.log_snr(t)) if self.units == "sigma" else t

    def _time(self, sde, level: float) -> float:
        if self.units == "time":
            return level
        return float(sde.t_from_log_snr(-torch.log(torch.tensor(level, dtype=torch.float64))))

    def _layout(self, model, times: torch.Tensor) -> _Layout:
        sde = model.sde
        n = times.shape[0] - 1
        intervals = self.intervals_for(sde, n)
        ends = torch.tensor([sde.t_min, sde.t_max], dtype=torch.float64)
        lo, hi = (float(v) for v in self._level(sde, ends))
        levels = self._level(sde, times)  # (N+1, C)
        snapped, sub_grids, t_upper = [], {}, {}
        cuts = {0, n}
        for i, iv in enumerate(intervals):
            name = f"intervals ({iv.t_min:g}, {iv.t_max:g}, {iv.n_steps}, {iv.n_restarts})"
            if self.intervals is None:
                name += " (Restart()'s default for this SDE and grid; pass intervals= to choose others)"
            # 1e-12 relative slack: sigma(t_max) of the SDE given as a rounded number
            if iv.t_min < lo * (1 - 1e-12) or iv.t_max > hi * (1 + 1e-12):
                unit = "noise levels sigma/alpha" if self.units == "sigma" else "times"
                raise ValueError(f"{name}: t_min and t_max must lie in the SDE's range of {unit} "
                                 f"[{lo:g}, {hi:g}] ({sde!r})")
            dist = (levels - iv.t_min).abs()  # (N+1, C)
            js = torch.argmin(dist, dim=0)  # first minimum: the noisier of two equidistant points
            j = int(js[0])
            if not bool((js == j).all()):
                raise ValueError(f"{name}: t_min snaps to different grid indices in different columns of the "
                                 "per-sample grid; a restart needs one index for the whole batch")
            if j == 0:
                raise ValueError(f"{name}: t_min={iv.t_min:g} snaps to the grid's first point "
                                 f"({float(levels[0, 0]):g}); a restart follows a main step: lower t_min or "
                                 "use more steps")
            snapped.append(j)
            if iv.n_restarts == 0:
                continue
            lvl_j = levels[j]
            if not bool((lvl_j < iv.t_max).all()):
                raise ValueError(f"{name}: t_min snaps to grid index {j} at {float(lvl_j.max()):g}, not below "
                                 f"t_max={iv.t_max:g}: use more steps or widen the interval")
            t_top = min(self._time(sde, iv.t_max), sde.t_max)
            t_j = times[j]
            # Karras spacing (rho = 7) in the noise level sigma/alpha from t_max down to the snapped point
            s_top = float(torch.exp(-sde.log_snr(torch.tensor(t_top, dtype=torch.float64))))
            s_j = torch.exp(-sde.log_snr(t_j))  # (C,)
            u = torch.linspace(0.0, 1.0, iv.n_steps + 1, dtype=torch.float64)[:, None]
            s = karras_roots(s_top, s_j, u, KARRAS_RHO) ** KARRAS_RHO
            sub = sde.t_from_log_snr(-torch.log(s))
            sub[0] = t_top
            sub[-1] = t_j
            if not bool((sub[1:] < sub[:-1]).all()):
                raise ValueError(f"{name}: the restart grid from t_max to grid index {j} is not strictly "
                                 f"decreasing in time; widen the interval or use fewer n_steps")
            sub_grids[i] = sub
            t_upper[i] = torch.full_like(t_j, t_top)
            cuts.add(j)
        return _Layout(intervals, sorted(cuts), snapped, sub_grids, t_upper)

    def snapped_indices(self, model, times: torch.Tensor) -> list[int]:
        """The main-grid index j each interval (in :meth:`intervals_for` order) restarts from, for a grid
        ``times`` of shape (N+1,) or (N+1, C)."""
        times = torch.as_tensor(times, dtype=torch.float64)
        return self._layout(model, times if times.dim() == 2 else times[:, None]).snapped

    def restart_grid(self, model, times: torch.Tensor, interval: int) -> torch.Tensor:
        """The (n_steps + 1, C) SDE times of the backward passes of interval ``interval`` (of
        :meth:`intervals_for`)."""
        times = torch.as_tensor(times, dtype=torch.float64)
        layout = self._layout(model, times if times.dim() == 2 else times[:, None])
        if interval not in layout.sub_grids:
            raise ValueError(f"intervals[{interval}] has no restarts")
        return layout.sub_grids[interval]

    # -- the solver contract -------------------------------------------------------------------------

    def _segments(self, layout: _Layout):
        b = layout.boundaries
        return [(s, b[s], b[s + 1]) for s in range(len(b) - 1) if b[s + 1] > b[s]]

    def stage_times(self, model, times: torch.Tensor) -> dict[str, torch.Tensor]:
        layout = self._layout(model, times)
        stages: dict[str, torch.Tensor] = {}
        # the main pass's own stages (singlestep DPM-Solver), one table over the whole grid
        pieces: dict[str, list[torch.Tensor]] = {}
        for _, a, b in self._segments(layout):
            for name, tab in self.ode_solver.stage_times(model, times[a:b + 1]).items():
                pieces.setdefault(name, []).append(torch.as_tensor(tab, dtype=torch.float64))
        for name, parts in pieces.items():
            stages[f"main/{name}"] = torch.cat(parts, dim=0)
        return stages

    def prepare(self, model, times: torch.Tensor) -> dict[str, torch.Tensor | Plan]:
        layout = self._layout(model, times)
        sde = model.sde
        n = times.shape[0] - 1
        tables: dict[str, torch.Tensor | Plan] = {}
        segment_of: list[tuple[int, int]] = [(0, 0)] * n
        for s, a, b in self._segments(layout):
            for name, tab in self.ode_solver.prepare(model, times[a:b + 1]).items():
                tables[f"main{s}/{name}"] = tab
            for k in range(a, b):
                segment_of[k] = (s, a)
        after: list[tuple[int, ...]] = [()] * n
        for i, sub in layout.sub_grids.items():
            j = layout.snapped[i]
            after[j - 1] = after[j - 1] + (i,)
            for name, tab in self.restart_solver.prepare(model, sub).items():
                tables[f"restart{i}/{name}"] = tab
            # the times a backward pass calls the network at (ctx.model_output): the sub-grid's points and
            # its solver's stages, one (C,) row each
            stage_rows = {name: list(torch.as_tensor(tab, dtype=torch.float64))
                          for name, tab in self.restart_solver.stage_times(model, sub).items()}
            tables[f"restart{i}/times"] = Plan([{"grid": list(sub), **stage_rows}])
            # exact forward transition t_j -> T: x <- (alpha_T/alpha_j) x + alpha_T sqrt(s_T^2 - s_j^2) z
            t_top, t_j = layout.t_upper[i], times[j]
            a_top, a_j = sde.alpha(t_top), sde.alpha(t_j)
            s_top, s_j = sde.sigma(t_top) / a_top, sde.sigma(t_j) / a_j
            tables[f"restart{i}/jump_x"] = (a_top / a_j)[None]
            tables[f"restart{i}/jump_noise"] = (self.s_noise * a_top * torch.sqrt(s_top * s_top - s_j * s_j))[None]
        self._passes = (tuple(s for s, _, _ in self._segments(layout)), tuple(layout.sub_grids))
        tables["restart/segment"] = Plan(segment_of)
        tables["restart/after"] = Plan(after)
        tables["restart/intervals"] = Plan(layout.intervals)
        return tables

    def brownian_draws(self, model, times):
        """Each forward jump alpha_T sqrt(s_T^2 - s_j^2) z (s = sigma/alpha) is an increment in the clock s^2 over
        [t_j, t_top], on a path of its own for each restart interval and repetition (paths 1, 2, ...: a
        repetition's jump is independent of the others), so a finer main grid, which moves t_j a little,
        moves each jump's noise a little.  The ODE passes draw nothing."""
        layout = self._layout(model, times)
        sde = model.sde

        def clock(t):
            return torch.exp(-2.0 * sde.log_snr(t))

        draws, path = [], 0
        for i in layout.sub_grids:
            j = layout.snapped[i]
            ends = (float(times[j, 0]), float(torch.as_tensor(layout.t_upper[i]).reshape(-1)[0]))
            for _ in range(layout.intervals[i].n_restarts):
                path += 1
                draws.append((j - 1, i, path, ends))
        out, draw_in_step = [], {}
        for k, _, path, ends in draws:  # draws of one step are numbered 1, 2, ... in order (see step)
            draw_in_step[k] = draw_in_step.get(k, 0) + 1
            out.append(BrownianDraw(clock, {k: ends}, draw=draw_in_step[k], path=path))
        return out

    def table_names(self):
        """The parts' tables under the prefixes of the passes the last ``prepare`` laid out (the default
        intervals depend on the SDE and the grid), and each restart's jump."""
        segments, restarted = self._passes
        names = {f"main{s}/{name}" for s in segments for name in self.ode_solver.table_names()}
        for i in restarted:
            names |= {f"restart{i}/{name}" for name in self.restart_solver.table_names()}
            names |= {f"restart{i}/jump_x", f"restart{i}/jump_noise"}
        return frozenset(names)

    def plan_names(self):
        segments, restarted = self._passes
        names = {"restart/segment", "restart/after"} | ({"restart/intervals"} if restarted else set())
        names |= {f"main{s}/{name}" for s in segments for name in self.ode_solver.plan_names()}
        for i in restarted:
            names |= {f"restart{i}/{name}" for name in self.restart_solver.plan_names()}
            names.add(f"restart{i}/times")
        return frozenset(names)

    def step(self, k, x, ctx):
        s, a = ctx.plan("restart/segment")[k]
        x = self.ode_solver.step(k - a, x, _PassContext(ctx, f"main{s}/", offset=a, stage_prefix="main/"))
        restarts = ctx.plan("restart/after")[k]
        if restarts:
            draw = 0
            for i in restarts:
                prefix = f"restart{i}/"
                inner_ctx = _PassContext(ctx, prefix, pass_times=ctx.plan(prefix + "times")[0])
                iv = ctx.plan("restart/intervals")[i]
                jump_x, jump_noise = ctx.coef(prefix + "jump_x", 0), ctx.coef(prefix + "jump_noise", 0)
                for _ in range(iv.n_restarts):
                    draw += 1
                    x.mul_(jump_x).addcmul_(jump_noise, ctx.noise(k, draw))
                    for m in range(iv.n_steps):
                        x = self.restart_solver.step(m, x, inner_ctx)
        return x

    def __repr__(self):
        if self.intervals is None:  # the default: as constructed
            return f"Restart(ode_solver={self.ode_solver!r}, s_noise={self.s_noise:g})"
        ivs = ", ".join(f"({iv.t_min:g}, {iv.t_max:g}, {iv.n_steps}, {iv.n_restarts})" for iv in self.intervals)
        if self.units == "time":
            return f"Restart.in_time([{ivs}], ode_solver={self.ode_solver!r}, s_noise={self.s_noise:g})"
        return f"Restart(ode_solver={self.ode_solver!r}, intervals=[{ivs}], s_noise={self.s_noise:g})"
