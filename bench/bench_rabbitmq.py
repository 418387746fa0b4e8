"""RabbitMQ for ``python -m bench``: our layer, 0.1.0's and a bare aio-pika client on a private node.

The bare client (p2p only) is what aio-pika itself costs: one confirmed publish
per send, one consumer per instance, one ack per delivery, no layer around it.

The idle probe adds the queues and consumers the broker holds (``rabbitmqctl``),
counted as the change over the scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import P2P_ONLY, Impl, Server


@contextlib.contextmanager
def server() -> Iterator[Server]:
    from tests.servers.rabbitmq import CTL, RabbitNode

    with tempfile.TemporaryDirectory(prefix="fw-bench-rabbitmq-") as tmp:
        node = RabbitNode(Path(tmp))
        try:
            node.start()
            assert node.server is not None
            env = {k: v for k, v in node.env.items() if k.startswith(("RABBITMQ_", "ERL_")) or k == "HOME"}
            ctl = [CTL, "-q", "-n", node.env["RABBITMQ_NODENAME"]]
            yield {
                "url": node.url,
                "port": node.port,
                "pids": [node.server.popen.pid],
                "ctl": ctl,
                "env": env,
            }
        finally:
            node.close()


def _listed(server: Server, *args: str) -> list[str]:
    """The lines of a ``rabbitmqctl`` listing (no headers, no blank lines)."""
    done = subprocess.run(
        [*server["ctl"], *args, "--no-table-headers"],
        env={**os.environ, **server["env"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def probe(server: Server, sockets: set[int]) -> dict[str, float]:
    return {
        "queues": len(_listed(server, "list_queues", "name")),
        "consumers": len(_listed(server, "list_consumers", "queue_name")),
    }


def cleanup(server: Server, namespace: str) -> None:
    """Delete the queues a job left behind (every row names its queues ``<namespace>.…``).

    0.1.0 leaves a quorum queue per receiver (2,000 after its fanout and fanout2 jobs): their Raft
    ticks took 0.17 of a core with nothing running and made our later fan-out rounds 1.7x slower.
    """
    import aiormq

    left = [name for name in _listed(server, "list_queues", "name") if name.startswith(f"{namespace}.")]

    async def delete(names: list[str]) -> None:
        connection = await aiormq.connect(server["url"])
        try:
            channel = await connection.channel()
            for name in names:
                # Unconditionally: a quorum queue refuses if_unused/if_empty (and closes the connection).
                await channel.queue_delete(name, if_unused=False, if_empty=False)
        finally:
            await connection.close()

    async def delete_all() -> None:
        # A few connections at once: deleting a quorum queue takes the broker milliseconds.
        connections = min(len(left), 8)
        await asyncio.gather(*(delete(left[start::connections]) for start in range(connections)))

    if left:
        asyncio.run(delete_all())


def ours(server: Server, namespace: str) -> Any:
    """Our layer; in the 0.1.0 virtualenv the same import path gives 0.1.0's."""
    from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer

    return RabbitMQChannelLayer(url=server["url"], exchange_name=namespace, queue_prefix=namespace)


class RawAioPika:
    """A bare aio-pika client with the layer's p2p surface: a queue per instance, confirmed publishes."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.namespace = url, namespace
        self.token = os.urandom(6).hex()
        self.ids = itertools.count()
        self.queues: dict[str, asyncio.Queue[Any]] = {}
        self.connection: Any = None
        self.channel: Any = None
        self.lock = asyncio.Lock()

    async def connect(self) -> None:
        import aio_pika

        async with self.lock:
            if self.connection is not None:
                return
            connection = await aio_pika.connect(self.url)
            self.channel = await connection.channel(publisher_confirms=True)
            await self.channel.set_qos(prefetch_count=1000)
            queue = await self.channel.declare_queue(f"{self.namespace}.{self.token}", auto_delete=True)
            await queue.consume(self.on_message)
            self.connection = connection

    async def on_message(self, incoming: Any) -> None:
        import msgpack

        channel, message = msgpack.unpackb(incoming.body)
        self.queues.setdefault(channel, asyncio.Queue()).put_nowait(message)
        await incoming.ack()

    async def new_channel(self, prefix: str) -> str:
        await self.connect()
        return f"{prefix}.{self.token}!{next(self.ids)}"

    async def send(self, channel: str, message: Any) -> None:
        import aio_pika
        import msgpack

        await self.connect()
        token = channel.rpartition("!")[0].rpartition(".")[2]
        body = msgpack.packb([channel, message])
        await self.channel.default_exchange.publish(aio_pika.Message(body), f"{self.namespace}.{token}")

    async def receive(self, channel: str) -> Any:
        return await self.queues.setdefault(channel, asyncio.Queue()).get()

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


def raw_aio_pika(server: Server, namespace: str) -> Any:
    return RawAioPika(server["url"], namespace)


#: 0.1.0's receive polls: a basic.get with poll_interval (0.1 s) as the RPC's timeout, again and
#: again, on the layer's one channel. Seen 2026-12-02 with 1,000 and with 500 receivers of one
#: layer: the gets queued past 0.1 s, aiormq closed the channel when one was cancelled ("RPC call
#: cancelled"), and every receive failed, after 11-22 s declaring the quorum queues.
CANNOT_010 = (
    "0.1.0 polls a basic.get per waiting receive with a 0.1 s timeout on one channel: with 500 or "
    "1,000 receivers the gets queue past it, aiormq closes the channel and every receive fails"
)
#: Seen 2026-12-02 in one process: message 416 never arrived, the queue empty and the receiving
#: channel holding one unacknowledged message (rabbitmqctl list_channels); in a later p2p job
#: aiormq closed the channel instead (ChannelLayerClosed from receive).
FLAW_010 = (
    "0.1.0 gives up on a basic.get after 0.1 s: a message the broker hands over later stays "
    "unacknowledged on the channel, never received, or aiormq closes the channel"
)

IMPLS = [
    Impl("rabbitmq", "ours", ours),
    Impl(
        "rabbitmq 0.1.0",
        "0.1.0",
        ours,
        cannot=dict.fromkeys(("fanout", "fanout2"), CANNOT_010),
        flaws=dict.fromkeys(("p2p", "p2p2"), FLAW_010),
    ),
    Impl("raw aio-pika confirms", "ours", raw_aio_pika, cannot=P2P_ONLY),
]
