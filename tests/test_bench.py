"""The benchmark harness's two-process p2p scenario runs against a real Redis (figures, not speeds)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fastapi_websockets import BaseChannelLayer, InMemoryChannelLayer
from fastapi_websockets.backends.nats import NATSChannelLayer
from fastapi_websockets.types import Message
from tests.faults import eventually
from tests.servers.nats import NatsNode
from tests.servers.redis import RedisNode

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402
import rate_nats_named  # noqa: E402


def test_p2p2_closes_its_loops_across_two_processes(redis_server: RedisNode) -> None:
    """p2p2 prints every p2p figure, measured in a child that heard of each arrival over the pipe.

    Each loop ends only once every message sent was reported back, so a figure for both
    loops means the reports reached the sending process; the report hop and the reads per
    message are what only the two-process form measures.
    """
    assert redis_server.proc is not None
    server = {
        "broker": "redis",
        "url": redis_server.url,
        "port": redis_server.port,
        "pids": [redis_server.proc.popen.pid],
    }
    sizes = {"p2p_seconds": 0.2, "p2p_messages": 300, "limit": 60.0}
    result = harness.run_job(harness.find_impl("redis", "redis"), "p2p2", server, sizes)
    assert "error" not in result, result
    for name in ("p2p1", "p2p16"):
        assert result[f"{name}_rate"] > 0
        assert result[f"{name}_p50"] > 0
        assert result[f"{name}_peer_cpu_us"] >= 0
        assert 0 < result[f"{name}_reads_per_msg"] <= 1
    assert result["report_hop_p50"] > 0


class DropsOne(InMemoryChannelLayer):
    """An in-memory layer that loses the p2p message with id 5, as 0.1.0's RabbitMQ layer lost one."""

    async def send(self, channel: str, message: Message) -> None:
        if message.get("id") != 5:
            await super().send(channel, message)


class FailsAfterOne(InMemoryChannelLayer):
    """An in-memory layer whose receive fails after its first message, as 0.1.0's Redis one's did."""

    received = 0

    async def receive(self, channel: str, timeout: float | None = None) -> Message:
        if self.received:
            raise ConnectionError("pool exhausted")
        self.received += 1
        return await super().receive(channel, timeout)


def in_memory(layer: type[InMemoryChannelLayer]) -> harness.Impl:
    return harness.Impl(layer.__name__, "ours", lambda server, namespace: layer(), shared=False)


FAN_SIZES = {"receivers": 20, "rounds": 3, "fanout_seconds": 5.0, "stall": 0.5}


def test_a_lost_message_ends_the_loop_after_stall_saying_which() -> None:
    """The closed loop waiting for a message that never comes fails after --stall, naming it."""

    async def run() -> None:
        impl = in_memory(DropsOne)
        async with (
            harness.layer_pair(impl, {}, "t") as (sender, receiver),
            harness.p2p_link(sender, receiver) as (send, waiting),
        ):
            sizes = {"p2p_seconds": 30.0, "p2p_messages": 100, "stall": 0.5}
            await harness.closed_loop(send, waiting, 1, sizes)

    with pytest.raises(RuntimeError, match=r"p2p1: message 5 not received in 0.5 s \(5 of this loop were\)"):
        asyncio.run(asyncio.wait_for(run(), 10))


def test_a_failed_receiver_ends_the_fanout_at_once() -> None:
    """A receiver that raises fails the rounds waiting for it with its error, not after a limit."""
    sizes = {**FAN_SIZES, "stall": None}  # no stall guard: only the failure can end it
    impl = in_memory(FailsAfterOne)
    with pytest.raises(RuntimeError, match="a receiver of 20 failed: ConnectionError: pool exhausted"):
        asyncio.run(asyncio.wait_for(harness.fanout(impl, {}, "t", sizes), 10))


def test_table_says_why_a_cell_has_no_figure() -> None:
    """Every cell of the scenarios asked for holds a figure or a word, and the notes say why."""
    rows: dict[str, dict[str, dict[str, Any]]] = {
        "inmemory": {
            "p2p": {"p2p1_rate": 10.0, "p2p1_p50": 0.001, "p2p16_rate": 20.0, "p2p16_p50": 0.002},
            "p2p2": {"cannot": "two processes share nothing in memory"},
            "idle": {"connections": 0, "cpu": 0.001, "server_cpu": None},
        },
        "row": {
            "p2p": {"error": "RuntimeError: lost", "flaw": "it loses messages"},
            "p2p2": {"skipped": "fanout failed"},
            "idle": {"cannot": "p2p only"},
        },
    }
    text = harness.table(rows, ["p2p", "p2p2", "idle"])
    lines = text.splitlines()
    assert "fan-out" not in lines[0]
    cells = [[cell.strip() for cell in line.split("|")[1:]] for line in lines[2:4]]
    assert cells[0] == ["10", "1.00", "20", "2.00", *["cannot"] * 4, "0", "0.10", "-"]
    assert cells[1] == [*["error"] * 4, *["skipped"] * 4, *["cannot"] * 3]
    assert "inmemory p2p2: cannot: two processes share nothing in memory" in lines
    assert "row p2p: RuntimeError: lost; why: it loses messages" in lines
    assert "row p2p2: skipped: fanout failed" in lines
    assert "row idle: cannot: p2p only" in lines


SENDERS_4 = ("--senders", "4", "--messages", "300", "--repeat", "1")


def test_profile_p2p2_counts_any_number_of_senders() -> None:
    """profile_p2p2.py --senders 4 runs the counted loop with 4 senders (it took only 1 or 16)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "profile_p2p2.py"), "--backend", "redis", *SENDERS_4],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "error" not in done.stdout, done.stdout
    assert done.stdout.startswith("0 here   rate"), done.stdout


ROW = ("--row", "nats 0.1.0")


def test_compare_trees_names_the_rows_it_can_run() -> None:
    """--row takes a row of this project's layers; another name lists them."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare_trees.py"),
            "--backend",
            "nats",
            *ROW,
            f"--tree=here={BENCH.parent}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--row: one of 'nats', 'nats core'" in done.stderr


async def test_rate_nats_named_counts_the_requests_of_a_client_the_layer_made_anew(
    nats_node: NatsNode, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    # The count wrapped the layer's first client: once the layer replaced a client nats-py
    # closed for good (_rebuild), the sends went on uncounted.
    layer = NATSChannelLayer(servers=[nats_node.url], prefix=namespace, stream_name=namespace)
    layers.append(layer)
    calls: Counter[str] = Counter()
    with rate_nats_named.counting_requests(calls):
        await layer.send("named.rate", {"type": "m"})
        assert calls["publish"] == 1
        first = layer.nc
        await first.close()  # closed for good, from outside: the layer makes a new client
        await eventually(lambda: layer.connection.up and layer._nc not in (None, first), "a new client")
        await layer.send("named.rate", {"type": "m"})
    assert calls["publish"] == 2
