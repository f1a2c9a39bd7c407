"""Holes another user (the attacker uid) can still use against the victim's process, found by
attacking main with real uids and processes (see tests/users.py): each test asserts the safe
behaviour, so it fails while the hole is open."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_hostile_users import _payload, _source, _wait_ready
from tests.users import (
    ATTACKER,
    GROUP,
    VICTIM,
    finish,
    start_as,
    user_folder,
    users_folder,
)


@pytest.fixture
def users_dir() -> Iterator[Path]:
    yield from users_folder()


@pytest.fixture
def markers(users_dir: Path) -> Path:
    """Where a planted pickle running as the victim would leave its mark."""
    return user_folder(users_dir, "markers", VICTIM, 0o777)


def _shared_folder(parent: Path, name: str) -> Path:
    """A folder of the victim's that the group (the attacker too) can write, its files old."""
    folder = _source(parent / name)
    for path in (folder, *folder.iterdir()):
        os.chown(path, VICTIM, GROUP)
        path.chmod(0o2775 if path.is_dir() else 0o664)
    return folder


def test_a_shared_per_item_build_whose_sources_changed_never_unpickles_its_temporary_file(
    users_dir: Path, markers: Path
) -> None:
    """``shared=True`` (no signing key): a per-item build whose other source changes while it
    runs returns its result loaded back by name from its temporary folder, which the group can
    write, with the full unpickler."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src", files=3)
    labels = _shared_folder(users_dir, "labels")
    victim = start_as(
        VICTIM,
        f"""
        import json, pathlib, time, warnings
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", source="labels",
                        shared=True, mmap_mode="r")
        def row(path, labels):
            time.sleep(0.5)
            if path.endswith("f0002.txt"):  # a teammate updates the labels meanwhile
                pathlib.Path(labels, "f0000.txt").write_text(str(time.time()))
            return np.ones(3)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = row.map({str(src)!r}, labels={str(labels)!r})
        pathlib.Path("done").touch()
        print(json.dumps({{"kind": type(value).__name__,
                           "warned": [str(w.message) for w in caught]}}))
        """,
        cwd=markers,
    )
    attacker = start_as(
        ATTACKER,
        f"""
        import glob, os, time
        payload, done = {_payload(markers / "owned")!r}, {str(markers / "done")!r}
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 9:
            for data in glob.glob({str(cache)!r} + "/*/.tmp-*/result.joblib"):
                planted = os.path.join(os.path.dirname(data), "planted")
                try:
                    with open(planted, "wb") as handle:
                        handle.write(payload)
                    os.rename(planted, data)
                except OSError:
                    pass  # the folder went meanwhile
            time.sleep(0.002)
        """,
        cwd=users_dir,
    )
    report = json.loads(finish(victim).splitlines()[-1])
    finish(attacker)
    assert not (markers / "owned").exists(), "the attacker's pickle ran as the victim"
    assert report["kind"] == "ItemArray"
