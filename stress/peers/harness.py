"""Side-by-side benchmark harness: the scenarios, run the same way for every system.

Each system runs in its own process (a "runner"), so its RSS and CPU are its own. A
runner reports JSON lines on the file descriptor named by ``$BENCH_FD``:
``{"event": "ready"}`` once its worker runs, then ``{"event": "result", ...}``.
Jobs are added by a separate process (``py_side.py``: in this interpreter for workers on
graphile-worker's schema, in the peers' virtualenv for the others), which puts its
wall-clock add time in the payload (``{"t": epoch}``); handlers record their
own start time, so add-to-start latency is measured the same way for everybody.

Scenarios (``n`` = job count):
  throughput  n no-op jobs bulk-enqueued first (not timed; ANALYZE after), then drained
              with concurrency 10: (n - 1) / (last handler start - first handler start)
  drain_N     what a user waits for: N no-op jobs bulk-enqueued (no ANALYZE: a freshly
              filled table), then drained; N / (worker start -> the commit of the last
              job's completion). The runner reports ``drained`` when its last job starts
              and waits on stdin; the harness watches the table on its own connection
              until no unfinished job is left, then tells the runner to stop
  latency     worker idle; n jobs added ``interval`` apart; add -> handler start
  startup     empty queue: start -> first job (added right after the worker is up) and
              shutdown time with nothing running
  enqueue     the library's own client: single add_job round trips; add_jobs in chunks
              of 1000 (jobs/s)

Each (system, scenario, rep) gets a fresh database cloned from a per-system template that
the system's own migrator prepared, all on one server. What the peers need is provisioned
into a cache on first use (``provision.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .provision import ProvisionError, peers_python

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GW_VERSION = "0.18.0"
CONCURRENCY = 10
LOG_DIR = Path(os.environ.get("KONGTASK_BENCH_LOGS", tempfile.gettempdir())) / "kongtask-bench"


#: Systems that drain well under 2,000 jobs/s here run the throughput scenario with this
#: many jobs (their rate is steady from the first hundred jobs on; 20,000 would take
#: minutes per rep on a loaded 2-core machine). The table's labels say so.
SLOW_PEER_JOBS = 5000


class Unavailable(Exception):
    """A system cannot run here (package missing); the benchmark skips it."""


# --------------------------------------------------------------------------- database


def dsn_with_database(dsn: str, database: str) -> str:
    if "://" not in dsn:
        return f"{dsn} dbname='{database}'"
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def sql(dsn: str, *statements: str) -> list[Any]:
    """Run statements on a fresh connection from synchronous code (plain asyncio loop)."""
    import asyncpg

    async def go() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            out: list[Any] = []
            for s in statements:
                if s.lstrip().lower().startswith(("select", "show", "with")):
                    out.append([dict(r) for r in await conn.fetch(s)])
                else:
                    out.append(await conn.execute(s))
            return out
        finally:
            await conn.close()

    # A private selector loop: trio_asyncio (if imported) replaces asyncio's default.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(go())


@dataclass
class Server:
    """One PostgreSQL server; every system gets fresh databases on it."""

    admin_dsn: str
    source: str
    #: the postmaster's pid when the benchmark started the server itself
    postmaster: int | None = None

    def cpu_seconds(self) -> float:
        """CPU time of this server's processes so far (of every local ``postgres`` process
        for a server given by ``--dsn``)."""
        return postgres_cpu_seconds(self.postmaster)

    def dsn_for(self, database: str) -> str:
        return dsn_with_database(self.admin_dsn, database)

    def create_database(self, name: str, template: str | None = None) -> str:
        self.drop_database(name)
        tpl = f' template "{template}"' if template else ""
        sql(self.admin_dsn, f'create database "{name}"{tpl}')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        sql(self.admin_dsn, f'drop database if exists "{name}" with (force)')

    def describe(self) -> dict[str, Any]:
        names = (
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_level",
            "shared_buffers",
            "max_connections",
            "work_mem",
            "checkpoint_timeout",
            "max_wal_size",
            "autovacuum",
        )
        quoted = ", ".join(f"'{n}'" for n in names)
        rows = sql(
            self.admin_dsn,
            f"select name, setting, unit from pg_settings where name in ({quoted}) order by name",
        )[0]
        return {
            "source": self.source,
            "settings": {
                r["name"]: r["setting"] + (f" {r['unit']}" if r["unit"] else "") for r in rows
            },
        }


@contextlib.contextmanager
def provide_server(dsn: str | None) -> Iterator[Server]:
    """``dsn`` as given, or a throwaway local PostgreSQL cluster with fsync on."""
    if dsn:
        yield Server(dsn, "given")
        return
    from kongtask.testing._postgres import LocalCluster, find_pg_bindir

    bindir = find_pg_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries found; pass --dsn")
    cluster = LocalCluster(
        bindir,
        settings={"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"},
    )
    try:
        dsn = cluster.start()
        postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        yield Server(dsn, f"local cluster {bindir.parent.name} (fsync on)", postmaster)
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """A running runner process, its report pipe and its stdin (a line there: stop)."""

    proc: subprocess.Popen[bytes]
    fd: int
    log: Path
    buf: bytes = b""

    def event(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"runner gave no event in {timeout:.0f} s (log: {self.log})")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    tail = self.log.read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"runner exited {code} without a result:\n{tail}")
                self.buf += chunk
            elif self.proc.poll() is not None and not self.buf:
                tail = self.log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"runner exited {self.proc.returncode}:\n{tail}")
        line, self.buf = self.buf.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event

    def stop(self) -> None:
        """Let a runner that reported ``drained`` stop its worker."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()

    def finish(self, timeout: float = 30) -> None:
        self.stop()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def spawn(cmd: Sequence[str], *, env: dict[str, str] | None = None, tag: str) -> Runner:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{tag}.log"
    r, w = os.pipe()
    full_env = {**os.environ, **(env or {}), "BENCH_FD": str(w)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            env=full_env,
            pass_fds=(w,),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE,
            cwd=REPO,
        )
    os.close(w)
    return Runner(proc, r, log)


