"""Unit tests of the forward SDEs (sde/), the prediction conversions and the Model wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_SDE_NAMES, F64, make_sde
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import Model, grid, sample
from sde import (
    EDMSDE,
    PREDICTIONS,
    VESDE,
    VPSDE,
    CosineVPSDE,
    DiscreteVPSDE,
    RectifiedFlowSDE,
    SubVPSDE,
    conversion,
)
from solvers import Euler

SDES = {name: make_sde(name) for name in ALL_SDE_NAMES}


def interior_times(sde, n=41, margin=0.0):
    """n times spread over [t_min, t_max - margin]; for piecewise-linear DiscreteVPSDE the
    points sit halfway between knots so that finite differences never straddle one."""
    if isinstance(sde, DiscreteVPSDE):
        n_knots = sde.num_timesteps
        idx = torch.linspace(0, n_knots - 2, n, dtype=F64).round()
        return (idx + 1.5) / n_knots
    hi = sde.t_max - margin
    if isinstance(sde, EDMSDE):  # sigma spans 4.6 decades: spread log-uniformly
        return torch.exp(torch.linspace(math.log(sde.t_min), math.log(hi), n, dtype=F64))
    return torch.linspace(sde.t_min, hi, n, dtype=F64)


def rf_safe_tmax(sde):
    # rectified flow has alpha(1) = 0 (log-SNR -inf): stay strictly below
    return 1e-3 if isinstance(sde, RectifiedFlowSDE) else 0.0


# -- log-SNR inverse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_SDE_NAMES)
def test_t_from_log_snr_inverts_log_snr(name):
    sde = SDES[name]
    t = interior_times(sde, n=201, margin=rf_safe_tmax(sde))
    if not isinstance(sde, DiscreteVPSDE):
        t = torch.cat([t, torch.tensor([sde.t_min], dtype=F64)])
    else:  # knots and the ends too
        t = torch.cat([t, torch.tensor([sde.t_min, sde.t_max, 0.5, 17 / 1000], dtype=F64)])
    lam = sde.log_snr(t)
    assert torch.isfinite(lam).all()
    back = sde.t_from_log_snr(lam)
    assert torch.allclose(back, t, rtol=1e-10, atol=1e-10), (back - t).abs().max()
    # log_snr is strictly decreasing in t
    ts = torch.unique(interior_times(sde, n=201, margin=rf_safe_tmax(sde)))  # sorted
    assert (torch.diff(sde.log_snr(ts)) < 0).all()


def test_log_snr_is_log_alpha_over_sigma():
    for sde in SDES.values():
        t = interior_times(sde, margin=rf_safe_tmax(sde))
        expected = torch.log(sde.alpha(t) / sde.sigma(t))
        assert torch.allclose(sde.log_snr(t), expected, rtol=1e-10, atol=1e-10), sde


def test_default_bisection_inverse():
    """GaussianSDE.t_from_log_snr's generic bisection agrees with the closed forms."""
    from sde import GaussianSDE

    for sde in (VPSDE(), CosineVPSDE(), RectifiedFlowSDE(t_min=1e-3, t_max=0.999)):
        t = torch.linspace(sde.t_min, sde.t_max, 17, dtype=F64)
        lam = sde.log_snr(t)
        assert torch.allclose(GaussianSDE.t_from_log_snr(sde, lam), t, atol=1e-12)


# -- derivatives and drift/diffusion -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_SDE_NAMES)
def test_derivatives_match_finite_differences(name):
    sde = SDES[name]
    t = interior_times(sde, margin=0.05 if isinstance(sde, (RectifiedFlowSDE, CosineVPSDE)) else 0.0)
    t = t[1:-1]  # central differences need room on both sides
    h = 1e-6 * torch.clamp(t, min=1.0) if isinstance(sde, EDMSDE) else torch.full_like(t, 1e-7)
    if isinstance(sde, DiscreteVPSDE):
        h = torch.full_like(t, 1e-6)  # well inside half a segment (5e-4)
    fd_alpha = (sde.alpha(t + h) - sde.alpha(t - h)) / (2 * h)
    fd_sigma = (sde.sigma(t + h) - sde.sigma(t - h)) / (2 * h)
    scale_a = sde.dalpha_dt(t).abs().max().clamp(min=1.0)
    scale_s = sde.dsigma_dt(t).abs().max().clamp(min=1.0)
    assert torch.allclose(sde.dalpha_dt(t), fd_alpha, rtol=1e-5, atol=1e-6 * float(scale_a))
    assert torch.allclose(sde.dsigma_dt(t), fd_sigma, rtol=1e-5, atol=1e-6 * float(scale_s))


