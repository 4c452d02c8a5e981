"""The ``kongtask-cli`` directive: the command-line reference, generated from the parsers.

It walks ``kongtask._cli.build_parser()`` and renders, for the program and each verb (and
sub-verb), a section holding its ``--help`` text, so the reference cannot drift from
the code.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

HELP_WIDTH = "88"


def _verbs(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.extend(action.choices.items())
    return found


def _section(
    directive: SphinxDirective, path: list[str], parser: argparse.ArgumentParser
) -> nodes.section:
    title = " ".join(path)
    section = nodes.section(ids=[nodes.make_id("cli " + title)], names=[title])
    section += nodes.title(text=title)
    section += nodes.literal_block(text=parser.format_help().rstrip(), language="text")
    for name, verb in _verbs(parser):
        section += _section(directive, [*path, name], verb)
    return section


class CliDirective(SphinxDirective):
    """Renders the whole ``kongtask`` command line, one section per verb."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from kongtask._cli import build_parser

        previous = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps to the terminal's width
        try:
            parser = build_parser()
            parser.prog = "kongtask"
            root = _section(self, ["kongtask"], parser)
        finally:
            if previous is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = previous
        return list(root.children[1:])  # the page gives the title


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("kongtask-cli", CliDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
