"""The sampling driver (samplers.sample) and time grids: batch invariance, dtypes and shapes,
per-sample grids, NFE accounting, callbacks and every argument error."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import ALL_SDE_NAMES, F64, GaussianNet, GaussianX0Net, col, make_sde
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import GRID_KINDS, Model, NonFiniteError, StepInfo, grid, sample, validate_grid
from sde import EDMSDE, VESDE, VPSDE, RectifiedFlowSDE
from solvers import Euler, EulerMaruyama, Heun

SOLVERS = {
    "Euler": lambda: Euler(),
    "Heun(eta=0)": lambda: Heun(eta=0.0),
    "Heun(eta=1)": lambda: Heun(eta=1.0),
    "EulerMaruyama": lambda: EulerMaruyama(),
}


class ElementwiseNet:
    """A nonlinear, elementwise eps-network: batch invariant by construction."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return torch.tanh(x) * (0.5 + 0.25 * col(torch.cos(3 * t), x)).to(x.dtype)


def vp_model(predicts="eps"):
    sde = VPSDE()
    return Model(ElementwiseNet(), sde, predicts=predicts)


# -- batch invariance -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver_name", list(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_batch_invariance(solver_name, dtype):
    model = vp_model()
    runs = {b: sample(model, SOLVERS[solver_name](), shape=(b, 3, 4, 4), steps=6, seed=123, dtype=dtype)
            for b in (1, 7, 64)}
    assert torch.equal(runs[7][:1], runs[1])
    assert torch.equal(runs[64][:7], runs[7])
    # the samples differ from each other (the noise is keyed by the sample index)
    assert not torch.equal(runs[64][0], runs[64][1])
    # a shard with global indices 5..11 reproduces rows 5..11 of the full run
    shard = sample(model, SOLVERS[solver_name](), shape=(7, 3, 4, 4), steps=6, seed=123, dtype=dtype,
                   sample_index=list(range(5, 12)))
    assert torch.equal(shard, runs[64][5:12])
    # per-sample seeds: sample i of a batch equals a batch-1 run with seed_i and sample_index i
    seeds = [11, 2**64 - 1, 5, 5, 0]
    per = sample(model, SOLVERS[solver_name](), shape=(5, 3, 4, 4), steps=6, seed=seeds, dtype=dtype)
    for i, s in enumerate(seeds):
        alone = sample(model, SOLVERS[solver_name](), shape=(1, 3, 4, 4), steps=6, seed=s, dtype=dtype,
                       sample_index=[i])
        assert torch.equal(per[i:i + 1], alone)
    assert not torch.equal(per[2], per[3])  # same seed, different index


def test_seed_changes_prior_and_noise():
    model = vp_model()
    a = sample(model, Euler(), shape=(3, 5), steps=4, seed=0)
    b = sample(model, Euler(), shape=(3, 5), steps=4, seed=1)
    assert (a - b).abs().min() > 0
    x, info = sample(model, Euler(), shape=(3, 5), steps=4, seed=None, return_info=True)
    assert isinstance(info.seed, int) and 0 <= info.seed < 2**62
    assert torch.equal(x, sample(model, Euler(), shape=(3, 5), steps=4, seed=info.seed))


def test_prior_draw_is_keyed_and_scaled():
    """With zero steps of change (a zero-velocity model), x stays the keyed prior draw."""
    from samplers.noise import STREAM_PRIOR, NoiseSource

    sde = VESDE()
    model = Model(lambda x, t: torch.zeros_like(x), sde, predicts="velocity")
    out = sample(model, Euler(), shape=(4, 3), steps=3, seed=9, final_denoise=False, dtype=F64)
    z = NoiseSource(9, 4).normal((3,), counter=0, stream=STREAM_PRIOR, dtype=F64)
    assert torch.equal(out, z * 50.0)


