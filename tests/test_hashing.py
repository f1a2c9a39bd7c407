"""Value and code digests: stable across processes, sensitive to what matters."""

from __future__ import annotations

import dataclasses
import enum
import functools
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _pinned_values() -> dict[str, object]:
    """Values of every kind a key is made of, with no special handling of their own."""
    import collections
    import datetime
    import decimal
    import fractions
    import math
    import re
    import uuid
    from pathlib import PurePosixPath

    return {
        "int": 12345678901234567890, "neg": -3, "float": 0.1, "nan": float("nan"),
        "complex": 1 + 2j, "str": "héllo", "bytes": b"\x00ab", "bytearray": bytearray(b"xy"),
        "none": None, "bools": (True, False), "ellipsis": ...,
        "tuple": (1, (2, 3)), "list": [1, [2.5, None]], "dict": {"b": 1, "a": [1, 2]},
        "set": {3, 1, 2}, "frozenset": frozenset({"x", "y"}),
        "path": Path("/data/train"), "purepath": PurePosixPath("a/b"),
        "enum": Colour.RGB, "dataclass": Settings((64, 64), {"a", "b"}),
        "array": np.arange(12, dtype=np.int32).reshape(3, 4),
        "view": np.arange(20.0).reshape(4, 5)[::2, 1::2],
        "structured": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        "objects": np.array([{"a": 1}, "x"], dtype=object),
        "scalar": np.float32(1.5), "dtype": np.dtype("f4"), "class": np.float64,
        "masked": np.ma.MaskedArray([1, 2], mask=[False, True]),
        "defaultdict": collections.defaultdict(list, {"b": [1], "a": [2]}),
        "counter": collections.Counter("abracadabra"),
        "deque": collections.deque([1, 2, 3]),
        "pattern": re.compile(r"train_\d+", re.I),
        "datetime": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "date": datetime.date(2024, 1, 2), "timedelta": datetime.timedelta(seconds=3),
        "decimal": decimal.Decimal("1.10"), "fraction": fractions.Fraction(1, 3),
        "uuid": uuid.UUID(int=5), "range": range(2, 10, 3), "slice": slice(1, None, 2),
        "ufunc": np.add, "ufunc2": np.sqrt, "builtin": len, "module_builtin": math.sqrt,
        "bound_builtin": re.compile("a").match, "type": int,
        "nested": {"k": [(1, {2, 3}), {"z": np.int64(4)}]},
    }  # fmt: skip


# value_digest of each of _pinned_values() as released: a digest changing here makes every
# cache entry whose key holds such a value miss. Change one only on purpose (a wrong key).
PINNED_DIGESTS = {
    "int": "bc1d58a2b63001bae946b17acc00f5cd",
    "neg": "00d4b4b38e21cf84b2c4e1d82db3350f",
    "float": "7840b5bcd9710121695c717f530b223c",
    "nan": "405f7788242513a427defe3a9f7c89d7",
    "complex": "edc3c100986237370a40de4c5506216b",
    "str": "471d2b85742b9643143cd27e33b1eefd",
    "bytes": "4ed1b7d0c7655f9654b5f4c597c414ed",
    "bytearray": "2099e12983637aba8c0c02636c3de66a",
    "none": "f6e032c71a2832e41586d310ae60a402",
    "bools": "65a9ad09ab6724da722041bb0d6eb84b",
    "ellipsis": "ce22d1dee79d6361762e3fef93c39337",
    "tuple": "b61830c632dac08dbe6b36c37bc5e247",
    "list": "59e18fea704593dd20b6d86712f621b7",
    "dict": "0022738d3a8d27eb716d8c5dff74c87f",
    "set": "e0231749a20bcb3f3a44b175c0a922a3",
    "frozenset": "417d508494dafc792f01cfcb22b3c864",
    "path": "6f297441b68ac690d4cd9f42d8f8a486",
    "purepath": "bdbd975de6ad99ceee8ffc5cd21ba8ba",
    "enum": "ebad3da5897eb43d8a5407e0d83f3e00",
    "dataclass": "d66c036d06c79bf8e75e6cf1e0440b38",
    "array": "fe9834b18dddcaf509ddbf3a53d5b6ec",
    "view": "79e1258353f67be46b1f4c9a1a018da6",
    "structured": "c81ddf805e8c50fbba4b9d1a68c81ddd",
    "objects": "174e514c326de3cc5915aba9f3e54bc1",
    "scalar": "2a62f226fcd50c959fdd3f5a3fcecdc2",
    "dtype": "5fd6203f6142edcbb7ff1d0927d45a21",
    "class": "e0d0e5918b2468de7f2a3601a94b5634",
    "masked": "ed6b7eae7b2d18ac9e4b427ed9ad6a0c",
    "defaultdict": "e6eea1f5381a086cef4240dd671715f0",
    "counter": "7758cf316b5bb84a5f6814632fa359c6",
    "deque": "b6f97a2a211e50af077082d9f6226a4c",
    "pattern": "970cd7f315d2b693987e975fc3e906da",
    "datetime": "1f6c23246181fd641bafe17efb525cbc",
    "date": "4884a5e47a819744d6585f66762f227e",
    "timedelta": "9b4784206a7f80d9cab3b9eed643711c",
    "decimal": "350983b84bb9624162711b19103a6dd1",
    "fraction": "7679b5b2be5fc67e7f93de0838718e78",
    "uuid": "cc03c54329008b5327ee9fef417ab489",
    "range": "eac80e71b75e3eeddef574aa9a28de20",
    "slice": "749d1560436cf2aaa0e82767d71b2532",
    "ufunc": "22594d4eadfa79f35936d11a236afcf2",
    "ufunc2": "7be72ee817d1ee4eb8b45bfe7b8677ef",
    "builtin": "2587baf6cedf49be8aafacd2591a41cf",
    "module_builtin": "7d1a9235f960402a95127985248f396c",
    "bound_builtin": "f0ee3badca7a7b9865a99126dff06102",
    "type": "64692ea09a0042634405823656f0d461",
    "nested": "8f7f378da88d761f0aa4e4a85c1a4af9",
}


