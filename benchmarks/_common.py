"""Shared helpers of the benchmark scripts: banner, interleaved median timing, tables, child RSS.

Not a benchmark itself. The scripts put the repository root on ``sys.path`` so that they run
from a checkout without installing, then import this module as ``_common``.

Timing on a noisy machine: every comparison is measured in rounds, each round running every
case once in a shuffled order, so a baseline and the code it is compared with see the same
noise; the tables report medians over the rounds and ratios of those medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Sources are aged like a real dataset: mtimes a day old, far outside the 2 s racy window in
#: which cachedload verifies files by content.
AGED_NS = time.time_ns() - 86_400 * 1_000_000_000

MiB = 1024 * 1024
GiB = 1024 * MiB


# -- command line and banner ----------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares (``--quick``, ``--tmp``)."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (under a minute)"
    )
    result.add_argument(
        "--tmp",
        default=tempfile.gettempdir(),
        help="where to write the data (default: %(default)s)",
    )
    result.add_argument("--repeats", type=int, default=None, help="rounds per comparison")
    return result


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    return "RAM unknown"


def _file_system(path: str) -> str:
    """The file system type holding ``path`` (from /proc/mounts; best effort)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def banner(title: str, args: argparse.Namespace) -> None:
    """Print what ran where: machine, versions, date, mode."""
    import joblib
    import numpy
    import xxhash

    try:
        import cv2

        opencv = cv2.__version__
    except ImportError:
        opencv = "not installed"
    from cachedload import __version__

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"== {title} ==")
    print(f"date    : {now}   command: python {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(
        f"machine : {_cpu_model()}, {os.cpu_count()} cores ({usable_cpus()} usable), {_memory()}, "
        f"{platform.system()} {platform.release()}"
    )
    print(
        f"versions: Python {platform.python_version()}, numpy {numpy.__version__}, "
        f"joblib {joblib.__version__}, xxhash {xxhash.VERSION}, OpenCV {opencv}, "
        f"cachedload {__version__}"
    )
    print(f"data in : {args.tmp} ({_file_system(os.path.realpath(args.tmp))})", end="")
    print("   [--quick: small sizes, few repeats]" if args.quick else "")
    print()


# -- temporary data -------------------------------------------------------------------------


@contextlib.contextmanager
def scratch(args: argparse.Namespace, name: str) -> Iterator[Path]:
    """A temporary folder under ``--tmp``, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"cachedload-{name}-", dir=args.tmp))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def age(root: Path, mtime_ns: int = AGED_NS) -> None:
    """Set the mtime of every file below ``root`` to a day ago (see :data:`AGED_NS`)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(folder, name), ns=(mtime_ns, mtime_ns))


def make_tree(root: Path, n_files: int, per_folder: int = 1000) -> Path:
    """``n_files`` small files, ``per_folder`` to a folder, aged."""
    for index in range(n_files):
        folder = root / f"part{index // per_folder:04d}"
        if index % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"item_{index:07d}.bin").write_bytes(b"x" * (index % 97))
    age(root)
    return root


def write_images(folder: Path, n: int, side: int = 256, seed: int = 0) -> list[Path]:
    """``n`` synthetic JPEGs (smooth gradients plus noise, so they compress like photos) in
    two class folders, aged."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    paths = []
    for index in range(n):
        a, b, c = rng.uniform(1, 8, 3)
        phase = rng.uniform(0, 6.3, 3)
        image = np.dstack(
            [
                128 + 100 * np.sin(a * x + b * y + phase[0]),
                128 + 100 * np.cos(b * x - c * y + phase[1]),
                255 * (x * y) ** (c / 4) + 20 * np.sin(c * 9 * x + phase[2]),
            ]
        )
        image += rng.normal(0, 8, image.shape)
        path = folder / ("cats", "dogs")[index % 2] / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8))
        paths.append(path)
    age(folder)
    return paths


def drop_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- timing ---------------------------------------------------------------------------------


@dataclass
class Case:
    """One thing to time: ``run`` (timed), with untimed ``before``/``after`` around each run."""

    run: Callable[[], Any]
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(cases: dict[str, Case], rounds: int, warmup: bool = True) -> dict[str, Case]:
    """Run every case once per round, in a shuffled order per round; return the cases.

    ``warmup``: one untimed round first (imports, page cache, lazily built state).
    """
    order = list(cases)
    for round_number in range(rounds + (1 if warmup else 0)):
        random.shuffle(order)
        for name in order:
            case = cases[name]
            if case.before is not None:
                case.before()
            started = time.perf_counter()
            result = case.run()
            elapsed = time.perf_counter() - started
            del result  # freeing the result is not part of the call
            if case.after is not None:
                case.after()
            if round_number or not warmup:
                case.times.append(elapsed)
    return cases


def median_time(fn: Callable[[], Any], rounds: int, warmup: bool = True) -> float:
    """Median seconds of ``fn()`` over ``rounds`` calls."""
    return measure({"fn": Case(fn)}, rounds, warmup)["fn"].median


def per_call(fn: Callable[[], Any], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean seconds per call in a loop of ``calls`` calls."""

    def loop() -> None:
        for _ in range(calls):
            fn()

    return median_time(loop, rounds) / calls


