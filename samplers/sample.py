"""The sampling driver: owns the loop, noise, NFE count, dtype policy, checks and final denoising."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from solvers import Solver, kernels
from solvers.adaptive import batch_independent
from solvers.base import check_coefficients_finite

from .brownian import DEFAULT_DEPTH, VirtualBrownianTree
from .grid import grid as make_grid
from .grid import validate_grid
from .limits import check_state_memory
from .model import Model, compute_dtype, network_placement
from .noise import STREAM_PRIOR, NoiseSource, as_integer, step_stream

__all__ = ["sample", "SampleInfo", "StepInfo", "NonFiniteError", "builds_no_graph"]

_HALF = (torch.float16, torch.bfloat16)


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


@dataclass
class SampleInfo:
    """What a sampling run did."""

    nfe: int  #: network calls actually made
    steps: int  #: solver steps taken
    times: torch.Tensor  #: the grid, float64, shape (N+1,) or (N+1, B)
    seed: object  #: the seed(s) the noise was keyed with
    solver: str
    dtype: torch.dtype  #: dtype of the returned samples
    compute_dtype: torch.dtype  #: dtype the state was updated in
    final_denoise: bool
    backend: str = "torch"  #: "torch" or "cupy" (the fused CUDA kernels of solvers.kernels)
    backend_reason: str = ""  #: why that backend (with backend="auto": why the kernels were not used)
    wall_time: float = 0.0  #: seconds, including the network
    #: adaptive solvers: network calls, accepted and rejected steps of each sample, (B,) int64
    nfe_per_sample: torch.Tensor | None = None
    accepted_per_sample: torch.Tensor | None = None
    rejected_per_sample: torch.Tensor | None = None
    #: the solver's state besides x at the grid's last time (before final denoising), for solvers that
    #: carry one ({"x_hat": ...} of solvers.Reversible: with x it lets samplers.invert undo the run exactly)
    solver_state: dict | None = None


@dataclass
class StepInfo:
    """Handed to ``callback`` after every step."""

    step: int  #: index of the step just taken (0-based)
    steps: int  #: total number of steps
    t: torch.Tensor  #: time at the start of the step, (C,) with C = 1 or B
    t_next: torch.Tensor  #: time reached
    x: torch.Tensor  #: the state at t_next (do not modify)
    denoised: torch.Tensor | None  #: the x0 estimate at the start of the step (None off Gaussian SDEs)
    nfe: int  #: network calls so far
    extra: dict = field(default_factory=dict)


class _Context:
    """The StepContext of one run: the network, the tables, the keyed noise, scratch buffers."""

    def __init__(self, model: Model, cond: dict, tables: dict, times_net: torch.Tensor,
                 noise: NoiseSource, like: torch.Tensor, net_dtype: torch.dtype,
                 stage_net: dict[str, torch.Tensor] | None = None, plans: dict[str, list] | None = None):
        self.model = model
        self.plans = plans or {}
        self.stage_net = stage_net or {}
        self.cond = cond
        self.tables = tables
        self.times_net = times_net
        self.noise_source = noise
        self.like = like
        self.net_dtype = net_dtype
        self.nfe = 0
        self.first_output = None
        self.record = False
        self._noise_keys: dict[int, tuple[int, int]] = {}  # slot -> the (step, draw) its buffer holds
        self._noise_bufs: dict[int, torch.Tensor] = {}
        self._scratch: dict[str, torch.Tensor] = {}
        self.solver_state: dict | None = None  # a solver's initial state besides x (sample's solver_state=)
        if like.device.type != "cpu":
            noise.keys_on(like.device)  # the noise keys reach the device before the loop, not in it

    def output(self, x, time_index, stage=None):
        net_x = x if x.dtype == self.net_dtype else x.to(self.net_dtype)
        net_t = self.times_net[time_index] if stage is None else self.stage_net[stage][time_index]
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
            self.noise_source.normal(self.like.shape[1:], counter=step, stream=step_stream(draw), out=buf)
            self._noise_keys[slot] = (step, draw)
        return buf

    def coef(self, name, step):
        return self.tables[name][step]

    def plan(self, name):
        return self.plans[name]

    def scratch(self, name):
        buf = self._scratch.get(name)
        if buf is None:
            buf = self._scratch[name] = torch.empty_like(self.like)
        return buf


class _AdaptiveContext:
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


def _resolve_dtypes(dtype, x_T, model: Model | None = None):
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


def _broadcast_table(name: str, table: torch.Tensor, times: torch.Tensor, solver: Solver, ndim: int,
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
                       noise: NoiseSource, net_dtype: torch.dtype) -> _Context:
    """The StepContext of a fixed-grid run over ``table_times`` (N+1, C) float64 for states like ``x``
    (the compute dtype and device): the solver's tables, the network's times, the keyed noise."""
    device, compute, batch = x.device, x.dtype, x.shape[0]
    n_steps = table_times.shape[0] - 1
    raw_tables = solver.prepare(model, table_times)
    # lists are the solver's per-step plan (host-side choices such as each step's order), the rest
    # are coefficient tables moved to the device once
    plans = {name: tab for name, tab in raw_tables.items() if isinstance(tab, list)}
    tables = {name: _broadcast_table(name, tab, table_times, solver, x.dim(), device, compute)
              for name, tab in raw_tables.items() if name not in plans}
    # the network's time convention is applied in float64, then cast (discrete timesteps stay integers)
    times_net = model.net_time(table_times).to(device=device, dtype=compute).expand(-1, batch).contiguous()
    stage_net = {}
    for name, stage in solver.stage_times(model, table_times).items():
        stage = torch.as_tensor(stage, dtype=torch.float64)
        if stage.shape != (n_steps, table_times.shape[1]) or not bool(torch.isfinite(stage).all()):
            raise ValueError(f"{solver!r}: stage times '{name}' must be finite, shaped {(n_steps, table_times.shape[1])}")
        stage_net[name] = model.net_time(stage).to(device=device, dtype=compute).expand(-1, batch).contiguous()
    return _Context(model, cond, tables, times_net, noise, x, net_dtype, stage_net, plans)


def _check_solver_state(solver: Solver, state, x: torch.Tensor) -> dict | None:
    """``state`` with its tensors on x's device and dtype, after checking the solver carries those names."""
    if state is None:
        return None
    names = tuple(getattr(solver, "state_names", ()))
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
    if not callable(getattr(sde, "state_offset", None)):
        return None
    mu = sde.state_offset(cond)
    try:
        fits = torch.broadcast_shapes(mu.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"cond[{getattr(sde, 'mean_key', 'mu')!r}] (the mean state of {sde!r}) has shape "
                         f"{tuple(mu.shape)}; expected the state's shape {tuple(x.shape)} or one broadcastable to it")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"cond[{getattr(sde, 'mean_key', 'mu')!r}] (the mean state of {sde!r}) contains NaN or Inf")
    return mu.to(device=x.device, dtype=x.dtype)


