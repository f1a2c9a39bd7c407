"""Reading a cache's files from one descriptor: regular files only, the bytes used checked.

A cache directory is untrusted input. Every file of an entry is opened here without following
a symlink and without blocking (a planted FIFO or device must not hang a hit), and refused
unless ``fstat`` on that very descriptor says it is a regular file. A file that must be checked
against a digest (``verify="always"``, a signed entry) is hashed from the same descriptor the
value is then read from, and a file that another user can write (a shared cache) is never
unpickled or memory-mapped where it lies: its bytes are first copied into memory, or into a
private unlinked temporary file for a memory map, and hashed on the way, so that what was
verified is exactly what is used (the writer cannot change it between the check and the use).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from cachedload.reading import read_parallel

__all__ = [
    "DigestMismatch",
    "copy_verified",
    "hash_descriptor",
    "open_regular",
    "private_copy",
    "read_verified",
    "sha256_of",
    "writable_by_others",
]

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1024 * 1024  # hashed and copied a slice at a time (fits L2 with the hash state)
#: The digests an entry may record of its data file, by their name in the metadata.
ALGORITHMS = ("xxh3", "sha256")


class DigestMismatch(ValueError):
    """The bytes read do not have the digest the metadata records."""


def open_regular(name: str | os.PathLike[str], *, dir_fd: int | None = None) -> tuple[int, Any]:
    """Open a regular file read-only, never through a symlink at its last component and never
    blocking on a FIFO or device; return the descriptor and its ``fstat``.

    Raises:
        OSError: it cannot be opened (``ELOOP``: a symlink), or is not a regular file
            (``EISDIR`` for a folder, ``EINVAL`` for anything else; the descriptor is closed).
    """
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            code = errno.EISDIR if stat.S_ISDIR(info.st_mode) else errno.EINVAL
            raise OSError(code, "not a regular file", os.fspath(name))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def writable_by_others(info: os.stat_result) -> bool:
    """True if a user other than this process's could change the file ``info`` describes
    (another owner, or group/other write permission)."""
    return info.st_uid != os.geteuid() or bool(info.st_mode & 0o022)


def _hashers(expected: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in expected:
        if name == "xxh3":
            found[name] = xxhash.xxh3_128()
        elif name == "sha256":
            found[name] = hashlib.sha256()
        else:
            raise ValueError(f"unknown digest {name!r}")
    return found


def _check(hashers: Mapping[str, Any], expected: Mapping[str, str]) -> None:
    for name, hasher in hashers.items():
        if not hmac.compare_digest(hasher.hexdigest(), expected[name]):
            raise DigestMismatch(f"data file checksum ({name}) does not match the metadata's")


def _stream(fd: int, size: int, hashers: Mapping[str, Any], out_fd: int | None = None) -> None:
    """Hash ``size`` bytes of ``fd`` from its start (a slice at a time), writing each slice
    to ``out_fd`` too if given."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = os.preadv(fd, [view[: min(_CHUNK, size - done)]], done)
        if count == 0:
            raise EOFError("data file ends before the size the metadata records")
        for hasher in hashers.values():
            hasher.update(view[:count])
        written = 0
        while out_fd is not None and written < count:
            written += os.pwrite(out_fd, view[written:count], done + written)
        done += count


def hash_descriptor(fd: int, size: int, expected: Mapping[str, str]) -> None:
    """Hash ``size`` bytes of ``fd`` from its start with each algorithm named in ``expected``
    (``{"xxh3": hex, "sha256": hex}``) and compare.

    Raises:
        DigestMismatch: a digest differs.
        EOFError: the file is shorter than ``size``.
    """
    hashers = _hashers(expected)
    _stream(fd, size, hashers)
    _check(hashers, expected)


def copy_verified(fd: int, size: int, expected: Mapping[str, str], path: Path) -> None:
    """Copy the first ``size`` bytes of ``fd`` into a new file ``path`` (``O_EXCL``, 0600;
    in a folder only this user can write), hashing them on the way, and compare.

    Raises:
        DigestMismatch: a digest differs (the copy is left for the caller's folder to go).
        EOFError: the file is shorter than ``size``.
        OSError: the copy cannot be written.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    out = os.open(path, flags, 0o600)
    try:
        hashers = _hashers(expected)
        _stream(fd, size, hashers, out)
    finally:
        os.close(out)
    _check(hashers, expected)


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a regular file (opened as :func:`open_regular` opens it)."""
    fd, info = open_regular(path)
    try:
        hasher = hashlib.sha256()
        _stream(fd, info.st_size, {"sha256": hasher})
        return hasher.hexdigest()
    finally:
        os.close(fd)


def read_verified(fd: int, size: int, expected: Mapping[str, str]) -> np.ndarray[Any, Any]:
    """The first ``size`` bytes of ``fd`` in a private buffer (a ``uint8`` array), checked
    against ``expected`` (may be empty: then only read). Large files are read by several
    threads, then hashed.

    Raises:
        DigestMismatch: a digest differs.
        EOFError: the file is shorter than ``size``.
    """
    # np.empty, not bytearray: its pages are faulted in by the read itself, not zeroed first
    # (a bytearray of 32 MiB cost 20 ms here before a byte was read).
    buffer: np.ndarray[Any, Any] = np.empty(size, np.uint8)
    read_parallel(fd, buffer.data, 0)
    hashers = _hashers(expected)
    for hasher in hashers.values():
        hasher.update(buffer)
    _check(hashers, expected)
    return buffer


def private_copy(fd: int, size: int, expected: Mapping[str, str]) -> int:
    """Copy the first ``size`` bytes of ``fd`` into a new temporary file that only this user
    can open (created ``O_EXCL`` 0600 in ``$TMPDIR``, unlinked at once), hashing them on the
    way; return the copy's descriptor (the caller closes it; a memory map of it stays valid).

    Raises:
        DigestMismatch: a digest differs (the copy is closed).
        EOFError: the file is shorter than ``size``.
        OSError: the copy cannot be written (e.g. ``$TMPDIR`` is full).
    """
    copy_fd, name = tempfile.mkstemp(prefix="cachedload-verified-")
    try:
        os.unlink(name)
        hashers = _hashers(expected)
        _stream(fd, size, hashers, copy_fd)
        _check(hashers, expected)
    except BaseException:
        os.close(copy_fd)
        raise
    return copy_fd
