"""The phi functions of solvers.exponential against 250-digit arithmetic, for steps from 1e-12 to 10."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers.exponential import PHI_SERIES_RADIUS, phi_functions, z_phi_functions

mpmath = pytest.importorskip("mpmath")

F64 = torch.float64
#: the largest relative error allowed for phi_k and z phi_k: measured worst over 6000 points of
#: |z| in [1e-12, 10] is 1.7e-16, 3.3e-16, 9.8e-16, 3.8e-15 (k = 4: three divisions of the recursion
#: just above |z| = 1, where the series takes over below)
REL_TOL = {1: 5e-16, 2: 1e-15, 3: 2e-15, 4: 8e-15}

#: |z| = 10^e, e uniform in [-12, 1], either sign: steps in log-SNR from a very fine grid to a coarse one
exponents = st.floats(min_value=-12.0, max_value=1.0)
steps = st.builds(lambda e, negative: -(10.0 ** e) if negative else 10.0 ** e, exponents, st.booleans())


def reference_phi(z: float, k: int):
    """phi_k(z) = (e^z - sum_{j<k} z^j/j!)/z^k, exact to far below float64 at 250 digits (the numerator
    cancels ~16 + 12 k digits at |z| = 1e-12)."""
    with mpmath.workdps(250):
        x = mpmath.mpf(z)
        return (mpmath.exp(x) - sum(x**j / mpmath.factorial(j) for j in range(k))) / x**k


def relative_error(got: float, exact) -> float:
    with mpmath.workdps(250):
        return float(abs((mpmath.mpf(got) - exact) / exact))


@settings(max_examples=60, deadline=None)
@given(st.lists(steps, min_size=1, max_size=8))
def test_phi_functions_match_high_precision(zs):
    z = torch.tensor(zs, dtype=F64)
    phis, z_phis = phi_functions(z, 4), z_phi_functions(z, 4)
    for k in range(1, 5):
        for i, zi in enumerate(zs):
            exact = reference_phi(zi, k)
            assert relative_error(float(phis[k - 1][i]), exact) <= REL_TOL[k], (k, zi)
            with mpmath.workdps(250):
                z_exact = mpmath.mpf(zi) * exact
            assert relative_error(float(z_phis[k - 1][i]), z_exact) <= REL_TOL[k], (k, zi)


@pytest.mark.parametrize("z", [PHI_SERIES_RADIUS, -PHI_SERIES_RADIUS, math.nextafter(PHI_SERIES_RADIUS, 0.0),
                               -math.nextafter(PHI_SERIES_RADIUS, 0.0)])
def test_both_branches_are_accurate_at_the_switch(z):
    """The series (|z| < 1) and the recursion (|z| >= 1) meet without a jump."""
    phis = phi_functions(torch.tensor([z], dtype=F64), 4)
    for k in range(1, 5):
        assert relative_error(float(phis[k - 1][0]), reference_phi(z, k)) <= REL_TOL[k]


def test_limits_at_zero_and_minus_infinity():
    """phi_k(0) = 1/k! and z phi_k(0) = 0; at z = -inf (a step from alpha = 0) phi_k = 0 and
    z phi_k = -1/(k-1)!, finite, so a solver's weights have their exact limit there."""
    z = torch.tensor([0.0, -math.inf], dtype=F64)
    phis, z_phis = phi_functions(z, 4), z_phi_functions(z, 4)
    for k in range(1, 5):
        assert phis[k - 1].tolist() == [1.0 / math.factorial(k), 0.0]
        assert z_phis[k - 1].tolist() == [0.0, -1.0 / math.factorial(k - 1)]


def test_vectorised_over_any_shape():
    """A (3, 4) table gives, entry by entry, what each z alone gives (the solvers' per-step, per-sample tables)."""
    z = torch.linspace(-3.0, 3.0, 12, dtype=F64).reshape(3, 4)
    for functions in (phi_functions, z_phi_functions):
        table = functions(z, 3)
        for k, values in enumerate(table, start=1):
            assert values.shape == z.shape and values.dtype == F64
            alone = torch.stack([functions(zi.reshape(1), 3)[k - 1][0] for zi in z.reshape(-1)]).reshape(3, 4)
            assert torch.equal(values, alone)
