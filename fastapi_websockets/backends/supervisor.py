"""Background tasks of a layer: spawned with a name, watched, restarted, and stopped on close.

A backend starts every long-lived task (an inbox reader, a listener, a
named-channel reader, a writer) through its layer's :class:`TaskSupervisor`,
so that no task is ever forgotten: an unexpected death is logged with its
traceback, a task started with :meth:`TaskSupervisor.keep_running` is started
again with backoff instead of leaving the process connected but deaf, and
:meth:`TaskSupervisor.close` cancels and awaits them all within a bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.backoff import Backoff
from fastapi_websockets.exceptions import ChannelLayerClosed

__all__ = ["TaskSupervisor"]

logger = logging.getLogger("fastapi_websockets.tasks")

T = TypeVar("T")

#: Seconds a kept task must have run before it failed for the failure to count as a new streak.
_HEALTHY_RUN = 30.0


class TaskSupervisor:
    """The owner of one layer's background tasks.

    ``name`` prefixes every task name (``"fastapi_websockets.redis"``), so a
    log line or a task dump says which backend a task belongs to.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        #: Tasks that ended with an unexpected exception, for ``layer.stats``.
        self.failures = 0
        #: Restarts of tasks started with :meth:`keep_running`.
        self.restarts = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str, *, awaited: bool = False) -> asyncio.Task[T]:
        """Run ``coro`` as a tracked task named ``{self.name}.{name}``.

        An exception other than a cancellation (or ``ChannelLayerClosed`` while
        closing) is logged with its traceback when the task ends. With
        ``awaited``, the task is one a caller awaits (through ``asyncio.shield``,
        so that cancelling the caller does not cancel a broker call half way):
        the caller gets its exception, so it is only logged at DEBUG.
        """
        if self._closing:
            coro.close()
            raise ChannelLayerClosed("the channel layer was closed")
        task = running_loop().create_task(coro, name=f"{self.name}.{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done_awaited if awaited else self._done)
        return task

    def keep_running(
        self,
        factory: Callable[[], Coroutine[Any, Any, None]],
        name: str,
        *,
        on_give_up: Callable[[BaseException], None] | None = None,
        max_failures: int | None = None,
        backoff: Backoff | None = None,
    ) -> asyncio.Task[None]:
        """Run ``factory()`` until the layer closes, starting it again with backoff if it fails.

        A task that returns normally is done. One that raises is logged and
        started again after a backoff delay; after ``max_failures`` failures in a
        row (never, by default) ``on_give_up`` is called with the last error, so
        the layer can fail loudly rather than stay connected and deaf. A run
        that lasted ``_HEALTHY_RUN`` seconds or more before failing counts as a
        success: the count and the delay start over.
        """
        policy = backoff or Backoff()

        async def run() -> None:
            failures = 0
            while True:
                started = time.monotonic()
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except ChannelLayerClosed:
                    if self._closing:
                        return
                    raise
                except Exception as exc:
                    if self._closing:
                        return
                    if time.monotonic() - started >= _HEALTHY_RUN:
                        failures = 0
                        policy.reset()
                    failures += 1
                    self.failures += 1
                    if max_failures is not None and failures >= max_failures:
                        logger.error(
                            "background task %s.%s failed %d times in a row; giving up",
                            self.name,
                            name,
                            failures,
                            exc_info=exc,
                        )
                        if on_give_up is not None:
                            on_give_up(exc)
                        return
                    delay = policy.next()
                    logger.error(
                        "background task %s.%s failed; restarting it in %.2f s",
                        self.name,
                        name,
                        delay,
                        exc_info=exc,
                    )
                    self.restarts += 1
                    await asyncio.sleep(delay)

        return self.spawn(run(), name)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or (isinstance(exc, ChannelLayerClosed) and self._closing):
            return
        self.failures += 1
        logger.error("background task %s failed", task.get_name(), exc_info=exc)

    def _done_awaited(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("task %s failed: %r", task.get_name(), task.exception())

    async def close(
        self, timeout: float = 5.0, *, unblock: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        """Cancel every task and wait for them, at most ``timeout`` seconds.

        Some drivers swallow a cancellation that lands while they open a
        connection; ``unblock`` (closing the driver's sockets, say) is awaited
        when tasks are still running after a first short wait, and they are
        cancelled again. A task that still does not stop is logged.
        """
        self._closing = True
        pending = await self._cancel_all(min(1.0, timeout))
        if pending and unblock is not None:
            await unblock()
            pending = await self._cancel_all(timeout)
        for task in pending:
            logger.error("background task %s did not stop on close", task.get_name())

    async def _cancel_all(self, timeout: float) -> set[asyncio.Task[Any]]:
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return set()
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return pending
