"""OpenTelemetry spans: producer spans on adds, consumer spans on job runs, opt-in propagation.

Rules: as in test_worker.py; spans are collected by opentelemetry-sdk's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import trio
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from test_worker import wait_until

import kongtask
import kongtask.aio
from kongtask._observe import combine
from kongtask._tracing import TRACE_KEY, JobTracer

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {s.name: s for s in exporter.get_finished_spans()}


async def test_trace_continues_from_producer_to_job_and_into_the_handler(
    worker_dsn: str, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("test")
    seen: list[Any] = []

    async def traced(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        seen.append(job.payload)
        with tracer.start_as_current_span("inner"):
            pass

    async with kongtask.open_client(worker_dsn, propagate_trace_context=True) as client:
        with tracer.start_as_current_span("request"):
            job = await client.add_job("traced", {"x": 1}, queue_name="tq")
    async with kongtask.open_worker(worker_dsn, {"traced": traced}, tracing=True) as w:
        await wait_until(lambda: w.statistics().completed == 1)
    found = by_name(spans)
    request, producer = found["request"], found["kongtask.add_job traced"]
    consumer, inner = found["kongtask.work traced"], found["inner"]
    assert producer.kind == SpanKind.PRODUCER
    assert producer.parent.span_id == request.context.span_id
    assert producer.attributes["messaging.destination.name"] == "tq"
    assert producer.attributes["messaging.message.id"] == str(job.id)
    assert consumer.kind == SpanKind.CONSUMER
    assert consumer.context.trace_id == request.context.trace_id
    assert consumer.parent.span_id == producer.context.span_id
    assert dict(consumer.attributes) == {
        "messaging.system": "kongtask",
        "messaging.operation.type": "process",
        "messaging.destination.name": "tq",
        "messaging.message.id": str(job.id),
        "kongtask.task": "traced",
        "kongtask.job.attempt": 1,
    }
    assert inner.parent.span_id == consumer.context.span_id
    assert consumer.status.status_code == StatusCode.UNSET
    (payload,) = seen
    assert payload["x"] == 1
    assert "traceparent" in payload[TRACE_KEY]


async def test_failures_are_recorded_and_thread_handlers_see_the_span(
    worker_dsn: str, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("test")

    async def boom(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        raise ValueError("no good")

    def in_thread(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        with tracer.start_as_current_span("thread-child"):
            pass

    async with kongtask.open_client(worker_dsn) as client:
        await client.add_job("boom", max_attempts=1)
        await client.add_job("in_thread")
        await client.add_jobs([kongtask.JobSpec("in_thread"), kongtask.JobSpec("in_thread")])
    async with kongtask.open_worker(
        worker_dsn, {"boom": boom, "in_thread": in_thread}, tracing=True, concurrency=2
    ) as w:
        await wait_until(lambda: w.statistics().completed + w.statistics().failed == 4)
    finished = spans.get_finished_spans()
    (failed,) = [s for s in finished if s.name == "kongtask.work boom"]
    assert failed.status.status_code == StatusCode.ERROR
    assert "no good" in (failed.status.description or "")
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.parent is None  # propagation was off: a new trace
    workers = {s.context.span_id for s in finished if s.name == "kongtask.work in_thread"}
    children = [s for s in finished if s.name == "thread-child"]
    assert len(workers) == len(children) == 3
    parents = [s.parent for s in children]
    assert None not in parents
    assert {p.span_id for p in parents if p is not None} == workers


async def test_propagation_is_off_by_default_and_leaves_other_payloads_alone(
    worker_dsn: str, spans: InMemorySpanExporter
) -> None:
    async with kongtask.open_client(worker_dsn, tracing=True) as client:
        plain = await client.add_job("t", {"a": 1})
        assert plain.payload == {"a": 1}
    async with kongtask.open_client(worker_dsn, propagate_trace_context=True) as client:
        listed = await client.add_job("t", [1, 2])
        assert listed.payload == [1, 2]
        jobs = await client.add_jobs([kongtask.JobSpec("t"), kongtask.JobSpec("t", {"b": 2})])
        assert all(TRACE_KEY in j.payload for j in jobs)
        assert jobs[1].payload["b"] == 2
    batch = [s for s in spans.get_finished_spans() if s.name == "kongtask.add_jobs"]
    attributes = batch[0].attributes
    assert attributes is not None
    assert attributes["messaging.batch.message_count"] == 2


async def test_untraced_pool_makes_no_spans(worker_dsn: str, spans: InMemorySpanExporter) -> None:
    async def ok(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.lowlevel.checkpoint()

    async with kongtask.open_client(worker_dsn) as client:
        await client.add_job("ok")
    async with kongtask.open_worker(worker_dsn, {"ok": ok}) as w:
        await wait_until(lambda: w.statistics().completed == 1)
    assert spans.get_finished_spans() == ()


async def test_ctx_add_job_continues_the_trace_when_the_pool_propagates(
    worker_dsn: str, spans: InMemorySpanExporter
) -> None:
    children: list[kongtask.Job] = []

    async def parent(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        children.append(await ctx.add_job("child", {"n": 1}))

    async def child(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.lowlevel.checkpoint()

    tasks = {"parent": parent, "child": child}
    async with kongtask.open_client(worker_dsn) as client:
        await client.add_job("parent")
        await client.add_job("parent")
    async with kongtask.open_worker(worker_dsn, tasks, propagate_trace_context=True) as w:
        await wait_until(lambda: w.statistics().completed == 4)
    found: list[Any] = list(spans.get_finished_spans())
    parents = {s.context.span_id: s for s in found if s.name == "kongtask.work parent"}
    producers = {s.context.span_id: s for s in found if s.name == "kongtask.add_job child"}
    consumers = [s for s in found if s.name == "kongtask.work child"]
    assert len(parents) == len(producers) == len(consumers) == 2
    payloads: list[Any] = [c.payload for c in children]
    assert all(TRACE_KEY in p and p["n"] == 1 for p in payloads)
    for consumer in consumers:
        producer = producers[consumer.parent.span_id]
        assert producer.kind == SpanKind.PRODUCER
        assert parents[producer.parent.span_id].context.trace_id == consumer.context.trace_id


async def test_a_traced_pool_without_propagation_adds_plain_payloads(
    worker_dsn: str, spans: InMemorySpanExporter
) -> None:
    children: list[kongtask.Job] = []

    async def parent(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        children.append(await ctx.add_job("child", {"n": 1}))

    async with kongtask.open_client(worker_dsn) as client:
        await client.add_job("parent")
    async with kongtask.open_worker(worker_dsn, {"parent": parent}, tracing=True) as w:
        await wait_until(lambda: w.statistics().completed == 1)
    assert [c.payload for c in children] == [{"n": 1}]
    (producer,) = [s for s in spans.get_finished_spans() if s.name == "kongtask.add_job child"]
    assert producer.kind == SpanKind.PRODUCER


def test_no_span_is_started_until_an_sdk_is_installed() -> None:
    # a fresh interpreter: the global tracer provider can be set only once per process
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        import kongtask._tracing
        from kongtask._tracing import JobTracer, ProducerTracer

        kongtask._tracing.SDK_RECHECK_SECONDS = 0.0  # look again at every job
        from kongtask._job import Job

        job = Job.from_claim(
            {"id": 7, "payload": "{}", "queue_name": None, "attempts": 1, "max_attempts": 3},
            "t",
        )
        tracer, producer = JobTracer(), ProducerTracer(propagate_context=True)
        assert tracer.job_started(job) is None
        with producer.span("add_job", "t", None, 1) as span:
            assert span is None
        trace.set_tracer_provider(TracerProvider())
        started = tracer.job_started(job)
        assert started is not None and started[0].is_recording()
        tracer.job_ended(job, started, None, "")
        with producer.span("add_job", "t", None, 1) as span:
            assert span is not None and span.is_recording()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


def _add_with_producers(dsn: str) -> dict[str, int]:
    """Adds with the producer functions (sync psycopg, asyncio asyncpg), each inside a
    "request" span as a web request would be."""
    tracer = trace.get_tracer("test")
    ids: dict[str, int] = {}
    with psycopg.connect(dsn) as conn, tracer.start_as_current_span("request"):
        ids["sync"] = kongtask.add_job_sync(
            conn, "traced", {"via": "psycopg"}, propagate_trace_context=True
        ).id
        spec = kongtask.JobSpec("traced", {"via": "spec"})
        ids["spec"] = kongtask.add_job_sync(conn, spec, propagate_trace_context=True).id
        ids["plain"] = kongtask.add_job_sync(conn, "traced", {"via": "plain"}).id

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            with tracer.start_as_current_span("request"):
                jobs = await kongtask.aio.add_jobs(
                    conn, [kongtask.JobSpec("traced", {"via": "batch"})] * 2, tracing=True
                )
            ids["batch"] = jobs[0].id
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())
    return ids


async def test_producer_functions_make_spans_and_propagate_when_asked(
    worker_dsn: str, spans: InMemorySpanExporter
) -> None:
    ids = await trio.to_thread.run_sync(_add_with_producers, worker_dsn)
    found: list[Any] = list(spans.get_finished_spans())
    singles = [s for s in found if s.name == "kongtask.add_job traced"]
    (batch,) = [s for s in found if s.name == "kongtask.add_jobs"]
    assert sorted(s.attributes["messaging.message.id"] for s in singles) == sorted(
        [str(ids["sync"]), str(ids["spec"])]
    )  # "plain" asked for no span
    assert all(s.kind == SpanKind.PRODUCER and s.parent is not None for s in [*singles, batch])
    assert batch.attributes["messaging.batch.message_count"] == 2
    async with kongtask.open_client(worker_dsn) as client:
        listed = await client.list_jobs(ids=ids.values())
        payloads: dict[int, Any] = {info.job.id: info.job.payload for info in listed}
    assert payloads[ids["sync"]]["via"] == "psycopg"
    assert TRACE_KEY in payloads[ids["sync"]]
    assert TRACE_KEY in payloads[ids["spec"]]
    assert payloads[ids["plain"]] == {"via": "plain"}
    assert payloads[ids["batch"]] == {"via": "batch"}  # tracing alone does not propagate
    spans.clear()

    async def traced(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.lowlevel.checkpoint()

    async with kongtask.open_worker(worker_dsn, {"traced": traced}, tracing=True) as w:
        await wait_until(lambda: w.statistics().completed == 5)
    finished: list[Any] = list(spans.get_finished_spans())
    by_id = {
        s.attributes["messaging.message.id"]: s
        for s in finished
        if s.name == "kongtask.work traced"
    }
    producer_ids = {s.context.span_id for s in singles}
    assert by_id[str(ids["sync"])].parent.span_id in producer_ids
    assert by_id[str(ids["spec"])].parent.span_id in producer_ids
    assert by_id[str(ids["plain"])].parent is None


def _claimed(job_id: int, payload: str = "{}", queue: str | None = None) -> kongtask.Job:
    """A job as the worker's claim builds it."""
    from kongtask._job import Job

    row = {"id": job_id, "payload": payload, "queue_name": queue, "attempts": 2, "max_attempts": 5}
    return Job.from_claim(row, "t")


