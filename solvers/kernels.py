"""Fused CUDA step kernels (``cuda/*.cu``), compiled at run time with CuPy and launched on torch's stream.

A fused kernel does a solver's whole step in one pass over the batch, drawing the step's keyed
Gaussian noise inside the kernel with the same Philox generator as :class:`samplers.NoiseSource`,
so no noise tensor is read or written and the host never waits.  Each solver declares its kernel
with ``fused_step()`` (a :class:`FusedStep`, or :class:`KernelUnsupported` with the reason), and the
kernels read the solver's own ``prepare`` tables, so they compute what ``Solver.step`` computes
(in float32 arithmetic).  Backends, launch and measurements: docs/gpu.md.
"""

from __future__ import annotations

import re
import threading
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from sde.validation import check_choice, check_count

from .base import Solver

__all__ = ["BACKENDS", "KERNEL_FILES", "HEADER_FILES", "KernelUnsupported", "FusedStep", "LinearStep", "HeunStep",
           "MultistepStep", "multistep_kernel", "kernel_compile_reason", "CupyRunner", "cuda_source_dir",
           "kernel_source", "resolve_backend", "make_runner", "keyed_normal", "fill_keyed_normal",
           "noise_kernel_reason", "cupy_unavailable_reason", "storage_suffix", "kernel_names", "STORAGE_PAIRS"]

BACKENDS = ("auto", "torch", "cupy")
#: the kernel sources, each compiled as one module
KERNEL_FILES = ("euler.cu", "multistep.cu", "noise.cu")
HEADER_FILES = ("philox.cuh", "step_common.cuh")
#: threads per block; a thread runs one Philox call and updates 4 elements
BLOCK = 256
_ITEM_CALLS, _ITEM_SIZE = 1024, 4096  # must equal SAMPLERS_ITEM_CALLS in cuda/philox.cuh
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
#: (state, network output) storage of the step kernels: float32 states with any output, half states
#: with an output of their own type (cuda/step_common.cuh)
STORAGE_PAIRS = ("f32_f32", "f32_f16", "f32_bf16", "f16_f16", "bf16_bf16")


class KernelUnsupported(ValueError):
    """No fused kernel for this solver configuration, dtype or device; the message says why."""


# ---------------------------------------------------------------------------------------------
# sources


