"""Another user who can write part of a cache never runs code, nor plants a result, in the
victim's process: real uids (a victim and an attacker in one group, see tests/users.py), real
processes, the attacker acting between and during the victim's calls."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import aws_env
from tests.users import (
    ATTACKER,
    GROUP,
    VICTIM,
    finish,
    run_as,
    start_as,
    user_folder,
    users_folder,
)


class _Planted:
    """Pickles as a call of ``open(marker, "w")``: the proof that a planted pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _payload(marker: Path, size: int | None = None) -> bytes:
    """A pickle that runs code, padded after its STOP to ``size`` bytes if given."""
    raw = pickle.dumps(_Planted(marker), protocol=4)
    return raw if size is None else raw + b"\0" * (size - len(raw))


def _source(folder: Path, files: int = 1) -> Path:
    """A source folder both users can read, its files an hour old (no racy checks)."""
    folder.mkdir()
    old = time.time() - 3600
    for i in range(files):
        (folder / f"f{i:04}.txt").write_text(str(i))
        os.utime(folder / f"f{i:04}.txt", (old, old))
    return folder


def _victim(cache: Path | str, src: Path, options: str, value: str, steps: str) -> str:
    """The victim's program: a loader on ``cache`` and the calls of ``steps``; ``report(x)``
    prints a result and the warnings of the call that made it."""
    return f"""
        import json, pathlib, time, warnings
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, source="folder", {options})
        def load(folder):
            return {value}

        SRC = {str(src)!r}

        def call():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = load(SRC)
            return value, [f"{{w.category.__name__}}: {{w.message}}" for w in caught]

        def wait_for(name):
            deadline = time.monotonic() + 60  # never left behind by a test that failed
            while not pathlib.Path(name).exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"gave up waiting for {{name}}")
                time.sleep(0.01)

        {steps}
    """


def _wait_ready(victim: subprocess.Popen[str], ready: Path) -> Path:
    """Wait until the victim wrote ``ready`` (fail with its output if it ended first)."""
    while not ready.exists():
        if victim.poll() is not None:
            finish(victim)
            raise AssertionError("the victim ended before it was ready")
        time.sleep(0.01)
    return ready


@pytest.fixture
def users_dir() -> Iterator[Path]:
    yield from users_folder()


@pytest.fixture
def markers(users_dir: Path) -> Path:
    """Where a planted pickle running as the victim would leave its mark."""
    return user_folder(users_dir, "markers", VICTIM, 0o777)


def test_a_signed_shared_cache_never_unpickles_a_swapped_file_ahead(
    users_dir: Path, markers: Path
) -> None:
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src", files=400)  # a fingerprint long enough to read ahead
    steps = """
        for _ in range(2):
            call()  # stored, then a hit that the next call of the group reads ahead
        pathlib.Path("ready").write_text(str(load.cache_path(SRC)))
        wait_for("go")
        value, warned = call()
        print(json.dumps({"sum": float(value.sum()), "warned": warned}))
    """
    victim = start_as(
        VICTIM,
        _victim(cache, src, 'shared=True, signing_key="k"', "np.ones(2_000_000)", steps),
        cwd=markers,
    )
    ready = _wait_ready(victim, markers / "ready")
    run_as(
        ATTACKER,
        f"""
        import os, pathlib
        entry = pathlib.Path({ready.read_text()!r})
        (entry / "planted").write_bytes({_payload(markers / "owned")!r})
        os.rename(entry / "planted", entry / "result.joblib")
        """,
        cwd=users_dir,
    )
    (markers / "go").touch()
    report = json.loads(finish(victim).splitlines()[-1])
    assert not (markers / "owned").exists()
    assert report["sum"] == 2_000_000.0
    assert any("CorruptEntryWarning" in w for w in report["warned"])


def test_a_signed_entry_flipped_between_check_and_use_never_runs_code(
    users_dir: Path, markers: Path
) -> None:
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src")
    steps = """
        call()
        entry = load.cache_path(SRC)
        pathlib.Path("ready").write_text(str(entry))
        wait_for("go")
        sums = set()
        started = time.monotonic()
        while time.monotonic() - started < 4:
            value, warned = call()
            sums.add(float(value.sum()))
        print(json.dumps({"sums": sorted(sums)}))
    """
    victim = start_as(
        VICTIM,
        _victim(cache, src, 'shared=True, signing_key="k"', "np.arange(5)", steps),
        cwd=markers,
    )
    ready = _wait_ready(victim, markers / "ready")
    attacker_dir = user_folder(users_dir, "attacker", ATTACKER, 0o700)
    entry = Path(ready.read_text())
    size = (entry / "result.joblib").stat().st_size
    (attacker_dir / "good").write_bytes((entry / "result.joblib").read_bytes())
    (attacker_dir / "bad").write_bytes(_payload(markers / "owned", size))
    for name in ("good", "bad"):
        os.chown(attacker_dir / name, ATTACKER, GROUP)
    (markers / "go").touch()
    run_as(
        ATTACKER,
        f"""
        import os, time
        entry, mine = {str(entry)!r}, {str(attacker_dir)!r}
        started = time.monotonic()
        while time.monotonic() - started < 4:  # flip the data file as fast as it can
            for name in ("good", "bad"):
                try:
                    os.link(f"{{mine}}/{{name}}", f"{{entry}}/flip")
                    os.rename(f"{{entry}}/flip", f"{{entry}}/result.joblib")
                except OSError:
                    pass  # the victim replaced the entry meanwhile
        """,
        cwd=users_dir,
    )
    report = json.loads(finish(victim).splitlines()[-1])
    assert not (markers / "owned").exists()
    assert report["sums"] == [10.0]


