"""samplers.integrations.k_diffusion_sampler: our solvers with k-diffusion's sampler signature, against
k-diffusion's own ``sample_*`` functions (``sampling.py`` loaded alone) on the same sigmas and noise."""

from __future__ import annotations

import pytest
import torch

from samplers.cli.peers import keyed_noise_sampler, load_k_diffusion_sampling
from samplers.integrations import k_diffusion_sampler
from solvers import AdaptiveDPMSolver, DPMSolver, DPMSolverSDE, Euler

kd = load_k_diffusion_sampling()
needs_kd = pytest.mark.skipif(kd is None, reason="k-diffusion is not installed (pip install k-diffusion --no-deps)")


def denoiser(x, sigma, **extra):
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x / (1 + s**2).sqrt()) * 0.9 + 0.1 * torch.sin(s) + extra.get("shift", 0.0)


def karras_sigmas(n=8, dtype=torch.float64):
    rho, lo, hi = 7.0, 0.03, 14.6
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


CASES = {
    "sample_dpmpp_2m": lambda: DPMSolver(2, "x0", lower_order_final=False),
    "sample_euler": lambda: Euler(),
    "sample_euler_ancestral": lambda: DPMSolverSDE(1),
}
#: float32: a few roundings of values of size sigma_max; float64: the same, in float64
BOUNDS = {torch.float32: 2e-6, torch.float64: 1e-13}


def _start(sigmas, dtype, batch=4):
    return torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=dtype) * sigmas[0]


def _theirs(name, x, sigmas, seed=5, **kwargs):
    extra = {}
    if name == "sample_euler_ancestral":  # our keyed step noise, so both integrate the same path
        extra["noise_sampler"] = keyed_noise_sampler(seed, x.shape[0], x.shape[1:], x.dtype)
    return getattr(kd, name)(denoiser, x.clone(), sigmas, disable=True, **extra, **kwargs)


@needs_kd
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", CASES)
def test_matches_k_diffusion(name, dtype):
    sigmas = karras_sigmas(dtype=dtype)
    x = _start(sigmas, dtype)
    theirs = _theirs(name, x, sigmas)
    ours = k_diffusion_sampler(CASES[name]())(denoiser, x.clone(), sigmas, extra_args={"seed": 5}, disable=True)
    relative = float((ours - theirs).abs().max() / theirs.abs().max())
    assert ours.dtype == dtype and relative < BOUNDS[dtype], f"{name}: relative difference {relative:.2e}"


@needs_kd
def test_negative_control_another_seed_or_default_order_rule_differs():
    sigmas = karras_sigmas()
    x = _start(sigmas, torch.float64)
    theirs = _theirs("sample_euler_ancestral", x, sigmas)
    ours = k_diffusion_sampler(DPMSolverSDE(1))(denoiser, x.clone(), sigmas, extra_args={"seed": 6})
    assert float((ours - theirs).abs().max()) > 1e-3
    # below 10 steps our default DPMSolver lowers its last step's order; k-diffusion does not
    theirs = _theirs("sample_dpmpp_2m", x, sigmas)
    ours = k_diffusion_sampler(DPMSolver(2, "x0"))(denoiser, x.clone(), sigmas)
    assert float((ours - theirs).abs().max()) > 1e-3


@needs_kd
@pytest.mark.parametrize("name", ["sample_dpmpp_2m", "sample_euler_ancestral"])
def test_callback_dicts_match_k_diffusion_on_every_step(name):
    sigmas = karras_sigmas(6)
    x = _start(sigmas, torch.float64)
    seen: dict[str, list] = {"theirs": [], "ours": []}
    _theirs(name, x, sigmas, callback=seen["theirs"].append, extra_args={"shift": 0.01})
    k_diffusion_sampler(CASES[name]())(denoiser, x.clone(), sigmas, extra_args={"seed": 5, "shift": 0.01},
                                       callback=seen["ours"].append)
    assert len(seen["ours"]) == len(seen["theirs"]) == len(sigmas) - 1  # the last call (to sigma = 0) included
    for a, b in zip(seen["ours"], seen["theirs"]):
        assert a.keys() == b.keys() == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"]) == float(a["sigma_hat"])
        for key in ("x", "denoised"):
            assert float((a[key] - b[key]).abs().max()) < 1e-12, (a["i"], key)


@needs_kd
def test_sigmas_without_a_trailing_zero_stop_at_the_last_sigma():
    sigmas = karras_sigmas()[:-1]
    x = _start(sigmas, torch.float64)
    theirs = _theirs("sample_euler", x, sigmas)
    ours = k_diffusion_sampler(Euler())(denoiser, x.clone(), sigmas)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < BOUNDS[torch.float64]


def test_single_step_to_zero_is_the_denoiser():
    sigmas = torch.tensor([3.0, 0.0], dtype=torch.float64)
    x = _start(sigmas, torch.float64)
    seen = []
    out = k_diffusion_sampler(DPMSolver(2))(denoiser, x, sigmas, callback=seen.append)
    assert torch.equal(out, denoiser(x, sigmas[:1].expand(x.shape[0])))
    assert len(seen) == 1 and seen[0]["i"] == 0


def test_seed_sources():
    sigmas = karras_sigmas()
    x = _start(sigmas, torch.float64)
    fn = k_diffusion_sampler(DPMSolverSDE(1))
    a = fn(denoiser, x, sigmas, extra_args={"seed": 3})
    assert torch.equal(a, fn(denoiser, x, sigmas, extra_args={"seed": 3}))

    class SeededNoise:
        seed = 3

        def __call__(self, sigma, sigma_next):
            raise AssertionError("our solvers draw their own keyed noise")

    assert torch.equal(a, fn(denoiser, x, sigmas, noise_sampler=SeededNoise()))
    torch.manual_seed(11)
    b = fn(denoiser, x, sigmas)
    torch.manual_seed(11)
    assert torch.equal(b, fn(denoiser, x, sigmas))  # the global generator keys the run
    with pytest.raises(ValueError, match="needs a seed"):
        fn(denoiser, x, sigmas, noise_sampler=lambda s, t: torch.randn_like(x))


def test_bad_input_is_refused():
    sigmas = karras_sigmas()
    x = _start(sigmas, torch.float64)
    with pytest.raises(ValueError, match="adaptive"):
        k_diffusion_sampler(AdaptiveDPMSolver())
    with pytest.raises(TypeError, match="fixed-grid solver"):
        k_diffusion_sampler("dpmpp_2m")
    fn = k_diffusion_sampler(Euler())
    with pytest.raises(ValueError, match="strictly decreasing"):
        fn(denoiser, x, sigmas.flip(0)[1:])
    with pytest.raises(ValueError, match="at least two"):
        fn(denoiser, x, sigmas[:1])
    with pytest.raises(TypeError, match="model must be callable"):
        fn(None, x, sigmas)
