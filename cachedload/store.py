"""A local cache directory (:class:`LocalRoot`): atomic publish, load, locks, listing.

The layout (every file that may sit in a cache directory) is drawn in :mod:`cachedload.entry`.
An entry is written into a temporary folder beside it, fsynced, then renamed into place, so
readers see either no entry or a complete one; it is deleted by renaming it away first. The
single-flight lock is a kernel lock, or a lease on a shared mount (:mod:`cachedload.mount`).

This module knows nothing about how keys are made.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cachedload import serialize
from cachedload.entry import (
    DATA_FILE,
    FORMAT_VERSION,
    LOCAL_COPIES_DIR,
    LOCK_SUFFIX,
    MANIFEST_FILE,
    META_FILE,
    SYNCED_SUFFIX,
    TRASH_PREFIX,
    URL_FILE,
    USED_SUFFIX,
    CorruptEntry,
    decode_manifest,
    encode_manifest,
    is_function_dir_name,
    is_leftover_name,
    leftover_is_dead,
    read_local_meta,
    scan_entry_dirs,
    size_problem,
    temporary_name,
)
from cachedload.fingerprint import hash_file
from cachedload.mount import entry_lock, uses_lease
from cachedload.reading import NOTHING, ReadAhead
from cachedload.root import Built, CacheRoot, Checked, EntryInfo

__all__ = ["LocalRoot", "atomic_write_bytes"]

logger = logging.getLogger("cachedload")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(temporary_name())
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _folder_size(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in os.scandir(path) if f.is_file(follow_symlinks=False))
    except OSError:
        return 0


def replace_folder(tmp: Path, entry: Path, *, replace: bool) -> None:
    """Rename the finished folder ``tmp`` to ``entry``; an entry already there is kept (another
    process published the same inputs first) unless ``replace``."""
    if replace and entry.exists():
        trash = entry.with_name(temporary_name(TRASH_PREFIX))
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        # Another process published this key first: entries are immutable, keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)


class LocalRoot(CacheRoot):
    """A cache directory on a POSIX file system (local disk or a shared mount).

    Args:
        path: the cache directory (need not exist yet).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        # Function folder name -> its path: a hit then joins one name, not two.
        self._folders: dict[str, Path] = {}

    def __repr__(self) -> str:
        return f"LocalRoot({self.location!r})"

    # -- names ---------------------------------------------------------------------------------
    @property
    def local(self) -> LocalRoot:
        """Itself: all of it is on this machine."""
        return self

    def folder(self, fdir: str) -> Path:
        """A function folder (whether or not it exists)."""
        found = self._folders.get(fdir)
        if found is None:
            if len(self._folders) > 64:
                self._folders.clear()
            found = self._folders[fdir] = self.path / fdir
        return found

    def _beside(self, fdir: str, key: str, suffix: str) -> Path:
        return self.folder(fdir) / f"{key}{suffix}"

    def function_dirs(self) -> list[str]:
        """The function folders, sorted (not ``remote/``, nor anything not named as ours)."""
        try:
            children = list(os.scandir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            child.name
            for child in children
            if is_function_dir_name(child.name) and child.is_dir(follow_symlinks=False)
        )

    def local_copies(self) -> list[tuple[CacheRoot, str]]:
        """The read-through copies of remote caches under ``remote/``, with their URLs
        (``remote/<name>`` stands for the URL when the copy does not record it)."""
        try:
            children = sorted(os.scandir(self.path / LOCAL_COPIES_DIR), key=lambda c: c.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        copies: list[tuple[CacheRoot, str]] = []
        for child in children:
            if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
                continue
            try:
                url = (Path(child.path) / URL_FILE).read_text().strip()
            except (OSError, UnicodeDecodeError):
                url = ""
            copies.append((LocalRoot(child.path), url or f"{LOCAL_COPIES_DIR}/{child.name}"))
        return copies

    # -- reading -------------------------------------------------------------------------------
    def entries(self, fdir: str) -> Iterator[EntryInfo]:
        """Every readable entry of a function folder, by key (damaged ones are left out)."""
        for found in scan_entry_dirs(self.path / fdir):
            if found.meta is None:
                continue
            try:
                used = os.stat(self._beside(fdir, found.key, USED_SUFFIX))
                hits, last_used = used.st_size, used.st_mtime
            except FileNotFoundError:
                hits, last_used = 0, float(found.meta.get("created", 0.0))
            size = _folder_size(found.path)
            yield EntryInfo(found.key, found.path, found.meta, size, hits, last_used)

    def read_meta(self, fdir: str, key: str) -> dict[str, Any] | None:
        """An entry's metadata; None if there is no entry.

        Raises:
            CorruptEntry: the entry exists but its metadata is missing, invalid or from another
                format version.
        """
        return read_local_meta(self.entry_path(fdir, key))

    def has_data(self, fdir: str, key: str, meta: dict[str, Any]) -> bool:
        """True if the entry's data file is there with the size ``meta`` records."""
        try:
            size = os.stat(self.entry_path(fdir, key) / DATA_FILE).st_size
        except OSError:
            return False
        return size_problem(size, meta) is None

    def load(
        self,
        fdir: str,
        key: str,
        meta: dict[str, Any],
        *,
        mmap_mode: str | None,
        verify: bool,
        ahead: ReadAhead | None = None,
    ) -> Any:
        """Load an entry: checks its data file's size (and checksum when ``verify``); uses
        ``ahead`` if it read the same file.

        Raises:
            CorruptEntry: the data file is missing, of the wrong size or checksum, or cannot be
                loaded.
        """
        entry = self.entry_path(fdir, key)
        data_path = entry / DATA_FILE
        try:
            info = os.stat(data_path)
        except FileNotFoundError:
            raise CorruptEntry(entry, "data file is missing") from None
        problem = size_problem(info.st_size, meta)
        if problem is None and verify and hash_file(data_path) != meta["data"]["xxh3"]:
            problem = "data file checksum does not match"
        if problem is not None:
            raise CorruptEntry(entry, problem)
        if ahead is not None:
            value = ahead.take(info)
            if value is not NOTHING:
                return value
        try:
            return serialize.load(data_path, mmap_mode=mmap_mode)
        except Exception as error:  # joblib/pickle raise many types on a garbled file
            raise CorruptEntry(
                entry, f"cannot load data ({type(error).__name__}: {error})"
            ) from error

    def read_ahead(self, fdir: str, key: str) -> ReadAhead:
        """Start loading an entry's data (``mmap_mode=None``) in a background thread, before
        it is known whether the call will ask for it; see :meth:`load`."""
        data_path = self.entry_path(fdir, key) / DATA_FILE
        return ReadAhead(
            lambda reader, opened: serialize.load(
                data_path, mmap_mode=None, reader=reader, on_open=opened
            )
        )

    def record_hit(self, fdir: str, key: str) -> None:
        """Note one use of an entry (appends one byte beside it; never rewrites the entry)."""
        try:
            fd = os.open(
                self._beside(fdir, key, USED_SUFFIX), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666
            )
        except OSError:
            return  # a read-only cache still serves hits
        try:
            os.write(fd, b".")
        except OSError:
            pass
        finally:
            os.close(fd)

    def manifest(self, fdir: str, key: str) -> dict[str, Any] | None:
        """An entry's per-file manifest; None if it has none or it is unreadable."""
        try:
            raw = (self.entry_path(fdir, key) / MANIFEST_FILE).read_bytes()
        except OSError:
            return None
        return decode_manifest(raw)

    # -- writing -------------------------------------------------------------------------------
    def put(
        self,
        fdir: str,
        key: str,
        value: Any,
        meta: dict[str, Any],
        *,
        compress: int | bool | str | tuple[str, int] = False,
        manifest: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> int:
        """Publish an entry atomically and return the data file's size in bytes.

        Raises:
            OSError: the cache directory cannot be written (the temporary folder is removed).
            UnpicklableResult: ``value`` cannot be pickled (the temporary folder is removed).
        """

        def build(data: Path) -> Built:
            size, checksum = serialize.dump(value, data, compress=compress)
            return Built(size, checksum, meta, manifest)

        size = self.put_built(fdir, key, build, replace=replace)
        assert size is not None
        return size

    def put_built(
        self,
        fdir: str,
        key: str,
        build: Callable[[Path], Built | None],
        *,
        replace: bool = False,
    ) -> int | None:
        """Publish an entry whose data file ``build`` writes (into the temporary folder of
        the entry); None, and nothing published, if ``build`` returns None.

        Raises:
            OSError: the cache directory cannot be written (the temporary folder is removed).
            Whatever ``build`` raises (the temporary folder is removed).
        """
        function_dir = self.path / fdir
        function_dir.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers(fdir)
        tmp = function_dir / temporary_name()
        tmp.mkdir()
        try:
            built = build(tmp / DATA_FILE)
            if built is None:
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            meta = {**built.meta, "format": FORMAT_VERSION, "key": key}
            meta["data"] = {"file": DATA_FILE, "size": built.size, "xxh3": built.checksum}
            _write_file(tmp / META_FILE, json.dumps(meta, indent=1).encode())
            if built.manifest is not None:
                _write_file(tmp / MANIFEST_FILE, encode_manifest(built.manifest))
            _fsync_dir(tmp)
            replace_folder(tmp, self.entry_path(fdir, key), replace=replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(function_dir)
        return built.size

    def rewrite_meta(self, fdir: str, key: str, meta: dict[str, Any]) -> None:
        """Atomically replace an entry's metadata (used to clear verified racy-file records)."""
        atomic_write_bytes(
            self.entry_path(fdir, key) / META_FILE, json.dumps(meta, indent=1).encode()
        )

    def lock(self, fdir: str, key: str, timeout: float | None) -> Any:
        """A cross-process lock for computing ``key``, released if its holder dies: a kernel
        lock (filelock), or on a shared mount (NFS, Lustre…) a lease that a holder on another
        machine renews while it lives (see :mod:`cachedload.mount`)."""
        (self.path / fdir).mkdir(parents=True, exist_ok=True)
        return entry_lock(self._beside(fdir, key, LOCK_SUFFIX), timeout)

    # -- removing ------------------------------------------------------------------------------
    def remove(self, fdir: str, key: str) -> None:
        """Delete an entry: first move it out of sight atomically, then delete its files (and
        its records of uses)."""
        entry = self.entry_path(fdir, key)
        trash = entry.with_name(temporary_name(TRASH_PREFIX))
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(trash, ignore_errors=True)
        for suffix in (USED_SUFFIX, SYNCED_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                self._beside(fdir, key, suffix).unlink()

    @contextlib.contextmanager
    def claim(self, fdir: str, key: str) -> Iterator[bool]:
        """Hold an entry's lock without waiting; yield False if another process holds it.

        While it is held nobody computes or replaces the entry, so it can be deleted safely;
        the lock file goes with it (a waiter that opened it notices the unlinked file and
        retries).
        """
        from filelock import Timeout

        lock_path = self._beside(fdir, key, LOCK_SUFFIX)
        lock = entry_lock(lock_path, 0)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            if not uses_lease(lock_path.parent):  # a lease's marker file goes with release()
                with contextlib.suppress(OSError):
                    lock_path.unlink()
            lock.release()

    def is_busy(self, fdir: str, key: str) -> bool:
        """True if another process holds the entry's lock (it is being recomputed or removed)."""
        from filelock import Timeout

        lock_path = self._beside(fdir, key, LOCK_SUFFIX)
        if not lock_path.exists():
            return False
        lock = entry_lock(lock_path, 0)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def remove_leftovers(self, fdir: str) -> int:
        """Delete temporary files of dead writers (same host, pid gone) or older than an hour;
        return how many."""
        now, removed = time.time(), 0
        try:
            children = list(os.scandir(self.path / fdir))
        except FileNotFoundError:
            return 0
        for child in children:
            if not is_leftover_name(child.name):
                continue
            try:
                mtime = child.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if leftover_is_dead(child.name, mtime, now):
                logger.debug("removing leftover %s", child.path)
                _delete(Path(child.path))
                removed += 1
        return removed

    def tidy(self) -> None:
        """Remove dead writers' leftovers, then function folders left empty."""
        for fdir in self.function_dirs():
            self.remove_leftovers(fdir)
            with contextlib.suppress(OSError):
                (self.path / fdir).rmdir()  # only succeeds when empty

    def tidy_copies(self) -> None:
        """Tidy the read-through copies under ``remote/``; remove those (and ``remote/``) left
        empty."""
        copies = self.local_copies()
        for copy, _ in copies:
            copy.tidy()
            path = Path(copy.location)
            with contextlib.suppress(OSError):
                if not any(name != URL_FILE for name in os.listdir(path)):
                    (path / URL_FILE).unlink(missing_ok=True)
                    path.rmdir()
        if copies:
            with contextlib.suppress(OSError):
                (self.path / LOCAL_COPIES_DIR).rmdir()

    def verify(self, *, checksums: bool = True) -> Iterator[Checked]:
        """Check every entry folder: metadata, data file size and (``checksums``) checksum."""
        for fdir in self.function_dirs():
            for found in scan_entry_dirs(self.path / fdir):
                function, problem = fdir, found.problem
                if found.meta is not None:
                    function = str(found.meta.get("function", fdir))
                    problem = self._data_problem(found.path / DATA_FILE, found.meta, checksums)
                yield Checked(found.path, function, _folder_size(found.path), problem)

    @staticmethod
    def _data_problem(data: Path, meta: dict[str, Any], checksums: bool) -> str | None:
        try:
            problem = size_problem(os.stat(data).st_size, meta)
            if problem is None and checksums and hash_file(data) != meta["data"]["xxh3"]:
                problem = "data file checksum does not match"
        except FileNotFoundError:
            return "data file is missing"
        except OSError as error:
            return f"cannot read the entry ({error})"
        return problem
