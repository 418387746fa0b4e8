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

__all__ = ["bounded", "reply_within", "wait_event", "within"]

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


async def within(awaitable: Awaitable[T], timeout: float, on_timeout: Callable[[], BaseException]) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds, else cancel it and raise ``on_timeout()``.

    A cancellation of the caller cancels the inner operation and propagates.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        # Wait for the operation to unwind (a driver cleaning up its connection);
        # whatever it raises while doing so is superseded by the timeout.
        await asyncio.wait((task,))
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
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            raise on_timeout() from None
        raise


async def reply_within(fut: asyncio.Future[T], timeout: float, on_timeout: Callable[[], BaseException]) -> T:
    """Await ``fut``, a reply slot another task settles, for at most ``timeout`` seconds.

    Past the timeout ``fut`` is failed with ``on_timeout()`` (so whoever settles it
    later sees it done and skips it), and that error is raised. For the path every
    broker command takes: a timer instead of :func:`within`'s task and
    ``asyncio.wait`` halves the cost, and failing the future rather than
    cancelling it keeps a cancellation of the caller (which cancels ``fut`` and
    propagates) apart from the timeout.
    """
    handle = asyncio.get_running_loop().call_later(timeout, _fail, fut, on_timeout)
    try:
        return await fut
    finally:
        handle.cancel()


def _fail(fut: asyncio.Future[T], on_timeout: Callable[[], BaseException]) -> None:
    if not fut.done():
        fut.set_exception(on_timeout())
