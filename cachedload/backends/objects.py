"""The small object-store interface a remote cache is built on, and its fsspec implementation.

An object store holds whole objects under keys: they are written in one request (so a reader sees
all of an object or none of it), read, listed and deleted. That is all a remote cache needs, plus
two conditional writes when the server honours them:

* ``if_none_match`` — create the object only if no object has the key (S3 ``If-None-Match: *``);
* ``if_match`` — replace the object only if it still has the given ETag (S3 ``If-Match``).

A write whose condition fails raises :class:`PreconditionFailed`. :func:`probe` finds out whether a
server honours them, since some accept the headers and silently overwrite.

This module knows nothing about cache entries.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import errno
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

__all__ = [
    "Capabilities",
    "FsspecObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "PreconditionFailed",
    "Sink",
    "probe",
]

logger = logging.getLogger("cachedload")

#: Called with the number of bytes moved since the last call (drives a progress bar).
Progress = Callable[[int], None]

_PROBE_DIR = ".cachedload-probe"


class Sink(Protocol):
    """Where a download goes: anything with ``write(bytes)``."""

    def write(self, data: bytes, /) -> int: ...


class PreconditionFailed(FileExistsError):
    """A conditional write lost: the object exists (``if_none_match``) or has changed
    (``if_match``). HTTP 412, or 409 when another conditional write to the key is in flight."""

    def __init__(self, key: str, detail: str = "precondition failed") -> None:
        super().__init__(errno.EEXIST, detail, key)
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.strerror))


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object.

    Attributes:
        key: the object's key, relative to the store's root.
        size: its size in bytes.
        etag: its entity tag (for ``if_match``), or ``""`` when the store has none.
        last_modified: when it was last written, in seconds since the epoch, by the *server's*
            clock.
        server_time: the server's clock when it answered (the response's ``Date``), or None.
        metadata: the object's user metadata (``x-amz-meta-*``), lower-case keys.
    """

    key: str
    size: int
    etag: str = ""
    last_modified: float = 0.0
    server_time: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def age(self) -> float | None:
        """Seconds since the last write, judged by the server's clock alone (None if unknown)."""
        if self.server_time is None or not self.last_modified:
            return None
        return self.server_time - self.last_modified


@dataclass(frozen=True)
class Capabilities:
    """Which conditional writes a server honours (found by :func:`probe`)."""

    if_none_match: bool
    if_match: bool


