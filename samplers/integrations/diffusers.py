"""diffusers integration: its networks as a :class:`samplers.Model`, our solvers as its scheduler.

* :func:`from_diffusers` ``(network, scheduler) -> Model``: the SDE from the scheduler's own tables
  (:class:`sde.DiscreteVPSDE` from ``alphas_cumprod``; flow-matching schedulers as
  :class:`sde.RectifiedFlowSDE`), what the network predicts (``prediction_type``), its timestep
  convention, and diffusers' output objects unwrapped (``.sample``).
* :class:`SolverScheduler`: any fixed-grid solver as a diffusers scheduler, for unmodified pipelines:
  ``pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver=ERSDE(3))``.
  ``num_inference_steps=N`` is N network calls; ``timesteps`` lists every call in order (two per step
  for Heun, Restart's extra passes, ...).  The pipeline's loop drives one ordinary :func:`samplers.sample`
  run, so the result is the one ``sample()`` gives on the same starting noise and grid.
* :func:`diffusers_grid` and :func:`equivalent_solver`: reproduce a diffusers scheduler with ``sample()``
  (its timesteps as our grid, its last step to sigma = 0 as our final denoising step).

How a pipeline's loop drives a run.  A solver's step may call the network several times with states
it computes in between (Heun, Restart, a corrector), which a scheduler's ``step(model_output, t, x)``
cannot express as one formula.  So the run is an ordinary ``sample()`` call in a worker thread whose
network hands each call's state to the pipeline (``prev_sample``) and waits for the pipeline's next
``step`` to bring the network's output.  The threads never run at the same time (each waits for the
other through a queue), so the run is the same computation as ``sample()``'s, bit for bit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from sde import DiscreteVPSDE, GaussianSDE, RectifiedFlowSDE
from solvers import AdaptiveSolver, DPMSolver, Solver, SolverBase, UniPC

from ..grid import GRID_KINDS
from ..grid import grid as make_grid
from ..model import Model
from ..sample import sample

__all__ = ["from_diffusers", "SolverScheduler", "DiffusersNetwork", "diffusers_grid", "equivalent_solver",
           "diffusers_timesteps", "DIFFUSERS_SPACINGS", "PREDICTION_TYPES", "SolverSchedulerOutput"]

#: diffusers' ``prediction_type`` -> our ``Model(predicts=...)``
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}
#: diffusers' ``timestep_spacing`` values (DDPM/DDIM/Euler formulas: :func:`diffusers_timesteps`)
DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# the model


class DiffusersNetwork(torch.nn.Module):
    """A diffusers network (``UNet2DModel``, ``UNet2DConditionModel``, a transformer, or any callable
    ``network(x, timestep, **kwargs)``) as ``net(x, t, **cond) -> tensor``: diffusers' output objects
    (``.sample``) and tuples (``return_dict=False``) are unwrapped.  A module is registered as a
    submodule, so ``sample()`` finds its dtype and device."""

    def __init__(self, network: Callable):
        super().__init__()
        if not callable(network):
            raise TypeError(f"network must be callable as network(x, timestep, **kwargs), got "
                            f"{type(network).__name__}")
        self.network = network

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        out = self.network(x, t, **cond)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "sample"):
            return out.sample
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise TypeError(f"the network returned {type(out).__name__}; expected a tensor, an output object with "
                        "a .sample tensor, or a tuple whose first element is one")


@dataclass(frozen=True)
class _Convention:
    """What a diffusers scheduler config says about the network: its SDE, prediction and time input."""

    sde: GaussianSDE
    predicts: str
    time_input: str | Callable
    to_sde_time: Callable[[torch.Tensor], torch.Tensor]  #: the network's timestep -> SDE time
    shift: float  #: flow matching's time shift (1: none), applied to grids
    flow: bool
    num_train_timesteps: int


def _config_dict(scheduler_or_config) -> dict:
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not hasattr(config, "get"):
        raise TypeError(f"scheduler must be a diffusers scheduler or its config (a dict), got "
                        f"{type(scheduler_or_config).__name__}")
    config = dict(config)
    if config is not scheduler_or_config and hasattr(scheduler_or_config, "config"):
        config.setdefault("_class_name", type(scheduler_or_config).__name__)  # an instance's config omits it
    return config


def _is_flow(config: dict) -> bool:
    # an instance's config carries no _class_name: flow-matching configs are also told by their keys (a
    # shift and no beta schedule)
    return ("FlowMatch" in str(config.get("_class_name", "")) or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction" or bool(config.get("flow"))
            or ("shift" in config and "use_dynamic_shifting" in config and "beta_start" not in config))


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow matching's time shift (SD3): t -> shift t / (1 + (shift - 1) t), a monotone map of [0, 1]."""
    return t if shift == 1.0 else shift * t / (1.0 + (shift - 1.0) * t)


