"""A cache in an object store (S3, or another fsspec URL) with a local read-through copy.

Remote layout, under the cache URL (``s3://bucket/prefix``)::

    <function dir>/<key>/result.joblib    the data, uploaded first (``result-<uuid>.joblib`` on
                                          servers that ignore conditional writes)
    <function dir>/<key>/manifest         per-file list of each source
    <function dir>/<key>/meta.json        uploaded last: the entry exists once this exists
    <function dir>/<key>.lease            single-flight lease (see lease.py)
    <function dir>/<key>.used             size = hits, LastModified = last use (best effort)

Publishing never rests on the lease. Every object is created with ``If-None-Match: *``, the
metadata last, and never overwritten: a writer that loses (HTTP 412) keeps the published entry,
since entries are immutable and keyed by their inputs, so both results are equally right. A
deliberate replacement deletes the metadata first (every reader then sees no entry), then the
data, then publishes anew. A reader that fetched the metadata just before checks the downloaded
data's size and checksum: a mismatch under changed metadata is a miss, under unchanged metadata
a corrupt entry (healed by recomputing).

Hits are served from a local copy of the entry (a :class:`~cachedload.store.LocalRoot`), so
``mmap_mode`` works and a second hit on a node costs no network request. Listing, verifying and
tidying the bucket are here too: object stores have no access times, so "last used" is the
cache's own record, the ``<key>.used`` object each node rewrites when it first reads an entry
and then at most hourly (its ``LastModified`` is the last use, its size the number of hits).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

from cachedload.backends.lease import ObjectLease
from cachedload.backends.objects import (
    Capabilities,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    Progress,
    probe,
)
from cachedload.entry import (
    DATA_FILE,
    FETCH_SUFFIX,
    LEASE_SUFFIX,
    LEFTOVER_MAX_AGE,
    MANIFEST_FIELD,
    MANIFEST_FILE,
    META_FILE,
    SYNCED_SUFFIX,
    URL_FILE,
    USED_SUFFIX,
    CorruptEntry,
    HashingWriter,
    manifest_problem,
    parse_manifest,
    parse_meta,
    read_regular_file,
    size_problem,
    temporary_name,
    write_new_file,
)
from cachedload.errors import ConditionalWritesWarning, warn_at_caller
from cachedload.reading import ReadAhead
from cachedload.root import Built, CacheRoot, Checked, EntryInfo, Reusable
from cachedload.store import LocalRoot, atomic_write_bytes, replace_folder

__all__ = ["EntryReplaced", "RemoteRoot", "capabilities"]

logger = logging.getLogger("cachedload")

_CAPABILITIES: dict[str, Capabilities] = {}
_CAPABILITIES_LOCK = threading.Lock()
_PROGRESS_MIN_BYTES = 64 * 1024 * 1024
_USED_CAP = 1_000_000
_SIZE_TAG, _CHECKSUM_TAG = "cachedload-size", "cachedload-xxh3"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SHA256_TAG = "cachedload-sha256"  # of signed entries' data (what their signature covers)
_FETCHERS = 8  # metadata requests in flight when listing a function folder


class EntryReplaced(FileNotFoundError):
    """The remote entry changed or vanished while it was being read: a plain miss."""


def capabilities(objects: ObjectStore) -> Capabilities:
    """What ``objects``' server honours, probed on first use in this process (then cached).

    Warns once (:class:`~cachedload.ConditionalWritesWarning`) if it ignores conditional writes.
    """
    with _CAPABILITIES_LOCK:
        found = _CAPABILITIES.get(objects.identity)
        if found is None:
            found = _CAPABILITIES[objects.identity] = probe(objects)
            logger.info("%s honours conditional writes: %s", objects.url, found)
            if not found.if_none_match:
                warn_at_caller(
                    f"cachedload: {objects.url} does not honour conditional writes "
                    "(If-None-Match); entries are still published safely, but processes on "
                    "different machines may compute the same entry at the same time",
                    ConditionalWritesWarning,
                )
        return found


@contextlib.contextmanager
def _progress(description: str, total: int) -> Iterator[Progress | None]:
    """A progress bar on stderr for large transfers, when it is a terminal."""
    if total < _PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, leave=False
    ) as bar:
        yield bar.update


class RemoteRoot(CacheRoot):
    """A remote cache: entries in an object store, read through a local copy.

    :meth:`entry_path` is the local copy's (where a hit is loaded from); :attr:`objects` holds
    the shared entries, at the same ``<function dir>/<key>/`` names.

    Args:
        objects: the object store at the cache URL.
        copy: the local read-through copy.
        lease_seconds: how long a crashed computation blocks others before they take over.
        usage_interval: a node records a use of an entry in the bucket at most this often.
    """

    def __init__(
        self,
        objects: ObjectStore,
        copy: LocalRoot,
        *,
        lease_seconds: float = 30.0,
        usage_interval: float = 3600.0,
    ) -> None:
        self.objects = objects
        self.copy = copy
        self.location = objects.url
        self.lease_seconds = lease_seconds
        self.usage_interval = usage_interval
        # (fdir, key, id(meta)) of the metadata read_meta last took from the local copy.
        self._local_read: tuple[str, str, int] | None = None

    def __repr__(self) -> str:
        return f"RemoteRoot({self.location!r}, copy={self.copy.location!r})"

    # -- names ---------------------------------------------------------------------------------
    @property
    def local(self) -> LocalRoot:
        """The local read-through copy."""
        return self.copy

    @staticmethod
    def object_key(fdir: str, key: str, name: str = "") -> str:
        """The object key of a file of an entry (or of the entry's "folder" if no name)."""
        return f"{fdir}/{key}/{name}"

    def folder(self, fdir: str) -> Path:
        """A function folder of the local copy."""
        return self.copy.folder(fdir)

    def entry_url(self, fdir: str, key: str) -> str:
        """The URL of the entry's folder in the bucket."""
        return f"{self.objects.url}/{self.object_key(fdir, key)}"

    def function_dirs(self) -> list[str]:
        """The function folders in the bucket."""
        return [name for name in self.objects.list_dirs("") if not name.startswith(".")]

    def read_remote_meta(self, fdir: str, key: str) -> dict[str, Any] | None:
        """The entry's metadata in the bucket (None if not published).

        Raises:
            CorruptEntry: it is not valid.
        """
        raw = self.objects.get(self.object_key(fdir, key, META_FILE))
        if raw is None:
            return None
        return parse_meta(raw, self.entry_path(fdir, key), source=self.entry_url(fdir, key))

    def _local_meta(self, fdir: str, key: str) -> dict[str, Any] | None:
        try:
            return self.copy.read_meta(fdir, key)
        except CorruptEntry as error:
            logger.info("dropping the damaged local copy %s: %s", error.path, error.reason)
            self.copy.remove(fdir, key)
            return None

    def untrusted(self, fdir: str) -> str | None:
        """Why the local copy must not be used (it is checked as a private cache directory
        is: another user who can write it could plant entries in it), or None."""
        return self.copy.untrusted(fdir)

    # -- reading -------------------------------------------------------------------------------
    def read_meta(self, fdir: str, key: str) -> dict[str, Any] | None:
        """The entry's metadata: from the local copy if there is one, else from the bucket."""
        local = self._local_meta(fdir, key)
        if local is not None:
            self._local_read = (fdir, key, id(local))  # load need not read it again
            return local
        self._local_read = None
        return self.read_remote_meta(fdir, key)

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
        """Load the entry from the local copy, downloading it first if needed.

        Raises:
            CorruptEntry: the bucket's data does not match its unchanged metadata.
            EntryReplaced: the entry changed or vanished while being read (a plain miss).
            OSError: the bucket cannot be read.
        """
        fresh = self._local_read == (fdir, key, id(meta))
        local = meta if fresh else self._local_meta(fdir, key)
        if local is not None:
            try:
                return self.copy.load(
                    fdir, key, local, mmap_mode=mmap_mode, verify=verify, ahead=ahead
                )
            except CorruptEntry as error:
                logger.info("dropping the damaged local copy %s: %s", error.path, error.reason)
                self.copy.remove(fdir, key)
            found = self.read_remote_meta(fdir, key)
            if found is None:
                raise EntryReplaced(errno.ENOENT, "entry vanished", self.entry_url(fdir, key))
            meta = found
        local = self._fetch(fdir, key, meta)
        return self.copy.load(fdir, key, local, mmap_mode=mmap_mode, verify=False)

    def read_ahead(self, fdir: str, key: str) -> ReadAhead:
        """Start reading the local copy's data (see :meth:`LocalRoot.read_ahead`)."""
        return self.copy.read_ahead(fdir, key)

    def reusable(
        self, fdir: str, key: str, meta: dict[str, Any], *, verify: bool
    ) -> contextlib.AbstractContextManager[Reusable]:
        """Checked in the local copy (:meth:`local_entry` downloads the entry there first)."""
        return self.copy.reusable(fdir, key, meta, verify=verify)

    def has_data(self, fdir: str, key: str, meta: dict[str, Any]) -> bool:
        """True if the entry's data is here or in the bucket with the size ``meta`` says."""
        try:
            size = os.stat(self.entry_path(fdir, key) / DATA_FILE).st_size
        except FileNotFoundError:
            found = self.objects.head(self.object_key(fdir, key, meta["data"]["file"]))
            size = -1 if found is None else found.size
        return size_problem(size, meta) is None

    def manifest(
        self, fdir: str, key: str, meta: dict[str, Any], *, columns: bool = False
    ) -> dict[str, Any] | None:
        """An entry's per-file manifest: from the local copy, else from the bucket; checked
        against ``meta`` either way (see :meth:`LocalRoot.manifest`)."""
        if (self.entry_path(fdir, key) / MANIFEST_FILE).exists():
            with contextlib.suppress(CorruptEntry):  # an older copy: the bucket's is checked
                found = self.copy.manifest(fdir, key, meta, columns=columns)
                if found is not None:
                    return found
        raw = self.objects.get(self.object_key(fdir, key, MANIFEST_FILE))
        if raw is None:
            if MANIFEST_FIELD in meta:
                raise CorruptEntry(self.entry_path(fdir, key), "manifest is missing")
            return None
        signed = self.copy.signing_key is not None
        where = self.entry_path(fdir, key)
        return parse_manifest(raw, meta, where, signed=signed, columns=columns)

    def local_entry(self, fdir: str, key: str, meta: dict[str, Any]) -> Path:
        """The entry in the local copy, downloaded first if it is not there (or differs)."""
        self._fetch(fdir, key, meta)
        return self.entry_path(fdir, key)

    def _mark_local_root(self) -> None:
        """Name the remote cache in the local copy's root, once (``cachedload ls`` shows it)."""
        marker = self.copy.path / URL_FILE
        if not marker.exists():
            with contextlib.suppress(OSError):
                atomic_write_bytes(marker, self.objects.url.encode())

    def _fetch(self, fdir: str, key: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Download an entry into the local copy (once per node); return the local metadata."""
        from filelock import FileLock, Timeout

        self.copy.make_folder(fdir)  # private (0700) and tagged, as a local cache's folders
        self._mark_local_root()
        fetching = FileLock(str(self.copy.path / fdir / f"{key}{FETCH_SUFFIX}"))
        try:
            fetching.acquire()
        except (OSError, Timeout) as error:  # e.g. a file system without flock
            logger.debug("fetching %s without the local lock: %s", key, error)
        try:
            local = self._local_meta(fdir, key)
            if local is not None and local["data"]["xxh3"] == meta["data"]["xxh3"]:
                return local  # another process on this node fetched it meanwhile
            return self._download_entry(fdir, key, meta)
        finally:
            if fetching.is_locked:
                fetching.release()

    def _download_entry(self, fdir: str, key: str, meta: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        self.copy.make_folder(fdir)  # tagged, private
        self.copy.remove_leftovers(fdir)  # downloads of processes that died meanwhile
        tmp = self.copy.path / fdir / temporary_name()
        tmp.mkdir(0o700)
        try:
            self._download_data(fdir, key, meta, tmp / DATA_FILE)
            manifest = self.objects.get(self.object_key(fdir, key, MANIFEST_FILE))
            if manifest is not None:
                write_new_file(tmp / MANIFEST_FILE, manifest)
            local = {**meta, "data": {**meta["data"], "file": DATA_FILE}}
            write_new_file(tmp / META_FILE, json.dumps(local, indent=1).encode())
            if self.entry_path(fdir, key).exists():
                self.copy.remove(fdir, key)
            replace_folder(tmp, self.entry_path(fdir, key), replace=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            "downloaded %s [%s]: %s bytes in %.2f s",
            fdir,
            key[:12],
            meta["data"]["size"],
            time.perf_counter() - started,
        )
        return local

    def _download_data(self, fdir: str, key: str, meta: dict[str, Any], path: Path) -> None:
        data = meta["data"]
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
            with (
                open(os.open(path, flags, 0o600), "wb") as handle,  # only this user's
                _progress(f"download {key[:12]}", data["size"]) as progress,
            ):
                sink = HashingWriter(handle)
                self.objects.download(
                    self.object_key(fdir, key, data["file"]), sink, progress=progress
                )
                handle.flush()
                os.fsync(handle.fileno())
        except FileNotFoundError:
            self._raise_bad(fdir, key, meta, "data object is missing")
        problem = size_problem(sink.size, meta, "data")
        if problem is not None:
            self._raise_bad(fdir, key, meta, problem)
        if sink.hexdigest() != data["xxh3"]:
            self._raise_bad(fdir, key, meta, "data checksum does not match the metadata's")

    def _raise_bad(self, fdir: str, key: str, meta: dict[str, Any], problem: str) -> NoReturn:
        """A download did not match ``meta``: a miss if the entry changed, else corrupt."""
        current = self.read_remote_meta(fdir, key)
        if current is None or current["data"] != meta["data"]:
            raise EntryReplaced(errno.ENOENT, f"entry replaced while read ({problem})", key)
        raise CorruptEntry(self.entry_path(fdir, key), f"{self.entry_url(fdir, key)}: {problem}")

    # -- usage records ---------------------------------------------------------------------------
    def record_hit(self, fdir: str, key: str) -> None:
        """Count a hit locally; tell the bucket at most once per ``usage_interval`` per node."""
        self.copy.record_hit(fdir, key)
        synced = self.copy.path / fdir / f"{key}{SYNCED_SUFFIX}"
        try:
            used = os.stat(self.copy.path / fdir / f"{key}{USED_SUFFIX}").st_size
            try:
                if time.time() - os.stat(synced).st_mtime < self.usage_interval:
                    return
                previous = int(read_regular_file(synced, limit=32) or 0)
            except (FileNotFoundError, ValueError):
                previous = 0
            self.add_uses(fdir, key, max(used - previous, 1))
            write_new_file(synced, str(used).encode(), replace=True)
        except OSError as error:
            logger.debug("cannot record the use of %s in %s: %s", key, self.objects.url, error)

    def add_uses(self, fdir: str, key: str, count: int) -> None:
        """Add ``count`` to the entry's hits in the bucket and mark it used now (best effort:
        concurrent updates may lose counts, never the last-used time)."""
        name = f"{fdir}/{key}{USED_SUFFIX}"
        info = self.objects.head(name)
        total = min((info.size if info else 0) + count, _USED_CAP)
        self.objects.put(name, b"." * total)

    # -- writing -------------------------------------------------------------------------------
    def lock(self, fdir: str, key: str, timeout: float | None) -> Any:
        """A lease in the bucket when its server honours conditional writes; else a lock on
        this node only (processes on other machines may then compute the same entry)."""
        self.copy.make_folder(fdir)
        found = capabilities(self.objects)
        if not (found.if_none_match and self.objects.has_server_clock):
            return self.copy.lock(fdir, key, timeout)
        meta_key = self.object_key(fdir, key, META_FILE)
        return ObjectLease(
            self.objects,
            f"{fdir}/{key}{LEASE_SUFFIX}",
            timeout=timeout,
            duration=self.lease_seconds,
            atomic_takeover=found.if_match,
            done=lambda: self.objects.head(meta_key) is not None,
        )

    def put_built(
        self,
        fdir: str,
        key: str,
        build: Callable[[Path], Built | None],
        *,
        replace: bool = False,
    ) -> int | None:
        """Build the entry in the local copy, then publish it to the bucket (as :meth:`put`).

        Raises:
            OSError: the local copy or the bucket cannot be written.
        """
        size = self.copy.put_built(fdir, key, build, replace=replace)
        if size is not None:
            self._publish_copy(fdir, key, replace=replace)
        return size

    def _publish_copy(self, fdir: str, key: str, *, replace: bool) -> None:
        """Publish the entry just written to the local copy."""
        self._mark_local_root()
        entry = self.entry_path(fdir, key)
        local = json.loads((entry / META_FILE).read_bytes())
        try:
            self.publish(fdir, key, local, entry, replace=replace)
        except OSError as error:
            message = f"kept on this machine, not published to {self.objects.url}: {error}"
            raise OSError(error.errno, message) from error

    def publish(
        self, fdir: str, key: str, meta: dict[str, Any], entry: Path, *, replace: bool
    ) -> None:
        """Upload the local entry folder ``entry`` (data, manifest, then metadata)."""
        found = capabilities(self.objects)
        meta_key = self.object_key(fdir, key, META_FILE)
        if replace:
            self.unpublish(fdir, key)
        elif self.objects.head(meta_key) is not None:
            logger.info("%s was published by another process first: keeping it", key[:12])
            return
        started = time.perf_counter()
        name, data = self._upload_data(fdir, key, entry / DATA_FILE, meta["data"], found)
        if (entry / MANIFEST_FILE).exists():
            with contextlib.suppress(PreconditionFailed):
                self.objects.put(
                    self.object_key(fdir, key, MANIFEST_FILE),
                    (entry / MANIFEST_FILE).read_bytes(),
                    if_none_match=found.if_none_match,
                )
        body = json.dumps({**meta, "data": {**data, "file": name}}, indent=1).encode()
        try:
            if not found.if_none_match and not replace and self.objects.head(meta_key):
                raise PreconditionFailed(meta_key)
            self.objects.put(meta_key, body, if_none_match=found.if_none_match)
        except PreconditionFailed:
            logger.info("%s was published by another process first: keeping it", key[:12])
            if name != DATA_FILE:
                self.objects.delete(self.object_key(fdir, key, name))
            return
        logger.info(
            "uploaded %s [%s]: %s bytes in %.2f s",
            fdir,
            key[:12],
            data["size"],
            time.perf_counter() - started,
        )

    def _upload_data(
        self, fdir: str, key: str, path: Path, data: dict[str, Any], found: Capabilities
    ) -> tuple[str, dict[str, Any]]:
        """Upload the data file; return its object's name and description."""
        name = DATA_FILE if found.if_none_match else f"result-{uuid.uuid4().hex}.joblib"
        data = dict(data)
        try:
            self._upload_file(fdir, key, name, path, data, found.if_none_match)
        except PreconditionFailed:
            existing = self.objects.head(self.object_key(fdir, key, name))
            if existing is not None and existing.metadata.get(_SIZE_TAG) == str(existing.size):
                # Another writer uploaded its data, maybe then died before its metadata: its
                # object is complete and describes itself, so publish it.
                data = {"size": existing.size, "xxh3": existing.metadata.get(_CHECKSUM_TAG, "")}
                if _SHA256_TAG in existing.metadata:
                    data["sha256"] = existing.metadata[_SHA256_TAG]
            else:
                name = f"result-{uuid.uuid4().hex}.joblib"
                self._upload_file(fdir, key, name, path, data, False)
        return name, data

    def _upload_file(
        self, fdir: str, key: str, name: str, path: Path, data: dict[str, Any], if_none_match: bool
    ) -> None:
        tags = {_SIZE_TAG: str(data["size"]), _CHECKSUM_TAG: str(data["xxh3"])}
        if "sha256" in data:
            tags[_SHA256_TAG] = str(data["sha256"])
        with open(path, "rb") as handle, _progress(f"upload {key[:12]}", data["size"]) as bar:
            self.objects.put(
                self.object_key(fdir, key, name),
                handle,
                size=data["size"],
                if_none_match=if_none_match,
                metadata=tags,
                progress=bar,
            )

    def unpublish(self, fdir: str, key: str) -> None:
        """Delete the entry from the bucket: metadata first (readers then see no entry), then
        the data and manifest."""
        names = {DATA_FILE, MANIFEST_FILE}
        try:
            meta = self.read_remote_meta(fdir, key)
        except CorruptEntry:
            meta = None
        if meta is not None:
            names.add(meta["data"]["file"])
        self.objects.delete(self.object_key(fdir, key, META_FILE))
        for name in sorted(names):
            self.objects.delete(self.object_key(fdir, key, name))

    def rewrite_meta(self, fdir: str, key: str, meta: dict[str, Any]) -> None:
        """Rewrite the local copy's metadata (the bucket's entry is immutable)."""
        if (self.entry_path(fdir, key) / META_FILE).exists():
            local = {**meta, "data": {**meta["data"], "file": DATA_FILE}}
            self.copy.rewrite_meta(fdir, key, local)

    # -- removing ------------------------------------------------------------------------------
    def remove(self, fdir: str, key: str) -> None:
        """Delete the entry from the bucket and from the local copy."""
        self.unpublish(fdir, key)
        self.objects.delete(f"{fdir}/{key}{USED_SUFFIX}")
        self.copy.remove(fdir, key)

    def is_busy(self, fdir: str, key: str) -> bool:
        """True if a live lease on the entry exists (another machine computes or replaces it)."""
        info = self.objects.head(f"{fdir}/{key}{LEASE_SUFFIX}")
        if info is None:
            return False
        return info.age is None or info.age <= self.lease_seconds

    @contextlib.contextmanager
    def claim(self, fdir: str, key: str) -> Iterator[bool]:
        """False if another machine holds the entry's lease (nothing is held: the bucket's
        entry is deleted metadata first, so a reader sees a complete entry or none)."""
        yield not self.is_busy(fdir, key)

    def remove_leftovers(self, fdir: str, *, max_age: float = LEFTOVER_MAX_AGE) -> int:
        """Delete objects of a function folder that belong to no entry and are older than
        ``max_age``: data of writers that died before publishing, losers' uploads on servers
        without conditional writes, expired leases, usage records of deleted entries. Returns
        how many."""
        found = list(self.objects.iter_objects(f"{fdir}/"))
        published = self._published(fdir, found)
        now, removed = time.time(), 0
        for info in found:
            rest = info.key[len(fdir) + 1 :]
            key, slash, name = rest.partition("/")
            if slash:
                keep = key in published and name in published[key]
            elif rest.endswith(LEASE_SUFFIX):
                keep = now - info.last_modified <= max(max_age, self.lease_seconds)
            else:
                keep = rest.rsplit(".", 1)[0] in published
            if keep or now - info.last_modified <= max_age:
                continue
            logger.debug("removing leftover %s/%s", self.objects.url, info.key)
            self.objects.delete(info.key)
            removed += 1
        return removed

    def _published(self, fdir: str, found: list[ObjectInfo]) -> dict[str, set[str]]:
        """The files of each published entry among the objects ``found`` in ``fdir``."""
        published: dict[str, set[str]] = {}
        for info in found:
            key, slash, name = info.key[len(fdir) + 1 :].partition("/")
            if not (slash and name == META_FILE):
                continue
            try:
                meta = self.read_remote_meta(fdir, key)
            except CorruptEntry:
                continue  # verify --fix deals with damaged entries
            if meta is not None:
                published[key] = {META_FILE, MANIFEST_FILE, meta["data"]["file"]}
        return published

    def tidy(self) -> None:
        """Remove the leftovers of every function folder in the bucket."""
        for fdir in self.function_dirs():
            self.remove_leftovers(fdir)

    # -- listing ---------------------------------------------------------------------------------
    def _files(self, fdir: str) -> tuple[dict[str, dict[str, ObjectInfo]], dict[str, ObjectInfo]]:
        """The objects of each entry of ``fdir`` by key, and the usage records by key."""
        files: dict[str, dict[str, ObjectInfo]] = {}
        used: dict[str, ObjectInfo] = {}
        for info in self.objects.iter_objects(f"{fdir}/"):
            rest = info.key[len(fdir) + 1 :]
            key, slash, name = rest.partition("/")
            if slash:
                files.setdefault(key, {})[name] = info
            elif rest.endswith(USED_SUFFIX):
                used[rest.removesuffix(USED_SUFFIX)] = info
        return files, used

    def _meta_or_none(self, fdir: str, key: str) -> dict[str, Any] | None:
        try:
            return self.read_remote_meta(fdir, key)
        except CorruptEntry:
            return None  # verify finds it

    def entries(self, fdir: str) -> Iterator[EntryInfo]:
        """The readable entries of a function folder in the bucket (their metadata is fetched
        a few at a time: one request each)."""
        files, used = self._files(fdir)
        keys = sorted(key for key, names in files.items() if META_FILE in names)
        with ThreadPoolExecutor(max_workers=_FETCHERS) as pool:
            metas = list(pool.map(lambda key: self._meta_or_none(fdir, key), keys))
        for key, meta in zip(keys, metas, strict=True):
            if meta is None:
                continue
            size = sum(info.size for info in files[key].values())
            use = used.get(key)
            last_used = use.last_modified if use else float(meta.get("created", 0.0))
            yield EntryInfo(
                key,
                self.entry_path(fdir, key),
                meta,
                size,
                use.size if use else 0,
                last_used,
                url=self.entry_url(fdir, key),
            )

    def verify(self, *, checksums: bool = True) -> Iterator[Checked]:
        """Check every entry in the bucket: metadata, data size and (``checksums``) the xxh3
        of the data, streamed from the bucket without keeping it."""
        for fdir in self.function_dirs():
            files, _ = self._files(fdir)
            for key, objects in sorted(files.items()):
                if META_FILE not in objects:
                    continue  # being written, or a leftover: not an entry
                function, problem = fdir, None
                try:
                    meta = self.read_remote_meta(fdir, key)
                    if meta is None:
                        continue
                    function = str(meta.get("function", function))
                    problem = self._data_problem(fdir, key, meta, checksums)
                    problem = problem or self._manifest_problem(fdir, key, meta)
                except CorruptEntry as error:
                    problem = error.reason
                except OSError as error:
                    problem = f"cannot read the entry ({error})"
                size = sum(info.size for info in objects.values())
                path, url = self.entry_path(fdir, key), self.entry_url(fdir, key)
                yield Checked(path, function, size, problem, url)

    def _data_problem(
        self, fdir: str, key: str, meta: dict[str, Any], checksums: bool
    ) -> str | None:
        name = self.object_key(fdir, key, meta["data"]["file"])
        if not checksums:
            info = self.objects.head(name)
            return (
                "data object is missing"
                if info is None
                else size_problem(info.size, meta, "data object")
            )
        sink = HashingWriter()
        try:
            self.objects.download(name, sink)
        except FileNotFoundError:
            return "data object is missing"
        problem = size_problem(sink.size, meta, "data object")
        if problem is None and sink.hexdigest() != meta["data"]["xxh3"]:
            problem = "data object checksum does not match"
        return problem

    def _manifest_problem(self, fdir: str, key: str, meta: dict[str, Any]) -> str | None:
        """What is wrong with an entry's manifest object by its metadata's record."""
        if MANIFEST_FIELD not in meta:
            return None  # written before manifests were recorded
        raw = self.objects.get(self.object_key(fdir, key, MANIFEST_FILE))
        if raw is None:
            return "manifest object is missing"
        return manifest_problem(raw, meta)
