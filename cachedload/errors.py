"""The exception and warning classes of cachedload.

Every exception derives from :class:`CachedloadError` *and* from the built-in a user would
naturally catch (``FileNotFoundError``, ``TypeError``, ``OSError``, ``ValueError``), carries the
parameter or path at fault as attributes, and pickles (so it crosses process pools intact).
Recoverable problems are warnings derived from :class:`CacheWarning`.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CacheStoreWarning",
    "CacheWarning",
    "CachedloadError",
    "ConditionalWritesWarning",
    "ConfigurationError",
    "CorruptEntryWarning",
    "FolderImagesMismatchError",
    "ImageReadError",
    "ImageShapeMismatchError",
    "ImagesSkippedWarning",
    "ItemShapeMismatchError",
    "NoImagesFoundError",
    "NotACacheDirectoryError",
    "SourceChangedWarning",
    "SourceNotFoundError",
    "UnhashableArgumentError",
    "UnsafeCacheWarning",
    "warn_at_caller",
    "warn_skipped",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIPPED_SHOWN = 10  # files named by a skip warning (the result's .skipped has them all)
_SKIPPED_CHARS = 200  # of each name and reason shown (read back from an entry: untrusted)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """Warn, attributed to the first frame outside cachedload: the user's call."""
    level = 2  # 1 would be this function; 2 is its caller
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)


def warn_skipped(called: str, skipped: Sequence[tuple[str, str | None]], *, cached: bool) -> None:
    """Warn (:class:`ImagesSkippedWarning`, at the user's call) that ``called`` (what the user
    called: ``cached_image_folder('/data')``) left out the files ``skipped`` (relative path,
    reason or None), as its miss does (``cached=False``) and every later hit (``cached=True``):
    both read alike. Names the first ``_SKIPPED_SHOWN``, each cut to ``_SKIPPED_CHARS``."""
    listing = "; ".join(
        _shown(path) if reason is None else f"{_shown(path)} ({_shown(reason)})"
        for path, reason in skipped[:_SKIPPED_SHOWN]
    )
    if len(skipped) > _SKIPPED_SHOWN:
        listing += f"; and {len(skipped) - _SKIPPED_SHOWN} more (the result's .skipped names all)"
    count = f"{len(skipped)} unreadable file(s)"
    if cached:
        message = (
            f"cachedload: {called} returns a cached result that leaves out {count}, "
            f"skipped when it was computed: {listing}"
        )
    else:
        message = f"cachedload: {called} skipped {count}: {listing}"
    warn_at_caller(message, ImagesSkippedWarning)


def _shown(text: str) -> str:
    """``text`` for a warning: control characters escaped (it may come from a crafted entry,
    and a terminal would obey them), cut to ``_SKIPPED_CHARS``."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= _SKIPPED_CHARS else text[: _SKIPPED_CHARS - 1] + "…"


class CachedloadError(Exception):
    """Base class of every exception raised by cachedload itself.

    Exceptions raised by the user's own loader body are never wrapped: they pass through
    unchanged.
    """


class ConfigurationError(CachedloadError, ValueError):
    """An option given to :func:`cachedload.cached_dataset` (or a helper) is invalid.

    Attributes:
        option: the name of the offending option.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.option, self.message))


class NotACacheDirectoryError(ConfigurationError):
    """A management command or function was pointed at a folder that cachedload did not make:
    nothing under a folder without a ``CACHEDIR.TAG`` is ever deleted.

    Attributes:
        path: the folder.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        super().__init__(
            "cache_dir", f"{self.path} is not a cachedload cache directory (no CACHEDIR.TAG)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path,))


class ReadOnlyCacheError(ConfigurationError, OSError):
    """A management command or function was asked to delete from a cache directory that
    cannot be written (a read-only mount, or no write permission): nothing is deleted.

    ``except OSError`` catches it too.

    Attributes:
        path: the cache directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        super().__init__("cache_dir", f"{self.path} is read-only: nothing is deleted")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path,))


class SourceNotFoundError(CachedloadError, FileNotFoundError):
    """A source path given to a cached loader does not exist.

    Raised before the loader body runs. ``except FileNotFoundError`` catches it.

    Attributes:
        parameter: the loader parameter that named the path.
        path: the missing path, as given.
    """

    def __init__(self, parameter: str, path: str | os.PathLike[str]) -> None:
        self.parameter = parameter
        self.path = os.fspath(path)
        super().__init__(
            2,  # ENOENT, so errno/strerror look like the built-in's
            f"source {parameter!r} does not exist: {self.path!r}",
            self.path,
        )

    def __str__(self) -> str:
        return f"source {self.parameter!r} does not exist: {self.path!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.parameter, self.path))


