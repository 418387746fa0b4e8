"""Run a coroutine's first step right away; only if it has to wait does it become a task.

A group message reaches every local consumer through a callback
(``layer.listen()``), and a consumer's handler almost never waits: the socket
write under it returns at once unless the client reads too slowly. Creating,
scheduling and finishing a task per consumer per group message cost more than
the handler itself here. So the handler's coroutine is started inside the
delivery, in the connection's context, and a task is created only when it
suspends; the task then goes on exactly where the coroutine stopped
(asyncio 3.12's ``eager_start``, which Python 3.10 and 3.11 lack).

Eager steps do not nest: a delivery made from inside an eager step (a handler
sending to another consumer in the same process) schedules a task, so a chain of
consumers relaying to each other cannot grow the stack.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import sys
import threading
from collections.abc import Coroutine, Generator
from types import CodeType, FrameType
from typing import Any, TypeVar

__all__ = ["start_eagerly"]

T = TypeVar("T")

_NOTHING: Any = object()


class _Depth(threading.local):
    # Per thread: each thread runs its own event loop (Starlette's TestClient runs one).
    stepping = False


_depth = _Depth()


class _Resumed(collections.abc.Coroutine[Any, Any, T]):
    """A started coroutine, handed to a task: its first ``send`` returns what the coroutine awaits.

    The task then waits for that future as if the coroutine had yielded it to
    the task itself; a cancellation arriving before the task's first step is
    thrown into the coroutine where it waits, so its ``finally`` blocks run.
    """

    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def send(self, value: Any) -> Any:
        waiting = self._waiting
        if waiting is not _NOTHING:
            self._waiting = _NOTHING
            return waiting
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._waiting = _NOTHING
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover - the old signature, unused by asyncio

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:  # pragma: no cover - tasks call send/throw
        raise TypeError("a resumed coroutine is run by its task, not awaited")

    # Task introspection (get_stack(), repr) reads these.
    @property
    def cr_frame(self) -> FrameType | None:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_code(self) -> CodeType | None:
        return getattr(self._coro, "cr_code", None)


def start_eagerly(
    coro: Coroutine[Any, Any, None], context: contextvars.Context, *, eager: bool = True
) -> asyncio.Task[None] | None:
    """Run ``coro`` in ``context`` until it finishes or waits; return the task it goes on in, or None.

    Must be called with an event loop running. A coroutine that finished
    returns None: its result and a ``CancelledError`` it raised are dropped
    (as a task's would be that nobody awaits), other exceptions propagate to
    the caller, so ``coro`` should handle its own. With ``eager=False``, or
    inside another eager step, the coroutine is scheduled as a task from the start.
    """
    loop = asyncio.get_running_loop()
    if _depth.stepping or not eager:
        return _task(loop, coro, context)
    _depth.stepping = True
    try:
        waiting = context.run(coro.send, None)
    except StopIteration:
        return None
    except asyncio.CancelledError:
        return None
    finally:
        _depth.stepping = False
    return _task(loop, _Resumed(coro, waiting), context)


def _task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], context: contextvars.Context
) -> asyncio.Task[None]:
    if sys.version_info >= (3, 11):
        return loop.create_task(coro, context=context)
    return context.run(loop.create_task, coro)  # pragma: no cover - Python 3.10
