"""Per-item loaders: ``loader.map(folder)`` maps a per-file loader over a folder, cached.

``@cached_dataset(per_item="path")`` marks a loader that reads one file; its wrapper's
``map`` (an :class:`ItemMap`) runs it over the files of a folder (or a list of files) with
:func:`cachedload.builder.build_items` and returns an :class:`~cachedload.builder.ItemArray`,
stored as one entry like any cached result. What this module adds to the decorator:

* **the key**: the loader's identity, code, state and parameters (bound as the decorator
  binds them, the per-item parameter left out), the glob patterns, the source folder's real
  path (not with ``portable=True``) and the fingerprint of the matching files only;
  ``ragged=True`` and ``skip=`` too (they change the result). ``n_jobs``, ``backend`` and
  ``progress`` are not part of it: they change how the rows are computed, not what they are;
* **the miss**: the previous entry of the same call group (same code, parameters, patterns
  and folder: the newest entry whose ``meta["group"]`` matches) gives its row records
  (:func:`cachedload.entry.item_records`) and its data file, so only added and changed files
  are computed; the rows are written straight into the entry being published
  (:meth:`cachedload.root.CacheRoot.put_built`), never held in memory as a whole. Items
  left out by ``skip=`` are named in ``meta["skipped"]`` with their reasons
  (:func:`cachedload.entry.skipped_fields`), so that every hit warns about them as the miss
  did, naming what the user called (``loader.map('/data')``, ``cached_image_folder('/data')``).

Everything else is the decorator's: single flight, healing, ``keep=``, ``max_size=``, warnings,
the log. The decorator's wrapper is the :class:`Host` here (this module does not import it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cachedload import serialize
from cachedload.builder import (
    BuildReport,
    Item,
    ItemArray,
    ItemTable,
    PreviousBuild,
    UnwrittenBuild,
    build_items,
)
from cachedload.entry import DATA_FILE, CorruptEntry, item_records, skipped_fields
from cachedload.errors import (
    ConfigurationError,
    SourceChangedWarning,
    SourceNotFoundError,
    warn_at_caller,
    warn_skipped,
)
from cachedload.explain import Explanation, explain_against_closest
from cachedload.fingerprint import Fingerprint, fingerprint_source, hash_file, matches
from cachedload.hashing import value_digest
from cachedload.keys import Call, CallGroup, KeyRules, call_manifest, entry_meta, readable
from cachedload.options import Options
from cachedload.root import Built, CacheRoot
from cachedload.state import LoaderState

__all__ = ["Host", "ItemMap"]

logger = logging.getLogger("cachedload")

_PATTERN = "(pattern)"  # the patterns among a call's parameters (no loader parameter has it)


class Host(Protocol):
    """What this module uses of the decorator's wrapper (:class:`cachedload.CachedDataset`)."""

    __wrapped__: Callable[..., Any]
    enabled: bool
    _identity: str
    _options: Options
    _rules: KeyRules
    _signature: inspect.Signature
    _stats: Any
    _state: LoaderState | None
    _is_bound: bool

    def load_entry(self, path: str | os.PathLike[str]) -> Any: ...
    def _with_self(self, args: tuple[Any, ...]) -> tuple[Any, ...]: ...
    def _code_version(self) -> str: ...
    def _root(self) -> CacheRoot: ...
    def _fdir(self) -> str: ...
    def _call_meta(self, call: Call) -> dict[str, Any]: ...
    def _through_cache(
        self,
        call: Call,
        compute: Callable[[CacheRoot, str, bool, bool], ItemArray],
        uncached: Callable[[], ItemArray],
        *,
        force: bool,
    ) -> ItemArray: ...
    def _store_failed(self, call: Call, where: Path, error: BaseException) -> None: ...
    def _enforce_limits(
        self, root: CacheRoot, fdir: str, key: str, meta: dict[str, Any]
    ) -> None: ...
    def _log_miss_reason(self, call: Call) -> None: ...
    def _local_function_dirs(self) -> list[Path]: ...
    def _racy_files_unchanged(
        self, root: CacheRoot, fdir: str, call: Call, meta: dict[str, Any]
    ) -> bool: ...


