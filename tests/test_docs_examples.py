"""Every code block of the documentation runs, in order, against a real PostgreSQL.

The rules are in ``tests/docs_examples.py``. docs/producers.md has its own test (its
examples run against a live worker) and README.md too; every other page runs here.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
from docs_examples import DOCS, page_blocks, run_page

# pages whose examples another test runs
OWN_TESTS = {"producers.md": "tests/test_producers_docs.py"}
# blocks that are shown but not run, each with its reason in the page: kept few
MOST_NOT_RUN = 23

PAGES = sorted(p.name for p in DOCS.glob("*.md") if p.name not in OWN_TESTS)


def test_every_block_names_its_language() -> None:
    unnamed = [b.where for page in PAGES for b in page_blocks(page) if not b.lang]
    assert unnamed == []


def test_blocks_not_run_are_few_and_say_why() -> None:
    skipped = [b for page in PAGES for b in page_blocks(page) if b.marker == "not-run"]
    assert all(b.note for b in skipped)
    assert len(skipped) <= MOST_NOT_RUN, "\n".join(f"{b.where}: {b.note}" for b in skipped)


def test_the_tutorial_gives_a_working_worker(kongtask_blank_dsn: str, tmp_path: Path) -> None:
    run = run_page("tutorial.md", kongtask_blank_dsn, tmp_path)

    # step 5: the one-shot worker ran the job added from the shell
    assert any("sending welcome email to ada@example.com" in out for out in run.outputs)
    # step 6: the long-running worker ran the web app's jobs, then stopped cleanly on SIGINT
    [(block, returncode, output)] = run.background
    assert block.body.strip() == "python worker.py"
    assert returncode == 0, output
    for email in ["grace@example.com", "edsger@example.com"]:
        assert f"sending welcome email to {email}" in output, output
    assert "stopping on SIGINT" in output
    with psycopg.connect(kongtask_blank_dsn) as conn:
        assert conn.execute("select count(*) from graphile_worker.jobs").fetchone() == (0,)
        emails = conn.execute("select array_agg(email order by id) from users").fetchone()
        assert emails == (["grace@example.com", "edsger@example.com"],)


@pytest.mark.parametrize("page", [p for p in PAGES if p != "tutorial.md"])
def test_the_page_runs(page: str, kongtask_dsn: str, tmp_path: Path) -> None:
    run = run_page(page, kongtask_dsn, tmp_path)
    for block, returncode, output in run.background:
        assert returncode == 0, f"{block.where}:\n{output}"


def test_the_events_page_lists_every_event() -> None:
    from kongtask._events import EVENT_NAMES

    table = (DOCS / "events.md").read_text().split("## Names and fields", 1)[1]
    documented = re.findall(r"^\| `([\w:]+)` \|", table, re.MULTILINE)
    assert sorted(documented) == sorted(EVENT_NAMES)
    assert len(documented) == len(set(documented))
