"""``cachedload demo``: make a small image folder, load it twice, show the speed-up.

The images go to a fresh temporary directory (its path is printed); the second load is
answered from the cache (the default cache directory unless told otherwise). This module is
the command's implementation, so it prints; the library never does.
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cachedload.decorator import cached_dataset

__all__ = ["load_demo_images", "make_demo_folder", "run_demo"]


def make_demo_folder(root: Path, n_images: int = 400, side: int = 256) -> Path:
    """Write ``n_images`` synthetic JPEGs in two class folders below ``root``; return ``root``."""
    import cv2

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for index in range(n_images):
        label = ("cats", "dogs")[index % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        base = (ramp[None, :, None] + ramp[:, None, None] * (index % 7) / 7) / 2
        noise = rng.normal(0, 12, (side, side, 3)).astype(np.float32)
        image = np.clip(base + noise + [index % 50, 80, 160], 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / label / f"img_{index:05d}.jpg"), image)
    return root


@cached_dataset
def load_demo_images(image_dir: str, size: tuple[int, int] = (128, 128)) -> dict[str, Any]:
    """A typical hand-written loader: cv2 decode, resize and colour-convert every image."""
    import cv2

    images, labels = [], []
    classes = sorted(p.name for p in Path(image_dir).iterdir() if p.is_dir())
    for label, name in enumerate(classes):
        for path in sorted((Path(image_dir) / name).iterdir()):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise OSError(f"cannot read image {path}")
            image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA)
            images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            labels.append(label)
    return {"images": np.stack(images), "labels": np.array(labels), "classes": classes}


def run_demo(
    cache_dir: str | os.PathLike[str] | None = None, n_images: int = 400, out: TextIO | None = None
) -> float:
    """Run the demo and return the speed-up (cold load time / cached load time).

    The images are written to a new temporary directory (``tempfile.mkdtemp``), named in the
    output: nothing else on the machine is touched but the cache.

    Args:
        cache_dir: where to cache (default: the default cache directory).
        n_images: how many synthetic images to generate.
        out: where to print (default: standard output).
    """
    import sys

    stream = out if out is not None else sys.stdout
    loader = load_demo_images
    if cache_dir is not None:
        loader = cached_dataset(cache_dir=cache_dir)(load_demo_images.__wrapped__)
    # A fresh folder: never another run's, nor anything a user keeps in the temp dir.
    folder = Path(tempfile.mkdtemp(prefix="cachedload-demo-")) / "images"
    make_demo_folder(folder, n_images=n_images)
    print(f"made {n_images} JPEGs (256x256) in a new temporary directory: {folder}", file=stream)
    started = time.perf_counter()
    first = loader(str(folder))
    cold = time.perf_counter() - started
    started = time.perf_counter()
    second = loader(str(folder))
    warm = time.perf_counter() - started
    if not np.array_equal(first["images"], second["images"]):
        raise RuntimeError("the cached result differs from the computed one")
    entry = loader.cache_path(str(folder))
    print(
        f"first load (decode + resize {first['images'].shape}): {cold * 1e3:9.1f} ms", file=stream
    )
    print(f"second load (from the cache):               {warm * 1e3:9.1f} ms", file=stream)
    print(f"speed-up: {cold / warm:.0f}x   cache entry: {entry}", file=stream)
    where = "" if cache_dir is None else f" --cache-dir {shlex.quote(os.fspath(cache_dir))}"
    print(
        f"to clean up: rm -r {shlex.quote(str(folder.parent))}; "
        f"cachedload clear --function load_demo_images{where}",
        file=stream,
    )
    return cold / warm
