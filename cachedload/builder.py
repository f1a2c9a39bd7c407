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
# On threads a batch costs ~50 µs: smaller ones even out the end of a build (the last batch
# of one thread, then its write, ran while the other thread idled): 20,000 small images
# built 7% faster with 16 than with 4.
_BATCHES_PER_THREAD = 16


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


class ItemArray(NamedTuple):
    """A per-item result: the stacked rows and each row's path relative to the source folder.

    Attributes:
        array: ``(N, *row_shape)`` array (a memory map when loaded with ``mmap_mode="r"``), or
            a list of ``N`` arrays for a ragged build.
        paths: each row's path, ``/``-separated, sorted.
    """

    array: Any
    paths: tuple[str, ...]


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
        records: every row's :class:`RowRecord`, to store with the entry.
        row_shape, dtype: of the stacked rows (``None`` for a ragged or empty build).
        full_build_reason: why the previous build was not used (``None`` if it was, or if
            there was none to use).
        value: the result in memory, as loading the file gives it, if ``build_items(...,
            in_memory=True)`` built it there (else ``None``: load the file).
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
) -> np.ndarray[Any, Any] | _Mismatch | list[np.ndarray[Any, Any]]:
    """Compute one batch: stacked rows (checked against ``shape``/``dtype``; into ``out`` if
    given, a thread's share of the result), or a list if ragged (``shape is None``). One
    array per batch crosses a process boundary, not N.

    An item function with a batch form (``fn.rows_into``, see :func:`build_items`) fills the
    rows itself; ``fn`` computes only the rows it stops at."""
    if shape is None or dtype is None:
        return [np.asarray(_load(fn, path, params)) for path in paths]
    if out is None:
        out = np.empty((len(paths), *shape), dtype)
    rows_into = getattr(fn, "rows_into", None)
    position = 0
    while position < len(paths):
        if rows_into is not None:
            done = rows_into(paths[position:], out[position:], **params)
            if not 0 <= done <= len(paths) - position:
                raise ValueError(f"{fn!r}.rows_into returned {done!r} for {len(paths)} rows")
            position += done
            if position == len(paths):
                break
        row = np.asarray(_load(fn, paths[position], params))
        if row.shape != shape or row.dtype != dtype:
            return _Mismatch(position, row.shape, row.dtype.str)
        out[position] = row
        position += 1
    return out


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
) -> BuildReport:
    """Compute ``fn(item.path, **params)`` for each item into one data file at ``path``.

    Args:
        fn: the item function; returns one row (an array, or anything ``np.asarray`` takes).
            It may have a batch form, an attribute ``fn.rows_into(paths, out, **params)``
            that fills ``out[k]`` with the row of ``paths[k]`` and returns how many leading
            paths it did, stopping before one it cannot do (an error, or a row that does not
            fit ``out``): one call per batch instead of one per item, rows written in place
            (``cached_image_folder`` on 2 threads: ~40 µs per 64x64 JPEG instead of ~60).
            ``fn`` then computes the row it stopped at (and raises its error).
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
    runner = _Runner(fn, params, n_jobs, backend, batch_bytes)
    if ragged:
        size, checksum = _build_ragged(runner, items, plan, old_rows, path)
        shape = dtype = None
    else:
        kept = np.empty(0) if in_memory and not plan.copies and runner.threads() else None
        size, checksum, shape, dtype, kept = _build_stacked(
            runner, items, plan, previous, extent, paths, path, kept
        )
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
        value=None if ragged or kept is None else ItemArray(kept, paths),
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
        per_worker = _BATCHES_PER_THREAD if self.threads() else _BATCHES_PER_WORKER
        by_count = -(-len(rows) // (workers * per_worker))
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

        parallel = joblib.Parallel(
            n_jobs=self.n_jobs, backend=self.backend, prefer="threads", return_as="generator"
        )
        task = joblib.delayed(_run_batch)
        return iter(parallel(task(*arguments) for arguments in tasks))

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
) -> tuple[int, str, tuple[int, ...], np.dtype[Any], np.ndarray[Any, Any] | None]:
    """Write the rows; ``kept`` (not ``None``: a full build on threads, every row computed)
    is replaced by the result array, the batches computed straight into it."""
    compute = list(plan.compute)
    shape, dtype, reference, first = _row_layout(runner, items, plan, extent)
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
        batches = runner.batches(compute, row_bytes)
        # Every row is computed (no copies): each batch is a run of consecutive rows.
        outs = None if kept is None else [kept[b[0] : b[-1] + 1] for b in batches]
        results = runner.run([[items[r].path for r in b] for b in batches], shape, dtype, outs)
        for rows, result in zip(batches, results, strict=True):
            if isinstance(result, _Mismatch):
                bad = rows[result.position]
                raise ItemShapeMismatchError(reference, shape, dtype.str, items[bad].relpath,
                                             result.shape, result.dtype)  # fmt: skip
            write(rows, result)
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
) -> tuple[tuple[int, ...], np.dtype[Any], str, np.ndarray[Any, Any] | None]:
    """The rows' shape and dtype, the relative path of a row that has them (for errors), and
    the first computed row if it had to be computed to find them (else ``None``)."""
    first: np.ndarray[Any, Any] | None = None
    if plan.copies:
        assert extent is not None
        shape, dtype = extent.shape[1:], _canonical(extent.dtype)
        reference = items[plan.copies[0][0]].relpath  # a row of that shape, for the error
    elif plan.compute:
        # The first row fixes the shape and dtype (and so the batch size and the layout).
        first = np.asarray(_load(runner.fn, items[plan.compute[0]].path, runner.params))
        shape, dtype = first.shape, first.dtype
        reference = items[plan.compute[0]].relpath
    else:  # no items at all
        shape, dtype, reference = (), np.dtype(np.float64), ""
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
) -> tuple[int, str]:
    """Rows of any shape: a list, in memory (copied rows read from the previous build)."""
    rows: list[Any] = [None] * len(items)
    for here, there, count in plan.copies:
        for k in range(count):
            old = old_rows[there + k]
            rows[here + k] = np.array(old, dtype=_canonical(old.dtype))
    batches = runner.batches(plan.compute, 1)
    results = runner.run([[items[r].path for r in b] for b in batches], None, None)
    for batch, result in zip(batches, results, strict=True):
        for row, array in zip(batch, result, strict=True):
            rows[row] = array
    return serialize.dump(ItemArray(rows, tuple(item.relpath for item in items)), path)
