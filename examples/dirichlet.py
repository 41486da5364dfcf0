"""Dirichlet diffusion on categorical sequences: train a score network, sample, check the constraints.

The data are sequences of length 8 over 4 states from a Markov chain on a 4-cycle: the next state is
one step forward (probability 0.7) or one step back (0.3), never the same state or the opposite one.
A uniformly random sequence satisfies that constraint with probability 0.5^7 = 0.8%.

Training follows DDSM: a bank of forward Jacobi paths from the vertices v_0 = 0 and v_0 = 1 at a set of
times, the exact transition score at each as the target (sde.DirichletSDE.transition), and the loss
E[s v (1 - v) (score_net - target)^2] weighted by the inverse of its per-time scale.  Sampling runs
through samplers.sample with solvers.JacobiEulerMaruyama.

    python examples/dirichlet.py            # a few CPU minutes
    python examples/dirichlet.py --quick    # seconds (a smoke test: the network is barely trained)
"""

from __future__ import annotations

import argparse
import time

import torch

from samplers import Model, sample
from sde import DirichletSDE
from solvers import JacobiEulerMaruyama

STATES, LENGTH, FORWARD = 4, 8, 0.7


def markov_sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """n sequences (n, LENGTH) of the chain: uniform start, then +1 w.p. FORWARD or -1 (mod STATES)."""
    start = torch.randint(0, STATES, (n, 1), generator=generator)
    moves = torch.where(torch.rand(n, LENGTH - 1, generator=generator) < FORWARD, 1, -1)
    return (start + torch.cat([torch.zeros(n, 1, dtype=torch.long), moves.cumsum(1)], dim=1)) % STATES


def constraint_report(seqs: torch.Tensor) -> dict:
    steps = (seqs[:, 1:] - seqs[:, :-1]) % STATES
    allowed = (steps == 1) | (steps == STATES - 1)
    valid = allowed.all(dim=1)
    return {"valid": float(valid.double().mean()), "forward": float((steps[allowed] == 1).double().mean()),
            "start": torch.bincount(seqs[:, 0], minlength=STATES).double() / seqs.shape[0]}


class ScoreNet(torch.nn.Module):
    """Score in stick-breaking coordinates: the Beta (stationary) score plus a learned correction of
    scale 1/(s t), the size of the transition score near a vertex."""

    def __init__(self, sde: DirichletSDE, width: int):
        super().__init__()
        self.sde = sde
        dims = LENGTH * (STATES - 1)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(LENGTH * STATES + dims + 3, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, dims))

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.sde.to_simplex(v).flatten(1)
        logit = (torch.log(v) - torch.log1p(-v)).flatten(1) / 10
        t = t.reshape(-1, 1).to(v.dtype)
        features = torch.cat([x, logit, torch.log(t), t, torch.sqrt(t)], dim=1)
        _, _, speed = self.sde.coefficients_like(v)
        return self.sde.beta_score(v) + self.body(features).reshape(v.shape) / (speed * t[:, :, None])


def noise_bank(sde: DirichletSDE, ticks: torch.Tensor, per_tick: int, steps: int, generator):
    """Forward samples and their exact scores from v_0 = 0 and v_0 = 1: (ticks, 2, per_tick, K-1) each."""
    n_ticks, dims = ticks.shape[0], sde.categories - 1
    t = ticks.repeat_interleave(2 * per_tick)
    v0 = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat_interleave(per_tick).repeat(n_ticks)
    v0 = v0[:, None].expand(-1, dims).contiguous()
    v = sde.forward_sample(v0, t, steps=steps, generator=generator)
    scores = torch.empty_like(v)
    for start in (0.0, 1.0):  # the series with vertex starts uses the closed-form end values
        rows = v0[:, 0] == start
        scores[rows] = sde.transition(v[rows], start, t[rows])[1]
    shape = (n_ticks, 2, per_tick, dims)
    return v.reshape(shape).float(), scores.reshape(shape).float()


def train(sde, args, generator):
    ticks = torch.exp(torch.linspace(torch.log(torch.tensor(sde.t_min)), torch.log(torch.tensor(sde.t_max)),
                                     args.ticks, dtype=torch.float64))
    start = time.perf_counter()
    bank_v, bank_s = noise_bank(sde, ticks, args.bank, args.bank_steps, generator)
    _, _, speed = sde.coefficients_like(bank_v)
    # the loss scale per time: E[s v (1 - v) target^2], as DDSM's importance weights
    scale = (speed * bank_v * (1 - bank_v) * bank_s**2).mean(dim=(1, 2, 3))
    print(f"noise bank: {args.ticks} times x 2 starts x {args.bank} paths in {time.perf_counter() - start:.1f} s")
    net = ScoreNet(sde, args.width)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters)
    dims = STATES - 1
    coords = torch.arange(dims)
    start = time.perf_counter()
    for it in range(args.iters):
        seqs = markov_sequences(args.batch, generator)
        v0 = sde.stick_from_categories(seqs, dtype=torch.long)  # (B, L, K-1) of 0/1
        tick = torch.randint(0, args.ticks, (args.batch, 1, 1), generator=generator)
        pick = torch.randint(0, args.bank, v0.shape, generator=generator)
        v, target = bank_v[tick, v0, pick, coords], bank_s[tick, v0, pick, coords]
        t = ticks[tick.flatten()].float()
        err = net(v, t) - target
        loss = ((speed * v * (1 - v) * err**2).mean(dim=(1, 2)) / scale[tick.flatten()].float()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % max(args.iters // 5, 1) == 0:
            print(f"  iter {it + 1:5d}  loss {loss.item():.4f}")
    print(f"trained {args.iters} iterations in {time.perf_counter() - start:.1f} s")
    return net


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.batch, args.width, args.ticks, args.bank, args.bank_steps, args.lr = 40, 64, 64, 12, 64, 40, 2e-3
        args.samples, runs = min(args.samples, 200), [(20, 1.0)]
    else:
        args.iters, args.batch, args.width, args.ticks, args.bank, args.bank_steps, args.lr = 3000, 256, 256, 60, 1024, 400, 2e-3
        runs = [(50, 1.0), (100, 1.0), (200, 1.0), (200, 2.0)]
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    sde = DirichletSDE(STATES, t_min=0.01, t_max=4.0)
    net = train(sde, args, generator)
    data = constraint_report(markov_sequences(args.samples, generator))
    print(f"\ndata: valid sequences {data['valid']:.3f}, forward moves {data['forward']:.3f}; "
          f"uniformly random sequences are valid with probability {0.5 ** (LENGTH - 1):.4f}")
    print(f"{'steps':>6} {'dilation':>9} {'valid sequences':>16} {'forward moves':>14} {'start freq (0.25 each)':>28}")
    model = Model(net, sde, predicts="score")
    for steps, dilation in runs:
        with torch.no_grad():
            v = sample(model, JacobiEulerMaruyama(time_dilation=dilation), shape=(args.samples, LENGTH, STATES - 1),
                       steps=steps, grid_kind="quadratic", seed=args.seed, final_denoise=False)
        inside = bool(((v > 0) & (v < 1)).all())
        seqs = sde.to_simplex(v).argmax(-1)
        rep = constraint_report(seqs)
        starts = " ".join(f"{p:.3f}" for p in rep["start"].tolist())
        print(f"{steps:6d} {dilation:9g} {rep['valid']:16.3f} {rep['forward']:14.3f} {starts:>28}"
              f"{'' if inside else '  (states left the simplex!)'}")


if __name__ == "__main__":
    main()
