"""The ``cachedload`` command: see, bound and clean a cache directory.

Run ``cachedload --help`` (or ``python -m cachedload --help``) for the sub-commands. This module
is the command's front end, so it prints; the library itself never does.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cachedload import config
from cachedload._version import __version__
from cachedload.backends import remote_url
from cachedload.config import (
    cache_dir_origin,
    cache_dir_variable,
    check_cache_dir,
    default_cache_dir,
    not_a_folder,
    parse_size,
    platform_cache_dir,
)
from cachedload.errors import ConfigurationError
from cachedload.explain import compare, compare_with_superseded, last_superseded
from cachedload.manage import (
    EntryRecord,
    PruneReport,
    VerifyResult,
    format_age,
    format_size,
    is_busy,
    leftovers,
    list_entries,
    local_copies,
    manifest_of,
    parse_age,
    prune,
    remove_damaged,
    remove_entries,
    tidy,
    tidy_local_copies,
    verify,
)
from cachedload.root import Leftover

__all__ = ["main"]

_EXIT_CODES = """\
exit status:
  0  success
  1  `verify` found damaged entries (even when --fix deleted them), or a deletion was
     declined or could not be confirmed
  2  invalid usage: a bad option, a cache directory that is a file (or, for ls, info,
     why and verify, that does not exist), an ID or FUNCTION that matches no entry or
     several, or a cache directory to delete from that is not cachedload's, or is read-only
"""

# What only reads a cache: a cache directory that does not exist is then an error (a typo,
# or a variable not set here), where clear and prune find nothing to do.
_READ_ONLY = ("ls", "info", "why", "verify")


class _UsageError(Exception):
    """A problem with what the user asked for (exit status 2)."""


# -- argument types ----------------------------------------------------------------------------
def _size(text: str) -> int:
    try:
        return parse_size(text, "size")
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(error.message) from None


def _age(text: str) -> float:
    try:
        return parse_age(text, "age")
    except ConfigurationError as error:
        raise argparse.ArgumentTypeError(error.message) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


# -- helpers -----------------------------------------------------------------------------------
def _cache_dir(args: argparse.Namespace) -> Path | str:
    url = remote_url(args.cache_dir)  # s3://…: a remote cache, see cachedload.backends
    if url is not None:
        return url
    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


def _clip(text: str, width: int, *, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"


def _ago(moment: float, now: float) -> str:
    return f"{format_age(now - moment)} ago"


def _stamp(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def _parameters_text(record: EntryRecord) -> str:
    return ", ".join(f"{name}={value}" for name, value in record.parameters.items()) or "-"


def _sources_text(record: EntryRecord) -> str:
    parts = [
        f"{source['path']} ({source['file_count']} file{'' if source['file_count'] == 1 else 's'})"
        for source in record.sources.values()
    ]
    return ", ".join(parts) or "-"


def _match_function(records: Sequence[EntryRecord], name: str) -> str | None:
    """The one function that ``name`` designates: its exact name, its folder's name, or an
    unambiguous part of it. None if nothing matches.

    Raises:
        _UsageError: several functions match.
    """
    functions = sorted({record.function for record in records})
    exact = {r.function for r in records if name in (r.function, r.function_dir)}
    if len(exact) == 1:
        return exact.pop()
    matches = [function for function in functions if name in function]
    if len(matches) > 1:
        listed = "\n  ".join(matches)
        raise _UsageError(f"{name!r} matches several functions; be more specific:\n  {listed}")
    return matches[0] if matches else None


def _no_function(records: Sequence[EntryRecord], name: str) -> _UsageError:
    known = "\n  ".join(sorted({r.function for r in records})) or "(none)"
    return _UsageError(
        f"no stored entry of a function matching {name!r}; functions in the cache:\n  {known}"
    )


def _entries_text(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _copies_text(count: int) -> str:
    return f"{count} local cop{'y' if count == 1 else 'ies'} of remote entries"


def _code_text(record: EntryRecord) -> str:
    """The entry's code version: the first digits of its code digest (as in its folder name)."""
    code = record.meta.get("code")
    return code[:8] if isinstance(code, str) and code else "-"


