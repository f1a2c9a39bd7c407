"""The on-disk layout of a cache directory: entries, atomic publish, load, locks, listing.

::

    <cache_dir>/
      <module>.<qualname>-<code digest[:8]>/   one folder per function (and code version)
        <key>/                                  one entry, published by one atomic rename
          result.joblib                         joblib.dump output (uncompressed → mmap-able)
          meta.json                             what, from which sources, sizes, checksum, …
          manifest                              per-file list of each source (zlib'd JSON)
        <key>.lock                              single-flight lock (filelock)
        <key>.used                              one byte appended per hit: size = hits,
                                                mtime = last use; the entry is never rewritten
        .tmp-<host>-<pid>-<random>/             an entry being written

This module knows nothing about how keys are made.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachedload import serialize
from cachedload.fingerprint import hash_file
from cachedload.reading import NOTHING, ReadAhead
from cachedload.serialize import UnpicklableResult

__all__ = [
    "DATA_FILE",
    "FORMAT_VERSION",
    "META_FILE",
    "CorruptEntry",
    "EntryInfo",
    "Store",
    "UnpicklableResult",
    "atomic_write_bytes",
    "iter_entries",
]

#: Bumped whenever the layout or the meaning of a key changes: old entries then never match.
FORMAT_VERSION = 1

DATA_FILE = "result.joblib"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_LEFTOVER_MAX_AGE = 3600.0
_HOST = socket.gethostname().replace("-", "_")

logger = logging.getLogger("cachedload")


class CorruptEntry(Exception):
    """A stored entry cannot be used (internal: the decorator turns it into a warning)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class EntryInfo:
    """One stored entry, as listed by :meth:`Store.entries`."""

    key: str
    path: Path
    meta: dict[str, Any]
    size_bytes: int
    hits: int
    last_used: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f"{_TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover_is_dead(name: str, mtime: float, now: float) -> bool:
    """True if a temporary file/folder was left by a writer that is gone (or is stale)."""
    if now - mtime > _LEFTOVER_MAX_AGE:
        return True
    parts = name.split("-")
    if len(parts) < 4:
        return False
    host, pid = parts[1], parts[2]
    return host == _HOST and pid.isdigit() and not _pid_alive(int(pid))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Store:
    """The entries of one function (one code version) inside a cache directory."""

    def __init__(self, cache_dir: Path, function_dir: str) -> None:
        self.cache_dir = cache_dir
        self.function_dir = cache_dir / function_dir

    # -- paths -------------------------------------------------------------------------------
    def entry_path(self, key: str) -> Path:
        """The folder of the entry for ``key`` (whether or not it exists)."""
        return self.function_dir / key

    def lock_path(self, key: str) -> Path:
        """The single-flight lock file for ``key``."""
        return self.function_dir / f"{key}.lock"

    # -- reading -----------------------------------------------------------------------------
    def read_meta(self, key: str) -> dict[str, Any] | None:
        """Return the entry's metadata, None if there is no entry.

        Raises:
            CorruptEntry: the entry exists but its metadata is missing, invalid or from another
                format version.
        """
        entry = self.entry_path(key)
        try:
            raw = (entry / META_FILE).read_bytes()
        except FileNotFoundError:
            if entry.is_dir():
                raise CorruptEntry(entry, "metadata file is missing") from None
            return None
        except NotADirectoryError:
            if entry.exists():  # a file where the entry's folder should be
                raise CorruptEntry(entry, "entry is not a folder") from None
            return None  # a file further up: no entry (storing will report the path)
        try:
            meta = json.loads(raw)
        except ValueError as error:
            raise CorruptEntry(entry, f"metadata is not valid JSON ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise CorruptEntry(
                entry, f"metadata format {found!r} is not this version's {FORMAT_VERSION}"
            )
        data = meta.get("data")
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("size"), int)
            or not isinstance(data.get("xxh3"), str)
        ):
            raise CorruptEntry(entry, "metadata lacks the data file's size and checksum")
        racy = meta.get("racy", {})
        if not (
            isinstance(racy, dict)
            and all(
                isinstance(files, dict) and all(isinstance(d, str) for d in files.values())
                for files in racy.values()
            )
            and isinstance(meta.get("racy_newest_mtime_ns", 0), int)
        ):
            raise CorruptEntry(entry, "metadata's records of recently modified files are invalid")
        return meta

    def has_data(self, key: str, meta: dict[str, Any]) -> bool:
        """True if the entry's data file is there with the size ``meta`` records."""
        try:
            size = os.stat(self.entry_path(key) / DATA_FILE).st_size
        except OSError:
            return False
        return bool(size == meta["data"]["size"])

    def load_value(
        self,
        key: str,
        meta: dict[str, Any],
        *,
        mmap_mode: str | None,
        verify: bool,
        ahead: ReadAhead | None = None,
    ) -> Any:
        """Load the stored result of an entry whose metadata was read with :meth:`read_meta`.

        Checks the data file's size against the metadata (and its checksum when ``verify``).
        ``ahead``: this entry's data, being read by :meth:`read_ahead`; used if it was read
        from the same file.

        Raises:
            CorruptEntry: the data file is missing, of the wrong size or checksum, or joblib
                cannot load it.
        """
        data_path = self.entry_path(key) / DATA_FILE
        try:
            info = os.stat(data_path)
        except FileNotFoundError:
            raise CorruptEntry(self.entry_path(key), "data file is missing") from None
        size = info.st_size
        if size != meta["data"]["size"]:
            raise CorruptEntry(
                self.entry_path(key),
                f"data file is {size} bytes, metadata says {meta['data']['size']}",
            )
        if verify and hash_file(data_path) != meta["data"]["xxh3"]:
            raise CorruptEntry(self.entry_path(key), "data file checksum does not match")
        if ahead is not None:
            value = ahead.take(info)
            if value is not NOTHING:
                return value
        try:
            return serialize.load(data_path, mmap_mode=mmap_mode)
        except Exception as error:  # joblib/pickle raise many types on a garbled file
            raise CorruptEntry(
                self.entry_path(key), f"cannot load data ({type(error).__name__}: {error})"
            ) from error

    def read_ahead(self, key: str) -> ReadAhead:
        """Start loading an entry's data (``mmap_mode=None``) in a background thread, before
        it is known whether the call will ask for it; see :meth:`load_value`."""
        data_path = self.entry_path(key) / DATA_FILE
        return ReadAhead(
            lambda reader, opened: serialize.load(
                data_path, mmap_mode=None, reader=reader, on_open=opened
            )
        )

    def record_hit(self, key: str) -> None:
        """Note one use of an entry (appends one byte beside it; never rewrites the entry)."""
        try:
            fd = os.open(
                self.function_dir / f"{key}.used", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666
            )
        except OSError:
            return  # a read-only cache still serves hits
        try:
            os.write(fd, b".")
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- writing -----------------------------------------------------------------------------
    def lock(self, key: str, timeout: float | None) -> Any:
        """A cross-process lock for computing ``key``, released if its holder dies: a kernel
        lock (filelock), or on a shared mount (NFS, Lustre…) a lease that a holder on another
        machine renews while it lives (see :mod:`cachedload.backends.mount`)."""
        from cachedload.backends.mount import entry_lock

        self.function_dir.mkdir(parents=True, exist_ok=True)
        return entry_lock(self.lock_path(key), timeout)

    def save(
        self,
        key: str,
        value: Any,
        meta: dict[str, Any],
        *,
        compress: int | bool | str | tuple[str, int] = False,
        manifest: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> int:
        """Publish an entry atomically and return the data file's size in bytes.

        Writes into a temporary folder beside the entry, fsyncs, then renames it into place, so
        readers see either no entry or a complete one. If an entry for ``key`` already exists it
        is kept (another process published the same result first) unless ``replace``.

        Raises:
            OSError: the cache directory cannot be written (the temporary folder is removed).
            UnpicklableResult: ``value`` cannot be pickled (the temporary folder is removed).
        """
        self.function_dir.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers()
        tmp = self.function_dir / f"{_TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            size, checksum = serialize.dump(value, tmp / DATA_FILE, compress=compress)
            meta = {**meta, "format": FORMAT_VERSION, "key": key}
            meta["data"] = {"file": DATA_FILE, "size": size, "xxh3": checksum}
            self._write_file(tmp / META_FILE, json.dumps(meta, indent=1).encode())
            if manifest is not None:
                self._write_file(
                    tmp / MANIFEST_FILE, zlib.compress(json.dumps(manifest).encode(), 3)
                )
            _fsync_dir(tmp)
            self._publish(tmp, self.entry_path(key), replace=replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.function_dir)
        return size

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def _publish(self, tmp: Path, entry: Path, *, replace: bool) -> None:
        if replace and entry.exists():
            trash = entry.with_name(f"{_TRASH_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another process published this key first: entries are immutable, keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)

    def rewrite_meta(self, key: str, meta: dict[str, Any]) -> None:
        """Atomically replace an entry's metadata (used to clear verified racy-file records)."""
        atomic_write_bytes(self.entry_path(key) / META_FILE, json.dumps(meta, indent=1).encode())

    def remove(self, key: str) -> None:
        """Delete an entry: first move it out of sight atomically, then delete its files."""
        entry = self.entry_path(key)
        trash = entry.with_name(f"{_TRASH_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(trash, ignore_errors=True)
        for suffix in (".used",):
            with contextlib.suppress(FileNotFoundError):
                (self.function_dir / f"{key}{suffix}").unlink()

    def remove_leftovers(self) -> None:
        """Delete temporary files of dead writers (same host, pid gone) or older than an hour."""
        now = time.time()
        try:
            children = list(os.scandir(self.function_dir))
        except FileNotFoundError:
            return
        for child in children:
            if not child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                continue
            try:
                mtime = child.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if _leftover_is_dead(child.name, mtime, now):
                logger.debug("removing leftover %s", child.path)
                _remove(Path(child.path))

    # -- listing -----------------------------------------------------------------------------
    def entries(self) -> Iterator[EntryInfo]:
        """Every readable entry of this function folder (corrupt ones are skipped)."""
        yield from iter_entries(self.function_dir)


def iter_entries(function_dir: Path) -> Iterator[EntryInfo]:
    """Every readable entry in one function folder."""
    try:
        children = sorted(os.scandir(function_dir), key=lambda child: child.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    store = Store(function_dir.parent, function_dir.name)
    for child in children:
        if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
            continue
        try:
            meta = store.read_meta(child.name)
        except CorruptEntry:
            continue
        if meta is None:
            continue
        size = sum(
            f.stat().st_size for f in os.scandir(child.path) if f.is_file(follow_symlinks=False)
        )
        try:
            used = os.stat(function_dir / f"{child.name}.used")
            hits, last_used = used.st_size, used.st_mtime
        except FileNotFoundError:
            hits, last_used = 0, float(meta.get("created", 0.0))
        yield EntryInfo(child.name, Path(child.path), meta, size, hits, last_used)
