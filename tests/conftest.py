"""Shared fixtures and helpers for the sampler test-suite.

The helpers here are written from the definitions (x_t = alpha x0 + sigma eps), independently
of the library's conversion code, so that tests compare the library against first principles.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from samplers.problems import GaussianMixture, probability_flow_rhs, reference_solution
from sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, DiscreteVPSDE, RectifiedFlowSDE, SubVPSDE

F64 = torch.float64


def _cosine_alphas_cumprod(n: int = 1000, s: float = 0.008) -> torch.Tensor:
    steps = torch.arange(n + 1, dtype=F64) / n
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    ac = f[1:] / f[0]
    return ac.clamp(1e-6, 1 - 1e-6)


#: one constructor per Gaussian SDE family; ids are the names used in test ids
SDE_FACTORIES = {
    "VP": lambda: VPSDE(),
    "SubVP": lambda: SubVPSDE(),
    "VE": lambda: VESDE(),
    "EDM": lambda: EDMSDE(),
    "CosineVP": lambda: CosineVPSDE(),
    "DiscreteVP-betas": lambda: DiscreteVPSDE(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
    "DiscreteVP-alphas_cumprod": lambda: DiscreteVPSDE(alphas_cumprod=_cosine_alphas_cumprod()),
    "RectifiedFlow": lambda: RectifiedFlowSDE(),
}

ALL_SDE_NAMES = list(SDE_FACTORIES)


def make_sde(name: str):
    return SDE_FACTORIES[name]()


def col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor (or scalar) to broadcast against x (B, ...)."""
    v = torch.as_tensor(v)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


class GaussianX0Net:
    """Exact denoiser of data N(mu, s^2 I) under a Gaussian SDE, elementwise (batch invariant).

    x0_hat = (alpha s^2 x + sigma^2 mu) / (alpha^2 s^2 + sigma^2), computed in float64 and
    returned in x's dtype.  Counts calls and records the time tensors it was handed.
    """

    def __init__(self, sde, mu: float = 0.7, s: float = 0.5, record_times: bool = False):
        self.sde, self.mu, self.s = sde, float(mu), float(s)
        self.calls = 0
        self.record_times = record_times
        self.times: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.calls += 1
        if self.record_times:
            self.times.append(t.detach().clone())
        t64 = t.to(F64)
        x64 = x.to(F64)
        a = col(self.sde.alpha(t64), x64)
        sg = col(self.sde.sigma(t64), x64)
        s2 = self.s**2
        x0 = (a * s2 * x64 + sg * sg * self.mu) / (a * a * s2 + sg * sg)
        return self.convert(x64, t64, x0, a, sg).to(x.dtype)

    def convert(self, x, t, x0, a, sg):
        return x0


class GaussianNet(GaussianX0Net):
    """The exact network for data N(mu, s^2 I) predicting any of x0, eps, score, v, velocity,
    written from the definitions: eps = (x - alpha x0)/sigma (= sigma (x - alpha mu)/var, finite
    at alpha = 0), score = -eps/sigma, v = alpha eps - sigma x0, velocity = alpha' x0 + sigma' eps."""

    def __init__(self, sde, predicts: str = "x0", mu: float = 0.7, s: float = 0.5, record_times: bool = False):
        super().__init__(sde, mu, s, record_times)
        self.predicts = predicts

    def convert(self, x, t, x0, a, sg):
        if self.predicts == "x0":
            return x0
        var = a * a * self.s**2 + sg * sg
        eps = sg * (x - a * self.mu) / var
        if self.predicts == "eps":
            return eps
        if self.predicts == "score":
            return -(x - a * self.mu) / var
        if self.predicts == "v":
            return a * eps - sg * x0
        da, ds = col(self.sde.dalpha_dt(t), x), col(self.sde.dsigma_dt(t), x)
        return da * x0 + ds * eps


def gaussian_marginal(sde, mu: float, s: float, t: float):
    """(mean, variance) of x_t for data N(mu, s^2): (alpha mu, alpha^2 s^2 + sigma^2)."""
    tt = torch.tensor(float(t), dtype=F64)
    a, sg = float(sde.alpha(tt)), float(sde.sigma(tt))
    return a * mu, a * a * s * s + sg * sg


def gaussian_flow(sde, mu: float, s: float, x_u: torch.Tensor, t_u: float, t: float) -> torch.Tensor:
    """Exact probability-flow ODE map from time t_u to t for data N(mu, s^2 I) (affine)."""
    m_u, v_u = gaussian_marginal(sde, mu, s, t_u)
    m_t, v_t = gaussian_marginal(sde, mu, s, t)
    return m_t + math.sqrt(v_t / v_u) * (x_u - m_u)