# -- dtypes and shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver_name", list(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("sde", [VPSDE(), EDMSDE()], ids=["VP", "EDM"])
def test_dtypes_run_to_the_end(sde, dtype, solver_name):
    net = GaussianX0Net(sde)
    model = Model(net, sde, predicts="x0")
    seen = []
    out, info = sample(model, SOLVERS[solver_name](), shape=(16, 2, 3), steps=8, seed=0, dtype=dtype,
                       return_info=True, callback=lambda s: seen.append(s.step))
    assert out.dtype == dtype and out.shape == (16, 2, 3)
    assert torch.isfinite(out).all()
    assert seen == list(range(8))
    assert info.dtype == dtype
    assert info.compute_dtype == (F64 if dtype == F64 else torch.float32)
    # the samples are near the data distribution N(0.7, 0.25) (the net is its exact denoiser)
    assert abs(out.float().mean().item() - 0.7) < 0.3


@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 3, 4, 4)], ids=["B", "B,d", "B,C,H,W"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_state_ranks(shape, dtype, solver_name):
    sde = VESDE()
    out = sample(Model(GaussianNet(sde, "eps"), sde, predicts="eps"), SOLVERS[solver_name](), shape=shape,
                 steps=6, seed=2, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_half_precision_net_sees_half_states():
    dtypes = []

    def net(x, t):
        dtypes.append((x.dtype, t.dtype))
        return torch.zeros_like(x)

    out = sample(Model(net, VPSDE()), Heun(), shape=(2, 3), steps=2, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert set(dtypes) == {(torch.bfloat16, torch.float32)}
    dtypes.clear()
    sample(Model(net, VPSDE()), Euler(), shape=(2, 3), steps=2, dtype=F64)
    assert set(dtypes) == {(F64, F64)}


def test_dtype_follows_x_T_and_default():
    model = vp_model()
    x_T = torch.randn(3, 2, dtype=F64)
    assert sample(model, Euler(), x_T=x_T, steps=2).dtype == F64
    assert sample(model, Euler(), shape=(3, 2), steps=2).dtype == torch.get_default_dtype()
    assert sample(model, Euler(), x_T=x_T, steps=2, dtype=torch.float16).dtype == torch.float16
    # x_T is not modified in place
    before = x_T.clone()
    sample(model, EulerMaruyama(), x_T=x_T, steps=3)
    assert torch.equal(x_T, before)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 5), dims=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, F64]),
       solver_name=st.sampled_from(list(SOLVERS)), steps=st.integers(1, 5))
