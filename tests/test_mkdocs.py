"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing pages, nav
entries without a file and docstring-reference errors all fail it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists()
    reference = (site / "reference" / "index.html").read_text()
    assert "DPMSolver" in reference and "VPSDE" in reference  # the API pages came from the docstrings


def test_every_page_is_in_the_nav():
    """A page missing from the nav is easy to lose; the nav lists every docs/*.md and nothing else."""
    nav = set(re.findall(r":\s*([\w\-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert nav == pages, f"in docs/ but not in the nav: {sorted(pages - nav)}; in the nav but missing: {sorted(nav - pages)}"


def test_the_docstring_style_of_mkdocs_is_the_codes():
    """mkdocstrings parses the sections of the code's docstrings (``Parameters`` over a dashed rule:
    numpy style); a Google ``Args:`` or a Sphinx ``:param x:`` would be rendered as prose."""
    style = re.search(r"docstring_style:\s*(\w+)", (ROOT / "mkdocs.yml").read_text())
    assert style and style.group(1) == "numpy"
    sources = [p for package in ("sde", "solvers", "samplers") for p in (ROOT / package).rglob("*.py")]
    numpy_sections = 0
    for path in sources:
        text = path.read_text()
        assert not re.search(r"^\s*(Args|Arguments|Returns|Raises):\s*$", text, re.MULTILINE), path
        assert not re.search(r":param \w+:|:returns?:", text), path
        numpy_sections += len(re.findall(r"^\s*(Parameters|Returns|Notes)\n\s*-{3,}\s*$", text, re.MULTILINE))
    assert numpy_sections >= 10
