"""cachedload.tf.dataset: a tf.data pipeline over a cached result, the same items as torch's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import ConfigurationError, ImageFolderData, cached_dataset, load_image_folder
from tests.conftest import age, write_images

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter on stderr
tf = pytest.importorskip("tensorflow", reason="the tf.data adapter needs the tensorflow extra")

import cachedload.tf  # noqa: E402


@cached_dataset(mmap_mode="r")
def load_folder(root: Path, size: tuple[int, int] = (8, 8)) -> ImageFolderData:
    return load_image_folder(root, size=size, progress=False)


@cached_dataset(mmap_mode="r")
def load_arrays(count: int, side: int = 4) -> tuple[Any, Any]:
    """An (X, y) pair with y[i] == i; X[i] is filled with i % 251."""
    images = np.empty((count, side, side, 3), np.uint8)
    images[:] = (np.arange(count) % 251).astype(np.uint8)[:, None, None, None]
    return images, np.arange(count)


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    root = write_images(tmp_path / "train", count=12, classes=("cats", "dogs", "owls"))
    age(root)
    return root


def collect(data: Any) -> tuple[Any, Any]:
    pairs = [(image.numpy(), label.numpy()) for image, label in data]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.mark.parametrize("in_memory", [None, True, False, "1KB"])
def test_the_tf_pipeline_yields_the_same_pixels_and_labels_as_the_torch_one(
    dataset_root: Path, in_memory: Any
) -> None:
    torch = pytest.importorskip("torch")
    from cachedload.torch import MappedImages

    images, labels = collect(cachedload.tf.dataset(load_folder, dataset_root, in_memory=in_memory))
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 3)  # TensorFlow's HWC
    torch_dataset = MappedImages(load_folder, dataset_root)
    torch_items = [torch_dataset[index] for index in range(len(torch_dataset))]
    expected = torch.stack([image for image, _ in torch_items]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, expected)
    assert labels.tolist() == [label for _, label in torch_items]


@pytest.mark.parametrize("in_memory", [True, False])
def test_shuffle_gives_a_new_order_every_epoch(in_memory: bool) -> None:
    data = cachedload.tf.dataset(load_arrays, 600, in_memory=in_memory, shuffle=True)
    orders = []
    for _ in range(2):
        images, labels = collect(data)
        assert sorted(labels.tolist()) == list(range(600))
        assert (images[:, 0, 0, 0] == labels % 251).all()  # pixels stay with their label
        orders.append(labels.tolist())
    assert orders[0] != orders[1] and orders[0] != list(range(600))


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_random_transform_runs_per_epoch_and_batches_follow(in_memory: bool) -> None:
    def add_noise(image: Any) -> Any:
        return tf.cast(image, tf.int32) + tf.random.uniform((), 1, 10_000, dtype=tf.int32)

    data = cachedload.tf.dataset(
        load_arrays, 50, in_memory=in_memory, transform=add_noise, batch_size=16
    )
    epochs = [[(image.numpy(), label.numpy()) for image, label in data] for _ in range(2)]
    assert [len(labels) for _, labels in epochs[0]] == [16, 16, 16, 2]
    first, second = (np.concatenate([image for image, _ in epoch]) for epoch in epochs)
    labels = np.concatenate([label for _, label in epochs[0]])
    assert (first > labels[:, None, None, None] % 251).all()  # the noise was added
    assert (first != second).any(axis=(1, 2, 3)).sum() >= 45


def test_a_result_without_labels_yields_images() -> None:
    @cached_dataset(mmap_mode="r")
    def load_unlabelled(count: int) -> Any:
        return np.ones((count, 2, 2, 1), np.float32)

    for in_memory in (True, False):
        items = list(cachedload.tf.dataset(load_unlabelled, 3, in_memory=in_memory))
        assert len(items) == 3 and items[0].shape == (2, 2, 1) and items[0].dtype == tf.float32


def test_bad_options_raise_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="batch_size"):
        cachedload.tf.dataset(load_arrays, 2, batch_size=0)
    with pytest.raises(ConfigurationError, match="in_memory"):
        cachedload.tf.dataset(load_arrays, 2, in_memory="lots")


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize(("batch_size", "expected"), [(None, 50), (16, 4), (25, 2), (64, 1)])
def test_the_dataset_knows_its_length(
    in_memory: bool, batch_size: int | None, expected: int
) -> None:
    data = cachedload.tf.dataset(
        load_arrays, 50, in_memory=in_memory, shuffle=True, batch_size=batch_size
    )
    assert len(data) == expected
    assert int(data.cardinality()) == expected
    assert sum(1 for _ in data) == expected


def test_keras_fits_a_mapped_dataset_for_every_epoch_without_running_out_of_data() -> None:
    keras = pytest.importorskip("keras")
    data = cachedload.tf.dataset(
        load_arrays,
        40,
        in_memory=False,
        shuffle=True,
        batch_size=16,
        transform=lambda image: tf.cast(image, tf.float32) / 255,
    )
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(40)]
    )
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    # Keras warns (an error here) when an epoch ends before the steps it expected. shuffle=False:
    # the dataset shuffles itself, and Keras warns that its own default shuffle=True is ignored.
    history = model.fit(data, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2
