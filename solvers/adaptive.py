"""Adaptive step size with a step size per sample, and the adaptive DPM-Solver.

An adaptive solver does not take a fixed grid: :meth:`AdaptiveSolver.solve` integrates every
sample of the batch from its start time to its end time with its own step sizes, accepting or
rejecting each sample's step on that sample's own error estimate.  Other libraries control one
step size for the whole batch, set by the worst sample, so every sample pays for the hardest
one; here a sample that is done stops costing network calls (the network is called on the
samples still running), and the per-sample counts are reported.

The driver hands ``solve`` an :class:`AdaptiveContext`: network calls on any subset of the
batch at per-sample times, with the counting done there.  Every adaptive solver runs the same
accept/reject loop (:meth:`AdaptiveSolver.per_sample_loop`, with one rule for landing on the end and
one first step out of alpha = 0); it supplies its attempt and its paper's step-size settings.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from sde.validation import check_choice, check_count, check_in_range, check_nonnegative, check_positive, check_predicts

from .base import SolverBase, _left_to_subclasses, check_coefficients_finite
from .dpm import DPMSolver

__all__ = ["AdaptiveContext", "AdaptiveSolver", "AdaptiveDPMSolver", "StepSizeError", "batch_independent",
           "Attempt", "StepControl", "lands_on_end", "first_log_snr", "LANDING_SLACK"]

#: a step that reaches within LANDING_SLACK * max(|end|, 1) of the end, in the integration variable, lands
#: on the end exactly: the slack covers the rounding of the variable itself (lambda recomputed from t, the
#: sum of the steps), which is relative to its size, not to the span left
LANDING_SLACK = 1e-10
#: the first log-SNR out of alpha = 0 when atol = 0 (where :func:`first_log_snr` has no scale): a local
#: error of about e^-10 / 2 = 2e-5.  Measured on rectified flow (Gaussian data): -8 made AdaptiveDPMSolver
#: (rtol 0.05, atol 0) 20 times less accurate, and cost AdaptiveODE(variable="lambda") more calls for the
#: same accuracy
_FIRST_LOG_SNR_WITHOUT_ATOL = -5.0


def lands_on_end(reached: torch.Tensor, end: torch.Tensor, direction=1.0) -> torch.Tensor:
    """Rows whose step, reaching ``reached`` while heading to ``end`` (``direction`` +1 or -1, per row or
    for all), ends within rounding of the end (:data:`LANDING_SLACK`): they land on it exactly."""
    return (end - reached) * direction <= LANDING_SLACK * end.abs().clamp(min=1.0)


def first_log_snr(atol: float) -> float:
    """The log-SNR lambda_1 that a sample starting where alpha = 0 (lambda = -inf) reaches with its first,
    exact-limit first-order step: its local error is about 1/2 dphi^2 with dphi ~ e^lambda_1 the step in
    the angle phi = atan2(sigma, alpha), and 1/2 e^(2 lambda_1) = atol gives lambda_1 = log(2 atol) / 2."""
    return 0.5 * math.log(2.0 * atol) if atol > 0 else _FIRST_LOG_SNR_WITHOUT_ATOL


class Attempt(NamedTuple):
    """One attempted step of the running rows ``idx`` (all tensors have one entry per row)."""

    x: torch.Tensor  #: the proposed states, kept where the step is accepted
    err: torch.Tensor  #: the error norms, float64 on the CPU (<= 1 accepts)
    t: torch.Tensor  #: the SDE times at the step's start
    t_next: torch.Tensor  #: the SDE times the step reaches
    final: torch.Tensor  #: the rows whose step lands on the end
    step: torch.Tensor  #: the step size (in the solver's variable) the controller scales
    #: what is left of the span once the step is accepted / rejected, to which the next step is clipped;
    #: None: the attempt clips it itself
    remaining: tuple[torch.Tensor, torch.Tensor] | None = None
    #: rows that start where the variable is infinite (alpha = 0 in lambda): a rejected attempt there
    #: proposes no step size the floor could judge
    unmeasured_start: torch.Tensor | None = None
    #: the embedded lower-order solution (the error test's reference after an accepted step), if kept
    x_low: torch.Tensor | None = None
    #: whatever else the solver's ``accepted`` keeps of an accepted attempt (rows first)
    carry: tuple = ()


class StepControl(NamedTuple):
    """The step-size rule h <- step * factor, factor = safety E^-exponent, clamped to [factor_min,
    factor_max] where given, at most 1 on the attempt after a rejection with ``hold_after_reject``.
    Each solver keeps its paper's settings."""

    safety: float
    exponent: float
    factor_min: float | None = None
    factor_max: float | None = None
    hold_after_reject: bool = False


