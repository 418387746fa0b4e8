"""Churn soak: does the demo app's memory stay flat while users come and go?

Run from the repository root::

    .venv/bin/python bench/soak_churn.py --backend redis [--cycles 60000] [--concurrency 50]

It starts the chosen broker with the test suite's server helpers (none for
in-memory), serves the demo app (``examples/chat/app.py``) with one uvicorn
process configured by the ``FASTAPI_WEBSOCKETS_*`` variables of
``.env.sample``, and runs ``--cycles`` user cycles, ``--concurrency`` at a
time, all in one room: connect, send a chat line, wait for it to come back,
disconnect. It prints the server's RSS after the first 10% of the cycles
(the baseline: imports, caches and pools have warmed up by then) and every
10% after that, the RSS at the end and the ratio end / baseline. The issue's
goal: within 1.25 on every backend at 60,000 cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench_e2e import OUR_PYTHON, Workers, rss_kb
from websockets.asyncio.client import connect

from tests.servers import free_port  # importable: bench_e2e put the root on sys.path

BACKENDS = ("inmemory", "redis", "postgresql", "nats", "rabbitmq")
PREFIX = "soak"


@contextlib.contextmanager
def broker(name: str) -> Iterator[tuple[dict[str, str], str, Callable[[], str]]]:
    """Start the broker ``name`` needs; yield the app's environment, the broker's address and
    a function that describes what the broker holds (Redis only; empty elsewhere)."""
    env = {"FASTAPI_WEBSOCKETS_BACKEND": name}
    if name == "inmemory":
        yield env, "no broker", str
        return
    with tempfile.TemporaryDirectory(prefix=f"soak-{name}-") as tmp:
        if name == "redis":
            from tests.servers.redis import RedisNode

            node = RedisNode(Path(tmp), free_port())
            node.start()
            try:
                env |= {"FASTAPI_WEBSOCKETS_REDIS_URL": node.url, "FASTAPI_WEBSOCKETS_REDIS_PREFIX": PREFIX}

                def held() -> str:
                    memory = node.cli_call("info", "memory").split("used_memory_human:")[1].split()[0]
                    return f"Redis holds {node.cli_call('dbsize').strip()} keys, {memory}"

                yield env, node.url, held
            finally:
                node.stop()
        elif name == "postgresql":
            from tests.servers.postgresql import PostgresServer

            server = PostgresServer()
            server.start()
            try:
                env |= {
                    "FASTAPI_WEBSOCKETS_POSTGRESQL_DSN": server.dsn,
                    "FASTAPI_WEBSOCKETS_POSTGRESQL_SCHEMA": PREFIX,
                }
                yield env, server.dsn, str
            finally:
                server.destroy()
        elif name == "nats":
            from tests.servers.nats import NatsNode, env_factory

            nats = NatsNode(Path(tmp))
            nats.start()
            try:
                yield env | env_factory([nats.url], 1)(PREFIX), nats.url, str
            finally:
                nats.stop()
        elif name == "rabbitmq":
            from tests.servers.rabbitmq import RabbitNode

            rabbit = RabbitNode(Path(tmp))
            rabbit.start()
            try:
                env |= {
                    "FASTAPI_WEBSOCKETS_RABBITMQ_URL": rabbit.url,
                    "FASTAPI_WEBSOCKETS_RABBITMQ_EXCHANGE_NAME": PREFIX,
                    "FASTAPI_WEBSOCKETS_RABBITMQ_QUEUE_PREFIX": PREFIX,
                }
                yield env, rabbit.url, str
            finally:
                rabbit.close()
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


class Soak:
    """The churning clients and the RSS samples of the server they churn on."""

    def __init__(self, url: str, pid: int, cycles: int, concurrency: int, timeout: float) -> None:
        self.url = url
        self.pid = pid
        self.cycles = cycles
        self.concurrency = concurrency
        self.timeout = timeout
        self.started = 0
        self.done = 0
        self.failed = 0
        self.samples: list[tuple[int, float, float]] = []  # (cycles done, seconds, RSS MB)
        self.began = 0.0
        self.slowest = 0.0
        self.slow = 0

    async def user(self, number: int) -> None:
        line = f"line {number}"
        # max_queue=None: with websockets' default flow control, a client that stops reading
        # (as this one does once its line came back) never sees the server's close frame
        # behind the room's unread notices, and close() waits 10 s for it.
        url = f"{self.url}/ws/soak?name=u{number}"
        async with connect(url, ping_interval=None, max_queue=None) as ws:
            await ws.send(json.dumps({"text": line}))
            async for frame in ws:
                event = json.loads(frame)
                if event.get("kind") == "message" and event.get("text") == line:
                    return

    async def worker(self) -> None:
        while self.started < self.cycles:
            number = self.started
            self.started += 1
            began = time.monotonic()
            try:
                await asyncio.wait_for(self.user(number), self.timeout)
                took = time.monotonic() - began
                self.slowest = max(self.slowest, took)
                self.slow += took > 1.0
            except Exception as error:
                self.failed += 1
                if self.failed <= 5:
                    print(f"cycle {number} failed: {error!r}", file=sys.stderr)
            self.done += 1
            if self.done % max(1, self.cycles // 10) == 0 or self.done == self.cycles:
                self.sample()

    def sample(self) -> None:
        elapsed = time.monotonic() - self.began
        rss = rss_kb(self.pid) / 1024
        self.samples.append((self.done, elapsed, rss))
        print(
            f"{self.done:>8,} cycles  {elapsed:7.1f} s  {self.done / elapsed:6.0f} cycles/s  "
            f"RSS {rss:7.1f} MB",
            flush=True,
        )

    async def run(self) -> None:
        self.began = time.monotonic()
        await asyncio.gather(*(self.worker() for _ in range(self.concurrency)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=BACKENDS, default="inmemory")
    parser.add_argument("--cycles", type=int, default=60_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--ws", default="auto", help="uvicorn --ws implementation")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one cycle may take")
    args = parser.parse_args()

    with broker(args.backend) as (env, where, held):
        server = Workers(OUR_PYTHON, "examples.chat.app:app", 1, env, ws=args.ws)
        try:
            server.wait_ready()
            print(
                f"backend {args.backend} ({where}); demo app pid {server.pids[0]}, RSS at start "
                f"{rss_kb(server.pids[0]) / 1024:.1f} MB; "
                f"{args.cycles:,} cycles, {args.concurrency} at a time"
            )
            soak = Soak(server.urls[0], server.pids[0], args.cycles, args.concurrency, args.timeout)
            try:
                import uvloop
            except ImportError:
                asyncio.run(soak.run())
            else:
                uvloop.run(soak.run())
            print(held())
        finally:
            server.stop()
    baseline = soak.samples[0]
    end = soak.samples[-1]
    print(
        f"\n{args.backend}: RSS {baseline[2]:.1f} MB after {baseline[0]:,} cycles, {end[2]:.1f} MB after "
        f"{end[0]:,}; ratio {end[2] / baseline[2]:.2f}; "
        f"{(end[2] - baseline[2]) * 1024 * 1024 / max(1, end[0] - baseline[0]):,.0f} bytes per cycle; "
        f"{soak.failed} cycles failed; {end[0] / end[1]:.0f} cycles/s; "
        f"slowest cycle {soak.slowest:.2f} s, {soak.slow} over 1 s"
    )


if __name__ == "__main__":
    main()
