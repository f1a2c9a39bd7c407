"""The test suite itself: every test is isolated from the user's real cache directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import platformdirs
import pytest

from cachedload.backends import default_local_root
from cachedload.config import default_cache_dir
from tests.conftest import subprocess_env


def test_the_platform_cache_dir_is_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Path(platformdirs.user_cache_dir("cachedload", appauthor=False)).is_relative_to(tmp_path)
    monkeypatch.delenv("CACHEDLOAD_DIR")
    assert default_cache_dir().is_relative_to(tmp_path)


def test_a_url_in_cachedload_dir_keeps_the_local_copy_in_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEDLOAD_DIR", "s3://bucket/prefix")
    assert default_local_root("s3://bucket/prefix").is_relative_to(tmp_path)


def _run_suite(tmp_path: Path, test_code: str) -> subprocess.CompletedProcess[str]:
    """Run a one-file suite that uses this conftest, with a fake user cache under tmp_path."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (suite / "test_one.py").write_text(textwrap.dedent(test_code))
    home = tmp_path / "home"
    env = subprocess_env(XDG_CACHE_HOME=str(home / ".cache"), HOME=str(home))
    env.pop("CACHEDLOAD_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
        cwd=suite,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_the_suite_fails_if_a_test_writes_into_the_user_cache(tmp_path: Path) -> None:
    user_cache = tmp_path / "home" / ".cache" / "cachedload"
    user_cache.mkdir(parents=True)
    (user_cache / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    result = _run_suite(
        tmp_path,
        f"""
        from pathlib import Path

        def test_escapes() -> None:
            (Path({str(user_cache)!r}) / "remote").mkdir()
        """,
    )
    assert result.returncode != 0, result.stdout
    assert "TESTS ARE NOT ISOLATED" in result.stdout and "remote" in result.stdout


def test_a_suite_using_the_default_and_remote_cache_dirs_leaves_the_user_cache_alone(
    tmp_path: Path,
) -> None:
    result = _run_suite(
        tmp_path,
        """
        import os
        from cachedload import cached_dataset
        from cachedload.backends import default_local_root

        def test_default(tmp_path, monkeypatch) -> None:
            monkeypatch.delenv("CACHEDLOAD_DIR")
            assert cached_dataset(lambda n: n * 2)(3) == 6
            monkeypatch.setenv("CACHEDLOAD_DIR", "s3://bucket/prefix")
            default_local_root("s3://bucket/prefix").mkdir(parents=True)
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "home" / ".cache" / "cachedload").exists()
