"""Lifecycle events for observers (``open_worker(..., on_event=callback)``).

Event names follow graphile-worker's (``pool:create``, ``job:start``, …) so dashboards
and log filters written for one can be pointed at the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

log = logging.getLogger("kongtask.events")

#: Every event name a worker emits.
EVENT_NAMES: Final = frozenset(
    {
        "pool:create",
        "pool:listen:success",
        "pool:listen:error",
        "pool:gracefulShutdown",
        "pool:forcefulShutdown",
        "pool:release",
        "worker:getJob:error",
        "worker:completeJob:error",
        "job:start",
        "job:success",
        "job:error",
        "job:failed",
        "job:complete",
        "job:returned",
        "pool:sweep",
        "stop",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """One lifecycle event: a ``name`` and read-only ``fields``.

    Fields by event (all carry ``pool_id``):

    - ``job:start``, ``job:success``, ``job:complete``: ``job``.
    - ``job:error``: ``job``, ``error`` (the exception), ``message`` (the ``last_error``
      text written to the row).
    - ``job:failed``: ``job``, ``message``; the job used its last attempt.
    - ``job:returned``: ``job_ids``; claimed jobs handed back unstarted.
    - ``pool:listen:error``, ``worker:getJob:error``, ``worker:completeJob:error``:
      ``error``.
    - ``pool:gracefulShutdown``, ``pool:forcefulShutdown``: ``message``.
    - ``pool:sweep``: ``jobs``, ``queues`` (stale locks released).

    Example::

        def on_event(event: kongtask.Event) -> None:
            if event.name == "job:failed":
                alert(event["job"].id, event["message"])
    """

    name: str
    fields: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def __getitem__(self, key: str) -> object:
        return self.fields[key]

    def get(self, key: str, default: object = None) -> object:
        """The field ``key``, or ``default`` when this event has no such field."""
        return self.fields.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)


EventCallback = Callable[[Event], object]


class EventEmitter:
    """Calls the user's callback; an exception in it is logged, never propagated."""

    __slots__ = ("_callback", "_pool_id")

    def __init__(self, callback: EventCallback | None, pool_id: str) -> None:
        self._callback = callback
        self._pool_id = pool_id

    @property
    def enabled(self) -> bool:
        # lets hot paths skip building field dicts when nobody listens
        return self._callback is not None

    def emit(self, name: str, **fields: object) -> None:
        if self._callback is None:
            return
        fields["pool_id"] = self._pool_id
        event = Event(name, MappingProxyType(fields))
        try:
            self._callback(event)
        except Exception:
            # an observer must never take the pool down
            log.exception("on_event callback raised for %s", name)
