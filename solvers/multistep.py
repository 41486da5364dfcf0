"""Derivatives of the model output from its history: one rule for every multistep solver.

A multistep solver of order p keeps the converted outputs f_0 (newest), f_1, f_2 at nodes
u_0, u_1, u_2 of its integration variable (the log-SNR for DPM-Solver and UniPC, sigma/alpha for
ER-SDE) and Taylor-expands f around u_0.  The derivatives come from the polynomial through the
nodes, in Newton form with divided differences f[u0,u1] and f[u0,u1,u2]:

    f'(u0)  ~ f[u0,u1] + (u0 - u1) f[u0,u1,u2]
    f''(u0) ~ 2 f[u0,u1,u2]

Both are exact for polynomials of degree len(nodes) - 1, so the local error of the expansion
is O(h^{p+1}).  (Dropping the factor 2, as DPM-Solver's reference 3M does, or using the plain
backward difference for f'(u0) in a third-order scheme leaves an O(h^3) local error and a
second-order method.)
"""

from __future__ import annotations

import torch

__all__ = ["derivative_weights", "multistep_orders", "MAX_STEP_RATIO"]


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
        w1 = [a + (u0 - u1) * b for a, b in zip(w1, second)]
        w2 = [2.0 * b for b in second]
    return w1[: len(nodes)] + [zero] * (3 - len(nodes)), w2


#: a multistep step more than this many times longer (in its integration variable) than the step
#: before is taken with order 1: the history's derivative estimate would be extrapolated too far
MAX_STEP_RATIO = 3.0


def multistep_orders(order: int, n_steps: int, lower_order_final: bool = True,
                     h: torch.Tensor | None = None) -> list[int]:
    """The order of each of ``n_steps`` steps of a multistep method of ``order``.

    * warm-up: step k has only k earlier outputs, so its order is at most k + 1;
    * with ``lower_order_final`` (else the order is fixed after the warm-up, as convergence
      studies and comparisons with other libraries' fixed-order modes need):
    * fewer than 10 steps: at most N - k (DPM-Solver's rule: the last steps of a very short run
      are long, and a high order there is unstable);
    * step ratio: with the step lengths ``h`` ((N,) or (N, C)), a step more than
      :data:`MAX_STEP_RATIO` times the previous one (in any column) is first order.  That is the
      last step of a VP grid uniform in t (about 10x the previous in log-SNR at 50 steps), where
      extrapolating the history's slope over the long step costs 3-14x in error against order 1
      (measured on the 2-D mixture, DPM-Solver++ and UniPC, 10-50 steps); grids uniform in
      log-SNR or of Karras type never trigger it.
    """
    orders = []
    for k in range(n_steps):
        o = min(order, k + 1)
        if lower_order_final and n_steps < 10:
            o = min(o, n_steps - k)
        if lower_order_final and h is not None and k > 0 and o > 1 and bool((h[k] > MAX_STEP_RATIO * h[k - 1]).any()):
            o = 1
        orders.append(o)
    return orders
