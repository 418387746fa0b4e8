"""OpenTelemetry traces that follow a message from its sender to every socket (the ``tracing`` extra).

Call :func:`instrument_tracing` once per process. Then:

* ``send`` and ``group_send`` run in a span (``fastapi_websockets send``,
  ``fastapi_websockets group_send``) whose W3C trace context travels inside the
  message, under the one key instrumentation reserves; the receiving process
  removes that key before any handler sees the message;
* a consumer handles each channel event in a span
  ``fastapi_websockets handle <event type>`` (``other`` for types it has no
  handler for) whose parent is the sender's span, in whichever process and on
  whichever backend it runs;
* each frame from a client is handled in a span ``fastapi_websockets receive``,
  so a ``group_send`` made while handling it joins the same trace.

Every process of the app should be instrumented: one that is not still
removes the reserved key but starts no span.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from contextvars import Token
from typing import Any, cast

from fastapi_websockets import observing
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.consumers import AsyncWebSocketConsumer
from fastapi_websockets.types import Message

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastapi_websockets.tracing needs opentelemetry-api, which is not installed; "
        'install it with: pip install "fastapi-websockets[tracing]"'
    ) from exc

__all__ = ["instrument_tracing"]

_SYSTEM = "fastapi_websockets"
_PROPAGATOR = TraceContextTextMapPropagator()
#: Where a received message's parsed parent context is kept, next to its carrier.
_PARENT = "parent"


def _version() -> str:
    from fastapi_websockets import __version__

    return __version__


def _finish(token: object, error: BaseException | None) -> None:
    span, context_token = cast("tuple[Span, Token[Context]]", token)
    otel_context.detach(context_token)
    if error is not None and not isinstance(error, asyncio.CancelledError):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


class _Tracing(observing.Observer):
    """Starts the spans and carries their context through the messages."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        # Built once per event type and per consumer class rather than per handled event:
        # a group message to a thousand local sockets is a thousand handle spans.
        self._handle_names: dict[str, str] = {}
        self._consumer_attributes: dict[type[AsyncWebSocketConsumer], dict[str, str]] = {}

    def _enter(self, span: Span) -> object:
        return span, otel_context.attach(trace.set_span_in_context(span))

    def message_out(self, layer: BaseChannelLayer, operation: str, meta: dict[str, Any]) -> object:
        span = self.tracer.start_span(
            f"{_SYSTEM} {operation}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.name": operation,
                "fastapi_websockets.backend": layer.backend_name,
            },
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        meta["tc"] = carrier
        return self._enter(span)

    def message_out_done(self, token: object, error: BaseException | None) -> None:
        _finish(token, error)

    def frame_in(self, consumer: AsyncWebSocketConsumer) -> object:
        span = self.tracer.start_span(
            f"{_SYSTEM} receive",
            kind=SpanKind.SERVER,
            attributes={"messaging.system": _SYSTEM, "fastapi_websockets.consumer": type(consumer).__name__},
        )
        return self._enter(span)

    def frame_in_done(self, token: object, error: BaseException | None) -> None:
        _finish(token, error)

    def event_in(self, consumer: AsyncWebSocketConsumer, event: str, message: Message) -> object:
        name = self._handle_names.get(event)
        if name is None:
            # Bounded: event is a type the consumer class has a handler for, or "other".
            name = self._handle_names[event] = f"{_SYSTEM} handle {event}"
        cls = type(consumer)
        attributes = self._consumer_attributes.get(cls)
        if attributes is None:
            # One attribute only: the SDK checks each one on every span, and the name
            # already holds the event type. The SDK copies it, so one dict serves all spans.
            attributes = self._consumer_attributes[cls] = {"fastapi_websockets.consumer": cls.__name__}
        span = self.tracer.start_span(
            name, context=self._parent(message), kind=SpanKind.CONSUMER, attributes=attributes
        )
        return self._enter(span)

    @staticmethod
    def _parent(message: Message) -> Context | None:
        if not isinstance(message, observing.Delivered):
            return None
        meta = message.meta
        # Every local receiver of one group_send gets the same Delivered: parse its context once.
        parent: Context | None = meta.get(_PARENT)
        if parent is None:
            carrier = meta.get("tc")
            if not isinstance(carrier, Mapping):
                return None
            parent = meta[_PARENT] = _PROPAGATOR.extract(carrier)
        return parent

    def event_in_done(self, token: object, error: BaseException | None) -> None:
        _finish(token, error)


_tracing: _Tracing | None = None
_install_lock = threading.Lock()


def instrument_tracing(tracer_provider: TracerProvider | None = None) -> None:
    """Turn on OpenTelemetry spans for every layer and consumer in this process.

    Spans come from ``tracer_provider`` (default: the global provider, also
    one set after this call). Idempotent: calling it again starts no second
    set of spans; it only switches to the ``tracer_provider`` given.
    """
    global _tracing
    tracer = trace.get_tracer(_SYSTEM, _version(), tracer_provider=tracer_provider)
    with _install_lock:
        if _tracing is None:
            _tracing = _Tracing(tracer)
            observing.install(_tracing)
        elif tracer_provider is not None:
            _tracing.tracer = tracer
