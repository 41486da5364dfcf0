"""samplers.sample_grad: gradients through sampling against finite differences (float64), the
memory-constant mode against plain backprop (values and saved-tensor memory, 10 vs 100 steps), the
AdjointDEIS-1 continuous adjoint's first-order convergence to the exact flow's gradient, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, GaussianNet, fitted_order, gaussian_marginal, make_sde

from samplers import Model, grid, problems, sample, sample_grad
from samplers.gradients import SavedTensorMeter
from sde import VESDE, VPSDE
from solvers import DPMSolver, DPMSolverSDE, Euler, EulerMaruyama, Reversible


class ScaledNet(torch.nn.Module):
    """The exact eps of the 2-D mixture, scaled by a learnable factor and shifted by a conditioning
    input: a network with a parameter and a differentiable condition."""

    def __init__(self, sde, scale=0.9):
        super().__init__()
        self.exact = problems.mixture_2d().net(sde, "eps")
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=F64))

    def forward(self, x, t, shift=None):
        out = self.scale * self.exact(x, t)
        return out if shift is None else out + 0.1 * torch.tanh(shift) * t.to(x.dtype)[:, None]


def _setup(sde_name, batch=6):
    sde = VPSDE() if sde_name == "VP" else VESDE()
    net = ScaledNet(sde)
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_sample((batch, 2), generator=g).to(F64)
    weights = torch.randn(batch, 2, generator=g, dtype=F64)
    direction = torch.randn(batch, 2, generator=g, dtype=F64)
    return sde, net, Model(net, sde, "eps"), x_T, weights, direction


def _central_difference(f, eps):
    """Fourth-order central difference of f at 0 (truncation ~eps^4, rounding ~1e-16/eps)."""
    return (-f(2 * eps) + 8 * f(eps) - 8 * f(-eps) + f(-2 * eps)) / (12 * eps)


@pytest.mark.parametrize("sde_name", ["VP", "VE"])
@pytest.mark.parametrize("solver", [Reversible("heun", predicts="eps"), Reversible("euler", predicts="x0"),
                                    Reversible(eta=1)], ids=repr)
def test_gradients_match_finite_differences(sde_name, solver):
    sde, net, model, x_T, weights, direction = _setup(sde_name)
    steps = 12

    def loss(x, scale=0.9):
        with torch.no_grad():
            net.scale.fill_(scale)
            out = sample_grad(model, solver, x, steps=steps, mode="backprop", seed=4)
            net.scale.fill_(0.9)
        return float((weights * out).sum())

    eps_x = 1e-4 * float(x_T.abs().max())
    fd_x = _central_difference(lambda e: loss(x_T + e * direction), eps_x)
    fd_scale = _central_difference(lambda e: loss(x_T, 0.9 + e), 1e-4)
    for mode in ("backprop", "reversible"):
        net.zero_grad()
        x = x_T.clone().requires_grad_(True)
        out = sample_grad(model, solver, x, steps=steps, mode=mode, seed=4)
        (weights * out).sum().backward()
        grad_x = float((x.grad * direction).sum())
        assert abs(grad_x - fd_x) < 1e-6 * abs(fd_x), (mode, grad_x, fd_x)
        assert abs(float(net.scale.grad) - fd_scale) < 1e-6 * abs(fd_scale), (mode, float(net.scale.grad), fd_scale)


@pytest.mark.parametrize("solver", [Reversible("midpoint"), Reversible(eta=1)], ids=repr)
def test_memory_constant_mode_equals_backprop(solver):
    """Same gradients for x_T, x_hat_T, a parameter and a conditioning tensor, and the final x_hat."""
    sde, net, model, x_T, weights, _ = _setup("VP")
    shift = torch.linspace(-1, 1, 12, dtype=F64).reshape(6, 2)
    results = {}
    for mode in ("backprop", "reversible"):
        net.zero_grad()
        x = x_T.clone().requires_grad_(True)
        x_hat = (x_T + 0.05).requires_grad_(True)
        cond = {"shift": shift.clone().requires_grad_(True)}
        out, state = sample_grad(model, solver, x, x_hat_T=x_hat, steps=15, mode=mode, cond=cond, seed=2,
                                 return_state=True)
        ((weights * out).sum() + (out * state["x_hat"]).sum()).backward()
        results[mode] = [out.detach(), state["x_hat"].detach(), x.grad, x_hat.grad, net.scale.grad.clone(),
                         cond["shift"].grad]
    for a, b in zip(results["backprop"], results["reversible"]):
        assert b is not None and float(b.abs().max()) > 0
        # the pair is rebuilt by inverse steps: equal up to the reconstruction's rounding, which the SDE
        # amplifies (see solvers.reversible; measured 2.4e-7 relative for the SDE, 1e-12 for the ODE)
        rtol = 1e-6 if solver.stochastic else 1e-10
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * 1e-2)


def test_params_of_a_plain_function_network():
    """A network that is a closure, not an nn.Module: ``params`` names its tensors for the
    memory-constant mode (backprop finds them by itself)."""
    sde = VESDE()
    exact = problems.mixture_2d().net(sde, "eps")
    weight = torch.tensor([1.1, 0.9], dtype=F64, requires_grad=True)

    def net(x, t):
        return exact(x, t) * weight

    model = Model(net, sde, "eps")
    x_T = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(1)).to(F64)
    grads = {}
    for mode, params in (("backprop", None), ("reversible", [weight])):
        weight.grad = None
        sample_grad(model, Reversible("heun"), x_T, steps=10, mode=mode, params=params).square().sum().backward()
        grads[mode] = weight.grad.clone()
    assert float(grads["backprop"].abs().min()) > 0
    torch.testing.assert_close(grads["reversible"], grads["backprop"], rtol=1e-7, atol=0)


def test_memory_constant_mode_is_flat_in_steps():
    """Bytes autograd holds for backward, 10 vs 100 steps: plain backprop grows about 10x, the
    memory-constant mode holds one step's graph whatever the number of steps (measured: 0.266 vs 0.272 MiB
    at batch 256; 2.6 vs 25.8 MiB with backprop)."""
    sde = VPSDE()
    model = Model(problems.mixture_2d().net(sde, "eps"), sde, "eps")
    x_T = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(0)).to(F64)
    peaks = {}
    for mode in ("backprop", "reversible"):
        for steps in (10, 100):
            with SavedTensorMeter() as meter:
                x = x_T.clone().requires_grad_(True)
                sample_grad(model, Reversible(), x, steps=steps, mode=mode, final_denoise=False).sum().backward()
            peaks[mode, steps] = meter.peak
    assert peaks["reversible", 10] > 0
    assert abs(peaks["reversible", 100] / peaks["reversible", 10] - 1) < 0.2, peaks
    assert peaks["backprop", 100] > 8 * peaks["backprop", 10], peaks
    assert peaks["backprop", 10] > 5 * peaks["reversible", 10], peaks


@pytest.mark.parametrize("solver", [DPMSolver(order=1), Euler()], ids=repr)
def test_adjoint_converges_to_the_exact_flow_gradient(solver):
    """Gaussian data N(0.7, 0.5^2): the probability-flow map is affine with slope
    sqrt(var_0/var_T), so dL/dx_T is known exactly; AdjointDEIS-1 converges to it with order 1.  Its
    error constant is large (relative error 0.56, 0.31, 0.17 at 50, 100, 200 steps on VP; the same
    on VE): the eps-Jacobian term, of size 1/sigma at high noise, is taken explicitly at the step's
    data end."""
    sde = VPSDE()
    model = Model(GaussianNet(sde, "eps"), sde, "eps")
    x_T = torch.tensor([[0.3], [-1.2]], dtype=F64)
    steps, errors = [50, 100, 200], []
    for n in steps:
        times = grid(sde, n)
        exact = math.sqrt(gaussian_marginal(sde, 0.7, 0.5, float(times[-1]))[1]
                          / gaussian_marginal(sde, 0.7, 0.5, float(times[0]))[1])
        x = x_T.clone().requires_grad_(True)
        sample_grad(model, solver, x, grid=times, mode="adjoint", final_denoise=False).sum().backward()
        errors.append(float((x.grad - exact).abs().max()) / exact)
    assert errors[-1] < 0.2, errors
    assert 0.8 < fitted_order(steps, errors) < 1.3, errors


@pytest.mark.parametrize("sde_name", ["VP", "VE"])
@pytest.mark.parametrize("solver", [EulerMaruyama(), DPMSolverSDE(order=1, eta=0.5)], ids=repr)
def test_sde_adjoint_converges_to_the_pathwise_gradient(sde_name, solver):
    """Along a sampled Brownian path of the reverse-time family dx = [f x - (1 + e)/2 g^2 score] dt + ...
    (e = eta^2, the solver's score_weight - 1) on Gaussian data, dx_0/dx_T does not depend on the
    path: (alpha_T/alpha_0)^e (var_0/var_T)^((1+e)/2).  The adjoint (score term weighted 1 + e)
    converges to it with order 1 (measured 0.24, 0.13 relative at 400, 800 steps for eta = 1)."""
    sde = VPSDE() if sde_name == "VP" else VESDE()
    model = Model(GaussianNet(sde, "eps"), sde, "eps")
    e = solver.eta**2
    assert solver.score_weight == pytest.approx(1.0 + e, rel=1e-15)
    x_T = torch.tensor([[0.3], [-1.2]], dtype=F64)
    steps, errors = [200, 400, 800], []
    for n in steps:
        times = grid(sde, n)
        a0, a1 = float(sde.alpha(times[-1])), float(sde.alpha(times[0]))
        v0 = gaussian_marginal(sde, 0.7, 0.5, float(times[-1]))[1]
        v1 = gaussian_marginal(sde, 0.7, 0.5, float(times[0]))[1]
        exact = (a1 / a0) ** e * (v0 / v1) ** ((1 + e) / 2)
        x = x_T.clone().requires_grad_(True)
        sample_grad(model, solver, x, grid=times, mode="adjoint", final_denoise=False, seed=3).sum().backward()
        errors.append(float((x.grad - exact).abs().max()) / exact)
    assert errors[-1] < 0.15, errors
    assert 0.75 < fitted_order(steps, errors) < 1.3, errors


def test_adjoint_parameter_gradient_converges():
    """The adjoint's parameter gradient approaches the exact flow's (finite differences of a
    200-step DPM-Solver-3 solve, error < 1e-5) with order 1."""
    sde, net, model, x_T, weights, _ = _setup("VP")

    def flow_loss(scale):
        with torch.no_grad():
            net.scale.fill_(scale)
            out = sample_grad(model, DPMSolver(order=3), x_T, steps=200, mode="adjoint", final_denoise=False)
            net.scale.fill_(0.9)
        return float((weights * out).sum())

    exact = _central_difference(lambda e: flow_loss(0.9 + e), 1e-3)
    errors = []
    for n in (50, 100, 200):
        net.zero_grad()
        out = sample_grad(model, DPMSolver(order=1), x_T.clone().requires_grad_(True), steps=n, mode="adjoint",
                          final_denoise=False)
        (weights * out).sum().backward()
        errors.append(abs(float(net.scale.grad) - exact) / abs(exact))
    assert errors[-1] < 0.1, errors
    assert errors[0] > errors[1] > errors[2], errors


def test_errors():
    sde, net, model, x_T, _, _ = _setup("VP")
    with pytest.raises(ValueError, match="mode must be 'backprop', 'reversible' or 'adjoint', got 'checkpoint'"):
        sample_grad(model, Reversible(), x_T, steps=3, mode="checkpoint")
    with pytest.raises(ValueError, match="mode='backprop' differentiates through solvers.Reversible"):
        sample_grad(model, Euler(), x_T, steps=3, mode="backprop")
    with pytest.raises(ValueError, match="mode='adjoint' needs the drift the solver follows"):
        sample_grad(model, Reversible(eta=1), x_T, steps=3, mode="adjoint")
    with pytest.raises(ValueError, match="x_hat_T/return_state concern solvers.Reversible"):
        sample_grad(model, Euler(), x_T, steps=3, x_hat_T=x_T)
    with pytest.raises(ValueError, match="x_T must be float32 or float64"):
        sample_grad(model, Reversible(), x_T.half(), steps=3)
    with pytest.raises(ValueError, match="pass exactly one of steps"):
        sample_grad(model, Reversible(), x_T)
    with pytest.raises(TypeError, match="model must be a samplers.Model"):
        sample_grad(net, Reversible(), x_T, steps=3)
    with pytest.raises(ValueError, match=r"solver_state\['x_hat'\] must be a tensor shaped like"):
        sample_grad(model, Reversible(), x_T, steps=3, x_hat_T=x_T[:2])
    from sde.dirichlet import DirichletSDE
    from solvers.simplex import JacobiEulerMaruyama

    simplex = Model(lambda x, t: torch.zeros_like(x), DirichletSDE(3), "score")
    with pytest.raises(ValueError, match="mode='adjoint' .* needs a Gaussian-marginal SDE"):
        sample_grad(simplex, JacobiEulerMaruyama(eta=0.0), torch.full((2, 2), 0.3, dtype=F64), steps=4)
    with pytest.raises(ValueError, match="x_T must be finite"):
        sample_grad(model, Reversible(), torch.full_like(x_T, float("nan")), steps=3)
    # rectified flow reaches alpha = 0 at t = 1, where the AdjointDEIS-1 rule has no finite coefficients:
    # refused rather than a NaN gradient; a grid ending below t = 1 works
    rf = make_sde("RectifiedFlow")
    rf_model = Model(GaussianNet(rf, "velocity"), rf, "velocity")
    x = torch.tensor([[0.3], [-1.2]], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="mode='adjoint' needs alpha > 0 at every grid time.*t=1 "):
        sample_grad(rf_model, Euler(), x, steps=10, final_denoise=False)
    sample_grad(rf_model, Euler(), x, grid=torch.linspace(0.99, rf.t_min, 11, dtype=F64),
                final_denoise=False).sum().backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("sde_name", ["VP", "VE"])
def test_float32_runs_carry_the_pair_in_float64(sde_name):
    """A float32 run carries the pair in float64, as sample() does: the same samples as sample(), and the
    memory-constant mode's rebuilt pair still gives backprop's gradient for Rex's SDE, whose inverse has no
    float32 digits (with the pair in float32 the two gradients differed by 100%)."""
    sde, net, model, x_T, weights, _ = _setup(sde_name)
    solver = Reversible(eta=1)
    x32 = x_T.float()
    out = sample_grad(model, solver, x32, steps=30, seed=3, final_denoise=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sample(model, solver, x_T=x32, steps=30, seed=3, final_denoise=False),
                               rtol=0, atol=0)
    grads = {}
    for mode in ("backprop", "reversible"):
        x = x32.clone().requires_grad_(True)
        (weights.float() * sample_grad(model, solver, x, steps=30, mode=mode, seed=3)).sum().backward()
        grads[mode] = x.grad
    assert grads["reversible"].dtype == torch.float32 and float(grads["backprop"].abs().max()) > 0
    torch.testing.assert_close(grads["reversible"], grads["backprop"], rtol=1e-4, atol=1e-6)


def test_default_modes_and_float32():
    sde, net, model, x_T, weights, _ = _setup("VE")
    x = x_T.float().requires_grad_(True)
    out = sample_grad(model, Reversible(), x, steps=8)  # mode "reversible"
    assert out.dtype == torch.float32
    (weights.float() * out).sum().backward()
    assert x.grad.dtype == torch.float32 and bool(torch.isfinite(x.grad).all())
    x64 = x_T.clone().requires_grad_(True)
    (weights * sample_grad(model, Reversible(), x64, steps=8, mode="backprop")).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-5)


def test_adjoint_and_restart_refuse_a_deterministic_step_that_is_not_the_ode():
    """OptimalReverse(noise=False) draws no noise but steps to the posterior mean, not along the
    probability-flow ODE: it declares no score_weight, so the adjoint (which differentiates the ODE's
    drift) refuses it instead of returning another process's gradient, and Restart refuses it as its
    ODE solver.  A real ODE solver declares 1."""
    from solvers import OptimalReverse, Restart

    solver = OptimalReverse(noise=False)
    assert not solver.stochastic and solver.score_weight is None
    assert Euler().score_weight == 1.0 and DPMSolver().score_weight == 1.0
    sde = VPSDE()
    x_T = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    model = Model(lambda x, t: 0.5 * x, sde, predicts="x0")
    with pytest.raises(ValueError, match="mode='adjoint' needs the drift the solver follows"):
        sample_grad(model, solver, x_T, steps=4, mode="adjoint")
    with pytest.raises(ValueError, match="does not follow the probability-flow ODE"):
        Restart(ode_solver=solver)
