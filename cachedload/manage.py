"""Managing a cache directory: listing entries, bounding its growth, removing and verifying.

Growth is bounded twice (both applied by the decorator right after each store, see
:func:`enforce_after_store`, and on demand by :func:`prune` / ``cachedload prune``):

* **superseded entries**: entries of one *group* (same function, code, parameters and source
  paths) differ only in their sources' contents, so once a newer one is stored the older ones are
  stale until the files are put back; at most ``keep`` of a group are kept, newest first;
* **size**: with ``max_size``, least-recently-used entries are evicted until the cache fits.

An entry is never removed while another process holds its lock (it is being computed or
replaced): removal takes the entry's lock without waiting, and skips the entry if it cannot.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachedload.backends import open_root
from cachedload.config import parse_size
from cachedload.entry import CorruptEntry
from cachedload.errors import ConfigurationError
from cachedload.options import check_keep
from cachedload.root import CacheRoot, Checked, EntryInfo, Leftover
from cachedload.store import LocalRoot
from cachedload.superseded import keep_superseded, superseded_record

__all__ = [
    "EntryRecord",
    "PruneReport",
    "VerifyResult",
    "enforce_after_store",
    "format_age",
    "format_size",
    "is_busy",
    "leftovers",
    "list_entries",
    "local_copies",
    "log_removal",
    "manifest_of",
    "parse_age",
    "prune",
    "prune_root",
    "records_of",
    "remove_damaged",
    "remove_entries",
    "tidy",
    "tidy_local_copies",
    "verify",
    "verify_root",
]

logger = logging.getLogger("cachedload")

_AGE_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class EntryRecord:
    """One stored entry, described for people (``cachedload ls``) and programs.

    Attributes:
        id: the entry's cache key (its folder name); ``cachedload info`` accepts a prefix of
            it. ``key`` is the same (``id`` is its name in ``cachedload ls --json``).
        function: the loader's ``module.qualname``.
        function_dir: the name of the function folder holding the entry (one per code version).
        parameters: each parameter's readable value, e.g. ``{"size": "(64, 64)"}``.
        sources: each source's ``{"path", "file_count", "total_bytes"}``.
        result: a short description of the stored result (type, shapes, dtypes).
        size_bytes: the entry's size on disk.
        created: when it was stored (seconds since the epoch).
        last_used: its last hit (seconds since the epoch; ``created`` if never hit).
        hits: how many calls it answered.
        path: the entry's folder.
        meta: the entry's full metadata (``meta.json``).
        url: for a remote cache (``s3://…``), the entry in the bucket; ``path`` is then where
            this machine's local copy is or would be.
        copy_of: for a local read-through copy of a remote entry, kept under
            ``<cache_dir>/remote/``, the remote cache's URL (``remote/<folder>`` if the copy
            does not record it). Deleting such a record deletes the local copy only.
        root: the cache root holding the entry (where removing it deletes it).
    """

    id: str
    function: str
    function_dir: str
    parameters: dict[str, str]
    sources: dict[str, dict[str, Any]]
    result: str
    size_bytes: int
    created: float
    last_used: float
    hits: int
    path: Path
    meta: dict[str, Any] = field(repr=False, compare=False)
    url: str | None = None
    copy_of: str | None = None
    root: CacheRoot | None = field(default=None, repr=False, compare=False)

    key = property(lambda self: self.id, doc="The entry's cache key (the same as ``id``).")

    @classmethod
    def from_info(
        cls, info: EntryInfo, root: CacheRoot | None = None, copy_of: str | None = None
    ) -> EntryRecord:
        """Build a record from :meth:`CacheRoot.entries`' description."""
        meta = info.meta
        parameters = {
            name: str(value.get("value", "?")) if isinstance(value, dict) else str(value)
            for name, value in (meta.get("parameters") or {}).items()
        }
        sources = {
            name: {
                "path": str(value.get("path", "?")),
                "file_count": int(value.get("file_count", 0)),
                "total_bytes": int(value.get("total_bytes", 0)),
            }
            for name, value in (meta.get("sources") or {}).items()
            if isinstance(value, dict)
        }
        created = float(meta.get("created", 0.0))
        return cls(
            id=info.key,
            function=str(meta.get("function", info.path.parent.name)),
            function_dir=info.path.parent.name,
            parameters=parameters,
            sources=sources,
            result=str(meta.get("result", "?")),
            size_bytes=info.size_bytes,
            created=created,
            last_used=info.last_used,
            hits=info.hits,
            path=info.path,
            meta=meta,
            url=info.url,
            copy_of=copy_of,
            root=root,
        )

    @property
    def group(self) -> str | None:
        """Entries of one group differ only in their sources' contents (see the module doc)."""
        group = self.meta.get("group")
        return group if isinstance(group, str) else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the record (without the raw metadata)."""
        return {
            "id": self.id,
            "function": self.function,
            "function_dir": self.function_dir,
            "parameters": dict(self.parameters),
            "sources": {name: dict(value) for name, value in self.sources.items()},
            "result": self.result,
            "size_bytes": self.size_bytes,
            "created": self.created,
            "last_used": self.last_used,
            "hits": self.hits,
            "path": str(self.path),
            **({"url": self.url} if self.url is not None else {}),
            **({"copy_of": self.copy_of} if self.copy_of is not None else {}),
        }


@dataclass(frozen=True)
class PruneReport:
    """What a removal did (or, with ``dry_run``, would do).

    Attributes:
        removed: the entries removed.
        busy: entries that should have gone but were kept: another process held their lock.
        dry_run: True if nothing was actually deleted.
    """

    removed: tuple[EntryRecord, ...] = ()
    busy: tuple[EntryRecord, ...] = ()
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        """Total size of the removed entries."""
        return sum(record.size_bytes for record in self.removed)

    def __add__(self, other: PruneReport) -> PruneReport:
        return PruneReport(
            self.removed + other.removed, self.busy + other.busy, self.dry_run or other.dry_run
        )

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        text = f"{verb} {_plural(len(self.removed), 'entry', 'entries')}, "
        text += f"{'would free' if self.dry_run else 'freed'} {format_size(self.bytes_freed)}"
        if self.busy:
            text += (
                f" ({_plural(len(self.busy), 'entry', 'entries')} in use by another process kept)"
            )
        return text


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking one entry folder with :func:`verify`.

    Attributes:
        path: the entry's folder.
        function: the loader's ``module.qualname`` (the folder name if the metadata is unreadable).
        size_bytes: the entry's size on disk.
        problem: what is wrong, or None if the entry is intact.
        unknown: not an entry: a folder that is not cachedload's (in the cache directory, a
            function folder or ``remote/``), or one named as an entry but damaged and not
            shaped as one (it holds other things than an entry's files). Never deleted.
        url: for a remote cache, the entry in the bucket.
        copy_of: for a local copy of a remote entry, the remote cache (see
            :attr:`EntryRecord.copy_of`).
        root: the cache root holding the entry.
    """

    path: Path
    function: str
    size_bytes: int
    problem: str | None
    url: str | None = None
    copy_of: str | None = None
    root: CacheRoot | None = field(default=None, repr=False, compare=False)
    unknown: bool = False

    @classmethod
    def from_checked(
        cls, checked: Checked, root: CacheRoot, copy_of: str | None = None
    ) -> VerifyResult:
        """Build a result from :meth:`CacheRoot.verify`'s."""
        return cls(
            checked.path,
            checked.function,
            checked.size_bytes,
            checked.problem,
            checked.url,
            copy_of,
            root,
            checked.unknown,
        )

    @property
    def id(self) -> str:
        """The entry's key."""
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the result (``cachedload verify --json``), keyed as
        :meth:`EntryRecord.to_dict` is."""
        return {
            "id": self.id,
            "function": self.function,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "ok": self.ok,
            "problem": self.problem,
            "unknown": self.unknown,
            **({"url": self.url} if self.url is not None else {}),
            **({"copy_of": self.copy_of} if self.copy_of is not None else {}),
        }

    @property
    def ok(self) -> bool:
        """True if the entry is intact."""
        return self.problem is None


# -- sizes and ages ----------------------------------------------------------------------------
def parse_age(value: float | str, option: str = "older_than") -> float:
    """Parse a duration in seconds: a number, or a string such as ``"30d"``, ``"12h"``, ``"15m"``,
    ``"45s"`` or ``"2w"``.

    Raises:
        ConfigurationError: the value is not a duration (the error names ``option``).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ConfigurationError(option, f"a duration cannot be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _AGE_RE.match(value)
        if match and match.group(2).lower() in _AGE_UNITS:
            return float(match.group(1)) * _AGE_UNITS[match.group(2).lower()]
    raise ConfigurationError(
        option, f"expected a duration such as 30d, 12h, 15m or 45s, got {value!r}"
    )


def format_size(size: float) -> str:
    """A size for people, in decimal units: ``"512 B"``, ``"19.7 MB"``, ``"1.2 GB"``."""
    if size < 1000:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 999.95:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} PB"


