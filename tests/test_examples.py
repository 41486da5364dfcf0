"""Every example runs end to end with --quick (a few seconds each) and writes its outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: example -> files it must write into --out
OUTPUTS = {
    "toy_2d.py": ["samples.png", "trajectories.png", "toy_mlp.pt", "results.json"],
    "digits.py": ["checkpoint.pt", "grid_solvers.png", "inpainting.png", "guidance.png", "results.json"],
}


def _scripts():
    """Every example in examples/: ours with --out checked, the others' (restoration, dirichlet,
    inversion, ...) run with --quick from a scratch directory."""
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


def _run(script, cwd, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", _scripts())
def test_example_runs_quick(script, tmp_path):
    extra = ("--out", str(tmp_path)) if script in OUTPUTS else ()
    proc = _run(script, tmp_path, *extra)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for name in OUTPUTS.get(script, []):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, f"{script} did not write {name}"


def test_digits_resume_continues_from_the_checkpoint(tmp_path):
    import torch

    first = _run("digits.py", tmp_path, "--out", str(tmp_path), "--iters", "4", "--train-only")
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    second = _run("digits.py", tmp_path, "--out", str(tmp_path), "--iters", "8", "--resume", "--train-only")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 8
