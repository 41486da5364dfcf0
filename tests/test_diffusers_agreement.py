"""Agreement with diffusers: our DPMSolver(order=2, predicts="x0") (DPM-Solver++ 2M) equals
DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
on the same discrete DDPM schedule, the same timesteps and the same eps network, in float64.

Correspondence.  diffusers' S timesteps n_0 > ... > n_{S-1} are our grid t_k = (n_k + 1)/N
(DiscreteVPSDE puts timestep n at t = (n + 1)/N with alpha^2 = alphas_cumprod[n] there).
diffusers takes S - 2 multistep steps between them (the first one first order, warm-up) and, with
final_sigmas_type="zero", a last first-order step from n_{S-1} to sigma = 0, which is exactly
x <- D(x, n_{S-1}): our S - 1 steps plus final_denoise=True.  With S >= 15 neither side lowers
the order anywhere else (diffusers' lower_order_final acts for S < 15, ours for < 10 steps).

float64 on the diffusers side: the scheduler builds betas / alphas_cumprod / sigmas in float32,
so they are replaced by float64 versions (alphas_cumprod before set_timesteps, sigmas after), and
``step`` casts the sample to float32 (``sample.to(torch.float32)``); the float64 test runs the
unmodified ``step`` with the module's ``torch.float32`` pointing at float64.  The stock ``step``
(float32 sample cast kept) is checked too, at the same bound.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
from conftest import DDPM_BETAS, DDPM_N, F64, Float64Torch, ddpm_eps_net, float64_timesteps, rel
from diffusers import DPMSolverMultistepScheduler

from samplers import Model, sample
from sde import DiscreteVPSDE
from solvers import DPMSolver

RTOL = 1e-6


def diffusers_sample(steps: int, x_T: torch.Tensor, order: int = 2, float64: bool = True):
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=DDPM_N, trained_betas=DDPM_BETAS.tolist(), algorithm_type="dpmsolver++",
        solver_order=order, solver_type="midpoint", prediction_type="epsilon", final_sigmas_type="zero",
        lower_order_final=True, euler_at_final=False, thresholding=False, timestep_spacing="linspace",
    )
    if float64:
        timesteps = float64_timesteps(sched, steps, final_sigma_zero=True)
    else:
        sched.set_timesteps(steps)
        timesteps = sched.timesteps.clone()
    x = x_T.clone()
    for t in timesteps:
        x = sched.step(ddpm_eps_net(x, t), t, x).prev_sample
    assert x.dtype == F64
    return x, timesteps


def our_sample(timesteps: torch.Tensor, x_T: torch.Tensor, order: int = 2):
    sde = DiscreteVPSDE(betas=DDPM_BETAS)
    model = Model(ddpm_eps_net, sde, predicts="eps", time_input="discrete")
    times = (timesteps.to(F64) + 1.0) / DDPM_N
    assert bool((times[1:] < times[:-1]).all()) and times.min() >= 1.0 / DDPM_N and times.max() <= 1.0
    return sample(model, DPMSolver(order=order, predicts="x0"), x_T=x_T, grid=times, final_denoise=True,
                  dtype=F64)


def _x_T():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(8, 3, 4, generator=g, dtype=F64)


@pytest.mark.parametrize("steps", [20, 25])
def test_dpmsolverpp_2m_matches_diffusers_float64(steps, monkeypatch):
    monkeypatch.setattr(dpm_module, "torch", Float64Torch())
    x_T = _x_T()
    theirs, timesteps = diffusers_sample(steps, x_T)
    assert timesteps.numel() == steps and int(timesteps[0]) == DDPM_N - 1
    ours = our_sample(timesteps, x_T)
    assert ours.dtype == F64 and torch.isfinite(ours).all()
    difference = rel(ours, theirs)
    assert difference < RTOL, f"{steps} steps: max|ours - diffusers| / max|diffusers| = {difference:.3e}"


@pytest.mark.parametrize("steps", [20, 25])
def test_dpmsolverpp_2m_matches_stock_diffusers_step(steps):
    # unmodified step (it rounds the sample to float32 each step), float64 schedule tables
    x_T = _x_T()
    theirs, timesteps = diffusers_sample(steps, x_T)
    difference = rel(our_sample(timesteps, x_T), theirs)
    assert difference < RTOL, f"{steps} steps: max|ours - diffusers| / max|diffusers| = {difference:.3e}"


def test_negative_control_order1_vs_diffusers_order2(monkeypatch):
    monkeypatch.setattr(dpm_module, "torch", Float64Torch())
    x_T = _x_T()
    theirs, timesteps = diffusers_sample(20, x_T, order=2)
    difference = rel(our_sample(timesteps, x_T, order=1), theirs)
    assert difference > 1e-3, f"order 1 should differ from diffusers' order 2, got relative difference {difference:.3e}"
