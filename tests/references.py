"""Every reference to a file of this repository leads somewhere.

A comment, docstring or page that names a repository file (``docs/design/database.md``,
``docs/worker.md#shutdown``, ``tests/test_client.py``, ``kongtask/_pg.py``, a bare page
name such as ``reliability.md`` in the docs, ``README.md``) must name one that exists, and
an ``#anchor`` after a Markdown file must be one of that file's headings, slugged as MyST
slugs them (docs/conf.py sets ``myst_heading_anchors = 3``: headings of levels 1-3). A
private module named in dotted form (``kongtask._pg``) must exist too.

Also refused, anywhere scanned: a mention of a design document that is not part of the
repository (only what is in the repository can be looked up by whoever clones it), and
an absolute path of a development machine (under ``/work``, ``/tmp``, ``/root`` or a home
folder). Paths under ``docs/_build`` are the docs build's output and are not checked.

``python3 tests/references.py`` prints the problems; tests/test_references.py runs it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What is scanned: these folders and top-level files.
SCANNED_DIRS = ("kongtask", "tests", "stress", "docs", ".ci")
SCANNED_FILES = ("README.md", "CHANGELOG.md", "pyproject.toml")
TEXT_SUFFIXES = frozenset({".py", ".md", ".toml", ".txt", ".cfg", ".sh", ".cjs", ".js", ".html"})
SKIPPED_PARTS = frozenset({"_build", "__pycache__", "node_modules", ".mypy_cache", ".venv"})
#: Files not scanned, each with the reason.
NOT_SCANNED = {
    "tests/test_references.py": "plants bad references on purpose, to test the check",
    "tests/test_docs_examples.py": "runs made-up pages to test the docs runner",
}
#: References into generated output, not into the repository.
GENERATED = ("docs/_build/",)

#: Names of design documents that a project may have been briefed with but that are not
#: files of this repository; spelled in pieces so that this file does not mention them.
BRIEF_DOCUMENTS = tuple(f"{name}.md" for name in ("SCHEMA", "STACK", "ARCHITECTURE", "STYLE"))

#: Files allowed to keep mentions of those documents for now, each with the reason.
PENDING_BRIEF_CLEANUP: dict[str, str] = {}

_EXTENSIONS = r"(?:md|py|toml|sql|cjs|js|json|txt|sh|cfg|ini|yml|yaml|html|css)"
# a path from the top of the repository, maybe with an anchor: docs/worker.md#shutdown
_PATH_REFERENCE = re.compile(
    r"(?<![\w./-])(?P<path>(?:kongtask|tests|stress|docs)/[\w./-]*?\." + _EXTENSIONS + r"|\.ci/run)"
    r"(?![\w-])(?:#(?P<anchor>[\w-]+))?"
)
# top-level documents in capitals, such as README.md
_TOP_LEVEL_DOCUMENT = re.compile(
    r"(?<![\w./-])(?P<path>[A-Z][A-Z0-9_]*\.md)(?:#(?P<anchor>[\w-]+))?"
)
# reliability.md, worker.md#shutdown: a page named without its folder
_BARE_PAGE = re.compile(r"(?<![\w./-])(?P<path>[a-z][\w-]*\.md)(?:#(?P<anchor>[\w-]+))?")
# [text](target) in Markdown: relative link targets
_MARKDOWN_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
# a private module in dotted form, such as kongtask._pg
_PRIVATE_MODULE = re.compile(r"(?<![\w.])kongtask\.(?P<module>(?:testing\.)?_(?!_)\w+)")
# absolute paths of a development machine
_MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home/\w+)/[\w./-]+")

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SLUG_CLEAN = re.compile(r"[^\w\u4e00-\u9fff\- ]")


@dataclass(frozen=True)
class Problem:
    """One reference that leads nowhere."""

    file: str
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}: {self.why}"


#: Makes a :class:`Problem` at the line being checked: ``problem(text, why)``.
_Make = Callable[[str, str], Problem]


def slugify(title: str) -> str:
    """MyST-Parser's default heading slug (GitHub's rule): lower case, spaces to dashes,
    anything but word characters, dashes and spaces dropped."""
    return _SLUG_CLEAN.sub("", title.lower().replace(" ", "-"))


def _heading_text(markdown: str) -> str:
    """The text of a heading as MyST reads it for its slug: link targets, emphasis
    markers and backticks dropped, the text of code spans and links kept."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)  # [text](target)
    text = re.sub(r"\{[\w:]+\}`([^`]*)`", r"\1", text)  # {role}`text`
    text = text.replace("`", "")
    return re.sub(r"(?<!\w)[*_]+|[*_]+(?!\w)", "", text)


def heading_anchors(markdown: str, levels: int = 3) -> set[str]:
    """The anchors MyST gives the headings of levels 1..``levels`` of a Markdown text."""
    anchors: set[str] = set()
    fenced = None
    for line in markdown.splitlines():
        fence = _FENCE.match(line)
        if fence:
            if fenced is None:
                fenced = fence.group(1)
            elif fence.group(1) == fenced:
                fenced = None
            continue
        if fenced is not None:
            continue
        heading = _HEADING.match(line)
        if heading is None or len(heading.group(1)) > levels:
            continue
        slug = slugify(_heading_text(heading.group(2)))
        unique, n = slug, 1
        while unique in anchors:
            unique, n = f"{slug}-{n}", n + 1
        anchors.add(unique)
    return anchors


