"""``python -m samplers bench evodiff``: EVODiff at few network calls beside DPM-Solver++(2M), UniPC and ER-SDE,
and the measurements behind each constant of :class:`solvers.EVODiff`.

Every run starts from the same x_T (keyed by the seed) and ends at sigma = 0 on a grid uniform in log-SNR
(``grid(..., to_zero=True)``: NFE network calls for NFE steps, the last one the x0 estimate).  Measures, all
without a Monte Carlo floor of a two-sample distance (:mod:`samplers.problems`):

* ``rms``: the distance to the exact probability-flow ODE solution from the same x_T
  (:func:`samplers.problems.reference_endpoint`); for the stochastic ER-SDE it measures how far the SDE's
  path lands from the ODE's, not an error;
* ``mode_error``: the per-mode Frechet error (weighted by the exact weights), ``weight_tv``: the total
  variation between the mode weights (:func:`samplers.problems.mode_error`); beside them ``floor``: the same
  measures of the exact endpoint samples themselves.

``EVODiff [ref. protocol]`` is the reference code's own budget: NFE steps to t_min, no x0 estimate at the end.
``--ablation`` runs EVODiff with each reference constant replaced by its neutral alternative.  ``--digits``
adds the trained digits network of examples/digits.py (distance to a 500-step DPM-Solver++(2M) run from the
same noise), where its checkpoint exists.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

import torch

from .registry import SDES

__all__ = ["low_nfe_comparison", "constant_ablation", "digits_comparison", "main"]

F64 = torch.float64
BUDGETS = (5, 6, 8, 10, 20)
PROBLEM_BUILDERS = {"2d": "mixture_2d", "64d": "mixture_64d", "widths": "mixture_widths", "weights": "mixture_weights"}


def _solvers() -> list[tuple[str, Callable, str]]:
    """(label, factory, protocol): "to_zero" (NFE steps to sigma = 0) or "t_min" (NFE steps, no x0 estimate)."""
    from solvers import ERSDE, DPMSolver, EVODiff, UniPC

    return [
        ("EVODiff()", EVODiff, "to_zero"),
        ("EVODiff(last_step='evodiff')", lambda: EVODiff(last_step="evodiff"), "to_zero"),
        ("EVODiff(last_step='evodiff') [ref. protocol]", lambda: EVODiff(last_step="evodiff"), "t_min"),
        # lower_order_final=True: what docs/measurements.md's EVODiff table ran (the default has since kept the
        # order on grids ending at sigma = 0)
        ("DPMSolver(2, lower_order_final=True)", lambda: DPMSolver(2, lower_order_final=True), "to_zero"),
        ("UniPC(lower_order_final=True)", lambda: UniPC(lower_order_final=True), "to_zero"),
        ("ERSDE()", ERSDE, "to_zero"),
        ("ERSDE(noise_scale='ode')", lambda: ERSDE(noise_scale="ode"), "to_zero"),
    ]


def _ablations() -> list[tuple[str, Callable, str]]:
    """EVODiff with one constant of the reference replaced: the measurement behind each class attribute."""
    from solvers import EVODiff

    def variant(**attrs):
        def make():
            solver = EVODiff()  # the library's defaults (DDIM last step, zeta_shift 0)
            for name, value in attrs.items():
                setattr(solver, name, value)
            return solver
        return make

    return [
        ("EVODiff()", EVODiff, "to_zero"),
        ("projection_clamp=inf", variant(projection_clamp=math.inf), "to_zero"),
        ("projection_clamp=1", variant(projection_clamp=1.0), "to_zero"),
        ("temperature=0 (r_i = r_logh / 2)", variant(temperature=0.0), "to_zero"),
        ("temperature=1", variant(temperature=1.0), "to_zero"),
        ("zeta_shift=0.5 (the reference's)", variant(zeta_shift=0.5), "to_zero"),
        ("zeta_shift=1", variant(zeta_shift=1.0), "to_zero"),
        ("gate_steps=0 (always gated)", variant(gate_steps=0), "to_zero"),
        ("last_step='evodiff'", lambda: EVODiff(last_step="evodiff"), "to_zero"),
        ("EVODiff() [ref. protocol]", EVODiff, "t_min"),
        ("last_step='evodiff' [ref. protocol]", lambda: EVODiff(last_step="evodiff"), "t_min"),
    ]


def _run(model, solver, x_T, sde, nfe: int, protocol: str) -> torch.Tensor:
    from .. import grid, sample

    if protocol == "to_zero":
        return sample(model, solver, x_T=x_T, grid=grid(sde, nfe, "log_snr", to_zero=True), dtype=F64)
    return sample(model, solver, x_T=x_T, grid=grid(sde, nfe, "log_snr"), final_denoise=False, dtype=F64)


def low_nfe_comparison(problems=("2d", "64d"), sdes=("vp", "edm"), budgets=BUDGETS, samples: int = 1000,
                       seed: int = 0, solver_list=None, log=None) -> list[dict]:
    """One record per (problem, SDE, solver, NFE): rms, mode_error, weight_tv, and the exact samples' floor."""
    from .. import Model
    from .. import problems as prob

    rows = []
    for problem in problems:
        mixture = getattr(prob, PROBLEM_BUILDERS[problem])()
        for sde_name in sdes:
            sde = SDES[sde_name]()
            model = Model(mixture.net(sde, "x0"), sde, predicts="x0")
            gen = torch.Generator().manual_seed(seed)
            x_T = torch.randn(samples, mixture.dim, generator=gen, dtype=F64) * float(sde.prior_std)
            exact = prob.reference_endpoint(mixture, sde, x_T, rtol=1e-9, atol=1e-9)
            floor = prob.mode_error(exact, mixture)
            for label, factory, protocol in (solver_list or _solvers()):
                for nfe in budgets:
                    x = _run(model, factory(), x_T, sde, nfe, protocol)
                    errors = prob.mode_error(x, mixture)
                    row = {"problem": problem, "sde": sde_name, "solver": label, "nfe": nfe,
                           "rms": prob.rms_distance(x, exact), **errors,
                           "floor_mode_error": floor["mode_error"], "floor_weight_tv": floor["weight_tv"]}
                    rows.append(row)
                    if log:
                        log(row)
    return rows


