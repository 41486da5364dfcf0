"""AdaptiveEM (Gotta Go Fast): per-sample adaptive reverse-SDE solver on a fixed Brownian path."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, GaussianX0Net, make_sde
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import Model, NonFiniteError, problems, sample
from solvers import AdaptiveEM, EulerMaruyama, StepSizeError

MIXTURE = problems.mixture_2d()


def mixture_model(sde_name="VP"):
    sde = make_sde(sde_name)
    return Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")


def run(model, solver, n=64, **kw):
    return sample(model, solver, shape=(n, 2), seed=3, dtype=F64, return_info=True, **kw)


def test_each_sample_has_its_own_steps():
    """The per-sample counts spread (a batch-wide step would give every sample the same count),
    the batched calls are about the slowest sample's, not the sum."""
    _, info = run(mixture_model(), AdaptiveEM(rtol=0.05), n=64)
    nfe = info.nfe_per_sample
    assert nfe.max() >= 1.5 * nfe.min(), nfe
    assert nfe.max() <= info.nfe <= 1.5 * nfe.max()
    assert info.nfe < nfe.sum() / 10
    # two calls per attempt, one less after a rejection (the drift at the start is reused), + final denoise
    attempts = info.accepted_per_sample + info.rejected_per_sample
    assert torch.equal(nfe, 2 * attempts - info.rejected_per_sample + 1)


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 63))
def test_batch_invariance(i):
    """Sample i alone (same seed, sample_index=[i]) equals sample i of the batch of 64, counts too."""
    model = mixture_model()
    together, info = run(model, AdaptiveEM(rtol=0.05), n=64)
    alone, info_i = sample(model, AdaptiveEM(rtol=0.05), shape=(1, 2), seed=3, sample_index=[i], dtype=F64,
                           return_info=True)
    assert torch.allclose(alone[0], together[i], rtol=1e-12, atol=1e-12)
    assert info_i.nfe_per_sample.item() == info.nfe_per_sample[i].item()
    assert info_i.rejected_per_sample.item() == info.rejected_per_sample[i].item()


def test_retries_follow_one_brownian_path():
    """With the Brownian path fixed by the seed, tightening the tolerance converges pathwise to that
    path's solution (fresh draws on retries would not converge at all): on Gaussian data the
    distance to a tight solve shrinks 3x or more from rtol 0.1 to 0.01 (measured 0.021 -> 0.0048)."""
    sde = make_sde("VP")
    model = Model(GaussianX0Net(sde, 0.5, 0.3), sde, predicts="x0")
    reference, _ = run(model, AdaptiveEM(rtol=1e-3, atol=1e-4), n=32)
    errors = [(run(model, AdaptiveEM(rtol=r, atol=r / 10), n=32)[0] - reference).pow(2).mean().sqrt().item()
              for r in (0.1, 0.01)]
    assert errors[1] < errors[0] / 3, errors


def test_beats_euler_maruyama_at_twice_the_nfe_on_vp():
    """The paper's claim on VP, data N(0.5, 0.1^2) with the exact score: the relative variance error
    of AdaptiveEM (default rtol 0.05) at its mean NFE per sample is below Euler-Maruyama's at twice
    that NFE, where EM's error is over 3 standard errors (measured -0.004 against +0.035, standard
    error 0.011).  On VE the claim fails on this measure (-0.034 against +0.004; see the issue 4
    note), while on the 2-D mixture it holds for both."""
    sde = make_sde("VP")
    mu, s, n, d = 0.5, 0.1, 4000, 4
    model = Model(GaussianX0Net(sde, mu, s), sde, predicts="x0")
    x, info = sample(model, AdaptiveEM(), shape=(n, d), seed=0, dtype=F64, return_info=True)
    nfe = int(info.nfe_per_sample.double().mean())
    x_em = sample(model, EulerMaruyama(), shape=(n, d), seed=0, dtype=F64, steps=2 * nfe)
    standard_error = (2.0 / (n * d)) ** 0.5
    ggf, em = (abs(v.var().item() / s**2 - 1) for v in (x, x_em))
    assert em > 3 * standard_error, (em, standard_error)
    assert ggf < em / 2, (ggf, em, nfe)


def test_nfe_falls_as_the_tolerance_loosens():
    model = mixture_model()
    costs = [run(model, AdaptiveEM(rtol=r), n=32)[1].nfe_per_sample.double().mean().item() for r in (0.01, 0.05, 0.2)]
    assert costs[0] > costs[1] > costs[2], costs


def test_paper_absolute_tolerance_per_sde():
    assert AdaptiveEM().tolerances_for(make_sde("VP")) == (0.05, 0.0078)
    assert AdaptiveEM().tolerances_for(make_sde("VE")) == (0.05, 0.0039)
    assert AdaptiveEM(atol=0.01).tolerances_for(make_sde("VE")) == (0.05, 0.01)
    assert AdaptiveEM().with_tolerance(0.1, 0.02).tolerances_for(make_sde("VE")) == (0.1, 0.02)
    assert repr(AdaptiveEM()) == "AdaptiveEM(rtol=0.05)"


def test_limits_raise_naming_the_sample():
    model = mixture_model()
    with pytest.raises(StepSizeError, match=r"sample \d+: no end after max_steps=3"):
        run(model, AdaptiveEM(max_steps=3))
    with pytest.raises(StepSizeError, match=r"sample \d+: the step size fell to .* below min_step=0.2"):
        run(model, AdaptiveEM(rtol=1e-3, min_step=0.2))
    with pytest.raises(StepSizeError, match=r"sample \d+: the step size fell to .* below the Brownian tree's resolution"):
        run(model, AdaptiveEM(rtol=1e-4, atol=1e-6, depth=3))
    sde = make_sde("VP")

    def poisoned(x, t):
        out = MIXTURE.net(sde, "x0")(x, t)
        out[2] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match="sample 2: at t=.* the network returned NaN or Inf for a finite input"):
        run(Model(poisoned, sde, predicts="x0"), AdaptiveEM(), n=4)


def test_refuses_a_start_where_the_reverse_sde_is_singular():
    sde = make_sde("RectifiedFlow")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    with pytest.raises(ValueError, match="not finite at the start time"):
        run(model, AdaptiveEM(), n=4)


@pytest.mark.parametrize("kwargs, message", [
    ({"rtol": -1}, "rtol must be"), ({"atol": float("nan")}, "atol must be"),
    ({"h_init": 0}, "h_init must be"), ({"h_init": 2.0}, r"h_init must be a number in \(0, 1\]"),
    ({"safety": 1.5}, r"safety must be a number in \(0, 1\]"), ({"exponent": -1}, "exponent must be"),
    ({"depth": 0}, "depth must be"), ({"max_steps": 0}, "max_steps must be"), ({"min_step": 0}, "min_step must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveEM(**kwargs)
