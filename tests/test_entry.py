"""The entry format (cachedload.entry): metadata checks, the scan of entry folders, leftovers,
and an entry written before issue 13 that must still be a hit."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

import cachedload
from cachedload import entry
from cachedload.per_item import _prepare, _request
from tests import fixture_items, fixture_loader


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


def _unrecorded_items_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The checked-in per-item entry whose metadata does not record its manifest (written
    before it did), and its source folder, copied into ``tmp_path``; the folder is returned."""
    cache = tmp_path / "cache"
    shutil.copytree(fixture_items.CACHE, cache)
    source = tmp_path / "source"
    shutil.copytree(fixture_items.SOURCE, source)
    for path in source.iterdir():
        os.utime(path, (fixture_items.SOURCE_MTIME, fixture_items.SOURCE_MTIME))
    monkeypatch.setenv("CACHEDLOAD_DIR", str(cache))
    return source


def test_a_per_item_entry_written_before_manifests_were_recorded_is_a_hit_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _unrecorded_items_entry(tmp_path, monkeypatch)
    before = fixture_items.CALLS[0]
    result = fixture_items.read_item.map(source)
    assert fixture_items.CALLS[0] == before, "the item function ran: the entry was not a hit"
    assert result.paths == ("f0.txt", "f1.txt", "f2.txt")
    assert bytes(result.array[2]).rstrip(b"\0") == b"item 2"
    assert [found.problem for found in cachedload.verify(tmp_path / "cache")] == [None]


def test_a_private_entry_s_unrecorded_manifest_still_gives_its_unchanged_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _unrecorded_items_entry(tmp_path, monkeypatch)
    # The call group names the folder's real path: as if the entry had been written here.
    group = _prepare(fixture_items.read_item, _request(source, None, {})).call.group.digest
    (meta_file,) = (tmp_path / "cache").glob(f"*/*/{entry.META_FILE}")
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "group": group}))
    (source / "f1.txt").write_bytes(b"changed")
    before = fixture_items.CALLS[0]
    result = fixture_items.read_item.map(source)
    assert fixture_items.CALLS[0] == before + 1, "the unchanged rows were computed again"
    rows = [bytes(row).rstrip(b"\0") for row in result.array]
    assert rows == [b"item 0", b"changed", b"item 2"]


# -- parse_meta --------------------------------------------------------------------------------
def _fixture_meta() -> bytes:
    (meta,) = fixture_loader.CACHE.glob(f"*/*/{entry.META_FILE}")
    return meta.read_bytes()


def test_parse_meta_accepts_an_entry_written_before() -> None:
    meta = entry.parse_meta(_fixture_meta(), Path("x"))
    assert meta["format"] == entry.FORMAT_VERSION and meta["data"]["file"] == entry.DATA_FILE


def _without(meta: dict[str, Any], *path: str) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(meta))
    target = copy
    for name in path[:-1]:
        target = target[name]
    del target[path[-1]]
    return copy


def _with(meta: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(meta))
    target = copy
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = value
    return copy


MALFORMED: list[tuple[str, Any]] = [
    ("format 2", lambda m: _with(m, 2, "format")),
    ("no format", lambda m: _without(m, "format")),
    ("no data", lambda m: _without(m, "data")),
    ("size a string", lambda m: _with(m, "731", "data", "size")),
    ("no checksum", lambda m: _without(m, "data", "xxh3")),
    ("checksum a number", lambda m: _with(m, 1, "data", "xxh3")),
    ("no data file name", lambda m: _without(m, "data", "file")),
    ("data file in a folder", lambda m: _with(m, "../result.joblib", "data", "file")),
    ("hidden data file", lambda m: _with(m, ".result.joblib", "data", "file")),
    ("racy a list", lambda m: _with(m, [], "racy")),
    ("racy digest a number", lambda m: _with(m, {"src": {"a.txt": 1}}, "racy")),
    ("racy mtime a string", lambda m: _with(m, "0", "racy_newest_mtime_ns")),
    ("manifest record a string", lambda m: _with(m, "x", "manifest")),
    (
        "manifest digest short",
        lambda m: _with(m, {"size": 1, "sha256": "ab", "inflated": 0}, "manifest"),
    ),
    (
        "manifest size negative",
        lambda m: _with(m, {"size": -1, "sha256": "a" * 64, "inflated": 0}, "manifest"),
    ),
]


