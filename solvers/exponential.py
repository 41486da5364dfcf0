"""The phi functions of exponential integrators, accurate for every step length.

phi_0(z) = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z = sum_j z^j/(j + k + 1)!.  An exponential
integrator (DPM-Solver, UniPC, SDE-DPM-Solver++) solves the linear part of its ODE exactly and
weights the model output's Taylor terms by z phi_k(z), with z = -h (data prediction) or h (noise
prediction) and h the step in log-SNR.  The recursion divides a difference that cancels as |z|
shrinks (it loses ~eps/|z|^k), so below |z| = :data:`PHI_SERIES_RADIUS` the series is used: its terms
fall at least as fast as 1/(j + k)!, and both branches stay within a few eps of the exact value
(relative, checked against 250-digit arithmetic in tests/test_exponential.py).  At z = -inf (a step
from alpha = 0, where h = inf) phi_k is 0 and z phi_k(z) = -1/(k - 1)!: finite, the exact limit.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PHI_SERIES_RADIUS", "phi_functions", "z_phi_functions"]

#: |z| below which phi_k is summed from its series instead of the recursion
PHI_SERIES_RADIUS = 1.0
#: sum_j z^j/(j + k)! for |z| < 1: the 24th term is below 1/24! ~ 2e-24, under float64 roundoff
_SERIES_TERMS = 24


def _small_and_large(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(small, z where small else 0, z where not small else 1): each branch sees only its own z."""
    small = z.abs() < PHI_SERIES_RADIUS
    return small, torch.where(small, z, torch.zeros_like(z)), torch.where(small, torch.ones_like(z), z)


def _series(z_small: torch.Tensor, k: int) -> torch.Tensor:
    """phi_k(z) = sum_j z^j/(j + k)!, Horner, for |z| < PHI_SERIES_RADIUS."""
    series = torch.zeros_like(z_small)
    for j in reversed(range(_SERIES_TERMS)):
        series = series * z_small + 1.0 / math.factorial(j + k)
    return series


def phi_functions(z: torch.Tensor, kmax: int) -> list[torch.Tensor]:
    """[phi_1(z), ..., phi_kmax(z)], elementwise over a float tensor ``z``; 0 at z = -inf."""
    small, zs, zl = _small_and_large(z)
    out = []
    recursion = torch.expm1(zl) / zl  # no cancellation where |z| >= 1
    for k in range(1, kmax + 1):
        if k > 1:
            recursion = (recursion - 1.0 / math.factorial(k - 1)) / zl
        out.append(torch.where(small, _series(zs, k), recursion))
    return out


def z_phi_functions(z: torch.Tensor, kmax: int) -> list[torch.Tensor]:
    """[z phi_1(z), ..., z phi_kmax(z)] = [e^z - 1, phi_1(z) - 1, phi_2(z) - 1/2, ...], elementwise;
    -1/(k - 1)! at z = -inf.  These are an exponential integrator's weights (times -1 for the step's
    sign convention: DPM-Solver++'s 1 - e^{-h} is -(z phi_1(z)) at z = -h)."""
    small, zs, zl = _small_and_large(z)
    out = [torch.expm1(z)]  # exact for every z: no series needed
    recursion = torch.expm1(zl) / zl  # phi_1 where |z| >= 1
    for k in range(2, kmax + 1):
        # z phi_k = phi_{k-1} - 1/(k-1)!, which cancels as |z| -> 0: the series there
        closed = recursion - 1.0 / math.factorial(k - 1)
        out.append(torch.where(small, zs * _series(zs, k), closed))
        recursion = closed / zl
    return out
