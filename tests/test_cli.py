"""The ``cachedload`` command, run as a real subprocess on a real cache."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import ReadOnlyCacheError, cached_dataset, list_entries, prune
from cachedload.cli import main
from tests.conftest import read_only, subprocess_env

OLD = time.time() - 7200


def _body(data_dir: str, size: int = 1000) -> np.ndarray:
    return np.arange(size, dtype=np.int64)


def _other(data_dir: str) -> list[str]:
    return sorted(os.listdir(data_dir))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(name)
        os.utime(folder / name, (OLD, OLD))
    return folder


@pytest.fixture
def cache(tmp_path: Path, data: Path) -> Path:
    """A cache with three entries: ``_body`` with two sizes (newest: 2000), and ``_other``."""
    cache = tmp_path / "cache"
    cached_dataset(cache_dir=cache)(_other)(str(data))
    load = cached_dataset(cache_dir=cache)(_body)
    load(str(data), size=1000)
    load(str(data), size=2000)
    load(str(data), size=2000)  # a hit
    return cache


def cli(
    *args: str, cache: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cachedload ARGS [--cache-dir CACHE]``."""
    command = [sys.executable, "-m", "cachedload", *args]
    if cache is not None:
        command += ["--cache-dir", str(cache)]
    return subprocess.run(
        command,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )


def ls_json(cache: Path, *args: str) -> list[dict[str, Any]]:
    result = cli("ls", "--json", *args, cache=cache)
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, Any]] = json.loads(result.stdout)
    return entries


def test_ls_json_round_trips(cache: Path, data: Path) -> None:
    entries = ls_json(cache)
    assert [e["id"] for e in entries] == [r.id for r in list_entries(cache)]
    newest = entries[0]
    assert newest["function"] == f"{__name__}._body"
    assert newest["parameters"] == {"size": "2000"}
    assert newest["sources"] == {
        "data_dir": {"path": str(data.resolve()), "file_count": 2, "total_bytes": 10}
    }
    assert newest["hits"] == 1 and entries[1]["hits"] == 0
    assert newest["size_bytes"] > 16000
    assert newest["created"] <= newest["last_used"] <= time.time()
    assert {e["function"] for e in ls_json(cache, "--function", "_other")} == {f"{__name__}._other"}


def test_ls_table_has_totals(cache: Path) -> None:
    result = cli("ls", cache=cache)
    assert result.returncode == 0, result.stderr
    header, *rows, totals = result.stdout.splitlines()
    assert header.split()[:5] == ["ID", "FUNCTION", "CODE", "PARAMETERS", "SOURCES"]
    assert len(rows) == 3 and "size=2000" in rows[0] and "(2 files)" in rows[0]
    total = sum(r.size_bytes for r in list_entries(cache))
    assert totals.startswith("3 entries, ") and f"{total / 1000:.1f} KB" in totals
    (cache.parent / "empty").mkdir()
    assert cli("ls", cache=cache.parent / "empty").stdout.startswith("no entries")


