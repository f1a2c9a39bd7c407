"""Why did a call miss? Compare its key components with the closest stored entry.

A key is made of a format version, the function's code (with ``depends_on`` and ``version=``),
each parameter's digest and each source's fingerprint. Every entry records those components in
its ``meta.json`` (with readable values) and, in its ``manifest``, the ``(relative path, size,
mtime_ns)`` of every source file, so a difference can be named down to single files::

    load_images: this call [3f1c…] vs. stored entry 9a0b… (created 2 h ago)
      - parameter size: (128, 128) → (64, 64)
      - source image_dir (/data/train): 3 files added (a.jpg, b.jpg, c.jpg), 1 modified (d.jpg)

Manifests are written at store time and read only here, never on the hit path. An entry that
``keep=`` deleted is still known from its record (:mod:`cachedload.superseded`): its key
components and, when small, its file list, so the entry that replaced it can say why.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachedload.entry import (
    CorruptEntry,
    read_entry_manifest,
    read_local_meta,
    scan_entry_dirs,
)
from cachedload.superseded import Superseded, read_superseded

__all__ = [
    "Difference",
    "Explanation",
    "closest_entry",
    "compare",
    "compare_with_superseded",
    "explain_against_closest",
    "last_superseded",
    "read_manifest",
    "read_meta",
]

#: How many file names a report shows for each of added / modified / removed.
FIRST_NAMES = 3

Manifest = dict[str, Sequence[Sequence[Any]]]
"""``{source name: [[relative path, size, mtime_ns], ...]}``, as stored in an entry."""


@dataclass(frozen=True)
class Difference:
    """One key component that differs.

    Attributes:
        component: ``"format"``, ``"function"``, ``"code"``, ``"version"``, ``"parameter"``,
            ``"state"`` (a global or closure value the loader reads, its bound ``self``…) or
            ``"source"``.
        name: the parameter's, state's (``"global SCALE"``) or source's name (None for the
            other components).
        text: a readable one-line description, e.g. ``"parameter size: (128, 128) → (64, 64)"``.
        old: the stored (older) readable value, if there is one.
        new: the current (newer) readable value, if there is one.
        added: relative paths of the source files added (sources only).
        modified: relative paths of the files whose size or mtime changed.
        removed: relative paths of the files removed.
    """

    component: str
    name: str | None
    text: str
    old: str | None = None
    new: str | None = None
    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Explanation:
    """The difference between two keys of one function, component by component.

    ``str()`` gives a readable multi-line report, :meth:`summary` one line. An explanation is
    true when there is a difference to report; when there is nothing to compare (no stored
    entry, or the call would hit) :attr:`note` says so.

    Attributes:
        function: the loader's ``module.qualname``.
        differences: what differs, in key order (format, code, parameters, sources).
        old_key: the stored entry compared against.
        new_key: the key of the call (or of the newer entry).
        old_created: when the stored entry was created (seconds since the epoch).
        new_created: when the newer entry was created (None for a call).
        note: a remark when there is nothing (or nothing more) to compare.
        old_removed: when the entry compared against was deleted as superseded (``keep=``),
            if it is one: it is known from its record (:mod:`cachedload.superseded`).
    """

    function: str
    differences: tuple[Difference, ...] = ()
    old_key: str | None = None
    new_key: str | None = None
    old_created: float | None = None
    new_created: float | None = None
    note: str | None = None
    old_removed: float | None = None

    def __bool__(self) -> bool:
        """False if no key component differs."""
        return bool(self.differences)

    def summary(self) -> str:
        """The differences on one line (for logs)."""
        if self.differences:
            return "; ".join(difference.text for difference in self.differences)
        return self.note or "no key component differs"

    def _header(self) -> str:
        def stamp(moment: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))

        def entry(key: str | None, created: float | None, removed: float | None = None) -> str:
            text = f"entry {key[:12]}" if key else "an entry"
            when = [f"created {stamp(created)}"] if created is not None else []
            if removed is not None:
                when.append(f"deleted by keep= {stamp(removed)}")
            return f"{text} ({', '.join(when)})" if when else text

        if self.old_key is None:
            return (
                f"{self.function}: this call [{self.new_key[:12]}]"
                if self.new_key
                else f"{self.function}:"
            )
        new = entry(self.new_key, self.new_created)
        if self.new_created is None:
            new = f"this call [{self.new_key[:12]}]" if self.new_key else "this call"
        old = entry(self.old_key, self.old_created, self.old_removed)
        state = "stored" if self.old_removed is None else "superseded"
        return f"{self.function}: {new} vs. {state} {old}"

    def __str__(self) -> str:
        lines = [self._header()]
        lines += [f"  - {difference.text}" for difference in self.differences]
        if self.note:
            lines.append(f"  {self.note}")
        elif not self.differences:
            lines.append("  no key component differs")
        return "\n".join(lines)


# -- reading entries ---------------------------------------------------------------------------
def read_meta(entry_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """An entry's metadata as stored, whatever its format version; None if unreadable."""
    try:
        return read_local_meta(Path(entry_path), any_version=True)
    except (CorruptEntry, OSError):
        return None


