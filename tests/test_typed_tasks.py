"""Typed task definitions (kongtask.TaskDef): mypy rejects a wrong payload where a job is
added, and the worker runs definitions given instead of a dict of handlers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
from typed_tasks import Resize, resize, send_email

import kongtask

CHECKED = textwrap.dedent(
    """\
    from typing import Any
    import kongtask
    import kongtask.aio
    from typed_tasks import Resize, resize, send_email

    def produce(conn: Any) -> None:
        kongtask.add_job_sync(conn, send_email.spec({"to": "a@example.com"}))
        kongtask.add_job_sync(conn, send_email.spec({"to": 1}))  # wrong
        kongtask.add_job_sync(conn, send_email.spec({"too": "a"}))  # wrong
        kongtask.add_jobs_sync(conn, [resize.spec(Resize("a.png", 10))])
        kongtask.add_jobs_sync(conn, [resize.spec({"path": "a.png", "width": 10})])  # wrong
        kongtask.add_job_sync(conn, resize.spec(Resize("a.png", "10")))  # wrong

    async def produce_async(conn: Any) -> None:
        await kongtask.aio.add_job(conn, send_email.spec({"to": "b@example.com"}))
        await kongtask.aio.add_job(conn, resize.spec(Resize("a.png", 10)), priority=1)  # wrong

    def consume(job: kongtask.Job) -> str:
        width: int = resize.payload_of(job).width
        return send_email.payload_of(job)["to"] + str(width)
    """
)


def test_mypy_rejects_a_wrong_payload_at_the_call_site(tmp_path: Path) -> None:
    source = tmp_path / "producer.py"
    source.write_text(CHECKED)
    tests_dir = Path(__file__).parent
    env = {**os.environ, "MYPYPATH": f"{tests_dir}{os.pathsep}{tests_dir.parent}"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            str(source),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    flagged = sorted(
        {int(line.split(":")[1]) for line in done.stdout.splitlines() if ": error:" in line}
    )
    wrong = [n for n, line in enumerate(CHECKED.splitlines(), 1) if line.endswith("# wrong")]
    assert flagged == wrong, done.stdout


async def test_the_worker_runs_task_definitions(kongtask_dsn: str) -> None:
    got: list[object] = []
    done = trio.Event()

    async def do_resize(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        got.append(resize.payload_of(job))

    async def do_send(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        got.append(send_email.payload_of(job))
        done.set()

    tasks: list[kongtask.TaskDef[Any]] = [
        resize.with_handler(do_resize),
        send_email.with_handler(do_send, timeout=5),
    ]
    async with kongtask.open_worker(kongtask_dsn, tasks) as w:
        await w.add_jobs([resize.spec(Resize("a.png", 3), priority=-1)])
        await w.add_jobs([send_email.spec({"to": "c@example.com"})])
        with trio.fail_after(10):
            await done.wait()
    assert got == [Resize("a.png", 3), {"to": "c@example.com"}]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([send_email], "task 'send_email' has no handler"),
        (
            [send_email.with_handler(print), send_email.with_handler(print)],
            "task 'send_email' is defined twice",
        ),
        ([send_email.with_handler(print), print], "or TaskDef items, not builtin_function"),
        ("send_email", "tasks must be a mapping"),
    ],
)
async def test_bad_task_definitions_are_refused(
    kongtask_dsn: str, tasks: object, message: str
) -> None:
    with pytest.raises(kongtask.ConfigError, match=message):
        async with kongtask.open_worker(kongtask_dsn, tasks):  # type: ignore[arg-type]
            pass


def test_a_definition_checks_its_fields_and_its_jobs() -> None:
    with pytest.raises(kongtask.ConfigError, match="1 to 128 characters"):
        kongtask.TaskDef("", dict)
    with pytest.raises(kongtask.ConfigError, match="payload_type must be a type"):
        kongtask.TaskDef("t", "dict")  # type: ignore[arg-type]
    job = kongtask.Job(1, "other", {}, None, 0, *[None] * 11)  # type: ignore[arg-type]
    with pytest.raises(kongtask.ConfigError, match="'other' job, not 'resize'"):
        resize.payload_of(job)
