"""``python -m samplers sample``: sample a user's own network to shard files, resumably.

    python -m samplers sample --model mypkg.nets:unet --sde vp --predicts eps \\
        --solver dpm++2m --steps 20 -n 100000 --shape 3,32,32 --out runs/unet

``--model module:attr`` names a :class:`samplers.Model` (which knows its SDE and what it
predicts) or a callable network ``net(x, t)`` (then ``--sde`` and ``--predicts`` build the Model).
The samples go to ``--out`` as shards with a checksummed index (see :mod:`samplers.distributed`);
a rerun with the same arguments skips the shards already written and complete (and is refused if the
network's weights changed: the index records their fingerprint).  Sizes beyond
:mod:`samplers.limits` or the machine's memory, and an ``--out`` that cannot be written, stop it
before the network is loaded (exit status 2).  Under
``torchrun`` every process takes its share of the shards (gloo on CPUs, NCCL when ``--device
cuda``); otherwise one process does all.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from ..limits import MAX_SAMPLES, MAX_STEPS
from .registry import ADAPTIVE_SOLVER_NAMES, SDES, SOLVER_NAMES, solver_by_name

__all__ = ["build_parser", "load_model", "main"]


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(spec: str, sde: str | None = None, predicts: str | None = None):
    """The Model named by ``module:attr`` (a samplers.Model, or a callable net with sde/predicts)."""
    from sde import PREDICTIONS
    from sde.validation import check_predicts

    from ..model import Model

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like 'module:attr' (e.g. mypkg.nets:unet), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model: cannot import module {module_name!r} ({exc})") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Model):
        if sde is not None or predicts is not None:
            raise ValueError(f"--model {spec} is already a samplers.Model (it has its SDE and prediction): "
                             "drop --sde/--predicts")
        return obj
    if not callable(obj):
        raise ValueError(f"--model {spec} is a {type(obj).__name__}: expected a samplers.Model or a callable "
                         "network net(x, t)")
    if sde is None:
        raise ValueError(f"--model {spec} is a network, not a samplers.Model: pass --sde (one of "
                         f"{', '.join(sorted(SDES))}) and --predicts")
    if sde not in SDES:
        raise ValueError(f"--sde must be one of {', '.join(sorted(SDES))}, got {sde!r}")
    predicts = predicts or "eps"
    try:  # the Model's own check, named as the flag
        check_predicts(predicts, PREDICTIONS)
    except ValueError as exc:
        raise ValueError(f"--predicts: {exc}") from None
    if isinstance(obj, torch.nn.Module):
        obj.eval().requires_grad_(False)
    return Model(obj, SDES[sde](), predicts)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (e.g. 3,32,32), "
                                         f"got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return shape


def _int_arg(expected: str, accepts):
    """An argparse type: an integer that ``accepts``, else "expected <expected>, got <text>"."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or not accepts(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return parse


_steps = _int_arg(f"an integer in [1, {MAX_STEPS}] (samplers.limits.MAX_STEPS)", lambda v: 1 <= v <= MAX_STEPS)
_count = _int_arg(f"an integer in [1, {MAX_SAMPLES}] (samplers.limits.MAX_SAMPLES)", lambda v: 1 <= v <= MAX_SAMPLES)
_seed = _int_arg("an integer in [0, 2^64)", lambda v: 0 <= v < 2**64)


