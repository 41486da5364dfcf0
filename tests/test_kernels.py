"""Fused CUDA step kernels (cuda/*.cu, solvers/kernels.py).

Without a GPU: every kernel compiles with nvcc for sm_80 and sm_90; the kernels' noise agrees with
a NumPy port of the generator and with samplers.NoiseSource; every kernel's thread body, compiled
as host code (tests/kernel_harness.cu), run through the real driver (sample(backend="cupy") with a
host launcher) agrees with the torch solver step; the backend choice and its errors; the wheel
ships the sources.  With a GPU and CuPy (marked gpu): the fused kernels against the torch path fed
the same noise.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import Model, NoiseSource, grid, sample
from samplers.noise import STREAM_PRIOR, STREAM_STEP, step_stream
from sde import VPSDE
from solvers import ERSDE, DPMSolver, DPMSolverSDE, Euler, EulerMaruyama, Heun, UniPC, kernels

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("kernel_harness.cu")


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# compilation: a kernel that does not compile fails here (CI has nvcc and no GPU)


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    """Each .cu, with its headers inlined exactly as CuPy's NVRTC gets it, compiles to SASS for sm_80
    and sm_90, and the code holds every kernel name the Python side launches.  Without nvcc the
    NVRTC test below does the compile check where the NVRTC library is; with neither, this fails:
    CI has nvcc, so a missing compiler there is a broken CI image, not a reason to pass."""
    nvcc = _nvcc()
    if nvcc is None:
        if _nvrtc_library() is None:
            pytest.fail("neither nvcc nor the NVRTC library is available: the CUDA kernels cannot be compile-checked")
        pytest.skip("no nvcc; test_every_kernel_compiles_with_nvrtc compiles the kernels")
    sources = {}
    for name in kernels.KERNEL_FILES:
        path = tmp_path / name
        path.write_text(kernels.kernel_source(name))
        sources[name] = path
    procs = {}
    for name, path in sources.items():
        # uncompressed, so the kernels' ELF symbol names can be read from the fatbinary
        procs[name] = subprocess.Popen(
            [nvcc, "--fatbin", "-no-compress", "-std=c++14", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
             "arch=compute_90,code=sm_90", str(path), "-o", str(path.with_suffix(".fatbin"))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = []
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            failures.append(f"{name}:\n{log}")
    assert not failures, "\n".join(failures)
    for name, path in sources.items():
        binary = path.with_suffix(".fatbin").read_bytes()
        missing = [k for k in kernels.kernel_names(name) if binary.count(b"\0" + k.encode() + b"\0") < 2]
        assert not missing, f"{name}: kernels missing from the sm_80/sm_90 code: {missing}"


def _nvrtc_library():
    try:
        import nvidia.cuda_nvrtc  # the pip wheel CuPy uses (nvidia-cuda-nvrtc-cu12)

        found = sorted(Path(next(iter(nvidia.cuda_nvrtc.__path__))).glob("lib/libnvrtc.so*"))
        if found:
            return str(found[0])
    except ImportError:
        pass
    import ctypes.util

    return ctypes.util.find_library("nvrtc")


def test_every_kernel_compiles_with_nvrtc():
    """What CuPy's RawModule does at run time: NVRTC (no system headers, no include path) on the
    inlined sources, for compute_80 and compute_90; every kernel name appears in the PTX."""
    path = _nvrtc_library()
    if path is None:
        pytest.skip("no NVRTC library (pip install nvidia-cuda-nvrtc-cu12); the nvcc test covers compilation")
    lib = ctypes.CDLL(path)
    for name in kernels.KERNEL_FILES:
        for arch in ("80", "90"):
            prog = ctypes.c_void_p()
            assert lib.nvrtcCreateProgram(ctypes.byref(prog), kernels.kernel_source(name).encode(), name.encode(),
                                          0, None, None) == 0
            opts = (ctypes.c_char_p * 2)(b"--std=c++14", f"-arch=compute_{arch}".encode())
            status = lib.nvrtcCompileProgram(prog, 2, opts)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            assert status == 0, f"{name} compute_{arch}: {log.value.decode()}"
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, ptx)
            lib.nvrtcDestroyProgram(ctypes.byref(prog))
            entries = set(re.findall(r"\.entry\s+(\w+)", ptx.value.decode()))
            assert entries == set(kernels.kernel_names(name)), name


def test_work_item_size_is_one_constant_everywhere():
    """The launch size (kernels.py), the kernels' layout (philox.cuh, whose slot_of divides by shifting
    10 bits) and the CPU generator (samplers/_native/philox.c) use the same 1024 calls per work item."""
    cuh = (kernels.cuda_source_dir() / "philox.cuh").read_text()
    native = (ROOT / "samplers" / "_native" / "philox.c").read_text()
    calls = {int(re.search(r"#define SAMPLERS_ITEM_CALLS (\d+)", cuh).group(1)),
             int(re.search(r"#define ITEM_CALLS (\d+)", native).group(1)), kernels._ITEM_CALLS}
    assert calls == {1024} and kernels._ITEM_SIZE == 4 * 1024 and ">> 10" in cuh


def test_kernel_sources_inline_headers_once():
    src = kernels.kernel_source("multistep.cu")
    assert '#include "' not in src
    assert src.count("struct Words") == 1 and src.count("struct half_t") == 1
    with pytest.raises(ValueError, match=r"name must be 'euler.cu', 'multistep.cu' or 'noise.cu', got 'nope.cu'"):
        kernels.kernel_source("nope.cu")


# ---------------------------------------------------------------------------------------------
# the host harness: the kernels' thread bodies as host code


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.fail("nvcc is needed to build the host harness of the kernels (CI has it)")
    out = tmp_path_factory.mktemp("harness") / "kernel_harness.so"
    proc = subprocess.run([nvcc, "-x", "cu", "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++14",
                           f"-I{kernels.cuda_source_dir()}", str(HARNESS), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(out))


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _host_normal(lib, source: NoiseSource, per_sample: int, counter: int, stream: int, dtype=torch.float32):
    out = torch.empty(source.batch_size, per_sample, dtype=dtype)
    fn = getattr(lib, f"normal_{kernels.storage_suffix(dtype)}")
    fn(_ptr(out), _ptr(source.seeds), _ptr(source._index32), ctypes.c_uint32(counter), ctypes.c_uint32(stream),
       ctypes.c_longlong(per_sample), ctypes.c_longlong(source.batch_size))
    return out


# NumPy port of the generator: Philox4x32-10 in uint64 arithmetic, Box-Muller in float32, and the
# element layout (work items of 1024 calls; element q * calls + n of an item from output q of call n)
_M0, _M1, _W0, _W1, _MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def numpy_philox(x0, x1, x2, x3, k0, k1):
    x0, x1, x2, x3 = (np.asarray(v, dtype=np.uint64) & _MASK for v in (x0, x1, x2, x3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0, p1 = np.uint64(_M0) * x0, np.uint64(_M1) * x2
        y0 = (p1 >> np.uint64(32)) ^ x1 ^ k0
        y2 = (p0 >> np.uint64(32)) ^ x3 ^ k1
        x1, x3 = p1 & np.uint64(_MASK), p0 & np.uint64(_MASK)
        x0, x2 = y0, y2
        k0, k1 = (k0 + np.uint64(_W0)) & np.uint64(_MASK), (k1 + np.uint64(_W1)) & np.uint64(_MASK)
    return x0, x1, x2, x3


def numpy_normals(seed: int, index: int, counter: int, stream: int, per_sample: int) -> np.ndarray:
    out = np.empty(per_sample, dtype=np.float32)
    two_pi = np.float32(6.283185307179586)
    for start in range(0, per_sample, 4096):
        length = min(4096, per_sample - start)
        calls = (length + 3) // 4
        call = np.arange(calls, dtype=np.uint64) + np.uint64(start // 4)
        w = numpy_philox(call, index, counter, stream, seed & _MASK, seed >> 32)
        f = [(v >> np.uint64(8)).astype(np.float32) for v in w]
        scale = np.float32(2.0**-24)
        u1, u2, u3, u4 = (f[0] + 1) * scale, f[1] * scale, (f[2] + 1) * scale, f[3] * scale
        r1, r2 = np.sqrt(np.float32(-2) * np.log(u1)), np.sqrt(np.float32(-2) * np.log(u3))
        z = np.concatenate([r1 * np.cos(two_pi * u2), r1 * np.cos(two_pi * (u2 - np.float32(0.25))),
                            r2 * np.cos(two_pi * u4), r2 * np.cos(two_pi * (u4 - np.float32(0.25)))])
        out[start:start + length] = z[:length]
    return out


KEYS = dict(seed=[3, 2**63 + 12345, 2**64 - 1], sample_index=[0, 7, 2**32 - 1])


def test_philox_words_match_numpy_and_native(harness):
    from samplers import noise as noise_module

    calls, seed, c = 300, 2**63 + 977, (5, 2**32 - 2, step_stream(3))
    words = np.empty((calls, 4), dtype=np.uint32)
    harness.philox_words(words.ctypes.data_as(ctypes.c_void_p), calls, ctypes.c_uint64(seed), *map(ctypes.c_uint32, c))
    ref = np.stack(numpy_philox(np.arange(calls), *c, seed & _MASK, seed >> 32), axis=1).astype(np.uint32)
    np.testing.assert_array_equal(words, ref)
    if noise_module.native_available():
        native = torch.empty(4 * calls, dtype=torch.int32)
        noise_module._native().samplers_philox(native.data_ptr(), calls, seed, *c)
        np.testing.assert_array_equal(native.numpy().view(np.uint32).reshape(4, calls).T, ref)
    # the Philox-4x32-10 known-answer vector of Random123 (zero counter and key)
    kat = np.empty((1, 4), dtype=np.uint32)
    harness.philox_words(kat.ctypes.data_as(ctypes.c_void_p), 1, ctypes.c_uint64(0),
                         *map(ctypes.c_uint32, (0, 0, 0)))
    np.testing.assert_array_equal(kat[0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8])


@pytest.mark.parametrize("per_sample", [1, 7, 4096, 4097, 9001])
def test_kernel_noise_matches_numpy_port_and_noise_source(harness, per_sample):
    source = NoiseSource(KEYS["seed"], 3, sample_index=KEYS["sample_index"])
    for counter, stream in ((0, STREAM_PRIOR), (17, STREAM_STEP), (2**32 - 1, step_stream(5))):
        got = _host_normal(harness, source, per_sample, counter, stream)
        for s in range(3):
            port = numpy_normals(KEYS["seed"][s], KEYS["sample_index"][s], counter, stream, per_sample)
            # float32 rounding of log/cos between libms: a few ulp of the value, never a different number
            np.testing.assert_allclose(got[s].numpy(), port, rtol=2e-6, atol=2e-6)
        for device_port in (False, True):
            if device_port:  # the torch port NoiseSource uses off the CPU (and on GPUs)
                ref = kernels_torch_port(source, per_sample, counter, stream)
            else:
                ref = source.normal((per_sample,), counter=counter, stream=stream)
            torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


def kernels_torch_port(source, per_sample, counter, stream):
    from samplers.noise import _torch_normals

    counter64 = torch.full((source.batch_size,), counter, dtype=torch.int64)
    return _torch_normals(per_sample, torch.float32, "cpu", source.seeds, source.sample_index, counter64, stream)


@settings(max_examples=25, deadline=None)
@given(per_sample=st.integers(1, 9000), rows=st.lists(st.integers(0, 3), min_size=1, max_size=4),
       counter=st.integers(0, 2**32 - 1), draw=st.integers(0, 3))
def test_kernel_noise_layout_property(harness, per_sample, rows, counter, draw):
    """Any size, any subset of a batch (repeats allowed), any key: the kernels' noise is the noise of
    NoiseSource's rows, so it depends on neither the batch nor the launch."""
    source = NoiseSource([1, 2**40, 3, 2**64 - 5], 4, sample_index=[9, 8, 7, 2**32 - 1]).subset(rows)
    got = _host_normal(harness, source, per_sample, counter, step_stream(draw))
    ref = source.normal((per_sample,), counter=counter, stream=step_stream(draw))
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


