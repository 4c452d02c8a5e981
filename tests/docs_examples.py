"""Runs the code blocks of a documentation page, in order, as a reader would.

Rules (docs/writing-docs.md explains them to authors):

- ``python`` blocks run as scripts in the page's working directory, or are written to
  ``NAME`` there when their first line is ``# file: NAME``; ``bash``/``sh`` blocks run with
  ``bash -e -o pipefail``; a ``console`` block runs its ``$ `` lines and, when it shows
  output lines, they must match the real output (timestamps aside); ``sql`` runs on the
  page's database.
- Configuration is checked for real: ``toml`` is read by ``kongtask run --print-config``,
  ``crontab`` by kongtask's crontab parser, ``ini`` (a systemd unit) by ``systemd-analyze
  verify`` when present and its ``ExecStart`` by ``kongtask ... --print-config``, ``yaml`` by
  a YAML parser and the ``kongtask`` commands of its containers by ``--print-config``,
  ``json`` by a JSON parser. ``text`` is prose or a sample shown to the reader.
- Every block sees ``DATABASE_URL`` (a fresh database) and the test's ``python`` and
  ``kongtask`` first on ``PATH``; the example DSN ``postgresql:///app`` is replaced by it.
- A comment line right before the fence changes how a block runs:

  - ``<!-- run: background -->`` starts it and lets the following blocks run; at the end
    of the page it gets SIGINT and must exit 0.
  - ``<!-- run: inside NAME -->``: the block is a fragment; it runs inside the context
    ``CONTEXTS[NAME]`` (the set-up the page's text describes: a client, roles, ...).
  - ``<!-- run: pytest -->``: a test module; pytest runs it and it must pass.
  - ``<!-- run: arguments -->``: commands that run for minutes or hours; each line's
    program parses its arguments with its own parser, then stops.
  - ``<!-- run: by .ci/run -->``: each command line is one that ``.ci/run`` runs.
  - ``<!-- run: installed -->``: a ``pip install`` line; every requirement it names must
    be satisfied by the environment the examples run in.
  - ``<!-- file: NAME -->``: the block is also written to ``NAME`` (a crontab, a config).
  - ``<!-- output: NAME -->``: a sample of output; the program ``OUTPUTS[NAME]`` prints
    the real one and the sample must match it (times, pool ids and, in JSON, numbers aside).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from kongtask.testing import find_pg_bindir

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CODE_LANGUAGES = frozenset({"python", "bash", "sh", "console", "sql"})
CHECKED_LANGUAGES = frozenset({"toml", "crontab", "ini", "yaml", "json"})
SHOWN_LANGUAGES = frozenset({"text"})
EXAMPLE_DSNS = ("postgresql:///app", "postgres:///app")
FENCE = re.compile(
    r"(?:^[ \t]*<!-- (?P<marker>[\w-]+)(?::[ \t]*(?P<note>[^\n]*?))? -->\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>\{?[\w-]*\}?)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
RUN_MODES = ("background", "pytest", "arguments", "by .ci/run", "installed")
BLOCK_TIMEOUT = 300.0  # generous: the machine may be busy; a block that hangs still fails

# The set-up a fragment runs in (``<!-- run: inside NAME -->``): what the page's text
# around it says it is part of. ``{block}`` stands for the fragment, indented as the line.
CONTEXTS: dict[str, tuple[str, str]] = {
    # docs/client.md: the `open_client` block of the page's top
    "client": (
        "python",
        """\
import trio
import kongtask
from datetime import datetime, timedelta, timezone


async def main() -> None:
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    async with kongtask.open_client("postgresql:///app") as client:
        {block}

trio.run(main)
""",
    ),
    # top-level await: the body of an async function that trio runs
    "trio": (
        "python",
        """\
import trio


async def main() -> None:
    {block}

trio.run(main)
""",
    ),
    # docs/cron.md: an application's worker with its tasks and a second crontab file
    "cron": (
        "python",
        """\
from pathlib import Path

import trio

dsn = "postgresql:///app"
tasks = {name: lambda job, ctx: None for name in ["send_digest", "cleanup", "hourly"]}
Path("crontab.extra").write_text("0 * * * * hourly\\n")


async def main() -> None:
    {block}

