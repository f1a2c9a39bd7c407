"""Issue 16: crafted entries, foreign folders, other users and racing processes (each test
reproduces an attack or a failure of the review and checks the outcome it must have now)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import (
    CachedDataset,
    CacheStoreWarning,
    CorruptEntryWarning,
    cached_dataset,
    entry,
)
from cachedload.cli import main
from cachedload.errors import UnsafeCacheWarning
from tests.conftest import another_users_cache, run_as, write_old

VICTIM = 65533  # a real user other than root (whose permissions would hide the bug)


def _loader(cache: Path, counter: list[int], **options: Any) -> CachedDataset[..., Any]:
    @cached_dataset(cache_dir=cache, source="folder", **options)
    def load(folder: str, scale: int = 1) -> dict[str, Any]:
        counter.append(1)
        return {"a": np.arange(5) * scale, "n": scale}

    return load


def _source(tmp_path: Path) -> str:
    write_old(tmp_path / "src" / "x.txt", "x")
    return str(tmp_path / "src")


def _entry_of(load: CachedDataset[..., Any], *args: Any) -> Path:
    path = load.cache_path(*args)
    assert (path / entry.META_FILE).is_file()
    return path


def _edit_meta(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    meta = json.loads((path / entry.META_FILE).read_text())
    edit(meta)
    (path / entry.META_FILE).write_text(json.dumps(meta))


def _cli_survives(cache: Path, capsys: pytest.CaptureFixture[str]) -> str:
    for command in (["ls"], ["ls", "--json"], ["verify"]):
        assert main([*command, "--cache-dir", str(cache)]) in (0, 1)
    return capsys.readouterr().out


# -- item 4: crafted metadata ------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: meta.update(created="yesterday"),
        lambda meta: meta.update(created=[1]),
        lambda meta: meta.update(parameters=["scale"]),
        lambda meta: meta["sources"]["folder"].update(file_count="many"),
        lambda meta: meta.update(racy={"folder": {"/dev/zero": "0"}}),
    ],
)
def test_crafted_metadata_is_a_healed_corrupt_entry_and_listing_survives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Callable[[dict[str, Any]], Any]
) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "cache", _source(tmp_path)
    load = _loader(cache, counter)
    load(src)
    path = _entry_of(load, src)
    _edit_meta(path, edit)
    assert "0 damaged" not in _cli_survives(cache, capsys)
    with pytest.warns(CorruptEntryWarning):
        assert load(src)["n"] == 1
    load(src, 2)  # another key of the same loader: stores and prunes without raising
    assert load(src)["n"] == 1 and len(counter) == 3  # healed: a hit again
    assert "1 damaged" not in _cli_survives(cache, capsys)


def _plant(path: Path, how: str) -> None:
    meta = path / entry.META_FILE
    if how == "deep":
        meta.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    elif how == "folder":
        meta.unlink()
        (meta / "x").mkdir(parents=True)


@pytest.mark.parametrize("how", ["deep", "folder"])
def test_deep_or_folder_metadata_is_healed_and_info_ls_verify_do_not_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "cache", _source(tmp_path)
    load = _loader(cache, counter)
    load(src)
    _plant(_entry_of(load, src), how)
    # A folder named meta.json is not an entry's file: verify names it, --fix leaves it.
    expected = "unknown, left alone" if how == "folder" else "1 damaged"
    assert expected in _cli_survives(cache, capsys)
    assert load.cache_info().entries == 0
    with pytest.warns(CorruptEntryWarning):
        load(src)
    assert load(src)["n"] == 1 and len(counter) == 2
    assert load.cache_info().entries == 1


def test_an_entry_replaced_by_another_keys_copy_or_symlink_is_not_served(tmp_path: Path) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "cache", _source(tmp_path)
    load = _loader(cache, counter)
    load(src, 1)
    load(src, 2)
    one, two = load.cache_path(src, 1), load.cache_path(src, 2)
    for verify in ("size", "always"):
        for replace in ("copy", "symlink"):
            load = _loader(cache, counter, verify=verify)
            shutil.rmtree(one)
            if replace == "copy":
                shutil.copytree(two, one)
            else:
                one.symlink_to(two)
            with pytest.warns(CorruptEntryWarning):
                assert load(src, 1)["n"] == 1  # recomputed, not key 2's value
            assert load(src, 1)["n"] == 1


def test_a_racy_record_naming_a_fifo_does_not_hang(tmp_path: Path) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "cache", _source(tmp_path)
    os.mkfifo(Path(src) / "pipe")
    load = _loader(cache, counter)
    load(src)
    _edit_meta(_entry_of(load, src), lambda meta: meta.update(racy={"folder": {"pipe": "0"}}))
    done = threading.Event()

    def call() -> None:
        load(src)
        done.set()

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(20)
    assert done.is_set() and len(counter) == 2  # a stale entry: recomputed


# -- item 1: never delete what is not ours ------------------------------------------------------
def _home_like(home: Path) -> list[Path]:
    files = [
        home / "Documents" / "taxes" / "2024.pdf",
        home / "photos" / "2024" / "a.jpg",
        home / "huggingface" / "hub" / "model.bin",
        home / "pip" / "http" / "x",
        home / "proj.mod-0123abcd" / ("0" * 32) / "notes.txt",  # shaped like ours by name
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("precious")
    return files


@pytest.mark.parametrize(
    "command",
    [["verify", "--fix"], ["clear", "--all", "--yes"], ["prune", "--max-size", "0"]],
)
def test_management_commands_refuse_a_folder_without_the_tag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    files = _home_like(tmp_path / "home")
    status = main([*command, "--cache-dir", str(tmp_path / "home")])
    assert all(path.read_text() == "precious" for path in files)
    if command[0] != "verify":  # verify --fix reports and deletes nothing ("unknown")
        assert status == 2
        assert "not a cachedload cache directory (no CACHEDIR.TAG)" in capsys.readouterr().err


def test_inside_a_cache_an_unknown_folder_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "cache", _source(tmp_path)
    load = _loader(cache, counter)
    load(src)
    assert (
        (cache / entry.TAG_FILE)
        .read_bytes()
        .startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
    )
    stranger = load.cache_path(src).parent / ("f" * 32) / "thesis.tex"
    stranger.parent.mkdir()
    stranger.write_text("precious")
    main(["verify", "--fix", "--cache-dir", str(cache)])
    assert "left alone" in capsys.readouterr().out
    main(["clear", "--all", "--yes", "--cache-dir", str(cache)])
    assert stranger.read_text() == "precious"


def _forged_cache_with_folders_named_like_ours(home: Path) -> list[Path]:
    """A user's folder with a forged ``CACHEDIR.TAG`` whose "entries" hold folders (and a
    symlink) with the names of an entry's files: theirs, not ours."""
    home.mkdir()
    (home / entry.TAG_FILE).write_bytes(entry.TAG_CONTENT)
    fdir = home / "proj.mod-0123abcd"
    files = [
        fdir / ("1" * 32) / "result.joblib" / "chapter1.tex",
        fdir / ("2" * 32) / "manifest" / "notes.txt",
        fdir / ("3" * 32) / "meta.json" / "draft.md",
        fdir / ("4" * 32) / "result.joblib" / "deep" / "data.csv",
        home / "elsewhere" / "thesis.tex",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("precious")
    (fdir / ("4" * 32) / "meta.json").write_text("{}")  # a file: the folder beside it is not
    (fdir / ("5" * 32)).mkdir()
    (fdir / ("5" * 32) / "result.joblib").symlink_to(home / "elsewhere" / "thesis.tex")
    return [*files, fdir / ("5" * 32) / "result.joblib"]


@pytest.mark.parametrize("command", [["verify", "--fix"], ["clear", "--all", "--yes"]])
def test_folders_named_like_an_entry_s_files_are_never_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    mine = _forged_cache_with_folders_named_like_ours(tmp_path / "home")
    main([*command, "--cache-dir", str(tmp_path / "home")])
    assert [path for path in mine if not os.path.lexists(path)] == []
    assert all(path.read_text() == "precious" for path in mine)


# -- item 2: other users ------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["other-owner", "group-writable"])
def test_a_cache_another_user_can_write_is_not_used(tmp_path: Path, how: str) -> None:
    counter: list[int] = []
    cache, src = another_users_cache(tmp_path, how), _source(tmp_path)
    load = _loader(cache, counter)
    with pytest.warns(UnsafeCacheWarning, match=str(cache)):
        assert load(src)["n"] == 1
    assert load(src)["n"] == 1 and len(counter) == 2  # warned once, never stored
    assert not any(cache.iterdir())
    shared = _loader(cache, counter, shared=True)
    shared(src)
    assert shared(src)["n"] == 1 and len(counter) == 3  # declared shared: used


def _stored_and_a_target(tmp_path: Path) -> tuple[CachedDataset[..., Any], str, Path, Path]:
    """A loader with one stored entry: the loader, its source, the entry's folder, and a file
    of the user's ("mine") that a planted symlink will point at."""
    load = _loader(tmp_path / "cache", [])
    src = _source(tmp_path)
    load(src)
    target = tmp_path / "target.txt"
    target.write_text("mine")
    return load, src, load.cache_path(src), target


def test_planted_symlinks_are_never_followed(tmp_path: Path) -> None:
    load, src, path, target = _stored_and_a_target(tmp_path)
    for suffix in (entry.USED_SUFFIX, entry.OWNER_SUFFIX):
        beside = path.with_name(path.name + suffix)
        beside.unlink(missing_ok=True)
        beside.symlink_to(target)
    load(src)
    load.recompute(src)
    assert target.read_text() == "mine"


def _plant_code(path: Path) -> None:
    """What an attacker who can write the cache does: a pickle that runs code, with the
    metadata's size and checksum fixed up."""
    import pickle

    import xxhash

    marker = path.parent.parent.parent / "owned"
    payload = pickle.dumps(_Boom(str(marker)))
    (path / entry.DATA_FILE).write_bytes(payload)
    _edit_meta(
        path,
        lambda meta: meta["data"].update(
            size=len(payload), xxh3=xxhash.xxh3_128_hexdigest(payload)
        ),
    )


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("verify", ["size", "always"])
def test_a_shared_cache_never_runs_a_planted_pickle(tmp_path: Path, verify: str) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "cache", _source(tmp_path)
    load = _loader(cache, counter, shared=True, verify=verify)
    load(src)
    _plant_code(load.cache_path(src))
    with pytest.warns(CorruptEntryWarning, match="UnsafePickleError"):
        assert load(src)["n"] == 1
    assert not (tmp_path / "owned").exists()
    assert load(src)["n"] == 1 and len(counter) == 2  # healed


def test_with_a_signing_key_unsigned_entries_are_corrupt_and_signed_ones_hold_anything(
    tmp_path: Path,
) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "cache", _source(tmp_path)
    _loader(cache, counter, shared=True)(src)  # unsigned
    signed = _loader(cache, counter, shared=True, signing_key="k")
    with pytest.warns(CorruptEntryWarning, match="not signed"):
        signed(src)
    assert signed(src)["n"] == 1 and len(counter) == 2
    _plant_code(signed.cache_path(src))  # fixed-up checksum, but no key: the signature fails
    with pytest.warns(CorruptEntryWarning, match="not signed"):
        signed(src)
    assert not (tmp_path / "owned").exists()


def test_a_result_a_shared_cache_would_refuse_is_warned_about_at_store_time(
    tmp_path: Path,
) -> None:
    cache, src = tmp_path / "cache", _source(tmp_path)

    @cached_dataset(cache_dir=cache, source="folder", shared=True)
    def load(folder: str) -> Any:
        return _Plain(1)

    with pytest.warns(CacheStoreWarning, match="safe_types"):
        load(src)


@dataclasses.dataclass
class _Plain:
    n: int


# -- item 3: permissions ------------------------------------------------------------------------
def test_a_private_cache_is_0700_and_its_files_0600_under_umask_022(tmp_path: Path) -> None:
    counter: list[int] = []
    cache, src = tmp_path / "missing" / "cache", _source(tmp_path)
    old = os.umask(0o022)
    try:
        _loader(cache, counter)(src)
    finally:
        os.umask(old)
    assert (cache / entry.TAG_FILE).is_file()
    for path in [cache.parent, *cache.rglob("*")]:
        mode = path.lstat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_a_shared_cache_s_tag_keeps_the_mode_of_its_files_under_umask_022(
    tmp_path: Path,
) -> None:
    cache, src = tmp_path / "cache", _source(tmp_path)
    old = os.umask(0o022)
    try:
        _loader(cache, [], shared=True)(src)
    finally:
        os.umask(old)
    assert (cache / entry.TAG_FILE).stat().st_mode & 0o777 == 0o644


def test_a_planted_lock_symlink_is_never_followed(tmp_path: Path) -> None:
    load, src, path, target = _stored_and_a_target(tmp_path)
    lock = path.with_name(path.name + entry.LOCK_SUFFIX)
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    with pytest.warns(CacheStoreWarning, match="symbolic link"):  # refused: computed, not stored
        assert load.recompute(src)["n"] == 1
    assert target.read_text() == "mine" and not target.is_symlink()


def test_a_shared_cache_keeps_the_setgid_group_of_its_root(tmp_path: Path) -> None:
    import stat

    root = tmp_path / "team-cache"
    root.mkdir()
    group = 100 if os.getgid() != 100 else 101  # a group the files would not get by default
    os.chown(root, -1, group)
    os.chmod(root, 0o2770)
    counter: list[int] = []
    old = os.umask(0o007)
    try:
        load = _loader(root, counter, shared=True)
        load(_source(tmp_path))
    finally:
        os.umask(old)
    made = [p for p in root.rglob("*") if not p.is_symlink()]
    assert made and all(p.stat().st_gid == group for p in made)
    folders = [p for p in made if p.is_dir()]
    assert folders and all(p.stat().st_mode & stat.S_ISGID for p in folders)
    assert all(p.stat().st_mode & stat.S_IRGRP for p in made)
    assert load(_source(tmp_path))["n"] == 1 and len(counter) == 1  # and it is used


# -- FIFOs and devices planted in an entry: every operation ends ---------------------------------
_FIFO_SCRIPT = """
import faulthandler, json, os, signal, sys, time, warnings
import numpy as np
from cachedload import cached_dataset
from cachedload.cli import main

warnings.simplefilter("ignore")
faulthandler.dump_traceback_later(100, exit=True)  # a hang beyond the alarms below
CACHE, SRC, WHAT, VERIFY = sys.argv[1:5]

def read_row(path):
    with open(path, "rb") as handle:
        return np.frombuffer(handle.read().ljust(8, b"0")[:8], np.uint8).copy()

whole = cached_dataset(cache_dir=CACHE, source="folder", verify=VERIFY)(
    lambda folder: {"n": len(os.listdir(folder))})
rows = cached_dataset(cache_dir=CACHE, per_item="path", verify=VERIFY)(read_row)
whole(SRC)
rows.map(SRC)

def plant(entry):
    target = entry / WHAT if not WHAT.startswith(".") else entry.with_name(entry.name + WHAT)
    if target.exists():
        target.unlink()
    if WHAT == "result.joblib->/dev/zero":
        os.unlink(entry / "result.joblib")
        os.symlink("/dev/zero", entry / "result.joblib")
    else:
        os.mkfifo(target)
    if WHAT.startswith("result.joblib"):  # the metadata fixed up to match its size, 0
        meta = json.loads((entry / "meta.json").read_text())
        meta["data"]["size"] = 0
        (entry / "meta.json").write_text(json.dumps(meta))

for entry in (whole.cache_path(SRC), rows.map.cache_path(SRC)):
    plant(entry)

class Hung(Exception):
    pass

def alarm(signum, frame):
    raise Hung

signal.signal(signal.SIGALRM, alarm)
hung = []
def run(name, operation):
    signal.alarm(15)
    try:
        operation()
    except Hung:
        hung.append(name)
    except (Exception, SystemExit):
        pass  # an error is an answer; only a hang is not
    finally:
        signal.alarm(0)

def change_one_file():
    path = os.path.join(SRC, "f0.txt")
    with open(path, "w") as handle:
        handle.write("changed")
    os.utime(path, (time.time() - 50,) * 2)

run("hit", lambda: whole(SRC))
run("map hit", lambda: rows.map(SRC))
run("recompute", lambda: whole.recompute(SRC))
run("info", lambda: main(["info", "--cache-dir", CACHE, whole.cache_path(SRC).name]))
run("verify", lambda: main(["verify", "--cache-dir", CACHE]))
for entry in (whole.cache_path(SRC), rows.map.cache_path(SRC)):
    if entry.exists():
        plant(entry)
change_one_file()
run("rebuild", lambda: rows.map(SRC))
run("verify again", lambda: main(["verify", "--cache-dir", CACHE]))
print(json.dumps(hung))
"""


@pytest.mark.parametrize(
    ("what", "verify"),
    [
        (entry.USED_SUFFIX, "size"),
        (entry.OWNER_SUFFIX, "size"),
        (entry.MANIFEST_FILE, "size"),
        (entry.DATA_FILE, "size"),
        ("result.joblib->/dev/zero", "always"),
    ],
)
def test_a_planted_fifo_or_device_hangs_no_operation(
    tmp_path: Path, what: str, verify: str
) -> None:
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    src = tmp_path / "src"
    for index in range(3):
        write_old(src / f"f{index}.txt", f"row {index}")
    result = subprocess.run(
        [sys.executable, "-c", _FIFO_SCRIPT, str(tmp_path / "cache"), str(src), what, verify],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=200,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [], result.stderr[-3000:]


def test_cache_info_and_entries_of_a_cache_another_user_owns_warn_and_report_nothing(
    tmp_path: Path,
) -> None:
    # A folder the victim (a real non-root uid) can reach, a source in it, and her cache dir
    # that another user (nobody) created first, 0700: she cannot even list it.
    shared = Path(tempfile.mkdtemp(prefix="cachedload-victim-"))
    try:
        shared.chmod(0o755)
        write_old(shared / "src" / "x.txt", "x")
        cache = shared / "cache"
        cache.mkdir(0o700)
        os.chown(cache, 65534, 65534)
        done = run_as(VICTIM, f"""
            import warnings
            from cachedload import cached_dataset
            from cachedload.errors import UnsafeCacheWarning

            @cached_dataset(cache_dir={str(cache)!r}, source="folder")
            def load(folder):
                return 42

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info = load.cache_info()  # first: it warns as a call would
                assert (info.entries, info.size_bytes) == (0, 0), info
                assert load.entries() == []
                assert load({str(shared / "src")!r}) == 42
                assert load.cache_info().misses == 1 and load.entries() == []
            assert caught and all(w.category is UnsafeCacheWarning for w in caught), caught
            assert str(caught[0].message).count("owned by uid 65534"), caught[0].message
            """)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        shutil.rmtree(shared)


def test_a_signed_entry_whose_signature_does_not_cover_its_manifest_gives_no_rows(
    tmp_path: Path,
) -> None:
    from cachedload.store import LocalRoot
    from tests import test_previous_entry as items

    root, cache = items.folder_of_rows(tmp_path), items.shared_cache(tmp_path)
    load = items.loader(cache, shared=True, signing_key="k")
    load.map(root)
    # Signed as an entry written before the metadata recorded its manifest: the signature
    # covers everything but the manifest, which anyone in the group can then rewrite.
    (path,) = cache.glob(f"*/*/{entry.META_FILE}")
    meta = json.loads(path.read_text())
    del meta[entry.MANIFEST_FIELD]
    signer = LocalRoot(cache, shared=True, signing_key=b"k")
    signer.rewrite_meta(path.parent.parent.name, path.parent.name, meta)
    items._swap_two_paths(cache)
    assert items.rows_text(load.map(root)) == items.expected(root)  # the data is signed
    items.change_one(root)
    rebuilt = load.map(root)
    assert items.rows_text(rebuilt) == items.expected(root)
    (newest,) = (p for p in cache.glob(f"*/*/{entry.META_FILE}") if p != path)
    assert json.loads(newest.read_text())["items"]["reused"] == 0
