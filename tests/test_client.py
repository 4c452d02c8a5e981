"""The client: adding jobs, job keys, validation, admin operations, cleanup and CLI verbs.

Test rules: every test runs against a real PostgreSQL, on a database migrated by
graphile-worker 0.18.0 itself and (once it exists) on one migrated by kongtask, through
the ``any_dsn`` fixture. Database state is checked with SQL, not only through the client.
No sleeps: concurrency is sequenced by waiting for observable lock waits.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import trio
from _cli_helpers import cli_status
from client_support import (
    capture_notifications,
    counts,
    wait_until_blocked_on_lock,
)

import kongtask
from kongtask import Client, ConfigError, Job, JobSpec, KongtaskError
from kongtask._client import ADD_ATTEMPTS
from kongtask._pg import Database

S = "graphile_worker"
FUTURE = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
LATER = datetime(2032, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
async def client(any_dsn: str) -> AsyncIterator[Client]:
    async with kongtask.open_client(any_dsn) as c:
        yield c


@pytest.fixture
async def kt_client(kongtask_dsn: str) -> AsyncIterator[Client]:
    """For checks that happen before anything is sent: one schema flavour is enough."""
    async with kongtask.open_client(kongtask_dsn) as c:
        yield c


def sql(client: Client) -> Database:
    """The client's own pool, for checking and arranging rows directly."""
    return client._db


async def job_rows(client: Client) -> list[dict[str, Any]]:
    rows = await sql(client).fetch(
        f"select j.*, t.identifier, q.queue_name from {S}._private_jobs j "
        f"join {S}._private_tasks t on t.id = j.task_id "
        f"left join {S}._private_job_queues q on q.id = j.job_queue_id order by j.id"
    )
    return [dict(r) for r in rows]


async def count_jobs(client: Client) -> int:
    n: int = await sql(client).fetchval(f"select count(*) from {S}._private_jobs")
    return n


async def lock(client: Client, job_id: int, *, hours_ago: float = 0, by: str = "pool-x") -> None:
    await sql(client).execute(
        f"update {S}._private_jobs set locked_at = now() - make_interval(secs => $2), "
        "locked_by = $3 where id = $1",
        job_id,
        hours_ago * 3600,
        by,
    )


async def set_attempts(client: Client, job_id: int, attempts: int) -> None:
    await sql(client).execute(
        f"update {S}._private_jobs set attempts = $2 where id = $1", job_id, attempts
    )


# --- adding --------------------------------------------------------------------------------


async def test_add_job_defaults(client: Client) -> None:
    before = datetime.now(UTC)
    job = await client.add_job("send_email")
    assert isinstance(job, Job)
    assert job.task_identifier == "send_email"
    assert job.payload == {}
    assert (job.queue_name, job.key, job.flags, job.last_error) == (None, None, None, None)
    assert (job.priority, job.attempts, job.max_attempts, job.revision) == (0, 0, 25, 0)
    assert (job.locked_at, job.locked_by) == (None, None)
    assert job.run_at.tzinfo is not None
    assert before - timedelta(minutes=5) < job.run_at < before + timedelta(minutes=5)
    assert not job.is_permanently_failed
    [row] = await job_rows(client)
    assert row["id"] == job.id
    assert json.loads(row["payload"]) == {}


async def test_add_job_every_option(client: Client) -> None:
    job = await client.add_job(
        "resize",
        {"path": "a.png", "sizes": [1, 2], "ü": None},
        queue_name="images",
        run_at=FUTURE,
        max_attempts=3,
        job_key="resize:a",
        priority=-5,
        flags=["slow", "gpu", "slow"],
    )
    assert job.task_identifier == "resize"
    assert job.queue_name == "images"
    assert job.payload == {"path": "a.png", "sizes": [1, 2], "ü": None}
    assert job.run_at == FUTURE
    assert (job.max_attempts, job.key, job.priority) == (3, "resize:a", -5)
    assert job.flags == frozenset({"slow", "gpu"})
    [row] = await job_rows(client)
    assert row["identifier"] == "resize"
    assert row["queue_name"] == "images"
    assert json.loads(row["flags"]) == {"slow": True, "gpu": True}
    with pytest.raises(AttributeError):
        job.priority = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "payload", [[1, "two", {"3": 3.5}], "just a string", 42, True, {"nested": {"deep": [None]}}]
)
async def test_any_json_payload_round_trips(client: Client, payload: Any) -> None:
    job = await client.add_job("t", payload)
    assert job.payload == payload
    [row] = await job_rows(client)
    assert json.loads(row["payload"]) == payload


async def test_add_jobs_creates_tasks_and_queues_and_resolves_names(client: Client) -> None:
    specs = [
        JobSpec("alpha", {"n": 1}, queue_name="q1"),
        JobSpec("beta", [1], priority=3, flags=("f",)),
        JobSpec("alpha", None, run_at=FUTURE, max_attempts=2),
        JobSpec("gamma", "x", queue_name="q2", job_key="k-gamma"),
    ]
    jobs = await client.add_jobs(specs)
    assert len(jobs) == 4
    got = sorted((j.task_identifier, str(j.queue_name), json.dumps(j.payload)) for j in jobs)
    assert got == [
        ("alpha", "None", "{}"),
        ("alpha", "q1", '{"n": 1}'),
        ("beta", "None", "[1]"),
        ("gamma", "q2", '"x"'),
    ]
    by_task = {j.task_identifier + str(j.queue_name): j for j in jobs}
    assert by_task["alphaNone"].run_at == FUTURE
    assert by_task["alphaNone"].max_attempts == 2
    assert by_task["betaNone"].flags == frozenset({"f"})
    assert by_task["betaNone"].priority == 3
    assert by_task["gammaq2"].key == "k-gamma"
    assert await count_jobs(client) == 4


