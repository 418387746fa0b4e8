"""Redis for ``python -m bench``: our layer in both wake-up modes, channels_redis core and PubSub,
0.1.0, and raw pipelined redis-py (what one PUBLISH per message costs, with no layer around it)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import P2P_ONLY, Impl, Server


@contextlib.contextmanager
def server() -> Iterator[Server]:
    from tests.servers import free_port
    from tests.servers.redis import RedisNode

    with tempfile.TemporaryDirectory(prefix="fw-bench-redis-") as tmp:
        node = RedisNode(Path(tmp), free_port())
        node.start()
        try:
            assert node.proc is not None
            yield {"url": node.url, "port": node.port, "pids": [node.proc.popen.pid]}
        finally:
            node.stop()


def ours(**options: Any) -> Callable[[Server, str], Any]:
    """Our layer; in the 0.1.0 virtualenv the same import path gives 0.1.0's."""

    def make(server: Server, namespace: str) -> Any:
        from fastapi_websockets.backends.redis import RedisChannelLayer

        return RedisChannelLayer(url=server["url"], prefix=namespace, **options)

    return make


def channels_core(server: Server, namespace: str) -> Any:
    from channels_redis.core import RedisChannelLayer  # type: ignore[import-untyped, import-not-found, unused-ignore]

    return RedisChannelLayer(hosts=[server["url"]], prefix=namespace)


def channels_pubsub(server: Server, namespace: str) -> Any:
    from channels_redis.pubsub import RedisPubSubChannelLayer  # type: ignore[import-untyped, import-not-found, unused-ignore]

    return RedisPubSubChannelLayer(hosts=[server["url"]], prefix=namespace)


class RawPipelined:
    """Raw redis-py, no layer semantics: the ceiling p2p is compared with (issue 15).

    One PUBLISH per message to the owner's pub/sub channel; concurrent sends share
    one pipelined write (one writer task, as automatic pipelining does); one reader
    per instance hands messages to per-channel queues. Nothing is stored, so nothing
    waits for a receiver that is not connected; no capacity, no expiry, no groups.
    """

    def __init__(self, url: str, namespace: str) -> None:
        from redis.asyncio import Redis

        self.redis = Redis.from_url(url)
        self.namespace = namespace
        self.token = f"{id(self):x}"
        self.ids = itertools.count()
        self.queues: dict[str, asyncio.Queue[Any]] = {}
        self.outbox: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.writer: asyncio.Task[None] | None = None

    def queue(self, channel: str) -> asyncio.Queue[Any]:
        return self.queues.setdefault(channel, asyncio.Queue())

    async def new_channel(self, prefix: str = "specific") -> str:
        if not self.tasks:
            pubsub = self.redis.pubsub()
            await pubsub.subscribe(f"{self.namespace}:{self.token}")
            self.tasks.append(asyncio.create_task(self.read(pubsub)))
        return f"{prefix}.{self.token}!{next(self.ids)}"

    async def read(self, pubsub: Any) -> None:
        import msgpack

        try:
            async for item in pubsub.listen():
                if item["type"] == "message":
                    channel, message = msgpack.unpackb(item["data"])
                    self.queue(channel).put_nowait(message)
        finally:
            await pubsub.aclose()

    async def send(self, channel: str, message: Any) -> None:
        import msgpack

        token = channel.rpartition("!")[0].rpartition(".")[2]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outbox.append((f"{self.namespace}:{token}", msgpack.packb([channel, message]), done))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self.write())
        await done

    async def write(self) -> None:
        while self.outbox:
            batch, self.outbox = self.outbox, []
            pipe = self.redis.pipeline(transaction=False)
            for topic, data, _ in batch:
                pipe.publish(topic, data)
            await pipe.execute()
            for *_, done in batch:
                done.set_result(None)

    async def receive(self, channel: str) -> Any:
        return await self.queue(channel).get()

    async def close(self) -> None:
        for task in [*self.tasks, *([self.writer] if self.writer else [])]:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.redis.aclose()


def raw_pipelined(server: Server, namespace: str) -> Any:
    return RawPipelined(server["url"], namespace)


#: Seen 2026-12-02 (bench/.venv-010: redis-py 8.1): 900 of 1,000 receivers failed at once with
#: MaxConnectionsError. With a pool of 2**31 (redis-py 7's default) its rounds took 3-7 s instead.
FLAW_010 = (
    "0.1.0's receive holds a pooled connection (a pub/sub subscription) while it waits, and "
    "redis-py 8's pool holds 100: a layer's receivers past the 100th fail"
)

IMPLS = [
    Impl("redis", "ours", ours(use_pubsub=True)),
    Impl("redis use_pubsub=False", "ours", ours(use_pubsub=False)),
    Impl("channels_redis core", "channels", channels_core, close=lambda layer: layer.close_pools()),
    Impl("channels_redis pubsub", "channels", channels_pubsub, close=lambda layer: layer.flush()),
    Impl("redis 0.1.0", "0.1.0", ours(), flaws=dict.fromkeys(("fanout", "fanout2"), FLAW_010)),
    Impl("raw redis-py pipelined", "ours", raw_pipelined, cannot=P2P_ONLY),
]
