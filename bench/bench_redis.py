"""Redis for ``python -m bench``: our layer in both wake-up modes, channels_redis core and PubSub, 0.1.0."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import Impl, Server


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


IMPLS = [
    Impl("redis", "ours", ours(use_pubsub=True)),
    Impl("redis use_pubsub=False", "ours", ours(use_pubsub=False)),
    Impl("channels_redis core", "channels", channels_core, close=lambda layer: layer.close_pools()),
    Impl("channels_redis pubsub", "channels", channels_pubsub, close=lambda layer: layer.flush()),
    Impl("redis 0.1.0", "0.1.0", ours()),
]
