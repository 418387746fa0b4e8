"""What metrics and tracing cost: fan-out to 1,000 receivers, with and without them.

Run: ``.venv/bin/python bench/bench_observability.py [--rounds 5] [--e2e-rounds 3]``.
Instrumentation is process-wide and stays on once turned on, so every
configuration (none, metrics, tracing, metrics+tracing, and tracing with a
parent-based sampler keeping 1% of the traces) runs in a fresh process; the
configurations take turns within each round, in a rotating order, and each
figure is the median over the rounds, so background load on a shared machine
spreads over all of them. Printed: deliveries per second and
the ratio to the uninstrumented figure of the same run (the issue's goals:
metrics >= 0.90, tracing >= 0.70 with the SDK and a no-op exporter).

The in-process scenarios count deliveries per second of the process's CPU
time (all its threads, so the SDK's export thread is included): on an idle
machine that is deliveries per second of wall time, and on a busy one the
time the process waited for a core does not count. The end-to-end scenario
has a second process (the clients), so it gives wall time as users see it,
plus the server's CPU time per delivery.

Three scenarios, on the in-memory layer:

``layer``
    one delivery is one ``group_send`` message returned by one receiver's
    ``receive()`` (the layer's own cost: one span per ``group_send``, one
    count per receive);
``consumer``
    the receiver is a consumer that also dispatches the event to an empty
    handler, so the per-receiver hooks (handler duration, one ``handle`` span
    per receiver) are paid too; the handler does nothing, so this is the
    worst case for the ratio;
``e2e``
    as users see it: the consumers serve real WebSocket connections in a
    uvicorn process (``bench/e2e/observed_app.py``, the README's consumer
    whose handler calls ``send_json``), the clients run in another process
    (``bench/e2e/clients.py``) and a delivery is a frame received by a
    client. Also printed: the server's CPU time per delivery.

Three more tracing set-ups run in-process only, to show where a span's cost
comes from: ``tracing: API only`` (opentelemetry-api without an SDK, the
default no-op provider), ``tracing: SDK, no processor`` (an SDK
TracerProvider that records spans and hands them to nobody) and ``tracing:
SDK, simple`` (a SimpleSpanProcessor with a no-op exporter, which exports each
span as it ends); ``tracing`` itself is the SDK with a BatchSpanProcessor and
a no-op exporter. For each, a last table splits the consumer delivery's cost:
OpenTelemetry's own cost of one handle span (start, make current, end, with
the same provider and a parent sampled as in the scenario), what is left for
our code, and the best ratio that the span's cost alone would leave.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = 1_000
MESSAGES = int(os.environ.get("BENCH_MESSAGES", "100"))
CONFIGURATIONS = ("none", "metrics", "tracing", "metrics+tracing", "tracing 1%")
#: Other tracing set-ups, in-process only: what a span costs with less of the SDK behind it.
TRACING_VARIANTS = ("tracing: API only", "tracing: SDK, no processor", "tracing: SDK, simple")
SPANS = 20_000


def instrument(configuration: str) -> Any:
    """Turn on what ``configuration`` names; return the SDK TracerProvider, if tracing is on."""
    if "metrics" in configuration:
        from prometheus_client import CollectorRegistry

        from fastapi_websockets.metrics import instrument as instrument_metrics

        instrument_metrics(registry=CollectorRegistry())
    if "tracing" not in configuration:
        return None
    from fastapi_websockets.tracing import instrument_tracing

    if configuration == "tracing: API only":
        # No SDK: the API's default provider, whose spans are non-recording no-ops.
        instrument_tracing()
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class NoOpExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    # "tracing 1%": what docs/operating.md advises for a busy fan-out, a parent-based
    # sampler keeping 1% of the traces (the others' spans do not record).
    sampler = ParentBased(TraceIdRatioBased(0.01)) if configuration.endswith("1%") else None
    provider = TracerProvider(sampler=sampler)
    if configuration == "tracing: SDK, simple":
        provider.add_span_processor(SimpleSpanProcessor(NoOpExporter()))
    elif configuration != "tracing: SDK, no processor":
        provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
    instrument_tracing(provider)
    return provider


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
    start = time.process_time()
    for number in range(MESSAGES):
        await layer.group_send("room", {"type": "chat.message", "number": number})
        await asyncio.sleep(0)
    await done.wait()
    elapsed = time.process_time() - start
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
    start = time.process_time()
    for number in range(MESSAGES):
        await layer.group_send("room", {"type": "chat.message", "number": number})
        # Let the consumers drain between messages, as they do on a live server.
        await asyncio.sleep(0)
    await done.wait()
    elapsed = time.process_time() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await layer.close()
    return MEMBERS * MESSAGES / elapsed


def _span_cost_us(provider: Any, sampled: bool) -> float:
    """OpenTelemetry's own cost of one handle span, in microseconds: what no instrumentation can save.

    ``sampled``: whether the sender's span (the parent) was sampled; with the
    1% configuration, 99 of 100 are not.
    """
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer = (provider or trace.get_tracer_provider()).get_tracer("bench")
    flags = "01" if sampled else "00"
    parent = TraceContextTextMapPropagator().extract(
        {"traceparent": f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}"}
    )
    attributes = {"fastapi_websockets.consumer": "Counting"}
    start = time.process_time()
    for _ in range(SPANS):
        span = tracer.start_span(
            "fastapi_websockets handle chat.message",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = context.attach(trace.set_span_in_context(span))
        context.detach(token)
        span.end()
    return (time.process_time() - start) / SPANS * 1e6


def _child(configuration: str) -> None:
    provider = instrument(configuration)
    figures = {"layer": asyncio.run(_layer_fanout()), "consumer": asyncio.run(_consumer_fanout())}
    if "tracing" in configuration:
        figures["span_us"] = _span_cost_us(provider, sampled=not configuration.endswith("1%"))
    print(json.dumps(figures))


async def _e2e(configuration: str, clients: int, broadcasts: int) -> dict[str, float]:
    """Deliveries/s to ``clients`` real WebSocket clients, and the server's CPU µs per delivery."""
    from bench_e2e import APPS, OUR_PYTHON, Workers

    env = {"BENCH_OBSERVE": configuration, "FASTAPI_WEBSOCKETS_BACKEND": "inmemory"}
    for _ in range(3):
        workers = Workers(OUR_PYTHON, "observed_app:app", 1, env, app_dir=APPS)
        try:
            return await _e2e_run(workers, clients, broadcasts)
        except RuntimeError:
            # The free port was taken by another process between the pick and the bind
            # (the machine is shared): try another. Any other failure is reported.
            if workers.procs[0].poll() is None:
                raise
    raise RuntimeError("uvicorn could not bind a free port three times")


