"""Holes another user (the attacker uid) can still use against the victim's process, found by
attacking main with real uids and processes (see tests/users.py): each test asserts the safe
behaviour, so it fails while the hole is open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.servers import aws_env
from tests.test_hostile_users import _payload, _source, _wait_ready
from tests.users import (
    _PRELUDE,
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


def _shared_folder(parent: Path, name: str, files: int = 1) -> Path:
    """A folder of the victim's that the group (the attacker too) can write, its files old."""
    folder = _source(parent / name, files)
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
        owned, end = {str(markers / "owned")!r}, time.monotonic() + 9
        while not (os.path.exists(done) or os.path.exists(owned)) and time.monotonic() < end:
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
    out, errors = victim.communicate(timeout=60)
    finish(attacker)
    assert not (markers / "owned").exists(), "the attacker's pickle ran as the victim"
    assert victim.returncode == 0, errors
    assert json.loads(out.splitlines()[-1])["kind"] == "ItemArray"


def _indexed_payload(marker: Path) -> bytes:
    """A data file whose index (a pickle, read first) runs code: the head of a cachedload data
    file, then the payload where the index belongs."""
    from cachedload import serialize

    index = serialize._MAGIC + _payload(marker)
    return serialize._HEAD + serialize._U64.pack(len(index)) + index