class ObjectStore(abc.ABC):
    """Objects under one root URL (``s3://bucket/prefix``); keys are relative to it.

    Attributes:
        url: the root URL, without a trailing slash.
        has_server_clock: True if :meth:`head` reports the server's time (``server_time``), which
            lease expiry is judged by.
    """

    url: str
    has_server_clock: bool = False

    @property
    def identity(self) -> str:
        """What distinguishes this store from others in the process (probe results are kept
        per identity): its URL, and for S3 its endpoint."""
        return self.url

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's description, or None if there is no such object."""

    @abc.abstractmethod
    def download(self, key: str, sink: Sink, *, progress: Progress | None = None) -> int:
        """Stream the object into ``sink``; return its size.

        Raises:
            FileNotFoundError: there is no such object.
        """

    @abc.abstractmethod
    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Write an object in one piece (a reader never sees part of it); return its ETag.

        ``data`` is bytes or a binary file positioned at its start, of ``size`` bytes.

        Raises:
            PreconditionFailed: a condition did not hold; nothing was written.
            NotImplementedError: the store cannot express the condition.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object; no error if it is already gone.

        Raises:
            PreconditionFailed: ``if_match`` was given and the object has another ETag.
        """

    @abc.abstractmethod
    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (``server_time`` is None)."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """The names of the "folders" directly below ``prefix`` (a key prefix ending in ``/``)."""


def probe(store: ObjectStore) -> Capabilities:
    """Find out whether ``store`` honours conditional writes, by trying them on a scratch key.

    Writes a probe object twice with ``if_none_match`` (the second write must fail), then once
    with ``if_match`` on a wrong ETag (it must fail too), and deletes it. A server that rejects
    the headers outright counts as not honouring them.

    Raises:
        OSError: the store cannot be written at all (no permission, unreachable…).
    """
    key = f"{_PROBE_DIR}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        try:
            store.put(key, b"1", if_none_match=True)
        except (NotImplementedError, PreconditionFailed) as error:
            logger.debug("probe of %s: first conditional write refused (%s)", store.url, error)
            store.put(key, b"1")
            return Capabilities(if_none_match=False, if_match=False)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            logger.debug("probe of %s: conditional write rejected (%s)", store.url, error)
            store.put(key, b"1")
            return Capabilities(if_none_match=False, if_match=False)
        try:
            store.put(key, b"2", if_none_match=True)
            if_none_match = False
        except PreconditionFailed:
            if_none_match = True
        except (NotImplementedError, OSError):
            if_none_match = False
        if_match = False
        if if_none_match:
            try:
                store.put(key, b"3", if_match='"0123456789abcdef0123456789abcdef"')
            except PreconditionFailed:
                if_match = True
            except (NotImplementedError, OSError) as error:
                logger.debug("probe of %s: If-Match rejected (%s)", store.url, error)
        return Capabilities(if_none_match=if_none_match, if_match=if_match)
    finally:
        try:
            store.delete(key)
        except OSError as error:
            logger.debug("cannot delete probe object %s: %s", key, error)


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return float(value.timestamp())
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return float(parsed.timestamp())
        except ValueError:
            return 0.0
    return 0.0


def _copy(source: BinaryIO, sink: Sink, progress: Progress | None) -> int:
    total = 0
    while chunk := source.read(1 << 20):
        sink.write(chunk)
        total += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return total


class FsspecObjectStore(ObjectStore):
    """Any fsspec file system used as an object store (``gs://``, ``az://``, ``memory://``…).

    Creating an object only if absent uses fsspec's exclusive-create mode (``"xb"``) where the
    implementation supports it; :func:`probe` tells. There is no ``if_match`` and no server
    clock, so single flight across machines (leases) is not available on these stores.
    """

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def get(self, key: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        return data

    def head(self, key: str) -> ObjectInfo | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return self._info(key, info)

    @staticmethod
    def _info(key: str, info: dict[str, Any]) -> ObjectInfo:
        modified = info.get("LastModified", info.get("mtime", info.get("created")))
        etag = str(info.get("ETag", info.get("etag", "")) or "")
        return ObjectInfo(key, int(info.get("size") or 0), etag, _timestamp(modified))

    def download(self, key: str, sink: Sink, *, progress: Progress | None = None) -> int:
        with self.fs.open(self._path(key), "rb") as source:
            return _copy(source, sink, progress)

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        size: int | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> str:
        if if_match is not None:
            raise NotImplementedError("fsspec stores cannot replace an object conditionally")
        path = self._path(key)
        parent = self.fs._parent(path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(path, "xb" if if_none_match else "wb") as sink:
                if isinstance(data, bytes):
                    sink.write(data)
                    if progress is not None:
                        progress(len(data))
                else:
                    _copy(data, sink, progress)
        except FileExistsError:
            raise PreconditionFailed(key) from None
        except OSError as error:
            # s3fs turns a 412 whose reply lacks the Condition field into OSError(EINVAL).
            if if_none_match and error.errno == errno.EINVAL and self.head(key) is not None:
                raise PreconditionFailed(key) from None
            raise
        except ValueError as error:  # an implementation without an exclusive mode
            if if_none_match:
                raise NotImplementedError(str(error)) from error
            raise
        return ""

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        if if_match is not None:
            raise NotImplementedError("fsspec stores cannot delete an object conditionally")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix).rstrip("/")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return
        for path, info in sorted(found.items()):
            relative = path.lstrip("/")[len(self.root.lstrip("/")) :].lstrip("/")
            if relative.startswith(prefix) and info.get("type") != "directory":
                yield self._info(relative, info)

    def list_dirs(self, prefix: str) -> list[str]:
        try:
            children = self.fs.ls(self._path(prefix).rstrip("/"), detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            child["name"].rstrip("/").rsplit("/", 1)[-1]
            for child in children
            if child.get("type") == "directory"
        )
