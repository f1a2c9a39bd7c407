"""Issue 16: crafted entries, foreign folders, other users and racing processes (each test
reproduces an attack or a failure of the review and checks the outcome it must have now)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import CachedDataset, CorruptEntryWarning, cached_dataset, entry
from cachedload.cli import main
from tests.conftest import write_old


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
    assert "1 damaged" in _cli_survives(cache, capsys)
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
