"""Every ```python block in README.md and docs/ runs (blocks of one file share a namespace,
in order), so the docs cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FILES = [p for p in PAGES if BLOCK.search(p.read_text())]


def test_docs_exist():
    assert (ROOT / "docs" / "index.md").is_file()
    assert (ROOT / "README.md") in FILES, "the README's example must be executable"
    assert len(FILES) >= 5, f"too few pages with executable examples: {FILES}"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_python_blocks_run(path: Path, tmp_path, monkeypatch):
    blocks = BLOCK.findall(path.read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # make the failing block visible
            raise AssertionError(f"{path.relative_to(ROOT)} block {i} failed: {err!r}\n{block}") from err
