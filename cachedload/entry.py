"""The entry format: every name in a cache directory, the metadata's schema, and the checks
and scans that read them. What a cache holds, in one place.

A local cache directory (``cache_dir=``, ``$CACHEDLOAD_DIR`` or the user cache dir)::

    <cache_dir>/
      CACHEDIR.TAG                              marks the folder as a cache (the Cache Directory
                                                Tagging Specification: backup tools skip it);
                                                written when cachedload first writes here;
                                                nothing is ever deleted where it is missing
      <module>.<qualname>-<code digest[:8]>/    one folder per function and code version
        <key>/                                  one entry (32 hex digits), published by one
                                                atomic rename of a finished temporary folder
          result.joblib                         the data (serialize.py; uncompressed → mmap-able)
          meta.json                             what, from which sources, sizes, checksum, …
          manifest                              per-file list of each source (columns:
                                                encode_manifest; older entries: zlib'd JSON)
        <key>.lock                              single-flight lock (filelock; on a shared mount
                                                a lease marker, see mount.py)
        <key>.owner                             "pid N on host": who holds the lock (for the log)
        <key>.used                              one byte appended per hit: size = hits,
                                                mtime = last use; the entry is never rewritten
        superseded.json                         the last few entries deleted as superseded
                                                (keep=): their key components and small file
                                                lists, for ``cachedload why`` (superseded.py)
        .tmp-<host>-<pid>-<random>/             an entry (or a file) being written
        .trash-<host>-<pid>-<random>/           an entry being deleted (renamed away first)

A writer killed mid-write leaves its ``.tmp-*`` (or ``.trash-*``) folder; a killed holder of a
lock its ``<key>.lock`` and ``<key>.owner``; a removed entry may leave its ``<key>.used``. These
leftovers are listed by ``cachedload ls``; those of dead writers, and records beside entries that
no longer exist (only when the entry's lock is free), are removed by ``prune``, ``clear`` and
``verify --fix`` (a store removes the dead writers' temporary folders of its function folder);
so is ``superseded.json`` once its function folder holds no entry.
      remote/                                   read-through copies of remote caches
        <bucket-prefix>-<sha256(url)[:8]>/      one per remote cache URL
          .url                                  the remote cache's URL (``cachedload ls``)
          <function dir>/<key>/…                as above, plus beside each entry:
          <function dir>/<key>.fetch            the node's download lock (filelock)
          <function dir>/<key>.synced           the hit count last reported to the bucket

A remote cache, under its URL (``s3://bucket/prefix``)::

    <function dir>/<key>/result.joblib    the data, uploaded first (``result-<uuid>.joblib`` on
                                          servers that ignore conditional writes)
    <function dir>/<key>/manifest         per-file list of each source
    <function dir>/<key>/meta.json        uploaded last: the entry exists once this exists
    <function dir>/<key>.lease            single-flight lease (backends/lease.py)
    <function dir>/<key>.used             size = hits, LastModified = last use (best effort)

An entry of a per-item loader (``loader.map(folder)``, see :mod:`cachedload.per_item`) has the
same files. Its data file holds an ``ItemArray`` whose row ``i`` comes from the ``i``-th file
of its items source in ``manifest`` (sorted relative paths) that ``meta.json``'s ``skipped``
does not list (files left out by ``.map(skip=...)``: no row; ``skipped_reasons`` says why,
path -> reason, in entries written since it exists); with the content digests that
``meta.json``'s ``racy`` records for files modified just before the build, that list is every
row's source record (:func:`item_records`), from which the next build of the same call group
(``meta["group"]``) copies its unchanged rows (with ``fingerprint="content"``, the manifest
also holds each file's content digest, by which rows are then matched). No other file, so a
remote cache publishes and downloads it like any entry.


Only names of this shape are ever listed, verified or deleted, and an entry folder is deleted
only if what it holds is shaped as an entry's (:func:`is_entry_shaped`): anything else in a
cache directory is not ours, reported "unknown, left alone". A ``meta.json`` of another
:data:`FORMAT_VERSION` is a damaged entry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import operator
import os
import re
import socket
import stat
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import xxhash

from cachedload.verified import open_regular

__all__ = [
    "DATA_FILE",
    "FETCH_SUFFIX",
    "FORMAT_VERSION",
    "HOST",
    "LEASE_SUFFIX",
    "LEFTOVER_MAX_AGE",
    "LOCAL_COPIES_DIR",
    "LOCK_SUFFIX",
    "MANIFEST_FIELD",
    "MANIFEST_FILE",
    "MAX_META_DEPTH",
    "META_FILE",
    "OWNER_SUFFIX",
    "RECORD_SUFFIXES",
    "SUPERSEDED_FILE",
    "SYNCED_SUFFIX",
    "TAG_CONTENT",
    "TAG_FILE",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "URL_FILE",
    "USED_SUFFIX",
    "CorruptEntry",
    "FileColumns",
    "HashingWriter",
    "ItemRecords",
    "ScannedEntry",
    "decode_manifest",
    "encode_manifest",
    "encoded_manifest",
    "function_dir_name",
    "function_dir_prefix",
    "is_entry_name",
    "is_entry_shaped",
    "is_function_dir_name",
    "is_leftover_name",
    "is_tagged",
    "item_records",
    "leftover_is_dead",
    "manifest_problem",
    "parse_manifest",
    "parse_meta",
    "read_entry_manifest",
    "read_local_meta",
    "read_regular_file",
    "record_key",
    "scan_entry_dirs",
    "size_problem",
    "skipped_fields",
    "skipped_items",
    "temporary_name",
    "write_new_file",
]

TAG_FILE = "CACHEDIR.TAG"
#: The tag file's content: the specification's signature line, then a comment.
TAG_CONTENT = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by cachedload.\n"
    b"# For information about cache directory tags, see https://bford.info/cachedir/\n"
)
#: Bumped whenever the layout or the meaning of a key changes: old entries then never match.
FORMAT_VERSION = 1

DATA_FILE = "result.joblib"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK_SUFFIX = ".lock"
OWNER_SUFFIX = ".owner"
USED_SUFFIX = ".used"
FETCH_SUFFIX = ".fetch"
SYNCED_SUFFIX = ".synced"
LEASE_SUFFIX = ".lease"
#: In a function folder: records of the entries deleted as superseded (superseded.py). Not an
#: entry's name, a record's (``<key>.<suffix>``) nor a leftover's.
SUPERSEDED_FILE = "superseded.json"
#: The folder of a local cache directory holding the read-through copies of remote caches.
LOCAL_COPIES_DIR = "remote"
#: In a local copy's root: the URL of the remote cache it copies.
URL_FILE = ".url"
#: Temporary files and folders older than this are leftovers whoever wrote them.
LEFTOVER_MAX_AGE = 3600.0
#: This machine in temporary names ("-" separates the fields of the name).
HOST = socket.gethostname().replace("-", "_")

# The decorator's ``<module>.<qualname>-<code[:8]>`` and hex keys.
_FUNCTION_DIR_RE = re.compile(r"^[\w.]+-[0-9a-f]{8}$")
_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")
# result.joblib, or result-<uuid>.joblib (a remote entry's data on servers without conditional
# writes), and a download's partial file.
_DATA_NAME_RE = re.compile(r"^result(-[0-9a-f]+)?\.joblib(\.part)?$")


class CorruptEntry(Exception):
    """A stored entry cannot be used (internal: the decorator turns it into a warning)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# -- names -------------------------------------------------------------------------------------
