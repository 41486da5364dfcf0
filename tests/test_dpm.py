"""DPMSolver: multistep DPM-Solver (predicts="eps") and DPM-Solver++ (predicts="x0"), float64.

Convergence orders are measured as in test_convergence.py: pathwise error at t_min against the
exact probability-flow map from the same x_T, least-squares slope of log error against log N.
On Gaussian data the third-order multistep method superconverges (slope ~3.5-4: the error
constant of its h^3 term is small for that trajectory), so there it must be at least third
order; on a Gaussian mixture (DOP853 reference) the slope must be within 0.2 of 3.  The
reference implementation's 3M coefficient (D2 without its factor 2) would measure ~2.1 there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    F64,
    MIXTURE,
    GaussianNet,
    GaussianX0Net,
    fitted_order,
    gaussian_flow,
    make_sde,
    mixture_problem,
    rms,
)

from samplers import Model, grid, sample
from solvers import DPMSolver, Solver

MU, S = 0.7, 0.5
TOL = 0.2
PREDICTS = ("x0", "eps")


def errors_for(model, solver, x_T, reference, sde, kind, steps):
    return [rms(sample(model, solver, x_T=x_T, grid=grid(sde, n, kind), final_denoise=False, dtype=F64), reference)
            for n in steps]


# (sde, grid kind, order, step counts): asymptotic ranges, far above the float64 floor
GAUSSIAN_CASES = [
    (sde_name, kind, order, [20, 40, 80, 160] if order < 3 else [16, 32, 64, 128])
    for sde_name, kind in [("VP", "log_snr"), ("VE", "log_snr"), ("EDM", "karras"), ("EDM", "log_snr")]
    for order in (1, 2, 3)
    if not (kind == "karras" and order == 3)  # karras steps are not uniform in lambda: slow to settle
]


@pytest.mark.parametrize("predict", PREDICTS)
@pytest.mark.parametrize("sde_name, kind, order, steps", GAUSSIAN_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in GAUSSIAN_CASES])
def test_order_gaussian_data(sde_name, kind, order, steps, predict):
    sde = make_sde(sde_name)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * sde.prior_std
    reference = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    errors = errors_for(model, DPMSolver(order, predict), x_T, reference, sde, kind, steps)
    slope = fitted_order(steps, errors)
    assert errors[-1] > 1e-10, errors  # not at the roundoff floor
    if order < 3:
        assert abs(slope - order) <= TOL, (slope, errors)
    else:
        assert slope >= order - TOL, (slope, errors)  # superconvergent on Gaussian data (see above)
        assert slope <= 4.6, (slope, errors)


@pytest.mark.parametrize("predict", PREDICTS)
@pytest.mark.parametrize("sde_name", ["VP", "EDM"])
def test_order_mixture_data(sde_name, predict):
    sde, x_T, reference = mixture_problem(sde_name)
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    for order, steps in ((2, [32, 64, 128, 256]), (3, [32, 64, 128, 256])):
        errors = errors_for(model, DPMSolver(order, predict), x_T, reference, sde, "log_snr", steps)
        slope = fitted_order(steps, errors)
        assert abs(slope - order) <= TOL, (order, slope, errors)


def ddim(net, sde, x_T, times):
    """Deterministic DDIM written from the definitions: x_t = alpha_t x0_hat + sigma_t eps_hat."""
    x = x_T.clone()
    for k in range(len(times) - 1):
        s, t = times[k], times[k + 1]
        x0_hat = net(x, torch.full((x.shape[0],), float(s), dtype=F64))
        eps_hat = (x - sde.alpha(s) * x0_hat) / sde.sigma(s)
        x = sde.alpha(t) * x0_hat + sde.sigma(t) * eps_hat
    return x


@pytest.mark.parametrize("sde_name, kind", [("VP", "log_snr"), ("VE", "log_snr"), ("EDM", "karras")])
@pytest.mark.parametrize("predict", PREDICTS)
@pytest.mark.parametrize("net_predicts", ["x0", "eps", "v"])
def test_order_one_is_ddim(sde_name, kind, predict, net_predicts):
    sde = make_sde(sde_name)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=F64) * sde.prior_std
    times = grid(sde, 12, kind)
    expected = ddim(GaussianX0Net(sde, MU, S), sde, x_T, times)
    model = Model(GaussianNet(sde, net_predicts, MU, S), sde, predicts=net_predicts)
    got = sample(model, DPMSolver(1, predict), x_T=x_T, grid=times, final_denoise=False, dtype=F64)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12 * sde.prior_std), rms(got, expected)
    # and the multistep orders are not DDIM (the history terms are used)
    other = sample(model, DPMSolver(2, predict), x_T=x_T, grid=times, final_denoise=False, dtype=F64)
    assert rms(other, expected) > 1e-6


@pytest.mark.parametrize("sde_name, kind", [("VP", "log_snr"), ("VE", "log_snr"), ("EDM", "karras"),
                                            ("CosineVP", "log_snr")])
@pytest.mark.parametrize("net_predicts", ["x0", "eps"])
def test_point_mass_data_is_exact(sde_name, kind, net_predicts):
    """Data = a point mass at MU: x0_hat = MU and eps is constant along the flow, so every order
    (with any history, warm-up or final lowering) integrates the ODE exactly."""
    sde = make_sde(sde_name)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * sde.prior_std
    t_max, t_min = torch.tensor(sde.t_max, dtype=F64), torch.tensor(sde.t_min, dtype=F64)
    eps = (x_T - sde.alpha(t_max) * MU) / sde.sigma(t_max)
    exact = sde.alpha(t_min) * MU + sde.sigma(t_min) * eps
    model = Model(GaussianNet(sde, net_predicts, MU, 0.0), sde, predicts=net_predicts)
    for order in (1, 2, 3):
        for predict in PREDICTS:
            for steps, lof in ((5, True), (5, False), (13, True)):
                got = sample(model, DPMSolver(order, predict, lower_order_final=lof), x_T=x_T,
                             grid=grid(sde, steps, kind), final_denoise=False, dtype=F64)
                assert (got - exact).abs().max().item() < 1e-10, (order, predict, steps, lof)


def test_step_orders():
    assert DPMSolver(3).step_orders(5) == [1, 2, 3, 2, 1]
    assert DPMSolver(3, lower_order_final=False).step_orders(5) == [1, 2, 3, 3, 3]
    assert DPMSolver(3).step_orders(12) == [1, 2] + [3] * 10  # lowering only below 10 steps
    assert DPMSolver(2).step_orders(4) == [1, 2, 2, 1]
    assert DPMSolver(2).step_orders(1) == [1]
    assert DPMSolver(1).step_orders(3) == [1, 1, 1]


def test_lower_order_final_changes_short_runs_only():
    sde = make_sde("VP")
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    run = lambda n, lof: sample(model, DPMSolver(3, lower_order_final=lof), x_T=x_T, steps=n, grid_kind="log_snr",
                                final_denoise=False, dtype=F64)
    assert not torch.equal(run(6, True), run(6, False))
    assert torch.equal(run(12, True), run(12, False))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final_denoise", [True, False])
def test_nfe_is_one_per_step(order, final_denoise):
    sde = make_sde("EDM")
    net = GaussianX0Net(sde, MU, S)
    model = Model(net, sde, predicts="x0")
    for steps in (1, 4, 15):
        net.calls = 0
        _, info = sample(model, DPMSolver(order), shape=(3, 2), steps=steps, final_denoise=final_denoise,
                         dtype=F64, return_info=True)
        expected = steps + int(final_denoise)
        assert info.nfe == expected and net.calls == expected and info.steps == steps


def test_per_sample_grids():
    """A (N+1, B) grid gives each sample the result of its own run."""
    sde = make_sde("VP")
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    grids = torch.stack([grid(sde, 8, kind) for kind in ("log_snr", "uniform", "quadratic")], dim=1)
    for order in (2, 3):
        together = sample(model, DPMSolver(order, "eps"), x_T=x_T, grid=grids, final_denoise=False, dtype=F64)
        for b in range(3):
            alone = sample(model, DPMSolver(order, "eps"), x_T=x_T[b:b + 1], grid=grids[:, b],
                           final_denoise=False, dtype=F64)
            assert torch.allclose(together[b:b + 1], alone, rtol=1e-13, atol=1e-14)


def test_attributes_and_repr():
    s = DPMSolver(order=2, predicts="x0")
    assert isinstance(s, Solver) and s.gaussian_only and not s.stochastic
    assert (s.order, s.nfe_per_step) == (2, 1)
    assert repr(s) == "DPMSolver(order=2, predicts='x0')"
    assert repr(DPMSolver(3, "eps", lower_order_final=False)) == \
        "DPMSolver(order=3, predicts='eps', lower_order_final=False)"
    assert DPMSolver(1).order == 1 and DPMSolver(3).order == 3


@pytest.mark.parametrize("order", [0, 4, 2.5, "2", True, None])
def test_bad_order(order):
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        DPMSolver(order=order)


@pytest.mark.parametrize("predicts", ["v", "X0", "score", None, 1])
def test_bad_predicts(predicts):
    with pytest.raises(ValueError, match="predicts must be 'x0' or 'eps'"):
        DPMSolver(predicts=predicts)


@pytest.mark.parametrize("old, new", [("data", "x0"), ("noise", "eps")])
def test_the_old_spelling_names_the_new_one(old, new):
    with pytest.raises(ValueError, match=f"predicts='{old}' is spelt predicts='{new}'"):
        DPMSolver(predicts=old)
    with pytest.raises(TypeError, match="predict"):
        DPMSolver(predict=new)


# -- singlestep (2S, 3S) --------------------------------------------------------------------------

def singlestep_reference(net, sde, x_T, times, order, predict):
    """DPM-Solver(++)-2S/3S written from the paper's formulas (r1 = 1/2; r1 = 1/3, r2 = 2/3)."""
    def D(x, t):
        return net(x, torch.full((x.shape[0],), float(t), dtype=F64))

    def E(x, t):
        return (x - sde.alpha(t) * D(x, t)) / sde.sigma(t)

    def at(lam):
        return sde.t_from_log_snr(torch.as_tensor(lam, dtype=F64))

    a, sg, lam = sde.alpha, sde.sigma, sde.log_snr
    x = x_T.clone()
    for k in range(len(times) - 1):
        s, t = times[k], times[k + 1]
        h = lam(t) - lam(s)
        if predict == "x0":
            d_s = D(x, s)
            if order == 2:
                s1 = at(lam(s) + 0.5 * h)
                u = sg(s1) / sg(s) * x + a(s1) * (1 - torch.exp(-0.5 * h)) * d_s
                x = sg(t) / sg(s) * x + a(t) * (1 - torch.exp(-h)) * d_s + a(t) * (1 - torch.exp(-h)) * (D(u, s1) - d_s)
            else:
                r1, r2 = 1 / 3, 2 / 3
                s1, s2 = at(lam(s) + r1 * h), at(lam(s) + r2 * h)
                u1 = sg(s1) / sg(s) * x + a(s1) * (1 - torch.exp(-r1 * h)) * d_s
                d_1 = D(u1, s1)
                u2 = (sg(s2) / sg(s) * x + a(s2) * (1 - torch.exp(-r2 * h)) * d_s
                      + r2 / r1 * a(s2) * ((torch.exp(-r2 * h) - 1) / (r2 * h) + 1) * (d_1 - d_s))
                x = (sg(t) / sg(s) * x + a(t) * (1 - torch.exp(-h)) * d_s
                     + a(t) / r2 * ((torch.exp(-h) - 1) / h + 1) * (D(u2, s2) - d_s))
        else:
            e_s = E(x, s)
            if order == 2:
                s1 = at(lam(s) + 0.5 * h)
                u = a(s1) / a(s) * x - sg(s1) * torch.expm1(0.5 * h) * e_s
                x = a(t) / a(s) * x - sg(t) * torch.expm1(h) * e_s - sg(t) * torch.expm1(h) * (E(u, s1) - e_s)
            else:
                r1, r2 = 1 / 3, 2 / 3
                s1, s2 = at(lam(s) + r1 * h), at(lam(s) + r2 * h)
                u1 = a(s1) / a(s) * x - sg(s1) * torch.expm1(r1 * h) * e_s
                e_1 = E(u1, s1)
                u2 = (a(s2) / a(s) * x - sg(s2) * torch.expm1(r2 * h) * e_s
                      - sg(s2) * r2 / r1 * (torch.expm1(r2 * h) / (r2 * h) - 1) * (e_1 - e_s))
                x = (a(t) / a(s) * x - sg(t) * torch.expm1(h) * e_s
                     - sg(t) / r2 * (torch.expm1(h) / h - 1) * (E(u2, s2) - e_s))
    return x


