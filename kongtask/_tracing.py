"""OpenTelemetry spans (the ``kongtask[tracing]`` extra: only opentelemetry-api is needed).

- A consumer span ``kongtask.work <task>`` per job run, fed by the pool's lifecycle
  events (:mod:`kongtask._events`): it starts at ``job:start`` and is made current in the
  worker task that runs the handler (so spans the handler opens are its children, also
  in a sync handler's thread: trio copies the context), records the error at
  ``job:error`` and ends at ``job:complete``.
- A producer span ``kongtask.add_job <task>`` / ``kongtask.add_jobs`` per call of the
  client's ``add_job``/``add_jobs`` (and so ``ctx.add_job`` in handlers).

Attributes follow OpenTelemetry's messaging conventions: ``messaging.system`` =
``kongtask``, ``messaging.destination.name`` = the queue name (the task identifier for
jobs without a queue), ``messaging.operation.type``, ``messaging.message.id`` = the job
id, plus ``kongtask.task`` and ``kongtask.job.attempt``.

**Propagation is opt-in** (``open_client(..., propagate_trace_context=True)``): the 0.18
schema has no headers column, so the producer writes the W3C trace context under the
reserved payload key :data:`TRACE_KEY` of object payloads (other payloads are left
alone). A traced pool then starts the job's span as a child of it. Node workers and
handlers simply see one more key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Final

from ._events import Event, EventCallback
from ._version import __version__

log = logging.getLogger("kongtask.tracing")

#: The payload key that carries the producer's trace context when propagation is on.
TRACE_KEY: Final = "_kongtask_trace"
SYSTEM: Final = "kongtask"


def _api() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        from ._errors import ConfigError

        raise ConfigError(
            "tracing needs opentelemetry-api: pip install 'kongtask[tracing]'"
        ) from None
    return trace


class JobTracer:
    """Consumer spans of one pool, fed by its events."""

    def __init__(self) -> None:
        trace = _api()
        from opentelemetry import context, propagate

        self._trace = trace
        self._context = context
        self._propagate = propagate
        self._tracer = trace.get_tracer("kongtask", __version__)
        self._open: dict[int, tuple[Any, Any]] = {}

    def chain(self, user_callback: EventCallback | None) -> EventCallback:
        """One callback opening and closing spans, then calling the user's (if any)."""

        def on_event(event: Event) -> None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("tracing: consuming %s failed", event.name)
            if user_callback is not None:
                user_callback(event)

        return on_event

    def on_event(self, event: Event) -> None:
        name = event.name
        if name == "job:start":
            self._start(event.fields["job"])
        elif name == "job:error":
            job: Any = event.fields["job"]
            opened = self._open.get(job.id)
            if opened is not None:
                span = opened[0]
                error = event.fields.get("error")
                if isinstance(error, BaseException):
                    span.record_exception(error)
                message = str(event.fields.get("message") or "")
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, message[:200]))
        elif name == "job:complete":
            job = event.fields["job"]
            opened = self._open.pop(job.id, None)
            if opened is not None:
                span, token = opened
                self._context.detach(token)
                span.end()

    def _start(self, job: Any) -> None:
        parent = None
        payload = job.payload
        if isinstance(payload, dict):
            carrier = payload.get(TRACE_KEY)
            if isinstance(carrier, dict):
                parent = self._propagate.extract({str(k): str(v) for k, v in carrier.items()})
        task = job.task_identifier
        span = self._tracer.start_span(
            f"kongtask.work {task}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": job.queue_name or task,
                "messaging.message.id": str(job.id),
                "kongtask.task": task,
                "kongtask.job.attempt": job.attempts,
            },
        )
        token = self._context.attach(self._trace.set_span_in_context(span))
        self._open[job.id] = (span, token)


class ProducerTracer:
    """Producer spans of one client, and the opt-in trace-context injection."""

    def __init__(self, *, propagate_context: bool) -> None:
        trace = _api()
        from opentelemetry import propagate

        self._trace = trace
        self._propagate = propagate
        self._tracer = trace.get_tracer("kongtask", __version__)
        self.propagate_context = propagate_context

    @contextmanager
    def span(
        self, operation: str, task: str | None, queue: str | None, count: int
    ) -> Iterator[Any]:
        """A producer span around one add; yields the span (current inside the block)."""
        name = f"kongtask.{operation}" + (f" {task}" if task else "")
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
        }
        if task is not None:
            attributes["messaging.destination.name"] = queue or task
            attributes["kongtask.task"] = task
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        with self._tracer.start_as_current_span(
            name, kind=self._trace.SpanKind.PRODUCER, attributes=attributes
        ) as span:
            yield span

    def inject(self, fields: MutableMapping[str, Any]) -> None:
        """Add the current trace context to a checked spec's object payload."""
        if not self.propagate_context:
            return
        payload = fields.get("payload")
        if payload is not None and not isinstance(payload, Mapping):
            return  # only object payloads can carry the key
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        if carrier:
            fields["payload"] = {**(payload or {}), TRACE_KEY: carrier}
