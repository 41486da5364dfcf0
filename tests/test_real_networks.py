"""The library used as a user uses it: real ``nn.Module`` networks (tests/real_networks.py: time
embedding, GroupNorm, parameters that require grad, a class label as a keyword) in float32, float16
and bfloat16, called in grad mode (no ``torch.no_grad()`` around the call), through every solver on
every SDE it accepts, for states (B,), (B, d) and (B, C, H, W).

Every run must: return finite samples in the network's dtype, keep no autograd graph
(``requires_grad`` False, no ``grad_fn``), leave the parameters' ``.grad`` at None, and give bitwise
the result of the same call under ``torch.no_grad()``.  The pairs a solver refuses by design (a
coefficient singular where alpha = 0, at the start of a rectified-flow grid) are listed and must be
refused with that reason, not skipped.  Also: ``invert`` and ``likelihood`` in grad mode, the
network's dtype and device as the run's default (defect 14) and what the library does and does not
promise across batch sizes (defect 13).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from real_networks import CLASSES, real_network

import solvers
from samplers import Model, NoiseSource, invert, likelihood, sample, sample_grad
from samplers.noise import STREAM_PRIOR
from sde import (
    EDMSDE,
    VESDE,
    VPSDE,
    CosineVPSDE,
    DirichletSDE,
    DiscreteVPSDE,
    MeanRevertingSDE,
    RectifiedFlowSDE,
    SubVPSDE,
)
from solvers import (
    ERSDE,
    AdaptiveDPMSolver,
    AdaptiveEM,
    AdaptiveODE,
    AncestralSampling,
    DPMSolver,
    DPMSolverSDE,
    Euler,
    EulerMaruyama,
    EVODiff,
    Heun,
    JacobiEulerMaruyama,
    Langevin,
    OptimalReverse,
    PredictorCorrector,
    Restart,
    ReverseDiffusion,
    Reversible,
    UniPC,
)

ROOT = Path(__file__).resolve().parents[1]
HALF = (torch.float16, torch.bfloat16)
IMAGE = (2, 3, 8, 8)
VECTOR = (3, 2)
SCALAR = (3,)
STEPS = 4

#: every solver of the library (see test_every_solver_is_covered), in its configurations that differ in
#: what they integrate: label -> factory.  Adaptive tolerances are loose: the runs check plumbing, not accuracy.
SOLVERS = {
    "Euler": lambda: Euler(),
    "EulerMaruyama": lambda: EulerMaruyama(),
    "Heun": lambda: Heun(),
    "Heun-sde": lambda: Heun(eta=1.0),
    "DPM1": lambda: DPMSolver(1),
    "DPM2": lambda: DPMSolver(2),
    "DPM3": lambda: DPMSolver(3),
    "DPM3-singlestep": lambda: DPMSolver(3, variant="singlestep"),
    "DPM2-noise": lambda: DPMSolver(2, predicts="eps"),
    "UniPC": lambda: UniPC(),
    "UniPC3-bh1": lambda: UniPC(3, variant="bh1"),
    "UniPC-noise": lambda: UniPC(2, predicts="eps"),
    "DPMSolverSDE1": lambda: DPMSolverSDE(1),
    "DPMSolverSDE2": lambda: DPMSolverSDE(2),
    "DPMSolverSDE3-heun": lambda: DPMSolverSDE(3, variant="heun"),
    "ERSDE1": lambda: ERSDE(1),
    "ERSDE3": lambda: ERSDE(),
    "EVODiff": lambda: EVODiff(),
    "ReverseDiffusion": lambda: ReverseDiffusion(),
    "AncestralSampling": lambda: AncestralSampling(),
    "OptimalReverse": lambda: OptimalReverse(),
    "PC": lambda: PredictorCorrector(),
    "PC-EM-Langevin": lambda: PredictorCorrector(EulerMaruyama(), Langevin()),
    # intervals given: Restart() without them is another defect of issue 14 (4)
    "Restart": lambda: Restart(intervals=[(0.1, 1.0, 1, 1)]),
    "Restart-DPM2": lambda: Restart(ode_solver=DPMSolver(2), intervals=[(0.1, 1.0, 1, 1)]),
    "Reversible": lambda: Reversible(),
    "Reversible-noise": lambda: Reversible(predicts="eps"),
    "Reversible-sde": lambda: Reversible("heun", eta=1),
    "AdaptiveDPMSolver": lambda: AdaptiveDPMSolver(rtol=0.1),
    "AdaptiveEM": lambda: AdaptiveEM(rtol=0.3),
    "AdaptiveODE": lambda: AdaptiveODE(rtol=1e-2, atol=1e-2),
}

#: every Gaussian SDE, each with the parametrisation its networks usually have: label -> (SDE factory,
#: predicts, time_input).  All five predictions and both time conventions are covered.
SDES = {
    "VP": (lambda: VPSDE(), "eps", "sde"),
    "SubVP": (lambda: SubVPSDE(), "eps", "sde"),
    "VE": (lambda: VESDE(), "score", "sde"),
    "EDM": (lambda: EDMSDE(), "x0", "sde"),
    "CosineVP": (lambda: CosineVPSDE(), "v", "sde"),
    "DiscreteVP": (lambda: DiscreteVPSDE(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)), "eps",
                   "discrete"),
    "RectifiedFlow": (lambda: RectifiedFlowSDE(), "velocity", "sde"),
    "MeanReverting": (lambda: MeanRevertingSDE(), "eps", "sde"),
}

#: (SDE, solver) pairs refused by design, with the reason: on rectified flow the grid starts at t = 1 where
#: alpha = 0, and these integrate a form with a coefficient that is infinite there.  Each is refused with a
#: message naming alpha = 0, and runs once the grid starts below t = 1 (test_refused_pairs_...).
REFUSED = {
    ("RectifiedFlow", "EulerMaruyama"): "the reverse SDE's drift (the score, 1/sigma^2 x0 alpha) at alpha = 0",
    ("RectifiedFlow", "Heun-sde"): "the reverse SDE at alpha = 0",
    ("RectifiedFlow", "PC-EM-Langevin"): "its predictor is the reverse SDE at alpha = 0",
    ("RectifiedFlow", "DPM2-noise"): "the noise-prediction form divides by alpha",
    ("RectifiedFlow", "UniPC-noise"): "the noise-prediction form divides by alpha",
    ("RectifiedFlow", "UniPC3-bh1"): "bh1's B(h) = h is infinite on a first step from log-SNR -inf",
    ("RectifiedFlow", "Reversible-noise"): "the noise-prediction form divides by alpha",
    ("RectifiedFlow", "Reversible-sde"): "the SDE form's weight sigma^2/alpha is infinite at alpha = 0",
    ("RectifiedFlow", "AdaptiveEM"): "the reverse SDE at alpha = 0",
    ("RectifiedFlow", "EVODiff"): "its first probe's step ratio is in log-SNR, infinite from alpha = 0",
}


def _accepted(sde_name, solver_name):
    return (sde_name, solver_name) not in REFUSED


def _sde_case(name):
    factory, predicts, time_input = SDES[name]
    return factory(), predicts, time_input


def _cond(sde, shape, dtype):
    """A class label per sample (a keyword the network takes), and the mean state of a mean-reverting
    SDE in the network's dtype (cond goes to the network as given)."""
    cond = {"label": torch.arange(shape[0]) % CLASSES}
    if isinstance(sde, MeanRevertingSDE):
        cond["mu"] = torch.linspace(-0.5, 0.5, torch.Size(shape).numel()).reshape(shape).to(dtype)
    return cond