def test_kernel_noise_does_not_depend_on_the_batch(harness):
    full = NoiseSource(KEYS["seed"], 3, sample_index=KEYS["sample_index"])
    together = _host_normal(harness, full, 5000, 9, STREAM_STEP)
    for s in range(3):
        alone = _host_normal(harness, full.subset([s]), 5000, 9, STREAM_STEP)
        assert torch.equal(alone[0], together[s])
    # and it is a standard normal: mean, variance and a tail probability at 4 sigma of error
    z = _host_normal(harness, NoiseSource(1, 64), 4096, 0, STREAM_STEP).double().flatten()
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    p = float((z.abs() > 2).double().mean())
    assert abs(p - 0.0455) < 4 * math.sqrt(0.0455 * 0.9545 / n)


def test_half_and_bfloat16_conversions_round_like_torch(harness):
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.9, 65520.0, 1e6, 2.0**-14, 2.0**-24, 2.0**-25,
                            3 * 2.0**-26, 2.0**-26, 1e-9, float("inf"), -float("inf"), 1 + 2.0**-11,
                            1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8], dtype=torch.float32)
    values = torch.cat([special, -special, torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 300,
                        torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 2.0**-13,
                        (torch.randint(0, 2**31 - 1, (20000,), generator=torch.Generator().manual_seed(2))
                         .to(torch.int32).view(torch.float32))])
    values = torch.cat([values, torch.tensor([float("nan"), -float("nan")])])  # and the random bits hold NaNs
    n = values.numel()
    bits = torch.empty(n, dtype=torch.int16)
    harness.to_half(_ptr(values), _ptr(bits), ctypes.c_longlong(n))
    ref = values.half()
    finite = ~torch.isnan(values)
    assert int((~finite).sum()) > 2
    assert torch.equal(bits[finite], ref.view(torch.int16)[finite])
    assert bool(torch.isnan(bits.view(torch.float16)[~finite]).all())
    back = torch.empty(n, dtype=torch.float32)
    harness.from_half(_ptr(ref), _ptr(back), ctypes.c_longlong(n))
    assert torch.equal(back[finite], ref.float()[finite])
    assert bool(torch.isnan(back[~finite]).all())
    harness.to_bf16(_ptr(values), _ptr(bits), ctypes.c_longlong(n))
    assert torch.equal(bits[finite], values.bfloat16().view(torch.int16)[finite])
    assert bool(torch.isnan(bits.view(torch.bfloat16)[~finite]).all())


