"""Fingerprint a source file or directory tree: what files it holds, how big, how recent.

A fingerprint is an xxh3-128 digest over the sorted ``(relative path, size, mtime_ns)`` of every
file below a source (``mode="mtime"``, one ``stat`` per file, the trade-off make and git make),
or over ``(relative path, size, xxh3 of the bytes)`` (``mode="content"``, for trees whose mtimes
cannot be trusted). Symlinked files and folders are followed; a symlink cycle is walked once.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

__all__ = [
    "DEFAULT_EXCLUDE",
    "RACY_WINDOW_NS",
    "FileRecord",
    "Fingerprint",
    "fingerprint_source",
    "hash_file",
]

#: Names of well-known junk files and folders that never count as part of a source.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    "__pycache__",
    ".ipynb_checkpoints",
)

#: A file whose mtime is this close to the moment it was fingerprinted is "racy": it may be
#: rewritten within the same timestamp tick without its (size, mtime) changing. 2 s covers the
#: coarsest common clock (FAT's 2-second mtimes) and network file systems' skew.
RACY_WINDOW_NS = 2_000_000_000

_CHUNK = 8 * 1024 * 1024
_RECORD = struct.Struct("<qq")  # size, mtime_ns
_SIZE = struct.Struct("<q")

FileRecord = tuple[str, int, int]
"""``(relative POSIX path, size in bytes, st_mtime_ns)`` of one file of a source."""


@dataclass(frozen=True)
class Fingerprint:
    """The fingerprint of one source.

    Attributes:
        digest: hex xxh3-128 over every counted file's relative path, size and mtime (or content).
        file_count: number of files counted.
        total_bytes: their total size.
        newest_mtime_ns: the newest ``st_mtime_ns`` among them (0 for an empty tree).
        taken_ns: wall-clock time (``time.time_ns()``) just before the tree was walked.
        files: the per-file records, sorted by path (not part of equality).
    """

    digest: str
    file_count: int
    total_bytes: int
    newest_mtime_ns: int
    taken_ns: int
    files: tuple[FileRecord, ...] = field(default=(), compare=False, repr=False)

    def racy_files(self, window_ns: int = RACY_WINDOW_NS) -> list[str]:
        """Relative paths of the files modified within ``window_ns`` of ``taken_ns``."""
        if self.newest_mtime_ns < self.taken_ns - window_ns:
            return []
        limit = self.taken_ns - window_ns
        return [path for path, _size, mtime in self.files if mtime >= limit]


def hash_file(path: str | os.PathLike[str]) -> str:
    """Return the hex xxh3-128 of a file's bytes (large files are read in 8 MB chunks)."""
    with open(path, "rb", buffering=0) as handle:
        first = handle.read(_CHUNK)
        if len(first) < _CHUNK:
            return xxhash.xxh3_128_hexdigest(first)
        hasher = xxhash.xxh3_128(first)
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


def _matches(patterns: Sequence[str], relpath: str, name: str) -> bool:
    """True if a pattern matches the file's name or (for patterns with a slash) its path."""
    for pattern in patterns:
        target = relpath if "/" in pattern else name
        if fnmatch.fnmatchcase(target, pattern):
            return True
    return False


def _walk(
    root: str,
    include: Sequence[str],
    exclude: Sequence[str],
) -> list[FileRecord]:
    """Every counted file below ``root`` as ``(relpath, size, mtime_ns)``, unsorted."""
    records: list[FileRecord] = []
    root_stat = os.stat(root)
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    pending: list[tuple[str, str]] = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue  # vanished while walking: it simply holds no files now
        for entry in entries:
            name = entry.name
            relpath = prefix + name
            if exclude and _matches(exclude, relpath, name):
                continue
            try:
                # d_type answers for plain files and folders; only symlinks need a stat here.
                info: os.stat_result | None
                if entry.is_symlink():
                    info = os.stat(entry.path)
                    is_dir = stat.S_ISDIR(info.st_mode)
                    is_file = stat.S_ISREG(info.st_mode)
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_file = not is_dir and entry.is_file(follow_symlinks=False)
                    info = entry.stat(follow_symlinks=False) if is_file else None
            except FileNotFoundError:
                continue  # a dangling symlink or a file deleted mid-walk
            if is_dir:
                if info is None:
                    info = entry.stat(follow_symlinks=False)
                ident = (info.st_dev, info.st_ino)
                if ident in visited:
                    continue  # a symlink cycle (or a second link to a folder already walked)
                visited.add(ident)
                pending.append((entry.path, relpath + "/"))
            elif is_file and info is not None:
                if include and not _matches(include, relpath, name):
                    continue
                records.append((relpath, info.st_size, info.st_mtime_ns))
    return records


def fingerprint_source(
    path: str | os.PathLike[str],
    *,
    mode: str = "mtime",
    include: Iterable[str] = (),
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
) -> Fingerprint:
    """Fingerprint a file or a directory tree.

    Args:
        path: a file or directory (symlinks are followed).
        mode: ``"mtime"`` hashes each file's relative path, size and ``st_mtime_ns``;
            ``"content"`` hashes its path, size and bytes instead.
        include: glob patterns; when given, only files matching one of them count. A pattern
            without ``/`` matches the file name, one with ``/`` the path relative to ``path``.
        exclude: glob patterns (same rules) for files and folders that never count; defaults to
            :data:`DEFAULT_EXCLUDE`.

    Returns:
        The :class:`Fingerprint`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``mode`` is not ``"mtime"`` or ``"content"``.
    """
    if mode not in ("mtime", "content"):
        raise ValueError(f"fingerprint mode must be 'mtime' or 'content', not {mode!r}")
    taken_ns = time.time_ns()
    root = os.fspath(path)
    info = os.stat(root)
    include = tuple(include)
    exclude = tuple(exclude)
    is_dir = stat.S_ISDIR(info.st_mode)
    if is_dir:
        records = _walk(root, include, exclude)
        records.sort()
    else:
        records = [(os.path.basename(root), info.st_size, info.st_mtime_ns)]

    hasher = xxhash.xxh3_128()
    hasher.update(mode.encode())
    pack = _RECORD.pack
    total = 0
    newest = 0
    for relpath, size, mtime in records:
        total += size
        newest = max(newest, mtime)
        encoded = relpath.encode("utf-8", "surrogateescape")
        if mode == "content":
            full = os.path.join(root, relpath) if is_dir else root
            tail = _SIZE.pack(size) + bytes.fromhex(hash_file(full))
        else:
            tail = pack(size, mtime)
        hasher.update(len(encoded).to_bytes(4, "little") + encoded + tail)
    return Fingerprint(
        digest=hasher.hexdigest(),
        file_count=len(records),
        total_bytes=total,
        newest_mtime_ns=newest,
        taken_ns=taken_ns,
        files=tuple(records),
    )
