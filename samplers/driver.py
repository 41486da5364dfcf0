"""The sampling driver's three phases, shared by every run (sample, invert, sample_grad, likelihood).

* plan (:func:`plan_run`): every check before any work (no network call, no allocation the machine
  cannot hold), the grid, the dtypes, the device, the keyed noise and the starting state;
* integrate: a fixed grid (:class:`FixedGridRun`: the solver's tables, one ``step`` a grid interval) or
  adaptive steps (:class:`AdaptiveRun`: the solver's own per-sample steps);
* finish (:func:`finish`): the final denoising step, the one check for NaN/Inf, the state offset, the cast.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, overload

import torch

from sde import GaussianSDE
from solvers import AdaptiveSolver, Solver, SolverBase, kernels
from solvers.adaptive import batch_independent
from solvers.base import Plan, check_coefficients_finite
from solvers.kernels import FusedStep

from .brownian import DEFAULT_DEPTH, VirtualBrownianTree, grid_path_draws
from .grid import ends_at_zero, validate_grid
from .grid import grid as make_grid
from .limits import check_state_memory
from .model import Model, compute_dtype, network_placement
from .noise import NOISE_MODES, STREAM_PRIOR, NoiseSource, as_integer, step_stream

__all__ = ["RunPlan", "GridPlan", "StepInfo", "STOP", "noise_level", "callback_state", "generator_normal",
           "check_generator", "plan_run", "FixedGridRun", "AdaptiveRun", "finish", "FixedGridContext",
           "AdaptiveRunContext",
           "fixed_grid_context", "NonFiniteError", "builds_no_graph", "check_run_arguments",
           "check_shape", "check_state", "check_device", "check_finite", "check_solver_state", "resolve_dtypes",
           "run_grid", "per_sample_cond"]


def builds_no_graph(run: Callable) -> Callable:
    """``run`` under ``torch.no_grad()``: sampling, inversion and likelihoods record no autograd graph,
    whatever the caller's grad mode and whether the network's parameters require grad (the solvers
    update the state in place, which autograd refuses, and a recorded run would keep every step's
    graph alive); gradients through sampling are :func:`samplers.sample_grad`'s job.  Not
    ``torch.inference_mode``: its tensors can never enter autograd afterwards, and callers do use
    samples and latents there (a training target, a latent they optimise)."""
    return torch.no_grad()(run)


class NonFiniteError(FloatingPointError):
    """The state became NaN or Inf; the message names the step."""




#: what a ``callback`` returns to end a run after the step it was called for (:class:`StepInfo`)
STOP = "stop"


@dataclass
class StepInfo:
    """Handed to ``callback`` after every step, and after the final denoising step (``final=True``).

    The callback returns None to go on, a tensor of the state's shape to replace the state (it is copied
    into the run, as diffusers' ``callback_on_step_end`` hands back latents), or :data:`STOP` to end the
    run there: ``sample`` then returns the state reached, without the final denoising step."""

    step: int  #: index of the step just taken (0-based; ``steps`` for the final denoising step)
    steps: int  #: total number of steps (the final denoising step not counted)
    t: torch.Tensor  #: time at the start of the step, (C,) with C = 1 or B
    t_next: torch.Tensor  #: time reached (the final denoising step: t itself)
    x: torch.Tensor  #: the state at t_next (do not modify; return a new state instead)
    denoised: torch.Tensor | None  #: the x0 estimate at the start of the step (None off Gaussian SDEs)
    nfe: int  #: network calls so far
    extra: dict = field(default_factory=dict)
    #: the noise levels sigma/alpha at t and t_next, (C,) float64 (k-diffusion's and diffusers' sigma; 0 after
    #: the final denoising step; None off Gaussian SDEs)
    sigma: torch.Tensor | None = None
    sigma_next: torch.Tensor | None = None
    final: bool = False  #: whether this is the final denoising step (``x`` is then the returned sample)


def noise_level(sde, t: torch.Tensor) -> torch.Tensor | None:
    """sigma(t)/alpha(t) (float64), the noise level callbacks report; None off Gaussian SDEs."""
    if not isinstance(sde, GaussianSDE):
        return None
    t64 = torch.as_tensor(t, dtype=torch.float64)
    return sde.sigma(t64) / sde.alpha(t64)


def callback_state(returned, x: torch.Tensor, step: int) -> bool:
    """Apply what a callback returned after ``step``: None goes on, a tensor replaces ``x`` (in place),
    :data:`STOP` ends the run (True).  Anything else is a TypeError naming what is allowed."""
    if returned is None:
        return False
    if isinstance(returned, str) and returned == STOP:
        return True
    if isinstance(returned, torch.Tensor):
        if returned.shape != x.shape:
            raise ValueError(f"callback returned a state of shape {tuple(returned.shape)} after step {step}, expected "
                             f"the state's shape {tuple(x.shape)}")
        x.copy_(returned)
        return False
    raise TypeError(f"callback must return None, a new state (a tensor) or samplers.STOP, got "
                    f"{type(returned).__name__} after step {step}")


class FixedGridContext:
    """The StepContext of one run: the network, the tables, the keyed noise, scratch buffers."""

    def __init__(self, model: Model, cond: dict, tables: dict, times_net: torch.Tensor,
                 noise: NoiseSource, like: torch.Tensor, net_dtype: torch.dtype,
                 stage_net: dict[str, torch.Tensor] | None = None, plans: dict[str, list] | None = None,
                 path_draws: dict | None = None):
        self.model = model
        self.path_draws = path_draws or {}  # (step, draw) -> its Brownian-path increments (noise="path")
        self.plans = plans or {}
        self.stage_net = stage_net or {}
        self.cond = cond
        self.tables = tables
        self.times_net = times_net
        self.noise_source = noise
        self.like = like
        self.net_dtype = net_dtype
        self.nfe = 0
        self.first_output: torch.Tensor | None = None
        self.record = False
        self._noise_keys: dict[int, tuple[int, int]] = {}  # slot -> the (step, draw) its buffer holds
        self._noise_bufs: dict[int, torch.Tensor] = {}
        self._scratch: dict[str, torch.Tensor] = {}
        self._net_times: dict[int, tuple] = {}
        self.grad_leaves: list[torch.Tensor] = []  # what sample_grad's adjoint routes gradients to besides x
        self.solver_state: dict | None = None  # a solver's initial state besides x (sample's solver_state=)
        if like.device.type != "cpu":
            noise.keys_on(like.device)  # the noise keys reach the device before the loop, not in it

    def output(self, x, time_index, stage=None):
        return self._call_net(x, self.times_net[time_index] if stage is None else self.stage_net[stage][time_index])

    def model_output(self, x, t):
        # the network's times of each t once per run: a solver hands the same (C,) rows every time (Restart's
        # sub-grids, kept in its plan), so a pass costs no host work or copy per call after the first
        cached = self._net_times.get(id(t))
        if cached is None or cached[0] is not t:
            net_t = self.model.net_time(torch.as_tensor(t, dtype=torch.float64).reshape(-1))
            net_t = net_t.to(device=self.like.device, dtype=self.like.dtype).expand(self.like.shape[0]).contiguous()
            cached = self._net_times[id(t)] = (t, net_t)
        return self._call_net(x, cached[1])

    def _call_net(self, x, net_t):
        net_x = x if x.dtype == self.net_dtype else x.to(self.net_dtype)
        out = self.model.call_net(net_x, net_t, **self.cond)
        self.nfe += 1
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            out = out.clone()  # solvers update x in place; a net that returns (a view of) x must not see that
        if self.record and self.first_output is None:
            self.first_output = out
        return out

    def noise(self, step, draw=0):
        # draw 0 keeps its own buffer (a step may read it twice, e.g. Heun's two stages); the
        # further draws (corrector iterations, restart jumps, up to hundreds a step) share one,
        # since each is used at once: one state-sized buffer instead of one per draw
        slot = 0 if draw == 0 else 1
        buf = self._noise_bufs.get(slot)
        if buf is None:
            buf = self._noise_bufs[slot] = torch.empty_like(self.like)
        if self._noise_keys.get(slot) != (step, draw):
            walker = self.path_draws.get((step, draw))
            if walker is not None:
                walker.increment((step, draw), buf)
            else:
                self.noise_source.normal(self.like.shape[1:], counter=step, stream=step_stream(draw), out=buf)
            self._noise_keys[slot] = (step, draw)
        return buf

    def coef(self, name, step):
        table = self.tables.get(name)
        if table is None:
            raise KeyError(f"no coefficient table {name!r}: prepare returned the tables {sorted(self.tables)}")
        return table[step]

    def plan(self, name):
        plan = self.plans.get(name)
        if plan is None:
            raise KeyError(f"no plan {name!r}: prepare returned the plans {sorted(self.plans)}")
        return plan

    def scratch(self, name):
        buf = self._scratch.get(name)
        if buf is None:
            buf = self._scratch[name] = torch.empty_like(self.like)
        return buf


class AdaptiveRunContext:
    """The AdaptiveContext of one run: network calls on subsets of the batch at per-sample times."""

    def __init__(self, model: Model, cond: dict, batch: int, device, compute, net_dtype, noise: NoiseSource,
                 t_low: float, t_high: float):
        self.model, self.cond = model, cond
        self.noise_source, self.t_low, self.t_high = noise, t_low, t_high
        self.batch_size = batch
        self.device, self.compute, self.net_dtype = device, compute, net_dtype
        self.nfe = 0
        self.nfe_per_sample = torch.zeros(batch, dtype=torch.long)
        self.accepted = torch.zeros(batch, dtype=torch.long)
        self.rejected = torch.zeros(batch, dtype=torch.long)

    def _cond_rows(self, index):
        if index.numel() == self.batch_size:
            return self.cond
        rows = index.to(self.device)
        # per-sample conditioning (a tensor with the batch as its first dimension) follows the rows
        return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.batch_size else v
                for k, v in self.cond.items()}

    def output(self, x, t, index):
        net_x = x if x.dtype == self.net_dtype else x.to(self.net_dtype)
        net_t = self.model.net_time(t.to(torch.float64)).to(device=self.device, dtype=self.compute)
        out = self.model.call_net(net_x, net_t, **self._cond_rows(index))
        self.nfe += 1
        self.nfe_per_sample[index] += 1
        # adaptive control decides on the host after every attempt anyway: one more reduction a call
        # names a network that returns NaN/Inf where it happens, instead of the step control failing later
        if not bool(torch.isfinite(out).all()):
            self._refuse_non_finite(x, out, t, index)
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            out = out.clone()
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _refuse_non_finite(self, x, out, t, index):
        rows = x.shape[0]
        bad_out = ~torch.isfinite(out.detach()).reshape(rows, -1).all(dim=1).cpu()
        j = int(torch.nonzero(bad_out)[0])
        where = f"sample {int(index[j])}: at t={float(t[j]):.6g} (network call {self.nfe})"
        if bool(torch.isfinite(x.detach()[j]).all()):
            raise NonFiniteError(f"{where} the network returned NaN or Inf for a finite input: check the network "
                                 f"({self.model!r}) there")
        raise NonFiniteError(f"{where} the state handed to the network is NaN or Inf: use a tighter tolerance or "
                             f"a higher precision dtype")

    def column(self, values, like):
        return values.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))

    def coefficients(self, quantity, t, like):
        p, q = batch_independent(lambda u: self.model.coefficients(quantity, u), t)
        return self.column(p, like), self.column(q, like)

    brownian_depth = DEFAULT_DEPTH

    def brownian(self, s, t, index, like, depth=None):
        tree = VirtualBrownianTree(self.noise_source, like.shape[1:], self.t_low, self.t_high,
                                   depth=self.brownian_depth if depth is None else depth,
                                   dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                                   device=like.device)
        return tree.increment(s, t, index).to(like.dtype)

    def count_attempts(self, index, accepted):
        self.accepted[index] += accepted.long()
        self.rejected[index] += (~accepted).long()


def resolve_dtypes(dtype, x_T, model: Model | None = None):
    """(the dtype handed to the network and returned, the compute dtype): ``dtype``, else x_T's, else
    (with ``model``) its module's parameters' dtype, else torch's default."""
    if dtype is None:
        if x_T is not None and x_T.is_floating_point():
            dtype = x_T.dtype
        else:
            dtype = (network_placement(model, "dtype") if model is not None else None) or torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype, compute_dtype(dtype)


