"""``python -m samplers demo``: every solver on an exact 2-D problem, error against NFE.

The data is :func:`samplers.problems.mixture_2d` (8 Gaussians on a circle), and the network is
the mixture's exact denoiser, so the only error left is the solver's discretisation error (plus
the sampling noise of a finite sample).  For each solver and NFE budget the demo draws N samples
and measures the sliced Wasserstein distance to N exact samples from the mixture.  The error
floor is that distance between two independent exact sample sets of the same size: an error
near it means "converged, as far as N samples can tell".

No data, no download, no GPU: it runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterable

import torch

from solvers import EulerMaruyama, Solver, StepSizeError

from ..noise import STREAM_PRIOR, NoiseSource
from ..sample import NonFiniteError, sample
from .registry import PROBLEMS, SDES, exact_problem, solver_factories, steps_for_nfe

__all__ = [
    "DEFAULT_BUDGETS",
    "QUICK_BUDGETS",
    "run_demo",
    "keyed_prior",
    "plot",
    "main",
]

DEFAULT_BUDGETS = (5, 10, 20, 50, 100)
DEFAULT_SAMPLES = 4000
QUICK_BUDGETS = (3, 10, 50)
QUICK_SAMPLES = 2000

#: tolerances an adaptive solver is run with (atol = ADAPTIVE_ATOL_RATIO * rtol)
ADAPTIVE_TOLERANCES = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
ADAPTIVE_ATOL_RATIO = 0.2

#: solvers shown in the scatter panels when they were run (others fill up to _MAX_SCATTER)
_SCATTER_PREFERENCE = ("Euler(eta=0)", "EulerMaruyama(eta=1)", "Heun(eta=0)", "Heun(eta=1)")
_MAX_SCATTER = 5


def keyed_prior(sde, shape, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The prior draw ``sample(shape=shape, seed=seed)`` starts from (its keyed stream), as an x_T that
    other runs and the peers can share."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    z = NoiseSource(seed, shape[0]).normal(tuple(shape[1:]), counter=0, stream=STREAM_PRIOR, dtype=compute,
                                           device=device)
    return sde.prior_sample(tuple(shape), normal=z)


#: the label suffix of run_demo's runs on grid_for_nfe's grid (``nfe_grid=True``)
NFE_GRID_SUFFIX = " @nfe"
#: the label suffix of run_demo's runs on a grid optimize_grid fitted (``optimize=True``)
OPTIMIZED_SUFFIX = " @optimize_grid"
#: calibration for those fits: samples, and the offset of their seed from the run's (the evaluation noise)
CALIBRATION_SAMPLES, CALIBRATION_SEED_OFFSET = 256, 12345


def _fitted_grid(model, solver, nfe: int, dim: int, seed: int):
    """optimize_grid's grid for ``solver`` at ``nfe`` calls, fitted from grid_for_nfe's grid on calibration
    noise of another seed in float64; the reason as a string where the library refuses the fit."""
    from .. import grid_for_nfe, optimize_grid

    try:
        start = grid_for_nfe(model.sde, solver, nfe)
        return optimize_grid(model, solver, nfe, shape=(CALIBRATION_SAMPLES, dim),
                             seed=seed + CALIBRATION_SEED_OFFSET, start=start, dtype=torch.float64, progress=False)
    except ValueError as exc:
        return f"ValueError: {str(exc).splitlines()[0]}"


def _exact_samples(mixture, n: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return mixture.sample(n, generator=gen).to(device)


def run_demo(*, sde: str = "vp", problem: str = "2d", samples: int = DEFAULT_SAMPLES, budgets: Iterable[int] = DEFAULT_BUDGETS,
             seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32,
             solver_list: list[tuple[str, Callable[[], Solver]]] | None = None,
             projections: int = 256, floor_sets: int = 8, reference_samples: int = 500,
             nfe_grid: bool = False, optimize: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Sample a mixture (``problem``: "2d" or "64d", see :data:`samplers.cli.registry.PROBLEMS`) with each solver at each NFE budget.

    Returns a dict with ``records`` (one per solver and budget met: solver, budget, nfe, steps,
    sw, mode_error, weight_tv (:func:`samplers.problems.mode_error`), ref_rms (deterministic solvers: the RMS
    distance of the first ``reference_samples`` samples to :func:`samplers.problems.reference_endpoint` from
    the same x_T; None for stochastic ones), time_ms, stochastic), ``skipped`` ((solver, budget, reason) for budgets a solver cannot
    meet or runs that failed), ``floor`` (the mean SW between the reference set and
    ``floor_sets`` further independent exact sets of the same size; ``floor_range`` its min and
    max); with ``nfe_grid``, each fixed-grid solver also runs ``sample(..., nfe=budget)`` (the grid of
    :func:`samplers.grid_for_nfe`), labelled with :data:`NFE_GRID_SUFFIX`; with ``optimize``, each deterministic
    fixed-grid solver also runs on a grid :func:`samplers.optimize_grid` fits from that grid on 256 calibration
    samples of another seed (labelled with :data:`OPTIMIZED_SUFFIX`, the fit's seconds in ``fit_seconds``);
    ``mode_floor`` (:func:`samplers.problems.mode_error_floor`), ``x_T`` and ``reference``, ``exact`` (the exact samples, for plotting), ``samples`` ({(solver, nfe): x}),
    and the settings.
    """
    from .. import problems

    if sde not in SDES:
        raise ValueError(f"sde must be one of {sorted(SDES)}, got {sde!r}")
    samples = int(samples)
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive ints, got {budgets}")
    device = torch.device(device)
    solver_list = solver_factories() if solver_list is None else list(solver_list)

    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {problem!r}")
    sde_obj, mixture, model = exact_problem(problem, sde)

    # the reference set, and independent exact sets of the same size for the floor: the distance
    # a perfect sampler would still show.  It is itself random (the component counts fluctuate),
    # so it is averaged over a few sets and its spread is kept.
    exact = _exact_samples(mixture, samples, seed + 1_000_003, "cpu")
    floors = [problems.sliced_wasserstein(exact, _exact_samples(mixture, samples, seed + 2_000_003 + i, "cpu"),
                                          projections=projections, seed=seed)
              for i in range(max(int(floor_sets), 1))]
    floor = sum(floors) / len(floors)

    # the floor-free measures: per-mode statistics against the exact mixture, and for deterministic solvers
    # the distance to the exact flow's endpoint from the same x_T (the keyed prior draw sample() makes)
    mode_floor = problems.mode_error_floor(mixture, samples)
    x_T = keyed_prior(sde_obj, (samples, mixture.dim), seed, dtype, device)
    reference = problems.reference_endpoint(mixture, sde_obj, x_T[:reference_samples].to("cpu", torch.float64))

    # warm-up: the first call of a run pays one-off costs that would inflate the first row's time
    sample(model, EulerMaruyama(eta=0.0), shape=(min(samples, 64), mixture.dim), steps=2, seed=seed,
           device=device, dtype=dtype)

    records, skipped, drawn = [], [], {}

    def measure(label, solver, budget, **run):
        start = time.perf_counter()
        try:
            x, info = sample(model, solver, x_T=x_T, seed=seed, device=device, dtype=dtype, return_info=True, **run)
        # a run the library refuses with its reason (e.g. a reverse SDE at alpha = 0 on rf), a state that
        # turned non-finite, an adaptive solver out of steps: a result to report; any other error is a bug
        except (ValueError, NonFiniteError, StepSizeError) as exc:
            skipped.append((label, budget, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))
            return None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        x = x.detach().to("cpu", torch.float64)
        return {
            "solver": label,
            "budget": budget,
            "nfe": int(info.nfe),
            "steps": int(info.steps),
            "sw": problems.sliced_wasserstein(x, exact, projections=projections, seed=seed),
            **problems.mode_error(x, mixture),
            "ref_rms": None if solver.stochastic else problems.rms_distance(x[:reference_samples], reference),
            "time_ms": 1e3 * elapsed,
            "stochastic": bool(getattr(solver, "stochastic", False)),
            "sde": sde,
            "problem": problem,
            "samples": samples,
            "sw_floor": floor,
            "mode_error_floor": mode_floor["mode_error"],
            "weight_tv_floor": mode_floor["weight_tv"],
        }, x, info

    def keep(rec, x):
        records.append(rec)
        drawn[(rec["solver"], rec["nfe"])] = x
        if log is not None:
            log(_format_row(rec))

    for label, factory in solver_list:
        solver = factory()
        if getattr(solver, "adaptive", False):
            # no steps to set: run a ladder of tolerances and show, per budget, the tightest run whose
            # mean network calls per sample (the final denoise included) fit in it
            ladder = []
            for rtol in ADAPTIVE_TOLERANCES:
                result = measure(label, solver.with_tolerance(rtol, ADAPTIVE_ATOL_RATIO * rtol), None)
                if result is None:
                    break
                rec, x, info = result
                cost = info.nfe_per_sample.double().mean().item()
                rec.update(nfe=int(round(cost)), rtol=rtol, nfe_per_sample=[int(info.nfe_per_sample.min()),
                                                                           int(info.nfe_per_sample.max())])
                ladder.append((cost, rec, x))
                if cost > budgets[-1]:
                    break
            shown: set[float] = set()
            for budget in budgets:
                fitting = [(rec, x) for cost, rec, x in ladder if cost <= budget]
                if not fitting:
                    skipped.append((label, budget, f"no tolerance in {ADAPTIVE_TOLERANCES} fits in {budget} NFE"))
                    continue
                rec, x = fitting[-1]
                if rec["rtol"] not in shown:
                    shown.add(rec["rtol"])
                    keep(dict(rec, budget=budget), x)
            continue
        done_steps: set[int] = set()
        for budget in budgets:
            steps = steps_for_nfe(solver, budget)
            if steps < 1:
                skipped.append((label, budget, f"needs more than {budget} NFE for one step"))
                continue
            if steps in done_steps:  # two budgets rounding to the same run (e.g. 9 and 10 for Heun)
                continue
            done_steps.add(steps)
            result = measure(label, solver, budget, steps=steps)
            if result is not None:
                keep(result[0], result[1])
        if nfe_grid:
            for budget in budgets:
                result = measure(label + NFE_GRID_SUFFIX, solver, budget, nfe=budget)
                if result is not None:
                    keep(result[0], result[1])
        if optimize and not solver.stochastic:
            for budget in budgets:
                fitted = _fitted_grid(model, solver, budget, mixture.dim, seed)
                if isinstance(fitted, str):
                    skipped.append((label + OPTIMIZED_SUFFIX, budget, fitted))
                    continue
                result = measure(label + OPTIMIZED_SUFFIX, solver, budget, grid=fitted.times)
                if result is not None:
                    result[0]["fit_seconds"] = fitted.seconds
                    keep(result[0], result[1])
    return {"records": records, "skipped": skipped, "floor": floor, "floor_range": (min(floors), max(floors)),
            "mode_floor": mode_floor, "x_T": x_T, "reference": reference, "exact": exact, "samples": drawn,
            "sde": repr(sde_obj), "sde_name": sde, "problem": problem, "n": samples, "budgets": budgets, "seed": seed}


