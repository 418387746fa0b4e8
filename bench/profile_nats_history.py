"""What a wave of joins to a NATS room with history costs: JetStream API requests and time per join.

``.venv/bin/python bench/profile_nats_history.py [--tree PATH] [--joiners 50] [--waves 10]`` starts
one nats-server, fills a room (``room:bench``, 100 messages of history) from one layer, and makes
``--waves`` waves of ``--joiners`` concurrent joins in a second layer, each the way the demo app
joins: ``group_history(room)``, then ``group_add(room, channel, since=<its end>)``, while the
first layer keeps chatting in the room (so catch-ups find new entries). It counts the JetStream
API requests the server saw (a raw client subscribed to ``$JS.API.>``), by kind, per join, and
prints the median and p90 wall time of a join and of each wave. ``--tree`` imports the library
from another source tree (a base worktree of main), to compare two trees with the same script.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


async def run(url: str, joiners: int, waves: int) -> dict[str, Any]:
    import nats

    from fastapi_websockets.backends.nats import NATSChannelLayer

    namespace = "h" + os.urandom(4).hex()
    options: dict[str, Any] = {
        "servers": [url],
        "prefix": namespace,
        "group_bucket": namespace,
        "stream_name": namespace,
        "history": {"room:*": {"size": 100, "ttl": 3600}},
    }
    writer, joiner = NATSChannelLayer(**options), NATSChannelLayer(**options)
    room = "room:bench"
    for i in range(100):
        await writer.group_send(room, {"type": "chat.message", "i": i})
    await joiner.group_history(room)  # connected, stream known
    client = await nats.connect(url)
    sub = await client.subscribe("$JS.API.>")
    await client.flush()
    chatting = True

    async def chat() -> None:
        i = 100
        while chatting:
            await writer.group_send(room, {"type": "chat.message", "i": i})
            i += 1
            await asyncio.sleep(0.005)

    async def join() -> float:
        started = time.perf_counter()
        channel = await joiner.new_channel("ws")
        latest = await joiner.group_history(room)
        await joiner.group_add(room, channel, since=latest.position)
        return time.perf_counter() - started

    talker = asyncio.ensure_future(chat())
    joins: list[float] = []
    wave_times: list[float] = []
    try:
        for _ in range(waves):
            started = time.perf_counter()
            joins += await asyncio.gather(*(join() for _ in range(joiners)))
            wave_times.append(time.perf_counter() - started)
    finally:
        chatting = False
        await talker
    await client.flush()
    kinds: Counter[str] = Counter()
    while sub.pending_msgs:
        subject = (await sub.next_msg()).subject.split(".")
        kinds[".".join(subject[2:4])] += 1
    await client.close()
    await writer.close()
    await joiner.close()
    joins.sort()
    return {
        "join_ms_p50": statistics.median(joins) * 1000,
        "join_ms_p90": joins[int(len(joins) * 0.9)] * 1000,
        "wave_ms_p50": statistics.median(wave_times) * 1000,
        "requests_per_join": {kind: count / len(joins) for kind, count in sorted(kinds.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=BENCH.parent, help="import the library from here")
    parser.add_argument("--joiners", type=int, default=50)
    parser.add_argument("--waves", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH.parent))
    sys.path.insert(0, str(args.tree.resolve()))
    import bench_nats

    import fastapi_websockets

    with bench_nats.server() as server:
        result = asyncio.run(run(server["url"], args.joiners, args.waves))
    requests = ", ".join(f"{kind} {count:.2f}" for kind, count in result["requests_per_join"].items())
    print(
        f"{fastapi_websockets.__file__.rsplit('/', 2)[0]}: join p50 {result['join_ms_p50']:.1f} ms, "
        f"p90 {result['join_ms_p90']:.1f} ms, wave of {args.joiners} p50 {result['wave_ms_p50']:.1f} ms; "
        f"JetStream API requests per join: {requests}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
