"""Measured convergence orders (float64).

ODE solvers: pathwise error at t_min against the exact probability-flow map (Gaussian data: an
affine map in closed form) or a tight DOP853 reference (Gaussian mixture), from the same x_T;
the order is the least-squares slope of log error against log N and must be within 0.15 of
theory (Euler 1, Heun 2).

Euler-Maruyama: weak order 1 on Gaussian data, from the error of the sample mean and variance
against the exact marginal N(alpha mu, alpha^2 s^2 + sigma^2) at t_min.  The reverse SDE is
linear for Gaussian data, so the EM chain's exact moments follow a scalar recurrence; the Monte
Carlo moments must match that recurrence to within 5 standard errors at every N (sharp: a 2%
wrong noise scale is ~30 standard errors off) and the bias must dominate the Monte Carlo error.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    EM_MU,
    EM_S,
    F64,
    MIXTURE,
    GaussianX0Net,
    em_moments,
    fitted_order,
    gaussian_flow,
    gaussian_marginal,
    make_sde,
    mixture_problem,
    rms,
)

from samplers import Model, grid, sample
from samplers.problems import probability_flow_rhs, reference_solution
from solvers import Euler, EulerMaruyama, Heun

MU, S = 0.7, 0.5
TOL = 0.15

# (sde, grid kind, step counts) per solver: ranges in the asymptotic regime.  VE/EDM span
# sigma over 3.7-4.6 decades and need grids that are uniform in log sigma (log_snr / karras).
ODE_CASES = [
    ("VP", "uniform", "Euler", [32, 64, 128, 256]),
    ("VP", "uniform", "Heun", [32, 64, 128, 256]),
    ("VE", "log_snr", "Euler", [64, 128, 256, 512]),
    ("VE", "log_snr", "Heun", [32, 64, 128, 256]),
    ("EDM", "karras", "Euler", [32, 64, 128, 256]),
    ("EDM", "karras", "Heun", [32, 64, 128, 256]),
    ("EDM", "log_snr", "Heun", [32, 64, 128, 256]),
    ("SubVP", "uniform", "Heun", [32, 64, 128, 256]),
    ("CosineVP", "log_snr", "Heun", [32, 64, 128, 256]),
    ("RectifiedFlow", "uniform", "Euler", [32, 64, 128, 256]),
    ("RectifiedFlow", "uniform", "Heun", [32, 64, 128, 256]),
]

THEORY = {"Euler": 1.0, "Heun": 2.0}
SOLVERS = {"Euler": Euler, "Heun": Heun}


def measure(model, solver_name, x_T, reference, sde, kind, steps):
    errors = []
    for n in steps:
        x = sample(model, SOLVERS[solver_name](), x_T=x_T, grid=grid(sde, n, kind), final_denoise=False,
                   dtype=F64)
        errors.append(rms(x, reference))
    return fitted_order(steps, errors), errors


@pytest.mark.parametrize("sde_name, kind, solver_name, steps", ODE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in ODE_CASES])
def test_ode_order_gaussian_data(sde_name, kind, solver_name, steps):
    sde = make_sde(sde_name)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sde.prior_std
    reference = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    order, errors = measure(model, solver_name, x_T, reference, sde, kind, steps)
    assert abs(order - THEORY[solver_name]) <= TOL, (order, errors)
    assert errors[-1] < 0.25 * errors[0]


MIXTURE_CASES = [
    ("VP", "uniform", "Euler", [64, 128, 256, 512]),
    ("VP", "uniform", "Heun", [32, 64, 128, 256]),
    ("VE", "log_snr", "Euler", [64, 128, 256, 512]),
    ("VE", "log_snr", "Heun", [32, 64, 128, 256]),
    ("EDM", "karras", "Euler", [64, 128, 256, 512]),
    ("EDM", "karras", "Heun", [32, 64, 128, 256]),
]


@pytest.mark.parametrize("sde_name, kind, solver_name, steps", MIXTURE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in MIXTURE_CASES])
def test_ode_order_mixture_data(sde_name, kind, solver_name, steps):
    sde, x_T, reference = mixture_problem(sde_name)
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    order, errors = measure(model, solver_name, x_T, reference, sde, kind, steps)
    assert abs(order - THEORY[solver_name]) <= TOL, (order, errors)


def test_reference_flow_is_tight():
    """The closed-form Gaussian flow agrees with the DOP853 reference (so it is a valid reference)."""
    from samplers.problems import gaussian

    for name in ("VP", "VE", "EDM"):
        sde = make_sde(name)
        x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64) * sde.prior_std
        exact = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
        ode = reference_solution(probability_flow_rhs(gaussian(MU, S, 2), sde), x_T, sde.t_max, sde.t_min,
                                 rtol=1e-12, atol=1e-12)
        assert torch.allclose(exact, ode, atol=1e-8), name


# -- Euler-Maruyama: weak order 1 -----------------------------------------------------------------------------------------

EM_SHAPE = (2000, 1000)  # 2e6 iid scalar samples (the dynamics are elementwise)


@pytest.mark.parametrize("sde_name, kind, steps", [("VP", "uniform", [16, 32, 64, 128]),
                                                   ("EDM", "karras", [32, 64, 128, 256])])
def test_euler_maruyama_weak_order(sde_name, kind, steps):
    sde = make_sde(sde_name)
    n = EM_SHAPE[0] * EM_SHAPE[1]
    mean_T, var_T = gaussian_marginal(sde, EM_MU, EM_S, sde.t_max)
    mean_0, var_0 = gaussian_marginal(sde, EM_MU, EM_S, sde.t_min)
    # start from the exact marginal at t_max: then the only error is the discretisation
    x_T = mean_T + math.sqrt(var_T) * torch.randn(EM_SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    model = Model(GaussianX0Net(sde, EM_MU, EM_S), sde, predicts="x0")
    mc_errors, exact_errors = [], []
    for n_steps in steps:
        times = grid(sde, n_steps, kind)
        x = sample(model, EulerMaruyama(), x_T=x_T, grid=times, seed=0, final_denoise=False)
        m_hat, v_hat = x.mean().item(), x.var().item()
        m_em, v_em = em_moments(sde, times, mean_T, var_T)
        se_m, se_v = math.sqrt(v_em / n), v_em * math.sqrt(2.0 / n)
        # the sampler's moments are those of the EM chain (sharp: Monte Carlo error only)
        assert abs(m_hat - m_em) < 5 * se_m, (n_steps, m_hat, m_em, se_m)
        assert abs(v_hat - v_em) < 5 * se_v, (n_steps, v_hat, v_em, se_v)
        # and a wrong coefficient would be detected: noise scale off by 2%, or the drift's
        # (1 + eta^2)/2 = 1 score factor replaced by the ODE's 1/2
        _, v_bad = em_moments(sde, times, mean_T, var_T, noise_scale=1.02)
        assert abs(v_hat - v_bad) > 15 * se_v
        _, v_bad = em_moments(sde, times, mean_T, var_T, score_factor=0.5)
        assert abs(v_hat - v_bad) > 15 * se_v
        err = abs(m_hat - mean_0) + abs(v_hat - var_0)
        assert err > 8 * (se_m + se_v)  # the bias dominates the Monte Carlo error
        mc_errors.append(err)
        exact_errors.append(abs(m_em - mean_0) + abs(v_em - var_0))
    mc_order = fitted_order(steps, mc_errors)
    assert abs(mc_order - 1.0) <= 0.25, (mc_order, mc_errors)
    assert abs(fitted_order(steps, exact_errors) - 1.0) <= 0.15, exact_errors


@pytest.mark.parametrize("eta", [0.5, 0.0])
def test_euler_maruyama_eta_family_moments(eta):
    """EulerMaruyama(eta): drift f x - (1 + eta^2)/2 g^2 score, noise eta g: moments match the chain."""
    sde = make_sde("VP")
    n = 500 * 1000
    mean_T, var_T = gaussian_marginal(sde, EM_MU, EM_S, sde.t_max)
    x_T = mean_T + math.sqrt(var_T) * torch.randn(500, 1000, generator=torch.Generator().manual_seed(1), dtype=F64)
    model = Model(GaussianX0Net(sde, EM_MU, EM_S), sde, predicts="x0")
    times = grid(sde, 24)
    x = sample(model, EulerMaruyama(eta=eta), x_T=x_T, grid=times, seed=7, final_denoise=False)
    m_em, v_em = em_moments(sde, times, mean_T, var_T, eta=eta)
    se_m, se_v = math.sqrt(v_em / n), v_em * math.sqrt(2.0 / n)
    # the initial condition's sample moments enter too; with eta = 0 they are all the noise
    assert abs(x.mean().item() - m_em) < 5 * se_m
    assert abs(x.var().item() - v_em) < 5 * se_v
    for wrong in (0.0, 1.0) if eta == 0.5 else (0.5,):
        _, v_bad = em_moments(sde, times, mean_T, var_T, eta=wrong)
        assert abs(x.var().item() - v_bad) > 15 * se_v
