"""In-memory layer: group_send fan-out and point-to-point, against Django Channels' in-memory layer.

Run: ``.venv/bin/python bench/bench_inmemory.py`` (``pip install -e ".[bench]"`` adds
Django Channels for the side-by-side column). Prints a table; the ratio column is
measured in the same run, so it means more than the absolute times on a shared machine.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi_websockets import InMemoryChannelLayer

GROUP_SIZES = (100, 1_000, 10_000)
ROUNDS = 5


async def fanout_ours(members: int) -> float:
    """Seconds for one group_send to ``members`` process-specific channels (median of rounds)."""
    layer = InMemoryChannelLayer(capacity=ROUNDS + 1)
    channels = [await layer.new_channel() for _ in range(members)]
    for channel in channels:
        await layer.group_add("room", channel)
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        await layer.group_send("room", {"type": "chat.message", "text": "hello"})
        times.append(time.perf_counter() - start)
    assert all(layer._mailboxes.pending(c) == ROUNDS for c in channels[:3])
    await layer.close()
    return statistics.median(times)


async def fanout_channels(members: int) -> float | None:
    try:
        from channels.layers import InMemoryChannelLayer as ChannelsLayer
    except ImportError:
        return None
    layer = ChannelsLayer(capacity=ROUNDS + 1)
    channels = [await layer.new_channel() for _ in range(members)]
    for channel in channels:
        await layer.group_add("room", channel)
    times = []
    rounds = ROUNDS if members <= 1_000 else 1  # 10,000 members take seconds per round
    for _ in range(rounds):
        start = time.perf_counter()
        await layer.group_send("room", {"type": "chat.message", "text": "hello"})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def ping_pong(make: Callable[[], Any], count: int = 20_000) -> float:
    """Messages per second through send + receive on one process-specific channel."""
    layer = make()
    channel = await layer.new_channel()
    start = time.perf_counter()
    for i in range(count):
        await layer.send(channel, {"type": "n", "i": i})
        await layer.receive(channel)
    elapsed = time.perf_counter() - start
    if hasattr(layer, "close"):
        await layer.close()
    return count / elapsed


def channels_maker() -> Callable[[], Any] | None:
    try:
        from channels.layers import InMemoryChannelLayer as ChannelsLayer
    except ImportError:
        return None
    return ChannelsLayer


def fmt(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:10.2f} ms"


async def main() -> None:
    print(f"Python {sys.version.split()[0]}; median of {ROUNDS} rounds")
    print("group_send to N process-specific channels:")
    print()
    print(f"{'members':>8} | {'fastapi-websockets':>18} | {'django channels':>16} | {'speed-up':>8}")
    print("-" * 62)
    for size in GROUP_SIZES:
        ours = await fanout_ours(size)
        theirs = await fanout_channels(size)
        ratio = f"{theirs / ours:7.0f}x" if theirs else "n/a"
        print(f"{size:>8} | {fmt(ours):>18} | {fmt(theirs):>16} | {ratio:>8}")
    print()
    ours_rate = await ping_pong(InMemoryChannelLayer)
    maker = channels_maker()
    theirs_rate = await ping_pong(maker) if maker else None
    print("point-to-point send+receive, messages/s:")
    print(f"  fastapi-websockets {ours_rate:12,.0f}")
    if theirs_rate:
        print(f"  django channels    {theirs_rate:12,.0f}")
    else:
        print("  django channels    n/a (pip install channels)")


if __name__ == "__main__":
    run: Callable[[], Awaitable[None]] = main
    asyncio.run(run())