async def _e2e_run(workers: Any, clients: int, broadcasts: int) -> dict[str, float]:
    import httpx
    from bench_e2e import ClientProcs

    loads: ClientProcs | None = None
    try:
        await asyncio.to_thread(workers.wait_ready)
        loads = ClientProcs("plain", clients, 1, workers.urls, deflate=False)
        opened = sum(event["open"] for event in await loads.start())
        if opened < clients:
            raise RuntimeError(f"only {opened} of {clients} clients connected\n{workers.log_tail()}")
        url = workers.urls[0].replace("ws://", "http://")
        async with httpx.AsyncClient(timeout=30) as http:

            async def publish(seq: int) -> None:
                (await http.post(f"{url}/broadcast?seq={seq}")).raise_for_status()

            for attempt in range(1, 4):
                await publish(-attempt)
                if not await loads.wait_round(-attempt, 60):
                    raise RuntimeError(
                        f"a warm-up broadcast did not reach every client\n{workers.log_tail()}"
                    )
            await asyncio.sleep(0.5)
            cpu_before = workers.cpu_seconds()
            for seq in range(broadcasts):
                await publish(seq)
                if not await loads.wait_round(seq, 60):
                    raise RuntimeError(f"broadcast {seq} did not reach every client\n{workers.log_tail()}")
            cpu = workers.cpu_seconds() - cpu_before
        reports = await loads.report()
    finally:
        if loads is not None:
            await loads.close()
        workers.stop()
    durations = []
    for key in map(str, range(broadcasts)):
        lasts = [report["last"][key] for report in reports if key in report["last"]]
        published = [report["published"][key] for report in reports if key in report["published"]]
        durations.append(max(lasts) - published[0])
    return {
        "e2e": clients / statistics.median(durations),
        "e2e_cpu_us": cpu / (clients * broadcasts) * 1e6,
    }