def function_dir_name(identity: str, code_version: str) -> str:
    """The folder of a function's entries for one version of its code."""
    return f"{function_dir_prefix(identity)}{code_version[:8]}"


def function_dir_prefix(identity: str) -> str:
    """What the folders of every code version of a function start with."""
    safe = "".join(c if c.isalnum() or c in "._" else "_" for c in identity)
    return f"{safe[:150]}-"


def is_function_dir_name(name: str) -> bool:
    """True if ``name`` is a function folder's (not ``remote/``, not a user's file)."""
    return _FUNCTION_DIR_RE.match(name) is not None


def is_entry_name(name: str) -> bool:
    """True if ``name`` is an entry's (a key)."""
    return _KEY_RE.match(name) is not None


def is_tagged(cache_dir: Path) -> bool:
    """True if ``cache_dir`` holds a ``CACHEDIR.TAG`` with the specification's signature."""
    try:
        return read_regular_file(cache_dir / TAG_FILE, limit=64).startswith(TAG_CONTENT[:43])
    except OSError:
        return False


def is_entry_shaped(entry: Path) -> bool:
    """True if ``entry`` is a real folder (not a symlink) holding only what an entry holds,
    by name *and* type: regular files named as a data file, metadata or a manifest. Only
    such a folder is safe to delete as a damaged entry; anything else (a folder named
    ``result.joblib``, a symlink…) is not ours."""
    try:
        if not stat.S_ISDIR(os.lstat(entry).st_mode):
            return False
        with os.scandir(entry) as children:
            return all(
                (child.name in (META_FILE, MANIFEST_FILE) or _DATA_NAME_RE.match(child.name))
                and child.is_file(follow_symlinks=False)
                for child in children
            )
    except OSError:
        return False


