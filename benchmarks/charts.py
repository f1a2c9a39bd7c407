"""Draw the docs' performance charts from the benchmark scripts' printed results.

    python benchmarks/charts.py                      # from the results in benchmarks/README.md
    python benchmarks/bench_peers.py > peers.txt     # or from new runs' output:
    python benchmarks/bench_scaling.py > scaling.txt
    python benchmarks/charts.py peers.txt scaling.txt

Writes two PNGs into ``docs/img/`` (``--out`` to change): ``warm-hit-peers.png``, a bar chart of
the realistic warm hit (2,000 images, 94 MiB) under cachedload and its peers, and
``hit-scaling.png``, hit time against the number of source files and against the result's size.
It reads the tables the scripts print (the same text benchmarks/README.md keeps), so the charts
show exactly the numbers of a run; it measures nothing itself. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
SIZES = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}


def milliseconds(text: str) -> float:
    """``'12.81 ms'`` -> 12.81, ``'188.1 µs'`` -> 0.1881."""
    number, unit = text.split()
    return float(number.replace(",", "")) * UNITS[unit]


def table(text: str, title: str) -> list[list[str]]:
    """The rows of the table printed under the line starting with ``title``: cells split on
    runs of two or more spaces, the header and the dashes left out."""
    start = text.index(title)
    lines = text[start:].splitlines()[3:]  # title, header, dashes
    rows = []
    for line in lines:
        if not line.strip() or line.startswith(("==", "```")):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def peers(text: str) -> list[tuple[str, float]]:
    """(cache, warm hit in ms) from bench_peers.py's tables: the peers on the same loader, and
    SQLite reading all rows back into one array."""
    rows = [(row[0], milliseconds(row[2])) for row in table(text, "peers on the same loader")]
    for row in table(text, "SQLite, one BLOB row per preprocessed image"):
        if row[0].startswith("read all rows"):
            rows.append(("SQLite BLOB rows, read all", milliseconds(row[1])))
    return rows


def scaling(
    text: str,
) -> tuple[list[tuple[int, float, float]], list[tuple[float, float, float, float]]]:
    """From bench_scaling.py: (files, hit ms, find ms) against source size, and
    (result MiB, mmap_mode=None ms, np.load ms, mmap_mode='r' ms) against result size."""
    files = [
        (int(row[0].replace(",", "")), milliseconds(row[1]), milliseconds(row[3]))
        for row in table(text, "warm hit (tiny result, same process) against the number")
    ]
    sizes = []
    for row in table(text, "warm hit (10-file source, same process) against the result"):
        number, unit = row[0].split()
        sizes.append(
            (
                float(number) * SIZES[unit],
                milliseconds(row[1]),
                milliseconds(row[3]),
                milliseconds(row[5]),
            )
        )
    return files, sizes


def draw_peers(rows: list[tuple[str, float]], out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda row: row[1])
    names = [name for name, _ in rows]
    colours = ["tab:blue" if name.startswith("cachedload") else "tab:gray" for name in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(names, [ms for _, ms in rows], color=colours)
    ax.bar_label(bars, labels=[f"{ms:.1f} ms" for _, ms in rows], padding=3, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("warm hit, same process (ms, lower is better)")
    ax.set_title("warm hit: 2,000 images -> 128x128 RGB (94 MiB)", fontsize=10)
    fig.text(
        0.01,
        0.01,
        "blue: cachedload, recomputes when an image is replaced. Grey: the peers; joblib.Memory,"
        " pickle and np.load\nby hand return the old pixels then (bench_peers.py checks).",
        fontsize=8,
        color="dimgray",
    )
    ax.margins(x=0.15)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_scaling(
    files: list[tuple[int, float, float]],
    sizes: list[tuple[float, float, float, float]],
    out: Path,
) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(
        [f for f, _, _ in files], [hit for _, hit, _ in files], "o-", label="cachedload hit"
    )
    left.loglog([f for f, _, _ in files], [fd for _, _, fd in files], "s--", label="find -printf")
    left.set_xlabel("source files")
    left.set_ylabel("ms")
    left.set_title(
        "hit time against source-file count\n(tiny result: one stat per file)", fontsize=10
    )
    left.legend()
    mib = [size for size, *_ in sizes]
    right.loglog(mib, [row[1] for row in sizes], "o-", label="hit, mmap_mode=None")
    right.loglog(mib, [row[2] for row in sizes], "s--", label="np.load")
    right.loglog(mib, [row[3] for row in sizes], "^-", label='hit, mmap_mode="r"')
    right.set_xlabel("result size (MiB)")
    right.set_title("hit time against result size\n(10-file source)", fontsize=10)
    right.legend()
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results",
        nargs="*",
        type=Path,
        help="saved output of bench_peers.py and bench_scaling.py (default: benchmarks/README.md)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where to write")
    args = parser.parse_args(argv)
    text = "\n".join(
        path.read_text() for path in (args.results or [ROOT / "benchmarks" / "README.md"])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    draw_peers(peers(text), args.out / "warm-hit-peers.png")
    files, sizes = scaling(text)
    draw_scaling(files, sizes, args.out / "hit-scaling.png")
    for name in ("warm-hit-peers.png", "hit-scaling.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
