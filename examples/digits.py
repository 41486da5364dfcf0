"""A class-conditional convolutional score network on scikit-learn's 8x8 digits, trained on a CPU.

    python examples/digits.py             # 3000 training steps: a few CPU minutes
    python examples/digits.py --quick     # seconds: for tests
    python examples/digits.py --resume    # continue from the checkpoint in --out

The 1797 digits ship with scikit-learn (no download); pixels 0..16 are mapped to [-1, 1].  The
network predicts eps of the VP SDE from (x_t, t, label); 10% of the training labels are replaced
by a "no label" class, so one network gives both the conditional and the unconditional model
(classifier-free guidance).  Written to ``--out`` (default ``runs/digits``):

- ``checkpoint.pt``: weights, EMA weights, optimiser and step, saved during training; the script
  reloads it into a fresh network and checks the outputs are identical before sampling;
- ``grid_solvers.png``: unconditional samples of several solvers at several NFEs;
- ``inpainting.png``: the right half of held-out digits masked and filled in by replacement
  (the known pixels of every x0 estimate are replaced by the observed ones, via the solvers'
  ``correct_x0`` hook; the final x0 keeps them exactly);
- ``guidance.png``: one row per class at guidance scales 0 (plain conditional) and 2;
- ``results.json``: sliced Wasserstein distances of unconditional samples to the data and the
  accuracy of a logistic-regression digit classifier on the guided samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from torch import nn

from samplers import Model, problems, sample
from sde import VPSDE
from solvers import ERSDE, DPMSolver, DPMSolverSDE, Euler, EulerMaruyama, Heun, UniPC

NULL_CLASS = 10  # the "no label" class of classifier-free guidance

SOLVERS = {
    "Euler": Euler,
    "Heun": Heun,
    "DPM-Solver++(2M)": lambda: DPMSolver(2),
    "UniPC": UniPC,
    "SDE-DPM-Solver++(2M)": lambda: DPMSolverSDE(2),
    "EulerMaruyama": EulerMaruyama,
}


def load_digits_tensor():
    """(images (1797, 1, 8, 8) in [-1, 1], labels (1797,)) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels)
        self.norm2, self.conv2 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        return x + self.conv2(nn.functional.silu(self.norm2(h)))


class DigitUNet(nn.Module):
    """A two-level U-Net for 8x8 images: eps(x_t, t, label), labels 0..9 or NULL_CLASS."""

    def __init__(self, channels: int = 32, emb_dim: int = 128):
        super().__init__()
        self.config = {"channels": channels, "emb_dim": emb_dim}
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(500.0), emb_dim // 4)))
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim // 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(NULL_CLASS + 1, emb_dim)
        c = channels
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = ResBlock(c, emb_dim)
        self.pool = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.mid1, self.mid2 = ResBlock(2 * c, emb_dim), ResBlock(2 * c, emb_dim)
        self.up = nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1)  # 4x4 -> 8x8
        self.up1 = ResBlock(2 * c, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, 2 * c), nn.SiLU(), nn.Conv2d(2 * c, 1, 3, padding=1))

    def forward(self, x, t, label=None):
        if label is None:
            label = torch.full((x.shape[0],), NULL_CLASS, dtype=torch.long, device=x.device)
        angles = t.float()[:, None] * self.freqs[None]
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1)) + self.label_emb(label)
        h0 = self.down1(self.inp(x.float()), emb)
        h = self.mid2(self.mid1(self.pool(h0), emb), emb)
        h = self.up1(torch.cat([self.up(h), h0], dim=1), emb)
        return self.out(h).to(x.dtype)


def guided(net, scale: float):
    """Classifier-free guidance: eps_null + scale (eps_label - eps_null) + eps_label - ... written as
    (1 + scale) eps_label - scale eps_null, both from one batched call."""

    def call(x, t, label):
        both = net(torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([label, torch.full_like(label, NULL_CLASS)]))
        cond, uncond = both.chunk(2)
        return (1.0 + scale) * cond - scale * uncond

    return call