def test_a_signed_shared_rebuild_never_unpickles_the_previous_entry_swapped_after_its_check(
    users_dir: Path, markers: Path
) -> None:
    """``shared=True, signing_key=``: an incremental rebuild checks the previous entry's
    signature on one descriptor (``reusable``), then reads its index by name again with the
    full unpickler (``serialize.array_extents``) and copies its rows from a third open."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _shared_folder(users_dir, "src", files=3)
    mine = user_folder(users_dir, "attacker", ATTACKER, 0o700)
    victim = start_as(
        VICTIM,
        f"""
        import json, os, pathlib, time
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", shared=True,
                        signing_key="k")
        def row(path):
            return np.full(1_000_000, 1.0)

        SRC = {str(src)!r}
        row.map(SRC)
        pathlib.Path("go").touch()
        sums, started, i = set(), time.monotonic(), 0
        while time.monotonic() - started < 7 and not pathlib.Path("owned").exists():
            time.sleep(0.05)  # the newest entry stays the previous one of the next rebuild
            # A file added: a rebuild copying the others' rows.
            extra = pathlib.Path(SRC, f"x{{i}}.txt")
            extra.write_text(str(i))
            os.utime(extra, (time.time() - 3600,) * 2)
            value = row.map(SRC)
            sums.add(float(value.array.sum()) / len(value.array))
            extra.unlink()
            i += 1
        pathlib.Path("done").touch()
        print(json.dumps({{"rebuilds": i, "row_sums": sorted(sums)}}))
        """,
        cwd=markers,
    )
    _wait_ready(victim, markers / "go")
    attacker = start_as(
        ATTACKER,
        f"""
        import glob, os, time
        cache, mine, done = {str(cache)!r}, {str(mine)!r}, {str(markers / "done")!r}
        bad = {_indexed_payload(markers / "owned")!r}
        seen = set()
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 9:
            for data in glob.glob(cache + "/*/*/result.joblib"):
                entry = os.path.dirname(data)
                key = os.path.basename(entry)
                if key not in seen:  # a link to the genuine file, and a planted twin
                    try:  # group-writable: fs.protected_hardlinks allows the link
                        os.link(data, f"{{mine}}/good-{{key}}")
                        size = os.stat(data).st_size
                    except OSError:
                        continue
                    with open(f"{{mine}}/bad-{{key}}", "wb") as handle:
                        handle.write(bad)
                        handle.truncate(max(size, len(bad)))
                    seen.add(key)
                for name in ("good", "bad"):
                    try:
                        os.link(f"{{mine}}/{{name}}-{{key}}", f"{{entry}}/flip")
                        os.rename(f"{{entry}}/flip", data)
                        os.unlink(f"{{entry}}/flip")  # left by a rename onto the same file
                    except OSError:
                        pass  # replaced or removed meanwhile
        """,
        cwd=users_dir,
    )
    report = json.loads(finish(victim).splitlines()[-1])
    finish(attacker)
    assert report["rebuilds"] > 5
    assert not (markers / "owned").exists(), "the attacker's pickle ran as the victim"
    assert report["row_sums"] == [1_000_000.0]


def test_a_signed_shared_rebuild_never_copies_rows_swapped_in_after_its_check(
    users_dir: Path, markers: Path
) -> None:
    """As above, the planted file a copy of the genuine one with other row values: the
    rows copied come from a third open by name (``builder._open_previous``), and the new
    entry holding them is signed with the victim's key (a planted result, no warning)."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _shared_folder(users_dir, "src", files=3)
    mine = user_folder(users_dir, "attacker", ATTACKER, 0o700)
    victim = start_as(
        VICTIM,
        f"""
        import json, os, pathlib, time
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", shared=True,
                        signing_key="k")
        def row(path):
            return np.full(1_000_000, 1.0)

        SRC = {str(src)!r}
        row.map(SRC)
        pathlib.Path("go").touch()
        sums, started, i = set(), time.monotonic(), 0
        while time.monotonic() - started < 7 and len(sums) < 2:
            time.sleep(0.3)  # the newest entry stays the previous one of the next rebuild
            # A file added: a rebuild copying the others' rows.
            extra = pathlib.Path(SRC, f"x{{i}}.txt")
            extra.write_text(str(i))
            os.utime(extra, (time.time() - 3600,) * 2)
            value = row.map(SRC)
            sums.add(float(value.array.sum()) / len(value.array))
            extra.unlink()
            i += 1
        pathlib.Path("done").touch()
        print(json.dumps({{"rebuilds": i, "row_sums": sorted(sums)}}))
        """,
        cwd=markers,
    )
    _wait_ready(victim, markers / "go")
    attacker = start_as(
        ATTACKER,
        f"""
        import glob, os, time
        cache, mine, done = {str(cache)!r}, {str(mine)!r}, {str(markers / "done")!r}
        seen = set()
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 9:
            for data in glob.glob(cache + "/*/*/result.joblib"):
                entry = os.path.dirname(data)
                key = os.path.basename(entry)
                if key not in seen:  # a link to the genuine file, and a planted twin
                    try:  # group-writable: fs.protected_hardlinks allows the link
                        os.link(data, f"{{mine}}/good-{{key}}")
                        size = os.stat(data).st_size
                    except OSError:
                        continue
                    with open(data, "rb") as handle:  # the rows' 1.0s become 2.0s
                        bad = handle.read().replace(b"\\0" * 6 + b"\\xf0?", b"\\0" * 7 + b"@")
                    with open(f"{{mine}}/bad-{{key}}", "wb") as handle:
                        handle.write(bad)
                    seen.add(key)
                for name in ("good", "bad"):
                    try:
                        os.link(f"{{mine}}/{{name}}-{{key}}", f"{{entry}}/flip")
                        os.rename(f"{{entry}}/flip", data)
                        os.unlink(f"{{entry}}/flip")  # left by a rename onto the same file
                    except OSError:
                        pass  # replaced or removed meanwhile
        """,
        cwd=users_dir,
    )
    report = json.loads(finish(victim).splitlines()[-1])
    finish(attacker)
    assert report["row_sums"] == [1_000_000.0], "the victim got rows the attacker planted"
    assert report["rebuilds"] > 5


