"""Build the HTML documentation: ``python3 docs/build.py [OUTPUT_DIR]`` (default docs/_build/html).

The pinned Sphinx toolchain is installed once into a virtual environment in the user's cache
(``$XDG_CACHE_HOME/kongtask-docs``, else ``~/.cache/kongtask-docs``), next to kongtask's own
runtime dependencies; the checkout itself is put on ``sys.path``, never installed, so any
worktree builds its own code. Warnings are errors, and broken internal links are warnings.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# The documentation toolchain, pinned so that a build is reproducible.
PINS = ["sphinx==8.1.3", "myst-parser==4.0.0", "furo==2024.8.6"]


def _requirements() -> list[str]:
    """The pins, plus what importing every documented module needs (runtime + testing)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    testing = [r for r in project["optional-dependencies"]["testing"] if "kongtask" not in r]
    return [*PINS, *project["dependencies"], *testing, "pytest"]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kongtask-docs"


def toolchain() -> Path:
    """The Python of a virtual environment holding the requirements, created on first use."""
    requirements = _requirements()
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    env = _cache_dir() / f"venv-{key}"
    python = env / "bin" / "python"
    ready = env / "ready"
    if not ready.exists():
        venv.EnvBuilder(clear=True, with_pip=True).create(env)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                *requirements,
            ],
            check=True,
        )
        ready.write_text("\n".join(requirements) + "\n")
    return python


def build(out: Path) -> int:
    python = toolchain()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(DOCS / "_ext")])}
    # -E -a: read every page afresh, so each build reports every warning
    sphinx = ["-E", "-a", "-W", "--keep-going", "-q", "-b", "html"]
    doctrees = str(out.parent / "doctrees")
    command = [str(python), "-m", "sphinx", *sphinx, "-d", doctrees, str(DOCS), str(out)]
    return subprocess.run(command, env=env, check=False).returncode


def main() -> int:
    out = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else DOCS / "_build" / "html"
    code = build(out)
    if code == 0:
        print(f"docs built: {out / 'index.html'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
