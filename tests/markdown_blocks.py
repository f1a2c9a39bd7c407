"""Run the Python blocks of a Markdown file as written, with sybil: in order, in one namespace,
as a reader pasting them one after the other would (a block may use what an earlier one
defined). Shared by tests/test_readme.py (README.md) and tests/test_docs.py (docs/*.md).

Blocks run in a temporary working directory holding the ``data/train`` image folder they name
(class folders ``cats`` and ``dogs`` of PNGs), with the isolated default cache of conftest.py.
A block that builds a ``loader`` (a PyTorch DataLoader) has it yield one batch: building one
runs none of the ``Dataset``'s code. Shell commands and sample output are in ``bash``, ``text``
or plain fences and are not run; a Python block that must not run carries a visible
``<!-- skip: next -->`` line above it and a sentence saying why.
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
from sybil import Example, Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

from tests.conftest import age, write_images


def examples(path: Path) -> list[Example]:
    """Every Python block (and skip marker) of the Markdown file, in order."""
    return list(Sybil(parsers=[PythonCodeBlockParser(), SkipParser()]).parse(path))


def python_blocks(found: list[Example]) -> list[Example]:
    """The Python blocks alone (sybil's skip markers are examples too)."""
    return [example for example in found if isinstance(example.parsed, str)]


def make_workspace(folder: Path) -> Path:
    """The folder the blocks run in: ``data/train`` with 12 aged PNGs in ``cats`` and ``dogs``."""
    write_images(folder / "data" / "train", count=12, classes=("cats", "dogs"))
    age(folder / "data")
    return folder


class Document:
    """The blocks of one file run so far, so that any one block can be run alone after its
    predecessors (pytest may select a single block)."""

    def __init__(self, found: list[Example], folder: Path) -> None:
        self.examples = found
        self.folder = folder
        self.done = 0

    def run_through(self, example: Example) -> None:
        index = self.examples.index(example)
        while self.done <= index:
            current = self.examples[self.done]
            self.done += 1
            if isinstance(current.parsed, str):
                for framework in ("torch", "tensorflow"):
                    if f"import {framework}" in current.parsed or f"{framework}." in current.parsed:
                        pytest.importorskip(framework, reason=f"this block needs {framework}")
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
