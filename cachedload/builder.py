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

import bisect
import contextlib
import dataclasses
import functools
import io
import itertools
import logging
import operator
import os
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from cachedload import serialize
from cachedload.entry import FileColumns, ItemRecords
from cachedload.errors import ItemShapeMismatchError
from cachedload.fingerprint import (
    RACY_WINDOW_NS,
    FileRecord,
    Fingerprint,
    fingerprint_source,
    hash_file,
)
from cachedload.reading import file_identity, read_exactly
from cachedload.verified import open_regular

__all__ = [
    "BuildReport",
    "Item",
    "ItemArray",
    "ItemTable",
    "PreviousBuild",
    "RowRecord",
    "UnwrittenBuild",
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


class ItemTable(Sequence[Item]):
    """Items as columns, what :func:`build_items` works on: 20,000 :class:`Item` tuples (and
    the per-row work on them) cost a miss that changes one file ~50 ms; columns cost ~3.

    Row ``i`` is the file ``relpaths[i]`` of ``sizes[i]`` bytes modified at ``mtimes[i]``,
    at ``prefix + relpaths[i]``, or at ``paths[i]`` where ``paths`` is given. Indexing gives
    :class:`Item` s.
    """

    def __init__(
        self,
        relpaths: list[str],
        sizes: np.ndarray[Any, np.dtype[np.int64]],
        mtimes: np.ndarray[Any, np.dtype[np.int64]],
        *,
        prefix: str = "",
        paths: list[str] | None = None,
        contents: list[str] | None = None,
    ) -> None:
        self.relpaths, self.sizes, self.mtimes = relpaths, sizes, mtimes
        self.prefix, self.paths, self.contents = prefix, paths, contents

    @classmethod
    def of(cls, items: Iterable[Item]) -> ItemTable:
        """The table of ``items`` (itself if it is one)."""
        if isinstance(items, ItemTable):
            return items
        items = list(items)
        return cls(
            [item.relpath for item in items],
            np.array([item.size for item in items], np.int64),
            np.array([item.mtime_ns for item in items], np.int64),
            paths=[item.path for item in items],
        )

    @classmethod
    def from_files(
        cls, root: str, files: Sequence[FileRecord], contents: Mapping[str, str] | None = None
    ) -> ItemTable:
        """The files below the folder ``root`` as a fingerprint lists them (with its
        ``contents``, if it hashed them: rows are then matched by content)."""
        columns = FileColumns.of(files)
        prefix = root.rstrip(os.sep) + os.sep  # one concatenation per file, not a join
        by_content = [contents[rel] for rel in columns.paths] if contents else None
        return cls(columns.paths, columns.sizes, columns.mtimes, prefix=prefix,
                   contents=by_content)  # fmt: skip

    def path(self, row: int) -> str:
        """Row ``row``'s file."""
        return self.prefix + self.relpaths[row] if self.paths is None else self.paths[row]

    def paths_of(self, rows: list[int]) -> list[str]:
        """The files of ``rows`` (a batch: consecutive rows, usually)."""
        if rows and rows[-1] - rows[0] == len(rows) - 1:  # consecutive: slices
            first, end = rows[0], rows[-1] + 1
            if self.paths is not None:
                return self.paths[first:end]
            prefix = self.prefix
            return [prefix + rel for rel in self.relpaths[first:end]]
        return [self.path(row) for row in rows]

    def without(self, relpaths: Container[str]) -> ItemTable:
        """This table without the rows of ``relpaths``."""
        keep = [row for row, rel in enumerate(self.relpaths) if rel not in relpaths]
        return ItemTable(
            [self.relpaths[row] for row in keep],
            self.sizes[keep],
            self.mtimes[keep],
            prefix=self.prefix,
            paths=None if self.paths is None else [self.paths[row] for row in keep],
            contents=None if self.contents is None else [self.contents[row] for row in keep],
        )

    def columns(self) -> FileColumns:
        """The relative paths, sizes, mtimes (and contents), as a manifest stores them."""
        return FileColumns(self.relpaths, self.sizes, self.mtimes, self.contents)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, row: Any) -> Any:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        return Item(self.relpaths[row], self.path(row), int(self.sizes[row]),
                    int(self.mtimes[row]))  # fmt: skip

    def __repr__(self) -> str:
        return f"<ItemTable of {len(self)} items>"


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
        records: its per-row records as columns (``BuildReport.row_records``, or an entry's
            :func:`~cachedload.entry.item_records`), or ``relpath -> RowRecord``
            (``BuildReport.records``; plain tuples in the same order do too).
        extent: where its rows array sits in the file; ``None``: read from the file's index.
        safe_types: as for :func:`cachedload.serialize.load`: the file comes from a cache
            others can write (its index and a ragged build's rows are read with the
            restricted unpickler); ``None``: trusted.
        identity: :func:`file_identity` of the file when its checksum was checked: its rows
            are copied only while it is still that file, unchanged (a file replaced or
            written meanwhile gives a full build); ``None``: not checked.
    """

    path: str | os.PathLike[str]
    records: ItemRecords | Mapping[str, tuple[int, int, int, str | None]]
    extent: serialize.ArrayExtent | None = None
    safe_types: tuple[type, ...] | None = None
    identity: tuple[int, ...] | None = None


class _PreviousChanged(Exception):
    """The previous build's file is not the one that was checked any more."""


