"""Reading large arrays out of a file: in chunks that several threads share, and ahead of time.

A hit's restore of a large array is bound by page faults and the copy out of the page cache,
which are per-core work: :class:`SharedReader` splits each buffer into chunks that any number
of threads take from one queue (``preadv`` releases the GIL). :class:`ReadAhead` starts that
work in a background thread *before* the call's key is known, on the entry the same call hit
last time, so that the restore overlaps with fingerprinting the sources (Python-bound, one
core); the caller then helps while many chunks are left. The read-ahead result is used only
if the key turns out to be the same and the file is the very one the hit would have read.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "NOTHING",
    "ReadAhead",
    "ReadCancelled",
    "SharedReader",
    "read_exactly",
    "read_parallel",
]

_PREADV = hasattr(os, "preadv")
_CHUNK = 8 * 1024 * 1024  # measured: 4-16 MiB chunks restore equally fast; 8 MiB balances them
_PARALLEL_MIN = 32 * 1024 * 1024  # per thread: below this a thread costs more than it saves
_PAGE = 4096
_MAX_UNPICKLING = 1024 * 1024  # pickled bytes (besides arrays) a read-ahead may unpickle


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_READ_THREADS = min(4, _usable_cpus())

#: What :meth:`ReadAhead.take` returns when the read-ahead cannot be used.
NOTHING: Any = object()


class ReadCancelled(Exception):
    """The read was cancelled (the read-ahead guessed the wrong entry)."""


def read_exactly(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the file at ``offset`` (``preadv`` straight into the buffer).

    Raises:
        EOFError: the file ends before the buffer is full.
    """
    done = 0
    total = view.nbytes
    while done < total:
        if _PREADV:
            count = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            os.lseek(fd, offset + done, os.SEEK_SET)
            count = os.readv(fd, [view[done:]])
        if count == 0:
            raise EOFError(f"file ends {total - done} bytes short of an array")
        done += count


def _alone(view: memoryview, helpers: int) -> bool:
    """True if one thread should read ``view``: no helper, or too small to share."""
    return helpers < 1 or view.nbytes < 2 * _PARALLEL_MIN


