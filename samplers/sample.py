"""The sampling driver's entry point: ``sample()`` = plan -> integrate (fixed grid or adaptive) -> finish.

The three phases live in :mod:`samplers.driver`, where :func:`samplers.invert`, :func:`samplers.sample_grad`
and :func:`samplers.likelihood` share them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sde.validation import check_flag
from solvers import AdaptiveSolver, SolverBase

from .driver import (
    STOP,
    AdaptiveRun,
    FixedGridRun,
    NonFiniteError,
    StepInfo,
    builds_no_graph,
    callback_state,
    check_run_arguments,
    finish,
    fixed_grid_context,
    noise_level,
    per_sample_cond,
    plan_run,
)
from .grid import grid_for_nfe
from .model import Model

__all__ = ["sample", "SampleInfo", "StepInfo", "STOP", "NonFiniteError", "builds_no_graph", "fixed_grid_context",
           "per_sample_cond"]


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


@builds_no_graph
def sample(model: Model, solver: SolverBase, *, shape=None, x_T: torch.Tensor | None = None, steps: int | None = None,
           grid=None, nfe: int | None = None, grid_kind: str | None = None, seed=0, sample_index=None,
           cond: dict | None = None, final_denoise: bool | None = None, progress: bool | None = None,
           callback: Callable[[StepInfo], None] | None = None, dtype: torch.dtype | None = None, device=None,
           return_info: bool = False, solver_state: dict | None = None, backend: str = "auto", generator=None,
           noise: str = "step"):
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
    nfe:
        instead of steps or grid: a budget of network calls, spent on the grid the library recommends
        for it (:func:`samplers.grid_for_nfe`: on an SDE that reaches sigma = 0, a grid ending there, so
        no call goes to a final denoising step, spaced as measured best at 4-10 calls).  ``info.nfe`` is
        at most ``nfe`` (exactly ``nfe`` for one-call-per-step solvers).
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
        show a progress bar (default: on when stderr is a terminal).
    callback:
        called with a :class:`StepInfo` after every step and after the final denoising step
        (``info.final``); ``info.t`` is the time and ``info.sigma`` the noise level sigma/alpha.  It may
        return a new state (a tensor, copied into the run, as diffusers' ``callback_on_step_end``) or
        :data:`samplers.STOP` to end the run after that step (the state reached is returned, without the
        final denoising step; ``info.steps`` of ``return_info`` counts the steps taken).
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
    generator:
        a ``torch.Generator`` (or one per sample) that draws the prior sample of a run started from
        ``shape``, as diffusers pipelines draw their starting noise (``randn_tensor``: in ``dtype``, on the
        generator's device), instead of the keyed prior draw; the solver's step noise stays keyed by ``seed``
        (docs/noise.md).
    backend:
        ``"torch"`` (the solver's torch step), ``"cupy"`` (one fused CUDA kernel per step, noise drawn
        in the kernel; CUDA tensors, float32/float16/bfloat16, CuPy installed; an error otherwise) or
        ``"auto"`` (the kernels where they can run, else torch).  ``info.backend`` and
        ``info.backend_reason`` say which ran and why.  See docs/gpu.md.
    noise:
        how a fixed-grid stochastic solver takes its noise: ``"step"`` (default; a keyed draw per step,
        keyed by the step index) or ``"path"`` (the increments of one keyed Brownian path per sample in the
        solver's own clock, so the same seed at 20 and 40 steps integrates the same path and gives the same
        sample, only more accurate; not with the fused kernels, which ``"auto"`` then skips).  Adaptive
        solvers always integrate a Brownian path.  See docs/noise.md, "One Brownian path at any step count".
    """
    final_denoise = check_flag("final_denoise", final_denoise, allow_none=True)
    return_info = check_flag("return_info", return_info)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step_info) (a samplers.StepInfo), got "
                        f"{type(callback).__name__}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if nfe is not None:
        if steps is not None or grid is not None or grid_kind is not None:
            raise ValueError("pass one of steps, grid or nfe (nfe chooses the steps and the grid, so no grid_kind)")
        check_run_arguments(model, solver, cond)
        grid = grid_for_nfe(model.sde, solver, nfe, final_denoise=final_denoise)
    plan = plan_run(model, solver, x=x_T, shape=shape, steps=steps, grid=grid, grid_kind=grid_kind, seed=seed,
                    sample_index=sample_index, cond=cond, dtype=dtype, device=device, final_denoise=final_denoise,
                    backend=backend, generator=generator, noise_mode=noise)
    run: FixedGridRun | AdaptiveRun
    if isinstance(solver, AdaptiveSolver):
        if callback is not None:
            raise ValueError(f"callback is not supported with an adaptive solver ({solver!r}): its samples do not "
                             "share steps; read info.accepted_per_sample etc. instead")
        if solver_state is not None:
            raise ValueError(f"solver_state: {solver!r} carries no state besides x")
        run = AdaptiveRun(plan)
    else:
        run = FixedGridRun(plan, solver_state=solver_state, progress=progress, callback=callback)
    x = run.integrate()
    stopped_after = getattr(run, "stopped_after", None)
    if stopped_after is not None:
        plan = dataclasses.replace(plan, final_denoise=False)  # the run ends where the callback stopped it
    result = finish(plan, run, x)
    if callback is not None and plan.final_denoise and isinstance(run, FixedGridRun):
        result = _final_callback(callback, plan, run, result)
    if not return_info:
        return result
    run_info = run.info()
    if stopped_after is not None:
        run_info["steps"] = stopped_after
    return result, SampleInfo(times=plan.times, seed=seed, solver=repr(solver), dtype=plan.dtype,
                              compute_dtype=plan.compute, final_denoise=plan.final_denoise and not plan.ends_at_zero,
                              wall_time=time.perf_counter() - plan.start_time, backend=plan.backend,
                              backend_reason=plan.backend_reason, **run_info)


def _final_callback(callback: Callable, plan, run: FixedGridRun, result: torch.Tensor) -> torch.Tensor:
    """The callback after the final denoising step: ``x`` and ``denoised`` are the sample; a returned tensor
    replaces it (:data:`STOP` changes nothing: the run has ended)."""
    t_end = plan.table_times[-1]
    level = noise_level(plan.sde, t_end)
    returned = callback(StepInfo(step=plan.n_steps, steps=plan.n_steps, t=t_end, t_next=t_end, x=result,
                                 denoised=result, nfe=run.ctx.nfe, sigma=level,
                                 sigma_next=None if level is None else torch.zeros_like(level), final=True))
    callback_state(returned, result, plan.n_steps)
    return result
