"""Real users for the tests of hostile caches: a victim and an attacker in one group.

The tests run as root; a child interpreter imports what it needs as root (the checkout and
the interpreter may live where other users cannot read), then drops to a user's uid and group
for good before running its code, so every file operation of that code is checked by the
kernel as that user's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

VICTIM, ATTACKER, GROUP = 60001, 60002, 60000

_PRELUDE = """
import os, sys
import numpy, joblib, filelock, xxhash, platformdirs
import cachedload, cachedload.store, cachedload.backends, cachedload.backends.remote
import cachedload.verified, cachedload.serialize, cachedload.safe_pickle, cachedload.signing
import cachedload.manage, cachedload.explain, cachedload.per_item, cachedload.builder
import json, pickle, pathlib, time, warnings, shutil, uuid, hashlib, hmac, zlib, concurrent.futures
for codec in ("unicode_escape", "latin-1", "idna", "utf-8", "ascii"):
    "".encode(codec)  # codecs load lazily, from where the interpreter lives
try:
    import boto3, botocore, cachedload.backends.s3, cachedload.backends.lease
    boto3.session.Session().client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:1")
except ImportError:
    pass
os.setgroups([{group}])
os.setgid({group})
os.setuid({uid})
os.umask(0o002)
"""


def users_folder() -> Iterator[Path]:
    """A folder both users can enter (tmp_path is root's alone), removed afterwards: the body
    of a test module's ``users_dir`` fixture."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as two users")
    folder = Path(tempfile.mkdtemp(prefix="cachedload-users-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def user_folder(parent: Path, name: str, uid: int, mode: int) -> Path:
    """A folder owned by ``uid`` (and the group) with ``mode``."""
    folder = parent / name
    folder.mkdir()
    os.chown(folder, uid, GROUP)
    folder.chmod(mode)
    return folder


def start_as(uid: int, code: str, *, cwd: Path, **env: str) -> subprocess.Popen[str]:
    """Start ``code`` in a new interpreter running as ``uid`` (in :data:`GROUP`)."""
    program = _PRELUDE.format(uid=uid, group=GROUP) + textwrap.dedent(code)
    home = cwd / f"home-{uid}"
    if not home.exists():
        home.mkdir()
        os.chown(home, uid, GROUP)
    return subprocess.Popen(
        [sys.executable, "-c", program],
        cwd=cwd,
        env=subprocess_env(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_as(uid: int, code: str, *, cwd: Path, timeout: float = 120, **env: str) -> str:
    """Run ``code`` as ``uid`` to its end; its standard output. Fails the test if it fails."""
    process = start_as(uid, code, cwd=cwd, **env)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"child as uid {uid} failed:\n{out}\n{err}"
    return out


def finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    """Wait for a child of :func:`start_as`; its standard output. Fails the test if it failed."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"child timed out:\n{out}\n{err}") from None
    assert process.returncode == 0, f"child failed:\n{out}\n{err}"
    return out