def _call(solver, model, shape, cond, **kw):
    if getattr(solver, "adaptive", False):
        return sample(model, solver, shape=shape, seed=3, cond=cond, **kw)
    return sample(model, solver, shape=shape, steps=STEPS, seed=3, cond=cond, **kw)


def _check_graph_free_run(sde_name, solver_name, shape, dtype):
    """The run in grad mode: finite, in the network's dtype, no graph, no .grad, and bitwise the
    no_grad run.  The state's dtype is not passed: it comes from the network's parameters."""
    sde, predicts, time_input = _sde_case(sde_name)
    net = real_network(shape, dtype)
    model = Model(net, sde, predicts=predicts, time_input=time_input)
    cond = _cond(sde, shape, dtype)
    assert torch.is_grad_enabled() and all(p.requires_grad for p in net.parameters())
    out = _call(SOLVERS[solver_name](), model, shape, cond)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert bool(torch.isfinite(out).all())
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        quiet = _call(SOLVERS[solver_name](), model, shape, cond)
    assert torch.equal(out, quiet)


# -- every solver, every SDE it accepts, float32 images ---------------------------------------------------------
#: the refused pairs are left out here: test_refused_pairs_name_alpha_0_and_run_below_it checks them
@pytest.mark.parametrize("sde_name, solver_name", [pytest.param(sde, solver, id=f"{sde}-{solver}") for sde in SDES
                                                   for solver in SOLVERS if _accepted(sde, solver)])
