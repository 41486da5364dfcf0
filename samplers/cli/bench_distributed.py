"""``python -m samplers bench distributed``: throughput of sharded sampling with 1, 2, ... gloo CPU processes.

A small MLP eps-network sampled by :func:`samplers.distributed.sample_distributed` in process groups
of each size, timed between barriers; the speed-up says how far sharding over processes pays on
this machine (measured numbers: docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..distributed import sample_distributed
from ..model import Model

__all__ = ["throughput", "main"]


class _MLP(torch.nn.Module):
    """A small eps-network: time-embedded MLP (dim -> hidden -> hidden -> dim), fixed random weights."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1, hidden, generator=g) / math.sqrt(dim + 1))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden))
        self.w3 = torch.nn.Parameter(torch.randn(hidden, dim, generator=g) / math.sqrt(hidden) * 0.1)

    def forward(self, x, t):
        h = torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=1)
        h = torch.nn.functional.silu(h @ self.w1.to(x.dtype))
        h = torch.nn.functional.silu(h @ self.w2.to(x.dtype))
        return h @ self.w3.to(x.dtype)


def _bench_model(dim, hidden):
    from sde import VPSDE

    return Model(_MLP(dim, hidden).requires_grad_(False), VPSDE(), "eps")


def _bench_worker(rank, world, store, result_path, n, dim, hidden, steps, batch_size, repeats):
    import torch.distributed as dist

    from solvers import DPMSolver

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _bench_model(dim, hidden)
        with torch.no_grad():
            sample_distributed(model, DPMSolver(2), min(n, 64), (dim,), steps=steps, seed=1)  # warm-up
            best = math.inf
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                sample_distributed(model, DPMSolver(2), n, (dim,), steps=steps, seed=0, batch_size=batch_size,
                                   gather=0)
                dist.barrier()
                best = min(best, time.perf_counter() - t0)
        if rank == 0:
            Path(result_path).write_text(json.dumps({"seconds": best}))
    finally:
        dist.destroy_process_group()


def throughput(*, n: int = 4096, world_sizes=(1, 2), dim: int = 64, hidden: int = 256, steps: int = 20,
               batch_size: int = 512, repeats: int = 3) -> list[dict]:
    """Samples per second with each number of gloo CPU processes (1 thread each).

    The network is a small MLP eps-model (``dim`` -> ``hidden`` -> ``hidden`` -> ``dim``) on VP,
    sampled with DPM-Solver++(2M) for ``steps`` steps, gathered on rank 0; the best of
    ``repeats`` timed runs (between barriers, process start excluded).
    """
    import torch.multiprocessing as mp

    rows = []
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store, result = os.path.join(tmp, "store"), os.path.join(tmp, "result.json")
            mp.spawn(_bench_worker, args=(world, store, result, n, dim, hidden, steps, batch_size, repeats),
                     nprocs=world, join=True)
            seconds = json.loads(Path(result).read_text())["seconds"]
        rows.append({"processes": world, "n": n, "seconds": seconds, "samples_per_s": n / seconds})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samplers bench distributed",
                                     description="Throughput of sharded sampling with 1, 2, ... gloo CPU processes.")
    parser.add_argument("-n", type=int, default=4096, help="samples per run (default 4096)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    worlds = tuple(int(p) for p in args.processes.split(","))
    rows = throughput(n=args.n, world_sizes=worlds, dim=args.dim, hidden=args.hidden, steps=args.steps,
                      batch_size=args.batch_size, repeats=args.repeats)
    print(f"MLP eps-net {args.dim}->{args.hidden}->{args.hidden}->{args.dim}, VP, DPM-Solver++(2M) "
          f"{args.steps} steps, n={args.n}, batch {args.batch_size}, 1 thread per process")
    print("| processes | seconds | samples/s | speedup |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['seconds']:.3f} | {r['samples_per_s']:.0f} | {r['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    import samplers.cli.bench_distributed as _self  # the real module, so spawned workers find the functions

    sys.exit(_self.main())
