"""Solvers (solvers/): each step against a hand-written reference built from the SDE's f, g^2 and
the exact score, for every Gaussian SDE; parametrisation invariance; attributes and errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, GaussianNet, col, make_sde

from samplers import Model, grid, sample
from samplers.noise import NoiseSource
from sde import PREDICTIONS, SDE, RectifiedFlowSDE
from solvers import Euler, EulerMaruyama, Heun, Restart, Solver

MU, S = 0.7, 0.5

SOLVERS = {
    "Euler": lambda: Euler(),
    "Euler(eta=0.3)": lambda: Euler(eta=0.3),
    "Heun": lambda: Heun(),
    "Heun(eta=1)": lambda: Heun(eta=1.0),
    "Heun(eta=0.5)": lambda: Heun(eta=0.5),
    "EulerMaruyama": lambda: EulerMaruyama(),
    "EulerMaruyama(eta=0.5)": lambda: EulerMaruyama(eta=0.5),
}

SDE_NAMES = ["VP", "SubVP", "VE", "EDM", "CosineVP", "DiscreteVP-betas", "RectifiedFlow"]


def reverse_drift(sde, x, t, eta):
    """F = f x - (1 + eta^2)/2 g^2 score with the exact score of N(mu, s^2) data."""
    tt = torch.full((x.shape[0],), float(t), dtype=F64)
    a, sg = col(sde.alpha(tt), x), col(sde.sigma(tt), x)
    score = -(x - a * MU) / (a * a * S * S + sg * sg)
    return col(sde.f(tt), x) * x - 0.5 * (1 + eta**2) * col(sde.g2(tt), x) * score


def reference_run(sde, kind, eta, x, times, seed):
    """Independent re-implementation of the documented schemes (noise z_k keyed by step k)."""
    x = x.clone()
    src = NoiseSource(seed, x.shape[0])
    for k in range(len(times) - 1):
        t0, t1 = float(times[k]), float(times[k + 1])
        dt = t1 - t0
        g0 = eta * math.sqrt(float(sde.g2(torch.tensor(t0, dtype=F64))))
        g1 = eta * math.sqrt(float(sde.g2(torch.tensor(t1, dtype=F64))))
        dw = math.sqrt(-dt) * src.normal(x.shape[1:], counter=k, dtype=F64) if eta > 0 else torch.zeros_like(x)
        f0 = reverse_drift(sde, x, t0, eta)
        if kind == "euler":
            x = x + f0 * dt + g0 * dw
        else:  # heun, both stages share dW
            pred = x + f0 * dt + g0 * dw
            x = x + 0.5 * (f0 * dt + g0 * dw + reverse_drift(sde, pred, t1, eta) * dt + g1 * dw)
    return x


def _grid_for(sde, steps=6):
    # the f/g^2 form of the reference is infinite at rectified flow's t = 1: start below
    if isinstance(sde, RectifiedFlowSDE):
        return grid(sde, steps, t_max=0.99)
    return grid(sde, steps)


@pytest.mark.parametrize("solver_name", list(SOLVERS))
@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_steps_match_reference_scheme(sde_name, solver_name):
    sde = make_sde(sde_name)
    solver = SOLVERS[solver_name]()
    times = _grid_for(sde)
    gen = torch.Generator().manual_seed(1)
    t0 = torch.tensor(float(times[0]), dtype=F64)
    x_T = MU * sde.alpha(t0) + math.sqrt(float(sde.alpha(t0) ** 2 * S * S + sde.sigma(t0) ** 2)) * torch.randn(
        5, 2, 3, generator=gen, dtype=F64)
    model = Model(GaussianNet(sde, "x0", MU, S), sde, predicts="x0")
    got = sample(model, solver, x_T=x_T, grid=times, seed=17, final_denoise=False)
    kind = "heun" if isinstance(solver, Heun) else "euler"
    expected = reference_run(sde, kind, solver.eta, x_T, times, seed=17)
    scale = expected.abs().max().item() + 1.0
    assert (got - expected).abs().max().item() <= 1e-10 * scale, (got - expected).abs().max()
    # the run did move the state (a solver that returns x_T unchanged fails above, but make it explicit)
    assert (got - x_T).abs().max().item() > 1e-3


@pytest.mark.parametrize("solver_name", ["Euler", "Heun", "EulerMaruyama", "Heun(eta=1)"])
@pytest.mark.parametrize("sde_name", ["VP", "VE", "EDM", "RectifiedFlow"])
def test_result_does_not_depend_on_the_parametrisation(sde_name, solver_name):
    sde = make_sde(sde_name)
    times = _grid_for(sde, 8)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64) * float(sde.sigma(times[0]))
    results = {}
    for predicts in PREDICTIONS:
        model = Model(GaussianNet(sde, predicts, MU, S), sde, predicts=predicts)
        results[predicts] = sample(model, SOLVERS[solver_name](), x_T=x_T, grid=times, seed=3)
    ref = results["x0"]
    for predicts, x in results.items():
        assert torch.allclose(x, ref, rtol=1e-8, atol=1e-8), (predicts, (x - ref).abs().max())


def test_rectified_flow_ode_starts_at_alpha_zero():
    """ODE solvers start rectified flow at t = 1 (alpha = 0) with a velocity or x0 network; one
    Euler step from t = 1 is x + dt * velocity, velocity = -x0 + eps, eps = x there."""
    sde = RectifiedFlowSDE()
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    times = torch.tensor([1.0, 0.6], dtype=F64)
    for predicts in ("velocity", "x0", "v"):
        model = Model(GaussianNet(sde, predicts, MU, S), sde, predicts=predicts)
        got = sample(model, Euler(), x_T=x_T, grid=times, final_denoise=False)
        x0_hat = torch.full_like(x_T, MU)  # alpha = 0: the denoiser returns the data mean
        expected = x_T + (-0.4) * (-x0_hat + x_T)
        assert torch.allclose(got, expected, atol=1e-12), predicts
    # and the full default grid from t = 1 works for Heun too
    model = Model(GaussianNet(sde, "velocity", MU, S), sde, predicts="velocity")
    out = sample(model, Heun(), shape=(8, 2), steps=10, dtype=F64)
    assert torch.isfinite(out).all()


def test_solver_attributes():
    assert (Euler().convergence_order, Euler().nfe_per_step, Euler().stochastic) == (1, 1, False)
    assert Euler(eta=0.5).stochastic
    assert (EulerMaruyama().convergence_order, EulerMaruyama().stochastic, EulerMaruyama().eta) == (1, True, 1.0)
    assert (EulerMaruyama().convergence_mode, Euler().convergence_mode) == ("weak", "pathwise")
    assert not EulerMaruyama(eta=0).stochastic
    assert (Heun().convergence_order, Heun().nfe_per_step, Heun().stochastic) == (2, 2, False)
    assert (Heun(eta=1).convergence_order, Heun(eta=1).convergence_mode, Heun(eta=1).stochastic) == (1, "weak", True)
    assert Heun().convergence_order == 2  # the stochastic instance did not change the class attribute
    assert not hasattr(Heun(), "order") and not hasattr(Euler(), "order")  # neither takes an order
    assert repr(Heun(eta=0.5)) == "Heun(eta=0.5)" and repr(EulerMaruyama()) == "EulerMaruyama(eta=1)"
    for solver in (Euler(), Heun(), EulerMaruyama()):
        assert isinstance(solver, Solver) and solver.gaussian_only


@pytest.mark.parametrize("make", [lambda: Euler(eta=1.5), lambda: EulerMaruyama(eta=-0.1), lambda: Heun(eta=2),
                                  lambda: Heun(eta=True), lambda: Euler(eta="0.5"), lambda: Heun(eta=float("nan"))])
def test_eta_outside_unit_interval(make):
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        make()


class _OU(SDE):
    """A non-Gaussian-family SDE object (only drift/diffusion): dx = -x dt + dw."""

    def drift(self, x, t):
        return -x

    def diffusion(self, x, t):
        return torch.ones_like(x)


def _every_solver():
    from samplers.cli.registry import quality_solvers

    return quality_solvers()  # every exported solver with its defaults, plus the parametrised variants


@pytest.mark.parametrize("label, make", _every_solver(), ids=[label for label, _ in _every_solver()])
def test_gaussian_only_solvers_refuse_other_sdes(label, make):
    """Every solver of the library that needs alpha/sigma/log-SNR refuses a non-Gaussian SDE by name."""
    solver = make()
    assert solver.gaussian_only, label
    model = Model(lambda x, t: -x, _OU(0.01, 1.0), predicts="score")
    grid = None if getattr(solver, "adaptive", False) else torch.tensor([1.0, 0.5, 0.01], dtype=F64)
    with pytest.raises(ValueError, match=f"{type(solver).__name__} needs a Gaussian-marginal SDE"):
        sample(model, solver, shape=(2, 2), grid=grid)


def test_gaussian_only_models_refuse_other_sdes():
    sde = _OU(0.01, 1.0)
    with pytest.raises(ValueError, match="needs a Gaussian-marginal SDE"):
        Model(lambda x, t: x, sde, predicts="eps")


def test_stochastic_solvers_use_step_keyed_noise():
    """Same seed -> same result; another seed -> another result; eta = 0 ignores the seed."""
    sde = make_sde("VP")
    model = Model(GaussianNet(sde, "x0", MU, S), sde, predicts="x0")
    for solver in (EulerMaruyama(), Heun(eta=1.0)):
        a = sample(model, solver, shape=(4, 3), steps=5, seed=1, dtype=F64)
        assert torch.equal(a, sample(model, solver, shape=(4, 3), steps=5, seed=1, dtype=F64))
        assert (a - sample(model, solver, shape=(4, 3), steps=5, seed=2, dtype=F64)).abs().min() > 0
    x_T = torch.randn(4, 3, dtype=F64)
    one = sample(model, Euler(), x_T=x_T, steps=5, seed=1)
    assert torch.equal(one, sample(model, Euler(), x_T=x_T, steps=5, seed=2))


# -- one vocabulary: order, convergence_order/convergence_mode, eta -------------------------------------------

def _exported_solvers():
    import inspect

    import solvers

    out = []
    for name in solvers.__all__:
        cls = getattr(solvers, name)
        if isinstance(cls, type) and issubclass(cls, Solver) and cls not in (Solver, solvers.AdaptiveSolver):
            out.append(cls)
    return out, inspect


@pytest.mark.parametrize("cls", _exported_solvers()[0], ids=lambda c: c.__name__)
def test_order_is_the_constructors_and_convergence_is_declared(cls):
    """``.order`` exists exactly where the constructor takes ``order`` and equals it; every solver declares
    an int convergence_order and a convergence_mode, pathwise or weak (weak exactly when it draws noise)."""
    inspect = _exported_solvers()[1]
    params = inspect.signature(cls).parameters
    solver = cls()
    if "order" in params:
        assert solver.order == params["order"].default
    else:
        assert not hasattr(solver, "order"), cls
    assert isinstance(solver.convergence_order, int)
    # 0 only for Restart with restarts: its backward passes keep a fixed number of steps (tests/test_orders.py)
    assert solver.convergence_order >= (0 if isinstance(solver, Restart) and solver.stochastic else 1), cls
    assert solver.convergence_mode == ("weak" if solver.stochastic else "pathwise"), cls


def test_eta_is_the_diffusion_scale_everywhere():
    """eta scales the reverse diffusion to eta g in every solver that takes it: the score term of the
    drift is 1 + eta^2 times the ODE's (the declared score_weight)."""
    from solvers import DPMSolverSDE, JacobiEulerMaruyama

    for make in (EulerMaruyama, Euler, Heun, JacobiEulerMaruyama, DPMSolverSDE):
        for eta in (0.0, 0.3, 1.0):
            assert make(eta=eta).score_weight == pytest.approx(1.0 + eta * eta, rel=1e-15), (make, eta)
    assert DPMSolverSDE.k_diffusion(eta=0.09).score_weight == 1.09
