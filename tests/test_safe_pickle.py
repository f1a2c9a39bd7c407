"""The restricted unpickler: every result shape loads; crafted pickles are refused, unrun."""

from __future__ import annotations

import collections
import copyreg
import dataclasses
import datetime
import io
import os
import pickle
import struct
import subprocess
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import joblib
import numpy as np
import pytest

from cachedload import load_image_folder, safe_pickle, serialize
from cachedload.entry import HashingWriter
from cachedload.errors import CachedloadError, ConfigurationError, UnsafePickleError
from cachedload.safe_pickle import register_safe_type, restricted_loads
from cachedload.signing import SIGNATURE_FIELD, sign, verify_signature
from tests.test_serialize import VALUES, Pair, same


@dataclasses.dataclass
class Sample:
    image: Any
    label: int


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenSample:
    name: str


class Split(NamedTuple):
    train: Any
    test: Any


class Plain:
    def __init__(self) -> None:
        self.x = 1

    def __eq__(self, other: object) -> bool:
        return type(other) is Plain and other.x == self.x


class RunsCode:
    """Pickles as a call of whatever ``call`` names: what an attacker plants."""

    def __init__(self, call: Any, *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.call, self.args)


SAFE = (Sample, FrozenSample, Split, Plain, Pair)

INTEGERS = ("?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8")
FLOATS = ("f2", "f4", "f8", "g", "c8", "c16")
OTHERS = ("m8[s]", "M8[ns]", "U3", "S3", "V8")
MORE_VALUES: dict[str, Any] = {
    **{
        f"dtype-{code}": np.arange(6).astype(code).reshape(2, 3)
        for code in INTEGERS + FLOATS + OTHERS
    },
    "nested-structured": np.zeros(2, dtype=[("a", "i4", (2,)), ("b", [("c", "f8")])]),
    "numpy-scalars": [
        np.float16(1),
        np.int8(2),
        np.bool_(True),
        np.datetime64("2020-01-01"),
        np.timedelta64(5, "s"),
        np.complex64(1j),
        np.str_("a"),
        np.bytes_(b"b"),
        np.zeros(1, [("a", "i4")])[0],
        np.longdouble(2),
    ],
    "dtypes": [np.dtype("f8"), np.dtype([("a", ">i2")]), np.dtype("M8[D]")],
    "scalar-types": [np.float64, np.uint8, int, float],
    "containers": (
        {1, 2},
        frozenset({3}),
        [complex(1, 2), slice(1, 5, 2), range(3), bytearray(b"x"), b"y", 10**30, ...],
        collections.OrderedDict(a=1),
        collections.deque([1, 2]),
        collections.Counter("abca"),
        collections.defaultdict(list, a=[1]),
    ),
    "datetimes": [
        datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc),
        datetime.date(2020, 1, 1),
        datetime.timedelta(3),
    ],
    "paths": [Path("a/b"), Path("/c")],
    "recarray": np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    "masked-constant": [np.ma.masked],
    "dataclass": [Sample(np.arange(3), 1), FrozenSample("x")],
    "namedtuple": Split(np.ones(2), {"y": np.zeros(3)}),
    "plain-object": Plain(),
}


