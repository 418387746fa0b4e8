"""What presence costs on NATS: reads of a 10,000-member group, joins, heartbeats, stored bytes.

Run: ``.venv/bin/python bench/bench_presence_nats.py [--cluster]`` (starts a private
nats-server, or a 3-node cluster with replicas=3). Printed, each on one line:

* ``presence()`` of a group of 10,000 members held by two layer instances (median ms);
* ``presence_join`` (``notify=False``) next to ``group_add``, one call at a time (median µs);
* idle heartbeat traffic of one process with 10 and with 10,000 members: messages the
  server received and JetStream API requests, per second at ``presence_timeout=3``;
* bytes the presence stream stores per member (the stream's ``state.bytes``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from presence_common import join_present, median_us, new_channels  # noqa: E402

from fastapi_websockets.backends.nats import NATSChannelLayer  # noqa: E402
from tests.servers.nats import NatsCluster, NatsNode  # noqa: E402

MEMBERS = 10_000
CALLS = 2_000


def _layer(urls: list[str], replicas: int, namespace: str, **options: Any) -> NATSChannelLayer:
    return NATSChannelLayer(
        servers=urls,
        prefix=namespace,
        group_bucket=namespace,
        stream_name=namespace,
        replicas=replicas,
        **options,
    )


def _get(monitor: str, path: str) -> Any:
    with urllib.request.urlopen(monitor + path, timeout=5) as response:
        return json.loads(response.read())


def _traffic(monitors: list[str]) -> tuple[int, int]:
    """Messages the servers received from clients, and JetStream API requests they served."""
    received = sum(_get(m, "/varz")["in_msgs"] for m in monitors)
    api = sum(_get(m, "/jsz")["api"]["total"] for m in monitors)
    return received, api


async def main(urls: list[str], monitors: list[str], replicas: int) -> None:
    label = f"{'3-node cluster, replicas=3' if replicas == 3 else 'single node'}"
    print(f"NATS presence, {label}")
    first = _layer(urls, replicas, "bench-a")
    second = _layer(urls, replicas, "bench-a")
    try:
        await join_present(first, "room:big", MEMBERS // 2)
        await join_present(second, "room:big", MEMBERS // 2)
        info = await first.js.stream_info("bench-a_P")
        stored = info.state.bytes
        reads = []
        for _ in range(30):
            start = time.perf_counter()
            present = await second.presence("room:big")
            reads.append((time.perf_counter() - start) * 1000)
        assert len(present) == MEMBERS
        print(f"presence() of {MEMBERS} members: median {statistics.median(reads):.1f} ms")
        print(
            f"stored per member: {stored / MEMBERS:.0f} B (stream state.bytes, "
            f"{info.state.messages} messages, x{replicas} replicas on disk)"
        )
        joins = [first.presence_join("room:cost", c, notify=False) for c in await new_channels(first, CALLS)]
        adds = [first.group_add("room:cost", c) for c in await new_channels(first, CALLS)]
        join_us, add_us = await median_us(joins), await median_us(adds)
        print(f"presence_join: median {join_us:.0f} µs; group_add: median {add_us:.0f} µs")
    finally:
        await first.close()
        await second.close()

    for members in (10, MEMBERS):
        layer = _layer(urls, replicas, f"bench-idle{members}", presence_timeout=3)
        try:
            await join_present(layer, "room:idle", members)
            await asyncio.sleep(1.5)
            start, (received, api) = time.monotonic(), _traffic(monitors)
            await asyncio.sleep(9)
            now_received, now_api = _traffic(monitors)
            elapsed = time.monotonic() - start
            print(
                f"idle heartbeat, {members} members, presence_timeout=3 (a beat a second): "
                f"{(now_received - received) / elapsed:.2f} msgs/s received by the server(s), "
                f"{(now_api - api) / elapsed:.2f} JetStream API requests/s "
                f"(at the default 30: a tenth)"
            )
        finally:
            await layer.close()


def run() -> None:
    cluster = "--cluster" in sys.argv
    with tempfile.TemporaryDirectory(prefix="fw-bench-presence-nats-") as tmp:
        if cluster:
            servers = NatsCluster(Path(tmp))
            servers.start()
            nodes = servers.nodes
        else:
            node = NatsNode(Path(tmp))
            node.start()
            nodes = [node]
        try:
            asyncio.run(main([n.url for n in nodes], [n.monitor_url for n in nodes], 3 if cluster else 1))
        finally:
            for n in nodes:
                n.stop()


if __name__ == "__main__":
    run()