trio.run(main)
""",
    ),
    # the roles and schemas an application has (cluster-wide roles: created once, no login)
    "roles": (
        "sql",
        """\
do $$
declare
  name text;
begin
  foreach name in array array['app', 'web_user', 'monitor'] loop
    if not exists (select from pg_roles where rolname = name) then
      execute format('create role %I nologin', name);
    end if;
  end loop;
end $$;
create schema if not exists app;
{block}
""",
    ),
    # a test with its database (the pytest plugin's fixture) and the names it uses
    "test": (
        "pytest",
        """\
import pytest

from kongtask.testing.lifecycle import (
    InvariantViolation,
    ProtocolStatements,
    open_lifecycle_harness,
    run_lifecycle_machine,
)


def test_fragment(kongtask_dsn):
    dsn = kongtask_dsn
    {block}
""",
    ),
    # docs/testing.md: a schema that graphile-worker (Node, the real package) migrated
    "lifecycle": (
        "bash",
        """\
PYTHONPATH="$PYTHONPATH:{tests}" python -c 'import os, oracle
oracle.oracle_migrate(os.environ["DATABASE_URL"], schema="gw_test")'
{block}
""",
    ),
    # docs/worker.md: an application's module of tasks and a directory of task files
    "application": (
        "bash",
        """\
mkdir -p myapp tasks
printf 'def ping(job, ctx):\\n    print("pong", job.payload)\\n\\n\\ntasks = {"ping": ping}\\n' \\
    > myapp/tasks.py
touch myapp/__init__.py
printf 'def task(job, ctx):\\n    print("pong", job.payload)\\n' > tasks/ping.py
{block}
""",
    ),
    # docs/worker.md: an accounts table and a worker whose `transfer` job moves money
    "transfer": (
        "python",
        """\
import psycopg
import trio

import kongtask

{block}

async def main() -> None:
    with psycopg.connect("postgresql:///app", autocommit=True) as conn:
        conn.execute("create table accounts (id int primary key, balance int not null)")
        conn.execute("insert into accounts values (1, 100), (2, 0)")
    async with kongtask.open_worker("postgresql:///app", {"transfer": transfer}) as worker:
        await worker.add_job("transfer", {"from": 1, "to": 2, "amount": 30})
        with trio.fail_after(60):
            while worker.statistics().completed < 1:
                assert worker.statistics().failed == 0, "the transfer failed"
                await trio.sleep(0.05)
    with psycopg.connect("postgresql:///app") as conn:
        rows = conn.execute("select id, balance from accounts order by id").fetchall()
    assert rows == [(1, 70), (2, 30)], rows

trio.run(main)
""",
    ),
}


# The programs whose real output a sample shows (``<!-- output: NAME -->``): the sample
# must equal their output, times and pool ids aside; a JSON sample must have the keys, in
# order, and the types of the real object.
OUTPUTS: dict[str, str] = {
    # docs/cron.md: the errors of a malformed crontab's lines
    "crontab errors": """\
import os
import tempfile
from pathlib import Path

import kongtask

os.chdir(tempfile.mkdtemp())  # not the page's ./crontab
good = "# a line that is fine\\n"
for bad in [good * 2 + "0 9 * * MON standup\\n", good * 6 + "0 4 * * * cleanup ?fill=soon\\n"]:
    Path("crontab").write_text(bad)
    try:
        kongtask.load_crontab_file("./crontab")
    except kongtask.CrontabError as error:
        print(error)
""",
    # docs/worker.md: the job:start record of `kongtask run --log-format json`
    "json job record": """\
import json
import os
import subprocess
from pathlib import Path

import psycopg

# a database of its own: the page's other workers neither take the job nor see a migration
dsn = os.environ["DATABASE_URL"]
name = "json_sample_" + str(os.getpid())
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute(f"create database {name}")
env = {**os.environ, "DATABASE_URL": dsn.rsplit("/", 1)[0] + "/" + name}
Path("mail_tasks.py").write_text(
    "def send_email(job, ctx):\\n    pass\\n\\n\\ntasks = {'send_email': send_email}\\n"
)
try:
    add = ["kongtask", "add", "send_email", '{"to": "a@example.com"}']
    subprocess.run(["kongtask", "migrate"], env=env, check=True, capture_output=True)
    subprocess.run(add, env=env, check=True, capture_output=True)
    run = ["kongtask", "run", "--log-format", "json", "--tasks", "mail_tasks", "--once"]
    done = subprocess.run(run, env=env, check=True, capture_output=True, text=True)