async def test_names_resolve_for_a_second_client(any_dsn: str) -> None:
    # A fresh client has empty caches: names must come from the database, not memory.
    async with kongtask.open_client(any_dsn) as first:
        added = await first.add_job("cached", queue_name="cq")
    async with kongtask.open_client(any_dsn) as second:
        again = await second.add_job("cached", queue_name="cq")
        [removed] = await second.complete_jobs([added.id])
    assert (again.task_identifier, again.queue_name) == ("cached", "cq")
    assert (removed.task_identifier, removed.queue_name) == ("cached", "cq")


async def test_empty_add_jobs_sends_nothing(client: Client) -> None:
    async with capture_notifications(sql(client)) as notes:
        assert await client.add_jobs([]) == []
        assert await client.add_jobs(iter(())) == []
        await client.add_job("t")
        # Only add_job notified: an empty add_jobs would have sent an empty payload first.
        assert counts(await notes.flush()) == [1]
    assert await count_jobs(client) == 1


async def test_add_jobs_notifies_once_with_the_batch_size(client: Client) -> None:
    async with capture_notifications(sql(client)) as notes:
        await client.add_jobs([JobSpec("t", i) for i in range(3)])
        [payload] = await notes.flush()
    assert json.loads(payload)["count"] == 3
    assert "r" in json.loads(payload)


async def test_concurrent_adds_from_one_client(client: Client) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(client.add_job, f"task{i % 3}", {"i": i})
    rows = await job_rows(client)
    assert sorted(json.loads(r["payload"])["i"] for r in rows) == list(range(8))
    assert {r["identifier"] for r in rows} == {"task0", "task1", "task2"}


# --- job keys (docs/design/database.md#job-keys, case by case) -------------------------


@pytest.mark.parametrize("mode", ["replace", "preserve_run_at", "unsafe_dedupe", None])
async def test_key_no_existing_row_inserts(client: Client, mode: Any) -> None:
    async with capture_notifications(sql(client)) as notes:
        job = await client.add_job("t", {"a": 1}, job_key="k", job_key_mode=mode)
        assert counts(await notes.flush()) == [1]
    assert (job.key, job.revision, job.payload) == ("k", 0, {"a": 1})


async def test_key_pending_replace_updates_in_place(client: Client) -> None:
    old = await client.add_job(
        "t", {"v": 1}, job_key="k", run_at=FUTURE, queue_name="q", priority=4, flags=["x"]
    )
    new = await client.add_job("t", {"v": 2}, job_key="k", run_at=LATER)
    assert new.id == old.id
    assert new.created_at == old.created_at
    assert (new.payload, new.run_at, new.revision) == ({"v": 2}, LATER, 1)
    # Omitted options revert to their defaults.
    assert (new.queue_name, new.priority, new.flags, new.max_attempts) == (None, 0, None, 25)
    assert await count_jobs(client) == 1


async def test_key_pending_preserve_run_at_keeps_the_old_run_at(client: Client) -> None:
    old = await client.add_job("t", {"v": 1}, job_key="k", run_at=FUTURE)
    new = await client.add_job(
        "t", {"v": 2}, job_key="k", run_at=LATER, job_key_mode="preserve_run_at"
    )
    assert new.id == old.id
    assert (new.payload, new.run_at, new.revision) == ({"v": 2}, FUTURE, 1)


async def test_key_pending_unsafe_dedupe_only_bumps_revision(client: Client) -> None:
    old = await client.add_job("t", {"v": 1}, job_key="k", run_at=FUTURE)
    async with capture_notifications(sql(client)) as notes:
        new = await client.add_job(
            "other", {"v": 2}, job_key="k", run_at=LATER, job_key_mode="unsafe_dedupe"
        )
        # No notify for a dedupe hit: nothing new to run.
        assert counts(await notes.flush()) == []
    assert new.id == old.id
    assert (new.payload, new.run_at, new.revision, new.task_identifier) == (
        {"v": 1},
        FUTURE,
        1,
        "t",
    )


@pytest.mark.parametrize("mode", ["replace", "preserve_run_at"])
async def test_key_pending_retry_resets_attempts_and_takes_new_run_at(
    client: Client, mode: Any
) -> None:
    old = await client.add_job("t", {"v": 1}, job_key="k", run_at=FUTURE)
    await set_attempts(client, old.id, 2)
    await sql(client).execute(f"update {S}._private_jobs set last_error = 'boom'")
    new = await client.add_job("t", {"v": 2}, job_key="k", run_at=LATER, job_key_mode=mode)
    assert new.id == old.id
    # preserve_run_at only preserves for a job that has not been attempted (debounce ->
    # throttle), so both modes take the new run_at here.
    assert (new.attempts, new.run_at, new.last_error, new.revision) == (0, LATER, None, 1)


async def test_key_pending_retry_unsafe_dedupe_keeps_attempts(client: Client) -> None:
    old = await client.add_job("t", {"v": 1}, job_key="k")
    await set_attempts(client, old.id, 2)
    new = await client.add_job("t", {"v": 2}, job_key="k", job_key_mode="unsafe_dedupe")
    assert (new.id, new.attempts, new.payload, new.revision) == (old.id, 2, {"v": 1}, 1)


