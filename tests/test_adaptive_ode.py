"""AdaptiveODE: embedded Runge-Kutta pairs with per-sample error control (float64 unless stated).

The tableaux are checked on their own (fixed steps on a smooth nonlinear ODE with a known
solution: global order, and the order of the embedded error estimate); the solver against the
exact probability-flow map (Gaussian data) and a tight DOP853 reference (the Gaussian mixture of
conftest.MIXTURE), through samplers.sample.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import (
    F64,
    MIXTURE,
    GaussianNet,
    GaussianX0Net,
    fitted_order,
    gaussian_flow,
    make_sde,
    mixture_problem,
    rms,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import Model, NonFiniteError, sample
from solvers.adaptive import StepSizeError
from solvers.adaptive_ode import TABLEAUX, AdaptiveODE

MU, S = 0.7, 0.5
METHODS = list(TABLEAUX)


def run(model, solver, x_T, **kw):
    return sample(model, solver, x_T=x_T, final_denoise=False, dtype=x_T.dtype, return_info=True, **kw)


# -- the tableaux ----------------------------------------------------------------------------------------------------

def _rhs(t, y):
    """y1' = -2 t y1^2, y2' = 3 cos(t) (1 + t^2) y1 y2: nonlinear, non-autonomous, with the solution
    y1 = 1/(1 + t^2), y2 = exp(3 sin t) from y(0) = (1, 1)."""
    return torch.stack([-2 * t * y[:, 0] ** 2, 3 * torch.cos(t) * (1 + t * t) * y[:, 0] * y[:, 1]], dim=1)


def _exact(t):
    return torch.tensor([[1 / (1 + t * t), math.exp(3 * math.sin(t))]], dtype=F64)


def _fixed_steps(tab, n, t_end=3.0):
    h = t_end / n
    y = torch.ones(1, 2, dtype=F64)
    for i in range(n):
        t0 = i * h
        y, _, _ = tab.step(lambda u, j: _rhs(torch.tensor(t0 + tab.c[j] * h, dtype=F64), u), y,
                           torch.tensor([h], dtype=F64))
    return y


@pytest.mark.parametrize("method", METHODS)
def test_tableau_is_consistent(method):
    tab = TABLEAUX[method]
    for j, row in enumerate(tab.a, start=1):  # row sums are the nodes
        assert math.isclose(sum(row), tab.c[j], abs_tol=1e-15), (j, row)
    assert math.isclose(sum(tab.b), 1.0, abs_tol=1e-15) and math.isclose(sum(tab.b_low), 1.0, abs_tol=1e-15)
    assert tab.fsal == (method in ("dopri5", "bosh3"))
    solver = AdaptiveODE(method)
    assert solver.convergence_order == tab.order and solver.nfe_per_step == tab.calls_per_step
    assert solver.nfe_per_step == {"dopri5": 6, "bosh3": 3, "fehlberg2": 3}[method]


@pytest.mark.parametrize("method", METHODS)
def test_tableau_order(method):
    """Global error of fixed steps falls like h^order; the embedded estimate |y_high - y_low| of
    one step falls like h^(order_low + 1) (within 0.2 of theory)."""
    tab = TABLEAUX[method]
    steps = {"dopri5": [32, 64, 128, 256], "bosh3": [32, 64, 128, 256], "fehlberg2": [128, 256, 512, 1024]}[method]
    errors = [((_fixed_steps(tab, n) - _exact(3.0)) / _exact(3.0)).abs().max().item() for n in steps]
    assert abs(fitted_order(steps, errors) - tab.order) <= 0.2, errors
    t0, y0 = 0.3, _exact(0.3)
    hs = [0.1, 0.05, 0.025, 0.0125]
    estimates = []
    for h in hs:
        y_high, y_low, _ = tab.step(lambda u, j: _rhs(torch.tensor(t0 + tab.c[j] * h, dtype=F64), u), y0,
                                    torch.tensor([h], dtype=F64))
        estimates.append((y_high - y_low).abs().max().item())
    assert abs(fitted_order([1 / h for h in hs], estimates) - (tab.order_low + 1)) <= 0.2, estimates


# -- accuracy against the tolerance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sde_name", ["VP", "VE", "EDM"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_error_follows_the_tolerance(sde_name, method):
    """Tightening rtol = atol by 100x lowers the error against the exact flow by at least 20x; the
    error stays within a small multiple of the tolerance (times the state's scale where that is
    above 1); the work per sample grows."""
    sde, x_T, reference = mixture_problem(sde_name)
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    errors, nfes = [], []
    for tol in (1e-4, 1e-6):
        x, info = run(model, AdaptiveODE(method, rtol=tol, atol=tol), x_T)
        errors.append(rms(x, reference))
        nfes.append(info.nfe_per_sample.double().mean().item())
        assert errors[-1] < 10 * tol, (tol, errors)
    assert errors[1] < errors[0] / 20, errors
    assert nfes[1] > 1.3 * nfes[0], nfes


@pytest.mark.parametrize("variable", ["t", "lambda"])
def test_other_variables_and_fehlberg2_follow_the_tolerance(variable):
    sde, x_T, reference = mixture_problem("VP")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    errors = [rms(run(model, AdaptiveODE("dopri5", rtol=tol, atol=tol, variable=variable), x_T)[0], reference)
              for tol in (1e-4, 1e-7)]
    assert errors[1] < errors[0] / 50 and errors[1] < 1e-6, errors
    # the (1, 2) pair's error estimate is first order: the global error lags the tolerance, but falls
    errors = [rms(run(model, AdaptiveODE("fehlberg2", rtol=tol, atol=tol, variable=variable), x_T)[0], reference)
              for tol in (1e-4, 1e-6)]
    assert errors[1] < errors[0] / 10 and errors[1] < 1e-4, errors


def test_angle_variable_is_cheaper_than_t_on_edm():
    """The default variable (phi = atan(sigma/alpha)) needs fewer calls than t for the same accuracy
    on EDM, where sigma = t spans 4.6 decades."""
    sde, x_T, reference = mixture_problem("EDM")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    cost = {}
    for variable in ("angle", "t"):
        x, info = run(model, AdaptiveODE(rtol=1e-5, atol=1e-5, variable=variable), x_T)
        assert rms(x, reference) < 1e-4
        cost[variable] = info.nfe_per_sample.sum().item()
    assert cost["angle"] < 0.5 * cost["t"], cost


def test_agrees_with_torchdiffeq():
    """With variable='t' the problem is torchdiffeq's: both dopri5 solutions (ours per sample, theirs
    with one step size for the whole batch) lie within the tolerance's reach of the reference.
    (step_t: torchdiffeq steps past the end and interpolates, but the velocity is not defined below t = 0.)"""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    sde, x_T, reference = mixture_problem("VP")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    velocity = MIXTURE.net(sde, "velocity")
    ours, _ = run(model, AdaptiveODE("dopri5", rtol=1e-6, atol=1e-6, variable="t"), x_T)
    theirs = torchdiffeq.odeint(lambda t, x: velocity(x, t.expand(x.shape[0])), x_T,
                                torch.tensor([sde.t_max, sde.t_min], dtype=F64), method="dopri5",
                                rtol=1e-6, atol=1e-6, options={"step_t": torch.tensor([sde.t_min], dtype=F64)})[-1]
    assert rms(ours, reference) < 1e-5 and rms(theirs, reference) < 1e-5
    assert rms(ours, theirs) < 1e-5


# -- per-sample steps --------------------------------------------------------------------------------------------------

def _scaled_net(sde):
    """Gaussian data N(MU, s_i^2) with a per-sample s (cond), exact denoiser."""

    def net(x, t, s):
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            out[i:i + 1] = GaussianX0Net(sde, MU, float(s[i]))(x[i:i + 1], t[i:i + 1])
        return out

    return net


def test_harder_samples_take_more_steps():
    """Sharp data (small s) needs more steps than broad data; the broad samples stop costing calls
    once they are done, and every sample matches its exact flow."""
    sde = make_sde("EDM")
    s = torch.tensor([0.5] * 4 + [0.01] * 4, dtype=F64)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sde.prior_std
    model = Model(_scaled_net(sde), sde, predicts="x0")
    x, info = run(model, AdaptiveODE(rtol=1e-6, atol=1e-6), x_T, cond={"s": s})
    nfe = info.nfe_per_sample
    assert nfe[:4].max() < nfe[4:].min(), nfe
    assert info.nfe == nfe.max()  # one batched call per round of the slowest sample
    for i in range(8):
        exact = gaussian_flow(sde, MU, float(s[i]), x_T[i], sde.t_max, sde.t_min)
        assert torch.allclose(x[i], exact, atol=1e-4 * max(1.0, exact.abs().max().item())), (i, x[i], exact)


@functools.cache
def _batch_of_64():
    sde = make_sde("VP")
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(7), dtype=F64) * sde.prior_std
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    solver = AdaptiveODE("dopri5", rtol=1e-4, atol=1e-4)
    x, info = run(model, solver, x_T)
    return model, solver, x_T, x, info


def test_per_sample_counts_spread():
    _, _, _, _, info = _batch_of_64()
    nfe = info.nfe_per_sample
    assert nfe.max() >= nfe.min() + 12, nfe  # two dopri5 attempts or more between the extremes
    assert info.nfe < nfe.sum()
    assert nfe.max() <= info.nfe <= nfe.max() + 2  # the slowest sample's calls (+ stale-k1 rounds)
    assert info.steps == int(info.accepted_per_sample.max())


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=63))
def test_batch_invariance(b):
    """Sample b gives the same result and the same counts alone and in the batch of 64."""
    model, solver, x_T, together, info = _batch_of_64()
    alone, info_b = run(model, solver, x_T[b:b + 1])
    assert torch.allclose(alone, together[b:b + 1], rtol=1e-13, atol=1e-13)
    assert info_b.nfe_per_sample.item() == info.nfe_per_sample[b].item()
    assert info_b.accepted_per_sample.item() == info.accepted_per_sample[b].item()
    assert info_b.rejected_per_sample.item() == info.rejected_per_sample[b].item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("h_init", [None, 0.05])
def test_every_call_is_counted(method, h_init):
    """NFE = calls actually made; per sample: FSAL pairs reuse the last stage (and a rejected step
    its first), so calls = 1 + (stages - 1) attempts; Fehlberg 2(1) re-evaluates the first stage
    after each accepted step; Hairer's starting step costs one call; final denoising one."""
    sde = make_sde("VP")
    net = GaussianX0Net(sde, MU, S)
    rows = []
    counting = lambda x, t: (rows.append(x.shape[0]), net(x, t))[1]
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    tab = TABLEAUX[method]
    _, info = sample(Model(counting, sde, predicts="x0"), AdaptiveODE(method, rtol=1e-4, atol=1e-4, h_init=h_init),
                     x_T=x_T, dtype=F64, return_info=True)
    assert info.nfe == len(rows) and info.nfe_per_sample.sum().item() == sum(rows)
    acc, rej = info.accepted_per_sample, info.rejected_per_sample
    steps = 1 + (tab.stages - 1) * (acc + rej) if tab.fsal else acc + (tab.stages - 1) * (acc + rej)
    expected = steps + (h_init is None) + 1
    assert torch.equal(info.nfe_per_sample, expected), (info.nfe_per_sample, expected)


