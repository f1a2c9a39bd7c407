"""``Cache``: a location and its cache-wide policy, shared by the loaders made from it."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import Cache, ConfigurationError, cached_dataset
from tests.conftest import run_python, write_images, write_old
from tests.servers import storage_options


def _source(tmp_path: Path, text: str = "x") -> str:
    write_old(tmp_path / "src" / "a.txt", text)
    return str(tmp_path / "src")


def test_loaders_of_a_cache_share_its_location_and_policy(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", keep=2)
    calls: list[int] = []

    @cache.dataset
    def bare(folder: str) -> int:
        calls.append(1)
        return len(os.listdir(folder))

    @cache.dataset(mmap_mode="r")
    def mapped(folder: str) -> np.ndarray:
        return np.arange(10)

    src = _source(tmp_path)
    assert bare(src) == bare(src) == 1 and len(calls) == 1
    assert isinstance(mapped(src), np.memmap)
    assert bare.options.keep == mapped.options.keep == 2
    assert {e.function.rsplit(".", 1)[-1] for e in cache.entries()} == {"bare", "mapped"}
    for text in ("y", "z"):  # two more versions of bare's entry: keep=2 keeps the newest two
        write_old(Path(src) / "a.txt", text, mtime=1_000_000 + len(text) + ord(text))
        bare(src)
    assert len([e for e in cache.entries() if e.function.endswith("bare")]) == 2


def test_a_cache_wide_setting_on_a_loader_of_a_cache_is_a_type_error(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    for option in ("max_size", "keep", "cache_dir", "shared", "signing_key"):
        with pytest.raises(TypeError, match=rf"{option}=.*belong on the Cache"):
            cache.dataset(**{option: None})
    with pytest.raises(TypeError, match="max_size="):
        cache.image_folder(tmp_path, max_size="1GB")


def test_invalid_settings_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="max_size"):
        Cache(tmp_path, max_size="lots")
    with pytest.raises(ConfigurationError, match="keep"):
        Cache(tmp_path, keep=0)


def test_caches_compare_equal_by_settings_and_pickle_as_them(tmp_path: Path) -> None:
    one = Cache(tmp_path / "c", max_size="2GB", keep=2, signing_key="k", shared=True)
    assert one == Cache(tmp_path / "c", keep=2, max_size="2GB", signing_key="k", shared=True)
    assert one != Cache(tmp_path / "c", max_size="2GB", keep=3, signing_key="k", shared=True)
    assert one != Cache(tmp_path / "other", max_size="2GB", keep=2, signing_key="k", shared=True)
    assert len({one, pickle.loads(pickle.dumps(one))}) == 1
    assert "signing_key" not in repr(one) and "keep=2" in repr(one)


def test_entries_prune_verify_and_clear_do_what_the_command_line_does(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", keep=None)

    @cache.dataset
    def load(folder: str, scale: int = 1) -> np.ndarray:
        return np.ones(1000) * scale

    src = _source(tmp_path)
    for text in ("a", "b", "c"):
        write_old(Path(src) / "a.txt", text, mtime=2_000_000 + ord(text))
        load(src)
    assert len(cache.entries()) == 3  # keep=None: every version stays
    assert all(result.ok for result in cache.verify()) and len(cache.verify()) == 3
    report = cache.prune(keep=1)
    assert len(report.removed) == 2 and len(cache.entries()) == 1
    (cache.entries()[0].path / "result.joblib").write_bytes(b"damaged")
    assert [result.ok for result in cache.verify()] == [False]
    assert len(cache.clear().removed) == 1 and cache.entries() == []


def _call_in_a_worker(cache: Cache, folder: str) -> tuple[int, int]:
    @cache.dataset
    def count(folder: str) -> int:
        return len(os.listdir(folder))

    value = count(folder)
    return value, count.cache_info().hits


def test_a_cache_pickled_to_spawned_workers_hits_what_the_parent_stored(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", keep=2)
    src = _source(tmp_path)
    assert _call_in_a_worker(cache, src) == (1, 0)  # stored here
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_call_in_a_worker, (cache, src)) == (1, 1)  # a hit there


def test_two_processes_on_one_cache_share_entries(tmp_path: Path) -> None:
    src = _source(tmp_path)
    code = f"""
        import os
        from cachedload import Cache
        cache = Cache({str(tmp_path / "cache")!r}, max_size="1GB")

        @cache.dataset
        def count(folder):
            return len(os.listdir(folder))

        print(count({src!r}), count.cache_info().hits)
    """
    assert run_python(code).stdout.split() == ["1", "0"]
    assert run_python(code).stdout.split() == ["1", "1"]


def test_image_folder_caches_on_this_cache(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images")
    for path in images.rglob("*.png"):
        os.utime(path, (1_000_000, 1_000_000))
    cache = Cache(tmp_path / "cache")
    first = cache.image_folder(images, size=(8, 8))
    again = cache.image_folder(images, size=(8, 8))
    assert first.images.shape == (6, 8, 8, 3) and np.array_equal(first.images, again.images)
    assert [e.function.rsplit(".", 1)[-1] for e in cache.entries()] == ["_cached_image_folder_row"]


def test_a_remote_cache(tmp_path: Path, seaweed: str, url: str) -> None:
    cache = Cache(url, storage_options=storage_options(seaweed), local_cache_dir=tmp_path / "local")

    @cache.dataset
    def load(folder: str) -> dict[str, Any]:
        return {"n": len(os.listdir(folder))}

    src = _source(tmp_path)
    assert load(src) == load(src) == {"n": 1}
    assert load.cache_info().hits == 1
    [entry] = cache.entries()
    assert entry.url is not None and entry.url.startswith(url)
    assert [result.ok for result in cache.verify()] == [True]  # the entry in the bucket
    assert len(cache.clear().removed) == 1 and cache.entries() == []


def test_cached_dataset_with_cache_wide_keywords_still_works(tmp_path: Path) -> None:
    @cached_dataset(cache_dir=tmp_path / "cache", max_size="1GB", keep=2)
    def load(folder: str) -> int:
        return len(os.listdir(folder))

    src = _source(tmp_path)
    assert load(src) == load(src) == 1 and load.cache_info().hits == 1
    assert load.options.keep == 2 and load.options.max_size == "1GB"
