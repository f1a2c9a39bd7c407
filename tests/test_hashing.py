"""Value and code digests: stable across processes, sensitive to what matters."""

from __future__ import annotations

import dataclasses
import enum
import functools
import threading
from pathlib import Path

import numpy as np
import pytest

from cachedload.hashing import UnhashableError, code_digest, function_identity, value_digest
from tests.conftest import run_python


def test_equal_values_equal_digests() -> None:
    assert value_digest({"a": 1, "b": [1, 2.5, None]}) == value_digest(
        {"b": [1, 2.5, None], "a": 1}
    )
    assert value_digest({3, 1, 2}) == value_digest({1, 2, 3})
    assert value_digest(frozenset({"x", "y"})) == value_digest(frozenset({"y", "x"}))


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (1, 1.0),
        (1, True),
        ((1, 2), [1, 2]),
        ("1", 1),
        (b"ab", "ab"),
        ((128, 128), (64, 64)),
        ({"a": 1}, {"a": 2}),
        (0.1 + 0.2, 0.3),
        (None, "None"),
        (Path("a/b"), "a/b"),
        ((1, (2, 3)), ((1, 2), 3)),
    ],
)
def test_different_values_differ(left: object, right: object) -> None:
    assert value_digest(left) != value_digest(right)


def test_numpy_arrays_hash_by_dtype_shape_and_content() -> None:
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert value_digest(base) == value_digest(base.copy())
    assert value_digest(base) != value_digest(base.astype(np.int64))
    assert value_digest(base) != value_digest(base.reshape(4, 3))
    changed = base.copy()
    changed[2, 3] = 99
    assert value_digest(base) != value_digest(changed)
    assert value_digest(base) != value_digest(base.tolist())


def test_non_contiguous_view_hashes_by_logical_content() -> None:
    big = np.arange(100, dtype=np.float64).reshape(10, 10)
    view = big[::2, 1::3]
    assert not view.flags.c_contiguous
    assert value_digest(view) == value_digest(np.ascontiguousarray(view))
    assert value_digest(big.T) == value_digest(np.ascontiguousarray(big.T))
    assert value_digest(big.T) != value_digest(big)


def test_numpy_scalars_and_object_arrays() -> None:
    assert value_digest(np.float32(1.5)) == value_digest(np.float32(1.5))
    assert value_digest(np.float32(1.5)) != value_digest(np.float64(1.5))
    objects = np.array([{"a": 1}, "x"], dtype=object)
    assert value_digest(objects) == value_digest(np.array([{"a": 1}, "x"], dtype=object))


@dataclasses.dataclass
class Settings:
    size: tuple[int, int]
    tags: set[str]


class Colour(enum.Enum):
    RGB = "rgb"
    GRAY = "gray"


def test_objects_hash_by_state() -> None:
    assert value_digest(Settings((1, 2), {"a", "b"})) == value_digest(Settings((1, 2), {"b", "a"}))
    assert value_digest(Settings((1, 2), set())) != value_digest(Settings((2, 2), set()))
    assert value_digest(Colour.RGB) != value_digest(Colour.GRAY)


def scale(x: float) -> float:
    return x * 2


def shift(x: float) -> float:
    return x + 2


def test_functions_hash_by_code_closures_and_partials() -> None:
    assert value_digest(scale) != value_digest(shift)

    def make(factor: float) -> object:
        return lambda x: x * factor

    assert value_digest(make(2)) == value_digest(make(2))
    assert value_digest(make(2)) != value_digest(make(3))
    assert value_digest(functools.partial(scale, 1)) != value_digest(functools.partial(scale, 2))
    assert value_digest(len) == value_digest(len)


def test_unpicklable_object_raises() -> None:
    with pytest.raises(UnhashableError, match="lock"):
        value_digest({"lock": threading.Lock()})


def test_cycles_terminate() -> None:
    cyclic: list[object] = [1]
    cyclic.append(cyclic)
    assert value_digest(cyclic) == value_digest(cyclic)


def test_code_digest_ignores_comments_docstrings_and_formatting(tmp_path: Path) -> None:
    import importlib.util

    def load(source: str, name: str) -> object:
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.f

    original = load("def f(x):\n    return x + 1\n", "m1")
    commented = load(
        'def f(x):\n    """Docs."""\n    # a comment\n    return (x +\n            1)  # more\n',
        "m2",
    )
    edited = load("def f(x):\n    return x + 2\n", "m3")
    assert code_digest(original) == code_digest(commented)  # type: ignore[arg-type]
    assert code_digest(original) != code_digest(edited)  # type: ignore[arg-type]


def test_code_digest_falls_back_to_bytecode() -> None:
    namespace: dict[str, object] = {}
    exec("def g(x):\n    return x * 3\n", namespace)  # no source file to read
    exec("def h(x):\n    return x * 4\n", namespace)
    assert code_digest(namespace["g"]) != code_digest(namespace["h"])  # type: ignore[arg-type]


def test_function_identity() -> None:
    assert function_identity(scale) == f"{__name__}.scale"


def test_a_script_function_has_one_identity_as_main_and_in_spawned_workers() -> None:
    # A spawned worker re-imports the main script as __mp_main__.
    identities = set()
    for module in ("__main__", "__mp_main__"):
        namespace: dict[str, object] = {"__name__": module}
        exec("def load(root):\n    return root\n", namespace)
        identities.add(function_identity(namespace["load"]))  # type: ignore[arg-type]
    assert identities == {"__main__.load"}


