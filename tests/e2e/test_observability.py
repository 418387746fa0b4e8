"""Metrics and traces seen from outside: real uvicorn processes, real WebSocket clients, Redis.

The instrumented app (``tests/e2e/observability_app.py``) runs in processes of
its own, so that instrumenting it leaves this test process untouched.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fastapi_websockets.backends.broker import BrokerChannelLayer, ConnectionStats
from tests.conftest import LayerFactory
from tests.e2e.server import ROOT, serve_in_subprocess
from tests.servers.redis import RedisNode

APP = "tests.e2e.observability_app:app"
CONSUMER = "RoomConsumer"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics/")
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith("fastapi_websockets_"):
                samples[_key(sample.name, **sample.labels)] = sample.value
    return samples


async def wait_for_metrics(
    client: httpx.AsyncClient, expected: dict[tuple[str, frozenset[tuple[str, str]]], float]
) -> Samples:
    """Scrape until every expected series has its value (the app updates some of them after replying)."""
    samples: Samples = {}
    for _ in range(400):
        samples = await scrape(client)
        if all(samples.get(key) == value for key, value in expected.items()):
            return samples
        await asyncio.sleep(0.05)
    wrong = {
        f"{name}{dict(labels)}": (samples.get((name, labels)), value)
        for (name, labels), value in expected.items()
        if samples.get((name, labels)) != value
    }
    raise AssertionError(f"series (seen, expected) never reached: {wrong}")


def consumer_series(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return _key(f"fastapi_websockets_{name}", consumer=CONSUMER, **labels)


def layer_series(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return _key(f"fastapi_websockets_{name}", backend="redis", **labels)


async def recv_json(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 20))


async def test_metrics_count_known_traffic(restartable_redis: RedisNode) -> None:
    env = {"OBS_REDIS_URL": restartable_redis.url, "OBS_PREFIX": "obs" + uuid.uuid4().hex[:8]}
    with serve_in_subprocess(APP, env) as url:
        async with httpx.AsyncClient(base_url=url.replace("ws://", "http://"), timeout=20) as client:
            async with connect(f"{url}/ws") as ws:
                with pytest.raises(InvalidStatus):
                    async with connect(f"{url}/ws?reject=1"):
                        pass
                await ws.send(json.dumps({"do": "echo", "text": "hello"}))
                assert await recv_json(ws) == {"echo": "hello"}
                await ws.send(json.dumps({"do": "broadcast", "text": "to the room"}))
                reply = await recv_json(ws)
                assert reply["text"] == "to the room"
                assert reply["keys"] == ["text", "type"]
                await ws.send(json.dumps({"do": "no.handler"}))
                await ws.send(json.dumps({"do": "boom"}))
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 20)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1011

            samples = await wait_for_metrics(
                client,
                {
                    consumer_series("connections_total", outcome="accepted"): 1,
                    consumer_series("connections_total", outcome="rejected"): 1,
                    consumer_series("open_connections"): 0,
                    consumer_series("disconnections_total", code="1011"): 1,
                    consumer_series("frames_total", direction="received"): 4,
                    consumer_series("frames_total", direction="sent"): 2,
                    consumer_series("handler_errors_total", event="boom"): 1,
                    consumer_series("handler_duration_seconds_count", event="room.message"): 1,
                    consumer_series("handler_duration_seconds_count", event="other"): 1,
                    consumer_series("handler_duration_seconds_count", event="boom"): 1,
                    layer_series("layer_messages_total", operation="send"): 2,
                    layer_series("layer_messages_total", operation="group_send"): 1,
                    layer_series("layer_messages_total", operation="receive"): 3,
                    layer_series("layer_group_send_duration_seconds_count"): 1,
                    layer_series("layer_delivery_lag_seconds_count"): 3,
                    layer_series("layer_dropped_total", reason="full"): 0,
                    layer_series("layer_up"): 1,
                    layer_series("layer_reconnections_total"): 0,
                },
            )
            assert consumer_series("handler_errors_total", event="room.message") not in samples

            response = await client.post("/fill")
            response.raise_for_status()
            channel = response.json()["channel"]
            samples = await wait_for_metrics(
                client,
                {
                    layer_series("layer_dropped_total", reason="full"): 2,
                    layer_series("layer_dropped_total", reason="expired"): 0,
                    layer_series("layer_messages_total", operation="group_send"): 4,
                    layer_series("layer_delivery_lag_seconds_count"): 6,
                },
            )
            names = ("obs-room", "obs-fill", channel, channel.split("!")[0])
            for (name, labels), _ in samples.items():
                for label, value in labels:
                    assert not any(part in value for part in names), f"{name} label {label}={value!r}"

            restartable_redis.stop()
            await wait_for_metrics(client, {layer_series("layer_up"): 0})
            restartable_redis.start()
            await wait_for_metrics(
                client, {layer_series("layer_up"): 1, layer_series("layer_reconnections_total"): 1}
            )


def _find(spans: list[dict[str, Any]], test: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    return [span for span in spans if test(span)]


async def _spans_until(
    clients: list[httpx.AsyncClient], ready: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for _ in range(400):
        spans = []
        for client in clients:
            response = await client.get("/spans")
            response.raise_for_status()
            spans.extend(response.json())
        if ready(spans):
            return spans
        await asyncio.sleep(0.05)
    raise AssertionError(f"the expected spans never all arrived: {spans}")


async def test_one_trace_from_an_http_request_to_handlers_in_two_processes(redis_server: RedisNode) -> None:
    env = {"OBS_REDIS_URL": redis_server.url, "OBS_PREFIX": "obs" + uuid.uuid4().hex[:8]}
    with serve_in_subprocess(APP, env) as url1, serve_in_subprocess(APP, env) as url2:
        async with (
            httpx.AsyncClient(base_url=url1.replace("ws://", "http://"), timeout=20) as http1,
            httpx.AsyncClient(base_url=url2.replace("ws://", "http://"), timeout=20) as http2,
            connect(f"{url1}/ws") as ws1,
            connect(f"{url2}/ws") as ws2,
        ):
            trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
            response = await http1.post(
                "/announce",
                params={"text": "traced"},
                headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
            )
            response.raise_for_status()
            replies = [await recv_json(ws1), await recv_json(ws2)]
            assert [reply["text"] for reply in replies] == ["traced", "traced"]
            assert all(reply["keys"] == ["text", "type"] for reply in replies)
            pids = {reply["pid"] for reply in replies}
            assert len(pids) == 2

            def handled(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return _find(
                    spans,
                    lambda s: (
                        s["name"] == "fastapi_websockets handle room.message" and s["trace_id"] == trace_id
                    ),
                )

            spans = await _spans_until([http1, http2], lambda spans: len(handled(spans)) == 2)
            (request,) = _find(spans, lambda s: s["name"] == "POST /announce" and s["trace_id"] == trace_id)
            assert request["parent_id"] == caller_span
            (group_send,) = _find(
                spans, lambda s: s["name"] == "fastapi_websockets group_send" and s["trace_id"] == trace_id
            )
            assert group_send["parent_id"] == request["span_id"]
            handlers = handled(spans)
            assert {span["pid"] for span in handlers} == pids
            assert all(span["parent_id"] == group_send["span_id"] for span in handlers)

            # A frame from a client starts a trace of its own that reaches both processes too.
            await ws1.send(json.dumps({"do": "broadcast", "text": "from a client"}))
            assert (await recv_json(ws1))["text"] == "from a client"
            assert (await recv_json(ws2))["text"] == "from a client"

            def from_frame(spans: list[dict[str, Any]]) -> dict[str, Any] | None:
                for receive in _find(spans, lambda s: s["name"] == "fastapi_websockets receive"):
                    sends = [s for s in spans if s["parent_id"] == receive["span_id"]]
                    if len(sends) == 1:
                        return sends[0]
                return None

            def frame_handled(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
                send = from_frame(spans)
                if send is None:
                    return []
                return _find(
                    spans,
                    lambda s: (
                        s["parent_id"] == send["span_id"]
                        and s["name"].startswith("fastapi_websockets handle")
                    ),
                )

            spans = await _spans_until([http1, http2], lambda spans: len(frame_handled(spans)) == 2)
            send = from_frame(spans)
            assert send is not None
            assert send["name"] == "fastapi_websockets group_send"
            assert {span["pid"] for span in frame_handled(spans)} == pids
            assert {span["trace_id"] for span in frame_handled(spans)} == {send["trace_id"]}


def test_without_instrument_nothing_is_imported_and_the_reserved_key_is_removed() -> None:
    # In a fresh interpreter: this test process must stay uninstrumented either way.
    script = textwrap.dedent(
        """
        import asyncio, sys
        import fastapi
        before = set(sys.modules)
        from fastapi_websockets import InMemoryChannelLayer, observing
        from fastapi_websockets.consumers import AsyncWebSocketConsumer

        async def main():
            layer = InMemoryChannelLayer()
            channel = await layer.new_channel()
            await layer.group_add("g", channel)
            # As an instrumented process in front of this one would send it.
            await layer.group_send("g", {"type": "x", observing.RESERVED_KEY: {"ts": 1.0}})
            await layer.send(channel, {"type": "y", observing.RESERVED_KEY: {"tc": {}}})
            print(await layer.receive(channel), await layer.receive(channel))
            await layer.close()

        asyncio.run(main())
        new = {name.split(".")[0] for name in set(sys.modules) - before}
        print(sorted(new & {"prometheus_client", "opentelemetry"}), observing.hooks)
        ours = ("fastapi_websockets.metrics", "fastapi_websockets.tracing")
        print(sorted(name for name in ours if name in sys.modules))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == ["{'type': 'x'} {'type': 'y'}", "[] None", "[]"]


