"""cachedload: cache slow dataset loaders on disk, keyed by a fingerprint of their sources.

>>> from cachedload import cached_dataset
>>> @cached_dataset
... def load_images(image_dir, size=(128, 128)):
...     ...

The first call runs the loader and stores its result; later calls — in this process or any
later one — restore it in milliseconds, and recompute whenever a source file, a parameter or the
loader's code changes.

What is exported (``__all__``): the decorator and its wrapper; the cache-management functions
:func:`list_entries`, :func:`prune` and :func:`verify` with the records they return (the
functions behind ``cachedload ls / prune / verify``; ``verify`` here is that function, not the
decorator's ``verify=`` option); :func:`fingerprint_source`; the image loaders
(:func:`load_image_folder`, and :func:`cached_image_folder` built on per-item loaders, whose
result is an :class:`ItemArray`); and the errors and
warnings any cached call or management function can raise (a per-item loader's
:class:`ItemShapeMismatchError`, :class:`UnsafeCacheWarning` for a cache directory another user
can write, :class:`NotACacheDirectoryError` from ``prune`` pointed at a folder that is not a
cache, :class:`ReadOnlyCacheError` at one that cannot be written). The image loaders' own
errors (``ImageReadError``, ``ImageShapeMismatchError``, ``FolderImagesMismatchError``,
``NoImagesFoundError``, ``ImagesSkippedWarning``; defined in :mod:`cachedload.errors`, the
first four re-exported by :mod:`cachedload.images`) are importable from here too, outside
``__all__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cachedload._version import __version__
from cachedload.builder import ItemArray
from cachedload.cache import Cache
from cachedload.config import default_cache_dir
from cachedload.decorator import CachedDataset, CacheInfo, cached_dataset
from cachedload.errors import (
    CachedloadError,
    CacheStoreWarning,
    CacheWarning,
    ConditionalWritesWarning,
    ConfigurationError,
    CorruptEntryWarning,
    ItemShapeMismatchError,
    NotACacheDirectoryError,
    ReadOnlyCacheError,
    SourceChangedWarning,
    SourceNotFoundError,
    UnhashableArgumentError,
    UnsafeCacheWarning,
)
from cachedload.explain import Explanation
from cachedload.fingerprint import Fingerprint, fingerprint_source
from cachedload.manage import EntryRecord, PruneReport, VerifyResult, list_entries, prune, verify

if TYPE_CHECKING:
    from cachedload.errors import ImageReadError as ImageReadError
    from cachedload.errors import ImageShapeMismatchError as ImageShapeMismatchError
    from cachedload.errors import ImagesSkippedWarning as ImagesSkippedWarning
    from cachedload.errors import NoImagesFoundError as NoImagesFoundError
    from cachedload.image_folder import cached_image_folder
    from cachedload.images import ImageFolderData, load_image_folder

__all__ = [
    "Cache",
    "CacheInfo",
    "CacheStoreWarning",
    "CacheWarning",
    "CachedDataset",
    "CachedloadError",
    "ConditionalWritesWarning",
    "ConfigurationError",
    "CorruptEntryWarning",
    "EntryRecord",
    "Explanation",
    "Fingerprint",
    "ImageFolderData",
    "ItemArray",
    "ItemShapeMismatchError",
    "NotACacheDirectoryError",
    "PruneReport",
    "ReadOnlyCacheError",
    "SourceChangedWarning",
    "SourceNotFoundError",
    "UnhashableArgumentError",
    "UnsafeCacheWarning",
    "VerifyResult",
    "__version__",
    "cached_dataset",
    "cached_image_folder",
    "default_cache_dir",
    "fingerprint_source",
    "list_entries",
    "load_image_folder",
    "prune",
    "verify",
]

_LAZY = {
    "load_image_folder": "cachedload.images",
    "cached_image_folder": "cachedload.image_folder",
    "ImageFolderData": "cachedload.images",
    # The image loader's errors, outside __all__: errors.py is loaded already, OpenCV is not.
    "FolderImagesMismatchError": "cachedload.errors",
    "ImageReadError": "cachedload.errors",
    "ImageShapeMismatchError": "cachedload.errors",
    "ImagesSkippedWarning": "cachedload.errors",
    "NoImagesFoundError": "cachedload.errors",
}


def __getattr__(name: str) -> Any:
    # OpenCV and tqdm are imported only when image loading is used: the hit path never needs
    # them, and `import cachedload` stays as cheap as importing numpy and joblib.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachedload' has no attribute {name!r}")
