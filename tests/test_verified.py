"""Reading a cache's files from one descriptor: regular files only, the bytes used verified."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import xxhash

from cachedload import cached_dataset
from cachedload.verified import (
    DigestMismatch,
    hash_descriptor,
    open_regular,
    private_copy,
    read_verified,
    writable_by_others,
)
from tests.conftest import write_old


def _digests(data: bytes) -> dict[str, str]:
    return {"xxh3": xxhash.xxh3_128_hexdigest(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder"])
def test_open_regular_refuses_what_is_not_a_regular_file_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "x"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "target").write_bytes(b"data")
        path.symlink_to(tmp_path / "target")
    else:
        path.mkdir()
    with pytest.raises(OSError) as raised:
        open_regular(path)
    assert raised.value.errno in (errno.EINVAL, errno.ELOOP, errno.EISDIR)


def test_the_bytes_read_are_the_bytes_checked(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "f").write_bytes(data)
    fd, info = open_regular(tmp_path / "f")
    try:
        assert bytes(read_verified(fd, info.st_size, _digests(data))) == data
        hash_descriptor(fd, info.st_size, _digests(data))
        wrong = {**_digests(data), "sha256": "0" * 64}
        with pytest.raises(DigestMismatch, match="sha256"):
            read_verified(fd, info.st_size, wrong)
        with pytest.raises(DigestMismatch):
            hash_descriptor(fd, info.st_size, wrong)
        with pytest.raises(EOFError):
            read_verified(fd, info.st_size + 1, {})
    finally:
        os.close(fd)


def test_a_private_copy_is_only_this_users_and_gone_from_the_file_system(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 3)
    (tmp_path / "f").write_bytes(data)
    fd, info = open_regular(tmp_path / "f")
    try:
        copy = private_copy(fd, info.st_size, _digests(data))
        try:
            copied = os.fstat(copy)
            assert copied.st_nlink == 0 and copied.st_uid == os.geteuid()
            assert copied.st_mode & 0o077 == 0
            assert os.pread(copy, len(data) + 1, 0) == data
        finally:
            os.close(copy)
        with pytest.raises(DigestMismatch):
            private_copy(fd, info.st_size, {"xxh3": "0" * 32})
    finally:
        os.close(fd)


def test_writable_by_others_reads_owner_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    path.chmod(0o644)
    assert not writable_by_others(os.stat(path))
    path.chmod(0o664)
    assert writable_by_others(os.stat(path))
    if os.geteuid() == 0:
        path.chmod(0o600)
        os.chown(path, 65534, 65534)
        assert writable_by_others(os.stat(path))


@pytest.mark.parametrize("mmap_mode", [None, "r"])
@pytest.mark.parametrize("signing_key", [None, "k"])
def test_a_shared_entry_another_user_can_write_is_used_from_a_verified_private_copy(
    tmp_path: Path, mmap_mode: Literal["r"] | None, signing_key: str | None
) -> None:
    """What a hit returns does not change when the entry's file changes afterwards: it was
    read (or copied, for a map) while verified, not mapped where another user can write."""
    src = tmp_path / "src"
    write_old(src / "a.txt", "a")
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o2775)

    @cached_dataset(
        cache_dir=cache, source="folder", shared=True, signing_key=signing_key, mmap_mode=mmap_mode
    )
    def load(folder: str) -> np.ndarray:
        return np.arange(100_000, dtype=np.int64)

    load(str(src))
    data = load.cache_path(str(src)) / "result.joblib"
    data.chmod(0o666)  # as another user in the group could write it
    value = load(str(src))
    assert isinstance(value, np.ndarray) and int(value[12_345]) == 12_345
    if mmap_mode is not None:
        assert not isinstance(value, np.memmap) or value.filename is None
        with pytest.raises(ValueError):
            value[0] = 1  # read-only, as a map of the entry is
    with open(data, "r+b") as handle:  # the other user rewrites the array's bytes in place
        raw = bytearray(handle.read())
        offset = raw.rindex(np.arange(100_000, dtype=np.int64).tobytes()[-64:])
        handle.seek(offset)
        handle.write(b"\xff" * 64)
    assert int(value[-1]) == 99_999
