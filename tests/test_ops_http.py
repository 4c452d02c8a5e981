"""The pool's HTTP endpoints over real HTTP: /healthz, /readyz (PostgreSQL stopped and back),
/metrics against a known workload, and ``kongtask healthcheck``.

Rules: as in test_worker.py; requests are made with urllib in a worker thread, or with raw
trio sockets for malformed requests. Nothing waits on wall-clock time except the absolute
``fail_after`` limits of the polls.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from _cli_helpers import cli_status
from test_worker import wait_until

import kongtask
import kongtask._metrics
from kongtask.testing._postgres import LocalCluster, find_pg_bindir


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    return await trio.to_thread.run_sync(functools.partial(_get, port, path, method))


async def status_of(port: int, path: str) -> int:
    return (await get(port, path))[0]


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


class Holder:
    """A task that keeps one job running until released: the pool then stays in its
    grace period after a shutdown request, with its endpoints up."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.release = trio.Event()

    async def __call__(self, job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        self.started.set()
        await self.release.wait()

    async def hold(self, dsn: str) -> None:
        async with kongtask.open_client(dsn) as client:
            await client.add_job("hold")
        await self.started.wait()


async def test_healthz_readyz_and_errors(worker_dsn: str) -> None:
    holder = Holder()
    async with kongtask.open_worker(
        worker_dsn,
        {"hold": holder},
        poll_interval=0.2,
        metrics_port=0,
        metrics_host="127.0.0.1",
    ) as worker:
        port = worker.metrics_port
        assert port
        code, body = await get(port, "/healthz")
        assert (code, json.loads(body)) == (200, {"status": "ok", "pool_id": worker.pool_id})
        await wait_until(functools.partial(_ready, port), limit=30)
        assert json.loads((await get(port, "/readyz"))[1]) == {"status": "ready", "reasons": []}
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/healthz", "POST"))[0] == 405
        code, body = await get(port, "/healthz", "HEAD")
        assert (code, body) == (200, b"")
        # a malformed request gets 400 and the pool keeps serving
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"garbage\r\n\r\n")
        reply = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                reply += chunk
        await stream.aclose()
        assert reply.startswith(b"HTTP/1.1 400 ")
        # a client that connects and says nothing does not block others
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        assert (await get(port, "/healthz"))[0] == 200
        await silent.aclose()
        # shutting down: not ready any more (served until the pool's nursery closes)
        await holder.hold(worker_dsn)
        worker.shutdown_nowait(grace=60)
        code, body = await get(port, "/readyz")
        assert code == 503
        assert "the pool is shutting down" in json.loads(body)["reasons"]
        assert (await get(port, "/healthz"))[0] == 200
        holder.release.set()
    # the server stopped with the pool
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def _ready(port: int) -> bool:
    return await status_of(port, "/readyz") == 200