# ---------------------------------------------------------------------------------------------
# the fused steps through the real driver, kernels run on the host


class HostRunner:
    """CupyRunner's interface with the kernels' host builds: launch = call the harness function."""

    def __init__(self, lib, x, noise_source):
        self.lib, self.batch, self.per_sample = lib, x.shape[0], x[0].numel()
        self.suffix_x = kernels.storage_suffix(x.dtype)
        self.seeds, self.index = noise_source.seeds, noise_source._index32
        self.launches = []

    def keep(self, t):
        assert t.is_contiguous()
        return t

    def launch(self, source, kernel, x, out, aux0, aux1, aux2, coef, k, stream_tag=0):
        name = f"{kernel}_{self.suffix_x}_{kernels.storage_suffix(out.dtype)}"
        assert name in kernels.kernel_names(source)
        for t in (x, out, aux0, aux1, aux2):
            assert t.is_contiguous() and t.shape == x.shape
        row = coef[k]
        assert row.dtype == torch.float32 and row.shape[1] == self.batch
        getattr(self.lib, name)(_ptr(x), _ptr(out), _ptr(aux0), _ptr(aux1), _ptr(aux2), _ptr(row), _ptr(self.seeds),
                                _ptr(self.index), ctypes.c_uint32(k), ctypes.c_uint32(stream_tag),
                                ctypes.c_longlong(self.per_sample), ctypes.c_longlong(self.batch))
        self.launches.append(name)


