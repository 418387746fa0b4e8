"""Round trips a layer makes to restore its presence entries and to remove them on close.

Run: ``.venv/bin/python bench/count_presence_writes.py [--entries 50] [--tree PATH]``
(starts a private redis-server and PostgreSQL). ``--tree`` imports the package
from another checkout (e.g. a worktree of main) to compare before and after.

One layer joins ``--entries`` channels (spread over 5 groups) with
``presence_timeout=300``, so that no scheduled beat runs while counting. Printed
per backend, for two steps:

* ``restore``: the broker loses every presence key or row (FLUSHALL, or the
  presence tables emptied), then one ``presence_heartbeat()`` stores them again;
* ``close``: ``close()`` removes every entry and announces each as left.

Counted: on Redis the pipelined writes the layer sent (calls of its writer's
``_write``, each one round trip); on PostgreSQL the operations the layer ran on
pooled connections (calls of ``_with_conn``, each one statement or one
transaction; the server's ``xact_commit`` was tried and rejected: background
work commits there too).
The ``present after`` column checks the step did its job. Counts, not times:
they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GROUPS = 5


def counting(layer: Any, name: str, counts: dict[str, int]) -> None:
    """Count the calls of the layer's method ``name`` in ``counts[name]``."""
    original: Callable[..., Awaitable[Any]] = getattr(layer, name)
    counts[name] = 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return await original(*args, **kwargs)

    setattr(layer, name, counted)


async def join(layer: Any, entries: int) -> None:
    for index in range(entries):
        channel = await layer.new_channel("ws")
        await layer.presence_join(f"room:{index % GROUPS}", channel, {"n": index}, notify=False)


async def count_steps(
    backend: str,
    make: Callable[..., Any],
    method: str,
    unit: str,
    lose: Callable[[], Awaitable[Any]],
    entries: int,
) -> None:
    """Print the calls of ``method`` made by a layer of ``make`` to restore and to close."""
    viewer = make()
    for step in ("restore", "close"):
        layer = make(presence_timeout=300)
        await join(layer, entries)
        await asyncio.sleep(0.2)  # the first scheduled beat has run
        counts: dict[str, int] = {}
        counting(layer, method, counts)
        if step == "restore":
            await lose()
            await layer.presence_heartbeat()
        else:
            await layer.close()
        present = sum([len(await viewer.presence(f"room:{g}")) for g in range(GROUPS)])
        print(f"{backend} {step:8} {entries} entries: {counts[method]:3} {unit}; present after: {present}")
        await layer.close()
    await viewer.close()


async def redis_counts(url: str, entries: int) -> None:
    import redis.asyncio as redis_asyncio

    from fastapi_websockets.backends.redis import RedisChannelLayer

    raw = redis_asyncio.Redis.from_url(url)
    make = functools.partial(RedisChannelLayer, url=url, prefix="count")
    await count_steps("redis", make, "_write", "pipelined writes", raw.flushall, entries)
    await raw.aclose()


async def postgresql_counts(dsn: str, entries: int) -> None:
    import asyncpg

    from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer

    raw = await asyncpg.connect(dsn)
    make = functools.partial(PostgreSQLChannelLayer, dsn=dsn, schema="count")
    lose = functools.partial(raw.execute, "DELETE FROM count.presence; DELETE FROM count.presence_owner")
    await count_steps("postgresql", make, "_with_conn", "pooled operations", lose, entries)
    await raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50)
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="checkout whose package is imported")
    parser.add_argument("--backends", default="redis,postgresql")
    args = parser.parse_args()
    # The servers come from this checkout's test helpers; the layer from --tree.
    sys.path[:0] = [str(args.tree.resolve()), str(HERE.parent)]
    import fastapi_websockets

    print(f"package: {Path(fastapi_websockets.__file__).parent}")
    backends = args.backends.split(",")
    if "redis" in backends:
        from bench_redis import server as redis_server

        with redis_server() as srv:
            asyncio.run(redis_counts(srv["url"], args.entries))
    if "postgresql" in backends:
        from bench_postgresql import server as postgresql_server

        with postgresql_server() as srv:
            asyncio.run(postgresql_counts(srv["url"], args.entries))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
