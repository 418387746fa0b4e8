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
are written to the socket with no handler.

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
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import anyio
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from fastapi_websockets import observing
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.edge import CLOSE_POLICY_VIOLATION, EdgeLimits, FrameGuard, resolve_limits
from fastapi_websockets.exceptions import ChannelLayerClosed
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
_MAX_REASON_BYTES = 123


def _reason(text: str) -> str:
    encoded = text.encode()[:_MAX_REASON_BYTES]
    return encoded.decode(errors="ignore")


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
        self._accepted = False
        self._closed = False
        self._joined: set[str] = set()
        self._present_in: set[str] = set()
        # Held while a channel event is dispatched, and while a catch-up page is, so that
        # the page's messages go out before any live event of the group.
        self._dispatch_lock = asyncio.Lock()
        self._dispatching: asyncio.Task[Any] | None = None
        self._frame_guard: FrameGuard | None = None

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
            raise RuntimeError("this consumer is not serving a WebSocket yet; call it with one")
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
        self.scope = dict(websocket.scope)
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
            if not self._closed:
                close_code = await self._run()
        except WebSocketDisconnect as exc:
            close_code = exc.code
        except Exception:
            logger.exception("%s failed on %s", type(self).__name__, self.channel_name or "a new connection")
            close_code = CLOSE_INTERNAL_ERROR
            await self._close_quietly(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            await self._leave_groups()
            try:
                await self.disconnect(close_code)
            except Exception:
                logger.exception("%s.disconnect() failed", type(self).__name__)
            if self.channel_name:
                # Anything still addressed to this connection is dropped from now on.
                self.channel_layer.forget_channel(self.channel_name)
            if observing.hooks is not None:
                observing.hooks.connection_ended(self, self._accepted, close_code)

    async def _run(self) -> int | None:
        # An anyio task group, not bare asyncio tasks: Starlette's test client cancels the
        # app through anyio cancel scopes, which bare tasks awaited in a finally block confuse.
        codes: list[int | None] = []

        async with anyio.create_task_group() as group:

            async def run_until_done(loop: Callable[[], Awaitable[int | None]]) -> None:
                codes.append(await loop())
                group.cancel_scope.cancel()

            group.start_soon(run_until_done, self._frame_loop)
            group.start_soon(run_until_done, self._event_loop)
        return codes[0] if codes else None

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
                return CLOSE_NORMAL

    async def _event_loop(self) -> int | None:
        while True:
            try:
                message = await self.channel_layer.receive(self.channel_name)
            except ChannelLayerClosed:
                logger.info("channel layer closed; closing %s", self.channel_name)
                await self._close_quietly(1012, "service restart")
                return 1012
            try:
                async with self._dispatch_lock:
                    self._dispatching = asyncio.current_task()
                    try:
                        await self.dispatch_channel_message(message)
                    finally:
                        self._dispatching = None
            except WebSocketDisconnect as exc:
                self._closed = True
                return exc.code
            except Exception:
                await self._handler_failed(f"event {message.get('type')!r}")
                return CLOSE_INTERNAL_ERROR
            if self._closed:
                return CLOSE_NORMAL

    async def _handler_failed(self, what: str) -> None:
        logger.exception("%s raised while handling %s on %s", type(self).__name__, what, self.channel_name)
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
        logger.warning(
            "%s has no handler for event type %r (define async def %s(self, event)); ignored",
            type(self).__name__,
            message.get("type"),
            str(message.get("type", "")).replace(".", "_"),
        )

    async def websocket_send(self, message: Message) -> None:
        """Write a ``websocket.send`` envelope to the socket (``mode`` json, bytes or text)."""
        mode = message.get("mode")
        body = message.get("body")
        if mode == "bytes" or (mode is None and isinstance(body, bytes)):
            if not isinstance(body, bytes):
                raise TypeError(
                    f"a websocket.send envelope in bytes mode needs a bytes body, got {body!r:.60}"
                )
            await self.send_bytes(body)
        elif mode == "text" or (mode is None and isinstance(body, str)):
            await self.send_text(str(body))
        elif type(self).send_json is not AsyncWebSocketConsumer.send_json:
            await self.send_json(message.get("body", message))  # the app customised send_json
        else:
            await self.send_text(self._encode_envelope(message))

    def _encode_envelope(self, message: Message) -> str:
        # One group_send reaches every local member as the same dict: encode it once
        # per class, not once per socket.
        cls = type(self)
        cached = _ENVELOPE_CACHE.get(cls)
        if cached is not None and cached[0] is message:
            return cached[1]
        text = self.encode_json(message.get("body", message))
        _ENVELOPE_CACHE[cls] = (message, text)
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
        if not isinstance(event_type, str) or not event_type:
            logger.warning(
                "%s ignored a channel event without a str 'type': %r", type(self).__name__, message
            )
            return
        handler = self.websocket_send if event_type == WEBSOCKET_SEND else self._handler_for(event_type)
        if handler is None and event_type in _LAYER_EVENTS:
            return  # presence events are optional to handle
        if observing.hooks is not None:
            event = event_type if handler is not None else "other"
            await observing.hooks.event_in(self, event, message, handler or self.channel_receive)
        elif handler is None:
            await self.channel_receive(message)
        else:
            await handler(message)

    def _handler_for(self, event_type: str) -> Callable[[Message], Awaitable[None]] | None:
        name = event_type.replace(".", "_")
        if not name.isidentifier() or name.startswith("_") or name in _FRAMEWORK_NAMES:
            logger.warning(
                "%s refused channel event type %r: it names a private or framework method, "
                "not an event handler",
                type(self).__name__,
                event_type,
            )
            return None
        attribute = getattr(type(self), name, None)
        if attribute is None or not asyncio.iscoroutinefunction(attribute):
            return None
        handler: Callable[[Message], Awaitable[None]] = getattr(self, name)
        return handler

    # ------------------------------------------------------------ actions

    async def accept(
        self, subprotocol: str | None = None, headers: Iterable[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Accept the WebSocket handshake."""
        await self.websocket.accept(subprotocol=subprotocol, headers=headers)
        self._accepted = True
        if observing.hooks is not None:
            observing.hooks.connection_accepted(self)

    async def close(self, code: int = CLOSE_NORMAL, reason: str | None = None) -> None:
        """Close the connection (before accepting, this rejects it)."""
        self._closed = True
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            await self.websocket.close(code=code, reason=_reason(reason) if reason else None)

    async def send_text(self, text: str) -> None:
        """Send a text frame."""
        await self.websocket.send_text(text)
        if observing.hooks is not None:
            observing.hooks.frame_out(self)

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send a binary frame."""
        await self.websocket.send_bytes(bytes(data))
        if observing.hooks is not None:
            observing.hooks.frame_out(self)

    async def send_json(self, data: Any) -> None:
        """Send ``data`` as a JSON text frame."""
        await self.websocket.send_text(self.encode_json(data))
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
            # Called from a channel event handler: events are already held.
            return await self._catch_up(group, since)
        async with self._dispatch_lock:
            return await self._catch_up(group, since)

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
        (``presence.left`` likewise); consumers without them ignore both.
        """
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
        """Serialize outgoing JSON (override for custom types)."""
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode_json(cls, text_data: str) -> Any:
        """Parse incoming JSON (override for custom parsing)."""
        return json.loads(text_data)


class AsyncJsonWebSocketConsumer(AsyncWebSocketConsumer):
    """A consumer whose clients send JSON text frames, handled by :meth:`receive_json`."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Decode a text frame as JSON and pass it to :meth:`receive_json`."""
        if text_data is not None:
            try:
                content = self.decode_json(text_data)
            except ValueError as exc:
                await self.invalid_json(text_data, exc)
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


#: The last JSON envelope each consumer class encoded (the message is kept, so ``is`` is safe).
_ENVELOPE_CACHE: dict[type[AsyncWebSocketConsumer], tuple[Message, str]] = {}

#: Events the layer itself sends; a consumer without a handler for them ignores them silently.
_LAYER_EVENTS = frozenset((PRESENCE_JOINED, PRESENCE_LEFT))

#: Names a channel event may never dispatch to: everything the framework defines.
_FRAMEWORK_NAMES = frozenset(dir(AsyncJsonWebSocketConsumer)) | frozenset(
    ("channel_layer", "channel_name", "scope", "websocket", "groups")
)
