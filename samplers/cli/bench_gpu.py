"""``python -m samplers bench gpu --out DIR``: every check of the CUDA path, in one run on one GPU.

Made for a bare CUDA machine and a source checkout (``PYTHONPATH=.``, no install step): torch and
CuPy are needed, diffusers is optional (the end-to-end section then times our sampler alone on a
U-Net-shaped network of its own).  Each section runs in turn, writes its results into
``DIR/gpu.json`` as soon as it ends (a run cut short keeps what it measured) and its lines into
``DIR/gpu.log``; an exception ends that section only, with its traceback in the log.

Sections:

- ``environment``: torch, CUDA, CuPy, NVRTC and driver versions, the device.
- ``gpu_tests``: ``pytest -m gpu`` on the test files holding GPU-marked tests (in a subprocess;
  ``DIR/gpu_tests.log``).
- ``noise``: the CUDA keyed noise (the noise-only kernel, and the torch port on the GPU) against
  the CPU generator of :class:`samplers.NoiseSource`.
- ``kernel_agreement``: each solver's fused step against its torch step in float64, fed the same
  noise, for every (state, network output) storage pair: the largest relative difference per
  solver and per kernel.
- ``fallback``: ``backend="auto"`` with a solver without a kernel, a kernel source that does not
  compile and a kernel missing from its module: torch runs, with the reason.
- ``host_syncs``: host synchronisations inside a fixed-grid run's loop (``sample`` at N and 2N
  steps under ``torch.cuda.set_sync_debug_mode("warn")``: a sync inside the loop shows up as a
  count that grows with N; where it does, the first one's traceback).
- ``bandwidth``: :func:`samplers.cli.bench_kernels.bench_kernels` (GPU time per step, bytes/s against
  a device-to-device copy, speed-up over the torch step).
- ``cuda_graph``: whether a fixed-grid loop (network included) can be captured in a CUDA graph
  and replayed with the same result, and the host's cost per step (launch overhead) eagerly and
  replayed.
- ``end_to_end``: a diffusers U-Net (64x64x3, batch 64, random weights), 20 steps of
  DPM-Solver++(2M) and ER-SDE(3): wall time per step for our torch backend, our fused backend and
  diffusers' scheduler loop on the same network, and the sampler's share of a step (the same loop
  timed with the network replaced by its cached output, over the loop with the network).
- ``nccl``: :func:`samplers.distributed.sample_distributed` in an NCCL process group of world size 1
  against a plain :func:`samplers.sample` (in a subprocess).  With one rank no collective runs (the
  gather is skipped), so this checks the NCCL set-up, the device choice and the chunking, not
  NCCL's all_gather; that needs two GPUs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import torch

from .registry import KERNEL_BENCH_SOLVERS, kernel_agreement_solvers, sync_solvers

__all__ = ["SECTIONS", "run_gpu_checks", "no_gpu_reason", "count_syncs", "kernel_agreement"]

SECTIONS = ("environment", "gpu_tests", "noise", "kernel_agreement", "fallback", "host_syncs", "bandwidth",
            "cuda_graph", "end_to_end", "nccl")
#: the bandwidth shapes of the issue, and one whose buffers are far larger than the H200's 60 MB L2
BANDWIDTH_SHAPES = ((256, 3, 64, 64), (64, 4, 128, 128), (256, 4, 128, 128))
#: the copy-bandwidth fraction each fused kernel should reach
BANDWIDTH_TARGET = 0.85
_REPO = Path(__file__).resolve().parents[2]  # the checkout: samplers/cli/ -> samplers/ -> root


def no_gpu_reason() -> str | None:
    """None when torch sees a CUDA device, else why not."""
    if not torch.cuda.is_available():
        return f"no GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return None


class _Report:
    """The JSON report and the log of a run, both written as the run goes."""

    def __init__(self, out_dir: Path, echo=print):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = out_dir / "gpu.json", out_dir / "gpu.log"
        self.data: dict = {"sections": {}}
        self._log = open(self.log_path, "w")
        self.echo = echo

    def log(self, line: str = "") -> None:
        self._log.write(line + "\n")
        self._log.flush()
        self.echo(line)

    def save(self) -> None:
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.json_path)

    def close(self) -> None:
        self.save()
        self._log.close()


def run_gpu_checks(out_dir, *, sections=SECTIONS, budget_s: float = 330.0, echo=print) -> int:
    """Run ``sections`` (in the order of :data:`SECTIONS`) and write ``out_dir/gpu.json`` and
    ``out_dir/gpu.log``.  A section not started within ``budget_s`` seconds of the start is skipped
    (so one device call holds the run).  Returns 0 when every section ran without an exception,
    1 when one failed, 2 when there is no GPU (the report then says why)."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections must be among {SECTIONS}, got {unknown}")
    report = _Report(Path(out_dir), echo)
    start = time.perf_counter()
    try:
        report.data["environment"] = _environment()
        reason = no_gpu_reason()
        report.data["gpu"] = reason is None
        if reason is not None:
            report.data["no_gpu_reason"] = reason
            report.log(reason)
            return 2
        report.log(f"{report.data['environment']['device']}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
                   f"CuPy {report.data['environment'].get('cupy')}")
        failed = False
        for name in SECTIONS:
            if name not in sections or name == "environment":
                continue
            elapsed = time.perf_counter() - start
            if elapsed > budget_s:
                report.data["sections"][name] = {"status": "skipped", "reason": f"budget of {budget_s:g} s spent"}
                report.log(f"== {name}: skipped (budget of {budget_s:g} s spent)")
                continue
            report.log(f"== {name}")
            t0 = time.perf_counter()
            try:
                result = _SECTION_FUNCTIONS[name](report)
                status = "ok"
            except Exception as exc:  # a section's failure is its result: recorded, and the run goes on
                failed = True
                result, status = {"error": f"{type(exc).__name__}: {exc}"}, "error"
                report.log(traceback.format_exc())
            torch.cuda.synchronize()
            result = {"status": status, "seconds": round(time.perf_counter() - t0, 2), **result}
            report.data["sections"][name] = result
            report.log(f"-- {name}: {status} in {result['seconds']} s")
            report.save()
        report.data["seconds"] = round(time.perf_counter() - start, 1)
        return 1 if failed else 0
    finally:
        report.close()


