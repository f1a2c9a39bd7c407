"""``cached_image_folder``: :func:`~cachedload.images.load_image_folder`, cached per image.

The seed workflow in one line: the images of a folder decoded into one array, cached on disk,
rebuilt incrementally (only added and changed images are decoded again) and out-of-core (rows
are written into the entry as they are decoded). It is a per-item loader
(:mod:`cachedload.per_item`) over :func:`~cachedload.images.decode_image`, so its pixels are
those of ``load_image_folder`` with the same options, and its labels, classes and paths follow
the same layout rules; ``on_error="skip"`` is the per-item loader's ``skip=(ImageReadError,)``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cachedload._version import __version__
from cachedload.builder import ItemArray
from cachedload.decorator import CachedDataset
from cachedload.errors import (
    FolderImagesMismatchError,
    ImageReadError,
    ItemShapeMismatchError,
    NoImagesFoundError,
)
from cachedload.images import (
    ImageFolderData,
    check_options,
    decode_image,
    decode_rows,
    image_files,
    opencv_threads_off,
    unreadable_error,
    unreadable_images,
)
from cachedload.options import options_for
from cachedload.per_item import ItemMap

__all__ = ["cached_image_folder"]

# Never items, as load_image_folder skips them: hidden entries and OS junk.
_EXCLUDE = (".*", "__pycache__", "__MACOSX", "Thumbs.db", "desktop.ini")
_WRAPPERS: dict[str, CachedDataset[..., Any]] = {}  # options -> wrapper: a hit makes none


def _cached_image_folder_row(
    path: str, size: tuple[int, int] | None, color: str, dtype: str | None
) -> npt.NDArray[Any]:
    """One image's row: the per-item loader behind :func:`cached_image_folder` (named after it:
    logs and ``cachedload ls --function cached_image_folder`` find its entries by this name)."""
    return decode_image(path, size=size, color=color, dtype=dtype)  # type: ignore[arg-type]


def _cached_image_folder_rows(
    paths: Sequence[str],
    out: npt.NDArray[Any],
    size: tuple[int, int] | None,
    color: str,
    dtype: str | None,
) -> int:
    """The row function for a batch of images, into the rows of ``out`` (its batch form)."""
    return decode_rows(paths, out, size=size, color=color, dtype=dtype)  # type: ignore[arg-type]


# Set here, not by a decorator: _cached_image_folder_row's source is part of the entries' key.
_cached_image_folder_row.rows_into = _cached_image_folder_rows  # type: ignore[attr-defined]


def _wrapper(options: dict[str, Any]) -> CachedDataset[..., Any]:
    """The per-item wrapper for these cache options (made once per set of options)."""
    token = repr(sorted(options.items(), key=lambda item: item[0]))
    found = _WRAPPERS.get(token)
    if found is None:
        # The decoding code lives in images.py, not in the row function: a new version of
        # cachedload makes new entries.
        version = ("cached_image_folder", __version__, options.pop("version", None))
        checked = options_for("cached_image_folder", {**options, "version": version},
                              takes=_KEYWORDS, per_item="path", exclude=_EXCLUDE)  # fmt: skip
        if len(_WRAPPERS) > 16:
            _WRAPPERS.clear()
        found = _WRAPPERS[token] = CachedDataset(_cached_image_folder_row, checked)
    return found


def _extension_globs(extensions: Iterable[str]) -> list[str]:
    """Case-insensitive name globs (``*.[jJ][pP][gG]``) for the extensions."""
    return [
        "*." + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else f"[{c}]" for c in ext)
        for ext in sorted(extensions)
    ]


def cached_image_folder(
    root: str | os.PathLike[str],
    *,
    size: tuple[int, int] | None = None,
    color: Literal["rgb", "bgr", "gray", "unchanged"] = "rgb",
    dtype: npt.DTypeLike | None = None,
    extensions: Iterable[str] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    n_jobs: int | None = None,
    progress: bool | None = None,
    backend: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mmap_mode: Literal["r", "c"] | None = None,
    keep: int | None = 1,
    **cache_options: Any,
) -> ImageFolderData:
    """:func:`~cachedload.images.load_image_folder`, cached, incremental and out-of-core.

    Returns what ``load_image_folder(root, size=…, color=…, dtype=…, extensions=…,
    on_error=…)`` returns (the same pixels, labels, classes, paths and ``skipped``), from the
    cache when the folder did not change. When it did, only the added and changed images are
    decoded (and those skipped before, tried again); the other rows are copied from the
    previous entry, which ``keep`` then removes. A miss writes the rows into the entry as they
    are decoded, so a folder larger than RAM builds (read it with ``mmap_mode="r"``).

    Args:
        root: the folder (flat, or one sub-folder per class, as for ``load_image_folder``).
        size, color, dtype, extensions: as for ``load_image_folder``.
        on_error: ``"raise"`` at an unreadable image, or ``"skip"`` them: they are left out,
            ``skipped`` lists them, and the call warns with an ``ImagesSkippedWarning``
            naming them with their reasons (the first ten), as every later hit does; they are
            tried again on the next miss.
        n_jobs, backend: workers (``None`` or an int >= 1) and joblib backend of a build
            (default: threads on every CPU, or the active ``joblib.parallel_config``, e.g. a
            Dask cluster).
        progress: a tqdm bar on stderr during a build (never on a hit); ``None``: if stderr
            is a terminal and the build is slow.
        cache_dir, mmap_mode, keep: as for :func:`cachedload.cached_dataset`.
        cache_options: any other option of :func:`cachedload.cached_dataset` (``max_size``,
            ``lock_timeout``, ``version``…).

    Raises:
        NoImagesFoundError: ``root`` is missing, not a folder, or holds no (readable) image.
        ImageReadError: images are unreadable, truncated or corrupt (``on_error="raise"``): it
            names them all (the first ten in its message).
        ItemShapeMismatchError: images differ in shape (no ``size``) or channel count.
        ConfigurationError: an option has an invalid value.

    Example::

        data = cached_image_folder("data/train", size=(128, 128), mmap_mode="r")
        data.images, data.labels, data.classes, data.paths
    """
    plan = _plan(root, size=size, color=color, dtype=dtype, extensions=extensions,
                 on_error=on_error, n_jobs=n_jobs, progress=progress, backend=backend,
                 cache_dir=cache_dir, mmap_mode=mmap_mode, keep=keep, **cache_options)  # fmt: skip
    try:
        with opencv_threads_off():  # it serialises concurrent callers (see images.py)
            found = ItemMap(plan.loader, "cached_image_folder")(plan.folder, **plan.arguments)
    except ImageReadError as error:
        if not plan.arguments["skip"]:
            raise _every_unreadable(plan, error) from None
        # Skipping, .map raises only when every image was skipped (there is no row).
        raise NoImagesFoundError(plan.folder, "none of its image files is readable") from error
    except ItemShapeMismatchError as error:
        raise _mismatch(error, resized=plan.arguments["size"] is not None) from None
    return _folder_data(plan, found)


def cache_path(root: str | os.PathLike[str], **options: Any) -> Path:
    """The entry folder where ``cached_image_folder(root, **options)`` is (or would be)
    stored, as :meth:`cachedload.CachedDataset.cache_path` says it for a loader."""
    plan = _plan(root, **options)
    return ItemMap(plan.loader).cache_path(plan.folder, **plan.arguments)


def load_entry(
    entry: str | os.PathLike[str], root: str | os.PathLike[str], **options: Any
) -> ImageFolderData:
    """What ``cached_image_folder(root, **options)`` stored in the entry folder ``entry``,
    without looking at the images (as :meth:`cachedload.CachedDataset.load_entry`): a worker
    handed an entry serves that one, even if the folder changed meanwhile.

    Raises:
        FileNotFoundError: no such entry (deleted since, e.g. by ``keep=``).
        OSError: the entry is damaged.
    """
    plan = _plan(root, **options)
    return _folder_data(plan, ItemMap(plan.loader).load_entry(entry))


@dataclass(frozen=True)
class _Plan:
    """A ``cached_image_folder`` call checked: the per-item wrapper, the folder and the
    ``.map`` arguments."""

    loader: CachedDataset[..., Any]
    folder: str
    arguments: dict[str, Any]
    extensions: tuple[str, ...]  # sorted, as messages name them


def _plan(
    root: str | os.PathLike[str],
    *,
    size: tuple[int, int] | None = None,
    color: Literal["rgb", "bgr", "gray", "unchanged"] = "rgb",
    dtype: npt.DTypeLike | None = None,
    extensions: Iterable[str] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    n_jobs: int | None = None,
    progress: bool | None = None,
    backend: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mmap_mode: Literal["r", "c"] | None = None,
    keep: int | None = 1,
    **cache_options: Any,
) -> _Plan:
    """Check ``cached_image_folder``'s arguments (its signature) into a :class:`_Plan`."""
    out_size, out_dtype, exts = check_options(size, color, dtype, extensions, on_error, n_jobs)
    folder = os.fspath(root)
    if not os.path.isdir(folder):
        reason = "it is not a folder" if os.path.exists(folder) else "the folder does not exist"
        raise NoImagesFoundError(folder, reason)
    loader = _wrapper({"cache_dir": cache_dir, "mmap_mode": mmap_mode, "keep": keep,
                       **cache_options})  # fmt: skip
    arguments = {
        "pattern": _extension_globs(exts),
        "n_jobs": n_jobs,
        "backend": backend,
        "skip": (ImageReadError,) if on_error == "skip" else (),
        "progress": progress,
        "size": out_size,
        "color": color,
        "dtype": None if out_dtype is None else out_dtype.str,
    }
    return _Plan(loader, folder, arguments, tuple(sorted(exts)))