#: The metric names of the contract (issue 14).
METRICS = {
    "fastapi_websockets_open_connections",
    "fastapi_websockets_connections_total",
    "fastapi_websockets_disconnections_total",
    "fastapi_websockets_frames_total",
    "fastapi_websockets_handler_duration_seconds",
    "fastapi_websockets_handler_errors_total",
    "fastapi_websockets_layer_messages_total",
    "fastapi_websockets_layer_dropped_total",
    "fastapi_websockets_layer_group_send_duration_seconds",
    "fastapi_websockets_layer_delivery_lag_seconds",
    "fastapi_websockets_layer_reconnections_total",
    "fastapi_websockets_layer_up",
}


def test_the_dashboard_and_the_docs_use_only_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for text in [*exprs, (ROOT / "docs" / "operating.md").read_text()]
        for name in re.findall(r"\bfastapi_websockets_[a-z]\w*", text)
    }
    assert used <= METRICS
    assert {
        re.sub(r"_(bucket|count|sum)$", "", n)
        for e in exprs
        for n in re.findall(r"\bfastapi_websockets_[a-z]\w*", e)
    } == METRICS


async def test_every_broker_layer_reports_its_connection(make_layer: LayerFactory) -> None:
    layer = make_layer()
    await layer.new_channel()
    if not isinstance(layer, BrokerChannelLayer):
        pytest.skip("only broker layers have a connection to report")
    for _ in range(200):
        if layer.connection.up:
            break
        await asyncio.sleep(0.05)
    assert layer.connection == ConnectionStats(up=True, reconnections=0)
    await layer.close()
    assert layer.connection.up is True  # closing is not losing the broker
