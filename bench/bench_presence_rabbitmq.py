"""What presence costs on RabbitMQ: reads of a 10,000-member group, joins, heartbeats, memory.

Run: ``.venv/bin/python bench/bench_presence_rabbitmq.py`` (starts a private rabbitmq-server).
Printed, each on one line:

* ``presence()`` of a group of 10,000 members held by two layer instances (median ms);
* ``presence_join`` (``notify=False``) next to ``group_add``, one call at a time (median µs);
* idle heartbeat traffic of one process with 10 and with 10,000 members: presence messages
  it published per second at ``presence_timeout=3`` (an observer queue counts them);
* memory per member: the broker holds none (queues are empty between changes); the
  replica of another process holds the bytes printed (Python objects, deep size).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from presence_common import join_present, median_us, new_channels  # noqa: E402

from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer  # noqa: E402
from tests.servers.rabbitmq import RabbitNode  # noqa: E402

MEMBERS = 10_000
CALLS = 2_000


def _layer(url: str, namespace: str, **options: Any) -> RabbitMQChannelLayer:
    return RabbitMQChannelLayer(url=url, exchange_name=namespace, queue_prefix=namespace, **options)


def _deep_size(value: object) -> int:
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(_deep_size(k) + _deep_size(v) for k, v in value.items())
    return size


async def main(url: str) -> None:
    import aio_pika

    print("RabbitMQ presence, single node")
    first, second = _layer(url, "bench-a"), _layer(url, "bench-a")
    try:
        await second.presence("room:big")  # second participates before first joins
        await join_present(first, "room:big", MEMBERS // 2)
        await join_present(second, "room:big", MEMBERS // 2)
        reads = []
        for _ in range(30):
            start = time.perf_counter()
            present = await second.presence("room:big")
            reads.append((time.perf_counter() - start) * 1000)
        assert len(present) == MEMBERS
        print(f"presence() of {MEMBERS} members: median {statistics.median(reads):.1f} ms")
        replica = second._presence_replica
        assert replica is not None
        held = sum(_deep_size(owner.entries) for owner in replica.owners.values())
        print(
            f"replica memory per member (another process's view): {held / (MEMBERS // 2):.0f} B; broker: 0 B"
        )
        joins = [first.presence_join("room:cost", c, notify=False) for c in await new_channels(first, CALLS)]
        adds = [first.group_add("room:cost", c) for c in await new_channels(first, CALLS)]
        join_us, add_us = await median_us(joins), await median_us(adds)
        print(f"presence_join: median {join_us:.0f} µs; group_add: median {add_us:.0f} µs")
    finally:
        await first.close()
        await second.close()

    connection = await aio_pika.connect(url)
    try:
        for members in (10, MEMBERS):
            namespace = f"bench-idle{members}"
            layer = _layer(url, namespace, presence_timeout=3)
            channel = await connection.channel()
            observer = await channel.declare_queue(exclusive=True)
            try:
                await join_present(layer, "room:idle", members)
                await observer.bind(namespace, "presence")
                await asyncio.sleep(1.5)
                await observer.purge()
                start = time.monotonic()
                await asyncio.sleep(9)
                count = 0
                while await observer.get(no_ack=True, fail=False) is not None:
                    count += 1
                elapsed = time.monotonic() - start
                print(
                    f"idle heartbeat, {members} members, presence_timeout=3 (a beat a second): "
                    f"{count / elapsed:.2f} msgs/s published by the process (at the default 30: a tenth)"
                )
            finally:
                await layer.close()
                await channel.close()
    finally:
        await connection.close()


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="fw-bench-presence-rabbitmq-") as tmp:
        node = RabbitNode(Path(tmp))
        node.start()
        try:
            asyncio.run(main(node.url))
        finally:
            node.stop()


if __name__ == "__main__":
    run()
