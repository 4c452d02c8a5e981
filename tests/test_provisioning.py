"""How the suite gets a real PostgreSQL: env DSN, local throwaway cluster, Docker, or a clear stop.

These tests start extra clusters of their own (about a second each), so they also prove
that the suite works whether or not another server is already running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kongtask import NoPostgresError
from kongtask.testing import (
    NO_SERVER_MESSAGE,
    PostgresServer,
    _postgres,
    docker_engine_available,
    find_pg_bindir,
    provide_postgres,
    run_sync_sql,
)

pytestmark = pytest.mark.skipif(find_pg_bindir() is None, reason="no local PostgreSQL binaries")


@pytest.fixture
def no_env_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KONGTASK_TEST_DSN", raising=False)


def test_env_dsn_wins_and_starts_nothing(
    kongtask_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KONGTASK_TEST_DSN", kongtask_server.dsn)
    monkeypatch.setattr(_postgres, "find_pg_bindir", lambda: pytest.fail("must not look"))
    with provide_postgres() as server:
        assert server == PostgresServer(kongtask_server.dsn, "env")


@pytest.mark.usefixtures("no_env_dsn")
def test_local_cluster_runs_unprivileged_and_is_deleted() -> None:
    with provide_postgres() as server:
        assert server.source == "local"
        rows = run_sync_sql(
            server.dsn,
            "select current_setting('fsync') as fsync, current_setting('port') as port",
        )
        result = rows[0]
        assert isinstance(result, list)
        (row,) = result
        assert row["fsync"] == "off"
        assert row["port"] != "5432"  # a private port: a server on 5432 is never touched
        data_dirs = [
            p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("kongtask-pg-*") if p.exists()
        ]
        mine = [p for p in data_dirs if (p / "data" / "postmaster.pid").exists()]
        root = next(p for p in mine if row["port"] in (p / "data" / "postmaster.pid").read_text())
        if os.geteuid() == 0:
            # initdb refuses root: docs/design/stack.md#postgresql-refuses-root
            assert (root / "data").stat().st_uid != 0
    assert not root.exists()
    with pytest.raises(OSError):
        run_sync_sql(server.dsn, "select 1")


@pytest.mark.usefixtures("no_env_dsn")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_still_stops_and_deletes_the_cluster(sig: signal.Signals) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from kongtask.testing._postgres import provide_postgres
        with provide_postgres() as server:
            print(server.dsn, flush=True)
            time.sleep(60)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "KONGTASK_TEST_DSN"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    dsn = proc.stdout.readline().strip()
    port = dsn.rsplit(":", 1)[1].split("/")[0]
    assert run_sync_sql(dsn, "select 1")
    proc.send_signal(sig)
    proc.wait(timeout=30)
    proc.stdout.close()
    deadline = time.monotonic() + 10
    while True:  # the server may take a moment to release its port after pg_ctl returns
        try:
            run_sync_sql(dsn, "select 1")
        except OSError:
            break
        assert time.monotonic() < deadline, f"cluster on port {port} survived {sig.name}"
        time.sleep(0.05)
    leftovers = [
        p
        for p in Path("/tmp").glob("kongtask-pg-*/data/postmaster.pid")
        if f"\n{port}\n" in p.read_text()
    ]
    assert leftovers == []


def test_docker_probe_says_why_when_no_engine_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kongtask-docker.sock")
    available, why_not = docker_engine_available()
    assert available is False
    assert "no Docker engine answered" in why_not


@pytest.mark.usefixtures("no_env_dsn")
def test_no_server_anywhere_fails_with_one_message_naming_three_ways(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no initdb, no pg_config
    monkeypatch.setattr(_postgres, "PG_BINDIR_GLOB", str(tmp_path / "none" / "*" / "bin"))
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kongtask-docker.sock")
    with pytest.raises(NoPostgresError) as excinfo, provide_postgres():
        pass
    message = str(excinfo.value)
    assert message == NO_SERVER_MESSAGE
    for way in ("KONGTASK_TEST_DSN", "initdb", "Docker"):
        assert way in message


def test_find_pg_bindir_prefers_path_then_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in ("12", "16", "9.6"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        for tool in ("initdb", "pg_ctl"):
            (bindir / tool).touch(mode=0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(_postgres, "PG_BINDIR_GLOB", str(tmp_path / "*" / "bin"))
    assert find_pg_bindir() == tmp_path / "16" / "bin"
    monkeypatch.setenv("PATH", str(tmp_path / "12" / "bin"))
    assert find_pg_bindir() == tmp_path / "12" / "bin"
