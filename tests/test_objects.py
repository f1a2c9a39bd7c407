"""backends/objects.py: the object store layer against real servers (conditional writes, error
mapping, the probe of what a server honours)."""

from __future__ import annotations

import pytest

from cachedload import ConfigurationError
from cachedload.backends import object_store
from cachedload.backends.objects import PreconditionFailed, probe
from tests.servers import BUCKET, free_ports, storage_options

pytest.importorskip("boto3")
pytestmark = pytest.mark.usefixtures("aws_isolated")


@pytest.mark.parametrize("server", ["seaweed", "moto_server"])
def test_conditional_writes_map_to_precondition_failed(
    server: str, request: pytest.FixtureRequest, url: str
) -> None:
    endpoint = request.getfixturevalue(server)
    objects = object_store(url, storage_options(endpoint))
    etag = objects.put("a", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed) as raised:
        objects.put("a", b"two", if_none_match=True)
    assert isinstance(raised.value, FileExistsError)
    with pytest.raises(PreconditionFailed):
        objects.put("a", b"three", if_match='"0000"')
    objects.put("a", b"four", if_match=etag)
    assert objects.get("a") == b"four"
    info = objects.head("a")
    assert info is not None and info.size == 4 and info.server_time is not None
    assert info.age is not None and -5 < info.age < 60
    assert objects.get("missing") is None and objects.head("missing") is None
    objects.delete("missing")  # no error
    assert probe(objects).if_none_match and probe(objects).if_match


def test_errors_map_to_builtin_exceptions(moto_server: str, seaweed: str) -> None:
    missing_bucket = object_store("s3://no-such-bucket-here/x", storage_options(moto_server))
    with pytest.raises(FileNotFoundError):
        missing_bucket.put("a", b"1")
    (closed,) = free_ports(1)
    unreachable = object_store(
        f"s3://{BUCKET}/x",
        {
            **storage_options(f"http://127.0.0.1:{closed}"),
            "config_kwargs": {"retries": {"max_attempts": 1}},
        },
    )
    with pytest.raises(ConnectionError):
        unreachable.get("a")
    wrong = object_store(f"s3://{BUCKET}/x", {**storage_options(seaweed), "secret": "wrong-secret"})
    with pytest.raises(PermissionError):
        wrong.put("a", b"1")
    with pytest.raises(ConfigurationError, match="storage_options"):
        object_store(f"s3://{BUCKET}/x", {"no_such_option": 1}).get("a")


def test_rclone_ignores_conditional_writes_and_the_probe_sees_it(rclone: str, url: str) -> None:
    objects = object_store(url, storage_options(rclone))
    objects.put("a", b"one", if_none_match=True)
    objects.put("a", b"two", if_none_match=True)  # silently overwrites
    assert objects.get("a") == b"two"
    found = probe(objects)
    assert not found.if_none_match and not found.if_match
