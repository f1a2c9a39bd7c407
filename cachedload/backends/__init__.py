"""Where entries live when the cache is shared between machines.

* an object store named by a URL — ``s3://bucket/prefix`` (boto3, the ``s3`` extra), or any other
  fsspec URL — is a :class:`~cachedload.backends.remote.RemoteStore`: entries published in the
  bucket with conditional writes, read through a local copy;
* a shared POSIX mount (NFS, Lustre, a FUSE mount) is an ordinary cache directory; only its lock
  changes (:mod:`cachedload.backends.mount`).

Nothing here is imported by ``import cachedload``: boto3 and fsspec load on first use of a URL.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from cachedload.errors import ConfigurationError

if TYPE_CHECKING:
    from cachedload.backends.objects import ObjectStore
    from cachedload.backends.remote import RemoteStore

__all__ = [
    "LOCAL_COPIES_DIR",
    "URL_FILE",
    "default_local_root",
    "is_url",
    "lease_seconds",
    "object_store",
    "open_store",
    "remote_url",
    "storage_options_from_env",
    "validate_url",
]

_S3_SCHEMES = ("s3", "s3a")

#: The folder of a local cache directory holding the read-through copies of remote caches
#: (``<cache_dir>/remote/<bucket-prefix-hash>/<function dir>/<key>/``): not a function folder.
LOCAL_COPIES_DIR = "remote"
#: In a local copy's root: the URL of the remote cache it copies (for ``cachedload ls``).
URL_FILE = ".url"


def is_url(value: object) -> TypeGuard[str]:
    """True if ``value`` is a remote cache URL (``scheme://…``; ``file://`` is a local path)."""
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


def remote_url(cache_dir: str | os.PathLike[str] | None) -> str | None:
    """The URL of the remote cache ``cache_dir`` names — or, when it is None, that
    ``$CACHEDLOAD_DIR`` names — else None (a local cache directory)."""
    if cache_dir is None:
        cache_dir = os.environ.get("CACHEDLOAD_DIR", "").strip()
    return cache_dir if is_url(cache_dir) else None


def validate_url(url: str) -> None:
    """Check, without importing anything heavy, that a URL's scheme can be used.

    Raises:
        ConfigurationError: unknown scheme, or its package (boto3 for ``s3://``) is missing.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme in _S3_SCHEMES:
        if importlib.util.find_spec("boto3") is None:
            raise ConfigurationError(
                "cache_dir", f"{url!r} needs boto3: pip install 'cachedload[s3]'"
            )
        if not url.split("://", 1)[1].strip("/"):
            raise ConfigurationError("cache_dir", f"{url!r} names no bucket")
        return
    if importlib.util.find_spec("fsspec") is None:
        raise ConfigurationError("cache_dir", f"{url!r} needs fsspec and its {scheme} backend")
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise ConfigurationError("cache_dir", f"no fsspec file system for {scheme}:// URLs")


def storage_options_from_env() -> dict[str, Any]:
    """``$CACHEDLOAD_STORAGE_OPTIONS`` (a JSON object), for caches named by ``$CACHEDLOAD_DIR``
    or on the ``cachedload`` command line; ``{}`` if unset.

    Raises:
        ConfigurationError: it is not a JSON object.
    """
    raw = os.environ.get("CACHEDLOAD_STORAGE_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as error:
        raise ConfigurationError("$CACHEDLOAD_STORAGE_OPTIONS", f"not JSON: {error}") from None
    if not isinstance(options, dict):
        raise ConfigurationError("$CACHEDLOAD_STORAGE_OPTIONS", "must be a JSON object")
    return options


def lease_seconds() -> float:
    """How long a crashed computation holds up others: ``$CACHEDLOAD_LEASE_SECONDS``, default 30.

    The holder renews its lease every third of this; after this long without renewal, another
    process takes over. Every process sharing a cache must use the same value.
    """
    raw = os.environ.get("CACHEDLOAD_LEASE_SECONDS", "").strip()
    try:
        value = float(raw) if raw else 30.0
    except ValueError:
        raise ConfigurationError("$CACHEDLOAD_LEASE_SECONDS", f"not a number: {raw!r}") from None
    if not 0 < value < 86400:
        raise ConfigurationError("$CACHEDLOAD_LEASE_SECONDS", f"out of range: {value}")
    return value


def default_local_root(url: str) -> Path:
    """The default read-through copy of a remote cache: ``remote/<bucket-prefix-hash>`` in the
    local cache directory (``$CACHEDLOAD_DIR`` when it is a path, else the user cache dir)."""
    configured = os.environ.get("CACHEDLOAD_DIR", "").strip()
    if configured and not is_url(configured):
        base = Path(configured.removeprefix("file://")).expanduser()
    else:
        base = _platform_cache_dir()
    readable = "".join(c if c.isalnum() or c in "._" else "-" for c in url.split("://", 1)[-1])
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]
    return base / LOCAL_COPIES_DIR / f"{readable.strip('-')[:80]}-{digest}"


@functools.lru_cache(maxsize=1)
def _platform_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("cachedload", appauthor=False))


def object_store(url: str, storage_options: dict[str, Any] | None = None) -> ObjectStore:
    """The object store at ``url`` (``s3://`` through boto3, anything else through fsspec).

    ``storage_options`` default to ``$CACHEDLOAD_STORAGE_OPTIONS``.
    """
    validate_url(url)
    options = storage_options_from_env() if storage_options is None else storage_options
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
        object_store(url, storage_options), function_dir, local, lease_seconds=lease_seconds()
    )
