"""Pure parts of the worker, without a database: the outcome classifier, batch results,
the local queue's TTL and the first exit code.

Rules: no database here; the classifier and the queue take their inputs (and the time)
as arguments.
"""

from __future__ import annotations

import json

import pytest

from kongtask._job import Job
from kongtask._worker._local_queue import LocalQueue
from kongtask._worker._outcome import (
    CANCELLED_MESSAGE,
    NO_MESSAGE,
    SHUTDOWN_MESSAGE,
    JobCancelled,
    batch_failures,
    classify,
)


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_a_run_that_returned_succeeds() -> None:
    assert classify(
        None, cancelled=False, also=None, cancelled_by_pool=False, timed_out_after=None
    ) == (None, "")


def test_a_raised_error_is_its_message_then_a_traceback() -> None:
    error, message = classify(
        _raised(ValueError("bad input")),
        cancelled=False,
        also=None,
        cancelled_by_pool=False,
        timed_out_after=None,
    )
    assert isinstance(error, ValueError)
    first, rest = message.split("\n", 1)
    assert first == "bad input"
    assert "ValueError: bad input" in rest
    assert "Traceback" in rest


def test_an_error_without_text_and_a_nul_byte() -> None:
    _, message = classify(
        _raised(RuntimeError()),
        cancelled=False,
        also=None,
        cancelled_by_pool=False,
        timed_out_after=None,
    )
    assert message.startswith(NO_MESSAGE + "\n")
    _, message = classify(
        _raised(RuntimeError("a\x00b")),
        cancelled=False,
        also=None,
        cancelled_by_pool=False,
        timed_out_after=None,
    )
    assert "\x00" not in message
    assert message.startswith("a\\0b\n")


def test_a_base_exception_names_its_type_first() -> None:
    _, message = classify(
        _raised(SystemExit(3)),
        cancelled=False,
        also=None,
        cancelled_by_pool=False,
        timed_out_after=None,
    )
    assert message.startswith("the handler raised SystemExit(3)\n")
    _, message = classify(
        _raised(KeyboardInterrupt("x")),
        cancelled=False,
        also=None,
        cancelled_by_pool=False,
        timed_out_after=None,
    )
    assert message.startswith("KeyboardInterrupt: x\n")


@pytest.mark.parametrize(
    ("by_pool", "text"), [(True, SHUTDOWN_MESSAGE), (False, CANCELLED_MESSAGE)]
)
def test_a_cancelled_run_says_who_cancelled_it(by_pool: bool, text: str) -> None:
    error, message = classify(
        None, cancelled=True, also=None, cancelled_by_pool=by_pool, timed_out_after=None
    )
    assert isinstance(error, JobCancelled)
    assert message == str(error) == text


def test_an_error_raised_while_cancelled_follows_the_cancellation() -> None:
    _, message = classify(
        None,
        cancelled=True,
        also=_raised(OSError("cleanup failed")),
        cancelled_by_pool=True,
        timed_out_after=None,
    )
    first, second = message.split("\n")[:2]
    assert first == SHUTDOWN_MESSAGE
    assert second == "The handler also raised cleanup failed"


def test_a_timeout_wins_over_the_cancellation_and_the_error() -> None:
    error, message = classify(
        _raised(ValueError("late")),
        cancelled=True,
        also=None,
        cancelled_by_pool=False,
        timed_out_after=2.5,
    )
    assert isinstance(error, TimeoutError)
    assert message == "timed out after 2.5 s"


def test_batch_results_name_the_failed_elements() -> None:
    assert batch_failures([1, 2], [None, None]) is None
    assert batch_failures({"not": "a batch"}, [ValueError("x")]) is None
    assert batch_failures([1, 2], None) is None
    message, payload = batch_failures([1, 2, 3], [None, ValueError("two"), KeyError()])  # type: ignore[misc]
    assert message == f"Batch failures:\ntwo\n{NO_MESSAGE}"  # KeyError() has no text
    assert json.loads(payload) == [2, 3]
    with pytest.raises(ValueError, match="returned 1 outcomes for a batch of 2"):
        batch_failures([1, 2], [None])


def _job() -> Job:
    return Job.__new__(Job)  # only its identity matters to the queue


def test_the_local_queue_expires_the_oldest_first() -> None:
    queue = LocalQueue(ttl=1.0)
    a, b, c = _job(), _job(), _job()
    queue.add([a, b], now=10.0, wake=False)
    queue.add([c], now=10.5, wake=False)
    assert queue.ttl_deadline() == 11.0
    assert queue.expire(10.99) == []
    assert queue.expire(11.0) == [a, b]
    assert queue.ttl_deadline() == 11.5
    assert queue.take_all() == [c]
    assert len(queue) == 0
    assert queue.ttl_deadline() == float("inf")
