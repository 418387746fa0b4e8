"""TLS next to plaintext, per broker backend: point-to-point and fan-out.

Run from the repository root::

    .venv/bin/python bench/bench_tls.py [--backend redis ...] [--rounds 3]

For each backend it starts two servers of its own on loopback with the test
suite's fixtures (tests/servers): one plaintext, one TLS-only with a
certificate from a throwaway CA (``trustme``). On each it measures, with the
sender a separate layer instance so every message crosses the broker:

* p2p: messages/s with ``P2P_SENDERS`` concurrent senders and one receiver;
* fan-out: one ``group_send`` to ``FANOUT_MEMBERS`` members, deliveries/s
  (members divided by the median time from ``group_send`` to the last delivery).

It prints one row per backend and transport, and TLS as a ratio of plaintext.
Numbers depend on the machine and on what else runs on it; compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastapi_websockets import BaseChannelLayer  # noqa: E402
from fastapi_websockets.backends.nats import NATSChannelLayer  # noqa: E402
from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer  # noqa: E402
from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer  # noqa: E402
from fastapi_websockets.backends.redis import RedisChannelLayer  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.servers.certs import Certificates, make_certificates  # noqa: E402
from tests.servers.nats import NatsNode  # noqa: E402
from tests.servers.postgresql import PostgresServer  # noqa: E402
from tests.servers.rabbitmq import RabbitNode  # noqa: E402
from tests.servers.redis import RedisNode  # noqa: E402

P2P_MESSAGES = 5_000
P2P_SENDERS = 50
FANOUT_MEMBERS = 1_000
BACKENDS = ["redis", "postgresql", "nats", "rabbitmq"]

#: build(namespace, **options) -> a new layer on one server.
Build = Callable[..., BaseChannelLayer]


@contextlib.contextmanager
def servers(backend: str, certs: Certificates, workdir: Path) -> Iterator[dict[str, Build]]:
    """``{"plain": build, "tls": build}`` on two fresh servers of ``backend``; stopped after."""
    ca = str(certs.ca_file)
    if backend == "redis":
        plain, tls = (
            RedisNode(workdir / "plain", free_port()),
            RedisNode(workdir / "tls", free_port(), tls=certs),
        )
        for node in (plain, tls):
            node.start()
        try:
            yield {
                "plain": lambda ns, **o: RedisChannelLayer(url=plain.url, prefix=ns, **o),
                "tls": lambda ns, **o: RedisChannelLayer(url=tls.url, prefix=ns, tls_ca_file=ca, **o),
            }
        finally:
            plain.stop()
            tls.stop()
    elif backend == "postgresql":
        pg_plain, pg_tls = PostgresServer(), PostgresServer(tls=certs)
        for server in (pg_plain, pg_tls):
            server.start()
        try:
            yield {
                "plain": lambda ns, **o: PostgreSQLChannelLayer(dsn=pg_plain.dsn, schema=ns, **o),
                "tls": lambda ns, **o: PostgreSQLChannelLayer(dsn=pg_tls.dsn, schema=ns, tls_ca_file=ca, **o),
            }
        finally:
            pg_plain.destroy()
            pg_tls.destroy()
    elif backend == "nats":
        n_plain, n_tls = NatsNode(workdir / "plain"), NatsNode(workdir / "tls", tls=certs)
        for nats_node in (n_plain, n_tls):
            nats_node.start()

        def nats(url: str, **options: Any) -> Build:
            return lambda ns, **o: NATSChannelLayer(
                servers=[url], prefix=ns, group_bucket=ns, stream_name=ns, **options, **o
            )

        try:
            yield {"plain": nats(n_plain.url), "tls": nats(n_tls.url, tls_ca_file=ca)}
        finally:
            n_plain.stop()
            n_tls.stop()
    else:
        (workdir / "plain").mkdir(parents=True)
        (workdir / "tls").mkdir()
        r_plain, r_tls = RabbitNode(workdir / "plain"), RabbitNode(workdir / "tls", tls=certs)
        for rabbit_node in (r_plain, r_tls):
            rabbit_node.start()
        try:
            yield {
                "plain": lambda ns, **o: RabbitMQChannelLayer(
                    url=r_plain.url, exchange_name=ns, queue_prefix=ns, **o
                ),
                "tls": lambda ns, **o: RabbitMQChannelLayer(
                    url=r_tls.url, exchange_name=ns, queue_prefix=ns, tls_ca_file=ca, **o
                ),
            }
        finally:
            r_plain.close()
            r_tls.close()


async def p2p(build: Build, namespace: str) -> float:
    """Messages/s from ``P2P_SENDERS`` concurrent senders in one layer to a receiver in another."""
    # Room for every message: the receiver drains as fast as it can; this measures the path.
    sender, receiver = build(namespace), build(namespace, capacity=P2P_MESSAGES)
    try:
        channel = await receiver.new_channel("bench")
        await sender.send(channel, {"type": "warm"})
        await receiver.receive(channel)
        per_sender = P2P_MESSAGES // P2P_SENDERS

        async def send_some() -> None:
            for _ in range(per_sender):
                await sender.send(channel, {"type": "bench", "text": "x" * 100})

        started = time.perf_counter()
        sending = asyncio.gather(*(send_some() for _ in range(P2P_SENDERS)))
        for _ in range(per_sender * P2P_SENDERS):
            await receiver.receive(channel)
        await sending
        return per_sender * P2P_SENDERS / (time.perf_counter() - started)
    finally:
        await sender.close()
        await receiver.close()


async def fanout(build: Build, namespace: str, rounds: int) -> float:
    """Deliveries/s of one group_send to ``FANOUT_MEMBERS`` members held by another layer."""
    sender, receiver = build(namespace), build(namespace)
    try:
        members = [await receiver.new_channel("fan") for _ in range(FANOUT_MEMBERS)]
        for member in members:
            await receiver.group_add("bench", member)
        times = []
        for _ in range(rounds + 1):  # the first round warms up
            started = time.perf_counter()
            await sender.group_send("bench", {"type": "bench", "text": "x" * 100})
            await asyncio.gather(*(receiver.receive(member) for member in members))
            times.append(time.perf_counter() - started)
        return FANOUT_MEMBERS / statistics.median(times[1:])
    finally:
        await sender.close()
        await receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable; default: all")
    parser.add_argument("--rounds", type=int, default=5, help="fan-out rounds (median)")
    args = parser.parse_args()
    print(f"{'backend':<11} {'transport':<9} {'p2p msg/s':>10} {'fan-out deliveries/s':>21}")
    with tempfile.TemporaryDirectory(prefix="fw-bench-tls-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        certs = make_certificates(directory)
        for backend in args.backend or BACKENDS:
            with servers(backend, certs, directory / backend) as builds:
                results = {}
                for transport, build in builds.items():
                    namespace = f"bench{transport}"
                    rate = asyncio.run(p2p(build, namespace))
                    fan = asyncio.run(fanout(build, namespace + "f", args.rounds))
                    results[transport] = (rate, fan)
                    print(f"{backend:<11} {transport:<9} {rate:>10.0f} {fan:>21.0f}", flush=True)
                (p_plain, f_plain), (p_tls, f_tls) = results["plain"], results["tls"]
                print(f"{backend:<11} {'tls/plain':<9} {p_tls / p_plain:>10.2f} {f_tls / f_plain:>21.2f}")


if __name__ == "__main__":
    main()