def read_manifest(
    entry_path: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> Manifest | None:
    """An entry's per-file manifest ``{source: [[relpath, size, mtime_ns], ...]}``, checked
    against its metadata ``meta`` (default: read from the entry) as a rebuild checks it; None
    if the entry has none (older entries), or it is unreadable or does not match."""
    path = Path(entry_path)
    try:
        found = meta if meta is not None else read_meta(path)
        return None if found is None else read_entry_manifest(path, found)
    except CorruptEntry:
        return None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _names(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:FIRST_NAMES])
    return f"({shown}, …)" if len(paths) > FIRST_NAMES else f"({shown})"


def _files(manifest: Manifest | None, name: str) -> dict[str, tuple[Any, ...]] | None:
    if manifest is None or not isinstance(manifest.get(name), (list, tuple)):
        return None
    return {str(record[0]): tuple(record[1:3]) for record in manifest[name]}


def _source_difference(
    name: str,
    old: dict[str, Any],
    new: dict[str, Any],
    old_manifest: Manifest | None,
    new_manifest: Manifest | None,
) -> Difference | None:
    old_path, new_path = str(old.get("path", "?")), str(new.get("path", "?"))
    parts: list[str] = []
    if old_path != new_path:
        parts.append(f"path {old_path} → {new_path}")
    if old.get("mode") != new.get("mode"):
        parts.append(f"fingerprint mode {old.get('mode')} → {new.get('mode')}")
    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    if old.get("digest") != new.get("digest"):
        before, after = _files(old_manifest, name), _files(new_manifest, name)
        if before is not None and after is not None:
            added = tuple(sorted(after.keys() - before.keys()))
            removed = tuple(sorted(before.keys() - after.keys()))
            modified = tuple(
                sorted(p for p in after.keys() & before.keys() if after[p] != before[p])
            )
            changes: list[str] = []
            for found, verb in ((added, "added"), (modified, "modified"), (removed, "removed")):
                if found:
                    count = str(len(found)) if changes else _plural(len(found), "file")
                    changes.append(f"{count} {verb} {_names(found)}")
            parts += changes or ["file contents changed (same names, sizes and times)"]
        else:
            counts = (
                f"{old.get('file_count', '?')} → {new.get('file_count', '?')} files, "
                f"{old.get('total_bytes', '?')} → {new.get('total_bytes', '?')} bytes"
            )
            parts.append(f"fingerprint changed ({counts}; no file list stored)")
    if not parts:
        return None
    where = new_path if old_path == new_path else None
    label = f"source {name} ({where})" if where else f"source {name}"
    return Difference(
        "source", name, f"{label}: {', '.join(parts)}", old_path, new_path, added, modified, removed
    )


