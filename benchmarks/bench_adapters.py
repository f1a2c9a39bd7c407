"""One training epoch through a DataLoader: cachedload.torch.MappedImages against the alternatives.

Run: python benchmarks/bench_adapters.py [--quick] [--n N]

Writes N synthetic 256x256 JPEGs (2000 by default: a 94 MiB cached result at 128x128 RGB
uint8), caches them once with ``@cached_dataset(mmap_mode="r")`` over ``load_image_folder``,
then times one shuffled epoch (batch 64, ``num_workers=2``, the platform's default start
method) of each Dataset, interleaved round by round:

* ``MappedImages(load_mapped, root)`` (this library's adapter);
* the hand-written workflow-2 Dataset of docs/pytorch.md over the same cached loader (its items are
  ``(H, W, C)``, no conversion), and the same Dataset returning ``(C, H, W)`` items (a
  ``permute``, so collation transposes), as MappedImages does;
* a Dataset that opens, decodes and resizes each JPEG with Pillow per item, as
  ``torchvision.datasets.ImageFolder`` + ``Resize`` does (torchvision's wheel does not import
  beside the pinned torch here, so this is the equivalent written out; the output says which);
* litdata's ``StreamingDataset`` over the same 128x128 arrays written by ``litdata.optimize``
  (if litdata is installed: the ``bench`` extra).

Each epoch starts from nothing (the Dataset is built inside the timed run, as a training script
does); the table gives the median samples/s and time to the first batch (DataLoader start-up),
with ratios against MappedImages. The page cache is warm for every case. A measurement, not a
pass/fail test.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from _common import (  # noqa: E402
    Case,
    Table,
    banner,
    fmt_time,
    measure,
    parser,
    scratch,
    verdict,
    write_images,
)
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from cachedload import cached_dataset, load_image_folder  # noqa: E402
from cachedload.torch import MappedImages  # noqa: E402

SIZE = (128, 128)
BATCH = 64
WORKERS = 2


@cached_dataset(mmap_mode="r")
def load_mapped(root: str, size: tuple[int, int] = SIZE) -> Any:
    return load_image_folder(root, size=size, progress=False)


class HandWritten(Dataset[Any]):
    """Workflow 2 of docs/pytorch.md, as written there."""

    def __init__(self, root: str) -> None:
        self.root, self._data = root, None
        self.length = len(self.data.paths)

    @property
    def data(self) -> Any:
        if self._data is None:
            self._data = load_mapped(self.root)  # a memory map, opened once per process
        return self._data

    def __getstate__(self) -> dict[str, Any]:  # what workers receive: no pixels
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return torch.from_numpy(np.array(self.data.images[i])), int(self.data.labels[i])


class HandWrittenCHW(HandWritten):
    """The same, with ``(C, H, W)`` items as MappedImages gives (the fair comparison)."""

    def __getitem__(self, i: int) -> Any:
        image = torch.from_numpy(np.array(self.data.images[i])).permute(2, 0, 1)
        return image, int(self.data.labels[i])


class PillowDecoding(Dataset[Any]):
    """What torchvision's ImageFolder + Resize does per item: open, decode, RGB, resize."""

    def __init__(self, root: str) -> None:
        self.classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        self.samples = [
            (str(path), label)
            for label, name in enumerate(self.classes)
            for path in sorted((Path(root) / name).iterdir())
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        path, label = self.samples[i]
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize(SIZE[::-1], Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1), label


def _optimized_item(index: int) -> dict[str, Any]:
    data = load_mapped(_optimized_item.root)  # type: ignore[attr-defined]
    return {"image": np.array(data.images[index]), "label": int(data.labels[index])}


def litdata_case(root: str, output: Path, quick: bool) -> tuple[Callable[[], Any], str] | None:
    """litdata.optimize the cached arrays once (untimed); a factory of its DataLoader."""
    try:
        import litdata
    except ImportError:
        return None
    _optimized_item.root = root  # type: ignore[attr-defined]
    count = len(load_mapped(root).paths)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        litdata.optimize(
            fn=_optimized_item,
            inputs=list(range(count)),
            output_dir=str(output),
            chunk_bytes="64MB",
            num_workers=1,
            start_method="fork",
            verbose=False,
        )

    def loader() -> Any:
        dataset = litdata.StreamingDataset(str(output), shuffle=True)
        return litdata.StreamingDataLoader(dataset, batch_size=BATCH, num_workers=WORKERS)

    return loader, f"litdata {litdata.__version__}"


def torch_loader(dataset: Dataset[Any]) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS)


