"""Tests for cachedload.images.load_image_folder."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import cv2
import joblib
import numpy as np
import pytest

from cachedload import images as images_module
from cachedload.errors import (
    ConfigurationError,
    ImageReadError,
    ImageShapeMismatchError,
    ImagesSkippedWarning,
    NoImagesFoundError,
)
from cachedload.images import ImageFolderData, load_image_folder

RED_BGR = (0, 0, 255)


def write(path: Path, img: np.ndarray, *params: int) -> Path:
    """Encode with OpenCV by extension; write the bytes ourselves (works for any file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img, list(params))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def solid(bgr: tuple[int, ...], shape: tuple[int, int] = (8, 12)) -> np.ndarray:
    return np.full((*shape, len(bgr)), bgr, dtype=np.uint8)


def noise(seed: int, shape: tuple[int, ...] = (8, 12, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(side: int, seed: int = 0) -> np.ndarray:
    """A photo-like image: gradients plus mild noise."""
    y, x = np.mgrid[0:side, 0:side] / side
    img = np.dstack([200 * x + 30, 120 + 90 * np.sin(6 * y), 255 * x * y])
    img += np.random.default_rng(seed).normal(0, 4, img.shape)
    out: np.ndarray = np.clip(img, 0, 255).astype(np.uint8)
    return out


def read(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """The reference decode: OpenCV's own cv2.imread."""
    img = cv2.imread(str(path), flags)
    assert img is not None
    return img


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """root/{cat,dog}/... PNGs, with junk that must be ignored."""
    root = tmp_path / "data"
    for i in range(3):
        write(root / "cat" / f"c{i}.png", noise(i))
        write(root / "dog" / f"d{i}.png", noise(10 + i))
    write(root / "dog" / "puppies" / "p0.png", noise(20))  # nested: still a dog
    write(root / ".hidden" / "h.png", noise(30))
    write(root / "cat" / ".h.png", noise(31))
    write(root / "__pycache__" / "x.png", noise(32))
    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / "cat" / "Thumbs.db").write_bytes(b"junk")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()  # no images: not a class
    return root


def test_class_layout_labels_classes_paths(class_folder: Path) -> None:
    data = load_image_folder(class_folder)
    assert isinstance(data, ImageFolderData)
    assert data._fields == ("images", "labels", "classes", "paths")
    images, labels, classes, paths = data  # four values, as before .skipped existed
    assert images is data.images and labels is data.labels
    assert classes == data.classes and paths == data.paths
    assert data.skipped == ()
    assert data.classes == ("cat", "dog")
    assert data.paths == (
        "cat/c0.png", "cat/c1.png", "cat/c2.png",
        "dog/d0.png", "dog/d1.png", "dog/d2.png", "dog/puppies/p0.png",
    )  # fmt: skip
    assert data.labels is not None and data.labels.dtype == np.int64
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert data.images.shape == (7, 8, 12, 3) and data.images.dtype == np.uint8
    expected = cv2.cvtColor(noise(20), cv2.COLOR_BGR2RGB)  # PNG is lossless
    np.testing.assert_array_equal(data.images[6], expected)


def test_each_folder_stays_contiguous_in_class_order(tmp_path: Path) -> None:
    for name in ("a b", "a", "a-c"):  # " " and "-" sort before "/": plain string order mixes them
        write(tmp_path / name / "x.png", noise(0))
        write(tmp_path / name / "y" / "z.png", noise(1))
    data = load_image_folder(tmp_path)
    assert data.classes == ("a", "a b", "a-c")
    assert data.paths == (
        "a/x.png", "a/y/z.png", "a b/x.png", "a b/y/z.png", "a-c/x.png", "a-c/y/z.png",
    )  # fmt: skip
    assert data.labels is not None and data.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write(root / "cat" / "a.png", noise(0))
    write(tmp_path / "elsewhere" / "b.png", noise(1))
    (root / "dog").symlink_to(tmp_path / "elsewhere")
    (root / "cat" / "loop").symlink_to(root)  # a cycle back to the root
    data = load_image_folder(root)
    assert data.paths == ("cat/a.png", "dog/b.png")


def test_flat_layout_has_no_labels(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        write(tmp_path / f"img{i}.png", noise(i))
    write(tmp_path / "more" / "img3.png", noise(3))
    data = load_image_folder(tmp_path)
    assert data.labels is None
    assert data.classes == ()
    assert data.paths == ("img0.png", "img1.png", "img2.png", "more/img3.png")
    np.testing.assert_array_equal(data.images[2], cv2.cvtColor(noise(2), cv2.COLOR_BGR2RGB))


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
@pytest.mark.parametrize(("color", "pixel"), [("rgb", [255, 0, 0]), ("bgr", [0, 0, 255])])
def test_channel_order_of_a_red_image(
    tmp_path: Path, ext: str, color: str, pixel: list[int]
) -> None:
    write(tmp_path / f"red{ext}", solid(RED_BGR))
    data = load_image_folder(tmp_path, color=color)  # type: ignore[arg-type]
    assert data.images.shape == (1, 8, 12, 3)
    np.testing.assert_allclose(data.images[0, 4, 6], pixel, atol=3)  # JPEG/WebP are lossy


def test_jpeg_is_decoded_like_opencv(tmp_path: Path) -> None:
    img = smooth(48)
    path = write(tmp_path / "a.jpg", img, cv2.IMWRITE_JPEG_QUALITY, 90)
    data = load_image_folder(tmp_path)
    expected = cv2.cvtColor(read(path), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(data.images[0], expected)


def test_gray_gives_three_dimensional_images(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", noise(1))
    data = load_image_folder(tmp_path, color="gray")
    assert data.images.shape == (1, 8, 12)
    np.testing.assert_array_equal(data.images[0], read(path, cv2.IMREAD_GRAYSCALE))


def test_16_bit_png(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    img[0, 0] = 65535
    write(tmp_path / "deep.png", img)
    kept = load_image_folder(tmp_path, color="unchanged")
    assert kept.images.dtype == np.uint16
    np.testing.assert_array_equal(kept.images[0], img[..., ::-1])  # RGB order
    scaled = load_image_folder(tmp_path, color="unchanged", dtype=np.float32)
    assert scaled.images.dtype == np.float32 and scaled.images.max() == 1.0
    np.testing.assert_allclose(scaled.images[0], img[..., ::-1] / 65535, rtol=1e-6)
    eight_bit = load_image_folder(tmp_path)  # default colour mode: OpenCV reduces to 8 bits
    assert eight_bit.images.dtype == np.uint8
    np.testing.assert_array_equal(eight_bit.images[0], (img[..., ::-1] >> 8).astype(np.uint8))


def test_rgba_with_unchanged_keeps_alpha(tmp_path: Path) -> None:
    write(tmp_path / "a.png", solid((10, 20, 30, 40)))
    data = load_image_folder(tmp_path, color="unchanged")
    assert data.images.shape == (1, 8, 12, 4)
    assert data.images[0, 0, 0].tolist() == [30, 20, 10, 40]
    assert load_image_folder(tmp_path).images.shape == (1, 8, 12, 3)  # rgb drops alpha


@pytest.mark.parametrize("size", [(4, 6), (16, 30), (5, 40)])
def test_size_resizes_every_image(tmp_path: Path, size: tuple[int, int]) -> None:
    write(tmp_path / "a.png", solid((50, 100, 150), (8, 12)))
    write(tmp_path / "b.png", solid((50, 100, 150), (20, 10)))
    data = load_image_folder(tmp_path, size=size)
    assert data.images.shape == (2, *size, 3)
    assert (data.images == [150, 100, 50]).all()


def test_shrinking_uses_inter_area(tmp_path: Path) -> None:
    img = noise(3, (40, 40, 3))
    write(tmp_path / "a.png", img)
    data = load_image_folder(tmp_path, size=(10, 10), color="bgr")
    np.testing.assert_array_equal(
        data.images[0], cv2.resize(img, (10, 10), interpolation=cv2.INTER_AREA)
    )


def test_float32_is_scaled_to_unit_range(tmp_path: Path) -> None:
    img = noise(4)
    img[0, 0] = (255, 255, 255)
    img[0, 1] = (0, 0, 0)
    write(tmp_path / "a.png", img)
    data = load_image_folder(tmp_path, dtype=np.float32)
    assert data.images.dtype == np.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    expected = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) / np.float32(255)
    np.testing.assert_allclose(data.images[0], expected, rtol=1e-6)


def test_mismatched_shapes_name_both_files(tmp_path: Path) -> None:
    write(tmp_path / "a.png", noise(0, (8, 12, 3)))
    write(tmp_path / "b.png", noise(1, (8, 12, 3)))
    write(tmp_path / "c.png", noise(2, (9, 12, 3)))
    with pytest.raises(ImageShapeMismatchError) as info:
        load_image_folder(tmp_path, n_jobs=1)
    assert info.value.first.endswith("a.png") and info.value.second.endswith("c.png")
    assert "a.png" in str(info.value) and "c.png" in str(info.value)
    assert info.value.second_shape == (9, 12, 3)


@pytest.mark.parametrize("size", [None, (6, 6)])
def test_mixed_channel_counts_name_channels_and_advise_color(
    tmp_path: Path, size: tuple[int, int] | None
) -> None:
    write(tmp_path / "a_gray.png", noise(0, (8, 12)))
    write(tmp_path / "b_rgba.png", noise(1, (8, 12, 4)))
    with pytest.raises(ImageShapeMismatchError) as info:
        load_image_folder(tmp_path, color="unchanged", size=size, n_jobs=1)
    message = str(info.value)
    assert "in channels (1 vs 4)" in message and 'color="rgb"' in message
    assert "size=" not in message  # height and width agree, or are resized anyway
    assert load_image_folder(tmp_path, color="rgb", size=size).images.shape[-1] == 3
    assert pickle.loads(pickle.dumps(info.value)).resized == (size is not None)


def test_channels_and_sides_both_differing_are_both_named(tmp_path: Path) -> None:
    write(tmp_path / "a.png", noise(0, (8, 12, 3)))
    write(tmp_path / "b.png", noise(1, (9, 12)))
    with pytest.raises(ImageShapeMismatchError) as info:
        load_image_folder(tmp_path, color="unchanged", n_jobs=1)
    message = str(info.value)
    assert "in channels (3 vs 1)" in message and "in height/width" in message
    assert "size=(height, width)" in message


@pytest.mark.parametrize(
    "content", [b"", b"\x89PNG\r\n\x1a\n not really", b"\xff\xd8\xff" + bytes(50)]
)
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_corrupt_or_empty_file_raises_naming_it(
    tmp_path: Path, content: bytes, n_jobs: int
) -> None:
    for i in range(20):
        write(tmp_path / f"ok{i:02d}.png", noise(i))
    (tmp_path / "ok10_bad.png").write_bytes(content)
    with pytest.raises(ImageReadError, match="file is empty" if not content else "decode") as info:
        load_image_folder(tmp_path, n_jobs=n_jobs)
    assert info.value.path == str(tmp_path / "ok10_bad.png")
    assert "ok10_bad.png" in str(info.value)
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_unreadable_file_raises_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_jobs: int
) -> None:
    for i in range(40):  # the denied file in the middle of a chunk of rows
        write(tmp_path / f"{i:02d}.png", noise(i))
    real_open, real_os_open, real_imread = open, os.open, cv2.imread

    def denied(file: Any) -> bool:  # chmod cannot lock out root, so fail the opening itself
        return os.fsdecode(file).endswith("17.png")

    def deny_open(file: str, mode: str = "r") -> Any:
        if denied(file):
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, mode)

    def deny_os_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if denied(file):
            raise PermissionError(13, "Permission denied", file)
        return real_os_open(file, flags, *args, **kwargs)

    def deny_imread(file: str, *args: Any) -> Any:
        return None if denied(file) else real_imread(file, *args)  # as OpenCV answers

    # every way the module opens a file: open(), os.open() (the reused buffer), cv2.imread
    monkeypatch.setattr(images_module, "open", deny_open, raising=False)
    monkeypatch.setattr(os, "open", deny_os_open)
    monkeypatch.setattr(cv2, "imread", deny_imread)
    with pytest.raises(ImageReadError, match="Permission denied") as info:
        load_image_folder(tmp_path, n_jobs=n_jobs)
    assert info.value.path == str(tmp_path / "17.png")


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_skip_warns_once_naming_every_skipped_file(tmp_path: Path, n_jobs: int) -> None:
    for cls in ("a", "b"):
        for i in range(12):
            write(tmp_path / cls / f"{i:02d}.png", noise(i + (100 if cls == "b" else 0)))
    (tmp_path / "a" / "00.png").write_bytes(b"")  # the very first file
    (tmp_path / "a" / "05.png").write_bytes(b"garbage")
    (tmp_path / "b" / "11.png").write_bytes(b"garbage")  # the very last file
    with pytest.warns(ImagesSkippedWarning) as record:
        data = load_image_folder(tmp_path, on_error="skip", n_jobs=n_jobs)
    assert len(record) == 1
    message = str(record[0].message)
    for name in ("a/00.png", "a/05.png", "b/11.png"):
        assert name in message
    assert "skipped 3 " in message
    assert len(data.paths) == 21 and data.images.shape[0] == 21
    assert "a/05.png" not in data.paths
    assert data.labels is not None
    assert data.labels.tolist() == [0] * 10 + [1] * 11
    for row, rel in enumerate(data.paths):  # rows still match their paths after compaction
        cls, name = rel.split("/")
        seed = int(name[:2]) + (100 if cls == "b" else 0)
        np.testing.assert_array_equal(
            data.images[row], cv2.cvtColor(noise(seed), cv2.COLOR_BGR2RGB)
        )


def test_skip_with_nothing_readable_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(NoImagesFoundError, match="readable"):
        load_image_folder(tmp_path, on_error="skip")


def test_empty_folder_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(NoImagesFoundError) as info:
        load_image_folder(tmp_path)
    assert info.value.path == str(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_folder_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        load_image_folder(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_folder(write(tmp_path / "a.png", noise(0)))


def test_unicode_file_name(tmp_path: Path) -> None:
    write(tmp_path / "café" / "café_图像.png", noise(5))
    write(tmp_path / "niño" / "ñ.jpg", noise(6))
    data = load_image_folder(tmp_path)
    assert data.classes == ("café", "niño")
    assert data.paths == ("café/café_图像.png", "niño/ñ.jpg")
    np.testing.assert_array_equal(data.images[0], cv2.cvtColor(noise(5), cv2.COLOR_BGR2RGB))


def test_extensions_are_case_insensitive(tmp_path: Path) -> None:
    write(tmp_path / "a.PNG", noise(0))
    write(tmp_path / "b.Jpg", noise(1))
    write(tmp_path / "c.bmp", noise(2))
    assert load_image_folder(tmp_path).paths == ("a.PNG", "b.Jpg", "c.bmp")
    assert load_image_folder(tmp_path, extensions=[".png", "JPG"]).paths == ("a.PNG", "b.Jpg")
    assert load_image_folder(tmp_path, extensions="bmp").paths == ("c.bmp",)


def test_n_jobs_1_and_2_give_identical_results(tmp_path: Path) -> None:
    for i in range(60):
        write(tmp_path / f"c{i % 3}" / f"{i:03d}.jpg", smooth(40, seed=i))
    one = load_image_folder(tmp_path, size=(24, 20), n_jobs=1)
    two = load_image_folder(tmp_path, size=(24, 20), n_jobs=2)
    many = load_image_folder(tmp_path, size=(24, 20), n_jobs=7)
    for other in (two, many):
        np.testing.assert_array_equal(one.images, other.images)
        assert one.labels is not None and other.labels is not None
        np.testing.assert_array_equal(one.labels, other.labels)
        assert (one.classes, one.paths) == (other.classes, other.paths)


def test_opencv_threads_are_off_during_a_parallel_load_then_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(10):
        write(tmp_path / f"{i}.png", noise(i))
    seen: list[int] = []
    real_imdecode, real_imread = cv2.imdecode, cv2.imread

    def spy_imdecode(buf: Any, flags: int) -> Any:
        seen.append(cv2.getNumThreads())
        return real_imdecode(buf, flags)

    def spy_imread(path: str, flags: int) -> Any:
        seen.append(cv2.getNumThreads())
        return real_imread(path, flags)

    # the modules images.py calls into, at both of its entry points into a decoder
    monkeypatch.setattr(cv2, "imdecode", spy_imdecode)
    monkeypatch.setattr(cv2, "imread", spy_imread)
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        load_image_folder(tmp_path, n_jobs=2)
        assert cv2.getNumThreads() == 3
        assert seen[1:] == [1] * 9  # the first image is decoded before the pool starts
        (tmp_path / "9.png").write_bytes(b"garbage")
        with pytest.raises(ImageReadError):
            load_image_folder(tmp_path, n_jobs=2)
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


def spy_on_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The flags of every decode, by cv2.imdecode (bytes) or cv2.imread (a path)."""
    flags_seen: list[int] = []
    real_imdecode, real_imread = cv2.imdecode, cv2.imread

    def spy_imdecode(buf: Any, flags: int) -> Any:
        flags_seen.append(flags)
        return real_imdecode(buf, flags)

    def spy_imread(path: str, flags: int) -> Any:
        flags_seen.append(flags)
        return real_imread(path, flags)

    monkeypatch.setattr(cv2, "imdecode", spy_imdecode)  # the module images.py calls into
    monkeypatch.setattr(cv2, "imread", spy_imread)
    return flags_seen


@pytest.mark.parametrize(("side", "factor"), [(64, 2), (32, 4), (16, 8), (100, 1), (200, 1)])
def test_reduced_jpeg_decode_is_close_to_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int, factor: int
) -> None:
    img = smooth(256)
    path = write(tmp_path / "a.jpg", img, cv2.IMWRITE_JPEG_QUALITY, 90)
    for name in ("b.jpg", "c.jpg", "d.jpg"):  # the first image alone, then the batch path
        (tmp_path / name).write_bytes(path.read_bytes())
    flags_seen = spy_on_decodes(monkeypatch)
    data = load_image_folder(tmp_path, size=(side, side), color="bgr", n_jobs=1)
    reduced = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8, 1: cv2.IMREAD_COLOR}  # fmt: skip
    assert flags_seen == [reduced[factor]] * 4  # one decode each, reduced where the rule allows
    full = cv2.resize(read(path), (side, side), interpolation=cv2.INTER_AREA)
    for row in data.images:
        np.testing.assert_array_equal(row, data.images[0])
        assert np.abs(row.astype(int) - full).mean() < 1.0


def test_no_reduced_decode_when_a_side_is_not_a_multiple(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a.jpg", "b.jpg"):  # the first image alone, then the batch path
        write(tmp_path / name, smooth(250))  # 250 is not a multiple of 4
    flags_seen = spy_on_decodes(monkeypatch)
    data = load_image_folder(tmp_path, size=(30, 30), color="gray", n_jobs=1)
    assert flags_seen == [cv2.IMREAD_REDUCED_GRAYSCALE_2] * 2
    for name in ("a.jpg", "b.jpg"):
        write(tmp_path / name, smooth(250)[:, :249])  # 249 is odd: no reduction at all
    flags_seen.clear()
    load_image_folder(tmp_path, size=(30, 30), color="gray", n_jobs=1)
    assert flags_seen == [cv2.IMREAD_GRAYSCALE] * 2
    assert data.images.shape == (2, 30, 30)


def test_round_trips_through_joblib_with_mmap(class_folder: Path, tmp_path: Path) -> None:
    data = load_image_folder(class_folder)
    joblib.dump(data, tmp_path / "result.joblib")
    back = joblib.load(tmp_path / "result.joblib", mmap_mode="r")
    assert type(back) is ImageFolderData
    assert isinstance(back.images, np.memmap)
    np.testing.assert_array_equal(back.images, data.images)
    assert back.labels is not None and data.labels is not None
    np.testing.assert_array_equal(back.labels, data.labels)
    assert (back.classes, back.paths) == (data.classes, data.paths)
    assert pickle.loads(pickle.dumps(data)).paths == data.paths


def test_progress_false_prints_nothing(
    class_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_image_folder(class_folder, progress=False)
    assert capsys.readouterr() == ("", "")


def test_progress_true_draws_a_bar(class_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_image_folder(class_folder, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "7/7" in captured.err


def test_debug_log_line(class_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="cachedload"):
        load_image_folder(class_folder, size=(4, 4))
    (record,) = [r for r in caplog.records if r.name == "cachedload"]
    assert record.levelno == logging.DEBUG
    assert "(7, 4, 4, 3) uint8" in record.getMessage() and str(class_folder) in record.getMessage()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("size", (0, 4)),
        ("size", 64),
        ("size", (64, 64, 3)),
        ("size", (64.0, 64)),
        ("color", "RGB"),
        ("color", "hsv"),
        ("dtype", np.int32),
        ("dtype", "not a dtype"),
        ("extensions", []),
        ("extensions", [""]),
        ("extensions", [3]),
        ("n_jobs", 0),
        ("n_jobs", True),
        ("n_jobs", 1.5),
        ("on_error", "ignore"),
        ("progress", "yes"),
    ],
)
def test_invalid_options_raise_configuration_error(
    class_folder: Path, option: str, value: object
) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_image_folder(class_folder, **{option: value})  # type: ignore[arg-type]
    assert info.value.option == option
    assert isinstance(info.value, ValueError)


def test_a_cached_skip_warns_again_on_every_hit(tmp_path: Path) -> None:
    from cachedload import cached_dataset

    for i in range(8):
        write(tmp_path / "data" / f"{i:02d}.png", noise(i))
    for bad in ("01.png", "03.png", "04.png", "05.png", "06.png", "07.png"):
        (tmp_path / "data" / bad).write_bytes(b"garbage")
    calls: list[int] = []

    @cached_dataset(cache_dir=tmp_path / "cache")
    def load(root: Path) -> tuple[ImageFolderData, str]:
        calls.append(1)
        return load_image_folder(root, on_error="skip"), "extra"

    with pytest.warns(ImagesSkippedWarning) as first:
        data, _ = load(tmp_path / "data")
    assert len(first) == 1 and data.skipped == tuple(f"{i:02d}.png" for i in (1, 3, 4, 5, 6, 7))
    assert data.paths == ("00.png", "02.png")
    for _ in range(2):
        with pytest.warns(ImagesSkippedWarning) as hit:
            again, _ = load(tmp_path / "data")
        assert len(hit) == 1 and len(calls) == 1
        message = str(hit[0].message)
        assert "left out" in message or "leaves out" in message
        assert "6 unreadable" in message and "01.png; 03.png" in message and "07.png" in message
        assert "load returns a cached result" in message and "more" not in message
        assert hit[0].filename == __file__
        assert again.skipped == data.skipped
    meta = json.loads((load.cache_path(tmp_path / "data") / "meta.json").read_text())
    assert meta["skipped"] == list(data.skipped)


def test_image_folder_data_pickled_before_skipped_existed_still_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typing import NamedTuple

    class ImageFolderData(NamedTuple):  # the four-field class of entries already stored
        images: Any
        labels: Any
        classes: tuple[str, ...]
        paths: tuple[str, ...]

    ImageFolderData.__module__ = "cachedload.images"
    ImageFolderData.__qualname__ = "ImageFolderData"
    with monkeypatch.context() as patch:
        patch.setattr(images_module, "ImageFolderData", ImageFolderData)
        old = images_module.ImageFolderData(np.zeros(2), None, (), ("a.png", "b.png"))
        stored = [pickle.dumps(old, protocol) for protocol in (2, 4, 5)]
        buffer = io.BytesIO()
        joblib.dump(old, buffer)  # as a cache entry holds it
    for restored in [*map(pickle.loads, stored), joblib.load(io.BytesIO(buffer.getvalue()))]:
        assert type(restored) is images_module.ImageFolderData
        assert restored.paths == ("a.png", "b.png") and restored.skipped == ()


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF segment holding only an Orientation tag (6: rotated 90°)."""
    tiff = b"MM\0\x2a\0\0\0\x08" + b"\0\x01" + b"\x01\x12\0\x03\0\0\0\x01"
    tiff += orientation.to_bytes(2, "big") + b"\0\0" + b"\0\0\0\0"
    segment = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + jpeg[2:]


@pytest.fixture
def mixed_folder(tmp_path: Path) -> list[str]:
    """Images that take every path of decode_rows, interleaved: small JPEGs (a full decode),
    large ones (reduced), rotated ones (EXIF; the large one, after a small one, is first
    decoded in full, which its sides must reject), sides that are no multiple of 8, a file
    larger than the read buffer, a non-ASCII name, a PNG."""
    paths = []

    def add(name: str, data: bytes) -> None:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))

    def jpeg(img: np.ndarray) -> bytes:
        return bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])

    for i in range(3):
        add(f"small{i}.jpg", jpeg(smooth(64, seed=i)))
        add(f"large{i}.jpg", jpeg(smooth(256, seed=i)))
    wide = np.ascontiguousarray(smooth(256)[:128])
    add("rotated_small.jpg", with_orientation(jpeg(np.ascontiguousarray(wide[:40, :72])), 6))
    add("rotated_large.jpg", with_orientation(jpeg(wide), 6))  # after a small one: see above
    add("odd.jpg", jpeg(smooth(250)[:, :249]))
    add("big.jpg", jpeg(noise(0, (400, 400, 3))))  # ~300 KB: more than one buffer's read
    add("é-small.jpg", jpeg(smooth(64, seed=7)))
    add("é-large.jpg", jpeg(smooth(256, seed=7)))
    add("small.png", bytes(cv2.imencode(".png", smooth(48))[1]))
    return paths


@pytest.mark.parametrize(
    "options",
    [
        {"size": (32, 32)},
        {"size": (20, 36), "color": "bgr"},
        {"size": (16, 16), "color": "gray", "dtype": np.float32},
        {"size": (32, 32), "color": "unchanged", "dtype": np.uint16},
        {"size": (64, 64)},
    ],
)
def test_decode_rows_gives_decode_image_rows(mixed_folder: list[str], options: Any) -> None:
    expected = np.stack([images_module.decode_image(p, **options) for p in mixed_folder])
    assert os.path.getsize(mixed_folder[-4]) > images_module._READ_BUFFER
    out = np.zeros_like(expected)
    assert images_module.decode_rows(mixed_folder, out, **options) == len(mixed_folder)
    np.testing.assert_array_equal(out, expected)


def test_decode_rows_without_a_size_and_a_shape_that_repeats(tmp_path: Path) -> None:
    paths = [str(write(tmp_path / f"{i}.png", noise(i))) for i in range(3)]
    out = np.zeros((3, 8, 12, 3), np.uint8)
    assert images_module.decode_rows(paths, out) == 3
    np.testing.assert_array_equal(out, [images_module.decode_image(p) for p in paths])


@pytest.mark.parametrize("bad", ["corrupt", "missing", "gray", "other size"])
def test_decode_rows_stops_before_an_image_that_fails_or_does_not_fit(
    tmp_path: Path, bad: str
) -> None:
    paths = [str(write(tmp_path / f"{i}.png", noise(i))) for i in range(4)]
    if bad == "corrupt":
        Path(paths[2]).write_bytes(b"garbage")
    elif bad == "missing":
        Path(paths[2]).unlink()
    else:
        write(Path(paths[2]), noise(2, (8, 12)) if bad == "gray" else noise(2, (9, 12, 3)))
    out = np.zeros((4, 8, 12, 3), np.uint8)
    color: Any = "unchanged" if bad == "gray" else "rgb"
    assert images_module.decode_rows(paths, out, color=color) == 2
    np.testing.assert_array_equal(out[:2], [images_module.decode_image(p) for p in paths[:2]])
    assert not out[2:].any()


def fill_around(folder: Path, specials: dict[str, bytes], side: int | None = None) -> None:
    """40 JPEGs m00..m39 (side x side, or 64x64 and 256x256 alternating: a full and a reduced
    decode), with specials (name: content) written among them: more than one row to a chunk,
    so the batch path stops in the middle of one and goes on after it."""
    for i in range(40):
        sides = side or (256 if i % 2 else 64)
        write(folder / f"m{i:02d}.jpg", smooth(sides, seed=i), cv2.IMWRITE_JPEG_QUALITY, 90)
    for name, content in specials.items():
        (folder / name).write_bytes(content)


def png(img: np.ndarray) -> bytes:
    return bytes(cv2.imencode(".png", img)[1])


def expected_rows(
    folder: Path, data: ImageFolderData, options: dict[str, Any]
) -> tuple[list[str], np.ndarray]:
    """The per-image path: decode_image on each file (load_image_folder's order), converted to
    the array's dtype as a row is; and the files it cannot read."""
    readable, rows, unreadable = [], [], []
    for rel in data.paths + data.skipped:
        try:
            row = images_module.decode_image(
                str(folder / rel), **{**options, "dtype": data.images.dtype}
            )
        except ImageReadError:
            unreadable.append(rel)
            continue
        readable.append(rel)
        rows.append(row)
    assert readable == list(data.paths)
    return unreadable, np.stack(rows)


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize(
    "options",
    [
        {"size": (32, 32)},
        {"size": (20, 36), "color": "bgr"},
        {"size": (16, 16), "color": "gray", "dtype": np.float32},
        {"size": (32, 32), "color": "unchanged"},  # the 16-bit PNG converted to the first's 8
        {"size": (32, 32), "color": "unchanged", "dtype": np.uint16},
        {"size": (24, 24), "color": "rgb", "dtype": np.float64},
        {"size": (64, 64)},
    ],
)
def test_load_image_folder_rows_are_decode_image_rows(
    mixed_folder: list[str], options: dict[str, Any], n_jobs: int
) -> None:
    folder = Path(mixed_folder[0]).parent
    deep = np.random.default_rng(0).integers(0, 65536, (48, 40, 3), dtype=np.uint16)
    specials = {"m10_corrupt.jpg": b"\xff\xd8\xff" + bytes(50), "m20_deep.png": png(deep),
                "m30_empty.png": b"", "m31_garbage.png": b"garbage"}  # fmt: skip
    fill_around(folder, specials)
    with pytest.warns(ImagesSkippedWarning):
        data = load_image_folder(folder, on_error="skip", n_jobs=n_jobs, **options)
    unreadable, rows = expected_rows(folder, data, options)
    assert sorted(data.skipped) == unreadable == ["m10_corrupt.jpg", "m30_empty.png",
                                                  "m31_garbage.png"]  # fmt: skip
    assert len(data.paths) == len(mixed_folder) + 41
    np.testing.assert_array_equal(data.images, rows)  # bit-identical, row by row
    assert data.images.dtype == options.get("dtype", np.uint8)


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"color": "bgr"},
        {"color": "gray", "dtype": np.float32},
        {"color": "unchanged"},  # the 16-bit PNG converted to the first's 8 bits
        {"color": "unchanged", "dtype": np.uint16},
    ],
)
def test_without_a_size_rows_are_decode_image_rows(
    tmp_path: Path, options: dict[str, Any], n_jobs: int
) -> None:
    def jpeg(img: np.ndarray) -> bytes:
        return bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])

    deep = np.random.default_rng(0).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    specials = {"m05_rotated.jpg": with_orientation(jpeg(smooth(64, seed=99)), 6),
                "m11_garbage.jpg": b"garbage", "m20_deep.png": png(deep),
                "m20_é.jpg": jpeg(smooth(64, seed=98)), "m29_é_empty.png": b""}  # fmt: skip
    fill_around(tmp_path, specials, side=64)
    with pytest.warns(ImagesSkippedWarning):
        data = load_image_folder(tmp_path, on_error="skip", n_jobs=n_jobs, **options)
    unreadable, rows = expected_rows(tmp_path, data, options)
    assert sorted(data.skipped) == unreadable == ["m11_garbage.jpg", "m29_é_empty.png"]
    np.testing.assert_array_equal(data.images, rows)
    rotated = data.images[data.paths.index("m05_rotated.jpg")]
    plain = images_module.decode_image(str(tmp_path / "m05_rotated.jpg"), **options)
    np.testing.assert_array_equal(rotated, plain)


