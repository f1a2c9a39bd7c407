"""Shared chunked reads and the read-ahead of a hit: right bytes, never the wrong entry."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import cached_dataset, reading
from cachedload.errors import CorruptEntryWarning
from cachedload.reading import NOTHING, ReadAhead, ReadCancelled, SharedReader

from .conftest import age, run_python

MIB = 1024 * 1024


def _file(tmp_path: Path, nbytes: int) -> tuple[Path, bytes]:
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("nbytes", "helpers", "shared"),
    [(1, 1, False), (3 * MIB, 1, False), (70 * MIB + 5, 1, False), (70 * MIB + 5, 3, False)],
)
def test_shared_reader_fills_the_buffer_exactly(
    tmp_path: Path, nbytes: int, helpers: int, shared: bool
) -> None:
    path, data = _file(tmp_path, nbytes + 100)
    buffer = bytearray(nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        SharedReader(helpers, shared=shared).read(fd, memoryview(buffer), 100)
    finally:
        os.close(fd)
    assert bytes(buffer) == data[100:]


def _read_and_finish(reader: SharedReader, fd: int, buffer: bytearray) -> None:
    """What a loading thread does: read the whole file into ``buffer``, then finish."""
    reader.read(fd, memoryview(buffer), 0)
    reader.finish()


def test_shared_reader_with_a_helping_thread(tmp_path: Path) -> None:
    # Chunks of 8 MiB taken by the reading thread and by a helper, in whatever order.
    path, data = _file(tmp_path, 40 * MIB + 3)
    buffer = bytearray(len(data))
    reader = SharedReader(helpers=0, shared=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        loader = threading.Thread(target=_read_and_finish, args=(reader, fd, buffer))
        loader.start()
        reader.help()
        loader.join()
    finally:
        os.close(fd)
    assert bytes(buffer) == data


def test_helper_leaves_a_small_remainder_to_the_loading_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = _file(tmp_path, 40 * MIB)
    readers: list[str] = []
    original = reading.read_exactly

    def spy(fd: int, view: memoryview, offset: int) -> None:
        readers.append(threading.current_thread().name)
        original(fd, view, offset)

    monkeypatch.setattr(reading, "read_exactly", spy)
    buffer = bytearray(len(data))
    reader = SharedReader(helpers=0, shared=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        loader = threading.Thread(target=_read_and_finish, args=(reader, fd, buffer), name="loader")
        loader.start()
        reader.help(min_queued=64 * MIB)  # 40 MiB is less: nothing to help with
        loader.join()
    finally:
        os.close(fd)
    assert bytes(buffer) == data
    assert set(readers) == {"loader"} and len(readers) == 5  # five 8 MiB chunks


def test_shared_reader_reports_a_short_file(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 70 * MIB)
    buffer = bytearray(80 * MIB)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match="short"):
            SharedReader(1).read(fd, memoryview(buffer), 0)
    finally:
        os.close(fd)


def test_cancelled_reader_raises(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 1024)
    reader = SharedReader(helpers=0, shared=True)
    reader.cancel()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ReadCancelled):
            reader.read(fd, memoryview(bytearray(1024)), 0)
    finally:
        os.close(fd)


def _load_bytes(path: Path, read: threading.Event | None = None) -> Any:
    """A read-ahead loader of ``path``'s bytes; sets ``read`` once it has read them all."""

    def load(reader: SharedReader, opened: Any) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            opened(fd)
            buffer = bytearray(os.fstat(fd).st_size)
            reader.read(fd, memoryview(buffer), 0)
            return bytes(buffer)
        finally:
            os.close(fd)
            if read is not None:
                read.set()

    return load


def test_read_ahead_returns_the_value_of_the_same_file(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 20 * MIB)
    ahead = ReadAhead(_load_bytes(path))
    assert ahead.take(os.stat(path)) == data
    assert ahead.used


def test_read_ahead_of_a_replaced_file_is_not_used(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 1 * MIB)
    read = threading.Event()
    ahead = ReadAhead(_load_bytes(path, read))
    assert read.wait(timeout=60)  # the old file read completely
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(data[::-1])
    os.replace(replacement, path)  # same size, new inode: an entry published again
    assert ahead.take(os.stat(path)) is NOTHING
    assert not ahead.used


def test_read_ahead_of_a_missing_file_is_not_used(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 10)
    ahead = ReadAhead(_load_bytes(tmp_path / "nothing-here"))
    assert ahead.take(os.stat(path)) is NOTHING


def test_cancelled_read_ahead_stops_its_thread(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 40 * MIB)
    ahead = ReadAhead(_load_bytes(path))
    ahead.cancel()
    assert _read_ahead_threads() == []
    assert ahead.take(os.stat(path)) is NOTHING


