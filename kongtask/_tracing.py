"""OpenTelemetry spans (the ``kongtask[tracing]`` extra: only opentelemetry-api is needed).

- A consumer span ``kongtask.work <task>`` per job run, fed by the worker's calls of
  :class:`kongtask._observe.JobObserver`: it starts as the job starts and is made current
  in the worker task that runs the handler (so spans the handler opens are its children,
  also in a sync handler's thread: trio copies the context), records the error and ends
  once the outcome is known.
- A producer span ``kongtask.add_job <task>`` / ``kongtask.add_jobs`` per call of the
  client's ``add_job``/``add_jobs`` (and so ``ctx.add_job`` in handlers).

Attributes follow OpenTelemetry's messaging conventions: ``messaging.system`` =
``kongtask``, ``messaging.destination.name`` = the queue name (the task identifier for
jobs without a queue), ``messaging.operation.type``, ``messaging.message.id`` = the job
id, plus ``kongtask.task`` and ``kongtask.job.attempt``.

Until an OpenTelemetry SDK installs a tracer provider, no span is started at all (the
API's no-op spans would still cost each job and each add a few microseconds).

**Propagation is opt-in** (``open_client(..., propagate_trace_context=True)``,
``open_worker(..., propagate_trace_context=True)`` for ``ctx.add_job``): the 0.18
schema has no headers column, so the producer writes the W3C trace context under the
reserved payload key :data:`TRACE_KEY` of object payloads (other payloads are left
alone). A traced pool then starts the job's span as a child of it. Node workers and
handlers simply see one more key.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, cast

from ._errors import ConfigError
from ._version import __version__

if TYPE_CHECKING:
    from ._job import Job

log = logging.getLogger("kongtask.tracing")

#: The payload key that carries the producer's trace context when propagation is on.
TRACE_KEY: Final = "_kongtask_trace"
SYSTEM: Final = "kongtask"
#: Without an SDK, how often (seconds) tracing looks again whether one was installed.
SDK_RECHECK_SECONDS: Final = 1.0


def _api() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigError(
            "tracing needs opentelemetry-api: pip install 'kongtask[tracing]'"
        ) from None
    return trace


class _SdkWatch:
    """Whether a tracer provider (an SDK) is installed; until one is, starting spans is
    skipped: the API's no-op spans would cost each job microseconds for nothing.

    OpenTelemetry's global provider can be set once, so once one is seen it stays. Asking
    for it costs about a microsecond (an environment lookup), so without one the
    question is asked again at most every :data:`SDK_RECHECK_SECONDS`.
    """

    __slots__ = ("_next_check", "_no_sdk", "_trace", "tracer")

    def __init__(self, trace: Any) -> None:
        self._trace = trace
        self._no_sdk = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self._next_check = -math.inf
        self.tracer: Any = None

    def live(self) -> bool:
        if self.tracer is not None:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        provider = self._trace.get_tracer_provider()
        if isinstance(provider, self._no_sdk):
            self._next_check = now + SDK_RECHECK_SECONDS
            return False
        self.tracer = provider.get_tracer("kongtask", __version__)
        return True


class JobTracer:
    """Consumer spans of one pool (a :class:`kongtask._observe.JobObserver`).

    What it adds around the SDK's own work per job is kept small: the span name and the
    per-task attributes are built once per task, and a job's payload is decoded only when
    its JSON text holds :data:`TRACE_KEY` (a handler that never reads its payload never
    pays for decoding it).
    """

    __slots__ = (
        "_attach",
        "_consumer",
        "_context",
        "_per_task",
        "_propagate",
        "_sdk",
        "_set_span",
        "_trace",
    )

    def __init__(self) -> None:
        trace = _api()
        from opentelemetry import context, propagate

        self._trace = trace
        self._context = context
        self._attach = context.attach
        self._set_span = trace.set_span_in_context
        self._consumer = trace.SpanKind.CONSUMER
        self._propagate = propagate
        self._sdk = _SdkWatch(trace)
        #: per task: the span name and the attributes every job of the task shares
        self._per_task: dict[str, tuple[str, dict[str, Any]]] = {}

    def job_started(self, job: Job) -> object:
        """Start the job's span and make it current in the task that runs the handler
        (spans the handler opens are its children, also in a sync handler's thread:
        trio copies the context). ``None`` (and no :meth:`job_ended` call) while no SDK
        is installed."""
        sdk = self._sdk
        if sdk.tracer is None and not sdk.live():
            return None
        try:
            return self._start(job)
        except Exception:
            log.exception("tracing: starting the span of job %s failed", job.id)
            return None

    def job_ended(
        self, job: Job, started: object, error: BaseException | None, message: str
    ) -> None:
        if started is None:
            return
        span, token = cast(tuple[Any, Any], started)
        try:
            if message:
                if error is not None:
                    span.record_exception(error)
                trace = self._trace
                span.set_status(trace.Status(trace.StatusCode.ERROR, message[:200]))
            self._context.detach(token)
            span.end()
        except Exception:
            log.exception("tracing: ending the span of job %s failed", job.id)

    def _start(self, job: Job) -> tuple[Any, object]:
        task = job._task_identifier
        row = job._row
        queue = row["queue_name"]
        per_task = self._per_task.get(task)
        if per_task is None:
            per_task = self._per_task[task] = (
                f"kongtask.work {task}",
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "process",
                    "messaging.destination.name": task,
                    "kongtask.task": task,
                },
            )
        name, shared = per_task
        attributes = shared.copy()
        if queue is not None:
            attributes["messaging.destination.name"] = queue
        attributes["messaging.message.id"] = str(row["id"])
        attributes["kongtask.job.attempt"] = row["attempts"]
        parent = None
        text = row["payload"]
        if text is not None and TRACE_KEY in text:
            payload = job.payload
            if isinstance(payload, dict):
                carrier = payload.get(TRACE_KEY)
                if isinstance(carrier, dict):
                    parent = self._propagate.extract({str(k): str(v) for k, v in carrier.items()})
        span = self._sdk.tracer.start_span(
            name, context=parent, kind=self._consumer, attributes=attributes
        )
        return span, self._attach(self._set_span(span))


class ProducerTracer:
    """Producer spans of one client, and the opt-in trace-context injection."""

    def __init__(self, *, propagate_context: bool) -> None:
        trace = _api()
        from opentelemetry import propagate

        self._trace = trace
        self._propagate = propagate
        self._sdk = _SdkWatch(trace)
        self.propagate_context = propagate_context

    @contextmanager
    def span(
        self, operation: str, task: str | None, queue: str | None, count: int
    ) -> Iterator[Any]:
        """A producer span around one add; yields the span (current inside the block),
        or ``None`` while no SDK is installed."""
        if not self._sdk.live():
            yield None
            return
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
        with self._sdk.tracer.start_as_current_span(
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


_SHARED_PRODUCERS: dict[bool, ProducerTracer] = {}


@contextmanager
def traced_add(
    tracing: bool,
    propagate_context: bool,
    operation: str,
    task: str | None,
    queue: str | None,
    specs: list[dict[str, Any]],
) -> Iterator[Any]:
    """For the producer functions (``add_job_sync``, ``kongtask.aio.add_job``, ...): a
    producer span around one add when ``tracing`` or ``propagate_context`` is on (yields
    it, or ``None``), injecting the trace context into the specs' payloads when
    ``propagate_context`` is on."""
    if not (tracing or propagate_context):
        yield None
        return
    tracer = _SHARED_PRODUCERS.get(propagate_context)
    if tracer is None:
        tracer = _SHARED_PRODUCERS[propagate_context] = ProducerTracer(
            propagate_context=propagate_context
        )
    with tracer.span(operation, task, queue, len(specs)) as span:
        for fields in specs:
            tracer.inject(fields)
        yield span
