"""pickling.py: a cached loader crossing process boundaries, by import path or by value, and
hitting in the worker the entries its parent stored."""

from __future__ import annotations

import functools
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cachedload import CachedDataset, cached_dataset
from tests.conftest import runs, subprocess_env
from tests.test_decorator import ScaledLoader, base_loader, counting_loader


@cached_dataset(version="pickled")
def module_level_loader(image_dir: Path, size: int = 2) -> list[int]:
    return [size]


class ModuleLevelLoaders:
    def __init__(self, size: int) -> None:
        self.size = size

    @cached_dataset
    def load(self, image_dir: Path) -> int:
        return self.size


def test_wrappers_pickle_for_worker_processes(image_dir: Path) -> None:
    clone = pickle.loads(pickle.dumps(module_level_loader))
    assert isinstance(clone, CachedDataset)
    assert clone.cache_path(image_dir) == module_level_loader.cache_path(image_dir)
    module_level_loader(image_dir)
    assert clone.is_cached(image_dir)
    bound = pickle.loads(pickle.dumps(ModuleLevelLoaders(7).load))
    assert bound(image_dir) == 7
    assert ModuleLevelLoaders(7).load.is_cached(image_dir)
    assert not ModuleLevelLoaders(8).load.is_cached(image_dir)


def test_a_loader_the_import_path_does_not_lead_to_pickles_by_value(
    image_dir: Path, cache_dir: Path
) -> None:
    calls: list[int] = []
    nested = counting_loader(calls, cache_dir=cache_dir)  # "counting_loader.<locals>.load"
    nested(image_dir)
    clone = pickle.loads(pickle.dumps(nested))
    assert clone.cache_path(image_dir) == nested.cache_path(image_dir)
    assert clone.is_cached(image_dir)
    assert clone.__wrapped__ is not nested.__wrapped__  # rebuilt from its code


