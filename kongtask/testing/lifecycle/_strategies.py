"""Hypothesis strategies for the jobs the machine adds, and the draws its rules make."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from .._model import Spec

#: starts; ``task_late`` only when the ``register_tasks`` rule asks for it.
TASKS: tuple[str, ...] = ("task_a", "task_b", "task_c", "task_late")
#: Queue names the strategies use.
QUEUES: tuple[str, ...] = ("q1", "q2")
#: Job keys the strategies use (few, so that keys collide often).
KEYS: tuple[str, ...] = ("k1", "k2", "k3")
#: ``job_key_mode`` values: ``DEFAULT`` leaves the argument out; ``"bogus"`` must raise GWBKM.
JOB_KEY_MODES: tuple[str | None, ...] = (
    "<default>",
    "replace",
    "preserve_run_at",
    "unsafe_dedupe",
    None,
    "bogus",
)
DEFAULT_MODE = "<default>"
#: How far the machine's clock starts ahead of the database's ``now()``.
CLOCK_LEAD = timedelta(minutes=1)
FLAGS: tuple[str, ...] = ("fa", "fb", "fc")


def task_identifiers() -> st.SearchStrategy[str]:
    """Task identifiers from :data:`TASKS`."""
    return st.sampled_from(TASKS)


# Each strategy is one ``sampled_from`` with ``None`` first: one draw per field (the
# machine draws a lot of jobs, and hypothesis pays per draw), and shrinking goes
# towards "argument not given".


def queue_names() -> st.SearchStrategy[str | None]:
    """``None`` (no queue) or one of :data:`QUEUES`."""
    return st.sampled_from((None, *QUEUES))


def job_keys() -> st.SearchStrategy[str | None]:
    """``None`` or one of :data:`KEYS`."""
    return st.sampled_from((None, *KEYS))


def job_key_modes() -> st.SearchStrategy[str | None]:
    """One of :data:`JOB_KEY_MODES` (mostly valid ones)."""
    return st.sampled_from(JOB_KEY_MODES)


#: Payloads the strategies pick from: objects, nesting, unicode, scalars, and arrays
#: (batch jobs). No floats (their text round trip through jsonb is not what is being
#: tested), no NUL characters and no lone surrogates (jsonb rejects both).
PAYLOAD_SAMPLES: tuple[Any, ...] = (
    {},
    {"a": 1},
    {"nested": {"list": [1, "two", None, True]}, "emoji": "\u00e9\u2603\U0001f600"},
    {"b": [], "a": {}},
    "text",
    17,
    True,
    [],
    [1],
    [2, 3],
    [4, 5, 6],
    [{"id": 7}],
)


def json_payloads() -> st.SearchStrategy[Any]:
    """``None`` (omitted) or one of :data:`PAYLOAD_SAMPLES`."""
    return st.sampled_from((None, *PAYLOAD_SAMPLES))


_FLAG_LISTS: tuple[tuple[str, ...] | None, ...] = (
    None,
    (),
    ("fa",),
    ("fb",),
    ("fa", "fb"),
    ("fa", "fa"),
    ("fc", "fb", "fa"),
)


def flag_lists() -> st.SearchStrategy[tuple[str, ...] | None]:
    """``None``, empty, or flags from a small set, duplicates included."""
    return st.sampled_from(_FLAG_LISTS)


def priorities() -> st.SearchStrategy[int | None]:
    """``None`` (default 0) or a small priority, negatives included."""
    return st.sampled_from((None, -2, -1, 0, 1, 2))


def max_attempts_values() -> st.SearchStrategy[int | None]:
    """``None`` (default 25) or 1..4, so that jobs run out of attempts within an example."""
    return st.sampled_from((None, 1, 2, 3, 4))


_OFFSETS = tuple(timedelta(seconds=s) for s in (-3600, -1, 0, 1, 30, 3600, 5 * 3600))


def run_at_offsets() -> st.SearchStrategy[timedelta | None]:
    """``None`` (the database's ``now()``) or an offset from the machine's clock."""
    return st.sampled_from((None, *_OFFSETS))


@dataclass(frozen=True)
class JobTemplate:
    """A job to add, with ``run_at`` relative to the machine's clock.

    Attributes:
      identifier, payload, queue_name, max_attempts, job_key, priority, flags: as for
        ``add_job``; ``None`` means "not given".
      run_at_offset: added to the clock when the job is added; ``None`` leaves ``run_at``
        to the database's ``now()``.
    """

    identifier: str
    payload: Any = None
    queue_name: str | None = None
    run_at_offset: timedelta | None = None
    max_attempts: int | None = None
    job_key: str | None = None
    priority: int | None = None
    flags: tuple[str, ...] | None = None

    def at(self, clock: datetime) -> Spec:
        """The absolute spec when the clock reads ``clock``."""
        return Spec(
            identifier=self.identifier,
            payload=self.payload,
            queue_name=self.queue_name,
            run_at=None if self.run_at_offset is None else clock + self.run_at_offset,
            max_attempts=self.max_attempts,
            job_key=self.job_key,
            priority=self.priority,
            flags=self.flags,
        )


def job_templates() -> st.SearchStrategy[JobTemplate]:
    """Jobs to add: every field of ``add_job`` drawn from the strategies above."""
    return st.builds(
        JobTemplate,
        identifier=task_identifiers(),
        payload=json_payloads(),
        queue_name=queue_names(),
        run_at_offset=run_at_offsets(),
        max_attempts=max_attempts_values(),
        job_key=job_keys(),
        priority=priorities(),
        flags=flag_lists(),
    )


# Rules draw indices from these strategies, built once: a strategy built inside a rule
# (``st.sampled_from(current_ids)``) costs hypothesis a validation on every draw.
PICK = st.lists(st.integers(0, 15), max_size=4)
ADMIN_PICK = st.lists(st.integers(0, 15), max_size=2)
PICK1 = st.lists(st.integers(0, 15), min_size=1, max_size=4)
INDEX = st.integers(0, 15)
LIMIT = st.integers(1, 5)
TASK_PICK: st.SearchStrategy[list[int]] = st.one_of(
    st.just([]), st.just([]), st.just([]), PICK1
)  # [] = every registered task
FORBIDDEN = st.none() | st.lists(st.sampled_from(FLAGS), max_size=2)
MESSAGES = st.lists(st.sampled_from(["failed", "boom", ""]), min_size=4, max_size=4)
FAILED_ELEMENTS = st.lists(st.none() | PICK1, min_size=4, max_size=4)


def choose(indices: Sequence[int], items: Sequence[Any]) -> list[Any]:
    """``items`` picked by ``indices`` (modulo their number), without repeats, in pick order."""
    out: list[Any] = []
    if items:
        for i in indices:
            item = items[i % len(items)]
            if item not in out:
                out.append(item)
    return out
