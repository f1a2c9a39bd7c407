"""The public surface changes only on purpose, and the README's quick start runs."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cachedload
from cachedload import errors
from tests.conftest import REPO_ROOT, subprocess_env, write_images

PUBLIC_API = [
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


def test_all_is_pinned_and_sorted() -> None:
    assert cachedload.__all__ == PUBLIC_API  # change both on purpose, or neither
    assert cachedload.__all__ == sorted(cachedload.__all__)
    for name in cachedload.__all__:
        assert getattr(cachedload, name) is not None, name


def test_every_error_and_warning_class_is_importable_from_the_package() -> None:
    # A user filters a warning or catches an error by its class: none is reachable only
    # through cachedload.errors.
    classes = [n for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert classes and all(getattr(cachedload, name) is getattr(errors, name) for name in classes)


IMAGE_ERRORS = [
    "ImageReadError",
    "ImageShapeMismatchError",
    "ImagesSkippedWarning",
    "NoImagesFoundError",
]


@pytest.mark.parametrize("name", IMAGE_ERRORS)
def test_image_errors_are_importable_from_the_package_and_from_images(name: str) -> None:
    # Outside __all__ (they belong to the image loader), but code that imported them from
    # cachedload keeps working.
    assert name not in cachedload.__all__
    assert getattr(cachedload, name) is getattr(errors, name)
    images = pytest.importorskip("cachedload.images")
    assert name in images.__all__ and getattr(images, name) is getattr(errors, name)


def test_every_public_object_has_a_docstring() -> None:
    for name in cachedload.__all__:
        obj = getattr(cachedload, name)
        if callable(obj):
            assert obj.__doc__, name


def test_importing_does_not_pull_in_opencv_or_tqdm() -> None:
    lazy = ("cv2", "tqdm", "filelock", "platformdirs")
    code = f"import sys, cachedload; print(sorted(m for m in {lazy} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "error",
    [
        errors.SourceNotFoundError("image_dir", "/data/x"),
        errors.UnhashableArgumentError("lock", "cannot pickle"),
        errors.ConfigurationError("mmap_mode", "bad"),
        errors.ImageReadError("/x.png", "corrupt"),
        errors.NoImagesFoundError("/empty", "no files"),
        errors.ImageShapeMismatchError("a.png", (1, 2), "b.png", (3, 4)),
    ],
)
def test_errors_pickle_and_subclass_the_builtin(error: Exception) -> None:
    assert isinstance(error, cachedload.CachedloadError)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == str(error)


def test_readme_quick_start_runs(tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S)
    assert block is not None
    write_images(tmp_path / "data" / "train")
    code = block.group(1) + "\nprint(X.shape, y.shape, type(X).__name__)\n"
    code += "X2, y2 = load_images('data/train')\nprint(type(X2).__name__, (X2 == X).all())\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(CACHEDLOAD_DIR=str(tmp_path / "cache")),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["(6, 128, 128, 3) (6,) memmap", "memmap True"]
