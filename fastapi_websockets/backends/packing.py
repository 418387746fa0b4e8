"""Packing concurrent sends to one destination into one broker message.

A broker whose cost is per message, not per byte (RabbitMQ: measured in
docs/performance/rabbitmq.md), carries sixteen concurrent sends
to one process's inbox about as fast as one when they travel as one message.
:class:`Packer` does that for one layer: per destination, the sends made in
one turn of the event loop go out together on the next, from a background
task, alone when there is only one and as one packed message otherwise (a
task whose last send there found nobody to go with sends at once); sends
that arrive while a publish to that destination is unconfirmed wait, in call
order, and go out together on the next turn if fewer than ``in_flight``
publishes are unconfirmed, else when one of them is settled.
:func:`pack` and :func:`unpack` are the packed body: a version byte, then per
frame a 2-byte channel length, a 4-byte payload length (big-endian), the
channel in UTF-8 and the payload.

This module knows no broker: the layer passes the two publish functions.
"""

from __future__ import annotations

import asyncio
import struct
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.futures import settle, settle_all
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelLayerClosed,
    ChannelLayerError,
    MessageTooLarge,
)

__all__ = ["IN_FLIGHT", "MAX_FRAMES", "Packer", "describe", "pack", "sender_error", "unpack"]

#: First byte of a packed body; another value is a format this version cannot read.
PACK_VERSION = 1
#: Unconfirmed publishes per destination (what the layers pass as ``in_flight``): a send
#: waits a loop turn (a lone sender's does not) and goes out packed with the sends of that
#: turn. Two, not one: a packed message gathers while the previous is confirmed (measured on
#: RabbitMQ: 1, 2 and 4 in docs/performance/rabbitmq.md; NATS took the same value).
IN_FLIGHT = 2
#: Most sends one packed message carries (its bytes are bounded by ``max_bytes``).
MAX_FRAMES = 128
_HEADER = struct.Struct(">HI")
_VERSION = bytes((PACK_VERSION,))

#: Publishes one send alone: (destination, channel, payload).
SendOne = Callable[[str, str, bytes], Awaitable[None]]
#: Publishes several sends as one packed message: (destination, [(channel, payload), ...]).
SendMany = Callable[[str, list[tuple[str, bytes]]], Awaitable[None]]
#: Runs a coroutine as a tracked background task; raises once the layer is closing.
Spawn = Callable[[Coroutine[Any, Any, None]], object]
#: The error a queued send raises past the timeout, given its channel.
OnTimeout = Callable[[str], BaseException]


def pack(frames: Sequence[tuple[str, bytes]]) -> bytes:
    """The packed body of ``frames``, (channel, encoded message) pairs in order."""
    parts = [_VERSION]
    for channel, data in frames:
        name = channel.encode()
        parts += (_HEADER.pack(len(name), len(data)), name, data)
    return b"".join(parts)


def describe(frames: Sequence[tuple[str, bytes]]) -> str:
    """How a layer's errors name a packed publish of ``frames`` (each sender's names its own send).

    No channel: the publish is every sender's, and :func:`sender_error` tells
    each of them about the one it passed.
    """
    return f"packed publish of {len(frames)} sends"


def sender_error(error: Exception, channel: str, others: int) -> Exception:
    """What the sender to ``channel`` raises when the publish that carried its send with ``others`` failed.

    A ``BackendUnavailable`` or a plain ``ChannelLayerError`` names the
    publish (:func:`describe`): the sender gets one of the same type that
    names its own channel and how many were packed with it, caused by
    ``error``. Any other error (the layer closed, a refusal) is about no send
    in particular and is returned as it is.
    """
    kind = type(error)
    if kind is not BackendUnavailable and kind is not ChannelLayerError:
        return error
    own = kind(f"send to {channel!r} (packed with {others} others) failed: {error}")
    own.__cause__ = error
    own.__suppress_context__ = True
    return own


