"""The three workflows of the README, end to end: in-memory, larger than RAM, per-item lookup."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import ImageFolderData, cached_dataset, load_image_folder
from tests.conftest import age, write_images

torch = pytest.importorskip("torch", reason="the PyTorch workflows need the torch extra")
from torch.utils.data import DataLoader, Dataset  # noqa: E402


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    root = write_images(tmp_path / "train", count=12, classes=("cats", "dogs", "owls"))
    age(root)
    return root


class InMemoryImages(Dataset[tuple[Any, int]]):
    """Workflow 1: a tiny Dataset over arrays that a cached loader returned."""

    def __init__(self, data: ImageFolderData) -> None:
        self.images, self.labels = data.images, data.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1).float() / 255
        assert self.labels is not None
        return image, int(self.labels[index])


def test_in_memory_dataloader(dataset_root: Path, cache_dir: Path) -> None:
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load_train(root: Path, size: tuple[int, int] = (8, 8)) -> ImageFolderData:
        calls.append(1)
        return load_image_folder(root, size=size, progress=False)

    for _ in range(2):
        loader = DataLoader(InMemoryImages(load_train(dataset_root)), batch_size=5, shuffle=True)
        batches = list(loader)
        assert sum(len(labels) for _, labels in batches) == 12
        assert batches[0][0].shape[1:] == (3, 8, 8)
    assert len(calls) == 1


class MappedImages(Dataset[tuple[Any, int]]):
    """Workflow 2: each worker opens the cached entry as a memory map (a cache hit), so the
    array is never pickled into the workers, whatever its size."""

    def __init__(self, loader: Any, root: Path) -> None:
        self.loader, self.root = loader, root
        self._data: ImageFolderData | None = None
        self.length = len(self.data.paths)

    @property
    def data(self) -> ImageFolderData:
        if self._data is None:
            self._data = self.loader(self.root)  # memory-mapped, opened once per process
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # workers reopen the map, never copy it

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        images, labels = self.data.images, self.data.labels
        assert isinstance(images, np.memmap) and labels is not None
        return torch.from_numpy(np.array(images[index])), int(labels[index])


@cached_dataset(mmap_mode="r")
def load_mapped(root: Path, size: tuple[int, int] = (8, 8)) -> ImageFolderData:
    return load_image_folder(root, size=size, progress=False)


def test_memory_mapped_dataloader_with_worker_processes(
    dataset_root: Path, isolated_cache: Path
) -> None:
    load_mapped(dataset_root)  # the first call computes and stores
    dataset = MappedImages(load_mapped, dataset_root)
    assert isinstance(dataset.data.images, np.memmap)
    assert len(pickle.dumps(dataset)) < 10_000  # what each worker receives: no pixels
    loader = DataLoader(
        dataset, batch_size=4, num_workers=2, multiprocessing_context="spawn", shuffle=False
    )
    images = torch.cat([batch for batch, _ in loader])
    np.testing.assert_array_equal(
        images.numpy(), load_image_folder(dataset_root, size=(8, 8)).images
    )


def test_per_item_lookup_by_index_and_by_path(dataset_root: Path, isolated_cache: Path) -> None:
    load_mapped(dataset_root)
    data = load_mapped(dataset_root)  # a hit: nothing is read until an item is indexed
    assert isinstance(data.images, np.memmap)
    position = {path: index for index, path in enumerate(data.paths)}
    wanted = "dogs/img_001.png"
    item = data.images[position[wanted]]
    direct = load_image_folder(dataset_root / "dogs", size=(8, 8)).images[0]
    np.testing.assert_array_equal(item, direct)
    assert data.classes[data.labels[position[wanted]]] == "dogs"
