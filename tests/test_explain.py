"""Explaining a miss: the difference between a call's key and the closest stored entry."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import CachedDataset, Explanation
from cachedload.explain import compare, read_manifest
from tests.conftest import OLD, write_old

write = write_old


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A source folder of five small text files (one in a sub-folder)."""
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "sub/e.txt"):
        write(tmp_path / "data" / name, f"contents of {name}")
    return tmp_path / "data"


def _body(data_dir: str, size: tuple[int, int] = (128, 128), flag: bool = False) -> np.ndarray:
    return np.zeros(size, dtype=np.uint8)


def loader(cache_dir: Path, **options: Any) -> CachedDataset[..., np.ndarray]:
    return CachedDataset(_body, cache_dir=cache_dir, **options)


def test_cache_explain_names_added_modified_removed_files_and_a_parameter(
    tmp_path: Path, data: Path
) -> None:
    load = loader(tmp_path / "cache")
    load(str(data), size=(128, 128))
    write(data / "new.txt", "added")
    write(data / "b.txt", "modified: longer than before")
    (data / "sub" / "e.txt").unlink()

    explanation = load.cache_explain(str(data), size=(64, 64))

    assert isinstance(explanation, Explanation) and explanation
    parameter, source = explanation.differences
    assert (parameter.component, parameter.name) == ("parameter", "size")
    assert (parameter.old, parameter.new) == ("(128, 128)", "(64, 64)")
    assert (source.component, source.name) == ("source", "data_dir")
    assert source.added == ("new.txt",)
    assert source.modified == ("b.txt",)
    assert source.removed == ("sub/e.txt",)
    report = str(explanation)
    assert "parameter size: (128, 128) → (64, 64)" in report
    assert "1 file added (new.txt), 1 modified (b.txt), 1 removed (sub/e.txt)" in report
    assert report.startswith(f"{__name__}._body: this call [")
    assert "\n" not in explanation.summary()
    assert "size: (128, 128) → (64, 64)" in explanation.summary()


def test_a_touched_file_counts_as_modified(tmp_path: Path, data: Path) -> None:
    load = loader(tmp_path / "cache")
    load(str(data))
    os.utime(data / "a.txt", (OLD + 60, OLD + 60))
    (difference,) = load.cache_explain(str(data)).differences
    assert difference.modified == ("a.txt",)
    assert difference.text.endswith(": 1 file modified (a.txt)")


def test_only_the_first_few_names_are_shown(tmp_path: Path, data: Path) -> None:
    load = loader(tmp_path / "cache")
    load(str(data))
    for index in range(5):
        write(data / f"z{index}.txt", "more")
    (difference,) = load.cache_explain(str(data)).differences
    assert len(difference.added) == 5
    assert "5 files added (z0.txt, z1.txt, z2.txt, …)" in difference.text


def test_nothing_to_explain(tmp_path: Path, data: Path) -> None:
    load = loader(tmp_path / "cache")
    empty = load.cache_explain(str(data))
    assert not empty and "no entry" in str(empty)
    load(str(data))
    hit = load.cache_explain(str(data))
    assert not hit and "would be a hit" in hit.summary()


def test_code_and_version_changes(tmp_path: Path, data: Path) -> None:
    def helper_one() -> int:
        return 1

    def helper_two() -> int:
        return 2

    cache = tmp_path / "cache"
    loader(cache, depends_on=[helper_one])(str(data))
    changed = loader(cache, depends_on=[helper_two])
    (code,) = changed.cache_explain(str(data)).differences
    assert code.component == "code"
    assert code.text == (
        f"code changed in depends_on helper {__name__}.{helper_one.__qualname__} (removed), "
        f"depends_on helper {__name__}.{helper_two.__qualname__} (added)"
    )

    versioned = loader(cache, depends_on=[helper_one], version=2)
    (version,) = versioned.cache_explain(str(data)).differences
    assert version.text == "version None → 2"


def _defined(name: str, code: str) -> Any:
    """A module-level function of this module defined from source text (same name, any code)."""
    namespace: dict[str, Any] = {"__name__": __name__, "np": np}
    exec(code, namespace)
    return namespace[name]