def test_every_solver_on_every_sde_in_grad_mode(sde_name, solver_name):
    _check_graph_free_run(sde_name, solver_name, IMAGE, torch.float32)


# -- half precision: every solver on VP, every other SDE with a multistep, a stochastic and an adaptive solver ---
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_every_solver_with_a_half_precision_network(solver_name, dtype):
    _check_graph_free_run("VP", solver_name, IMAGE, dtype)


# -- a budget of calls on a grid ending at sigma = 0 (sample(..., nfe=N)), where lower_order_final=None resolves to
# False: the multistep solvers with a real network in grad mode, in every float dtype
@pytest.mark.parametrize("dtype", (torch.float32,) + HALF, ids=str)
@pytest.mark.parametrize("solver_name", ["DPM2", "UniPC", "DPMSolverSDE2"])
def test_nfe_runs_to_sigma_0_with_a_real_network(solver_name, dtype):
    sde, predicts, time_input = _sde_case("VP")
    net = real_network(IMAGE, dtype)
    model = Model(net, sde, predicts=predicts, time_input=time_input)
    cond = _cond(sde, IMAGE, dtype)
    solver = SOLVERS[solver_name]()
    assert solver.lower_order_final is None
    out, info = sample(model, solver, shape=IMAGE, nfe=5, seed=3, cond=cond, return_info=True)
    assert info.nfe == 5 and not info.final_denoise
    assert out.dtype == dtype and tuple(out.shape) == IMAGE and bool(torch.isfinite(out).all())
    assert not out.requires_grad and out.grad_fn is None and all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(out, sample(model, solver, shape=IMAGE, nfe=5, seed=3, cond=cond))
    explicit = solver.for_grid(ends_at_zero=True)
    assert explicit.lower_order_final is False and solver.lower_order_final is None
    assert torch.equal(out, sample(model, explicit, shape=IMAGE, nfe=5, seed=3, cond=cond))


#: the SDEs besides VP, each with one of the half dtypes (alternating), to keep the file fast
_HALF_SDES = [pytest.param(name, HALF[i % 2], id=f"{name}-{HALF[i % 2]}")
              for i, name in enumerate(name for name in SDES if name != "VP")]


@pytest.mark.parametrize("solver_name", ["DPM2", "ERSDE3", "AdaptiveDPMSolver"])
@pytest.mark.parametrize("sde_name, dtype", _HALF_SDES)
def test_every_sde_with_a_half_precision_network(sde_name, dtype, solver_name):
    _check_graph_free_run(sde_name, solver_name, IMAGE, dtype)


# -- states (B,) (in bfloat16) and (B, d) (in float32) ----------------------------------------------------------
@pytest.mark.parametrize("shape, dtype", [(SCALAR, torch.bfloat16), (VECTOR, torch.float32)],
                         ids=("B-bfloat16", "B-d-float32"))
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_every_solver_on_scalar_and_vector_states(solver_name, shape, dtype):
    _check_graph_free_run("CosineVP", solver_name, shape, dtype)


def test_every_solver_is_covered():
    """A solver added to the library without a place in this fixture fails here."""
    covered = {type(factory()) for factory in SOLVERS.values()} | {JacobiEulerMaruyama}
    exported = {obj for name in solvers.__all__ if inspect.isclass(obj := getattr(solvers, name))
                and issubclass(obj, solvers.SolverBase) and not inspect.isabstract(obj)
                and obj not in (solvers.SolverBase, solvers.Solver, solvers.AdaptiveSolver)}
    assert exported - covered == set()


