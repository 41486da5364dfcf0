"""Time grids: from t_max down to t_min, shared by the batch or one column per sample."""

from __future__ import annotations

import torch

from sde import SDE, GaussianSDE
from sde.validation import check_choice, check_flag, check_positive
from solvers.base import first_true
from solvers.spacing import KARRAS_RHO, karras_roots

from .limits import MAX_STEPS, check_steps

__all__ = ["grid", "grid_for_nfe", "validate_grid", "ends_at_zero", "zero_noise_time", "GRID_KINDS", "LOW_NFE_POWER"]

GRID_KINDS = ("uniform", "log_snr", "karras", "quadratic")


def grid(sde: SDE, steps: int, kind: str | None = None, *, t_max: float | None = None,
         t_min: float | None = None, rho: float = KARRAS_RHO, to_zero: bool = False, device=None) -> torch.Tensor:
    """A float64 tensor of ``steps + 1`` strictly decreasing times from t_max to t_min.

    kind:
      - ``uniform``: equal steps in t;
      - ``log_snr``: equal steps in the half log-SNR lambda = log(alpha/sigma) (DPM-Solver);
      - ``karras``: the EDM grid, equal steps in (sigma/alpha)^(1/rho) (rho = 7);
      - ``quadratic``: equal steps in sqrt(t) (DPM-Solver's time_quadratic);
      - ``None``: the SDE's ``default_grid``.

    to_zero:
        end at ``sde.zero_noise_time``, where sigma = 0, so that each of the ``steps`` steps has a
        network call at a positive noise level and the last one lands on the data (see
        :func:`samplers.sample`).  ``uniform`` and ``quadratic`` grids are then spaced from t_max to
        that time (t_min, when given, is where the spacing ends instead); ``log_snr`` and ``karras``,
        whose spacing cannot reach sigma = 0, are spaced over ``steps - 1`` steps from t_max to t_min
        (default sde.t_min) before the step to sigma = 0, as diffusers and k-diffusion do.
    """
    steps = check_steps(steps)
    rho = check_positive("rho", rho, why=" (EDM's karras grid uses 7)")
    to_zero = check_flag("to_zero", to_zero)
    kind = getattr(sde, "default_grid", "uniform") if kind is None else kind
    check_choice("kind", kind, GRID_KINDS, why=" (or None: the SDE's default_grid)")
    hi = sde.t_max if t_max is None else float(t_max)
    lo = sde.t_min if t_min is None else float(t_min)
    if not sde.t_min <= lo < hi <= sde.t_max:
        raise ValueError(
            f"grid: expected {sde.t_min:g} <= t_min < t_max <= {sde.t_max:g} for {sde!r}, "
            f"got t_min={lo:g}, t_max={hi:g}"
        )
    if not to_zero:
        return validate_grid(sde, _spaced(sde, steps, kind, hi, lo, rho, device))
    zero = zero_noise_time(sde, "grid(..., to_zero=True)")
    if kind in ("uniform", "quadratic") and t_min is None:
        times = _spaced(sde, steps, kind, hi, zero, rho, None)
        if steps > 1 and float(times[-2]) < sde.t_min:
            raise ValueError(f"grid: {steps} {kind} steps from t_max={hi:g} to sigma = 0 call the network below "
                             f"t_min={sde.t_min:g} of {sde!r}; pass fewer steps or a t_min for the spacing to end at")
    else:
        one_time = torch.tensor([hi], dtype=torch.float64)
        head = _spaced(sde, steps - 1, kind, hi, lo, rho, None) if steps > 1 else one_time
        times = torch.cat([head, torch.tensor([zero], dtype=torch.float64)])
    return validate_grid(sde, times if device is None else times.to(device))


#: the spacing of :func:`grid_for_nfe`, chosen by measurement (docs/choosing-a-solver.md, "Few network calls"):
#: the noise levels of a VP SDE (beta 0.1 to 20) at times tau_lo + (tau_hi - tau_lo)(1 - k/N)^LOW_NFE_POWER;
#: 1 is uniform in t (diffusers' default), 2 DPM-Solver's time_quadratic.  Against 1, 1.5 lowered the mode
#: error 2.4-19x at NFE 4-6 on eight exact problems and the distance to the exact solution 1.4-2.2x on the
#: trained digits network; 2 did better still in error but raised the mode-weight error on the 64-D mixture.
LOW_NFE_POWER = 1.5


