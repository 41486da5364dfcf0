"""Size limits of a run, checked in its plan before anything is allocated.

A step count or a state shape the machine cannot hold is refused with a message naming the
argument and the limit, instead of allocating gigabytes of grid tables or a state that the kernel
kills the process for.  The limits are refusals of what cannot work, never of what merely is slow:

* :data:`MAX_STEPS` bounds the steps of a grid.  Diffusion sampling uses 1 to a few thousand steps
  (DDPM's 1000, a 4000-step Euler-Maruyama reference); at 100 000 steps a plan already costs
  about 0.2 s and the loop about 65 us a step on top of the network, so more is a typo (``10**7``
  allocated 2.8 GB of tables before the first step).
* :func:`check_state_memory` refuses a run whose state alone cannot fit: two state-sized buffers
  (the state and the network's output, which every solver holds) plus the network's times
  ((N+1) x B) and one float64 table ((N+1) x C) are a lower bound on what the run holds (history,
  noise buffers and the network's own activations come on top), compared with the device's total
  memory (physical RAM on the CPU, the GPU's memory on CUDA).  A lower bound against a total never
  refuses a run that could have run.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["MAX_STEPS", "check_steps", "device_memory_bytes", "run_memory_bytes", "check_state_memory"]

#: the most steps a grid may have (see the module)
MAX_STEPS = 100_000


def check_steps(steps, name: str = "steps") -> int:
    """``steps`` as an int in [1, MAX_STEPS], or a ValueError naming ``name``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive int, got {steps!r}")
    if steps > MAX_STEPS:
        raise ValueError(f"{name}={steps} is more than MAX_STEPS={MAX_STEPS} (samplers.limits): no sampler needs "
                         "that many steps, and the plan's per-step tables would be allocated before the first step")
    return steps


def device_memory_bytes(device) -> int | None:
    """The total memory of ``device``: physical RAM for the CPU, the GPU's memory for CUDA, None
    where it cannot be read (other device types are not checked)."""
    device = torch.device(device)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def run_memory_bytes(shape, dtype: torch.dtype, steps: int, columns: int) -> int:
    """A lower bound on the bytes a run over ``steps`` steps holds for a state of ``shape`` updated in
    ``dtype`` with a grid of ``columns`` columns (see the module)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * math.prod(shape) * itemsize + (steps + 1) * (shape[0] * itemsize + columns * 8)


def check_state_memory(shape, dtype: torch.dtype, device, *, steps: int = 0, columns: int = 1,
                       name: str = "shape") -> None:
    """Refuse a run that cannot fit on ``device`` (the message names ``name``, the argument that
    set the shape, and the largest batch that would fit)."""
    total = device_memory_bytes(device)
    if total is None:
        return
    need = run_memory_bytes(shape, dtype, steps, columns)
    if need <= total:
        return
    per_sample = run_memory_bytes((1, *shape[1:]), dtype, steps, columns) - (steps + 1) * columns * 8
    fits = max(0, (total - (steps + 1) * columns * 8) // max(per_sample, 1))
    raise ValueError(
        f"{name}: a state of shape {tuple(shape)} in {str(dtype).replace('torch.', '')} over {steps} steps needs at "
        f"least {_size(need)} (the state, the network's output and the per-step times), more than the "
        f"{_size(total)} of {torch.device(device)}: draw at most {fits} samples per call (samplers.distributed."
        f"sample_distributed with batch_size= splits a large run)")


def _size(n: int) -> str:
    """Bytes in decimal units (3 significant digits)."""
    exponent = min(int(math.log10(max(n, 1)) // 3), 5)
    return f"{n / 1000 ** exponent:.3g} {('B', 'kB', 'MB', 'GB', 'TB', 'PB')[exponent]}"
