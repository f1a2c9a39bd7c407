"""One interface for a cache root, local or remote: what the decorator and the management
functions may ask of where entries live.

Two implementations: :class:`cachedload.store.LocalRoot` (a POSIX cache directory) and
:class:`cachedload.backends.remote.RemoteRoot` (an object store read through a local copy);
:func:`cachedload.backends.open_root` picks one. Every operation names an entry by its
function folder (``fdir``, see :func:`cachedload.entry.function_dir_name`) and its key. The
entry format itself (names, metadata schema, scans) is :mod:`cachedload.entry`'s.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cachedload import serialize
from cachedload.entry import OWNER_SUFFIX, CorruptEntry, read_regular_file, write_new_file
from cachedload.reading import ReadAhead

__all__ = [
    "Built",
    "CacheRoot",
    "Checked",
    "CorruptEntry",
    "EntryInfo",
    "Hit",
    "Leftover",
    "Lookup",
    "Miss",
    "Reusable",
]

logger = logging.getLogger("cachedload")


@dataclass(frozen=True)
class EntryInfo:
    """One stored entry, as listed by :meth:`CacheRoot.entries`.

    ``path`` is the entry's folder (for a remote cache: where this machine's copy is or would
    be); ``url`` is the entry in a remote cache.
    """

    key: str
    path: Path
    meta: dict[str, Any]
    size_bytes: int
    hits: int
    last_used: float
    url: str | None = None


@dataclass(frozen=True)
class Checked:
    """The outcome of checking one entry (:meth:`CacheRoot.verify`)."""

    path: Path
    function: str
    size_bytes: int
    problem: str | None
    url: str | None = None
    #: Damaged and not shaped as an entry: not ours, never deleted.
    unknown: bool = False


@dataclass(frozen=True)
class Leftover:
    """A temporary or trash folder (or file) left in a cache directory, not an entry
    (:meth:`CacheRoot.leftovers`).

    ``dead``: its writer is gone (or it is older than an hour): ``prune``, ``clear`` and
    ``verify --fix`` remove it; else it is being written right now.
    """

    path: Path
    size_bytes: int
    dead: bool


@dataclass(slots=True)  # made on every hit: not frozen, which costs a setattr per field
class Hit:
    """A usable stored entry: its value and metadata."""

    value: Any
    meta: dict[str, Any]

    @property
    def size(self) -> int:
        """The data file's size in bytes."""
        return int(self.meta["data"]["size"])


@dataclass(frozen=True)
class Miss:
    """No usable entry. ``replace``: a stale or damaged entry sits at the key (``stale``: its
    recently modified sources changed; ``corrupt``: what is wrong with it)."""

    replace: bool = False
    stale: bool = False
    corrupt: CorruptEntry | None = None


class Reusable(NamedTuple):
    """A checked entry's data, to copy rows from: the file at ``path`` holds exactly the
    bytes that were checked, as long as its :func:`~cachedload.reading.file_identity` is
    ``identity`` (``None``: a private copy, or a private cache's own file); ``safe_types``
    to read its index with (``None``: unrestricted)."""

    path: Path
    safe_types: tuple[type, ...] | None
    identity: tuple[int, ...] | None


@dataclass(frozen=True)
class Built:
    """What a build function of :meth:`CacheRoot.put_built` wrote: its data file's size and
    checksum, and the entry's metadata and manifest."""

    size: int
    checksum: str
    meta: dict[str, Any]
    manifest: dict[str, Any] | None = None


Lookup = Hit | Miss
_MISS = Miss()


