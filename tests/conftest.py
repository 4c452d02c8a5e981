"""Shared fixtures. Test rules for this suite:

- Every test talks to a real PostgreSQL (the ``kongtask`` pytest plugin provides it).
- No sleeps to wait for a result: wait on an event or poll with an absolute ``fail_after``.
- Time logic that does not wait on the database uses ``autojump_clock``.
- A fixture used by more than one module is defined once, here, and never imported from
  a helper module; a test module defines only fixtures of its own (such as each producer
  module's ``driver``, which the shared producer scenarios run against).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator

import pytest
from hypothesis import settings
from oracle import UNAVAILABLE, oracle_migrate, require_oracle
from schema_dump import OracleDatabases, ScratchDatabases

from kongtask._pg import Database, open_database
from kongtask.testing import PostgresServer

# Hypothesis tiers. "fixed" (the default): derandomized, so every run of the suite replays
# the same examples and a failure reproduces as it is. "ci" (--hypothesis-profile=ci with
# --hypothesis-seed=N, as .ci/run does): a fresh seed each CI run, printed so a failure can
# be replayed, at a bounded example count. Health checks stay on in both; a test that
# must suppress one says why next to it.
settings.register_profile("fixed", derandomize=True, database=None, deadline=None)
settings.register_profile(
    "ci", derandomize=False, database=None, deadline=None, max_examples=60, print_blob=True
)
settings.load_profile("fixed")

# A shell starts background commands (`pytest ... &`) with SIGINT ignored, and child
# processes inherit an ignored signal, so the tests that send SIGINT to a child would see
# it ignored. Python's own SIGINT handler here resets to the default in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
async def db(kongtask_dsn: str) -> AsyncIterator[Database]:
    """An open :class:`Database` on a fresh migrated database."""
    async with open_database(kongtask_dsn) as database:
        yield database


@pytest.fixture
def worker_dsn(kongtask_dsn: str) -> str:
    """A fresh database migrated by kongtask (the graphile-worker 0.18 schema)."""
    return kongtask_dsn


@pytest.fixture
async def tdb(worker_dsn: str) -> AsyncIterator[Database]:
    """The test's own :class:`Database` on ``worker_dsn``. Its connections carry another
    application_name than kongtask's, so that "no kongtask connection left" can be checked
    through them."""
    async with open_database(
        worker_dsn, server_settings={"application_name": "kongtask-test"}
    ) as database:
        yield database


@pytest.fixture
def second_dsn(kongtask_database_factory: Callable[..., str]) -> str:
    """Another fresh database migrated by kongtask (made outside the test's trio run)."""
    return kongtask_database_factory()


@pytest.fixture
async def appdb(kongtask_dsn: str) -> AsyncIterator[Database]:
    """The test's own view of the database, with an application table ``orders`` (the
    producer tests' business writes)."""
    async with open_database(kongtask_dsn) as database:
        await database.execute("create table orders (id int primary key)")
        yield database


@pytest.fixture(scope="session")
def gw_template(kongtask_server: PostgresServer) -> Iterator[str]:
    """A database graphile-worker 0.18.0 (npm) migrated, used only as a template: cloning it
    is much faster than running npm's CLI per test."""
    require_oracle("0.18.0")
    name = f"gw_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    dsn = kongtask_server.create_database(name)
    try:
        oracle_migrate(dsn, version="0.18.0")
        yield name
    finally:
        kongtask_server.drop_database(name)


@pytest.fixture
def gw_database_factory(
    kongtask_server: PostgresServer, gw_template: str
) -> Iterator[Callable[[], str]]:
    """Call it for a fresh database migrated by graphile-worker 0.18.0 (a clone of
    ``gw_template``); each is dropped after the test."""
    names: list[str] = []

    def make() -> str:
        name = f"gw_t_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        dsn = kongtask_server.create_database(name, gw_template)
        names.append(name)
        return dsn

    yield make
    for name in names:
        kongtask_server.drop_database(name)


@pytest.fixture
def gw_dsn(gw_database_factory: Callable[[], str]) -> str:
    """A fresh database migrated by the real graphile-worker 0.18.0 (npm)."""
    return gw_database_factory()


@pytest.fixture(params=["graphile-worker", "kongtask"])
def any_dsn(request: pytest.FixtureRequest) -> str:
    """Run the test on a graphile-worker-migrated and on a kongtask-migrated database."""
    name = "gw_dsn" if request.param == "graphile-worker" else "kongtask_dsn"
    dsn: str = request.getfixturevalue(name)
    return dsn


@pytest.fixture
async def gw_db(gw_dsn: str) -> AsyncIterator[Database]:
    """An open :class:`Database` on a database migrated by graphile-worker 0.18.0."""
    async with open_database(gw_dsn) as database:
        yield database


@pytest.fixture
def scratch(kongtask_server: PostgresServer) -> Iterator[ScratchDatabases]:
    """Databases for one test, dropped afterwards."""
    dbs = ScratchDatabases(kongtask_server)
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def oracle_dbs(kongtask_server: PostgresServer) -> Iterator[OracleDatabases]:
    """graphile-worker 0.18.0 databases shared by the session (read or clone them only)."""
    dbs = ScratchDatabases(kongtask_server)
    yield OracleDatabases(dbs)
    dbs.drop_all()


def _skip_reasons(exc: BaseException) -> list[str]:
    """The messages of the skips in ``exc``, looking inside exception groups and behind
    pytest-trio's bare re-raised skip (its context is the group with the real one)."""
    if isinstance(exc, BaseExceptionGroup):
        return [m for inner in exc.exceptions for m in _skip_reasons(inner)]
    if isinstance(exc, pytest.skip.Exception):
        if exc.msg:
            return [exc.msg]
        return _skip_reasons(exc.__context__) if exc.__context__ is not None else []
    return []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the reason of a skip raised inside a trio run (pytest-trio re-raises a bare
    skip, and pytest would then report only "Skipped")."""
    report = yield
    if report.skipped and call.excinfo is not None:
        reasons = _skip_reasons(call.excinfo.value)
        if reasons and reasons[0] and isinstance(report.longrepr, tuple):
            path, line, _ = report.longrepr
            report.longrepr = (path, line, f"Skipped: {reasons[0]}")
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line saying how many compatibility tests did not run (their tool is missing)."""
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if UNAVAILABLE in str(getattr(report, "longrepr", ""))
    ]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} compatibility tests did not run ({UNAVAILABLE}; "
            "under CI=true they fail instead)",
            yellow=True,
        )
