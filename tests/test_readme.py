"""README.md's Python blocks run as written, on an empty database, as a new user runs them.

The blocks are read from README.md itself, so the README and the code cannot drift apart.
Each runs in a child process against an empty database named ``app`` (what the README's
``postgresql:///app`` means), reached through libpq's ``PG*`` variables; when the tests
use a server they do not own (``KONGTASK_TEST_DSN``), the block's DSN is pointed at a
fresh database instead of touching one called ``app``.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from kongtask._pg import open_database
from kongtask.testing import PostgresServer

README = Path(__file__).resolve().parent.parent / "README.md"
README_DSN = "postgresql:///app"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme_blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def quickstart() -> str:
    """The README's complete program (the other Python blocks are fragments)."""
    [program] = [block for block in readme_blocks("python") if "trio.run(main)" in block]
    return program


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert README_DSN in quickstart()
    for block in readme_blocks("python"):  # fragments too: at least valid Python
        compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.fixture
async def app_database(
    kongtask_server: PostgresServer, kongtask_database_factory: object
) -> AsyncIterator[tuple[dict[str, str], str | None]]:
    """(environment, replacement DSN or None) for running a block against database app."""
    if kongtask_server.source == "env":
        make = kongtask_database_factory
        dsn: str = await trio.to_thread.run_sync(lambda: make(migrated=False))  # type: ignore[operator]
        yield dict(os.environ), dsn
        return
    url = urlsplit(kongtask_server.dsn)
    env = {
        **os.environ,
        "PGHOST": url.hostname or "",
        "PGPORT": str(url.port or 5432),
        "PGUSER": url.username or "",
        "PGPASSWORD": url.password or "",
    }
    env.pop("DATABASE_URL", None)
    async with open_database(kongtask_server.dsn, max_size=1) as admin:
        await admin.execute("drop database if exists app with (force)")
        await admin.execute("create database app")
        try:
            yield env, None
        finally:
            with trio.CancelScope(shield=True):
                await admin.execute("drop database if exists app with (force)")


async def test_quickstart_runs_logs_and_stops_cleanly_on_ctrl_c(
    app_database: tuple[dict[str, str], str | None], tmp_path: Path
) -> None:
    env, replacement_dsn = app_database
    code = quickstart()
    if replacement_dsn is not None:
        code = code.replace(README_DSN, replacement_dsn)
    program = tmp_path / "quickstart.py"
    program.write_text(code)
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(program)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    err = b""
    out = b""
    try:
        with trio.fail_after(60):
            # the handler's own log line shows the job ran (logging was never configured)
            async for chunk in proc.stderr:
                err += chunk
                if b"sending to a@example.com" in err:
                    break
            proc.send_signal(signal.SIGINT)  # what Ctrl+C sends
            async for chunk in proc.stderr:
                err += chunk
            async for chunk in proc.stdout:
                out += chunk
            status = await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    text = err.decode()
    assert status == 0, text
    assert "Traceback" not in text
    assert re.search(r"INFO kongtask\.job\.send_email: \[send_email#\d+\] sending to a@ex", text)
    assert "SIGINT: stopping gracefully" in text
    assert "does not exist" not in text  # the schema was installed by open_worker
    assert out == b""
