"""Testing helpers: a real PostgreSQL for tests (and the pytest plugin's fixtures), a TCP
proxy that breaks connections on demand (:class:`TcpProxy`), and the worker's timing
policy (:class:`WorkerTiming`), which tests shorten: ``open_worker(..., timing=...)``.

The hypothesis lifecycle harness lives in :mod:`kongtask.testing.lifecycle`.
"""

from .._worker._timing import WorkerTiming as WorkerTiming
from ._postgres import (
    NO_SERVER_MESSAGE as NO_SERVER_MESSAGE,
    PostgresServer as PostgresServer,
    docker_engine_available as docker_engine_available,
    find_pg_bindir as find_pg_bindir,
    provide_postgres as provide_postgres,
    run_sync_sql as run_sync_sql,
)
from ._proxy import TcpProxy as TcpProxy

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
