"""Concurrency, crashes, corruption and failing disks: nothing lost, never stale.

Everything here happens for real: concurrent and killed processes, truncated files, read-only
and full tmpfs mounts, a file-size rlimit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cachedload.fingerprint
import cachedload.keys
from cachedload import (
    CacheStoreWarning,
    CorruptEntryWarning,
    SourceChangedWarning,
    cached_dataset,
)
from cachedload.entry import HOST as _HOST
from tests.conftest import age, run_python, runs, subprocess_env, write_images

# --- helpers ------------------------------------------------------------------------------------

CHILD_LOADER = """
import json, os, sys, time, logging
import numpy as np
from cachedload import cached_dataset

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
GO = os.environ.get("GO_FILE")

@cached_dataset(cache_dir=os.environ["CACHE"])
def load(image_dir, key=0):
    with open(os.environ["COUNTER"], "a") as f:
        f.write(f"{key} {os.getpid()}\\n")
    started = os.environ.get("STARTED_FILE")
    if started:
        open(started, "w").close()
    while GO and not os.path.exists(GO):
        time.sleep(0.02)
    time.sleep(float(os.environ.get("BODY_SECONDS", "0")))
    return np.full((64, 64), key * 1000 + len(os.listdir(image_dir)), dtype=np.int64)
