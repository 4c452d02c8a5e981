"""Shared fixtures. Test rules for this suite:

- Every test talks to a real PostgreSQL (the ``kongtask`` pytest plugin provides it).
- No sleeps to wait for a result: wait on an event or poll with an absolute ``fail_after``.
- Time logic that does not wait on the database uses ``autojump_clock``.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Generator

import pytest
from hypothesis import settings

from kongtask._pg import Database, open_database

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
def gw_dsn(kongtask_database_factory: object) -> str:
    """A fresh database migrated by the real graphile-worker 0.18.0 (npm)."""
    from oracle import oracle_migrate, require_oracle

    require_oracle("0.18.0")
    dsn: str = kongtask_database_factory(migrated=False)  # type: ignore[operator]
    oracle_migrate(dsn, version="0.18.0")
    return dsn


@pytest.fixture
async def gw_db(gw_dsn: str) -> AsyncIterator[Database]:
    """An open :class:`Database` on a database migrated by graphile-worker 0.18.0."""
    async with open_database(gw_dsn) as database:
        yield database


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
    from oracle import UNAVAILABLE

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