def test_a_private_cache_under_a_writable_parent_never_serves_another_entrys_data(
    users_dir: Path, markers: Path
) -> None:
    """A private cache in a group-writable parent (no sticky bit): the root is checked with a
    ``stat`` that follows a symlink, the metadata read from the entry folder, and the data
    file opened again by its full path. The attacker renames the root away, puts a symlink to
    it in its place (the same folder: trusted), and flips that symlink to a folder of hers
    where the entry's name links to another of the victim's own entries: the metadata of one,
    the data (the victim's own file, of the same size) of the other, no warning."""
    parent = user_folder(users_dir, "parent", VICTIM, 0o2775)
    cache = parent / "cache"
    sources = {}
    for name, content in (("a", "1"), ("b", "2")):
        sources[name] = folder = _shared_folder(users_dir, name)
        (folder / "f0000.txt").write_text(content)
        os.utime(folder / "f0000.txt", (time.time() - 3600,) * 2)
    victim = start_as(
        VICTIM,
        f"""
        import json, pathlib, time, warnings
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, source="folder")
        def load(folder):
            return np.full(5, float(pathlib.Path(folder, "f0000.txt").read_text()))

        A, B = {str(sources["a"])!r}, {str(sources["b"])!r}
        load(A), load(B), load(A)  # both stored, then a hit
        pathlib.Path("ready").write_text(json.dumps([str(load.cache_path(A)),
                                                     str(load.cache_path(B))]))
        deadline = time.monotonic() + 60  # never left behind by a test that failed
        while not pathlib.Path("go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        results, started = [], time.monotonic()
        while time.monotonic() - started < 5 and (not results or results[-1][0] == 5.0):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = load(A)
            results.append((float(value.sum()), [str(w.message) for w in caught]))
        pathlib.Path("done").touch()
        print(json.dumps({{"calls": len(results), "wrong": [r for r in results if r[0] != 5.0]}}))
        """,
        cwd=markers,
    )
    entry_a, entry_b = map(Path, json.loads(_wait_ready(victim, markers / "ready").read_text()))
    real, evil = parent / "real", parent / "evil"
    fdir = entry_a.parent.name
    attacker = start_as(
        ATTACKER,
        f"""
        import os, time
        cache, real, evil = {str(cache)!r}, {str(real)!r}, {str(evil)!r}
        done = {str(markers / "done")!r}
        os.rename(cache, real)
        os.symlink(real, cache + ".new")
        os.rename(cache + ".new", cache)  # the same folder, through a symlink: still trusted
        os.makedirs(os.path.join(evil, {fdir!r}))
        os.symlink(os.path.join(real, {fdir!r}, {entry_b.name!r}),
                   os.path.join(evil, {fdir!r}, {entry_a.name!r}))
        open({str(markers / "go")!r}, "w").close()
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 8:
            for target in (evil, real):
                try:
                    os.symlink(target, cache + ".new")
                    os.rename(cache + ".new", cache)
                except OSError:
                    pass
        """,
        cwd=users_dir,
    )
    report = json.loads(finish(victim).splitlines()[-1])
    finish(attacker)
    assert report["wrong"] == [], "the victim got another entry's data"
    assert report["calls"] > 10


