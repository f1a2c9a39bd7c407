"""Turning a result into bytes on disk and back: joblib, with a checksum taken while writing.

Kept apart from :mod:`cachedload.store` (which decides *where* and *when*) so that the format
can be tuned or replaced without touching the publishing rules.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

import xxhash

__all__ = ["dump", "load"]


class _HashingWriter:
    """A binary file wrapper that hashes and counts everything written through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hasher.update(view)
        self.size += view.nbytes
        self.handle.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()


def dump(value: Any, path: str | os.PathLike[str], *, compress: Any = False) -> tuple[int, str]:
    """Write ``value`` to ``path`` with ``joblib.dump``, flushed and fsynced.

    Returns:
        ``(size in bytes, hex xxh3-128 of the file)``, computed while writing (no second read).
    """
    import joblib

    with open(path, "wb") as handle:
        writer = _HashingWriter(handle)
        joblib.dump(value, writer, compress=compress)
        handle.flush()
        os.fsync(handle.fileno())
    return writer.size, writer.hasher.hexdigest()


def load(path: str | os.PathLike[str], *, mmap_mode: str | None) -> Any:
    """Read a value written by :func:`dump` (``mmap_mode="r"`` memory-maps its arrays)."""
    import joblib

    return joblib.load(path, mmap_mode=mmap_mode)
