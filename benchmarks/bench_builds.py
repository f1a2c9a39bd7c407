"""Per-item builds (cachedload.builder): full, incremental, out-of-core, on Dask, against peers.

Run: python benchmarks/bench_builds.py [--quick] [--tmp DIR] [--repeats N] [--n N]

A synthetic folder of 64x64 JPEGs (default 20,000, the size the issue measured; ``--quick``:
300), item function = decode + resize to 32x32 RGB. Measured through the public API
(``@cached_dataset(per_item="path")`` + ``.map``, and ``cached_image_folder``), in interleaved
rounds:

* full build (``.map.recompute``, threads) and ``cached_image_folder``'s first call against a
  plain sequential ``cv2.imread`` + ``resize`` loop;
* the miss overhead: first call minus the body alone (the same decoding into one array, no
  cache) against fingerprinting the folder + writing the result file;
* change 1 file: ``.map`` again against a full build, and against what any cache must do at
  least (fingerprint the folder + ``cp`` of the result file);
* add 1,000 files: ``.map`` again against a full build;
* the warm hit (``mmap_mode="r"``, first row read) against the first-item latency of a
  ``litdata.StreamingDataset`` and an HF dataset (full runs only);
* the builder's peak anonymous memory (``RssAnon``) for a large result against its size;
* a Dask ``LocalCluster`` (2 worker processes) against the local threaded build;
* ``litdata.optimize`` (``num_workers=2``) and HF ``datasets`` (``imagefolder`` + ``.map``),
  full runs only, where they run offline.

A measurement, not a pass/fail test.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import _common as C  # first: puts the repository on sys.path
import cv2
import joblib
import numpy as np

from cachedload import CachedDataset, cached_image_folder
from cachedload.builder import PreviousBuild, build_items, scan_items
from cachedload.fingerprint import fingerprint_source
from cachedload.options import Options

SIDE = 32
_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def decode_resize(path: str) -> Any:
    """The item function: decode at half size (the JPEG decoder scales for free), to 32x32 RGB.

    ``IMREAD_REDUCED_COLOR_2`` halves 64x64 to 32x32 inside the decoder, so no resize runs.
    """
    flags = (cv2.IMREAD_COLOR if _RGB is None else _RGB) | 16  # the REDUCED_2 bit
    image = cv2.imread(path, flags)
    if image.shape[:2] != (SIDE, SIDE):
        image = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    if _RGB is None:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def plain_loop(paths: list[str]) -> Any:
    """The baseline: what a user writes by hand, sequential, full decode + INTER_AREA."""
    out = np.empty((len(paths), SIDE, SIDE, 3), np.uint8)
    for index, path in enumerate(paths):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        image = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        out[index] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return out


class Folder:
    """The image folder, a base build of it, and the edits the cases make."""

    def __init__(self, scratch: Path, n: int, added: int) -> None:
        self.root = scratch / "images"
        self.spare = scratch / "spare"  # the 1,000 files that "add 1,000" moves in and out
        C.write_images(self.root, n, side=64)
        C.write_images(self.spare, added, side=64, seed=1)
        self.out = scratch / "builds"
        self.out.mkdir()
        items, fp = scan_items(self.root)
        self.paths = [item.path for item in items]
        self.base = self.out / "base.joblib"
        report = build_items(decode_resize, items, self.base, taken_ns=fp.taken_ns)
        self.previous = PreviousBuild(self.base, report.records)
        self.victim = Path(self.paths[len(self.paths) // 2])
        self.victim_bytes = self.victim.read_bytes()
        self.flips = 0
        self.added = added
        self.computed: dict[str, set[int]] = {}
        self.hit_seconds = float("nan")

    def build(self, previous: PreviousBuild | None, name: str, **options: Any) -> Any:
        items, fp = scan_items(self.root)
        report = build_items(
            decode_resize, items, self.out / name, previous=previous, taken_ns=fp.taken_ns,
            **options,
        )  # fmt: skip
        self.computed.setdefault(name, set()).add(report.computed)
        return report

    def change_one(self) -> None:
        """Rewrite one image with other pixels (a new size and mtime)."""
        self.flips += 1
        image = cv2.imread(str(self.victim))
        cv2.imwrite(str(self.victim), 255 - image if self.flips % 2 else image)
        os.utime(self.victim, ns=(C.AGED_NS + self.flips, C.AGED_NS + self.flips))

    def add_spare(self) -> None:
        self.spare.rename(self.root / "zz_added")

    def remove_spare(self) -> None:
        (self.root / "zz_added").rename(self.spare)


def body_alone(paths: list[str], threads: int) -> Any:
    """The loader body without any cache: the same decoding, threads, into one array."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((len(paths), SIDE, SIDE, 3), np.uint8)

    def work(rows: range) -> None:
        for index in rows:
            out[index] = decode_resize(paths[index])

    step = max(1, len(paths) // (threads * 8))
    chunks = [range(i, min(i + step, len(paths))) for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, chunks))
    return out


