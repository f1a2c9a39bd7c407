"""One call of a cached loader: its arguments split into sources and parameters, and its key.

:class:`KeyRules` holds the decorator options that decide what a key covers; ``bind`` turns a
call's arguments into a :class:`Call` (fingerprinted sources, hashed parameters, the key). The
checks around the loader body (racy source files, sources changing while it runs) and the
metadata describing a call live here too, so that the decorator only orchestrates.
"""

from __future__ import annotations

import functools
import inspect
import os
import platform
import re
import reprlib
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cachedload._version import __version__
from cachedload.entry import FORMAT_VERSION
from cachedload.errors import ConfigurationError, SourceNotFoundError, UnhashableArgumentError
from cachedload.fingerprint import (
    DEFAULT_EXCLUDE,
    RACY_WINDOW_NS,
    Fingerprint,
    fingerprint_source,
    hash_file,
    hash_regular_file,
)
from cachedload.hashing import UnhashableError, value_digest
from cachedload.options import Options

__all__ = [
    "Call",
    "KeyRules",
    "Prepared",
    "call_manifest",
    "entry_meta",
    "racy_files_unchanged",
    "racy_records_expired",
    "readable",
    "says_path",
    "summarize",
]

# A parameter's name says path when one of its words (split at "_", digits and camelCase) is
# one of these, or ends with one of the suffixes (``imagedir``, ``datapath``, ``trainroot``).
# Words, not substrings: ``direction``, ``profile`` and ``resource`` are not paths.
_PATH_WORDS = frozenset(
    {
        *("dir", "dirs", "directory", "directories", "dirname"),
        *("path", "paths", "pathname", "filepath", "filepaths"),
        *("file", "files", "filename", "filenames", "fname", "fnames"),
        *("folder", "folders", "root", "roots", "src", "source", "sources", "csv"),
    }
)
_PATH_SUFFIXES = ("dir", "dirs", "path", "paths", "folder", "folders", "root", "file", "files")
_NOT_PATH_WORDS = frozenset({"profile", "profiles", "nadir"})
_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
# An annotation says path when it names a class ending in "Path" (Path, PurePath, StrPath…) or
# PathLike, however it is written: a class, ``str | Path``, ``Optional[Path]``, ``list[Path]``,
# or the same as text (``from __future__ import annotations``), which is matched, never evaluated.
_PATHISH_ANNOTATION = re.compile(r"(?<![\w])\w*Path(?:Like)?(?![\w])")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120


class _SourceArgument(NamedTuple):
    """A source argument, bound but not yet fingerprinted."""

    name: str  # the loader's parameter
    value: Any  # the path as passed
    paths: tuple[str, str]  # absolute path, real path


@dataclass(frozen=True)
class CallGroup:
    """What a group of calls shares: function, code, parameters and source *paths*, but not
    the sources' fingerprints. Entries of one group differ only in source contents."""

    token: tuple[Any, ...]  # hashable, cheap: for in-memory lookups

    @functools.cached_property
    def digest(self) -> str:
        """The group as stored in metadata (computed on first use: it costs a hash)."""
        identity, code, parameters, paths, *state = self.token
        return value_digest((identity, code, list(parameters), list(paths), *map(list, state)))


@dataclass
class Call:
    """Everything known about one call before the body runs."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: str
    group: CallGroup  # what the call shares with others differing only in source contents
    parameters: dict[str, tuple[str, str]]  # name -> (digest, readable text)
    sources: dict[str, tuple[str, Fingerprint]]  # name -> (absolute path, fingerprint)
    # name -> the absolute path as given, before symlinks were resolved into ``sources``
    given_paths: dict[str, str] = field(default_factory=dict)
    fingerprint_seconds: float = 0.0  # how long fingerprinting the sources took
    # time.perf_counter() when the call began (its binding), so that logs time all of it
    started: float = 0.0
    # the loader's state (cachedload.state): label -> (digest, readable text)
    state: dict[str, tuple[str, str]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    # what the user called, as warnings name it (``cached_image_folder('/data')``); empty:
    # the loader's identity
    shown_as: str = ""


class Prepared(NamedTuple):
    """A call bound and classified, its source paths resolved but not yet fingerprinted
    (:meth:`KeyRules.prepare`)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    code_version: str
    parameters: dict[str, tuple[str, str]]  # name -> (digest, readable text)
    pending: dict[str, _SourceArgument]  # label -> source argument
    state: dict[str, tuple[str, Any]]  # label -> (digest, value)
    state_digests: tuple[tuple[str, str], ...]  # sorted (label, digest)
    group: CallGroup


