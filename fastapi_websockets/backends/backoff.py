"""The one retry and reconnect delay policy shared by every broker backend.

Every loop that waits before trying a broker again (a reader reconnecting, a
send retried until its timeout, a named-channel reader that lost its consumer)
uses :class:`Backoff`, so all backends back off the same way: exponential from
``first`` to ``cap`` seconds, with a random spread of ``jitter`` so that many
processes that lost the same broker do not come back in lockstep.

It is hand-written rather than taken from a retry library because our loops
need a delay that an :class:`asyncio.Event` can cut short (new work arrived,
the layer closes), not a decorator that owns the loop.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from fastapi_websockets.backends.timeouts import wait_event

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Exponential delays from ``first`` to ``cap`` seconds, spread by +/- ``jitter`` (a fraction).

    :meth:`next` returns the delay to wait now and doubles the following one;
    :meth:`reset` starts over after a success.
    """

    first: float = 0.05
    cap: float = 2.0
    jitter: float = 0.2
    _current: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"Backoff needs 0 < first <= cap, got first={self.first} cap={self.cap}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Backoff jitter must be in [0, 1), got {self.jitter}")
        self._current = self.first

    def next(self) -> float:
        """The delay to wait before the next attempt (seconds)."""
        delay = self._current
        self._current = min(self._current * 2, self.cap)
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return delay

    def reset(self) -> None:
        """Start again from ``first`` (call after an attempt succeeded)."""
        self._current = self.first

    async def sleep(self, wake: asyncio.Event | None = None) -> None:
        """Wait the next delay, or less if ``wake`` is set meanwhile."""
        delay = self.next()
        if wake is None:
            await asyncio.sleep(delay)
        else:
            await wait_event(wake, delay)