finally:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"drop database {name} with (force)")
records = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
print(json.dumps(next(r for r in records if r.get("event") == "job:start")))
""",
}


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
        return (
            self.lang in CODE_LANGUAGES or self.lang in CHECKED_LANGUAGES or self.marker == "output"
        )

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def _check_marker(page: str, marker: str | None, note: str | None) -> None:
    if marker is None:
        return
    if (marker == "file" and note) or (marker == "output" and note in OUTPUTS):
        return
    if marker == "run" and note is not None:
        if note in RUN_MODES:
            return
        if note.startswith("inside ") and note.removeprefix("inside ") in CONTEXTS:
            return
    raise AssertionError(f"docs/{page}: <!-- {marker}: {note} --> is not a marker")


def page_blocks(page: str, text: str | None = None) -> list[Block]:
    """The fenced blocks of ``docs/PAGE`` (or of ``text``, a page's content)."""
    if text is None:
        text = (DOCS / page).read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = match["indent"]
        body = textwrap.dedent(match["body"]) if indent else match["body"]
        _check_marker(page, match["marker"], match["note"])
        line = text.count("\n", 0, match.start("indent")) + 1
        found.append(Block(page, line, match["lang"], body, match["marker"], match["note"]))
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


def console_output(body: str) -> list[str]:
    """The lines of a console block that are not commands: the output it shows."""
    shown: list[str] = []
    continuing = False
    for line in body.splitlines():
        if not (line.startswith("$ ") or continuing):
            shown.append(line)
        continuing = (line.startswith("$ ") or continuing) and line.rstrip().endswith("\\")
    return shown


# pool ids are random: ``pool-`` (``otpool-`` for a run-once pool) and hex digits
_POOL_ID = re.compile(r"(?:ot)?pool-[0-9a-f]+(?:\.\.\.|…)?")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")
_LAST_EXECUTION = re.compile(r"(last execution: ).*")


def comparable(lines: list[str]) -> list[str]:
    """Output lines with what differs between runs (times) replaced by placeholders."""
    out = []
    for line in lines:
        line = _POOL_ID.sub("pool-<id>", _TIMESTAMP.sub("<time>", line.rstrip()))
        out.append(_LAST_EXECUTION.sub(r"\1<time or never>", line))
    return [line for line in out if line]


def same_shape(sample: object, real: object) -> bool:
    """JSON values of the same shape: objects with the same keys in the same order and
    values of the same shapes; strings equal but for times, pool ids and numbers."""
    if isinstance(sample, dict) and isinstance(real, dict):
        return list(sample) == list(real) and all(same_shape(sample[k], real[k]) for k in real)
    if isinstance(sample, str) and isinstance(real, str):
        [a, b] = [re.sub(r"\d+", "<n>", comparable([text])[0]) for text in (sample, real)]
        return a == b
    return sample is None or real is None or type(sample) is type(real)


def check_output(block: Block, body: str, real: str) -> None:
    """The sample ``body`` shows ``real``, the output of OUTPUTS[block.note]."""
    if block.lang == "json":
        [sample, got] = [[json.loads(line) for line in t.splitlines()] for t in (body, real)]
        assert len(sample) == len(got), f"{block.where}: real output:\n{real}"
        for shown, actual in zip(sample, got, strict=True):
            assert same_shape(shown, actual), f"{block.where}: real output:\n{real}"
    else:
        assert comparable(body.splitlines()) == comparable(real.splitlines()), (
            f"{block.where}: the output shown is not the real one:\n{real}"
        )


def with_context(name: str, body: str) -> tuple[str, str]:
    """The fragment ``body`` put into the context ``name``: (language, program)."""
    lang, template = CONTEXTS[name]
    template = template.replace("{tests}", str(ROOT / "tests"))
    [before, after] = template.split("{block}")
    indent = before[before.rfind("\n") + 1 :]
    inner = textwrap.indent(body, indent).lstrip(" ")
    return lang, before + inner + after


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
        # a test module of a page (``run: pytest``) makes its databases on the same server
        "KONGTASK_TEST_DSN": dsn,
    }


