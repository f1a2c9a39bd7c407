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
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cachedload import serialize
from cachedload.entry import (
    DATA_FILE,
    FORMAT_VERSION,
    LOCAL_COPIES_DIR,
    LOCK_SUFFIX,
    MANIFEST_FIELD,
    MANIFEST_FILE,
    META_FILE,
    OWNER_SUFFIX,
    SUPERSEDED_FILE,
    SYNCED_SUFFIX,
    TAG_CONTENT,
    TAG_FILE,
    TRASH_PREFIX,
    URL_FILE,
    USED_SUFFIX,
    CorruptEntry,
    encoded_manifest,
    is_entry_name,
    is_entry_shaped,
    is_function_dir_name,
    is_leftover_name,
    is_tagged,
    leftover_is_dead,
    manifest_problem,
    manifest_read_limit,
    read_entry_manifest,
    read_entry_meta,
    read_local_meta,
    read_regular_file,
    record_key,
    scan_entry_dirs,
    size_problem,
    skipped_items,
    temporary_name,
    write_new_file,
)
from cachedload.errors import NotACacheDirectoryError, ReadOnlyCacheError
from cachedload.mount import entry_lock, uses_lease
from cachedload.reading import NOTHING, ReadAhead, SharedReader, file_identity
from cachedload.root import Built, CacheRoot, Checked, EntryInfo, Leftover, Reusable
from cachedload.signing import SIGNATURE_FIELD, sign, verify_signature
from cachedload.verified import (
    DigestMismatch,
    copy_verified,
    hash_descriptor,
    open_regular,
    private_copy,
    read_verified,
    sha256_of,
    writable_by_others,
)

__all__ = ["LocalRoot", "atomic_write_bytes"]

