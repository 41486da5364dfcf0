"""Every Runge-Kutta tableau of solvers.tableau satisfies the order conditions of its declared orders.

The conditions are Butcher's: for every rooted tree t with at most p nodes, b . Phi(t) = 1/gamma(t),
where Phi(t)_i is stage i's elementary weight (1 for the single node; the product over the root's
subtrees t_k of (A Phi(t_k))_i) and gamma(t) = |t| prod_k gamma(t_k), the tree's density.
"""

from __future__ import annotations

import math

import pytest

from solvers.adaptive_ode import TABLEAUX as EMBEDDED
from solvers.reversible import TABLEAUX as FIXED
from solvers.tableau import TABLEAUX, Tableau

#: the float tableaux hold rounded fractions: the conditions hold to a few ulp of their terms
TOL = 1e-14


def rooted_trees(nodes: int) -> list[tuple]:
    """The rooted trees with ``nodes`` nodes, each as the sorted tuple of its root's subtrees."""
    trees = {()}
    for _ in range(nodes - 1):
        trees = {grown for tree in trees for grown in _add_leaf(tree)}
    return sorted(trees, key=repr)


def _add_leaf(tree: tuple):
    """Every tree made from ``tree`` by hanging one new leaf on one of its nodes."""
    yield tuple(sorted(tree + ((),), key=repr))
    for i, child in enumerate(tree):
        for grown in _add_leaf(child):
            yield tuple(sorted(tree[:i] + (grown,) + tree[i + 1:], key=repr))


def size(tree: tuple) -> int:
    return 1 + sum(size(child) for child in tree)


def density(tree: tuple) -> int:
    return size(tree) * math.prod(density(child) for child in tree)


def elementary_weights(tab: Tableau, tree: tuple) -> list[float]:
    """Phi(t)_i for every stage i."""
    a = [[0.0] * tab.stages] + [list(row) + [0.0] * (tab.stages - len(row)) for row in tab.a]
    phi = [1.0] * tab.stages
    for child in tree:
        inner = elementary_weights(tab, child)
        phi = [phi[i] * sum(a[i][j] * inner[j] for j in range(tab.stages)) for i in range(tab.stages)]
    return phi


def order_condition_residuals(tab: Tableau, weights: tuple, order: int) -> dict:
    """b . Phi(t) - 1/gamma(t) for every tree up to ``order`` nodes."""
    return {tree: sum(w * p for w, p in zip(weights, elementary_weights(tab, tree))) - 1.0 / density(tree)
            for nodes in range(1, order + 1) for tree in rooted_trees(nodes)}


def test_rooted_tree_counts():
    """1, 1, 2, 4, 9 trees of 1..5 nodes (OEIS A000081), with densities 1; 2; 3, 6; 4, 8, 12, 24."""
    assert [len(rooted_trees(n)) for n in range(1, 6)] == [1, 1, 2, 4, 9]
    assert sorted(density(t) for t in rooted_trees(3)) == [3, 6]
    assert sorted(density(t) for t in rooted_trees(4)) == [4, 8, 12, 24]


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_tableau_satisfies_its_order_conditions(name):
    tab = TABLEAUX[name]
    assert tab.c[0] == 0.0
    for i, row in enumerate(tab.a, start=1):  # the nodes are the row sums: c = A 1
        assert math.isclose(sum(row), tab.c[i], rel_tol=0.0, abs_tol=TOL), (i, row)
    assert math.isclose(sum(tab.b), 1.0, rel_tol=0.0, abs_tol=TOL)
    bad = {tree: r for tree, r in order_condition_residuals(tab, tab.b, tab.order).items() if abs(r) > TOL}
    assert not bad, bad
    if tab.embedded:
        low = order_condition_residuals(tab, tab.b_low, tab.order_low)
        bad = {tree: r for tree, r in low.items() if abs(r) > TOL}
        assert not bad, bad


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_declared_order_is_the_highest(name):
    """Not an order too low: some condition of order + 1 fails, for b (and for the embedded b_low,
    which would otherwise make a useless error estimate)."""
    tab = TABLEAUX[name]
    pairs = [(tab.b, tab.order)] + ([(tab.b_low, tab.order_low)] if tab.embedded else [])
    for weights, order in pairs:
        residuals = order_condition_residuals(tab, weights, order + 1)
        assert max(abs(r) for tree, r in residuals.items() if size(tree) == order + 1) > 1e-6, (name, order)


def test_solvers_share_one_table():
    """Reversible takes the fixed-step tableaux, AdaptiveODE the embedded pairs: both from one table."""
    assert set(FIXED) | set(EMBEDDED) == set(TABLEAUX) and not set(FIXED) & set(EMBEDDED)
    assert all(TABLEAUX[name] is tab for name, tab in {**FIXED, **EMBEDDED}.items())
    assert list(FIXED) == ["euler", "midpoint", "heun", "ralston", "ssprk3", "rk4", "rk38"]
    assert list(EMBEDDED) == ["dopri5", "bosh3", "fehlberg2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(c=(0.0, 0.5), a=(), b=(0.0, 1.0), order=2), "rows"),
    (dict(c=(0.0, 0.5), a=((0.5,),), b=(1.0,), order=1), "weights"),
    (dict(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0), order=2, b_low=(1.0, 0.0)), "order_low"),
])
def test_malformed_tableau_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tableau("bad", **kwargs)


def test_fixed_tableau_has_no_error_estimate():
    import torch

    with pytest.raises(ValueError, match="no embedded weights"):
        TABLEAUX["rk4"].step(lambda y, j: y, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