@pytest.mark.parametrize("name", sorted(PINNED_DIGESTS))
def test_digests_of_ordinary_values_stay_as_released(name: str) -> None:
    assert value_digest(_pinned_values()[name]) == PINNED_DIGESTS[name]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="bytecode differs between Pythons")
def test_digests_of_functions_stay_as_released() -> None:
    assert value_digest(scale) == PINNED_FUNCTION_DIGESTS["scale"]
    assert value_digest(functools.partial(scale, 2)) == PINNED_FUNCTION_DIGESTS["partial"]
    assert value_digest(_multiplier(3)) == PINNED_FUNCTION_DIGESTS["closure"]


def _multiplier(factor: float) -> Callable[[float], float]:
    def multiply(x: float) -> float:
        return x * factor

    return multiply


PINNED_FUNCTION_DIGESTS = {
    "scale": "6c83f4092f16b30794589de0702a915d",
    "partial": "0b5d0d5572ad811389bf4e938e9d7c19",
    "closure": "4c9d628a8db9d2f3d1e0cece5d21c55f",
}


def test_an_ordered_dicts_order_is_part_of_its_digest() -> None:
    import collections

    forward = collections.OrderedDict(a=1, b=2)
    assert value_digest(forward) != value_digest(collections.OrderedDict(b=2, a=1))
    assert value_digest(forward) == value_digest(collections.OrderedDict([("a", 1), ("b", 2)]))
    assert value_digest({"a": 1, "b": 2}) == value_digest({"b": 2, "a": 1})  # plain: equal


class _Named:
    """Pickles by name, as a module-level singleton does."""

    def __init__(self, payload: object) -> None:
        self.payload = payload

    def __reduce__(self) -> str:
        return "NAMED"


NAMED = _Named("the global")


def test_a_value_reducing_to_a_name_is_that_global_or_hashed_by_value() -> None:
    assert value_digest(NAMED) == value_digest(NAMED)
    impostors = [_Named("one"), _Named("two")]  # not the global they name
    digests = {value_digest(NAMED), *(value_digest(value) for value in impostors)}
    assert len(digests) == 3
    assert value_digest(_Named("one")) == value_digest(impostors[0])


def test_ufuncs_made_from_python_functions_do_not_share_a_digest() -> None:
    first = np.frompyfunc(lambda x: x + 1, 1, 1)
    second = np.frompyfunc(lambda x: x * 2, 1, 1)
    assert first.__name__ == second.__name__  # both "<lambda> (vectorized)"
    with pytest.raises(UnhashableError, match="vectorized"):
        value_digest(first)
    assert value_digest(np.add) != value_digest(np.multiply)


UNPICKLE_AND_HASH = """
import pickle, sys
from cachedload.hashing import value_digest
print(value_digest(pickle.loads(bytes.fromhex(sys.stdin.read()))))
"""


