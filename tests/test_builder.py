"""The per-item build engine: exact call counts, incremental == from scratch, bounded memory."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachedload import builder, entry, serialize
from cachedload.builder import BuildReport, ItemArray, PreviousBuild, build_items, scan_items
from cachedload.errors import CachedloadError, ItemShapeMismatchError
from cachedload.fingerprint import RACY_WINDOW_NS, hash_file

from .conftest import subprocess_env

OLD_NS = time.time_ns() - 86_400 * 10**9  # a day ago: far outside the racy window


def row_of(path: str, counter: str | None = None, shape: tuple[int, ...] = (2, 3)) -> Any:
    """The item function of these tests: a row derived from the file's text; counts calls."""
    if counter is not None:
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (os.path.basename(path) + "\n").encode())
        finally:
            os.close(fd)
    value = int(Path(path).read_text())
    return np.full(shape, value, dtype=np.int64) + np.arange(int(np.prod(shape))).reshape(shape)


def row_off_the_driver(path: str, driver: int, counter: str) -> Any:
    """``row_of``, refusing to run in the process that started the build (``driver``)."""
    if os.getpid() == driver:
        raise AssertionError(f"{path} computed in the driver process")
    return row_of(path, counter)


def calls(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def write(root: Path, name: str, value: int, mtime_ns: int = OLD_NS) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value:08d}")
    os.utime(path, ns=(mtime_ns, mtime_ns))


class Builds:
    """Builds one folder again and again, each build incremental on the one before."""

    def __init__(
        self,
        root: Path,
        out: Path,
        counter: Path | None = None,
        via_entry: bool = False,
        **options: Any,
    ):
        """``via_entry``: the records go through an entry's manifest and metadata, as
        ``.map`` stores them (else: ``BuildReport.records``, a dict)."""
        self.root, self.out, self.counter, self.options = root, out, counter, options
        self.via_entry = via_entry
        out.mkdir(parents=True, exist_ok=True)
        self.previous: PreviousBuild | None = None
        self.number = 0

    def build(self, taken_ns: int | None = None, incremental: bool = True) -> tuple[Path, Any]:
        items, fp = scan_items(self.root)
        self.number += 1
        path = self.out / f"build{self.number}.joblib"
        params = {"counter": str(self.counter)} if self.counter else {}
        report = build_items(
            row_of,
            items,
            path,
            params=params,
            previous=self.previous if incremental else None,
            taken_ns=fp.taken_ns if taken_ns is None else taken_ns,
            **self.options,
        )
        if incremental:
            records: Any = report.records
            if self.via_entry:
                raw = entry.encode_manifest({"items": report.table.columns()})
                meta = {"racy": {"items": report.digests}}
                records = entry.item_records(
                    entry.decode_manifest(raw, columns=True), meta, "items"
                )
            self.previous = PreviousBuild(path, records)
        return path, report

    def scratch(self, taken_ns: int | None = None) -> Path:
        return self.build(taken_ns, incremental=False)[0]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for index in range(20):
        write(root, f"{('a', 'b')[index % 2]}/f{index:04d}.txt", index)
    return root


def test_a_build_holds_every_row_in_sorted_path_order(folder: Path, tmp_path: Path) -> None:
    path, report = Builds(folder, tmp_path).build()
    value = serialize.load(path, mmap_mode="r")
    assert isinstance(value, ItemArray)
    assert value.paths == tuple(sorted(value.paths)) and len(value.paths) == 20
    assert value.paths[0] == "a/f0000.txt" and "/" in value.paths[-1]
    for row, relpath in enumerate(value.paths):
        assert (value.array[row] == row_of(str(folder / relpath))).all()
    assert (report.computed, report.reused) == (20, 0)
    assert report.checksum == hash_file(path) and report.size == path.stat().st_size
    assert joblib.load(path).paths == value.paths


def test_one_changed_file_costs_exactly_one_call(folder: Path, tmp_path: Path) -> None:
    counter = tmp_path / "calls.txt"
    builds = Builds(folder, tmp_path, counter)
    builds.build()
    assert calls(counter) == 20
    write(folder, "a/f0004.txt", 999, OLD_NS + 10**9)
    path, report = builds.build()
    assert calls(counter) == 21 and (report.computed, report.reused) == (1, 19)
    assert path.read_bytes() == builds.scratch().read_bytes()


