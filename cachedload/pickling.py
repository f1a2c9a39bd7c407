"""How a cached loader crosses process boundaries: DataLoader and multiprocessing workers,
``joblib.Parallel`` (loky, Dask), anything that pickles a :class:`~cachedload.CachedDataset`.

A wrapper pickles as its loader plus its :class:`~cachedload.options.Options`, and the worker
builds a new wrapper around them (same identity, code digest and so key: it hits the entries the
parent stored). The loader travels

* **by import path** where importing ``func.__module__`` and following ``__qualname__`` leads
  back to this very loader (or to its wrapper: a module-level decorated loader cannot pickle
  itself by path, its name is the wrapper): cheap, and what fork and spawn workers use;
* **by value** with cloudpickle otherwise — a notebook cell's loader, one made by ``exec`` or
  nested in a function, a ``functools.partial`` or callable object, and any loader of
  ``__main__``, which loky workers do not import. cloudpickle names rebuilt code
  ``<dynamic-code>``: :func:`_restore_by_value` gives each function its file name back (and a
  cell's lines to ``linecache``), so its source, and thus its code digest, match the parent's.

The wrapper class is passed along (pickled by reference), so this module needs nothing from
:mod:`cachedload.decorator`.
"""

from __future__ import annotations

import functools
import importlib
import io
import linecache
import os
import pickle
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cachedload.hashing import code_function

__all__ = ["reduce_loader"]

# (thread, loader) pairs being pickled by value, to notice a loader whose code names its wrapper.
_DUMPING_BY_VALUE: set[tuple[int, int]] = set()


def reduce_loader(
    wrapper_class: type, func: Callable[..., Any], options: Any, bound: tuple[Any, ...]
) -> tuple[Any, ...]:
    """The ``__reduce__`` value of a wrapper of ``func`` with ``options`` (``bound``: the
    instance of a decorated method, or empty)."""
    # A partial or a callable object has no import path of its own: always by value.
    by_path = (
        (_restore, (wrapper_class, func.__module__, func.__qualname__, options, bound))
        if _imports_back_to(func)
        else None
    )
    if by_path is not None and func.__module__ not in ("__main__", "__mp_main__"):
        return by_path
    dumping = (threading.get_ident(), id(func))
    if dumping in _DUMPING_BY_VALUE and by_path is not None:  # its code names its wrapper
        return by_path
    _DUMPING_BY_VALUE.add(dumping)
    try:
        payload = _dumps_by_value((func, options, bound))
    except Exception:  # e.g. a global it reads holds a lock: by path, if that resolves
        if by_path is not None:
            return by_path
        raise
    finally:
        _DUMPING_BY_VALUE.discard(dumping)
    files = _code_files((func, *options.depends_on))
    return (_restore_by_value, (wrapper_class, payload, files))


def _restore(
    wrapper_class: Any, module: str, qualname: str, options: Any, bound: tuple[Any, ...]
) -> Any:
    """Rebuild a pickled wrapper from its loader's import path and options."""
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    func = target.__wrapped__ if isinstance(target, wrapper_class) else target
    wrapper = wrapper_class(func, options)
    return wrapper.__get__(bound[0]) if bound else wrapper


def _imports_back_to(func: Callable[..., Any]) -> bool:
    """Does importing ``func.__module__`` and following its ``__qualname__`` give ``func``
    (or a wrapper of it), as :func:`_restore` needs?"""
    try:
        target: Any = sys.modules.get(func.__module__) or importlib.import_module(func.__module__)
        for part in func.__qualname__.split("."):
            target = getattr(target, part)
    except Exception:  # no such module or name, <locals> in the name, an import failing
        return False
    return target is func or getattr(target, "__wrapped__", None) is func


def _cloudpickle() -> Any:
    """cloudpickle, installed with joblib (vendored as ``joblib.externals.cloudpickle`` before
    joblib 1.5, a dependency of joblib since)."""
    try:
        return importlib.import_module("cloudpickle")
    except ImportError:
        return importlib.import_module("joblib.externals.cloudpickle")


def _dumps_by_value(value: object) -> bytes:
    """cloudpickle's bytes of ``value``, keeping the qualified names of the classes it
    rebuilds by value: cloudpickle gives ``make.<locals>.Local`` back as ``Local`` in a new
    process, and a ``self`` is hashed with its class's qualified name."""
    buffer = io.BytesIO()
    _qualname_pickler()(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


@functools.cache
def _qualname_pickler() -> type:
    base: Any = _cloudpickle().Pickler

    class QualnamePickler(base):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            reduced = super().reducer_override(obj)
            # A class by value: (skeleton, args, (class dict, slots), None, None, setstate);
            # setstate sets every item of the class dict on the new class.
            if isinstance(obj, type) and isinstance(reduced, tuple) and len(reduced) == 6:
                state = reduced[2]
                if isinstance(state, tuple) and state and isinstance(state[0], dict):
                    state[0].setdefault("__qualname__", obj.__qualname__)
            return reduced

    return QualnamePickler


def _code_files(functions: Sequence[Any]) -> list[tuple[str, list[str] | None] | None]:
    """Where each function's code was defined, and the source lines of those that exist only
    in this process's ``linecache`` (a notebook cell's), for :func:`_restore_by_value`."""
    files: list[tuple[str, list[str] | None] | None] = []
    for function in functions:
        code = getattr(code_function(function), "__code__", None)
        filename = getattr(code, "co_filename", None)
        if not isinstance(filename, str):
            files.append(None)
            continue
        cached = None if os.path.exists(filename) else linecache.cache.get(filename)
        # A loaded entry (a lazy one is a 1-tuple): size, mtime, lines, name.
        lines = list(cached[2]) if cached is not None and len(cached) == 4 else None
        files.append((filename, lines))
    return files


def _with_filename(code: Any, filename: str) -> Any:
    consts = tuple(
        _with_filename(c, filename) if isinstance(c, type(code)) else c for c in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


def _restore_by_value(
    wrapper_class: type, payload: bytes, files: list[tuple[str, list[str] | None] | None]
) -> Any:
    """Rebuild a wrapper pickled by value (see the module docstring)."""
    func, options, bound = pickle.loads(payload)
    for loader, file in zip((func, *options.depends_on), files, strict=True):
        # The function that runs: a bound method's (its __code__ is read-only), a partial's,
        # a callable object's __call__.
        function = code_function(loader)
        code = getattr(function, "__code__", None)
        if file is None or code is None:
            continue
        filename, lines = file
        if code.co_filename != filename:  # rebuilt by value (never touch an imported one)
            function.__code__ = _with_filename(code, filename)
        if lines is not None:  # no mtime: linecache.checkcache keeps it
            linecache.cache.setdefault(filename, (len("".join(lines)), None, lines, filename))
    wrapper = wrapper_class(func, options)
    return wrapper.__get__(bound[0]) if bound else wrapper
