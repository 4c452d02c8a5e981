"""Typed task definitions shared by the producer tests and the mypy test (not a test module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import kongtask


class Email(TypedDict):
    to: str


@dataclass(frozen=True)
class Resize:
    path: str
    width: int


send_email = kongtask.TaskDef("send_email", Email)
resize = kongtask.TaskDef("resize", Resize)