"""


def start_child(tmp_path: Path, script: str, **env: str) -> subprocess.Popen[str]:
    """Start a child interpreter running CHILD_LOADER followed by ``script``."""
    module = tmp_path / "child_loader.py"
    if not module.exists():
        module.write_text(CHILD_LOADER)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\nfrom child_loader import *\n"
    return subprocess.Popen(
        [sys.executable, "-c", code + textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(**env),
    )


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def finish(child: subprocess.Popen[str], timeout: float = 120) -> str:
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, f"child failed:\n{out}\n{err}"
    return out


def store_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CacheStoreWarning)]


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    """An empty folder; tests mount a tmpfs on it (and it is unmounted afterwards)."""
    target = tmp_path / "mnt"
    target.mkdir()
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def mount_tmpfs(target: Path, size: str, *, read_only: bool = False) -> None:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    if read_only:
        remount_read_only(target)


def remount_read_only(target: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)


# --- single flight -------------------------------------------------------------------------------


def test_many_processes_many_keys_run_each_body_once(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = f"""
        import sys
        order = [int(k) for k in sys.argv[1:]] or [0, 1, 2]
        rank = int(os.environ["RANK"])
        order = order[rank % 3:] + order[:rank % 3]
        results = {{k: int(load({str(image_dir)!r}, key=k).sum()) for k in order}}
        print(json.dumps(results, sort_keys=True))
    """
    children = [
        start_child(
            tmp_path,
            script,
            CACHE=str(cache_dir),
            COUNTER=str(counter_file),
            GO_FILE=str(go),
            BODY_SECONDS="0.3",
            RANK=str(rank),
        )
        for rank in range(8)
    ]
    go.touch()
    outputs = {finish(child) for child in children}
    assert len(outputs) == 1, outputs  # identical results everywhere
    per_key = [line.split()[0] for line in counter_file.read_text().splitlines()]
    assert sorted(per_key) == ["0", "1", "2"]  # one run per key


def test_waiters_log_who_they_wait_for(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    go, started = tmp_path / "go", tmp_path / "started"
    env = {"CACHE": str(cache_dir), "COUNTER": str(counter_file), "GO_FILE": str(go)}
    holder = start_child(tmp_path, f"load({str(image_dir)!r})", STARTED_FILE=str(started), **env)
    wait_for(started)
    waiter = start_child(tmp_path, f"print(load({str(image_dir)!r}).sum())", **env)
    stderr = waiter.stderr
    assert stderr is not None
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(stderr.readline, "")))
    reader.start()
    deadline = time.monotonic() + 60
    while not any("waiting for" in line for line in seen):
        assert time.monotonic() < deadline, seen
        time.sleep(0.01)
    go.touch()
    finish(holder)
    reader.join(timeout=60)
    assert waiter.stdout is not None
    waiter.stdout.read()
    waiter.stdout.close()
    stderr.close()
    assert waiter.wait(timeout=60) == 0
    line = next(line for line in seen if "waiting for" in line)
    assert f"pid {holder.pid}" in line
    assert runs(counter_file) == 1
    assert any(line.startswith("hit ") for line in seen)


def test_different_keys_never_wait_on_each_other(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    go, started = tmp_path / "go", tmp_path / "started"
    env = {"CACHE": str(cache_dir), "COUNTER": str(counter_file)}
    holder = start_child(
        tmp_path,
        f"load({str(image_dir)!r}, key=1)",
        STARTED_FILE=str(started),
        GO_FILE=str(go),
        **env,
    )
    wait_for(started)
    other = start_child(tmp_path, f"print(load({str(image_dir)!r}, key=2).sum())", **env)
    out = finish(other, timeout=60)  # completes while key 1 is still being computed
    assert holder.poll() is None
    assert int(out) == 64 * 64 * 2002
    go.touch()
    finish(holder)


def test_a_killed_computation_does_not_wedge_the_lock(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    env = {"CACHE": str(cache_dir), "COUNTER": str(counter_file)}
    victim = start_child(
        tmp_path,
        f"load({str(image_dir)!r})",
        STARTED_FILE=str(started),
        GO_FILE=str(tmp_path / "never"),
        **env,
    )
    wait_for(started)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    out = finish(start_child(tmp_path, f"print(load({str(image_dir)!r}).sum())", **env), 60)
    assert int(out) == 64 * 64 * 2
    assert runs(counter_file) == 2


# --- atomic entries and leftovers -----------------------------------------------------------------


def test_a_writer_killed_mid_dump_leaves_no_entry_and_its_leftovers_go(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    env = {"CACHE": str(cache_dir), "COUNTER": str(counter_file)}
    script = f"""
        import signal
        import cachedload.serialize as serialize
        real_dump = serialize.dump

        def dump_then_die(value, path, **kw):
            real_dump(value, path, **kw)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)  # half-written
            os.kill(os.getpid(), signal.SIGKILL)

        serialize.dump = dump_then_die
        load({str(image_dir)!r})
    """
    victim = start_child(tmp_path, script, **env)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    function_dir = next(cache_dir.iterdir())
    leftovers = [p for p in function_dir.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and all(str(victim.pid) in p.name for p in leftovers)
    assert not [p for p in function_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]

    out = finish(start_child(tmp_path, f"print(load({str(image_dir)!r}).sum())", **env), 60)
    assert int(out) == 64 * 64 * 2
    assert not [p for p in function_dir.iterdir() if p.name.startswith(".tmp-")]


def test_leftovers_of_live_writers_are_kept_and_old_ones_removed(
    image_dir: Path, cache_dir: Path
) -> None:
    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path, key: int) -> int:
        return key

    load(image_dir, 1)
    function_dir = next(p for p in cache_dir.iterdir() if p.is_dir())
    live = function_dir / f".tmp-{_HOST}-{os.getpid()}-live"
    live.mkdir()
    (live / "result.joblib").write_bytes(b"being written")
    old = function_dir / f".tmp-{_HOST}-{os.getpid()}-old"
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    other_host = function_dir / ".tmp-otherhost-1-x"
    other_host.mkdir()
    load(image_dir, 2)  # a store in the same folder cleans up
    assert live.exists()
    assert other_host.exists()  # cannot tell whether its writer lives
    assert not old.exists()


# --- corruption -----------------------------------------------------------------------------------


def entry_of(load: Any, *args: Any) -> Path:
    path: Path = load.cache_path(*args)
    assert path.is_dir()
    return path


def corrupting_loader(cache_dir: Path, calls: list[int], **options: Any) -> Any:
    @cached_dataset(cache_dir=cache_dir, **options)
    def load(image_dir: Path) -> np.ndarray:
        calls.append(1)
        return np.arange(10_000, dtype=np.int64)

    return load


def truncate(entry: Path) -> None:
    data = entry / "result.joblib"
    data.write_bytes(data.read_bytes()[:100])


def garble_header(entry: Path) -> None:
    data = entry / "result.joblib"
    raw = bytearray(data.read_bytes())
    raw[:16] = b"\x00garbage-garbage"
    data.write_bytes(bytes(raw))


def remove_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def invalid_meta(entry: Path) -> None:
    (entry / "meta.json").write_text("{not json")


def future_format(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["format"] = 999
    (entry / "meta.json").write_text(json.dumps(meta))


def remove_data(entry: Path) -> None:
    (entry / "result.joblib").unlink()


@pytest.mark.parametrize(
    "damage", [truncate, garble_header, remove_meta, invalid_meta, future_format, remove_data]
)
def test_corrupt_entries_warn_recompute_and_heal(
    image_dir: Path, cache_dir: Path, damage: Any
) -> None:
    calls: list[int] = []
    load = corrupting_loader(cache_dir, calls)
    load(image_dir)
    entry = entry_of(load, image_dir)
    damage(entry)
    with pytest.warns(CorruptEntryWarning) as caught:
        result = load(image_dir)
    assert len(caught) == 1
    assert str(entry) in str(caught[0].message)
    assert caught[0].filename == __file__  # attributed to the user's call, not the library
    np.testing.assert_array_equal(result, np.arange(10_000))
    assert len(calls) == 2
    np.testing.assert_array_equal(load(image_dir), np.arange(10_000))  # a plain hit
    assert len(calls) == 2


def flip_a_data_bit(entry: Path) -> None:
    data = entry / "result.joblib"
    raw = bytearray(data.read_bytes())
    raw[-8] ^= 0x01  # inside the last int64 of the array: same size, still loads
    data.write_bytes(bytes(raw))


def test_same_size_bit_flip_is_caught_with_verify_always(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []
    trusting = corrupting_loader(cache_dir, calls)
    trusting(image_dir)
    flip_a_data_bit(entry_of(trusting, image_dir))
    # The documented trade-off: the default size-only check does not read the data...
    assert trusting(image_dir)[-1] != 9999
    verifying = corrupting_loader(cache_dir, calls, verify="always")
    with pytest.warns(CorruptEntryWarning, match="checksum"):
        assert verifying(image_dir)[-1] == 9999
    assert verifying(image_dir)[-1] == 9999


def test_a_corrupt_entry_found_by_another_process_is_healed_once(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    env = {"CACHE": str(cache_dir), "COUNTER": str(counter_file)}
    finish(start_child(tmp_path, f"load({str(image_dir)!r})", **env))
    entry = next(p for p in next(cache_dir.iterdir()).iterdir() if p.is_dir())
    truncate(entry)
    script = f"""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(load({str(image_dir)!r}).sum(), len(caught))
    """
    assert finish(start_child(tmp_path, script, **env)).split() == [str(64 * 64 * 2), "1"]
    assert finish(start_child(tmp_path, script, **env)).split() == [str(64 * 64 * 2), "0"]
    assert runs(counter_file) == 2


# --- storing can fail without losing the result ------------------------------------------------


def big_loader(cache_dir: Path, calls: list[int]) -> Any:
    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> np.ndarray:
        calls.append(1)
        return np.ones(4 * 1024 * 1024, dtype=np.uint8)

    return load


def call_counting_store_warnings(load: Any, *args: Any) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load(*args)
    return result, store_warnings(caught)


def test_read_only_cache_dir_returns_the_result_with_one_warning(
    image_dir: Path, mount_point: Path
) -> None:
    mount_tmpfs(mount_point, "8m", read_only=True)
    calls: list[int] = []
    load = big_loader(mount_point / "cache", calls)
    result, messages = call_counting_store_warnings(load, image_dir)
    assert result.sum() == 4 * 1024 * 1024
    assert len(messages) == 1
    assert str(mount_point / "cache") in messages[0] and "Read-only" in messages[0]


def test_read_only_cache_still_serves_hits(image_dir: Path, mount_point: Path) -> None:
    mount_tmpfs(mount_point, "16m")
    calls: list[int] = []
    load = big_loader(mount_point, calls)
    load(image_dir)
    remount_read_only(mount_point)
    result, messages = call_counting_store_warnings(load, image_dir)
    assert result.sum() == 4 * 1024 * 1024
    assert messages == [] and len(calls) == 1


def test_full_disk_returns_the_result_and_leaves_no_partial_files(
    image_dir: Path, mount_point: Path
) -> None:
    mount_tmpfs(mount_point, "1m")
    calls: list[int] = []
    load = big_loader(mount_point, calls)
    result, messages = call_counting_store_warnings(load, image_dir)
    assert result.sum() == 4 * 1024 * 1024
    assert len(messages) == 1
    assert str(mount_point) in messages[0] and "No space left" in messages[0]
    leftovers = [p for p in mount_point.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert not any(p.name == "result.joblib" for p in mount_point.rglob("*"))


@pytest.mark.parametrize("kind", ["under_a_file", "name_too_long"])
def test_uncreatable_cache_dir_returns_the_result_with_one_warning(
    image_dir: Path, tmp_path: Path, kind: str
) -> None:
    if kind == "under_a_file":
        (tmp_path / "plain_file").write_text("not a folder")
        cache = tmp_path / "plain_file" / "cache"
    else:
        cache = tmp_path / ("x" * 300)
    calls: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = big_loader(cache, calls)(image_dir)
    assert result.sum() == 4 * 1024 * 1024
    assert len(caught) == 1  # that one warning, and no other
    assert issubclass(caught[0].category, CacheStoreWarning)
    assert str(cache) in str(caught[0].message)
    assert caught[0].filename == __file__


def test_file_too_large_returns_the_result_with_one_warning(
    image_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "child_loader.py").write_text(CHILD_LOADER)
    script = f"""
        import resource, signal, sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
        from child_loader import load
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            total = int(load({str(image_dir)!r}).sum())
        messages = [str(w.message) for w in caught]
        print(total, len(messages), "File too large" in messages[0])
    """
    out = run_python(script, CACHE=str(cache_dir), COUNTER=str(tmp_path / "counter")).stdout
    assert out.split() == [str(64 * 64 * 2), "1", "True"]
    assert not any(p.name.startswith(".tmp-") for p in cache_dir.rglob("*"))


# --- racy mtimes ----------------------------------------------------------------------------------


def test_fresh_tree_hits_on_the_next_call(tmp_path: Path, cache_dir: Path) -> None:
    folder = write_images(tmp_path / "fresh")  # just written: every file is racy
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> int:
        calls.append(1)
        return len(list(image_dir.rglob("*.png")))

    assert load(folder) == 6
    assert load(folder) == 6
    assert len(calls) == 1


def test_same_size_rewrite_within_the_mtime_tick_is_detected(
    tmp_path: Path, cache_dir: Path
) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    target = folder / "labels.csv"
    target.write_text("cat\n")
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> str:
        calls.append(1)
        return (image_dir / "labels.csv").read_text()

    assert load(folder) == "cat\n"
    info = target.stat()
    target.write_text("dog\n")  # same size; the clock tick (or a tool) keeps the mtime
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert load(folder) == "dog\n"
    assert len(calls) == 2
    assert load(folder) == "dog\n"
    assert len(calls) == 2


def test_racy_records_are_dropped_once_the_window_has_passed(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_images(tmp_path / "fresh")
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> int:
        calls.append(1)
        return 1

    load(folder)
    meta_file = load.cache_path(folder) / "meta.json"
    assert json.loads(meta_file.read_text())["racy"]
    load(folder)
    assert json.loads(meta_file.read_text())["racy"]  # still within the window
    monkeypatch.setattr(cachedload.keys, "RACY_WINDOW_NS", -(10**12))  # "much later"
    load(folder)
    assert "racy" not in json.loads(meta_file.read_text())
    assert len(calls) == 1


def test_old_trees_record_no_racy_files(image_dir: Path, cache_dir: Path) -> None:
    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> int:
        return 1

    load(image_dir)
    assert json.loads((load.cache_path(image_dir) / "meta.json").read_text())["racy"] == {}


# --- sources changing while the body runs ---------------------------------------------------------


@pytest.mark.parametrize("order", ["read_then_change", "change_then_read", "same_tick_rewrite"])
def test_sources_changing_during_the_body_are_not_stored(
    tmp_path: Path, cache_dir: Path, order: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    target = folder / "labels.csv"
    target.write_text("old\n")
    if order != "same_tick_rewrite":
        age(folder)
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> str:
        calls.append(1)
        if order == "change_then_read":
            target.write_text("new data\n")
        text = target.read_text()
        if order == "read_then_change" and len(calls) == 1:
            target.write_text("new data\n")
        if order == "same_tick_rewrite" and len(calls) == 1:
            info = target.stat()
            target.write_text("NEW\n")
            os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        return text

    with pytest.warns(SourceChangedWarning):
        first = load(folder)
    assert first == ("new data\n" if order == "change_then_read" else "old\n")
    assert not load.is_cached(folder)
    assert load.cache_info().entries == 0
    if order == "change_then_read":
        return
    second = load(folder)  # the files are stable now: stored, then hit
    assert second == target.read_text()
    assert load(folder) == second
    assert len(calls) == 2


@pytest.mark.parametrize(
    "racy",
    [{"racy": "x"}, {"racy": {"image_dir": ["a.png"]}}, {"racy_newest_mtime_ns": "soon"}],
    ids=["not-a-mapping", "files-not-a-mapping", "mtime-not-a-number"],
)
def test_valid_json_with_invalid_racy_records_is_a_corrupt_entry(
    image_dir: Path, cache_dir: Path, racy: dict[str, Any]
) -> None:
    calls: list[int] = []
    load = corrupting_loader(cache_dir, calls)
    load(image_dir)
    meta_file = entry_of(load, image_dir) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, **racy}))
    with pytest.warns(CorruptEntryWarning, match="recently modified"):
        np.testing.assert_array_equal(load(image_dir), np.arange(10_000))
    assert len(calls) == 2
    np.testing.assert_array_equal(load(image_dir), np.arange(10_000))
    assert len(calls) == 2


@pytest.mark.parametrize("when", ["fingerprinting", "body"])
def test_symlink_retargeted_during_a_call_is_not_stored_under_the_old_target(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # data -> v1 is switched to v2 while the call runs; v1 and v2 look the same to mtime
    # fingerprints (same names, sizes, mtimes). The key names v1, the body may read v2: its
    # result must not be filed under v1.
    for name, text in (("v1", "AAAA"), ("v2", "BBBB")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text(text)
        os.utime(tmp_path / name / "x.txt", (1e9, 1e9))
    link = tmp_path / "data"
    os.symlink(tmp_path / "v1", link)

    def switch(target: str) -> None:
        os.symlink(tmp_path / target, tmp_path / "new")
        os.replace(tmp_path / "new", link)

    pending = ["v2"]
    real_fingerprint = cachedload.fingerprint.fingerprint_source

    def fingerprint_source(path: Any, **options: Any) -> Any:
        if when == "fingerprinting" and pending:
            switch(pending.pop())
        return real_fingerprint(path, **options)

    monkeypatch.setattr(cachedload.keys, "fingerprint_source", fingerprint_source)

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: str) -> str:
        if when == "body" and pending:
            switch(pending.pop())
        return (Path(folder) / "x.txt").read_text()

    with pytest.warns(SourceChangedWarning):
        load(str(link))
    switch("v1")
    assert load(str(link)) == "AAAA"


def _generator() -> Any:
    return (i for i in range(3))


def _lock_in_a_dict() -> Any:
    return {"images": np.zeros(4), "lock": threading.Lock()}


def _local_class_instance() -> Any:
    class Local:
        def __init__(self) -> None:
            self.value = 1

    return [np.zeros(2), Local()]


@pytest.mark.parametrize(
    "make, where, kind",
    [
        (_generator, "load_unpicklable: result is a", "generator"),
        (_lock_in_a_dict, "result['lock']", "_thread.lock"),
        (_local_class_instance, "result[1]", "<locals>.Local"),
    ],
    ids=["generator", "lock-in-a-dict", "local-class"],
)
def test_an_unpicklable_result_is_returned_with_one_store_warning(
    image_dir: Path, cache_dir: Path, make: Any, where: str, kind: str
) -> None:
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load_unpicklable(image_dir: Path) -> Any:
        calls.append(1)
        return make()

    for expected_runs in (1, 2):  # nothing stored: the second call runs the body again
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = load_unpicklable(image_dir)
        assert [w.category for w in caught] == [CacheStoreWarning]
        message = str(caught[0].message)
        assert "load_unpicklable" in message and where in message and kind in message
        assert caught[0].filename == __file__  # attributed to the caller
        assert len(calls) == expected_runs
        assert result is not None
    function_dirs = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert [
        p.name for d in function_dirs for p in d.iterdir() if not p.name.endswith(".lock")
    ] == []