@pytest.fixture
def host_kernels(harness, monkeypatch):
    """sample(backend="cupy") runs the fused steps with the host harness on CPU tensors."""
    runners = []

    def resolve(backend, solver, device, dtype):
        if backend == "cupy":
            return "cupy", solver.fused_step(), "host emulation"
        return "torch", None, "torch"

    def make_runner(x, noise_source):
        runners.append(HostRunner(harness, x, noise_source))
        return runners[-1]

    monkeypatch.setattr(kernels, "resolve_backend", resolve)
    monkeypatch.setattr(kernels, "make_runner", make_runner)
    return runners


def _net(x, t):
    # smooth, nonlinear, time dependent; its dtype follows x (so half states give half outputs)
    tt = t.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)
    return (0.6 * torch.tanh(x) + 0.1 * x * torch.cos(tt) + 0.05).to(x.dtype)


SOLVERS = [
    EulerMaruyama(), Euler(), EulerMaruyama(eta=0.5), Heun(), Heun(eta=1.0),
    DPMSolver(1), DPMSolver(2), DPMSolver(3), DPMSolver(2, predicts="eps"),
    DPMSolverSDE(1), DPMSolverSDE(2), DPMSolverSDE(2, variant="heun"), DPMSolverSDE(3), DPMSolverSDE(2, eta=0.0),
    ERSDE(1), ERSDE(2), ERSDE(3),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("predicts", ["eps", "x0"])
def test_fused_step_equals_torch_step(host_kernels, solver, predicts):
    """The full run with every step done by the kernel bodies equals the torch solver's run (same keyed
    noise up to the libm's last bits): coefficient packing, ring buffers, history modes, noise keys."""
    model = Model(_net, VPSDE(), predicts=predicts)
    shape = (3, 2, 40, 60)  # 4800 elements a sample: a full and a short work item
    kwargs = dict(shape=shape, steps=7, seed=[4, 5, 6], sample_index=[10, 3, 2**31], return_info=True)
    ref, info_ref = sample(model, solver, backend="torch", **kwargs)
    got, info = sample(model, solver, backend="cupy", **kwargs)
    assert info.backend == "cupy" and info_ref.backend == "torch"
    assert host_kernels[-1].launches, "no kernel was launched"
    assert len(host_kernels[-1].launches) == 7 * solver.nfe_per_step
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver", [EulerMaruyama(), Heun(eta=1.0), DPMSolverSDE(3), ERSDE(2)], ids=repr)
def test_fused_step_half_precision_network(host_kernels, dtype, solver):
    """float16/bfloat16 runs: float32 state, half network output (the kernels' f32_f16/f32_bf16)."""
    model = Model(_net, VPSDE(), predicts="x0")
    kwargs = dict(shape=(2, 3, 8, 9), steps=6, seed=1, dtype=dtype)
    ref = sample(model, solver, backend="torch", **kwargs)
    got = sample(model, solver, backend="cupy", **kwargs)
    assert got.dtype == dtype
    assert host_kernels[-1].launches[0].endswith(f"_f32_{kernels.storage_suffix(dtype)}")
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    # the float32 state rounds once, at the end: at most a unit of the last place apart
    assert float((got.float() - ref.float()).abs().max()) <= 2 * float(ref.float().abs().max()) * 2.0**-7


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_half_state_kernels(harness, storage):
    """Kernels on half states (float32 arithmetic, one rounding per stored value) against torch."""
    g = torch.Generator().manual_seed(0)
    batch, per = 2, 5000
    source = NoiseSource([8, 9], batch)
    x32 = torch.randn(batch, per, generator=g)
    out = torch.randn(batch, per, generator=g).to(storage)
    ring = [torch.randn(batch, per, generator=g).to(storage) for _ in range(3)]
    coef = torch.rand(1, 7, batch, generator=g) + 0.2
    z = source.normal((per,), counter=0, stream=STREAM_STEP)
    col = lambda j: coef[0, j][:, None]
    x = x32.to(storage)
    runner = HostRunner(harness, x, source)
    runner.launch("euler.cu", "euler_step_noise", x, out, x, x, x, coef, 0)
    ref = (col(0) * x32.to(storage).float() + col(1) * out.float() + col(2) * z).to(storage)
    assert float((x.float() - ref.float()).abs().max()) <= float(ref.float().abs().max()) * 2.0**-7
    x = x32.to(storage)
    m_new = ring[0].clone()
    runner.launch("multistep.cu", "multistep_h2_noise", x, out, m_new, ring[1], ring[2], coef, 0)
    m = (col(0) * x32.to(storage).float() + col(1) * out.float()).to(storage)
    assert torch.equal(m_new, m) or float((m_new.float() - m.float()).abs().max()) <= float(m.float().abs().max()) * 2.0**-7
    ref = (col(2) * x32.to(storage).float() + col(3) * m.float() + col(4) * ring[1].float() + col(5) * ring[2].float()
           + col(6) * z).to(storage)
    assert float((x.float() - ref.float()).abs().max()) <= 2 * float(ref.float().abs().max()) * 2.0**-7


class _FakeCupy:
    """Enough of CuPy for CupyRunner, with every launched kernel run by the host harness: checks the
    Python side's launch (argument order and types against the kernel signature, grid size, tensors
    as addresses, torch's stream, one compile per file)."""

    uint32, int64 = np.uint32, np.int64

    def __init__(self, lib):
        self.lib, self.compiled, self.streams = lib, [], []
        fake = self

        class Module:
            def __init__(self, code, options=()):
                assert '#include "' not in code and "--std=c++14" in options
                fake.compiled.append(code)

            def get_function(self, name):
                return lambda grid, block, args: fake.run(name, grid, block, args)

        class Context:
            def __init__(self, value=None):
                if value is not None:
                    fake.streams.append(value)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.RawModule = Module
        self.cuda = type("cuda", (), {"Device": Context, "ExternalStream": Context})

    def run(self, name, grid, block, args):
        per_sample, batch = int(args[-2]), int(args[-1])
        assert grid[0] * block[0] >= batch * -(-per_sample // 4096) * 1024
        cargs = []
        for a in args:
            if isinstance(a, np.uint64):  # a tensor's address (CupyRunner hands the kernels data_ptr())
                cargs.append(ctypes.c_void_p(int(a)))
            elif isinstance(a, np.uint32):
                cargs.append(ctypes.c_uint32(int(a)))
            else:
                assert isinstance(a, np.int64), type(a)
                cargs.append(ctypes.c_longlong(int(a)))
        getattr(self.lib, name)(*cargs)


@pytest.fixture
def fake_cupy(harness, monkeypatch):
    """CuPy faked (kernels on the host, torch's stream 4242); sample(backend="cupy") uses the fused steps."""
    import types

    fake = _FakeCupy(harness)
    monkeypatch.setattr(kernels, "_import_cupy", lambda: fake)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=4242))
    monkeypatch.setattr(kernels, "resolve_backend", lambda backend, solver, device, dtype: (
        ("cupy", solver.fused_step(), "fake") if backend == "cupy" else ("torch", None, "torch")))
    return fake


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("solver", [EulerMaruyama(), Heun(eta=1.0), DPMSolver(3), DPMSolverSDE(2), ERSDE(3)],
                         ids=repr)
