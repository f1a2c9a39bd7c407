"""keys.py: which arguments are sources and which parameters, a call's group and key, the racy
file checks and the metadata describing a call."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cachedload.keys
from cachedload import (
    CachedloadError,
    ConfigurationError,
    SourceNotFoundError,
    UnhashableArgumentError,
    cached_dataset,
)
from cachedload.fingerprint import RACY_WINDOW_NS
from cachedload.keys import (
    KeyRules,
    entry_meta,
    racy_files_unchanged,
    racy_records_expired,
    readable,
    says_path,
    summarize,
)
from cachedload.options import Options
from tests.conftest import age, runs, subprocess_env, write_old
from tests.test_decorator import counting_loader


def test_missing_source_raises_before_the_body_runs(tmp_path: Path, cache_dir: Path) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    missing = tmp_path / "no_such_dir"
    with pytest.raises(SourceNotFoundError) as raised:
        load(missing)
    assert isinstance(raised.value, FileNotFoundError)
    assert isinstance(raised.value, CachedloadError)
    assert raised.value.parameter == "image_dir"
    assert raised.value.path == str(missing)
    assert "image_dir" in str(raised.value) and str(missing) in str(raised.value)
    with pytest.raises(FileNotFoundError):
        load(str(missing))  # a string that names a path-like parameter
    assert calls == []


def test_a_string_in_a_parameter_not_named_as_a_path_is_a_parameter_whatever_it_names(
    tmp_path: Path, image_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path, split: str = "train", sep: str = ",") -> int:
        calls.append(1)
        return 1

    with_train = tmp_path / "with_train"
    (with_train / "train").mkdir(parents=True)
    monkeypatch.chdir(with_train)
    load(image_dir, split="train", sep="/")  # neither "train/" nor the whole file system
    load(image_dir, split="train", sep=".")
    entries = load.entries()
    assert [sorted(entry.sources) for entry in entries] == [["image_dir"], ["image_dir"]]
    assert all(entry.parameters["split"] == "'train'" for entry in entries)
    monkeypatch.chdir(tmp_path)  # no train/ here: the same calls, the same keys
    load(image_dir, split="train", sep="/")
    load(image_dir, split="train", sep=".")
    assert len(calls) == 2
    # and a string naming nothing in such a parameter reaches the body
    assert load(image_dir, split=str(tmp_path / "not_there" / "x")) == 1


@pytest.mark.parametrize(
    ("name", "is_source"),
    [
        ("image_dir", True),
        ("csvPath", True),
        ("imagedir", True),
        ("train_root", True),
        ("filename", True),
        ("direction", False),
        ("profile", False),
        ("resource", False),
        ("split", False),
    ],
)
def test_a_parameter_name_says_path_by_its_words_not_by_substrings(
    name: str, is_source: bool, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "left").mkdir()  # exists: a source where the name says path
    namespace: dict[str, Any] = {}
    exec(f"def load({name}):\n    return {name}", namespace)
    load = cached_dataset(cache_dir=cache_dir)(namespace["load"])
    assert load("left") == "left"
    sources = load.entries()[0].sources
    assert (name in sources) is is_source


@pytest.mark.parametrize(
    "annotation",
    [
        Path,
        os.PathLike,
        os.PathLike[str],
        str | Path,
        "str | Path",
        "Optional[pathlib.Path]",
        "Union[str, os.PathLike[str]]",
        "list[Path]",
    ],
    ids=repr,
)
def test_a_string_in_a_parameter_annotated_as_a_path_is_a_source(
    annotation: Any, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def body(data: Any) -> int:  # "data": the name alone does not say path
        calls.append(1)
        return 1

    body.__annotations__ = {"data": annotation, "return": int}
    load = cached_dataset(cache_dir=cache_dir)(body)
    monkeypatch.chdir(tmp_path)
    Path("present.txt").write_text("one")
    age(tmp_path)
    present, missing = "present.txt", "missing.txt"
    value: Any = [present] if "list" in str(annotation) else present
    load(value)
    assert [sorted(entry.sources) for entry in load.entries()] in (
        [["data"]],
        [["data[0]"]],
    )
    with pytest.raises(SourceNotFoundError, match="'data'"):
        load([missing] if isinstance(value, list) else missing)
    assert len(calls) == 1


@pytest.mark.parametrize("annotation", [str, "str", int, "Literal['a/b']", Any], ids=repr)
def test_a_parameter_annotated_otherwise_takes_strings_as_parameters(
    annotation: Any, tmp_path: Path, cache_dir: Path
) -> None:
    def body(data: Any) -> int:
        return 1

    body.__annotations__ = {"data": annotation}
    load = cached_dataset(cache_dir=cache_dir)(body)
    assert load(str(tmp_path / "missing")) == 1
    assert load(str(tmp_path)) == 1  # an existing folder too
    assert all(entry.sources == {} for entry in load.entries())


def test_a_missing_relative_path_in_a_path_parameter_raises_before_the_body(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    monkeypatch.chdir(tmp_path)
    for name in ("nosuchfolder", "no/such/folder"):
        with pytest.raises(SourceNotFoundError) as raised:
            load(name)
        assert (raised.value.parameter, raised.value.path) == ("image_dir", name)
    assert calls == []


def test_a_keyword_of_var_keyword_arguments_says_path_like_a_parameter_name(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @cached_dataset(cache_dir=cache_dir)
    def load(**options: Any) -> int:
        return 1

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()
    assert load(split="train", image_dir="train") == 1
    assert list(load.entries()[0].sources) == ["options[image_dir]"]
    with pytest.raises(SourceNotFoundError, match="'options'"):
        load(image_dir="nosuchfolder")


@pytest.mark.parametrize("where", ["root", "home", "link to root"])
def test_the_root_or_home_directory_is_walked_only_when_source_names_it(
    where: str, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "to_root").symlink_to("/")
    value = {"root": "/", "home": str(home), "link to root": str(tmp_path / "to_root")}[where]
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    for given in (value, Path(value)):
        with pytest.raises(ConfigurationError, match=r"'image_dir'.*source=\['image_dir'\]"):
            load(given)
    assert calls == []
    if where == "home":  # named by source=, it is a source like any other
        explicit = counting_loader(calls, cache_dir=cache_dir, source="image_dir")
        assert explicit(str(home))[1] == []
        assert explicit.entries()[0].sources["image_dir"]["path"] == str(home)


def test_missing_explicit_source_raises(tmp_path: Path, cache_dir: Path) -> None:
    @cached_dataset(cache_dir=cache_dir, source="data")
    def load(data: str) -> int:
        return 1

    with pytest.raises(SourceNotFoundError, match="'data'"):
        load("relative/missing")


def test_unhashable_argument_names_the_parameter(image_dir: Path, cache_dir: Path) -> None:
    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path, lock: Any = None) -> int:
        return 1

    with pytest.raises(UnhashableArgumentError) as raised:
        load(image_dir, lock=threading.Lock())
    assert isinstance(raised.value, TypeError)
    assert raised.value.parameter == "lock"
    assert "ignore=['lock']" in str(raised.value)


def test_paths_in_args_and_lists_are_sources(tmp_path: Path, cache_dir: Path) -> None:
    first, second = tmp_path / "one.txt", tmp_path / "two.txt"
    for path in (first, second):
        path.write_text("old")
    age(tmp_path)

    @cached_dataset(cache_dir=cache_dir)
    def concat(*paths: str) -> str:
        return "".join(Path(p).read_text() for p in paths)

    @cached_dataset(cache_dir=cache_dir)
    def concat_list(paths: list[str], sep: str = "") -> str:
        return sep.join(Path(p).read_text() for p in paths)

    assert concat(str(first), str(second)) == "oldold"
    assert concat_list([str(first), str(second)]) == "oldold"
    second.write_text("new!")
    assert concat(str(first), str(second)) == "oldnew!"
    assert concat_list([str(first), str(second)]) == "oldnew!"


def test_a_missing_source_is_reported_before_a_later_unhashable_argument(
    tmp_path: Path, cache_dir: Path
) -> None:
    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: str, transform: Any = None) -> int:
        return 1

    unpicklable = threading.Lock()
    with pytest.raises(SourceNotFoundError, match="image_dir"):
        load(str(tmp_path / "missing"), transform=unpicklable)


def test_dtype_and_class_arguments_are_parameters(image_dir: Path, cache_dir: Path) -> None:
    calls: list[int] = []

    @cached_dataset(cache_dir=cache_dir)
    def load(image_dir: Path, count: int, dtype: Any = np.float64) -> np.ndarray:
        calls.append(1)
        return np.zeros(count, dtype=dtype)

    for dtype in (np.float32, np.dtype("f4"), float, np.float32):
        load(image_dir, 3, dtype=dtype)
    assert len(calls) == 3
    assert load(image_dir, 3, dtype=np.float32).dtype == np.float32
    assert len(calls) == 3


def test_an_unhashable_bound_self_is_named_and_may_be_ignored(
    image_dir: Path, cache_dir: Path
) -> None:
    class Client:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def fetch(self, image_dir: Path) -> int:
            return 1

    with pytest.raises(UnhashableArgumentError) as raised:
        cached_dataset(cache_dir=cache_dir)(Client().fetch)(image_dir)
    assert raised.value.parameter == "self"
    assert cached_dataset(cache_dir=cache_dir, ignore=["self"])(Client().fetch)(image_dir) == 1


# --- KeyRules directly --------------------------------------------------------------------------
def rules(**options: Any) -> KeyRules:
    """The key rules of a loader named ``tests.load`` decorated with ``options``."""
    return KeyRules.from_options("tests.load", Options(**options))


def _load(image_dir: Path, size: int = 4) -> None:
    """The signature the direct tests bind calls to."""


SIGNATURE = inspect.signature(_load)


def test_prepare_knows_the_group_before_fingerprinting_and_finish_keeps_it(
    image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_rules = rules()

    def too_early(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("prepare fingerprinted a source")

    with monkeypatch.context() as patch:
        patch.setattr(cachedload.keys, "fingerprint_source", too_early)
        prepared = key_rules.prepare(SIGNATURE, (image_dir,), {}, "code-1")
    assert prepared.parameters.keys() == {"size"}  # the default applied
    assert list(prepared.pending) == ["image_dir"]  # resolved, not fingerprinted
    group = prepared.group.digest
    call = key_rules.finish(prepared)
    assert call.group == prepared.group and call.group.digest == group
    assert call.sources["image_dir"][0] == os.path.realpath(image_dir)
    assert call.sources["image_dir"][1].file_count == 6


def test_bind_is_finish_of_prepare(image_dir: Path) -> None:
    key_rules = rules()
    bound = key_rules.bind(SIGNATURE, (image_dir,), {"size": 8}, "code-1")
    finished = key_rules.finish(key_rules.prepare(SIGNATURE, (image_dir,), {"size": 8}, "code-1"))
    assert bound.key == finished.key and bound.group == finished.group
    assert bound.parameters == finished.parameters and bound.given_paths == finished.given_paths
    assert {name: (path, fp.digest) for name, (path, fp) in bound.sources.items()} == {
        name: (path, fp.digest) for name, (path, fp) in finished.sources.items()
    }


def test_calls_differing_only_in_source_contents_share_a_group_not_a_key(image_dir: Path) -> None:
    key_rules = rules()
    first = key_rules.bind(SIGNATURE, (image_dir,), {}, "code-1")
    (image_dir / "a" / "extra.png").write_bytes(b"not really a png")
    age(image_dir)
    second = key_rules.bind(SIGNATURE, (image_dir,), {}, "code-1")
    assert second.group == first.group and second.key != first.key
    assert key_rules.bind(SIGNATURE, (image_dir, 8), {}, "code-1").group != first.group
    assert key_rules.bind(SIGNATURE, (image_dir,), {}, "code-2").group != first.group


@pytest.mark.parametrize(
    ("name", "annotation", "expected"),
    [
        ("image_dir", inspect.Parameter.empty, True),
        ("csvPath", inspect.Parameter.empty, True),
        ("imagedir", inspect.Parameter.empty, True),
        ("trainRoot", inspect.Parameter.empty, True),
        ("filenames", inspect.Parameter.empty, True),
        ("direction", inspect.Parameter.empty, False),
        ("profile", inspect.Parameter.empty, False),
        ("resource", inspect.Parameter.empty, False),
        ("nadir", inspect.Parameter.empty, False),
        ("data", Path, True),
        ("data", os.PathLike[str], True),
        ("data", str | Path, True),
        ("data", "Optional[pathlib.Path]", True),
        ("data", list[Path], True),
        ("data", str, False),
        ("data", "Literal['a/b']", False),
        ("data", ["not", "a", "type"], False),  # unhashable: read, not memoised
    ],
    ids=repr,
)
def test_says_path_reads_the_names_words_and_the_annotation(
    name: str, annotation: Any, expected: bool
) -> None:
    parameter = inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert says_path(parameter.replace(annotation=annotation)) is expected


def test_is_source_takes_path_objects_anywhere_and_strings_where_the_name_says_path() -> None:
    detected = rules()
    assert detected.is_source("data", Path("x"))
    assert detected.is_source("image_dir", "x") and not detected.is_source("data", "x")
    assert detected.is_source("data", "x", named_path=True)  # said by the annotation
    assert not detected.is_source("image_dir", "")
    assert detected.is_source("paths", ["a", "b"]) and not detected.is_source("paths", [])
    assert not detected.is_source("paths", ["a", 1])
    named = rules(source="data")
    assert named.is_source("data", "x") and not named.is_source("data", None)
    assert not named.is_source("image_dir", Path("x"))  # source= names them all


def test_racy_files_are_checked_by_content_until_their_records_expire(tmp_path: Path) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    (folder / "a.txt").write_text("one")  # just written: its mtime cannot be trusted yet
    key_rules = rules()
    call = key_rules.bind(SIGNATURE, (folder,), {}, "code-1")
    racy, newest = key_rules.racy_digests(call)
    assert list(racy) == ["image_dir"] and list(racy["image_dir"]) == ["a.txt"]
    meta = {"racy": racy, "racy_newest_mtime_ns": newest}
    assert racy_files_unchanged(call, meta) and not racy_records_expired(meta)
    (folder / "a.txt").write_text("two")  # same size, maybe the same mtime tick
    assert not racy_files_unchanged(call, meta)
    (folder / "a.txt").unlink()
    assert not racy_files_unchanged(call, meta)
    assert not racy_files_unchanged(call, {"racy": {"other_dir": {"a.txt": "0"}}})
    assert racy_files_unchanged(call, {})
    long_ago = {"racy": racy, "racy_newest_mtime_ns": newest - 2 * RACY_WINDOW_NS}
    assert racy_records_expired(long_ago)
    assert not racy_records_expired({"racy": {}, "racy_newest_mtime_ns": 0})
    assert rules(fingerprint="content").racy_digests(call) == ({}, 0)  # no mtimes trusted


def test_a_just_written_symlinked_source_file_hits(tmp_path: Path, cache_dir: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.txt").write_text("one")  # racy: written within the mtime window
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "a.txt").symlink_to(elsewhere / "a.txt")
    (tmp_path / "single.txt").symlink_to(elsewhere / "a.txt")
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    for source in (folder, tmp_path / "single.txt"):
        load(source)
        load(source)  # the racy content check follows the link, as the walk does
    assert len(calls) == 2
    (elsewhere / "a.txt").write_text("two")  # same size, maybe the same mtime tick
    load(folder)
    assert len(calls) == 3


def test_a_symlink_to_a_source_file_is_cached(tmp_path: Path, cache_dir: Path) -> None:
    write_old(tmp_path / "data.csv", "one")
    (tmp_path / "link.csv").symlink_to(tmp_path / "data.csv")
    calls: list[int] = []
    load = counting_loader(calls, cache_dir=cache_dir)
    load(tmp_path / "link.csv")  # stored: the file's record is named the same after the body
    load(tmp_path / "link.csv")
    assert len(calls) == 1


def test_call_meta_describes_the_keys_components(image_dir: Path) -> None:
    key_rules = rules(fingerprint="content")
    call = key_rules.bind(SIGNATURE, (image_dir,), {"size": 8}, "code-1")
    meta = key_rules.call_meta(call, "code-1", version=3, code_parts={"loader": "abc"})
    assert (meta["key"], meta["group"]) == (call.key, call.group.digest)
    assert (meta["function"], meta["code"], meta["version"]) == ("tests.load", "code-1", "3")
    assert meta["code_parts"] == {"loader": "abc"} and meta["portable"] is False
    assert meta["parameters"] == {"size": {"digest": call.parameters["size"][0], "value": "8"}}
    source = meta["sources"]["image_dir"]
    assert source["path"] == os.path.realpath(image_dir)
    assert (source["mode"], source["file_count"]) == ("content", 6)
    assert "state" not in meta  # only when the loader has some
    with_state = key_rules.bind(
        SIGNATURE, (image_dir,), {"size": 8}, "code-1", state={"global SCALE": ("d1", 2)}
    )
    assert with_state.key != call.key and with_state.group != call.group
    assert key_rules.call_meta(with_state, "code-1", None)["state"] == {
        "global SCALE": {"digest": "d1", "value": "2"}
    }
    stored = entry_meta(meta, np.zeros(3), 0.25, {}, 0)
    assert stored["key"] == call.key and stored["result"] == "ndarray(shape=(3,), dtype=float64)"
    assert stored["compute_seconds"] == 0.25 and stored["racy"] == {}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (8, "8"),
        ((1, "a"), "(1, 'a')"),
        (np.float32, "numpy.float32"),
        (np.zeros((2, 3), np.uint8), "ndarray(shape=(2, 3), dtype=uint8)"),
        (len, "builtins.len"),
    ],
    ids=repr,
)
def test_readable_text_of_a_parameter(value: Any, text: str) -> None:
    assert readable(value) == text


def test_readable_shortens_long_values() -> None:
    text = readable("x" * 10_000)
    assert len(text) < 130 and "..." in text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (np.zeros((2, 3)), "ndarray(shape=(2, 3), dtype=float64)"),
        ((np.zeros(2), ["a"]), "tuple(ndarray(shape=(2,), dtype=float64), list(str))"),
        ({"x": 1}, "dict('x': int)"),
        (list(range(20)), "list(len=20)"),
        ("s", "str"),
    ],
    ids=repr,
)
def test_summarize_describes_a_result_by_type_and_shape(value: Any, text: str) -> None:
    assert summarize(value) == text


def test_ordered_dicts_in_another_order_are_another_call(tmp_path: Path, cache_dir: Path) -> None:
    import collections

    @cached_dataset(cache_dir=cache_dir)
    def columns(order: collections.OrderedDict[str, int]) -> list[str]:
        return list(order)

    assert columns(collections.OrderedDict(a=1, b=2)) == ["a", "b"]
    assert columns(collections.OrderedDict(b=2, a=1)) == ["b", "a"]
    assert columns.cache_info().misses == 2


def test_a_ufunc_made_from_a_python_function_is_refused_not_confused(cache_dir: Path) -> None:
    @cached_dataset(cache_dir=cache_dir)
    def apply(values: list[int], func: Any) -> list[int]:
        return list(func(np.array(values)))

    assert apply([1, 2], np.negative) == [-1, -2]
    with pytest.raises(UnhashableArgumentError, match="func"):
        apply([1, 2], np.frompyfunc(lambda x: x + 1, 1, 1))


# A script passing one of its own functions to a loader that joblib runs in loky workers: each
# worker receives the function rebuilt by cloudpickle, without a source file of its own.
FUNCTION_ARGUMENT_SCRIPT = """
import os
import sys

import joblib

from cachedload import cached_dataset


def double(x):
    return x * 2  # applied to every name


@cached_dataset(cache_dir=os.environ["CACHE"])
def load(image_dir, transform):
    with open(os.environ["COUNTER"], "a") as counter:
        counter.write("run\\\\n")
    return [transform(name) for name in sorted(os.listdir(image_dir))]


if __name__ == "__main__":
    first = load(sys.argv[1], double)
    with joblib.Parallel(n_jobs=2, backend="loky") as parallel:
        from_loky = parallel(joblib.delayed(load)(sys.argv[1], double) for _ in range(2))
    assert from_loky == [first] * 2, (from_loky, first)
    print(len(load.entries()))
"""


def test_a_function_argument_hits_in_loky_workers(
    image_dir: Path, cache_dir: Path, counter_file: Path, tmp_path: Path
) -> None:
    script = tmp_path / "transform.py"
    script.write_text(FUNCTION_ARGUMENT_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(image_dir)],
        capture_output=True,
        text=True,
        env=subprocess_env(CACHE=str(cache_dir), COUNTER=str(counter_file)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1\n"  # one entry
    assert runs(counter_file) == 1  # computed in the parent; both workers hit
