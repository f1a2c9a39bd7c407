"""A local cache directory (cachedload.store.LocalRoot), through the cache-root interface."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cachedload import entry
from cachedload.backends import open_root
from cachedload.root import Hit, Miss
from cachedload.store import LocalRoot
from tests.conftest import subprocess_env

FDIR = "tests.test_store.load-0123abcd"
KEY = "0123456789abcdef0123456789abcdef"


def _always(meta: dict[str, Any]) -> bool:
    return True


def _get(root: LocalRoot, key: str = KEY, **options: Any) -> Hit | Miss:
    return root.get(
        FDIR, key, fresh=options.pop("fresh", _always), mmap_mode=None, verify=True, **options
    )


def _put(root: LocalRoot, value: Any, key: str = KEY, **options: Any) -> int:
    return root.put(FDIR, key, value, {"function": "tests.test_store.load"}, **options)


def test_open_root_of_a_folder_is_a_local_root(tmp_path: Path) -> None:
    root = open_root(tmp_path)
    assert isinstance(root, LocalRoot) and root.local is root and root.path == tmp_path
    assert root.entry_path(FDIR, KEY) == tmp_path / FDIR / KEY


def test_put_then_get_is_a_hit_that_is_recorded(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    size = _put(root, np.arange(10), manifest={"src": [["a", 1, 2]]})
    found = _get(root)
    assert isinstance(found, Hit) and found.size == size
    np.testing.assert_array_equal(found.value, np.arange(10))
    (info,) = root.entries(FDIR)
    assert (info.key, info.hits, info.url) == (KEY, 1, None)
    assert root.manifest(FDIR, KEY, info.meta) == {"src": [["a", 1, 2]]}
    assert root.has_data(FDIR, KEY, found.meta)
    assert root.function_dirs() == [FDIR]


def test_no_entry_is_a_plain_miss_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    assert _get(root) == Miss()
    _put(root, 1)
    assert _get(root, fresh=lambda meta: False) == Miss(replace=True, stale=True)


def test_a_corrupt_entry_is_a_miss_that_replaces_it(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    _put(root, np.arange(1000))
    with open(root.entry_path(FDIR, KEY) / entry.DATA_FILE, "r+b") as handle:
        handle.truncate(100)
    found = _get(root)
    assert isinstance(found, Miss) and found.replace and found.corrupt is not None
    assert "metadata says" in found.corrupt.reason
    _put(root, np.arange(3), replace=True)
    assert isinstance(_get(root), Hit)


def test_an_entry_published_first_is_kept_unless_replaced(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    _put(root, "first")
    _put(root, "second")
    assert _get(root) == Hit("first", _get(root).meta)  # type: ignore[union-attr]
    _put(root, "third", replace=True)
    found = _get(root)
    assert isinstance(found, Hit) and found.value == "third"


def test_remove_deletes_the_entry_and_its_records(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    _put(root, 1)
    _get(root)
    with root.claim(FDIR, KEY) as free:
        assert free
        root.remove(FDIR, KEY)
    assert _get(root) == Miss()
    assert sorted(os.listdir(tmp_path / FDIR)) == []


def test_single_flight_holds_the_lock_and_names_its_owner(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    owner = tmp_path / FDIR / f"{KEY}{entry.OWNER_SUFFIX}"
    with root.single_flight(FDIR, KEY, None) as locked:
        assert locked and f"pid {os.getpid()}" in owner.read_text()
        assert _is_busy_elsewhere(root)
    assert not owner.exists() and not root.is_busy(FDIR, KEY)


def _is_busy_elsewhere(root: LocalRoot) -> bool:
    code = (
        "import sys; from cachedload.store import LocalRoot; "
        f"sys.exit(LocalRoot({str(root.path)!r}).is_busy({FDIR!r}, {KEY!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], env=subprocess_env()).returncode == 1


def test_single_flight_gives_up_after_its_timeout(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    (tmp_path / FDIR).mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            f"lock = FileLock({str(tmp_path / FDIR / (KEY + '.lock'))!r}); lock.acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert root.is_busy(FDIR, KEY)
        with root.claim(FDIR, KEY) as free:
            assert not free
        started = time.perf_counter()
        with root.single_flight(FDIR, KEY, 0.2) as locked:
            assert not locked
        assert time.perf_counter() - started < 10
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_verify_finds_a_damaged_data_file(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    _put(root, np.arange(1000))
    _put(root, np.arange(5), key="f" * 32)
    (root.entry_path(FDIR, "f" * 32) / entry.DATA_FILE).write_bytes(b"x" * 10)
    problems = {c.path.name: c.problem for c in root.verify()}
    assert problems[KEY] is None
    assert problems["f" * 32] is not None and "metadata says" in problems["f" * 32]


def test_tidy_removes_dead_writers_leftovers_and_empty_folders(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    _put(root, 1)
    old = tmp_path / FDIR / entry.temporary_name()
    old.mkdir()
    os.utime(old, (time.time() - 2 * entry.LEFTOVER_MAX_AGE,) * 2)
    (tmp_path / "other.f-89abcdef").mkdir()
    root.tidy()
    assert not old.exists() and not (tmp_path / "other.f-89abcdef").exists()
    assert isinstance(_get(root), Hit)


def test_local_copies_of_remote_caches_are_not_function_folders(tmp_path: Path) -> None:
    copy = tmp_path / entry.LOCAL_COPIES_DIR / "bucket-prefix-01234567"
    LocalRoot(copy).put(FDIR, KEY, 1, {})
    (copy / entry.URL_FILE).write_text("s3://bucket/prefix")
    root = LocalRoot(tmp_path)
    assert root.function_dirs() == []
    ((found, url),) = root.local_copies()
    assert url == "s3://bucket/prefix" and found.function_dirs() == [FDIR]
    found.remove(FDIR, KEY)
    root.tidy_copies()
    assert not (tmp_path / entry.LOCAL_COPIES_DIR).exists()


def test_a_cache_directory_deleted_while_a_program_runs_is_made_again(tmp_path: Path) -> None:
    import shutil

    from cachedload import cached_dataset

    calls: list[int] = []
    source = tmp_path / "data"
    source.mkdir()
    (source / "a.txt").write_text("a")
    os.utime(source / "a.txt", (1e9, 1e9))

    @cached_dataset(cache_dir=tmp_path / "cache")
    def load(data_dir: Path) -> int:
        calls.append(1)
        return 1

    assert load(source) == 1
    shutil.rmtree(tmp_path / "cache")  # with the wrapper (and its root) still alive
    assert load(source) == 1  # no CacheStoreWarning: the directory is made again
    assert load(source) == 1 and len(calls) == 2
    assert (tmp_path / "cache" / "CACHEDIR.TAG").exists()