def readable(value: Any) -> str:
    """Short human-readable text of a parameter value, for metadata and explanations."""
    if isinstance(value, type):  # a class's "shape" would be a descriptor (np.float32)
        return f"{value.__module__}.{value.__qualname__}"
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if isinstance(shape, tuple) and dtype is not None:
        return f"{type(value).__name__}(shape={tuple(shape)}, dtype={dtype})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return _REPR.repr(value)


def summarize(value: Any, depth: int = 0) -> str:
    """Short description of a result: type, and shape/dtype of arrays, for metadata."""
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and getattr(value, "dtype", None) is not None:
        return f"{type(value).__name__}(shape={tuple(shape)}, dtype={value.dtype})"
    if depth < 2 and isinstance(value, (tuple, list)) and len(value) <= 8:
        inner = ", ".join(summarize(item, depth + 1) for item in value)
        return f"{type(value).__name__}({inner})"
    if depth < 2 and isinstance(value, dict) and len(value) <= 8:
        inner = ", ".join(f"{k!r}: {summarize(v, depth + 1)}" for k, v in value.items())
        return f"dict({inner})"
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__}(len={len(value)})"
    return type(value).__name__


def call_manifest(call: Call) -> dict[str, Any]:
    """The files of a call's sources, shaped like an entry's manifest (for explanations)."""
    return {name: fp.files for name, (_, fp) in call.sources.items()}


def _source_file(root: str, relpath: str) -> str:
    return os.path.join(root, relpath) if os.path.isdir(root) else root


def racy_files_unchanged(call: Call, meta: dict[str, Any]) -> bool:
    """True unless a source file recorded as racy in an entry has different content now."""
    racy: dict[str, dict[str, str]] = meta.get("racy") or {}
    for name, files in racy.items():
        if name not in call.sources:
            return False
        root = call.sources[name][0]
        for relpath, digest in files.items():
            try:
                # Sources are the user's files: a symlink among them is followed, as the walk
                # follows it (the file must still be regular: a FIFO would block).
                path = _source_file(root, relpath)
                if hash_regular_file(path, follow_symlinks=True) != digest:
                    return False
            except OSError:
                return False
    return True


def racy_records_expired(meta: dict[str, Any]) -> bool:
    """True once every racy file's mtime tick is long past (then any rewrite changes its
    mtime, and the content records have done their job for good)."""
    if not meta.get("racy"):
        return False
    return time.time_ns() - RACY_WINDOW_NS > int(meta.get("racy_newest_mtime_ns", 0))


def says_path(parameter: inspect.Parameter) -> bool:
    """Does a parameter's name or annotation say that a string passed to it is a path?

    A word of its name is ``dir``, ``path``, ``file``, ``folder``, ``root``, ``src``, ``source``,
    ``csv`` (or a plural, ``directory``, ``filename``…), or ends with ``dir``, ``path``,
    ``folder``, ``root`` or ``file`` (``image_dir``, ``csvPath``, ``train_root``, ``imagedir``;
    not ``direction``, ``profile`` or ``resource``), or its annotation names
    ``Path``, ``os.PathLike`` or another class ending in ``Path`` (``str | Path``,
    ``Optional[Path]``, ``list[Path]``, also as text under ``from __future__ import annotations``).
    """
    return _name_says_path(parameter.name) or _annotation_says_path(parameter.annotation)


@functools.lru_cache(maxsize=1024)
def _name_says_path(name: str) -> bool:
    for word in _WORDS.findall(name):
        word = word.lower()
        if word in _PATH_WORDS or (word.endswith(_PATH_SUFFIXES) and word not in _NOT_PATH_WORDS):
            return True
    return False


