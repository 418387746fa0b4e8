"""PostgreSQL for ``python -m bench``: our layer and 0.1.0's on a private server (fsync off)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from harness import Impl, Server


@contextlib.contextmanager
def server() -> Iterator[Server]:
    from tests.servers.postgresql import PostgresServer

    node = PostgresServer()
    try:
        node.start()
        assert node.process is not None
        # The postmaster's children (one backend per connection) count in its CPU.
        yield {"url": node.dsn, "port": node.port, "pids": [node.process.popen.pid]}
    finally:
        node.destroy()


def ours(server: Server, namespace: str) -> Any:
    """Our layer; in the 0.1.0 virtualenv the same import path gives 0.1.0's."""
    from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer

    return PostgreSQLChannelLayer(dsn=server["url"], schema=namespace)


def cleanup(server: Server, namespace: str) -> None:
    """Drop the schema a job used (every row keeps its tables in schema ``namespace``).

    Left behind, each job's tables held its dead rows (6-10k after a p2p job), and the
    once-a-minute autovacuum visited all of them during later jobs of the run.
    """
    import asyncpg

    async def drop() -> None:
        connection = await asyncpg.connect(server["url"])
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        finally:
            await connection.close()

    asyncio.run(drop())


#: Seen 2026-12-02, one layer with 1,000 receivers: rounds of 15-20 s, deliveries trickling in.
FLAW_010 = (
    "0.1.0's receive holds one of its pool's 10 connections while it waits (up to 0.1 s a poll), "
    "so 1,000 waiting receivers take turns: 15-20 s a round"
)

IMPLS = [
    Impl("postgresql", "ours", ours),
    Impl("postgresql 0.1.0", "0.1.0", ours, flaws=dict.fromkeys(("fanout", "fanout2"), FLAW_010)),
]
