"""The running event loop, without a system call per lookup on Python 3.10 and 3.11.

Before 3.12, :func:`asyncio.get_running_loop` compares the pid the loop was
started in with ``getpid()`` on every call (so that a forked child does not
use its parent's loop), and current glibc no longer caches the pid: each
lookup is a real system call. Per-message paths look the loop up once per
message or per waiting receiver (a fan-out round to 1,000 receivers did 1,000
of them), so they use :func:`running_loop`, which remembers the last loop found
in the thread and checks, without a system call, that it still runs. A fork
forgets it. On 3.12+ the loop is kept in the thread state and looked up without
a system call, so :func:`running_loop` is :func:`asyncio.get_running_loop` itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

__all__ = ["running_loop"]


class _Remembered(threading.local):
    # Per thread: each thread runs its own loop (Starlette's TestClient runs one in a thread).
    loop: asyncio.AbstractEventLoop | None = None


_remembered = _Remembered()


def _running_loop_remembered() -> asyncio.AbstractEventLoop:
    """The running loop of this thread; raises ``RuntimeError`` when none runs (as asyncio's)."""
    loop = _remembered.loop
    # A loop runs in one thread at a time, so the loop this thread last found still running is
    # the one running here: a loop that stopped (a test client's, a finished asyncio.run())
    # reports so, and the next lookup asks asyncio again.
    if loop is not None and loop.is_running():
        return loop
    loop = _remembered.loop = asyncio.get_running_loop()
    return loop


def _forget() -> None:
    # A forked child holds a copy of its parent's loop that still says it is running.
    _remembered.loop = None


if sys.version_info >= (3, 12):
    running_loop = asyncio.get_running_loop
else:
    running_loop = _running_loop_remembered
    os.register_at_fork(after_in_child=_forget)
