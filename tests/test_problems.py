"""Tests of the analytic test problems in samplers.problems."""

import math

import pytest
import torch

import sde as sde_lib
from samplers.problems import (
    GaussianMixture,
    gaussian,
    mixture_2d,
    mixture_64d,
    moment_error,
    probability_flow_rhs,
    reference_solution,
    sliced_wasserstein,
)
from sde.parametrization import PREDICTIONS, conversion

F64 = torch.float64

SDES = {
    "vp": sde_lib.VPSDE(),
    "ve": sde_lib.VESDE(),
    "edm": sde_lib.EDMSDE(),
    "subvp": sde_lib.SubVPSDE(),
    "rf": sde_lib.RectifiedFlowSDE(),
    "cosine": sde_lib.CosineVPSDE(),
}


def _full_cov_mixture(d=3, k=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=gen, dtype=F64)
    a = torch.randn(k, d, d, generator=gen, dtype=F64)
    covs = a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=F64)
    return GaussianMixture(means, covs, weights=torch.tensor([1.0, 2.0, 3.0])[:k])


def _per_sample_times(sde, n, gen):
    # strictly inside (t_min, t_max) so that every parametrisation is finite
    u = torch.rand(n, generator=gen, dtype=F64)
    return sde.t_min + (0.02 + 0.96 * u) * (sde.t_max - sde.t_min)


