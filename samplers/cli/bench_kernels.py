"""``python -m samplers bench kernels``: the fused CUDA step kernels against the torch path, on a GPU.

For each batch shape and solver: GPU time per step of the fused kernel(s) and of the solver's torch
step (network replaced by a fixed output tensor, so only the step's own work is timed), the fused
step's achieved memory bandwidth (bytes read + written per step / time) and its ratio to the
device's copy bandwidth (``dst.copy_(src)`` of 1 GiB, measured in the same run), the speed-up over
torch, and the largest difference between the two paths after a few steps when the torch path is
fed the kernels' own noise (``solvers.kernels.keyed_normal``): float32 rounding, or a bug.

Timing: CUDA events around a batch of steps queued behind a ``torch.cuda._sleep`` kernel, so the
host's launch cost is hidden and the events measure the GPU's work; a path that makes the host wait
for the device within a step (the torch port of the keyed noise copies its keys to the device) is
charged the idle time that causes, as it would be in a real run.
"""

from __future__ import annotations

import torch

from .registry import KERNEL_BENCH_SOLVERS

__all__ = ["bench_kernels", "copy_bandwidth", "print_kernel_bench"]

SHAPES = ((256, 3, 64, 64), (64, 4, 128, 128))

#: full-batch tensors each kernel reads + writes (state, network output, stage/ring buffers)
_PASSES = {"euler_step": 3, "heun_predict": 3, "heun_correct": 4, "multistep_h0": 4, "multistep_h1": 5,
           "multistep_h2": 6}


def _context(model, solver, x, noise, steps, kernel_noise=False):
    """The run's StepContext on ``steps`` steps of the default grid; with ``kernel_noise`` its noise is
    the fused kernels' own numbers (the noise-only kernel), to feed the torch path."""
    from solvers import kernels

    from ..grid import grid as make_grid
    from ..noise import step_stream
    from ..sample import fixed_grid_context

    ctx = fixed_grid_context(model, solver, x, make_grid(model.sde, steps)[:, None], {}, noise, x.dtype)
    if kernel_noise:
        ctx.noise = lambda step, draw=0: kernels.keyed_normal(noise, x.shape[1:], counter=step,
                                                              stream=step_stream(draw), dtype=x.dtype,
                                                              device=x.device)
    return ctx


def _gpu_time(fn, rounds: int) -> float:
    """Seconds of GPU time per call of fn (which queues work on the current stream)."""
    fn()  # warm-up: compilation, allocation
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work: the host queues everything behind it
    start.record()
    for _ in range(rounds):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / rounds