@pytest.mark.parametrize("sde_name, kind", [("VP", "log_snr"), ("EDM", "karras"), ("SubVP", "uniform")])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("predict", PREDICTS)
def test_singlestep_matches_the_formulas(sde_name, kind, order, predict):
    sde = make_sde(sde_name)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(6), dtype=F64) * sde.prior_std
    times = grid(sde, 7, kind)
    net = MIXTURE.net(sde, "x0")
    expected = singlestep_reference(net, sde, x_T, times, order, predict)
    got = sample(Model(net, sde, predicts="x0"), DPMSolver(order, predict, variant="singlestep"), x_T=x_T,
                 grid=times, final_denoise=False, dtype=F64)
    assert torch.allclose(got, expected, rtol=1e-11, atol=1e-11 * sde.prior_std), rms(got, expected)


@pytest.mark.parametrize("predict", PREDICTS)
@pytest.mark.parametrize("sde_name", ["VP", "VE"])
def test_singlestep_orders_mixture(sde_name, predict):
    sde, x_T, reference = mixture_problem(sde_name)
    model = Model(MIXTURE.net(sde, "x0"), sde, predicts="x0")
    for order, steps in ((2, [16, 32, 64, 128]), (3, [32, 64, 128, 256])):
        errors = errors_for(model, DPMSolver(order, predict, variant="singlestep"), x_T, reference, sde, "log_snr",
                            steps)
        slope = fitted_order(steps, errors)
        assert abs(slope - order) <= TOL, (order, slope, errors)


