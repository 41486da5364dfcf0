"""``bench quality``: every solver by NFE budget on the exact mixtures (a small run)."""

from __future__ import annotations

import math

import pytest

from samplers.cli import bench, demo, registry


def test_quality_small_run(capsys):
    pairs = [(label, f) for label, f in registry.quality_solvers()
             if label in ("Euler(eta=0)", "DPMSolver(order=2, predicts='x0')",
                          "AdaptiveDPMSolver(order=(2, 3), predicts='x0')")]
    assert len(pairs) == 3
    results = bench.quality(problems=("2d", "64d"), sdes=("vp",), budgets=(4, 40), samples=200, solver_list=pairs,
                            floor_sets=1)
    assert [(r["problem"], r["sde_name"]) for r in results] == [("2d", "vp"), ("64d", "vp")]
    for res in results:
        by = {(r["solver"], r["budget"]): r for r in res["records"]}
        assert ("Euler(eta=0)", 4) in by and ("Euler(eta=0)", 40) in by
        assert by[("Euler(eta=0)", 40)]["sw"] < by[("Euler(eta=0)", 4)]["sw"]
        assert all(math.isfinite(r["sw"]) and r["problem"] == res["problem"] for r in res["records"])
        assert any(r["solver"].startswith("AdaptiveDPMSolver") for r in res["records"])
    bench._print_quality(results)
    out = capsys.readouterr().out
    assert "64d mixture" in out and "DPMSolver(order=2, predicts='x0')" in out


def test_quality_solvers_include_the_variants_once():
    labels = [label for label, _ in registry.quality_solvers()]
    assert len(labels) == len(set(labels))
    assert set(label for label, _ in registry.solver_factories()) <= set(labels)
    assert "DPMSolver(order=3, predicts='x0', variant='singlestep')" in labels


def test_unknown_problem_is_refused():
    with pytest.raises(ValueError, match="problem must be one of"):
        demo.run_demo(problem="3d", samples=8, budgets=[3])
