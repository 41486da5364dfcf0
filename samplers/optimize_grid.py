"""A time grid fitted to the user's own network: :func:`optimize_grid`, and grid files (:func:`save_grid`,
:func:`load_grid`).

The objective is the distance (root mean square over the calibration batch and its elements, in float64)
between the ``nfe``-call solution from calibration noise x_T and a tight reference solution from the same
x_T: DPM-Solver(3) on 500 log-SNR-uniform steps by default, within 1e-6 of its 1000-step solution on the
exact test problems.  No data is used, only network calls.

The method (chosen by measurement, docs/choosing-a-solver.md "Optimised grids"):

1. ``"dp"``: a GITS-style dynamic programme (Chen et al. 2024).  The reference run records its states
   and x0 estimates on a fine candidate grid; the cost of a step between two candidates is the RMS
   local error of one first-order data-prediction step (DDIM) from the reference state, against the
   reference state at the step's end; the path of ``steps`` steps of least total cost is the grid.  No
   network calls besides the reference run's.
2. ``"descent"``: coordinate descent on the true objective.  Each interior time is moved by a step in
   the logit of its relative position between its neighbours (so it stays strictly inside them, and
   moves act on the local scale of the grid), both ways; a move is kept when the objective falls; the
   move halves when no coordinate improves.  Each evaluation is one ``nfe``-call run on the
   calibration batch.
3. ``"dp+descent"`` (default): the objective has local minima, so descent starts from several grids: the
   start, the DP grid and the library's grid kinds between the same ends are evaluated; the best three
   get a short descent each (half the evaluations left, shared), and the best of those gets the rest.

Whatever the method, the grid returned is the best one evaluated, and the start grid is always
evaluated: the result is never worse than the start on the objective.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sde import GaussianSDE
from sde.validation import check_choice, check_count, check_flag
from solvers import Solver, SolverBase

from .driver import NonFiniteError, StepInfo
from .grid import GRID_KINDS, ends_at_zero, validate_grid
from .grid import grid as make_grid
from .limits import MAX_STEPS
from .model import Model
from .sample import sample

__all__ = ["optimize_grid", "OptimizedGrid", "GRID_METHODS", "save_grid", "load_grid", "grid_metadata",
           "grid_distance", "GRID_FILE_FORMAT"]

#: the methods of :func:`optimize_grid`
GRID_METHODS = ("dp+descent", "descent", "dp")
#: the ``format`` entry of a grid file, and its version
GRID_FILE_FORMAT = "samplers.grid"
_GRID_FILE_VERSION = 1

_F64 = torch.float64
#: the first move of a coordinate, in the logit of its relative position between its neighbours
_FIRST_MOVE = 0.5
#: the farthest a move goes: a relative position of 0.018 from a neighbour.  Nearer, a multistep solver's
#: derivative estimate becomes a finite difference over a tiny step that float32 rounding destroys: with
#: 30 (1e-13), UniPC at 8 calls on the 2-D EDM mixture was fitted a time 6.5e-12 below t_max, the best grid in
#: float64 and a blow-up to |x| = 2e4 in float32
_MAX_LOGIT = 4.0
#: how many of the best start grids "dp+descent" descends from, each with an equal share of the evaluations
_RESTARTS = 3
#: descent stops when the move is below this (a relative position of 0.5 then changes by 0.25%)
_LAST_MOVE = 0.01


def grid_distance(x: torch.Tensor, reference: torch.Tensor) -> float:
    """The objective: sqrt(mean((x - reference)^2)) over every sample and element, in float64."""
    diff = x.detach().to(_F64) - reference.detach().to(device=x.device, dtype=_F64)
    return float(diff.square().mean().sqrt())


@dataclass
class OptimizedGrid:
    """What :func:`optimize_grid` found: pass ``times`` to ``sample(grid=...)``, ``save(path)`` to keep it."""

    times: torch.Tensor  #: the optimised grid, float64 (N+1,), same ends as the start
    start: torch.Tensor  #: the start grid, float64 (N+1,)
    objective: float  #: the distance to the reference of the returned grid, on the calibration batch
    objective_start: float  #: the same for the start grid (objective <= objective_start)
    nfe: int  #: network calls of a run on the grid (steps * calls per step + the final denoise)
    steps: int
    final_denoise: bool
    solver: str  #: repr of the solver
    sde: str  #: repr of the model's SDE
    model: str  #: repr of the model
    seed: object  #: the calibration seed (None when x_T was given)
    batch_size: int  #: calibration samples
    reference: str  #: how the reference was computed
    method: str
    evaluations: int  #: nfe-call runs on the calibration batch (the start's included)
    network_calls: int  #: network calls in all, the reference run's included
    seconds: float  #: wall time of the whole optimisation
    cpu_seconds: float  #: CPU time of this process during it (all its threads)
    #: (evaluation number, best objective so far), one entry per improvement, for plots
    history: list[tuple[int, float]] = field(default_factory=list)

    def metadata(self) -> dict:
        """Everything but the grids, as JSON-ready values."""
        out = {k: v for k, v in asdict(self).items() if k not in ("times", "start")}
        out["start"] = [float(t) for t in self.start]
        out["seed"] = self.seed if self.seed is None or isinstance(self.seed, int) else repr(self.seed)
        out["history"] = [[int(i), float(f)] for i, f in self.history]
        return out

    def save(self, path) -> Path:
        """Write the grid and :meth:`metadata` to a JSON file (see :func:`save_grid`)."""
        return save_grid(path, self.times, **self.metadata())


def _check_nfe_and_steps(solver: Solver, nfe, final_denoise: bool) -> tuple[int, int]:
    nfe = check_count("nfe", nfe, why=" (network calls of a run on the grid)")
    steps = solver.steps_for_nfe(nfe, final_denoise)
    if steps < 1:
        raise ValueError(f"nfe={nfe} leaves no step for {solver!r} ({solver.nfe_per_step} network call(s) a step"
                         f"{', plus 1 for the final denoise' if final_denoise else ''}): pass a larger nfe")
    return nfe, steps


def _check_solver(solver) -> Solver:
    if not isinstance(solver, SolverBase):
        raise TypeError(f"solver must be a solvers.Solver instance (a fixed-grid solver such as DPMSolver(2)), got "
                        f"{type(solver).__name__}")
    if not isinstance(solver, Solver):
        raise ValueError(f"optimize_grid needs a fixed-grid solver; {solver!r} chooses its own steps")
    if solver.stochastic:
        raise ValueError(f"optimize_grid needs a deterministic solver (its objective is the distance to the "
                         f"reference solution from the same x_T); {solver!r} draws noise: use its eta=0 / ODE form")
    return solver


def _check_start(sde, start, steps: int, nfe: int, solver: Solver, final_denoise: bool) -> torch.Tensor:
    if start is None:
        return make_grid(sde, steps)
    times = validate_grid(sde, start).detach().to("cpu", _F64).clone()
    if times.dim() != 1:
        raise ValueError(f"start must be one grid shared by the batch, shape (N+1,), got shape {tuple(times.shape)}")
    if times.shape[0] - 1 != steps:
        raise ValueError(
            f"start has {times.shape[0] - 1} steps, but nfe={nfe} gives {steps} steps of {solver!r} "
            f"({solver.nfe_per_step} call(s) a step{', plus the final denoise' if final_denoise else ''}): pass a "
            f"start grid of {steps} steps or the nfe it costs")
    return times


def _start_ends_at_zero(sde, start) -> bool:
    times = torch.as_tensor(start)
    return times.dim() == 1 and times.shape[0] >= 2 and ends_at_zero(sde, times.detach().to("cpu", _F64)[:, None])


def _reference_grid(sde, reference_steps: int, t_first: float, t_last: float,
                    to_zero: bool) -> tuple[torch.Tensor, str]:
    """The reference run's grid: uniform in log-SNR where it is finite at both ends, else uniform in t; a
    grid ending at sigma = 0 is log-SNR-uniform down to sde.t_min, then steps to sigma = 0."""
    kind = "uniform"
    if isinstance(sde, GaussianSDE):
        lam = sde.log_snr(torch.tensor([t_first, sde.t_min if to_zero else t_last], dtype=_F64))
        if bool(torch.isfinite(lam).all()):
            kind = "log_snr"
    if to_zero:
        return make_grid(sde, reference_steps, kind, t_max=t_first, to_zero=True), kind + " (to sigma = 0)"
    return make_grid(sde, reference_steps, kind, t_max=t_first, t_min=t_last), kind


def _dp_grid(sde, cand_times: torch.Tensor, states: list[torch.Tensor], denoised: list[torch.Tensor],
             steps: int) -> torch.Tensor:
    """GITS: the path of ``steps`` steps over the candidates of least summed RMS local error of a
    first-order data-prediction step taken from the reference states."""
    m = cand_times.shape[0]
    alpha, sigma = sde.alpha(cand_times).to(_F64), sde.sigma(cand_times).to(_F64)
    cost = torch.full((m, m), math.inf, dtype=_F64)
    target = torch.stack([s.reshape(s.shape[0], -1) for s in states])  # (M, B, D)
    for i in range(m - 1):
        x_i = target[i]
        d_i = denoised[i].reshape(x_i.shape)
        ratio = sigma[i + 1:] / sigma[i]  # the DDIM step x_j = (s_j/s_i) x_i + (a_j - a_i s_j/s_i) D_i
        coef_d = alpha[i + 1:] - alpha[i] * ratio
        pred = ratio[:, None, None] * x_i[None] + coef_d[:, None, None] * d_i[None]
        cost[i, i + 1:] = (pred - target[i + 1:]).square().mean(dim=(1, 2)).sqrt()
    # best[n][j]: least cost of n steps from candidate 0 to candidate j
    best = torch.full((steps + 1, m), math.inf, dtype=_F64)
    came = torch.zeros((steps + 1, m), dtype=torch.long)
    best[0, 0] = 0.0
    for n in range(1, steps + 1):
        total = best[n - 1][:, None] + cost  # (from i, to j)
        best[n], came[n] = total.min(dim=0)
    path = [m - 1]
    for n in range(steps, 0, -1):
        path.append(int(came[n, path[-1]]))
    if path[-1] != 0 or not math.isfinite(float(best[steps, m - 1])):
        raise RuntimeError("optimize_grid: the dynamic programme found no path (too few candidates for the steps)")
    return cand_times[torch.tensor(path[::-1])]


def _moved(times: torch.Tensor, k: int, move: float, lowest: float) -> torch.Tensor | None:
    """``times`` with interior time k moved by ``move`` in the logit of its position between its neighbours
    (None when that position rounds onto a neighbour).  No interior time goes below ``lowest`` (sde.t_min: a
    grid ending at sigma = 0 has its last network call there or above)."""
    upper, lower = float(times[k - 1]), max(float(times[k + 1]), lowest)
    # a time may sit within rounding of a neighbour after doubled moves: the logit stays finite
    position = min(max((float(times[k]) - lower) / (upper - lower), 1e-15), 1.0 - 1e-15)
    logit = min(max(math.log(position / (1.0 - position)) + move, -_MAX_LOGIT), _MAX_LOGIT)
    new_position = 1.0 / (1.0 + math.exp(-logit))
    new_t = lower + new_position * (upper - lower)
    if not lower < new_t < upper:
        return None
    out = times.clone()
    out[k] = new_t
    return out


def optimize_grid(model: Model, solver: Solver, nfe: int, *, shape=None, x_T: torch.Tensor | None = None,
                  cond: dict | None = None, seed=0, start=None, final_denoise: bool | None = None,
                  method: str = "dp+descent", max_evals: int = 200, reference_solver: Solver | None = None,
                  reference_steps: int = 500, candidates: int = 100, dtype: torch.dtype | None = None, device=None,
                  progress: bool | None = None) -> OptimizedGrid:
    """A time grid for ``solver`` at ``nfe`` network calls, fitted to ``model`` on calibration noise.

    Minimises the RMS distance (float64) between the run on the grid and a tight reference solution
    from the same calibration x_T (:func:`grid_distance`); see the module's docstring for the method.

    Parameters
    ----------
    model, solver:
        a :class:`Model` and a deterministic fixed-grid solver (a stochastic or adaptive one is refused).
    nfe:
        network calls of a run on the grid: the grid has ``solver.steps_for_nfe(nfe, final_denoise)`` steps.
    shape or x_T:
        the calibration batch: its shape (B, ...), drawn from the prior keyed by ``seed`` as ``sample``
        draws it, or the starting states themselves.  A few hundred samples are plenty.
    cond:
        the network's keyword arguments (class labels ...), as in ``sample``.
    start:
        the start grid, (N+1,) strictly decreasing (default: ``samplers.grid(sde, steps)``).  Its first and
        last times are kept; the interior times are optimised (within [sde.t_min, sde.t_max]).  A start that
        ends at sigma = 0 (``samplers.grid(..., to_zero=True)``) has ``nfe`` steps for a one-call solver, and
        its reference run steps to sigma = 0 from sde.t_min.
    final_denoise:
        as in ``sample`` (None: on for a Gaussian-marginal SDE); use the same value when sampling.
    method:
        one of :data:`GRID_METHODS`: ``"dp+descent"`` (default), ``"descent"``, ``"dp"``.
    max_evals:
        most runs on the calibration batch (the start's included); descent also stops when its move
        falls below 0.01 in the logit of a time's relative position.
    reference_solver, reference_steps:
        the reference run: default DPMSolver(3) (the solver itself off Gaussian SDEs) on ``reference_steps``
        steps uniform in log-SNR between the start grid's ends (uniform in t where the log-SNR is not finite).
    candidates:
        the dynamic programme's candidate times: that many of the reference grid's, evenly picked.
    dtype, device:
        as in ``sample``; float64 states (``dtype=torch.float64`` or a float64 x_T) make the objective exact
        to rounding where the network accepts them.
    progress:
        a progress bar over the evaluations (default: on a terminal).

    Returns an :class:`OptimizedGrid`.
    """
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a samplers.Model, got {type(model).__name__}")
    solver = _check_solver(solver)
    sde = model.sde
    final_denoise = check_flag("final_denoise", final_denoise, allow_none=True)
    to_zero = start is not None and _start_ends_at_zero(sde, start)
    if to_zero and final_denoise:
        raise ValueError("final_denoise=True: the start grid ends at sigma = 0, so its last step is the denoising "
                         "step; pass final_denoise=None or False")
    resolved_denoise = (isinstance(sde, GaussianSDE) and not to_zero) if final_denoise is None else final_denoise
    nfe, steps = _check_nfe_and_steps(solver, nfe, resolved_denoise)
    check_choice("method", method, GRID_METHODS)
    max_evals = check_count("max_evals", max_evals, why=" (runs on the calibration batch, the start's included)")
    reference_steps = check_count("reference_steps", reference_steps, minimum=2, maximum=MAX_STEPS)
    candidates = check_count("candidates", candidates, minimum=2)
    progress = check_flag("progress", progress, allow_none=True)
    if reference_solver is None:
        from solvers import DPMSolver

        reference_solver = DPMSolver(3) if isinstance(sde, GaussianSDE) else solver
    reference_solver = _check_solver(reference_solver)
    if method != "descent" and not isinstance(sde, GaussianSDE):
        raise ValueError(f"method={method!r} needs a Gaussian-marginal SDE (its candidate steps use alpha and "
                         f"sigma); {sde!r} is not one: use method='descent'")
    times = _check_start(sde, start, steps, nfe, solver, resolved_denoise)
    t_first, t_last = float(times[0]), float(times[-1])

    run_kwargs = dict(shape=shape, x_T=x_T, seed=seed, cond=cond, final_denoise=None if to_zero else resolved_denoise,
                      dtype=dtype, device=device)
    ref_times, ref_kind = _reference_grid(sde, reference_steps, t_first, t_last, to_zero)
    n_cand = min(candidates, reference_steps + 1)
    cand_index = torch.linspace(0, reference_steps, n_cand, dtype=_F64).round().long().unique()
    keep = set(cand_index.tolist())
    states: dict[int, torch.Tensor] = {}
    denoised: dict[int, torch.Tensor] = {}
    record = method != "descent"

    def keep_states(info: StepInfo) -> None:
        if info.step in keep and info.denoised is not None:
            denoised[info.step] = info.denoised.detach().to(_F64).clone()
        if info.step + 1 in keep:
            states[info.step + 1] = info.x.detach().to(_F64).clone()

    reference, ref_info = sample(model, reference_solver, grid=ref_times, return_info=True, progress=progress,
                                 callback=keep_states if record else None, **run_kwargs)
    network_calls = ref_info.nfe
    reference_note = f"{reference_solver!r} on {reference_steps} {ref_kind} steps"

    bar = _progress_bar(progress, max_evals)
    evaluations = 0

    def objective(grid_times: torch.Tensor) -> float:
        nonlocal evaluations, network_calls
        evaluations += 1
        if bar is not None:
            bar.update(1)
        try:
            x, info = sample(model, solver, grid=grid_times, return_info=True, **run_kwargs)
        except NonFiniteError:
            return math.inf
        network_calls += info.nfe
        return grid_distance(x, reference)

    best_times, best = times, objective(times)
    objective_start = best
    history = [(evaluations, best)]
    if bar is not None:
        bar.set_postfix(distance=f"{best:.3g}")

    def evaluate(candidate: torch.Tensor) -> float:
        """The objective of ``candidate``; the best grid seen so far is kept (the start's included)."""
        nonlocal best_times, best
        value = objective(candidate)
        if value < best:
            best_times, best = candidate, value
            history.append((evaluations, value))
            if bar is not None:
                bar.set_postfix(distance=f"{value:.3g}")
        return value

    def descend(current: torch.Tensor, value: float, stop_at: int,
                move: float = _FIRST_MOVE) -> tuple[float, torch.Tensor, float]:
        """Coordinate descent from ``current`` until ``stop_at`` evaluations or a move below _LAST_MOVE;
        returns where it got: (value, grid, move)."""
        while move >= _LAST_MOVE and evaluations < stop_at:
            improved = False
            for k in range(1, steps):
                for direction in (1.0, -1.0):
                    if evaluations >= stop_at:
                        break
                    stride, moved = move, False
                    # a move that helped is tried again, doubled, while it keeps helping
                    while evaluations < stop_at:
                        candidate = _moved(current, k, direction * stride, sde.t_min)
                        if candidate is None:
                            break
                        candidate_value = evaluate(candidate)
                        if not candidate_value < value:
                            break
                        current, value, moved = candidate, candidate_value, True
                        stride *= 2
                    if moved:
                        improved = True
                        break  # the other direction cannot help as well
            if not improved:
                move /= 2
        return value, current, move

    starts: list[tuple[float, torch.Tensor]] = [(best, times)]
    if record and steps > 1 and evaluations < max_evals:
        # the reference's first state is x_T; StepInfo.x of step k is the state at time k + 1
        states[0] = _starting_state(model, solver, times, run_kwargs)
        if to_zero:  # the step to sigma = 0 is the run's last, after the last callback
            states[reference_steps] = reference.detach().to(_F64)
        # every candidate but the last needs the reference's x0 estimate there
        index = [i for i in sorted(keep) if i in states and (i in denoised or i == reference_steps)]
        cand_times = ref_times[torch.tensor(index)]
        dp_times = _dp_grid(sde, cand_times, [states[i] for i in index],
                            [denoised.get(i, states[i]) for i in index], steps)  # the last one is unused
        dp_times[0], dp_times[-1] = t_first, t_last
        starts.append((evaluate(dp_times), dp_times))
    if method == "dp+descent" and steps > 1:
        # the objective has local minima: descent starts from the best few of the start, the DP grid and
        # the library's grid kinds between the same ends
        for kind in GRID_KINDS:
            if evaluations >= max_evals:
                break
            try:
                kind_times = (make_grid(sde, steps, kind, t_max=t_first, to_zero=True) if to_zero
                              else make_grid(sde, steps, kind, t_max=t_first, t_min=t_last))
            except ValueError:  # a kind this SDE or these ends do not allow
                continue
            if not any(torch.equal(kind_times, other) for _, other in starts):
                starts.append((evaluate(kind_times), kind_times))
    if method == "descent" and steps > 1:
        descend(times, objective_start, max_evals)
    elif method == "dp+descent" and steps > 1:
        # a short descent from each of the best few starts, then the rest of the budget on the best of them
        chosen = sorted(starts, key=lambda pair: pair[0])[:_RESTARTS]
        trial = max(max_evals - evaluations, 0) // (2 * len(chosen))
        ends = [descend(current, value, evaluations + trial) for value, current in chosen]
        value, current, move = min(ends, key=lambda end: end[0])
        descend(current, value, max_evals, move)
    if bar is not None:
        bar.close()
    seed_kept = None if x_T is not None else seed
    batch = reference.shape[0]
    return OptimizedGrid(times=best_times.clone(), start=times, objective=best, objective_start=objective_start,
                         nfe=nfe, steps=steps, final_denoise=resolved_denoise, solver=repr(solver), sde=repr(sde),
                         model=repr(model), seed=seed_kept, batch_size=int(batch), reference=reference_note,
                         method=method, evaluations=evaluations, network_calls=network_calls,
                         seconds=time.perf_counter() - wall_start, cpu_seconds=time.process_time() - cpu_start,
                         history=history)


def _starting_state(model: Model, solver: Solver, times: torch.Tensor, run_kwargs: dict) -> torch.Tensor:
    """The calibration x_T in float64, as every run starts from it: the given one, or the prior draw that
    ``sample`` makes from the seed (its plan, without a network call)."""
    from .driver import plan_run

    plan = plan_run(model, solver, x=run_kwargs["x_T"], shape=run_kwargs["shape"], seed=run_kwargs["seed"],
                    cond=run_kwargs["cond"], dtype=run_kwargs["dtype"], device=run_kwargs["device"], grid=times)
    x = plan.x if plan.offset is None else plan.x + plan.offset  # the callbacks' states are in x, not x - mu
    return x.detach().to(_F64).clone()


def _progress_bar(progress: bool | None, total: int):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="optimize_grid", unit="run")


# ---------------------------------------------------------------------------------------------
# grid files


def _json_ready(name: str, value):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_grid: metadata {name!r} must be a JSON value (str, finite number, bool, None, "
                         f"list, dict), got {type(value).__name__}: {exc}") from None
    return value


def save_grid(path, times, **metadata) -> Path:
    """Write a grid of times (N+1,) and JSON-ready ``metadata`` (SDE, solver, nfe, ...) to a JSON file.

    The times are written as Python floats (exact round trip of float64).  Returns the path.
    """
    values = (times.detach().to("cpu", _F64) if isinstance(times, torch.Tensor)
              else torch.as_tensor(times, dtype=_F64))  # Python floats are float64: no float32 detour
    if values.dim() != 1 or values.shape[0] < 2:
        raise ValueError(f"save_grid: times must have shape (N+1,) with N >= 1, got {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or not bool((values[1:] < values[:-1]).all()):
        raise ValueError("save_grid: times must be finite and strictly decreasing")
    document = {"format": GRID_FILE_FORMAT, "version": _GRID_FILE_VERSION,
                "times": [float(t) for t in values],
                "metadata": {name: _json_ready(name, value) for name, value in metadata.items()}}
    path = Path(path)
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    return path


def _read_grid_file(path) -> dict:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"load_grid: cannot read {str(path)!r}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_grid: {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != GRID_FILE_FORMAT:
        raise ValueError(f"load_grid: {str(path)!r} is not a grid file (no \"format\": \"{GRID_FILE_FORMAT}\")")
    if document.get("version") != _GRID_FILE_VERSION:
        raise ValueError(f"load_grid: {str(path)!r} has version {document.get('version')!r}; this library reads "
                         f"version {_GRID_FILE_VERSION}")
    times = document.get("times")
    if not isinstance(times, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                              for t in times):
        raise ValueError(f"load_grid: {str(path)!r}: \"times\" must be a list of numbers")
    if not isinstance(document.get("metadata", {}), dict):
        raise ValueError(f"load_grid: {str(path)!r}: \"metadata\" must be an object")
    return document


def load_grid(path, sde=None) -> torch.Tensor:
    """The float64 times (N+1,) of a grid file written by :func:`save_grid` / :meth:`OptimizedGrid.save`,
    ready for ``sample(grid=...)``.

    With ``sde``, the grid is checked as ``sample`` checks it (:func:`samplers.validate_grid`), and a file
    whose metadata names another SDE (its ``sde`` entry, a repr) is refused.
    """
    document = _read_grid_file(path)
    times = torch.tensor(document["times"], dtype=_F64)
    if times.dim() != 1 or times.shape[0] < 2 or not bool(torch.isfinite(times).all()) or \
            not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"load_grid: {str(path)!r}: \"times\" must be at least 2 finite, strictly decreasing numbers")
    if sde is not None:
        saved_sde = document.get("metadata", {}).get("sde")
        if saved_sde is not None and saved_sde != repr(sde):
            raise ValueError(f"load_grid: {str(path)!r} was made for {saved_sde}, not {sde!r}")
        times = validate_grid(sde, times)
    return times


def grid_metadata(path) -> dict:
    """The metadata of a grid file (what :func:`save_grid` was given besides the times)."""
    return dict(_read_grid_file(path).get("metadata", {}))
