"""Shared fixtures: an isolated cache directory, a small image folder, a subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default cache directory at a temporary folder for every test."""
    cache = tmp_path / "default-cache"
    monkeypatch.setenv("CACHEDLOAD_DIR", str(cache))
    monkeypatch.delenv("CACHEDLOAD_MAX_SIZE", raising=False)
    return cache


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A cache directory to pass as ``cache_dir=``."""
    return tmp_path / "cache"


def write_images(folder: Path, count: int = 6, classes: tuple[str, ...] = ("a", "b")) -> Path:
    """Write ``count`` small PNGs into class sub-folders of ``folder`` with cv2.imwrite."""
    rng = np.random.default_rng(42)
    for index in range(count):
        target = folder / classes[index % len(classes)]
        target.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        assert cv2.imwrite(str(target / f"img_{index:03d}.png"), image)
    return folder


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder of six 16x16 PNGs in two class sub-folders, with mtimes an hour old.

    Aged so that no file is "racy" (freshly written); tests about racy files make their own.
    """
    folder = write_images(tmp_path / "images")
    age(folder)
    return folder


def age(folder: Path, seconds: int = 3600) -> None:
    """Move every file's mtime ``seconds`` into the past (keeping each file's own order)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            info = path.stat()
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns - seconds * 10**9))


def write_old(path: Path, text: str, mtime: float | None = None) -> None:
    """Write a source file with a fixed mtime two hours old (so it is not "racy")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    when = OLD if mtime is None else mtime
    os.utime(path, (when, when))


OLD = time.time() - 7200


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child interpreter: this checkout importable, no coverage noise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_python(
    code: str, *, cwd: Path | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; fail the test with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(**env),
        timeout=timeout,
    )
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def counter_file(tmp_path: Path) -> Iterator[Path]:
    """A file a loader body appends one line to per run (to count runs across processes)."""
    path = tmp_path / "runs.txt"
    path.touch()
    yield path


def runs(counter: Path) -> int:
    """How many times a body wrote to ``counter``."""
    return len(counter.read_text().splitlines())
