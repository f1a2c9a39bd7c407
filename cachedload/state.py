"""What a loader's result depends on besides its arguments and code: its *state*.

A loader reads more than its arguments: values its closure captured, module globals, the
object of a bound method, a partial's bound arguments, a callable object's attributes. A
:class:`LoaderState` finds them once per code version and hashes them at each call, like
parameters, so that a notebook changing ``SCALE = 2`` to ``3`` misses in the same process:

* **tracked** — the object of a bound method or callable object (``self``), a partial's
  arguments, and the closure cells and module globals that the loader's code (nested code
  included, and the code of ``depends_on`` functions) reads and that hold *plain data*: numbers,
  strings, bytes, bools, None, enums, paths, numpy arrays and scalars, and
  tuples/lists/dicts/sets/frozensets of plain data;
* **never tracked** — names the code assigns (``global``/``nonlocal``) or mutates (calls a
  mutating method such as ``append`` or ``update`` on, assigns or deletes an item or attribute
  of), so that a loader counting its calls or filling a memo still hits; and values that are not
  plain data (a lock, a client, a model). Those are logged once per loader at INFO.
  Functions, classes and modules are not state: they are keyed by code (``depends_on=``).

The names come from the bytecode (:func:`_analyse`, memoised per code object); a call costs a
dictionary look-up and a type check per name, plus hashing the plain data found.
"""

from __future__ import annotations

import dis
import enum
import functools
import logging
import numbers
import pathlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cachedload.errors import UnhashableArgumentError
from cachedload.hashing import UnhashableError, code_function, function_identity, value_digest

__all__ = ["LoaderState", "bound_objects"]

logger = logging.getLogger("cachedload")

# (loader, label) already logged as not in the key: once per loader and process, however many
# wrappers of it there are (one per instance for ``self.f = cached_dataset(...)(self.f)``).
_REPORTED: set[tuple[str, str]] = set()

_MISSING = object()
_MAX_DEPTH = 50

# Methods of plain data (list, dict, set, bytearray, numpy arrays) that change their object.
_MUTATORS = frozenset(
    {
        "append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse",
        "update", "setdefault", "popitem", "add", "discard", "difference_update",
        "intersection_update", "symmetric_difference_update", "fill", "put", "itemset",
        "resize", "setfield", "setflags", "partition", "byteswap", "__setitem__",
        "__delitem__", "__iadd__", "__imul__", "__ior__", "__iand__", "__isub__", "__ixor__",
    }
)  # fmt: skip
_LOADS_GLOBAL = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_LOADS_FREE = frozenset({"LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"})
_ASSIGNS = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL", "STORE_DEREF", "DELETE_DEREF"})
# The stack slot holding the object an instruction changes (-1 is the top).
_CHANGES_AT = {
    "STORE_ATTR": (-1, "sets an attribute of it"),
    "DELETE_ATTR": (-1, "deletes an attribute of it"),
    "STORE_SUBSCR": (-2, "assigns an item of it"),
    "DELETE_SUBSCR": (-2, "deletes an item of it"),
    "STORE_SLICE": (-3, "assigns a slice of it"),
}
_PLAIN_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})
_PLAIN_CONTAINERS = frozenset({tuple, list, set, frozenset})
_PLAIN_OTHERS = (np.generic, enum.Enum, pathlib.PurePath, numbers.Number)
# Keyed by code or identity, never as state (the names a body reads are mostly these).
_NOT_STATE = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
    np.ufunc,
)


@dataclass(frozen=True)
class _Names:
    """The names one code object (with the code nested in it) reads and changes."""

    globals: frozenset[str]
    free: frozenset[str]
    changed: dict[str, str]  # name -> how the code changes it


