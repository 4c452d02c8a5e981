"""The connections, statements and schema facts the machine's examples share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .._portal import Portal
from ._invariants import INVARIANTS, SchemaFlavour
from ._snapshot import DbState, parse_snapshot
from ._statements import MachineStatements, ProtocolStatements
from ._steps import fetchval, reset_rows
from ._strategies import TASKS


class LifecycleHarness:
    """The connections, statements and schema facts the machine's examples share.

    Made by :func:`open_lifecycle_harness`; pass it to :func:`lifecycle_machine` or
    :func:`run_lifecycle_machine`.

    Attributes:
      schema: the schema under test.
      flavour: who migrated it (decides the rules checked, see :meth:`SchemaFlavour.rules`).
      statements: the worker-protocol statements in use.
      pools: how many worker pools the machine plays.
      skip: invariants that are not enforced (known deviations, named in INVARIANTS).
      examples: how many examples (machines) have started so far.
    """

    def __init__(
        self,
        portal: Portal,
        schema: str,
        flavour: SchemaFlavour,
        statements: ProtocolStatements,
        *,
        pools: int = 3,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        unknown = set(skip) - set(INVARIANTS)
        if unknown:
            raise ValueError(f"unknown invariants {sorted(unknown)}; see INVARIANTS")
        self.skip = frozenset(skip)
        self.portal = portal
        self.schema = schema
        self.flavour = flavour
        self.statements = statements
        self.pools = pools
        self.sql = MachineStatements(schema)
        self.examples = 0

    def job_count(self) -> int:
        """How many rows ``_private_jobs`` holds now."""
        return int(self.portal.run(fetchval, self.sql.count_rows))

    def reset(self) -> tuple[list[dict[str, Any]], DbState]:
        """Delete the schema's jobs, queues and tasks; register the first two tasks."""
        self.examples += 1
        rows, snapshot = self.portal.run(
            reset_rows,
            self.sql,
            self.statements.register_tasks,
            list(TASKS[:-1]),
            self.examples == 1,
        )
        return rows, parse_snapshot(snapshot)


@contextmanager
def open_lifecycle_harness(
    dsn: str,
    schema: str = "graphile_worker",
    *,
    flavour: SchemaFlavour = SchemaFlavour.KONGTASK,
    statements: ProtocolStatements | None = None,
    pools: int = 3,
    skip: frozenset[str] | set[str] = frozenset(),
) -> Iterator[LifecycleHarness]:
    """Open the background loop and connections for a migrated ``schema`` at ``dsn``.

    Every example deletes the rows of ``schema``'s jobs, queues and tasks tables: use a
    database or schema that holds nothing else of value.

    Args:
      dsn: a libpq connection string or URL.
      schema: the (already migrated) schema to test.
      flavour: who migrated it; see :class:`SchemaFlavour`.
      statements: the worker statements; default: kongtask's own for ``schema``.
      pools: how many worker pools the machine plays (2 or more to test sharing).
      skip: names from :data:`INVARIANTS` not to enforce (known deviations).
    """
    if statements is None:
        statements = ProtocolStatements.kongtask(schema)
    with Portal(dsn) as portal:
        yield LifecycleHarness(
            portal, schema, flavour, statements, pools=pools, skip=frozenset(skip)
        )
