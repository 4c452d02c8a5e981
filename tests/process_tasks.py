"""Handlers for ``task(..., process=True)`` tests: importable by name, as pickling needs."""

from __future__ import annotations

import os
import time

import kongtask


def crunch(job: kongtask.Job) -> None:
    """Busy CPU work; fails when asked, naming the process it ran in."""
    total = sum(i * i for i in range(job.payload.get("n", 10_000)))
    if job.payload.get("fail"):
        raise ValueError(f"failed in pid {os.getpid()} after summing to {total}")


def stall(job: kongtask.Job) -> None:
    """A CPU-bound function that never checks for cancellation."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        pass
