"""A PyTorch ``Dataset`` over a cached loader's result: one line instead of workflow 2's own.

::

    from cachedload.torch import MappedImages

    ds = MappedImages(load_mapped, "data/train", size=(128, 128), transform=train_tf)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=4)

What a DataLoader worker receives is the loader and its arguments (decorated loaders pickle by
their import path: a few hundred bytes), never the pixels. A spawned worker opens the memory
map itself the first time it needs an item (``load_entry`` of a decorated loader, of its
``.map`` or of ``cached_image_folder``: that entry, without a walk over the sources; any other
callable is called again); a forked one inherits the parent's map. Either way every worker serves
the entry the dataset opened, so an epoch is consistent even if the sources change meanwhile.

A DataLoader asks for a batch's items in one ``__getitems__`` call: their rows are read in
ascending order and converted to ``(C, H, W)`` into one new buffer, each item a contiguous view
of its row. That conversion is what workflow 2's hand-written ``Dataset`` (items ``(H, W, C)``)
does not pay; ``benchmarks/bench_adapters.py`` measures both.

Importing this module imports torch; ``import cachedload`` does not.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.sharedctypes import RawValue
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from cachedload import image_folder
from cachedload.decorator import CachedDataset
from cachedload.errors import CachedloadError, ConfigurationError
from cachedload.image_folder import cached_image_folder
from cachedload.per_item import ItemMap
from cachedload.results import ResultParts, normalize_path, split_result

__all__ = ["MappedImages"]

logger = logging.getLogger("cachedload")

_CV2_DEPTHS = frozenset(
    np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)
)

# Seconds between two comparisons of the sources with the entry in forked workers.
_RECHECK_AFTER = 60.0

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

    Each item's pixels are its own (a row of a buffer made for its batch, in the target dtype):
    a transform may modify them in place, the cached entry is read-only.

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
        # When the sources were last compared with the entry (just now, by the call above), in
        # memory shared with forked workers: they compare again at most every _RECHECK_AFTER.
        self._checked = RawValue("d", time.monotonic())

    # -- what workers receive ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The loader and its arguments; the map (and the path index) are reopened per process.
        return {**self.__dict__, "_data": None, "_index": None, "_checked": None}

    def __repr__(self) -> str:
        arguments = [repr(self.loader), *map(repr, self.args)]
        arguments += [f"{name}={value!r}" for name, value in self.kwargs.items()]
        return f"MappedImages({', '.join(arguments)}) with {self._length} items"

    # -- opening the map -----------------------------------------------------------------------
    def _current_entry(self) -> str | None:
        """The entry folder a call would use now (None for a loader that is not cached)."""
        loader = self.loader
        try:
            if isinstance(loader, CachedDataset | ItemMap):
                return os.path.abspath(loader.cache_path(*self.args, **self.kwargs))
            if loader is cached_image_folder:
                return os.path.abspath(image_folder.cache_path(*self.args, **self.kwargs))
        except (CachedloadError, OSError):  # e.g. the source folder was removed
            return "?"
        return None

    def _load_entry(self, entry: str) -> Any:
        """The result stored in ``entry`` by the loader, without a walk over the sources;
        ``None`` if the loader cannot open an entry by itself."""
        loader = self.loader
        if isinstance(loader, CachedDataset | ItemMap):
            return loader.load_entry(entry)
        if loader is cached_image_folder:
            return image_folder.load_entry(entry, *self.args, **self.kwargs)
        return None

    def _load(self) -> ResultParts:
        data = split_result(self.loader(*self.args, **self.kwargs))
        if (
            not data.mapped
            and isinstance(self.loader, CachedDataset)
            and self.loader.options.mmap_mode is not None
            and self.loader.is_cached(*self.args, **self.kwargs)
        ):
            # A miss returns what the body computed, in memory: map the entry just stored
            # instead (a hit), so that this process too holds a map, not the whole array.
            data = split_result(self.loader(*self.args, **self.kwargs))
        return data

    def _open(self) -> ResultParts:
        """This process's view of the entry the dataset opened (first item in a worker).

        A forked worker serves the map it inherited; a spawned one (or an unpickled copy)
        opens that entry again, without a walk over the sources. Either way worker 0 then
        compares the sources with the entry, to say once if they changed: a spawned worker
        at once (its start-up costs far more than that walk), a forked one in the background
        and at most every ``_RECHECK_AFTER`` seconds, so that short epochs do not pay a walk
        each.
        """
        self._pid = os.getpid()
        info = get_worker_info()
        first_worker = info is None or info.id == 0
        if self._data is None:
            self._data = self._load() if self._entry is None else self._reopen(self._entry)
            if self._entry is not None and first_worker:
                self._report_if_changed()
        elif (
            self._entry is not None
            and self._checked is not None
            and first_worker
            and time.monotonic() - self._checked.value > _RECHECK_AFTER
        ):
            self._checked.value = time.monotonic()
            threading.Thread(target=self._report_if_changed, daemon=True).start()
        return self._data

    def _report_if_changed(self) -> bool:
        """True if a call would now use another entry; logged once per process (and once for
        a dataset and its forked workers)."""
        current = self._current_entry()
        if current is None or current == self._entry:  # None: a loader that is not cached
            return False
        if self._checked is not None:
            self._checked.value = math.inf  # said: forked workers need not look again
        if self._entry not in _reported_stale:
            _reported_stale.add(self._entry or "")
            logger.warning(
                "the sources of %r changed since this MappedImages opened entry %s: it keeps "
                "serving that entry (a consistent epoch); make a new MappedImages to use the "
                "new data",
                self.loader,
                self._entry,
            )
        return True

    def _reopen(self, entry: str) -> ResultParts:
        """The entry this dataset opened, in this process (the current one if it is gone, or
        if the loader cannot open an entry by itself: any callable returning a map)."""
        try:
            stored = self._load_entry(entry)
            data = self._load() if stored is None else split_result(stored)
        except OSError as error:  # removed since, e.g. by keep=1 once the new entry was stored
            logger.warning(
                "entry %s of %r is gone (%s): serving the current one",
                entry,
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
        return self.__getitems__((index,))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The items at ``indices``: what a ``DataLoader`` asks for once per batch.

        The batch's pixels are converted in one call into one ``(n, C, H, W)`` buffer; each
        item's image is a view of its own row of it (contiguous, so that collation is a plain
        copy), then transformed.
        """
        data = self._data
        if data is None or self._pid != os.getpid():
            data = self._open()
        images: Any
        if self.transform_input == "numpy":
            images = [self._numpy_transformed(data.images[index]) for index in indices]
        else:
            images = torch.from_numpy(self._converted(_gather_chw(data.images, indices))).unbind()
            if self.transform is not None:
                images = list(map(self.transform, images))
        if data.labels is None:
            return list(images)
        labels = data.labels[list(indices)].tolist()
        if self.target_transform is not None:
            labels = list(map(self.target_transform, labels))
        return list(zip(images, labels, strict=True))

    def _numpy_transformed(self, pixels: np.ndarray[Any, Any]) -> Any:
        """``transform_input="numpy"``: the transform gets a private ``(H, W, C)`` copy."""
        array = self._converted(pixels)
        if array is pixels:
            array = pixels.copy()  # writable, and the entry stays untouched
        if self.transform is not None:
            array = self.transform(array)
        if not isinstance(array, np.ndarray):
            return array
        image = torch.from_numpy(np.ascontiguousarray(array))
        return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)

    def _converted(self, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """``pixels`` in the requested dtype (a new array), or ``pixels`` if it has it."""
        if self._np_dtype is None or pixels.dtype == self._np_dtype:
            return pixels
        if self._np_dtype.kind == "f" and pixels.dtype.kind in "ui":
            scaled: np.ndarray[Any, Any]
            scaled = np.divide(pixels, np.iinfo(pixels.dtype).max, dtype=self._np_dtype)
            return scaled
        return pixels.astype(self._np_dtype)

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


def _gather_chw(images: np.ndarray[Any, Any], indices: Sequence[int]) -> np.ndarray[Any, Any]:
    """A new ``(n, C, H, W)`` array of ``images[indices]`` (``(N, H, W, C)`` or ``(N, H, W)``).

    Read in ascending order (sequential reads of the map), each row straight into its place.
    OpenCV's channel split (SIMD) moves an item's pixels and transposes them in one pass:
    a batch costs about what copying its items as they are does, where numpy's transposition
    (``out[:] = batch.transpose(0, 3, 1, 2)``) costs 2-3 times more.
    """
    count = len(indices)
    if images.ndim == 3:
        out = np.empty((count, 1, *images.shape[1:]), images.dtype)
        np.take(images, indices, axis=0, out=out[:, 0])
        return out
    channels = images.shape[3]
    out = np.empty((count, channels, *images.shape[1:3]), images.dtype)
    if not (images.dtype in _CV2_DEPTHS and images.flags.c_contiguous and channels <= 4):
        out[:] = images[list(indices)].transpose(0, 3, 1, 2)
        return out
    split = cv2.split
    for position in sorted(range(count), key=indices.__getitem__):
        split(images[indices[position]], list(out[position]))
    return out
