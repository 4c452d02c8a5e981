"""kongtask: a PostgreSQL job queue for trio that speaks graphile-worker's schema.

The public API is re-exported here; the implementation lives in private modules.

The trio parts (client, worker, cron, CLI) are imported on first use, so that code that
only adds jobs on its own connection (:func:`add_job_sync`, :mod:`kongtask.aio`) loads
neither trio nor trio-asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._config import DEFAULT_SCHEMA as DEFAULT_SCHEMA
from ._errors import (
    ConfigError as ConfigError,
    KongtaskError as KongtaskError,
    MigrationError as MigrationError,
    NoPostgresError as NoPostgresError,
    SchemaTooNewError as SchemaTooNewError,
)
from ._events import Event as Event
from ._inspect import JobInfo as JobInfo, PoolInfo as PoolInfo, QueueCounts as QueueCounts
from ._inspect_sql import JOB_STATES as JOB_STATES
from ._job import Job as Job, JobSpec as JobSpec
from ._producers import add_job_sync as add_job_sync, add_jobs_sync as add_jobs_sync
from ._tasks import TaskDef as TaskDef
from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._cli import main as main
    from ._cli_dashboard import open_dashboard as open_dashboard
    from ._client import (
        Client as Client,
        add_job as add_job,
        migrate as migrate,
        open_client as open_client,
    )
    from ._cron import (
        CronItem as CronItem,
        CrontabError as CrontabError,
        crontab as crontab,
        load_crontab_file as load_crontab_file,
    )
    from ._dashboard import DashboardApp as DashboardApp, DashboardAuth as DashboardAuth
    from ._worker import (
        JobCancelled as JobCancelled,
        JobCancelScope as JobCancelScope,
        JobContext as JobContext,
        TaskSpec as TaskSpec,
        Worker as Worker,
        WorkerStatistics as WorkerStatistics,
        open_worker as open_worker,
        task as task,
    )

# name -> private module, for the names that need trio (imported on first access)
_LAZY = {
    "main": "._cli",
    "Client": "._client",
    "add_job": "._client",
    "migrate": "._client",
    "open_client": "._client",
    "CronItem": "._cron",
    "CrontabError": "._cron",
    "crontab": "._cron",
    "load_crontab_file": "._cron",
    "DashboardApp": "._dashboard",
    "DashboardAuth": "._dashboard",
    "open_dashboard": "._cli_dashboard",
    "JobCancelled": "._worker",
    "JobCancelScope": "._worker",
    "JobContext": "._worker",
    "TaskSpec": "._worker",
    "Worker": "._worker",
    "WorkerStatistics": "._worker",
    "open_worker": "._worker",
    "task": "._worker",
}

__all__ = [
    "DEFAULT_SCHEMA",
    "JOB_STATES",
    "Client",
    "ConfigError",
    "CronItem",
    "CrontabError",
    "DashboardApp",
    "DashboardAuth",
    "Event",
    "Job",
    "JobCancelScope",
    "JobCancelled",
    "JobContext",
    "JobInfo",
    "JobSpec",
    "KongtaskError",
    "MigrationError",
    "NoPostgresError",
    "PoolInfo",
    "QueueCounts",
    "SchemaTooNewError",
    "TaskDef",
    "TaskSpec",
    "Worker",
    "WorkerStatistics",
    "__version__",
    "add_job",
    "add_job_sync",
    "add_jobs_sync",
    "crontab",
    "load_crontab_file",
    "main",
    "migrate",
    "open_client",
    "open_dashboard",
    "open_worker",
    "task",
]


def _public(obj: Any) -> Any:
    if getattr(obj, "__module__", "").startswith("kongtask._"):
        obj.__module__ = "kongtask"
    return obj


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kongtask' has no attribute {name!r}")
    value = _public(getattr(importlib.import_module(module, __name__), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


for _name in __all__:
    if _name not in _LAZY:
        _public(globals()[_name])
del _name