def section_builds(args: Any, folder: Folder, rounds: int, scratch: Path) -> None:
    n = len(folder.paths)
    threads = C.usable_cpus()
    options = Options(per_item="path", cache_dir=scratch / "cache", mmap_mode="r")
    mapped = CachedDataset(decode_resize, options)
    result_file = scratch / "written.npy"
    counter = {"n": 0}

    def first_call() -> Any:
        counter["n"] += 1  # a new cache directory each time: a true first call
        return cached_image_folder(folder.root, size=(SIDE, SIDE), keep=1,
                                   cache_dir=scratch / f"first{counter['n']}")  # fmt: skip

    def write_result() -> None:
        fingerprint_source(folder.root)
        np.save(result_file, body_alone(folder.paths[:1], 1).repeat(n, axis=0))

    def first_map() -> Any:
        counter["n"] += 1  # a new cache directory each time: a true first call
        fresh = Options(per_item="path", cache_dir=scratch / f"first{counter['n']}")
        return CachedDataset(decode_resize, fresh).map(folder.root)

    cases = {
        "plain cv2 loop (1 thread)": C.Case(lambda: plain_loop(folder.paths)),
        "first call (.map, empty cache)": C.Case(
            first_map, after=lambda: shutil.rmtree(scratch / f"first{counter['n']}")
        ),
        "body alone (threads, no cache)": C.Case(lambda: body_alone(folder.paths, threads)),
        "cached_image_folder, first call": C.Case(
            first_call, after=lambda: shutil.rmtree(scratch / f"first{counter['n']}")
        ),
        "full build (.map.recompute)": C.Case(lambda: mapped.map.recompute(folder.root)),
        "fingerprint + write the result": C.Case(write_result),
        "change 1 file, .map again": C.Case(
            lambda: mapped.map(folder.root), before=folder.change_one
        ),
        "fingerprint + cp of the result": C.Case(
            lambda: (
                fingerprint_source(folder.root),
                shutil.copyfile(folder.base, folder.out / "copy.joblib"),
            )
        ),
        f"add {folder.added:,} files, .map again": C.Case(
            lambda: mapped.map(folder.root), before=folder.add_spare, after=folder.remove_spare
        ),
        "warm hit (mmap_mode='r'), first row": C.Case(
            lambda: np.asarray(mapped.map(folder.root).array[0]),
            before=lambda: mapped.map(folder.root),
        ),
    }
    C.measure(cases, rounds)
    loop = cases["plain cv2 loop (1 thread)"].median
    full = cases["full build (.map.recompute)"].median
    table = C.Table(
        f"Builds of {n:,} 64x64 JPEGs -> 32x32 RGB ({threads} threads; median of {rounds})",
        ["case", "median", "files/s", "vs loop", "vs full build"],
    )
    for name, case in cases.items():
        rate = f"{n / case.median:,.0f}" if "build" in name or "call" in name else ""
        table.add(name, C.fmt_time(case.median), rate, f"{loop / case.median:.2f}x",
                  f"{case.median / full:.3f}x")  # fmt: skip
    table.print()
    change = cases["change 1 file, .map again"].median
    floor = cases["fingerprint + cp of the result"].median
    added = cases[f"add {folder.added:,} files, .map again"].median
    first = cases["first call (.map, empty cache)"].median
    folder_first = cases["cached_image_folder, first call"].median
    body = cases["body alone (threads, no cache)"].median
    written = cases["fingerprint + write the result"].median
    hit = cases["warm hit (mmap_mode='r'), first row"].median
    ratio = loop / folder_first
    print(f"small images: cached_image_folder first call vs the plain loop: {ratio:.2f}x "
          f"(target >= 1.5x: {C.verdict(ratio, 1.5, higher_is_better=True)})")  # fmt: skip
    print(f"full build (.map) throughput vs the plain loop: {loop / full:.2f}x")
    overhead = first - body
    print(f"miss overhead (.map first call - body alone = {C.fmt_time(overhead)}) vs fingerprint + "
          f"writing the result ({C.fmt_time(written)}): {overhead / written:.2f}x "
          f"(target <= 1.5x: {C.verdict(overhead / written, 1.5)})")  # fmt: skip
    print(f"change 1 file vs full build: {change / full:.3f}x (target <= 0.05x: "
          f"{C.verdict(change / full, 0.05)})")  # fmt: skip
    print(f"change 1 file vs fingerprint + cp: {change / floor:.2f}x "
          f"(target <= 2x: {C.verdict(change / floor, 2.0)})")  # fmt: skip
    print(f"add {folder.added:,} files vs full build: {added / full:.3f}x "
          f"(target <= 0.1x: {C.verdict(added / full, 0.1)})")  # fmt: skip
    print(f"warm hit, first row: {C.fmt_time(hit)}")
    print()
    folder.hit_seconds = hit
    result_file.unlink(missing_ok=True)