def _in_process(configuration: str) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--child", configuration],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    figures: dict[str, float] = json.loads(output)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the in-process scenarios")
    parser.add_argument("--e2e-rounds", type=int, default=3, help="rounds of the end-to-end one (0: skip it)")
    parser.add_argument("--clients", type=int, default=MEMBERS)
    parser.add_argument("--broadcasts", type=int, default=20, help="measured broadcasts per e2e round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    runs: dict[tuple[str, str], list[float]] = {}
    everything = CONFIGURATIONS + TRACING_VARIANTS
    for number in range(max(args.rounds, args.e2e_rounds)):
        turn = number % len(everything)
        for configuration in everything[turn:] + everything[:turn]:
            figures: dict[str, float] = {}
            if number < args.rounds:
                figures.update(_in_process(configuration))
            if number < args.e2e_rounds and configuration in CONFIGURATIONS:
                figures.update(asyncio.run(_e2e(configuration, args.clients, args.broadcasts)))
            for name, value in figures.items():
                runs.setdefault((name, configuration), []).append(value)
            print(
                f"round {number + 1} {configuration}: "
                + json.dumps({k: round(v, 1) for k, v in figures.items()}),
                file=sys.stderr,
            )
    median = {key: statistics.median(values) for key, values in runs.items()}
    print(
        f"fan-out to {MEMBERS:,} receivers ({MESSAGES} messages in-process, {args.broadcasts} broadcasts to "
        f"{args.clients:,} WebSocket clients end to end); median of {args.rounds} rounds "
        f"({args.e2e_rounds} end to end); load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'scenario':<10}{'configuration':<28}{'deliveries/s':>14}{'ratio':>8}")
    for scenario in ("layer", "consumer", "e2e"):
        if (scenario, "none") not in median:
            continue
        baseline = median[scenario, "none"]
        for configuration in everything:
            if (scenario, configuration) in median:
                rate = median[scenario, configuration]
                print(f"{scenario:<10}{configuration:<28}{rate:>14,.0f}{rate / baseline:>8.2f}")
    if ("e2e_cpu_us", "none") in median:
        print(f"{'e2e server CPU per delivery':<38}{'µs':>14}{'ratio':>8}")
        baseline = median["e2e_cpu_us", "none"]
        for configuration in CONFIGURATIONS:
            cost = median["e2e_cpu_us", configuration]
            print(f"  {configuration:<36}{cost:>14.1f}{baseline / cost:>8.2f}")
    if ("consumer", "none") in median:
        delivery_us = 1e6 / median["consumer", "none"]
        print(
            f"consumer fan-out with tracing, µs per delivery: an uninstrumented delivery costs "
            f"{delivery_us:.1f}; 'span' is OpenTelemetry's own cost of one handle span (start, make "
            f"current, end), 'ours' what is left of the difference"
        )
        print(f"  {'configuration':<36}{'delivery':>10}{'span':>8}{'ours':>8}{'best ratio':>12}")
        for configuration in everything:
            if ("span_us", configuration) not in median:
                continue
            traced_us = 1e6 / median["consumer", configuration]
            span_us = median["span_us", configuration]
            print(
                f"  {configuration:<36}{traced_us:>10.1f}{span_us:>8.1f}"
                f"{traced_us - delivery_us - span_us:>8.1f}{delivery_us / (delivery_us + span_us):>12.2f}"
            )


if __name__ == "__main__":
    main()