def unpack(body: bytes) -> list[tuple[str, bytes]]:
    """The (channel, encoded message) frames of a packed ``body``, in order.

    Raises ``ValueError`` naming what is wrong when ``body`` is not exactly a
    sequence of whole frames (truncated, trailing bytes, a channel that is
    not UTF-8, another format version), before returning anything: a
    malformed body is dropped whole, never delivered in part.
    """
    if not body or body[0] != PACK_VERSION:
        found = body[0] if body else "nothing"
        raise ValueError(f"packed body starts with format {found}, expected {PACK_VERSION}")
    frames: list[tuple[str, bytes]] = []
    offset, end = 1, len(body)
    while offset < end:
        if offset + _HEADER.size > end:
            raise ValueError(f"packed body ends inside the header of frame {len(frames)}")
        name_size, data_size = _HEADER.unpack_from(body, offset)
        start = offset + _HEADER.size
        offset = start + name_size + data_size
        if offset > end:
            raise ValueError(
                f"frame {len(frames)} needs {offset - end} bytes more than the packed body holds"
            )
        channel = body[start : start + name_size].decode()  # UnicodeDecodeError is a ValueError
        frames.append((channel, body[start + name_size : offset]))
    return frames


class _Frame:
    __slots__ = ("channel", "data", "deadline", "done")

    def __init__(self, channel: str, data: bytes, done: asyncio.Future[None], deadline: float) -> None:
        self.channel = channel
        self.data = data
        #: Settled with the outcome of the publish that carried the frame; a
        #: caller that gives up cancels it, which withdraws a frame not taken yet.
        self.done = done
        #: Loop time past which the caller gives up (``done`` fails with the timeout).
        self.deadline = deadline


def _size(frames: Sequence[_Frame]) -> int:
    """What ``frames`` count against ``Packer.max_bytes``: headers, names and payloads.

    At most 4 UTF-8 bytes a character: an upper bound, without encoding the names twice.
    """
    return _HEADER.size * len(frames) + sum(len(frame.channel) * 4 + len(frame.data) for frame in frames)


class _Outbox:
    """What waits for one destination, and how many publishes to it are unconfirmed."""

    __slots__ = ("first", "flush_due", "in_flight", "queued")

    def __init__(self) -> None:
        self.queued: deque[_Frame] = deque()
        self.in_flight = 0
        #: A publishing task was started that takes the queue on its first step
        #: (the next turn of the event loop); it holds one of the in-flight slots.
        self.flush_due = False
        #: The frame that found nothing in flight or queued, and its sender's task:
        #: if the due publish carries it alone, that task is a lone sender.
        self.first: tuple[_Frame, weakref.ref[asyncio.Task[Any]]] | None = None