def _broadcast_table(name: str, table: torch.Tensor, times: torch.Tensor, solver: SolverBase, ndim: int,
                     device, dtype) -> torch.Tensor:
    table = torch.as_tensor(table, dtype=torch.float64)
    check_coefficients_finite(solver, name, table, lambda k, j: _step_span(times, k, j))
    return table.reshape(table.shape + (1,) * (ndim - 1)).to(device=device, dtype=dtype)


def _step_span(times: torch.Tensor, k: int, column: int) -> str:
    """'the step from t=.. to t=.. (step k)' of a (N+1, C) grid, in the given column (the sample's, C > 1)."""
    column = min(column, times.shape[1] - 1)  # a table may be per sample on a shared grid
    sample = f", sample {column}" if times.shape[1] > 1 else ""
    return f"the step from t={times[k, column].item():g} to t={times[k + 1, column].item():g} (step {k}{sample})"


def fixed_grid_context(model: Model, solver: Solver, x: torch.Tensor, table_times: torch.Tensor, cond: dict,
                       noise: NoiseSource, net_dtype: torch.dtype) -> FixedGridContext:
    """The StepContext of a fixed-grid run over ``table_times`` (N+1, C) float64 for states like ``x``
    (the compute dtype and device): the solver's tables, the network's times, the keyed noise."""
    device, compute, batch = x.device, x.dtype, x.shape[0]
    n_steps = table_times.shape[0] - 1
    # a grid of one step to sigma = 0 leaves the solver no step: only the final denoising call is made
    raw_tables = solver.prepare(model, table_times) if n_steps else {}
    if n_steps:
        solver.check_prepared(raw_tables)  # a misspelt table name fails here, before any network call
    # Plans are the solver's per-step host-side choices (each step's order), the rest are coefficient
    # tables moved to the device once
    plans: dict[str, list] = {name: tab for name, tab in raw_tables.items() if isinstance(tab, Plan)}
    for name, tab in raw_tables.items():
        if name not in plans and isinstance(tab, (list, tuple)):
            raise TypeError(f"{solver!r}: prepare returned a {type(tab).__name__} under {name!r}; a coefficient table "
                            f"is a tensor and a per-step plan a solvers.Plan")
    tables = {name: _broadcast_table(name, tab, table_times, solver, x.dim(), device, compute)
              for name, tab in raw_tables.items() if name not in plans}
    # the network's time convention is applied in float64, then cast (discrete timesteps stay integers)
    times_net = model.net_time(table_times).to(device=device, dtype=compute).expand(-1, batch).contiguous()
    stage_net = {}
    for name, stage in (solver.stage_times(model, table_times) if n_steps else {}).items():
        stage = torch.as_tensor(stage, dtype=torch.float64)
        if stage.shape != (n_steps, table_times.shape[1]) or not bool(torch.isfinite(stage).all()):
            raise ValueError(f"{solver!r}: stage times '{name}' must be finite, shaped "
                             f"{(n_steps, table_times.shape[1])}")
        stage_net[name] = model.net_time(stage).to(device=device, dtype=compute).expand(-1, batch).contiguous()
    path_draws = (grid_path_draws(solver.brownian_draws(model, table_times), noise, x, table_times,
                                  (model.sde.t_min, model.sde.t_max)) if noise.mode == "path" else None)
    return FixedGridContext(model, cond, tables, times_net, noise, x, net_dtype, stage_net, plans, path_draws)


