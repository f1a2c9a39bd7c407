"""The README's Python blocks, run as written (the harness: tests/markdown_blocks.py)."""

from __future__ import annotations

from typing import Any

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


# Machine-dependent advice from torch (fewer CPUs here than the README's num_workers=4).
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("example", _PYTHON, ids=[f"line-{e.line}" for e in _PYTHON])
def test_readme_python_block_runs_as_written(
    example: Example, readme: Document, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(readme.folder)
    readme.run_through(example)


def test_the_readme_has_python_blocks_for_every_workflow() -> None:
    texts: list[Any] = [example.parsed for example in _PYTHON]
    assert len(texts) >= 7
    assert any("MappedImages(load_train" in text for text in texts)  # 1. in memory
    assert any("num_workers=" in text for text in texts)  # 2. larger than RAM, workers
    assert any("index_of(" in text for text in texts)  # 3. per-item lookup
    assert any("class HandWrittenMappedImages" in text for text in texts)
    assert any("cachedload.tf.dataset(" in text for text in texts)
