"""Every ```python block of the README and of docs/ runs (blocks of one file share a namespace)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_docs_have_examples():
    assert sum(len(BLOCK.findall(f.read_text())) for f in FILES) >= 6


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_doc_examples_run(path, capsys):
    namespace = {"__name__": f"doc_{path.stem}"}
    for i, block in enumerate(BLOCK.findall(path.read_text())):
        code = compile(block, f"{path.name}[block {i}]", "exec")
        exec(code, namespace)
