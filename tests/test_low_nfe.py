"""Low-NFE tools: the floor-free measures of samplers.problems and grids that end at sigma = 0.

The measures are checked against exact samples (they sit at their stated floor) and against a known
defect (a 5% error in every mode's width must stand far above that floor).  A grid ending at sigma = 0
must cost one network call per step for every fixed-grid solver, give what the same run with a final
denoising step from the last positive noise level gives (that is its definition), and be refused with a
reason where it cannot run.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import solvers
from samplers import Model, grid, invert, problems, sample, sample_grad
from samplers.cli.registry import quality_solvers
from sde import EDMSDE, VESDE, VPSDE, RectifiedFlowSDE
from solvers import AdaptiveDPMSolver, DPMSolver, Euler, Heun

F64 = torch.float64
N_EXACT = 20000

MIXTURES = {
    "2d": problems.mixture_2d,
    "8d-widths": problems.mixture_widths,
    "16d-weights": problems.mixture_weights,
    "64d": problems.mixture_64d,
}


def _exact(mix, n, seed):
    return mix.sample(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MIXTURES))
def test_mode_error_of_exact_samples_sits_at_its_floor(name):
    mix = MIXTURES[name]()
    floor = problems.mode_error_floor(mix, N_EXACT)
    errors = [problems.mode_error(_exact(mix, N_EXACT, seed), mix) for seed in range(3)]
    mean_error = sum(e["mode_error"] for e in errors) / 3
    mean_tv = sum(e["weight_tv"] for e in errors) / 3
    # the floor is an expectation: three draws average within a factor 2 of it (measured 0.6x-1.4x)
    assert 0.4 * floor["mode_error"] < mean_error < 2.0 * floor["mode_error"], (errors, floor)
    assert 0.3 * floor["weight_tv"] < mean_tv < 2.0 * floor["weight_tv"], (errors, floor)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_mode_error_detects_a_five_percent_width_error(name):
    mix = MIXTURES[name]()
    x = _exact(mix, N_EXACT, 11)
    own = problems.mode_statistics(x, mix)
    one = torch.ones(x.shape[0], dtype=F64)
    assigned = mix._posterior(x, one, torch.zeros_like(one))[1].argmax(dim=1)
    wide = own["means"][assigned] + 1.05 * (x - own["means"][assigned])
    floor = problems.mode_error_floor(mix, N_EXACT)["mode_error"]
    variances = torch.diagonal(mix.covs, dim1=1, dim2=2).mean(dim=1)
    expected = 0.05**2 * float((mix.weights * variances).sum())
    error = problems.mode_error(wide, mix)["mode_error"]
    # the defect alone is 2.5-10x the floor on these problems, and the measure sees all of it
    assert error > floor + 0.7 * expected, (error, floor, expected)
    assert error > 3.0 * floor


def test_mode_error_counts_a_missing_mode_and_weights():
    mix = problems.mixture_2d()
    x = _exact(mix, 4000, 3)
    one = torch.ones(x.shape[0], dtype=F64)
    assigned = mix._posterior(x, one, torch.zeros_like(one))[1].argmax(dim=1)
    without_last = x[assigned != 7]
    result = problems.mode_error(without_last, mix)
    # mode 7 (weight 8/36) missing: its whole |mu|^2 + s^2 over d counts, and its weight moves to the others
    assert result["mode_error"] > 8 / 36 * (4.0 + 2 * 0.04) / 2 * 0.99
    assert result["weight_tv"] == pytest.approx(8 / 36, abs=0.02)


def test_measure_errors():
    mix = problems.mixture_2d()
    with pytest.raises(ValueError, match="x has dimension 3, the mixture 2"):
        problems.mode_error(torch.zeros(10, 3), mix)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        problems.mode_error(torch.full((10, 2), float("nan")), mix)
    with pytest.raises(TypeError, match="mixture must be a samplers.problems.GaussianMixture"):
        problems.mode_statistics(torch.zeros(10, 2), "2d")
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        problems.mode_error_floor(mix, 1)
    with pytest.raises(ValueError, match="x and y must have the same shape"):
        problems.rms_distance(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="reference_endpoint needs a Gaussian-marginal SDE"):
        from sde import DirichletSDE

        problems.reference_endpoint(mix, DirichletSDE(2), torch.zeros(4, 2))


@pytest.mark.parametrize("sde", [VPSDE(), EDMSDE(), VESDE(), RectifiedFlowSDE(t_max=0.999)], ids=repr)
def test_reference_endpoint_is_the_exact_flow_of_a_gaussian(sde):
    # data N(mu, s^2): the flow keeps each point's standardised position, so from y = x / alpha at noise
    # level S = sigma / alpha it lands on mu + s (y - mu) / sqrt(s^2 + S^2)
    mu, s = 0.7, 0.3
    data = problems.gaussian(mu, s, dim=3)
    x_T = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * sde.prior_std
    t = torch.tensor(sde.t_max, dtype=F64)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    y, level = x_T / alpha, sigma / alpha
    exact = mu + s * (y - mu) / torch.sqrt(s * s + level * level)
    got = problems.reference_endpoint(data, sde, x_T)
    assert (got - exact).abs().max().item() < 1e-8


# -- grids that end at sigma = 0 -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 60), kind=st.sampled_from(["uniform", "quadratic", "log_snr", "karras"]),
       edm=st.booleans())
def test_grid_to_zero_shape_and_ends(steps, kind, edm):
    sde = EDMSDE() if edm else VPSDE()
    if kind == "quadratic" and not edm and steps > 31:
        # (1/steps)^2 < t_min: refused (tested below)
        steps = 31
    times = grid(sde, steps, kind, to_zero=True)
    assert times.shape == (steps + 1,)
    assert times[0].item() == sde.t_max and times[-1].item() == 0.0
    assert bool((times[1:] < times[:-1]).all())
    assert bool((times[:-1] >= sde.t_min).all())
    if kind in ("log_snr", "karras") and steps > 1:
        # the spacing cannot reach sigma = 0: steps - 1 of its steps, down to t_min, then the step to 0
        assert times[-2].item() == sde.t_min
        assert torch.equal(times[:-1], grid(sde, steps - 1, kind))


def test_grid_to_zero_uniform_reaches_zero_evenly_and_errors():
    times = grid(VPSDE(), 5, "uniform", to_zero=True)
    assert torch.allclose(times, torch.linspace(1.0, 0.0, 6, dtype=F64), atol=0, rtol=1e-15)
    with pytest.raises(ValueError, match=r"VESDE.*has no time where sigma = 0.*final_denoise=True"):
        grid(VESDE(), 5, to_zero=True)
    with pytest.raises(ValueError, match=r"1001 uniform steps from t_max=1 to sigma = 0 call the network below "
                                         r"t_min=0.001"):
        grid(VPSDE(), 1001, "uniform", to_zero=True)
    with pytest.raises(ValueError, match=r"32 quadratic steps from t_max=1 to sigma = 0 call the network below"):
        grid(VPSDE(), 32, "quadratic", to_zero=True)
    assert grid(VPSDE(), 32, "quadratic", to_zero=True, t_min=0.01)[-2].item() == 0.01
    with pytest.raises(TypeError, match="to_zero must be True or False"):
        grid(VPSDE(), 5, to_zero="yes")


def _counting(model):
    calls = []
    net = model.net

    def network(x, t, **kw):
        calls.append(1)
        return net(x, t, **kw)

    return Model(network, model.sde, predicts=model.predicts), calls


def _fixed_grid_solvers():
    return [(label, factory) for label, factory in quality_solvers() if not factory().adaptive]


@pytest.mark.parametrize("sde_name", ["vp", "edm"])
def test_every_fixed_grid_solver_ends_at_zero_with_one_call_per_step(sde_name):
    """N steps to sigma = 0 = N - 1 solver steps, then the x0 estimate at the last positive noise level:
    the same samples as that run with final_denoise, and one network call for the step to 0."""
    sde = VPSDE() if sde_name == "vp" else EDMSDE()
    mix = problems.mixture_2d()
    model, calls = _counting(Model(mix.net(sde, "x0"), sde, predicts="x0"))
    x_T = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * sde.prior_std
    checked = 0
    fixed = _fixed_grid_solvers()
    for label, factory in fixed:
        for steps in (1, 2, 5):
            times = grid(sde, steps, to_zero=True)
            calls.clear()
            if steps > 1:
                try:
                    same = sample(model, factory(), x_T=x_T, grid=times[:-1], seed=3, final_denoise=True)
                except ValueError as exc:  # a grid too short for the solver (Restart's presets): refused alike
                    with pytest.raises(ValueError, match=re.escape(str(exc))):
                        sample(model, factory(), x_T=x_T, grid=times, seed=3)
                    continue
            else:
                same = mix.denoiser(sde, x_T, torch.full((6,), sde.t_max, dtype=F64))
            calls.clear()
            x, info = sample(model, factory(), x_T=x_T, grid=times, seed=3, return_info=True)
            zero_run_calls = len(calls)
            assert torch.equal(x, same) if steps > 1 else torch.allclose(x, same, rtol=1e-12, atol=1e-12), label
            assert info.steps == steps and not info.final_denoise, label
            assert info.nfe == zero_run_calls, label
            solver = factory()
            if type(solver).__name__ != "Restart" and steps > 1:
                assert zero_run_calls == (steps - 1) * solver.nfe_per_step + 1, (label, steps, zero_run_calls)
            if steps == 1:
                assert zero_run_calls == 1, label
            checked += 1
    # only Restart's presets refuse grids this short (with or without the step to 0)
    assert checked >= 3 * len(fixed) - 4 and len(fixed) >= 25


def test_step_to_zero_is_what_diffusers_and_k_diffusion_do_at_a_trailing_zero():
    """Euler on EDM to a trailing sigma = 0 is k-diffusion's sample_euler: its last step lands on D."""
    sde = EDMSDE()
    mix = problems.mixture_2d()
    model = Model(mix.net(sde, "x0"), sde, predicts="x0")
    x_T = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * sde.prior_std
    times = grid(sde, 4, to_zero=True)
    x = sample(model, Euler(), x_T=x_T, grid=times)
    y = x_T.clone()
    for s, s_next in zip(times[:-1], times[1:], strict=True):
        d = (y - mix.denoiser(sde, y, torch.full((8,), float(s), dtype=F64))) / s
        y = y + (s_next - s) * d
    assert (x - y).abs().max().item() < 1e-12


