"""kongtask.Job built from the worker's claim (Job.from_claim) against the stored row.

The claim sends timestamps as int8 microseconds since the Unix epoch and leaves payload
and flags as JSON text, all decoded on first access. These tests check, on a real
database, that such a job equals, attribute by attribute, the same row read with
``select *`` and ``Job.from_record`` (asyncpg's own timestamptz decoding), and that
``Job`` keeps the frozen dataclass's behaviour (immutability, equality, hash, repr).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _worker_helpers import JOB_FIELDS, add_job_row

import kongtask
from kongtask import Job
from kongtask._pg import Database
from kongtask._sql import _CLAIM_RETURNING, WorkerQueries, claim_jobs, register_tasks

Q = WorkerQueries("graphile_worker")
J = "graphile_worker._private_jobs"
POOL = "pool-ffffffffffffffffff"
# the claims' clock: ahead of the database's, so that jobs added without run_at are due;
# with microseconds, so that locked_at is checked to the microsecond
NOW = datetime(2030, 6, 15, 12, 34, 56, 123457, tzinfo=UTC)

PAYLOADS = [
    "{}",
    '{"a": 1, "b": [true, false, null], "c": {"d": "e"}}',
    "[1, 2.5, -3e-7, 12345678901234567890]",
    '"just a string"',
    "42",
    "-0.5",
    "null",
    "true",
    '[[[], {}], [{"deep": [[[1]]]}]]',
    '{"unicode": "ünïcødé 日本語 \\u00e9 \\ud83d\\ude00", "esc": "a\\"b\\\\c\\n"}',
    '  {  "spaced" :\n [ 1 ,\t2 ] }  ',  # json keeps the text as sent
    '{"dup": 1, "dup": 2}',  # json keeps duplicate keys; json.loads keeps the last
    json.dumps({"big": ["x" * 1000] * 300, "n": list(range(5000))}),
]


def stored_query() -> str:
    return f"""