def _convention(scheduler_or_config, prediction_type: str | None = None) -> _Convention:
    config = _config_dict(scheduler_or_config)
    n_train = int(config.get("num_train_timesteps", 1000))
    if _is_flow(config):
        if config.get("use_dynamic_shifting"):
            raise ValueError("scheduler: dynamic shifting (use_dynamic_shifting=True, a shift chosen per image size "
                             "from mu) is not supported; pass a scheduler config with a fixed shift")
        shift = float(config.get("shift", config.get("flow_shift", 1.0)) or 1.0)
        if not shift > 0:
            raise ValueError(f"scheduler: shift must be positive, got {shift}")
        # diffusers' flow grids reach down to sigma = shift(1 / num_train_timesteps)
        t_min = min(1.0 / n_train, float(shift_times(torch.tensor(1.0 / n_train, dtype=_F64), shift)))
        sde: GaussianSDE = RectifiedFlowSDE(t_min=t_min, t_max=1.0)
        return _Convention(sde, "velocity", lambda t: t * n_train, lambda n: torch.as_tensor(n, dtype=_F64) / n_train,
                           shift, True, n_train)
    prediction_type = prediction_type or config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES or prediction_type == "flow_prediction":
        raise ValueError(f"prediction_type must be one of 'epsilon', 'v_prediction', 'sample' for a DDPM-type "
                         f"scheduler, got {prediction_type!r}")
    alphas_cumprod = getattr(scheduler_or_config, "alphas_cumprod", None)
    if alphas_cumprod is None:
        from diffusers import DDPMScheduler

        # diffusers' own beta schedules (linear, scaled_linear, squaredcos_cap_v2, sigmoid, trained_betas,
        # rescale_betas_zero_snr), in the float32 tables its schedulers step with
        known = set(DDPMScheduler._get_init_keys(DDPMScheduler)) - {"self"}
        alphas_cumprod = DDPMScheduler(**{k: v for k, v in config.items() if k in known}).alphas_cumprod  # type: ignore[attr-defined]
    dsde = DiscreteVPSDE(alphas_cumprod=torch.as_tensor(alphas_cumprod).to(_F64))
    return _Convention(dsde, PREDICTION_TYPES[prediction_type], "discrete", dsde.t_from_timestep, 1.0, False,
                       dsde.num_timesteps)


def from_diffusers(network: Callable, scheduler, *, prediction_type: str | None = None) -> Model:
    """A :class:`samplers.Model` of a diffusers network trained with ``scheduler``'s noise schedule.

    Parameters
    ----------
    network:
        a diffusers network (``UNet2DModel``, ``UNet2DConditionModel``, ...) or any callable
        ``network(x, timestep, **kwargs)`` returning a tensor, an output object with ``.sample`` or a
        tuple.  Keyword arguments (``encoder_hidden_states``, ``class_labels``, ...) are passed through
        ``sample(..., cond={...})``.
    scheduler:
        the diffusers scheduler the network was trained with (``pipe.scheduler``), or its config.  A
        DDPM-type scheduler gives a :class:`sde.DiscreteVPSDE` on its own ``alphas_cumprod`` with the
        network fed discrete timesteps n (t = (n + 1)/N); a flow-matching scheduler gives a
        :class:`sde.RectifiedFlowSDE` (sigma = t, the network fed 1000 t) predicting the velocity
        eps - x0 (its ``shift`` acts on grids: :func:`diffusers_grid`, :class:`SolverScheduler`).
    prediction_type:
        overrides the scheduler's ``prediction_type`` ("epsilon", "v_prediction" or "sample").
    """
    convention = _convention(scheduler, prediction_type)
    return Model(DiffusersNetwork(network), convention.sde, convention.predicts, time_input=convention.time_input)


