"""Bounded growth and inspection: superseded entries, LRU eviction, locks, list_entries."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

import cachedload.decorator
from cachedload import CachedDataset, ConfigurationError, EntryRecord, list_entries
from cachedload.entry import HOST as _HOST
from cachedload.manage import format_age, format_size, parse_age, prune
from tests.conftest import subprocess_env, write_old

write = write_old


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A source folder of three small text files, two hours old."""
    for name in ("a.txt", "b.txt", "c.txt"):
        write(tmp_path / "data" / name, f"contents of {name}")
    return tmp_path / "data"


def _body(data_dir: str, size: int = 4) -> np.ndarray:
    return np.full(size, len(os.listdir(data_dir)), dtype=np.uint8)


def loader(cache_dir: Path, **options: Any) -> CachedDataset[..., np.ndarray]:
    """The same loader (one identity, one code version) with the given options."""
    return CachedDataset(_body, cache_dir=cache_dir, **options)


def set_last_used(record: EntryRecord, when: float) -> None:
    """Pretend the entry was last hit at ``when`` (its ``.used`` sidecar's mtime)."""
    used = record.path.parent / f"{record.id}.used"
    with open(used, "ab") as handle:
        handle.write(b".")
    os.utime(used, (when, when))


# -- sizes and ages ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"), [("30d", 30 * 86400), ("12h", 43200), ("15m", 900), ("45s", 45), (7, 7)]
)
def test_parse_age(text: str | int, expected: float) -> None:
    assert parse_age(text) == expected


@pytest.mark.parametrize("bad", ["soon", "30", "-1d", "3 fortnights"])
def test_parse_age_rejects_garbage(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="older_than"):
        parse_age(bad)


def test_format_size_and_age_are_human_readable() -> None:
    assert format_size(512) == "512 B"
    assert format_size(19_700_000) == "19.7 MB"
    assert format_size(1_234_000_000) == "1.2 GB"
    assert format_age(42) == "42 s"
    assert format_age(3 * 3600) == "3 h"
    assert format_age(12 * 86400) == "12 d"


def test_bad_limits_fail_at_decoration_time(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="max_size"):
        loader(tmp_path, max_size="big")
    with pytest.raises(ConfigurationError, match="keep"):
        loader(tmp_path, keep=0)