def _folder_data(plan: _Plan, found: ItemArray) -> ImageFolderData:
    """The ``ImageFolderData`` of a ``.map`` result: rows in path-component order, labels
    from the class folders."""
    paths: tuple[str, ...] = found.paths
    if not paths:
        raise NoImagesFoundError(
            plan.folder, f"no {', '.join(plan.extensions)} file in it or below"
        )
    skipped = _skipped(found.skipped)
    images = found.array
    # load_image_folder sorts by path component ("a/b" before "a-c/d"); the rows are sorted
    # by path. They differ only where a name sorts before "/": reorder (in memory) only then.
    # With "/" as "\0" (below any character of a name), plain string order is that order: one
    # replace per path and a check that is linear when already sorted (a hit does this).
    keys = [p.replace("/", "\0") for p in paths]
    if keys != sorted(keys):
        order = sorted(range(len(paths)), key=keys.__getitem__)
        images, paths = np.asarray(images)[order], tuple(paths[i] for i in order)
    labels = None
    classes: tuple[str, ...] = ()
    blocks = _class_blocks(paths)
    # The layout (flat or classes) and the classes count the skipped images too, as
    # load_image_folder's do: they come from the folder, not from what was readable.
    if blocks is not None and all("/" in p for p in skipped):
        tops = [name for name, _ in blocks]
        classes = tuple(sorted({*tops, *(p.split("/", 1)[0] for p in skipped)}))
        index = {name: i for i, name in enumerate(classes)}
        labels = np.repeat(
            np.array([index[name] for name in tops], np.int64),
            np.diff([start for _, start in blocks] + [len(paths)]),
        )
    return ImageFolderData(images, labels, classes, paths, skipped)


