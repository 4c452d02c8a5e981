"""Reading the database's state from a snapshot, and comparing it with the model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .._model import JOB_FIELDS, MJob, same_json

_TIMESTAMPS = ("run_at", "created_at", "updated_at", "locked_at")


def _ts(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass
class DbState:
    now: datetime
    jobs: dict[int, dict[str, Any]]
    raw_jobs: list[dict[str, Any]]
    queues: dict[str, dict[str, Any]]
    queue_names: dict[int, str]
    tasks: dict[str, int]
    task_names: dict[int, str]
    view: list[dict[str, Any]]
    seq: dict[str, int]

    def job(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """A ``_private_jobs`` row (as JSON) in the model's terms."""
        out: dict[str, Any] = {}
        for name in JOB_FIELDS:
            if name == "task":
                out[name] = self.task_names.get(
                    raw["task_id"], f"<unknown task id {raw['task_id']}>"
                )
            elif name == "queue":
                qid = raw["job_queue_id"]
                out[name] = (
                    None if qid is None else self.queue_names.get(qid, f"<unknown queue id {qid}>")
                )
            elif name in _TIMESTAMPS:
                out[name] = _ts(raw[name])
            elif name == "flags":
                flags = raw["flags"]
                if isinstance(flags, dict) and all(v is True for v in flags.values()):
                    out[name] = frozenset(flags)
                else:
                    out[name] = flags  # a malformed value never equals the model's
            else:
                out[name] = raw[name]
        out["is_available"] = raw.get("is_available")
        return out


def parse_snapshot(text: str) -> DbState:
    data = json.loads(text)
    tasks = {t["identifier"]: t["id"] for t in data["tasks"]}
    queue_names_ = {q["id"]: q["queue_name"] for q in data["queues"]}
    state = DbState(
        now=datetime.fromisoformat(data["now"]),
        jobs={},
        raw_jobs=data["jobs"],
        queues={
            q["queue_name"]: {
                "id": q["id"],
                "locked_at": _ts(q["locked_at"]),
                "locked_by": q["locked_by"],
                "is_available": q["is_available"],
            }
            for q in data["queues"]
        },
        queue_names=queue_names_,
        tasks=tasks,
        task_names={v: k for k, v in tasks.items()},
        view=data["view"],
        seq={"tasks": int(data["seq_tasks"]), "queues": int(data["seq_queues"])},
    )
    state.jobs = {raw["id"]: state.job(raw) for raw in data["jobs"]}
    return state


def diff_job(job: MJob, row: Mapping[str, Any], run_at_tolerance: timedelta) -> list[str]:
    """Fields where the database row differs from the model's job."""
    out = []
    for name in JOB_FIELDS:
        want = getattr(job, name)
        got = row[name]
        if name == "updated_at" and want is None:
            continue  # not predicted
        if name == "payload":
            if not same_json(want, got):
                out.append(name)
        elif name == "run_at" and run_at_tolerance and got is not None:
            if abs(got - want) > run_at_tolerance:
                out.append(name)
        elif want != got:
            out.append(name)
    return out


def describe_diff(job: MJob, row: Mapping[str, Any], fields: Sequence[str]) -> str:
    parts = [f"{f}: model {getattr(job, f)!r}, database {row[f]!r}" for f in fields]
    return f"job {job.id}: " + "; ".join(parts)