def format_age(seconds: float) -> str:
    """A duration for people: ``"42 s"``, ``"5 min"``, ``"3 h"``, ``"12 d"``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


# -- listing -----------------------------------------------------------------------------------
def _newest_first(records: list[EntryRecord]) -> list[EntryRecord]:
    records.sort(key=lambda record: record.created, reverse=True)
    return records


def records_of(
    root: CacheRoot, fdirs: Iterable[str] | None = None, copy_of: str | None = None
) -> list[EntryRecord]:
    """The readable entries of a cache root (or of some of its function folders), newest
    first."""
    return _newest_first(
        [
            EntryRecord.from_info(info, root, copy_of)
            for fdir in (root.function_dirs() if fdirs is None else fdirs)
            for info in root.entries(fdir)
        ]
    )


def list_entries(cache_dir: str | os.PathLike[str] | None = None) -> list[EntryRecord]:
    """Every readable entry of a cache directory, newest first.

    Args:
        cache_dir: the cache directory (default: ``$CACHEDLOAD_DIR`` or the user cache dir).

    Returns:
        One :class:`EntryRecord` per entry: function, readable parameters, sources with file
        counts, result summary, size on disk, created, last used and hits. Damaged entries are
        left out (``cachedload verify`` finds them), and so are the local copies of remote
        caches kept in the directory (:func:`local_copies`).

    Example::

        for entry in cachedload.list_entries():
            print(entry.function, entry.parameters, entry.size_bytes)

    A URL (``"s3://bucket/prefix"``) lists a remote cache; ``$CACHEDLOAD_STORAGE_OPTIONS`` and
    the ``AWS_*`` variables configure access. Its records' ``url`` is the entry in the bucket.
    """
    return records_of(open_root(cache_dir))


def local_copies(cache_dir: str | os.PathLike[str] | None = None) -> list[EntryRecord]:
    """The entries of the local copies of remote caches in a cache directory, newest first.

    Each record's ``copy_of`` names the remote cache; removing it removes the local copy only
    (the next hit on this machine downloads it again). They are not counted by ``max_size``.
    """
    return _newest_first(
        [
            record
            for copy, url in open_root(cache_dir).local_copies()
            for record in records_of(copy, copy_of=url)
        ]
    )


def leftovers(cache_dir: str | os.PathLike[str] | None = None) -> list[Leftover]:
    """The temporary and trash folders in a cache directory (and in its local copies of
    remote caches): what writers are writing, or what killed writers left, with their sizes.

    Those whose writer is gone (``dead``) are removed by :func:`prune`, ``cachedload clear``
    and ``cachedload verify --fix``, and by the next store into the same function folder.
    """
    root = open_root(cache_dir).local
    return root.leftovers() + [
        found for copy, _ in root.local_copies() for found in copy.leftovers()
    ]


def manifest_of(record: EntryRecord) -> dict[str, Any] | None:
    """An entry's per-file manifest (for a remote cache: the local copy's, else the bucket's);
    None if it has none, or it does not match the entry's metadata."""
    root = _root_of(record.root, record.path)
    try:
        return root.manifest(record.function_dir, record.id, record.meta)
    except CorruptEntry:
        return None


