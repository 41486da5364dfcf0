"""AdaptiveDPMSolver: per-sample adaptive DPM-Solver-12/23 and the adaptive driver (float64).

The mixture problem's reference is a tight DOP853 solution of the probability-flow ODE from the
same x_T (conftest.mixture_problem); the network is the mixture's exact denoiser.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, MIXTURE, GaussianNet, GaussianX0Net, gaussian_flow, make_sde, mixture_problem, rms

from samplers import Model, NonFiniteError, sample
from solvers import AdaptiveDPMSolver, Solver, SolverBase, StepSizeError

MU, S = 0.7, 0.5


def run(model, solver, x_T, **kw):
    return sample(model, solver, x_T=x_T, final_denoise=False, dtype=F64, return_info=True, **kw)


@pytest.mark.parametrize("sde_name", ["VP", "VE", "EDM"])
@pytest.mark.parametrize("pair", [(1, 2), (2, 3)])
def test_error_follows_the_tolerance(sde_name, pair):
    """Tightening rtol (atol = rtol/5) by 100x lowers the error against the exact flow by at least
    ~20x, the error stays within a small multiple of the tolerance times the state's scale, and the
    cost grows like tol^(-1/k) or slower (k the higher order; the theory's slope is 1/k)."""
    sde, x_T, reference = mixture_problem(sde_name)
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    tols = [1e-3, 1e-5]
    errors, nfes = [], []
    for tol in tols:
        x, info = run(model, AdaptiveDPMSolver(pair, rtol=tol, atol=tol / 5), x_T)
        errors.append(rms(x, reference))
        nfes.append(info.nfe_per_sample.double().mean().item())
    scale = sde.prior_std
    assert errors[1] < errors[0] / 20, errors
    assert errors[1] < 5e-5 * max(scale / 10, 1.0), errors
    slope = math.log(nfes[1] / nfes[0]) / math.log(tols[0] / tols[1])
    assert 0.15 < slope < 1.0 / pair[1] + 0.25, (slope, nfes)


def test_higher_pair_is_cheaper_at_tight_tolerance():
    sde, x_T, reference = mixture_problem("VP")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    cost = {}
    for pair in ((1, 2), (2, 3)):
        x, info = run(model, AdaptiveDPMSolver(pair, rtol=1e-5, atol=2e-6), x_T)
        assert rms(x, reference) < 2e-5
        cost[pair] = info.nfe_per_sample.sum().item()
    assert cost[(2, 3)] < cost[(1, 2)] / 2, cost


def test_each_sample_has_its_own_steps_and_is_batch_invariant():
    """Sample i's result and its step counts are the same alone and in the batch; the samples do
    not all take the same number of steps, and one that finishes early stops costing calls."""
    sde, x_T, _ = mixture_problem("VP")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    solver = AdaptiveDPMSolver((2, 3), rtol=1e-3, atol=2e-4)
    together, info = run(model, solver, x_T)
    nfe = info.nfe_per_sample
    assert nfe.max() > nfe.min() + 6, nfe  # a real spread
    assert info.nfe < nfe.sum()  # batched calls: fewer calls than sample-evaluations
    # batched calls: at least the slowest sample's; the start-of-step call is made only for samples
    # whose last step was accepted (a rejected one reuses its output), so a few more
    assert nfe.max() <= info.nfe <= 1.5 * nfe.max()
    for b in (0, 5, int(torch.argmin(nfe)), int(torch.argmax(nfe))):
        alone, info_b = run(model, solver, x_T[b:b + 1])
        assert torch.allclose(alone, together[b:b + 1], rtol=1e-13, atol=1e-13)
        assert info_b.nfe_per_sample.item() == nfe[b].item()
        assert info_b.accepted_per_sample.item() == info.accepted_per_sample[b].item()
        assert info_b.rejected_per_sample.item() == info.rejected_per_sample[b].item()


def test_per_sample_nfe_accounts_for_every_call():
    sde = make_sde("VP")
    net = GaussianX0Net(sde, MU, S)
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    rows = []
    counting = lambda x, t: (rows.append(x.shape[0]), net(x, t))[1]
    x, info = sample(Model(counting, sde, predicts="x0"), AdaptiveDPMSolver((1, 2), rtol=1e-4, atol=1e-5),
                     x_T=x_T, dtype=F64, return_info=True)
    assert info.nfe == len(rows)
    assert info.nfe_per_sample.sum().item() == sum(rows)
    # the final denoising call is one per sample
    assert (info.nfe_per_sample >= info.accepted_per_sample + 1).all()


@pytest.mark.parametrize("pair", [(1, 2), (2, 3)])
@pytest.mark.parametrize("predicts", ["x0", "eps"])
def test_gaussian_data_matches_the_exact_flow(pair, predicts):
    sde = make_sde("VP")
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    reference = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
    model = Model(GaussianNet(sde, "eps", MU, S), sde, predicts="eps")
    x, _ = run(model, AdaptiveDPMSolver(pair, predicts=predicts, rtol=1e-6, atol=1e-7), x_T)
    assert rms(x, reference) < 1e-5


def test_rectified_flow_starts_at_alpha_zero():
    sde = make_sde("RectifiedFlow")
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    reference = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    errors = [rms(run(model, AdaptiveDPMSolver((2, 3), rtol=tol, atol=tol / 5), x_T)[0], reference)
              for tol in (1e-3, 1e-5)]
    assert errors[1] < errors[0] / 10 and errors[1] < 1e-4, errors


def test_interval_and_per_sample_conditioning():
    """grid=(t_start, t_end) integrates over that interval; a per-sample label follows its sample when
    the network is called on a subset of the batch."""
    sde = make_sde("VP")
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    mus = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=F64)

    def net(x, t, mu):
        out = torch.empty_like(x)
        for i in range(x.shape[0]):  # each row with its own data mean
            out[i:i + 1] = GaussianX0Net(sde, float(mu[i]), S)(x[i:i + 1], t[i:i + 1])
        return out

    model = Model(net, sde, predicts="x0")
    t_start, t_end = 0.8, 0.05
    x, info = run(model, AdaptiveDPMSolver((2, 3), rtol=1e-6, atol=1e-7), x_T, grid=torch.tensor([t_start, t_end]),
                  cond={"mu": mus})
    assert info.nfe_per_sample.max() > info.nfe_per_sample.min()  # so subsets were actually called
    for i in range(4):
        expected = gaussian_flow(sde, float(mus[i]), S, x_T[i], t_start, t_end)
        assert torch.allclose(x[i], expected, atol=1e-5), (i, x[i], expected)