def test_why_names_whose_code_changed(tmp_path: Path, data: Path) -> None:
    def versions(loader_code: str, helper_code: str) -> CachedDataset[..., Any]:
        helper = _defined("helper", f"def helper():\n    return {helper_code}\n")
        body = _defined("load", f"def load(data_dir):\n    return {loader_code}\n")
        return CachedDataset(body, cache_dir=tmp_path / "cache", depends_on=[helper])

    versions("1", "10")(str(data))
    (helper,) = versions("1", "20").cache_explain(str(data)).differences
    assert helper.text == f"code changed in depends_on helper {__name__}.helper"
    (loader_code,) = versions("2", "10").cache_explain(str(data)).differences
    assert loader_code.text == f"code changed in the loader ({__name__}.load)"
    (both,) = versions("2", "20").cache_explain(str(data)).differences
    assert both.text == (
        f"code changed in the loader ({__name__}.load), depends_on helper {__name__}.helper"
    )


def test_the_entry_with_the_same_sources_is_compared_first(tmp_path: Path, data: Path) -> None:
    other = tmp_path / "other"
    write(other / "x.txt", "x")
    load = loader(tmp_path / "cache")
    load(str(data))
    load(str(other))  # newer, and as many components away, but another folder
    write(data / "a.txt", "changed", OLD - 60)
    (difference,) = load.cache_explain(str(data)).differences
    assert difference.text == f"source data_dir ({data.resolve()}): 1 file modified (a.txt)"


def test_the_closest_entry_has_the_fewest_differences(tmp_path: Path, data: Path) -> None:
    load = loader(tmp_path / "cache")
    load(str(data), size=(1, 1), flag=False)
    load(str(data), size=(2, 2), flag=True)  # newer, but two components away
    explanation = load.cache_explain(str(data), size=(3, 3), flag=False)
    assert [d.text for d in explanation.differences] == ["parameter size: (1, 1) → (3, 3)"]


def test_a_miss_logs_the_one_line_summary(
    tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load = loader(tmp_path / "cache")
    load(str(data), size=(128, 128))
    with caplog.at_level(logging.INFO, logger="cachedload"):
        load(str(data), size=(64, 64))
        load(str(data), size=(64, 64))  # a hit: no explanation
    explained = [r.getMessage() for r in caplog.records if "vs. stored entry" in r.getMessage()]
    assert len(explained) == 1
    assert explained[0].endswith("parameter size: (128, 128) → (64, 64)")


def test_compare_reports_format_and_falls_back_without_manifests() -> None:
    old = {
        "format": 0,
        "function": "m.f",
        "code": "c1",
        "version": "None",
        "parameters": {"n": {"digest": "1", "value": "1"}, "gone": {"digest": "x", "value": "'x'"}},
        "sources": {"src": {"path": "/d", "digest": "d1", "file_count": 3, "total_bytes": 30}},
    }
    new = {
        **old,
        "format": 1,
        "parameters": {"n": {"digest": "1", "value": "1"}, "extra": {"digest": "y", "value": "2"}},
        "sources": {"src": {"path": "/d", "digest": "d2", "file_count": 4, "total_bytes": 40}},
    }
    texts = [d.text for d in compare(old, None, new, None).differences]
    assert texts == [
        "format version 0 → 1",
        "parameter extra added (= 2)",
        "parameter gone removed (was 'x')",
        "source src (/d): fingerprint changed (3 → 4 files, 30 → 40 bytes; no file list stored)",
    ]


def test_the_manifest_is_stored_beside_the_entry(tmp_path: Path, data: Path) -> None:
    load = loader(tmp_path / "cache")
    load(str(data))
    manifest = read_manifest(load.cache_path(str(data)))
    assert manifest is not None
    assert [record[0] for record in manifest["data_dir"]] == [
        "a.txt",
        "b.txt",
        "c.txt",
        "d.txt",
        "sub/e.txt",
    ]
    assert read_manifest(tmp_path / "nowhere") is None
