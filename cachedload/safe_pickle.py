"""Unpickling an entry someone else wrote, without running code of their choosing.

A pickle is a small program: ``GLOBAL module name`` imports anything, ``REDUCE`` calls it. A
shared cache's writer therefore chooses what a reader's ``pickle.load`` runs. The
:class:`RestrictedUnpickler` here is the C unpickler with ``find_class`` overridden (the recipe
of the ``pickle`` docs, and of ``torch.load(weights_only=True)``): every global a pickle names
is looked up in an allow list of *objects*, never imported by the name the pickle gives, and
anything else raises :class:`~cachedload.errors.UnsafePickleError` before it can run.

Allowed (what results made of arrays, numbers, strings and containers need; measured by
pickling each with protocols 2 to 5 and listing the globals with ``pickletools``):

- data constructors of ``builtins`` (``set``, ``frozenset``, ``complex``, ``slice``,
  ``bytearray``, ``range``, ``bytes``, ``str``, ``int``, ``float``, ``bool``, ``list``,
  ``tuple``, ``dict``, ``object``) and the constants ``Ellipsis``/``NotImplemented``; never
  ``eval``, ``exec``, ``getattr``, ``__import__``, ``open``, ``type``…;
- ``collections`` ``OrderedDict``, ``deque``, ``Counter``, ``defaultdict``; ``datetime``'s
  ``date``/``time``/``datetime``/``timedelta``/``timezone``; ``decimal.Decimal``,
  ``fractions.Fraction``; ``pathlib``'s pure and POSIX paths (building one touches no file);
- numpy: ``ndarray``, ``dtype``, every scalar type (``float64``, ``datetime64``, ``void``…),
  ``_reconstruct`` and ``scalar`` (what ``ndarray``/scalar pickles call), ``_frombuffer``
  (protocol 5), under both ``numpy._core`` (numpy 2) and ``numpy.core`` (numpy 1) names;
  record arrays (``numpy.rec.recarray``, ``numpy.record``) and masked arrays
  (``numpy.ma.core.MaskedArray``, ``MaskedConstant``, ``_mareconstruct``: numpy's own
  data-only reconstruction code), imported on first sight. Nothing else of numpy: not
  ``numpy.load`` (it unpickles), ``numpy.testing``, ``numpy.ctypeslib``, ``numpy.frombuffer``
  (no pickle of data needs it) or any ``ufunc``;
- cachedload's own result types (``cachedload.images.ImageFolderData``,
  ``cachedload.builder.ItemArray``, and what a module
  adds with :func:`register_safe_type`), plus the classes a user passes as ``safe_types``,
  each allowed under exactly its own ``__module__`` and ``__qualname__``;
- ``copyreg.__newobj__``, ``__newobj_ex__`` and ``_reconstructor`` (protocol 0/1 pickles of
  plain objects), replaced by checking versions that refuse a class that is not itself allowed.
  Protocol 2+ pickles create objects with the ``NEWOBJ`` opcode, whose class comes off the
  stack; every class on the stack came through ``find_class``, so it is allowed.
- ``_codecs.encode`` (protocol 2 writes ``bytes`` that way) only with the ``latin1`` codec.

What remains trusted: numpy's C reconstruction code (``ndarray.__setstate__``,
``dtype.__setstate__``) for memory safety, as with ``torch.load(weights_only=True)``; the
``__init__``/``__new__``/``__setstate__`` of the classes a user lists in ``safe_types`` (list
plain dataclasses and named tuples, not classes whose construction acts on the world).

One more hole is closed after the fact: the ``BUILD`` opcode applied to an allowed Python class
or function (not an instance) would set attributes on it, patching it for the whole process.
Each one handed out is snapshotted, compared after the load, restored if changed, and the load
refused.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import datetime
import functools
import io
import pathlib
import pickle
import types
from collections.abc import Iterable, Sequence
from typing import IO, Any

import numpy as np

from cachedload.errors import ConfigurationError, UnsafePickleError

__all__ = ["RestrictedUnpickler", "register_safe_type", "restricted_loads"]

_Name = tuple[str, str]

_BUILTINS = (
    "bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list",
    "object", "range", "set", "slice", "str", "tuple", "Ellipsis", "NotImplemented",
)  # fmt: skip


def _own_name(obj: Any) -> _Name:
    return (obj.__module__, obj.__qualname__)


def _base_table() -> dict[_Name, Any]:
    table: dict[_Name, Any] = {}
    for name in _BUILTINS:
        table["builtins", name] = table["__builtin__", name] = getattr(builtins, name)
    # Protocol 2 writes the Python 2 names of these.
    table["__builtin__", "xrange"], table["__builtin__", "long"] = range, int
    table["__builtin__", "unicode"] = str
    for obj in (
        collections.OrderedDict,
        collections.deque,
        collections.Counter,
        collections.defaultdict,
        datetime.date,
        datetime.time,
        datetime.datetime,
        datetime.timedelta,
        datetime.timezone,
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.PosixPath,
    ):
        table[_own_name(obj)] = obj
    table["numpy", "ndarray"] = np.ndarray
    table["numpy", "dtype"] = np.dtype
    for scalar_type in set(np.sctypeDict.values()):
        table[_own_name(scalar_type)] = scalar_type
    # The functions numpy's own pickles call, found the way pickle finds them (their modules
    # moved from numpy.core to numpy._core in numpy 2; both names are allowed).
    reconstruct = np.zeros(1, dtype=object).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    for core in ("numpy._core", "numpy.core"):
        table[f"{core}.multiarray", "_reconstruct"] = reconstruct
        table[f"{core}.multiarray", "scalar"] = scalar
        table[f"{core}.numeric", "_frombuffer"] = frombuffer
    return table


_TABLE = _base_table()

#: Names resolved by importing them on first sight, from modules most processes never import
#: (``cachedload.images`` imports OpenCV). Only these fixed names are ever imported, never one
#: a pickle chose.
_ON_FIRST_SIGHT: frozenset[_Name] = frozenset(
    {
        ("numpy.rec", "recarray"),
        ("numpy", "record"),
        ("numpy.ma.core", "MaskedArray"),
        ("numpy.ma", "MaskedArray"),
        ("numpy.ma.core", "MaskedConstant"),
        ("numpy.ma.core", "_mareconstruct"),
        ("cachedload.images", "ImageFolderData"),
        ("cachedload.builder", "ItemArray"),
        ("decimal", "Decimal"),
        ("fractions", "Fraction"),
    }
)

_REGISTERED: dict[_Name, type] = {}
_NO_TYPES: dict[_Name, type] = {}


def register_safe_type(cls: type) -> type:
    """Allow ``cls`` in every restricted load (for cachedload's own result types).

    Usable as a class decorator; returns ``cls``. Its instances are rebuilt by calling
    ``cls``/``cls.__new__`` and ``__setstate__`` on data the writer chose: register only plain
    data classes.
    """
    _check_class(cls, "register_safe_type")
    _REGISTERED[_own_name(cls)] = cls
    return cls


def _check_class(cls: Any, option: str) -> None:
    if not isinstance(cls, type):
        raise ConfigurationError(option, f"expected classes, got {cls!r}")
    if "<locals>" in cls.__qualname__:
        raise ConfigurationError(option, f"{cls.__qualname__} is local to a function: unpicklable")


@functools.lru_cache(maxsize=64)
def _user_table(safe_types: tuple[type, ...]) -> dict[_Name, Any]:
    table = {}
    for cls in safe_types:
        _check_class(cls, "safe_types")
        table[_own_name(cls)] = cls
    return table


def _table_for(safe_types: Iterable[type]) -> dict[_Name, Any]:
    key = safe_types if isinstance(safe_types, tuple) else tuple(safe_types)
    try:
        return _user_table(key)
    except TypeError:  # an unhashable item: not a class
        for cls in key:
            _check_class(cls, "safe_types")
        raise


class RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler, allowed only the globals listed in this module's docstring.

    Args:
        file: the pickle.
        safe_types: more classes to allow (each under its own module and qualified name).
        arrays: what persistent id ``i`` stands for (``arrays[i]``); without it, a pickle with
            persistent ids is refused.

    Raises (from :meth:`load`):
        UnsafePickleError: the pickle names anything not allowed; nothing it names has run.
    """

    def __init__(
        self,
        file: IO[bytes],
        *,
        safe_types: Iterable[type] = (),
        arrays: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(file)
        # Built once per set of safe_types (cached): a hit pays a dictionary lookup.
        self._user = _table_for(safe_types) if safe_types else _NO_TYPES
        self._arrays = arrays
        self._handed_out: dict[int, tuple[Any, dict[str, Any], tuple[Any, ...]]] = {}

    def load(self) -> Any:
        """Unpickle; raise :class:`UnsafePickleError` if anything not allowed was met."""
        try:
            return super().load()
        finally:
            if self._handed_out:
                self._check_untouched()

    def _check_untouched(self) -> None:
        tampered = []
        for obj, attributes, fixed in self._handed_out.values():
            if (
                _fixed(obj) != fixed
                or vars(obj).keys() != attributes.keys()
                or any(value is not attributes[name] for name, value in vars(obj).items())
            ):
                tampered.append(obj)
                _restore_fixed(obj, fixed)
                for name in set(vars(obj)) - set(attributes):
                    delattr(obj, name)
                for name, value in attributes.items():
                    if vars(obj).get(name, _TABLE) is not value:
                        setattr(obj, name, value)
        if tampered:
            raise UnsafePickleError(repr(tampered[0]), "the pickle set attributes on it")

    def _hand_out(self, obj: Any) -> Any:
        # Python classes and functions can be patched by BUILD: watch them (see the docstring).
        patchable = isinstance(obj, types.FunctionType) or (
            isinstance(obj, type) and obj.__flags__ & _HEAPTYPE
        )
        if patchable and id(obj) not in self._handed_out:
            self._handed_out[id(obj)] = (obj, dict(vars(obj)), _fixed(obj))
        return obj

    def _lookup(self, module: str, name: str) -> Any:
        key = (module, name)
        found = _TABLE.get(key, _TABLE)
        if found is _TABLE:
            found = self._user.get(key, _TABLE)
        if found is _TABLE:
            found = _REGISTERED.get(key, _TABLE)
        if found is _TABLE and key in _ON_FIRST_SIGHT:
            found = super().find_class(module, name)
        return found

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global, or raise :class:`UnsafePickleError` naming it."""
        found = self._lookup(module, name)
        if found is not _TABLE:
            return self._hand_out(found)
        if module in ("copyreg", "copy_reg"):
            checked = {
                "__newobj__": self._newobj,
                "__newobj_ex__": self._newobj_ex,
                "_reconstructor": self._reconstructor,
            }.get(name)
            if checked is not None:
                return checked
        if (module, name) == ("_codecs", "encode"):
            return self._hand_out(_latin1_encode)
        raise UnsafePickleError(f"{module}.{name}", "not an allowed global")

    def persistent_load(self, pid: Any) -> Any:
        """``arrays[pid]`` for an integer ``pid`` in range; anything else is refused."""
        if self._arrays is None or type(pid) is not int or not 0 <= pid < len(self._arrays):
            raise UnsafePickleError(f"persistent id {pid!r}", "not an array of this file")
        return self._arrays[pid]

    def _allowed_class(self, cls: Any) -> type:
        module = getattr(cls, "__module__", None)
        qualname = getattr(cls, "__qualname__", None)
        if (
            isinstance(cls, type)
            and isinstance(module, str)
            and isinstance(qualname, str)
            and self._lookup(module, qualname) is cls
        ):
            return cls
        raise UnsafePickleError(repr(cls), "not an allowed class to reconstruct")

    def _newobj(self, cls: Any, *args: Any) -> Any:
        return self._allowed_class(cls).__new__(cls, *args)

    def _newobj_ex(self, cls: Any, args: Any, kwargs: Any) -> Any:
        return self._allowed_class(cls).__new__(cls, *args, **kwargs)

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        # copyreg._reconstructor with its base limited to object and builtin data types.
        self._allowed_class(cls)
        if self._lookup("builtins", getattr(base, "__name__", "")) is not base or not (
            isinstance(base, type) and issubclass(cls, base)
        ):
            raise UnsafePickleError(repr(base), "not an allowed base to reconstruct from")
        return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class whose attributes can be set


def _fixed(obj: Any) -> tuple[Any, ...]:
    """What BUILD can change on a class or function outside its ``__dict__``."""
    if isinstance(obj, type):
        return (obj.__name__, obj.__qualname__, obj.__bases__, type(obj))
    return (obj.__code__, obj.__defaults__, obj.__kwdefaults__, obj.__name__, obj.__qualname__)


def _restore_fixed(obj: Any, fixed: tuple[Any, ...]) -> None:
    if _fixed(obj) == fixed:
        return
    names: tuple[str, ...]
    if isinstance(obj, type):
        names = ("__name__", "__qualname__", "__bases__", "__class__")
    else:
        names = ("__code__", "__defaults__", "__kwdefaults__", "__name__", "__qualname__")
    for name, value in zip(names, fixed, strict=True):
        if getattr(obj, name) is not value:
            setattr(obj, name, value)


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # How protocol 2 pickles bytes: _codecs.encode(str, "latin1"). Other codecs are refused.
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode", f"only latin1 text, got {encoding!r}")
    return text.encode("latin1")


def restricted_loads(
    data: bytes, *, safe_types: Iterable[type] = (), arrays: Sequence[Any] | None = None
) -> Any:
    """``pickle.loads`` with the :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), safe_types=safe_types, arrays=arrays).load()