def test_cupy_runner_launches(fake_cupy, monkeypatch, solver, dtype):
    """sample(backend="cupy") through the real CupyRunner (CuPy faked, kernels on the host) equals the
    torch path."""
    fake = fake_cupy
    runners = []
    real_make_runner = kernels.make_runner
    monkeypatch.setattr(kernels, "make_runner", lambda x, noise: runners.append(real_make_runner(x, noise))
                        or runners[-1])
    model = Model(_net, VPSDE(), predicts="eps")
    kwargs = dict(shape=(2, 3, 40, 50), steps=6, seed=[1, 2], dtype=dtype)
    ref = sample(model, solver, backend="torch", **kwargs)
    got = sample(model, solver, backend="cupy", **kwargs)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=2e-5 if dtype == torch.float32 else 1e-2)
    (runner,) = runners
    assert isinstance(runner, kernels.CupyRunner)
    assert len(fake.compiled) == 1 and set(fake.streams) == {4242}


def test_fused_step_detaches_an_output_that_requires_grad(harness):
    """A fused step called in grad mode outside sample() (which runs under no_grad), with a network
    whose output requires grad: the kernels read a detached output (they record no graph) and give
    the torch step's numbers."""
    from samplers.sample import fixed_grid_context

    scale = torch.nn.Parameter(torch.tensor(0.7))
    model = Model(lambda x, t: scale * torch.tanh(x), VPSDE(), predicts="eps")
    noise = NoiseSource(3, 2)
    times = grid(VPSDE(), 4)[:, None]
    x_ref = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0))
    x_fused = x_ref.clone()
    ctx_ref = fixed_grid_context(model, DPMSolverSDE(2), x_ref, times, {}, noise, torch.float32)
    ctx_fused = fixed_grid_context(model, DPMSolverSDE(2), x_fused, times, {}, noise, torch.float32)
    fused = DPMSolverSDE(2).fused_step()
    fused.bind(ctx_fused, x_fused, HostRunner(harness, x_fused, noise))
    with torch.enable_grad():
        assert model.net(x_ref, times[0]).requires_grad
        for k in range(4):
            fused.step(k, x_fused, ctx_fused)
    with torch.no_grad():
        for k in range(4):
            x_ref = DPMSolverSDE(2).step(k, x_ref, ctx_ref)
    assert not x_fused.requires_grad and scale.grad is None
    torch.testing.assert_close(x_fused, x_ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# backend choice


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError


def test_backend_choice_without_cupy(no_cupy):
    name, fused, why = kernels.resolve_backend("auto", EulerMaruyama(), "cuda", torch.float32)
    assert (name, fused) == ("torch", None) and "CuPy is not importable" in why
    with pytest.raises(kernels.KernelUnsupported, match="backend='cupy'.*CuPy is not importable"):
        kernels.resolve_backend("cupy", EulerMaruyama(), "cuda", torch.float32)
    assert kernels.cupy_unavailable_reason().startswith("CuPy is not importable")


@pytest.mark.parametrize("solver, device, dtype, why", [
    (EulerMaruyama(), "cpu", torch.float32, "need a CUDA device"),
    (EulerMaruyama(), "cuda", torch.float64, "float32, float16 or bfloat16"),
    (UniPC(), "cuda", torch.float32, "UniPC has no fused kernel"),
    (DPMSolver(2, variant="singlestep"), "cuda", torch.float32, "singlestep"),
    (DPMSolver(2, thresholding=True), "cuda", torch.float32, "thresholding"),
    (DPMSolverSDE(2, thresholding=True), "cuda", torch.float32, "thresholding"),
    (ERSDE(2, correct_x0=lambda x0, t: x0), "cuda", torch.float32, "correct_x0"),
])
def test_backend_choice_reasons(solver, device, dtype, why):
    name, fused, reason = kernels.resolve_backend("auto", solver, device, dtype)
    assert name == "torch" and fused is None and why in reason
    with pytest.raises(kernels.KernelUnsupported, match=why):
        kernels.resolve_backend("cupy", solver, device, dtype)


def test_backend_choice_kernels_declared(monkeypatch):
    monkeypatch.setattr(kernels, "cupy_unavailable_reason", lambda: None)  # as if CuPy saw a GPU
    monkeypatch.setattr(kernels, "kernel_compile_reason", lambda sources: None)  # ... and NVRTC compiled
    for solver, kind in [(EulerMaruyama(), kernels.LinearStep), (Heun(), kernels.HeunStep),
                         (DPMSolver(3), kernels.MultistepStep), (DPMSolverSDE(2), kernels.MultistepStep),
                         (ERSDE(3), kernels.MultistepStep)]:
        name, fused, _ = kernels.resolve_backend("auto", solver, "cuda:0", torch.bfloat16)
        assert name == "cupy" and isinstance(fused, kind)
    assert kernels.resolve_backend("torch", EulerMaruyama(), "cuda", torch.float32)[:2] == ("torch", None)
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'cupy'"):
        kernels.resolve_backend("cuda", EulerMaruyama(), "cuda", torch.float32)


def test_auto_falls_back_when_the_kernels_do_not_compile(monkeypatch):
    """CuPy imports and sees a GPU, but NVRTC fails: auto runs torch and says why; cupy raises; the
    sources compiled are exactly the ones the step may launch from."""
    compiled = []

    class Module:
        def __init__(self, code, options=()):
            self.code = code

        def compile(self):
            compiled.append(self.code)
            raise RuntimeError("nvrtc: error: failed to open libnvrtc-builtins.so")

    fake = type("cupy", (), {"RawModule": Module})
    monkeypatch.setattr(kernels, "_import_cupy", lambda: fake)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "cupy_unavailable_reason", lambda: None)
    name, fused, why = kernels.resolve_backend("auto", DPMSolver(2), "cuda:0", torch.float32)
    assert (name, fused) == ("torch", None)
    assert "multistep.cu did not compile" in why and "libnvrtc-builtins" in why
    with pytest.raises(kernels.KernelUnsupported, match="backend='cupy'.*euler.cu did not compile"):
        kernels.resolve_backend("cupy", EulerMaruyama(), "cuda:0", torch.float32)
    assert compiled == [kernels.kernel_source("multistep.cu"), kernels.kernel_source("euler.cu")]
    assert kernels.MultistepStep.sources == ("multistep.cu", "euler.cu") and kernels.LinearStep.sources == ("euler.cu",)


