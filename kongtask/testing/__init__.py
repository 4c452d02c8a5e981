"""Testing helpers: a real PostgreSQL for tests (and the pytest plugin's fixtures), a TCP
proxy that breaks connections on demand (:class:`TcpProxy`), and the worker's timing
policy (:class:`WorkerTiming`), which tests shorten: ``open_worker(..., timing=...)``.

The hypothesis lifecycle harness lives in :mod:`kongtask.testing.lifecycle`.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._postgres import (
    NO_SERVER_MESSAGE as NO_SERVER_MESSAGE,
    PostgresServer as PostgresServer,
    docker_engine_available as docker_engine_available,
    find_pg_bindir as find_pg_bindir,
    provide_postgres as provide_postgres,
    run_sync_sql as run_sync_sql,
)
from ._proxy import TcpProxy as TcpProxy

if TYPE_CHECKING:
    from .._worker._timing import WorkerTiming as WorkerTiming

__all__ = [
    "NO_SERVER_MESSAGE",
    "PostgresServer",
    "TcpProxy",
    "WorkerTiming",
    "docker_engine_available",
    "find_pg_bindir",
    "provide_postgres",
    "run_sync_sql",
]


def __getattr__(name: str) -> Any:
    # The worker's package loads on first use, as in ``kongtask``: the pytest plugin
    # imports this package in every test session, most of which never start a pool.
    if name != "WorkerTiming":
        raise AttributeError(f"module 'kongtask.testing' has no attribute {name!r}")
    value = importlib.import_module("kongtask._worker._timing").WorkerTiming
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
