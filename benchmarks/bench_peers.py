"""cachedload against the usual ways of caching a preprocessed image dataset, in the same run.

Run: python benchmarks/bench_peers.py [--quick] [--tmp DIR] [--repeats N]

The loader: 2,000 JPEGs 256x256 -> 128x128 RGB through ``load_image_folder`` (``--quick``:
200). Each peer wraps the same loader:

* ``joblib.Memory`` (default and ``mmap_mode="r"``): keys on the argument, the path string;
* a hand-rolled pickle cache (``pickle.dump``/``load``, protocol 5), the usual advice;
* ``np.save``/``np.load`` by hand;
* the SQLite approach of tutorials: one BLOB row per preprocessed image, fetched by id.

Reported: cold call (compute + store), warm hit, and whether the peer returns stale data after
one image is replaced in place (same path, new pixels); then SQLite's build, read-all and
random single-item latency against the same through a memory-mapped cached result. The images
are aged (mtimes a day old) like a real dataset. A measurement, not a pass/fail test.
"""

from __future__ import annotations

import functools
import os
import pickle
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C  # first: puts the repository on sys.path
import cv2
import joblib
import numpy as np

from cachedload import cached_dataset, serialize
from cachedload.images import load_image_folder

SIZE = (128, 128)


def load_images(root: str) -> Any:
    """The loader every peer caches."""
    return load_image_folder(root, size=SIZE)


def pickle_cache(cache_file: Path) -> Callable[[str], Any]:
    def load(root: str) -> Any:
        if cache_file.exists():
            with open(cache_file, "rb") as handle:
                return pickle.load(handle)
        result = load_images(root)
        with open(cache_file, "wb") as handle:
            pickle.dump(result, handle, protocol=5)
        return result

    return load


def npy_cache(folder: Path) -> Callable[[str], Any]:
    images, labels = folder / "images.npy", folder / "labels.npy"

    def load(root: str) -> Any:
        if images.exists():
            return np.load(images), np.load(labels)
        result = load_images(root)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(images, result.images)
        np.save(labels, result.labels)
        return result.images, result.labels

    return load


def images_of(result: Any) -> Any:
    return result[0] if isinstance(result, tuple) and len(result) == 2 else result.images


