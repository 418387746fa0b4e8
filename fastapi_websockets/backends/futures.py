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
    reports it.
    """
    if len(waits) == 1:
        await waits[0]
    elif waits:
        results = await asyncio.gather(*waits, return_exceptions=True)
        failed = next((result for result in results if isinstance(result, BaseException)), None)
        if failed is not None:
            raise failed
