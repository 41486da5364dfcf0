"""Agreement with k-diffusion's samplers (``k_diffusion/sampling.py`` loaded alone), float64.

From the same x_T on the same noise levels s_k = sigma(t_k)/alpha(t_k) (then 0), with the same keyed
step noise for the stochastic ones, our solver and k-diffusion's sampler give the same samples to
1e-5 relative (measured: ~1e-14).  Euler and Heun are the same algorithm only where t = sigma
(EDM); the exponential integrators are the same on every Gaussian SDE.  With fewer than 10 steps our
multistep solvers lower the order of the last step (k-diffusion does not), and on VP's uniform-t
grid our step-ratio rule lowers the order after a long step: those differ, and a negative control
checks the test can see a difference of that size.
"""

from __future__ import annotations

import pytest

from samplers.cli.peers import agreement, load_k_diffusion_sampling, peer_list

if load_k_diffusion_sampling() is None:
    pytest.skip("k-diffusion is not installed (pip install k-diffusion --no-deps)", allow_module_level=True)

RTOL = 1e-5
PEERS = {p.name: p for p in peer_list(["k-diffusion"])}

CASES = [
    ("sample_euler", "edm", None),
    ("sample_heun", "edm", None),
    ("sample_dpmpp_2m", "edm", None),
    ("sample_dpmpp_2m", "ve", None),
    ("sample_dpmpp_2m", "vp", "log_snr"),
    ("sample_euler_ancestral", "edm", None),
    ("sample_euler_ancestral", "vp", None),
    ("sample_dpmpp_2m_sde", "edm", None),
    ("sample_dpmpp_2m_sde", "vp", "karras"),
]


@pytest.mark.parametrize("name, sde, kind", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("steps", [12, 40])
def test_matches_k_diffusion_float64(name, sde, kind, steps):
    rel = agreement(PEERS[name], sde, steps, kind=kind)
    assert rel < RTOL, f"{name} on {sde}, {steps} steps: max|ours - k-diffusion| / max|k-diffusion| = {rel:.3e}"


def test_negative_control_lower_order_final():
    # below 10 steps our 2M takes a first-order last step: a real difference the test must see
    assert agreement(PEERS["sample_dpmpp_2m"], "edm", 5) > 1e-3


def test_refuses_a_peer_without_counterpart_or_on_another_sde():
    with pytest.raises(ValueError, match="no counterpart"):
        agreement(PEERS["sample_lms"], "edm", 10)
    with pytest.raises(ValueError, match="only on"):
        agreement(PEERS["sample_euler"], "vp", 10)
