"""How fast does load_image_folder decode a folder of JPEGs, against plain loops?

Run: python benchmarks/bench_images.py [--quick] [--n N]

Writes N synthetic 256x256 JPEGs (smooth gradients plus noise, so they compress like photos) to
a temporary folder, reads them all once so every method starts from a warm page cache, then
times each method (median of the repeats) and prints images/s with the ratio against a
sequential cv2.imread + cv2.resize(INTER_AREA) + cv2.cvtColor loop to the same size; then the
same for N 64x64 JPEGs to 32x32, where the Python around each decode, not the decoder, is the
cost (the GIL is what bounds a second thread). It also
measures how far the reduced JPEG decoding strays from a full decode, and the peak memory
(ru_maxrss) of a child process running load_image_folder against the output array size plus a
child that only imports cachedload.images. A measurement, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _common import write_images  # noqa: E402

from cachedload import images as images_module  # noqa: E402
from cachedload.images import load_image_folder  # noqa: E402

SIDE = 256
SMALL = 64  # the small images' side


def cv2_loop(paths: list[Path], side: int) -> np.ndarray:
    out = np.empty((len(paths), side, side, 3), np.uint8)
    for i, path in enumerate(paths):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert img is not None
        img = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
        out[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return out


def pillow_loop(paths: list[Path], side: int) -> np.ndarray:
    out = np.empty((len(paths), side, side, 3), np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            out[i] = np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BOX))
    return out


def peak_rss_mib(code: str) -> float:
    """Peak resident memory of a child Python running code, in MiB.

    On Linux this reads VmHWM: ru_maxrss survives exec, so a child would report at least the
    resident size of this (big) parent process at the fork.
    """
    probe = (
        "import resource, sys\n"
        f"{code}\n"
        "try:\n"
        "    hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "    print(int(hwm) / 1024)\n"
        "except OSError:\n"
        "    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    print(rss / 2**20 if sys.platform == 'darwin' else rss / 1024)\n"
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": path},
        check=True,
        capture_output=True,
        text=True,
    )
    return float(done.stdout.split()[-1])


def busy_cpu_seconds() -> float | None:
    """CPU seconds spent by the whole machine so far (Linux), to spot a busy benchmark host."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def reduced_decode_error(paths: list[Path], side: int) -> float:
    """Mean absolute difference (grey levels) of load_image_folder vs full decode + INTER_AREA."""
    root = paths[0].parent.parent  # the class folders' parent
    ours = load_image_folder(root, size=(side, side), progress=False).images
    full = cv2_loop(paths, side)
    return float(np.abs(ours.astype(np.int16) - full).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images, 1 repeat")
    parser.add_argument("--n", type=int, help="number of images (default 2000, 200 with --quick)")
    args = parser.parse_args()
    n = args.n or (200 if args.quick else 2000)
    repeats = 1 if args.quick else 3
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print(f"machine : {platform.machine()} {platform.system()}, {cores} cores ({usable} usable)")
    print(f"versions: Python {platform.python_version()}, numpy {np.__version__}, ", end="")
    print(f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), Pillow {PIL.__version__}")

    with tempfile.TemporaryDirectory(prefix="bench_images_") as tmp:
        folder = Path(tmp)
        paths = sorted(write_images(folder / "large", n, side=SIDE))
        small_folder = folder / "small"
        small = sorted(write_images(small_folder, n, side=SMALL, seed=1))
        for path in paths + small:  # warm the page cache: every method reads from memory
            path.read_bytes()
        print(f"data    : {n} JPEGs {SIDE}x{SIDE} and {n} {SMALL}x{SMALL} (quality 95) in {folder}")
        print(f"repeats : {repeats}")

        def ours(
            side: int, n_jobs: int | None = None, reduce: bool = True, root: Path | None = None
        ) -> Callable[[], Any]:
            def run() -> Any:
                saved = images_module._reduction
                if not reduce:  # measure the same call with reduced JPEG decoding disabled
                    images_module._reduction = lambda data, size: 1
                try:
                    return load_image_folder(
                        root or folder / "large", size=(side, side), n_jobs=n_jobs, progress=False
                    )
                finally:
                    images_module._reduction = saved

            return run

        # (size, method, function); the first row of each size is the baseline for its ratios
        cases: list[tuple[int, str, Callable[[], Any]]] = [
            (128, "cv2 loop: imread+resize+cvtColor", lambda: cv2_loop(paths, 128)),
            (128, "Pillow loop: open+RGB+resize(BOX)", lambda: pillow_loop(paths, 128)),
            (128, "load_image_folder n_jobs=1", ours(128, 1)),
            (128, "load_image_folder n_jobs=2", ours(128, 2)),
            (128, f"load_image_folder default ({usable} threads)", ours(128)),
            (64, "cv2 loop: imread+resize+cvtColor", lambda: cv2_loop(paths, 64)),
            (64, "load_image_folder n_jobs=1", ours(64, 1)),
            (64, "load_image_folder default, no reduced", ours(64, reduce=False)),
            (64, f"load_image_folder default ({usable} threads)", ours(64)),
            (32, "64x64 sources: cv2 loop", lambda: cv2_loop(small, 32)),
            (32, "64x64 sources: load_image_folder n_jobs=1", ours(32, 1, root=small_folder)),
            (32, "64x64 sources: load_image_folder n_jobs=2", ours(32, 2, root=small_folder)),
        ]
        times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
        busy_before, ours_before, wall_before = busy_cpu_seconds(), os.times(), time.perf_counter()
        for _ in range(repeats):  # interleaved, so that a burst of other load hits every method
            for i, (_side, _name, fn) in enumerate(cases):
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
        median = {i: statistics.median(t) for i, t in times.items()}
        busy_after, ours_after, wall = busy_cpu_seconds(), os.times(), time.perf_counter()
        if busy_before is not None and busy_after is not None:
            mine = sum(ours_after[:2]) - sum(ours_before[:2])
            others = max(0.0, busy_after - busy_before - mine) / (wall - wall_before)
            print(f"other processes kept {others:.2f} of the {usable} cores busy while timing")

        print()
        print(f"{'size':>7}  {'method':<42} {'median s':>9} {'images/s':>9} {'vs cv2 loop':>12}")
        baseline: dict[int, float] = {}
        for i, (side, name, _fn) in enumerate(cases):
            base = baseline.setdefault(side, median[i])
            print(
                f"{side:>3}x{side:<3}  {name:<42} {median[i]:9.3f} {n / median[i]:9.0f} "
                f"{base / median[i]:11.2f}x"
            )

        print()
        print("against the targets (they assume 2 cores):")
        print(f"  default, 128x128, vs cv2 loop   : {median[0] / median[4]:.2f}x (target >= 1.5x)")
        print(f"  default, 64x64, vs cv2 loop     : {median[5] / median[8]:.2f}x (target >= 2x)")
        print(f"  default, 128x128, vs Pillow loop: {median[1] / median[4]:.2f}x (target >= 3x)")
        print(f"  64x64 -> 32x32, n_jobs=2 vs n_jobs=1: {median[10] / median[11]:.2f}x")
        for side in (128, 64, 32):
            print(
                f"  {side}x{side}: mean |load_image_folder - full decode + INTER_AREA| = "
                f"{reduced_decode_error(paths, side):.2f} grey levels"
            )

        print()
        base = peak_rss_mib("import numpy, cachedload.images")
        print(f"peak memory of a child process; interpreter alone: {base:.1f} MiB")
        for size in ("(128, 128)", "None"):
            code = (
                "from cachedload.images import load_image_folder\n"
                f"data = load_image_folder({str(folder / 'large')!r}, size={size}, progress=False)"
            )
            peak = peak_rss_mib(code)
            side = SIDE if size == "None" else 128
            out = n * side * side * 3 / 2**20
            print(
                f"  size={size:<10}: peak {peak:6.1f} MiB, output {out:6.1f} MiB; "
                f"peak / (output + interpreter) = {peak / (out + base):.2f} (target <= 1.2); "
                f"(peak - interpreter) / output = {(peak - base) / out:.2f}"
            )


if __name__ == "__main__":
    main()