def test_digests_are_stable_across_processes_and_hash_seeds() -> None:
    code = """
        import numpy as np
        from cachedload.hashing import value_digest
        value = {"names": {"alpha", "beta", "gamma", "delta"}, "size": (128, 128),
                 "frozen": frozenset({"x", "y", "z"}), "array": np.arange(6).reshape(2, 3),
                 ("tuple", "key"): [1.5, None, b"bytes"]}
        print(value_digest(value))
    """
    seeds = ["1", "2", "12345"]
    outputs = {run_python(code, PYTHONHASHSEED=seed).stdout.strip() for seed in seeds}
    assert len(outputs) == 1


def test_two_lambdas_on_one_line_differ() -> None:
    first, second = (lambda x: x + 1, lambda x: x * 2)
    assert value_digest(first) != value_digest(second)


def test_code_edited_on_disk_but_not_reloaded_keeps_its_own_digest(tmp_path: Path) -> None:
    import importlib.util

    path = tmp_path / "edited_mod.py"
    path.write_text("def f(x):\n    return 'v1'\n")
    spec = importlib.util.spec_from_file_location("edited_mod", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path.write_text("def f(x):\n    return 'v2'\n")  # edited, not reloaded: v1 still runs
    running_v1 = code_digest(module.f)
    fresh_v2 = run_python(
        f"""
        import importlib.util
        from cachedload.hashing import code_digest
        spec = importlib.util.spec_from_file_location("edited_mod", {str(path)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(code_digest(module.f))
        """
    ).stdout.strip()
    assert running_v1 != fresh_v2


def test_array_subclasses_hash_with_their_type_and_state() -> None:
    class Tagged(np.ndarray):
        pass

    plain = np.array([[1, 2]])
    assert value_digest(plain.view(Tagged)) != value_digest(plain)
    masked = np.ma.MaskedArray([1, 2], mask=[False, True])
    assert value_digest(masked) == value_digest(np.ma.MaskedArray([1, 2], mask=[False, True]))
    assert value_digest(masked) != value_digest(np.ma.MaskedArray([1, 2], mask=[True, False]))
    assert value_digest(masked) != value_digest(np.array([1, 2]))


def test_bound_builtin_methods_hash_with_their_object() -> None:
    import collections
    import gc
    import re

    assert value_digest(re.compile("train_").match) != value_digest(re.compile("test_").match)
    assert value_digest(re.compile("train_").match) == value_digest(re.compile("train_").match)
    assert value_digest(collections.deque([1]).extend) != value_digest(
        collections.deque([2]).extend
    )
    assert value_digest({"a": 1}.get) != value_digest({"a": 2}.get)
    assert value_digest(gc.collect) == value_digest(gc.collect)  # a module by its name
    assert value_digest(gc.collect) != value_digest(gc.enable)


def test_dtypes_and_classes_hash_as_values() -> None:
    digests = {value_digest(v) for v in (np.dtype("f4"), np.float32, np.float64, float)}
    assert len(digests) == 4
    assert value_digest(np.dtype("f4")) == value_digest(np.dtype(np.float32))


def _module_function(tmp_path: Path, name: str, source: str) -> object:
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.f


BODY_USING_NONE = "    if img is None:\n        return 0\n    return img\n"


def test_a_docstring_does_not_change_the_digest_when_the_body_uses_none(tmp_path: Path) -> None:
    without = "def f(img):\n" + BODY_USING_NONE
    with_doc = 'def f(img):\n    """Load it."""\n' + BODY_USING_NONE
    changed = "def f(img):\n    if img is None:\n        return 1\n    return img\n"
    from_files = [_module_function(tmp_path, f"m{i}", s) for i, s in enumerate((without, with_doc))]
    assert code_digest(from_files[0]) == code_digest(from_files[1])  # type: ignore[arg-type]
    changed_file = _module_function(tmp_path, "m_changed", changed)
    assert code_digest(from_files[0]) != code_digest(changed_file)  # type: ignore[arg-type]
    # Without a source file (exec, a REPL) only the bytecode is hashed: the same holds.
    compiled = []
    for source in (without, with_doc, changed):
        namespace: dict[str, object] = {}
        exec(source, namespace)
        compiled.append(code_digest(namespace["f"]))  # type: ignore[arg-type]
    assert compiled[0] == compiled[1] != compiled[2]


def test_replacing_a_functions_code_changes_its_digest() -> None:
    def g(x: int) -> int:
        return x + 1

    def h(x: int) -> int:
        return x * 7

    before = code_digest(g)
    g.__code__ = h.__code__  # what IPython's %autoreload does
    assert code_digest(g) != before
    assert code_digest(g) == code_digest(h)


def test_set_literals_in_code_hash_the_same_under_any_hash_seed() -> None:
    code = """
        from cachedload.hashing import code_digest
        namespace = {}
        exec("def f(x):\\n    return x in {'alpha', 'beta', 'gamma', 'delta'}\\n", namespace)
        print(code_digest(namespace["f"]))
    """
    outputs = {run_python(code, PYTHONHASHSEED=seed).stdout.strip() for seed in ("1", "2", "3")}
    assert len(outputs) == 1


def test_partials_and_callable_objects_are_named_and_hashed_by_their_code() -> None:
    class Loader:
        def __call__(self, x: float) -> float:
            return scale(x)

    assert function_identity(functools.partial(scale, 2)) == f"{__name__}.scale"
    assert code_digest(functools.partial(scale, 2)) == code_digest(scale)
    assert function_identity(Loader()).endswith("Loader")
    assert code_digest(Loader()) == code_digest(Loader.__call__)