def constant_ablation(problems=("2d", "64d"), sdes=("vp", "edm"), budgets=BUDGETS, samples: int = 1000,
                      seed: int = 0, log=None) -> list[dict]:
    """:func:`low_nfe_comparison` over EVODiff with each reference constant replaced (:func:`_ablations`)."""
    return low_nfe_comparison(problems, sdes, budgets, samples, seed, solver_list=_ablations(), log=log)


def digits_comparison(checkpoint: str, budgets=BUDGETS, samples: int = 64, seed: int = 0, reference_steps: int = 500,
                      solver_list=None, log=None) -> list[dict]:
    """The trained digits network (examples/digits.py's checkpoint): RMS distance per pixel to a
    ``reference_steps``-step DPM-Solver++(2M) run from the same noise, per solver and NFE."""
    import importlib.util
    from pathlib import Path

    from sde import VPSDE
    from solvers import DPMSolver

    from .. import Model, grid, sample

    path = Path(__file__).resolve().parents[2] / "examples" / "digits.py"
    spec = importlib.util.spec_from_file_location("digits_example", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"examples/digits.py not found at {path}")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    _, ema, _ = digits.load_checkpoint(checkpoint)
    sde = VPSDE()  # the example trains an eps network of the VP SDE on (1, 8, 8) digits
    model = Model(ema.eval(), sde, predicts="eps")
    shape = (samples, 1, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * float(sde.prior_std)
    with torch.no_grad():
        exact = sample(model, DPMSolver(2), x_T=x_T, grid=grid(sde, reference_steps, "log_snr", to_zero=True))
    rows = []
    for label, factory, protocol in (solver_list or _solvers()):
        for nfe in budgets:
            with torch.no_grad():
                if protocol == "to_zero":
                    x = sample(model, factory(), x_T=x_T, grid=grid(sde, nfe, "log_snr", to_zero=True))
                else:
                    x = sample(model, factory(), x_T=x_T, grid=grid(sde, nfe, "log_snr"), final_denoise=False)
            row = {"problem": "digits", "sde": type(sde).__name__, "solver": label, "nfe": nfe,
                   "rms": float((x - exact).pow(2).mean().sqrt())}
            rows.append(row)
            if log:
                log(row)
    return rows


def print_table(rows: list[dict], measure: str, out=print) -> None:
    """A markdown table of ``measure`` per (problem, SDE, solver) against NFE."""
    budgets = sorted({r["nfe"] for r in rows})
    out(f"\n{measure}:\n")
    out("| problem | SDE | solver | " + " | ".join(f"NFE {n}" for n in budgets) + " |")
    out("|---|---|---|" + "---|" * len(budgets))
    keys = list(dict.fromkeys((r["problem"], r["sde"], r["solver"]) for r in rows))
    for key in keys:
        by_nfe = {r["nfe"]: r[measure] for r in rows if (r["problem"], r["sde"], r["solver"]) == key}
        cells = []
        best = {n: min(r[measure] for r in rows if (r["problem"], r["sde"]) == key[:2] and r["nfe"] == n)
                for n in budgets}
        for n in budgets:
            v = by_nfe.get(n, float("nan"))
            cells.append(f"**{v:.3g}**" if v == best[n] else f"{v:.3g}")
        out(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samplers bench evodiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=["2d", "64d"], choices=sorted(PROBLEM_BUILDERS))
    parser.add_argument("--sdes", nargs="+", default=["vp", "edm"], choices=sorted(SDES))
    parser.add_argument("--nfe", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation", action="store_true", help="EVODiff with each reference constant replaced")
    parser.add_argument("--digits", metavar="CHECKPOINT", help="also the trained digits network of this checkpoint")
    parser.add_argument("--json", help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    run = constant_ablation if args.ablation else low_nfe_comparison
    rows = run(tuple(args.problems), tuple(args.sdes), tuple(args.nfe), args.samples, args.seed)
    for measure in ("rms", "mode_error", "weight_tv"):
        print_table(rows, measure)
    floors = {(r["problem"], r["sde"]): (r["floor_mode_error"], r["floor_weight_tv"]) for r in rows}
    for (problem, sde), (mode, tv) in floors.items():
        print(f"exact samples, {problem} {sde}: mode_error {mode:.3g}, weight_tv {tv:.3g}")
    if args.digits:
        digit_rows = digits_comparison(args.digits, tuple(args.nfe), seed=args.seed)
        print_table(digit_rows, "rms")
        rows += digit_rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