@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_nfe_and_rectified_flow_start(order):
    """NFE = order per step; on rectified flow the step from t = 1 (alpha = 0) is the exact-limit first
    order step (one call), and the result still converges to the exact flow."""
    net_vp = GaussianX0Net(make_sde("VP"), MU, S)
    _, info = sample(Model(net_vp, net_vp.sde, predicts="x0"), DPMSolver(order, variant="singlestep"),
                     shape=(3, 2), steps=5, dtype=F64, return_info=True)
    assert info.nfe == order * 5 + 1 and net_vp.calls == info.nfe
    sde = make_sde("RectifiedFlow")
    net = GaussianX0Net(sde, MU, S)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    reference = gaussian_flow(sde, MU, S, x_T, sde.t_max, sde.t_min)
    errors = []
    for n in (16, 32, 64):
        net.calls = 0
        x = sample(Model(net, sde, predicts="x0"), DPMSolver(order, variant="singlestep"), x_T=x_T, steps=n,
                   final_denoise=False, dtype=F64)
        assert net.calls == order * n - (order - 1)
        errors.append(rms(x, reference))
    assert fitted_order([16, 32, 64], errors) >= 1.8, errors


def test_singlestep_repr_and_nfe_per_step():
    assert DPMSolver(3, variant="singlestep").nfe_per_step == 3
    assert repr(DPMSolver(2, "eps", variant="singlestep")) == \
        "DPMSolver(order=2, predicts='eps', variant='singlestep')"
    with pytest.raises(ValueError, match="variant must be 'multistep' or 'singlestep'"):
        DPMSolver(variant="single")


