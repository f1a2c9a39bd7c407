"""Fingerprint a source file or directory tree: what files it holds, how big, how recent.

A fingerprint is an xxh3-128 digest over the sorted ``(relative path, size, mtime_ns)`` of every
file below a source (``mode="mtime"``, one ``stat`` per file, the trade-off make and git make),
or over ``(relative path, size, xxh3 of the bytes)`` (``mode="content"``, for trees whose mtimes
cannot be trusted). Symlinked files and folders are followed; a symlink cycle is walked once.

This is on every call's path, so the walk is written for speed (``benchmarks/bench_hit_path.py``
compares it with ``find``): ``os.scandir`` on a directory descriptor, so each file costs one
``fstatat`` relative to its folder and folders cost none (their ``d_type`` says what they are);
the records are hashed as three packed buffers rather than one ``update`` per file. Folders are
only ``stat``-ed when a symlinked folder makes cycle detection necessary. On a file system
where ``stat`` is slow (a network share, latency-bound), the walk switches to a thread pool.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import heapq
import operator
import os
import re
import stat
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import xxhash

from cachedload.errors import ConfigurationError

__all__ = [
    "DEFAULT_EXCLUDE",
    "MODES",
    "RACY_WINDOW_NS",
    "FileRecord",
    "Fingerprint",
    "check_mode",
    "fingerprint_source",
    "hash_file",
    "hash_regular_file",
    "matches",
]

#: The fingerprint modes: ``fingerprint_source(mode=…)``, ``cached_dataset(fingerprint=…)``.
MODES = ("mtime", "content")

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

# 1 MB reads keep the buffer in L2 cache: measured faster than 8 MB ones on a warm page cache.
_CHUNK = 1024 * 1024
# Mean seconds per stat above which the walk moves to threads: local disks stat in about a
# microsecond (threads only add GIL hand-offs there); network file systems take 100+ µs.
_SLOW_STAT_SECONDS = 20e-6
_SLOW_PROBE_FILES = 64
_THREADS = 16
_DIGEST_VERSION = b"cachedload-fingerprint-2\0"
_SCANDIR_FD = os.scandir in os.supports_fd
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)

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
        contents: with ``mode="content"``, each file's hex xxh3-128 by relative path, as
            hashed into the digest (not part of equality; empty in mode ``"mtime"``).
    """

    digest: str
    file_count: int
    total_bytes: int
    newest_mtime_ns: int
    taken_ns: int
    files: tuple[FileRecord, ...] = field(default=(), compare=False, repr=False)
    contents: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def racy_files(self, window_ns: int = RACY_WINDOW_NS) -> list[str]:
        """Relative paths of the files modified within ``window_ns`` of ``taken_ns``."""
        if self.newest_mtime_ns < self.taken_ns - window_ns:
            return []
        limit = self.taken_ns - window_ns
        return [path for path, _size, mtime in self.files if mtime >= limit]


def hash_file(path: str | os.PathLike[str]) -> str:
    """Return the hex xxh3-128 of a file's bytes (large files are read in 1 MB chunks)."""
    with open(path, "rb", buffering=0) as handle:
        first = handle.read(_CHUNK)
        if len(first) < _CHUNK:
            return xxhash.xxh3_128_hexdigest(first)
        hasher = xxhash.xxh3_128(first)
        # readinto one reused buffer: no allocation per chunk. (Not mmap: a file truncated
        # while mapped kills the process with SIGBUS.)
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