def grid_for_nfe(sde: SDE, solver, nfe: int, *, final_denoise: bool | None = None, device=None) -> torch.Tensor:
    """The grid on which ``solver`` makes at most ``nfe`` network calls, spaced as measurement chose.

    On an SDE that reaches sigma = 0 (``sde.zero_noise_time``) the grid ends there, so every call is made at
    a positive noise level and the step to sigma = 0 costs one call: N steps with N - 1 = the solver's
    ``steps_for_nfe(nfe)``.  Its noise levels s = sigma/alpha are those of a VP SDE at times
    tau_k = tau_lo + (tau_hi - tau_lo)(1 - k/N)^:data:`LOW_NFE_POWER`, where tau_hi and tau_lo are the VP times
    at this SDE's t_max and t_min (the anchor makes the grid the same in s, what exponential integrators
    see, on every SDE).  On an SDE that never reaches sigma = 0 (VESDE) it is the SDE's default grid of
    ``steps_for_nfe(nfe, final_denoise)`` steps (``final_denoise=None`` counts the final call, as
    :func:`samplers.sample` adds it on a Gaussian SDE).  ``sample(..., nfe=...)`` uses it.
    """
    from sde import VPSDE

    nfe = check_steps(nfe, name="nfe")
    if getattr(solver, "adaptive", False):
        raise ValueError(f"nfe: {solver!r} is adaptive and chooses its own steps; pass its tolerances instead")
    ends_on_data = isinstance(sde, GaussianSDE) and getattr(sde, "zero_noise_time", None) is not None
    if ends_on_data and final_denoise:
        raise ValueError("final_denoise=True with nfe: the grid for nfe ends at sigma = 0, where the last step "
                         "is the x0 estimate; leave final_denoise unset")
    with_final = ends_on_data or (final_denoise is not False and isinstance(sde, GaussianSDE))
    steps = solver.steps_for_nfe(nfe, with_final)
    if steps < 1 and not (ends_on_data and steps == 0 and nfe >= 1):
        raise ValueError(f"nfe={nfe} network calls are too few for one step of {solver!r}"
                         + (" and the final denoising call" if with_final else ""))
    if not ends_on_data:
        return grid(sde, steps, device=device)
    assert isinstance(sde, GaussianSDE)  # ends_on_data says so; for the type checker
    total = steps + 1
    anchor = VPSDE()
    ends = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64)
    lam_ends = sde.log_snr(ends)
    # a start at alpha = 0 (rectified flow's t = 1) has lambda = -inf: the anchor starts at its own t_max
    tau = torch.where(torch.isfinite(lam_ends), anchor.t_from_log_snr(lam_ends.clamp(min=-1e4)),
                      torch.tensor(anchor.t_max, dtype=torch.float64)).clamp(max=anchor.t_max)
    u = torch.arange(total, dtype=torch.float64) / total
    taus = tau[1] + (tau[0] - tau[1]) * (1 - u) ** LOW_NFE_POWER
    times = sde.t_from_log_snr(anchor.log_snr(taus))
    times[0] = sde.t_max
    times = torch.cat([times, torch.tensor([zero_noise_time(sde, "grid_for_nfe")], dtype=torch.float64)])
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"grid_for_nfe: {total} steps are too many to space on {sde!r} between its t_max and "
                         f"t_min (the times coincide in float64); pass steps= or grid=")
    return validate_grid(sde, times if device is None else times.to(device))


def zero_noise_time(sde: SDE, caller: str) -> float:
    """``sde.zero_noise_time``, or a ValueError naming ``caller`` for an SDE whose noise never reaches 0."""
    zero = getattr(sde, "zero_noise_time", None)
    if zero is None:
        raise ValueError(f"{caller}: {sde!r} has no time where sigma = 0 (sde.zero_noise_time is None), so a grid "
                         "cannot end on the data; end at t_min and use final_denoise=True (one more network call, "
                         "the same first-order step to sigma = 0)")
    return float(zero)


