"""The options of cached_dataset (cachedload.options): one frozen dataclass, checked once."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest

import cachedload.decorator
import cachedload.options
from cachedload import ConfigurationError, cached_dataset
from cachedload.fingerprint import fingerprint_source
from cachedload.manage import prune
from cachedload.options import Options

OPTIONS = [f for f in dataclasses.fields(Options) if f.init]

# option -> an invalid value and what the error says about it
INVALID = {
    "source": ([1], "expected a name or a list of names"),
    "ignore": ([None], "expected a name or a list of names"),
    "per_item": (3, "must be a parameter name or None, not 3"),
    "cache_dir": (3, "must be a str or os.PathLike"),
    "mmap_mode": ("r+", r"must be None, 'r' .* or 'c' .*, not 'r\+'"),
    "fingerprint": ("sha1", "must be 'mtime' or 'content', not 'sha1'"),
    "verify": ("sometimes", "must be 'size' or 'always', not 'sometimes'"),
    "lock_timeout": (-1, "must be a number of seconds >= 0 or None, not -1"),
    "keep": (0, "must be a whole number >= 1 or None, not 0"),
    "max_size": ("lots", "expected a size such as 20GB"),
    "storage_options": (3, "must be a dict or None, not 3"),
    "include": (5, "must be a glob pattern or a list of them, or None, not 5"),
    "exclude": ([".*", 5], r"must be a glob pattern or a list of them, or None, not \['.\*', 5\]"),
    "compress": ("nope", "must be False, True, a level from 0 to 9, a method .*, not 'nope'"),
}


@pytest.mark.parametrize(("option", "value", "reason"), [(k, *v) for k, v in INVALID.items()])
def test_an_invalid_option_is_an_error_naming_it(option: str, value: Any, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{option}: {reason}") as raised:
        Options(**{option: value})
    assert raised.value.option == option
    with pytest.raises(ConfigurationError, match=rf"^{option}: {reason}"):
        cached_dataset(**{option: value})


@pytest.mark.parametrize("keep", [0, -1, True, 1.5, "1"])
def test_keep_is_checked_alike_by_the_decorator_and_prune(keep: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as by_options:
        Options(keep=keep)
    with pytest.raises(ConfigurationError) as by_prune:
        prune(tmp_path, keep=keep)
    assert str(by_prune.value) == str(by_options.value)


def test_the_fingerprint_mode_is_checked_alike_by_the_decorator_and_fingerprint_source(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError) as by_options:
        Options(fingerprint="sha")  # type: ignore[arg-type]
    with pytest.raises(ValueError) as by_function:
        fingerprint_source(tmp_path, mode="sha")
    assert by_options.value.message == str(by_function.value).removeprefix("mode: ")


def test_source_and_ignore_must_name_the_loaders_parameters() -> None:
    def body(image_dir: str, verbose: bool = False) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"^source: \['nope'\] not among .*body's"):
        cached_dataset(source="nope")(body)
    with pytest.raises(ConfigurationError, match=r"^ignore: \['nope'\] not among .*body's"):
        cached_dataset(ignore=["verbose", "nope"])(body)
    assert cached_dataset(source="image_dir", ignore="verbose")(body) is not None


def test_values_are_derived_once() -> None:
    options = Options(source="image_dir", ignore=["a", "b"], max_size="1KB", depends_on=[len])
    assert options.source_names == ("image_dir",)
    assert options.ignore_names == frozenset({"a", "b"})
    assert options.max_size_bytes == 1000
    assert options.depends_on == (len,)
    assert Options().source_names is None and Options().max_size_bytes is None
    assert Options(cache_dir="file:///tmp/c").cache_location == Path("/tmp/c")


def test_options_are_frozen() -> None:
    options = Options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.keep = 3  # type: ignore[misc]


def test_replace_gives_a_checked_copy() -> None:
    options = Options(keep=2, mmap_mode="r")
    copy = dataclasses.replace(options, keep=3)
    assert (copy.keep, copy.mmap_mode, options.keep) == (3, "r", 2)
    with pytest.raises(ConfigurationError, match=r"^keep: "):
        dataclasses.replace(options, keep=0)


def test_options_pickle_and_are_checked_again_when_unpickled(tmp_path: Path) -> None:
    options = Options(
        cache_dir=tmp_path, mmap_mode="r", keep=None, max_size="2MB", storage_options={"a": 1}
    )
    copy = pickle.loads(pickle.dumps(options))
    assert copy == options
    assert (copy.cache_location, copy.max_size_bytes) == (tmp_path, 2_000_000)
    assert Options(**options.given()) == options


def test_a_cache_dir_is_expanded_where_the_options_are_unpickled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = pickle.dumps(Options(cache_dir="~/cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pickle.loads(data).cache_location == tmp_path / "cache"


def test_one_decorator_checks_its_options_once(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Options] = []
    real = cachedload.options.options_for

    def counting(caller: str, given: dict[str, Any], **fixed: Any) -> Options:
        made.append(real(caller, given, **fixed))
        return made[-1]

    monkeypatch.setattr(cachedload.decorator, "options_for", counting)
    decorate = cached_dataset(keep=2)
    decorate(lambda a: a)
    decorate(lambda b: b)
    assert len(made) == 1


# -- the options are written out in two places: Options and the overload of cached_dataset ----
def _overload_keywords() -> list[ast.arg]:
    """The keyword-only parameters of the typed overload ``cached_dataset(*, …)``."""
    tree = ast.parse(inspect.getsource(cachedload.decorator))
    (overload,) = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.name == "cached_dataset"
        and node.args.kwonlyargs
        and any(ast.unparse(d) == "overload" for d in node.decorator_list)
    ]
    defaults = overload.args.kw_defaults
    assert all(default is not None for default in defaults)  # every option has a default
    return overload.args.kwonlyargs


def test_every_option_of_cached_dataset_is_a_field_of_options() -> None:
    assert [arg.arg for arg in _overload_keywords()] == [f.name for f in OPTIONS]


def test_the_overload_has_the_types_and_defaults_of_options() -> None:
    tree = ast.parse(inspect.getsource(cachedload.decorator))
    (overload,) = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.name == "cached_dataset"
        and node.args.kwonlyargs
    ]
    for arg, default, option in zip(
        overload.args.kwonlyargs, overload.args.kw_defaults, OPTIONS, strict=True
    ):
        assert arg.annotation is not None and default is not None
        assert ast.unparse(arg.annotation) == option.type, option.name
        assert ast.literal_eval(default) == option.default, option.name


def test_every_option_is_documented_by_cached_dataset() -> None:
    doc = inspect.getdoc(cached_dataset) or ""
    for option in OPTIONS:
        assert f"\n    {option.name}: " in doc, option.name


@pytest.mark.parametrize("compress", [3, True, "zlib", ("bz2", 3)])
def test_compress_with_mmap_mode_is_refused_at_decoration(compress: Any) -> None:
    # joblib would load a compressed entry into memory and warn at every call: the arrays would
    # not be the read-only maps mmap_mode promises.
    with pytest.raises(ConfigurationError, match="and mmap_mode='r' cannot be combined") as caught:
        cached_dataset(compress=compress, mmap_mode="r")
    assert caught.value.option == "compress"


@pytest.mark.parametrize("compress", [0, False, ("zlib", 0)])
def test_no_compression_with_mmap_mode_is_fine(compress: Any) -> None:
    cached_dataset(compress=compress, mmap_mode="r")


@pytest.mark.parametrize(
    "compress", [("zlib", 10), ("nope", 3), ("zlib",), -1, 3.5, ("zlib", True), [3]]
)
def test_a_compression_joblib_would_refuse_is_refused_at_decoration(compress: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"^compress: must be False, True, a level"):
        cached_dataset(compress=compress)


@pytest.mark.parametrize("compress", [False, True, 0, 9, "zlib", "gzip", ("lzma", 3), ("bz2", 0)])
def test_every_compression_joblib_takes_is_accepted(compress: Any) -> None:
    cached_dataset(compress=compress)


def test_a_single_include_pattern_is_one_pattern_not_its_characters() -> None:
    assert Options(include="*.png").include == ("*.png",)
    assert Options(exclude="*.tmp").exclude == ("*.tmp",)
    assert Options(include=["*.png", "*.jpg"]).include == ("*.png", "*.jpg")


def test_compression_with_memory_mapping_says_why_and_what_to_do() -> None:
    with pytest.raises(ConfigurationError) as caught:
        cached_dataset(compress=3, mmap_mode="r")
    message = str(caught.value)
    assert message == (
        "compress: compress=3 and mmap_mode='r' cannot be combined: a compressed result cannot "
        "be memory-mapped; drop compress= to map the result, or mmap_mode= to keep it compressed"
    )
