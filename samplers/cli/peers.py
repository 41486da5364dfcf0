"""Other libraries' samplers on our exact problems, for side-by-side benchmarks and agreement checks.

Every peer is optional: :func:`available_peers` lists the ones importable here and
:func:`missing_peers` says why the others are not.

- **k-diffusion**: ``k_diffusion/sampling.py`` is loaded on its own (the package's ``__init__``
  imports torchvision, PIL and safetensors for its training code); the one helper it takes from
  ``k_diffusion.utils`` (``append_dims``) is supplied here.  Its samplers integrate in the noise
  level s = sigma/alpha of the scaled state x / alpha, so they run on any Gaussian SDE: the
  denoiser D(x / alpha, s) is our model's x0 prediction at the time whose log-SNR is -log s.
- **diffusers**: schedulers built on the discrete DDPM schedule betas = linspace(1e-4, 0.02, 1000),
  which is the VP SDE (beta 0.1 -> 20) discretised at 1000 steps; run on the ``vp`` problems only.
  Their eps network is exact for the noise level the scheduler reports at each step, so the
  sampled error is the scheduler's own.
- **torchsde**: ``sdeint`` on the reverse SDE, written in a time u in [0, 1] in which the log-SNR
  is linear (so its uniform steps are our ``log_snr`` grid), then one final denoising call.

Each peer is a :class:`Peer`: a name, its library, the network calls a run of ``steps`` steps
costs, and ``run(problem, steps, x_T, seed)`` -> samples.  ``same_as`` names our solver that
implements the same algorithm, where one does (and ``same_on`` the SDEs on which it is the same
algorithm: an Euler step in s is an Euler step in t only where sigma = t, i.e. on EDM).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sde import broadcast_to_state

from ..grid import grid
from ..noise import STREAM_STEP, NoiseSource
from .registry import exact_problem

__all__ = ["Peer", "PeerProblem", "run_peers", "agreement", "load_k_diffusion_sampling", "peer_list", "available_peers", "missing_peers",
           "noise_levels", "keyed_noise_sampler"]

_F64 = torch.float64


class PeerProblem:
    """An exact problem as peers see it: our x0 model on ``sde`` and the noise-level view of it.

    ``denoise(x_scaled, s)`` is the x0 prediction at noise level s = sigma/alpha for the scaled
    state x / alpha (k-diffusion's and diffusers' convention), and counts network calls in ``nfe``.
    """

    def __init__(self, model, sde):
        self.model, self.sde = model, sde
        self.nfe = 0

    def time_of(self, s: torch.Tensor) -> torch.Tensor:
        return self.sde.t_from_log_snr(-torch.log(s.to(_F64)))

    def denoise(self, x_scaled: torch.Tensor, s) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=_F64).reshape(-1).expand(x_scaled.shape[0])
        t = self.time_of(s)
        alpha = broadcast_to_state(self.sde.alpha(t), x_scaled).to(x_scaled.dtype)
        self.nfe += 1
        return self.model.denoise(alpha * x_scaled, t.to(x_scaled.dtype) if x_scaled.dtype != _F64 else t)


def noise_levels(sde, steps: int, kind: str | None = None) -> torch.Tensor:
    """The noise levels s_k = sigma(t_k)/alpha(t_k) of our grid (``steps + 1`` times), then 0 (float64)."""
    times = grid(sde, steps, kind)
    s = sde.sigma(times) / sde.alpha(times)
    return torch.cat([s, s.new_zeros(1)])


def keyed_noise_sampler(seed, batch: int, shape, dtype=_F64) -> Callable:
    """A k-diffusion ``noise_sampler`` returning our keyed step noise: call k gets step k's draw,
    the standard normals our fixed-grid solvers use at step k."""
    source = NoiseSource(seed, batch)
    calls = [0]

    def sampler(sigma, sigma_next):
        z = source.normal(tuple(shape), counter=calls[0], stream=STREAM_STEP, dtype=dtype)
        calls[0] += 1
        return z

    return sampler


# -- k-diffusion ---------------------------------------------------------------------------------------
_KDIFF_MODULE = "_samplers_peer_k_diffusion"
_kdiff_cache: dict[str, object] = {}


def load_k_diffusion_sampling():
    """k-diffusion's ``sampling.py`` as a module, loaded without the package (None if not installed).

    The k_diffusion package imports torchvision and its training stack; ``sampling.py`` needs only
    torch, scipy, torchdiffeq, torchsde, tqdm and ``utils.append_dims``, which a stub provides.
    """
    if "module" in _kdiff_cache:
        return _kdiff_cache["module"]
    module = None
    spec = importlib.util.find_spec("k_diffusion")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "sampling.py")
        if os.path.exists(path):
            package = types.ModuleType(_KDIFF_MODULE)
            package.__path__ = []  # a package for the relative import, with nothing to find on disk
            utils = types.ModuleType(_KDIFF_MODULE + ".utils")

            def append_dims(x, target_dims):
                extra = target_dims - x.ndim
                if extra < 0:
                    raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
                return x[(...,) + (None,) * extra]

            utils.append_dims = append_dims
            package.utils = utils
            sys.modules[_KDIFF_MODULE] = package
            sys.modules[_KDIFF_MODULE + ".utils"] = utils
            file_spec = importlib.util.spec_from_file_location(_KDIFF_MODULE + ".sampling", path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[file_spec.name] = module
            try:
                file_spec.loader.exec_module(module)
            except ImportError:  # one of its own dependencies is missing
                module = None
    _kdiff_cache["module"] = module
    return module


@dataclass
class Peer:
    """One peer sampler: ``run(problem, steps, x_T, seed)`` -> samples at t = 0."""

    name: str
    library: str
    nfe: Callable[[int], int]  #: network calls of a run of ``steps`` steps (final step to s = 0 included)
    run: Callable
    stochastic: bool = False
    same_as: Callable | None = None  #: our solver implementing the same algorithm
    same_on: tuple = ()  #: SDE names on which it is the same algorithm (empty: every Gaussian SDE)
    sdes: tuple = ()  #: SDE names the peer runs on (empty: every Gaussian SDE)
    note: str = field(default="")

    @property
    def label(self) -> str:
        return f"{self.library}: {self.name}"

    def steps_for_nfe(self, budget: int) -> int:
        """The most steps whose cost fits in ``budget`` network calls (0 if none)."""
        steps = 0
        while self.nfe(steps + 1) <= budget:
            steps += 1
        return steps


def _kdiff_run(function: str, stochastic: bool, **kwargs):
    def run(problem: PeerProblem, steps: int, x_T: torch.Tensor, seed, kind=None):
        kd = load_k_diffusion_sampling()
        sigmas = noise_levels(problem.sde, steps, kind).to(x_T.dtype)
        t0 = torch.tensor([problem.sde.t_max], dtype=_F64)
        x = x_T / problem.sde.alpha(t0).to(x_T.dtype)
        extra = {}
        if stochastic:
            extra["noise_sampler"] = keyed_noise_sampler(seed, x_T.shape[0], x_T.shape[1:], x_T.dtype)
        fn = getattr(kd, function)
        return fn(problem.denoise, x, sigmas, disable=True, **kwargs, **extra)

    return run


def _kdiffusion_peers() -> list[Peer]:
    from solvers import DPMSolver, DPMSolverSDE, Euler, Heun

    one = lambda n: n + 1
    two = lambda n: 2 * n + 1
    return [
        Peer("sample_euler", "k-diffusion", one, _kdiff_run("sample_euler", False), same_as=lambda: Euler(),
             same_on=("edm",)),
        Peer("sample_heun", "k-diffusion", two, _kdiff_run("sample_heun", False), same_as=lambda: Heun(),
             same_on=("edm",)),
        Peer("sample_dpm_2", "k-diffusion", two, _kdiff_run("sample_dpm_2", False)),
        Peer("sample_lms", "k-diffusion", one, _kdiff_run("sample_lms", False)),
        Peer("sample_dpmpp_2m", "k-diffusion", one, _kdiff_run("sample_dpmpp_2m", False),
             same_as=lambda: DPMSolver(2, "x0"), note="ours lowers the last order below 10 steps"),
        Peer("sample_euler_ancestral", "k-diffusion", one, _kdiff_run("sample_euler_ancestral", True), True,
             same_as=lambda: DPMSolverSDE(1)),
        Peer("sample_dpmpp_2s_ancestral", "k-diffusion", two, _kdiff_run("sample_dpmpp_2s_ancestral", True), True),
        Peer("sample_dpmpp_2m_sde", "k-diffusion", one, _kdiff_run("sample_dpmpp_2m_sde", True), True,
             same_as=lambda: DPMSolverSDE(2), note="ours lowers the last order below 10 steps"),
        Peer("sample_dpmpp_3m_sde", "k-diffusion", one, _kdiff_run("sample_dpmpp_3m_sde", True), True,
             note="its D2 is half ours (see solvers.dpm_sde)"),
    ]


# -- diffusers -----------------------------------------------------------------------------------------
DDPM_STEPS = 1000


def _diffusers_run(cls_name: str, **config):
    def run(problem: PeerProblem, steps: int, x_T: torch.Tensor, seed, kind=None):
        import warnings

        import diffusers

        with warnings.catch_warnings():  # numpy 2 deprecation notices from the schedulers' set-up
            warnings.simplefilter("ignore", DeprecationWarning)
            return _diffusers_loop(getattr(diffusers, cls_name), config, problem, steps, x_T, seed)

    return run


def _diffusers_loop(cls, config, problem, steps, x_T, seed):
    """One scheduler run; the eps handed to ``step`` is exact at the noise level the scheduler is at."""
    sched = cls(num_train_timesteps=DDPM_STEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", **config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(int(seed))
    x = x_T.to(torch.float32) * float(getattr(sched, "init_noise_sigma", 1.0))
    ac = sched.alphas_cumprod.to(_F64)
    uses_sigmas = getattr(sched, "sigmas", None) is not None and cls.__name__ != "DDIMScheduler"
    step_kwargs = {"generator": gen} if _takes_generator(sched) else {}
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        if uses_sigmas:
            index = sched.step_index if getattr(sched, "step_index", None) is not None else i
            s = float(sched.sigmas[index])
        else:
            a2 = ac[int(t)]
            s = float(((1 - a2) / a2).sqrt())
        # x_in is the VP state alpha (x / alpha) with alpha = (1 + s^2)^-1/2: eps = (x / alpha - D) / s
        x_scaled = x_in.to(_F64) * math.sqrt(1 + s * s)
        eps = (x_scaled - problem.denoise(x_scaled, torch.tensor(s, dtype=_F64))) / s
        x = sched.step(eps.to(x.dtype), t, x, **step_kwargs).prev_sample
    return x.to(x_T.dtype)


def _takes_generator(sched) -> bool:
    import inspect

    return "generator" in inspect.signature(sched.step).parameters


def _diffusers_peers() -> list[Peer]:
    one = lambda n: n
    heun = lambda n: 2 * n - 1
    vp = ("vp",)
    return [
        Peer("EulerDiscreteScheduler", "diffusers", one, _diffusers_run("EulerDiscreteScheduler"), sdes=vp),
        Peer("HeunDiscreteScheduler", "diffusers", heun, _diffusers_run("HeunDiscreteScheduler"), sdes=vp),
        Peer("DPMSolverMultistepScheduler(2M++)", "diffusers", one,
             _diffusers_run("DPMSolverMultistepScheduler", solver_order=2, algorithm_type="dpmsolver++",
                            final_sigmas_type="zero"), sdes=vp),
        Peer("DPMSolverMultistepScheduler(3M++)", "diffusers", one,
             _diffusers_run("DPMSolverMultistepScheduler", solver_order=3, algorithm_type="dpmsolver++",
                            final_sigmas_type="zero"), sdes=vp),
        Peer("UniPCMultistepScheduler(bh2)", "diffusers", one, _diffusers_run("UniPCMultistepScheduler"), sdes=vp),
        Peer("DDIMScheduler", "diffusers", one, _diffusers_run("DDIMScheduler", set_alpha_to_one=True), sdes=vp),
        Peer("EulerAncestralDiscreteScheduler", "diffusers", one, _diffusers_run("EulerAncestralDiscreteScheduler"),
             True, sdes=vp),
        Peer("DPMSolverMultistepScheduler(sde 2M++)", "diffusers", one,
             _diffusers_run("DPMSolverMultistepScheduler", solver_order=2, algorithm_type="sde-dpmsolver++",
                            final_sigmas_type="zero"), True, sdes=vp),
    ]


# -- torchsde ------------------------------------------------------------------------------------------
class _ReverseSDEInLogSNR(torch.nn.Module):
    """The reverse SDE dx = [f x - g^2 score] dt + g dW in the time u in [0, 1], lambda(u) linear from
    lambda(t_max) to lambda(t_min): drift_u = drift_t dt/du, diffusion_u = g sqrt(-dt/du)."""

    noise_type = "diagonal"

    def __init__(self, problem: PeerProblem, sde_type: str):
        super().__init__()
        self.problem, self.sde_type = problem, sde_type
        sde = problem.sde
        ends = torch.tensor([sde.t_max, sde.t_min], dtype=_F64)
        self.lam_T, self.lam_0 = sde.log_snr(ends).tolist()

    def _time(self, u):
        sde = self.problem.sde
        lam = torch.as_tensor(self.lam_T + float(u) * (self.lam_0 - self.lam_T), dtype=_F64).reshape(1)
        t = sde.t_from_log_snr(lam)
        dlam_dt = sde.dalpha_dt(t) / sde.alpha(t) - sde.dsigma_dt(t) / sde.sigma(t)
        return t, (self.lam_0 - self.lam_T) / dlam_dt

    def f(self, u, x):
        sde = self.problem.sde
        t, dt_du = self._time(u)
        a, s = sde.alpha(t), sde.sigma(t)
        x0 = self.problem.model.denoise(x, t.expand(x.shape[0]))
        self.problem.nfe += 1
        score = (a * x0 - x) / (s * s)
        return (sde.f(t) * x - sde.g2(t) * score) * dt_du

    def g(self, u, x):
        t, dt_du = self._time(u)
        return (self.problem.sde.g2(t) * (-dt_du)).sqrt().expand_as(x).to(x.dtype)


def _torchsde_run(method: str, sde_type: str):
    def run(problem: PeerProblem, steps: int, x_T: torch.Tensor, seed, kind=None):
        import torchsde

        sde = _ReverseSDEInLogSNR(problem, sde_type)
        x = x_T.to(_F64)
        bm = torchsde.BrownianInterval(0.0, 1.0, size=x.shape, dtype=_F64, entropy=int(seed),
                                       levy_area_approximation="space-time" if method == "srk" else "none")
        ts = torch.tensor([0.0, 1.0], dtype=_F64)
        with torch.no_grad():
            # a hair over 1/steps: steps * dt rounding below 1 would add a sliver of a step (and a network call)
            xs = torchsde.sdeint(sde, x, ts, method=method, dt=(1.0 + 1e-12) / steps, bm=bm, adaptive=False)
        t_min = torch.full((x.shape[0],), problem.sde.t_min, dtype=_F64)
        problem.nfe += 1
        return problem.model.denoise(xs[-1], t_min).to(x_T.dtype)

    return run


def _torchsde_peers() -> list[Peer]:
    # network calls, counted: sdeint's contract check evaluates the drift once before it starts,
    # then euler 1 per step, srk (diagonal noise) 10 per step - 1, midpoint 2 per step - 1,
    # reversible_heun 1 per step + 1 to start; +1 for our final denoising call
    return [
        Peer("sdeint(method='euler')", "torchsde", lambda n: n + 2, _torchsde_run("euler", "ito"), True,
             note="EulerMaruyama's algorithm on a log-SNR grid, with its own Brownian path"),
        Peer("sdeint(method='srk')", "torchsde", lambda n: 10 * n + 2, _torchsde_run("srk", "ito"), True),
        Peer("sdeint(method='midpoint')", "torchsde", lambda n: 2 * n + 2, _torchsde_run("midpoint", "stratonovich"),
             True),
        Peer("sdeint(method='reversible_heun')", "torchsde", lambda n: n + 3,
             _torchsde_run("reversible_heun", "stratonovich"), True),
    ]


_LIBRARIES = {
    "k-diffusion": (lambda: load_k_diffusion_sampling() is not None, _kdiffusion_peers,
                    "pip install k-diffusion --no-deps (its sampling.py is loaded alone)"),
    "diffusers": (lambda: importlib.util.find_spec("diffusers") is not None, _diffusers_peers, "pip install diffusers"),
    "torchsde": (lambda: importlib.util.find_spec("torchsde") is not None, _torchsde_peers, "pip install torchsde"),
}


def peer_list(libraries=None) -> list[Peer]:
    """Every peer of the installed ``libraries`` (default: all of k-diffusion, diffusers, torchsde)."""
    out = []
    for name in (libraries or _LIBRARIES):
        if name not in _LIBRARIES:
            raise ValueError(f"libraries must be among {sorted(_LIBRARIES)}, got {name!r}")
        present, build, _ = _LIBRARIES[name]
        if present():
            out.extend(build())
    return out


def available_peers() -> list[str]:
    """The peer libraries importable here."""
    return [name for name, (present, _, _) in _LIBRARIES.items() if present()]


def missing_peers() -> dict[str, str]:
    """Peer library -> how to install it, for those not importable here."""
    return {name: how for name, (present, _, how) in _LIBRARIES.items() if not present()}


def run_peers(*, sde: str, problem: str, exact: torch.Tensor, budgets, samples: int, seed: int = 0,
              peers: list[Peer] | None = None, dtype=torch.float32, projections: int = 256, floor: float | None = None,
              x_T: torch.Tensor | None = None, reference: torch.Tensor | None = None,
              log: Callable[[str], None] | None = None) -> tuple[list[dict], list[tuple]]:
    """Each peer at each NFE budget on one of the demo's problems (``problem`` "2d"/"64d", ``sde`` a
    name of :data:`samplers.cli.registry.SDES`): records shaped like :func:`samplers.cli.demo.run_demo`'s (with
    ``library``), and (peer, budget, reason) for the budgets a peer cannot meet or runs that failed.
    ``nfe`` is the count of network calls the run actually made.  ``x_T``: the starting noise (default a
    draw of its own); ``reference``: the exact flow's endpoint from the first rows of x_T, for ``ref_rms``
    of deterministic peers (as :func:`samplers.cli.demo.run_demo` records it for ours)."""
    import time

    from .. import problems

    sde_obj, mixture, model = exact_problem(problem, sde)
    if x_T is None:
        gen = torch.Generator().manual_seed(int(seed) + 7)
        x_T = (torch.randn(samples, mixture.dim, generator=gen, dtype=_F64) * sde_obj.prior_std).to(dtype)
    x_T = x_T.to("cpu", dtype)
    peers = peer_list() if peers is None else peers
    records, skipped = [], []
    for peer in peers:
        if peer.sdes and sde not in peer.sdes:
            continue
        done = set()
        for budget in sorted(budgets):
            steps = peer.steps_for_nfe(budget)
            if steps < 1:
                skipped.append((peer.label, budget, f"needs more than {budget} NFE for one step"))
                continue
            if steps in done:
                continue
            done.add(steps)
            view = PeerProblem(model, sde_obj)
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    x = peer.run(view, steps, x_T, seed)
            except Exception as exc:
                skipped.append((peer.label, budget, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
                continue
            elapsed = time.perf_counter() - start
            x = x.detach().to("cpu", _F64)
            finite = bool(torch.isfinite(x).all())
            rec = {"solver": peer.label, "library": peer.library, "budget": budget, "nfe": view.nfe, "steps": steps,
                   "sw": problems.sliced_wasserstein(x, exact, projections=projections, seed=seed) if finite
                   else float("inf"),
                   **(problems.mode_error(x, mixture) if finite else {"mode_error": math.inf, "weight_tv": 1.0}),
                   "ref_rms": problems.rms_distance(x[:reference.shape[0]], reference)
                   if reference is not None and finite and not peer.stochastic else None,
                   "time_ms": 1e3 * elapsed, "stochastic": peer.stochastic, "sde": sde, "problem": problem,
                   "samples": samples, "sw_floor": floor}
            records.append(rec)
            if log is not None:
                log(f"{peer.label:<52} {rec['nfe']:>5d} {steps:>6d} {rec['sw']:>10.4f} {rec['time_ms']:>9.1f}")
    return records, skipped


def agreement(peer: Peer, sde: str = "edm", steps: int = 20, batch: int = 64, seed: int = 0, problem: str = "2d",
              kind: str | None = None) -> float:
    """max |ours - peer| / max |peer| in float64 for a peer with a ``same_as`` solver, from the same
    x_T on the same grid (``kind``, default the SDE's own) with the same keyed step noise."""
    from ..sample import sample

    if peer.same_as is None:
        raise ValueError(f"{peer.label} has no counterpart among our solvers (same_as is None)")
    if peer.same_on and sde not in peer.same_on:
        raise ValueError(f"{peer.label} is the same algorithm as ours only on {peer.same_on}, got sde={sde!r}")
    sde_obj, mixture, model = exact_problem(problem, sde)
    gen = torch.Generator().manual_seed(int(seed) + 11)
    x_T = torch.randn(batch, mixture.dim, generator=gen, dtype=_F64) * sde_obj.prior_std
    ours = sample(model, peer.same_as(), x_T=x_T, grid=grid(sde_obj, steps, kind), seed=seed, dtype=_F64)
    with torch.no_grad():
        theirs = peer.run(PeerProblem(model, sde_obj), steps, x_T, seed, kind)
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()
