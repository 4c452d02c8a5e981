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
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import Phase

from kongtask._config import quote_ident
from kongtask.testing import lifecycle as lc, run_sync_sql
from kongtask.testing._model import Model, MQueue, Spec
from kongtask.testing._portal import Connections
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
from kongtask.testing.lifecycle._invariants import FIELD_INVARIANT

# Invariants not enforced on kongtask's statements (none: the one finding so far, see
# test_lifecycle_findings.py, is fixed).
KNOWN_DEVIATIONS: frozenset[str] = frozenset()

EXAMPLES = 40
NOW = datetime(2026, 1, 1, tzinfo=UTC)


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


@pytest.mark.oracle
def test_graphile_worker_0_17_schema_and_issue_619(kongtask_database_factory: object) -> None:
    """graphile-worker 0.17.3's bodies burn identity values (#619): the detected flavour
    says so and skips that check; forcing the 0.18 rules finds it at once."""
    from oracle import oracle_migrate, require_oracle

    require_oracle("0.17.3")
    dsn: str = kongtask_database_factory(migrated=False)  # type: ignore[operator]
    oracle_migrate(dsn, version="0.17.3")
    assert lc.detect_flavour(dsn, "graphile_worker") is SchemaFlavour.GRAPHILE_WORKER_0_17
    with open_lifecycle_harness(dsn, flavour=SchemaFlavour.GRAPHILE_WORKER_0_17) as harness:
        run_lifecycle_machine(harness, examples=20, seed=3)
    with (
        open_lifecycle_harness(dsn, flavour=SchemaFlavour.GRAPHILE_WORKER) as harness,
        pytest.raises(InvariantViolation) as caught,
    ):
        run_lifecycle_machine(harness, seed=3, settings_=lifecycle_settings(50, shrink=False))
    assert caught.value.invariant == "no_identity_burn", str(caught.value)
    assert "#619" in caught.value.detail


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


def reference_statements(schema: str) -> ProtocolStatements:
    """The worker protocol (docs/design/database.md#claiming) written for these tests,
    independent of ``kongtask._sql`` (which its owners keep improving), so that each fault below is
    exactly one change to a statement the machine accepts."""
    s = quote_ident(schema)
    now = "coalesce($5::timestamptz, now())"
    unlock = (
        f"update {s}._private_job_queues q set locked_at = null, locked_by = null "
        "from {src} x where q.id = x.job_queue_id and q.locked_by = $1::text"
    )
    claim = f"""
with candidates as (
  select j.id, j.job_queue_id, j.priority, j.run_at
  from {s}._private_jobs j
  where j.is_available
    and j.run_at <= {now}
    and j.task_id = any($2::int[])
    and (j.flags is null or $4::text[] is null or not (j.flags ?| $4::text[]))
    and (j.job_queue_id is null or j.job_queue_id in (
      select q.id from {s}._private_job_queues q where q.is_available for update skip locked))
  order by j.priority, j.run_at
  limit $3::int
  for update of j skip locked
),
firsts as (
  select distinct on (coalesce(c.job_queue_id::bigint, -c.id)) c.id, c.job_queue_id
  from candidates c
  order by coalesce(c.job_queue_id::bigint, -c.id), c.priority, c.run_at
),
marked as (
  update {s}._private_job_queues q set locked_by = $1::text, locked_at = {now}
  from firsts f where q.id = f.job_queue_id returning q.id
)
update {s}._private_jobs j set attempts = j.attempts + 1, locked_by = $1::text, locked_at = {now}
from firsts f where j.id = f.id
returning j.id
"""
    complete = f"""
with deleted as (
  delete from {s}._private_jobs j where j.id = any($2::bigint[]) returning j.job_queue_id
)
{unlock.format(src="deleted")}
"""
    fail = f"""
with input as (
  select * from unnest($2::bigint[], $3::text[], $4::text[]) as i(id, message, payload)
),
failed as (
  update {s}._private_jobs j
  set last_error = i.message,
      run_at = greatest(now(), j.run_at) + exp(least(j.attempts, 10)) * interval '1 second',
      locked_at = null, locked_by = null, payload = coalesce(i.payload::json, j.payload)
  from input i where j.id = i.id and j.locked_by = $1::text
  returning j.job_queue_id
)
{unlock.format(src="failed")}
"""
    return_jobs = f"""
with returned as (
  update {s}._private_jobs j
  set attempts = case when j.updated_at < j.locked_at then greatest(0, j.attempts - 1)
                 else j.attempts end,
      locked_at = null, locked_by = null
  where j.id = any($2::bigint[]) and j.locked_by = $1::text
  returning j.job_queue_id
)
{unlock.format(src="returned")}
"""
    sweep = f"""
with j as (
  update {s}._private_jobs set locked_at = null, locked_by = null,
    run_at = greatest(run_at, now())
  where locked_at < now() - interval '4 hours' returning id
)
update {s}._private_job_queues set locked_at = null, locked_by = null
where locked_at < now() - interval '4 hours'
"""
    register = f"""
with wanted as (select distinct w.i from unnest($1::text[]) as w(i)),
ins as (
  insert into {s}._private_tasks (identifier)
  select w.i from wanted w
  where not exists (select 1 from {s}._private_tasks t where t.identifier = w.i)
  on conflict do nothing
  returning id, identifier
)
select id, identifier from ins
union all
select id, identifier from {s}._private_tasks where identifier = any($1::text[])
"""
    return ProtocolStatements(
        claim=claim,
        complete=complete,
        fail=fail,
        return_jobs=return_jobs,
        sweep_stale=sweep,
        register_tasks=register,
    )