logger = logging.getLogger("cachedload")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # missing, or uncreatable: storing reports it
        return None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _children(folder: Path) -> list[os.DirEntry[str]]:
    """A folder's entries sorted by name; none if it is not there (or not a folder)."""
    try:
        with os.scandir(folder) as found:
            return sorted(found, key=lambda child: child.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _identity(info: os.stat_result) -> tuple[int, ...]:
    """What tells a folder from one put in its place: device, inode, owner and mode."""
    return (info.st_dev, info.st_ino, info.st_uid, info.st_mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, mode: int = 0o666, *, sync: bool = True) -> None:
    # A new file (O_EXCL), never through a symlink planted in its place.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    with open(os.open(path, flags, mode), "wb") as handle:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def _fsync_files(paths: list[Path]) -> None:
    """fsync files at once, one thread each: the file system commits their metadata in one
    journal transaction where it can, and the small files' writes overlap the large one's
    (an entry's ~3 fsyncs, one after the other, took ~10 ms more than the data file's)."""

    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(paths) == 1:
        sync(paths[0])
        return
    with ThreadPoolExecutor(len(paths), thread_name_prefix="cachedload-fsync") as pool:
        for done in [pool.submit(sync, path) for path in paths]:
            done.result()  # the first error, after every fsync has ended


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` through a new temporary file and an atomic rename (which
    replaces a symlink at ``path``, never the file it points to)."""
    tmp = path.with_name(temporary_name())
    try:
        _write_file(tmp, data, mode)
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


def _unlink_file(path: Path) -> None:
    """Delete a file (or a symlink, never what it points to); a folder is left alone."""
    info = _lstat(path)
    if info is not None and not stat.S_ISDIR(info.st_mode):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _folder_size(path: Path) -> int:
    try:
        with os.scandir(path) as children:  # closed even when a stat fails midway
            return sum(f.stat().st_size for f in children if f.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _tree_size(path: str) -> int:
    """The bytes of the files under a folder (or of a file); what vanishes meanwhile counts 0."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _vanished(entry: Path, meta: dict[str, Any]) -> bool:
    """True if the entry read with ``meta`` was removed or replaced meanwhile."""
    try:
        return read_local_meta(entry) != meta
    except (CorruptEntry, OSError):
        return False


def replace_folder(tmp: Path, entry: Path, *, replace: bool) -> None:
    """Rename the finished folder ``tmp`` to ``entry``; an entry already there is kept (another
    process published the same inputs first) unless ``replace``."""
    for _ in range(_PUBLISH_ATTEMPTS):
        if replace:
            trash = entry.with_name(temporary_name(TRASH_PREFIX))
            try:
                os.rename(entry, trash)
            except FileNotFoundError:
                pass  # nothing there, or another process moved it away first
            else:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, entry)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not replace:
            break
        # Replacing: another process published in the window between the two renames; the
        # entry there is as old as the one being replaced, so move it away too and retry.
    # Another process published this key first: entries are immutable, keep theirs.
    shutil.rmtree(tmp, ignore_errors=True)


_PUBLISH_ATTEMPTS = 3


class LocalRoot(CacheRoot):
    """A cache directory on a POSIX file system (local disk or a shared mount).

    Args:
        path: the cache directory (need not exist yet).
        shared: declared shared with other users (a group-writable mount): its folders and
            files keep group permissions, and its ownership is not checked. Else it is
            private: folders 0700, files 0600, and not used if another user could write it.
        safe_types: load entries with the restricted unpickler, allowing these classes
            besides data (``()``: data only); None: entries are trusted.
        signing_key: sign entries when storing; entries not signed with it are corrupt, and
            signed ones load with the full unpickler (their checksum checked on every hit).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shared: bool = False,
        safe_types: tuple[type, ...] | None = None,
        signing_key: bytes | None = None,
    ) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.shared = shared
        self.safe_types = safe_types
        self.signing_key = signing_key
        # Function folder name -> its path: a hit then joins one name, not two.
        self._folders: dict[str, Path] = {}
        # Function folder -> the identities of the cache directory and of that folder when
        # they were found owned by this user and not writable by others (see untrusted).
        self._trusted: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {}
        # (function folder, key) -> the entry folder its metadata was last read from (a load
        # reads the data from that folder only).
        self._meta_folders: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._tagged = False
        self._dir_mode, self._file_mode = (0o777, 0o666) if shared else (0o700, 0o600)
        self._lock_mode = -1 if shared else 0o600

    def __repr__(self) -> str:
        return f"LocalRoot({self.location!r})"

    @property
    def file_mode(self) -> int:
        """The mode files are created with here (0600 private, 0666 less the umask shared)."""
        return self._file_mode

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
            if not is_tagged(Path(child.path)):
                continue  # not a copy cachedload made: verify names it, nothing touches it
            try:
                raw = read_regular_file(Path(child.path) / URL_FILE, limit=4096)
                url = raw.decode().strip()
            except (OSError, UnicodeDecodeError):
                url = ""
            copy = LocalRoot(child.path, safe_types=self.safe_types or ())
            copies.append((copy, url or f"{LOCAL_COPIES_DIR}/{child.name}"))
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
        meta, folder = read_entry_meta(self.entry_path(fdir, key))
        if folder is not None:
            if len(self._meta_folders) > 256:
                self._meta_folders.clear()
            self._meta_folders[fdir, key] = (id(meta), *folder)
        return meta

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
        """Load an entry: checks its data file's size (and checksum when ``verify``, and
        signature with a signing key) on the very bytes it then uses; uses ``ahead`` if it
        read the same file.

        Raises:
            CorruptEntry: the data file is missing, not a regular file, not this user's own
                in a private cache, of the wrong size or checksum, or cannot be loaded.
        """
        entry = self.entry_path(fdir, key)
        try:
            return self._load(entry, meta, mmap_mode, verify, ahead)
        except CorruptEntry:
            if _vanished(entry, meta):  # removed or replaced while read: a plain miss
                raise FileNotFoundError(errno.ENOENT, "entry vanished while read", entry) from None
            raise

    def _load(
        self,
        entry: Path,
        meta: dict[str, Any],
        mmap_mode: str | None,
        verify: bool,
        ahead: ReadAhead | None,
    ) -> Any:
        expected = self._expected_digests(entry, meta, verify)  # the signature, before a read
        safe_types = None if self.signing_key is not None else self.safe_types
        fd, info = self._open_data(entry, meta)
        try:
            problem = size_problem(info.st_size, meta)
            if problem is not None:
                raise CorruptEntry(entry, problem)
            path = entry / DATA_FILE
            return self._read_data(fd, info, path, expected, mmap_mode, safe_types, ahead)
        except CorruptEntry:
            raise
        except DigestMismatch as error:
            raise CorruptEntry(entry, str(error)) from None
        except Exception as error:  # joblib/pickle raise many types on a garbled file
            raise CorruptEntry(
                entry, f"cannot load data ({type(error).__name__}: {error})"
            ) from error
        finally:
            os.close(fd)

    def _open_data(self, entry: Path, meta: dict[str, Any]) -> tuple[int, os.stat_result]:
        """The entry's data file, opened once for every check and read of a load, from the
        folder :meth:`read_meta` read ``meta`` from, if it did.

        Raises:
            CorruptEntry: it is missing, a symlink, not a regular file, or (in a private
                cache) not this user's own file.
        """
        try:
            folder_fd = os.open(entry, _DIR_FLAGS)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "entry vanished", entry) from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptEntry(entry, "entry folder is a symlink or not a folder") from None
            raise
        try:
            folder = os.fstat(folder_fd)
            read_from = self._meta_folders.pop((entry.parent.name, entry.name), None)
            if (
                read_from is not None
                and read_from[0] == id(meta)
                and read_from[1:] != (folder.st_dev, folder.st_ino)
            ):
                # The folder its metadata came from was replaced meanwhile (or the cache
                # directory swapped): not that entry's data, a plain miss.
                raise FileNotFoundError(errno.ENOENT, "entry replaced while read", entry)
            fd, info = open_regular(DATA_FILE, dir_fd=folder_fd)
        except FileNotFoundError as error:
            if error.filename == entry:
                raise
            raise CorruptEntry(entry, "data file is missing") from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR, errno.EINVAL):
                raise CorruptEntry(entry, "data file is a symlink or not a regular file") from None
            raise
        finally:
            os.close(folder_fd)
        if not self.shared and writable_by_others(info):
            os.close(fd)
            raise CorruptEntry(
                entry, "data file is not this user's own (another owner, or writable by others)"
            )
        return fd, info

    def _expected_digests(self, entry: Path, meta: dict[str, Any], verify: bool) -> dict[str, str]:
        """The digests the data must have before it is used: with a signing key the signed
        SHA-256 (after checking the signature), with ``verify`` the xxh3, else none.

        Raises:
            CorruptEntry: the entry is not signed with the signing key.
        """
        if self.signing_key is not None:
            digest = meta["data"].get("sha256")
            if not isinstance(digest, str) or not verify_signature(meta, digest, self.signing_key):
                raise CorruptEntry(entry, "entry is not signed with the signing key")
            return {"sha256": digest}
        return {"xxh3": meta["data"]["xxh3"]} if verify else {}

    @staticmethod
    def _read_data(
        fd: int,
        info: os.stat_result,
        path: Path,
        expected: dict[str, str],
        mmap_mode: str | None,
        safe_types: tuple[type, ...] | None,
        ahead: ReadAhead | None,
    ) -> Any:
        """The value in the open data file: used where it lies only if nobody else can write
        it, else from a private copy; checked against ``expected`` in either case first."""
        size = info.st_size
        if writable_by_others(info) or (expected and mmap_mode is None):
            # In memory (one read, then hashed), or for a map a private copy hashed on the
            # way: the bytes used are the bytes verified, whatever the writer does meanwhile.
            if mmap_mode is None:
                buffer = read_verified(fd, size, expected)
                return serialize.load_buffer(buffer, mmap_mode=None, safe_types=safe_types)
            copy = private_copy(fd, size, expected)
            try:
                return serialize.load_open(
                    copy, size, path=None, mmap_mode=mmap_mode, safe_types=safe_types
                )
            finally:
                os.close(copy)
        if expected:  # a map of a file only this user can write: hash it, then map it
            hash_descriptor(fd, size, expected)
        elif ahead is not None:
            value = ahead.take(info)
            if value is not NOTHING:
                return value
        return serialize.load_open(fd, size, path=path, mmap_mode=mmap_mode, safe_types=safe_types)

    @contextlib.contextmanager
    def reusable(
        self, fdir: str, key: str, meta: dict[str, Any], *, verify: bool
    ) -> Iterator[Reusable]:
        """Check an entry whose rows a per-item build copies, as a hit checks it (see
        :meth:`load`: a build must not launder a damaged or unsigned entry into a new one),
        and hold the bytes checked while the rows are copied: a data file another user can
        write is copied into a private temporary folder while it is hashed, and the copy is
        used (removed on exit); this user's own file is used in place, as long as it is the
        file that was hashed (its identity). Indexes are read with the restricted unpickler
        wherever others can write the cache.

        Raises:
            CorruptEntry: a check failed.
            OSError: its data file cannot be read (or copied).
        """
        entry = self.entry_path(fdir, key)
        expected = self._expected_digests(entry, meta, verify)
        others_write = self.safe_types is not None or self.signing_key is not None
        with contextlib.ExitStack() as stack:
            fd, info = self._open_data(entry, meta)
            stack.callback(os.close, fd)
            problem = size_problem(info.st_size, meta)
            if problem is not None:
                raise CorruptEntry(entry, problem)
            try:
                if writable_by_others(info):
                    folder = stack.enter_context(
                        tempfile.TemporaryDirectory(prefix="cachedload-previous-")
                    )
                    copy_verified(fd, info.st_size, expected, Path(folder) / DATA_FILE)
                    found = Reusable(Path(folder) / DATA_FILE, (), None)
                else:
                    hash_descriptor(fd, info.st_size, expected)
                    identity = file_identity(info) if others_write else None
                    found = Reusable(entry / DATA_FILE, () if others_write else None, identity)
            except DigestMismatch as error:
                raise CorruptEntry(entry, str(error)) from None
            yield found

    def read_ahead(self, fdir: str, key: str) -> ReadAhead:
        """Start loading an entry's data (``mmap_mode=None``) in a background thread, before
        it is known whether the call will ask for it; see :meth:`load`. Only in a private,
        unsigned cache, and only a file this user owns and nobody else can write: nothing is
        unpickled before it is checked.

        Raises:
            OSError: the cache is shared or signed (its entries are verified first).
        """
        if self.shared or self.signing_key is not None:
            raise OSError(errno.EPERM, "entries of a shared or signed cache are not read ahead")
        data_path = self.entry_path(fdir, key) / DATA_FILE
        safe_types = self.safe_types

        def load(reader: SharedReader, opened: Callable[[int], None]) -> Any:
            fd, info = open_regular(data_path)
            try:
                if writable_by_others(info):
                    return NOTHING  # the caller's own load refuses it
                opened(fd)
                return serialize.load_open(
                    fd,
                    info.st_size,
                    path=data_path,
                    mmap_mode=None,
                    reader=reader,
                    safe_types=safe_types,
                )
            finally:
                os.close(fd)

        return ReadAhead(load)

    def record_hit(self, fdir: str, key: str) -> None:
        """Note one use of an entry (appends one byte beside it; never rewrites the entry)."""
        try:
            # Non-blocking: a FIFO planted here must not hang the hit (ENXIO without a reader).
            fd = os.open(
                self._beside(fdir, key, USED_SUFFIX),
                os.O_WRONLY
                | os.O_APPEND
                | os.O_CREAT
                | os.O_NOFOLLOW
                | os.O_NONBLOCK
                | getattr(os, "O_CLOEXEC", 0),
                self._file_mode,
            )
        except OSError:
            return  # a read-only cache still serves hits
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.write(fd, b".")
        except OSError:
            pass
        finally:
            os.close(fd)

    def manifest(
        self, fdir: str, key: str, meta: dict[str, Any], *, columns: bool = False
    ) -> dict[str, Any] | None:
        """An entry's per-file manifest (``columns``: as
        :class:`~cachedload.entry.FileColumns`), checked against ``meta``'s record of it; with
        a signing key, one ``meta`` does not record is refused (see
        :func:`~cachedload.entry.parse_manifest`). None if it has none.

        Raises:
            CorruptEntry: it does not match ``meta``, or is unreadable.
        """
        entry = self.entry_path(fdir, key)
        return read_entry_manifest(
            entry, meta, signed=self.signing_key is not None, columns=columns
        )

    # -- writing -------------------------------------------------------------------------------
    def put_built(
        self,
        fdir: str,
        key: str,
        build: Callable[[Path], Built | None],
        *,
        replace: bool = False,
    ) -> int | None:
        """Publish an entry whose data file ``build`` writes (into the temporary folder of
        the entry; it need not fsync it); None, and nothing published, if ``build`` returns
        None.

        Raises:
            OSError: the cache directory cannot be written (the temporary folder is removed).
            Whatever ``build`` raises (the temporary folder is removed).
        """
        function_dir = self.make_folder(fdir)
        self.remove_leftovers(fdir)
        tmp = function_dir / temporary_name()
        # Private while it is written, even in a shared cache: nobody else can swap, plant
        # or redirect (a FIFO, a symlink) a file the build writes, reads back or signs. Opened
        # to the others only once complete (a crashed writer's folder stays its own to clean).
        tmp.mkdir(0o700)
        try:
            built = build(tmp / DATA_FILE)
            if built is None:
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            if not self.shared:  # written by joblib/open with the umask's permissions
                os.chmod(tmp / DATA_FILE, self._file_mode)
            meta = {**built.meta, "format": FORMAT_VERSION, "key": key}
            meta["data"] = {"file": DATA_FILE, "size": built.size, "xxh3": built.checksum}
            files = [tmp / DATA_FILE, tmp / META_FILE]
            if built.manifest is not None:
                # Recorded in the metadata: verify and the signature cover it as they cover
                # the data (which row is which file depends on it).
                files.append(tmp / MANIFEST_FILE)
                manifest, meta[MANIFEST_FIELD] = encoded_manifest(built.manifest)
                _write_file(tmp / MANIFEST_FILE, manifest, self._file_mode, sync=False)
            if self.signing_key is not None:
                # Signed over a cryptographic digest: xxh3 is no defence against a writer
                # crafting other bytes with the same checksum.
                meta["data"]["sha256"] = digest = sha256_of(tmp / DATA_FILE)
                meta[SIGNATURE_FIELD] = sign(meta, digest, self.signing_key)
            meta_bytes = json.dumps(meta, indent=1).encode()
            _write_file(tmp / META_FILE, meta_bytes, self._file_mode, sync=False)
            # Every file on disk, then their names, before the entry is renamed into sight:
            # a crash never publishes an entry whose files are not all there. The data file
            # is synced here too (a build need not: a clean file's fsync costs nothing).
            _fsync_files(files)
            if self.shared:  # the function folder's mode: the umask and setgid applied
                os.chmod(tmp, stat.S_IMODE(os.stat(function_dir).st_mode))
            _fsync_dir(tmp)
            replace_folder(tmp, self.entry_path(fdir, key), replace=replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(function_dir)
        return built.size

    def rewrite_meta(self, fdir: str, key: str, meta: dict[str, Any]) -> None:
        """Atomically replace an entry's metadata (used to clear verified racy-file records)."""
        if self.signing_key is not None:  # the signature covers every field
            digest = str(meta["data"].get("sha256", ""))  # set: the entry was loaded signed
            meta = {**meta, SIGNATURE_FIELD: sign(meta, digest, self.signing_key)}
        atomic_write_bytes(
            self.entry_path(fdir, key) / META_FILE,
            json.dumps(meta, indent=1).encode(),
            self._file_mode,
        )

    def lock(self, fdir: str, key: str, timeout: float | None) -> Any:
        """A cross-process lock for computing ``key``, released if its holder dies: a kernel
        lock (filelock), or on a shared mount (NFS, Lustre…) a lease that a holder on another
        machine renews while it lives (see :mod:`cachedload.mount`)."""
        self.make_folder(fdir)
        return entry_lock(self._beside(fdir, key, LOCK_SUFFIX), timeout, self._lock_mode)

    # -- the cache directory itself ----------------------------------------------------------
    def make_folder(self, fdir: str) -> Path:
        """Create the cache directory (tagged, with any missing parent) and a function folder
        in it; private ones 0700 (see the class). Returns the function folder."""
        if not self._tagged:
            missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
            for folder in reversed(missing):  # e.g. a missing ~/.cache: private too
                with contextlib.suppress(FileExistsError):
                    folder.mkdir(self._dir_mode)
            with contextlib.suppress(FileExistsError):  # an old cache is tagged on first write
                write_new_file(self.path / TAG_FILE, TAG_CONTENT, self._file_mode)
            self._tagged = True
        function_dir = self.folder(fdir)
        try:
            function_dir.mkdir(self._dir_mode)
        except FileExistsError:
            pass
        except FileNotFoundError:
            if self.path.exists():
                raise
            # The cache directory was deleted since this root made it (rm -rf of the cache
            # while a program runs): make it, and tag it, again.
            self._tagged = False
            return self.make_folder(fdir)
        return function_dir

    def check_deletable(self, fdir: str = "") -> None:
        """Raise unless this folder is a cache cachedload made (``CACHEDIR.TAG``), or does not
        exist: nothing is deleted elsewhere (a typo in ``--cache-dir``, ``$CACHEDLOAD_DIR``
        one level too high…); and unless it (the function folder ``fdir``, if given and
        there) can be written: checked before the first deletion, not found halfway through.

        Raises:
            NotACacheDirectoryError: it exists without the tag.
            ReadOnlyCacheError: it cannot be written (a read-only mount, permissions).
        """
        if self._tagged or is_tagged(self.path):
            self._tagged = True
        elif os.path.lexists(self.path):
            raise NotACacheDirectoryError(self.path)
        self._check_writable(fdir)

    def _check_writable(self, fdir: str = "") -> None:
        """Raise ``ReadOnlyCacheError`` if the cache directory (its function folder ``fdir``,
        if given and there) exists and cannot be written."""
        effective = os.access in os.supports_effective_ids
        for folder in (self.path / fdir, self.path) if fdir else (self.path,):
            if os.access(folder, os.W_OK, effective_ids=effective):
                return
            if folder.exists():
                raise ReadOnlyCacheError(self.path)

    def untrusted(self, fdir: str) -> str | None:
        """Why this private cache must not be used (owned by another user, a symlinked
        function folder, or writable by group or others), or None.

        Checked on every call, cheaply: the cache directory and the function folder are
        stat'ed (two system calls) and compared with what was found trustworthy before; only
        when either changed (another user with write access to a parent folder can rename the
        cache away and put a folder of their own in its place) are they checked again. Files
        are checked once more when opened (:meth:`load`), so a swap between this check and a
        read is refused too.
        """
        if self.shared:
            return None
        folder = self.folder(fdir)
        link, root_info, folder_info = _lstat(self.path), _stat(self.path), _lstat(folder)
        if root_info is None or link is None:
            return None  # created by this process when storing, then checked again
        if stat.S_ISLNK(link.st_mode) and link.st_uid != os.geteuid():
            # A symlink another user made where the cache directory should be (a parent
            # folder they can write): whatever it points to now, they choose what it will.
            return f"{self.path} is a symlink owned by uid {link.st_uid}, not by this user"
        identity = (_identity(root_info), None if folder_info is None else _identity(folder_info))
        if self._trusted.get(fdir) == identity:
            return None
        for path, info in ((self.path, root_info), (folder, folder_info)):
            if info is None:
                return None  # the function folder: made when storing, checked next call
            if stat.S_ISLNK(info.st_mode):
                return f"{path} is a symlink"
            if info.st_uid != os.geteuid():
                return (
                    f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
                )
            if info.st_mode & 0o022:
                return f"{path} is writable by group or others (mode {stat.filemode(info.st_mode)})"
        if len(self._trusted) > 64:
            self._trusted.clear()
        self._trusted[fdir] = identity
        return None

    # -- removing ------------------------------------------------------------------------------
    def remove(self, fdir: str, key: str) -> None:
        """Delete an entry: first move it out of sight atomically, then delete its files (and
        its records of uses)."""
        self.check_deletable(fdir)
        entry = self.entry_path(fdir, key)
        if os.path.lexists(entry) and not is_entry_shaped(entry):
            logger.warning("%s is not a cachedload entry: unknown, left alone", entry)
            return
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

        self._check_writable(fdir)  # no lock can be made in a read-only cache: say that
        lock_path = self._beside(fdir, key, LOCK_SUFFIX)
        lock = entry_lock(lock_path, 0, self._lock_mode)
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
        lock = entry_lock(lock_path, 0, self._lock_mode)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def remove_leftovers(self, fdir: str) -> int:
        """Delete temporary files of dead writers (same host, pid gone) or older than an hour;
        return how many."""
        self.check_deletable(fdir)
        now, removed = time.time(), 0
        try:
            with os.scandir(self.path / fdir) as found:
                children = list(found)
        except (FileNotFoundError, NotADirectoryError):
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

    def remove_stale_records(self, fdir: str) -> int:
        """Delete the lock, owner and usage records of entries that no longer exist; return
        how many keys were tidied. A key whose lock another process holds is skipped: its
        entry is being computed (it has no folder yet) or removed."""
        self.check_deletable(fdir)
        folder = self.path / fdir
        try:
            with os.scandir(folder) as found:
                names = {child.name for child in found}
        except (FileNotFoundError, NotADirectoryError):
            return 0
        keys = {key for key in map(record_key, names) if key is not None and key not in names}
        tidied = 0
        if SUPERSEDED_FILE in names and not any(map(is_entry_name, names)):
            # Records of entries deleted as superseded, with no newer entry left to explain.
            _unlink_file(folder / SUPERSEDED_FILE)
        for key in sorted(keys):
            with self.claim(fdir, key) as free:  # the lock file goes when the claim ends
                if not free or os.path.lexists(folder / key):
                    continue
                for suffix in (OWNER_SUFFIX, USED_SUFFIX, SYNCED_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        self._beside(fdir, key, suffix).unlink()
                tidied += 1
        return tidied

    def leftovers(self) -> list[Leftover]:
        """The temporary and trash folders (or files) in the function folders, with their
        sizes, and whether their writer is gone."""
        now, found = time.time(), []
        for fdir in self.function_dirs():
            try:
                with os.scandir(self.path / fdir) as children:
                    names = [child.name for child in children if is_leftover_name(child.name)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in sorted(names):
                path = self.path / fdir / name
                info = _lstat(path)
                if info is not None:  # else removed meanwhile
                    dead = leftover_is_dead(name, info.st_mtime, now)
                    found.append(Leftover(path, _tree_size(str(path)), dead))
        return found

    def tidy(self) -> None:
        """Remove dead writers' leftovers and records of entries that no longer exist, then
        function folders left empty."""
        self.check_deletable()
        for fdir in self.function_dirs():
            self.remove_leftovers(fdir)
            self.remove_stale_records(fdir)
            with contextlib.suppress(OSError):
                (self.path / fdir).rmdir()  # only succeeds when empty

    def tidy_copies(self) -> None:
        """Tidy the read-through copies under ``remote/``; remove those (and ``remote/``) left
        empty."""
        copies = self.local_copies()  # each copy checks its own tag; rmdir only empties
        for copy, _ in copies:
            copy.tidy()
            path = Path(copy.location)
            with contextlib.suppress(OSError):
                if not any(name not in (URL_FILE, TAG_FILE) for name in os.listdir(path)):
                    (path / URL_FILE).unlink(missing_ok=True)
                    (path / TAG_FILE).unlink(missing_ok=True)
                    path.rmdir()
        if copies:
            with contextlib.suppress(OSError):
                (self.path / LOCAL_COPIES_DIR).rmdir()

    def verify(self, *, checksums: bool = True) -> Iterator[Checked]:
        """Check every entry folder: metadata, data file size and (``checksums``) checksum.
        Every other folder met (not an entry, a leftover or a local copy) is named too, as
        ``unknown``: not ours, left alone."""
        for fdir in self.function_dirs():
            for found in scan_entry_dirs(self.path / fdir):
                function, problem = fdir, found.problem
                if found.meta is not None:
                    function = str(found.meta.get("function", fdir))
                    problem = self._data_problem(found.path / DATA_FILE, found.meta, checksums)
                    problem = problem or _manifest_file_problem(found.path, found.meta)
                    problem = problem or _rows_problem(found.path, found.meta)
                unknown = problem is not None and not is_entry_shaped(found.path)
                if unknown:
                    problem = f"{problem}; not shaped as an entry: unknown, left alone"
                size = _folder_size(found.path)
                yield Checked(found.path, function, size, problem, unknown=unknown)
            yield from self._strays(self.path / fdir, fdir)
        yield from self._strays(self.path, "")

    def _strays(self, folder: Path, fdir: str) -> Iterator[Checked]:
        """The folders (and symlinks to one) in ``folder`` (the cache directory, or one of
        its function folders: ``fdir``) that are not cachedload's, as unknown."""
        for child in _children(folder):
            name, path = child.name, Path(child.path)
            if fdir:  # in a function folder: entries (real folders) and leftovers are ours
                if is_leftover_name(name) or (
                    is_entry_name(name) and child.is_dir(follow_symlinks=False)
                ):
                    continue
            elif is_leftover_name(name):
                continue
            elif name == LOCAL_COPIES_DIR and child.is_dir(follow_symlinks=False):
                yield from self._stray_copies(path)
                continue
            elif is_function_dir_name(name) and child.is_dir(follow_symlinks=False):
                continue
            if child.is_dir(follow_symlinks=False) or (child.is_symlink() and path.is_dir()):
                yield self._unknown(path, fdir, "not a cachedload folder")

    def _stray_copies(self, remote: Path) -> Iterator[Checked]:
        """The folders under ``remote/`` that are not local copies (no ``CACHEDIR.TAG``)."""
        copies = {Path(copy.location) for copy, _ in self.local_copies()}
        for child in _children(remote):
            path = Path(child.path)
            if (
                path not in copies
                and not is_leftover_name(child.name)
                and (child.is_dir(follow_symlinks=False) or child.is_symlink())
            ):
                yield self._unknown(path, LOCAL_COPIES_DIR, "not a local copy (no CACHEDIR.TAG)")

    @staticmethod
    def _unknown(path: Path, function: str, why: str) -> Checked:
        return Checked(path, function, _tree_size(str(path)), f"{why}: unknown, left alone",
                       unknown=True)  # fmt: skip

    @staticmethod
    def _data_problem(data: Path, meta: dict[str, Any], checksums: bool) -> str | None:
        try:
            fd, info = open_regular(data)  # never a FIFO, a device or through a symlink
        except FileNotFoundError:
            return "data file is missing"
        except OSError as error:
            return f"cannot read the entry ({error})"
        try:
            problem = size_problem(info.st_size, meta)
            if problem is None and checksums:
                expected = {"xxh3": meta["data"]["xxh3"]}
                if isinstance(meta["data"].get("sha256"), str):
                    expected["sha256"] = meta["data"]["sha256"]
                hash_descriptor(fd, info.st_size, expected)
        except DigestMismatch:
            return "data file checksum does not match"
        except (OSError, EOFError) as error:
            return f"cannot read the entry ({error})"
        finally:
            os.close(fd)
        return problem or _layout_problem(data)


def _layout_problem(data: Path) -> str | None:
    """What is wrong with a data file's index (its arrays outside its data area), or None."""
    try:
        return serialize.layout_problem(data)
    except OSError as error:
        return f"cannot read the entry ({error})"


def _rows_problem(entry: Path, meta: dict[str, Any]) -> str | None:
    """A per-item entry's rows' files, as its data file names them (covered by its checksum),
    must be its manifest's files less those its metadata lists as skipped (a rebuild reads
    them so): else the problem."""
    if not isinstance(meta.get("items"), dict):
        return None
    try:
        manifest = read_entry_manifest(entry, meta)
        value = serialize.load(entry / DATA_FILE, mmap_mode="r", safe_types=())
    except CorruptEntry:
        return None  # reported as a manifest problem
    except Exception as error:  # a damaged or crafted file raises many types
        return f"cannot read the rows' files ({type(error).__name__}: {error})"
    paths, left_out = getattr(value, "paths", None), getattr(value, "skipped", ())
    skipped = [path for path, _ in skipped_items(meta)]
    if not isinstance(paths, tuple) or sorted(skipped) != sorted(left_out):
        return "the skipped files in the metadata are not those the data file left out"
    files = sorted([*paths, *skipped])
    if manifest is not None and not any(
        [record[0] for record in records] == files for records in manifest.values()
    ):
        return "the manifest does not list the files of the data file's rows"
    return None


def _manifest_file_problem(entry: Path, meta: dict[str, Any]) -> str | None:
    """What is wrong with an entry's manifest by its metadata's record (none: not checked)."""
    if MANIFEST_FIELD not in meta:
        return None  # written before manifests were recorded
    try:
        raw = read_regular_file(entry / MANIFEST_FILE, limit=manifest_read_limit(meta))
        return manifest_problem(raw, meta)
    except FileNotFoundError:
        return "manifest is missing"
    except OSError as error:
        return f"cannot read the manifest ({error})"
