"""Bounded per-channel local queues: the demultiplexer every backend feeds.

Each backend has one inbox per process on its broker. Whatever arrives there
is decoded once and put into the mailbox of the channel it names; a
``receive()`` waits on that mailbox only. Waiting is a plain future, so 10,000
waiting receivers cost 10,000 futures and no broker resources.

Properties kept here, for every backend:

* bounded: a mailbox holds at most ``capacity_for(channel)`` messages;
* direct hand-off: a message for a channel with a waiting receiver skips the
  queue;
* cancellation-safe: a receiver cancelled after a message was handed to it
  puts the message back at the head, so the next receive gets it;
* expiring: messages older than ``expiry`` seconds are dropped, checked at the
  head on every get and for all mailboxes at most twice per ``expiry``;
* no garbage: a mailbox with no messages and no waiters is removed;
* listeners: a channel's single reader may, instead of waiting in a task,
  leave a callback that the next message is handed to (:meth:`Mailboxes.listen`),
  so that an idle WebSocket consumer holds no task and no mailbox at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.exceptions import ChannelLayerClosed, ReceiveTimeout
from fastapi_websockets.types import Message

__all__ = ["Listener", "MailboxStats", "Mailboxes"]

logger = logging.getLogger("fastapi_websockets.mailboxes")


@dataclass
class MailboxStats:
    """Counters of the messages a layer's receivers took, and of those the mailboxes did not deliver."""

    #: Messages that ``receive()`` returned or ``listen()`` handed over (counted by the layer:
    #: a plain increment where a metrics hook would be a call per receiver).
    received: int = 0
    dropped_full: int = 0
    dropped_expired: int = 0
    #: Messages from the broker that the serializer could not decode.
    dropped_undecodable: int = 0
    #: Messages for channels released with ``forget_channel()`` (their connection ended).
    dropped_released: int = 0


#: Called with a channel's next message, or with the exception a waiting receive would raise.
Listener = Callable[[Message | BaseException], None]


class _Box:
    __slots__ = ("items", "waiters")

    def __init__(self) -> None:
        self.items: deque[tuple[float, Message]] = deque()
        self.waiters: deque[asyncio.Future[Message]] = deque()


