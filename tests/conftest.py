"""Shared fixtures: an isolated cache directory, a small image folder, a subprocess runner, and
the S3 servers of tests/servers.py."""

from __future__ import annotations

import contextlib
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

# The S3 servers' fixtures, registered here so that each server starts once per session
# whichever test modules use them.
from tests.servers import aws_isolated, moto_server, rclone, seaweed, url  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the default cache directory at a temporary folder for every test.

    ``$CACHEDLOAD_DIR`` is not enough: a test may set it to a URL, and a remote cache's local
    copy then goes to the platform's user cache dir. So that dir moves too: platformdirs reads
    ``$XDG_CACHE_HOME`` (Linux; macOS too since platformdirs 4.4) and else ``~`` (``$HOME``,
    set on macOS for older platformdirs). The memoised platform dirs are forgotten before and
    after, so no test sees another's.
    """
    cache = tmp_path / "default-cache"
    monkeypatch.setenv("CACHEDLOAD_DIR", str(cache))
    monkeypatch.delenv("CACHEDLOAD_MAX_SIZE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    if sys.platform == "darwin":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    clear_platform_dir_caches()
    yield cache
    clear_platform_dir_caches()


def clear_platform_dir_caches() -> None:
    """Forget every memoised cache directory in cachedload's modules (``_platform_cache_dir``
    and the like: any ``functools.lru_cache`` whose name says ``cache_dir``)."""
    # A copy in one step: a finalizer run by the garbage collector mid-iteration may import.
    for name, module in sys.modules.copy().items():
        if module is None or not (name == "cachedload" or name.startswith("cachedload.")):
            continue
        for attribute, value in list(vars(module).items()):
            if "cache_dir" in attribute and callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def _real_user_caches() -> list[Path]:
    """The cache directories a user of this machine has: the platform's, and
    ``$CACHEDLOAD_DIR`` if it names a local folder (read before any test changes them)."""
    import platformdirs

    found = [Path(platformdirs.user_cache_dir("cachedload", appauthor=False))]
    configured = os.environ.get("CACHEDLOAD_DIR", "").strip()
    if configured and "://" not in configured:
        found.append(Path(configured).expanduser())
    return found


def _snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``root``: (is a folder, size, mtime_ns); empty if it does not exist."""
    listing: dict[str, tuple[bool, int, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            try:
                info = path.lstat()
            except OSError:
                continue
            is_dir = path.is_dir() and not path.is_symlink()
            listing[str(path.relative_to(root))] = (is_dir, info.st_size, info.st_mtime_ns)
    return listing


_REAL_CACHES = _real_user_caches()
_BEFORE: dict[Path, dict[str, tuple[bool, int, int]]] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Record the user's real cache directories before the first test."""
    for root in _REAL_CACHES:
        _BEFORE[root] = _snapshot(root)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run loudly if a test wrote into (or deleted from) the user's real cache."""
    problems = []
    for root, before in _BEFORE.items():
        after = _snapshot(root)
        changed = sorted(
            name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
        )
        if changed:
            shown = "\n    ".join(changed[:10]) + ("\n    …" if len(changed) > 10 else "")
            problems.append(f"{root} changed during the test run:\n    {shown}")
    if not problems:
        return
    message = "TESTS ARE NOT ISOLATED: " + "\n".join(problems)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        sys.stderr.write(message + "\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


def another_users_cache(tmp_path: Path, how: str) -> Path:
    """A new cache folder another user could write: owned by ``nobody`` (``how="other-owner"``,
    needs root) or group-writable (``"group-writable"``)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if how == "other-owner":
        os.chown(cache, 65534, 65534)
    else:
        cache.chmod(0o775)
    return cache


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


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder of four small binary files, with mtimes an hour old."""
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(4):
        (folder / f"part{index}.bin").write_bytes(bytes([index]) * (1000 + index))
    age(folder)
    return folder


@contextlib.contextmanager
def mounted(where: Path, *how: str) -> Iterator[Path]:
    """Mount something at ``where`` for the block (``mount *how where``), unmounted after;
    the test is skipped where mounting is impossible (not root, no mount namespace)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *how, str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {how} here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@contextlib.contextmanager
def full_tmpfs(where: Path, size: str = "256k") -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``where``: writes past it fail with ENOSPC."""
    with mounted(where, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs") as mount:
        yield mount


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` bound onto itself read-only for the block (writes fail with EROFS)."""
    with mounted(folder, "--bind", str(folder)):
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot remount {folder} read-only: {done.stderr.strip()}")
        yield folder


def _interpreter_for(uid: int) -> tuple[str, str]:
    """An interpreter another user can run (this one may live under root's home), and the
    path of this environment's packages for it."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            probe = subprocess.run([candidate, "-c", ""], user=uid, group=uid, capture_output=True)
        except OSError:  # not executable by that user (e.g. under root's home)
            continue
        if probe.returncode == 0:
            return candidate, site
    pytest.skip(f"no {version} that uid {uid} can run")


def run_as(
    uid: int, code: str, *, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter as the user ``uid`` (group ``uid``, no other
    groups): another user, whose permissions are enforced (root's are not)."""
    python, site = _interpreter_for(uid)
    extra = subprocess_env(**env)
    extra["PYTHONPATH"] = os.pathsep.join([extra["PYTHONPATH"], site])
    return subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=extra,
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        timeout=timeout,
    )