def _broken(statement: str, old: str, new: str) -> ProtocolStatements:
    good = reference_statements("graphile_worker")
    text = getattr(good, statement)
    assert text.count(old) >= 1, f"anchor {old!r} not in the reference {statement}"
    return good.replace(**{statement: text.replace(old, new)})


FAULTS = {
    "claim_without_one_job_per_queue": (
        "claim",
        "select distinct on (coalesce(c.job_queue_id::bigint, -c.id)) c.id, c.job_queue_id",
        "select c.id, c.job_queue_id",
        "named_queue_serial",
    ),
    "fail_without_queue_unlock": (
        "fail",
        "from failed x where q.id = x.job_queue_id and q.locked_by = $1::text",
        "from failed x where q.id = x.job_queue_id and false",
        "queue_lock_matches_jobs",
    ),
    "return_without_attempts_decrement": (
        "return_jobs",
        "greatest(0, j.attempts - 1)",
        "j.attempts",
        "attempts_transitions",
    ),
    # the claim_while_rows_locked rule holds row locks from a second connection
    "claim_without_skip_locked": (
        "claim",
        " skip locked",
        "",
        "claim_skips_locked_rows",
    ),
}


def test_reference_statements_pass(kongtask_dsn: str) -> None:
    """The faults below are single changes to statements the machine accepts."""
    with open_lifecycle_harness(
        kongtask_dsn, statements=reference_statements("graphile_worker")
    ) as harness:
        run_lifecycle_machine(harness, examples=30, seed=11)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_caught(kongtask_dsn: str, fault: str) -> None:
    statement, old, new, invariant = FAULTS[fault]
    with (
        open_lifecycle_harness(kongtask_dsn, statements=_broken(statement, old, new)) as harness,
        pytest.raises(InvariantViolation) as caught,
    ):
        run_lifecycle_machine(harness, seed=1, settings_=lifecycle_settings(300, shrink=False))
    assert caught.value.invariant == invariant, str(caught.value)


def test_settings_phases() -> None:
    assert Phase.shrink not in lifecycle_settings(5, shrink=False).phases
    assert Phase.explain not in lifecycle_settings(5).phases


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------


def _schemas(dsn: str) -> set[str]:
    # temporary schemas (pg_temp_N) stay once created; they hold nothing between sessions
    rows = run_sync_sql(
        dsn, "select nspname from pg_namespace where nspname not like 'pg\\_%temp\\_%'"
    )
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
    package = Path(lc.__file__).parent
    source = "".join(path.read_text() for path in sorted(package.glob("*.py")))
    names = set(re.findall(r'_(?:fail|check)\(\s*"([a-z_]+)"', source))
    names |= set(re.findall(r'"([a-z_]+)" if shadowed else "([a-z_]+)"', source)[0])
    names |= set(FIELD_INVARIANT.values())
    worker_source = package.with_name("_worker_props.py").read_text()
    names |= set(re.findall(r"InvariantViolation\(\s*\"([a-z_]+)\"", worker_source))
    assert names, "no invariant names found"
    assert names <= set(INVARIANTS), names - set(INVARIANTS)


@pytest.mark.parametrize("outcome", ["fail", "complete"])
def test_zombie_pool_scenario(kongtask_dsn: str, outcome: str) -> None:
    """Rules called directly: pool 0 claims, is force-unlocked, pool 1 claims the same job,
    then the zombie (pool 0's old incarnation) finishes it late."""
    template = lc.JobTemplate(identifier="task_a", queue_name="q1")
    with open_lifecycle_harness(kongtask_dsn) as harness:
        machine = lc.lifecycle_machine(harness)()
        machine.seed_jobs([template, template])
        machine.claim_batch(slot=0)
        assert len(machine.model.pools[0].held) == 1
        zombie_id = machine.model.pools[0].pool_id
        machine.force_unlock_workers(picks=[0])
        assert machine.model.zombies[-1].pool_id == zombie_id
        machine.claim_batch(slot=1)
        (job_id,) = machine.model.pools[1].held
        assert machine.model.zombies[-1].held == [job_id]
        live = machine.model.pools[1].pool_id
        machine.zombie_finishes(which=0, picks=[0], outcome=outcome)
        if outcome == "fail":
            # fail only touches rows still locked by the zombie: pool 1's lock survives
            assert machine.model.jobs[job_id].locked_by == live
        else:
            # complete has no locked_by check: the job goes, pool 1 forgets it, and q1
            # stays locked by pool 1 (a queue row is unlocked only by its holder)
            assert job_id not in machine.model.jobs
            assert machine.model.pools[1].held == []
            assert machine.model.queues["q1"].locked_by == live
        machine.teardown()