MIXTURES = {"2d": mixture_2d, "full": _full_cov_mixture}


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("mix", list(MIXTURES))
def test_score_matches_autograd(name, mix):
    sde, mixture = SDES[name], MIXTURES[mix]()
    gen = torch.Generator().manual_seed(0)
    n = 64
    t = _per_sample_times(sde, n, gen)
    x0 = mixture.sample(n, generator=gen)
    x = sde.marginal_sample(x0, t, noise=torch.randn(x0.shape, generator=gen, dtype=F64))
    x.requires_grad_(True)
    logp = mixture.marginal_log_prob(sde, x, t)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    score = mixture.score(sde, x.detach(), t)
    torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-9)

    # denoiser and eps from Tweedie's formula wherever alpha > 0
    a = sde.alpha(t)[:, None]
    s = sde.sigma(t)[:, None]
    den = mixture.denoiser(sde, x.detach(), t)
    torch.testing.assert_close(den, (x.detach() + s**2 * score) / a, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(mixture.eps(sde, x.detach(), t), -s * score, rtol=1e-9, atol=1e-9)


def test_log_prob_matches_scipy():
    from scipy.stats import multivariate_normal

    mixture = _full_cov_mixture()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = sum(
        float(w) * multivariate_normal(m.numpy(), c.numpy()).pdf(x.numpy())
        for w, m, c in zip(mixture.weights, mixture.means, mixture.covs)
    )
    torch.testing.assert_close(mixture.log_prob(x), torch.log(torch.as_tensor(expected)), rtol=1e-10, atol=1e-10)


def test_far_from_modes_is_finite():
    mixture = mixture_64d()
    sde = SDES["vp"]
    x = torch.full((4, 64), 1e3, dtype=F64)
    t = torch.tensor([1e-3, 0.01, 0.5, 1.0], dtype=F64)
    for out in (mixture.score(sde, x, t), mixture.denoiser(sde, x, t), mixture.eps(sde, x, t),
                mixture.marginal_log_prob(sde, x, t)):
        assert torch.isfinite(out).all()


def test_denoiser_finite_at_alpha_zero():
    mixture = mixture_2d()
    sde = SDES["rf"]
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.ones(5, dtype=F64)  # alpha(1) = 0: no information about x0
    den = mixture.denoiser(sde, x, t)
    torch.testing.assert_close(den, mixture.mean.expand(5, 2))
    torch.testing.assert_close(mixture.eps(sde, x, t), x)


@pytest.mark.parametrize("name", ["vp", "ve", "rf", "cosine"])
@pytest.mark.parametrize("mix", list(MIXTURES))
def test_marginal_moments_match_monte_carlo(name, mix):
    sde, mixture = SDES[name], MIXTURES[mix]()
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    t = 0.3 * sde.t_max if name != "ve" else 0.3  # VE: sigma ~ 0.2, still data-dominated
    x0 = mixture.sample(n, generator=gen)
    xt = sde.marginal_sample(x0, torch.full((n,), t, dtype=F64), noise=torch.randn(x0.shape, generator=gen, dtype=F64))
    mean, cov = mixture.marginal_mean_cov(sde, t)
    mc_mean = xt.mean(0)
    xc = xt - mc_mean
    mc_cov = xc.T @ xc / (n - 1)
    se_mean = torch.sqrt(torch.diagonal(mc_cov) / n)
    prod = xc[:, :, None] * xc[:, None, :]
    se_cov = prod.std(0) / math.sqrt(n)
    assert ((mc_mean - mean).abs() <= 5 * se_mean).all(), (mc_mean, mean)
    assert ((mc_cov - cov).abs() <= 5 * se_cov + 1e-12).all(), (mc_cov, cov)
    err = moment_error(xt, (mean, cov))
    assert err["mean_error"] < 5 * float(se_mean.norm())


def test_data_moments_and_sampling_64d():
    mixture = mixture_64d()
    assert mixture.dim == 64 and mixture.num_components == 4
    torch.testing.assert_close(mixture.means.norm(dim=1), torch.full((4,), 3.0, dtype=F64))
    x = mixture.sample(50_000, generator=torch.Generator().manual_seed(0))
    err = moment_error(x, mixture)
    assert err["mean_error"] < 0.1
    assert err["cov_rel_error"] < 0.05
    # a different mixture is clearly detected
    err_other = moment_error(x, mixture_64d(seed=1))
    assert err_other["mean_error"] > 1.0


@pytest.mark.parametrize("predicts", PREDICTIONS)
@pytest.mark.parametrize("name", list(SDES))
def test_net_conversions_are_consistent(predicts, name):
    sde, mixture = SDES[name], mixture_2d()
    gen = torch.Generator().manual_seed(2)
    n = 32
    t = _per_sample_times(sde, n, gen)
    x = sde.marginal_sample(mixture.sample(n, generator=gen), t, noise=torch.randn(n, 2, generator=gen, dtype=F64))
    net = mixture.net(sde, predicts)
    out = net(x, t)
    expected = {"x0": mixture.denoiser(sde, x, t), "eps": mixture.eps(sde, x, t), "score": mixture.score(sde, x, t)}
    for quantity, value in expected.items():
        p, q = conversion(sde, predicts, quantity, t)
        torch.testing.assert_close(p[:, None] * x + q[:, None] * out, value, rtol=1e-7, atol=1e-7)
    # and the converse: the exact net of every other kind agrees after conversion
    for other in PREDICTIONS:
        p, q = conversion(sde, other, predicts, t)
        torch.testing.assert_close(p[:, None] * x + q[:, None] * mixture.net(sde, other)(x, t), out,
                                   rtol=1e-7, atol=1e-7)


def test_net_accepts_image_shapes_and_low_precision():
    mixture = mixture_64d()
    sde = SDES["vp"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 4, 4, generator=gen, dtype=F64)
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    for predicts in PREDICTIONS:
        net = mixture.net(sde, predicts)
        ref = net(x.reshape(6, 64), t)
        out = net(x.float(), t.float())
        assert out.shape == x.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double().reshape(6, 64), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="predicts"):
        mixture.net(sde, "noise")
    with pytest.raises(ValueError, match="x must have shape"):
        mixture.net(sde)(torch.zeros(2, 63), torch.ones(2))
    with pytest.raises(ValueError, match="t must be"):
        mixture.net(sde)(torch.zeros(2, 64), torch.ones(3))


