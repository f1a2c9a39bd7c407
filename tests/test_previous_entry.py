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
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

import cachedload
from cachedload import CachedDataset, ConfigurationError, cached_dataset
from cachedload.builder import Item, ItemTable, _classify
from cachedload.entry import decode_manifest, encode_manifest
from cachedload.options import Options
from tests.conftest import subprocess_env

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


@pytest.mark.parametrize(
    "how", ["named-but-has-a-row", "has-no-row-but-not-named", "another-file-named"]
)
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
    elif how == "another-file-named":  # as many rows: x1 would get the row of x2
        (root / "x1.txt").write_text("unreadable")
        with pytest.warns(Warning):
            load.map(root, skip=_Unreadable)
        edit_meta(cache, lambda meta: meta.update(skipped=["x2.txt"]))
        skip = _Unreadable
    else:
        (root / "x1.txt").write_text("unreadable")
        with pytest.warns(Warning):
            load.map(root, skip=_Unreadable)
        edit_meta(cache, lambda meta: meta.pop("skipped"))
        skip = _Unreadable
    (checked,) = cachedload.verify(cache)
    assert checked.problem and "skipped files" in checked.problem
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


def _index_offsets(raw: bytes) -> tuple[int, tuple[int, ...], bytes]:
    """A data file's index: the skeleton length, the offsets, and the offsets' packed bytes."""
    head, magic = b"\x80\x04\x8e", b"cachedload-index\0"
    index_len = struct.unpack_from("<Q", raw, len(head))[0]
    index = raw[len(head) + 8 + len(magic) : len(head) + 8 + index_len]
    _version, skeleton_len, table, packed = pickle.loads(index)
    return skeleton_len, struct.unpack(f"<{len(table) + 1}Q", packed), packed


def _point_index_at_header(cache: Path) -> None:
    data = data_file(cache)
    raw = bytearray(data.read_bytes())
    _skeleton_len, offsets, packed = _index_offsets(bytes(raw))
    forged = struct.pack(f"<{len(offsets)}Q", offsets[0], 0, *offsets[2:])  # rows = the header
    at = raw.find(packed)
    raw[at : at + len(packed)] = forged
    data.write_bytes(bytes(raw))


def _swap_two_paths(cache: Path) -> None:
    (path,) = cache.glob("*/*/manifest")
    manifest = decode_manifest(path.read_bytes(), columns=True)
    assert manifest is not None
    files = manifest["path"]
    # Rows 1 and 2 trade files: each record still matches its file (size, mtime), so only
    # the manifest's checksum or signature can tell.
    order = [0, 2, 1, *range(3, len(files.paths))]
    manifest["path"] = files._replace(
        paths=[files.paths[i] for i in order], sizes=files.sizes[order], mtimes=files.mtimes[order]
    )
    path.write_bytes(encode_manifest(manifest))


TAMPERS = {
    "a flipped byte in a row": _flip_row_1,
    "an index pointing at the header": _point_index_at_header,
    "two paths swapped in the manifest": _swap_two_paths,
}
OPTIONS: dict[str, dict[str, Any]] = {
    "verify-size": {},
    "verify-always": {"verify": "always"},
    "signed": {"shared": True, "signing_key": "k"},
}


