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

__all__ = ["derivative_weights"]


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
