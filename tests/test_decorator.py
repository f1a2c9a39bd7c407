"""The decorator's contract: run once, hit afterwards, recompute on any change that matters."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachedload import (
    CachedDataset,
    CachedloadError,
    CacheStoreWarning,
    ConfigurationError,
    cached_dataset,
)
from tests.conftest import age, run_python, runs
from tests.test_config import BAD_CACHE_DIRS


def counting_loader(counter: list[int], **options: Any) -> CachedDataset[..., Any]:
    @cached_dataset(**options)
    def load(image_dir: str | os.PathLike[str], size: tuple[int, int] = (8, 8), scale: float = 1.0):  # type: ignore[no-untyped-def]
        counter.append(1)
        names = sorted(p.name for p in Path(image_dir).rglob("*") if p.is_file())
        return np.full(size, len(names) * scale), names

    return load


def test_runs_once_then_hits_with_an_equal_result(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    first = load(image_dir)
    second = load(image_dir)
    assert len(calls) == 1
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    info = load.cache_info()
    assert (info.hits, info.misses, info.stores, info.entries) == (1, 1, 1, 1)
    assert info.size_bytes > 0


def test_bare_form_uses_the_default_cache_dir(image_dir: Path, isolated_cache: Path) -> None:
    calls: list[int] = []

    @cached_dataset
    def load(image_dir: Path) -> int:
        calls.append(1)
        return 42

    assert load(image_dir) == 42
    assert load(image_dir) == 42
    assert len(calls) == 1
    assert load.cache_path(image_dir).is_relative_to(isolated_cache)
    assert load.cache_path(image_dir).is_dir()


def test_default_arguments_share_an_entry(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    load(image_dir)
    load(image_dir, size=(8, 8))
    load(image_dir, (8, 8), 1.0)
    load(image_dir=str(image_dir), scale=1.0)
    assert len(calls) == 1


def test_parameter_change_recomputes(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    assert load(image_dir)[0].shape == (8, 8)
    assert load(image_dir, size=(4, 4))[0].shape == (4, 4)
    assert load(image_dir, scale=2.0)[0][0, 0] == 12.0
    assert len(calls) == 3
    load(image_dir, size=(4, 4))
    assert len(calls) == 3


@pytest.mark.parametrize("change", ["add", "remove", "rename", "touch", "rewrite"])
def test_source_changes_recompute(image_dir: Path, cache_dir: Path, change: str) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    before = load(image_dir)
    target = next(image_dir.rglob("*.png"))
    if change == "add":
        (image_dir / "a" / "extra.png").write_bytes(target.read_bytes())
    elif change == "remove":
        target.unlink()
    elif change == "rename":
        target.rename(target.with_name("renamed.png"))
    elif change == "touch":
        info = target.stat()
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    elif change == "rewrite":
        info = target.stat()
        target.write_bytes(target.read_bytes()[::-1])  # same size, new bytes, new mtime
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    after = load(image_dir)
    assert len(calls) == 2
    if change in ("add", "remove", "rename"):
        assert after[1] != before[1]


def test_single_file_source_and_explicit_source(tmp_path: Path, cache_dir: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("a,1\nb,2\n")
    age(tmp_path)
    calls: list[int] = []

    @cached_dataset(source="labels", cache_dir=cache_dir)
    def load(labels: str, sep: str = ",") -> list[list[str]]:
        calls.append(1)
        return [line.split(sep) for line in Path(labels).read_text().splitlines()]

    assert load(str(csv)) == [["a", "1"], ["b", "2"]]
    assert load(str(csv)) == [["a", "1"], ["b", "2"]]
    csv.write_text("a,1\nb,2\nc,3\n")
    assert load(str(csv))[-1] == ["c", "3"]
    assert len(calls) == 2


def test_a_list_of_sources(tmp_path: Path, cache_dir: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for folder in (first, second):
        folder.mkdir()
        (folder / "x.png").write_bytes(b"x")
    age(tmp_path)
    calls: list[int] = []

    @cached_dataset(source="folders", cache_dir=cache_dir)
    def load(folders: list[Path]) -> int:
        calls.append(1)
        return len(folders)

    load([first, second])
    (second / "y.png").write_bytes(b"y")
    load([first, second])
    assert len(calls) == 2


def test_include_exclude_options(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir, include=["*.png"], exclude=["notes"])
    load(image_dir)
    (image_dir / "README.txt").write_text("not an image")
    (image_dir / "notes").mkdir()
    (image_dir / "notes" / "n.png").write_bytes(b"excluded folder")
    (image_dir / ".DS_Store").write_bytes(b"junk")
    load(image_dir)
    assert len(calls) == 1


def test_content_fingerprint_survives_a_copy_without_mtimes(
    image_dir: Path, cache_dir: Path
) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir, fingerprint="content")
    load(image_dir)
    for path in image_dir.rglob("*.png"):
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 5 * 10**9))
    load(image_dir)
    assert len(calls) == 1
    target = next(image_dir.rglob("*.png"))
    target.write_bytes(target.read_bytes()[::-1])
    load(image_dir)
    assert len(calls) == 2


def test_ignore_leaves_parameters_out_of_the_key(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir, ignore=["verbose", "n_jobs"])
    def load(image_dir: Path, verbose: bool = False, n_jobs: int = 1) -> int:
        calls.append(1)
        return 7

    load(image_dir)
    load(image_dir, verbose=True, n_jobs=8)
    assert len(calls) == 1


def test_mmap_mode_returns_read_only_memory_maps(image_dir: Path, cache_dir: Path) -> None:
    @cached_dataset(cache_dir=cache_dir, mmap_mode="r")
    def load(image_dir: Path) -> dict[str, np.ndarray]:
        return {"x": np.arange(100_000, dtype=np.float32), "y": np.ones(10, dtype=np.int64)}

    computed = load(image_dir)
    restored = load(image_dir)
    assert isinstance(restored["x"], np.memmap)
    assert not restored["x"].flags.writeable
    np.testing.assert_array_equal(computed["x"], restored["x"])


def test_compress_round_trips(image_dir: Path, cache_dir: Path) -> None:
    @cached_dataset(cache_dir=cache_dir, compress=3)
    def load(image_dir: Path) -> np.ndarray:
        return np.zeros(1_000_000, dtype=np.uint8)

    load(image_dir)
    assert load.cache_info().size_bytes < 100_000
    assert load(image_dir).sum() == 0
    assert load.cache_info().hits == 1


@pytest.mark.parametrize(
    "result",
    [None, 0, "text", [1, 2], {"a": np.arange(3)}, (np.zeros(2), np.ones(2)), b"bytes"],
    ids=["none", "zero", "str", "list", "dict", "tuple", "bytes"],
)
def test_any_picklable_result_is_cached(image_dir: Path, cache_dir: Path, result: Any) -> None:
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> Any:
        calls.append(1)
        return result

    load(image_dir)
    restored = load(image_dir)
    assert len(calls) == 1
    assert repr(restored) == repr(result)


def test_exception_in_body_stores_nothing_and_propagates(image_dir: Path, cache_dir: Path) -> None:
    class Boom(Exception):
        pass

    error = Boom("body failed")

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> int:
        raise error

    with pytest.raises(Boom) as raised:
        load(image_dir)
    assert raised.value is error
    assert not load.is_cached(image_dir)
    assert load.cache_info().entries == 0


def test_callable_and_object_arguments_hash_by_code_and_state(
    image_dir: Path, cache_dir: Path
) -> None:
    @dataclasses.dataclass
    class Settings:
        size: int

    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path, transform: Any, settings: Settings) -> int:
        calls.append(1)
        return int(transform(settings.size))

    assert load(image_dir, lambda x: x * 2, Settings(3)) == 6
    assert load(image_dir, lambda x: x * 2, Settings(3)) == 6
    assert load(image_dir, lambda x: x * 3, Settings(3)) == 9
    assert load(image_dir, lambda x: x * 3, Settings(4)) == 12
    assert len(calls) == 3


def test_numpy_argument_in_the_key(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path, mean: np.ndarray) -> float:
        calls.append(1)
        return float(mean.sum())

    mean = np.array([0.485, 0.456, 0.406])
    load(image_dir, mean)
    load(image_dir, mean.copy())
    load(image_dir, mean.astype(np.float32))
    load(image_dir, mean[::-1])
    assert len(calls) == 3


def test_version_and_depends_on_change_the_key(image_dir: Path, cache_dir: Path) -> None:
    def body(image_dir: Path) -> int:
        return 1

    first = cached_dataset(cache_dir=cache_dir, version=1)(body)
    second = cached_dataset(cache_dir=cache_dir, version=2)(body)
    assert first.cache_path(image_dir) != second.cache_path(image_dir)

    def helper_a() -> int:
        return 1

    def helper_b() -> int:
        return 2

    with_a = cached_dataset(cache_dir=cache_dir, depends_on=[helper_a])(body)
    with_b = cached_dataset(cache_dir=cache_dir, depends_on=[helper_b])(body)
    assert with_a.cache_path(image_dir) != with_b.cache_path(image_dir)


def test_wrapper_object_interface(image_dir: Path, cache_dir: Path) -> None:
    def load(image_dir: Path, size: int = 3) -> list[int]:
        """Load things."""
        return [size]

    wrapped = cached_dataset(cache_dir=cache_dir)(load)
    assert isinstance(wrapped, CachedDataset)
    assert wrapped.__wrapped__ is load
    # __name__ is copied by functools.update_wrapper; CachedDataset does not declare it.
    assert wrapped.__name__ == "load"  # type: ignore[attr-defined]
    assert wrapped.__doc__ == "Load things."
    assert not wrapped.is_cached(image_dir)
    path = wrapped.cache_path(image_dir)
    assert not path.exists()
    wrapped(image_dir)
    assert wrapped.is_cached(image_dir) and path.is_dir()
    assert not wrapped.is_cached(image_dir, size=4)
    wrapped.cache_clear()
    assert not wrapped.is_cached(image_dir)
    assert wrapped.cache_info() == (0, 0, 0, 0, 0)


def test_recompute_runs_the_body_and_replaces_the_entry(image_dir: Path, cache_dir: Path) -> None:
    values = iter([1, 2, 3])

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> int:
        return next(values)

    assert load(image_dir) == 1
    assert load.recompute(image_dir) == 2
    assert load(image_dir) == 2


def test_enabled_false_passes_straight_through(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir, enabled=False)
    load(image_dir)
    load(image_dir)
    assert len(calls) == 2
    assert not load.is_cached(image_dir)
    assert not cache_dir.exists()


def test_a_decorated_method_opens_its_cache_root_once(
    image_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cachedload.backends
    import cachedload.decorator as decorator

    opened: list[object] = []
    real_open_root = cachedload.backends.open_root

    def counting_open_root(*args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return real_open_root(*args, **kwargs)

    monkeypatch.setattr(decorator, "open_root", counting_open_root)

    class Loader:
        @cached_dataset(cache_dir=cache_dir)
        def load(self, image_dir: Path) -> int:
            return 1

    loader = Loader()
    assert [loader.load(image_dir) for _ in range(5)] == [1] * 5
    assert Loader.load.cache_info().hits == 4
    assert len(opened) == 1  # every access makes a bound copy; they share one root


def test_decorating_a_method(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []

    class Loader:
        def __init__(self, size: int) -> None:
            self.size = size

        @cached_dataset(cache_dir=cache_dir)
        def load(self, image_dir: Path) -> int:
            calls.append(1)
            return self.size

        @cached_dataset(cache_dir=cache_dir, ignore=["self"])
        def load_ignoring_self(self, image_dir: Path) -> int:
            calls.append(1)
            return self.size

    assert Loader(2).load(image_dir) == 2
    assert Loader(2).load(image_dir) == 2
    assert Loader(3).load(image_dir) == 3
    assert len(calls) == 2
    assert Loader(2).load.is_cached(image_dir)
    assert Loader(5).load_ignoring_self(image_dir) == 5
    assert Loader(6).load_ignoring_self(image_dir) == 5
    assert len(calls) == 3


def test_invalid_options_raise_configuration_errors() -> None:
    def body(image_dir: str) -> None:
        return None

    for options in (
        {"source": "nope"},
        {"ignore": ["nope"]},
        {"mmap_mode": "w"},
        {"fingerprint": "sha1"},
        {"verify": "sometimes"},
    ):
        with pytest.raises(ConfigurationError):
            cached_dataset(**options)(body)


def test_logs_hits_misses_and_stores(
    image_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load = counting_loader([], cache_dir=cache_dir)
    with caplog.at_level(logging.INFO, logger="cachedload"):
        load(image_dir)
        load(image_dir)
    messages = [r.getMessage() for r in caplog.records if r.name == "cachedload"]
    assert any(m.startswith("miss ") for m in messages)
    assert any(m.startswith("stored ") and "bytes" in m for m in messages)
    assert any(m.startswith("hit ") and " ms" in m for m in messages)


def test_partial_and_functools_wraps_loaders(image_dir: Path, cache_dir: Path) -> None:
    def body(image_dir: Path, factor: int) -> int:
        return factor

    @functools.wraps(body)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        return body(*args, **kwargs)

    load = cached_dataset(cache_dir=cache_dir)(wrapper)
    assert load(image_dir, 2) == 2
    assert load(image_dir, 3) == 3
    assert load.cache_info().entries == 2


# --- across real processes -----------------------------------------------------------------

LOADER_MODULE = """
import os, sys
import numpy as np
from cachedload import cached_dataset