@pytest.mark.parametrize("name", ALL_SDE_NAMES)
def test_drift_and_diffusion_match_the_marginals(name):
    """For x_t = alpha x0 + sigma eps: alpha' = f alpha and d(sigma^2)/dt = 2 f sigma^2 + g^2,
    with both left-hand sides by finite differences of alpha(t), sigma(t)."""
    sde = SDES[name]
    t = interior_times(sde, margin=0.05 if isinstance(sde, (RectifiedFlowSDE, CosineVPSDE)) else 0.0)[1:-1]
    h = 1e-6 * torch.clamp(t, min=1.0) if isinstance(sde, EDMSDE) else torch.full_like(t, 1e-7)
    f, g2 = sde.f(t), sde.g2(t)
    assert (g2 > 0).all()
    a, s = sde.alpha(t), sde.sigma(t)
    d_alpha = (sde.alpha(t + h) - sde.alpha(t - h)) / (2 * h)
    d_var = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(d_alpha, f * a, rtol=1e-5, atol=1e-7)
    assert torch.allclose(d_var, 2 * f * s * s + g2, rtol=1e-5, atol=1e-7 * float(g2.abs().max()))
    # drift/diffusion act on states of any rank with per-sample times
    x = torch.randn(len(t), 3, 2, dtype=F64)
    assert torch.allclose(sde.drift(x, t), f[:, None, None] * x)
    assert torch.allclose(sde.diffusion(x, t).expand_as(x), torch.sqrt(g2)[:, None, None].expand_as(x))


def test_known_schedule_values():
    vp = VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.3, 0.7], dtype=F64)
    log_alpha = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    assert torch.allclose(vp.alpha(t), torch.exp(log_alpha), rtol=1e-14)
    assert torch.allclose(vp.sigma(t), torch.sqrt(1 - torch.exp(2 * log_alpha)), rtol=1e-14)
    assert torch.allclose(vp.g2(t), 0.1 + t * 19.9, rtol=1e-12)  # g^2 = beta(t)
    sub = SubVPSDE()
    assert torch.allclose(sub.sigma(t), 1 - torch.exp(2 * log_alpha), rtol=1e-14)
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    assert torch.allclose(ve.sigma(t), 0.01 * 5000.0**t, rtol=1e-14)
    assert math.isclose(ve.prior_std, 50.0)
    edm = EDMSDE()
    assert torch.equal(edm.sigma(t), t) and torch.equal(edm.alpha(t), torch.ones_like(t))
    rf = RectifiedFlowSDE()
    assert torch.allclose(rf.alpha(t), 1 - t) and torch.allclose(rf.sigma(t), t)
    cos = CosineVPSDE()
    ang = lambda u: (u + 0.008) / 1.008 * math.pi / 2
    assert torch.allclose(cos.alpha(t), torch.cos(ang(t)) / math.cos(ang(0.0)), rtol=1e-13)


def test_discrete_vp_schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    sde = DiscreteVPSDE(betas=betas)
    ac = torch.cumprod(1 - betas, 0)
    n = torch.arange(1000, dtype=F64)
    knots = (n + 1) / 1000
    # the knots reproduce alphas_cumprod exactly (alpha = sqrt(alphas_cumprod))
    assert torch.allclose(sde.alpha(knots) ** 2, ac, rtol=1e-12)
    same = DiscreteVPSDE(alphas_cumprod=ac)
    assert torch.allclose(same.alpha(knots), sde.alpha(knots), rtol=1e-12)
    # timestep maps t = 1/N -> 0 and t = 1 -> N - 1, and inverts
    assert torch.allclose(sde.timestep(torch.tensor([1 / 1000, 1.0], dtype=F64)),
                          torch.tensor([0.0, 999.0], dtype=F64), atol=1e-9)
    assert torch.allclose(sde.t_from_timestep(sde.timestep(knots)), knots, atol=1e-14)
    assert sde.t_min == pytest.approx(1e-3) and sde.t_max == 1.0


