"""NATS for ``python -m bench``: our layer and 0.1.0's on a private JetStream server.

The idle probe adds what the server's monitoring endpoint says: subscriptions on
the worker's own connections, and JetStream consumers created meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import Impl, Server


@contextlib.contextmanager
def server() -> Iterator[Server]:
    from tests.servers.nats import NatsNode

    with tempfile.TemporaryDirectory(prefix="fw-bench-nats-") as tmp:
        node = NatsNode(Path(tmp))
        node.start()
        try:
            assert node.proc is not None
            yield {
                "url": node.url,
                "port": node.port,
                "pids": [node.proc.popen.pid],
                "monitor": node.monitor_url,
            }
        finally:
            node.stop()


def probe(server: Server, sockets: set[int]) -> dict[str, float]:
    def get(path: str) -> Any:
        with urllib.request.urlopen(server["monitor"] + path, timeout=5) as response:
            return json.loads(response.read())

    connections = get("/connz?subs=1&limit=100000")["connections"]
    mine = [c for c in connections if c["port"] in sockets]
    return {
        "subscriptions": sum(c.get("subscriptions", 0) for c in mine),
        "consumers": get("/jsz")["consumers"],
    }


def cleanup(server: Server, namespace: str) -> None:
    """Delete the streams a job left behind (its named stream, inbox stream and KV bucket).

    0.1.0 never deletes its durable consumers: one fanout job left 1,001 on the server, and
    the run's later jobs shared it with them (2,002 and 44,000 stored messages after two
    passes). Our rows measured no slower beside them (docs/performance/nats.md,
    "Why a run's rates moved 3x"), but each job now finds the server as the first one did.
    """
    import nats

    with urllib.request.urlopen(server["monitor"] + "/jsz?streams=1", timeout=5) as response:
        accounts = json.loads(response.read()).get("account_details", [])
    names = [stream["name"] for account in accounts for stream in account.get("stream_detail", [])]
    # Every row names its streams after the job's namespace: <ns>, <ns>_INBOX, <ns>_P, <ns>_H…, KV_<ns>.
    left = [name for name in names if name.removeprefix("KV_").split("_")[0] == namespace]

    async def delete() -> None:
        client = await nats.connect(server["url"])
        try:
            js = client.jetstream()
            for name in left:
                await js.delete_stream(name)
        finally:
            await client.close()

    if left:
        asyncio.run(delete())


def ours(server: Server, namespace: str) -> Any:
    """Our layer; in the 0.1.0 virtualenv the same import path gives 0.1.0's."""
    from fastapi_websockets.backends.nats import NATSChannelLayer

    return NATSChannelLayer(
        servers=[server["url"]], prefix=namespace, group_bucket=namespace, stream_name=namespace
    )


def ours_core(server: Server, namespace: str) -> Any:
    """Our layer with the fast, unstored inbox (``inbox="core"``)."""
    from fastapi_websockets.backends.nats import NATSChannelLayer

    return NATSChannelLayer(
        servers=[server["url"]], prefix=namespace, group_bucket=namespace, stream_name=namespace, inbox="core"
    )


#: Seen 2026-12-02: median rounds of 2.9 s (one process, load 5) and 3.9 s (fanout2, load 7-55),
#: and a fanout2 job that ended on a round over --stall (10 s) at load 6.
FLAW_010 = (
    "0.1.0's group_send publishes to the members one by one, each waiting for its store "
    "acknowledgement: seconds a round, more than --stall on a busy machine"
)

IMPLS = [
    Impl("nats", "ours", ours),
    Impl("nats core", "ours", ours_core),
    Impl("nats 0.1.0", "0.1.0", ours, flaws=dict.fromkeys(("fanout", "fanout2"), FLAW_010)),
]