@cached_dataset(cache_dir=os.environ["CACHE"])
def load(image_dir, size=(4, 4)):
    with open(os.environ["COUNTER"], "a") as f:
        f.write("run\\n")
    return np.full(size, len(os.listdir(image_dir)))
"""


def test_body_runs_once_across_fresh_interpreters(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "loader_mod.py").write_text(LOADER_MODULE)
    code = f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from loader_mod import load
        print(load({str(image_dir)!r}).sum())
    """
    run = functools.partial(run_python, CACHE=str(cache_dir), COUNTER=str(counter_file))
    first = run(code).stdout
    second = run(code).stdout
    assert first == second == "32\n"
    assert runs(counter_file) == 1


def test_code_change_invalidates_but_comment_change_does_not(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    module = tmp_path / "loader_mod.py"
    code = f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from loader_mod import load
        print(load({str(image_dir)!r}).sum())
    """
    run = functools.partial(run_python, CACHE=str(cache_dir), COUNTER=str(counter_file))
    module.write_text(LOADER_MODULE)
    assert run(code).stdout == "32\n"
    module.write_text(
        LOADER_MODULE.replace("    with open", "    # a new comment\n    with   open")
    )
    assert run(code).stdout == "32\n"
    assert runs(counter_file) == 1
    module.write_text(LOADER_MODULE.replace("len(os.listdir(image_dir))", "2"))
    assert run(code).stdout == "32\n"
    assert runs(counter_file) == 2
    module.write_text(LOADER_MODULE)  # reverting the code hits the old entry again
    assert run(code).stdout == "32\n"
    assert runs(counter_file) == 2


def test_cache_paths_are_stable_across_hash_seeds(image_dir: Path, cache_dir: Path) -> None:
    code = f"""
        from cachedload import cached_dataset

        @cached_dataset(cache_dir={str(cache_dir)!r})
        def load(image_dir, options={{"names": {{"a", "b", "c", "d"}}, "size": (1, 2)}}):
            return 1

        print(load.cache_path({str(image_dir)!r}))
    """
    outputs = {run_python(code, PYTHONHASHSEED=seed).stdout for seed in ("0", "1", "99")}
    assert len(outputs) == 1


def test_mmap_mode_r_returns_memory_maps_on_a_miss_too(image_dir: Path, cache_dir: Path) -> None:
    @cached_dataset(cache_dir=cache_dir, mmap_mode="r")
    def load(image_dir: Path) -> tuple[np.ndarray, list[str]]:
        return np.arange(1000, dtype=np.float32), ["a", "b"]

    first, names = load(image_dir)  # a miss: the entry just written, mapped
    second, _ = load(image_dir)  # a hit
    assert load.cache_info().misses == 1 and load.cache_info().hits == 1
    for result in (first, second):
        assert isinstance(result, np.memmap) and not result.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            result -= result.mean()  # fails the same way on both calls
    assert names == ["a", "b"]
    np.testing.assert_array_equal(first, np.arange(1000, dtype=np.float32))


def test_mmap_mode_r_returns_the_computed_result_when_storing_fails(
    image_dir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache directory should be")

    @cached_dataset(cache_dir=blocker / "cache", mmap_mode="r")
    def load(image_dir: Path) -> np.ndarray:
        return np.arange(10)

    with pytest.warns(CacheStoreWarning):
        result = load(image_dir)
    assert not isinstance(result, np.memmap) and result.flags.writeable


def test_mmap_mode_r_plus_is_rejected_naming_the_accepted_values() -> None:
    def body(image_dir: str) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"mmap_mode.*None, 'r'.*'c'.*not 'r\+'"):
        cached_dataset(mmap_mode="r+")(body)  # type: ignore[call-overload]


@pytest.mark.parametrize("call", ["miss", "hit"])
def test_mmap_mode_c_edits_never_reach_the_stored_entry(
    image_dir: Path, cache_dir: Path, call: str
) -> None:
    @cached_dataset(cache_dir=cache_dir, mmap_mode="c")
    def load(image_dir: Path) -> np.ndarray:
        return np.zeros(1000, dtype=np.float64)

    first = load(image_dir)
    edited = first if call == "miss" else load(image_dir)
    assert isinstance(edited, np.memmap) and edited.flags.writeable
    edited += 5.0  # copy-on-write: this process's pages only
    assert edited[0] == 5.0
    del first, edited
    assert load(image_dir).sum() == 0.0
    assert cached_dataset(cache_dir=cache_dir)(load.__wrapped__)(image_dir).sum() == 0.0


def test_every_error_class_is_a_cachedload_error() -> None:
    from cachedload import errors, hashing

    classes = [
        obj
        for module in (errors, hashing)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning)
    ]
    assert hashing.UnhashableError in classes
    for cls in classes:
        assert issubclass(cls, CachedloadError), cls
    assert issubclass(hashing.UnhashableError, TypeError)


@pytest.mark.parametrize("value", [3, ["a"], b"/tmp/x", 1.5])
def test_cache_dir_of_the_wrong_type_is_a_configuration_error(value: Any) -> None:
    def body(image_dir: str) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"^cache_dir: must be a str or os.PathLike"):
        cached_dataset(cache_dir=value)(body)


@pytest.mark.parametrize("value, reason", BAD_CACHE_DIRS.values(), ids=BAD_CACHE_DIRS.keys())
def test_a_bad_cache_dir_option_is_a_configuration_error_at_decoration(
    value: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def body(image_dir: str) -> None:
        return None

    with pytest.raises(ConfigurationError, match=rf"^cache_dir: .*({reason})") as raised:
        cached_dataset(cache_dir=value)(body)
    assert raised.value.option == "cache_dir"
    assert "expected" in str(raised.value) or "or use a local folder" in str(raised.value)
    assert list(tmp_path.iterdir()) == []  # no folder named after the value


@pytest.mark.parametrize(
    "value, reason",
    [v for k, v in BAD_CACHE_DIRS.items() if k != "empty"],
    ids=[k for k in BAD_CACHE_DIRS if k != "empty"],
)
def test_a_bad_cachedload_dir_variable_names_the_variable(
    value: str, reason: str, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CACHEDLOAD_DIR", value)
    calls: list[int] = []
    load = counting_loader(calls)
    with pytest.raises(ConfigurationError, match=rf"^\$CACHEDLOAD_DIR: .*({reason})"):
        load(image_dir)
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# --- what the loader reads besides its arguments (its state) ---------------------------------


def test_closure_values_are_part_of_the_key(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []

    def make_loader(size: tuple[int, int]) -> CachedDataset[..., Any]:
        @cached_dataset(cache_dir=cache_dir)
        def load(image_dir: Path) -> tuple[int, int]:
            calls.append(1)
            return size

        return load

    assert make_loader((16, 16))(image_dir) == (16, 16)
    assert make_loader((64, 64))(image_dir) == (64, 64)
    assert make_loader((16, 16))(image_dir) == (16, 16)
    assert len(calls) == 2


GLOBALS_MODULE = """
from cachedload import cached_dataset
calls = []
memo = {}
count = 0
SCALE = 2
OFFSET = 0.5

def helper(x):
    return x + OFFSET

@cached_dataset(cache_dir=CACHE, depends_on=[helper])
def load(image_dir):
    global count
    count += 1
    calls.append(1)
    memo[image_dir] = True
    return helper(10 * SCALE)
"""


def test_a_changed_module_global_misses_in_the_same_process(
    image_dir: Path, cache_dir: Path
) -> None:
    namespace: dict[str, Any] = {"CACHE": str(cache_dir)}
    exec(GLOBALS_MODULE, namespace)  # a module (a notebook's globals) changed as it runs
    load = namespace["load"]
    assert load(image_dir) == 20.5
    namespace["SCALE"] = 3
    assert load(image_dir) == 30.5
    namespace["OFFSET"] = 0.25  # read by a depends_on helper
    assert load(image_dir) == 30.25
    namespace["SCALE"] = 2
    namespace["OFFSET"] = 0.5
    assert load(image_dir) == 20.5
    assert namespace["count"] == 3  # the last call hit the first entry


def test_names_the_loader_changes_are_not_in_the_key(image_dir: Path, cache_dir: Path) -> None:
    namespace: dict[str, Any] = {"CACHE": str(cache_dir)}
    exec(GLOBALS_MODULE, namespace)  # counts with calls.append, memo[k] = v, global count
    namespace["load"](image_dir)
    namespace["load"](image_dir)
    assert namespace["count"] == 1 and len(namespace["calls"]) == 1

    runs = 0

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path) -> int:
        nonlocal runs
        runs += 1
        return 1

    load(image_dir)
    load(image_dir)
    assert runs == 1


def test_values_left_out_of_the_key_are_logged_once(
    image_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    namespace: dict[str, Any] = {"CACHE": str(cache_dir), "LOCK": threading.Lock()}
    exec(
        "from cachedload import cached_dataset\n"
        "@cached_dataset(cache_dir=CACHE)\n"
        "def guarded_load(image_dir):\n"
        "    with LOCK:\n"
        "        return 1\n",
        namespace,
    )
    with caplog.at_level(logging.INFO, logger="cachedload"):
        namespace["guarded_load"](image_dir)
        namespace["guarded_load"](image_dir)
    notes = [r.getMessage() for r in caplog.records if "not in the cache key" in r.getMessage()]
    assert len(notes) == 1
    assert "global LOCK" in notes[0] and "depends_on=" in notes[0] and "version=" in notes[0]


def test_explain_names_a_changed_global(image_dir: Path, cache_dir: Path) -> None:
    namespace: dict[str, Any] = {"CACHE": str(cache_dir)}
    exec(GLOBALS_MODULE, namespace)
    namespace["load"](image_dir)
    namespace["SCALE"] = 3
    assert "global SCALE: 2 → 3" in str(namespace["load"].cache_explain(image_dir))


def test_a_wrapped_bound_method_keys_its_instance(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []

    class Dataset:
        def __init__(self, size: int) -> None:
            self.size = size
            self.load = cached_dataset(cache_dir=cache_dir)(self.read)

        def read(self, image_dir: Path) -> int:
            calls.append(1)
            return self.size

    assert Dataset(2).load(image_dir) == 2
    assert Dataset(3).load(image_dir) == 3
    assert Dataset(2).load(image_dir) == 2
    assert len(calls) == 2


def test_replacing_the_loaders_code_in_place_misses(image_dir: Path, cache_dir: Path) -> None:
    def body(image_dir: Path) -> str:
        return "old"

    def new_body(image_dir: Path) -> str:
        return "new"

    def helper() -> str:
        return "a"

    def new_helper() -> str:
        return "b"

    load = cached_dataset(cache_dir=cache_dir)(body)
    assert load(image_dir) == "old"
    body.__code__ = new_body.__code__  # what IPython's %autoreload does
    assert load(image_dir) == "new"

    with_helper = cached_dataset(cache_dir=cache_dir, depends_on=[helper])(new_body)
    before = with_helper.cache_path(image_dir)
    helper.__code__ = new_helper.__code__
    assert with_helper.cache_path(image_dir) != before


def base_loader(image_dir: Path, size: tuple[int, int] = (4, 4)) -> tuple[int, int]:
    return size


class ScaledLoader:
    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, image_dir: Path) -> int:
        return 10 * self.scale


def test_a_partial_or_a_callable_object_can_be_the_loader(image_dir: Path, cache_dir: Path) -> None:
    small = cached_dataset(cache_dir=cache_dir)(functools.partial(base_loader, size=(8, 8)))
    large = cached_dataset(cache_dir=cache_dir)(functools.partial(base_loader, size=(9, 9)))
    assert small(image_dir) == (8, 8)
    assert large(image_dir) == (9, 9)
    assert small(image_dir) == (8, 8)
    assert small.cache_path(image_dir).parent.name.startswith(f"{__name__}.base_loader-")
    assert small.cache_info().hits == 1

    two = cached_dataset(cache_dir=cache_dir)(ScaledLoader(2))
    three = cached_dataset(cache_dir=cache_dir)(ScaledLoader(3))
    assert two(image_dir) == 20
    assert three(image_dir) == 30
    assert two(image_dir) == 20 and two.cache_info().hits == 1
    assert two.cache_path(image_dir).parent.name.startswith(f"{__name__}.ScaledLoader-")


def test_options_is_the_frozen_options_it_was_decorated_with(cache_dir: Path) -> None:
    load = counting_loader([], cache_dir=cache_dir, mmap_mode="r")
    assert load.options.mmap_mode == "r" and load.options.cache_dir == cache_dir
    with pytest.raises(dataclasses.FrozenInstanceError):
        load.options.mmap_mode = None  # type: ignore[misc]


def test_load_entry_opens_that_entry_even_after_the_sources_changed(
    image_dir: Path, cache_dir: Path
) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir, mmap_mode="r", keep=2)
    before = load(image_dir)
    opened = load.cache_path(image_dir)
    (image_dir / "a" / "new.png").write_bytes(b"x")
    age(image_dir)
    after = load(image_dir)
    assert after[1] != before[1] and load.cache_path(image_dir) != opened
    hits = load.cache_info().hits
    again = load.load_entry(opened)
    assert again[1] == before[1] and isinstance(again[0], np.memmap)  # mmap_mode applies
    assert len(calls) == 2 and load.cache_info().hits == hits  # no call, not counted as a hit
    assert load.load_entry(str(opened))[1] == before[1]


def test_load_entry_refuses_what_is_not_an_entry_of_this_loader(
    image_dir: Path, cache_dir: Path
) -> None:
    load = counting_loader([], cache_dir=cache_dir)
    other = counting_loader([], cache_dir=cache_dir, version=2)
    load(image_dir)
    path = load.cache_path(image_dir)
    with pytest.raises(FileNotFoundError):
        load.load_entry(path.parent / ("0" * 32))  # not stored
    with pytest.raises(FileNotFoundError):
        load.load_entry(cache_dir)  # not an entry folder
    load(image_dir)
    copy = cache_dir.parent / "elsewhere" / path.parent.name / path.name
    copy.parent.mkdir(parents=True)
    os.symlink(path, copy)
    with pytest.raises(FileNotFoundError):
        load.load_entry(copy)  # not in this loader's cache directory
    assert other.load_entry(path)[1] == load(image_dir)[1]  # the same function: its entries
    (path / "meta.json").write_text("{")
    with pytest.raises(OSError, match="damaged"):
        load.load_entry(path)


def test_a_cache_dir_variable_naming_a_file_warns_once_naming_it(
    image_dir: Path, tmp_path: Path
) -> None:
    file = tmp_path / "a-file"
    file.write_text("not a cache")
    result = run_python(
        f"""
        import json, warnings
        from cachedload import cached_dataset

        @cached_dataset
        def load(image_dir):
            return 7

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [load({str(image_dir)!r}) for _ in range(3)]
        print(json.dumps([results, [str(w.message) for w in caught]]))
        """,
        CACHEDLOAD_DIR=str(file),
    )
    results, messages = json.loads(result.stdout)
    assert results == [7, 7, 7]
    assert len(messages) == 1, messages
    assert f"{file} ($CACHEDLOAD_DIR)" in messages[0]
    assert f"{file} is a file, not a folder" in messages[0]
    assert "CACHEDIR.TAG" not in messages[0]
    assert file.read_text() == "not a cache"


def test_a_cache_dir_below_a_file_warns_once_per_location(image_dir: Path, tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("not a cache")
    counter: list[int] = []
    load = counting_loader(counter, cache_dir=file / "cache")
    with pytest.warns(CacheStoreWarning) as caught:
        load(image_dir)
        load(image_dir)
        counting_loader(counter, cache_dir=file / "cache")(image_dir)  # same place: said
    assert len(counter) == 3
    (warned,) = caught
    assert f"{file / 'cache'} (cache_dir)" in str(warned.message)
    assert f"{file} is a file, not a folder" in str(warned.message)


def _milliseconds(pattern: str, messages: list[str]) -> list[float]:
    (found,) = [match for m in messages if (match := re.search(pattern, m))]
    return [float(value) for value in found.groups()]


def test_the_hit_and_store_lines_time_the_whole_call(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(3000):  # fingerprinted by content: the slow part of a hit
        (folder / f"{index:05d}.txt").write_bytes(b"x" * 64)
    age(folder)
    load = cached_dataset(cache_dir=cache_dir, fingerprint="content")(lambda data_dir: 1)
    with caplog.at_level(logging.INFO, logger="cachedload"):
        started = time.perf_counter()
        load(str(folder))
        miss_seconds = time.perf_counter() - started
        started = time.perf_counter()
        load(str(folder))
        hit_ms = (time.perf_counter() - started) * 1e3
    messages = [r.getMessage() for r in caplog.records if r.name == "cachedload"]
    total, fingerprint, lookup = _milliseconds(
        r"^hit .* in ([\d.]+) ms \(fingerprint ([\d.]+) ms, load ([\d.]+) ms", messages
    )
    # The logged call includes the fingerprint (the slow part here) and fits in the call as
    # the caller timed it (no ratio: another process may take the CPU between the two).
    # (The log rounds: to 0.1 ms, and the stored line's whole call to 0.01 s.)
    assert fingerprint > lookup and fingerprint + lookup <= total + 0.1 <= hit_ms + 0.2
    stored_fingerprint, in_all = _milliseconds(
        r"^stored .*fingerprint ([\d.]+) ms; ([\d.]+) s in all\)$", messages
    )
    assert stored_fingerprint / 1e3 <= in_all + 0.005 <= miss_seconds + 0.01