@pytest.mark.parametrize("mode", ["replace", "preserve_run_at"])
@pytest.mark.parametrize("state", ["locked", "permanently_failed"])
async def test_key_unavailable_row_is_retired_and_a_new_job_added(
    client: Client, mode: Any, state: str
) -> None:
    old = await client.add_job("t", {"v": 1}, job_key="k", max_attempts=5)
    if state == "locked":
        await lock(client, old.id)
    else:
        await set_attempts(client, old.id, 5)
    new = await client.add_job("t", {"v": 2}, job_key="k", job_key_mode=mode)
    assert new.id != old.id
    assert (new.key, new.payload, new.revision, new.attempts) == ("k", {"v": 2}, 0, 0)
    rows = {r["id"]: r for r in await job_rows(client)}
    assert rows[old.id]["key"] is None
    assert rows[old.id]["attempts"] == rows[old.id]["max_attempts"] == 5
    assert len(rows) == 2


@pytest.mark.parametrize("state", ["locked", "permanently_failed"])
async def test_key_unavailable_row_unsafe_dedupe_only_bumps_revision(
    client: Client, state: str
) -> None:
    old = await client.add_job("t", {"v": 1}, job_key="k", max_attempts=5)
    if state == "locked":
        await lock(client, old.id)
    else:
        await set_attempts(client, old.id, 5)
    new = await client.add_job("t", {"v": 2}, job_key="k", job_key_mode="unsafe_dedupe")
    assert (new.id, new.key, new.payload, new.revision) == (old.id, "k", {"v": 1}, 1)
    assert await count_jobs(client) == 1


async def test_key_is_global_across_task_identifiers(client: Client) -> None:
    old = await client.add_job("first", job_key="k")
    new = await client.add_job("second", job_key="k")
    assert new.id == old.id
    assert new.task_identifier == "second"
    [row] = await job_rows(client)
    assert row["identifier"] == "second"


async def test_revision_counts_every_hit(client: Client) -> None:
    modes: list[Any] = ["replace", "unsafe_dedupe", "preserve_run_at"]
    await client.add_job("t", job_key="k")
    for mode in modes:
        job = await client.add_job("t", job_key="k", job_key_mode=mode)
    assert job.revision == 3


@pytest.mark.parametrize(
    ("first", "second", "merged"),
    [
        ([1, 2], [3], [1, 2, 3]),
        ([{"a": 1}], [{"b": 2}, {"c": 3}], [{"a": 1}, {"b": 2}, {"c": 3}]),
        ({"a": 1}, [3], [3]),
        ([1], {"b": 2}, {"b": 2}),
        ([1], None, {}),
    ],
)
async def test_array_payloads_merge_on_key_hit(
    client: Client, first: Any, second: Any, merged: Any
) -> None:
    await client.add_job("batch", first, job_key="k")
    job = await client.add_job("batch", second, job_key="k")
    assert job.payload == merged


async def test_array_payloads_merge_in_add_jobs_too(client: Client) -> None:
    await client.add_jobs(
        [JobSpec("batch", [1], job_key="k1"), JobSpec("batch", ["a"], job_key="k2")]
    )
    jobs = await client.add_jobs(
        [JobSpec("batch", [2], job_key="k1"), JobSpec("batch", ["b"], job_key="k2")]
    )
    assert sorted(json.dumps(j.payload) for j in jobs) == ['["a", "b"]', "[1, 2]"]


async def test_add_jobs_preserve_run_at(client: Client) -> None:
    await client.add_jobs([JobSpec("t", job_key="k", run_at=FUTURE)])
    [kept] = await client.add_jobs(
        [JobSpec("t", job_key="k", run_at=LATER)], job_key_preserve_run_at=True
    )
    [moved] = await client.add_jobs([JobSpec("t", job_key="k", run_at=LATER)])
    assert (kept.run_at, moved.run_at) == (FUTURE, LATER)


# --- graphile-worker #580 -------------------------------------------------------------------


