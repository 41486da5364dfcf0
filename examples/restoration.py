"""Image restoration with the mean-reverting SDE (IR-SDE) on scikit-learn's 8x8 digits, on a CPU.

    python examples/restoration.py                       # deblurring: a few CPU minutes
    python examples/restoration.py --degradation noise   # noise removal
    python examples/restoration.py --quick               # seconds: for tests

The 1797 digits ship with scikit-learn (no download); pixels 0..16 are mapped to [0, 1].  A
degradation turns each clean image x0 into mu: ``noise`` adds N(0, 0.15^2) per pixel, ``blur``
convolves with a 3x3 Gaussian kernel (std 1 pixel) and adds N(0, 0.02^2).  The mean-reverting SDE
dx = theta_t (mu - x) dt + sigma_t dw carries x0 to N(mu, lam^2 I); a small convolutional network
eps(x_t, t, mu) is trained by denoising score matching on its closed-form marginal
x_t = mu + (x0 - mu) e^{-thetabar} + sigma(t) z, and restoration integrates the reverse process from
x_T = mu + lam z.  The script prints the PSNR of the degraded and the restored held-out images for
several solvers (IR-SDE's OptimalReverse posterior sampler, Euler-Maruyama, DPM-Solver++ on the
probability-flow ODE), and of the mean of a few posterior draws (closer to the MMSE estimate: a
single draw's squared error is about twice the MMSE's); with ``--out`` it saves a figure of clean /
degraded / restored digits.

Measured (3000 training steps, 300 held-out digits, lam = 0.1, seed 0; PSNR in dB):

    degradation   degraded   OptimalReverse 100   EM 100   DPM-Solver++(2M) ODE 20   mean of 4 draws
    blur            14.56          22.81           22.62           22.11                  24.75
    noise           18.44          19.39           19.22           18.90                  21.26
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from samplers import Model, grid, sample
from sde import MeanRevertingSDE
from solvers import DPMSolver, EulerMaruyama, OptimalReverse


def load_digits_tensor() -> torch.Tensor:
    """The 1797 digits as (1797, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0


def degrade(x0: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The degraded observation mu of clean images x0 (see the module)."""
    if kind == "noise":
        return x0 + 0.15 * torch.randn(x0.shape, generator=generator)
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    kernel = torch.exp(-0.5 * (offsets[:, None] ** 2 + offsets[None, :] ** 2))
    kernel = (kernel / kernel.sum())[None, None]
    blurred = nn.functional.conv2d(nn.functional.pad(x0, (1, 1, 1, 1), mode="replicate"), kernel)
    return blurred + 0.02 * torch.randn(x0.shape, generator=generator)


class RestorationNet(nn.Module):
    """eps(x_t, t, mu) or x0(x_t, t, mu) (as mu + a correction): 3x3 convolutions on the stacked (x_t, mu)
    with a time embedding added per channel."""

    def __init__(self, predicts: str = "eps", channels: int = 32, blocks: int = 3, emb_dim: int = 64):
        super().__init__()
        self.predicts = predicts
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(200.0), emb_dim // 2)))
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(2, channels, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2 * blocks))
        self.embs = nn.ModuleList(nn.Linear(emb_dim, channels) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.GroupNorm(8, channels) for _ in range(2 * blocks))
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, mu):
        angles = t.float()[:, None] * self.freqs[None]
        emb = self.time_mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))
        h = self.inp(torch.cat([x.float(), mu.float().expand_as(x)], dim=1))
        for b, emb_layer in enumerate(self.embs):
            r = self.convs[2 * b](nn.functional.silu(self.norms[2 * b](h))) + emb_layer(emb)[:, :, None, None]
            h = h + self.convs[2 * b + 1](nn.functional.silu(self.norms[2 * b + 1](r)))
        out = self.out(nn.functional.silu(h))
        return (out + mu.float() if self.predicts == "x0" else out).to(x.dtype)


def train(net, sde, clean, degraded, steps, batch, lr, generator, log_every):
    """Denoising score matching on the closed-form marginal: minimise |eps(x_t, t, mu) - z|^2, or
    |x0(x_t, t, mu) - x0|^2 for an x0-predicting network."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n = clean.shape[0]
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), generator=generator)
        x0, mu = clean[idx], degraded[idx]
        t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(batch, generator=generator, dtype=torch.float64)
        z = torch.randn(x0.shape, generator=generator)
        mean, std = sde.marginal(x0, t.float(), mu)
        target = x0 if net.predicts == "x0" else z
        loss = (net(mean + std * z, t.float(), mu) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"  step {step:5d}  loss {loss.item():.4f}", flush=True)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean PSNR in dB over images (data range 1), after clipping to [0, 1]."""
    mse = (x.clamp(0, 1) - ref).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse)).mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degradation", choices=("blur", "noise"), default="blur")
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=100, help="sampling steps (IR-SDE uses 100)")
    parser.add_argument("--lam", type=float, default=0.1, help="the stationary std lambda of the SDE")
    parser.add_argument("--predicts", choices=("eps", "x0"), default="eps",
                        help="what the network predicts (IR-SDE: eps)")
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--average", type=int, default=4, help="posterior draws to average (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save clean/degraded/restored digits to this PNG")
    parser.add_argument("--quick", action="store_true", help="a few training steps and images: seconds")
    args = parser.parse_args(argv)
    if args.average < 1 or args.steps < 1 or args.train_steps < 1 or args.lam <= 0:
        parser.error("--average, --steps and --train-steps must be >= 1 and --lam > 0")
    if args.quick:
        args.train_steps, args.steps, args.test_images, args.average = 20, 10, 32, 2
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images = load_digits_tensor()
    perm = torch.randperm(images.shape[0], generator=gen)
    test_idx, train_idx = perm[:args.test_images], perm[args.test_images:]
    degraded = degrade(images, args.degradation, gen)
    sde = MeanRevertingSDE("cosine", lam=args.lam)
    net = RestorationNet(args.predicts)

    started = time.perf_counter()
    print(f"training on {len(train_idx)} digits ({args.degradation}), {args.train_steps} steps, {sde!r}")
    train(net, sde, images[train_idx], degraded[train_idx], args.train_steps, batch=128, lr=2e-3, generator=gen,
          log_every=0 if args.quick else 500)
    print(f"trained in {time.perf_counter() - started:.0f} s")
    net.eval()

    clean, mu = images[test_idx], degraded[test_idx]
    model = Model(net, sde, predicts=args.predicts)
    print(f"\nPSNR on {len(test_idx)} held-out digits (dB, higher is better)")
    print(f"  {'degraded (mu)':36s} {psnr(mu, clean):6.2f}")
    runs = {
        f"OptimalReverse, {args.steps} steps": (OptimalReverse(), {"steps": args.steps}),
        f"EulerMaruyama, {args.steps} steps": (EulerMaruyama(), {"steps": args.steps}),
        f"DPM-Solver++(2M) ODE, {max(args.steps // 5, 5)} steps":
            (DPMSolver(2), {"grid": grid(sde, max(args.steps // 5, 5), "log_snr")}),
    }
    restored = {}
    with torch.no_grad():
        for name, (solver, kw) in runs.items():
            t0 = time.perf_counter()
            restored[name] = sample(model, solver, shape=tuple(mu.shape), cond={"mu": mu}, seed=args.seed, **kw)
            print(f"  {name:36s} {psnr(restored[name], clean):6.2f}   ({time.perf_counter() - t0:.1f} s)")
        # each restoration above is one draw from p(x0 | mu); their mean approaches the MMSE estimate,
        # which scores higher in PSNR (a posterior sample's squared error is about twice the MMSE's)
        draws = [restored[next(iter(runs))]] + [
            sample(model, OptimalReverse(), shape=tuple(mu.shape), cond={"mu": mu}, seed=args.seed + i,
                   steps=args.steps) for i in range(1, args.average)]
        print(f"  {f'mean of {args.average} OptimalReverse draws':36s} {psnr(torch.stack(draws).mean(0), clean):6.2f}")

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [("clean", clean), ("degraded", mu)] + list(restored.items())
        cols = 10
        fig, axes = plt.subplots(len(rows), cols, figsize=(cols, 1.1 * len(rows)))
        for r, (name, imgs) in enumerate(rows):
            for c in range(cols):
                axes[r, c].imshow(imgs[c, 0].clamp(0, 1), cmap="gray_r", vmin=0, vmax=1)
                axes[r, c].axis("off")
            axes[r, 0].set_title(name.split(",")[0], fontsize=7, loc="left")
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