def _annotation_says_path(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    try:
        return _annotation_text_says_path(annotation)
    except TypeError:  # an unhashable annotation object: not memoised
        return _annotation_text_says_path.__wrapped__(annotation)


@functools.lru_cache(maxsize=256)
def _annotation_text_says_path(annotation: Any) -> bool:
    if isinstance(annotation, str):
        text = annotation
    elif isinstance(annotation, type):
        text = annotation.__qualname__
    else:  # str | pathlib.Path, typing.Optional[pathlib.Path], os.PathLike[str], list[Path]…
        text = repr(annotation)
    return _PATHISH_ANNOTATION.search(text) is not None


def _is_path(value: Any, says_path: bool) -> bool:
    if isinstance(value, os.PathLike):
        return True
    return says_path and isinstance(value, str) and bool(value)


def _is_broad(path: str, real: str) -> str | None:
    """``"the root of the file system"`` or ``"the home directory"`` if a source path is one
    of them (never walked unless ``source=`` names it), else None."""
    if os.path.dirname(real) == real or os.path.dirname(path) == path:
        return "the root of the file system"
    home = os.path.expanduser("~")
    if home != "~" and real in (os.path.abspath(home), _real_home(home)):
        return "the home directory"
    return None


@functools.lru_cache(maxsize=4)
def _real_home(home: str) -> str:
    return os.path.realpath(home)


@dataclass(frozen=True)
class KeyRules:
    """What a loader's cache key covers: the decorator options that shape it."""

    identity: str
    source: tuple[str, ...] | None
    ignore: frozenset[str]
    mode: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    portable: bool

    @classmethod
    def from_options(cls, identity: str, options: Options) -> KeyRules:
        """The rules of the loader ``identity`` decorated with ``options``."""
        return cls(
            identity=identity,
            source=options.source_names,
            ignore=options.ignore_names,
            mode=options.fingerprint,
            include=tuple(options.include or ()),
            exclude=DEFAULT_EXCLUDE if options.exclude is None else tuple(options.exclude),
            portable=options.portable,
        )

    def is_source(self, name: str, value: Any, named_path: bool | None = None) -> bool:
        """Is this argument a source path (named by ``source=``, or detected)?

        Detected: an ``os.PathLike``; a non-empty string in a parameter whose name or
        annotation says path (``named_path``, default: from the name alone, see
        :func:`says_path`); or a non-empty list or tuple of those (each item is then a
        source). A string in any other parameter is a parameter, whatever it names on disk.
        """
        if self.source is not None:
            return name in self.source and value is not None
        if named_path is None:
            named_path = _name_says_path(name)
        if isinstance(value, (list, tuple)):
            return bool(value) and all(_is_path(item, named_path) for item in value)
        return _is_path(value, named_path)

    @staticmethod
    def _paths(name: str, value: Any) -> tuple[str, str]:
        """A source argument's absolute path and its real path (symlinks resolved).

        Raises:
            SourceNotFoundError: nothing is there (checked here, in argument order, before
                any later parameter is hashed).
        """
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigurationError(
                "source", f"parameter {name!r} is not a path: {readable(value)}"
            )
        path = os.path.abspath(os.fspath(value))
        try:
            # strict: the lstat of each component that realpath makes anyway says whether the
            # path exists (no extra stat on the hit path).
            return path, os.path.realpath(path, strict=True)
        except FileNotFoundError:
            raise SourceNotFoundError(name, value) from None
        except OSError:  # a symlink loop, a permission: fingerprinting reports it by name
            return path, os.path.realpath(path)

    def _source(self, name: str, value: Any) -> _SourceArgument:
        """A source argument with its paths, refusing ``/`` and the home directory unless
        ``source=`` names the parameter."""
        paths = self._paths(name, value)
        broad = None if self.source is not None else _is_broad(*paths)
        if broad is not None:
            raise ConfigurationError(
                "source",
                f"parameter {name!r} is {broad} ({os.fspath(value)!r}); cachedload does not "
                f"fingerprint it unless asked: pass source={[name]!r} if you really mean it",
            )
        return _SourceArgument(name, value, paths)

    def _fingerprint(self, source: _SourceArgument) -> tuple[str, Fingerprint]:
        """The real path and fingerprint of one source argument."""
        path, real = source.paths
        try:
            found = fingerprint_source(
                path, mode=self.mode, include=self.include, exclude=self.exclude
            )
        except FileNotFoundError:
            raise SourceNotFoundError(source.name, source.value) from None
        return real, found

    def prepare(
        self,
        signature: inspect.Signature,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        code_version: str,
        state: dict[str, tuple[str, Any]] | None = None,
    ) -> Prepared:
        """Bind arguments to the loader's signature (defaults applied), hash the parameters and
        resolve the source paths: everything but the fingerprints (see :meth:`finish`).

        The result's ``group`` is known here, before the slow part of most calls, so a caller
        may start work that depends on it (the decorator's read-ahead) in between.
        ``state``: the loader's state at this call, label -> (digest, value) (see
        :mod:`cachedload.state`); it enters the key only when there is some, so a loader
        without state keeps the key it always had.
        """
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        parameters: dict[str, tuple[str, str]] = {}
        pending: dict[str, _SourceArgument] = {}
        for name, value in bound.arguments.items():
            if name in self.ignore:
                continue
            parameter = signature.parameters[name]
            path = self.source is None and says_path(parameter)
            kind = parameter.kind
            if self.source is None and kind is inspect.Parameter.VAR_POSITIONAL:
                for index, item in enumerate(value):  # each item on its own
                    self._add(name, f"{name}[{index}]", item, path, parameters, pending)
            elif self.source is None and kind is inspect.Parameter.VAR_KEYWORD:
                for key, item in sorted(value.items()):  # each named by its keyword too
                    item_path = path or _name_says_path(key)
                    self._add(name, f"{name}[{key}]", item, item_path, parameters, pending)
            else:
                self._add(name, name, value, path, parameters, pending)
        state = state or {}
        state_digests = tuple(sorted((label, digest) for label, (digest, _) in state.items()))
        group = CallGroup(
            (
                self.identity,
                code_version,
                tuple(sorted((name, digest) for name, (digest, _) in parameters.items())),
                tuple(sorted((label, source.paths[1]) for label, source in pending.items())),
                *((state_digests,) if state_digests else ()),
            )
        )
        return Prepared(
            bound.args, bound.kwargs, code_version, parameters, pending, state, state_digests, group
        )

    def finish(self, prepared: Prepared) -> Call:
        """Fingerprint a prepared call's sources and make its key."""
        started = time.perf_counter()
        sources = {label: self._fingerprint(source) for label, source in prepared.pending.items()}
        fingerprint_seconds = time.perf_counter() - started
        state_digests = prepared.state_digests
        key_parts = (
            FORMAT_VERSION,
            self.identity,
            prepared.code_version,
            sorted((name, digest) for name, (digest, _) in prepared.parameters.items()),
            sorted(
                (name, fp.digest if self.portable else f"{path}\0{fp.digest}")
                for name, (path, fp) in sources.items()
            ),
            *((list(state_digests),) if state_digests else ()),
        )
        return Call(
            args=prepared.args,
            kwargs=prepared.kwargs,
            key=value_digest(key_parts),
            group=prepared.group,
            parameters=prepared.parameters,
            sources=sources,
            given_paths={label: source.paths[0] for label, source in prepared.pending.items()},
            fingerprint_seconds=fingerprint_seconds,
            started=started,  # the caller may know an earlier start
            state={
                label: (digest, readable(value))
                for label, (digest, value) in prepared.state.items()
            },
        )

    def bind(
        self,
        signature: inspect.Signature,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        code_version: str,
        state: dict[str, tuple[str, Any]] | None = None,
    ) -> Call:
        """:meth:`prepare` then :meth:`finish`: a call's arguments to its key."""
        return self.finish(self.prepare(signature, args, kwargs, code_version, state))

    def _add(
        self,
        name: str,
        label: str,
        value: Any,
        path: bool,
        parameters: dict[str, tuple[str, str]],
        sources: dict[str, _SourceArgument],
    ) -> None:
        """File one argument (or one item of ``*args``/``**kwargs``) as sources or a parameter;
        ``path``: the parameter's name or annotation says path."""
        if self.is_source(name, value, path):
            if isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    sources[f"{label}[{index}]"] = self._source(name, item)
            else:
                sources[label] = self._source(name, value)
            return
        try:
            parameters[label] = (value_digest(value), readable(value))
        except UnhashableError as error:
            raise UnhashableArgumentError(name, str(error)) from None
        except RecursionError:
            raise UnhashableArgumentError(name, "nested too deeply") from None

    def sources_after(self, call: Call) -> dict[str, tuple[str, Fingerprint]] | None:
        """Fingerprints taken again after the body ran; None if any source changed, including
        a symlink on the way to it now pointing elsewhere (the key names the real path taken
        before fingerprinting; the body may have read through the new link)."""
        after: dict[str, tuple[str, Fingerprint]] = {}
        for name, (path, before) in call.sources.items():
            given = call.given_paths.get(name)
            if given is not None and os.path.realpath(given) != path:
                return None
            try:
                # The path fingerprinted before: a single file's record is named after it (a
                # symlink's name, not its target's).
                now = fingerprint_source(
                    given or path, mode=self.mode, include=self.include, exclude=self.exclude
                )
            except FileNotFoundError:
                return None
            if now.digest != before.digest:
                return None
            after[name] = (path, now)
        return after

    def racy_digests(self, call: Call) -> tuple[dict[str, dict[str, str]], int]:
        """Content digests of the source files whose mtime is too recent to trust, and the
        newest such mtime (content fingerprints need none)."""
        if self.mode == "content":
            return {}, 0
        racy: dict[str, dict[str, str]] = {}
        newest = 0
        for name, (root, fp) in call.sources.items():
            racy_paths = fp.racy_files()
            if racy_paths:
                racy[name] = {rel: hash_file(_source_file(root, rel)) for rel in racy_paths}
                newest = max(newest, fp.newest_mtime_ns)
        return racy, newest

    def call_meta(
        self,
        call: Call,
        code_version: str,
        version: Any,
        code_parts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The metadata that describes a call's key components (no result yet).

        ``group`` identifies the function, code, parameters and source *paths* without the
        sources' fingerprints: entries sharing a group differ only in source contents, so a
        newer one supersedes the older ones. ``code_parts``: the digest of each part of the
        code version (the loader, each ``depends_on`` helper, ``version=``), for ``why``.
        """
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "key": call.key,
            "group": call.group.digest,
            "function": self.identity,
            "code": code_version,
            **({"code_parts": dict(code_parts)} if code_parts is not None else {}),
            "version": readable(version),
            "parameters": {
                name: {"digest": digest, "value": text}
                for name, (digest, text) in call.parameters.items()
            },
            "sources": {
                name: {
                    "path": path,
                    "digest": fp.digest,
                    "mode": self.mode,
                    "file_count": fp.file_count,
                    "total_bytes": fp.total_bytes,
                    "newest_mtime_ns": fp.newest_mtime_ns,
                }
                for name, (path, fp) in call.sources.items()
            },
            "portable": self.portable,
        }
        if call.state:  # only when there is some: older entries and stateless loaders have none
            meta["state"] = {
                label: {"digest": digest, "value": text}
                for label, (digest, text) in call.state.items()
            }
        return meta


def entry_meta(
    call_meta: dict[str, Any],
    result: Any,
    compute_seconds: float,
    racy: dict[str, dict[str, str]],
    newest_racy: int,
) -> dict[str, Any]:
    """A call's metadata completed with its result's summary, timings and versions."""
    import joblib
    import numpy

    return {
        **call_meta,
        "racy": racy,
        "racy_newest_mtime_ns": newest_racy,
        "result": summarize(result),
        "created": time.time(),
        "compute_seconds": round(compute_seconds, 6),
        "host": platform.node(),
        "pid": os.getpid(),
        "versions": {
            "cachedload": __version__,
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "joblib": joblib.__version__,
        },
    }