def test_a_thousand_added_files_cost_exactly_a_thousand_calls(folder: Path, tmp_path: Path) -> None:
    counter = tmp_path / "calls.txt"
    builds = Builds(folder, tmp_path, counter)
    builds.build()
    for index in range(1000):
        write(folder, f"c/g{index:04d}.txt", 1000 + index)
    path, report = builds.build()
    assert calls(counter) == 20 + 1000 and report.computed == 1000 and report.reused == 20
    assert path.read_bytes() == builds.scratch().read_bytes()


def test_a_removed_file_costs_no_call(folder: Path, tmp_path: Path) -> None:
    counter = tmp_path / "calls.txt"
    builds = Builds(folder, tmp_path, counter)
    builds.build()
    (folder / "b/f0007.txt").unlink()
    path, report = builds.build()
    assert calls(counter) == 20 and (report.computed, report.reused) == (0, 19)
    value = serialize.load(path, mmap_mode=None)
    assert "b/f0007.txt" not in value.paths and value.array.shape == (19, 2, 3)
    assert path.read_bytes() == builds.scratch().read_bytes()


@pytest.mark.parametrize("via_entry", [False, True])
def test_a_same_size_rewrite_in_the_same_mtime_tick_is_seen(
    tmp_path: Path, via_entry: bool
) -> None:
    root = tmp_path / "src"
    now = time.time_ns()
    write(root, "x.txt", 1, now)  # racy: written just now, its record carries a content hash
    write(root, "y.txt", 2)
    counter = tmp_path / "calls.txt"
    builds = Builds(root, tmp_path, counter, via_entry=via_entry)
    _, first = builds.build(taken_ns=now)
    assert first.records["x.txt"].content_hash is not None
    assert first.records["y.txt"].content_hash is None
    write(root, "x.txt", 3, now)  # same size, same mtime: only the content tells
    path, report = builds.build(taken_ns=now + 10 * RACY_WINDOW_NS)
    assert report.computed == 1 and serialize.load(path, mmap_mode="r").array[0, 0, 0] == 3
    assert report.records["x.txt"].content_hash is None  # no longer racy
    _, again = builds.build(taken_ns=now + 10 * RACY_WINDOW_NS)
    assert again.computed == 0


def test_rows_of_another_shape_name_two_files(folder: Path, tmp_path: Path) -> None:
    def odd(path: str) -> Any:
        return row_of(path, shape=(3, 3) if path.endswith("f0013.txt") else (2, 3))

    items, _ = scan_items(folder)
    with pytest.raises(ItemShapeMismatchError) as caught:
        build_items(odd, items, tmp_path / "out.joblib", n_jobs=2, batch_bytes=64)
    error = caught.value
    assert isinstance(error, CachedloadError) and isinstance(error, ValueError)
    assert error.first == "a/f0000.txt" and error.second == "b/f0013.txt"
    assert error.second_shape == (3, 3) and "ragged=True" in str(error)


def test_ragged_rows_make_a_list_and_rebuild_incrementally(folder: Path, tmp_path: Path) -> None:
    def ragged(path: str, counter: str) -> Any:
        value = int(Path(path).read_text())
        return row_of(path, counter, shape=(1 + value % 3,))

    counter = tmp_path / "calls.txt"
    items, _ = scan_items(folder)
    params = {"counter": str(counter)}
    first = build_items(ragged, items, tmp_path / "one", params=params, ragged=True)
    write(folder, "a/f0002.txt", 77, OLD_NS + 1)
    items, _ = scan_items(folder)
    previous = PreviousBuild(tmp_path / "one", first.records)
    report = build_items(
        ragged, items, tmp_path / "two", params=params, ragged=True, previous=previous
    )
    assert (report.computed, calls(counter)) == (1, 21)
    value = serialize.load(tmp_path / "two", mmap_mode=None)
    assert isinstance(value.array, list) and [len(r) for r in value.array[:3]] == [1, 3, 2]
    fresh = build_items(ragged, items, tmp_path / "three", params=params, ragged=True)
    assert fresh.checksum == report.checksum


