"""samplers.likelihood: log p through the probability-flow ODE, against exact densities (float64 unless stated).

References: Gaussian data N(mu, s^2 I) (log p_t written from the definition here), a Gaussian with a
full covariance (so Hutchinson's estimate has a spread), and the 2-D mixture of samplers.problems,
whose log p_t is exact at every t.  With ``prior_logp`` set to the exact log p_{t_max}, the only
error left is the ODE solver's; with the SDE's own prior the prior mismatch adds to it.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, GaussianNet, gaussian_marginal, make_sde
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import LikelihoodResult, Model, bits_per_dim_offset, dequantize, likelihood, problems
from solvers import AdaptiveODE, Euler

MU, S = 0.7, 0.5


def gaussian_logp(sde, x, t, mu=MU, s=S):
    """log N(x; alpha mu, (alpha^2 s^2 + sigma^2) I) per sample, from the definition."""
    m, v = gaussian_marginal(sde, mu, s, t)
    d = x[0].numel()
    sq = (x.reshape(x.shape[0], -1) - m).pow(2).sum(dim=1)
    return -0.5 * d * math.log(2 * math.pi * v) - sq / (2 * v)


def gaussian_setup(sde_name, predicts="x0", d=3, n=6, seed=0):
    sde = make_sde(sde_name)
    model = Model(GaussianNet(sde, predicts, MU, S), sde, predicts=predicts)
    x = MU + S * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    exact_prior = lambda z: gaussian_logp(sde, z, sde.t_max)
    return sde, model, x, exact_prior


def full_cov_gaussian(d=6, seed=0):
    """One Gaussian with a full covariance: its score's Jacobian is not diagonal, so Rademacher probes
    have a spread (for isotropic or diagonal data they would be exact)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=F64)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)
    return problems.GaussianMixture(torch.randn(1, d, generator=gen, dtype=F64), covs=cov[None]), gen


# -- exact divergence: Gaussian data and the mixture ---------------------------------------------------------------

@pytest.mark.parametrize("sde_name", ["VP", "SubVP", "VE", "EDM", "CosineVP", "RectifiedFlow",
                                      "DiscreteVP-betas"])
def test_gaussian_data_exact_divergence(sde_name):
    """Every Gaussian SDE: log p_{t_min}(x) within 1e-3 nats/dim of the exact value (measured about 2e-6
    at the default rtol = atol = 1e-5, so the test asks for 2e-5)."""
    sde, model, x, exact_prior = gaussian_setup(sde_name)
    r = likelihood(model, x, prior_logp=exact_prior)
    assert isinstance(r, LikelihoodResult) and r.divergence == "exact" and r.vjp_per_call == 3
    err = (r.log_p - gaussian_logp(sde, x, sde.t_min)).abs().max().item() / 3
    assert err < 2e-5, err
    # bits/dim is the same number
    assert torch.allclose(r.bpd, -r.log_p / (3 * math.log(2)), rtol=0, atol=1e-14)
    assert torch.equal(r.std_error, torch.zeros(6, dtype=F64)) and r.log_p_probes.shape == (6, 1)


@pytest.mark.parametrize("predicts", ["eps", "x0", "v", "score", "velocity"])
def test_every_parametrisation(predicts):
    """The network's output goes through the Model conversion point: every prediction type gives the same
    log p (to the solver's tolerance)."""
    sde, model, x, exact_prior = gaussian_setup("VP", predicts)
    r = likelihood(model, x, prior_logp=exact_prior, solver=AdaptiveODE(rtol=1e-8, atol=1e-8))
    assert (r.log_p - gaussian_logp(sde, x, sde.t_min)).abs().max() < 1e-7


def test_default_prior_is_exact_for_standard_normal_data_under_vp():
    """VP keeps N(0, I) data at N(0, I) for all t: the SDE's own prior is exact and no prior_logp is needed."""
    sde = make_sde("VP")
    model = Model(GaussianNet(sde, "eps", 0.0, 1.0), sde, predicts="eps")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    r = likelihood(model, x)
    assert (r.log_p - gaussian_logp(sde, x, sde.t_min, 0.0, 1.0)).abs().max() / 4 < 1e-5
    assert torch.allclose(r.prior_log_p, sde.prior_logp(r.z))