def _plant_entry(cache: Path, entry: Path, data: bytes) -> str:
    """The attacker's code that plants an entry named as ``entry`` in her own folder
    ``cache`` (metadata crafted to match her data file)."""
    relative = entry.relative_to(entry.parent.parent)
    return f"""
        import json, os, pathlib, xxhash
        from cachedload.entry import FORMAT_VERSION
        entry = pathlib.Path({str(cache)!r}) / {str(relative)!r}
        entry.mkdir(parents=True)
        data = {data!r}
        (entry / "result.joblib").write_bytes(data)
        meta = {{"format": FORMAT_VERSION, "key": entry.name,
                 "data": {{"file": "result.joblib", "size": len(data),
                           "xxh3": xxhash.xxh3_128_hexdigest(data)}}}}
        (entry / "meta.json").write_text(json.dumps(meta))
        for folder in (entry.parent.parent, entry.parent, entry):
            if os.stat(folder).st_uid == os.getuid():
                os.chmod(folder, 0o755)
    """


def test_a_private_cache_swapped_under_a_writable_parent_is_noticed_at_the_next_call(
    users_dir: Path, markers: Path
) -> None:
    parent = user_folder(users_dir, "parent", VICTIM, 0o2775)  # group-writable, no sticky bit
    cache, src = parent / "cache", _source(users_dir / "src")
    steps = """
        call()
        call()  # a hit: the folders were checked, and found to be the victim's
        pathlib.Path("ready").write_text(str(load.cache_path(SRC)))
        wait_for("go")
        value, warned = call()
        print(json.dumps({"sum": float(value.sum()), "warned": warned}))
    """
    victim = start_as(VICTIM, _victim(cache, src, "", "np.arange(5)", steps), cwd=markers)
    ready = _wait_ready(victim, markers / "ready")
    entry = Path(ready.read_text())
    run_as(
        ATTACKER,
        f"""
        import os
        os.rename({str(cache)!r}, {str(parent / "victims")!r})
        os.mkdir({str(cache)!r}, 0o755)
        """
        + _plant_entry(cache, entry, _payload(markers / "owned")),
        cwd=users_dir,
    )
    (markers / "go").touch()
    report = json.loads(finish(victim).splitlines()[-1])
    assert not (markers / "owned").exists()
    assert report["sum"] == 10.0
    assert any("UnsafeCacheWarning" in w and str(cache) in w for w in report["warned"])


def test_a_planted_file_in_a_private_cache_is_refused_even_after_the_check(
    users_dir: Path, markers: Path
) -> None:
    """The swap between the folder check and the read: the file opened is checked too."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o700)
    fdir = "m.f-0123456789abcdef"
    key = "ab" * 16
    entry = cache / fdir / key
    entry.mkdir(parents=True)
    (entry / "result.joblib").write_bytes(_payload(markers / "owned"))
    for path in (cache / fdir, entry):
        os.chown(path, VICTIM, GROUP)
        path.chmod(0o700)
    os.chown(entry / "result.joblib", ATTACKER, GROUP)  # what a swapped-in folder holds
    out = run_as(
        VICTIM,
        f"""
        from cachedload.entry import CorruptEntry
        from cachedload.store import LocalRoot
        root = LocalRoot({str(cache)!r})
        assert root.untrusted({fdir!r}) is None
        meta = {{"data": {{"size": {(entry / "result.joblib").stat().st_size}, "xxh3": ""}}}}
        try:
            root.load({fdir!r}, {key!r}, meta, mmap_mode=None, verify=False)
        except CorruptEntry as error:
            print(error.reason)
        """,
        cwd=markers,
    )
    assert "not this user's own" in out
    assert not (markers / "owned").exists()


def test_the_local_copy_of_a_bucket_is_checked_like_a_private_cache(
    users_dir: Path, markers: Path, seaweed: str, url: str
) -> None:
    local = user_folder(users_dir, "scratch", ATTACKER, 0o777)  # pre-created by the attacker
    src = _source(users_dir / "src")
    steps = """
        first, warned = call()
        pathlib.Path("ready").write_text(str(load.cache_path(SRC)))
        wait_for("go")
        second, warned_again = call()
        print(json.dumps({"sums": [float(first.sum()), float(second.sum())],
                          "warned": warned + warned_again}))
    """
    victim = start_as(
        VICTIM,
        _victim(url, src, f"local_cache_dir={str(local)!r}", "np.arange(5)", steps),
        cwd=markers,
        **aws_env(seaweed),
    )
    ready = _wait_ready(victim, markers / "ready")
    entry = Path(ready.read_text())
    planted = users_dir / "planted.joblib"
    import numpy as np

    from cachedload import serialize

    serialize.dump(np.full(5, 666), planted)  # plain data: even a shared cache would load it
    swap = f"""
        import os, shutil
        fdir = {str(entry.parent)!r}
        if os.path.exists(fdir):
            os.rename(fdir, fdir + "-victims")
    """
    run_as(ATTACKER, swap + _plant_entry(local, entry, planted.read_bytes()), cwd=users_dir)
    (markers / "go").touch()
    report = json.loads(finish(victim).splitlines()[-1])
    assert report["sums"] == [10.0, 10.0]
    assert any("UnsafeCacheWarning" in w and str(local) in w for w in report["warned"])
