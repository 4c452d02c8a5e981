"""The one convention for the SQL kongtask sends to a graphile-worker schema.

Each area (the worker, the client, cron, crash recovery, inspection, migration, the
producers) keeps its statements in one frozen dataclass derived from :class:`SchemaSql`,
built as ``AreaQueries(schema)`` once by whatever owns it (a pool, a client, a scheduler):

- one attribute per statement, named for what it does, documented with its parameters;
- :meth:`SchemaSql._render` receives the schema already quoted by
  :func:`~kongtask._config.quote_ident` and returns every statement by attribute name;
  the quoted schema name is the only text ever spliced in, every value is a bound
  parameter;
- a statement whose text depends on more than the schema (the job listing's filters) is a
  method of the same class, assembled from constant clauses of its module only;
- statements that do not name the schema (advisory locks, settings) are module constants.

docs/design/sql-convention.md says the same for people writing a new statement.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ._config import quote_ident


@dataclass(frozen=True, slots=True)
class SchemaSql:
    """The statements of one area for one schema: the base of every ``*Queries`` class.

    A subclass declares each statement as ``name: str = field(init=False)`` and returns
    them all from :meth:`_render`; construction fails if the two lists differ, so a
    statement can be neither forgotten nor misspelt.
    """

    #: The schema name as given (unquoted).
    schema: str

    def __post_init__(self) -> None:
        statements = self._render(quote_ident(self.schema))
        declared = {f.name for f in fields(self) if not f.init}
        if statements.keys() != declared:
            raise TypeError(
                f"{type(self).__name__}._render returns {sorted(statements.keys() - declared)} "
                f"undeclared and misses {sorted(declared - statements.keys())}"
            )
        for name, sql in statements.items():
            object.__setattr__(self, name, sql)

    def _render(self, s: str) -> dict[str, str]:
        """Every statement of the area for the quoted schema name ``s``."""
        raise NotImplementedError
