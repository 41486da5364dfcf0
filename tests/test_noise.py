"""Keyed Gaussian noise (samplers.noise): Philox4x32-10 known answers, the C library against its
torch port, distribution, independence of keys, batch/thread invariance and argument checks."""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from samplers import noise as noise_mod
from samplers.noise import STREAM_PRIOR, STREAM_STEP, STREAM_TREE, NoiseSource, _torch_normals, philox_torch

F32, F64 = torch.float32, torch.float64

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors):
# (counter x0..x3, key k0, k1) -> output words
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

needs_native = pytest.mark.skipif(not noise_mod.native_available(),
                                  reason=f"native noise library unavailable: {noise_mod._lib_error}")


def native_normals(per_sample, dtype, seeds, index, counter, stream):
    """The C generator through NoiseSource (B = len(seeds))."""
    src = NoiseSource(list(seeds), len(seeds), sample_index=list(index))
    return src.normal((per_sample,), counter=torch.tensor(counter), stream=stream, dtype=dtype)


def torch_port_normals(per_sample, dtype, seeds, index, counter, stream):
    src = NoiseSource(list(seeds), len(seeds), sample_index=list(index))
    return _torch_normals(per_sample, dtype, "cpu", src.seeds, src.sample_index,
                          torch.tensor(counter, dtype=torch.int64), stream)


# -- Philox words -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_torch_known_answers(counter, key, expected):
    words = philox_torch(torch.tensor([counter[0]], dtype=torch.int64), key[0], key[1], counter[1], counter[2],
                         counter[3])
    assert [int(w[0]) for w in words] == list(expected)


