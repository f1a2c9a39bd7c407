"""An incremental build trusts its previous entry no more than a hit does.

The rows a ``.map`` rebuild copies come from the cache directory, untrusted input: a damaged,
crafted or tampered previous entry gives a full build (right rows), never copied wrong rows, a
laundered entry (damaged rows in a new entry with a valid checksum or signature) or code run
from a cache others can write.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import CachedDataset, ConfigurationError, cached_dataset
from cachedload.builder import Item, ItemTable, _classify
from cachedload.options import Options

ROWS = 5


class _Unreadable(ValueError):
    """What read_row raises for a file that says "unreadable"."""


def read_row(path: str) -> Any:
    """A file's first 16 bytes as a row (its text: "row 3")."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data == b"unreadable":
        raise _Unreadable(path)
    return np.frombuffer(data.ljust(16, b"\0")[:16], np.uint8).copy()


def folder_of_rows(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for index in range(ROWS):
        path = root / f"x{index}.txt"
        path.write_text(f"row {index}")
        os.utime(path, (time.time() - 100,) * 2)  # not racy
    return root


def loader(cache: Path, **options: Any) -> CachedDataset[..., Any]:
    return CachedDataset(read_row, Options(per_item="path", cache_dir=cache, **options))


def shared_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    os.chmod(cache, 0o2770)  # group-writable: others can write it (shared=True declares it)
    return cache


def data_file(cache: Path) -> Path:
    (found,) = cache.glob("*/*/result.joblib")
    return found


def rows_text(result: Any) -> list[bytes]:
    return [bytes(row).rstrip(b"\0") for row in np.asarray(result.array)]


def change_one(root: Path) -> None:
    (root / "x3.txt").write_text("changed")  # the next call is an incremental rebuild


def expected(root: Path) -> list[bytes]:
    """The rows of a build from scratch (the unreadable files left out)."""
    rows = []
    for path in sorted(root.iterdir()):
        if path.read_bytes() != b"unreadable":
            rows.append(read_row(str(path)).tobytes().rstrip(b"\0"))
    return rows


def edit_meta(cache: Path, change: Any) -> None:
    (path,) = cache.glob("*/*/meta.json")
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def plant_index(data: Path, payload: Any) -> None:
    """Replace the data file's index with another pickle (same file size)."""
    raw = bytearray(data.read_bytes())
    head, magic = b"\x80\x04\x8e", b"cachedload-index\0"
    index_len = struct.unpack_from("<Q", raw, len(head))[0]
    planted = magic + pickle.dumps(payload, protocol=4)
    assert raw[len(head) + 8 : len(head) + 8 + len(magic)] == magic and len(planted) <= index_len
    raw[len(head) + 8 : len(head) + 8 + len(planted)] = planted
    data.write_bytes(bytes(raw))


class _Touch:
    """Unpickled, it runs code: creates a file (a short relative name: the planted pickle must
    fit in the index it replaces)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["named-but-has-a-row", "has-no-row-but-not-named"])
def test_skipped_files_that_do_not_match_the_rows_give_a_full_build(
    tmp_path: Path, how: str
) -> None:
    root, cache = folder_of_rows(tmp_path), tmp_path / "cache"
    # Its records say which file each row holds: the files minus those meta.json calls
    # skipped. A list that does not match the rows would shift every row after it.
    load = loader(cache)
    skip: Any = ValueError
    if how == "named-but-has-a-row":
        load.map(root, skip=skip)
        edit_meta(cache, lambda meta: meta.update(skipped=["x0.txt"]))
    else:
        (root / "x1.txt").write_text("unreadable")
        with pytest.warns(Warning):
            load.map(root, skip=_Unreadable)
        edit_meta(cache, lambda meta: meta.pop("skipped"))
        skip = _Unreadable
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load.map(root, skip=skip)
    assert rows_text(result) == expected(root)


def _flip_row_1(cache: Path) -> None:
    data = data_file(cache)
    raw = bytearray(data.read_bytes())
    at = raw.find(b"row 1")
    raw[at : at + 5] = b"EVIL!"
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("options", [{"verify": "always"}, {"shared": True, "signing_key": "k"}])
def test_a_damaged_or_tampered_previous_entry_is_not_copied_into_a_new_one(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    root = folder_of_rows(tmp_path)
    cache = shared_cache(tmp_path) if options.get("shared") else tmp_path / "cache"
    load = loader(cache, **options)
    load.map(root)
    _flip_row_1(cache)  # same size: only a checksum (or the signature over it) tells
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = load.map(root)
        again = load.map(root)  # the new entry, as a verified hit reads it
    assert rows_text(rebuilt) == expected(root) and rows_text(again) == expected(root)


def test_a_shared_cache_s_previous_index_is_never_unpickled_unrestricted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = folder_of_rows(tmp_path), shared_cache(tmp_path)
    load = loader(cache, shared=True)
    load.map(root)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    plant_index(data_file(cache), _Touch("ran"))
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load.map(root)
    assert not marker.exists()
    assert rows_text(result) == expected(root)


def test_a_shared_cache_s_previous_ragged_rows_are_never_unpickled_unrestricted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = folder_of_rows(tmp_path), shared_cache(tmp_path)
    load = loader(cache, shared=True)
    load.map(root, ragged=True)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    data = data_file(cache)
    size = data.stat().st_size
    planted = pickle.dumps(_Touch("ran"), protocol=4)
    data.write_bytes(planted + b"\0" * (size - len(planted)))  # a plain pickle, same size
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load.map(root, ragged=True)
    assert not marker.exists()
    assert [bytes(row).rstrip(b"\0") for row in result.array] == expected(root)


@pytest.mark.parametrize(
    "payload", [5, (1, 2), ("x", 0, [], b""), (1, 0, [(np.dtype("u1"),)], b"")]
)
def test_a_garbled_previous_index_gives_a_full_build(tmp_path: Path, payload: Any) -> None:
    root, cache = folder_of_rows(tmp_path), tmp_path / "cache"
    load = loader(cache)
    load.map(root)
    plant_index(data_file(cache), payload)
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load.map(root)
    assert rows_text(result) == expected(root)


def test_a_racy_file_removed_before_it_is_hashed_is_a_change_not_a_failure(
    tmp_path: Path,
) -> None:
    (tmp_path / "here.txt").write_text("1")
    now = time.time_ns()
    items = [
        Item("gone.txt", str(tmp_path / "gone.txt"), 1, now),  # listed, then removed
        Item("here.txt", str(tmp_path / "here.txt"), 1, now),
    ]
    plan = _classify(ItemTable.of(items), None, 0, now)
    assert plan.compute == [0, 1]  # both computed: the item function says what is wrong
    assert plan.digests["gone.txt"] != plan.digests["here.txt"]
    assert len(plan.digests["here.txt"]) == 32  # a real digest; the gone one matches no file's


def test_map_checks_n_jobs_and_the_files_it_is_given(tmp_path: Path) -> None:
    root = folder_of_rows(tmp_path)
    load = cached_dataset(per_item="path", cache_dir=tmp_path / "cache")(read_row)
    bad: Any
    for bad in (0, -0.5, "two", True):
        with pytest.raises(ConfigurationError) as caught:
            load.map(root, n_jobs=bad)
        assert caught.value.option == "n_jobs"
    with pytest.raises(ConfigurationError, match="which is not a file"):
        load.map([root, root / "x0.txt"])
    # A pattern selects among listed files as in a folder (relative to their common folder).
    files = sorted(root.iterdir())
    (root / "note.md").write_text("not a row")
    assert load.map([*files, root / "note.md"], pattern="*.txt").paths == tuple(
        p.name for p in files
    )
    with pytest.raises(ConfigurationError, match="matches none of the 1 files listed"):
        load.map([root / "note.md"], pattern="*.txt")