# -- never loops forever ---------------------------------------------------------------------------------------------

def _velocity_model(sde, field):
    """A 'velocity' network dx/dt = field(x, k) with a per-sample constant k (cond)."""
    return Model(lambda x, t, k: field(x, k.reshape(-1, *([1] * (x.dim() - 1)))), sde, predicts="velocity")


def test_max_steps_names_the_stiff_sample():
    sde = make_sde("VP")
    k = torch.tensor([1.0, 1.0, 1.0, 1e6, 1.0], dtype=F64)  # sample 3: decay rate 1e6 (stiff)
    model = _velocity_model(sde, lambda x, k: k * x)
    x_T = torch.ones(5, 2, dtype=F64)
    with pytest.raises(StepSizeError, match=r"^sample 3: no end after max_steps=200 attempted steps at t="):
        sample(model, AdaptiveODE(variable="t", max_steps=200), x_T=x_T, dtype=F64, cond={"k": k})
    x = sample(model, AdaptiveODE(variable="t"), x_T=x_T[:3], dtype=F64, cond={"k": k[:3]},
                     final_denoise=False)  # without it: fine
    assert torch.allclose(x, torch.full_like(x, math.exp(-(sde.t_max - sde.t_min))), rtol=1e-4)


@pytest.mark.parametrize("variable", ["t", "angle"])
def test_min_step_names_the_sample_that_blows_up(variable):
    """dx/dt = -k x^2 backwards from x = 1 at t = 1 reaches infinity at t = 1 - 1/k: the steps shrink
    until min_step (or until they no longer move the variable) and the error names sample 2."""
    sde = make_sde("VP")
    k = torch.tensor([0.0, 0.0, 4.0, 0.0], dtype=F64)
    model = _velocity_model(sde, lambda x, k: -k * x * x)
    with pytest.raises(StepSizeError, match=r"^sample 2: the step size .* (below min_step=1e-08|no longer changes)"):
        sample(model, AdaptiveODE(variable=variable, min_step=1e-8), x_T=torch.ones(4, 1, dtype=F64),
               dtype=F64, cond={"k": k})


