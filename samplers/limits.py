"""Size limits of a run, checked in its plan before anything is allocated.

A step count, a number of samples or a state the machine cannot hold is refused with a message
naming the argument and the limit, instead of an allocation that grows until the process is
killed.  The limits refuse what cannot work, never what merely is slow, and are defined here once
for every entry point (``sample``, ``invert``, ``likelihood``, ``sample_distributed``, the CLI).
Memory is checked against a lower bound of what the run must hold, so a refusal is always right.
Details: docs/api.md, "samplers.limits"; why the bounds are where they are: docs/measurements.md,
"Size limits".
"""

from __future__ import annotations

import math
import os

import torch

from sde.validation import check_count

__all__ = ["MAX_STEPS", "MAX_SAMPLES", "MAX_SHARDS", "check_steps", "available_memory", "format_bytes",
           "check_memory", "run_memory_bytes", "check_state_memory"]

#: the most steps a grid may have (see the module)
MAX_STEPS = 100_000
#: Most samples of one sharded run: shard files carry 9-digit sample indices, so names sort in index
#: order up to this; 10^9 samples of even one float32 each are 4 GB of output.
MAX_SAMPLES = 10**9
#: Most shard files of one run: the index keeps one record (about 150 bytes of JSON) per shard and
#: every process rewrites its progress file after each shard it writes.
MAX_SHARDS = 100_000


def check_steps(steps, name: str = "steps") -> int:
    """``steps`` as an int in [1, MAX_STEPS], or a ValueError naming ``name``."""
    steps = check_count(name, steps, why=f" (at most MAX_STEPS={MAX_STEPS})")
    if steps > MAX_STEPS:
        raise ValueError(f"{name}={steps} is more than MAX_STEPS={MAX_STEPS} (samplers.limits): no sampler needs "
                         "that many steps, and the plan's per-step tables would be allocated before the first step")
    return steps


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:  # not this kind of machine (no such cgroup file): that source is unknown
        return None
    return int(text) if text.isdigit() else None


def _host_available() -> int | None:
    """Bytes this process can still allocate on the host: the kernel's MemAvailable, lowered to what
    is left under a cgroup memory limit (v2 or v1) when one is set; None where neither is readable."""
    candidates = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass  # not Linux: fall back to sysconf below
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):  # this platform names neither
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # 2^63-ish means "no limit"
            candidates.append(max(limit - usage, 0))
    return min(candidates) if candidates else None


def available_memory(device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CPU: the host's available memory within any
    cgroup limit; CUDA: the free device memory plus what torch's allocator holds unused), or None
    where it cannot be known (e.g. the meta device)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _host_available()
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_memory(needed: int, device, what: str, advice: str) -> None:
    """Refuse a run that must hold ``needed`` bytes at once on ``device`` when that is more than the
    device has available: ValueError "``what`` ... ``advice``".  Where the available memory is unknown
    nothing is refused.  ``needed`` is a lower bound the caller computes (the tensors the run cannot do
    without), so a refusal is certain to be right; what the network itself allocates comes on top."""
    available = available_memory(device)
    if available is not None and needed > available:
        raise ValueError(f"{what} needs at least {format_bytes(needed)} at once, more than the "
                         f"{format_bytes(available)} available on {torch.device(device)}: {advice}")


def run_memory_bytes(shape, dtype: torch.dtype, steps: int, columns: int) -> int:
    """A lower bound on the bytes one ``sample`` call over ``steps`` steps holds for a state of
    ``shape`` updated in ``dtype`` with a grid of ``columns`` columns: the state and the network's
    output, the network's times ((N+1) x B) and one float64 table ((N+1) x C)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * math.prod(shape) * itemsize + (steps + 1) * (shape[0] * itemsize + columns * 8)


def check_state_memory(shape, dtype: torch.dtype, device, *, steps: int = 0, columns: int = 1,
                       name: str = "shape") -> None:
    """Refuse a ``sample`` call that cannot fit on ``device`` (the message names ``name``, the
    argument that set the shape, and the largest batch that would fit)."""
    available = available_memory(device)
    if available is None:
        return
    need = run_memory_bytes(shape, dtype, steps, columns)
    if need <= available:
        return
    per_sample = run_memory_bytes((1, *shape[1:]), dtype, steps, columns) - (steps + 1) * columns * 8
    fits = max(0, (available - (steps + 1) * columns * 8) // max(per_sample, 1))
    check_memory(need, device, f"{name}: a state of shape {tuple(shape)} in {str(dtype).replace('torch.', '')} "
                               f"over {steps} steps (the state, the network's output and the per-step times)",
                 f"draw at most {fits} samples per call (samplers.distributed.sample_distributed with "
                 "batch_size= splits a large run)")