# -- through the decorator -------------------------------------------------------------------


@pytest.fixture
def always_read_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read ahead whatever the sizes (the defaults skip small entries and fast fingerprints)."""
    monkeypatch.setattr("cachedload.decorator._READ_AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr("cachedload.decorator._READ_AHEAD_MIN_SECONDS", 0.0)


def _source(tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    for index in range(5):
        (folder / f"f{index}.txt").write_text(f"file {index}")
    age(folder)
    return folder


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cachedload-read-ahead"]


def _hit_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("hit ")]


@pytest.mark.usefixtures("always_read_ahead")
def test_repeated_hits_are_read_ahead_and_independent(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _source(tmp_path)
    runs = []

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: Path) -> dict[str, Any]:
        runs.append(folder)
        return {"x": np.arange(1000, dtype=np.float32), "name": "x"}

    caplog.set_level(logging.INFO, logger="cachedload")
    first = load(source)
    second = load(source)
    second["x"][:] = -1  # the caller owns what it got
    third = load(source)
    assert len(runs) == 1
    np.testing.assert_array_equal(first["x"], third["x"])
    assert third["x"] is not second["x"]
    assert [m.endswith(", read ahead)") for m in _hit_logs(caplog)] == [True, True]
    assert _read_ahead_threads() == []


@pytest.mark.usefixtures("always_read_ahead")
def test_changed_source_never_gets_the_entry_read_ahead(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The read-ahead guesses the entry the same arguments used last time; once a file
    # changes, the key differs and the guess must be thrown away, not returned.
    source = _source(tmp_path)

    events: list[str] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: Path) -> np.ndarray[Any, Any]:
        events.append("body")
        text = "".join(p.read_text() for p in sorted(folder.iterdir()))
        return np.array(np.frombuffer(text.encode(), dtype=np.uint8))

    caplog.set_level(logging.INFO, logger="cachedload")
    load(source)
    load(source)  # a hit: the group's entry is now remembered
    (source / "f2.txt").write_text("file X")  # same size, new mtime
    age(source, 60)
    cancel = ReadAhead.cancel

    def spy(self: ReadAhead) -> None:
        events.append("cancel")
        cancel(self)

    events.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReadAhead, "cancel", spy)
        changed = load(source)
    assert events[:2] == ["cancel", "body"]  # the wrong guess is stopped before the body runs
    assert b"file X" in changed.tobytes()
    assert load(source).tobytes() == changed.tobytes()
    assert [m.endswith(", read ahead)") for m in _hit_logs(caplog)] == [True, True]
    assert _read_ahead_threads() == []


@pytest.mark.usefixtures("always_read_ahead")
def test_damaged_entry_is_detected_with_read_ahead(tmp_path: Path, cache_dir: Path) -> None:
    source = _source(tmp_path)
    runs = []

    @cached_dataset(cache_dir=cache_dir, verify="always")
    def load(folder: Path) -> np.ndarray[Any, Any]:
        runs.append(1)
        return np.arange(100_000, dtype=np.int64)

    expected = load(source)
    load(source)
    data = next(cache_dir.rglob("result.joblib"))
    with open(data, "r+b") as handle:  # flip one byte in place, same size
        handle.seek(-8, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-8, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(CorruptEntryWarning):
        again = load(source)
    np.testing.assert_array_equal(again, expected)
    assert len(runs) == 2


@pytest.mark.usefixtures("always_read_ahead")
def test_missing_source_stops_the_read_ahead(tmp_path: Path, cache_dir: Path) -> None:
    source = _source(tmp_path)

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: Path, n: int = 3) -> np.ndarray[Any, Any]:
        return np.zeros(n)

    load(source)
    for path in source.iterdir():
        path.unlink()
    source.rmdir()
    with pytest.raises(FileNotFoundError):
        load(source)
    assert _read_ahead_threads() == []


def test_small_results_are_not_read_ahead(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _source(tmp_path)

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: Path) -> list[int]:
        return [1, 2, 3]

    caplog.set_level(logging.INFO, logger="cachedload")
    started = []
    original = reading.ReadAhead.__init__

    def spy(self: ReadAhead, *args: Any) -> None:
        started.append(1)
        original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reading.ReadAhead, "__init__", spy)
        for _ in range(3):
            assert load(source) == [1, 2, 3]
    assert started == []
    assert not any(m.endswith(", read ahead)") for m in _hit_logs(caplog))


@pytest.mark.usefixtures("always_read_ahead")
def test_switching_back_to_an_older_entry_returns_its_own_data(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # State 1 -> entry A, state 2 -> entry B, back to state 1: the read-ahead guesses B (last
    # used) while the key is A's; A's data must come back, read from A's own file.
    source = _source(tmp_path)
    target = source / "f0.txt"

    def set_state(text: str, mtime_ns: int) -> None:
        target.write_text(text)
        os.utime(target, ns=(mtime_ns, mtime_ns))

    @cached_dataset(cache_dir=cache_dir, keep=2)
    def load(folder: Path) -> np.ndarray[Any, Any]:
        return np.array(np.frombuffer((folder / "f0.txt").read_bytes(), dtype=np.uint8))

    caplog.set_level(logging.INFO, logger="cachedload")
    old = 1_600_000_000 * 10**9
    set_state("state one", old)
    assert load(source).tobytes() == b"state one"
    set_state("state two", old + 10**9)
    assert load(source).tobytes() == b"state two"
    assert load(source).tobytes() == b"state two"
    set_state("state one", old)
    assert load(source).tobytes() == b"state one"
    assert load(source).tobytes() == b"state one"
    assert [m.endswith(", read ahead)") for m in _hit_logs(caplog)] == [True, False, True]


# -- across processes ------------------------------------------------------------------------

_CHILD = """
    import logging, sys
    import numpy as np
    import cachedload.decorator as decorator
    from cachedload import cached_dataset

    decorator._READ_AHEAD_MIN_BYTES = 0  # read ahead whatever the sizes
    decorator._READ_AHEAD_MIN_SECONDS = 0.0
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

    @cached_dataset(cache_dir={cache!r})
    def load(folder, n=2):
        with open({counter!r}, "a") as runs:
            runs.write("run\\n")
        return np.arange(50_000) * n

    for _ in range(3):
        assert load({source!r})[-1] == 49_999 * 2