class Checker:
    """Checks the references of the files of one tree (the repository, or a test's copy)."""

    def __init__(self, root: Path, pending: Iterable[str] = ()) -> None:
        self.root = root
        self.pending = frozenset(pending)
        self._anchors: dict[Path, set[str]] = {}

    def files(self) -> list[Path]:
        """The scanned files: tracked by git when the tree is a checkout, else all."""
        found: list[Path] = []
        try:
            listed = subprocess.run(
                ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                cwd=self.root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
            candidates = [self.root / name for name in listed]
        except (OSError, subprocess.CalledProcessError):
            candidates = [p for p in self.root.rglob("*") if p.is_file()]
        for path in candidates:
            rel = path.relative_to(self.root)
            if (
                not path.is_file()
                or SKIPPED_PARTS.intersection(rel.parts)
                or rel.as_posix() in NOT_SCANNED
            ):
                continue
            top = rel.parts[0]
            if str(rel) in SCANNED_FILES or (
                top in SCANNED_DIRS and (path.suffix in TEXT_SUFFIXES or str(rel) == ".ci/run")
            ):
                found.append(path)
        return sorted(found)

    def anchors(self, path: Path) -> set[str]:
        if path not in self._anchors:
            self._anchors[path] = heading_anchors(path.read_text(encoding="utf-8"))
        return self._anchors[path]

    def problems(self) -> list[Problem]:
        """Every problem once (a link's target is also a bare page name, for example)."""
        found = [p for path in self.files() for p in self.check_file(path)]
        return list({(p.file, p.line, p.text): p for p in reversed(found)}.values())[::-1]

    def check_file(self, path: Path) -> Iterator[Problem]:
        rel = path.relative_to(self.root).as_posix()
        is_markdown = path.suffix == ".md"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):

            def problem(text: str, why: str, number: int = number) -> Problem:
                return Problem(rel, number, text, why)

            for name in BRIEF_DOCUMENTS:
                if name in line and not (self.root / name).exists() and rel not in self.pending:
                    yield problem(
                        name,
                        "names a design document that is not in this repository; state the "
                        "rule here and point at docs/design/ (or a test, or a public URL)",
                    )
            for match in _MACHINE_PATH.finditer(line):
                yield problem(match.group(0), "an absolute path of a development machine")
            for match in _PATH_REFERENCE.finditer(line):
                yield from self._resolve(problem, match.group("path"), match.group("anchor"))
            for match in _TOP_LEVEL_DOCUMENT.finditer(line):
                if match.group("path") not in BRIEF_DOCUMENTS:
                    yield from self._resolve(problem, match.group("path"), match.group("anchor"))
            for match in _BARE_PAGE.finditer(line):
                yield from self._resolve_page(
                    problem, path, match.group("path"), match.group("anchor")
                )
            for match in _PRIVATE_MODULE.finditer(line):
                module = match.group("module").replace(".", "/")
                base = self.root / "kongtask" / module
                if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
                    yield problem(match.group(0), "no such module in kongtask/")
            if is_markdown:
                for match in _MARKDOWN_LINK.finditer(line):
                    yield from self._resolve_link(problem, path, match.group("target"))

    def _resolve(self, problem: _Make, name: str, anchor: str | None) -> Iterator[Problem]:
        if name.startswith(GENERATED):
            return
        target = self.root / name
        if not target.exists():
            yield problem(name, "no such file in the repository")
        elif anchor is not None:
            yield from self._check_anchor(problem, target, name, anchor)

    def _resolve_page(
        self, problem: _Make, source: Path, name: str, anchor: str | None
    ) -> Iterator[Problem]:
        """A page named without a folder: next to the file that names it, else in docs/."""
        for folder in (source.parent, self.root / "docs", self.root):
            target = folder / name
            if target.exists():
                if anchor is not None:
                    yield from self._check_anchor(problem, target, name, anchor)
                return
        yield problem(name, "no such page next to this file, in docs/ or at the top level")

    def _resolve_link(self, problem: _Make, source: Path, target: str) -> Iterator[Problem]:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("<"):
            return  # a URL (https:, mailto:, ...)
        name, _, anchor = target.partition("#")
        path = source if not name else (source.parent / name).resolve()
        if name and not path.exists():
            yield problem(target, "the link's target does not exist")
        elif anchor and path.suffix == ".md":
            yield from self._check_anchor(problem, path, name or path.name, anchor)

    def _check_anchor(
        self, problem: _Make, target: Path, name: str, anchor: str
    ) -> Iterator[Problem]:
        if target.suffix == ".md" and anchor not in self.anchors(target):
            yield problem(f"{name}#{anchor}", "no heading of that file has this anchor")


def main() -> int:
    problems = Checker(ROOT, PENDING_BRIEF_CLEANUP).problems()
    for found in problems:
        print(found)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
