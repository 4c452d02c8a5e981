"""kongtask: a PostgreSQL job queue for trio that speaks graphile-worker's schema.

The public API is re-exported here; the implementation lives in private modules.
"""

from ._cli import main as main
from ._client import Client as Client, add_job as add_job, open_client as open_client
from ._config import DEFAULT_SCHEMA as DEFAULT_SCHEMA
from ._cron import (
    CronItem as CronItem,
    CrontabError as CrontabError,
    crontab as crontab,
    load_crontab_file as load_crontab_file,
)
from ._errors import (
    ConfigError as ConfigError,
    KongtaskError as KongtaskError,
    MigrationError as MigrationError,
    NoPostgresError as NoPostgresError,
    SchemaTooNewError as SchemaTooNewError,
)
from ._events import Event as Event
from ._job import Job as Job, JobSpec as JobSpec
from ._version import __version__ as __version__
from ._worker import (
    JobCancelScope as JobCancelScope,
    JobContext as JobContext,
    TaskSpec as TaskSpec,
    Worker as Worker,
    WorkerStatistics as WorkerStatistics,
    open_worker as open_worker,
    task as task,
)

__all__ = [
    "DEFAULT_SCHEMA",
    "Client",
    "ConfigError",
    "CronItem",
    "CrontabError",
    "Event",
    "Job",
    "JobCancelScope",
    "JobContext",
    "JobSpec",
    "KongtaskError",
    "MigrationError",
    "NoPostgresError",
    "SchemaTooNewError",
    "TaskSpec",
    "Worker",
    "WorkerStatistics",
    "__version__",
    "add_job",
    "crontab",
    "load_crontab_file",
    "main",
    "open_client",
    "open_worker",
    "task",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("kongtask._"):
        _obj.__module__ = "kongtask"
del _name, _obj
