"""What the per-broker presence benchmarks share: joining many members and timing calls."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Sequence
from typing import Any


async def join_present(layer: Any, group: str, count: int) -> list[str]:
    """Join ``count`` new channels of ``layer`` to the presence of ``group`` (no events)."""
    channels = await new_channels(layer, count)
    for start in range(0, count, 500):
        batch = channels[start : start + 500]
        await asyncio.gather(*(layer.presence_join(group, c, {"user": c[-6:]}, notify=False) for c in batch))
    return channels


async def new_channels(layer: Any, count: int) -> list[str]:
    """``count`` new process-specific channels of ``layer``."""
    return [await layer.new_channel("ws") for _ in range(count)]


async def median_us(calls: Sequence[Awaitable[Any]]) -> float:
    """Median time of awaiting each call in turn, in microseconds."""
    times = []
    for call in calls:
        start = time.perf_counter()
        await call
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)
