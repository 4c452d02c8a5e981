"""A real PostgreSQL server for tests, found or started with zero configuration.

Order: ``KONGTASK_TEST_DSN``; a throwaway cluster from local binaries; a testcontainers
container when a Docker engine answers; else :class:`~kongtask.NoPostgresError`.
Only the standard library and kongtask's runtime dependencies are imported here, so
``kongtask demo`` can use it too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from .._config import quote_ident
from .._errors import NoPostgresError

log = logging.getLogger("kongtask.testing")

ENV_DSN = "KONGTASK_TEST_DSN"
# Where Debian-style packages put each major version's binaries; newest wins.
PG_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"

NO_SERVER_MESSAGE = (
    "kongtask found no PostgreSQL server for the tests. Give it one of: "
    f"(1) {ENV_DSN}=postgresql://user:pass@host:port/db pointing at a server you run; "
    "(2) local PostgreSQL binaries (initdb, pg_ctl) on PATH, via pg_config, or under "
    "/usr/lib/postgresql/*/bin (e.g. `apt-get install postgresql`); "
    "(3) a running Docker engine, used through testcontainers."
)


@dataclass(frozen=True)
class PostgresServer:
    """A server the tests may use: ``dsn`` connects as a superuser to a maintenance database."""

    dsn: str
    source: str  # "env", "local", or "docker"

    def dsn_for(self, database: str) -> str:
        """The same server, another database."""
        return dsn_with_database(self.dsn, database)

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (a copy of ``template``, else empty); its DSN."""
        sql = f"create database {quote_ident(name)}"
        if template is not None:
            sql += f" template {quote_ident(template)}"
        run_sync_sql(self.dsn, sql)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions."""
        run_sync_sql(self.dsn, f"drop database if exists {quote_ident(name)} with (force)")


def dsn_with_database(dsn: str, database: str) -> str:
    if "://" not in dsn:
        return f"{dsn} dbname='{database}'"
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def find_pg_bindir() -> Path | None:
    """The newest directory holding both ``initdb`` and ``pg_ctl``, or ``None``."""
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(os.path.realpath(initdb)).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            candidates.append(Path(out))

    def version_key(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    found = sorted(glob.glob(PG_BINDIR_GLOB), key=version_key, reverse=True)
    candidates.extend(Path(bindir) for bindir in found)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Who runs initdb/pg_ctl: ``None`` when we are not root, else ``postgres`` or ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise NoPostgresError(
        "running as root, but there is no 'postgres' or 'nobody' user to run initdb as"
    )


class LocalCluster:
    """A throwaway cluster in a temporary directory: private port, fsync off by default."""

    #: Server settings; ``settings=`` overrides any of them (the benchmark turns fsync on).
    DEFAULT_SETTINGS: Mapping[str, str] = {
        "listen_addresses": "127.0.0.1",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "300",
        "shared_buffers": "128MB",
    }

    def __init__(self, bindir: Path, *, settings: Mapping[str, str] | None = None) -> None:
        self.bindir = bindir
        self.settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self.user = _unprivileged_user()
        self.root = Path(tempfile.mkdtemp(prefix="kongtask-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.logfile = self.root / "postgres.log"
        self.port = _free_port()
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        if self.user is not None:
            env["HOME"] = str(self.root)
        result: subprocess.CompletedProcess[str] = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.root,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
        return result

    def start(self) -> str:
        self.sockets.mkdir()
        if self.user is not None:
            os.chmod(self.root, 0o755)
            for path in (self.root, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        init = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        if init.returncode != 0:
            raise NoPostgresError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.sockets}",
                *(f"-c {name}={value}" for name, value in self.settings.items()),
            ]
        )
        start = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        if start.returncode != 0:
            tail = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise NoPostgresError(f"pg_ctl start failed: {start.stderr.strip()}\n{tail}")
        self.started = True
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


def docker_engine_available() -> tuple[bool, str]:
    """Probe for a Docker engine (instant when none runs). Returns (available, why-not)."""
    try:
        import docker  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False, "the docker package is not installed (pip install 'kongtask[testing]')"
    client = None
    # docker-py leaves a socket unclosed when the engine is missing; collect it here, with
    # its ResourceWarning silenced, instead of warning at some random later moment.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env()
            client.ping()
        except Exception as exc:  # DockerException, or a connection error from ping
            return False, f"no Docker engine answered ({type(exc).__name__}: {exc})"
        finally:
            if client is not None:
                client.close()
            gc.collect()
    return True, ""


@contextlib.contextmanager
def provide_postgres(*, allow_docker: bool = True) -> Iterator[PostgresServer]:
    """Find or start a PostgreSQL server; stop and delete what was started on exit.

    Raises:
      NoPostgresError: none of the three ways gave a server; the message names them.
    """
    env_dsn = os.environ.get(ENV_DSN)
    if env_dsn:
        yield PostgresServer(env_dsn, "env")
        return

    bindir = find_pg_bindir()
    if bindir is not None:
        cluster = LocalCluster(bindir)
        atexit.register(cluster.stop)
        previous = _stop_on_sigterm(cluster)
        try:
            dsn = cluster.start()
            yield PostgresServer(dsn, "local")
        finally:
            cluster.stop()
            atexit.unregister(cluster.stop)
            _restore_sigterm(previous)
        return

    if allow_docker:
        available, why_not = docker_engine_available()
        if available:
            from testcontainers.postgres import PostgresContainer

            with PostgresContainer("postgres:16-alpine", driver=None) as container:
                yield PostgresServer(container.get_connection_url(), "docker")
            return
        log.debug("testcontainers not used: %s", why_not)

    raise NoPostgresError(NO_SERVER_MESSAGE)


def _stop_on_sigterm(cluster: LocalCluster) -> object:
    """On SIGTERM, stop the cluster before dying (atexit does not run on signals)."""
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: object) -> None:
            cluster.stop()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, handler)
        return previous
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(previous: object) -> None:
    if previous is not None:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


def wait_for_server(dsn: str, timeout: float = 30.0) -> None:
    """Block until ``dsn`` accepts connections (for servers started elsewhere)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run_sync_sql(dsn, "select 1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_sync_sql(dsn: str, *statements: str) -> list[object]:
    """Run statements one by one on a fresh connection, from synchronous code.

    Uses a private selector loop, because importing trio_asyncio replaces asyncio's
    default loop (docs/design/stack.md#trio-asyncio-replaces-the-default-loop).
    """
    # The pytest plugin imports this module in every session; the driver loads only when
    # a test runs SQL.
    import asyncpg

    async def go() -> list[object]:
        conn = await asyncpg.connect(dsn)
        try:
            return [
                await conn.fetch(s)
                if s.lstrip().lower().startswith("select")
                else await conn.execute(s)
                for s in statements
            ]
        finally:
            await conn.close()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(go())
