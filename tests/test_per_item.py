"""Per-item loaders (cachedload.per_item): ``loader.map(folder)`` cached, incremental, exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import (
    CachedDataset,
    CacheStoreWarning,
    ConfigurationError,
    CorruptEntryWarning,
    ImagesSkippedWarning,
    ItemArray,
    SourceNotFoundError,
    cached_dataset,
    cached_image_folder,
    list_entries,
    load_image_folder,
)
from cachedload.entry import decode_manifest
from cachedload.errors import UnsafeCacheWarning
from cachedload.options import Options

from .conftest import another_users_cache, full_tmpfs, run_python, subprocess_env, write_images
from .test_builder import OLD_NS, calls, dask_backend, row_of, write


@cached_dataset(per_item="path")
def row(path: str, counter: str = "", shape: tuple[int, ...] = (2, 3)) -> Any:
    """The per-item loader of these tests: a row from the file's number; counts its calls."""
    return row_of(path, counter or None, shape)


def loader(**options: Any) -> CachedDataset[..., Any]:
    """``row``'s loader with other cache options (same function: same keys)."""
    return CachedDataset(row.__wrapped__, Options(per_item="path", **options))


def data_file(wrapper: CachedDataset[..., Any], *args: Any, **kwargs: Any) -> bytes:
    return (wrapper.map.cache_path(*args, **kwargs) / "result.joblib").read_bytes()


def built_from_scratch(tmp_path: Path, folder: Path, counter: Path) -> Any:
    """``row.map(folder)`` built again from scratch in another cache directory; asserts that
    its data file is byte for byte ``row``'s (an incremental build equals a full one)."""
    scratch = loader(cache_dir=tmp_path / "scratch")
    result = scratch.map(folder, counter=str(counter))
    assert data_file(row, folder, counter=str(counter)) == data_file(
        scratch, folder, counter=str(counter)
    )
    return result


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for index in range(20):
        write(root, f"{('a', 'b')[index % 2]}/f{index:04d}.txt", index)
    return root


