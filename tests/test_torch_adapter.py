"""cachedload.torch.MappedImages: a DataLoader-ready Dataset over a cached, memory-mapped result."""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cachedload import ImageFolderData, cached_dataset, cached_image_folder, load_image_folder
from tests.conftest import age, run_python, write_images

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs the torch extra")
from torch.utils.data import DataLoader, get_worker_info  # noqa: E402

from cachedload.torch import MappedImages  # noqa: E402

CONTEXTS = ["fork", "spawn"]

# Loaders, transforms and helpers live at module level: spawned workers import them by name.


@cached_dataset(mmap_mode="r")
def load_folder(root: Path, size: tuple[int, int] = (8, 8)) -> ImageFolderData:
    return load_image_folder(root, size=size, progress=False)


@cached_dataset(mmap_mode="r")
def load_arrays(count: int, side: int = 8, channels: int = 3) -> tuple[Any, Any]:
    """An (X, y) pair; y[i] == i, so that an item can be found again after shuffling."""
    shape = (count, side, side, channels) if channels else (count, side, side)
    images = (np.arange(np.prod(shape), dtype=np.int64) % 251).astype(np.uint8).reshape(shape)
    return images, np.arange(count)


@cached_dataset(mmap_mode="r")
def load_images_only(count: int) -> Any:
    return np.full((count, 4, 4, 3), 7, np.uint8)


@cached_dataset(per_item="path", mmap_mode="r")
def small_image(path: str) -> Any:
    """A per-item loader: one image, 4x4."""
    image = cv2.imread(path)
    assert image is not None
    return cv2.resize(image, (4, 4))


def noisy_flip(image: Any) -> tuple[Any, Any]:
    """A random augmentation (torch's RNG, seeded per worker and per epoch), with the input."""
    flipped = image.flip(-1) if torch.rand(()) < 0.5 else image
    return flipped.to(torch.int16) + torch.randint(0, 1000, ()), image.clone()


def where_served(label: int) -> tuple[int, int, bool]:
    """The label, the worker's id and whether its dataset reads a memory map."""
    info = get_worker_info()
    assert info is not None and isinstance(info.dataset, MappedImages)
    return label, info.id, bool(info.dataset.data.mapped)


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    root = write_images(tmp_path / "train", count=12, classes=("cats", "dogs", "owls"))
    age(root)
    return root


def test_items_are_chw_tensors_and_labels_from_an_image_folder(dataset_root: Path) -> None:
    data = load_folder(dataset_root)
    dataset = MappedImages(load_folder, dataset_root)
    assert len(dataset) == 12
    assert dataset.classes == ("cats", "dogs", "owls")
    assert dataset.paths == data.paths
    image, label = dataset[4]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    assert image.shape == (3, 8, 8)
    np.testing.assert_array_equal(image.numpy(), data.images[4].transpose(2, 0, 1))
    assert data.labels is not None
    assert label == int(data.labels[4]) and isinstance(label, int)


def test_an_item_is_a_private_copy_so_a_transform_may_write_in_place(dataset_root: Path) -> None:
    dataset = MappedImages(load_folder, dataset_root, transform=lambda image: image.zero_())
    image, _ = dataset[0]
    assert int(image.sum()) == 0
    assert load_folder(dataset_root).images[0].any()  # the entry is untouched


def test_x_y_pairs_grayscale_and_images_without_labels() -> None:
    pairs = MappedImages(load_arrays, 5)
    image, label = pairs[3]
    assert image.shape == (3, 8, 8) and label == 3
    assert pairs.classes == () and pairs.paths is None
    gray = MappedImages(load_arrays, 5, channels=0)
    assert gray[1][0].shape == (1, 8, 8)
    alone = MappedImages(load_images_only, 3)
    assert isinstance(alone[0], torch.Tensor) and alone[0].shape == (3, 4, 4)


def test_float_dtype_scales_to_unit_range() -> None:
    image, _ = MappedImages(load_arrays, 2, dtype=torch.float32)[1]
    assert image.dtype == torch.float32
    expected = load_arrays(2)[0][1].transpose(2, 0, 1) / 255
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6)