def cuda_source_dir() -> Path:
    """The directory holding the ``.cu``/``.cuh`` files: ``solvers/_cuda`` in an installed wheel,
    ``cuda/`` at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_cuda", here.parent / "cuda"):
        if all((candidate / name).is_file() for name in KERNEL_FILES + HEADER_FILES):
            return candidate
    raise FileNotFoundError(
        f"the CUDA kernel sources ({', '.join(KERNEL_FILES)}) are missing: looked in {here / '_cuda'} "
        f"and {here.parent / 'cuda'}; reinstall the package"
    )


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_source(name: str) -> str:
    """The text of kernel file ``name`` with its local ``#include "..."`` headers inlined (each once),
    so NVRTC needs no include path and CuPy's cache key covers the headers too."""
    check_choice("name", name, KERNEL_FILES)
    root = cuda_source_dir()
    seen: set[str] = set()

    def expand(file: str) -> str:
        if file in seen:
            return ""
        seen.add(file)
        text = (root / file).read_text()
        text = text.replace("#pragma once", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


def kernel_names(name: str) -> list[str]:
    """The kernels file ``name`` defines (step kernels: one per state and output storage type)."""
    if name == "noise.cu":
        return [f"normal_{s}" for s in _SUFFIX.values()]
    if name == "euler.cu":
        bases = [f"{stage}{noise}" for stage in ("euler_step", "heun_predict", "heun_correct")
                 for noise in ("", "_noise")]
    elif name == "multistep.cu":
        bases = [f"multistep_h{h}{noise}" for h in range(3) for noise in ("", "_noise")]
    else:
        raise ValueError(f"name must be one of {KERNEL_FILES}, got {name!r}")
    return [f"{base}_{pair}" for base in bases for pair in STORAGE_PAIRS]


def storage_suffix(dtype: torch.dtype) -> str:
    """The kernel name suffix of a storage dtype (f32, f16, bf16)."""
    try:
        return _SUFFIX[dtype]
    except KeyError:
        raise KernelUnsupported(f"the fused kernels store float32, float16 or bfloat16, not {dtype}") from None


# ---------------------------------------------------------------------------------------------
# the fused steps each solver declares


class FusedStep:
    """A solver step as fused kernel launches.  ``bind`` packs the coefficient tables once per run;
    ``step`` calls the network through the driver's context and launches the kernels."""

    #: the .cu file holding the kernels
    source = "euler.cu"
    #: every .cu file the step may launch from (compiled before ``auto`` commits to the kernels)
    sources: tuple[str, ...] = ("euler.cu",)

    def bind(self, ctx, x: torch.Tensor, runner) -> None:
        self.runner = runner
        runner.keep(x)  # updated in place: the same tensor every step

    def step(self, k: int, x: torch.Tensor, ctx) -> torch.Tensor:
        raise NotImplementedError

    # the coefficient table: (N, len(columns), B) float32, row k is the (ncoef, B) table of step k
    @staticmethod
    def _pack(ctx, x: torch.Tensor, columns) -> torch.Tensor:
        batch = x.shape[0]
        rows = []
        for col in columns:
            if isinstance(col, str):
                tab = ctx.tables[col]
                rows.append(tab.reshape(tab.shape[0], -1).to(torch.float32).expand(-1, batch))
            else:
                rows.append(None)
        n_steps = next(r.shape[0] for r in rows if r is not None)
        rows = [torch.full((n_steps, batch), float(c), dtype=torch.float32, device=x.device) if r is None else r
                for r, c in zip(rows, columns, strict=True)]
        return torch.stack(rows, dim=1).contiguous()

    def _output(self, x, k, ctx):
        out = ctx.output(x, k)
        if out.device != x.device:  # the kernels read it by address: it must live where the state does
            raise ValueError(f"the network returned a tensor on {out.device}; the fused kernels need it on the "
                             f"state's device {x.device}")
        out = out.detach()  # the kernels record no autograd graph
        if out.dtype not in _SUFFIX or (x.dtype != torch.float32 and out.dtype != x.dtype):
            out = out.to(x.dtype)  # a pair without a kernel (see STORAGE_PAIRS)
        return out if out.is_contiguous() else out.contiguous()

    def __repr__(self):
        return f"{type(self).__name__}(noise={self.noise})"


class LinearStep(FusedStep):
    """x <- a x + b out (+ c z): EulerMaruyama/Euler (tables x, out, noise) and the order-1 steps of
    the exponential multistep solvers."""

    def __init__(self, noise: bool):
        self.noise = bool(noise)

    def bind(self, ctx, x, runner):
        super().bind(ctx, x, runner)
        self.coef = runner.keep(self._pack(ctx, x, ["x", "out"] + (["noise"] if self.noise else [])))
        self.kernel = "euler_step_noise" if self.noise else "euler_step"

    def step(self, k, x, ctx):
        out = self._output(x, k, ctx)
        self.runner.launch(self.source, self.kernel, x, out, x, x, x, self.coef, k)
        return x


class HeunStep(FusedStep):
    """Heun's two stages, each one kernel; both draw the step's noise from the same key."""

    def __init__(self, noise: bool):
        self.noise = bool(noise)

    def bind(self, ctx, x, runner):
        super().bind(ctx, x, runner)
        extra = ["pred_noise"] if self.noise else []
        self.predict = runner.keep(self._pack(ctx, x, ["pred_x", "pred_out"] + extra))
        extra = ["next_noise"] if self.noise else []
        self.correct = runner.keep(self._pack(ctx, x, ["next_pred", "next_out"] + extra))
        self.pred = runner.keep(ctx.scratch("heun_pred"))
        self.suffix = "_noise" if self.noise else ""

    def step(self, k, x, ctx):
        out = self._output(x, k, ctx)
        self.runner.launch(self.source, "heun_predict" + self.suffix, x, out, self.pred, x, x, self.predict, k)
        out = self._output(self.pred, k + 1, ctx)
        self.runner.launch(self.source, "heun_correct" + self.suffix, x, out, self.pred, x, x, self.correct, k)
        return x


class MultistepStep(FusedStep):
    """The exponential multistep update of :func:`solvers.multistep.history_step` (DPMSolver,
    DPMSolverSDE, ERSDE), plus the step's noise when ``noise``: one kernel a step, writing this
    step's converted output into the ring buffer ``ring_name + str(k % order)``."""

    source = "multistep.cu"
    sources = ("multistep.cu", "euler.cu")  # order-1 runs launch the linear step

    def __init__(self, order: int, ring_name: str, noise: bool):
        self.order, self.ring_name, self.noise = int(order), ring_name, bool(noise)

    def bind(self, ctx, x, runner):
        super().bind(ctx, x, runner)
        noise = ["noise"] if self.noise else []
        if "history" not in ctx.plans:  # order 1 without hooks: history_tables folded m into x
            self.linear = LinearStep(self.noise)
            self.linear.bind(ctx, x, runner)
            return
        self.linear = None
        modes = set(ctx.plan("history"))
        if len(modes) != 1:
            raise KernelUnsupported(f"history modes change between steps ({sorted(modes)}); no fused kernel")
        mode = modes.pop()
        px, pout = {"scaled": (1.0, "conv_ratio"), "direct": (0.0, "conv_out"),
                    "general": ("conv_x", "conv_out")}[mode]
        weights = [f"m{j}" if f"m{j}" in ctx.tables else 0.0 for j in range(3)]
        self.coef = runner.keep(self._pack(ctx, x, [px, pout, "x", *weights, *(noise or [0.0])]))
        self.ring = [runner.keep(ctx.scratch(f"{self.ring_name}{j}")) for j in range(self.order)]

    def step(self, k, x, ctx):
        if self.linear is not None:
            return self.linear.step(k, x, ctx)
        out = self._output(x, k, ctx)
        hist = min(self.order, k + 1) - 1
        ring = [self.ring[(k - j) % self.order] for j in range(3)]
        kernel = f"multistep_h{hist}" + ("_noise" if self.noise else "")
        self.runner.launch(self.source, kernel, x, out, ring[0], ring[1] if hist >= 1 else x,
                           ring[2] if hist >= 2 else x, self.coef, k)
        return x

    def __repr__(self):
        return f"MultistepStep(order={self.order}, noise={self.noise})"


def multistep_kernel(hooks, order: int, ring_name: str, noise: bool) -> MultistepStep:
    """The fused step of an exponential multistep solver (DPMSolver, DPMSolverSDE, ERSDE), which has
    none while its x0 hooks are active: thresholding/correct_x0 act on the whole x0 estimate."""
    if hooks.active:
        raise KernelUnsupported("thresholding/correct_x0 act on the whole x0 estimate: no fused kernel")
    return MultistepStep(order, ring_name, noise=noise)


# ---------------------------------------------------------------------------------------------
# CuPy


def _import_cupy():
    import cupy

    return cupy


def cupy_unavailable_reason() -> str | None:
    """None if CuPy imports and sees a CUDA device; else why not."""
    try:
        cupy = _import_cupy()
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return f"CuPy is not importable ({type(exc).__name__}: {exc}); install the 'cupy' extra"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as exc:
        return f"CuPy cannot query CUDA devices ({type(exc).__name__}: {exc})"
    return None


_modules: dict[str, object] = {}
_modules_lock = threading.Lock()


def _module(cupy, source: str):
    """The compiled RawModule of one .cu file (compiled once per process)."""
    mod = _modules.get(source)
    if mod is None:
        with _modules_lock:
            mod = _modules.get(source)
            if mod is None:
                mod = cupy.RawModule(code=kernel_source(source), options=("--std=c++14",))
                _modules[source] = mod
    return mod


def kernel_compile_reason(sources) -> str | None:
    """None when every .cu file in ``sources`` compiles with CuPy (NVRTC) and defines every kernel a
    step may launch from it (:func:`kernel_names`), else why not: a missing NVRTC library, a compile
    error or a missing kernel then makes ``auto`` fall back to torch instead of failing at the first
    launch."""
    cupy = _import_cupy()
    for source in sources:
        try:
            module = _module(cupy, source)
            module.compile()
        except Exception as exc:  # NVRTC raises its own types (CompileException, RuntimeError, OSError)
            return f"the fused kernels of {source} did not compile ({type(exc).__name__}: {exc})"
        for name in kernel_names(source):
            try:
                module.get_function(name)
            except Exception as exc:  # CUDA's "named symbol not found", raised as CuPy's CUDADriverError
                return f"the kernel {name} is missing from the compiled {source} ({type(exc).__name__}: {exc})"
    return None


def _pointer(t: torch.Tensor) -> np.uint64:
    """A kernel argument for a tensor: its device address (8 bytes, as a ``T*`` parameter takes it).
    Kernels run on torch's current stream, so torch's caching allocator orders their use of the
    memory as it orders its own kernels'; no DLPack view is made per launch."""
    return np.uint64(t.data_ptr())


def _external_stream(cupy, torch_stream):
    """The CuPy stream object of a torch stream (made once per stream and runner)."""
    from_external = getattr(getattr(cupy.cuda, "Stream", None), "from_external", None)
    if from_external is not None:
        try:
            return from_external(torch_stream)  # CuPy >= 14: the CUDA stream protocol
        except (TypeError, AttributeError, ValueError):
            pass  # a torch without __cuda_stream__: the raw handle below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # CuPy 14 deprecates it in favour of the above
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream)