async def test_add_job_survives_the_580_race(client: Client) -> None:
    """The keyed row gets locked while add_job waits on it: the request must not vanish.

    graphile-worker's own add_job returns a row of NULLs here (the client retries);
    kongtask's function body handles it itself. Either way one live job comes back.
    """
    old = await client.add_job("t", {"v": 1}, job_key="k")
    db = sql(client)
    locker = await db.connect()
    try:
        await db.run(locker.execute, "begin")
        await db.run(
            locker.execute,
            f"update {S}._private_jobs set locked_at = now(), locked_by = 'pool-race' "
            "where key = 'k'",
        )
        result: list[Job] = []

        async def add() -> None:
            result.append(await client.add_job("t", {"v": 2}, job_key="k"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(add)
            await wait_until_blocked_on_lock(db)
            await db.run(locker.execute, "commit")
    finally:
        await db.close_connection(locker)
    [new] = result
    assert new.id != old.id
    assert (new.key, new.payload) == ("k", {"v": 2})
    rows = {r["id"]: r for r in await job_rows(client)}
    assert rows[old.id]["key"] is None
    assert rows[old.id]["locked_by"] == "pool-race"
    assert rows[old.id]["attempts"] == rows[old.id]["max_attempts"]


# A schema "flaky" whose add_job/add_jobs wrap the real ones and misbehave like #580 for
# the first `drop_first` calls. The real functions stay untouched; the client is pointed
# at "flaky" (the views give it the task and queue names).
FLAKY = f"""
create schema flaky;
create view flaky._private_tasks as select * from {S}._private_tasks;
create view flaky._private_job_queues as select * from {S}._private_job_queues;
create sequence flaky.calls;
create table flaky.settings (drop_first int not null, drop_unkeyed bool not null default false);
create function flaky.add_job(
  identifier text, payload json = null, queue_name text = null, run_at timestamptz = null,
  max_attempts integer = null, job_key text = null, priority integer = null,
  flags text[] = null, job_key_mode text = 'replace'
) returns {S}._private_jobs language plpgsql as $$
begin
  if nextval('flaky.calls') <= (select drop_first from flaky.settings) then
    return null;  -- a row of NULLs, as graphile-worker's add_job returns on #580
  end if;
  return {S}.add_job(identifier, payload, queue_name, run_at, max_attempts, job_key,
                     priority, flags, job_key_mode);
end $$;
create type flaky.job_spec as (
  identifier text, payload json, queue_name text, run_at timestamptz, max_attempts smallint,
  job_key text, priority smallint, flags text[]
);
create function flaky.add_jobs(specs flaky.job_spec[], job_key_preserve_run_at boolean = false)
returns setof {S}._private_jobs language plpgsql as $$
begin
  if nextval('flaky.calls') <= (select drop_first from flaky.settings) then
    -- keyed specs vanish, as on #580 (and unkeyed ones too, if asked: not #580)
    return query select * from {S}.add_jobs(
      array(select row(s.*)::{S}.job_spec from unnest(specs) s
            where s.job_key is null and not (select drop_unkeyed from flaky.settings)),
      job_key_preserve_run_at);
    return;
  end if;
  return query select * from {S}.add_jobs(
    array(select row(s.*)::{S}.job_spec from unnest(specs) s), job_key_preserve_run_at);
end $$;
"""


@pytest.fixture
async def flaky(any_dsn: str) -> AsyncIterator[Client]:
    async with kongtask.open_client(any_dsn, schema="flaky") as c:
        await sql(c).execute(FLAKY)
        yield c


async def flaky_calls(client: Client) -> int:
    n: int = await sql(client).fetchval("select last_value from flaky.calls")
    return n


async def test_add_job_retries_a_null_row_then_succeeds(flaky: Client) -> None:
    await sql(flaky).execute("insert into flaky.settings values (2)")
    job = await flaky.add_job("t", {"v": 1}, job_key="k", queue_name="fq")
    assert (job.key, job.payload, job.task_identifier, job.queue_name) == ("k", {"v": 1}, "t", "fq")
    assert await flaky_calls(flaky) == 3
    assert await count_jobs(flaky) == 1


async def test_add_job_gives_up_after_bounded_retries(flaky: Client) -> None:
    await sql(flaky).execute("insert into flaky.settings values (1000)")
    with pytest.raises(KongtaskError, match="#580"):
        await flaky.add_job("t", job_key="k")
    assert await flaky_calls(flaky) == ADD_ATTEMPTS
    assert await count_jobs(flaky) == 0


async def test_add_jobs_resends_only_the_dropped_keyed_specs(flaky: Client) -> None:
    await sql(flaky).execute("insert into flaky.settings values (1)")
    jobs = await flaky.add_jobs(
        [
            JobSpec("t", 1),
            JobSpec("t", 2, job_key="a"),
            JobSpec("t", 3),
            JobSpec("t", 4, job_key="b"),
        ]
    )
    assert sorted(j.payload for j in jobs) == [1, 2, 3, 4]
    assert sorted(json.loads(r["payload"]) for r in await job_rows(flaky)) == [1, 2, 3, 4]
    assert await flaky_calls(flaky) == 2


async def test_add_jobs_gives_up_after_bounded_retries(flaky: Client) -> None:
    await sql(flaky).execute("insert into flaky.settings values (1000)")
    with pytest.raises(KongtaskError, match="#580"):
        await flaky.add_jobs([JobSpec("t", 1), JobSpec("t", 2, job_key="a")])
    assert await flaky_calls(flaky) == ADD_ATTEMPTS
    assert [json.loads(r["payload"]) for r in await job_rows(flaky)] == [1]


async def test_add_jobs_reports_unexplained_missing_rows(flaky: Client) -> None:
    await sql(flaky).execute("insert into flaky.settings values (1, true)")
    with pytest.raises(KongtaskError, match="misbehaves"):
        await flaky.add_jobs([JobSpec("t", 1)])


# --- validation: nothing is sent -------------------------------------------------------------

NAIVE = datetime(2030, 1, 1)


class Weird:
    pass


BAD_ADD_JOB_ARGS: list[tuple[dict[str, Any], str]] = [
    ({"payload": {"x": math.nan}}, "not JSON-serialisable"),
    ({"payload": [math.inf]}, "not JSON-serialisable"),
    ({"payload": {"x": {1, 2}}}, "not JSON-serialisable"),
    ({"payload": Weird()}, "not JSON-serialisable"),
    ({"payload": "\ud800"}, "not JSON-serialisable"),
    ({"identifier": "x" * 129}, "identifier is 129 characters"),
    ({"identifier": 5}, "identifier must be a string"),
    ({"identifier": "a\x00b"}, "NUL"),
    ({"queue_name": "q" * 129}, "queue_name is 129 characters"),
    ({"job_key": ""}, "job_key must be 1 to 512"),
    ({"job_key": "k" * 513}, "job_key must be 1 to 512"),
    ({"job_key_mode": "bogus"}, "job_key_mode must be one of"),
    ({"job_key_mode": "bogus", "job_key": "k"}, "job_key_mode must be one of"),
    ({"priority": 32768}, "priority must be between -32768 and 32767"),
    ({"priority": -32769}, "priority must be between"),
    ({"priority": True}, "priority must be an integer"),
    ({"priority": 1.5}, "priority must be an integer"),
    ({"max_attempts": 0}, "max_attempts must be between 1 and 32767"),
    ({"max_attempts": 40000}, "max_attempts must be between 1 and 32767"),
    ({"run_at": NAIVE}, "timezone-aware"),
    ({"run_at": "2030-01-01T00:00:00Z"}, "run_at must be a datetime"),
    ({"flags": "slow"}, "not a single string"),
    ({"flags": ["ok", 3]}, "flag must be a string"),
]


@pytest.mark.parametrize(("override", "message"), BAD_ADD_JOB_ARGS)
async def test_add_job_rejects_bad_arguments_before_sending(
    kt_client: Client, override: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"identifier": "t", "payload": None, **override}
    async with capture_notifications(sql(kt_client)) as notes:
        with pytest.raises(ConfigError, match=message):
            await kt_client.add_job(args.pop("identifier"), args.pop("payload"), **args)
        assert await notes.flush() == []
    assert await count_jobs(kt_client) == 0
    assert await sql(kt_client).fetchval(f"select count(*) from {S}._private_tasks") == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [case for case in BAD_ADD_JOB_ARGS if "job_key_mode" not in case[0]],  # not in bulk
)
async def test_add_jobs_rejects_a_bad_spec_and_writes_nothing(
    kt_client: Client, override: dict[str, Any], message: str
) -> None:
    fields: dict[str, Any] = {"identifier": "t", **override}
    specs = [JobSpec("good", 1), JobSpec("good", 2, job_key="g"), JobSpec(**fields)]
    with pytest.raises(ConfigError, match=message) as caught:
        await kt_client.add_jobs(specs)
    assert "spec 2" in str(caught.value)
    assert await count_jobs(kt_client) == 0
    assert await sql(kt_client).fetchval(f"select count(*) from {S}._private_tasks") == 0


async def test_add_jobs_rejects_duplicate_keys(kt_client: Client) -> None:
    specs = [
        JobSpec("t", 1, job_key="a"),
        JobSpec("t", 2, job_key="b"),
        JobSpec("u", 3, job_key="a"),
    ]
    with pytest.raises(ConfigError, match=r"specs 0 and 2 share job_key 'a'"):
        await kt_client.add_jobs(specs)
    assert await count_jobs(kt_client) == 0


async def test_add_jobs_rejects_non_specs(kt_client: Client) -> None:
    with pytest.raises(ConfigError, match="item 0 is a dict"):
        await kt_client.add_jobs([{"identifier": "t"}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="job_key_preserve_run_at must be a bool"):
        await kt_client.add_jobs([JobSpec("t")], job_key_preserve_run_at="yes")  # type: ignore[arg-type]


async def test_limits_are_inclusive(client: Client) -> None:
    job = await client.add_job(
        "i" * 128, queue_name="q" * 128, job_key="k" * 512, priority=-32768, max_attempts=32767
    )
    assert (len(job.task_identifier), len(job.queue_name or ""), len(job.key or "")) == (
        128,
        128,
        512,
    )
    other = await client.add_job("t", priority=32767, max_attempts=1)
    assert (other.priority, other.max_attempts) == (32767, 1)


async def test_other_time_zones_are_converted_not_shifted(client: Client) -> None:
    tokyo = timezone(timedelta(hours=9))
    local = datetime(2031, 5, 6, 16, 8, 9, 123456, tzinfo=tokyo)  # == FUTURE
    job = await client.add_job("t", run_at=local)
    [bulk] = await client.add_jobs([JobSpec("t", run_at=local)])
    assert job.run_at == bulk.run_at == FUTURE


# --- admin operations ---------------------------------------------------------------------


async def arrange_fixture(client: Client) -> dict[str, Job]:
    """pending, future, locked, stale-locked (5 h) and permanently failed jobs."""
    jobs = {
        "pending": await client.add_job("t", {"n": "pending"}, queue_name="qa", priority=5),
        "future": await client.add_job("t", {"n": "future"}, run_at=FUTURE, job_key="fut"),
        "locked": await client.add_job("t", {"n": "locked"}, job_key="lk"),
        "stale": await client.add_job("u", {"n": "stale"}, job_key="st"),
        "failed": await client.add_job("u", {"n": "failed"}, max_attempts=3),
    }
    await lock(client, jobs["locked"].id)
    await lock(client, jobs["stale"].id, hours_ago=5)
    await set_attempts(client, jobs["failed"].id, 3)
    return jobs


async def test_complete_jobs_skips_fresh_locks(client: Client) -> None:
    jobs = await arrange_fixture(client)
    done = await client.complete_jobs(j.id for j in jobs.values())
    assert {j.payload["n"] for j in done} == {"pending", "future", "stale", "failed"}
    pending = next(j for j in done if j.payload["n"] == "pending")
    assert (pending.task_identifier, pending.queue_name) == ("t", "qa")
    [left] = await job_rows(client)
    assert left["id"] == jobs["locked"].id
    assert await client.complete_jobs([]) == []
    assert await client.complete_jobs([10**12]) == []


async def test_permanently_fail_jobs(client: Client) -> None:
    jobs = await arrange_fixture(client)
    failed = await client.permanently_fail_jobs([jobs["pending"].id, jobs["locked"].id])
    assert [j.id for j in failed] == [jobs["pending"].id]
    assert failed[0].last_error == "Manually marked as failed"
    assert failed[0].attempts == failed[0].max_attempts == 25
    assert failed[0].is_permanently_failed
    [again] = await client.permanently_fail_jobs([jobs["failed"].id], "gave up")
    assert (again.last_error, again.attempts) == ("gave up", 3)


async def test_reschedule_jobs_distinguishes_none_from_zero(client: Client) -> None:
    job = await client.add_job("t", priority=5, max_attempts=9, run_at=FUTURE)
    await set_attempts(client, job.id, 4)
    await sql(client).execute(f"update {S}._private_jobs set last_error = 'e'")
    [kept] = await client.reschedule_jobs([job.id])
    assert (kept.priority, kept.attempts, kept.max_attempts, kept.run_at) == (5, 4, 9, FUTURE)
    [zeroed] = await client.reschedule_jobs([job.id], priority=0, attempts=0)
    assert (zeroed.priority, zeroed.attempts, zeroed.max_attempts) == (0, 0, 9)
    assert zeroed.run_at == FUTURE
    assert zeroed.last_error == "e"
    [moved] = await client.reschedule_jobs([job.id], run_at=LATER, max_attempts=2, priority=-3)
    assert (moved.run_at, moved.max_attempts, moved.priority) == (LATER, 2, -3)


async def test_reschedule_revives_a_failed_job_and_skips_locked(client: Client) -> None:
    jobs = await arrange_fixture(client)
    revived = await client.reschedule_jobs(
        [jobs["failed"].id, jobs["locked"].id, jobs["stale"].id], attempts=0
    )
    assert {j.payload["n"] for j in revived} == {"failed", "stale"}
    assert all(not j.is_permanently_failed for j in revived)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"priority": 2**15}, "priority must be between"),
        ({"attempts": -(2**15) - 1}, "attempts must be between"),
        ({"max_attempts": 0}, "max_attempts must be between 1"),
        ({"run_at": NAIVE}, "timezone-aware"),
    ],
)
async def test_reschedule_validates(
    kt_client: Client, kwargs: dict[str, Any], message: str
) -> None:
    job = await kt_client.add_job("t")
    with pytest.raises(ConfigError, match=message):
        await kt_client.reschedule_jobs([job.id], **kwargs)
    [row] = await job_rows(kt_client)
    assert row["updated_at"] == job.updated_at