# -- the user's item function, guarded ---------------------------------------------------------
class _ItemFailed(Exception):
    """The item function raised ``error`` (told apart from a failure to write the entry)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


@dataclass(frozen=True)
class _Guarded:
    """The item function as the builder calls it: its exceptions come back wrapped, so that
    an ``OSError`` of the user's code is not mistaken for a cache that cannot be written
    (but the ``skip`` ones, which the builder catches right away)."""

    fn: Callable[..., Any]
    skip: tuple[type[BaseException], ...]

    def __call__(self, path: str, **params: Any) -> Any:
        try:
            return self.fn(path, **params)
        except self.skip:
            raise
        except Exception as error:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"while loading {path}")
            raise _ItemFailed(error) from None

    @staticmethod
    def of(host: Host, skip: tuple[type[BaseException], ...] = ()) -> _Guarded:
        """The host's loader, guarded, with its batch form if it has one (the ``rows_into``
        attribute of an unbound loader: see :func:`cachedload.builder.build_items`)."""
        batch = None if host._is_bound else getattr(host.__wrapped__, "rows_into", None)
        if batch is None:
            return _Guarded(host, skip)  # type: ignore[arg-type]  # its direct call: one item
        return _GuardedBatch(host, skip, batch)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _GuardedBatch(_Guarded):
    """A guarded loader with a batch form."""

    batch: Callable[..., int]

    def rows_into(self, paths: Sequence[str], out: Any, **params: Any) -> int:
        try:
            return self.batch(paths, out, **params)
        except Exception as error:
            raise _ItemFailed(error) from None


# -- one .map call -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """The files of one ``.map`` call: relative to ``root`` (``real``: its real path)."""

    root: str
    real: str
    given: list[Item] | None  # a list of files' items; a folder's are made from the fingerprint
    fingerprint: Fingerprint

    @functools.cached_property
    def items(self) -> ItemTable:
        """The files as items, sorted (made on a miss only: a hit needs the fingerprint alone)."""
        contents = self.fingerprint.contents  # fingerprint="content": rows match by content
        if self.given is None:
            return ItemTable.from_files(self.root, self.fingerprint.files, contents)
        table = ItemTable.of(self.given)
        if contents:
            table.contents = [contents[rel] for rel in table.relpaths]
        return table


@dataclass(frozen=True)
class _Request:
    """A ``.map`` call's arguments, checked."""

    source: Any
    patterns: tuple[str, ...]
    params: dict[str, Any]
    n_jobs: int | None
    backend: Any
    ragged: bool
    skip: tuple[type[BaseException], ...] = ()
    progress: bool | None = None
    name: str = ""  # what the user called, for warnings (``loader.map``)


@dataclass
class _Prepared:
    """A ``.map`` call bound: its :class:`~cachedload.keys.Call`, files and item arguments."""

    call: Call
    source: _Source
    label: str  # the items source's name in the call (the per-item parameter)
    kwargs: dict[str, Any]  # for the item function, besides the path
    others: dict[str, tuple[str, Fingerprint]]  # sources among the other parameters


def _patterns(pattern: str | Sequence[str] | None) -> tuple[str, ...]:
    """Glob patterns relative to the folder; ``**/x`` also matches ``x`` at the top, as in
    ``pathlib.Path.glob``."""
    if pattern is None:
        return ()
    given = (pattern,) if isinstance(pattern, str) else tuple(pattern)
    if not given or not all(isinstance(p, str) and p for p in given):
        raise ConfigurationError("pattern", f"must be a glob or a list of globs, not {pattern!r}")
    found: list[str] = []
    for glob in given:
        found.append(glob)
        while glob.startswith("**/"):
            glob = glob[3:]
            found.append(glob)
    return tuple(dict.fromkeys(found))