def test_prior_logp_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    for sde in SDES.values():
        z = torch.randn(5, 3, 4, generator=gen, dtype=F64) * sde.prior_std
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(sde.prior_std, dtype=F64))
        expected = normal.log_prob(z).sum(dim=(1, 2))
        assert torch.allclose(sde.prior_logp(z), expected, rtol=1e-12), (sde, (sde.prior_logp(z) - expected).abs().max())
    assert VESDE().prior_std == 50.0 and EDMSDE().prior_std == 80.0 and VPSDE().prior_std == 1.0
    assert RectifiedFlowSDE().prior_std == 1.0


def test_discrete_vp_t_min_below_first_knot_names_the_range():
    # t_min below 1/N: log alpha is extrapolated from the first segment; with steep betas that
    # gives log alpha > 0 and sigma = NaN, and the constructor must still report the range
    with pytest.raises(ValueError, match=r"the time range must lie in \[1/N, 1\]"):
        DiscreteVPSDE(betas=[0.1, 0.2, 0.3], t_min=0.1)


def test_prior_sample_scales_normal():
    sde = VESDE()
    z = torch.randn(4, 2, dtype=F64)
    assert torch.equal(sde.prior_sample((4, 2), normal=z), z * 50.0)
    with pytest.raises(ValueError, match=r"normal must have shape \(4, 3\)"):
        sde.prior_sample((4, 3), normal=z)


def test_marginal_sample():
    sde = VPSDE()
    x0 = torch.randn(6, 2, dtype=F64)
    eps = torch.randn(6, 2, dtype=F64)
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    x = sde.marginal_sample(x0, t, noise=eps)
    assert torch.allclose(x, sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * eps)


def test_reverse_drift_family():
    sde = VPSDE()
    x = torch.randn(3, 2, dtype=F64)
    score = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    f, g2 = sde.f(t)[:, None], sde.g2(t)[:, None]
    for eta in (0.0, 0.5, 1.0):
        expected = f * x - 0.5 * (1 + eta**2) * g2 * score
        assert torch.allclose(sde.reverse_drift(x, t, score, eta=eta), expected)
        assert torch.allclose(sde.reverse_diffusion(x, t, eta=eta).expand_as(x), (eta * g2.sqrt()).expand_as(x))
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        sde.reverse_drift(x, t, score, eta=1.5)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        sde.reverse_diffusion(x, t, eta=-0.1)


# -- conversions ------------------------------------------------------------------------------------------------------


def _truth(sde, t, x0, eps):
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    da, ds = sde.dalpha_dt(t)[:, None], sde.dsigma_dt(t)[:, None]
    x = a * x0 + s * eps
    return x, {"x0": x0, "eps": eps, "score": -eps / s, "v": a * eps - s * x0, "velocity": da * x0 + ds * eps}


def _time_in(sde, u):
    hi = sde.t_max - (1e-3 if isinstance(sde, RectifiedFlowSDE) else 0.0)
    if isinstance(sde, EDMSDE):
        return math.exp(math.log(sde.t_min) + u * (math.log(hi) - math.log(sde.t_min)))
    return sde.t_min + u * (hi - sde.t_min)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(ALL_SDE_NAMES), a=st.sampled_from(PREDICTIONS), b=st.sampled_from(PREDICTIONS),
       u=st.integers(0, 10**6).map(lambda i: i / 10**6), seed=st.integers(0, 2**31 - 1))
def test_conversion_round_trip_and_truth(name, a, b, u, seed):
    sde = SDES[name]
    t = torch.tensor([_time_in(sde, u)], dtype=F64)
    p_ab, q_ab = conversion(sde, a, b, t)
    p_ba, q_ba = conversion(sde, b, a, t)
    # a -> b -> a is the identity: p_ba + q_ba p_ab = 0, q_ba q_ab = 1
    assert torch.allclose(q_ba * q_ab, torch.ones_like(t), rtol=1e-9)
    scale = (p_ba.abs() + q_ba.abs() * p_ab.abs()).clamp(min=1.0)
    assert ((p_ba + q_ba * p_ab).abs() <= 1e-9 * scale).all()
    # and b = p x + q a for the true quantities of a sample
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 3, generator=gen, dtype=F64)
    eps = torch.randn(1, 3, generator=gen, dtype=F64)
    x, q = _truth(sde, t, x0, eps)
    got = p_ab[:, None] * x + q_ab[:, None] * q[a]
    tol = 1e-9 * (p_ab.abs() * x.abs() + q_ab.abs() * q[a].abs() + q[b].abs()).clamp(min=1.0)
    assert ((got - q[b]).abs() <= tol).all(), (name, a, b, float(t), got, q[b])


