"""Waiting with a time limit without ``asyncio.wait_for``.

Before Python 3.12, ``asyncio.wait_for`` can swallow a cancellation of the
caller that arrives together with the awaited result, and a layer's
``close()`` and every WebSocket disconnect rely on cancellation. Backends
therefore bound waits with these helpers instead.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi_websockets._running_loop import running_loop

__all__ = ["LazyBound", "LazyDeadline", "bounded", "reply_within", "wait_event", "within"]

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; return whether it was set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
    return event.is_set()


async def within(
    awaitable: Awaitable[T],
    timeout: float,
    on_timeout: Callable[[], BaseException],
    stop: asyncio.Future[BaseException] | None = None,
) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds, else cancel it and raise ``on_timeout()``.

    ``stop``, if given, ends the wait early: once it holds an exception, the
    operation is cancelled (and unwound) and that exception raised (a login the
    server refused while the driver would go on retrying, say). A cancellation
    of the caller cancels the inner operation and propagates.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait(
            (task,) if stop is None else (task, stop), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task not in done:
        task.cancel()
        # Wait for the operation to unwind (a driver cleaning up its connection);
        # whatever it raises while doing so is superseded by the timeout.
        await asyncio.wait((task,))
        if stop is not None and stop.done():
            raise stop.result()
        if not task.cancelled() and task.exception() is None:
            return task.result()  # it finished as it was being cancelled
        raise on_timeout()
    return task.result()


async def bounded(awaitable: Awaitable[T], timeout: float, on_timeout: Callable[[], BaseException]) -> T:
    """:func:`within` without its task where Python has ``asyncio.timeout`` (3.11+).

    For a path taken once per broker write: the awaitable runs in the caller's
    task and is cancelled there past ``timeout``, then ``on_timeout()`` is raised.
    """
    if sys.version_info < (3, 11):
        return await within(awaitable, timeout, on_timeout)
    # timeout_at(): asyncio.timeout() would look the loop up once more (see running_loop).
    scope = asyncio.timeout_at(running_loop().time() + timeout)
    try:
        async with scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            raise on_timeout() from None
        raise


class LazyDeadline:
    """One timer for operations that run one after another, each bounded by ``timeout``.

    Arming a timer per operation and cancelling it costs a timer handle, a heap push,
    a cancel and the loop's purge of cancelled handles each. Here :meth:`begin`
    arms the timer only when none is pending; when it fires it calls :meth:`expire`
    if the operation running began ``timeout`` seconds ago or more, re-arms itself
    for that operation if it began later, and stays unarmed while none runs (an idle
    owner has no timer). Subclasses say in :meth:`expire` how to end the operation.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: Loop time the running operation began at; None while none runs.
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """An operation starts now (on ``loop``, the running loop)."""
        since = self._since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(since + self.timeout, self._check, loop)

    def end(self) -> None:
        """The running operation is over."""
        self._since = None

    def cancel(self) -> None:
        """Drop the timer (the owner is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def expire(self) -> None:
        """End the running operation: it began ``timeout`` seconds ago or more."""
        raise NotImplementedError

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        since = self._since
        if since is None:
            return  # nothing runs: armed again by the next operation
        if loop.time() >= since + self.timeout:
            self.expire()
        else:
            self._timer = loop.call_at(since + self.timeout, self._check, loop)


class LazyBound(LazyDeadline):
    """:func:`bounded` for one task's awaits, one after another, with one timer for all of them.

    For a task that runs a broker exchange after another (a writer): ``asyncio.timeout``
    arms a timer and cancels it per await, which cost a lone send about as much as
    a tenth of its own send path. Here the timer is armed only when none is pending;
    when it fires it cancels the await still running if that began ``timeout``
    seconds ago, re-arms itself for the one running now if it began later, and
    stays unarmed while no await runs (an idle layer has no timer). An await that
    outlives ``timeout`` raises ``on_timeout()``, as with :func:`bounded`; a
    cancellation of the task from elsewhere propagates. Only one await at a time.
    """

    def __init__(self, timeout: float, on_timeout: Callable[[], BaseException]) -> None:
        super().__init__(timeout)
        self._on_timeout = on_timeout
        self._task: asyncio.Task[object] | None = None
        #: Whether the timer cancelled the running await.
        self._expired = False

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` in the current task for at most ``timeout`` seconds."""
        if sys.version_info < (3, 11):  # no Task.uncancel: a task of its own per await
            return await within(awaitable, self.timeout, self._on_timeout)
        loop = running_loop()
        task = self._task = asyncio.current_task(loop)
        assert task is not None
        self.begin(loop)
        ours = False
        try:
            return await awaitable
        except asyncio.CancelledError:
            ours = self._expired
            # Cancelled by the timer alone: a timeout; cancelled from elsewhere too: propagate.
            if ours and task.uncancel() == 0:
                raise self._on_timeout() from None
            raise
        finally:
            self._since = None
            if self._expired and not ours:
                task.uncancel()  # the awaitable swallowed the timer's cancellation
            self._expired = False

    def expire(self) -> None:
        """Cancel the running await (``run`` turns that into ``on_timeout()``)."""
        assert self._task is not None
        self._expired = True
        self._task.cancel()


async def reply_within(fut: asyncio.Future[T], timeout: float, on_timeout: Callable[[], BaseException]) -> T:
    """Await ``fut``, a reply slot another task settles, for at most ``timeout`` seconds.

    Past the timeout ``fut`` is failed with ``on_timeout()`` (so whoever settles it
    later sees it done and skips it), and that error is raised. For the path every
    broker command takes: a timer instead of :func:`within`'s task and
    ``asyncio.wait`` halves the cost, and failing the future rather than
    cancelling it keeps a cancellation of the caller (which cancels ``fut`` and
    propagates) apart from the timeout.
    """
    handle = running_loop().call_later(timeout, _fail, fut, on_timeout)
    try:
        return await fut
    finally:
        handle.cancel()


def _fail(fut: asyncio.Future[T], on_timeout: Callable[[], BaseException]) -> None:
    if not fut.done():
        fut.set_exception(on_timeout())
