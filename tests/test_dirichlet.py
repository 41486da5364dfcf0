"""The Dirichlet diffusion (sde.DirichletSDE) and its simplex-preserving solver (solvers.JacobiEulerMaruyama):
stationary laws, the transition-density series (normalisation, detailed balance, EM histograms, score),
reverse sampling with exact scores, states inside the simplex, refusals and argument errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from samplers import Model, sample
from sde import VPSDE, DirichletSDE
from solvers import DPMSolver, Euler, EulerMaruyama, Heun, JacobiEulerMaruyama, PredictorCorrector, UniPC

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def tanh_sinh_nodes(n: int = 4001, span: float = 3.2):
    """Nodes u, points v(u) in (0, 1) and weights dv/du of the tanh-sinh map, which crowds the nodes at
    both ends so that densities peaked at the boundary integrate accurately."""
    u = torch.linspace(-span, span, n, dtype=F64)
    g = 0.5 * math.pi * torch.sinh(u)
    v = 0.5 * (1 + torch.tanh(g))
    dv = 0.25 * math.pi * torch.cosh(u) / torch.cosh(g) ** 2
    inside = (v > 0) & (v < 1)
    return u[inside], v[inside], dv[inside]


def beta_law(sde, i):
    return stats.beta(sde.alpha[i].item(), sde.beta[i].item())


# -- stationary laws ------------------------------------------------------------------------------------------
def test_forward_process_reaches_the_beta_laws():
    sde = DirichletSDE(4)
    gen = torch.Generator().manual_seed(1)
    v0 = sde.stick_from_categories(torch.randint(0, 4, (20000,), generator=gen), dtype=F64)
    v = sde.forward_sample(v0, 8.0, steps=800, generator=gen)
    for i in range(3):
        assert stats.kstest(v[:, i].numpy(), beta_law(sde, i).cdf).pvalue > 0.01
    # the test has power: the neighbouring coordinate's Beta is rejected
    assert stats.kstest(v[:, 0].numpy(), beta_law(sde, 1).cdf).pvalue < 1e-6


def test_prior_is_the_beta_laws_and_stick_breaks_to_the_flat_dirichlet():
    sde = DirichletSDE(5)
    v = sde.prior_sample((20000, 4), normal=torch.randn(20000, 4, generator=torch.Generator().manual_seed(2),
                                                        dtype=F64))
    for i in range(4):
        assert stats.kstest(v[:, i].numpy(), beta_law(sde, i).cdf).pvalue > 0.01
    x = sde.to_simplex(v)
    for k in range(5):  # every marginal of Dirichlet(1, ..., 1) on 5 categories is Beta(1, 4)
        assert stats.kstest(x[:, k].numpy(), stats.beta(1, 4).cdf).pvalue > 0.01
    assert stats.kstest(v[:, 3].numpy(), stats.beta(1, 4).cdf).pvalue < 1e-6


def test_prior_tails_stay_inside_and_prior_logp():
    sde = DirichletSDE(3)
    z = torch.tensor([[-8.0, 8.0], [0.0, 0.0]], dtype=F64)
    v = sde.prior_sample((2, 2), normal=z)
    assert bool(((v > 0) & (v < 1)).all())
    expected = sum(beta_law(sde, i).logpdf(v[:, i].numpy()) for i in range(2))
    torch.testing.assert_close(sde.prior_logp(v), torch.from_numpy(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prior_draws_that_round_onto_the_boundary_stay_inside(dtype):
    """Beta(1, 1) draws within half a unit of rounding of 1 (z = 6 in float32, z = 9 in float64) and draws
    below the smallest normal number (z = -40) land inside, and the sampler runs from them."""
    sde = DirichletSDE(4)
    z = torch.tensor([[6.0, 6.0, 6.0], [9.0, 9.0, 9.0], [-40.0, -40.0, -40.0]], dtype=dtype)
    v = sde.prior_sample((3, 3), normal=z)
    assert v.dtype == dtype and bool(((v > 0) & (v < 1)).all()), v
    model = Model(lambda v, t: sde.beta_score(v), sde, predicts="score")
    out = sample(model, JacobiEulerMaruyama(), x_T=v, steps=3, final_denoise=False)
    assert bool(((out > 0) & (out < 1)).all())


# -- the transition-density series -------------------------------------------------------------------------------
STARTS = [0.0, 1.0, 0.3, 0.999]


@pytest.mark.parametrize("speed_balanced", [False, True])
@pytest.mark.parametrize("t", [0.01, 0.05, 0.3, 2.0])
def test_series_integrates_to_one(t, speed_balanced):
    sde = DirichletSDE(4, speed_balanced=speed_balanced)
    u, v, dv = tanh_sinh_nodes()
    grid = v[:, None].expand(-1, 3).contiguous()
    for start in STARTS:
        v0 = start if start in (0.0, 1.0) else torch.tensor(start, dtype=F64)
        log_p, score = sde.transition(grid, v0, t)
        total = torch.trapezoid(log_p.exp() * dv[:, None], u, dim=0)
        torch.testing.assert_close(total, torch.ones(3, dtype=F64), atol=1e-9, rtol=0)
        assert bool(torch.isfinite(score).all())


def test_series_detailed_balance_and_long_time_limit():
    sde = DirichletSDE(4, speed_balanced=False)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(500, 3, generator=gen, dtype=F64), torch.rand(500, 3, generator=gen, dtype=F64)
    for t in (0.05, 0.5):
        forward = sde.transition(y, x, t)[0] + sde.beta_logpdf(x)
        backward = sde.transition(x, y, t)[0] + sde.beta_logpdf(y)
        # compared where the series resolves the density (not in the far tail, where it is a floor)
        resolved = torch.minimum(forward, backward) > -12
        assert float(resolved.double().mean()) > 0.5
        torch.testing.assert_close(forward[resolved], backward[resolved], atol=1e-9, rtol=1e-9)
    log_p, score = sde.transition(y, x, 40.0)
    torch.testing.assert_close(log_p, sde.beta_logpdf(y), atol=1e-12, rtol=0)
    torch.testing.assert_close(score, sde.beta_score(y), atol=1e-12, rtol=0)


@pytest.mark.parametrize("start", [0.0, 1.0, 0.3])
def test_series_matches_a_fine_euler_maruyama_histogram(start):
    sde = DirichletSDE(3, speed_balanced=False)
    t, n = 0.2, 40000
    v0 = torch.full((n, 2), start, dtype=F64)
    v = sde.forward_sample(v0, t, steps=400, generator=torch.Generator().manual_seed(4))
    edges = torch.linspace(0, 1, 26, dtype=F64)
    for i in range(2):
        counts = np.histogram(v[:, i].numpy(), bins=edges.numpy())[0]
        # bin probabilities by integrating the series over each bin (tanh-sinh inside every bin)
        u, w, dw = tanh_sinh_nodes(801, span=2.5)  # nodes 1e-9 inside each bin
        lo, hi = edges[:-1, None], edges[1:, None]
        points = lo + (hi - lo) * w  # (bins, nodes)
        stack = points.reshape(-1, 1).expand(-1, 2).contiguous()
        v0_i = start if start in (0.0, 1.0) else torch.tensor(start, dtype=F64)
        density = sde.transition(stack, v0_i, t)[0][:, i].exp().reshape(points.shape)
        probs = torch.trapezoid(density * (hi - lo) * dw, u, dim=1)
        assert abs(float(probs.sum()) - 1) < 1e-6
        expected = (probs * n).numpy()
        keep = expected > 20
        chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
        dof = int(keep.sum()) - 1
        assert stats.chi2.sf(chi2, dof) > 1e-3, (i, chi2, dof)


@pytest.mark.parametrize("start", [0.0, 1.0, 0.7])
def test_series_score_is_the_gradient_of_its_log(start):
    sde = DirichletSDE(4, speed_balanced=True)
    v = torch.tensor([[1e-5, 1e-3, 0.01, 0.2], [0.4, 0.7, 0.75, 0.999], [0.03, 0.6, 0.97, 1 - 1e-5]], dtype=F64)
    v = v.repeat_interleave(3, dim=1).reshape(-1, 3).requires_grad_(True)  # each point in each coordinate
    t = torch.tensor([0.02, 0.1, 0.7], dtype=F64).repeat_interleave(4)
    v0 = start if start in (0.0, 1.0) else torch.full_like(v, start)
    log_p, score = sde.transition(v, v0, t)
    (grad,) = torch.autograd.grad(log_p.sum(), v)
    resolved = log_p.detach() > -12  # the far tail is below the series' rounding (see the next test)
    assert int(resolved.sum()) >= 20
    torch.testing.assert_close(score[resolved], grad[resolved], rtol=1e-8, atol=1e-8)


def test_series_score_in_the_unresolved_tail_points_back_to_the_start():
    sde = DirichletSDE(3)
    v = torch.tensor([[0.6, 0.6], [1e-4, 1e-4]], dtype=F64)
    log_p, score = sde.transition(v, torch.tensor([[1e-3, 1e-3], [0.999, 0.999]], dtype=F64), 0.01)
    assert bool((log_p < -20).all()) and bool(torch.isfinite(score).all())
    assert bool((score[0] < -100).all()) and bool((score[1] > 1000).all())


def test_categorical_marginal_score_is_the_gradient_of_its_log():
    sde = DirichletSDE(4)
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=F64)  # one per position
    v = torch.rand(5, 2, 3, generator=torch.Generator().manual_seed(5), dtype=F64).clamp(0.01, 0.99)
    v.requires_grad_(True)
    t = torch.tensor([0.15, 0.3, 0.6, 1.0, 3.0], dtype=F64)  # times where every vertex's series resolves
    log_p, score = sde.categorical_marginal(v, t, probs)
    (grad,) = torch.autograd.grad(log_p.sum(), v)
    torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-8)
    # at a large time the marginal is the prior whatever the data
    log_p, _ = sde.categorical_marginal(v.detach(), 40.0, probs)
    torch.testing.assert_close(log_p, sde.beta_logpdf(v.detach()).sum(-1), atol=1e-10, rtol=0)


def test_simplex_score_to_stick_matches_autograd():
    sde = DirichletSDE(4)
    conc = torch.tensor([0.7, 2.0, 1.5, 3.0], dtype=F64)
    v = torch.rand(6, 3, generator=torch.Generator().manual_seed(6), dtype=F64).clamp(0.05, 0.95)
    v.requires_grad_(True)
    x = sde.to_simplex(v)
    log_pv = ((conc - 1) * torch.log(x)).sum(-1) + sde.log_det_to_stick(v)
    (grad,) = torch.autograd.grad(log_pv.sum(), v)
    score_x = (conc - 1) / x.detach()
    torch.testing.assert_close(sde.simplex_score_to_stick(score_x, v.detach()), grad, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_stick_breaking_round_trip(categories, seed):
    sde = DirichletSDE(categories)
    v = torch.rand(4, categories - 1, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.98 + 0.01
    x = sde.to_simplex(v)
    assert x.shape == (4, categories) and bool((x > 0).all())
    torch.testing.assert_close(x.sum(-1), torch.ones(4, dtype=F64))
    torch.testing.assert_close(sde.from_simplex(x), v)
    vertices = sde.stick_from_categories(torch.arange(categories), dtype=F64)
    torch.testing.assert_close(sde.to_simplex(vertices), torch.eye(categories, dtype=F64))
    torch.testing.assert_close(sde.from_simplex(torch.eye(categories, dtype=F64)), vertices)


# -- reverse sampling -----------------------------------------------------------------------------------------------
def test_reverse_sampling_with_the_stationary_score_keeps_the_beta_laws():
    sde = DirichletSDE(3)
    model = Model(lambda v, t: sde.beta_score(v), sde, predicts="score")
    v = sample(model, JacobiEulerMaruyama(), shape=(20000, 2), steps=200, grid_kind="quadratic", seed=7,
               final_denoise=False, dtype=F64)
    for i in range(2):
        assert stats.kstest(v[:, i].numpy(), beta_law(sde, i).cdf).pvalue > 0.01


def test_euler_maruyama_has_weak_order_one():
    """The stationary second moment after a reverse run with the exact (Beta) score: its error shrinks
    like h (Euler-Maruyama's weak order; the noise-free last step also costs O(h))."""
    sde = DirichletSDE(3)
    model = Model(lambda v, t: sde.beta_score(v), sde, predicts="score")
    a, b = sde.alpha, sde.beta
    second = a * (a + 1) / ((a + b) * (a + b + 1))
    counts = [10, 20, 40]
    errors = []
    for steps in counts:
        v = sample(model, JacobiEulerMaruyama(), shape=(100000, 2), steps=steps, seed=13, final_denoise=False,
                   dtype=F64)
        errors.append(((v * v).mean(0) - second).abs())
    errors = torch.stack(errors)  # (3, 2); Monte-Carlo error about 7e-4
    slopes = -torch.diff(torch.log(errors), dim=0) / math.log(2)
    assert bool((slopes > 0.7).all()) and bool((slopes < 1.3).all()), (errors, slopes)


def test_reverse_sampling_with_the_exact_score_recovers_category_frequencies():
    sde = DirichletSDE(3, t_max=8.0)
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    model = Model(lambda v, t: sde.categorical_marginal(v, t, probs)[1], sde, predicts="score")
    n = 8000
    v = sample(model, JacobiEulerMaruyama(), shape=(n, 2), steps=150, grid_kind="quadratic", seed=8,
               final_denoise=False, dtype=F64)
    assert bool(((v > 0) & (v < 1)).all())
    x = sde.to_simplex(v)
    assert float(x.max(-1).values.mean()) > 0.98  # the samples sit at vertices
    freq = torch.bincount(x.argmax(-1), minlength=3).to(F64) / n
    sd = torch.sqrt(probs * (1 - probs) / n)
    assert bool(((freq - probs).abs() < 4 * sd).all()), (freq, probs)
    # power: the same run with a wrong distribution's score is far off
    wrong = Model(lambda v, t: sde.categorical_marginal(v, t, probs.flip(0))[1], sde, predicts="score")
    v = sample(wrong, JacobiEulerMaruyama(), shape=(2000, 2), steps=60, grid_kind="quadratic", seed=8,
               final_denoise=False, dtype=F64)
    freq = torch.bincount(sde.to_simplex(v).argmax(-1), minlength=3).to(F64) / 2000
    assert float((freq - probs).abs().max()) > 0.2


def test_states_never_leave_the_simplex_under_a_wild_score():
    sde = DirichletSDE(5)
    gen = torch.Generator().manual_seed(9)
    table = torch.randn(50, 4, generator=gen) * 1e4

    states = []

    def wild(v, t):  # every state the solver reaches is handed to the network
        states.append(v.clone())
        return table[(t * 1e3).long() % 50][:, None, :].to(v.dtype).expand_as(v)

    v = sample(Model(wild, sde, predicts="score"), JacobiEulerMaruyama(time_dilation=3.0), shape=(16, 3, 4),
               steps=40, final_denoise=False)
    assert len(states) == 40
    for state in states + [v]:
        assert bool(((state > 0) & (state < 1)).all())
        x = sde.to_simplex(state)
        assert bool((x >= 0).all()) and bool(((x.sum(-1) - 1).abs() < 1e-5).all())


def test_sampler_is_batch_invariant_and_keyed():
    sde = DirichletSDE(4)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    model = Model(lambda v, t: sde.categorical_marginal(v, t, probs)[1].to(v.dtype), sde, predicts="score")
    solver = JacobiEulerMaruyama(time_dilation=2.0, dilation_start=1.0)
    full = sample(model, solver, shape=(6, 3), steps=20, seed=11, final_denoise=False, dtype=F64)
    part = sample(model, solver, shape=(2, 3), steps=20, seed=11, sample_index=torch.tensor([3, 4]),
                  final_denoise=False, dtype=F64)
    torch.testing.assert_close(part, full[3:5], rtol=1e-12, atol=1e-12)
    again = sample(model, solver, shape=(6, 3), steps=20, seed=12, final_denoise=False, dtype=F64)
    assert not torch.allclose(again, full)


def test_time_dilation_stretches_every_step_below_its_start():
    sde = DirichletSDE(3)
    model = Model(lambda v, t: torch.zeros_like(v), sde, predicts="score")
    times = torch.tensor([[4.0], [2.0], [1.0], [0.5]], dtype=F64)
    tables = JacobiEulerMaruyama(time_dilation=4.0, dilation_start=2.0).prepare(model, times)
    torch.testing.assert_close(tables["h"], torch.tensor([[2.0], [4.0], [2.0]], dtype=F64))
    assert tables["noisy"] == [True, True, False]
    assert float(tables["noise"][-1]) == 0.0


# -- refusals and errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", [EulerMaruyama(), Euler(), Heun(), DPMSolver(), UniPC(), PredictorCorrector()],
                         ids=lambda s: type(s).__name__)
