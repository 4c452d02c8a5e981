"""The invariants the lifecycle machine checks, and the schema flavours that decide which apply."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

#: Every invariant the machine checks, by the name :class:`InvariantViolation` reports.
INVARIANTS: Mapping[str, str] = {
    "job_held_by_one_pool": "A claim never returns a job that is locked (by any pool) or the same "
    "job twice; a live pool's running jobs stay locked by that pool.",
    "named_queue_serial": "A named queue never has two jobs locked; a claim never takes two jobs "
    "of one named queue, nor a job whose queue row is locked.",
    "queue_lock_matches_jobs": "Queue rows are locked at claim (by P, at the claim's now) and "
    "unlocked by P's complete/fail/return, the stale sweep and force_unlock_workers, nothing else; "
    "a locked job of a named queue has its queue row locked by the same pool.",
    "attempts_transitions": "attempts changes only as documented: claim +1, return -1 (not "
    "below 0), a key hit resets it to 0, permanent failure and retire set max_attempts, "
    "reschedule sets it.",
    "claim_skips_permanently_failed": "A claim never takes a job with attempts >= max_attempts.",
    "claim_skips_future": "A claim never takes a job whose run_at is after the claim's now.",
    "claim_filters": "A claim takes only jobs of the given task ids and none carrying a "
    "forbidden flag.",
    "claim_skips_locked_rows": "A claim neither waits for nor takes job or queue rows another "
    "transaction holds (SKIP LOCKED).",
    "claim_progress_row_locked_queues": "As claim_progress, when other transactions hold "
    "queue rows: jobs whose queue row cannot be locked without waiting are not candidates "
    "(docs/design/database.md#claiming), so they must not use up the limit.",
    "claim_order": "Claims follow priority, then run_at, among the eligible jobs (the best "
    "job of each named queue).",
    "claim_progress": "A claim takes at most its limit; at least one job when one is eligible; "
    "and when the eligible jobs fit in the limit, every queue-less one and one per named queue.",
    "job_key_modes": "key and revision follow graphile-worker's job_key_mode rules (replace, "
    "preserve_run_at, unsafe_dedupe; unavailable rows are retired); a key names at most one "
    "live row.",
    "payloads": "Payloads default to {}; on a key hit two arrays concatenate (batch jobs), "
    "else the new payload wins; a worker fail replaces it only with a given replacement.",
    "run_at_rules": "run_at defaults to now(); preserve_run_at keeps the old one only while "
    "attempts = 0; fail backs off exp(least(attempts, 10)) s from greatest(now(), run_at); the "
    "sweep sets greatest(run_at, now()).",
    "job_locks": "locked_at/locked_by change only at claim, the worker's fail/return, the "
    "sweep and force_unlock_workers.",
    "job_columns": "Every other column is as predicted: task, queue, priority, max_attempts, "
    "flags ({flag: true}, NULL when none), last_error, created_at, updated_at, is_available.",
    "no_job_disappears": "A job leaves the table only by completion (complete_jobs, a worker's "
    "complete) or removal (remove_job).",
    "no_unexpected_jobs": "Rows appear only through add_job / add_jobs.",
    "task_and_queue_rows": "Task and queue rows exist exactly for the names used; task "
    "registration returns the id of every identifier asked for.",
    "no_identity_burn": "Adds and task registration for names that exist consume no identity "
    "values (graphile-worker #619; not checked on graphile-worker <= 0.17 schemas).",
    "notify_counts": 'jobs:insert carries {"r":<random>,"count":n}: n = number of specs for '
    "add_jobs (an empty payload for none), 1 for a fresh unsafe_dedupe insert, -1 when "
    "remove_job deletes; no other step notifies.",
    "jobs_view_agrees": "The jobs view shows exactly the private rows, with task and queue names.",
    "function_results": "Each SQL function and worker statement returns exactly the rows it "
    "affected, as they are afterwards (deleted rows: as they were).",
    "worker_runs_once": "(worker scenarios) No handler runs twice for one job within a "
    "scenario (its jobs have max_attempts 1, so no retry is legitimate).",
    "worker_progress": "(worker scenarios) The pool reaches the scenario's shutdown point: "
    "the handler starts it asks for, or every job that can start has started and every "
    "one that does not hang has finished; every job that can start does so in the latter "
    "case, and no job behind a hung one in its named queue starts.",
    "worker_outcomes": "(worker scenarios) A job whose handler returned is gone; one that "
    "raised is kept with attempts 1 and its message; one cancelled by the shutdown is kept "
    "with attempts 1 and the shutdown message; one never started is untouched.",
    "sql_errors": "Statements fail exactly when graphile-worker's do (duplicate keys in one "
    "add_jobs: 21000; a key with an unknown job_key_mode: GWBKM), and never otherwise.",
}

FIELD_INVARIANT = {
    "attempts": "attempts_transitions",
    "locked_at": "job_locks",
    "locked_by": "job_locks",
    "key": "job_key_modes",
    "revision": "job_key_modes",
    "payload": "payloads",
    "run_at": "run_at_rules",
}


def field_invariant(fields: Sequence[str]) -> str:
    """The invariant a set of differing columns breaks, the most telling first."""
    names = {FIELD_INVARIANT.get(f, "job_columns") for f in fields}
    for name in ("attempts_transitions", "job_locks", "job_key_modes", "payloads", "run_at_rules"):
        if name in names:
            return name
    return "job_columns"


class SchemaFlavour(enum.Enum):
    """Who wrote the schema's function bodies; decides which documented
    differences from graphile-worker the machine checks.

    See docs/design/database.md#differences-from-graphile-worker.
    """

    #: Migrated by kongtask (migrations 1..20 with kongtask's own bodies).
    KONGTASK = "kongtask"
    #: Migrated by graphile-worker 0.18.0 (migration 20: the #619 fix is in).
    GRAPHILE_WORKER = "graphile-worker"
    #: Migrated by graphile-worker 0.17.x (19 migrations: adds burn identity values, #619).
    GRAPHILE_WORKER_0_17 = "graphile-worker-0.17"

    def rules(self) -> list[str]:
        """Which documented differences the machine checks for this flavour, in words."""
        burn = (
            "#619 identity burn: NOT checked (graphile-worker <= 0.17 consumes a task and a "
            "queue identity value on every add; upstream behaviour, fixed by migration 20)"
            if self is SchemaFlavour.GRAPHILE_WORKER_0_17
            else "#619 identity burn: checked strictly (adds and registration of existing "
            "names consume no identity values)"
        )
        return [
            burn,
            "#580 (keyed row locked between retire and upsert): a race across sessions, not "
            "reachable from the machine's single acting connection; not checked",
            "#621 one job per named queue per claim: checked on every flavour, because the "
            "claims are kongtask's statements",
            "Q4 empty add_jobs: every flavour sends an empty jobs:insert payload (checked)",
        ]


#: Task identifiers the strategies use. All but the last are registered when an example
