"""cachedload: cache slow dataset loaders on disk, keyed by a fingerprint of their sources.

>>> from cachedload import cached_dataset
>>> @cached_dataset
... def load_images(image_dir, size=(128, 128)):
...     ...

The first call runs the loader and stores its result; later calls — in this process or any
later one — restore it in milliseconds, and recompute whenever a source file, a parameter or the
loader's code changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from cachedload.config import default_cache_dir
from cachedload.decorator import CachedDataset, CacheInfo, cached_dataset
from cachedload.errors import (
    CachedloadError,
    CacheStoreWarning,
    CacheWarning,
    ConditionalWritesWarning,
    ConfigurationError,
    CorruptEntryWarning,
    ImageReadError,
    ImageShapeMismatchError,
    ImagesSkippedWarning,
    NoImagesFoundError,
    SourceChangedWarning,
    SourceNotFoundError,
    UnhashableArgumentError,
)
from cachedload.explain import Explanation
from cachedload.fingerprint import Fingerprint, fingerprint_source
from cachedload.manage import EntryRecord, list_entries

if TYPE_CHECKING:
    from cachedload.images import ImageFolderData, load_image_folder

__all__ = [
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
    "ImageReadError",
    "ImageShapeMismatchError",
    "ImagesSkippedWarning",
    "NoImagesFoundError",
    "SourceChangedWarning",
    "SourceNotFoundError",
    "UnhashableArgumentError",
    "__version__",
    "cached_dataset",
    "default_cache_dir",
    "fingerprint_source",
    "list_entries",
    "load_image_folder",
]

_LAZY = {"load_image_folder": "cachedload.images", "ImageFolderData": "cachedload.images"}


def __getattr__(name: str) -> Any:
    # OpenCV and tqdm are imported only when image loading is used: the hit path never needs
    # them, and `import cachedload` stays as cheap as importing numpy and joblib.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachedload' has no attribute {name!r}")