def _skip_types(skip: Any) -> tuple[type[BaseException], ...]:
    """``skip=``: an exception class or a tuple of them, sorted by name (one key for any order)."""
    given = skip if isinstance(skip, tuple) else (skip,)
    if not all(isinstance(c, type) and issubclass(c, Exception) for c in given):
        raise ConfigurationError("skip", f"must be exception classes, not {skip!r}")
    return tuple(sorted(set(given), key=_class_name))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _scan(name: str, source: Any, patterns: tuple[str, ...], rules: KeyRules) -> _Source:
    """The files of a folder (those matching ``patterns``), or of a list of files."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(source))
        if os.path.isdir(path):
            try:
                fp = fingerprint_source(
                    path, mode=rules.mode, include=patterns or rules.include, exclude=rules.exclude
                )
            except FileNotFoundError:
                raise SourceNotFoundError(name, source) from None
            return _Source(path, os.path.realpath(path), None, fp)
        return _file_list(name, [source], patterns, rules.mode)
    if isinstance(source, (list, tuple)) and source:
        return _file_list(name, list(source), patterns, rules.mode)
    raise ConfigurationError(name, f"must be a folder or a non-empty list of files, not {source!r}")


def _file_list(name: str, files: list[Any], patterns: tuple[str, ...], mode: str) -> _Source:
    """A list of files, relative to their closest common folder; those matching ``patterns``
    (relative to it), if any, as in a folder."""
    taken_ns = time.time_ns()
    paths = [os.path.abspath(os.fspath(f)) for f in files]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    items: list[Item] = []
    for given, path in zip(files, paths, strict=True):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise SourceNotFoundError(name, given) from None
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(
                name, f"lists {given!r}, which is not a file (pass a folder on its own)"
            )
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if not patterns or matches(rel, patterns):
            items.append(Item(rel, path, info.st_size, info.st_mtime_ns))
    if not items:
        raise ConfigurationError("pattern", f"matches none of the {len(files)} files listed")
    items.sort()
    for before, after in itertools.pairwise(items):
        if before.relpath == after.relpath:
            raise ConfigurationError(name, f"lists {after.path!r} twice")
    contents = {i.relpath: hash_file(i.path) for i in items} if mode == "content" else {}
    records = [(i.relpath, i.size, contents.get(i.relpath, i.mtime_ns)) for i in items]
    fp = Fingerprint(
        digest=value_digest(("files", mode, records)),
        file_count=len(items),
        total_bytes=sum(i.size for i in items),
        newest_mtime_ns=max(i.mtime_ns for i in items),
        taken_ns=taken_ns,
        files=tuple((i.relpath, i.size, i.mtime_ns) for i in items),
        contents=contents,
    )
    return _Source(root, os.path.realpath(root), items, fp)


def _item_kwargs(signature: inspect.Signature, call: Call) -> dict[str, Any]:
    """The item function's keyword arguments (besides the path) of a bound call."""
    bound = signature.bind(*call.args, **call.kwargs)
    kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ConfigurationError(name, "a per-item loader takes no *args in .map")
        else:
            kwargs[name] = value
    return kwargs


def _prepare(host: Host, request: _Request) -> _Prepared:
    """Bind a ``.map`` call: the decorator's key rules on the loader's other parameters, then
    the files' fingerprint, the patterns and the folder."""
    started = time.perf_counter()
    label = host._options.per_item
    assert label is not None
    code_version = host._code_version()  # first: it rebuilds _state if the code changed
    assert host._state is not None
    parameters = list(host._signature.parameters.values())
    if host._is_bound:
        parameters = parameters[1:]  # self: bound, part of the state
    signature = inspect.Signature([p for p in parameters if p.name != label])
    full = host._signature.replace(parameters=[p for p in host._signature.parameters.values()
                                                if p.name != label])  # fmt: skip
    base = host._rules.bind(
        full, host._with_self(()), request.params, code_version, state=host._state.values()
    )
    kwargs = _item_kwargs(signature, dataclasses.replace(base, args=base.args[host._is_bound :]))
    scanned = time.perf_counter()
    source = _scan(label, request.source, request.patterns, host._rules)
    scan_seconds = time.perf_counter() - scanned
    fp = source.fingerprint
    where = "" if host._rules.portable else source.real
    extra: tuple[Any, ...] = ("ragged",) if request.ragged else ()
    if request.skip:  # nothing for the default: the keys stored before skip= stay
        extra += (("skip", tuple(_class_name(c) for c in request.skip)),)
    key = value_digest(("per_item", base.key, label, list(request.patterns), where, fp.digest,
                        *extra))  # fmt: skip
    group = CallGroup((*base.group.token, ("per_item", label, request.patterns, source.real,
                                           *extra)))  # fmt: skip
    parameters_of_call = dict(base.parameters)
    # What .map takes besides the loader's parameters, shown (ls, why, cache_explain) as the
    # parameters they are; each part of the key already (patterns, and extra), so no key moves.
    shown = {_PATTERN: list(request.patterns)} if request.patterns else {}
    shown.update((f"({name})", value) for name, value in _named(extra))
    for name, value in shown.items():
        parameters_of_call[name] = (value_digest(value), readable(value))
    call = dataclasses.replace(
        base,
        key=key,
        group=group,
        parameters=parameters_of_call,
        sources={**base.sources, label: (source.real, fp)},
        given_paths={**base.given_paths, label: source.root},
        warned=set(),
        shown_as=_shown_as(request.name, source),
        fingerprint_seconds=base.fingerprint_seconds + scan_seconds,
        started=started,
    )
    return _Prepared(call, source, label, kwargs, dict(base.sources))