def _print_entries(records: Sequence[EntryRecord], now: float) -> None:
    for record in records:
        copy = f"  (local copy of {record.copy_of})" if record.copy_of else ""
        print(
            f"  - {record.id[:12]}  {record.function}  {format_size(record.size_bytes)}  "
            f"(last used {_ago(record.last_used, now)}){copy}"
        )


# -- sub-commands ------------------------------------------------------------------------------
def _ls(args: argparse.Namespace) -> int:
    cache_dir = _cache_dir(args)
    records, copies = list_entries(cache_dir), local_copies(cache_dir)
    if args.function:
        everything = records + copies
        chosen = {r.function for r in everything if args.function in (r.function, r.function_dir)}
        chosen = chosen or {r.function for r in everything if args.function in r.function}
        if not chosen:
            raise _no_function(everything, args.function)
        records = [record for record in records if record.function in chosen]
        copies = [record for record in copies if record.function in chosen]
    if args.json:
        print(json.dumps([record.to_dict() for record in records + copies], indent=2))
        return 0
    now = time.time()
    if records:
        _print_table(records, now)
        total = sum(record.size_bytes for record in records)
        print(f"{_entries_text(len(records))}, {format_size(total)} in {cache_dir}")
    else:
        print(f"no entries in {cache_dir}")
    by_root: dict[str, list[EntryRecord]] = {}
    for record in copies:  # local copies: the remote cache's entries downloaded to this machine
        by_root.setdefault(str(record.path.parent.parent), []).append(record)
    for root, members in by_root.items():
        print(f"\nlocal copy of {members[0].copy_of} (in {root}):")
        _print_table(members, now)
        total = sum(record.size_bytes for record in members)
        print(f"{_copies_text(len(members))}, {format_size(total)}")
    if not args.function:
        _print_leftovers(cache_dir)
    return 0


def _print_leftovers(cache_dir: Path | str) -> None:
    found = leftovers(cache_dir)
    if not found:
        return
    print("\nleftovers (not entries: temporary folders of writers, running or killed):")
    for leftover in found:
        state = (
            "writer gone: `cachedload clear`, `prune` or `verify --fix` removes it"
            if leftover.dead
            else "being written"
        )
        where = f"{leftover.path.parent.name}/{leftover.path.name}"
        print(f"  - {where}  {format_size(leftover.size_bytes)}  ({state})")
    total = sum(leftover.size_bytes for leftover in found)
    print(f"{_plural(len(found), 'leftover', 'leftovers')}, {format_size(total)}")


def _tidy(cache_dir: Path | str, dry_run: bool, *, quiet: bool = False) -> None:
    """Remove dead writers' leftovers and records of removed entries, saying what went
    (unless ``quiet``: the output is JSON)."""
    dead = _dead_leftovers(cache_dir)
    if not dry_run:
        tidy(cache_dir)
        tidy_local_copies(cache_dir)
    if not quiet:
        _say_removed(dead, dry_run)


def _dead_leftovers(cache_dir: Path | str) -> list[Leftover]:
    return [leftover for leftover in leftovers(cache_dir) if leftover.dead]


def _say_removed(dead: Sequence[Leftover], dry_run: bool) -> None:
    if dead:
        verb = "would remove" if dry_run else "removed"
        size = format_size(sum(leftover.size_bytes for leftover in dead))
        print(f"{verb} {_plural(len(dead), 'leftover', 'leftovers')} of dead writers ({size})")