# -- removing ----------------------------------------------------------------------------------
def _root_of(root: CacheRoot | None, path: Path) -> CacheRoot:
    # A record made by hand (not listed) names its entry's folder only: a local one.
    return root if root is not None else LocalRoot(path.parent.parent)


def is_busy(record: EntryRecord) -> bool:
    """True if another process holds the entry's lock (it is being recomputed or removed)."""
    return _root_of(record.root, record.path).is_busy(record.function_dir, record.id)


def _remove(record: EntryRecord, reason: str) -> bool:
    """Delete one entry unless another process holds its lock; True if it is gone."""
    root = _root_of(record.root, record.path)
    with root.claim(record.function_dir, record.id) as free:
        if not free:
            logger.info("keeping %s [%s]: in use by another process", record.function, record.id)
            return False
        root.remove(record.function_dir, record.id)
    log_removal(record, reason)
    return True


def log_removal(record: EntryRecord, reason: str) -> None:
    """Log (INFO) that an entry was removed, why, its size and when it was last used."""
    logger.info(
        "evict %s [%s] (%s): %s bytes, last used %.0f s ago",
        record.function,
        record.id[:12],
        reason,
        record.size_bytes,
        time.time() - record.last_used,
    )


def remove_entries(
    records: Iterable[EntryRecord], *, dry_run: bool = False, reason: str = "removed"
) -> PruneReport:
    """Delete entries, skipping any whose lock another process holds.

    Args:
        records: the entries (from :func:`list_entries`).
        dry_run: only report what would be removed.
        reason: a word for the log (``"superseded"``, ``"least recently used"``…).
    """
    removed: list[EntryRecord] = []
    busy: list[EntryRecord] = []
    for record in records:
        if dry_run or _remove(record, reason):
            removed.append(record)
        else:
            busy.append(record)
    return PruneReport(tuple(removed), tuple(busy), dry_run)


