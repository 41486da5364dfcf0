"""``python -m samplers bench``: measurements that are commands, not tests.

``bench overhead``: the sampler's own cost per step, as a multiple of one in-place
``x.add_(y)`` pass over the batch, for a network that returns a fixed tensor (so the network
costs nothing and only the solver's arithmetic, noise and bookkeeping remain).

``bench traffic``: the same cost counted instead of timed (full-batch tensor reads and writes
per step), deterministic, so it is what the tests bound.

``bench quality``: every solver (and the variants in :data:`samplers.cli.registry.QUALITY_VARIANTS`) on the exact
2-D and 64-D Gaussian mixtures under VP/VE/EDM at NFE 5, 10, 20, 50, 100: sliced Wasserstein
distance to exact samples and wall time, as tables, a JSON file and error-vs-NFE plots; side by side,
in the same run, the same algorithms in k-diffusion, diffusers and torchsde where they are installed
(:mod:`samplers.cli.peers`), with error-vs-NFE and error-vs-time plots (``--out DIR``).

``bench convergence``: the measured order of every fixed-step solver (slope of log error against
log steps, :mod:`samplers.cli.convergence`) beside its theoretical order.

``bench kernels`` and ``bench gpu``: the fused CUDA step kernels on a GPU (:mod:`samplers.cli.bench_kernels`,
:mod:`samplers.cli.bench_gpu`).  ``bench distributed``: sharded sampling's throughput with 1, 2, ... gloo
CPU processes (:mod:`samplers.cli.bench_distributed`).  ``bench path``: the keyed Brownian path of
``noise="path"`` (strong convergence in the step count, same-mode fraction, cost per step;
:mod:`samplers.cli.bench_path`).  ``bench evodiff``: EVODiff at few calls
beside DPM-Solver++(2M), UniPC and ER-SDE, and the measurements behind its constants
(:mod:`samplers.cli.bench_evodiff`).  ``bench grid``:
:func:`samplers.optimize_grid`'s gain on held-out noise and its cost (:mod:`samplers.cli.bench_grid`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .registry import PROBLEMS, SDES, quality_solvers, solver_factories

__all__ = ["main", "overhead", "traffic", "keyed_noise_ratio", "adaptive_em_vs_em", "quality",
           "best_by_budget", "plot_quality", "plot_best_by_library", "replot"]


def quality(problems=("2d", "64d"), sdes=("vp", "ve", "edm"), budgets=(5, 10, 20, 50, 100), samples: int = 4000,
            seed: int = 0, solver_list=None, floor_sets: int = 4, log=None, peers=None,
            nfe_grid: bool = False, optimize: bool = False) -> list[dict]:
    """One :func:`samplers.cli.demo.run_demo` result per (problem, SDE), every solver at every budget.

    ``peers``: a list of :class:`samplers.cli.peers.Peer` to run side by side on the same problems and
    budgets (``None``: none; :func:`samplers.cli.peers.peer_list` gives every installed one); their
    records (with ``library``) are under ``peer_records`` of each result, their failures under
    ``peer_skipped``.  ``nfe_grid``: our fixed-grid solvers also run on :func:`samplers.grid_for_nfe`'s grid
    (labels ending in ``" @nfe"``); ``optimize``: and on a grid :func:`samplers.optimize_grid` fits from it
    (labels ending in ``" @optimize_grid"``)."""
    from .demo import run_demo
    from .peers import run_peers

    solver_list = quality_solvers() if solver_list is None else solver_list
    results = []
    for problem in problems:
        for sde in sdes:
            if log is not None:
                log(f"-- {problem} mixture, {sde} --")
            res = run_demo(sde=sde, problem=problem, samples=samples, budgets=budgets, seed=seed,
                           solver_list=solver_list, floor_sets=floor_sets, nfe_grid=nfe_grid,
                           optimize=optimize)
            for rec in res["records"]:
                rec["library"] = "ours"
            res["peer_records"], res["peer_skipped"] = [], []
            if peers:
                res["peer_records"], res["peer_skipped"] = run_peers(
                    sde=sde, problem=problem, exact=res["exact"], budgets=budgets, samples=samples, seed=seed,
                    peers=peers, floor=res["floor"], x_T=res["x_T"], reference=res["reference"], log=log)
            results.append(res)
    return results


def best_by_budget(res: dict, measure: str = "sw") -> list[dict]:
    """Per NFE budget: our best solver and each peer library's best, by ``measure`` (a record's key:
    "sw", "mode_error", "weight_tv" or "ref_rms")."""
    rows = []
    for budget in res["budgets"]:
        best: dict[str, dict] = {}
        for rec in res["records"] + res.get("peer_records", []):
            if rec["budget"] != budget or rec.get(measure) is None:
                continue
            lib = rec.get("library", "ours")
            if lib not in best or rec[measure] < best[lib][measure]:
                best[lib] = rec
        rows.append({"budget": budget, "best": best})
    return rows


#: the measures ``bench quality`` prints, with how each floor is found in a result
QUALITY_MEASURES = (
    ("sw", "sliced Wasserstein error", lambda res: res["floor"]),
    ("mode_error", "per-mode Frechet error (samplers.problems.mode_error)", lambda res: res["mode_floor"]["mode_error"]),
    ("weight_tv", "mode-weight total variation", lambda res: res["mode_floor"]["weight_tv"]),
    ("ref_rms", "RMS distance to the exact flow's endpoint from the same x_T (deterministic solvers)",
     lambda res: 0.0),
)


def _print_quality(results: list[dict]) -> None:
    for res in results:
        budgets = res["budgets"]
        records = res["records"] + res.get("peer_records", [])
        width = max([len(r["solver"]) for r in records] + [6])
        for measure, title, floor in QUALITY_MEASURES:
            print(f"\n{res['problem']} mixture, {res['sde']}: {title} (N={res['n']}; floor {floor(res):.2g}), "
                  "by NFE budget")
            print(f"{'solver':<{width}} " + " ".join(f"{b:>9d}" for b in budgets))
            rows: dict[str, dict[int, float]] = {}
            for rec in records:
                if rec.get(measure) is not None:
                    rows.setdefault(rec["solver"], {})[rec["budget"]] = rec[measure]
            for label, by_budget in rows.items():
                cells = [f"{by_budget[b]:>9.3g}" if b in by_budget else f"{'-':>9}" for b in budgets]
                print(f"{label:<{width}} " + " ".join(cells))
            if res.get("peer_records"):
                print(f"best per NFE ({res['problem']}, {res['sde_name']}, {measure}):")
                for row in best_by_budget(res, measure):
                    cells = "; ".join(f"{lib} {rec[measure]:.3g} ({rec['solver']})" for lib, rec in row["best"].items())
                    print(f"  {row['budget']:>4d}: {cells}")
        grouped: dict[str, list] = {}
        for label, budget, reason in res.get("peer_skipped", []):
            grouped.setdefault(label, [[], reason])[0].append(budget)
        for label, (skipped, reason) in grouped.items():
            print(f"  skipped {label} at {', '.join(map(str, skipped))} NFE: {reason}")


def plot_quality(res: dict, path: str) -> str:
    """Error vs NFE and error vs wall time for one (problem, SDE): our solvers (solid) and the peers'
    (dashed, one marker per library), the floor shaded."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(19, 7), layout="constrained")
    markers = _MARKERS
    by_solver: dict[str, list[dict]] = {}
    for rec in res["records"] + res.get("peer_records", []):
        if math.isfinite(rec["sw"]):
            by_solver.setdefault(rec["solver"], []).append(rec)
    cmap = plt.get_cmap("tab20")
    for i, (label, recs) in enumerate(by_solver.items()):
        recs = sorted(recs, key=lambda r: r["nfe"])
        lib = recs[0].get("library", "ours")
        style = dict(marker=markers.get(lib, "x"), ms=3.5, lw=1.0, color=cmap(i % 20),
                     ls="-" if lib == "ours" else "--", label=label)
        axes[0].plot([r["nfe"] for r in recs], [r["sw"] for r in recs], **style)
        axes[1].plot([r["time_ms"] for r in recs], [r["sw"] for r in recs], **style)
    for ax, xlabel in zip(axes, ("NFE (network evaluations)", "wall time per run (ms)")):
        lo, hi = res.get("floor_range", (res["floor"], res["floor"]))
        ax.axhspan(lo, hi, color="gray", alpha=0.15, lw=0)
        ax.axhline(res["floor"], color="gray", ls=":", lw=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # diverged runs (errors of 10^3 on data of radius 2) are listed in the table, not drawn to scale
        ax.set_ylim(0.7 * lo, min(ax.get_ylim()[1], 5.0))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("sliced Wasserstein distance to exact samples (clipped at 5)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"{res['problem']} mixture, {res['sde_name'].upper()}: error vs NFE (grey: exact-vs-exact floor)",
                      fontsize=10)
    axes[1].set_title("error vs time (N = %d samples, CPU)" % res["n"], fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=6, ncols=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def adaptive_em_vs_em(sdes=("vp", "ve"), rtols=(0.1, 0.05, 0.02), samples: int = 4000, seed: int = 0,
                      log=None) -> list[dict]:
    """Gotta Go Fast's claim, measured: AdaptiveEM at its mean NFE per sample against
    EulerMaruyama at that NFE and at twice it, on two problems with exact scores: data
    N(0.5, 0.1^2) in 4 dimensions (relative variance error, float64; standard error
    sqrt(2/(4 samples))) and the 2-D mixture (sliced Wasserstein to exact samples)."""
    from solvers import AdaptiveEM, EulerMaruyama

    from .. import problems
    from ..model import Model
    from ..sample import sample

    rows = []
    for sde_name in sdes:
        sde = SDES[sde_name]()
        gaussian = problems.gaussian(0.5, 0.1, dim=4)
        mixture = problems.mixture_2d()
        exact = mixture.sample(samples, generator=torch.Generator().manual_seed(seed + 1))
        cases = {
            "gaussian variance error": (gaussian, lambda x: x.var().item() / 0.01 - 1),
            "2d mixture sliced W": (mixture, lambda x: problems.sliced_wasserstein(x, exact, seed=seed)),
        }
        for problem, (data, error) in cases.items():
            model = Model(data.net(sde, "x0"), sde, predicts="x0")
            for rtol in rtols:
                x, info = sample(model, AdaptiveEM(rtol=rtol), shape=(samples, data.dim), seed=seed,
                                 dtype=torch.float64, return_info=True)
                per_sample = info.nfe_per_sample.double()
                nfe = int(round(per_sample.mean().item()))
                em = [error(sample(model, EulerMaruyama(), shape=(samples, data.dim), seed=seed, steps=k,
                                   dtype=torch.float64)) for k in (nfe, 2 * nfe)]
                row = {"sde": sde_name, "problem": problem, "rtol": rtol, "nfe_mean": nfe,
                       "nfe_min_median_max": [int(per_sample.min()), int(per_sample.median()), int(per_sample.max())],
                       "adaptive_em": error(x), "em_same_nfe": em[0], "em_twice_nfe": em[1]}
                rows.append(row)
                if log is not None:
                    log(f"| {sde_name} | {problem} | {rtol:g} | {nfe} | {' / '.join(map(str, row['nfe_min_median_max']))} "
                        f"| {row['adaptive_em']:+.4f} | {em[0]:+.4f} | {em[1]:+.4f} |")
    return rows


def _best_time(fn, repeats: int, inner: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


class _TrafficCounter(TorchDispatchMode):
    """Counts the full-batch tensors each aten op reads and writes: the memory traffic that bounds
    an elementwise solver step. Views move no memory and are skipped; an op's output that is also
    one of its inputs (in place, ``out=``) is one write, not another read."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.tensor_moves = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        returns = func._schema.returns
        if func._schema.name in _NO_TRAFFIC or any(r.alias_info is not None and not r.alias_info.is_write
                                                   for r in returns):
            return out  # a view, or metadata only
        written = {id(t) for t in _tensors(out) if t.numel() >= self.numel}
        read = [t for t in _tensors((args, kwargs)) if t.numel() >= self.numel and id(t) not in written]
        self.tensor_moves += len(written) + len(read)
        if any(r.alias_info is not None and r.alias_info.is_write for r in returns):
            # in place: the written tensor is also read unless the op only fills it
            self.tensor_moves += sum(1 for t in _tensors(out) if id(t) in written) if _reads_target(func) else 0
        return out


_NO_TRAFFIC = {"aten::resize_", "aten::set_", "aten::empty", "aten::empty_like", "aten::empty_strided"}


def _reads_target(func) -> bool:
    name = func._schema.name.split("::")[-1]
    return not (name.startswith(("normal", "uniform", "random", "fill", "zero", "copy", "randn", "rand",
                                 "empty", "bernoulli", "exponential")) or func._schema.overload_name == "out")


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


#: one x.add_(y) reads x and y and writes x
ADD_PASS_TENSOR_MOVES = 3


def _diffusers_scheduler(name: str):
    """diffusers' scheduler class ``name``, or None when diffusers is not installed (the table then
    says so); an installed diffusers that fails to import raises, it is not taken for a missing one."""
    try:
        import diffusers
    except ModuleNotFoundError as exc:
        if exc.name != "diffusers":
            raise
        return None
    return getattr(diffusers, name)


def _model_calls(solver, steps: int) -> int:
    """Network calls of ``steps`` steps without the final denoise (Restart adds its restarts' calls)."""
    if hasattr(solver, "nfe"):
        return solver.nfe(steps, final_denoise=False)
    return steps * solver.nfe_per_step


def traffic(shape=(8, 3, 16, 16), steps=(6, 18)) -> dict:
    """Per-step memory traffic of each solver, counted (not timed) in add_ passes: full-batch tensor
    reads and writes of every aten op, divided by the 3 of one ``x.add_(y)``. Deterministic, so it
    is what the tests bound; :func:`overhead` times the same thing on real hardware. The keyed
    noise is filled by the native extension outside aten (one write per draw, timed by
    :func:`overhead`), so a stochastic solver's count is its arithmetic around the draw."""
    from sde import VPSDE

    from ..model import Model
    from ..sample import sample

    numel = math.prod(shape)
    torch.manual_seed(0)
    fixed = torch.randn(shape) * 0.1
    x_T = torch.randn(shape)

    def moves(fn) -> int:
        with _TrafficCounter(numel) as counter:
            fn()
        return counter.tensor_moves

    model = Model(lambda x, t: fixed, VPSDE(), predicts="eps")
    rows = []
    for label, factory in solver_factories():
        solver = factory()
        if getattr(solver, "adaptive", False):
            continue
        short, long = (moves(lambda n=n: sample(model, solver, x_T=x_T, steps=n, final_denoise=False))
                       for n in steps)
        per_step = (long - short) / (steps[1] - steps[0]) / ADD_PASS_TENSOR_MOVES
        calls = _model_calls(solver, steps[1]) - _model_calls(solver, steps[0])
        rows.append({"solver": label, "passes_per_step": per_step,
                     "passes_per_model_call": (long - short) / calls / ADD_PASS_TENSOR_MOVES,
                     "stochastic": solver.stochastic})
    peers = []
    DPMSolverMultistepScheduler = _diffusers_scheduler("DPMSolverMultistepScheduler")
    if DPMSolverMultistepScheduler is not None:
        def diffusers_dpm_2m(n):
            sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=2)
            sched.set_timesteps(n)
            x = x_T.clone()
            for t in sched.timesteps:
                x = sched.step(fixed, t, x).prev_sample

        short, long = (moves(lambda n=n: diffusers_dpm_2m(n)) for n in steps)
        peers.append({"peer": "diffusers DPMSolverMultistepScheduler(solver_order=2)",
                      "passes_per_model_call": (long - short) / (steps[1] - steps[0]) / ADD_PASS_TENSOR_MOVES})
    return {"shape": list(shape), "solvers": rows, "peers": peers}


def keyed_noise_ratio(shape=(64, 3, 64, 64), rounds: int = 7) -> float:
    """Time of the keyed noise over ``torch.randn`` for one batch, single-threaded (OpenMP threads
    on a busy machine measure the scheduler, not the generator), the two timed alternately and
    the best of ``rounds`` kept for each, so load on the machine hits both alike."""
    from ..noise import NoiseSource

    buf = torch.empty(shape)
    source = NoiseSource(0, shape[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best_randn = best_keyed = float("inf")
        for _ in range(rounds):
            best_randn = min(best_randn, _best_time(lambda: torch.randn(shape, out=buf), 1, 3))
            best_keyed = min(best_keyed, _best_time(lambda: source.normal(shape[1:], counter=3, out=buf), 1, 3))
    finally:
        torch.set_num_threads(threads)
    return best_keyed / best_randn


def overhead(shape=(256, 3, 64, 64), steps=(10, 30), repeats: int = 3, peers: bool = True,
             solvers: bool = True, noise: str = "step") -> dict:
    """Per-step cost of each solver in add_ passes; the difference of two runs of different
    length removes the one-time set-up (grid tables, prior draw) from the estimate.  ``noise``: the
    runs' noise mode (``sample(..., noise=)``)."""
    from sde import VPSDE

    from ..model import Model
    from ..noise import NoiseSource
    from ..sample import sample

    torch.manual_seed(0)
    x = torch.randn(shape)
    y = torch.randn(shape)
    fixed = torch.randn(shape) * 0.1
    add_pass = _best_time(lambda: x.add_(y), repeats, 20)
    buf = torch.empty(shape)
    randn = _best_time(lambda: torch.randn(shape, out=buf), repeats, 5)
    source = NoiseSource(0, shape[0])
    keyed = _best_time(lambda: source.normal(shape[1:], counter=3, out=buf), repeats, 5)

    sde = VPSDE()
    model = Model(lambda x, t: fixed, sde, predicts="eps")
    x_T = torch.randn(shape)
    rows = []
    for label, factory in solver_factories() if solvers else ():  # the demo's list: every solver, one place
        solver = factory()
        if getattr(solver, "adaptive", False):  # no fixed steps: its cost per step is not comparable
            continue
        def run(n, solver=solver):
            sample(model, solver, x_T=x_T, steps=n, final_denoise=False, noise=noise)

        short, long = (_best_time(lambda n=n: run(n), repeats, 1) for n in steps)
        per_step = (long - short) / (steps[1] - steps[0])
        per_call = (long - short) / (_model_calls(solver, steps[1]) - _model_calls(solver, steps[0]))
        rows.append({"solver": label, "ms_per_step": per_step * 1e3, "passes_per_step": per_step / add_pass,
                     "passes_per_model_call": per_call / add_pass, "stochastic": solver.stochastic})
    result = {
        "shape": list(shape),
        "threads": torch.get_num_threads(),
        "add_pass_ms": add_pass * 1e3,
        "randn_passes": randn / add_pass,
        "keyed_noise_passes": keyed / add_pass,
        "keyed_over_randn": keyed / randn,
        "solvers": rows,
    }
    if peers:
        result["peers"] = _peer_overheads(shape, fixed, x_T, add_pass, repeats, steps)
    return result


def _peer_overheads(shape, fixed, x_T, add_pass, repeats, steps):
    """The same measurement for peers' Euler samplers, where they are installed."""
    rows = []
    EulerDiscreteScheduler = _diffusers_scheduler("EulerDiscreteScheduler")
    if EulerDiscreteScheduler is not None:
        def diffusers_euler(n):
            sched = EulerDiscreteScheduler(num_train_timesteps=1000)
            sched.set_timesteps(n)
            x = x_T.clone()
            for t in sched.timesteps:
                sched.scale_model_input(x, t)  # part of the scheduler's per-step cost
                x = sched.step(fixed, t, x).prev_sample
        short, long = (_best_time(lambda n=n: diffusers_euler(n), repeats, 1) for n in steps)
        rows.append({"peer": "diffusers EulerDiscreteScheduler",
                     "passes_per_model_call": (long - short) / (steps[1] - steps[0]) / add_pass})
    return rows


def _print_overhead(result: dict) -> None:
    print(f"batch {tuple(result['shape'])} float32, {result['threads']} threads; "
          f"one x.add_(y) pass = {result['add_pass_ms']:.3f} ms")
    print(f"torch.randn of the batch: {result['randn_passes']:.1f} passes; keyed noise: "
          f"{result['keyed_noise_passes']:.1f} passes ({result['keyed_over_randn']:.2f} x randn)")
    print(f"{'solver':<36} {'ms/step':>9} {'passes/step':>12} {'passes/model call':>18}")
    for row in result["solvers"]:
        print(f"{row['solver']:<36} {row['ms_per_step']:>9.2f} {row['passes_per_step']:>12.1f} "
              f"{row['passes_per_model_call']:>18.1f}")
    for row in result.get("peers", []):
        print(f"{row['peer']:<40} {row['passes_per_model_call']:>8.1f} passes/model call")
    if "peers" in result and not result["peers"]:
        print("no peer row: diffusers is not installed (pip install diffusers)")


def _quality_command(args) -> int:
    import os

    from .peers import available_peers, missing_peers, peer_list

    solver_list = quality_solvers()
    if args.solvers:
        unknown = sorted(set(args.solvers) - {label for label, _ in solver_list})
        if unknown:
            raise SystemExit(f"--solvers: unknown labels {unknown}; known: {[label for label, _ in solver_list]}")
        solver_list = [(label, f) for label, f in solver_list if label in args.solvers]
    peers = None
    if not args.no_peers:
        wanted = args.peers or None
        peers = peer_list(wanted)
        for name, how in missing_peers().items():
            if wanted is None or name in wanted:
                print(f"peer {name} is not installed, skipped ({how})")
        print(f"peers run side by side: {', '.join(available_peers()) or 'none'}")
    start = time.perf_counter()
    results = quality(tuple(args.problems), tuple(args.sdes), tuple(args.nfe), args.samples, args.seed,
                      solver_list=solver_list, log=lambda line: print(line, flush=True), peers=peers,
                      nfe_grid=args.nfe_grid, optimize=args.optimize_grid)
    _print_quality(results)
    records = [rec for res in results for rec in res["records"] + res["peer_records"]]
    paths = []
    if args.json:
        paths.append(args.json)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        paths.append(os.path.join(args.out, "quality.json"))
        for res in results:
            name = f"{res['problem']}_{res['sde_name']}"
            print("wrote", plot_quality(res, os.path.join(args.out, f"quality_{name}.png")))
            print("wrote", plot_best_by_library(res["records"] + res["peer_records"], res["floor_range"],
                                                f"{res['problem']} mixture, {res['sde_name'].upper()}",
                                                os.path.join(args.out, f"best_{name}.png")))
    if paths:
        summary = {"records": records,
                   "best_by_budget": [{"problem": res["problem"], "sde": res["sde_name"], "budget": row["budget"],
                                       "best": {lib: {"solver": r["solver"], "sw": r["sw"]}
                                                for lib, r in row["best"].items()}}
                                      for res in results for row in best_by_budget(res)],
                   "floors": {f"{res['problem']}_{res['sde_name']}": res["floor"] for res in results},
                   "floor_ranges": {f"{res['problem']}_{res['sde_name']}": list(res["floor_range"]) for res in results},
                   "peer_skipped": [list(s) for res in results for s in res["peer_skipped"]]}
    for path in paths:
        with open(path, "w") as fh:
            json.dump(summary, fh, indent=2)
        print("wrote", path)
    if args.plots:
        from .demo import plot

        for res in results:
            plot(res, f"{args.plots}/quality_{res['problem']}_{res['sde_name']}.png")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


def _batch_shape(text: str) -> tuple[int, ...]:
    """``bench kernels --shapes``: positive sizes joined by 'x' (batch first)."""
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"a shape is positive sizes joined by 'x', e.g. 256x3x64x64; got {text!r}")
    return shape


_MARKERS = {"ours": "o", "k-diffusion": "s", "diffusers": "^", "torchsde": "D"}


def plot_best_by_library(records: list[dict], floor_range, title: str, path: str) -> str:
    """Per library, the best error at each NFE (left) and the best error reached within each wall
    time (right: the running minimum over runs sorted by time), with the exact-vs-exact floor range;
    the best solver's name is written at each point of our curve."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    libraries = list(dict.fromkeys(r.get("library", "ours") for r in records))
    for lib in libraries:
        recs = [r for r in records if r.get("library", "ours") == lib and math.isfinite(r["sw"])]
        best: dict[int, dict] = {}
        for r in recs:
            if r["budget"] not in best or r["sw"] < best[r["budget"]]["sw"]:
                best[r["budget"]] = r
        budgets = sorted(best)
        style = dict(marker=_MARKERS.get(lib, "x"), lw=2.2 if lib == "ours" else 1.3, label=lib,
                     ls="-" if lib == "ours" else "--")
        line, = axes[0].plot(budgets, [best[b]["sw"] for b in budgets], **style)
        if lib == "ours":
            for b in budgets:
                axes[0].annotate(best[b]["solver"].split("(")[0], (b, best[b]["sw"]), fontsize=6.5,
                                 xytext=(3, 4), textcoords="offset points", color=line.get_color())
        recs = sorted(recs, key=lambda r: r["time_ms"])
        front, running = [], float("inf")
        for r in recs:
            if r["sw"] < running:
                running = r["sw"]
                front.append(r)
        axes[1].step([r["time_ms"] for r in front], [r["sw"] for r in front], where="post", **style)
    lo, hi = floor_range
    for ax, xlabel in zip(axes, ("NFE budget", "wall time per run (ms)")):
        ax.axhspan(lo, hi, color="gray", alpha=0.2, lw=0, label="exact vs exact (floor range)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.7 * lo, min(ax.get_ylim()[1], 5.0))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("best sliced Wasserstein error")
    axes[0].set_title(f"{title}: best solver of each library per NFE", fontsize=10)
    axes[1].set_title("best error reached within a wall time", fontsize=10)
    axes[0].legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def replot(json_path: str, out: str) -> list[str]:
    """The best-by-library plots of a ``bench quality --out`` JSON file, one per (problem, SDE)."""
    import os

    with open(json_path) as fh:
        data = json.load(fh)
    groups: dict[tuple, list] = {}
    for rec in data["records"]:
        groups.setdefault((rec["problem"], rec["sde"]), []).append(rec)
    paths = []
    for (problem, sde), recs in groups.items():
        key = f"{problem}_{sde}"
        floor = data["floors"][key]
        floor_range = data.get("floor_ranges", {}).get(key, (floor, floor))
        paths.append(plot_best_by_library(recs, floor_range, f"{problem} mixture, {sde.upper()}",
                                          os.path.join(out, f"best_{key}.png")))
    return paths


def _gpu_sections():
    from .bench_gpu import SECTIONS

    return SECTIONS


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["path"]:  # its own parser: 'bench path --help' lists its options
        from .bench_path import main as path_main

        return path_main(argv[1:])
    if argv[:1] == ["distributed"]:  # its own parser: 'bench distributed --help' lists its options
        from .bench_distributed import main as distributed_main

        return distributed_main(argv[1:])
    if argv[:1] == ["evodiff"]:  # its own parser too
        from .bench_evodiff import main as evodiff_main

        return evodiff_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m samplers bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("overhead", help="solver cost per step in add_ passes (fixed-output network)")
    p.add_argument("--shape", type=int, nargs="+", default=[256, 3, 64, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peers", action="store_true", help="skip peers' samplers")
    p.add_argument("--noise", choices=["step", "path"], default="step", help="the runs' noise mode")
    p.add_argument("--json", help="also write the result to this JSON file")
    c = sub.add_parser("traffic", help="counted memory traffic per step in add_ passes (deterministic)")
    c.add_argument("--shape", type=int, nargs="+", default=[8, 3, 16, 16])
    c.add_argument("--json", help="also write the result to this JSON file")
    g = sub.add_parser("adaptive-em", help="AdaptiveEM at its NFE vs EulerMaruyama at 1x and 2x that NFE")
    g.add_argument("--sdes", nargs="+", default=["vp", "ve"])
    g.add_argument("--rtols", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    g.add_argument("--samples", type=int, default=4000)
    g.add_argument("--json", help="also write the rows to this JSON file")
    q = sub.add_parser("quality", help="error against the exact distribution vs NFE, every solver")
    q.add_argument("--problems", nargs="+", default=["2d", "64d"], choices=sorted(PROBLEMS))
    q.add_argument("--sdes", nargs="+", default=["vp", "ve", "edm"])
    q.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    q.add_argument("--samples", type=int, default=4000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", help="write all records (ours and the peers') to this JSON file")
    q.add_argument("--plots", help="directory for the demo's scatter + error-vs-NFE PNG per (problem, SDE)")
    q.add_argument("--out", help="directory for quality.json and error-vs-NFE / error-vs-time PNGs with the peers")
    q.add_argument("--peers", nargs="*", default=None, metavar="LIBRARY",
                   help="peer libraries to run side by side (default: every installed one of k-diffusion, "
                        "diffusers, torchsde; none with --no-peers)")
    q.add_argument("--no-peers", action="store_true", help="our solvers only")
    q.add_argument("--nfe-grid", action="store_true",
                   help="also run our fixed-grid solvers with sample(..., nfe=N) (grid_for_nfe's grid; labels '... @nfe')")
    q.add_argument("--optimize-grid", action="store_true",
                   help="also run our deterministic fixed-grid solvers on a grid optimize_grid fits from grid_for_nfe's "
                        "on 256 calibration samples of another seed (labels '... @optimize_grid')")
    q.add_argument("--solvers", nargs="+", default=None, metavar="LABEL",
                   help="only these of our solvers (labels as printed, e.g. 'Heun(eta=0)')")
    r = sub.add_parser("replot", help="best-by-library plots from a 'bench quality --out' JSON file")
    r.add_argument("json", help="quality.json written by 'bench quality --out'")
    r.add_argument("--out", required=True, help="directory for best_PROBLEM_SDE.png")
    v = sub.add_parser("convergence", help="measured order of every fixed-step solver beside the theoretical one")
    v.add_argument("--sdes", nargs="+", default=["edm", "vp"])
    v.add_argument("--weak-samples", type=int, default=1_000_000, help="scalar samples for the weak errors")
    v.add_argument("--json", help="also write the rows to this JSON file")
    kb = sub.add_parser("kernels", help="fused CUDA step kernels vs the torch path: GPU time per step, bandwidth "
                                        "(needs a GPU and CuPy)")
    kb.add_argument("--shapes", nargs="+", type=_batch_shape, default=["256x3x64x64", "64x4x128x128"],
                    help="batch shapes, e.g. 256x3x64x64")
    kb.add_argument("--json", help="also write the result to this JSON file")
    gb = sub.add_parser("gpu", help="every check of the CUDA path on one GPU (tests, kernels, syncs, graphs, "
                                    "bandwidth, end to end, NCCL): DIR/gpu.json and DIR/gpu.log")
    gb.add_argument("--out", required=True, help="directory for gpu.json, gpu.log and gpu_tests.log")
    gb.add_argument("--sections", nargs="+", default=None, metavar="SECTION",
                    help="only these sections (default: all), of: " + ", ".join(_gpu_sections()))
    gb.add_argument("--budget-s", type=float, default=330.0,
                    help="skip the sections not started within this many seconds (default 330)")
    sub.add_parser("evodiff", add_help=False,
                   help="EVODiff at NFE 5-20 beside DPM-Solver++(2M), UniPC and ER-SDE, and its constants' ablation "
                        "(see 'bench evodiff --help')")
    gr = sub.add_parser("grid", help="optimize_grid on exact mixtures: held-out distance to the reference, default "
                                     "vs optimised grid, and its cost in seconds")
    from .bench_grid import add_arguments as add_grid_arguments

    add_grid_arguments(gr)
    sub.add_parser("distributed", add_help=False,
                   help="samples/s of sharded sampling with 1, 2, ... gloo CPU processes (see 'bench distributed --help')")
    args = parser.parse_args(argv)
    if args.what == "gpu":
        from .bench_gpu import SECTIONS, run_gpu_checks

        sections = SECTIONS if args.sections is None else tuple(args.sections)
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            parser.error(f"argument --sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
        return run_gpu_checks(args.out, sections=sections, budget_s=args.budget_s)
    if args.what == "kernels":
        from .bench_kernels import bench_kernels, print_kernel_bench

        try:
            result = bench_kernels(tuple(args.shapes))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 2
        print_kernel_bench(result)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
        return 0
    if args.what == "quality":
        return _quality_command(args)
    if args.what == "grid":
        from .bench_grid import run as run_grid_bench

        return run_grid_bench(args)
    if args.what == "replot":
        for path in replot(args.json, args.out):
            print("wrote", path)
        return 0
    if args.what == "convergence":
        from .convergence import measure_orders

        print("| SDE | solver | kind | theory | measured | errors (at the step counts) | note |")
        print("|---|---|---|---|---|---|---|")
        rows = measure_orders(tuple(args.sdes), weak_samples=args.weak_samples, log=lambda line: print(line, flush=True))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0
    if args.what == "adaptive-em":
        print("| SDE | problem | rtol | mean NFE | NFE min / median / max | AdaptiveEM | EM same NFE | EM 2x NFE |")
        print("|---|---|---|---|---|---|---|---|")
        rows = adaptive_em_vs_em(tuple(args.sdes), tuple(args.rtols), args.samples, log=print)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0
    if args.what == "traffic":
        result = traffic(tuple(args.shape))
        print(f"batch {tuple(result['shape'])}: counted full-batch reads and writes per step, in add_ passes")
        for row in result["solvers"] + result["peers"]:
            print(f"{row.get('solver') or row['peer']:<56} {row['passes_per_model_call']:>6.2f} passes/model call")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    if args.what == "overhead":
        result = overhead(tuple(args.shape), repeats=args.repeats, peers=not args.no_peers, noise=args.noise)
        _print_overhead(result)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    return 0