def _print_table(records: Sequence[EntryRecord], now: float) -> None:
    rows = [("ID", "FUNCTION", "CODE", "PARAMETERS", "SOURCES", "SIZE", "AGE", "LAST USED", "HITS")]
    for r in records:
        rows.append(
            (
                r.id[:12],
                _clip(r.function, 40, keep_end=True),
                _code_text(r),
                _clip(_parameters_text(r), 40),
                _clip(_sources_text(r), 50, keep_end=True),
                format_size(r.size_bytes),
                format_age(now - r.created),
                _ago(r.last_used, now) if r.hits else "never",
                str(r.hits),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    right = {5, 6, 8}  # numbers line up on the right
    for row in rows:
        cells = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


def _find_entry(records: Sequence[EntryRecord], prefix: str) -> EntryRecord:
    matches = [record for record in records if record.id.startswith(prefix)]
    if not matches:
        raise _UsageError(f"no entry with an ID starting with {prefix!r} (see `cachedload ls`)")
    if len(matches) > 1:
        listed = "\n  ".join(f"{r.id}  {r.function}" for r in matches[:10])
        raise _UsageError(
            f"{prefix!r} matches {len(matches)} entries; give more of the ID:\n  {listed}"
        )
    return matches[0]


def _info(args: argparse.Namespace) -> int:
    cache_dir = _cache_dir(args)
    record = _find_entry(list_entries(cache_dir) + local_copies(cache_dir), args.id)
    manifest = manifest_of(record)  # a remote cache: the local copy's, else the bucket's
    busy = is_busy(record)
    if args.json:
        print(json.dumps({**record.to_dict(), "in_use": busy, "meta": record.meta}, indent=2))
        return 0
    meta, now = record.meta, time.time()
    data = meta.get("data", {})
    lines = [
        ("id", record.id),
        ("function", record.function),
        ("folder", record.url or str(record.path)),
        *([("local copy of", record.copy_of)] if record.copy_of else []),
        ("created", f"{_stamp(record.created)} ({_ago(record.created, now)})"),
        (
            "computed",
            f"in {float(meta.get('compute_seconds', 0)):.2f} s on {meta.get('host', '?')} "
            f"(pid {meta.get('pid', '?')})",
        ),
        ("last used", _ago(record.last_used, now) if record.hits else "never"),
        ("hits", str(record.hits)),
        ("size", f"{format_size(record.size_bytes)} ({record.size_bytes} bytes)"),
        ("data file", f"{data.get('file', '?')}, {data.get('size', '?')} bytes"),
        ("checksum", f"xxh3-128 {data.get('xxh3', '?')}"),
        ("result", record.result),
        ("code", f"{meta.get('code', '?')} (version={meta.get('version', 'None')})"),
        *[(f"  {part}", str(digest)) for part, digest in (meta.get("code_parts") or {}).items()],
        ("key group", str(meta.get("group", "?"))),
        ("in use", "yes: another process holds its lock" if busy else "no"),
    ]
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label.ljust(width)}  {value}")
    print("parameters" if record.parameters else "parameters  (none)")
    for name, value in record.parameters.items():
        print(f"  {name} = {value}")
    print("sources" if record.sources else "sources  (none)")
    for name, source in (meta.get("sources") or {}).items():
        listed = len(manifest.get(name, ())) if manifest else None
        size = format_size(int(source.get("total_bytes", 0)))
        print(f"  {name}: {source.get('path')}")
        print(f"    {source.get('file_count')} files, {size}, newest file ", end="")
        print(_stamp(int(source.get("newest_mtime_ns", 0)) / 1e9))
        print(f"    fingerprint ({source.get('mode')}) {source.get('digest')}, ", end="")
        print(f"{listed} files in the manifest" if listed is not None else "no manifest")
    versions = meta.get("versions") or {}
    print("versions  " + ", ".join(f"{name} {value}" for name, value in versions.items()))
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin or not sys.stdin.isatty():
        print(
            f"{question} — cannot ask: standard input is not a terminal. Pass --yes to confirm.",
            file=sys.stderr,
        )
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _report(report: PruneReport, cache_dir: Path | str) -> None:
    _print_entries(report.removed, time.time())
    remaining, copies = list_entries(cache_dir), local_copies(cache_dir)
    print(report)
    text = f"cache now holds {_entries_text(len(remaining))}, "
    text += format_size(sum(r.size_bytes for r in remaining))
    if copies:
        text += f" (and {_copies_text(len(copies))}, "
        text += f"{format_size(sum(r.size_bytes for r in copies))})"
    print(text)


def _damaged_and_strays(cache_dir: Path | str) -> tuple[list[VerifyResult], list[VerifyResult]]:
    """The damaged entries (deleted by ``clear --all``), and the folders that are not
    cachedload's (never deleted, named)."""
    damaged, strays = [], []
    for result in verify(cache_dir, checksums=False):
        if result.unknown:
            strays.append(result)
        elif not result.ok:
            damaged.append(result)
    return damaged, strays


def _clear(args: argparse.Namespace) -> int:
    cache_dir = _cache_dir(args)
    if args.all and (args.function or args.older_than is not None):
        raise _UsageError("--all cannot be combined with --function or --older-than")
    if not (args.all or args.function or args.older_than is not None):
        raise _UsageError("say what to clear: --function NAME, --older-than AGE or --all")
    # The local copies of remote caches kept here are listed by `ls`: cleared like entries
    # (only this machine's copy goes; the next hit downloads it again).
    records = list_entries(cache_dir) + local_copies(cache_dir)
    damaged, strays = _damaged_and_strays(cache_dir) if args.all else ([], [])
    if args.function:
        function = _match_function(records, args.function)
        records = [record for record in records if record.function == function]
    if args.older_than is not None:
        cutoff = time.time() - args.older_than
        records = [record for record in records if record.last_used < cutoff]
    for stray in strays:
        print(f"left alone: {stray.path} ({stray.problem})")
    if not records and not damaged:
        print("nothing to clear: no entry matches")
        _tidy(cache_dir, args.dry_run)
        return 0
    total = sum(record.size_bytes for record in records) + sum(d.size_bytes for d in damaged)
    copies = sum(1 for r in records if r.copy_of) + sum(1 for d in damaged if d.copy_of)
    what = _entries_text(len(records) + len(damaged) - copies)
    if copies:
        what += f" and {_copies_text(copies)}"
    question = f"Delete {what} ({format_size(total)})?"
    if args.all and not args.yes and not args.dry_run and not _confirm(question):
        print("aborted: nothing deleted", file=sys.stderr)
        return 1
    report = remove_entries(records, dry_run=args.dry_run, reason="cleared")
    if not args.dry_run:
        for result in damaged:
            remove_damaged(result)
    _tidy(cache_dir, args.dry_run)
    if damaged:
        print(f"{'would remove' if args.dry_run else 'removed'} {len(damaged)} damaged entries")
    _report(report, cache_dir)
    return 0


def _prune(args: argparse.Namespace) -> int:
    max_size = args.max_size if args.max_size is not None else config.max_size_from_env()
    if max_size is None and args.keep is None and args.older_than is None:
        raise _UsageError(
            "nothing to apply: give --max-size, --keep or --older-than "
            "(or set $CACHEDLOAD_MAX_SIZE)"
        )
    dead = _dead_leftovers(_cache_dir(args))  # prune removes them
    report = prune(
        _cache_dir(args),
        max_size=max_size,
        keep=args.keep,
        older_than=args.older_than,
        dry_run=args.dry_run,
    )
    _say_removed(dead, args.dry_run)
    _report(report, _cache_dir(args))
    return 0


def _why(args: argparse.Namespace) -> int:
    records = list_entries(_cache_dir(args))
    function = _match_function(records, args.function)
    if function is None:
        raise _no_function(records, args.function)
    mine = [record for record in records if record.function == function]
    newer = mine[0]
    # The entry it replaced, if keep= deleted it: that says why it was rebuilt.
    replaced = last_superseded(newer.path.parent, newer.group)
    if replaced is not None:
        print(compare_with_superseded(replaced, newer.meta, manifest_of(newer)))
        return 0
    if len(mine) < 2:
        print(f"{function}: only one entry is stored ({newer.id[:12]}), nothing to compare")
        return 0
    older = mine[1]
    print(compare(older.meta, manifest_of(older), newer.meta, manifest_of(newer)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    checked = copies = damaged = unknown = 0
    total = 0
    found: list[dict[str, object]] = []
    for result in verify(_cache_dir(args)):
        if result.unknown:  # not an entry, not cachedload's: named, never deleted
            unknown += 1
            if args.json:
                found.append({**result.to_dict(), "action": "left alone"})
            else:
                print(f"UNKNOWN  {result.path}  {result.problem}")
            continue
        checked += 1
        copies += result.copy_of is not None
        total += result.size_bytes
        action = None
        if not result.ok:
            damaged += 1
            if args.fix:
                action = _fix(result)
        if args.json:
            found.append({**result.to_dict(), **({"action": action} if action else {})})
            continue
        copy = f"  (local copy of {result.copy_of})" if result.copy_of else ""
        if result.ok:
            size = format_size(result.size_bytes)
            print(f"OK       {result.id[:12]}  {result.function}  {size}{copy}")
            continue
        line = f"CORRUPT  {result.id[:12]}  {result.function}  {result.problem}{copy}"
        print(line + (f"  ({action})" if action else ""))
    if args.fix:
        _tidy(_cache_dir(args), dry_run=False, quiet=args.json)
    if args.json:
        summary = {"checked": checked, "damaged": damaged, "unknown": unknown}
        print(json.dumps({**summary, "size_bytes": total, "entries": found}, indent=2))
        return 1 if damaged else 0
    what = _entries_text(checked - copies) + (f" and {_copies_text(copies)}" if copies else "")
    strays = f"; {_plural(unknown, 'folder', 'folders')} not cachedload's left alone"
    print(
        f"checked {what} ({format_size(total)}): {damaged} damaged"
        + ("" if damaged == 0 or args.fix else "; run with --fix to delete")
        + (strays if unknown else "")
    )
    return 1 if damaged else 0


def _fix(result: VerifyResult) -> str:
    """Delete a damaged entry unless it is not ours or in use; say which."""
    if result.unknown:
        return "left alone"
    return "deleted" if remove_damaged(result) else "in use: not deleted"


def _demo(args: argparse.Namespace) -> int:
    from cachedload.demo import run_demo

    run_demo(cache_dir=args.cache_dir, n_images=args.images)
    where = f" --cache-dir {shlex.quote(args.cache_dir)}" if args.cache_dir else ""
    print(f"now try: cachedload ls{where}")
    return 0


def _check_cache_dir(args: argparse.Namespace) -> int | None:
    """Check the cache directory the command works on (``args.cache_dir`` checked in place);
    the exit status if the command ends here (saying why), else None."""
    try:
        if args.cache_dir is None:
            args.cache_dir = args.global_cache_dir
        if args.cache_dir is not None:
            checked = check_cache_dir(args.cache_dir, "--cache-dir")
            args.cache_dir = checked if isinstance(checked, str) else os.fspath(checked)
        missing = _missing_cache(args)
    except ConfigurationError as error:
        print(f"cachedload: error: {error}", file=sys.stderr)
        return 2
    if missing is None:
        return None
    if args.command in _READ_ONLY:
        print(f"cachedload {args.command}: {missing}: it does not exist", file=sys.stderr)
        return 2
    if args.command in ("clear", "prune"):
        print(f"nothing to {args.command}: {missing}")
        return 0
    return None


def _missing_cache(args: argparse.Namespace) -> str | None:
    """What to say if the local cache directory the command would use does not exist ("no
    cache directory at DIR (from ORIGIN)"), else None.

    Raises:
        ConfigurationError: it is a file (or below one), named with where it came from.
    """
    origin = cache_dir_origin(args.cache_dir, "--cache-dir")
    location = _cache_dir(args)
    if isinstance(location, str):
        return None  # a remote cache: its commands say what they find
    problem = not_a_folder(location)
    if problem is not None:
        raise ConfigurationError(origin, problem)
    if args.command == "demo":
        return None  # it makes the cache
    try:
        os.stat(location)
    except FileNotFoundError:  # (or a dangling symlink)
        where = origin if origin.startswith("the ") else f"from {origin}"
        return f"no cache directory at {location} ({where})"
    except OSError:
        pass  # e.g. a folder above it that cannot be read: the command says so
    return None


# -- the parser --------------------------------------------------------------------------------
_AGE_HELP = "delete entries not used for AGE: 30d, 12h, 15m or 45s (never-used ones: since created)"


def _default_text() -> str:
    """The help's default cache directory: the variable, else the platform's folder (and what
    the variable is set to now, apart: it is not the default)."""
    text = f"$CACHEDLOAD_DIR, else {platform_cache_dir()}"
    raw = cache_dir_variable()
    if raw:
        text += f"; $CACHEDLOAD_DIR is set to {raw}"
    return text.replace("%", "%%")  # argparse %-formats help texts


def _parser() -> argparse.ArgumentParser:
    default = _default_text()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the cache directory, or a remote cache's URL such as s3://bucket/prefix "
        f"(default: {default})",
    )
    parser = argparse.ArgumentParser(
        prog="cachedload",
        description="See, bound and clean the on-disk cache of @cached_dataset loaders. Each "
        "entry is the stored result of one call: a function, its parameters and a fingerprint "
        "of its source files.",
        epilog=_EXIT_CODES + "\nrun `cachedload COMMAND --help` for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what is removed (INFO) to stderr"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(  # also accepted before the command; the command's own wins
        "--cache-dir",
        dest="global_cache_dir",
        metavar="DIR",
        help="the cache directory to work on, or a remote cache's URL such as "
        f"s3://bucket/prefix, for any command (default: {default}); a --cache-dir after the "
        "command wins",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str, *examples: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            parents=[common],
            help=text,
            description=f"{text}\n\nexamples:\n  " + "\n  ".join(examples),
            epilog=_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    ls = command(
        "ls",
        _ls,
        "list the entries, newest first, with totals",
        "cachedload ls",
        "cachedload ls --function load_images --json",
    )
    ls.add_argument("--json", action="store_true", help="print a JSON array, one object per entry")
    ls.add_argument(
        "--function", metavar="NAME", help="only this function's entries (any part of its name)"
    )

    info = command("info", _info, "show everything known about one entry", "cachedload info 3f1c2a")
    info.add_argument("id", metavar="ID", help="the entry's ID (see `ls`), or a unique prefix")
    info.add_argument("--json", action="store_true", help="print JSON, with the full metadata")

    clear = command(
        "clear",
        _clear,
        "delete entries: a function's, those unused for a while, or all",
        "cachedload clear --function load_images",
        "cachedload clear --older-than 30d",
        "cachedload clear --all --yes",
    )
    clear.add_argument("--function", metavar="NAME", help="delete this function's entries")
    clear.add_argument("--older-than", metavar="AGE", type=_age, help=_AGE_HELP)
    clear.add_argument("--all", action="store_true", help="delete every entry (asks first)")
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask before --all")
    clear.add_argument("--dry-run", action="store_true", help="only show what would go")

    prune_ = command(
        "prune",
        _prune,
        "apply size, count and age limits now, and report what was freed",
        "cachedload prune --max-size 20GB",
        "cachedload prune --keep 1 --older-than 90d --dry-run",
    )
    prune_.add_argument(
        "--max-size",
        metavar="SIZE",
        type=_size,
        help="evict least-recently-used entries until the cache fits in SIZE: 20GB, 512MB, "
        "1.5GiB (default: $CACHEDLOAD_MAX_SIZE)",
    )
    prune_.add_argument(
        "--keep",
        metavar="N",
        type=_count,
        help="of entries with the same function, parameters and source paths (they differ only "
        "in the source files' contents), keep the N newest",
    )
    prune_.add_argument("--older-than", metavar="AGE", type=_age, help=_AGE_HELP)
    prune_.add_argument("--dry-run", action="store_true", help="only show what would go")

    why = command(
        "why",
        _why,
        "explain why a function's newest entry was made: how it differs (code, parameters, "
        "files) from the entry it replaced (recorded when keep= deleted it), else from the "
        "next newest entry",
        "cachedload why load_images",
    )
    why.add_argument(
        "function", metavar="FUNCTION", help="the function name `ls` shows, or a unique part of it"
    )

    check = command(
        "verify",
        _verify,
        "recompute every entry's checksum; exit status 1 if any entry is damaged",
        "cachedload verify",
        "cachedload verify --fix",
        "cachedload verify --json",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print JSON: the totals, and one object per entry checked (with its problem)",
    )
    check.add_argument(
        "--fix",
        action="store_true",
        help="delete the damaged entries (the exit status stays 1, so scripts notice)",
    )

    demo = command(
        "demo",
        _demo,
        "make a small image folder, load it twice, show the speed-up",
        "cachedload demo --cache-dir /tmp/demo-cache",
    )
    demo.add_argument(
        "--images",
        metavar="N",
        type=_count,
        default=400,
        help="how many synthetic images to make (default: 400)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cachedload`` command with ``argv`` (default: ``sys.argv[1:]``); return its
    exit status."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    refused = _check_cache_dir(args)
    if refused is not None:
        return refused
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _UsageError as error:
        print(f"cachedload {args.command}: {error}", file=sys.stderr)
        return 2
    except ConfigurationError as error:  # e.g. $CACHEDLOAD_DIR: one line, no traceback
        print(f"cachedload: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `cachedload ls | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
