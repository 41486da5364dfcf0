"""The SDEs, solvers and exact problems the commands run, by name: one table that every command shares.

``demo``, ``bench`` (quality, overhead, traffic, convergence, kernels, gpu), ``sample`` and the peers'
adapters look their SDEs, solver lists and test problems up here, so a solver added to the library
(or a variant added below) is run by every command, and no command imports another for its data.
Solver lists are functions, built on call: importing this module constructs no solver.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import solvers
from sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, RectifiedFlowSDE, SubVPSDE
from solvers import Euler, EulerMaruyama, Heun, SolverBase

from ..model import Model

__all__ = [
    "SDES",
    "PROBLEMS",
    "exact_problem",
    "ORDER_MIXTURE",
    "EXTRA_SOLVERS",
    "solver_factories",
    "QUALITY_VARIANTS",
    "quality_solvers",
    "steps_for_nfe",
    "SOLVER_NAMES",
    "ADAPTIVE_SOLVER_NAMES",
    "solver_by_name",
    "KERNEL_BENCH_SOLVERS",
    "kernel_agreement_solvers",
    "sync_solvers",
]

# -- SDEs and problems ---------------------------------------------------------------------------------

#: the SDEs the commands run on, by their command-line name
SDES: dict[str, Callable] = {
    "vp": VPSDE,
    "ve": VESDE,
    "edm": EDMSDE,
    "subvp": SubVPSDE,
    "cosine": CosineVPSDE,
    "rf": RectifiedFlowSDE,
}

#: the built-in exact problems, by name: the function of samplers.problems that builds each
PROBLEMS = {"2d": "mixture_2d", "8d": "mixture_widths", "16w": "mixture_weights", "64d": "mixture_64d"}


def exact_problem(problem: str, sde: str):
    """(SDE, mixture, Model of its exact x0 network) of a built-in problem name and SDE name."""
    from .. import problems

    sde_obj = SDES[sde]()
    mixture = getattr(problems, PROBLEMS[problem])()
    return sde_obj, mixture, Model(mixture.net(sde_obj, "x0"), sde_obj, predicts="x0")


def ORDER_MIXTURE():
    """The smooth three-component 2-D mixture the pathwise order measurements use."""
    from ..problems import GaussianMixture

    return GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.0, 1.5]], stds=[0.4, 0.5, 0.3], weights=[0.3, 0.5, 0.2])


# -- solvers: every one the library exports, and variants ---------------------------------------------

#: solvers run besides those that construct from ``solvers.__all__`` with no arguments;
#: add a (label or None, factory) pair here for a parametrised variant.  The label defaults
#: to the solver's repr; a solver whose repr is already in the list is not run twice.
EXTRA_SOLVERS: list[tuple[str | None, Callable[[], SolverBase]]] = [
    (None, lambda: EulerMaruyama(eta=1.0)),
    (None, lambda: Euler()),
    (None, lambda: Heun()),
    (None, lambda: Heun(eta=1.0)),
]

_BASE_NAMES = ("SolverBase", "Solver", "StepContext")


def _constructs_without_arguments(cls) -> bool:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())


def solver_factories() -> list[tuple[str, Callable[[], SolverBase]]]:
    """(label, factory) for every solver the demo runs.

    Every :class:`solvers.Solver` subclass exported by ``solvers.__all__`` that constructs with
    no arguments (its defaults) and accepts the Gaussian-marginal SDEs the demo samples (a
    solver made for one other SDE family, such as the Dirichlet one, is left out), then
    :data:`EXTRA_SOLVERS`; labels are the solvers' reprs (``Heun(eta=0)``), and duplicates are
    dropped.
    """
    gaussian = VPSDE()
    candidates: list[tuple[str | None, Callable[[], SolverBase]]] = []
    for name in getattr(solvers, "__all__", []):
        if name in _BASE_NAMES:
            continue
        obj = getattr(solvers, name, None)
        if not (isinstance(obj, type) and issubclass(obj, SolverBase)) or inspect.isabstract(obj):
            continue
        if _constructs_without_arguments(obj):
            candidates.append((None, obj))
    candidates.extend(EXTRA_SOLVERS)

    out: list[tuple[str, Callable[[], SolverBase]]] = []
    seen: set[str] = set()
    for label, factory in candidates:
        # a solver whose defaults do not construct is a bug to see, not a solver to leave out quietly
        solver = factory()
        try:
            solver.check_sde(gaussian)
        except ValueError:
            continue
        label = label or repr(solver)
        if label in seen:
            continue
        seen.add(label)
        out.append((label, factory))
    return out


def _variants():
    from solvers import ERSDE, AdaptiveDPMSolver, DPMSolver, DPMSolverSDE, Restart, UniPC

    out = [
        (None, lambda: DPMSolver(3)),
        (None, lambda: DPMSolver(2, "eps")),
        (None, lambda: DPMSolver(2, variant="singlestep")),
        (None, lambda: DPMSolver(3, variant="singlestep")),
        (None, lambda: AdaptiveDPMSolver((1, 2))),
        (None, lambda: DPMSolverSDE(2, "heun")),
        (None, lambda: DPMSolverSDE(3)),
        (None, lambda: UniPC(1)),
        (None, lambda: UniPC(3)),
        (None, lambda: UniPC(2, "bh1")),
        # lower_order_final both ways, the measurement behind its default None (docs/choosing-a-solver.md,
        # "Few network calls"): on grids ending at t_min None is True, on grids ending at sigma = 0 False
        (None, lambda: UniPC(2, lower_order_final=False)),
        (None, lambda: UniPC(2, lower_order_final=True)),
        (None, lambda: DPMSolver(2, lower_order_final=False)),
        (None, lambda: DPMSolver(2, lower_order_final=True)),
        (None, lambda: DPMSolverSDE(2, lower_order_final=False)),
        (None, lambda: DPMSolverSDE(2, lower_order_final=True)),
        (None, lambda: ERSDE(1)),
        (None, lambda: ERSDE(2)),
        (None, lambda: ERSDE(3, "ode")),
        ("Restart.preset('cifar10_vp')", lambda: Restart.preset("cifar10_vp")),
        ("Restart.preset('cifar10_vp', DPMSolver(2))", lambda: Restart.preset("cifar10_vp", DPMSolver(2))),
    ]
    return out


#: parametrised solvers the quality benchmark runs besides the demo's list: (label or None, factory)
QUALITY_VARIANTS = _variants


def quality_solvers():
    """:func:`solver_factories` plus :data:`QUALITY_VARIANTS`, without duplicates (labels are reprs):
    what ``bench quality`` and ``bench convergence`` run."""
    out = list(solver_factories())
    seen = {label for label, _ in out}
    for label, factory in QUALITY_VARIANTS():
        label = label or repr(factory())
        if label not in seen:
            seen.add(label)
            out.append((label, factory))
    return out


def steps_for_nfe(solver: SolverBase, nfe: int, final_denoise: bool = True) -> int:
    """The most steps whose network calls fit in ``nfe``: the solver's own rule
    (:meth:`solvers.SolverBase.steps_for_nfe`); 0 when not even one step fits."""
    return solver.steps_for_nfe(nfe, final_denoise)


# -- the sample command's solver names -----------------------------------------------------------------

def _named_solvers():
    import solvers as s

    return {
        "em": lambda: s.EulerMaruyama(),
        "euler": lambda: s.Euler(),
        "heun": lambda: s.Heun(),
        "dpm++2m": lambda: s.DPMSolver(2),
        "dpm++3m": lambda: s.DPMSolver(3),
        "sde-dpm++2m": lambda: s.DPMSolverSDE(2),
        "unipc": lambda: s.UniPC(),
        "ersde": lambda: s.ERSDE(),
        "evodiff": lambda: s.EVODiff(),
        "pc": lambda: s.PredictorCorrector(),
        "restart": lambda: s.Restart(),
        "adaptive-em": lambda **kw: s.AdaptiveEM(**kw),
        "adaptive-dpm": lambda **kw: s.AdaptiveDPMSolver(**kw),
        "adaptive-ode": lambda **kw: s.AdaptiveODE(**kw),
    }


#: the solver names of ``python -m samplers sample --solver`` (constructed by :func:`solver_by_name`)
SOLVER_NAMES = ("em", "euler", "heun", "dpm++2m", "dpm++3m", "sde-dpm++2m", "unipc", "ersde", "evodiff", "pc",
                "restart", "adaptive-em", "adaptive-dpm", "adaptive-ode")
#: the named solvers that choose their own steps (take rtol/atol, no steps)
ADAPTIVE_SOLVER_NAMES = ("adaptive-em", "adaptive-dpm", "adaptive-ode")


def solver_by_name(name: str, rtol: float | None = None, atol: float | None = None):
    """The solver of a name in :data:`SOLVER_NAMES` (rtol/atol only for the adaptive ones)."""
    table = _named_solvers()
    if name not in table:
        raise ValueError(f"--solver must be one of {', '.join(SOLVER_NAMES)}, got {name!r}")
    if name in ADAPTIVE_SOLVER_NAMES:
        kw = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
        return table[name](**kw)
    return table[name]()


# -- the fused CUDA kernels' checks --------------------------------------------------------------------

def KERNEL_BENCH_SOLVERS():
    """The solvers ``bench kernels`` times (and ``bench gpu``'s bandwidth section, with Euler)."""
    from solvers import ERSDE, DPMSolver, DPMSolverSDE, EulerMaruyama, Heun

    return [EulerMaruyama(), Heun(eta=1.0), DPMSolver(2), DPMSolver(3), DPMSolverSDE(2), ERSDE(3)]


def kernel_agreement_solvers():
    """One solver per fused-step path (every kernel of euler.cu and multistep.cu is launched)."""
    from solvers import ERSDE, DPMSolver, DPMSolverSDE, Euler, EulerMaruyama, Heun

    return [EulerMaruyama(), Euler(), Heun(), Heun(eta=1.0), DPMSolver(1), DPMSolver(2), DPMSolver(3),
            DPMSolver(2, predicts="eps"), DPMSolverSDE(2), DPMSolverSDE(3, variant="heun"), ERSDE(1), ERSDE(3)]


def sync_solvers():
    """The solvers ``bench gpu`` checks for host synchronisations inside the sampling loop."""
    from solvers import ERSDE, DPMSolver, DPMSolverSDE, Euler, EulerMaruyama, EVODiff, Heun, Restart, UniPC

    return [EulerMaruyama(), Euler(), Heun(), Heun(eta=1.0), DPMSolver(2), DPMSolver(3), DPMSolverSDE(2), ERSDE(3),
            UniPC(), Restart(intervals=[(0.1, 1.0, 2, 1)]), EVODiff()]