@functools.lru_cache(maxsize=1024)
def _analyse(code: types.CodeType) -> _Names:
    """Read the names a code object loads, assigns and mutates from its instructions.

    Mutation is found by following which name each stack slot came from (an approximate,
    straight-line simulation: ``x[k] = v`` and ``x.attr.append(v)`` mark ``x``). A mutation
    it misses only costs hits (the state differs at the next call), never a stale result.
    """
    reads_global: set[str] = set()
    reads_free: set[str] = set()
    changed: dict[str, str] = {}
    stack: list[str | None] = []
    for ins in dis.get_instructions(code):
        op = ins.opname
        name = ins.argval if isinstance(ins.argval, str) else None
        if op in _LOADS_GLOBAL and name is not None:
            reads_global.add(name)
        elif op in _LOADS_FREE and name is not None:
            reads_free.add(name)
        elif op in _ASSIGNS and name is not None:
            changed.setdefault(name, "assigned by the loader")
        elif op in ("LOAD_ATTR", "LOAD_METHOD") and name in _MUTATORS and stack and stack[-1]:
            changed.setdefault(stack[-1], f"the loader calls .{name}() on it")
        elif op in _CHANGES_AT:
            slot, how = _CHANGES_AT[op]
            if len(stack) >= -slot and stack[slot]:
                changed.setdefault(stack[slot], f"the loader {how}")  # type: ignore[arg-type]
        _simulate(stack, ins, name if op in _LOADS_GLOBAL or op in _LOADS_FREE else None)
    names = _Names(frozenset(reads_global), frozenset(reads_free), changed)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner = _analyse(const)
            names = _Names(
                names.globals | inner.globals,
                names.free | inner.free,
                {**inner.changed, **names.changed},
            )
    return names


def _simulate(stack: list[str | None], ins: dis.Instruction, label: str | None) -> None:
    """Apply an instruction to a stack of labels (the name a slot was loaded from, or None)."""
    op, arg = ins.opname, ins.arg or 0
    if op in ("COPY", "DUP_TOP", "DUP_TOP_TWO"):
        count = 2 if op == "DUP_TOP_TWO" else 1
        depth = arg if op == "COPY" else count
        stack.extend(stack[-depth:][:count] if len(stack) >= depth else [None] * count)
        return
    if op in ("SWAP", "ROT_TWO") and len(stack) >= max(arg, 2):
        other = -arg if op == "SWAP" else -2
        stack[-1], stack[other] = stack[other], stack[-1]
        return
    if op in ("ROT_THREE", "ROT_FOUR", "ROT_N"):
        count = {"ROT_THREE": 3, "ROT_FOUR": 4}.get(op, arg)
        if len(stack) >= count:
            stack.insert(-count + 1 if count > 1 else len(stack), stack.pop())
        return
    try:
        effect = dis.stack_effect(ins.opcode, ins.arg, jump=False)
    except (ValueError, TypeError):
        effect = 0
    if effect < 0:
        del stack[max(0, len(stack) + effect) :]  # a result keeps its first operand's label
    elif effect > 0:
        stack.extend([label] * effect)


def _is_plain(value: object, depth: int = 0) -> bool:
    """Is ``value`` plain data (see the module docstring)?"""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if depth > _MAX_DEPTH:
        return False
    if kind in _PLAIN_CONTAINERS:
        return all(_is_plain(item, depth + 1) for item in value)  # type: ignore[attr-defined]
    if kind is dict:
        return all(
            _is_plain(key, depth + 1) and _is_plain(item, depth + 1)
            for key, item in value.items()  # type: ignore[attr-defined]
        )
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    return isinstance(value, _PLAIN_OTHERS)


def bound_objects(loader: Callable[..., Any]) -> list[tuple[str, Callable[[], object]]]:
    """The objects bound into a loader, hashed at each call whatever they are: ``self`` of a
    bound method or callable object, ``partial`` (a partial's arguments and keywords)."""
    found: list[tuple[str, Callable[[], object]]] = []
    func: Any = loader
    while True:
        if isinstance(func, functools.partial):
            found.append(("partial", functools.partial(_partial_arguments, func)))
            func = func.func
        elif isinstance(func, types.MethodType):
            found.append(("self", functools.partial(getattr, func, "__self__")))
            func = func.__func__
        elif hasattr(func, "__wrapped__"):
            func = func.__wrapped__
        elif code_function(func) is not func and not isinstance(func, type):
            found.append(("self", functools.partial(_same, func)))  # a callable object
            return found
        else:
            return found


def _partial_arguments(partial: functools.partial[Any]) -> object:
    return (partial.args, partial.keywords)


def _same(value: object) -> object:
    return value


