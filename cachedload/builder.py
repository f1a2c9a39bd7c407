"""Per-item builds: map a function over files, rows written straight into the entry's data file.

The engine under per-item loaders (issue 14): out-of-core (the builder holds a few batches of
rows, never the whole result), incremental (only added and changed files are computed; every
other row is copied byte for byte from the previous build's file), and run through
``joblib.Parallel`` so the user picks the engine (threads by default, ``backend="loky"``, or a
Dask cluster inside ``joblib.parallel_config(backend="dask")``).

Interface for the decorator (what an integrator calls)::

    items, fp = scan_items(root, include=("*.jpg",))     # sorted Items + the Fingerprint
    report = build_items(
        fn, items, entry_tmp / "result.joblib",
        params={"size": (32, 32)},                       # fn(path, **params) -> one row
        previous=PreviousBuild(old_entry / "result.joblib", old_records) or None,
        taken_ns=fp.taken_ns,                            # when the items were stat-ed
        n_jobs=None, backend=None, ragged=False,
    )
    # report.size, report.checksum  -> meta.json (equal to fingerprint.hash_file of the file)
    # report.records                -> stored with the entry: {relpath: RowRecord}, the next
    #                                  build's PreviousBuild.records (and cache_explain's input)
    # report.computed/.reused/.seconds/.full_build_reason -> logging
    value = serialize.load(path, mmap_mode="r")          # an ItemArray, as a hit returns it

The data file holds an :class:`ItemArray` (rows array first: array number 0 of the file's
index, which is how :class:`PreviousBuild` finds the rows of an earlier build). Rows are in
sorted relative-path order, so an incremental build is bit-identical to a build from scratch.

A row is *unchanged* when its file's size and ``st_mtime_ns`` equal the recorded ones and,
where the record carries a content hash (the file was "racy": modified within
:data:`~cachedload.fingerprint.RACY_WINDOW_NS` of when it was listed, so a same-size rewrite
in the same mtime tick would not show), the file's content hash matches too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from cachedload import serialize
from cachedload.errors import ItemShapeMismatchError
from cachedload.fingerprint import RACY_WINDOW_NS, Fingerprint, fingerprint_source, hash_file

__all__ = [
    "BuildReport",
    "Item",
    "ItemArray",
    "PreviousBuild",
    "RowRecord",
    "build_items",
    "scan_items",
]

_log = logging.getLogger("cachedload")

#: Rows per batch are chosen so that one batch holds about this many bytes. Small enough that
#: the batches in flight (joblib dispatches about 2 per worker ahead) stay far below the result
#: for any large build; large enough that the per-task overhead (~50 µs threads, ~ms on Dask)
#: is noise.
BATCH_BYTES = 16 * 1024 * 1024
_BATCHES_PER_WORKER = 4  # small builds: split so every worker gets several batches


class Item(NamedTuple):
    """One input file: its relative path (``/``-separated), absolute path, size and mtime."""

    relpath: str
    path: str
    size: int
    mtime_ns: int


class RowRecord(NamedTuple):
    """What a build records per row, to tell next time whether the file changed.

    ``content_hash`` (hex xxh3-128 of the file) only where the file was racy when listed.
    """

    row: int
    size: int
    mtime_ns: int
    content_hash: str | None = None


class _ItemArrayFields(NamedTuple):
    array: Any
    paths: tuple[str, ...]


class ItemArray(_ItemArrayFields):
    """A per-item result: the stacked rows and each row's path relative to the source folder.

    Attributes:
        array: ``(N, *row_shape)`` array (a memory map when loaded with ``mmap_mode="r"``), or
            a list of ``N`` arrays for a ragged build.
        paths: each row's path, ``/``-separated, sorted.
        skipped: the paths of the items left out (their function raised one of the ``skip``
            exceptions of the build), sorted. Not a tuple field (unpacking stays two values),
            and pickled only when not empty (files without it load with ``()``).
    """

    skipped: tuple[str, ...] = ()

    def __new__(
        cls, array: Any, paths: tuple[str, ...], skipped: tuple[str, ...] = ()
    ) -> ItemArray:
        value = super().__new__(cls, array, paths)
        if skipped:
            value.skipped = tuple(skipped)  # pickled as the instance's state
        return value


@dataclass(frozen=True)
class PreviousBuild:
    """An earlier build of the same call group, whose unchanged rows a new build copies.

    Attributes:
        path: its data file.
        records: its per-row records, ``relpath -> RowRecord`` (``BuildReport.records``), or
            plain tuples in the same order.
        extent: where its rows array sits in the file; ``None``: read from the file's index.
    """

    path: str | os.PathLike[str]
    records: Mapping[str, tuple[int, int, int, str | None]]
    extent: serialize.ArrayExtent | None = None


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build_items` did.

    Attributes:
        size, checksum: the data file's size and hex xxh3-128 (as ``hash_file`` gives it).
        computed: rows computed (calls of the item function).
        reused: rows copied from the previous build.
        seconds: wall time of the build.
        records: every item's :class:`RowRecord`, to store with the entry (row -1 for an
            item left out by ``skip``).
        row_shape, dtype: of the stacked rows (``None`` for a ragged or empty build).
        full_build_reason: why the previous build was not used (``None`` if it was, or if
            there was none to use).
        value: the result in memory, as loading the file gives it, if ``build_items(...,
            in_memory=True)`` built it there (else ``None``: load the file).
        skipped: the items left out, ``relpath -> the exception`` their function raised (one
            of ``skip``; its ``reason`` attribute, where it has one, says why), sorted. They
            have no row (their record's row is -1): the next build computes them again.
    """

    size: int
    checksum: str
    computed: int
    reused: int
    seconds: float
    records: dict[str, RowRecord] = field(repr=False)
    row_shape: tuple[int, ...] | None
    dtype: np.dtype[Any] | None
    full_build_reason: str | None = None
    value: ItemArray | None = field(default=None, repr=False, compare=False)
    skipped: dict[str, BaseException] = field(default_factory=dict, repr=False)