def test_zero_end_refusals():
    sde = VPSDE()
    mix = problems.mixture_2d()
    model = Model(mix.net(sde, "x0"), sde, predicts="x0")
    x_T = torch.randn(4, 2, dtype=F64)
    times = grid(sde, 4, to_zero=True)
    with pytest.raises(ValueError, match="final_denoise=True: the grid already ends at sigma = 0"):
        sample(model, DPMSolver(2), x_T=x_T, grid=times, final_denoise=True)
    with pytest.raises(ValueError, match="chooses its own steps and cannot end at sigma = 0"):
        sample(model, AdaptiveDPMSolver(), x_T=x_T, grid=torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="invert needs a grid that ends at t_min, not at sigma = 0"):
        invert(model, DPMSolver(2), x_T, grid=times)
    with pytest.raises(ValueError, match="sample_grad needs a grid that ends at t_min, not at sigma = 0"):
        sample_grad(model, Heun(), x_T, grid=times)
    with pytest.raises(ValueError, match=r"the last time must be t = 0 \(sigma = 0\) for every sample or for none"):
        sample(model, Euler(), x_T=x_T, grid=torch.stack([times] * 3 + [grid(sde, 4)], dim=1))
    ve = VESDE()
    with pytest.raises(ValueError, match=r"grid leaves the SDE's time range"):
        sample(Model(mix.net(ve, "x0"), ve, predicts="x0"), Euler(), x_T=x_T, grid=torch.tensor([1.0, 0.5, 0.0]))


def test_solvers_exported_are_covered():
    """Every exported fixed-grid solver class appears in the zero-end test's list."""
    covered = {type(factory()).__name__ for _, factory in _fixed_grid_solvers()}
    exported = {name for name in solvers.__all__
                if isinstance(getattr(solvers, name), type) and issubclass(getattr(solvers, name), solvers.Solver)
                and name not in ("Solver", "SimplexEulerMaruyama", "JacobiEulerMaruyama")}
    assert exported <= covered, exported - covered