@overload
def check_solver_state(solver: Solver, state: None, x: torch.Tensor) -> None: ...


@overload
def check_solver_state(solver: Solver, state: dict, x: torch.Tensor) -> dict: ...


@overload
def check_solver_state(solver: Solver, state: dict | None, x: torch.Tensor) -> dict | None: ...


def check_solver_state(solver: Solver, state, x: torch.Tensor) -> dict | None:
    """``state`` with its tensors on x's device and dtype, after checking the solver carries those names."""
    if state is None:
        return None
    names = solver.state_names
    if not isinstance(state, dict) or set(state) != set(names) or not names:
        raise ValueError(f"solver_state: {solver!r} carries the state {names or 'nothing'} besides x; got "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != x.shape:
            raise ValueError(f"solver_state[{name!r}] must be a tensor shaped like the state {tuple(x.shape)}, got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
        out[name] = value.detach().to(device=x.device, dtype=x.dtype)
    return out


def _state_offset(sde, cond: dict, x: torch.Tensor) -> torch.Tensor | None:
    """The offset mu of an SDE that is integrated in y = x - mu (:class:`sde.MeanRevertingSDE`, from
    ``cond``), on x's device and dtype; None for every other SDE.  The run starts from x_T - mu and
    returns y + mu; the model hands the network y + mu."""
    if sde.mean_key is None:
        return None
    mu = sde.state_offset(cond)
    try:
        fits = torch.broadcast_shapes(mu.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"cond[{sde.mean_key!r}] (the mean state of {sde!r}) has shape "
                         f"{tuple(mu.shape)}; expected the state's shape {tuple(x.shape)} or one broadcastable to it")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"cond[{sde.mean_key!r}] (the mean state of {sde!r}) contains NaN or Inf")
    return mu.to(device=x.device, dtype=x.dtype)


def check_run_arguments(model: Model, solver: SolverBase, cond) -> dict:
    """The checks every run makes of its model, solver and ``cond``; returns ``cond`` (``{}`` for None)."""
    if not isinstance(model, Model):
        raise TypeError(f"model must be a samplers.Model, got {type(model).__name__}")
    if not isinstance(solver, SolverBase):
        raise TypeError(f"solver must be a solvers.Solver instance (a fixed-grid solver such as DPMSolver()) or a "
                        f"solvers.AdaptiveSolver instance (such as AdaptiveDPMSolver()), got {type(solver).__name__}")
    solver.check_implemented()
    solver.check_sde(model.sde)
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise TypeError(f"cond must be a dict of keyword arguments for the network, got {type(cond).__name__}")
    return cond


def check_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints (B, ...).  An int B means (B,): B samples with one element
    each, as ``torch.zeros(B)`` reads it.  Non-integers (4.5, 4.0, True) are refused, never truncated."""
    entries = (shape,) if as_integer(shape) is not None else shape
    try:
        entries = tuple(entries)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints (B, ...) or an int B, got {type(shape).__name__}") from None
    sizes: list[int] = []
    for entry in entries:
        size = as_integer(entry)
        if size is None:
            raise TypeError(f"shape must contain ints, got {shape!r} (the entry {entry!r} is a {type(entry).__name__})")
        sizes.append(size)
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {tuple(sizes)}")
    return tuple(sizes)


def check_state(x, name: str) -> None:
    """The cheap checks of a state handed to a run (sample's x_T, invert's x0, sample_grad's x_T,
    likelihood's x): a real floating tensor (B, ...) with B >= 1 and at least one element per sample,
    holding values (not on the meta device).  :func:`check_finite` reads the values."""
    expected = f"{name} must be a floating tensor of shape (B, ...) with B >= 1"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        kind = "complex dtype (a state is real)" if x.is_complex() else "dtype"
        raise ValueError(f"{expected} (float16, bfloat16, float32 or float64), got the {kind} {x.dtype}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{expected}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must have at least one element per sample (no dimension of size 0), got shape "
                         f"{tuple(x.shape)}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: pass a tensor on the CPU or a GPU")


def check_device(device: torch.device, dtype: torch.dtype, name: str) -> None:
    """Refuse a device the run's state and coefficient tables (``dtype``) cannot live on; ``name`` is the
    argument that chose it (x_T, x or device)."""
    if device.type == "meta":
        raise ValueError(f"{name}: the meta device holds no values; sample on the CPU or a GPU")
    try:
        torch.empty(1, dtype=dtype, device=device)
    except (RuntimeError, TypeError, AssertionError) as exc:  # AssertionError: torch built without CUDA
        raise ValueError(f"{name}: the run's state and tables ({dtype}) cannot live on {device}: {exc}") from exc


def check_finite(x: torch.Tensor, name: str) -> None:
    """Refuse a state with NaN or Inf entries before any network call, naming the first such sample."""
    bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite (it has NaN or Inf entries, first in sample "
                         f"{int(torch.nonzero(bad)[0])})")


def run_grid(sde, steps, grid, grid_kind, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the run's grid, float64 on the CPU as given (N+1,) or (N+1, B); the same as (N+1, C) tables)
    from exactly one of ``steps`` (with an optional ``grid_kind``) or an explicit ``grid``."""
    if (steps is None) == (grid is None):
        raise ValueError("pass exactly one of steps (a number of steps) or grid (a tensor of times)")
    if grid is None:
        times = make_grid(sde, steps, grid_kind)
    else:
        if grid_kind is not None:
            raise ValueError("grid_kind applies only with steps; an explicit grid already fixes the times")
        times = validate_grid(sde, grid, batch)
    times = times.detach().to("cpu", torch.float64)
    return times, (times if times.dim() == 2 else times[:, None])


def per_sample_cond(sde, cond: dict, state_shape) -> dict:
    """``cond`` in the form where a tensor is per-sample exactly when its first dimension is the
    batch (the rule by which batches are split into rows): the mean state of an SDE integrated
    around one (:class:`sde.MeanRevertingSDE`), which may be shaped like one sample, is expanded
    to the whole state's shape (a view).  A mean state that does not broadcast is left as it is,
    for the run's own check to name."""
    key = sde.mean_key
    mu = cond.get(key) if key is not None else None
    if not isinstance(mu, torch.Tensor):
        return cond
    try:
        return {**cond, key: mu.expand(tuple(state_shape))}
    except RuntimeError:
        return cond


def check_generator(generator, shape) -> None:
    """A ``torch.Generator`` or a list of one per sample (the batch is ``shape[0]``)."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    bad = [type(g).__name__ for g in generators if not isinstance(g, torch.Generator)]
    if bad:
        raise TypeError(f"generator must be a torch.Generator or a list of them (one per sample), got {bad[0]}")
    batch = shape[0] if shape is not None else None
    if isinstance(generator, (list, tuple)) and batch is not None and len(generator) != batch:
        raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {batch}; pass one per "
                         "sample")


def generator_normal(generator, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normals of ``shape`` from ``generator`` as diffusers' ``randn_tensor`` draws them: on the
    generator's device in ``dtype`` (the state's), one row per generator for a list; then moved to ``device``."""
    if isinstance(generator, (list, tuple)):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def _progress_bar(progress, steps):
    # by default a bar on a terminal, as diffusers' and k-diffusion's loops show one; it clears itself when
    # done, so programs that sample many times (bench, sharded runs) do not fill the terminal with bars
    leave = progress is not None
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=steps, desc="sampling", unit="step", leave=leave)



def _final_hooks(solver, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The returned x0 estimate gets the solver's x0 hooks (thresholding, correct_x0) too."""
    hooks = solver.hooks
    if hooks is None or not hooks.active:
        return x0
    return hooks.apply_at(x0, t.to(device=x0.device, dtype=x0.dtype))




# ---------------------------------------------------------------------------------------------
# plan


@dataclass
class RunPlan:
    """A checked run: what :func:`plan_run` found, before any network call (without a grid: likelihood's,
    which integrates over its own interval; a run on a grid gets a :class:`GridPlan`)."""

    model: Model
    solver: SolverBase
    cond: dict  #: the network's keyword arguments
    x: torch.Tensor  #: the starting state: the run's own copy in the compute dtype on the run's device
    dtype: torch.dtype  #: the dtype handed to the network and returned
    compute: torch.dtype  #: the dtype the state is updated in
    device: torch.device  #: the run's device
    noise: NoiseSource  #: the keyed noise of the run's samples
    seed: object
    offset: torch.Tensor | None = None  #: the mean state an SDE is integrated around (y = x - mu)
    final_denoise: bool = False
    start_time: float = 0.0
    backend: str = "torch"  #: "torch" or "cupy" (the solver's fused kernel, :attr:`fused`)
    fused: FusedStep | None = None  #: the solver's :class:`solvers.kernels.FusedStep` when backend is "cupy"
    backend_reason: str = ""  #: why that backend

    @property
    def sde(self):
        return self.model.sde


@dataclass(kw_only=True)
class GridPlan(RunPlan):
    """A checked run on a grid (every run but likelihood's): a fixed grid, or an adaptive solver's
    (t_start, t_end)."""

    times: torch.Tensor  #: the grid as given, float64 (N+1,) or (N+1, B)
    #: the times the solver steps between, (M+1, C) float64, C = 1 or B: the grid, without its last time when
    #: it ends at sigma = 0 (that step is the final denoising step from the last positive noise level)
    table_times: torch.Tensor
    ends_at_zero: bool = False  #: the grid ends at sde.zero_noise_time

    @property
    def total_steps(self) -> int:
        """The grid's steps, the one to sigma = 0 included."""
        return self.n_steps + int(self.ends_at_zero)

    @property
    def n_steps(self) -> int:
        return self.table_times.shape[0] - 1


@overload
def plan_run(model: Model, solver: SolverBase, *, x: torch.Tensor | None = None, shape=None, state_name: str = "x_T",
             steps=None, grid=None, grid_kind=None, seed=0, sample_index=None, cond=None, dtype=None, device=None,
             fixed_grid_for: str | None = None, final_denoise: bool | None = False,
             grid_required: Literal[True] = True, state_memory: tuple | None = None, own_state: bool = True,
             backend: str = "torch", generator=None, noise_mode: str = "step") -> GridPlan: ...


@overload
def plan_run(model: Model, solver: SolverBase, *, x: torch.Tensor | None = None, shape=None, state_name: str = "x_T",
             steps=None, grid=None, grid_kind=None, seed=0, sample_index=None, cond=None, dtype=None, device=None,
             fixed_grid_for: str | None = None, final_denoise: bool | None = False,
             grid_required: Literal[False], state_memory: tuple | None = None, own_state: bool = True,
             backend: str = "torch", generator=None, noise_mode: str = "step") -> RunPlan: ...


def plan_run(model: Model, solver: SolverBase, *, x: torch.Tensor | None = None, shape=None, state_name: str = "x_T",
             steps=None, grid=None, grid_kind=None, seed=0, sample_index=None, cond=None, dtype=None, device=None,
             fixed_grid_for: str | None = None, final_denoise: bool | None = False, grid_required: bool = True,
             state_memory: tuple | None = None, own_state: bool = True, backend: str = "torch",
             generator=None, noise_mode: str = "step") -> RunPlan:
    """Every check of a run, then its grid, dtypes, device, keyed noise and starting state.

    ``x`` (the argument ``state_name``) or ``shape`` (a prior draw) is the state at the grid's first time;
    ``fixed_grid_for`` names a caller that needs a fixed-grid solver and a state integrated as it is
    (invert, sample_grad); ``final_denoise`` None means on for a Gaussian-marginal SDE; without
    ``grid_required`` the run has no grid (likelihood: its own interval), and ``state_memory`` is the shape
    of what it integrates; without ``own_state`` the plan keeps ``x`` itself (a tensor autograd follows);
    ``backend`` is resolved by :func:`solvers.kernels.resolve_backend`; ``generator`` (a torch.Generator or one
    per sample) draws the prior's normals instead of the keyed noise (:func:`generator_normal`).  A run with
    ``grid_required`` gets a :class:`GridPlan`.
    """
    start_time = time.perf_counter()
    cond = check_run_arguments(model, solver, cond)
    sde = model.sde
    adaptive = isinstance(solver, AdaptiveSolver)
    if fixed_grid_for is not None:
        if adaptive:
            raise ValueError(f"{fixed_grid_for} needs a fixed-grid solver; {solver!r} chooses its own steps")
        if sde.mean_key is not None:
            raise ValueError(f"{fixed_grid_for} does not support {sde!r}, which is integrated around a mean state from "
                             "cond; use sample() for it")
    gaussian = isinstance(sde, GaussianSDE)
    if final_denoise and not gaussian:
        raise ValueError(f"final_denoise=True needs a Gaussian-marginal SDE (an x0 estimate from alpha and sigma); "
                         f"{sde!r} is not one: pass final_denoise=False or None")

    if (shape is None) == (x is None):
        raise ValueError("pass exactly one of shape (to start from the prior) or x_T (the starting state)")
    if generator is not None:
        if x is not None:
            raise ValueError(f"generator draws the prior sample; with {state_name} given there is none to draw")
        check_generator(generator, shape)
    if x is not None:
        check_state(x, state_name)
        shape = tuple(x.shape)
        device, device_name = (x.device, state_name) if device is None else (torch.device(device), "device")
    else:
        shape = check_shape(shape)
        if device is None:
            device = network_placement(model, "device") or torch.device("cpu")
        device, device_name = torch.device(device), "device"
    batch = shape[0]
    dtype, compute = resolve_dtypes(dtype, x, model)
    check_device(device, compute, device_name)
    if not isinstance(noise_mode, str) or noise_mode not in NOISE_MODES:
        raise ValueError(f"noise: expected one of {NOISE_MODES} (per-step draws or one Brownian path per sample), "
                         f"got {noise_mode!r}")
    asked = backend
    backend, fused, backend_reason = kernels.resolve_backend(backend, solver, device, compute)
    if fused is not None and noise_mode == "path" and solver.stochastic:
        # the kernels draw the step's keyed normal inside the kernel; the path's increments are not per step
        why = ("noise='path': the fused kernels draw per-step keyed noise in the kernel, not a Brownian path's "
               "increments")
        if asked == "cupy":
            raise kernels.KernelUnsupported(f"backend='cupy' cannot run: {why}; use backend='torch' or noise='step'")
        backend, fused, backend_reason = "torch", None, f"auto chose torch: {why}"

    grid_times: tuple[torch.Tensor, torch.Tensor] | None = None
    if grid_required:
        if adaptive:
            if steps is not None or grid_kind is not None:
                raise ValueError(f"{solver!r} chooses its own steps: pass no steps/grid_kind (grid=(t_start, t_end) "
                                 "to integrate over another interval)")
            grid = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64) if grid is None else grid
            grid_shape = tuple(torch.as_tensor(grid).shape)
            if len(grid_shape) not in (1, 2) or grid_shape[0] != 2:
                raise ValueError(f"grid: an adaptive solver takes grid=(t_start, t_end) (2 times, or (2, B)), got "
                                 f"shape {grid_shape}")
        grid_times = run_grid(sde, steps, grid, grid_kind, batch)
    to_zero = grid_times is not None and ends_at_zero(sde, grid_times[0])
    if to_zero and grid_times is not None:
        if adaptive:
            raise ValueError(f"grid: {solver!r} chooses its own steps and cannot end at sigma = 0; pass "
                             "grid=(t_start, t_min) and final_denoise=True (the same last step)")
        if fixed_grid_for is not None:
            raise ValueError(f"grid: {fixed_grid_for} needs a grid that ends at t_min, not at sigma = 0 (its step "
                             "to the data x0-estimate cannot be run backwards or differentiated as an ODE step); "
                             "pass a grid ending at t_min")
        if final_denoise:
            raise ValueError("final_denoise=True: the grid already ends at sigma = 0, so its last step is the "
                             "denoising step; pass final_denoise=None or False")
        # the solver steps to the last positive noise level; the step from there to sigma = 0 is finish's
        grid_times = (grid_times[0], grid_times[1][:-1])
    final_denoise = gaussian if final_denoise is None and not to_zero else bool(final_denoise) or to_zero
    solver = solver.for_grid(ends_at_zero=to_zero)
    memory_name = state_name if x is not None else "shape"
    if state_memory is not None:
        check_state_memory(state_memory, compute, device, name=memory_name)
    elif grid_times is not None:
        table_times = grid_times[1]
        check_state_memory(shape, compute, device, steps=0 if adaptive else table_times.shape[0] - 1,
                           columns=table_times.shape[1], name=memory_name)
    else:
        raise ValueError("plan_run without a grid needs state_memory, the shape of what the run integrates")

    noise = NoiseSource(seed, batch, sample_index=sample_index, mode=noise_mode)
    if x is not None:
        check_finite(x, state_name)

    def checked_plan(state: torch.Tensor, offset: torch.Tensor | None = None) -> RunPlan:
        if grid_times is None:
            return RunPlan(model, solver, cond, state, dtype, compute, device, noise, seed, offset, bool(final_denoise),
                           start_time, backend, fused, backend_reason)
        return GridPlan(model, solver, cond, state, dtype, compute, device, noise, seed, offset, bool(final_denoise),
                        start_time, backend, fused, backend_reason, times=grid_times[0], table_times=grid_times[1],
                        ends_at_zero=to_zero)

    if not own_state:
        if x is None:
            raise ValueError(f"a run that keeps the caller's state (own_state=False) needs {state_name}")
        return checked_plan(x)
    if x is None:
        if grid_times is None:
            raise ValueError("a run that starts from a prior draw (shape) needs a grid starting at t_max")
        table_times = grid_times[1]
        off_prior = table_times[0] != sde.t_max
        if bool(off_prior.any()):
            j = int(torch.nonzero(off_prior)[0])
            raise ValueError(
                f"the grid starts at t={table_times[0, j].item():g}"
                f"{f' for sample {j}' if table_times.shape[1] > 1 else ''}, not at t_max={sde.t_max:g} where the "
                "prior lives: pass x_T, the state at the grid's first time"
            )
        if generator is None:
            z = noise.normal(shape[1:], counter=0, stream=STREAM_PRIOR, dtype=compute, device=device)
        else:
            z = generator_normal(generator, shape, dtype, device).to(compute)
        state = sde.prior_sample(shape, normal=z)
    else:
        state = x.detach().to(device=device, dtype=compute).clone()  # the run owns (and updates) its state
    offset = _state_offset(sde, cond, state)
    if offset is not None and x is not None:
        state.sub_(offset)  # the prior draw already is one of y = x - mu
    return checked_plan(state, offset)


# ---------------------------------------------------------------------------------------------
# integrate


class FixedGridRun:
    """A plan integrated on its fixed grid: the solver's tables once, then one ``step`` per grid interval
    (the solver's torch step, or its fused kernel)."""

    def __init__(self, plan: GridPlan, *, solver_state: dict | None = None, progress=None,
                 callback: Callable | None = None):
        solver = plan.solver
        if not isinstance(solver, Solver):
            raise TypeError(f"FixedGridRun integrates with a fixed-grid solvers.Solver, got {solver!r}")
        fused = plan.fused
        self.plan, self.solver, self.fused, self.progress, self.callback = plan, solver, fused, progress, callback
        x = plan.x if fused is None else plan.x.contiguous()
        self.x = x
        self.ctx = fixed_grid_context(plan.model, solver, x, plan.table_times, plan.cond, plan.noise, plan.dtype)
        self.ctx.solver_state = check_solver_state(solver, solver_state, x)
        if fused is not None:
            fused.bind(self.ctx, x, kernels.make_runner(x, plan.noise))
        self.t_end = plan.table_times[-1]
        if plan.final_denoise:
            p0, q0 = plan.model.coefficients("x0", self.t_end)
            last = plan.table_times[-2:]
            self.final_x = _broadcast_table("final_denoise", p0[None], last, plan.solver, x.dim(), x.device,
                                            x.dtype)[0]
            self.final_out = _broadcast_table("final_denoise", q0[None], last, plan.solver, x.dim(), x.device,
                                              x.dtype)[0]
        # a reduction per step, kept on the device: NaN/Inf anywhere shows up in the sum without a host
        # sync; the sums are checked once, by finish
        self.sums = torch.empty(plan.n_steps + 1, dtype=x.dtype, device=x.device)
        #: the steps taken when a callback returned STOP (None: the run went to the end)
        self.stopped_after: int | None = None

    def integrate(self) -> torch.Tensor:
        plan, ctx, solver, x, callback = self.plan, self.ctx, self.solver, self.x, self.callback
        n_steps, table_times = plan.n_steps, plan.table_times
        bar = _progress_bar(self.progress, n_steps)
        # off a Gaussian-marginal SDE there is no x0 estimate: callbacks get denoised=None
        den_coefficients = (plan.model.coefficients("x0", table_times[:-1])
                            if callback is not None and isinstance(plan.sde, GaussianSDE) else None)
        device, compute, offset = x.device, x.dtype, plan.offset
        x_before: torch.Tensor | None = None
        for k in range(n_steps):
            if callback is not None:
                ctx.record, ctx.first_output = True, None
                x_before = x.clone() if den_coefficients is not None else None
            x = solver.step(k, x, ctx) if self.fused is None else self.fused.step(k, x, ctx)
            self.sums[k] = x.sum()
            if bar is not None:
                bar.update(1)
            if callback is not None:
                denoised = None
                if den_coefficients is not None and x_before is not None:
                    if ctx.first_output is None:
                        raise RuntimeError(f"{solver!r}: step {k} made no network call, so it has no x0 estimate "
                                           "for the callback")
                    p_den, q_den = den_coefficients
                    shape_c = (-1,) + (1,) * (x.dim() - 1)
                    denoised = (p_den[k].to(device, compute).reshape(shape_c) * x_before
                                + q_den[k].to(device, compute).reshape(shape_c) * ctx.first_output)
                ctx.record = False
                x_seen = x
                if offset is not None:
                    x_seen = x + offset
                    denoised = None if denoised is None else denoised + offset
                returned = callback(StepInfo(step=k, steps=n_steps, t=table_times[k], t_next=table_times[k + 1],
                                             x=x_seen, denoised=denoised, nfe=ctx.nfe,
                                             sigma=noise_level(plan.sde, table_times[k]),
                                             sigma_next=noise_level(plan.sde, table_times[k + 1])))
                if returned is not None and not isinstance(returned, str) and offset is not None:
                    returned = returned - offset
                if callback_state(returned, x, k):
                    self.stopped_after = k + 1
                    self.sums[k + 1:] = 0.0  # the steps not taken hold no reduction
                    break
        if bar is not None:
            bar.close()
        return x

    def x0_at_end(self, x: torch.Tensor) -> torch.Tensor:
        """The model's x0 estimate at the grid's last time, in place of x (one network call)."""
        out = self.ctx.output(x, self.plan.n_steps)
        return x.mul_(self.final_x).addcmul_(self.final_out, out)

    def nonfinite(self, x: torch.Tensor) -> str | None:
        """Where the state first became NaN or Inf (None if it never did): the run's one host sync."""
        plan, table_times, n_steps = self.plan, self.plan.table_times, self.plan.n_steps
        self.sums[n_steps] = x.sum() if plan.final_denoise else 0.0
        bad = ~torch.isfinite(self.sums)
        if not bool(bad.any()):
            return None
        k = int(torch.nonzero(bad)[0])
        # with a grid per sample, quote the times of a sample whose state is not finite (NaN stays NaN)
        j, sample_note = 0, ""
        if table_times.shape[1] > 1:
            bad_rows = ~torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
            if bool(bad_rows.any()):
                j = int(torch.nonzero(bad_rows)[0])
                sample_note = f" for sample {j}"
        if k == n_steps:
            where = f"in the final denoising step at t={table_times[-1, j].item():g}{sample_note}"
        else:
            where = (f"at step {k} of {n_steps} (t={table_times[k, j].item():g} -> "
                     f"{table_times[k + 1, j].item():g}{sample_note})")
        return (f"the state became NaN or Inf {where} with {plan.solver!r} on {plan.sde!r}; check the network's "
                f"output there, or use more steps / a higher precision dtype")

    def info(self) -> dict:
        """What the run did, for :class:`samplers.SampleInfo`."""
        return dict(nfe=self.ctx.nfe, steps=self.plan.total_steps,
                    solver_state=self.solver.read_state(self.ctx, self.plan.dtype))


class AdaptiveRun:
    """A plan integrated by an adaptive solver: each sample from its start time to its end time with its
    own steps (:meth:`solvers.AdaptiveSolver.solve`)."""

    def __init__(self, plan: GridPlan):
        solver = plan.solver
        if not isinstance(solver, AdaptiveSolver):
            raise TypeError(f"AdaptiveRun integrates with a solvers.AdaptiveSolver, got {solver!r}")
        self.plan, self.solver = plan, solver
        x = plan.x
        batch = x.shape[0]
        self.t_start = plan.table_times[0].expand(batch).clone()
        self.t_end = plan.table_times[-1].expand(batch).clone()
        cond = per_sample_cond(plan.sde, plan.cond, x.shape)  # the adaptive context hands the network rows of it
        self.ctx = AdaptiveRunContext(plan.model, cond, batch, x.device, x.dtype, plan.dtype, plan.noise,
                                      float(self.t_end.min()), float(self.t_start.max()))

    def integrate(self) -> torch.Tensor:
        return self.solver.solve(self.plan.model, self.plan.x, self.t_start, self.t_end, self.ctx)

    def x0_at_end(self, x: torch.Tensor) -> torch.Tensor:
        """The model's x0 estimate at each sample's end time (one network call)."""
        p, q = self.ctx.coefficients("x0", self.t_end, x)
        return x * p + self.ctx.output(x, self.t_end, torch.arange(x.shape[0])) * q

    def nonfinite(self, x: torch.Tensor) -> str | None:
        """The first sample whose state is NaN or Inf (None if none is)."""
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1).cpu()
        if not bool(bad.any()):
            return None
        plan = self.plan
        return (f"the state of sample {int(torch.nonzero(bad)[0])} became NaN or Inf with {plan.solver!r} on "
                f"{plan.sde!r}{' (in the final denoising step)' if plan.final_denoise else ''}; check the network's "
                "output")

    def info(self) -> dict:
        ctx = self.ctx
        return dict(nfe=ctx.nfe, steps=int(ctx.accepted.max()), nfe_per_sample=ctx.nfe_per_sample,
                    accepted_per_sample=ctx.accepted, rejected_per_sample=ctx.rejected)


# ---------------------------------------------------------------------------------------------
# finish


def finish(plan: GridPlan, run: FixedGridRun | AdaptiveRun, x: torch.Tensor) -> torch.Tensor:
    """The end of every run: the final denoising step (the model's x0 estimate, with the solver's x0 hooks),
    the check for NaN/Inf (naming where it appeared), the mean state added back, the cast to the run's dtype."""
    if plan.final_denoise:
        x = _final_hooks(plan.solver, run.x0_at_end(x), run.t_end)
    message = run.nonfinite(x)
    if message is not None:
        raise NonFiniteError(message)
    if plan.offset is not None:
        x = x.add_(plan.offset)
    return x if x.dtype == plan.dtype else x.to(plan.dtype)
