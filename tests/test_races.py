"""Listing, clearing and hitting while other processes recompute and clear (issue 16, item 5).

A vanished entry is a silent miss, every listing tolerates entries appearing and vanishing, no
descriptor leaks even when ``os.scandir`` fails with EMFILE. The mixed workload runs real
processes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import cached_dataset
from cachedload.store import LocalRoot
from tests.conftest import subprocess_env
from tests.test_builder import write


@pytest.mark.parametrize("when", ["before the data is read", "while the data is read"])
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_an_entry_vanishing_under_a_hit_is_a_silent_miss(
    when: str, how: str, image_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(folder: str) -> Any:
        runs.append(1)
        return np.arange(10_000)

    load(str(image_dir))
    [entry] = [p for p in next(cache_dir.glob("*-*")).iterdir() if p.is_dir()]
    armed = [True]

    def vanish() -> None:
        # What another process's cache_clear() or recompute() does: rename away, delete.
        if armed.pop() and how == "removed":
            shutil.rmtree(entry)
        elif how == "replaced":
            aside = entry.with_name(".trash-x")
            shutil.copytree(entry, aside)
            meta = (aside / "meta.json").read_text().replace('"created": ', '"created": 1')
            (aside / "meta.json").write_text(meta)
            shutil.rmtree(entry)
            aside.rename(entry)

    if when == "before the data is read":
        real_meta = LocalRoot.read_meta

        def read_meta(self: LocalRoot, fdir: str, key: str) -> dict[str, Any] | None:
            meta = real_meta(self, fdir, key)
            if armed:
                vanish()
            return meta

        monkeypatch.setattr(LocalRoot, "read_meta", read_meta)
    else:
        import cachedload.serialize as serialize

        real_load = serialize.load_open

        def load_data(fd: int, size: int, **kwargs: Any) -> Any:
            if armed:
                vanish()
            return real_load(fd, size, **kwargs)

        monkeypatch.setattr(serialize, "load_open", load_data)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CorruptEntryWarning would raise here
        value = load(str(image_dir))
    assert not armed
    assert np.array_equal(value, np.arange(10_000))
    # Removed before the data file is opened: a miss, computed again; removed once it is open:
    # served from that file (as checked). Replaced: the new entry (same key, same value) may
    # serve.
    if how == "removed":
        assert len(runs) == (2 if when == "before the data is read" else 1)


FD_CHILD = """
import contextlib, errno, gc, io, os, resource, sys, warnings
import numpy as np
from cachedload import cached_dataset, list_entries
from cachedload.cli import main

warnings.simplefilter("ignore")  # stores may fail with EMFILE: warned, not the point here
CACHE, SRC = os.environ["CACHE"], os.environ["SRC"]

@cached_dataset(cache_dir=CACHE)
def load(folder, key=0):
    return np.full(1000, key)

def fds():
    return len(os.listdir("/proc/self/fd"))

def ls():
    with contextlib.redirect_stdout(io.StringIO()):
        main(["ls", "--cache-dir", CACHE])

for k in range(4):
    load(SRC, key=k)
list_entries(CACHE), load.cache_info(), load.entries(), ls()  # every import done
gc.collect()
before = fds()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (before + 16, hard))
real_scandir, calls, failures = os.scandir, [0], [0]

def scandir(*args, **kwargs):
    calls[0] += 1
    if calls[0] % 3 == 0:
        raise OSError(errno.EMFILE, "Too many open files")
    return real_scandir(*args, **kwargs)

os.scandir = scandir
operations = [
    lambda i: load(SRC, key=i % 8),  # hits and misses
    lambda i: list_entries(CACHE),
    lambda i: load.cache_info(),
    lambda i: load.entries(),
    lambda i: load.recompute(SRC, key=i % 3) if i % 4 else load.cache_clear(),
    lambda i: ls(),
]
for i in range(360):
    try:
        operations[i % len(operations)](i)
    except OSError as error:
        failures[0] += 1
os.scandir = real_scandir
gc.collect()
print(before, fds(), calls[0], failures[0])
"""


def test_no_descriptor_leaks_when_scandir_fails_with_emfile(
    image_dir: Path, cache_dir: Path
) -> None:
    """Under a low ``RLIMIT_NOFILE``, with every third ``os.scandir`` failing with EMFILE,
    listings, hits, misses, recomputes and clears leak no descriptor (nor a scandir iterator:
    no ResourceWarning)."""
    result = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", FD_CHILD],
        capture_output=True,
        text=True,
        env=subprocess_env(CACHE=str(cache_dir), SRC=str(image_dir)),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    before, after, calls, failures = map(int, result.stdout.split())
    assert calls > 100 and failures > 0  # EMFILE did happen, many times
    assert after == before, result.stdout
    assert "ResourceWarning" not in result.stderr, result.stderr


WORKER = """
import contextlib, io, os, random, sys, time
import numpy as np
from cachedload import cached_dataset, list_entries
from cachedload.cli import main

CACHE, SRC, ROLE = os.environ["CACHE"], os.environ["SRC"], os.environ["ROLE"]
N = 50_000

@cached_dataset(cache_dir=CACHE)
def load(folder, key=0):
    return np.full(N, key, dtype=np.int64)

