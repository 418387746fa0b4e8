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
from typing import Any

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


#: What a ``*_in`` hook returns: the span it started and the token that made it current.
_Started = tuple[Span, "Token[Context]"]


def _finish(token: _Started, error: BaseException | None) -> None:
    span, context_token = token
    otel_context.detach(context_token)
    if error is not None and not isinstance(error, asyncio.CancelledError):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


class _Tracing(observing.Observer):
    """Starts the spans and carries their context through the messages."""

    # The token each *_in hook returns is a _Started, so each *_done hook is _finish itself:
    # the hooks call it directly, one call less per handled event.
    message_out_done = frame_in_done = event_in_done = staticmethod(_finish)  # type: ignore[assignment]

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        # Built once per consumer class and event type rather than per handled event: a
        # group message to a thousand local sockets is a thousand handle spans. Bounded:
        # the event is a type the class has a handler for, or "other".
        self._handles: dict[tuple[type[AsyncWebSocketConsumer], str], tuple[str, dict[str, str]]] = {}

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
        context = trace.set_span_in_context(span)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=context)
        meta["tc"] = carrier
        return span, otel_context.attach(context)

    def message_in(self, layer: BaseChannelLayer, meta: Mapping[str, Any]) -> None:
        # Once per message and process, however many local receivers handle it: parse the
        # sender's context here, not in each receiver's event_in.
        carrier = meta.get("tc")
        if isinstance(carrier, Mapping) and isinstance(meta, dict):
            meta[_PARENT] = _PROPAGATOR.extract(carrier)

    def frame_in(self, consumer: AsyncWebSocketConsumer) -> object:
        span = self.tracer.start_span(
            f"{_SYSTEM} receive",
            kind=SpanKind.SERVER,
            attributes={"messaging.system": _SYSTEM, "fastapi_websockets.consumer": type(consumer).__name__},
        )
        return span, otel_context.attach(trace.set_span_in_context(span))

    def event_in(self, consumer: AsyncWebSocketConsumer, event: str, message: Message) -> object:
        try:
            name, attributes = self._handles[type(consumer), event]
        except KeyError:
            # One attribute only: the SDK checks each one on every span, and the name
            # already holds the event type. The SDK copies it, so one dict serves all spans.
            name, attributes = self._handles[type(consumer), event] = (
                f"{_SYSTEM} handle {event}",
                {"fastapi_websockets.consumer": type(consumer).__name__},
            )
        parent: Context | None = (
            message.meta.get(_PARENT) if isinstance(message, observing.Delivered) else None
        )
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes)
        return span, otel_context.attach(trace.set_span_in_context(span))


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
