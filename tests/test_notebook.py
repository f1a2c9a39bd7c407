"""docs/notebooks/quickstart.ipynb, run by a real Jupyter kernel (nbclient + ipykernel) twice,
each time in a fresh kernel: the first run stores the loader's result, the second is a hit.

The kernel inherits this process's environment: the isolated ``$CACHEDLOAD_DIR`` and
``$XDG_CACHE_HOME`` of conftest.py, and ``$PYTHONPATH`` naming this checkout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = REPO_ROOT / "docs" / "notebooks" / "quickstart.ipynb"


def _execute(folder: Path) -> Any:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()  # a new kernel, shut down at the end
    return notebook


def _text(notebook: Any) -> str:
    """Everything the cells printed (stdout, stderr, results)."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_the_quickstart_notebook_hits_on_its_second_run_in_a_fresh_kernel(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)

    first = _text(_execute(tmp_path))
    assert re.search(r"CacheInfo\(hits=0, misses=1, stores=1, entries=1", first), first
    second_notebook = _execute(tmp_path)
    second = _text(second_notebook)
    assert re.search(r"CacheInfo\(hits=1, misses=0, stores=0, entries=1", second), second
    assert re.search(r"cachedload INFO hit ", second), second  # the logger says so too
    assert "read-only: True" in second
    images = [
        output
        for cell in second_notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1  # the grid
    assert list(isolated_cache.iterdir())  # the entries went to the isolated cache
