"""The ``kongtask-sql-functions`` directive: the SQL API, read from the migrations.

It replays the packaged migrations in order (each ``create [or replace] function`` and
``drop function``) and renders the signature of every function that the last migration
leaves in place, so the reference is the schema's, not a copy. Trigger functions and
``name__helper`` functions are internal and left out.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

STATEMENT = re.compile(
    r"^(?P<verb>create(?: or replace)? function|drop function(?: if exists)?)\s+"
    r":GRAPHILE_WORKER_SCHEMA\.(?P<name>\w+)\((?P<rest>.*?)(?:\)\s*;|\$\$|\bas\s*\$)",
    re.MULTILINE | re.DOTALL | re.IGNORECASE,
)


def public_functions() -> dict[str, str]:
    """``name -> signature`` of the functions the migrations leave in the schema."""
    folder = resources.files("kongtask") / "_migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    functions: dict[str, str] = {}
    for file in names:
        text = (folder / file).read_text()
        for match in STATEMENT.finditer(text):
            name = match["name"]
            if match["verb"].lower().startswith("drop"):
                functions.pop(name, None)
                continue
            header = text[match.start() : match.end()].rstrip("$ \n")
            header = re.sub(r"\s+as\s*$", "", header, flags=re.IGNORECASE)
            header = re.sub(r"^create(?: or replace)? function\s+", "", header, flags=re.I)
            functions[name] = header.replace(":GRAPHILE_WORKER_SCHEMA", "graphile_worker")
    return {
        name: signature
        for name, signature in sorted(functions.items())
        if not name.startswith("tg") and "__" not in name
    }


class SqlFunctionsDirective(SphinxDirective):
    """One section per public SQL function, holding its signature."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        found: list[nodes.Node] = []
        for name, signature in public_functions().items():
            section = nodes.section(ids=[nodes.make_id("sql " + name)], names=[name])
            section += nodes.title(text=name)
            section += nodes.literal_block(text=signature, language="sql")
            found.append(section)
        return found


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("kongtask-sql-functions", SqlFunctionsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