def check_run_arguments(model: Model, solver: Solver, cond) -> dict:
    """The checks every run makes of its model, solver and ``cond``; returns ``cond`` (``{}`` for None)."""
    if not isinstance(model, Model):
        raise TypeError(f"model must be a samplers.Model, got {type(model).__name__}")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a solvers.Solver instance, got {type(solver).__name__}")
    solver.check_implemented()
    solver.check_sde(model.sde)
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise TypeError(f"cond must be a dict of keyword arguments for the network, got {type(cond).__name__}")
    return cond


def check_flag(name: str, value, *, allow_none: bool = False):
    """A boolean argument as given, refusing anything but True/False (and None where it means a default):
    a string such as "no" would otherwise count as true."""
    if (value is None and allow_none) or isinstance(value, bool):
        return value
    allowed = "True, False or None (the default)" if allow_none else "True or False"
    raise TypeError(f"{name} must be {allowed}, got {value!r}")


def check_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints (B, ...).  An int B means (B,): B samples with one element
    each, as ``torch.zeros(B)`` reads it.  Non-integers (4.5, 4.0, True) are refused, never truncated."""
    entries = (shape,) if as_integer(shape) is not None else shape
    try:
        entries = tuple(entries)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints (B, ...) or an int B, got {type(shape).__name__}") from None
    sizes = tuple(as_integer(entry) for entry in entries)
    if None in sizes:
        bad = entries[sizes.index(None)]
        raise TypeError(f"shape must contain ints, got {shape!r} (the entry {bad!r} is a {type(bad).__name__})")
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {sizes}")
    return sizes


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
    key = getattr(sde, "mean_key", None)
    mu = cond.get(key) if key is not None and callable(getattr(sde, "state_offset", None)) else None
    if not isinstance(mu, torch.Tensor):
        return cond
    try:
        return {**cond, key: mu.expand(tuple(state_shape))}
    except RuntimeError:
        return cond


def _progress_bar(progress, steps):
    if progress is None:
        progress = steps >= 200 and sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=steps, desc="sampling", unit="step")


@builds_no_graph
def sample(model: Model, solver: Solver, *, shape=None, x_T: torch.Tensor | None = None, steps: int | None = None,
           grid=None, grid_kind: str | None = None, seed=0, sample_index=None, cond: dict | None = None,
           final_denoise: bool | None = None, progress: bool | None = None,
           callback: Callable[[StepInfo], None] | None = None, dtype: torch.dtype | None = None, device=None,
           return_info: bool = False, solver_state: dict | None = None, backend: str = "auto"):
    """Draw samples by integrating ``solver`` from t_max (noise) to t_min (data).

    The run records no autograd graph, in any grad mode (see :func:`builds_no_graph`); to
    differentiate through sampling use :func:`samplers.sample_grad`.

    Parameters
    ----------
    model, solver:
        a :class:`Model` and a solver from :mod:`solvers`.
    shape or x_T:
        the batch shape (B, ...) to start from a keyed prior draw, or the starting state.
    steps or grid:
        a number of steps on the SDE's default grid (``grid_kind`` to choose another), or an
        explicit grid from :func:`samplers.grid` / a user tensor of shape (N+1,) or (N+1, B).
    seed:
        an int, or one int per sample.  Sample i's noise is keyed by (seed_i, sample_index_i,
        step), so it does not depend on the batch it is drawn in (nor does the sample, with a
        batch-invariant network: docs/noise.md, "What is the same in any batch").
    sample_index:
        global sample indices (default 0 ... B-1); sharded runs pass their shard's indices.
    cond:
        keyword arguments handed to the network on every call (class labels, ...).
    final_denoise:
        after the last step, replace x by the model's x0 estimate at t_min (one more call; a
        solver's x0 hooks, such as thresholding, apply to it).  Default (``None``): on for a
        Gaussian-marginal SDE, off otherwise (an x0 estimate needs alpha and sigma).
    progress:
        show a progress bar (default: on for runs of 200+ steps on a terminal).
    callback:
        called with a :class:`StepInfo` after every step.
    dtype, device:
        dtype of the state handed to the network and returned, and the device of the run (default:
        x_T's; without x_T, the parameters' when the network is a ``torch.nn.Module`` (a float16
        module gets float16 states), else torch's default dtype and the CPU).  float16/bfloat16
        states are updated in float32 and the network gets float32 times; coefficients are always
        computed in float64.
    return_info:
        also return a :class:`SampleInfo`.
    solver_state:
        the solver's state at the grid's first time besides x_T, for solvers that carry one (the
        second state ``{"x_hat": ...}`` of :class:`solvers.Reversible`, as :func:`samplers.invert`
        returns it); default: the solver's own initial state.
    backend:
        ``"torch"`` (the solver's torch step), ``"cupy"`` (one fused CUDA kernel per step, noise drawn
        in the kernel; CUDA tensors, float32/float16/bfloat16, CuPy installed; an error otherwise) or
        ``"auto"`` (the kernels where they can run, else torch).  ``info.backend`` and
        ``info.backend_reason`` say which ran and why.  See docs/gpu.md.
    """
    start_time = time.perf_counter()
    # the plan: every check before any work (no network call, no allocation the machine cannot hold)
    cond = check_run_arguments(model, solver, cond)
    sde = model.sde
    gaussian = bool(getattr(sde, "gaussian", False))
    final_denoise = check_flag("final_denoise", final_denoise, allow_none=True)
    if final_denoise is None:
        final_denoise = gaussian
    elif final_denoise and not gaussian:
        raise ValueError(f"final_denoise=True needs a Gaussian-marginal SDE (an x0 estimate from alpha and sigma); "
                         f"{sde!r} is not one: pass final_denoise=False or None")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step_info) (a samplers.StepInfo), got "
                        f"{type(callback).__name__}")

    if (shape is None) == (x_T is None):
        raise ValueError("pass exactly one of shape (to start from the prior) or x_T (the starting state)")
    if x_T is not None:
        check_state(x_T, "x_T")
        shape = tuple(x_T.shape)
        device, device_name = (x_T.device, "x_T") if device is None else (torch.device(device), "device")
    else:
        shape = check_shape(shape)
        if device is None:
            device = network_placement(model, "device") or torch.device("cpu")
        device, device_name = torch.device(device), "device"
    batch = shape[0]
    dtype, compute = _resolve_dtypes(dtype, x_T, model)
    check_device(device, compute, device_name)
    backend, fused, backend_reason = kernels.resolve_backend(backend, solver, device, compute)

    adaptive = bool(getattr(solver, "adaptive", False))
    if adaptive:
        if steps is not None or grid_kind is not None:
            raise ValueError(f"{solver!r} chooses its own steps: pass no steps/grid_kind (grid=(t_start, t_end) "
                             "to integrate over another interval)")
        if callback is not None:
            raise ValueError(f"callback is not supported with an adaptive solver ({solver!r}): its samples do not "
                             "share steps; read info.accepted_per_sample etc. instead")
        grid = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64) if grid is None else grid
        grid_shape = tuple(torch.as_tensor(grid).shape)
        if len(grid_shape) not in (1, 2) or grid_shape[0] != 2:
            raise ValueError(f"grid: an adaptive solver takes grid=(t_start, t_end) (2 times, or (2, B)), got shape "
                             f"{grid_shape}")
    times, table_times = run_grid(sde, steps, grid, grid_kind, batch)
    n_steps = table_times.shape[0] - 1
    check_state_memory(shape, compute, device, steps=0 if adaptive else n_steps, columns=table_times.shape[1],
                       name="x_T" if x_T is not None else "shape")

    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    noise = NoiseSource(seed, batch, sample_index=sample_index)
    if x_T is not None:
        check_finite(x_T, "x_T")

    if x_T is None:
        off_prior = table_times[0] != sde.t_max
        if bool(off_prior.any()):
            j = int(torch.nonzero(off_prior)[0])
            raise ValueError(
                f"the grid starts at t={table_times[0, j].item():g}"
                f"{f' for sample {j}' if table_times.shape[1] > 1 else ''}, not at t_max={sde.t_max:g} where the "
                "prior lives: pass x_T, the state at the grid's first time"
            )
        z = noise.normal(shape[1:], counter=0, stream=STREAM_PRIOR, dtype=compute, device=device)
        x = sde.prior_sample(shape, normal=z)
    else:
        x = x_T.detach().to(device=device, dtype=compute).clone()  # the run owns (and updates) its state
    offset = _state_offset(sde, cond, x)
    if offset is not None and x_T is not None:
        x.sub_(offset)  # the prior draw already is one of y = x - mu

    if adaptive:
        cond = per_sample_cond(sde, cond, x.shape)  # the adaptive context hands the network rows of it
        result = _sample_adaptive(model, solver, x, table_times, times, cond, final_denoise, dtype, compute, device,
                                  seed, noise, return_info, start_time, offset)
        if return_info:
            result[1].backend_reason = backend_reason
        return result
    if fused is not None:
        x = x.contiguous()

    ctx = fixed_grid_context(model, solver, x, table_times, cond, noise, dtype)
    ctx.solver_state = _check_solver_state(solver, solver_state, x)
    if fused is not None:
        fused.bind(ctx, x, kernels.make_runner(x, noise))

    if final_denoise:
        p0, q0 = model.coefficients("x0", table_times[-1])
        final_x = _broadcast_table("final_denoise", p0[None], table_times[-2:], solver, x.dim(), device, compute)[0]
        final_out = _broadcast_table("final_denoise", q0[None], table_times[-2:], solver, x.dim(), device, compute)[0]

    sums = torch.empty(n_steps + 1, dtype=compute, device=device)
    bar = _progress_bar(progress, n_steps)
    record = callback is not None
    # off a Gaussian-marginal SDE there is no x0 estimate: callbacks get denoised=None
    record_denoised = record and gaussian
    if record_denoised:
        p_den, q_den = model.coefficients("x0", table_times[:-1])
    for k in range(n_steps):
        if record:
            ctx.record, ctx.first_output = True, None
            x_before = x.clone() if record_denoised else None
        x = solver.step(k, x, ctx) if fused is None else fused.step(k, x, ctx)
        # a reduction per step, kept on the device: NaN/Inf anywhere shows up in the sum
        # without a host sync; the sums are checked once, after the loop
        sums[k] = x.sum()
        if bar is not None:
            bar.update(1)
        if record:
            if record_denoised:
                shape_c = (-1,) + (1,) * (x.dim() - 1)
                denoised = (p_den[k].to(device, compute).reshape(shape_c) * x_before
                            + q_den[k].to(device, compute).reshape(shape_c) * ctx.first_output)
            else:
                denoised = None
            ctx.record = False
            if offset is not None:
                x_seen, denoised = x + offset, denoised + offset
            callback(StepInfo(step=k, steps=n_steps, t=table_times[k], t_next=table_times[k + 1],
                              x=x if offset is None else x_seen, denoised=denoised, nfe=ctx.nfe))
    if bar is not None:
        bar.close()
    if final_denoise:
        out = ctx.output(x, n_steps)
        x = _final_hooks(solver, x.mul_(final_x).addcmul_(final_out, out), table_times[-1])
    sums[n_steps] = x.sum() if final_denoise else 0.0
    bad = ~torch.isfinite(sums)
    if bool(bad.any()):  # the one host sync of the run
        k = int(torch.nonzero(bad)[0])
        # with a grid per sample, quote the times of a sample whose state is not finite (NaN stays NaN)
        j, sample_note = 0, ""
        if table_times.shape[1] > 1:
            bad_rows = ~torch.isfinite(x).reshape(batch, -1).all(dim=1)
            if bool(bad_rows.any()):
                j = int(torch.nonzero(bad_rows)[0])
                sample_note = f" for sample {j}"
        if k == n_steps:
            where = f"in the final denoising step at t={table_times[-1, j].item():g}{sample_note}"
        else:
            where = (f"at step {k} of {n_steps} (t={table_times[k, j].item():g} -> "
                     f"{table_times[k + 1, j].item():g}{sample_note})")
        raise NonFiniteError(
            f"the state became NaN or Inf {where} with {solver!r} on {sde!r}; check the network's output "
            f"there, or use more steps / a higher precision dtype"
        )
    if offset is not None:
        x = x.add_(offset)
    result = x if x.dtype == dtype else x.to(dtype)
    if not return_info:
        return result
    info = SampleInfo(nfe=ctx.nfe, steps=n_steps, times=times, seed=seed, solver=repr(solver), dtype=dtype,
                      compute_dtype=compute, final_denoise=bool(final_denoise),
                      wall_time=time.perf_counter() - start_time, backend=backend, backend_reason=backend_reason,
                      solver_state=solver.read_state(ctx, dtype) if hasattr(solver, "read_state") else None)
    return result, info


def _final_hooks(solver, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The returned x0 estimate gets the solver's x0 hooks (thresholding, correct_x0) too."""
    hooks = getattr(solver, "hooks", None)
    if hooks is None or not hooks.active:
        return x0
    return hooks.apply_at(x0, t.to(device=x0.device, dtype=x0.dtype))


def _sample_adaptive(model, solver, x, table_times, times, cond, final_denoise, dtype, compute, device, seed,
                     noise, return_info, start_time, offset=None):
    batch = x.shape[0]
    t_start = table_times[0].expand(batch).clone()
    t_end = table_times[-1].expand(batch).clone()
    ctx = _AdaptiveContext(model, cond, batch, device, compute, dtype, noise, float(t_end.min()), float(t_start.max()))
    x = solver.solve(model, x, t_start, t_end, ctx)
    everyone = torch.arange(batch)
    if final_denoise:
        p, q = ctx.coefficients("x0", t_end, x)
        x = _final_hooks(solver, x * p + ctx.output(x, t_end, everyone) * q, t_end)
    bad = ~torch.isfinite(x.reshape(batch, -1)).all(dim=1).cpu()
    if bool(bad.any()):
        raise NonFiniteError(
            f"the state of sample {int(torch.nonzero(bad)[0])} became NaN or Inf with {solver!r} on {model.sde!r}"
            f"{' (in the final denoising step)' if final_denoise else ''}; check the network's output"
        )
    if offset is not None:
        x = x + offset
    result = x if x.dtype == dtype else x.to(dtype)
    if not return_info:
        return result
    info = SampleInfo(nfe=ctx.nfe, steps=int(ctx.accepted.max()), times=times, seed=seed, solver=repr(solver),
                      dtype=dtype, compute_dtype=compute, final_denoise=bool(final_denoise),
                      wall_time=time.perf_counter() - start_time, nfe_per_sample=ctx.nfe_per_sample,
                      accepted_per_sample=ctx.accepted, rejected_per_sample=ctx.rejected)
    return result, info
