"""Every example runs end to end with --quick (a few seconds each) and writes its outputs."""

from __future__ import annotations

import json
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
#: examples other parts of the project add; run the same way when present
OPTIONAL = ["restoration.py", "dirichlet.py"]


def _scripts():
    found = [name for name in OUTPUTS]
    found += [name for name in OPTIONAL if (EXAMPLES / name).exists()]
    return found


def _run(script, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", _scripts())
def test_example_runs_quick(script, tmp_path):
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for name in OUTPUTS.get(script, []):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, f"{script} did not write {name}"
    if script not in OUTPUTS:  # another part's example: it must at least write something
        assert any(tmp_path.iterdir()), f"{script} wrote nothing to --out"


def test_digits_resume_continues_from_the_checkpoint(tmp_path):
    first = _run("digits.py", tmp_path, "--iters", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run("digits.py", tmp_path, "--iters", "8", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert json.loads((tmp_path / "results.json").read_text())["iters"] == 8