#: per-sample float64 math is evaluated on tensors padded to a multiple of this length
_PAD_TO = 16


def batch_independent(fn, *values: torch.Tensor):
    """``fn(*values)`` for per-sample (B,) CPU tensors, computed so that each entry is the same
    whatever B is.  Torch's CPU kernels take transcendental functions (exp, log, pow) through a
    SIMD routine for full vectors and a scalar one for the tail, which can differ in the last bit;
    an adaptive solver's accept/reject decision can turn on that bit and then a sample's whole path
    depends on the batch it ran in.  Padding to a whole number of vectors (repeating the last
    entry) sends every entry through the SIMD routine."""
    n = values[0].shape[0]
    pad = -n % _PAD_TO
    if pad:
        values = tuple(torch.cat([v, v[-1:].expand(pad)]) for v in values)
    out = fn(*values)
    return tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n]


class StepSizeError(RuntimeError):
    """An adaptive solver could not finish a sample (too many steps, or a step below the minimum);
    the message names the sample and where it stopped."""


class AdaptiveContext(Protocol):
    """What the driver hands to :meth:`AdaptiveSolver.solve`."""

    #: batch size and the state's device/dtype
    batch_size: int
    #: the run's time span [t_low, t_high] (the Brownian tree's interval)
    t_low: float
    t_high: float
    #: the Brownian tree's bisections unless a solver asks for another depth
    brownian_depth: int

    def output(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The network output for rows ``index`` (int64, CPU) of the batch, whose states are ``x``
        (one row per index) at SDE times ``t`` (float64, CPU, one per index).  Counts one NFE for
        each of those samples and one batched call."""

    def coefficients(self, quantity: str, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, q) with quantity = p x + q out at per-sample times t (float64, CPU), shaped and typed
        to broadcast against ``like``."""

    def column(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample float64 CPU values as a (b, 1, ..., 1) tensor on like's device and dtype."""

    def brownian(self, s: torch.Tensor, t: torch.Tensor, index: torch.Tensor, like: torch.Tensor,
                 depth: int | None = None) -> torch.Tensor:
        """W(t) - W(s) for rows ``index`` at per-row times s, t (float64, CPU), shaped and typed like
        ``like``: one fixed Brownian path per sample (a virtual Brownian tree of ``depth``
        bisections over the run's time span, keyed by the run's seeds), so a rejected step's
        retry sees increments consistent with everything asked before."""

    def count_attempts(self, index: torch.Tensor, accepted: torch.Tensor) -> None:
        """Record one attempted step for each sample in ``index``, accepted where ``accepted``."""


class AdaptiveSolver(SolverBase):
    """Base class of the per-sample adaptive solvers: ``solve`` integrates each sample with its own steps.

    ``max_steps`` bounds the attempted steps of each sample and ``min_step`` the step size (in the
    solver's own time variable); either limit raises :class:`StepSizeError` naming the sample.
    :meth:`per_sample_loop` is the one accept/reject loop; a solver supplies its attempt.
    """

    adaptive = True
    run_methods = ("solve",)

    def __init__(self, rtol: float, atol: float, max_steps: int, min_step: float):
        self.rtol, self.atol = check_nonnegative("rtol", rtol), check_nonnegative("atol", atol)
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("rtol and atol cannot both be 0: the error test would never pass")
        self.max_steps = check_count("max_steps", max_steps)
        self.min_step = check_positive("min_step", min_step)

    def with_tolerance(self, rtol: float, atol: float) -> AdaptiveSolver:
        """A copy of this solver with other tolerances."""
        other = copy.copy(self)
        AdaptiveSolver.__init__(other, rtol, atol, self.max_steps, self.min_step)
        return other

    @_left_to_subclasses
    def solve(self, model, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor,
              ctx: AdaptiveContext) -> torch.Tensor:
        """Integrate each sample i of x from t_start[i] to t_end[i] (float64, CPU, shape (B,))."""
        raise NotImplementedError(self._unimplemented(["solve"]))

    def per_sample_loop(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, done: torch.Tensor, ctx,
                        control: StepControl, attempt: Callable[[torch.Tensor], Attempt],
                        accepted: Callable[[torch.Tensor, torch.Tensor, Attempt], None] | None = None,
                        floor: Callable[[torch.Tensor, torch.Tensor, Attempt], tuple[torch.Tensor, str]] | None = None,
                        variable: str = "") -> torch.Tensor:
        """The accept/reject loop of every adaptive solver, one decision per sample.

        ``x`` (B, ...) the integrated state, ``t`` (B,) the SDE times, ``h`` (B,) the next step sizes
        (all updated in place), ``done`` the samples already at their end.  Until every sample is done:
        ``attempt(idx)`` tries a step of the running rows ``idx`` (reading ``h[idx]``); where its error
        is <= 1 the state and time move on and ``accepted(idx, accept, attempt)`` updates the solver's
        own per-sample state (caches at the step's start, the last accepted lower-order solution).  Every
        attempt, accepted or not, sets the next step by ``control`` and checks :attr:`max_steps` and the
        step floor: ``floor(proposal, accept, attempt)`` -> (rows whose proposed step is too small, the
        limit in words), by default :meth:`below_min_step`; ``variable`` names the step's variable in
        that message.  Returns x.
        """
        attempts = torch.zeros(x.shape[0], dtype=torch.long)
        rejected_last = torch.zeros(x.shape[0], dtype=torch.bool)
        while not bool(done.all()):
            idx = torch.nonzero(~done).flatten()
            a = attempt(idx)
            accept = self.judge(a.err, idx, a.t, ctx, attempts)
            acc = idx[accept]
            x[acc] = a.x[accept]
            t[acc] = a.t_next[accept]
            done[acc] = a.final[accept]
            if accepted is not None:
                accepted(idx, accept, a)
            factor = control.safety * self.shrink(a.err, -control.exponent)
            if control.factor_min is not None or control.factor_max is not None:
                factor = factor.clamp(control.factor_min, control.factor_max)
            if control.hold_after_reject:
                factor = torch.where(rejected_last[idx] | ~accept, factor.clamp(max=1.0), factor)
                rejected_last[idx] = ~accept
            proposal = a.step * factor
            if a.remaining is None:
                h[idx] = proposal
            else:
                h[idx] = torch.minimum(proposal, torch.where(accept, *a.remaining))
            running = ~done[idx]
            self.check_attempts(running, idx, t[idx], attempts)
            # the controller's proposal, not the clipped step: a sliver left before the end is fine
            too_small, limit = (floor or self.below_min_step)(proposal, accept, a)
            too_small = running & too_small
            if a.unmeasured_start is not None:
                too_small &= accept | ~a.unmeasured_start
            if bool(too_small.any()):
                j = int(torch.nonzero(too_small)[0])
                self.fail(f"the step size{f' in {variable}' if variable else ''} fell to {float(proposal[j]):.3g}, "
                          f"below {limit}", int(idx[j]), float(t[idx[j]]))
        return x

    def below_min_step(self, proposal: torch.Tensor, accept: torch.Tensor,
                       attempt: Attempt) -> tuple[torch.Tensor, str]:
        """The default step floor of :meth:`per_sample_loop`: a proposal below :attr:`min_step`."""
        return proposal < self.min_step, f"min_step={self.min_step:g}"

    def error_norm(self, x_high: torch.Tensor, x_low: torch.Tensor, x_prev: torch.Tensor,
                   rtol: float | None = None, atol: float | None = None) -> torch.Tensor:
        """Per-sample RMS of (x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|)), float64 on CPU
        (the solver's tolerances unless given)."""
        rtol = self.rtol if rtol is None else rtol
        atol = self.atol if atol is None else atol
        scale = torch.maximum(x_low.abs(), x_prev.abs()).mul_(rtol).clamp_(min=atol)
        err = (x_high - x_low).div_(scale)
        return err.pow_(2).reshape(err.shape[0], -1).mean(dim=1).sqrt().to("cpu", torch.float64)

    def tolerance_args(self) -> str:
        """', rtol=..., atol=...' for a repr, when they differ from the class defaults."""
        defaults = inspect.signature(type(self)).parameters
        out = ""
        for name in ("rtol", "atol"):
            default = defaults[name].default if name in defaults else None
            if getattr(self, name) != default:
                out += f", {name}={getattr(self, name):g}"
        return out

    def judge(self, err: torch.Tensor, idx: torch.Tensor, t: torch.Tensor, ctx, attempts: torch.Tensor) -> torch.Tensor:
        """The accepted mask of one attempt of rows ``idx`` (at times ``t``) with errors ``err``:
        a NaN error fails its sample; the attempt is counted in ``attempts`` and in ``ctx``."""
        bad = ~torch.isfinite(err)
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0])
            self.fail("the state or the network output became NaN or Inf", int(idx[j]), float(t[j]))
        accept = err <= 1.0
        ctx.count_attempts(idx, accept)
        attempts[idx] += 1
        return accept

    def check_attempts(self, running: torch.Tensor, idx: torch.Tensor, t: torch.Tensor, attempts: torch.Tensor):
        """Fail the first running row of ``idx`` that has used up ``max_steps`` attempts."""
        too_many = running & (attempts[idx] >= self.max_steps)
        if bool(too_many.any()):
            j = int(torch.nonzero(too_many)[0])
            self.fail(f"no end after max_steps={self.max_steps} attempted steps", int(idx[j]), float(t[j]))

    @staticmethod
    def shrink(err: torch.Tensor, exponent: float) -> torch.Tensor:
        """E^exponent per sample (E floored at 1e-300), batch-independent."""
        return batch_independent(lambda e: e.clamp(min=1e-300).pow(exponent), err)

    @staticmethod
    def fail(message: str, index: int, t: float):
        raise StepSizeError(f"sample {index}: {message} at t={t:.6g}")