@pytest.mark.parametrize(("name", "damage"), MALFORMED, ids=[name for name, _ in MALFORMED])
def test_parse_meta_rejects_each_malformed_field(name: str, damage: Any) -> None:
    good = json.loads(_fixture_meta())
    raw = json.dumps(damage(good)).encode()
    with pytest.raises(entry.CorruptEntry) as error:
        entry.parse_meta(raw, Path("/cache/f/k"), source="s3://b/f/k/")
    assert error.value.path == Path("/cache/f/k") and error.value.reason.startswith("s3://b/f/k/")


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"[" * 100_000, b"\xff"])
def test_parse_meta_rejects_what_is_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(entry.CorruptEntry):
        entry.parse_meta(raw, Path("x"))


def test_any_version_only_decodes() -> None:
    raw = json.dumps({"format": 99}).encode()
    assert entry.parse_meta(raw, Path("x"), any_version=True) == {"format": 99}


def test_size_problem_says_both_sizes() -> None:
    meta = {"data": {"size": 10}}
    assert entry.size_problem(10, meta) is None
    assert entry.size_problem(7, meta) == "data file is 7 bytes, metadata says 10"
    assert entry.size_problem(7, meta, "data object") == "data object is 7 bytes, metadata says 10"


def test_the_hashing_writer_counts_hashes_and_passes_on() -> None:
    sink = io.BytesIO()
    writer = entry.HashingWriter(sink)
    writer.write(b"abc")
    writer.write(memoryview(b"def"))
    assert sink.getvalue() == b"abcdef" and writer.size == writer.tell() == 6
    assert writer.hexdigest() == xxhash.xxh3_128(b"abcdef").hexdigest()
    assert entry.HashingWriter().write(b"xyz") == 3  # nowhere: only checked


def test_manifests_round_trip_and_garbage_is_none() -> None:
    manifest = {"src": [["a.txt", 3, 1_600_000_000_000_000_000], ["b/\udcff", 0, -5]], "e": []}
    raw = entry.encode_manifest(manifest)
    assert entry.decode_manifest(raw) == manifest
    columns = entry.decode_manifest(raw, columns=True)
    assert columns is not None and columns["src"].paths == ["a.txt", "b/\udcff"]
    assert columns["src"].sizes.tolist() == [3, 0] and columns["e"].paths == []
    assert entry.decode_manifest(b"not zlib") is None
    # Every truncation, and any byte changed, is None or a manifest: never an exception.
    assert all(entry.decode_manifest(raw[:end]) is None for end in range(len(raw)))
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 0x5A
        entry.decode_manifest(bytes(damaged), columns=True)


def test_manifests_keep_the_content_digests_of_a_source_fingerprinted_by_content() -> None:
    digests = ["0f" * 16, "a1" * 16]
    files = entry.FileColumns(["a", "b"], np.array([1, 2]), np.array([3, 4]), digests)
    raw = entry.encode_manifest({"items": files, "other": [["c", 5, 6]]})
    decoded = entry.decode_manifest(raw, columns=True)
    assert decoded is not None and decoded["items"].contents == digests
    assert decoded["other"].contents is None
    records = entry.item_records(decoded, {}, "items")
    assert records is not None and records.contents == digests
    assert entry.decode_manifest(raw) == {
        "items": [["a", 1, 3], ["b", 2, 4]],
        "other": [["c", 5, 6]],
    }
    with pytest.raises(ValueError):
        entry.encode_manifest({"items": files._replace(contents=["0f" * 16])})


def test_manifests_of_older_entries_are_read_and_checked() -> None:
    manifest = {"src": [["a.txt", 3, 1_600_000_000_000_000_000]], "other": [["b", 1, 2]]}
    legacy = zlib.compress(json.dumps(manifest).encode(), 3)  # entries written before 0.2
    assert entry.decode_manifest(legacy) == manifest
    columns = entry.decode_manifest(legacy, columns=True)
    assert columns is not None and columns["src"].mtimes.tolist() == [1_600_000_000_000_000_000]
    for bad in ([["a", True, 1]], [["a", 1.5, 1]], [["a", 1, 2**64]], [[1, 1, 1]], [["a", 1]]):
        crafted = zlib.compress(json.dumps({"src": bad, "other": [["b", 1, 2]]}).encode())
        assert entry.decode_manifest(crafted, columns=True) == {"other": columns["other"]}