def _spaced(sde: SDE, steps: int, kind: str, hi: float, lo: float, rho: float, device) -> torch.Tensor:
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    ends = torch.tensor([hi, lo], dtype=torch.float64)
    if kind == "uniform":
        times = hi + u * (lo - hi)
    elif kind == "quadratic":
        times = (hi**0.5 + u * (lo**0.5 - hi**0.5)) ** 2
    else:
        if not isinstance(sde, GaussianSDE):
            raise ValueError(f"grid kind {kind!r} needs a Gaussian-marginal SDE (it uses the log-SNR), got {sde!r}")
        lam = sde.log_snr(ends)
        if not bool(torch.isfinite(lam).all()):
            raise ValueError(
                f"grid kind {kind!r} needs a finite log-SNR at both ends; {sde!r} has log_snr = "
                f"{lam.tolist()} at t = {ends.tolist()}: pass a t_max/t_min where alpha and sigma are positive"
            )
        if kind == "log_snr":
            lams = lam[0] + u * (lam[1] - lam[0])
        else:
            # noise level s = sigma/alpha = exp(-lambda), spaced as in EDM
            lams = -rho * torch.log(karras_roots(torch.exp(-lam[0]), torch.exp(-lam[1]), u, rho))
        times = sde.t_from_log_snr(lams)
    # the ends are exact, so rounding in the transforms never leaves [t_min, t_max]
    times[0], times[-1] = hi, lo
    return times if device is None else times.to(device)


def validate_grid(sde: SDE, times, batch_size: int | None = None) -> torch.Tensor:
    """Check a user grid: shape (N+1,) or (N+1, B), finite, strictly decreasing, inside [t_min, t_max]."""
    times = torch.as_tensor(times)
    if not times.is_floating_point():
        times = times.to(torch.float64)
    if times.dim() not in (1, 2) or times.shape[0] < 2:
        raise ValueError(f"grid must have shape (N+1,) or (N+1, B) with N >= 1, got shape {tuple(times.shape)}")
    if times.shape[0] - 1 > MAX_STEPS:
        raise ValueError(f"grid has {times.shape[0] - 1} steps, more than MAX_STEPS={MAX_STEPS} (samplers.limits)")
    if times.dim() == 2 and batch_size is not None and times.shape[1] not in (1, batch_size):
        raise ValueError(f"a per-sample grid must have shape (N+1, {batch_size}), got {tuple(times.shape)}")
    t64 = times.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t64).all()):
        raise ValueError("grid contains NaN or Inf")
    steps = t64[1:] - t64[:-1]
    if not bool((steps < 0).all()):
        k, j = first_true(~(steps < 0))
        column = times.dim() == 2 and times.shape[1] > 1
        raise ValueError(
            f"grid must be strictly decreasing (from t_max towards t_min); step {k}"
            f"{f' of sample {j} (column {j})' if column else ''} goes from "
            f"{t64[k].reshape(-1)[j].item():g} to {t64[k + 1].reshape(-1)[j].item():g}"
        )
    zero = getattr(sde, "zero_noise_time", None)
    at_zero = t64[-1] == zero if zero is not None and zero < sde.t_min else torch.zeros(1, dtype=torch.bool)
    if bool(at_zero.any()) and not bool(at_zero.all()):
        raise ValueError(f"grid: the last time must be t = {zero:g} (sigma = 0) for every sample or for none")
    calls = t64[:-1] if bool(at_zero.all()) else t64
    lo, hi = float(calls.min()), float(t64.max())
    if lo < sde.t_min or hi > sde.t_max:
        raise ValueError(
            f"grid leaves the SDE's time range [{sde.t_min:g}, {sde.t_max:g}] of {sde!r}: it spans [{lo:g}, {hi:g}]"
            + ("" if zero is None else f" (only its last time may be t = {zero:g}, where sigma = 0)")
        )
    return times


def ends_at_zero(sde: SDE, times: torch.Tensor) -> bool:
    """Whether a grid (N+1,) or (N+1, B) ends at ``sde.zero_noise_time`` (sigma = 0) for every sample."""
    zero = getattr(sde, "zero_noise_time", None)
    return zero is not None and zero < sde.t_min and bool((torch.as_tensor(times)[-1] == zero).all())
