"""Per-item builds (cachedload.builder): full, incremental, out-of-core, on Dask, against peers.

Run: python benchmarks/bench_builds.py [--quick] [--tmp DIR] [--repeats N] [--n N]

A synthetic folder of 64x64 JPEGs (default 20,000, the size the issue measured; ``--quick``:
300), item function = decode + resize to 32x32 RGB. Measured through ``build_items`` (the
engine the decorator will call), in interleaved rounds:

* full build (threads) against a plain sequential ``cv2.imread`` + ``resize`` loop;
* change 1 file: the incremental build against a full build, and against what any cache must
  do at least (fingerprint the folder + ``cp`` of the result file);
* add 1,000 files: the incremental build against a full build;
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

from cachedload.builder import PreviousBuild, build_items, scan_items
from cachedload.fingerprint import fingerprint_source

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


def section_builds(args: Any, folder: Folder, rounds: int) -> None:
    n = len(folder.paths)
    threads = C.usable_cpus()
    cases = {
        "plain cv2 loop (1 thread)": C.Case(lambda: plain_loop(folder.paths)),
        "full build": C.Case(lambda: folder.build(None, "full.joblib")),
        "full build, 1 thread": C.Case(lambda: folder.build(None, "one.joblib", n_jobs=1)),
        "change 1 file, build again": C.Case(
            lambda: folder.build(folder.previous, "change.joblib"), before=folder.change_one
        ),
        "fingerprint + cp of the result": C.Case(
            lambda: (
                fingerprint_source(folder.root),
                shutil.copyfile(folder.base, folder.out / "copy.joblib"),
            )
        ),
        f"add {folder.added:,} files, build again": C.Case(
            lambda: folder.build(folder.previous, "added.joblib"),
            before=folder.add_spare,
            after=folder.remove_spare,
        ),
    }
    folder.computed.clear()
    C.measure(cases, rounds)
    loop = cases["plain cv2 loop (1 thread)"].median
    full = cases["full build"].median
    table = C.Table(
        f"Builds of {n:,} 64x64 JPEGs -> 32x32 RGB ({threads} threads; median of {rounds})",
        ["case", "median", "files/s", "vs loop", "vs full build"],
    )
    for name, case in cases.items():
        rate = f"{n / case.median:,.0f}" if "build" in name or "loop" in name else ""
        table.add(name, C.fmt_time(case.median), rate, f"{loop / case.median:.2f}x",
                  f"{case.median / full:.3f}x")  # fmt: skip
    table.print()
    change = cases["change 1 file, build again"].median
    floor = cases["fingerprint + cp of the result"].median
    added = cases[f"add {folder.added:,} files, build again"].median
    decodes = sorted(folder.computed["change.joblib"])
    print(f"full build throughput vs the plain loop: {loop / full:.2f}x "
          f"(target >= 1.5x: {C.verdict(loop / full, 1.5, higher_is_better=True)})")  # fmt: skip
    print(f"change 1 file vs full build: {change / full:.3f}x (target <= 0.05x: "
          f"{C.verdict(change / full, 0.05)}); decodes per such build: {decodes}")  # fmt: skip
    print(f"change 1 file vs fingerprint + cp: {change / floor:.2f}x "
          f"(target <= 2x: {C.verdict(change / floor, 2.0)})")  # fmt: skip
    print(f"add {folder.added:,} files vs full build: {added / full:.3f}x "
          f"(target <= 0.1x: {C.verdict(added / full, 0.1)})")  # fmt: skip
    print()


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
        print("Dask: not installed (pip install 'cachedload[dask]'); skipped\n")
        return
    n = len(folder.paths)
    with (
        distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                 dashboard_address=None, host="127.0.0.1") as cluster,
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

            dataset.map(resize, remove_columns=["image"])
            return time.perf_counter() - started

        hf = hf_build()
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
        section_builds(args, folder, rounds)
        section_memory(args, scratch)
        section_dask(args, folder, 1 if args.quick else 3)
        if args.quick:
            print("litdata / HF datasets: skipped with --quick (minutes of start-up each)\n")
        else:
            section_peers(args, folder, scratch)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