# -- the pairs refused by design ---------------------------------------------------------------------------------
_REFUSED_CASES = [pytest.param(*pair, id="-".join(pair)) for pair in REFUSED]
# AdaptiveDPMSolver among them: it reported "NaN or Inf at t=1" instead of the refusal (issue 14 defect 11)
_REFUSED_CASES += [pytest.param("RectifiedFlow-eps", name, id=f"RectifiedFlow-eps-{name}") for name in SOLVERS
                   if name not in ("ReverseDiffusion", "PC")]


@pytest.mark.parametrize("sde_name, solver_name", _REFUSED_CASES)
def test_refused_pairs_name_alpha_0_and_run_below_it(sde_name, solver_name):
    """Refused before any network call with the reason (alpha = 0 at the grid's first time t = 1), and
    the same pair runs, graph-free, on a grid that starts below t = 1.  "RectifiedFlow-eps": an eps
    network on rectified flow, which only the score-form predictors (ReverseDiffusion, the default PC)
    integrate from t = 1 itself."""
    sde = RectifiedFlowSDE()
    predicts = "eps" if sde_name.endswith("eps") else "velocity"
    net = real_network(IMAGE)
    calls = []
    model = Model(lambda x, t, **kw: calls.append(1) or net(x, t, **kw), sde, predicts=predicts)
    cond = _cond(sde, IMAGE, torch.float32)
    with pytest.raises(ValueError, match="alpha = 0"):
        _call(SOLVERS[solver_name](), model, IMAGE, cond)
    assert calls == []
    solver = SOLVERS[solver_name]()
    x_T = torch.randn(IMAGE, generator=torch.Generator().manual_seed(0))
    if getattr(solver, "adaptive", False):
        out = sample(model, solver, x_T=x_T, grid=(0.98, sde.t_min), cond=cond)
    else:
        out = sample(model, solver, x_T=x_T, grid=torch.linspace(0.98, sde.t_min, STEPS + 1, dtype=torch.float64),
                     cond=cond)
    assert bool(torch.isfinite(out).all()) and out.grad_fn is None and not out.requires_grad


def test_the_rectified_flow_eps_pairs_that_run_from_t_1():
    for name in ("ReverseDiffusion", "PC"):
        sde = RectifiedFlowSDE()
        net = real_network(IMAGE)
        out = _call(SOLVERS[name](), Model(net, sde, predicts="eps"), IMAGE, _cond(sde, IMAGE, torch.float32))
        assert bool(torch.isfinite(out).all()) and out.grad_fn is None


def test_gaussian_solvers_refuse_the_dirichlet_sde_and_jacobi_runs_a_real_score_network():
    sde = DirichletSDE(3)
    net = real_network((4, 2))
    model = Model(net, sde, predicts="score")
    cond = {"label": torch.arange(4)}
    for name in ("DPM2", "EulerMaruyama", "AdaptiveODE", "PC", "Restart"):
        with pytest.raises(ValueError, match="Gaussian-marginal SDE"):
            _call(SOLVERS[name](), model, (4, 2), cond)
    out = sample(model, JacobiEulerMaruyama(), shape=(4, 2), steps=STEPS, seed=1, cond=cond)
    assert bool(((out > 0) & (out < 1)).all()) and out.grad_fn is None
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(out, sample(model, JacobiEulerMaruyama(), shape=(4, 2), steps=STEPS, seed=1, cond=cond))


# -- defect 1: the issue's own reproduction ------------------------------------------------------------------------
@pytest.mark.parametrize("solver_name", ["DPM2", "UniPC", "ERSDE3", "DPMSolverSDE2", "Heun", "Restart", "Euler",
                                         "EulerMaruyama"])
def test_defect_1_an_nn_linear_network_in_grad_mode(solver_name):
    """Issue 14, defect 1: in grad mode an nn.Linear network made the in-place steps raise 'addcmul(): functions
    with out=... arguments don't support automatic differentiation' (six solvers), and Euler/EulerMaruyama
    returned a tensor that requires grad, holding every step's graph."""
    linear = torch.nn.Linear(4, 4)
    out = sample(Model(lambda x, t: linear(x), VPSDE(), predicts="eps"), SOLVERS[solver_name](), shape=(3, 4),
                 steps=5)
    assert not out.requires_grad and out.grad_fn is None and linear.weight.grad is None


