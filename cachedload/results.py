"""Take a cached loader's result apart into images, labels, classes and paths.

Shared by the framework adapters (:mod:`cachedload.torch`, :mod:`cachedload.tf`), which must
not import each other's framework. Knows nothing about caching or about any framework.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from cachedload.errors import ConfigurationError

__all__ = ["ResultParts", "normalize_path", "split_result"]


class ResultParts(NamedTuple):
    """A loader's result seen as a labelled image set.

    Attributes:
        images: ``(N, H, W, C)`` or ``(N, H, W)``, as a plain ``ndarray`` (a view of the memory
            map when the result is mapped: indexing it skips ``np.memmap``'s per-slice
            bookkeeping).
        labels: ``N`` labels, or ``None`` (a flat folder, or a result without labels).
        classes: the class names (empty when the result has none).
        paths: each row's path, or ``None`` when the result has none.
        mapped_file: the file ``images`` is memory-mapped from (the cache entry's data file),
            or ``None`` when the images are in memory.
    """

    images: npt.NDArray[Any]
    labels: npt.NDArray[Any] | None
    classes: tuple[str, ...]
    paths: tuple[str, ...] | None
    mapped_file: str | None

    @property
    def mapped(self) -> bool:
        """Whether ``images`` is a memory map."""
        return self.mapped_file is not None


def split_result(value: Any) -> ResultParts:
    """Read ``images``/``labels``/``classes``/``paths`` from an ``ImageFolderData`` (or any
    object with an ``images`` attribute), an ``(X, y)`` pair, or a bare array ``X``.

    Raises:
        ConfigurationError: the result is none of those, or ``X`` and ``y`` differ in length.
    """
    if hasattr(value, "images"):
        images, labels = value.images, getattr(value, "labels", None)
        classes = tuple(getattr(value, "classes", None) or ())
        paths = getattr(value, "paths", None)
    elif isinstance(value, tuple | list) and len(value) == 2:
        (images, labels), classes, paths = value, (), None
    elif isinstance(value, np.ndarray):
        images, labels, classes, paths = value, None, (), None
    else:
        raise ConfigurationError(
            "loader",
            f"returned a {type(value).__name__}; expected an ImageFolderData, an (X, y) pair "
            "or an array of images",
        )
    if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
        raise ConfigurationError(
            "loader", "its images must be an array of shape (N, H, W, C) or (N, H, W)"
        )
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(images):
            raise ConfigurationError(
                "loader", f"returned {len(images)} images but {len(labels)} labels"
            )
    mapped_file = images.filename if isinstance(images, np.memmap) else None
    return ResultParts(
        images=np.asarray(images),
        labels=labels,
        classes=classes,
        paths=None if paths is None else tuple(paths),
        mapped_file=None if mapped_file is None else os.path.abspath(mapped_file),
    )


def normalize_path(path: str | os.PathLike[str]) -> str:
    """A path as the results store it: relative, ``/``-separated."""
    return os.fspath(path).replace(os.sep, "/")
