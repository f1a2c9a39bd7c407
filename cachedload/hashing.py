"""Stable, fast hashing of Python values and of a function's code, for cache keys.

Every digest here is the same in every process and every run: nothing depends on Python's
randomised ``hash()``, on ``id()`` or on the iteration order of sets and dicts. Numpy arrays are
hashed from their buffer with xxh3 (with dtype and shape), never pickled. Functions are hashed by
their module, qualified name and the *parsed* code of their source (so comments and formatting do
not count), falling back to bytecode when no source is available. Other objects are hashed from
the state they would pickle (``__reduce_ex__``), encoded canonically; the few types of other
libraries whose pickled state is no stable key (torch tensors, pandas extension arrays, pyarrow
tables, numba and ``torch.compile`` wrappers) by what they mean (:mod:`cachedload._library_values`).
"""

from __future__ import annotations

import ast
import collections
import copyreg
import dis
import enum
import functools
import importlib
import inspect
import linecache
import math
import os
import pathlib
import struct
import sys
import textwrap
import types
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import xxhash

from cachedload._library_values import compiled_function, plain_form
from cachedload.errors import CachedloadError

__all__ = [
    "UnhashableError",
    "code_digest",
    "code_function",
    "function_identity",
    "value_digest",
]

_ARRAY_CHUNK = 64 * 1024 * 1024
_MAX_DEPTH = 200


class UnhashableError(CachedloadError, TypeError):
    """A value has no stable digest (raised by :func:`value_digest`; the decorator names the
    parameter in its own :class:`~cachedload.errors.UnhashableArgumentError`). A
    :class:`~cachedload.errors.CachedloadError`, like every error cachedload raises."""


def value_digest(value: object) -> str:
    """Return the hex xxh3-128 digest of ``value``, stable across processes and runs.

    Supported: ``None``, bools, ints, floats, complex, str, bytes, paths, tuples, lists, dicts,
    sets, enums, numpy arrays and scalars, functions and other callables (by code), and any
    object that can be pickled (by its pickled state, encoded canonically).

    Raises:
        UnhashableError: the value (or something inside it) cannot be hashed stably.
    """
    hasher = xxhash.xxh3_128()
    _Encoder(hasher).encode(value)
    return hasher.hexdigest()