def test_limits_raise_naming_the_sample():
    sde, x_T, _ = mixture_problem("VP")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    with pytest.raises(StepSizeError, match=r"sample \d+: no end after max_steps=3"):
        sample(model, AdaptiveDPMSolver(rtol=1e-6, atol=1e-7, max_steps=3), x_T=x_T, dtype=F64)
    with pytest.raises(StepSizeError, match=r"sample \d+: the step size in lambda fell to .* below min_step=0.5"):
        sample(model, AdaptiveDPMSolver(rtol=1e-6, atol=1e-7, min_step=0.5), x_T=x_T, dtype=F64)

    def poisoned(x, t):
        out = MIXTURE.net(sde, "x0")(x, t)
        out[2] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match="sample 2: at t=.* the network returned NaN or Inf for a finite input"):
        sample(Model(poisoned, sde, predicts="x0"), AdaptiveDPMSolver(), x_T=x_T, dtype=F64)


def test_driver_arguments():
    sde = make_sde("VP")
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    solver = AdaptiveDPMSolver()
    with pytest.raises(ValueError, match="chooses its own steps"):
        sample(model, solver, shape=(2, 2), steps=10)
    with pytest.raises(ValueError, match="chooses its own steps"):
        sample(model, solver, shape=(2, 2), grid_kind="karras")
    with pytest.raises(ValueError, match=r"grid=\(t_start, t_end\)"):
        sample(model, solver, shape=(2, 2), grid=torch.tensor([1.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="callback is not supported"):
        sample(model, solver, shape=(2, 2), callback=lambda info: None)
    # an adaptive solver is a solver of its own kind: no fixed-grid prepare/step to call by mistake
    assert isinstance(solver, SolverBase) and not isinstance(solver, Solver) and not hasattr(solver, "prepare")
    x, info = sample(model, solver, shape=(3, 2), dtype=torch.float32, return_info=True)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert info.nfe_per_sample.shape == (3,) and info.steps == int(info.accepted_per_sample.max())


@pytest.mark.parametrize("kwargs, message", [
    ({"order": (1, 3)}, "order must be"), ({"order": 2}, "order must be"),
    ({"rtol": -1.0}, "rtol must be"), ({"atol": float("nan")}, "atol must be"),
    ({"rtol": 0.0, "atol": 0.0}, "cannot both be 0"), ({"max_steps": 0}, "max_steps must be"),
    ({"max_steps": True}, "max_steps must be"), ({"min_step": 0.0}, "min_step must be"),
    ({"h_init": -0.1}, "h_init must be"), ({"safety": 1.5}, "safety must be"),
    ({"predicts": "data"}, "predicts='data' is spelt predicts='x0'"), ({"predicts": "v"}, "predicts must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveDPMSolver(**kwargs)


def test_x0_hooks():
    """An identity correct_x0 changes nothing and sees every estimate at its per-sample times;
    thresholding bounds the result of an x0 net that overshoots; hooks need predicts='x0'."""
    sde = make_sde("VP")
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    net = GaussianX0Net(sde, MU, S, record_times=True)
    model = Model(net, sde, predicts="x0")
    seen = []

    def identity(x0, t):
        seen.append(t.clone())
        return x0

    plain, _ = run(model, AdaptiveDPMSolver(rtol=1e-4, atol=1e-5), x_T)
    net.times.clear()
    hooked, _ = run(model, AdaptiveDPMSolver(rtol=1e-4, atol=1e-5, correct_x0=identity), x_T)
    assert torch.equal(plain, hooked)
    assert len(seen) == len(net.times) and all(torch.equal(a, b) for a, b in zip(seen, net.times))
    overshoot = Model(lambda x, t: 4.0 * torch.ones_like(x), sde, predicts="x0")
    x = sample(overshoot, AdaptiveDPMSolver(thresholding=True), x_T=x_T, dtype=F64)
    assert torch.allclose(x, torch.ones_like(x))
    assert "thresholding=DynamicThresholding" in repr(AdaptiveDPMSolver(thresholding=True))
    with pytest.raises(ValueError, match="need predicts='x0'"):
        AdaptiveDPMSolver(predicts="eps", thresholding=True)


def test_one_landing_rule_and_one_first_step_for_every_adaptive_solver():
    """AdaptiveDPMSolver, AdaptiveEM and AdaptiveODE share the loop and its two constants: a step within
    1e-10 max(|end|, 1) of the end lands on it; the first step out of alpha = 0 reaches lambda = log(2 atol)/2."""
    from solvers import AdaptiveEM, AdaptiveODE
    from solvers.adaptive import AdaptiveSolver, first_log_snr, lands_on_end

    end = torch.tensor([1.0, -30.0], dtype=torch.float64)
    assert lands_on_end(end - 0.5e-10 * end.abs(), end).all()
    assert not lands_on_end(end - 1e-8 * end.abs(), end).any()
    assert lands_on_end(torch.tensor([0.1 + 1e-11]), torch.tensor([0.1]), direction=-1.0).all()
    assert first_log_snr(1e-4) == 0.5 * math.log(2e-4) and first_log_snr(0.0) == -5.0
    for solver in (AdaptiveDPMSolver(), AdaptiveEM(), AdaptiveODE()):
        assert isinstance(solver, AdaptiveSolver) and type(solver).per_sample_loop is AdaptiveSolver.per_sample_loop
