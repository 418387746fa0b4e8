"""Small locking helpers shared by backends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.exceptions import ChannelLayerClosed

__all__ = ["KeyedLocks", "SharedRounds"]

A = TypeVar("A")
R = TypeVar("R")


class _Held:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Hold:
    """``async with`` one key's lock: a class, not a generator context manager.

    Every named send takes one (PostgreSQL, NATS, RabbitMQ): an uncontended
    hold runs 161 bytecodes this way and ran 273 through
    ``contextlib.asynccontextmanager`` and ``async with`` on the lock.
    """

    __slots__ = ("_held", "_key", "_locks")

    def __init__(self, locks: dict[str, _Held], key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        held = self._locks.get(self._key)
        if held is None:
            held = self._locks[self._key] = _Held()
        held.users += 1
        self._held = held
        try:
            await held.lock.acquire()
        except BaseException:  # cancelled while waiting: not a user any more
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._held.lock.release()
        self._leave()

    def _leave(self) -> None:
        held = self._held
        held.users -= 1
        if not held.users:
            del self._locks[self._key]


class KeyedLocks:
    """One asyncio lock per key, kept only while a task holds or waits for it.

    For work that must not overlap per key (a broker resource) while other
    keys go on: memory stays bounded by the keys in use, not by every key seen.
    Waiters get the lock in the order they asked for it (asyncio's lock is FIFO).
    """

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def hold(self, key: str) -> _Hold:
        """Hold the lock of ``key`` (``async with locks.hold(key): ...``)."""
        return _Hold(self._held, key)

    def busy(self, key: str) -> bool:
        """Whether a task holds or waits for the lock of ``key``: a new holder would queue behind it."""
        return key in self._held


class _Round(Generic[A, R]):
    __slots__ = ("args", "call", "future")

    def __init__(self, call: Callable[[list[A]], Awaitable[R]]) -> None:
        self.call = call
        self.args: list[A] = []
        self.future: asyncio.Future[R] = running_loop().create_future()
        # A round every caller gave up on still ends; its error must not be reported as lost.
        self.future.add_done_callback(lambda done: None if done.cancelled() else done.exception())


class SharedRounds(Generic[A, R]):
    """Concurrent calls for one key share one call per round instead of making one each.

    A caller joins the round that has not started yet (or opens one) and gets
    that round's result. Rounds of one key run one after the other, each in a
    task of ``spawn``, so a round starts after every caller in it arrived: it
    sees everything that happened before any of them called, which is what
    makes sharing exact for reads. Cancelling a caller only stops its wait.
    """

    def __init__(
        self, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]], name: str
    ) -> None:
        self._spawn = spawn
        self._name = name
        self._next: dict[str, _Round[A, R]] = {}
        self._running: set[str] = set()

    async def run(self, key: str, arg: A, call: Callable[[list[A]], Awaitable[R]]) -> R:
        """The result of the round of ``key`` that ``arg`` joins; ``call`` runs the round if this opens it."""
        round_ = self._next.get(key)
        if round_ is None:
            round_ = self._next[key] = _Round(call)
        round_.args.append(arg)
        if key not in self._running:
            # Before spawning: an eager task factory runs the round at once.
            self._running.add(key)
            try:
                task = self._spawn(self._drive(key), f"{self._name} of {key}")
            except BaseException:
                self._running.discard(key)
                self._next.pop(key, None)
                raise
            # A task cancelled before it ran never reaches _drive's finally.
            task.add_done_callback(lambda done: self._end(key) if done.cancelled() else None)
        return await asyncio.shield(round_.future)

    async def _drive(self, key: str) -> None:
        try:
            while (round_ := self._next.pop(key, None)) is not None:
                try:
                    result = await round_.call(round_.args)
                except Exception as exc:
                    round_.future.set_exception(exc)
                except BaseException:
                    round_.future.set_exception(ChannelLayerClosed("the channel layer was closed"))
                    raise
                else:
                    round_.future.set_result(result)
        finally:
            self._end(key)

    def _end(self, key: str) -> None:
        self._running.discard(key)
        waiting = self._next.pop(key, None)
        if waiting is not None:
            waiting.future.set_exception(ChannelLayerClosed("the channel layer was closed"))
