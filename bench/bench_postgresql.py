"""PostgreSQL for ``python -m bench``: our layer and 0.1.0's on a private server (fsync off)."""

from __future__ import annotations

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


IMPLS = [Impl("postgresql", "ours", ours), Impl("postgresql 0.1.0", "0.1.0", ours)]
