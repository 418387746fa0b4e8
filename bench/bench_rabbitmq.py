"""RabbitMQ for ``python -m bench``: our layer and 0.1.0's on a private node.

The idle probe adds the queues and consumers the broker holds (``rabbitmqctl``),
counted as the change over the scenario.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import Impl, Server


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


def probe(server: Server, sockets: set[int]) -> dict[str, float]:
    def count(*args: str) -> int:
        done = subprocess.run(
            [*server["ctl"], *args, "--no-table-headers"],
            env={**os.environ, **server["env"]},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return sum(1 for line in done.stdout.splitlines() if line.strip())

    return {"queues": count("list_queues", "name"), "consumers": count("list_consumers", "queue_name")}


def ours(server: Server, namespace: str) -> Any:
    """Our layer; in the 0.1.0 virtualenv the same import path gives 0.1.0's."""
    from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer

    return RabbitMQChannelLayer(url=server["url"], exchange_name=namespace, queue_prefix=namespace)


IMPLS = [Impl("rabbitmq", "ours", ours), Impl("rabbitmq 0.1.0", "0.1.0", ours)]
