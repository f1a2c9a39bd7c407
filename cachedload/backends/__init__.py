"""Where entries live when the cache is shared between machines.

* a folder is a :class:`~cachedload.store.LocalRoot`; on a shared POSIX mount (NFS, Lustre, a
  FUSE mount) only its lock changes (:mod:`cachedload.mount`);
* an object store named by a URL — ``s3://bucket/prefix`` (boto3, the ``s3`` extra), or any other
  fsspec URL — is a :class:`~cachedload.backends.remote.RemoteRoot`: entries published in the
  bucket with conditional writes, read through a local copy.

:func:`open_root` is the one place that tells them apart. boto3 and fsspec load on first use of
a URL, and so do the remote root, the object stores and leases (a local hit never needs them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachedload import config
from cachedload.entry import LOCAL_COPIES_DIR
from cachedload.root import CacheRoot
from cachedload.store import LocalRoot

if TYPE_CHECKING:
    from cachedload.backends.objects import ObjectStore

__all__ = ["default_local_root", "object_store", "open_root", "remote_url"]

_S3_SCHEMES = ("s3", "s3a")


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
    # The remote backends load on first use of a URL: a local cache never imports them.
    from cachedload.backends.objects import FsspecObjectStore
    from cachedload.backends.s3 import S3ObjectStore

    config.check_url(url, "cache_dir")
    options = config.storage_options_from_env() if storage_options is None else storage_options
    if url.split("://", 1)[0].lower() in _S3_SCHEMES:
        return S3ObjectStore(url, options)
    return FsspecObjectStore(url, options)


def open_root(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    local_cache_dir: str | os.PathLike[str] | None = None,
    shared: bool = False,
    safe_types: tuple[type, ...] = (),
    signing_key: bytes | None = None,
) -> CacheRoot:
    """The cache root that ``cache_dir`` names: a local folder, or a remote cache's URL.

    Args:
        cache_dir: a folder or a URL (``s3://team-bucket/cachedload``); None: ``$CACHEDLOAD_DIR``
            or the user cache dir.
        storage_options: a remote cache's credentials, endpoint… (default
            ``$CACHEDLOAD_STORAGE_OPTIONS``).
        local_cache_dir: a remote cache's read-through copy (default :func:`default_local_root`).
        shared: a local folder is shared with other users (see :class:`LocalRoot`); a remote
            cache always is: its entries load with the restricted unpickler.
        safe_types: the classes a shared cache's entries may hold besides data.
        signing_key: a shared cache's signing key (default ``$CACHEDLOAD_SIGNING_KEY``).

    Raises:
        ConfigurationError: ``cache_dir`` (or ``$CACHEDLOAD_DIR``) is not a cache directory.
    """
    checked = (
        config.cache_dir_from_env()
        if cache_dir is None
        else config.check_cache_dir(cache_dir, "cache_dir")
    )
    key = config.signing_key_from_env() if signing_key is None else signing_key
    if not isinstance(checked, str):
        path = config.default_cache_dir() if checked is None else checked
        if not shared:
            return LocalRoot(path)
        return LocalRoot(path, shared=True, safe_types=safe_types, signing_key=key)
    copy = (
        default_local_root(checked)
        if local_cache_dir is None
        else Path(local_cache_dir).expanduser()
    )
    from cachedload.backends.remote import RemoteRoot

    return RemoteRoot(
        object_store(checked, storage_options),
        LocalRoot(copy, safe_types=safe_types, signing_key=key),
        lease_seconds=config.lease_seconds(),
    )
