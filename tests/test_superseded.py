"""Records of superseded entries (cachedload.superseded): bounded, strictly parsed, ours."""

from __future__ import annotations

import base64
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import pytest

from cachedload import CachedDataset, cached_dataset, list_entries
from cachedload import superseded as module
from cachedload.entry import SUPERSEDED_FILE
from cachedload.superseded import Superseded, keep_superseded, read_superseded
from tests.conftest import OLD, write_old
from tests.test_cli import cli

KEY = "0123456789abcdef0123456789abcdef"


def _body(data_dir: str) -> list[str]:
    return sorted(os.listdir(data_dir))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("a.txt", "b.txt"):
        write_old(tmp_path / "data" / name, name)
    return tmp_path / "data"


def _change(data: Path, round: int) -> None:
    write_old(data / "a.txt", "x" * (round + 10), OLD + round)


def _loader(cache: Path) -> CachedDataset[..., list[str]]:
    return cached_dataset(cache_dir=cache)(_body)


def _function_dir(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return folder


def test_the_last_few_superseded_entries_are_recorded_privately(tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    load = _loader(cache)
    keys = []
    for round in range(7):
        _change(data, round)
        load(str(data))
        keys.append(list_entries(cache)[0].id)
    records = read_superseded(_function_dir(cache))
    assert [r.key for r in records] == keys[-1 - module.MAX_RECORDS : -1]  # oldest first
    assert all(r.files is not None and r.manifest_digest for r in records)
    assert records[-1].meta["sources"]["data_dir"]["total_bytes"] == 5 + 15
    info = os.lstat(_function_dir(cache) / SUPERSEDED_FILE)
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_a_large_file_list_is_not_kept_and_why_says_the_fingerprint_changed(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, "MAX_FILES", 1)
    cache = tmp_path / "cache"
    load = _loader(cache)
    load(str(data))
    _change(data, 1)
    load(str(data))
    (record,) = read_superseded(_function_dir(cache))
    assert record.files is None and record.manifest_digest is not None
    summary = load.cache_explain(str(data)).summary()
    assert "fingerprint changed (2 → 2 files, 10 → 16 bytes; no file list stored)" in summary


def _valid() -> dict[str, Any]:
    files = json.dumps({"data_dir": [["a.txt", 5, 1]]}).encode()
    return {
        "key": KEY,
        "removed": 1.5,
        "meta": {
            "key": KEY,
            "function": "m.f",
            "group": "g",
            "sources": {"data_dir": {"path": "/d", "digest": "d", "file_count": 1}},
            "parameters": {"n": {"digest": "1", "value": "1"}},
        },
        "manifest_digest": "ab" * 16,
        "files": base64.b64encode(zlib.compress(files)).decode(),
        "files_bytes": len(files),
    }


def _file(*records: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"format": 1, "records": list(records), **top}).encode()


def _with(**changes: Any) -> bytes:
    record = _valid()
    for name, value in changes.items():
        record[name] = value
    return _file(record)


def _meta(**changes: Any) -> bytes:
    record = _valid()
    record["meta"] = {**record["meta"], **changes}
    return _file(record)


BOMB = base64.b64encode(zlib.compress(b" " * (64 * 1024 * 1024), 9)).decode()
CRAFTED = {
    "not-json": b"{not json",
    "deep": b"[" * 200_000,
    "a-list": b"[]",
    "other-format": json.dumps({"format": 2, "records": []}).encode(),
    "extra-field": _file(_valid(), extra=1),
    "too-many": _file(*[_valid()] * (module.MAX_RECORDS + 1)),
    "bad-key": _with(key="../../etc"),
    "bool-time": _with(removed=True),
    "key-mismatch": _meta(key="f" * 32),
    "unknown-meta-field": _meta(data={"file": "x"}),
    "count-as-text": _meta(sources={"s": {"file_count": "3"}}),
    "parameter-not-text": _meta(parameters={"n": {"value": 1}}),
    "bomb-small-size": _with(files=BOMB, files_bytes=10),
    "bomb-large-size": _with(files=BOMB, files_bytes=64 * 1024 * 1024),
    "files-not-base64": _with(files="@@@@"),
    "rows-wrong": _with(
        files=base64.b64encode(zlib.compress(b'{"s": [["a", "5", 1]]}')).decode(), files_bytes=22
    ),
    "too-large": b" " * (module.MAX_FILE_BYTES + 1),
}


@pytest.mark.parametrize("raw", CRAFTED.values(), ids=CRAFTED.keys())
def test_a_crafted_record_file_counts_as_none(raw: bytes, tmp_path: Path) -> None:
    (tmp_path / SUPERSEDED_FILE).write_bytes(raw)
    assert read_superseded(tmp_path) == []
    keep_superseded(tmp_path, [Superseded(KEY, 2.0, {"function": "m.f"})])  # replaced
    assert [r.removed for r in read_superseded(tmp_path)] == [2.0]


def test_a_valid_record_file_reads_back(tmp_path: Path) -> None:
    (tmp_path / SUPERSEDED_FILE).write_bytes(_file(_valid()))
    (record,) = read_superseded(tmp_path)
    assert record.key == KEY and record.files == {"data_dir": [["a.txt", 5, 1]]}
    assert record.group == "g"


def _plant(kind: str, where: Path) -> None:
    path = where / SUPERSEDED_FILE
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
        (path / "mine.txt").write_text("mine")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder"])
def test_commands_and_loaders_never_hang_or_crash_on_a_planted_record(
    kind: str, tmp_path: Path, data: Path
) -> None:
    cache = tmp_path / "cache"
    load = _loader(cache)
    load(str(data))
    _plant(kind, _function_dir(cache))
    _change(data, 1)
    assert load(str(data)) == ["a.txt", "b.txt"]  # keep=1 deletes, records if it can: no warning
    assert "would be a hit" in load.cache_explain(str(data)).summary()
    for command in (["why", "_body"], ["ls"], ["verify"], ["prune", "--keep", "1"]):
        result = cli(*command, cache=cache)
        assert result.returncode == 0, (command, result.stderr)
        assert "leftover" not in result.stdout
        # verify names a planted folder as what it is, a folder it leaves alone
        named = kind == "folder" and command == ["verify"]
        assert ("unknown, left alone" in result.stdout) == named, result.stdout
    why = cli("why", "_body", cache=cache).stdout
    if kind == "folder":  # cannot be replaced: nothing recorded
        assert "only one entry" in why
    else:  # replaced by the record (renamed over: never written through)
        assert "1 file modified (a.txt)" in why
    assert cli("clear", "--all", "--yes", cache=cache).returncode == 0
    if kind == "folder":  # not ours by type: left alone, with the folder holding it
        assert (_function_dir(cache) / SUPERSEDED_FILE / "mine.txt").read_text() == "mine"
    else:
        assert [p.name for p in cache.iterdir()] == ["CACHEDIR.TAG"]
