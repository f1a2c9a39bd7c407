"""mount.py: caches on shared mounts (NFS, Lustre, FUSE): recognised from mountinfo, locked
with a lease file (SoftFileLease) rather than flock."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import runs, subprocess_env


# --- shared mounts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "lease"),
    [("/shared/cache", True), ("/lustre/x", True), ("/fuse/y", True), ("/home/me", False)],
)
def test_shared_mounts_are_recognised_from_mountinfo(
    path: str, lease: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachedload import mount

    table = (("/shared", "nfs4"), ("/lustre", "lustre"), ("/fuse", "fuse.sshfs"), ("/", "ext4"))
    monkeypatch.setattr(mount, "_mounts", lambda: table)
    mount._is_shared.cache_clear()
    monkeypatch.delenv("CACHEDLOAD_LOCK", raising=False)
    assert mount.uses_lease(path) is lease
    monkeypatch.setenv("CACHEDLOAD_LOCK", "flock")
    assert mount.uses_lease(path) is False
    mount._is_shared.cache_clear()


MOUNT_CHILD = """
import os, sys, time
from cachedload import cached_dataset

@cached_dataset(cache_dir=os.environ["T_CACHE"])
def load(data_dir):
    with open(os.environ["T_COUNTER"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    if os.environ.get("T_STARTED"):
        open(os.environ["T_STARTED"], "w").close()
    time.sleep(float(os.environ.get("T_SLEEP", "0")))
    return sorted(os.listdir(data_dir))

print(load(os.environ["T_DATA"]))
"""


def test_shared_mount_lease_lock_single_flight_and_crash_takeover(
    data_dir: Path, tmp_path: Path
) -> None:
    counter, started = tmp_path / "runs.txt", tmp_path / "started"
    counter.touch()
    env = subprocess_env(
        T_CACHE=str(tmp_path / "mount"),
        T_DATA=str(data_dir),
        T_COUNTER=str(counter),
        CACHEDLOAD_LOCK="lease",
        CACHEDLOAD_LEASE_SECONDS="2",
    )

    def start(**extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(MOUNT_CHILD)],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    holder = start(T_STARTED=str(started), T_SLEEP="600")
    while not started.exists():
        assert holder.poll() is None, holder.communicate()
        time.sleep(0.05)
    assert list((tmp_path / "mount").glob("*/*.lock"))  # the lease's marker file
    waiters = [start(T_SLEEP="0.5") for _ in range(3)]
    time.sleep(1.0)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    outputs = []
    for waiter in waiters:
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        outputs.append(out)
    assert len(set(outputs)) == 1
    assert runs(counter) == 2  # the killed holder, then exactly one of the waiters