def equal(a: Any, b: Any) -> bool:
    """``same`` of test_serialize, looking into dataclasses too."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        fields = [field.name for field in dataclasses.fields(a)]
        return type(a) is type(b) and all(equal(getattr(a, f), getattr(b, f)) for f in fields)
    if isinstance(a, (list, tuple)) and not isinstance(a, np.ndarray):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return same(a, b)


def _dump(value: Any, path: Path) -> Path:
    serialize.dump(value, path)
    return path


@pytest.mark.parametrize("mmap_mode", [None, "r"])
@pytest.mark.parametrize("name", list(VALUES) + list(MORE_VALUES))
def test_every_result_shape_round_trips_under_the_restricted_load(
    name: str, mmap_mode: Any, tmp_path: Path
) -> None:
    value = VALUES[name] if name in VALUES else MORE_VALUES[name]
    path = _dump(value, tmp_path / "result.joblib")
    restricted = serialize.load(path, mmap_mode=mmap_mode, safe_types=SAFE)
    assert equal(restricted, value)
    assert type(restricted) is type(serialize.load(path, mmap_mode=mmap_mode))
    serialize.check_safe(value, safe_types=SAFE)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", ["containers", "dataclass", "plain-object", "numpy-scalars"])
def test_plain_pickles_of_every_protocol_load(name: str, protocol: int) -> None:
    value = MORE_VALUES[name]
    assert equal(restricted_loads(pickle.dumps(value, protocol), safe_types=SAFE), value)


def test_image_folder_data_needs_no_configuration(image_dir: Path, tmp_path: Path) -> None:
    data = load_image_folder(image_dir)
    for mmap_mode in (None, "r"):
        back = serialize.load(
            _dump(data, tmp_path / "r.joblib"), mmap_mode=mmap_mode, safe_types=()
        )
        assert type(back) is type(data) and same(tuple(back), tuple(data))
    serialize.check_safe(data)


def test_an_item_array_needs_no_configuration(tmp_path: Path) -> None:
    from cachedload.builder import ItemArray

    rows = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for data in (
        ItemArray(rows, ("a.png", "b.png", "c.png")),
        ItemArray(rows, ("a.png", "b.png", "c.png"), skipped=("d.png",)),  # with its state
    ):
        for mmap_mode in (None, "r"):
            back = serialize.load(
                _dump(data, tmp_path / "r.joblib"), mmap_mode=mmap_mode, safe_types=()
            )
            assert type(back) is ItemArray and back.paths == data.paths
            assert back.skipped == data.skipped and np.array_equal(back.array, data.array)
        serialize.check_safe(data)


def test_a_result_made_of_user_classes_needs_them_in_safe_types(tmp_path: Path) -> None:
    value = {"split": Split([Sample(np.arange(2), 0)], None)}
    path = _dump(value, tmp_path / "r.joblib")
    with pytest.raises(UnsafePickleError, match="Split") as caught:
        serialize.load(path, mmap_mode=None, safe_types=())
    assert caught.value.name == f"{__name__}.Split"
    with pytest.raises(UnsafePickleError, match="Sample"):
        serialize.load(path, mmap_mode=None, safe_types=[Split])
    with pytest.raises(UnsafePickleError, match="Sample"):
        serialize.check_safe(value, safe_types=[Split])
    assert equal(serialize.load(path, mmap_mode=None, safe_types=[Split, Sample]), value)


def test_a_registered_type_is_allowed_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass
    class Registered:
        x: int

    Registered.__qualname__ = "Registered"  # as if defined at module level
    monkeypatch.setitem(globals(), "Registered", Registered)
    monkeypatch.setattr(safe_pickle, "_REGISTERED", {})
    data = pickle.dumps(Registered(1), 5)
    with pytest.raises(UnsafePickleError):
        restricted_loads(data)
    register_safe_type(Registered)
    assert restricted_loads(data) == Registered(1)


def test_safe_types_must_be_classes() -> None:
    with pytest.raises(ConfigurationError, match="safe_types"):
        restricted_loads(pickle.dumps(1), safe_types=["os.system"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="safe_types"):
        restricted_loads(pickle.dumps(1), safe_types=[[]])  # type: ignore[list-item]


def _stack_global(module: str, name: str, *args: bytes) -> bytes:
    """A protocol 4 pickle calling ``module.name(*args)`` (args as bytes)."""

    def unicode(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    call = b"".join(b"C" + bytes([len(arg)]) + arg for arg in args)
    return b"\x80\x04" + unicode(module) + unicode(name) + b"\x93(" + call + b"tR."


CRAFTED: dict[str, tuple[bytes, str]] = {
    "os.system": (pickle.dumps(RunsCode(os.system, "touch MARKER"), 0), "posix.system"),
    "builtins.eval": (pickle.dumps(RunsCode(eval, "open('MARKER', 'w')"), 2), "builtin.*eval"),
    "builtins.exec": (b'cbuiltins\nexec\n(S\'open("MARKER", "w")\'\ntR.', "builtins.exec"),
    "getattr": (
        pickle.dumps(RunsCode(getattr, RunsCode(__import__, "os"), "system"), 4),
        "builtins.getattr",
    ),
    "__import__": (pickle.dumps(RunsCode(__import__, "os"), 4), "builtins.__import__"),
    "open": (b"cbuiltins\nopen\n(S'MARKER'\nS'w'\ntR.", "builtins.open"),
    "dotted-name-walk": (_stack_global("numpy", "testing.os.system", b"touch MARKER"), "numpy"),
    "dotted-own-type": (_stack_global("cachedload.images", "ImageFolderData.__init__"), "Image"),
    "subprocess.Popen": (
        pickle.dumps(RunsCode(subprocess.Popen, ["touch", "MARKER"]), 5),
        "subprocess.Popen",
    ),
    "numpy.load": (_stack_global("numpy", "load", b"MARKER"), "numpy.load"),
    "numpy.frombuffer": (_stack_global("numpy", "frombuffer", b"xxxx"), "numpy.frombuffer"),
    "numpy.ctypeslib": (_stack_global("numpy.ctypeslib", "as_array"), "numpy.ctypeslib"),
    "numpy.testing runstring": (
        _stack_global("numpy.testing._private.utils", "runstring", b"1"),
        "runstring",
    ),
    "a class not in safe_types (NEWOBJ)": (pickle.dumps(Plain(), 2), "Plain"),
    "copyreg._reconstructor of a class not allowed": (pickle.dumps(Plain(), 0), "Plain"),
    "copyreg._reconstructor from a base not allowed": (
        b"ccopyreg\n_reconstructor\n(ccollections\nOrderedDict\ncnumpy\nndarray\nNtR.",
        "ndarray",
    ),
    "copyreg.__newobj__ of a non-class": (
        b"ccopyreg\n__newobj__\n(S'x'\ntR.",
        "'x'",
    ),
    "_codecs.encode with another codec": (
        b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",
        "_codecs.encode",
    ),
    "a persistent id with no arrays": (b"\x80\x04K\x00Q.", "persistent id"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_pickles_are_refused_before_anything_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, refused = CRAFTED[name]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafePickleError, match=refused) as caught:
        restricted_loads(data)
    assert isinstance(caught.value, CachedloadError)
    assert isinstance(caught.value, pickle.UnpicklingError)
    assert pickle.loads(pickle.dumps(caught.value)).name == caught.value.name
    assert list(tmp_path.iterdir()) == []


def _serialize_format(tmp_path: Path, skeleton: bytes) -> Path:
    """A data file in serialize's own format whose skeleton is ``skeleton``."""
    path = tmp_path / "result.joblib"
    with open(path, "wb") as handle:
        writer = HashingWriter(handle)
        serialize._write_indexed(writer, io.BytesIO(skeleton), len(skeleton), [np.arange(3)])
    return path


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_a_planted_data_file_in_our_format_is_refused(mmap_mode: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    planted = _serialize_format(tmp_path, pickle.dumps(RunsCode(os.system, f"touch {marker}"), 5))
    with pytest.raises(UnsafePickleError, match="system"):
        serialize.load(planted, mmap_mode=mmap_mode, safe_types=())
    assert not marker.exists()
    serialize.load(planted, mmap_mode=mmap_mode)  # what an unrestricted load does
    assert marker.exists()


def test_a_planted_index_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    index = serialize._MAGIC + pickle.dumps(RunsCode(os.system, f"touch {marker}"), 5)
    planted = tmp_path / "result.joblib"
    planted.write_bytes(serialize._HEAD + struct.pack("<Q", len(index)) + index + b"0.")
    with pytest.raises(UnsafePickleError, match="system"):
        serialize.load(planted, mmap_mode=None, safe_types=())
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [np.dtype(object), np.dtype([("a", "i8"), ("b", "O")])])
def test_an_index_declaring_object_arrays_is_refused(dtype: Any, tmp_path: Path) -> None:
    # Raw bytes read into an object array would be taken for pointers.
    offsets = struct.pack("<2Q", 200, 300)
    index = serialize._MAGIC + pickle.dumps((1, 0, [(dtype, (1,), "C")], offsets), 5)
    planted = tmp_path / "result.joblib"
    head = serialize._HEAD + struct.pack("<Q", len(index)) + index
    planted.write_bytes(head + b"\0" * (400 - len(head)))
    with pytest.raises(UnsafePickleError, match="dtype"):
        serialize.load(planted, mmap_mode="r", safe_types=())


