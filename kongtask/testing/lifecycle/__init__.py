"""A hypothesis state machine that checks the job lifecycle of a schema on a real Postgres.

Point it at any graphile-worker-compatible schema (migrated by kongtask, or by
graphile-worker itself). Its rules drive the schema through its SQL API (``add_job``,
``add_jobs``, ``remove_job``, ``complete_jobs``, ``permanently_fail_jobs``,
``reschedule_jobs``, ``force_unlock_workers``) and through the worker protocol with
kongtask's own statements (claim a batch as pool P, with or without forbidden flags;
complete, fail or return claimed jobs; let locks go stale and sweep them; claim while a
second connection holds row locks). A pure-Python model predicts every row; after every
step the invariants of :data:`INVARIANTS` are checked, and a violation raises
:class:`InvariantViolation` naming the invariant.

Typical use in a test suite::

    from kongtask.testing.lifecycle import open_lifecycle_harness, run_lifecycle_machine

    def test_schema_lifecycle(kongtask_dsn):
        with open_lifecycle_harness(kongtask_dsn) as harness:
            run_lifecycle_machine(harness, examples=50, seed=1)

Or from a shell, against a scratch schema it creates, migrates and drops::

    python -m kongtask.testing.lifecycle --dsn postgresql://... --examples 500

Worker-level properties on real :func:`kongtask.open_worker` pools live here too:
:func:`open_worker_harness` and :func:`worker_scenarios`.

Speed: the harness keeps one trio + trio-asyncio loop and its connections alive in a
background thread for all examples (docs/design/stack.md#hypothesis-and-async-fixtures);
each step is one crossing into that loop, and examples are separated by deleting the
schema's rows, not by reconnecting.

Needs the ``testing`` extra (hypothesis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._model import InvariantViolation, Spec
from .._worker_props import (
    ScenarioJob,
    ScenarioResult,
    WorkerHarness,
    WorkerScenario,
    open_worker_harness,
    worker_scenarios,
)
from . import _invariants, _strategies
from ._cli import main
from ._harness import LifecycleHarness, open_lifecycle_harness
from ._invariants import SchemaFlavour
from ._machine import LifecycleMachine, lifecycle_machine, lifecycle_settings, run_lifecycle_machine
from ._runner import LifecycleReport, describe_failure, detect_flavour, run_lifecycle
from ._statements import ProtocolStatements
from ._strategies import (
    JobTemplate,
    flag_lists,
    job_key_modes,
    job_keys,
    job_templates,
    json_payloads,
    max_attempts_values,
    priorities,
    queue_names,
    run_at_offsets,
    task_identifiers,
)

# The constants are documented here, where the reference (docs/api.md) finds them.

#: Every invariant the machine checks, by the name :class:`InvariantViolation` reports.
INVARIANTS: Mapping[str, str] = _invariants.INVARIANTS
#: Task identifiers the strategies use. All but the last are registered when an example
#: starts; ``task_late`` only when the ``register_tasks`` rule asks for it.
TASKS: tuple[str, ...] = _strategies.TASKS
#: Queue names the strategies use.
QUEUES: tuple[str, ...] = _strategies.QUEUES
#: Job keys the strategies use (few, so that keys collide often).
KEYS: tuple[str, ...] = _strategies.KEYS
#: ``job_key_mode`` values: ``"<default>"`` leaves the argument out; ``"bogus"`` must raise
#: GWBKM.
JOB_KEY_MODES: tuple[str | None, ...] = _strategies.JOB_KEY_MODES
#: Payloads the strategies pick from: objects, nesting, unicode, scalars, and arrays
#: (batch jobs). No floats (their text round trip through jsonb is not what is being
#: tested), no NUL characters and no lone surrogates (jsonb rejects both).
PAYLOAD_SAMPLES: tuple[Any, ...] = _strategies.PAYLOAD_SAMPLES

__all__ = [
    "INVARIANTS",
    "JOB_KEY_MODES",
    "KEYS",
    "PAYLOAD_SAMPLES",
    "QUEUES",
    "TASKS",
    "InvariantViolation",
    "JobTemplate",
    "LifecycleHarness",
    "LifecycleMachine",
    "LifecycleReport",
    "ProtocolStatements",
    "ScenarioJob",
    "ScenarioResult",
    "SchemaFlavour",
    "Spec",
    "WorkerHarness",
    "WorkerScenario",
    "describe_failure",
    "detect_flavour",
    "flag_lists",
    "job_key_modes",
    "job_keys",
    "job_templates",
    "json_payloads",
    "lifecycle_machine",
    "lifecycle_settings",
    "main",
    "max_attempts_values",
    "open_lifecycle_harness",
    "open_worker_harness",
    "priorities",
    "queue_names",
    "run_at_offsets",
    "run_lifecycle",
    "run_lifecycle_machine",
    "task_identifiers",
    "worker_scenarios",
]
