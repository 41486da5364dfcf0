"""Predictor-corrector sampling (solvers/pc.py): SCORE's reverse-diffusion and ancestral predictors,
the Langevin / annealed Langevin correctors and the PredictorCorrector wrapper.

Distribution checks use data N(MU, S^2 I) with the exact score, tolerances set from the Monte-Carlo
standard error (SE) of the sample at hand, and step counts where the discretisation bias is below it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, GaussianNet, gaussian_marginal
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import Model, grid, sample
from samplers.noise import NoiseSource, step_stream
from sde import SDE, VESDE, VPSDE, DiscreteVPSDE
from solvers import DPMSolver, EulerMaruyama, Heun, Solver
from solvers.adaptive import AdaptiveDPMSolver
from solvers.pc import (
    CORRECTOR_FIRST_DRAW,
    AncestralSampling,
    AnnealedLangevin,
    Corrector,
    Langevin,
    PredictorCorrector,
    ReverseDiffusion,
)

MU, S = 0.7, 0.5


def score_model(sde, predicts="score"):
    return Model(GaussianNet(sde, predicts, MU, S), sde, predicts=predicts)


# -- corrector-only sampling at a fixed time -------------------------------------------------------------------


class FixedTimeContext:
    """A StepContext that stays at one time: the corrector's tables for a one-step grid (t, t_next),
    the network at t, fresh noise from a torch generator on every call (a chain of many iterations)."""

    def __init__(self, model, corrector, t, t_next, like, seed):
        times = torch.tensor([[t], [t_next]], dtype=F64)
        self.tables = {name: tab.reshape(tab.shape + (1,) * (like.dim() - 1)).to(like.dtype)
                       for name, tab in corrector.prepare(model, times).items()}
        self.model, self.t = model, torch.full((like.shape[0],), float(t), dtype=F64)
        self.gen = torch.Generator().manual_seed(seed)
        self.like, self.buffers = like, {}

    def output(self, x, k, stage=None):
        return self.model.output(x, self.t)

    def noise(self, k, draw=0):
        # one reused buffer: a fresh multi-MB tensor per call costs more in page faults than the draw
        return torch.randn(self.like.shape, generator=self.gen, dtype=self.like.dtype, out=self.scratch("noise"))

    def coef(self, name, k):
        return self.tables[name][k]

    def scratch(self, name):
        return self.buffers.setdefault(name, torch.empty_like(self.like))


@pytest.fixture
def single_thread():
    """The chains below are hundreds of iterations of ~10 light passes: on a busy CPU a second torch
    thread only adds synchronisation stalls (10x slower measured on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_chain(model, phases, t, t_next, x, seed=0):
    """Corrector iterations at the fixed time t: phases = [(corrector, iterations), ...]."""
    for i, (corrector, iterations) in enumerate(phases):
        ctx = FixedTimeContext(model, corrector, t, t_next, x, seed + i)
        for _ in range(iterations):
            x = corrector.update(0, x, ctx, draw=1)
    return x


def moment_z_scores(x, mean, var):
    """Largest |z-score| of the sample mean entries, the sample variances and the off-diagonal sample
    covariances of x (n, d) against N(mean, var I), each against its Monte-Carlo SE."""
    n = x.shape[0]
    m = x.mean(0)
    xc = x - m
    cov = xc.T @ xc / (n - 1)
    diag = torch.diagonal(cov)
    off = cov - torch.diag(diag)
    return {"mean": ((m - mean).abs() / math.sqrt(var / n)).max().item(),
            "var": ((diag - var).abs() / (var * math.sqrt(2.0 / n))).max().item(),
            "cov": (off.abs() / (var * math.sqrt(1.0 / n))).max().item(),
            "var_rel_error": (diag.mean() / var - 1.0).item()}


class _WrongNoiseLangevin(Langevin):
    """A mutant: noise sqrt(eps) z instead of sqrt(2 eps) z."""

    _noise_factor = 1.0


# VP at t = 0.5 with the step to t - 1/1000 (SCORE's N = 1000): alpha_i = 1 - beta_i
T_FIX, T_NEXT = 0.5, 0.499


def fixed_time_model(sde=None):
    """The exact score of p_t = N(alpha MU, (alpha^2 S^2 + sigma^2) I) at T_FIX, as a score network
    (two passes over the batch: the chains below make many calls)."""
    sde = VPSDE() if sde is None else sde
    mean, var = gaussian_marginal(sde, MU, S, T_FIX)
    buffers = {}

    def net(x, t):  # writes into a reused buffer: the corrector consumes each output before the next call
        out = buffers.get((x.shape, x.dtype))
        if out is None:
            out = buffers[(x.shape, x.dtype)] = torch.empty_like(x)
        return torch.sub(mean, x, out=out).div_(var)

    return Model(net, sde, predicts="score"), mean, var


def _langevin_chain(corrector_cls, x, phases=((0.2, 40), (0.1, 30), (0.06, 150))):
    model, _, _ = fixed_time_model()
    return run_chain(model, [(corrector_cls(snr=snr), its) for snr, its in phases], T_FIX, T_NEXT, x)


def test_langevin_converges_to_the_exact_marginal_at_a_fixed_time(single_thread):
    """Corrector-only sampling at fixed t: mean and covariance of 4096 samples of p_t within their
    Monte-Carlo error, from N(0, v/4) (far from p_t = N(m, v), m = alpha MU ~ 0.2, v ~ 0.94); the same
    check fails for a wrong noise coefficient (sqrt(eps) for sqrt(2 eps)).  d = 320 keeps the bias of
    per-sample norms below the MC error (see Langevin); float32 states keep the 200 iterations cheap."""
    d, n = 320, 4096
    model, mean, var = fixed_time_model()
    start = torch.randn(n, d, generator=torch.Generator().manual_seed(3)) * (0.5 * math.sqrt(var))
    x = _langevin_chain(Langevin, start).to(F64)
    # the bias this check must tolerate is below the SE of one sample variance: finite step
    # (1 + alpha_i snr^2), per-sample norms ((1 + 2/d)^2), what is left of the snr = 0.1 phase
    # (bias ~ 0.1^2 + 4/d, relaxing as (1 - eps/v)^2 per iteration, eps/v ~ 2 snr^2)
    alpha_i = float(model.sde.alpha(torch.tensor(T_FIX)) / model.sde.alpha(torch.tensor(T_NEXT))) ** 2
    bias = (1 + 2 / d) ** 2 * (1 + alpha_i * 0.06**2) - 1 + (0.1**2 + 4 / d) * math.exp(-2 * 2 * 0.06**2 * 150)
    assert bias < math.sqrt(2 / n), bias
    z = moment_z_scores(x, mean, var)
    assert z["mean"] < 5 and z["var"] < 5 and z["cov"] < 6, z
    # the mutant's chain settles at about half the variance: it fails the same check by far, even
    # on an eighth of the samples
    wrong = _langevin_chain(_WrongNoiseLangevin, start[: n // 8].clone()).to(F64)
    zw = moment_z_scores(wrong, mean, var)
    assert zw["var"] > 8 and zw["var_rel_error"] < -0.4, zw


def test_langevin_per_sample_norms_bias_in_low_dimension(single_thread):
    """The documented price of per-sample norms: for Gaussian p_t in d dimensions the chain's variance
    is about (1 + 2/d)^2 too large (26.6% at d = 16, beyond the finite step's 0.2%; the formula is the
    small-step limit, so the check allows 0.07 around it).  Started at p_t itself, the chain drifts away."""
    d, n = 16, 1024
    _, mean, var = fixed_time_model()
    x0 = mean + math.sqrt(var) * torch.randn(n, d, generator=torch.Generator().manual_seed(5), dtype=F64)
    x = _langevin_chain(Langevin, x0, phases=((0.05, 800),))
    ratio = x.var(0).mean().item() / var  # pooled over the d coordinates: SE ~ 1.1%
    assert ratio > 1.2 and abs(ratio - (1 + 2 / d) ** 2) < 0.07, ratio


def test_annealed_langevin_converges_in_low_dimension(single_thread):
    """ALD's step size does not depend on x: no bias beyond the finite step, even in d = 4."""
    d, n = 4, 4096
    _, mean, var = fixed_time_model()
    x = _langevin_chain(AnnealedLangevin, torch.zeros(n, d, dtype=F64), phases=((0.2, 40), (0.1, 30), (0.04, 300)))
    z = moment_z_scores(x, mean, var)
    assert z["mean"] < 5 and z["var"] < 5 and z["cov"] < 5, z
    pooled = (x.var(0).mean().item() / var - 1) / math.sqrt(2 / (n * d))
    assert abs(pooled) < 5, pooled


def test_correctors_need_only_a_score(single_thread):
    """Langevin works on an SDE without alpha/sigma given a score network (alpha_i = 1); ALD refuses it."""
    sde = _OU(0.01, 1.0)
    model = Model(lambda x, t: -x, sde, predicts="score")
    times = torch.tensor([[1.0], [0.5]], dtype=F64)
    tables = Langevin().prepare(model, times)
    assert tables["alpha"].item() == 1.0 and tables["score_x"].item() == 0 and tables["score_out"].item() == 1
    Langevin().check_sde(sde)
    with pytest.raises(ValueError, match="AnnealedLangevin needs a Gaussian-marginal SDE"):
        AnnealedLangevin().check_sde(sde)
    # N(0, 1/2) is the stationary law of dx = -x dt + dw; the score -x is that of N(0, 1)
    d = 64
    x = run_chain(model, [(Langevin(snr=0.2), 40), (Langevin(snr=0.1), 30), (Langevin(snr=0.06), 150)], 1.0, 0.5,
                  0.5 + 0.5 * torch.randn(512, d, generator=torch.Generator().manual_seed(4), dtype=F64))
    assert abs(x.mean().item()) < 5 / math.sqrt(512 * d)
    # pooled variance: the per-sample-norm bias (1 + 2/d)^2 and finite step, within 5 SE (~1.6%)
    assert abs(x.var(0).mean().item() / ((1 + 2 / d) ** 2 * (1 + 0.06**2)) - 1) < 5 * math.sqrt(2 / (512 * d))


# -- the formulas against SCORE's special forms ---------------------------------------------------------------


def test_reverse_diffusion_and_ancestral_tables_match_score_forms():
    # DiscreteVP on its knots: a^2 = 1 - beta_n exactly, SCORE's VP discretisation
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    sde = DiscreteVPSDE(betas=betas)
    n = torch.arange(999, 899, -1)  # timesteps 999 ... 900 (k-th grid time is knot n_k = 999 - k)
    times = sde.t_from_timestep(torch.cat([n, n[-1:] - 1]).to(F64))[:, None]
    beta = betas[n][:, None]
    model = score_model(sde)  # score network: p = 0, q = 1, the tables are SCORE's coefficients
    rd = ReverseDiffusion().prepare(model, times)
    torch.testing.assert_close(rd["x"], 2 - torch.sqrt(1 - beta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rd["out"], beta, rtol=1e-10, atol=0)
    torch.testing.assert_close(rd["noise"], torch.sqrt(beta), rtol=1e-10, atol=0)
    anc = AncestralSampling("forward").prepare(model, times)
    torch.testing.assert_close(anc["x"], 1 / torch.sqrt(1 - beta), rtol=1e-12, atol=0)
    torch.testing.assert_close(anc["out"], beta / torch.sqrt(1 - beta), rtol=1e-10, atol=0)
    torch.testing.assert_close(anc["noise"], torch.sqrt(beta), rtol=1e-10, atol=0)
    torch.testing.assert_close(Langevin().prepare(model, times)["alpha"], 1 - beta, rtol=1e-12, atol=0)
    # the posterior std is the DDPM beta-tilde: beta_n (1 - abar_{n-1}) / (1 - abar_n)
    abar = torch.cumprod(1 - betas, 0)
    tilde = beta * (1 - abar[n - 1][:, None]) / (1 - abar[n][:, None])
    torch.testing.assert_close(AncestralSampling().prepare(model, times)["noise"] ** 2, tilde, rtol=1e-9, atol=0)

    # VE: x + (sigma_i^2 - sigma_{i-1}^2) s, ancestral std sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2)
    sde = VESDE()
    times = grid(sde, 20)[:, None]
    model = score_model(sde)
    s_i, s_im1 = sde.sigma(times[:-1]), sde.sigma(times[1:])
    diff = s_i**2 - s_im1**2
    rd = ReverseDiffusion().prepare(model, times)
    torch.testing.assert_close(rd["x"], torch.ones_like(diff), rtol=0, atol=1e-14)
    torch.testing.assert_close(rd["out"], diff, rtol=1e-12, atol=0)
    torch.testing.assert_close(rd["noise"], torch.sqrt(diff), rtol=1e-12, atol=0)
    anc = AncestralSampling().prepare(model, times)
    torch.testing.assert_close(anc["x"], torch.ones_like(diff), rtol=1e-12, atol=0)
    torch.testing.assert_close(anc["out"], diff, rtol=1e-12, atol=0)
    torch.testing.assert_close(anc["noise"], torch.sqrt(s_im1**2 * diff / s_i**2), rtol=1e-12, atol=0)
    assert torch.equal(AncestralSampling("forward").prepare(model, times)["noise"], rd["noise"])
    assert torch.equal(Langevin().prepare(model, times)["alpha"], torch.ones_like(diff))
    eps = 2 * (0.16 * s_i) ** 2  # ALD: 2 alpha (snr std)^2
    ald = AnnealedLangevin().prepare(model, times)
    torch.testing.assert_close(ald["out"], eps, rtol=1e-12, atol=0)
    torch.testing.assert_close(ald["noise"], torch.sqrt(2 * eps), rtol=1e-12, atol=0)


@pytest.mark.parametrize("predicts", ["eps", "x0", "v", "velocity"])
def test_tables_do_not_depend_on_the_parametrisation(predicts):
    """x A + out B is the same update for every parametrisation (the score conversion is in the tables)."""
    sde = VPSDE()
    times = grid(sde, 10)[:, None]
    x = torch.randn(10, 1, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    tt = times[:-1, 0]
    for solver in (ReverseDiffusion(), AncestralSampling(), AnnealedLangevin()):
        ref_model, model = score_model(sde), score_model(sde, predicts)
        a, b = solver.prepare(ref_model, times), solver.prepare(model, times)
        ref = a["x"][:, :, None] * x + a["out"][:, :, None] * ref_model.net(x, tt)
        got = b["x"][:, :, None] * x + b["out"][:, :, None] * model.net(x, tt)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_pc_step_matches_a_hand_written_reference():
    """Corrector first (noise draw CORRECTOR_FIRST_DRAW + j, per-sample norms), then the predictor
    (draw 0), as in SCORE's pc_sampler."""
    sde = VESDE()
    times = grid(sde, 3)
    x_T = 20.0 * torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    model = score_model(sde)
    got = sample(model, PredictorCorrector(corrector=Langevin(0.2, 2)), x_T=x_T, grid=times, seed=9,
                 final_denoise=False)
    x, src = x_T.clone(), NoiseSource(9, 5)
    for k in range(3):
        t = torch.full((5,), float(times[k]), dtype=F64)
        for j in range(2):
            g = model.net(x, t)
            z = src.normal((2, 3), counter=k, stream=step_stream(CORRECTOR_FIRST_DRAW + j), dtype=F64)
            eps = 2 * (0.2 * z.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)) ** 2  # alpha_i = 1 on VE
            x = x + eps[:, None, None] * g + torch.sqrt(2 * eps)[:, None, None] * z
        diff = float(sde.sigma(times[k]) ** 2 - sde.sigma(times[k + 1]) ** 2)
        z = src.normal((2, 3), counter=k, stream=step_stream(0), dtype=F64)
        x = x + diff * model.net(x, t) + math.sqrt(diff) * z
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


# -- sampling Gaussian data -----------------------------------------------------------------------------------

SAMPLERS = {
    "ReverseDiffusion": lambda: ReverseDiffusion(),
    "Ancestral(posterior)": lambda: AncestralSampling(),
    "Ancestral(forward)": lambda: AncestralSampling("forward"),
    "PC(ReverseDiffusion+Langevin)": lambda: PredictorCorrector(corrector=Langevin()),
    "PC(EulerMaruyama+Langevin)": lambda: PredictorCorrector(EulerMaruyama(), Langevin()),
    "PC(ReverseDiffusion+ALD), the default": lambda: PredictorCorrector(),
}


@pytest.mark.parametrize("sde_name", ["VP", "VE"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampling_gaussian_data(name, sde_name):
    """Final mean and variance of N(MU, S^2) data within 5 Monte-Carlo SEs, pooled over 8 samples of
    d = 2048 iid coordinates (SE of the variance 1.1%).  At 1000 steps the biases are at most ~2.5 SE
    (AncestralSampling("posterior") -2.7%, PC +2.1% from snr 0.16's finite corrector step); d = 2048
    keeps the per-sample-norm bias of Langevin at ~0.2%."""
    sde = VPSDE() if sde_name == "VP" else VESDE()
    model = score_model(sde, "eps" if sde_name == "VP" else "score")
    n, d = 8, 2048
    x = sample(model, SAMPLERS[name](), shape=(n, d), steps=1000, seed=0, dtype=F64)
    se_mean, se_var = S / math.sqrt(n * d), S * S * math.sqrt(2 / (n * d))
    assert abs(x.mean().item() - MU) < 5 * se_mean, (x.mean().item() - MU) / se_mean
    var = x.var(0).mean().item()
    assert abs(var - S * S) < 5 * se_var, (var - S * S) / se_var


# -- NFE, batch invariance, attributes ----------------------------------------------------------------------


@pytest.mark.parametrize("predictor, per_step", [(ReverseDiffusion(), 1), (EulerMaruyama(), 1), (Heun(eta=1), 2),
                                                 (DPMSolver(), 1)])
@pytest.mark.parametrize("n_corr", [0, 1, 3])
@pytest.mark.parametrize("final_denoise", [True, False])
def test_nfe_accounting(predictor, per_step, n_corr, final_denoise):
    sde = VPSDE()
    model = score_model(sde, "eps")
    solver = PredictorCorrector(predictor, n_corrector_steps=n_corr)
    assert solver.nfe_per_step == per_step + n_corr
    _, info = sample(model, solver, shape=(2, 3), steps=5, seed=0, final_denoise=final_denoise, return_info=True)
    assert info.nfe == 5 * (per_step + n_corr) + int(final_denoise)
    assert model.net.calls == info.nfe


@settings(max_examples=12, deadline=None)
@given(make=st.sampled_from([lambda: PredictorCorrector(),
                             lambda: PredictorCorrector(EulerMaruyama(), n_corrector_steps=2),
                             lambda: PredictorCorrector(AncestralSampling(), AnnealedLangevin(snr=0.1)),
                             lambda: PredictorCorrector(PredictorCorrector(Heun(eta=1)), Langevin(n_steps=2)),
                             lambda: ReverseDiffusion(), lambda: AncestralSampling("forward")]),
       index=st.integers(0, 63), seed=st.integers(0, 2**32 - 1), sde_name=st.sampled_from(["VP", "VE"]))
def test_batch_invariance(make, index, seed, sde_name):
    """Sample i of a batch of 64 equals the same sample drawn alone (seed, sample_index i)."""
    sde = VPSDE() if sde_name == "VP" else VESDE()
    model = score_model(sde, "eps" if sde_name == "VP" else "score")
    batch = sample(model, make(), shape=(64, 3, 4, 4), steps=4, seed=seed, dtype=F64)
    alone = sample(model, make(), shape=(1, 3, 4, 4), steps=4, seed=seed, dtype=F64, sample_index=[index])
    torch.testing.assert_close(alone[0], batch[index], rtol=1e-13, atol=1e-13)
    assert not torch.equal(batch[0], batch[1])


def test_corrector_noise_is_independent_of_the_predictor_and_of_each_other():
    """Nested predictor-correctors stack their draws; every draw index is distinct and >= 1."""
    inner = PredictorCorrector(EulerMaruyama(), Langevin(n_steps=2))
    outer = PredictorCorrector(inner, Langevin(n_steps=3))
    assert inner.first_draw == CORRECTOR_FIRST_DRAW and outer.first_draw == CORRECTOR_FIRST_DRAW + 2
    assert outer.nfe_per_step == 6
    # the tables of both correctors coexist under different prefixes
    tables = outer.prepare(score_model(VPSDE(), "eps"), grid(VPSDE(), 4)[:, None])
    assert {"x", "out", "noise", "pc_corrector.alpha", "_pc_corrector.alpha"} <= set(tables)


def test_attributes_and_repr():
    pc = PredictorCorrector()
    assert isinstance(pc, Solver) and isinstance(pc.predictor, ReverseDiffusion)
    assert (pc.convergence_order, pc.stochastic, pc.gaussian_only, pc.nfe_per_step, pc.snr) == (1, True, True, 2, 0.16)
    assert repr(pc) == ("PredictorCorrector(predictor=ReverseDiffusion(), "
                        "corrector=AnnealedLangevin(snr=0.16, n_steps=1))")
    assert repr(AncestralSampling()) == "AncestralSampling(variance='posterior')"
    for solver in (ReverseDiffusion(), AncestralSampling()):
        assert (solver.convergence_order, solver.convergence_mode, solver.nfe_per_step, solver.stochastic,
                solver.gaussian_only) == (1, "weak", 1, True, True)
    assert not isinstance(Langevin(), Solver) and isinstance(Langevin(), Corrector)
    assert (Langevin(n_steps=3).nfe_per_step, Langevin().gaussian_only, AnnealedLangevin().gaussian_only) == (
        3, False, True)
    assert repr(AnnealedLangevin(snr=0.1, n_steps=2)) == "AnnealedLangevin(snr=0.1, n_steps=2)"
    bare = PredictorCorrector(Heun(), n_corrector_steps=0)  # the predictor alone
    assert (bare.corrector, bare.convergence_order, bare.stochastic, bare.nfe_per_step) == (None, 2, False, 2)
    assert bare.convergence_mode == "pathwise" and not hasattr(bare, "order")
    assert PredictorCorrector(Heun()).convergence_order == 1 and PredictorCorrector(Heun()).stochastic


class _OU(SDE):
    """dx = -x dt + dw: an SDE object without alpha/sigma."""

    def drift(self, x, t):
        return -x

    def diffusion(self, x, t):
        return torch.ones_like(x)


def test_gaussian_only_refusals():
    model = Model(lambda x, t: -x, _OU(0.01, 1.0), predicts="score")
    for solver in (ReverseDiffusion(), AncestralSampling(), PredictorCorrector(), PredictorCorrector(EulerMaruyama())):
        with pytest.raises(ValueError, match=f"{type(solver).__name__} needs a Gaussian-marginal SDE"):
            sample(model, solver, shape=(2, 2), grid=torch.tensor([1.0, 0.5, 0.01], dtype=F64))
    with pytest.raises(TypeError, match=r"solver must be a solvers.Solver instance .*, got Langevin"):
        sample(score_model(VPSDE()), Langevin(), shape=(2, 2), steps=3)


# -- argument errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, error, match", [
    (lambda: Langevin(snr=0), ValueError, r"Langevin: snr must be a positive finite number, got 0"),
    (lambda: Langevin(snr=-0.1), ValueError, r"Langevin: snr must be a positive finite number"),
    (lambda: AnnealedLangevin(snr=float("inf")), ValueError, r"AnnealedLangevin: snr must be a positive finite"),
    (lambda: Langevin(snr="0.1"), ValueError, r"snr must be a positive finite number, got '0.1'"),
    (lambda: Langevin(snr=True), ValueError, r"snr must be a positive finite number, got True"),
    (lambda: Langevin(n_steps=0), ValueError, r"Langevin: n_steps must be an int >= 1, got 0"),
    (lambda: Langevin(n_steps=1.0), ValueError, r"n_steps must be an int >= 1, got 1.0"),
    (lambda: PredictorCorrector(snr=0.0), ValueError, r"PredictorCorrector: snr must be a positive finite number"),
    (lambda: PredictorCorrector(snr=float("nan")), ValueError, r"snr must be a positive finite number, got nan"),
    (lambda: PredictorCorrector(n_corrector_steps=-1), ValueError,
     r"PredictorCorrector: n_corrector_steps must be an int >= 0, got -1"),
    (lambda: PredictorCorrector(n_corrector_steps=2.5), ValueError, r"n_corrector_steps must be an int >= 0"),
    (lambda: PredictorCorrector(n_corrector_steps=True), ValueError, r"n_corrector_steps must be an int >= 0"),
    (lambda: PredictorCorrector(predictor="euler"), TypeError,
     r"predictor must be a solvers.Solver instance .*, got str"),
    (lambda: PredictorCorrector(predictor=EulerMaruyama), TypeError, r"predictor must be a solvers.Solver instance"),
    (lambda: PredictorCorrector(predictor=AdaptiveDPMSolver()), ValueError,
     r"predictor must be a fixed-grid solver; AdaptiveDPMSolver.* is adaptive"),
    (lambda: PredictorCorrector(corrector=EulerMaruyama()), TypeError,
     r"corrector must be a solvers.pc.Corrector instance .*, got EulerMaruyama"),
    (lambda: PredictorCorrector(corrector=Langevin(snr=0.1), snr=0.2), ValueError,
     r"snr=0.2 conflicts with the corrector's snr=0.1"),
    (lambda: PredictorCorrector(corrector=Langevin(n_steps=2), n_corrector_steps=3), ValueError,
     r"n_corrector_steps=3 conflicts with the corrector's n_steps=2"),
    (lambda: PredictorCorrector(corrector=Langevin(), n_corrector_steps=0), ValueError,
     r"n_corrector_steps=0 conflicts with the corrector's n_steps=1"),
    (lambda: AncestralSampling(variance="ddim"), ValueError,
     r"AncestralSampling: variance must be 'posterior' or 'forward', got 'ddim'"),
])
def test_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_agreeing_settings_are_accepted():
    pc = PredictorCorrector(corrector=Langevin(snr=0.1, n_steps=2), snr=0.1, n_corrector_steps=2)
    assert (pc.snr, pc.n_corrector_steps, pc.nfe_per_step) == (0.1, 2, 3)
    assert PredictorCorrector(snr=0.05, n_corrector_steps=4).corrector.snr == 0.05
