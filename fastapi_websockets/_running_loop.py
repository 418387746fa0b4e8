"""The running event loop, without a system call per lookup on Python 3.10 and 3.11.

Before 3.12, :func:`asyncio.get_running_loop` compares the pid the loop was
started in with ``getpid()`` on every call (so that a forked child does not
use its parent's loop), and current glibc no longer caches the pid: each
lookup is a real system call. Per-message paths look the loop up once per
message or per waiting receiver (a fan-out round to 1,000 receivers did 1,000
of them), so they use :func:`running_loop`, which remembers the last loop found
in the thread and checks, without a system call, that it still runs in this
thread (asyncio's loops record their thread; of others, such as uvloop's, only
that they still run). A fork forgets it. On 3.12+ the loop is kept in the
thread state and looked up without a system call, so :func:`running_loop` is
:func:`asyncio.get_running_loop` itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

__all__ = ["running_loop"]


class _Remembered(threading.local):
    # Per thread: each thread runs its own loop (Starlette's TestClient runs one in a thread).
    # The loop, and this thread's id where the loop records the thread running it (asyncio's
    # own loops do, in ``_thread_id``); None for others (uvloop's). One attribute, one read.
    found: tuple[asyncio.AbstractEventLoop | None, int | None] = (None, None)


_remembered = _Remembered()


def _running_loop_remembered() -> asyncio.AbstractEventLoop:
    """The running loop of this thread; raises ``RuntimeError`` when none runs (as asyncio's)."""
    loop, thread = _remembered.found
    if thread is not None:
        # Set by run_forever() in the thread running it, None once it stops: a loop this
        # thread found, then stopped and restarted in another thread, is not taken for ours.
        if loop._thread_id == thread:  # type: ignore[union-attr]
            return loop  # type: ignore[return-value]
    elif loop is not None and loop.is_running():
        # No record of the thread: a loop runs in one thread at a time, so the loop this
        # thread last found still running is taken for the one running here (wrongly if it
        # was stopped and restarted in another thread meanwhile; see docs/performance/shared-path.md).
        return loop
    loop = asyncio.get_running_loop()
    own = isinstance(loop, asyncio.BaseEventLoop)
    _remembered.found = (loop, threading.get_ident() if own else None)
    return loop


def _forget() -> None:
    # A forked child holds a copy of its parent's loop that still says it is running.
    _remembered.found = (None, None)


if sys.version_info >= (3, 12):
    running_loop = asyncio.get_running_loop
else:
    running_loop = _running_loop_remembered
    os.register_at_fork(after_in_child=_forget)
