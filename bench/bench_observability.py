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

With tracing on, a last line gives the OpenTelemetry SDK's own cost of one
handle span (start, make current, end, with the same provider), and the
consumer ratio that this cost alone would leave if everything else were free.
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
SPANS = 20_000


def instrument(configuration: str) -> Any:
    """Turn on what ``configuration`` names; return the SDK TracerProvider, if tracing is on."""
    if "metrics" in configuration:
        from prometheus_client import CollectorRegistry

        from fastapi_websockets.metrics import instrument as instrument_metrics

        instrument_metrics(registry=CollectorRegistry())
    if "tracing" not in configuration:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from fastapi_websockets.tracing import instrument_tracing

    class NoOpExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    # "tracing 1%": what docs/operating.md advises for a busy fan-out, a parent-based
    # sampler keeping 1% of the traces (the others' spans do not record).
    sampler = ParentBased(TraceIdRatioBased(0.01)) if configuration.endswith("1%") else None
    provider = TracerProvider(sampler=sampler)
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


def _span_cost_us(provider: Any) -> float:
    """The SDK's own cost of one handle span, in microseconds: what no instrumentation can save."""
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer = provider.get_tracer("bench")
    parent = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
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
    if configuration == "tracing":
        figures["span_us"] = _span_cost_us(provider)
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
    for number in range(max(args.rounds, args.e2e_rounds)):
        turn = number % len(CONFIGURATIONS)
        for configuration in CONFIGURATIONS[turn:] + CONFIGURATIONS[:turn]:
            figures: dict[str, float] = {}
            if number < args.rounds:
                figures.update(_in_process(configuration))
            if number < args.e2e_rounds:
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
    print(f"{'scenario':<10}{'configuration':<18}{'deliveries/s':>14}{'ratio':>8}")
    for scenario in ("layer", "consumer", "e2e"):
        if (scenario, "none") not in median:
            continue
        baseline = median[scenario, "none"]
        for configuration in CONFIGURATIONS:
            rate = median[scenario, configuration]
            print(f"{scenario:<10}{configuration:<18}{rate:>14,.0f}{rate / baseline:>8.2f}")
    if ("e2e_cpu_us", "none") in median:
        print(f"{'e2e server CPU per delivery':<28}{'µs':>14}{'ratio':>8}")
        baseline = median["e2e_cpu_us", "none"]
        for configuration in CONFIGURATIONS:
            cost = median["e2e_cpu_us", configuration]
            print(f"  {configuration:<26}{cost:>14.1f}{baseline / cost:>8.2f}")
    if ("span_us", "tracing") in median and ("consumer", "none") in median:
        delivery_us = 1e6 / median["consumer", "none"]
        span_us = median["span_us", "tracing"]
        print(
            f"SDK floor: one handle span costs {span_us:.1f} µs in the SDK alone, an uninstrumented consumer "
            f"delivery {delivery_us:.1f} µs: best possible consumer ratio with tracing "
            f"{delivery_us / (delivery_us + span_us):.2f}"
        )


if __name__ == "__main__":
    main()
