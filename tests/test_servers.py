"""The test servers start even when a port chosen for them is taken before they bind it.

A port seen free can be taken a moment later by an outgoing connection (its
local end) or another listener; the server on it then exits at bind. These
tests take a port the way a connection would, between choosing and starting,
and check that the server moves to a fresh port instead of failing (or, in a
group, leaving the others waiting for it until a timeout).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults import TcpProxy, eventually
from tests.servers import free_port, free_port_block
from tests.servers.nats import NatsCluster, NatsNode
from tests.servers.redis import RedisCluster, RedisNode


@contextmanager
def taken(port: int) -> Iterator[None]:
    """Hold ``port`` as the local end of a connection, as an outgoing client would."""
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.bind(("127.0.0.1", port))
        client.connect(listener.getsockname())
        yield


def test_free_ports_are_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    room = low >= 11_000  # else the ports come from the kernel, in that range
    assert (free_port() < low) is room
    assert (free_port_block(6) + 5 < low) is room


def test_a_redis_node_moves_off_a_taken_port(tmp_path: Path) -> None:
    node = RedisNode(tmp_path, free_port())
    chosen = node.port
    try:
        with taken(chosen):
            node.first_start()
        assert node.port != chosen
        assert node.cli_call("ping").strip() == "PONG"
    finally:
        node.stop()


@pytest.mark.parametrize("which", ["port", "cluster_port"])
def test_a_redis_cluster_starts_when_a_port_of_a_node_is_taken(tmp_path: Path, which: str) -> None:
    cluster = RedisCluster(tmp_path)
    chosen = getattr(cluster.nodes[1], which)
    try:
        with taken(chosen):
            cluster.start()
        assert getattr(cluster.nodes[1], which) != chosen
        assert "cluster_known_nodes:3" in cluster.nodes[0].cli_call("cluster", "info")
    finally:
        cluster.stop()


def test_a_nats_node_moves_off_a_taken_port(tmp_path: Path) -> None:
    node = NatsNode(tmp_path)
    chosen = node.port
    try:
        with taken(chosen):
            node.first_start()
        assert node.port != chosen
        assert node.monitor("/varz")["port"] == node.port
    finally:
        node.stop()


@pytest.mark.parametrize("which", ["port", "cluster_port", "monitor_port"])
def test_a_nats_cluster_starts_when_a_port_of_a_node_is_taken(tmp_path: Path, which: str) -> None:
    cluster = NatsCluster(tmp_path)
    chosen = getattr(cluster.nodes[1], which)
    try:
        with taken(chosen):
            cluster.start()
        assert getattr(cluster.nodes[1], which) != chosen
        for node in cluster.nodes:
            assert len(node.monitor("/routez")["routes"]) >= 2
    finally:
        cluster.stop()


async def test_a_connection_the_proxy_accepted_just_before_a_cut_is_cut_too() -> None:
    # A target that leaves new connections waiting: its accept queue is full (listen(0)
    # and one connection it never accepts), so the kernel drops the proxy's SYN and the
    # proxy's connect retries until the test accepts.
    with socket.socket() as target, socket.socket() as filler:
        target.bind(("127.0.0.1", 0))
        target.listen(0)
        target.setblocking(False)
        filler.connect(target.getsockname())
        async with TcpProxy(target.getsockname()[1]) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            await eventually(lambda: proxy.accepted == 1, "the proxy accepted the connection")
            await proxy.cut()  # while the proxy waits for the target
            loop = asyncio.get_running_loop()
            (await loop.sock_accept(target))[0].close()  # the filler's
            upstream, _ = await loop.sock_accept(target)  # the proxy's, connected after the cut
            with upstream:
                # Cut: the proxy closes both ends instead of piping them.
                assert await asyncio.wait_for(reader.read(), 30) == b""
                assert await loop.sock_recv(upstream, 1) == b""
            writer.close()
