"""What an operator meets: CLI consistency, configuration sources, logs (issue 11: 5-7).

Rules: real PostgreSQL, real processes for CLI behaviour (waited for under ``fail_after``),
MockClock for the start-up backoff arithmetic, a real TCP proxy for database outages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_cli_run import kongtask_argv
from test_worker import wait_until

import kongtask
from kongtask._connect_wait import DatabaseUnreachable, retry_while_unreachable
from kongtask._pg import Database, open_database
from kongtask._settings import RUN_OPTIONS, SettingsError, resolve_settings
from kongtask._worker import open_worker

S = "graphile_worker"
J = f"{S}._private_jobs"
CLI = [sys.executable, "-c", "import kongtask._cli as c; c.run_cli()"]


async def _cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    with trio.fail_after(60):
        proc = await trio.run_process(
            kongtask_argv(*args),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def _schema_exists(dsn: str) -> bool:
    async with open_database(dsn, max_size=1) as db:
        return bool(await db.fetchval(f"select to_regnamespace('{S}') is not null"))


def _ok_tasks(directory: Path) -> str:
    """A tasks module in ``directory`` (run the command there); its ``--tasks`` value."""
    (directory / "ok_tasks.py").write_text("async def t(job, ctx):\n    pass\ntasks = {'t': t}\n")
    return "ok_tasks"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


# --- 5. CLI consistency ------------------------------------------------------------------


async def test_log_level_works_after_the_verb(kongtask_blank_dsn: str) -> None:
    code, out, err = await _cli("migrate", "-c", kongtask_blank_dsn, "--log-level", "WARNING")
    assert (code, err) == (0, ""), err  # no "applied migration" INFO lines
    assert out == "Schema 'graphile_worker' is up to date\n"
    code, _, err = await _cli("--log-level", "ERROR", "migrate", "-c", kongtask_blank_dsn)
    assert (code, err) == (0, "")
    code, _, err = await _cli(
        "migrate", "-c", kongtask_blank_dsn, env={"KONGTASK_LOG_LEVEL": "DEBUG"}
    )
    assert code == 0
    assert "DEBUG" in err


async def test_migrate_silent_prints_and_logs_nothing(kongtask_blank_dsn: str) -> None:
    code, out, err = await _cli("migrate", "-c", kongtask_blank_dsn, "--silent")
    assert (code, out, err) == (0, "", "")
    assert await _schema_exists(kongtask_blank_dsn)


async def test_run_checks_its_tasks_before_it_migrates(
    kongtask_blank_dsn: str, tmp_path: Path
) -> None:
    code, _, err = await _cli(
        "run", "-c", kongtask_blank_dsn, "--tasks", "no_such_tasks_module", cwd=tmp_path
    )
    assert code == 1
    assert "cannot import 'no_such_tasks_module'" in err
    (tmp_path / "odd_tasks.py").write_text("def t(job):\n    pass\ntasks = {'t': t}\n")
    code, _, err = await _cli("run", "-c", kongtask_blank_dsn, "--tasks", "odd_tasks", cwd=tmp_path)
    assert code == 1
    assert "task 't': the handler 't' cannot be called as handler(job, ctx)" in err
    (tmp_path / "crontab").write_text("not a crontab line\n")
    (tmp_path / "ok_tasks.py").write_text("async def t(job, ctx):\n    pass\ntasks = {'t': t}\n")
    code, _, err = await _cli("run", "-c", kongtask_blank_dsn, "--tasks", "ok_tasks", cwd=tmp_path)
    assert code == 1
    assert "crontab" in err
    assert not await _schema_exists(kongtask_blank_dsn)  # the database was not touched


async def test_run_gives_up_on_a_down_database_after_connect_timeout(tmp_path: Path) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    code, _, err = await _cli(
        "run", "-c", dsn, "--tasks", _ok_tasks(tmp_path), "--connect-timeout", "1.2", cwd=tmp_path
    )
    assert code == 1
    lines = err.strip().splitlines()
    retries = [line for line in lines if "cannot reach the database" in line and "retrying" in line]
    assert len(retries) >= 2  # 0.5 s, then what is left of the 1.2 s
    assert "Traceback" not in err
    assert lines[-1].startswith("kongtask: cannot reach the database (")
    assert "gave up after" in lines[-1]
    # with --log-format json the last word is a JSON object too
    code, _, err = await _cli(
        "run", "-c", dsn, "--tasks", _ok_tasks(tmp_path), "--connect-timeout", "0",
        "--log-format", "json", cwd=tmp_path,
    )  # fmt: skip
    assert code == 1
    last = [json.loads(line) for line in err.splitlines()][-1]
    assert last["level"] == "ERROR"
    assert last["message"].startswith("cannot reach the database (")


async def test_sigterm_while_waiting_for_the_database_exits_0(tmp_path: Path) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    proc = await trio.lowlevel.open_process(
        kongtask_argv("run", "-c", dsn, "--tasks", _ok_tasks(tmp_path), "--connect-timeout", "600"),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    err = b""
    try:
        with trio.fail_after(30):
            while b"retrying in" not in err:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, err.decode()
                err += chunk
            proc.send_signal(signal.SIGTERM)
            while chunk := await proc.stderr.receive_some(4096):
                err += chunk
            assert await proc.wait() == 0, err.decode()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert b"SIGTERM: stopping before the database was reached" in err
    assert b"Traceback" not in err


class Proxy:
    """A TCP proxy to a PostgreSQL port that can refuse, and reset every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refusing = False
        self._conns: set[tuple[trio.SocketStream, trio.SocketStream, trio.CancelScope]] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    @staticmethod
    def _rst(stream: trio.SocketStream) -> None:
        with contextlib.suppress(OSError):  # linger 0: close() sends RST
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            self._rst(client)
            await client.aclose()
            return
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        with trio.CancelScope() as scope:
            entry = (client, server, scope)
            self._conns.add(entry)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            finally:
                self._conns.discard(entry)
        with trio.CancelScope(shield=True):
            await client.aclose()
            await server.aclose()

    @staticmethod
    async def _pump(
        src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        scope.cancel()

    def drop_all(self) -> None:
        for client, server, scope in list(self._conns):
            self._rst(client)
            self._rst(server)
            scope.cancel()


def _port_of(dsn: str) -> int:
    from urllib.parse import urlsplit

    port = urlsplit(dsn).port
    assert port is not None
    return port


def _via(dsn: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{port}"))


async def test_run_waits_for_a_database_that_comes_up_later(
    kongtask_dsn: str, tmp_path: Path
) -> None:
    """Nothing listens at first; the worker retries; a listener appears; the job runs."""
    (tmp_path / "ok_tasks.py").write_text("async def t(job, ctx):\n    pass\ntasks = {'t': t}\n")
    async with open_database(kongtask_dsn, max_size=1) as db:
        await db.execute(f"select {S}.add_job('t')")
        proxy = Proxy(_port_of(kongtask_dsn))
        proxy.port = _closed_port()
        argv = kongtask_argv(
            "run", "-c", _via(kongtask_dsn, proxy.port), "--tasks", "ok_tasks", "--once"
        )
        proc = await trio.lowlevel.open_process(
            argv, cwd=tmp_path, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        assert proc.stderr is not None
        err = b""
        try:
            with trio.fail_after(30):
                while b"retrying in" not in err:
                    chunk = await proc.stderr.receive_some(4096)
                    assert chunk, err.decode()
                    err += chunk
                async with trio.open_nursery() as nursery:
                    await nursery.start(proxy.serve)
                    while chunk := await proc.stderr.receive_some(4096):
                        err += chunk
                    assert await proc.wait() == 0, err.decode()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
        assert await db.fetchval(f"select count(*) from {J}") == 0
    assert b"completed t" in err


async def test_backoff_arithmetic(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[float] = []

    async def refused_four_times() -> str:
        attempts.append(trio.current_time())
        if len(attempts) <= 4:
            raise ConnectionRefusedError("refused")
        return "up"

    start = trio.current_time()
    assert await retry_while_unreachable(refused_four_times, 60) == "up"
    assert [round(t - start, 3) for t in attempts] == [0, 0.5, 1.5, 3.5, 7.5]

    attempts.clear()

    async def always_refused() -> str:
        attempts.append(trio.current_time())
        raise ConnectionRefusedError("refused")

    start = trio.current_time()
    with pytest.raises(DatabaseUnreachable, match=r"gave up after 7 attempt\(s\) in 20 s"):
        await retry_while_unreachable(always_refused, 20)
    # 0.5, 1, 2, 4, 8, then capped at 10 but cut to what is left of the 20 s
    assert [round(t - start, 3) for t in attempts] == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 20]

    attempts.clear()
    with pytest.raises(DatabaseUnreachable):
        await retry_while_unreachable(always_refused, 0)
    assert len(attempts) == 1

    class AuthFailed(Exception):
        sqlstate = "28P01"

    async def auth_failed() -> str:
        raise AuthFailed("password authentication failed")

    with pytest.raises(AuthFailed):
        await retry_while_unreachable(auth_failed, 60)


async def test_second_signal_names_the_handler_thread_it_waits_for(
    worker_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "sync_tasks.py").write_text(
        "import pathlib, time\n"
        "def stuck(job, ctx):\n"
        "    pathlib.Path('started').touch()\n"
        "    while not pathlib.Path('release').exists():\n"
        "        time.sleep(0.02)\n"
        "tasks = {'stuck': stuck}\n"
    )
    async with open_database(worker_dsn, max_size=1) as db:
        job_id = await db.fetchval(f"select id from {S}.add_job('stuck')")
    proc = await trio.lowlevel.open_process(
        kongtask_argv("run", "-c", worker_dsn, "--tasks", "sync_tasks", "--grace", "60"),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    err = b""
    try:
        await wait_until(lambda: _exists(tmp_path / "started"), limit=30)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            while b"again to stop at once" not in err:
                err += await proc.stderr.receive_some(4096)
            proc.send_signal(signal.SIGTERM)
            while b"waiting for stuck" not in err:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, err.decode()
                err += chunk
            (tmp_path / "release").touch()
            while chunk := await proc.stderr.receive_some(4096):
                err += chunk
            assert await proc.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    text = err.decode()
    assert "stopping at once" in text
    assert f"waiting for stuck (job {job_id}): its handler runs in thread 'kongtask stuck#" in text


def _exists(path: Path) -> bool:
    return path.exists()


# --- 6. configuration ----------------------------------------------------------------------


def _run_args(*argv: str) -> argparse.Namespace:
    from kongtask._cli import build_parser

    return build_parser().parse_args(["run", *argv])


RUN_KEYS = [option.key for option in RUN_OPTIONS]


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[tool.kongtask]\nconcurrency = 3\npoll_interval = 500\ngrace = 2\n"
        'forbidden_flags = ["a", "b"]\nschema = "from_file"\n'
    )
    env = {"KONGTASK_CONCURRENCY": "5", "KONGTASK_POLL_INTERVAL": "700", "DATABASE_URL": "x"}
    settings = resolve_settings(_run_args("-j", "7"), RUN_KEYS, env, tmp_path)
    values, sources = settings.values, settings.sources
    assert (values["concurrency"], sources["concurrency"]) == (7, "flag --jobs")
    assert (values["poll_interval"], sources["poll_interval"]) == (
        700,
        "env KONGTASK_POLL_INTERVAL",
    )
    assert (values["grace"], sources["grace"]) == (2.0, "file pyproject.toml [tool.kongtask]")
    assert values["forbidden_flags"] == ["a", "b"]
    assert (values["schema"], values["connection"]) == ("from_file", "x")
    assert (values["batch_size"], sources["batch_size"]) == (1000, "default")
    assert (values["prepared_statements"], values["log_format"]) == (True, "text")
    # graphile-worker's variables come after kongtask's own
    env = {"GRAPHILE_WORKER_SCHEMA": "gw", "KONGTASK_SCHEMA": "kt"}
    assert resolve_settings(_run_args(), RUN_KEYS, env, tmp_path).values["schema"] == "kt"
    flagged = _run_args("--no-prepared-statements", "--forbidden-flags", "x,y", "--once")
    values = resolve_settings(flagged, RUN_KEYS, {"KONGTASK_ONCE": "false"}, tmp_path).values
    assert (values["prepared_statements"], values["forbidden_flags"], values["once"]) == (
        False,
        ["x", "y"],
        True,
    )


def test_metrics_and_tracing_options_from_each_source(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[tool.kongtask]\ntracing = true\nmetrics_host = '127.0.0.1'\nmetrics_port = 9000\n"
    )
    env = {"KONGTASK_METRICS_PORT": "9464", "KONGTASK_PROPAGATE_TRACE_CONTEXT": "yes"}
    settings = resolve_settings(_run_args("--metrics-host", "::1"), RUN_KEYS, env, tmp_path)
    values, sources = settings.values, settings.sources
    assert (values["metrics_port"], sources["metrics_port"]) == (9464, "env KONGTASK_METRICS_PORT")
    assert (values["metrics_host"], sources["metrics_host"]) == ("::1", "flag --metrics-host")
    assert (values["tracing"], sources["tracing"]) == (True, "file pyproject.toml [tool.kongtask]")
    assert values["propagate_trace_context"] is True
    defaults = resolve_settings(_run_args(), RUN_KEYS, {}, tmp_path / "nowhere").values
    assert (defaults["metrics_port"], defaults["metrics_host"]) == (None, "0.0.0.0")
    assert (defaults["tracing"], defaults["propagate_trace_context"]) == (False, False)
    flagged = _run_args("--metrics-port", "0", "--tracing", "--propagate-trace-context")
    values = resolve_settings(flagged, RUN_KEYS, {}, tmp_path / "nowhere").values
    assert (values["metrics_port"], values["tracing"], values["propagate_trace_context"]) == (
        0,
        True,
        True,
    )


def test_explicit_config_file_and_env_config(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.kongtask]\nconcurrency = 3\n")
    (tmp_path / "worker.toml").write_text("concurrency = 4\nlog_format = 'json'\n")
    args = _run_args("--config", "worker.toml")
    settings = resolve_settings(args, RUN_KEYS, {}, tmp_path)
    assert settings.values["concurrency"] == 4  # pyproject.toml is not read then
    assert settings.sources["log_format"] == "file worker.toml"
    settings = resolve_settings(_run_args(), RUN_KEYS, {"KONGTASK_CONFIG": "worker.toml"}, tmp_path)
    assert settings.values["concurrency"] == 4


@pytest.mark.parametrize(
    ("argv", "env", "file", "message"),
    [
        ([], {"KONGTASK_CONCURRENCY": "ten"}, "", "env KONGTASK_CONCURRENCY: expected an integer"),
        ([], {"KONGTASK_CONCURRENCY": "0"}, "", "env KONGTASK_CONCURRENCY: must be at least 1"),
        ([], {"KONGTASK_ONCE": "maybe"}, "", "env KONGTASK_ONCE: expected true or false"),
        ([], {"KONGTASK_LOG_FORMAT": "xml"}, "", "env KONGTASK_LOG_FORMAT: expected one of"),
        ([], {"KONGTASK_GRACE": "-1"}, "", "env KONGTASK_GRACE: must be at least 0 s"),
        (["-j", "0"], {}, "", "flag --jobs: must be at least 1"),
        (["--metrics-port", "70000"], {}, "", "flag --metrics-port: must be at most 65535"),
        ([], {"KONGTASK_METRICS_PORT": "-1"}, "", "env KONGTASK_METRICS_PORT: must be at least 0"),
        ([], {}, "tracing = 'on'", "tracing: expected true or false"),
        ([], {}, "metrics_port = '9464'", "metrics_port: expected an integer"),
        ([], {}, "concurency = 2", "unknown key 'concurency' (did you mean 'concurrency'?)"),
        ([], {}, "poll_interval = 2.5", "poll_interval: expected an integer (milliseconds)"),
        ([], {}, "concurrency = true", "concurrency: expected an integer"),
        ([], {}, "tasks = [1]", "tasks: expected a list of strings"),
        ([], {}, "schema = ''", "schema: schema name must not be empty"),
        ([], {}, "concurrency = ", "pyproject.toml: not valid TOML"),
        (["--config", "missing.toml"], {}, "", "--config: no such file: missing.toml"),
    ],
)
def test_bad_values_name_their_source(
    tmp_path: Path, argv: list[str], env: dict[str, str], file: str, message: str
) -> None:
    if file:
        (tmp_path / "pyproject.toml").write_text(f"[tool.kongtask]\n{file}\n")
    with pytest.raises(SettingsError) as caught:
        resolve_settings(_run_args(*argv), RUN_KEYS, env, tmp_path)
    assert message in str(caught.value)
    assert caught.value.exit_code == 2


async def test_print_config_and_bad_values_in_a_real_process(
    kongtask_blank_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[tool.kongtask]\ngrace = 9\nconnection = 'postgresql://u:secret@h/db'\n"
    )
    code, out, err = await _cli(
        "run", "--print-config", "-j", "4", cwd=tmp_path, env={"KONGTASK_BATCH_SIZE": "50"}
    )
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["concurrency"][1:] == ["4", "flag", "--jobs"]
    assert rows["batch_size"][1:] == ["50", "env", "KONGTASK_BATCH_SIZE"]
    assert rows["grace"][1:] == ["(s)", "9.0", "file", "pyproject.toml", "[tool.kongtask]"]
    assert rows["poll_interval"][1:] == ["(ms)", "2000", "default"]
    assert "secret" not in out
    # a bad value: exit 2, one line naming the source, the database untouched
    code, out, err = await _cli(
        "run", "-c", kongtask_blank_dsn, "--tasks", _ok_tasks(tmp_path), cwd=tmp_path,
        env={"KONGTASK_MAX_POOL_SIZE": "many"},
    )  # fmt: skip
    assert code == 2
    assert err == "kongtask: env KONGTASK_MAX_POOL_SIZE: expected an integer, got 'many'\n"
    assert not await _schema_exists(kongtask_blank_dsn)


async def test_one_metrics_port_for_several_processes_is_refused(
    kongtask_blank_dsn: str, tmp_path: Path
) -> None:
    code, _, err = await _cli(
        "run", "-c", kongtask_blank_dsn, "--tasks", _ok_tasks(tmp_path), "--processes", "2",
        cwd=tmp_path, env={"KONGTASK_METRICS_PORT": "9464"},
    )  # fmt: skip
    assert code == 2
    assert err.startswith("kongtask: metrics_port 9464 with processes 2: one port serves one")
    assert not await _schema_exists(kongtask_blank_dsn)


async def test_run_configured_by_environment_and_file_alone(
    worker_dsn: str, tmp_path: Path
) -> None:
    """No flags at all: the values reach the worker (``once`` makes it stop)."""
    (tmp_path / "pyproject.toml").write_text(
        f"[tool.kongtask]\ntasks = ['{_ok_tasks(tmp_path)}']\nonce = true\nconcurrency = 2\n"
    )
    async with open_database(worker_dsn, max_size=1) as db:
        await db.execute(f"select {S}.add_job('t') from generate_series(1, 3)")
        code, _, err = await _cli(
            "run", cwd=tmp_path, env={"KONGTASK_CONNECTION": worker_dsn, "DATABASE_URL": ""}
        )
        assert code == 0, err
        assert "concurrency 2" in err
        assert await db.fetchval(f"select count(*) from {J}") == 0


def test_every_option_is_documented() -> None:
    """docs/worker.md's table names each option's flag, variable and TOML key."""
    doc = (Path(__file__).parent.parent / "docs" / "worker.md").read_text()
    for option in RUN_OPTIONS:
        row = next((line for line in doc.splitlines() if f"`{option.env}`" in line), None)
        assert row is not None, option.key
        assert option.flag in row, row
        assert f"`{option.key}`" in row, row
        if option.unit:
            assert option.unit in row, row


def test_duration_flags_name_their_unit() -> None:
    for option in RUN_OPTIONS:
        if option.unit:
            unit = {"ms": "milliseconds", "s": "seconds"}[option.unit]
            assert unit in option.help, option.key
            assert option.metavar in ("MS", "SECONDS")


# --- 7. logs ---------------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def capture(level: int = logging.INFO) -> Iterator[Records]:
    handler = Records()
    handler.setLevel(level)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


async def test_failures_log_type_message_and_first_traceback(
    db: Database, kongtask_dsn: str
) -> None:
    done = trio.Event()
    seen: list[int] = []

    async def flaky(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        seen.append(job.attempts)
        ctx.logger.info("trying")
        if job.attempts >= 2:
            done.set()
        raise KeyError("the answer")

    job_id = await db.fetchval(f"select id from {S}.add_job('flaky', queue_name => 'q')")
    with capture() as logs:
        async with open_worker(kongtask_dsn, {"flaky": flaky}, poll_interval=0.05) as worker:
            await wait_until(lambda: _attempts_seen(seen, 1), limit=20)
            await db.execute(f"update {J} set run_at = now() where id = $1", job_id)
            with trio.fail_after(20):
                await done.wait()
    failures = [r for r in logs.records if getattr(r, "event", None) == "job:error"]
    assert len(failures) >= 2
    first, second = failures[:2]
    assert "KeyError: 'the answer'" in first.getMessage()
    assert first.exc_info is not None
    assert first.exc_info[0] is KeyError
    assert second.exc_info is None  # later attempts: one line
    for record, attempt in ((first, 1), (second, 2)):
        assert (record.job_id, record.task, record.queue, record.attempt) == (  # type: ignore[attr-defined]
            job_id,
            "flaky",
            "q",
            attempt,
        )
        assert record.pool_id == worker.pool_id  # type: ignore[attr-defined]
    starts = [r for r in logs.records if getattr(r, "event", None) == "job:start"]
    assert starts
    assert starts[0].job_id == job_id  # type: ignore[attr-defined]
    own = [r for r in logs.records if r.name == "kongtask.job.flaky"]
    assert own
    assert own[0].job_id == job_id  # type: ignore[attr-defined]
    assert own[0].task == "flaky"  # type: ignore[attr-defined]


async def test_failure_log_names_a_base_exception_once(db: Database, kongtask_dsn: str) -> None:
    import asyncio

    done = trio.Event()

    async def poison(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        done.set()
        raise asyncio.CancelledError("from asyncio")

    await db.execute(f"select {S}.add_job('poison', max_attempts => 1)")
    with capture() as logs:
        async with open_worker(kongtask_dsn, {"poison": poison}, poll_interval=0.05):
            with trio.fail_after(20):
                await done.wait()
            await wait_until(lambda: any(_event(r) == "job:failed" for r in logs.records))
    failed = next(r for r in logs.records if _event(r) == "job:failed")
    assert failed.getMessage().endswith(
        "failed permanently after 1 attempt(s): CancelledError: from asyncio"
    )
    assert failed.exc_info is not None


def _event(record: logging.LogRecord) -> object:
    return getattr(record, "event", None)


async def _attempts_seen(seen: list[int], n: int) -> bool:
    return n in seen


async def test_log_format_json(worker_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "ok_tasks.py").write_text(
        "async def ok(job, ctx):\n    ctx.logger.info('hello %s', 1)\n"
        "async def bad(job, ctx):\n    raise ValueError('nope')\n"
        "tasks = {'ok': ok, 'bad': bad}\n"
    )
    async with open_database(worker_dsn, max_size=1) as db:
        ok_id = await db.fetchval(f"select id from {S}.add_job('ok', queue_name => 'q1')")
        bad_id = await db.fetchval(f"select id from {S}.add_job('bad')")
    code, _, err = await _cli(
        "run", "-c", worker_dsn, "--tasks", "ok_tasks", "--once", "--log-format", "json",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    entries = [json.loads(line) for line in err.splitlines()]  # every line is one object
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    by_event = {(e.get("event"), e.get("job_id")): e for e in entries}
    start = by_event[("job:start", ok_id)]
    assert (start["task"], start["queue"], start["attempt"]) == ("ok", "q1", 1)
    assert "pool-" in start["pool_id"]
    assert by_event[("job:success", ok_id)]["level"] == "INFO"
    assert by_event[("job:log", ok_id)]["message"].endswith("hello 1")
    failed = by_event[("job:error", bad_id)]
    assert "ValueError: nope" in failed["message"]
    assert "Traceback" in failed["exception"]  # the first failure carries it


async def test_database_outage_logs_one_warning_and_one_reconnected(
    kongtask_dsn: str,
) -> None:
    ran = trio.Event()

    async def job(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        ran.set()

    async with trio.open_nursery() as nursery:
        proxy = Proxy(_port_of(kongtask_dsn))
        await nursery.start(proxy.serve)
        dsn = _via(kongtask_dsn, proxy.port)
        async with (
            open_database(kongtask_dsn, max_size=1) as db,
            open_worker(dsn, {"job": job}, poll_interval=0.2) as worker,
        ):
            await wait_until(lambda: _listening(worker), limit=20)
            with capture(logging.INFO) as logs:
                proxy.refusing = True
                proxy.drop_all()
                # down long enough for every part of the pool to notice and retry
                await trio.sleep(3)
                proxy.refusing = False
                await db.execute(f"select {S}.add_job('job')")
                with trio.fail_after(30):
                    await ran.wait()
                await wait_until(lambda: _reconnected(logs), limit=30)
                lines = [
                    f"{r.levelname} {r.name}: {r.getMessage()}"
                    for r in logs.records
                    if r.levelno >= logging.INFO and not r.name.startswith("kongtask.job")
                ]
        nursery.cancel_scope.cancel()
    noisy = [line for line in lines if "started" not in line and "completed" not in line]
    warnings = [line for line in noisy if line.startswith(("WARNING", "ERROR"))]
    assert len(warnings) == 1, "\n".join(noisy)
    assert "lost its database connection" in warnings[0]
    assert sum("reconnected" in line for line in noisy) == 1, "\n".join(noisy)


async def _listening(worker: Any) -> bool:
    return bool(worker.statistics().listening)


async def _reconnected(logs: Records) -> bool:
    return any("reconnected" in r.getMessage() for r in logs.records)


async def test_postgres_restart_logs_one_warning_and_one_reconnected() -> None:
    """A real ``pg_ctl restart -m fast`` of a throwaway cluster under a working pool."""
    from kongtask._migrate import migrate
    from kongtask.testing._postgres import LocalCluster, find_pg_bindir

    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip("no local PostgreSQL binaries to restart")
    cluster = LocalCluster(bindir)
    dsn = await trio.to_thread.run_sync(cluster.start)
    try:
        async with open_database(dsn, max_size=1) as db:
            await migrate(db, S)
        ran: list[int] = []

        async def job(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
            ran.append(job.id)

        async with (
            open_worker(dsn, {"job": job}, concurrency=4, poll_interval=0.2) as worker,
        ):
            await wait_until(lambda: _listening(worker), limit=20)
            with capture(logging.INFO) as logs:
                restart = await trio.to_thread.run_sync(
                    cluster._run,
                    "pg_ctl", "-D", str(cluster.data), "-l", str(cluster.logfile),
                    "-m", "fast", "-w", "-t", "60", "restart",
                )  # fmt: skip
                assert restart.returncode == 0, restart.stderr
                async with open_database(dsn, max_size=1) as db:
                    job_id = await db.fetchval(f"select id from {S}.add_job('job')")
                await wait_until(lambda: job_id in ran, limit=30)
                await wait_until(lambda: _reconnected(logs), limit=30)
                lines = [
                    f"{r.levelname} {r.name}: {r.getMessage()}"
                    for r in logs.records
                    if "started" not in r.getMessage() and "completed" not in r.getMessage()
                ]
    finally:
        await trio.to_thread.run_sync(cluster.stop)
    warnings = [line for line in lines if line.startswith(("WARNING", "ERROR"))]
    assert len(warnings) == 1, "\n".join(lines)
    assert sum("reconnected" in line for line in lines) == 1, "\n".join(lines)


async def test_outage_log_arithmetic(autojump_clock: trio.testing.MockClock) -> None:
    from kongtask._outage import OutageLog, is_connection_lost

    class Serialization(Exception):
        sqlstate = "40001"

    class AdminShutdown(Exception):
        sqlstate = "57P01"

    assert is_connection_lost(ConnectionResetError())
    assert is_connection_lost(AdminShutdown())
    assert not is_connection_lost(Serialization())  # a working connection: not an outage
    logger = logging.getLogger("kongtask.test_outage")
    with capture(logging.DEBUG) as logs:
        outage = OutageLog(logger, "pool-x")
        outage.ok("listen")  # nothing was failing: nothing to say
        outage.failed("listen", ConnectionResetError("reset"))
        await trio.sleep(2)
        outage.failed("claim", ConnectionRefusedError("refused"))
        outage.failed("listen", ConnectionRefusedError("refused"))
        outage.ok("listen")
        assert outage.down  # the claims still fail
        await trio.sleep(1.5)
        outage.ok("claim")
        assert not outage.down
    levels = [(r.levelname, r.getMessage()) for r in logs.records if r.levelno >= logging.INFO]
    assert levels == [
        (
            "WARNING",
            "pool pool-x: lost its database connection (listen: ConnectionResetError: reset); "
            "retrying quietly until it is back",
        ),
        ("INFO", "pool pool-x: reconnected to the database after 3.5 s"),
    ]


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:secret@h:5432/d", "postgresql://u:***@h:5432/d"),
        (
            "postgresql://h/d?sslmode=require&password=secret",
            "postgresql://h/d?sslmode=require&password=***",
        ),
        ("host=h password='a secret' user=u", "host=h password=*** user=u"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
    ],
)
def test_print_config_hides_passwords(dsn: str, shown: str) -> None:
    from kongtask._settings import redact_password

    assert redact_password(dsn) == shown