class LoaderState:
    """A loader's state (see the module docstring), for one version of its code.

    :meth:`current` says whether the code is still the one analysed (an identity check per
    function: ``f.__code__ = other.__code__`` makes it stale); :meth:`values` hashes the state
    at a call.
    """

    def __init__(
        self,
        loader: Callable[..., Any],
        depends_on: tuple[Callable[..., Any], ...] = (),
        ignore: frozenset[str] = frozenset(),
    ) -> None:
        self._objects = [
            (label, get) for label, get in bound_objects(loader) if label not in ignore
        ]
        self._globals: list[tuple[str, dict[str, Any], str]] = []
        self._cells: list[tuple[str, types.CellType]] = []
        self._changed: list[tuple[str, str, Callable[[], object]]] = []
        codes: list[tuple[Any, types.CodeType]] = []
        main = code_function(loader)
        main_globals = getattr(main, "__globals__", None)
        for func in (main, *(code_function(f) for f in depends_on)):
            if not isinstance(func, types.FunctionType):
                continue
            codes.append((func, func.__code__))
            prefix = "" if func is main else f"{func.__qualname__}."
            names = _analyse(func.__code__)
            for name in sorted(names.globals):
                label = f"global {name if func.__globals__ is main_globals else prefix + name}"
                reader = functools.partial(func.__globals__.get, name, _MISSING)
                if name in names.changed:
                    self._changed.append((label, names.changed[name], reader))
                elif all(label != known for known, _, _ in self._globals):
                    self._globals.append((label, func.__globals__, name))
            for name, cell in zip(func.__code__.co_freevars, func.__closure__ or (), strict=True):
                if name not in names.free:
                    continue
                label = f"closure {prefix}{name}"
                if name in names.changed:
                    self._changed.append((label, names.changed[name], _cell_reader(cell)))
                else:
                    self._cells.append((label, cell))
        self.codes = tuple(codes)
        self._changed_reported = False
        self._identity = function_identity(loader)

    def current(self) -> bool:
        """True while every analysed function still runs the code it was analysed with."""
        return all(func.__code__ is code for func, code in self.codes)

    def values(self) -> dict[str, tuple[str, Any]]:
        """This call's state: label (``"global SCALE"``, ``"closure size"``, ``"self"``,
        ``"partial"``) -> (digest, value).

        Raises:
            UnhashableArgumentError: a bound ``self`` or partial argument cannot be hashed.
        """
        state: dict[str, tuple[str, Any]] = {}
        for label, get in self._objects:
            value = get()
            try:
                state[label] = (value_digest(value), value)
            except UnhashableError as error:
                raise UnhashableArgumentError(label, str(error)) from None
            except RecursionError:
                raise UnhashableArgumentError(label, "nested too deeply") from None
        untracked: list[str] = []
        for label, namespace, name in self._globals:
            self._add(state, label, namespace.get(name, _MISSING), untracked)
        for label, cell in self._cells:
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell: the loader would fail on it
                continue
            self._add(state, label, value, untracked)
        if self._changed and not self._changed_reported:
            self._changed_reported = True
            for label, how, read in self._changed:
                if not isinstance(read(), _NOT_STATE) and self._first_report(label):
                    untracked.append(f"{label} ({how})")
        if untracked:
            logger.info(
                "%s: not in the cache key: %s. If the result depends on them, pass them as "
                "parameters, list the functions they belong to in depends_on=, or change "
                "version= when they change",
                self._identity,
                ", ".join(untracked),
            )
        return state

    def _add(
        self, state: dict[str, tuple[str, Any]], label: str, value: object, untracked: list[str]
    ) -> None:
        if value is _MISSING or isinstance(value, _NOT_STATE) or hasattr(value, "__wrapped__"):
            return  # a built-in name, or code keyed by its identity (depends_on=)
        if _is_plain(value):
            try:
                state[label] = (value_digest(value), value)
                return
            except (UnhashableError, RecursionError):
                pass
        if self._first_report(label):
            untracked.append(f"{label} (a {type(value).__qualname__}, not plain data)")

    def _first_report(self, label: str) -> bool:
        if (self._identity, label) in _REPORTED:
            return False
        _REPORTED.add((self._identity, label))
        return True


def _cell_reader(cell: types.CellType) -> Callable[[], object]:
    def read() -> object:
        try:
            return cell.cell_contents
        except ValueError:
            return None

    return read
