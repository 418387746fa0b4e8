"""Start a task whose first step runs right away (Python 3.12+), without nesting.

A group message reaches every local consumer through a callback
(``layer.listen()``), and a consumer's handler almost never waits: the socket
write under it returns at once unless the client reads too slowly. On Python
3.12+ the handler's task is created with ``eager_start=True``: it runs inside
the delivery until it finishes or waits, so a handler that does not wait costs
no loop turn and no scheduling, while it still is a task of its own
(``asyncio.current_task()``, ``asyncio.timeout()`` and anyio's cancel scopes
see that task, not the deliverer's). Python 3.10 and 3.11 have no eager tasks:
there the task is scheduled as usual. (Running the coroutine by hand inside
the deliverer's task would save the task, but any code that binds to the
current task, ``asyncio.timeout()`` first, would then act on the deliverer.)

Eager starts do not nest: a delivery made from inside an eager step (a handler
sending to another consumer in the same process) schedules its task, so a chain
of consumers relaying to each other cannot grow the stack.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from collections.abc import Coroutine
from typing import Any

__all__ = ["EAGER_TASKS", "start_task"]

#: Whether this Python can start a task eagerly (3.12+).
EAGER_TASKS = sys.version_info >= (3, 12)


class _Depth(threading.local):
    # Per thread: each thread runs its own event loop (Starlette's TestClient runs one).
    stepping = False


_depth = _Depth()


def start_task(
    coro: Coroutine[Any, Any, None],
    context: contextvars.Context,
    *,
    eager: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[None]:
    """A task running ``coro`` in ``context``; on Python 3.12+ its first step runs before this returns.

    Must be called with an event loop running: ``loop``, when the caller
    knows it (it is then not looked up). With ``eager=False``, on Python
    before 3.12, or inside another eager first step, the task is only scheduled.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):
        if eager and not _depth.stepping:
            _depth.stepping = True
            try:
                return asyncio.Task(coro, loop=loop, context=context, eager_start=True)
            finally:
                _depth.stepping = False
    if sys.version_info >= (3, 11):
        return loop.create_task(coro, context=context)
    return context.run(loop.create_task, coro)  # pragma: no cover - Python 3.10