def test_a_skeleton_naming_an_array_the_file_lacks_is_refused(tmp_path: Path) -> None:
    planted = _serialize_format(tmp_path, b"\x80\x05\x8c\x04evil\x94Q.")  # persistent id "evil"
    with pytest.raises(UnsafePickleError, match="persistent id"):
        serialize.load(planted, mmap_mode=None, safe_types=())


@pytest.mark.parametrize("writer", ["compressed", "joblib.dump"])
def test_files_only_joblib_can_read_are_refused(writer: str, tmp_path: Path) -> None:
    path = tmp_path / "r.joblib"
    if writer == "compressed":
        serialize.dump({"x": np.arange(3)}, path, compress=3)
    else:
        joblib.dump({"x": np.arange(3)}, path)
    with pytest.raises(UnsafePickleError, match="uncompressed"):
        serialize.load(path, mmap_mode=None, safe_types=())
    assert same(serialize.load(path, mmap_mode=None), {"x": np.arange(3)})


def test_check_safe_leaves_large_arrays_out() -> None:
    huge = np.broadcast_to(np.zeros(1), (10**10,))  # 80 GB if it were pickled
    serialize.check_safe({"x": huge, "y": [np.float32(1)]})


def test_check_safe_names_what_the_load_would_refuse() -> None:
    with pytest.raises(UnsafePickleError, match="FrozenSample"):
        serialize.check_safe([1, FrozenSample("x")])
    with pytest.raises(UnsafePickleError, match="UUID"):
        serialize.check_safe({"id": uuid.UUID(int=1)})
    serialize.check_safe({"id": uuid.UUID(int=1)}, safe_types=[uuid.UUID])