def section_peers(args: Any, scratch: Path, root: Path, rounds: int) -> None:
    memory = joblib.Memory(scratch / "jm", verbose=0)
    memory_mapped = joblib.Memory(scratch / "jm-r", mmap_mode="r", verbose=0)
    ours = cached_dataset(cache_dir=scratch / "cl")(load_images)
    ours_mapped = cached_dataset(cache_dir=scratch / "cl-r", mmap_mode="r")(load_images)

    def clear_memory() -> None:
        memory.clear(warn=False)

    def clear_memory_mapped() -> None:
        memory_mapped.clear(warn=False)

    def clear_pickle() -> None:
        C.drop_file(scratch / "cache.pkl")

    def clear_npy() -> None:
        for path in (scratch / "npy").glob("*.npy"):
            C.drop_file(path)

    peers: dict[str, tuple[Callable[[str], Any], Callable[[], Any]]] = {
        # name: (the cached loader, what empties its cache)
        "cachedload, mmap_mode=None": (ours, ours.cache_clear),
        "cachedload, mmap_mode='r'": (ours_mapped, ours_mapped.cache_clear),
        "joblib.Memory": (memory.cache(load_images), clear_memory),
        "joblib.Memory, mmap_mode='r'": (memory_mapped.cache(load_images), clear_memory_mapped),
        "pickle.dump/load (protocol 5) by hand": (
            pickle_cache(scratch / "cache.pkl"),
            clear_pickle,
        ),
        "np.save/np.load by hand": (npy_cache(scratch / "npy"), clear_npy),
    }
    load_images(str(root))  # page cache and OpenCV warm for every peer alike
    folder = str(root)
    cold = C.measure(
        {
            name: C.Case(functools.partial(load, folder), before=clear)
            for name, (load, clear) in peers.items()
        },
        max(2, rounds // 3),
        warmup=False,
    )
    cases = C.measure(
        {name: C.Case(functools.partial(load, folder)) for name, (load, _) in peers.items()},
        rounds * 3,
    )

    # Replace one image in place: same path, other pixels (and, as any write does, a new mtime).
    victim = sorted(root.rglob("*.jpg"))[len(list(root.rglob("*.jpg"))) // 2]
    image = cv2.imread(str(victim))
    assert image is not None
    cv2.imwrite(str(victim), 255 - image)
    truth = load_images(str(root)).images
    stale = {
        name: not np.array_equal(images_of(load(str(root))), truth)
        for name, (load, _) in peers.items()
    }
    C.age(root)

    base = cases["joblib.Memory"].median
    table = C.Table(
        f"peers on the same loader ({len(truth):,} images, {C.fmt_bytes(truth.nbytes)} result)",
        [
            "cache",
            "cold call",
            "warm hit",
            "hit vs joblib.Memory",
            "stale after an image is replaced?",
        ],
    )
    for name, case in cases.items():
        table.add(
            name,
            C.fmt_time(cold[name].median),
            C.fmt_time(case.median),
            f"{case.median / base:.2f}x",
            "YES: returns the old pixels" if stale[name] else "no: recomputed",
        )
    table.print()


def section_sqlite(args: Any, scratch: Path, root: Path, rounds: int) -> None:
    data = load_images(str(root))
    images = data.images
    n = len(images)
    database = scratch / "images.sqlite"

    def build() -> None:
        database.unlink(missing_ok=True)
        connection = sqlite3.connect(database)
        with connection:
            connection.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, label INT, img BLOB)")
            connection.executemany(
                "INSERT INTO images VALUES (?, ?, ?)",
                ((i, int(data.labels[i]), images[i].tobytes()) for i in range(n)),
            )
        connection.close()

    entry = scratch / "entry.joblib"

    def store() -> None:
        serialize.dump(data, entry)  # what a cachedload miss writes (with fsync)

    cases = C.measure(
        {"build": C.Case(build), "store": C.Case(store, after=lambda: C.drop_file(entry))},
        max(3, rounds // 2),
    )
    build_time, store_time = cases["build"].median, cases["store"].median
    build()

    connection = sqlite3.connect(database)
    shape = images.shape[1:]

    def sqlite_read_all() -> Any:
        out = np.empty_like(images)
        for index, blob in connection.execute("SELECT id, img FROM images ORDER BY id"):
            out[index] = np.frombuffer(blob, np.uint8).reshape(shape)
        return out

    mapped = cached_dataset(cache_dir=scratch / "cl-sql", mmap_mode="r")(load_images)
    in_memory = cached_dataset(cache_dir=scratch / "cl-sql")(load_images)
    mapped(str(root))
    cases = C.measure(
        {
            "sqlite": C.Case(sqlite_read_all),
            "cachedload": C.Case(lambda: in_memory(str(root))),
        },
        rounds * 3,
    )
    read_sqlite, read_ours = cases["sqlite"].median, cases["cachedload"].median

    rng = random.Random(0)
    ids = [rng.randrange(n) for _ in range(1_000)]

    def sqlite_fetch(i: int) -> Any:
        (blob,) = connection.execute("SELECT img FROM images WHERE id = ?", (i,)).fetchone()
        return np.frombuffer(blob, np.uint8).reshape(shape)

    dataset = mapped(str(root))  # one hit, then items are slices of the memory map

    def mapped_fetch(i: int) -> Any:
        return np.array(dataset.images[i])  # a copy, like the bytes SQLite hands back

    latencies: dict[str, list[float]] = {"sqlite": [], "cachedload": []}
    totals: dict[str, list[float]] = {"sqlite": [], "cachedload": []}
    for _ in range(max(3, rounds // 2)):
        for name, fetch in (("sqlite", sqlite_fetch), ("cachedload", mapped_fetch)):
            started = time.perf_counter()
            for i in ids:
                one = time.perf_counter()
                fetch(i)
                latencies[name].append(time.perf_counter() - one)
            totals[name].append(time.perf_counter() - started)
    connection.close()

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    table = C.Table(
        f"SQLite, one BLOB row per preprocessed image ({n:,} rows of {images[0].nbytes:,} bytes), "
        "against a memory-mapped cachedload result",
        ["operation", "SQLite", "cachedload", "SQLite / cachedload"],
    )
    table.add(
        "build / store (with fsync)",
        C.fmt_time(build_time),
        C.fmt_time(store_time),
        f"{build_time / store_time:.1f}x",
    )
    table.add(
        "read all rows into one array / warm hit (mmap_mode=None)",
        C.fmt_time(read_sqlite),
        C.fmt_time(read_ours),
        f"{read_sqlite / read_ours:.1f}x",
    )
    table.add(
        "1,000 random single items: median latency",
        C.fmt_time(median(latencies["sqlite"])),
        C.fmt_time(median(latencies["cachedload"])),
        f"{median(latencies['sqlite']) / median(latencies['cachedload']):.1f}x",
    )
    table.add(
        "1,000 random single items: total",
        C.fmt_time(median(totals["sqlite"])),
        C.fmt_time(median(totals["cachedload"])),
        f"{median(totals['sqlite']) / median(totals['cachedload']):.1f}x",
    )
    table.print()
    entry_size = sum(p.stat().st_size for p in (scratch / "cl-sql").rglob("result.joblib"))
    print(
        f"SQLite file {C.fmt_bytes(os.path.getsize(database))}; cachedload entry "
        f"{C.fmt_bytes(entry_size)}. The memory-mapped hit (one fingerprint of the folder) is "
        "made once, before the fetches.\n"
    )


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    rounds = args.repeats or (3 if args.quick else 7)
    n_images = 200 if args.quick else 2_000
    C.banner("bench_peers: cachedload against joblib.Memory, pickle, np.save and SQLite", args)
    with C.scratch(args, "peers") as scratch:
        root = scratch / "images"
        C.write_images(root, n_images)
        section_peers(args, scratch, root, rounds)
        section_sqlite(args, scratch, root, rounds)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