def read_parallel(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` like :func:`read_exactly`; a large buffer in slices read by threads
    (two threads restore a large array ~1.4x faster than one, or than ``np.load``)."""
    if _alone(view, _READ_THREADS - 1):
        read_exactly(fd, view, offset)  # without building a reader
    else:
        SharedReader().read(fd, view, offset)


class SharedReader:
    """Fills buffers from files in chunks that any thread may take from one queue.

    The thread that calls :meth:`read` queues a buffer's chunks, starts up to ``helpers``
    threads for a large one, reads chunks itself and returns when all are read. Another thread
    may join in with :meth:`help` (the caller of a :class:`ReadAhead`).
    """

    def __init__(
        self,
        helpers: int = _READ_THREADS - 1,
        *,
        shared: bool = False,
        max_unpickling: int | None = None,
    ) -> None:
        self._helpers = helpers
        self._shared = shared  # another thread will help: queue buffers of any size
        self._max_unpickling = max_unpickling
        self._changed = threading.Condition()
        self._chunks: deque[tuple[int, memoryview, int]] = deque()
        self._pending = 0  # chunks queued or being read
        self._queued_bytes = 0
        self._finished = False  # no more buffers will be queued
        self._cancelled = False
        self._error: BaseException | None = None

    def read(self, fd: int, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``fd`` at ``offset``; return when every chunk is read.

        Raises:
            ReadCancelled: :meth:`cancel` was called.
            EOFError, OSError: a chunk could not be read.
        """
        if not self._shared and _alone(view, self._helpers):
            read_exactly(fd, view, offset)
            return
        workers = max(0, min(self._helpers, view.nbytes // _PARALLEL_MIN - 1))
        if self._shared:
            chunk = _CHUNK  # small: whoever is free takes the next one
        else:
            # One slice per thread, as long as possible: measured ~10 % faster than chunks.
            chunk = -(-view.nbytes // (workers + 1))
            chunk += -chunk % _PAGE
        with self._changed:
            if self._cancelled:
                raise ReadCancelled
            for start in range(0, view.nbytes, chunk):
                piece = view[start : start + chunk]
                self._chunks.append((fd, piece, offset + start))
                self._pending += 1
                self._queued_bytes += piece.nbytes
            self._changed.notify_all()
        threads = [threading.Thread(target=self._take_chunks) for _ in range(workers)]
        for thread in threads:
            thread.start()
        try:
            self._take_chunks()
            with self._changed:
                while self._pending:
                    self._changed.wait()
        except BaseException:  # e.g. KeyboardInterrupt: stop the helpers before leaving
            self.cancel()
            raise
        finally:
            for thread in threads:
                thread.join()  # within one chunk once cancelled
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise ReadCancelled

    def before_unpickling(self, nbytes: int) -> None:
        """Called by the loader before it unpickles ``nbytes`` of pickled data (Python work,
        under the GIL, that :meth:`cancel` cannot interrupt).

        Raises:
            ReadCancelled: the read was cancelled, or ``nbytes`` is more than this reader
                lets its thread unpickle.
        """
        if self._cancelled or (self._max_unpickling is not None and nbytes > self._max_unpickling):
            raise ReadCancelled

    def _take_chunks(self, until_finished: bool = False, min_queued: int = 0) -> None:
        """Read queued chunks until the queue is empty (or, ``until_finished``, until
        :meth:`finish` says no more will come); stop early once fewer than ``min_queued``
        bytes are waiting."""
        while True:
            taken = None
            try:
                with self._changed:
                    while not self._chunks:
                        if not until_finished or self._finished:
                            return
                        self._changed.wait()
                    if self._queued_bytes < min_queued:
                        return
                    taken = self._chunks.popleft()
                    self._queued_bytes -= taken[1].nbytes
                read_exactly(*taken)
            except Exception as error:  # re-raised by read(), in the loading thread
                with self._changed:
                    self._error = self._error or error
                    self._drop_queued()
            except BaseException:  # KeyboardInterrupt, SystemExit: this thread's own, raised
                self.cancel()  # here; the loading thread stops with ReadCancelled
                raise
            finally:
                if taken is not None:
                    with self._changed:
                        self._pending -= 1
                        self._changed.notify_all()

    def help(self, min_queued: int = 0) -> None:
        """Read chunks alongside the loading thread until it says it is done, or until fewer
        than ``min_queued`` bytes are left to read."""
        self._take_chunks(until_finished=True, min_queued=min_queued)

    def finish(self) -> None:
        """No more buffers will be queued (wakes the threads in :meth:`help`)."""
        with self._changed:
            self._finished = True
            self._changed.notify_all()

    def cancel(self) -> None:
        """Drop the chunks not yet started; :meth:`read` then raises :class:`ReadCancelled`."""
        with self._changed:
            self._cancelled = True
            self._drop_queued()
            self._changed.notify_all()

    def _drop_queued(self) -> None:
        self._pending -= len(self._chunks)
        self._queued_bytes = 0
        self._chunks.clear()


def file_identity(info: os.stat_result) -> tuple[int, ...]:
    """What tells two opens of a path apart: same inode, size and change times."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class ReadAhead:
    """A value loaded in a background thread while the caller does something else.

    ``load(reader, opened)`` must read large buffers through ``reader`` and call
    ``opened(fd)`` once with the file it reads, so that :meth:`take` can check that the file
    is the one the caller would have read.
    """

    def __init__(self, load: Callable[[SharedReader, Callable[[int], None]], Any]) -> None:
        self._load = load
        # The caller helps once it is free. Results that are mostly pickled objects are not
        # read ahead: unpickling them would hold the GIL that fingerprinting needs, and a
        # wrong guess could not be stopped in the middle.
        self._reader = SharedReader(helpers=0, shared=True, max_unpickling=_MAX_UNPICKLING)
        self._value: Any = NOTHING
        self._identity: tuple[int, ...] | None = None
        self.used = False  # whether take() returned the value
        self._thread = threading.Thread(target=self._run, name="cachedload-read-ahead")
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._load(self._reader, self._opened)
        except BaseException:  # a damaged or vanished entry: the caller's own read reports it
            self._value = NOTHING
        finally:
            self._reader.finish()

    def _opened(self, fd: int) -> None:
        self._identity = file_identity(os.fstat(fd))

    def take(self, info: os.stat_result) -> Any:
        """The loaded value if it was read from the file ``info`` describes, else
        :data:`NOTHING`. Helps with the chunks left while there are many, then waits for the
        loading thread.

        Measured on the realistic case of ``benchmarks/bench_scaling.py``: helping with the
        last few chunks gains nothing (the copy is bound by memory, not by one core) and, on a
        virtual machine, two threads faulting in fresh memory at once sometimes stall for
        10 ms or more; so the caller helps only while two threads would also be used without
        reading ahead (at least 2 x 32 MiB left).
        """
        self._reader.help(min_queued=2 * _PARALLEL_MIN)
        self._thread.join()
        value, self._value = self._value, NOTHING  # taken once: no reference kept here
        if self._identity is None or self._identity != file_identity(info):
            return NOTHING  # (and its buffers are freed before the caller reads the file)
        self.used = value is not NOTHING
        return value

    def cancel(self) -> None:
        """Stop reading (a wrong guess, or an error in the caller) and free the buffers."""
        self._reader.cancel()
        self._thread.join()
        self._value = NOTHING