class Packer:
    """Sends to one destination go out alone when nothing else comes, packed when they pile up.

    Per destination at most ``in_flight`` publishes are unconfirmed at once.
    A send's frame is queued, and a send that finds nothing in flight and
    nothing queued starts the publish that takes the queue on the next turn
    of the event loop, so the sends of its turn (senders one message woke)
    go with it; if none came, its task's next send to that destination, if
    it too finds nothing in flight and no other send came between, is
    published at once from the caller's task, so a lone sender pays neither
    the turn nor a task. The queued frames (at most ``max_frames``, at most ``max_bytes`` of
    payloads and names, always at least one) go out as one message from a
    background task, so cancelling one caller never loses another's frame:
    on the next turn of the event loop if a slot is free (the senders one
    confirm woke all send in one turn: they travel together), else whenever
    a publish to that destination is settled. Every caller returns or raises
    with the publish that carried its frame: a failure reaches each of them,
    as an error naming the caller's own send (:func:`sender_error`). A pack
    the layer refuses as too large after lowering ``max_bytes`` (another
    server, with a smaller limit) is not a failure: its frames are taken
    again, under the new bound.
    Frames are taken in call order and packed publishes to one destination
    are started in that order. A queued caller waits at most ``timeout``
    seconds in all, as a lone one does, then raises ``on_timeout(channel)``:
    its frame is withdrawn if not taken yet, and may still be delivered if
    it was.
    """

    def __init__(
        self,
        *,
        send_one: SendOne,
        send_many: SendMany,
        spawn: Spawn,
        in_flight: int,
        max_frames: int,
        max_bytes: int,
        timeout: float,
        on_timeout: OnTimeout,
    ) -> None:
        self._send_one = send_one
        self._send_many = send_many
        self._spawn = spawn
        self._limit = in_flight
        self._max_frames = max_frames
        #: Most bytes of payloads and names one packed message carries; a layer that learns
        #: a smaller bound from its broker (on connecting, on reconnecting to another server)
        #: lowers it, also before its ``send_many`` raises ``MessageTooLarge`` for a pack
        #: sized for the old bound: its sends are then taken again under the new one.
        self.max_bytes = max_bytes
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._outboxes: dict[str, _Outbox] = {}
        self._closed = False
        # Queued callers in call order, so in deadline order (one timeout for
        # all): one timer for the oldest unsettled frame instead of a timer per
        # frame, which was a tenth of a packed send's CPU. Settled frames are
        # dropped from the head lazily.
        self._waiting: deque[_Frame] = deque()
        self._timer: asyncio.TimerHandle | None = None
        #: The destination and task of the last send that waited a turn for others and
        #: found none: that task's next send there, with nothing in flight, goes at once.
        #: A weak reference: a finished task (its result, its traceback) is not kept for it.
        self._lone: tuple[str, weakref.ref[asyncio.Task[Any]]] | None = None
        #: Packed messages published so far and the frames they carried.
        self.packed = 0
        self.packed_frames = 0

    async def send(self, destination: str, channel: str, data: bytes) -> None:
        """Publish one send to ``destination``, alone or packed; return once its publish is confirmed."""
        if self._closed:
            raise ChannelLayerClosed("the channel layer was closed")
        outbox = self._outboxes.get(destination)
        if outbox is None:
            outbox = self._outboxes[destination] = _Outbox()
        idle = outbox.in_flight == 0 and not outbox.queued
        loop = running_loop()
        if idle:
            lone = self._lone
            if lone is not None and lone[0] == destination and lone[1]() is asyncio.current_task(loop):
                # A lone sender's task (its last send here found nobody to go
                # with): at once, without the turn's wait or a frame.
                outbox.in_flight += 1
                await self._alone(destination, outbox, channel, data)
                return
        frame = _Frame(channel, data, loop.create_future(), loop.time() + self._timeout)
        if idle:
            # The first of its turn: queued like the others, its publish due on the next
            # turn (see _publish_due), so the sends of this turn go with it.
            task = asyncio.current_task(loop)
            outbox.first = (frame, weakref.ref(task)) if task is not None else None
        else:
            self._lone = None  # sends overlap: the next with nothing in flight waits its turn again
        outbox.queued.append(frame)
        self._track(frame)
        if outbox.in_flight < self._limit and not outbox.flush_due:
            # A slot is free: the sends of this loop turn (senders woken by one
            # confirm send together) go out as one message on the next turn,
            # taken by the publishing task's first step.
            outbox.flush_due = True
            outbox.in_flight += 1
            try:
                self._spawn(self._publish_due(destination, outbox))
            except ChannelLayerClosed:
                outbox.flush_due = False
                outbox.in_flight -= 1
                frame.done.cancel()  # withdrawn: never taken, never timed out
                raise
        await self._wait(frame)

    def _track(self, frame: _Frame) -> None:
        """Fail ``frame`` with the timeout at its deadline unless it is settled before."""
        waiting = self._waiting
        while waiting and waiting[0].done.done():
            waiting.popleft()
        waiting.append(frame)
        if self._timer is None:
            loop = running_loop()
            self._timer = loop.call_at(frame.deadline, self._expire, loop, frame.deadline)

    @staticmethod
    async def _wait(frame: _Frame) -> None:
        """Return, or raise, with the publish that carried ``frame``."""
        try:
            await frame.done
        except asyncio.CancelledError:
            if frame.done.done() and not frame.done.cancelled():
                frame.done.exception()  # settled as we were cancelled: retrieved, not logged as lost
            raise

    async def _alone(self, destination: str, outbox: _Outbox, channel: str, data: bytes) -> None:
        """Publish one send from the caller's task, in the in-flight slot it took."""
        try:
            await self._send_one(destination, channel, data)
        finally:
            self._settled(destination, outbox)

    def close(self) -> None:
        """Fail every queued frame with ``ChannelLayerClosed``; later sends raise it too."""
        self._closed = True
        closed = ChannelLayerClosed("the channel layer was closed")
        for outbox in self._outboxes.values():
            settle_all((frame.done for frame in outbox.queued), closed)
            outbox.queued.clear()
        if self._timer is not None:
            # Frames in flight are failed by their publish's task, which close cancels.
            self._timer.cancel()
            self._timer = None

    def _expire(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        # Fails every unsettled frame whose deadline is ``due`` (when this timer
        # was set for) or earlier: a frame not taken is withdrawn (_take skips
        # it), one in flight may still be delivered; its publish settles the
        # others of its batch and skips it.
        self._timer = None
        waiting = self._waiting
        while waiting:
            frame = waiting[0]
            if not frame.done.done():
                if frame.deadline > due:
                    self._timer = loop.call_at(frame.deadline, self._expire, loop, frame.deadline)
                    return
                frame.done.set_exception(self._on_timeout(frame.channel))
            waiting.popleft()

    async def _publish_due(self, destination: str, outbox: _Outbox) -> None:
        outbox.flush_due = False
        batch = self._take(outbox)
        first, outbox.first = outbox.first, None
        if first is not None and len(batch) == 1 and batch[0] is first[0]:
            # Senders woken together send in one turn; nobody came with this one: its
            # task's next send there, with nothing in flight, goes at once (send()).
            self._lone = (destination, first[1])
        if batch:
            await self._publish(destination, outbox, batch)
        else:
            self._settled(destination, outbox)  # every queued caller gave up

    def _settled(self, destination: str, outbox: _Outbox) -> None:
        outbox.in_flight -= 1
        self._flush(destination, outbox)

    def _flush(self, destination: str, outbox: _Outbox) -> None:
        # What queued goes out now, while slots last; not while a due publish
        # is about to take it, so publishes start in the order of their frames.
        while outbox.queued and outbox.in_flight < self._limit and not outbox.flush_due:
            batch = self._take(outbox)
            if not batch:
                break  # every queued caller gave up
            outbox.in_flight += 1
            try:
                self._spawn(self._publish(destination, outbox, batch))
            except ChannelLayerClosed as exc:
                outbox.in_flight -= 1
                settle_all((frame.done for frame in batch), exc)
        if (
            outbox.in_flight == 0
            and not outbox.queued
            and not outbox.flush_due
            and self._outboxes.get(destination) is outbox
        ):
            del self._outboxes[destination]

    def _take(self, outbox: _Outbox) -> list[_Frame]:
        queued = outbox.queued
        if len(queued) <= self._max_frames:
            # The common case, a round's sends, all of them in one message: the
            # per-frame checks below in two comprehensions.
            batch = [frame for frame in queued if not frame.done.done()]
            if _size(batch) <= self.max_bytes or len(batch) < 2:
                queued.clear()
                return batch
        batch = []
        size = 0
        while queued and len(batch) < self._max_frames:
            frame = queued[0]
            if frame.done.done():
                queued.popleft()  # its caller gave up before it was taken: never sent
                continue
            cost = _size((frame,))
            if batch and size + cost > self.max_bytes:
                break
            queued.popleft()
            batch.append(frame)
            size += cost
        return batch

    async def _publish(self, destination: str, outbox: _Outbox, batch: list[_Frame]) -> None:
        try:
            if len(batch) == 1:
                await self._send_one(destination, batch[0].channel, batch[0].data)
            else:
                await self._send_many(destination, [(frame.channel, frame.data) for frame in batch])
                self.packed += 1
                self.packed_frames += len(batch)
        except asyncio.CancelledError:
            # Only close() cancels this task: the callers learn why.
            settle_all((frame.done for frame in batch), ChannelLayerClosed("the channel layer was closed"))
            raise
        except MessageTooLarge as exc:
            if len(batch) > 1 and _size(batch) > self.max_bytes:
                # Sized for a bound the layer has lowered since (the server it reconnected
                # to takes less): taken again, first in line, under the new bound.
                outbox.queued.extendleft(reversed(batch))
            else:
                self._fail(batch, exc)
        except Exception as exc:
            self._fail(batch, exc)
        else:
            for frame in batch:
                done = frame.done
                if not done.done():  # what settle() checks, without a call per frame
                    done.set_result(None)
        finally:
            self._settled(destination, outbox)

    @staticmethod
    def _fail(batch: list[_Frame], error: Exception) -> None:
        """Fail each caller of ``batch`` with ``error``, told about the send it made."""
        if len(batch) == 1:
            settle(batch[0].done, error)  # a lone send's error names its channel
            return
        others = len(batch) - 1
        for frame in batch:
            if not frame.done.done():
                frame.done.set_exception(sender_error(error, frame.channel, others))
