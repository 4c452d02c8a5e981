"""Claimed, unstarted ("held") jobs: what a pool remembers of each claim, and when it
looks at the rows again before starting them.

graphile-worker's functions treat a locked job as a running one: ``remove_job`` and a
replacing ``add_job`` cannot touch a locked row, so they clear its key and set
``attempts = max_attempts`` instead. A kongtask pool locks jobs some time before it
starts them (its local queue), so two rules keep such a row from running:

- **Recheck before start.** A held job that waited longer than :data:`RECHECK_AFTER`
  since its claim (or since the last recheck that covered it) is looked at again before
  it starts, together with every other held job, in one statement; the ones whose row
  changed, vanished or is no longer locked by the pool are dropped and handed back.
  Jobs that start within :data:`RECHECK_AFTER` of their claim pay nothing.
- **Hand back without resurrecting.** The hand-back gives the claim's attempt back only
  to a row that is unchanged since its claim (:func:`claim_snapshot`); a changed row is
  only unlocked, so ``attempts = max_attempts`` stays and it never runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    from ._job import Job

#: Seconds a held job may wait after its claim (or its last recheck) and still start
#: without being looked at again. Longer than a held job waits under a steady load (the
#: fetcher keeps a tenth of a second of work ahead), so a busy pool rarely pays a recheck;
#: a change made less than this (plus a recheck's round trip) before a job starts may be
#: missed (docs/reliability.md).
RECHECK_AFTER: Final = 0.25

#: What the claim returned of held jobs, as the parallel arrays the recheck and the
#: hand-back statements take: ids, attempts, revisions, updated_at (µs since the Unix
#: epoch), keys, queue ids.
Snapshot: TypeAlias = tuple[
    list[int], list[int], list[int], list[int], list[str | None], list[int | None]
]


def claim_snapshot(jobs: Iterable[Job]) -> Snapshot:
    """The claim snapshot of jobs built by :meth:`kongtask.Job.from_claim`."""
    ids: list[int] = []
    attempts: list[int] = []
    revisions: list[int] = []
    updated: list[int] = []
    keys: list[str | None] = []
    queues: list[int | None] = []
    for job in jobs:
        row = job._row
        ids.append(row["id"])
        attempts.append(row["attempts"])
        revisions.append(row["revision"])
        updated.append(row["updated_at_us"])
        keys.append(row["key"])
        queues.append(row["job_queue_id"])
    return ids, attempts, revisions, updated, keys, queues


def needs_recheck(
    now: float,
    claimed_at: float,
    covered_up_to: float,
    checked_at: float,
    after: float = RECHECK_AFTER,
) -> bool:
    """Whether a held job claimed at ``claimed_at`` must be looked at before it starts.

    ``covered_up_to`` is the claim time of the newest job the last recheck covered (held
    jobs are in claim order, so it covered every job claimed up to then), ``checked_at``
    when its answer came, ``after`` the threshold (:data:`RECHECK_AFTER` unless the
    pool's timing says otherwise). All times are on the trio clock.
    """
    if now - claimed_at < after:
        return False
    return claimed_at > covered_up_to or now - checked_at >= after
