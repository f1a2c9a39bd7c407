"""What does each part of a cache hit cost, against a baseline measured in the same run?

Run: python benchmarks/bench_hit_path.py [--quick] [--tmp DIR] [--repeats N]

One section per part of a hit (and of a miss), each timed in interleaved rounds with its
baseline (see ``_common.measure``); medians and ratios of medians, then a summary against the
targets of issue 6. Sizes: 100,000 files and 1 GiB arrays (``--quick``: 5,000 files, 32 MiB).
Source trees are aged (mtimes a day old) like a real dataset, except in the row that measures
hits on freshly written ("racy") sources. A measurement, not a pass/fail test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import _common as C  # first: puts the repository on sys.path
import joblib
import numpy as np
import xxhash

from cachedload import cached_dataset, serialize
from cachedload import fingerprint as fingerprint_module
from cachedload.fingerprint import fingerprint_source
from cachedload.hashing import value_digest
from cachedload.images import ImageFolderData

SUMMARY = C.Table(
    "summary against the targets (ratio = ours / baseline unless said otherwise)",
    ["part of a hit", "ours", "baseline", "ratio", "target", ""],
)


def naive_fingerprint(root: str) -> str:
    """The obvious implementation: os.walk, a stat per file, sort, one update per field."""
    records = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            info = os.stat(path)
            records.append((os.path.relpath(path, root), info.st_size, info.st_mtime_ns))
    records.sort()
    hasher = xxhash.xxh3_128()
    for relpath, size, mtime in records:
        hasher.update(relpath.encode())
        hasher.update(size.to_bytes(8, "little"))
        hasher.update(mtime.to_bytes(8, "little"))
    return hasher.hexdigest()


def fingerprint_threaded(root: str) -> Any:
    """fingerprint_source with the thread-pool walk forced (meant for network file systems)."""
    saved = fingerprint_module._SLOW_STAT_SECONDS
    fingerprint_module._SLOW_STAT_SECONDS = 0.0
    try:
        return fingerprint_source(root)
    finally:
        fingerprint_module._SLOW_STAT_SECONDS = saved


def section_fingerprint_tree(args: Any, scratch: Path, rounds: int) -> None:
    n_files = 5_000 if args.quick else 100_000
    root = C.make_tree(scratch / "tree", n_files)
    find = ["find", str(root), "-type", "f", "-printf", "%P %s %T@\n"]
    cases = C.measure(
        {
            "find -printf '%P %s %T@'": C.Case(
                lambda: subprocess.run(find, stdout=subprocess.DEVNULL, check=True)
            ),
            "fingerprint_source (mtime)": C.Case(lambda: fingerprint_source(root)),
            "naive os.walk + stat + sort + xxh3 per field": C.Case(
                lambda: naive_fingerprint(str(root))
            ),
            "fingerprint_source, thread pool forced": C.Case(
                lambda: fingerprint_threaded(str(root))
            ),
        },
        rounds,
    )
    base = cases["find -printf '%P %s %T@'"].median
    table = C.Table(
        f"fingerprint a {n_files:,}-file tree ({n_files // 1000} folders, aged), warm dentry cache",
        ["method", "median", "per file", "vs find"],
    )
    for name, case in cases.items():
        table.add(
            name,
            C.fmt_time(case.median),
            C.fmt_time(case.median / n_files),
            f"{case.median / base:.2f}x",
        )
    floor = C.stat_floor(scratch, root, rounds)
    if floor is not None:
        table.add(
            "the floor: C readdir + fstatat loop, in-process",
            C.fmt_time(floor),
            C.fmt_time(floor / n_files),
            f"{floor / base:.2f}x",
        )
    table.print()
    ours = cases["fingerprint_source (mtime)"].median
    SUMMARY.add(
        f"fingerprint {n_files:,} files (mtime)",
        C.fmt_time(ours),
        f"find {C.fmt_time(base)}",
        f"{ours / base:.2f}x",
        "<= 1.5x (stretch <= 1x)",
        C.verdict(ours / base, 1.5),
    )


def section_content_mode(args: Any, scratch: Path, rounds: int) -> None:
    size = 32 * C.MiB if args.quick else C.GiB
    path = scratch / "big.bin"
    np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tofile(path)

    def xxh3_8mb_chunks() -> str:
        hasher = xxhash.xxh3_128()
        with open(path, "rb") as handle:
            while chunk := handle.read(8 * C.MiB):
                hasher.update(chunk)
        return hasher.hexdigest()

    cases = C.measure(
        {
            "xxh3_128 over 8 MB reads": C.Case(xxh3_8mb_chunks),
            "fingerprint_source(mode='content')": C.Case(
                lambda: fingerprint_source(path, mode="content")
            ),
        },
        rounds,
    )
    base = cases["xxh3_128 over 8 MB reads"].median
    ours = cases["fingerprint_source(mode='content')"].median
    table = C.Table(
        f"content fingerprint of one {C.fmt_bytes(size)} file, page cache warm",
        ["method", "median", "GB/s", "ratio"],
    )
    for name, case in cases.items():
        table.add(
            name,
            C.fmt_time(case.median),
            f"{size / case.median / 1e9:.1f}",
            f"{case.median / base:.2f}x",
        )
    table.print()
    SUMMARY.add(
        f"fingerprint one {C.fmt_bytes(size)} file (content)",
        C.fmt_time(ours),
        f"xxh3 {C.fmt_time(base)}",
        f"{ours / base:.2f}x",
        "<= 1.2x",
        C.verdict(ours / base, 1.2),
    )
    path.unlink()


def section_hash_argument(args: Any, rounds: int) -> None:
    size = 32 * C.MiB if args.quick else C.GiB
    array = np.random.default_rng(1).random(size // 8)
    cases = C.measure(
        {
            "joblib.hash": C.Case(lambda: joblib.hash(array)),
            "value_digest (cachedload.hashing)": C.Case(lambda: value_digest(array)),
            "xxh3_128 of the buffer alone": C.Case(lambda: xxhash.xxh3_128(array.data).hexdigest()),
        },
        max(3, rounds // 2),
    )
    base = cases["joblib.hash"].median
    ours = cases["value_digest (cachedload.hashing)"].median
    table = C.Table(
        f"hash a {C.fmt_bytes(size)} float64 array argument",
        ["method", "median", "GB/s", "speed-up vs joblib.hash"],
    )
    for name, case in cases.items():
        table.add(
            name,
            C.fmt_time(case.median),
            f"{size / case.median / 1e9:.2f}",
            f"{base / case.median:.1f}x",
        )
    table.print()
    SUMMARY.add(
        f"hash a {C.fmt_bytes(size)} numpy argument",
        C.fmt_time(ours),
        f"joblib.hash {C.fmt_time(base)}",
        f"{base / ours:.1f}x faster",
        ">= 20x faster",
        C.verdict(base / ours, 20, higher_is_better=True),
    )


def _big_result(source: str, nbytes: int) -> np.ndarray[Any, Any]:
    return np.full(nbytes, 7, dtype=np.uint8)


def section_restore(args: Any, scratch: Path, rounds: int) -> None:
    size = 32 * C.MiB if args.quick else C.GiB
    small = C.MiB
    source = C.make_tree(scratch / "src10", 10, per_folder=10)
    cache = scratch / "cache-restore"
    in_memory = cached_dataset(cache_dir=cache)(_big_result)
    mapped = cached_dataset(cache_dir=cache, mmap_mode="r")(_big_result)
    in_memory(str(source), size)  # stores both entries, shared by the two wrappers
    in_memory(str(source), small)
    array = np.full(size, 7, dtype=np.uint8)
    npy, jbl = scratch / "array.npy", scratch / "array.joblib"
    np.save(npy, array)
    joblib.dump(array, jbl)
    del array

    def joblib_mmap_copy() -> Any:
        return np.array(joblib.load(jbl, mmap_mode="r"), copy=True)

    cases = C.measure(
        {
            "np.load (np.save file)": C.Case(lambda: np.load(npy)),
            "whole cachedload hit, mmap_mode=None": C.Case(lambda: in_memory(str(source), size)),
            "serialize.load alone, mmap_mode=None": C.Case(
                lambda: serialize.load(
                    in_memory.cache_path(str(source), size) / "result.joblib", mmap_mode=None
                )
            ),
            "joblib.load": C.Case(lambda: joblib.load(jbl)),
            "joblib.load(mmap_mode='r') + copy": C.Case(joblib_mmap_copy),
        },
        rounds,
    )
    base = cases["np.load (np.save file)"].median
    table = C.Table(
        f"restore a {C.fmt_bytes(size)} array, mmap_mode=None, page cache warm",
        ["method", "median", "GB/s", "vs np.load"],
    )
    for name, case in cases.items():
        table.add(
            name,
            C.fmt_time(case.median),
            f"{size / case.median / 1e9:.2f}",
            f"{case.median / base:.2f}x",
        )
    table.print()
    ours = cases["whole cachedload hit, mmap_mode=None"].median
    SUMMARY.add(
        f"restore {C.fmt_bytes(size)}, mmap_mode=None (whole hit)",
        C.fmt_time(ours),
        f"np.load {C.fmt_time(base)}",
        f"{ours / base:.2f}x",
        "<= 1.2x",
        C.verdict(ours / base, 1.2),
    )

    cases = C.measure(
        {
            f"hit, mmap_mode='r', {C.fmt_bytes(small)}": C.Case(lambda: mapped(str(source), small)),
            f"hit, mmap_mode='r', {C.fmt_bytes(size)}": C.Case(lambda: mapped(str(source), size)),
        },
        rounds * 20,
    )
    base = cases[f"hit, mmap_mode='r', {C.fmt_bytes(small)}"].median
    ours = cases[f"hit, mmap_mode='r', {C.fmt_bytes(size)}"].median
    table = C.Table("restore with mmap_mode='r': constant in size", ["method", "median", "ratio"])
    for name, case in cases.items():
        table.add(name, C.fmt_time(case.median), f"{case.median / base:.2f}x")
    table.print()
    SUMMARY.add(
        f"restore {C.fmt_bytes(size)}, mmap_mode='r'",
        C.fmt_time(ours),
        f"same, {C.fmt_bytes(small)}: {C.fmt_time(base)}",
        f"{ours / base:.2f}x",
        "<= 3x",
        C.verdict(ours / base, 3),
    )
    in_memory.cache_clear()


def section_restricted_load(args: Any, scratch: Path, rounds: int) -> None:
    """serialize.load with the restricted unpickler (shared caches) against the unrestricted one."""
    count = 1000 if args.quick else 8000  # 8000 images of 64x64x3: 94 MiB, like a real folder
    images = np.random.default_rng(2).integers(0, 255, (count, 64, 64, 3), dtype=np.uint8)
    paths = tuple(f"class_{i % 10}/img_{i:05d}.png" for i in range(count))
    classes = tuple(f"class_{i}" for i in range(10))
    folder = ImageFolderData(images, np.arange(count, dtype=np.int64) % 10, classes, paths)
    big = f"ImageFolderData {C.fmt_bytes(images.nbytes)}"
    values = {"tiny {'answer': 42}": {"answer": 42}, big: folder}

    def repeat(fn: Any, calls: int) -> C.Case:
        def loop() -> None:
            for _ in range(calls):
                fn()

        return C.Case(loop)

    cases: dict[str, C.Case] = {}
    calls: dict[str, int] = {}
    for label, value in values.items():
        path = scratch / f"restricted-{len(cases)}.joblib"
        serialize.dump(value, path)
        for mode in (None, "r"):
            for safe in (None, ()):
                name = f"{label}, mmap_mode={mode!r}, safe_types={safe!r}"
                calls[name] = 5 if label == big and mode is None else 200
                cases[name] = repeat(
                    lambda p=path, m=mode, s=safe: serialize.load(p, mmap_mode=m, safe_types=s),
                    calls[name],
                )
        name = f"{label}: check_safe (at store time)"
        calls[name] = 20
        cases[name] = repeat(lambda v=value: serialize.check_safe(v), calls[name])
    # The reference for a tiny result: what a whole warm hit costs (the load is part of it).
    source = str(C.make_tree(scratch / "src-restricted", 10, per_folder=10))
    hit = cached_dataset(cache_dir=scratch / "cache-restricted")(_tiny)
    hit(source)
    calls["whole warm hit, tiny result (reference)"] = 200
    cases["whole warm hit, tiny result (reference)"] = repeat(lambda: hit(source), 200)
    measured = C.measure(cases, rounds * 3)
    table = C.Table(
        "serialize.load, restricted (safe_types=()) vs unrestricted, page cache warm",
        ["load", "median per call", "restricted - unrestricted", "ratio"],
    )
    ratios: dict[str, float] = {}
    for name, case in measured.items():
        per_call = case.median / calls[name]
        if not name.endswith("safe_types=()"):
            table.add(name, C.fmt_time(per_call), "", "")
            continue
        other = name.replace("safe_types=()", "safe_types=None")
        base = measured[other].median / calls[other]
        ratios[name] = per_call / base
        table.add(
            name, C.fmt_time(per_call), C.fmt_time(per_call - base), f"{per_call / base:.2f}x"
        )
    table.print()
    whole = measured["whole warm hit, tiny result (reference)"].median / 200
    added = max(
        measured[name].median / calls[name]
        - measured[name.replace("()", "None")].median / calls[name.replace("()", "None")]
        for name in ratios
        if name.startswith("tiny")
    )
    SUMMARY.add(
        "restricted unpickler, tiny result: time added",
        C.fmt_time(added),
        f"whole warm hit {C.fmt_time(whole)}",
        f"{added / whole:.1%} of a hit",
        "nothing measurable (< 2%)",
        C.verdict(added / whole, 0.02),
    )
    worst = max(ratio for name, ratio in ratios.items() if name.startswith(big))
    SUMMARY.add(
        f"restricted unpickler, {big} (worst mmap_mode)",
        f"{worst:.2f}x",
        "unrestricted load",
        f"{worst:.2f}x",
        "nothing measurable (<= 1.05x)",
        C.verdict(worst, 1.05),
    )


def _tiny(source: str) -> dict[str, int]:
    return {"answer": 42}


def _empty() -> None:
    return None


def section_tiny_hit(args: Any, scratch: Path, rounds: int) -> None:
    aged = C.make_tree(scratch / "aged10", 10, per_folder=10)
    aged_hit = cached_dataset(cache_dir=scratch / "cache-tiny")(_tiny)
    aged_hit(str(aged))
    calls = 100 if args.quick else 500
    empty = C.per_call(_empty, calls * 10, rounds)
    ours = C.per_call(lambda: aged_hit(str(aged)), calls, rounds)

    # Freshly written sources: for 2 s their files' mtimes cannot be trusted, so hits verify
    # those files by content. Measured within that window, on a tree written just before.
    racy_times = []
    for attempt in range(rounds):
        fresh = scratch / f"fresh{attempt}"
        C.make_tree(fresh, 10, per_folder=10)
        for path in fresh.rglob("*.bin"):
            os.utime(path)  # now
        racy_hit = cached_dataset(cache_dir=scratch / "cache-tiny")(_tiny)
        racy_hit(str(fresh))
        racy_times.append(C.per_call(lambda: racy_hit(str(fresh)), 50, 1))  # noqa: B023
    racy = sorted(racy_times)[len(racy_times) // 2]

    child = f"""
        import time
        from cachedload import cached_dataset
        def _tiny(source):
            return {{"answer": 42}}
        load = cached_dataset(cache_dir={str(scratch / "cache-fresh")!r})(_tiny)
        started = time.perf_counter()
        load({str(aged)!r})
        middle = time.perf_counter()
        load({str(aged)!r})
        print(middle - started, time.perf_counter() - middle)
    """
    C.run_child(child)  # stores the entry: every later child hits
    runs = [C.run_child(child).stdout.split() for _ in range(max(3, rounds // 2))]
    first_median = sorted(float(first) for first, _ in runs)[len(runs) // 2]
    second_median = sorted(float(second) for _, second in runs)[len(runs) // 2]
    table = C.Table(
        "whole warm hit: tiny result, 10-file source", ["call", "median", "vs empty call"]
    )
    table.add("empty Python function call", C.fmt_time(empty), "1x")
    table.add("hit, same process, aged source", C.fmt_time(ours), f"{ours / empty:,.0f}x")
    table.add(
        "hit, same process, source written < 2 s ago", C.fmt_time(racy), f"{racy / empty:,.0f}x"
    )
    table.add(
        "first call of a fresh interpreter (a hit)",
        C.fmt_time(first_median),
        f"{first_median / empty:,.0f}x",
    )
    table.add(
        "second call of a fresh interpreter",
        C.fmt_time(second_median),
        f"{second_median / empty:,.0f}x",
    )
    table.print()
    SUMMARY.add(
        "whole warm hit, tiny result, 10 files",
        C.fmt_time(ours),
        f"empty call {C.fmt_time(empty)}",
        f"{ours / empty:,.0f}x",
        "< 1 ms absolute",
        "met" if ours < 1e-3 else "MISSED",
    )


_READS = ("read", "pread64", "preadv", "preadv2", "readv")
_STATS = ("newfstatat", "statx", "fstat", "lstat", "stat", "fstatat64", "stat64", "lstat64")


def _syscalls(trace: str) -> tuple[Counter[str], int, int]:
    """Syscall counts between the markers of an ``strace -f`` log, bytes read, and the stats
    of source files (named ``item_*``)."""
    calls: Counter[str] = Counter()
    read_bytes = source_stats = 0
    inside = False
    for raw in trace.splitlines():
        line = re.sub(r"^(\[pid\s+)?\d+\]?\s+", "", raw)
        if "cachedload-marker-begin" in line:
            inside = True
            continue
        if "cachedload-marker-end" in line:
            break
        if not inside:
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>.*=\s+(-?\d+)", line)
        if resumed:
            if resumed.group(1) in _READS and int(resumed.group(2)) > 0:
                read_bytes += int(resumed.group(2))
            continue
        call = re.match(r"(\w+)\(", line)
        if not call:
            continue
        name = call.group(1)
        calls[name] += 1
        if name in _STATS and '"item_' in line:
            source_stats += 1
        finished = re.search(r"\)\s+=\s+(-?\d+)", line)
        if name in _READS and finished and "<unfinished" not in line:
            read_bytes += max(0, int(finished.group(1)))
    return calls, read_bytes, source_stats


def section_syscalls(args: Any, scratch: Path) -> None:
    """The proof: strace one warm hit and count what it asks of the kernel."""
    if shutil.which("strace") is None:
        print("syscalls of one warm hit: strace not found, section skipped\n")
        return
    n_files = 100
    nbytes = 8 * C.MiB if args.quick else 256 * C.MiB
    source = C.make_tree(scratch / "src-strace", n_files, per_folder=n_files)
    table = C.Table(
        f"syscalls of one warm hit (strace -f): {n_files}-file source, {C.fmt_bytes(nbytes)} array",
        ["syscall", "mmap_mode=None", "mmap_mode='r'"],
    )
    columns = []
    for mode in (None, "r"):
        code = f"""
            import os
            import numpy as np
            from cachedload import cached_dataset
            def _big(source, nbytes):
                return np.full(nbytes, 7, dtype=np.uint8)
            cache = {str(scratch / "cache-strace")!r}
            load = cached_dataset(cache_dir=cache, mmap_mode={mode!r})(_big)
            load({str(source)!r}, {nbytes})
            load({str(source)!r}, {nbytes})  # imports, code digest, page cache: all warm
            for marker in ("begin", None, "end"):
                if marker is None:
                    load({str(source)!r}, {nbytes})
                    continue
                try:
                    os.stat("/cachedload-marker-" + marker)
                except OSError:
                    pass
        """
        trace = scratch / "trace.txt"
        try:
            subprocess.run(
                [
                    "strace",
                    "-f",
                    "-qq",
                    "-o",
                    str(trace),
                    sys.executable,
                    "-c",
                    textwrap.dedent(code),
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "PYTHONPATH": str(C.ROOT)},
            )
        except (OSError, subprocess.CalledProcessError) as error:  # e.g. ptrace not permitted
            print(f"syscalls of one warm hit: strace failed ({error}), section skipped\n")
            return
        columns.append(_syscalls(trace.read_text()))
    groups: list[tuple[str, tuple[str, ...]]] = [
        ("getdents64 (list the folder)", ("getdents64",)),
        ("openat", ("openat",)),
        ("read/pread/preadv calls", _READS),
        ("mmap / munmap / madvise", ("mmap", "munmap", "madvise")),
        ("write (the .used hit counter)", ("write",)),
        ("clone3 + futex (reader threads)", ("clone3", "clone", "futex")),
    ]

    def count(calls: Counter[str], names: tuple[str, ...]) -> int:
        return sum(calls[name] for name in names)

    table.add("stat of a source file", *(source for _, _, source in columns))
    table.add(
        "other stat/fstat (source root, realpath, entry)",
        *(count(calls, _STATS) - source for calls, _, source in columns),
    )
    for label, names in groups:
        table.add(label, *(count(calls, names) for calls, _, _ in columns))
        if names == _READS:
            table.add("  bytes read", *(C.fmt_bytes(read) for _, read, _ in columns))
    grouped = _STATS + tuple(name for _, names in groups for name in names)
    table.add("everything else", *(sum(c.values()) - count(c, grouped) for c, _, _ in columns))
    table.add("total", *(sum(calls.values()) for calls, _, _ in columns))
    table.print()
    _calls, read, source_stats = columns[0]
    SUMMARY.add(
        "syscalls of a hit (strace), mmap_mode=None",
        f"{source_stats} stats, {C.fmt_bytes(read)} read",
        f"{n_files} files, {C.fmt_bytes(nbytes)} data",
        f"{source_stats / n_files:.2f} stat/file, {read / nbytes:.3f}x data",
        "1 stat per file + 1 read",
        "met" if source_stats == n_files and nbytes <= read <= nbytes + 64 * 1024 else "MISSED",
    )


HEAVY = ("cv2", "tqdm", "joblib", "filelock", "platformdirs", "PIL", "torch", "scipy", "pandas")


def section_import(args: Any, rounds: int) -> None:
    probe = f"import sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    ours: list[float] = []
    base: list[float] = []
    bare: list[float] = []
    imported = ""
    for _ in range(rounds * 2):
        ours.append(C.run_child("import cachedload").wall_seconds)
        base.append(C.run_child("import numpy, joblib").wall_seconds)
        bare.append(C.run_child("pass").wall_seconds)
    imported = C.run_child("import cachedload\n" + probe).stdout.strip()
    ours_m, base_m, bare_m = (sorted(x)[len(x) // 2] for x in (ours, base, bare))
    table = C.Table(
        "import in a new interpreter (wall time of the whole process)",
        ["command", "median", "ratio"],
    )
    table.add('python -c "pass"', C.fmt_time(bare_m), f"{bare_m / base_m:.2f}x")
    table.add('python -c "import numpy, joblib"', C.fmt_time(base_m), "1.00x")
    table.add('python -c "import cachedload"', C.fmt_time(ours_m), f"{ours_m / base_m:.2f}x")
    table.print()
    print(f"heavy modules loaded by `import cachedload`: {imported or 'none'}", end=" ")
    print(f"(checked: {', '.join(HEAVY)})\n")
    SUMMARY.add(
        "import cachedload (new interpreter)",
        C.fmt_time(ours_m),
        f"numpy+joblib {C.fmt_time(base_m)}",
        f"{ours_m / base_m:.2f}x",
        "<= 1.3x",
        C.verdict(ours_m / base_m, 1.3),
    )


def section_cold_call(args: Any, scratch: Path, rounds: int) -> None:
    size = 32 * C.MiB if args.quick else C.GiB
    source = C.make_tree(scratch / "src-cold", 10, per_folder=10)
    cache = scratch / "cache-cold"
    cold = cached_dataset(cache_dir=cache)(_big_result)
    out = scratch / "out"

    def body_joblib() -> None:
        result = _big_result(str(source), size)
        with open(out, "wb") as handle:
            joblib.dump(result, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def body_npsave() -> None:
        result = _big_result(str(source), size)
        with open(out, "wb") as handle:
            np.save(handle, result)
            handle.flush()
            os.fsync(handle.fileno())

    def body_serialize() -> None:
        serialize.dump(_big_result(str(source), size), out)

    cases = C.measure(
        {
            "body + joblib.dump + fsync": C.Case(body_joblib, after=lambda: C.drop_file(out)),
            "body + np.save + fsync": C.Case(body_npsave, after=lambda: C.drop_file(out)),
            "cold cachedload call (miss + store)": C.Case(
                lambda: cold(str(source), size), after=cold.cache_clear
            ),
            "body + serialize.dump (its writer alone)": C.Case(
                body_serialize, after=lambda: C.drop_file(out)
            ),
            "body alone": C.Case(lambda: _big_result(str(source), size)),
        },
        max(3, rounds // 2),
    )
    base = cases["body + joblib.dump + fsync"].median
    npsave = cases["body + np.save + fsync"].median
    body = cases["body alone"].median
    table = C.Table(
        f"cold call: a {C.fmt_bytes(size)} result computed and stored (written to {args.tmp})",
        ["method", "median", "write GB/s", "vs joblib.dump", "vs np.save"],
    )
    for name, case in cases.items():
        written = (
            size / (case.median - body) / 1e9 if case.median > body and name != "body alone" else 0
        )
        table.add(
            name,
            C.fmt_time(case.median),
            f"{written:.2f}" if written else "",
            f"{case.median / base:.2f}x",
            f"{case.median / npsave:.2f}x",
        )
    table.print()
    ours = cases["cold cachedload call (miss + store)"].median
    SUMMARY.add(
        f"cold call, {C.fmt_bytes(size)} result",
        C.fmt_time(ours),
        f"body+joblib.dump+fsync {C.fmt_time(base)}",
        f"{ours / base:.2f}x ({ours / npsave:.2f}x np.save)",
        "<= 1.15x",
        C.verdict(ours / base, 1.15),
    )


def section_peak_memory(args: Any, scratch: Path) -> None:
    size = 64 * C.MiB if args.quick else C.GiB
    setup = f"""\
        import numpy as np
        from cachedload import cached_dataset
        def _big_result(source, nbytes):
            return np.full(nbytes, 7, dtype=np.uint8)
        load = cached_dataset(cache_dir={str(scratch / "cache-memory")!r})(_big_result)
        source = {str(C.make_tree(scratch / "src-memory", 10, per_folder=10))!r}
    """
    setup = textwrap.dedent(setup)
    baseline = C.run_child(setup).peak_rss
    miss = C.run_child(setup + f"\nload(source, {size})").peak_rss
    hit = C.run_child(setup + f"\nload(source, {size})").peak_rss
    dump = f"joblib.dump(_big_result(source, {size}), {str(scratch / 'm.joblib')!r})"
    body_joblib = C.run_child(setup + "\nimport joblib\n" + dump).peak_rss
    C.drop_file(scratch / "m.joblib")
    table = C.Table(
        f"peak memory (VmHWM of a child process), {C.fmt_bytes(size)} result",
        ["child", "peak RSS", "peak / (result + interpreter)"],
    )
    table.add("interpreter + cachedload + numpy, no call", C.fmt_bytes(baseline), "")
    for name, peak in (
        ("miss + store", miss),
        ("hit, mmap_mode=None", hit),
        ("for reference: body + joblib.dump", body_joblib),
    ):
        table.add(name, C.fmt_bytes(peak), f"{peak / (size + baseline):.3f}")
    table.print()
    worst = max(miss, hit) / (size + baseline)
    SUMMARY.add(
        f"peak memory, miss+store / hit ({C.fmt_bytes(size)})",
        f"{C.fmt_bytes(miss)} / {C.fmt_bytes(hit)}",
        f"result + interp. {C.fmt_bytes(size + baseline)}",
        f"{miss / (size + baseline):.3f} / {hit / (size + baseline):.3f}",
        "<= 1.15x",
        C.verdict(worst, 1.15),
    )


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    rounds = args.repeats or (3 if args.quick else 7)
    C.banner("bench_hit_path: the cost of each part of a hit", args)
    with C.scratch(args, "hit-path") as scratch:
        section_fingerprint_tree(args, scratch, rounds)
        section_content_mode(args, scratch, rounds)
        section_hash_argument(args, rounds)
        section_restore(args, scratch, rounds)
        section_restricted_load(args, scratch, rounds)
        section_tiny_hit(args, scratch, rounds)
        section_import(args, rounds)
        section_cold_call(args, scratch, rounds)
        section_peak_memory(args, scratch)
        section_syscalls(args, scratch)
    SUMMARY.print()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
