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

Hits are served from a local copy of the entry (a plain :class:`~cachedload.store.Store`), so
``mmap_mode`` works and a second hit on a node costs no network request.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import xxhash

from cachedload.backends import URL_FILE
from cachedload.backends.lease import ObjectLease
from cachedload.backends.objects import (
    Capabilities,
    ObjectStore,
    PreconditionFailed,
    Progress,
    probe,
)
from cachedload.errors import ConditionalWritesWarning, warn_at_caller
from cachedload.reading import ReadAhead
from cachedload.store import (
    DATA_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_FILE,
    CorruptEntry,
    EntryInfo,
    Store,
    atomic_write_bytes,
)

__all__ = ["EntryReplaced", "RemoteStore", "capabilities", "parse_meta"]

logger = logging.getLogger("cachedload")

_HOST = socket.gethostname().replace("-", "_")
_CAPABILITIES: dict[str, Capabilities] = {}
_CAPABILITIES_LOCK = threading.Lock()
_PROGRESS_MIN_BYTES = 64 * 1024 * 1024
_USED_CAP = 1_000_000
_SIZE_TAG, _CHECKSUM_TAG = "cachedload-size", "cachedload-xxh3"


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


def parse_meta(raw: bytes, where: Path, url: str) -> dict[str, Any]:
    """Check and decode an entry's ``meta.json``, as :meth:`Store.read_meta` does.

    Raises:
        CorruptEntry: invalid JSON, another format version, or no data description.
    """
    try:
        meta = json.loads(raw)
    except ValueError as error:
        raise CorruptEntry(where, f"{url}: metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CorruptEntry(where, f"{url}: metadata format {found!r} is not {FORMAT_VERSION}")
    data = meta.get("data")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("size"), int)
        or not isinstance(data.get("xxh3"), str)
        or not isinstance(data.get("file"), str)
        or "/" in data["file"]
        or data["file"].startswith(".")
    ):
        raise CorruptEntry(where, f"{url}: metadata lacks a valid data file description")
    return meta


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


