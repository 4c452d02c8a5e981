"""What the benchmark needs beyond kongtask's own set-up, provisioned once into a cache.

The cache folder is ``$KONGTASK_BENCH_CACHE``, else ``$XDG_CACHE_HOME/kongtask-bench``,
else ``~/.cache/kongtask-bench``. It holds the Python peers' virtualenv: pgqueuer and
procrastinate at pinned versions, created with ``python -m venv`` by the interpreter that
runs the benchmark and pip-installed on first use (again when the pins change). The peers
live apart so that kongtask's own environment stays untouched; kongtask itself always runs
in the benchmark's interpreter, from the checkout being measured.

graphile-worker comes from npm through the test oracle's cache (``tests/oracle.py``).

``$KONGTASK_PEERS_PYTHON`` names an interpreter that already has the peers installed; it is
used as is and nothing is provisioned.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

#: The peers and their drivers, pinned: a benchmark compares versions, not whatever pip
#: resolves today. A change here makes the next run reinstall.
PEERS_REQUIREMENTS = (
    "pgqueuer==1.6.0",
    "procrastinate==3.10.0",
    "psycopg[binary]==3.3.9",
    "asyncpg==0.32.0",
)


class ProvisionError(Exception):
    """The peers' virtualenv cannot be created or installed here (offline, no venv...)."""


def cache_dir() -> Path:
    explicit = os.environ.get("KONGTASK_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kongtask-bench"


def peers_python(say: Callable[[str], None] = print) -> str:
    """The interpreter of the peers' virtualenv, created and installed when missing/outdated."""
    given = os.environ.get("KONGTASK_PEERS_PYTHON")
    if given:
        return given
    # one virtualenv per Python minor version: a venv is bound to its base interpreter
    venv = cache_dir() / f"peers-py{sys.version_info.major}.{sys.version_info.minor}"
    python = venv / "bin" / "python"
    stamp = venv / "installed-requirements.txt"
    wanted = "\n".join(PEERS_REQUIREMENTS) + "\n"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmarks at once provision once
        if _usable(python) and stamp.exists() and stamp.read_text() == wanted:
            return str(python)
        if not _usable(python):  # absent, or its base interpreter is gone
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        stamp.unlink(missing_ok=True)
        say(f"installing {', '.join(PEERS_REQUIREMENTS)} into {venv} (once)")
        _run(
            [str(python), "-m", "pip", "install", "--quiet", *PEERS_REQUIREMENTS],
            "pip install " + " ".join(PEERS_REQUIREMENTS),
        )
        stamp.write_text(wanted)
    return str(python)


def _usable(python: Path) -> bool:
    if not python.exists():
        return False
    proc = subprocess.run([str(python), "-c", "pass"], capture_output=True, timeout=60)
    return proc.returncode == 0


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        raise ProvisionError(f"{what} failed: {(proc.stderr or proc.stdout)[-1500:]}")
