"""Promises of the CUDA path that only a GPU can check (marked gpu; skipped without CUDA):
no host synchronisation inside a fixed-grid run's loop, on either backend; the torch port of the
keyed noise on the GPU equals the CPU generator.  The fused kernels' own tests are in
tests/test_kernels.py; ``python -m samplers bench gpu`` measures the rest."""

import pytest
import torch

from samplers import Model, NoiseSource, noise, sample
from samplers.cli.bench_gpu import _ConvNet, count_syncs
from samplers.noise import STREAM_STEP
from sde import VPSDE
from solvers import ERSDE, DPMSolver, DPMSolverSDE, EulerMaruyama, Heun, UniPC, kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _backends():
    out = ["torch"]
    if torch.cuda.is_available() and kernels.cupy_unavailable_reason() is None:
        out.append("cupy")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("solver", [EulerMaruyama(), Heun(eta=1.0), DPMSolver(3), DPMSolverSDE(2), ERSDE(3), UniPC()],
                         ids=repr)
def test_fixed_grid_loop_makes_no_host_sync(solver, backend):
    """The syncs of a run (its final finiteness check, ...) do not grow with the number of steps: the
    loop itself never waits for the device, network calls included."""
    if backend == "cupy" and isinstance(solver, UniPC):
        pytest.skip("UniPC has no fused kernel")
    model = Model(_ConvNet().cuda(), VPSDE(), predicts="eps")

    def run(steps):
        with torch.no_grad():
            sample(model, solver, shape=(4, 3, 16, 16), steps=steps, seed=0, device="cuda", backend=backend)

    run(6)  # warm: compilation, cuDNN's choices
    count_syncs(lambda: run(6))  # the process's first counted run has one sync more (a one-time setup)
    assert count_syncs(lambda: run(12)) == count_syncs(lambda: run(6))


@pytest.mark.parametrize("generator", ["as installed", "torch port"])
@pytest.mark.parametrize("per_sample", [7, 3 * 64 * 64, 4 * 4096 + 5])
def test_noise_on_the_gpu_matches_the_cpu(monkeypatch, per_sample, generator):
    """NoiseSource on a GPU (the noise kernel where CuPy runs, else the torch port) draws the CPU's
    numbers to 1e-6."""
    if generator == "torch port":
        monkeypatch.setattr(noise, "_noise_kernel_ready", lambda: False)
    source = NoiseSource([11, 2**63 + 5, 7], 3, sample_index=[0, 17, 2**31 + 5])
    cpu = source.normal((per_sample,), counter=5, stream=STREAM_STEP)
    gpu = source.normal((per_sample,), counter=5, stream=STREAM_STEP, device="cuda")
    assert float((gpu.cpu() - cpu).abs().max()) <= 1e-6


@pytest.mark.skipif("cupy" not in _backends(), reason="needs CuPy")
@pytest.mark.parametrize("solver", [EulerMaruyama(), Heun(eta=1.0), DPMSolverSDE(2), ERSDE(3)], ids=repr)
def test_torch_and_fused_backends_draw_the_same_noise(solver):
    """With CuPy both backends draw their noise with the noise kernel: the torch step and the fused
    step give the same float32 samples (to rounding), and the torch step's noise costs one launch."""
    model = Model(_ConvNet().cuda(), VPSDE(), predicts="eps")
    kwargs = dict(shape=(4, 3, 16, 16), steps=8, seed=2, device="cuda")
    with torch.no_grad():
        ref = sample(model, solver, backend="torch", **kwargs)
        got = sample(model, solver, backend="cupy", **kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("cupy" not in _backends(), reason="needs CuPy")
def test_fused_step_refuses_a_network_output_on_another_device():
    """The kernels read the output by address: one on the CPU is refused, not read as device memory."""
    model = Model(lambda x, t: 0.1 * x.cpu(), VPSDE(), predicts="eps")
    with pytest.raises(ValueError, match="network returned a tensor on cpu; the fused kernels need it on"):
        sample(model, DPMSolver(2), shape=(2, 3, 8, 8), steps=3, device="cuda", backend="cupy")
