"""Train a small MLP score network on 2-D data on a CPU, then sample it with several solvers.

    python examples/toy_2d.py              # ~4000 training steps (under a minute on a laptop CPU)
    python examples/toy_2d.py --quick      # a few seconds: for tests

The data are scikit-learn's two moons (scaled to unit variance).  The network predicts the noise
eps of the VP SDE from (x_t, t); after training it is wrapped in ``samplers.Model`` and handed to
several solvers at several NFE budgets.  Written to ``--out`` (default ``runs/toy_2d``):

- ``samples.png``: the data and each solver's samples at each NFE, with the sliced Wasserstein
  distance to held-out data in the titles;
- ``trajectories.png``: the paths of 48 particles from noise to data (25 steps), for an ODE solver
  (Heun) and an SDE solver (SDE-DPM-Solver++(2M));
- ``toy_mlp.pt``: the trained network's weights;
- ``results.json``: the errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from samplers import Model, problems, sample
from sde import VPSDE
from solvers import DPMSolver, DPMSolverSDE, Euler, EulerMaruyama, Heun, UniPC

SOLVERS = {
    "EulerMaruyama": EulerMaruyama,
    "Euler (ODE)": Euler,
    "Heun": Heun,
    "DPM-Solver++(2M)": lambda: DPMSolver(2),
    "SDE-DPM-Solver++(2M)": lambda: DPMSolverSDE(2),
    "UniPC(bh2)": UniPC,
}


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the SDE time (t in [1e-3, 1]) at geometric frequencies."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(200.0), dim // 2)))

    def forward(self, t):
        angles = t.float()[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ScoreMLP(nn.Module):
    """eps(x_t, t): an MLP on [x, time features], SiLU, ``width`` units in ``depth`` hidden layers."""

    def __init__(self, width: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.embed = TimeEmbedding(time_dim)
        layers, size = [], 2 + time_dim
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        layers.append(nn.Linear(size, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t):
        return self.net(torch.cat([x.float(), self.embed(t)], dim=1)).to(x.dtype)


def moons(n: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    return (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])


def train(net: nn.Module, sde, data: torch.Tensor, iters: int, batch: int = 512, lr: float = 2e-3, seed: int = 0,
          log=print) -> list[float]:
    """Denoising score matching in eps form: || eps_hat(alpha x0 + sigma eps, t) - eps ||^2, t ~ U[t_min, 1]."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    losses = []
    for i in range(iters):
        x0 = data[torch.randint(len(data), (batch,), generator=gen)]
        t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(batch, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = (net(sde.marginal_sample(x0, t, eps), t) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (i + 1) % max(iters // 5, 1) == 0:
            log(f"  step {i + 1:>5d}/{iters}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return losses


def plot_samples(data, results, nfes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(nfes), len(names) + 1, figsize=(2.4 * (len(names) + 1), 2.4 * len(nfes)),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for row, nfe in enumerate(nfes):
        axes[row, 0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.4, color="black", linewidths=0)
        axes[row, 0].set_title("data" if row == 0 else "", fontsize=8)
        axes[row, 0].set_ylabel(f"NFE {nfe}")
        for col, name in enumerate(names, start=1):
            x, sw = results[name][nfe]
            axes[row, col].scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, linewidths=0)
            axes[row, col].set_title(f"{name}\nSW {sw:.3f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xlim(-2.8, 2.8)
        ax.set_ylim(-2.8, 2.8)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trajectories(paths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(4.5 * len(paths), 4.5), squeeze=False, layout="constrained")
    for ax, (name, xs) in zip(axes[0], paths.items()):
        xs = torch.stack(xs).numpy()  # (steps + 1, particles, 2)
        for i in range(xs.shape[1]):
            ax.plot(xs[:, i, 0], xs[:, i, 1], lw=0.6, alpha=0.7)
        ax.scatter(xs[0, :, 0], xs[0, :, 1], s=6, color="gray", label="x_T (noise)")
        ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=8, color="black", label="x_0 (samples)")
        ax.set_title(f"{name}: {xs.shape[0] - 1} steps", fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (tests): few training steps and samples")
    parser.add_argument("--iters", type=int, default=None, help="training steps (default 4000, 60 with --quick)")
    parser.add_argument("--samples", type=int, default=None, help="samples per solver (default 4000, 300 with --quick)")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets (default 10 20 50)")
    parser.add_argument("--out", default=os.path.join("runs", "toy_2d"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    iters = args.iters or (60 if args.quick else 4000)
    samples = args.samples or (300 if args.quick else 4000)
    nfes = args.nfe or ([6, 12] if args.quick else [10, 20, 50])
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    sde = VPSDE()
    data = moons(20000, args.seed)
    held_out = moons(samples, args.seed + 1)
    net = ScoreMLP()
    print(f"training a {sum(p.numel() for p in net.parameters())}-parameter MLP for {iters} steps")
    train(net, sde, data, iters, seed=args.seed)
    net.eval()
    torch.save(net.state_dict(), os.path.join(args.out, "toy_mlp.pt"))
    print(f"trained in {time.perf_counter() - start:.1f} s")

    model = Model(net, sde, predicts="eps")
    results: dict[str, dict[int, tuple]] = {}
    with torch.no_grad():
        for name, make in SOLVERS.items():
            solver = make()
            results[name] = {}
            for nfe in nfes:
                steps = max((nfe - 1) // solver.nfe_per_step, 1)  # the final denoise is one more call
                x, info = sample(model, solver, shape=(samples, 2), steps=steps, seed=args.seed, return_info=True)
                sw = problems.sliced_wasserstein(x, held_out)
                results[name][nfe] = (x, sw)
                print(f"{name:<22} NFE {info.nfe:>3d}: sliced W to held-out data {sw:.4f}")
        paths = {}
        for name in ("Heun", "SDE-DPM-Solver++(2M)"):
            x_T = torch.randn(48, 2, generator=torch.Generator().manual_seed(args.seed + 5))
            xs = [x_T]
            sample(model, SOLVERS[name](), x_T=x_T, steps=25, seed=args.seed + 5,
                   callback=lambda info, xs=xs: xs.append(info.x.clone()), final_denoise=False)
            paths[name] = xs
    floor = problems.sliced_wasserstein(moons(samples, args.seed + 2), held_out)
    print(f"floor (two independent data sets of {samples}): {floor:.4f}")
    plot_samples(held_out, results, nfes, os.path.join(args.out, "samples.png"))
    plot_trajectories(paths, os.path.join(args.out, "trajectories.png"))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"iters": iters, "samples": samples, "floor": floor,
                   "sliced_wasserstein": {n: {str(k): v[1] for k, v in r.items()} for n, r in results.items()}},
                  fh, indent=2)
    print(f"wrote {args.out}/samples.png, trajectories.png, toy_mlp.pt, results.json "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