def test_ls_uses_the_cache_dir_from_the_environment(cache: Path) -> None:
    env = subprocess_env(CACHEDLOAD_DIR=str(cache))
    result = subprocess.run(
        [sys.executable, "-m", "cachedload", "ls", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert len(json.loads(result.stdout)) == 3


def test_cache_dir_may_come_before_the_command(cache: Path) -> None:
    before = cli("--cache-dir", str(cache), "ls", "--json")
    assert before.returncode == 0, before.stderr
    assert [e["id"] for e in json.loads(before.stdout)] == [e["id"] for e in ls_json(cache)]


def test_info_takes_a_prefix(cache: Path) -> None:
    record = list_entries(cache)[0]
    result = cli("info", record.id[:8], cache=cache)
    assert result.returncode == 0, result.stderr
    assert record.id in result.stdout and "size = 2000" in result.stdout
    assert "hits       1" in result.stdout
    as_json = json.loads(cli("info", record.id[:8], "--json", cache=cache).stdout)
    assert as_json["meta"]["key"] == record.id and as_json["in_use"] is False

    unknown = cli("info", "zzzz", cache=cache)
    assert unknown.returncode == 2 and "no entry" in unknown.stderr
    ambiguous = cli("info", "", cache=cache)
    assert ambiguous.returncode == 2 and "matches 3 entries" in ambiguous.stderr


def test_clear_by_function_and_age(cache: Path) -> None:
    result = cli("clear", "--function", "_other", cache=cache)
    assert result.returncode == 0, result.stderr
    assert "removed 1 entry" in result.stdout
    assert {e["function"] for e in ls_json(cache)} == {f"{__name__}._body"}

    oldest = list_entries(cache)[-1]
    used = oldest.path.parent / f"{oldest.id}.used"
    used.write_bytes(b".")
    os.utime(used, (OLD - 40 * 86400, OLD - 40 * 86400))
    assert cli("clear", "--older-than", "30d", cache=cache).returncode == 0
    assert [e["id"] for e in ls_json(cache)] == [list_entries(cache)[0].id] != [oldest.id]

    nothing = cli("clear", cache=cache)
    assert nothing.returncode == 2 and "--all" in nothing.stderr


def test_clear_all_asks_first(cache: Path) -> None:
    refused = cli("clear", "--all", cache=cache)  # stdin is not a terminal: cannot ask
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert len(ls_json(cache)) == 3

    result = cli("clear", "--all", "--yes", cache=cache)
    assert result.returncode == 0, result.stderr
    assert "removed 3 entries" in result.stdout
    assert ls_json(cache) == []
    assert [p.name for p in cache.iterdir()] == ["CACHEDIR.TAG"]  # a cache, still


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "status", "left"), [("n\n", 1, 3), ("", 1, 3), ("yes\n", 0, 0)])
def test_clear_all_confirmation_on_a_terminal(
    cache: Path,
    answer: str,
    status: int,
    left: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", _Terminal(answer))
    assert main(["clear", "--all", "--cache-dir", str(cache)]) == status
    assert "Delete 3 entries (" in capsys.readouterr().out
    assert len(list_entries(cache)) == left


def test_prune_reports_what_was_freed(cache: Path) -> None:
    records = list_entries(cache)
    result = cli("prune", "--max-size", "25KB", cache=cache)
    assert result.returncode == 0, result.stderr
    remaining = list_entries(cache)
    freed = sum(r.size_bytes for r in records) - sum(r.size_bytes for r in remaining)
    assert freed > 0 and sum(r.size_bytes for r in remaining) <= 25_000
    assert f"freed {freed / 1000:.1f} KB" in result.stdout
    assert cli("prune", "--max-size", "lots", cache=cache).returncode == 2
    assert cli("prune", cache=cache).returncode == 2  # nothing to apply


def test_why_explains_the_two_newest_entries(cache: Path, data: Path) -> None:
    (data / "c.txt").write_text("c")
    os.utime(data / "c.txt", (OLD, OLD))
    cached_dataset(cache_dir=cache)(_body)(str(data), size=3000)

    result = cli("why", "_body", cache=cache)
    assert result.returncode == 0, result.stderr
    assert "parameter size: 2000 → 3000" in result.stdout
    assert "1 file added (c.txt)" in result.stdout
    assert "only one entry" in cli("why", "_other", cache=cache).stdout
    assert cli("why", "test_cli", cache=cache).returncode == 2  # ambiguous
    assert cli("why", "nothing_like_it", cache=cache).returncode == 2


def test_verify_catches_a_corrupted_file(cache: Path) -> None:
    assert cli("verify", cache=cache).returncode == 0
    damaged = list_entries(cache)[1]
    with open(damaged.path / "result.joblib", "r+b") as handle:  # same size, other bytes
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\xff" * 8)

    result = cli("verify", cache=cache)
    assert result.returncode == 1
    assert f"CORRUPT  {damaged.id[:12]}" in result.stdout
    assert result.stdout.count("OK ") == 2 and "1 damaged" in result.stdout

    fixed = cli("verify", "--fix", cache=cache)
    assert fixed.returncode == 1 and "(deleted)" in fixed.stdout
    assert not damaged.path.exists()
    assert cli("verify", cache=cache).returncode == 0


def test_demo(tmp_path: Path) -> None:
    result = cli("demo", "--images", "6", cache=tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert "speed-up" in result.stdout
    assert len(list_entries(tmp_path / "demo")) == 1
    # Its hints name the cache it used: as printed, they act on it.
    where = f"--cache-dir {tmp_path / 'demo'}"
    assert f"cachedload clear --function load_demo_images {where}" in result.stdout
    assert f"cachedload ls {where}" in result.stdout


def test_the_demo_writes_its_images_to_a_fresh_temporary_directory_it_names(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "temp"
    fixed = temp / "cachedload-demo"  # where earlier versions wrote, emptying it first
    fixed.mkdir(parents=True)
    (fixed / "keep.txt").write_text("not the demo's")
    folders = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "cachedload", "demo", "--images", "4"],
            capture_output=True,
            text=True,
            env=subprocess_env(TMPDIR=str(temp), CACHEDLOAD_DIR=str(tmp_path / "cache")),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        named = result.stdout.split("new temporary directory: ", 1)[1].split()[0]
        folders.append(Path(named))
    assert folders[0] != folders[1]
    assert all(
        folder.parent.parent == temp and len(list(folder.rglob("*.jpg"))) == 4 for folder in folders
    )
    assert (fixed / "keep.txt").read_text() == "not the demo's"


@pytest.mark.parametrize("command", ["ls", "info", "clear", "prune", "why", "verify", "demo"])
def test_every_command_has_help_and_a_cache_dir_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--cache-dir" in out and "example" in out


def test_top_level_help_lists_commands_and_exit_codes() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("ls", "info", "clear", "prune", "why", "verify", "demo", "exit status"):
        assert command in result.stdout


BAD_CACHE_DIRS = [
    "   ",
    "s3:/typo",
    "file://",
    "~nosuchuser_cachedload/c",
    "http://x/y",
    "nosuch://x",
]


@pytest.mark.parametrize("value", ["", *BAD_CACHE_DIRS])
def test_a_bad_cache_dir_option_is_one_line_and_exit_2(value: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachedload", "ls", "--cache-dir", value],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("cachedload: error: --cache-dir: ")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", BAD_CACHE_DIRS)
def test_a_bad_cachedload_dir_is_one_line_naming_the_variable(value: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachedload", "ls"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(CACHEDLOAD_DIR=value),
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("cachedload: error: $CACHEDLOAD_DIR: ")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_cache_dir_is_that_folder(cache: Path) -> None:
    listed = cli("ls", "--cache-dir", f"file://{cache}")
    assert listed.returncode == 0, listed.stderr
    assert f"in {cache}" in listed.stdout and "3 entries" in listed.stdout


@pytest.fixture
def with_copies(cache: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``cache`` also holding a remote cache's local copy (2 entries), made by a real remote
    cache (fsspec's memory file system) whose default local copy is ``cache/remote/<name>``."""
    pytest.importorskip("fsspec")
    monkeypatch.setenv("CACHEDLOAD_DIR", str(cache))
    url = f"memory://cachedload-{uuid.uuid4().hex[:8]}/shared"
    remote = cached_dataset(cache_dir=url)(_body)
    remote(str(data), size=10)
    remote(str(data), size=20)
    assert len(list((cache / "remote").glob("*/*/*/meta.json"))) == 2
    return cache


def test_local_copies_of_a_remote_cache_are_shown_as_such_never_as_damaged(
    with_copies: Path,
) -> None:
    listed = cli("ls", cache=with_copies)
    assert listed.returncode == 0, listed.stderr
    assert "3 entries, " in listed.stdout
    assert "local copy of memory://cachedload-" in listed.stdout
    assert "2 local copies of remote entries" in listed.stdout
    as_json = ls_json(with_copies)
    assert len(as_json) == 5
    assert sum(1 for e in as_json if e.get("copy_of", "").startswith("memory://")) == 2

    checked = cli("verify", cache=with_copies)
    assert checked.returncode == 0, checked.stdout
    assert "CORRUPT" not in checked.stdout and checked.stdout.count("OK ") == 5
    assert "checked 3 entries and 2 local copies of remote entries" in checked.stdout
    fixed = cli("verify", "--fix", cache=with_copies)
    assert fixed.returncode == 0 and len(ls_json(with_copies)) == 5


def test_a_damaged_local_copy_is_reported_and_fixed_as_a_local_copy(with_copies: Path) -> None:
    copy = next((with_copies / "remote").glob("*/*/*/result.joblib"))
    copy.write_bytes(b"garbage")
    result = cli("verify", "--fix", cache=with_copies)
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("CORRUPT"))
    assert "local copy of memory://" in line and "(deleted)" in line
    assert not copy.parent.exists() and len(ls_json(with_copies)) == 4


def test_clear_all_counts_what_ls_shows_and_keeps_what_is_not_an_entry(
    with_copies: Path,
) -> None:
    stray = [
        with_copies / "notes",  # not a function folder by name
        with_copies / "remote" / "notes.txt",
        next(with_copies.glob("*_body-*")) / "not-a-key",  # not an entry by name
    ]
    stray[0].mkdir()
    (stray[0] / "keep.txt").write_text("mine")
    stray[1].write_text("mine")
    stray[2].mkdir()
    assert cli("verify", cache=with_copies).returncode == 0

    refused = cli("clear", "--all", cache=with_copies)
    assert "Delete 3 entries and 2 local copies of remote entries (" in refused.stderr + (
        refused.stdout
    )
    result = cli("clear", "--all", "--yes", cache=with_copies)
    assert result.returncode == 0, result.stderr
    assert "removed 5 entries" in result.stdout and "damaged" not in result.stdout
    assert ls_json(with_copies) == []
    assert all(path.exists() for path in stray)
    assert list((with_copies / "remote").glob("*/*/*/meta.json")) == []


def test_version_matches_the_package() -> None:
    import cachedload

    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"cachedload {cachedload.__version__}"
    # The installed distribution's metadata (pyproject.toml's version) says the same.
    assert importlib.metadata.version("cachedload") == cachedload.__version__


def test_ls_of_a_function_with_no_entry_is_a_usage_error(cache: Path) -> None:
    result = cli("ls", "--function", "nothing_like_it", cache=cache)
    assert result.returncode == 2 and "nothing_like_it" in result.stderr
    assert f"{__name__}._other" in result.stderr  # what is there instead
    assert cli("ls", "--json", "--function", "nothing_like_it", cache=cache).returncode == 2


def test_top_level_help_describes_cache_dir() -> None:
    out = cli("--help").stdout
    described = " ".join(out.split("--cache-dir DIR", 2)[2].split())
    assert "as the commands'" not in described and "the cache directory" in described


def test_ls_shows_each_entry_s_code_version(cache: Path, data: Path) -> None:
    def _other(data_dir: str) -> list[str]:  # same name, other code
        return sorted(os.listdir(data_dir), reverse=True)

    _other.__qualname__ = "_other"
    cached_dataset(cache_dir=cache)(_other)(str(data))
    rows = cli("ls", "--function", "_other", cache=cache).stdout.splitlines()[1:3]
    codes = {row.split()[2] for row in rows}
    assert len(codes) == 2 and all(len(code) == 8 for code in codes)
    assert codes == {r.meta["code"][:8] for r in list_entries(cache) if "_other" in r.function}


def test_why_says_whose_code_changed(cache: Path, data: Path) -> None:
    def _other(data_dir: str) -> list[str]:  # same name, other code
        return sorted(os.listdir(data_dir), reverse=True)

    _other.__qualname__ = "_other"
    cached_dataset(cache_dir=cache)(_other)(str(data))
    result = cli("why", "_other", cache=cache)
    assert result.returncode == 0, result.stderr
    assert f"code changed in the loader ({__name__}._other)" in result.stdout


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _collapsed(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", [[], ["ls"], ["verify"]])
def test_help_names_the_platform_default_not_the_variable_s_value(
    command: list[str], tmp_path: Path
) -> None:
    from cachedload.config import platform_cache_dir

    elsewhere = tmp_path / "set-by-the-variable"
    result = subprocess.run(
        [sys.executable, "-m", "cachedload", *command, "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(CACHEDLOAD_DIR=str(elsewhere), COLUMNS="1000"),  # no wrapping
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = _collapsed(result.stdout)
    assert f"$CACHEDLOAD_DIR, else {platform_cache_dir()}" in out
    assert f"else {elsewhere}" not in out
    assert f"$CACHEDLOAD_DIR is set to {elsewhere}" in out  # said apart from the default


def test_verify_json_reports_each_entry_and_the_totals(cache: Path) -> None:
    intact = cli("verify", "--json", cache=cache)
    assert intact.returncode == 0, intact.stderr
    report = json.loads(intact.stdout)
    assert (report["checked"], report["damaged"]) == (3, 0)
    assert {e["id"] for e in report["entries"]} == {r.id for r in list_entries(cache)}
    assert all(e["ok"] and e["problem"] is None for e in report["entries"])
    assert report["size_bytes"] == sum(e["size_bytes"] for e in report["entries"])

    damaged = list_entries(cache)[1]
    (damaged.path / "result.joblib").write_bytes(b"garbage")
    found = cli("verify", "--json", cache=cache)
    assert found.returncode == 1
    report = json.loads(found.stdout)
    assert report["damaged"] == 1
    (bad,) = [e for e in report["entries"] if not e["ok"]]
    assert bad["id"] == damaged.id and bad["function"] == damaged.function
    assert bad["path"] == str(damaged.path) and "bytes" in bad["problem"]

    fixed = cli("verify", "--fix", "--json", cache=cache)
    assert fixed.returncode == 1
    (bad,) = [e for e in json.loads(fixed.stdout)["entries"] if not e["ok"]]
    assert bad["action"] == "deleted" and not damaged.path.exists()


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


READ_ONLY = [["ls"], ["ls", "--json"], ["info", "abc"], ["verify"], ["verify", "--json"],
             ["why", "_body"]]  # fmt: skip


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_read_only_command_on_a_missing_cache_fails_with_one_line(
    command: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-cache"
    given = cli(*command, cache=missing)
    assert given.returncode == 2 and given.stdout == ""
    line = _one_line(given)
    assert line == (
        f"cachedload {command[0]}: no cache directory at {missing} (from --cache-dir): "
        "it does not exist"
    )
    from_env = subprocess.run(
        [sys.executable, "-m", "cachedload", *command],
        capture_output=True,
        text=True,
        env=subprocess_env(CACHEDLOAD_DIR=str(missing)),
        timeout=120,
    )
    assert from_env.returncode == 2
    assert f"{missing} (from $CACHEDLOAD_DIR): it does not exist" in _one_line(from_env)
    assert not missing.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["clear", "--all", "--yes"],
        ["clear", "--function", "_body"],
        ["prune", "--max-size", "0"],
        ["prune", "--keep", "1"],
    ],
)
def test_clear_and_prune_on_a_read_only_cache_say_so_and_delete_nothing(
    cache: Path, command: list[str]
) -> None:
    before = _tree(cache)
    with read_only(cache):
        result = cli(*command, cache=cache)
        assert _tree(cache) == before
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"{cache} is read-only: nothing is deleted" in result.stderr


def test_prune_of_a_read_only_cache_raises_read_only_cache_error(cache: Path) -> None:
    before = _tree(cache)
    with read_only(cache), pytest.raises(ReadOnlyCacheError, match="read-only") as raised:
        prune(cache, max_size=0)
    assert isinstance(raised.value, OSError) and raised.value.path == str(cache)
    assert _tree(cache) == before


def _strays(cache: Path, tmp_path: Path) -> list[Path]:
    """Folders of the user's in a real cache, none of them an entry: at the top, in a
    function folder (named as an entry or not, a symlink to one), and under ``remote/``."""
    fdir = next(cache.glob("tests.test_cli._body-*"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folders = [
        cache / "photos",
        fdir / "thesis",
        fdir / ("e" * 32),  # named as an entry, holding the user's file
        cache / "remote" / "stray",
        cache / "remote" / "empty",
    ]
    for folder in folders:
        folder.mkdir(parents=True)
        if folder.name != "empty":
            (folder / "mine.txt").write_text("precious")
    (fdir / ("f" * 32)).symlink_to(elsewhere, target_is_directory=True)
    return [*folders, fdir / ("f" * 32)]


def test_verify_names_every_folder_it_leaves_alone(cache: Path, tmp_path: Path) -> None:
    strays = _strays(cache, tmp_path)
    for fix in ([], ["--fix"]):
        result = cli("verify", *fix, cache=cache)
        assert result.returncode == 0, result.stdout + result.stderr  # nothing is damaged
        for folder in strays:
            [line] = [line for line in result.stdout.splitlines() if str(folder) in line]
            assert "unknown, left alone" in line, line
        assert "3 entries" in result.stdout
    assert all(os.path.lexists(folder) for folder in strays)
    kept = [f for f in strays if f.name != "empty" and not f.is_symlink()]
    assert all((f / "mine.txt").read_text() == "precious" for f in kept)


def test_a_stray_folder_under_remote_is_left_alone_and_the_rest_processed(
    cache: Path, tmp_path: Path
) -> None:
    strays = _strays(cache, tmp_path)
    data = next(cache.glob("tests.test_cli._other-*/*/result.joblib"))
    data.write_bytes(b"damaged")
    fixed = cli("verify", "--fix", cache=cache)
    assert fixed.returncode == 1, fixed.stdout + fixed.stderr  # damage found (and deleted)
    assert "(deleted)" in fixed.stdout and not data.exists()
    cleared = cli("clear", "--all", "--yes", cache=cache)
    assert cleared.returncode == 0, cleared.stdout + cleared.stderr
    assert f"left alone: {cache / 'remote' / 'stray'}" in cleared.stdout
    assert ls_json(cache) == []
    assert all(os.path.lexists(folder) for folder in strays)


@pytest.mark.parametrize(
    "command",
    [*READ_ONLY, ["clear", "--all", "--yes"], ["prune", "--keep", "1"], ["demo", "--images", "2"]],
    ids=" ".join,
)
def test_a_cache_dir_that_is_a_file_is_an_error_naming_it(
    command: list[str], tmp_path: Path
) -> None:
    file = tmp_path / "a-file"
    file.write_text("not a cache")
    for given, origin in ((file, file), (file / "below", file)):
        result = cli(*command, cache=given)
        assert result.returncode == 2 and result.stdout == ""
        line = _one_line(result)
        assert line.startswith("cachedload: error: --cache-dir: ")
        assert f"{origin} is a file, not a folder" in line
    assert file.read_text() == "not a cache"


@pytest.mark.parametrize("command", [["clear", "--all", "--yes"], ["prune", "--keep", "1"]])
def test_clear_and_prune_of_a_missing_cache_say_there_is_nothing(
    command: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-cache"
    result = cli(*command, cache=missing)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"nothing to {command[0]}: no cache directory at {missing} (from --cache-dir)"
    )
    assert not missing.exists()


def test_why_after_a_data_change_compares_with_the_entry_keep_deleted(
    tmp_path: Path, data: Path
) -> None:
    cache = tmp_path / "cache"
    load = cached_dataset(cache_dir=cache)(_body)
    load(str(data))
    (data / "a.txt").write_text("longer than before")
    os.utime(data / "a.txt", (OLD + 60, OLD + 60))
    load(str(data))
    assert len(list_entries(cache)) == 1  # keep=1 deleted the entry of the old contents

    result = cli("why", "_body", cache=cache)
    assert result.returncode == 0, result.stderr
    assert "vs. superseded entry" in result.stdout and "deleted by keep=" in result.stdout
    assert f"source data_dir ({data.resolve()}): 1 file modified (a.txt)" in result.stdout
    explained = load.cache_explain(str(data))
    assert not explained and "would be a hit" in explained.summary()
    assert "it replaced entry" in explained.summary()
    assert "1 file modified (a.txt)" in explained.summary()
    listed = cli("ls", cache=cache)  # the record is neither an entry nor a leftover
    assert listed.returncode == 0 and "leftover" not in listed.stdout
    assert "1 entry, " in listed.stdout
    checked = cli("verify", cache=cache)
    assert checked.returncode == 0 and "unknown" not in checked.stdout

    cleared = cli("clear", "--all", "--yes", cache=cache)
    assert cleared.returncode == 0, cleared.stderr
    assert [p.name for p in cache.iterdir()] == ["CACHEDIR.TAG"]  # the record went too