def test_sliced_wasserstein():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 5, generator=gen, dtype=F64)
    y = torch.randn(3000, 5, generator=gen, dtype=F64)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(2000, generator=gen)]) < 1e-12
    same = sliced_wasserstein(x, y)
    shift = torch.zeros(5, dtype=F64)
    shift[0] = 1.0
    shifted = sliced_wasserstein(x, y + shift)
    assert same < 0.1
    assert shifted > 0.3  # E over directions of <theta, e_0>^2 = 1/5: sliced W2 ~ 0.45
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x, y, seed=3)
    # exact for unequal sizes: point masses at 0 and 1 against one point at 0 -> W2^2 = 1/2 on every slice
    a = torch.tensor([[0.0], [1.0]], dtype=F64)
    b = torch.tensor([[0.0]], dtype=F64)
    assert sliced_wasserstein(a, b, projections=4) == pytest.approx(math.sqrt(0.5), rel=1e-12)


def test_reference_solution_linear_ode():
    lam = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)

    def rhs(x, t):
        assert x.shape == (3, 2, 2) and t.shape == (3,) and t.dtype == F64
        return lam[:, None, None] * x * (1.0 + t[:, None, None])

    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for t0, t1 in ((0.0, 1.3), (1.3, 0.2)):
        out = reference_solution(rhs, x, t0, t1)
        # x(t) = x(t0) exp(lam (t + t^2/2 - t0 - t0^2/2))
        exact = x * torch.exp(lam * ((t1 + t1**2 / 2) - (t0 + t0**2 / 2)))[:, None, None]
        torch.testing.assert_close(out, exact, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["vp", "ve", "edm", "rf", "cosine"])
def test_probability_flow_transports_gaussian_exactly(name):
    sde = SDES[name]
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    s0 = 0.7
    data = gaussian(mu, s0)
    x_u = sde.prior_sample((8, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    u, t = sde.t_max, sde.t_min
    out = reference_solution(probability_flow_rhs(data, sde), x_u, u, t)

    def coef(time):
        tt = torch.tensor(time, dtype=F64)
        return float(sde.alpha(tt)), float(sde.sigma(tt))

    a_u, sig_u = coef(u)
    a_t, sig_t = coef(t)
    scale = math.sqrt((a_t**2 * s0**2 + sig_t**2) / (a_u**2 * s0**2 + sig_u**2))
    exact = a_t * mu + scale * (x_u - a_u * mu)
    torch.testing.assert_close(out, exact, rtol=1e-7, atol=1e-7)


def test_gaussian_and_fixed_mixtures():
    g = gaussian(0.0, 2.0, dim=4)
    torch.testing.assert_close(g.mean, torch.zeros(4, dtype=F64))
    torch.testing.assert_close(g.covariance, 4.0 * torch.eye(4, dtype=F64))
    m = mixture_2d()
    assert m.dim == 2 and m.num_components == 8
    torch.testing.assert_close(m.weights, torch.arange(1, 9, dtype=F64) / 36)
    mean, cov = m.marginal_mean_cov(SDES["vp"], SDES["vp"].t_max)
    assert cov.diagonal().sub(1.0).abs().max() < 1e-3  # VP prior is nearly N(0, I) at t_max


def test_invalid_inputs():
    means = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3), stds=[1.0])
    with pytest.raises(ValueError, match="means must be finite"):
        GaussianMixture([[float("nan")]], stds=[1.0])
    with pytest.raises(ValueError, match="exactly one of covs"):
        GaussianMixture(means)
    with pytest.raises(ValueError, match="exactly one of covs"):
        GaussianMixture(means, torch.eye(3).expand(2, 3, 3), stds=[1.0, 1.0])
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture(means, torch.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(means, torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]).expand(2, 3, 3))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(means, torch.diag(torch.tensor([1.0, 1.0, -1.0])).expand(2, 3, 3))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(means, torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="stds must have shape"):
        GaussianMixture(means, stds=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture(means, stds=[1.0, 0.0])
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture(means, stds=[1.0, 1.0], weights=[1.0])
    with pytest.raises(ValueError, match="weights must be positive"):
        GaussianMixture(means, stds=[1.0, 1.0], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="std must be"):
        gaussian(0.0, -1.0, dim=2)
    with pytest.raises(ValueError, match="dim is required"):
        gaussian(0.0, 1.0)