@pytest.mark.parametrize("size", [None, (16, 16)])
@pytest.mark.parametrize("dtype", [None, np.float32])
def test_rgba_and_16_bit_rows_are_decode_image_rows(
    tmp_path: Path, size: tuple[int, int] | None, dtype: Any
) -> None:
    rng = np.random.default_rng(1)
    for i in range(40):
        deep = i in (13, 14, 27)  # 16-bit among 8-bit: the row is converted to the first's depth
        top = 65536 if deep else 256
        img = rng.integers(0, top, (32, 32, 4), dtype=np.uint16 if deep else np.uint8)
        write(tmp_path / f"{i:02d}.png", img)
    options = {"size": size, "color": "unchanged", "dtype": dtype}
    data = load_image_folder(tmp_path, n_jobs=2, **options)
    assert data.images.shape[1:] == (*(size or (32, 32)), 4)
    _, rows = expected_rows(tmp_path, data, options)
    np.testing.assert_array_equal(data.images, rows)


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize(
    ("size", "color", "offending"),
    [
        (None, "rgb", noise(7, (64, 48, 3))),  # other sides
        ((16, 16), "unchanged", noise(7, (64, 64))),  # one channel, not three
    ],
)
def test_a_mismatch_in_the_middle_names_the_first_and_the_offending_image(
    tmp_path: Path, n_jobs: int, size: Any, color: Any, offending: np.ndarray
) -> None:
    specials = {"m17_other.png": png(offending), "m25_other.png": png(offending)}
    fill_around(tmp_path, specials, side=64)
    with pytest.raises(ImageShapeMismatchError) as info:
        load_image_folder(tmp_path, size=size, color=color, n_jobs=n_jobs, on_error="skip")
    first = images_module.decode_image(str(tmp_path / "m00.jpg"), color=color)
    assert (info.value.first, info.value.first_shape) == (str(tmp_path / "m00.jpg"), first.shape)
    assert info.value.second == str(tmp_path / "m17_other.png")
    assert info.value.second_shape == offending.shape


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_progress_counts_every_image_skipped_or_not(
    tmp_path: Path, n_jobs: int, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_around(tmp_path, {"m00_bad.jpg": b"garbage", "m17_bad.jpg": b"", "m39z.png": b"x"})
    with pytest.warns(ImagesSkippedWarning):
        data = load_image_folder(tmp_path, size=(8, 8), on_error="skip", n_jobs=n_jobs,
                                 progress=True)  # fmt: skip
    assert len(data.paths) == 40
    assert "43/43" in capsys.readouterr().err


def jpeg(img: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def truncated_jpeg(seed: int) -> bytes:
    """A JPEG cut in its entropy-coded data, as a partial download leaves it: libjpeg says
    "Premature end of JPEG file" and OpenCV returns an image, grey below the cut."""
    whole = jpeg(noise(seed, (64, 64, 3)))
    return whole[: len(whole) * 2 // 3]


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_truncated_jpeg_is_unreadable(tmp_path: Path, n_jobs: int) -> None:
    for i in range(30):
        (tmp_path / f"{i:02d}.jpg").write_bytes(jpeg(noise(i, (64, 64, 3))))
    (tmp_path / "00.jpg").write_bytes(truncated_jpeg(0))  # the first: the serial path
    (tmp_path / "17.jpg").write_bytes(truncated_jpeg(17))  # in a batch of rows
    assert cv2.imread(str(tmp_path / "17.jpg")) is not None  # OpenCV alone accepts it
    for size in (None, (16, 16)):  # a full decode, and a reduced one
        with pytest.raises(ImageReadError, match="ends before the JPEG data") as info:
            load_image_folder(tmp_path, size=size, n_jobs=n_jobs)
        assert info.value.path == str(tmp_path / "00.jpg")
        assert "17.jpg" in str(info.value) and 'on_error="skip"' in str(info.value)
        with pytest.warns(ImagesSkippedWarning, match=r"00\.jpg \(truncated") as record:
            data = load_image_folder(tmp_path, size=size, n_jobs=n_jobs, on_error="skip")
        assert "17.jpg" in str(record[0].message)
        assert data.skipped == ("00.jpg", "17.jpg") and len(data.images) == 28
    with pytest.raises(ImageReadError, match="ends before the JPEG data"):
        images_module.decode_image(str(tmp_path / "17.jpg"))
    paths = [str(tmp_path / f"{i:02d}.jpg") for i in range(1, 30)]
    for size in (None, (16, 16)):
        out = np.zeros((len(paths), *(size or (64, 64)), 3), np.uint8)
        assert images_module.decode_rows(paths, out, size=size) == 16  # stops before 17.jpg


def test_a_complete_jpeg_with_padding_or_data_after_its_end_is_readable(tmp_path: Path) -> None:
    whole = jpeg(noise(1, (64, 64, 3)))
    # zero padding (cameras, sector-sized copies), then a trailer after the image: a motion
    # photo's video, a maker's block (it may hold any bytes, FF D8 and FF DA included)
    (tmp_path / "padded.jpg").write_bytes(whole + bytes(300))
    (tmp_path / "trailer.jpg").write_bytes(whole + b"ftypmp42\xff\xda\x00\x08" + bytes(5000))
    decoded = cv2.imdecode(np.frombuffer(whole, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    expected = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    data = load_image_folder(tmp_path)
    np.testing.assert_array_equal(data.images, [expected, expected])


def test_unreadable_images_are_all_named_first_ten_then_a_count(tmp_path: Path) -> None:
    for i in range(20):
        write(tmp_path / f"{i:02d}.png", noise(i))
    for i in range(3, 16):
        (tmp_path / f"{i:02d}.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError) as info:
        load_image_folder(tmp_path, n_jobs=2)
    message = str(info.value)
    assert info.value.path == str(tmp_path / "03.png")
    assert [path for path, _ in info.value.others] == [str(tmp_path / f"{i:02d}.png")
                                                       for i in range(4, 16)]  # fmt: skip
    assert "cannot read 13 images" in message and "and 3 more" in message
    assert all(f"{i:02d}.png" in message for i in range(3, 13))
    assert not any(f"{i:02d}.png" in message for i in range(13, 16))
    assert message.endswith('pass on_error="skip" to leave unreadable images out')
    assert pickle.loads(pickle.dumps(info.value)).others == info.value.others