# A notebook, as a worker sees it: the loader is defined in __main__ by code the workers cannot
# import, either in a cell (run by exec, its source only in linecache, as IPython does) or in a
# script run as the main program (loky workers do not import __main__).
NOTEBOOK_SCRIPT = '''
import linecache
import multiprocessing
import os
import sys

import joblib

CELL = """
import os
from cachedload import cached_dataset


@cached_dataset(cache_dir=os.environ["CACHE"])
def load(image_dir, size=2):
    'The loader of a cell.'
    with open(os.environ["COUNTER"], "a") as counter:
        counter.write("run\\\\n")
    return sorted(os.listdir(image_dir)) * size
"""


def run_cell(source, filename):
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


if sys.argv[1] == "script":
    exec(CELL)  # as if written at the top level of this script: __main__.load


def main(how, image_dir):
    if how == "cell":
        load = run_cell(CELL, os.path.join(os.environ["CACHE"], "ipykernel", "cell-1.py"))["load"]
    else:
        load = globals()["load"]
    first = load(image_dir)
    with joblib.Parallel(n_jobs=2, backend="loky") as parallel:
        from_loky = parallel(joblib.delayed(load)(image_dir) for _ in range(4))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        from_spawn = pool.map(load, [image_dir] * 4)
    assert from_loky == from_spawn == [first] * 4, (from_loky, from_spawn, first)
    print(len(load.entries()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''


@pytest.mark.parametrize("how", ["cell", "script"])
def test_a_notebook_loader_runs_in_joblib_and_spawned_workers_from_its_cache(
    how: str, image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), how, str(image_dir)],
        capture_output=True,
        text=True,
        env=subprocess_env(CACHE=str(cache_dir), COUNTER=str(counter_file)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n"  # one entry
    assert runs(counter_file) == 1  # computed once, in the notebook; every worker hit


# A bound method as the loader, of a class the workers cannot import: one of the script's own
# (__main__) or one defined inside a function.
METHOD_SCRIPT = """
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import joblib

from cachedload import cached_dataset


class Loader:
    def __init__(self, scale):
        self.scale = scale

    def load(self, image_dir):
        with open(os.environ["COUNTER"], "a") as counter:
            counter.write("run\\n")
        return sorted(os.listdir(image_dir)) * self.scale


def make():
    class Local(Loader):
        def load(self, image_dir):
            with open(os.environ["COUNTER"], "a") as counter:
                counter.write("run\\n")
            return sorted(os.listdir(image_dir)) * self.scale

    return Local(2)


if __name__ == "__main__":
    loader = Loader(2) if sys.argv[1] == "__main__" else make()
    load = cached_dataset(cache_dir=os.environ["CACHE"])(loader.load)
    first = load(sys.argv[2])
    # (a worker failing to unpickle its task breaks this pool, where a Pool would hang)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        from_spawn = list(pool.map(load, [sys.argv[2]] * 2))
    with joblib.Parallel(n_jobs=2, backend="loky") as parallel:
        from_loky = parallel(joblib.delayed(load)(sys.argv[2]) for _ in range(2))
    assert from_spawn == from_loky == [first] * 2, (from_spawn, from_loky, first)
    print(len(load.entries()))
"""


@pytest.mark.parametrize("defined_in", ["__main__", "a function"])
def test_a_bound_method_loader_runs_in_spawned_and_loky_workers_from_its_cache(
    defined_in: str, image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    script = tmp_path / "methods.py"
    script.write_text(METHOD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), defined_in, str(image_dir)],
        capture_output=True,
        text=True,
        env=subprocess_env(CACHE=str(cache_dir), COUNTER=str(counter_file)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n"  # one entry
    assert runs(counter_file) == 1  # computed once, in the parent; every worker hit


def test_a_module_level_loader_pickles_by_its_import_path() -> None:
    clone = pickle.loads(pickle.dumps(module_level_loader))
    assert clone.__wrapped__ is module_level_loader.__wrapped__  # imported, not rebuilt
    assert b"module_level_loader" in pickle.dumps(module_level_loader)


@pytest.mark.parametrize(
    "loader",
    [functools.partial(base_loader, size=(8, 8)), ScaledLoader(3)],
    ids=["partial", "callable object"],
)
def test_a_partial_or_a_callable_object_pickles_by_value(
    loader: Callable[..., Any], image_dir: Path, cache_dir: Path
) -> None:
    wrapper = cached_dataset(cache_dir=cache_dir)(loader)
    expected = wrapper(image_dir)
    clone = pickle.loads(pickle.dumps(wrapper))
    assert clone.__wrapped__ is not loader  # no import path of its own: a copy of its value
    assert clone.cache_path(image_dir) == wrapper.cache_path(image_dir)
    assert clone(image_dir) == expected and clone.cache_info().hits == 1


UNPICKLE_AND_CALL = """
import pickle, sys
load = pickle.loads(bytes.fromhex(sys.stdin.read()))
print(load.is_cached(sys.argv[1]), load(sys.argv[1]), load.cache_info().hits)
"""


@pytest.mark.parametrize("how", ["by path", "by value"])
def test_a_wrapper_unpickled_in_a_subprocess_hits_the_parents_entry(
    how: str, image_dir: Path, cache_dir: Path, counter_file: Path
) -> None:
    @cached_dataset(cache_dir=cache_dir)
    def nested(image_dir: str) -> list[str]:
        with open(counter_file, "a") as counter:
            counter.write("run\n")
        return sorted(p.name for p in Path(image_dir).rglob("*.png"))

    load: CachedDataset[..., Any] = module_level_loader if how == "by path" else nested
    expected = load(str(image_dir))
    child = subprocess.run(
        [sys.executable, "-c", UNPICKLE_AND_CALL, str(image_dir)],
        input=pickle.dumps(load).hex(),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout == f"True {expected} 1\n"
    assert runs(counter_file) == (1 if how == "by value" else 0)