# -- invert, likelihood and sample_grad with a real network in grad mode -------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("solver_name", ["DPM2", "UniPC", "Reversible"])
def test_invert_in_grad_mode(solver_name, dtype):
    net = real_network(IMAGE, dtype)
    model = Model(net, VPSDE(), predicts="eps")
    cond = {"label": torch.tensor([2, 5])}
    x0 = torch.randn(IMAGE, generator=torch.Generator().manual_seed(1)).to(dtype)
    inv = invert(model, SOLVERS[solver_name](), x0, steps=STEPS, cond=cond)
    assert inv.x_T.dtype == dtype and bool(torch.isfinite(inv.x_T).all())
    assert inv.x_T.grad_fn is None and not inv.x_T.requires_grad
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(inv.x_T, invert(model, SOLVERS[solver_name](), x0, steps=STEPS, cond=cond).x_T)


@pytest.mark.parametrize("shape, divergence", [(VECTOR, "exact"), (IMAGE, "hutchinson")], ids=("B-d", "B-C-H-W"))
def test_likelihood_in_grad_mode(shape, divergence):
    """The trace needs autograd inside (vector-Jacobian products in x); none of it reaches the result or the
    parameters."""
    net = real_network(shape)
    model = Model(net, VPSDE(), predicts="eps")
    cond = {"label": torch.arange(shape[0]) % CLASSES}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.5
    solver = AdaptiveODE(rtol=1e-2, atol=1e-2)
    res = likelihood(model, x, divergence=divergence, solver=solver, cond=cond)
    for value in (res.log_p, res.bpd, res.z, res.prior_log_p, res.log_p_probes):
        assert value.grad_fn is None and not value.requires_grad
    assert bool(torch.isfinite(res.log_p).all())
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        quiet = likelihood(model, x, divergence=divergence, solver=solver, cond=cond)
    assert torch.equal(res.log_p, quiet.log_p)


def test_likelihood_with_a_bfloat16_network_in_grad_mode():
    net = real_network(VECTOR, torch.bfloat16)
    x = (torch.randn(VECTOR, generator=torch.Generator().manual_seed(2)) * 0.5).to(torch.bfloat16)
    res = likelihood(Model(net, VPSDE(), predicts="eps"), x, solver=AdaptiveODE(rtol=1e-2, atol=1e-2))
    assert bool(torch.isfinite(res.log_p).all()) and res.log_p.grad_fn is None
    assert all(p.grad is None for p in net.parameters())


def test_sample_grad_still_reaches_the_parameters_of_a_real_network():
    """Sampling builds no graph; sample_grad is the gradient path and keeps working for the same network."""
    net = real_network(IMAGE)
    model = Model(net, VPSDE(), predicts="eps")
    x_T = torch.randn(IMAGE, generator=torch.Generator().manual_seed(4), requires_grad=True)
    cond = {"label": torch.tensor([1, 3])}
    out = sample_grad(model, DPMSolver(2), x_T, steps=STEPS, cond=cond)
    out.square().sum().backward()
    assert x_T.grad is not None and bool(torch.isfinite(x_T.grad).all())
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    with torch.no_grad():
        plain = sample(model, DPMSolver(2), x_T=x_T, steps=STEPS, cond=cond)
    assert torch.allclose(out.detach(), plain, rtol=1e-5, atol=1e-5)


