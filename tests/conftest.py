"""Shared fixtures and helpers for the sampler test-suite.

The helpers here are written from the definitions (x_t = alpha x0 + sigma eps), independently
of the library's conversion code, so that tests compare the library against first principles.
"""

from __future__ import annotations

import math

import pytest
import torch

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