def test_shapes_property(batch, dims, dtype, solver_name, steps):
    model = vp_model()
    shape = (batch, *dims)
    out = sample(model, SOLVERS[solver_name](), shape=shape, steps=steps, seed=1, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    # the first sample does not depend on the batch or on trailing samples
    if batch > 1:
        alone = sample(model, SOLVERS[solver_name](), shape=(1, *dims), steps=steps, seed=1, dtype=dtype)
        assert torch.equal(out[:1], alone)


# -- grids ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", GRID_KINDS)
@pytest.mark.parametrize("name", ALL_SDE_NAMES)
def test_grid_kinds(name, kind):
    sde = make_sde(name)
    extra = {}
    if isinstance(sde, RectifiedFlowSDE) and kind in ("log_snr", "karras"):
        # log-SNR is -inf at t = 1: refused with the reason, fine below 1
        with pytest.raises(ValueError, match=f"grid kind '{kind}' needs a finite log-SNR at both ends"):
            grid(sde, 10, kind)
        extra = {"t_max": 0.99}
    for steps in (1, 2, 10, 257):
        times = grid(sde, steps, kind, **extra)
        assert times.dtype == F64 and times.shape == (steps + 1,)
        assert times[0].item() == extra.get("t_max", sde.t_max) and times[-1].item() == sde.t_min
        assert (torch.diff(times) < 0).all()
    # the kinds are what they say they are
    times = grid(sde, 16, kind, **extra)
    u = torch.linspace(0, 1, 17, dtype=F64)
    if kind == "uniform":
        assert torch.allclose(torch.diff(times), torch.diff(times)[:1].expand(16), rtol=1e-9)
    elif kind == "quadratic":
        assert torch.allclose(torch.diff(times.sqrt()), torch.diff(times.sqrt())[:1].expand(16), rtol=1e-9)
    elif kind == "log_snr":
        lam = sde.log_snr(times)
        assert torch.allclose(torch.diff(lam), torch.diff(lam)[:1].expand(16), rtol=1e-8)
    else:
        level = torch.exp(-sde.log_snr(times)) ** (1 / 7)
        assert torch.allclose(torch.diff(level), torch.diff(level)[:1].expand(16), rtol=1e-8)
    assert u.shape == times.shape


def test_karras_grid_on_edm_is_the_edm_formula():
    sde = EDMSDE()
    for n in (1, 18, 40):
        i = torch.arange(n + 1, dtype=F64)
        smax, smin = 80.0, 0.002
        expected = (smax ** (1 / 7) + i / n * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
        assert torch.allclose(grid(sde, n, "karras"), expected, rtol=1e-12, atol=0)
        assert torch.allclose(grid(sde, n), expected, rtol=1e-12, atol=0)  # EDM's default grid


def test_default_grid_kinds():
    assert torch.equal(grid(VPSDE(), 5), grid(VPSDE(), 5, "uniform"))
    assert torch.equal(grid(VESDE(), 5), grid(VESDE(), 5, "log_snr"))
    assert torch.equal(grid(EDMSDE(), 5), grid(EDMSDE(), 5, "karras"))
    model = vp_model()
    x, info = sample(model, Euler(), shape=(1, 2), steps=5, grid_kind="quadratic", return_info=True)
    assert torch.equal(info.times, grid(VPSDE(), 5, "quadratic"))


def test_grid_sub_range_and_errors():
    sde = VPSDE()
    times = grid(sde, 4, t_max=0.5, t_min=0.1)
    assert times[0].item() == 0.5 and times[-1].item() == 0.1
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        grid(sde, 0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        grid(sde, 2.0)
    with pytest.raises(ValueError, match=r"kind must be 'uniform', 'log_snr', 'karras' or 'quadratic' \(or None"):
        grid(sde, 4, "cosine")
    with pytest.raises(ValueError, match=r"expected 0.001 <= t_min < t_max <= 1"):
        grid(sde, 4, t_max=1.5)
    with pytest.raises(ValueError, match=r"expected 0.001 <= t_min < t_max <= 1"):
        grid(sde, 4, t_min=0.5, t_max=0.4)


def test_validate_grid_errors():
    sde = VPSDE()
    with pytest.raises(ValueError, match="grid must be strictly decreasing .* step 1 goes from 0.5 to 0.5"):
        validate_grid(sde, torch.tensor([0.9, 0.5, 0.5, 0.1]))
    with pytest.raises(ValueError, match="grid must be strictly decreasing"):
        validate_grid(sde, torch.tensor([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match=r"grid leaves the SDE's time range \[0.001, 1\]"):
        validate_grid(sde, torch.tensor([1.2, 0.5, 0.1]))
    with pytest.raises(ValueError, match=r"grid leaves the SDE's time range"):
        validate_grid(sde, torch.tensor([0.5, 0.0005]))
    with pytest.raises(ValueError, match="grid contains NaN or Inf"):
        validate_grid(sde, torch.tensor([0.9, float("nan"), 0.1]))
    with pytest.raises(ValueError, match=r"grid must have shape \(N\+1,\) or \(N\+1, B\)"):
        validate_grid(sde, torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"a per-sample grid must have shape \(N\+1, 3\)"):
        validate_grid(sde, torch.rand(4, 2), batch_size=3)
    # integer grids are promoted
    assert validate_grid(EDMSDE(), torch.tensor([3, 2, 1])).dtype == F64


@pytest.mark.parametrize("solver_name", ["Euler", "Heun(eta=0)"])
def test_per_sample_grids(solver_name):
    sde = VPSDE()
    model = Model(GaussianX0Net(sde), sde, predicts="x0")
    b, n = 5, 7
    lows = torch.tensor([1e-3, 0.01, 0.05, 0.2, 0.002], dtype=F64)
    highs = torch.tensor([1.0, 0.9, 0.8, 0.95, 0.5], dtype=F64)
    u = torch.linspace(0, 1, n + 1, dtype=F64)[:, None]
    times = highs + u * (lows - highs)  # (N+1, B)
    x_T = torch.randn(b, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out, info = sample(model, SOLVERS[solver_name](), x_T=x_T, grid=times, return_info=True)
    assert info.times.shape == (n + 1, b)
    for i in range(b):
        alone = sample(model, SOLVERS[solver_name](), x_T=x_T[i:i + 1], grid=times[:, i])
        assert torch.allclose(out[i:i + 1], alone, rtol=1e-13, atol=1e-13), i
    # a (N+1, 1) grid broadcasts over the batch like an (N+1,) grid
    shared = sample(model, SOLVERS[solver_name](), x_T=x_T, grid=times[:, :1])
    assert torch.allclose(shared, sample(model, SOLVERS[solver_name](), x_T=x_T, grid=times[:, 0]), atol=1e-13)


def test_per_sample_grid_with_stochastic_solver_keeps_per_sample_noise():
    sde = VPSDE()
    model = Model(GaussianX0Net(sde), sde, predicts="x0")
    times = torch.stack([grid(sde, 6), grid(sde, 6, "quadratic")], dim=1)
    out = sample(model, EulerMaruyama(), shape=(2, 3), grid=times, seed=4, dtype=F64)
    first = sample(model, EulerMaruyama(), shape=(1, 3), grid=times[:, 0], seed=4, dtype=F64)
    assert torch.allclose(out[:1], first, atol=1e-13)


# -- NFE and callbacks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("final_denoise", [True, False])
@pytest.mark.parametrize("solver_name, per_step", [("Euler", 1), ("EulerMaruyama", 1), ("Heun(eta=0)", 2),
                                                   ("Heun(eta=1)", 2)])
def test_nfe(solver_name, per_step, final_denoise):
    for steps in (1, 5, 12):
        net = ElementwiseNet()
        model = Model(net, VPSDE())
        _, info = sample(model, SOLVERS[solver_name](), shape=(2, 2), steps=steps, final_denoise=final_denoise,
                         return_info=True)
        expected = per_step * steps + (1 if final_denoise else 0)
        assert info.nfe == expected == net.calls
        assert info.steps == steps and info.final_denoise == final_denoise
        assert info.solver == repr(SOLVERS[solver_name]())


def test_final_denoise_is_the_x0_estimate_at_t_min():
    sde = VPSDE()
    net = GaussianX0Net(sde)
    model = Model(net, sde, predicts="x0")
    x_T = torch.randn(4, 3, dtype=F64)
    raw = sample(model, Euler(), x_T=x_T, steps=5, final_denoise=False)
    den = sample(model, Euler(), x_T=x_T, steps=5, final_denoise=True)
    t = torch.full((4,), sde.t_min, dtype=F64)
    assert torch.allclose(den, net(raw, t), atol=1e-14)


@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_callback_gets_every_step(solver_name):
    sde = VPSDE()
    net = GaussianX0Net(sde)
    model = Model(net, sde, predicts="x0")
    steps = 6
    times = grid(sde, steps)
    records = []

    def callback(info: StepInfo):
        records.append((info.step, info.steps, info.t.clone(), info.t_next.clone(), info.x.clone(),
                        info.denoised.clone(), info.nfe))

    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = sample(model, SOLVERS[solver_name](), x_T=x_T, grid=times, callback=callback, final_denoise=False,
                 seed=5)
    assert [r[0] for r in records] == list(range(steps))
    assert all(r[1] == steps for r in records)
    per_step = 2 if solver_name.startswith("Heun") else 1
    assert [r[6] for r in records] == [per_step * (k + 1) for k in range(steps)]
    state = x_T
    for k, t, t_next, x, denoised in ((r[0], r[2], r[3], r[4], r[5]) for r in records):
        assert t.flatten()[0].item() == times[k].item() and t_next.flatten()[0].item() == times[k + 1].item()
        # denoised is the x0 estimate at the state the step started from
        expected = net(state, torch.full((3,), times[k].item(), dtype=F64))
        assert torch.allclose(denoised, expected, atol=1e-12), k
        state = x
    assert torch.equal(state, out)
    # a callback does not change the result
    assert torch.equal(out, sample(model, SOLVERS[solver_name](), x_T=x_T, grid=times, final_denoise=False, seed=5))


# -- errors ------------------------------------------------------------------------------------------------------------


class NaNAfter:
    """Returns 0 for the first ``n`` calls, NaN afterwards."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, x, t):
        self.calls += 1
        out = torch.zeros_like(x)
        return out if self.calls <= self.n else out + float("nan")


@pytest.mark.parametrize("solver, calls_before, step", [(Euler(), 3, 3), (EulerMaruyama(), 0, 0), (Heun(), 6, 3),
                                                         (Heun(), 7, 3), (Heun(eta=1.0), 8, 4)])
def test_non_finite_state_names_the_step(solver, calls_before, step):
    model = Model(NaNAfter(calls_before), VPSDE())
    with pytest.raises(NonFiniteError, match=rf"at step {step} of 10 \(t="):
        sample(model, solver, shape=(2, 3), steps=10)
    assert issubclass(NonFiniteError, FloatingPointError)


def test_non_finite_final_denoise():
    model = Model(NaNAfter(10), VPSDE())
    with pytest.raises(NonFiniteError, match="in the final denoising step at t=0.001"):
        sample(model, Euler(), shape=(2, 3), steps=10)


def test_non_finite_in_half_precision_overflow():
    def net(x, t):
        return (torch.zeros_like(x) + 6e4) * 2  # overflows float16 -> inf

    with pytest.raises(NonFiniteError, match="step 0 of 3"):
        sample(Model(net, EDMSDE(), predicts="x0"), Euler(), shape=(2, 2), steps=3, dtype=torch.float16)


def test_argument_errors():
    sde = VPSDE()
    model = vp_model()
    x_T = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="pass exactly one of steps .* or grid"):
        sample(model, Euler(), shape=(2, 3))
    with pytest.raises(ValueError, match="pass exactly one of steps .* or grid"):
        sample(model, Euler(), shape=(2, 3), steps=3, grid=grid(sde, 3))
    with pytest.raises(ValueError, match="pass exactly one of shape .* or x_T"):
        sample(model, Euler(), steps=3)
    with pytest.raises(ValueError, match="pass exactly one of shape .* or x_T"):
        sample(model, Euler(), shape=(2, 3), x_T=x_T, steps=3)
    with pytest.raises(ValueError, match=r"x_T must be a floating tensor of shape \(B, ...\) with B >= 1, got shape \(\)"):
        sample(model, Euler(), x_T=torch.tensor(1.0), steps=3)
    with pytest.raises(ValueError, match=r"shape must be \(B, ...\) with positive sizes"):
        sample(model, Euler(), shape=(0, 3), steps=3)
    with pytest.raises(ValueError, match="grid_kind applies only with steps"):
        sample(model, Euler(), shape=(2, 3), grid=grid(sde, 3), grid_kind="uniform")
    with pytest.raises(ValueError, match=r"kind must be 'uniform', 'log_snr', 'karras' or 'quadratic' \(or None"):
        sample(model, Euler(), shape=(2, 3), steps=3, grid_kind="linear")
    with pytest.raises(ValueError, match="grid must be strictly decreasing"):
        sample(model, Euler(), shape=(2, 3), grid=torch.tensor([1.0, 0.2, 0.5, 0.1]))
    with pytest.raises(ValueError, match=r"grid leaves the SDE's time range \[0.001, 1\]"):
        sample(model, Euler(), x_T=x_T, grid=torch.tensor([1.0, 0.5, 0.0005]))
    with pytest.raises(ValueError, match=r"grid leaves the SDE's time range"):
        sample(model, Euler(), x_T=x_T, grid=torch.tensor([2.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match=r"the grid starts at t=0.5, not at t_max=1 .* pass x_T"):
        sample(model, Euler(), shape=(2, 3), grid=torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match=r"a per-sample grid must have shape \(N\+1, 2\)"):
        sample(model, Euler(), x_T=x_T, grid=torch.rand(3, 5).sort(0, descending=True).values * 0.9 + 0.01)
    with pytest.raises(ValueError, match=r"seed: expected integers in \[0, 2\^64\)"):
        sample(model, Euler(), shape=(2, 3), steps=3, seed=-5)
    with pytest.raises(TypeError, match="seed: expected integers"):
        sample(model, Euler(), shape=(2, 3), steps=3, seed="abc")
    with pytest.raises(ValueError, match=r"one seed per sample \(2\), got 3 seeds"):
        sample(model, Euler(), shape=(2, 3), steps=3, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="sample_index: expected 2 indices, got 1"):
        sample(model, Euler(), shape=(2, 3), steps=3, sample_index=[4])
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        sample(model, Euler(), shape=(2, 3), steps=3, dtype=torch.int32)
    with pytest.raises(TypeError, match="model must be a samplers.Model"):
        sample(lambda x, t: x, Euler(), shape=(2, 3), steps=3)
    with pytest.raises(TypeError, match="solver must be a solvers.Solver instance"):
        sample(model, Euler, shape=(2, 3), steps=3)
    with pytest.raises(TypeError, match="cond must be a dict"):
        sample(model, Euler(), shape=(2, 3), steps=3, cond=[1])
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sample(model, Euler(), shape=(2, 3), steps=0)


def test_wrong_output_shape_and_unknown_predicts():
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"net output has shape \(2, 1\), expected the state's shape \(2, 3\)"):
        sample(Model(lambda x, t: x[:, :1].clone(), sde), Euler(), shape=(2, 3), steps=2)
    with pytest.raises(ValueError, match=r"net output has shape \(3,\), expected the state's shape \(2, 3\)"):
        sample(Model(lambda x, t: x[0].clone(), sde), Heun(), shape=(2, 3), steps=2)
    with pytest.raises(ValueError, match=r"predicts must be 'eps', 'x0', 'v', 'score' or 'velocity', got 'denoised'"):
        Model(lambda x, t: x, sde, predicts="denoised")
    with pytest.raises(ValueError, match=r"predicts='noise' is spelt predicts='eps' \(the Model's names"):
        Model(lambda x, t: x, sde, predicts="noise")


def test_reverse_sde_at_infinite_diffusion_names_the_coefficient():
    sde = RectifiedFlowSDE()
    model = Model(GaussianNet(sde, "velocity"), sde, predicts="velocity")
    for solver, name in ((EulerMaruyama(), "x"), (Heun(eta=1.0), "pred_x"), (Euler(eta=0.5), "x")):
        with pytest.raises(ValueError, match=re.escape(repr(solver)) + rf": the step from t=1 to t=0.75025 \(step 0\) has a "
                                             rf"non-finite coefficient '{name}'"):
            sample(model, solver, shape=(2, 2), steps=4)
    # the probability-flow ODE (eta = 0) is finite there with a velocity network
    assert torch.isfinite(sample(model, Euler(), shape=(2, 2), steps=4)).all()
    # starting below t = 1 is fine
    out = sample(model, EulerMaruyama(), x_T=torch.randn(2, 2), grid=grid(sde, 4, t_max=0.99))
    assert torch.isfinite(out).all()


def test_eps_prediction_at_alpha_zero_raises():
    sde = RectifiedFlowSDE()
    model = Model(GaussianNet(sde, "eps"), sde, predicts="eps")
    for solver in (Euler(), Heun()):
        with pytest.raises(ValueError, match=r"from t=1 to t=.* \(step 0\) has a non-finite coefficient"):
            sample(model, solver, shape=(2, 2), steps=4)


def test_cond_is_passed_to_the_net():
    seen = {}

    def net(x, t, label=None):
        seen["label"] = label
        return torch.zeros_like(x)

    sample(Model(net, VPSDE()), Euler(), shape=(2, 2), steps=2, cond={"label": 7})
    assert seen["label"] == 7


def test_net_returning_its_input_is_not_corrupted():
    """A net that returns (a view of) its input must not see the in-place state update."""
    sde = EDMSDE()
    model = Model(lambda x, t: x, sde, predicts="eps")  # eps = x: velocity = eps (sigma' = 1)
    x_T = torch.randn(3, 2, dtype=F64) * 80
    out = sample(model, Euler(), x_T=x_T, grid=torch.tensor([80.0, 40.0], dtype=F64), final_denoise=False)
    assert torch.allclose(out, x_T + (-40.0) * x_T)
    assert math.isfinite(out.sum().item())


def test_solver_contract_declared_with_defaults():
    """What the driver and the kernels ask of a solver is declared on the base classes, with defaults."""
    from solvers import AdaptiveDPMSolver, Plan, Solver, SolverBase, kernels

    class Minimal(Solver):
        def prepare(self, model, times):
            return {"x": torch.ones(times.shape[0] - 1, times.shape[1]), "orders": Plan([1] * (times.shape[0] - 1))}

        def step(self, k, x, ctx):
            assert ctx.plan("orders")[k] == 1 and ctx.solver_state is None and set(ctx.tables) == {"x"}
            return x.mul_(ctx.coef("x", k))

    solver = Minimal()
    assert (solver.hooks, solver.state_names, solver.draw_end, solver.adaptive) == (None, (), 0, False)
    assert solver.steps_for_nfe(11) == 10 and solver.steps_for_nfe(1) == 0
    with pytest.raises(kernels.KernelUnsupported, match="Minimal has no fused kernel"):
        solver.fused_step()
    x, info = sample(vp_model(), solver, shape=(2, 3), steps=4, final_denoise=False, return_info=True)
    assert info.solver_state is None and info.nfe == 0
    adaptive = AdaptiveDPMSolver()
    assert isinstance(adaptive, SolverBase) and not isinstance(adaptive, Solver) and adaptive.adaptive


def test_tables_and_plans_are_told_apart_by_type():
    class ListTable(Euler):
        def prepare(self, model, times):
            return {**super().prepare(model, times), "orders": [1] * (times.shape[0] - 1)}

    with pytest.raises(TypeError, match="prepare returned a list under 'orders'.*solvers.Plan"):
        sample(vp_model(), ListTable(), shape=(2, 3), steps=4)

    class Misspelt(Euler):
        def step(self, k, x, ctx):
            return x.mul_(ctx.coef("no_such_table", k))

    with pytest.raises(KeyError, match="no coefficient table 'no_such_table'"):
        sample(vp_model(), Misspelt(), shape=(2, 3), steps=4)


def test_model_output_calls_the_network_at_given_times():
    """ctx.model_output(x, t) equals ctx.output at the grid point of the same time."""
    from samplers.noise import NoiseSource
    from samplers.sample import fixed_grid_context

    model = vp_model()
    times = grid(model.sde, 4)[:, None]
    x = torch.randn(3, 2, dtype=torch.float64)
    ctx = fixed_grid_context(model, Euler(), x, times, {}, NoiseSource(0, 3), torch.float64)
    t = times[2].clone()
    assert torch.equal(ctx.model_output(x, t), ctx.output(x, 2)) and ctx.nfe == 2
    assert torch.equal(ctx.model_output(x, t), ctx.output(x, 2)) and ctx.nfe == 4