from samplers.cli.convergence import fitted_order  # noqa: E402,F401 - one order fit, shared with `bench convergence`


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# -- comparisons ------------------------------------------------------------------------------------------------------

def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all elements."""
    return (a - b).pow(2).mean().sqrt().item()


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest entry of ``theirs``."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# -- a 2-D Gaussian mixture and its tight reference flow (the order tests' nonlinear problem) -------------------------

# a smooth three-component mixture (well separated modes make coarse grids switch modes, which
# is not the asymptotic regime an order test measures)
MIXTURE = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.0, 1.5]], stds=[0.4, 0.5, 0.3], weights=[0.3, 0.5, 0.2])


@functools.cache
def mixture_problem(sde_name):
    """(sde, x_T, the probability-flow ODE's end point from x_T by DOP853 at rtol = atol = 1e-12)."""
    sde = make_sde(sde_name)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * sde.prior_std
    ref = reference_solution(probability_flow_rhs(MIXTURE, sde), x_T, sde.t_max, sde.t_min, rtol=1e-12, atol=1e-12)
    return sde, x_T, ref


# -- the exact moments of an Euler-Maruyama chain on Gaussian data ---------------------------------------------------

EM_MU, EM_S = 1.0, 0.5  # the data N(EM_MU, EM_S^2) of em_moments


def em_moments(sde, times, mean, var, eta=1.0, noise_scale=1.0, score_factor=None):
    """Exact mean/variance of the EM chain x' = x + F dt + eta g sqrt(|dt|) z for N(EM_MU, EM_S^2) data:
    F = f x - c g^2 score, c = (1 + eta^2)/2, score = -(x - alpha mu)/(alpha^2 s^2 + sigma^2)."""
    c = 0.5 * (1 + eta**2) if score_factor is None else score_factor
    for k in range(len(times) - 1):
        t = times[k]
        dt = float(times[k + 1] - t)
        a, sg = float(sde.alpha(t)), float(sde.sigma(t))
        f, g2 = float(sde.f(t)), float(sde.g2(t))
        k2 = c * g2 / (a * a * EM_S**2 + sg * sg)
        gain = 1.0 + dt * (f + k2)
        mean = gain * mean - dt * k2 * a * EM_MU
        var = gain * gain * var + (noise_scale * eta) ** 2 * g2 * (-dt)
    return mean, var


# -- diffusers comparisons: one DDPM schedule and eps network on both sides -------------------------------------------

DDPM_N = 1000  # training timesteps
DDPM_BETAS = torch.linspace(1e-4, 0.02, DDPM_N, dtype=F64)


def ddpm_eps_net(x, n):
    """A deterministic nonlinear eps network of the discrete timestep n (ours: (B,) float, diffusers: int)."""
    n = torch.as_tensor(n, dtype=F64, device=x.device)
    c = 0.6 + 0.8 * torch.sin(n / DDPM_N * (math.pi / 2))
    if c.dim() == 1:
        c = c.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x * c) * 0.5 + 0.1 * x


class Float64Torch:
    """Stands in for ``torch`` inside a diffusers scheduler module: torch, except float32 is float64."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def float64_timesteps(sched, steps: int, final_sigma_zero: bool) -> torch.Tensor:
    """Give a diffusers scheduler float64 schedule tables (of DDPM_BETAS), set its timesteps, and return them.

    set_timesteps stores sigmas as float32; the integer timesteps index the float64 table exactly.
    The last sigma is 0 (final_sigmas_type="zero") or that of timestep 0 ("sigma_min")."""
    ac = torch.cumprod(1.0 - DDPM_BETAS, dim=0)
    sigmas_all = ((1.0 - ac) / ac).sqrt()
    sched.betas, sched.alphas, sched.alphas_cumprod = DDPM_BETAS.clone(), 1.0 - DDPM_BETAS, ac
    sched.alpha_t, sched.sigma_t = ac.sqrt(), (1.0 - ac).sqrt()
    sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)
    sched.sigmas = sigmas_all.clone()
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    last = torch.zeros(1, dtype=F64) if final_sigma_zero else sigmas_all[:1]
    sched.sigmas = torch.cat([sigmas_all[timesteps], last])
    assert sched.sigmas.dtype == F64
    return timesteps
