"""The lifecycle machine's core: one example's model, its steps, and the checks after each."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

from hypothesis.stateful import RuleBasedStateMachine

from .._model import AddOutcome, InvariantViolation, MJob, Model, describe_job
from ._harness import LifecycleHarness
from ._invariants import SchemaFlavour, field_invariant
from ._snapshot import DbState, describe_diff, diff_job, parse_snapshot
from ._steps import StepResult, run_step
from ._strategies import CLOCK_LEAD


class MachineCore(RuleBasedStateMachine):
    """The state of one example and the invariant checks every rule ends with.

    The rules live in mixins (:class:`SqlApiRules`, :class:`ClaimRules`,
    :class:`PoolRules`); :class:`LifecycleMachine` puts them together.
    """

    harness: ClassVar[LifecycleHarness | None] = None

    def __init__(self) -> None:
        super().__init__()
        harness = type(self).harness
        if harness is None:
            raise RuntimeError("bind the machine to a harness first: lifecycle_machine(harness)")
        self.h: LifecycleHarness = harness
        rows, db = harness.reset()
        if db.jobs or db.queues:
            raise RuntimeError(f"schema {harness.schema!r} still holds rows after the reset")
        # The claims' clock starts a minute ahead of the database's, so that jobs added
        # with the default run_at (the database's now()) are due at once.
        self.model = Model(db.now + CLOCK_LEAD, harness.pools)
        self.model.tasks = set(db.tasks)
        self.model.registered = {r["identifier"]: int(r["id"]) for r in rows}
        self.model.seq = dict(db.seq)
        self._db_now = db.now  # the database's now() at the last snapshot
        self.sql = harness.sql
        self.st = harness.statements
        self.flavour = harness.flavour

    def _exec(
        self,
        kind: str,
        sql: str,
        *args: Any,
        blocker: tuple[list[int], list[str]] | None = None,
    ) -> StepResult:
        lock = None
        if blocker is not None:
            lock = (self.sql.lock_jobs, self.sql.lock_queues, blocker[0], blocker[1])
        return self.h.portal.run(run_step, self.sql.snapshot, kind, sql, args, lock)

    def _fail(self, invariant: str, step: str, detail: str) -> InvariantViolation:
        return InvariantViolation(invariant, step, detail)

    def _check(self, invariant: str, step: str, detail: str) -> None:
        """Raise the violation unless the harness was told to skip that invariant."""
        if invariant not in self.h.skip:
            raise self._fail(invariant, step, detail)

    def _no_error(self, step: str, raw: StepResult) -> None:
        if raw.error is not None:
            code, message = raw.error
            if code == "55P03" and step.startswith("claim"):
                raise self._fail(
                    "claim_skips_locked_rows", step, f"the claim waited for a row lock: {message}"
                )
            raise self._fail("sql_errors", step, f"unexpected error {code}: {message}")

    def _expect_error(self, step: str, raw: StepResult, code: str) -> None:
        if raw.error is None:
            raise self._fail(
                "sql_errors", step, f"expected error {code}, but the statement succeeded"
            )
        if raw.error[0] != code:
            raise self._fail(
                "sql_errors", step, f"expected error {code}, got {raw.error[0]}: {raw.error[1]}"
            )
        self._verify(step, raw, notify=[], error_step=True)

    def _verify(
        self,
        step: str,
        raw: StepResult,
        *,
        notify: Sequence[str | int] = (),
        new_names: tuple[int, int] = (0, 0),
        run_at_tolerance: timedelta = timedelta(0),
        error_step: bool = False,
    ) -> DbState:
        db = parse_snapshot(raw.snapshot)
        self._db_now = db.now
        self._check_structure(step, db)
        self._check_model(step, db, run_at_tolerance)
        self._check_names(step, db, new_names, error_step)
        self._check_notifications(step, raw.notifications, notify)
        return db

    def _check_structure(self, step: str, db: DbState) -> None:
        # The jobs view against the private tables.
        view = {v["id"]: v for v in db.view}
        if set(view) != {r["id"] for r in db.raw_jobs}:
            raise self._fail(
                "jobs_view_agrees",
                step,
                f"view ids {sorted(view)} != table ids {sorted(r['id'] for r in db.raw_jobs)}",
            )
        for raw in db.raw_jobs:
            v = view[raw["id"]]
            want = {k: raw[k] for k in v if k not in ("queue_name", "task_identifier")}
            want["queue_name"] = (
                None if raw["job_queue_id"] is None else db.queue_names.get(raw["job_queue_id"])
            )
            want["task_identifier"] = db.task_names.get(raw["task_id"])
            if want != v:
                raise self._fail("jobs_view_agrees", step, f"view row {v} != table row {want}")
        # At most one locked job per named queue, and its queue row is locked by its pool.
        locked_in_queue: dict[str, int] = {}
        for job_id, row in db.jobs.items():
            if row["is_available"] != (
                row["locked_at"] is None and row["attempts"] < row["max_attempts"]
            ):
                raise self._fail(
                    "job_columns", step, f"job {job_id}: is_available is {row['is_available']}"
                )
            queue = row["queue"]
            if row["locked_at"] is None or queue is None:
                continue
            if queue in locked_in_queue:
                raise self._fail(
                    "named_queue_serial",
                    step,
                    f"queue {queue!r} has two locked jobs: {locked_in_queue[queue]} and {job_id}",
                )
            locked_in_queue[queue] = job_id
            qrow = db.queues.get(queue)
            if qrow is None or qrow["locked_by"] != row["locked_by"]:
                raise self._fail(
                    "queue_lock_matches_jobs",
                    step,
                    f"job {job_id} is locked by {row['locked_by']!r} but queue {queue!r} by "
                    f"{None if qrow is None else qrow['locked_by']!r}",
                )

    def _check_model(self, step: str, db: DbState, run_at_tolerance: timedelta) -> None:
        model = self.model
        missing = sorted(set(model.jobs) - set(db.jobs))
        if missing:
            raise self._fail(
                "no_job_disappears",
                step,
                "; ".join(describe_job(model.jobs[i]) for i in missing) + " vanished",
            )
        extra = sorted(set(db.jobs) - set(model.jobs))
        if extra:
            raise self._fail(
                "no_unexpected_jobs", step, "; ".join(describe_job(db.jobs[i]) for i in extra)
            )
        for job_id, job in model.jobs.items():
            row = db.jobs[job_id]
            fields = diff_job(job, row, run_at_tolerance)
            if fields:
                raise self._fail(field_invariant(fields), step, describe_diff(job, row, fields))
            # Adopt what the model leaves open, and run_at within the float tolerance.
            job.updated_at = row["updated_at"]
            job.run_at = row["run_at"]
        for pool in model.pools:
            for job_id in pool.held:
                held = db.jobs.get(job_id)
                if held is None or held["locked_by"] != pool.pool_id:
                    raise self._fail(
                        "job_held_by_one_pool",
                        step,
                        f"pool {pool.pool_id} runs job {job_id}, which is locked by "
                        f"{None if held is None else held['locked_by']!r}",
                    )
        if set(db.queues) != set(model.queues):
            raise self._fail(
                "task_and_queue_rows",
                step,
                f"queues {sorted(db.queues)} != model {sorted(model.queues)}",
            )
        for name, queue in model.queues.items():
            qrow = db.queues[name]
            if (qrow["locked_at"], qrow["locked_by"]) != (queue.locked_at, queue.locked_by):
                raise self._fail(
                    "queue_lock_matches_jobs",
                    step,
                    f"queue {name!r}: model locked_by={queue.locked_by!r} at {queue.locked_at}, "
                    f"database locked_by={qrow['locked_by']!r} at {qrow['locked_at']}",
                )

    def _check_names(
        self, step: str, db: DbState, new_names: tuple[int, int], error_step: bool
    ) -> None:
        model = self.model
        if set(db.tasks) != model.tasks:
            raise self._fail(
                "task_and_queue_rows",
                step,
                f"tasks {sorted(db.tasks)} != model {sorted(model.tasks)}",
            )
        for name, task_id in model.registered.items():
            if db.tasks.get(name) != task_id:
                raise self._fail(
                    "task_and_queue_rows",
                    step,
                    f"task {name!r} registered as {task_id}, table says {db.tasks.get(name)}",
                )
        if not error_step and self.flavour is not SchemaFlavour.GRAPHILE_WORKER_0_17:
            for what, created in zip(("tasks", "queues"), new_names, strict=True):
                used = db.seq[what] - model.seq[what]
                if used != created:
                    raise self._fail(
                        "no_identity_burn",
                        step,
                        f"{created} new {what} rows consumed {used} identity values (#619; "
                        f"flavour {self.flavour.value} must not burn them)",
                    )
        model.seq = dict(db.seq)

    def _check_notifications(
        self, step: str, got: Sequence[str], want: Sequence[str | int]
    ) -> None:
        counts: list[str | int] = []
        for payload in got:
            if payload == "":
                counts.append("")
                continue
            try:
                data = json.loads(payload)
            except ValueError:
                raise self._fail(
                    "notify_counts", step, f"unparseable payload {payload!r}"
                ) from None
            if (
                not isinstance(data, dict)
                or list(data) != ["r", "count"]
                or not isinstance(data["r"], float)
                or not isinstance(data["count"], int)
            ):
                raise self._fail("notify_counts", step, f"malformed payload {payload!r}")
            counts.append(data["count"])
        if counts != list(want):
            raise self._fail(
                "notify_counts", step, f"jobs:insert counts {counts}, expected {list(want)}"
            )

    def _returned_rows(self, db: DbState, text: str | None) -> list[dict[str, Any]]:
        if text is None:
            return []
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
        return [db.job(r) for r in rows if r.get("id") is not None]

    def _check_returned(
        self, step: str, rows: Sequence[Mapping[str, Any]], want: Sequence[MJob]
    ) -> None:
        got_ids = sorted(r["id"] for r in rows)
        want_ids = sorted(j.id for j in want)
        if got_ids != want_ids:
            raise self._fail(
                "function_results", step, f"returned ids {got_ids}, expected {want_ids}"
            )
        by_id = {j.id: j for j in want}
        for row in rows:
            job = by_id[row["id"]]
            fields = diff_job(job, row, timedelta(0))
            if fields:
                raise self._fail(
                    "function_results", step, "returned " + describe_diff(job, row, fields)
                )

    def _apply_inserts(
        self, step: str, outcome: AddOutcome, rows: Sequence[Mapping[str, Any]], now: datetime
    ) -> list[int]:
        """Give the model's inserted jobs the ids the database chose (matched by content)."""
        new_rows = sorted(
            (r for r in rows if r["id"] not in self.model.jobs), key=lambda r: r["id"]
        )
        keyed = any(spec.job_key is not None for _, spec in outcome.inserts)
        if len(new_rows) != len(outcome.inserts):
            raise self._fail(
                "job_key_modes" if keyed else "function_results",
                step,
                f"{len(new_rows)} new rows returned ({[describe_job(r) for r in new_rows]}), "
                f"the model expects {len(outcome.inserts)} inserts",
            )
        pending = [self.model.new_job(0, spec, now) for _, spec in outcome.inserts]
        unmatched: list[Mapping[str, Any]] = []
        for row in new_rows:
            for i, job in enumerate(pending):
                job.id = row["id"]
                if not diff_job(job, row, timedelta(0)):
                    self.model.jobs[job.id] = pending.pop(i)
                    break
            else:
                unmatched.append(row)
        for row, job in zip(unmatched, pending, strict=True):
            job.id = row["id"]
            fields = diff_job(job, row, timedelta(0))
            raise self._fail(
                field_invariant(fields),
                step,
                "inserted " + describe_diff(job, row, fields),
            )
        return [r["id"] for r in new_rows]