_REGULAR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def hash_regular_file(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> str:
    """:func:`hash_file` for a path read from stored metadata: never blocks on a FIFO or device
    (read only if ``fstat`` says regular), and never follows a symlink at its last component
    unless ``follow_symlinks`` (a user's source file, which the walk follows too).

    Raises:
        OSError: it cannot be opened, or is not a regular file.
    """
    flags = _REGULAR_FLAGS & ~os.O_NOFOLLOW if follow_symlinks else _REGULAR_FLAGS
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            hasher = xxhash.xxh3_128()
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
    finally:
        os.close(fd)
    return hasher.hexdigest()


class _Patterns:
    """Glob patterns compiled for the walk, equivalent to ``fnmatchcase`` over each of them.

    A pattern without ``/`` matches a name, one with ``/`` a relative path. Literal names
    become one set lookup and the globs one compiled regex each, instead of an ``fnmatchcase``
    call per pattern per file.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.names = frozenset(p for p in patterns if "/" not in p and not _GLOB.search(p))
        self.name_re = self._compiled([p for p in patterns if "/" not in p and _GLOB.search(p)])
        self.path_re = self._compiled([p for p in patterns if "/" in p])

    @staticmethod
    def _compiled(globs: list[str]) -> Callable[[str], object] | None:
        if not globs:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)).match

    def __call__(self, relpath: str, name: str) -> bool:
        return (
            name in self.names
            or (self.name_re is not None and self.name_re(name) is not None)
            or (self.path_re is not None and self.path_re(relpath) is not None)
        )


_GLOB = re.compile(r"[*?[]")
_NOTHING = _Patterns(())
_patterns = functools.lru_cache(maxsize=64)(_Patterns)  # a loader passes the same ones each call

_Subdir = tuple[str, str, "tuple[int, int] | None"]  # path, relative path, (dev, inode)


class _Folder(NamedTuple):
    """The counted files directly inside one folder, and their digest."""

    prefix: str  # relative path of the folder, "" or ending in "/"
    files: list[FileRecord]  # sorted
    digest: bytes
    total_bytes: int
    newest_mtime_ns: int
    contents: tuple[str, ...] = ()  # each file's content digest (hex), mode "content" only


def _open_folder(directory: str) -> tuple[os._ScandirIterator[str], int] | None:
    """``os.scandir`` of a folder and the descriptor to close after it (-1: none); ``None`` if
    the folder is gone."""
    fd = -1
    try:
        if _SCANDIR_FD:
            # Entries of a scandir(fd) stat with fstatat(fd, name): no path resolution.
            fd = os.open(directory, _DIR_FLAGS)
            return os.scandir(fd), fd
        return os.scandir(directory), fd  # pragma: no cover - Windows
    except BaseException as error:  # e.g. EMFILE from scandir(fd): the fd must not leak
        if fd >= 0:
            os.close(fd)
        if isinstance(error, (FileNotFoundError, NotADirectoryError)):
            return None
        raise


class _Walker:
    """Walks one source tree; collects a :class:`_Folder` per folder holding counted files."""

    def __init__(self, root: str, mode: str, exclude: _Patterns, include: _Patterns | None):
        self.root = root
        self.mode = mode
        self.exclude = exclude
        self.include = include
        self.folders: list[_Folder] = []
        # Symlinked folders, walked after the real tree: (relpath, path, (dev, inode)).
        self.links: list[tuple[str, str, tuple[int, int]]] = []

    def scan(self, directory: str, prefix: str, track: bool) -> list[_Subdir]:
        """Record one folder's files; return its sub-folders ``(path, relpath, identity)``.

        Identities (one extra stat per folder) only when ``track``: inside a symlinked folder,
        where a cycle is possible. Thread-safe: only appends to shared lists.
        """
        files: list[FileRecord] = []
        subdirs: list[_Subdir] = []
        opened = _open_folder(directory)
        if opened is None:
            return subdirs  # vanished while walking: it simply holds no files now
        iterator, fd = opened
        try:
            with iterator:
                self.read_entries(iterator, directory, prefix, track, files, subdirs)
        finally:
            if fd >= 0:
                os.close(fd)
        if files:
            self.folders.append(self.folder(prefix, files))
        return subdirs

    def read_entries(
        self,
        entries: Iterable[os.DirEntry[str]],
        directory: str,
        prefix: str,
        track: bool,
        files: list[FileRecord],
        subdirs: list[_Subdir],
    ) -> None:
        """Append one folder's counted files to ``files`` and its sub-folders to ``subdirs``.

        The loop runs once per file of the tree: everything it needs is in locals, and only
        symlinks (rare) cost a call.
        """
        exclude_names, exclude_name, exclude_path = (
            self.exclude.names,
            self.exclude.name_re,
            self.exclude.path_re,
        )
        include = self.include
        for entry in entries:
            name = entry.name
            if name in exclude_names or (exclude_name and exclude_name(name)):
                continue
            relpath = prefix + name
            if exclude_path and exclude_path(relpath):
                continue
            try:
                # d_type answers for plain files and folders: one stat per file only.
                if entry.is_file(follow_symlinks=False):
                    if include is not None and not include(relpath, name):
                        continue
                    info = entry.stat(follow_symlinks=False)
                    files.append((relpath, info.st_size, info.st_mtime_ns))
                elif entry.is_dir(follow_symlinks=False):
                    ident = None
                    if track:
                        info = entry.stat(follow_symlinks=False)
                        ident = (info.st_dev, info.st_ino)
                    subdirs.append((directory + os.sep + name, relpath, ident))
                elif entry.is_symlink():
                    self.follow_link(directory + os.sep + name, relpath, name, files)
            except FileNotFoundError:
                continue  # a dangling symlink or a file deleted mid-walk

    def follow_link(self, path: str, relpath: str, name: str, files: list[FileRecord]) -> None:
        """A symlink counts as what it points to: a file now, a folder after the real tree."""
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            self.links.append((relpath, path, (info.st_dev, info.st_ino)))
        elif stat.S_ISREG(info.st_mode) and (self.include is None or self.include(relpath, name)):
            files.append((relpath, info.st_size, info.st_mtime_ns))

    def folder(self, prefix: str, files: list[FileRecord]) -> _Folder:
        """Sort and hash one folder's records, while they are hot in the CPU cache.

        Three packed buffers (paths joined by NUL, which no file name holds; sizes; mtimes or
        content digests) rather than one ``update`` per field.
        """
        files.sort(key=_path)  # paths are unique: no need to compare whole tuples
        paths, sizes, mtimes = zip(*files, strict=True)
        hasher = xxhash.xxh3_128(_pack((len(files),)))
        hasher.update("\0".join(paths).encode("utf-8", "surrogateescape"))
        hasher.update(_pack(sizes))
        contents: tuple[str, ...] = ()
        if self.mode == "content":
            # Kept: a per-item build matches rows by them (the digest is of no use for that).
            contents = tuple(hash_file(os.path.join(self.root, relpath)) for relpath in paths)
            for content in contents:
                hasher.update(bytes.fromhex(content))
        else:
            hasher.update(_pack(mtimes))
        return _Folder(prefix, files, hasher.digest(), sum(sizes), max(mtimes), contents)

    def walk(self, root_ident: tuple[int, int]) -> list[_Folder]:
        """Every folder below the root that holds counted files, in no particular order."""
        real_dirs = self.walk_tree(self.root, "", visited=None)
        if self.links:
            # A symlinked folder may point back into the tree: from here on, folders are
            # identified by (device, inode) and each is walked once. Links are taken in path
            # order so that which of two links to one folder wins does not depend on scandir.
            visited = {root_ident}
            for directory in real_dirs[1:]:
                try:
                    info = os.stat(directory)
                except FileNotFoundError:
                    continue
                visited.add((info.st_dev, info.st_ino))
            heapq.heapify(self.links)
            while self.links:
                relpath, path, ident = heapq.heappop(self.links)
                if ident in visited:
                    continue
                visited.add(ident)
                self.walk_tree(path, relpath + "/", visited)
        return self.folders

    def walk_tree(self, top: str, prefix: str, visited: set[tuple[int, int]] | None) -> list[str]:
        """Walk the real folders below ``top`` (depth first); return the folders walked."""
        walked: list[str] = []
        pending: list[tuple[str, str]] = [(top, prefix)]
        track = visited is not None
        probe = 0
        started = time.perf_counter()
        while pending:
            if probe >= _SLOW_PROBE_FILES and len(pending) > 1:
                if (time.perf_counter() - started) / probe > _SLOW_STAT_SECONDS:
                    walked += self.walk_threaded(pending, visited)
                    break
                probe = -(1 << 62)  # fast enough: stop measuring
            directory, relprefix = pending.pop()
            walked.append(directory)
            count = len(self.folders)
            subdirs = self.scan(directory, relprefix, track)
            if len(self.folders) > count:
                probe += len(self.folders[-1].files)
            probe += len(subdirs)
            self.push(subdirs, pending, visited)
        return walked

    def walk_threaded(
        self, pending: list[tuple[str, str]], visited: set[tuple[int, int]] | None
    ) -> list[str]:
        """Walk the ``pending`` folders (and all below them) in a thread pool.

        For latency-bound file systems (network shares) only: ``stat`` releases the GIL while
        it waits, so many can be in flight. On a local disk it is slower than one thread.
        """
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        walked: list[str] = []
        track = visited is not None
        with ThreadPoolExecutor(_THREADS, thread_name_prefix="cachedload-stat") as pool:
            running: dict[Future[list[_Subdir]], str] = {}
            while pending or running:
                for directory, relprefix in pending:
                    running[pool.submit(self.scan, directory, relprefix, track)] = directory
                pending.clear()
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    walked.append(running.pop(future))
                    self.push(future.result(), pending, visited)
        return walked

    @staticmethod
    def push(
        subdirs: list[_Subdir],
        pending: list[tuple[str, str]],
        visited: set[tuple[int, int]] | None,
    ) -> None:
        for path, relpath, ident in subdirs:
            if visited is not None and ident is not None:
                if ident in visited:
                    continue  # a second way into a folder already walked
                visited.add(ident)
            pending.append((path, relpath + "/"))


def _pack(values: Sequence[int]) -> array[int]:
    packed = array("q", values)
    if sys.byteorder == "big":  # digests must not depend on the machine (portable=True)
        packed.byteswap()
    return packed


def matches(relpath: str, patterns: Sequence[str]) -> bool:
    """Whether a file's ``/``-separated relative path matches one of the glob ``patterns``, as
    ``include=`` matches it in a walk (no ``/``: the name; with ``/``: the relative path)."""
    return _patterns(tuple(patterns))(relpath, relpath.rpartition("/")[2])


def check_mode(mode: object, option: str = "mode") -> None:
    """Check a fingerprint mode (the one check, for this module and the decorator's option).

    Raises:
        ConfigurationError: it is not ``"mtime"`` or ``"content"`` (the error names ``option``).
    """
    if mode not in MODES:
        raise ConfigurationError(option, f"must be 'mtime' or 'content', not {mode!r}")


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
        ConfigurationError: ``mode`` is not ``"mtime"`` or ``"content"`` (a ``ValueError``).
    """
    check_mode(mode)
    taken_ns = time.time_ns()
    root = os.fspath(path)
    info = os.stat(root)
    if stat.S_ISDIR(info.st_mode):
        included = tuple(include)
        walker = _Walker(
            root, mode, _patterns(tuple(exclude)), _patterns(included) if included else None
        )
        folders = walker.walk((info.st_dev, info.st_ino))
        folders.sort(key=_prefix)
    else:
        walker = _Walker(os.path.dirname(root), mode, _NOTHING, None)
        folders = [walker.folder("", [(os.path.basename(root), info.st_size, info.st_mtime_ns)])]

    # The digest: one (folder path, folder digest) after another, in path order.
    hasher = xxhash.xxh3_128(_DIGEST_VERSION + mode.encode() + b"\0")
    records: list[FileRecord] = []
    ordered = True
    for folder in folders:
        hasher.update(folder.prefix.encode("utf-8", "surrogateescape") + b"\0" + folder.digest)
        # Each folder's files are sorted, and so are the folders; the concatenation is out of
        # order only where a folder's files and its sub-folders' files interleave.
        if records and folder.files[0] < records[-1]:
            ordered = False
        records += folder.files
    if not ordered:
        records.sort(key=_path)
    contents: dict[str, str] = {}
    if mode == "content":
        for folder in folders:
            contents.update(zip(map(_path, folder.files), folder.contents, strict=True))
    return Fingerprint(
        digest=hasher.hexdigest(),
        file_count=len(records),
        total_bytes=sum(folder.total_bytes for folder in folders),
        newest_mtime_ns=max((folder.newest_mtime_ns for folder in folders), default=0),
        taken_ns=taken_ns,
        files=tuple(records),
        contents=contents,
    )


_prefix = operator.attrgetter("prefix")
_path = operator.itemgetter(0)
