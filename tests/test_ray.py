"""Per-item builds on a real (local) Ray instance, through ``ray.util.joblib``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from .test_builder import calls, write
from .test_per_item import data_file, loader

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_backend() -> Iterator[None]:
    """A two-CPU Ray instance on this machine (no dashboard), registered as joblib's "ray"."""
    from ray.util.joblib import register_ray

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a local instance: no token written to ~/.ray
    # Its session files (logs, sockets) in a folder of ours, removed after: not /tmp/ray. Short
    # (a Unix socket path must fit in 107 bytes), hence not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="cl-ray-")
    ray.init(
        _temp_dir=temp_dir,
        num_cpus=2,
        address="local",
        include_dashboard=False,
        object_store_memory=80 * 1024 * 1024,
        log_to_driver=False,
    )
    register_ray()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def test_a_ray_cluster_builds_through_map_each_item_once(ray_backend: None, tmp_path: Path) -> None:
    folder = tmp_path / "src"
    for index in range(20):
        write(folder, f"{('a', 'b')[index % 2]}/f{index:04d}.txt", index)
    counter = tmp_path / "calls.txt"
    on_ray = loader(cache_dir=tmp_path / "ray")
    with joblib.parallel_config(backend="ray", n_jobs=2):
        result: Any = on_ray.map(folder, counter=str(counter))
    assert calls(counter) == 20
    assert sorted(counter.read_text().split()) == sorted(p.name for p in folder.rglob("*.txt"))
    local = loader(cache_dir=tmp_path / "local")
    expected: Any = local.map(folder)
    assert np.array_equal(result.array, expected.array) and result.paths == expected.paths
    assert data_file(on_ray, folder, counter=str(counter)) == data_file(local, folder)
    # One changed file: one item computed, on the cluster, the rest copied.
    mtime = os.stat(folder / "b/f0003.txt").st_mtime_ns
    write(folder, "b/f0003.txt", 333, mtime + 10)
    with joblib.parallel_config(backend="ray", n_jobs=2):
        again: Any = on_ray.map(folder, counter=str(counter))
    assert calls(counter) == 21
    assert again.array[again.paths.index("b/f0003.txt")][0, 0] == 333
