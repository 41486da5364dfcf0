"""``python -m samplers demo``: runs end to end, writes its PNG and JSON, and its errors converge."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samplers.cli import demo, registry
from solvers import Euler, EulerMaruyama, Heun, SolverBase

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    png, js = tmp / "demo.png", tmp / "demo.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-m", "samplers", "demo", "--quick", "--out", str(png), "--json", str(js)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"demo failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, png, json.loads(js.read_text())


def _by_solver(records):
    out = {}
    for rec in records:
        out.setdefault(rec["solver"], []).append(rec)
    return {k: sorted(v, key=lambda r: r["nfe"]) for k, v in out.items()}


def test_demo_writes_png(quick_run):
    _, png, _ = quick_run
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_prints_table_and_floor(quick_run):
    proc, _, records = quick_run
    assert "SW error" in proc.stdout and "error floor" in proc.stdout
    for rec in records:
        assert rec["solver"] in proc.stdout


def test_demo_json_has_a_record_per_solver_and_budget(quick_run):
    _, _, records = quick_run
    assert isinstance(records, list) and records
    labels = [label for label, _ in registry.solver_factories()]
    expected = set()
    adaptive = set()
    for label, factory in registry.solver_factories():
        solver = factory()
        if getattr(solver, "adaptive", False):
            adaptive.add(label)
            continue
        for budget in demo.QUICK_BUDGETS:
            steps = registry.steps_for_nfe(solver, budget)
            if steps >= 1:  # Restart's restarts add to its steps' calls
                expected.add((label, solver.nfe(steps) if hasattr(solver, "nfe") else steps * solver.nfe_per_step + 1))
    got = [(r["solver"], r["nfe"]) for r in records]
    assert len(got) == len(set(got)), "one record per (solver, NFE)"
    assert {g for g in got if g[0] not in adaptive} == expected
    # adaptive solvers: a tolerance ladder, each run shown under a budget its mean NFE fits in
    assert adaptive and all(any(r["solver"] == a for r in records) for a in adaptive)
    for rec in records:
        if rec["solver"] in adaptive:
            lo, hi = rec["nfe_per_sample"]
            assert lo <= rec["nfe"] <= hi and rec["rtol"] in demo.ADAPTIVE_TOLERANCES
    assert {r["solver"] for r in records} == set(labels)
    for label in ("EulerMaruyama(eta=1)", "Euler(eta=0)", "Heun(eta=0)", "Heun(eta=1)"):
        assert label in labels
    for rec in records:
        assert rec["nfe"] <= rec["budget"]
        assert math.isfinite(rec["sw"]) and rec["sw"] >= 0
        assert math.isfinite(rec["time_ms"]) and rec["time_ms"] >= 0
        assert rec["steps"] >= 1


def test_demo_errors_converge(quick_run):
    _, _, records = quick_run
    by_solver = _by_solver(records)
    heun_best = by_solver["Heun(eta=0)"][-1]
    euler_worst = by_solver["Euler(eta=0)"][0]
    assert heun_best["sw"] < euler_worst["sw"], (heun_best, euler_worst)
    for label, recs in by_solver.items():
        if "rtol" in recs[0]:  # adaptive: as many runs as tolerances fit in the budgets
            assert all(r["sw"] < euler_worst["sw"] for r in recs), (label, recs)
            continue
        assert len(recs) >= 2, label
        assert recs[-1]["sw"] < recs[0]["sw"], (label, [(r["nfe"], r["sw"]) for r in recs])
    # converged runs sit near the error floor (a perfect sampler's distance), not far above it
    floor = records[0]["sw_floor"]
    assert 0 < floor < by_solver["Euler(eta=0)"][0]["sw"]
    assert by_solver["Heun(eta=0)"][-1]["sw"] < 3 * floor


def test_steps_for_nfe():
    assert registry.steps_for_nfe(Euler(), 5) == 4
    assert registry.steps_for_nfe(Heun(), 5) == 2
    assert registry.steps_for_nfe(Heun(), 10) == 4
    assert registry.steps_for_nfe(Heun(), 2) == 0
    assert registry.steps_for_nfe(Euler(), 10, final_denoise=False) == 10


def test_solver_factories_discovers_solvers_without_duplicates():
    pairs = registry.solver_factories()
    labels = [label for label, _ in pairs]
    assert len(labels) == len(set(labels))
    for label, factory in pairs:
        solver = factory()
        assert isinstance(solver, SolverBase)  # fixed-grid and adaptive solvers alike
        assert label == repr(solver)
    assert repr(EulerMaruyama(eta=1)) in labels and repr(Heun(eta=1.0)) in labels


def test_solver_factories_runs_restart_and_shows_a_broken_solver(monkeypatch):
    """Restart() constructs (it was dropped silently: its defaults raised TypeError), and a solver whose
    defaults raise is an error to see, not a solver the demo leaves out quietly."""
    labels = [label for label, _ in registry.solver_factories()]
    assert "Restart(ode_solver=Heun(eta=0), s_noise=1)" in labels

    def broken():
        raise RuntimeError("defaults broken")

    monkeypatch.setattr(registry, "EXTRA_SOLVERS", [*registry.EXTRA_SOLVERS, (None, broken)])
    with pytest.raises(RuntimeError, match="defaults broken"):
        registry.solver_factories()


def test_run_demo_reports_refusals_and_raises_bugs():
    """A run the library refuses (ValueError: the reverse SDE at alpha = 0 on rf) is reported as skipped with
    its reason; any other error (a RuntimeError from inside a step) was reported the same way, and is raised."""

    class BrokenEuler(Euler):
        def step(self, k, x, ctx):
            raise RuntimeError("a bug inside the step")

    with pytest.raises(RuntimeError, match="a bug inside the step"):
        demo.run_demo(samples=16, budgets=[3], projections=4, floor_sets=1, solver_list=[("broken", BrokenEuler)])
    result = demo.run_demo(sde="rf", samples=16, budgets=[3], projections=4, floor_sets=1,
                           solver_list=[("EulerMaruyama(eta=1)", lambda: EulerMaruyama(eta=1.0))])
    ((label, budget, reason),) = result["skipped"]
    assert label == "EulerMaruyama(eta=1)" and reason.startswith("ValueError: ") and "singular" in reason


def test_run_demo_in_process_tiny(tmp_path):
    pairs = [(label, f) for label, f in registry.solver_factories() if label in ("Euler(eta=0)", "Heun(eta=1)")]
    result = demo.run_demo(samples=64, budgets=[1, 3, 7], solver_list=pairs, projections=16, floor_sets=2)
    recs = result["records"]
    # Heun cannot take a step with 1 or 2 NFE: that budget is skipped, not run
    assert sorted((r["solver"], r["nfe"]) for r in recs) == [
        ("Euler(eta=0)", 3), ("Euler(eta=0)", 7), ("Heun(eta=1)", 3), ("Heun(eta=1)", 7)]
    assert [(s, b) for s, b, _ in result["skipped"]] == [("Euler(eta=0)", 1), ("Heun(eta=1)", 1)]
    assert all(math.isfinite(r["sw"]) for r in recs)
    assert result["floor"] > 0 and result["exact"].shape == (64, 2)
    assert set(result["samples"]) == {(r["solver"], r["nfe"]) for r in recs}
    png = demo.plot(result, str(tmp_path / "sub" / "tiny.png"))
    assert Path(png).stat().st_size > 0


def test_run_demo_rf_skips_reverse_sde_at_alpha_zero():
    pairs = [(label, f) for label, f in registry.solver_factories() if label in ("Euler(eta=0)", "EulerMaruyama(eta=1)")]
    result = demo.run_demo(sde="rf", samples=32, budgets=[4], solver_list=pairs, projections=8, floor_sets=1)
    assert [r["solver"] for r in result["records"]] == ["Euler(eta=0)"]
    assert [s for s, _, _ in result["skipped"]] == ["EulerMaruyama(eta=1)"]


def test_run_demo_rejects_bad_settings():
    with pytest.raises(ValueError, match="sde"):
        demo.run_demo(sde="nope", samples=8, budgets=[3])
    with pytest.raises(ValueError, match="budgets"):
        demo.run_demo(samples=8, budgets=[0])


def test_cli_dispatch_help():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    top = subprocess.run([sys.executable, "-m", "samplers", "--help"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "demo" in top.stdout and "bench" in top.stdout
    sub = subprocess.run([sys.executable, "-m", "samplers", "demo", "--help"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0 and "--quick" in sub.stdout and "--sde" in sub.stdout
    bad = subprocess.run([sys.executable, "-m", "samplers", "nope"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2


def test_demo_without_matplotlib_says_so_before_running(monkeypatch, capsys):
    """matplotlib is an extra: the demo names it (and --no-plot) up front instead of failing after the runs."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--quick"])
    assert exit_info.value.code == 2
    assert "score-samplers[plots]" in capsys.readouterr().err


def test_run_demo_nfe_grid_and_optimize_grid_runs():
    # bench quality --nfe-grid --optimize-grid: the same solver on the default grid, on grid_for_nfe's and on a
    # grid fitted from it on other noise; at 4 calls on the ring the fitted grid lands nearer the exact
    # endpoint than its start (measured 0.17 -> about 0.1 in RMS on 8000 samples)
    from solvers import UniPC

    pairs = [("UniPC(lof=False)", lambda: UniPC(lower_order_final=False))]
    result = demo.run_demo(sde="vp", samples=400, budgets=[4], solver_list=pairs, projections=8, floor_sets=1,
                           reference_samples=400, nfe_grid=True, optimize=True)
    by_label = {rec["solver"]: rec for rec in result["records"]}
    plain, on_grid = by_label["UniPC(lof=False)"], by_label["UniPC(lof=False)" + demo.NFE_GRID_SUFFIX]
    fitted = by_label["UniPC(lof=False)" + demo.OPTIMIZED_SUFFIX]
    assert plain["nfe"] == on_grid["nfe"] == fitted["nfe"] == 4
    assert fitted["fit_seconds"] > 0
    assert fitted["ref_rms"] < 0.8 * on_grid["ref_rms"] < 0.8 * plain["ref_rms"]
