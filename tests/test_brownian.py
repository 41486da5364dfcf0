import math

import pytest
import torch

from samplers.brownian import VirtualBrownianTree
from samplers.noise import NoiseSource


def tree(batch, seed=0, depth=16, **kw):
    return VirtualBrownianTree(NoiseSource(seed, batch), (2,), 0.0, 1.0, depth=depth, **kw)


def test_marginal_variance_and_independent_increments():
    n = 20000
    w = tree(n)
    a, b = w.value(0.3), w.value(0.8)
    # Var W(0.3) = 0.3, Var(W(0.8) - W(0.3)) = 0.5, Cov(W(0.3), W(0.8) - W(0.3)) = 0
    se = lambda v: v * math.sqrt(2 / (2 * n))
    assert abs(a.var().item() - 0.3) < 4 * se(0.3)
    assert abs((b - a).var().item() - 0.5) < 4 * se(0.5)
    cov = ((a - a.mean()) * (b - a - (b - a).mean())).mean().item()
    assert abs(cov) < 4 * math.sqrt(0.3 * 0.5 / (2 * n))
    assert w.value(0.0).abs().max().item() == 0.0


def test_increments_add_up_and_queries_repeat():
    w = tree(5)
    s, m, t = 0.11, 0.52, 0.93
    assert torch.allclose(w.increment(s, t), w.increment(s, m) + w.increment(m, t), atol=1e-12)
    assert torch.equal(w.value(0.42), w.value(0.42))


def test_per_sample_times_and_batch_invariance():
    big, small = tree(6, seed=3), tree(2, seed=3)
    t = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.2, 0.7], dtype=torch.float64)
    wb = big.value(t)
    assert torch.equal(wb[:2], small.value(t[:2]))
    assert not torch.equal(wb[2], wb[3])


def test_bridge_refines_consistently():
    # a deeper tree agrees with a shallower one on the shallower tree's dyadic points
    shallow, deep = tree(3, depth=6), tree(3, depth=14)
    for t in (0.25, 0.5, 0.375, 0.015625):
        assert torch.allclose(shallow.value(t), deep.value(t), atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="t0 < t1"):
        VirtualBrownianTree(NoiseSource(0, 1), (1,), 1.0, 0.0)
    with pytest.raises(ValueError, match="depth"):
        VirtualBrownianTree(NoiseSource(0, 1), (1,), 0.0, 1.0, depth=0)
    with pytest.raises(ValueError, match="must lie in"):
        tree(2).value(1.5)
