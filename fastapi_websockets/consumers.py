"""Channels-style WebSocket consumers for FastAPI.

A consumer owns one WebSocket: it gets a process-specific channel from the
layer, runs ``connect()``, then reads client frames and channel-layer events
concurrently until the client leaves, and finally leaves its groups and runs
``disconnect(code)``.

Channel events are dispatched by ``type`` (``"chat.message"`` calls
``chat_message(event)``), but only to handlers the application wrote:
a ``type`` naming a private method or a method of the consumer framework
(``accept``, ``close``, ``send_json``, ``group_add``...) is refused and logged.
``{"type": "websocket.send", "mode": "json"|"bytes", "body": ...}`` envelopes
are written to the socket with no handler. JSON goes out as RFC 8259 has it:
NaN and infinities raise ``InvalidMessage`` before anything is written.

Failures stay with their connection: an exception in a handler is logged with
its traceback and closes that socket with 1011; invalid JSON on a JSON
consumer closes it with 1007. A client that reads slowly cannot slow
``group_send`` for others: events wait in its channel's bounded mailbox
(the layer's ``capacity``), and once that is full new events for that one
connection are dropped and counted in ``layer.stats.dropped_full``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import operator
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import anyio
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from fastapi_websockets import observing
from fastapi_websockets._direct import direct_protocol, write_text
from fastapi_websockets._eager import EAGER_TASKS, start_task
from fastapi_websockets._json import DECODER, client_error, encode
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.config import warn_unread_environment
from fastapi_websockets.edge import CLOSE_POLICY_VIOLATION, EdgeLimits, FrameGuard, resolve_limits
from fastapi_websockets.exceptions import ChannelLayerClosed, InvalidMessage
from fastapi_websockets.history import History, StreamPosition
from fastapi_websockets.messages import WEBSOCKET_SEND
from fastapi_websockets.presence import PRESENCE_JOINED, PRESENCE_LEFT
from fastapi_websockets.types import Message

__all__ = ["AsyncJsonWebSocketConsumer", "AsyncWebSocketConsumer"]

logger = logging.getLogger("fastapi_websockets.consumers")

#: Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
_MAX_REASON_BYTES = 123
#: Codes an endpoint may send in a close frame (RFC 6455 section 7.4 and the IANA registry),
#: besides the application's 3000-4999; the others (1004-1006, 1015) are never sent.
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


class _Running(enum.Enum):
    """No close code yet: the connection goes on."""

    RUNNING = enum.auto()


_RUNNING = _Running.RUNNING
#: ``_dispatching`` when no channel event is being dispatched.
_IDLE = object()


def _uncancel(task: asyncio.Task[Any]) -> bool:
    """Withdraw one cancellation request of ``task``; True if others are still pending."""
    if sys.version_info >= (3, 11):
        return task.uncancel() > 0
    return False  # pragma: no cover - Python 3.10 does not count cancellation requests


def _reason(text: str) -> str:
    encoded = text.encode()[:_MAX_REASON_BYTES]
    return encoded.decode(errors="ignore")


def _handler_name(event_type: str) -> str | None:
    """The method an event type dispatches to, or None if no handler may have that name."""
    name = event_type.replace(".", "_")
    if not name.isidentifier() or name.startswith("_") or name in _FRAMEWORK_NAMES:
        return None
    return name


def _sendable(code: object) -> bool:
    return type(code) is int and (code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999)


def _peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "an unknown client"


class AsyncWebSocketConsumer:
    """A consumer for text and binary frames; subclass it and override the hooks.

    Hooks: :meth:`connect`, :meth:`receive` (or :meth:`receive_text` /
    :meth:`receive_bytes`), :meth:`disconnect`, and one ``async def`` per
    channel event type. Class attributes: ``groups`` (joined before
    ``connect()`` and left on disconnect), ``channel_name_prefix``, ``layer_alias``,
    and the edge limits ``allowed_origins``, ``require_origin``,
    ``max_frame_bytes`` and ``max_frames_per_second`` (see
    :mod:`fastapi_websockets.edge`; all but ``require_origin`` also come from
    ``FASTAPI_WEBSOCKETS_*`` environment variables when the class does not set them).
    """

    channel_name_prefix: ClassVar[str] = "specific"
    groups: ClassVar[Sequence[str]] = ()
    layer_alias: ClassVar[str] = "default"
    #: Page origins allowed to connect: None (same origin as the Host header), patterns, or ["*"].
    allowed_origins: ClassVar[Sequence[str] | None] = None
    #: Refuse handshakes without an Origin header (non-browser clients send none).
    require_origin: ClassVar[bool] = False
    #: A larger client frame closes the socket with 1009 before it is decoded.
    max_frame_bytes: ClassVar[int] = 1_048_576
    #: Frames per second a client may send on average (bursts of 2 s worth); faster closes with 1008.
    max_frames_per_second: ClassVar[float | None] = None

    def __init__(self, layer: BaseChannelLayer | None = None, *, alias: str | None = None) -> None:
        if layer is None:
            from fastapi_websockets.layers import get_default_layer

            layer = get_default_layer(alias or self.layer_alias)
        self.channel_layer: BaseChannelLayer = layer
        self.channel_name = ""
        self.scope: dict[str, Any] = {}
        self._websocket: WebSocket | None = None
        # uvicorn's protocol when text frames may go straight to its transport (see _direct).
        self._direct: Any = None
        self._accepted = False
        self._closed = False
        self._close_code: int | None = CLOSE_NORMAL
        self._joined: set[str] = set()
        self._present_in: set[str] = set()
        # A catch-up page goes out before any live event of its group. Live events are
        # dispatched without a lock (a lock's acquire and release cost more than the rest
        # of the bookkeeping per event): a catch-up takes _catch_up_lock (made at the first
        # one; catch-ups go one at a time), sets _held, which live events wait for, and
        # waits through _idle_waiter for the event being dispatched, if one is.
        self._catch_up_lock: asyncio.Lock | None = None
        self._held: asyncio.Future[None] | None = None
        self._idle_waiter: asyncio.Future[None] | None = None
        # The task a channel event is being dispatched in, or _IDLE.
        self._dispatching: asyncio.Task[Any] | object = _IDLE
        #: The channel event being handled (its encoded texts may be shared, see _encode_shared).
        self._event: Message | None = None
        self._frame_guard: FrameGuard | None = None
        self._context: contextvars.Context | None = None
        # The connection's event loop, passed to asyncio where it would look it up: on Python
        # 3.10/3.11 each lookup checks the process id, a system call, once per event.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._frames_task: asyncio.Task[Any] | None = None
        self._events_task: asyncio.Task[None] | None = None
        # Python 3.10/3.11: the events task, done with a burst, waits on _waiter for the next
        # event (the listener left is _wake) until the loop's _Sweeper ends it; see _Sweeper.
        self._sweeper: _Sweeper | None = None
        self._waiter: asyncio.Future[Message | BaseException | None] | None = None
        self._waiting_since = 0
        self._stop_code: int | _Running | None = _RUNNING

    # ------------------------------------------------------------ mounting

    @classmethod
    def as_endpoint(
        cls, layer: BaseChannelLayer | None = None, *, alias: str | None = None
    ) -> Callable[[WebSocket], Awaitable[None]]:
        """An endpoint for ``app.add_api_websocket_route(path, Consumer.as_endpoint())``.

        Each connection gets a new consumer instance; all share ``layer`` (by
        default, the process-wide layer of ``alias``).
        """

        cls.edge_limits()  # a wrong limit or FASTAPI_WEBSOCKETS_* value fails here, at mount time
        warn_unread_environment()  # and a misspelled variable is logged here

        async def endpoint(websocket: WebSocket) -> None:
            await cls(layer, alias=alias)(websocket)

        endpoint.__name__ = f"{cls.__name__}_endpoint"
        endpoint.__doc__ = cls.__doc__
        return endpoint

    @classmethod
    def edge_limits(cls) -> EdgeLimits:
        """This class's origin and frame limits: class attributes, else environment, else defaults.

        Read at every handshake, so environment changes apply to new connections.
        Raises :class:`~fastapi_websockets.InvalidChannelLayerConfig` for a wrong value.
        """
        return resolve_limits(cls, AsyncWebSocketConsumer)

    # ------------------------------------------------------------ properties

    @property
    def websocket(self) -> WebSocket:
        """The WebSocket this consumer serves."""
        if self._websocket is None:
            raise RuntimeError(
                "this consumer is not serving a WebSocket yet: it gets one when its endpoint "
                "(Consumer.as_endpoint()) serves a connection; use it from connect() and the handlers"
            )
        return self._websocket

    @property
    def path_params(self) -> dict[str, Any]:
        """The route's path parameters (``/ws/{room}`` -> ``{"room": ...}``)."""
        return dict(self.websocket.path_params)

    @property
    def query_params(self) -> dict[str, str]:
        """The query string parameters of the connection URL."""
        return dict(self.websocket.query_params)

    # ------------------------------------------------------------ lifecycle

    async def __call__(self, websocket: WebSocket) -> None:
        """Serve ``websocket`` until the client disconnects or the consumer closes.

        A handshake whose origin the class does not allow is refused (HTTP 403)
        before anything else: no channel, no group, no ``connect()`` and no
        ``disconnect()``.
        """
        limits = self.edge_limits()
        self._websocket = websocket
        scope = websocket.scope  # as Channels does: the connection's ASGI scope itself, no copy
        self.scope = scope if isinstance(scope, dict) else dict(scope)
        refusal = limits.refusal(websocket.headers.getlist("origin"), websocket.headers.get("host"))
        if refusal is not None:
            logger.info(
                "%s refused a WebSocket to %s from %s: %s",
                type(self).__name__,
                websocket.url.path,
                _peer(websocket),
                refusal,
            )
            # Closing before accept is how ASGI refuses a handshake: the server answers 403.
            await self._close_quietly(CLOSE_POLICY_VIOLATION, "origin not allowed")
            return
        self._frame_guard = limits.frame_guard()
        close_code: int | None = CLOSE_NORMAL
        try:
            self.channel_name = await self.channel_layer.new_channel(self.channel_name_prefix)
            for group in self.groups:
                await self.group_add(group)
            await self.connect()
            if not self._accepted and not self._closed:
                await self.accept()
            close_code = self._close_code if self._closed else await self._run()
        except WebSocketDisconnect as exc:
            close_code = exc.code
        except Exception:
            logger.exception("%s failed on %s", type(self).__name__, self.channel_name or "a new connection")
            close_code = CLOSE_INTERNAL_ERROR
            await self._close_quietly(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            if self.channel_name:
                # Nobody reads this channel again: released before the groups are left (a
                # broker round trip each, longer while presence changes queue), so that what
                # the groups send meanwhile is dropped at once instead of filling its mailbox.
                self.channel_layer.forget_channel(self.channel_name)
            await self._leave_groups()
            try:
                await self.disconnect(close_code)
            except Exception:
                logger.exception("%s.disconnect() failed", type(self).__name__)
            if observing.hooks is not None:
                observing.hooks.connection_ended(self, self._accepted, close_code)

    async def _run(self) -> int | None:
        # One task per connection, this one, reads the client's frames. Channel events are
        # handed to a callback (layer.listen) that starts a task only while there are events
        # to handle, so an idle connection holds no second task and no mailbox. When event
        # handling ends the connection, that task cancels this one (see _stop_frames).
        task = asyncio.current_task()
        assert task is not None
        self._context = contextvars.copy_context()
        self._loop = task.get_loop()
        self._frames_task = task
        if _LINGER:
            self._sweeper = _sweeper_for(self._loop)
        try:
            self._take_events(self.channel_layer.listen(self.channel_name, self._take_events))
            return await self._frame_loop()
        except asyncio.CancelledError:
            self._frames_task = None
            if self._stop_code is _RUNNING or _uncancel(task):
                raise  # not (only) our own stop request
            return self._stop_code
        except ChannelLayerClosed:  # the layer closed before the first listen()
            self._frames_task = None
            await self._close_quietly(CLOSE_SERVICE_RESTART, "service restart")
            return CLOSE_SERVICE_RESTART
        finally:
            self._frames_task = None
            self.channel_layer.unlisten(self.channel_name)
            events = self._events_task
            if events is not None:
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    # Waiting between bursts (3.10/3.11): woken to end, not cancelled. A cancelled
                    # task keeps its CancelledError, whose traceback holds the task's frame, which
                    # holds the task: a cycle per connection, left for the garbage collector.
                    self._waiter = None
                    waiter.set_result(None)
                elif not events.done():
                    events.cancel()
                # Shielded: under Starlette's test client this task may be cancelled by an
                # anyio scope, which would interrupt this wait over and over.
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((events,))
            if self._sweeper is not None:
                self._sweeper.waiting.discard(self)
            if events is not None and not events.cancelled() and events.exception() is not None:
                raise events.exception()  # type: ignore[misc]  # a BaseException: exits and the like

    def _take_events(self, item: Message | BaseException | None) -> None:
        # The listener left with layer.listen() too: called synchronously by the delivery (a
        # group_send, a broker reader), so it only starts the task.
        if item is None:
            return
        context = self._context
        assert context is not None  # set by _run() before the first listen()
        # On Python 3.12+ the task's first step runs right here, so a handler that does not
        # wait (the usual case: a socket write that does not block) costs no loop turn.
        # Not from this connection's own frame task (a receive handler sending to its own
        # channel): an event that ends the connection stops that task by cancelling it, and
        # the receive handler goes on first, as it always did.
        eager = EAGER_TASKS and asyncio.current_task(self._loop) is not self._frames_task
        # Reset first: a task started eagerly runs its first step before start_task() returns
        # and then finds None here (see _handle_events).
        self._events_task = None
        self._events_task = start_task(self._handle_events(item), context, eager=eager, loop=self._loop)

    def _wake(self, item: Message | BaseException) -> None:
        # The listener while the events task waits for its next event (Python 3.10/3.11).
        waiter = self._waiter
        self._waiter = None
        # A waiter already done was cancelled with its task: the connection is ending, and
        # its channel's messages are released with it.
        if waiter is not None and not waiter.done():
            waiter.set_result(item)

    def _stop_frames(self, code: int | None) -> None:
        task = self._frames_task
        if task is not None and self._stop_code is _RUNNING:
            self._stop_code = code
            task.cancel()

    async def _frame_loop(self) -> int | None:
        websocket = self.websocket
        guard = self._frame_guard or self.edge_limits().frame_guard()
        while True:
            try:
                frame = await websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    self._closed = True
                    code: int | None = frame.get("code", CLOSE_NORMAL)
                    return code
                violation = guard.check(frame)
                if violation is not None:
                    logger.info(
                        "closing %s from %s with %d: %s",
                        self.channel_name,
                        _peer(websocket),
                        violation.code,
                        violation.detail,
                    )
                    await self._close_quietly(violation.code, violation.reason)
                    return violation.code
                if observing.hooks is not None:
                    await observing.hooks.frame_in(self, frame, self.dispatch_websocket_receive)
                else:
                    await self.dispatch_websocket_receive(frame)
            except WebSocketDisconnect as exc:
                self._closed = True
                return exc.code
            except Exception:
                await self._handler_failed("a client frame")
                return CLOSE_INTERNAL_ERROR
            if self._closed:
                return self._close_code

    async def _handle_events(self, item: Message | BaseException) -> None:
        """The events task: handle ``item`` and the events queued behind it, then listen again.

        One coroutine, not a loop awaited by a wrapper: its frames are made once per burst
        of events, which on Python 3.10/3.11 is once per group message.
        """
        # The task is known without asking asyncio (on Python 3.10/3.11 current_task() is a
        # Python function), except in an eager first step, where it is not assigned yet.
        task = self._events_task or asyncio.current_task(self._loop)
        assert task is not None
        code: int | None
        try:
            while True:
                if isinstance(item, BaseException):
                    if not isinstance(item, ChannelLayerClosed):
                        raise item
                    logger.info("channel layer closed; closing %s", self.channel_name)
                    await self._close_quietly(CLOSE_SERVICE_RESTART, "service restart")
                    code = CLOSE_SERVICE_RESTART
                    break
                while self._held is not None:
                    # A catch-up page is going out. Shielded: cancelling this task leaves the hold.
                    await asyncio.shield(self._held)
                try:
                    self._dispatching = task
                    self._event = item
                    try:
                        await self.dispatch_channel_message(item)
                    finally:
                        self._dispatching = _IDLE
                        self._event = None
                        waiter = self._idle_waiter
                        if waiter is not None:
                            self._idle_waiter = None
                            if not waiter.done():
                                waiter.set_result(None)
                except WebSocketDisconnect as exc:
                    self._closed = True
                    code = exc.code
                    break
                except Exception:
                    await self._handler_failed(f"event {item.get('type')!r}", item)
                    code = CLOSE_INTERNAL_ERROR
                    break
                if self._closed:
                    code = self._close_code
                    break
                next_item: Message | BaseException | None
                sweeper = self._sweeper
                try:
                    if sweeper is None:
                        next_item = self.channel_layer.listen(self.channel_name, self._take_events)
                    else:
                        next_item = self.channel_layer.listen(self.channel_name, self._wake)
                        if next_item is None:
                            # Inline, not a method: this runs once per group message and socket.
                            waiter = self._waiter = self._loop.create_future()  # type: ignore[union-attr]
                            self._waiting_since = sweeper.sweeps
                            if self not in sweeper.waiting:
                                sweeper.add(self)
                            next_item = await waiter
                            if next_item is None:
                                if self._frames_task is None:
                                    return  # the connection ended (_run's cleanup woke this wait)
                                # The sweeper ended the wait and withdrew _wake.
                                next_item = self.channel_layer.listen(self.channel_name, self._take_events)
                except ChannelLayerClosed as exc:
                    next_item = exc
                if next_item is None:
                    return  # the listener is back in place; this task ends
                item = next_item
        except Exception:
            # Not a handler's failure (those are handled per event) but the layer's.
            logger.exception("%s could not take events for %s", type(self).__name__, self.channel_name)
            await self._close_quietly(CLOSE_INTERNAL_ERROR, "internal error")
            code = CLOSE_INTERNAL_ERROR
        self._stop_frames(code)

    async def _handler_failed(self, what: str, event: Message | None = None) -> None:
        error = sys.exc_info()[1]
        others = 0 if event is None or error is None else _failed_before(type(self), event, error)
        if others:
            # A group message whose handler fails the same way on every local socket (content
            # that is not JSON, say): one traceback, then a line per socket with the count.
            logger.error(
                "%s raised while handling %s on %s: %s: %s (so did %d other connection(s) of this "
                "class for this same message; the traceback is logged with the first)",
                type(self).__name__,
                what,
                self.channel_name,
                type(error).__name__,
                error,
                others,
                extra={LOGGED_ERROR: error},
            )
        else:
            name = type(self).__name__
            logger.exception("%s raised while handling %s on %s", name, what, self.channel_name)
        await self._close_quietly(CLOSE_INTERNAL_ERROR, "internal error")

    async def _close_quietly(self, code: int, reason: str) -> None:
        if self._closed:
            return
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await self.close(code, reason)
        self._closed = True

    async def _leave_groups(self) -> None:
        for group in list(self._present_in):
            try:
                await self.channel_layer.presence_leave(group, self.channel_name)
            except ChannelLayerClosed:
                pass
            except Exception:
                logger.exception("could not leave the presence of %r for %s", group, self.channel_name)
            self._present_in.discard(group)
        for group in list(self._joined):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except ChannelLayerClosed:
                pass
            except Exception:
                logger.exception("could not leave group %r for %s", group, self.channel_name)
            self._joined.discard(group)

    # ------------------------------------------------------------ hooks

    async def connect(self) -> None:
        """Called when the client connects; the default accepts.

        If it returns without accepting or closing, the connection is accepted.
        Call ``await self.close(code)`` to reject.
        """
        await self.accept()

    async def disconnect(self, close_code: int | None) -> None:
        """Called once after the connection ended (groups are already left)."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called for each client frame; routes to :meth:`receive_text` or :meth:`receive_bytes`."""
        if text_data is not None:
            await self.receive_text(text_data)
        elif bytes_data is not None:
            await self.receive_bytes(bytes_data)

    async def receive_text(self, text_data: str) -> None:
        """Called for each text frame (default: ignore)."""

    async def receive_bytes(self, bytes_data: bytes) -> None:
        """Called for each binary frame (default: ignore)."""

    async def channel_receive(self, message: Message) -> None:
        """Called for a channel event with no handler; the default logs and ignores it."""
        event_type = message.get("type")
        name = _handler_name(event_type) if isinstance(event_type, str) else None
        if name is None:
            return  # no method may handle it, which _find_handler() logged
        logger.warning(
            "%s has no handler for event type %r (define async def %s(self, event)); ignored",
            type(self).__name__,
            event_type,
            name,
        )

    async def websocket_send(self, message: Message) -> None:
        """Write a ``websocket.send`` envelope to the socket.

        ``mode`` ``"json"`` writes ``body`` as a JSON text frame, ``"bytes"`` a
        bytes ``body`` as a binary frame and ``"text"`` a str ``body`` as a text
        frame; with no ``mode``, the body's type chooses (anything but bytes or
        str is JSON). Any other mode raises
        :class:`~fastapi_websockets.InvalidMessage` naming these, and nothing is written.
        """
        mode = message.get("mode")
        if mode == "json":  # first: the envelope a group message's sockets get most
            await self.send_json(message.get("body", message))
            return
        body = message.get("body")
        if mode == "bytes" or (mode is None and isinstance(body, bytes)):
            if not isinstance(body, bytes):
                raise TypeError(
                    f"a websocket.send envelope in bytes mode needs a bytes body, got {body!r:.60}"
                )
            await self.send_bytes(body)
        elif mode == "text" or (mode is None and isinstance(body, str)):
            if not isinstance(body, str):
                # str() of it would be Python's repr on the wire, not what the sender meant.
                raise TypeError(f"a websocket.send envelope in text mode needs a str body, got {body!r:.60}")
            await self.send_text(body)
        elif mode is None:
            await self.send_json(message.get("body", message))
        else:
            raise InvalidMessage(
                f"a websocket.send envelope has the mode {mode!r:.40}; the modes are 'json', 'bytes' "
                "and 'text' (or none: the body's type chooses); websocket_json_message() and "
                "websocket_bytes_message() build envelopes"
            )

    def _encode_shared(self, data: Any) -> str:
        # The consumers of one process that handle the same group message get the same
        # event dict, and most send the same content back (the event's body, or a new dict
        # of the event's values): encode it once. A text is reused only for content that
        # matches its snapshot leaf by leaf, so a handler that changes the content, or the
        # shared event, in place gets its own text.
        event = self._event
        cls = type(self)
        shared = _SHARED_TEXTS.get(cls)
        if shared is None or shared[0] is not event:
            shared = _SHARED_TEXTS[cls] = (event, [])
        texts = shared[1]
        for snapshot, text in texts:
            if _matches(data, snapshot):
                return text
        text = cls.encode_json(data)
        if len(texts) < _MAX_SHARED_TEXTS:
            snapshot = _snapshot(data, [_MAX_SNAPSHOT_NODES])
            if snapshot is not _UNSHAREABLE:
                texts.append((snapshot, text))
        return text

    # ------------------------------------------------------------ dispatch

    async def dispatch_websocket_receive(self, frame: Mapping[str, Any]) -> None:
        """Route one ASGI ``websocket.receive`` frame to :meth:`receive`."""
        text = frame.get("text")
        if text is not None:
            await self.receive(text_data=text)
            return
        data = frame.get("bytes")
        if data is not None:
            await self.receive(bytes_data=data)

    async def dispatch_channel_message(self, message: Message) -> None:
        """Route one channel event to the handler its ``type`` names."""
        event_type = message.get("type") if isinstance(message, dict) else None
        if type(event_type) is str and observing.hooks is None:
            # The usual case first: a type whose handler this class already found (only
            # found handlers are cached, so the checks below passed for it once).
            name = _HANDLER_NAMES.get((type(self), event_type))
            if name is not None:
                await getattr(self, name)(message)
                return
        if not isinstance(event_type, str) or not event_type:
            logger.warning(
                "%s ignored a channel event without a str 'type': %r", type(self).__name__, message
            )
            return
        handler: Callable[[Message], Awaitable[None]] | None
        if event_type == WEBSOCKET_SEND:
            handler = self.websocket_send
        else:
            cached = _HANDLER_NAMES.get((type(self), event_type))
            handler = getattr(self, cached) if cached is not None else self._find_handler(event_type)
        if handler is None and event_type in _LAYER_EVENTS:
            return  # presence events are optional to handle
        hooks = observing.hooks
        if hooks is not None:
            if handler is None:
                event_type, handler = "other", self.channel_receive
            token = hooks.event_in(self, event_type, message)
            try:
                await handler(message)
            except BaseException as exc:
                hooks.event_in_done(token, exc)
                raise
            hooks.event_in_done(token, None)
        elif handler is None:
            await self.channel_receive(message)
        else:
            await handler(message)

    def _find_handler(self, event_type: str) -> Callable[[Message], Awaitable[None]] | None:
        # The first event of a type for this class (dispatch_channel_message looks up the cache).
        name = _handler_name(event_type)
        if name is None:
            logger.warning(
                "%s refused channel event type %r: %s",
                type(self).__name__,
                event_type,
                "it names a private or framework method, not an event handler"
                if event_type.replace(".", "_").isidentifier()
                else "with '.' read as '_' it is not a Python name, so no handler can have it",
            )
            return None
        attribute = getattr(type(self), name, None)
        if attribute is None or not asyncio.iscoroutinefunction(attribute):
            return None
        # Only found handlers are remembered: their number is bounded by the class's methods,
        # while event types (maybe relayed from clients) are not.
        _HANDLER_NAMES[type(self), event_type] = name
        handler: Callable[[Message], Awaitable[None]] = getattr(self, name)
        return handler

    # ------------------------------------------------------------ actions

    async def accept(
        self, subprotocol: str | None = None, headers: Iterable[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Accept the WebSocket handshake."""
        websocket = self.websocket
        await websocket.accept(subprotocol=subprotocol, headers=headers)
        self._accepted = True
        self._direct = direct_protocol(websocket)
        if observing.hooks is not None:
            observing.hooks.connection_accepted(self)

    async def close(self, code: int = CLOSE_NORMAL, reason: str | None = None) -> None:
        """Close the connection (before accepting, this rejects it); ``disconnect()`` gets ``code``.

        Once accepted, ``code`` must be one a close frame may carry: 1000, another
        RFC 6455 code (1001-1003, 1007-1014) or an application code 3000-4999;
        any other raises ``ValueError`` (the server would drop the connection
        with no close frame). Before accepting, any code refuses with HTTP 403.
        """
        if self._accepted and code is not None and not _sendable(code):
            raise ValueError(
                f"close code {code!r} cannot be sent to a client: use 1000 (normal closure), "
                "an RFC 6455 code (1001-1003, 1007-1014) or an application code 3000-4999"
            )
        self._closed = True
        self._close_code = code
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            await self.websocket.close(code=code, reason=_reason(reason) if reason else None)

    async def send_text(self, text: str) -> None:
        """Send a text frame."""
        websocket = self.websocket
        protocol = self._direct
        if protocol is None or not write_text(protocol, websocket, text):
            await websocket.send_text(text)
        if observing.hooks is not None:
            observing.hooks.frame_out(self)

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send a binary frame."""
        await self.websocket.send_bytes(bytes(data))
        if observing.hooks is not None:
            observing.hooks.frame_out(self)

    async def send_json(self, data: Any) -> None:
        """Send ``data`` as a JSON text frame.

        Called while a channel event is handled, the text is shared: the
        consumers of a process that handle one group message and send equal
        content (the same strings, numbers and structure) encode it once.
        """
        text = self.encode_json(data) if self._event is None else self._encode_shared(data)
        # Not the property: its check costs a call per socket of every group message. (Nor
        # `self._websocket or ...`: a WebSocket is a Mapping, whose truth is a __len__ call.)
        websocket = self._websocket
        if websocket is None:
            websocket = self.websocket  # raises: this consumer serves no WebSocket yet
        protocol = self._direct
        if protocol is None or not write_text(protocol, websocket, text):
            await websocket.send_text(text)
        if observing.hooks is not None:
            observing.hooks.frame_out(self)

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Send a text or a binary frame (Channels' signature)."""
        if text_data is not None:
            await self.send_text(text_data)
        elif bytes_data is not None:
            await self.send_bytes(bytes_data)
        else:
            raise ValueError("send() needs text_data or bytes_data")

    async def group_add(self, group: str, since: StreamPosition | None = None) -> History | None:
        """Join ``group``; it is left automatically on disconnect.

        With ``since`` (the last position the client saw, for a group with
        history), the messages it missed are dispatched to the handlers, in
        offset order and each once, before any live event of the group; the
        :class:`~fastapi_websockets.history.History` page is returned (check
        ``page.recovered``: False means some were lost, e.g. trimmed).
        """
        if since is None:
            await self.channel_layer.group_add(group, self.channel_name)
            self._joined.add(group)
            return None
        if self._dispatching is asyncio.current_task():
            # Called from a channel event handler: live events wait for this one already.
            return await self._catch_up(group, since)
        lock = self._catch_up_lock
        if lock is None:
            lock = self._catch_up_lock = asyncio.Lock()
        async with lock:
            loop = asyncio.get_running_loop()
            held = self._held = loop.create_future()
            try:
                if self._dispatching is not _IDLE:
                    # An event handler is running in the events task: the page goes after it.
                    waiter = self._idle_waiter = loop.create_future()
                    await waiter
                return await self._catch_up(group, since)
            finally:
                self._held = self._idle_waiter = None
                if not held.done():
                    held.set_result(None)

    async def _catch_up(self, group: str, since: StreamPosition) -> History | None:
        page = await self.channel_layer.group_add(group, self.channel_name, since=since)
        self._joined.add(group)
        if page is not None:
            for message in page.messages:
                await self.dispatch_channel_message(message)
        return page

    async def presence_join(self, group: str, info: Mapping[str, Any] | None = None) -> None:
        """Join ``group`` and its presence with ``info``; both are left when the connection ends.

        The group's members get a ``presence.joined`` event, handled by an
        ``async def presence_joined(self, event)`` if the consumer has one
        (``presence.left`` likewise); consumers without them ignore both. A
        group this connection already joined is not joined again (no second
        broker round trip).
        """
        if group not in self._joined:
            await self.group_add(group)
        await self.channel_layer.presence_join(group, self.channel_name, info)
        self._present_in.add(group)

    async def presence_leave(self, group: str) -> None:
        """Leave the presence of ``group`` (the group itself is kept)."""
        self._present_in.discard(group)
        await self.channel_layer.presence_leave(group, self.channel_name)

    async def group_discard(self, group: str) -> None:
        """Leave ``group``."""
        await self.channel_layer.group_discard(group, self.channel_name)
        self._joined.discard(group)

    async def group_send(
        self, group: str, message: Message, *, exclude: str | Iterable[str] | None = None
    ) -> StreamPosition | None:
        """Send ``message`` to every member of ``group`` but ``exclude`` (shortcut for the layer's).

        Returns the message's position for a group with history, else None.
        """
        return await self.channel_layer.group_send(group, message, exclude=exclude)

    @classmethod
    def encode_json(cls, content: Any) -> str:
        """Serialize outgoing JSON (override for custom types).

        NaN and infinities raise :class:`~fastapi_websockets.InvalidMessage`
        naming where they are: JSON has none, and a browser would drop the
        whole frame. The text may be sent to every consumer of the class that
        sends equal content for the same channel event, so an override must
        depend on ``content`` only (and should refuse them too:
        ``json.dumps(..., allow_nan=False)``).
        """
        return encode(content)

    @classmethod
    def decode_json(cls, text_data: str) -> Any:
        """Parse incoming JSON (override for custom parsing).

        ``NaN`` and ``Infinity`` are invalid JSON, and so is a number too large
        for a float (``1e999``, which Python's ``json`` reads as an infinity).
        """
        return DECODER.decode(text_data)


class AsyncJsonWebSocketConsumer(AsyncWebSocketConsumer):
    """A consumer whose clients send JSON text frames, handled by :meth:`receive_json`."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Decode a text frame as JSON and pass it to :meth:`receive_json`."""
        if text_data is not None:
            try:
                content = self.decode_json(text_data)
            except ValueError as exc:
                await self.invalid_json(text_data, client_error(exc))
                return
            except RecursionError:
                # A few kilobytes of "[[[[..." exhaust the parser's stack: the client's fault,
                # not a handler's failure to log with a traceback and close with 1011.
                await self.invalid_json(text_data, ValueError("nested too deeply"))
                return
            await self.receive_json(content)
        elif bytes_data is not None:
            await self.receive_bytes(bytes_data)

    async def receive_json(self, content: Any) -> None:
        """Called with each decoded JSON message (default: ignore)."""

    async def receive_bytes(self, bytes_data: bytes) -> None:
        """Binary frames are not JSON: the default closes with 1003 (unsupported data)."""
        await self.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted; send JSON text frames")

    async def invalid_json(self, text_data: str, error: ValueError) -> None:
        """Called for a text frame that is not valid JSON; the default closes with 1007."""
        logger.info("closing %s: invalid JSON from client (%s)", self.channel_name, error)
        await self.close(CLOSE_INVALID_PAYLOAD, f"invalid JSON: {error}")


#: The attribute of a log record without a traceback that holds the handler's exception.
LOGGED_ERROR = "fastapi_websockets_error"


class _Failure:
    """The channel event whose handler failed last in a consumer class, how, and how often since."""

    __slots__ = ("count", "event", "what")

    def __init__(self, event: Message, what: tuple[type[BaseException], str]) -> None:
        self.event = event
        self.what = what
        self.count = 1


#: Per consumer class; holding the event keeps it alive, so ``is`` cannot meet a new one.
_FAILURES: dict[type[AsyncWebSocketConsumer], _Failure] = {}


def _failed_before(cls: type[AsyncWebSocketConsumer], event: Message, error: BaseException) -> int:
    """How many connections of ``cls`` failed with the same error on this same ``event`` before."""
    what = (type(error), str(error))
    failure = _FAILURES.get(cls)
    if failure is None or failure.event is not event or failure.what != what:
        _FAILURES[cls] = _Failure(event, what)
        return 0
    failure.count += 1
    return failure.count - 1


#: (consumer class, event type) -> the name of the handler method it dispatches to.
_HANDLER_NAMES: dict[tuple[type[AsyncWebSocketConsumer], str], str] = {}

#: Per consumer class: the channel event handled last, and the texts sent for it with their
#: content's snapshot. Holding the event keeps it alive, so ``is`` cannot meet a new one.
_SHARED_TEXTS: dict[type[AsyncWebSocketConsumer], tuple[Message | None, list[tuple[object, str]]]] = {}
#: Different contents one event may share (a handler that sends a few frames per event).
_MAX_SHARED_TEXTS = 4
#: Larger contents are encoded per socket: comparing them in Python would cost more.
_MAX_SNAPSHOT_NODES = 64
#: Leaves that encode the same whenever they are equal (floats: 0.0 == -0.0, so identity).
_EQUAL_ATOMS = frozenset((str, int, bool, type(None)))
_UNSHAREABLE = object()


class _DictSnapshot(tuple):  # type: ignore[type-arg]
    """A dict's keys and its values' snapshots, as two tuples in the dict's order."""

    __slots__ = ()


class _ListSnapshot(tuple):  # type: ignore[type-arg]
    """A list's snapshots, in order."""

    __slots__ = ()


def _snapshot(value: Any, budget: list[int]) -> object:
    """What ``value`` encodes from: its atoms and the shape holding them; _UNSHAREABLE past the budget."""
    budget[0] -= 1
    if budget[0] < 0:
        return _UNSHAREABLE
    kind = type(value)
    if kind in _EQUAL_ATOMS or kind is float:
        return value
    if kind is dict:
        keys = []
        snapshots = []
        for key, item in value.items():
            if type(key) is not str:
                return _UNSHAREABLE
            snapshot = _snapshot(item, budget)
            if snapshot is _UNSHAREABLE:
                return _UNSHAREABLE
            keys.append(key)
            snapshots.append(snapshot)
        return _DictSnapshot((tuple(keys), tuple(snapshots)))
    if kind is list:
        items = []
        for item in value:
            snapshot = _snapshot(item, budget)
            if snapshot is _UNSHAREABLE:
                return _UNSHAREABLE
            items.append(snapshot)
        return _ListSnapshot(items)
    return _UNSHAREABLE


def _matches(value: Any, snapshot: object) -> bool:
    """Whether ``value`` encodes exactly as the content ``snapshot`` was taken of.

    The walk follows the snapshot, so it is as bounded as the snapshot is.
    """
    kind = type(value)
    if kind is dict:  # first: what a handler sends is usually a dict
        if type(snapshot) is not _DictSnapshot:
            return False
        keys, snapshots = snapshot
        if len(keys) != len(value):
            return False
        # The usual case, checked in C: the same keys and values as the snapshot's, identical
        # (the event's own dict, or a new dict of its values). A snapshot holds its atoms
        # themselves (immutable) and never a container of the content, so identical is enough.
        if all(map(operator.is_, value.values(), snapshots)) and all(map(operator.is_, value, keys)):
            return True
        for (key, item), snapshot_key, item_snapshot in zip(value.items(), keys, snapshots, strict=True):
            # Identical is enough: a snapshot holds its atoms themselves (immutable) and never a
            # container of the content, and its keys are str. The usual case: the same event's values.
            if item is item_snapshot and key is snapshot_key:
                continue
            if type(key) is not str or key != snapshot_key:
                return False
            # Atoms inline: this loop runs once per socket for a group message's content.
            item_kind = type(item)
            if item_kind is float:
                if item is not item_snapshot:
                    return False
            elif item_kind in _EQUAL_ATOMS:
                if type(item_snapshot) is not item_kind or item != item_snapshot:
                    return False
            elif not _matches(item, item_snapshot):
                return False
        return True
    if kind is float:
        return value is snapshot
    if kind in _EQUAL_ATOMS:
        return type(snapshot) is kind and value == snapshot
    if kind is list:
        if type(snapshot) is not _ListSnapshot or len(snapshot) != len(value):
            return False
        return all(_matches(item, item_snapshot) for item, item_snapshot in zip(value, snapshot, strict=True))
    return False


#: Whether an events task waits for the next event after its burst instead of ending (see _Sweeper).
_LINGER = not EAGER_TASKS
#: How long, at least, an events task waits for another event; at most twice this.
_LINGER_SECONDS = 1.0


class _Sweeper:
    """Ends the events tasks of one event loop that waited a whole period for their next event.

    Python 3.10 and 3.11 only. There a task per event burst costs more than the
    burst's handler (creating it, registering it in asyncio's set of all tasks
    and removing it are Python code), so a consumer's events task, done with a
    burst, waits for the next event on a future (its listener, ``_wake``, sets
    it), and a room that gets a message every few seconds or more often keeps
    its tasks. An idle connection must still hold no task: one timer per loop,
    armed while tasks wait, ends every task that waited since before the
    previous sweep, after withdrawing its listener so that no event can reach
    the ended wait (the task leaves the task-starting listener again, or takes
    what was queued meanwhile). On Python 3.12+ a task starts eagerly, inside
    the delivery, and a waiting task would cost a loop turn more.
    """

    __slots__ = ("_timer", "sweeps", "waiting")

    def __init__(self) -> None:
        self.sweeps = 0
        #: Consumers whose events task waits or handles a burst; dropped when it ends.
        self.waiting: set[AsyncWebSocketConsumer] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, consumer: AsyncWebSocketConsumer) -> None:
        self.waiting.add(consumer)
        loop = consumer._loop
        if self._timer is None and loop is not None:
            self._timer = loop.call_later(_LINGER_SECONDS, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()  # called before its time (tests do): one timer at a time
        self._timer = None
        self.sweeps += 1
        stale = self.sweeps - 2  # stamped before the previous sweep: waited a whole period
        for consumer in [consumer for consumer in self.waiting if consumer._waiting_since <= stale]:
            waiter = consumer._waiter
            if waiter is None or waiter.done():
                continue  # handling an event (stamped again at its next wait), or being cancelled
            self.waiting.discard(consumer)
            consumer._waiter = None
            consumer.channel_layer.unlisten(consumer.channel_name)
            waiter.set_result(None)
        if self.waiting:
            self._timer = loop.call_later(_LINGER_SECONDS, self._sweep, loop)


#: One sweeper per event loop (a loop per thread: Starlette's test client runs its own).
_SWEEPERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = weakref.WeakKeyDictionary()


def _sweeper_for(loop: asyncio.AbstractEventLoop) -> _Sweeper:
    sweeper = _SWEEPERS.get(loop)
    if sweeper is None:
        sweeper = _SWEEPERS[loop] = _Sweeper()
    return sweeper


#: Events the layer itself sends; a consumer without a handler for them ignores them silently.
_LAYER_EVENTS = frozenset((PRESENCE_JOINED, PRESENCE_LEFT))

#: Names a channel event may never dispatch to: everything the framework defines.
_FRAMEWORK_NAMES = frozenset(dir(AsyncJsonWebSocketConsumer)) | frozenset(
    ("channel_layer", "channel_name", "scope", "websocket", "groups")
)
