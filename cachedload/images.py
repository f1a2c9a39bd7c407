"""Read a folder of images into one numpy array with OpenCV, in parallel threads.

The entry point is :func:`load_image_folder`; it returns an :class:`ImageFolderData`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import threading
import time
import warnings
from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cachedload.errors import (
    ConfigurationError,
    ImageReadError,
    ImageShapeMismatchError,
    ImagesSkippedWarning,
    NoImagesFoundError,
)

__all__ = ["ImageFolderData", "load_image_folder"]

_log = logging.getLogger("cachedload")

_DEFAULT_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp")
_JUNK = frozenset({"__pycache__", "__MACOSX", "Thumbs.db", "desktop.ini"})
_COLORS = ("rgb", "bgr", "gray", "unchanged")
_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.float32, np.float64))
# IMREAD_COLOR_RGB (OpenCV >= 4.10) swaps channels inside the decoder, for free.
_RGB_FLAG: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)
_BASE_FLAGS = {
    "rgb": cv2.IMREAD_COLOR if _RGB_FLAG is None else _RGB_FLAG,
    "bgr": cv2.IMREAD_COLOR,
    "gray": cv2.IMREAD_GRAYSCALE,
    "unchanged": cv2.IMREAD_UNCHANGED,
}
# Flag bits asking libjpeg to decode at 1/2, 1/4, 1/8 scale (IMREAD_REDUCED_GRAYSCALE_<n>).
_REDUCED_BITS = {2: 16, 4: 32, 8: 64}
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageFolderData(NamedTuple):
    """What :func:`load_image_folder` returns.

    Attributes:
        images: ``(N, H, W, C)`` array, or ``(N, H, W)`` for grayscale images.
        labels: ``int64`` array of ``N`` indices into ``classes``, or ``None`` for a flat folder.
        classes: sorted class (sub-folder) names; empty for a flat folder.
        paths: each image's path relative to the root, with ``/`` separators, in row order.
    """

    images: npt.NDArray[Any]
    labels: npt.NDArray[np.int64] | None
    classes: tuple[str, ...]
    paths: tuple[str, ...]


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    size: tuple[int, int] | None = None,
    color: Literal["rgb", "bgr", "gray", "unchanged"] = "rgb",
    dtype: npt.DTypeLike | None = None,
    extensions: Iterable[str] | None = None,
    n_jobs: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool | None = None,
) -> ImageFolderData:
    """Decode every image under ``root`` into one preallocated array, in sorted path order.

    Layout: if ``root`` holds image files directly, it is a *flat* folder: every image below it
    (recursively) is loaded, ``labels`` is ``None`` and ``classes`` is empty. Otherwise each
    sub-folder that contains images (at any depth) is a *class*: ``classes`` are their sorted
    names and ``labels[i]`` indexes the top-level folder of ``paths[i]``. Hidden files and
    folders (``.*``), ``__pycache__``, ``__MACOSX``, ``Thumbs.db`` and ``desktop.ini`` are ignored.

    Args:
        root: the folder.
        size: ``(height, width)`` to resize every image to (aspect ratio is not kept;
            ``INTER_AREA`` when shrinking both sides, else ``INTER_LINEAR``). ``None`` keeps
            the decoded size, which must then be the same for all images.
        color: ``"rgb"`` (default), ``"bgr"`` (OpenCV's order), ``"gray"``, or ``"unchanged"``:
            the file's channels (alpha kept, as RGBA) and depth (16-bit kept).
        dtype: ``None`` keeps the decoded depth (``uint8``; ``uint16`` for 16-bit files read
            with ``"unchanged"``). ``np.float32``/``np.float64`` scale to ``[0, 1]`` by the
            source depth's maximum (255 or 65535); ``np.uint8``/``np.uint16`` rescale.
        extensions: file extensions to load, case-insensitive, with or without the dot.
            Default: png, jpg, jpeg, bmp, tif, tiff, webp.
        n_jobs: decoding threads (OpenCV releases the GIL). Default: the usable CPU count;
            ``1`` decodes in the calling thread.
        on_error: ``"raise"`` on the first unreadable image, or ``"skip"`` them all and emit
            one :class:`~cachedload.errors.ImagesSkippedWarning` naming every skipped file.
        progress: show a tqdm bar on stderr. ``None``: only if stderr is a terminal and the
            load takes over a second.

    Returns:
        An :class:`ImageFolderData` ``(images, labels, classes, paths)``.

    Raises:
        NoImagesFoundError: ``root`` is missing, not a folder, or holds no image.
        ImageReadError: an image is unreadable, empty or corrupt (``on_error="raise"``).
        ImageShapeMismatchError: two images decode to different shapes (no ``size``),
            or to different channel counts.
        ConfigurationError: an option has an invalid value.

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``IMREAD_REDUCED_*``) when that
    is still at least ``size``, then ``INTER_AREA``-resized the rest of the way: decoding
    gets several times cheaper, and the result differs from a full decode + ``INTER_AREA``
    by well under 1 grey level on average (see ``benchmarks/bench_images.py``). Files
    are read with ``open()`` and decoded with ``cv2.imdecode``, so non-ASCII paths work.

    Example:
        >>> data = load_image_folder("data/train", size=(64, 64))  # doctest: +SKIP
        >>> data.images.shape, data.classes, data.labels[:3]  # doctest: +SKIP
        ((1200, 64, 64, 3), ('cat', 'dog'), array([0, 0, 0]))
    """
    start = time.perf_counter()
    root_str = os.fspath(root)
    size, out_dtype, exts, jobs = _check_options(size, color, dtype, extensions, n_jobs)
    if on_error not in ("raise", "skip"):
        raise ConfigurationError("on_error", f"must be 'raise' or 'skip', not {on_error!r}")
    if progress not in (None, True, False):
        raise ConfigurationError("progress", f"must be None, True or False, not {progress!r}")
    paths, classes = _scan(root_str, exts)
    files = [os.path.join(root_str, p) for p in paths]
    decoder = _Decoder(color, size)
    images, skipped = _decode_all(files, decoder, out_dtype, jobs, on_error, progress, root_str)
    if skipped:
        warnings.warn(
            ImagesSkippedWarning(
                f"skipped {len(skipped)} unreadable image(s) under {root_str!r}: "
                + "; ".join(f"{paths[i]} ({err.reason})" for i, err in skipped)
            ),
            stacklevel=2,
        )
        bad = {i for i, _ in skipped}
        paths = [p for i, p in enumerate(paths) if i not in bad]
    labels = None
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[p.split("/", 1)[0]] for p in paths], dtype=np.int64)
    _log.debug(
        "load_image_folder %s: %s images %s %s, %s skipped, %s threads, %.3f s",
        root_str, len(paths), images.shape[1:], images.dtype, len(skipped), jobs,
        time.perf_counter() - start,
    )  # fmt: skip
    return ImageFolderData(images, labels, classes, tuple(paths))


def _check_options(
    size: Any, color: Any, dtype: Any, extensions: Any, n_jobs: Any
) -> tuple[tuple[int, int] | None, np.dtype[Any] | None, frozenset[str], int]:
    if size is not None:
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
            or min(size) < 1
        ):
            raise ConfigurationError("size", f"must be (height, width) positive ints, not {size!r}")
        size = (int(size[0]), int(size[1]))
    if color not in _COLORS:
        raise ConfigurationError("color", f"must be one of {_COLORS}, not {color!r}")
    out_dtype = None
    if dtype is not None:
        try:
            out_dtype = np.dtype(dtype)
        except TypeError:
            out_dtype = None
        if out_dtype not in _DTYPES:
            names = ", ".join(d.name for d in _DTYPES)
            raise ConfigurationError("dtype", f"must be None or one of {names}, not {dtype!r}")
    if extensions is None:
        extensions = _DEFAULT_EXTENSIONS
    elif isinstance(extensions, str):
        extensions = (extensions,)
    extensions = list(extensions)
    if not extensions or not all(isinstance(e, str) and e.strip(".") for e in extensions):
        raise ConfigurationError("extensions", f"must be non-empty strings, not {extensions!r}")
    exts = frozenset(e.lower().lstrip(".") for e in extensions)
    if n_jobs is None:
        n_jobs = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    elif not isinstance(n_jobs, (int, np.integer)) or isinstance(n_jobs, bool) or n_jobs < 1:
        raise ConfigurationError("n_jobs", f"must be None or a positive int, not {n_jobs!r}")
    return size, out_dtype, exts, int(n_jobs)


def _scan(root: str, exts: frozenset[str]) -> tuple[list[str], tuple[str, ...]]:
    """Return the sorted relative POSIX paths of the images under root, and the class names."""
    if not os.path.exists(root):
        raise NoImagesFoundError(root, "the folder does not exist")
    if not os.path.isdir(root):
        raise NoImagesFoundError(root, "it is not a folder")
    visited = {os.path.realpath(root)}
    files, dirs = _list(root, exts)
    found = [f for d in dirs for f in _walk(os.path.join(root, d), d, exts, visited)]
    if not files and not found:
        looked = ", ".join(sorted(exts))
        raise NoImagesFoundError(root, f"no files with extension {looked} in it or below")
    classes: tuple[str, ...] = ()
    if files:  # flat layout
        paths = files + found
    else:
        paths = found
        classes = tuple(sorted({p.split("/", 1)[0] for p in paths}))
    paths.sort(key=lambda p: p.split("/"))  # component-wise, so each folder stays contiguous
    return paths, classes


def _list(folder: str, exts: frozenset[str]) -> tuple[list[str], list[str]]:
    """Names of the image files and of the sub-folders in folder, junk left out."""
    files, dirs = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name in _JUNK:
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif os.path.splitext(entry.name)[1][1:].lower() in exts and entry.is_file():
                files.append(entry.name)
    return files, dirs


def _walk(folder: str, prefix: str, exts: frozenset[str], visited: set[str]) -> list[str]:
    real = os.path.realpath(folder)
    if real in visited:  # a symlink loop, or a folder linked twice
        return []
    visited.add(real)
    files, dirs = _list(folder, exts)
    out = [f"{prefix}/{f}" for f in files]
    for d in dirs:
        out += _walk(os.path.join(folder, d), f"{prefix}/{d}", exts, visited)
    return out


class _Decoder:
    """Reads, decodes and converts one image; puts it into a row of the output array."""

    def __init__(self, color: str, size: tuple[int, int] | None) -> None:
        self.color = color
        self.size = size
        self.first = ("", (0,))  # (path, decoded shape) of the image that fixed the shape
        self.to_rgb = color == "unchanged" or (color == "rgb" and _RGB_FLAG is None)

    def decode(self, path: str) -> npt.NDArray[Any]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ImageReadError(path, exc.strerror or str(exc)) from exc
        if not data:
            raise ImageReadError(path, "the file is empty")
        flags = _BASE_FLAGS[self.color]
        size = self.size
        if size is not None and (factor := self._reduction(data, size)) > 1:
            img = self._imdecode(path, data, _REDUCED_BITS[factor] | flags)
            # EXIF rotation can swap the sides; then the shortcut is too small, so redo it.
            if img.shape[0] < size[0] or img.shape[1] < size[1]:
                img = self._imdecode(path, data, flags)
        else:
            img = self._imdecode(path, data, flags)
        if self.to_rgb and img.ndim == 3:
            if img.shape[2] == 3:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            elif img.shape[2] == 4:
                img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
        return img

    def _imdecode(self, path: str, data: bytes, flags: int) -> npt.NDArray[Any]:
        try:
            img: npt.NDArray[Any] | None = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        except cv2.error as exc:
            raise ImageReadError(path, f"OpenCV cannot decode it ({exc.err})") from exc
        if img is None or img.size == 0:
            raise ImageReadError(path, "corrupt, or not an image format OpenCV can decode")
        return img

    def _reduction(self, data: bytes, size: tuple[int, int]) -> int:
        """The largest JPEG scale-down factor that keeps the result close to a full decode.

        The factor must divide both sides: a partial 8x8 block at the edge would stretch the
        reduced image by a fraction of a pixel, which costs several grey levels on detailed
        photos. The reduced image must stay at least twice the target on each side, so the final
        INTER_AREA step averages away the difference between DCT scaling and a box filter.
        """
        if self.color == "unchanged" or data[:3] != b"\xff\xd8\xff":
            return 1
        dims = _jpeg_dims(data)
        if dims is None:
            return 1
        (h, w), (th, tw) = dims, size
        for factor in (8, 4, 2):
            if h % factor == w % factor == 0 and h // factor >= 2 * th and w // factor >= 2 * tw:
                return factor
        return 1

    def place(self, path: str, img: npt.NDArray[Any], dst: npt.NDArray[Any]) -> None:
        """Resize and convert img straight into dst (a row of the output array)."""
        first_path, first_shape = self.first
        n = 0 if self.size is None else 2  # with a size, only the channels must agree
        if img.shape[n:] != first_shape[n:]:
            raise ImageShapeMismatchError(first_path, first_shape, path, img.shape)
        if self.size is not None and img.shape[:2] != self.size:
            h, w = self.size
            shrink = img.shape[0] >= h and img.shape[1] >= w
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            if img.dtype == dst.dtype:
                out = cv2.resize(img, (w, h), dst=dst, interpolation=interp)
                if not np.may_share_memory(out, dst):  # OpenCV reallocated: never silently lose it
                    dst[...] = out
                return
            img = cv2.resize(img, (w, h), interpolation=interp)
        _convert_into(img, dst)


def _convert_into(img: npt.NDArray[Any], dst: npt.NDArray[Any]) -> None:
    if img.dtype == dst.dtype:
        np.copyto(dst, img)
        return
    src_max = np.iinfo(img.dtype).max if img.dtype.kind in "ui" else 1.0
    if dst.dtype.kind == "f":
        np.divide(img, dst.dtype.type(src_max), out=dst, casting="unsafe")
    else:
        dst_max = np.iinfo(dst.dtype).max
        np.copyto(dst, np.clip(np.rint(img * (dst_max / src_max)), 0, dst_max), casting="unsafe")


def _jpeg_dims(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame header, or None if not found."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF_MARKERS:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return height, width
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _decode_all(
    files: list[str],
    decoder: _Decoder,
    dtype: np.dtype[Any] | None,
    n_jobs: int,
    on_error: str,
    progress: bool | None,
    root: str,
) -> tuple[npt.NDArray[Any], list[tuple[int, ImageReadError]]]:
    """Decode files into one array; return it and the (index, error) of skipped files."""
    skipped: list[tuple[int, ImageReadError]] = []
    auto = progress is None
    bar = tqdm(
        total=len(files), desc="Loading images", unit="img", delay=1.0 if auto else 0.0,
        disable=not sys.stderr.isatty() if auto else not progress,
    )  # fmt: skip
    with bar:
        # Decode in order until one image succeeds: it fixes the output's shape and dtype.
        for first, path in enumerate(files):
            try:
                img = decoder.decode(path)
                break
            except ImageReadError as err:
                if on_error == "raise":
                    raise
                skipped.append((first, err))
                bar.update()
        else:
            raise NoImagesFoundError(root, f"none of the {len(files)} image files is readable")
        shape = img.shape if decoder.size is None else decoder.size + img.shape[2:]
        images = np.empty((len(files), *shape), dtype=dtype or img.dtype)
        decoder.first = (path, img.shape)
        decoder.place(path, img, images[first])
        bar.update()

        def work(chunk: range) -> list[tuple[int, ImageReadError]]:
            errors = []
            for i in chunk:
                try:
                    decoder.place(files[i], decoder.decode(files[i]), images[i])
                except ImageReadError as err:
                    errors.append((i, err))
                    if on_error == "raise":
                        break
            return errors

        rest = len(files) - first - 1
        step = max(1, min(32, rest // (n_jobs * 4)))
        chunks = [range(i, min(i + step, len(files))) for i in range(first + 1, len(files), step)]
        with contextlib.closing(_ordered_map(work, chunks, n_jobs)) as results:
            for chunk, errors in zip(chunks, results, strict=True):
                if errors and on_error == "raise":
                    raise errors[0][1]
                skipped += errors
                bar.update(len(chunk))
    if skipped:  # move the good rows up, in order; the tail is dropped by slicing
        good = sorted(set(range(len(files))) - {i for i, _ in skipped})
        for row, i in enumerate(good):
            if row != i:
                images[row] = images[i]
        images = images[: len(good)]
    return images, skipped


def _ordered_map(work: Any, chunks: list[range], n_jobs: int) -> Generator[Any, None, None]:
    """Yield work(chunk) for each chunk, in order, from n_jobs threads."""
    if n_jobs == 1 or len(chunks) <= 1:
        yield from map(work, chunks)
        return
    with _opencv_threads_off(), ThreadPoolExecutor(n_jobs, "cachedload-images") as pool:
        yield from pool.map(work, chunks)  # closing it cancels the chunks not started


_cv_lock = threading.Lock()
_cv_state = {"users": 0, "saved": 0}


@contextlib.contextmanager
def _opencv_threads_off() -> Generator[None, None, None]:
    """Switch OpenCV's internal thread pool off while our threads decode.

    Called from several threads at once, OpenCV's pool serialises them: two decoding threads
    ran slower than one (measured, OpenCV 5.0, 2 cores). Our pool already keeps every core busy.
    The setting is process-wide, so it is restored when the last concurrent load ends.
    """
    with _cv_lock:
        if _cv_state["users"] == 0:
            _cv_state["saved"] = cv2.getNumThreads()
            cv2.setNumThreads(1)
        _cv_state["users"] += 1
    try:
        yield
    finally:
        with _cv_lock:
            _cv_state["users"] -= 1
            if _cv_state["users"] == 0:
                cv2.setNumThreads(_cv_state["saved"])