# -- inspection --------------------------------------------------------------------------------
def test_list_entries_describes_each_entry(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    load = loader(cache)
    load(str(data), size=4)
    load(str(data), size=8)
    load(str(data), size=8)  # one hit

    records = list_entries(cache)
    assert [r.parameters for r in records] == [{"size": "8"}, {"size": "4"}]  # newest first
    newest = records[0]
    assert newest.function == f"{__name__}._body"
    assert newest.sources == {
        "data_dir": {"path": str(data.resolve()), "file_count": 3, "total_bytes": 51}
    }
    assert newest.result == "ndarray(shape=(8,), dtype=uint8)"
    assert newest.hits == 1 and records[1].hits == 0
    assert newest.last_used >= newest.created
    assert newest.size_bytes == sum(f.stat().st_size for f in newest.path.iterdir())
    assert newest.to_dict()["id"] == newest.id == newest.key
    assert newest.path == load.cache_path(str(data), size=8)
    assert [r.id for r in load.entries()] == [r.id for r in records]
    assert list_entries(tmp_path / "nowhere") == []


# -- superseded entries ------------------------------------------------------------------------
def test_superseded_entries_are_deleted_when_the_files_change(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    load = loader(cache)
    load(str(data), size=4)
    other = load(str(data), size=16)  # another parameter: a different group, never superseded
    first = {r.parameters["size"]: r for r in list_entries(cache)}["4"]

    write(data / "d.txt", "new file")
    load(str(data), size=4)

    records = list_entries(cache)
    assert sorted(r.parameters["size"] for r in records) == ["16", "4"]
    assert first.id not in {r.id for r in records}
    assert not first.path.exists()
    assert not (first.path.parent / f"{first.id}.used").exists()
    assert not (first.path.parent / f"{first.id}.lock").exists()
    assert other.shape == (16,)


def test_keep_2_keeps_the_previous_version(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    load = loader(cache, keep=2)
    load(str(data))
    write(data / "d.txt", "one more")
    load(str(data))
    assert len(list_entries(cache)) == 2
    write(data / "e.txt", "and another")
    load(str(data))

    counts = [r.sources["data_dir"]["file_count"] for r in list_entries(cache)]
    assert counts == [5, 4]  # the oldest version (3 files) went


def test_keep_none_keeps_every_version(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    load = loader(cache, keep=None)
    load(str(data))
    write(data / "d.txt", "one more")
    load(str(data))
    assert len(list_entries(cache)) == 2


# -- size limit --------------------------------------------------------------------------------
def _fill(cache: Path, data: Path, sizes: list[int]) -> dict[int, EntryRecord]:
    """One entry per array size, each given a distinct, old last use."""
    load = loader(cache)
    for size in sizes:
        load(str(data), size=size)
    return {int(r.parameters["size"]): r for r in list_entries(cache)}


def test_max_size_evicts_least_recently_used_first(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    sizes = [100_000, 100_001, 100_002, 100_003]
    records = _fill(cache, data, sizes)
    now = time.time()
    last_used = {100_000: now - 4000, 100_001: now - 1000, 100_002: now - 3000, 100_003: now - 2000}
    for size, when in last_used.items():
        set_last_used(records[size], when)

    bounded = loader(cache, max_size=int(3.5 * 100_500))
    bounded(str(data), size=100_004)

    left = sorted(int(r.parameters["size"]) for r in list_entries(cache))
    assert left == [100_001, 100_003, 100_004]  # the two least recently used went, in order
    assert sum(r.size_bytes for r in list_entries(cache)) <= 3.5 * 100_500


def test_max_size_never_evicts_the_entry_just_written(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    _fill(cache, data, [1000, 2000])
    bounded = loader(cache, max_size="1KB")
    bounded(str(data), size=5000)
    assert [r.parameters["size"] for r in list_entries(cache)] == ["5000"]
    assert bounded.is_cached(str(data), size=5000)


def test_max_size_from_the_environment(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    _fill(cache, data, [1000, 2000])
    monkeypatch.setenv("CACHEDLOAD_MAX_SIZE", "1")
    loader(cache)(str(data), size=3000)
    assert [r.parameters["size"] for r in list_entries(cache)] == ["3000"]


def test_a_failing_cleanup_only_logs(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("read-only neighbour")

    monkeypatch.setattr(cachedload.decorator, "enforce_after_store", broken)
    load = loader(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="cachedload"):
        assert load(str(data)).tolist() == [3, 3, 3, 3]
    assert load.is_cached(str(data))
    assert "read-only neighbour" in caplog.text


# -- entries in use ----------------------------------------------------------------------------
@pytest.fixture
def hold_lock() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Start processes that hold a lock file (as a process computing that key does)."""
    children: list[subprocess.Popen[str]] = []

    def start(lock_path: Path) -> subprocess.Popen[str]:
        code = f"""
            import sys
            from filelock import FileLock
            lock = FileLock({str(lock_path)!r})
            lock.acquire()
            print("locked", flush=True)
            sys.stdin.read()
        """
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        children.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        return child

    yield start
    for child in children:
        child.communicate(timeout=30)


def test_an_entry_locked_by_a_live_process_is_not_evicted(
    tmp_path: Path, data: Path, hold_lock: Callable[[Path], subprocess.Popen[str]]
) -> None:
    cache = tmp_path / "cache"
    records = _fill(cache, data, [1000, 2000, 3000])
    now = time.time()
    for offset, size in enumerate([1000, 2000, 3000]):
        set_last_used(records[size], now - 3000 + offset * 1000)  # 1000 is the LRU one
    locked = records[1000]
    child = hold_lock(locked.path.parent / f"{locked.id}.lock")
    # A live writer's temporary folder is not an entry and must survive too.
    writing = locked.path.parent / f".tmp-{_HOST}-{child.pid}-0123456789ab"
    writing.mkdir()

    report = prune(cache, max_size=0)

    assert [r.id for r in report.busy] == [locked.id]
    assert sorted(r.parameters["size"] for r in report.removed) == ["2000", "3000"]
    assert [r.id for r in list_entries(cache)] == [locked.id]
    assert writing.is_dir()
    assert (locked.path.parent / f"{locked.id}.lock").exists()

    child.communicate(timeout=30)  # the computing process finishes
    assert [r.id for r in prune(cache, max_size=0).removed] == [locked.id]
    assert list_entries(cache) == []


def test_superseded_entry_in_use_is_kept(
    tmp_path: Path, data: Path, hold_lock: Callable[[Path], subprocess.Popen[str]]
) -> None:
    cache = tmp_path / "cache"
    load = loader(cache)
    load(str(data))
    (old,) = list_entries(cache)
    hold_lock(old.path.parent / f"{old.id}.lock")
    write(data / "d.txt", "changed")
    load(str(data))
    assert old.id in {r.id for r in list_entries(cache)}


# -- prune -------------------------------------------------------------------------------------
def test_prune_older_than_keep_and_dry_run(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    keep_all = loader(cache, keep=None)
    keep_all(str(data), size=1)
    write(data / "d.txt", "changed")
    keep_all(str(data), size=1)
    keep_all(str(data), size=2)
    records = list_entries(cache)
    stale = next(r for r in records if r.parameters["size"] == "2")
    set_last_used(stale, time.time() - 40 * 86400)

    dry = prune(cache, keep=1, older_than="30d", dry_run=True)
    assert len(dry.removed) == 2 and dry.dry_run and "would remove 2 entries" in str(dry)
    assert len(list_entries(cache)) == 3

    report = prune(cache, keep=1, older_than="30d")
    assert report.bytes_freed == sum(r.size_bytes for r in report.removed) > 0
    (left,) = list_entries(cache)
    assert left.parameters == {"size": "1"} and left.sources["data_dir"]["file_count"] == 4

    prune(cache, older_than=0)
    assert [p.name for p in cache.iterdir()] == ["CACHEDIR.TAG"]  # empty function folders go too


@pytest.mark.parametrize(
    ("tamper", "reported"),
    [
        ("a flipped byte in a row", "checksum does not match"),
        ("an index pointing at the header", "checksum does not match"),
        ("two paths swapped in the manifest", "manifest does not match its digest"),
    ],
)
def test_verify_reports_every_damage_to_what_an_entry_s_rows_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str, reported: str
) -> None:
    from cachedload.cli import main
    from tests import test_previous_entry as items

    cache = tmp_path / "cache"
    items.loader(cache).map(items.folder_of_rows(tmp_path))
    items.TAMPERS[tamper](cache)
    assert main(["verify", "--cache-dir", str(cache)]) == 1
    assert reported in capsys.readouterr().out
    assert main(["verify", "--fix", "--cache-dir", str(cache)]) == 1
    assert not list(cache.glob("*/*/meta.json")), "the damaged entry was not removed"


def test_verify_reports_a_missing_manifest_and_a_crafted_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachedload.cli import main
    from tests import test_previous_entry as items

    cache = tmp_path / "cache"
    items.loader(cache).map(items.folder_of_rows(tmp_path))
    (manifest,) = cache.glob("*/*/manifest")
    manifest.unlink()
    assert main(["verify", "--cache-dir", str(cache)]) == 1
    assert "manifest is missing" in capsys.readouterr().out
    # An index pointing at the header, the checksum recomputed (a cache others can write).
    cache = tmp_path / "other"
    items.loader(cache).map(tmp_path / "data")
    items._point_index_at_header(cache)
    checksum = xxhash.xxh3_128(items.data_file(cache).read_bytes()).hexdigest()
    items.edit_meta(cache, lambda meta: meta["data"].update(xxh3=checksum))
    assert main(["verify", "--cache-dir", str(cache)]) == 1
    assert "index is damaged" in capsys.readouterr().out
    (size_only,) = cachedload.verify(cache, checksums=False)
    assert size_only.problem and "index is damaged" in size_only.problem