def test_a_huge_sparse_metadata_file_in_a_shared_cache_never_crashes_a_hit(
    users_dir: Path, markers: Path
) -> None:
    """``shared=True``: ``meta.json`` (like ``manifest``) is read whole, whatever its size; a
    sparse file of a terabyte costs the attacker no disk and the victim its process."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src")
    victim = start_as(
        VICTIM,
        f"""
        import json, pathlib, time, warnings
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, source="folder", shared=True)
        def load(folder):
            return np.arange(5)

        SRC = {str(src)!r}
        load(SRC), load(SRC)
        pathlib.Path("ready").write_text(str(load.cache_path(SRC)))
        deadline = time.monotonic() + 60  # never left behind by a test that failed
        while not pathlib.Path("go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = load(SRC)
        print(json.dumps({{"sum": float(value.sum()),
                           "warned": [f"{{w.category.__name__}}: {{w.message}}" for w in caught]}}))
        """,
        cwd=markers,
    )
    entry = Path(_wait_ready(victim, markers / "ready").read_text())
    attacker = start_as(
        ATTACKER,
        f"""
        import os
        entry = {str(entry)!r}
        with open(entry + "/planted", "wb") as handle:
            handle.truncate(1 << 40)  # sparse: no disk used
        os.rename(entry + "/planted", entry + "/meta.json")
        """,
        cwd=users_dir,
    )
    finish(attacker)
    (markers / "go").touch()
    try:
        report = json.loads(finish(victim, timeout=60).splitlines()[-1])
    finally:
        (entry / "meta.json").unlink(missing_ok=True)
    assert report["sum"] == 10.0
    assert any("CorruptEntryWarning" in w for w in report["warned"])


def _start_cli_as(uid: int, code: str, *, cwd: Path) -> subprocess.Popen[str]:
    """:func:`start_as`, with the command line's modules imported before dropping privileges."""
    program = "import argparse, cachedload.cli\n" + _PRELUDE.format(uid=uid, group=GROUP)
    return subprocess.Popen(
        [sys.executable, "-c", program + textwrap.dedent(code)],
        cwd=cwd,
        env=subprocess_env(HOME=str(cwd)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _plant_sparse(entry: Path, name: str) -> str:
    """The attacker's code replacing ``entry/name`` by a sparse file of a terabyte."""
    return f"""
        import os
        entry = {str(entry)!r}
        with open(entry + "/planted", "wb") as handle:
            handle.truncate(1 << 40)  # sparse: no disk used
        os.rename(entry + "/planted", entry + "/" + {name!r})
    """


def test_a_huge_sparse_manifest_in_a_shared_cache_never_crashes_a_rebuild(
    users_dir: Path, markers: Path
) -> None:
    """``shared=True``, ``loader.map``: the previous entry's manifest is read whole."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _shared_folder(users_dir, "src", files=3)
    victim = start_as(
        VICTIM,
        f"""
        import json, os, pathlib, time, warnings
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", shared=True)
        def row(path):
            return np.ones(4)

        SRC = {str(src)!r}
        row.map(SRC)
        pathlib.Path("ready").write_text(str(row.map.cache_path(SRC)))
        deadline = time.monotonic() + 60  # never left behind by a test that failed
        while not pathlib.Path("go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = pathlib.Path(SRC, "new.txt")
        extra.write_text("new")
        os.utime(extra, (time.time() - 3600,) * 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = row.map(SRC)
        print(json.dumps({{"rows": len(value.array)}}))
        """,
        cwd=markers,
    )
    entry = Path(_wait_ready(victim, markers / "ready").read_text())
    finish(start_as(ATTACKER, _plant_sparse(entry, "manifest"), cwd=users_dir))
    (markers / "go").touch()
    try:
        report = json.loads(finish(victim, timeout=60).splitlines()[-1])
    finally:
        (entry / "manifest").unlink(missing_ok=True)
    assert report["rows"] == 4


def test_cli_ls_and_verify_survive_a_huge_sparse_metadata_file_in_a_shared_cache(
    users_dir: Path, markers: Path
) -> None:
    """``cachedload ls`` and ``verify`` run by the victim over a shared cache."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src")
    out = finish(
        start_as(
            VICTIM,
            f"""
            import numpy as np
            from cachedload import cached_dataset

            @cached_dataset(cache_dir={str(cache)!r}, source="folder", shared=True)
            def load(folder):
                return np.arange(5)

            load({str(src)!r})
            print(load.cache_path({str(src)!r}))
            """,
            cwd=markers,
        )
    )
    entry = Path(out.splitlines()[-1])
    finish(start_as(ATTACKER, _plant_sparse(entry, "meta.json"), cwd=users_dir))
    try:
        for command in ("ls", "verify"):
            run = _start_cli_as(
                VICTIM,
                f"""
                import sys
                from cachedload.cli import main
                sys.argv = ["cachedload", {command!r}, "--cache-dir", {str(cache)!r}]
                try:
                    code = main()
                except SystemExit as exit:
                    code = exit.code
                print("exit", code)
                """,
                cwd=markers,
            )
            _, errors = run.communicate(timeout=60)
            assert "Traceback" not in errors, f"cachedload {command} crashed:\n{errors[-2000:]}"
            assert run.returncode in (0, 1), errors
    finally:
        (entry / "meta.json").unlink(missing_ok=True)


def test_a_shared_per_item_build_that_skips_items_never_unpickles_its_temporary_file(
    users_dir: Path, markers: Path
) -> None:
    """``shared=True`` (no signing key), ``loader.map(..., skip=...)`` (as
    ``cached_image_folder(on_error="skip")``): the rows left out are compacted away by
    reading the temporary data file's index back by name with the full unpickler
    (``serialize.array_extents(path)`` in ``builder._compact``), in a folder the group can
    write."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src", files=4)
    victim = start_as(
        VICTIM,
        f"""
        import json, pathlib, time, warnings
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", shared=True)
        def row(path):
            time.sleep(0.4)
            if path.endswith("f0001.txt"):
                raise ValueError("a damaged file")
            return np.ones(3)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = row.map({str(src)!r}, skip=(ValueError,))
        pathlib.Path("done").touch()
        print(json.dumps({{"kind": type(value).__name__}}))
        """,
        cwd=markers,
    )
    attacker = start_as(
        ATTACKER,
        f"""
        import glob, os, time
        payload, done = {_indexed_payload(markers / "owned")!r}, {str(markers / "done")!r}
        owned, end = {str(markers / "owned")!r}, time.monotonic() + 9
        while not (os.path.exists(done) or os.path.exists(owned)) and time.monotonic() < end:
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
    _, errors = victim.communicate(timeout=60)
    finish(attacker)
    assert not (markers / "owned").exists(), "the attacker's pickle ran as the victim"
    assert victim.returncode == 0, errors


def test_a_signed_shared_cache_never_signs_a_data_file_swapped_before_it_is_hashed(
    users_dir: Path, markers: Path
) -> None:
    """``shared=True, signing_key=``: ``put_built`` signs the SHA-256 of the temporary data
    file read again by name (``sha256_of(tmp / DATA_FILE)``) after the build wrote it, in a
    folder the group can write: a file swapped in between is signed by the victim, and then
    every reader with the key unpickles it with the full unpickler."""
    import numpy as np

    from cachedload import serialize

    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src")
    size = serialize.dump(np.arange(5), users_dir / "size.joblib")[0]
    victim = start_as(
        VICTIM,
        f"""
        import json, pathlib, time
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, source="folder", shared=True,
                        signing_key="k")
        def load(folder):
            return np.arange(5)

        SRC = {str(src)!r}
        load(SRC)
        pathlib.Path("go").touch()
        started, sums = time.monotonic(), set()
        while time.monotonic() - started < 6 and not pathlib.Path("owned").exists():
            load.recompute(SRC)  # a store: data written, hashed, signed
            value = load(SRC)  # a hit: the signature checked
            sums.add(str(type(value)) if not hasattr(value, "sum") else float(value.sum()))
        pathlib.Path("done").touch()
        print(json.dumps({{"sums": sorted(map(str, sums))}}))
        """,
        cwd=markers,
    )
    _wait_ready(victim, markers / "go")
    attacker = start_as(
        ATTACKER,
        f"""
        import glob, os, time
        payload, done = {_payload(markers / "owned", size)!r}, {str(markers / "done")!r}
        swapped = set()
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 9:
            for data in glob.glob({str(cache)!r} + "/*/.tmp-*/result.joblib"):
                try:
                    if data in swapped or os.stat(data).st_size != len(payload):
                        continue  # not written yet
                    planted = os.path.join(os.path.dirname(data), "planted")
                    with open(planted, "wb") as handle:
                        handle.write(payload)
                    os.rename(planted, data)
                    swapped.add(data)
                except OSError:
                    pass  # the folder went meanwhile
        """,
        cwd=users_dir,
    )
    report = json.loads(finish(victim).splitlines()[-1])
    finish(attacker)
    assert not (markers / "owned").exists(), "the attacker's pickle ran as the victim"
    assert report["sums"] == ["10.0"]


def test_a_fifo_planted_in_a_shared_builds_temporary_folder_never_hangs_the_build(
    users_dir: Path, markers: Path
) -> None:
    """``shared=True``, ``loader.map(..., ragged=True)``: the rows are computed, then written
    with ``open(tmp / "result.joblib", "wb")`` in a temporary folder the group can write; a
    FIFO planted there meanwhile blocks that open for ever."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src", files=3)
    victim = start_as(
        VICTIM,
        f"""
        import json, pathlib, time
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", shared=True)
        def row(path):
            time.sleep(0.5)
            return np.ones(int(path[-5]) + 1)

        value = row.map({str(src)!r}, ragged=True)
        pathlib.Path("done").touch()
        print(json.dumps({{"rows": len(value.array)}}))
        """,
        cwd=markers,
    )
    attacker = start_as(
        ATTACKER,
        f"""
        import glob, os, time
        done, planted = {str(markers / "done")!r}, set()
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 9 and not planted:
            for tmp in glob.glob({str(cache)!r} + "/*/.tmp-*"):
                try:
                    os.mkfifo(os.path.join(tmp, "result.joblib"))
                    planted.add(tmp)
                except OSError:
                    pass
            time.sleep(0.002)
        print(len(planted))
        """,
        cwd=users_dir,
    )
    assert finish(attacker).strip() == "0"  # the build's folder is the victim's alone
    try:
        report = json.loads(victim.communicate(timeout=6)[0].splitlines()[-1])
    except subprocess.TimeoutExpired:
        victim.kill()
        victim.communicate()
        raise AssertionError("the victim hangs on a FIFO planted in its build folder") from None
    assert report["rows"] == 3


def test_a_symlink_planted_in_a_shared_builds_temporary_folder_never_overwrites_its_target(
    users_dir: Path, markers: Path
) -> None:
    """As above with a symlink to one of the victim's own files: ``open(path, "wb")``
    follows it and truncates that file (any file the victim can write)."""
    cache = user_folder(users_dir, "cache", VICTIM, 0o2775)
    src = _source(users_dir / "src", files=3)
    precious = markers / "precious.txt"
    precious.write_text("the victim's own file")
    os.chown(precious, VICTIM, GROUP)
    precious.chmod(0o644)
    victim = start_as(
        VICTIM,
        f"""
        import json, pathlib, time
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", shared=True)
        def row(path):
            time.sleep(0.5)
            return np.ones(int(path[-5]) + 1)

        value = row.map({str(src)!r}, ragged=True)
        pathlib.Path("done").touch()
        """,
        cwd=markers,
    )
    attacker = start_as(
        ATTACKER,
        f"""
        import glob, os, time
        done, planted = {str(markers / "done")!r}, set()
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 9 and not planted:
            for tmp in glob.glob({str(cache)!r} + "/*/.tmp-*"):
                try:
                    os.symlink({str(precious)!r}, os.path.join(tmp, "result.joblib"))
                    planted.add(tmp)
                except OSError:
                    pass
            time.sleep(0.002)
        print(len(planted))
        """,
        cwd=users_dir,
    )
    assert finish(attacker).strip() == "0"  # the build's folder is the victim's alone
    victim.communicate(timeout=30)
    assert precious.read_bytes() == b"the victim's own file", "the victim's file was overwritten"


def test_the_local_copy_of_a_bucket_is_downloaded_into_private_folders(
    users_dir: Path, markers: Path, seaweed: str, url: str
) -> None:
    """``s3://`` with ``local_cache_dir=`` (umask 002, as on a group-oriented system): an
    entry another node published is downloaded into folders made by ``_fetch`` with
    ``mkdir(parents=True, exist_ok=True)``, i.e. with the umask's group write: the attacker
    can write the local copy, and the next call refuses it (``UnsafeCacheWarning``, the
    loader runs again on every call)."""
    home = user_folder(users_dir, "home", VICTIM, 0o755)
    src = _source(users_dir / "src")
    program = f"""
        import json, sys, warnings
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={url!r}, source="folder",
                        local_cache_dir={str(home)!r} + "/" + sys.argv[1])
        def load(folder):
            return np.arange(5)

        warned = []
        for _ in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load({str(src)!r})
            warned += [f"{{w.category.__name__}}: {{w.message}}" for w in caught]
        print(json.dumps({{"hits": load.cache_info().hits, "warned": warned}}))
    """

    def run(node: str) -> dict[str, object]:
        code = program.replace("sys.argv[1]", repr(node))
        process = start_as(VICTIM, code, cwd=markers, **aws_env(seaweed))
        return dict(json.loads(finish(process).splitlines()[-1]))

    run("node-1")  # stored, published
    report = run("node-2")  # downloaded, then a hit
    loose = [
        f"{path} {oct(path.stat().st_mode & 0o777)}"
        for path in (home / "node-2", *(home / "node-2").rglob("*"))
        if path.is_dir() and path.stat().st_mode & 0o022
    ]
    assert report == {"hits": 2, "warned": []}
    assert loose == [], "the local copy is writable by the group"


def test_a_private_per_item_rebuild_under_a_writable_parent_never_unpickles_a_planted_file(
    users_dir: Path, markers: Path
) -> None:
    """A private cache in a group-writable parent, ``loader.map`` (``verify="always"`` only
    widens the window; the default is open too): ``reusable()`` checks the previous entry's
    data file (owner, size, checksum) on one open, then the builder reads its index
    by name again (``serialize.array_extents``, full unpickler in a private cache) with no
    owner check. The attacker renames the root away, puts a symlink to it in its place
    (trusted: the same folder) and flips it to a folder of hers holding her own files under
    the entries' names (names she can compute by running the same loader on the same data)."""
    parent = user_folder(users_dir, "parent", VICTIM, 0o2775)
    cache = parent / "cache"
    src = _shared_folder(users_dir, "src", files=3)
    victim = start_as(
        VICTIM,
        f"""
        import json, os, pathlib, shutil, time
        import numpy as np
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache)!r}, per_item="path", verify="always")
        def row(path):
            return np.ones(1_000_000)

        SRC = {str(src)!r}
        extra = pathlib.Path(SRC, "x.txt")

        def toggle():  # the extra file comes and goes, the same each time: two keys
            if extra.exists():
                extra.unlink()
            else:
                extra.write_text("x")
                os.utime(extra, (1_600_000_000, 1_600_000_000))

        paths = []
        for _ in range(2):
            row.map(SRC)
            paths.append(str(row.map.cache_path(SRC)))
            toggle()
        pathlib.Path("ready").write_text(json.dumps(paths))
        deadline = time.monotonic() + 60  # never left behind by a test that failed
        while not pathlib.Path("go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        real = pathlib.Path({str(parent / "real")!r})
        started, rebuilds = time.monotonic(), 0
        while time.monotonic() - started < 8 and not pathlib.Path("owned").exists():
            # keep=1 removes the superseded entry; a removal the flips made fail would leave
            # both entries (then only hits): remove this call's own, as keep=1 would.
            own, other = (real / pathlib.Path(path).relative_to({str(cache)!r})
                          for path in (paths[::-1] if extra.exists() else paths))
            if other.exists():
                shutil.rmtree(own, ignore_errors=True)
            try:
                row.map(SRC)  # a rebuild from the other key's entry (keep=1 removed its own)
            except Exception:
                pass
            toggle()
            rebuilds += 1
        pathlib.Path("done").touch()
        print(json.dumps({{"rebuilds": rebuilds, "seconds": time.monotonic() - started}}))
        """,
        cwd=markers,
    )
    paths = json.loads(_wait_ready(victim, markers / "ready").read_text())
    relatives = [str(Path(path).relative_to(cache)) for path in paths]
    real, evil = parent / "real", parent / "evil"
    attacker = start_as(
        ATTACKER,
        f"""
        import os, time
        cache, real, evil = {str(cache)!r}, {str(real)!r}, {str(evil)!r}
        done = {str(markers / "done")!r}
        os.umask(0o022)  # hers alone: the victim's tidying cannot remove them
        for relative in {relatives!r}:
            os.makedirs(os.path.join(evil, relative))
            with open(os.path.join(evil, relative, "result.joblib"), "wb") as handle:
                handle.write({_indexed_payload(markers / "owned")!r})
        os.rename(cache, real)
        os.symlink(real, cache + ".new")
        os.rename(cache + ".new", cache)  # the same folder, through a symlink: still trusted
        open({str(markers / "go")!r}, "w").close()
        started = time.monotonic()
        while not os.path.exists(done) and time.monotonic() - started < 10:
            for target in (evil, real):
                try:
                    os.symlink(target, cache + ".new")
                    os.rename(cache + ".new", cache)
                except OSError as error:
                    print(error)
                    if os.path.lexists(cache + ".new"):
                        os.unlink(cache + ".new")
            time.sleep(0.0001)  # mostly the real folder: it must pass several checks first
        """,
        cwd=users_dir,
    )
    report = json.loads(finish(victim).splitlines()[-1])
    finish(attacker)
    assert not (markers / "owned").exists(), "the attacker's pickle ran as the victim"
    assert report["rebuilds"] > 10