def test_auto_falls_back_when_a_kernel_is_missing(monkeypatch):
    """The sources compile but a kernel a step launches is not in the module (e.g. a source edited
    out of step with kernel_names): auto runs torch and names the kernel; cupy raises."""

    class Module:
        def __init__(self, code, options=()):
            pass

        def compile(self):
            pass

        def get_function(self, name):
            if name == "multistep_h2_noise_f32_bf16":
                raise RuntimeError("CUDA_ERROR_NOT_FOUND: named symbol not found")
            return object()

    monkeypatch.setattr(kernels, "_import_cupy", lambda: type("cupy", (), {"RawModule": Module}))
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "cupy_unavailable_reason", lambda: None)
    name, fused, why = kernels.resolve_backend("auto", ERSDE(3), "cuda:0", torch.float32)
    assert (name, fused) == ("torch", None)
    assert "multistep_h2_noise_f32_bf16 is missing from the compiled multistep.cu" in why and "named symbol" in why
    with pytest.raises(kernels.KernelUnsupported, match="backend='cupy'.*multistep_h2_noise_f32_bf16 is missing"):
        kernels.resolve_backend("cupy", ERSDE(3), "cuda:0", torch.float32)
    assert kernels.resolve_backend("cupy", EulerMaruyama(), "cuda:0", torch.float32)[0] == "cupy"


