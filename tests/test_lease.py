"""backends/lease.py: single flight across machines with a lease object in a bucket."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cachedload.backends import object_store
from cachedload.backends.lease import ObjectLease
from tests.servers import storage_options

pytest.importorskip("boto3")
pytestmark = pytest.mark.usefixtures("aws_isolated")


def test_lease_excludes_renews_and_is_taken_over_after_expiry(
    seaweed: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from filelock import Timeout

    objects = object_store(url, storage_options(seaweed))
    holders_view = object_store(url, storage_options(seaweed))  # the holder's machine
    first = ObjectLease(holders_view, "k.lease", timeout=0, duration=2)
    second = ObjectLease(objects, "k.lease", timeout=0, duration=2)
    first.acquire()
    with pytest.raises(Timeout):
        second.acquire(timeout=0)
    time.sleep(3.2)  # renewed meanwhile (every 2/3 s): still held
    with pytest.raises(Timeout):
        second.acquire(timeout=0)

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the holder's machine is gone")

    # The holder "dies": cut off from the bucket, it renews no more.
    monkeypatch.setattr(holders_view, "put", unreachable)
    monkeypatch.setattr(holders_view, "delete", unreachable)
    started = time.monotonic()
    second.acquire(timeout=10)
    assert second.is_locked and 1.0 < time.monotonic() - started < 6
    first.release()  # cannot reach the bucket: leaves the lease now held by another alone
    assert objects.head("k.lease") is not None
    second.release()
    assert objects.head("k.lease") is None
