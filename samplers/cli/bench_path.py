"""``python -m samplers bench path``: what one keyed Brownian path per sample buys (``noise="path"``).

* strong convergence in the step count: with one seed, the RMS distance between the N-step and the
  2N-step samples for N = 10, 20, ..., 320, and the slope of its log against log N (negative: the
  samples converge to one limit as the grid refines), beside the distance between two seeds;
* the same-mode fraction at 20 vs 40 steps (the nearest mixture component of the two samples agrees);
* the noise's cost per step against today's per-step keyed draw, for grids of 10 to 1000 steps.

All on the 64-D Gaussian mixture (:func:`samplers.problems.mixture_64d`) with its exact x0 network under
the VP SDE, float64, default grids.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

__all__ = ["path_solvers", "strong_convergence", "same_mode", "noise_cost", "main"]


def path_solvers() -> list[tuple[str, object]]:
    """(label, solver) for every fixed-grid stochastic solver that takes a Brownian path."""
    import solvers as S
    from solvers.pc import AncestralSampling, PredictorCorrector, ReverseDiffusion

    return [
        ("EulerMaruyama", S.EulerMaruyama()),
        ("Heun(eta=1)", S.Heun(eta=1.0)),
        ("DPMSolverSDE(1)", S.DPMSolverSDE(1)),
        ("DPMSolverSDE(2)", S.DPMSolverSDE(2)),
        ("DPMSolverSDE(3)", S.DPMSolverSDE(3)),
        ("ERSDE(3)", S.ERSDE(3)),
        ("ReverseDiffusion", ReverseDiffusion()),
        ("AncestralSampling", AncestralSampling()),
        ("PC(ReverseDiffusion+Langevin)", PredictorCorrector(ReverseDiffusion())),
        ("Restart(Heun)", S.Restart(ode_solver=S.Heun(), intervals=[(0.2, 1.5, 2, 2)])),
        ("Reversible(eta=1)", S.Reversible(eta=1.0)),
    ]


def _model():
    from sde import VPSDE

    from ..model import Model
    from ..problems import mixture_64d

    mixture = mixture_64d()
    sde = VPSDE()
    return Model(mixture.net(sde, "x0"), sde, predicts="x0"), mixture


def _run(model, solver, steps: int, seed: int, samples: int, noise: str) -> torch.Tensor:
    from ..sample import sample

    return sample(model, solver, shape=(samples, 64), steps=steps, seed=seed, dtype=torch.float64, noise=noise)


def _rms(a, b) -> float:
    return float(((a - b) ** 2).sum(dim=1).mean().sqrt())


def _median(a, b) -> float:
    return float((a - b).norm(dim=1).median())


def fitted_slope(ns, values) -> float:
    """Least-squares slope of log(values) against log(ns)."""
    x = torch.log(torch.tensor(ns, dtype=torch.float64))
    y = torch.log(torch.tensor(values, dtype=torch.float64))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def strong_convergence(solver, ns=(10, 20, 40, 80, 160, 320), samples: int = 64, noise: str = "path",
                       model=None) -> dict:
    """RMS and median distance between the N- and 2N-step samples of one seed for each N, their fitted
    slopes in N, and the distance between two seeds at the largest N.  The RMS is dominated by the rare
    sample that sits on a boundary between two modes and still changes mode between N and 2N; the
    median is not."""
    model = model or _model()[0]
    runs = {n: _run(model, solver, n, 0, samples, noise) for n in sorted(set(ns) | {2 * n for n in ns})}
    distances = [_rms(runs[n], runs[2 * n]) for n in ns]
    medians = [_median(runs[n], runs[2 * n]) for n in ns]
    other_seed = _rms(runs[2 * ns[-1]], _run(model, solver, 2 * ns[-1], 1, samples, noise))
    return {"ns": list(ns), "distance": distances, "slope": fitted_slope(ns, distances), "median": medians,
            "median_slope": fitted_slope(ns, medians), "two_seeds": other_seed}


def _modes(x, mixture) -> torch.Tensor:
    return ((x[:, None, :] - mixture.means[None]) ** 2).sum(-1).argmin(dim=1)


def same_mode(solver, steps=(20, 40), samples: int = 512, noise: str = "path") -> dict:
    """The fraction of samples whose nearest mixture mean is the same at the two step counts (same seed),
    and with a different seed at the second step count (what unrelated samples give)."""
    model, mixture = _model()
    a = _run(model, solver, steps[0], 0, samples, noise)
    b = _run(model, solver, steps[1], 0, samples, noise)
    c = _run(model, solver, steps[1], 1, samples, noise)
    return {"same_seed": float((_modes(a, mixture) == _modes(b, mixture)).double().mean()),
            "other_seed": float((_modes(a, mixture) == _modes(c, mixture)).double().mean()),
            "rms_same_seed": _rms(a, b), "rms_other_seed": _rms(a, c)}


def noise_cost(shape=(64, 3, 64, 64), steps=(10, 30, 100, 300, 1000), repeats: int = 3) -> list[dict]:
    """Per step of a grid (one thread), the time of Euler-Maruyama's noise in path mode (the increment of the keyed path,
    normalised) over that of the per-step keyed draw, for the default VP grid; both into one buffer, as
    the driver does; best of ``repeats``."""
    import solvers as S
    from sde import VPSDE

    from ..brownian import grid_path_draws
    from ..driver import run_grid
    from ..model import Model
    from ..noise import STREAM_STEP, NoiseSource

    sde = VPSDE()
    model = Model(lambda x, t: x, sde, predicts="eps")
    like = torch.empty(shape)
    buf = torch.empty(shape)
    rows = []
    for n in steps:
        table_times = run_grid(sde, n, None, None, shape[0])[1]
        source = NoiseSource(0, shape[0], mode="path")

        def step_draws():
            for k in range(n):
                source.normal(shape[1:], counter=k, stream=STREAM_STEP, out=buf)

        def path_draws():
            walkers = grid_path_draws(S.EulerMaruyama().brownian_draws(model, table_times), source, like, table_times)
            for k in range(n):
                walkers[(k, 0)].increment((k, 0), buf)

        add_x, add_y = torch.zeros(shape), torch.ones(shape)
        best = {"step": math.inf, "path": math.inf, "add": math.inf}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # OpenMP threads on a busy machine measure the scheduler, not the work
        try:
            for _ in range(repeats):  # alternated, so load on the machine hits both alike
                best["step"] = min(best["step"], _time(step_draws))
                best["path"] = min(best["path"], _time(path_draws))
                best["add"] = min(best["add"], _time(lambda: add_x.add_(add_y)))
        finally:
            torch.set_num_threads(threads)
        rows.append({"steps": n, "step_passes": best["step"] / n / best["add"],
                     "path_passes": best["path"] / n / best["add"], "path_over_step": best["path"] / best["step"]})
    return rows


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samplers bench path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="samples in the strong-convergence runs")
    parser.add_argument("--mode-samples", type=int, default=512, help="samples in the same-mode runs")
    parser.add_argument("--ns", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320])
    parser.add_argument("--solvers", nargs="+", help="labels to run (default: all)")
    parser.add_argument("--cost-shape", type=int, nargs="+", default=[64, 3, 64, 64])
    parser.add_argument("--skip", nargs="*", default=[], choices=["convergence", "modes", "cost"])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small batches: OpenMP threads on a busy machine cost more than they give
    chosen = [(label, s) for label, s in path_solvers() if not args.solvers or label in args.solvers]
    result: dict = {}
    if "convergence" not in args.skip:
        print(f"strong convergence: RMS |x_N - x_2N| (one seed), N = {args.ns}; slope in N; two seeds at N = "
              f"{2 * args.ns[-1]}")
        rows = result["convergence"] = []
        for label, solver in chosen:
            for noise in ("path", "step"):
                r = strong_convergence(solver, tuple(args.ns), args.samples, noise)
                rows.append({"solver": label, "noise": noise, **r})
                print(f"{label:<30} {noise:<5} RMS slope {r['slope']:+.2f} median slope {r['median_slope']:+.2f}  "
                      f"two seeds {r['two_seeds']:.2f}  RMS " + " ".join(f"{d:.3g}" for d in r["distance"])
                      + "  median " + " ".join(f"{d:.3g}" for d in r["median"]), flush=True)
    if "modes" not in args.skip:
        print("same-mode fraction at 20 vs 40 steps (one seed; another seed in brackets)")
        rows = result["modes"] = []
        for label, solver in chosen:
            line = f"{label:<30}"
            for noise in ("path", "step"):
                r = same_mode(solver, samples=args.mode_samples, noise=noise)
                rows.append({"solver": label, "noise": noise, **r})
                line += f" {noise}: {r['same_seed']:.2f} ({r['other_seed']:.2f}) rms {r['rms_same_seed']:.2f}"
            print(line, flush=True)
    if "cost" not in args.skip:
        shape = tuple(args.cost_shape)
        print(f"noise cost per step, batch {shape} float32, 1 thread, in x.add_(y) passes: path / per-step draw")
        rows = result["cost"] = noise_cost(shape)
        for r in rows:
            print(f"{r['steps']:>5} steps: step {r['step_passes']:.1f} passes, path {r['path_passes']:.1f} passes, "
                  f"ratio {r['path_over_step']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if all(math.isfinite(r["slope"]) for r in result.get("convergence", [])) else 1