def copy_bandwidth(nbytes: int = 1 << 30, rounds: int = 20) -> float:
    """Bytes per second of ``dst.copy_(src)`` on the current device (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _gpu_time(lambda: dst.copy_(src), rounds)
    return 2 * nbytes / seconds


def bench_kernels(shapes=SHAPES, solvers=None, steps: int = 30, rounds: int = 3, check_steps: int = 4,
                  log=print, device="cuda") -> dict:
    """The measurements of ``bench kernels`` (see the module): a dict with the copy bandwidth and rows.
    ``device`` other than CUDA is for tests that replace the timers and the kernel launcher."""
    from sde import VPSDE
    from solvers import kernels

    from ..model import Model
    from ..noise import NoiseSource

    solvers = KERNEL_BENCH_SOLVERS() if solvers is None else solvers
    warm = max(solver.convergence_order for solver in solvers) + 2  # steps run before the timed ones (history filled)
    if steps <= warm:
        raise ValueError(f"steps must exceed {warm} (the untimed warm-up steps of these solvers), got {steps}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 1 <= check_steps <= steps:
        raise ValueError(f"check_steps must be in [1, steps={steps}], got {check_steps}")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("bench kernels needs a CUDA GPU: torch.cuda.is_available() is False")
        reason = kernels.cupy_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"bench kernels needs CuPy: {reason}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    copy_bw = copy_bandwidth()
    log(f"{name}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        batch = shape[0]
        x0 = torch.randn(shape, device=device, generator=gen)
        out = 0.5 * torch.randn(shape, device=device, generator=gen)
        noise = NoiseSource(0, batch)
        model = Model(lambda x, t: out, VPSDE(), predicts="eps")
        for solver in solvers:
            fused = solver.fused_step()
            timed = range(solver.convergence_order + 2, steps)  # steady-state steps (history filled)

            x_t = x0.clone()
            ctx_t = _context(model, solver, x_t, noise, steps)
            for k in range(solver.convergence_order + 2):
                solver.step(k, x_t, ctx_t)

            def torch_round():
                for k in timed:
                    solver.step(k, x_t, ctx_t)

            x_f = x0.clone()
            ctx_f = _context(model, solver, x_f, noise, steps)
            runner = kernels.make_runner(x_f, noise)
            fused.bind(ctx_f, x_f, runner)
            launched = []
            record = runner.launch

            def counting_launch(source, kernel, *args, **kw):
                launched.append(kernel.removesuffix("_noise"))
                return record(source, kernel, *args, **kw)

            runner.launch = counting_launch
            for k in range(solver.convergence_order + 2):
                fused.step(k, x_f, ctx_f)
            launched.clear()
            fused.step(timed[0], x_f, ctx_f)
            passes = sum(_PASSES[name] for name in launched)
            runner.launch = record

            def fused_round():
                for k in timed:
                    fused.step(k, x_f, ctx_f)

            t_torch = _gpu_time(torch_round, rounds) / len(timed)
            t_fused = _gpu_time(fused_round, rounds) / len(timed)
            nbytes = passes * x0.numel() * x0.element_size()

            # agreement: both paths from the same state, the torch path fed the kernels' noise
            x_a, x_b = x0.clone(), x0.clone()
            ctx_a = _context(model, solver, x_a, noise, steps, kernel_noise=True)
            ctx_b = _context(model, solver, x_b, noise, steps)
            fused_b = solver.fused_step()
            fused_b.bind(ctx_b, x_b, kernels.make_runner(x_b, noise))
            for k in range(check_steps):
                x_a = solver.step(k, x_a, ctx_a)
                x_b = fused_b.step(k, x_b, ctx_b)
            diff = float((x_a - x_b).abs().max() / x_a.abs().max())

            row = {"shape": list(shape), "solver": repr(solver), "torch_us": t_torch * 1e6,
                   "fused_us": t_fused * 1e6, "speedup": t_torch / t_fused, "bytes": nbytes,
                   "bandwidth_GBs": nbytes / t_fused / 1e9, "copy_ratio": nbytes / t_fused / copy_bw,
                   "max_rel_diff": diff}
            rows.append(row)
            log(f"{'x'.join(map(str, shape))} {row['solver']}: torch {row['torch_us']:.1f} us, fused "
                f"{row['fused_us']:.1f} us ({row['speedup']:.1f}x), {row['bandwidth_GBs']:.0f} GB/s = "
                f"{100 * row['copy_ratio']:.0f}% of copy, max rel diff {diff:.1e}")
    return {"device": name, "copy_bandwidth_GBs": copy_bw / 1e9, "rows": rows}


def print_kernel_bench(result: dict) -> None:
    print(f"\n{result['device']}, copy bandwidth {result['copy_bandwidth_GBs']:.0f} GB/s\n")
    print("| batch | solver | torch us/step | fused us/step | speed-up | fused GB/s | % of copy | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {'x'.join(map(str, r['shape']))} | {r['solver']} | {r['torch_us']:.1f} | {r['fused_us']:.1f} | "
              f"{r['speedup']:.1f}x | {r['bandwidth_GBs']:.0f} | {100 * r['copy_ratio']:.0f}% | {r['max_rel_diff']:.1e} |")
