"""A fleet of worker processes on one machine (``kongtask run --processes N``).

The supervisor is a trio task that keeps N child processes running, each a whole
``kongtask run`` with the same options, so each child has its own pool, connections and
liveness lock and shares the queue with the others exactly as separate machines would.

Rules:

- **One migration.** The supervisor migrates before it starts any child, so the children
  find the schema up to date (and the migrator's table lock serialises them anyway).
- **Restart with backoff.** A child that exits non-zero (or dies from a signal) while the
  fleet is not stopping is restarted after ``initial_backoff`` seconds, doubling up to
  ``max_backoff``; a child that ran ``healthy_after`` seconds before it crashed starts the
  doubling again from ``initial_backoff``. A child that exits 0 on its own (``--once``) is
  done and not restarted.
- **Breaking migration.** A child exiting 57 stops the whole fleet, which exits 57: every
  other child would see the same migration.
- **Signals.** Children run in their own session, so a terminal's Ctrl-C reaches only the
  supervisor, which forwards each stop request as one SIGTERM per child: the first stops
  the children gracefully, a second one stops them at once (as for a single worker).
- **One exit status.** 57 if a child reported a breaking migration; else 0 if every child
  stopped cleanly (exit 0, or killed by the SIGTERM the supervisor sent before it could
  install its handler); else the first other status (128 + N for a child killed by
  signal N). Crashes that a restart repaired are logged, not reported.

If the supervisor itself is killed with SIGKILL the children keep running until they get
a signal of their own: stop a fleet through its supervisor.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

log = logging.getLogger("kongtask.fleet")

#: Exit status of a worker that saw a breaking migration (graphile-worker's convention).
EXIT_BREAKING_MIGRATION = 57
DEFAULT_INITIAL_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 30.0
DEFAULT_HEALTHY_AFTER = 60.0
#: Seconds a child gets after the supervisor is cancelled before it is killed.
KILL_AFTER = 30.0


@dataclass(frozen=True)
class FleetStatistics:
    """``started``: processes started so far (restarts included); ``restarts``: crashes
    followed by a restart; ``running``: processes alive now."""

    started: int
    restarts: int
    running: int


def backoff_delays(initial: float, maximum: float) -> list[float]:
    """The restart delays of a crash loop, from the first to the cap (for docs and tests)."""
    delays = [initial]
    while delays[-1] < maximum:
        delays.append(min(delays[-1] * 2, maximum))
    return delays


def combine_exit_codes(codes: Sequence[int], *, stop_requested: bool) -> int:
    """One status for the fleet from each child's last return code (see the module rules)."""
    if EXIT_BREAKING_MIGRATION in codes:
        return EXIT_BREAKING_MIGRATION
    for code in codes:
        if code == 0 or (stop_requested and code == -signal.SIGTERM):
            continue
        return 128 - code if code < 0 else code
    return 0


class Fleet:
    """Runs ``processes`` copies of ``command``; :meth:`run` returns the fleet's exit status."""

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        env: Mapping[str, str] | None = None,
        initial_backoff: float = DEFAULT_INITIAL_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        healthy_after: float = DEFAULT_HEALTHY_AFTER,
    ) -> None:
        if not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive integer, not {processes!r}")
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError("backoff must satisfy 0 < initial_backoff <= max_backoff")
        self._command = list(command)
        self._processes = processes
        self._env = dict(os.environ if env is None else env)
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._healthy_after = healthy_after
        self._children: dict[int, trio.Process] = {}
        self._stop_requests = 0
        self._stopping = trio.Event()
        self._started = 0
        self._restarts = 0
        self._final_codes: list[int] = []

    def statistics(self) -> FleetStatistics:
        return FleetStatistics(self._started, self._restarts, len(self._children))

    def stop_nowait(self) -> None:
        """Ask every child to stop: the first call gracefully, a second one at once."""
        self._stop_requests += 1
        self._stopping.set()
        for child in list(self._children.values()):
            self._signal(child)

    def _signal(self, child: trio.Process) -> None:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited since the check
                child.send_signal(signal.SIGTERM)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Start the children, keep them running until they are done or stopped."""
        async with trio.open_nursery() as nursery:
            for slot in range(self._processes):
                nursery.start_soon(self._keep_running, slot)
            task_status.started()
        return combine_exit_codes(self._final_codes, stop_requested=self._stopping.is_set())

    async def _keep_running(self, slot: int) -> None:
        delay = self._initial_backoff
        while True:
            started_at = trio.current_time()
            code = await self._run_child(slot)
            if self._stopping.is_set() or code == 0:
                self._final_codes.append(code)
                return
            if code == EXIT_BREAKING_MIGRATION:
                log.error("process %d: breaking migration detected, stopping the fleet", slot)
                self._final_codes.append(code)
                self.stop_nowait()
                return
            if trio.current_time() - started_at >= self._healthy_after:
                delay = self._initial_backoff
            log.warning(
                "process %d exited with status %d; restarting it in %.3g s", slot, code, delay
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()
            if self._stopping.is_set():
                self._final_codes.append(code)
                return
            self._restarts += 1
            delay = min(delay * 2, self._max_backoff)

    async def _run_child(self, slot: int) -> int:
        env = {**self._env, "KONGTASK_FLEET_PROCESS": str(slot)}
        child = await trio.lowlevel.open_process(
            self._command, env=env, start_new_session=True, stdin=subprocess.DEVNULL
        )
        self._started += 1
        self._children[slot] = child
        log.info("process %d started (pid %d)", slot, child.pid)
        # stop requests that arrived while it was being spawned
        for _ in range(self._stop_requests):
            self._signal(child)
        try:
            return await child.wait()
        except BaseException:
            # cancelled (the supervisor is going away): stop the child, then kill it
            with trio.CancelScope(shield=True):
                self._signal(child)
                with trio.move_on_after(KILL_AFTER):
                    await child.wait()
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            raise
        finally:
            del self._children[slot]


async def run_fleet(command: Sequence[str], processes: int) -> int:
    """Run a fleet until its children are done or SIGINT/SIGTERM stops it (the CLI's loop)."""
    fleet = Fleet(command, processes)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def forward_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if fleet._stop_requests == 0:
                        log.info("%s: stopping %d processes gracefully", name, processes)
                    else:
                        log.warning("%s: stopping %d processes at once", name, processes)
                    fleet.stop_nowait()

            nursery.start_soon(forward_signals)
            code = await fleet.run()
            nursery.cancel_scope.cancel()
    return code


def child_command(argv: Sequence[str]) -> list[str]:
    """The command line of one child: the same arguments, ``--processes 1`` last (it wins)."""
    return [sys.executable, "-m", "kongtask", *argv, "--processes", "1"]


async def run_fleet_from_cli(args: argparse.Namespace) -> int:
    """``kongtask run --processes N`` once the schema is migrated and the options checked."""
    log.info("kongtask fleet: %d processes (supervisor pid %d)", args.processes, os.getpid())
    return await run_fleet(child_command(args.argv), args.processes)
