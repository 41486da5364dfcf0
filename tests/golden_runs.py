"""A fixed set of runs whose outputs are stored bit for bit (tests/data/golden_runs.pt).

Every solver on VP and EDM, float64, fixed seeds, on the exact 2-D mixture network; plus the other
entry points of the driver (invert, likelihood, sample_grad).  The stored file was written by the
code before the 0.2 redesign (issue 15); the redesign must reproduce it exactly, except where a
vocabulary change is meant to change a default (then the run here spells the old behaviour in the
new words).  ``python tests/golden_runs.py --write`` rewrites the file; ``--check`` reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sde import EDMSDE, VPSDE
from samplers import Model, invert, likelihood, problems, sample, sample_grad
from solvers import (ERSDE, AdaptiveDPMSolver, AdaptiveEM, AdaptiveODE, AncestralSampling, AnnealedLangevin,
                     DPMSolver, DPMSolverSDE, Euler, EulerMaruyama, Heun, Langevin, OptimalReverse,
                     PredictorCorrector, Restart, Reversible, UniPC)

PATH = Path(__file__).with_name("data") / "golden_runs.pt"
F64 = torch.float64
BATCH, STEPS, SEED = 16, 8, 1234


def solver_runs() -> dict[str, callable]:
    """id -> factory of every solver configuration that is run on each SDE."""
    runs = {
        "EulerMaruyama": lambda: EulerMaruyama(),
        "EulerMaruyama-eta0.5": lambda: EulerMaruyama(eta=0.5),
        "Euler": lambda: Euler(),
        "Heun": lambda: Heun(),
        "Heun-eta1": lambda: Heun(eta=1.0),
        "Restart": lambda: Restart(),
        "AdaptiveDPMSolver-12": lambda: AdaptiveDPMSolver(order=(1, 2)),
        "AdaptiveDPMSolver-23": lambda: AdaptiveDPMSolver(),
        "AdaptiveEM": lambda: AdaptiveEM(rtol=0.1),
        "PC-default": lambda: PredictorCorrector(),
        "PC-ancestral-langevin": lambda: PredictorCorrector(AncestralSampling(), Langevin(snr=0.1, n_steps=2)),
        "PC-euler-annealed": lambda: PredictorCorrector(Euler(), AnnealedLangevin()),
        "Ancestral-forward": lambda: AncestralSampling(variance="forward"),
        "OptimalReverse": lambda: OptimalReverse(),
        "OptimalReverse-mean": lambda: OptimalReverse(noise=False),
    }
    for order in (1, 2, 3):
        for predict in ("data", "noise"):
            for method in ("multistep", "singlestep"):
                runs[f"DPMSolver-{order}-{predict}-{method}"] = (
                    lambda o=order, p=predict, m=method: DPMSolver(order=o, predict=p, method=m))
            for variant in ("bh1", "bh2"):
                runs[f"UniPC-{order}-{variant}-{predict}"] = (
                    lambda o=order, v=variant, p=predict: UniPC(order=o, variant=v, predict=p))
        runs[f"UniPC-{order}-nocorrector"] = lambda o=order: UniPC(order=o, corrector=False)
        for solver_type in ("midpoint", "heun"):
            for eta in (0.5, 1.0):
                runs[f"DPMSolverSDE-{order}-{solver_type}-eta{eta}"] = (
                    lambda o=order, s=solver_type, e=eta: DPMSolverSDE(order=o, solver_type=s, eta=e))
        for scale in ("ode", "original_sde", "sde_5"):
            runs[f"ERSDE-{order}-{scale}"] = lambda o=order, s=scale: ERSDE(order=o, noise_scale=s)
    for method in ("dopri5", "bosh3", "fehlberg2"):
        runs[f"AdaptiveODE-{method}"] = lambda m=method: AdaptiveODE(method=m, rtol=1e-4, atol=1e-4)
    for base in ("euler", "midpoint", "ralston", "rk4"):
        runs[f"Reversible-{base}"] = lambda b=base: Reversible(base=b)
    runs["Reversible-euler-sde"] = lambda: Reversible(base="euler", stochastic=True)
    runs["Reversible-euler-noise"] = lambda: Reversible(base="euler", predict="noise")
    return runs


SDES = {"VP": VPSDE, "EDM": EDMSDE}


def _model(sde):
    mixture = problems.mixture_2d()
    return Model(mixture.net(sde, "x0"), sde, predicts="x0")


def compute() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for sde_name, make_sde in SDES.items():
        sde = make_sde()
        model = _model(sde)
        for run_id, factory in solver_runs().items():
            solver = factory()
            steps = None if run_id.startswith("Adaptive") else STEPS
            x = sample(model, solver, shape=(BATCH, 2), steps=steps, seed=SEED, dtype=F64)
            out[f"{sde_name}/sample/{run_id}"] = x
        x0 = sample(model, DPMSolver(), shape=(BATCH, 2), steps=STEPS, seed=SEED, dtype=F64, final_denoise=False)
        for run_id, factory in (("DPMSolver", DPMSolver), ("UniPC", UniPC), ("Reversible", Reversible)):
            out[f"{sde_name}/invert/{run_id}"] = invert(model, factory(), x0, steps=STEPS, seed=SEED).x_T
        result = likelihood(model, x0[:4], seed=SEED)
        out[f"{sde_name}/likelihood"] = result.log_p
        x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(SEED)).requires_grad_(True)
        for mode, factory in (("adjoint", DPMSolver), ("reversible", Reversible)):
            y = sample_grad(model, factory(), x_T, steps=STEPS, seed=SEED, mode=mode)
            (grad,) = torch.autograd.grad(y.square().sum(), x_T)
            out[f"{sde_name}/sample_grad/{mode}"] = torch.cat([y.detach(), grad])
    return out


def compare(stored: dict, now: dict) -> tuple[list[str], dict[str, float]]:
    """(ids that are bit-identical, {id: max |difference|} for the others; inf when missing)."""
    same, differ = [], {}
    for key in sorted(set(stored) | set(now)):
        if key not in stored or key not in now:
            differ[key] = float("inf")
        elif torch.equal(stored[key], now[key]):
            same.append(key)
        else:
            differ[key] = float((stored[key] - now[key]).abs().max())
    return same, differ


if __name__ == "__main__":
    now = compute()
    if "--write" in sys.argv:
        PATH.parent.mkdir(exist_ok=True)
        torch.save(now, PATH)
        print(f"wrote {len(now)} runs to {PATH}")
    else:
        same, differ = compare(torch.load(PATH), now)
        print(f"{len(same)} of {len(same) + len(differ)} runs bit-identical")
        for key, diff in differ.items():
            print(f"  {key}: max |diff| {diff:.3g}")