def write_new_file(path: Path, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
    """Write a file, never through a symlink planted at ``path`` (``O_NOFOLLOW``); created with
    ``O_EXCL`` unless ``replace`` (then truncated in place: for small records like ``.owner``).

    Raises:
        OSError: ``ELOOP`` for a symlink, ``EEXIST`` if it exists and not ``replace``.
    """
    # Non-blocking, then only a regular file is written: a FIFO planted at ``path`` must
    # neither hang the writer nor be fed.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_TRUNC if replace else os.O_EXCL
    fd = os.open(path, flags, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def temporary_name(prefix: str = TMP_PREFIX) -> str:
    """A name for a temporary (or trash) file or folder that says who made it."""
    return f"{prefix}{HOST}-{os.getpid()}-{uuid.uuid4().hex}"


# -- metadata ---------------------------------------------------------------------------------
#: Deeper JSON than this is not metadata cachedload wrote (its deepest is 3 levels).
MAX_META_DEPTH = 32
_JSON_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET_RE = re.compile(rb"[\[\]{}]")


def _too_deep(raw: bytes) -> bool:
    # Counting brackets is one C pass: only metadata with many of them is scanned for depth.
    if raw.count(b"{") + raw.count(b"[") <= MAX_META_DEPTH:
        return False
    depth = 0
    for bracket in _BRACKET_RE.findall(_JSON_STRING_RE.sub(b"", raw)):
        depth += 1 if bracket in b"[{" else -1
        if depth > MAX_META_DEPTH:
            return True
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_relative_path(relpath: Any) -> bool:
    """A racy record's path: relative, inside its source root (no ``..``, no absolute path)."""
    return (
        isinstance(relpath, str)
        and relpath != ""
        and not relpath.startswith("/")
        and "\0" not in relpath
        and ".." not in relpath.split("/")
    )


def _racy_ok(meta: dict[str, Any]) -> bool:
    racy = meta.get("racy", {})
    return (
        isinstance(racy, dict)
        and all(
            isinstance(files, dict)
            and all(_is_relative_path(rel) and isinstance(d, str) for rel, d in files.items())
            for files in racy.values()
        )
        and _is_count(meta.get("racy_newest_mtime_ns", 0))
    )


def _data_ok(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and _is_count(data.get("size"))
        and isinstance(data.get("xxh3"), str)
        and isinstance(data.get("sha256", ""), str)
        and isinstance(data.get("file"), str)
        and "/" not in data["file"]
        and not data["file"].startswith(".")
    )


def _described_ok(described: Any, fields: dict[str, Any]) -> bool:
    """``{name: {field: value}}`` whose fields, where present, pass their check."""
    return isinstance(described, dict) and all(
        isinstance(value, dict)
        and all(field not in value or ok(value[field]) for field, ok in fields.items())
        for value in described.values()
    )


_STR = lambda value: isinstance(value, str)  # noqa: E731
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _manifest_record_ok(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and _is_count(record.get("size"))
        and _is_count(record.get("inflated"))
        and isinstance(record.get("sha256"), str)
        and _SHA256_RE.match(record["sha256"]) is not None
    )


#: The optional fields' checks (each applies when the field is present).
_FIELDS: dict[str, Any] = {
    "key": _STR,
    "group": _STR,
    "function": _STR,
    "code": _STR,
    "created": _is_number,
    "compute_seconds": _is_number,
    "result": _STR,
    "host": _STR,
    "pid": _is_count,
    "portable": lambda value: isinstance(value, bool),
    "skipped": lambda value: isinstance(value, list),
    "versions": lambda value: isinstance(value, dict),
    "signature": _STR,
    "manifest": _manifest_record_ok,
    "code_parts": lambda value: isinstance(value, dict),
    "parameters": lambda value: _described_ok(value, {"digest": _STR, "value": _STR}),
    "state": lambda value: _described_ok(value, {"digest": _STR, "value": _STR}),
    "sources": lambda value: _described_ok(
        value,
        {
            "path": _STR,
            "digest": _STR,
            "mode": _STR,
            "file_count": _is_count,
            "total_bytes": _is_count,
            "newest_mtime_ns": _is_count,
        },
    ),
}


def _schema_problem(meta: dict[str, Any], where: Path) -> str | None:
    """What is wrong with decoded metadata of this version, or None."""
    if not _data_ok(meta.get("data")):
        return "metadata lacks the data file's size and checksum"
    if not _racy_ok(meta):
        return "metadata's records of recently modified files are invalid"
    for name, ok in _FIELDS.items():
        if name in meta and not ok(meta[name]):
            return f"metadata field {name!r} is invalid"
    key = meta.get("key")
    if key is not None and is_entry_name(where.name) and key != where.name:
        return f"metadata names another key ({key[:40]!r}): not this folder's entry"
    return None


def parse_meta(
    raw: bytes, where: Path, *, source: str | None = None, any_version: bool = False
) -> dict[str, Any]:
    """Decode and check an entry's ``meta.json``: the one schema check (every field's type
    and range), used by the hit path, listing and verify.

    Args:
        raw: the file's bytes.
        where: the entry's folder (local, or where a remote entry's local copy is), for errors;
            a recorded key must be its name.
        source: the remote entry's URL, named by errors.
        any_version: only decode (for explanations of entries of any format version).

    Raises:
        CorruptEntry: invalid or too deeply nested JSON, another format version, a field of the
            wrong type or range, a key other than the folder's, or invalid records of recently
            modified files.
    """
    prefix = f"{source}: " if source else ""
    if _too_deep(raw):
        raise CorruptEntry(where, f"{prefix}metadata is nested too deeply")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise CorruptEntry(where, f"{prefix}metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise CorruptEntry(where, f"{prefix}metadata is not a JSON object")
    if any_version:
        return meta
    if meta.get("format") != FORMAT_VERSION:
        raise CorruptEntry(
            where,
            f"{prefix}metadata format {str(meta.get('format'))[:40]!r} is not this version's "
            f"{FORMAT_VERSION}",
        )
    problem = _schema_problem(meta, where)
    if problem is not None:
        raise CorruptEntry(where, prefix + problem)
    return meta


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def read_regular_file(
    name: str | Path, *, dir_fd: int | None = None, limit: int | None = None
) -> bytes:
    """A regular file's bytes (at most ``limit`` of them), never following a symlink at its
    last component, never blocking on a FIFO or device (see
    :func:`~cachedload.verified.open_regular`).

    Raises:
        OSError: it cannot be opened (``ELOOP``: a symlink), or is not a regular file
            (``EISDIR`` for a folder, ``EINVAL`` for anything else).
    """
    fd, info = open_regular(name, dir_fd=dir_fd)
    try:
        if limit is not None:  # never a buffer of ``limit`` bytes for a small file
            return os.read(fd, min(limit, info.st_size + 4096))
        chunks = []
        while chunk := os.read(fd, max(info.st_size, 4096) + 1):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_meta_file(entry: Path) -> tuple[bytes, tuple[int, int]]:
    # The entry folder is opened without following a symlink, then its meta.json in it.
    dir_fd = os.open(entry, _DIR_FLAGS)
    try:
        info = os.fstat(dir_fd)
        raw = read_regular_file(META_FILE, dir_fd=dir_fd, limit=MAX_META_BYTES + 1)
    finally:
        os.close(dir_fd)
    if len(raw) > MAX_META_BYTES:
        raise CorruptEntry(entry, f"metadata is larger than {MAX_META_BYTES} bytes")
    return raw, (info.st_dev, info.st_ino)


def read_local_meta(entry: Path, *, any_version: bool = False) -> dict[str, Any] | None:
    """The metadata of the entry folder ``entry``; None if there is no entry.

    Raises:
        CorruptEntry: the entry exists but is not a real folder (a symlink, a file), or its
            metadata is missing, not a regular file, too large, or invalid.
    """
    return read_entry_meta(entry, any_version=any_version)[0]


def read_entry_meta(
    entry: Path, *, any_version: bool = False
) -> tuple[dict[str, Any] | None, tuple[int, int] | None]:
    """:func:`read_local_meta`, and the ``(st_dev, st_ino)`` of the folder it was read from
    (a load then reads the data from that very folder, not from one put in its place).

    Raises:
        as :func:`read_local_meta`.
    """
    try:
        raw, folder = _read_meta_file(entry)
    except FileNotFoundError:
        if not entry.is_dir():
            return None, None
        try:  # the folder read was removed meanwhile and another published: read that one
            raw, folder = _read_meta_file(entry)
        except FileNotFoundError:
            if entry.is_dir():
                raise CorruptEntry(entry, "metadata file is missing") from None
            return None, None
    except NotADirectoryError:
        if entry.is_symlink():
            raise CorruptEntry(entry, "entry folder is a symlink") from None
        if entry.exists():  # a file where the entry's folder should be
            raise CorruptEntry(entry, "entry is not a folder") from None
        return None, None  # a file further up: no entry (storing will report the path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            what = "entry folder" if entry.is_symlink() else "metadata file"
            raise CorruptEntry(entry, f"{what} is a symlink") from None
        if error.errno in (errno.EISDIR, errno.EINVAL):
            raise CorruptEntry(entry, "metadata is not a regular file") from None
        raise
    return parse_meta(raw, entry, any_version=any_version), folder


def size_problem(size: int, meta: dict[str, Any], what: str = "data file") -> str | None:
    """The problem if a data file (``what``) of ``size`` bytes is not what ``meta`` records."""
    expected = meta["data"]["size"]
    return None if size == expected else f"{what} is {size} bytes, metadata says {expected}"


# -- data --------------------------------------------------------------------------------------
class HashingWriter:
    """A binary sink that hashes (xxh3-128) and counts what is written through it, passing it
    on to ``handle`` (or nowhere: to check a download without keeping it)."""

    def __init__(self, handle: BinaryIO | None = None) -> None:
        self.handle = handle
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hasher.update(view)
        self.size += view.nbytes
        if self.handle is not None:
            self.handle.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.flush()

    def hexdigest(self) -> str:
        """The checksum of everything written, as ``meta["data"]["xxh3"]`` records it."""
        return self.hasher.hexdigest()


class FileColumns(NamedTuple):
    """One source's files as a manifest stores them, as columns: file ``i`` is ``paths[i]``
    (relative, ``/``-separated), of ``sizes[i]`` bytes, modified at ``mtimes[i]`` (ns), and
    where known (a per-item source fingerprinted by content) of content ``contents[i]``
    (hex xxh3-128)."""

    paths: list[str]
    sizes: np.ndarray[Any, np.dtype[np.int64]]
    mtimes: np.ndarray[Any, np.dtype[np.int64]]
    contents: list[str] | None = None

    @classmethod
    def of(cls, files: Sequence[Sequence[Any]] | FileColumns) -> FileColumns:
        """Columns of ``files``: ``(relpath, size, mtime_ns)`` records (as a fingerprint
        lists them: not checked), or columns already."""
        if isinstance(files, FileColumns):
            return files
        count = len(files)
        return cls(
            list(map(_PATH, files)),
            np.fromiter(map(_SIZE, files), np.int64, count),
            np.fromiter(map(_MTIME, files), np.int64, count),
        )

    def rows(self) -> list[list[Any]]:
        """The files as ``[relpath, size, mtime_ns]`` lists (the JSON manifest's shape)."""
        rows = zip(self.paths, self.sizes.tolist(), self.mtimes.tolist(), strict=True)
        return [list(row) for row in rows]


_PATH, _SIZE, _MTIME = (operator.itemgetter(field) for field in range(3))
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _checked_columns(records: Any) -> FileColumns | None:
    """Columns of records read from a file: None unless each is ``[str, int, int]``."""
    if not (
        isinstance(records, list) and all(isinstance(r, list) and len(r) == 3 for r in records)
    ):
        return None
    if not records:
        return FileColumns.of(records)
    paths, sizes, mtimes = zip(*records, strict=True)
    if set(map(type, paths)) != {str} or not set(map(type, sizes + mtimes)) <= {int}:
        return None  # not bool, float… (numpy would take them)
    if min(sizes + mtimes) < _INT64_MIN or max(sizes + mtimes) > _INT64_MAX:
        return None
    return FileColumns.of(records)


class ItemRecords(NamedTuple):
    """A per-item entry's row records (:func:`item_records`): row ``i`` came from the file
    ``paths[i]`` of ``sizes[i]`` bytes and ``st_mtime_ns`` ``mtimes[i]``; ``digests`` holds the
    content digest of each file that was racy (modified just before the build) by path."""

    paths: list[str]
    sizes: np.ndarray[Any, np.dtype[np.int64]]
    mtimes: np.ndarray[Any, np.dtype[np.int64]]
    digests: dict[str, str]
    contents: list[str] | None = None  # every row's file content digest, where recorded


# The manifest, since 0.2: the magic, the length of a JSON header, the header (a list of
# [source name, file count, compressed paths length, contents length]), then each source's
# sizes and mtimes (little-endian int64s), its paths joined by NUL (zlib'd) and, if recorded,
# its files' content digests (16 bytes each). Columns: written and read in
# ~5 ms for 20,000 files where the JSON list of records took ~35 (a miss of a per-item loader
# changing one file reads one and writes one). A zlib stream never starts with the magic.
_MANIFEST_MAGIC = b"CLDMAN\x00\x02"
_U32 = np.dtype("<u4")
_I64 = np.dtype("<i8")
#: Longest relative path a manifest may hold, in bytes: the system's PATH_MAX (a walk cannot
#: open a longer one), which bounds what a manifest not described by its metadata inflates to.
_MAX_PATH_BYTES = 4096
#: The largest manifest read when its metadata records no size (entries written before).
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
#: The largest ``meta.json`` read (a crafted, sparse one of a terabyte must not be read whole).
MAX_META_BYTES = 64 * 1024 * 1024
#: Longest record of a manifest written before 0.2 (a JSON list): a path escaped as JSON
#: (``\\uXXXX``: six characters per byte at worst), then two integers.
_MAX_JSON_RECORD = 6 * _MAX_PATH_BYTES + 64
#: The manifest's record in ``meta.json``: its size and SHA-256 (so that the signature of a
#: signed entry covers it, and ``verify`` checks it), and how many bytes its paths inflate to
#: (the bound of decoding it).
MANIFEST_FIELD = "manifest"


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """A ``manifest`` file's bytes, from ``{source: files}`` where ``files`` are
    ``(relpath, size, mtime_ns)`` records or :class:`FileColumns`.

    Raises:
        ValueError, TypeError, IndexError: a source's files are not such records.
    """
    return encoded_manifest(manifest)[0]


def encoded_manifest(manifest: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """:func:`encode_manifest`'s bytes, and their record for ``meta.json``'s
    :data:`MANIFEST_FIELD`."""
    header: list[list[Any]] = []
    body: list[bytes] = []
    inflated = 0
    for name, files in manifest.items():
        columns = FileColumns.of(files)
        # surrogatepass: any str round-trips (names undecodable in UTF-8 come as surrogates)
        joined = "\0".join(columns.paths).encode("utf-8", "surrogatepass")
        inflated += len(joined)
        paths = zlib.compress(joined, 1)  # level 1: as small as 3 here, half the time
        contents = bytes.fromhex("".join(columns.contents or ()))
        if columns.contents is not None and len(contents) != 16 * len(columns.paths):
            raise ValueError(f"{name}: one 128-bit content digest per file is needed")
        header.append([name, len(columns.paths), len(paths), len(contents)])
        sizes, mtimes = columns.sizes.astype(_I64), columns.mtimes.astype(_I64)
        body += [sizes.tobytes(), mtimes.tobytes(), paths, contents]
    head = json.dumps(header).encode()
    raw = b"".join([_MANIFEST_MAGIC, np.array([len(head)], _U32).tobytes(), head, *body])
    record = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "inflated": inflated}
    return raw, record


def manifest_problem(raw: bytes, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with an entry's manifest bytes, judged by its metadata's record of them;
    None if they match, or if the metadata has no record (entries written before it)."""
    record = meta.get(MANIFEST_FIELD)
    if not isinstance(record, dict):
        return None
    if len(raw) != record.get("size"):
        return f"manifest is {len(raw)} bytes, metadata says {record.get('size')}"
    if hashlib.sha256(raw).hexdigest() != record.get("sha256"):
        return "manifest does not match its digest in the metadata"
    return None


def _inflate_limit(meta: Mapping[str, Any] | None, raw: bytes) -> int | None:
    """How many bytes a manifest may inflate to, by its metadata: the recorded number, else
    what the files its sources count allow; None: no metadata (the manifest's own counts)."""
    if meta is None:
        return None
    record = meta.get(MANIFEST_FIELD)
    if isinstance(record, dict) and _is_count(record.get("inflated")):
        return int(record["inflated"])
    sources = meta.get("sources")
    counts = [
        source.get("file_count", 0)
        for source in (sources.values() if isinstance(sources, dict) else ())
        if isinstance(source, dict)
    ]
    files = sum(int(count) for count in counts if _is_count(count))
    if raw.startswith(_MANIFEST_MAGIC):
        return files * (_MAX_PATH_BYTES + 1)
    return files * _MAX_JSON_RECORD + 2 + 16 * len(counts)  # the object and its keys


def parse_manifest(
    raw: bytes,
    meta: Mapping[str, Any],
    where: Path,
    *,
    signed: bool = False,
    columns: bool = False,
) -> dict[str, Any]:
    """An entry's manifest bytes decoded (see :func:`decode_manifest`), once checked against
    its metadata's record (:func:`manifest_problem`), never inflated beyond what the metadata
    allows. ``signed``: the metadata's signature was checked, and must cover the manifest.

    Raises:
        CorruptEntry: it does not match the record, ``signed`` and there is none (an entry
            written before: its signature does not cover the manifest), or it is unreadable.
    """
    if signed and not isinstance(meta.get(MANIFEST_FIELD), dict):
        raise CorruptEntry(where, "the signature does not cover the manifest (an older entry)")
    problem = manifest_problem(raw, meta)
    if problem is not None:
        raise CorruptEntry(where, problem)
    found = decode_manifest(raw, columns=columns, limit=_inflate_limit(meta, raw))
    if found is None:
        raise CorruptEntry(where, "manifest is unreadable")
    return found


def manifest_read_limit(meta: Mapping[str, Any]) -> int:
    """How many bytes of an entry's manifest to read at most: one more than its metadata
    records (so a longer file is seen to be wrong), else :data:`MAX_MANIFEST_BYTES` (a sparse
    file of a terabyte is never read whole)."""
    record = meta.get(MANIFEST_FIELD)
    recorded: Any = record.get("size") if isinstance(record, dict) else None
    return recorded + 1 if _is_count(recorded) else MAX_MANIFEST_BYTES


def read_entry_manifest(
    entry: Path, meta: Mapping[str, Any], *, signed: bool = False, columns: bool = False
) -> dict[str, Any] | None:
    """The manifest in the entry folder ``entry``, checked (:func:`parse_manifest`); None if
    the entry has none (and its metadata records none).

    Raises:
        CorruptEntry: as :func:`parse_manifest`; or it is missing though recorded, or is not
            a regular file.
    """
    try:
        raw = read_regular_file(entry / MANIFEST_FILE, limit=manifest_read_limit(meta))
    except FileNotFoundError:
        if MANIFEST_FIELD in meta:
            raise CorruptEntry(entry, "manifest is missing") from None
        return None
    except OSError as error:
        raise CorruptEntry(entry, f"cannot read the manifest ({error})") from None
    return parse_manifest(raw, meta, entry, signed=signed, columns=columns)


def decode_manifest(
    raw: bytes, *, columns: bool = False, limit: int | None = None
) -> dict[str, Any] | None:
    """A ``manifest`` file's contents: ``{source: [[relpath, size, mtime_ns], ...]}``, or with
    ``columns`` ``{source: FileColumns}``; None if it is unreadable (any format, any damage),
    or would inflate to more than ``limit`` bytes (default: what its counts of files allow).
    The file comes from a cache directory: read it with :func:`parse_manifest`."""
    if raw.startswith(_MANIFEST_MAGIC):
        found = _decode_columns(raw, limit)
        if found is None or columns:
            return found
        return {name: files.rows() for name, files in found.items()}
    # The format of entries written before 0.2: zlib'd JSON records.
    inflated = _inflate(raw, _LEGACY_LIMIT if limit is None else limit)
    if inflated is None:
        return None
    try:
        manifest = json.loads(inflated)
    except (ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict):
        return None
    if not columns:
        return manifest
    converted = {name: _checked_columns(files) for name, files in manifest.items()}
    # A malformed source is left out: no records for it.
    return {name: files for name, files in converted.items() if files is not None}


#: Without metadata, what a manifest of the format before 0.2 may inflate to.
_LEGACY_LIMIT = 64 * 1024 * 1024


def _inflate(compressed: bytes, limit: int) -> bytes | None:
    """A whole zlib stream inflated, if it is at most ``limit`` bytes (never more held in
    memory: a crafted stream inflates a thousandfold); else None."""
    inflate = zlib.decompressobj()
    try:
        inflated = inflate.decompress(compressed, limit + 1)
    except zlib.error:
        return None
    if len(inflated) > limit or not inflate.eof or inflate.unconsumed_tail:
        return None
    return None if inflate.unused_data else inflated


def _decode_columns(raw: bytes, limit: int | None) -> dict[str, FileColumns] | None:
    """A columns manifest, every length checked against the bytes; None if damaged, or if
    its paths inflate to more than ``limit`` bytes in all."""
    start = len(_MANIFEST_MAGIC) + 4
    if len(raw) < start:
        return None
    head_len = int(np.frombuffer(raw, _U32, 1, len(_MANIFEST_MAGIC))[0])
    try:
        header = json.loads(raw[start : start + head_len])
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, list):
        return None
    found: dict[str, FileColumns] = {}
    offset = start + head_len
    for source in header:
        if not (
            isinstance(source, list)
            and len(source) == 4
            and isinstance(source[0], str)
            and all(_is_count(n) for n in source[1:])
            and source[3] in (0, 16 * source[1])
        ):
            return None
        name, count, paths_len, contents_len = source
        paths_end = offset + 16 * count + paths_len
        end = paths_end + contents_len
        if end > len(raw):
            return None
        most = count * (_MAX_PATH_BYTES + 1)
        if limit is not None:
            most = min(most, limit)
        decoded = _decode_paths(raw[offset + 16 * count : paths_end], count, most)
        if decoded is None:
            return None
        paths, inflated = decoded
        if limit is not None:
            limit -= inflated
        sizes = np.frombuffer(raw, _I64, count, offset).astype(np.int64)
        mtimes = np.frombuffer(raw, _I64, count, offset + 8 * count).astype(np.int64)
        contents = None
        if contents_len:
            hexed = raw[paths_end:end].hex()
            contents = [hexed[i : i + 32] for i in range(0, len(hexed), 32)]
        found[name] = FileColumns(paths, sizes, mtimes, contents)
        offset = end
    return found if offset == len(raw) else None


def _decode_paths(compressed: bytes, count: int, limit: int) -> tuple[list[str], int] | None:
    """``count`` paths from their zlib'd NUL-joined bytes (at most ``limit`` of them), and how
    many bytes those were; None if they are not that."""
    joined = _inflate(compressed, limit)
    if joined is None:
        return None
    if count == 0:
        return ([], 0) if not joined else None
    try:
        paths = joined.decode("utf-8", "surrogatepass").split("\0")
    except UnicodeDecodeError:
        return None
    return (paths, len(joined)) if len(paths) == count else None


def item_records(
    manifest: dict[str, Any] | None, meta: dict[str, Any], source: str
) -> ItemRecords | None:
    """A per-item entry's row records from its ``manifest`` (decoded with ``columns=True``)
    and ``meta.json`` (the items source is named ``source``): the files ``meta["skipped"]``
    lists have no row (left out by ``.map(skip=...)``). None if they are missing or
    malformed."""
    files = (manifest or {}).get(source)
    racy = (meta.get("racy") or {}).get(source) or {}
    skipped = meta.get("skipped") or []
    if not isinstance(files, FileColumns) or not isinstance(racy, dict):
        return None
    if not isinstance(skipped, list) or not all(isinstance(path, str) for path in skipped):
        return None
    digests = {rel: digest for rel, digest in racy.items() if isinstance(digest, str)}
    if not skipped:
        return ItemRecords(files.paths, files.sizes, files.mtimes, digests, files.contents)
    count = len(files.paths)
    if len(files.sizes) != count or len(files.mtimes) != count:
        return None
    left_out = set(skipped)
    keep = [row for row, rel in enumerate(files.paths) if rel not in left_out]
    contents = None if files.contents is None else [files.contents[row] for row in keep]
    return ItemRecords([files.paths[row] for row in keep], files.sizes[keep],
                       files.mtimes[keep], digests, contents)  # fmt: skip


#: A skipped file's reason is stored cut to this length (an exception's text may be long).
_SKIPPED_REASON_CHARS = 200


def skipped_fields(skipped: Mapping[str, str | None]) -> dict[str, Any]:
    """The metadata fields naming the files a result left out (``on_error="skip"``,
    ``.map(skip=...)``), relative path -> why (or None): ``skipped``, the list of paths (as
    every version wrote it: older readers keep reading it), and ``skipped_reasons``,
    path -> reason, for those with one."""
    fields: dict[str, Any] = {"skipped": list(skipped)}
    reasons = {path: _cut(why) for path, why in skipped.items() if why}
    if reasons:
        fields["skipped_reasons"] = reasons
    return fields


def _cut(reason: str) -> str:
    if len(reason) <= _SKIPPED_REASON_CHARS:
        return reason
    return reason[: _SKIPPED_REASON_CHARS - 1] + "…"


def skipped_items(meta: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The files ``meta`` names as left out (:func:`skipped_fields`), each with its reason,
    or None (entries written before reasons were stored have none). Read from the cache
    directory, so checked: what is not a string is ignored, never shown or trusted."""
    skipped = meta.get("skipped")
    if not isinstance(skipped, list):
        return []
    reasons = meta.get("skipped_reasons")
    if not isinstance(reasons, dict):
        reasons = {}
    found: list[tuple[str, str | None]] = []
    for path in skipped:
        if isinstance(path, str):
            why = reasons.get(path)
            found.append((path, why if isinstance(why, str) else None))
    return found


# -- scanning ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScannedEntry:
    """An entry folder found by :func:`scan_entry_dirs`: its metadata, or what is wrong."""

    key: str
    path: Path
    meta: dict[str, Any] | None
    problem: str | None


def scan_entry_dirs(function_dir: Path, *, any_version: bool = False) -> Iterator[ScannedEntry]:
    """The entry folders of a function folder, by name, with their metadata or its problem.

    Entries removed while the scan runs are left out, and so is a function folder that does
    not exist (any more).
    """
    try:
        children = sorted(os.scandir(function_dir), key=lambda child: child.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for child in children:
        if not is_entry_name(child.name) or not child.is_dir(follow_symlinks=False):
            continue
        path = Path(child.path)
        try:
            meta = read_local_meta(path, any_version=any_version)
        except CorruptEntry as error:
            if path.is_dir():  # else removed meanwhile (a "missing" metadata file)
                yield ScannedEntry(child.name, path, None, error.reason)
            continue
        except OSError as error:
            yield ScannedEntry(child.name, path, None, f"cannot read the entry ({error})")
            continue
        if meta is not None:
            yield ScannedEntry(child.name, path, meta, None)


# -- leftovers ---------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_is_dead(name: str, mtime: float, now: float) -> bool:
    """True if a temporary file/folder ``name`` was left by a writer that is gone: one on this
    machine whose process ended, or anyone's after :data:`LEFTOVER_MAX_AGE`."""
    if now - mtime > LEFTOVER_MAX_AGE:
        return True
    parts = name.split("-")
    if len(parts) < 4:
        return False
    host, pid = parts[1], parts[2]
    return host == HOST and pid.isdigit() and not _pid_alive(int(pid))


def is_leftover_name(name: str) -> bool:
    """True if ``name`` is a temporary or trash file/folder (maybe a dead writer's)."""
    return name.startswith((TMP_PREFIX, TRASH_PREFIX))


#: The records kept beside an entry (``<key><suffix>``), which outlive it if nothing removes them.
RECORD_SUFFIXES = (LOCK_SUFFIX, OWNER_SUFFIX, USED_SUFFIX, SYNCED_SUFFIX)


def record_key(name: str) -> str | None:
    """The key of a record kept beside an entry (``<key>.lock``, ``.owner``, ``.used``,
    ``.synced``), or None if ``name`` is not one."""
    key, dot, suffix = name.partition(".")
    if dot and f".{suffix}" in RECORD_SUFFIXES and is_entry_name(key):
        return key
    return None
