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

from samplers import Model, invert, likelihood, problems, sample, sample_grad
from sde import EDMSDE, VPSDE
from solvers import (
    ERSDE,
    AdaptiveDPMSolver,
    AdaptiveEM,
    AdaptiveODE,
    AncestralSampling,
    AnnealedLangevin,
    DPMSolver,
    DPMSolverSDE,
    Euler,
    EulerMaruyama,
    Heun,
    Langevin,
    OptimalReverse,
    PredictorCorrector,
    Restart,
    Reversible,
    UniPC,
)

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
    # run ids keep the words of the stored file (predict "data"/"noise" is predicts "x0"/"eps")
    for order in (1, 2, 3):
        for predict, predicts in (("data", "x0"), ("noise", "eps")):
            for variant in ("multistep", "singlestep"):
                runs[f"DPMSolver-{order}-{predict}-{variant}"] = (
                    lambda o=order, p=predicts, v=variant: DPMSolver(order=o, predicts=p, variant=v))
            for variant in ("bh1", "bh2"):
                runs[f"UniPC-{order}-{variant}-{predict}"] = (
                    lambda o=order, v=variant, p=predicts: UniPC(order=o, variant=v, predicts=p))
        runs[f"UniPC-{order}-nocorrector"] = lambda o=order: UniPC(order=o, corrector=False)
        for variant in ("midpoint", "heun"):
            for eta in (0.5, 1.0):  # the stored runs used k-diffusion's eta
                runs[f"DPMSolverSDE-{order}-{variant}-eta{eta}"] = (
                    lambda o=order, v=variant, e=eta: DPMSolverSDE.k_diffusion(order=o, variant=v, eta=e))
        for scale in ("ode", "original_sde", "sde_5"):
            runs[f"ERSDE-{order}-{scale}"] = lambda o=order, s=scale: ERSDE(order=o, noise_scale=s)
    for tableau in ("dopri5", "bosh3", "fehlberg2"):
        runs[f"AdaptiveODE-{tableau}"] = lambda t=tableau: AdaptiveODE(tableau=t, rtol=1e-4, atol=1e-4)
    for tableau in ("euler", "midpoint", "ralston", "rk4"):
        runs[f"Reversible-{tableau}"] = lambda t=tableau: Reversible(tableau=t)
    runs["Reversible-euler-sde"] = lambda: Reversible(tableau="euler", eta=1)
    runs["Reversible-euler-noise"] = lambda: Reversible(tableau="euler", predicts="eps")
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
