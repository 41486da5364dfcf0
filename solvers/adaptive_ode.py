"""Embedded Runge-Kutta pairs for the probability-flow ODE, with error control per sample.

:class:`AdaptiveODE` integrates the ODE with Dormand-Prince 5(4), Bogacki-Shampine 3(2) or
Fehlberg 2(1); as every adaptive solver here, each sample has its own time, step size and
accept/reject decision, and only running samples call the network.  The default integration
variable is the angle atan2(sigma, alpha), in which the ODE is the v-prediction: finite at both
ends for every Gaussian SDE and stepping where the marginals change.  Variables, error test and
step rule: docs/solvers.md, "Probability-flow ODE with embedded Runge-Kutta pairs".
"""

from __future__ import annotations

import torch

from sde.validation import check_choice, check_in_range, check_positive

from .adaptive import AdaptiveSolver, Attempt, StepControl, batch_independent, first_log_snr, lands_on_end
from .tableau import TABLEAUX as ALL_TABLEAUX
from .tableau import Tableau

__all__ = ["AdaptiveODE", "Tableau", "TABLEAUX"]


#: the embedded pairs (:mod:`solvers.tableau`) this solver steps with
TABLEAUX = {name: tableau for name, tableau in ALL_TABLEAUX.items() if tableau.embedded}

_VARIABLES = ("angle", "lambda", "t")


