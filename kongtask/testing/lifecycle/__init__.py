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

from .._model import InvariantViolation, Spec
from .._worker_props import (
    ScenarioJob,
    ScenarioResult,
    WorkerHarness,
    WorkerScenario,
    open_worker_harness,
    worker_scenarios,
)
from ._cli import main
from ._harness import LifecycleHarness, open_lifecycle_harness
from ._invariants import INVARIANTS, SchemaFlavour
from ._machine import LifecycleMachine, lifecycle_machine, lifecycle_settings, run_lifecycle_machine
from ._runner import LifecycleReport, describe_failure, detect_flavour, run_lifecycle
from ._statements import ProtocolStatements
from ._strategies import (
    JOB_KEY_MODES,
    KEYS,
    PAYLOAD_SAMPLES,
    QUEUES,
    TASKS,
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
