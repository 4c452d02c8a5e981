"""The rules that play worker pools with the protocol statements under test."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from .._model import STALE_AFTER, MJob, Pool
from ._core import MachineCore
from ._snapshot import parse_snapshot
from ._strategies import (
    FAILED_ELEMENTS,
    FORBIDDEN,
    INDEX,
    LIMIT,
    MESSAGES,
    PICK,
    PICK1,
    TASK_PICK,
    choose,
    task_identifiers,
)


class ClaimRules(MachineCore):
    """Claims, with and without filters and other transactions' row locks, and their checks."""

    @rule(slot=INDEX, tasks=TASK_PICK, limit=LIMIT, forbidden=FORBIDDEN)
    def claim(self, slot: int, tasks: list[int], limit: int, forbidden: list[str] | None) -> None:
        """Claim a batch as pool P at the machine's clock (``$5``), maybe with forbidden flags."""
        self._claim(slot, tasks, limit, forbidden, locked_jobs=[], locked_queues=[])

    @rule(slot=INDEX)
    def claim_batch(self, slot: int) -> None:
        """A worker's usual claim: every registered task, no forbidden flags, limit 5."""
        self._claim(slot, [], 5, None, locked_jobs=[], locked_queues=[])

    @rule(
        slot=INDEX,
        tasks=TASK_PICK,
        limit=LIMIT,
        forbidden=FORBIDDEN,
        job_picks=PICK,
        queue_picks=PICK,
    )
    def claim_while_rows_locked(
        self,
        slot: int,
        tasks: list[int],
        limit: int,
        forbidden: list[str] | None,
        job_picks: list[int],
        queue_picks: list[int],
    ) -> None:
        """Claim while a second connection holds row locks on some jobs and queue rows."""
        jobs = choose(job_picks, self.model.job_ids())
        queues = choose(queue_picks, sorted(self.model.queues))
        self._claim(slot, tasks, limit, forbidden, locked_jobs=jobs, locked_queues=queues)

    def _claim(
        self,
        slot: int,
        tasks: list[int],
        limit: int,
        forbidden: list[str] | None,
        *,
        locked_jobs: list[int],
        locked_queues: list[str],
    ) -> None:
        pool = self.model.pools[slot % len(self.model.pools)]
        # by name, not id: ids depend on the database, and draws must replay the same
        registered = [self.model.registered[name] for name in sorted(self.model.registered)]
        task_ids = choose(tasks, registered) if tasks else registered
        now = self.model.clock
        # where the limit would cut jobs of equal keys, lock the ones it must not take, so
        # that the database has one answer and every replay of the example matches
        locked_jobs = locked_jobs + self.model.tie_breaking_locks(
            task_ids, forbidden, now, limit, locked_jobs, locked_queues
        )
        step = (
            f"claim(pool={pool.pool_id}, tasks={task_ids}, limit={limit}, forbidden={forbidden}"
            + (
                f", row locks on jobs {locked_jobs} and queues {locked_queues})"
                if locked_jobs or locked_queues
                else ")"
            )
        )
        blocker = (locked_jobs, locked_queues) if locked_jobs or locked_queues else None
        raw = self._exec(
            "stmt", self.st.claim, pool.pool_id, task_ids, limit, forbidden, now, blocker=blocker
        )
        self._no_error(step, raw)
        ids = [int(r["id"]) for r in raw.value]
        eligible = self.model.eligible(task_ids, forbidden, now, locked_jobs, locked_queues)
        self._check_claim(
            step, ids, eligible, task_ids, limit, forbidden, now, locked_jobs, locked_queues
        )
        # in creation order: rows of equal keys come back in either order
        self.model.claim(pool, sorted(ids, key=lambda i: self.model.jobs[i].ordinal), now)
        self._verify(step, raw)

    def _check_claim(
        self,
        step: str,
        ids: Sequence[int],
        eligible: Sequence[MJob],
        task_ids: Sequence[int],
        limit: int,
        forbidden: Sequence[str] | None,
        now: datetime,
        locked_jobs: Sequence[int],
        locked_queues: Sequence[str],
    ) -> None:
        model = self.model
        if len(set(ids)) != len(ids):
            raise self._fail(
                "job_held_by_one_pool", step, f"the claim returned a job twice: {list(ids)}"
            )
        tasks = {n for n, t in model.registered.items() if t in set(task_ids)}
        seen_queues: dict[str, int] = {}
        for job_id in ids:
            job = model.jobs.get(job_id)
            if job is None:
                raise self._fail(
                    "function_results", step, f"the claim returned unknown job {job_id}"
                )
            if job.locked_at is not None:
                raise self._fail(
                    "job_held_by_one_pool",
                    step,
                    f"job {job_id} was already locked by {job.locked_by!r}",
                )
            if job.attempts >= job.max_attempts:
                raise self._fail(
                    "claim_skips_permanently_failed",
                    step,
                    f"job {job_id} has attempts {job.attempts} >= max_attempts {job.max_attempts}",
                )
            if job.run_at > now:
                raise self._fail(
                    "claim_skips_future", step, f"job {job_id} runs at {job.run_at}, now is {now}"
                )
            if job.task not in tasks:
                raise self._fail(
                    "claim_filters",
                    step,
                    f"job {job_id} has task {job.task!r}, not in {sorted(tasks)}",
                )
            if forbidden and job.flags and job.flags & set(forbidden):
                raise self._fail(
                    "claim_filters", step, f"job {job_id} has forbidden flags {sorted(job.flags)}"
                )
            if job_id in locked_jobs or (job.queue is not None and job.queue in locked_queues):
                raise self._fail(
                    "claim_skips_locked_rows",
                    step,
                    f"job {job_id} (queue {job.queue!r}) was row-locked elsewhere",
                )
            if job.queue is not None:
                if model.queues[job.queue].locked_at is not None:
                    raise self._fail(
                        "named_queue_serial",
                        step,
                        f"job {job_id}'s queue {job.queue!r} is locked by "
                        f"{model.queues[job.queue].locked_by!r}",
                    )
                if job.queue in seen_queues:
                    raise self._fail(
                        "named_queue_serial",
                        step,
                        f"jobs {seen_queues[job.queue]} and {job_id} of queue {job.queue!r} "
                        "claimed together",
                    )
                seen_queues[job.queue] = job_id
        if len(ids) > limit:
            raise self._fail("claim_progress", step, f"{len(ids)} jobs claimed with limit {limit}")
        claimed = [model.jobs[i] for i in ids]
        rest = [j for j in eligible if j.id not in set(ids)]
        for job in rest:
            if job.queue is not None and job.queue in seen_queues:
                best = model.jobs[seen_queues[job.queue]]
                if job.sort_key() < best.sort_key():
                    raise self._fail(
                        "claim_order",
                        step,
                        f"job {best.id} of queue {job.queue!r} {best.sort_key()} claimed "
                        "before job "
                        f"{job.id} {job.sort_key()}",
                    )
                continue
            for taken in claimed:
                if job.sort_key() < taken.sort_key():
                    raise self._fail(
                        "claim_order",
                        step,
                        f"job {taken.id} {taken.sort_key()} claimed while job {job.id} "
                        f"{job.sort_key()} waits",
                    )
        # Jobs that are eligible except that another transaction holds their queue row:
        # "can be row-locked without waiting" is part of candidacy
        # (docs/design/database.md#claiming), so they must not use up the limit. Shortfalls
        # they explain get their own name.
        shadowed = [
            j.id
            for j in model.eligible(task_ids, forbidden, now, locked_jobs)
            if j.queue is not None and j.queue in locked_queues
        ]
        progress = "claim_progress_row_locked_queues" if shadowed else "claim_progress"
        if eligible and not ids:
            self._check(
                progress,
                step,
                f"nothing claimed; eligible: {[j.id for j in eligible]}; jobs of row-locked queue "
                f"rows: {shadowed}",
            )
        if len(eligible) <= limit:
            left = [j.id for j in rest if j.queue is None or j.queue not in seen_queues]
            if left:
                self._check(
                    progress,
                    step,
                    f"eligible jobs {left} left behind (limit {limit}); jobs of row-locked queue "
                    f"rows: {shadowed}",
                )


