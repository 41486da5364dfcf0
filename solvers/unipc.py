"""UniPC: the unified predictor-corrector multistep solver (Zhao et al. 2023) for the ODE.

Exponential integrator in the half log-SNR, like DPM-Solver: the predictor UniP-p interpolates the
converted outputs of the history, and the corrector UniC-p reuses the network output at the
predicted point (which the next predictor needs anyway), so it raises the order to p + 1 for free.
Every weight is computed once per grid in ``prepare``, so a step is one linear update.  Two rules
differ from diffusers, both measured: the last steps are lowered only below 10 steps, and a long
data-form step towards noise (inversion) is not corrected.  Derivation and choices: docs/solvers.md,
"UniPC: the derivation and the choices"; numbers: docs/measurements.md, "UniPC".
"""

from __future__ import annotations

import math

import torch

from sde.validation import check_choice, check_flag, check_predicts

from .base import Solver, X0Hooks
from .exponential import PHI_SERIES_RADIUS, phi_functions
from .multistep import LowerOrderFinal, history_names, history_step, history_tables, multistep_orders

__all__ = ["UniPC"]

_VARIANTS = ("bh1", "bh2")
#: the longest data-form step towards noise (|h| in log-SNR; only a grid run backwards has one) that
#: UniC corrects: past it the correction amplifies the predictor's error (see the module)
MAX_CORRECTED_DATA_STEP_TOWARDS_NOISE = math.log(2.0)


def _g(z: torch.Tensor, n: int) -> list[torch.Tensor]:
    """[g_1, ..., g_n] with g_j = j! z phi_{j+1}(z) = j! phi_j(z) - 1 (-1 at z = -inf)."""
    phi = phi_functions(z, n + 1)
    small = z.abs() < PHI_SERIES_RADIUS  # where phi_functions summed the series
    return [torch.where(small, math.factorial(j) * z * phi[j], math.factorial(j) * phi[j - 1] - 1.0)
            for j in range(1, n + 1)]


def _weights(us: list[torch.Tensor], g: list[torch.Tensor]) -> list[torch.Tensor]:
    """c_i = rho'_i / r_i for nodes r_i = 1/u_i, where sum_i r_i^{j-1} rho'_i = g_j (j = 1..n).

    Written as sum_i u_i^{n-j} d_i = g_j with d_i = r_i^n c_i (a Vandermonde system in u), so a node
    at r = -inf (u = 0) is allowed: its weight is 0 and the others solve the first n - 1 equations,
    the limit of the system.  Batched over the (N, C) entries.
    """
    n = len(us)
    u = torch.stack(us, dim=-1)  # (N, C, n)
    rows = [u ** (n - j) for j in range(1, n + 1)]  # row j: u^{n-j}
    mat = torch.stack(rows, dim=-2)  # (N, C, n, n)
    rhs = torch.stack(g[:n], dim=-1).unsqueeze(-1)
    d = torch.linalg.solve(mat, rhs).squeeze(-1)
    return [d[..., i] * us[i] ** n for i in range(n)]