def test_each_span_has_its_own_job_attributes(spans: InMemorySpanExporter) -> None:
    # the attributes a task's jobs share are built once: no job's values may leak into them
    tracer = JobTracer()
    for job in (_claimed(5, queue="q1"), _claimed(6), _claimed(7, queue="q2")):
        tracer.job_ended(job, tracer.job_started(job), None, "")
    finished: list[Any] = list(spans.get_finished_spans())
    found = {s.attributes["messaging.message.id"]: s for s in finished}
    assert sorted(found) == ["5", "6", "7"]
    for job_id, destination in (("5", "q1"), ("6", "t"), ("7", "q2")):
        span = found[job_id]
        assert span.name == "kongtask.work t"
        assert dict(span.attributes) == {
            "messaging.system": "kongtask",
            "messaging.operation.type": "process",
            "messaging.destination.name": destination,
            "messaging.message.id": job_id,
            "kongtask.task": "t",
            "kongtask.job.attempt": 2,
        }


def test_payload_is_decoded_only_when_it_may_carry_a_trace_context(
    spans: InMemorySpanExporter,
) -> None:
    from kongtask._job import _PAYLOAD, _UNSET

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("producer") as producer:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    plain = _claimed(1, '{"a": 1}')
    mentions = _claimed(2, json.dumps({"note": TRACE_KEY, "list": [TRACE_KEY]}))
    carries = _claimed(3, json.dumps({"a": 1, TRACE_KEY: carrier}))
    job_tracer = JobTracer()
    for job in (plain, mentions, carries):
        job_tracer.job_ended(job, job_tracer.job_started(job), None, "")
    assert plain._cache[_PAYLOAD] is _UNSET  # a handler that never reads it never decodes it
    finished: list[Any] = list(spans.get_finished_spans())
    found = {
        s.attributes["messaging.message.id"]: s for s in finished if s.name == "kongtask.work t"
    }
    assert found["1"].parent is None
    assert found["2"].parent is None
    assert found["3"].parent is not None
    assert found["3"].parent.span_id == producer.get_span_context().span_id
    assert found["3"].context.trace_id == producer.get_span_context().trace_id