def scan_items(
    root: str | os.PathLike[str],
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] | None = None,
) -> tuple[list[Item], Fingerprint]:
    """List the files below ``root`` as sorted :class:`Item` s (one ``stat`` each).

    ``include``/``exclude`` are glob patterns as in
    :func:`~cachedload.fingerprint.fingerprint_source`. Returns the items and the fingerprint
    (its ``taken_ns`` is the ``taken_ns`` to give :func:`build_items`).
    """
    base = os.fspath(root)
    options: dict[str, Any] = {"include": tuple(include)}
    if exclude is not None:
        options["exclude"] = tuple(exclude)
    fp = fingerprint_source(base, **options)
    items = [Item(rel, os.path.join(base, rel), size, mtime) for rel, size, mtime in fp.files]
    return items, fp


# -- the work sent to the workers -----------------------------------------------------------


class _Mismatch(NamedTuple):
    position: int  # in the batch
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Skipped:
    """What :class:`_Skipping` returns for an item left out: the exception it raised."""

    error: BaseException


class _Partial(NamedTuple):
    rows: np.ndarray[Any, Any]  # the skipped positions hold no row
    skipped: list[tuple[int, _Skipped]]  # (position in the batch, why)


@dataclass(frozen=True)
class _Skipping:
    """The item function with its ``skip`` exceptions returned as :class:`_Skipped` (so that
    a batch goes on, and they cross a process boundary with its result)."""

    fn: Callable[..., Any]
    skip: tuple[type[BaseException], ...]

    def __call__(self, path: str, **params: Any) -> Any:
        try:
            return self.fn(path, **params)
        except self.skip as error:
            return _Skipped(error.with_traceback(None))  # no frames (and their rows) kept


def _as_row(value: Any) -> np.ndarray[Any, Any] | _Skipped:
    return value if isinstance(value, _Skipped) else np.asarray(value)


def _load(fn: Callable[..., Any], path: str, params: Mapping[str, Any]) -> Any:
    try:
        return fn(path, **params)
    except BaseException as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"while loading {path}")
        raise


def _run_batch(
    fn: Callable[..., Any],
    paths: list[str],
    params: Mapping[str, Any],
    shape: tuple[int, ...] | None,
    dtype: np.dtype[Any] | None,
    out: np.ndarray[Any, Any] | None = None,
) -> np.ndarray[Any, Any] | _Mismatch | _Partial | list[np.ndarray[Any, Any] | _Skipped]:
    """Compute one batch: stacked rows (checked against ``shape``/``dtype``; into ``out`` if
    given, a thread's share of the result), or a list if ragged (``shape is None``). One
    array per batch crosses a process boundary, not N. Items left out (:class:`_Skipping`)
    make it a :class:`_Partial`."""
    if shape is None or dtype is None:
        return [_as_row(_load(fn, path, params)) for path in paths]
    if out is None:
        out = np.empty((len(paths), *shape), dtype)
    skipped: list[tuple[int, _Skipped]] = []
    for position, path in enumerate(paths):
        row = _as_row(_load(fn, path, params))
        if isinstance(row, _Skipped):
            skipped.append((position, row))
            continue
        if row.shape != shape or row.dtype != dtype:
            return _Mismatch(position, row.shape, row.dtype.str)
        out[position] = row
    return _Partial(out, skipped) if skipped else out