async def test_metrics_of_a_known_workload(
    worker_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # read the database once, at the first scrape, however long the test takes
    monkeypatch.setattr(kongtask._metrics, "DB_REFRESH_SECONDS", 3600.0)

    async def ok(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        pass

    async def bad(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        raise RuntimeError("no")

    events: list[str] = []
    async with kongtask.open_client(worker_dsn) as client:
        await client.add_jobs([kongtask.JobSpec("ok") for _ in range(5)])
        await client.add_jobs([kongtask.JobSpec("bad", max_attempts=1) for _ in range(2)])
        await client.add_job("idle")
        await client.add_job("late", run_at=datetime.now(UTC) - timedelta(hours=2))
    async with kongtask.open_worker(
        worker_dsn,
        {"ok": ok, "bad": bad, "late": ok},
        concurrency=3,
        poll_interval=0.2,
        metrics_port=0,
        metrics_host="127.0.0.1",
        on_event=lambda e: events.append(e.name),  # the user's callback still runs
    ) as worker:
        await wait_until(lambda: worker.statistics().completed + worker.statistics().failed == 8)
        port = worker.metrics_port
        assert port
        code, body = await get(port, "/metrics")
        assert code == 200
        found = samples(body)
        assert found[("kongtask_jobs_started_total", (("task", "ok"),))] == 5
        assert found[("kongtask_jobs_started_total", (("task", "bad"),))] == 2
        assert found[("kongtask_jobs_completed_total", (("task", "ok"),))] == 5
        assert found[("kongtask_jobs_completed_total", (("task", "bad"),))] == 0
        assert found[("kongtask_jobs_failed_total", (("task", "bad"),))] == 2
        assert found[("kongtask_jobs_permanently_failed_total", (("task", "bad"),))] == 2
        assert found[("kongtask_job_run_seconds_count", (("task", "ok"),))] == 5
        inf = (("le", "+Inf"), ("task", "ok"))
        assert found[("kongtask_job_run_seconds_bucket", inf)] == 5
        assert found[("kongtask_job_run_seconds_sum", (("task", "ok"),))] >= 0
        assert found[("kongtask_job_queue_wait_seconds_count", (("task", "bad"),))] == 2
        # queue wait: run_at to start, so minutes for due jobs and two hours for the late one
        wait = "kongtask_job_queue_wait_seconds_bucket"
        assert found[(wait, (("le", "300.0"), ("task", "ok")))] == 5
        assert found[(wait, (("le", "3600.0"), ("task", "late")))] == 0
        assert found[(wait, (("le", "+Inf"), ("task", "late")))] == 1
        assert 7200 <= found[("kongtask_job_queue_wait_seconds_sum", (("task", "late"),))] < 7500
        assert found[("kongtask_pool_capacity_jobs", ())] == 3
        assert found[("kongtask_pool_claimed_jobs_total", ())] == 8
        assert found[("kongtask_pool_claim_seconds_count", ())] >= 1
        assert found[("kongtask_pool_flush_seconds_count", ())] >= 1
        assert found[("kongtask_pool_running_jobs", ())] == 0
        # database gauges: the two permanently failed jobs stay in the table
        state = (("state", "permanently_failed"), ("task", "bad"))
        assert found[("kongtask_queue_jobs", state)] == 2
        assert found[("kongtask_queue_jobs", (("state", "ready"), ("task", "idle")))] == 1
        assert found[("kongtask_oldest_ready_job_age_seconds", ())] >= 0
        # never a job id or payload as a label
        labels = {name for (_, pairs) in found for name, _ in pairs}
        assert labels <= {"task", "state", "le", "quantile"}
        # the database is read at most every few seconds, however often it is scraped
        await client_add_ready(worker_dsn)
        again = samples((await get(port, "/metrics"))[1])
        assert again[("kongtask_queue_jobs", (("state", "ready"), ("task", "idle")))] == 1
    assert "job:start" in events


async def client_add_ready(dsn: str) -> None:
    async with kongtask.open_client(dsn) as client:
        await client.add_job("idle")


async def test_metrics_without_prometheus_client(
    worker_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now fails
    async with kongtask.open_worker(
        worker_dsn, {}, metrics_port=0, metrics_host="127.0.0.1"
    ) as worker:
        assert worker.metrics_port
        code, body = await get(worker.metrics_port, "/metrics")
        assert code == 501
        assert b"kongtask[metrics]" in body
        assert (await get(worker.metrics_port, "/healthz"))[0] == 200


async def test_bad_port_is_a_clear_error(worker_dsn: str) -> None:
    with pytest.raises(kongtask.ConfigError, match="metrics_port"):
        async with kongtask.open_worker(worker_dsn, {}, metrics_port=70000):
            pass
    async with kongtask.open_worker(
        worker_dsn, {}, metrics_port=0, metrics_host="127.0.0.1"
    ) as first:
        with pytest.raises(OSError):
            async with kongtask.open_worker(
                worker_dsn, {}, metrics_port=first.metrics_port, metrics_host="127.0.0.1"
            ):
                pass


# --- PostgreSQL stopped and started again ---------------------------------------------


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip("needs local PostgreSQL binaries (initdb, pg_ctl)")
    c = LocalCluster(bindir)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _pg_ctl(c: LocalCluster, *args: str) -> None:
    options = " ".join(
        [f"-p {c.port}", f"-k {c.sockets}", *(f"-c {k}={v}" for k, v in c.settings.items())]
    )
    result = c._run("pg_ctl", "-D", str(c.data), "-l", str(c.logfile), "-o", options, *args)
    assert result.returncode == 0, result.stderr


async def test_readyz_follows_postgres_down_and_back(cluster: LocalCluster) -> None:
    from kongtask._migrate import migrate_sync

    dsn = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    await trio.to_thread.run_sync(migrate_sync, dsn, "graphile_worker")
    async with kongtask.open_worker(
        dsn, {}, poll_interval=0.2, metrics_port=0, metrics_host="127.0.0.1"
    ) as worker:
        port = worker.metrics_port
        assert port
        await wait_until(functools.partial(_ready, port), limit=30)
        await trio.to_thread.run_sync(
            functools.partial(_pg_ctl, cluster, "-m", "fast", "-w", "-t", "60", "stop")
        )

        async def unready() -> bool:
            code, body = await get(port, "/readyz")
            return code == 503 and "LISTEN connection is down" in body.decode()

        await wait_until(unready, limit=60)
        assert (await get(port, "/healthz"))[0] == 200  # alive, only not ready
        await trio.to_thread.run_sync(
            functools.partial(_pg_ctl, cluster, "-w", "-t", "60", "start")
        )
        await wait_until(functools.partial(_ready, port), limit=60)


# --- kongtask healthcheck -----------------------------------------------------------------


async def test_healthcheck_verb(worker_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    holder = Holder()
    async with kongtask.open_worker(
        worker_dsn,
        {"hold": holder},
        poll_interval=0.2,
        metrics_port=0,
        metrics_host="127.0.0.1",
    ) as worker:
        port = str(worker.metrics_port)
        await wait_until(functools.partial(_ready, worker.metrics_port or 0), limit=30)
        assert await cli_status(["healthcheck", "--port", port]) == 0
        await holder.hold(worker_dsn)
        worker.shutdown_nowait(grace=60)
        assert await cli_status(["healthcheck", "--port", port]) == 1
        assert "shutting down" in capsys.readouterr().err
        holder.release.set()
    assert await cli_status(["healthcheck", "--port", port]) == 1
    # without a port: the database answers and the schema is installed
    assert await cli_status(["healthcheck", "-c", worker_dsn]) == 0
    assert await cli_status(["healthcheck", "-c", worker_dsn, "-s", "nope"]) == 1
    assert "not installed" in capsys.readouterr().err


# --- kongtask run --metrics-port ------------------------------------------------------------


async def test_run_serves_metrics_port(worker_dsn: str, tmp_path: Path) -> None:
    import os
    import signal
    import socket
    import subprocess

    (tmp_path / "ops_tasks.py").write_text(
        "async def hello(job, ctx):\n    pass\n\ntasks = {'hello': hello}\n"
    )
    (tmp_path / "pyproject.toml").write_text("[tool.kongtask]\nmetrics_host = '127.0.0.1'\n")
    with socket.socket() as probe:  # a free port, released for the process to take
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with kongtask.open_client(worker_dsn) as client:
        await client.add_jobs([kongtask.JobSpec("hello") for _ in range(3)])
    proc = await trio.lowlevel.open_process(
        [
            sys.executable, "-c", "import kongtask._cli as c; c.run_cli()",
            "run", "-c", worker_dsn, "--tasks", "ops_tasks", "--poll-interval", "200",
        ],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
        # the port from the environment, the address from the file: the settings table
        env={**os.environ, "PYTHONUNBUFFERED": "1", "KONGTASK_METRICS_PORT": str(port)},
    )  # fmt: skip
    try:

        async def completed_three() -> bool:
            try:
                code, body = await get(port, "/metrics")
            except OSError:
                return False
            key = ("kongtask_jobs_completed_total", (("task", "hello"),))
            return code == 200 and samples(body).get(key) == 3

        await wait_until(completed_three, limit=60)
        await wait_until(functools.partial(_ready, port), limit=30)
        assert await cli_status(["healthcheck", "--port", str(port)]) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await proc.wait() == 0


async def test_readyz_turns_unready_when_claims_stop_succeeding(worker_dsn: str) -> None:
    from kongtask._pg import open_database

    async def noop(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        pass

    async with (
        open_database(worker_dsn, max_size=1) as db,
        kongtask.open_worker(
            worker_dsn, {"noop": noop}, poll_interval=0.2, metrics_port=0, metrics_host="127.0.0.1"
        ) as worker,
    ):
        port = worker.metrics_port
        assert port
        await wait_until(functools.partial(_ready, port), limit=30)
        locked = trio.Event()

        async def hold_table_lock(conn: Any) -> None:
            # the claim blocks on this lock: the LISTEN connection stays up meanwhile
            async with conn.transaction():
                await conn.execute("lock table graphile_worker._private_jobs in exclusive mode")
                locked.set()
                await release_aio.wait()

        release_aio = asyncio.Event()

        async def lock_until_released() -> None:
            await db.with_own_connection(hold_table_lock)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock_until_released)
            await locked.wait()

            async def unready() -> bool:
                code, body = await get(port, "/readyz")
                return code == 503 and "no claim has succeeded for" in body.decode()

            await wait_until(unready, limit=30)
            reasons = json.loads((await get(port, "/readyz"))[1])["reasons"]
            assert not [r for r in reasons if "LISTEN" in r]
            await db.run(_set, release_aio)
        await wait_until(functools.partial(_ready, port), limit=30)


async def _set(event: Any) -> None:
    event.set()
