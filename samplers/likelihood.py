"""Log-likelihood through the probability-flow ODE (Song et al. 2021, Score SDE section 1.3).

log p(x) is log p at the end of the probability-flow ODE plus the integral of its divergence along
the path.  :func:`likelihood` integrates that augmented state with the per-sample embedded
Runge-Kutta loop of :class:`solvers.AdaptiveODE`, in that solver's variables, where the linear part
of the divergence is exact and only the network's trace is computed (exactly, or by Hutchinson
probes keyed like all noise here, so a sample's result does not depend on its batch).  Formulas,
trace estimators and measured accuracy: docs/likelihood.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sde.validation import check_choice, check_count, check_flag, check_number
from solvers import AdaptiveODE

from .driver import AdaptiveRunContext, builds_no_graph, check_run_arguments, check_state, plan_run
from .model import Model
from .noise import STREAM_DEQUANTIZE, STREAM_PROBE, NoiseSource

__all__ = ["likelihood", "LikelihoodResult", "dequantize", "bits_per_dim_offset", "DIVERGENCES", "PROBE_NOISES",
           "EXACT_DIVERGENCE_MAX_DIM"]

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBE_NOISES = ("rademacher", "gaussian")
#: divergence="auto" computes the trace exactly up to this many dimensions (one backward pass each)
EXACT_DIVERGENCE_MAX_DIM = 16
_BINS_EXAMPLE = " (256 for 8-bit data)"


@dataclass
class LikelihoodResult:
    """What :func:`likelihood` computed, per sample (tensors of shape (B,) unless stated)."""

    log_p: torch.Tensor  #: log p_{t_start}(x) in nats (the mean over probes; of the dequantised x with ``bins``)
    bpd: torch.Tensor  #: bits per dimension: -log_p / (D ln 2) + offset
    #: standard error of log_p over the probes (Hutchinson with probes >= 2); zeros for the exact trace;
    #: None for a single probe (no spread to measure)
    std_error: torch.Tensor | None
    bpd_std_error: torch.Tensor | None  #: std_error in bits per dimension
    log_p_probes: torch.Tensor  #: (B, probes): one estimate per probe ((B, 1) for the exact trace)
    prior_log_p: torch.Tensor  #: log p_{t_end}(z)
    z: torch.Tensor  #: the state at t_end
    dim: int  #: D, the number of dimensions of one sample
    offset: float  #: bits per dimension added to bpd (log2(bins / (hi - lo)) with ``bins``, else 0)
    divergence: str  #: "exact" or "hutchinson"
    probes: int
    t_start: float
    t_end: float
    solver: str
    nfe: int  #: batched network calls (forward passes)
    nfe_per_sample: torch.Tensor  #: network calls per sample, (B,) int64
    vjp_per_call: int  #: backward passes per network call (D exact, ``probes`` Hutchinson)
    accepted_per_sample: torch.Tensor
    rejected_per_sample: torch.Tensor
    wall_time: float = 0.0


def _check_data_range(data_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi) of numbers, got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must be finite with lo < hi, got {data_range!r}")
    return lo, hi


def bits_per_dim_offset(bins: int = 256, data_range=(-1.0, 1.0)) -> float:
    """log2(bins / (hi - lo)): the bits per dimension that turn a density of data quantised into
    ``bins`` equal bins over ``data_range`` into a bound on the discrete data's bits per dimension
    (7 for 8-bit data in [-1, 1], 8 for [0, 1], as in the Score SDE code)."""
    lo, hi = _check_data_range(data_range)
    return math.log2(check_count("bins", bins, minimum=2, why=_BINS_EXAMPLE) / (hi - lo))


def dequantize(x: torch.Tensor, bins: int = 256, data_range=(-1.0, 1.0), *, seed=0, sample_index=None) -> torch.Tensor:
    """Uniform dequantisation of quantised data: x on the grid lo + (hi - lo) k / (bins - 1)
    (k = 0 ... bins - 1, e.g. uint8 / 127.5 - 1) becomes lo + (hi - lo) (k + U) / bins with
    U ~ U[0, 1) keyed by (seed, sample index), so a sample's draw does not depend on its batch
    (the Score SDE code's (U + 255 x) / 256 for [0, 1] data).  Off-grid values are refused."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a floating tensor of shape (B, ...) with B >= 1")
    bins = check_count("bins", bins, minimum=2, why=_BINS_EXAMPLE)
    lo, hi = _check_data_range(data_range)
    x64 = x.detach().to(torch.float64)
    level = (x64 - lo) / (hi - lo) * (bins - 1)
    k = torch.round(level)
    off = ((level - k).abs() > 1e-3) | (k < 0) | (k > bins - 1) | ~torch.isfinite(level)
    if bool(off.any()):
        j = int(torch.nonzero(off.reshape(x.shape[0], -1).any(dim=1))[0])
        raise ValueError(f"x must lie on the {bins}-level grid of data_range=({lo:g}, {hi:g}) "
                         f"(lo + (hi - lo) k / {bins - 1}); sample {j} does not")
    z = NoiseSource(seed, x.shape[0], sample_index=sample_index).normal(
        x.shape[1:], counter=0, stream=STREAM_DEQUANTIZE, dtype=torch.float64, device=x.device)
    u = 0.5 * torch.erfc(-z / math.sqrt(2.0))  # the normal CDF: U[0, 1) from the keyed normal
    u = u.clamp(max=1.0 - 2.0**-53)  # erfc rounds to 2 far in the tail; stay inside the bin
    return (lo + (hi - lo) * (k + u) / bins).to(x.dtype)


@builds_no_graph
def likelihood(model: Model, x: torch.Tensor, *, divergence: str = "auto", probes: int | None = None,
               probe_noise: str = "rademacher", solver: AdaptiveODE | None = None, t_start: float | None = None,
               t_end: float | None = None, prior_logp: Callable[[torch.Tensor], torch.Tensor] | None = None,
               bins: int | None = None, data_range=(-1.0, 1.0), dequantize_data: bool = True, seed=0,
               sample_index=None, cond: dict | None = None, dtype: torch.dtype | None = None,
               device=None) -> LikelihoodResult:
    """Log-likelihood (nats) and bits per dimension of each sample of x under the model's
    probability-flow ODE.

    Parameters
    ----------
    model:
        a :class:`Model` on a Gaussian-marginal SDE; its network must be differentiable in x
        (autograd), and each output row must depend on its own input row only.
    x:
        the data, (B, ...): the density is that of x_{t_start}.
    divergence:
        ``"exact"`` (D backward passes per network call), ``"hutchinson"``, or ``"auto"``:
        exact up to ``EXACT_DIVERGENCE_MAX_DIM`` dimensions, Hutchinson above.
    probes, probe_noise:
        Hutchinson's number of fixed probes per sample (default 1; the standard error needs 2 or
        more) and their law, ``"rademacher"`` (default, as Score SDE) or ``"gaussian"``.
    solver:
        the :class:`solvers.AdaptiveODE` that integrates the augmented ODE (its pair, tolerances,
        variable and limits); default ``AdaptiveODE("dopri5", rtol=1e-5, atol=1e-5)``, Score SDE's
        RK45 tolerances.  The error test covers x and the divergence integrals.
    t_start, t_end:
        the interval (default the SDE's [t_min, t_max]); Score SDE uses t_start = 1e-5.
    prior_logp:
        z -> log p_{t_end}(z), shape (B,); default ``model.sde.prior_logp``.
    bins, data_range, dequantize_data:
        for quantised data (``bins=256``: 8-bit) on the grid of ``data_range``: x is dequantised
        with keyed uniform noise (:func:`dequantize`; skip with ``dequantize_data=False`` if x
        already is), and bpd gets the offset :func:`bits_per_dim_offset`.
    seed, sample_index:
        key the probes and the dequantisation draw per sample (see :class:`NoiseSource`).
    cond:
        keyword arguments for the network (per-sample tensors follow their rows).
    dtype, device:
        dtype handed to the network (default x's; float16/bfloat16 states are integrated in
        float32) and device (default x's).

    Returns a :class:`LikelihoodResult`.  The result carries no autograd graph and the network's
    parameters get no ``.grad``: the trace's vector-Jacobian products are taken with respect to the
    state only (see :func:`samplers.sample.builds_no_graph`).
    """
    start_time = time.perf_counter()
    if solver is None:
        solver = AdaptiveODE("dopri5", rtol=1e-5, atol=1e-5)
    elif not isinstance(solver, AdaptiveODE):
        raise TypeError(f"solver must be a solvers.AdaptiveODE (the likelihood's ODE engine), "
                        f"got {type(solver).__name__}")
    cond = check_run_arguments(model, solver, cond)
    sde = model.sde
    check_state(x, "x")
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("probe_noise", probe_noise, PROBE_NOISES)
    dequantize_data = check_flag("dequantize_data", dequantize_data)
    shape = tuple(x.shape[1:])
    batch, dim = x.shape[0], math.prod(shape)
    if divergence == "auto":
        divergence = "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    if divergence == "exact":
        if probes is not None:
            raise ValueError("probes applies to divergence='hutchinson'; the exact trace uses no probes")
        n_probes = 1
    else:
        n_probes = 1 if probes is None else check_count("probes", probes)
    t_start = sde.t_min if t_start is None else check_number("t_start", t_start)
    t_end = sde.t_max if t_end is None else check_number("t_end", t_end)
    if not sde.t_min <= t_start < t_end <= sde.t_max:
        raise ValueError(f"need t_min <= t_start < t_end <= t_max = [{sde.t_min:g}, {sde.t_max:g}], "
                         f"got t_start={t_start:g}, t_end={t_end:g}")
    if prior_logp is None:
        prior_logp = sde.prior_logp
    elif not callable(prior_logp):
        raise TypeError(f"prior_logp must be callable z -> log p(z) of shape (B,), got {type(prior_logp).__name__}")
    # the integrated state is (x, one divergence integral per probe)
    plan = plan_run(model, solver, x=x, state_name="x", seed=seed, sample_index=sample_index, cond=cond, dtype=dtype,
                    device=device, grid_required=False, state_memory=(batch, dim + n_probes), own_state=False)
    dtype, compute, device, noise = plan.dtype, plan.compute, plan.device, plan.noise
    offset = 0.0
    if bins is not None:
        offset = bits_per_dim_offset(bins, data_range)
        if dequantize_data:
            x = dequantize(x, bins, data_range, seed=seed, sample_index=sample_index)
    elif not dequantize_data:
        raise ValueError("dequantize_data=False applies only with bins (quantised data)")
    ctx = AdaptiveRunContext(model, plan.cond, batch, device, compute, dtype, noise, t_start, t_end)

    if divergence == "hutchinson":
        probe = torch.stack([noise.normal(shape, counter=k, stream=STREAM_PROBE, dtype=compute, device=device)
                             .reshape(batch, dim) for k in range(n_probes)], dim=1)  # (B, K, D)
        if probe_noise == "rademacher":
            probe = torch.where(probe >= 0, 1.0, -1.0).to(compute)

    def trace(out, x_in, index):
        """tr(d out / d x_in) per row, (b, K): exact, or each probe's eps^T (d out / d x_in) eps."""
        if not out.requires_grad:
            raise ValueError(f"the network output does not depend on x through autograd ({model!r}): the "
                             "likelihood needs a network differentiable in x (no torch.no_grad / detach inside)")
        b = out.shape[0]
        if divergence == "exact":
            flat = out.reshape(b, dim)
            diag = [torch.autograd.grad(flat[:, i].sum(), x_in, retain_graph=i < dim - 1)[0].reshape(b, dim)[:, i]
                    for i in range(dim)]
            return torch.stack(diag, dim=1).sum(dim=1, keepdim=True)
        eps = probe[index.to(device)]
        est = []
        for k in range(n_probes):
            v = torch.autograd.grad(out, x_in, grad_outputs=eps[:, k].reshape(out.shape).to(out.dtype),
                                    retain_graph=k < n_probes - 1)[0]
            est.append((v.reshape(b, dim).to(compute) * eps[:, k]).sum(dim=1))
        return torch.stack(est, dim=1)

    def rhs(state, t_rows, index, variable):
        a_, b_, c_ = solver.flow_coefficients(model, t_rows, variable, index)
        y = state[:, :dim]
        x_in = (y * ctx.column(1.0 / c_, y)).reshape(state.shape[0], *shape).detach().requires_grad_(True)
        with torch.enable_grad():
            out = ctx.output(x_in, t_rows, index)
            tr = trace(out, x_in, index)
        dy = y * ctx.column(a_, y) + out.detach().reshape(y.shape) * ctx.column(b_, y)
        dlog = ctx.column(dim * a_, tr) + tr * ctx.column(b_ / c_, tr)
        return torch.cat([dy, dlog], dim=1)

    def measure(state, t_rows):
        # the error test is on x and on the divergence integrals as they are
        inv_c = ctx.column(1.0 / solver.state_scale(sde, t_rows), state)
        return torch.cat([state[:, :dim] * inv_c, state[:, dim:]], dim=1)

    t0 = torch.full((batch,), t_start, dtype=torch.float64)
    t1 = torch.full((batch,), t_end, dtype=torch.float64)
    c0, c1 = solver.state_scale(sde, t0), solver.state_scale(sde, t1)
    state = torch.zeros(batch, dim + n_probes, dtype=compute, device=device)
    state[:, :dim] = x.detach().to(device=device, dtype=compute).reshape(batch, dim) * ctx.column(c0, state)
    state = solver.integrate(sde, rhs, measure, state, t0, t1, ctx)

    z = (state[:, :dim] * ctx.column(1.0 / c1, state)).reshape(batch, *shape)
    prior = prior_logp(z)  # in the compute dtype: a float16 sum of squares would lose the prior
    if not isinstance(prior, torch.Tensor) or tuple(prior.shape) != (batch,):
        raise ValueError(f"prior_logp must return a tensor of shape (B,) = ({batch},), got "
                         f"{tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__}")
    prior = prior.to(device=device, dtype=compute)
    shift = dim * (torch.log(c0) - torch.log(c1))  # log-densities of y = c x are those of x minus D log c
    log_p_probes = prior[:, None] + state[:, dim:] + ctx.column(shift, state)
    if bool((~torch.isfinite(log_p_probes)).any()):
        j = int(torch.nonzero(~torch.isfinite(log_p_probes).all(dim=1))[0])
        raise FloatingPointError(f"the log-likelihood of sample {j} is not finite (prior log p = {float(prior[j]):g}); "
                                 "check the network's output and prior_logp")
    log_p = log_p_probes.mean(dim=1)
    if divergence == "exact":
        std_error = torch.zeros_like(log_p)
    elif n_probes >= 2:
        std_error = log_p_probes.std(dim=1) / math.sqrt(n_probes)
    else:
        std_error = None
    per_bit = dim * math.log(2.0)
    return LikelihoodResult(
        log_p=log_p, bpd=-log_p / per_bit + offset, std_error=std_error,
        bpd_std_error=None if std_error is None else std_error / per_bit, log_p_probes=log_p_probes,
        prior_log_p=prior, z=z.to(dtype), dim=dim, offset=offset, divergence=divergence, probes=n_probes,
        t_start=t_start, t_end=t_end, solver=repr(solver), nfe=ctx.nfe, nfe_per_sample=ctx.nfe_per_sample,
        vjp_per_call=dim if divergence == "exact" else n_probes, accepted_per_sample=ctx.accepted,
        rejected_per_sample=ctx.rejected, wall_time=time.perf_counter() - start_time)