class Mailboxes:
    """The set of local mailboxes of one layer instance."""

    def __init__(
        self,
        capacity_for: Callable[[str], int],
        expiry: float,
        released: Callable[[str], bool] | None = None,
    ) -> None:
        self._capacity_for = capacity_for
        # Checked only when a message would create a mailbox: channels whose owner is gone
        # get none, so messages sent to them afterwards are dropped instead of kept.
        self._released = released
        self._expiry = expiry
        self._boxes: dict[str, _Box] = {}
        self._listeners: dict[str, Listener] = {}
        self._closed = False
        self._next_sweep = time.monotonic() + expiry
        self.stats = MailboxStats()

    def __len__(self) -> int:
        return len(self._boxes)

    def pending(self, channel: str) -> int:
        """Number of queued (not yet received) messages for ``channel``."""
        box = self._boxes.get(channel)
        return len(box.items) if box is not None else 0

    def put(self, channel: str, message: Message) -> bool:
        """Deliver ``message`` to ``channel``; return False when the mailbox is full."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        box = self._boxes.get(channel)
        if box is not None:
            # What _put() does for an existing mailbox, inline: either a receiver waits
            # already (a broker's p2p message, one at a time) or messages are queued ahead
            # (the rest of a batch a broker delivered together), and neither needs another step.
            waiters = box.waiters
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(message)
                    return True
            if not self._listeners:
                return self._enqueue(channel, box, message, now)
        return self._put(channel, message, now)

    def put_many(self, channels: Iterable[str], message: Message) -> list[str]:
        """Deliver one ``message`` to many channels; return the channels that were full."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        boxes = self._boxes
        listeners = self._listeners
        stats = self.stats
        full = []
        for channel in channels:
            # The usual case inline: a consumer's listener and no mailbox (so no waiting
            # receiver, which would come first). What _box_handing_off() does for it.
            if channel not in boxes:
                listener = listeners.pop(channel, None)
                if listener is not None:
                    stats.received += 1
                    listener(message)
                    continue
            if not self._put(channel, message, now):
                full.append(channel)
        return full

    def _box_handing_off(self, channel: str, message: Message) -> _Box | None:
        """Give ``message`` to a waiting receiver and return None, or return the box to queue it in."""
        box = self._boxes.get(channel)
        if box is not None:
            while box.waiters:
                fut = box.waiters.popleft()
                if not fut.done():
                    fut.set_result(message)
                    return None
        if self._listeners:
            listener = self._listeners.pop(channel, None)
            if listener is not None:
                self.stats.received += 1
                listener(message)
                return None
        if box is None:
            if self._released is not None and self._released(channel):
                self.stats.dropped_released += 1
                return None
            box = self._boxes[channel] = _Box()
        return box

    def _put(self, channel: str, message: Message, now: float) -> bool:
        box = self._box_handing_off(channel, message)
        if box is None:
            return True
        return self._enqueue(channel, box, message, now)

    def _enqueue(self, channel: str, box: _Box, message: Message, now: float) -> bool:
        items = box.items
        if len(items) >= self._capacity_for(channel):
            self._drop_expired(box, now)
            if len(items) >= self._capacity_for(channel):
                return False
        items.append((now + self._expiry, message))
        return True

    def pop_nowait(self, channel: str) -> Message | None:
        """Take the oldest unexpired message of ``channel`` without waiting, or None."""
        box = self._boxes.get(channel)
        if box is None:
            return None
        self._drop_expired(box, time.monotonic())
        if not box.items:
            self._discard_if_idle(channel, box)
            return None
        _, message = box.items.popleft()
        self._discard_if_idle(channel, box)
        return message

    def listen(self, channel: str, listener: Listener) -> Message | None:
        """Take the oldest queued message of ``channel``, or leave ``listener`` for the next one.

        Returns the message if one was queued. Otherwise returns None, and
        ``listener`` is called once, synchronously from the ``put()`` that
        delivers, with the next message (or with ``ChannelLayerClosed`` when the
        mailboxes close or the channel is dropped); it must only schedule work.
        A channel has at most one listener (the last one left wins); receivers
        waiting in :meth:`get` are served first.
        """
        if self._closed:
            raise ChannelLayerClosed("the channel layer is closed")
        # A consumer listens again after each event it handled, and its mailbox is almost
        # always absent (no message queued): that case without a call to pop_nowait().
        message = self.pop_nowait(channel) if channel in self._boxes else None
        if message is None:
            self._listeners[channel] = listener
        return message

    def unlisten(self, channel: str) -> None:
        """Withdraw the listener of ``channel``, if one is waiting; it will not be called."""
        self._listeners.pop(channel, None)

    async def get(self, channel: str, timeout: float | None = None) -> Message:
        """Wait for the next message of ``channel``.

        Raises ``ReceiveTimeout`` after ``timeout`` seconds and ``ChannelLayerClosed``
        if the mailboxes are closed meanwhile.
        """
        if self._closed:
            raise ChannelLayerClosed("the channel layer is closed")
        # pop_nowait() inline: a busy receiver finds its next message queued, an idle one
        # finds no mailbox (its last get() removed it), and neither needs the call.
        box = self._boxes.get(channel)
        if box is None:
            box = self._boxes[channel] = _Box()
        elif box.items:
            items = box.items
            now = time.monotonic()
            if items[0][0] <= now:
                self._drop_expired(box, now)
            if items:
                message = items.popleft()[1]
                if not items and not box.waiters:
                    # _discard_if_idle() inline: this is the box the dict holds.
                    del self._boxes[channel]
                return message
        loop = running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        box.waiters.append(fut)
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, _expire, fut, channel, timeout)
        try:
            message = await fut
        except asyncio.CancelledError:
            # Cancelled after a message was handed to us: give it back, at the head.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._requeue(channel, fut.result())
            self._stop_waiting(channel, fut, timer)
            raise
        except BaseException:
            self._stop_waiting(channel, fut, timer)
            raise
        # Received (every waiting receive of a fan-out round ends here): put() popped the
        # future, so only the timer and an idle mailbox are left, without _stop_waiting()'s checks.
        if timer is not None:
            timer.cancel()
        current = self._boxes.get(channel)
        if current is not None and not current.items and not current.waiters:
            del self._boxes[channel]  # _discard_if_idle() inline: this is the box the dict holds
        return message

    def _stop_waiting(
        self, channel: str, fut: asyncio.Future[Message], timer: asyncio.TimerHandle | None
    ) -> None:
        if timer is not None:
            timer.cancel()
        current = self._boxes.get(channel)
        if current is not None:
            # A future that got a message was already popped by put(); only a timed-out
            # or cancelled one is still queued (and failing to find it costs a scan).
            if fut.cancelled() or not fut.done() or fut.exception() is not None:
                with contextlib.suppress(ValueError):
                    current.waiters.remove(fut)
            self._discard_if_idle(channel, current)

    def _requeue(self, channel: str, message: Message) -> None:
        box = self._box_handing_off(channel, message)
        if box is not None:
            box.items.appendleft((time.monotonic() + self._expiry, message))

    def drop(self, channel: str, exc: BaseException) -> None:
        """Remove the mailbox of ``channel``: its messages are counted as released, waiters get ``exc``."""
        listener = self._listeners.pop(channel, None)
        if listener is not None:
            listener(exc)
        box = self._boxes.pop(channel, None)
        if box is None:
            return
        self.stats.dropped_released += len(box.items)
        for fut in box.waiters:
            if not fut.done():
                fut.set_exception(exc)

    def take_all(self, wanted: Callable[[str], bool]) -> list[tuple[str, Message]]:
        """Take every unexpired message of the channels ``wanted`` accepts, oldest first per channel."""
        now = time.monotonic()
        taken: list[tuple[str, Message]] = []
        for channel, box in list(self._boxes.items()):
            if wanted(channel):
                self._drop_expired(box, now)
                taken += ((channel, message) for _, message in box.items)
                box.items.clear()
                self._discard_if_idle(channel, box)
        return taken

    def close(self) -> None:
        """Wake every waiting receiver with ``ChannelLayerClosed`` and drop all messages."""
        self._closed = True
        for box in self._boxes.values():
            for fut in box.waiters:
                if not fut.done():
                    fut.set_exception(ChannelLayerClosed("the channel layer was closed"))
        self._boxes.clear()
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            listener(ChannelLayerClosed("the channel layer was closed"))

    def clear(self) -> None:
        """Drop every queued message; waiting receivers keep waiting."""
        for channel, box in list(self._boxes.items()):
            box.items.clear()
            self._discard_if_idle(channel, box)

    def _drop_expired(self, box: _Box, now: float) -> None:
        items = box.items
        while items and items[0][0] <= now:
            items.popleft()
            self.stats.dropped_expired += 1

    def _discard_if_idle(self, channel: str, box: _Box) -> None:
        if not box.items and not box.waiters and self._boxes.get(channel) is box:
            del self._boxes[channel]

    def _sweep(self, now: float) -> None:
        # Amortized: one pass over all mailboxes at most twice per expiry period,
        # so channels nobody reads any more do not hold memory forever.
        self._next_sweep = now + max(self._expiry / 2, 0.5)
        for channel, box in list(self._boxes.items()):
            self._drop_expired(box, now)
            self._discard_if_idle(channel, box)
        if self.stats.dropped_expired:
            logger.debug("mailboxes dropped %d expired messages so far", self.stats.dropped_expired)


def _expire(fut: asyncio.Future[Message], channel: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(ReceiveTimeout(channel, timeout))