@needs_native
def test_native_philox_known_answer_and_agreement_with_torch_port():
    lib = noise_mod._native()
    # KAT 1 through the exported entry point: counter x0 is the call index, which starts at 0
    out = np.zeros(4, dtype=np.uint32)
    lib.samplers_philox(out.ctypes.data, 1, 0, 0, 0, 0)
    assert [int(v) for v in out] == list(KAT[0][2])
    # many calls (crossing the 1024-call work items) and keys with the high bits set
    calls = 3000
    for seed, c1, c2, c3 in [(0, 0, 0, 0), (2**64 - 1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
                             (0xA4093822299F31D0, 0x85A308D3, 0x13198A2E, 0x03707344), (12345, 7, 1, 2)]:
        out = np.zeros(4 * calls, dtype=np.uint32)
        lib.samplers_philox(out.ctypes.data, calls, seed, c1, c2, c3)
        words = philox_torch(torch.arange(calls, dtype=torch.int64), seed & 0xFFFFFFFF, seed >> 32, c1, c2, c3)
        expected = torch.stack(words).numpy().astype(np.uint32).reshape(-1)
        assert np.array_equal(out, expected), seed


@needs_native
def test_c_philox_round_function_known_answers(tmp_path):
    """All three KAT vectors through the C round function itself (x0 = 0xffffffff and x0 =
    0x243f6a88 are unreachable through samplers_philox, whose x0 is the call index)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    harness = tmp_path / "kat.c"
    harness.write_text(
        f'#include "{noise_mod._SOURCE}"\n'
        "void kat(uint32_t *o, uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3, uint32_t k0, uint32_t k1) {\n"
        "    philox_calls(k0, k1, x0, x1, x2, x3, 1, o, o + 1, o + 2, o + 3);\n"
        "}\n"
    )
    so = tmp_path / "kat.so"
    proc = subprocess.run([compiler, "-O2", "-fPIC", "-shared", str(harness), "-o", str(so), "-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(so))
    lib.kat.argtypes = [ctypes.c_void_p] + [ctypes.c_uint32] * 6
    for counter, key, expected in KAT:
        out = np.zeros(4, dtype=np.uint32)
        lib.kat(out.ctypes.data, *counter, *key)
        assert [int(v) for v in out] == list(expected)


@needs_native
def test_loading_the_native_library_keeps_ieee_subnormals():
    """The library is loaded into the user's process: it must not switch the CPU to
    flush-to-zero / denormals-are-zero mode (what a shared object linked with -ffast-math does
    through crtfastmath.o), which would change every later float computation in torch, numpy
    and Python itself."""
    assert noise_mod._native() is not None
    smallest_normal = 2.2250738585072014e-308
    assert smallest_normal / 4 != 0.0
    assert (torch.tensor([smallest_normal], dtype=F64) / 4).item() != 0.0
    assert float(np.float32(1e-38) / np.float32(100)) != 0.0


# -- native generator against the torch port ------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("per_sample", [1, 3, 4095, 4097, 9000])
@pytest.mark.parametrize("dtype, atol", [(F32, 2e-6), (F64, 1e-12)])
def test_native_matches_torch_port(per_sample, dtype, atol):
    seeds = [0, 2**64 - 1, 123456789, 2**63 + 5]
    index = [0, 2**32 - 1, 7, 1000]
    counter = [0, 2**32 - 1, 3, 99]
    for stream in (STREAM_STEP, STREAM_PRIOR, STREAM_TREE):
        a = native_normals(per_sample, dtype, seeds, index, counter, stream)
        b = torch_port_normals(per_sample, dtype, seeds, index, counter, stream)
        assert a.dtype == b.dtype == dtype and a.shape == b.shape == (4, per_sample)
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= atol


@needs_native
def test_noise_source_falls_back_to_torch_port(monkeypatch):
    src = NoiseSource([5, 6, 7], 3)
    native32 = src.normal((2, 50), counter=4, stream=STREAM_PRIOR)
    native64 = src.normal((2, 50), counter=4, stream=STREAM_PRIOR, dtype=F64)
    monkeypatch.setattr(noise_mod, "_native", lambda: None)
    port32 = src.normal((2, 50), counter=4, stream=STREAM_PRIOR)
    port64 = src.normal((2, 50), counter=4, stream=STREAM_PRIOR, dtype=F64)
    assert port32.shape == (3, 2, 50)
    assert torch.allclose(port32, native32, atol=2e-6, rtol=0)
    assert torch.allclose(port64, native64, atol=1e-12, rtol=0)
    half = torch.empty(3, 2, 50, dtype=torch.float16)
    assert src.normal((2, 50), counter=4, stream=STREAM_PRIOR, out=half) is half
    assert torch.equal(half, port32.to(torch.float16))


# -- distribution -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_normals_pass_ks_and_moment_tests(dtype):
    n = 10**6
    z = NoiseSource(2024, 1).normal((n,), counter=0, dtype=dtype)[0].to(F64).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    # kurtosis 3 (fourth moment) within 5 standard errors (sd of z^4 is sqrt(96))
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)
    # the two outputs of one Box-Muller transform: angle uniform, radius^2 ~ Exp(mean 2)
    calls = (4 if dtype == F32 else 2) * 1024
    block = z[: (n // calls) * calls].reshape(-1, calls)
    half = calls // (4 if dtype == F32 else 2)
    c, s = block[:, :half].reshape(-1), block[:, half: 2 * half].reshape(-1)
    angle = (np.arctan2(s, c) / (2 * np.pi)) % 1.0
    assert stats.kstest(angle, "uniform").pvalue > 1e-3
    assert stats.kstest(c * c + s * s, "expon", args=(0, 2)).pvalue > 1e-3


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().to(F64), b.flatten().to(F64)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_different_keys_give_independent_streams():
    n = 100_000
    bound = 5 / math.sqrt(n)
    base = NoiseSource(1, 1).normal((n,), counter=0, stream=STREAM_STEP, dtype=F64)
    variants = {
        "counter": NoiseSource(1, 1).normal((n,), counter=1, stream=STREAM_STEP, dtype=F64),
        "stream": NoiseSource(1, 1).normal((n,), counter=0, stream=STREAM_PRIOR, dtype=F64),
        "seed": NoiseSource(2, 1).normal((n,), counter=0, stream=STREAM_STEP, dtype=F64),
        "seed_high_bits": NoiseSource(1 + 2**32, 1).normal((n,), counter=0, stream=STREAM_STEP, dtype=F64),
        "sample_index": NoiseSource(1, 1, sample_index=[1]).normal((n,), counter=0, stream=STREAM_STEP, dtype=F64),
    }
    for what, other in variants.items():
        assert abs(_corr(base, other)) < bound, what
        assert not torch.equal(base, other), what
    # within one draw: neighbouring elements and the two Box-Muller outputs are uncorrelated
    z = base[0]
    assert abs(_corr(z[:-1], z[1:])) < bound
    assert abs(_corr(z[:1024], z[1024:2048])) < 5 / math.sqrt(1024)
    # a batch of 20000 samples with one element each: different sample indices are independent
    col = NoiseSource(3, 20000).normal((2,), counter=0, dtype=F64)
    assert abs(_corr(col[:-1, 0], col[1:, 0])) < 5 / math.sqrt(20000)
    assert abs(col[:, 0].mean().item()) < 5 / math.sqrt(20000)


def test_draws_repeat_and_do_not_depend_on_the_batch():
    big = NoiseSource(11, 9).normal((3, 5), counter=2)
    assert torch.equal(big, NoiseSource(11, 9).normal((3, 5), counter=2))
    assert torch.equal(big[:4], NoiseSource(11, 4).normal((3, 5), counter=2))
    shard = NoiseSource(11, 3, sample_index=[4, 5, 6]).normal((3, 5), counter=2)
    assert torch.equal(shard, big[4:7])
    # per-sample seeds: sample i keyed by (seed_i, index i)
    seeds = [3, 1, 4, 1, 5]
    per = NoiseSource(seeds, 5).normal((7,), counter=0, dtype=F64)
    for i, s in enumerate(seeds):
        assert torch.equal(per[i], NoiseSource(s, 1, sample_index=[i]).normal((7,), counter=0, dtype=F64)[0])
    # per-sample counters: row i equals the draw with counter c_i
    counters = [0, 9, 2**32 - 1]
    rows = NoiseSource(8, 3).normal((6,), counter=counters)
    for i, c in enumerate(counters):
        assert torch.equal(rows[i], NoiseSource(8, 3).normal((6,), counter=c)[i])


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 12), shape=st.lists(st.integers(1, 6), min_size=0, max_size=3),
       seed=st.integers(0, 2**64 - 1), counter=st.integers(0, 2**32 - 1), dtype=st.sampled_from([F32, F64]))
def test_batch_prefix_property(batch, shape, seed, counter, dtype):
    full = NoiseSource(seed, batch).normal(shape, counter=counter, dtype=dtype)
    assert full.shape == (batch, *shape) and full.dtype == dtype
    assert torch.isfinite(full).all()
    k = max(1, batch // 2)
    assert torch.equal(full[:k], NoiseSource(seed, k).normal(shape, counter=counter, dtype=dtype))
    last = NoiseSource(seed, 1, sample_index=[batch - 1]).normal(shape, counter=counter, dtype=dtype)
    assert torch.equal(full[-1:], last)


@needs_native
@pytest.mark.parametrize("dtype", [F32, F64])
def test_threaded_native_fill_is_bit_identical(dtype, restore_threads):
    src = NoiseSource([1, 2**64 - 1, 77, 5], 4, sample_index=[0, 9, 2**32 - 1, 3])
    counter = src._counter(12)
    shape = (4, 3, 50_001)  # > 2^16 elements: the threaded path, with a ragged last work item

    def fill(threads):
        torch.set_num_threads(threads)
        out = torch.empty(shape, dtype=dtype)
        noise_mod._native_fill(out, src.seeds, src._index32, counter, STREAM_STEP)
        return out

    one, two = fill(1), fill(2)
    assert torch.equal(one, two)
    assert torch.equal(one, src.normal((3, 50_001), counter=12, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_out(dtype):
    src = NoiseSource(4, 3)
    ref = src.normal((5, 7), counter=1, stream=STREAM_PRIOR)
    out = torch.empty(3, 5, 7, dtype=dtype)
    got = src.normal((5, 7), counter=1, stream=STREAM_PRIOR, out=out)
    assert got is out and out.dtype == dtype
    assert torch.equal(out, ref.to(dtype))
    assert torch.equal(src.normal((5, 7), counter=1, stream=STREAM_PRIOR, dtype=dtype), ref.to(dtype))
    # a non-contiguous float32 out buffer is filled through a copy
    buf = torch.empty(7, 5, 3).permute(2, 1, 0)
    assert torch.equal(src.normal((5, 7), counter=1, stream=STREAM_PRIOR, out=buf), ref)


def test_argument_errors():
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        NoiseSource(0, 0)
    with pytest.raises(ValueError, match=r"seed: expected integers in \[0, 2\^64\)"):
        NoiseSource(-1, 2)
    with pytest.raises(ValueError, match=r"seed: expected integers in \[0, 2\^64\)"):
        NoiseSource(2**64, 2)
    with pytest.raises(TypeError, match="seed: expected integers"):
        NoiseSource(1.5, 2)
    with pytest.raises(TypeError, match="seed: expected integers"):
        NoiseSource(True, 1)
    with pytest.raises(ValueError, match=r"expected an int or one seed per sample \(3\), got 2 seeds"):
        NoiseSource([1, 2], 3)
    with pytest.raises(ValueError, match="sample_index: expected 3 indices, got 2"):
        NoiseSource(0, 3, sample_index=[0, 1])
    with pytest.raises(ValueError, match=r"sample_index: expected integers in \[0, 2\^32\)"):
        NoiseSource(0, 2, sample_index=[0, -1])
    src = NoiseSource(0, 2)
    with pytest.raises(ValueError, match=r"counter must lie in \[0, 2\^32\)"):
        src.normal((3,), counter=2**32)
    with pytest.raises(ValueError, match="counter: expected an int or 2 values, got 3"):
        src.normal((3,), counter=[1, 2, 3])
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3\), got \(2, 4\)"):
        src.normal((3,), out=torch.empty(2, 4))
    # a tensor of seeds is accepted like a list
    assert torch.equal(NoiseSource(torch.tensor([4, 5]), 2).normal((3,)), NoiseSource([4, 5], 2).normal((3,)))


def test_step_draws_are_independent_keyed_streams():
    """ctx.noise(k, draw): draw 0 is the step's stream; draws 1, 2 are other keys, batch invariant."""
    from samplers.noise import STREAM_STEP, STREAM_STEP_DRAWS, step_stream

    assert step_stream(0) == STREAM_STEP and step_stream(1) == STREAM_STEP_DRAWS + 1
    with pytest.raises(ValueError, match=r"draw must be an int in \[0, 65535\], got -1"):
        step_stream(-1)
    src = NoiseSource(3, 4)
    draws = [src.normal((1000,), counter=5, stream=step_stream(j)) for j in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            corr = (draws[i] * draws[j]).mean().item()
            assert abs(corr) < 0.1, (i, j, corr)
    one = NoiseSource(3, 1, sample_index=[2]).normal((1000,), counter=5, stream=step_stream(2))
    assert torch.equal(one[0], draws[2][2])
