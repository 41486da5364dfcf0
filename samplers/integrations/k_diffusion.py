"""Our fixed-grid solvers as k-diffusion-style sampler functions (ComfyUI, A1111, k-diffusion's own callers).

k-diffusion's samplers integrate a denoiser ``model(x, sigma, **extra_args)`` on the scaled state
x = x0 + sigma eps, from ``sigmas[0]`` down to ``sigmas[-1]`` (usually 0).  That is our
:class:`sde.EDMSDE` (alpha = 1, sigma = t) with an x0-predicting model, so any solver runs on it: the
sigmas (without the trailing 0) are the grid, and a trailing 0 is the final denoising step.  No
k-diffusion import is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sde import EDMSDE
from solvers import AdaptiveSolver, Solver

from ..model import Model
from ..sample import sample

__all__ = ["k_diffusion_sampler"]


def _check_sigmas(sigmas) -> tuple[torch.Tensor, bool]:
    """(the grid: the positive sigmas, float64 on the CPU; whether they end with 0)."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    s = sigmas.detach().to("cpu", torch.float64).reshape(-1)
    final_zero = s.numel() > 0 and float(s[-1]) == 0.0
    grid = s[:-1] if final_zero else s
    if grid.numel() < 1 or (not final_zero and grid.numel() < 2):
        raise ValueError(f"sigmas must hold at least two noise levels (or one and a trailing 0), got "
                         f"{sigmas.tolist()}")
    if not bool(torch.isfinite(grid).all()) or not bool((grid > 0).all()):
        raise ValueError("sigmas must be finite and positive (except a trailing 0)")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    return grid, final_zero


def k_diffusion_sampler(solver: Solver) -> Callable:
    """``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None)``: ``solver``
    with k-diffusion's sampler signature.

    ``model(x, sigma, **extra_args)`` is a denoiser (returns x0) on the scaled state, ``x`` the starting
    state at ``sigmas[0]`` (noise times sigmas[0]), ``sigmas`` strictly decreasing, with or without a
    trailing 0 (with it, the last call is our final denoising step, as in k-diffusion).  ``callback`` gets
    k-diffusion's dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` at every call's noise level,
    the final denoising one included (x is the state at sigma, denoised the model's x0 there).
    ``disable=True`` hides the progress bar (None: our default).

    Noise of a stochastic solver is keyed (see docs/noise.md) by ``extra_args["seed"]`` (ComfyUI passes
    it), else by a ``noise_sampler``'s ``seed`` attribute, else by a seed drawn from torch's global
    generator; a ``noise_sampler`` without a seed is refused for a stochastic solver (its draws cannot
    stand in for the solver's keyed noise).  Every ``extra_args`` entry is also passed to the model, as
    k-diffusion does.
    """
    if isinstance(solver, AdaptiveSolver):
        raise ValueError(f"solver: {solver!r} is adaptive (it chooses its own steps); k-diffusion's sampler "
                         "functions run on the caller's sigmas: use a fixed-grid solver")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a fixed-grid solver from solvers, got {type(solver).__name__}")

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
        extra_args = {} if extra_args is None else dict(extra_args)
        grid, final_zero = _check_sigmas(sigmas)
        seed = extra_args.get("seed")
        if seed is None and noise_sampler is not None:
            seed = getattr(noise_sampler, "seed", None)
            if seed is None and solver.stochastic:
                raise ValueError(f"noise_sampler: {solver!r} draws keyed noise, so it needs a seed: pass "
                                 "extra_args={'seed': ...} or a noise_sampler with a .seed attribute")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item()) if solver.stochastic else 0
        # one noise level alone (a single step to 0) still needs an interval for the SDE
        sde = EDMSDE(sigma_min=float(grid[-1]) * (0.5 if grid.numel() == 1 else 1.0), sigma_max=float(grid[0]))
        denoiser = Model(lambda x_, t, **cond: model(x_, t, **cond), sde, "x0")
        progress = None if disable is None else not disable
        if grid.numel() == 1:  # a single step to sigma = 0: the final denoising step alone
            result = denoiser.denoise(x, grid.to(x.dtype), **extra_args)
            if callback is not None:
                callback({"x": x, "i": 0, "sigma": sigmas[0], "sigma_hat": sigmas[0], "denoised": result})
            return result
        report = None
        before = [x]
        if callback is not None:
            # k-diffusion reports each call's state before its update: ours after it, so one step late;
            # the final denoising step (info.final) is the call at the last sigma
            def report(info):
                i = grid.numel() - 1 if info.final else info.step
                callback({"x": before[0], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                          "denoised": info.denoised})
                if not info.final:
                    before[0] = info.x.clone()  # the run updates its state in place
        return sample(denoiser, solver, x_T=x, grid=grid, cond=extra_args, final_denoise=final_zero, seed=seed,
                      progress=progress, callback=report)

    sampler.__name__ = f"sample_{type(solver).__name__.lower()}"
    sampler.__doc__ = f"{solver!r} as a k-diffusion sampler function (samplers.integrations.k_diffusion_sampler)."
    return sampler