# ---------------------------------------------------------------------------------------------
# sections


def _environment(*_):
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": None, "capability": None, "cupy": None, "cupy_cuda_runtime": None, "nvrtc": None,
           "diffusers": None}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    with contextlib.suppress(Exception):  # CuPy is optional: its absence is what the report says
        import cupy

        env["cupy"] = cupy.__version__
        env["cupy_cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        env["driver"] = cupy.cuda.runtime.driverGetVersion()
        env["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    with contextlib.suppress(Exception):
        import diffusers

        env["diffusers"] = diffusers.__version__
    from solvers import kernels

    env["cupy_unavailable_reason"] = kernels.cupy_unavailable_reason()
    return env


def _gpu_tests(report):
    tests = _REPO / "tests"
    # the files holding gpu-marked tests (collecting all of tests/ would need every peer installed)
    files = sorted(f for f in tests.glob("test_*.py") if "mark.gpu" in f.read_text())
    if not files:
        return {"status_detail": "skipped: no tests/ directory beside the package (not a source checkout)"}
    log_path = report.out_dir / "gpu_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *map(str, files)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=200)
    except subprocess.TimeoutExpired as exc:
        log_path.write_text((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        raise RuntimeError("pytest -m gpu ran past 200 s") from None
    log_path.write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    report.log(summary)
    for line in failures:
        report.log(line)
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: {summary}")
    return {"summary": summary, "failures": failures}


def _noise(report):
    from solvers import kernels

    from .. import noise as noise_module
    from ..noise import STREAM_STEP, NoiseSource, native_available

    rows = []
    source = NoiseSource([11, 2**63 + 5, 7], 3, sample_index=[0, 17, 2**31 + 5])
    for per_sample in (7, 3 * 64 * 64, 4 * 4096 + 5):
        cpu = source.normal((per_sample,), counter=5, stream=STREAM_STEP)  # the CPU generator
        drawn = source.normal((per_sample,), counter=5, stream=STREAM_STEP, device="cuda")  # NoiseSource on the GPU
        rows.append({"per_sample": per_sample, "generator": "NoiseSource on the GPU", "dtype": "float32",
                     "max_abs_diff": float((drawn.cpu() - cpu).abs().max())})
        with _torch_port_noise(noise_module):
            port = NoiseSource([11, 2**63 + 5, 7], 3, sample_index=[0, 17, 2**31 + 5]).normal(
                (per_sample,), counter=5, stream=STREAM_STEP, device="cuda")
        rows.append({"per_sample": per_sample, "generator": "torch port on the GPU", "dtype": "float32",
                     "max_abs_diff": float((port.cpu() - cpu).abs().max())})
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = kernels.keyed_normal(source, (per_sample,), counter=5, stream=STREAM_STEP, dtype=dtype)
            diff = float((got.cpu().float() - cpu.to(dtype).float()).abs().max())
            rows.append({"per_sample": per_sample, "generator": "noise kernel", "dtype": str(dtype).split(".")[1],
                         "max_abs_diff": diff})
    for r in rows:
        report.log(f"{r['generator']:<23} {r['dtype']:<9} per sample {r['per_sample']:>6}: max |GPU - CPU| "
                   f"{r['max_abs_diff']:.2e}")
    f32 = max(r["max_abs_diff"] for r in rows if r["dtype"] == "float32")
    report.log(f"float32 target |GPU - CPU| <= 1e-6: {'met' if f32 <= 1e-6 else 'NOT met'} ({f32:.2e})")
    return {"cpu_native_generator": native_available(), "rows": rows, "float32_max_abs_diff": f32,
            "float32_target_met": f32 <= 1e-6}


@contextlib.contextmanager
def _torch_port_noise(noise_module):
    """NoiseSource draws CUDA noise with its torch port, as it does where CuPy is missing."""
    ready = noise_module._noise_kernel_ready
    noise_module._noise_kernel_ready = lambda: False
    try:
        yield
    finally:
        noise_module._noise_kernel_ready = ready


def kernel_agreement(solver, state_dtype, out_dtype, *, shape=(4, 3, 32, 32), steps=12, check_steps=4,
                     device="cuda") -> tuple[float, list[str]]:
    """(largest |fused - torch| / max |torch| after ``check_steps`` steps, the kernels launched): the
    fused step on ``state_dtype`` storage with a network output stored in ``out_dtype``, against the
    solver's torch step in float64 from the same stored values, fed the fused kernels' own noise."""
    from sde import VPSDE
    from solvers import kernels

    from ..grid import grid as make_grid
    from ..model import Model
    from ..noise import NoiseSource, step_stream
    from ..sample import fixed_grid_context

    gen = torch.Generator(device=device).manual_seed(0)
    x_start = torch.randn(shape, device=device, generator=gen).to(state_dtype)
    out = (0.5 * torch.randn(shape, device=device, generator=gen)).to(out_dtype)
    noise = NoiseSource(list(range(1, shape[0] + 1)), shape[0])
    times = make_grid(VPSDE(), steps)[:, None]
    model_f = Model(lambda x, t: out, VPSDE(), predicts="eps")
    model_r = Model(lambda x, t: out.double(), VPSDE(), predicts="eps")

    # the fused run packs float32 tables, as a float32 run does, whatever its storage
    x_f = x_start.clone()
    ctx_f = fixed_grid_context(model_f, solver, x_f, times, {}, noise, out_dtype)
    ctx_f.tables = fixed_grid_context(model_f, solver, x_f.float(), times, {}, noise, out_dtype).tables
    fused = solver.fused_step()
    runner = kernels.make_runner(x_f, noise)
    fused.bind(ctx_f, x_f, runner)
    launched, launch = [], runner.launch
    runner.launch = lambda source, kernel, *a, **kw: (launched.append(kernel), launch(source, kernel, *a, **kw))[1]

    x_r = x_start.double()
    ctx_r = fixed_grid_context(model_r, solver, x_r, times, {}, noise, torch.float64)
    ctx_r.noise = lambda step, draw=0: kernels.keyed_normal(noise, shape[1:], counter=step, stream=step_stream(draw),
                                                             dtype=torch.float32, device=device).double()
    for k in range(check_steps):
        x_f = fused.step(k, x_f, ctx_f)
        x_r = solver.step(k, x_r, ctx_r)
    diff = float((x_f.double() - x_r).abs().max() / x_r.abs().max())
    return diff, sorted(set(launched))


def _kernel_agreement(report):
    from solvers import kernels

    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    rows, per_kernel = [], {}
    for solver in kernel_agreement_solvers():
        for pair in kernels.STORAGE_PAIRS:
            state, out = (dtypes[s] for s in pair.split("_"))
            diff, launched = kernel_agreement(solver, state, out)
            rows.append({"solver": repr(solver), "storage": pair, "max_rel_diff": diff, "kernels": launched})
            for kernel in launched:
                key = f"{kernel}_{pair}"
                per_kernel[key] = max(per_kernel.get(key, 0.0), diff)
        report.log(f"{solver!r:<60} " + "  ".join(f"{r['storage']} {r['max_rel_diff']:.1e}"
                                                 for r in rows if r["solver"] == repr(solver)))
    # what float arithmetic allows after a few steps: a few roundings of the stored state
    bounds = {"f32": 64 * 2.0**-23, "f16": 16 * 2.0**-10, "bf16": 16 * 2.0**-7}
    worst = {}
    for key, diff in per_kernel.items():
        state = key.rsplit("_", 2)[-2]
        worst[state] = max(worst.get(state, 0.0), diff)
    within = all(diff <= bounds[key.rsplit("_", 2)[-2]] for key, diff in per_kernel.items())
    report.log("largest per state storage: " + ", ".join(f"{k} {v:.1e} (bound {bounds[k]:.1e})" for k, v in worst.items()))
    if not within:
        raise RuntimeError(f"a fused kernel differs from the float64 torch step beyond the rounding bound: {worst}")
    return {"rows": rows, "per_kernel": per_kernel, "bounds": bounds, "worst_by_state": worst}


def _fallback(report):
    from sde import VPSDE
    from solvers import EulerMaruyama, UniPC, kernels

    from ..model import Model
    from ..sample import sample

    model = Model(lambda x, t: 0.1 * x, VPSDE(), predicts="eps")
    kwargs = dict(shape=(2, 3, 8, 8), steps=4, device="cuda", return_info=True)
    results = {}
    _, info = sample(model, UniPC(), **kwargs)
    results["solver_without_kernel"] = {"backend": info.backend, "reason": info.backend_reason}

    real_source, real_names = kernels.kernel_source, kernels.kernel_names
    saved = dict(kernels._modules)
    try:
        kernels._modules.clear()
        kernels.kernel_source = lambda name: real_source(name) + ("\n#error deliberately broken for the check\n"
                                                                  if name == "euler.cu" else "")
        _, info = sample(model, EulerMaruyama(), **kwargs)
        results["kernel_does_not_compile"] = {"backend": info.backend, "reason": info.backend_reason[:300]}
        kernels.kernel_source = real_source
        kernels._modules.clear()
        kernels.kernel_names = lambda name: real_names(name) + (["euler_step_not_there_f32_f32"]
                                                                if name == "euler.cu" else [])
        _, info = sample(model, EulerMaruyama(), **kwargs)
        results["kernel_missing"] = {"backend": info.backend, "reason": info.backend_reason[:300]}
        try:
            sample(model, EulerMaruyama(), backend="cupy", **kwargs)
            results["cupy_refuses"] = "no error raised"
        except kernels.KernelUnsupported as exc:
            results["cupy_refuses"] = str(exc)[:300]
    finally:
        kernels.kernel_source, kernels.kernel_names = real_source, real_names
        kernels._modules.clear()
        kernels._modules.update(saved)
    _, info = sample(model, EulerMaruyama(), **kwargs)
    results["restored"] = {"backend": info.backend, "reason": info.backend_reason}
    for key, value in results.items():
        report.log(f"{key}: {value}")
    ok = (all(results[k]["backend"] == "torch" for k in ("solver_without_kernel", "kernel_does_not_compile",
                                                          "kernel_missing"))
          and results["restored"]["backend"] == "cupy" and results["cupy_refuses"] != "no error raised")
    if not ok:
        raise RuntimeError(f"the fallback did not behave as documented: {results}")
    return results


class _ConvNet(torch.nn.Module):
    """A small U-Net-shaped stand-in: convolutions, GroupNorm, SiLU and a time embedding."""

    def __init__(self, channels: int = 3, width: int = 32):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.time = torch.nn.Linear(16, width)
        self.norm = torch.nn.GroupNorm(8, width)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t):
        freqs = torch.exp(torch.linspace(0, -math.log(1000.0), 8, device=x.device))
        angles = t.float()[:, None] * 1000.0 * freqs[None]
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype))
        h = self.inp(x) + emb[:, :, None, None]
        h = self.mid(torch.nn.functional.silu(self.norm(h)))
        return self.out(torch.nn.functional.silu(h))


def _has_kernel(solver) -> bool:
    from solvers import kernels

    declare = getattr(solver, "fused_step", None)
    if declare is None:
        return False
    try:
        declare()
    except kernels.KernelUnsupported:
        return False
    return True


def count_syncs(fn) -> int:
    """How many synchronising CUDA calls ``fn()`` makes (torch's sync debug mode, as warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _first_loop_sync(solver, run) -> str:
    """The traceback of the first sync inside a step (steps run with sync debug mode "error")."""
    real_step = solver.step
    real_fused = getattr(solver, "fused_step", None)

    def guarded(step):
        def call(*a, **kw):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return step(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call

    solver.step = guarded(real_step)
    if real_fused is not None:
        def fused_step():
            fused = real_fused()
            fused.step = guarded(fused.step)
            return fused
        solver.fused_step = fused_step
    try:
        run()
        return ""
    except RuntimeError:
        return traceback.format_exc(limit=-6)
    finally:
        del solver.step
        if real_fused is not None:
            del solver.fused_step


def _host_syncs(report):
    from sde import VPSDE

    from ..model import Model
    from ..sample import sample

    net = _ConvNet().cuda()
    model = Model(net, VPSDE(), predicts="eps")
    rows = []
    for solver in sync_solvers():
        for backend in ("torch", "cupy"):
            if backend == "cupy" and not _has_kernel(solver):
                continue

            def run(steps, solver=solver, backend=backend):
                with torch.no_grad():
                    sample(model, solver, shape=(4, 3, 16, 16), steps=steps, seed=0, device="cuda", backend=backend)
            run(6)  # warm: compilation, cuDNN's choices, caches
            count_syncs(lambda: run(6))  # the process's first counted run has one sync more (a one-time setup)
            counts = {n: count_syncs(lambda n=n: run(n)) for n in (6, 12)}
            in_loop = counts[12] - counts[6]
            row = {"solver": repr(solver), "backend": backend, "syncs_6_steps": counts[6], "syncs_12_steps": counts[12],
                   "syncs_per_step": in_loop / 6}
            if in_loop:
                row["first_in_step"] = _first_loop_sync(solver, lambda: run(6))
            rows.append(row)
            report.log(f"{row['solver']:<50} {backend:<6} syncs: {counts[6]} at 6 steps, {counts[12]} at 12 "
                       f"-> {row['syncs_per_step']:g} per step")
            if in_loop:
                report.log(textwrap.indent(row["first_in_step"], "    "))
    return {"rows": rows, "loops_without_syncs": sum(r["syncs_per_step"] == 0 for r in rows), "runs": len(rows)}


def _bandwidth(report):
    from solvers import Euler

    from .bench_kernels import bench_kernels

    result = bench_kernels(BANDWIDTH_SHAPES, solvers=[Euler()] + KERNEL_BENCH_SOLVERS(), log=report.log)
    for row in result["rows"]:
        row["target_met"] = row["copy_ratio"] >= BANDWIDTH_TARGET
    result["target"] = BANDWIDTH_TARGET
    # the floor of a noise kernel: drawing the normals alone (4 bytes written an element)
    result["noise_only"] = []
    for shape in BANDWIDTH_SHAPES:
        seconds = noise_kernel_time(shape)
        elements = math.prod(shape)
        row = {"shape": list(shape), "us": seconds * 1e6, "Gnormals_per_s": elements / seconds / 1e9,
               "write_GBs": 4 * elements / seconds / 1e9}
        result["noise_only"].append(row)
        report.log(f"{'x'.join(map(str, shape))} noise kernel alone: {row['us']:.1f} us, "
                   f"{row['Gnormals_per_s']:.0f} G normals/s ({row['write_GBs']:.0f} GB/s written)")
    return result


def noise_kernel_time(shape, rounds: int = 20) -> float:
    """GPU seconds of the noise-only kernel drawing one float32 normal per element of ``shape``."""
    from solvers import kernels

    from ..noise import NoiseSource
    from .bench_kernels import _gpu_time

    out = torch.empty(shape, device="cuda")
    runner = kernels.make_runner(out, NoiseSource(0, shape[0]))
    return _gpu_time(lambda: runner.draw_normal(out, 7, 0), rounds)


def _graph_case(model, solver, backend, shape, steps, rounds=5):
    """(eager host ms per step, replayed host ms per step, replay == eager, why not capturable)."""
    from solvers import kernels

    from ..grid import grid as make_grid
    from ..noise import NoiseSource
    from ..sample import fixed_grid_context

    noise = NoiseSource(0, shape[0])
    times = make_grid(model.sde, steps)[:, None]
    x_start = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x = x_start.clone()
    ctx = fixed_grid_context(model, solver, x, times, {}, noise, x.dtype)
    step = solver.step
    if backend == "cupy":
        fused = solver.fused_step()
        fused.bind(ctx, x, kernels.make_runner(x, noise))
        step = fused.step

    def loop():
        for k in range(steps):
            y = step(k, x, ctx)
            if y is not x:  # a step that returns a new tensor: the graph needs one state buffer
                x.copy_(y)

    with torch.no_grad():
        loop()  # warm
        torch.cuda.synchronize()
        best_eager = math.inf
        for _ in range(rounds):
            x.copy_(x_start)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loop()
            torch.cuda.synchronize()
            best_eager = min(best_eager, time.perf_counter() - t0)
        eager = x.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                x.copy_(x_start)
                loop()
            torch.cuda.current_stream().wait_stream(side)
            x.copy_(x_start)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                loop()
        except Exception as exc:  # what stops capture is the finding
            torch.cuda.synchronize()
            return best_eager / steps * 1e3, None, None, f"{type(exc).__name__}: {str(exc)[:300]}"
        best_replay = math.inf
        for _ in range(rounds):
            x.copy_(x_start)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            best_replay = min(best_replay, time.perf_counter() - t0)
        same = bool(torch.equal(x, eager))
    return best_eager / steps * 1e3, best_replay / steps * 1e3, same, None


def _cuda_graph(report):
    from sde import VPSDE
    from solvers import ERSDE, DPMSolver, DPMSolverSDE, EulerMaruyama

    from ..model import Model

    tiny = Model(lambda x, t: 0.5 * x, VPSDE(), predicts="eps")
    conv = Model(_ConvNet().cuda().eval(), VPSDE(), predicts="eps")
    rows = []
    for label, model, shape in (("x * 0.5 (launch overhead)", tiny, (1, 4)), ("conv net", conv, (16, 3, 32, 32))):
        for solver in (EulerMaruyama(), DPMSolver(2), DPMSolverSDE(2), ERSDE(3)):
            for backend in ("torch", "cupy"):
                eager, replay, same, why = _graph_case(model, solver, backend, shape, steps=20)
                row = {"network": label, "shape": list(shape), "solver": repr(solver), "backend": backend,
                       "eager_ms_per_step": eager, "replay_ms_per_step": replay, "replay_equals_eager": same,
                       "capture_error": why}
                rows.append(row)
                report.log(f"{label:<26} {row['solver']:<50} {backend:<6} eager {eager:.3f} ms/step, "
                           + (f"graph {replay:.3f} ms/step, same result: {same}" if why is None
                              else f"capture failed: {why}"))
    return {"rows": rows}


def _unet(dtype):
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:
        return None, f"diffusers is not importable ({exc})"
    unet = UNet2DModel(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    return unet.to("cuda", dtype).eval(), None


def _timed(fn, repeats=2) -> float:
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _end_to_end(report):
    from sde import DiscreteVPSDE
    from solvers import ERSDE, DPMSolver

    from ..model import Model
    from ..sample import sample

    batch, steps = 64, 20
    sde = DiscreteVPSDE(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        unet, why = _unet(dtype)
        if unet is None:
            report.log(f"{why}: the U-Net-shaped stand-in of this module is timed instead, without diffusers' loop")
            net, name = _ConvNet(width=128).to("cuda", dtype).eval(), "stand-in conv net (width 128)"
        else:
            net = lambda x, t, unet=unet: unet(x, t).sample
            name = f"diffusers UNet2DModel 64x64x3 ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params)"
        with torch.no_grad():
            cached = net(torch.randn(batch, 3, 64, 64, device="cuda", dtype=dtype), torch.full((batch,), 500.0,
                                                                                           device="cuda"))
        # the sampler alone: the same loop with the network replaced by its (cached) output
        networks = {"network": net, "cached output": lambda x, t: cached}
        net_s = _timed(lambda: [net(cached, torch.full((batch,), 500.0, device="cuda")) for _ in range(10)]) / 10
        report.log(f"{name}, {str(dtype).split('.')[1]}, batch {batch}: network {net_s * 1e3:.2f} ms a call")
        for label, solver in (("DPM-Solver++(2M)", DPMSolver(2)), ("ER-SDE(3)", ERSDE(3))):
            for backend in ("torch", "cupy"):
                walls, nfe = {}, None
                for key, call in networks.items():
                    model = Model(call, sde, predicts="eps", time_input="discrete")

                    def run(model=model, solver=solver, backend=backend):
                        with torch.no_grad():
                            return sample(model, solver, shape=(batch, 3, 64, 64), steps=steps, seed=0,
                                          device="cuda", dtype=dtype, backend=backend, return_info=True)[1].nfe
                    walls[key] = _timed(run)
                    nfe = run()
                rows.append(_e2e_row(name, dtype, label, f"ours, {backend}", walls, steps, nfe, net_s))
                report.log(_e2e_line(rows[-1]))
            if unet is not None:
                walls = {key: _diffusers_loop(call, label, batch, steps, dtype) for key, call in networks.items()}
                rows.append(_e2e_row(name, dtype, label, "diffusers scheduler loop", walls, steps, steps, net_s))
                report.log(_e2e_line(rows[-1]))
    return {"rows": rows}


def _e2e_row(network, dtype, solver, sampler, walls, steps, nfe, net_s):
    wall, alone = walls["network"], walls["cached output"]
    return {"network": network, "dtype": str(dtype).split(".")[1], "solver": solver, "sampler": sampler,
            "wall_s": wall, "ms_per_step": wall / steps * 1e3, "nfe": nfe, "network_ms": net_s * 1e3,
            "sampler_alone_ms_per_step": alone / steps * 1e3, "sampler_share_percent": 100.0 * alone / wall}


def _e2e_line(r):
    return (f"  {r['solver']:<17} {r['sampler']:<26} {r['ms_per_step']:8.2f} ms/step ({r['nfe']} calls); "
            f"without the network {r['sampler_alone_ms_per_step']:.3f} ms/step = {r['sampler_share_percent']:.1f}% "
            f"of a step")


def _diffusers_loop(net, label, batch, steps, dtype) -> float:
    """Seconds of diffusers' own loop (set_timesteps, then net + scheduler.step per timestep) on the
    same network: DPMSolverMultistepScheduler as DPM-Solver++(2M); for ER-SDE(3), which diffusers does
    not have, its nearest stochastic multistep scheduler, SDE-DPM-Solver++ of order 3."""
    from diffusers import DPMSolverMultistepScheduler

    algorithm, order = ("dpmsolver++", 2) if label.startswith("DPM") else ("sde-dpmsolver++", 3)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=order,
                                        algorithm_type=algorithm)

    def run():
        sched.set_timesteps(steps, device="cuda")
        x = torch.randn(batch, 3, 64, 64, device="cuda", dtype=dtype)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(net(x, t.expand(batch)), t, x).prev_sample
        return x

    return _timed(run)


_NCCL_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from sde import VPSDE
from solvers import DPMSolverSDE, DPMSolver
from samplers import Model, sample
from samplers.distributed import sample_distributed
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        device_id=torch.device("cuda", 0))
net = lambda x, t: 0.3 * x + 0.1 * t.reshape(-1, *([1] * (x.dim() - 1)))
model = Model(net, VPSDE(), predicts="eps")
rows = []
for solver in (DPMSolverSDE(2), DPMSolver(3)):
    ref, info = sample(model, solver, shape=(21, 3, 8, 8), steps=8, seed=5, device="cuda", return_info=True)
    for batch_size in (None, 5):
        got = sample_distributed(model, solver, 21, (3, 8, 8), seed=5, steps=8, device="cuda", batch_size=batch_size,
                                 gather=True)
        rows.append(dict(solver=repr(solver), batch_size=batch_size, backend=info.backend, device=str(got.device),
                         backend_name=dist.get_backend(), equal=bool(torch.equal(got.to(ref.device), ref))))
dist.destroy_process_group()
print("RESULT " + json.dumps(rows))
"""


def _nccl(report):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = _NCCL_SCRIPT.format(repo=str(_REPO), port=port)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"the NCCL run exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    rows = json.loads(found[0][len("RESULT "):])
    for r in rows:
        report.log(f"{r['solver']:<50} batch_size={r['batch_size']}: {r['backend_name']}, {r['device']}, "
                   f"backend {r['backend']}, equal to sample: {r['equal']}")
    if not all(r["equal"] for r in rows):
        raise RuntimeError("sample_distributed over NCCL differs from sample")
    return {"rows": rows}


_SECTION_FUNCTIONS = {"gpu_tests": _gpu_tests, "noise": _noise, "kernel_agreement": _kernel_agreement,
                      "fallback": _fallback, "host_syncs": _host_syncs, "bandwidth": _bandwidth,
                      "cuda_graph": _cuda_graph, "end_to_end": _end_to_end, "nccl": _nccl}
