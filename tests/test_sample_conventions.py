"""Conventions users of diffusers and k-diffusion expect from sample(): the callback sees the final denoising
step and the noise level sigma, may replace the state or stop the run; a progress bar on a terminal;
``generator=`` for the prior draw."""

from __future__ import annotations

import io

import pytest
import torch

from samplers import STOP, Model, grid, sample
from samplers.driver import _progress_bar
from sde import VPSDE, DirichletSDE
from solvers import DPMSolver, Euler, JacobiEulerMaruyama

F64 = torch.float64


def _net(x, t):
    return torch.tanh(x) * 0.5 + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1)))


def _model():
    return Model(_net, VPSDE(), predicts="eps")


def _x_T(batch=3):
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


def test_callback_sees_every_step_then_the_final_denoising_step_with_sigma():
    model, steps = _model(), 5
    seen = []
    out = sample(model, DPMSolver(2), x_T=_x_T(), steps=steps, callback=seen.append)
    assert [info.step for info in seen] == list(range(steps + 1))
    assert [info.final for info in seen] == [False] * steps + [True]
    times = grid(model.sde, steps)
    for info in seen[:-1]:
        t, t_next = times[info.step], times[info.step + 1]
        sde = model.sde
        assert torch.allclose(info.sigma, sde.sigma(t) / sde.alpha(t), rtol=1e-14)
        assert torch.allclose(info.sigma_next, sde.sigma(t_next) / sde.alpha(t_next), rtol=1e-14)
    last = seen[-1]
    assert torch.equal(last.x, out) and torch.equal(last.denoised, out) and last.step == last.steps == steps
    assert float(last.sigma_next) == 0.0 and float(last.t) == float(times[-1]) and last.nfe == steps + 1


def test_callback_reports_no_sigma_off_gaussian_sdes():
    sde = DirichletSDE(3)
    model = Model(lambda v, t: torch.zeros_like(v), sde, predicts="score")
    seen = []
    sample(model, JacobiEulerMaruyama(), shape=(2, 2), steps=2, callback=seen.append)
    assert [info.sigma for info in seen] == [None, None] and not seen[-1].final


def test_callback_may_replace_the_state():
    model, steps, k = _model(), 6, 2
    replaced = torch.full((3, 2), 0.25, dtype=F64)
    out = sample(model, Euler(), x_T=_x_T(), steps=steps,
                 callback=lambda info: replaced if info.step == k else None)
    # Euler carries nothing but x: the rest of the run is a fresh run from the replaced state
    rest = sample(model, Euler(), x_T=replaced, grid=grid(model.sde, steps)[k + 1:])
    assert torch.equal(out, rest)
    assert not torch.equal(out, sample(model, Euler(), x_T=_x_T(), steps=steps))
    # the final denoising step's callback may replace the returned sample
    out = sample(model, Euler(), x_T=_x_T(), steps=2, callback=lambda info: info.x * 0 if info.final else None)
    assert torch.equal(out, torch.zeros_like(out))


def test_callback_may_stop_the_run():
    model, steps, k = _model(), 6, 2
    solver = DPMSolver(2, lower_order_final=False)  # the same step orders on the shorter grid
    out, info = sample(model, solver, x_T=_x_T(), steps=steps, return_info=True,
                       callback=lambda i: STOP if i.step == k else None)
    # the state after step k, without the final denoising step
    expected = sample(model, solver, x_T=_x_T(), grid=grid(model.sde, steps)[: k + 2], final_denoise=False)
    assert torch.equal(out, expected)
    assert info.steps == k + 1 and info.nfe == k + 1


def test_bad_callback_returns_are_refused():
    model = _model()
    with pytest.raises(TypeError, match="callback must return None, a new state"):
        sample(model, Euler(), x_T=_x_T(), steps=3, callback=lambda info: 1.0)
    with pytest.raises(ValueError, match="callback returned a state of shape"):
        sample(model, Euler(), x_T=_x_T(), steps=3, callback=lambda info: torch.zeros(2))


def test_progress_bar_defaults_on_for_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = _progress_bar(None, 5)
    assert bar is not None
    bar.close()
    assert _progress_bar(False, 5) is None
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert _progress_bar(None, 500) is None


def test_generator_draws_the_prior_as_diffusers_does():
    model = _model()  # VP: the prior is N(0, 1), so the draw is the starting state itself
    out = sample(model, Euler(), shape=(3, 2), steps=3, dtype=F64, generator=torch.Generator().manual_seed(4))
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.equal(out, sample(model, Euler(), x_T=x_T, steps=3))
    # one generator per sample: row i is generator i's draw, whatever the batch
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    both = sample(model, Euler(), shape=(3, 2), steps=3, dtype=F64, generator=generators)
    alone = sample(model, Euler(), shape=(1, 2), steps=3, dtype=F64, generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(both[1:2], alone)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample(model, Euler(), shape=(3, 2), steps=3, generator=4)
    with pytest.raises(ValueError, match="one per sample"):
        sample(model, Euler(), shape=(3, 2), steps=3, generator=generators[:2])
    with pytest.raises(ValueError, match="generator draws the prior sample"):
        sample(model, Euler(), x_T=x_T, steps=3, generator=generators[0])