def test_sample_backend_argument(no_cupy):
    model = Model(_net, VPSDE(), predicts="eps")
    x, info = sample(model, EulerMaruyama(), shape=(2, 3), steps=3, return_info=True)
    assert info.backend == "torch" and "CUDA device" in info.backend_reason
    x2, info = sample(model, EulerMaruyama(), shape=(2, 3), steps=3, backend="torch", return_info=True)
    assert info.backend == "torch" and torch.equal(x, x2)
    with pytest.raises(kernels.KernelUnsupported, match="backend='cupy' cannot run"):
        sample(model, EulerMaruyama(), shape=(2, 3), steps=3, backend="cupy")
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'cupy'"):
        sample(model, EulerMaruyama(), shape=(2, 3), steps=3, backend="gpu")


def test_keyed_normal_refuses_cpu():
    with pytest.raises(ValueError, match="CUDA device"):
        kernels.keyed_normal(NoiseSource(0, 2), (3,), device="cpu")
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(ValueError, match="counter must be an int in"):
            kernels.keyed_normal(NoiseSource(0, 2), (3,), counter=bad, device="cuda")
    with pytest.raises(ValueError, match="stream must be an int in"):
        kernels.keyed_normal(NoiseSource(0, 2), (3,), stream=-2, device="cuda")


def test_bench_kernels_refuses_bad_arguments(capsys):
    from samplers.cli import bench
    from samplers.cli.bench_kernels import bench_kernels

    with pytest.raises(ValueError, match="steps must exceed 5"):
        bench_kernels(steps=5, device="cpu")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench_kernels(rounds=0, device="cpu")
    with pytest.raises(ValueError, match="check_steps must be in"):
        bench_kernels(check_steps=0, device="cpu")
    for bad in ("2x0", "abc", "4x"):
        with pytest.raises(SystemExit):
            bench.main(["kernels", "--shapes", bad])
        assert "argument --shapes: a shape is positive sizes" in capsys.readouterr().err


def test_bench_kernels_refuses_without_gpu(capsys, monkeypatch):
    from samplers.cli import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_kernels_logic_with_host_kernels(harness, monkeypatch):
    """The benchmark's bookkeeping on the CPU (timers replaced, kernels on the host): counted bytes per
    step, and the torch path fed the kernels' noise agrees with the fused steps."""
    from samplers.cli import bench_kernels as bk
    from samplers.cli.registry import KERNEL_BENCH_SOLVERS

    monkeypatch.setattr(kernels, "make_runner", lambda x, noise: HostRunner(harness, x, noise))
    monkeypatch.setattr(kernels, "keyed_normal", lambda source, shape, *, counter=0, stream=0, dtype=torch.float32,
                        device="cpu": _host_normal(harness, source, math.prod(shape), counter, stream)
                        .reshape(source.batch_size, *shape).to(dtype))
    monkeypatch.setattr(bk, "copy_bandwidth", lambda: 1e10)
    monkeypatch.setattr(bk, "_gpu_time", lambda fn, rounds: (fn(), 1e-3)[1])
    result = bk.bench_kernels(shapes=((2, 3, 40, 40),), steps=8, rounds=1, log=lambda *a: None, device="cpu")
    rows = {r["solver"]: r for r in result["rows"]}
    assert set(rows) == {repr(s) for s in KERNEL_BENCH_SOLVERS()}
    elements = 2 * 3 * 40 * 40
    # bytes: state-sized float32 passes read + written by the launched kernels
    assert rows["EulerMaruyama(eta=1)"]["bytes"] == 3 * 4 * elements
    assert rows["Heun(eta=1)"]["bytes"] == 7 * 4 * elements
    assert rows["DPMSolver(order=3, predicts='x0')"]["bytes"] == 6 * 4 * elements
    assert rows["DPMSolverSDE(order=2, variant='midpoint', eta=1)"]["bytes"] == 5 * 4 * elements
    for r in result["rows"]:
        assert r["max_rel_diff"] < 1e-5, r


# ---------------------------------------------------------------------------------------------
# packaging