def _tampered(
    tmp_path: Path, tamper: str, options: str
) -> tuple[Path, Path, CachedDataset[..., Any], str | None]:
    """A folder, its cache, the loader, and what `cachedload verify` says of the entry once
    tampered with."""
    root = folder_of_rows(tmp_path)
    given = OPTIONS[options]
    cache = shared_cache(tmp_path) if given.get("shared") else tmp_path / "cache"
    load = loader(cache, **given)
    load.map(root)
    TAMPERS[tamper](cache)  # same size: only a checksum (or the signature over it) tells
    (checked,) = cachedload.verify(cache)
    return root, cache, load, checked.problem


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_damaged_or_tampered_previous_entry_is_reported_and_never_copied(
    tmp_path: Path, tamper: str, options: str
) -> None:
    root, cache, load, problem = _tampered(tmp_path, tamper, options)
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = load.map(root)
        again = load.map(root)  # the new entry, as a hit reads it
    assert rows_text(rebuilt) == expected(root) and rows_text(again) == expected(root)
    (new,) = (found for found in cachedload.verify(cache) if found.problem is None)
    items = json.loads((new.path / "meta.json").read_text())["items"]
    assert items["reused"] == 0, "rows of the tampered entry were copied"
    assert problem, f"cachedload verify does not report {tamper}"


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_damaged_or_tampered_entry_is_never_served(
    tmp_path: Path, tamper: str, options: str
) -> None:
    if options == "verify-size" and "manifest" not in tamper:
        pytest.skip('verify="size" checks the data file\'s size only, by design')
    root, _cache, load, problem = _tampered(tmp_path, tamper, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rows_text(load.map(root)) == expected(root)
    assert problem, f"cachedload verify does not report {tamper}"


@pytest.mark.parametrize("ragged", [False, True])
def test_a_previous_entry_written_while_its_rows_are_copied_gives_a_full_build(
    tmp_path: Path, ragged: bool
) -> None:
    root, cache = folder_of_rows(tmp_path), shared_cache(tmp_path)
    previous: list[Path] = []  # the entry to tamper with, once it is checked

    def read_and_tamper(path: str) -> Any:
        # Another member of the group writes the previous entry's rows in place.
        if path.endswith("x3.txt") and previous:
            data = previous.pop()
            raw = bytearray(data.read_bytes())
            at = raw.find(b"row 1")
            raw[at : at + 5] = b"EVIL!"
            with open(data, "r+b") as handle:
                handle.write(raw)
        return read_row(path)

    options = Options(per_item="path", cache_dir=cache, shared=True, signing_key="k")
    load = CachedDataset(read_and_tamper, options)
    load.map(root, ragged=ragged)
    previous.append(data_file(cache))
    change_one(root)
    result = load.map(root, ragged=ragged)
    assert not previous, "the item function did not run"
    assert [bytes(row).rstrip(b"\0") for row in result.array] == expected(root)


def test_the_unrecorded_manifest_of_an_older_entry_must_name_the_rows_files(
    tmp_path: Path,
) -> None:
    root, cache = folder_of_rows(tmp_path), tmp_path / "cache"
    load = loader(cache)
    load.map(root)
    edit_meta(cache, lambda meta: meta.pop("manifest", None))  # written before it was
    _swap_two_paths(cache)  # recorded: covered only by the data file's list of paths
    (checked,) = cachedload.verify(cache)
    assert checked.problem and "manifest does not list" in checked.problem
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rows_text(load.map(root)) == expected(root)


def test_a_crafted_index_with_a_matching_checksum_is_not_copied(tmp_path: Path) -> None:
    root, cache = folder_of_rows(tmp_path), shared_cache(tmp_path)
    load = loader(cache, shared=True)  # unsigned: anyone in the group rewrites meta.json too
    load.map(root)
    _point_index_at_header(cache)
    checksum = xxhash.xxh3_128(data_file(cache).read_bytes()).hexdigest()
    edit_meta(cache, lambda meta: meta["data"].update(xxh3=checksum))
    (checked,) = cachedload.verify(cache)
    assert checked.problem and "index" in checked.problem
    change_one(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load.map(root)
    assert rows_text(result) == expected(root)


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


def _zlib_bomb(inflated: int = 256 << 20) -> bytes:
    """A zlib stream of ``inflated`` NUL bytes (about a thousandth of that on disk)."""
    deflate, zeros = zlib.compressobj(1), bytes(16 << 20)
    return b"".join([*(deflate.compress(zeros) for _ in range(inflated // len(zeros))),
                     deflate.flush()])  # fmt: skip


def _bomb_manifest(manifest_format: str) -> bytes:
    blob = _zlib_bomb()
    if manifest_format == "json (before 0.2)":
        return blob
    count = 4096  # paths the header claims: a count that lets the blob inflate 256 MB
    head = json.dumps([["path", count, len(blob), 0]]).encode()
    return b"CLDMAN\x00\x02" + struct.pack("<I", len(head)) + head + bytes(16 * count) + blob


_REBUILD_MEASURED = """
import resource, sys, warnings
from pathlib import Path
from tests.test_previous_entry import expected, loader, rows_text
root, cache = Path(sys.argv[1]), Path(sys.argv[2])
load = loader(cache)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = load.map(root)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
assert rows_text(result) == expected(root), rows_text(result)
print(grown)
"""


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "written-before"])
@pytest.mark.parametrize("manifest_format", ["columns", "json (before 0.2)"])
def test_a_zlib_bomb_in_a_manifest_never_inflates_beyond_what_the_metadata_allows(
    tmp_path: Path, manifest_format: str, recorded: bool
) -> None:
    root, cache = folder_of_rows(tmp_path), tmp_path / "cache"
    loader(cache).map(root)
    (manifest,) = cache.glob("*/*/manifest")
    manifest.write_bytes(_bomb_manifest(manifest_format))
    if not recorded:  # an entry written before the metadata recorded its manifest
        edit_meta(cache, lambda meta: meta.pop("manifest"))
    change_one(root)
    child = subprocess.run(
        [sys.executable, "-c", _REBUILD_MEASURED, str(root), str(cache)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    grown_mb = int(child.stdout.split()[-1]) / 1024  # ru_maxrss: KiB on Linux
    assert grown_mb < 64, f"the rebuild grew by {grown_mb:.0f} MB reading a 1 MB manifest"