class _Recorder:
    """An observer that records its calls; ``job_started`` returns ``token``."""

    def __init__(self, token: object) -> None:
        self.token = token
        self.calls: list[tuple[str, int]] = []

    def job_started(self, job: kongtask.Job) -> object:
        self.calls.append(("started", job.id))
        return self.token

    def job_ended(
        self, job: kongtask.Job, started: object, error: BaseException | None, message: str
    ) -> None:
        assert started is self.token
        self.calls.append(("ended", job.id))


def test_both_observers_end_only_what_started() -> None:
    job = _claimed(9)
    nothing, something = _Recorder(None), _Recorder(object())
    both = combine(nothing, something)
    assert both is not None
    started = both.job_started(job)
    both.job_ended(job, started, None, "")
    assert nothing.calls == [("started", 9)]
    assert something.calls == [("started", 9), ("ended", 9)]
    neither = combine(_Recorder(None), _Recorder(None))
    assert neither is not None
    assert neither.job_started(job) is None


@pytest.mark.parametrize("token", [None, "token"])
async def test_the_pool_ends_a_job_only_when_its_observer_started_something(
    worker_dsn: str, token: object
) -> None:
    recorder = _Recorder(token)

    async def ok(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        await trio.lowlevel.checkpoint()

    async with kongtask.open_worker(worker_dsn, {"ok": ok}) as w:
        w._runner.observer = recorder
        async with kongtask.open_client(worker_dsn) as client:
            job = await client.add_job("ok")
        await wait_until(lambda: w.statistics().completed == 1)
    expected = [("started", job.id)] + ([("ended", job.id)] if token is not None else [])
    assert recorder.calls == expected