class UniPC(LowerOrderFinal, Solver):
    """UniPC (UniP-p predictor + UniC-p corrector), multistep, one network call per step.

    ``order`` p in 1, 2, 3 (diffusers' ``solver_order``); ``variant`` "bh1" (B(h) = h) or "bh2"
    (B(h) = e^h - 1, default); ``predicts="x0"`` integrates the x0 estimate (diffusers'
    ``predict_x0=True``, default), ``"eps"`` the noise estimate.  ``corrector=False`` gives the
    plain UniP-p multistep predictor.  Pathwise convergence order p + 1 with the corrector, p without
    (``convergence_order``).  Step k of N uses order min(p, k + 1) and, with
    ``lower_order_final`` and N < 10, at most N - k (:meth:`step_orders`; None: by where the run ends,
    :class:`solvers.multistep.LowerOrderFinal`); no corrector after the last step.

    ``thresholding`` (True or a :class:`DynamicThresholding`) and ``correct_x0(x0, t) -> x0`` act on
    every x0 estimate before it enters the history; they need ``predicts="x0"``.
    """

    nfe_per_step = 1
    stochastic = False
    gaussian_only = True

    def __init__(self, order: int = 2, variant: str = "bh2", predicts: str = "x0", corrector: bool = True,
                 lower_order_final: bool | None = None, thresholding=False, correct_x0=None):
        self.order = int(check_choice("order", order, (1, 2, 3)))
        self.variant = check_choice("variant", variant, _VARIANTS, why=" (B(h) = h or e^h - 1)")
        self.predicts = check_predicts(predicts)
        self.corrector = check_flag("corrector", corrector)
        self._set_lower_order_final(lower_order_final)
        self.hooks = X0Hooks(thresholding, correct_x0)
        if self.hooks.active and predicts != "x0":
            raise ValueError("thresholding and correct_x0 act on the x0 estimate: they need predicts='x0'")
        # UniC raises UniP-p's order by one
        self.convergence_order = self.order + int(corrector)

    def step_orders(self, n_steps: int, h: torch.Tensor | None = None) -> list[int]:
        """The predictor order p_k of each of ``n_steps`` steps (the corrector of step k is UniC-p_k):
        :func:`solvers.multistep.multistep_orders` (warm-up, lower_order_final below 10 steps, and,
        given the steps' lengths ``h`` in log-SNR, order 1 after a jump in step length)."""
        return multistep_orders(self.order, n_steps, self.lowers_final_order, h)

    def corrected_steps(self, h: torch.Tensor) -> torch.Tensor:
        """(N,) bool: whether the corrector of each step, of log-SNR lengths ``h`` ((N,) or (N, C)),
        is applied: never after the last step (no next call to reuse) and, in the data form, not after
        a step towards noise longer than :data:`MAX_CORRECTED_DATA_STEP_TOWARDS_NOISE` in any column
        (see the module)."""
        n = h.shape[0]
        corrected = torch.full((n,), self.corrector)
        corrected[-1] = False
        if self.predicts == "x0":
            long_towards_noise = (h < -MAX_CORRECTED_DATA_STEP_TOWARDS_NOISE).reshape(n, -1).any(dim=1)
            corrected &= ~long_towards_noise
        return corrected

    @property
    def _history(self) -> int:
        """How many earlier outputs a step reads (the ring holds this many + 1)."""
        return self.order if self.corrector else self.order - 1

    def prepare(self, model, times):
        sde = model.sde
        n = times.shape[0] - 1
        lam = sde.log_snr(times)
        h = lam[1:] - lam[:-1]
        alpha, sigma = sde.alpha(times), sde.sigma(times)
        if self.predicts == "x0":
            cx, z, scale = sigma[1:] / sigma[:-1], -h, alpha[1:]
        else:
            cx, z, scale = alpha[1:] / alpha[:-1], h, sigma[1:]
        first = -scale * torch.expm1(z)  # the coefficient of m_k in the first-order update
        bh = z if self.variant == "bh1" else torch.expm1(z)
        orders = self.step_orders(n, h)
        p = self.order

        zeros = torch.zeros_like(h)
        # u_j[k] = 1/r_j = h_k/(lam_{k-j} - lam_k): the node of m_{k-j} in step k (rows k < j unused:
        # filled with the uniform grid's -1/j so that the batched solves stay regular)
        us = {}
        for j in range(1, p):
            u = torch.full_like(h, -1.0 / j)
            if n > j:
                u[j:] = h[j:] / (lam[: n - j] - lam[j:n])
            us[j] = u
        g = _g(z, p)
        one = torch.ones_like(h)

        # predictor weights c_pred[o][i] (per step, if the step has order o) on (m_{k-i} - m_k), i = 1..o-1:
        # x_{k+1} = cx x + first m_k - scale sum_i c_pred[o][i] (m_{k-i} - m_k);  c = B rho / r
        c_pred = [[zeros] * p for _ in range(p + 1)]
        if p >= 2:
            c_pred[2][1] = 0.5 * bh * us[1]
        if p >= 3:
            c_pred[3][1], c_pred[3][2] = _weights([us[1], us[2]], g)
        # corrector weights: c_corr[o][i] on (m_{k-i} - m_k), i = 1..o-1, and c_new[o] on (m_{k+1} - m_k)
        c_corr = [[zeros] * p for _ in range(p + 1)]
        c_new = [zeros] * (p + 1)
        if self.corrector:
            c_new[1] = 0.5 * bh
            if p >= 2:
                c_corr[2][1], c_new[2] = _weights([us[1], one], g)
            if p >= 3:
                c_corr[3][1], c_corr[3][2], c_new[3] = _weights([us[1], us[2], one], g)

        # step k: x <- cx_k x + sum_j w[j][k] m_{k-j}  (predictor of step k, after the corrector of step k-1),
        # assembled per order with masks over the steps (torch.where keeps unused, possibly infinite, rows out)
        hist = self._history
        order_of = torch.tensor(orders, dtype=torch.int64)[:, None].expand_as(h)
        w = [first.clone()] + [zeros.clone() for _ in range(hist)]
        for o in range(2, p + 1):
            use = order_of == o
            for i in range(1, o):
                c = scale * c_pred[o][i]
                w[0] = torch.where(use, w[0] + c, w[0])
                w[i] = torch.where(use, w[i] - c, w[i])
        if self.corrector and n > 1:
            # corrected x_k = predicted x_k + delta, with the quantities of step i = k - 1 (order o_i):
            # delta = -scale_i [sum_j (c_corr - c_pred)_j (m_{i-j} - m_i) + c_new (m_{i+1} - m_i)];
            # it enters step k multiplied by cx_k.  Rows k >= 1 take row k - 1 of the step-i quantities.
            f = -cx[1:] * scale[:-1]
            prev_order = order_of[:-1]
            prev_corrected = self.corrected_steps(h)[:-1, None]
            for o in range(1, p + 1):
                use = (prev_order == o) & prev_corrected
                new = f * c_new[o][:-1]
                w[0][1:] = torch.where(use, w[0][1:] + new, w[0][1:])
                w[1][1:] = torch.where(use, w[1][1:] - new, w[1][1:])
                for j in range(1, o):
                    dc = f * (c_corr[o][j][:-1] - c_pred[o][j][:-1])
                    w[j + 1][1:] = torch.where(use, w[j + 1][1:] + dc, w[j + 1][1:])
                    w[1][1:] = torch.where(use, w[1][1:] - dc, w[1][1:])
        if self.variant == "bh1" and self.corrector and n > 1 and not bool(torch.isfinite(bh[0]).all()):
            raise ValueError(
                f"{self!r}: the first step starts at alpha = 0 (log-SNR -inf, e.g. rectified flow at t = 1), "
                "where bh1's B(h) = h is infinite and so is its first corrector weight: use variant='bh2' "
                "or start the grid below that time"
            )

        pc, qc = model.coefficients(self.predicts, times[:-1])
        # the ring of converted outputs, shared with the DPM solvers: solvers.multistep.history_tables
        return history_tables(hist + 1, cx, w, pc, qc, self.hooks, times)

    def table_names(self):
        return history_names(self._history + 1, self.hooks)[0]

    def plan_names(self):
        return history_names(self._history + 1, self.hooks)[1]

    def step(self, k, x, ctx):
        return history_step(k, x, ctx.output(x, k), ctx, self._history + 1, self.hooks, "unipc_m")

    def __repr__(self):
        extra = "" if self.corrector else ", corrector=False"
        extra += self._lower_order_final_repr()
        return (f"{type(self).__name__}(order={self.order}, variant={self.variant!r}, "
                f"predicts={self.predicts!r}{extra}{self.hooks.repr_args()})")
