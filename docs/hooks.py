"""MkDocs hook: the CLI reference on managing.md is generated from ``cachedload.cli._parser()``
at build time, so the page cannot drift from the command.

The marker ``<!-- cli-reference -->`` on a page is replaced by each command's ``--help`` text.
The help is formatted 100 columns wide whatever the terminal, and names the default cache
directory as Linux's (the machine building the docs has its own, and maybe a
``$CACHEDLOAD_DIR``, which the help would name).
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from unittest import mock

MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    """The ``--help`` of ``cachedload`` and of each of its commands, as Markdown."""
    from cachedload import cli

    with (
        mock.patch.dict(os.environ, {"COLUMNS": "100"}),
        mock.patch.object(cli, "platform_cache_dir", return_value="~/.cache/cachedload"),
    ):
        os.environ.pop("CACHEDLOAD_DIR", None)  # put back when the patch ends
        return _format(cli._parser())


def _format(parser: argparse.ArgumentParser) -> str:
    sections = [("cachedload", parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sections += [(f"cachedload {name}", sub) for name, sub in action.choices.items()]
    parts = []
    for title, sub in sections:
        text = sub.format_help()
        parts.append(f"### `{title}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Fill in the CLI reference where a page asks for it."""
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
