"""Run ``kongtask.main`` in this process and get the exit status the command would have."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

import kongtask


async def cli_status(argv: Sequence[str]) -> int:
    """``kongtask.main(argv)``'s exit status: 0 when it returns, else its ``SystemExit`` code."""
    try:
        await kongtask.main(argv)
    except SystemExit as exit_:
        if not isinstance(exit_.code, int):
            pytest.fail(f"SystemExit({exit_.code!r}): expected an integer status")
        return exit_.code
    return 0
