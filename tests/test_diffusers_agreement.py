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

import math

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module  # noqa: E402
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from samplers import Model, sample  # noqa: E402
from sde import DiscreteVPSDE  # noqa: E402
from solvers import DPMSolver  # noqa: E402

F64 = torch.float64
N = 1000
BETAS = torch.linspace(1e-4, 0.02, N, dtype=F64)
RTOL = 1e-6


def eps_net(x, n):
    """A deterministic nonlinear eps network of the discrete timestep n (ours: (B,) float, diffusers: int)."""
    n = torch.as_tensor(n, dtype=F64, device=x.device)
    c = 0.6 + 0.8 * torch.sin(n / N * (math.pi / 2))
    if c.dim() == 1:
        c = c.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x * c) * 0.5 + 0.1 * x


class _Float64Torch:
    """Stands in for ``torch`` inside the scheduler module: torch, except float32 is float64."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def float64_timesteps(sched, steps: int, final_sigma_zero: bool) -> torch.Tensor:
    """Give a diffusers scheduler float64 schedule tables, set its timesteps, and return them.

    set_timesteps stores sigmas as float32; the integer timesteps index the float64 table exactly.
    The last sigma is 0 (final_sigmas_type="zero") or that of timestep 0 ("sigma_min")."""
    ac = torch.cumprod(1.0 - BETAS, dim=0)
    sigmas_all = ((1.0 - ac) / ac).sqrt()
    sched.betas, sched.alphas, sched.alphas_cumprod = BETAS.clone(), 1.0 - BETAS, ac
    sched.alpha_t, sched.sigma_t = ac.sqrt(), (1.0 - ac).sqrt()
    sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)
    sched.sigmas = sigmas_all.clone()
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    last = torch.zeros(1, dtype=F64) if final_sigma_zero else sigmas_all[:1]
    sched.sigmas = torch.cat([sigmas_all[timesteps], last])
    assert sched.sigmas.dtype == F64
    return timesteps


def diffusers_sample(steps: int, x_T: torch.Tensor, order: int = 2, float64: bool = True):
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=N, trained_betas=BETAS.tolist(), algorithm_type="dpmsolver++", solver_order=order,
        solver_type="midpoint", prediction_type="epsilon", final_sigmas_type="zero", lower_order_final=True,
        euler_at_final=False, thresholding=False, timestep_spacing="linspace",
    )
    if float64:
        timesteps = float64_timesteps(sched, steps, final_sigma_zero=True)
    else:
        sched.set_timesteps(steps)
        timesteps = sched.timesteps.clone()
    x = x_T.clone()
    for t in timesteps:
        x = sched.step(eps_net(x, t), t, x).prev_sample
    assert x.dtype == F64
    return x, timesteps


def our_sample(timesteps: torch.Tensor, x_T: torch.Tensor, order: int = 2):
    sde = DiscreteVPSDE(betas=BETAS)
    model = Model(eps_net, sde, predicts="eps", time_input="discrete")
    times = (timesteps.to(F64) + 1.0) / N
    assert bool((times[1:] < times[:-1]).all()) and times.min() >= 1.0 / N and times.max() <= 1.0
    return sample(model, DPMSolver(order=order, predicts="x0"), x_T=x_T, grid=times, final_denoise=True,
                  dtype=F64)


def _x_T():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(8, 3, 4, generator=g, dtype=F64)


def _rel(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("steps", [20, 25])
def test_dpmsolverpp_2m_matches_diffusers_float64(steps, monkeypatch):
    monkeypatch.setattr(dpm_module, "torch", _Float64Torch())
    x_T = _x_T()
    theirs, timesteps = diffusers_sample(steps, x_T)
    assert timesteps.numel() == steps and int(timesteps[0]) == N - 1
    ours = our_sample(timesteps, x_T)
    assert ours.dtype == F64 and torch.isfinite(ours).all()
    rel = _rel(ours, theirs)
    assert rel < RTOL, f"{steps} steps: max|ours - diffusers| / max|diffusers| = {rel:.3e}"


@pytest.mark.parametrize("steps", [20, 25])
def test_dpmsolverpp_2m_matches_stock_diffusers_step(steps):
    # unmodified step (it rounds the sample to float32 each step), float64 schedule tables
    x_T = _x_T()
    theirs, timesteps = diffusers_sample(steps, x_T)
    rel = _rel(our_sample(timesteps, x_T), theirs)
    assert rel < RTOL, f"{steps} steps: max|ours - diffusers| / max|diffusers| = {rel:.3e}"


def test_negative_control_order1_vs_diffusers_order2(monkeypatch):
    monkeypatch.setattr(dpm_module, "torch", _Float64Torch())
    x_T = _x_T()
    theirs, timesteps = diffusers_sample(20, x_T, order=2)
    rel = _rel(our_sample(timesteps, x_T, order=1), theirs)
    assert rel > 1e-3, f"order 1 should differ from diffusers' order 2, got relative difference {rel:.3e}"
