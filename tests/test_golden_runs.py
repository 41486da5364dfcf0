"""The redesign's promise: a fixed set of runs (tests/golden_runs.py) reproduces its stored outputs
bit for bit, except the runs a change was meant to move (listed here, with the reason and a bound)."""

import torch
from golden_runs import PATH, compare, compute

#: runs whose last bits moved on purpose: the phi functions (solvers/exponential.py) replaced two
#: copies that lost ~eps/h^k of relative accuracy at small steps (DPM-Solver's order-3 and
#: SDE-DPM-Solver++'s weights); everything else is bit-identical
PHI_ACCURACY_RUNS = {
    "EDM/sample/AdaptiveDPMSolver-23",
    "EDM/sample/DPMSolver-3-data-singlestep",
    "EDM/sample/DPMSolver-3-noise-multistep",
    "EDM/sample/DPMSolver-3-noise-singlestep",
    "VP/sample/AdaptiveDPMSolver-23",
    "VP/sample/DPMSolver-3-data-multistep",
    "VP/sample/DPMSolver-3-data-singlestep",
    "VP/sample/DPMSolver-3-noise-multistep",
    "VP/sample/DPMSolver-3-noise-singlestep",
    "VP/sample/DPMSolverSDE-2-heun-eta0.5",
    "VP/sample/DPMSolverSDE-3-heun-eta0.5",
    "VP/sample/DPMSolverSDE-3-midpoint-eta0.5",
}
#: a rounding-level bound: the samples are O(1), a changed formula would move them by far more
PHI_ACCURACY_BOUND = 1e-13


def test_fixed_runs_are_bit_identical_to_the_stored_outputs():
    stored = torch.load(PATH)
    assert all(bool(torch.isfinite(v).all()) for v in stored.values())
    same, differ = compare(stored, compute())
    unexpected = {key: diff for key, diff in differ.items() if key not in PHI_ACCURACY_RUNS}
    assert not unexpected, f"{len(unexpected)} of {len(stored)} runs changed: {unexpected}"
    assert all(differ[key] <= PHI_ACCURACY_BOUND for key in differ), differ
    assert len(same) + len(differ) == len(stored) >= 150
    assert len(same) >= len(stored) - len(PHI_ACCURACY_RUNS)