def build_parser(prog: str = "python -m samplers sample") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].strip("` "),
                                epilog="Rerun the same command to resume a killed run; under torchrun each "
                                       "process takes its share of the shards.")
    p.add_argument("--model", required=True, help="module:attr of a samplers.Model or of a network net(x, t)")
    p.add_argument("--sde", default=None, help="the SDE the network was trained with (when --model is a network)")
    p.add_argument("--predicts", default=None, help="what the network returns: eps (default), x0, v, score, velocity")
    p.add_argument("--solver", required=True, choices=SOLVER_NAMES, metavar="SOLVER",
                   help=f"one of {', '.join(SOLVER_NAMES)}")
    p.add_argument("--steps", type=_steps, default=None, help="number of steps (not for adaptive solvers)")
    p.add_argument("--nfe", type=_steps, default=None,
                   help="instead of --steps: a budget of network calls, on the grid samplers.grid_for_nfe gives")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (adaptive solvers only)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (adaptive solvers only)")
    p.add_argument("-n", type=_count, required=True, help="number of samples")
    p.add_argument("--shape", type=_shape, required=True, help="shape of one sample, e.g. 3,32,32")
    p.add_argument("--seed", type=_seed, default=0, help="seed (default 0); sample i's noise is keyed by (seed, i)")
    p.add_argument("--batch-size", type=_count, default=256, help="samples per network batch (default 256)")
    p.add_argument("--shard-size", type=_count, default=1024, help="samples per shard file (default 1024)")
    p.add_argument("--format", choices=("pt", "npz"), default="pt", help="shard file format (default pt)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="sample dtype (default: the network's parameters' dtype when it is a torch.nn.Module, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda (= cuda:LOCAL_RANK) or cuda:K (default: cpu)")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    return p


def _init_group(device: torch.device):
    """(group_created_here, world): the torchrun process group, initialised if needed."""
    import torch.distributed as dist

    if not dist.is_available():
        return False, 1
    if dist.is_initialized():
        return False, dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True, dist.get_world_size()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    adaptive = args.solver in ADAPTIVE_SOLVER_NAMES
    if adaptive and (args.steps is not None or args.nfe is not None):
        parser.error(f"--steps/--nfe: {args.solver} chooses its own steps; pass --rtol/--atol instead")
    if not adaptive and (args.steps is None) == (args.nfe is None):
        parser.error(f"pass one of --steps or --nfe with --solver {args.solver}")
    if not adaptive and (args.rtol is not None or args.atol is not None):
        parser.error(f"--rtol/--atol apply only to the adaptive solvers ({', '.join(ADAPTIVE_SOLVER_NAMES)})")
    for name in ("rtol", "atol"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            parser.error(f"--{name} must be positive, got {v}")
    dtype = None if args.dtype is None else _DTYPES[args.dtype]
    if args.format == "npz" and dtype == torch.bfloat16:
        parser.error("--format npz cannot store --dtype bfloat16 (numpy has no bfloat16): use --format pt")
    if args.device in (None, "cpu"):
        device = torch.device("cpu")
    elif args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: not a device: {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    from ..distributed import check_out_dir, check_run_size, sample_distributed

    # before the network is loaded and before anything is computed: sizes the machine cannot hold and
    # an output directory that cannot be written (checked by trying: permission bits do not stop root)
    try:
        check_run_size(args.n, args.shape, batch_size=args.batch_size, shard_size=args.shard_size, steps=args.steps,
                       dtype=dtype, device=device, world=max(int(os.environ.get("WORLD_SIZE", "1")), 1),
                       names={"n": "-n", "shape": "--shape", "batch_size": "--batch-size",
                              "shard_size": "--shard-size", "steps": "--steps"})
        check_out_dir(args.out, "--out")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        model = load_model(args.model, args.sde, args.predicts)
        solver = solver_by_name(args.solver, args.rtol, args.atol)
    except ValueError as exc:
        parser.error(str(exc))

    created, world = _init_group(device)
    try:
        kwargs = {} if adaptive else {"steps": args.steps} if args.nfe is None else {"nfe": args.nfe}
        run = {"model": args.model, "sde": args.sde, "predicts": args.predicts}
        try:
            with torch.no_grad():
                _, info = sample_distributed(model, solver, args.n, args.shape, seed=args.seed,
                                             batch_size=args.batch_size, out_dir=args.out,
                                             shard_size=args.shard_size, shard_format=args.format, device=device,
                                             dtype=dtype, run_config=run, return_info=True, **kwargs)
        except ValueError as exc:  # e.g. the directory holds a run with other settings
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if info.rank == 0:
            written = sum(r["shards_written"] for r in info.ranks)
            skipped = sum(r["shards_skipped"] for r in info.ranks)
            print(f"{args.n} samples in {args.out} ({world} process{'es' if world > 1 else ''}): "
                  f"{written} shards written, {skipped} already complete; index {info.index_path}")
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