class UnhashableArgumentError(CachedloadError, TypeError):
    """An argument of a cached loader cannot be turned into a stable cache key.

    Attributes:
        parameter: the loader parameter whose value could not be hashed.
        reason: why (usually the underlying pickling error).
    """

    def __init__(self, parameter: str, reason: str) -> None:
        self.parameter = parameter
        self.reason = reason
        super().__init__(
            f"cannot hash argument {parameter!r} for the cache key: {reason}. "
            f"If it does not change the result, leave it out of the key with "
            f"ignore=[{parameter!r}]."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.parameter, self.reason))


class ImageReadError(CachedloadError, OSError):
    """An image file could not be read or decoded (truncated, corrupt, empty, denied).

    Raised for a folder (``on_error="raise"``), it names every unreadable image: the first
    in ``path`` and ``reason``, the others in ``others``, and says how to leave them out.

    Attributes:
        path: the file at fault (the first of them, for a folder).
        reason: what went wrong.
        others: the folder's other unreadable files, ``(path, reason)`` pairs, in order.
        remedy: what to do about it, as the message ends (empty: nothing said).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reason: str,
        others: Sequence[tuple[str, str]] = (),
        remedy: str = "",
    ) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.others = tuple((os.fspath(p), r) for p, r in others)
        self.remedy = remedy
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.others:
            listed = [(self.path, self.reason), *self.others]
            named = ", ".join(f"{p!r} ({r})" for p, r in listed[:_LISTED])
            more = f", and {len(listed) - _LISTED} more" if len(listed) > _LISTED else ""
            message = f"cannot read {len(listed)} images: {named}{more}"
        else:
            message = f"cannot read image {self.path!r}: {self.reason}"
        return f"{message}; {self.remedy}" if self.remedy else message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason, self.others, self.remedy))


_LISTED = 10  # files an ImageReadError names; then how many more


class NoImagesFoundError(CachedloadError, FileNotFoundError):
    """A folder given to :func:`cachedload.load_image_folder` holds no image files.

    Attributes:
        path: the folder.
        reason: what was looked for.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(2, f"no images in {self.path!r}: {reason}", self.path)

    def __str__(self) -> str:
        return f"no images in {self.path!r}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


class ImageShapeMismatchError(CachedloadError, ValueError):
    """Images of different shapes cannot be stacked: they differ in height/width (no ``size=``
    to resize them) or in channel count (``color="unchanged"`` on mixed gray/RGB/RGBA files).

    The message says which, and the option that fixes it.

    Attributes:
        first, second: two files whose shapes differ.
        first_shape, second_shape: their decoded shapes.
        resized: whether ``size=`` was given (then only the channel count must agree).
    """

    def __init__(self, first: str, first_shape: tuple[int, ...], second: str,
                 second_shape: tuple[int, ...], resized: bool = False) -> None:  # fmt: skip
        self.first, self.first_shape = first, tuple(first_shape)
        self.second, self.second_shape = second, tuple(second_shape)
        self.resized = resized
        problems = []
        channels = [1 if len(s) < 3 else s[2] for s in (self.first_shape, self.second_shape)]
        if channels[0] != channels[1]:
            problems.append(
                f'in channels ({channels[0]} vs {channels[1]}): pass color="rgb" or '
                f'color="gray" to convert every image to one channel count'
            )
        if not resized and self.first_shape[:2] != self.second_shape[:2]:
            problems.append(
                f"in height/width ({self.first_shape[:2]} vs {self.second_shape[:2]}): pass "
                "size=(height, width) to resize them to one shape"
            )
        if not problems:  # e.g. (H, W) against (H, W, 1)
            problems.append("in their number of dimensions")
        super().__init__(
            f"images differ in shape: {first!r} is {self.first_shape}, {second!r} is "
            f"{self.second_shape}; they differ " + "; and ".join(problems)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.first, self.first_shape, self.second, self.second_shape, self.resized),
        )


