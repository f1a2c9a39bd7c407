"""backends/remote.py: a cache shared across machines in an S3 bucket (or any fsspec URL).

Against real servers (tests/servers.py). "Machines" are processes (or stores in this process)
with separate local read-through caches.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import (
    ConditionalWritesWarning,
    ConfigurationError,
    CorruptEntryWarning,
    cached_dataset,
)
from cachedload.backends import object_store, open_root
from cachedload.backends.objects import PreconditionFailed
from cachedload.backends.remote import EntryReplaced, RemoteRoot
from tests.conftest import runs, subprocess_env
from tests.servers import (
    BUCKET,
    aws_env,
    free_ports,
    objects_under,
    s3_client,
    storage_options,
)

pytest.importorskip("boto3")
pytestmark = pytest.mark.usefixtures("aws_isolated")


def make_loader(url: str, endpoint: str, local: Path, calls: list[int], **extra: Any) -> Any:
    @cached_dataset(
        cache_dir=url,
        storage_options=storage_options(endpoint),
        local_cache_dir=local,
        mmap_mode="r",
        **extra,
    )
    def load(data_dir: str, scale: int = 1) -> np.ndarray[Any, Any]:
        calls.append(1)
        total = sum(p.stat().st_size for p in Path(data_dir).iterdir())
        return np.arange(100_000, dtype=np.float64) * scale + total

    return load


def remote_root(url: str, endpoint: str, local: Path) -> RemoteRoot:
    """The cache root a loader made by :func:`make_loader` with ``local`` uses."""
    root = open_root(url, storage_options=storage_options(endpoint), local_cache_dir=local)
    assert isinstance(root, RemoteRoot)
    return root


def entry_of(loader: Any, data_dir: Path) -> tuple[str, str]:
    """The function folder and key of ``loader(str(data_dir))``'s entry."""
    path = loader.cache_path(str(data_dir))
    return path.parent.name, path.name