def test_gaussian_solvers_refuse_the_dirichlet_sde(solver):
    sde = DirichletSDE(3)
    model = Model(lambda v, t: sde.beta_score(v), sde, predicts="score")
    with pytest.raises(ValueError, match="Gaussian-marginal SDE"):
        sample(model, solver, shape=(2, 2), steps=4, final_denoise=False)


def test_simplex_solver_refuses_a_gaussian_sde_and_models_need_scores():
    model = Model(lambda x, t: x, VPSDE(), predicts="score")
    with pytest.raises(ValueError, match="DirichletSDE"):
        sample(model, JacobiEulerMaruyama(), shape=(2, 2), steps=4, final_denoise=False)
    with pytest.raises(ValueError, match="supports only 'score'"):
        Model(lambda v, t: v, DirichletSDE(3), predicts="eps")


def test_argument_errors():
    with pytest.raises(ValueError, match="categories"):
        DirichletSDE(1)
    with pytest.raises(ValueError, match="alpha"):
        DirichletSDE(3, alpha=[1.0, -1.0])
    with pytest.raises(ValueError, match="beta"):
        DirichletSDE(3, beta=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="t_min must be positive"):
        DirichletSDE(3, t_min=0.0)
    with pytest.raises(ValueError, match="speed_factor"):
        DirichletSDE(3, speed_factor=0)
    sde = DirichletSDE(3, max_terms=50)
    inside = torch.full((2, 2), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="open interval"):
        sde.transition(torch.tensor([[0.0, 0.5]], dtype=F64), 0.0, 0.1)
    with pytest.raises(ValueError, match="last dimension"):
        sde.transition(torch.full((2, 3), 0.5, dtype=F64), 0.0, 0.1)
    with pytest.raises(ValueError, match="t must be finite and > 0"):
        sde.transition(inside, 0.0, 0.0)
    with pytest.raises(ValueError, match="max_terms"):
        sde.transition(inside, 0.0, 1e-4)
    with pytest.raises(ValueError, match="vertices"):
        sde.transition(inside, 0.5, 0.1)
    with pytest.raises(ValueError, match="probs"):
        sde.categorical_marginal(inside, 0.1, torch.tensor([0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="simplex"):
        sde.from_simplex(torch.tensor([[0.5, 0.6, 0.1]]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        sde.stick_from_categories(torch.tensor([3]))
    with pytest.raises(ValueError, match="shape must end"):
        sde.prior_sample((4, 3))
    with pytest.raises(ValueError, match="time_dilation"):
        JacobiEulerMaruyama(time_dilation=0.5)
    with pytest.raises(ValueError, match="boundary_eps"):
        JacobiEulerMaruyama(boundary_eps=0.0)
    with pytest.raises(ValueError, match="eta"):
        JacobiEulerMaruyama(eta=2.0)
    model = Model(lambda v, t: sde.beta_score(v), sde, predicts="score")
    for x_T in (torch.tensor([[1.0, 0.5]]), torch.tensor([[-0.1, 0.5]])):
        with pytest.raises(ValueError, match=r"x_T must lie in the open interval \(0, 1\)"):
            sample(model, JacobiEulerMaruyama(), x_T=x_T, steps=3)
    with pytest.raises(ValueError, match=r"x_T must be finite"):  # the driver's check, before the SDE's
        sample(model, JacobiEulerMaruyama(), x_T=torch.tensor([[0.5, float("nan")]]), steps=3)
    with pytest.raises(ValueError, match="x_T must have a last dimension of K - 1 = 2"):
        sample(model, JacobiEulerMaruyama(), x_T=torch.full((2, 3), 0.5), steps=3)


# -- the example --------------------------------------------------------------------------------------------------------
def test_example_runs_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "dirichlet.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "valid sequences" in proc.stdout


def test_driver_defaults_off_gaussian_sdes():
    """final_denoise defaults off (no x0 estimate without alpha/sigma), True is refused by name, callbacks get
    denoised=None, and a Langevin corrector (which would leave the simplex) is refused."""
    from solvers import AnnealedLangevin, Langevin

    sde = DirichletSDE(3)
    model = Model(lambda v, t: sde.beta_score(v), sde, predicts="score")
    seen = []
    x, info = sample(model, JacobiEulerMaruyama(), shape=(4, 2), steps=5, seed=3, dtype=F64, return_info=True,
                     callback=seen.append)
    assert not info.final_denoise and info.nfe == 5
    assert len(seen) == 5 and all(s.denoised is None for s in seen)
    assert torch.equal(x, sample(model, JacobiEulerMaruyama(), shape=(4, 2), steps=5, seed=3, dtype=F64,
                                 final_denoise=False))
    with pytest.raises(ValueError, match="final_denoise=True needs a Gaussian-marginal SDE"):
        sample(model, JacobiEulerMaruyama(), shape=(4, 2), steps=5, final_denoise=True)
    for corrector, message in ((Langevin(), "does not keep states inside"),
                               (AnnealedLangevin(), "Gaussian-marginal SDE")):
        with pytest.raises(ValueError, match=message):
            sample(model, PredictorCorrector(JacobiEulerMaruyama(), corrector), shape=(4, 2), steps=5)