def function_identity(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a function (or of a callable object's class; of a partial's
    function).

    A script's functions are ``__main__.*`` whether the script runs as the main program or is
    re-imported as ``__mp_main__`` by a worker process started with ``spawn`` (multiprocessing,
    PyTorch DataLoader workers), so that both share one identity and one cache entry.
    """
    while isinstance(func, functools.partial):
        func = func.func
    func = inspect.unwrap(func)
    module = getattr(func, "__module__", None) or type(func).__module__
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    if module == "__mp_main__":
        module = "__main__"
    return f"{module}.{qualname}"


def code_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """The function whose code a callable runs: unwrapped, a partial's function, a bound
    method's function, a callable object's ``__call__``."""
    while True:
        func = inspect.unwrap(func)
        if isinstance(func, functools.partial):
            func = func.func
        elif isinstance(func, types.MethodType):
            func = func.__func__
        elif (
            callable(func)
            and not isinstance(func, (types.FunctionType, types.BuiltinFunctionType, type))
            and isinstance(type(func).__call__, types.FunctionType)
        ):
            func = type(func).__call__
        else:
            return func


# code object's id -> (the code object, kept alive so that its id stays its own; its digest)
_CODE_DIGESTS: dict[int, tuple[types.CodeType, str]] = {}
_CODE_DIGESTS_MAX = 4096


def _digest_of(func: Callable[..., Any]) -> str:
    hasher = xxhash.xxh3_128()
    source = _parsed_source(func)
    if source is not None:
        hasher.update(b"ast\0" + source.encode())
    code = getattr(func, "__code__", None)
    if code is not None:
        # The running bytecode too, not only the source on disk: a module edited but not
        # reloaded must not file the old code's results under the new code's key (and two
        # lambdas on one line differ here). Comments and formatting leave bytecode unchanged.
        _update_code(hasher, code)
    elif source is None:
        raise UnhashableError(f"{func!r} has neither source nor bytecode")
    return hasher.hexdigest()


def code_digest(func: Callable[..., Any]) -> str:
    """Return the hex xxh3-128 of a function's code.

    Hashes the parsed source (``ast.dump``, without docstrings, comments, formatting or
    decorators) where the source is available, and the running bytecode with its constants
    resolved (so the digest describes the code that actually runs, even when its file was
    edited since it was imported, and a docstring does not count). Digests are memoised per
    code object, never per function: ``f.__code__ = g.__code__`` (IPython's ``%autoreload``)
    gives ``f`` the new code's digest. A partial, bound method or callable object is hashed by
    the code it runs (see :func:`code_function`).
    """
    func = code_function(func)
    code = getattr(func, "__code__", None)
    if not isinstance(code, types.CodeType):
        return _digest_of(func)
    known = _CODE_DIGESTS.get(id(code))
    if known is not None and known[0] is code:
        return known[1]
    digest = _digest_of(func)
    if len(_CODE_DIGESTS) >= _CODE_DIGESTS_MAX:
        _CODE_DIGESTS.clear()
    _CODE_DIGESTS[id(code)] = (code, digest)
    return digest


def _last_line(code: Any) -> int:
    """The last source line of a code object and the code nested in it (Python 3.11+)."""
    last: int = code.co_firstlineno
    for _start, end, _col, _end_col in code.co_positions():
        if end is not None and end > last:
            last = end
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            last = max(last, _last_line(const))
    return last


def _quick_source(func: Callable[..., Any]) -> ast.Module | None:
    """A function's definition parsed from the lines its code object spans, or None.

    ``inspect.getsource`` finds the end of a definition by tokenizing it, and compiling
    tokenize's patterns costs a fresh interpreter ~4 ms on its first call, which is a cache hit's
    first call. Python 3.11's code positions give the last line directly.
    """
    code = getattr(func, "__code__", None)
    if (
        not isinstance(func, types.FunctionType)
        or code is None
        or func.__name__ == "<lambda>"
        or not hasattr(code, "co_positions")
    ):
        return None
    lines = linecache.getlines(code.co_filename, func.__globals__)
    first, last = code.co_firstlineno, _last_line(code)
    if (
        not lines
        or last > len(lines)
        or not lines[first - 1].lstrip().startswith(("@", "def", "async"))
    ):
        return None
    try:
        tree = ast.parse(textwrap.dedent("".join(lines[first - 1 : last])))
    except (SyntaxError, ValueError):
        return None  # e.g. a definition that ends in a statement without bytecode
    node = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != func.__name__:
        return None
    return tree


def _with_source_file(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func``, or where cloudpickle rebuilt it (its code's file name is ``<dynamic-code>``)
    a stand-in whose code names the file of the module it was defined in again, so that its
    source, and so its digest, are the sender's (cloudpickle keeps that module's
    ``__file__`` in the function's globals). Where the file is not that function's, its
    definition is not found there or differs: a miss, never another function's digest,
    as the bytecode is hashed too."""
    if not isinstance(func, types.FunctionType):
        return func
    code = func.__code__
    if code.co_filename != "<dynamic-code>":
        return func
    filename = func.__globals__.get("__file__")
    if not isinstance(filename, str):
        return func
    return types.FunctionType(
        code.replace(co_filename=filename), func.__globals__, func.__name__,
        func.__defaults__, func.__closure__,
    )  # fmt: skip


def _parsed_source(func: Callable[..., Any]) -> str | None:
    """``ast.dump`` of a function's definition, or None where the source is unavailable."""
    func = _with_source_file(func)
    tree = _quick_source(func)
    if tree is None:
        try:
            source = textwrap.dedent(inspect.getsource(func))
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError, IndentationError):
            return None
    if not tree.body:
        return None
    node = tree.body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        node.decorator_list = []  # decorator options do not change what the body computes
    if getattr(func, "__name__", "") == "<lambda>":
        # getsource returns the whole line holding a lambda: keep the lambda nodes only.
        lambdas = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
        return "|".join(ast.dump(n, annotate_fields=False) for n in lambdas) or None
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        if (
            isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            sub.body = body[1:] or [ast.Pass()]
    return ast.dump(node, annotate_fields=False)


def _update_code(hasher: Any, code: types.CodeType) -> None:
    """Hash a code object's instructions with their arguments resolved (constants by value,
    names by name), recursing into nested code: constant *indices* shift when a docstring is
    added or removed (it is the first constant, or None is), values do not. The docstring
    itself is never loaded by an instruction, so it does not count."""
    update = hasher.update
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("EXTENDED_ARG", "CACHE", "NOP"):
            continue  # an index above 255 needs a prefix: follows the index, not the code
        update(instruction.opname.encode() + b"\0")
        if instruction.opcode in dis.hasconst:
            _update_const(hasher, instruction.argval)
        elif instruction.arg is not None:
            update(repr(instruction.argval).encode() + b"\0")


def _update_const(hasher: Any, const: object) -> None:
    if isinstance(const, types.CodeType):
        hasher.update(b"code\0")
        _update_code(hasher, const)
    elif isinstance(const, tuple):
        hasher.update(b"(")
        for item in const:
            _update_const(hasher, item)
        hasher.update(b")")
    elif isinstance(const, frozenset):
        # A set literal's order follows the randomised hash of its strings: sort it.
        hasher.update(("{" + ",".join(sorted(repr(item) for item in const)) + "}\0").encode())
    else:
        hasher.update(repr(const).encode() + b"\0")


def _is_global(value: object, name: str) -> bool:
    """Is ``value`` the global that its reduction ``name`` refers to? Checked as pickle checks
    it: import the module it names (or find one holding it), follow the name, compare
    identities (``np.frompyfunc`` gives every ufunc of a lambda one name, none a global)."""
    module = getattr(value, "__module__", None)
    if not isinstance(module, str):
        return any(
            _lookup(found, name) is value
            for found in list(sys.modules.values())
            if isinstance(found, types.ModuleType)
        )
    try:
        return _lookup(importlib.import_module(module), name) is value
    except Exception:  # an import failing: not that global
        return False


def _lookup(module: types.ModuleType, name: str) -> object:
    """``module``'s attribute at the dotted ``name``, or None."""
    target: Any = module
    try:
        for part in name.split("."):
            target = getattr(target, part, None)
    except Exception:  # a module's __getattr__ failing otherwise
        return None
    return target


_FUNCTION_TYPES = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.MethodWrapperType,
)
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement, not in C
_INT = struct.Struct("<q")
_FLOAT = struct.Struct("<d")


class _Encoder:
    """Feeds a canonical, type-tagged encoding of a value into an xxh3 hasher."""

    def __init__(self, hasher: Any) -> None:
        self.hasher = hasher
        self.active: dict[int, int] = {}  # id -> position, to encode reference cycles

    def tag(self, tag: bytes, payload: bytes = b"") -> None:
        self.hasher.update(tag + _INT.pack(len(payload)) + payload)

    def encode(self, value: object, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise UnhashableError("nested too deeply")
        # The exact types a call's key is made of first, without the isinstance chain below.
        kind = type(value)
        if kind is str:
            self.tag(b"s", value.encode("utf-8", "surrogatepass"))  # type: ignore[attr-defined]
        elif kind is int:
            self.tag(b"i", str(value).encode())
        elif kind is tuple or kind is list:
            self.encode_container(value, depth)
        elif value is None or value is Ellipsis or isinstance(value, bool):
            self.tag(b"c", repr(value).encode())
        elif type(value) is float:
            self.tag(b"f", b"nan" if math.isnan(value) else _FLOAT.pack(value))
        elif type(value) is complex:
            self.tag(b"j", _FLOAT.pack(value.real) + _FLOAT.pack(value.imag))
        else:
            self.encode_other(value, depth)

    def encode_other(self, value: object, depth: int) -> None:
        """Everything but the exact built-in scalars and sequences: checked by ``isinstance``."""
        if isinstance(value, (bytes, bytearray, memoryview)) and not isinstance(value, np.ndarray):
            self.tag(b"b", bytes(value))
        elif isinstance(value, pathlib.PurePath):
            self.tag(b"p", os.fspath(value).encode("utf-8", "surrogateescape"))
        elif type(value) is np.ndarray or type(value) is np.memmap:
            self.encode_array(value)
        elif isinstance(value, np.ndarray):
            self.encode_array_subclass(value, depth)
        elif isinstance(value, np.generic):
            self.encode_array(np.asarray(value))
        elif isinstance(value, enum.Enum):
            self.tag(b"e", f"{type(value).__module__}.{type(value).__qualname__}".encode())
            self.encode(value.value, depth + 1)
        else:
            self.encode_container(value, depth)

    def encode_container(self, value: object, depth: int) -> None:
        ident = id(value)
        if ident in self.active:
            self.tag(b"r", str(self.active[ident]).encode())  # back-reference in a cycle
            return
        self.active[ident] = len(self.active)
        try:
            kind = type(value)
            if kind in (tuple, list):
                self.tag(b"t" if kind is tuple else b"l", str(len(value)).encode())  # type: ignore[arg-type]
                for item in value:  # type: ignore[attr-defined]
                    self.encode(item, depth + 1)
            elif kind is dict:
                self.encode_mapping(value.items(), depth)  # type: ignore[attr-defined]
            elif kind in (set, frozenset):
                digests = sorted(self.sub_digest(item, depth) for item in value)  # type: ignore[attr-defined]
                self.tag(b"S", b"".join(digests))
            elif isinstance(value, _FUNCTION_TYPES):
                self.encode_function(value, depth)
            elif isinstance(value, functools.partial):
                self.tag(b"P")
                self.encode(value.func, depth + 1)
                self.encode(value.args, depth + 1)
                self.encode(value.keywords, depth + 1)
            elif isinstance(value, type):
                self.tag(b"T", f"{value.__module__}.{value.__qualname__}".encode())
            else:
                self.encode_object(value, depth)
        finally:
            del self.active[ident]

    def sub_digest(self, value: object, depth: int) -> bytes:
        sub = _Encoder(xxhash.xxh3_128())
        sub.active = self.active
        sub.encode(value, depth + 1)
        return bytes(sub.hasher.digest())

    def encode_mapping(self, items: Iterable[tuple[object, object]], depth: int) -> None:
        pairs = sorted(
            (self.sub_digest(key, depth), self.sub_digest(item, depth)) for key, item in items
        )
        self.tag(b"d", b"".join(key + item for key, item in pairs))

    def encode_array(self, array: np.ndarray[Any, Any]) -> None:
        if array.dtype.hasobject:
            self.tag(b"O", array.dtype.str.encode() + repr(array.shape).encode())
            for item in array.ravel(order="C"):
                self.encode(item)
            return
        # dtype.str includes the byte order, so "<i4" and ">i4" differ like their bytes do.
        self.tag(b"a", array.dtype.str.encode() + repr(array.shape).encode())
        if array.dtype.fields is not None:
            self.hasher.update(repr(array.dtype.descr).encode())
        if array.flags.c_contiguous:
            self.hasher.update(array.reshape(-1).view(np.uint8).data)
            return
        # A non-contiguous view hashes by its logical content, copied a slab at a time.
        flat = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
        rows = max(1, _ARRAY_CHUNK // max(1, flat.shape[1] * array.itemsize))
        for start in range(0, flat.shape[0], rows):
            block = np.ascontiguousarray(flat[start : start + rows])
            self.hasher.update(block.reshape(-1).view(np.uint8).data)

    def encode_array_subclass(self, array: np.ndarray[Any, Any], depth: int) -> None:
        # Its class and its extra state count (a masked array's mask, a matrix's type).
        kind = type(array)
        self.tag(b"A", f"{kind.__module__}.{kind.__qualname__}".encode())
        if isinstance(array, np.ma.MaskedArray):
            self.encode_array(np.asarray(array.data))
            self.encode_array(np.ma.getmaskarray(array))
            self.encode(array.fill_value, depth + 1)
        else:
            self.encode_array(np.asarray(array))
            self.encode(getattr(array, "__dict__", None), depth + 1)

    def encode_function(self, func: Any, depth: int) -> None:
        if isinstance(func, types.MethodType):
            self.tag(b"M")
            self.encode(func.__self__, depth + 1)
            self.encode(func.__func__, depth + 1)
            return
        compiled = compiled_function(func) if isinstance(func, types.FunctionType) else None
        if compiled is not None:  # torch.compile's wrapper: the function it compiles
            self.tag(b"C")
            self.encode(compiled, depth + 1)
            return
        self.tag(b"F", function_identity(func).encode())
        if not isinstance(func, types.FunctionType):
            # A built-in's object is part of what it does: re.compile("a").match is not
            # re.compile("b").match, nor one dict's get another's. A module by its name.
            owner = getattr(func, "__self__", None)
            if isinstance(owner, types.ModuleType):
                self.tag(b"m", owner.__name__.encode())
            elif owner is not None:
                self.encode(owner, depth + 1)
        else:
            self.hasher.update(code_digest(func).encode())
            # Values captured by a closure or bound as defaults change what the function does.
            self.encode(func.__defaults__, depth + 1)
            self.encode(func.__kwdefaults__, depth + 1)
            cells = func.__closure__ or ()
            for cell in cells:
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    contents = None
                self.encode(contents, depth + 1)

    def encode_object(self, value: object, depth: int) -> None:
        if callable(getattr(value, "__cachedload_key__", None)):
            self.tag(b"K", type(value).__qualname__.encode())
            self.encode(value.__cachedload_key__(), depth + 1)  # type: ignore[attr-defined]
            return
        form = plain_form(value)  # a tensor, a pyarrow table…: by what it means
        if form is not None:
            self.tag(b"V")
            self.encode(form, depth + 1)
            return
        try:
            # As pickle does: a reducer registered with copyreg first (re.Pattern has one).
            reducer = copyreg.dispatch_table.get(type(value))
            reduced = reducer(value) if reducer is not None else value.__reduce_ex__(4)
        except Exception as error:
            raise UnhashableError(
                f"{type(value).__qualname__} object cannot be pickled ({error})"
            ) from error
        if isinstance(reduced, str):  # a global singleton referenced by name
            if _is_global(value, reduced):
                self.tag(b"G", f"{type(value).__module__}.{reduced}".encode())
                return
            self.encode_impostor(value, reduced, depth)
            return
        self.tag(b"R", f"{type(value).__module__}.{type(value).__qualname__}".encode())
        constructor, args, *rest = tuple(reduced) + (None,) * (6 - len(reduced))
        self.encode(getattr(constructor, "__qualname__", repr(constructor)), depth + 1)
        self.encode(args, depth + 1)
        state, listitems, dictitems = rest[0], rest[1], rest[2]
        if isinstance(state, dict):
            self.encode_mapping(state.items(), depth)
        elif (
            isinstance(state, tuple)
            and len(state) == 2
            and all(part is None or isinstance(part, dict) for part in state)
        ):  # (__dict__, __slots__ values)
            for part in state:
                self.encode_mapping((part or {}).items(), depth)
        else:
            self.encode(state, depth + 1)
        if listitems is not None:
            self.encode(list(listitems), depth + 1)
        if dictitems is not None and isinstance(value, collections.OrderedDict):
            # Order is part of an OrderedDict's value (its == says so, a plain dict's does not).
            pairs = [self.sub_digest(pair, depth) for pair in dictitems]
            self.tag(b"o", b"".join(pairs))
        elif dictitems is not None:
            self.encode_mapping(list(dictitems), depth)

    def encode_impostor(self, value: object, name: str, depth: int) -> None:
        """A value pickling as the global ``name`` that is not that global (pickle would
        refuse it): by its attributes where they are all its state (classes written in
        Python), or not at all (a ufunc keeps its function out of reach)."""
        state = getattr(value, "__dict__", None)
        in_python = all(cls.__flags__ & _HEAP_TYPE for cls in type(value).__mro__[:-1])
        if not isinstance(state, dict) or not in_python:
            raise UnhashableError(
                f"{type(value).__qualname__} object {name!r} pickles by name but is not the "
                f"global of that name, and has no state to hash instead"
            )
        self.tag(b"I", f"{type(value).__module__}.{type(value).__qualname__}".encode())
        self.encode_mapping(state.items(), depth)