while not os.path.exists(os.environ["GO"]):
    time.sleep(0.01)
deadline = time.monotonic() + float(os.environ["SECONDS"])
rng, done = random.Random(os.getpid()), 0
while time.monotonic() < deadline:
    key = rng.randrange(6)
    if ROLE == "hit":
        value = load(SRC, key=key)
        assert value.shape == (N,) and int(value[0]) == key and int(value[-1]) == key, key
    elif ROLE == "recompute":
        value = load.recompute(SRC, key=key)
        assert int(value[0]) == key and int(value[-1]) == key
    else:  # clearing and listing
        load.cache_clear()
        load.cache_info()
        load.entries()
        list_entries(CACHE)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["ls", "--cache-dir", CACHE]) == 0
        time.sleep(0.05)
    done += 1
print(done)
"""


def test_mixed_workload_hits_recomputes_and_clears(
    image_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """4 processes hitting, 2 recomputing, 1 clearing and listing (``cache_clear()``,
    ``cache_info()``, ``entries()``, ``list_entries()``, ``cachedload ls``), all at once.

    The issue asks for 30 s; this runs 10 s so the suite stays within its time budget (the
    races it found showed within seconds). Hitting processes run with ``-W error``: any
    warning (a false ``CorruptEntryWarning``, a ``CacheStoreWarning``) fails them. Every
    value is checked; no process may raise.
    """
    go = tmp_path / "go"
    roles = ["hit"] * 4 + ["recompute"] * 2 + ["clear"]
    children = [
        subprocess.Popen(
            [sys.executable, *(["-W", "error"] if role == "hit" else []), "-c", WORKER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(
                CACHE=str(cache_dir), SRC=str(image_dir), ROLE=role, GO=str(go), SECONDS="10"
            ),
        )
        for role in roles
    ]
    time.sleep(1.0)  # let every interpreter start before the clock runs
    go.touch()
    outcomes = [
        (role, *child.communicate(timeout=120), child.returncode)
        for role, child in zip(roles, children, strict=True)
    ]
    for role, out, err, code in outcomes:
        assert code == 0, f"{role} process failed:\n{err}"
        assert "Traceback" not in err, f"{role}:\n{err}"
        assert int(out) > 0
        if role == "hit":
            assert err == "", f"hitting process wrote to stderr:\n{err}"
        assert "could not prune" not in err, f"{role}:\n{err}"


_BUILD_WHILE_CLEARED = """
import sys, time, warnings
from pathlib import Path
import numpy as np
warnings.simplefilter("error")
import cachedload.builder
from tests.test_builder import OLD_NS, write
from tests.test_per_item import expected_rows, loader

folder, cache, ready, go, counter = map(Path, sys.argv[1:6])
wrapper = loader(cache_dir=cache, keep=2)
wrapper.map(folder, counter=str(counter))
write(folder, "a/f0000.txt", 100, mtime_ns=time.time_ns())  # changed, and racy: hashed
real = cachedload.builder.hash_file

def hashing(path):  # the rebuild reaches the changed file: another process clears now
    cachedload.builder.hash_file = real
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    return real(path)

cachedload.builder.hash_file = hashing
result = wrapper.map(folder, counter=str(counter))
assert cachedload.builder.hash_file is real, "the hook did not run"
assert np.array_equal(result.array, expected_rows(folder, (2, 3)))
assert len(counter.read_text().splitlines()) == 21  # the other rows copied all the same
assert wrapper.map.is_cached(folder, counter=str(counter))
stored = wrapper.map.cache_path(folder, counter=str(counter)).name
assert [e.id for e in wrapper.entries()] == [stored]
"""


@pytest.mark.parametrize("clear", ["cachedload clear --all", "cache_clear()"])
def test_a_previous_entry_cleared_during_an_incremental_build_costs_only_its_rows(
    clear: str, tmp_path: Path
) -> None:
    folder, cache = tmp_path / "src", tmp_path / "cache"
    for index in range(20):
        write(folder, f"{('a', 'b')[index % 2]}/f{index:04d}.txt", index)
    ready, go = tmp_path / "ready", tmp_path / "go"
    repo = Path(__file__).resolve().parents[1]
    build = subprocess.Popen(
        [sys.executable, "-c", _BUILD_WHILE_CLEARED,
         *map(str, (folder, cache, ready, go, tmp_path / "calls"))],
        cwd=repo, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert build.poll() is None, build.communicate()[0]
            assert time.monotonic() < deadline, "the build never reached the hook"
            time.sleep(0.01)
        if clear == "cache_clear()":
            code = "from tests.test_per_item import loader; "
            code += f"loader(cache_dir={str(cache)!r}).cache_clear()"
            command = [sys.executable, "-c", code]
        else:
            command = [
                sys.executable,
                "-m",
                "cachedload",
                "--cache-dir",
                str(cache),
                "clear",
                "--all",
                "--yes",
            ]
        done = subprocess.run(
            command, cwd=repo, env=subprocess_env(), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(list(cache.glob("*-*/*/meta.json"))) == 0  # the previous entry is gone
    finally:
        go.touch()
        output = build.communicate(timeout=120)[0]
    assert build.returncode == 0, output
