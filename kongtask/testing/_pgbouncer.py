"""A real pgBouncer in transaction-pooling mode in front of a test PostgreSQL server.

``provide_pgbouncer(server_dsn)`` starts the ``pgbouncer`` binary (Debian's package puts
it in ``/usr/sbin``) as a child process on a private port, forwarding every database
name to the server of ``server_dsn``, and stops it on exit. pgBouncer refuses to run as
root, so under root it runs as the same unprivileged user as the throwaway cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from .._errors import NoPostgresError
from ._postgres import _free_port, _unprivileged_user

#: Where to look for the binary besides ``PATH`` (Debian installs it outside a user's PATH).
PGBOUNCER_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` executable, or ``None``."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in PGBOUNCER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class PgBouncer:
    """A running pgBouncer: ``dsn_for(url)`` is the same database reached through it."""

    host: str
    port: int
    pool_mode: str
    default_pool_size: int
    #: the pgbouncer process (for its CPU time in benchmarks)
    pid: int = 0

    def dsn_for(self, server_dsn: str) -> str:
        parts = urlsplit(server_dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def _ini_quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@contextlib.contextmanager
def provide_pgbouncer(
    server_dsn: str, *, pool_mode: str = "transaction", default_pool_size: int = 20
) -> Iterator[PgBouncer]:
    """Run pgBouncer in front of the server of ``server_dsn`` (a URL) until the block ends.

    Raises:
      NoPostgresError: no ``pgbouncer`` binary, or it did not start (its log is quoted).
    """
    binary = find_pgbouncer()
    if binary is None:
        raise NoPostgresError("no pgbouncer binary (Debian: apt-get install pgbouncer)")
    server = urlsplit(server_dsn)
    if server.hostname is None or server.port is None:
        raise NoPostgresError(f"pgbouncer needs a server URL with host and port: {server_dsn}")
    user = unquote(server.username or "postgres")
    password = unquote(server.password or "")
    run_as = _unprivileged_user()
    port = _free_port()
    root = Path(tempfile.mkdtemp(prefix="kongtask-pgbouncer-"))
    logfile = root / "pgbouncer.log"
    (root / "users.txt").write_text(f"{_ini_quote(user)} {_ini_quote(password)}\n")
    (root / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={server.hostname} port={server.port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                f"auth_type = {'plain' if password else 'trust'}",
                f"auth_file = {root / 'users.txt'}",
                f"pool_mode = {pool_mode}",
                f"default_pool_size = {default_pool_size}",
                "max_client_conn = 2000",
                "max_db_connections = 0",
                "server_reset_query =",
                "ignore_startup_parameters = extra_float_digits,options",
                f"logfile = {logfile}",
                "",
            ]
        )
    )
    kwargs: dict[str, object] = {}
    if run_as is not None:
        os.chmod(root, 0o755)
        for path in (root, *root.iterdir()):
            os.chown(path, run_as.pw_uid, run_as.pw_gid)
        kwargs = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
    proc = subprocess.Popen(
        [binary, str(root / "pgbouncer.ini")],
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        **kwargs,  # type: ignore[call-overload]
    )
    try:
        _wait_for_port(proc, port, logfile)
        yield PgBouncer("127.0.0.1", port, pool_mode, default_pool_size, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "safe shutdown": waits for running queries
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, logfile: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise NoPostgresError(f"pgbouncer exited with status {proc.returncode}:\n{log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            proc.kill()
            raise NoPostgresError("pgbouncer did not listen within 30 s")
        time.sleep(0.05)