def test_an_item_function_error_names_the_file(folder: Path, tmp_path: Path) -> None:
    def broken(path: str) -> Any:
        if path.endswith("f0011.txt"):
            raise KeyError("no label")
        return row_of(path)

    items, _ = scan_items(folder)
    with pytest.raises(KeyError) as caught:
        build_items(broken, items, tmp_path / "out.joblib", n_jobs=2, batch_bytes=64)
    assert f"while loading {folder / 'b/f0011.txt'}" in getattr(caught.value, "__notes__", [])


class BatchForm:
    """An item function with a batch form (``rows_into``) that declines some files; both
    count the rows they compute."""

    def __init__(self, declined: tuple[str, ...]) -> None:
        self.declined, self.by_item, self.by_batch = declined, 0, 0

    def __call__(self, path: str) -> Any:
        self.by_item += 1
        if path.endswith("f0011.txt"):
            raise KeyError("no label")
        return row_of(path, shape=(3, 3) if path.endswith("f0013.txt") else (2, 3))

    def rows_into(self, paths: list[str], out: np.ndarray) -> int:
        for done, path in enumerate(paths):
            if path.endswith(self.declined):
                return done
            out[done] = row_of(path)
            self.by_batch += 1
        return len(paths)


def test_a_batch_form_computes_the_rows_the_item_function_only_where_it_stops(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builder, "_BATCHES_PER_THREAD", 1)  # batches of 8: it stops mid-batch
    items, _ = scan_items(folder)
    expected = build_items(row_of, items, tmp_path / "plain.joblib")
    fn = BatchForm(declined=("f0004.txt", "f0005.txt"))
    report = build_items(fn, items, tmp_path / "batch.joblib", n_jobs=2, batch_bytes=48 * 8)
    assert report.checksum == expected.checksum
    assert (fn.by_item, fn.by_batch) == (3, 17)  # the first row (it fixes the shape), 4 and 5


@pytest.mark.parametrize(("declined", "error"), [("f0011.txt", KeyError), ("f0013.txt", None)])
def test_where_a_batch_form_stops_the_item_function_raises_or_reports(
    folder: Path, tmp_path: Path, declined: str, error: type[Exception] | None
) -> None:
    items, _ = scan_items(folder)
    fn = BatchForm(declined=(declined,))
    with pytest.raises(error or ItemShapeMismatchError) as caught:
        build_items(fn, items, tmp_path / "out.joblib", n_jobs=2, batch_bytes=48 * 8)
    if error is None:
        assert caught.value.second == "b/f0013.txt"  # type: ignore[attr-defined]
    else:
        notes = getattr(caught.value, "__notes__", [])
        assert f"while loading {folder / 'b/f0011.txt'}" in notes


def test_rows_are_copied_without_copy_file_range(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = Builds(folder, tmp_path)
    builds.build()
    write(folder, "a/f0010.txt", 5, OLD_NS + 1)

    def refuse(*args: Any) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    path, report = builds.build()
    assert report.reused == 19
    assert path.read_bytes() == builds.scratch().read_bytes()


def test_an_unreadable_previous_build_means_a_full_build(folder: Path, tmp_path: Path) -> None:
    counter = tmp_path / "calls.txt"
    builds = Builds(folder, tmp_path, counter)
    path, _ = builds.build()
    path.write_bytes(b"garbage")
    _, report = builds.build()
    assert report.computed == 20 and report.full_build_reason is not None


def test_the_loky_backend_builds_the_same_file(folder: Path, tmp_path: Path) -> None:
    counter = tmp_path / "calls.txt"
    local = Builds(folder, tmp_path / "local").scratch()
    path, report = Builds(folder, tmp_path, counter, backend="loky", n_jobs=2).build()
    assert calls(counter) == 20 and report.computed == 20
    assert path.read_bytes() == local.read_bytes()


class _ListOnlyBackend(joblib.parallel.ThreadingBackend):  # type: ignore[misc]
    """Threads, but results only as whole lists, as Ray's joblib backend gives them (and
    not taken for this process's threads, so the build goes through joblib)."""

    supports_return_generator = False
    uses_threads = False
    dispatched = 0

    def submit(self, func: Any, callback: Any = None) -> Any:
        type(self).dispatched += 1
        return super().submit(func, callback)


def test_a_backend_without_streamed_results_builds_in_windows(folder: Path, tmp_path: Path) -> None:
    joblib.register_parallel_backend("list-only", _ListOnlyBackend)
    counter = tmp_path / "calls.txt"
    local = Builds(folder, tmp_path / "local").scratch()
    _ListOnlyBackend.dispatched = 0
    with joblib.parallel_config(backend="list-only", n_jobs=2):
        path, report = Builds(folder, tmp_path, counter, batch_bytes=48).build()
    assert calls(counter) == 20 and report.computed == 20
    assert _ListOnlyBackend.dispatched >= 19  # one row (48 bytes) per batch, all through it
    assert path.read_bytes() == local.read_bytes()


@contextlib.contextmanager
def dask_backend(distributed: Any) -> Iterator[None]:
    """joblib's dask backend on a real two-worker LocalCluster on loopback (no dashboard)."""
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            # Its HTTP server (no dashboard) on a free loopback port: the default, 8787, may be
            # taken, and the "already in use" warning is an error under filterwarnings=error.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            host="127.0.0.1",
        ) as cluster,
        distributed.Client(cluster),
        joblib.parallel_config(backend="dask"),
    ):
        yield


