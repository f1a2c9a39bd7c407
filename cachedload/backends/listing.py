"""Listing, verifying and deleting the entries of a remote cache, for ``cachedload`` and
``cache_clear()``: the bucket-side counterparts of :mod:`cachedload.manage`'s folder walks.

Object stores have no access times, so "last used" is the cache's own record: the
``<key>.used`` object each node rewrites when it first reads an entry and then at most hourly
(its ``LastModified`` is the last use, its size the number of hits).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from cachedload import explain
from cachedload.backends import default_local_root, object_store, open_store
from cachedload.backends.objects import ObjectInfo, ObjectStore
from cachedload.backends.remote import RemoteStore
from cachedload.manage import EntryRecord, VerifyResult, log_removal
from cachedload.store import MANIFEST_FILE, META_FILE, CorruptEntry, EntryInfo

__all__ = [
    "clear_function",
    "compare_records",
    "is_busy",
    "list_entries",
    "read_manifest",
    "remote_entries",
    "remove_damaged",
    "remove_entry",
    "remove_remote_leftovers",
    "tidy",
    "verify",
]

logger = logging.getLogger("cachedload")

_LEFTOVER_MAX_AGE = 3600.0
_FETCHERS = 8


def _function_dirs(objects: ObjectStore) -> list[str]:
    return [name for name in objects.list_dirs("") if not name.startswith(".")]


def _stores(
    url: str, storage_options: dict[str, Any] | None, local_root: Path | None
) -> Iterator[RemoteStore]:
    objects = object_store(url, storage_options)
    local = default_local_root(url) if local_root is None else local_root
    for name in _function_dirs(objects):
        yield RemoteStore(objects, name, local)


def _record(store: RemoteStore, record: EntryRecord) -> EntryRecord:
    return dataclasses.replace(record, url=store.entry_url(record.id))


def _read_meta(store: RemoteStore, key: str) -> dict[str, Any] | None:
    try:
        return store.read_remote_meta(key)
    except CorruptEntry:
        return None  # verify finds it


def remote_entries(store: RemoteStore) -> Iterator[EntryInfo]:
    """The readable entries of ``store``'s function folder in the bucket (their metadata is
    fetched a few at a time: one request each)."""
    files: dict[str, dict[str, ObjectInfo]] = {}
    used: dict[str, ObjectInfo] = {}
    for info in store.objects.iter_objects(f"{store.remote_dir}/"):
        rest = info.key[len(store.remote_dir) + 1 :]
        key, slash, name = rest.partition("/")
        if slash:
            files.setdefault(key, {})[name] = info
        elif rest.endswith(".used"):
            used[rest.removesuffix(".used")] = info
    keys = sorted(key for key, names in files.items() if META_FILE in names)
    with ThreadPoolExecutor(max_workers=_FETCHERS) as pool:
        metas = list(pool.map(lambda key: _read_meta(store, key), keys))
    for key, meta in zip(keys, metas, strict=True):
        if meta is None:
            continue
        size = sum(info.size for info in files[key].values())
        use = used.get(key)
        last_used = use.last_modified if use else float(meta.get("created", 0.0))
        yield EntryInfo(key, store.entry_path(key), meta, size, use.size if use else 0, last_used)


def list_entries(
    url: str,
    storage_options: dict[str, Any] | None = None,
    local_root: Path | None = None,
) -> list[EntryRecord]:
    """Every readable entry of the remote cache at ``url``, newest first (``path``: where this
    machine's local copy is or would be; ``url``: the entry in the bucket)."""
    records = [
        _record(store, EntryRecord.from_info(info))
        for store in _stores(url, storage_options, local_root)
        for info in remote_entries(store)
    ]
    records.sort(key=lambda record: record.created, reverse=True)
    return records


def _store_of(url: str, path: Path, storage_options: dict[str, Any] | None) -> RemoteStore:
    """The store of the entry at ``url`` (``<root>/<function dir>/<key>/``) whose local copy
    is (or would be) ``path``."""
    root = url.removesuffix(f"/{path.parent.name}/{path.name}/")
    return open_store(
        root, path.parent.name, storage_options=storage_options, local_cache_dir=path.parent.parent
    )


def _busy(url: str, path: Path, storage_options: dict[str, Any] | None) -> bool:
    store = _store_of(url, path, storage_options)
    info = store.objects.head(f"{store.remote_dir}/{path.name}.lease")
    if info is None:
        return False
    return info.age is None or info.age <= store.lease_seconds


def is_busy(record: EntryRecord, storage_options: dict[str, Any] | None = None) -> bool:
    """True if a live lease on the entry exists (another machine is computing or replacing it)."""
    assert record.url is not None
    return _busy(record.url, record.path, storage_options)


def remove_entry(
    record: EntryRecord, reason: str = "removed", storage_options: dict[str, Any] | None = None
) -> bool:
    """Delete an entry from the bucket (metadata first) and from the local copy; False, and
    nothing deleted, if another process holds its lease."""
    if is_busy(record, storage_options):
        logger.info("keeping %s [%s]: in use by another process", record.function, record.id)
        return False
    assert record.url is not None
    _store_of(record.url, record.path, storage_options).remove(record.id)
    log_removal(record, reason)
    return True


def read_manifest(
    record: EntryRecord, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """An entry's per-file manifest: from the local copy, else from the bucket (None if none)."""
    found = explain.read_manifest(record.path)
    if found is not None or record.url is None:
        return found
    store = _store_of(record.url, record.path, storage_options)
    raw = store.objects.get(store.object_key(record.id, MANIFEST_FILE))
    if raw is None:
        return None
    try:
        manifest = json.loads(zlib.decompress(raw))
    except (ValueError, zlib.error):
        return None
    return manifest if isinstance(manifest, dict) else None


def compare_records(older: EntryRecord, newer: EntryRecord) -> explain.Explanation:
    """How two entries of a remote cache differ (``cachedload why``)."""
    return explain.compare(older.meta, read_manifest(older), newer.meta, read_manifest(newer))


def tidy(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove the leftovers of every function folder in the bucket (after a prune)."""
    for store in _stores(url, storage_options, None):
        remove_remote_leftovers(store)


def verify(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    checksums: bool = True,
    local_root: Path | None = None,
) -> Iterator[VerifyResult]:
    """Check every entry in the bucket: metadata, data size and (``checksums``) the xxh3 of the
    data, streamed from the bucket without keeping it."""
    for store in _stores(url, storage_options, local_root):
        keys: dict[str, dict[str, ObjectInfo]] = {}
        for info in store.objects.iter_objects(f"{store.remote_dir}/"):
            key, slash, name = info.key[len(store.remote_dir) + 1 :].partition("/")
            if slash:
                keys.setdefault(key, {})[name] = info
        for key, files in sorted(keys.items()):
            if META_FILE not in files:
                continue  # being written, or a leftover: not an entry
            size = sum(info.size for info in files.values())
            function, problem = store.remote_dir, None
            try:
                meta = store.read_remote_meta(key)
                if meta is None:
                    continue
                function = str(meta.get("function", function))
                problem = _check_data(store, key, meta, checksums)
            except CorruptEntry as error:
                problem = error.reason
            except OSError as error:
                problem = f"cannot read the entry ({error})"
            yield VerifyResult(store.entry_path(key), function, size, problem, store.entry_url(key))


class _Hasher:
    def __init__(self) -> None:
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return len(data)


def _check_data(store: RemoteStore, key: str, meta: dict[str, Any], checksums: bool) -> str | None:
    data = meta["data"]
    name = store.object_key(key, data["file"])
    if not checksums:
        info = store.objects.head(name)
        if info is None:
            return "data object is missing"
        return (
            None
            if info.size == data["size"]
            else (f"data object is {info.size} bytes, metadata says {data['size']}")
        )
    sink = _Hasher()
    try:
        store.objects.download(name, sink)
    except FileNotFoundError:
        return "data object is missing"
    if sink.size != data["size"]:
        return f"data object is {sink.size} bytes, metadata says {data['size']}"
    if sink.hasher.hexdigest() != data["xxh3"]:
        return "data object checksum does not match"
    return None


def remove_damaged(result: VerifyResult, storage_options: dict[str, Any] | None = None) -> bool:
    """Delete an entry :func:`verify` found damaged (its metadata first)."""
    assert result.url is not None
    if _busy(result.url, result.path, storage_options):
        return False
    _store_of(result.url, result.path, storage_options).remove(result.id)
    logger.info("removed damaged entry %s: %s", result.url, result.problem)
    return True


def remove_remote_leftovers(store: RemoteStore, *, max_age: float = _LEFTOVER_MAX_AGE) -> int:
    """Delete objects of ``store``'s function folder that belong to no entry and are older than
    ``max_age``: data of writers that died before publishing, losers' uploads on servers without
    conditional writes, expired leases, usage records of deleted entries. Returns how many."""
    published: dict[str, set[str]] = {}
    found = list(store.objects.iter_objects(f"{store.remote_dir}/"))
    for info in found:
        key, slash, name = info.key[len(store.remote_dir) + 1 :].partition("/")
        if slash and name == META_FILE:
            try:
                meta = store.read_remote_meta(key)
            except CorruptEntry:
                continue  # verify --fix deals with damaged entries
            if meta is not None:
                published[key] = {META_FILE, "manifest", meta["data"]["file"]}
    now, removed = time.time(), 0
    for info in found:
        rest = info.key[len(store.remote_dir) + 1 :]
        key, slash, name = rest.partition("/")
        if slash:
            keep = key in published and name in published[key]
        else:
            key = rest.rsplit(".", 1)[0]
            keep = key in published and not rest.endswith(".lease")
            if rest.endswith(".lease"):
                keep = now - info.last_modified <= max(max_age, store.lease_seconds)
        if keep or now - info.last_modified <= max_age:
            continue
        logger.debug("removing leftover %s/%s", store.objects.url, info.key)
        store.objects.delete(info.key)
        removed += 1
    return removed


def clear_function(
    url: str,
    prefix: str,
    storage_options: dict[str, Any] | None,
    local_root: Path,
) -> None:
    """Delete every entry of the function folders named ``prefix…`` from the bucket and the
    local copy (``cache_clear()`` of a loader with a remote cache)."""
    for store in _stores(url, storage_options, local_root):
        if not store.remote_dir.startswith(prefix):
            continue
        for info in list(remote_entries(store)):
            store.remove(info.key)
        remove_remote_leftovers(store)
