"""Our solvers inside an unmodified diffusers DDPMPipeline, equal to sample() on the same noise.

    python examples/diffusers_pipeline.py            # a 32x32 UNet, 20 network calls
    python examples/diffusers_pipeline.py --quick    # an 8x8 UNet, 8 calls (a few seconds)

The UNet is built from a config with random weights (no download), so the images are noise-like; what the
example shows is the plumbing: three lines put any fixed-grid solver into the pipeline
(``pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver=...)``), the pipeline's own
loop runs it, and the result is exactly ``sample(from_diffusers(unet, scheduler), solver, ...)``.  With a
real pipeline (``DDPMPipeline.from_pretrained("google/ddpm-cat-256")``) the lines are the same.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from samplers import sample
from samplers.integrations import SolverScheduler, from_diffusers
from solvers import ERSDE, DPMSolver, Heun, Restart, UniPC


def tiny_unet(size: int) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    size, calls, batch = (8, 8, 2) if args.quick else (32, 20, 4)
    unet = tiny_unet(size)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config

    print(f"{'solver':<45} {'calls':>5} {'seconds':>8} {'max|pipeline - sample()|':>26}")
    for solver in (DPMSolver(2), UniPC(), ERSDE(3), Heun(), Restart()):
        # the three lines a diffusers user writes (plus the solver's import)
        pipe.scheduler = SolverScheduler.from_config(config, solver=solver, seed=0)
        start = time.perf_counter()
        images = pipe(batch_size=batch, num_inference_steps=calls, generator=torch.Generator().manual_seed(1),
                      output_type="pt").images
        seconds = time.perf_counter() - start

        x_T = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        ours = sample(from_diffusers(unet, pipe.scheduler), solver, x_T=x_T, grid=pipe.scheduler.grid, seed=0)
        difference = float((images - (ours / 2 + 0.5).clamp(0, 1)).abs().max())
        print(f"{solver!r:<45} {len(pipe.scheduler.timesteps):>5} {seconds:>8.2f} {difference:>26.3g}")
        if difference != 0.0:
            raise SystemExit(f"{solver!r}: the pipeline's images differ from sample()'s by {difference:.3g}")


if __name__ == "__main__":
    main()