MEMORY_CHILD = """
    import os, sys, threading, time
    import numpy as np
    from cachedload.builder import build_items, scan_items

    peak = 0
    def sample():
        global peak
        while True:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            time.sleep(0.002)

    ROW = 1 << 18  # uint32: 1 MiB a row
    def row(path):
        index = int(os.path.basename(path))
        return np.arange(index * ROW, (index + 1) * ROW, dtype=np.uint32)

    root, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.makedirs(root)
    for index in range(rows):
        open(os.path.join(root, f"{index:06d}"), "w").close()
    items, fp = scan_items(root)
    time.sleep(0.05)
    before = peak
    threading.Thread(target=sample, daemon=True).start()
    time.sleep(0.05)
    before = peak
    started = time.perf_counter()
    report = build_items(row, items, out, taken_ns=fp.taken_ns)
    print(report.size, peak, before, time.perf_counter() - started)
"""


def section_memory(args: Any, scratch: Path) -> None:
    rows = 256 if args.quick else 2048
    code = textwrap.dedent(MEMORY_CHILD)
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(C.ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(scratch / "rows"), str(scratch / "rows.out"), str(rows)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    size, peak, baseline, seconds = done.stdout.split()
    size_i, peak_i = int(size), int(peak)
    columns = ["result", "build time", "peak RssAnon", "of which before", "peak / result"]
    table = C.Table("Builder memory (a child process; RssAnon sampled every 2 ms)", columns)
    table.add(C.fmt_bytes(size_i), C.fmt_time(float(seconds)), C.fmt_bytes(peak_i),
              C.fmt_bytes(int(baseline)), f"{peak_i / size_i:.3f}x")  # fmt: skip
    table.print()
    print(f"builder peak anonymous memory vs result size: {peak_i / size_i:.3f}x "
          f"(target <= 0.25x: {C.verdict(peak_i / size_i, 0.25)})\n")  # fmt: skip
    (scratch / "rows.out").unlink()
    shutil.rmtree(scratch / "rows")


def section_dask(args: Any, folder: Folder, rounds: int) -> None:
    try:
        import distributed
    except ImportError:
        print("Dask: not installed (pip install '.[dask]' in a checkout); skipped\n")
        return
    n = len(folder.paths)
    with (
        distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                 dashboard_address=None, host="127.0.0.1",
                                 # its HTTP server on a free port (8787 may be taken)
                                 scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster,
        distributed.Client(cluster),
    ):  # fmt: skip

        def on_dask() -> Any:
            with joblib.parallel_config(backend="dask"):
                return folder.build(None, "dask.joblib")

        cases = {
            "local threaded build": C.Case(lambda: folder.build(None, "local.joblib")),
            "Dask LocalCluster, 2 workers": C.Case(on_dask),
        }
        C.measure(cases, rounds)
    same = (folder.out / "dask.joblib").read_bytes() == (folder.out / "local.joblib").read_bytes()
    local = cases["local threaded build"].median
    table = C.Table(f"Full build of {n:,} files on Dask (cluster start not timed; median of "
                    f"{rounds})", ["case", "median", "vs local"])  # fmt: skip
    for name, case in cases.items():
        table.add(name, C.fmt_time(case.median), f"{case.median / local:.2f}x")
    table.print()
    print(f"Dask LocalCluster (2 workers) vs local threaded build: "
          f"{cases['Dask LocalCluster, 2 workers'].median / local:.2f}x the time; "
          f"identical file: {same}\n")  # fmt: skip


def section_peers(args: Any, folder: Folder, scratch: Path) -> None:
    n = len(folder.paths)
    table = C.Table(f"Peers: full build of {n:,} files, one run each", ["tool", "time", "files/s"])
    started = time.perf_counter()
    folder.build(None, "peer-ref.joblib")
    ours = time.perf_counter() - started
    table.add("cachedload builder (threads)", C.fmt_time(ours), f"{n / ours:,.0f}")
    notes = []
    try:
        import litdata

        started = time.perf_counter()
        litdata.optimize(fn=decode_resize, inputs=folder.paths, output_dir=str(scratch / "lit"),
                         num_workers=2, chunk_bytes="64MB")  # fmt: skip
        lit = time.perf_counter() - started
        table.add("litdata.optimize, num_workers=2", C.fmt_time(lit), f"{n / lit:,.0f}")
        notes.append(f"builder vs litdata.optimize throughput: {lit / ours:.2f}x")
        started = time.perf_counter()
        np.asarray(litdata.StreamingDataset(f"local:{scratch / 'lit'}")[0])
        lit_first = time.perf_counter() - started
        table.add("litdata.StreamingDataset: open + first item", C.fmt_time(lit_first), "")
        notes.append(f"warm hit (mmap_mode='r') + first row vs litdata first item: "
                     f"{lit_first / folder.hit_seconds:.2f}x faster")  # fmt: skip
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        notes.append(f"litdata.optimize could not run here: {type(exc).__name__}: {exc}")
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ["HF_HOME"] = str(scratch / "hf")
        import datasets

        def hf_build() -> float:
            started = time.perf_counter()
            dataset = datasets.load_dataset(
                "imagefolder",
                data_dir=str(folder.root),
                split="train",
                cache_dir=str(scratch / "hf"),
            )

            def resize(example: dict[str, Any]) -> dict[str, Any]:
                image = np.asarray(example["image"].convert("RGB"))
                small = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
                return {"pixels": small}

            mapped = dataset.map(resize, remove_columns=["image"])
            elapsed = time.perf_counter() - started
            mapped.save_to_disk(str(scratch / "hf-saved"))
            return elapsed

        hf = hf_build()
        started = time.perf_counter()
        np.asarray(datasets.load_from_disk(str(scratch / "hf-saved"))[0]["pixels"])
        hf_first = time.perf_counter() - started
        table.add("HF datasets: load_from_disk + first item", C.fmt_time(hf_first), "")
        notes.append(f"warm hit (mmap_mode='r') + first row vs HF first item: "
                     f"{hf_first / folder.hit_seconds:.2f}x faster")  # fmt: skip
        shutil.rmtree(scratch / "hf-saved")
        table.add("HF datasets imagefolder + .map", C.fmt_time(hf), f"{n / hf:,.0f}")
        notes.append(f"builder vs HF datasets throughput: {hf / ours:.2f}x")
        folder.change_one()
        hf_again = hf_build()
        table.add("HF datasets after changing 1 file", C.fmt_time(hf_again), "")
    except Exception as exc:
        notes.append(f"HF datasets could not run here: {type(exc).__name__}: {exc}")
    table.print()
    for note in notes:
        print(note)
    print()


def main() -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="number of images (default 20,000; --quick 300)")
    args = parser.parse_args()
    rounds = args.repeats or (3 if args.quick else 5)
    n = args.n or (300 if args.quick else 20_000)
    C.banner("bench_builds: per-item builds, incremental, out of core, on Dask", args)
    print(f"load    : {os.getloadavg()[0]:.1f} (1-minute load average at the start)\n")
    with C.scratch(args, "builds") as scratch:
        folder = Folder(scratch, n, added=100 if args.quick else 1000)
        section_builds(args, folder, rounds, scratch)
        section_memory(args, scratch)
        section_dask(args, folder, 1 if args.quick else 3)
        if args.quick:
            print("litdata / HF datasets: skipped with --quick (minutes of start-up each)\n")
        else:
            section_peers(args, folder, scratch)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