def test_a_manifest_is_read_only_if_it_matches_its_record_in_the_metadata(
    tmp_path: Path,
) -> None:
    files = [["a", 1, 2], ["b", 1, 2]]
    raw, record = entry.encoded_manifest({"src": files})
    meta = {entry.MANIFEST_FIELD: record}
    assert entry.parse_manifest(raw, meta, tmp_path, signed=True) == {"src": files}
    swapped = entry.encode_manifest({"src": files[::-1]})  # same size, rows on other files
    assert len(swapped) == len(raw)
    with pytest.raises(entry.CorruptEntry, match="digest"):
        entry.parse_manifest(swapped, meta, tmp_path)
    with pytest.raises(entry.CorruptEntry, match="bytes, metadata says"):
        entry.parse_manifest(raw + b"x", meta, tmp_path)
    # Not recorded (written before): read, unless a signature must cover it.
    before = {"sources": {"src": {"file_count": 2}}}
    assert entry.parse_manifest(swapped, before, tmp_path) == {"src": files[::-1]}
    with pytest.raises(entry.CorruptEntry, match="signature does not cover"):
        entry.parse_manifest(raw, before, tmp_path, signed=True)
    folder = tmp_path / "entry"
    folder.mkdir()
    assert entry.read_entry_manifest(folder, {}) is None
    with pytest.raises(entry.CorruptEntry, match="manifest is missing"):
        entry.read_entry_manifest(folder, meta)
    (folder / entry.MANIFEST_FILE).write_bytes(raw)
    assert entry.read_entry_manifest(folder, meta) == {"src": files}
    assert entry.manifest_problem(swapped, meta) and entry.manifest_problem(raw, meta) is None


def test_a_manifest_never_inflates_beyond_what_its_metadata_allows(tmp_path: Path) -> None:
    files = [[f"f{i:03d}", 1, 2] for i in range(100)]
    raw, record = entry.encoded_manifest({"src": files})
    assert entry.decode_manifest(raw, limit=record["inflated"]) == {"src": files}
    assert entry.decode_manifest(raw, limit=record["inflated"] - 1) is None
    legacy = json.dumps({"src": files}).encode()
    assert entry.decode_manifest(zlib.compress(legacy), limit=len(legacy)) == {"src": files}
    assert entry.decode_manifest(zlib.compress(legacy), limit=len(legacy) - 1) is None
    # Unrecorded (written before): what the files its sources count allow.
    counted = {"sources": {"src": {"file_count": 100}}}
    assert entry.parse_manifest(raw, counted, tmp_path) == {"src": files}
    bomb = zlib.compress(b"\0" * (64 << 20))  # 64 MB of paths in a few kB
    head = json.dumps([["src", 100, len(bomb), 0]]).encode()
    crafted = raw[:8] + struct.pack("<I", len(head)) + head + bytes(1600) + bomb
    with pytest.raises(entry.CorruptEntry, match="unreadable"):
        entry.parse_manifest(crafted, counted, tmp_path)
    with pytest.raises(entry.CorruptEntry, match="unreadable"):
        entry.parse_manifest(bomb, counted, tmp_path)  # as a JSON manifest of before 0.2
    assert entry.decode_manifest(crafted) is None  # no metadata: 100 paths' worth at most


def test_item_records_come_from_the_manifest_and_the_racy_digests() -> None:
    raw = entry.encode_manifest({"items": [["a", 1, 10], ["b", 2, 20]]})
    meta = {"racy": {"items": {"b": "0f" * 16, "gone": "1e" * 16}}}
    records = entry.item_records(entry.decode_manifest(raw, columns=True), meta, "items")
    assert records is not None and records.paths == ["a", "b"]
    assert records.mtimes.tolist() == [10, 20] and records.digests["b"] == "0f" * 16
    assert entry.item_records(entry.decode_manifest(raw), meta, "items") is None  # not columns
    assert entry.item_records(None, meta, "items") is None


def test_function_folders_are_named_once() -> None:
    name = entry.function_dir_name("pkg.mod.load<x>", "0123456789abcdef")
    assert name == "pkg.mod.load_x_-01234567"
    assert name.startswith(entry.function_dir_prefix("pkg.mod.load<x>"))
    assert entry.is_function_dir_name(name) and not entry.is_function_dir_name("remote")


# -- scanning ----------------------------------------------------------------------------------
def _write_entry(function_dir: Path, key: str) -> Path:
    folder = function_dir / key
    folder.mkdir(parents=True)
    meta = {**json.loads(_fixture_meta()), "key": key}
    (folder / entry.META_FILE).write_text(json.dumps(meta))
    return folder


