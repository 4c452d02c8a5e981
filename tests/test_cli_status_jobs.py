"""``kongtask status`` and ``kongtask jobs …``: every verb, the confirmation and ``--json``.

Rules: real PostgreSQL, the CLI run in-process through ``kongtask.main``; a running job is
held by a real worker pool.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
from _cli_helpers import cli_status
from _worker_helpers import JOB_FIELDS

import kongtask

FAR = datetime.now(UTC) + timedelta(days=1)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await cli_status(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = await run(capsys, *argv, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


@pytest.fixture
async def client(worker_dsn: str) -> AsyncIterator[kongtask.Client]:
    async with kongtask.open_client(worker_dsn) as c:
        yield c


async def _states(client: kongtask.Client) -> dict[int, str]:
    return {i.job.id: i.state for i in await client.list_jobs(limit=1000)}


async def test_status_json_shape_and_tables(
    worker_dsn: str, client: kongtask.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    started = trio.Event()

    async def hang(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        started.set()
        await trio.sleep_forever()

    await client.add_job("hang", queue_name="q")
    await client.add_job("hang", queue_name="q")
    await client.add_job("mail", run_at=FAR)
    await client.add_jobs([kongtask.JobSpec("mail") for _ in range(3)])
    async with kongtask.open_worker(worker_dsn, {"hang": hang}, poll_interval=0.1) as worker:
        await started.wait()
        doc = await run_json(capsys, "status", "-c", worker_dsn)
        assert set(doc) == {"schema", "at", "totals", "oldest_ready_age", "queues", "pools"}
        assert doc["schema"] == "graphile_worker"
        assert doc["totals"] == {
            "ready": 3,
            "waiting_on_queue": 1,
            "scheduled": 1,
            "retrying": 0,
            "running": 1,
            "permanently_failed": 0,
        }
        assert doc["oldest_ready_age"] >= 0
        assert [(q["task"], q["queue"]) for q in doc["queues"]] == [
            ("hang", "q"),
            ("mail", None),
        ]
        hang_q = doc["queues"][0]
        assert set(hang_q) == {
            "task",
            "queue",
            "ready",
            "waiting_on_queue",
            "scheduled",
            "retrying",
            "running",
            "permanently_failed",
            "oldest_ready_age",
            "oldest_lock_age",
        }
        assert (hang_q["running"], hang_q["waiting_on_queue"], hang_q["ready"]) == (1, 1, 0)
        (pool,) = [p for p in doc["pools"] if p["pool_id"] == worker.pool_id]
        assert set(pool) == {
            "kind",
            "pool_id",
            "id_suffix",
            "alive",
            "jobs",
            "queues",
            "oldest_lock_age",
            "connected_at",
            "client_addr",
        }
        assert (pool["kind"], pool["alive"], pool["jobs"], pool["queues"]) == (
            "kongtask",
            True,
            1,
            1,
        )
        code, out, err = await run(capsys, "status", "-c", worker_dsn)
        assert (code, err) == (0, "")
        assert "waiting" in out
        assert worker.pool_id in out
        # --watch with --json: one document per refresh
        code, out, err = await run(
            capsys, "status", "-c", worker_dsn, "--watch", "0.01", "--count", "2", "--json"
        )
        assert (code, err) == (0, "")
        docs = [json.loads(line) for line in out.splitlines()]
        assert [d["totals"]["running"] for d in docs] == [1, 1]
        code, out, err = await run(
            capsys, "status", "-c", worker_dsn, "--watch", "0.01", "--count", "2"
        )
        assert (code, err) == (0, "")
        assert "hang" in out


async def test_jobs_list_filters_pages_and_json(
    worker_dsn: str, client: kongtask.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = await client.add_jobs(
        [kongtask.JobSpec("a" if i % 2 else "b", {"i": i}) for i in range(7)]
    )
    a_ids = [j.id for j in jobs if j.task_identifier == "a"]
    doc = await run_json(capsys, "jobs", "list", "-c", worker_dsn, "--task", "a", "--limit", "2")
    assert set(doc) == {"jobs", "next_after_id"}
    assert [j["id"] for j in doc["jobs"]] == a_ids[:2]
    assert set(doc["jobs"][0]) == set(JOB_FIELDS) | {"state", "lock_age"}
    assert doc["jobs"][0]["state"] == "ready"
    assert doc["next_after_id"] == a_ids[1]
    doc = await run_json(
        capsys, "jobs", "list", "-c", worker_dsn, "--task", "a", "--after-id", str(a_ids[1])
    )
    assert [j["id"] for j in doc["jobs"]] == a_ids[2:]
    assert doc["next_after_id"] is None
    doc = await run_json(capsys, "jobs", "list", "-c", worker_dsn, "--state", "scheduled")
    assert doc["jobs"] == []
    code, out, err = await run(capsys, "jobs", "list", "-c", worker_dsn, "--limit", "3")
    assert (code, err) == (0, "")
    assert f"--after-id {jobs[2].id}" in out
    with pytest.raises(SystemExit) as exited:  # argparse lists the valid states
        await kongtask.main(["jobs", "list", "-c", worker_dsn, "--state", "nope"])
    assert exited.value.code == 2
    assert "waiting_on_queue" in capsys.readouterr().err


async def test_actions_by_id_and_json(
    worker_dsn: str, client: kongtask.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = await client.add_job("t", max_attempts=1)
    await client.permanently_fail_jobs([dead.id], "boom")
    later = await client.add_job("t", run_at=FAR)
    keyed = await client.add_job("t", job_key="k1")
    plain = await client.add_job("t")
    assert (await _states(client))[dead.id] == "permanently_failed"

    doc = await run_json(capsys, "jobs", "retry", "-c", worker_dsn, str(dead.id), "999999")
    assert set(doc) == {
        "action",
        "selected",
        "changed",
        "skipped_locked",
        "skipped_without_key",
        "not_found",
    }
    assert (doc["action"], doc["selected"], doc["not_found"]) == ("retry", 1, [999999])
    assert [j["id"] for j in doc["changed"]] == [dead.id]
    assert set(doc["changed"][0]) == set(JOB_FIELDS)
    assert (await _states(client))[dead.id] == "ready"

    await run_json(
        capsys, "jobs", "reschedule", "-c", worker_dsn, str(later.id), "--priority", "-5",
        "--run-at", "2020-01-01T00:00:00Z",
    )  # fmt: skip
    (info,) = await client.list_jobs(ids=[later.id])
    assert (info.state, info.job.priority) == ("ready", -5)

    doc = await run_json(capsys, "jobs", "fail", "-c", worker_dsn, str(plain.id), "--message", "x")
    assert doc["changed"][0]["last_error"] == "x"
    assert (await _states(client))[plain.id] == "permanently_failed"

    doc = await run_json(capsys, "jobs", "remove", "-c", worker_dsn, str(keyed.id), str(plain.id))
    assert [j["id"] for j in doc["changed"]] == [keyed.id]
    assert doc["skipped_without_key"] == [plain.id]

    doc = await run_json(capsys, "jobs", "complete", "-c", worker_dsn, str(plain.id))
    assert [j["id"] for j in doc["changed"]] == [plain.id]
    assert set(await _states(client)) == {dead.id, later.id}

    code, out, err = await run(capsys, "jobs", "complete", "-c", worker_dsn, str(dead.id))
    assert (code, err) == (0, "")
    assert out.startswith("complete: 1 of 1 selected job(s) changed")


async def test_jobs_locked_by_other_pools_are_left_alone(
    worker_dsn: str, client: kongtask.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    # locked as a Node pool (an unmarked pool id) leaves it: the admin functions skip it
    job = await client.add_job("t")
    await client._db.execute(
        "update graphile_worker._private_jobs set locked_at = now(), attempts = 1,"
        " locked_by = 'pool-0123456789abcdef01' where id = $1",
        job.id,
    )
    doc = await run_json(capsys, "jobs", "fail", "-c", worker_dsn, "--state", "running")
    assert (doc["selected"], doc["changed"], doc["skipped_locked"]) == (1, [], [job.id])
    _, out, _ = await run(capsys, "jobs", "retry", "-c", worker_dsn, str(job.id))
    assert f"left alone (locked by a pool): {job.id}" in out
    assert (await _states(client)) == {job.id: "running"}


async def test_confirmation_above_the_threshold(
    worker_dsn: str,
    client: kongtask.Client,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await client.add_jobs([kongtask.JobSpec("bulk") for _ in range(12)])
    argv = ["jobs", "fail", "-c", worker_dsn, "--task", "bulk"]

    async def failed() -> int:
        states = await _states(client)
        return sum(1 for s in states.values() if s == "permanently_failed")

    # no terminal to ask on: refuse, change nothing
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    code, _, err = await run(capsys, *argv)
    assert code == 1
    assert "would touch 12 jobs" in err
    assert "--yes" in err
    assert await failed() == 0
    # a terminal, answered "no"
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter(["n", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    code, _, err = await run(capsys, *argv)
    assert (code, err) == (1, "Nothing done.\n")
    assert await failed() == 0
    # answered "yes"
    code, _, err = await run(capsys, *argv)
    assert (code, err) == (0, "")
    assert await failed() == 12
    # --yes and --confirm-above skip the question
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert (await run(capsys, "jobs", "retry", "-c", worker_dsn, "--task", "bulk", "--yes"))[0] == 0
    assert await failed() == 0
    code, _, err = await run(
        capsys, "jobs", "complete", "-c", worker_dsn, "--task", "bulk", "--confirm-above", "12"
    )
    assert (code, err) == (0, "")
    assert await _states(client) == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["jobs", "fail", "-c", "DSN", "1", "--task", "a"], "job ids or filters, not both"),
        (["jobs", "fail", "-c", "DSN"], "at least one filter"),
        (["jobs", "reschedule", "-c", "DSN", "1"], "reschedule needs"),
        (["jobs", "reschedule", "-c", "DSN", "1", "--run-at", "soon"], "not an ISO 8601"),
        (["status", "-c", "DSN", "--watch", "0"], "--watch needs a positive"),
        (["status", "-c", "DSN", "--count", "2"], "--count needs --watch"),
        (["jobs", "list", "-c", "DSN", "--limit", "0"], "limit must be"),
    ],
)
async def test_bad_input_is_one_line(
    worker_dsn: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = await run(capsys, *(worker_dsn if a == "DSN" else a for a in argv))
    assert code == 1
    assert out == ""
    assert err.startswith("kongtask: ")
    assert message in err
