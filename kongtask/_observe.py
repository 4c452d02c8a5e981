"""What a pool tells its built-in observers (metrics, tracing) about each job run.

The worker calls :meth:`JobObserver.job_started` in the task that runs the job, just
before the handler, and :meth:`JobObserver.job_ended` in the same task once the outcome
is known (before the task takes the next job), unless ``job_started`` returned ``None``
(tracing without an SDK has nothing to end). Both run for every job, so they must be
cheap, allocate little and never raise. This is the in-process path; the user's
``on_event`` callback gets :class:`kongtask.Event` objects, built only when a callback
is set.
"""

from __future__ import annotations

from typing import Protocol, cast

from ._job import Job


class JobObserver(Protocol):
    def job_started(self, job: Job) -> object:
        """Called as ``job`` starts; the value comes back to :meth:`job_ended`, which is
        not called when it is ``None``."""

    def job_ended(
        self, job: Job, started: object, error: BaseException | None, message: str
    ) -> None:
        """Called once ``job``'s outcome is known. ``message`` is the ``last_error`` the
        pool writes (``""``: the job succeeded); ``error`` the exception behind it
        (``None`` on success and for a batch job's partial failure)."""


class BothObservers:
    """Two observers as one (metrics and tracing together)."""

    __slots__ = ("_first", "_second")

    def __init__(self, first: JobObserver, second: JobObserver) -> None:
        self._first = first
        self._second = second

    def job_started(self, job: Job) -> object:
        first, second = self._first.job_started(job), self._second.job_started(job)
        return None if first is None and second is None else (first, second)

    def job_ended(
        self, job: Job, started: object, error: BaseException | None, message: str
    ) -> None:
        first, second = cast(tuple[object, object], started)
        if first is not None:
            self._first.job_ended(job, first, error, message)
        if second is not None:
            self._second.job_ended(job, second, error, message)


def combine(*observers: JobObserver | None) -> JobObserver | None:
    """The observers that are set, as one (``None`` when none is)."""
    present = [o for o in observers if o is not None]
    if not present:
        return None
    combined = present[0]
    for observer in present[1:]:
        combined = BothObservers(combined, observer)
    return combined