@pytest.mark.parametrize("variable", ["angle", "lambda", "t"])
def test_error_follows_the_tolerance(variable):
    """Every integration variable converges to the exact value as the tolerance tightens (EDM up to
    sigma = 80; in t the error at 1e-8 is about 2e-7, in angle and lambda about 1e-9)."""
    sde, model, x, exact_prior = gaussian_setup("EDM", n=4)
    exact = gaussian_logp(sde, x, sde.t_min)
    errors = [(likelihood(model, x, prior_logp=exact_prior, solver=AdaptiveODE(rtol=tol, atol=tol, variable=variable))
               .log_p - exact).abs().max().item() for tol in (1e-4, 1e-6, 1e-8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6, errors


@pytest.mark.parametrize("sde_name", ["VP", "VE", "EDM"])
def test_mixture_2d_against_the_exact_density(sde_name):
    """The 2-D mixture: log p_{t_min} is exactly known; with the exact terminal density as prior the
    computed log p matches it to 2e-4 nats/dim at the default tolerance (measured about 5e-5) and to
    1e-6 at rtol = atol = 1e-8."""
    sde = make_sde(sde_name)
    mix = problems.mixture_2d()
    model = Model(mix.net(sde, "x0"), sde, predicts="x0")
    x = mix.sample(32, generator=torch.Generator().manual_seed(1))
    exact = mix.marginal_log_prob(sde, x, sde.t_min)
    prior = lambda z: mix.marginal_log_prob(sde, z, sde.t_max)
    r = likelihood(model, x, prior_logp=prior)
    assert (r.log_p - exact).abs().max() / 2 < 2e-4
    tight = likelihood(model, x[:8], prior_logp=prior, solver=AdaptiveODE(rtol=1e-8, atol=1e-8))
    assert (tight.log_p - exact[:8]).abs().max() / 2 < 1e-6
    # the SDE's own prior is off by the mismatch between N(0, prior_std^2 I) and p_{t_max}, nothing else
    own = likelihood(model, x)
    mismatch = sde.prior_logp(own.z) - mix.marginal_log_prob(sde, own.z, sde.t_max)
    assert torch.allclose(own.log_p - mismatch, r.log_p, rtol=0, atol=1e-9)


def test_interval_and_float32():
    """t_start/t_end: the density of x_{t_start}, pushed to t_end; float32 data give float32 results."""
    sde, model, x, _ = gaussian_setup("VP")
    r = likelihood(model, x, t_start=0.2, t_end=0.7, prior_logp=lambda z: gaussian_logp(sde, z, 0.7))
    assert (r.log_p - gaussian_logp(sde, x, 0.2)).abs().max() / 3 < 1e-5
    assert (r.t_start, r.t_end) == (0.2, 0.7)
    r32 = likelihood(model, x.float(), prior_logp=lambda z: gaussian_logp(sde, z.double(), sde.t_max).float())
    assert r32.log_p.dtype == torch.float32 and r32.z.dtype == torch.float32
    assert (r32.log_p.double() - gaussian_logp(sde, x, sde.t_min)).abs().max() / 3 < 1e-3


# -- Hutchinson ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("probe_noise", ["rademacher", "gaussian"])
def test_hutchinson_within_its_standard_error(probe_noise):
    """A full-covariance Gaussian in 6-D, 16 samples, 32 probes each: every estimate is within 4 standard
    errors of the exact log p, the z-scores have mean ~ 0 (|mean| < 4/sqrt(16)) and spread ~ 1, and the
    estimate differs from the exact trace's answer (a real spread, not a degenerate test)."""
    mix, gen = full_cov_gaussian()
    sde = make_sde("VP")
    model = Model(mix.net(sde, "eps"), sde, predicts="eps")
    x = mix.sample(16, generator=gen)
    prior = lambda z: mix.marginal_log_prob(sde, z, sde.t_max)
    exact = mix.marginal_log_prob(sde, x, sde.t_min)
    r = likelihood(model, x, divergence="hutchinson", probes=32, probe_noise=probe_noise, prior_logp=prior)
    assert r.divergence == "hutchinson" and r.probes == 32 and r.vjp_per_call == 32
    assert r.log_p_probes.shape == (16, 32) and bool((r.std_error > 0.05).all())
    zscore = (r.log_p - exact) / r.std_error
    assert zscore.abs().max() < 4, zscore
    assert abs(zscore.mean().item()) < 1.0 and 0.5 < zscore.std().item() < 1.6, zscore
    assert torch.allclose(r.std_error, r.log_p_probes.std(dim=1) / math.sqrt(32))
    assert torch.allclose(r.bpd_std_error, r.std_error / (6 * math.log(2)))
    # the exact trace on the same path: no spread, and on the exact value
    e = likelihood(model, x, divergence="exact", prior_logp=prior)
    assert (e.log_p - exact).abs().max() < 1e-4 < (r.log_p - exact).abs().max()


def test_single_probe_has_no_standard_error_and_probes_are_keyed():
    mix, gen = full_cov_gaussian()
    sde = make_sde("VE")
    model = Model(mix.net(sde, "x0"), sde, predicts="x0")
    x = mix.sample(4, generator=gen)
    one = likelihood(model, x, divergence="hutchinson")
    assert one.probes == 1 and one.std_error is None and one.bpd_std_error is None
    again = likelihood(model, x, divergence="hutchinson")
    other = likelihood(model, x, divergence="hutchinson", seed=1)
    assert torch.equal(one.log_p, again.log_p) and not torch.allclose(one.log_p, other.log_p)
    # the first probe of a 3-probe run is the 1-probe run's probe (keyed by the probe number); the paths
    # differ a little (the error test also covers the other probes' integrals), the other probes a lot
    three = likelihood(model, x, divergence="hutchinson", probes=3)
    assert torch.allclose(three.log_p_probes[:, 0], one.log_p, rtol=0, atol=1e-3)
    assert (three.log_p_probes[:, 1:] - one.log_p[:, None]).abs().max() > 0.05


def test_auto_divergence():
    sde = make_sde("VP")
    small = likelihood(Model(GaussianNet(sde, "x0", MU, S), sde, "x0"), torch.zeros(2, 16, dtype=F64))
    big = likelihood(Model(GaussianNet(sde, "x0", MU, S), sde, "x0"), torch.zeros(2, 17, dtype=F64))
    assert (small.divergence, small.vjp_per_call) == ("exact", 16)
    assert (big.divergence, big.vjp_per_call, big.probes) == ("hutchinson", 1, 1)


def test_every_call_is_counted_and_image_shapes():
    """NFE = network calls made (each with vjp_per_call backward passes); states of any shape."""
    sde = make_sde("VP")
    net = GaussianNet(sde, "x0", MU, S)
    rows = []
    counting = lambda x, t: (rows.append(x.shape[0]), net(x, t))[1]
    x = MU + S * torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    r = likelihood(Model(counting, sde, "x0"), x, divergence="hutchinson", probes=2,
                   prior_logp=lambda z: gaussian_logp(sde, z, sde.t_max))
    assert r.nfe == len(rows) and r.nfe_per_sample.sum().item() == sum(rows)
    assert r.z.shape == x.shape and r.dim == 8
    # isotropic data: Rademacher probes are exact (eps^T (a I) eps = a D)
    assert (r.log_p - gaussian_logp(sde, x, sde.t_min)).abs().max() / 8 < 1e-5


# -- dequantisation and bits per dimension ----------------------------------------------------------------------------

def test_offsets():
    assert bits_per_dim_offset(256, (0.0, 1.0)) == 8.0
    assert bits_per_dim_offset(256, (-1.0, 1.0)) == 7.0
    assert bits_per_dim_offset(32, (0, 4)) == 3.0


def test_dequantize_fills_each_bin_uniformly():
    levels = torch.arange(256, dtype=F64)
    x = (levels / 127.5 - 1.0).repeat(40, 1)  # uint8 / 127.5 - 1, 40 copies
    u_bins = (dequantize(x, 256, (-1.0, 1.0)) + 1.0) / 2.0 * 256  # = k + U
    u = u_bins - levels
    assert bool(((u >= 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # keyed: the same seed and sample index draw the same U, whatever the batch
    assert torch.equal(dequantize(x[5:6], seed=3, sample_index=[5]), dequantize(x, seed=3)[5:6])
    assert not torch.equal(dequantize(x, seed=3), dequantize(x, seed=4))
    # Score SDE's form for [0, 1] data: (U + 255 x) / 256
    x01 = levels[None] / 255
    assert torch.allclose(dequantize(x01, 256, (0, 1)), (u[0:1] + 255 * x01) / 256, atol=1e-12)
    with pytest.raises(ValueError, match=r"x must lie on the 256-level grid of data_range=\(-1, 1\).*sample 0"):
        dequantize(torch.tensor([[0.001]], dtype=F64))
    with pytest.raises(ValueError, match="x must lie on the 256-level grid"):
        dequantize(torch.tensor([[0.0], [1.5]], dtype=F64) * 2)


def test_bits_per_dim_of_8bit_data_bound_the_discrete_probability():
    """8-bit data in [-1, 1] from a Gaussian p_{t_min}: one data point, dequantised 48 times (48 sample
    indices).  bpd = -log p(x_deq)/(D ln 2) + 7; its expectation over U is an upper bound on the exact
    discrete -log2 P(bin)/D (Jensen), with a gap (curvature x width^2, about 1e-5 here) far below the
    Monte-Carlo error of the 48-draw mean: the mean lies within 4 of its standard errors of it.  Without
    the offset it would be 7 bits off."""
    sde, model, _, exact_prior = gaussian_setup("VP", d=2)
    point = torch.tensor([[0.5, 0.9]], dtype=F64)
    x = (torch.round((point + 1) * 127.5) / 127.5 - 1).expand(48, 2)
    r = likelihood(model, x, bins=256, prior_logp=exact_prior)
    assert r.offset == 7.0
    assert torch.allclose(r.bpd, -r.log_p / (2 * math.log(2)) + 7.0, rtol=0, atol=1e-13)
    # the same as dequantising first and asking for the continuous density
    x_deq = dequantize(x, 256, (-1.0, 1.0))
    plain = likelihood(model, x_deq, prior_logp=exact_prior)
    assert torch.equal(plain.log_p, r.log_p) and torch.allclose(plain.bpd + 7.0, r.bpd, rtol=0, atol=1e-13)
    assert torch.equal(likelihood(model, x_deq, bins=256, dequantize_data=False, prior_logp=exact_prior).bpd, r.bpd)
    # the exact discrete probability of the bin under p_{t_min} = N(m, v I)
    m, v = gaussian_marginal(sde, MU, S, sde.t_min)
    k = torch.round((x[0] + 1) * 127.5)
    lo, hi = -1 + 2 * k / 256, -1 + 2 * (k + 1) / 256
    cdf = lambda u: 0.5 * torch.erfc(-(u - m) / math.sqrt(2 * v))
    discrete_bpd = -torch.log2(cdf(hi) - cdf(lo)).sum().item() / 2
    mean_bpd, mean_error = r.bpd.mean().item(), r.bpd.std().item() / math.sqrt(48)
    assert abs(mean_bpd - discrete_bpd) < 4 * mean_error, (mean_bpd, discrete_bpd, mean_error)
    assert 1e-4 < mean_error < 1e-3  # the draws differ, and the test is sharp


# -- batch invariance ------------------------------------------------------------------------------------------------

def _mixture_batch():
    sde = make_sde("EDM")
    mix = problems.mixture_2d()
    model = Model(mix.net(sde, "eps"), sde, predicts="eps")
    x = mix.sample(12, generator=torch.Generator().manual_seed(5))
    return model, x, likelihood(model, x, divergence="hutchinson", probes=2, seed=7)


_BATCH = {}


@settings(max_examples=5, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=11), st.integers(min_value=1, max_value=4))
def test_batch_invariance(b, n):
    """Samples b .. b+n-1 alone (with their global sample indices) give the batch's probes, log p and counts."""
    if not _BATCH:
        _BATCH["run"] = _mixture_batch()
    model, x, together = _BATCH["run"]
    rows = list(range(b, min(b + n, 12)))
    alone = likelihood(model, x[rows], divergence="hutchinson", probes=2, seed=7, sample_index=rows)
    assert torch.allclose(alone.log_p_probes, together.log_p_probes[rows], rtol=1e-12, atol=1e-12)
    assert torch.equal(alone.nfe_per_sample, together.nfe_per_sample[rows])
    assert torch.equal(alone.accepted_per_sample, together.accepted_per_sample[rows])


# -- input errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"divergence": "trace"}, ValueError, "divergence must be 'auto', 'exact' or 'hutchinson', got 'trace'"),
    ({"probe_noise": "uniform"}, ValueError, "probe_noise must be 'rademacher' or 'gaussian', got 'uniform'"),
    ({"divergence": "exact", "probes": 4}, ValueError, "probes applies to divergence='hutchinson'"),
    ({"divergence": "hutchinson", "probes": 0}, ValueError, "probes must be an int >= 1"),
    ({"divergence": "hutchinson", "probes": 2.0}, ValueError, "probes must be an int >= 1"),
    ({"solver": Euler()}, TypeError, "solver must be a solvers.AdaptiveODE"),
    ({"t_start": 0.5, "t_end": 0.5}, ValueError, "need t_min <= t_start < t_end <= t_max"),
    ({"t_start": 0.0}, ValueError, "need t_min <= t_start"),
    ({"t_end": float("nan")}, ValueError, "t_end must be a finite number"),
    ({"prior_logp": 3}, TypeError, "prior_logp must be callable"),
    ({"prior_logp": lambda z: z}, ValueError, r"prior_logp must return a tensor of shape \(B,\) = \(2,\)"),
    ({"bins": 1}, ValueError, "bins must be an int >= 2"),
    ({"bins": 256, "data_range": (1.0, -1.0)}, ValueError, "data_range must be finite with lo < hi"),
    ({"bins": 256, "data_range": 3}, ValueError, "data_range must be a pair"),
    ({"dequantize_data": False}, ValueError, "dequantize_data=False applies only with bins"),
    ({"bins": 256, "dequantize_data": "no"}, TypeError, "dequantize_data must be True or False, got 'no'"),
    ({"cond": [1]}, TypeError, "cond must be a dict"),
    ({"dtype": torch.int32}, ValueError, "dtype must be a floating torch.dtype"),
])
def test_bad_arguments(kwargs, error, message):
    sde = make_sde("VP")
    model = Model(GaussianNet(sde, "x0", MU, S), sde, "x0")
    with pytest.raises(error, match=message):
        likelihood(model, torch.zeros(2, 3, dtype=F64), **kwargs)


def test_bad_data_and_models():
    sde = make_sde("VP")
    model = Model(GaussianNet(sde, "x0", MU, S), sde, "x0")
    with pytest.raises(TypeError, match="model must be a samplers.Model"):
        likelihood(GaussianNet(sde, "x0", MU, S), torch.zeros(2, 3, dtype=F64))
    for bad in (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(0, 3, dtype=F64), [[0.0, 1.0]]):
        with pytest.raises(ValueError, match=r"x must be a floating tensor of shape \(B, ...\)"):
            likelihood(model, bad)
    with pytest.raises(ValueError, match="x must be finite"):
        likelihood(model, torch.tensor([[0.0, float("nan")]], dtype=F64))
    with pytest.raises(ValueError, match="x must have at least one element per sample"):
        likelihood(model, torch.zeros(2, 0, dtype=F64))
    detached = Model(lambda x, t: GaussianNet(sde, "x0", MU, S)(x.detach(), t), sde, "x0")
    with pytest.raises(ValueError, match="the network output does not depend on x through autograd"):
        likelihood(detached, torch.zeros(2, 3, dtype=F64))
    # an eps network of rectified flow at t = 1 (alpha = 0): refused, naming the sample
    rf = make_sde("RectifiedFlow")
    with pytest.raises(ValueError, match="sample 0: the probability-flow ODE's coefficients are not finite at t=1"):
        likelihood(Model(GaussianNet(rf, "eps", MU, S), rf, "eps"), torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="variable lambda is infinite: use variable='angle'"):
        likelihood(Model(GaussianNet(rf, "x0", MU, S), rf, "x0"), torch.zeros(2, 3, dtype=F64),
                   solver=AdaptiveODE(variable="lambda"))


def test_non_gaussian_sde_is_refused():
    from sde import SDE

    class Jacobi(SDE):  # a stand-in for a non-Gaussian SDE (no alpha/sigma)
        pass

    model = Model(lambda x, t: -x, Jacobi(0.0, 1.0), predicts="score")
    with pytest.raises(ValueError, match="AdaptiveODE needs a Gaussian-marginal SDE"):
        likelihood(model, torch.zeros(2, 3, dtype=F64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    mix, gen = full_cov_gaussian()
    sde = make_sde("VP")
    model = Model(mix.net(sde, "eps"), sde, predicts="eps")
    x = mix.sample(8, generator=gen)
    cpu = likelihood(model, x, divergence="hutchinson", probes=4)
    gpu = likelihood(model, x.cuda(), divergence="hutchinson", probes=4)
    assert gpu.log_p.device.type == "cuda"
    assert torch.allclose(gpu.log_p.cpu(), cpu.log_p, rtol=0, atol=1e-6)
