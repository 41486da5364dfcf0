"""Same-increment agreement with torchsde: our EulerMaruyama on the reverse SDE equals
torchsde.sdeint(method="euler") on the time-reversed SDE driven by the very same Brownian
increments sqrt(|dt_k|) z_k, z_k = NoiseSource(seed, B).normal(shape, counter=k)."""

from __future__ import annotations

import math

import pytest
import torch

torchsde = pytest.importorskip("torchsde")
from conftest import F64, make_sde  # noqa: E402
from torchsde._brownian.brownian_base import BaseBrownian  # noqa: E402

from samplers import Model, grid, sample  # noqa: E402
from samplers.noise import STREAM_STEP, NoiseSource  # noqa: E402
from samplers.problems import GaussianMixture  # noqa: E402
from solvers import EulerMaruyama  # noqa: E402

MIXTURE = GaussianMixture([[1.0, -0.5, 0.3], [-1.0, 0.5, 0.0]], stds=[[0.3, 0.5, 0.4], [0.6, 0.2, 0.5]],
                          weights=[0.4, 0.6])


class GridBrownian(BaseBrownian):
    """Brownian increments on a fixed grid of reverse times s_0 < s_1 < ... < s_N: bm(s_k, s_{k+1})
    returns sqrt(s_{k+1} - s_k) z_k with our keyed normals z_k; any other query is an error."""

    def __init__(self, s_grid: torch.Tensor, seed, batch: int, dim: int):
        self.s = s_grid
        self.noise = NoiseSource(seed, batch)
        self.batch, self.dim = batch, dim
        self.queries = []

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        assert tb is not None and not return_U and not return_A
        ta, tb = float(ta), float(tb)
        k = int(torch.argmin((self.s - ta).abs()))
        assert self.s[k].item() == ta and self.s[k + 1].item() == tb, (ta, tb)
        self.queries.append(k)
        z = self.noise.normal((self.dim,), counter=k, stream=STREAM_STEP, dtype=F64)
        return math.sqrt(tb - ta) * z

    def __repr__(self):
        return "GridBrownian()"

    @property
    def dtype(self):
        return F64

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def shape(self):
        return torch.Size((self.batch, self.dim))

    @property
    def levy_area_approximation(self):
        return "none"


class ReversedSDE(torch.nn.Module):
    """dx = -F(x, T - s) ds + eta g(T - s) dW_s with F = f x - (1 + eta^2)/2 g^2 score (forward-time
    reverse drift), written from the SDE's f, g^2 and the mixture's exact score."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde, t_top: float, eta: float):
        super().__init__()
        self.sde, self.t_top, self.eta = sde, t_top, eta

    def _t(self, s, y):
        return torch.full((y.shape[0],), self.t_top - float(s), dtype=F64)

    def f(self, s, y):
        t = self._t(s, y)
        score = MIXTURE.score(self.sde, y, t)
        drift = self.sde.f(t)[:, None] * y - 0.5 * (1 + self.eta**2) * self.sde.g2(t)[:, None] * score
        return -drift

    def g(self, s, y):
        t = self._t(s, y)
        return (self.eta * torch.sqrt(self.sde.g2(t)))[:, None].expand_as(y).clone()


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("sde_name, kind, steps", [("VP", "uniform", 40), ("VE", "log_snr", 40),
                                                   ("EDM", "karras", 30)])
def test_euler_maruyama_matches_torchsde_euler(sde_name, kind, steps, eta):
    sde = make_sde(sde_name)
    batch, dim, seed = 6, 3, 2024
    times = grid(sde, steps, kind)
    x_T = torch.randn(batch, dim, generator=torch.Generator().manual_seed(3), dtype=F64) * sde.prior_std

    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    ours = sample(model, EulerMaruyama(eta=eta), x_T=x_T, grid=times, seed=seed, final_denoise=False, dtype=F64)

    t_top = float(times[0])
    s_grid = t_top - times  # increasing reverse time, s_0 = 0
    bm = GridBrownian(s_grid, seed, batch, dim)
    rsde = ReversedSDE(sde, t_top, eta)
    y = x_T.clone()
    for k in range(steps):
        # one sdeint call per grid interval, with dt larger than the interval: exactly one Euler step
        ts = s_grid[k:k + 2].clone()
        y = torchsde.sdeint(rsde, y, ts, bm=bm, method="euler", dt=2 * float(ts[1] - ts[0]))[-1]
    assert bm.queries == list(range(steps))
    diff = (ours - y).abs().max().item()
    assert diff <= 1e-10, diff
    # the comparison is not vacuous: the noise moved the state by much more than the tolerance
    ode = sample(model, EulerMaruyama(eta=0.0), x_T=x_T, grid=times, final_denoise=False, dtype=F64)
    assert (ours - ode).abs().max().item() > 1e-2


def test_torchsde_with_other_noise_disagrees():
    """Control: a different seed in the Brownian motion gives a clearly different endpoint."""
    sde = make_sde("VP")
    times = grid(sde, 20)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    ours = sample(model, EulerMaruyama(), x_T=x_T, grid=times, seed=1, final_denoise=False)
    s_grid = 1.0 - times
    bm = GridBrownian(s_grid, 2, 4, 3)
    y = x_T.clone()
    for k in range(20):
        ts = s_grid[k:k + 2].clone()
        y = torchsde.sdeint(ReversedSDE(sde, 1.0, 1.0), y, ts, bm=bm, method="euler", dt=1.0)[-1]
    assert (ours - y).abs().max().item() > 1e-2
