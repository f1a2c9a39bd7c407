"""The entry format (cachedload.entry): metadata checks, the scan of entry folders, leftovers,
and an entry written before issue 13 that must still be a hit."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import fixture_loader


def test_an_entry_written_by_the_previous_version_is_a_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(fixture_loader.CACHE, cache)  # a hit appends to <key>.used
    source = tmp_path / "source"
    shutil.copytree(fixture_loader.SOURCE, source)
    for path in source.iterdir():
        os.utime(path, (fixture_loader.SOURCE_MTIME, fixture_loader.SOURCE_MTIME))
    monkeypatch.setenv("CACHEDLOAD_DIR", str(cache))
    before = fixture_loader.CALLS[0]

    value = fixture_loader.load_numbers(source)

    assert fixture_loader.CALLS[0] == before, "the body ran: the old entry was not a hit"
    assert sorted(value) == ["a", "b"]
    np.testing.assert_array_equal(value["a"], [6, 2, 8, 2, 10])
    np.testing.assert_array_equal(value["b"], [18, 4, 12])
