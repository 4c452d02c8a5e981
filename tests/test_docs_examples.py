"""Every code block of the documentation runs, in order, against a real PostgreSQL.

The rules are in ``tests/docs_examples.py``. docs/producers.md has its own test (its
examples run against a live worker) and README.md too; every other page runs here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import psycopg
import pytest
from docs_examples import CODE_LANGUAGES, DOCS, page_blocks, run_page
from oracle import require_oracle

from kongtask import CrontabError

# pages whose examples another test runs
OWN_TESTS = {"producers.md": "tests/test_producers_docs.py"}
# pages whose blocks need graphile-worker (Node) itself
NEEDS_ORACLE = {"testing.md"}

# every page, docs/design/ and other folders included (not the build's output)
PAGES = sorted(
    str(p.relative_to(DOCS))
    for p in DOCS.rglob("*.md")
    if not p.relative_to(DOCS).parts[0].startswith("_") and p.name not in OWN_TESTS
)


def test_every_block_names_its_language() -> None:
    unnamed = [b.where for page in PAGES for b in page_blocks(page) if not b.lang]
    assert unnamed == []


def test_every_block_runs_or_is_checked() -> None:
    """Code runs and configuration is checked; only ``text`` (prose, diagrams, samples)
    and Sphinx directives are neither."""
    blocks = [b for page in PAGES for b in page_blocks(page)]
    idle = [b.where for b in blocks if not b.runs and b.lang != "text" and b.lang[:1] != "{"]
    assert idle == []
    assert not [b for b in blocks if b.lang in CODE_LANGUAGES and not b.runs]


def test_a_marker_that_would_skip_a_block_is_refused() -> None:
    with pytest.raises(AssertionError, match="is not a marker"):
        page_blocks("check.md", "<!-- not-run: too slow -->\n```bash\nfalse\n```\n")


def test_a_wrong_output_sample_fails(kongtask_dsn: str, tmp_path: Path) -> None:
    shown = "```console\n$ echo 2026-01-31T04:05:00.000Z ok\n2030-01-01T00:00:00Z ko\n```\n"
    with pytest.raises(AssertionError, match="the output shown is not the real one"):
        run_page("check.md", kongtask_dsn, tmp_path, shown)
    right = shown.replace("ko", "ok")
    assert run_page("check.md", kongtask_dsn, tmp_path, right).outputs


FAILING_BLOCKS = {
    "fragment": "<!-- run: inside trio -->\n```python\nawait trio.sleep(0)\nexit(3)\n```\n",
    "test module": "<!-- run: pytest -->\n```python\ndef test_it():\n    assert 1 == 2\n```\n",
    "arguments": "<!-- run: arguments -->\n```sh\npython stress/chaos.py kill --roundz 3\n```\n",
    "by .ci/run": "<!-- run: by .ci/run -->\n```sh\npython3 docs/build.py --fast\n```\n",
    "installed": "<!-- run: installed -->\n```sh\npython3 -m pip install no-such-package\n```\n",
}


@pytest.mark.parametrize("kind", sorted(FAILING_BLOCKS))
def test_a_failing_block_fails_the_page(kind: str, kongtask_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(AssertionError):
        run_page("check.md", kongtask_dsn, tmp_path, FAILING_BLOCKS[kind])


BAD_CONFIGURATION = {
    # an unknown key of [tool.kongtask]: `kongtask run --print-config` refuses it
    "toml": ("[tool.kongtask]\nconcurency = 10\n", AssertionError, "print-config.* exited 2"),
    "crontab": ("0 9 * * MON task\n", CrontabError, "day of week"),
    "yaml": (
        "spec: {template: {spec: {containers: [{command: [kongtask, run, -j, ten]}]}}}\n",
        AssertionError,
        "print-config.* exited 2",
    ),
    "ini": (
        "[Service]\nExecStart=/srv/app/venv/bin/kongtask run --grace soon\n",
        AssertionError,
        "print-config.* exited 2",
    ),
    "ini-unit": (
        "[Service]\nUser=app\nExecStart=/srv/app/venv/bin/kongtask run\nKillSignal=SIGTERMX\n",
        AssertionError,
        "systemd-analyze verify",
    ),
    "json": ('{"a": 1,}\n', json.JSONDecodeError, "Expecting property name"),
}


@pytest.mark.parametrize("lang", sorted(BAD_CONFIGURATION))
def test_bad_configuration_fails_its_check(lang: str, kongtask_dsn: str, tmp_path: Path) -> None:
    body, error, message = BAD_CONFIGURATION[lang]
    if lang == "ini-unit" and not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    fence = lang.split("-")[0]
    with pytest.raises(error, match=message):
        run_page("check.md", kongtask_dsn, tmp_path, f"```{fence}\n{body}```\n")


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
    if page in NEEDS_ORACLE:
        require_oracle()
    run = run_page(page, kongtask_dsn, tmp_path)
    for block, returncode, output in run.background:
        assert returncode == 0, f"{block.where}:\n{output}"


def test_the_events_page_lists_every_event() -> None:
    from kongtask._events import EVENT_NAMES

    table = (DOCS / "events.md").read_text().split("## Names and fields", 1)[1]
    documented = re.findall(r"^\| `([\w:]+)` \|", table, re.MULTILINE)
    assert sorted(documented) == sorted(EVENT_NAMES)
    assert len(documented) == len(set(documented))