# Runs a program up to the end of its argument parsing: argparse.ArgumentParser.parse_args
# returns normally only for arguments the program accepts, and then this stops it.
_PARSE_ONLY = """\
import argparse, runpy, sys
parse_args = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *args, **kwargs):
    parse_args(self, *args, **kwargs)
    print("arguments accepted:", sys.argv)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
kind, target, *sys.argv[1:] = sys.argv[1:]
sys.argv[0] = target
if kind == "-m":
    runpy.run_module(target, run_name="__main__")
else:
    runpy.run_path(target, run_name="__main__")
"""


def _argument_checks(body: str) -> list[list[str]]:
    """The commands that check a ``run: arguments`` block's lines without running them."""
    commands = []
    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] in ("python", "python3"):
            if words[1] == "-m":
                commands.append([sys.executable, "-c", _PARSE_ONLY, "-m", *words[2:]])
            else:
                commands.append([sys.executable, "-c", _PARSE_ONLY, "path", *words[1:]])
        elif words[:3] == ["git", "worktree", "add"]:
            commands.append(
                ["git", "-C", str(ROOT), "rev-parse", "--verify", words[4] + "^{commit}"]
            )
        else:
            raise AssertionError(f"no way to check the arguments of {line!r}")
    return commands


def _run_by_ci(words: list[str]) -> bool:
    """``.ci/run`` has a line that runs ``words`` (maybe with more arguments after them)."""
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        try:
            ci = shlex.split(line, comments=True)
        except ValueError:  # a line continued on the next one
            continue
        if any(ci[i : i + len(words)] == words for i in range(len(ci))):
            return True
    return False


def _check_installed(block: Block, body: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[:4] == ["python3", "-m", "pip", "install"], f"{block.where}: {line}"
        for spec in words[4:]:
            requirement = Requirement(spec)
            names = [requirement.name] + [f"{requirement.name}-{e}" for e in requirement.extras]
            for name in names:
                try:
                    installed = version(name)
                except PackageNotFoundError:
                    raise AssertionError(f"{block.where}: {name} is not installed") from None
                if name == requirement.name:
                    assert requirement.specifier.contains(installed), (spec, installed)


def _print_config(words: list[str], env: dict[str, str], workdir: Path, where: str) -> str:
    """Run a ``kongtask ...`` command line with ``--print-config``: checks every option."""
    assert Path(words[0]).name == "kongtask", f"{where}: not a kongtask command: {words}"
    command = ["kongtask", *words[1:], "--print-config"]
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT
    )
    assert done.returncode == 0, f"{where}: {command} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def _check_config(block: Block, body: str, env: dict[str, str], workdir: Path) -> str:
    """Check a configuration block for real; returns what the checks printed."""
    if block.lang == "json":
        try:
            json.loads(body)  # one document
        except json.JSONDecodeError:
            for line in body.splitlines():  # or one per line
                if line.strip():
                    json.loads(line)
        return ""
    if block.lang == "crontab":
        import kongtask

        assert kongtask.crontab(body), f"{block.where}: no item"
        return ""
    if block.lang == "toml":
        document = tomllib.loads(body)
        config = workdir / "_config_check" / "pyproject.toml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(body)
        shown = _print_config(["kongtask", "run"], env, config.parent, block.where)
        sources = {line.split()[0]: line for line in shown.splitlines() if line.strip()}
        for key in document["tool"]["kongtask"]:
            assert "file pyproject.toml" in sources[key], f"{block.where}: {key}:\n{shown}"
        return shown
    if block.lang == "yaml":
        import yaml  # type: ignore[import-untyped]

        shown = ""
        for document in yaml.safe_load_all(body):
            pod = document.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                words = [*container.get("command", []), *container.get("args", [])]
                if words[:1] == ["kongtask"]:
                    shown += _print_config(words, env, workdir, block.where)
        return shown
    if block.lang == "ini":
        return _check_systemd_unit(block, body, env, workdir)
    raise AssertionError(f"{block.where}: no check for {block.lang}")