def test_conversion_identity_and_errors():
    sde = VPSDE()
    t = torch.tensor([0.5], dtype=F64)
    for a in PREDICTIONS:
        p, q = conversion(sde, a, a, t)
        assert torch.equal(p, torch.zeros_like(t)) and torch.equal(q, torch.ones_like(t))
    with pytest.raises(ValueError, match=r"predicts='noise' is spelt predicts='eps'"):
        conversion(sde, "noise", "x0", t)
    with pytest.raises(ValueError, match=r"predicts must be 'eps', 'x0', 'v', 'score' or 'velocity', got 'denoised'"):
        conversion(sde, "denoised", "x0", t)
    with pytest.raises(ValueError, match=r"quantity must be 'eps', 'x0', 'v', 'score' or 'velocity', got 'denoised'"):
        conversion(sde, "eps", "denoised", t)


def test_conversion_singular_points_are_not_finite():
    rf = RectifiedFlowSDE()
    t1 = torch.tensor([1.0], dtype=F64)
    p, q = conversion(rf, "eps", "x0", t1)  # x0 = (x - sigma eps)/alpha with alpha = 0
    assert not torch.isfinite(torch.cat([p, q])).all()
    p, q = conversion(rf, "velocity", "x0", t1)  # finite: the velocity form survives alpha = 0
    assert torch.isfinite(torch.cat([p, q])).all()


# -- Model ---------------------------------------------------------------------------------------------------------


def test_model_predict_matches_conversion():
    sde = VPSDE()
    x0 = torch.randn(4, 2, dtype=F64)
    eps = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)
    x, truth = _truth(sde, t, x0, eps)
    for predicts in PREDICTIONS:
        model = Model(lambda xx, tt, _p=predicts: truth[_p], sde, predicts=predicts)
        for quantity in PREDICTIONS:
            assert torch.allclose(model.predict(quantity, x, t), truth[quantity], rtol=1e-9, atol=1e-9)
        assert torch.allclose(model.denoise(x, t), x0, atol=1e-9)
        assert torch.allclose(model.eps(x, t), eps, atol=1e-9)
        assert torch.allclose(model.score(x, t), truth["score"], atol=1e-9)
        assert torch.allclose(model.velocity(x, t), truth["velocity"], atol=1e-9)