class ItemShapeMismatchError(CachedloadError, ValueError):
    """A per-item loader returned rows of different shapes or dtypes, which cannot be stacked.

    Pass ``ragged=True`` for a list of rows instead of one array.

    Attributes:
        first, second: two files whose rows differ.
        first_shape, second_shape: their rows' shapes.
        first_dtype, second_dtype: their rows' dtypes (as strings).
    """

    def __init__(self, first: str, first_shape: tuple[int, ...], first_dtype: str, second: str,
                 second_shape: tuple[int, ...], second_dtype: str) -> None:  # fmt: skip
        self.first, self.first_shape, self.first_dtype = first, tuple(first_shape), first_dtype
        self.second, self.second_shape = second, tuple(second_shape)
        self.second_dtype = second_dtype
        super().__init__(
            f"items differ: {first!r} gave a row of shape {self.first_shape} {first_dtype}, "
            f"{second!r} one of shape {self.second_shape} {second_dtype}; rows must share one "
            f"shape and dtype to be stacked (or pass ragged=True for a list)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.first, self.first_shape, self.first_dtype)
        return (type(self), (*args, self.second, self.second_shape, self.second_dtype))


class FolderImagesMismatchError(ImageShapeMismatchError, ItemShapeMismatchError):
    """What :func:`~cachedload.cached_image_folder` raises when images cannot be stacked: the
    error :func:`~cachedload.load_image_folder` raises (naming the option that fixes it) and the
    per-item loader's (``ItemShapeMismatchError``, of which it has the dtypes), so that either
    ``except`` catches it.

    Unlike ``load_image_folder``, which converts every image to the first one's bit depth, a
    cached folder's rows are decoded one image at a time (so that one changed image costs one
    decode): images of several bit depths (``color="unchanged"``) need ``dtype=``.
    """

    def __init__(
        self,
        first: str,
        first_shape: tuple[int, ...],
        first_dtype: str,
        second: str,
        second_shape: tuple[int, ...],
        second_dtype: str,
        resized: bool,
    ) -> None:
        # Not super().__init__: the two bases take different arguments.
        as_image = ImageShapeMismatchError(first, first_shape, second, second_shape, resized)
        self.first, self.first_shape = as_image.first, as_image.first_shape
        self.second, self.second_shape = as_image.second, as_image.second_shape
        self.first_dtype, self.second_dtype, self.resized = first_dtype, second_dtype, resized
        n = 2 if resized else 0  # with a size, only the channels must agree
        if self.first_shape[n:] == self.second_shape[n:]:
            message = (
                f"images differ in bit depth: {first!r} decodes to {first_dtype}, {second!r} "
                f"to {second_dtype}; pass dtype= (e.g. dtype=np.float32) to convert every "
                "image to one type"
            )
        else:
            message = str(as_image)
        Exception.__init__(self, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.first, self.first_shape, self.first_dtype, self.second,
                             self.second_shape, self.second_dtype, self.resized))  # fmt: skip


class CacheWarning(UserWarning):
    """Base class of cachedload's warnings: something went wrong, but no data was lost."""


class CacheStoreWarning(CacheWarning):
    """Storing a result failed (read-only or full disk, permissions…); the result was returned."""


class ConditionalWritesWarning(CacheWarning):
    """A remote cache's server ignores conditional writes (``If-None-Match``), found on first use.

    Entries are still published safely (under unique names, metadata last), but processes on
    different machines may compute the same entry at the same time.
    """


class CorruptEntryWarning(CacheWarning):
    """A stored entry was damaged or unreadable; it is being recomputed and replaced."""


class UnsafeCacheWarning(CacheWarning):
    """A private cache directory is owned by another user or writable by others: it is neither
    read nor written (the loader runs); see the docs' "Security" page."""


class SourceChangedWarning(CacheWarning):
    """Source files changed while the loader ran, so its result was returned but not stored."""


class ImagesSkippedWarning(CacheWarning):
    """``load_image_folder(on_error="skip")`` skipped unreadable images (all named), or
    ``cached_image_folder``/``loader.map(skip=...)`` left out files."""


class UnsafePickleError(CachedloadError, pickle.UnpicklingError):
    """A restricted load met something it does not allow; nothing it names has run.

    Raised while loading an entry of a shared cache (or with ``safe_types=``): the data names
    a global outside the allow list (``os.system``, a class not in ``safe_types``…), or is in
    a format that cannot be loaded safely. ``except pickle.UnpicklingError`` catches it.

    Attributes:
        name: what was refused, e.g. ``"os.system"``.
        reason: why.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(
            f"refused to load {name}: {reason} (list trusted classes in safe_types=, or sign "
            f"the cache's entries with a key)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.reason))