def epoch(make: Callable[[], Any], first: list[float], counts: list[int]) -> None:
    """Build the loader, run one epoch; record the time to the first batch and the samples."""
    started = time.perf_counter()
    seen = 0
    for index, batch in enumerate(make()):
        if index == 0:
            first.append(time.perf_counter() - started)
        seen += len(batch["label"] if isinstance(batch, dict) else batch[1])
    counts.append(seen)


def main() -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--n", type=int, default=None, help="images (default 2000; quick 200)")
    args = cli.parse_args()
    n = args.n or (200 if args.quick else 2000)
    rounds = args.repeats or (2 if args.quick else 5)
    banner("bench_adapters: one DataLoader epoch over a cached image folder", args)
    import PIL

    print(f"torch {torch.__version__}, Pillow {PIL.__version__}", end="")
    try:
        import torchvision  # noqa: F401

        print(", torchvision importable (the decoding baseline still uses Pillow directly)")
    except Exception:  # torchvision wheels fail to import beside some torch builds
        print(", torchvision not importable here: the decoding baseline is Pillow per item")
    logging.getLogger("cachedload").setLevel(logging.WARNING)

    with scratch(args, "adapters") as tmp:
        os.environ["CACHEDLOAD_DIR"] = str(tmp / "cache")  # workers inherit it
        root = str(tmp / "images")
        write_images(Path(root), n)
        data = load_mapped(root)  # the cold load, untimed
        print(
            f"data    : {n} JPEGs 256x256 -> {SIZE[0]}x{SIZE[1]} RGB uint8, cached result "
            f"{data.images.nbytes / 2**20:.0f} MiB; batch {BATCH}, num_workers={WORKERS}, "
            f"shuffle, {rounds} rounds (medians)\n"
        )
        makers: dict[str, Callable[[], Any]] = {
            "MappedImages (cachedload.torch)": lambda: torch_loader(
                MappedImages(load_mapped, root)
            ),
            "hand-written workflow-2 Dataset": lambda: torch_loader(HandWritten(root)),
            "hand-written, (C, H, W) items": lambda: torch_loader(HandWrittenCHW(root)),
            "Pillow decoding per item (as ImageFolder)": lambda: torch_loader(PillowDecoding(root)),
        }
        with warnings.catch_warnings():
            # litdata's own deprecation/user warnings are its business, not this measurement's.
            warnings.simplefilter("ignore")
            lit = litdata_case(root, tmp / "litdata", args.quick)
        if lit is None:
            print("litdata not installed (pip install '.[bench]'): its row is skipped\n")
        else:
            makers[f"{lit[1]} StreamingDataset"] = lit[0]
        first: dict[str, list[float]] = {name: [] for name in makers}
        counts: dict[str, list[int]] = {name: [] for name in makers}
        cases = {
            name: Case(lambda make=make, name=name: epoch(make, first[name], counts[name]))
            for name, make in makers.items()
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # litdata warns about its own defaults
            measure(cases, rounds)

    ours = "MappedImages (cachedload.torch)"
    rate = {name: n / case.median for name, case in cases.items()}
    start = {name: sorted(first[name])[len(first[name]) // 2] for name in cases}
    table = Table(
        f"one epoch of {n} items, median of {rounds}",
        ["Dataset", "samples/s", "MappedImages is", "first batch", "MappedImages is"],
    )
    for name in cases:
        assert all(count == n for count in counts[name]), (name, counts[name])
        table.add(
            name,
            f"{rate[name]:.0f}",
            f"{rate[ours] / rate[name]:.2f}x faster",
            fmt_time(start[name]),
            f"{start[name] / start[ours]:.2f}x sooner",
        )
    table.print()
    targets = Table(
        "targets (samples/s ratio)", ["MappedImages against", "ratio", "target", "verdict"]
    )
    for name, limit in (
        ("hand-written workflow-2 Dataset", 1.0),
        ("hand-written, (C, H, W) items", 1.0),
        ("Pillow decoding per item (as ImageFolder)", 5.0),
        *((name, 1.0) for name in cases if name.startswith("litdata")),
    ):
        ratio = rate[ours] / rate[name]
        targets.add(name, f"{ratio:.2f}x", f">= {limit:.1f}x", verdict(ratio, limit, True))
    targets.print()


if __name__ == "__main__":
    main()