# -- data-prediction hooks ------------------------------------------------------------------------

@pytest.mark.parametrize("variant, order", [("multistep", 1), ("multistep", 2), ("multistep", 3),
                                            ("singlestep", 2), ("singlestep", 3)])
def test_correct_x0_sees_every_estimate_and_its_time(variant, order):
    """An identity correct_x0 changes nothing and is called once per network call at that call's time;
    a shifting one changes the result."""
    sde = make_sde("VP")
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    net = GaussianX0Net(sde, MU, S, record_times=True)
    model = Model(net, sde, predicts="x0")
    seen = []

    def identity(x0, t):
        seen.append(t.clone())
        return x0

    plain = sample(model, DPMSolver(order, variant=variant), x_T=x_T, steps=6, final_denoise=False, dtype=F64)
    net.times.clear()
    hooked = sample(model, DPMSolver(order, variant=variant, correct_x0=identity), x_T=x_T, steps=6,
                    final_denoise=False, dtype=F64)
    assert torch.equal(plain, hooked)
    assert len(seen) == len(net.times)
    for t_hook, t_net in zip(seen, net.times):
        assert torch.allclose(t_hook.expand_as(t_net), t_net, rtol=1e-15, atol=0)
    shifted = sample(model, DPMSolver(order, variant=variant, correct_x0=lambda x0, t: x0 + 0.1), x_T=x_T, steps=6,
                     final_denoise=False, dtype=F64)
    assert rms(shifted, plain) > 1e-3