_HEADER = f"{'solver':<22} {'NFE':>5} {'steps':>6} {'SW error':>10} {'time ms':>9}"


def _format_row(rec: dict) -> str:
    return (f"{rec['solver']:<22} {rec['nfe']:>5d} {rec['steps']:>6d} {rec['sw']:>10.4f} "
            f"{rec['time_ms']:>9.1f}")


def _scatter_choice(result: dict, target_nfe: int = 20) -> list[tuple[str, int]]:
    """(solver, nfe) of the runs shown as scatter plots: each solver's run nearest target_nfe."""
    best: dict[str, int] = {}
    for rec in result["records"]:
        cur = best.get(rec["solver"])
        if cur is None or abs(math.log(rec["nfe"] / target_nfe)) < abs(math.log(cur / target_nfe)):
            best[rec["solver"]] = rec["nfe"]
    order = [s for s in _SCATTER_PREFERENCE if s in best] + [s for s in best if s not in _SCATTER_PREFERENCE]
    return [(s, best[s]) for s in order[:_MAX_SCATTER]]


def plot(result: dict, path: str, target_nfe: int = 20) -> str:
    """Scatter plots (exact and a few solvers near ``target_nfe``) and error-vs-NFE curves, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = _scatter_choice(result, target_nfe)
    panels = [("exact", result["exact"])] + [(f"{s}\nNFE={n}", result["samples"][(s, n)]) for s, n in chosen]
    ncols = 3 if len(panels) > 4 else 2
    nrows = max(1, math.ceil(len(panels) / ncols))

    fig = plt.figure(figsize=(4.0 * ncols + 6.5, max(3.6 * nrows, 5.0)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[ncols, 2.2])
    axes = left.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    lim = 3.2
    for ax, (title, x) in zip(axes.flat, panels):
        x = x.numpy()
        ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.35, linewidths=0,
                   color="black" if title == "exact" else "tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    left.suptitle(f"samples near {target_nfe} NFE (n={result['n']})", fontsize=10)

    ax = right.subplots()
    by_solver: dict[str, list[dict]] = {}
    for rec in result["records"]:
        by_solver.setdefault(rec["solver"], []).append(rec)
    for label, recs in by_solver.items():
        recs = sorted(recs, key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in recs], [r["sw"] for r in recs], marker="o", ms=4,
                ls="--" if recs[0]["stochastic"] else "-", label=label)
    lo, hi = result.get("floor_range", (result["floor"], result["floor"]))
    ax.axhspan(lo, hi, color="gray", alpha=0.15, lw=0)
    ax.axhline(result["floor"], color="gray", ls=":", lw=1.2, label="floor (exact vs exact, mean and range)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel("sliced Wasserstein distance to exact samples")
    ax.set_title(f"error vs NFE on {result['sde']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parse_budgets(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"budgets must be positive ints, got {text!r}")
    return values


def build_parser(prog: str = "python -m samplers demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sde", choices=sorted(SDES), default="vp", help="forward SDE (default: vp)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"samples per run (default: {DEFAULT_SAMPLES}, {QUICK_SAMPLES} with --quick)")
    parser.add_argument("--nfe", type=_parse_budgets, default=None, metavar="LIST",
                        help="NFE budgets, e.g. '5,10,20' (default: "
                             f"{','.join(map(str, DEFAULT_BUDGETS))}; {','.join(map(str, QUICK_BUDGETS))} with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the sampled state (default: float32)")
    parser.add_argument("--floor-sets", type=int, default=8,
                        help="exact sample sets averaged for the error floor (default: 8)")
    parser.add_argument("--quick", action="store_true", help="fewer samples and budgets (for tests)")
    parser.add_argument("--out", default=os.path.join("demo_output", "demo.png"),
                        help="PNG to write (default: demo_output/demo.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON (list of records)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        # say so before the runs, not after them
        parser.error("the plot needs matplotlib: pip install 'score-samplers[plots]', or pass --no-plot")
    samples = args.samples if args.samples is not None else (QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES)
    budgets = args.nfe if args.nfe is not None else (QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32

    start = time.perf_counter()
    print(f"2-D Gaussian mixture (8 components), exact x0 network, N={samples} samples, seed {args.seed}")
    print(_HEADER)
    print("-" * len(_HEADER))
    result = run_demo(sde=args.sde, samples=samples, budgets=budgets, seed=args.seed, device=args.device,
                      dtype=dtype, floor_sets=args.floor_sets, log=lambda line: print(line, flush=True))
    print(f"SDE: {result['sde']}")
    lo, hi = result["floor_range"]
    print(f"error floor (SW between independent exact sets of {samples}, mean of "
          f"{args.floor_sets}): {result['floor']:.4f} (range {lo:.4f} to {hi:.4f})")
    grouped: dict[str, tuple[list[int], str]] = {}  # one line per solver, with its first reason
    for label, budget, reason in result["skipped"]:
        grouped.setdefault(label, ([], reason.split("; ")[0]))[0].append(budget)
    for label, (skipped_budgets, reason) in grouped.items():
        print(f"skipped {label} at {', '.join(map(str, skipped_budgets))} NFE: {reason}")
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result["records"], fh, indent=2)
        print(f"wrote {args.json}")
    if not args.no_plot:
        plot(result, args.out)
        print(f"wrote {args.out}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
