"""``python -m samplers grid``: fit a time grid to a network with :func:`samplers.optimize_grid`, save it as JSON.

    python -m samplers grid --problem 2d --sde vp --solver dpm++2m --nfe 6 --out grid.json
    python -m samplers grid --model mypkg.nets:unet --sde vp --predicts eps --shape 3,32,32 \\
        --solver unipc --nfe 8 --out grid.json

The model is a built-in exact problem (``--problem 2d|64d`` with ``--sde``: the exact x0 network of
:mod:`samplers.problems`), or ``--model module:attr`` naming a :class:`samplers.Model` or a network
``net(x, t)`` (with ``--sde`` and ``--predicts``), as ``python -m samplers sample`` reads it; then
``--shape`` gives the shape of one sample.  The grid file loads with :func:`samplers.load_grid` and
passes to ``sample(grid=...)``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .registry import PROBLEMS, SDES, SOLVER_NAMES, solver_by_name
from .sample import _DTYPES, _count, _seed, _shape, load_model

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "python -m samplers grid") -> argparse.ArgumentParser:
    from ..optimize_grid import GRID_METHODS

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].strip("` "),
                                epilog="Load the file with samplers.load_grid(path) and pass it to sample(grid=...).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--problem", choices=sorted(PROBLEMS), help="a built-in exact problem (needs --sde)")
    which.add_argument("--model", help="module:attr of a samplers.Model or of a network net(x, t)")
    p.add_argument("--sde", default=None, help=f"one of {', '.join(sorted(SDES))}: the problem's SDE, or the one the "
                                               "network was trained with")
    p.add_argument("--predicts", default=None, help="what the network returns: eps (default), x0, v, score, velocity")
    p.add_argument("--shape", type=_shape, default=None, help="shape of one sample, e.g. 3,32,32 (with --model)")
    p.add_argument("--solver", required=True, choices=SOLVER_NAMES, metavar="SOLVER",
                   help=f"a deterministic one of {', '.join(SOLVER_NAMES)}")
    p.add_argument("--nfe", type=_count, required=True, help="network calls of a run on the grid")
    p.add_argument("--no-final-denoise", action="store_true",
                   help="the grid's runs end without the final denoising call (then pass final_denoise=False to "
                        "sample too)")
    p.add_argument("--to-zero", action="store_true",
                   help="start from the default grid ending at sigma = 0 (grid(..., to_zero=True)): NFE calls, NFE steps")
    p.add_argument("--batch-size", type=_count, default=256, help="calibration samples (default 256)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the calibration noise (default 0)")
    p.add_argument("--method", choices=GRID_METHODS, default="dp+descent", help="default dp+descent")
    p.add_argument("--max-evals", type=_count, default=200, help="most runs on the calibration batch (default 200)")
    p.add_argument("--reference-steps", type=_count, default=500, help="steps of the reference run (default 500)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="dtype of the runs (default: float64 for --problem; for --model as in sample)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda[:K]")
    p.add_argument("--out", required=True, help="the grid file to write (JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..optimize_grid import optimize_grid

    try:
        if args.problem is not None:
            from .registry import exact_problem

            if args.sde not in SDES:
                parser.error(f"--problem needs --sde, one of {', '.join(sorted(SDES))}; got {args.sde!r}")
            if args.predicts is not None or args.shape is not None:
                parser.error("--predicts and --shape apply only to --model (a problem knows its network and dimension)")
            _, mixture, model = exact_problem(args.problem, args.sde)
            shape: tuple[int, ...] = (args.batch_size, mixture.dim)
            dtype = torch.float64 if args.dtype is None else _DTYPES[args.dtype]
        else:
            if args.shape is None:
                parser.error("--model needs --shape, the shape of one sample (e.g. 3,32,32)")
            model = load_model(args.model, args.sde, args.predicts)
            shape = (args.batch_size, *args.shape)
            dtype = None if args.dtype is None else _DTYPES[args.dtype]
        solver = solver_by_name(args.solver)
    except ValueError as exc:
        parser.error(str(exc))
    start = None
    if args.to_zero:
        from ..grid import grid as make_grid

        steps = solver.steps_for_nfe(args.nfe, False)
        try:
            start = make_grid(model.sde, max(steps, 1), to_zero=True)
        except ValueError as exc:
            parser.error(f"--to-zero: {exc}")
    try:
        with torch.no_grad():
            result = optimize_grid(model, solver, args.nfe, shape=shape, seed=args.seed, start=start,
                                   final_denoise=False if args.to_zero or args.no_final_denoise else True,
                                   method=args.method,
                                   max_evals=args.max_evals, reference_steps=args.reference_steps, dtype=dtype,
                                   device=args.device, progress=not args.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = result.save(args.out)
    print(f"{result.solver} at NFE {result.nfe} ({result.steps} steps) on {result.sde}: distance to the reference "
          f"{result.objective_start:.4g} (start grid) -> {result.objective:.4g} on {result.batch_size} calibration "
          f"samples, {result.evaluations} runs, {result.seconds:.1f} s")
    print("times:", " ".join(f"{float(t):.6g}" for t in result.times))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
