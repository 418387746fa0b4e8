"""The app the observability tests run under uvicorn, in processes of its own.

Metrics and tracing are on (as a user turns them on), on a Redis layer named
by ``OBS_REDIS_URL`` and ``OBS_PREFIX``. Besides ``/metrics`` it serves the
spans this process finished at ``/spans``, from the SDK's in-memory exporter.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import prometheus_client
from fastapi import Depends, FastAPI, Request
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    BaseChannelLayer,
    channel_layer_dependency,
    channel_layers_lifespan,
)
from fastapi_websockets.metrics import instrument
from fastapi_websockets.tracing import instrument_tracing

ROOM = "obs-room"
#: A group whose one member nobody reads, with a capacity of 1: the third message is dropped.
FILL_GROUP = "obs-fill"

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
instrument()
instrument()  # idempotent: a second call must not register the metrics twice
instrument_tracing(provider)
tracer = provider.get_tracer("tests.e2e.observability_app")


class RoomConsumer(AsyncJsonWebSocketConsumer):
    """Joins the room; each client frame names an action in ``do``."""

    groups = (ROOM,)

    async def connect(self) -> None:
        if self.query_params.get("reject"):
            await self.close(4003, "rejected")
            return
        await self.accept()

    async def receive_json(self, content: Any) -> None:
        action = content.get("do")
        if action == "echo":
            await self.send_json({"echo": content.get("text")})
        elif action == "broadcast":
            await self.group_send(ROOM, {"type": "room.message", "text": content.get("text")})
        elif action in ("boom", "no.handler"):
            await self.channel_layer.send(self.channel_name, {"type": action})

    async def room_message(self, event: dict[str, Any]) -> None:
        # The keys tell the test that instrumentation's reserved key never reaches a handler.
        await self.send_json({"text": event["text"], "keys": sorted(event), "pid": os.getpid()})

    async def boom(self, event: dict[str, Any]) -> None:
        raise RuntimeError("a handler failure the metrics must count")


settings = {
    "default": {
        "BACKEND": "redis",
        "CONFIG": {
            "url": os.environ["OBS_REDIS_URL"],
            "prefix": os.environ["OBS_PREFIX"],
            "channel_capacity": {"fill.*": 1},
        },
    }
}
app = FastAPI(lifespan=channel_layers_lifespan(settings))
app.add_api_websocket_route("/ws", RoomConsumer.as_endpoint())
app.mount("/metrics", prometheus_client.make_asgi_app())
Layer = Annotated[BaseChannelLayer, Depends(channel_layer_dependency())]


@app.post("/announce")
async def announce(request: Request, text: str, layer: Layer) -> dict[str, str]:
    """Broadcast into the room inside a span continuing the caller's trace (``traceparent``)."""
    parent = TraceContextTextMapPropagator().extract(dict(request.headers))
    with tracer.start_as_current_span("POST /announce", context=parent, kind=trace.SpanKind.SERVER):
        await layer.group_send(ROOM, {"type": "room.message", "text": text})
    return {"status": "sent"}


@app.post("/fill")
async def fill(layer: Layer) -> dict[str, str]:
    """Send three messages to a group whose only member has room for one and is never read."""
    channel = await layer.new_channel("fill")
    await layer.group_add(FILL_GROUP, channel)
    for number in range(3):
        await layer.group_send(FILL_GROUP, {"type": "fill.message", "number": number})
    return {"channel": channel}


@app.get("/spans")
async def spans() -> list[dict[str, Any]]:
    """The spans this process finished, for the test to follow one trace across processes."""
    finished = []
    for span in exporter.get_finished_spans():
        context = span.get_span_context()
        assert context is not None
        finished.append(
            {
                "name": span.name,
                "trace_id": format(context.trace_id, "032x"),
                "span_id": format(context.span_id, "016x"),
                "parent_id": format(span.parent.span_id, "016x") if span.parent is not None else None,
                "pid": os.getpid(),
            }
        )
    return finished