def _named(extra: tuple[Any, ...]) -> list[tuple[str, Any]]:
    """``.map``'s own options in the key (``"ragged"``, ``("skip", names)``) as name, value."""
    return [(part, True) if isinstance(part, str) else part for part in extra]


def _shown_as(name: str, source: _Source) -> str:
    """A ``.map`` call as warnings name it: ``name('/data')``, or ``name([3 files in '/data'])``."""
    if not name:
        return ""
    if source.given is None:  # a folder (not .items: a hit does not make them)
        return f"{name}({source.root!r})"
    return f"{name}([{len(source.given)} file(s) in {source.root!r}])"


class ItemMap:
    """``loader.map``: the per-item loader mapped over a folder or a list of files, cached.

    Call it as ``loader.map(source, pattern=None, *, n_jobs=None, backend=None,
    ragged=False, skip=(), progress=None, **params)``; its methods ``is_cached``,
    ``cache_path``, ``recompute`` and ``cache_explain`` take the same arguments.
    """

    def __init__(self, host: Host, name: str | None = None) -> None:
        """``host.map``; ``name``: what the user calls, as warnings name it (default:
        ``<the loader's name>.map``)."""
        self._host = host
        self._name = name or f"{getattr(host, '__name__', host._identity)}.map"

    def __repr__(self) -> str:
        return f"<map of {self._host._identity}>"

    def __call__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        pattern: str | Sequence[str] | None = None,
        *,
        n_jobs: int | None = None,
        backend: Any = None,
        ragged: bool = False,
        skip: type[Exception] | tuple[type[Exception], ...] = (),
        progress: bool | None = None,
        **params: Any,
    ) -> ItemArray:
        """The loader's rows for every file of ``source``, stacked, from the cache if possible.

        Args:
            source: a folder, or a list of files (then relative to their common folder).
            pattern: glob(s) relative to the folder: only matching files are items
                (``"**/*.jpg"``; a pattern without ``/`` matches names at any depth).
                Default: every file (but the decorator's ``include``/``exclude``).
            n_jobs, backend: workers and joblib backend of the build (default: the active
                ``joblib.parallel_config``, else threads on every CPU); not part of the key.
            ragged: rows may differ in shape: ``array`` is then a list.
            skip: exception class(es) that leave a file out instead of failing the call
                (e.g. ``ImageReadError`` for unreadable images): it gets no row, the
                result's ``skipped`` names it, and the call and every later hit warn with an
                ``ImagesSkippedWarning`` naming it and why (the first ten files). A file left
                out is tried again on the next miss. Part of the key. Every file left out:
                its error is raised, nothing stored.
            progress: a tqdm bar on stderr during a build (never on a hit); ``None``: if
                stderr is a terminal and the build is slow. Not part of the key.
            params: the loader's other arguments, part of the key.

        Returns:
            An :class:`~cachedload.builder.ItemArray`: ``array`` ``(N, *row)`` (memory-mapped
            with ``mmap_mode="r"``) and ``paths``, relative, ``/``-separated, sorted.

        Raises:
            SourceNotFoundError: ``source`` does not exist.
            ItemShapeMismatchError: two files gave rows of different shapes or dtypes.
            Exception: whatever the loader raises, unchanged (with a note naming the file).
        """
        request = _request(source, pattern, params, n_jobs=n_jobs, backend=backend,
                           ragged=ragged, skip=skip, progress=progress)  # fmt: skip
        return self._run(dataclasses.replace(request, name=self._name), force=False)

    def recompute(
        self, source: Any, pattern: str | Sequence[str] | None = None, **options: Any
    ) -> ItemArray:
        """Build every row again (no previous entry used) and overwrite the stored entry;
        takes what a call takes (``n_jobs``, ``backend``… run the build)."""
        request = _request(source, pattern, options)
        return self._run(dataclasses.replace(request, name=self._name), force=True)

    def is_cached(self, source: Any, pattern: str | Sequence[str] | None = None,
                  **options: Any) -> bool:  # fmt: skip
        """True if this ``.map`` call would be answered from the cache now."""
        if not self._host.enabled:
            return False
        return self._is_cached(_prepare(self._host, _request(source, pattern, options)))

    def _is_cached(self, prepared: _Prepared) -> bool:
        host, call = self._host, prepared.call
        root, fdir = host._root(), host._fdir()
        try:
            meta = root.read_meta(fdir, call.key)
            if meta is None or not host._racy_files_unchanged(root, fdir, call, meta):
                return False
            return root.has_data(fdir, call.key, meta)
        except (CorruptEntry, OSError):
            return False

    def cache_path(self, source: Any, pattern: str | Sequence[str] | None = None,
                   **options: Any) -> Path:  # fmt: skip
        """The folder where the entry of this ``.map`` call is (or would be) stored."""
        host = self._host
        call = _prepare(host, _request(source, pattern, options)).call
        return host._root().entry_path(host._fdir(), call.key)

    def load_entry(self, path: str | os.PathLike[str]) -> ItemArray:
        """The result stored in the entry folder ``path`` (one :meth:`cache_path` returned),
        without looking at the files, as :meth:`cachedload.CachedDataset.load_entry`.

        Raises:
            FileNotFoundError: no entry of this loader is there.
            OSError: the entry is damaged.
        """
        found = self._host.load_entry(path)
        if not isinstance(found, ItemArray):
            raise OSError(f"damaged cache entry {os.fspath(path)}: not a per-item entry")
        return found

    def cache_explain(self, source: Any, pattern: str | Sequence[str] | None = None,
                      **options: Any) -> Explanation:  # fmt: skip
        """Why this ``.map`` call would miss: which files were added, removed or modified
        since the closest stored entry, which parameters changed (see
        :meth:`cachedload.CachedDataset.cache_explain`)."""
        host = self._host
        prepared = _prepare(host, _request(source, pattern, options))  # one walk, one key
        call, identity = prepared.call, host._identity
        if host.enabled and self._is_cached(prepared):
            note = "an entry for these arguments is stored: the call would be a hit"
            return Explanation(identity, new_key=call.key, note=note)
        found = explain_against_closest(
            host._call_meta(call), call_manifest(call), host._local_function_dirs()
        )
        if found is None:
            note = "no entry of this loader is stored yet"
            return Explanation(identity, new_key=call.key, note=note)
        return found

    # -- the lookup and the build ----------------------------------------------------------------
    def _run(self, request: _Request, *, force: bool) -> ItemArray:
        host = self._host
        if not host.enabled:
            host._stats.misses += 1
            return _build_uncached(host, _prepare(host, request), request)
        prepared = _prepare(host, request)

        def build(root: CacheRoot, fdir: str, replace: bool, corrupt: bool) -> ItemArray:
            return _Build(host, root, fdir, prepared, request).run(
                replace=replace, use_previous=not force, skip_own=corrupt
            )

        def uncached() -> ItemArray:
            return _build_uncached(host, prepared, request)

        return host._through_cache(prepared.call, build, uncached, force=force)