def test_numpy_transform_input_gets_a_writable_hwc_array() -> None:
    seen: list[tuple[tuple[int, ...], bool]] = []

    def albumentations_style(image: Any) -> Any:
        seen.append((image.shape, image.flags.writeable))
        return image[::-1]  # a vertical flip, as a numpy view

    dataset = MappedImages(load_arrays, 3, transform=albumentations_style, transform_input="numpy")
    image, _ = dataset[2]
    assert seen == [((8, 8, 3), True)]
    assert image.shape == (3, 8, 8)
    np.testing.assert_array_equal(image.numpy(), load_arrays(3)[0][2][::-1].transpose(2, 0, 1))


@pytest.mark.parametrize("context", CONTEXTS)
def test_pickling_carries_the_loader_not_the_pixels_of_a_100_mb_result(context: str) -> None:
    dataset = MappedImages(load_arrays, 2048, side=128, target_transform=where_served)
    assert dataset.data.images.nbytes > 100_000_000 and dataset.data.mapped
    assert len(ForkingPickler.dumps(dataset)) < 2_000  # what a spawned worker receives
    assert len(pickle.dumps(dataset)) < 2_000
    subset = list(range(0, 2048, 97))
    loader = DataLoader(
        dataset,
        sampler=subset,
        batch_size=4,
        num_workers=2,
        multiprocessing_context=context,
    )
    images, labels, workers, mapped = [], [], set(), []
    for image, (label, worker, is_mapped) in loader:
        images.append(image)
        labels += label.tolist()
        workers |= set(worker.tolist())
        mapped += is_mapped.tolist()
    assert labels == subset and workers == {0, 1} and all(mapped)
    expected = load_arrays(2048, side=128)[0][subset].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(torch.cat(images).numpy(), expected)


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_random_transform_differs_per_epoch_over_the_same_pixels(context: str) -> None:
    dataset = MappedImages(load_arrays, 40, transform=noisy_flip)
    loader = DataLoader(
        dataset, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context=context
    )
    epochs = []
    for _ in range(2):
        augmented: dict[int, Any] = {}
        for (changed, original), labels in loader:
            for row, label in enumerate(labels.tolist()):
                augmented[label] = changed[row]
                np.testing.assert_array_equal(
                    original[row].numpy(), load_arrays(40)[0][label].transpose(2, 0, 1)
                )
        assert sorted(augmented) == list(range(40))
        epochs.append(augmented)
    differing = sum(not torch.equal(epochs[0][i], epochs[1][i]) for i in range(40))
    assert differing >= 35  # a collision of flip and noise is possible, 5 in 40 is not


@pytest.mark.parametrize("context", CONTEXTS)
def test_cached_image_folder_serves_spawned_and_forked_workers(
    dataset_root: Path, cache_dir: Path, context: str
) -> None:
    options: dict[str, Any] = {"size": (8, 8), "mmap_mode": "r", "cache_dir": cache_dir}
    dataset = MappedImages(cached_image_folder, dataset_root, target_transform=where_served,
                           **options)  # fmt: skip
    loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context=context)
    images, labels, workers, mapped = [], [], set(), []
    for image, (label, worker, is_mapped) in loader:
        images.append(image)
        labels += label.tolist()
        workers |= set(worker.tolist())
        mapped += is_mapped.tolist()
    expected = cached_image_folder(dataset_root, **options)
    np.testing.assert_array_equal(torch.cat(images).numpy(), expected.images.transpose(0, 3, 1, 2))
    assert expected.labels is not None and labels == expected.labels.tolist()
    assert workers == {0, 1} and all(mapped)
    assert not dataset._report_if_changed()  # the entry it serves is the current one


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_per_item_map_serves_spawned_and_forked_workers(dataset_root: Path, context: str) -> None:
    dataset = MappedImages(small_image.map, dataset_root)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context=context)
    rows, paths = [], []
    for row, path in loader:  # an ItemArray is (rows, paths): its paths are the labels
        rows.append(row)
        paths += path
    expected = small_image.map(dataset_root)
    np.testing.assert_array_equal(torch.cat(rows).numpy(), expected.array.transpose(0, 3, 1, 2))
    assert tuple(paths) == expected.paths
    assert not dataset._report_if_changed()


