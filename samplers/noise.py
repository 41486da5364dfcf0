"""Keyed Gaussian noise: sample i's numbers depend on (seed_i, sample index i, counter, stream) only.

The generator is Philox4x32-10 with Box-Muller.  On the CPU it runs as a small C library
(``_native/philox.c``, OpenMP on torch's thread count) compiled on first use with the system C
compiler and cached; on other devices, and where no compiler is available, a torch port of the same counter mapping runs
instead (same Philox words; normals equal up to the last bits of log/cos).

Streams keep the draws of different purposes apart: the prior draw, the per-step noise of
fixed-grid solvers, and (for adaptive and reversible solvers) nodes of a virtual Brownian
tree, which use ``counter`` as the node id so W(s) - W(t) can be asked for at any times.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from sde.validation import check_count

__all__ = ["NoiseSource", "STREAM_PRIOR", "STREAM_STEP", "STREAM_TREE", "STREAM_PROBE", "STREAM_DEQUANTIZE",
           "STREAM_STEP_DRAWS", "STREAM_PATHS", "NOISE_MODES", "step_stream", "native_available"]

# every purpose of keyed noise has its own stream, listed here so no two purposes share one
STREAM_STEP = 0
STREAM_PRIOR = 1
STREAM_TREE = 2
#: the likelihood's Hutchinson probes (counter = probe number) and its dequantisation draw (counter 0)
STREAM_PROBE = 3
STREAM_DEQUANTIZE = 4
#: further independent draws within one step (a corrector, restart jumps): draw j >= 1 of step k is
#: keyed (counter k, stream STREAM_STEP_DRAWS + j)
STREAM_STEP_DRAWS = 1 << 16
#: Brownian paths besides the tree (Restart's jumps, ``noise="path"``): path p >= 1 has stream STREAM_PATHS + p
STREAM_PATHS = 1 << 17

#: how fixed-grid solvers take their noise: "step" (a keyed draw per step, counter = step index) or
#: "path" (the increment of one keyed Brownian path per sample, so a finer grid refines the same path)
NOISE_MODES = ("step", "path")


def step_stream(draw: int) -> int:
    """The stream of draw ``draw`` (0, 1, ...) of a step: STREAM_STEP for the first draw."""
    draw = check_count("draw", draw, minimum=0, maximum=STREAM_STEP_DRAWS - 1)
    return STREAM_STEP if draw == 0 else STREAM_STEP_DRAWS + draw

_ITEM_CALLS = 1024  # must equal ITEM_CALLS in _native/philox.c
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_SOURCE = Path(__file__).with_name("_native") / "philox.c"
_PARALLEL_MIN_ELEMENTS = 1 << 16
_BUILD_RECIPE = b"compile -c with -ffast-math, link without"  # part of the cache key

# ---------------------------------------------------------------------------------------------
# native library


def _cache_dir() -> Path:
    root = os.environ.get("SAMPLERS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "samplers"
    )
    return Path(root)


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) found")
    # OpenMP first (shares torch's libgomp thread pool), then single-threaded fallbacks
    attempts = [
        ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
        ["-O3", "-ffast-math", "-fopenmp"],
        ["-O3", "-ffast-math", "-fopenmp-simd"],
        ["-O2"],
    ]
    errors = []
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        for flags in attempts:
            for libs in (["-lmvec", "-lm"], ["-lm"]):
                obj, lib = workdir / "philox.o", workdir / "philox.so"
                # compile and link separately: linking a shared object with -ffast-math pulls in
                # crtfastmath.o, which switches the whole process to flush-to-zero on load
                compile_cmd = [compiler, *flags, "-fPIC", "-c", str(_SOURCE), "-o", str(obj)]
                openmp = ["-fopenmp"] if "-fopenmp" in flags else []
                link_cmd = [compiler, "-shared", *openmp, str(obj), "-o", str(lib), *libs]
                for cmd in (compile_cmd, link_cmd):
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-300:]}")
                        break
                else:
                    os.replace(lib, target)  # atomic: concurrent processes may compile at once
                    return
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raise OSError("compiling the noise library failed:\n" + "\n".join(errors))


_lib = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _native():
    """The compiled library, or None (with the reason kept in _lib_error)."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        if os.environ.get("SAMPLERS_NOISE_BACKEND", "").lower() == "torch":
            _lib_error = "SAMPLERS_NOISE_BACKEND=torch"
            return None
        source = _SOURCE.read_bytes()
        key = hashlib.sha256(source + _BUILD_RECIPE + _cpu_signature().encode()).hexdigest()[:16]
        target = _cache_dir() / f"philox-{key}.so"
        try:
            if not target.exists():
                _compile(target)
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            _lib_error = str(exc)
            warnings.warn(
                f"samplers: the native noise generator is unavailable ({exc}); using the slower "
                "torch port of the same generator",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_uint32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        for name in ("samplers_normal_f32", "samplers_normal_f64"):
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
        lib.samplers_philox.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                                        ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32]
        _lib = lib
        return _lib


