"""The receivers waiting on one named channel, served by one reader task.

Every broker backend reads a named channel (a shared work queue) the same way:
receivers never talk to the broker themselves; they wait in a
:class:`WaiterQueue`, and one reader task per channel claims messages from the
broker and hands each to the first receiver still waiting. This is what makes
cancelling a receive safe (and it is cancelled on every WebSocket disconnect):

* a receiver cancelled before it got a message simply leaves the queue, and
  the reader claims nothing for it;
* a receiver cancelled *after* a message was handed to it gives the message
  back (``hand_back``, usually into the layer's local mailbox of the channel),
  so the next receive gets it;
* a message claimed when no receiver waits any more goes the same way.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from fastapi_websockets._running_loop import running_loop

__all__ = ["WaiterQueue"]

T = TypeVar("T")


class WaiterQueue(Generic[T]):
    """Futures of waiting receivers, in arrival order, with a demand event for the reader.

    ``demand`` is set whenever a receiver arrives or leaves, so the reader
    (which waits on it between claims) notices both.
    """

    def __init__(self, hand_back: Callable[[T], object]) -> None:
        self._hand_back = hand_back
        self._waiters: deque[asyncio.Future[T]] = deque()
        self.demand = asyncio.Event()

    def pending(self) -> int:
        """How many receivers wait and have not been given anything yet."""
        return sum(1 for fut in self._waiters if not fut.done())

    def __bool__(self) -> bool:
        return self.pending() > 0

    async def wait(self) -> T:
        """Wait until the reader hands this receiver an item; cancel-safe (see the module doc)."""
        fut: asyncio.Future[T] = running_loop().create_future()
        self._waiters.append(fut)
        self.demand.set()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Another receiver of this queue first; the hand-back only if none waits.
                self.deliver(fut.result())
            raise
        finally:
            # Membership first: a failing deque.remove() formats the future's repr,
            # message included.
            if fut in self._waiters:
                self._waiters.remove(fut)
            self.demand.set()

    def hand_over(self, item: T) -> bool:
        """Give ``item`` to the longest-waiting receiver; False (item untouched) if none waits."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(item)
                return True
        return False

    def deliver(self, item: T) -> None:
        """Give ``item`` to a waiting receiver, or back through ``hand_back`` if none waits."""
        if not self.hand_over(item):
            self._hand_back(item)

    def fail_all(self, exc: BaseException) -> None:
        """Wake every waiting receiver with ``exc`` (the reader stopped for good)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
