"""Leftovers (issue 16, item 6): what killed writers leave is shown by ``cachedload ls`` and
removed by ``clear``, ``prune`` and ``verify --fix``; records of removed entries go too, but
never the lock of an entry being computed right now.

The writers here are real processes, killed with SIGKILL in the middle of writing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cachedload.cli import main
from cachedload.manage import leftovers
from tests.conftest import subprocess_env

# A loader with a 16 MB result whose data file is written, then the writer waits (killed by
# the test): its temporary folder holds the half-published entry, it holds the entry's lock.
WRITER = """
import os, sys, time
import numpy as np
import cachedload.serialize as serialize
from cachedload import cached_dataset

real_dump = serialize.dump

def dump_then_wait(value, path, **kw):
    result = real_dump(value, path, **kw)
    open(os.environ["WRITING"], "w").close()
    time.sleep(600)
    return result

serialize.dump = dump_then_wait

@cached_dataset(cache_dir=os.environ["CACHE"])
def big(n):
    return np.ones(n, dtype=np.float64)

big(2_000_000)
"""

# Holds the lock of an entry being computed (no entry folder yet) until GO exists.
COMPUTING = """
import os, time
from cachedload import cached_dataset

@cached_dataset(cache_dir=os.environ["CACHE"])
def slow(n):
    open(os.environ["STARTED"], "w").close()
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.02)
    return n

print(slow(7))
"""


def _start(code: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(**env),
    )


def _wait_for(path: Path, child: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"child ended early:\n{child.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _kill_a_writer(cache: Path, tmp_path: Path) -> Path:
    """Run WRITER until its data file is written, SIGKILL it; return its function folder."""
    writing = tmp_path / "writing"
    victim = _start(WRITER, CACHE=str(cache), WRITING=str(writing))
    _wait_for(writing, victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    [function_dir] = [p for p in cache.iterdir() if p.is_dir()]
    return function_dir


def _names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    main(list(argv))
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [
        ("clear", "--all", "--yes"),
        ("clear", "--older-than", "30d"),
        ("verify", "--fix"),
        ("prune", "--max-size", "1GB"),
    ],
    ids=lambda command: " ".join(command),
)
def test_a_killed_writers_leftovers_are_listed_then_removed(
    command: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    function_dir = _kill_a_writer(cache, tmp_path)
    names = _names(function_dir)
    [tmp] = [name for name in names if name.startswith(".tmp-")]
    key_records = {name for name in names if name.endswith((".lock", ".owner"))}
    assert len(key_records) == 2  # the killed holder's lock and owner record stay behind

    [found] = leftovers(cache)
    assert found.dead and found.path == function_dir / tmp
    assert found.size_bytes >= 16_000_000
    out = _run(capsys, "ls", "--cache-dir", str(cache))
    assert "no entries" in out and tmp in out and "writer gone" in out
    assert "16.0 MB" in out, out

    out = _run(capsys, *command, "--cache-dir", str(cache))
    assert "removed 1 leftover of dead writers (16.0 MB)" in out, out
    assert not function_dir.exists() or not _names(function_dir)  # lock and owner gone too
    assert leftovers(cache) == []
    assert "leftovers (" not in _run(capsys, "ls", "--cache-dir", str(cache))


def test_dry_run_says_what_would_go_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    function_dir = _kill_a_writer(cache, tmp_path)
    before = _names(function_dir)
    out = _run(capsys, "clear", "--all", "--dry-run", "--cache-dir", str(cache))
    assert "would remove 1 leftover of dead writers" in out
    assert _names(function_dir) == before


def test_records_of_removed_entries_go_but_a_computing_entrys_lock_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    started, go = tmp_path / "started", tmp_path / "go"
    env = {"CACHE": str(cache), "STARTED": str(started), "GO": str(go)}
    computing = _start(COMPUTING, **env)
    try:
        _wait_for(started, computing)
        [function_dir] = [p for p in cache.iterdir() if p.is_dir()]
        [lock] = [p for p in function_dir.iterdir() if p.name.endswith(".lock")]
        key = lock.name.removesuffix(".lock")
        assert (function_dir / f"{key}.owner").exists()  # no entry folder yet: being computed
        gone = "0123456789abcdef0123456789abcdef"  # records of an entry removed meanwhile
        for suffix in (".lock", ".owner", ".used"):
            (function_dir / f"{gone}{suffix}").write_text("x")

        _run(capsys, "clear", "--all", "--yes", "--cache-dir", str(cache))
        names = _names(function_dir)
        assert {f"{key}.lock", f"{key}.owner"} <= names  # its lock is held: left alone
        assert not {name for name in names if name.startswith(gone)}
    finally:
        go.touch()
        out, err = computing.communicate(timeout=60)
    assert computing.returncode == 0, err
    assert out.strip() == "7"
    # The entry was published under the lock that was kept; it is a hit now.
    assert len(_run(capsys, "ls", "--cache-dir", str(cache)).splitlines()) >= 2
    assert not [name for name in _names(function_dir) if name.endswith(".owner")]


def test_a_live_writers_temporary_folder_is_listed_as_being_written(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    function_dir = cache / "mod.f-0123abcd"
    function_dir.mkdir(parents=True)
    from cachedload.entry import HOST

    live = function_dir / f".tmp-{HOST}-{os.getpid()}-live"
    live.mkdir()
    (live / "result.joblib").write_bytes(b"x" * 1000)
    [found] = leftovers(cache)
    assert found.path == live and found.size_bytes == 1000 and not found.dead
