"""EVODiff (solvers/evodiff.py): agreement with a transcription of the reference update, its invariances
(batch, SDE parametrisation), its refusals, and its one network call per step.

The transcription below is written for this test from the reference code's update rule (the public repository
ShiguiLi/EVODiff, code_demo/edm_cifar10/samplers/evodiff.py, ``EVODiff_edm.sample`` with order 2,
``multistep``, ``lower_order_final``): EDM's ODE (alpha = 1, sigma = t), (B, C, H, W) states, projections per
sample *and channel* (its einsum 'bchw,bchw->bc'), float64, every constant of the reference in place,
including the clamp of r_i to [0.25, 1.5] r_logh that the solver leaves out (it never binds: the
transcription's agreement checks that too).  The measured order is in tests/test_orders.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MIXTURE, mixture_problem

from samplers import Model, grid, invert, problems, sample
from sde import EDMSDE, VPSDE, RectifiedFlowSDE
from solvers import DPMSolver, EVODiff
from solvers.evodiff import LAST_STEPS

F64 = torch.float64
IMAGE = (3, 4, 4, 4)  # (B, C, H, W): the 64-D mixture seen as 4 channels of 4x4


def _image_net(sde):
    """The exact x0 of the 64-D mixture, on (B, 4, 4, 4) states."""
    flat = problems.mixture_64d().net(sde, "x0")
    return lambda x, t: flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)


def _reference_evodiff(x0_of, x, sigmas):
    """The reference update on EDM (sigma = t = kappa) over the decreasing ``sigmas`` ((N+1,) float64)."""
    def dot(a, b):  # per sample and channel, shaped (B, C, 1, 1)
        return torch.einsum("bchw,bchw->bc", a, b)[:, :, None, None]

    def projection(a, b):
        return torch.clamp(dot(a, b) / dot(b, b), -2.0, 2.0)

    n = sigmas.shape[0] - 1
    s_start, s_end = sigmas[0], sigmas[-1]
    history = [x0_of(x, sigmas[0])]
    # step 1: DDIM in data prediction
    h = 1.0 / sigmas[1] - 1.0 / sigmas[0]
    x = sigmas[1] / sigmas[0] * x + sigmas[1] * h * history[-1]
    history.append(x0_of(x, sigmas[1]))
    for s in range(2, n + 1):
        t, s0, s1 = sigmas[s], sigmas[s - 1], sigmas[s - 2]
        m0, m1 = history[-1], history[-2]
        h = 1.0 / t - 1.0 / s0
        if s == n:  # the special last step
            ratio = t / s0
            x_ddim = ratio * x + t * h * m0
            shrink = 1.0 - torch.sqrt(t * s0)
            r_last = 1.0 - 0.5 * torch.sqrt(ratio) if ratio < 0.5 else 1.0 - 0.5 * torch.sqrt(ratio - 0.5)
            x = shrink * x_ddim + 0.5 * t * h * (m0 - r_last * m1)
            break
        x_ddim = (t / s0) * x + t * h * m0
        r_logh = torch.log(s1 / s0) / torch.log(s0 / t)
        t_norm = (t + s_end) / (s_start + s_end)
        w = 0.5 * (1.0 - t_norm**2)
        base = torch.sqrt((t / s0) / (s0 / s1))
        r1 = (1.0 - w) * base + w * torch.clamp(dot(m0, m1) / dot(m1, m1), -2.0, 2.0)
        d1 = m0 - r1 * m1
        r_i = torch.sigmoid(0.25 * r1.abs()) * r_logh
        r_i = torch.maximum(torch.minimum(r_i, 1.5 * r_logh), 0.25 * r_logh)
        x = x_ddim + 0.5 * t * h / r_i * d1  # the probe
        m_t = x0_of(x, t)
        r2 = (1.0 - w) * base + w * torch.clamp(dot(m_t, m0) / dot(m0, m0), -2.0, 2.0)
        d2 = m_t - r2 * m0
        b_pre, b_next = d1 / (r_logh * h), r_logh * d2 / h
        eta = 0.5 * torch.sigmoid((0.5 * projection(b_next + b_pre, b_next - b_pre)).abs())
        b_theta = -eta / r_logh * d1 + r_logh * (1.0 - eta) * d2
        p1 = x - x_ddim - 0.5 * t * h / r_i * b_theta
        zeta_star = projection(p1, d1) / (h * t)
        shifted = zeta_star.abs() - 0.5
        if n > 20:
            d10 = (m0 - m1) / h
            consistency = torch.sigmoid(projection(m0, d10) * (2.0 - (t / s0) ** 2))
            zeta = torch.sigmoid(-shifted * consistency)
        else:
            zeta = torch.sigmoid(shifted)
        x = x_ddim + 0.5 * t * h / zeta * b_theta
        history = [m0, m_t]
    return x


@pytest.mark.parametrize("steps", [2, 3, 5, 10, 24])
def test_agrees_with_the_transcribed_reference_on_images(steps):
    """float64, per-channel projections, on EDM's log-SNR grid: to 1e-12 of the state's size (the reference
    forms the correction's P1 by cancellation, the solver from its terms).  24 steps take the gated branch."""
    sde = EDMSDE()
    net = _image_net(sde)
    x_T = torch.randn(IMAGE, generator=torch.Generator().manual_seed(0), dtype=F64) * sde.sigma_max
    times = grid(sde, steps, "log_snr")
    solver = EVODiff(inner_product="channel", last_step="evodiff")
    solver.zeta_shift = 0.5  # the reference's shift, which measurement did not keep as the default
    ours = sample(Model(net, sde, predicts="x0"), solver, x_T=x_T, grid=times,
                  final_denoise=False, dtype=F64)

    def x0_of(x, t):
        return net(x, t.reshape(1).expand(x.shape[0]))

    theirs = _reference_evodiff(x0_of, x_T.clone(), times)
    assert (ours - theirs).abs().max().item() <= 1e-12 * theirs.abs().max().item(), (ours - theirs).abs().max()


def test_per_sample_projections_differ_from_per_channel_ones_on_images():
    """The two reductions are different rules on (B, C, H, W) (the transcription would catch a mix-up)."""
    sde = EDMSDE()
    model = Model(_image_net(sde), sde, predicts="x0")
    x_T = torch.randn(IMAGE, generator=torch.Generator().manual_seed(0), dtype=F64) * sde.sigma_max
    a = sample(model, EVODiff(), x_T=x_T, steps=6, final_denoise=False, dtype=F64)
    b = sample(model, EVODiff(inner_product="channel"), x_T=x_T, steps=6, final_denoise=False, dtype=F64)
    assert (a - b).abs().max() > 1e-6


def test_the_same_map_on_every_gaussian_sde():
    """The method is defined in kappa = sigma/alpha on y = x/alpha: VP on a grid and EDM on the same kappa grid
    give x_VP = alpha x_EDM (to rounding)."""
    vp, edm = VPSDE(), EDMSDE(sigma_min=1e-2, sigma_max=200.0)
    mixture = problems.mixture_2d()
    times_vp = grid(vp, 7, "log_snr")
    kappa = torch.exp(-vp.log_snr(times_vp))
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    x_vp = sample(Model(mixture.net(vp, "x0"), vp, predicts="x0"), EVODiff(), x_T=x_T, grid=times_vp,
                  final_denoise=False, dtype=F64)
    alpha = vp.alpha(times_vp)
    x_edm = sample(Model(mixture.net(edm, "x0"), edm, predicts="x0"), EVODiff(), x_T=x_T / alpha[0], grid=kappa,
                   final_denoise=False, dtype=F64)
    assert torch.allclose(x_vp, alpha[-1] * x_edm, rtol=1e-10, atol=1e-12)


def test_each_sample_is_its_own_problem():
    """Per-sample projections: sample i alone gives bit for bit what it gives in a batch."""
    sde = VPSDE()
    model = Model(_image_net(sde), sde, predicts="x0")
    x_T = torch.randn(IMAGE, generator=torch.Generator().manual_seed(4), dtype=F64)
    batch = sample(model, EVODiff(), x_T=x_T, steps=8, dtype=F64)
    alone = torch.cat([sample(model, EVODiff(), x_T=x_T[i:i + 1], steps=8, dtype=F64) for i in range(IMAGE[0])])
    assert torch.equal(batch, alone)


class _Counting:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.net(x, t)


@pytest.mark.parametrize("shape", [(4,), (4, 2), IMAGE])
def test_one_call_per_step_on_every_state_shape(shape):
    sde = EDMSDE()
    dim = math.prod(shape[1:])
    flat = problems.gaussian(torch.full((dim,), 0.3, dtype=F64), 0.5).net(sde, "x0")
    net = _Counting(lambda x, t: flat(x.reshape(x.shape[0], -1), t).reshape(x.shape))
    x = sample(Model(net, sde, predicts="x0"), EVODiff(), shape=shape, steps=7, seed=0, dtype=F64)
    assert net.calls == 7 + 1 and bool(torch.isfinite(x).all())


def test_two_steps_with_the_ddim_last_step_are_ddim():
    """Step 0 is DDIM; with last_step="ddim" so is step 1: two steps equal DPMSolver(1)'s, and the reference's
    last step differs from them."""
    sde = VPSDE()
    model = Model(problems.mixture_2d().net(sde, "x0"), sde, predicts="x0")
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    runs = {last: sample(model, EVODiff(last_step=last), x_T=x_T, steps=2, final_denoise=False, dtype=F64)
            for last in LAST_STEPS}
    ddim = sample(model, DPMSolver(1), x_T=x_T, steps=2, final_denoise=False, dtype=F64)
    assert torch.allclose(runs["ddim"], ddim, rtol=0, atol=1e-14)
    assert (runs["evodiff"] - ddim).abs().max() > 1e-3


def test_the_reference_last_step_leaves_a_bias_that_steps_do_not_remove():
    """Why last_step="ddim" is the default: the reference's last step shrinks x by 1 - sqrt(kappa_N kappa_{N-1}),
    about 1 - sigma_min, whatever the step count.  On VP (sigma_min ~ 0.01) its error against the exact ODE
    solution stalls from 64 to 256 steps (measured 8.6e-3, 8.2e-3, 9.1e-3) where the DDIM last step's halves
    with each doubling (first order: 1.8e-2, 9.1e-3, 4.6e-3)."""
    sde, x_T, exact = mixture_problem("VP")
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")

    def error(last_step, n):
        x = sample(model, EVODiff(last_step=last_step), x_T=x_T, grid=grid(sde, n, "log_snr"), final_denoise=False,
                   dtype=F64)
        return (x - exact).pow(2).mean().sqrt().item()

    assert error("evodiff", 256) > 0.7 * error("evodiff", 64)
    assert error("ddim", 256) < 0.3 * error("ddim", 64)


def test_bad_input_is_refused_before_any_call():
    with pytest.raises(ValueError, match="inner_product"):
        EVODiff(inner_product="pixel")
    with pytest.raises(ValueError, match="last_step"):
        EVODiff(last_step="euler")
    sde = RectifiedFlowSDE()
    net = _Counting(problems.mixture_2d().net(sde, "x0"))
    model = Model(net, sde, predicts="x0")
    with pytest.raises(ValueError, match="alpha = 0"):  # the first probe's history starts where kappa is infinite
        sample(model, EVODiff(), shape=(2, 2), grid=torch.linspace(1.0, 0.01, 6, dtype=F64), dtype=F64)
    with pytest.raises(ValueError, match="decreasing grid"):  # invert runs the grid backwards
        invert(model, EVODiff(), torch.zeros(2, 2, dtype=F64), grid=torch.linspace(0.9, 0.01, 6, dtype=F64))
    assert net.calls == 0


def test_no_fused_kernel_and_why():
    from solvers.kernels import KernelUnsupported

    with pytest.raises(KernelUnsupported, match="per-sample inner products"):
        EVODiff().fused_step()


def test_the_bench_command_measures_every_solver_at_each_budget():
    from samplers.cli.bench_evodiff import low_nfe_comparison

    rows = low_nfe_comparison(problems=("2d",), sdes=("vp",), budgets=(5, 6), samples=20)
    solvers = {r["solver"] for r in rows}
    assert {"EVODiff()", "DPMSolver(2, lower_order_final=True)", "UniPC(lower_order_final=True)", "ERSDE()"} <= solvers
    assert len(rows) == 2 * len(solvers)
    assert all(r["rms"] > 0 and r["mode_error"] >= 0 and 0 <= r["weight_tv"] <= 1 for r in rows)
