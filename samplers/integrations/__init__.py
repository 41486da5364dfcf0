"""Our solvers in other libraries' calling conventions: diffusers pipelines and k-diffusion's sampler functions.

* :mod:`samplers.integrations.diffusers` (needs diffusers): :func:`from_diffusers` (a diffusers network and
  scheduler as a :class:`samplers.Model`), :class:`SolverScheduler` (any fixed-grid solver as a diffusers
  scheduler, for unmodified pipelines), :func:`diffusers_grid` and :func:`equivalent_solver` (reproduce a
  diffusers scheduler with ``sample()``);
* :mod:`samplers.integrations.k_diffusion` (no dependency): :func:`k_diffusion_sampler`, a solver as a
  k-diffusion-style ``sample_*(model, x, sigmas, ...)`` function (ComfyUI, A1111).

The diffusers names are imported on first use, so ``import samplers.integrations`` loads no diffusers.
"""

from __future__ import annotations

from typing import Any

from .k_diffusion import k_diffusion_sampler

__all__ = ["from_diffusers", "SolverScheduler", "diffusers_grid", "equivalent_solver", "k_diffusion_sampler"]

_DIFFUSERS_NAMES = ("from_diffusers", "SolverScheduler", "diffusers_grid", "equivalent_solver")


def __getattr__(name: str) -> Any:
    if name in _DIFFUSERS_NAMES:
        from . import diffusers as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