# -- the build ------------------------------------------------------------------------------


class _Plan(NamedTuple):
    compute: list[int]  # rows to compute, in order
    copies: list[tuple[int, int, int]]  # (first row here, first row in previous, count)
    records: dict[str, RowRecord]


def _classify(
    items: Sequence[Item],
    previous: Mapping[str, tuple[int, int, int, str | None]],
    previous_rows: int,
    taken_ns: int,
) -> _Plan:
    """Which rows to compute and which to copy; every row's new record."""
    racy_limit = taken_ns - RACY_WINDOW_NS
    compute: list[int] = []
    copies: list[tuple[int, int, int]] = []
    records: dict[str, RowRecord] = {}
    missing = (-1, -1, -1, None)
    for row, (relpath, path, size, mtime_ns) in enumerate(items):
        racy_hash = hash_file(path) if mtime_ns >= racy_limit else None
        records[relpath] = RowRecord(row, size, mtime_ns, racy_hash)
        # Unpacked, not by attribute: the records may be plain tuples (as the manifest gives
        # them), which saves making 20,000 RowRecords for a call that changes one file.
        old_row, old_size, old_mtime, old_hash = previous.get(relpath, missing)
        same = 0 <= old_row < previous_rows and old_size == size and old_mtime == mtime_ns
        if same and old_hash is not None:
            same = (racy_hash or hash_file(path)) == old_hash
        if not same:
            compute.append(row)
        elif copies and (last := copies[-1])[0] + last[2] == row and last[1] + last[2] == old_row:
            copies[-1] = (last[0], last[1], last[2] + 1)  # contiguous here and there: one copy
        else:
            copies.append((row, old_row, 1))
    return _Plan(compute, copies, records)


def _previous_rows(previous: PreviousBuild | None) -> tuple[serialize.ArrayExtent | None, str]:
    """The previous build's rows extent, or ``None`` and why it cannot be used."""
    if previous is None:
        return None, "no previous build"
    try:
        extent = previous.extent or serialize.array_extents(previous.path)[0]
        size = os.stat(previous.path).st_size
    except (OSError, ValueError, IndexError, EOFError) as exc:
        return None, f"previous build unreadable ({exc})"
    if not extent.shape or extent.order != "C" or extent.offset + extent.nbytes > size:
        return None, "previous build holds no rows array"
    return extent, ""


