"""The single-flight lock of a cache directory, chosen by the file system it lives on.

On a local file system a kernel ``flock`` (filelock's ``FileLock``) is exact and dies with its
holder. On a shared mount it is not to be trusted: NFS clients mounted with ``local_lock`` or
``nolock`` (and NFSv3 without a lock daemon) do not exclude each other, Lustre refuses ``flock``
unless mounted with ``-o flock`` (``localflock`` excludes one node only), FUSE file systems
mostly ignore it. There, a *lease* is used: filelock's ``SoftFileLease``, a marker file created
with ``O_EXCL`` (atomic on NFSv3+ and Lustre), refreshed by its holder, taken over once it has
stayed unchanged for a lease duration — so a crashed holder, even on another machine, never
wedges the others.

``$CACHEDLOAD_LOCK`` forces the choice: ``lease`` or ``flock``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from cachedload import config

__all__ = ["NETWORK_FILE_SYSTEMS", "entry_lock", "file_system_type", "uses_lease"]

#: File system types (``/proc/self/mountinfo``) treated as shared mounts; ``fuse.*`` too.
NETWORK_FILE_SYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "gpfs",
        "beegfs",
        "afs",
        "9p",
        "fuse",
        "fuseblk",
        "wekafs",
        "pvfs2",
        "orangefs",
        "panfs",
    }
)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[tuple[str, str], ...]:
    """(mount point, file system type), longest mount point first."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if "-" not in fields:
                    continue
                separator = fields.index("-")
                if len(fields) > separator + 1 and len(fields) > 4:
                    found.append((_unescape(fields[4]), fields[separator + 1]))
    except OSError:
        return ()
    return tuple(sorted(found, key=lambda item: len(item[0]), reverse=True))


def file_system_type(path: str | os.PathLike[str]) -> str | None:
    """The type of the file system holding ``path`` (or its nearest existing parent), e.g.
    ``"ext4"``, ``"nfs4"``, ``"lustre"``; None where ``/proc/self/mountinfo`` is unavailable."""
    resolved = Path(os.path.realpath(path))
    for mount_point, kind in _mounts():
        if resolved == Path(mount_point) or Path(mount_point) in resolved.parents:
            return kind
    return None


@functools.lru_cache(maxsize=64)
def _is_shared(directory: str) -> bool:
    kind = file_system_type(directory)
    return kind is not None and (kind in NETWORK_FILE_SYSTEMS or kind.startswith("fuse."))


def uses_lease(directory: str | os.PathLike[str]) -> bool:
    """True if locks in ``directory`` are leases rather than ``flock`` (see the module doc)."""
    forced = config.lock_kind()
    if forced is not None:
        return forced == "lease"
    return _is_shared(os.fspath(directory))


def entry_lock(lock_path: Path, timeout: float | None, mode: int = -1) -> Any:
    """The lock for one entry: ``FileLock`` on a local disk, ``SoftFileLease`` on a shared
    mount. Both have ``acquire(timeout=…)``/``release()`` and raise ``filelock.Timeout``.
    ``mode``: the lock file's permissions (-1: filelock's default)."""
    timeout = -1 if timeout is None else timeout
    if uses_lease(lock_path.parent):
        from filelock import SoftFileLease

        return SoftFileLease(str(lock_path), timeout=timeout, lease_duration=config.lease_seconds())
    from filelock import FileLock

    return FileLock(str(lock_path), timeout=timeout, mode=mode)
