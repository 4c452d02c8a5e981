"""References in code, tests and docs lead to something in this repository.

The rules are in ``tests/references.py``. The first test checks the repository itself;
the others plant bad references in a scratch tree and check that each one is caught.
"""

from __future__ import annotations

from pathlib import Path

from references import (
    BRIEF_DOCUMENTS,
    PENDING_BRIEF_CLEANUP,
    ROOT,
    Checker,
    heading_anchors,
    slugify,
)


def test_every_reference_in_the_repository_leads_somewhere() -> None:
    problems = Checker(ROOT, PENDING_BRIEF_CLEANUP).problems()
    assert [str(p) for p in problems] == []


def test_files_pending_cleanup_still_need_it() -> None:
    """An entry of the allow-list goes as soon as its file is gone or clean."""
    for name in PENDING_BRIEF_CLEANUP:
        path = ROOT / name
        assert path.exists(), f"{name} is gone: remove it from PENDING_BRIEF_CLEANUP"
        text = path.read_text()
        assert any(brief in text for brief in BRIEF_DOCUMENTS), (
            f"{name} no longer cites a design document: remove it from PENDING_BRIEF_CLEANUP"
        )


def test_slugs_follow_myst() -> None:
    page = """# The `jobs:insert` channel
## Claiming (one statement)
## Claiming (one statement)
### Upstream #580: *lost* adds
#### Too deep for an anchor
```text
# not a heading
```
## [A link](https://example.org) and {doc}`a role`
"""
    assert heading_anchors(page) == {
        "the-jobsinsert-channel",
        "claiming-one-statement",
        "claiming-one-statement-1",
        "upstream-580-lost-adds",
        "a-link-and-a-role",
    }
    assert slugify("Stale locks: the 4-hour rule") == "stale-locks-the-4-hour-rule"


def _write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_planted_bad_references_are_caught(tmp_path: Path) -> None:
    brief = BRIEF_DOCUMENTS[0]
    _write(tmp_path, "README.md", "See docs/page.md and [the page](docs/page.md#a-heading).\n")
    _write(
        tmp_path, "docs/page.md", "# Page\n\n## A heading\n\nSee other.md and [x](#a-heading).\n"
    )
    _write(tmp_path, "docs/other.md", "# Other\n\nBack to page.md#a-heading.\n")
    _write(tmp_path, "kongtask/_real.py", '"""Uses kongtask._real and docs/page.md#a-heading."""\n')
    _write(
        tmp_path,
        "kongtask/_bad.py",
        "\n".join(
            [
                "# the rule: docs/missing.md",
                "# see docs/page.md#no-such-heading",
                f"# as {brief} says",
                "# tested by tests/test_gone.py, in kongtask._gone",
                "# written to " + "/" + "work/wt-x/out.txt",
            ]
        )
        + "\n",
    )
    _write(tmp_path, "docs/links.md", "# Links\n\n[gone](gone.md), [bad](page.md#nope), nope.md\n")
    _write(tmp_path, "tests/test_pending.py", f"# {brief} is still cited here\n")

    problems = Checker(tmp_path, pending=["tests/test_pending.py"]).problems()
    found = sorted((p.file, p.line, p.text) for p in problems)
    assert found == [
        ("docs/links.md", 3, "gone.md"),
        ("docs/links.md", 3, "nope.md"),
        ("docs/links.md", 3, "page.md#nope"),
        ("kongtask/_bad.py", 1, "docs/missing.md"),
        ("kongtask/_bad.py", 2, "docs/page.md#no-such-heading"),
        ("kongtask/_bad.py", 3, brief),
        ("kongtask/_bad.py", 4, "kongtask._gone"),
        ("kongtask/_bad.py", 4, "tests/test_gone.py"),
        ("kongtask/_bad.py", 5, "/" + "work/wt-x/out.txt"),
    ]