def _request(
    source: Any,
    pattern: str | Sequence[str] | None,
    params: dict[str, Any],
    *,
    n_jobs: int | None = None,
    backend: Any = None,
    ragged: bool = False,
    skip: type[Exception] | tuple[type[Exception], ...] = (),
    progress: bool | None = None,
) -> _Request:
    """A ``.map`` call's request, its own options checked once for every method that takes
    them (a call, ``recompute``, ``is_cached``, ``cache_path``, ``cache_explain``): given in
    ``params`` or as keywords, ``.map``'s options are taken out of the loader's parameters.

    Raises:
        ConfigurationError: ``n_jobs``, ``backend`` or ``progress`` is not valid.
    """
    params = dict(params)  # the caller's mapping is never changed
    n_jobs = params.pop("n_jobs", n_jobs)
    backend = params.pop("backend", backend)
    progress = params.pop("progress", progress)
    ragged = bool(params.pop("ragged", ragged))
    skip = params.pop("skip", skip)
    if progress not in (None, True, False):
        raise ConfigurationError("progress", f"must be None, True or False, not {progress!r}")
    if n_jobs is not None and (not _is_int(n_jobs) or n_jobs == 0):
        raise ConfigurationError(
            "n_jobs",
            f"must be None or a whole number other than 0 (-1: every CPU), not {n_jobs!r}",
        )
    _check_backend(backend)
    return _Request(source, _patterns(pattern), params, n_jobs, backend, ragged,
                    _skip_types(skip), progress)  # fmt: skip


