"""pytest plugin (registered as ``kongtask`` under ``pytest11``): real Postgres fixtures.

Fixtures:
  ``kongtask_server``: the session's :class:`~kongtask.testing.PostgresServer`.
  ``kongtask_dsn``: a fresh database, cloned from a template migrated to kongtask's schema.
  ``kongtask_blank_dsn``: a fresh empty database (no schema).
  ``kongtask_database_factory``: call ``make(migrated=True)`` for more databases in one test.

Everything is created lazily: a project that installs kongtask but never asks for
these fixtures starts no server.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from ._postgres import PostgresServer, provide_postgres

_counter = itertools.count()


@pytest.fixture(scope="session")
def kongtask_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server: ``$KONGTASK_TEST_DSN``, else a throwaway cluster
    of local binaries, else a Docker container (see :func:`kongtask.testing.provide_postgres`)."""
    with provide_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def kongtask_template(kongtask_server: PostgresServer) -> Iterator[str]:
    """Name of a database migrated to kongtask's schema, used as a template."""
    # Not at the top: pytest loads this plugin in every session of an environment that has
    # kongtask, and the migrator brings in trio_asyncio, which replaces asyncio's default
    # event loop; only sessions that ask for a database should get it.
    from .._migrate import migrate_sync

    name = f"kongtask_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    dsn = kongtask_server.create_database(name)
    try:
        migrate_sync(dsn)
        yield name
    finally:
        kongtask_server.drop_database(name)


DatabaseFactory = Callable[..., str]


@pytest.fixture
def kongtask_database_factory(
    kongtask_server: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[DatabaseFactory]:
    """``make(migrated=True)`` returns the DSN of a new database on the session's server
    (migrated to kongtask's schema, or empty); every one is dropped after the test."""
    made: list[str] = []

    def make(*, migrated: bool = True) -> str:
        template = request.getfixturevalue("kongtask_template") if migrated else "template0"
        name = f"kongtask_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
        dsn = kongtask_server.create_database(name, template)
        made.append(name)
        return dsn

    yield make
    for name in made:
        kongtask_server.drop_database(name)


@pytest.fixture
def kongtask_dsn(kongtask_database_factory: DatabaseFactory) -> str:
    """A fresh database with kongtask's (graphile-worker's) schema in ``graphile_worker``."""
    return kongtask_database_factory(migrated=True)


@pytest.fixture
def kongtask_blank_dsn(kongtask_database_factory: DatabaseFactory) -> str:
    """A fresh database with nothing in it."""
    return kongtask_database_factory(migrated=False)
