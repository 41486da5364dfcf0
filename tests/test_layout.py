"""The library apart from its tooling: importing it pulls in no optional dependency and no ``samplers.cli``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: what only the tooling, the peers' adapters or the examples use (extras in pyproject.toml)
OPTIONAL = ("matplotlib", "torchsde", "torchdiffeq", "diffusers", "sklearn", "k_diffusion")

#: every library module (samplers/ less the cli package and the __main__ entry point)
LIBRARY = sorted(f"samplers.{p.stem}" for p in (REPO_ROOT / "samplers").glob("*.py")
                 if p.stem not in ("__init__", "__main__"))


def _imported_after(statement: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after ``statement``."""
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} | "
    code += "{m for m in sys.modules if m.startswith('samplers.')})))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_importing_the_library_imports_no_optional_dependency():
    modules = _imported_after("import sde, solvers, samplers")
    assert not modules & set(OPTIONAL), sorted(modules & set(OPTIONAL))
    assert "samplers.cli" not in modules


def test_every_library_module_imports_without_the_tooling():
    modules = _imported_after("\n".join(f"import {name}" for name in LIBRARY))
    assert not modules & set(OPTIONAL), sorted(modules & set(OPTIONAL))
    assert not {m for m in modules if m.startswith("samplers.cli")}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` (a module directly in ``package``) imports anywhere, also
    inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_tooling():
    """Not even lazily inside a function: dependencies point one way, cli -> library."""
    for path in sorted((REPO_ROOT / "samplers").glob("*.py")):
        if path.stem == "__main__":  # the entry point dispatches into samplers.cli by name
            continue
        tooling = {name for name in _imports(path, "samplers") if name == "samplers.cli" or name.startswith("samplers.cli.")}
        assert not tooling, f"{path.name} imports {sorted(tooling)}"
    for package in ("sde", "solvers"):
        for path in sorted((REPO_ROOT / package).glob("*.py")):
            assert not {n for n in _imports(path, package) if n.split(".")[0] == "samplers"}, path


def test_tooling_modules_share_one_registry():
    """No command imports another command's module for its SDEs, solvers or problems: those live in
    samplers.cli.registry (a command may still call another's functions, e.g. bench runs the demo)."""
    registry_names = {"SDES", "PROBLEMS", "exact_problem", "ORDER_MIXTURE", "EXTRA_SOLVERS", "solver_factories",
                      "QUALITY_VARIANTS", "quality_solvers", "steps_for_nfe", "SOLVER_NAMES", "ADAPTIVE_SOLVER_NAMES",
                      "solver_by_name", "KERNEL_BENCH_SOLVERS", "kernel_agreement_solvers", "sync_solvers"}
    from samplers.cli import registry

    assert registry_names <= set(registry.__all__)
    for path in sorted((REPO_ROOT / "samplers" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module not in (None, "registry"):
                borrowed = {alias.name for alias in node.names} & registry_names
                assert not borrowed, f"{path.name} imports {sorted(borrowed)} from {node.module}"


def test_ci_runs_the_readmes_check_command_with_the_linter_and_the_type_checker():
    """.ci/run installs from the project's files and runs the README's check line, word for word, and
    that line holds ruff and mypy, both configured in pyproject.toml and pinned in the dev extra."""
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    command = next(line for line in readme.splitlines() if "-m pytest" in line and line.startswith("pip install"))
    assert command in ci.splitlines()
    assert "ruff check ." in command and "&& mypy &&" in command
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert "[tool.ruff]" in pyproject and "[tool.mypy]" in pyproject
    assert '"ruff==' in pyproject and '"mypy==' in pyproject
