"""Records of superseded entries: what ``keep=`` (or ``cachedload prune --keep``) deleted, kept
small beside the entries so that ``cachedload why`` and ``cache_explain`` can still say why an
entry was rebuilt after the entry it replaced is gone.

One file per function folder, :data:`~cachedload.entry.SUPERSEDED_FILE`, holding the last
:data:`MAX_RECORDS` entries deleted as superseded, oldest first::

    {"format": 1, "records": [{"key": "<32 hex>", "removed": <seconds since the epoch>,
      "meta": {<the entry's key components: function, code, parameters, sources…>},
      "manifest_digest": "<xxh3-128 of its manifest file>" | null,
      "files": "<base64 of zlib'd JSON {source: [[relpath, size, mtime_ns], …]}>" | null,
      "files_bytes": <length of that JSON> | null}]}

The file list is kept only for entries of at most :data:`MAX_FILES` files whose list compresses
to at most :data:`MAX_FILES_COMPRESSED` bytes; otherwise ``why`` says the fingerprint changed.

A cache directory is untrusted input, so the file is read as cachedload reads everything there:
never through a symlink, never blocking on a FIFO (``O_NOFOLLOW | O_NONBLOCK``, regular files
only), at most :data:`MAX_FILE_BYTES`, every field checked, every decompression bounded. A file
that fails any check counts as no records (and is replaced by the next write). It is written
atomically (a temporary file renamed over it) with the cache's file mode.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import stat
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from cachedload.entry import (
    MANIFEST_FILE,
    SUPERSEDED_FILE,
    CorruptEntry,
    is_entry_name,
    parse_manifest,
    temporary_name,
)

__all__ = [
    "MAX_FILES",
    "MAX_FILES_COMPRESSED",
    "MAX_FILE_BYTES",
    "MAX_RECORDS",
    "Superseded",
    "keep_superseded",
    "read_superseded",
    "superseded_record",
]

logger = logging.getLogger("cachedload")

_FORMAT = 1
#: Records kept per function folder (the newest).
MAX_RECORDS = 4
#: An entry's file list is kept only up to this many files…
MAX_FILES = 10_000
#: … and if it compresses to at most this many bytes.
MAX_FILES_COMPRESSED = 1024 * 1024
#: Its JSON, inflated, is at most this long (a crafted one is refused beyond it).
_MAX_FILES_BYTES = 8 * 1024 * 1024
#: A record's key components, as JSON, at most this long.
_MAX_META_BYTES = 64 * 1024
#: The whole file at most this long (every record at its largest, in base64).
MAX_FILE_BYTES = MAX_RECORDS * (MAX_FILES_COMPRESSED * 4 // 3 + _MAX_META_BYTES + 1024)
#: An entry's manifest file is read (to keep its file list) only up to this size.
_MAX_MANIFEST_READ = 64 * 1024 * 1024

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Superseded:
    """An entry deleted as superseded: its key components and, if small, its file list.

    Attributes:
        key: the entry's key.
        removed: when it was deleted (seconds since the epoch).
        meta: its metadata's key components (``function``, ``code``, ``parameters``,
            ``sources``…), as :func:`cachedload.explain.compare` reads them.
        manifest_digest: the xxh3-128 of its manifest file, None if it had none.
        files: its sources' files ``{source: [[relpath, size, mtime_ns], ...]}``, None if
            not kept (too many, or no manifest).
    """

    key: str
    removed: float
    meta: dict[str, Any]
    manifest_digest: str | None = None
    files: dict[str, Sequence[Sequence[Any]]] | None = None

    @property
    def group(self) -> str | None:
        """The call group of the entry (entries of one group differ only in their files)."""
        group = self.meta.get("group")
        return group if isinstance(group, str) else None


# -- checking --------------------------------------------------------------------------------
def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _mapping_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, dict)
        and all(isinstance(name, str) and check(item) for name, item in value.items())
    )


def _fields(checks: dict[str, Callable[[Any], bool]]) -> Callable[[Any], bool]:
    """A dict holding only these fields (each optional), each passing its check."""
    return lambda value: (
        isinstance(value, dict)
        and all(name in checks and checks[name](item) for name, item in value.items())
    )


_DESCRIBED = _mapping_of(_fields({"digest": _is_str, "value": _is_str}))
#: The key components kept of an entry's metadata, each with its check.
_META_FIELDS: dict[str, Callable[[Any], bool]] = {
    "format": _is_count,
    "key": _is_str,
    "group": _is_str,
    "function": _is_str,
    "code": _is_str,
    "code_parts": _mapping_of(_is_str),
    "version": _is_str,
    "created": _is_time,
    "portable": lambda value: isinstance(value, bool),
    "parameters": _DESCRIBED,
    "state": _DESCRIBED,
    "sources": _mapping_of(
        _fields(
            {
                "path": _is_str,
                "digest": _is_str,
                "mode": _is_str,
                "file_count": _is_count,
                "total_bytes": _is_count,
                "newest_mtime_ns": _is_count,
            }
        )
    ),
}
_META_OK = _fields(_META_FIELDS)


def _files_ok(files: Any) -> bool:
    """``{source: [[relpath, size, mtime_ns], ...]}`` of at most :data:`MAX_FILES` files."""
    if not isinstance(files, dict):
        return False
    count = 0
    for name, rows in files.items():
        if not isinstance(name, str) or not isinstance(rows, list):
            return False
        count += len(rows)
        if count > MAX_FILES:
            return False
        for row in rows:
            if not (
                isinstance(row, list)
                and len(row) == 3
                and isinstance(row[0], str)
                and _is_count(row[1])
                and isinstance(row[2], int)
                and not isinstance(row[2], bool)
            ):
                return False
    return True


# -- making ----------------------------------------------------------------------------------
def _pack_files(files: dict[str, Sequence[Sequence[Any]]]) -> tuple[str, int] | None:
    raw = json.dumps(files, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(raw) > _MAX_FILES_BYTES:
        return None
    packed = zlib.compress(raw, 6)
    if len(packed) > MAX_FILES_COMPRESSED:
        return None
    return base64.b64encode(packed).decode("ascii"), len(raw)


def _unpack_files(text: Any, size: Any) -> dict[str, Sequence[Sequence[Any]]] | None:
    """The file list of a record, every length bounded; None if it is not one."""
    if not isinstance(text, str) or not _is_count(size) or size > _MAX_FILES_BYTES:
        return None
    if len(text) > MAX_FILES_COMPRESSED * 4 // 3 + 4:
        return None
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, size + 1)  # never more than the record says
        if not inflate.eof or inflate.unconsumed_tail or len(raw) != size:
            return None
        files = json.loads(raw.decode("utf-8", "surrogatepass"))
    except (ValueError, UnicodeError, binascii.Error, zlib.error, RecursionError):
        return None
    return files if _files_ok(files) else None


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes if it is at most ``limit`` long; None if it is missing, too
    long, or not a regular file (a symlink, a FIFO, a folder…: never followed or waited on).

    Raises:
        OSError: it cannot be read for another reason (permissions…).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            return None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        chunks, size = [], 0
        while chunk := os.read(fd, min(limit + 1 - size, 1024 * 1024)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return None  # it grew while read
        return b"".join(chunks)
    finally:
        os.close(fd)


def superseded_record(
    meta: dict[str, Any], entry: Path, removed: float | None = None
) -> Superseded | None:
    """The record to keep of the entry folder ``entry`` (whose metadata is ``meta``) before it
    is deleted as superseded; None if its metadata does not make a valid one.

    Reads its manifest (to keep its file list, if small, and its digest).
    """
    kept = {name: meta[name] for name in _META_FIELDS if name in meta}
    key = entry.name
    if not is_entry_name(key) or kept.get("key", key) != key or not _META_OK(kept):
        return None
    if len(json.dumps(kept)) > _MAX_META_BYTES:
        return None
    digest = files = None
    try:
        raw = _read_bounded(entry / MANIFEST_FILE, _MAX_MANIFEST_READ)
    except OSError:
        raw = None
    if raw is not None:
        digest = xxhash.xxh3_128_hexdigest(raw)
        sources = kept.get("sources") or {}
        counted = sum(int(source.get("file_count", 0)) for source in sources.values())
        if counted <= MAX_FILES:  # known from the metadata: no decoding of a large list
            try:  # as any reader checks it: against its record in the metadata
                decoded: dict[str, Any] | None = parse_manifest(raw, meta, entry)
            except CorruptEntry:
                decoded = None
            if decoded is not None and _files_ok(decoded):
                files = decoded
    return Superseded(key, time.time() if removed is None else removed, kept, digest, files)


# -- reading and writing ---------------------------------------------------------------------
def _parse_record(found: Any) -> Superseded | None:
    if not isinstance(found, dict) or not set(found) <= {
        "key",
        "removed",
        "meta",
        "manifest_digest",
        "files",
        "files_bytes",
    }:
        return None
    key, meta, digest = found.get("key"), found.get("meta"), found.get("manifest_digest")
    if not (isinstance(key, str) and is_entry_name(key) and _is_time(found.get("removed"))):
        return None
    if not isinstance(meta, dict) or not _META_OK(meta) or meta.get("key", key) != key:
        return None
    if digest is not None and not (isinstance(digest, str) and len(digest) <= 64):
        return None
    files = None
    if found.get("files") is not None:
        files = _unpack_files(found["files"], found.get("files_bytes"))
        if files is None:
            return None
    return Superseded(key, float(found["removed"]), meta, digest, files)


def read_superseded(function_dir: Path) -> list[Superseded]:
    """The records of the entries of a function folder deleted as superseded, oldest first;
    empty if there are none, or the file is not one cachedload wrote (any check failing)."""
    try:
        raw = _read_bounded(function_dir / SUPERSEDED_FILE, MAX_FILE_BYTES)
    except OSError as error:
        logger.debug("cannot read %s: %s", function_dir / SUPERSEDED_FILE, error)
        return []
    if raw is None:
        return []
    try:
        found = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    records = found.get("records") if isinstance(found, dict) else None
    if not (
        isinstance(found, dict)
        and set(found) == {"format", "records"}
        and found["format"] == _FORMAT
        and isinstance(records, list)
        and len(records) <= MAX_RECORDS
    ):
        return []
    parsed = [_parse_record(record) for record in records]
    return [] if None in parsed else [record for record in parsed if record is not None]


def _as_json(record: Superseded) -> dict[str, Any]:
    packed = None if record.files is None else _pack_files(record.files)
    return {
        "key": record.key,
        "removed": record.removed,
        "meta": record.meta,
        "manifest_digest": record.manifest_digest,
        "files": None if packed is None else packed[0],
        "files_bytes": None if packed is None else packed[1],
    }


def keep_superseded(function_dir: Path, records: Sequence[Superseded], mode: int = 0o600) -> None:
    """Add ``records`` to a function folder's records of superseded entries, keeping the
    newest :data:`MAX_RECORDS`; written atomically with file mode ``mode``.

    Raises:
        OSError: the folder cannot be written (a folder where the file should be…).
    """
    if not records:
        return
    kept = [*read_superseded(function_dir), *records][-MAX_RECORDS:]
    data = json.dumps({"format": _FORMAT, "records": [_as_json(r) for r in kept]}).encode()
    while len(data) > MAX_FILE_BYTES and len(kept) > 1:  # cannot happen within the bounds
        kept = kept[1:]
        data = json.dumps({"format": _FORMAT, "records": [_as_json(r) for r in kept]}).encode()
    target = function_dir / SUPERSEDED_FILE
    tmp = function_dir / temporary_name()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, target)  # replaces a symlink there, never what it points to
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
