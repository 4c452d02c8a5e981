"""Typed task definitions: a task's identifier and payload type, declared once.

Producers build their jobs from a definition (:meth:`TaskDef.spec`), so a type checker
rejects a payload of the wrong shape where the job is added; the worker can be given the
same definitions, with their handlers, instead of a dict of handlers.

This module imports neither trio nor a database driver: producers import it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

from ._errors import ConfigError
from ._job import Job, JobSpec

P = TypeVar("P")


@dataclasses.dataclass(frozen=True, slots=True)
class TaskDef(Generic[P]):
    """A task: its identifier, the type of its payload and, on the worker's side, its handler.

    The payload type is a :class:`typing.TypedDict` (sent as it is) or a dataclass (sent
    as :func:`dataclasses.asdict`, rebuilt by :meth:`payload_of`); any JSON-serialisable
    type works for the first. Example::

        class Email(TypedDict):
            to: str

        send_email = kongtask.TaskDef("send_email", Email)

        # producer side: mypy checks the payload against Email
        kongtask.add_job_sync(conn, send_email.spec({"to": "a@example.com"}))

        # worker side
        async def deliver(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
            email = send_email.payload_of(job)  # an Email
            ...

        async with kongtask.open_worker(dsn, [send_email.with_handler(deliver)]): ...

    Attributes:
      identifier: the task identifier (at most 128 characters).
      payload_type: the payload's type.
      handler: the worker's handler, as for ``open_worker``'s dict (``None`` for producers).
      timeout: the handler's timeout in seconds, as for :func:`kongtask.task`.
    """

    identifier: str
    payload_type: type[P]
    handler: Callable[..., Any] | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.identifier, str) or not 1 <= len(self.identifier) <= 128:
            raise ConfigError(
                f"task identifier {self.identifier!r} must be a string of 1 to 128 characters"
            )
        if not isinstance(self.payload_type, type):
            raise ConfigError(f"payload_type must be a type, not {self.payload_type!r}")

    def spec(
        self,
        payload: P,
        *,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        job_key: str | None = None,
        priority: int | None = None,
        flags: list[str] | None = None,
    ) -> JobSpec:
        """A job of this task, for ``add_job``/``add_jobs`` of any producer or client."""
        return JobSpec(
            self.identifier,
            _encode(payload),
            queue_name,
            run_at,
            max_attempts,
            job_key,
            priority,
            flags,
        )

    def payload_of(self, job: Job) -> P:
        """``job``'s payload as a ``payload_type`` (a dataclass is rebuilt from its fields).

        Raises:
          ConfigError: the job belongs to another task.
          TypeError: the stored payload does not fit the dataclass.
        """
        if job.task_identifier != self.identifier:
            raise ConfigError(
                f"job {job.id} is a {job.task_identifier!r} job, not {self.identifier!r}"
            )
        if dataclasses.is_dataclass(self.payload_type):
            return self.payload_type(**job.payload)
        return cast(P, job.payload)

    def with_handler(
        self, handler: Callable[..., Any], *, timeout: float | None = None
    ) -> TaskDef[P]:
        """This definition with the worker's ``handler`` (and ``timeout``) attached."""
        if not callable(handler):
            raise ConfigError(f"a task handler must be callable, not {type(handler).__name__}")
        return dataclasses.replace(self, handler=handler, timeout=timeout)


def _encode(payload: object) -> object:
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        return dataclasses.asdict(payload)
    return payload
