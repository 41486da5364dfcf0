"""Derivatives of the model output from its history: one rule for every multistep solver.

The derivatives come from the interpolating polynomial through the newest nodes (Newton form), which
is exact for polynomials of the history's degree, so a solver of order p has an O(h^{p+1}) local
error; the reference codes' shortcuts (a missing factor 2, a plain backward difference) leave
second-order methods.  The step-order rule, the weight tables and the history step that these
solvers share are here too.  Formulas: docs/solvers.md, "History derivatives" and "Order of the
last steps".
"""

from __future__ import annotations

import copy

import torch

from sde.validation import check_flag

from .base import Plan

__all__ = ["derivative_weights", "multistep_orders", "LowerOrderFinal", "exponential_multistep_weights",
           "history_tables", "history_step", "MAX_STEP_RATIO"]


def derivative_weights(nodes: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights (w1, w2) on the values at ``nodes`` = [u0 (newest), u1, (u2)] with
    f'(u0) ~ sum_j w1[j] f_j and f''(u0) ~ sum_j w2[j] f_j (w2 is all zeros for two nodes).

    The nodes are tensors of one shape (per-step, per-sample values); they must be distinct.
    """
    if len(nodes) not in (2, 3):
        raise ValueError(f"derivative_weights needs 2 or 3 nodes, got {len(nodes)}")
    u0, u1 = nodes[0], nodes[1]
    zero = torch.zeros_like(u0)
    inv01 = 1.0 / (u0 - u1)
    w1 = [inv01, -inv01, zero]  # f[u0,u1]
    w2 = [zero, zero, zero]
    if len(nodes) == 3:
        u2 = nodes[2]
        inv12, inv02 = 1.0 / (u1 - u2), 1.0 / (u0 - u2)
        # f[u0,u1,u2] = (f[u0,u1] - f[u1,u2]) / (u0 - u2)
        second = [inv01 * inv02, (-inv01 - inv12) * inv02, inv12 * inv02]
        w1 = [a + (u0 - u1) * b for a, b in zip(w1, second, strict=True)]
        w2 = [2.0 * b for b in second]
    return w1[: len(nodes)] + [zero] * (3 - len(nodes)), w2


#: a multistep step more than this many times longer (in its integration variable) than the step
#: before is taken with order 1: the history's derivative estimate would be extrapolated too far
MAX_STEP_RATIO = 2.0


class LowerOrderFinal:
    """The ``lower_order_final`` option of the multistep solvers (:class:`DPMSolver`, :class:`DPMSolverSDE`,
    :class:`UniPC`): True lowers the order of a run's last steps (:func:`multistep_orders`), False keeps it,
    None (the default) decides by where the run ends (:meth:`for_grid`):

    * at t_min (a final denoise, or none, follows): True, DPM-Solver's rule;
    * at sigma = 0 (``grid(..., to_zero=True)``, ``sample(..., nfe=N)``): False.  The grid's last step is
      then the data estimate, a first-order step of its own, and keeping the full order on the steps
      before it was measured better at 4-6 calls on every problem and at 8-10 on all but the 2-D ring
      (docs/choosing-a-solver.md, "Few network calls").
    """

    lower_order_final: bool | None

    def _set_lower_order_final(self, value) -> None:
        self.lower_order_final = check_flag("lower_order_final", value, allow_none=True)

    def for_grid(self, *, ends_at_zero: bool):
        if self.lower_order_final is not None or not ends_at_zero:
            return self
        resolved = copy.copy(self)
        resolved.lower_order_final = False
        return resolved

    @property
    def lowers_final_order(self) -> bool:
        """Whether the step orders are lowered at the end: None is True outside a run that ends at sigma = 0."""
        return self.lower_order_final is not False

    def _lower_order_final_repr(self) -> str:
        return "" if self.lower_order_final is None else f", lower_order_final={self.lower_order_final}"


def multistep_orders(order: int, n_steps: int, lower_order_final: bool = True,
                     h: torch.Tensor | None = None) -> list[int]:
    """The order of each of ``n_steps`` steps of a multistep method of ``order``.

    * warm-up: step k has only k earlier outputs, so its order is at most k + 1;
    * with ``lower_order_final`` (else the order is fixed after the warm-up, as convergence
      studies and comparisons with other libraries' fixed-order modes need):
    * fewer than 10 steps: at most N - k (DPM-Solver's rule: the last steps of a very short run
      are long, and a high order there is unstable);
    * step ratio: with the steps ``h`` ((N,) or (N, C), of either sign: a grid run backwards, as
      :func:`samplers.invert` does, has h < 0), a step more than :data:`MAX_STEP_RATIO` times as long
      as the previous one (|h|, in any column) is first order.  That is the
      last step of a VP grid uniform in t, where extrapolating the history's slope over the long
      step was measured to cost more than a first-order step (docs/measurements.md, "Step orders
      of multistep solvers"); grids uniform in log-SNR or of Karras type never trigger it.
    """
    jump = [False] * n_steps
    if lower_order_final and h is not None and n_steps > 1:
        # lengths, not signed steps: on a grid run backwards (invert) every h is negative, and the
        # signed test h_k > 2 h_{k-1} would hold at every step, lowering the whole run to order 1
        length = h.abs()
        longer = (length[1:] > MAX_STEP_RATIO * length[:-1]).reshape(n_steps - 1, -1).any(dim=1)
        jump = [False] + longer.tolist()
    orders = []
    for k in range(n_steps):
        o = min(order, k + 1)
        if lower_order_final and n_steps < 10:
            o = min(o, n_steps - k)
        if jump[k]:
            o = 1
        orders.append(o)
    return orders


def exponential_multistep_weights(lam: torch.Tensor, h: torch.Tensor, orders: list[int], c_m0: torch.Tensor,
                                  c_d1_order2: torch.Tensor, c_d1: torch.Tensor,
                                  c_d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights (w0, w1, w2), each (N, C), on the converted outputs of steps k, k-1, k-2 for the
    update x_{k+1} = cx x_k + c_m0 m_k + c1 D1 + c_d2 D2 of an exponential multistep solver
    (DPM-Solver, SDE-DPM-Solver++), with D1 ~ h D'(lambda_k) and D2 ~ h^2 D''(lambda_k) from
    :func:`derivative_weights` over the history nodes lam[k], lam[k-1], lam[k-2] (the step
    starts, (N+1, C)); c1 is ``c_d1_order2`` on second-order steps and ``c_d1`` on third-order
    ones.  Vectorised over the steps: ``prepare`` costs no Python loop per step."""
    n = len(orders)
    order = torch.tensor(orders).reshape((n,) + (1,) * (h.dim() - 1))
    w = [c_m0.clone(), torch.zeros_like(h), torch.zeros_like(h)]
    if n > 1:  # second-order steps: nodes lam[k], lam[k-1]
        d1, _ = derivative_weights([lam[1:n], lam[0:n - 1]])
        sel = order[1:] == 2
        for j in range(2):
            w[j][1:] += torch.where(sel, c_d1_order2[1:] * h[1:] * d1[j], 0.0)
    if n > 2:  # third-order steps: nodes lam[k], lam[k-1], lam[k-2]
        d1, d2 = derivative_weights([lam[2:n], lam[1:n - 1], lam[0:n - 2]])
        sel = order[2:] == 3
        for j in range(3):
            w[j][2:] += torch.where(sel, c_d1[2:] * h[2:] * d1[j] + c_d2[2:] * h[2:] ** 2 * d2[j], 0.0)
    return w[0], w[1], w[2]


def history_tables(order: int, cx: torch.Tensor, weights, p: torch.Tensor, q: torch.Tensor, hooks,
                   times: torch.Tensor) -> dict[str, torch.Tensor | Plan]:
    """The tables of an exponential multistep update x_{k+1} = cx x_k + sum_j w_j[k] m_{k-j} whose
    converted outputs m = p x + q out (the x0 or eps estimate) are kept in a ring of scratch buffers;
    read by :func:`history_step`.

    The ring holds what costs the fewest passes to write: q out where p = 0 at every step (the
    network predicts the solver's quantity); m/p = x + (q/p) out, one fused pass, where p != 0 at
    every step and no x0 hook needs m itself (the weights are multiplied by p to match); else m.
    """
    n = cx.shape[0]
    w = [weights[j].clone() for j in range(order)]
    if order == 1 and not hooks.active:
        # nothing to remember: fold the conversion into the update, x <- (cx + w p) x + w q out
        return {"x": cx + w[0] * p, "out": w[0] * q}
    tables: dict[str, torch.Tensor | Plan]
    if bool((p == 0).all()):
        mode, tables = "direct", {"conv_out": q}
    elif bool((p != 0).all()) and not hooks.active:
        mode, tables = "scaled", {"conv_ratio": q / p}
        for j in range(order):  # the ring holds m/p: weight j of step k meets m_{k-j}/p_{k-j}
            w[j][j:] = w[j][j:] * p[: n - j]
    else:
        mode, tables = "general", {"conv_x": p, "conv_out": q}
    tables.update({"x": cx, "history": Plan([mode] * n), **hooks.time_table(times)})
    tables.update({f"m{j}": w[j] for j in range(order)})
    return tables


def history_names(order: int, hooks) -> tuple[frozenset[str], frozenset[str]]:
    """(tables, plans) that :func:`history_step` reads whatever the grid, for a solver's ``table_names`` and
    ``plan_names``: the conversion tables (conv_x/conv_out/conv_ratio) are left out, as the "history"
    plan written with them chooses which are read."""
    if order == 1 and not hooks.active:
        return frozenset({"x", "out"}), frozenset()
    weights = {f"m{j}" for j in range(order)}
    return frozenset({"x", *weights}) | hooks.table_names(), frozenset({"history"})


def history_step(k: int, x: torch.Tensor, out: torch.Tensor, ctx, order: int, hooks, ring_name: str) -> torch.Tensor:
    """x <- cx x + sum_j w_j m_{k-j} with the tables of :func:`history_tables`; this step's m goes
    into ring buffer k % order (named ``ring_name`` + index)."""
    if order == 1 and not hooks.active:
        return x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("out", k), out)
    mode = ctx.plan("history")[k]
    m0 = ctx.scratch(f"{ring_name}{k % order}")
    if mode == "scaled":
        torch.addcmul(x, ctx.coef("conv_ratio", k), out, out=m0)
    elif mode == "direct":
        torch.mul(out, ctx.coef("conv_out", k), out=m0)
    else:
        torch.mul(x, ctx.coef("conv_x", k), out=m0).addcmul_(ctx.coef("conv_out", k), out)
    if hooks.active:
        hooks.apply(m0, k, ctx)
    x.mul_(ctx.coef("x", k)).addcmul_(ctx.coef("m0", k), m0)
    for j in range(1, min(order, k + 1)):  # earlier buffers are written (weight 0 where the order is lower)
        x.addcmul_(ctx.coef(f"m{j}", k), ctx.scratch(f"{ring_name}{(k - j) % order}"))
    return x