# --- hits, misses, nodes -------------------------------------------------------------------------
def test_hit_on_another_node_downloads_once_then_costs_no_request(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    calls: list[int] = []
    node_a = make_loader(url, seaweed, tmp_path / "a", calls)
    node_b = make_loader(url, seaweed, tmp_path / "b", calls)
    expected = node_a(str(data_dir))
    assert calls == [1]
    assert isinstance(expected, np.memmap)  # the computing node maps its local copy too
    assert expected.filename is not None
    assert Path(expected.filename).is_relative_to(tmp_path / "a")
    stored = objects_under(seaweed, url)
    assert any(name.endswith("/meta.json") for name in stored)
    assert any(name.endswith("/result.joblib") for name in stored)

    store = remote_root(url, seaweed, tmp_path / "b")
    requests: list[str] = []
    store.objects.client.meta.events.register(  # type: ignore[attr-defined]
        "before-send.s3", lambda request, **_: requests.append(request.method)
    )
    first = node_b(str(data_dir))
    assert calls == [1] and requests and "GET" in requests
    assert isinstance(first, np.memmap)  # loaded from the local copy: mmap works
    assert node_b.cache_path(str(data_dir)).is_relative_to(tmp_path / "b")
    requests.clear()
    second = node_b(str(data_dir))
    assert requests == []
    np.testing.assert_array_equal(second, expected)
    assert node_b.is_cached(str(data_dir)) and node_b.cache_info().hits == 2


def test_hit_across_processes_with_separate_local_caches(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "runs.txt"
    counter.touch()
    first = _result(_start_child(tmp_path, url, seaweed, data_dir, counter, local=tmp_path / "a"))
    second = _result(_start_child(tmp_path, url, seaweed, data_dir, counter, local=tmp_path / "b"))
    assert runs(counter) == 1 and first["sum"] == second["sum"]
    # A hit maps the local copy; so does the computing node, once it has stored its result.
    assert first["memmap"] and second["memmap"]
    # With the endpoint unreachable, a process still hits on the local copy, without so much
    # as importing boto3.
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    third = _result(_start_child(tmp_path, url, dead, data_dir, counter, local=tmp_path / "b"))
    assert third["sum"] == first["sum"] and third["botocore"] is False
    assert runs(counter) == 1


CHILD = """
import json, os, sys, time
import numpy as np
from cachedload import cached_dataset

GO = os.environ.get("T_GO")

@cached_dataset(cache_dir=os.environ["T_URL"], local_cache_dir=os.environ["T_LOCAL"],
                mmap_mode="r", lock_timeout=float(os.environ.get("T_LOCK_TIMEOUT", "60")))
def load(data_dir, scale=1):
    with open(os.environ["T_COUNTER"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(float(os.environ.get("T_SLEEP", "0")))
    total = sum(os.path.getsize(os.path.join(data_dir, n)) for n in os.listdir(data_dir))
    return np.arange(200_000, dtype=np.float64) * scale + total

hang = os.environ.get("T_HANG_AFTER")
if hang:  # simulate a machine dying mid-publish: block at the chosen point, to be SIGKILLed
    from cachedload.backends import remote
    step = os.environ["T_HANG_STEP"]
    original = remote.RemoteRoot._upload_file
    def hanging(self, fdir, key, name, path, data, if_none_match):
        if step == "during-data":
            objects_put = self.objects.put
            def slow_put(k, body, **kw):
                class Stalling:
                    def __init__(self, inner):
                        self.inner, self.sent = inner, 0
                    def read(self, n=-1):
                        if self.sent:
                            open(hang, "w").close()
                            time.sleep(3600)
                        self.sent += 1
                        return self.inner.read(1024)
                    def seek(self, *a):
                        return self.inner.seek(*a)
                    def tell(self):
                        return self.inner.tell()
                return objects_put(k, Stalling(body), **kw)
            self.objects.put = slow_put
        original(self, fdir, key, name, path, data, if_none_match)
        open(hang, "w").close()
        time.sleep(3600)
    remote.RemoteRoot._upload_file = hanging

while GO and not os.path.exists(GO):
    time.sleep(0.01)
result = load(os.environ["T_DATA"])
print(json.dumps({"sum": float(np.asarray(result).sum()), "memmap": isinstance(result, np.memmap),
                  "botocore": "botocore" in sys.modules}))
"""


def _child_env(
    url: str, endpoint: str, data_dir: Path, counter: Path, local: Path, **extra: str
) -> dict[str, str]:
    return subprocess_env(
        T_URL=url,
        T_DATA=str(data_dir),
        T_COUNTER=str(counter),
        T_LOCAL=str(local),
        CACHEDLOAD_LEASE_SECONDS=os.environ["CACHEDLOAD_LEASE_SECONDS"],
        **aws_env(endpoint),
        **extra,
    )


def _start_child(
    tmp_path: Path,
    url: str,
    endpoint: str,
    data_dir: Path,
    counter: Path,
    *,
    local: Path,
    **extra: str,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD)],
        env=_child_env(url, endpoint, data_dir, counter, local, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(process: subprocess.Popen[str], timeout: float = 90) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"child failed:\n{out}\n{err}"
    found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return found


def _finish(process: subprocess.Popen[str], timeout: float = 90) -> float:
    return float(_result(process, timeout)["sum"])


def _run_child(
    tmp_path: Path,
    url: str,
    endpoint: str,
    data_dir: Path,
    counter: Path,
    *,
    local: Path,
    **extra: str,
) -> float:
    return _finish(_start_child(tmp_path, url, endpoint, data_dir, counter, local=local, **extra))


def test_eight_nodes_compute_once_and_all_get_the_same_result(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody dies here: a long lease keeps a CPU-starved holder (8 processes, 2 cores) from
    # being taken over, which would be harmless but make the count of runs vary.
    monkeypatch.setenv("CACHEDLOAD_LEASE_SECONDS", "20")
    counter, go = tmp_path / "runs.txt", tmp_path / "go"
    counter.touch()
    children = [
        _start_child(
            tmp_path,
            url,
            seaweed,
            data_dir,
            counter,
            local=tmp_path / f"node{i}",
            T_GO=str(go),
            T_SLEEP="1.5",
        )
        for i in range(8)
    ]
    time.sleep(1.0)  # let them import
    go.touch()
    sums = [_finish(child) for child in children]
    assert runs(counter) == 1
    assert len(set(sums)) == 1
    for i in range(8):  # each node holds its own verified copy
        assert list((tmp_path / f"node{i}").glob("*/*/result.joblib"))


@pytest.mark.parametrize("step", ["after-data", "during-data"])
def test_a_node_killed_mid_upload_is_taken_over_and_no_reader_sees_a_partial_entry(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path, step: str
) -> None:
    counter, hung = tmp_path / "runs.txt", tmp_path / "hung"
    counter.touch()
    dying = _start_child(
        tmp_path,
        url,
        seaweed,
        data_dir,
        counter,
        local=tmp_path / "dying",
        T_HANG_AFTER=str(hung),
        T_HANG_STEP=step,
    )
    deadline = time.monotonic() + 60
    while not hung.exists():
        assert dying.poll() is None and time.monotonic() < deadline, dying.communicate()
        time.sleep(0.05)
    # Meanwhile nobody sees an entry: no metadata object was published.
    assert not any(name.endswith("meta.json") for name in objects_under(seaweed, url))
    waiters = [
        _start_child(tmp_path, url, seaweed, data_dir, counter, local=tmp_path / f"w{i}")
        for i in range(2)
    ]
    time.sleep(1.0)
    dying.send_signal(signal.SIGKILL)
    dying.communicate()
    sums = [_finish(waiter) for waiter in waiters]
    assert runs(counter) == 2  # the dead node's run and one takeover
    reader = _run_child(tmp_path, url, seaweed, data_dir, counter, local=tmp_path / "reader")
    assert len({*sums, reader}) == 1 and runs(counter) == 2
    stored = objects_under(seaweed, url)
    assert not any(name.endswith(".lease") for name in stored)


def test_a_lost_publish_race_keeps_the_other_entry(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    first = make_loader(url, seaweed, tmp_path / "a", calls)
    first(str(data_dir))
    winner = objects_under(seaweed, url)
    store = remote_root(url, seaweed, tmp_path / "b")
    fdir, key = entry_of(first, data_dir)
    published = store.read_remote_meta(fdir, key)
    assert published is not None
    # The loser checked for the entry before the winner published it: it uploads, gets 412s.
    real_head = store.objects.head
    monkeypatch.setattr(
        store.objects, "head", lambda name: None if name.endswith("meta.json") else real_head(name)
    )
    entry = first.cache_path(str(data_dir))
    local_meta = json.loads((entry / "meta.json").read_text())
    store.publish(fdir, key, {**local_meta, "created": 0.0}, entry, replace=False)
    assert objects_under(seaweed, url) == winner
    assert store.read_remote_meta(fdir, key) == published


def test_data_left_by_a_writer_that_died_before_its_metadata_is_published_by_the_next(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    calls: list[int] = []
    node_a = make_loader(url, seaweed, tmp_path / "a", calls)
    node_a(str(data_dir))
    store = remote_root(url, seaweed, tmp_path / "a")
    fdir, key = entry_of(node_a, data_dir)
    original = store.read_remote_meta(fdir, key)
    assert original is not None
    store.objects.delete(store.object_key(fdir, key, "meta.json"))  # as if A died right before it
    node_b = make_loader(url, seaweed, tmp_path / "b", calls)
    result = node_b(str(data_dir))
    assert calls == [1, 1]
    republished = store.read_remote_meta(fdir, key)
    assert republished is not None and republished["data"] == original["data"]
    np.testing.assert_array_equal(
        make_loader(url, seaweed, tmp_path / "c", calls)(str(data_dir)), result
    )
    assert calls == [1, 1]


def test_degraded_mode_without_conditional_writes_warns_once_and_stays_correct(
    rclone: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    calls: list[int] = []
    node_a = make_loader(url, rclone, tmp_path / "a", calls)
    node_b = make_loader(url, rclone, tmp_path / "b", calls)
    with pytest.warns(ConditionalWritesWarning, match="conditional writes") as caught:
        expected = node_a(str(data_dir))
        node_a(str(data_dir), scale=2)
    assert len(caught) == 1
    stored = objects_under(rclone, url)
    data_names = [name.rsplit("/", 1)[1] for name in stored if ".joblib" in name]
    assert len(data_names) == 2 and all(n.startswith("result-") for n in data_names)
    assert not any(name.endswith(".lease") for name in stored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(node_b(str(data_dir)), expected)
    assert calls == [1, 1]
    # A recompute replaces the entry under a new unique name; others then read the new one.
    node_a.recompute(str(data_dir))
    node_c = make_loader(url, rclone, tmp_path / "c", calls)
    np.testing.assert_array_equal(node_c(str(data_dir)), expected)
    assert len([n for n in objects_under(rclone, url) if ".joblib" in n]) == 2


def test_corrupt_remote_data_is_a_miss_that_heals_the_entry(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    calls: list[int] = []
    expected = make_loader(url, seaweed, tmp_path / "a", calls)(str(data_dir))
    data_key = next(name for name in objects_under(seaweed, url) if name.endswith(".joblib"))
    prefix = url.split(f"s3://{BUCKET}/", 1)[1]
    size = objects_under(seaweed, url)[data_key]
    s3_client(seaweed).put_object(Bucket=BUCKET, Key=f"{prefix}/{data_key}", Body=b"\0" * size)
    with pytest.warns(CorruptEntryWarning, match="checksum"):
        healed = make_loader(url, seaweed, tmp_path / "b", calls)(str(data_dir))
    assert calls == [1, 1]
    np.testing.assert_array_equal(healed, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(
            make_loader(url, seaweed, tmp_path / "c", calls)(str(data_dir)), expected
        )
    assert calls == [1, 1]


def test_a_reader_racing_a_replacement_sees_a_miss_not_corruption(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    calls: list[int] = []

    def node(local: Path) -> Any:
        @cached_dataset(
            cache_dir=url, storage_options=storage_options(seaweed), local_cache_dir=local
        )
        def load(data_dir: str) -> np.ndarray[Any, Any]:
            calls.append(1)
            return np.full(50_000, len(calls))  # each run differs: so do the checksums

        return load

    node_a = node(tmp_path / "a")
    node_a(str(data_dir))
    fdir, key = entry_of(node_a, data_dir)
    reader = remote_root(url, seaweed, tmp_path / "b")
    stale = reader.read_meta(fdir, key)
    assert stale is not None
    node_a.recompute(str(data_dir))  # metadata deleted, data deleted, both published anew
    with pytest.raises(EntryReplaced):
        reader.load(fdir, key, stale, mmap_mode=None, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert node(tmp_path / "b")(str(data_dir))[0] == 2
    assert calls == [1, 1]


def test_large_entries_upload_in_parts_and_publish_once(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachedload.backends.s3 import S3ObjectStore

    monkeypatch.setattr(S3ObjectStore, "multipart_threshold", 1024 * 1024)
    monkeypatch.setattr(S3ObjectStore, "part_size", 5 * 1024 * 1024)
    calls: list[int] = []

    def node(local: Path) -> Any:
        @cached_dataset(
            cache_dir=url, storage_options=storage_options(seaweed), local_cache_dir=local
        )
        def load(data_dir: str) -> np.ndarray[Any, Any]:
            calls.append(1)
            return np.arange(1_000_000, dtype=np.float64)  # 8 MB: two parts

        return load

    expected = node(tmp_path / "a")(str(data_dir))
    stored = objects_under(seaweed, url)
    assert max(stored.values()) > 8_000_000
    np.testing.assert_array_equal(node(tmp_path / "b")(str(data_dir)), expected)
    assert calls == [1]
    objects = object_store(url, storage_options(seaweed))
    data_key = next(name for name in stored if name.endswith("result.joblib"))
    with (
        pytest.raises(PreconditionFailed),
        open(node(tmp_path / "a").cache_path(str(data_dir)) / "result.joblib", "rb") as handle,
    ):
        objects.put(data_key, handle, size=stored[data_key], if_none_match=True)


def test_large_transfers_show_progress_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachedload.backends import remote

    monkeypatch.setattr(remote, "_PROGRESS_MIN_BYTES", 10)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with remote._progress("download abc", 100) as progress:
        assert progress is not None
        progress(60)
        progress(40)
    assert "download abc" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with remote._progress("download abc", 100) as progress:
        assert progress is None


def test_recompute_replaces_the_entry_for_every_node(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    calls: list[int] = []
    node_a = make_loader(url, seaweed, tmp_path / "a", calls)
    node_a(str(data_dir))
    fdir, key = entry_of(node_a, data_dir)
    store = remote_root(url, seaweed, tmp_path / "a")
    before = store.read_remote_meta(fdir, key)
    node_a.recompute(str(data_dir))
    after = store.read_remote_meta(fdir, key)
    assert calls == [1, 1] and before is not None and after is not None
    assert after["created"] > before["created"]
    make_loader(url, seaweed, tmp_path / "b", calls)(str(data_dir))
    assert calls == [1, 1]
    node_a.cache_clear()
    assert objects_under(seaweed, url) == {} or all(
        name.endswith(".lease") for name in objects_under(seaweed, url)
    )


def test_portable_content_keys_share_entries_across_dataset_copies(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "restored"
    shutil.copytree(data_dir, copy)  # another path, fresh mtimes: as restored from an archive
    calls: list[int] = []
    shared = {"portable": True, "fingerprint": "content"}
    node_a = make_loader(url, seaweed, tmp_path / "a", calls, **shared)
    node_b = make_loader(url, seaweed, tmp_path / "b", calls, **shared)
    np.testing.assert_array_equal(node_a(str(data_dir)), node_b(str(copy)))
    assert calls == [1]
    # Without portable=True the absolute path is part of the key: the copy misses.
    node_c = make_loader(url, seaweed, tmp_path / "c", calls, fingerprint="content")
    node_c(str(data_dir))
    node_c(str(copy))
    assert calls == [1, 1, 1]


def test_fsspec_urls_work_too(data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    calls: list[int] = []
    url = f"memory://cachedload-{uuid.uuid4().hex[:8]}/cache"

    def loader(local: Path) -> Any:
        @cached_dataset(cache_dir=url, local_cache_dir=local)
        def load(data_dir: str) -> list[int]:
            calls.append(1)
            return [len(os.listdir(data_dir))]

        return load

    assert loader(tmp_path / "a")(str(data_dir)) == [4]
    assert loader(tmp_path / "b")(str(data_dir)) == [4]
    assert calls == [1]


def test_cachedload_dir_may_be_a_url(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEDLOAD_DIR", url)
    for name, value in aws_env(seaweed).items():
        monkeypatch.setenv(name, value)
    calls: list[int] = []

    @cached_dataset
    def load(data_dir: str) -> int:
        calls.append(1)
        return len(os.listdir(data_dir))

    assert load(str(data_dir)) == 4 and load(str(data_dir)) == 4 and calls == [1]
    assert any(name.endswith("meta.json") for name in objects_under(seaweed, url))


def test_unknown_schemes_are_rejected_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match="cache_dir"):
        cached_dataset(cache_dir="nosuchscheme://x/y")(lambda path: path)


# --- the command line ----------------------------------------------------------------------------
def test_cli_ls_info_verify_clear_prune_on_a_bucket(
    seaweed: str,
    url: str,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cachedload.cli import main

    for name, value in aws_env(seaweed).items():
        monkeypatch.setenv(name, value)
    calls: list[int] = []
    node_a = make_loader(url, seaweed, tmp_path / "a", calls)
    node_a(str(data_dir))
    node_a(str(data_dir), scale=2)
    make_loader(url, seaweed, tmp_path / "b", calls)(str(data_dir))  # a hit on another node

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        status = main([*argv, "--cache-dir", url])
        return status, capsys.readouterr().out

    status, out = run("ls", "--json")
    records = json.loads(out)
    assert status == 0 and len(records) == 2
    assert all(record["url"].startswith(f"{url}/") for record in records)
    hit = next(r for r in records if "scale" in r["parameters"] and r["parameters"]["scale"] == "1")
    assert hit["hits"] >= 1  # recorded in the bucket by node b
    status, out = run("ls")
    assert status == 0 and "2 entries" in out and url in out
    status, out = run("info", hit["id"][:10])
    assert status == 0 and f"{url}/" in out and "load" in out

    # Damage the other entry's data in the bucket: verify finds it, --fix deletes it.
    other = next(r for r in records if r is not hit)
    prefix = url.split(f"s3://{BUCKET}/", 1)[1]
    data_key = f"{prefix}/{other['function_dir']}/{other['id']}/result.joblib"
    size = s3_client(seaweed).head_object(Bucket=BUCKET, Key=data_key)["ContentLength"]
    s3_client(seaweed).put_object(Bucket=BUCKET, Key=data_key, Body=b"\0" * size)
    status, out = run("verify")
    assert status == 1 and "CORRUPT" in out and "checksum" in out and "OK" in out
    status, out = run("verify", "--fix")
    assert status == 1 and "(deleted)" in out
    assert len(json.loads(run("ls", "--json")[1])) == 1

    status, out = run("prune", "--max-size", "1")
    assert status == 0 and "removed 1 entry" in out
    assert json.loads(run("ls", "--json")[1]) == []
    node_a(str(data_dir), scale=3)
    status, out = run("clear", "--all", "--yes")
    assert status == 0 and json.loads(run("ls", "--json")[1]) == []
    assert not any(name.endswith("meta.json") for name in objects_under(seaweed, url))


class _RunsCode:
    """A pickle that creates ``marker`` when it is loaded (what a bucket writer could plant)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_a_pickle_planted_in_the_bucket_never_runs_on_a_fresh_node(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path
) -> None:
    import pickle

    import xxhash

    calls: list[int] = []
    expected = make_loader(url, seaweed, tmp_path / "a", calls)(str(data_dir))
    names = objects_under(seaweed, url)
    data_key = next(name for name in names if name.endswith(".joblib"))
    meta_key = next(name for name in names if name.endswith("/meta.json"))
    prefix = url.split(f"s3://{BUCKET}/", 1)[1]
    client = s3_client(seaweed)
    marker = tmp_path / "owned"
    payload = pickle.dumps(_RunsCode(str(marker)))
    meta = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/{meta_key}")["Body"].read())
    meta["data"].update(size=len(payload), xxh3=xxhash.xxh3_128_hexdigest(payload))
    # Plain PUTs over the published objects, checksum and size fixed up to match.
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{data_key}", Body=payload)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{meta_key}", Body=json.dumps(meta).encode())
    with pytest.warns(CorruptEntryWarning, match="UnsafePickleError"):
        healed = make_loader(url, seaweed, tmp_path / "b", calls)(str(data_dir))
    assert not marker.exists()
    assert calls == [1, 1]
    np.testing.assert_array_equal(healed, expected)


def test_a_per_item_build_on_another_node_reuses_the_rows_in_the_bucket(
    seaweed: str, url: str, tmp_path: Path
) -> None:
    from cachedload import CachedDataset
    from cachedload.options import Options
    from tests.test_builder import OLD_NS, calls, row_of, write

    folder = tmp_path / "src"
    for index in range(12):
        write(folder, f"f{index:04d}.txt", index)
    counter = tmp_path / "calls.txt"

    def node(local: str) -> Any:
        options = Options(per_item="path", cache_dir=url, local_cache_dir=tmp_path / local,
                          storage_options=storage_options(seaweed))  # fmt: skip
        return CachedDataset(row_of, options)

    first = node("a").map(folder, counter=str(counter))
    assert calls(counter) == 12
    write(folder, "f0005.txt", 555, OLD_NS + 10)
    # Node b has no local copy of anything: it takes node a's rows from the bucket.
    second = node("b").map(folder, counter=str(counter))
    assert calls(counter) == 13
    assert second.array[5][0, 0] == 555 and np.array_equal(second.array[6:], first.array[6:])
    expected = CachedDataset(row_of, Options(per_item="path", cache_dir=tmp_path / "scratch"))
    assert np.array_equal(second.array, expected.map(folder).array)


def test_verify_reports_a_manifest_object_that_does_not_match_its_metadata(
    seaweed: str, url: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachedload import list_entries, verify
    from cachedload.entry import encode_manifest
    from cachedload.manage import manifest_of

    for name, value in aws_env(seaweed).items():
        monkeypatch.setenv(name, value)
    make_loader(url, seaweed, tmp_path / "a", [])(str(data_dir))
    (record,) = list_entries(url)  # from a node without the local copy: the bucket's
    assert len((manifest_of(record) or {})["data_dir"]) == 4
    prefix = url.split(f"s3://{BUCKET}/", 1)[1]
    listed = s3_client(seaweed).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    (manifest,) = (found["Key"] for found in listed if found["Key"].endswith("/manifest"))
    forged = encode_manifest({"data_dir": [["forged.bin", 1, 2]]})  # which file is which
    s3_client(seaweed).put_object(Bucket=BUCKET, Key=manifest, Body=forged)
    problems = [found.problem for found in verify(url) if found.url and found.problem]
    assert problems and "manifest" in problems[0]
    assert manifest_of(record) is None  # not shown as the entry's files