class _HashingSink:
    """Writes to a file, counting and hashing what goes through."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        written: int = self.handle.write(data)
        return written


class RemoteStore(Store):
    """The entries of one function in a remote cache, read through a local copy.

    ``cache_dir``, ``function_dir``, :meth:`entry_path` and :meth:`lock_path` are those of the
    local copy (where a hit is loaded from); :attr:`objects` holds the shared entries.

    Args:
        objects: the object store at the cache URL.
        function_dir: the function's folder name (the same locally and remotely).
        local_root: the local read-through cache directory.
        lease_seconds: how long a crashed computation blocks others before they take over.
        usage_interval: a node records a use of an entry in the bucket at most this often.
    """

    def __init__(
        self,
        objects: ObjectStore,
        function_dir: str,
        local_root: Path,
        *,
        lease_seconds: float = 30.0,
        usage_interval: float = 3600.0,
    ) -> None:
        super().__init__(local_root, function_dir)
        self.objects = objects
        self.remote_dir = function_dir
        self.lease_seconds = lease_seconds
        self.usage_interval = usage_interval
        self._local_read: tuple[str, int] | None = None

    # -- names ---------------------------------------------------------------------------------
    def object_key(self, key: str, name: str = "") -> str:
        """The object key of a file of an entry (or of the entry's "folder" if no name)."""
        return f"{self.remote_dir}/{key}/{name}"

    def entry_url(self, key: str) -> str:
        """The URL of the entry's folder in the bucket."""
        return f"{self.objects.url}/{self.object_key(key)}"

    def read_remote_meta(self, key: str) -> dict[str, Any] | None:
        """The entry's metadata in the bucket (None if not published).

        Raises:
            CorruptEntry: it is not valid.
        """
        raw = self.objects.get(self.object_key(key, META_FILE))
        if raw is None:
            return None
        return parse_meta(raw, self.entry_path(key), self.entry_url(key))

    def _local_meta(self, key: str) -> dict[str, Any] | None:
        try:
            return super().read_meta(key)
        except CorruptEntry as error:
            logger.info("dropping the damaged local copy %s: %s", error.path, error.reason)
            super().remove(key)
            return None

    # -- reading -------------------------------------------------------------------------------
    def read_meta(self, key: str) -> dict[str, Any] | None:
        """The entry's metadata: from the local copy if there is one, else from the bucket."""
        local = self._local_meta(key)
        if local is not None:
            self._local_read = (key, id(local))  # load_value need not read it again
            return local
        self._local_read = None
        return self.read_remote_meta(key)

    def load_value(
        self,
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
        local = meta if self._local_read == (key, id(meta)) else self._local_meta(key)
        if local is not None:
            try:
                return super().load_value(
                    key, local, mmap_mode=mmap_mode, verify=verify, ahead=ahead
                )
            except CorruptEntry as error:
                logger.info("dropping the damaged local copy %s: %s", error.path, error.reason)
                super().remove(key)
            found = self.read_remote_meta(key)
            if found is None:
                raise EntryReplaced(errno.ENOENT, "entry vanished", self.entry_url(key))
            meta = found
        local = self._fetch(key, meta)
        return super().load_value(key, local, mmap_mode=mmap_mode, verify=False)

    def has_data(self, key: str, meta: dict[str, Any]) -> bool:
        """True if the entry's data is here or in the bucket with the size ``meta`` says."""
        try:
            size = os.stat(self.entry_path(key) / DATA_FILE).st_size
        except FileNotFoundError:
            found = self.objects.head(self.object_key(key, meta["data"]["file"]))
            size = -1 if found is None else found.size
        return bool(size == meta["data"]["size"])

    def _mark_local_root(self) -> None:
        """Name the remote cache in the local copy's root, once (``cachedload ls`` shows it)."""
        marker = self.cache_dir / URL_FILE
        if not marker.exists():
            with contextlib.suppress(OSError):
                atomic_write_bytes(marker, self.objects.url.encode())

    def _fetch(self, key: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Download an entry into the local copy (once per node); return the local metadata."""
        from filelock import FileLock, Timeout

        self.function_dir.mkdir(parents=True, exist_ok=True)
        self._mark_local_root()
        fetching = FileLock(str(self.function_dir / f"{key}.fetch"))
        try:
            fetching.acquire()
        except (OSError, Timeout) as error:  # e.g. a file system without flock
            logger.debug("fetching %s without the local lock: %s", key, error)
        try:
            local = self._local_meta(key)
            if local is not None and local["data"]["xxh3"] == meta["data"]["xxh3"]:
                return local  # another process on this node fetched it meanwhile
            return self._download_entry(key, meta)
        finally:
            if fetching.is_locked:
                fetching.release()

    def _download_entry(self, key: str, meta: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        super().remove_leftovers()  # downloads of processes that died meanwhile
        tmp = self.function_dir / f".tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            data, expected = meta["data"], meta["data"]["size"]
            try:
                with (
                    open(tmp / DATA_FILE, "wb") as handle,
                    _progress(f"download {key[:12]}", expected) as progress,
                ):
                    sink = _HashingSink(handle)
                    self.objects.download(
                        self.object_key(key, data["file"]), sink, progress=progress
                    )
                    handle.flush()
                    os.fsync(handle.fileno())
            except FileNotFoundError:
                self._raise_bad(key, meta, "data object is missing")
            if sink.size != expected:
                self._raise_bad(key, meta, f"data is {sink.size} bytes, metadata says {expected}")
            if sink.hasher.hexdigest() != data["xxh3"]:
                self._raise_bad(key, meta, "data checksum does not match the metadata's")
            manifest = self.objects.get(self.object_key(key, MANIFEST_FILE))
            if manifest is not None:
                (tmp / MANIFEST_FILE).write_bytes(manifest)
            local = {**meta, "data": {**data, "file": DATA_FILE}}
            (tmp / META_FILE).write_bytes(json.dumps(local, indent=1).encode())
            self._publish_local(tmp, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            "downloaded %s [%s]: %s bytes in %.2f s",
            self.remote_dir,
            key[:12],
            expected,
            time.perf_counter() - started,
        )
        return local

    def _raise_bad(self, key: str, meta: dict[str, Any], problem: str) -> NoReturn:
        """A download did not match ``meta``: a miss if the entry changed, else corrupt."""
        current = self.read_remote_meta(key)
        if current is None or current["data"] != meta["data"]:
            raise EntryReplaced(errno.ENOENT, f"entry replaced while read ({problem})", key)
        raise CorruptEntry(self.entry_path(key), f"{self.entry_url(key)}: {problem}")

    def _publish_local(self, tmp: Path, key: str) -> None:
        entry = self.entry_path(key)
        if entry.exists():
            super().remove(key)
        try:
            os.rename(tmp, entry)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise

    # -- usage records ---------------------------------------------------------------------------
    def record_hit(self, key: str) -> None:
        """Count a hit locally; tell the bucket at most once per ``usage_interval`` per node."""
        super().record_hit(key)
        synced = self.function_dir / f"{key}.synced"
        try:
            used = os.stat(self.function_dir / f"{key}.used").st_size
            try:
                if time.time() - os.stat(synced).st_mtime < self.usage_interval:
                    return
                previous = int(synced.read_text() or 0)
            except (FileNotFoundError, ValueError):
                previous = 0
            self.add_uses(key, max(used - previous, 1))
            synced.write_text(str(used))
        except OSError as error:
            logger.debug("cannot record the use of %s in %s: %s", key, self.objects.url, error)

    def add_uses(self, key: str, count: int) -> None:
        """Add ``count`` to the entry's hits in the bucket and mark it used now (best effort:
        concurrent updates may lose counts, never the last-used time)."""
        name = f"{self.remote_dir}/{key}.used"
        info = self.objects.head(name)
        total = min((info.size if info else 0) + count, _USED_CAP)
        self.objects.put(name, b"." * total)

    # -- writing -------------------------------------------------------------------------------
    def lock(self, key: str, timeout: float | None) -> Any:
        """A lease in the bucket when its server honours conditional writes; else a lock on
        this node only (processes on other machines may then compute the same entry)."""
        self.function_dir.mkdir(parents=True, exist_ok=True)
        found = capabilities(self.objects)
        if not (found.if_none_match and self.objects.has_server_clock):
            return super().lock(key, timeout)
        meta_key = self.object_key(key, META_FILE)
        return ObjectLease(
            self.objects,
            f"{self.remote_dir}/{key}.lease",
            timeout=timeout,
            duration=self.lease_seconds,
            atomic_takeover=found.if_match,
            done=lambda: self.objects.head(meta_key) is not None,
        )

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
        """Store the entry in the local copy, then publish it to the bucket.

        If another process published the same key first, its entry is kept (both are results
        of the same inputs). With ``replace``, the published entry is deleted first.

        Raises:
            OSError: the local copy or the bucket cannot be written.
        """
        size = super().save(key, value, meta, compress=compress, manifest=manifest, replace=replace)
        self._mark_local_root()
        entry = self.entry_path(key)
        local = json.loads((entry / META_FILE).read_bytes())
        try:
            self.publish(key, local, entry, replace=replace)
        except OSError as error:
            message = f"kept on this machine, not published to {self.objects.url}: {error}"
            raise OSError(error.errno, message) from error
        return size

    def publish(self, key: str, meta: dict[str, Any], entry: Path, *, replace: bool) -> None:
        """Upload the local entry folder ``entry`` (data, manifest, then metadata)."""
        found = capabilities(self.objects)
        meta_key = self.object_key(key, META_FILE)
        if replace:
            self.unpublish(key)
        elif self.objects.head(meta_key) is not None:
            logger.info("%s was published by another process first: keeping it", key[:12])
            return
        started = time.perf_counter()
        data = dict(meta["data"])
        name = DATA_FILE if found.if_none_match else f"result-{uuid.uuid4().hex}.joblib"
        try:
            self._upload_data(key, name, entry / DATA_FILE, data, found.if_none_match)
        except PreconditionFailed:
            existing = self.objects.head(self.object_key(key, name))
            if existing is not None and existing.metadata.get(_SIZE_TAG) == str(existing.size):
                # Another writer uploaded its data, maybe then died before its metadata: its
                # object is complete and describes itself, so publish it.
                data = {"size": existing.size, "xxh3": existing.metadata.get(_CHECKSUM_TAG, "")}
            else:
                name = f"result-{uuid.uuid4().hex}.joblib"
                self._upload_data(key, name, entry / DATA_FILE, data, False)
        if (entry / MANIFEST_FILE).exists():
            with contextlib.suppress(PreconditionFailed):
                self.objects.put(
                    self.object_key(key, MANIFEST_FILE),
                    (entry / MANIFEST_FILE).read_bytes(),
                    if_none_match=found.if_none_match,
                )
        remote = {**meta, "data": {**data, "file": name}}
        body = json.dumps(remote, indent=1).encode()
        try:
            if not found.if_none_match and not replace and self.objects.head(meta_key):
                raise PreconditionFailed(meta_key)
            self.objects.put(meta_key, body, if_none_match=found.if_none_match)
        except PreconditionFailed:
            logger.info("%s was published by another process first: keeping it", key[:12])
            if name != DATA_FILE:
                self.objects.delete(self.object_key(key, name))
            return
        logger.info(
            "uploaded %s [%s]: %s bytes in %.2f s",
            self.remote_dir,
            key[:12],
            data["size"],
            time.perf_counter() - started,
        )

    def _upload_data(
        self, key: str, name: str, path: Path, data: dict[str, Any], if_none_match: bool
    ) -> None:
        tags = {_SIZE_TAG: str(data["size"]), _CHECKSUM_TAG: str(data["xxh3"])}
        with open(path, "rb") as handle, _progress(f"upload {key[:12]}", data["size"]) as bar:
            self.objects.put(
                self.object_key(key, name),
                handle,
                size=data["size"],
                if_none_match=if_none_match,
                metadata=tags,
                progress=bar,
            )

    def unpublish(self, key: str) -> None:
        """Delete the entry from the bucket: metadata first (readers then see no entry), then
        the data and manifest."""
        names = {DATA_FILE, MANIFEST_FILE}
        try:
            meta = self.read_remote_meta(key)
        except CorruptEntry:
            meta = None
        if meta is not None:
            names.add(meta["data"]["file"])
        self.objects.delete(self.object_key(key, META_FILE))
        for name in sorted(names):
            self.objects.delete(self.object_key(key, name))

    def rewrite_meta(self, key: str, meta: dict[str, Any]) -> None:
        """Rewrite the local copy's metadata (the bucket's entry is immutable)."""
        if (self.entry_path(key) / META_FILE).exists():
            super().rewrite_meta(key, {**meta, "data": {**meta["data"], "file": DATA_FILE}})

    def remove(self, key: str) -> None:
        """Delete the entry from the bucket and from the local copy."""
        self.unpublish(key)
        self.objects.delete(f"{self.remote_dir}/{key}.used")
        super().remove(key)
        with contextlib.suppress(FileNotFoundError):
            (self.function_dir / f"{key}.synced").unlink()

    # -- listing ---------------------------------------------------------------------------------
    def entries(self) -> Iterator[EntryInfo]:
        """Every readable entry of this function in the bucket (``path``: the local copy's)."""
        from cachedload.backends.listing import remote_entries

        yield from remote_entries(self)

    def remove_leftovers(self) -> None:
        """Delete dead writers' leftovers in the local copy (the bucket's: see
        :func:`cachedload.backends.listing.remove_remote_leftovers`)."""
        super().remove_leftovers()