def build_items(
    fn: Callable[..., Any],
    items: Sequence[Item],
    path: str | os.PathLike[str],
    *,
    params: Mapping[str, Any] | None = None,
    previous: PreviousBuild | None = None,
    taken_ns: int | None = None,
    n_jobs: int | None = None,
    backend: Any = None,
    ragged: bool = False,
    batch_bytes: int = BATCH_BYTES,
    in_memory: bool = False,
    skip: tuple[type[BaseException], ...] = (),
    progress: Callable[[int, int], object] | None = None,
) -> BuildReport:
    """Compute ``fn(item.path, **params)`` for each item into one data file at ``path``.

    Args:
        fn: the item function; returns one row (an array, or anything ``np.asarray`` takes).
        items: the files, sorted by ``relpath`` (as :func:`scan_items` gives them).
        path: the data file to write (a new file; fsynced when this returns).
        params: keyword arguments for ``fn``.
        previous: an earlier build; its unchanged rows are copied, not computed.
        taken_ns: ``time.time_ns()`` from just before the items were stat-ed (racy files are
            judged against it); default: now.
        n_jobs: workers; ``None``: the active ``joblib.parallel_config``'s, else all CPUs (all
            workers of a Dask cluster).
        backend: a joblib backend name or object; ``None``: the active ``parallel_config``'s,
            else threads.
        ragged: rows may differ in shape; the result's ``array`` is a list (built in memory).
        batch_bytes: about how many bytes of rows one batch holds.
        in_memory: the caller wants the result in memory: where it can (a full build on
            threads), the rows are computed straight into the final array, which
            ``report.value`` returns (no batch buffers, no reading the file back).
        skip: exception classes that leave an item out instead of failing the build: it gets
            no row (``report.skipped`` says which and why; the file's ``ItemArray.skipped``
            lists them). When some were, the rows are compacted into the final file (a copy
            of byte ranges, done only then).
        progress: called as ``progress(rows computed, rows to compute)`` in the calling thread,
            before the first row and after each batch (e.g. to advance a progress bar).

    Returns:
        The :class:`BuildReport`; the file holds an :class:`ItemArray`.

    Raises:
        ItemShapeMismatchError: rows differ in shape or dtype (not ``ragged``).
        ValueError: ``items`` are not sorted by ``relpath`` or repeat one.
        Whatever ``fn`` raises, with a note naming the file.
    """
    started = time.perf_counter()
    items = list(items)
    for before, after in itertools.pairwise(items):
        if not before.relpath < after.relpath:
            raise ValueError(f"items must be sorted by relpath, unique: {after.relpath!r}")
    taken_ns = time.time_ns() if taken_ns is None else taken_ns
    params = dict(params or {})
    old_rows: Any = None
    if ragged:
        old_rows, reason = _previous_list(previous)
        previous_rows = len(old_rows) if old_rows is not None else 0
        extent = None
    else:
        extent, reason = _previous_rows(previous)
        previous_rows = extent.shape[0] if extent is not None else 0
    usable = old_rows is not None or extent is not None
    plan = _classify(items, previous.records if previous else {}, previous_rows, taken_ns)
    if not usable and previous is not None:
        _log.info("full build of %s items: %s", len(items), reason)
    paths = tuple(item.relpath for item in items)
    runner = _Runner(_Skipping(fn, skip) if skip else fn, params, n_jobs, backend, batch_bytes)
    left_out: dict[int, BaseException] = {}  # row -> why (rows in the order of items)
    advance = _advancer(progress, len(plan.compute))
    if ragged:
        size, checksum = _build_ragged(runner, items, plan, old_rows, path, left_out, advance)
        shape = dtype = None
        kept = None
    else:
        kept = np.empty(0) if in_memory and not plan.copies and runner.threads() else None
        size, checksum, shape, dtype, kept = _build_stacked(
            runner, items, plan, previous, extent, paths, path, kept, left_out, advance
        )
    skipped: dict[str, BaseException] = {}
    if left_out:
        good, paths, plan, skipped = _leave_out(items, plan, left_out)
        if not ragged:  # a ragged file is written without them
            assert shape is not None and dtype is not None
            size, checksum = _compact(path, good, paths, tuple(skipped), shape, dtype)
            kept = None if kept is None else _compact_rows(kept, good)
    reused = sum(count for _first, _source, count in plan.copies)
    report = BuildReport(
        size=size,
        checksum=checksum,
        computed=len(plan.compute),
        reused=reused,
        seconds=time.perf_counter() - started,
        records=plan.records,
        row_shape=shape,
        dtype=dtype,
        full_build_reason=reason if previous is not None and not usable else None,
        value=None if ragged or kept is None else ItemArray(kept, paths, tuple(skipped)),
        skipped=skipped,
    )
    _log.debug("built %s: %s rows computed, %s copied, %s bytes in %.3f s", os.fspath(path),
               report.computed, report.reused, size, report.seconds)  # fmt: skip
    return report


