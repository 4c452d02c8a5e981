"""Task handlers: :func:`task`, and the checks ``open_worker`` makes of its tasks.

Everything here runs before the pool starts: a handler that cannot be called as the
worker will call it is refused with a :class:`~kongtask.ConfigError` then, rather than
failing each of its jobs later.
"""

from __future__ import annotations

import importlib.util
import inspect
import pickle
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

from .._errors import ConfigError
from .._tasks import TaskDef

Handler: TypeAlias = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A handler with per-task options; made by :func:`task`."""

    handler: Handler
    timeout: float | None = None
    process: bool = False


def task(handler: Handler, *, timeout: float | None = None, process: bool = False) -> TaskSpec:
    """Wrap ``handler`` with per-task options.

    Args:
      handler: ``async def handler(job, ctx)`` or a plain function (run in a thread).
      timeout: seconds; an async handler still running then is cancelled and the job
        fails with ``"timed out after N s"`` (and retries). A plain function in a thread
        cannot be interrupted: it is failed the same way when it returns late.
      process: run a CPU-bound plain function ``handler(job)`` in a worker process
        instead of a thread (needs ``pip install 'kongtask[parallel]'``: trio-parallel).
        It gets the job only (a :class:`JobContext` holds connections and cannot cross
        processes), must be importable by name (a module-level function: it is pickled),
        and its exception or return value must be picklable. As many run at once as the
        machine has CPUs; a timeout or a shutdown past its grace kills the process.

    Example::

        tasks = {"resize": kongtask.task(resize, timeout=30, process=True)}
    """
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if isinstance(handler, TaskSpec):
        return task(
            handler.handler,
            timeout=timeout if timeout is not None else handler.timeout,
            process=process or handler.process,
        )
    if not callable(handler):
        raise ConfigError(f"a task handler must be callable, not {type(handler).__name__}")
    if process:
        _check_process_handler(handler)
    return TaskSpec(handler, timeout, process)


def _check_process_handler(handler: Handler) -> None:
    name = getattr(handler, "__qualname__", repr(handler))
    if importlib.util.find_spec("trio_parallel") is None:
        raise ConfigError(
            f"{name}: process=True needs trio-parallel (pip install 'kongtask[parallel]')"
        )
    if is_async_callable(handler):
        raise ConfigError(f"{name}: process=True takes a plain function, not an async one")
    try:
        pickle.dumps(handler)
    except Exception as exc:
        raise ConfigError(
            f"{name}: process=True needs a handler importable by name (a module-level "
            f"function), and this one cannot be pickled: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class Runner:
    """How the worker calls one task's handler."""

    fn: Handler
    is_async: bool
    timeout: float | None
    in_process: bool = False


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine (through ``functools.partial`` too)."""
    while hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (an object with async __call__)
    )


def runners_of(
    tasks: Mapping[str, Handler | TaskSpec] | Iterable[TaskDef[Any]],
) -> dict[str, Runner]:
    """``open_worker``'s tasks, checked: ``identifier -> Runner``."""
    if not isinstance(tasks, Mapping):
        tasks = _handlers_of(tasks)
    runners: dict[str, Runner] = {}
    for name, value in tasks.items():
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ConfigError(f"task identifier {name!r} must be a string of 1 to 128 characters")
        spec = value if isinstance(value, TaskSpec) else task(value)
        _check_signature(name, spec.handler, 1 if spec.process else 2)
        runners[name] = Runner(
            spec.handler, is_async_callable(spec.handler), spec.timeout, spec.process
        )
    return runners


def _check_signature(name: str, handler: Handler, arguments: int = 2) -> None:
    """Refuse a handler that cannot be called as ``handler(job, ctx)`` (``handler(job)``
    for a process handler: ``arguments=1``).

    Every job of such a task would fail with a ``TypeError`` only once it runs; this says
    so when the pool starts. A callable whose signature Python cannot tell (some builtins
    and extension types) is accepted.
    """
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*[None] * arguments)
    except TypeError as exc:
        call = "handler(job, ctx)" if arguments == 2 else "handler(job)"
        raise ConfigError(
            f"task {name!r}: the handler {getattr(handler, '__qualname__', handler)!r} cannot "
            f"be called as {call}: {exc}"
        ) from None


def _handlers_of(definitions: object) -> dict[str, TaskSpec]:
    """``open_worker``'s tasks given as :class:`TaskDef` items with handlers."""
    if isinstance(definitions, str | bytes) or not isinstance(definitions, Iterable):
        raise ConfigError("tasks must be a mapping of task identifier -> handler")
    handlers: dict[str, TaskSpec] = {}
    for item in definitions:
        if not isinstance(item, TaskDef):
            raise ConfigError(
                "tasks must be a mapping of task identifier -> handler, or TaskDef items, "
                f"not {type(item).__name__}"
            )
        if item.handler is None:
            raise ConfigError(
                f"task {item.identifier!r} has no handler: pass def.with_handler(handler)"
            )
        if item.identifier in handlers:
            raise ConfigError(f"task {item.identifier!r} is defined twice")
        handlers[item.identifier] = task(item.handler, timeout=item.timeout)
    return handlers


@asynccontextmanager
async def open_processes(runners: Mapping[str, Runner]) -> AsyncIterator[Any]:
    """trio-parallel's worker processes when a task runs in one, else ``None``; they end
    with the pool."""
    if not any(runner.in_process for runner in runners.values()):
        yield None
        return
    import trio_parallel  # type: ignore[import-untyped,import-not-found,unused-ignore]

    async with trio_parallel.open_worker_context() as context:
        yield context
