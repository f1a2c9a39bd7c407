"""A ``tf.data`` pipeline over a cached loader's result, in one call.

::

    import cachedload.tf

    ds = cachedload.tf.dataset(load_mapped, "data/train", size=(128, 128), batch_size=64,
                               shuffle=True, transform=augment)

A result held in memory becomes tensors (``from_tensor_slices``); a memory-mapped one is read by
a generator over the map, in chunks, with a declared ``output_signature``, so the data is never
loaded whole. ``transform`` runs in a parallel ``map`` per item and per epoch (never cached),
then ``prefetch(AUTOTUNE)``.

Importing this module imports TensorFlow; ``import cachedload`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from cachedload.config import parse_size
from cachedload.errors import ConfigurationError
from cachedload.results import ResultParts, split_result

__all__ = ["dataset"]

# Rows per generator step: enough to amortise a Python call and a tensor conversion, small
# enough (a few MB for 128x128 RGB) that the first batch comes quickly.
_CHUNK = 256


def dataset(
    loader: Callable[..., Any],
    /,
    *args: Any,
    transform: Callable[[Any], Any] | None = None,
    target_transform: Callable[[Any], Any] | None = None,
    in_memory: bool | int | str | None = None,
    shuffle: bool = False,
    batch_size: int | None = None,
    **kwargs: Any,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(image, label)`` over ``loader(*args, **kwargs)``.

    Args:
        loader: a cached loader returning an ``ImageFolderData``, an ``(X, y)`` pair or an
            array ``X`` (then elements are images alone); images ``(N, H, W, C)`` or
            ``(N, H, W)``, kept in their stored dtype and layout (TensorFlow's ``HWC``).
        *args, **kwargs: the loader's arguments.
        transform: a function of one image tensor, run per element in a parallel ``map``
            (``num_parallel_calls=AUTOTUNE``) every epoch: random augmentation stays random.
        target_transform: the same for labels.
        in_memory: whether to copy the images into tensors (``from_tensor_slices``): ``True``,
            ``False`` (read the memory map with a generator), a size limit (bytes or a string
            such as ``"2GB"``), or ``None`` (default): in memory unless the loader returned a
            memory map (``mmap_mode="r"``).
        shuffle: a new random order every epoch (over all elements, not a window).
        batch_size: batch the elements (the last batch may be smaller).

    Returns:
        the dataset, ending with ``prefetch(tf.data.AUTOTUNE)``.

    Raises:
        ConfigurationError: an option is invalid, or the result is not a set of images.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigurationError("batch_size", f"must be None or >= 1, not {batch_size!r}")
    parts = split_result(loader(*args, **kwargs))
    build = _from_tensors if _fits(parts, in_memory) else _from_map
    data = build(parts, shuffle)
    autotune = tf.data.AUTOTUNE
    if transform is not None or target_transform is not None:
        image_fn = transform or _unchanged
        label_fn = target_transform or _unchanged

        def both(image: Any, label: Any) -> tuple[Any, Any]:
            return image_fn(image), label_fn(label)

        data = data.map(image_fn if parts.labels is None else both, num_parallel_calls=autotune)
    if batch_size is not None:
        data = data.batch(batch_size)
    return data.prefetch(autotune)


def _unchanged(value: Any) -> Any:
    return value


def _fits(parts: ResultParts, in_memory: bool | int | str | None) -> bool:
    if in_memory is None:
        return not parts.mapped
    if isinstance(in_memory, bool):
        return in_memory
    return bool(parts.images.nbytes <= parse_size(in_memory, "in_memory"))


def _from_tensors(parts: ResultParts, shuffle: bool) -> tf.data.Dataset:
    images = tf.convert_to_tensor(parts.images)
    if parts.labels is None:
        if not shuffle:
            return tf.data.Dataset.from_tensor_slices(images)
        return _shuffled_range(len(parts.images)).map(lambda i: tf.gather(images, i))
    labels = tf.convert_to_tensor(parts.labels)
    if not shuffle:
        return tf.data.Dataset.from_tensor_slices((images, labels))
    return _shuffled_range(len(parts.images)).map(
        lambda i: (tf.gather(images, i), tf.gather(labels, i))
    )


def _shuffled_range(count: int) -> tf.data.Dataset:
    # Shuffling indices rather than elements: the buffer holds integers, not a copy of the data.
    return tf.data.Dataset.range(count).shuffle(count, reshuffle_each_iteration=True)


def _from_map(parts: ResultParts, shuffle: bool) -> tf.data.Dataset:
    images, labels = parts.images, parts.labels
    image_spec = tf.TensorSpec((None, *images.shape[1:]), tf.as_dtype(images.dtype))

    def chunks() -> Iterator[Any]:
        # Called anew each epoch: a new order.
        order = np.random.permutation(len(images)) if shuffle else None
        for start in range(0, len(images), _CHUNK):
            rows: Any = (
                slice(start, start + _CHUNK) if order is None else order[start : start + _CHUNK]
            )
            # One copy out of the read-only map (fancy indexing copies by itself).
            block = np.array(images[rows]) if order is None else images[rows]
            yield block if labels is None else (block, labels[rows])

    if labels is None:
        signature: Any = image_spec
    else:
        signature = (image_spec, tf.TensorSpec((None,), tf.as_dtype(labels.dtype)))
    rows = tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()
    # A generator's length is unknown to tf.data: without it `len(ds)` raises and Keras, which
    # counts the steps of the first epoch, warns that later epochs "ran out of data". `batch`
    # derives its own count from this one.
    return rows.apply(tf.data.experimental.assert_cardinality(len(images)))