def tidy(cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Remove dead writers' leftovers, then function folders left empty."""
    open_root(cache_dir).tidy()


def tidy_local_copies(cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Tidy the local copies' function folders; remove copies (and ``remote/``) left empty."""
    open_root(cache_dir).tidy_copies()


def _remove_superseded(records: Iterable[EntryRecord], *, dry_run: bool = False) -> PruneReport:
    """Delete superseded entries, keeping a small record of each in its function folder (see
    :mod:`cachedload.superseded`) so that ``why`` can still explain the entry replacing it."""
    if dry_run:
        return remove_entries(records, dry_run=True, reason="superseded")
    report = PruneReport()
    for record in records:
        root = _root_of(record.root, record.path)
        kept = None
        if isinstance(root, LocalRoot):  # a remote cache's own entries: no record
            kept = superseded_record(record.meta, record.path)
        outcome = remove_entries([record], reason="superseded")
        if outcome.removed and kept is not None and isinstance(root, LocalRoot):
            try:
                keep_superseded(record.path.parent, [kept], root.file_mode)
            except OSError as error:  # a diagnostic: never a reason to fail a store
                logger.debug("cannot record superseded entry %s: %s", record.path, error)
        report += outcome
    return report


def _superseded(records: Iterable[EntryRecord], keep: int) -> list[EntryRecord]:
    """The entries beyond the ``keep`` newest of each group."""
    groups: dict[tuple[str, str], list[EntryRecord]] = {}
    for record in records:
        if record.group is not None:
            groups.setdefault((record.function_dir, record.group), []).append(record)
    extra: list[EntryRecord] = []
    for members in groups.values():
        members.sort(key=lambda record: record.created, reverse=True)
        extra += members[keep:]
    return extra


def _evict_lru(
    records: list[EntryRecord], max_size: int, *, protect: Path | None, dry_run: bool
) -> PruneReport:
    """Remove least-recently-used entries until the total fits in ``max_size``."""
    total = sum(record.size_bytes for record in records)
    report = PruneReport(dry_run=dry_run)
    for record in sorted(records, key=lambda record: record.last_used):
        if total <= max_size:
            break
        if record.path == protect:
            continue
        outcome = remove_entries([record], dry_run=dry_run, reason="least recently used")
        total -= outcome.bytes_freed
        report += outcome
    if total > max_size:
        logger.info(
            "cache is %s bytes, over max_size %s bytes: the rest is in use or just written",
            total,
            max_size,
        )
    return report


def prune(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_size: int | str | None = None,
    keep: int | None = None,
    older_than: float | str | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Apply the cache's limits now; return what was removed.

    In this order: entries not used for ``older_than`` go; then, of each group of entries that
    differ only in their sources' contents, all but the ``keep`` newest; then least-recently-used
    entries until the cache fits in ``max_size``. Entries another process holds are kept.

    Args:
        cache_dir: the cache directory (default: ``$CACHEDLOAD_DIR`` or the user cache dir).
        max_size: bytes, or a string such as ``"20GB"``.
        keep: how many entries of each group to keep (>= 1).
        older_than: seconds, or a string such as ``"30d"``: age since the last use (or since
            creation for entries never used).
        dry_run: only report what would be removed.

    Raises:
        ConfigurationError: a limit is invalid.
    """
    return prune_root(
        open_root(cache_dir), max_size=max_size, keep=keep, older_than=older_than, dry_run=dry_run
    )


def prune_root(
    root: CacheRoot,
    *,
    max_size: int | str | None = None,
    keep: int | None = None,
    older_than: float | str | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """:func:`prune` on an open cache root (a :class:`~cachedload.Cache`'s)."""
    check_keep(keep)
    limit = None if max_size is None else parse_size(max_size, "max_size")
    age = None if older_than is None else parse_age(older_than, "older_than")
    records = records_of(root)
    report = PruneReport(dry_run=dry_run)
    if age is not None:
        cutoff = time.time() - age
        report += remove_entries(
            [r for r in records if r.last_used < cutoff], dry_run=dry_run, reason="unused"
        )
    if keep is not None:
        gone = {record.path for record in report.removed}
        remaining = [record for record in records if record.path not in gone]
        report += _remove_superseded(_superseded(remaining, keep), dry_run=dry_run)
    if limit is not None:
        gone = {record.path for record in report.removed}
        remaining = [record for record in records if record.path not in gone]
        report += _evict_lru(remaining, limit, protect=None, dry_run=dry_run)
    if not dry_run:
        root.tidy()
    return report


def enforce_after_store(
    root: CacheRoot,
    fdir: str,
    key: str,
    meta: dict[str, Any],
    *,
    keep: int | None,
    max_size: int | None,
) -> PruneReport:
    """Bound the cache right after ``key`` was published in ``fdir`` (called by the decorator).

    Deletes the entries that ``key`` supersedes beyond ``keep`` (same ``meta["group"]``), then,
    with ``max_size``, evicts least-recently-used entries of the whole cache directory until it
    fits. Never touches ``key`` itself, entries whose lock another process holds, or entries
    being written. For a remote cache, this machine's copy is bounded (``cachedload prune``
    bounds the bucket).

    Raises:
        OSError: the cache directory cannot be read or written.
    """
    local = root.local
    report = PruneReport()
    group = meta.get("group")
    if keep is not None and isinstance(group, str):
        siblings = [
            record
            for record in records_of(local, [fdir])
            if record.id != key and record.group == group
        ]
        # The new entry is the newest of its group: it counts as one of the ``keep``.
        report += _remove_superseded(_superseded(siblings, keep - 1))
    if max_size is not None:
        records = records_of(local)
        report += _evict_lru(records, max_size, protect=local.entry_path(fdir, key), dry_run=False)
    return report


# -- verifying ---------------------------------------------------------------------------------
def verify(
    cache_dir: str | os.PathLike[str] | None = None, *, checksums: bool = True
) -> Iterator[VerifyResult]:
    """Check every entry folder of a cache directory, one at a time.

    Reads each entry's metadata, checks its data file's size and, with ``checksums``, recomputes
    the data file's checksum (reads every byte). Entries whose metadata is unreadable, or from
    another format version, count as damaged. Entries still being written are not visible here
    (they live in temporary folders). The local copies of remote caches kept in the directory
    are checked too (their results' ``copy_of`` says so). Folders that are not
    cachedload's are named too (``unknown``: never deleted).
    """
    yield from verify_root(open_root(cache_dir), checksums=checksums)


def verify_root(root: CacheRoot, *, checksums: bool = True) -> Iterator[VerifyResult]:
    """:func:`verify` on an open cache root (a :class:`~cachedload.Cache`'s)."""
    for checked in root.verify(checksums=checksums):
        yield VerifyResult.from_checked(checked, root)
    for copy, url in root.local_copies():
        for checked in copy.verify(checksums=checksums):
            yield VerifyResult.from_checked(checked, copy, url)


def remove_damaged(result: VerifyResult) -> bool:
    """Delete an entry that :func:`verify` found damaged; False if another process holds it,
    or it is not shaped as an entry (``unknown``: left alone)."""
    if result.unknown:
        return False
    root, fdir = _root_of(result.root, result.path), result.path.parent.name
    with root.claim(fdir, result.id) as free:
        if free:
            root.remove(fdir, result.id)
            logger.info("removed damaged entry %s: %s", result.url or result.path, result.problem)
        return free