class _Runner:
    """Runs batches of items through ``joblib.Parallel``, results in order as they arrive."""

    def __init__(
        self,
        fn: Callable[..., Any],
        params: Mapping[str, Any],
        n_jobs: int | None,
        backend: Any,
        batch_bytes: int,
    ) -> None:
        from joblib.parallel import get_active_backend

        self.fn, self.params, self.backend, self.batch_bytes = fn, params, backend, batch_bytes
        if n_jobs is None:
            # Not prefer="threads": with it, joblib reports n_jobs=1 outside any
            # parallel_config (its threads fallback), and every default build ran serially.
            _active, context_jobs = get_active_backend()
            n_jobs = -1 if context_jobs is None else context_jobs
        self.n_jobs = n_jobs

    def threads(self) -> bool:
        """True if the batches would run on threads of this process (no process pool, no
        cluster: neither asked for here nor by an active ``joblib.parallel_config``)."""
        from joblib.parallel import get_active_backend

        if self.backend not in (None, "threading"):
            return False
        # With prefer="threads", joblib answers its threads backend unless a context
        # manager set another one explicitly.
        active, _jobs = get_active_backend(prefer="threads")
        return bool(getattr(active, "uses_threads", False))

    def batches(self, rows: list[int], row_bytes: int) -> list[list[int]]:
        """Split ``rows`` into batches of about ``batch_bytes``, several per worker."""
        import joblib

        workers = max(1, joblib.effective_n_jobs(self.n_jobs))
        by_bytes = max(1, self.batch_bytes // max(row_bytes, 1))
        by_count = -(-len(rows) // (workers * _BATCHES_PER_WORKER))
        size = max(1, min(by_bytes, by_count))
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def run(
        self,
        batches: list[list[str]],
        shape: tuple[int, ...] | None,
        dtype: np.dtype[Any] | None,
        outs: list[np.ndarray[Any, Any]] | None = None,
    ) -> Iterator[Any]:
        """Each batch's result, in order, as soon as it (and those before it) are done
        (into ``outs``, one array per batch, only if :meth:`threads`)."""
        outs_: list[Any] = [None] * len(batches) if outs is None else outs
        if not batches:
            return iter(())
        tasks = [(self.fn, batch, self.params, shape, dtype, out)
                 for batch, out in zip(batches, outs_, strict=True)]  # fmt: skip
        if self.threads():
            return self._on_threads(tasks)
        import joblib

        try:
            parallel = joblib.Parallel(
                n_jobs=self.n_jobs, backend=self.backend, prefer="threads", return_as="generator"
            )
        except ValueError as error:
            if "return_as" not in str(error):
                raise
            return self._in_windows(tasks)  # e.g. Ray's backend: no generator output
        task = joblib.delayed(_run_batch)
        return iter(parallel(task(*arguments) for arguments in tasks))

    def _in_windows(self, tasks: list[tuple[Any, ...]]) -> Iterator[Any]:
        """The batches in windows of two per worker, each window's results as a list: for
        backends that cannot stream results, the rows held stay bounded all the same."""
        import joblib

        task = joblib.delayed(_run_batch)
        with joblib.Parallel(n_jobs=self.n_jobs, backend=self.backend, prefer="threads") as pool:
            window = 2 * max(1, joblib.effective_n_jobs(self.n_jobs))
            for start in range(0, len(tasks), window):
                yield from pool(task(*arguments) for arguments in tasks[start : start + window])

    def _on_threads(self, tasks: list[tuple[Any, ...]]) -> Iterator[Any]:
        """The batches on this process's threads, at most two per thread ahead of the
        consumer: joblib dispatches a new batch whenever one completes, so batches computed
        faster than they are written piled up (a 2 GiB build peaked at 765 MiB on 2 threads).
        One batch runs here, without a pool (joblib's cost ~12 ms: most of "change 1 file"
        besides the fingerprint)."""
        import joblib

        workers = max(1, joblib.effective_n_jobs(self.n_jobs))
        if workers == 1 or len(tasks) == 1:
            yield from (_run_batch(*arguments) for arguments in tasks)
            return
        pool = ThreadPoolExecutor(workers, "cachedload-build")
        try:
            ahead: deque[Future[Any]] = deque()
            for arguments in tasks:
                ahead.append(pool.submit(_run_batch, *arguments))
                if len(ahead) > 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _build_stacked(
    runner: _Runner,
    items: list[Item],
    plan: _Plan,
    previous: PreviousBuild | None,
    extent: serialize.ArrayExtent | None,
    paths: tuple[str, ...],
    path: str | os.PathLike[str],
    kept: np.ndarray[Any, Any] | None,
    left_out: dict[int, BaseException],
    advance: Callable[[int], None],
) -> tuple[int, str, tuple[int, ...], np.dtype[Any], np.ndarray[Any, Any] | None]:
    """Write the rows; ``kept`` (not ``None``: a full build on threads, every row computed)
    is replaced by the result array, the batches computed straight into it. Rows left out
    are added to ``left_out`` (their bytes in the file are left as they are)."""
    shape, dtype, reference, first = _row_layout(runner, items, plan, extent, left_out)
    compute = plan.compute[len(left_out) :]  # those left out before the first row: done
    row_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if kept is not None:
        kept = np.empty((len(items), *shape), dtype)
        if first is not None:
            kept[compute[0]] = first
    value = ItemArray(serialize.ArraySlot((len(items), *shape), dtype), paths)
    out = serialize.dump_slotted(value, path)
    source_fd = -1
    try:
        source_fd = _open_previous(plan, previous)
        copies = iter(plan.copies)
        pending_copy = next(copies, None)

        def copy_until(row: int) -> None:
            """Copy the previous rows that come before ``row`` (all: ``row=len(items)``)."""
            nonlocal pending_copy
            while pending_copy is not None and pending_copy[0] < row:
                here, there, count = pending_copy
                assert extent is not None
                out.copy_from(source_fd, extent.offset + there * row_bytes, 0,
                              here * row_bytes, count * row_bytes)  # fmt: skip
                pending_copy = next(copies, None)

        def write(rows: list[int], block: np.ndarray[Any, Any]) -> None:
            """Write a batch's rows: one write per run of consecutive rows."""
            start = 0
            for end in range(1, len(rows) + 1):
                if end == len(rows) or rows[end] != rows[end - 1] + 1:
                    copy_until(rows[start])
                    out.write_rows(0, rows[start], block[start:end])
                    start = end

        if first is not None:
            write(compute[:1], first[None])
            compute = compute[1:]
            del first
        advance(len(plan.compute) - len(compute))
        batches = runner.batches(compute, row_bytes)
        # Every row is computed (no copies): each batch is a run of consecutive rows.
        outs = None if kept is None else [kept[b[0] : b[-1] + 1] for b in batches]
        results = runner.run([[items[r].path for r in b] for b in batches], shape, dtype, outs)
        for rows, result in zip(batches, results, strict=True):
            if isinstance(result, _Mismatch):
                bad = rows[result.position]
                raise ItemShapeMismatchError(reference, shape, dtype.str, items[bad].relpath,
                                             result.shape, result.dtype)  # fmt: skip
            write(rows, _noting_left_out(result, rows, left_out))
            advance(len(rows))
        copy_until(len(items))
        size, checksum = out.finish()
    finally:
        out.close()
        if source_fd >= 0:
            os.close(source_fd)
    return size, checksum, shape, dtype, kept


def _open_previous(plan: _Plan, previous: PreviousBuild | None) -> int:
    """A descriptor of the previous build's file if rows are copied from it, else -1."""
    if not plan.copies:
        return -1
    assert previous is not None
    return os.open(previous.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def _row_layout(
    runner: _Runner,
    items: list[Item],
    plan: _Plan,
    extent: serialize.ArrayExtent | None,
    left_out: dict[int, BaseException],
) -> tuple[tuple[int, ...], np.dtype[Any], str, np.ndarray[Any, Any] | None]:
    """The rows' shape and dtype, the relative path of a row that has them (for errors), and
    the first computed row if it had to be computed to find them (else ``None``; the rows
    left out before it are added to ``left_out``)."""
    first: np.ndarray[Any, Any] | None = None
    shape: tuple[int, ...] = ()
    dtype, reference = np.dtype(np.float64), ""  # no rows at all
    if plan.copies:
        assert extent is not None
        shape, dtype = extent.shape[1:], _canonical(extent.dtype)
        reference = items[plan.copies[0][0]].relpath  # a row of that shape, for the error
    else:
        # The first row fixes the shape and dtype (and so the batch size and the layout).
        for row in plan.compute:
            found = _as_row(_load(runner.fn, items[row].path, runner.params))
            if not isinstance(found, _Skipped):
                first, shape, dtype, reference = found, found.shape, found.dtype, items[row].relpath
                break
            left_out[row] = found.error
    if dtype.hasobject:
        raise TypeError(f"{reference!r} gave a row of Python objects; pass ragged=True")
    return shape, dtype, reference, first


def _canonical(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """numpy's own instance of a plain dtype: an unpickled one is an equal copy, which
    pickles differently where it repeats (the memo), and a rebuild must be bit-identical."""
    return dtype if dtype.fields or dtype.subdtype else np.dtype(dtype.str)


def _previous_list(previous: PreviousBuild | None) -> tuple[Any, str]:
    """A ragged previous build's rows (memory maps), or ``None`` and why it cannot be used."""
    if previous is None:
        return None, "no previous build"
    try:
        value = serialize.load(previous.path, mmap_mode="r")
    except Exception as exc:  # a damaged file is a reason for a full build, whatever it raises
        return None, f"previous build unreadable ({exc})"
    if not isinstance(value, ItemArray) or not isinstance(value.array, list):
        return None, "previous build holds no list of rows"
    return value.array, ""


def _build_ragged(
    runner: _Runner,
    items: list[Item],
    plan: _Plan,
    old_rows: Any,
    path: str | os.PathLike[str],
    left_out: dict[int, BaseException],
    advance: Callable[[int], None],
) -> tuple[int, str]:
    """Rows of any shape: a list, in memory (copied rows read from the previous build); the
    rows left out are added to ``left_out`` and not written."""
    rows: list[Any] = [None] * len(items)
    for here, there, count in plan.copies:
        for k in range(count):
            old = old_rows[there + k]
            rows[here + k] = np.array(old, dtype=_canonical(old.dtype))
    batches = runner.batches(plan.compute, 1)
    results = runner.run([[items[r].path for r in b] for b in batches], None, None)
    for batch, result in zip(batches, results, strict=True):
        for row, array in zip(batch, result, strict=True):
            if isinstance(array, _Skipped):
                left_out[row] = array.error
            else:
                rows[row] = array
        advance(len(batch))
    good = [row for row in range(len(items)) if row not in left_out]
    value = ItemArray([rows[row] for row in good], tuple(items[row].relpath for row in good),
                      tuple(items[row].relpath for row in sorted(left_out)))  # fmt: skip
    return serialize.dump(value, path)


# -- items left out (build_items(skip=...)) ----------------------------------------------------


def _advancer(progress: Callable[[int, int], object] | None, total: int) -> Callable[[int], None]:
    """``advance(count)``: ``count`` more rows computed, told to ``progress`` (0 told now)."""
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None and count:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    return advance


def _leave_out(
    items: list[Item], plan: _Plan, left_out: Mapping[int, BaseException]
) -> tuple[list[int], tuple[str, ...], _Plan, dict[str, BaseException]]:
    """The rows kept (numbers before), their paths, the plan with their records renumbered
    (row -1 for those left out: the racy ones keep their content hash, which a hit checks),
    and the items skipped, once the rows ``left_out`` are out."""
    good: list[int] = []
    records: dict[str, RowRecord] = {}
    for relpath, record in plan.records.items():
        if record.row in left_out:
            records[relpath] = record._replace(row=-1)
        else:
            records[relpath] = record._replace(row=len(good))
            good.append(record.row)
    skipped = {items[row].relpath: left_out[row] for row in sorted(left_out)}
    return good, tuple(items[row].relpath for row in good), plan._replace(records=records), skipped


def _noting_left_out(
    result: Any, rows: list[int], left_out: dict[int, BaseException]
) -> np.ndarray[Any, Any]:
    """A batch's rows (``rows``: their numbers); those left out are added to ``left_out``."""
    if isinstance(result, _Partial):
        left_out.update((rows[position], why.error) for position, why in result.skipped)
        return result.rows
    return result  # type: ignore[no-any-return]


def _compact(
    path: str | os.PathLike[str],
    good: list[int],
    paths: tuple[str, ...],
    skipped: tuple[str, ...],
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
) -> tuple[int, str]:
    """Rewrite the data file at ``path`` with only its rows ``good`` (ascending): each run of
    consecutive rows is one byte-range copy, so no row passes through memory."""
    extent = serialize.array_extents(path)[0]
    row_bytes = extent.nbytes // extent.shape[0] if extent.shape[0] else 0
    final = f"{os.fspath(path)}.compact"
    value = ItemArray(serialize.ArraySlot((len(good), *shape), dtype), paths, skipped)
    out = serialize.dump_slotted(value, final)
    source = -1
    try:
        source = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        start = 0
        for end in range(1, len(good) + 1):
            if end == len(good) or good[end] != good[end - 1] + 1:
                out.copy_from(source, extent.offset + good[start] * row_bytes, 0,
                              start * row_bytes, (end - start) * row_bytes)  # fmt: skip
                start = end
        size, checksum = out.finish()
        os.replace(final, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(final)
        raise
    finally:
        out.close()
        if source >= 0:
            os.close(source)
    return size, checksum


def _compact_rows(rows: np.ndarray[Any, Any], good: list[int]) -> np.ndarray[Any, Any]:
    """``rows[good]`` in place (``good`` ascending): no second array."""
    for new, row in enumerate(good):
        if new != row:
            rows[new] = rows[row]
    return rows[: len(good)]
