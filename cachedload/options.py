"""The options of :func:`cachedload.cached_dataset`, stored and checked once.

:class:`Options` is a frozen dataclass with one field per option of ``cached_dataset``, same
name, type and default (a test compares them with the typed overload of ``cached_dataset``, the
one other place they are written out). ``__post_init__`` checks every option, raising a
:class:`~cachedload.errors.ConfigurationError` that names it, so a wrapper, its pickled copy in a
worker and every ``dataclasses.replace`` copy hold valid options. The one check that needs the
loader, that ``source=`` and ``ignore=`` name its parameters, is :meth:`Options.check_names`.

Imports from cachedload only :mod:`cachedload.errors`, :mod:`cachedload.config` (cache
directories, sizes) and :mod:`cachedload.fingerprint` (the fingerprint modes).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cachedload import config
from cachedload.errors import ConfigurationError
from cachedload.fingerprint import check_mode

__all__ = ["Options", "check_keep", "options_for", "parse_names"]


def parse_names(option: str, value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A parameter name or a list of them, as a tuple (``ConfigurationError`` otherwise)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ConfigurationError(option, f"expected a name or a list of names, got {value!r}")
    return items


def check_keep(keep: object) -> None:
    """Check a ``keep=`` value (the decorator's and :func:`cachedload.manage.prune`'s).

    Raises:
        ConfigurationError: it is not a whole number >= 1 or None.
    """
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ConfigurationError("keep", f"must be a whole number >= 1 or None, not {keep!r}")


@dataclass(frozen=True, kw_only=True)
class Options:
    """Every option of :func:`cachedload.cached_dataset` (see it for what each one does),
    checked when made.

    Frozen: ``dataclasses.replace(options, keep=3)`` is a checked copy. Pickled as given and
    checked again where it is unpickled (a worker expands ``~`` and looks for a URL's package
    on its own machine). The fields after ``local_cache_dir`` are not options: values derived
    from them once, in the form the wrapper uses.

    Raises:
        ConfigurationError: an option is invalid (the error names it).
    """

    source: str | Sequence[str] | None = None
    ignore: str | Sequence[str] | None = None
    per_item: str | None = None
    cache_dir: str | os.PathLike[str] | None = None
    mmap_mode: Literal["r", "c"] | None = None
    compress: bool | int | str | tuple[str, int] = False
    fingerprint: Literal["mtime", "content"] = "mtime"
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    version: Any = None
    depends_on: Sequence[Callable[..., Any]] = ()
    verify: Literal["size", "always"] = "size"
    lock_timeout: float | None = None
    portable: bool = False
    keep: int | None = 1
    max_size: int | str | None = None
    enabled: bool = True
    storage_options: dict[str, Any] | None = None
    local_cache_dir: str | os.PathLike[str] | None = None
    shared: bool = False
    safe_types: Sequence[type] = ()
    signing_key: str | bytes | None = None

    #: ``source=`` as a tuple of names; None: sources are detected.
    source_names: tuple[str, ...] | None = field(init=False, repr=False, compare=False)
    #: ``ignore=`` as a set of names.
    ignore_names: frozenset[str] = field(init=False, repr=False, compare=False)
    #: ``cache_dir=`` checked: a remote cache's URL or a local folder; None if not given
    #: (``$CACHEDLOAD_DIR`` or the platform's cache directory, read at each call).
    cache_location: str | Path | None = field(init=False, repr=False, compare=False)

    #: ``signing_key=`` as bytes; None if not given (``$CACHEDLOAD_SIGNING_KEY``, read with
    #: the cache root).
    def key_bytes(self) -> bytes | None:
        """``signing_key=`` as bytes (a str's UTF-8), or None."""
        key = self.signing_key
        return key.encode() if isinstance(key, str) else key

    #: ``max_size=`` in bytes; None if not given (``$CACHEDLOAD_MAX_SIZE``, read at each store).
    max_size_bytes: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        derive = object.__setattr__  # frozen: the derived fields are set once, here
        derive(self, "source_names", _names_or_none("source", self.source))
        derive(self, "ignore_names", frozenset(parse_names("ignore", self.ignore)))
        if self.per_item is not None and (not isinstance(self.per_item, str) or not self.per_item):
            raise ConfigurationError(
                "per_item", f"must be a parameter name or None, not {self.per_item!r}"
            )
        if self.mmap_mode not in (None, "r", "c"):
            # Not "r+": an in-place edit of a result would rewrite the stored entry.
            raise ConfigurationError(
                "mmap_mode",
                f"must be None, 'r' (read-only maps) or 'c' (copy-on-write maps), "
                f"not {self.mmap_mode!r}",
            )
        _check_compress(self.compress)
        if self.mmap_mode is not None and _compressed(self.compress):
            # joblib would load such an entry into memory, warning at every call: the arrays
            # would be writable copies, not the read-only maps mmap_mode promises.
            raise ConfigurationError(
                "compress",
                f"compress={self.compress!r} and mmap_mode={self.mmap_mode!r} cannot be "
                f"combined: a compressed result cannot be memory-mapped; drop compress= to map "
                f"the result, or mmap_mode= to keep it compressed",
            )
        for option in ("include", "exclude"):
            derive(self, option, _patterns(option, getattr(self, option)))
        check_mode(self.fingerprint, "fingerprint")
        if self.verify not in ("size", "always"):
            raise ConfigurationError("verify", f"must be 'size' or 'always', not {self.verify!r}")
        timeout = self.lock_timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
        ):
            raise ConfigurationError(
                "lock_timeout", f"must be a number of seconds >= 0 or None, not {timeout!r}"
            )
        check_keep(self.keep)
        max_size = self.max_size
        derive(self, "max_size_bytes", None if max_size is None else config.parse_size(max_size))
        # A URL (s3://…) is a remote cache read through a local copy; see cachedload.backends.
        cache_dir = self.cache_dir
        checked = None if cache_dir is None else config.check_cache_dir(cache_dir, "cache_dir")
        derive(self, "cache_location", checked)
        if self.storage_options is not None:
            try:  # a copy: the caller's dict may change later
                derive(self, "storage_options", dict(self.storage_options))
            except (TypeError, ValueError):
                raise ConfigurationError(
                    "storage_options", f"must be a dict or None, not {self.storage_options!r}"
                ) from None
        derive(self, "depends_on", tuple(self.depends_on))
        self._check_security(derive)

    def _check_security(self, derive: Callable[..., None]) -> None:
        if not isinstance(self.shared, bool):
            raise ConfigurationError("shared", f"must be True or False, not {self.shared!r}")
        given: Any = self.safe_types
        safe_types = tuple(given) if isinstance(given, (list, tuple, set, frozenset)) else (given,)
        for cls in safe_types:
            if not isinstance(cls, type) or "<locals>" in cls.__qualname__:
                raise ConfigurationError(
                    "safe_types", f"expected classes defined at module level, got {cls!r}"
                )
        derive(self, "safe_types", safe_types)
        key = self.signing_key
        if key is not None and (not isinstance(key, (str, bytes)) or not key):
            raise ConfigurationError("signing_key", "must be a non-empty str or bytes, or None")

    def check_names(self, parameters: Collection[str], bound: Collection[str], loader: str) -> None:
        """Check that ``source=``, ``ignore=`` and ``per_item=`` name parameters of the loader.

        Args:
            parameters: the loader's parameter names.
            bound: the labels of what a bound method or partial carries (its ``self``, a
                partial's arguments), which ``ignore=`` may name too.
            loader: the loader's name, for the error.

        Raises:
            ConfigurationError: a name is not among them (the error names the option).
        """
        for option, names, known in (
            ("source", self.source_names or (), set(parameters)),
            ("ignore", parse_names("ignore", self.ignore), {*parameters, *bound}),
            ("per_item", parse_names("per_item", self.per_item), set(parameters)),
        ):
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ConfigurationError(option, f"{unknown} not among {loader}'s parameters")

    def given(self) -> dict[str, Any]:
        """The options as keyword arguments (``Options(**options.given()) == options``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_options, (self.given(),))


def options_for(
    caller: str, given: dict[str, Any], *, takes: Collection[str] = (), **fixed: Any
) -> Options:
    """:class:`Options` from the keyword arguments a user passed to ``caller`` (plus the
    ``fixed`` ones ``caller`` sets itself; ``takes``: the keywords ``caller`` takes besides
    the cache options, named by the error too).

    Raises:
        TypeError: a name is not an option of ``caller`` (the error names ``caller`` and every
            keyword it takes, not ``Options.__init__``'s).
        ConfigurationError: an option is invalid.
    """
    names = {f.name for f in dataclasses.fields(Options) if f.init} - set(fixed)
    unknown = sorted(set(given) - names)
    if unknown:
        import difflib  # only for the error

        keywords = sorted(names | set(takes))
        close = difflib.get_close_matches(unknown[0], keywords, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {unknown[0]!r}{hint}; it takes: "
            f"{', '.join(keywords)}"
        )
    return Options(**fixed, **given)


def _options(given: dict[str, Any]) -> Options:
    """Rebuild pickled :class:`Options` (checked again)."""
    return Options(**given)


def _patterns(option: str, value: object) -> tuple[str, ...] | None:
    """``include=``/``exclude=`` as a tuple of glob patterns (one pattern: a str), or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    patterns: tuple[object, ...] | None = None
    if isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        patterns = tuple(value)
    if patterns is None or not all(isinstance(pattern, str) for pattern in patterns):
        raise ConfigurationError(
            option, f"must be a glob pattern or a list of them, or None, not {value!r}"
        )
    checked = tuple(str(pattern) for pattern in patterns)
    return tuple(sorted(checked)) if isinstance(value, (set, frozenset)) else checked


def _check_compress(compress: object) -> None:
    """Refuse a ``compress=`` that joblib would refuse at the first store (checked as
    ``joblib.dump`` checks it, against the compressors registered with joblib)."""
    if isinstance(compress, bool):
        return
    method, level = "zlib", compress
    if isinstance(compress, str):
        method, level = compress, 0
    elif isinstance(compress, tuple) and len(compress) == 2:
        method, level = compress
    methods = _compressors()
    valid_level = isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 9
    if method not in methods or not valid_level:
        raise ConfigurationError(
            "compress",
            f"must be False, True, a level from 0 to 9, a method ({', '.join(methods)}) or a "
            f"(method, level) pair, not {compress!r}",
        )
    if method == "lz4" and importlib.util.find_spec("lz4") is None:
        raise ConfigurationError("compress", "'lz4' needs the lz4 package (pip install lz4)")


def _compressors() -> list[str]:
    """The compression methods joblib knows (``joblib.register_compressor`` adds some)."""
    try:
        from joblib.compressor import _COMPRESSORS

        return sorted(_COMPRESSORS)
    except ImportError:  # a joblib that keeps them elsewhere: its built-in ones
        return ["bz2", "gzip", "lz4", "lzma", "xz", "zlib"]


def _compressed(compress: object) -> bool:
    """Whether joblib compresses with this ``compress=`` (0, False and level 0 do not)."""
    if isinstance(compress, tuple) and len(compress) == 2:
        return bool(compress[1])
    return bool(compress)


def _names_or_none(option: str, value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else parse_names(option, value)
