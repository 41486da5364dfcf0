"""Exact inversion and memory-constant gradients with solvers.Reversible, measured.

    python examples/inversion.py            # round-trip table and peak-memory table
    python examples/inversion.py --quick    # 20 steps, fewer samples, a smaller state (a few seconds)

Round trip: x_T -> sample (50 steps, no final denoising) -> invert -> x_T', max |x_T - x_T'| and
the same relative to max |x_T|, for Reversible ODE (noise and data forms) and SDE (data form), both
also with the Gaussian-reference weight data_std=2 (the mixture's per-coordinate std is 1.4), and,
for contrast,
DDIM inversion (DPMSolver(order=1) run backwards), float64 and float32, VP and VE, on the exact
2-D mixture.  Memory: one forward+backward of sample_grad, 10 vs 100 steps, plain backprop vs the
memory-constant reversible mode: the peak of the bytes autograd saves for backward (an exact count
by samplers.gradients.SavedTensorMeter; process RSS was tried and is dominated by the allocator).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from samplers import Model, invert, problems, sample, sample_grad  # noqa: E402
from samplers.gradients import SavedTensorMeter  # noqa: E402
from sde import VESDE, VPSDE  # noqa: E402
from solvers import DPMSolver, Reversible  # noqa: E402

SOLVERS = {
    "Rex euler ODE (eps)": lambda: Reversible("euler", predicts="eps"),
    "Rex heun ODE (eps)": lambda: Reversible("heun", predicts="eps"),
    "Rex euler ODE (x0)": lambda: Reversible("euler", predicts="x0"),
    "Rex heun ODE (x0)": lambda: Reversible("heun", predicts="x0"),
    "Rex euler SDE (x0)": lambda: Reversible("euler", eta=1),
    "Rex heun SDE (x0)": lambda: Reversible("heun", eta=1),
    "Rex heun ODE (data_std=2)": lambda: Reversible("heun", data_std=2.0),
    "Rex heun SDE (data_std=2)": lambda: Reversible("heun", eta=1, data_std=2.0),
    "DDIM inversion": lambda: DPMSolver(order=1),
}
SDES = {"VP": VPSDE, "VE": VESDE}


def round_trip_error(sde, solver, dtype, steps=50, batch=64, seed=3):
    """(max abs error, error relative to max |x_T|) of x_T -> sample -> invert."""
    model = Model(problems.mixture_2d().net(sde, "eps"), sde, "eps")
    x_T = sde.prior_sample((batch, 2), generator=torch.Generator().manual_seed(1)).to(dtype)
    x0, info = sample(model, solver, x_T=x_T, steps=steps, final_denoise=False, seed=seed, return_info=True)
    state = info.solver_state
    inv = invert(model, solver, x0, steps=steps, seed=seed, x0_hat=None if state is None else state["x_hat"])
    err = float((inv.x_T - x_T).abs().max())
    return err, err / float(x_T.abs().max())


def round_trip_table(steps=50, batch=64):
    rows = []
    for sde_name, make_sde in SDES.items():
        for name, make in SOLVERS.items():
            for dtype in (torch.float64, torch.float32):
                err, rel = round_trip_error(make_sde(), make(), dtype, steps, batch)
                rows.append({"sde": sde_name, "solver": name, "dtype": str(dtype).replace("torch.", ""),
                             "max_abs": err, "max_rel": rel})
    return rows


def saved_bytes(mode, steps, batch=1024, dim=64):
    """Peak bytes autograd holds for backward (samplers.gradients.SavedTensorMeter) in one forward+backward."""
    sde = VPSDE()
    mixture = problems.mixture_64d() if dim == 64 else problems.mixture_2d()
    model = Model(mixture.net(sde, "eps"), sde, "eps")
    x_T = sde.prior_sample((batch, dim), generator=torch.Generator().manual_seed(0)).double()
    with SavedTensorMeter() as meter:
        x = x_T.clone().requires_grad_(True)
        sample_grad(model, Reversible(), x, steps=steps, mode=mode, final_denoise=False).sum().backward()
    return meter.peak


def memory_table(batch=1024, dim=64, steps=(10, 100)):
    """Per mode: the peak bytes saved for backward (an exact count) for each number of steps."""
    return [{"mode": mode, **{f"saved {n}": saved_bytes(mode, n, batch, dim) / 2**20 for n in steps}}
            for mode in ("backprop", "reversible")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    trips = round_trip_table(steps=20 if args.quick else 50, batch=8 if args.quick else 64)
    print(f"{'sde':4} {'solver':26} {'dtype':8} {'max |dx_T|':>12} {'relative':>10}")
    for r in trips:
        print(f"{r['sde']:4} {r['solver']:26} {r['dtype']:8} {r['max_abs']:12.3g} {r['max_rel']:10.3g}")
    batch, dim = (64, 2) if args.quick else (1024, 64)
    memory = memory_table(batch=batch, dim=dim)
    print()
    print(f"bytes autograd holds for backward in sample_grad + backward, VP, {dim}-D mixture, batch {batch} (MiB)")
    print(f"{'mode':12} {'10 steps':>10} {'100 steps':>10} {'100/10':>7}")
    for r in memory:
        print(f"{r['mode']:12} {r['saved 10']:10.3f} {r['saved 100']:10.3f} {r['saved 100'] / r['saved 10']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"round_trip": trips, "memory": memory}, indent=1))


if __name__ == "__main__":
    main()