def test_map_stacks_rows_in_sorted_order_and_a_direct_call_runs_one_item(
    folder: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "calls.txt"
    result = row.map(folder, pattern="**/*.txt", counter=str(counter))
    assert isinstance(result, ItemArray)
    assert result.paths == tuple(sorted(p.relative_to(folder).as_posix()
                                        for p in folder.rglob("*.txt")))  # fmt: skip
    assert result.array.shape == (20, 2, 3) and result.paths[0] == "a/f0000.txt"
    assert calls(counter) == 20
    again = row.map(folder, pattern="**/*.txt", counter=str(counter))
    assert calls(counter) == 20 and np.array_equal(again.array, result.array)
    direct = row(str(folder / "b/f0001.txt"), counter=str(counter))
    assert calls(counter) == 21 and np.array_equal(direct, result.array[10])
    assert row(str(folder / "b/f0001.txt")) is not None and row.cache_info().entries == 1


def test_one_changed_file_costs_exactly_one_call_in_another_process(
    folder: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "calls.txt"
    row.map(folder, counter=str(counter))
    write(folder, "b/f0003.txt", 333, OLD_NS + 10)
    code = f"""
        from tests.test_per_item import row
        result = row.map({str(folder)!r}, counter={str(counter)!r})
        assert int(result.array[11, 0, 0]) == 333, result.array[:, 0, 0]
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True,
                   env=subprocess_env(), cwd=Path(__file__).parents[1])  # fmt: skip
    assert calls(counter) == 21
    assert counter.read_text().splitlines()[-1] == "f0003.txt"
    # Bit-identical to a build from scratch in another cache directory.
    built_from_scratch(tmp_path, folder, counter)


def test_added_files_cost_one_call_each_and_a_removed_file_none(
    folder: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "calls.txt"
    row.map(folder, counter=str(counter))
    for index in range(1000):
        write(folder, f"c/g{index:04d}.txt", index)
    before = calls(counter)
    result = row.map(folder, counter=str(counter))
    assert calls(counter) - before == 1000 and result.array.shape[0] == 1020
    (folder / "a/f0000.txt").unlink()
    before = calls(counter)
    result = row.map(folder, counter=str(counter))
    assert calls(counter) == before and result.array.shape[0] == 1019
    assert "a/f0000.txt" not in result.paths
    built_from_scratch(tmp_path, folder, counter)


def test_an_entry_with_a_manifest_of_an_older_version_still_saves_the_unchanged_rows(
    folder: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "calls.txt"
    row.map(folder, counter=str(counter))
    manifest_file = row.map.cache_path(folder, counter=str(counter)) / "manifest"
    records = decode_manifest(manifest_file.read_bytes())
    manifest_file.write_bytes(zlib.compress(json.dumps(records).encode(), 3))  # before 0.2
    meta_file = manifest_file.with_name("meta.json")  # which did not record the manifest
    meta = json.loads(meta_file.read_text())
    del meta["manifest"]
    meta_file.write_text(json.dumps(meta))
    write(folder, "b/f0003.txt", 333, OLD_NS + 10)
    assert "1 file modified (b/f0003.txt)" in str(
        row.map.cache_explain(folder, counter=str(counter))
    )
    result = row.map(folder, counter=str(counter))
    assert calls(counter) == 21 and int(result.array[11, 0, 0]) == 333
    manifest_file = row.map.cache_path(folder, counter=str(counter)) / "manifest"
    manifest_file.write_bytes(b"CLDMAN\x00\x02 damaged")  # a damaged one: a full build
    write(folder, "b/f0005.txt", 555, OLD_NS + 10)
    result = row.map(folder, counter=str(counter))
    assert calls(counter) == 41 and int(result.array[12, 0, 0]) == 555


@pytest.mark.parametrize("as_list", [False, True])
def test_fingerprint_content_reuses_the_rows_whose_content_is_unchanged(
    folder: Path, tmp_path: Path, as_list: bool
) -> None:
    by_content = loader(cache_dir=tmp_path / "c", fingerprint="content")
    counter = tmp_path / "calls.txt"
    source: Any = sorted(map(str, folder.rglob("*.txt"))) if as_list else folder
    by_content.map(source, counter=str(counter))
    assert calls(counter) == 20
    write(folder, "a/f0002.txt", 2, OLD_NS + 10)  # touched: same content, another mtime
    write(folder, "a/f0004.txt", 5, OLD_NS)  # same size, same mtime, other content
    write(folder, "b/f0005.txt", 555, OLD_NS + 20)  # other size too
    result = by_content.map(source, counter=str(counter))
    assert calls(counter) == 22
    assert sorted(counter.read_text().splitlines()[-2:]) == ["f0004.txt", "f0005.txt"]  # threads
    scratch = loader(cache_dir=tmp_path / "scratch", fingerprint="content")
    assert np.array_equal(result.array, scratch.map(source, counter=str(counter)).array)
    assert data_file(by_content, source, counter=str(counter)) == data_file(
        scratch, source, counter=str(counter)
    )


def test_the_previous_entry_stays_until_keep_removes_it(folder: Path, tmp_path: Path) -> None:
    keeping = loader(cache_dir=tmp_path / "c", keep=2)
    keeping.map(folder)
    write(folder, "a/f0000.txt", 7, OLD_NS + 10)
    keeping.map(folder)
    assert keeping.cache_info().entries == 2
    one = loader(cache_dir=tmp_path / "c", keep=1)
    write(folder, "a/f0000.txt", 8, OLD_NS + 20)
    one.map(folder)
    assert one.cache_info().entries == 1


def test_a_failing_rebuild_loses_nothing(folder: Path, tmp_path: Path) -> None:
    row.map(folder)
    (folder / "a/f0002.txt").write_text("not a number")
    with pytest.raises(ValueError, match="invalid literal") as raised:
        row.map(folder)
    assert type(raised.value) is ValueError  # the loader's own error, untouched
    assert row.cache_info().entries == 1
    write(folder, "a/f0002.txt", 5, OLD_NS + 30)
    assert int(row.map(folder).array[1, 0, 0]) == 5


def test_skip_leaves_files_out_every_hit_warns_and_it_is_part_of_the_key(
    folder: Path, tmp_path: Path
) -> None:
    (folder / "a/f0002.txt").write_text("not a number")
    os.utime(folder / "a/f0002.txt", ns=(OLD_NS, OLD_NS))
    skipping = loader(cache_dir=tmp_path / "cache")
    with pytest.warns(ImagesSkippedWarning) as miss:
        result = skipping.map(folder, skip=ValueError)
    assert len(miss) == 1 and "a/f0002.txt (invalid literal" in str(miss[0].message)
    assert miss[0].filename == __file__
    assert result.skipped == ("a/f0002.txt",) and len(result.paths) == 19
    for _ in range(2):
        with pytest.warns(ImagesSkippedWarning, match="leaves out 1 ") as hit:
            again = skipping.map(folder, skip=(ValueError,))
        assert len(hit) == 1 and again.skipped == result.skipped
        assert np.array_equal(again.array, result.array) and again.paths == result.paths
    assert skipping.cache_info().hits == 2
    assert skipping.map.is_cached(folder, skip=ValueError)
    assert not skipping.map.is_cached(folder)
    with pytest.raises(ValueError, match="invalid literal"):
        skipping.map(folder)  # without skip=: not answered by the entry that skipped
    for bad in ("ValueError", (ValueError, 3), KeyboardInterrupt):
        with pytest.raises(ConfigurationError) as caught:
            skipping.map(folder, skip=bad)  # type: ignore[arg-type]
        assert caught.value.option == "skip"


def test_skip_and_ragged_are_shown_as_parameters_and_the_summary_counts_the_rows(
    folder: Path, tmp_path: Path
) -> None:
    (folder / "a/f0002.txt").write_text("not a number")
    skipping = loader(cache_dir=tmp_path / "cache")
    with pytest.warns(ImagesSkippedWarning):
        skipping.map(folder, skip=ValueError)
    (entry,) = skipping.entries()
    assert entry.parameters["(skip)"] == "('builtins.ValueError',)"
    assert "shape=(19, 2, 3)" in entry.result  # the rows stored: the skipped file has none
    # A call without skip= differs from that entry by it, and says so.
    explained = skipping.map.cache_explain(folder)
    assert "parameter (skip) removed" in str(explained)
    (folder / "a/f0002.txt").write_text("2")
    skipping.map(folder, ragged=True)
    shown = {record.parameters.get("(ragged)") for record in skipping.entries()}
    assert shown == {None, "True"}


def test_a_map_hit_names_the_loader_each_skipped_file_and_its_reason(
    folder: Path, tmp_path: Path
) -> None:
    for index in range(0, 20, 3):  # 7 unreadable files: each named, with its reason
        (folder / ("a", "b")[index % 2] / f"f{index:04d}.txt").write_text("not a number")
    skipping = loader(cache_dir=tmp_path / "cache")
    with pytest.warns(ImagesSkippedWarning) as miss:
        skipping.map(folder, skip=ValueError)
    with pytest.warns(ImagesSkippedWarning) as hit:
        result = skipping.map(folder, skip=ValueError)
    assert skipping.cache_info().hits == 1 and len(result.skipped) == 7
    message = str(hit[0].message)
    assert message.startswith(f"cachedload: row.map({str(folder)!r}) returns a cached result")
    assert "leaves out 7 unreadable file(s)" in message and "more" not in message
    for path in result.skipped:
        assert f"{path} (invalid literal for int()" in message
    assert message.endswith(str(miss[0].message).split("file(s): ", 1)[1])
    assert len(hit) == 1 and hit[0].filename == __file__
    # A list of files: named by its count and folder; past ten files, how many more.
    files = sorted(str(p) for p in folder.rglob("*.txt"))
    for index in range(1, 20, 3):
        Path(files[index]).write_text("bad")
    with pytest.warns(ImagesSkippedWarning):
        skipping.map(files, skip=ValueError)
    with pytest.warns(ImagesSkippedWarning) as hit:
        skipping.map(files, skip=ValueError)
    message = str(hit[0].message)
    assert message.startswith(f"cachedload: row.map([20 file(s) in {str(folder)!r}]) returns")
    assert "leaves out 14 unreadable file(s)" in message and "; and 4 more " in message


def test_a_long_reason_is_stored_and_shown_cut_short(folder: Path, tmp_path: Path) -> None:
    @cached_dataset(per_item="path", cache_dir=tmp_path / "cache")
    def picky(path: str) -> Any:
        if path.endswith("f0003.txt"):
            raise ValueError("x" * 100_000)
        return row_of(path)

    with pytest.warns(ImagesSkippedWarning) as miss:
        picky.map(folder, skip=ValueError)
    with pytest.warns(ImagesSkippedWarning) as hit:
        picky.map(folder, skip=ValueError)
    meta = json.loads((picky.map.cache_path(folder, skip=ValueError) / "meta.json").read_text())
    assert meta["skipped"] == ["b/f0003.txt"]  # the paths, as older versions read them
    (reason,) = meta["skipped_reasons"].values()
    assert reason == "x" * 199 + "…"
    for caught in (miss, hit):
        message = str(caught[0].message)
        assert message.startswith(f"cachedload: picky.map({str(folder)!r}) ")
        assert message.endswith(f"b/f0003.txt ({'x' * 199}…)")


def test_an_oserror_of_the_loader_is_not_a_store_failure(folder: Path) -> None:
    @cached_dataset(per_item="path")
    def broken(path: str) -> Any:
        raise FileNotFoundError(2, "gone", path)

    with pytest.raises(FileNotFoundError, match="gone"):
        broken.map(folder)


def test_mmap_mode_gives_memory_maps_on_a_miss_and_a_hit(folder: Path, tmp_path: Path) -> None:
    mapped = loader(mmap_mode="r")
    miss = mapped.map(folder)
    hit = mapped.map(folder)
    assert isinstance(miss.array, np.memmap) and isinstance(hit.array, np.memmap)
    assert np.array_equal(miss.array, hit.array) and mapped.cache_info().hits == 1


def test_cache_explain_names_the_changed_file(folder: Path) -> None:
    row.map(folder, pattern="**/*.txt")
    assert row.map.is_cached(folder, pattern="**/*.txt")
    write(folder, "b/f0005.txt", 55, OLD_NS + 10)
    assert not row.map.is_cached(folder, pattern="**/*.txt")
    text = str(row.map.cache_explain(folder, pattern="**/*.txt"))
    assert "1 file modified" in text and "b/f0005.txt" in text
    assert [e.key for e in list_entries()] == [e.key for e in row.entries()]


def test_cache_explain_of_a_cached_ragged_or_skipping_map_says_it_would_hit(
    folder: Path,
) -> None:
    row.map(folder, ragged=True)
    row.map(folder, skip=ValueError)
    for options in ({"ragged": True}, {"skip": ValueError}):
        assert row.map.is_cached(folder, **options)
        assert "would be a hit" in str(row.map.cache_explain(folder, **options))


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"n_jobs": 0}, "n_jobs"),
        ({"backend": "no-such-backend"}, "backend"),
        ({"progress": "yes"}, "progress"),
    ],
)
@pytest.mark.parametrize("method", ["__call__", "recompute", "is_cached", "cache_explain"])
def test_map_options_are_checked_by_every_method_that_takes_them(
    folder: Path, method: str, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        getattr(row.map, method)(folder, **options)


def test_patterns_parameters_and_ragged_make_other_entries(folder: Path) -> None:
    write(folder, "a/skip.dat", 1)
    only_txt = row.map(folder, pattern="**/*.txt")
    assert len(only_txt.paths) == 20
    assert len(row.map(folder).paths) == 21
    wide = row.map(folder, pattern="*.txt", shape=(4,))
    ragged = row.map(folder, pattern="*.txt", ragged=True)
    assert wide.array.shape == (20, 4) and isinstance(ragged.array, list)
    assert row.cache_info().entries == 4


def test_a_list_of_files_is_relative_to_their_common_folder(folder: Path) -> None:
    files: list[str | os.PathLike[str]] = [folder / "b/f0001.txt", str(folder / "a/f0000.txt")]
    result = row.map(files)
    assert result.paths == ("a/f0000.txt", "b/f0001.txt")
    assert row.map.is_cached(files)
    with pytest.raises(SourceNotFoundError):
        row.map([folder / "missing.txt"])


def test_a_corrupt_entry_heals(folder: Path) -> None:
    row.map(folder)
    data = row.map.cache_path(folder) / "result.joblib"
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.warns(CorruptEntryWarning):
        result = row.map(folder)
    assert result.array.shape == (20, 2, 3) and row.map.is_cached(folder)


def test_a_cache_that_cannot_be_written_warns_and_returns(folder: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.warns(CacheStoreWarning):
        result = loader(cache_dir=blocked / "cache", mmap_mode="r").map(folder)
    assert result.array.shape == (20, 2, 3) and int(result.array[19, 0, 0]) == 19


def expected_rows(folder: Path, shape: tuple[int, ...]) -> Any:
    files = sorted(folder.rglob("*.txt"))
    return np.stack([row_of(str(f), None, shape) for f in files])


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_a_full_disk_returns_the_rows_computed_with_a_warning(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mmap_mode: str | None
) -> None:
    # The cache and TMPDIR on one real tmpfs far too small for the result (640 KB).
    with full_tmpfs(tmp_path / "disk", "256k") as disk:
        (disk / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(disk / "tmp"))
        counter = tmp_path / "calls.txt"
        full = loader(cache_dir=disk / "cache", mmap_mode=mmap_mode)
        with pytest.warns(CacheStoreWarning, match="could not store"):
            result = full.map(folder, shape=(64, 64), counter=str(counter))
        assert np.array_equal(result.array, expected_rows(folder, (64, 64)))
        assert calls(counter) == 20  # each row computed once: not built again elsewhere
        assert not full.map.is_cached(folder, shape=(64, 64), counter=str(counter))
        # A small result still fits: the cache works again once there is room.
        assert full.map(folder, shape=(2,)).array.shape == (20, 2)
        assert full.map.is_cached(folder, shape=(2,))


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_an_incremental_build_on_a_full_disk_returns_its_rows_computing_only_the_changed(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mmap_mode: str | None
) -> None:
    # Room for one entry (640 KB), not for the next one.
    with full_tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(disk / "tmp"))
        counter = tmp_path / "calls.txt"
        full = loader(cache_dir=disk / "cache", mmap_mode=mmap_mode, keep=2)
        full.map(folder, shape=(64, 64), counter=str(counter))
        write(folder, "b/f0019.txt", 1000, mtime_ns=OLD_NS + 10**9)
        with pytest.warns(CacheStoreWarning, match="No space left"):
            result = full.map(folder, shape=(64, 64), counter=str(counter))
        assert np.array_equal(result.array, expected_rows(folder, (64, 64)))
        assert calls(counter) == 21  # the 19 others copied from the previous entry


def test_a_ragged_build_on_a_full_disk_returns_its_rows_with_a_warning(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with full_tmpfs(tmp_path / "disk", "256k") as disk:
        (disk / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(disk / "tmp"))
        full = loader(cache_dir=disk / "cache")
        with pytest.warns(CacheStoreWarning):
            result = full.map(folder, shape=(64, 64), ragged=True)
        assert np.array_equal(np.stack(result.array), expected_rows(folder, (64, 64)))


def test_a_file_size_limit_returns_the_rows_computed_with_a_warning(
    folder: Path, tmp_path: Path
) -> None:
    run_python(f"""
        import resource, signal, warnings
        import numpy as np
        from cachedload import CacheStoreWarning
        from tests.test_per_item import expected_rows, loader
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        folder = Path({str(folder)!r})
        for mmap_mode in (None, "r"):
            wrapper = loader(cache_dir={str(tmp_path / "cache")!r}, mmap_mode=mmap_mode)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = wrapper.map(folder, shape=(64, 64))
            assert [w.category for w in caught] == [CacheStoreWarning], caught
            assert np.array_equal(result.array, expected_rows(folder, (64, 64)))
        """, cwd=Path(__file__).resolve().parents[1])  # fmt: skip


def test_per_item_must_name_a_parameter() -> None:
    with pytest.raises(ConfigurationError, match="per_item"):
        cached_dataset(per_item="file")(row.__wrapped__)


def test_two_processes_build_once(folder: Path, tmp_path: Path) -> None:
    counter = tmp_path / "calls.txt"
    code = f"""
        from tests.test_per_item import row
        assert row.map({str(folder)!r}, counter={str(counter)!r}).array.shape == (20, 2, 3)
    """
    command = [sys.executable, "-c", textwrap.dedent(code)]
    children = [subprocess.Popen(command, env=subprocess_env(), cwd=Path(__file__).parents[1])
                for _ in range(2)]  # fmt: skip
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    assert calls(counter) == 20


def test_a_dask_cluster_builds_through_map(folder: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    counter = tmp_path / "calls.txt"
    with dask_backend(distributed):
        result = row.map(folder, counter=str(counter))
    assert calls(counter) == 20
    assert sorted(counter.read_text().split()) == sorted(p.name for p in folder.rglob("*.txt"))
    local = built_from_scratch(tmp_path, folder, counter)
    assert np.array_equal(result.array, local.array)


# -- cached_image_folder --------------------------------------------------------------------------


def same(data: Any, expected: Any) -> None:
    assert np.array_equal(data.images, expected.images)
    assert data.images.dtype == expected.images.dtype
    assert data.classes == expected.classes and data.paths == expected.paths
    if expected.labels is None:
        assert data.labels is None
    else:
        assert np.array_equal(data.labels, expected.labels)


@pytest.mark.parametrize(
    "options",
    [{}, {"size": (8, 12)}, {"color": "gray", "dtype": np.float32}, {"extensions": ["PNG"]}],
)
def test_cached_image_folder_equals_load_image_folder(
    image_dir: Path, options: dict[str, Any]
) -> None:
    expected = load_image_folder(image_dir, **options)
    same(cached_image_folder(image_dir, **options), expected)
    same(cached_image_folder(image_dir, mmap_mode="r", **options), expected)  # a hit
    write_images(image_dir / "c", count=3, classes=("x",))  # a third class, incrementally
    same(cached_image_folder(image_dir, **options), load_image_folder(image_dir, **options))


def test_cached_image_folder_of_jpegs_at_a_reduced_size(tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(1)
    for index in range(4):
        image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{index}.jpg"), image)
    expected = load_image_folder(tmp_path, size=(32, 32))
    data = cached_image_folder(tmp_path, size=(32, 32), mmap_mode="r")
    assert isinstance(data.images, np.memmap) and data.labels is None
    same(data, expected)


@pytest.mark.parametrize("how", ["other-owner", "group-writable"])
def test_map_never_uses_a_cache_another_user_can_write(
    folder: Path, tmp_path: Path, how: str
) -> None:
    cache, counter = another_users_cache(tmp_path, how), tmp_path / "calls.txt"
    wrapper = loader(cache_dir=cache)
    with pytest.warns(UnsafeCacheWarning, match=str(cache)):
        first = wrapper.map(folder, counter=str(counter))
    again = wrapper.map(folder, counter=str(counter))
    assert calls(counter) == 40 and np.array_equal(first.array, again.array)  # never stored
    assert not any(cache.iterdir())


@pytest.mark.parametrize(
    "layout",
    [
        # Names that sort before "/" ("a-b", "a.b") beside "a": string order is not
        # load_image_folder's order, nor are its class runs contiguous in it.
        ["a/1.png", "a/x/2.png", "a-b/3.png", "a.b/4.png", "b/5.png", "b/a/6.png"],
        ["one/1.png"],  # one class
        ["a/1.png", "b.png", "c/2.png"],  # an image in the folder itself: flat, no labels
        ["0.png", "1.png"],  # flat
    ],
)
def test_cached_image_folder_labels_and_classes_follow_load_image_folder_s_layout(
    tmp_path: Path, layout: list[str]
) -> None:
    import cv2

    folder = tmp_path / "images"
    for index, relpath in enumerate(layout):
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / relpath), np.full((4, 4, 3), index * 10, np.uint8))
    expected = load_image_folder(folder)
    same(cached_image_folder(folder, cache_dir=tmp_path / "cache"), expected)
    same(cached_image_folder(folder, cache_dir=tmp_path / "cache"), expected)  # a hit