def save_checkpoint(path, net, ema, opt, step):
    torch.save({"config": net.config, "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step}, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    net, ema = DigitUNet(**state["config"]), DigitUNet(**state["config"])
    net.load_state_dict(state["net"])
    ema.load_state_dict(state["ema"])
    return net, ema, state


def train(images, labels, sde, iters, out, resume=False, batch=64, lr=2e-3, seed=0, ema_decay=0.999,
          label_dropout=0.1, log=print):
    path = os.path.join(out, "checkpoint.pt")
    net = DigitUNet()
    ema = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    start_step = 0
    if resume and os.path.exists(path):
        net, ema, state = load_checkpoint(path)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        opt.load_state_dict(state["opt"])
        start_step = state["step"]
        log(f"resumed from {path} at step {start_step}")
    gen = torch.Generator().manual_seed(seed + start_step)
    losses = []
    for step in range(start_step, iters):
        for group in opt.param_groups:  # cosine decay over the whole run, so a resumed run continues it
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / iters))
        idx = torch.randint(len(images), (batch,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch, generator=gen) < label_dropout] = NULL_CLASS
        t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(batch, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = (net(sde.marginal_sample(x0, t, eps), t, y) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.mul_(decay).add_(p, alpha=1 - decay)
        losses.append(loss.item())
        if (step + 1) % max(iters // 6, 1) == 0 or step + 1 == iters:
            save_checkpoint(path, net, ema, opt, step + 1)
            log(f"  step {step + 1:>5d}/{iters}: loss {sum(losses[-200:]) / len(losses[-200:]):.4f} (checkpoint saved)")
    if start_step >= iters:
        save_checkpoint(path, net, ema, opt, start_step)
    return path


def image_grid(x, nrow):
    """(B, 1, 8, 8) in [-1, 1] -> one (rows*9, nrow*9) array with 1-pixel gaps."""
    x = ((x.clamp(-1, 1) + 1) / 2).detach().cpu()
    rows = math.ceil(x.shape[0] / nrow)
    canvas = torch.full((rows * 9 + 1, nrow * 9 + 1), 0.3)  # light grey gaps between digits
    for i in range(x.shape[0]):
        r, c = divmod(i, nrow)
        canvas[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = x[i, 0]
    return canvas.numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (tests)")
    parser.add_argument("--iters", type=int, default=None, help="training steps (default 3000, 10 with --quick)")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--train-only", action="store_true", help="stop after training (and the checkpoint)")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets (default 10 20 50)")
    parser.add_argument("--out", default=os.path.join("runs", "digits"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    iters = args.iters or (10 if args.quick else 3000)
    nfes = args.nfe or ([6] if args.quick else [10, 20, 50])
    n_grid = 16 if args.quick else 64
    solvers = dict(list(SOLVERS.items())[:2]) if args.quick else SOLVERS
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    images, labels = load_digits_tensor()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    test_idx, train_idx = perm[:200], perm[200:]
    sde = VPSDE()
    print(f"training on {len(train_idx)} digits for {iters} steps")
    path = train(images[train_idx], labels[train_idx], sde, iters, args.out, resume=args.resume, seed=args.seed)
    train_time = time.perf_counter() - start
    print(f"trained in {train_time:.1f} s")
    if args.train_only:
        return 0

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.linear_model import LogisticRegression

    # reload the checkpoint into fresh networks: the sampler sees exactly what was saved
    _, ema, state = load_checkpoint(path)
    ema.eval()
    probe_x, probe_t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.3)
    with torch.no_grad():
        before = ema(probe_x, probe_t)
        again = load_checkpoint(path)[1].eval()(probe_x, probe_t)
    assert torch.equal(before, again), "the reloaded checkpoint gives different outputs"
    print(f"reloaded {path} (step {state['step']}): outputs identical")

    model = Model(ema, sde, predicts="eps")
    flat_data = images[train_idx].reshape(len(train_idx), -1)
    results = {"iters": iters, "train_seconds": train_time, "sliced_wasserstein": {}, "guidance_accuracy": {}}
    with torch.no_grad():
        # unconditional samples, several solvers and NFEs
        fig, axes = plt.subplots(len(nfes), len(solvers), figsize=(2.6 * len(solvers), 2.8 * len(nfes)),
                                 squeeze=False, layout="constrained")
        for col, (name, make) in enumerate(solvers.items()):
            solver = make()
            for row, nfe in enumerate(nfes):
                steps = max((nfe - 1) // solver.nfe_per_step, 1)
                x, info = sample(model, solver, shape=(n_grid * 4, 1, 8, 8), steps=steps, seed=args.seed,
                                 return_info=True)
                sw = problems.sliced_wasserstein(x.reshape(x.shape[0], -1).clamp(-1, 1), flat_data)
                results["sliced_wasserstein"].setdefault(name, {})[info.nfe] = sw
                print(f"{name:<22} NFE {info.nfe:>3d}: sliced W to the training digits {sw:.4f}")
                axes[row, col].imshow(image_grid(x[:n_grid], int(math.sqrt(n_grid))), cmap="gray_r", vmin=0, vmax=1)
                axes[row, col].set_title(f"{name}, NFE {info.nfe}\nSW {sw:.3f}", fontsize=8)
                axes[row, col].axis("off")
        fig.savefig(os.path.join(args.out, "grid_solvers.png"), dpi=110)
        plt.close(fig)

        # inpainting by replacement: the right half is unknown
        known = images[test_idx[:10]]
        mask = torch.zeros_like(known)
        mask[..., :4] = 1.0

        def replace(x0, t):
            return x0 * (1 - mask) + known * mask

        nfe = 20 if not args.quick else 6
        rows = [known, known * mask]  # unknown pixels shown as mid-grey
        names = ["original", "observed (left half)"]
        for name, solver in (("DPM-Solver++(2M)", DPMSolver(2, correct_x0=replace)),
                             ("ER-SDE-Solver-3", ERSDE(3, correct_x0=replace))):
            x = sample(model, solver, shape=known.shape, steps=nfe - 1, seed=args.seed + 3)
            assert torch.allclose(x * mask, known * mask), "known pixels must be kept"
            rows.append(x)
            names.append(f"{name}, NFE {nfe}")
        fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.1 * len(rows)), layout="constrained")
        for ax, x, name in zip(axes, rows, names):
            ax.imshow(image_grid(x, 10), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
        fig.savefig(os.path.join(args.out, "inpainting.png"), dpi=110)
        plt.close(fig)

        # classifier-free guidance, judged by a logistic-regression classifier fitted on the digits
        clf = LogisticRegression(max_iter=500).fit(flat_data.numpy(), labels[train_idx].numpy())
        results["classifier_test_accuracy"] = float(
            clf.score(images[test_idx].reshape(200, -1).numpy(), labels[test_idx].numpy()))
        per_class = 2 if args.quick else 10
        wanted = torch.arange(10).repeat_interleave(per_class)
        scales = (0.0, 2.0)
        fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 5), layout="constrained", squeeze=False)
        for ax, scale in zip(axes[0], scales):
            guided_model = Model(guided(ema, scale), sde, predicts="eps")
            x = sample(guided_model, DPMSolver(2), shape=(len(wanted), 1, 8, 8), steps=24, seed=args.seed + 7,
                       cond={"label": wanted})
            accuracy = float((torch.as_tensor(clf.predict(x.clamp(-1, 1).reshape(len(wanted), -1).numpy()))
                              == wanted).float().mean())
            results["guidance_accuracy"][str(scale)] = accuracy
            print(f"guidance scale {scale:g}: classifier agrees with the requested digit on {accuracy:.1%}")
            ax.imshow(image_grid(x, per_class), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"guidance scale {scale:g} (rows: digits 0-9), classifier accuracy {accuracy:.0%}",
                         fontsize=9)
            ax.axis("off")
        fig.savefig(os.path.join(args.out, "guidance.png"), dpi=110)
        plt.close(fig)

    results["total_seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}/grid_solvers.png, inpainting.png, guidance.png, results.json "
          f"({results['total_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