def _check_backend(backend: Any) -> None:
    """Raise unless ``backend`` is None, a joblib backend instance, or the name of one
    registered with joblib (``"threading"``, ``"loky"``, ``"dask"`` once registered…).

    Raises:
        ConfigurationError: it is not.
    """
    if backend is None or not isinstance(backend, str):
        return
    from joblib.parallel import BACKENDS, EXTERNAL_BACKENDS

    if backend not in BACKENDS and backend not in EXTERNAL_BACKENDS:
        known = ", ".join(repr(name) for name in sorted({*BACKENDS, *EXTERNAL_BACKENDS}))
        raise ConfigurationError("backend", f"must be a joblib backend ({known}), not {backend!r}")


def _unwrapped(run: Callable[[], Any]) -> Any:
    """``run()``, the item function's own exception re-raised as it was raised."""
    try:
        return run()
    except _ItemFailed as failed:
        error = failed.error
    raise error  # outside the except clause: no "during handling" context added


def _build_uncached(
    host: Host, prepared: _Prepared, request: _Request, previous: PreviousBuild | None = None
) -> ItemArray:
    """Build into a temporary file and load it (no cache to write to, or caching disabled);
    in memory where no temporary file can be written (``TMPDIR`` full, or missing)."""
    return _unwrapped(lambda: _uncached(host, prepared, request, previous))  # type: ignore[no-any-return]


def _uncached(
    host: Host, prepared: _Prepared, request: _Request, previous: PreviousBuild | None
) -> ItemArray:
    try:
        with tempfile.TemporaryDirectory(prefix="cachedload-", ignore_cleanup_errors=True) as tmp:
            path = Path(tmp) / DATA_FILE
            report = _build_file(host, prepared, request, path, previous)
            # A memory map outlives the file's name (POSIX): deleting the folder is safe.
            value: ItemArray | None = report.value
            if value is None:
                value = serialize.load(path, mmap_mode=host._options.mmap_mode)
    except UnwrittenBuild as unwritten:
        value = unwritten.report.value
    except OSError as error:
        logger.info("no temporary file for %s (%s): building in memory", host._identity, error)
        value = _build_file(host, prepared, request, None, previous).value
    assert value is not None
    return value


def _build_file(
    host: Host,
    prepared: _Prepared,
    request: _Request,
    path: Path | None,
    previous: PreviousBuild | None,
) -> BuildReport:
    """Build the data file at ``path`` (``None``: in memory only); warn about the items
    left out (``skip=``), or raise the first one's error (wrapped in ``_ItemFailed``) when
    every item was. Raises ``UnwrittenBuild`` (after the same checks) if the file could not
    be written: it holds the result."""
    with _progress_bar(request.progress) as progress:
        try:
            report = build_items(
                _Guarded.of(host, request.skip),
                prepared.source.items,
                path,
                params=prepared.kwargs,
                previous=previous,
                # The result is wanted in memory: built there, it is not read back from the file.
                in_memory=host._options.mmap_mode is None,
                taken_ns=prepared.source.fingerprint.taken_ns,
                n_jobs=request.n_jobs,
                backend=request.backend,
                ragged=request.ragged,
                skip=request.skip,
                progress=progress,
            )
        except UnwrittenBuild as unwritten:
            _check_built(host, prepared, unwritten.report)
            raise
    _check_built(host, prepared, report)
    return report


def _check_built(host: Host, prepared: _Prepared, report: BuildReport) -> None:
    """Raise the error of the first item left out if all were; warn about those left out."""
    if report.skipped and len(report.skipped) == len(report.records):  # no row: not a result
        error = next(iter(report.skipped.values()))
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"(every one of the {len(report.skipped)} files was skipped)")
        raise _ItemFailed(error)  # type: ignore[arg-type]  # skip= holds Exception classes
    call = prepared.call
    if report.skipped and "skipped" not in call.warned:
        call.warned.add("skipped")  # once, even if the call builds twice
        skipped = [(rel, _reason(error)) for rel, error in report.skipped.items()]
        warn_skipped(call.shown_as or repr(prepared.source.root), skipped, cached=False)


def _reason(error: BaseException) -> str:
    """Why an item was skipped: the error's ``reason`` (``ImageReadError``'s), or its text."""
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) else str(error) or type(error).__name__


