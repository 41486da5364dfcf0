"""Bad input is refused before any work, with a message naming the argument (issue 14, defects 5, 6,
7, 10, 11, 12); inputs that mean something reasonable (a numpy array of seeds, a 0-d seed tensor,
``shape=4``) are accepted and give what their plain-int equivalents give.

The network is a small ``nn.Module`` with parameters that require grad, called in grad mode, and
it counts its calls: a refusal "before any work" is one made with no network call.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from samplers import Model, NonFiniteError, grid, invert, likelihood, sample, sample_grad
from samplers.limits import MAX_STEPS, check_steps, run_memory_bytes
from sde import VPSDE, RectifiedFlowSDE
from sde.validation import (
    check_choice,
    check_count,
    check_flag,
    check_in_range,
    check_nonnegative,
    check_number,
    check_positive,
    check_predicts,
)
from solvers import (
    AdaptiveDPMSolver,
    AdaptiveODE,
    DPMSolver,
    DPMSolverSDE,
    Euler,
    Heun,
    Restart,
    Reversible,
    Solver,
    UniPC,
)


class ScaleNet(nn.Module):
    """out = w * x + b * t, elementwise (any state shape), with trainable w and b; counts its calls."""

    def __init__(self, w: float = 0.5, b: float = 0.1):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.w.to(x.dtype) * x + self.b.to(x.dtype) * t.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def vp_model(predicts="eps"):
    net = ScaleNet()
    return Model(net, VPSDE(), predicts=predicts), net


# -- defect 5: absurd step counts and shapes are refused in the plan -------------------------------

def test_absurd_step_count_is_refused_before_allocating():
    model, net = vp_model()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"steps=10000000 is more than MAX_STEPS={MAX_STEPS}"):
        grid(model.sde, 10**7)
    with pytest.raises(ValueError, match=rf"steps=10000000 is more than MAX_STEPS={MAX_STEPS}"):
        sample(model, Euler(), shape=(2, 3), steps=10**7)
    with pytest.raises(ValueError, match=rf"steps=10000000 is more than MAX_STEPS={MAX_STEPS}"):
        invert(model, DPMSolver(1), torch.zeros(2, 3), steps=10**7)
    # an explicit grid longer than the limit too (its tables would be as large)
    long_grid = torch.linspace(1.0, 1e-3, MAX_STEPS + 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"grid has {MAX_STEPS + 1} steps, more than MAX_STEPS"):
        sample(model, Euler(), x_T=torch.zeros(2, 3), grid=long_grid)
    assert time.perf_counter() - start < 2.0 and net.calls == 0
    assert check_steps(MAX_STEPS) == MAX_STEPS


def test_a_state_the_machine_cannot_hold_is_refused_naming_the_argument():
    model, net = vp_model()
    with pytest.raises(ValueError, match=r"shape: a state of shape \(1000000000, 3, 512, 512\) in float32 over 10 "
                                         r"steps .* needs at least .* more than the .* available on cpu: draw at most "
                                         r"\d+ samples"):
        sample(model, Euler(), shape=(10**9, 3, 512, 512), steps=10)
    # a state that exists (a broadcast view takes no memory) still needs a copy, the output and the times
    huge = torch.zeros(1, 1).expand(2**30, 2**20)
    with pytest.raises(ValueError, match=r"x_T: a state of shape \(1073741824, 1048576\)"):
        sample(model, Euler(), x_T=huge, steps=10)
    with pytest.raises(ValueError, match=r"x0: a state of shape"):
        invert(model, DPMSolver(1), huge, steps=10)
    with pytest.raises(ValueError, match=r"x: a state of shape"):
        likelihood(model, huge)
    assert net.calls == 0


def test_memory_bound_counts_state_output_and_times():
    # two state-sized buffers plus (N+1) x B network times plus one float64 (N+1) x C table
    assert run_memory_bytes((4, 3), torch.float32, 10, 1) == 2 * 12 * 4 + 11 * (4 * 4 + 8)


# -- defect 6: a non-finite start is refused up front; a NaN network is named as the culprit --------

@pytest.mark.parametrize("solver", [DPMSolver(2), AdaptiveODE(), AdaptiveDPMSolver()], ids=repr)
def test_non_finite_x_T_is_refused_before_any_network_call(solver):
    model, net = vp_model()
    x_T = torch.zeros(3, 2)
    x_T[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x_T must be finite \(it has NaN or Inf entries, first in sample 1\)"):
        sample(model, solver, x_T=x_T, steps=None if getattr(solver, "adaptive", False) else 5)
    assert net.calls == 0


def test_non_finite_x_is_refused_by_sample_grad_and_invert():
    model, net = vp_model()
    x = torch.tensor([[0.0, float("inf")]])
    with pytest.raises(ValueError, match="x_T must be finite"):
        sample_grad(model, DPMSolver(1), x, steps=3)
    with pytest.raises(ValueError, match="x0 must be finite"):
        invert(model, DPMSolver(1), x, steps=3)
    assert net.calls == 0


def test_nan_network_is_blamed_in_likelihood_and_adaptive_runs():
    net = ScaleNet()
    with torch.no_grad():
        net.w.fill_(float("nan"))  # a broken checkpoint: finite inputs, NaN outputs
    model = Model(net, VPSDE(), predicts="eps")
    message = r"sample 0: at t=0.001 \(network call 1\) the network returned NaN or Inf for a finite input"
    with pytest.raises(NonFiniteError, match=message):
        likelihood(model, torch.zeros(2, 3))
    assert net.calls == 1
    for solver in (AdaptiveODE(), AdaptiveDPMSolver()):
        with pytest.raises(NonFiniteError, match=r"sample 0: at t=1 \(network call 1\) the network returned NaN"):
            sample(model, solver, shape=(2, 3))


# -- defect 7: a state on the meta device ------------------------------------------------------------

def test_meta_state_is_refused_up_front():
    model, net = vp_model()
    meta = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match="x_T is on the meta device, which holds no values"):
        sample(model, Euler(), x_T=meta, steps=3)
    with pytest.raises(ValueError, match="x_T is on the meta device"):
        sample(model, AdaptiveODE(), x_T=meta)
    with pytest.raises(ValueError, match="x0 is on the meta device"):
        invert(model, DPMSolver(1), meta, steps=3)
    with pytest.raises(ValueError, match="x is on the meta device"):
        likelihood(model, meta)
    with pytest.raises(ValueError, match="device: the meta device holds no values"):
        sample(model, Euler(), shape=(2, 3), steps=3, device="meta")
    assert net.calls == 0


# -- defect 10: per-sample grid errors quote the offending sample's column --------------------------

def test_non_decreasing_column_is_quoted():
    model, _ = vp_model()
    times = torch.tensor([[1.0, 1.0], [0.75, 0.5], [0.25, 0.5], [0.001, 0.001]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"step 1 of sample 1 \(column 1\) goes from 0.5 to 0.5"):
        sample(model, Euler(), x_T=torch.zeros(2, 3), grid=times)


def test_singular_coefficient_quotes_the_sample_column():
    sde = RectifiedFlowSDE()
    model = Model(ScaleNet(), sde, predicts="eps")
    # sample 0 starts below t = 1, sample 1 at t = 1 where alpha = 0 and an eps network is singular
    times = torch.tensor([[0.99, 1.0], [0.5, 0.5], [0.001, 0.001]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the step from t=1 to t=0.5 \(step 0, sample 1\) has a non-finite"):
        sample(model, Heun(), x_T=torch.zeros(2, 3), grid=times)


def test_grid_off_the_prior_quotes_the_sample_column():
    model, _ = vp_model()
    times = torch.tensor([[1.0, 0.9], [0.5, 0.5], [0.001, 0.001]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the grid starts at t=0.9 for sample 1, not at t_max=1"):
        sample(model, Euler(), shape=(2, 3), grid=times)


def test_nan_state_quotes_the_sample_column():
    sde = VPSDE()

    def poisoned_below_half(x, t):
        return torch.where(t.reshape(-1, 1) < 0.5, torch.full_like(x, float("nan")), 0.1 * x)

    model = Model(poisoned_below_half, sde, predicts="eps")
    # sample 0 stays above t = 0.5; sample 1 goes below it at step 1
    times = torch.tensor([[1.0, 1.0], [0.8, 0.6], [0.6, 0.3], [0.55, 0.1]], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"at step 2 of 3 \(t=0.3 -> 0.1 for sample 1\)"):
        sample(model, Euler(), x_T=torch.zeros(2, 3), grid=times, final_denoise=False)


# -- defect 11: AdaptiveDPMSolver gives the singular-parametrisation refusal of every solver ---------

def test_adaptive_dpm_refuses_an_eps_network_at_alpha_zero_like_the_fixed_grid_solvers():
    sde = RectifiedFlowSDE()
    net = ScaleNet()
    model = Model(net, sde, predicts="eps")
    singular = r"has a non-finite coefficient .*; the SDE or the model's parametrisation is singular there"
    with pytest.raises(ValueError, match=r"DPMSolver\(order=2, predicts='x0'\): the step from t=1 .*" + singular):
        sample(model, DPMSolver(2), shape=(2, 3), steps=4)
    with pytest.raises(ValueError, match=r"AdaptiveDPMSolver\(order=\(2, 3\), predicts='x0'\): sample 0: the step "
                                         r"from t=1 to t=\S+ has a non-finite coefficient 'conv_x'; .*singular there"):
        sample(model, AdaptiveDPMSolver(), shape=(2, 3))
    # the noise form is singular there for any network: alpha_t / alpha_s from alpha_s = 0
    with pytest.raises(ValueError, match=r"sample 0: the step from t=1 .* non-finite coefficient 'x'; .*singular"):
        sample(Model(net, sde, predicts="x0"), AdaptiveDPMSolver(predicts="eps"), shape=(2, 3))
    assert net.calls == 0
    # below t = 1 it runs
    out = sample(model, AdaptiveDPMSolver(), x_T=torch.zeros(2, 3), grid=torch.tensor([0.99, 1e-3]))
    assert torch.isfinite(out).all()


# -- defect 12: obscure or silent argument handling ---------------------------------------------------

def _run(model, **kwargs):
    kwargs.setdefault("shape", (4, 3))
    return sample(model, Euler(eta=0.0), steps=2, **kwargs).detach()


def test_seed_arrays_and_0d_tensors_are_accepted():
    model, _ = vp_model()
    reference = _run(model, seed=[0, 1, 2, 3])
    assert torch.equal(_run(model, seed=np.arange(4)), reference)
    assert torch.equal(_run(model, seed=torch.arange(4)), reference)
    assert torch.equal(_run(model, seed=torch.tensor(3)), _run(model, seed=3))
    assert torch.equal(_run(model, seed=np.int64(3)), _run(model, seed=3))
    assert torch.equal(_run(model, seed=np.array(3)), _run(model, seed=3))
    with pytest.raises(TypeError, match=r"seed: expected integers, got values of dtype float64"):
        _run(model, seed=np.arange(4) / 2)
    with pytest.raises(TypeError, match=r"seed: expected integers, got 3.0 \(float\)"):
        _run(model, seed=[0, 1, 2, 3.0])
    with pytest.raises(TypeError, match=r"seed: expected integers, got values of dtype torch.float32"):
        _run(model, seed=torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"seed: expected an int or a 1-D sequence of 4 ints, got shape \(2, 2\)"):
        _run(model, seed=np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"seed: expected an int or one seed per sample \(4\), got 3 seeds"):
        _run(model, seed=np.arange(3))


def test_sample_index_is_integers_in_range_never_truncated():
    model, _ = vp_model()
    reference = _run(model, sample_index=[5, 6, 7, 8])
    assert torch.equal(_run(model, sample_index=np.arange(5, 9)), reference)
    assert torch.equal(_run(model, sample_index=torch.arange(5, 9)), reference)
    with pytest.raises(ValueError, match=r"sample_index: expected integers in \[0, 2\^32\), got 18446744073709551616"):
        _run(model, sample_index=[0, 1, 2, 2**64])
    with pytest.raises(TypeError, match=r"sample_index: expected integers, got 0.5 \(float\)"):
        _run(model, sample_index=[0.5, 1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match=r"sample_index: expected integers, got values of dtype torch.float64"):
        _run(model, sample_index=torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64))


def test_shape_int_means_a_batch_of_scalars_and_non_integers_are_refused():
    model, _ = vp_model()
    assert torch.equal(_run(model, shape=4), _run(model, shape=(4,)))
    assert torch.equal(_run(model, shape=np.int64(4)), _run(model, shape=(4,)))
    for bad in ((4.5, 2), (4.0, 2), (4, True)):
        with pytest.raises(TypeError, match=r"shape must contain ints, got .* \(the entry .* is a (float|bool)\)"):
            _run(model, shape=bad)
    with pytest.raises(TypeError, match="shape must be a tuple of ints"):
        _run(model, shape=4.0)


def test_empty_and_complex_states_are_refused():
    model, net = vp_model()
    with pytest.raises(ValueError, match=r"x_T must have at least one element per sample .* got shape \(4, 0\)"):
        sample(model, Euler(), x_T=torch.zeros(4, 0), steps=2)
    with pytest.raises(ValueError, match=r"x_T must be a floating tensor .* got the complex dtype"):
        sample(model, Euler(), x_T=torch.zeros(4, 2, dtype=torch.complex64), steps=2)
    assert net.calls == 0


@pytest.mark.parametrize("rho", [0, -1, float("inf"), True])
def test_karras_rho_must_be_positive(rho):
    with pytest.raises(ValueError, match=r"rho must be a positive finite number \(EDM's karras grid uses 7\)"):
        grid(VPSDE(), 5, "karras", rho=rho)


def test_base_solver_is_refused_with_a_message():
    model, net = vp_model()
    with pytest.raises(TypeError, match=r"solver: Solver does not implement prepare\(\), step\(\); pass a solver"):
        sample(model, Solver(), shape=(2, 3), steps=2)

    class HalfDone(Solver):
        def prepare(self, model, times):
            return {}

    with pytest.raises(TypeError, match=r"solver: HalfDone does not implement step\(\)"):
        sample(model, HalfDone(), shape=(2, 3), steps=2)
    with pytest.raises(NotImplementedError, match=r"Solver does not implement step\(\)"):
        Solver().step(0, None, None)
    assert net.calls == 0


def test_callback_and_final_denoise_types_are_checked_before_any_step():
    model, net = vp_model()
    with pytest.raises(TypeError, match="callback must be callable"):
        sample(model, Euler(), shape=(2, 3), steps=2, callback=3)
    for bad in ("yes", 1, np.bool_(True)):
        with pytest.raises(TypeError, match=r"final_denoise must be True, False or None"):
            sample(model, Euler(), shape=(2, 3), steps=2, final_denoise=bad)
    with pytest.raises(TypeError, match=r"final_denoise must be True or False, got 'yes'"):
        sample_grad(model, DPMSolver(1), torch.zeros(2, 3), steps=2, final_denoise="yes")
    with pytest.raises(TypeError, match=r"return_state must be True or False, got 1"):
        sample_grad(model, DPMSolver(1), torch.zeros(2, 3), steps=2, return_state=1)
    with pytest.raises(TypeError, match=r"return_info must be True or False, got 'no'"):
        sample(model, Euler(), shape=(2, 3), steps=2, return_info="no")
    assert net.calls == 0


def test_adaptive_grid_must_be_two_times():
    model, net = vp_model()
    for bad in (torch.tensor(1.0), torch.tensor([1.0, 0.5, 0.1]), torch.zeros(2, 2, 2)):
        with pytest.raises(ValueError, match=r"grid: an adaptive solver takes grid=\(t_start, t_end\)"):
            sample(model, AdaptiveODE(), shape=(2, 3), grid=bad)
    assert net.calls == 0


# -- sde.validation: the shared argument checks ---------------------------------------------------------

@pytest.mark.parametrize("check, args, error, message", [
    (check_positive, ("snr", 0.0, "Langevin"), ValueError, r"Langevin: snr must be a positive finite number, got 0.0"),
    (check_positive, ("snr", True), ValueError, r"snr must be a positive finite number, got True"),
    (check_positive, ("snr", "0.1"), ValueError, r"got '0.1'"),
    (check_nonnegative, ("atol", float("nan")), ValueError, r"atol must be a finite number >= 0, got nan"),
    (check_in_range, ("coupling", 1.5, 0.0, 1.0, None), ValueError, r"coupling must be a number in \[0, 1\]"),
    (lambda *a: check_in_range(*a, closed="left"), ("s", 1.0, 0.0, 1.0, "CosineVPSDE"), ValueError,
     r"CosineVPSDE: s must be a number in \[0, 1\)"),
    (check_count, ("steps", 2.0), ValueError, r"steps must be an int >= 1, got 2.0"),
    (lambda *a: check_count(*a, maximum=30), ("depth", 31), ValueError, r"depth must be an int in \[1, 30\], got 31"),
    (check_flag, ("corrector", 1), TypeError, r"corrector must be True or False, got 1"),
    (check_flag, ("corrector", None), TypeError, r"corrector must be True or False, got None"),
    (lambda *a: check_flag(*a, allow_none=True), ("final_denoise", "no"), TypeError,
     r"final_denoise must be True, False or None \(the default\), got 'no'"),
    (check_choice, ("order", True, (1, 2, 3)), ValueError, r"order must be 1, 2 or 3, got True"),
    (check_choice, ("variant", torch.tensor(1), ("bh1", "bh2")), ValueError, r"variant must be 'bh1' or 'bh2'"),
    (check_predicts, ("noise",), ValueError, r"predicts='noise' is spelt predicts='eps'"),
    (check_predicts, ("v",), ValueError, r"predicts must be 'x0' or 'eps', got 'v'"),
])
def test_validation_messages_name_the_argument_and_what_is_allowed(check, args, error, message):
    with pytest.raises(error, match=message):
        check(*args)


def test_validation_returns_the_working_type():
    assert check_positive("x", np.float32(2.0)) == 2.0 and type(check_positive("x", 2)) is float
    assert check_count("n", np.int64(3), maximum=30) == 3 and type(check_count("n", np.int64(3))) is int
    assert check_in_range("c", 1, 0.0, 1.0, closed="right") == 1.0
    assert check_choice("order", 2, (1, 2, 3)) == 2 and check_predicts("x0") == "x0"
    assert check_flag("f", False) is False and check_number("x", -3) == -3.0
    assert check_flag("f", None, allow_none=True) is None


@pytest.mark.parametrize("make", [
    lambda: DPMSolver(predict="x0"), lambda: DPMSolver(method="singlestep"), lambda: UniPC(predict="x0"),
    lambda: DPMSolverSDE(solver_type="heun"), lambda: AdaptiveODE(method="bosh3"), lambda: Reversible(base="heun"),
    lambda: Reversible(stochastic=True), lambda: Restart(units="time"), lambda: Restart(Heun()),
])
def test_old_keywords_are_refused_by_python(make):
    with pytest.raises(TypeError):
        make()