def test_nan_names_the_sample():
    sde, x_T, _ = mixture_problem("VP")

    def poisoned(x, t):
        out = MIXTURE.net(sde, "x0")(x, t)
        out[2] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match="sample 2: at t=.* the network returned NaN or Inf for a finite input"):
        sample(Model(poisoned, sde, predicts="x0"), AdaptiveODE(h_init=0.1), x_T=x_T, dtype=F64)


# -- SDEs, dtypes, parametrisations ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde_name", ["VP", "VE", "EDM", "RectifiedFlow", "CosineVP"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("variable", ["angle", "lambda", "t"])
def test_gaussian_data_matches_the_exact_flow(sde_name, dtype, variable):
    """Every SDE (rectified flow from t = 1 where alpha = 0; VE/EDM up to sigma = 50/80), float32 and
    float64 states, each variable: the result is the exact flow to about the tolerance."""
    sde = make_sde(sde_name)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * sde.prior_std
    reference = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    # lambda at loose tolerances can accept large steps over the exponential transients at the
    # ends (measured: 0.08 error at rtol = 1e-4 on EDM); at 1e-5 it is within the tolerance
    tol = (1e-5 if variable == "lambda" else 1e-4) if dtype == torch.float32 else 1e-7
    x, _ = run(model, AdaptiveODE(rtol=tol, atol=tol, variable=variable), x_T.to(dtype))
    assert x.dtype == dtype and torch.isfinite(x).all()
    assert rms(x.double(), reference) < 20 * tol, rms(x.double(), reference)