@contextlib.contextmanager
def _progress_bar(show: bool | None) -> Iterator[Callable[[int, int], None] | None]:
    """A ``build_items`` progress callback drawing a tqdm bar on stderr (``None``: only if
    stderr is a terminal and the build lasts over a second), or ``None`` if not shown."""
    if show is False or (show is None and not sys.stderr.isatty()):
        yield None
        return
    from tqdm import tqdm  # here: a build that shows no bar never imports it (tens of ms)

    with tqdm(desc="Loading items", unit="item", delay=0.0 if show else 1.0) as bar:

        def advance(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        yield advance


class _Build:
    """One miss: find the previous entry, build into the new one, publish, load it back."""

    def __init__(
        self, host: Host, root: CacheRoot, fdir: str, prepared: _Prepared, request: _Request
    ) -> None:
        self.host, self.root, self.fdir = host, root, fdir
        self.prepared, self.request = prepared, request
        self.unpublished: ItemArray | None = None  # the result, if sources changed meanwhile
        self.built: ItemArray | None = None  # the result, if the builder kept it in memory
        # What the previous entry's check holds (a private copy) until the build is done.
        self.cleanup = contextlib.ExitStack()

    def run(self, *, replace: bool, use_previous: bool, skip_own: bool) -> ItemArray:
        with self.cleanup:
            return self._run(replace=replace, use_previous=use_previous, skip_own=skip_own)

    def _run(self, *, replace: bool, use_previous: bool, skip_own: bool) -> ItemArray:
        host, call = self.host, self.prepared.call
        host._stats.misses += 1
        logger.info("miss %s [%s]: building %s item(s)", host._identity, call.key[:12],
                    len(self.prepared.source.items))  # fmt: skip
        if not replace:
            host._log_miss_reason(call)
        previous, why = self.previous(skip_own) if use_previous else (None, "recompute")

        def build(data: Path) -> Built | None:
            return self.build(data, previous, why)

        item_error: Exception | None = None
        try:
            size = self.root.put_built(self.fdir, call.key, build, replace=replace)
        except _ItemFailed as failed:  # the loader's error: not a failure to store
            item_error = failed.error
        except OSError as error:
            return self.not_stored(error, previous)
        if item_error is not None:
            raise item_error  # outside the except clause: as the loader raised it
        if size is None:
            assert self.unpublished is not None
            return self.unpublished
        host._stats.stores += 1
        return self.load_stored()

    def not_stored(self, error: OSError, previous: PreviousBuild | None) -> ItemArray:
        """The result of a build that could not be stored (a full disk, a file size limit):
        the rows it computed, in memory. Built again (in memory if ``TMPDIR`` cannot be
        written either, as on the same full disk) only if the entry's folder could not be
        made, or it failed once the rows were written (they went with its folder)."""
        host, call = self.host, self.prepared.call
        where = self.root.entry_path(self.fdir, call.key).parent
        host._store_failed(call, where, error.error if isinstance(error, UnwrittenBuild) else error)
        if isinstance(error, UnwrittenBuild):
            assert error.report.value is not None
            return error.report.value
        if self.built is not None:
            return self.built
        return _build_uncached(host, self.prepared, self.request, previous)

    def previous(self, skip_own: bool) -> tuple[PreviousBuild | None, str]:
        """The newest entry of this call's group, and why there is none. In a remote cache,
        the newest one in the bucket, downloaded into the local copy if not there yet (its
        rows copied beat decoding them again)."""
        call, root, local = self.prepared.call, self.root, self.root.local
        group = call.group.digest
        best = None
        try:
            for entry in root.entries(self.fdir):
                if entry.meta.get("group") != group or (skip_own and entry.key == call.key):
                    continue
                if best is None or entry.meta.get("created", 0) > best.meta.get("created", 0):
                    best = entry
            if best is None:
                return None, "no previous entry of these parameters and folder"
            root.local_entry(self.fdir, best.key, best.meta)
            if not local.has_data(self.fdir, best.key, best.meta):
                return None, f"previous entry {best.key[:12]} is incomplete"
            # Checked as strictly as `cachedload verify` checks it (the data file's checksum,
            # whatever verify= says; the signature), and its manifest against the metadata's
            # record: copying rows must not launder a damaged or tampered entry into a new,
            # valid one, nor put rows on the wrong files.
            checked = self.cleanup.enter_context(
                local.reusable(self.fdir, best.key, best.meta, verify=True)
            )
            manifest = local.manifest(self.fdir, best.key, best.meta, columns=True)
            raw = item_records(manifest, best.meta, self.prepared.label)
            if raw is None:
                return None, f"previous entry {best.key[:12]} is incomplete"
        except (OSError, CorruptEntry) as error:
            return None, f"previous entry unreadable ({error})"
        if self.prepared.source.items.contents is not None and raw.contents is None:
            # fingerprint="content": a row is reused only if its file's content is known.
            return None, f"previous entry {best.key[:12]} records no file contents"
        # Rows are copied from the bytes checked: a private copy of a file others can write,
        # else the file itself while it is the one hashed (in a private cache, only a clear
        # or keep= removing it changes it: rows copied from the open file are still those).
        return PreviousBuild(
            checked.path, raw, safe_types=checked.safe_types, identity=checked.identity
        ), ""

    def build(self, data: Path, previous: PreviousBuild | None, why: str) -> Built | None:
        """Write the data file ``data``; the entry's metadata and manifest, or None if the
        sources changed while it was built (the result is then kept in ``unpublished``)."""
        host, prepared = self.host, self.prepared
        call, label = prepared.call, prepared.label
        report = _build_file(host, prepared, self.request, data, previous)
        self.built = report.value
        reason = report.full_build_reason or (why if previous is None else None)
        logger.info(
            "built %s [%s]: %s item(s) computed, %s reused in %.2f s%s",
            host._identity, call.key[:12], report.computed, report.reused, report.seconds,
            f" (full build: {reason})" if reason else "",
        )  # fmt: skip
        racy = {label: dict(report.digests)}
        others = dataclasses.replace(call, sources=prepared.others)
        other_racy, newest = host._rules.racy_digests(others)
        # The items are not fingerprinted again: each row's record (size, mtime, and the
        # content digest of a racy file) was taken before the row was computed, so a file
        # changed meanwhile has a record that no longer matches it, and the next call
        # computes its row again (a hit needs the old fingerprint, or the racy digests).
        others_after = host._rules.sources_after(others)
        if others_after is None:
            warn_at_caller(
                f"cachedload: source files of {host._identity} changed while it ran; "
                "the result is returned but not cached",
                SourceChangedWarning,
            )
            # The file being built is in the cache: where others can write it (a shared
            # cache, a signed one), it is read as any of their files is, data only.
            local = host._root().local
            trusted = local.safe_types is None and local.signing_key is None
            self.unpublished = report.value or serialize.load(
                data, mmap_mode=host._options.mmap_mode, safe_types=None if trusted else ()
            )
            return None
        if racy[label]:
            newest = max(newest, prepared.source.fingerprint.newest_mtime_ns)
        else:
            del racy[label]
        count = len(prepared.source.items)
        meta = entry_meta(host._call_meta(call), _summary(report, count),
                          report.seconds, {**other_racy, **racy}, newest)  # fmt: skip
        meta["items"] = {
            "count": count,
            "computed": report.computed,
            "reused": report.reused,
            "full_build_reason": reason,
        }
        if report.skipped:  # every hit warns (the decorator's _lookup)
            meta.update(skipped_fields({rel: _reason(e) for rel, e in report.skipped.items()}))
        others_files = (others_after or {}).items()
        manifest: dict[str, Any] = {name: fp.files for name, (_, fp) in others_files}
        manifest[label] = prepared.source.items.columns()  # the columns it stores: no copy
        return Built(report.size, report.checksum, meta, manifest)

    def load_stored(self) -> ItemArray:
        """The entry just published, loaded as a hit loads it (memory maps with ``mmap_mode``)."""
        host, root, fdir, call = self.host, self.root, self.fdir, self.prepared.call
        try:
            meta = root.read_meta(fdir, call.key)
            if meta is None:
                raise FileNotFoundError(f"{root.entry_path(fdir, call.key)} vanished")
            # Built in memory (mmap_mode=None, a full build): the same array, not read back.
            value: ItemArray = self.built or root.load(
                fdir, call.key, meta, mmap_mode=host._options.mmap_mode, verify=False
            )
        except (CorruptEntry, OSError) as error:
            host._store_failed(call, root.entry_path(fdir, call.key).parent, error)
            return _build_uncached(host, self.prepared, self.request)
        host._enforce_limits(root, fdir, call.key, meta)
        return value


def _summary(report: BuildReport, count: int) -> Any:
    """A stand-in of the result for its summary in the metadata: no memory for the rows, the
    result's shape (a row per item not skipped) and as many paths."""
    rows = count - len(report.skipped)
    paths = ("",) * rows
    if report.row_shape is None or report.dtype is None:
        return ItemArray([None] * rows, paths)
    stand_in = np.lib.stride_tricks.as_strided(
        np.zeros(1, report.dtype), shape=(rows, *report.row_shape),
        strides=(0,) * (1 + len(report.row_shape)),
    )  # fmt: skip
    return ItemArray(stand_in, paths)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