def test_wheel_ships_the_kernel_sources(tmp_path):
    """A non-editable wheel holds the .cu/.cuh files where kernels.cuda_source_dir() finds them."""
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "sde", "solvers", "samplers", "cuda"):
        path = ROOT / item
        if path.is_dir():
            shutil.copytree(path, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(path, src / item)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in kernels.KERNEL_FILES + kernels.HEADER_FILES:
        assert f"solvers/_cuda/{name}" in names
    assert not any(n.startswith("cuda/") for n in names)  # no top-level 'cuda' package
    assert "samplers/cli/registry.py" in names  # the tooling behind python -m samplers
    # the installed layout is found first
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from solvers import kernels; print(kernels.cuda_source_dir())"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(site)})
    assert found.stdout.strip() == str(site / "solvers" / "_cuda"), found.stderr


# ---------------------------------------------------------------------------------------------
# on a GPU


def _gpu_ready() -> bool:
    return torch.cuda.is_available() and kernels.cupy_unavailable_reason() is None


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and CuPy")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_noise_kernel_matches_noise_source(dtype):
    source = NoiseSource(KEYS["seed"], 3, sample_index=KEYS["sample_index"])
    got = kernels.keyed_normal(source, (9001,), counter=5, stream=STREAM_STEP, dtype=dtype)
    ref = source.normal((9001,), counter=5, stream=STREAM_STEP)
    torch.testing.assert_close(got.cpu().float(), ref.to(dtype).float(), rtol=2e-6 if dtype == torch.float32 else 1e-2,
                               atol=2e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_equals_torch_with_the_same_noise(monkeypatch, solver, dtype):
    """On the GPU: the torch path fed the noise-only kernel's numbers equals the fused kernels."""
    original = NoiseSource.normal

    def kernel_noise(self, shape, *, counter=0, stream=STREAM_STEP, dtype=torch.float32, device="cpu", out=None):
        dev = torch.device(out.device if out is not None else device)
        if dev.type != "cuda" or not isinstance(counter, int):
            return original(self, shape, counter=counter, stream=stream, dtype=dtype, device=device, out=out)
        z = kernels.keyed_normal(self, shape, counter=counter, stream=stream, device=dev)
        return out.copy_(z) if out is not None else z.to(dtype)

    monkeypatch.setattr(NoiseSource, "normal", kernel_noise)
    model = Model(_net, VPSDE(), predicts="eps")
    kwargs = dict(shape=(8, 3, 32, 32), steps=10, seed=3, device="cuda", dtype=dtype, return_info=True)
    ref, _ = sample(model, solver, backend="torch", **kwargs)
    got, info = sample(model, solver, backend="cupy", **kwargs)
    assert info.backend == "cupy"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("pair", kernels.STORAGE_PAIRS)
def test_bench_gpu_kernel_agreement_with_host_kernels(harness, monkeypatch, pair):
    """``bench gpu``'s per-kernel agreement on the CPU (kernels on the host): every solver's fused step
    lies within a few roundings of the stored state of its float64 torch step, and the kernels each
    solver launches are the ones docs/gpu.md names."""
    from samplers.cli import bench_gpu
    from samplers.cli.registry import kernel_agreement_solvers

    monkeypatch.setattr(kernels, "make_runner", lambda x, noise: HostRunner(harness, x, noise))
    monkeypatch.setattr(kernels, "keyed_normal", lambda source, shape, *, counter=0, stream=0, dtype=torch.float32,
                        device="cpu": _host_normal(harness, source, math.prod(shape), counter, stream)
                        .reshape(source.batch_size, *shape).to(dtype))
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    state, out = (dtypes[s] for s in pair.split("_"))
    unit = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[state]
    launched_by = {}
    for solver in kernel_agreement_solvers():
        diff, launched = bench_gpu.kernel_agreement(solver, state, out, shape=(2, 3, 8, 9), device="cpu")
        assert diff <= 16 * unit, (solver, diff)
        launched_by[repr(solver)] = launched
    assert launched_by["EulerMaruyama(eta=1)"] == ["euler_step_noise"]
    assert launched_by["Heun(eta=0)"] == ["heun_correct", "heun_predict"]
    assert launched_by["DPMSolver(order=3, predicts='x0')"] == ["multistep_h0", "multistep_h1", "multistep_h2"]
    assert launched_by["ERSDE(order=3, noise_scale='sde_5')"] == ["multistep_h0_noise", "multistep_h1_noise",
                                                                   "multistep_h2_noise"]


def test_bench_gpu_reports_no_gpu(tmp_path, monkeypatch, capsys):
    """Without a GPU ``bench gpu`` says so (exit 2, no traceback) and still writes its report."""
    import json

    from samplers.cli import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu", "--out", str(tmp_path / "run")]) == 2
    assert "no GPU: torch.cuda.is_available() is False" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "gpu.json").read_text())
    assert report["gpu"] is False and report["no_gpu_reason"].startswith("no GPU")
    assert report["environment"]["torch"] == torch.__version__ and report["sections"] == {}
    assert "no GPU" in (tmp_path / "run" / "gpu.log").read_text()
    with pytest.raises(SystemExit):
        bench.main(["gpu", "--out", str(tmp_path / "run"), "--sections", "noise", "bandwith"])
    assert "unknown ['bandwith']" in capsys.readouterr().err
