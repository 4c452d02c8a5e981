"""Sphinx configuration: build with ``python3 docs/build.py`` (see that file)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

from pygments.lexers import PostgresLexer, TextLexer  # noqa: E402
from sphinx.application import Sphinx  # noqa: E402

import kongtask  # noqa: E402

project = "kongtask"
author = "the kongtask authors"
copyright = "the kongtask authors"
release = version = kongtask.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
    "kongtask_cli",
    "kongtask_sql",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "build.py"]

# Broken cross-references (to a page, a heading or a Python name) are warnings, and the
# build turns warnings into errors. External links are never fetched.
nitpicky = True
nitpick_ignore_regex = [
    # names of other libraries and of the standard library: no intersphinx (no network)
    ("py:.*", r"(trio|asyncpg|hypothesis|pytest|psycopg|psycopg2|sqlalchemy|django)(\..*)?"),
    ("py:.*", r"(datetime|collections|typing|types|logging|enum|pathlib|os|contextlib)\..*"),
    ("py:.*", r"(abc|asyncio|subprocess|_pytest|dataclasses)\..*"),
    # type variables, aliases and private helpers named in signatures: annotations are
    # strings (``from __future__ import annotations``) that Sphinx cannot always resolve
    ("py:.*", r"~?(\w+|kongtask\..*\.(P|T|_[A-Za-z]\w*))"),
    # names defined in private modules (a package's parts behind its public face)
    ("py:.*", r"~?kongtask\.(\w+\.)*_[a-z]\w*\.\w+"),
]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"kongtask {release}"


_prose_attribute_docs: dict[str, list[str]] = {}


def _keep_attribute_prose(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """A ``#:`` comment such as "Payloads to pick from: ..." is prose, not "type: text".

    Types come from the annotations, but napoleon reads the text before a first colon of
    an attribute's docstring as its type: such docstrings are kept from before napoleon
    (priority 400) and put back after it (priority 600).
    """
    if what in ("attribute", "data") and lines and ":" in lines[0]:
        _prose_attribute_docs[name] = list(lines)


def _restore_attribute_prose(
    app: object, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    kept = _prose_attribute_docs.pop(name, None)
    if kept is not None:
        lines[:] = kept


def setup(app: Sphinx) -> None:
    # PostgreSQL's dialect (dollar quoting) for ```sql blocks; crontab lines as plain text
    app.add_lexer("sql", PostgresLexer)
    app.add_lexer("crontab", TextLexer)
    app.connect("autodoc-process-docstring", _keep_attribute_prose, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_prose, priority=600)