def test_model_discrete_time_input_gets_integer_timesteps():
    sde = DiscreteVPSDE(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    model = Model(net, sde, predicts="eps", time_input="discrete")
    steps = 9  # 999 = 9 * 111: every uniform grid point is a training timestep
    sample(model, Euler(), shape=(3, 2), grid=grid(sde, steps, "uniform"), dtype=F64)
    assert len(seen) == steps + 1
    ts = torch.stack(seen)  # (steps + 1, B)
    expected = torch.arange(999, -1, -111, dtype=F64)
    assert torch.allclose(ts, expected[:, None].expand_as(ts), atol=1e-9)
    assert torch.allclose(ts, ts.round(), atol=1e-9)
    # and a callable time_input receives SDE times
    seen.clear()
    model = Model(net, sde, predicts="eps", time_input=lambda t: 10 * t)
    sample(model, Euler(), shape=(2, 1), grid=grid(sde, 3, "uniform"), dtype=F64)
    assert torch.allclose(seen[0], torch.full((2,), 10.0, dtype=F64))


def test_model_errors():
    sde = VPSDE()
    net = lambda x, t: x
    with pytest.raises(ValueError, match=r"predicts='noise' is spelt predicts='eps' \(the Model's names"):
        Model(net, sde, predicts="noise")
    with pytest.raises(ValueError, match="time_input='discrete' needs an SDE with discrete timesteps"):
        Model(net, sde, time_input="discrete")
    with pytest.raises(ValueError, match="time_input must be one of"):
        Model(net, sde, time_input="seconds")
    with pytest.raises(TypeError, match="net must be callable"):
        Model(3, sde)
    with pytest.raises(TypeError, match="sde must be an sde.SDE instance"):
        Model(net, "vp")
    model = Model(lambda x, t: x[:, :1], sde, predicts="x0")
    with pytest.raises(ValueError, match=r"net output has shape \(2, 1\), expected the state's shape \(2, 3\)"):
        model.output(torch.zeros(2, 3), torch.zeros(2))
    model = Model(lambda x, t: 1.0, sde)
    with pytest.raises(TypeError, match="net must return a torch.Tensor"):
        model.output(torch.zeros(2, 3), torch.zeros(2))
    model = Model(lambda x, t: torch.zeros(x.shape, dtype=torch.int64), sde)
    with pytest.raises(TypeError, match="net output must be a floating tensor"):
        model.output(torch.zeros(2, 3), torch.zeros(2))


# -- constructor validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VPSDE(beta_min=-0.1), "beta_min must be a positive finite number"),
        (lambda: VPSDE(beta_max=float("nan")), "beta_max must be a positive finite number"),
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "expected beta_max >= beta_min"),
        (lambda: VPSDE(t_min=0.5, t_max=0.5), "expected finite t_min < t_max"),
        (lambda: VPSDE(t_min=0.0), r"sigma\(t_min\) must be positive"),
        (lambda: SubVPSDE(t_max=float("inf")), "expected finite t_min < t_max"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=1.0), "expected sigma_max > sigma_min"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min must be a positive finite number"),
        (lambda: EDMSDE(sigma_max=-1.0), "sigma_max must be a positive finite number"),
        (lambda: EDMSDE(sigma_min=5.0, sigma_max=1.0), "expected finite t_min < t_max"),
        (lambda: CosineVPSDE(s=1.0), r"CosineVPSDE: s must be a number in \[0, 1\)"),
        (lambda: CosineVPSDE(t_max=1.0), "t_max must be below 1"),
        (lambda: DiscreteVPSDE(), "pass exactly one of betas or alphas_cumprod"),
        (lambda: DiscreteVPSDE(betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.8]), "pass exactly one of"),
        (lambda: DiscreteVPSDE(betas=[0.1, 1.2]), r"betas must hold at least 2 values, each in \(0, 1\)"),
        (lambda: DiscreteVPSDE(betas=[0.1]), "betas must hold at least 2 values"),
        (lambda: DiscreteVPSDE(alphas_cumprod=[0.9, 0.95]), "alphas_cumprod must be strictly decreasing"),
        (lambda: DiscreteVPSDE(alphas_cumprod=[1.0, 0.5]), r"alphas_cumprod must hold at least 2 values, each in \(0, 1\)"),
        (lambda: DiscreteVPSDE(betas=[0.1, 0.2, 0.3], t_max=1.5), r"the time range must lie in \[1/N, 1\]"),
        (lambda: DiscreteVPSDE(betas=torch.linspace(1e-4, 0.02, 1000), t_min=5e-4), r"the time range must lie in \[1/N, 1\]"),
        (lambda: RectifiedFlowSDE(t_max=1.5), "t_max must be at most 1"),
        (lambda: RectifiedFlowSDE(t_min=0.0), r"sigma\(t_min\) must be positive"),
    ],
)
def test_invalid_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_reprs_name_parameters():
    assert "beta_max=20" in repr(VPSDE())
    assert repr(SubVPSDE()).startswith("SubVPSDE(")
    assert "sigma_max=50" in repr(VESDE())
    assert "N=1000" in repr(SDES["DiscreteVP-betas"])


def test_model_predict_applies_discrete_time_in_float64_for_float32_states():
    """Model.predict/denoise converts float64 times to timesteps before casting to the state's
    compute dtype, as the sampling driver does, so the net sees integer timesteps (in float32
    arithmetic 10 of the 1000 come out off by up to 3e-5)."""
    import torch as _torch

    from samplers import Model
    from sde import DiscreteVPSDE

    ddpm = DiscreteVPSDE(betas=_torch.linspace(1e-4, 0.02, 1000))
    seen = []

    def net(x, n):
        seen.append(n)
        return _torch.zeros_like(x)

    model = Model(net, ddpm, predicts="eps", time_input="discrete")
    t = (_torch.arange(1000, dtype=_torch.float64) + 1) / 1000
    model.denoise(_torch.zeros(t.shape[0], 2), t)
    assert seen[-1].dtype == _torch.float32
    assert _torch.equal(seen[-1], _torch.arange(1000, dtype=_torch.float32))
