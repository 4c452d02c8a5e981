"""Runs the code blocks of a documentation page, in order, as a reader would.

Rules (docs/writing-docs.md explains them to authors):

- Blocks in ``python``, ``bash``, ``sh``, ``console`` and ``sql`` are code and run; others
  (``text``, ``json``, ``ini``, ``yaml``, ``crontab``, ...) are data shown to the reader.
- A python block whose first line is ``# file: NAME`` is written to ``NAME`` in the page's
  working directory (later blocks import or run it); any other python block runs as a
  script there; ``bash``/``sh`` blocks run with ``bash -e -o pipefail``; a ``console``
  block runs its ``$ `` lines; ``sql`` runs on the page's database.
- Every block sees ``DATABASE_URL`` (a fresh database) and the test's ``python`` and
  ``kongtask`` first on ``PATH``; the example DSN ``postgresql:///app`` is replaced by it.
- A comment line right before the fence changes that: ``<!-- not-run: REASON -->`` skips
  the block (the tests count these, so they stay few); ``<!-- run: background -->`` starts
  it and lets the following blocks run; at the end of the page it gets SIGINT and must
  exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from kongtask.testing import find_pg_bindir

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_LANGUAGES = frozenset({"python", "bash", "sh", "console", "sql"})
EXAMPLE_DSNS = ("postgresql:///app", "postgres:///app")
FENCE = re.compile(
    r"(?:^[ \t]*<!-- (?P<marker>[\w-]+)(?::[ \t]*(?P<note>[^\n]*?))? -->\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>\{?[\w-]*\}?)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
BLOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    body: str
    marker: str | None
    note: str | None

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGUAGES and self.marker != "not-run"

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def page_blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = match["indent"]
        body = textwrap.dedent(match["body"]) if indent else match["body"]
        marker = match["marker"]
        if marker not in (None, "not-run", "run"):
            raise AssertionError(f"docs/{page}: unknown marker <!-- {marker}: ... -->")
        if marker == "run" and match["note"] != "background":
            raise AssertionError(f"docs/{page}: <!-- run: {match['note']} --> is not a marker")
        if marker == "not-run" and not match["note"]:
            raise AssertionError(f"docs/{page}: <!-- not-run --> needs a reason")
        line = text.count("\n", 0, match.start("indent")) + 1
        found.append(Block(page, line, match["lang"], body, marker, match["note"]))
    return found


def console_commands(body: str) -> str:
    """The ``$ `` lines of a console block (with their ``\\`` continuations)."""
    commands: list[str] = []
    continuing = False
    for line in body.splitlines():
        if line.startswith("$ ") or continuing:
            commands.append(line[2:] if line.startswith("$ ") and not continuing else line)
            continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


@dataclass
class PageRun:
    """The outcome of running a page: each background process's exit code and output."""

    workdir: Path
    outputs: list[str] = field(default_factory=list)
    background: list[tuple[Block, int, str]] = field(default_factory=list)


def _env(dsn: str, workdir: Path) -> dict[str, str]:
    path = [str(Path(sys.executable).parent)]
    bindir = find_pg_bindir()
    if bindir is not None:
        path.append(str(bindir))
    return {
        **os.environ,
        "DATABASE_URL": dsn,
        "PATH": os.pathsep.join([*path, os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }


def _command(block: Block, body: str, workdir: Path) -> list[str]:
    if block.lang == "python":
        script = workdir / f"_block_{block.line}.py"
        script.write_text(body)
        return [sys.executable, script.name]
    if block.lang == "console":
        body = console_commands(body)
    return ["bash", "-e", "-o", "pipefail", "-c", body]


def run_page(page: str, dsn: str, workdir: Path) -> PageRun:
    """Run every runnable block of ``page`` in order; fail on the first that fails."""
    env = _env(dsn, workdir)
    result = PageRun(workdir)
    background: list[tuple[Block, subprocess.Popen[str]]] = []
    try:
        for block in page_blocks(page):
            if not block.runs:
                continue
            body = block.body
            for example in EXAMPLE_DSNS:
                body = body.replace(example, dsn)
            first = body.splitlines()[0] if body.strip() else ""
            if block.lang == "python" and first.startswith("# file: "):
                (workdir / first.removeprefix("# file: ").strip()).write_text(body)
                continue
            if block.lang == "sql":
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(body.encode())
                continue
            command = _command(block, body, workdir)
            if block.marker == "run":
                process = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                background.append((block, process))
                continue
            done = subprocess.run(
                command,
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
                check=False,
            )
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{block.where} exited {done.returncode}:\n{output}"
            result.outputs.append(output)
    finally:
        for block, process in background:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                output, _ = process.communicate(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
            result.background.append((block, process.returncode, output))
    return result