# ---------------------------------------------------------------------------------------------
# grids


def diffusers_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                        steps_offset: int = 0) -> torch.Tensor:
    """The timesteps (float64, decreasing) of diffusers' DDPM/DDIM/Euler schedulers for ``spacing``:
    "linspace" (rounded linspace(0, N-1, S)), "leading" (multiples of N // S, plus ``steps_offset``) or
    "trailing" (round(N - k N/S) - 1).  DPMSolverMultistep and UniPC use slightly different formulas:
    for those take :func:`diffusers_grid` of the scheduler itself."""
    n, s = int(num_train_timesteps), int(num_inference_steps)
    if not 1 <= s <= n:
        raise ValueError(f"num_inference_steps must be an integer in [1, {n}], got {num_inference_steps!r}")
    if spacing == "linspace":
        steps = torch.linspace(0, n - 1, s, dtype=_F64).round()
    elif spacing == "leading":
        steps = torch.arange(s, dtype=_F64) * (n // s) + int(steps_offset)
    elif spacing == "trailing":
        steps = (torch.round(torch.arange(n, 0, -n / s, dtype=_F64)[:s]) - 1).flip(0)
    else:
        raise ValueError(f"spacing must be one of {DIFFUSERS_SPACINGS}, got {spacing!r}")
    return steps.flip(0)


def equivalent_solver(scheduler) -> Solver:
    """Our solver that takes the same steps as ``scheduler`` (a diffusers scheduler instance), for
    :func:`diffusers_grid`'s grid: DPMSolverMultistep -> :class:`solvers.DPMSolver` (data form for
    "dpmsolver++", noise form for "dpmsolver"), UniPCMultistep -> :class:`solvers.UniPC`, DDIM (eta = 0) and
    EulerDiscrete -> ``DPMSolver(1)`` (an Euler step in the noise level sigma/alpha of the scaled state
    x/alpha is DDIM's step; DDIM's ``clip_sample`` is a ``correct_x0`` clamp, which equals DDIM's
    ``step(..., use_clipped_model_output=True)``: its default step mixes the clipped x0 with the unclipped
    eps, which no x0 estimate expresses).  Multistep solvers get ``lower_order_final=False``: diffusers lowers only its
    last step to sigma = 0, which is our final denoising step.  Raises ValueError for other schedulers."""
    name = type(scheduler).__name__
    config = scheduler.config
    if name == "DPMSolverMultistepScheduler":
        algorithm = config.algorithm_type
        if algorithm not in ("dpmsolver++", "dpmsolver") or config.solver_type != "midpoint":
            raise ValueError(f"equivalent_solver: DPMSolverMultistepScheduler with algorithm_type={algorithm!r}, "
                             f"solver_type={config.solver_type!r} has no equivalent here (supported: 'dpmsolver++' "
                             "or 'dpmsolver' with 'midpoint')")
        if config.solver_order == 3 or config.euler_at_final:
            raise ValueError("equivalent_solver: DPMSolverMultistepScheduler's third order and euler_at_final lower "
                             "steps other than the last; supported: solver_order 1 or 2, euler_at_final=False")
        return DPMSolver(config.solver_order, "x0" if algorithm == "dpmsolver++" else "eps", lower_order_final=False)
    if name == "UniPCMultistepScheduler":
        if config.solver_order == 3 or config.disable_corrector:
            raise ValueError("equivalent_solver: UniPCMultistepScheduler is supported with solver_order 1 or 2 and "
                             "no disabled correctors")
        return UniPC(config.solver_order, config.solver_type, "x0" if config.predict_x0 else "eps",
                     lower_order_final=False)
    if name == "DDIMScheduler":
        if config.thresholding:
            raise ValueError("equivalent_solver: DDIMScheduler with thresholding=True (dynamic thresholding) is not "
                             "supported")
        if not config.clip_sample:
            return DPMSolver(1, "x0", lower_order_final=False)
        bound = float(config.clip_sample_range)
        return DPMSolver(1, "x0", lower_order_final=False, correct_x0=lambda x0, t: x0.clamp(-bound, bound))
    if name == "EulerDiscreteScheduler":
        return DPMSolver(1, "x0", lower_order_final=False)
    raise ValueError(f"equivalent_solver: no equivalent for {name}; supported: DPMSolverMultistepScheduler, "
                     "UniPCMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler")


def diffusers_grid(scheduler, num_inference_steps: int, sde=None) -> tuple[torch.Tensor, bool]:
    """``(grid, final_denoise)``: the times at which ``scheduler`` (a diffusers scheduler instance) calls
    the network for ``num_inference_steps``, as a grid for ``sample()`` on ``sde`` (default: the SDE of
    :func:`from_diffusers`), and whether its last step goes to sigma = 0 (our final denoising step).

    A grid of one time is a single step to sigma = 0: the final denoising step alone,
    ``model.denoise(x_T, grid)``.  Calls ``scheduler.set_timesteps``.  A DDIM scheduler
    whose steps do not end where its next one starts (linspace spacing, whose timesteps are not a
    multiple of N // S apart) has no such grid: ValueError.

    With :func:`equivalent_solver` this reproduces DPMSolverMultistep, UniPCMultistep, DDIM and
    EulerDiscrete exactly (to float32 rounding) for every spacing and step count; Karras/exponential
    sigmas and EulerDiscrete's fractional linspace timesteps interpolate the schedule in sigma where
    :class:`sde.DiscreteVPSDE` interpolates log alpha, so those match to the interpolation's difference.
    """
    convention = _convention(scheduler)
    sde = convention.sde if sde is None else sde
    scheduler.set_timesteps(num_inference_steps)
    config = scheduler.config
    name = type(scheduler).__name__
    final_denoise = True
    if convention.flow:
        times = scheduler.sigmas.to(_F64)
        if float(times[-1]) != 0.0:
            raise ValueError(f"{name}: its last sigma is {float(times[-1]):g}, not 0")
        times = times[:-1]
    else:
        sigmas = getattr(scheduler, "sigmas", None)
        timesteps = scheduler.timesteps.to(_F64)
        if name == "DDIMScheduler":
            stride = config.num_train_timesteps // scheduler.num_inference_steps
            ends = timesteps - stride
            if timesteps.numel() > 1 and not bool((ends[:-1] == timesteps[1:]).all()):
                raise ValueError(f"DDIMScheduler with timestep_spacing={config.timestep_spacing!r} at "
                                 f"{num_inference_steps} steps steps from timestep n to n - {stride}, which is not "
                                 f"its next timestep ({timesteps.tolist()}): its steps do not form a grid")
            final_denoise = bool(config.set_alpha_to_one)
            if not final_denoise and float(timesteps[-1]) != 0.0:
                timesteps = torch.cat([timesteps, timesteps.new_zeros(1)])
        elif getattr(config, "final_sigmas_type", "zero") == "sigma_min":
            final_denoise = False
            if float(timesteps[-1]) != 0.0:
                timesteps = torch.cat([timesteps, timesteps.new_zeros(1)])
        elif sigmas is not None and float(sigmas[-1]) != 0.0:
            raise ValueError(f"{name}: its last sigma is {float(sigmas[-1]):g}, neither 0 nor sigma_min")
        times = sde.t_from_timestep(timesteps)
    return times, final_denoise


def _grid_for(convention: _Convention, steps: int, kind: str | None, steps_offset: int) -> torch.Tensor:
    """The grid of ``steps`` steps of the scheduler's ``grid_kind`` (ours or diffusers' spacings), with
    flow matching's shift."""
    sde = convention.sde
    if kind in DIFFUSERS_SPACINGS:
        n_train = convention.num_train_timesteps
        if convention.flow:  # FlowMatchEulerDiscrete's sigmas, before the shift
            times = torch.linspace(1.0, 1.0 / n_train, steps + 1, dtype=_F64)
        else:
            timesteps = diffusers_timesteps(n_train, steps + 1, kind, steps_offset)
            times = sde.t_from_timestep(timesteps)  # type: ignore[attr-defined]
    else:
        times = make_grid(sde, steps, kind)
    return shift_times(times, convention.shift) if convention.flow else times


# ---------------------------------------------------------------------------------------------
# the scheduler


@dataclass
class SolverSchedulerOutput(SchedulerOutput):
    """``prev_sample``: the state of the next network call (after the last call: the sample);
    ``pred_original_sample``: the x0 estimate of this call's output."""

    pred_original_sample: torch.Tensor | None = None


class _Cancelled(Exception):
    """Ends a worker run that its pipeline abandoned."""


_CANCEL = object()


class _DrivenRun:
    """One ``sample()`` run in a worker thread whose network calls are answered by ``step``."""

    def __init__(self, model_args: tuple, solver: Solver, x_T: torch.Tensor, grid: torch.Tensor,
                 final_denoise: bool, seed):
        self.requests: queue.Queue = queue.Queue(maxsize=1)
        self.replies: queue.Queue = queue.Queue(maxsize=1)
        sde, predicts, time_input = model_args
        model = Model(self._net, sde, predicts, time_input=time_input)
        self.thread = threading.Thread(target=self._work, args=(model, solver, x_T, grid, final_denoise, seed),
                                       daemon=True, name="SolverScheduler-run")
        self.thread.start()

    def _net(self, x, t, **cond):
        self.requests.put(("call", x))
        reply = self.replies.get()
        if reply is _CANCEL:
            raise _Cancelled
        return reply

    def _work(self, model, solver, x_T, grid, final_denoise, seed):
        try:
            result = sample(model, solver, x_T=x_T, grid=grid, final_denoise=final_denoise, seed=seed, progress=False)
        except _Cancelled:
            return
        except BaseException as error:  # handed to the pipeline's thread, which raises it
            self.requests.put(("error", error))
            return
        self.requests.put(("done", result))

    def next_request(self):
        kind, value = self.requests.get()
        if kind == "error":
            raise value
        return kind, value

    def answer(self, output: torch.Tensor):
        self.replies.put(output)

    def cancel(self):
        if self.thread.is_alive():
            try:
                self.replies.put_nowait(_CANCEL)
            except queue.Full:
                pass
            self.thread.join(timeout=10)


class SolverScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' own mixins disagree on config_name
    """Any fixed-grid solver of :mod:`solvers` as a diffusers scheduler, for unmodified pipelines::

        pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver=ERSDE(3))

    The SDE, prediction type and timestep convention come from the config (as in :func:`from_diffusers`).
    ``set_timesteps(N)`` plans a run of at most N network calls (the most steps whose calls, final
    denoising included, fit; Restart's extra passes count) and lists every call's timestep in
    ``timesteps``; the pipeline's ``step(model_output, t, sample)`` calls drive that run, and its
    result equals ``sample(from_diffusers(net, config), solver, x_T=<the first sample>, grid=scheduler.grid,
    final_denoise=scheduler.config.final_denoise, seed=scheduler.last_seed)``.

    Parameters (besides diffusers' schedule keys, read from the config)
    ----------
    solver:
        a fixed-grid solver (default ``DPMSolver()``); adaptive solvers are refused (their step times
        depend on the network's outputs, so the timesteps cannot be listed before the loop).  Not stored
        in the config: pass it to ``from_config`` / the constructor again after loading.
    grid_kind:
        our grid kinds (``"uniform"``, ``"log_snr"``, ``"karras"``, ``"quadratic"``; None: the SDE's
        default) or diffusers' spacings ``"linspace"``, ``"leading"``, ``"trailing"`` (DDIM's formulas).
        A flow-matching config's ``shift`` is applied to either.
    seed:
        the key of a stochastic solver's noise; None (default): drawn from the ``generator`` the
        pipeline passes to ``step`` (one per sample for a list of generators), else from torch's global
        generator.  ``last_seed`` holds the one used.
    final_denoise:
        end with the model's x0 estimate at the last time (one call), as diffusers' final step to sigma = 0.

    The pipeline may replace the state between calls (``callback_on_step_end`` returning new latents):
    the next call's state is taken from the ``sample`` it passes.  For img2img, ``add_noise`` noises to
    any listed timestep and a loop that starts later (``set_begin_index`` or its first ``step``'s
    timestep) runs the grid from there; it must be the first call of a step.
    """

    order = 1
    ignore_for_config = ["solver"]  # noqa: RUF012 - diffusers' mixins declare these as plain class lists
    _compatibles: list = []  # noqa: RUF012

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Sequence[float] | None = None,
                 prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False, steps_offset: int = 0,
                 flow: bool = False, shift: float = 1.0, grid_kind: str | None = None, seed: int | None = None,
                 final_denoise: bool = True, solver: SolverBase | None = None):
        if grid_kind is not None and grid_kind not in GRID_KINDS + DIFFUSERS_SPACINGS:
            raise ValueError(f"grid_kind must be None, one of our grid kinds {GRID_KINDS} or one of diffusers' "
                             f"spacings {DIFFUSERS_SPACINGS}, got {grid_kind!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self._convention = _convention(dict(self.config))
        self.solver = self._checked_solver(DPMSolver() if solver is None else solver)
        self.init_noise_sigma = float(self._convention.sde.prior_std)
        self.timesteps = torch.zeros(0)
        self.num_inference_steps: int | None = None
        self.grid: torch.Tensor | None = None
        self.last_seed: Any = None
        self._call_times = torch.zeros(0, dtype=_F64)
        self._step_starts: list[int] = []
        self._run: _DrivenRun | None = None
        self._calls_made = 0
        self._begin_index: int | None = None
        self._pending: torch.Tensor | None = None
        self._returned: torch.Tensor | None = None
        # converts the outputs the pipeline hands to step into x0 estimates (pred_original_sample)
        self._converter = Model(lambda x, t: x, self.sde, self._convention.predicts)

    @staticmethod
    def _checked_solver(solver) -> Solver:
        if isinstance(solver, AdaptiveSolver):
            raise ValueError(f"solver: {solver!r} is adaptive: it chooses its step times from the network's outputs "
                             "as it goes, so the timesteps a pipeline loops over cannot be listed in advance; use "
                             "sample(from_diffusers(network, scheduler), solver, ...) instead")
        if not isinstance(solver, Solver):
            raise TypeError(f"solver must be a fixed-grid solver from solvers (DPMSolver(), ERSDE(), Heun(), ...), "
                            f"got {type(solver).__name__}")
        solver.check_implemented()
        return solver

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config`` with ``solver=`` (not part of the config) and ``flow`` read from the
        config's scheduler class (FlowMatch*)."""
        solver = kwargs.pop("solver", None)
        if config is not None and "flow" not in kwargs:
            kwargs["flow"] = _is_flow(_config_dict(config))
        made = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = made[0] if return_unused_kwargs else made
        if solver is not None:
            scheduler.solver = cls._checked_solver(solver)
        return made

    @property
    def sde(self) -> GaussianSDE:
        return self._convention.sde

    @property
    def step_index(self) -> int:
        """The network calls answered so far in the current run."""
        return self._calls_made

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at call ``begin_index`` of ``timesteps`` (img2img), which must begin a step."""
        self._begin_index = int(begin_index)

    # -- planning ------------------------------------------------------------------------------

    def _dry_run(self, grid: torch.Tensor) -> tuple[list[float], list[int]]:
        """The SDE time of every network call of a run on ``grid``, and the call index at which each step
        starts (a run on a one-element state with a network that answers zeros: the times of a fixed-grid
        solver's calls do not depend on the network's outputs)."""
        times: list[float] = []
        starts: list[int] = [0]

        def recorder(x, t, **cond):
            times.append(float(t.reshape(-1)[0]))
            return torch.zeros_like(x)

        model = Model(recorder, self.sde, self._convention.predicts)
        sample(model, self.solver, x_T=torch.zeros(1, 1, dtype=_F64), grid=grid,
               final_denoise=self.config["final_denoise"], seed=0, progress=False,
               callback=lambda info: None if info.final else starts.append(info.nfe))
        return times, starts

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *, timesteps=None, sigmas=None,
                      grid: torch.Tensor | None = None, **kwargs) -> None:
        """Plan a run of at most ``num_inference_steps`` network calls (or on an explicit ``grid`` of SDE
        times) and list each call's timestep in ``timesteps``."""
        if timesteps is not None or sigmas is not None:
            raise ValueError("set_timesteps: custom timesteps/sigmas are not supported; pass grid= (SDE times, "
                             "decreasing) or num_inference_steps")
        if kwargs.get("mu") is not None:
            raise ValueError("set_timesteps: mu (dynamic shifting) is not supported; the config's shift is used")
        self._end_run()
        final_denoise = bool(self.config["final_denoise"])
        if grid is not None:
            grid = torch.as_tensor(grid, dtype=_F64).reshape(-1)
            calls, starts = self._dry_run(grid)
        else:
            if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
                    or num_inference_steps < 1):
                raise ValueError(f"num_inference_steps must be a positive int (network calls), got "
                                 f"{num_inference_steps!r}")
            steps = self.solver.steps_for_nfe(num_inference_steps, final_denoise)
            calls, starts = [], [0]
            while steps >= 1:
                grid = _grid_for(self._convention, steps, self.config["grid_kind"], self.config["steps_offset"])
                calls, starts = self._dry_run(grid)
                if len(calls) <= num_inference_steps:
                    break
                steps -= 1
            if steps < 1:
                if not final_denoise:
                    raise ValueError(f"num_inference_steps={num_inference_steps} does not pay for one step of "
                                     f"{self.solver!r} ({self.solver.nfe_per_step} calls)")
                # the final denoising step alone, from the start of the SDE's grid
                grid = _grid_for(self._convention, 1, self.config["grid_kind"], self.config["steps_offset"])[:1]
                calls, starts = [float(grid[0])], [0]
        self.grid = grid
        self._call_times = torch.tensor(calls, dtype=_F64)
        self._step_starts = starts
        net_times = self._net_times(self._call_times)
        self.timesteps = net_times.to(device=device)
        self.num_inference_steps = len(calls)
        self._begin_index = None

    def _net_times(self, times: torch.Tensor) -> torch.Tensor:
        time_input = self._convention.time_input
        net = self.sde.timestep(times) if time_input == "discrete" else time_input(times)  # type: ignore
        return net.to(torch.float32)

    # -- the loop ------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network takes the state as it is (no sigma scaling): ``sample`` unchanged."""
        return sample

    def _call_index(self, timestep) -> int:
        if self._begin_index is not None:
            return self._begin_index
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        matches = torch.nonzero(self.timesteps.cpu().to(_F64) == value)
        if matches.numel() == 0:
            raise ValueError(f"step: timestep {value:g} is not one of the scheduler's timesteps; call set_timesteps "
                             "first and loop over scheduler.timesteps")
        return int(matches[0])

    def _start_run(self, timestep, sample_: torch.Tensor, generator) -> None:
        if self.grid is None:
            raise RuntimeError("step: call set_timesteps before the first step")
        index = self._call_index(timestep)
        if index not in self._step_starts:
            raise ValueError(f"step: a run cannot start at call {index} of {len(self._call_times)}: it is inside a "
                             f"step of {self.solver!r} (steps start at calls {self._step_starts})")
        k = self._step_starts.index(index)
        self.last_seed = self._seed(generator, sample_.shape[0])
        self._calls_made = index
        if k == len(self._step_starts) - 1 and self.config["final_denoise"]:
            self._run = None  # the final denoising step alone
            self._pending = sample_
            return
        grid = self.grid[k:]
        args = (self.sde, self._convention.predicts, self._convention.time_input)
        self._run = _DrivenRun(args, self.solver, sample_, grid, bool(self.config["final_denoise"]), self.last_seed)
        kind, value = self._run.next_request()
        if kind != "call":
            raise RuntimeError("the run ended before its first network call")
        self._pending = value

    def _seed(self, generator, batch: int):
        if self.config["seed"] is not None:
            return self.config["seed"]
        if not self.solver.stochastic:
            return 0

        def draw(g):
            device = g.device if g is not None else "cpu"
            return int(torch.randint(0, 2**62, (1,), generator=g, device=device).item())

        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {batch}")
            return [draw(g) for g in generator]
        return draw(generator)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs):
        """Hand the network's output for the current call to the run; ``prev_sample`` is the state of the
        next call (after the last: the sample).  Other schedulers' keyword arguments that pipelines pass
        (DDIM's ``use_clipped_model_output``, ``eta=0``) are accepted; a nonzero ``eta`` is refused."""
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("step: model_output and sample must be tensors")
        if kwargs.get("eta") not in (None, 0, 0.0):
            raise ValueError(f"step: eta={kwargs['eta']!r} (DDIM's noise) is not an option of this scheduler: the "
                             "solver decides its noise (a stochastic solver such as ERSDE() or DPMSolverSDE(eta=...))")
        if self._pending is None:
            self._start_run(timestep, sample, generator)
        elif sample is not self._returned and not torch.equal(sample.to(self._pending.dtype), self._pending):
            self._pending.copy_(sample)  # the pipeline replaced the state (callback_on_step_end)
        pending = self._pending
        assert pending is not None
        t_call = self._call_times[min(self._calls_made, len(self._call_times) - 1)].reshape(1)
        out = model_output.to(pending.dtype)
        denoised = self._converter.predict("x0", pending, t_call, output=out)
        self._calls_made += 1
        if self._run is None:  # the final denoising step alone
            prev = denoised.to(sample.dtype)
            self._pending = None
        else:
            self._run.answer(out)
            kind, value = self._run.next_request()
            if kind == "done":
                prev = value.to(sample.dtype)
                self._pending, self._run = None, None
                self._begin_index = None
            else:
                self._pending = value
                prev = value.to(sample.dtype, copy=True)  # the run updates its state in place
        self._returned = prev
        if not return_dict:
            return (prev, denoised)
        return SolverSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise at the network timesteps ``timesteps`` (one, or one per sample)."""
        t = self._convention.to_sde_time(torch.as_tensor(timesteps, dtype=_F64).reshape(-1).cpu())
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        alpha = self.sde.alpha(t).to(original_samples.device, original_samples.dtype).reshape(shape)
        sigma = self.sde.sigma(t).to(original_samples.device, original_samples.dtype).reshape(shape)
        return alpha * original_samples + sigma * noise

    def _end_run(self) -> None:
        if self._run is not None:
            self._run.cancel()
        self._run, self._pending, self._returned, self._calls_made = None, None, None, 0

    def __len__(self) -> int:
        return int(self.config["num_train_timesteps"])