def test_fail_without_pool_check_is_caught_by_the_zombie(kongtask_dsn: str) -> None:
    statements = _broken(
        "fail", "where j.id = i.id and j.locked_by = $1::text", "where j.id = i.id"
    )
    template = lc.JobTemplate(identifier="task_a")
    with open_lifecycle_harness(kongtask_dsn, statements=statements) as harness:
        machine = lc.lifecycle_machine(harness)()
        machine.seed_jobs([template])
        machine.claim_batch(slot=0)
        machine.force_unlock_workers(picks=[0])
        machine.claim_batch(slot=1)
        with pytest.raises(InvariantViolation) as caught:
            machine.zombie_finishes(which=0, picks=[0], outcome="fail")
    assert caught.value.invariant == "job_locks", str(caught.value)


def test_runner_scratch_refuses_when_workers_listen(kongtask_dsn: str) -> None:
    """A scratch migration notifies worker:migrate (breaking) to the whole database."""
    from kongtask.testing._portal import Portal

    before = _schemas(kongtask_dsn)
    with Portal(kongtask_dsn), pytest.raises(RuntimeError, match="worker:migrate"):
        run_lifecycle(kongtask_dsn, examples=1, out=lambda _: None)
    assert _schemas(kongtask_dsn) == before


async def _move_behind_the_others(conns: Connections, schema: str, job_id: int) -> None:
    # Two updates of an indexed column (not HOT) give the row a new place at the table's
    # end and new index entries after its equals; its content ends as it was.
    table = f"{quote_ident(schema)}._private_jobs"
    for shift in ("+", "-"):
        await conns.actor.execute(
            f"update {table} set run_at = run_at {shift} interval '1 second', "
            "updated_at = updated_at where id = $1",
            job_id,
        )


def test_a_claim_that_cuts_equal_keys_takes_the_first_created_job(kongtask_dsn: str) -> None:
    """Which of several jobs of equal (priority, run_at) a claim takes is the table's
    physical order: the machine row-locks all but the first-created, so that a replayed
    example takes the same job whatever vacuum did to the table meanwhile."""
    template = lc.JobTemplate(identifier="task_a")  # run_at: the statement's now(), shared
    with open_lifecycle_harness(kongtask_dsn) as harness:
        machine = lc.lifecycle_machine(harness)()
        machine.seed_jobs([template, template, template])
        first, second, _third = machine.model.job_ids()
        harness.portal.run(_move_behind_the_others, harness.schema, first)
        machine.claim(slot=0, tasks=[], limit=1, forbidden=None)
        assert machine.model.pools[0].held == [first]
        machine.claim(slot=1, tasks=[], limit=1, forbidden=None)
        assert machine.model.pools[1].held == [second]
        machine.teardown()


def _job(model: Model, ordinal: int, *, queue: str | None = None, priority: int = 0) -> int:
    """A job in ``model`` whose id runs against its creation order."""
    job = model.new_job(1000 - ordinal, Spec("task_a", queue_name=queue, priority=priority), NOW)
    job.ordinal = ordinal
    model.jobs[job.id] = job
    if queue is not None:
        model.queues.setdefault(queue, MQueue(queue))
    return job.id


def _unlocked_model() -> Model:
    model = Model(NOW, pools=2)
    model.registered = {"task_a": 1}
    return model


def test_tie_breaking_locks_keep_the_first_created_of_a_cut_group() -> None:
    model = _unlocked_model()
    urgent = _job(model, 1, priority=-1)
    a, b, c = (_job(model, n) for n in (2, 3, 4))
    assert model.job_ids() == [urgent, a, b, c]  # creation order, not id order
    assert model.tie_breaking_locks([1], None, NOW, limit=2) == [b, c]
    assert model.tie_breaking_locks([1], None, NOW, limit=4) == []  # no cut: all taken
    assert model.tie_breaking_locks([1], None, NOW, limit=1) == []  # the cut is between keys
    # jobs the caller locks already are neither candidates nor returned again
    assert model.tie_breaking_locks([1], None, NOW, limit=2, row_locked_jobs=[a]) == [c]


def test_tie_breaking_locks_keep_one_first_job_per_named_queue() -> None:
    model = _unlocked_model()
    first = _job(model, 1, queue="q1")
    later = _job(model, 2, queue="q1")  # the lower id: the claim itself would take it
    assert later < first
    assert model.tie_breaking_locks([1], None, NOW, limit=5) == [later]


def test_tie_breaking_locks_go_on_while_locked_jobs_let_equal_ones_in() -> None:
    model = _unlocked_model()
    a, b = _job(model, 1), _job(model, 2)
    q1_first, q1_second = _job(model, 3, queue="q1"), _job(model, 4, queue="q1")
    # first q1's second job (equal to q1's first); then, at the final cut of limit 2, q1's
    # first job, which ties with a and b and was created after them
    assert model.tie_breaking_locks([1], None, NOW, limit=2) == [q1_second, q1_first]
    assert [j.id for j in model.eligible([1], None, NOW, [q1_second, q1_first])] == [a, b]
