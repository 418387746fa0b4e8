"""RabbitMQ publishes and acks written below aio-pika, many to one socket write.

aio-pika's ``Exchange.publish`` builds a ``Message`` object per publish and
aiormq's ``basic_publish`` holds the channel lock until the publish's frames
are on the socket, so concurrent sends go out one write (one system call, one
broker wake-up) each, and each delivery's ack is one more. Profiled in the
closed-loop p2p bench, those writes were most of the time a message cost.

* :class:`ConfirmingPublisher` takes every publish made while its previous
  batch was being written, numbers them with the channel's delivery tags and
  hands aiormq all their frames as one write. aiormq's own bookkeeping
  (``confirmations``, ``message_id_delivery_tag``) settles each publish's
  future: acks (single or multiple), nacks (``DeliveryError``), returns of
  mandatory publishes (``PublishError``) and a channel that closes (the
  futures come from the channel's future store, which rejects them all).
* :class:`BatchedAcks` acks a consumer's deliveries with one
  ``multiple`` ack for all those handled within a few milliseconds.
* :func:`take_deliveries` hands a consumer's deliveries out as aiormq's
  connection reader reads them, without the channel's queue and reader task
  in between, nor a task per delivery.
* :func:`render_callback_errors_at_once` makes the records aio-pika logs about a
  failed callback formattable after the call too.

This module imports aiormq and pamqp, so only the RabbitMQ backend imports it,
once its driver was found.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiormq
import aiormq.exceptions
import pamqp.frame
import pamqp.header
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.connection import FrameReceiver
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    InvalidFrameError,
    ProtocolSyntaxError,
)
from pamqp import commands, decode, encode
from pamqp.body import ContentBody
from pamqp.constants import FRAME_BODY, FRAME_END_CHAR, FRAME_HEADER, FRAME_METHOD
from pamqp.exceptions import PAMQPException

from fastapi_websockets.backends.timeouts import bounded

__all__ = [
    "CHANNEL_ERRORS",
    "Refusal",
    "BatchedAcks",
    "ConfirmingPublisher",
    "FrameReader",
    "frames_read_by_the_layer",
    "refusal",
    "render_callback_errors_at_once",
    "take_deliveries",
]

logger = logging.getLogger("fastapi_websockets.rabbitmq")

Spawn = Callable[[Coroutine[Any, Any, None]], object]

#: What an operation on a channel raises when the channel or its connection went away: the
#: layer's errors to handle, and what the acker survives.
CHANNEL_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    ChannelInvalidStateError,
    OSError,
)


@dataclass(frozen=True)
class Refusal:
    """A request the broker refused for good: the AMQP reply code and the broker's text
    (which starts with the code's name: ``PRECONDITION_FAILED - inequivalent arg ...``).

    ``config`` says whether the layer's own options or URL are what clashes
    (an argument, a login, a vhost) rather than the broker's permissions.
    """

    code: int
    text: str
    config: bool


def refusal(exc: BaseException) -> Refusal | None:
    """The refusal ``exc`` reports when asking again cannot help, else None.

    Only what stays refused until someone changes the options or the broker: a
    permission (403), an argument that clashes with an existing queue or exchange
    (406), a login or a vhost. NOT_FOUND (404) is not among them: it also answers
    while a queue's home node recovers after a restart. Nor is RESOURCE_LOCKED
    (405): presence claims rely on it, and its holder goes away.
    """
    text = str(exc.args[0]) if exc.args else ""
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return Refusal(403, text, config=False)
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed) and (
        "inequivalent arg" in text or "invalid arg" in text
    ):
        return Refusal(406, text, config=True)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        # aiormq's name for a Connection.Close with code 403 during the handshake.
        return Refusal(403, text or "ACCESS_REFUSED - login refused", config=True)
    if isinstance(exc, InvalidFrameError) and "'Connection.OpenOk'" in text and "Connection.Close" in text:
        # Connection.Open, which names the vhost, answered with a close whose code and text
        # aiormq drops. RabbitMQ answers a vhost that does not exist, or that the user has
        # no permissions on, with 530 NOT_ALLOWED.
        return Refusal(
            530, "it answered Connection.Open, which names the vhost, with Connection.Close", config=True
        )
    return None


#: Seconds an inbox delivery may wait for its ack (see :class:`BatchedAcks`).
ACK_DELAY = 0.005


@dataclass(slots=True)
class _Publish:
    channel: aiormq.Channel
    exchange: str
    routing_key: str
    body: bytes
    properties: commands.Basic.Properties
    mandatory: bool
    confirm: asyncio.Future[Any]
    on_written: Callable[[], None] | None


def _fail_unconfirmed(channel: aiormq.Channel, closing: asyncio.Future[Any]) -> None:
    """Fail the publishes ``channel`` never confirmed with the cause of its close, as aiormq's
    future store does for the futures it made (the channel's own ``closing`` carries it)."""
    error = None if closing.cancelled() else closing.exception()
    if error is None or isinstance(error, asyncio.CancelledError):
        # Never a CancelledError (aiormq's reader cancelled): the caller awaits its confirm,
        # and a CancelledError there must stay the caller's own cancellation.
        error = ChannelInvalidStateError(f"{channel!r} closed" + (f": {error!r}" if error else ""))
    for confirm in list(channel.confirmations.values()):
        if not confirm.done():
            confirm.set_exception(error)
            confirm.exception()  # read, as the store does: a caller that gave up is not logged


def _number(channel: aiormq.Channel, publish: _Publish) -> int:
    """Give ``publish`` the next delivery tag of ``channel`` (the broker counts its publishes so) and
    register its confirm (and, if mandatory, its message id for a return) with aiormq."""
    channel.delivery_tag += 1
    tag: int = channel.delivery_tag
    channel.confirmations[tag] = publish.confirm
    if publish.mandatory:
        message_id = str(publish.properties.message_id)
        channel.message_id_delivery_tag[message_id] = tag
        publish.confirm.add_done_callback(partial(_forget_message_id, channel, message_id, tag))
    return tag


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int, _: asyncio.Future[Any]) -> None:
    # Only mandatory publishes are indexed by id (the broker returns them by it);
    # the index must not outlive the publish.
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


class ConfirmingPublisher:
    """Writes the publishes of one confirm channel in batches, their confirms outstanding at once.

    :meth:`publish` returns the future of the message's publisher confirm at
    once. The first publish of a loop turn, when no writer runs, is handed
    to aiormq's writer there and then; the others queue, and one writer task
    (started by ``spawn`` when there is something to write, ending when
    there is not) hands everything queued meanwhile to aiormq as a single
    frame batch (one socket write) and, for a batch with ``on_written``
    callbacks, waits until the socket took it, so the next batch gathers
    while this one is written. It must be the only
    publisher on its channel: the delivery tags it assigns are the broker's
    count of that channel's publishes.
    """

    def __init__(self, spawn: Spawn, timeout: float) -> None:
        self._spawn = spawn
        #: Seconds a batch may wait for room in aiormq's write queue, then for the socket.
        self._timeout = timeout
        self._queued: list[_Publish] = []
        self._writing = False
        #: The channel whose close fails its unconfirmed publishes (one watch per channel).
        self._watched: aiormq.Channel | None = None
        self._stopped = False
        #: Publishes and socket writes so far: their ratio is the batch size.
        self.published = 0
        self.writes = 0

    def publish(
        self,
        channel: aiormq.Channel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: commands.Basic.Properties,
        *,
        mandatory: bool = False,
        on_written: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one publish; the future settles with its confirm (or the channel's failure).

        ``properties.message_id`` must be set (returns are matched by it).
        Cancelling the future before the batch is written withdraws the
        publish; after, the broker may still deliver it. ``on_written`` is
        called by the writer once the publish is on the socket (never if it
        could not be written); an exception it raises is logged.
        """
        # Not from the channel's future store: its three done callbacks a future
        # (two store removers, an exception reader) were a sixth of a lone send's
        # loop callbacks. The store's job, failing what is unconfirmed when the
        # channel closes, is done by _fail_unconfirmed.
        confirm: asyncio.Future[Any] = channel.loop.create_future()
        if channel is not self._watched:
            self._watched = channel
            channel.closing.add_done_callback(partial(_fail_unconfirmed, channel))
        publish = _Publish(channel, exchange, routing_key, body, properties, mandatory, confirm, on_written)
        if not self._writing and not self._stopped and self._write_now(publish):
            # The first publish of a loop turn with no writer running is handed to
            # aiormq by its caller: no writer task, no loop turn before the write
            # (each packed send paid both). The others of the turn queue for a
            # writer task, which writes them together on the next turn.
            return confirm
        if not self._writing:
            try:
                self._spawn(self._write_all())  # raises once the layer is closing
            except BaseException:
                confirm.cancel()
                raise
            self._writing = True
        self._queued.append(publish)
        return confirm

    @staticmethod
    def give_up(channel: aiormq.Channel, confirm: asyncio.Future[Any], error: Exception) -> None:
        """Fail ``confirm``, a publish on ``channel`` the broker has not confirmed in time, with ``error``.

        Not a cancel: the caller awaits the confirm, and a CancelledError there must
        stay the caller's own. A publish not written yet is withdrawn (the writer skips
        a settled confirm); a written one keeps its tag in aiormq's ``confirmations``
        with a cancelled stand-in, so that a confirm still to come is ignored quietly,
        as aiormq ignores one for a cancelled future.
        """
        if confirm.done():
            return
        confirm.set_exception(error)
        confirm.exception()  # read: the caller may be gone
        confirmations = channel.confirmations
        for tag, registered in confirmations.items():
            if registered is confirm:
                stand_in = channel.loop.create_future()
                stand_in.cancel()
                confirmations[tag] = stand_in
                break

    def stop(self) -> None:
        """Write nothing more from callers' tasks: the layer is closing, and
        its background tasks (the writer's too) are being cancelled."""
        self._stopped = True

    def _write_now(self, publish: _Publish) -> bool:
        """Number ``publish`` and queue its frames in aiormq, without waiting; False if that needs
        a wait (an ``on_written`` callback) or aiormq's writer has not taken what was queued
        before (a publish of this loop turn: aiormq's writer runs on the next), which the writer
        task then writes with the rest of the turn's publishes."""
        channel = publish.channel
        # Not a flag reset by a callback on the next turn: that was a loop callback a lone send.
        if publish.on_written is not None or not channel.write_queue.empty():
            return False
        if channel.is_closed:
            publish.confirm.set_exception(ChannelInvalidStateError(f"{channel!r} closed"))
            return True
        try:
            frames = _marshal(channel, publish)
        except (TypeError, ValueError, struct.error) as exc:
            publish.confirm.set_exception(exc)  # as in _write
            return True
        _number(channel, publish)
        channel.write_queue.put_nowait(ChannelFrame(payload=frames, should_close=False, drain_future=None))
        self.writes += 1
        self.published += 1
        return True

    async def _write_all(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                await self._write(batch)
        finally:
            self._writing = False
            for publish in self._queued:  # only when cancelled (the layer closes)
                if not publish.confirm.done():
                    publish.confirm.set_exception(ChannelInvalidStateError("the publisher was stopped"))
            self._queued = []

    async def _write(self, batch: list[_Publish]) -> None:
        frames: list[bytes] = []
        numbered: list[tuple[int, asyncio.Future[Any]]] = []
        written: list[Callable[[], None]] = []
        channel = batch[0].channel
        for publish in batch:
            if publish.channel is not channel:
                await self._flush(channel, frames, numbered, written)  # a reconnect in the middle of a batch
                channel, frames, numbered, written = publish.channel, [], [], []
            if publish.confirm.done():
                continue  # the caller gave up before it was written: never sent
            if channel.is_closed:
                publish.confirm.set_exception(ChannelInvalidStateError(f"{channel!r} closed"))
                continue
            try:
                frames.append(_marshal(channel, publish))
            except (TypeError, ValueError, struct.error) as exc:
                # A property pamqp cannot encode: this publish fails, unnumbered.
                publish.confirm.set_exception(exc)
                continue
            # Nothing awaits between numbering a publish and queueing its frames.
            numbered.append((_number(channel, publish), publish.confirm))
            if publish.on_written is not None:
                written.append(publish.on_written)
        await self._flush(channel, frames, numbered, written)

    async def _flush(
        self,
        channel: aiormq.Channel,
        frames: list[bytes],
        numbered: list[tuple[int, asyncio.Future[Any]]],
        written: list[Callable[[], None]],
    ) -> None:
        if not frames:
            return
        # Only a batch with callbacks waits for the socket: a drain future from
        # the channel's store is three done callbacks, and its wait a timer and
        # a loop turn, per write, which one lone send a turn paid for nothing.
        drained = channel.create_future() if written else None
        payload = ChannelFrame(payload=b"".join(frames), should_close=False, drain_future=drained)
        try:
            try:
                channel.write_queue.put_nowait(payload)
            except asyncio.QueueFull:
                # Bounded: a connection whose writer died leaves its queue full for good.
                await bounded(channel.write_queue.put(payload), self._timeout, _stalled)
        except ChannelInvalidStateError as exc:
            # Never queued, so never counted by the broker: give the tags back
            # (the next batch must get the numbers the broker will use) and
            # fail these publishes.
            channel.delivery_tag -= len(numbered)
            for tag, confirm in numbered:
                channel.confirmations.pop(tag, None)
                if not confirm.done():
                    confirm.set_exception(exc)
            if drained is not None:
                drained.cancel()
            return
        self.writes += 1
        self.published += len(numbered)
        if drained is None:
            return
        # Queued, so numbered right: the confirms settle these publishes, or the
        # channel's close fails them with its cause (which this wait leaves to
        # them, whatever its type). Past the timeout only this wait is given up.
        done, _ = await asyncio.wait((drained,), timeout=self._timeout)
        if not done:
            logger.debug("a publish batch was not written within %s s", self._timeout)
        elif not drained.cancelled() and drained.exception() is None:
            for callback in written:
                try:
                    callback()
                except Exception:
                    logger.exception("a callback of a written publish failed")


#: Marshalled ``Basic.Publish`` method frames by (channel number, exchange, routing key, mandatory):
#: building one through pamqp cost as much as the rest of a publish's marshalling.
_METHODS: dict[tuple[int, str, str, bool], bytes] = {}
_METHODS_SIZE = 1024
#: A content body frame: type, channel number, size, the bytes, the end marker.
_BODY_HEADER = struct.Struct(">BHI")


def _method_frame(number: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    key = (number, exchange, routing_key, mandatory)
    frame = _METHODS.get(key)
    if frame is None:
        method = commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        frame = pamqp.frame.marshal(method, number)
        if len(_METHODS) >= _METHODS_SIZE:
            _METHODS.clear()  # many destinations: start over rather than grow without bound
        _METHODS[key] = frame
    return frame


#: The properties of a content header in wire order: (name, flag bit, AMQP type).
_PROPERTIES = tuple(
    (name, commands.Basic.Properties.flags[name], getattr(commands.Basic.Properties, f"_{name}"))
    for name in commands.Basic.Properties.__slots__
)
#: A content header frame up to its payload, then the payload's start: class id, weight, body size.
_FRAME_HEADER = struct.Struct(">BHI")
_HEADER_START = struct.Struct(">HxxQH")


def _header_frame(number: int, body_size: int, properties: commands.Basic.Properties) -> bytes:
    """pamqp's content header frame for ``properties``, byte for byte, in a third of its time.

    Short strings and octets (all the layer sets but ``headers``) are encoded
    here; any other type goes through pamqp's own encoder.
    """
    flags = 0
    parts: list[bytes] = []
    for name, flag, kind in _PROPERTIES:
        value = getattr(properties, name)
        if value is None or value == "":
            continue
        flags |= flag
        if kind == "shortstr" and type(value) is str:
            data = value.encode()
            if len(data) > 255:
                raise TypeError("string exceeds maximum length of 255 bytes")
            parts += (bytes((len(data),)), data)
        elif kind == "octet" and type(value) is int and 0 <= value <= 255:
            parts.append(bytes((value,)))
        else:
            parts.append(encode.by_type(value, kind))
    payload = b"".join(parts)
    size = _HEADER_START.size + len(payload)
    return b"".join(
        (
            _FRAME_HEADER.pack(FRAME_HEADER, number, size),
            _HEADER_START.pack(commands.Basic.frame_id, body_size, flags),
            payload,
            FRAME_END_CHAR,
        )
    )


def _marshal(channel: aiormq.Channel, publish: _Publish) -> bytes:
    """The wire frames of one publish: the method, the content header, the body in frame-sized parts."""
    body, number, step = publish.body, channel.number, channel.max_content_size
    parts = [
        _method_frame(number, publish.exchange, publish.routing_key, publish.mandatory),
        _header_frame(number, len(body), publish.properties),
    ]
    for start in range(0, len(body), step):
        part = body[start : start + step]
        parts += (_BODY_HEADER.pack(FRAME_BODY, number, len(part)), part, FRAME_END_CHAR)
    return b"".join(parts)


def _stalled() -> ChannelInvalidStateError:
    return ChannelInvalidStateError("the connection took no frames within the timeout")


class BatchedAcks:
    """Acks one consumer's deliveries with a ``multiple`` ack per ``delay`` seconds at most.

    Correct because a consumer's deliveries are handled in delivery order,
    each synchronously up to :meth:`ack`: when a delivery tag is acked,
    every earlier delivery of the channel was handled. A channel that closed
    took its unacked deliveries with it (the broker requeues them): its tags
    are dropped, never sent on its successor. An ack only frees the broker's
    copy and a prefetch slot, so it can wait: deliveries handled within
    ``delay`` of the first unacked one share its ack frame (an ack frame per
    delivery was a socket write, two loop callbacks and broker work for
    every packed message). ``delay`` must keep the prefetch window from
    filling: at most a prefetch window's deliveries wait ``delay``. The
    frames are sent by a task ``spawn`` starts when a delivery finds none
    running (one every ``delay`` at most), so :meth:`ack` itself never waits.
    """

    def __init__(self, spawn: Spawn, timeout: float, delay: float = ACK_DELAY) -> None:
        self._spawn = spawn
        #: Seconds an ack frame may wait for room in aiormq's write queue (a dead
        #: connection leaves it full for good, and this task is the layer's, not the channel's).
        self._timeout = timeout
        self._delay = delay
        self._channel: aiormq.Channel | None = None
        self._latest = 0
        self._acker = False
        #: Deliveries and ack frames so far: their ratio is the batch size.
        self.acked = 0
        self.frames = 0

    def ack(self, channel: aiormq.Channel, delivery_tag: int) -> None:
        """Ack ``delivery_tag`` and every earlier delivery on ``channel``, within ``delay``, in one frame."""
        if channel is not self._channel:
            self._channel, self._latest = channel, 0
        if delivery_tag > self._latest:
            self._latest = delivery_tag
        self.acked += 1
        if not self._acker:
            self._acker = True
            try:
                self._spawn(self._send())
            except BaseException:
                self._acker = False  # the layer is closing: the broker requeues what is unacked
                raise

    async def _send(self) -> None:
        try:
            done: tuple[aiormq.Channel | None, int] = (None, 0)
            while True:
                # The deliveries handled meanwhile are acked with the first one.
                await asyncio.sleep(self._delay)
                current, tag = self._channel, self._latest
                if (current, tag) == done:
                    break
                assert current is not None
                done = (current, tag)
                if current.is_closed:
                    continue
                self.frames += 1
                try:
                    await bounded(current.basic_ack(tag, multiple=True, wait=False), self._timeout, _stalled)
                except CHANNEL_ERRORS as exc:
                    # The channel went away; the broker requeues the messages in
                    # the inbox, which outlives the connection, and redelivers them.
                    logger.debug("could not ack inbox messages: %r", exc)
        finally:
            self._acker = False


def take_deliveries(
    channel: aiormq.Channel, consumer_tag: str, handle: Callable[[DeliveredMessage], None]
) -> None:
    """Have ``handle`` called with each delivery to ``consumer_tag`` on ``channel`` as soon as
    aiormq's connection reader has read its frames.

    aiormq passes a channel's frames from the connection's reader task to the
    channel's reader task through a queue, and runs a consumer's callback in a
    task of its own per delivery: two more loop turns, the task, its first step
    and three done callbacks (two future stores and a logger) per AMQP message.
    Here a delivery's frames are taken as the connection's reader puts them on
    the channel's queue (:class:`_Deliveries`) and ``handle`` is called there
    (publisher confirms of the channel too: one loop turn and task step less per
    publish whose confirm finds the queue empty),
    synchronously and in delivery order, whenever nothing of the channel waits
    in that queue; otherwise (and for anything that is not a whole delivery)
    the frames go through the queue, and the channel's reader calls ``handle``
    when it reaches the delivery. An exception ``handle`` raises is logged.
    Deliveries to other consumers, and to this one once it is cancelled, go the
    way aiormq takes them. Call it before ``basic_consume`` (deliveries may
    come before the consume call returns). It relies on aiormq internals,
    listed in docs/performance/rabbitmq.md and checked by the RabbitMQ tests: the
    connection's reader hands every frame of a channel to
    ``channel.frames.put``, looked up on the queue instance; the channel's
    reader calls ``channel._on_deliver_frame(frame)`` for every
    ``Basic.Deliver`` and ``channel._on_confirm_frame(frame)`` for every
    ``Basic.Ack``, looked up on the instance, and the channel's private
    ``__get_content_header`` and ``_read_content`` read the content header and
    body that follow it.
    """
    # aiormq's own handler, not whatever is installed: installing again (the broker
    # cancelled the consumer and it was restored) replaces the hook, never wraps it.
    aiormq_deliver = partial(type(channel)._on_deliver_frame, channel)
    read_header = channel._Channel__get_content_header  # type: ignore[attr-defined]
    read_content = channel._read_content

    async def on_deliver(frame: commands.Basic.Deliver) -> None:
        if frame.consumer_tag != consumer_tag or consumer_tag not in channel.consumers:
            await aiormq_deliver(frame)
            return
        _handle(handle, await read_content(frame, await read_header()))

    channel._on_deliver_frame = on_deliver  # type: ignore[method-assign]
    channel.frames.put = _Deliveries(channel, consumer_tag, handle).put  # type: ignore[method-assign]


def _handle(handle: Callable[[DeliveredMessage], None], message: DeliveredMessage) -> None:
    try:
        handle(message)
    except Exception:
        # Never into aiormq's readers: an exception there closes the channel or the connection.
        logger.exception("an inbox delivery could not be handled")


class _Deliveries:
    """A channel's frame queue as aiormq's connection reader fills it, with one consumer's
    deliveries and the channel's publisher confirms handed out on the way in (see
    :func:`take_deliveries`).

    A ``Basic.Deliver`` to the consumer is held, not queued, when the queue is
    empty (the channel's reader has taken everything before it, so handing the
    delivery out now keeps the channel's order); its content header and body
    frames follow it on the channel, and the delivery is handed out once its
    body is complete. Anything else after a held ``Basic.Deliver`` (a broken
    stream) puts the held frames and that frame on the queue as they came, so
    that aiormq's reader meets them and fails as it would have. A ``Basic.Ack``
    that finds the queue empty goes to the channel's ``_on_confirm_frame`` at
    once, as the channel's reader would pass it a loop turn later.
    """

    def __init__(
        self, channel: aiormq.Channel, consumer_tag: str, handle: Callable[[DeliveredMessage], None]
    ) -> None:
        self._channel = channel
        self._consumer_tag = consumer_tag
        self._handle = handle
        self._queue: asyncio.Queue[tuple[int, Any]] = channel.frames
        # The queue's own put, not whatever is installed (see take_deliveries).
        self._enqueue = partial(asyncio.Queue.put, channel.frames)
        self._held: list[tuple[int, Any]] = []
        self._header: pamqp.header.ContentHeader | None = None
        self._body: list[bytes] = []
        self._missing = 0

    async def put(self, item: tuple[int, Any]) -> None:
        """Take ``item`` (weight, frame) from aiormq's connection reader."""
        frame = item[1]
        if not self._held:
            kind = type(frame)
            if kind is _DELIVER:
                if (
                    frame.consumer_tag == self._consumer_tag
                    and self._queue.empty()
                    and self._consumer_tag in self._channel.consumers
                ):
                    self._held.append(item)
                    return
            elif kind is _ACK and self._queue.empty():
                # A publisher confirm (the inbox's channel is the layer's confirm channel):
                # aiormq's own handler, run here instead of a loop turn later in the
                # channel's reader; it only settles futures, whose waiters run later.
                await self._channel._on_confirm_frame(frame)
                return
            await self._enqueue(item)
            return
        if self._header is None:
            if isinstance(frame, pamqp.header.ContentHeader):
                self._held.append(item)
                self._header, self._missing = frame, frame.body_size
                if not self._missing:
                    self._hand_out()
                return
        elif isinstance(frame, ContentBody):
            self._held.append(item)
            self._body.append(frame.value)
            self._missing -= len(frame.value)
            if self._missing <= 0:
                self._hand_out()
            return
        held = self._held
        self._reset()
        for frame_item in (*held, item):
            await self._enqueue(frame_item)

    def _hand_out(self) -> None:
        deliver, header, body = self._held[0][1], self._header, b"".join(self._body)
        assert header is not None
        self._reset()
        message = DeliveredMessage(delivery=deliver, header=header, body=body, channel=self._channel)
        _handle(self._handle, message)

    def _reset(self) -> None:
        self._held, self._header, self._body, self._missing = [], None, [], 0


# ------------------------------------------------------------ reading frames

#: A frame's type, channel number and payload size; a method frame's class and method ids as one index.
_FRAME_START = struct.Struct(">BHI")
_INDEX = struct.Struct(">I")
_LONG_LONG = struct.Struct(">Q")
#: A content header's class id, weight and body size, then its first property flags word.
_HEADER_FIELDS = struct.Struct(">HHQH")
_FRAME_END = FRAME_END_CHAR[0]
_DELIVER = commands.Basic.Deliver
_ACK = commands.Basic.Ack
_PROPERTY_TYPES = tuple((flag, name, kind) for name, flag, kind in _PROPERTIES)


def _short_str(data: bytes, offset: int) -> tuple[str, int]:
    end = offset + 1 + data[offset]
    return data[offset + 1 : end].decode("utf-8"), end


def _method(payload: bytes) -> Any:
    """A ``Basic.Deliver`` or ``Basic.Ack``, as pamqp unmarshals it (attributes set, no validation),
    or None for any other method (pamqp decodes those)."""
    index = _INDEX.unpack_from(payload)[0]
    if index == _DELIVER.index:
        deliver = _DELIVER.__new__(_DELIVER)
        deliver.consumer_tag, offset = _short_str(payload, 4)
        deliver.delivery_tag = _LONG_LONG.unpack_from(payload, offset)[0]
        deliver.redelivered = bool(payload[offset + 8] & 1)
        deliver.exchange, offset = _short_str(payload, offset + 9)
        deliver.routing_key, _ = _short_str(payload, offset)
        return deliver
    if index == _ACK.index:
        ack = _ACK.__new__(_ACK)
        ack.delivery_tag = _LONG_LONG.unpack_from(payload, 4)[0]
        ack.multiple = bool(payload[12] & 1)
        return ack
    return None


def _content_header(payload: bytes) -> pamqp.header.ContentHeader | None:
    """pamqp's ``ContentHeader`` for ``payload``, or None when its flags take more than one word."""
    class_id, weight, body_size, flags = _HEADER_FIELDS.unpack_from(payload)
    if flags & 1:
        return None
    properties = commands.Basic.Properties()
    offset = _HEADER_FIELDS.size
    value: Any
    for flag, name, kind in _PROPERTY_TYPES:
        if not flags & flag:
            continue
        if kind == "shortstr":
            value, offset = _short_str(payload, offset)
        elif kind == "octet":
            value, offset = payload[offset], offset + 1
        else:
            consumed, value = decode.by_type(payload[offset:], kind)
            offset += consumed
        setattr(properties, name, value)
    header = pamqp.header.ContentHeader(weight, body_size, properties)
    header.class_id = class_id
    return header


class FrameReader(FrameReceiver):
    """aiormq's frame receiver reading a frame in two reads and decoding the frames of
    deliveries and publisher confirms itself.

    aiormq reads a frame in three reads into a ``BytesIO`` and has pamqp
    decode it generically; a delivery is three frames (method, content
    header, body) and a confirm one. Here ``Basic.Deliver``, ``Basic.Ack``,
    content headers and bodies become the same pamqp objects, attribute
    for attribute, in a third of the time; every other frame, and any of
    these this code cannot decode, goes through pamqp as before, which
    raises what it raised. Connection errors map to aiormq's as in its own
    receiver. Used by connections opened inside :func:`frames_read_by_the_layer`.
    """

    async def get_frame(self) -> tuple[int, int, Any]:
        """The next frame: (bytes it took, channel number, the pamqp frame)."""
        reader = self.reader
        if reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        async with self.lock:
            try:
                start = await reader.readexactly(7)
                if not self.started and start.startswith(b"AMQP"):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
                frame_type, number, size = _FRAME_START.unpack(start)
                rest = await reader.readexactly(size + 1)
            except asyncio.IncompleteReadError as exc:
                raise AMQPConnectionError(
                    "Server connection unexpectedly closed. "
                    f"Read {len(exc.partial)} bytes but {exc.expected} bytes expected",
                ) from exc
            except ConnectionRefusedError as exc:
                raise AMQPConnectionError(f"Server connection refused: {exc!r}") from exc
            except ConnectionResetError as exc:
                raise AMQPConnectionError(f"Server connection reset: {exc!r}") from exc
            except ConnectionError as exc:
                raise AMQPConnectionError(f"Server connection error: {exc!r}") from exc
            except OSError as exc:
                raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        frame: Any = None
        if size and rest[-1] == _FRAME_END:  # pamqp rejects an empty frame
            # Without the end byte, as pamqp decodes it (a length that overruns reads alike).
            payload = rest[:-1]
            try:
                if frame_type == FRAME_BODY:
                    frame = ContentBody(payload)
                elif frame_type == FRAME_METHOD:
                    frame = _method(payload)
                elif frame_type == FRAME_HEADER:
                    frame = _content_header(payload)
            except (struct.error, IndexError, ValueError, TypeError):
                frame = None  # pamqp says what is wrong with it
        if frame is not None:
            return 8 + size, number, frame
        try:
            return pamqp.frame.unmarshal(start + rest)
        except PAMQPException as exc:
            raise InvalidFrameError(str(exc)) from exc


_AIORMQ_FRAME_RECEIVER = FrameReceiver
_READ_OWN_FRAMES: ContextVar[bool] = ContextVar("fastapi_websockets_rabbitmq_frames", default=False)


def _frame_receiver(reader: asyncio.StreamReader) -> FrameReceiver:
    # aiormq has no per-connection hook for its receiver, so the module's name is replaced
    # for everyone, and only a connection opened inside frames_read_by_the_layer() gets
    # FrameReader: other aiormq users in the process keep aiormq's own receiver.
    if _READ_OWN_FRAMES.get():
        return FrameReader(reader)
    return _AIORMQ_FRAME_RECEIVER(reader)


@contextmanager
def frames_read_by_the_layer() -> Iterator[None]:
    """Have aiormq connections opened in this context (this task, and tasks it starts) read
    their frames with :class:`FrameReader`.

    aiormq's ``Connection.connect`` builds its receiver from the module's ``FrameReceiver``
    name; that name becomes a function that picks FrameReader only inside this context, so
    aiormq connections of other code in the process are read exactly as aiormq reads them.
    """
    aiormq.connection.FrameReceiver = _frame_receiver  # type: ignore[misc,assignment]
    token = _READ_OWN_FRAMES.set(True)
    try:
        yield
    finally:
        _READ_OWN_FRAMES.reset(token)


class _RenderedAtOnce(logging.Filter):
    """Renders a record's message while it is logged, so that formatting it later works."""

    def filter(self, record: logging.LogRecord) -> bool:
        # aio-pika's OneShotCallback logs its callback's error with itself as an argument,
        # then deletes the callback that its repr shows: a handler that formats later (a
        # MemoryHandler, a queue listener, pytest's records) failed with "--- Logging
        # error ---" (AttributeError) on every dropped connection.
        if record.args:
            record.msg = record.getMessage()
            record.args = ()
        return True


_RENDERED_AT_ONCE = _RenderedAtOnce()


def render_callback_errors_at_once() -> None:
    """Make the records aio-pika logs about a failed callback format later too (idempotent).

    A filter on aio-pika's ``aio_pika.tools`` logger, which logs only callback errors:
    it runs inside the logging call, while the callback those records name still exists.
    """
    logging.getLogger("aio_pika.tools").addFilter(_RENDERED_AT_ONCE)
