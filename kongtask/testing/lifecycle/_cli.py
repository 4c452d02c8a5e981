"""``python -m kongtask.testing.lifecycle``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..._config import resolve_dsn
from ._invariants import INVARIANTS, SchemaFlavour
from ._runner import run_lifecycle


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kongtask.testing.lifecycle``: exit 0 when every invariant held, 1 if not."""
    parser = argparse.ArgumentParser(
        prog="python -m kongtask.testing.lifecycle",
        description="Check the job lifecycle of a graphile-worker-compatible schema "
        "with a hypothesis state machine.",
    )
    parser.add_argument(
        "--dsn", default=None, help="connection string (default: DATABASE_URL / PG* variables)"
    )
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30, help="maximum steps per example")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--existing", action="store_true", help="test an already-migrated schema")
    parser.add_argument(
        "--flavour",
        choices=[f.value for f in SchemaFlavour],
        default=None,
        help="who migrated the schema (default: kongtask for a scratch schema, "
        "detected with --existing)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=sorted(INVARIANTS),
        metavar="INVARIANT",
        help="an invariant not to enforce (repeatable)",
    )
    args = parser.parse_args(argv)
    dsn = resolve_dsn(args.dsn) or os.environ.get("KONGTASK_TEST_DSN") or ""
    report = run_lifecycle(
        dsn,
        examples=args.examples,
        steps=args.steps,
        seed=args.seed,
        schema=args.schema,
        existing=args.existing,
        flavour=None if args.flavour is None else SchemaFlavour(args.flavour),
        skip=set(args.skip),
    )
    return 1 if report.failure is not None else 0
