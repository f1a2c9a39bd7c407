"""A PyTorch ``Dataset`` over a cached loader's result: one line instead of README workflow 2.

::

    from cachedload.torch import MappedImages

    ds = MappedImages(load_mapped, "data/train", size=(128, 128), transform=train_tf)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=4)

What a DataLoader worker receives is the loader and its arguments (decorated loaders pickle by
their import path: a few hundred bytes), never the pixels. A spawned worker opens the memory
map itself the first time it needs an item (a cache hit, milliseconds); a forked one inherits
the parent's map. Either way every worker serves the entry the dataset opened, so an epoch is
consistent even if the sources change meanwhile.

Importing this module imports torch; ``import cachedload`` does not.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from cachedload import serialize
from cachedload.decorator import CachedDataset
from cachedload.entry import DATA_FILE
from cachedload.errors import CachedloadError, ConfigurationError
from cachedload.results import ResultParts, normalize_path, split_result

__all__ = ["MappedImages"]

logger = logging.getLogger("cachedload")

_CV2_DEPTHS = frozenset(
    np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)
)

# Entries this process has already said it keeps serving although the sources changed.
_reported_stale: set[str] = set()


class MappedImages(Dataset[Any]):
    """A map-style ``Dataset`` of ``(image, label)`` over what ``loader(*args, **kwargs)``
    returns, memory-mapped lazily in each worker process.

    Args:
        loader: a cached loader, normally ``@cached_dataset(mmap_mode="r")``, returning an
            ``ImageFolderData``, an ``(X, y)`` pair or an array ``X`` (then items are images
            alone). ``X`` is ``(N, H, W, C)`` or ``(N, H, W)``. Any callable works, but only a
            decorated loader pickles into spawned workers without its data.
        *args, **kwargs: the loader's arguments (``loader``'s own keyword arguments named like
            the options below must be given positionally).
        transform: called per item, per access, in the worker (never cached, so random
            augmentation differs each epoch). It receives the ``(C, H, W)`` tensor (the
            torchvision v2 convention), or with ``transform_input="numpy"`` the ``(H, W, C)``
            numpy array (albumentations style: ``lambda x: aug(image=x)["image"]``); a numpy
            array it returns is turned into a ``(C, H, W)`` tensor.
        target_transform: called on each label (an ``int``).
        transform_input: ``"tensor"`` (default) or ``"numpy"``, see ``transform``.
        dtype: the image tensor's dtype. ``None`` keeps the stored one (``uint8`` for images);
            a floating dtype from integer pixels is scaled to ``[0, 1]``.

    Each item is one private copy of its pixels (the read from the map; in the target dtype
    when converting): a transform may modify it in place, the cached entry is read-only.

    Attributes:
        classes: the class names (empty for an ``(X, y)`` result).
        paths: each item's path relative to the image folder, or ``None`` without paths.

    Example:
        >>> ds = MappedImages(load_mapped, "data/train", transform=v2.RandomHorizontalFlip())
        ... # doctest: +SKIP
        >>> image, label = ds[ds.index_of("dogs/img_001.png")]  # doctest: +SKIP
    """

    def __init__(
        self,
        loader: Callable[..., Any],
        /,
        *args: Any,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        transform_input: Literal["tensor", "numpy"] = "tensor",
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if transform_input not in ("tensor", "numpy"):
            raise ConfigurationError(
                "transform_input", f"must be 'tensor' or 'numpy', not {transform_input!r}"
            )
        self.loader, self.args, self.kwargs = loader, args, kwargs
        self.transform, self.target_transform = transform, target_transform
        self.transform_input = transform_input
        self.dtype = dtype
        self._data: ResultParts | None = None
        self._index: dict[str, int] | None = None
        self._pid = os.getpid()
        self._data = self._load()
        # The entry this dataset serves (what workers open): the mapped file's folder, else
        # found by the loader (the same fingerprint walk as a call).
        mapped_file = self._data.mapped_file
        self._entry = os.path.dirname(mapped_file) if mapped_file else self._current_entry()
        self._length = len(self._data.images)
        self._np_dtype = None if dtype is None else torch.empty(0, dtype=dtype).numpy().dtype

    # -- what workers receive ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The loader and its arguments; the map (and the path index) are reopened per process.
        return {**self.__dict__, "_data": None, "_index": None}

    def __repr__(self) -> str:
        arguments = [repr(self.loader), *map(repr, self.args)]
        arguments += [f"{name}={value!r}" for name, value in self.kwargs.items()]
        return f"MappedImages({', '.join(arguments)}) with {self._length} items"

    # -- opening the map -----------------------------------------------------------------------
    def _current_entry(self) -> str | None:
        """The entry folder a call would use now (None for an undecorated loader)."""
        if not isinstance(self.loader, CachedDataset):
            return None
        try:
            return os.path.abspath(self.loader.cache_path(*self.args, **self.kwargs))
        except (CachedloadError, OSError):  # e.g. the source folder was removed
            return "?"

    def _load(self) -> ResultParts:
        data = split_result(self.loader(*self.args, **self.kwargs))
        if (
            not data.mapped
            and getattr(self.loader, "_mmap_mode", None) is not None
            and self.loader.is_cached(*self.args, **self.kwargs)  # type: ignore[attr-defined]
        ):
            # A miss returns what the body computed, in memory: map the entry just stored
            # instead (a hit), so that this process too holds a map, not the whole array.
            data = split_result(self.loader(*self.args, **self.kwargs))
        return data

    def _open(self) -> ResultParts:
        """This process's view of the entry the dataset opened (first item in a worker)."""
        self._pid = os.getpid()
        if self._entry is None:  # not a cached loader: nothing to compare with
            if self._data is None:
                self._data = self._load()
            return self._data
        info = get_worker_info()
        if self._data is not None:
            # A forked worker: it serves the map it inherited. Checking the sources costs a
            # walk over them, so one worker does it, off the path of its first items.
            if info is None or info.id == 0:
                threading.Thread(target=self._report_if_changed, daemon=True).start()
            return self._data
        if self._report_if_changed():
            self._data = self._load_opened_entry()
        else:
            self._data = self._load()  # a cache hit: the entry this dataset opened
        return self._data

    def _report_if_changed(self) -> bool:
        """True if a call would now use another entry; logged once per process (worker 0)."""
        if self._current_entry() == self._entry:
            return False
        info = get_worker_info()
        if self._entry not in _reported_stale and (info is None or info.id == 0):
            _reported_stale.add(self._entry or "")
            logger.warning(
                "the sources of %r changed since this MappedImages opened entry %s: it keeps "
                "serving that entry (a consistent epoch); make a new MappedImages to use the "
                "new data",
                self.loader,
                self._entry,
            )
        return True

    def _load_opened_entry(self) -> ResultParts:
        try:
            data = split_result(serialize.load(Path(self._entry or "") / DATA_FILE, mmap_mode="r"))
        except OSError as error:  # removed since, e.g. by keep=1 once the new entry was stored
            logger.warning(
                "entry %s of %r is gone (%s): serving the current one",
                self._entry,
                self.loader,
                error,
            )
            data = self._load()
        if len(data.images) != self._length:
            raise CachedloadError(
                f"MappedImages over {self.loader!r}: the entry it opened is gone and the "
                f"current one has {len(data.images)} items instead of {self._length}"
            )
        return data

    @property
    def data(self) -> ResultParts:
        """The result's parts in this process (opened on first use)."""
        data = self._data
        if data is None or self._pid != os.getpid():
            data = self._open()
        return data

    # -- the Dataset protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        data = self._data
        if data is None or self._pid != os.getpid():
            data = self._open()
        image = self._image(data.images[index])
        if data.labels is None:
            return image
        label: Any = data.labels[index].item()
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def _image(self, pixels: np.ndarray[Any, Any]) -> Any:
        """The item's image, transformed: one private copy of its pixels (then the transform's)."""
        if self.transform_input == "numpy":
            array = self._converted(pixels)
            if self.transform is not None:
                array = self.transform(array)
            if not isinstance(array, np.ndarray):
                return array
            return _chw(torch.from_numpy(np.ascontiguousarray(array)))
        if self._np_dtype is None:
            image = torch.from_numpy(_chw_copy(pixels))
        else:
            image = _chw(torch.from_numpy(self._converted(pixels)))
        return image if self.transform is None else self.transform(image)

    def _converted(self, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """A writable copy of ``pixels`` in the requested dtype (out of the read-only map)."""
        converted: np.ndarray[Any, Any]
        if self._np_dtype is None:
            converted = pixels.copy()
        elif self._np_dtype.kind == "f" and pixels.dtype.kind in "ui":
            converted = np.divide(pixels, np.iinfo(pixels.dtype).max, dtype=self._np_dtype)
        else:
            converted = pixels.astype(self._np_dtype)
        return converted

    # -- per-item lookup -----------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        """The class names; ``classes[label]`` names an item's class."""
        return self.data.classes

    @property
    def paths(self) -> tuple[str, ...] | None:
        """Each item's path relative to the image folder (``/``-separated), in item order."""
        return self.data.paths

    def index_of(self, path: str | os.PathLike[str]) -> int:
        """The position of the item read from ``path`` (relative to the image folder).

        Raises:
            KeyError: no item has that path (or the result has no paths).
        """
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.paths or ())}
        try:
            return self._index[normalize_path(path)]
        except KeyError:
            raise KeyError(f"no item with path {os.fspath(path)!r}") from None


def _chw_copy(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A contiguous ``(C, H, W)`` copy of an ``(H, W, C)`` or ``(H, W)`` item.

    Contiguous, so that the DataLoader's collation is a plain copy: stacking permuted views
    transposes byte by byte, which measured 1.5x slower per epoch than the whole Dataset
    returning ``(H, W, C)``. OpenCV's channel extraction (SIMD) transposes ~1.5x faster than
    ``np.ascontiguousarray(pixels.transpose(2, 0, 1))``.
    """
    if pixels.ndim == 2:
        return np.array(pixels[None])
    channels = pixels.shape[2]
    out = np.empty((channels, *pixels.shape[:2]), pixels.dtype)
    if pixels.dtype in _CV2_DEPTHS and pixels.flags.c_contiguous and channels <= 512:
        for channel in range(channels):
            cv2.extractChannel(pixels, channel, out[channel])
    else:
        out[:] = pixels.transpose(2, 0, 1)
    return out


def _chw(image: torch.Tensor) -> torch.Tensor:
    """``(H, W, C)`` -> ``(C, H, W)`` as a view; ``(H, W)`` -> ``(1, H, W)``."""
    return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
