"""The redesign's promise: a fixed set of runs (tests/golden_runs.py) reproduces its stored outputs
bit for bit."""

import torch

from golden_runs import PATH, compare, compute


def test_fixed_runs_are_bit_identical_to_the_stored_outputs():
    stored = torch.load(PATH)
    assert all(bool(torch.isfinite(v).all()) for v in stored.values())
    same, differ = compare(stored, compute())
    assert not differ, f"{len(differ)} of {len(stored)} runs changed: {differ}"
    assert len(same) == len(stored) >= 150
