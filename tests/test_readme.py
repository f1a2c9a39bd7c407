"""The README: short, with the set-up commands CI runs, and its Python blocks run as written
(the harness: tests/markdown_blocks.py). The workflows live on the docs pages (test_docs.py)."""

from __future__ import annotations

import re

import pytest
from sybil import Example

from tests.conftest import REPO_ROOT
from tests.markdown_blocks import Document, examples, make_workspace, python_blocks

README = REPO_ROOT / "README.md"
_EXAMPLES = examples(README)
_PYTHON = python_blocks(_EXAMPLES)


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> Document:
    return Document(_EXAMPLES, make_workspace(tmp_path_factory.mktemp("readme")))


@pytest.mark.parametrize("example", _PYTHON, ids=[f"line-{e.line}" for e in _PYTHON])
def test_readme_python_block_runs_as_written(
    example: Example, readme: Document, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(readme.folder)
    readme.run_through(example)


def test_the_readme_is_at_most_8_kb() -> None:
    assert len(README.read_bytes()) <= 8 * 1024


def test_the_readme_s_test_command_is_what_ci_runs() -> None:
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text)
    assert commands[0] == (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/cachedload demo"
    )
    assert commands[1] in (REPO_ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_shows_the_essentials() -> None:
    text = README.read_text()
    quick_start = text.index("## Quick start")
    read_only = text.index("arrays are read-only")
    assert quick_start < read_only < text.index("\n## ", quick_start + 1)  # next to mmap_mode
    assert "cached_image_folder(" in text
    box = re.findall(r"^> - \*\*(Recomputes|Not tracked|Remedies)", text, re.MULTILINE)
    assert len(box) == 5


def test_the_readme_links_every_docs_page() -> None:
    text = README.read_text()
    linked = set(re.findall(r"\]\(docs/([\w./-]+?)(?:#[\w-]+)?\)", text))
    pages = {page.name for page in (REPO_ROOT / "docs").glob("*.md")}
    assert pages <= linked, pages - linked
    for target in linked:
        assert (REPO_ROOT / "docs" / target).is_file(), target
    assert "mkdocs serve" in text
