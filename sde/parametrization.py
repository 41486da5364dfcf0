"""The one conversion point between what a network predicts and what a solver needs.

Every parametrisation of a Gaussian-marginal SDE is linear in the state: each quantity Q in
{x0, eps, score, velocity, v} is Q = p(t) x + q(t) out for a network output ``out`` at state ``x``.
:func:`conversion` returns (p, q), so solvers fold the conversion into their own per-step float64
coefficients instead of spending a pass over the batch on it.  With x = alpha x0 + sigma eps:
score = -eps / sigma, v = alpha eps - sigma x0 (Salimans & Ho), velocity = alpha' x0 + sigma' eps
(the probability-flow ODE's dx/dt, flow matching's u).  The table: docs/getting-started.md.
"""

from __future__ import annotations

import torch

from .base import GaussianSDE, _as_time
from .validation import check_choice, check_predicts

__all__ = ["PREDICTIONS", "conversion"]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


def _x0_eps_from(sde: GaussianSDE, predicts: str, t: torch.Tensor):
    """Coefficients ((p_x0, q_x0), (p_eps, q_eps)) of x0 and eps in terms of (x, out)."""
    a, s = sde.alpha(t), sde.sigma(t)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    if predicts == "eps":
        return (1.0 / a, -s / a), (zero, one)
    if predicts == "x0":
        return (zero, one), (1.0 / s, -a / s)
    if predicts == "score":
        return (1.0 / a, s * s / a), (zero, -s)
    if predicts == "v":
        n = a * a + s * s
        return (a / n, -s / n), (s / n, a / n)
    # velocity u = a' x0 + s' eps and x = a x0 + s eps: invert the 2x2 system
    da, ds = sde.dalpha_dt(t), sde.dsigma_dt(t)
    det = a * ds - s * da
    return (ds / det, -s / det), (-da / det, a / det)


def conversion(sde: GaussianSDE, predicts: str, quantity: str, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, q) with quantity = p x + q out for a network that predicts ``predicts``.

    ``t`` is a tensor of times; p and q have its shape and dtype.  Where a conversion is
    singular (eps at alpha = 0, x0 at sigma = 0) the coefficients are not finite, and the
    caller reports it.
    """
    check_predicts(predicts, PREDICTIONS)
    check_choice("quantity", quantity, PREDICTIONS)
    t = _as_time(t)
    if quantity == predicts:
        return torch.zeros_like(t), torch.ones_like(t)
    (px, qx), (pe, qe) = _x0_eps_from(sde, predicts, t)
    if quantity == "x0":
        return px, qx
    if quantity == "eps":
        return pe, qe
    if quantity == "score":
        s = sde.sigma(t)
        return -pe / s, -qe / s
    if quantity == "v":
        a, s = sde.alpha(t), sde.sigma(t)
        return a * pe - s * px, a * qe - s * qx
    da, ds = sde.dalpha_dt(t), sde.dsigma_dt(t)
    return da * px + ds * pe, da * qx + ds * qe