# -- the stat floor -------------------------------------------------------------------------

# What one stat per file costs with no interpreter at all: readdir + fstatat over a tree, timed
# inside the program (no process start-up), the minimum over N walks after a warm-up one.
_STAT_FLOOR_C = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
static long long total;
static void walk(int parent, const char *name) {
    int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    DIR *dir = fdopendir(fd);
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        const char *n = entry->d_name;
        if (n[0] == '.' && (!n[1] || (n[1] == '.' && !n[2]))) continue;
        if (entry->d_type == DT_DIR) { walk(fd, n); continue; }
        struct stat info;
        if (fstatat(fd, n, &info, AT_SYMLINK_NOFOLLOW) == 0)
            total += info.st_size + info.st_mtim.tv_nsec;
    }
    closedir(dir);
}
int main(int argc, char **argv) {
    int repeats = atoi(argv[2]);
    double best = 1e9;
    for (int i = 0; i <= repeats; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        walk(AT_FDCWD, argv[1]);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double t = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
        if (i > 0 && t < best) best = t;
    }
    printf("%.9f %lld\n", best, total);
    return 0;
}
"""


def stat_floor(scratch: Path, root: Path, repeats: int) -> float | None:
    """Seconds per walk of ``root`` by the C floor program, or None without a C compiler."""
    source, program = scratch / "stat_floor.c", scratch / "stat_floor"
    if not program.exists():
        source.write_text(_STAT_FLOOR_C)
        for compiler in ("cc", "gcc", "clang"):
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                subprocess.run(
                    [compiler, "-O2", "-o", str(program), str(source)],
                    check=True,
                    capture_output=True,
                )
                break
        else:
            return None
    result = subprocess.run(
        [str(program), str(root), str(repeats)], capture_output=True, text=True, check=True
    )
    return float(result.stdout.split()[0])


# -- child processes ------------------------------------------------------------------------


@dataclass
class ChildResult:
    stdout: str
    wall_seconds: float
    peak_rss: int  # bytes (VmHWM of the child; ru_maxrss where there is no /proc)


def run_child(code: str, env: dict[str, str] | None = None, timeout: float = 600) -> ChildResult:
    """Run ``code`` in a fresh interpreter (repository on ``sys.path``); return its stdout,
    wall time and peak resident set size.

    The peak is the child's ``VmHWM`` (Linux), printed by an exit hook: ``ru_maxrss`` would
    count the parent's size too, since a child forked (or vforked) from the benchmark starts
    with the parent's memory before it execs.
    """
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    code = textwrap.dedent(code) + _PEAK_HOOK
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=out, stderr=err, env=full_env
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.001)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode()
        if process.returncode != 0:
            raise RuntimeError(f"child failed ({process.returncode}):\n{err.read().decode()}")
    stdout, _, peak = stdout.rpartition(_PEAK_MARK)
    if peak.strip():
        return ChildResult(stdout, wall, int(peak) * 1024)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux
    return ChildResult(stdout, wall, usage.ru_maxrss * scale)


_PEAK_MARK = "\n@@peak-kib@@"
_PEAK_HOOK = f"""
def _print_peak():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    print({_PEAK_MARK!r} + line.split()[1], end="")
    except OSError:
        pass
import atexit as _atexit
_atexit.register(_print_peak)
"""


# -- reporting ------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def fmt_bytes(count: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


class Table:
    """Rows of text printed with aligned columns (the first left-aligned, the rest right)."""

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def print(self) -> None:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]

        def line(cells: Sequence[str]) -> str:
            parts = [cells[0].ljust(widths[0])]
            parts += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=False)]
            return "  ".join(parts).rstrip()

        print(self.title)
        print(line(self.columns))
        print(line(["-" * w for w in widths]))
        for row in self.rows:
            print(line(row))
        print()


def verdict(ratio: float, limit: float, higher_is_better: bool = False) -> str:
    """``met``/``missed`` against a target (information only: benchmarks are not gates)."""
    ok = ratio >= limit if higher_is_better else ratio <= limit
    return "met" if ok else "MISSED"
