"""The cron scheduler (docs/design/database.md#cron).

Test rules:

- Timing (tick times, clock jumps, backfill decisions, restart backoff) runs under
  ``autojump_clock`` with an injected wall clock derived from trio time, against a
  recording backend: the scheduler's decisions only, never a fake database.
- Everything that touches SQL runs against a real PostgreSQL with short absolute
  ``fail_after`` limits and a wall clock shifted so that a minute boundary is about
  a second away (no test waits for a real minute).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kongtask import CronItem, CrontabError, crontab
from kongtask._cron import (
    CronScheduler,
    KnownCrontab,
    PgCronBackend,
    format_ts,
    run_cron_scheduler,
)
from kongtask._pg import Database, open_database

MINUTE = timedelta(minutes=1)
T0 = datetime(2026, 1, 31, 3, 59, 30, 500000, tzinfo=UTC)  # 29.5 s before 04:00


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


class FakeWallClock:
    """UTC time that follows trio time from ``base``, plus a settable ``offset`` (jumps)."""

    def __init__(self, base: datetime) -> None:
        self.base = base
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return self.base + timedelta(seconds=trio.current_time()) + self.offset


@dataclass
class Call:
    at: float  # trio time
    ts: datetime
    ids: list[str]
    backfilled: bool


@dataclass
class Recorder:
    """Records the scheduler's decisions; keeps ``known_crontabs`` rows like the SQL does."""

    known: dict[str, KnownCrontab] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    registrations: list[float] = field(default_factory=list)
    fail_registrations: int = 0

    async def register(
        self, identifiers: Sequence[str], start: datetime
    ) -> dict[str, KnownCrontab]:
        self.registrations.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.fail_registrations:
            self.fail_registrations -= 1
            raise ConnectionError("database unreachable")
        before = {i: self.known[i] for i in identifiers if i in self.known}
        for i in identifiers:
            self.known.setdefault(i, KnownCrontab(i, start, None))
        return before

    async def schedule(self, ts: datetime, items: Sequence[CronItem], backfilled: bool) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(Call(trio.current_time(), ts, [i.cron_id for i in items], backfilled))
        for i in items:
            self.known[i.cron_id] = KnownCrontab(i.cron_id, self.known[i.cron_id].known_since, ts)

    def by_id(self, ident: str) -> list[tuple[datetime, bool]]:
        return [(c.ts, c.backfilled) for c in self.calls if ident in c.ids]