class CacheRoot(abc.ABC):
    """Where entries live. Each method is safe against other processes using the same root."""

    #: The root, for messages: a folder or a URL.
    location: str
    #: Entries load with the restricted unpickler allowing these classes besides data; None:
    #: entries are trusted (a private cache).
    safe_types: tuple[type, ...] | None = None
    #: Entries are signed with this key, and only signed ones load (a shared cache).
    signing_key: bytes | None = None

    # -- names ---------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def local(self) -> CacheRoot:
        """The part of this root on this machine (itself, or a remote cache's local copy)."""

    @abc.abstractmethod
    def folder(self, fdir: str) -> Path:
        """The local folder of a function folder (whether or not it exists)."""

    def entry_path(self, fdir: str, key: str) -> Path:
        """The local folder of an entry (whether or not it exists)."""
        return self.folder(fdir) / key

    def entry_url(self, fdir: str, key: str) -> str | None:
        """The entry in a remote cache; None for a local one."""
        return None

    @abc.abstractmethod
    def function_dirs(self) -> list[str]:
        """The function folders, sorted by name."""

    def local_copies(self) -> list[tuple[CacheRoot, str]]:
        """The read-through copies of remote caches kept here, with their URLs."""
        return []

    def untrusted(self, fdir: str) -> str | None:
        """Why this cache must not be used by this user (another user could write it), or
        None (the default: nothing to check)."""
        return None

    def tidy_copies(self) -> None:
        """Tidy the copies of :meth:`local_copies`; remove those left empty."""
        return  # none here, unless a subclass keeps copies

    def leftovers(self) -> list[Leftover]:
        """Temporary and trash folders of writers, live or dead (none by default: a remote
        cache's leftovers are objects that :meth:`tidy` removes)."""
        return []

    # -- reading -------------------------------------------------------------------------------
    @abc.abstractmethod
    def entries(self, fdir: str) -> Iterator[EntryInfo]:
        """Every readable entry of a function folder (damaged ones are left out)."""

    @abc.abstractmethod
    def read_meta(self, fdir: str, key: str) -> dict[str, Any] | None:
        """An entry's metadata; None if there is no entry.

        Raises:
            CorruptEntry: the entry exists but its metadata is invalid.
        """

    @abc.abstractmethod
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
        """Load an entry whose metadata :meth:`read_meta` returned; ``verify``: check the data's
        checksum too; ``ahead``: its data being read by :meth:`read_ahead`.

        Raises:
            CorruptEntry: the data does not match the metadata, or cannot be loaded.
        """

    @abc.abstractmethod
    def read_ahead(self, fdir: str, key: str) -> ReadAhead:
        """Start reading an entry's data in a background thread (see :meth:`load`)."""

    @abc.abstractmethod
    def record_hit(self, fdir: str, key: str) -> None:
        """Note one use of an entry (best effort)."""

    @abc.abstractmethod
    def has_data(self, fdir: str, key: str, meta: dict[str, Any]) -> bool:
        """True if the entry's data is there, of the size ``meta`` records."""

    @abc.abstractmethod
    def reusable(
        self, fdir: str, key: str, meta: dict[str, Any], *, verify: bool
    ) -> contextlib.AbstractContextManager[Reusable]:
        """Check an entry on this machine whose rows a per-item build will copy, as a hit
        checks it (size; checksum with ``verify``; signature), and hold what was checked
        while the rows are copied (see :class:`Reusable`).

        Raises:
            CorruptEntry: a check failed.
            OSError: its data file cannot be read.
        """

    @abc.abstractmethod
    def manifest(
        self, fdir: str, key: str, meta: dict[str, Any], *, columns: bool = False
    ) -> dict[str, Any] | None:
        """An entry's per-file manifest (see :func:`~cachedload.entry.decode_manifest`, which
        ``columns`` is passed to), checked against the entry's metadata ``meta``
        (:func:`~cachedload.entry.parse_manifest`); None if it has none.

        Raises:
            CorruptEntry: it does not match ``meta``, or is unreadable.
        """

    def local_entry(self, fdir: str, key: str, meta: dict[str, Any]) -> Path:
        """The entry's folder on this machine, its files in it (a remote entry is downloaded
        into the local copy first, once per node): for reading its files directly, e.g. the
        rows an incremental build copies.

        Raises:
            CorruptEntry: a download does not match ``meta``.
            OSError: it cannot be read (``FileNotFoundError``: it changed or vanished).
        """
        return self.entry_path(fdir, key)

    def get(
        self,
        fdir: str,
        key: str,
        *,
        fresh: Callable[[dict[str, Any]], bool],
        mmap_mode: str | None,
        verify: bool,
        ahead: ReadAhead | None = None,
    ) -> Hit | Miss:
        """Look an entry up and load it: a :class:`Hit`, or a :class:`Miss`.

        Args:
            fresh: the caller's check of the metadata (recently modified sources unchanged);
                False makes a stale miss.
        """
        try:
            meta = self.read_meta(fdir, key)
            if meta is None:
                return _MISS
            if not fresh(meta):
                return Miss(replace=True, stale=True)
            value = self.load(fdir, key, meta, mmap_mode=mmap_mode, verify=verify, ahead=ahead)
        except CorruptEntry as error:
            return Miss(replace=True, corrupt=error)
        except OSError as error:  # e.g. an unreadable cache directory
            logger.info("cannot read cache entry %s: %s", self.entry_path(fdir, key), error)
            return _MISS
        self.record_hit(fdir, key)
        return Hit(value, meta)

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
        """Publish an entry holding ``value`` atomically (through :meth:`put_built`); return
        its data's size. An entry already published for ``key`` is kept unless ``replace``.

        Raises:
            OSError: the root cannot be written.
            UnpicklableResult: ``value`` cannot be pickled.
        """

        def build(data: Path) -> Built:
            size, checksum = serialize.dump(value, data, compress=compress)
            return Built(size, checksum, meta, manifest)

        size = self.put_built(fdir, key, build, replace=replace)
        assert size is not None  # build never returns None
        return size

    @abc.abstractmethod
    def put_built(
        self,
        fdir: str,
        key: str,
        build: Callable[[Path], Built | None],
        *,
        replace: bool = False,
    ) -> int | None:
        """Publish an entry whose data file ``build(path)`` writes at ``path`` (inside the
        temporary folder of the entry being written), atomically as :meth:`put` does; return
        its data's size, or None if ``build`` returned None (nothing is published). Every
        file of the entry is made durable before it is published: ``build`` need not fsync.

        Raises:
            OSError: the root cannot be written.
            Whatever ``build`` raises (the temporary folder is removed).
        """

    @abc.abstractmethod
    def rewrite_meta(self, fdir: str, key: str, meta: dict[str, Any]) -> None:
        """Replace an entry's metadata (to clear verified records of racy files)."""

    @abc.abstractmethod
    def lock(self, fdir: str, key: str, timeout: float | None) -> Any:
        """The single-flight lock of an entry, not yet acquired: ``acquire(timeout=…)`` and
        ``release()``, raising ``filelock.Timeout``."""

    @contextlib.contextmanager
    def single_flight(
        self, fdir: str, key: str, timeout: float | None, *, name: str = ""
    ) -> Iterator[bool]:
        """Hold the entry's lock while computing it; yield False if ``timeout`` ran out (go on
        anyway: publishing is atomic, so not waiting only costs duplicate work). Logs a wait,
        naming the holder (``name``: the loader, for the log).

        Raises:
            OSError: no lock can be made (the root is not writable).
        """
        lock = self.lock(fdir, key, timeout)
        owner_file = self.folder(fdir) / f"{key}{OWNER_SUFFIX}"
        if not self._acquire(lock, owner_file, key, timeout, name):
            yield False
            return
        with contextlib.suppress(OSError):  # never through a planted symlink
            write_new_file(
                owner_file, f"pid {os.getpid()} on {platform.node()}".encode(), replace=True
            )
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                owner_file.unlink()
            lock.release()

    @staticmethod
    def _acquire(lock: Any, owner_file: Path, key: str, timeout: float | None, name: str) -> bool:
        from filelock import Timeout  # filelock loads on the first miss, not on import

        try:
            lock.acquire(timeout=0)
            return True
        except Timeout:
            pass
        try:  # a record someone else may write: bounded, never a FIFO's
            owner = read_regular_file(owner_file, limit=200).decode("utf-8", "replace")
            owner = "".join(c if c.isprintable() else "?" for c in owner) or "another process"
        except OSError:
            owner = "another process"
        logger.info("waiting for %s [%s], being computed by %s", name, key[:12], owner)
        started = time.perf_counter()
        try:
            lock.acquire()
        except Timeout:
            logger.warning(
                "gave up waiting for %s after %s s; computing it here too", name, timeout
            )
            return False
        logger.info("waited %.2f s for %s", time.perf_counter() - started, name)
        return True

    # -- removing ------------------------------------------------------------------------------
    @abc.abstractmethod
    def remove(self, fdir: str, key: str) -> None:
        """Delete an entry (its metadata first: readers then see no entry)."""

    @abc.abstractmethod
    def claim(self, fdir: str, key: str) -> contextlib.AbstractContextManager[bool]:
        """Hold an entry against others without waiting, to delete it: yields False if another
        process computes or replaces it."""

    @abc.abstractmethod
    def is_busy(self, fdir: str, key: str) -> bool:
        """True if another process holds the entry's lock."""

    @abc.abstractmethod
    def remove_leftovers(self, fdir: str) -> int:
        """Delete what dead writers left in a function folder; return how many."""

    @abc.abstractmethod
    def tidy(self) -> None:
        """Delete dead writers' leftovers (and, locally, function folders left empty)."""

    @abc.abstractmethod
    def verify(self, *, checksums: bool = True) -> Iterator[Checked]:
        """Check every entry: metadata, data size, and with ``checksums`` the data's xxh3."""
