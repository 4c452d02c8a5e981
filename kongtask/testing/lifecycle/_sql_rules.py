"""The rules that call the schema's SQL API: add, remove, complete, fail, reschedule, unlock."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from .._model import clone
from ._core import MachineCore
from ._snapshot import parse_snapshot
from ._statements import spec_json
from ._strategies import (
    ADMIN_PICK,
    DEFAULT_MODE,
    PICK1,
    JobTemplate,
    choose,
    job_key_modes,
    job_keys,
    job_templates,
    max_attempts_values,
    priorities,
    run_at_offsets,
)


class SqlApiRules(MachineCore):
    """Rules that drive the schema through its SQL functions, as an application would."""

    @rule(template=job_templates(), mode=job_key_modes())
    def add_job(self, template: JobTemplate, mode: str | None) -> None:
        """``add_job`` with every argument, in every ``job_key_mode``."""
        spec = template.at(self.model.clock)
        step = f"add_job(mode={mode!r})"
        args: list[Any] = [
            spec.identifier,
            None if spec.payload is None else json.dumps(spec.payload),
            spec.queue_name,
            spec.run_at,
            spec.max_attempts,
            spec.job_key,
            spec.priority,
            None if spec.flags is None else list(spec.flags),
        ]
        if mode == DEFAULT_MODE:
            raw = self._exec("fused", self.sql.add_job, *args)
        else:
            raw = self._exec("fused", self.sql.add_job_mode, *args, mode)
        valid = (DEFAULT_MODE, None, "replace", "preserve_run_at", "unsafe_dedupe")
        if spec.job_key is not None and mode not in valid:
            self._expect_error(step, raw, "GWBKM")
            return
        self._no_error(step, raw)
        assert raw.now is not None
        now = raw.now
        new_names = self.model.ensure_names([spec])
        if spec.job_key is not None and mode == "unsafe_dedupe":
            outcome = self.model.add_job_unsafe_dedupe(spec, now)
        else:
            outcome = self.model.add_jobs([spec], mode == "preserve_run_at", now)
        db = parse_snapshot(raw.snapshot)
        rows = self._returned_rows(db, raw.value)
        new_ids = self._apply_inserts(step, outcome, rows, now)
        self._verify(step, raw, notify=outcome.notify, new_names=new_names)
        self._check_returned(step, rows, [self.model.jobs[i] for i in [*outcome.updated, *new_ids]])

    @initialize(templates=st.lists(job_templates(), min_size=2, max_size=6))
    def seed_jobs(self, templates: list[JobTemplate]) -> None:
        """Every example starts with a few jobs (added with ``add_jobs``)."""
        self.add_jobs(templates, preserve_run_at=False)

    @rule(
        templates=st.lists(job_templates(), max_size=4),
        preserve_run_at=st.booleans(),
    )
    def add_jobs(self, templates: list[JobTemplate], preserve_run_at: bool) -> None:
        """``add_jobs`` with 0..4 specs (duplicate keys must raise 21000)."""
        specs = [t.at(self.model.clock) for t in templates]
        step = f"add_jobs(preserve_run_at={preserve_run_at})"
        payload = json.dumps([spec_json(s) for s in specs])
        raw = self._exec("fused", self.sql.add_jobs, payload, preserve_run_at)
        keys = [s.job_key for s in specs if s.job_key is not None]
        if len(keys) != len(set(keys)):
            self._expect_error(step, raw, "21000")
            return
        self._no_error(step, raw)
        assert raw.now is not None
        new_names = self.model.ensure_names(specs)
        outcome = self.model.add_jobs(specs, preserve_run_at, raw.now)
        db = parse_snapshot(raw.snapshot)
        rows = self._returned_rows(db, raw.value)
        new_ids = self._apply_inserts(step, outcome, rows, raw.now)
        self._verify(step, raw, notify=outcome.notify, new_names=new_names)
        self._check_returned(step, rows, [self.model.jobs[i] for i in [*outcome.updated, *new_ids]])

    @rule(key=job_keys())
    def remove_job(self, key: str | None) -> None:
        """``remove_job``: delete an unlocked or stale keyed job, retire a locked one."""
        step = f"remove_job({key!r})"
        raw = self._exec("fused", self.sql.remove_job, key)
        self._no_error(step, raw)
        assert raw.now is not None
        job, notify = self.model.remove_job(key, raw.now)
        snapshot = clone(job) if job is not None else None
        db = self._verify(step, raw, notify=notify)
        self._check_returned(
            step, self._returned_rows(db, raw.value), [snapshot] if snapshot else []
        )

    def _ids(self, picks: Sequence[int]) -> list[int]:
        known = self.model.job_ids()
        missing = max(known, default=0) + 1000
        return choose(picks, [*known, missing])

    @precondition(lambda self: self.model.jobs)
    @rule(picks=ADMIN_PICK)
    def complete_jobs(self, picks: list[int]) -> None:
        """``complete_jobs`` on a mix of jobs in every state, and an unknown id."""
        ids = self._ids(picks)
        step = f"complete_jobs({ids})"
        raw = self._exec("fused", self.sql.complete_jobs, ids)
        self._no_error(step, raw)
        assert raw.now is not None
        done = self.model.complete_jobs(ids, raw.now)
        db = self._verify(step, raw)
        self._check_returned(step, self._returned_rows(db, raw.value), done)

    @precondition(lambda self: self.model.jobs)
    @rule(picks=ADMIN_PICK, message=st.none() | st.sampled_from(["boom", ""]))
    def permanently_fail_jobs(self, picks: list[int], message: str | None) -> None:
        """``permanently_fail_jobs`` (with and without a message)."""
        ids = self._ids(picks)
        step = f"permanently_fail_jobs({ids}, {message!r})"
        raw = self._exec("fused", self.sql.permanently_fail_jobs, ids, message)
        self._no_error(step, raw)
        assert raw.now is not None
        hit = self.model.permanently_fail_jobs(ids, message, raw.now)
        db = self._verify(step, raw)
        self._check_returned(step, self._returned_rows(db, raw.value), hit)

    @precondition(lambda self: self.model.jobs)
    @rule(
        picks=ADMIN_PICK,
        offset=run_at_offsets(),
        priority=priorities(),
        attempts=st.none() | st.integers(0, 5),
        max_attempts=max_attempts_values(),
    )
    def reschedule_jobs(
        self,
        picks: list[int],
        offset: timedelta | None,
        priority: int | None,
        attempts: int | None,
        max_attempts: int | None,
    ) -> None:
        """``reschedule_jobs``: each non-NULL argument replaces its column (may revive a job)."""
        ids = self._ids(picks)
        run_at = None if offset is None else self.model.clock + offset
        step = (
            f"reschedule_jobs({ids}, run_at={run_at}, priority={priority}, "
            f"attempts={attempts}, max_attempts={max_attempts})"
        )
        raw = self._exec(
            "fused", self.sql.reschedule_jobs, ids, run_at, priority, attempts, max_attempts
        )
        self._no_error(step, raw)
        assert raw.now is not None
        hit = self.model.reschedule_jobs(ids, run_at, priority, attempts, max_attempts, raw.now)
        db = self._verify(step, raw)
        self._check_returned(step, self._returned_rows(db, raw.value), hit)

    @precondition(lambda self: any(p.held for p in self.model.pools) or self.model.dead_pool_ids)
    @rule(picks=PICK1)
    def force_unlock_workers(self, picks: list[int]) -> None:
        """``force_unlock_workers`` with live, dead and unknown pool ids (the pools restart)."""
        candidates = (
            [p.pool_id for p in self.model.pools] + self.model.dead_pool_ids[-3:] + ["pool-unknown"]
        )
        ids = choose(picks, candidates)
        step = f"force_unlock_workers({ids})"
        raw = self._exec("fused", self.sql.force_unlock_workers, ids)
        self._no_error(step, raw)
        self.model.force_unlock_workers(ids)
        self._verify(step, raw)