def test_a_dask_cluster_computes_each_item_once(folder: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    counter = tmp_path / "calls.txt"
    local = Builds(folder, tmp_path / "local").scratch()
    with dask_backend(distributed):
        path, report = Builds(folder, tmp_path, counter, batch_bytes=64).build()
    assert calls(counter) == 20 and report.computed == 20
    assert sorted(counter.read_text().split()) == sorted(p.name for p in folder.rglob("*.txt"))
    assert path.read_bytes() == local.read_bytes()


def build_off_the_driver(folder: Path, path: Path, counter: Path, **options: Any) -> Any:
    items, fp = scan_items(folder)
    params = {"driver": os.getpid(), "counter": str(counter)}
    return build_items(row_off_the_driver, items, path, params=params, taken_ns=fp.taken_ns,
                       batch_bytes=64, **options)  # fmt: skip


def test_a_dask_cluster_computes_every_item_on_its_workers(folder: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    local = Builds(folder, tmp_path / "local").scratch()
    counter, path = tmp_path / "calls.txt", tmp_path / "built.joblib"
    with dask_backend(distributed):
        report = build_off_the_driver(folder, path, counter)
    assert calls(counter) == 20 and report.computed == 20
    assert path.read_bytes() == local.read_bytes()


def test_loky_computes_every_item_in_its_workers(folder: Path, tmp_path: Path) -> None:
    local = Builds(folder, tmp_path / "local").scratch()
    counter, path = tmp_path / "calls.txt", tmp_path / "built.joblib"
    report = build_off_the_driver(folder, path, counter, backend="loky", n_jobs=2)
    assert calls(counter) == 20 and report.computed == 20
    assert path.read_bytes() == local.read_bytes()


# -- a property: whatever the edits, an incremental build equals a build from scratch ---------

NAMES = [f"{d}n{i}.txt" for d in ("", "d/", "d/e/") for i in range(5)]
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "rewrite", "rename", "touch", "racy_rewrite"]),
        st.sampled_from(NAMES),
        st.sampled_from(NAMES),
        st.integers(0, 99_999_999),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.sets(st.sampled_from(NAMES), max_size=8), edits=EDITS, via_entry=st.booleans())
