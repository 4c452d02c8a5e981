"""Every example of docs/producers.md runs here, against a live worker pool that only the
commits' notifications can wake (poll_interval=3600)."""

from __future__ import annotations

import os
import re
import runpy
import sys
from pathlib import Path

import pytest
import trio
from producer_scenarios import wait_until

import kongtask
from kongtask._pg import Database

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "producers.md"
BLOCK = re.compile(r"^```python\n# file: (\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
S = "graphile_worker"


def examples() -> dict[str, str]:
    text = DOC.read_text()
    found = dict(BLOCK.findall(text))
    # no python block escapes being run
    assert text.count("```python") == len(found)
    return found


def test_the_documented_django_view_is_the_tested_one() -> None:
    view = ROOT / "tests" / "django_demo" / "orders" / "views.py"
    assert examples()["django_view.py"] == view.read_text()


async def _run(tmp_path: Path, dsn: str, *code: str) -> str:
    env = {**os.environ, "DATABASE_URL": dsn, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, *code],
            cwd=tmp_path,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def test_the_examples_run(
    tmp_path: Path, appdb: Database, kongtask_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = examples()
    assert set(blocks) == {
        "script.py",
        "fastapi_app.py",
        "flask_app.py",
        "django_view.py",
        "handler.py",
        "typed.py",
        "savepoint.py",
    }
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)

    # typed.py adds three jobs when run, and defines the worker's tasks
    monkeypatch.setenv("DATABASE_URL", kongtask_dsn)
    typed = await trio.to_thread.run_sync(runpy.run_path, str(tmp_path / "typed.py"))
    handler = runpy.run_path(str(tmp_path / "handler.py"))
    tasks = [
        *typed["tasks"],
        kongtask.TaskDef("charge", dict).with_handler(handler["tasks"]["charge"]),
    ]

    async with kongtask.open_worker(kongtask_dsn, tasks, poll_interval=3600) as w:
        await wait_until(
            lambda: w.statistics().fetcher == "waiting for jobs" and w.statistics().completed == 3
        )
        assert "added job" in await _run(tmp_path, kongtask_dsn, "script.py")
        out = await _run(
            tmp_path,
            kongtask_dsn,
            "-c",
            "from fastapi.testclient import TestClient\n"
            "from fastapi_app import app\n"
            "with TestClient(app) as client:\n"
            "    response = client.post('/orders/5')\n"
            "    assert response.status_code == 200, response.text\n"
            "    print(response.json())\n",
        )
        assert "'order': 5" in out
        out = await _run(
            tmp_path,
            kongtask_dsn,
            "-c",
            "from flask_app import app\n"
            "response = app.test_client().post('/orders/6')\n"
            "assert response.status_code == 200, response.text\n"
            "print(response.json)\n",
        )
        assert "'order': 6" in out
        out = await _run(tmp_path, kongtask_dsn, "savepoint.py")
        assert "order kept, job not added: schema 'not_installed' is not installed" in out
        await w.add_job("charge", {"order": 8})
        # typed 3, script, fastapi, flask, charge and the job it added
        await wait_until(lambda: w.statistics().completed == 8)
        assert w.statistics().failed == 0
    assert await appdb.fetchval("select array_agg(id order by id) from orders") == [1, 2, 5, 6, 8]
    assert await appdb.fetchval(f"select count(*) from {S}._private_jobs") == 0