# -- signing ----------------------------------------------------------------------------------

KEY = b"k" * 32
META = {"key": "ab12", "data": {"size": 10, "xxh3": "00ff"}, "created": 1.5, "name": "é"}


def test_a_good_signature_verifies() -> None:
    signed = {**META, SIGNATURE_FIELD: sign(META, "00ff", KEY)}
    assert verify_signature(signed, "00ff", KEY)
    assert verify_signature(dict(reversed(list(signed.items()))), "00ff", KEY)  # order-free


def _changed_metas() -> list[dict[str, Any]]:
    changed = [
        {**META, "key": "ab13"},
        {**META, "data": {"size": 11, "xxh3": "00ff"}},
        {**META, "created": 1.25},
        {**META, "extra": None},
    ]
    changed.append({name: value for name, value in META.items() if name != "created"})
    return changed


@pytest.mark.parametrize("changed", _changed_metas())
def test_any_change_to_the_metadata_breaks_the_signature(changed: dict[str, Any]) -> None:
    signature = sign(META, "00ff", KEY)
    assert not verify_signature({**changed, SIGNATURE_FIELD: signature}, "00ff", KEY)


@pytest.mark.parametrize("position", range(4))
def test_any_change_to_the_data_checksum_breaks_the_signature(position: int) -> None:
    signed = {**META, SIGNATURE_FIELD: sign(META, "00ff", KEY)}
    checksum = "00ff"
    changed = checksum[:position] + ("1" if checksum[position] != "1" else "2")
    changed += checksum[position + 1 :]
    assert not verify_signature(signed, changed, KEY)


@pytest.mark.parametrize(
    "signature",
    [None, 42, "", "not hex é", "0" * 64],
)
def test_a_missing_or_wrong_signature_fails(signature: Any) -> None:
    meta = dict(META) if signature is None else {**META, SIGNATURE_FIELD: signature}
    assert not verify_signature(meta, "00ff", KEY)


def test_another_key_fails() -> None:
    signed = {**META, SIGNATURE_FIELD: sign(META, "00ff", KEY)}
    assert not verify_signature(signed, "00ff", b"other key")
    assert not verify_signature(signed, "00ff", KEY[:-1])


def test_copyreg_globals_are_wrapped_not_the_real_ones() -> None:
    # The real copyreg functions would reconstruct any class the pickle hands them.
    data = b"ccopyreg\n_reconstructor\n."
    assert restricted_loads(data) is not copyreg._reconstructor  # type: ignore[attr-defined]


def _build_on(module: str, name: str, attribute: str) -> bytes:
    """A protocol 4 pickle that BUILDs ``attribute = numpy.dtype`` onto ``module.name`` itself."""

    def unicode(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    value = unicode("numpy") + unicode("dtype") + b"\x93"
    return (
        b"\x80\x04" + unicode(module) + unicode(name) + b"\x93N}" + unicode(attribute) + value
    ) + b"s\x86b."


@pytest.mark.parametrize(
    ("module", "name", "attribute"),
    [
        ("cachedload.images", "ImageFolderData", "__len__"),
        ("cachedload.images", "ImageFolderData", "_fields"),
        ("pathlib", "PurePath", "__fspath__"),
        ("collections", "Counter", "most_common"),
        ("numpy.ma.core", "_mareconstruct", "extra"),
    ],
)
def test_a_pickle_cannot_patch_an_allowed_class_or_function(
    module: str, name: str, attribute: str
) -> None:
    target = safe_pickle.RestrictedUnpickler(io.BytesIO(b"")).find_class(module, name)
    before = dict(vars(target)), getattr(target, "__defaults__", None)
    with pytest.raises(UnsafePickleError, match="set attributes"):
        restricted_loads(_build_on(module, name, attribute))
    assert dict(vars(target)) == before[0]
    assert getattr(target, "__defaults__", None) == before[1]