@pytest.mark.parametrize("predicts", ["eps", "v", "score", "velocity"])
def test_any_prediction(predicts):
    sde = make_sde("VP")
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    reference = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
    model = Model(GaussianNet(sde, predicts, MU, S), sde, predicts=predicts)
    x, _ = run(model, AdaptiveODE(rtol=1e-7, atol=1e-7), x_T)
    assert rms(x, reference) < 1e-6


def test_eps_network_at_alpha_zero_is_refused():
    sde = make_sde("RectifiedFlow")
    model = Model(GaussianNet(sde, "eps", MU, S), sde, predicts="eps")
    with pytest.raises(ValueError, match=r"sample 0: the probability-flow ODE's coefficients are not finite at t=1"):
        sample(model, AdaptiveODE(), shape=(2, 2), dtype=F64)
    # below t = 1 it is fine
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    x, _ = run(model, AdaptiveODE(rtol=1e-7, atol=1e-7), x_T, grid=torch.tensor([0.99, 1e-3]))
    assert rms(x, gaussian_flow(sde, MU, S, x_T, 0.99, 1e-3)) < 1e-6


def test_interval_per_sample_and_default_run():
    sde = make_sde("VP")
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    grid = torch.tensor([[0.8, 0.6, 0.4], [0.05, 0.05, 0.35]], dtype=F64)
    x, info = run(model, AdaptiveODE(rtol=1e-8, atol=1e-8), x_T, grid=grid)
    for i in range(3):
        assert torch.allclose(x[i], gaussian_flow(sde, MU, S, x_T[i], float(grid[0, i]), float(grid[1, i])),
                              atol=1e-7)
    assert info.nfe_per_sample[2] < info.nfe_per_sample[1] <= info.nfe_per_sample[0]
    x, info = sample(model, AdaptiveODE(), shape=(4, 2), dtype=torch.float32, return_info=True)  # defaults
    assert x.dtype == torch.float32 and torch.isfinite(x).all() and info.nfe_per_sample.shape == (4,)


# -- arguments and repr ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"tableau": "rk4"}, "tableau must be"), ({"tableau": None}, "tableau must be"),
    ({"variable": "sigma"}, "variable must be"), ({"rtol": -1.0}, "rtol must be"),
    ({"atol": float("nan")}, "atol must be"), ({"rtol": 0.0, "atol": 0.0}, "cannot both be 0"),
    ({"max_steps": 0}, "max_steps must be"), ({"max_steps": 2.5}, "max_steps must be"),
    ({"min_step": 0.0}, "min_step must be"), ({"h_init": -0.1}, "h_init must be"),
    ({"h_init": True}, "h_init must be"), ({"safety": 1.5}, "safety must be"), ({"safety": 0}, "safety must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveODE(**kwargs)
    with pytest.raises(TypeError, match="method"):
        AdaptiveODE(method="dopri5")


def test_repr_and_attributes():
    assert repr(AdaptiveODE()) == "AdaptiveODE(tableau='dopri5')"
    assert repr(AdaptiveODE("bosh3", rtol=1e-3, variable="t", h_init=0.01)) == \
        "AdaptiveODE(tableau='bosh3', rtol=0.001, variable='t', h_init=0.01)"
    solver = AdaptiveODE()
    assert solver.adaptive and not solver.stochastic and solver.gaussian_only and solver.convergence_order == 5
    other = solver.with_tolerance(1e-3, 1e-4)
    assert (other.rtol, other.atol, other.tableau) == (1e-3, 1e-4, "dopri5") and solver.rtol == 1e-5
    assert not hasattr(solver, "prepare")  # an adaptive solver has no fixed-grid prepare/step