def _check_systemd_unit(block: Block, body: str, env: dict[str, str], workdir: Path) -> str:
    """A unit file: ``systemd-analyze verify`` (when present) and its ExecStart's options."""
    settings: dict[str, str] = {}
    for line in body.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, value)
    words = shlex.split(settings.get("ExecStart", ""))
    unit_env = dict(env)
    for assignment in shlex.split(settings.get("Environment", "")):
        key, value = assignment.split("=", 1)
        unit_env[key] = env["DATABASE_URL"] if key == "DATABASE_URL" else value
    shown = _print_config(words, unit_env, workdir, block.where)
    if shutil.which("systemd-analyze") and "User" in settings:
        # the unit as written names a user, a directory and a program of the target host:
        # verify it with this machine's equivalents
        unit = workdir / "kongtask-worker.service"
        kongtask = shutil.which("kongtask", path=env["PATH"])
        assert kongtask is not None
        text = body.replace(words[0], kongtask).replace(
            f"User={settings['User']}", f"User={os.getuid()}"
        )
        unit.write_text(text.replace(settings.get("WorkingDirectory", "-"), str(workdir)))
        done = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
        # it exits 0 on unknown keys and bad values, which it reports, naming the file
        complaints = [line for line in done.stderr.splitlines() if str(unit) in line]
        assert done.returncode == 0, f"{block.where}: systemd-analyze verify:\n{done.stderr}"
        assert not complaints, f"{block.where}: systemd-analyze verify:\n{done.stderr}"
    return shown


def _command(lang: str, body: str, workdir: Path, line: int) -> list[str]:
    if lang == "python":
        script = workdir / f"_block_{line}.py"
        script.write_text(body)
        return [sys.executable, script.name]
    if lang == "pytest":
        module = workdir / f"test_block_{line}.py"
        module.write_text(body)
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module.name]
    if lang == "console":
        body = console_commands(body)
    return ["bash", "-e", "-o", "pipefail", "-c", body]


def _run(command: list[str], block: Block, env: dict[str, str], workdir: Path) -> str:
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
    return output


def run_page(page: str, dsn: str, workdir: Path, text: str | None = None) -> PageRun:
    """Run every block of ``page`` (or of ``text``) in order; fail on the first that fails."""
    env = _env(dsn, workdir)
    result = PageRun(workdir)
    background: list[tuple[Block, subprocess.Popen[str]]] = []
    try:
        for block in page_blocks(page, text):
            if not block.runs:
                assert block.lang in SHOWN_LANGUAGES or block.lang.startswith("{"), (
                    f"{block.where}: nothing runs or checks a {block.lang!r} block"
                )
                continue
            body = block.body
            for example in EXAMPLE_DSNS:
                body = body.replace(example, dsn)
            if block.marker == "file" and block.note:
                (workdir / block.note).write_text(body)
            lang = block.lang
            if block.note and block.note.startswith("inside "):
                lang, body = with_context(block.note.removeprefix("inside "), body)
                for example in EXAMPLE_DSNS:
                    body = body.replace(example, dsn)
            elif block.note == "pytest":
                lang = "pytest"
            first = body.splitlines()[0] if body.strip() else ""
            if block.marker == "output":
                assert block.note is not None
                program = _command("python", OUTPUTS[block.note], workdir, block.line)
                check_output(block, body, _run(program, block, env, workdir))
            elif lang in CHECKED_LANGUAGES:
                result.outputs.append(_check_config(block, body, env, workdir))
            elif lang == "python" and first.startswith("# file: "):
                (workdir / first.removeprefix("# file: ").strip()).write_text(body)
            elif lang == "sql":
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(body.encode())
            elif block.note == "arguments":
                for command in _argument_checks(body):  # from the repository's root
                    result.outputs.append(_run(command, block, env, ROOT))
            elif block.note == "by .ci/run":
                for line in body.splitlines():
                    words = shlex.split(line, comments=True)
                    assert not words or _run_by_ci(words), f"{block.where}: not in .ci/run"
            elif block.note == "installed":
                _check_installed(block, body)
            elif block.note == "background":
                process = subprocess.Popen(
                    _command(lang, body, workdir, block.line),
                    cwd=workdir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                background.append((block, process))
            else:
                output = _run(_command(lang, body, workdir, block.line), block, env, workdir)
                result.outputs.append(output)
                shown = console_output(block.body) if lang == "console" else []
                if shown:
                    assert comparable(output.splitlines()) == comparable(shown), (
                        f"{block.where}: the output shown is not the real one:\n{output}"
                    )
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