def test_the_scan_lists_entries_and_damaged_ones_and_skips_what_is_not_ours(
    tmp_path: Path,
) -> None:
    _write_entry(tmp_path, "a" * 32)
    (tmp_path / ("b" * 32)).mkdir()  # no metadata: damaged
    (tmp_path / "notes").mkdir()
    (tmp_path / f"{'c' * 32}.used").write_bytes(b".")
    (tmp_path / f"{entry.TMP_PREFIX}{entry.HOST}-1-x").mkdir()
    found = list(entry.scan_entry_dirs(tmp_path))
    assert [(f.key, f.meta is not None, f.problem) for f in found] == [
        ("a" * 32, True, None),
        ("b" * 32, False, "metadata file is missing"),
    ]
    assert list(entry.scan_entry_dirs(tmp_path / "gone")) == []


def test_the_scan_tolerates_an_entry_vanishing_meanwhile(tmp_path: Path) -> None:
    first, second = _write_entry(tmp_path, "a" * 32), _write_entry(tmp_path, "b" * 32)
    scan = entry.scan_entry_dirs(tmp_path)
    assert next(scan).path == first
    shutil.rmtree(second)  # removed by another process after the folder was listed
    assert list(scan) == []


# -- leftovers ---------------------------------------------------------------------------------
def test_leftover_rules() -> None:
    now = time.time()
    mine = f"{entry.TMP_PREFIX}{entry.HOST}-{os.getpid()}-abc"
    assert not entry.leftover_is_dead(mine, now, now)  # a live writer's
    assert entry.leftover_is_dead(mine, now - entry.LEFTOVER_MAX_AGE - 1, now)  # too old
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = f"{entry.TRASH_PREFIX}{entry.HOST}-{int(child.stdout)}-abc"
    assert entry.leftover_is_dead(dead, now, now)  # its process ended
    assert not entry.leftover_is_dead(f"{entry.TMP_PREFIX}elsewhere-1-abc", now, now)
    assert not entry.leftover_is_dead(f"{entry.TMP_PREFIX}short", now, now)
    assert entry.is_leftover_name(entry.temporary_name()) and not entry.is_leftover_name("a" * 32)


# -- crafted metadata (issue 16, item 4) --------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("created", "yesterday"),
        ("created", [1]),
        ("parameters", ["a"]),
        ("parameters", {"a": {"value": 3}}),
        ("sources", {"x": {"file_count": "many"}}),
        ("sources", {"x": {"total_bytes": -1}}),
        ("pid", True),
        ("key", 5),
        ("racy_newest_mtime_ns", "0"),
        ("racy", {"x": {"/etc/passwd": "d"}}),
        ("racy", {"x": {"../outside": "d"}}),
    ],
)
def test_every_field_of_crafted_metadata_is_checked(field: str, value: Any) -> None:
    meta = {**json.loads(_fixture_meta()), field: value}
    key = json.loads(_fixture_meta())["key"]
    with pytest.raises(entry.CorruptEntry):
        entry.parse_meta(json.dumps(meta).encode(), Path(key))


def test_deeply_nested_metadata_is_corrupt_without_recursing() -> None:
    deep = b'{"format": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(entry.CorruptEntry, match="nested too deeply"):
        entry.parse_meta(deep, Path("x"))
    # Brackets inside strings do not count.
    meta = {**json.loads(_fixture_meta()), "result": "[" * 100}
    entry.parse_meta(json.dumps(meta).encode(), Path("x"))


def test_metadata_naming_another_key_is_corrupt(tmp_path: Path) -> None:
    folder = _write_entry(tmp_path, "a" * 32)
    folder.rename(tmp_path / ("b" * 32))  # a copy of another key's entry
    with pytest.raises(entry.CorruptEntry, match="another key"):
        entry.read_local_meta(tmp_path / ("b" * 32))


def test_an_entry_folder_that_is_a_symlink_is_corrupt(tmp_path: Path) -> None:
    _write_entry(tmp_path / "elsewhere", "a" * 32)
    (tmp_path / ("a" * 32)).symlink_to(tmp_path / "elsewhere" / ("a" * 32))
    with pytest.raises(entry.CorruptEntry, match="symlink"):
        entry.read_local_meta(tmp_path / ("a" * 32))


def test_a_folder_named_meta_json_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / ("a" * 32) / entry.META_FILE).mkdir(parents=True)
    with pytest.raises(entry.CorruptEntry, match="not a regular file"):
        entry.read_local_meta(tmp_path / ("a" * 32))
    (found,) = entry.scan_entry_dirs(tmp_path)
    assert found.problem == "metadata is not a regular file"


def test_reading_a_fifo_or_device_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", Path("/dev/zero")):
        with pytest.raises(OSError):
            entry.read_regular_file(path)
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    with pytest.raises(OSError):
        entry.read_regular_file(tmp_path / "link")
