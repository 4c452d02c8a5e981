"""The lifecycle state machine (kongtask.testing.lifecycle) against real schemas.

Rules for this module:

- Fixed seeds only (``seed=``): a run is the same run every time, so a failure here is a
  real failure, never a flake.
- The machine runs against a kongtask-migrated schema AND one migrated by graphile-worker
  0.18.0 from npm, with kongtask's own worker statements.
- Fault injection: each deliberately broken statement must be caught, and the violation
  must carry the name of the invariant it breaks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import Phase

from kongtask.testing import lifecycle as lc, run_sync_sql
from kongtask.testing.lifecycle import (
    INVARIANTS,
    InvariantViolation,
    ProtocolStatements,
    SchemaFlavour,
    lifecycle_settings,
    open_lifecycle_harness,
    run_lifecycle,
    run_lifecycle_machine,
)

# kongtask's claim lets a job whose queue row another transaction holds use up the limit
# (SCHEMA.md §5.3 says such jobs are not candidates); see test_lifecycle_findings.py.
KNOWN_DEVIATIONS = frozenset({"claim_progress_row_locked_queues"})

EXAMPLES = 60


def test_kongtask_schema(kongtask_dsn: str) -> None:
    with open_lifecycle_harness(kongtask_dsn, skip=KNOWN_DEVIATIONS) as harness:
        run_lifecycle_machine(harness, examples=EXAMPLES, seed=20260101)
        assert harness.examples >= EXAMPLES


@pytest.mark.oracle
def test_graphile_worker_schema(gw_dsn: str) -> None:
    with open_lifecycle_harness(
        gw_dsn, flavour=SchemaFlavour.GRAPHILE_WORKER, skip=KNOWN_DEVIATIONS
    ) as harness:
        run_lifecycle_machine(harness, examples=EXAMPLES, seed=20260102)
        assert harness.examples >= EXAMPLES


def test_custom_schema_name(kongtask_database_factory: object) -> None:
    """A schema name that needs quoting; the machine never touches graphile_worker."""
    from kongtask._migrate import migrate_sync

    dsn: str = kongtask_database_factory(migrated=True)  # type: ignore[operator]
    schema = 'Lifecycle "Test"'
    migrate_sync(dsn, schema)
    run_sync_sql(dsn, "select graphile_worker.add_job('bystander')")
    with open_lifecycle_harness(dsn, schema, skip=KNOWN_DEVIATIONS) as harness:
        run_lifecycle_machine(harness, examples=10, seed=7)
    rows = run_sync_sql(dsn, "select count(*) as n from graphile_worker._private_jobs")
    assert rows[0][0]["n"] == 1  # type: ignore[index]


# --------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------


def _broken(schema: str, statement: str, old: str, new: str) -> ProtocolStatements:
    good = ProtocolStatements.kongtask(schema)
    text = getattr(good, statement)
    assert old in text, f"kongtask's {statement} changed; update this fault's anchor {old!r}"
    return good.replace(**{statement: text.replace(old, new)})


FAULTS = {
    "claim_without_one_job_per_queue": (
        "claim",
        "where r.job_queue_id is null or r.rn = 1",
        "where true",
        "named_queue_serial",
    ),
    "fail_without_queue_unlock": (
        "fail",
        "from failed f\n  where q.id = f.job_queue_id and q.locked_by = $1::text",
        "from failed f\n  where q.id = f.job_queue_id and q.locked_by = $1::text and false",
        "queue_lock_matches_jobs",
    ),
    "return_without_attempts_decrement": (
        "return_jobs",
        "greatest(0, j.attempts - 1)",
        "j.attempts",
        "attempts_transitions",
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_caught(kongtask_dsn: str, fault: str) -> None:
    statement, old, new, invariant = FAULTS[fault]
    statements = _broken("graphile_worker", statement, old, new)
    with (
        open_lifecycle_harness(
            kongtask_dsn, statements=statements, skip=KNOWN_DEVIATIONS
        ) as harness,
        pytest.raises(InvariantViolation) as caught,
    ):
        run_lifecycle_machine(harness, seed=1, settings_=lifecycle_settings(300, shrink=False))
    assert caught.value.invariant == invariant, str(caught.value)


def test_claim_without_skip_locked_is_caught(kongtask_dsn: str) -> None:
    """The claim_while_rows_locked rule holds row locks from a second connection."""
    good = ProtocolStatements.kongtask("graphile_worker")
    assert good.claim.count(" skip locked") == 2
    statements = good.replace(claim=good.claim.replace(" skip locked", ""))
    with (
        open_lifecycle_harness(
            kongtask_dsn, statements=statements, skip=KNOWN_DEVIATIONS
        ) as harness,
        pytest.raises(InvariantViolation) as caught,
    ):
        run_lifecycle_machine(harness, seed=1, settings_=lifecycle_settings(300, shrink=False))
    assert caught.value.invariant == "claim_skips_locked_rows", str(caught.value)


def test_fault_is_shrunk_to_a_short_counterexample(
    kongtask_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With shrinking on, the reported run is small and names the invariant."""
    statement, old, new, invariant = FAULTS["return_without_attempts_decrement"]
    statements = _broken("graphile_worker", statement, old, new)
    with (
        open_lifecycle_harness(
            kongtask_dsn, statements=statements, skip=KNOWN_DEVIATIONS
        ) as harness,
        pytest.raises(InvariantViolation) as caught,
    ):
        run_lifecycle_machine(harness, seed=2, settings_=lifecycle_settings(300))
    assert caught.value.invariant == invariant
    assert caught.value.step.startswith("return_jobs")