async def test_ids_are_validated(kt_client: Client) -> None:
    with pytest.raises(ConfigError, match="job id must be an integer"):
        await kt_client.complete_jobs(["1"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="job id must be between"):
        await kt_client.permanently_fail_jobs([2**63])


async def test_remove_job(client: Client) -> None:
    jobs = await arrange_fixture(client)
    async with capture_notifications(sql(client)) as notes:
        removed = await client.remove_job("fut")
        retired = await client.remove_job("lk")
        stale = await client.remove_job("st")
        missing = await client.remove_job("no-such-key")
        assert counts(await notes.flush()) == [-1, -1]
    assert removed is not None
    assert removed.id == jobs["future"].id
    assert stale is not None
    assert stale.id == jobs["stale"].id
    assert missing is None
    assert retired is not None
    assert retired.id == jobs["locked"].id
    assert retired.key is None
    assert retired.attempts == retired.max_attempts
    ids = {r["id"] for r in await job_rows(client)}
    assert ids == {jobs["pending"].id, jobs["locked"].id, jobs["failed"].id}


async def test_force_unlock_workers(client: Client) -> None:
    a = await client.add_job("t", queue_name="qa")
    b = await client.add_job("t", queue_name="qb")
    c = await client.add_job("t")
    db = sql(client)
    for job, pool in ((a, "pool-dead"), (b, "pool-alive"), (c, "pool-dead")):
        await lock(client, job.id, by=pool)
        await set_attempts(client, job.id, 1)
    await db.execute(
        f"update {S}._private_job_queues q set locked_at = now(), locked_by = j.locked_by "
        f"from {S}._private_jobs j where j.job_queue_id = q.id"
    )
    released = await client.force_unlock_workers(["pool-dead", "pool-unknown", "pool-dead"])
    assert released == {"pool-dead": (2, 1), "pool-unknown": (0, 0)}
    rows = {r["id"]: r for r in await job_rows(client)}
    assert (rows[a.id]["locked_by"], rows[c.id]["locked_at"]) == (None, None)
    assert rows[b.id]["locked_by"] == "pool-alive"
    assert rows[a.id]["attempts"] == 1  # the interrupted attempt counts
    queue_rows = await db.fetch(f"select queue_name, locked_by from {S}._private_job_queues")
    queues = {r["queue_name"]: r["locked_by"] for r in queue_rows}
    assert queues == {"qa": None, "qb": "pool-alive"}
    assert await client.force_unlock_workers([]) == {}
    with pytest.raises(ConfigError, match="not a single string"):
        await client.force_unlock_workers("pool-dead")


# --- cleanup ---------------------------------------------------------------------------------


async def arrange_cleanup(client: Client) -> None:
    db = sql(client)
    failed = await client.add_job("ta", queue_name="qa", max_attempts=2)
    await set_attempts(client, failed.id, 2)
    beyond = await client.add_job("ta", max_attempts=2)
    await set_attempts(client, beyond.id, 4)  # attempts > max_attempts (§8 Q5)
    locked_failed = await client.add_job("tl", max_attempts=1)
    await lock(client, locked_failed.id)
    await set_attempts(client, locked_failed.id, 1)
    await client.add_job("tb", queue_name="qkeep")
    done = await client.add_job("tc", queue_name="qb")
    await client.complete_jobs([done.id])
    await client.add_job("tkeep")
    await db.execute(
        f"delete from {S}._private_jobs where task_id = "
        f"(select id from {S}._private_tasks where identifier = 'tkeep')"
    )
    unused_locked = await client.add_job("td", queue_name="qc")
    await client.complete_jobs([unused_locked.id])
    await db.execute(
        f"update {S}._private_job_queues set locked_at = now(), locked_by = 'pool-x' "
        "where queue_name = 'qc'"
    )


async def names(client: Client) -> tuple[set[str], set[str]]:
    db = sql(client)
    tasks = {r[0] for r in await db.fetch(f"select identifier from {S}._private_tasks")}
    queues = {r[0] for r in await db.fetch(f"select queue_name from {S}._private_job_queues")}
    return tasks, queues


async def test_cleanup_default_only_gcs_queues(client: Client) -> None:
    await arrange_cleanup(client)
    assert await client.cleanup() == {"GC_JOB_QUEUES": 1}
    tasks, queues = await names(client)
    assert queues == {"qa", "qkeep", "qc"}  # qb went; qc is locked
    assert tasks == {"ta", "tb", "tc", "tl", "td", "tkeep"}


async def test_cleanup_runs_all_tasks_in_table_order(client: Client) -> None:
    await arrange_cleanup(client)
    # Given backwards, run forwards: deleting the failed jobs first frees "ta" and "qa".
    result = await client.cleanup(
        ["GC_JOB_QUEUES", "GC_TASK_IDENTIFIERS", "DELETE_PERMAFAILED_JOBS"],
        keep_task_identifiers=["tkeep"],
    )
    assert list(result.items()) == [
        ("DELETE_PERMAFAILED_JOBS", 2),
        ("GC_TASK_IDENTIFIERS", 3),
        ("GC_JOB_QUEUES", 2),
    ]
    tasks, queues = await names(client)
    assert tasks == {"tb", "tl", "tkeep"}
    assert queues == {"qkeep", "qc"}
    # The locked, permanently failed job stays.
    assert [r["identifier"] for r in await job_rows(client)] == ["tl", "tb"]


async def test_cleanup_rejects_unknown_tasks(client: Client) -> None:
    with pytest.raises(ConfigError) as caught:
        await client.cleanup(["GC_JOB_QUEUES", "GC_EVERYTHING"])  # type: ignore[list-item]
    message = str(caught.value)
    assert "'GC_EVERYTHING'" in message
    for allowed in ("DELETE_PERMAFAILED_JOBS", "GC_TASK_IDENTIFIERS", "GC_JOB_QUEUES"):
        assert allowed in message
    with pytest.raises(ConfigError, match="not a single string"):
        await client.cleanup("GC_JOB_QUEUES")  # type: ignore[arg-type]


# --- one-shot add_job, errors through open_client ----------------------------------------


async def test_one_shot_add_job(any_dsn: str) -> None:
    job = await kongtask.add_job("once", [1, 2], dsn=any_dsn, queue_name="q", priority=0)
    assert (job.task_identifier, job.payload, job.queue_name) == ("once", [1, 2], "q")
    async with kongtask.open_client(any_dsn) as c:
        [row] = await job_rows(c)
    assert row["id"] == job.id


async def test_one_shot_add_job_validates_before_connecting() -> None:
    # Port 1 refuses connections; the ConfigError proves nothing was attempted.
    with pytest.raises(ConfigError, match="timezone-aware"):
        await kongtask.add_job("t", dsn="postgresql://127.0.0.1:1/x", run_at=NAIVE)


async def test_connection_errors_and_body_errors_come_out_unwrapped(any_dsn: str) -> None:
    with pytest.raises(OSError):
        async with kongtask.open_client("postgresql://postgres@127.0.0.1:1/x"):
            pass
    with pytest.raises(KeyError):
        async with kongtask.open_client(any_dsn):
            raise KeyError("mine")


async def test_custom_schema_is_quoted(any_dsn: str) -> None:
    # The default-schema functions exist in this database; a schema that does not exist
    # must fail inside PostgreSQL, proving the name is sent quoted, not spliced raw.
    import asyncpg

    async with kongtask.open_client(any_dsn, schema='no"such; drop table x') as c:
        with pytest.raises(kongtask.KongtaskError, match="run `kongtask migrate`") as caught:
            await c.add_job("t")
    assert isinstance(caught.value.__cause__, asyncpg.InvalidSchemaNameError)
    assert 'schema "no"such; drop table x" does not exist' in str(caught.value.__cause__)


# --- CLI verbs ------------------------------------------------------------------------------


async def test_cli_add(any_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await cli_status(
        [
            "add",
            "-c",
            any_dsn,
            "mail",
            '{"to": "a@b.c"}',
            "--queue",
            "mq",
            "--run-at",
            "2031-05-06T07:08:09.123456Z",
            "--max-attempts",
            "4",
            "--job-key",
            "m1",
            "--priority",
            "0",
            "--flag",
            "a",
            "--flag",
            "b",
        ]
    )
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    printed = json.loads(out)
    assert printed["task_identifier"] == "mail"
    assert printed["payload"] == {"to": "a@b.c"}
    assert printed["flags"] == ["a", "b"]
    async with kongtask.open_client(any_dsn) as c:
        [row] = await job_rows(c)
    assert (row["id"], row["queue_name"], row["key"], row["max_attempts"]) == (
        printed["id"],
        "mq",
        "m1",
        4,
    )
    assert row["run_at"] == FUTURE
    code = await cli_status(
        ["add", "-c", any_dsn, "mail", "[1]", "--job-key", "m1", "--job-key-mode", "unsafe_dedupe"]
    )
    assert json.loads(capsys.readouterr().out)["revision"] == 1


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["t", "{bad json"], "PAYLOAD_JSON is not valid JSON"),
        (["t", "--run-at", "2030-01-01T00:00:00"], "needs a UTC offset"),
        (["t", "--run-at", "next tuesday"], "not an ISO 8601"),
        (["t", "--job-key-mode", "nope"], "job_key_mode must be one of"),
        (["t", "--priority", "99999"], "priority must be between"),
        (["t", "[NaN]"], "not JSON-serialisable"),
    ],
)
async def test_cli_add_bad_input_is_one_line(
    kongtask_dsn: str,
    capsys: pytest.CaptureFixture[str],
    argv_tail: list[str],
    message: str,
) -> None:
    code = await cli_status(["add", "-c", kongtask_dsn, *argv_tail])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith("kongtask: ")
    assert message in err
    assert err.count("\n") == 1
    async with kongtask.open_client(kongtask_dsn) as c:
        assert await count_jobs(c) == 0


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("postgresql://postgres@127.0.0.1:1/x", "cannot reach the database"),
        ("definitely not a dsn", "kongtask: "),
    ],
)
async def test_cli_connection_failures_are_one_line(
    capsys: pytest.CaptureFixture[str], dsn: str, message: str
) -> None:
    for verb in (["add", "t"], ["cleanup"], ["unlock", "pool-x"]):
        code = await cli_status([verb[0], "-c", dsn, *verb[1:]])
        _, err = capsys.readouterr()
        assert code == 1
        assert message in err
        assert "Traceback" not in err
        assert err.count("\n") == 1


