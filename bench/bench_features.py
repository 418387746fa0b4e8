"""What history and presence cost, per backend, in one run (issues 11 and 12).

    .venv/bin/python bench/bench_features.py [--backends inmemory,redis,...]

Figures, all with the sender in a second layer instance (one instance for the
in-memory layer, whose instances share nothing):

* ``plain µs`` / ``history µs``: median time of one ``group_send`` to a group
  of 10 members without and with history, and their ratio (target: at most 2x).
  Plain and history sends alternate in short batches, and the ratio is the
  median of the batches' ratios, so that load from other processes on the
  machine hits both sides alike instead of skewing one;
* ``fan-out/s (hist on)`` / ``(hist off)``: deliveries/s of a plain group of
  1,000 members from a layer whose ``history`` option covers other groups, and
  from one without it (plain groups must not pay for the option);
* ``catch-up ms``: median ``group_add(group, channel, since=...)`` with 100
  missed messages;
* ``presence() ms``: median ``presence()`` of a 10,000-member group;
  ``join µs`` / ``group_add µs``: median ``presence_join`` next to ``group_add``.

A backend that lacks a feature prints ``n/a``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from harness import BROKERS, Server  # noqa: E402

HISTORY = {"hist:*": {"size": 1000, "ttl": 600}}
#: The plain/history comparison: this many alternating batches of RATIO_BATCH sends each.
RATIO_ROUNDS = 10
RATIO_BATCH = 30


def builder(broker: str, server: Server) -> Callable[..., Any]:
    """A ``make(namespace, **options)`` for our layer on ``broker``."""

    def make(namespace: str, **options: Any) -> Any:
        from fastapi_websockets import (
            InMemoryChannelLayer,
            NATSChannelLayer,
            PostgreSQLChannelLayer,
            RabbitMQChannelLayer,
            RedisChannelLayer,
        )

        if broker == "inmemory":
            return InMemoryChannelLayer(**options)
        if broker == "redis":
            return RedisChannelLayer(url=server["url"], prefix=namespace, **options)
        if broker == "postgresql":
            return PostgreSQLChannelLayer(dsn=server["url"], schema=namespace, **options)
        if broker == "nats":
            return NATSChannelLayer(
                servers=[server["url"]],
                prefix=namespace,
                group_bucket=namespace,
                stream_name=namespace,
                **options,
            )
        return RabbitMQChannelLayer(
            url=server["url"], exchange_name=namespace, queue_prefix=namespace, **options
        )

    return make


async def median_us(action: Callable[[], Awaitable[Any]], count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


async def members(layer: Any, group: str, count: int) -> list[str]:
    channels = [await layer.new_channel("b") for _ in range(count)]
    for start in range(0, count, 200):
        await asyncio.gather(*(layer.group_add(group, c) for c in channels[start : start + 200]))
    return channels


async def drain(layer: Any, channels: list[str]) -> None:
    await asyncio.gather(*(layer.receive(c, timeout=30) for c in channels))


async def history_figures(make: Callable[..., Any], shared: bool) -> dict[str, str]:
    ns = "f" + uuid.uuid4().hex[:8]
    receiver = make(ns, history=HISTORY, capacity=2000)
    sender = make(ns, history=HISTORY, capacity=2000) if shared else receiver
    try:
        channels = await members(receiver, "hist:1", 10)
        await members(receiver, "plain:1", 10)

        async def plain() -> None:
            await sender.group_send("plain:1", {"type": "m", "text": "x" * 80})

        async def historic() -> None:
            await sender.group_send("hist:1", {"type": "m", "text": "x" * 80})

        for _ in range(20):
            await plain()
            await historic()
        plain_runs, history_runs, ratios = [], [], []
        for _ in range(RATIO_ROUNDS):
            plain_runs.append(await median_us(plain, RATIO_BATCH))
            history_runs.append(await median_us(historic, RATIO_BATCH))
            ratios.append(history_runs[-1] / plain_runs[-1])
        plain_us, history_us = statistics.median(plain_runs), statistics.median(history_runs)
        await asyncio.sleep(0.5)
        since = await sender.group_send("hist:1", {"type": "m"})
        for _ in range(100):
            await historic()

        async def catch_up() -> None:
            channel = await receiver.new_channel("c")
            page = await receiver.group_add("hist:1", channel, since=since)
            assert len(page.messages) == 100, len(page.messages)
            await receiver.group_discard("hist:1", channel)
            receiver.forget_channel(channel)

        catch_up_ms = await median_us(catch_up, 20) / 1000
        del channels
        return {
            "plain µs": f"{plain_us:,.0f}",
            "history µs": f"{history_us:,.0f}",
            "ratio": f"{statistics.median(ratios):.2f}",
            "catch-up ms": f"{catch_up_ms:.1f}",
        }
    finally:
        await sender.close()
        await receiver.close()


async def fanout_rate(make: Callable[..., Any], shared: bool, **options: Any) -> float:
    ns = "f" + uuid.uuid4().hex[:8]
    receiver = make(ns, **options)
    sender = make(ns, **options) if shared else receiver
    try:
        channels = await members(receiver, "plain:fan", 1000)
        rates = []
        for _ in range(7):
            start = time.perf_counter()
            await sender.group_send("plain:fan", {"type": "m", "text": "x" * 80})
            await drain(receiver, channels)
            rates.append(1000 / (time.perf_counter() - start))
        return statistics.median(rates)
    finally:
        await sender.close()
        await receiver.close()


async def presence_figures(make: Callable[..., Any], shared: bool) -> dict[str, str]:
    ns = "f" + uuid.uuid4().hex[:8]
    layer = make(ns)
    viewer = make(ns) if shared else layer
    try:
        channels = [await layer.new_channel("p") for _ in range(10_000)]
        for start in range(0, len(channels), 250):
            batch = channels[start : start + 250]
            await asyncio.gather(
                *(layer.presence_join("big", c, {"user": c[-6:]}, notify=False) for c in batch)
            )
        assert len(await viewer.presence("big")) == 10_000
        read_ms = await median_us(lambda: viewer.presence("big"), 15) / 1000
        spare = [await layer.new_channel("q") for _ in range(200)]
        it = iter(spare)
        join_us = await median_us(lambda: layer.presence_join("small", next(it), {"u": 1}, notify=False), 200)
        it2 = iter(spare)
        add_us = await median_us(lambda: layer.group_add("small", next(it2)), 200)
        return {
            "presence() ms": f"{read_ms:.1f}",
            "join µs": f"{join_us:,.0f}",
            "group_add µs": f"{add_us:,.0f}",
        }
    finally:
        if viewer is not layer:
            await viewer.close()
        await layer.close()


async def measure(broker: str, server: Server) -> dict[str, str]:
    make = builder(broker, server)
    shared = broker != "inmemory"
    row: dict[str, str] = {}
    for figures in (history_figures, presence_figures):
        try:
            row.update(await figures(make, shared))
        except NotImplementedError:
            continue
    with_option = await fanout_rate(make, shared, history=HISTORY)
    without = await fanout_rate(make, shared)
    row["fan-out/s (hist on)"] = f"{with_option:,.0f}"
    row["fan-out/s (hist off)"] = f"{without:,.0f}"
    return row


COLUMNS = [
    "plain µs",
    "history µs",
    "ratio",
    "catch-up ms",
    "fan-out/s (hist on)",
    "fan-out/s (hist off)",
    "presence() ms",
    "join µs",
    "group_add µs",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BROKERS))
    args = parser.parse_args()
    rows = {}
    for broker in args.backends.split(","):
        module = importlib.import_module(f"bench_{broker}")
        context = getattr(module, "server", None)
        with context() if context else contextlib.nullcontext({}) as server:
            rows[broker] = asyncio.run(measure(broker, server))
            print(f"{broker}: {rows[broker]}", file=sys.stderr, flush=True)
    widths = [max(len(c), 10) for c in COLUMNS]
    print("backend    | " + " | ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for broker, row in rows.items():
        cells = [row.get(c, "n/a").rjust(w) for c, w in zip(COLUMNS, widths, strict=True)]
        print(f"{broker:<10} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