def test_incremental_builds_always_equal_a_build_from_scratch(
    start: set[str], edits: list[tuple[str, str, str, int]], via_entry: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "src", Path(tmp) / "out"
        root.mkdir()
        out.mkdir()
        clock = OLD_NS  # a fake clock, 10 s per step: racy only what this step wrote
        for index, name in enumerate(sorted(start)):
            write(root, name, index, clock)
        builds = Builds(root, out, via_entry=via_entry, n_jobs=2, batch_bytes=48)
        builds.build(taken_ns=clock)
        for kind, name, other, value in edits:
            previous_clock, clock = clock, clock + 10 * 10**9
            path = root / name
            if kind == "add" and not path.exists():
                write(root, name, value, clock)
            elif kind == "remove" and path.exists():
                path.unlink()
            elif kind == "rewrite" and path.exists():
                write(root, name, value, clock)
            elif kind == "rename" and path.exists() and not (root / other).exists():
                (root / other).parent.mkdir(parents=True, exist_ok=True)
                path.rename(root / other)
            elif kind == "touch" and path.exists():
                os.utime(path, ns=(clock, clock))
            elif kind == "racy_rewrite":
                # Written within the last build's racy window: rewrite it, same size, same
                # mtime, as a file system with coarse timestamps would show it.
                for candidate in sorted(root.rglob("*.txt")):
                    if candidate.stat().st_mtime_ns >= previous_clock - RACY_WINDOW_NS:
                        write(root, str(candidate.relative_to(root)), value, previous_clock)
                        break
            built, _ = builds.build(taken_ns=clock)
            assert built.read_bytes() == builds.scratch(taken_ns=clock).read_bytes()


# -- bounded memory ---------------------------------------------------------------------------


def _memory_cgroup(name: str) -> tuple[Path, str] | None:
    """A fresh memory cgroup below this process's own (v2 or v1), or None where impossible."""
    if os.geteuid() != 0:
        return None
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in own:
        _, controllers, where = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            parent = Path("/sys/fs/cgroup") / where.lstrip("/")
            limit = "memory.max"
        elif "memory" in controllers.split(","):
            parent = Path("/sys/fs/cgroup/memory") / where.lstrip("/")
            limit = "memory.limit_in_bytes"
        else:
            continue
        group = parent / name
        try:
            group.mkdir()
            (group / limit).write_text(str(512 * 1024 * 1024))
        except OSError:
            if group.exists():
                group.rmdir()
            continue
        return group, limit
    return None


BUILD_2GIB = """
    import os, sys, threading, time
    cgroup = sys.argv[1]
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    import numpy as np
    from cachedload.builder import build_items, scan_items

    peak = 0
    def sample():
        global peak
        while True:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            time.sleep(0.005)
    threading.Thread(target=sample, daemon=True).start()

    ROW = 1 << 18  # uint32s: 1 MiB a row
    def row(path):
        index = int(os.path.basename(path))
        return np.arange(index * ROW, (index + 1) * ROW, dtype=np.uint32)

    root, out = sys.argv[2], sys.argv[3]
    os.makedirs(root)
    for index in range(2048):
        with open(os.path.join(root, f"{index:05d}"), "w"):
            pass
    items, fp = scan_items(root)
    report = build_items(row, items, out, taken_ns=fp.taken_ns)
    build_peak = peak
    from cachedload import serialize
    value = serialize.load(out, mmap_mode="r")
    assert value.array.shape == (2048, ROW), value.array.shape
    expected = np.arange(ROW, dtype=np.uint32)
    for index in range(2048):  # every row, checked without keeping it
        assert (value.array[index] - expected == index * ROW).all(), index
    print(report.computed, report.size, build_peak)
"""


def test_a_build_larger_than_its_memory_limit_keeps_every_row(tmp_path: Path) -> None:
    group = _memory_cgroup(f"cachedload-test-{os.getpid()}")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(BUILD_2GIB),
                str(group[0]) if group else "",
                str(tmp_path / "src"),
                str(tmp_path / "out.joblib"),
            ],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=120,
        )
        assert done.returncode == 0, f"build failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    finally:
        if group:
            group[0].rmdir()
    computed, size, peak = map(int, done.stdout.split())
    assert computed == 2048 and size > 2 * 1024**3
    assert peak < size // 8, f"anonymous memory peaked at {peak} bytes for {size}"


def test_the_report_is_a_plain_record(folder: Path, tmp_path: Path) -> None:
    _, report = Builds(folder, tmp_path).build()
    assert isinstance(report, BuildReport) and report.row_shape == (2, 3)
    assert report.records["a/f0000.txt"] == builder.RowRecord(0, 8, OLD_NS, None)


# -- items left out: build_items(skip=...) --------------------------------------------------------