"""


def test_a_new_process_reads_ahead_from_its_second_hit(tmp_path: Path, cache_dir: Path) -> None:
    # Only within a process: a new process's first hit reads the entry itself.
    source = _source(tmp_path)
    counter = tmp_path / "runs.txt"
    code = _CHILD.format(cache=str(cache_dir), counter=str(counter), source=str(source))
    run_python(code)  # stores, then two hits read ahead
    hits = [line for line in run_python(code).stdout.splitlines() if line.startswith("hit ")]
    assert [line.endswith(", read ahead)") for line in hits] == [False, True, True]
    assert counter.read_text().count("run") == 1


# -- found in review: interrupts, pickled-object results, orphan hints ---------------------


@pytest.mark.usefixtures("always_read_ahead")
def test_ctrl_c_while_the_caller_helps_a_read_ahead_propagates(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    source = _source(tmp_path)

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: Path) -> np.ndarray[Any, Any]:
        return np.ones(80 * MIB, dtype=np.uint8)

    load(source)
    load(source)  # the group's entry is remembered: the next call reads it ahead
    original = reading.read_exactly
    fired: list[int] = []

    def read_exactly(fd: int, view: memoryview, offset: int) -> None:
        if threading.current_thread() is threading.main_thread():
            if not fired:
                fired.append(1)
                signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C now
        else:
            time.sleep(0.05)  # a slow loading thread leaves chunks to the caller
        original(fd, view, offset)

    monkeypatch.setattr(reading, "read_exactly", read_exactly)
    with pytest.raises(KeyboardInterrupt):
        load(source)
    assert fired
    assert _read_ahead_threads() == []


@pytest.mark.usefixtures("always_read_ahead")
def test_results_made_of_pickled_objects_are_not_unpickled_ahead(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Unpickling holds the GIL that fingerprinting needs, and cannot be stopped midway.
    source = _source(tmp_path)

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: Path) -> list[str]:
        return [f"row {i}" for i in range(300_000)]  # ~3 MB of pickled strings

    caplog.set_level(logging.INFO, logger="cachedload")
    expected = load(source)
    assert load(source) == expected
    assert load(source) == expected
    assert not any(m.endswith(", read ahead)") for m in _hit_logs(caplog))
    assert _read_ahead_threads() == []


class Payload:
    """A value that can be watched with a weak reference (bytes cannot)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def test_a_mismatched_read_ahead_frees_its_value_before_returning(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 1 * MIB)
    values: list[weakref.ref[Payload]] = []

    def load(reader: SharedReader, opened: Any) -> Payload:
        value = Payload(_load_bytes(path)(reader, opened))
        values.append(weakref.ref(value))
        return value

    ahead = ReadAhead(load)
    while not values:  # read completely
        time.sleep(0.001)
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(data)
    os.replace(replacement, path)
    assert ahead.take(os.stat(path)) is NOTHING
    assert values[0]() is None  # nothing holds the value read ahead any more
