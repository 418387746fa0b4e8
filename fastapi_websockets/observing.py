"""The hook points that :mod:`fastapi_websockets.metrics` and :mod:`fastapi_websockets.tracing` fill.

Nothing here imports prometheus-client or OpenTelemetry. Layers and consumers
check one module attribute, :data:`hooks`, on their hot paths; it stays None
until an instrumentation is installed with :func:`install`, so an app that
turns on neither pays that check and nothing else.

Instrumentations see three moments: a message leaving (``send`` and
``group_send``, with a ``meta`` dict they may fill and that travels inside the
message under :data:`RESERVED_KEY`), a message arriving in a process (decoded
from the broker; the reserved key is removed there, before any handler sees
the message), and a consumer's connection, frames and handled events. What
``receive()`` returns is not a moment of its own: layers count it in their
``stats`` (``received``), which metrics read at scrape time, so that no call
is made per receiver.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from fastapi_websockets.types import Message

if TYPE_CHECKING:
    from fastapi_websockets.backends.base import BaseChannelLayer
    from fastapi_websockets.consumers import AsyncWebSocketConsumer

__all__ = ["RESERVED_KEY", "Delivered", "Hooks", "Observer", "hooks", "install", "live_layers"]

T = TypeVar("T")

#: The one message key instrumentation reserves: ``{"ts": sent-at, "tc": W3C trace context}``.
RESERVED_KEY = "__fastapi_websockets__"

#: Every layer instance not yet garbage collected; read at scrape time, never on a hot path.
live_layers: weakref.WeakSet[BaseChannelLayer] = weakref.WeakSet()


class Delivered(dict[str, Any]):
    """A received message whose sender attached instrumentation data (kept aside in :attr:`meta`)."""

    __slots__ = ("meta",)

    def __init__(self, message: Mapping[str, Any], meta: dict[str, Any]) -> None:
        super().__init__(message)
        self.meta = meta


class Observer:
    """Base class of an instrumentation: every method is a no-op to override.

    Methods returning a token are paired with a ``*_done(token, error)`` call
    made after the observed operation, in the same task, with the exception it
    raised (or None).
    """

    def layer_created(self, layer: BaseChannelLayer) -> None:
        """A layer is being created (those created before :func:`install` are in :data:`live_layers`).

        Called from ``BaseChannelLayer.__init__``, before the backend's own
        ``__init__`` has finished: only ``backend_name``, ``stats`` and, on a
        broker layer, ``connection`` may be read yet.
        """

    def message_out(self, layer: BaseChannelLayer, operation: str, meta: dict[str, Any]) -> object:
        """A ``send`` or ``group_send`` (``operation``) starts; fill ``meta`` to send data along."""
        return None

    def message_out_done(self, token: object, error: BaseException | None) -> None:
        """The operation :meth:`message_out` announced has finished."""

    def message_in(self, layer: BaseChannelLayer, meta: Mapping[str, Any]) -> None:
        """A message carrying ``meta`` arrived in this process (once per process, not per receiver)."""

    def connection_accepted(self, consumer: AsyncWebSocketConsumer) -> None:
        """A consumer accepted its WebSocket."""

    def connection_ended(self, consumer: AsyncWebSocketConsumer, accepted: bool, code: int | None) -> None:
        """A consumer finished serving its WebSocket (``accepted`` False: it was rejected)."""

    def frame_in(self, consumer: AsyncWebSocketConsumer) -> object:
        """A consumer starts handling a frame from its client."""
        return None

    def frame_in_done(self, token: object, error: BaseException | None) -> None:
        """The frame :meth:`frame_in` announced has been handled."""

    def frame_out(self, consumer: AsyncWebSocketConsumer) -> None:
        """A consumer wrote a frame to its client."""

    def event_in(self, consumer: AsyncWebSocketConsumer, event: str, message: Message) -> object:
        """A consumer starts handling a channel event (``event``: its type, or ``"other"``)."""
        return None

    def event_in_done(self, token: object, error: BaseException | None) -> None:
        """The event :meth:`event_in` announced has been handled."""


class Hooks:
    """The installed observers, called in installation order (and ``*_done`` in reverse)."""

    #: Called once per message per receiver, or once per frame to a client (a group
    #: message to a thousand local sockets calls each a thousand times), so each is
    #: bound here to the one observer that implements it where there is only one,
    #: saving a loop and a call per use, and skips observers that leave it a no-op.
    frame_out: Callable[[AsyncWebSocketConsumer], None]
    event_in: Callable[[AsyncWebSocketConsumer, str, Message], object]
    """Announce a channel event (its type, or ``"other"``); pass the result to :attr:`event_in_done`."""
    event_in_done: Callable[[object, BaseException | None], None]
    """The event announced by :attr:`event_in`, which returned the token given, has been handled."""

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers
        frames_out = [o.frame_out for o in observers if _overrides(o, "frame_out")]
        self.frame_out = _each(frames_out)
        handling = [o for o in observers if _overrides(o, "event_in") or _overrides(o, "event_in_done")]
        if len(handling) == 1:
            self.event_in = handling[0].event_in
            self.event_in_done = handling[0].event_in_done
        else:
            self._handling = handling
            self.event_in = self._event_in_each
            self.event_in_done = self._event_in_done_each

    async def message_out(
        self,
        layer: BaseChannelLayer,
        operation: str,
        message: Message,
        call: Callable[[Message], Awaitable[T]],
    ) -> T:
        """Run ``call`` (the actual send) on ``message`` plus the observers' reserved key."""
        meta: dict[str, Any] = {}
        tokens = [(observer, observer.message_out(layer, operation, meta)) for observer in self.observers]
        if meta:
            message = {**message, RESERVED_KEY: meta}
        try:
            result = await call(message)
        except BaseException as exc:
            for observer, token in reversed(tokens):
                observer.message_out_done(token, exc)
            raise
        for observer, token in reversed(tokens):
            observer.message_out_done(token, None)
        return result

    def layer_created(self, layer: BaseChannelLayer) -> None:
        for observer in self.observers:
            observer.layer_created(layer)

    def connection_accepted(self, consumer: AsyncWebSocketConsumer) -> None:
        for observer in self.observers:
            observer.connection_accepted(consumer)

    def connection_ended(self, consumer: AsyncWebSocketConsumer, accepted: bool, code: int | None) -> None:
        for observer in self.observers:
            observer.connection_ended(consumer, accepted, code)

    async def frame_in(
        self,
        consumer: AsyncWebSocketConsumer,
        frame: Mapping[str, Any],
        dispatch: Callable[[Mapping[str, Any]], Awaitable[None]],
    ) -> None:
        tokens = [(observer, observer.frame_in(consumer)) for observer in self.observers]
        try:
            await dispatch(frame)
        except BaseException as exc:
            for observer, token in reversed(tokens):
                observer.frame_in_done(token, exc)
            raise
        for observer, token in reversed(tokens):
            observer.frame_in_done(token, None)

    def _event_in_each(self, consumer: AsyncWebSocketConsumer, event: str, message: Message) -> object:
        return [observer.event_in(consumer, event, message) for observer in self._handling]

    def _event_in_done_each(self, token: object, error: BaseException | None) -> None:
        tokens = cast("list[object]", token)
        for observer, observer_token in zip(reversed(self._handling), reversed(tokens), strict=True):
            observer.event_in_done(observer_token, error)