async def test_cli_cleanup_and_unlock(any_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    async with kongtask.open_client(any_dsn) as c:
        await arrange_cleanup(c)
        locked = await c.add_job("tz", queue_name="qz")
        await lock(c, locked.id, by="pool-gone")
    code = await cli_status(
        [
            "cleanup",
            "-c",
            any_dsn,
            "--task",
            "GC_TASK_IDENTIFIERS",
            "--task",
            "DELETE_PERMAFAILED_JOBS",
            "--keep-task-identifier",
            "tkeep",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    assert out.splitlines() == [
        "DELETE_PERMAFAILED_JOBS: deleted 2",
        "GC_TASK_IDENTIFIERS: deleted 3",
    ]
    assert await cli_status(["cleanup", "-c", any_dsn]) == 0
    assert capsys.readouterr().out == "GC_JOB_QUEUES: deleted 2\n"
    assert await cli_status(["cleanup", "-c", any_dsn, "--task", "GC_ALL"]) == 1
    assert "allowed: DELETE_PERMAFAILED_JOBS, GC_TASK_IDENTIFIERS, GC_JOB_QUEUES" in (
        capsys.readouterr().err
    )
    assert await cli_status(["unlock", "-c", any_dsn, "pool-gone", "pool-other"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "pool-gone: released 1 job(s) and 0 queue(s)",
        "Released 1 job(s) and 0 queue(s) of 2 pool id(s)",
    ]
    assert "warning: pool-other holds no job and no queue" in err
    async with kongtask.open_client(any_dsn) as c:
        row = next(r for r in await job_rows(c) if r["id"] == locked.id)
    assert (row["locked_at"], row["locked_by"]) == (None, None)


async def test_cli_unlock_needs_a_pool_id(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        await kongtask.main(["unlock"])
    assert caught.value.code == 2
    assert "POOL_ID" in capsys.readouterr().err


# --- the SECURITY DEFINER wrapper from docs/client.md ---------------------------------------


async def test_security_definer_wrapper_lets_another_role_add_jobs(client: Client) -> None:
    import uuid

    import asyncpg

    db = sql(client)
    role = f"web_user_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: unique per test
    await db.execute(f"create role {role} nologin")
    try:
        await db.execute(
            f"""
            create schema app;
            create function app.enqueue_email(recipient text) returns void
            language sql security definer set search_path = pg_catalog as $$
              select graphile_worker.add_job('send_email', json_build_object('to', recipient));
            $$;
            revoke all on function app.enqueue_email(text) from public;
            grant usage on schema app to {role};
            grant execute on function app.enqueue_email(text) to {role};
            """
        )

        async def as_role(conn: asyncpg.Connection, query: str) -> None:
            async with conn.transaction():
                await conn.execute(f"set local role {role}")
                await conn.execute(query)

        await db.with_connection(as_role, "select app.enqueue_email('a@example.com')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.with_connection(as_role, f"select {S}.add_job('send_email')")
    finally:
        await db.execute("drop schema if exists app cascade")
        await db.execute(f"drop role {role}")
    [row] = await job_rows(client)
    assert (row["identifier"], json.loads(row["payload"])) == (
        "send_email",
        {"to": "a@example.com"},
    )
