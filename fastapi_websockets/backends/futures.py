"""Settling the futures that backends hand to callers waiting for a broker's reply, and waiting for many."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import TypeVar

__all__ = ["settle", "settle_all", "wait_all"]

T = TypeVar("T")


def settle(fut: asyncio.Future[T] | None, outcome: T | BaseException) -> None:
    """Give ``fut`` the result ``outcome``, or raise it there if it is an exception.

    A future already done is left alone: its waiter gave up (cancelling it), or
    another path settled it first (a reply arriving after a timeout, a close
    failing what a writer was about to settle). ``None`` stands for a change
    nobody waits for, and is skipped too, so writers need no special case.
    """
    if fut is None or fut.done():
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


def settle_all(futs: Iterable[asyncio.Future[T] | None], outcome: T | BaseException) -> None:
    """:func:`settle` every future of ``futs`` with the same ``outcome``."""
    for fut in futs:
        settle(fut, outcome)


async def wait_all(waits: Sequence[Awaitable[object]]) -> None:
    """Await every one of ``waits`` concurrently; once all are done, raise the first failure.

    Unlike a plain :func:`asyncio.gather`, nothing is left running when one fails
    early. Later failures are not raised: each write's own caller (or its log line)
    reports it. The first runs in the caller's task, the others in tasks: so the
    first starts at once, not a loop turn later (a broker write it queues goes
    out on the driver's next turn), and the others still start before it waits.
    """
    if len(waits) == 1:
        await waits[0]
        return
    if not waits:
        return
    # Scheduled before the first runs, so they start on the next turn whatever it awaits.
    others = asyncio.gather(*waits[1:], return_exceptions=True)
    failed: BaseException | None = None
    try:
        await waits[0]
    except Exception as exc:
        failed = exc  # raised once the others are done
    except BaseException:
        # Cancelled (or the process is exiting): the others go too, as under gather.
        others.cancel()
        await asyncio.wait((others,))
        raise
    results = await others
    if failed is None:
        failed = next((result for result in results if isinstance(result, BaseException)), None)
    if failed is not None:
        raise failed