def test_dynamic_thresholding_clips_the_x0_estimate():
    from solvers import DynamicThresholding

    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, -0.3, 0.4, 0.9]], dtype=F64)
    got = DynamicThresholding(ratio=1.0, max_value=2.5)(x0.clone())
    # row 0: s = min(max|x0|, 2.5) = 2.5 -> clip to [-2.5, 2.5], / 2.5; row 1: s = max(0.9, 1) = 1
    assert torch.allclose(got[0], torch.tensor([0.2, -1.0, 0.8, 0.04], dtype=F64))
    assert torch.allclose(got[1], x0[1])
    # in a run: an x0 net that overshoots [-1, 1] gives a different, bounded DDIM result
    sde = make_sde("VP")
    model = Model(lambda x, t: 4.0 * torch.ones_like(x), sde, predicts="x0")
    x_T = torch.zeros(2, 5, dtype=F64)
    plain = sample(model, DPMSolver(1), x_T=x_T, steps=4, dtype=F64)
    clipped = sample(model, DPMSolver(1, thresholding=True), x_T=x_T, steps=4, dtype=F64)
    assert torch.allclose(plain, torch.full_like(plain, 4.0)) and torch.allclose(clipped, torch.ones_like(plain))


def test_hook_arguments_are_checked():
    from solvers import DynamicThresholding

    with pytest.raises(ValueError, match="need predicts='x0'"):
        DPMSolver(predicts="eps", thresholding=True)
    with pytest.raises(ValueError, match="thresholding must be"):
        DPMSolver(thresholding="yes")
    with pytest.raises(ValueError, match="correct_x0 must be a callable"):
        DPMSolver(correct_x0=3)
    with pytest.raises(ValueError, match=r"DynamicThresholding: ratio must be a number in \(0, 1\] \(a quantile\), got 1.5"):
        DynamicThresholding(ratio=1.5)
    with pytest.raises(ValueError, match=r"DynamicThresholding: max_value must be a number in \[1, inf\] \(the threshold never shrinks below 1\)"):
        DynamicThresholding(max_value=0.5)
    sde = make_sde("VP")
    model = Model(GaussianX0Net(sde, MU, S), sde, predicts="x0")
    with pytest.raises(ValueError, match="correct_x0 must return a tensor shaped like x0"):
        sample(model, DPMSolver(2, correct_x0=lambda x0, t: x0[:1]), shape=(3, 2), steps=3, dtype=F64)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("net_predicts, predict", [("eps", "x0"), ("x0", "eps"), ("v", "x0")])
def test_history_storage_modes_agree(order, net_predicts, predict):
    """The ring holds m/p (one fused pass) when p != 0 at every step, q out when p = 0, m otherwise
    (solvers.multistep.history_tables); an identity x0 hook forces the general form in data mode.
    All give the same result."""
    sde = make_sde("VP")
    model = Model(GaussianNet(sde, net_predicts, MU, S), sde, predicts=net_predicts)
    times = grid(sde, 12, "log_snr")[:, None]
    assert DPMSolver(order, predict).prepare(model, times)["history"] == ["scaled"] * 12
    x_T = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    fast = sample(model, DPMSolver(order, predict), x_T=x_T, grid=times[:, 0], final_denoise=False, dtype=F64)
    direct_model = Model(GaussianNet(sde, predict, MU, S), sde, predicts=predict)
    assert DPMSolver(order, predict).prepare(direct_model, times)["history"] == ["direct"] * 12
    reference = sample(direct_model, DPMSolver(order, predict), x_T=x_T, grid=times[:, 0], final_denoise=False,
                       dtype=F64)
    assert torch.allclose(fast, reference, rtol=1e-12, atol=1e-12)
    if predict == "x0":
        general = sample(model, DPMSolver(order, predict, correct_x0=lambda x0, t: x0), x_T=x_T, grid=times[:, 0],
                         final_denoise=False, dtype=F64)
        assert torch.allclose(fast, general, rtol=1e-12, atol=1e-12)