def side_python(family: str) -> str:
    """The interpreter that adds jobs for ``family``: this one for graphile-worker's schema
    (``py_side`` needs only asyncpg, a kongtask dependency), the peers' virtualenv else."""
    return sys.executable if family == "graphile" else peers_python()


def py_side(family: str, *args: str, timeout: float = 600) -> None:
    """Run ``py_side.py COMMAND FAMILY ...`` (adders, installers) for ``family``."""
    proc = subprocess.run(
        [side_python(family), str(HERE / "py_side.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"py_side {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")


def peers_version(python: str, module: str) -> str | None:
    """``module``'s installed version in ``python``, or None when it is not installed."""
    proc = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version('{module}'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


# ---------------------------------------------------------------------------- systems


@dataclass
class System:
    """One contestant.

    ``family`` says how jobs get in: ``graphile`` (the SQL functions of graphile-worker's
    schema, shared by graphile-worker and kongtask), ``pgqueuer`` or ``procrastinate``.
    ``command(mode, dsn, n)`` gives the runner's argv and extra environment.
    ``migrate(dsn)`` installs the schema with the system's own migrator.
    """

    key: str
    label: str
    family: str
    command: Callable[[str, str, int], tuple[list[str], dict[str, str]]]
    migrate: Callable[[str], None]
    version: str = "?"
    extra: dict[str, Any] = field(default_factory=dict)
    #: cap on the throughput scenario's job count (see SLOW_PEER_JOBS)
    max_jobs: int | None = None


def _gw_folder() -> Path:
    """graphile-worker's npm folder (installed once by the test oracle), Node 22 noted."""
    import importlib

    sys.path.insert(0, str(REPO / "tests"))
    try:
        oracle = importlib.import_module("oracle")
    finally:
        sys.path.pop(0)
    try:
        folder = Path(oracle.oracle_dir(GW_VERSION))
        node = str(oracle.node_for(GW_VERSION))
    except (oracle.OracleUnavailable, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"graphile-worker {GW_VERSION}: {exc}") from exc
    _gw_cache["node"] = node
    return folder


_gw_cache: dict[str, str] = {}


def graphile_worker(settings: str) -> System:
    """graphile-worker 0.18.0 under Node 22: ``defaults``, ``ht`` or ``ht-quiet``.

    ``ht`` is its high-throughput configuration (``preset.worker.localQueue.size = 500``,
    ``completeJobBatchDelay = 0``, ``failJobBatchDelay = 0``); ``ht-quiet`` additionally
    replaces its default console logger (one line per completed job) with a no-op one.
    """
    folder = _gw_folder()
    node = _gw_cache["node"]
    modules = str(folder / "node_modules")

    def command(mode: str, dsn: str, n: int) -> tuple[list[str], dict[str, str]]:
        return (
            [node, str(HERE / "gw_runner.cjs"), mode, dsn, str(n), settings],
            {"NODE_PATH": modules, "NODE_ENV": "production"},
        )

    def migrate(dsn: str) -> None:
        cli = folder / "node_modules" / "graphile-worker" / "dist" / "cli.js"
        proc = subprocess.run(
            [node, str(cli), "--schema-only", "-c", dsn],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"graphile-worker migrate failed: {proc.stderr}{proc.stdout}")

    label = {
        "defaults": "graphile-worker 0.18 defaults",
        "ht": "graphile-worker 0.18 ht (localQueue 500, batch delays 0)",
        "ht-quiet": "graphile-worker 0.18 ht + no-op logger",
    }[settings]
    key = {"defaults": "gw", "ht": "gw-ht", "ht-quiet": "gw-ht-quiet"}[settings]
    cap = SLOW_PEER_JOBS if settings == "defaults" else None  # one job per round trip
    if cap:
        label += f" (drains {cap:,} jobs)"
    return System(key, label, "graphile", command, migrate, version=GW_VERSION, max_jobs=cap)


def python_peer(name: str, say: Callable[[str], None]) -> System:
    """pgqueuer or procrastinate from the peers' virtualenv (concurrency 10, else defaults)."""
    try:
        python = peers_python(say)
    except ProvisionError as exc:
        raise Unavailable(str(exc)) from exc
    version = peers_version(python, name)
    if version is None:
        raise Unavailable(f"{name} is not installed in {python}")

    def command(mode: str, dsn: str, n: int) -> tuple[list[str], dict[str, str]]:
        return [python, str(HERE / "py_side.py"), "run", name, mode, dsn, str(n)], {}

    def migrate(dsn: str) -> None:
        py_side(name, "install", name, dsn)

    cap = {"procrastinate": 2000, "pgqueuer": SLOW_PEER_JOBS}.get(name)
    label = f"{name} {'.'.join(version.split('.')[:2])} defaults"
    if cap:
        label += f" (drains {cap:,} jobs)"
    return System(name, label, name, command, migrate, version=version, max_jobs=cap)


PEER_KEYS = ("gw", "gw-ht", "gw-ht-quiet", "pgqueuer", "procrastinate")


def peer_systems(keys: Sequence[str], warn: Callable[[str], None]) -> list[System]:
    out: list[System] = []
    for key in keys:
        try:
            if key == "gw":
                out.append(graphile_worker("defaults"))
            elif key == "gw-ht":
                out.append(graphile_worker("ht"))
            elif key == "gw-ht-quiet":
                out.append(graphile_worker("ht-quiet"))
            elif key in ("pgqueuer", "procrastinate"):
                out.append(python_peer(key, warn))
            else:
                raise Unavailable(f"unknown peer {key!r}")
        except Unavailable as exc:
            warn(f"skipping {key}: {exc}")
    return out


# --------------------------------------------------------------------------- scenarios


@dataclass
class Bench:
    server: Server
    say: Callable[[str], None] = print
    templates: dict[str, str] = field(default_factory=dict)
    counter: int = 0

    def fresh_database(self, system: System) -> tuple[str, str]:
        """A new database holding ``system``'s migrated schema (cloned from a template)."""
        if system.key not in self.templates:
            tpl = f"bench_tpl_{system.key}".replace("-", "_")
            self.server.create_database(tpl)
            system.migrate(self.server.dsn_for(tpl))
            self.templates[system.key] = tpl
        self.counter += 1
        name = f"bench_{system.key}_{self.counter}".replace("-", "_")
        return name, self.server.create_database(name, template=self.templates[system.key])

    def close(self) -> None:
        for tpl in self.templates.values():
            with contextlib.suppress(Exception):
                self.server.drop_database(tpl)
        self.templates.clear()

    def run(
        self,
        system: System,
        scenario: str,
        n: int,
        *,
        interval: float = 0.02,
        setup: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """One scenario, once, on a fresh database. ``setup(dsn)`` runs before the worker.

        ``flat_1m`` and ``flat_future`` are throughput runs (``n`` jobs drained) on a table
        that also holds 980,000 more ready jobs, or 100,000 jobs scheduled for tomorrow.
        """
        drain = scenario.startswith("drain_")
        mode = "throughput" if drain or scenario in ("throughput", *FLAT) else scenario
        if mode == "throughput" and system.max_jobs is not None:
            n = min(n, system.max_jobs)
        name, dsn = self.fresh_database(system)
        tag = f"{system.key}-{scenario}-{self.counter}"
        watch: CommitWatch | None = None
        try:
            if setup is not None:
                setup(dsn)
            if scenario in FLAT:
                if system.family != "graphile":
                    raise Unavailable("flat-cost scenarios are for graphile-schema workers")
                extra, kind = FLAT[scenario]
                if extra:
                    py_side("graphile", kind, "graphile", dsn, str(extra), timeout=1800)
            if mode == "throughput":
                raw = ["raw"] if drain else []  # drains see a freshly filled table
                py_side(system.family, "bulk", system.family, dsn, str(n), *raw, timeout=1800)
            if mode == "throughput" and scenario not in FLAT:  # the table empties at the end
                watch = CommitWatch(dsn, ALL_DONE[system.family])
            cmd, env = system.command(mode, dsn, n)
            # from the worker's start (the server is idle while the runner boots)
            server_cpu = -self.server.cpu_seconds()
            runner = spawn(cmd, env=env, tag=tag)
            committed = None
            try:
                # generous: procrastinate drains ~250 jobs/s
                timeout = 120 + n / 50
                result = runner.event(120)
                if result["event"] == "ready":  # startup and enqueue report only a result
                    if mode == "latency":
                        time.sleep(0.5)  # let every worker settle the same way
                        py_side(system.family, "pace", system.family, dsn, str(n), str(interval))
                    result = runner.event(timeout)
                    if result["event"] == "drained":
                        if watch is not None:
                            committed = watch.wait(timeout=60)
                        server_cpu += self.server.cpu_seconds()
                        runner.stop()
                        result = runner.event(120)
                    else:
                        server_cpu += self.server.cpu_seconds()
                assert result["event"] == "result", result
            finally:
                runner.finish()
            if mode == "throughput" and server_cpu > 0:
                # from the worker's start to the last commit (or the last start, for the
                # flat-cost runs): includes the start-up's few statements
                result["server_cpu_us_per_job"] = server_cpu * 1e6 / n
            if drain and committed is None:
                raise RuntimeError(f"{system.key} reported no drained event: no commit time")
            if committed is not None:
                t_start = result["t_start"]
                result.update(
                    start_to_commit_s=committed - t_start,
                    committed_jobs_per_s=result["n"] / (committed - t_start),
                    start_to_first_ms=(result["first"] - t_start) * 1000,
                    last_start_to_commit_ms=(committed - result["last"]) * 1000,
                )
            if scenario == "throughput" and system.family == "graphile":
                left = sql(dsn, "select count(*) as c from graphile_worker._private_jobs")[0]
                result["left_in_table"] = left[0]["c"]
            return summarise(mode, result)
        finally:
            if watch is not None:
                watch.close()
            with contextlib.suppress(Exception):
                self.server.drop_database(name)


#: per family: true once no job of the run is left unfinished, i.e. the last completion
#: is committed (graphile-worker's schema and pgqueuer delete a completed job; procrastinate
#: keeps it with a final status)
ALL_DONE = {
    "graphile": "select not exists (select 1 from graphile_worker._private_jobs)",
    "pgqueuer": "select not exists (select 1 from pgqueuer)",
    "procrastinate": "select not exists (select 1 from procrastinate_jobs"
    " where status in ('todo', 'doing'))",
}


class CommitWatch:
    """Finds when a drain's last completion is committed, from a connection of its own.

    Connected (and its query prepared) before the worker starts; polled only once the
    runner reports its last job started, so it costs the server nothing during the drain.
    """

    def __init__(self, dsn: str, query: str) -> None:
        import asyncpg

        self._loop = asyncio.Runner(loop_factory=asyncio.SelectorEventLoop)
        self._conn = self._loop.run(asyncpg.connect(dsn))
        self._stmt = self._loop.run(self._conn.prepare(query))

    def wait(self, timeout: float) -> float:
        """Poll until done; the wall time at which the poll that saw it done was sent.

        The commit happened between the previous poll's snapshot and that one's, so the
        time is late by at most one poll period (~1 ms).
        """

        async def poll() -> float:
            deadline = time.monotonic() + timeout
            while True:
                sent = time.time()
                if await self._stmt.fetchval():
                    return sent
                if time.monotonic() > deadline:
                    raise TimeoutError(f"jobs left unfinished {timeout:.0f} s after the last start")
                await asyncio.sleep(0.0005)

        return self._loop.run(poll())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._conn.close())
        self._loop.close()


#: flat-cost scenarios: extra rows put in first, and how (a ``py_side`` command)
#: (``flat_empty`` is the plain throughput run, repeated between the other two so that
#: their ratios compare runs made minutes, not a quarter of an hour, apart)
FLAT = {
    "flat_empty": (0, "bulk"),
    "flat_1m": (980_000, "bulk"),
    "flat_future": (100_000, "bulk-future"),
}


def postgres_cpu_seconds(postmaster: int | None = None) -> float:
    """CPU time (user + system) so far of ``postmaster`` and its children, or of every
    ``postgres`` process on this machine when it is None.

    Meaningful for a local server only (0.0 elsewhere). Backends that have exited count
    through the postmaster's children's times (it reaps them).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rfind(")")
        fields = text[name_end + 2 :].split()  # state, ppid, ...
        if postmaster is not None:
            if postmaster not in (int(stat.parent.name), int(fields[1])):
                continue
        elif text[text.find("(") + 1 : name_end] != "postgres":
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / tick


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summarise(scenario: str, result: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in result.items() if k not in ("event", "latencies_ms", "add_job_ms")}
    if "latencies_ms" in result:
        lat = result["latencies_ms"]
        out.update(
            latency_n=len(lat),
            latency_p50_ms=percentile(lat, 50),
            latency_p95_ms=percentile(lat, 95),
            latency_p99_ms=percentile(lat, 99),
            latency_max_ms=max(lat) if lat else float("nan"),
        )
    if "add_job_ms" in result:
        single = result["add_job_ms"]
        out.update(add_job_p50_ms=percentile(single, 50), add_job_p99_ms=percentile(single, 99))
    return out


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def node_version() -> str:
    node = _gw_cache.get("node") or shutil.which("node")
    if not node:
        return "?"
    proc = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def kongtask_system(
    key: str, label: str, options: dict[str, Any], src: str | None = None
) -> System:
    """kongtask in its own process (``kt_runner``), ``concurrency=10`` plus ``options``.

    ``src``: a folder holding another ``kongtask`` package (e.g. a checkout of an older
    commit), imported instead of this repository's, to compare versions in one run.
    """

    def command(mode: str, dsn: str, n: int) -> tuple[list[str], dict[str, str]]:
        args = [mode, dsn, str(n), json.dumps(options)]
        # this interpreter; kongtask from this checkout (the runner's working directory
        # is REPO, first on sys.path) or from ``src``; the runner itself always this one's
        if src is None:
            return [sys.executable, "-m", "stress.peers.kt_runner", *args], {}
        boot = (
            "import runpy, sys; "
            f"sys.path[:0] = [{str(Path(src).resolve())!r}]; "
            f"runpy.run_path({str(HERE / 'kt_runner.py')!r}, run_name='__main__')"
        )
        return [sys.executable, "-c", boot, *args], {}

    def migrate(dsn: str) -> None:
        from kongtask._migrate import migrate_sync

        migrate_sync(dsn)

    version = "?"
    if src is None:
        from kongtask import __version__ as version
    else:
        rev = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        version = f"{src}@{rev}" if rev else src
    return System(
        key, label, "graphile", command, migrate, version=version, extra={"options": options}
    )
