"""Small locking helpers shared by backends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.futures import wait_all
from fastapi_websockets.exceptions import ChannelLayerClosed

__all__ = ["KeyedLocks", "KeyedTurns", "SharedRounds", "Turn"]

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


#: Makes the coroutines of one call's step (see :meth:`Turn.place`).
Step = Callable[[], Sequence[Coroutine[Any, Any, object]]]


def _nothing() -> bool:
    return False


class Turn:
    """One call's place among the calls of one key of :class:`KeyedTurns` (see there)."""

    __slots__ = ("_before", "_begun", "_blocked", "_key", "_next", "_step", "_tag", "_turns")

    def __init__(self, turns: dict[str, Turn], key: str) -> None:
        previous = turns.get(key)
        self._turns = turns
        self._key = key
        #: An earlier turn has not begun its step, or its tasks have not started yet.
        self._blocked = previous is not None
        self._before = previous._tag if previous is not None else None
        self._tag: object = None
        self._begun = False
        #: Begins this turn's step from the turn before (its tasks queued: True).
        self._step: Callable[[], bool] | None = None
        self._next: Turn | None = None
        if previous is not None:
            previous._next = self
        turns[key] = self

    def joins(self, tag: object) -> bool:
        """Whether this call may write what ``tag`` stands for at once, outside its turn.

        Call it right after :meth:`KeyedTurns.take`, before any other turn of the
        key is taken. True when every earlier turn has begun its step,
        or when the turn just before joined with this same ``tag`` (the same
        object: then every earlier turn still waiting did); the call's writes
        must then go where the earlier turns' steps write nothing. The turns
        after this one may then join with ``tag`` too.
        """
        if self._blocked and (tag is None or tag is not self._before):
            return False
        self._tag = tag
        return True

    async def place(self, make: Step) -> None:
        """Start the coroutines ``make()`` returns once every earlier turn has begun its step; await them.

        Those of each turn start in the order given, and per key in turn order:
        the first in this task and at once when no earlier turn waits, the others
        in tasks made before any later turn's. Each is expected to write
        before its first await (a publish, a lock queued for), so writes to one
        destination follow call order. ``make`` runs once, from the turn before
        when that begins later; it must not await. Raises the first failure
        once all are done (:func:`~fastapi_websockets.backends.futures.wait_all`).
        """
        if not self._blocked:
            coros = make()
            self._begun = True
            if len(coros) < 2:  # the usual case: one owner, or none new to this call
                self._hand_on(False)
                if coros:
                    await coros[0]
                return
            tasks = [asyncio.ensure_future(coro) for coro in coros[1:]]
            self._hand_on(True)
            await wait_all([coros[0], *tasks])
            return
        placed: asyncio.Future[None] = running_loop().create_future()
        started: list[asyncio.Future[object]] = []

        def begin() -> bool:
            started.extend(asyncio.ensure_future(coro) for coro in make())
            if not placed.done():  # cancelled with its waiter
                placed.set_result(None)
            return bool(started)

        self._step = begin
        try:
            await placed
        except BaseException:
            self.end()
            for task in started:
                task.cancel()
            raise
        await wait_all(started)

    def end(self) -> None:
        """End the turn without a step (the call failed or was cancelled); a no-op once its step began.

        The turns after it still wait for those before it.
        """
        if self._begun:
            return
        if self._blocked:
            self._step = _nothing
            return
        self._begun = True
        self._hand_on(False)

    def _hand_on(self, queued: bool) -> None:
        """Begin the steps that waited for this turn; then let the next turn begin its own.

        ``queued``: tasks of a step were made. They start on the loop's next
        pass, in the order made, so a turn that begins in its own task (its
        first write made at once) is let go only after them: from a callback
        scheduled now, which the loop runs after their first steps.
        """
        turn = self
        while True:
            after = turn._next
            step = after._step if after is not None else None
            if step is None:
                if queued:
                    running_loop().call_soon(turn._hand_on, False)
                elif after is not None:
                    after._blocked = False
                elif self._turns.get(self._key) is turn:
                    del self._turns[self._key]
                return
            assert after is not None  # a step is only ever set on a turn that exists
            after._step = None
            after._begun = True
            queued = step() or queued
            turn = after


class KeyedTurns:
    """Calls for one key write in the order they were made, each preparing meanwhile.

    Unlike a lock held from the call on, a call takes its turn at once
    (:meth:`take`, no await) and prepares (a listing from the broker) at the
    same time as the others; only its step, the writes whose order the broker
    keeps, waits for the turns taken before (:meth:`Turn.place`). A call
    already waiting when the turn before it begins has its step begun in the
    same go, without its task being woken first. Memory stays bounded by the
    keys with a turn running.
    """

    def __init__(self) -> None:
        self._turns: dict[str, Turn] = {}

    def take(self, key: str) -> Turn:
        """This call's turn for ``key``, after every turn taken before; end it in a ``finally``."""
        return Turn(self._turns, key)


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