def _every_unreadable(plan: _Plan, first: ImageReadError) -> ImageReadError:
    """The error naming every unreadable image of the folder, not only the one the build
    stopped at: one decoding pass over the images (the build failed: nothing was stored), so
    that one run shows all there is to fix, as ``load_image_folder`` does."""
    arguments = plan.arguments
    try:
        files = image_files(plan.folder, plan.extensions)
    except NoImagesFoundError:  # the folder went away meanwhile
        return unreadable_error([first])
    found = unreadable_images(files, size=arguments["size"], color=arguments["color"],
                              n_jobs=arguments["n_jobs"])  # fmt: skip
    return unreadable_error(found or [first])


# Its own keywords, which an unknown keyword's error lists with the cache options.
_KEYWORDS = tuple(
    parameter.name
    for parameter in inspect.signature(cached_image_folder).parameters.values()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def _class_blocks(paths: Sequence[str]) -> list[tuple[str, int]] | None:
    """Each class folder's name and first row, in row order; ``None`` if an image lies in the
    folder itself (a flat folder: no classes).

    The rows are in path-component order, so each class folder's images are one run of rows:
    a binary search finds where each run ends (a hit does this; it costs per class, not per
    image).
    """
    blocks: list[tuple[str, int]] = []
    start = 0
    while start < len(paths):
        top, slash, _ = paths[start].partition("/")
        if not slash:
            return None
        prefix = top + "/"
        low, high = start + 1, len(paths)
        while low < high:  # the first row past the run of paths under prefix
            middle = (low + high) // 2
            if paths[middle].startswith(prefix):
                low = middle + 1
            else:
                high = middle
        blocks.append((top, start))
        start = low
    return blocks


def _mismatch(error: ItemShapeMismatchError, resized: bool) -> Exception:
    """The per-item loader's mismatch as load_image_folder words it (the option that fixes
    it), still an ``ItemShapeMismatchError`` (paths relative to the folder, as rows' are)."""
    return FolderImagesMismatchError(
        error.first, error.first_shape, _dtype_name(error.first_dtype),
        error.second, error.second_shape, _dtype_name(error.second_dtype), resized,
    )  # fmt: skip


def _dtype_name(dtype: str) -> str:
    try:
        name: str = np.dtype(dtype).name
        return name
    except TypeError:
        return dtype


def _skipped(found: Any) -> tuple[str, ...]:
    """The skipped images' paths (as read from the entry: checked), in load_image_folder's
    order (by path component)."""
    if not isinstance(found, tuple) or not all(isinstance(p, str) for p in found):
        return ()
    return tuple(sorted(found, key=lambda p: p.split("/")))