# -- defect 14: the network's dtype and device are the run's default -----------------------------------------------
@pytest.mark.parametrize("dtype", HALF + (torch.float64,), ids=str)
def test_defect_14_the_state_takes_the_parameters_dtype(dtype):
    """Issue 14, defect 14: a float16 module with the default float32 state failed inside the network
    ('Input type (float) and bias type (c10::Half)')."""
    net = real_network(IMAGE, dtype)
    model = Model(net, VPSDE(), predicts="eps")
    out, info = sample(model, DPMSolver(2), shape=IMAGE, steps=STEPS, return_info=True)
    assert out.dtype == dtype and info.dtype == dtype
    assert info.compute_dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out, sample(model, DPMSolver(2), shape=IMAGE, steps=STEPS, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver_name", ["DPM2", "EulerMaruyama", "AdaptiveDPMSolver"])
def test_defect_14_the_state_takes_the_parameters_device(solver_name):
    """A float16 module on the GPU, no dtype/device/x_T: the run is on the GPU in float16, in grad mode,
    graph-free, with the backend the driver picks (the fused kernels where they run)."""
    net = real_network(IMAGE, torch.float16).cuda()
    model = Model(net, VPSDE(), predicts="eps")
    cond = {"label": torch.tensor([1, 2], device="cuda")}
    out = _call(SOLVERS[solver_name](), model, IMAGE, cond)
    assert out.device == net.conv_in.weight.device and out.dtype == torch.float16
    assert bool(torch.isfinite(out).all()) and out.grad_fn is None and not out.requires_grad
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(out, _call(SOLVERS[solver_name](), model, IMAGE, cond))


def test_defect_14_explicit_dtype_and_x_T_still_decide():
    """The parameters' dtype is only the default: dtype= and x_T's dtype come first, and a network that is
    not a Module (a function around one) gets torch's default dtype."""
    net = real_network(VECTOR, torch.float64)
    wrapped = Model(lambda x, t: net(x.double(), t).to(x.dtype), VPSDE(), predicts="eps")
    assert sample(wrapped, DPMSolver(2), shape=VECTOR, steps=STEPS).dtype == torch.get_default_dtype()
    module_model = Model(net, VPSDE(), predicts="eps")
    assert sample(module_model, DPMSolver(2), shape=VECTOR, steps=STEPS).dtype == torch.float64
    x_T = torch.randn(VECTOR, dtype=torch.float32)
    assert sample(wrapped, DPMSolver(2), x_T=x_T, steps=STEPS).dtype == torch.float32
    assert sample(wrapped, DPMSolver(2), shape=VECTOR, steps=STEPS, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_defect_14_parameters_of_several_dtypes_or_devices_are_refused_naming_the_argument():
    net = real_network(VECTOR)
    net.out.to(torch.float16)  # a half head on a float32 body: no single dtype to default to
    model = Model(net, VPSDE(), predicts="eps")
    with pytest.raises(ValueError, match=r"parameters have the dtypes .*float16.*float32.*: pass dtype="):
        sample(model, DPMSolver(2), shape=VECTOR, steps=STEPS)
    split = real_network(VECTOR)
    split.out.to("meta")  # parameters on two devices
    with pytest.raises(ValueError, match=r"parameters have the devices .*cpu.*meta.*: pass device="):
        sample(Model(split, VPSDE(), predicts="eps"), DPMSolver(2), shape=VECTOR, steps=STEPS)


def test_defect_14_sample_distributed_and_the_cli_default_to_the_parameters_dtype(tmp_path, monkeypatch, capsys):
    from samplers.cli.sample import main as cli_main
    from samplers.distributed import load_shards, sample_distributed

    net = real_network(VECTOR, torch.bfloat16)
    model = Model(net, VPSDE(), predicts="eps")
    x = sample_distributed(model, DPMSolver(2), 5, VECTOR[1:], steps=STEPS, batch_size=2)
    assert x.dtype == torch.bfloat16 and torch.equal(x, sample(model, DPMSolver(2), shape=(5, 2), steps=STEPS))
    (tmp_path / "halfnets.py").write_text("import torch\nfrom real_networks import real_network\n"
                                          "net = real_network((1, 2), torch.bfloat16)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "o"
    assert cli_main(["--model", "halfnets:net", "--sde", "vp", "--predicts", "eps", "--solver", "dpm++2m", "--steps",
                     "3", "-n", "4", "--shape", "2", "--out", str(out)]) == 0
    assert load_shards(out).dtype == torch.bfloat16
    assert '"dtype": "torch.bfloat16"' in (out / "index.json").read_text()


def test_defect_14_a_module_without_floating_parameters_keeps_the_default():
    class Identity(torch.nn.Module):
        def forward(self, x, t):
            return 0.1 * x

    out = sample(Model(Identity(), VPSDE(), predicts="eps"), DPMSolver(2), shape=VECTOR, steps=STEPS)
    assert out.dtype == torch.get_default_dtype() and out.device.type == "cpu"


# -- defect 13: what is, and is not, the same in any batch ---------------------------------------------------------
def _one_by_one(model, solver, n, shape, **kw):
    return torch.cat([sample(model, solver, shape=(1, *shape), sample_index=[i], **kw) for i in range(n)])


@pytest.mark.parametrize("solver_name", ["DPM2", "EulerMaruyama", "ERSDE3", "AdaptiveEM", "EVODiff"])
def test_defect_13_an_elementwise_network_is_bit_identical_in_any_batch(solver_name):
    """The library's half of the promise: its noise and its own arithmetic do not depend on the batch, so
    with a network whose row i depends on row i only, bit for bit, sample i is bit-identical alone or
    in a batch of 8."""
    model = Model(lambda x, t: 0.3 * torch.tanh(x) * t.reshape(-1, 1), VPSDE(), predicts="eps")
    kw = {} if solver_name.startswith("Adaptive") else {"steps": 5}
    batch = sample(model, SOLVERS[solver_name](), shape=(8, 4), seed=11, **kw)
    alone = _one_by_one(model, SOLVERS[solver_name](), 8, (4,), seed=11, **kw)
    assert torch.equal(batch, alone)


def test_defect_13_an_nn_linear_network_differs_at_rounding_level_and_the_noise_does_not():
    """The network's half, outside the library's control: torch's matmul picks its reduction by batch size,
    so an nn.Linear network's rows can differ in the last bits between a batch of 8 and batches of 1 (the
    issue measured 1.5e-4 on samples of size ~1e3, float32).  The noise still is bit-identical, and the
    samples agree to float32 rounding relative to their size, in float64 to float64 rounding."""
    noise_8 = NoiseSource(11, 8).normal((4,), counter=0, stream=STREAM_PRIOR)
    noise_1 = torch.cat([NoiseSource(11, 1, sample_index=[i]).normal((4,), counter=0, stream=STREAM_PRIOR)
                         for i in range(8)])
    assert torch.equal(noise_8, noise_1)
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 4)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-13)):
        layer = linear.to(dtype)
        model = Model(lambda x, t: layer(x), VPSDE(), predicts="eps")
        for solver_name in ("DPM2", "EulerMaruyama"):
            batch = sample(model, SOLVERS[solver_name](), shape=(8, 4), steps=5, seed=11, dtype=dtype)
            alone = _one_by_one(model, SOLVERS[solver_name](), 8, (4,), steps=5, seed=11, dtype=dtype)
            assert ((batch - alone).abs().max() / batch.abs().max()).item() < tol