def native_available() -> bool:
    return _native() is not None


def _native_fill(out: torch.Tensor, seeds, index, counter, stream: int) -> None:
    lib = _native()
    fn = lib.samplers_normal_f32 if out.dtype == torch.float32 else lib.samplers_normal_f64
    batch = out.shape[0]
    per_sample = out[0].numel() if batch else 0
    item_size = (4 if out.dtype == torch.float32 else 2) * _ITEM_CALLS
    items = batch * ((per_sample + item_size - 1) // item_size)
    threads = 1 if out.numel() < _PARALLEL_MIN_ELEMENTS else torch.get_num_threads()
    fn(out.data_ptr(), per_sample, seeds.data_ptr(), index.data_ptr(), counter.data_ptr(), stream, 0, items, threads)


# ---------------------------------------------------------------------------------------------
# torch port (any device); int64 arithmetic on 32-bit words


def philox_torch(calls: torch.Tensor, seed_lo, seed_hi, c1, c2, c3):
    """Philox4x32-10 on int64 tensors holding uint32 values; all arguments broadcast."""
    x0, x1, x2, x3 = calls, c1, c2, c3
    k0, k1 = seed_lo, seed_hi
    for _ in range(10):
        p0 = _M0 * x0  # < 2^64: wraps in int64, but the low 64 bits, hence both halves, are exact
        p1 = _M1 * x2
        y0 = ((p1 >> 32) & _MASK32) ^ x1 ^ k0
        y2 = ((p0 >> 32) & _MASK32) ^ x3 ^ k1
        x1 = p1 & _MASK32
        x3 = p0 & _MASK32
        x0, x2 = y0, y2
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return x0, x1, x2, x3


def _torch_normals(per_sample: int, dtype, device, seeds, index, counter, stream: int) -> torch.Tensor:
    per_call = 4 if dtype == torch.float32 else 2
    item_size = per_call * _ITEM_CALLS
    e = torch.arange(per_sample, device=device, dtype=torch.int64)
    item = e // item_size
    within = e % item_size
    length = torch.clamp(per_sample - item * item_size, max=item_size)
    calls_in_item = (length + per_call - 1) // per_call
    quarter = within // calls_in_item
    call = item * _ITEM_CALLS + within % calls_in_item
    col = lambda v: v.to(device=device, dtype=torch.int64).reshape(-1, 1)  # noqa: E731
    seeds = col(seeds)
    # an int counter (one for the whole batch) stays a Python scalar: no host-to-device copy per step
    counter = counter & _MASK32 if isinstance(counter, int) else col(counter) & _MASK32
    o0, o1, o2, o3 = philox_torch(call.reshape(1, -1), seeds & _MASK32, (seeds >> 32) & _MASK32,
                                  col(index) & _MASK32, counter, stream & _MASK32)
    if dtype == torch.float32:
        f = lambda w: (w >> 8).to(torch.float32)  # noqa: E731
        u1, u2, u3, u4 = (f(o0) + 1.0) * 2.0**-24, f(o1) * 2.0**-24, (f(o2) + 1.0) * 2.0**-24, f(o3) * 2.0**-24
        r1, r2 = torch.sqrt(-2.0 * torch.log(u1)), torch.sqrt(-2.0 * torch.log(u3))
        two_pi = 2.0 * math.pi
        choices = torch.stack([r1 * torch.cos(two_pi * u2), r1 * torch.cos(two_pi * (u2 - 0.25)),
                               r2 * torch.cos(two_pi * u4), r2 * torch.cos(two_pi * (u4 - 0.25))])
    else:
        d = lambda w: w.to(torch.float64)  # noqa: E731
        u1 = (d(o0 >> 5) * 67108864.0 + d(o1 >> 6) + 1.0) * 2.0**-53
        u2 = (d(o2 >> 5) * 67108864.0 + d(o3 >> 6)) * 2.0**-53
        r = torch.sqrt(-2.0 * torch.log(u1))
        two_pi = 2.0 * math.pi
        choices = torch.stack([r * torch.cos(two_pi * u2), r * torch.cos(two_pi * (u2 - 0.25))])
    return torch.gather(choices, 0, quarter.reshape(1, 1, -1).expand(1, seeds.shape[0], -1))[0]


# ---------------------------------------------------------------------------------------------


def as_integer(value) -> int | None:
    """``value`` as a Python int if it is an integer (int, a numpy integer or 0-d integer array, a 0-d
    integer tensor), else None: bools and floats, even 4.0, are not integers here (they are refused, not
    truncated)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool):
        return None  # torch would read tensor([3]) and tensor(True) as indices too
    try:
        return operator.index(value)
    except TypeError:
        return None


def per_sample_integers(value, name: str, batch: int, low: int, high: int, *, broadcast: bool) -> list[int]:
    """One integer in [low, high) per sample from an int (repeated for the batch when ``broadcast``,
    else a batch of one), a sequence, a 1-D numpy array or a 1-D tensor of integers; a 0-d array or
    tensor is an int.  The message names ``name``."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name}: expected integers, got values of dtype {value.dtype}")
        value = value.detach().cpu()
    elif getattr(getattr(value, "dtype", None), "kind", "i") not in "iu":  # a numpy array or scalar
        raise TypeError(f"{name}: expected integers, got values of dtype {value.dtype}")
    ndim = getattr(value, "ndim", None)
    if ndim == 0 or as_integer(value) is not None:
        values = [value.item() if ndim == 0 else value] * (batch if broadcast else 1)
    elif ndim is not None and ndim != 1:
        raise ValueError(f"{name}: expected an int or a 1-D sequence of {batch} ints, got shape {tuple(value.shape)}")
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name}: expected integers (an int or one per sample, {batch}), got {type(value).__name__}")
    else:
        values = value.tolist() if hasattr(value, "tolist") else list(value)
    if len(values) != batch:
        raise ValueError(_count_message(name, batch, len(values), broadcast))
    out = []
    for v in values:
        integer = as_integer(v)
        if integer is None:
            raise TypeError(f"{name}: expected integers, got {v!r} ({type(v).__name__})")
        if not low <= integer < high:
            raise ValueError(f"{name}: expected integers in [{low}, 2^{high.bit_length() - 1}), got {integer}")
        out.append(integer)
    return out


