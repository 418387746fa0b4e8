"""What presence costs on Redis: reads of a 10,000-member group, joins, heartbeats, memory.

Run: ``.venv/bin/python bench/bench_presence_redis.py`` (starts a private redis-server).
Printed, each on one line:

* ``presence()`` of a group of 10,000 members held by two layer instances (median ms);
* ``presence_join`` (``notify=False``) next to ``group_add``, one call at a time (median µs);
* idle heartbeat traffic of one process, counted by Redis, with 10 and with 10,000
  members (commands per second at ``presence_timeout=3``, and per beat);
* Redis memory per member (``MEMORY USAGE`` of the group's hash, and ``used_memory``).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_redis import server  # noqa: E402
from presence_common import join_present, median_us, new_channels  # noqa: E402

from fastapi_websockets.backends.redis import RedisChannelLayer  # noqa: E402

MEMBERS = 10_000
CALLS = 2_000


async def _commands(raw: Any) -> tuple[int, int]:
    """Commands Redis ran (those inside scripts included), and the calls clients made."""
    stats = await raw.info("commandstats")
    calls = {
        name: value["calls"]
        for name, value in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }
    return sum(calls.values()), calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0)


async def main() -> None:
    import redis.asyncio as redis_asyncio

    with server() as srv:
        raw = redis_asyncio.Redis.from_url(srv["url"])
        first = RedisChannelLayer(url=srv["url"], prefix="bench-a")
        second = RedisChannelLayer(url=srv["url"], prefix="bench-a")
        try:
            before = int((await raw.info("memory"))["used_memory"])
            await join_present(first, "room:big", MEMBERS // 2)
            await join_present(second, "room:big", MEMBERS // 2)
            after = int((await raw.info("memory"))["used_memory"])
            hash_bytes = await raw.memory_usage("bench-a:presence:{room:big}", samples=0)
            reads = []
            for _ in range(30):
                start = time.perf_counter()
                present = await second.presence("room:big")
                reads.append((time.perf_counter() - start) * 1000)
            assert len(present) == MEMBERS
            print(f"presence() of {MEMBERS} members: median {statistics.median(reads):.1f} ms")
            print(
                f"memory per member: {(hash_bytes or 0) / MEMBERS:.0f} B (MEMORY USAGE of the hash), "
                f"{(after - before) / MEMBERS:.0f} B (used_memory)"
            )

            joins = [
                first.presence_join("room:cost", c, notify=False) for c in await new_channels(first, CALLS)
            ]
            adds = [first.group_add("room:cost", c) for c in await new_channels(first, CALLS)]
            join_us, add_us = await median_us(joins), await median_us(adds)
            print(f"presence_join: median {join_us:.0f} µs; group_add: median {add_us:.0f} µs")
        finally:
            await first.close()
            await second.close()

        for members in (10, MEMBERS):
            layer = RedisChannelLayer(url=srv["url"], prefix=f"bench-idle{members}", presence_timeout=3)
            try:
                await join_present(layer, "room:idle", members)
                await asyncio.sleep(1.5)
                start, (commands, calls) = time.monotonic(), await _commands(raw)
                await asyncio.sleep(9)
                now_commands, now_calls = await _commands(raw)
                elapsed = time.monotonic() - start
                per_second, calls_per_second = (
                    (now_commands - commands) / elapsed,
                    (now_calls - calls) / elapsed,
                )
                print(
                    f"idle heartbeat, {members} members, presence_timeout=3 (a beat a second): "
                    f"{calls_per_second:.2f} calls/s, {per_second:.2f} Redis commands/s "
                    f"(at the default 30: {calls_per_second / 10:.2f} calls/s)"
                )
            finally:
                await layer.close()
        await raw.aclose()


if __name__ == "__main__":
    asyncio.run(main())
