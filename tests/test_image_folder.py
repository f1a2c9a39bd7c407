"""``cached_image_folder`` takes every option of ``load_image_folder`` (on_error, progress…)."""

from __future__ import annotations

import inspect
import json
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import (
    ConfigurationError,
    ImageReadError,
    ImageShapeMismatchError,
    ImagesSkippedWarning,
    NoImagesFoundError,
    cached_dataset,
    cached_image_folder,
    load_image_folder,
)
from cachedload import image_folder as image_folder_module
from cachedload.errors import ItemShapeMismatchError
from cachedload.images import ImageFolderData, decode_image, decode_rows

from .test_images import noise, write
from .test_per_item import same

OLD_NS = 1_600_000_000 * 10**9  # 2020: far outside the racy window


def put(folder: Path, name: str, data: bytes | np.ndarray, age: int = 0) -> None:
    """Write an image (an array, encoded) or raw bytes, with an old mtime (``age`` seconds
    after the others: a rewrite may have the same size)."""
    path = folder / name
    if isinstance(data, bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        write(path, data)
    os.utime(path, ns=(OLD_NS + age * 10**9, OLD_NS + age * 10**9))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes of three 8x12 PNGs each."""
    root = tmp_path / "images"
    for index in range(6):
        put(root, f"{'ab'[index % 2]}/img_{index}.png", noise(index))
    return root


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The images decoded (file names) from now on."""
    seen: list[str] = []

    def counting(path: str, **options: Any) -> Any:
        seen.append(os.path.basename(path))
        return decode_image(path, **options)

    def counting_rows(paths: Sequence[str], out: Any, **options: Any) -> int:
        done: int = decode_rows(paths, out, **options)  # the batch form: rows up to a failure
        seen.extend(os.path.basename(path) for path in paths[:done])
        return done

    monkeypatch.setattr(image_folder_module, "decode_image", counting)
    monkeypatch.setattr(image_folder_module, "decode_rows", counting_rows)
    return seen


def data_file(cache: Path) -> bytes:
    """The one entry's data file (keep=1 leaves one per folder)."""
    (found,) = cache.rglob("result.joblib")
    return found.read_bytes()


def test_skip_leaves_unreadable_images_out_as_load_image_folder_does_and_every_hit_warns(
    folder: Path, tmp_path: Path, decodes: list[str]
) -> None:
    put(folder, "a/img_2.png", b"")
    put(folder, "b/img_5.png", b"garbage")
    put(folder, "c/img_9.png", b"garbage")  # a class whose only image is unreadable
    with pytest.warns(ImagesSkippedWarning):
        expected = load_image_folder(folder, on_error="skip")
    decodes.clear()
    cache = tmp_path / "cache"
    with pytest.warns(ImagesSkippedWarning) as miss:
        data = cached_image_folder(folder, on_error="skip", cache_dir=cache)
    assert len(miss) == 1 and len(decodes) == 7
    message = str(miss[0].message)
    assert "skipped 3 " in message and "a/img_2.png (the file is empty)" in message
    assert "b/img_5.png (corrupt" in message and "c/img_9.png" in message
    assert miss[0].filename == __file__
    same(data, expected)
    assert data.skipped == expected.skipped == ("a/img_2.png", "b/img_5.png", "c/img_9.png")
    assert data.classes == ("a", "b", "c") and isinstance(data, ImageFolderData)
    for mmap_mode in (None, "r"):
        with pytest.warns(ImagesSkippedWarning) as hit:
            again = cached_image_folder(
                folder, on_error="skip", cache_dir=cache, mmap_mode=mmap_mode
            )
        assert len(hit) == 1 and len(decodes) == 7  # a hit decodes nothing, skipped ones neither
        assert "leaves out 3 unreadable" in str(hit[0].message) and hit[0].filename == __file__
        same(again, expected)
        assert again.skipped == expected.skipped
    # The hit maps the entry's rows array, which holds the readable images alone.
    assert isinstance(again.images, np.memmap) and again.images.shape == (4, 8, 12, 3)


def build_skipping_two(folder: Path, cache: Path) -> tuple[Any, Any]:
    """A first call that skips two unreadable images (an empty one, a garbage one): its one
    warning and its result."""
    put(folder, "a/img_2.png", b"")
    put(folder, "b/img_5.png", b"garbage")
    with pytest.warns(ImagesSkippedWarning) as miss:
        data = cached_image_folder(folder, on_error="skip", cache_dir=cache)
    (warning,) = miss
    return warning, data


def test_a_hit_names_each_skipped_image_its_reason_and_the_call_as_the_miss_did(
    folder: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    missed, _ = build_skipping_two(folder, cache)
    with pytest.warns(ImagesSkippedWarning) as hit:
        cached_image_folder(folder, on_error="skip", cache_dir=cache, mmap_mode="r")
    (hitting,) = hit
    listing = "a/img_2.png (the file is empty); b/img_5.png (corrupt"
    for warning in (missed, hitting):
        message = str(warning.message)
        # What the user called and the folder, not the internal per-item loader.
        assert message.startswith(f"cachedload: cached_image_folder({str(folder)!r}) ")
        assert listing in message and "_row" not in message
        assert warning.filename == __file__  # at the user's call line, miss and hit alike
    assert "returns a cached result that leaves out 2 " in str(hitting.message)
    # The hit names the files and reasons exactly as the miss did.
    named = str(missed.message).split("skipped 2 unreadable file(s): ", 1)[1]
    assert str(hitting.message).endswith(f": {named}")


def edit_meta(cache: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the one entry's meta.json in place (an older version's, or a crafted one)."""
    (path,) = cache.rglob("meta.json")
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_an_entry_written_before_reasons_were_stored_still_warns_naming_its_files(
    folder: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _, data = build_skipping_two(folder, cache)
    edit_meta(cache, lambda meta: meta.pop("skipped_reasons"))  # as versions before wrote it
    with pytest.warns(ImagesSkippedWarning) as hit:
        again = cached_image_folder(folder, on_error="skip", cache_dir=cache)
    message = str(hit[0].message)
    assert message.startswith(f"cachedload: cached_image_folder({str(folder)!r}) returns")
    assert message.endswith("leaves out 2 unreadable file(s), skipped when it was computed: "
                            "a/img_2.png; b/img_5.png")  # fmt: skip
    assert len(hit) == 1 and hit[0].filename == __file__
    same(again, data)


def _crafted(meta: dict[str, Any], skipped: Any, reasons: Any) -> None:
    meta["skipped"], meta["skipped_reasons"] = skipped, reasons


@pytest.mark.parametrize(
    ("skipped", "reasons", "expected"),
    [
        # Not strings: ignored, never shown or counted.
        ([1, None, ["a"], {"b": 1}, "a/img_2.png"], {"a/img_2.png": ["x"]}, "out 1 unreadable"),
        (["a/img_2.png"], ["not", "a", "dict"], "computed: a/img_2.png"),
        ([], {"a/img_2.png": "why"}, None),  # nothing left out: no warning
        # Huge: counted, ten named, each cut short.
        ([f"x{i}.png" for i in range(100_000)], {"x0.png": "r" * 10**6}, "and 99990 more"),
        (["y" * 10**6], {}, "out 1 unreadable"),
        # Control characters (a terminal would obey them): escaped.
        (["a\x1b[2J.png"], {"a\x1b[2J.png": "\x07\r"}, "a\\x1b[2J.png (\\x07\\r)"),
    ],
)
def test_a_crafted_skipped_list_is_checked_not_trusted(
    folder: Path, tmp_path: Path, skipped: Any, reasons: Any, expected: str | None
) -> None:
    put(folder, "a/img_2.png", b"")
    cache = tmp_path / "cache"
    with pytest.warns(ImagesSkippedWarning):
        data = cached_image_folder(folder, on_error="skip", cache_dir=cache)
    edit_meta(cache, lambda meta: _crafted(meta, skipped, reasons))
    if expected is None:  # warnings are errors: any warning fails
        again = cached_image_folder(folder, on_error="skip", cache_dir=cache)
    else:
        with pytest.warns(ImagesSkippedWarning) as hit:
            again = cached_image_folder(folder, on_error="skip", cache_dir=cache)
        message = str(hit[0].message)
        assert expected in message and len(message) < 5_000
        assert message.isprintable() and hit[0].filename == __file__
    same(again, data)  # the rows are the entry's: what meta says is only reported
    assert again.skipped == ("a/img_2.png",)


def test_a_fixed_image_is_the_only_one_decoded_again(
    folder: Path, tmp_path: Path, decodes: list[str]
) -> None:
    put(folder, "b/img_3.png", b"garbage")
    cache = tmp_path / "cache"
    with pytest.warns(ImagesSkippedWarning):
        cached_image_folder(folder, on_error="skip", cache_dir=cache)
    assert len(decodes) == 6
    decodes.clear()
    put(folder, "a/img_0.png", noise(100), 1)  # another image changed: a miss
    with pytest.warns(ImagesSkippedWarning, match="b/img_3.png"):
        data = cached_image_folder(folder, on_error="skip", cache_dir=cache)
    assert sorted(decodes) == ["img_0.png", "img_3.png"]  # the skipped one is tried again
    assert data.skipped == ("b/img_3.png",)
    decodes.clear()
    put(folder, "b/img_3.png", noise(3), 2)  # fixed: no warning any more (warnings are errors)
    data = cached_image_folder(folder, on_error="skip", cache_dir=cache)
    assert decodes == ["img_3.png"] and data.skipped == ()
    same(data, load_image_folder(folder))
    scratch = tmp_path / "scratch"
    same(cached_image_folder(folder, on_error="skip", cache_dir=scratch), data)
    assert data_file(cache) == data_file(scratch)  # incremental == from scratch, bit for bit


def test_an_incremental_build_with_skipped_images_equals_one_from_scratch(
    folder: Path, tmp_path: Path
) -> None:
    put(folder, "a/img_0.png", b"garbage")  # the very first image
    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    with pytest.warns(ImagesSkippedWarning):
        cached_image_folder(folder, on_error="skip", cache_dir=cache)
    put(folder, "b/img_7.png", noise(7))
    put(folder, "b/img_5.png", b"", 1)
    for where in (cache, scratch):
        with pytest.warns(ImagesSkippedWarning, match="skipped 2 "):
            data = cached_image_folder(folder, on_error="skip", cache_dir=where, mmap_mode="r")
        assert data.skipped == ("a/img_0.png", "b/img_5.png") and len(data.paths) == 5
    assert data_file(cache) == data_file(scratch)


def test_every_image_unreadable_raises_no_images_found_and_stores_nothing(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        put(tmp_path / "images", name, b"garbage")
    for _ in range(2):
        with pytest.raises(NoImagesFoundError, match="readable") as caught:
            cached_image_folder(tmp_path / "images", on_error="skip", cache_dir=tmp_path / "c")
        assert caught.value.path == str(tmp_path / "images")
    assert not list((tmp_path / "c").rglob("result.joblib"))
    with pytest.raises(NoImagesFoundError, match="readable"):
        load_image_folder(tmp_path / "images", on_error="skip")


def test_a_raising_call_is_not_answered_by_an_entry_that_skipped(
    folder: Path, tmp_path: Path
) -> None:
    put(folder, "a/img_4.png", b"garbage")
    with pytest.warns(ImagesSkippedWarning):
        cached_image_folder(folder, on_error="skip", cache_dir=tmp_path)
    with pytest.raises(ImageReadError) as caught:
        cached_image_folder(folder, cache_dir=tmp_path)
    assert caught.value.path == str(folder / "a/img_4.png")


def test_mixed_shapes_are_an_error_not_a_skip(folder: Path, tmp_path: Path) -> None:
    put(folder, "b/img_9.png", noise(9, (4, 4, 3)))
    with pytest.raises(ItemShapeMismatchError) as caught:
        cached_image_folder(folder, on_error="skip", cache_dir=tmp_path)
    assert caught.value.second == "b/img_9.png"


def test_mixed_shapes_raise_load_image_folder_s_error_with_the_option_that_fixes_them(
    folder: Path, tmp_path: Path
) -> None:
    put(folder, "b/img_9.png", noise(9, (4, 4, 3)))
    with pytest.raises(ImageShapeMismatchError) as caught:  # as load_image_folder raises
        cached_image_folder(folder, cache_dir=tmp_path)
    assert isinstance(caught.value, ItemShapeMismatchError)  # and the per-item loader's
    message = str(caught.value)
    assert "'a/img_0.png'" in message and "'b/img_9.png'" in message
    assert "pass size=(height, width)" in message and "ragged" not in message
    data = cached_image_folder(folder, size=(4, 4), cache_dir=tmp_path)  # the advice works
    assert data.images.shape == (7, 4, 4, 3)
    clone = pickle.loads(pickle.dumps(caught.value))
    assert type(clone) is type(caught.value) and str(clone) == message


def test_images_of_two_bit_depths_need_dtype_and_say_so(tmp_path: Path) -> None:
    # load_image_folder converts every image to the first one's depth; a cached folder decodes
    # each image on its own (one changed image, one decode), so it asks for dtype= instead.
    root = tmp_path / "images"
    write(root / "a/0.png", np.full((4, 4, 3), 100, np.uint8))
    write(root / "a/1.png", np.full((4, 4, 3), 30000, np.uint16))
    with pytest.raises(ImageShapeMismatchError, match=r"bit depth: 'a/0.png' decodes to uint8, "
                       r"'a/1.png' to uint16; pass dtype=") as caught:  # fmt: skip
        cached_image_folder(root, color="unchanged", cache_dir=tmp_path / "cache")
    error = caught.value
    assert isinstance(error, ItemShapeMismatchError)
    assert (error.first_dtype, error.second_dtype) == ("uint8", "uint16")
    data = cached_image_folder(root, color="unchanged", dtype=np.float32, cache_dir=tmp_path / "c")
    same(data, load_image_folder(root, color="unchanged", dtype=np.float32))


def test_an_option_it_does_not_take_is_a_type_error_naming_it(folder: Path) -> None:
    for option in ("ragged", "per_item", "exclude", "nonsense"):
        expected = rf"cached_image_folder\(\) got an unexpected keyword argument '{option}'; "
        with pytest.raises(TypeError, match=expected + "it takes: backend, cache_dir, color, "):
            given: dict[str, Any] = {option: True}
            cached_image_folder(folder, **given)
    with pytest.raises(TypeError) as caught:
        cached_image_folder(folder, sizes=(32, 32))
    message = str(caught.value)
    assert "'sizes' (did you mean 'size'?)" in message
    taken = message.partition("it takes: ")[2].split(", ")
    keywords = [p for p in inspect.signature(cached_image_folder).parameters if p != "root"]
    assert set(keywords) - {"cache_options"} <= set(taken)  # size, color, dtype, on_error…
    assert {"compress", "max_size", "version"} <= set(taken)  # and the cache options
    assert not {"per_item", "exclude"} & set(taken)  # which it sets itself
    with pytest.raises(TypeError, match=r"^cached_dataset\(\) got an unexpected keyword"):
        cached_dataset(nonsense=True)  # type: ignore[call-overload]


def test_a_progress_bar_is_drawn_on_a_build_and_not_on_a_hit(
    folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cached_image_folder(folder, cache_dir=tmp_path / "one", progress=True)
    assert "6/6" in capfd.readouterr().err
    cached_image_folder(folder, cache_dir=tmp_path / "one", progress=True)  # a hit
    assert capfd.readouterr().err == ""
    put(folder, "a/img_8.png", noise(8))
    cached_image_folder(folder, cache_dir=tmp_path / "one", progress=True)
    assert "1/1" in capfd.readouterr().err  # the rows computed, not those copied
    for progress in (False, None):  # None: stderr is not a terminal here
        cached_image_folder(folder, cache_dir=tmp_path / str(progress), progress=progress)
        assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("n_jobs", 0),
        ("n_jobs", -1),
        ("n_jobs", 1.5),
        ("n_jobs", True),
        ("n_jobs", "2"),
        ("progress", "yes"),
        ("on_error", "ignore"),
    ],
)
def test_invalid_options_are_refused_as_load_image_folder_refuses_them(
    folder: Path, tmp_path: Path, option: str, value: Any
) -> None:
    options: dict[str, Any] = {option: value}
    for load in (load_image_folder, cached_image_folder):
        with pytest.raises(ConfigurationError) as caught:
            load(folder, **options)
        assert caught.value.option == option
        options["cache_dir"] = tmp_path  # cached_image_folder's
    assert not list(tmp_path.rglob("result.joblib"))


def test_n_jobs_and_progress_are_not_part_of_the_key(
    folder: Path, tmp_path: Path, decodes: list[str]
) -> None:
    data = cached_image_folder(folder, cache_dir=tmp_path, n_jobs=1, progress=False)
    same(data, load_image_folder(folder, n_jobs=1))
    assert len(decodes) == 6
    same(cached_image_folder(folder, cache_dir=tmp_path, n_jobs=2, progress=True), data)
    assert len(decodes) == 6  # a hit


def test_its_entries_are_found_and_logged_under_the_name_cached_image_folder(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from .test_cli import ls_json

    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="cachedload"):
        cached_image_folder(folder, cache_dir=cache)
    assert any("cached_image_folder" in r.getMessage() for r in caplog.records if "miss" in r.msg)
    (listed,) = ls_json(cache, "--function", "cached_image_folder")
    assert "cached_image_folder" in listed["function"]
    assert listed["sources"]["path"]["file_count"] == 6


def test_truncated_jpegs_are_unreadable_and_all_named(tmp_path: Path) -> None:
    from .test_images import jpeg, truncated_jpeg

    root = tmp_path / "photos"
    for index in range(24):
        put(root, f"{'ab'[index % 2]}/{index:02d}.jpg", jpeg(noise(index, (64, 64, 3))))
    for name, seed in (("a/04.jpg", 4), ("b/13.jpg", 13)):
        put(root, name, truncated_jpeg(seed))
    cache = tmp_path / "cache"
    for size in (None, (16, 16)):
        with pytest.raises(ImageReadError, match="ends before the JPEG data") as info:
            cached_image_folder(root, size=size, cache_dir=cache)
        assert [Path(info.value.path).name, *(Path(p).name for p, _ in info.value.others)] == [
            "04.jpg",
            "13.jpg",
        ]
        assert str(info.value).endswith('pass on_error="skip" to leave unreadable images out')
        with pytest.warns(ImagesSkippedWarning, match=r"a/04\.jpg \(truncated"):
            data = cached_image_folder(root, size=size, on_error="skip", cache_dir=cache)
        assert data.skipped == ("a/04.jpg", "b/13.jpg")
        with pytest.warns(ImagesSkippedWarning):
            expected = load_image_folder(root, size=size, on_error="skip")
        same(data, expected)