def _count_message(name: str, batch: int, got: int, broadcast: bool) -> str:
    if broadcast:
        return f"{name}: expected an int or one seed per sample ({batch}), got {got} seeds"
    return f"{name}: expected {batch} indices, got {got}"


def _as_uint64_seeds(seed, batch: int) -> torch.Tensor:
    values = per_sample_integers(seed, "seed", batch, 0, 2**64, broadcast=True)
    # the same 64 bits, stored as int64
    return torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)


def _noise_kernel_ready() -> bool:
    """Whether CUDA noise is drawn by the fused kernels' noise-only kernel (CuPy sees a GPU and
    ``cuda/noise.cu`` compiles; settled once per process) rather than the torch port, whose ~150
    tensor ops a draw cost ~2 ms of launches on a GPU whatever the batch.  Both give the generator's
    numbers: they agree with the CPU's to 1e-6 (the last bits of log/cos)."""
    from solvers.kernels import noise_kernel_reason

    return noise_kernel_reason() is None


class NoiseSource:
    """Standard normal draws keyed by (seed, sample index, counter, stream) for a batch.

    Parameters
    ----------
    seed:
        an int (one seed for the batch) or one int per sample.
    batch_size:
        number of samples B.
    sample_index:
        the global index of each sample (default 0 ... B-1).  Sharded runs pass the global
        indices of their shard and get the numbers a single run would.
    mode:
        how a fixed-grid run takes its step noise (:data:`NOISE_MODES`): ``"step"`` (default) a keyed
        draw per step, ``"path"`` the increments of one keyed Brownian path per sample in the solver's
        clock (:class:`samplers.brownian.BrownianPath`); docs/noise.md.
    """

    def __init__(self, seed, batch_size: int, *, sample_index=None, mode: str = "step"):
        if mode not in NOISE_MODES:
            raise ValueError(f"noise: expected one of {NOISE_MODES} (per-step draws or one Brownian path per sample), "
                             f"got {mode!r}")
        self.mode = mode
        batch_size = check_count("batch_size", batch_size)
        self.batch_size = batch_size
        self.seeds = _as_uint64_seeds(seed, batch_size)
        if sample_index is None:
            index = torch.arange(batch_size, dtype=torch.int64)
        elif isinstance(sample_index, torch.Tensor) and sample_index.dim() == 1 and not (
                sample_index.is_floating_point() or sample_index.is_complex() or sample_index.dtype == torch.bool):
            # a tensor of indices (sharded runs: possibly long) is checked without a Python list
            index = sample_index.detach().to("cpu", torch.int64)
            if index.numel() != batch_size:
                raise ValueError(_count_message("sample_index", batch_size, index.numel(), False))
            outside = (index < 0) | (index > _MASK32)
            if bool(outside.any()):
                raise ValueError(f"sample_index: expected integers in [0, 2^32), got {int(index[outside][0])}")
        else:
            index = torch.tensor(per_sample_integers(sample_index, "sample_index", batch_size, 0, 2**32,
                                                     broadcast=False), dtype=torch.int64)
        self.sample_index = index
        self._index32 = index.to(torch.int32)  # the uint32 bits the C code reads
        self._counter_cache: dict[int, torch.Tensor] = {}
        self._device_keys: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def subset(self, index) -> NoiseSource:
        """The source of rows ``index`` (int64; repeats allowed): row j draws what row index[j] of
        this source draws, so a solver that works on part of the batch sees the same numbers."""
        index = torch.as_tensor(index, dtype=torch.int64).flatten().cpu()
        if index.numel() == 0 or bool(((index < 0) | (index >= self.batch_size)).any()):
            raise ValueError(f"index: expected a non-empty set of rows in [0, {self.batch_size}), got {index.tolist()}")
        out = NoiseSource.__new__(NoiseSource)
        out.batch_size = int(index.numel())
        out.mode = self.mode
        out.seeds = self.seeds[index]
        out.sample_index = self.sample_index[index]
        out._index32 = self._index32[index]
        out._counter_cache = {}
        out._device_keys = {}
        return out

    def keys_on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seeds int64, sample indices int64, their uint32 bits as int32) on ``device``, copied there
        once: a run calls this before its loop so that drawing a step's noise on a GPU makes no
        host-to-device copy (each copy from pageable memory waits for the host).  On a CUDA device
        it also settles, once per process, whether the noise kernel draws the numbers."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        keys = self._device_keys.get(device)
        if keys is None:
            keys = self._device_keys[device] = (self.seeds.to(device), self.sample_index.to(device),
                                                self._index32.to(device))
            if device.type == "cuda":
                _noise_kernel_ready()
        return keys

    def _counter(self, counter) -> torch.Tensor:
        if isinstance(counter, int):
            if not 0 <= counter <= _MASK32:
                raise ValueError(f"counter must lie in [0, 2^32), got {counter}")
            cached = self._counter_cache.get(counter)
            if cached is None:
                cached = torch.full((self.batch_size,), counter, dtype=torch.int64).to(torch.int32)
                if len(self._counter_cache) < 4096:
                    self._counter_cache[counter] = cached
            return cached
        c = torch.as_tensor(counter, dtype=torch.int64).flatten().cpu()
        if c.numel() != self.batch_size:
            raise ValueError(f"counter: expected an int or {self.batch_size} values, got {c.numel()}")
        return c.to(torch.int32)

    def normal(self, shape, *, counter=0, stream: int = STREAM_STEP, dtype=torch.float32, device="cpu",
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Standard normals of shape (B, *shape) (``shape`` excludes the batch dimension).

        float32 and float64 are generated natively; other floating dtypes are drawn in
        float32 and cast.
        """
        full = (self.batch_size, *tuple(shape))
        if out is not None:
            if tuple(out.shape) != full:
                raise ValueError(f"out: expected shape {full}, got {tuple(out.shape)}")
            dtype, device = out.dtype, out.device
        if as_integer(stream) is None or not 0 <= stream <= _MASK32:  # a 32-bit counter word in every generator
            raise ValueError(f"stream must be an int in [0, 2^32), got {stream!r}")
        gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        counter32 = self._counter(counter)
        device = torch.device(device)
        direct = out is not None and out.dtype == gen_dtype and out.is_contiguous() and out.device.type == "cpu"
        if device.type == "cpu" and _native() is not None:
            target = out if out is not None and direct else torch.empty(full, dtype=gen_dtype)
            if target.numel():
                _native_fill(target, self.seeds, self._index32, counter32, int(stream))
        elif (device.type == "cuda" and isinstance(counter, int) and gen_dtype == torch.float32
              and _noise_kernel_ready()):
            seeds, _, index32 = self.keys_on(device)
            kernel_dtypes = (torch.float32, torch.float16, torch.bfloat16)
            writes_out = out is not None and out.is_contiguous() and out.dtype in kernel_dtypes
            target = out if out is not None and writes_out else torch.empty(full, dtype=torch.float32, device=device)
            if target.numel():
                from solvers.kernels import fill_keyed_normal

                fill_keyed_normal(target, seeds, index32, counter, int(stream))
        else:
            per_sample = math.prod(shape)
            seeds, index, _ = self.keys_on(device)
            step_counter = counter if isinstance(counter, int) else counter32.to(torch.int64) & _MASK32
            target = _torch_normals(per_sample, gen_dtype, device, seeds, index, step_counter,
                                    int(stream)).reshape(full)
        if out is None:
            return target.to(dtype)
        if target is not out:
            out.copy_(target)
        return out