def _still_checked(previous: PreviousBuild, info: os.stat_result) -> None:
    """Raise :class:`_PreviousChanged` unless ``info`` is of the file that was checked."""
    if previous.identity is not None and file_identity(info) != previous.identity:
        raise _PreviousChanged("previous build's file changed after it was checked")


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build_items` did.

    Attributes:
        size, checksum: the data file's size and hex xxh3-128 (as ``hash_file`` gives it).
        computed: rows computed (calls of the item function).
        reused: rows copied from the previous build.
        seconds: wall time of the build.
        table: the items built, row by row (with those left out by ``skip``).
        digests: the content digest of each racy file (``relpath -> hex``): with ``table``,
            every row's record, to store with the entry (see :attr:`row_records`).
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
    table: ItemTable = field(repr=False)
    digests: dict[str, str] = field(repr=False)
    row_shape: tuple[int, ...] | None
    dtype: np.dtype[Any] | None
    full_build_reason: str | None = None
    value: ItemArray | None = field(default=None, repr=False, compare=False)
    skipped: dict[str, BaseException] = field(default_factory=dict, repr=False)

    @property
    def row_records(self) -> ItemRecords:
        """Every row's record as columns: a next build's :attr:`PreviousBuild.records`
        (items left out have no row, so no record: the next build computes them again)."""
        table = self.table.without(self.skipped) if self.skipped else self.table
        return ItemRecords(table.relpaths, table.sizes, table.mtimes, self.digests, table.contents)

    @property
    def records(self) -> dict[str, RowRecord]:
        """Every item's :class:`RowRecord`, by relative path (row -1 for one left out; made
        on demand: 20,000 cost ~15 ms, which a miss does not need)."""
        table, digests, skipped = self.table, self.digests, self.skipped
        records: dict[str, RowRecord] = {}
        row = 0
        for rel, size, mtime in zip(table.relpaths, table.sizes.tolist(), table.mtimes.tolist(),
                                    strict=True):  # fmt: skip
            here, row = (-1, row) if rel in skipped else (row, row + 1)
            records[rel] = RowRecord(here, size, mtime, digests.get(rel))
        return records


class UnwrittenBuild(OSError):
    """The data file of a build could not be written (a full disk, a file size limit), but
    every row was computed all the same: ``report.value`` holds the result, in memory.

    Attributes:
        error: the ``OSError`` that stopped the writing (also ``__cause__``).
        report: the build's :class:`BuildReport` (``size`` 0, ``checksum`` empty).
    """

    def __init__(self, error: OSError, report: BuildReport) -> None:
        super().__init__(error.errno, error.strerror or str(error), error.filename)
        self.error, self.report = error, report

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.error, self.report)


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

    @property
    def rows_into(self) -> Callable[..., int] | None:
        """The function's batch form, if it has one: it stops before an item that fails,
        which the builder then computes alone (and so leaves out if it must)."""
        return getattr(self.fn, "rows_into", None)


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
    make it a :class:`_Partial`.

    An item function with a batch form (``fn.rows_into``, see :func:`build_items`) fills the
    rows itself; ``fn`` computes only the rows it stops at."""
    if shape is None or dtype is None:
        return [_as_row(_load(fn, path, params)) for path in paths]
    if out is None:
        out = np.empty((len(paths), *shape), dtype)
    rows_into = getattr(fn, "rows_into", None)
    skipped: list[tuple[int, _Skipped]] = []
    position, path, count = 0, "", len(paths)
    try:
        while position < count:
            if rows_into is not None:
                path = ""  # not one file's error
                done = rows_into(paths[position:], out[position:], **params)
                if not 0 <= done <= count - position:
                    raise ValueError(f"{fn!r}.rows_into returned {done!r} for {count} rows")
                position += done
                if position == count:
                    break
            # Once per item without a batch form, holding the GIL: no call but fn's, no dtype
            # comparison where the dtype is numpy's own instance (~0.5 µs an item).
            path = paths[position]
            row = fn(path, **params)
            if type(row) is not np.ndarray:
                if isinstance(row, _Skipped):
                    skipped.append((position, row))
                    position += 1
                    continue
                row = np.asarray(row)
            if row.shape != shape or (row.dtype is not dtype and row.dtype != dtype):
                return _Mismatch(position, row.shape, row.dtype.str)
            out[position] = row
            position += 1
    except BaseException as exc:
        if path and hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"while loading {path}")
        raise
    return _Partial(out, skipped) if skipped else out


# -- the build ------------------------------------------------------------------------------


class _Plan(NamedTuple):
    compute: list[int]  # rows to compute, in order
    copies: list[tuple[int, int, int]]  # (first row here, first row in previous, count)
    digests: dict[str, str]  # content digests of the racy files, by relative path


class _Aligned(NamedTuple):
    """The previous build's record of each row's file (row ``i`` of the new build): its row
    there (-1: none), size, mtime, and the content digests it recorded, by path."""

    rows: np.ndarray[Any, np.dtype[np.int64]]
    sizes: np.ndarray[Any, np.dtype[np.int64]]
    mtimes: np.ndarray[Any, np.dtype[np.int64]]
    digests: Mapping[str, str]


def _align(table: ItemTable, records: ItemRecords | Mapping[str, Any]) -> _Aligned:
    """Match each new row with the previous build's record of the same relative path."""
    if not isinstance(records, ItemRecords):  # relpath -> (row, size, mtime, digest)
        missing = (-1, -1, -1, None)
        found = [records.get(rel, missing) for rel in table.relpaths]
        rows, sizes, mtimes = (np.array([r[i] for r in found], np.int64) for i in range(3))
        digests = {rel: record[3] for rel, record in zip(table.relpaths, found, strict=True)
                   if record[3] is not None}  # fmt: skip
        return _Aligned(rows, sizes, mtimes, digests)
    count = len(table)
    if table.relpaths == records.paths:  # the usual case: no file added or removed
        rows = np.arange(count, dtype=np.int64)
    else:
        where = {rel: row for row, rel in enumerate(records.paths)}
        rows = np.fromiter((where.get(rel, -1) for rel in table.relpaths), np.int64, count)
    rows[rows >= min(len(records.sizes), len(records.mtimes))] = -1  # a damaged manifest
    known = np.maximum(rows, 0)
    sizes = records.sizes[known] if len(records.sizes) else np.full(count, -1, np.int64)
    mtimes = records.mtimes[known] if len(records.mtimes) else np.full(count, -1, np.int64)
    return _Aligned(rows, sizes, mtimes, records.digests)


def _classify(
    table: ItemTable,
    previous: ItemRecords | Mapping[str, Any] | None,
    previous_rows: int,
    taken_ns: int,
) -> _Plan:
    """Which rows to compute and which to copy; the racy files' content digests.

    Columns, not a loop over rows: only racy files (hashed) and the previous build's racy
    files (compared by content) cost a step each.
    """
    racy_limit = taken_ns - RACY_WINDOW_NS
    relpaths, contents = table.relpaths, table.contents
    digests = {relpaths[row]: _digest(table.path(row)) if contents is None else contents[row]
               for row in np.flatnonzero(table.mtimes >= racy_limit).tolist()}  # fmt: skip
    if previous is None or not previous_rows or not len(table):
        return _Plan(list(range(len(table))), [], digests)
    old = _align(table, previous)
    same = (old.rows >= 0) & (old.rows < previous_rows)
    if contents is not None:
        same &= _same_contents(contents, previous, old.rows)
    else:
        same &= (old.sizes == table.sizes) & (old.mtimes == table.mtimes)
        for rel, old_digest in old.digests.items():
            # The file was racy when the previous build listed it: a same-size rewrite in
            # the same mtime tick would not show in its record; its content must match too.
            row = bisect.bisect_left(relpaths, rel)
            if row < len(relpaths) and relpaths[row] == rel and same[row]:
                same[row] = (digests.get(rel) or _digest(table.path(row))) == old_digest
    kept = np.flatnonzero(same)
    copies: list[tuple[int, int, int]] = []
    if kept.size:
        there = old.rows[kept]
        # A run of rows consecutive here and there is one copy.
        breaks = np.flatnonzero((np.diff(kept) != 1) | (np.diff(there) != 1)) + 1
        starts = np.concatenate(([0], breaks))
        counts = np.diff(np.concatenate((starts, [kept.size])))
        copies = list(zip(kept[starts].tolist(), there[starts].tolist(), counts.tolist(),
                          strict=True))  # fmt: skip
    return _Plan(np.flatnonzero(~same).tolist(), copies, digests)


#: The content digest of a file that could not be read when hashed (removed meanwhile): no
#: file's (a hex digest), so its row is computed, not copied, and the next call hashes it anew.
_UNREADABLE = "unreadable"


def _digest(path: str) -> str:
    """The file's content digest, or :data:`_UNREADABLE`: a file removed while a build runs
    is a change to the source (its row is computed: the item function says what is wrong,
    or ``skip=`` leaves it out), not a failure of the build."""
    try:
        return hash_file(path)
    except OSError:
        return _UNREADABLE


def _same_contents(
    contents: list[str],
    previous: ItemRecords | Mapping[str, Any],
    rows: np.ndarray[Any, np.dtype[np.int64]],
) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Rows whose file's content digest is the one the previous build recorded for the
    same path (a table of contents is matched by content alone: sizes and mtimes may have
    changed, or not when the content did); none if it recorded no contents."""
    old = previous.contents if isinstance(previous, ItemRecords) else None
    if old is None:
        return np.zeros(len(contents), np.bool_)
    count = len(old)
    return np.fromiter(
        (0 <= there < count and content == old[there]
         for content, there in zip(contents, rows.tolist(), strict=True)),
        np.bool_, len(contents),
    )  # fmt: skip


class _Previous(NamedTuple):
    """The previous build's file, open (rows are copied from it: another process removing
    the entry meanwhile takes its name, not its rows; closed once the build is written, or
    when dropped if the build fails before), its rows, and its identity when it was checked
    (:attr:`PreviousBuild.identity`)."""

    file: io.FileIO
    extent: serialize.ArrayExtent
    identity: tuple[int, ...] | None = None


def _still_named(previous: PreviousBuild) -> None:
    """Raise :class:`_PreviousChanged` unless the previous build's file is, by its name, the
    one that was checked, unchanged (gone: removed meanwhile, rows perhaps not the same)."""
    if previous.identity is None:
        return
    try:
        info = os.stat(previous.path)
    except OSError as error:
        raise _PreviousChanged(f"previous build's file is gone ({error})") from None
    _still_checked(previous, info)


def _check_unchanged(opened: _Previous | None) -> None:
    """Raise :class:`_PreviousChanged` if the previous build's open file was written since
    it was checked (rows copied from it meanwhile may not be those checked)."""
    if opened is None or opened.identity is None:
        return
    if file_identity(os.fstat(opened.file.fileno())) != opened.identity:
        raise _PreviousChanged("previous build's file changed after it was checked")


def _previous_rows(previous: PreviousBuild | None) -> tuple[_Previous | None, str]:
    """The previous build's file opened, with its rows extent; or ``None`` and why it cannot
    be used."""
    if previous is None:
        return None, "no previous build"
    try:
        file = io.FileIO(open_regular(previous.path)[0], "r")  # never a FIFO's: it blocks
    except OSError as exc:  # e.g. removed by another process's clear or keep=: compute them
        return None, f"previous build unreadable ({type(exc).__name__}: {exc})"
    try:
        extent = previous.extent or serialize.array_extents(previous.path, previous.safe_types)[0]
        paths = _row_paths(previous)
        opened, named = os.fstat(file.fileno()), os.stat(previous.path)
    except Exception as exc:  # a damaged or crafted file: a full build, whatever it raises
        file.close()
        return None, f"previous build unreadable ({type(exc).__name__}: {exc})"
    why = ""
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        why = "previous build replaced while it was read"
    elif previous.identity is not None and file_identity(opened) != previous.identity:
        # Read by name above, but the same file as checked, unchanged (a rename changes
        # the ctime too): its index and paths are the checked file's.
        why = "previous build's file changed after it was checked"
    elif not extent.shape or extent.order != "C" or extent.offset + extent.nbytes > opened.st_size:
        why = "previous build holds no rows array"
    elif not _rows_match(previous.records, extent.shape[0], paths):
        # Row i came from the i-th file of its records: a count that differs (a damaged or
        # crafted entry) would shift every row after the difference.
        why = f"previous build's records do not match its {extent.shape[0]} rows"
    if why:
        file.close()
        return None, why
    return _Previous(file, extent, previous.identity), ""


def _row_paths(previous: PreviousBuild) -> tuple[str, ...] | None:
    """The file of each row, as the previous build's data file names them (covered by its
    checksum, unlike its manifest in entries written before the manifest was recorded); None
    if its records are not an entry's (they name their rows themselves)."""
    if not isinstance(previous.records, ItemRecords):
        return None
    value = serialize.load(previous.path, mmap_mode="r", safe_types=previous.safe_types)
    if not isinstance(value, ItemArray):
        raise ValueError("it holds no ItemArray")
    return tuple(value.paths)


def _rows_match(
    records: ItemRecords | Mapping[str, Any], rows: int, paths: Sequence[str] | None = None
) -> bool:
    """Whether ``records`` describe ``rows`` rows (of the files ``paths``, if given). Columns
    (an entry's) give row ``i`` to the ``i``-th path: their count must be the rows', their
    paths the rows' files; a mapping (a report's) names each record's row, which
    :func:`_classify` bounds."""
    if not isinstance(records, ItemRecords):
        return True
    return len(records.paths) == rows and (paths is None or records.paths == list(paths))


def build_items(
    fn: Callable[..., Any],
    items: Sequence[Item],
    path: str | os.PathLike[str] | None,
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
            It may have a batch form, an attribute ``fn.rows_into(paths, out, **params)``
            that fills ``out[k]`` with the row of ``paths[k]`` and returns how many leading
            paths it did, stopping before one it cannot do (an error, or a row that does not
            fit ``out``): one call per batch instead of one per item, rows written in place
            (``cached_image_folder`` on 2 threads: ~40 µs per 64x64 JPEG instead of ~60).
            ``fn`` then computes the row it stopped at (and raises its error).
        items: the files, sorted by ``relpath`` (as :func:`scan_items` gives them).
        path: the data file to write (a new file; fsynced when this returns); ``None``: no
            file, the result in memory only (``report.value``).
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
        UnwrittenBuild: the file could not be written (a full disk, a file size limit); the
            rows were computed all the same, in memory: its ``report.value``. No row is
            computed twice: those written before the failure are read back.
        ItemShapeMismatchError: rows differ in shape or dtype (not ``ragged``).
        ValueError: ``items`` are not sorted by ``relpath`` or repeat one.
        Whatever ``fn`` raises, with a note naming the file.
    """
    run = functools.partial(
        _build_items, fn, items, path, params=params, taken_ns=taken_ns, n_jobs=n_jobs,
        backend=backend, ragged=ragged, batch_bytes=batch_bytes, in_memory=in_memory,
        skip=skip, progress=progress,
    )  # fmt: skip
    try:
        return run(previous=previous)
    except _PreviousChanged as changed:  # its rows may not be what was checked: compute them
        _log.info("full build of %s items: %s", len(items), changed)
        return dataclasses.replace(run(previous=None), full_build_reason=str(changed))


def _build_items(
    fn: Callable[..., Any],
    items: Sequence[Item],
    path: str | os.PathLike[str] | None,
    *,
    params: Mapping[str, Any] | None,
    previous: PreviousBuild | None,
    taken_ns: int | None,
    n_jobs: int | None,
    backend: Any,
    ragged: bool,
    batch_bytes: int,
    in_memory: bool,
    skip: tuple[type[BaseException], ...],
    progress: Callable[[int, int], object] | None,
) -> BuildReport:
    started = time.perf_counter()
    table = ItemTable.of(items)
    _check_sorted(table.relpaths)
    taken_ns = time.time_ns() if taken_ns is None else taken_ns
    params = dict(params or {})
    old_rows: Any = None
    opened: _Previous | None = None
    if ragged:
        old_rows, reason = _previous_list(previous)
        previous_rows = len(old_rows) if old_rows is not None else 0
    else:
        opened, reason = _previous_rows(previous)
        previous_rows = opened.extent.shape[0] if opened is not None else 0
    usable = old_rows is not None or opened is not None
    plan = _classify(table, previous.records if previous else None, previous_rows, taken_ns)
    if not usable and previous is not None:
        _log.info("full build of %s items: %s", len(table), reason)
    paths = tuple(table.relpaths)
    runner = _Runner(_Skipping(fn, skip) if skip else fn, params, n_jobs, backend, batch_bytes)
    left_out: dict[int, BaseException] = {}  # row -> why (rows in the order of the table)
    advance = _advancer(progress, len(plan.compute))
    value: ItemArray | None = None
    if ragged:
        size, checksum, value, unwritten = _build_ragged(
            runner, table, plan, old_rows, path, left_out, advance
        )
        if plan.copies:  # written or replaced while its rows were copied: not those rows
            assert previous is not None
            _still_named(previous)
        shape = dtype = None
        kept = None
    else:
        kept = np.empty(0) if in_memory and not plan.copies and runner.threads() else None
        size, checksum, shape, dtype, kept, unwritten = _build_stacked(
            runner, table, plan, opened, paths, path, kept, left_out, advance
        )
    skipped: dict[str, BaseException] = {}
    if left_out:
        good, paths, skipped = _leave_out(table, left_out)
        if not ragged:  # a ragged file is written without them
            assert shape is not None and dtype is not None
            if path is not None and unwritten is None:
                try:
                    size, checksum = _compact(path, good, paths, tuple(skipped), shape, dtype)
                except OSError as error:  # no room for the compacted copy: go on in memory
                    kept = _read_rows(path, kept)
                    size, checksum, unwritten = 0, "", error
            kept = None if kept is None else _compact_rows(kept, good)
    if value is None and kept is not None:
        value = ItemArray(kept, paths, tuple(skipped))
    reused = sum(count for _first, _source, count in plan.copies)
    report = BuildReport(
        size=size,
        checksum=checksum,
        computed=len(plan.compute),
        reused=reused,
        seconds=time.perf_counter() - started,
        table=table,
        digests=plan.digests,
        row_shape=shape,
        dtype=dtype,
        full_build_reason=reason if previous is not None and not usable else None,
        value=value,
        skipped=skipped,
    )
    where = "memory" if path is None or unwritten is not None else os.fspath(path)
    _log.debug("built %s: %s rows computed, %s copied, %s bytes in %.3f s", where,
               report.computed, report.reused, size, report.seconds)  # fmt: skip
    if unwritten is not None:
        _log.info("could not write %s (%s): the rows are kept in memory", path, unwritten)
        raise UnwrittenBuild(unwritten, report) from unwritten
    return report


def _check_sorted(relpaths: list[str]) -> None:
    """Raise unless ``relpaths`` are sorted and unique (one C-level pass when they are)."""
    if all(map(operator.lt, relpaths, relpaths[1:])):
        return
    bad = next(after for before, after in itertools.pairwise(relpaths) if not before < after)
    raise ValueError(f"items must be sorted by relpath, unique: {bad!r}")


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

    def one(self, path: str) -> np.ndarray[Any, Any] | _Skipped:
        """One item's row, computed where the batches run: on a cluster's or a process
        pool's workers (the calling process may lack what the function needs: a GPU, the
        memory), else here (this process's threads run the batches anyway, and a pool for
        one item would cost more than most items: ~12 ms)."""
        if self.threads():
            return _as_row(_load(self.fn, path, self.params))
        (found,) = self.run([[path]], None, None)  # to its end: the pool is left tidy
        row: np.ndarray[Any, Any] | _Skipped = found[0]
        return row

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
            pool.shutdown(wait=True)  # every batch is done: the threads only have to end
        finally:
            # Never waiting here: a generator left unfinished (an error in the consumer) may be
            # closed by the garbage collector on any thread, one of this very pool's included,
            # which would then wait for itself (a hang seen in CI).
            pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _closing(results: Iterator[Any]) -> Iterator[None]:
    """Close a runner's result generator when the loop over it ends, however it ends."""
    try:
        yield
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _build_stacked(
    runner: _Runner,
    table: ItemTable,
    plan: _Plan,
    opened: _Previous | None,
    paths: tuple[str, ...],
    path: str | os.PathLike[str] | None,
    kept: np.ndarray[Any, Any] | None,
    left_out: dict[int, BaseException],
    advance: Callable[[int], None],
) -> tuple[int, str, tuple[int, ...], np.dtype[Any], np.ndarray[Any, Any] | None, OSError | None]:
    """Write the rows; ``kept`` (not ``None``: a full build on threads, every row computed)
    is replaced by the result array, the batches computed straight into it. Rows left out
    are added to ``left_out`` (their bytes in the file are left as they are). Returns the
    file's size and checksum, the rows' shape and dtype, the rows in memory (``kept``, or
    all of them if the file could not be written: then with the error, else ``None``)."""
    extent = None if opened is None else opened.extent
    shape, dtype, reference, first = _row_layout(runner, table, plan, extent, left_out)
    compute = plan.compute[len(left_out) :]  # those left out before the first row: done
    row_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if kept is not None:
        kept = np.empty((len(table), *shape), dtype)
        if first is not None:
            kept[compute[0]] = first
    value = ItemArray(serialize.ArraySlot((len(table), *shape), dtype), paths)
    out = _RowsOut(value, path, kept)
    source_fd = -1 if opened is None else opened.file.fileno()
    try:
        copies = iter(plan.copies)
        pending_copy = next(copies, None)

        def copy_until(row: int) -> None:
            """Copy the previous rows that come before ``row`` (all: ``row=len(table)``)."""
            nonlocal pending_copy
            while pending_copy is not None and pending_copy[0] < row:
                here, there, count = pending_copy
                assert extent is not None
                out.copy_from(source_fd, extent.offset + there * row_bytes,
                              here * row_bytes, count * row_bytes)  # fmt: skip
                pending_copy = next(copies, None)

        def write(rows: list[int], block: np.ndarray[Any, Any]) -> None:
            """Write a batch's rows: one write per run of consecutive rows."""
            start = 0
            for end in range(1, len(rows) + 1):
                if end == len(rows) or rows[end] != rows[end - 1] + 1:
                    copy_until(rows[start])
                    out.write_rows(rows[start], block[start:end])
                    start = end

        if first is not None:
            write(compute[:1], first[None])
            compute = compute[1:]
            del first
        advance(len(plan.compute) - len(compute))
        batches = runner.batches(compute, row_bytes)
        # Every row is computed (no copies): each batch is a run of consecutive rows.
        outs = None if kept is None else [kept[b[0] : b[-1] + 1] for b in batches]
        results = runner.run([table.paths_of(b) for b in batches], shape, dtype, outs)
        with _closing(results):  # on error too, here: not by the garbage collector
            for rows, result in zip(batches, results, strict=True):
                if isinstance(result, _Mismatch):
                    bad = rows[result.position]
                    raise ItemShapeMismatchError(reference, shape, dtype.str,
                                                 table.relpaths[bad], result.shape,
                                                 result.dtype)  # fmt: skip
                write(rows, _noting_left_out(result, rows, left_out))
                advance(len(rows))
        copy_until(len(table))
        _check_unchanged(opened)  # written while its rows were copied: not those rows
        size, checksum = out.finish()
    finally:
        out.close()
        if opened is not None:
            opened.file.close()
    return size, checksum, shape, dtype, out.memory, out.error


class _RowsOut:
    """Where a stacked build's rows go: the data file at ``path`` (and ``kept``, the rows
    in memory, if given). From the first write that fails (a full disk, a file size limit),
    or with no ``path``, the rows go to memory only: those written before are read back
    (rows are written in ascending order), so no row is computed twice."""

    def __init__(self, value: ItemArray, path: str | os.PathLike[str] | None, kept: Any) -> None:
        slot: serialize.ArraySlot = value.array
        self.shape, self.dtype = slot.shape, slot.dtype
        self.row_bytes = slot.nbytes // slot.shape[0] if slot.shape[0] else 0
        self.memory: np.ndarray[Any, Any] | None = kept
        self.fill = False  # the rows are written into memory (not there already: kept)
        self.error: OSError | None = None
        self.file: serialize.SlottedFile | None = None
        if path is None:
            self._spill(None, 0)
            return
        try:
            self.file = serialize.dump_slotted(value, path)
        except OSError as error:
            self._spill(error, 0)

    def write_rows(self, first_row: int, rows: np.ndarray[Any, Any]) -> None:
        if self.file is not None:
            try:
                self.file.write_rows(0, first_row, rows)
            except OSError as error:
                self._spill(error, first_row * self.row_bytes)
        if self.fill:
            assert self.memory is not None
            self.memory[first_row : first_row + len(rows)] = rows

    def copy_from(self, src_fd: int, src_offset: int, byte_offset: int, count: int) -> None:
        if self.file is not None:
            try:
                self.file.copy_from(src_fd, src_offset, 0, byte_offset, count)
            except OSError as error:
                self._spill(error, byte_offset)
        if self.fill:
            read_exactly(src_fd, self._bytes()[byte_offset : byte_offset + count], src_offset)

    def finish(self) -> tuple[int, str]:
        if self.file is not None:
            try:
                return self.file.finish()
            except OSError as error:
                self._spill(error, self.row_bytes * self.shape[0])
        return 0, ""

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _bytes(self) -> memoryview:
        assert self.memory is not None
        return self.memory.reshape(-1).view(np.uint8).data

    def _spill(self, error: OSError | None, written: int) -> None:
        """Go on in memory; ``written``: the bytes of rows in the file so far."""
        file, self.file, self.error = self.file, None, error
        try:
            if self.memory is None:
                self.memory, self.fill = np.empty(self.shape, self.dtype), True
                if file is not None and written:
                    read_exactly(file.fd, self._bytes()[:written], file.slots[0].offset)
        except (OSError, EOFError):
            assert error is not None  # there is a file: its error
            raise error from None  # what is written cannot be read back either
        finally:
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()


def _read_rows(path: str | os.PathLike[str], kept: Any) -> np.ndarray[Any, Any]:
    """The rows array of a finished data file, in memory (``kept`` if it is there)."""
    if kept is not None:
        return kept  # type: ignore[no-any-return]
    extent = serialize.array_extents(path)[0]
    rows = np.empty(extent.shape, extent.dtype)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        read_exactly(fd, rows.reshape(-1).view(np.uint8).data, extent.offset)
    finally:
        os.close(fd)
    return rows


def _row_layout(
    runner: _Runner,
    table: ItemTable,
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
        reference = table.relpaths[plan.copies[0][0]]  # a row of that shape, for the error
    else:
        # The first row fixes the shape and dtype (and so the batch size and the layout).
        for row in plan.compute:
            found = runner.one(table.path(row))
            if not isinstance(found, _Skipped):
                first, shape, dtype = found, found.shape, found.dtype
                reference = table.relpaths[row]
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
        _still_checked(previous, os.stat(previous.path))
        value = serialize.load(previous.path, mmap_mode="r", safe_types=previous.safe_types)
        _still_checked(previous, os.stat(previous.path))
    except Exception as exc:  # a damaged file is a reason for a full build, whatever it raises
        return None, f"previous build unreadable ({exc})"
    if not isinstance(value, ItemArray) or not isinstance(value.array, list):
        return None, "previous build holds no list of rows"
    if not _rows_match(previous.records, len(value.array), value.paths):
        return None, f"previous build's records do not match its {len(value.array)} rows"
    return value.array, ""


def _build_ragged(
    runner: _Runner,
    table: ItemTable,
    plan: _Plan,
    old_rows: Any,
    path: str | os.PathLike[str] | None,
    left_out: dict[int, BaseException],
    advance: Callable[[int], None],
) -> tuple[int, str, ItemArray | None, OSError | None]:
    """Rows of any shape: a list, in memory (copied rows read from the previous build); the
    rows left out are added to ``left_out`` and not written. Returns the file's size and
    checksum, and the result if it is not in the file (no ``path``, or it could not be
    written: then with the error)."""
    rows: list[Any] = [None] * len(table)
    for here, there, count in plan.copies:
        for k in range(count):
            old = old_rows[there + k]
            rows[here + k] = np.array(old, dtype=_canonical(old.dtype))
    batches = runner.batches(plan.compute, 1)
    results = runner.run([table.paths_of(b) for b in batches], None, None)
    with _closing(results):
        for batch, result in zip(batches, results, strict=True):
            for row, array in zip(batch, result, strict=True):
                if isinstance(array, _Skipped):
                    left_out[row] = array.error
                else:
                    rows[row] = array
            advance(len(batch))
    relpaths = table.relpaths
    good = [row for row in range(len(table)) if row not in left_out]
    value = ItemArray([rows[row] for row in good], tuple(relpaths[row] for row in good),
                      tuple(relpaths[row] for row in sorted(left_out)))  # fmt: skip
    if path is None:
        return 0, "", value, None
    try:
        size, checksum = serialize.dump(value, path)
    except OSError as error:
        return 0, "", value, error
    return size, checksum, None, None


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
    table: ItemTable, left_out: Mapping[int, BaseException]
) -> tuple[list[int], tuple[str, ...], dict[str, BaseException]]:
    """The rows kept (their numbers before), their paths, and the items skipped, once the
    rows ``left_out`` are out."""
    relpaths = table.relpaths
    good = [row for row in range(len(table)) if row not in left_out]
    skipped = {relpaths[row]: left_out[row] for row in sorted(left_out)}
    return good, tuple(relpaths[row] for row in good), skipped


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