def unreadable(root: Path, name: str, mtime_ns: int = OLD_NS) -> None:
    """A file ``row_of`` cannot read (a ValueError)."""
    (root / name).write_text("not a number")
    os.utime(root / name, ns=(mtime_ns, mtime_ns))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"n_jobs": 2, "batch_bytes": 96},
        {"in_memory": True},
        {"ragged": True},
        {"backend": "loky", "n_jobs": 2, "batch_bytes": 96},
    ],
)
def test_skipped_items_are_left_out_and_tried_again_until_fixed(
    folder: Path, tmp_path: Path, options: dict[str, Any]
) -> None:
    for name in ("a/f0000.txt", "b/f0007.txt", "b/f0009.txt"):  # the very first one too
        unreadable(folder, name)
    counter = tmp_path / "calls.txt"
    builds = Builds(folder, tmp_path / "out", counter, skip=(ValueError,), **options)
    path, report = builds.build()
    assert list(report.skipped) == ["a/f0000.txt", "b/f0007.txt", "b/f0009.txt"]
    assert all(isinstance(error, ValueError) for error in report.skipped.values())
    assert calls(counter) == 20 and report.computed == 20
    value = serialize.load(path, mmap_mode=None)
    assert value.skipped == tuple(report.skipped) and len(value.paths) == 17
    assert not set(value.paths) & set(report.skipped)
    for row, relpath in enumerate(value.paths):
        assert (np.asarray(value.array[row]) == row_of(str(folder / relpath))).all()
        assert report.records[relpath].row == row
    assert report.records["b/f0007.txt"].row == -1
    assert report.checksum == hash_file(path) and report.size == path.stat().st_size
    if report.value is not None:  # built in memory: what loading the file gives
        assert np.array_equal(report.value.array, value.array)
        assert report.value.paths == value.paths and report.value.skipped == value.skipped
    write(folder, "a/f0004.txt", 999, OLD_NS + 1)  # a miss tries the skipped ones again
    path, report = builds.build()
    assert calls(counter) == 24 and (report.computed, report.reused) == (4, 16)
    assert path.read_bytes() == builds.scratch().read_bytes()
    write(folder, "b/f0007.txt", 7, OLD_NS + 1)  # fixed
    path, report = builds.build()
    assert list(report.skipped) == ["a/f0000.txt", "b/f0009.txt"] and report.computed == 3
    assert serialize.load(path, mmap_mode="r").paths.count("b/f0007.txt") == 1
    assert path.read_bytes() == builds.scratch().read_bytes()


def test_every_item_skipped_leaves_an_empty_result(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for name in ("x.txt", "y.txt"):
        unreadable(root, name)
    items, _ = scan_items(root)
    report = build_items(row_of, items, tmp_path / "out", skip=(ValueError,))
    value = serialize.load(tmp_path / "out", mmap_mode="r")
    assert value.paths == () and value.skipped == ("x.txt", "y.txt") and len(value.array) == 0
    assert [record.row for record in report.records.values()] == [-1, -1]


def test_an_error_not_in_skip_still_fails_the_build(folder: Path, tmp_path: Path) -> None:
    unreadable(folder, "a/f0002.txt")
    items, _ = scan_items(folder)
    with pytest.raises(ValueError, match="not a number"):
        build_items(row_of, items, tmp_path / "out", skip=(KeyError,))


def test_progress_is_told_before_the_first_row_and_after_each_batch(
    folder: Path, tmp_path: Path
) -> None:
    told: list[tuple[int, int]] = []
    items, _ = scan_items(folder)
    build_items(row_of, items, tmp_path / "one", n_jobs=2, batch_bytes=96,
                progress=lambda done, total: told.append((done, total)))  # fmt: skip
    assert told[0] == (0, 20) and told[-1] == (20, 20) and len(told) > 3
    assert told == sorted(told)
    first = build_items(row_of, items, tmp_path / "two")
    write(folder, "a/f0002.txt", 5, OLD_NS + 1)
    items, _ = scan_items(folder)
    told.clear()
    previous = PreviousBuild(tmp_path / "two", first.records)
    build_items(row_of, items, tmp_path / "three", previous=previous,
                progress=lambda done, total: told.append((done, total)))  # fmt: skip
    assert told == [(0, 1), (1, 1)]  # the rows computed: the copied ones are not counted
