"""Settings from outside the code: every ``CACHEDLOAD_*`` environment variable, the platform's
cache directory, and the checking of cache-directory values and sizes wherever they come from.

This is the only module that reads the environment for cachedload (a test keeps it so); every
other module receives values from the functions here:

===============================  ===========================  ==================================
variable                         read by                      value
===============================  ===========================  ==================================
``CACHEDLOAD_DIR``               :func:`cache_dir_from_env`   a folder, ``file://`` or a URL
``CACHEDLOAD_MAX_SIZE``          :func:`max_size_from_env`    a size (:func:`parse_size`)
``CACHEDLOAD_STORAGE_OPTIONS``   :func:`storage_options_...`  a JSON object
``CACHEDLOAD_LEASE_SECONDS``     :func:`lease_seconds`        seconds, default 30
``CACHEDLOAD_LOCK``              :func:`lock_kind`            ``lease`` or ``flock``
===============================  ===========================  ==================================

(``CACHEDLOAD_SIGNING_KEY`` will be read here too, with the others, at the end of this module.)

A cache-directory value is accepted from three places, and an error names the one it came from:
the ``cache_dir=`` option, ``$CACHEDLOAD_DIR`` and the command line's ``--cache-dir``. It is
either a local folder (``~`` expanded; ``file:///abs/path`` is the same as ``/abs/path``) or a
remote cache's URL (``s3://bucket/prefix``, or any scheme fsspec knows). Anything else — blank,
``s3:/typo``, ``file://`` with no path, ``~nosuchuser/…``, a scheme with no installed file
system — is a :class:`~cachedload.errors.ConfigurationError` before anything is created.

Imports nothing from cachedload but :mod:`cachedload.errors`, so that every module may use it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, TypeGuard

from cachedload.errors import ConfigurationError

__all__ = [
    "CACHE_DIR_ENV",
    "cache_dir_from_env",
    "cache_dir_origin",
    "cache_dir_variable",
    "check_cache_dir",
    "check_url",
    "default_cache_dir",
    "is_url",
    "lease_seconds",
    "lock_kind",
    "max_size_from_env",
    "not_a_folder",
    "parse_size",
    "platform_cache_dir",
    "root_settings",
    "storage_options_from_env",
]

#: Where each kind of value comes from, as an error names it.
CACHE_DIR_ENV = "$CACHEDLOAD_DIR"

_ACCEPTED = "a folder path, file:///absolute/path, or a remote cache URL such as s3://bucket/prefix"
_LOCAL = "a local folder path"
_S3_SCHEMES = ("s3", "s3a")
# "s3:/typo", "http:/host": a scheme and one slash. Two letters at least, so that a Windows
# drive ("C:/data") stays a path.
_HALF_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")

# Decimal units (k, kb, m, mb, …) are powers of 1000, binary ones (kib, mib, …) of 1024.
_SIZE_UNITS = {"": 1, "b": 1}
for _power, _prefix in enumerate("kmgt", start=1):
    _SIZE_UNITS.update({_prefix: 1000**_power, _prefix + "b": 1000**_power})
    _SIZE_UNITS[_prefix + "ib"] = 1024**_power
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def is_url(value: object) -> TypeGuard[str]:
    """True if ``value`` is a remote cache URL (``scheme://…``; ``file://`` is a local path)."""
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


def check_cache_dir(value: object, origin: str) -> str | Path:
    """Check a cache-directory value; return the remote cache's URL, or the local folder.

    Args:
        value: what was given (a string or an ``os.PathLike``).
        origin: where it came from, named by the error: ``"cache_dir"``,
            ``"$CACHEDLOAD_DIR"``, ``"--cache-dir"``…

    Raises:
        ConfigurationError: the value is of the wrong type, blank, a malformed URL, a
            ``~user`` that does not exist, or a URL whose scheme cannot be used here.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigurationError(
            origin, f"must be a str or os.PathLike ({_ACCEPTED}), not {type(value).__name__}"
        )
    if not value.strip():
        blank = "blank" if value else "empty"
        raise ConfigurationError(origin, f"{value!r} is {blank}: expected {_ACCEPTED}")
    if is_url(value):
        check_url(value, origin)
        return value
    if value.startswith("file://"):
        path = value.removeprefix("file://")
        path = path.removeprefix("localhost") if path.startswith("localhost/") else path
        if not path.startswith("/"):
            raise ConfigurationError(
                origin, f"{value!r} names no absolute path; expected {_ACCEPTED}"
            )
        value = path
    elif _HALF_URL.match(value):
        scheme, rest = value.split(":", 1)
        raise ConfigurationError(
            origin,
            f"{value!r} looks like a URL with a slash missing (did you mean "
            f"{scheme}://{rest.lstrip('/')}?); expected {_ACCEPTED}",
        )
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        user = value.split("/", 1)[0]
        raise ConfigurationError(
            origin,
            f"{value!r}: cannot expand {user} (no such user or no home directory); "
            f"expected {_ACCEPTED}",
        )
    return Path(expanded)


def check_url(url: str, origin: str = "cache_dir") -> None:
    """Check that a remote cache URL's scheme can be used here (its package is installed).

    Raises:
        ConfigurationError: no bucket, an unknown scheme, or its package is missing.
    """
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme in _S3_SCHEMES:
        if importlib.util.find_spec("boto3") is None:
            raise ConfigurationError(
                origin, f"{url!r} needs boto3: pip install boto3 (the s3 extra), or use {_LOCAL}"
            )
        if not rest.strip("/"):
            raise ConfigurationError(
                origin, f"{url!r} names no bucket; expected s3://bucket or s3://bucket/prefix"
            )
        return
    if importlib.util.find_spec("fsspec") is None:
        raise ConfigurationError(
            origin, f"{url!r} needs fsspec and its {scheme} backend, or use {_LOCAL}"
        )
    from fsspec.registry import get_filesystem_class, known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise ConfigurationError(
            origin, f"{url!r}: no fsspec file system for {scheme}:// URLs; expected {_ACCEPTED}"
        )
    try:
        get_filesystem_class(scheme)  # imports its backend: http:// needs aiohttp…
    except ImportError as error:
        raise ConfigurationError(
            origin, f"{url!r} cannot be used here: {error}; install it, or use {_LOCAL}"
        ) from None


def cache_dir_from_env() -> str | Path | None:
    """``$CACHEDLOAD_DIR``, checked (a URL or a folder); None if unset or empty.

    Raises:
        ConfigurationError: it is set to something that is not a cache directory.
    """
    raw = os.environ.get("CACHEDLOAD_DIR", "")
    if raw == "":  # unset, or emptied to unset it (`CACHEDLOAD_DIR= python …`)
        return None
    return _checked_env(raw)


@functools.lru_cache(maxsize=4)
def _checked_env(raw: str) -> str | Path:
    # Read on every call of a loader without cache_dir=: checked once per value.
    return check_cache_dir(raw.strip() or raw, CACHE_DIR_ENV)


def cache_dir_origin(given: object, given_as: str = "cache_dir") -> str:
    """Where a cache directory came from, as messages name it: ``given_as`` if one was
    ``given`` (not None), else ``$CACHEDLOAD_DIR`` if it is set, else the platform default."""
    if given is not None:
        return given_as
    return CACHE_DIR_ENV if cache_dir_variable() else "the platform default"


def cache_dir_variable() -> str | None:
    """``$CACHEDLOAD_DIR`` as set, unchecked (for messages such as the command's help); None
    if unset or empty."""
    return root_settings()[0] or None


def not_a_folder(path: Path) -> str | None:
    """What keeps ``path`` from ever being a cache directory: it, or the nearest existing
    folder above it, is a file (or anything but a folder). None if it is a folder, or does not
    exist under a folder (then it can be made); also None if it cannot be looked at (a
    permission problem is reported by whatever then uses it)."""
    for candidate in (path, *path.parents):
        try:
            info = os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue  # look further up: what is in the way is there
        except OSError:
            return None
        if stat.S_ISDIR(info.st_mode):
            return None
        if stat.S_ISREG(info.st_mode):
            return f"{candidate} is a file, not a folder"
        return f"{candidate} is not a folder"
    return None


def root_settings() -> tuple[str | None, ...]:
    """The variables a cache root is resolved from, as set: when they change, a loader
    resolves its cache root again (``$CACHEDLOAD_DIR``, ``$CACHEDLOAD_STORAGE_OPTIONS``,
    ``$CACHEDLOAD_LEASE_SECONDS``)."""
    get = os.environ.get
    return (
        get("CACHEDLOAD_DIR"),
        get("CACHEDLOAD_STORAGE_OPTIONS"),
        get("CACHEDLOAD_LEASE_SECONDS"),
    )


def default_cache_dir() -> Path:
    """The cache directory used when a loader names none.

    ``$CACHEDLOAD_DIR`` if set to a folder (``file:///x`` is ``/x``), else the platform's user
    cache directory (via platformdirs) followed by ``cachedload`` (``~/.cache/cachedload`` on
    Linux), which also holds remote caches' local copies when ``$CACHEDLOAD_DIR`` is a URL.

    Raises:
        ConfigurationError: ``$CACHEDLOAD_DIR`` is not a valid cache directory.
    """
    configured = cache_dir_from_env()
    return configured if isinstance(configured, Path) else platform_cache_dir()


@functools.lru_cache(maxsize=1)
def platform_cache_dir() -> Path:
    """The platform's user cache directory for cachedload (``~/.cache/cachedload`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("cachedload", appauthor=False))


def parse_size(value: int | str, option: str = "max_size") -> int:
    """Parse a size in bytes: an int, or a string such as ``"20GB"``, ``"512 MB"``, ``"1.5GiB"``.

    Decimal units (``KB``, ``MB``, ``GB``, ``TB``) are powers of 1000, binary units (``KiB``,
    ``MiB``, ``GiB``, ``TiB``) powers of 1024; a bare number is bytes. Case does not matter.

    Raises:
        ConfigurationError: the value is not a size (the error names ``option``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigurationError(option, f"a size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ConfigurationError(
        option, f"expected a size such as 20GB, 512MB or 1.5GiB (or bytes), got {value!r}"
    )


def max_size_from_env() -> int | None:
    """``$CACHEDLOAD_MAX_SIZE`` in bytes (written ``"20GB"``…), None if unset or blank.

    Raises:
        ConfigurationError: it is not a size (the error names the variable).
    """
    raw = os.environ.get("CACHEDLOAD_MAX_SIZE", "").strip()
    return parse_size(raw, "$CACHEDLOAD_MAX_SIZE") if raw else None


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

    Raises:
        ConfigurationError: it is not a number between 0 and a day.
    """
    raw = os.environ.get("CACHEDLOAD_LEASE_SECONDS", "").strip()
    try:
        value = float(raw) if raw else 30.0
    except ValueError:
        raise ConfigurationError("$CACHEDLOAD_LEASE_SECONDS", f"not a number: {raw!r}") from None
    if not 0 < value < 86400:
        raise ConfigurationError("$CACHEDLOAD_LEASE_SECONDS", f"out of range: {value}")
    return value


def lock_kind() -> str | None:
    """``$CACHEDLOAD_LOCK``: ``"lease"`` or ``"flock"`` to force the lock kind, else None."""
    forced = os.environ.get("CACHEDLOAD_LOCK", "").strip().lower()
    return forced if forced in ("lease", "flock") else None


def signing_key_from_env() -> bytes | None:
    """``$CACHEDLOAD_SIGNING_KEY``: the key signing a shared cache's entries (its UTF-8
    bytes), None if unset or blank."""
    raw = os.environ.get("CACHEDLOAD_SIGNING_KEY", "").strip()
    return raw.encode() if raw else None
