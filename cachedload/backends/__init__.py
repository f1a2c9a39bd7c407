"""Where entries live when the cache is shared between machines.

* an object store named by a URL — ``s3://bucket/prefix`` (boto3, the ``s3`` extra), or any other
  fsspec URL — is a :class:`~cachedload.backends.remote.RemoteStore`: entries published in the
  bucket with conditional writes, read through a local copy;
* a shared POSIX mount (NFS, Lustre, a FUSE mount) is an ordinary cache directory; only its lock
  changes (:mod:`cachedload.backends.mount`).

Nothing here is imported by ``import cachedload``: boto3 and fsspec load on first use of a URL.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachedload import config

if TYPE_CHECKING:
    from cachedload.backends.objects import ObjectStore
    from cachedload.backends.remote import RemoteStore

__all__ = [
    "LOCAL_COPIES_DIR",
    "URL_FILE",
    "default_local_root",
    "object_store",
    "open_store",
    "remote_url",
]

_S3_SCHEMES = ("s3", "s3a")

#: The folder of a local cache directory holding the read-through copies of remote caches
#: (``<cache_dir>/remote/<bucket-prefix-hash>/<function dir>/<key>/``): not a function folder.
LOCAL_COPIES_DIR = "remote"
#: In a local copy's root: the URL of the remote cache it copies (for ``cachedload ls``).
URL_FILE = ".url"


def remote_url(cache_dir: str | os.PathLike[str] | None) -> str | None:
    """The URL of the remote cache ``cache_dir`` names — or, when it is None, that
    ``$CACHEDLOAD_DIR`` names — else None (a local cache directory).

    Raises:
        ConfigurationError: ``cache_dir`` is None and ``$CACHEDLOAD_DIR`` is invalid.
    """
    if cache_dir is None:
        configured = config.cache_dir_from_env()
        return configured if isinstance(configured, str) else None
    return cache_dir if config.is_url(cache_dir) else None


def default_local_root(url: str) -> Path:
    """The default read-through copy of a remote cache: ``remote/<bucket-prefix-hash>`` in the
    local cache directory (``$CACHEDLOAD_DIR`` when it is a path, else the user cache dir)."""
    base = config.default_cache_dir()
    readable = "".join(c if c.isalnum() or c in "._" else "-" for c in url.split("://", 1)[-1])
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]
    return base / LOCAL_COPIES_DIR / f"{readable.strip('-')[:80]}-{digest}"


def object_store(url: str, storage_options: dict[str, Any] | None = None) -> ObjectStore:
    """The object store at ``url`` (``s3://`` through boto3, anything else through fsspec).

    ``storage_options`` default to ``$CACHEDLOAD_STORAGE_OPTIONS``.
    """
    config.check_url(url)
    options = config.storage_options_from_env() if storage_options is None else storage_options
    if url.split("://", 1)[0].lower() in _S3_SCHEMES:
        from cachedload.backends.s3 import S3ObjectStore

        return S3ObjectStore(url, options)
    from cachedload.backends.objects import FsspecObjectStore

    return FsspecObjectStore(url, options)


def open_store(
    url: str,
    function_dir: str,
    *,
    storage_options: dict[str, Any] | None = None,
    local_cache_dir: str | os.PathLike[str] | None = None,
) -> RemoteStore:
    """The store of one function in the remote cache at ``url``.

    Args:
        url: the cache URL, e.g. ``s3://team-bucket/cachedload``.
        function_dir: the function's folder name.
        storage_options: credentials, endpoint… (default ``$CACHEDLOAD_STORAGE_OPTIONS``).
        local_cache_dir: the read-through copy (default :func:`default_local_root`).
    """
    from cachedload.backends.remote import RemoteStore

    local = (
        default_local_root(url) if local_cache_dir is None else Path(local_cache_dir).expanduser()
    )
    return RemoteStore(
        object_store(url, storage_options),
        function_dir,
        local,
        lease_seconds=config.lease_seconds(),
    )