#: a claim that results are the same across batches; such a claim must say it needs a batch-invariant network
_BATCH_PROMISE = re.compile(r"bit-identical|never\s+changes\s+the\s+result|same\s+in\s+any\s+batch"
                            r"|does\s+not\s+depend\s+on\s+the\s+batch", re.IGNORECASE)
_QUALIFIED = ("batch-invariant", "#what-is-the-same-in-any-batch")


def _paragraphs(text):
    """Blank-line-separated paragraphs; a markdown table row is a paragraph of its own.  The section that
    states the guarantee (docs/noise.md) is left out: it is where the qualified sentences point."""
    text = re.sub(r"## What is the same in any batch.*?(?=\n## )", "", text, flags=re.DOTALL)
    for block in re.split(r"\n\s*\n", text):
        rows = [line for line in block.splitlines() if line.lstrip().startswith("|")]
        yield from rows if rows else [block]


def test_defect_13_no_doc_promises_bit_identical_samples_without_naming_the_network():
    """Issue 14, defect 13: the docs said sample i is bit-identical in any batch and batch_size never changes
    the result, which an nn.Linear network disproves.  Every such sentence in the README, docs/ and the
    library's docstrings must now say that it takes a batch-invariant network (or link to the section that
    states what the library guarantees)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for package in ("samplers", "solvers", "sde") for p in (ROOT / package).glob("*.py"))]
    unqualified = [f"{path.relative_to(ROOT)}: {' '.join(paragraph.split())[:160]}"
                   for path in files for paragraph in _paragraphs(path.read_text())
                   if _BATCH_PROMISE.search(paragraph) and not any(q in paragraph for q in _QUALIFIED)]
    assert unqualified == []