class AdaptiveODE(AdaptiveSolver):
    """The probability-flow ODE with an embedded Runge-Kutta pair and per-sample error control.

    Parameters
    ----------
    tableau:
        the embedded Runge-Kutta pair: ``"dopri5"`` (Dormand-Prince 5(4), 6 calls per step with FSAL), ``"bosh3"``
        (Bogacki-Shampine 3(2), 3 calls, FSAL) or ``"fehlberg2"`` (Fehlberg 2(1), 3 calls).
        The higher-order solution is propagated (local extrapolation).
    rtol, atol:
        the per-sample error test on x (see the module docstring).  Defaults: SCORE's 1e-5.
    variable:
        the integration variable: ``"angle"`` (default), ``"lambda"`` or ``"t"``.
    h_init:
        first step size in the variable's units; ``None``: Hairer's heuristic (one extra call).
    safety:
        the controller's safety factor, in (0, 1].
    max_steps, min_step:
        per-sample limits on attempted steps and on the step size (in the variable's units);
        either raises :class:`StepSizeError` naming the sample, as does a step that no longer
        changes the variable in floating point.
    """

    stochastic = False
    gaussian_only = True

    def __init__(self, tableau: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, variable: str = "angle",
                 h_init: float | None = None, safety: float = 0.9, max_steps: int = 10_000,
                 min_step: float = 1e-10):
        self.tableau = check_choice("tableau", tableau, TABLEAUX)
        self.variable = check_choice("variable", variable, _VARIABLES)
        super().__init__(rtol, atol, max_steps, min_step)
        self.h_init = None if h_init is None else check_positive("h_init", h_init)
        self.safety = check_in_range("safety", safety, 0.0, 1.0, closed="right")
        self._rk = TABLEAUX[tableau]
        self.convergence_order = self._rk.order
        self.nfe_per_step = self._rk.calls_per_step

    # -- the variable: tau(t), t(tau), and dy/dtau = A y + B out with y = c(t) x -------------
    def _tau(self, sde, t):
        return batch_independent(lambda u: self._tau_rows(sde, u), t)

    def _t(self, sde, tau):
        return batch_independent(lambda u: self._t_rows(sde, u), tau)

    def _scale(self, sde, t):
        """c(t): y = c x (float64 (B,))."""
        return batch_independent(lambda u: self._scale_rows(sde, u), t)

    def _rhs_coefficients(self, model, t, variable):
        """(A, B, c) with dy/dtau = A y + B out at times t (float64 (B,))."""
        return batch_independent(lambda u: self._rhs_rows(model, u, variable), t)

    # the *_rows forms compute on whatever rows they get; the wrappers above make each row's value
    # independent of the batch (see batch_independent)
    def _tau_rows(self, sde, t):
        if self.variable == "t":
            return t.clone()
        if self.variable == "lambda":
            return sde.log_snr(t)
        return torch.atan2(sde.sigma(t), sde.alpha(t))

    def _t_rows(self, sde, tau):
        if self.variable == "t":
            return tau.clone()
        if self.variable == "lambda":
            return sde.t_from_log_snr(tau)
        lam = torch.log(torch.cos(tau)) - torch.log(torch.sin(tau))  # cos(pi/2) > 0 in float64
        return sde.t_from_log_snr(lam).clamp(sde.t_min, sde.t_max)

    def _scale_rows(self, sde, t):
        if self.variable == "t":
            return torch.ones_like(t)
        return torch.rsqrt(sde.alpha(t) ** 2 + sde.sigma(t) ** 2)

    def _rhs_rows(self, model, t, variable):
        sde = model.sde
        p, q = model.coefficients("velocity", t)
        if variable == "t":
            return p, q, torch.ones_like(t)
        a, s, da, ds = sde.alpha(t), sde.sigma(t), sde.dalpha_dt(t), sde.dsigma_dt(t)
        r2 = a * a + s * s
        c = torch.rsqrt(r2)
        dlogc = -(a * da + s * ds) / r2
        dphi = (a * ds - s * da) / r2  # dphi/dt
        dtau = dphi if variable == "angle" else da / a - ds / s
        return (dlogc + p) / dtau, c * q / dtau, c

    def solve(self, model, x, t_start, t_end, ctx):
        sde = model.sde

        def rhs(y_rows, t_rows, index, variable):
            a_, b_, c_ = self.flow_coefficients(model, t_rows, variable, index)
            out = ctx.output(y_rows / ctx.column(c_, y_rows), t_rows, index)
            return y_rows * ctx.column(a_, y_rows) + out * ctx.column(b_, y_rows)

        def measure(y_rows, t_rows):
            return y_rows * ctx.column(1.0 / self.state_scale(sde, t_rows), y_rows)

        y = x * ctx.column(self.state_scale(sde, t_start), x)
        y = self.integrate(sde, rhs, measure, y, t_start, t_end, ctx)
        return measure(y, t_end)

    def flow_coefficients(self, model, t, variable=None, index=None):
        """(A, B, c), float64 (B,): in the variable tau (the solver's unless given), the state
        y = c x obeys dy/dtau = A y + B net(x, t); refuses non-finite coefficients (naming the
        sample: ``index`` holds the rows' sample numbers)."""
        a_, b_, c_ = self._rhs_coefficients(model, t, self.variable if variable is None else variable)
        bad = ~(torch.isfinite(a_) & torch.isfinite(b_) & torch.isfinite(c_))
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0])
            sample = j if index is None else int(index[j])
            raise ValueError(
                f"{self!r}: sample {sample}: the probability-flow ODE's coefficients are not finite at "
                f"t={float(t[j]):.6g} "
                f"(predicts={model.predicts!r}; e.g. an 'eps' network where alpha = 0): start below that time "
                f"or use another parametrisation")
        return a_, b_, c_

    def state_scale(self, sde, t):
        """c(t), float64 (B,): the integrated state is y = c x."""
        return self._scale(sde, t)

    def integrate(self, sde, rhs, measure, y, t_start, t_end, ctx):
        """The per-sample embedded Runge-Kutta loop in the solver's variable, on any state y (B, ...).

        ``rhs(y_rows, t_rows, index, variable)`` is dy/dtau for rows ``index`` at SDE times t_rows;
        ``measure(v_rows, t_rows)`` maps a state (or a derivative: it must be linear) to the quantity
        the error test is on (x for :meth:`solve`).  Each row i runs from t_start[i] to t_end[i];
        returns y at t_end.
        """
        tab = self._rk
        batch = y.shape[0]
        t = t_start.clone()
        tau_end = self._tau(sde, t_end)
        tau = self._tau(sde, t)
        y = y.clone()
        k1 = torch.empty_like(y)
        k1_valid = torch.zeros(batch, dtype=torch.bool)
        done = t == t_end
        direction = torch.sign(tau_end - tau)
        if not bool(torch.isfinite(tau_end[~done]).all()):
            j = int(torch.nonzero(~done & ~torch.isfinite(tau_end))[0])
            raise ValueError(f"{self!r}: sample {j} ends at t={float(t_end[j]):.6g}, where the variable "
                             f"{self.variable} is infinite: use variable='angle'")

        # a sample that starts at lambda = -inf (alpha = 0) takes the exact-limit Euler step in phi first
        if self.variable == "lambda":
            start = torch.nonzero(~done & ~torch.isfinite(tau)).flatten()
            if start.numel():
                lam1 = torch.full((start.numel(),), first_log_snr(self.atol), dtype=torch.float64)
                lam1 = torch.minimum(lam1, tau_end[start])
                t1 = sde.t_from_log_snr(lam1)
                phi0 = torch.atan2(sde.sigma(t[start]), sde.alpha(t[start]))
                phi1 = torch.atan2(sde.sigma(t1), sde.alpha(t1))
                dz = rhs(y[start], t[start], start, "angle")
                y[start] += dz * ctx.column(phi1 - phi0, dz)
                t[start], tau[start] = t1, lam1
                done[start] = t1 == t_end[start]

        # Hairer's starting step (Hairer, Norsett & Wanner I, II.4), per sample, on the measured quantity
        h = torch.zeros(batch, dtype=torch.float64)
        todo = torch.nonzero(~done).flatten()
        if todo.numel():
            span = (tau_end[todo] - tau[todo]).abs()
            if self.h_init is not None:
                h[todo] = torch.minimum(torch.full_like(span, self.h_init), span)
            else:
                y0, t0 = y[todo], t[todo]
                f0 = rhs(y0, t0, todo, self.variable)
                k1[todo], k1_valid[todo] = f0, True
                x0 = measure(y0, t0)
                scale = (x0.abs() * self.rtol).clamp_(min=self.atol)
                d0 = self._rms(x0 / scale)
                d1 = self._rms(measure(f0, t0) / scale)
                h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp(min=1e-300))
                h0 = torch.minimum(h0, span)
                tau1 = tau[todo] + direction[todo] * h0
                y1 = y0 + ctx.column(direction[todo] * h0, y0) * f0
                t1 = self._t(sde, tau1)
                f1 = rhs(y1, t1, todo, self.variable)
                d2 = self._rms(measure(f1 - f0, t0) / scale) / h0
                dmax = torch.maximum(d1, d2)
                root = batch_independent(lambda d: (0.01 / d.clamp(min=1e-300)) ** (1.0 / tab.order), dmax)
                h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), root)
                h[todo] = torch.minimum(torch.minimum(100 * h0, h1), span)

        def attempt(idx):
            stale = idx[~k1_valid[idx]]
            if stale.numel():
                k1[stale] = rhs(y[stale], t[stale], stale, self.variable)
                k1_valid[stale] = True
            y_i, t_i, tau_i = y[idx], t[idx], tau[idx]
            span = tau_end[idx] - tau_i
            h_i = torch.minimum(h[idx], span.abs())
            # a step that would end within rounding of the end lands on it exactly
            final = lands_on_end(tau_i + direction[idx] * h_i, tau_end[idx], direction[idx])
            h_signed = torch.where(final, span, direction[idx] * h_i)
            tau_next = torch.where(final, tau_end[idx], tau_i + h_signed)
            no_progress = ~final & (tau_next == tau_i)
            if bool(no_progress.any()):
                j = int(torch.nonzero(no_progress)[0])
                self.fail(f"the step size {float(h_i[j]):.3g} no longer changes the variable {self.variable} in "
                          f"float64", int(idx[j]), float(t_i[j]))
            t_next = torch.where(final, t_end[idx], self._t(sde, tau_next))
            stage_t = [t_i if cj == 0 else t_next if cj == 1 else self._t(sde, tau_i + cj * h_signed)
                       for cj in tab.c]
            y_high, y_low, ks = tab.step(lambda u, j: rhs(u, stage_t[j], idx, self.variable), y_i, h_signed, k1[idx])
            err = self.error_norm(measure(y_high, t_next), measure(y_low, t_next), measure(y_i, t_i))
            return Attempt(y_high, err, t_i, t_next, final, h_i, carry=(tau_next, ks[-1]))

        def accepted(idx, accept, a):
            acc = idx[accept]
            tau_next, last_stage = a.carry
            tau[acc] = tau_next[accept]
            if tab.fsal:
                k1[acc] = last_stage[accept]
            else:
                k1_valid[acc] = False

        control = StepControl(safety=self.safety, exponent=1.0 / tab.order, factor_min=0.2, factor_max=10.0,
                              hold_after_reject=True)
        return self.per_sample_loop(y, t, h, done, ctx, control, attempt, accepted, variable=self.variable)

    @staticmethod
    def _rms(v):
        return v.pow(2).reshape(v.shape[0], -1).mean(dim=1).sqrt().to("cpu", torch.float64)

    def __repr__(self):
        extra = "" if self.variable == "angle" else f", variable={self.variable!r}"
        if self.h_init is not None:
            extra += f", h_init={self.h_init:g}"
        if self.safety != 0.9:
            extra += f", safety={self.safety:g}"
        if self.max_steps != 10_000:
            extra += f", max_steps={self.max_steps}"
        if self.min_step != 1e-10:
            extra += f", min_step={self.min_step:g}"
        return f"AdaptiveODE(tableau={self.tableau!r}{self.tolerance_args()}{extra})"
