"""A process that joins presence and waits to be killed, and the test side's handle on it.

Usage: python -m tests.e2e.presence_peer GROUP COUNT; the layer comes from FASTAPI_WEBSOCKETS_*.
Prints one line, the channels it joined (comma-separated), once they are all present.
Tests start it with :func:`peer`, configured by :func:`peer_setup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi_websockets import BaseChannelLayer, get_channel_layer_from_env

if TYPE_CHECKING:
    from tests.servers import Backend

ROOT = Path(__file__).resolve().parents[2]


def peer_setup(backend: Backend, presence_timeout: float) -> tuple[dict[str, str], BaseChannelLayer]:
    """The environment of a peer process, and a layer of this process sharing its namespace.

    Skips for the in-memory backend, whose layers are process-local by design.
    """
    import pytest

    if not backend.shared_between_instances:
        pytest.skip("in-memory layers are process-local by design")
    if backend.env is None:
        pytest.fail(f"the {backend.name} test fixture does not say how to configure another process (env)")
    namespace = "p" + uuid.uuid4().hex[:8]
    env = backend.env(namespace)
    prefix = env["FASTAPI_WEBSOCKETS_BACKEND"].upper()
    env[f"FASTAPI_WEBSOCKETS_{prefix}_PRESENCE_TIMEOUT"] = str(presence_timeout)
    return env, backend.build(namespace, presence_timeout=presence_timeout)


@asynccontextmanager
async def peer(env: dict[str, str], group: str, count: int) -> AsyncIterator[tuple[Process, list[str]]]:
    """This module in a child process with ``env``, joined to ``group`` ``count`` times; killed at exit."""
    # An asyncio subprocess: this process's event loop keeps beating while the peer joins,
    # or its own entries would go (a process that stalls past presence_timeout is dead).
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.presence_peer",
        group,
        str(count),
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 24,  # one line names every channel the peer joined
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        line = (await proc.stdout.readline()).decode().strip()
        if not line:
            with contextlib.suppress(ProcessLookupError):  # it may have exited already
                proc.kill()
            error = (await proc.stderr.read()).decode()
            raise AssertionError(f"the peer process did not join: {error[-2000:]}")
        yield proc, line.split(",")
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
            proc.kill()
        await proc.wait()


async def main(group: str, count: int) -> None:
    layer = get_channel_layer_from_env()
    channels = [await layer.new_channel("peer") for _ in range(count)]
    for channel in channels:
        await layer.presence_join(group, channel, {"pid": str(channel)}, notify=False)
    print(",".join(channels), flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