def _changed_code_parts(old: Any, new: Any, function: str) -> list[str]:
    """Whose code changed, from two entries' ``code_parts`` (empty if either lacks them):
    ``the loader (mod.load)``, ``depends_on helper mod.name`` (``… (added)``, ``… (removed)``).
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    changed = []
    for part in sorted(old.keys() | new.keys(), key=lambda name: (name != "loader", name)):
        if part == "version" or old.get(part) == new.get(part):
            continue  # version= is compared by its readable value
        label = f"the loader ({function})" if part == "loader" else f"depends_on {part}"
        if part not in old:
            label += " (added)"
        elif part not in new:
            label += " (removed)"
        changed.append(label)
    return changed


def _parameter_differences(
    old: dict[str, Any], new: dict[str, Any], component: str = "parameter"
) -> list[Difference]:
    """Parameters (or state: ``"global SCALE"``, ``"self"``…) added, removed or changed."""
    prefix = "parameter " if component == "parameter" else ""

    def text(entry: Any) -> str:
        return str(entry.get("value", "?")) if isinstance(entry, dict) else str(entry)

    def digest(entry: Any) -> Any:
        return entry.get("digest") if isinstance(entry, dict) else entry

    differences = []
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            value = text(new[name])
            differences.append(
                Difference(component, name, f"{prefix}{name} added (= {value})", None, value)
            )
        elif name not in new:
            value = text(old[name])
            differences.append(
                Difference(component, name, f"{prefix}{name} removed (was {value})", value)
            )
        elif digest(old[name]) != digest(new[name]):
            before, after = text(old[name]), text(new[name])
            change = f"{before} → {after}" if before != after else f"value changed ({after})"
            differences.append(
                Difference(component, name, f"{prefix}{name}: {change}", before, after)
            )
    return differences


def compare(
    old_meta: dict[str, Any],
    old_manifest: Manifest | None,
    new_meta: dict[str, Any],
    new_manifest: Manifest | None,
) -> Explanation:
    """Compare the key components of two entries' metadata (or a call's and an entry's).

    Args:
        old_meta: the stored entry's ``meta.json``.
        old_manifest: its manifest (see :func:`read_manifest`), None if unknown.
        new_meta: the newer entry's metadata, or the call's (``CachedDataset._call_meta``).
        new_manifest: its per-file manifest, None if unknown.

    Returns:
        The :class:`Explanation`: format version, function, code (or ``version=``), each
        parameter added/removed/changed with its old and new readable values, each source's
        path and files added/modified/removed (a bare "fingerprint changed" without manifests).
        The code digest covers ``version=``, so a changed ``version`` is reported instead of
        "code changed" (a code change made at the same time is then not named separately).
    """
    differences: list[Difference] = []
    if old_meta.get("format") != new_meta.get("format"):
        before, after = str(old_meta.get("format")), str(new_meta.get("format"))
        differences.append(
            Difference("format", None, f"format version {before} → {after}", before, after)
        )
    if old_meta.get("function") != new_meta.get("function"):
        before, after = str(old_meta.get("function")), str(new_meta.get("function"))
        differences.append(
            Difference("function", None, f"function {before} → {after}", before, after)
        )
    if old_meta.get("version") != new_meta.get("version"):
        before, after = str(old_meta.get("version")), str(new_meta.get("version"))
        differences.append(
            Difference("version", None, f"version {before} → {after}", before, after)
        )
    elif old_meta.get("code") != new_meta.get("code"):
        changed = _changed_code_parts(
            old_meta.get("code_parts"), new_meta.get("code_parts"), str(new_meta.get("function"))
        )
        text = "code changed (the loader's or a depends_on helper's)"
        if changed:
            text = "code changed in " + ", ".join(changed)
        differences.append(
            Difference(
                "code",
                "; ".join(changed) or None,
                text,
                str(old_meta.get("code")),
                str(new_meta.get("code")),
            )
        )
    differences += _parameter_differences(
        old_meta.get("parameters") or {}, new_meta.get("parameters") or {}
    )
    differences += _parameter_differences(
        old_meta.get("state") or {}, new_meta.get("state") or {}, "state"
    )
    old_sources: dict[str, Any] = old_meta.get("sources") or {}
    new_sources: dict[str, Any] = new_meta.get("sources") or {}
    for name in sorted(old_sources.keys() | new_sources.keys()):
        if name not in old_sources:
            path = str(new_sources[name].get("path", "?"))
            differences.append(
                Difference("source", name, f"source {name} added ({path})", None, path)
            )
        elif name not in new_sources:
            path = str(old_sources[name].get("path", "?"))
            differences.append(
                Difference("source", name, f"source {name} removed (was {path})", path)
            )
        else:
            found = _source_difference(
                name, old_sources[name], new_sources[name], old_manifest, new_manifest
            )
            if found is not None:
                differences.append(found)
    if not differences and old_meta.get("key") != new_meta.get("key"):
        # e.g. ``portable=`` toggled: the key covers the sources' paths or not.
        differences.append(Difference("key", None, "key options changed (e.g. portable=)"))
    return Explanation(
        function=str(new_meta.get("function") or old_meta.get("function") or "?"),
        differences=tuple(differences),
        old_key=str(old_meta.get("key")) if old_meta.get("key") else None,
        new_key=str(new_meta.get("key")) if new_meta.get("key") else None,
        old_created=_created(old_meta),
        new_created=_created(new_meta),
    )


def _created(meta: dict[str, Any]) -> float | None:
    created = meta.get("created")
    return float(created) if isinstance(created, (int, float)) else None


# -- the closest entry -------------------------------------------------------------------------
def _stored(function_dirs: Iterable[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for directory in function_dirs:
        for found in scan_entry_dirs(directory, any_version=True):
            if found.meta is not None:
                yield found.path, found.meta


def _source_paths(meta: dict[str, Any]) -> dict[str, Any]:
    sources = meta.get("sources") or {}
    return {name: s.get("path") for name, s in sources.items() if isinstance(s, dict)}


def closest_entry(
    meta: dict[str, Any], function_dirs: Iterable[Path]
) -> tuple[Path, dict[str, Any]] | None:
    """The stored entry closest to ``meta``: of the entries with the same source paths if there
    are any, the one whose key differs in the fewest components (ties: the newest); None if the
    folders hold no readable entry.

    Only metadata is read (manifests refine a component's description, not the count).
    """
    best: tuple[bool, int, float] | None = None
    found: tuple[Path, dict[str, Any]] | None = None
    paths = _source_paths(meta)
    for path, stored in _stored(function_dirs):
        if stored.get("function") != meta.get("function"):
            continue
        rank = (
            _source_paths(stored) != paths,  # the same folders first, however old
            len(compare(stored, None, meta, None).differences),
            -(_created(stored) or 0.0),
        )
        if best is None or rank < best:
            best, found = rank, (path, stored)
    return found


# -- superseded entries -------------------------------------------------------------------------
def last_superseded(function_dir: Path, group: str | None) -> Superseded | None:
    """The record of the entry of ``group`` most recently deleted as superseded from a function
    folder (:mod:`cachedload.superseded`); None if there is none."""
    if group is None:
        return None
    found = [record for record in read_superseded(function_dir) if record.group == group]
    return max(found, key=lambda record: record.removed) if found else None


def compare_with_superseded(
    record: Superseded, meta: dict[str, Any], manifest: Manifest | None
) -> Explanation:
    """Compare an entry's (or a call's) key components with those of the entry it replaced,
    known from its record: why it was rebuilt. Files are named if the record kept its file
    list; else a changed fingerprint is said with its counts."""
    found = compare(record.meta, record.files, meta, manifest)
    return dataclasses.replace(found, old_key=record.key, old_removed=record.removed)


def explain_against_closest(
    meta: dict[str, Any], manifest: Manifest | None, function_dirs: Iterable[Path]
) -> Explanation | None:
    """Compare a call's key components with the closest stored entry of the same function.

    Args:
        meta: the call's metadata (``CachedDataset._call_meta``).
        manifest: the call's sources' files ``{name: [(relpath, size, mtime_ns), ...]}``.
        function_dirs: the function's folders (all its code versions).

    Returns:
        The :class:`Explanation`, or None if no entry of the function is stored.
    """
    found = closest_entry(meta, function_dirs)
    if found is None:
        return None
    path, stored = found
    return compare(stored, read_manifest(path, stored), meta, manifest)
