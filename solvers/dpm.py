"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction) for the ODE, multistep and singlestep.

Lu et al. (2022): in the half log-SNR the probability-flow ODE's linear part is solved exactly and
only the converted model output is interpolated, from the history (multistep, one call per step)
or from intermediate calls (singlestep 2S/3S).  Every per-step scalar is precomputed in
``prepare`` and the history lives in a ring of scratch buffers.  3M keeps the factor 2 in D2 that
the reference code drops, which is what makes it third order.  Formulas and rules:
docs/solvers.md, "DPM-Solver (multistep and singlestep)"; measured orders: docs/measurements.md,
"DPM-Solver".
"""

from __future__ import annotations

import torch

from sde.validation import check_choice, check_predicts

from .base import Plan, Solver, X0Hooks
from .exponential import z_phi_functions
from .multistep import (
    LowerOrderFinal,
    exponential_multistep_weights,
    history_names,
    history_step,
    history_tables,
    multistep_orders,
)

__all__ = ["DPMSolver"]

#: the singlestep stage fractions of h per order (DPM-Solver's r1 = 1/2; r1 = 1/3, r2 = 2/3)
STAGE_FRACTIONS = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}
#: the two formula variants: one call per step with a history, or ``order`` calls per step
VARIANTS = ("multistep", "singlestep")


class DPMSolver(LowerOrderFinal, Solver):
    """DPM-Solver(++) of order 1, 2 or 3 on the probability-flow ODE.

    ``predicts="x0"`` is DPM-Solver++ (the data form, recommended for guided sampling);
    ``predicts="eps"`` is the original DPM-Solver (noise form).  Order 1 is DDIM (eta = 0)
    in both forms.  ``variant="multistep"`` (2M, 3M) costs one network call per step;
    ``variant="singlestep"`` (2S, 3S) costs ``order`` calls per step (a step is one interval of
    the grid, so ``steps`` counts intervals; NFE = order x steps).  ``lower_order_final``
    applies to the multistep variant (None: by where the run ends, :class:`solvers.multistep.LowerOrderFinal`).
    Pathwise convergence order ``order``.

    ``thresholding`` (True or a :class:`DynamicThresholding`) and ``correct_x0(x0, t) -> x0``
    act on every x0 estimate before it is used; they need ``predicts="x0"``.
    """

    stochastic = False
    gaussian_only = True

    def __init__(self, order: int = 2, predicts: str = "x0", variant: str = "multistep",
                 lower_order_final: bool | None = None, thresholding=False, correct_x0=None):
        self.order = self.convergence_order = int(check_choice("order", order, (1, 2, 3)))
        self.predicts = check_predicts(predicts)
        self.variant = check_choice("variant", variant, VARIANTS)
        self._set_lower_order_final(lower_order_final)
        self.hooks: X0Hooks = X0Hooks(thresholding, correct_x0)
        if self.hooks.active and predicts != "x0":
            raise ValueError("thresholding and correct_x0 act on the x0 estimate: they need predicts='x0'")
        self.nfe_per_step = 1 if variant == "multistep" else self.order

    def step_orders(self, n_steps: int, h: torch.Tensor | None = None) -> list[int]:
        """The order used at each of ``n_steps`` steps: multistep, see
        :func:`solvers.multistep.multistep_orders` (warm-up, lower_order_final, and, given the steps'
        lengths ``h`` in log-SNR, order 1 after a jump in step length); singlestep, the solver's order,
        except a step starting at alpha = 0 (see the module)."""
        if self.variant == "singlestep":
            return [self.order] * n_steps
        return multistep_orders(self.order, n_steps, self.lowers_final_order, h)

    # -- coefficients ---------------------------------------------------------------------------

    def _weights(self, h, kmax):
        """[w_1, ..., w_kmax] with w_k = -z phi_k(z) (:mod:`solvers.exponential`), z = -h (data) or h
        (noise): w_1 = 1 - e^{-h} (data), -(e^h - 1) (noise); the step's k-th Taylor term of the
        converted output is weighted by scale * w_k."""
        z = -h if self.predicts == "x0" else h
        return [-w for w in z_phi_functions(z, kmax)]

    def _first_order(self, sde, t_s, t_t):
        """(cx, h, phi1, scale) of the first-order update between times t_s and t_t:
        x_t = cx x + scale phi1 m0 (alpha_t and sigma_t scale the data and noise forms)."""
        h = sde.log_snr(t_t) - sde.log_snr(t_s)
        if self.predicts == "x0":
            return sde.sigma(t_t) / sde.sigma(t_s), h, self._weights(h, 1)[0], sde.alpha(t_t)
        return sde.alpha(t_t) / sde.alpha(t_s), h, self._weights(h, 1)[0], sde.sigma(t_t)

    def _stage_fractions(self):
        return STAGE_FRACTIONS[self.order]

    @staticmethod
    def _stages_between(sde, t_s, t_t, fractions):
        """Stage times t(lambda_s + r h) for r in ``fractions``; where h is infinite (alpha_s = 0, the
        step is taken with order 1) the stage time is t_t, never used."""
        lam_s, lam_t = sde.log_snr(t_s), sde.log_snr(t_t)
        h = lam_t - lam_s
        finite = torch.isfinite(h)
        h0 = torch.where(finite, h, torch.zeros_like(h))
        return [torch.where(finite, sde.t_from_log_snr(torch.where(finite, lam_s + r * h0, lam_t)), t_t)
                for r in fractions]

    def stage_times(self, model, times):
        if self.variant != "singlestep" or self.order == 1:
            return {}
        stages = self._stages_between(model.sde, times[:-1], times[1:], self._stage_fractions())
        return {f"s{j}": t for j, t in enumerate(stages, start=1)}

    def prepare(self, model, times):
        if self.variant == "singlestep":
            return self._prepare_singlestep(model, times)
        sde = model.sde
        n = times.shape[0] - 1
        lam = sde.log_snr(times)
        cx, h, _, scale = self._first_order(sde, times[:-1], times[1:])
        # x_t = cx x + c_m0 m0 + c_d1 D1 + c_d2 D2
        w1, w2, w3 = self._weights(h, 3)
        c_m0 = scale * w1
        c_d1 = scale * w2
        c_d2 = scale * w3
        c_d1_2m = 0.5 * c_m0  # 2M: 1/2 alpha_t (1 - e^{-h}) D1 (data), -1/2 sigma_t (e^h - 1) D1 (noise)

        # D1 ~ h D'(lam_k) and D2 ~ h^2 D''(lam_k); order 2 keeps the 1/2 phi1 form of 2M
        m0, m1, m2 = exponential_multistep_weights(lam, h, self.step_orders(n, h), c_m0, c_d1_2m, c_d1, c_d2)

        p, q = model.coefficients(self.predicts, times[:-1])
        return history_tables(self.order, cx, (m0, m1, m2), p, q, self.hooks, times)

    def table_names(self):
        if self.variant == "multistep":
            return history_names(self.order, self.hooks)[0]
        names = {"x", "m0", "conv_x", "conv_out"} | self.hooks.table_names()
        for j in range(1, self.order):
            names |= {f"s{j}x", f"s{j}conv_x", f"s{j}conv_out", *(f"s{j}m{i}" for i in range(j))}
            names |= self.hooks.table_names(f"x0_hook_s{j}")
        if self.order > 1:
            names.add(f"m{self.order - 1}")
        return frozenset(names)

    def plan_names(self):
        if self.variant == "multistep":
            return history_names(self.order, self.hooks)[1]
        return frozenset({"orders"})

    def _prepare_singlestep(self, model, times):
        tables = self.singlestep_coefficients(model, times[:-1], times[1:], self._stage_fractions())
        tables.update(self.hooks.time_table(times))
        for j in range(1, self.order):
            tables.update(self.hooks.stage_time_table(f"x0_hook_s{j}", tables.pop(f"s{j}t")))
        tables.pop("finite")
        tables["orders"] = Plan(self.order if bool(f) else 1 for f in torch.isfinite(tables["h"]).all(dim=1))
        tables.pop("h")
        return tables

    def singlestep_coefficients(self, model, t_s, t_t, fractions) -> dict[str, torch.Tensor]:
        """Coefficients of one singlestep update from t_s to t_t (tensors of any one shape) with
        stages at the given fractions of h ((), (r1,), (r1, r2)): stage j's state
        u_j = s{j}x x + sum_i s{j}m{i} m_i, and x_t = x x + m0 m_0 + m{last} m_last, where m_0 is
        the converted output at t_s and m_i at stage i (its time s{j}t, its conversion
        s{j}conv_x/out).  Written from DPM-Solver's 2S/3S formulas; 2S takes any r1 and 3S any
        r1, r2 (its last stage formula is exact for r2 = 2/3 only, as in the paper)."""
        sde = model.sde
        cx, h, phi1, scale = self._first_order(sde, t_s, t_t)
        finite = torch.isfinite(h)
        coefs = {"x": cx, "m0": scale * phi1, "h": h, "finite": finite}
        if fractions:
            stages = self._stages_between(sde, t_s, t_t, fractions)
            hf = torch.where(finite, h, torch.ones_like(h))
            zero = torch.zeros_like(h)
            # the stages' own first-order coefficients: u = cx_r x + scale_r phi1_r m0
            firsts = [self._first_order(sde, t_s, t_r) for t_r in stages]
            for j, (cx_r, _, phi1_r, scale_r) in enumerate(firsts, start=1):
                coefs[f"s{j}x"] = cx_r
                coefs[f"s{j}m0"] = scale_r * phi1_r
            if len(fractions) == 1:
                (r1,) = fractions
                # x_t += scale phi1/(2 r1) (m1 - m0)
                coefs["m1"] = torch.where(finite, scale * phi1 / (2.0 * r1), zero)
                coefs["m0"] = coefs["m0"] - coefs["m1"]
            else:
                r1, r2 = fractions
                # u2 += scale_2 (r2/r1) w_2(r2 h) (m1 - m0)
                coefs["s2m1"] = torch.where(finite, firsts[1][3] * (r2 / r1) * self._weights(r2 * hf, 2)[1], zero)
                coefs["s2m0"] = coefs["s2m0"] - coefs["s2m1"]
                coefs["m2"] = torch.where(finite, scale / r2 * self._weights(hf, 2)[1], zero)
                coefs["m0"] = coefs["m0"] - coefs["m2"]
            for j, t_r in enumerate(stages, start=1):
                coefs[f"s{j}conv_x"], coefs[f"s{j}conv_out"] = model.coefficients(self.predicts, t_r)
                coefs[f"s{j}t"] = t_r
        coefs["conv_x"], coefs["conv_out"] = model.coefficients(self.predicts, t_s)
        return coefs

    # -- steps ----------------------------------------------------------------------------------

    def _converted(self, x, out, k, ctx, buffer: str, prefix: str = "", hook_time: str = "x0_hook_t"):
        """m = p x + q out (the prediction the solver integrates), into a scratch buffer, hooks applied."""
        m = torch.mul(x, ctx.coef(prefix + "conv_x", k), out=ctx.scratch(buffer))
        m.addcmul_(ctx.coef(prefix + "conv_out", k), out)
        if self.hooks.active:
            self.hooks.apply(m, k, ctx, hook_time)
        return m

    def step(self, k, x, ctx):
        if self.variant == "singlestep":
            return self._singlestep(k, x, ctx)
        return history_step(k, x, ctx.output(x, k), ctx, self.order, self.hooks, "dpm_m")

    def fused_step(self):
        """The fused CUDA kernel of this step (:mod:`solvers.kernels`): multistep without x0 hooks."""
        from .kernels import KernelUnsupported, multistep_kernel

        if self.variant != "multistep":
            raise KernelUnsupported("DPMSolver(variant='singlestep') has no fused kernel")
        return multistep_kernel(self.hooks, self.order, "dpm_m", noise=False)

    def _singlestep(self, k, x, ctx):
        order = ctx.plan("orders")[k]
        ms = [self._converted(x, ctx.output(x, k), k, ctx, "dpm_m0")]
        for j in range(1, order):
            u = torch.mul(x, ctx.coef(f"s{j}x", k), out=ctx.scratch("dpm_stage"))
            for i, m in enumerate(ms):
                u.addcmul_(ctx.coef(f"s{j}m{i}", k), m)
            ms.append(self._converted(u, ctx.output(u, k, stage=f"s{j}"), k, ctx, f"dpm_m{j}",
                                      prefix=f"s{j}", hook_time=f"x0_hook_s{j}"))
        x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("m0", k), ms[0])
        if order > 1:  # 2S uses m1; 3S uses m2 only (m1 entered through the second stage)
            last = order - 1
            x.addcmul_(ctx.coef(f"m{last}", k), ms[last])
        return x

    def __repr__(self):
        extra = "" if self.variant == "multistep" else ", variant='singlestep'"
        extra += self._lower_order_final_repr()
        return f"{type(self).__name__}(order={self.order}, predicts={self.predicts!r}{extra}{self.hooks.repr_args()})"
