"""``@cached_dataset``: the decorator and the wrapper object it returns.

The wrapper binds each call's arguments to the loader's signature, splits them into sources
(paths, fingerprinted) and parameters (hashed), asks :mod:`cachedload.keys` for the key and
its cache root (:mod:`cachedload.root`, local or remote) for the entry, and runs the loader
body only on a miss, under a cross-process lock so that concurrent callers compute once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, ParamSpec, TypeVar, overload

from cachedload import config
from cachedload.backends import open_root
from cachedload.entry import function_dir_name, function_dir_prefix, skipped_fields, skipped_items
from cachedload.errors import (
    CacheStoreWarning,
    ConfigurationError,
    CorruptEntryWarning,
    SourceChangedWarning,
    UnsafeCacheWarning,
    UnsafePickleError,
    warn_at_caller,
    warn_skipped,
)
from cachedload.explain import (
    Explanation,
    compare_with_superseded,
    explain_against_closest,
    last_superseded,
)
from cachedload.hashing import code_digest, function_identity, value_digest
from cachedload.keys import (
    Call,
    CallGroup,
    KeyRules,
    Prepared,
    call_manifest,
    entry_meta,
    racy_files_unchanged,
    racy_records_expired,
)
from cachedload.manage import EntryRecord, enforce_after_store, records_of
from cachedload.options import Options, options_for
from cachedload.per_item import ItemMap
from cachedload.pickling import reduce_loader
from cachedload.reading import ReadAhead
from cachedload.root import CacheRoot, CorruptEntry, Hit, Miss
from cachedload.serialize import UnpicklableResult, check_safe
from cachedload.state import LoaderState, bound_objects

__all__ = ["CacheInfo", "CachedDataset", "cached_dataset"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

logger = logging.getLogger("cachedload")

# A hit reads its entry ahead (in a thread, while fingerprinting) only when both take long
# enough for the overlap to pay for a thread (about 0.1 ms): measured on the realistic case of
# benchmarks/bench_scaling.py, 2,000 files and 94 MiB, a repeated hit takes 0.78x-0.87x the time.
_READ_AHEAD_MIN_BYTES = 8 * 1024 * 1024
_READ_AHEAD_MIN_SECONDS = 0.5e-3
_RECENT_GROUPS = 32


class CacheInfo(NamedTuple):
    """Statistics of one cached loader, shaped like ``functools.lru_cache``'s.

    Attributes:
        hits: calls answered from the cache in this process.
        misses: calls that ran the loader body in this process.
        stores: results written to the cache in this process.
        entries: entries currently on disk for this loader (every code version).
        size_bytes: their total size on disk.
    """

    hits: int
    misses: int
    stores: int
    entries: int
    size_bytes: int


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    stores: int = 0


class _Recent(NamedTuple):
    """The entry a group of calls used last in this process (see ``_read_ahead``)."""

    key: str
    size: int
    fingerprint_seconds: float

    def worth_reading_ahead(self) -> bool:
        return (
            self.size >= _READ_AHEAD_MIN_BYTES
            and self.fingerprint_seconds >= _READ_AHEAD_MIN_SECONDS
        )


class CachedDataset(Generic[P, R]):
    """A dataset loader whose results are cached on disk (made by :func:`cached_dataset`).

    Call it exactly like the loader. Its methods manage the loader's cache:
    :meth:`cache_info`, :meth:`cache_clear`, :meth:`cache_path`, :meth:`is_cached`,
    :meth:`recompute`, :meth:`entries`, :meth:`cache_explain`; ``__wrapped__`` is the
    undecorated loader.
    """

    __wrapped__: Callable[P, R]

    def __new__(
        cls, func: Callable[P, R], options: Options | None = None, /, **given: Any
    ) -> CachedDataset[P, R]:
        # A per-item loader's wrapper is a _PerItemDataset, however it is made (a worker
        # rebuilding a pickled wrapper goes through here too).
        per_item = given.get("per_item", options.per_item if options is not None else None)
        kind = _PerItemDataset if cls is CachedDataset and per_item is not None else cls
        return super().__new__(kind)

    def __init__(
        self, func: Callable[P, R], options: Options | None = None, /, **given: Any
    ) -> None:
        """Wrap ``func`` with ``options``, or with an :class:`~cachedload.options.Options` made
        of the keyword arguments (those of :func:`cached_dataset`; with ``options``, they
        replace some of its fields).

        Raises:
            ConfigurationError: an option is invalid.
        """
        if options is None:
            options = options_for("CachedDataset", given)
        elif given:
            options = dataclasses.replace(options, **given)
        functools.update_wrapper(self, func)
        self.__wrapped__ = func
        self._signature = inspect.signature(func)
        self._identity = function_identity(func)
        # A bound method's or callable object's "self" and a partial's arguments are part of
        # the key like parameters, and may be ignored like them.
        bound = [label for label, _ in bound_objects(func)]
        options.check_names(self._signature.parameters, bound, self._identity)
        self._options = options
        self.enabled = options.enabled
        self._rules = KeyRules.from_options(self._identity, options)
        self._stats = _Stats()
        # A call group's token -> the entry the group used last (see _read_ahead).
        self._recent: dict[tuple[Any, ...], _Recent] = {}
        self._bound_self: Any = None
        self._is_bound = False
        self._code: str | None = None
        self._code_parts: dict[str, str] = {}
        self._state: LoaderState | None = None
        # The cache root and the settings it was resolved with (see _root).
        # [the settings it was resolved with, the root]: a list that a bound copy (one per
        # attribute access of a decorated method) shares, so the root is opened once.
        self._resolved: list[tuple[tuple[str | None, ...], CacheRoot]] = []
        self._fdir_of: tuple[str, str] | None = None  # (code version, its function folder)

    # -- descriptor: decorating a method --------------------------------------------------------
    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        if self.enabled:
            self._code_version()  # once, here: every bound copy (one per access) inherits it
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)  # shares options and statistics
        bound._bound_self = instance
        bound._is_bound = True
        return bound

    def __reduce__(self) -> tuple[Any, ...]:
        # Worker processes rebuild the wrapper from the loader and the options: see
        # cachedload.pickling for when that is by import path and when by value.
        bound = (self._bound_self,) if self._is_bound else ()
        return reduce_loader(type(self), self.__wrapped__, self._options, bound)

    def __repr__(self) -> str:
        return f"<cached_dataset {self._identity}>"

    def _with_self(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self._bound_self, *args) if self._is_bound else args

    # -- identity ------------------------------------------------------------------------------
    def _code_version(self) -> str:
        """Digest of the loader's code, its helpers' code and the user's ``version=``.

        Computed again when a function's ``__code__`` was replaced (IPython's ``%autoreload``
        does that): an identity check per function and call.
        """
        state = self._state
        if state is None or self._code is None or not state.current():
            depends_on = tuple(self._options.depends_on)
            self._state = LoaderState(self.__wrapped__, depends_on, self._rules.ignore)
            loader = code_digest(self.__wrapped__)
            helpers = [(function_identity(f), code_digest(f)) for f in depends_on]
            version = value_digest(self._options.version)
            self._code = value_digest(
                (loader, *(f"{name}:{digest}" for name, digest in helpers), version)
            )
            # Each part on its own too, so that ``why`` can say whose code changed.
            self._code_parts = {
                "loader": loader,
                **{f"helper {name}": digest for name, digest in helpers},
                "version": version,
            }
        return self._code

    def __cachedload_key__(self) -> tuple[str, str]:
        # A wrapper as a value (an argument, an attribute of a hashed ``self``) counts as the
        # function it wraps: its identity and code.
        return (self._identity, self._code_version())

    def _fdir(self) -> str:
        """This code version's function folder."""
        code = self._code_version()
        named = self._fdir_of
        if named is None or named[0] != code:
            named = self._fdir_of = (code, function_dir_name(self._identity, code))
        return named[1]

    def _root(self) -> CacheRoot:
        """The cache root, resolved again only when a setting it depends on changed."""
        # A folder named by cache_dir= depends on no setting.
        location = self._options.cache_location
        settings = () if isinstance(location, Path) else config.root_settings()
        resolved = self._resolved[-1] if self._resolved else None
        if resolved is not None and resolved[0] == settings:
            return resolved[1]
        # A URL (s3://…) is a remote cache read through a local copy; see cachedload.backends.
        options = self._options
        root = open_root(
            location,
            storage_options=options.storage_options,
            local_cache_dir=options.local_cache_dir,
            shared=options.shared,
            safe_types=tuple(options.safe_types),
            signing_key=options.key_bytes(),
        )
        self._resolved[:] = [(settings, root)]
        return root

    # -- one call --------------------------------------------------------------------------------
    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
        """Bind a call's arguments (everything but the sources' fingerprints)."""
        code_version = self._code_version()  # first: it rebuilds _state if the code changed
        assert self._state is not None
        return self._rules.prepare(
            self._signature,
            self._with_self(args),
            kwargs,
            code_version,
            state=self._state.values(),
        )

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        started = time.perf_counter()
        call = self._rules.finish(self._bind(args, kwargs))
        call.started = started
        return call

    def _reads_ahead(self) -> bool:
        # Memory maps are instant; compressed entries are read by joblib.
        return self._options.mmap_mode is None and not self._options.compress

    def _read_ahead(self, group: CallGroup) -> tuple[str, ReadAhead] | None:
        """Start reading the entry that this call's group hit or stored last in this process,
        while the sources are fingerprinted (see :mod:`cachedload.reading`); the guessed key
        and its reading.

        Only within a process: a new process's first hit is not read ahead (measured on this
        project's VM, a fresh process faulting its first memory from a second thread was
        often several times slower than reading it from the calling thread).
        """
        if not self._reads_ahead():
            return None
        guess = self._recent.get(group.token)
        if guess is None or not guess.worth_reading_ahead():
            return None
        try:
            return guess.key, self._root().read_ahead(self._fdir(), guess.key)
        except (OSError, RuntimeError) as error:  # RuntimeError: no thread could be started
            logger.debug("no read-ahead for %s: %s", self._identity, error)
            return None

    def _remember(self, call: Call, size: int) -> None:
        """Note the entry a call's group used, for :meth:`_read_ahead` on its next call."""
        if not self._reads_ahead():
            return
        recent = self._recent
        recent.pop(call.group.token, None)
        recent[call.group.token] = _Recent(call.key, size, call.fingerprint_seconds)
        if len(recent) > _RECENT_GROUPS:
            # The least recently used (another thread may be trimming it at the same time).
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del recent[next(iter(recent))]

    def _call_meta(self, call: Call) -> dict[str, Any]:
        return self._rules.call_meta(
            call, self._code_version(), self._options.version, code_parts=self._code_parts
        )

    def _lookup(
        self, root: CacheRoot, fdir: str, call: Call, ahead: ReadAhead | None = None
    ) -> Hit | Miss:
        """The stored result for ``call``. ``ahead``: the entry's data, being read ahead."""
        started = time.perf_counter()
        found = root.get(
            fdir,
            call.key,
            fresh=lambda meta: self._racy_files_unchanged(root, fdir, call, meta),
            mmap_mode=self._options.mmap_mode,
            verify=self._options.verify == "always",
            ahead=ahead,
        )
        if isinstance(found, Miss):
            self._report_miss(call, found)
            return found
        self._remember(call, found.size)
        self._warn_skipped(found.meta, call)
        now = time.perf_counter()
        logger.info(
            "hit %s [%s] in %.1f ms (fingerprint %.1f ms, load %.1f ms; %s bytes%s)",
            self._identity,
            call.key[:12],
            (now - call.started) * 1e3,  # the whole call: binding, fingerprint, lookup, load
            call.fingerprint_seconds * 1e3,
            (now - started) * 1e3,
            found.size,
            ", read ahead" if ahead is not None and ahead.used else "",
        )
        return found

    def _report_miss(self, call: Call, found: Miss) -> None:
        if found.stale:
            logger.info(
                "stale %s: a recently written source file changed without a new mtime",
                self._identity,
            )
        error = found.corrupt
        if error is not None and "corrupt" not in call.warned:
            call.warned.add("corrupt")
            warn_at_caller(
                f"cachedload: corrupt cache entry {error.path} ({error.reason}); recomputing it",
                CorruptEntryWarning,
            )

    def _warn_skipped(self, meta: dict[str, Any], call: Call) -> None:
        """Warn, as the miss did, about the files the entry's result leaves out (a hit)."""
        if "skipped" not in meta:  # first: every hit comes here
            return
        skipped = skipped_items(meta)
        if skipped:
            warn_skipped(call.shown_as or self._identity, skipped, cached=True)

    def _racy_files_unchanged(
        self, root: CacheRoot, fdir: str, call: Call, meta: dict[str, Any]
    ) -> bool:
        if not racy_files_unchanged(call, meta):
            return False
        if racy_records_expired(meta):
            # Saves hashing those files on every hit from now on.
            cleared = {k: v for k, v in meta.items() if k not in ("racy", "racy_newest_mtime_ns")}
            with contextlib.suppress(OSError):
                root.rewrite_meta(fdir, call.key, cleared)
        return True

    def _store_failed(self, call: Call, where: Path, error: BaseException) -> None:
        if "store" in call.warned:
            return
        call.warned.add("store")
        if isinstance(error, UnpicklableResult):
            detail = f": {error}"
        else:
            detail = f" in {where}: {type(error).__name__}: {error}"
        warn_at_caller(
            f"cachedload: could not store the result of {self._identity}{detail}. "
            "The result is returned but not cached.",
            CacheStoreWarning,
        )

    def _cannot_lock(self, root: CacheRoot, fdir: str, call: Call, error: OSError) -> None:
        """Say that a call is not cached because no lock could be made: once per process if
        the cache directory can never be one (it, or a folder above it, is a file), naming
        where its path came from; else as any failure to store, once per call."""
        local = Path(root.local.location)
        problem = config.not_a_folder(local)
        if problem is None:
            self._store_failed(call, root.entry_path(fdir, call.key).parent, error)
            return
        if local in _WARNED_UNUSABLE:
            logger.debug("not caching %s: %s", self._identity, problem)
            return
        _WARNED_UNUSABLE.add(local)
        if root.local is root:
            origin = config.cache_dir_origin(self._options.cache_location)
        else:  # a remote cache's local copy
            origin = "local_cache_dir" if self._options.local_cache_dir else "its local copy"
        warn_at_caller(
            f"cachedload: not caching {self._identity}: the cache directory {local} ({origin}) "
            f"cannot be used: {problem}. The loader runs uncached (said once per process).",
            CacheStoreWarning,
        )

    def _compute_and_store(self, root: CacheRoot, fdir: str, call: Call, *, replace: bool) -> R:
        racy_before, newest_racy = self._rules.racy_digests(call)
        self._stats.misses += 1
        logger.info("miss %s [%s]: running the loader", self._identity, call.key[:12])
        if not replace:
            self._log_miss_reason(call)
        started = time.perf_counter()
        result = self.__wrapped__(*call.args, **call.kwargs)
        compute_seconds = time.perf_counter() - started
        after = self._rules.sources_after(call)
        if after is None or self._rules.racy_digests(call)[0] != racy_before:
            warn_at_caller(
                f"cachedload: source files of {self._identity} changed while it ran; "
                "the result is returned but not cached",
                SourceChangedWarning,
            )
            return result
        meta = entry_meta(self._call_meta(call), result, compute_seconds, racy_before, newest_racy)
        skipped = _skipped_images(result)
        if skipped:  # load_image_folder warned (its reasons are not kept in the result)
            meta.update(skipped_fields(dict.fromkeys(skipped)))
        manifest = {name: fp.files for name, (_, fp) in after.items()}
        _warn_if_unsafe(root, result, self._identity)
        started = time.perf_counter()
        try:
            size = root.put(
                fdir,
                call.key,
                result,
                meta,
                compress=self._options.compress,
                manifest=manifest,
                replace=replace,
            )
        except (OSError, UnpicklableResult) as error:
            self._store_failed(call, root.entry_path(fdir, call.key).parent, error)
            return result
        self._stats.stores += 1
        self._remember(call, size)
        now = time.perf_counter()
        logger.info(
            "stored %s [%s]: %s bytes in %.1f ms (computed in %.2f s, fingerprint %.1f ms; "
            "%.2f s in all)",
            self._identity,
            call.key[:12],
            size,
            (now - started) * 1e3,
            compute_seconds,
            call.fingerprint_seconds * 1e3,
            now - call.started,
        )
        if self._options.mmap_mode is not None:
            result = self._load_stored(root, fdir, call, result)
        self._enforce_limits(root, fdir, call.key, meta)
        return result

    def _load_stored(self, root: CacheRoot, fdir: str, call: Call, result: R) -> R:
        """The entry just stored, memory-mapped as a hit returns it (so that a miss and a hit
        return the same kind of arrays); ``result`` if it cannot be read back."""
        path = root.entry_path(fdir, call.key)
        try:
            meta = root.read_meta(fdir, call.key)
            if meta is not None:
                value: R = root.load(
                    fdir, call.key, meta, mmap_mode=self._options.mmap_mode, verify=False
                )
                return value
            error: BaseException = FileNotFoundError(f"{path} vanished")
        except (CorruptEntry, OSError) as failure:
            error = failure
        self._store_failed(call, path.parent, error)
        return result

    def _log_miss_reason(self, call: Call) -> None:
        """Log at INFO how this call differs from the closest stored entry (misses only)."""
        if not logger.isEnabledFor(logging.INFO):
            return
        try:
            found = explain_against_closest(
                self._call_meta(call), call_manifest(call), self._local_function_dirs()
            )
        except Exception as error:  # a diagnostic must never break a load
            logger.debug("cannot explain the miss of %s: %s", self._identity, error)
            return
        if found:
            logger.info(
                "miss %s [%s] vs. stored entry %s: %s",
                self._identity,
                call.key[:12],
                (found.old_key or "?")[:12],
                found.summary(),
            )

    def _enforce_limits(self, root: CacheRoot, fdir: str, key: str, meta: dict[str, Any]) -> None:
        """Delete superseded entries and apply ``max_size`` after a store (errors only log)."""
        max_size = self._options.max_size_bytes
        if max_size is None:
            try:
                max_size = config.max_size_from_env()
            except ConfigurationError as error:
                logger.warning("ignoring %s", error)
        try:
            enforce_after_store(root, fdir, key, meta, keep=self._options.keep, max_size=max_size)
        except OSError as error:
            logger.warning("could not prune %s after a store: %s", root.location, error)

    def _run(self, call: Call, *, force: bool, ahead: ReadAhead | None = None) -> R:
        def compute(root: CacheRoot, fdir: str, replace: bool, _corrupt: bool) -> R:
            return self._compute_and_store(root, fdir, call, replace=replace)

        def uncached() -> R:
            return self.__wrapped__(*call.args, **call.kwargs)

        return self._through_cache(call, compute, uncached, force=force, ahead=ahead)

    def _through_cache(
        self,
        call: Call,
        compute: Callable[[CacheRoot, str, bool, bool], T],
        uncached: Callable[[], T],
        *,
        force: bool,
        ahead: ReadAhead | None = None,
    ) -> T:
        """A call through the cache: look up, else take the single flight, look up again
        (another process may have finished it), else ``compute(root, fdir, replace,
        corrupt)`` (``replace``: an entry is there to overwrite; ``corrupt``: it is damaged).
        ``uncached()`` where the cache cannot be used (no directory, one another user can
        write, no lock). ``force``: no lookup (recompute). ``.map`` runs through here too."""
        try:
            root, fdir = self._root(), self._fdir()
        except (OSError, RuntimeError) as error:
            logger.warning("cannot locate the cache directory: %s", error)
            return uncached()
        untrusted = root.untrusted(fdir)
        if untrusted is not None:
            _warn_untrusted(untrusted)
            self._stats.misses += 1
            return uncached()
        replace, corrupt = True, False
        if not force:
            found = self._lookup(root, fdir, call, ahead)
            if ahead is not None:
                ahead.cancel()  # taken, or of no use now: free its buffer before computing
            if isinstance(found, Hit):
                self._stats.hits += 1
                return found.value  # type: ignore[no-any-return]
            replace, corrupt = found.replace, found.corrupt is not None
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(
                    root.single_flight(
                        fdir, call.key, self._options.lock_timeout, name=self._identity
                    )
                )
            except OSError as error:
                # No lock, so no store either (the directory is unwritable): compute and return.
                self._cannot_lock(root, fdir, call, error)
                self._stats.misses += 1
                return uncached()
            if not force:
                found = self._lookup(root, fdir, call)  # another process may have finished it
                if isinstance(found, Hit):
                    self._stats.hits += 1
                    return found.value  # type: ignore[no-any-return]
                replace = replace or found.replace
                corrupt = corrupt or found.corrupt is not None
            return compute(root, fdir, replace, corrupt)

    # -- the public interface ----------------------------------------------------------------
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Return the loader's result for these arguments, from the cache when possible."""
        if not self.enabled:
            self._stats.misses += 1
            return self.__wrapped__(*self._with_self(args), **kwargs)
        started = time.perf_counter()
        prepared = self._bind(args, kwargs)
        guess = self._read_ahead(prepared.group)  # overlaps the fingerprinting below
        try:
            call = self._rules.finish(prepared)
            call.started = started
            ahead = None
            if guess is not None:
                key, reading = guess
                if key == call.key:
                    ahead = reading
                else:
                    reading.cancel()  # a wrong guess: stop it and free its buffer now
            return self._run(call, force=False, ahead=ahead)
        finally:
            if guess is not None:
                guess[1].cancel()  # after an error (a no-op once taken or cancelled)

    def recompute(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the loader body for these arguments and overwrite the stored entry."""
        if not self.enabled:
            return self(*args, **kwargs)
        return self._run(self._prepare(args, kwargs), force=True)

    def cache_path(self, *args: P.args, **kwargs: P.kwargs) -> Path:
        """The folder where the entry for these arguments is (or would be) stored.

        For a remote cache (``cache_dir="s3://…"``): the entry's local read-through copy, which
        exists once a call on this machine has computed or downloaded it.
        """
        return self._root().entry_path(self._fdir(), self._prepare(args, kwargs).key)

    def is_cached(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """True if a call with these arguments would be answered from the cache now.

        Checks the entry's metadata, its data file's size and any racy source files; does not
        load the data.
        """
        if not self.enabled:
            return False
        call = self._prepare(args, kwargs)
        root, fdir = self._root(), self._fdir()
        try:
            meta = root.read_meta(fdir, call.key)
            if meta is None or not self._racy_files_unchanged(root, fdir, call, meta):
                return False
            return root.has_data(fdir, call.key, meta)  # a remote root also looks in the bucket
        except (CorruptEntry, OSError):
            return False

    @property
    def map(self) -> ItemMap:
        """A per-item loader (``per_item=``) mapped over a folder or a list of files, cached
        and incremental: ``loader.map("data/train", pattern="**/*.jpg", size=(64, 64))``
        returns an ``ItemArray`` (``.array``, ``.paths``); ``loader.map.is_cached(...)``,
        ``.cache_path(...)``, ``.recompute(...)`` and ``.cache_explain(...)`` take the same
        arguments. See :class:`cachedload.per_item.ItemMap`.

        Raises:
            TypeError: the loader was not decorated with ``per_item=``.
        """
        if self._options.per_item is None:
            raise TypeError(f"{self._identity} is not a per-item loader (see per_item=)")
        return ItemMap(self)

    def _function_dirs(self, root: CacheRoot) -> list[str]:
        """This loader's function folders in ``root`` (every code version)."""
        prefix = function_dir_prefix(self._identity)
        return [fdir for fdir in root.function_dirs() if fdir.startswith(prefix)]

    def _listed(self) -> tuple[CacheRoot, list[str]]:
        """This machine's part of the cache and this loader's function folders in it; none
        (warned as a call warns) in a cache another user could write, or cannot be listed."""
        root = self._root()
        problem = root.untrusted(self._fdir())
        if problem is not None:
            _warn_untrusted(problem)
            return root.local, []
        try:
            return root.local, self._function_dirs(root.local)
        except OSError as error:  # e.g. a shared cache this user cannot read
            logger.info("cannot list %s: %s", root.local.location, error)
            return root.local, []

    def _local_function_dirs(self) -> list[Path]:
        """This loader's function folders on this machine (a remote cache's: its copy's)."""
        local = self._root().local
        return [local.folder(fdir) for fdir in self._function_dirs(local)]

    def entries(self) -> list[EntryRecord]:
        """This loader's stored entries (every code version), newest first.

        Each :class:`~cachedload.manage.EntryRecord` has the readable parameters, the sources
        with their file counts, the result summary, size on disk, created, last used and hits
        (see :func:`cachedload.list_entries`).
        """
        local, fdirs = self._listed()
        return records_of(local, fdirs)

    def cache_explain(self, *args: P.args, **kwargs: P.kwargs) -> Explanation:
        """Why a call with these arguments would miss: how its key differs from the closest
        stored entry of this loader, component by component.

        ``str()`` of the result is a readable report: code changed, parameter ``size``
        ``(128, 128) → (64, 64)``, source ``image_dir``: 3 files added, 1 modified (with the
        first few names)… When there is nothing to compare (no entry stored yet, or the call
        would hit), the explanation is empty and its ``note`` says so.

        Example::

            print(load_images.cache_explain("data/train", size=(64, 64)))
        """
        call = self._prepare(args, kwargs)
        root, fdir = self._root(), self._fdir()
        try:
            stored = root.read_meta(fdir, call.key)
            if stored is not None and self._racy_files_unchanged(root, fdir, call, stored):
                note = "an entry for these arguments is stored: the call would be a hit"
                rebuilt = self._why_rebuilt(root, fdir, call.key, stored)
                return Explanation(self._identity, new_key=call.key, note=note + rebuilt)
        except CorruptEntry as error:
            note = f"the entry for these arguments is damaged ({error.reason}); will recompute"
            return Explanation(self._identity, new_key=call.key, note=note)
        found = explain_against_closest(
            self._call_meta(call), call_manifest(call), self._local_function_dirs()
        )
        if found is None:
            note = "no entry of this loader is stored yet"
            return Explanation(self._identity, new_key=call.key, note=note)
        return found

    def _why_rebuilt(self, root: CacheRoot, fdir: str, key: str, meta: dict[str, Any]) -> str:
        """``"; it replaced entry …: <differences>"`` if the entry stored at ``key`` replaced
        one that ``keep=`` deleted (its record says how they differ), else ``""``."""
        local = root.local
        replaced = last_superseded(local.folder(fdir), meta.get("group"))
        if replaced is None:
            return ""
        try:
            manifest = local.manifest(fdir, key, meta)
        except CorruptEntry:  # damaged: its files are not named
            manifest = None
        found = compare_with_superseded(replaced, meta, manifest)
        return f"; it replaced entry {replaced.key[:12]} (deleted by keep=): {found.summary()}"

    def cache_info(self) -> CacheInfo:
        """Hits, misses and stores in this process; entries and bytes on disk (all code
        versions of this loader)."""
        local, fdirs = self._listed()
        entries = [entry for d in fdirs for entry in local.entries(d)]
        return CacheInfo(
            hits=self._stats.hits,
            misses=self._stats.misses,
            stores=self._stats.stores,
            entries=len(entries),
            size_bytes=sum(entry.size_bytes for entry in entries),
        )

    def cache_clear(self) -> None:
        """Delete every stored entry of this loader (all code versions) and reset statistics.

        For a remote cache: in the bucket (for every machine) and in the local copy.
        """
        root = self._root()
        for where in dict.fromkeys([root, root.local]):  # a local root is its own local part
            for fdir in self._function_dirs(where):
                for entry in list(where.entries(fdir)):
                    where.remove(fdir, entry.key)
                where.remove_leftovers(fdir)
        self._stats.hits = self._stats.misses = self._stats.stores = 0

    # -- one entry, found by its folder (the framework adapters) --------------------------------
    @property
    def options(self) -> Options:
        """The options this loader was decorated with (a frozen dataclass: read-only)."""
        return self._options

    def load_entry(self, path: str | os.PathLike[str]) -> R:
        """The result stored in the entry folder ``path``, without looking at the sources.

        ``path`` is a folder :meth:`cache_path` returned (for a memory-mapped result, the
        folder its file is in). A process that was handed an entry's path opens that very
        entry, even if the sources changed meanwhile, where a call would look for a new one.
        Loaded as a hit is (``mmap_mode``, size check), not counted as one.

        Raises:
            FileNotFoundError: no entry of this loader is there (deleted since, e.g. by
                ``keep=``, or never stored).
            OSError: the entry is damaged.
        """
        entry = Path(os.path.abspath(path))
        fdir, key = entry.parent.name, entry.name
        root = self._root()  # a remote cache's entry: its local copy, downloaded if need be
        meta = None
        try:
            if fdir.startswith(function_dir_prefix(self._identity)) and entry == Path(
                os.path.abspath(root.entry_path(fdir, key))
            ):
                meta = root.read_meta(fdir, key)
            if meta is not None:
                value: R = root.load(
                    fdir, key, meta, mmap_mode=self._options.mmap_mode, verify=False
                )
                return value
        except CorruptEntry as error:
            raise OSError(f"damaged cache entry {path}: {error.reason}") from None
        raise FileNotFoundError(errno.ENOENT, f"no entry of {self._identity} there", str(path))


class _PerItemDataset(CachedDataset[P, R]):
    """The wrapper of a per-item loader (``per_item=``): called directly, it runs the loader
    on one item, uncached; :attr:`map` runs it over a folder, cached."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The loader's result for one item (not cached: the cache holds whole folders)."""
        return self.__wrapped__(*self._with_self(args), **kwargs)


_WARNED_UNTRUSTED: set[str] = set()
#: Cache directories found unusable (a file in the way), warned about once per process.
_WARNED_UNUSABLE: set[Path] = set()


def _warn_untrusted(problem: str) -> None:
    """Warn once per process and problem that a cache directory is not used."""
    if problem in _WARNED_UNTRUSTED:
        return
    _WARNED_UNTRUSTED.add(problem)
    warn_at_caller(
        f"cachedload: not using the cache: {problem}; another user could make this process run "
        "their code. The loader runs and nothing is stored. Use a cache directory only you can "
        "write (chmod go-w, or a new cache_dir=), or declare it shared=True.",
        UnsafeCacheWarning,
    )


def _warn_if_unsafe(root: CacheRoot, result: Any, identity: str) -> None:
    """Warn at store time if a shared cache's readers would refuse this result."""
    local = root.local
    if local.safe_types is None or local.signing_key is not None:
        return  # trusted entries, or signed ones: anything picklable loads
    try:
        check_safe(result, safe_types=local.safe_types)
    except UnsafePickleError as error:
        warn_at_caller(
            f"cachedload: the result of {identity} is stored in a shared cache, but loading it "
            f"would be refused ({error.name}: {error.reason}), so every call recomputes it. "
            "Pass its classes in safe_types=[...], or set signing_key= "
            "($CACHEDLOAD_SIGNING_KEY) for the cache's writers.",
            CacheStoreWarning,
        )
    except Exception as error:  # unpicklable: storing reports it
        logger.debug("cannot check %s for a restricted load: %s", identity, error)


def _skipped_images(result: Any) -> list[str]:
    """The images ``load_image_folder(on_error="skip")`` left out of ``result``: of an
    ``ImageFolderData`` that is the result or one of its top-level items (tuple, list, dict)."""
    images = sys.modules.get("cachedload.images")
    if images is None:  # never imported: no result holds an ImageFolderData
        return []
    kind = images.ImageFolderData
    if isinstance(result, kind):
        parts: list[Any] = [result]
    elif isinstance(result, (tuple, list)):
        parts = list(result)
    elif isinstance(result, dict):
        parts = list(result.values())
    else:
        return []
    return [path for part in parts if isinstance(part, kind) for path in part.skipped]


@overload
def cached_dataset(func: Callable[P, R], /) -> CachedDataset[P, R]: ...


@overload
def cached_dataset(
    *,
    source: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    per_item: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mmap_mode: Literal["r", "c"] | None = None,
    compress: bool | int | str | tuple[str, int] = False,
    fingerprint: Literal["mtime", "content"] = "mtime",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    version: Any = None,
    depends_on: Sequence[Callable[..., Any]] = (),
    verify: Literal["size", "always"] = "size",
    lock_timeout: float | None = None,
    portable: bool = False,
    keep: int | None = 1,
    max_size: int | str | None = None,
    enabled: bool = True,
    storage_options: dict[str, Any] | None = None,
    local_cache_dir: str | os.PathLike[str] | None = None,
    shared: bool = False,
    safe_types: Sequence[type] = (),
    signing_key: str | bytes | None = None,
) -> Callable[[Callable[P, R]], CachedDataset[P, R]]: ...


def cached_dataset(
    func: Callable[P, R] | None = None, /, **options: Any
) -> CachedDataset[P, R] | Callable[[Callable[P, R]], CachedDataset[P, R]]:
    """Cache a dataset loader's results on disk, keyed by its inputs' fingerprints.

    Use bare (``@cached_dataset``) or with keyword options (``@cached_dataset(mmap_mode="r")``).
    The first call runs the loader and stores its result with joblib; every later call with the
    same inputs — in this process or any later one — restores it instead. The key covers:

    * each **source**: the parameters named by ``source=``, or by default every
      ``os.PathLike`` argument and every string in a parameter whose name (``image_dir``,
      ``csv_path``…) or annotation (``Path``, ``str | Path``…) says path; other strings are
      parameters, whatever they name on disk. A missing source raises ``SourceNotFoundError``
      before the body runs; ``/`` and the home directory are walked only when ``source=``
      names them (``ConfigurationError`` otherwise). A directory is fingerprinted
      by the relative path, size and mtime of every file below it (``fingerprint="content"``:
      by their bytes), so adding, removing, renaming, touching or rewriting a file recomputes;
    * every other **parameter**, bound to the signature with defaults applied;
    * the loader's **code** (parsed source, so comments and formatting do not count), the code
      of the functions in ``depends_on`` and the user's ``version``;
    * the loader's **state** at each call: the plain data (numbers, strings, arrays, containers
      of them…) in the closure cells and module globals its code reads and does not change, the
      object of a bound method or callable object, a partial's arguments (see the docs, "How
      invalidation works").

    Args:
        source: parameter name(s) holding source paths (default: detected, see above).
        ignore: parameter name(s) left out of the key (``verbose``, ``n_jobs``…).
        per_item: the parameter of a loader that reads one file (``per_item="path"``).
            Calling the wrapper then runs the loader on one file, uncached;
            ``loader.map(folder, pattern="**/*.jpg", **params)`` maps it over a folder's
            files and caches the stacked rows, rebuilding only the rows of added and changed
            files when the folder changes (see the docs, "Large and changing datasets").
        cache_dir: where entries live (a folder, ``file:///abs/path`` or a URL); default
            ``$CACHEDLOAD_DIR`` or the user cache dir. A URL
            (``"s3://bucket/prefix"``, or any fsspec URL) names a cache shared by several
            machines: one computes an entry, the others wait, then download it once each into
            a local read-through copy (see the docs, "Sharing a cache across machines").
        mmap_mode: ``"r"`` returns read-only memory maps of stored arrays (near-instant hits
            whatever their size), ``"c"`` copy-on-write maps (editable in memory, never
            written back). A miss returns the maps of the entry it just stored, so every call
            returns the same kind of arrays. ``"r+"`` is rejected: an in-place edit would
            rewrite the stored entry.
        compress: passed to ``joblib.dump`` (off by default; compressed entries cannot be
            memory-mapped: with ``mmap_mode`` it is a ``ConfigurationError``).
        fingerprint: ``"mtime"`` (one stat per file) or ``"content"`` (hash every file's bytes).
        include: glob patterns; only matching files count as part of a source.
        exclude: glob patterns of files and folders that never count (default: OS junk such
            as ``.DS_Store``, ``Thumbs.db``, ``__pycache__``, ``.ipynb_checkpoints``).
        version: any value; change it to invalidate the loader's entries by hand.
        depends_on: helper functions whose code is part of the key.
        verify: ``"size"`` (default) checks the data file's size on every hit;
            ``"always"`` also its checksum (reads the whole file).
        lock_timeout: seconds to wait for another process computing the same entry before
            computing locally (default: wait as long as that process lives).
        portable: key sources by fingerprint only, not by absolute path. With
            ``fingerprint="content"``, copies of a dataset at different paths — on other
            machines sharing a cache, or restored from an archive with new mtimes — then share
            their entries.
        keep: how many entries to keep per function, parameters and source paths whose source
            files differ (default 1: storing a result for changed files deletes the entries for
            their older contents); ``None`` keeps them all.
        max_size: bound on the whole cache directory, bytes or a string like ``"20GB"``
            (default ``$CACHEDLOAD_MAX_SIZE``, else unbounded). After each store, the
            least-recently-used entries are evicted until the cache fits.
        enabled: ``False`` calls the loader directly, with the same interface.
        storage_options: for a URL ``cache_dir``: credentials, endpoint… as for s3fs, e.g.
            ``{"endpoint_url": "http://127.0.0.1:8333", "key": "…", "secret": "…"}``
            (default ``$CACHEDLOAD_STORAGE_OPTIONS``; the usual ``AWS_*`` variables work).
        local_cache_dir: for a URL ``cache_dir``: where entries are copied to be loaded (and
            memory-mapped); default ``remote/<bucket-prefix>`` in the local cache directory.
        shared: declare a local ``cache_dir`` shared with other users (a group-writable
            mount): its entries are loaded without running code their writer chose (the
            restricted unpickler; an ``s3://`` cache always is), and it keeps group
            permissions. Otherwise a cache directory another user could write is not used.
        safe_types: classes (dataclasses, named tuples) that entries of a shared cache may
            hold besides arrays, numbers, strings and containers.
        signing_key: for a shared cache, sign entries with this key (HMAC-SHA256) and accept
            only entries signed with it, which may hold any picklable object (default
            ``$CACHEDLOAD_SIGNING_KEY``). See the docs, "Security".

    Returns:
        A :class:`CachedDataset` wrapping the loader.

    Raises:
        ConfigurationError: an option is invalid (at decoration time).

    Example::

        @cached_dataset(mmap_mode="r")
        def load_images(image_dir, size=(128, 128)):
            ...
            return X, y

        X, y = load_images("data/train")   # slow the first time, milliseconds afterwards
    """
    checked = options_for("cached_dataset", options)  # once, however many loaders it decorates
    if func is None:
        return lambda f: CachedDataset(f, checked)
    if not callable(func):
        raise ConfigurationError("func", f"cached_dataset decorates a function, not {func!r}")
    return CachedDataset(func, checked)