def test_per_item_lookup_by_path(dataset_root: Path) -> None:
    dataset = MappedImages(load_folder, dataset_root)
    position = dataset.index_of("dogs/img_001.png")
    assert dataset.index_of(Path("dogs") / "img_001.png") == position
    image, label = dataset[position]
    direct = load_image_folder(dataset_root / "dogs", size=(8, 8)).images[0]
    np.testing.assert_array_equal(image.numpy(), direct.transpose(2, 0, 1))
    assert dataset.classes[label] == "dogs"
    with pytest.raises(KeyError, match=r"nope\.png"):
        dataset.index_of("dogs/nope.png")


def test_changed_sources_keep_the_opened_entry_and_say_so_once(
    dataset_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = MappedImages(load_folder, dataset_root)
    before = load_folder(dataset_root).images.copy()
    changed = dataset_root / "cats" / "img_000.png"
    assert cv2.imwrite(str(changed), np.zeros((16, 16, 3), np.uint8))
    os.utime(changed, ns=(0, 10**18))  # a new, settled mtime
    worker = pickle.loads(pickle.dumps(dataset))  # as a spawned worker receives it
    with caplog.at_level(logging.WARNING, logger="cachedload"):
        served = [worker[i][0].numpy() for i in range(len(worker))]
        again = pickle.loads(pickle.dumps(dataset))
        served_again = again[0][0].numpy()
    np.testing.assert_array_equal(np.stack(served), before.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(served_again, before[0].transpose(2, 0, 1))
    stale = [r for r in caplog.records if "keeps serving" in r.getMessage()]
    assert len(stale) == 1, caplog.text
    for context in CONTEXTS:  # real workers serve the opened entry too
        loader = DataLoader(dataset, batch_size=6, num_workers=2, multiprocessing_context=context)
        images = torch.cat([image for image, _ in loader]).numpy()
        np.testing.assert_array_equal(images, before.transpose(0, 3, 1, 2))
    fresh = MappedImages(load_folder, dataset_root)  # a new dataset picks up the new entry
    assert int(fresh[0][0].sum()) == 0


def test_a_batch_is_its_items_in_any_order_with_repeats(dataset_root: Path) -> None:
    def flip(image: Any) -> Any:
        return image.flip(-1)

    for dataset in (
        MappedImages(load_folder, dataset_root, transform=flip, target_transform=str),
        MappedImages(load_arrays, 9, dtype=torch.float32),
        MappedImages(load_arrays, 9, channels=0),
        MappedImages(load_arrays, 9, transform=np.fliplr, transform_input="numpy"),
        MappedImages(load_images_only, 9),
    ):
        indices = [7, 2, 7, 0, 5]
        batch = dataset.__getitems__(indices)
        assert len(batch) == len(indices)
        for got, index in zip(batch, indices, strict=True):
            expected = dataset[index]
            if isinstance(expected, tuple):
                assert got[1] == expected[1]
                got, expected = got[0], expected[0]
            assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_a_forked_worker_compares_the_sources_again_at_most_every_minute(
    dataset_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = MappedImages(load_folder, dataset_root)
    changed = dataset_root / "owls" / "img_002.png"
    assert cv2.imwrite(str(changed), np.zeros((16, 16, 3), np.uint8))
    os.utime(changed, ns=(0, 10**18))
    with caplog.at_level(logging.WARNING, logger="cachedload"):
        dataset._pid = -1  # as in a forked worker: it serves the map it inherited
        dataset[0]
        assert not [r for r in caplog.records if "keeps serving" in r.getMessage()]
        for _ in range(2):
            dataset._pid = -1
            dataset._checked.value -= 61  # a minute later
            dataset[0]
            deadline = time.monotonic() + 30
            while dataset._checked.value != math.inf and time.monotonic() < deadline:
                time.sleep(0.01)  # the comparison runs in the background
    stale = [r for r in caplog.records if "keeps serving" in r.getMessage()]
    assert len(stale) == 1 and dataset._checked.value == math.inf  # said once, then no more


def test_importing_cachedload_imports_neither_torch_nor_tensorflow() -> None:
    run_python(
        """
        import sys
        import cachedload
        assert "torch" not in sys.modules and "tensorflow" not in sys.modules
        import cachedload.torch
        assert "torch" in sys.modules and "tensorflow" not in sys.modules
        """
    )
