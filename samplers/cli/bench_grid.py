"""``python -m samplers bench grid``: what :func:`samplers.optimize_grid` gains on held-out noise, and its cost.

On exact Gaussian-mixture problems (the exact x0 network, so the only error is the solver's), for each
solver and NFE: the grid is optimised on a calibration batch (seed 0), then the default grid and the
optimised grid are both run from *held-out* noise (another seed) and compared with a tight reference
solution from that noise (DPM-Solver(3) on 500 log-SNR steps, float64).  The distance is the RMS over
samples and elements (:func:`samplers.optimize_grid.grid_distance`).  The cost is the optimiser's wall
time and CPU time on this machine (one torch thread by default), its reference run included.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

__all__ = ["GRID_PROBLEMS", "grid_problem", "bench_grid", "main"]

#: the problems of this benchmark by default (any name of samplers.cli.registry.PROBLEMS runs)
GRID_PROBLEMS = ("2d", "8d", "64d")


def grid_problem(problem: str, sde_name: str):
    """(Model of the exact x0 network, dimension) of a problem of the registry under an SDE name."""
    from .registry import exact_problem

    _, mixture, model = exact_problem(problem, sde_name)
    return model, mixture.dim


def _solvers():
    from solvers import DPMSolver, UniPC

    return [DPMSolver(2), UniPC()]


def bench_grid(problems=GRID_PROBLEMS, sdes=("vp", "edm"), budgets=(4, 5, 6, 8, 10), methods=("dp+descent",),
               calibration: int = 256, held_out: int = 1024, max_evals: int = 200, log=None) -> list[dict]:
    """One row per (problem, SDE, solver, NFE, method): held-out distances of the default and the optimised
    grid, the calibration objective before and after, evaluations and seconds."""
    from ..optimize_grid import grid_distance, optimize_grid
    from ..sample import sample

    rows = []
    for problem in problems:
        for sde_name in sdes:
            model, dim = grid_problem(problem, sde_name)
            kw = dict(dtype=torch.float64, final_denoise=True)
            x_held = sample_prior(model, held_out, dim, seed=1)
            from solvers import DPMSolver

            reference = sample(model, DPMSolver(3), x_T=x_held, steps=500, grid_kind="log_snr", **kw)
            for solver in _solvers():
                for nfe in budgets:
                    steps = solver.steps_for_nfe(nfe, True)
                    default = sample(model, solver, x_T=x_held, steps=steps, **kw)
                    d_default = grid_distance(default, reference)
                    for method in methods:
                        result = optimize_grid(model, solver, nfe, shape=(calibration, dim), seed=0,
                                               method=method, max_evals=max_evals, progress=False, **kw)
                        optimised = sample(model, solver, x_T=x_held, grid=result.times, **kw)
                        d_opt = grid_distance(optimised, reference)
                        row = dict(problem=problem, sde=sde_name, solver=repr(solver), nfe=nfe, steps=steps,
                                   method=method, default=d_default, optimised=d_opt,
                                   gain=d_default / d_opt if d_opt > 0 else math.inf,
                                   calibration_start=result.objective_start, calibration=result.objective,
                                   evaluations=result.evaluations, seconds=result.seconds,
                                   cpu_seconds=result.cpu_seconds,
                                   times=[float(t) for t in result.times])
                        rows.append(row)
                        if log is not None:
                            log(_row_line(row))
    return rows


def sample_prior(model, batch: int, dim: int, seed: int) -> torch.Tensor:
    """x_T of ``batch`` samples drawn from the prior keyed by ``seed``, as ``sample(shape=...)`` draws it."""
    from ..noise import STREAM_PRIOR, NoiseSource

    z = NoiseSource(seed, batch).normal((dim,), counter=0, stream=STREAM_PRIOR, dtype=torch.float64)
    return model.sde.prior_sample((batch, dim), normal=z)


HEADER = ("| problem | SDE | solver | NFE | method | default grid | optimised | gain | calibration before -> after "
          "| runs | seconds (CPU) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _row_line(row: dict) -> str:
    return (f"| {row['problem']} | {row['sde']} | {row['solver']} | {row['nfe']} | {row['method']} | "
            f"{row['default']:.4g} | {row['optimised']:.4g} | {row['gain']:.1f}x | "
            f"{row['calibration_start']:.4g} -> {row['calibration']:.4g} | {row['evaluations']} | "
            f"{row['seconds']:.1f} ({row['cpu_seconds']:.1f}) |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .registry import PROBLEMS

    parser.add_argument("--problems", nargs="+", default=list(GRID_PROBLEMS), choices=sorted(PROBLEMS))
    parser.add_argument("--sdes", nargs="+", default=["vp", "edm"], choices=["vp", "edm", "ve", "subvp", "cosine",
                                                                           "rf"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--methods", nargs="+", default=["dp+descent"], choices=["dp+descent", "descent", "dp"])
    parser.add_argument("--calibration", type=int, default=256, help="calibration samples (seed 0; default 256)")
    parser.add_argument("--held-out", type=int, default=1024, help="held-out samples (seed 1; default 1024)")
    parser.add_argument("--max-evals", type=int, default=200, help="optimize_grid's max_evals (default 200)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the costs are those of one core)")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def run(args) -> int:
    if any(n < 2 for n in args.nfe):
        print("--nfe: every budget must be >= 2 (one step and the final denoise)", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("--threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(HEADER, flush=True)
    rows = bench_grid(tuple(args.problems), tuple(args.sdes), tuple(args.nfe), tuple(args.methods),
                      calibration=args.calibration, held_out=args.held_out, max_evals=args.max_evals,
                      log=lambda line: print(line, flush=True))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samplers bench grid", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
