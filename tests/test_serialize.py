"""serialize.dump/load: round trips of awkward values, joblib.load compatibility, damage."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import xxhash

from cachedload import serialize

Pair = collections.namedtuple("Pair", "a b")
BIG = np.arange(3 * 1024 * 1024, dtype=np.float64).reshape(1024, -1)  # 24 MiB: threaded read
SHARED = np.ones(5)

VALUES: dict[str, Any] = {
    "dict": {"a": 1, "b": [1, 2.5, "x", None]},
    "none": None,
    "array": np.arange(10),
    "empty": np.zeros((0, 3)),
    "zero-d": np.array(5),
    "scalar": np.float32(3.0),
    "big": BIG,
    "transposed": BIG.T,
    "strided": BIG[::2, ::3],
    "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "big-endian": np.arange(10, dtype=">i4"),
    "structured": np.zeros(3, dtype=[("a", "<i4"), ("b", ">f8")]),
    "strings": np.array(["x", "yy"]),
    "objects": np.array([1, "a", None], dtype=object),
    "arrays-in-objects": np.array([np.arange(3), None], dtype=object),
    "datetimes": np.arange(6).astype("M8[s]"),
    "masked": np.ma.masked_array([1, 2, 3], mask=[False, True, False]),
    "namedtuple": Pair(np.arange(3), [SHARED, SHARED]),
    "view-in-tuple": {"k": (np.arange(4)[1:], b"bytes")},
    "fortran-empty": np.zeros((2, 0, 4), order="F"),
}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.hasobject:
            return a.shape == b.shape and all(
                same(x, y) for x, y in zip(a.ravel(), b.ravel(), strict=True)
            )
        native = a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
        return native and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("mmap_mode", [None, "r", "c"])
@pytest.mark.parametrize("name", list(VALUES))
def test_round_trips_and_joblib_reads_it_too(name: str, mmap_mode: Any, tmp_path: Path) -> None:
    value, path = VALUES[name], tmp_path / "result.joblib"
    size, digest = serialize.dump(value, path)
    assert size == path.stat().st_size
    assert digest == xxhash.xxh3_128_hexdigest(path.read_bytes())
    ours = serialize.load(path, mmap_mode=mmap_mode)
    theirs = joblib.load(path, mmap_mode=mmap_mode)
    assert same(value, ours) and same(value, theirs)
    if type(value) is np.ndarray and not value.dtype.hasobject:
        assert type(ours) is type(theirs)  # np.memmap when mapped, as joblib
        assert ours.flags.f_contiguous == theirs.flags.f_contiguous
        if mmap_mode is None:
            assert ours.dtype == theirs.dtype  # native byte order, as joblib


def test_an_array_reached_twice_is_stored_once_and_restored_as_one(tmp_path: Path) -> None:
    serialize.dump(VALUES["namedtuple"], tmp_path / "r.joblib")
    back = serialize.load(tmp_path / "r.joblib", mmap_mode=None)
    assert back.b[0] is back.b[1]


def test_a_large_skeleton_is_spooled_to_disk(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(serialize, "_SPOOL_MAX", 100)
    value = {"paths": [f"p{i}" for i in range(10_000)], "x": np.arange(100)}
    serialize.dump(value, tmp_path / "r.joblib")
    assert same(serialize.load(tmp_path / "r.joblib", mmap_mode="r"), value)
    assert [p.name for p in tmp_path.iterdir()] == ["r.joblib"]


@pytest.mark.parametrize("compress", [3, True, "zlib", ("zlib", 3)])
def test_compressed_entries_are_plain_joblib(compress: Any, tmp_path: Path) -> None:
    serialize.dump(BIG, tmp_path / "r.joblib", compress=compress)
    assert same(serialize.load(tmp_path / "r.joblib", mmap_mode=None), BIG)


def test_reads_files_written_by_joblib_dump(tmp_path: Path) -> None:
    joblib.dump({"x": BIG}, tmp_path / "r.joblib")
    assert same(serialize.load(tmp_path / "r.joblib", mmap_mode="r")["x"], BIG)


@pytest.mark.parametrize("cut", [10, 100, 5000])
def test_a_truncated_file_raises(cut: int, tmp_path: Path) -> None:
    path = tmp_path / "r.joblib"
    serialize.dump({"x": BIG}, path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(Exception):  # noqa: B017 - any: the store turns it into CorruptEntry
        serialize.load(path, mmap_mode=None)


# -- out-of-core files (ArraySlot) ------------------------------------------------------------


@pytest.mark.parametrize("order", ["forward", "backward", "memmap"])
def test_slots_filled_later_read_back_like_dumped_arrays(tmp_path: Path, order: str) -> None:
    from cachedload.fingerprint import hash_file

    rows = np.random.default_rng(1).random((7, 3, 5)).astype(">f4").astype("float32")
    odd = np.arange(13, dtype=np.complex64) * (1 - 2j)
    small = np.arange(6, dtype=">i2").reshape(2, 3)
    value = {
        "rows": serialize.ArraySlot(rows.shape, rows.dtype),
        "small": small,
        "empty": serialize.ArraySlot((0, 4), np.uint16),
        "odd": serialize.ArraySlot(odd.shape, odd.dtype),
        "text": "x" * 1000,
    }
    path = tmp_path / "slotted.joblib"
    with serialize.dump_slotted(value, path) as out:
        assert [s.shape for s in out.slots] == [(7, 3, 5), (0, 4), (13,)]
        if order == "memmap":
            out.memmap(0)[:] = rows
            out.memmap(2)[:] = odd
        else:
            steps = [(0, 3), (3, 7)] if order == "forward" else [(5, 7), (0, 5)]
            for first, last in steps:
                out.write_rows(0, first, rows[first:last])
            out.write_rows(2, 0, odd)
        size, checksum = out.finish()
    assert size == path.stat().st_size and checksum == hash_file(path)
    for loaded in (
        joblib.load(path),
        joblib.load(path, mmap_mode="r"),
        serialize.load(path, mmap_mode=None),
        serialize.load(path, mmap_mode="r"),
    ):
        np.testing.assert_array_equal(loaded["rows"], rows)
        np.testing.assert_array_equal(loaded["small"], small)
        np.testing.assert_array_equal(loaded["odd"], odd)
        assert loaded["empty"].shape == (0, 4) and loaded["text"] == "x" * 1000
    assert isinstance(serialize.load(path, mmap_mode="r")["rows"], np.memmap)
    extents = serialize.array_extents(path)
    assert [e.shape for e in extents] == [(7, 3, 5), (2, 3), (0, 4), (13,)]


def test_a_slotted_file_with_copied_ranges_hashes_like_the_file(tmp_path: Path) -> None:
    from cachedload.fingerprint import hash_file

    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 64)
    path = tmp_path / "slotted.joblib"
    with serialize.dump_slotted([serialize.ArraySlot((64, 256), np.uint8)], path) as out:
        fd = os.open(source, os.O_RDONLY)
        try:
            out.copy_from(fd, 0, 0, 0, 256 * 20)
            out.write(0, 256 * 20, np.zeros(256 * 4, np.uint8))
            out.copy_from(fd, 0, 0, 256 * 24, 256 * 40)
        finally:
            os.close(fd)
        _size, checksum = out.finish()
    assert checksum == hash_file(path)
    rows = joblib.load(path)[0]
    assert (rows[:20] == np.arange(256)).all() and (rows[20:24] == 0).all()
    assert (rows[24:] == np.arange(256)).all()


def test_a_slotted_file_flushed_while_written_in_any_order_hashes_like_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachedload.fingerprint import hash_file

    # Flushed in the background every few KiB, few pieces kept in memory: every path taken.
    monkeypatch.setattr(serialize, "_EARLY_SYNC_BYTES", 4096)
    monkeypatch.setattr(serialize, "_KEPT_BYTES", 8192)
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 256)
    path = tmp_path / "slotted.joblib"
    rng = np.random.default_rng(0)
    expected = np.empty((256, 256), np.uint8)
    with serialize.dump_slotted([serialize.ArraySlot((256, 256), np.uint8)], path) as out:
        fd = os.open(source, os.O_RDONLY)
        try:
            for first in rng.permutation(range(0, 256, 16)).tolist():  # out of order
                if first % 32:
                    out.copy_from(fd, 0, 0, first * 256, 16 * 256)
                    expected[first : first + 16] = np.arange(256)
                else:
                    rows = rng.integers(0, 256, (16, 256), dtype=np.uint8)
                    for k in range(16):  # in order within, one row at a time
                        out.write_rows(0, first + k, rows[k : k + 1])
                    expected[first : first + 16] = rows
        finally:
            os.close(fd)
        _size, checksum = out.finish()
    assert checksum == hash_file(path)
    np.testing.assert_array_equal(joblib.load(path)[0], expected)
