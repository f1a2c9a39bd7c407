"""Every benchmark script runs with ``--quick`` and prints a table, so the scripts cannot rot.

The benchmarks are measurements, not gates: only the exit status and the presence of a table
(a header naming the median, and ratios such as ``1.23x``) are checked, never the numbers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("bench_*.py"))
RATIO = re.compile(r"\d+\.\d+x\b")


def test_the_benchmarks_are_there() -> None:
    names = {p.name for p in SCRIPTS}
    expected = {"bench_hit_path.py", "bench_scaling.py", "bench_peers.py", "bench_builds.py"}
    assert expected | {"bench_adapters.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_runs_quick_and_prints_a_table(script: Path, tmp_path: Path) -> None:
    # TMPDIR: every script writes its data through tempfile, so here into tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONWARNINGS": "error"}
    result = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any("median" in line.lower() for line in lines), result.stdout[-3000:]
    assert len([line for line in lines if RATIO.search(line)]) >= 2, result.stdout[-3000:]
    assert any("python" in line.lower() and "numpy" in line.lower() for line in lines)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("cachedload-")]
    assert not leftovers, f"{script.name} left {leftovers}"


def test_charts_are_drawn_from_the_recorded_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "charts.py"), "--out", str(tmp_path / "img")],
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    drawn = {p.name for p in (tmp_path / "img").iterdir()}
    assert drawn == {"warm-hit-peers.png", "hit-scaling.png"}
