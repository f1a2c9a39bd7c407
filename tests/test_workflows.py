"""The three PyTorch workflows of docs/pytorch.md, end to end: in memory, larger than RAM,
per-item lookup."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import ImageFolderData, cached_dataset, list_entries, load_image_folder
from tests.conftest import age, runs, subprocess_env, write_images

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
    assert data.labels is not None
    assert data.classes[data.labels[position[wanted]]] == "dogs"


# Workflow 2 (docs/pytorch.md) as a user runs it: the loader and the Dataset in the main script,
# whose functions are ``__mp_main__.*`` in workers started with spawn (``__main__.*`` under fork).
WORKFLOW_2_SCRIPT = """
import multiprocessing
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cachedload import cached_dataset, load_image_folder


@cached_dataset(mmap_mode="r")
def load_mapped(root, size=(8, 8)):
    with open(os.environ["COUNTER"], "a") as counter:
        counter.write(f"{os.getpid()}\\n")
    return load_image_folder(root, size=size, progress=False)


class MappedImages(Dataset):
    def __init__(self, root):
        self.root, self._data = root, None
        self.length = len(self.data.paths)

    @property
    def data(self):
        if self._data is None:
            self._data = load_mapped(self.root)  # a memory map, opened once per process
        return self._data

    def __getstate__(self):  # what workers receive: no pixels
        return {**self.__dict__, "_data": None}

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.data.images[i])), int(self.data.labels[i])


def total_in_worker(root):
    return int(np.asarray(load_mapped(root).images).sum())


if __name__ == "__main__":
    context, root = sys.argv[1], sys.argv[2]
    loader = DataLoader(
        MappedImages(root), batch_size=4, num_workers=2, multiprocessing_context=context
    )
    total = sum(int(images.sum()) for images, _ in loader)
    with multiprocessing.get_context(context).Pool(2) as pool:
        totals = pool.map(total_in_worker, [root] * 4)
    assert totals == [total] * 4, (totals, total)
    print(total)
"""


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workflow_2_from_a_script_computes_once_for_all_workers(
    context: str, dataset_root: Path, tmp_path: Path, isolated_cache: Path, counter_file: Path
) -> None:
    script = tmp_path / "train.py"
    script.write_text(WORKFLOW_2_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), context, str(dataset_root)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(COUNTER=str(counter_file)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    expected = load_image_folder(dataset_root, size=(8, 8), progress=False).images
    assert int(result.stdout) == int(expected.astype(np.int64).sum())
    assert runs(counter_file) == 1  # the parent computed; every worker hit its entry
    assert [entry.function for entry in list_entries(isolated_cache)] == ["__main__.load_mapped"]
