"""Settings from outside the code (cachedload.config): each ``CACHEDLOAD_*`` variable read and
checked in one place, cache-directory values, sizes."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import pytest

import cachedload
from cachedload import ConfigurationError, config

# value -> what the error says (the reason), for every place a cache directory is given.
BAD_CACHE_DIRS = {
    "blank": ("   ", "blank"),
    "empty": ("", "empty"),
    "half-url": ("s3:/typo", r"did you mean s3://typo"),
    "empty-file-url": ("file://", "no absolute path"),
    "unknown-user": ("~nosuchuser_cachedload/c", "cannot expand ~nosuchuser_cachedload"),
    "no-backend": ("http://127.0.0.1:1/x", "aiohttp|requests"),
    "unknown-scheme": ("nosuch://x/y", "no fsspec file system for nosuch://"),
}

PACKAGE = Path(cachedload.__file__).parent
# Reads the environment, but not for cachedload: boto3's own AWS_* variables key its clients.
READS_OTHER_VARIABLES = {"backends/s3.py"}


# -- cache directories -------------------------------------------------------------------------
@pytest.mark.parametrize("value, reason", BAD_CACHE_DIRS.values(), ids=BAD_CACHE_DIRS.keys())
def test_a_bad_cache_directory_names_where_it_came_from(value: str, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^--cache-dir: .*({reason})") as raised:
        config.check_cache_dir(value, "--cache-dir")
    assert raised.value.option == "--cache-dir"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("/data/cache", Path("/data/cache")),
        ("file:///data/cache", Path("/data/cache")),
        ("file://localhost/data/cache", Path("/data/cache")),
        (Path("/data/cache"), Path("/data/cache")),
        ("~/cache", Path(os.path.expanduser("~/cache"))),
    ],
)
def test_a_local_cache_directory_is_a_path(value: Any, expected: Path) -> None:
    assert config.check_cache_dir(value, "cache_dir") == expected


def test_file_urls_name_the_same_folder_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachedload.backends import default_local_root

    monkeypatch.setenv("CACHEDLOAD_DIR", f"file://{tmp_path}/c")
    assert config.default_cache_dir() == tmp_path / "c"
    assert cachedload.default_cache_dir() == tmp_path / "c"
    assert default_local_root("s3://bucket/p").parent == tmp_path / "c" / "remote"


def test_cachedload_dir_unset_or_empty_is_the_platform_cache_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for setting in (None, ""):
        if setting is None:
            monkeypatch.delenv("CACHEDLOAD_DIR", raising=False)
        else:
            monkeypatch.setenv("CACHEDLOAD_DIR", setting)
        assert config.cache_dir_from_env() is None
        assert config.default_cache_dir() == config.platform_cache_dir()


def test_a_remote_cachedload_dir_is_a_url_with_local_copies_in_the_platform_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("fsspec")
    monkeypatch.setenv("CACHEDLOAD_DIR", "memory://bucket/prefix")
    assert config.cache_dir_from_env() == "memory://bucket/prefix"
    assert config.default_cache_dir() == config.platform_cache_dir()


def test_a_bad_cachedload_dir_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEDLOAD_DIR", "s3:/typo")
    with pytest.raises(ConfigurationError, match=r"^\$CACHEDLOAD_DIR: .*did you mean"):
        config.cache_dir_from_env()


# -- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GB", 20 * 1000**3),
        ("512 MB", 512 * 1000**2),
        ("1.5 GiB", int(1.5 * 1024**3)),
        ("10kib", 10 * 1024),
        ("2tb", 2 * 1000**4),
        ("123", 123),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert config.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", "20 XB", "", -5, True, 1.5])
def test_parse_size_rejects_garbage_naming_the_option(bad: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        config.parse_size(bad, "max_size")
    assert caught.value.option == "max_size"


@pytest.mark.parametrize(
    ("raw", "expected"), [("20GB", 20 * 1000**3), (" 1KiB ", 1024), ("", None)]
)
def test_max_size_from_the_environment(
    raw: str, expected: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEDLOAD_MAX_SIZE", raw)
    assert config.max_size_from_env() == expected


def test_a_bad_max_size_variable_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEDLOAD_MAX_SIZE", "lots")
    with pytest.raises(ConfigurationError, match=r"^\$CACHEDLOAD_MAX_SIZE: expected a size"):
        config.max_size_from_env()


# -- remote caches and locks -------------------------------------------------------------------
def test_storage_options_are_a_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHEDLOAD_STORAGE_OPTIONS", raising=False)
    assert config.storage_options_from_env() == {}
    monkeypatch.setenv("CACHEDLOAD_STORAGE_OPTIONS", '{"endpoint_url": "http://x:1"}')
    assert config.storage_options_from_env() == {"endpoint_url": "http://x:1"}
    for bad, reason in (("{nope", "not JSON"), ("[1, 2]", "must be a JSON object")):
        monkeypatch.setenv("CACHEDLOAD_STORAGE_OPTIONS", bad)
        with pytest.raises(ConfigurationError, match=rf"^\$CACHEDLOAD_STORAGE_OPTIONS: {reason}"):
            config.storage_options_from_env()


def test_lease_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHEDLOAD_LEASE_SECONDS", raising=False)
    assert config.lease_seconds() == 30.0
    monkeypatch.setenv("CACHEDLOAD_LEASE_SECONDS", "2.5")
    assert config.lease_seconds() == 2.5
    for bad, reason in (("soon", "not a number"), ("0", "out of range"), ("1e9", "out of range")):
        monkeypatch.setenv("CACHEDLOAD_LEASE_SECONDS", bad)
        with pytest.raises(ConfigurationError, match=rf"^\$CACHEDLOAD_LEASE_SECONDS: {reason}"):
            config.lease_seconds()


@pytest.mark.parametrize(
    ("raw", "expected"), [("lease", "lease"), (" FLOCK ", "flock"), ("", None), ("other", None)]
)
def test_lock_kind(raw: str, expected: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEDLOAD_LOCK", raw)
    assert config.lock_kind() == expected


# -- one reader --------------------------------------------------------------------------------
def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8")))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def test_only_config_reads_the_environment() -> None:
    """No module but cachedload.config names a CACHEDLOAD_ variable in its code (messages say
    ``$CACHEDLOAD_…``) or reads ``os.environ`` / ``os.getenv``."""
    variable = re.compile(r"CACHEDLOAD_[A-Z_]+")
    found = []
    for name, tree in _modules():
        if name == "config.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if variable.fullmatch(node.value):
                    found.append(f"{name}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                if name not in READS_OTHER_VARIABLES:
                    found.append(f"{name}:{node.lineno}: os.{node.attr}")
            elif isinstance(node, ast.alias) and node.name in ("environ", "getenv"):
                found.append(f"{name}:{node.lineno}: import {node.name}")
    assert found == []


def test_config_reads_each_variable_in_one_function() -> None:
    (tree,) = [tree for name, tree in _modules() if name == "config.py"]
    readers: dict[str, list[str]] = {}
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Constant) and re.fullmatch(
                r"CACHEDLOAD_[A-Z_]+", str(node.value)
            ):
                readers.setdefault(str(node.value), []).append(function.name)
    # Each value is parsed and checked by one function; root_settings() only reads the raw
    # values a cache root depends on, so a loader notices when to resolve its root again.
    assert readers == {
        "CACHEDLOAD_DIR": ["cache_dir_from_env", "root_settings"],
        "CACHEDLOAD_MAX_SIZE": ["max_size_from_env"],
        "CACHEDLOAD_STORAGE_OPTIONS": ["root_settings", "storage_options_from_env"],
        "CACHEDLOAD_LEASE_SECONDS": ["root_settings", "lease_seconds"],
        "CACHEDLOAD_LOCK": ["lock_kind"],
        "CACHEDLOAD_SIGNING_KEY": ["signing_key_from_env"],
    }