def _blocks(batch: int, per_sample: int) -> int:
    """Blocks of a launch over a (batch, per_sample) buffer: a thread a Philox call (cuda/philox.cuh)."""
    threads = batch * (-(-per_sample // _ITEM_SIZE)) * _ITEM_CALLS
    return -(-threads // BLOCK)


class _DeviceLauncher:
    """CuPy's objects for one CUDA device, made once per process: the device, the stream object of
    each torch stream, the loaded kernels.  A launch then costs a few microseconds of host time."""

    def __init__(self, cupy, index: int):
        self.cupy = cupy
        self.device = cupy.cuda.Device(index)
        self._streams: dict[int, AbstractContextManager] = {}  # cupy ExternalStreams
        self._functions: dict[str, object] = {}

    def function(self, source: str, name: str):
        fn = self._functions.get(name)
        if fn is None:
            with self.device:
                fn = self._functions[name] = _module(self.cupy, source).get_function(name)
        return fn

    def launch(self, fn, blocks: int, args, torch_device) -> None:
        """Run ``fn`` on torch's current stream of ``torch_device``."""
        torch_stream = torch.cuda.current_stream(torch_device)
        stream = self._streams.get(torch_stream.cuda_stream)
        if stream is None:
            stream = self._streams[torch_stream.cuda_stream] = _external_stream(self.cupy, torch_stream)
        with self.device, stream:
            fn((blocks,), (BLOCK,), args)


_launchers: dict[tuple[object, int], _DeviceLauncher] = {}


def _launcher(cupy, device: torch.device) -> _DeviceLauncher:
    key = (cupy, device.index)  # the module itself, not its id: tests swap CuPy for fakes
    launcher = _launchers.get(key)
    if launcher is None:
        launcher = _launchers[key] = _DeviceLauncher(cupy, device.index)
    return launcher


class CupyRunner:
    """Launches fused kernels for one run: the batch's noise key on the device, the run's
    persistent buffers, torch's current stream.  Tensors travel as device addresses."""

    def __init__(self, x: torch.Tensor, noise_source):
        self.cupy = cupy = _import_cupy()
        self.device = x.device
        self.batch = x.shape[0]
        self.per_sample = x[0].numel()
        self.suffix_x = storage_suffix(x.dtype)
        self.blocks = _blocks(self.batch, self.per_sample)
        self._kept: list[torch.Tensor] = []
        self._launcher = _launcher(cupy, self.device)
        self._sizes = (np.int64(self.per_sample), np.int64(self.batch))
        seeds, _, index32 = noise_source.keys_on(self.device)  # copied to the device once per run
        self.seeds, self.index = self.keep(seeds), self.keep(index32)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Register a tensor that lives for the whole run (the runner holds it, so its memory stays
        the kernels')."""
        if not t.is_contiguous():
            raise ValueError("fused kernels need contiguous buffers")
        if t.device != self.device:
            raise ValueError(f"fused kernels need buffers on the state's device {self.device}, got one on {t.device}")
        self._kept.append(t)
        return t

    def function(self, source: str, name: str):
        return self._launcher.function(source, name)

    def draw_normal(self, out: torch.Tensor, counter: int, stream: int) -> None:
        """Write the keyed standard normals of (counter, stream) into ``out`` (the noise-only kernel)."""
        fill_keyed_normal(out, self.seeds, self.index, counter, stream)

    def launch(self, source, kernel, x, out, aux0, aux1, aux2, coef, k, stream_tag=0):
        fn = self.function(source, f"{kernel}_{self.suffix_x}_{storage_suffix(out.dtype)}")
        row = coef[k]  # a view: its address is the row's
        args = (_pointer(x), _pointer(out), _pointer(aux0), _pointer(aux1), _pointer(aux2), _pointer(row),
                _pointer(self.seeds), _pointer(self.index), np.uint32(k), np.uint32(stream_tag), *self._sizes)
        self._launcher.launch(fn, self.blocks, args, self.device)


def fill_keyed_normal(out: torch.Tensor, seeds: torch.Tensor, index32: torch.Tensor, counter: int,
                      stream: int) -> torch.Tensor:
    """Write the keyed standard normals of (counter, stream) into ``out``, a contiguous (B, ...)
    float32/float16/bfloat16 CUDA tensor, with the noise-only kernel: ``seeds`` (B,) int64 and
    ``index32`` (B,) int32 already on out's device, so nothing is copied and the host never waits."""
    launcher = _launcher(_import_cupy(), out.device)
    fn = launcher.function("noise.cu", f"normal_{storage_suffix(out.dtype)}")
    per_sample = out[0].numel()
    launcher.launch(fn, _blocks(out.shape[0], per_sample),
                    (_pointer(out), _pointer(seeds), _pointer(index32), np.uint32(counter), np.uint32(stream),
                     np.int64(per_sample), np.int64(out.shape[0])), out.device)
    return out


_noise_kernel_reason: list[str | None] = []


def noise_kernel_reason() -> str | None:
    """None when the noise-only kernel can run in this process (CuPy sees a GPU and ``noise.cu``
    compiles), else why not; found out once per process.  :class:`samplers.NoiseSource` then draws
    its CUDA noise with the kernel instead of its torch port, which costs ~150 tensor ops a draw."""
    if not _noise_kernel_reason:
        reason = cupy_unavailable_reason()
        _noise_kernel_reason.append(reason if reason is not None else kernel_compile_reason(("noise.cu",)))
    return _noise_kernel_reason[0]


def make_runner(x: torch.Tensor, noise_source):
    """The kernel launcher of a run (tests replace it with a host emulation)."""
    return CupyRunner(x, noise_source)


def keyed_normal(noise_source, shape, *, counter: int = 0, stream: int = 0, dtype=torch.float32,
                 device="cuda") -> torch.Tensor:
    """The standard normals a fused step kernel with key (counter, stream) draws, written out by the
    noise-only kernel (``cuda/noise.cu``): shape (B, *shape) on a CUDA ``device``.  Feed them to the
    torch path to compare it with the fused kernels exactly."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    counter = check_count("counter", counter, minimum=0, maximum=2**32 - 1, why=" (a 32-bit counter word)")
    stream = check_count("stream", stream, minimum=0, maximum=2**32 - 1, why=" (a 32-bit counter word)")
    reason = cupy_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"keyed_normal needs CuPy: {reason}")
    out = torch.empty((noise_source.batch_size, *tuple(shape)), dtype=dtype, device=device)
    CupyRunner(out, noise_source).draw_normal(out, counter, stream)
    return out


# ---------------------------------------------------------------------------------------------
# backend choice


def _fused_step_of(solver) -> FusedStep:
    """The solver's kernel (:meth:`solvers.Solver.fused_step`: KernelUnsupported where it has none, an
    adaptive solver included)."""
    if not isinstance(solver, Solver):
        raise KernelUnsupported(f"{type(solver).__name__} has no fused kernel (only fixed-grid solvers have them)")
    return solver.fused_step()


def resolve_backend(backend: str, solver, device, dtype: torch.dtype) -> tuple[str, FusedStep | None, str]:
    """(backend used, the fused step or None, why) for ``sample(..., backend=...)``.

    ``"torch"``: the solver's torch step.  ``"cupy"``: the fused kernels, or a clear error when they
    cannot run (CPU tensors, float64, a solver configuration without a kernel, CuPy missing).
    ``"auto"``: the fused kernels where they can run (their sources compile), else torch, with the
    reason.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch", None, "backend='torch' was asked for"
    device = torch.device(device)
    try:
        if device.type != "cuda":
            raise KernelUnsupported(f"the state is on {device}; the fused kernels need a CUDA device")
        storage_suffix(dtype)
        fused = _fused_step_of(solver)
        reason = cupy_unavailable_reason()
        if reason is None:
            reason = kernel_compile_reason(fused.sources)
        if reason is not None:
            raise KernelUnsupported(reason)
    except KernelUnsupported as exc:
        if backend == "cupy":
            raise KernelUnsupported(f"backend='cupy' cannot run: {exc}") from None
        return "torch", None, f"auto chose torch: {exc}"
    return "cupy", fused, "fused CUDA kernels (CuPy)"
