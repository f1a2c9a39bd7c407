"""How does a hit scale with the source's size and the result's size, and on a realistic case?

Run: python benchmarks/bench_scaling.py [--quick] [--tmp DIR] [--repeats N]

1. Hit time against source size (1k, 10k, 100k files; tiny result): linear in files, with the
   per-file cost, next to ``find`` on the same tree.
2. Hit time against result size (1 MB, 100 MB, 1 GB), with and without ``mmap_mode="r"``, next
   to ``np.load`` of the same array.
3. The realistic case: 2,000 JPEGs 256x256 -> 128x128 RGB through ``load_image_folder``: the
   cold load against a warm hit in a fresh interpreter, and a warm hit in the same process
   against ``joblib.Memory``'s warm hit of the same loader.

Sources are aged (mtimes a day old) like a real dataset. ``--quick``: 1k/4k files, 1 MB/16 MB,
200 images. A measurement, not a pass/fail test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import _common as C  # first: puts the repository on sys.path
import joblib
import numpy as np

from cachedload import cached_dataset
from cachedload.fingerprint import fingerprint_source
from cachedload.images import load_image_folder

SIZE = (128, 128)


def _tiny(source: str) -> dict[str, int]:
    return {"answer": 42}


def _array(source: str, nbytes: int) -> np.ndarray[Any, Any]:
    return np.full(nbytes, 7, dtype=np.uint8)


def load_images(root: str) -> Any:
    """The realistic loader: every image, resized to 128x128 RGB."""
    return load_image_folder(root, size=SIZE)


def section_source_size(args: Any, scratch: Path, rounds: int) -> None:
    sizes = (1_000, 4_000) if args.quick else (1_000, 10_000, 100_000)
    table = C.Table(
        "warm hit (tiny result, same process) against the number of source files",
        ["files", "hit", "per file", "find", "hit / find", "fingerprint alone", "C floor"],
    )
    points = []
    for n_files in sizes:
        root = C.make_tree(scratch / f"tree{n_files}", n_files)
        load = cached_dataset(cache_dir=scratch / "cache-files")(_tiny)
        load(str(root))
        find = ["find", str(root), "-type", "f", "-printf", "%P %s %T@\n"]
        cases = C.measure(
            {
                "hit": C.Case(lambda: load(str(root))),  # noqa: B023
                "find": C.Case(lambda: subprocess.run(find, stdout=subprocess.DEVNULL)),  # noqa: B023
                "fingerprint": C.Case(lambda: fingerprint_source(root)),  # noqa: B023
            },
            rounds if n_files > 1_000 else rounds * 3,
        )
        hit, find_time = cases["hit"].median, cases["find"].median
        points.append((n_files, hit))
        table.add(
            f"{n_files:,}",
            C.fmt_time(hit),
            C.fmt_time(hit / n_files),
            C.fmt_time(find_time),
            f"{hit / find_time:.2f}x",
            C.fmt_time(cases["fingerprint"].median),
            C.fmt_time(floor) if (floor := C.stat_floor(scratch, root, rounds)) else "n/a",
        )
    table.print()
    (n0, t0), (n1, t1) = points[0], points[-1]
    print(
        f"marginal cost per file between {n0:,} and {n1:,} files: "
        f"{C.fmt_time((t1 - t0) / (n1 - n0))} (linear: the per-file cost is constant)\n"
    )


def section_result_size(args: Any, scratch: Path, rounds: int) -> None:
    sizes = (C.MiB, 16 * C.MiB) if args.quick else (C.MiB, 100 * C.MiB, C.GiB)
    source = C.make_tree(scratch / "src10", 10, per_folder=10)
    cache = scratch / "cache-results"
    in_memory = cached_dataset(cache_dir=cache)(_array)
    mapped = cached_dataset(cache_dir=cache, mmap_mode="r")(_array)
    table = C.Table(
        "warm hit (10-file source, same process) against the result's size",
        ["result", "mmap_mode=None", "GB/s", "np.load", "None / np.load", "mmap_mode='r'"],
    )
    for nbytes in sizes:
        in_memory(str(source), nbytes)
        npy = scratch / "array.npy"
        np.save(npy, _array("", nbytes))
        cases = C.measure(
            {
                "none": C.Case(lambda: in_memory(str(source), nbytes)),  # noqa: B023
                "mmap": C.Case(lambda: mapped(str(source), nbytes)),  # noqa: B023
                "np.load": C.Case(lambda: np.load(npy)),  # noqa: B023
            },
            rounds * (5 if nbytes <= 16 * C.MiB else 1),
        )
        none, base = cases["none"].median, cases["np.load"].median
        table.add(
            C.fmt_bytes(nbytes),
            C.fmt_time(none),
            f"{nbytes / none / 1e9:.2f}",
            C.fmt_time(base),
            f"{none / base:.2f}x",
            C.fmt_time(cases["mmap"].median),
        )
        npy.unlink()
        in_memory.cache_clear()
    table.print()


def section_realistic(args: Any, scratch: Path, rounds: int) -> None:
    n_images = 200 if args.quick else 2_000
    root = scratch / "images"
    C.write_images(root, n_images)
    cache = scratch / "cache-images"
    child = f"""
        import time
        started = time.perf_counter()
        from cachedload import cached_dataset
        from cachedload.images import load_image_folder
        load = cached_dataset(cache_dir={str(cache)!r})(load_image_folder)
        imported = time.perf_counter()
        data = load({str(root)!r}, size={SIZE!r})
        print(imported - started, time.perf_counter() - imported, data.images.nbytes)
    """
    memory_cache = scratch / "joblib-fresh"
    memory_child = f"""
        import time
        started = time.perf_counter()
        import joblib
        from cachedload.images import load_image_folder
        load = joblib.Memory({str(memory_cache)!r}, verbose=0).cache(load_image_folder)
        imported = time.perf_counter()
        data = load({str(root)!r}, size={SIZE!r})
        print(imported - started, time.perf_counter() - imported, data.images.nbytes)
    """
    cold: list[tuple[float, float]] = []
    warm: list[tuple[float, float]] = []
    memory_warm: list[tuple[float, float]] = []
    nbytes = 0
    # Fresh interpreters vary a lot here (first touches of memory in a new process): twice
    # the rounds of the other tables.
    for _ in range(2 * rounds):
        for folder in (cache, memory_cache):
            if folder.exists():
                shutil.rmtree(folder)
        result = C.run_child(child)
        _import, call, size = result.stdout.split()
        cold.append((float(call), result.wall_seconds))
        os.sync()  # no write-back of the cold run under the warm one (joblib does not fsync)
        result = C.run_child(child)
        _import, call, size = result.stdout.split()
        warm.append((float(call), result.wall_seconds))
        nbytes = int(size)
        C.run_child(memory_child)
        os.sync()
        result = C.run_child(memory_child)
        _import, call, _size = result.stdout.split()
        memory_warm.append((float(call), result.wall_seconds))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    cold_call, cold_wall = median([c for c, _ in cold]), median([w for _, w in cold])
    warm_call, warm_wall = median([c for c, _ in warm]), median([w for _, w in warm])
    memory_call = median([c for c, _ in memory_warm])
    memory_wall = median([w for _, w in memory_warm])
    table = C.Table(
        f"realistic case: {n_images:,} JPEGs 256x256 -> {SIZE[0]}x{SIZE[1]} RGB "
        f"({C.fmt_bytes(nbytes)} result), each run in a fresh interpreter",
        ["run", "the call", "whole process", "speed-up (call)", "speed-up (process)"],
    )
    table.add(
        "cold: load_image_folder + store", C.fmt_time(cold_call), C.fmt_time(cold_wall), "1x", "1x"
    )
    table.add(
        "warm: hit in a fresh interpreter",
        C.fmt_time(warm_call),
        C.fmt_time(warm_wall),
        f"{cold_call / warm_call:.0f}x",
        f"{cold_wall / warm_wall:.1f}x",
    )
    table.add(
        "joblib.Memory: hit in a fresh interpreter",
        C.fmt_time(memory_call),
        C.fmt_time(memory_wall),
        f"{cold_call / memory_call:.0f}x",
        f"{cold_wall / memory_wall:.1f}x",
    )
    table.print()
    print(
        f"fresh-interpreter warm hit: cachedload {warm_call / memory_call:.2f}x joblib.Memory's "
        "(the call alone; a new process's first hit is not read ahead)\n"
    )

    # Same process: cachedload against joblib.Memory on the same loader.
    ours = cached_dataset(cache_dir=scratch / "cache-same")(load_images)
    ours_mapped = cached_dataset(cache_dir=scratch / "cache-same", mmap_mode="r")(load_images)
    memory = joblib.Memory(scratch / "joblib", verbose=0).cache(load_images)
    memory_mapped = joblib.Memory(scratch / "joblib-mmap", mmap_mode="r", verbose=0).cache(
        load_images
    )
    for loader in (ours, memory, memory_mapped):
        loader(str(root))
    cases = C.measure(
        {
            "joblib.Memory warm hit (mmap_mode=None)": C.Case(lambda: memory(str(root))),
            "cachedload warm hit, mmap_mode=None": C.Case(lambda: ours(str(root))),
            "cachedload warm hit, mmap_mode='r'": C.Case(lambda: ours_mapped(str(root))),
            "joblib.Memory warm hit (mmap_mode='r')": C.Case(lambda: memory_mapped(str(root))),
            "  of which fingerprinting the folder": C.Case(lambda: fingerprint_source(root)),
        },
        rounds * 3,
    )
    base = cases["joblib.Memory warm hit (mmap_mode=None)"].median
    table = C.Table(
        f"realistic case, warm hit in the same process ({n_images:,} source files, "
        f"{C.fmt_bytes(nbytes)} result)",
        ["method", "median", "vs joblib.Memory", "speed-up"],
    )
    for name, case in cases.items():
        table.add(
            name,
            C.fmt_time(case.median),
            f"{case.median / base:.2f}x",
            f"{base / case.median:.1f}x",
        )
    floor = C.stat_floor(scratch, root, rounds * 3)
    if floor is not None:
        table.add(
            "  the floor: C readdir + fstatat, best of N",
            C.fmt_time(floor),
            f"{floor / base:.2f}x",
            f"{base / floor:.1f}x",
        )
    table.print()
    none = cases["cachedload warm hit, mmap_mode=None"].median
    mapped = cases["cachedload warm hit, mmap_mode='r'"].median
    print(
        "against the targets: mmap_mode=None "
        f"{none / base:.2f}x joblib.Memory (target <= 1.0x: {C.verdict(none / base, 1.0)}); "
        f"mmap_mode='r' {base / mapped:.1f}x faster (target >= 10x: "
        f"{C.verdict(base / mapped, 10, higher_is_better=True)})\n"
    )


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    rounds = args.repeats or (3 if args.quick else 7)
    C.banner("bench_scaling: hits against source size, result size, and a realistic case", args)
    with C.scratch(args, "scaling") as scratch:
        section_source_size(args, scratch, rounds)
        section_result_size(args, scratch, rounds)
        section_realistic(args, scratch, rounds)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