class AdaptiveDPMSolver(AdaptiveSolver):
    """DPM-Solver(++) with adaptive step size in the half log-SNR lambda, per sample.

    Lu et al. (2022), DPM-Solver-12 and -23: each attempt computes a lower-order and a
    higher-order singlestep solution that share their network calls (order (1, 2): DPM-Solver-1
    and -2S, r1 = 1/2; order (2, 3): -2S with r1 = 1/3 and -3S with r1 = 1/3, r2 = 2/3), and
    accepts the higher one where E = RMS((x_high - x_low)/delta) <= 1 with
    delta = max(atol, rtol max(|x_low|, |x_prev|)) (x_prev: the lower solution of the last
    accepted step).  Every attempt sets h <- min(safety h E^{-1/k}, lambda_end - lambda) with k
    the higher order.  Defaults are the paper's: h_init = 0.05, atol = 0.0078 (for data in
    [-1, 1]), rtol = 0.05, safety 0.9.

    Differences from the reference, which steps the whole batch at once: E, acceptance and h are
    per sample; a rejected sample reuses its network output at the step's start (so an attempt
    after a rejection costs k - 1 calls, not k).  A sample that starts where alpha = 0 (rectified
    flow at t = 1, lambda = -inf) first takes the exact-limit first-order step to
    lambda = log(2 atol)/2, where that step's local error is about atol.

    ``thresholding`` and ``correct_x0`` act on every x0 estimate as in :class:`DPMSolver` (they
    need ``predicts="x0"``); ``correct_x0`` receives the per-sample times of the estimate.
    """

    stochastic = False
    gaussian_only = True

    def __init__(self, order=(2, 3), predicts: str = "x0", rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05, safety: float = 0.9, max_steps: int = 10_000, min_step: float = 1e-8,
                 thresholding=False, correct_x0=None):
        order = tuple(order) if isinstance(order, (tuple, list)) else order
        order = check_choice("order", order, ((1, 2), (2, 3)), why=" (the orders of the embedded pair)")
        super().__init__(rtol, atol, max_steps, min_step)
        self.h_init = check_positive("h_init", h_init)
        self.safety = check_in_range("safety", safety, 0.0, 1.0, closed="right")
        self.order = self.pair = order
        # the error is that of the lower solution; the accepted one is the higher
        self.convergence_order = self.nfe_per_step = order[1]
        self.predicts = check_predicts(predicts)
        # the two singlestep formulas (one place: DPMSolver's coefficients), and the x0 hooks
        self._dpm = DPMSolver(order[1], predicts, variant="singlestep", thresholding=thresholding,
                              correct_x0=correct_x0)
        self.hooks = self._dpm.hooks
        self._fractions_low = () if order == (1, 2) else (1.0 / 3.0,)
        self._fractions_high = (0.5,) if order == (1, 2) else (1.0 / 3.0, 2.0 / 3.0)

    def solve(self, model, x, t_start, t_end, ctx):
        sde = model.sde
        batch = x.shape[0]
        quantity = self.predicts
        lam_end = batch_independent(sde.log_snr, t_end)
        lam_first = first_log_snr(self.atol)
        x_prev = x.clone()  # the lower-order solution of each sample's last accepted step
        m_s = torch.empty_like(x)  # the converted network output at each sample's current state
        m_s_valid = torch.zeros(batch, dtype=torch.bool)
        s = t_start.clone()
        h = torch.full((batch,), self.h_init, dtype=torch.float64)

        def converted(xs, out, t):
            p, q = ctx.coefficients(quantity, t, xs)
            m = xs * p + out * q
            if self.hooks.active:  # every x0 estimate, at its own per-sample times
                self.hooks.apply_at(m, t.to(device=xs.device, dtype=xs.dtype))
            return m

        def attempt(idx):
            s_i = s[idx]
            lam_s = batch_independent(sde.log_snr, s_i)
            lam_t = torch.where(torch.isfinite(lam_s), lam_s + h[idx], torch.full_like(lam_s, lam_first))
            # a step that would end within rounding of the end lands on it exactly
            final = lands_on_end(lam_t, lam_end[idx])
            t_i = torch.where(final, t_end[idx],
                              batch_independent(sde.t_from_log_snr, torch.minimum(lam_t, lam_end[idx])))
            # the stage outputs of the higher formula; the lower one's stage (if any) is its first
            high = self._coefficient_rows(model, s_i, t_i, self._fractions_high, idx)
            low = self._coefficient_rows(model, s_i, t_i, self._fractions_low, idx)
            stale = idx[~m_s_valid[idx]]
            if stale.numel():
                m_s[stale] = converted(x[stale], ctx.output(x[stale], s[stale], stale), s[stale])
                m_s_valid[stale] = True
            xs, m0 = x[idx], m_s[idx]
            ms = [m0]
            for j in range(1, len(self._fractions_high) + 1):
                u = xs * ctx.column(high[f"s{j}x"], xs)
                for i, m in enumerate(ms):
                    u += ctx.column(high[f"s{j}m{i}"], xs) * m
                t_j = high[f"s{j}t"]
                ms.append(converted(u, ctx.output(u, t_j, idx), t_j))
            last = len(ms) - 1
            x_high = xs * ctx.column(high["x"], xs) + ctx.column(high["m0"], xs) * m0 \
                + ctx.column(high[f"m{last}"], xs) * ms[last]
            x_low = xs * ctx.column(low["x"], xs) + ctx.column(low["m0"], xs) * m0
            if self._fractions_low:
                x_low += ctx.column(low["m1"], xs) * ms[1]
            err = self.error_norm(x_high, x_low, x_prev[idx])
            # h <- min(safety h E^{-1/k}, lambda_end - lambda), for accepted and rejected alike
            remaining = (lam_end[idx] - torch.minimum(lam_t, lam_end[idx]), lam_end[idx] - lam_s)
            return Attempt(x_high, err, s_i, t_i, final, h[idx], remaining, unmeasured_start=~torch.isfinite(lam_s),
                           x_low=x_low)

        def accepted(idx, accept, a):
            acc = idx[accept]
            x_prev[acc] = a.x_low[accept]
            m_s_valid[acc] = False

        control = StepControl(safety=self.safety, exponent=1.0 / self.convergence_order)
        return self.per_sample_loop(x, s, h, s <= t_end, ctx, control, attempt, accepted, variable="lambda")

    def _coefficient_rows(self, model, s, t, fractions, index):
        """DPMSolver's singlestep coefficients at per-sample (s, t), each row independent of the batch,
        refused (before any network call) where one the step uses is not finite: the singular
        parametrisations every fixed-grid solver refuses (an eps network where alpha = 0 in the data
        form, alpha_t/alpha_s from alpha = 0 in the noise form).  ``index``: the rows' sample numbers."""
        names = []

        def rows(s_pad, t_pad):
            table = self._dpm.singlestep_coefficients(model, s_pad, t_pad, fractions)
            names[:] = list(table)
            return tuple(table[name] for name in names)

        values = batch_independent(rows, s, t)
        table = dict(zip(names, values, strict=True))
        for name, value in table.items():
            if name not in ("h", "finite"):  # h is infinite from alpha = 0, where the step takes its exact limit
                check_coefficients_finite(self, name, value, lambda row, _: f"sample {int(index[row])}: the step "
                                          f"from t={float(s[row]):g} to t={float(t[row]):g}")
        return table

    def __repr__(self):
        return (f"AdaptiveDPMSolver(order={self.pair}, predicts={self.predicts!r}{self.tolerance_args()}"
                f"{self.hooks.repr_args()})")