def test_settings_phases() -> None:
    assert Phase.shrink not in lifecycle_settings(5, shrink=False).phases
    assert Phase.explain not in lifecycle_settings(5).phases


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------


def _schemas(dsn: str) -> set[str]:
    rows = run_sync_sql(dsn, "select nspname from pg_namespace")
    return {r["nspname"] for r in rows[0]}  # type: ignore[attr-defined]


def test_runner_scratch_schema_is_dropped(kongtask_dsn: str) -> None:
    before = _schemas(kongtask_dsn)
    lines: list[str] = []
    report = run_lifecycle(
        kongtask_dsn, examples=5, seed=5, skip=KNOWN_DEVIATIONS, out=lines.append
    )
    assert report.failure is None, report.failure
    assert report.examples >= 5
    assert report.per_second > 0
    assert report.flavour is SchemaFlavour.KONGTASK
    assert _schemas(kongtask_dsn) == before
    assert any("examples/s" in line for line in lines)
    assert any("#619" in line for line in lines)


@pytest.mark.oracle
def test_runner_existing_detects_flavour_and_leaves_rows_empty(gw_dsn: str) -> None:
    lines: list[str] = []
    report = run_lifecycle(
        gw_dsn, examples=5, seed=6, existing=True, skip=KNOWN_DEVIATIONS, out=lines.append
    )
    assert report.failure is None, report.failure
    assert report.flavour is SchemaFlavour.GRAPHILE_WORKER
    rows = run_sync_sql(gw_dsn, "select count(*) as n from graphile_worker._private_jobs")
    assert rows[0][0]["n"] == 0  # type: ignore[index]


def test_runner_existing_refuses_a_schema_with_jobs(kongtask_dsn: str) -> None:
    run_sync_sql(kongtask_dsn, "select graphile_worker.add_job('precious')")
    with pytest.raises(RuntimeError, match="holds jobs"):
        run_lifecycle(kongtask_dsn, examples=1, existing=True, out=lambda _: None)
    rows = run_sync_sql(kongtask_dsn, "select count(*) as n from graphile_worker._private_jobs")
    assert rows[0][0]["n"] == 1  # type: ignore[index]


def test_cli_runs_a_scratch_schema(kongtask_dsn: str) -> None:
    """``python -m kongtask.testing.lifecycle`` exits 0 on success and prints its speed."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kongtask.testing.lifecycle",
            "--dsn",
            kongtask_dsn,
            "--examples",
            "3",
            "--seed",
            "9",
            "--skip",
            "claim_progress_row_locked_queues",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "examples/s" in proc.stdout
    assert "seed 9" in proc.stdout


def test_every_reported_name_is_documented() -> None:
    source = Path(lc.__file__).read_text()
    names = set(re.findall(r'_(?:fail|check)\(\s*"([a-z_]+)"', source))
    names |= set(re.findall(r'"([a-z_]+)" if shadowed else "([a-z_]+)"', source)[0])
    names |= set(lc._FIELD_INVARIANT.values())
    assert names, "no invariant names found"
    assert names <= set(INVARIANTS), names - set(INVARIANTS)