class PoolRules(MachineCore):
    """What pools do with claimed jobs (complete, fail, return), zombies, crashes, the sweep,
    the clock and task registration."""

    @rule(identifiers=st.lists(task_identifiers(), min_size=1, max_size=3, unique=True))
    def register_tasks(self, identifiers: list[str]) -> None:
        """The worker's task registration: insert missing identifiers, return all ids."""
        step = f"register_tasks({identifiers})"
        raw = self._exec("stmt", self.st.register_tasks, identifiers)
        self._no_error(step, raw)
        new = [i for i in identifiers if i not in self.model.tasks]
        self.model.tasks.update(identifiers)
        got = {r["identifier"]: int(r["id"]) for r in raw.value}
        if sorted(got) != sorted(identifiers) or len(raw.value) != len(identifiers):
            raise self._fail("task_and_queue_rows", step, f"registration returned {raw.value}")
        self.model.registered.update(got)
        self._verify(step, raw, new_names=(len(new), 0))

    def _held(self, slot: int, picks: Sequence[int]) -> tuple[Pool, list[int]]:
        pools = [p for p in self.model.pools if p.held]
        pool = pools[slot % len(pools)]
        return pool, choose(picks, pool.held)

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=INDEX, picks=PICK1)
    def complete_claimed(self, slot: int, picks: list[int]) -> None:
        """A pool completes some of its running jobs (one statement)."""
        self._complete(*self._held(slot, picks))

    def _complete(self, pool: Pool, ids: list[int], who: str = "") -> None:
        step = f"{who}complete(pool={pool.pool_id}, {ids})"
        raw = self._exec("stmt", self.st.complete, pool.pool_id, ids)
        self._no_error(step, raw)
        self.model.worker_complete(pool, ids)
        self._verify(step, raw)

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=INDEX, picks=PICK1, messages=MESSAGES, failed_elements=FAILED_ELEMENTS)
    def fail_claimed(
        self,
        slot: int,
        picks: list[int],
        messages: list[str],
        failed_elements: list[list[int] | None],
    ) -> None:
        """A pool fails some of its running jobs; batch jobs may keep only failed elements."""
        pool, ids = self._held(slot, picks)
        messages = messages[: len(ids)]
        payloads: list[Any] = []
        for job_id, elements in zip(ids, failed_elements, strict=False):
            payload = self.model.jobs[job_id].payload
            if isinstance(payload, list) and payload and elements is not None:
                # a partial batch failure keeps the failed elements, in order
                keep = sorted({i % len(payload) for i in elements})
                payloads.append([payload[i] for i in keep])
            else:
                payloads.append(None)
        self._worker_fail(pool, ids, messages, payloads)

    def _worker_fail(
        self,
        pool: Pool,
        ids: list[int],
        messages: list[str],
        payloads: list[Any],
        who: str = "",
    ) -> None:
        step = f"{who}fail(pool={pool.pool_id}, {ids})"
        texts = [None if p is None else json.dumps(p) for p in payloads]
        before = self._db_now
        raw = self._exec("stmt", self.st.fail, pool.pool_id, ids, messages, texts)
        self._no_error(step, raw)
        # The statement's now() lies between the previous snapshot's and this one's.
        after = parse_snapshot(raw.snapshot).now
        self.model.worker_fail(pool, ids, messages, payloads, before)
        self._verify(step, raw, run_at_tolerance=after - before + timedelta(milliseconds=1))

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=INDEX, picks=PICK1)
    def return_claimed(self, slot: int, picks: list[int]) -> None:
        """A pool returns claimed jobs it did not start (local queue TTL, shutdown)."""
        self._return(*self._held(slot, picks))

    def _return(self, pool: Pool, ids: list[int], who: str = "") -> None:
        step = f"{who}return_jobs(pool={pool.pool_id}, {ids})"
        raw = self._exec("stmt", self.st.return_jobs, pool.pool_id, ids)
        self._no_error(step, raw)
        self.model.worker_return(pool, ids)
        self._verify(step, raw)

    @precondition(lambda self: any(z.held for z in self.model.zombies))
    @rule(which=INDEX, picks=PICK1, outcome=st.sampled_from(("complete", "fail", "return")))
    def zombie_finishes(self, which: int, picks: list[int], outcome: str) -> None:
        """A pool declared dead (force-unlocked, or crashed) finishes some jobs late.

        Its statements must act only as the protocol allows
        (docs/design/database.md#completing-and-failing): complete deletes by id
        (no ``locked_by`` check), fail and return touch only rows still locked by it, and
        no queue row another pool holds is unlocked.
        """
        zombies = [z for z in self.model.zombies if z.held]
        zombie = zombies[which % len(zombies)]
        ids = choose(picks, zombie.held)
        if outcome == "complete":
            self._complete(zombie, ids, "zombie ")
        elif outcome == "fail":
            self._worker_fail(zombie, ids, ["late"] * len(ids), [None] * len(ids), "zombie ")
        else:
            self._return(zombie, ids, "zombie ")

    @rule(delta=st.sampled_from([timedelta(seconds=s) for s in (1, 3, 30, 600, 3600, 6 * 3600)]))
    def advance_clock(self, delta: timedelta) -> None:
        """Move the claims' clock (``$5``) forward, past run_at values and backoffs."""
        self.model.clock += delta

    @precondition(lambda self: any(p.held for p in self.model.pools))
    @rule(slot=INDEX)
    def crash_pool(self, slot: int) -> None:
        """Pool P died over 4 hours ago: its locks become stale (``locked_at`` set back)."""
        pool = [p for p in self.model.pools if p.held][
            slot % len([p for p in self.model.pools if p.held])
        ]
        step = f"crash_pool({pool.pool_id})"
        raw = self._exec(
            "fn", self.sql.make_stale, pool.pool_id, STALE_AFTER + timedelta(minutes=1)
        )
        self._no_error(step, raw)
        assert raw.now is not None
        self.model.make_stale(pool, raw.now - STALE_AFTER - timedelta(minutes=1))
        self._verify(step, raw)

    @precondition(lambda self: self.model.dead_pool_ids)
    @rule()
    def sweep_stale(self) -> None:
        """The stale-lock sweep: frees job and queue locks older than 4 hours."""
        step = "sweep_stale"
        before = self._db_now
        raw = self._exec("stmt", self.st.sweep_stale)
        self._no_error(step, raw)
        after = parse_snapshot(raw.snapshot).now
        self.model.sweep(before)
        self._verify(step, raw, run_at_tolerance=after - before + timedelta(milliseconds=1))
