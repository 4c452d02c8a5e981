"""Soak the lifecycle state machine: many random examples, bounded in time.

    python stress/lifecycle_soak.py [--dsn DSN] [--examples 10000] [--minutes 10]
                                    [--seed S] [--existing --schema S] [--skip NAME ...]

Runs batches of random profiles (a fresh seed and a step count per batch) until
``--examples`` examples have run or ``--minutes`` have passed. Prints the master seed, the
seed of every batch, the running count and, on a violation, the shrunk counterexample
(hypothesis prints the steps) with the violated invariant; exits 1 then.

Without ``--dsn`` it starts a throwaway PostgreSQL (kongtask.testing.provide_postgres).
Without ``--existing`` it tests a scratch schema migrated by kongtask and drops it.
Re-run one batch exactly with ``python -m kongtask.testing.lifecycle --seed <batch seed>
--steps <steps> --examples <n>``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from contextlib import ExitStack

from kongtask._migrate import migrate_sync
from kongtask.testing import provide_postgres, run_sync_sql
from kongtask.testing.lifecycle import (
    INVARIANTS,
    SchemaFlavour,
    describe_failure,
    detect_flavour,
    lifecycle_settings,
    open_lifecycle_harness,
    run_lifecycle_machine,
)
from kongtask.testing.lifecycle._runner import refuse_if_workers_listen

STEP_PROFILES = (10, 20, 30, 50)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=250, help="examples per seed")
    parser.add_argument("--seed", type=int, default=None, help="master seed")
    parser.add_argument("--schema", default=None)
    parser.add_argument("--existing", action="store_true")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(INVARIANTS))
    args = parser.parse_args(argv)

    master = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(master)
    print(f"soak: master seed {master}, target {args.examples} examples, {args.minutes} min")
    deadline = time.monotonic() + args.minutes * 60
    total = 0
    started = time.perf_counter()
    with ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(provide_postgres()).dsn
        if args.existing:
            schema = args.schema or "graphile_worker"
            flavour = detect_flavour(dsn, schema)
        else:
            schema = args.schema or f"kongtask_soak_{master:08x}"
            refuse_if_workers_listen(dsn)  # the migration notifies worker:migrate
            migrate_sync(dsn, schema)
            stack.callback(run_sync_sql, dsn, f'drop schema if exists "{schema}" cascade')
            flavour = SchemaFlavour.KONGTASK
        print(f"soak: schema {schema!r}, flavour {flavour.value}, skipped {args.skip or 'none'}")
        for line in flavour.rules():
            print(f"  rule: {line}")
        harness = stack.enter_context(
            open_lifecycle_harness(dsn, schema, flavour=flavour, skip=set(args.skip))
        )
        while total < args.examples and time.monotonic() < deadline:
            seed = rng.randrange(2**32)
            steps = rng.choice(STEP_PROFILES)
            before = harness.examples
            try:
                run_lifecycle_machine(
                    harness, seed=seed, settings_=lifecycle_settings(args.batch, steps=steps)
                )
            except Exception as exc:
                total += harness.examples - before
                print(
                    f"soak: VIOLATION in batch seed {seed} (steps {steps}) after {total} examples"
                )
                for line in describe_failure(exc):
                    print(line)
                return 1
            total += harness.examples - before
            elapsed = time.perf_counter() - started
            print(
                f"soak: batch seed {seed} steps {steps}: ok; {total} examples in {elapsed:.0f} s "
                f"({total / elapsed:.1f}/s)",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    print(f"soak: done: {total} examples in {elapsed:.0f} s, no violation (master seed {master})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