def _digest_in_a_new_process(payload: bytes) -> str:
    import subprocess

    from tests.conftest import subprocess_env

    child = subprocess.run(
        [sys.executable, "-c", UNPICKLE_AND_HASH],
        input=payload.hex(),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    return child.stdout.strip()


def test_a_function_sent_by_value_keeps_its_digest_in_a_new_process() -> None:
    import cloudpickle  # type: ignore[import-untyped]

    def nested(x: float) -> float:
        return scale(x) + 1  # with a comment

    functions = [nested, lambda x: x * 3, _multiplier(2)]
    for function in functions:
        payload = cloudpickle.dumps(function)
        assert b"nested" in payload or b"lambda" in payload or b"multiply" in payload  # by value
        assert _digest_in_a_new_process(payload) == value_digest(function), function


def _digests_in_new_processes(code: str, count: int = 2) -> set[str]:
    return {run_python(code).stdout.strip() for _ in range(count)}


def test_torch_tensors_hash_by_dtype_shape_strides_and_bytes() -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert value_digest(base) == value_digest(base.clone())
    assert value_digest(base) != value_digest(base.to(torch.float64))
    assert value_digest(base) != value_digest(base.reshape(4, 3))
    assert value_digest(base.t()) != value_digest(base.t().contiguous())  # strides differ
    changed = base.clone()
    changed[2, 3] = 99
    assert value_digest(base) != value_digest(changed)
    assert value_digest(torch.tensor(1.0, dtype=torch.bfloat16)) != value_digest(
        torch.tensor(2.0, dtype=torch.bfloat16)
    )
    code = "import torch\nfrom cachedload.hashing import value_digest\n"
    digests = _digests_in_new_processes(code + "print(value_digest(torch.arange(6.0)[1::2]))")
    assert digests == {value_digest(torch.arange(6.0)[1::2])}


def test_a_torch_generator_hashes_by_its_state() -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(7)
    assert value_digest(generator) == value_digest(torch.Generator().manual_seed(7))
    assert value_digest(generator) != value_digest(torch.Generator().manual_seed(8))
    before = value_digest(generator)
    torch.rand(3, generator=generator)
    assert value_digest(generator) != before  # its state moved on
    code = """
        import torch
        from cachedload.hashing import value_digest
        print(value_digest(torch.Generator().manual_seed(7)))
    """
    assert _digests_in_new_processes(code) == {value_digest(torch.Generator().manual_seed(7))}


def test_pandas_extension_arrays_keep_their_digest_after_use() -> None:
    pd = pytest.importorskip("pandas")
    makers: list[Callable[[], Any]] = [
        lambda: pd.array([1, None, 3], dtype="Int64"),
        lambda: pd.period_range("2020-01", periods=3, freq="M").array,
        lambda: pd.array(["a", None], dtype="string"),
        lambda: pd.Categorical(["x", "y", "x"]),
    ]
    for make in makers:
        array = make()
        before = value_digest(array)
        repr(array), array.isna(), array.unique(), array.astype(object), pd.Series(array).sum
        assert value_digest(array) == before == value_digest(make())
    assert value_digest(pd.array([1, None], dtype="Int64")) != value_digest(
        pd.array([1, 2], dtype="Int64")
    )
    assert value_digest(pd.array([1, None], dtype="Int64")) != value_digest(
        pd.array([1, None], dtype="Int32")
    )
    frame = pd.DataFrame({"n": pd.array([1, None], dtype="Int64")})
    before = value_digest(frame)
    frame.describe(), frame["n"].mean()
    assert value_digest(frame) == before


def test_pyarrow_tables_hash_by_logical_value_not_chunking() -> None:
    pa = pytest.importorskip("pyarrow")
    whole = pa.table({"x": [1, 2, None, 4], "s": ["a", "b", "c", None]})
    chunked = pa.concat_tables([whole.slice(0, 1), whole.slice(1, 3)])
    assert chunked.column("x").num_chunks == 2
    assert value_digest(whole) == value_digest(chunked)
    assert value_digest(whole.column("x")) == value_digest(chunked.column("x"))
    assert value_digest(whole) != value_digest(pa.table({"x": [1, 2, 3, 4], "s": whole["s"]}))
    assert value_digest(whole) != value_digest(
        whole.cast(whole.schema.set(0, pa.field("x", pa.int32())))
    )
    nested = pa.table({"l": [[1, None], None, [3]]})
    assert value_digest(nested) == value_digest(
        pa.concat_tables([nested.slice(0, 2), nested.slice(2)])
    )
    assert value_digest(nested) != value_digest(pa.table({"l": [[1, 2], None, [3]]}))


def test_numba_dispatchers_hash_by_their_python_function_in_any_process() -> None:
    numba = pytest.importorskip("numba")
    jitted = numba.njit(scale)
    assert value_digest(jitted) != value_digest(numba.njit(shift))
    assert value_digest(jitted) != value_digest(numba.njit(fastmath=True)(scale))
    jitted(1.0)  # compiling does not change it
    code = """
        import numba
        from cachedload.hashing import value_digest
        from tests.test_hashing import scale
        print(value_digest(numba.njit(scale)))
    """
    assert _digests_in_new_processes(code) == {value_digest(jitted)}


# torch.compile's first use imports torch.jit, whose script_method decorator warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compiled_functions_hash_by_the_function_they_compile() -> None:
    torch = pytest.importorskip("torch")
    compiled = torch.compile(scale)
    assert value_digest(compiled) != value_digest(torch.compile(shift))
    assert value_digest(compiled) == value_digest(torch.compile(scale))
    code = """
        import torch
        from cachedload.hashing import value_digest
        from tests.test_hashing import scale, shift
        torch.compile(shift)  # another function compiled first, in another order
        print(value_digest(torch.compile(scale)))
    """
    assert _digests_in_new_processes(code) == {value_digest(compiled)}
