"""The README's Python blocks, run as written: in order, in one namespace, as a reader pasting
them one after the other would (a block may use what an earlier one defined).

Blocks run in a temporary working directory holding the ``data/train`` image folder they name
(class folders ``cats`` and ``dogs`` of PNGs), with the isolated default cache of conftest.py.
A block that builds a ``loader`` (a PyTorch DataLoader) has it yield one batch: building one runs
none of the ``Dataset``'s code.
Shell commands and sample output are in ``bash`` or plain fences and are not run; a Python block
that must not run would carry a visible ``<!-- skip: next -->`` line above it (none does).
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest
from sybil import Example, Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

from tests.conftest import REPO_ROOT, age, write_images

README = REPO_ROOT / "README.md"
_EXAMPLES: list[Example] = list(
    Sybil(parsers=[PythonCodeBlockParser(), SkipParser()]).parse(README)
)
_PYTHON = [example for example in _EXAMPLES if isinstance(example.parsed, str)]


class _Readme:
    """The blocks run so far, so that any one block can be run alone after its predecessors."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done = 0

    def run_through(self, example: Example) -> None:
        index = _EXAMPLES.index(example)
        while self.done <= index:
            current = _EXAMPLES[self.done]
            self.done += 1
            if isinstance(current.parsed, str) and "torch" in current.parsed:
                pytest.importorskip("torch", reason="the PyTorch workflows need the torch extra")
            namespace = current.namespace
            before = namespace.get("loader")
            current.evaluate()
            # sybil drops __builtins__ after each block; functions the block defined still
            # run later (a transform inside the DataLoader below).
            namespace.setdefault("__builtins__", builtins)
            loader = namespace.get("loader")
            if loader is not None and loader is not before:
                images, labels = next(iter(loader))
                assert len(images) == len(labels) > 0


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> _Readme:
    folder = tmp_path_factory.mktemp("readme")
    write_images(folder / "data" / "train", count=12, classes=("cats", "dogs"))
    age(folder / "data")
    return _Readme(folder)


# Machine-dependent advice from torch (fewer CPUs here than the README's num_workers=4).
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("example", _PYTHON, ids=[f"line-{e.line}" for e in _PYTHON])
def test_readme_python_block_runs_as_written(
    example: Example, readme: _Readme, monkeypatch: pytest.MonkeyPatch
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