async def run_for(scheduler: CronScheduler, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


# --- timing (autojump clock, recording backend) ------------------------------------------------


async def test_fires_at_each_minute_boundary_plus_slack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder()
    items = crontab("* * * * * every\n*/2 * * * * even\n0 5 * * * never\n")
    await run_for(CronScheduler(items, rec, FakeWallClock(T0)), 150)
    assert [(c.ts, c.ids, c.backfilled) for c in rec.calls] == [
        (utc(2026, 1, 31, 4, 0), ["every", "even"], False),
        (utc(2026, 1, 31, 4, 1), ["every"], False),
        (utc(2026, 1, 31, 4, 2), ["every", "even"], False),
    ]
    # Armed for boundary + ~1 ms by the wall clock: 29.5 s, 89.5 s, 149.5 s of trio time.
    for call, expected in zip(rec.calls, [29.501, 89.501, 149.501], strict=True):
        assert call.at == pytest.approx(expected, abs=1e-6)


async def test_start_exactly_on_a_boundary_schedules_that_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder()
    await run_for(CronScheduler(crontab("* * * * * t"), rec, FakeWallClock(utc(2026, 1, 31, 4))), 1)
    assert [(c.ts, c.at) for c in rec.calls] == [(utc(2026, 1, 31, 4), 0)]


async def test_clock_going_back_rearms_without_duplicates(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    clock = FakeWallClock(T0)
    scheduler = CronScheduler(crontab("* * * * * t"), rec, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run)
        await trio.sleep(45)  # 04:00 done; sleeping towards 04:01
        clock.offset = timedelta(seconds=-40)  # NTP steps the clock back 40 s
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    stamps = [c.ts for c in rec.calls]
    assert stamps == [utc(2026, 1, 31, 4, m) for m in range(3)]  # once each, in order
    # 04:01 fires when the wall clock reaches it (trio 89.5 + 40), not when the timer did.
    assert rec.calls[1].at == pytest.approx(129.501, abs=1e-6)
    assert rec.calls[2].at == pytest.approx(189.501, abs=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fired 39.99" in m and "early" in m for m in warnings), warnings


async def test_tiny_wall_clock_lag_rearms_quietly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # An NTP slew: the wall clock lags trio time by 20 ms -> re-arm, no warning.
    rec = Recorder()
    clock = FakeWallClock(T0)
    scheduler = CronScheduler(crontab("* * * * * t"), rec, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run)
        await trio.sleep(45)
        clock.offset = timedelta(milliseconds=-20)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert [c.ts for c in rec.calls] == [utc(2026, 1, 31, 4, 0), utc(2026, 1, 31, 4, 1)]
    assert rec.calls[1].at == pytest.approx(89.521, abs=1e-6)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_small_forward_jump_catches_up_each_missed_minute_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    clock = FakeWallClock(T0)
    scheduler = CronScheduler(crontab("* * * * * t\n*/5 * * * * five"), rec, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run)
        await trio.sleep(45)
        clock.offset = timedelta(minutes=7)  # suspended VM resumes / clock steps forward
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    # Woke at trio 89.5 = wall 04:08:00.5: 04:01..04:08 processed at once, in order.
    assert rec.by_id("t") == [(utc(2026, 1, 31, 4, m), False) for m in range(9)]
    assert rec.by_id("five") == [(utc(2026, 1, 31, 4, 0), False), (utc(2026, 1, 31, 4, 5), False)]
    assert all(c.at == pytest.approx(89.501, abs=1e-6) for c in rec.calls[1:])
    assert any("late" in r.message for r in caplog.records if r.levelno == logging.WARNING)


async def test_big_forward_jump_backfills_per_fill_instead_of_a_storm(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    clock = FakeWallClock(T0)
    items = crontab("* * * * * filled ?fill=10m\n* * * * * plain\n")
    scheduler = CronScheduler(items, rec, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run)
        await trio.sleep(45)
        clock.offset = timedelta(hours=3)  # wall 07:00:15.5 at trio 45
        await trio.sleep(60)  # wakes at trio 89.5 = wall 07:01:00.5
        nursery.cancel_scope.cancel()
    jump_minute = utc(2026, 1, 31, 7, 1)
    # No 180-minute storm: 'filled' catches up its last 10 minutes (backfilled),
    # 'plain' resumes at the next live minute.
    assert rec.by_id("filled") == [(utc(2026, 1, 31, 4, 0), False)] + [
        (jump_minute - timedelta(minutes=k), True) for k in range(9, -1, -1)
    ]
    assert rec.by_id("plain") == [(utc(2026, 1, 31, 4, 0), False)]
    assert len(rec.calls) == 11
    assert any("late" in r.message for r in caplog.records if r.levelno == logging.WARNING)


async def test_backfill_at_start(autojump_clock: trio.testing.MockClock) -> None:
    start = T0  # 03:59:30.5
    rec = Recorder(
        known={
            "old": KnownCrontab("old", start - timedelta(days=3), start - timedelta(hours=2)),
            "recent": KnownCrontab("recent", start - timedelta(days=3), utc(2026, 1, 31, 3, 50)),
            "never_ran": KnownCrontab("never_ran", utc(2026, 1, 31, 3, 45), None),
            "no_fill": KnownCrontab(
                "no_fill", start - timedelta(days=3), start - timedelta(hours=2)
            ),
        }
    )
    items = crontab(
        "* * * * * old ?fill=30m\n"
        "*/5 * * * * old5 ?fill=1h\n"  # unknown identifier: registered, no backfill
        "* * * * * recent ?fill=1h\n"
        "*/5 * * * * never_ran ?fill=1h\n"
        "* * * * * no_fill\n"
    )
    scheduler = CronScheduler(items, rec, FakeWallClock(start))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run)
        await scheduler.live.wait()
        assert trio.current_time() == 0  # backfill is not timed: it runs straight away
        await trio.sleep(40)
        nursery.cancel_scope.cancel()
    live = utc(2026, 1, 31, 4, 0)
    # 'old': fill 30 m from 03:59:30.5 -> minutes 03:30 .. 03:59.
    assert rec.by_id("old") == [(utc(2026, 1, 31, 3, m), True) for m in range(30, 60)] + [
        (live, False)
    ]
    assert rec.by_id("old5") == [(live, False)]
    # 'recent' last ran 03:50: only later minutes (03:50 itself is already done).
    assert rec.by_id("recent") == [(utc(2026, 1, 31, 3, m), True) for m in range(51, 60)] + [
        (live, False)
    ]
    # 'never_ran' is known since 03:45: from then on, its pattern only.
    assert rec.by_id("never_ran") == [(utc(2026, 1, 31, 3, m), True) for m in (45, 50, 55)] + [
        (live, False)
    ]
    assert rec.by_id("no_fill") == [(live, False)]
    # Backfill is serial, in time order, and done before the first live minute.
    stamps = [c.ts for c in rec.calls]
    assert stamps == sorted(stamps)
    assert len(stamps) == len(set(stamps))


async def test_errors_restart_with_jittered_backoff_capped_at_60s(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(fail_registrations=20)
    scheduler = CronScheduler(crontab("* * * * * t"), rec, FakeWallClock(T0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.run)
        with trio.fail_after(3600):
            await scheduler.live.wait()
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(rec.registrations, rec.registrations[1:], strict=False)]
    assert len(gaps) == 20
    nominal = [min(60.0, 0.2 * 1.5**k) for k in range(20)]
    for gap, base in zip(gaps, nominal, strict=True):
        assert 0.75 * base - 1e-9 <= gap <= min(60.0, 1.25 * base) + 1e-9
    assert max(gaps) <= 60.0 + 1e-6
    assert gaps[-1] >= 45.0  # the cap was reached
    assert len(set(gaps[:14])) == 14  # jittered (below the cap)
    assert scheduler.restarts == 20
    assert sum("cron failed, restarting" in r.message for r in caplog.records) == 20


async def test_error_in_live_loop_restarts_and_backoff_resets_after_success(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder()
    failures = iter([True, False, False, True])
    original = rec.schedule

    async def flaky(ts: datetime, items: Sequence[CronItem], backfilled: bool) -> None:
        if next(failures, False):
            raise ConnectionError("connection reset")
        await original(ts, items, backfilled)

    rec.schedule = flaky  # type: ignore[method-assign]
    scheduler = CronScheduler(crontab("* * * * * t ?fill=5m"), rec, FakeWallClock(T0))
    await run_for(scheduler, 200)
    assert scheduler.restarts == 2
    assert rec.by_id("t") == [
        (utc(2026, 1, 31, 4, 0), True),  # 04:00 failed; the restart backfilled it (fill=5m)
        (utc(2026, 1, 31, 4, 1), False),
        (utc(2026, 1, 31, 4, 2), True),  # failed again; backfilled after the restart
    ]
    # Both restarts waited ~200 ms: a success in between reset the backoff.
    assert len(rec.registrations) == 3
    assert 0.15 <= rec.registrations[1] - 29.501 <= 0.25
    assert 0.15 <= rec.registrations[2] - 149.501 <= 0.25


# --- SQL (real PostgreSQL) ----------------------------------------------------------------------


def boundary_clock(seconds_before: float) -> Callable[[], datetime]:
    """A real-speed wall clock, shifted so a minute boundary is ``seconds_before`` away."""
    real = datetime.now(UTC)
    target = real.replace(second=0, microsecond=0) + 2 * MINUTE
    offset = target - timedelta(seconds=seconds_before) - real
    return lambda: datetime.now(UTC) + offset


async def wait_for_rows(db: Database, sql: str, n: int, *args: object) -> list[dict[str, object]]:
    while True:
        rows = await db.fetch(sql, *args)
        if len(rows) >= n:
            return [dict(r) for r in rows]
        await trio.sleep(0.05)


JOBS_SQL = """
select t.identifier as task, j.run_at, j.payload::text as payload, j.priority, j.max_attempts,
       j.key, q.queue_name, j.flags::text as flags
from graphile_worker._private_jobs j
join graphile_worker._private_tasks t on t.id = j.task_id
left join graphile_worker._private_job_queues q on q.id = j.job_queue_id
order by j.id
"""


@pytest.fixture
async def three_pools(any_dsn: str) -> AsyncIterator[list[Database]]:
    async with (
        open_database(any_dsn, max_size=2) as a,
        open_database(any_dsn, max_size=2) as b,
        open_database(any_dsn, max_size=2) as c,
    ):
        yield [a, b, c]


async def test_schedule_statement_is_exactly_once_under_concurrency(
    three_pools: list[Database],
) -> None:
    items = crontab("* * * * * a\n* * * * * b ?queue=q&priority=3\n* * * * * c ?jobKey=k\n")
    backends = [PgCronBackend(db, "graphile_worker") for db in three_pools]
    ts = utc(2026, 1, 31, 4)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(backends[i % 3].schedule, ts, items, False)
                # Some calls list the items in reverse order (as another crontab might).
                nursery.start_soon(backends[i % 3].schedule, ts, items[::-1], False)
    rows = await three_pools[0].fetch(JOBS_SQL)
    assert sorted(r["task"] for r in rows) == ["a", "b", "c"]
    assert sum(b.jobs_added for b in backends) == 3
    assert {r["run_at"] for r in rows} == {ts}
    known = await three_pools[0].fetch("select * from graphile_worker._private_known_crontabs")
    assert {(r["identifier"], r["last_execution"]) for r in known} == {(i, ts) for i in "abc"}
    # A later minute goes through; an earlier one (a clock behind) does not.
    await backends[0].schedule(ts - MINUTE, items, False)
    await backends[1].schedule(ts + MINUTE, items, False)
    rows = await three_pools[0].fetch(JOBS_SQL)
    # a and b get a second job; c's keyed job is replaced in place (job_key_mode replace).
    assert sorted((r["task"], r["run_at"]) for r in rows) == sorted(
        [("a", ts), ("b", ts), ("a", ts + MINUTE), ("b", ts + MINUTE), ("c", ts + MINUTE)]
    )


async def test_three_pools_share_a_crontab_and_a_backfill_window(
    three_pools: list[Database],
) -> None:
    db = three_pools[0]
    items = crontab(
        "* * * * * every ?fill=30m {kind: 'every'}\n"
        "*/5 * * * * five ?fill=1h\n"
        "* * * * * recent ?fill=1h&queue=rq&max=3&priority=-1\n"
        "* * * * * nofill\n"
        "0 0 1 1 * yearly ?fill=1h\n"
    )
    # The wall clock runs at real speed with minute L 2.5 s away, but stays just before L
    # until every pool has finished its startup and backfill, however slow the machine.
    real_clock = boundary_clock(2.5)
    start = real_clock()
    live = start.replace(second=0, microsecond=0) + MINUTE
    gate_open = False

    def clock() -> datetime:
        now = real_clock()
        return now if gate_open else min(now, live - timedelta(milliseconds=1))

    last = live - 11 * MINUTE
    long_ago = start - timedelta(hours=2)
    await db.execute(
        "insert into graphile_worker._private_known_crontabs values"
        " ('every', $1, $1), ('five', $1, $1), ('recent', $1, $2), ('nofill', $1, $1),"
        " ('yearly', $1, $1)",
        long_ago,
        last,
    )
    window = [live - k * MINUTE for k in range(61)]  # fill 1h from just before L: L-60 .. L
    expected = {
        "every": window[:31],  # fill 30m
        "five": [t for t in window if t.minute % 5 == 0],
        "recent": window[:11],  # after its last_execution L-11
        "nofill": [live],  # known, but no fill: live minutes only
    }
    ticked: list[set[int]] = [set(), set(), set()]  # pool index -> live minutes it handled
    changed = trio.Event()

    class Watched:
        """The real backend, recording when a pool's attempt at a live minute returned."""

        def __init__(self, index: int, pool: Database) -> None:
            self.index = index
            self.inner = PgCronBackend(pool, "graphile_worker")

        async def register(self, identifiers: Sequence[str], start: datetime) -> Any:
            return await self.inner.register(identifiers, start)

        async def schedule(self, ts: datetime, items: Sequence[CronItem], backfilled: bool) -> None:
            nonlocal changed
            await self.inner.schedule(ts, items, backfilled)
            if not backfilled:
                ticked[self.index].add(int(ts.timestamp()))
                changed.set()
                changed = trio.Event()

    schedulers = [
        CronScheduler(items, Watched(i, pool), wall_clock=clock)
        for i, pool in enumerate(three_pools)
    ]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for scheduler in schedulers:
                nursery.start_soon(scheduler.run)
            for scheduler in schedulers:
                await scheduler.live.wait()
            gate_open = True
            # Every pool's own attempt at minute L has returned: a duplicate would be in
            # the table now (the pools that lost the race added nothing, or a duplicate).
            while not all(int(live.timestamp()) in seen for seen in ticked):
                await changed.wait()
            nursery.cancel_scope.cancel()
    rows = [dict(r) for r in await db.fetch(JOBS_SQL)]
    by_task: dict[str, list[datetime]] = {}
    for r in rows:
        by_task.setdefault(str(r["task"]), []).append(r["run_at"])
    for task, stamps in by_task.items():
        assert len(stamps) == len(set(stamps)), f"duplicate jobs for {task}"
    assert {task: sorted(stamps) for task, stamps in by_task.items()} == {
        task: sorted(stamps) for task, stamps in expected.items()
    }
    for r in rows:
        payload = json.loads(str(r["payload"]))
        ts: datetime = r["run_at"]
        assert payload["_cron"] == {"ts": format_ts(ts), "backfilled": ts < live}
    recent = next(r for r in rows if r["task"] == "recent")
    assert (recent["queue_name"], recent["max_attempts"], recent["priority"]) == ("rq", 3, -1)
    every = next(r for r in rows if r["task"] == "every")
    assert str(every["payload"]).startswith('{"kind":"every","_cron":{"ts":"')
    known = {
        r["identifier"]: r["last_execution"]
        for r in await db.fetch("select * from graphile_worker._private_known_crontabs")
    }
    assert known["every"] == known["recent"] == known["nofill"] == live


async def test_run_cron_scheduler_rejects_duplicate_ids_before_starting(db: Database) -> None:
    items = [CronItem("* * * * *", "a"), CronItem("0 * * * *", "a")]
    with trio.fail_after(5), pytest.raises(CrontabError, match="duplicate cron identifier 'a'"):
        await run_cron_scheduler(db, "graphile_worker", items)


async def test_run_cron_scheduler_reports_started_before_the_database(db: Database) -> None:
    # started() comes before any round trip, so a worker's nursery.start never hangs on cron.
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_cron_scheduler, db, "graphile_worker", crontab("* * * * * a"))
            nursery.cancel_scope.cancel()


async def test_registration_marks_new_identifiers_without_backfill(db: Database) -> None:
    clock = boundary_clock(30)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scheduler = CronScheduler(
                crontab("* * * * * fresh ?fill=1h"), PgCronBackend(db, "graphile_worker"), clock
            )
            nursery.start_soon(scheduler.run)
            await scheduler.live.wait()
            nursery.cancel_scope.cancel()
    rows = await db.fetch("select * from graphile_worker._private_known_crontabs")
    assert [(r["identifier"], r["last_execution"]) for r in rows] == [("fresh", None)]
    assert abs(rows[0]["known_since"] - clock()) < timedelta(seconds=5)
    assert await db.fetchval("select count(*) from graphile_worker._private_jobs") == 0


# --- interop with Node graphile-worker 0.18 -------------------------------------------------------


@pytest.fixture
def second_gw_dsn(gw_database_factory: Callable[[], str]) -> str:
    """Another database migrated by graphile-worker 0.18.0 (made outside trio)."""
    return gw_database_factory()


@pytest.mark.oracle
async def test_jobs_are_byte_identical_to_node_graphile_worker(
    gw_dsn: str, second_gw_dsn: str
) -> None:
    """Node 0.18 and kongtask backfill the same crontab into two databases; compare rows."""
    from oracle import node_for, oracle_dir

    line = (
        "* * * * * report ?fill=3m&max=4&queue=cron:q&priority=-5 "
        "{b: 1.0, '10': [1e21, 1e-7, 0.000001, 12345678901234567890], a: 'é\\t\"', "
        "_cron: 'user', nested: {z: null, y: true},}\n"
        "* * * * * plain ?fill=3m\n"
        "* * * * * keyed ?fill=3m&jobKey=r%20k+1&jobKeyMode=preserve_run_at\n"
    )
    items = crontab(line)
    node_dsn, kong_dsn = gw_dsn, second_gw_dsn
    seed = (
        "insert into graphile_worker._private_known_crontabs values "
        "('report', now() - interval '1 hour', now() - interval '1 hour'),"
        "('plain', now() - interval '1 hour', now() - interval '1 hour'),"
        "('keyed', now() - interval '1 hour', now() - interval '1 hour')"
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tasks").mkdir()
        (Path(tmp) / "crontab").write_text(line)
        async with open_database(node_dsn) as node_db, open_database(kong_dsn) as kong_db:
            await node_db.execute(seed)
            await kong_db.execute(seed)
            cli = oracle_dir("0.18.0") / "node_modules" / "graphile-worker" / "dist" / "cli.js"
            proc = await trio.lowlevel.open_process(
                [
                    node_for("0.18.0"),
                    str(cli),
                    "-c",
                    node_dsn,
                    "--crontab",
                    str(Path(tmp) / "crontab"),
                ],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "NODE_ENV": "production"},
            )
            try:
                with trio.fail_after(30):
                    async with trio.open_nursery() as nursery:
                        scheduler = CronScheduler(items, PgCronBackend(kong_db, "graphile_worker"))
                        nursery.start_soon(scheduler.run)
                        await scheduler.live.wait()
                        node_rows = await wait_for_rows(node_db, JOBS_SQL, 7)
                        nursery.cancel_scope.cancel()
            finally:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
            kong_rows = [dict(r) for r in await kong_db.fetch(JOBS_SQL)]

    def keyed(rows: list[dict[str, object]]) -> dict[tuple[object, object], dict[str, object]]:
        return {
            (r["task"], r["run_at"]): r for r in rows if 'backfilled":true' in str(r["payload"])
        }

    # The keyed job was replaced in place minute by minute: compare all but its ts.
    node_key = [r for r in node_rows if r["task"] == "keyed"]
    kong_key = [r for r in kong_rows if r["task"] == "keyed"]
    assert len(node_key) == len(kong_key) == 1
    assert node_key[0]["key"] == kong_key[0]["key"] == "r k 1"
    node_rows = [r for r in node_rows if r["task"] != "keyed"]
    kong_rows = [r for r in kong_rows if r["task"] != "keyed"]
    node, kong = keyed(node_rows), keyed(kong_rows)
    common = set(node) & set(kong)
    # Both backfilled the 3 minutes before their (near-simultaneous) start.
    assert len(common) >= 2, (sorted(node), sorted(kong))
    for key in common:
        assert kong[key] == node[key]
    sample = node[min(k for k in common if k[0] == "report")]
    assert str(sample["payload"]).startswith(
        '{"10":[1e+21,1e-7,0.000001,12345678901234567000],"b":1,"a":"é\\t\\"","_cron":{"ts":"'
    )


# --- through the worker ---------------------------------------------------------------------


async def test_open_worker_runs_the_crontab(kongtask_dsn: str) -> None:
    """``open_worker(crontab=...)`` schedules (here: backfills) and runs cron jobs."""
    from kongtask._worker import open_worker

    seen: list[dict[str, object]] = []
    done = trio.Event()

    async def tick(job: object, ctx: object) -> None:
        seen.append(job.payload)  # type: ignore[attr-defined]
        if len(seen) >= 3:
            done.set()

    async with open_database(kongtask_dsn) as db:
        await db.execute(
            "insert into graphile_worker._private_known_crontabs values"
            " ('tick', now() - interval '1 day', now() - interval '1 hour')"
        )
    with trio.fail_after(20):
        async with open_worker(
            kongtask_dsn, {"tick": tick}, crontab=crontab("* * * * * tick ?fill=3m {n: 1}")
        ):
            await done.wait()
    backfilled = sorted(str(p["_cron"]["ts"]) for p in seen if p["_cron"]["backfilled"])  # type: ignore[index]
    assert len(backfilled) == 3  # the 3 minutes before start, each once
    stamps = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in backfilled]
    assert [b - a for a, b in itertools.pairwise(stamps)] == [MINUTE, MINUTE]
    assert all(p["n"] == 1 for p in seen)


# --- kongtask cron list ----------------------------------------------------------------------


async def test_cron_list_shows_next_runs_and_last_execution(
    kongtask_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from _cli_helpers import cli_status

    path = tmp_path / "crontab"
    path.write_text("0 4 * * * daily ?fill=1h&max=3\n0 0 31 2 * never\n*/5 * * * * fresh\n")
    async with open_database(kongtask_dsn) as db:
        await db.execute(
            "insert into graphile_worker._private_known_crontabs values"
            " ('daily', '2026-01-01T00:00:00Z', '2026-01-30T04:00:00Z'),"
            " ('never', '2026-01-02T00:00:00Z', null)"
        )
    before = datetime.now(UTC)
    with trio.fail_after(10):
        code = await cli_status(
            ["cron", "list", "-c", kongtask_dsn, "--crontab", str(path), "--next", "2"]
        )
    after = datetime.now(UTC)
    out = capsys.readouterr().out
    assert code == 0
    today_4am = datetime.now(UTC).replace(hour=4, minute=0, second=0, microsecond=0)
    first = today_4am if today_4am > datetime.now(UTC) else today_4am + timedelta(days=1)
    assert out.splitlines() == [
        "daily: 0 4 * * * daily  (fill=1h max=3)",
        f"  next: {format_ts(first)}, {format_ts(first + timedelta(days=1))}",
        "  last execution: 2026-01-30T04:00:00.000Z",
        "never: 0 0 31 2 * never",
        "  next: never",
        "  last execution: never (known since 2026-01-02T00:00:00.000Z)",
        "fresh: */5 * * * * fresh",
        out.splitlines()[7],  # checked below: it depends on when the command ran
        "  last execution: never (not registered yet)",
    ]

    def next_fives(t: datetime) -> str:
        first = t.replace(second=0, microsecond=0) + timedelta(minutes=5 - t.minute % 5)
        return f"  next: {format_ts(first)}, {format_ts(first + timedelta(minutes=5))}"

    # the command read the clock between `before` and `after`
    assert out.splitlines()[7] in {next_fives(before), next_fives(after)}


async def test_cron_list_reports_a_bad_crontab(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from _cli_helpers import cli_status

    path = tmp_path / "crontab"
    path.write_text("* * * * * ok\n* * * * MON bad\n")
    code = await cli_status(
        ["cron", "list", "-c", "postgresql://unused.invalid/x", "--crontab", str(path)]
    )
    assert code == 1
    assert capsys.readouterr().err == (
        f"kongtask: crontab {path}, line 2, column 9: unexpected 'M' in the day of week field "
        "'MON': expected digits, '*', '*/n', 'a-b' or a comma list of those (names such as "
        "MON or JAN are not supported)\n"
    )