def _overrides(observer: Observer, method: str) -> bool:
    """Whether ``observer``'s class does something in ``method`` (the base class's are no-ops)."""
    return getattr(type(observer), method) is not getattr(Observer, method)


def _each(calls: Sequence[Callable[[T], None]]) -> Callable[[T], None]:
    """One callable that makes every call in ``calls``, as cheaply as their number allows."""
    if len(calls) == 1:
        return calls[0]

    def each(argument: T) -> None:
        for call in calls:
            call(argument)

    return each


#: The installed instrumentation, or None (then no observing code runs at all).
hooks: Hooks | None = None


def install(observer: Observer) -> None:
    """Add ``observer`` to :data:`hooks`; installing the same observer again does nothing."""
    global hooks
    current = hooks.observers if hooks is not None else ()
    if observer not in current:
        hooks = Hooks((*current, observer))


def incoming(layer: BaseChannelLayer, message: dict[str, Any]) -> Message:
    """Take the reserved key out of a decoded ``message``; tell the observers what it carried.

    Called once per message arriving in a process. The key is removed even
    where no instrumentation is installed, so a handler never sees it when
    only some processes of an app are instrumented.
    """
    meta = message.pop(RESERVED_KEY)
    if hooks is None or not isinstance(meta, dict):
        return message
    for observer in hooks.observers:
        observer.message_in(layer, meta)
    return Delivered(message, meta) if "tc" in meta else message