select j.*, t.identifier as task_identifier, q.queue_name
from {J} j
join graphile_worker._private_tasks t on t.id = j.task_id
left join graphile_worker._private_job_queues q on q.id = j.job_queue_id
where j.id = any($1::bigint[])"""


async def claim(db: Database, task_ids: list[int], now: datetime = NOW) -> list[Job]:
    names = {v: k for k, v in (await db.with_connection(register_tasks, Q, ["t", "u"])).items()}
    rows = await db.with_connection(claim_jobs, Q, POOL, task_ids, 1000, None, now)
    return [Job.from_claim(row, names[row["task_id"]]) for row in rows]


async def stored(db: Database, ids: list[int]) -> dict[int, Job]:
    rows = await db.fetch(stored_query(), ids)
    return {r["id"]: Job.from_record(r, r["task_identifier"], r["queue_name"]) for r in rows}


def assert_same(got: Job, want: Job) -> None:
    for name in JOB_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert type(a) is type(b), (name, a, b)
        assert a == b, (name, a, b)
        if isinstance(a, datetime):
            # same instant, same tzinfo (UTC, or naive for +-infinity as asyncpg gives)
            assert a.tzinfo is b.tzinfo, (name, a, b)
            assert a.isoformat() == b.isoformat(), (name, a, b)
    assert got == want
    assert repr(got) == repr(want)


async def test_claimed_jobs_equal_stored_rows_for_payload_and_flag_variants(db: Database) -> None:
    tasks = await db.with_connection(register_tasks, Q, ["t", "u"])
    ids = []
    for i, payload in enumerate(PAYLOADS):
        ids.append(
            await add_job_row(
                db,
                "t" if i % 2 else "u",
                payload,
                queue=f"q{i}" if i % 3 == 0 else None,
                priority=i - 5,
                max_attempts=i + 1,
                key=f"key-{i}" if i % 4 == 0 else None,
                flags=[["a"], ["a", "b", "ü"], None][i % 3],
                run_at=NOW - timedelta(days=i, microseconds=i * 7919),
            )
        )
    # a failed attempt's error, and a revision from an add with the same key
    await db.execute(f"update {J} set last_error = 'boom ü' where id = $1", ids[1])
    await add_job_row(db, "t", "{}", key="key-0", run_at=NOW - timedelta(seconds=1))
    # a queued job whose queue is locked is not claimed; this test wants every job
    claimed = await claim(db, list(tasks.values()))
    assert sorted(j.id for j in claimed) == sorted(ids)
    want = await stored(db, ids)
    for job in claimed:
        assert_same(job, want[job.id])
        assert job.locked_at == NOW
        assert job.locked_by == POOL
        assert job.attempts == 1
    by_id = {j.id: j for j in claimed}
    assert by_id[ids[0]].revision == 1
    assert by_id[ids[1]].last_error == "boom ü"
    assert [by_id[i].payload for i in ids] == [json.loads(p) for p in PAYLOADS]
    assert by_id[ids[10]].payload == {"spaced": [1, 2]}
    assert by_id[ids[1]].flags == frozenset({"a", "b", "ü"})
    assert by_id[ids[2]].flags is None


async def test_claimed_timestamps_are_exact_to_the_microsecond(db: Database) -> None:
    # run_at anywhere from year 1 to the claim's now; created_at/updated_at anywhere in
    # Python's range, with random microseconds (the epoch and both sides of it included)
    rnd = random.Random(20261127)
    lo = datetime(1, 1, 1, tzinfo=UTC)
    hi = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

    def anywhere(until: datetime) -> datetime:
        return lo + timedelta(microseconds=rnd.randrange((until - lo) // timedelta(microseconds=1)))

    specials = [
        lo,
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=UTC),
        datetime(2242, 3, 16, 12, 56, 31, 999999, tzinfo=UTC),
        hi,
    ]
    tasks = await db.with_connection(register_tasks, Q, ["t"])
    ids = []
    for i in range(300):
        special = specials[i % len(specials)] if i < 3 * len(specials) else None
        run_at = min(special, NOW) if special and i % 3 == 0 else anywhere(NOW)
        created = special if special and i % 3 == 1 else anywhere(hi)
        updated = special if special and i % 3 == 2 else anywhere(hi)
        ids.append(await add_job_row(db, "t", "{}"))
        # as text: asyncpg would send years 1 and 9999's last microsecond as +-infinity
        await db.execute(
            f"""update {J} set run_at = $2::text::timestamptz,
            created_at = $3::text::timestamptz, updated_at = $4::text::timestamptz
            where id = $1""",
            ids[-1],
            *(d.isoformat() for d in (run_at, created, updated)),
        )
    claimed = await claim(db, [tasks["t"]])
    assert sorted(j.id for j in claimed) == sorted(ids)
    want = await stored(db, ids)
    for job in claimed:
        assert_same(job, want[job.id])
    finite = [j for j in claimed if j.run_at.tzinfo is not None]
    assert {lo, hi} <= {t for j in finite for t in (j.run_at, j.created_at, j.updated_at)}
    # the claim's order (priority, then run_at) survives run_at travelling as int8
    assert [j.run_at for j in claimed] == sorted(j.run_at for j in claimed)


async def test_claimed_infinite_timestamps_read_as_aware_bounds(db: Database) -> None:
    tasks = await db.with_connection(register_tasks, Q, ["t"])
    a = await add_job_row(db, "t", "{}")
    b = await add_job_row(db, "t", "{}")
    await db.execute(
        f"update {J} set run_at = '-infinity', created_at = '-infinity' where id = $1", a
    )
    await db.execute(f"update {J} set updated_at = 'infinity' where id = $1", b)
    claimed = {j.id: j for j in await claim(db, [tasks["t"]])}
    want = await stored(db, [a, b])  # asyncpg's naive datetime.min/max, normalised
    assert_same(claimed[a], want[a])
    assert_same(claimed[b], want[b])
    assert claimed[a].run_at == datetime.min.replace(tzinfo=UTC)
    assert claimed[a].run_at.tzinfo is UTC
    assert claimed[b].updated_at == datetime.max.replace(tzinfo=UTC)
    # -infinity sorts first
    assert list(claimed) == [a, b]


@pytest.mark.parametrize(
    ("value", "bound"),
    [
        ("10000-01-01 00:00:00+00", datetime.max.replace(tzinfo=UTC)),
        ("294276-12-31 23:59:59+00", datetime.max.replace(tzinfo=UTC)),
        ("0100-01-01 BC", datetime.min.replace(tzinfo=UTC)),
        ("0001-01-01 00:00:00+01", datetime.min.replace(tzinfo=UTC)),
        ("4713-01-01 00:00:00+00 BC", datetime.min.replace(tzinfo=UTC)),
    ],
)
async def test_claimed_timestamp_beyond_python_reads_as_a_bound(
    db: Database, value: str, bound: datetime
) -> None:
    tasks = await db.with_connection(register_tasks, Q, ["t"])
    job_id = await add_job_row(db, "t", '{"x": 1}')
    await db.execute(
        f"update {J} set created_at = $2::text::timestamptz where id = $1", job_id, value
    )
    with pytest.raises(OverflowError):
        await db.fetch(stored_query(), [job_id])  # asyncpg's own decoder
    [job] = await claim(db, [tasks["t"]])  # the claim itself works
    assert job.id == job_id
    assert job.payload == {"x": 1}
    assert job.created_at == bound
    assert job.created_at.tzinfo is UTC
    # and so do the client's admin functions, which read the same columns
    client = kongtask.Client(db, "graphile_worker")
    await client.force_unlock_workers([POOL])
    [done] = await client.complete_jobs([job_id])
    assert done.created_at == bound


async def test_claim_columns_decode_like_select_star_for_unclaimed_rows(db: Database) -> None:
    # The claim never returns NULL locked_at / locked_by; its columns, read from rows
    # that are not locked, check that from_claim handles them anyway.
    ids = [
        await add_job_row(db, "t", p, queue="q" if i % 2 else None)
        for i, p in enumerate(PAYLOADS[:4])
    ]
    rows = await db.fetch(
        f"""select {_CLAIM_RETURNING} from {J} j
        left join graphile_worker._private_job_queues k on k.id = j.job_queue_id
        where j.id = any($1::bigint[])""",
        ids,
    )
    want = await stored(db, ids)
    for row in rows:
        job = Job.from_claim(row, "t")
        assert job.locked_at is None
        assert job.locked_by is None
        assert_same(job, want[job.id])


@dataclasses.dataclass(frozen=True, slots=True)
class OldJob:
    """Job as it was (a frozen dataclass): the reference for repr, eq and hash."""

    id: int
    task_identifier: str
    payload: Any
    queue_name: str | None
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    key: str | None
    flags: frozenset[str] | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    locked_at: datetime | None
    locked_by: str | None
    revision: int


def as_old(job: Job) -> OldJob:
    return OldJob(*(getattr(job, name) for name in JOB_FIELDS))


async def test_job_behaves_like_the_frozen_dataclass(db: Database) -> None:
    tasks = await db.with_connection(register_tasks, Q, ["t"])
    await add_job_row(db, "t", '{"a": [1]}', flags=["f"], queue="q")
    await add_job_row(db, "t", '"text"')
    dict_job, str_job = await claim(db, [tasks["t"]])

    # repr: the dataclass's, field for field
    for job in (dict_job, str_job):
        assert repr(job) == repr(as_old(job)).replace("OldJob(", "Job(", 1)
    # hash: by value, and a dict payload is unhashable, as before
    with pytest.raises(TypeError):
        hash(as_old(dict_job))
    with pytest.raises(TypeError):
        hash(dict_job)
    assert hash(str_job) == hash(Job(*(getattr(str_job, n) for n in JOB_FIELDS)))
    assert len({str_job, copy.copy(str_job)}) == 1

    # equality by value, across constructors; other types are not equal
    rebuilt = Job(*(getattr(dict_job, n) for n in JOB_FIELDS))
    assert rebuilt == dict_job
    assert (rebuilt != dict_job) is False
    assert Job(**{n: getattr(dict_job, n) for n in JOB_FIELDS}) == dict_job
    assert dict_job != str_job
    assert dict_job != as_old(dict_job)
    assert dict_job != dict_job.id
    other = {n: getattr(dict_job, n) for n in JOB_FIELDS}
    for name, value in [("payload", {"a": [2]}), ("locked_at", None), ("flags", None)]:
        assert Job(**{**other, name: value}) != dict_job

    # immutable: the frozen dataclass's error (an AttributeError)
    for name in (*JOB_FIELDS, "is_permanently_failed", "anything", "_row", "_cache"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(dict_job, name, 1)
        with pytest.raises(AttributeError):
            delattr(dict_job, name)
    assert dict_job.attempts == 1
    assert dict_job == rebuilt

    # a decoded payload is decoded once: the same object on every read
    assert dict_job.payload is dict_job.payload
    assert dict_job.payload == {"a": [1]}
    assert dict_job.flags == frozenset({"f"})
    assert dict_job.queue_name == "q"
    assert str_job.payload == "text"
    assert not dict_job.is_permanently_failed
    assert dict_job.run_at.tzinfo is UTC

    # copies and pickles rebuild the job from its values
    for clone in (
        copy.copy(dict_job),
        copy.deepcopy(dict_job),
        pickle.loads(pickle.dumps(dict_job)),
    ):
        assert type(clone) is Job
        assert clone == dict_job
        assert repr(clone) == repr(dict_job)

    # positional patterns follow the field order, as the dataclass's __match_args__
    match dict_job:
        case Job(job_id, "t", {"a": [1]}, "q"):
            assert job_id == dict_job.id
        case _:
            pytest.fail("no match")


def test_job_built_directly_keeps_what_it_was_given() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    payload = {"k": [1, 2]}
    job = Job(7, "t", payload, None, 0, at, 0, 25, None, None, None, at, at, None, None, 0)
    assert job.payload is payload
    assert job.run_at is at
    assert job.locked_at is None
    assert job.flags is None
    assert job.key is None
    assert job.revision == 0
    assert repr(job) == repr(as_old(job)).replace("OldJob(", "Job(", 1)


def test_from_record_copies_a_mapping() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    row: dict[str, Any] = {
        "id": 1,
        "payload": '{"a": 1}',
        "priority": 0,
        "run_at": at,
        "attempts": 0,
        "max_attempts": 25,
        "key": None,
        "flags": '["x"]',
        "last_error": None,
        "created_at": at,
        "updated_at": at,
        "locked_at": None,
        "locked_by": None,
        "revision": 0,
    }
    job = Job.from_record(row, "t", None)
    row["payload"] = "[]"
    row["priority"] = 5
    row["flags"] = None
    assert job.payload == {"a": 1}
    assert job.priority == 0
    assert job.flags == frozenset({"x"})
