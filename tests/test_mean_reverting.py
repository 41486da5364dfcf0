"""MeanRevertingSDE (IR-SDE) and OptimalReverse, float64.

The mean state mu is per element (a random "degraded image"), and the data given mu are Gaussian:
x0 = mu + y0, y0 ~ N(M, S^2).  The exact network is written here from the closed-form marginal
x_t = mu + (x0 - mu) e^{-thetabar} + lam sqrt(1 - e^{-2 thetabar}) z, independently of the library's
alpha/sigma code paths it checks.

- forward: Euler-Maruyama on dx = theta (mu - x) dt + sigma dw (4096 samples x 4 elements) against the
  closed-form marginal, standardised, within 5 Monte-Carlo standard errors (a missing factor 2 in
  sigma^2 = 2 lam^2 theta is ~100 standard errors off);
- reverse: EM against the exact moment recurrence of its chain (sharp), ODE solvers pathwise against
  the exact flow, OptimalReverse against the exact recurrence of the posterior step; the data
  moments are recovered in each case;
- orders: DPM-Solver 1-3 (data and noise prediction) and ER-SDE 1-3 (phi(x) = x), least-squares slope of
  log error against log N, on the three theta schedules (log-SNR grids).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import F64, em_moments, fitted_order, gaussian_flow
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from samplers import Model, grid, sample
from sde import THETA_SCHEDULES, GaussianSDE, MeanRevertingSDE
from solvers import ERSDE, AdaptiveODE, AncestralSampling, DPMSolver, Euler, EulerMaruyama, Heun, OptimalReverse

ROOT = Path(__file__).resolve().parents[1]
M, S = 1.0, 0.5  # y0 = x0 - mu ~ N(M, S^2); em_moments uses the same (EM_MU, EM_S)
LAM = 0.5


def closed_form(sde, t):
    """(e^{-thetabar(t)}, lam^2 (1 - e^{-2 thetabar(t)})) from the definition thetabar = int theta, by quadrature."""
    tb = quad(lambda u: float(sde.theta(torch.tensor(u, dtype=F64))), 0.0, float(t), epsabs=0, epsrel=1e-13)[0]
    return math.exp(-tb), sde.lam**2 * (1.0 - math.exp(-2.0 * tb))


def y_moments(sde, t):
    """Mean and variance of y_t = x_t - mu for y0 ~ N(M, S^2)."""
    a, v = closed_form(sde, t)
    return a * M, a * a * S * S + v


class ExactNet:
    """x0 estimate E[x0 | x_t, mu] for y0 ~ N(M, S^2), as a network net(x, t, mu) in x-space."""

    def __init__(self, sde, predicts="x0"):
        self.sde, self.predicts = sde, predicts

    def __call__(self, x, t, mu):
        t = t.to(F64).reshape((-1,) + (1,) * (x.dim() - 1))
        a = torch.exp(-self.sde.theta_bar(t))
        var = self.sde.lam**2 * (1.0 - a * a)
        y = x - mu
        y0 = (a * S * S * y + var * M) / (a * a * S * S + var)
        if self.predicts == "x0":
            return (mu + y0).to(x.dtype)
        eps = (y - a * y0) / var.sqrt()
        return (eps if self.predicts == "eps" else -eps / var.sqrt()).to(x.dtype)


def make_mu(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(autouse=True)
def single_thread(restore_threads):
    torch.set_num_threads(1)


# -- the schedule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", THETA_SCHEDULES)
def test_schedule_is_the_integral_of_theta(schedule):
    sde = MeanRevertingSDE(schedule, lam=LAM, T=2.0, eps=0.005)
    for t in (1e-3, 0.01, 0.3, 1.1, 2.0):
        a, v = closed_form(sde, t)
        tt = torch.tensor(t, dtype=F64)
        assert float(sde.alpha(tt)) == pytest.approx(a, rel=1e-11)
        assert float(sde.sigma(tt)) ** 2 == pytest.approx(v, rel=1e-9)
    assert float(sde.alpha(torch.tensor(2.0, dtype=F64))) == pytest.approx(0.005, rel=1e-12)
    t = torch.linspace(1e-3, 2.0, 200, dtype=F64)
    # sigma_t^2 / theta_t = 2 lam^2, and GaussianSDE's g^2 from alpha, sigma and their derivatives agrees
    assert torch.allclose(sde.g2(t) / sde.theta(t), torch.full_like(t, 2 * LAM**2), rtol=1e-14)
    assert torch.allclose(GaussianSDE.g2(sde, t), sde.g2(t), rtol=1e-10)
    assert torch.allclose(sde.f(t), -sde.theta(t), rtol=1e-14)
    h = 1e-6
    for name in ("alpha", "sigma"):
        fd = (getattr(sde, name)(t + h) - getattr(sde, name)(t - h)) / (2 * h)
        assert torch.allclose(getattr(sde, f"d{name}_dt")(t), fd, rtol=1e-6, atol=1e-9), name
    assert bool((sde.log_snr(t)[1:] < sde.log_snr(t)[:-1]).all())
    assert sde.prior_std == LAM


def test_constant_theta_gives_linear_thetabar():
    sde = MeanRevertingSDE("constant", lam=LAM, T=3.0, eps=0.01)
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    assert torch.allclose(sde.theta_bar(t), t / 3.0 * -math.log(0.01), rtol=1e-14)
    assert torch.allclose(sde.theta(t), torch.full_like(t, -math.log(0.01) / 3.0), rtol=1e-14)


@settings(max_examples=40, deadline=None)
@given(schedule=st.sampled_from(THETA_SCHEDULES), lam=st.floats(0.01, 2.0), T=st.floats(0.5, 100.0),
       eps=st.floats(1e-3, 0.5), u=st.floats(1e-3, 1.0))
def test_t_from_log_snr_inverts_log_snr(schedule, lam, T, eps, u):
    sde = MeanRevertingSDE(schedule, lam=lam, T=T, eps=eps)
    t = torch.tensor([u * T], dtype=F64)
    assert torch.allclose(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-9, atol=1e-12 * T)
    assert torch.allclose(sde.t_from_theta_bar(sde.theta_bar(t)), t, rtol=1e-9, atol=1e-12 * T)


def test_cosine_thetabar_is_accurate_near_zero():
    """thetabar ~ u^2 near 0: the closed form has no cancellation (relative accuracy, vs quadrature)."""
    sde = MeanRevertingSDE("cosine", lam=LAM)
    for t in (1e-6, 1e-4, 1e-2):
        tb = quad(lambda u: float(sde.theta(torch.tensor(u, dtype=F64))), 0.0, t, epsabs=0, epsrel=1e-13)[0]
        assert float(sde.theta_bar(torch.tensor(t, dtype=F64))) == pytest.approx(tb, rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(schedule=st.sampled_from(THETA_SCHEDULES), u=st.floats(0.001, 1.0), batch=st.integers(1, 5))
def test_marginal_drift_and_prior_around_mu(schedule, u, batch):
    sde = MeanRevertingSDE(schedule, lam=LAM)
    x0, mu = make_mu((batch, 3), 1), make_mu((batch, 3), 2)
    t = torch.full((batch,), u, dtype=F64)
    mean, std = sde.marginal(x0, t, mu)
    a = sde.alpha(t)[:, None]
    assert torch.allclose(mean, mu + (x0 - mu) * a)
    assert torch.allclose(std, sde.sigma(t)[:, None].expand_as(std))
    y_mean, y_std = sde.marginal(x0 - mu, t)  # mu = None: the marginal of y = x - mu
    assert torch.allclose(y_mean + mu, mean) and torch.allclose(y_std, std)
    assert torch.allclose(sde.drift(x0, t, mu), sde.theta(t)[:, None] * (mu - x0))
    z = make_mu((batch, 3), 3)
    assert torch.allclose(sde.marginal_sample(x0, t, z, mu=mu), mean + std * z)
    assert torch.allclose(sde.prior_sample((batch, 3), normal=z, mu=mu), mu + LAM * z)
    assert torch.allclose(sde.prior_logp(mu + LAM * z, mu=mu), sde.prior_logp(LAM * z))
    score = make_mu((batch, 3), 4)
    assert torch.allclose(sde.reverse_drift(x0, t, score, 0.0, mu=mu),
                          sde.theta(t)[:, None] * (mu - x0) - 0.5 * sde.g2(t)[:, None] * score)


# -- forward process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", THETA_SCHEDULES)
def test_forward_samples_match_the_closed_form_marginal(schedule):
    sde = MeanRevertingSDE(schedule, lam=LAM)
    n_samples, dims = 4096, 4
    gen = torch.Generator().manual_seed(11)
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64).expand(n_samples, dims)
    x0 = torch.tensor([1.0, 1.0, -0.5, 3.0], dtype=F64) + 0.3 * torch.randn(n_samples, dims, generator=gen, dtype=F64)
    n_steps = 2000
    checkpoints = {500: None, 1000: None, 2000: None}
    x, dt = x0.clone(), sde.T / n_steps
    for k in range(n_steps):
        t = torch.tensor((k + 0.5) * dt, dtype=F64)  # midpoint-in-time rates: a first-order EM bias only
        x = x + sde.drift(x, t, mu) * dt + sde.diffusion(x, t) * math.sqrt(dt) * torch.randn(
            n_samples, dims, generator=gen, dtype=F64)
        if k + 1 in checkpoints:
            checkpoints[k + 1] = x.clone()
    n = n_samples * dims
    for k, x_t in checkpoints.items():
        t = torch.tensor(k * dt, dtype=F64)
        a, v = closed_form(sde, k * dt)
        mean, std = sde.marginal(x0, t, mu)
        z = (x_t - mean) / std
        # within 5 Monte-Carlo standard errors of N(0, 1) (2000 EM steps: the bias is ~0.3% of the variance)
        assert abs(z.mean().item()) < 5 / math.sqrt(n), (k, z.mean().item())
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n), (k, z.var().item())
        # against the definitions, not the library: mean mu + (x0 - mu) e^{-thetabar}, variance lam^2 (1 - e^{-2 thetabar})
        assert torch.allclose(mean, mu + (x0 - mu) * a, rtol=1e-10) and float(std.flatten()[0]) ** 2 == pytest.approx(v)
        # a missing factor 2 in sigma^2 = 2 lam^2 theta would show: the variance would be about half
        assert abs(((x_t - mean) ** 2).mean().item() / (v / 2) - 1) > 20 * math.sqrt(2 / n)


# -- reverse sampling with the exact score ------------------------------------------------------------------

EM_SHAPE = (500, 1000)


@pytest.mark.parametrize("predicts", ["x0", "eps"])
def test_euler_maruyama_recovers_the_data_moments(predicts):
    sde = MeanRevertingSDE("cosine", lam=LAM)
    mu = make_mu(EM_SHAPE, 5)
    n = EM_SHAPE[0] * EM_SHAPE[1]
    mean_T, var_T = y_moments(sde, sde.t_max)
    x_T = mu + mean_T + math.sqrt(var_T) * make_mu(EM_SHAPE, 6)
    model = Model(ExactNet(sde, predicts), sde, predicts=predicts)
    times = grid(sde, 100)
    y = sample(model, EulerMaruyama(), x_T=x_T, grid=times, cond={"mu": mu}, seed=3, final_denoise=False) - mu
    m_hat, v_hat = y.mean().item(), y.var().item()
    m_em, v_em = em_moments(sde, times, mean_T, var_T)
    se_m, se_v = math.sqrt(v_em / n), v_em * math.sqrt(2.0 / n)
    assert abs(m_hat - m_em) < 5 * se_m, (m_hat, m_em)
    assert abs(v_hat - v_em) < 5 * se_v, (v_hat, v_em)
    _, v_bad = em_moments(sde, times, mean_T, var_T, noise_scale=1.02)
    assert abs(v_hat - v_bad) > 10 * se_v
    # the data distribution is recovered up to EM's first-order bias at 100 steps
    mean_0, var_0 = y_moments(sde, sde.t_min)
    assert abs(m_hat - mean_0) < 0.02 and abs(v_hat / var_0 - 1) < 0.03, (m_hat, mean_0, v_hat, var_0)


def test_sampling_from_the_prior_starts_at_mu_plus_lam_z():
    """shape= draws x_T = mu + lam z: the EM chain from N(0, lam^2) in y explains the moments."""
    sde = MeanRevertingSDE("linear", lam=LAM)
    mu = make_mu(EM_SHAPE, 7)
    n = EM_SHAPE[0] * EM_SHAPE[1]
    model = Model(ExactNet(sde), sde, predicts="x0")
    times = grid(sde, 50)
    y = sample(model, EulerMaruyama(), shape=EM_SHAPE, grid=times, cond={"mu": mu}, seed=4, final_denoise=False) - mu
    m_em, v_em = em_moments(sde, times, 0.0, LAM**2)
    assert abs(y.mean().item() - m_em) < 5 * math.sqrt(v_em / n)
    assert abs(y.var().item() - v_em) < 5 * v_em * math.sqrt(2.0 / n)


ODE_SOLVERS = {"Heun": (Heun(), 80), "DPM++3M": (DPMSolver(3), 40), "DPM2-noise": (DPMSolver(2, "eps"), 120),
               "ERSDE-ode-3": (ERSDE(3, "ode"), 80), "AdaptiveODE": (AdaptiveODE(rtol=1e-8, atol=1e-8), None)}


@pytest.mark.parametrize("name", list(ODE_SOLVERS))
def test_ode_solvers_follow_the_exact_flow(name):
    """Probability-flow solvers map samples of the marginal at T onto the exact flow's images, so the
    data moments come out; the state is shifted by mu on the way in and out."""
    solver, steps = ODE_SOLVERS[name]
    sde = MeanRevertingSDE("cosine", lam=LAM)
    shape = (4000, 50)
    mu = make_mu(shape, 8)
    mean_T, var_T = y_moments(sde, sde.t_max)
    y_T = mean_T + math.sqrt(var_T) * make_mu(shape, 9)
    reference = gaussian_flow(sde, M, S, y_T, sde.t_max, sde.t_min)
    predicts = {"DPM2-noise": "eps", "Heun": "score"}.get(name, "x0")
    model = Model(ExactNet(sde, predicts), sde, predicts=predicts)
    kw = {} if steps is None else {"grid": grid(sde, steps, "log_snr")}
    y = sample(model, solver, x_T=y_T + mu, cond={"mu": mu}, final_denoise=False, **kw) - mu
    assert (y - reference).pow(2).mean().sqrt().item() < 1e-3, (y - reference).pow(2).mean().sqrt().item()
    mean_0, var_0 = y_moments(sde, sde.t_min)
    n = shape[0] * shape[1]
    assert abs(y.mean().item() - mean_0) < 5 * math.sqrt(var_0 / n) + 2e-3
    assert abs(y.var().item() / var_0 - 1) < 5 * math.sqrt(2 / n) + 5e-3


def optimal_reverse_recurrence(sde, times, mean, var, variance="posterior"):
    """Exact moments of the chain y_s = A y_t + B y0_hat(y_t) + C z with IR-SDE's formulas written in
    thetabar (7.3): A = (1 - e^{-2 tb_s})/(1 - e^{-2 tb_t}) e^{-(tb_t - tb_s)},
    B = (1 - e^{-2 (tb_t - tb_s)})/(1 - e^{-2 tb_t}) e^{-tb_s}, C^2 = lam^2 (1 - e^{-2(tb_t - tb_s)}) (1 - e^{-2 tb_s})/(1 - e^{-2 tb_t});
    y0_hat = c1 + c2 y the exact posterior mean for y0 ~ N(M, S^2)."""
    lam2 = sde.lam**2
    for k in range(len(times) - 1):
        tb_t, tb_s = (float(sde.theta_bar(times[k + j])) for j in (0, 1))
        d = tb_t - tb_s
        den = 1 - math.exp(-2 * tb_t)
        A = (1 - math.exp(-2 * tb_s)) / den * math.exp(-d)
        B = (1 - math.exp(-2 * d)) / den * math.exp(-tb_s)
        C2 = lam2 * (1 - math.exp(-2 * d)) * ((1 - math.exp(-2 * tb_s)) / den if variance == "posterior" else 1.0)
        a, v_t = math.exp(-tb_t), lam2 * den
        c2 = a * S * S / (a * a * S * S + v_t)
        c1 = v_t * M / (a * a * S * S + v_t)
        mean, var = (A + B * c2) * mean + B * c1, (A + B * c2) ** 2 * var + C2
    return mean, var


def test_optimal_reverse_recovers_the_data_moments():
    sde = MeanRevertingSDE("cosine", lam=LAM)
    mu = make_mu(EM_SHAPE, 10)
    n = EM_SHAPE[0] * EM_SHAPE[1]
    mean_T, var_T = y_moments(sde, sde.t_max)
    x_T = mu + mean_T + math.sqrt(var_T) * make_mu(EM_SHAPE, 11)
    times = grid(sde, 200)
    y = sample(Model(ExactNet(sde), sde, predicts="x0"), OptimalReverse(), x_T=x_T, grid=times, cond={"mu": mu},
               seed=5, final_denoise=False) - mu
    m_hat, v_hat = y.mean().item(), y.var().item()
    m_ex, v_ex = optimal_reverse_recurrence(sde, times, mean_T, var_T)
    se_m, se_v = math.sqrt(v_ex / n), v_ex * math.sqrt(2.0 / n)
    assert abs(m_hat - m_ex) < 5 * se_m, (m_hat, m_ex)
    assert abs(v_hat - v_ex) < 5 * se_v, (v_hat, v_ex)
    _, v_bad = optimal_reverse_recurrence(sde, times, mean_T, var_T, variance="forward")
    assert abs(v_hat - v_bad) > 10 * se_v
    # the posterior-variance step is first order in the variance: ~4% low at 200 steps here (13% at 50)
    mean_0, var_0 = y_moments(sde, sde.t_min)
    assert abs(m_hat - mean_0) < 0.01 and abs(v_hat / var_0 - 1) < 0.05, (m_hat, mean_0, v_hat, var_0)


@pytest.mark.parametrize("schedule", THETA_SCHEDULES)
def test_optimal_reverse_variance_error_is_first_order(schedule):
    """The exact moment recurrence of the posterior step (checked against sampling above): its
    variance error falls with slope 1 and the mean error is negligible."""
    sde = MeanRevertingSDE(schedule, lam=LAM)
    mean_T, var_T = y_moments(sde, sde.t_max)
    mean_0, var_0 = y_moments(sde, sde.t_min)
    steps = [100, 200, 400, 800]
    # log-SNR grids: on uniform-t grids the constant schedule's sqrt(t) noise near t = 0 keeps the
    # error preasymptotic (slope 0.8 over 100-800 steps)
    moments = [optimal_reverse_recurrence(sde, grid(sde, n, "log_snr"), mean_T, var_T) for n in steps]
    assert all(abs(m - mean_0) < 1e-8 for m, _ in moments), moments
    errors = [abs(v / var_0 - 1) for _, v in moments]
    assert abs(fitted_order(steps, errors) - 1.0) <= 0.15, errors


def test_optimal_reverse_is_exact_for_a_point_mass():
    """With x0 a point mass the posterior step with the true x0 is the exact reverse transition: the
    marginals N(mu + (c - mu) alpha, sigma^2) are reproduced at any number of steps."""
    sde = MeanRevertingSDE("cosine", lam=LAM)
    mu = make_mu(EM_SHAPE, 12)
    c = mu + 0.8

    def point_mass(x, t, mu):
        return c

    n = EM_SHAPE[0] * EM_SHAPE[1]
    mean, std = sde.marginal(c, torch.tensor(sde.t_max, dtype=F64), mu)
    x_T = mean + std * make_mu(EM_SHAPE, 13)
    for steps in (3, 10):
        x = sample(Model(point_mass, sde, predicts="x0"), OptimalReverse(), x_T=x_T, steps=steps, cond={"mu": mu},
                   seed=steps, final_denoise=False)
        mean_0, std_0 = sde.marginal(c, torch.tensor(sde.t_min, dtype=F64), mu)
        z = (x - mean_0) / std_0
        assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)


def test_noise_free_step_is_the_maximum_likelihood_state():
    """OptimalReverse(noise=False) iterates IR-SDE's x*_{s} (sde.optimal_reverse_state, thetabar form);
    with the true x0 and s = 0 that state is x0 itself."""
    sde = MeanRevertingSDE("linear", lam=LAM)
    mu, x_T = make_mu((8, 3), 14), make_mu((8, 3), 15)
    net = ExactNet(sde)
    times = grid(sde, 12)
    x = sample(Model(net, sde, predicts="x0"), OptimalReverse(noise=False), x_T=x_T, grid=times, cond={"mu": mu},
               final_denoise=False)
    expected = x_T.clone()
    for k in range(12):
        t = times[k].expand(8)
        expected = sde.optimal_reverse_state(expected, net(expected, t, mu), t, times[k + 1].expand(8), mu)
    assert torch.allclose(x, expected, rtol=1e-12, atol=1e-12)
    x0 = make_mu((8, 3), 16)
    assert torch.allclose(sde.optimal_reverse_state(x_T, x0, torch.full((8,), 0.5, dtype=F64),
                                                    torch.zeros(8, dtype=F64), mu), x0, atol=1e-15)


def test_optimal_reverse_is_posterior_ancestral_sampling():
    sde = MeanRevertingSDE("cosine", lam=LAM)
    mu, x_T = make_mu((6, 4), 17), make_mu((6, 4), 18)
    model = Model(ExactNet(sde), sde, predicts="x0")
    kw = dict(x_T=x_T, steps=15, cond={"mu": mu}, seed=9)
    assert torch.equal(sample(model, OptimalReverse(), **kw), sample(model, AncestralSampling("posterior"), **kw))
    assert OptimalReverse().stochastic and not OptimalReverse(noise=False).stochastic
    assert repr(OptimalReverse(noise=False)) == "OptimalReverse(noise=False)"


# -- convergence orders of the exponential integrators ---------------------------------------------------

ORDER_SOLVERS = [
    ("DPM++1", lambda: DPMSolver(1), 1, [20, 40, 80, 160]),
    ("DPM++2M", lambda: DPMSolver(2), 2, [20, 40, 80, 160]),
    ("DPM++3M", lambda: DPMSolver(3), 3, [16, 32, 64, 128]),
    ("DPM2M-noise", lambda: DPMSolver(2, "eps"), 2, [20, 40, 80, 160]),
    ("DPM3M-noise", lambda: DPMSolver(3, "eps"), 3, [16, 32, 64, 128]),
    ("ERSDE-1", lambda: ERSDE(1, "ode"), 1, [20, 40, 80, 160]),
    ("ERSDE-2", lambda: ERSDE(2, "ode"), 2, [20, 40, 80, 160]),
    ("ERSDE-3", lambda: ERSDE(3, "ode"), 3, [16, 32, 64, 128]),
]


@pytest.mark.parametrize("schedule", THETA_SCHEDULES)
@pytest.mark.parametrize("name, make, order, steps", ORDER_SOLVERS, ids=[c[0] for c in ORDER_SOLVERS])
def test_exponential_integrator_orders(schedule, name, make, order, steps):
    sde = MeanRevertingSDE(schedule, lam=LAM)
    mu = make_mu((16, 2), 19)
    y_T = LAM * make_mu((16, 2), 20)
    reference = gaussian_flow(sde, M, S, y_T, sde.t_max, sde.t_min)
    predicts = "eps" if "noise" in name else "x0"
    model = Model(ExactNet(sde, predicts), sde, predicts=predicts)
    errors = [(sample(model, make(), x_T=y_T + mu, grid=grid(sde, n, "log_snr"), cond={"mu": mu},
                      final_denoise=False) - mu - reference).pow(2).mean().sqrt().item() for n in steps]
    slope = fitted_order(steps, errors)
    assert errors[-1] > 1e-11, errors
    if name.startswith("DPM") and order == 3:
        # superconvergent on Gaussian data, as on the other SDEs (see tests/test_dpm.py)
        assert order - 0.2 <= slope <= 4.6, (slope, errors)
    else:
        assert abs(slope - order) <= 0.2, (slope, errors)


# -- the driver's shift -----------------------------------------------------------------------------------


def test_network_sees_x_and_mu_and_results_are_in_x():
    sde = MeanRevertingSDE("cosine", lam=LAM)
    mu = make_mu((5, 3), 21)
    seen = []

    def net(x, t, mu):
        seen.append(x.clone())
        return torch.zeros_like(x)  # eps = 0: the ODE contracts y towards 0, x towards mu

    steps_seen = []
    x_T = mu + LAM * make_mu((5, 3), 22)
    x_T_before, mu_before = x_T.clone(), mu.clone()
    x = sample(Model(net, sde, predicts="eps"), Euler(), x_T=x_T, steps=4, cond={"mu": mu}, final_denoise=False,
               callback=steps_seen.append)
    # the run shifts its own copy: the caller's x_T and mu are untouched (same dtype and device: no cast copies)
    assert torch.equal(x_T, x_T_before) and torch.equal(mu, mu_before)
    assert torch.allclose(seen[0], x_T)  # the first call sees x_T itself, not x_T - mu
    # eps = 0 on the ODE: dy/dt = alpha'/alpha y exactly, Euler: y *= 1 + dt f
    times = grid(sde, 4)
    y = x_T - mu
    for k in range(4):
        y = y * (1 + (times[k + 1] - times[k]) * sde.f(times[k]))
    assert torch.allclose(x, y + mu)
    assert torch.allclose(steps_seen[-1].x, x)
    assert torch.allclose(steps_seen[0].x, seen[1])
    # the final x0 estimate is in x too: eps = 0 gives x0 = mu + y / alpha
    x_final = sample(Model(net, sde, predicts="eps"), Euler(), x_T=x_T, steps=4, cond={"mu": mu})
    assert torch.allclose(x_final, mu + y / sde.alpha(times[-1]))


def test_batch_invariance_with_per_sample_mu():
    sde = MeanRevertingSDE("cosine", lam=LAM)
    mu = make_mu((6, 2, 3), 23)
    model = Model(ExactNet(sde), sde, predicts="x0")
    full = sample(model, EulerMaruyama(), shape=(6, 2, 3), steps=10, cond={"mu": mu}, seed=1)
    part = sample(model, EulerMaruyama(), shape=(2, 2, 3), steps=10, cond={"mu": mu[3:5]}, seed=1,
                  sample_index=torch.tensor([3, 4]))
    assert torch.allclose(full[3:5], part, rtol=1e-12, atol=1e-12)
    shared = sample(model, EulerMaruyama(), shape=(6, 2, 3), steps=10, cond={"mu": mu[0]}, seed=1)  # broadcast mu
    assert shared.shape == (6, 2, 3) and torch.allclose(shared[0], full[0])
    x_T = mu + LAM * make_mu((6, 2, 3), 24)
    f32 = sample(model, DPMSolver(2), x_T=x_T.float(), steps=10, cond={"mu": mu})
    f64 = sample(model, DPMSolver(2), x_T=x_T, steps=10, cond={"mu": mu})
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), f64, atol=1e-4)


def test_adaptive_solver_with_a_shared_mu_whose_first_dimension_equals_the_batch():
    """A mu shaped like one sample, (3, 5) for states (3, 3, 5), is shared, not taken for per-sample rows
    when the adaptive solver calls the network on a subset of the batch."""
    sde = MeanRevertingSDE("cosine", lam=LAM)
    mu = make_mu((3, 5), 25)
    model = Model(ExactNet(sde), sde, predicts="x0")
    y_T = LAM * make_mu((3, 3, 5), 26) * torch.tensor([0.1, 1.0, 10.0], dtype=F64)[:, None, None]  # unequal steps
    kw = dict(x_T=y_T + mu, final_denoise=False, return_info=True)
    shared, info = sample(model, AdaptiveODE(rtol=1e-7, atol=1e-7), cond={"mu": mu}, **kw)
    assert len(set(info.nfe_per_sample.tolist())) > 1  # the network saw subsets of the batch
    expanded, _ = sample(model, AdaptiveODE(rtol=1e-7, atol=1e-7), cond={"mu": mu.expand(3, 3, 5)}, **kw)
    torch.testing.assert_close(shared, expanded, rtol=0, atol=0)


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"theta_schedule": "cos"}, "theta_schedule"),
    ({"lam": 0.0}, "lam"),
    ({"lam": float("nan")}, "lam"),
    ({"T": -1.0}, "T must"),
    ({"eps": 1.0}, "eps"),
    ({"eps": 0.0}, "eps"),
    ({"t_min": 0.0}, "t_min"),
    ({"t_min": 2.0}, "t_min"),
    ({"s": 1.0}, "s "),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeanRevertingSDE(**kwargs)


def test_bad_mean_state():
    sde = MeanRevertingSDE(lam=LAM)
    model = Model(ExactNet(sde), sde, predicts="x0")
    with pytest.raises(ValueError, match="cond=.*'mu'"):
        sample(model, Euler(), shape=(2, 3), steps=2)
    with pytest.raises(ValueError, match="shape"):
        sample(model, Euler(), shape=(2, 3), steps=2, cond={"mu": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="NaN"):
        sample(model, Euler(), shape=(2, 3), steps=2, cond={"mu": torch.full((2, 3), float("nan"))})
    with pytest.raises(TypeError, match="floating"):
        sample(model, Euler(), shape=(2, 3), steps=2, cond={"mu": torch.zeros(2, 3, dtype=torch.long)})
    for predicts in ("v", "velocity"):
        with pytest.raises(ValueError, match="not supported"):
            Model(ExactNet(sde), sde, predicts=predicts)
    with pytest.raises(TypeError, match="OptimalReverse: noise must be True or False"):
        OptimalReverse(noise=1)
    x = make_mu((2, 3), 27)
    for t, s in ((0.3, 0.5), (0.0, 0.0), (float("nan"), 0.1), (0.5, -0.1)):  # s > t, t = 0 (0/0), NaN, s < 0
        with pytest.raises(ValueError, match="0 <= s <= t with t > 0"):
            sde.optimal_reverse_state(x, x, torch.full((2,), t, dtype=F64), torch.full((2,), s, dtype=F64), mu=x)


# -- the example ---------------------------------------------------------------------------------------------


def test_restoration_example_runs():
    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "restoration.py"), "--quick"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PSNR" in result.stdout
