"""What metrics and tracing cost: in-memory fan-out to 1,000 consumers, with and without them.

Run: ``.venv/bin/python bench/bench_observability.py``. Each configuration runs
in a fresh interpreter (instrumentation is process-wide and stays on once
turned on), the configurations take turns, and each figure is the best of
its runs, so background load on a shared machine spreads over all of them.
Printed: deliveries per second and the ratio to the uninstrumented figure
of the same run (the issue's goals: metrics >= 0.90, tracing >= 0.70).

Two scenarios. ``layer``: one delivery is one ``group_send`` message returned
by one receiver's ``receive()`` (the layer's own cost: one span per
``group_send``, one count per receive). ``consumer``: the receiver is a
consumer that also dispatches the event to its handler, so the per-receiver
hooks (handler duration, one ``handle`` span per receiver) are paid too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MEMBERS = 1_000
MESSAGES = int(os.environ.get("BENCH_MESSAGES", "100"))
REPEATS = 3
CONFIGURATIONS = ("none", "metrics", "tracing", "metrics+tracing")


def _instrument(configuration: str) -> None:
    if "metrics" in configuration:
        from prometheus_client import CollectorRegistry

        from fastapi_websockets.metrics import instrument

        instrument(registry=CollectorRegistry())
    if "tracing" in configuration:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        from fastapi_websockets.tracing import instrument_tracing

        class NoOpExporter(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
        instrument_tracing(provider)


async def _layer_fanout() -> float:
    """Deliveries per second: MESSAGES group_sends, each returned by MEMBERS waiting receive() calls."""
    from fastapi_websockets import InMemoryChannelLayer

    layer = InMemoryChannelLayer(capacity=MESSAGES + 1)
    remaining = MEMBERS * MESSAGES
    done = asyncio.Event()

    async def receive(channel: str) -> None:
        nonlocal remaining
        while True:
            await layer.receive(channel)
            remaining -= 1
            if remaining == 0:
                done.set()

    channels = [await layer.new_channel() for _ in range(MEMBERS)]
    for channel in channels:
        await layer.group_add("room", channel)
    tasks = [asyncio.create_task(receive(channel)) for channel in channels]
    await asyncio.sleep(0)
    start = time.perf_counter()
    for number in range(MESSAGES):
        await layer.group_send("room", {"type": "chat.message", "number": number})
        await asyncio.sleep(0)
    await done.wait()
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await layer.close()
    return MEMBERS * MESSAGES / elapsed


async def _consumer_fanout() -> float:
    """Deliveries per second: MESSAGES group_sends, each handled by MEMBERS consumers."""
    from fastapi_websockets import AsyncWebSocketConsumer, InMemoryChannelLayer

    layer = InMemoryChannelLayer(capacity=MESSAGES + 1)
    remaining = MEMBERS * MESSAGES
    done = asyncio.Event()

    class Counting(AsyncWebSocketConsumer):
        async def chat_message(self, event: dict[str, Any]) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                done.set()

    async def consume(consumer: Counting) -> None:
        # The consumer's event loop without a socket: receive, then dispatch by type.
        while True:
            await consumer.dispatch_channel_message(await layer.receive(consumer.channel_name))

    consumers = []
    for _ in range(MEMBERS):
        consumer = Counting(layer)
        consumer.channel_name = await layer.new_channel()
        await layer.group_add("room", consumer.channel_name)
        consumers.append(consumer)
    tasks = [asyncio.create_task(consume(consumer)) for consumer in consumers]
    await asyncio.sleep(0)
    start = time.perf_counter()
    for number in range(MESSAGES):
        await layer.group_send("room", {"type": "chat.message", "number": number})
        # Let the consumers drain between messages, as they do on a live server.
        await asyncio.sleep(0)
    await done.wait()
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await layer.close()
    return MEMBERS * MESSAGES / elapsed


def _child(configuration: str) -> None:
    _instrument(configuration)
    rates = {"layer": asyncio.run(_layer_fanout()), "consumer": asyncio.run(_consumer_fanout())}
    print(json.dumps(rates))


def main() -> None:
    best: dict[tuple[str, str], float] = {}
    for repeat in range(REPEATS):
        turn = repeat % len(CONFIGURATIONS)
        for configuration in CONFIGURATIONS[turn:] + CONFIGURATIONS[:turn]:
            output = subprocess.run(
                [sys.executable, __file__, configuration],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parents[1],
            ).stdout
            for scenario, rate in json.loads(output).items():
                best[scenario, configuration] = max(best.get((scenario, configuration), 0.0), rate)
    print(f"in-memory fan-out to {MEMBERS:,} receivers, {MESSAGES} messages, best of {REPEATS} runs")
    print(f"{'scenario':<10}{'configuration':<18}{'deliveries/s':>14}{'ratio':>8}")
    for scenario in ("layer", "consumer"):
        baseline = best[scenario, "none"]
        for configuration in CONFIGURATIONS:
            rate = best[scenario, configuration]
            print(f"{scenario:<10}{configuration:<18}{rate:>14,.0f}{rate / baseline:>8.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _child(sys.argv[1])
    else:
        main()
