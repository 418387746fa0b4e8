"""Nothing accepted is lost on NATS around a server restart or a dropped connection.

The sends are issued the instant the restarted server accepts connections,
without waiting for any layer to reconnect; the receiving process may still be
reconnecting. Servers are private nodes of the test, stopped with SIGTERM or
killed with SIGKILL and started again on the same port and data directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastapi_websockets import BaseChannelLayer
from fastapi_websockets.backends.nats import NATSChannelLayer
from fastapi_websockets.exceptions import BackendUnavailable, InvalidChannelLayerConfig
from tests.backends.test_nats import PATIENCE, Make, raw_client, wait_connected
from tests.conftest import layer_factory
from tests.faults import TcpProxy, eventually, receiver_process, send_burst
from tests.servers.nats import NatsNode, env_factory


@pytest.fixture
def make(layers: list[BaseChannelLayer], namespace: str) -> Make:
    """``make(servers=[...], **options)``: layers sharing the test's prefix, bucket and stream."""
    return layer_factory(
        layers, NATSChannelLayer, prefix=namespace, group_bucket=namespace, stream_name=namespace
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NatsNode]:
    """A node of our own, which the test stops, kills and starts again."""
    server = NatsNode(tmp_path / "node")
    server.first_start()
    try:
        yield server
    finally:
        server.stop()


def bring_down(node: NatsNode, how: str) -> None:
    if how == "kill":
        node.kill()
    else:
        node.stop()


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_sends_the_instant_the_server_is_back_all_arrive(node: NatsNode, make: Make, how: str) -> None:
    urls = [node.url]
    receiver, sender = make(servers=urls), make(servers=urls)
    channel = await receiver.new_channel()
    await receiver.group_add("room:demo", channel)
    await receiver.group_add("room:demo", "named.member")
    waiting = asyncio.create_task(receiver.receive(channel))
    waiting_named = asyncio.create_task(receiver.receive("jobs"))
    await asyncio.sleep(0.2)

    bring_down(node, how)
    await asyncio.sleep(0.3)
    node.start()  # returns as soon as the server accepts connections
    fresh = make(servers=urls)  # a new process's layer, sending at once
    await asyncio.gather(
        sender.send(channel, {"type": "direct", "by": "old"}),
        fresh.send(channel, {"type": "direct", "by": "new"}),
        sender.group_send("room:demo", {"type": "group", "by": "old"}),
        fresh.group_send("room:demo", {"type": "group", "by": "new"}),
        fresh.send("jobs", {"type": "named"}),
    )

    assert (await asyncio.wait_for(waiting_named, 30))["type"] == "named"
    got = [await asyncio.wait_for(waiting, 30)]
    got += [await receiver.receive(channel, timeout=30) for _ in range(3)]
    assert sorted((m["type"], m["by"]) for m in got) == [
        ("direct", "new"),
        ("direct", "old"),
        ("group", "new"),
        ("group", "old"),
    ]
    named = [await receiver.receive("named.member", timeout=30) for _ in range(2)]
    assert sorted(m["by"] for m in named) == ["new", "old"]


async def test_a_send_while_the_server_is_down_raises_within_the_timeout(node: NatsNode, make: Make) -> None:
    urls = [node.url]
    receiver, sender = make(servers=urls), make(servers=urls, timeout=1)
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await sender.send(channel, {"type": "warm"})
    assert (await receiver.receive(channel, timeout=10))["type"] == "warm"
    node.stop()
    loop = asyncio.get_running_loop()
    for call in (
        sender.send(channel, {"type": "down"}),
        sender.group_send("room", {"type": "down"}),
        sender.send("named", {"type": "down"}),
    ):
        started = loop.time()
        with pytest.raises(BackendUnavailable, match="NATS is unreachable"):
            await call
        assert loop.time() - started < 10  # bounded by the timeout (plus one attempt), not forever


async def test_the_fast_core_inbox_refuses_rather_than_buffers_while_disconnected(
    node: NatsNode, make: Make
) -> None:
    urls = [node.url]
    receiver, sender = make(servers=urls, inbox="core"), make(servers=urls, inbox="core")
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await sender.send(channel, {"type": "a"})
    await sender.group_send("room", {"type": "b"})
    # The owner is known now: its copy goes out before the listing, which waits for a pong.
    await sender.group_send("room", {"type": "c"})
    assert [(await receiver.receive(channel, timeout=10))["type"] for _ in range(3)] == ["a", "b", "c"]
    node.stop()
    for _ in range(500):  # until the client noticed
        if not sender.nc.is_connected:
            break
        await asyncio.sleep(0.02)
    with pytest.raises(BackendUnavailable, match="not connected"):
        await sender.send(channel, {"type": "down"})
    with pytest.raises(BackendUnavailable, match="not connected"):
        await sender.group_send("room", {"type": "down"})


async def test_a_cut_connection_of_the_receiver_loses_nothing(node: NatsNode, make: Make) -> None:
    async with TcpProxy(node.port) as proxy:
        receiver = make(servers=[f"nats://127.0.0.1:{proxy.port}"])
        sender = make(servers=[node.url])
        channel = await receiver.new_channel()
        await receiver.group_add("room", channel)
        got: list[int] = []

        async def collect() -> None:
            while True:
                got.append((await receiver.receive(channel))["i"])

        collecting = asyncio.create_task(collect())
        sent = 0

        async def send_for(seconds: float) -> None:
            nonlocal sent
            for _ in range(int(seconds / 0.25)):
                await sender.send(channel, {"type": "p", "i": sent})
                await sender.group_send("room", {"type": "g", "i": sent + 1})
                sent += 2
                await asyncio.sleep(0.25)

        await send_for(1.5)
        await proxy.cut()  # the receiver's connection drops; reconnects are refused
        await send_for(3.0)
        await proxy.reopen()
        await send_for(4.5)
        try:
            for _ in range(600):
                if len(got) >= sent:
                    break
                await asyncio.sleep(0.05)
        finally:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
    assert sent == 72
    assert sorted(got) == list(range(sent)), f"lost {sorted(set(range(sent)) - set(got))}"


async def test_a_connection_lost_while_the_inbox_check_is_retried_leaves_the_loop_running(
    node: NatsNode, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # Its heartbeats stopped, the keeper checks the inbox consumer, fails (no answer) and
    # tries again. The connection drops meanwhile: the keeper must wait for the reconnect.
    # It retried at once without yielding, which froze the event loop, reconnect included.
    caplog.set_level(logging.DEBUG, logger="fastapi_websockets")
    async with TcpProxy(node.port) as proxy:
        layer = make(servers=[f"nats://127.0.0.1:{proxy.port}"], timeout=2)
        channel = await layer.new_channel()
        proxy.hold()  # neither heartbeats nor replies reach the layer
        await eventually(lambda: "inbox check failed" in caplog.text, "a failed inbox check", PATIENCE)
        await proxy.cut()
        await asyncio.sleep(1)
        proxy.release()
        await proxy.reopen()
        await wait_connected(layer)
        await layer.send(channel, {"type": "after"})
        assert (await layer.receive(channel, timeout=PATIENCE))["type"] == "after"
    # A frozen loop ends only when pytest-timeout raises in it: the keeper then fails.
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def test_ten_restarts_in_a_row_lose_nothing_across_processes(
    node: NatsNode, make: Make, namespace: str
) -> None:
    env = {
        **env_factory([node.url], 1)(namespace),
        "FASTAPI_WEBSOCKETS_NATS_TIMEOUT": "10",
        # A named message pulled just as the server died is redelivered after the ack wait:
        # keep it short so such a message shows up within the test's wait.
        "FASTAPI_WEBSOCKETS_NATS_MESSAGE_TIMEOUT": "5",
    }
    async with receiver_process(env, 60) as receiver:
        sender = make(servers=[node.url])
        sent: list[str] = []
        for cycle in range(10):
            bring_down(node, "kill" if cycle % 2 else "stop")
            node.start()
            sent += await send_burst(sender, receiver.channel, f"{cycle}-at-once", 3)
            await asyncio.sleep(1.0)
            sent += await send_burst(sender, receiver.channel, f"{cycle}-later", 3)
        await receiver.wait_for(sent, 60)
        lost = sorted(set(sent) - set(receiver.got))
        assert not lost, f"{len(lost)} of {len(sent)} lost: {lost[:10]}"
        assert len(sent) == 180


async def test_an_inbox_consumer_deleted_out_of_band_comes_back(
    node: NatsNode, make: Make, namespace: str
) -> None:
    # The driver fails under the keeper (its consumer is gone, the server's heartbeats
    # stop): it notices, creates the consumer again, and what waited is delivered.
    receiver, sender = make(servers=[node.url]), make(servers=[node.url])
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    client = await raw_client([node.url])
    try:
        await client.jetstream().delete_consumer(f"{namespace}_INBOX", f"fwi{receiver.client_token}")
    finally:
        await client.close()
    await sender.send(channel, {"type": "after"})
    await sender.group_send("room", {"type": "group"})
    got = [(await receiver.receive(channel, timeout=60))["type"] for _ in range(2)]
    assert got == ["after", "group"]


def test_the_inbox_option_is_checked() -> None:
    with pytest.raises(InvalidChannelLayerConfig, match="inbox must be one of jetstream, core, got 'disk'"):
        NATSChannelLayer(inbox="disk")


async def test_adding_a_reconnecting_processs_channel_to_a_group_waits_for_it(
    node: NatsNode, make: Make
) -> None:
    async with TcpProxy(node.port) as proxy:
        receiver = make(servers=[f"nats://127.0.0.1:{proxy.port}"])
        sender = make(servers=[node.url])
        channel = await receiver.new_channel()
        await proxy.cut()

        async def back_soon() -> None:
            await asyncio.sleep(1.0)
            await proxy.reopen()

        reopening = asyncio.create_task(back_soon())
        # The owner does not answer while it reconnects; its inbox consumer says it lives.
        await sender.group_add("room", channel)
        await reopening
        await sender.group_send("room", {"type": "group"})
        assert (await receiver.receive(channel, timeout=30))["type"] == "group"


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_group_sends_to_named_members_survive_an_outage_longer_than_the_timeout(
    node: NatsNode, make: Make, how: str
) -> None:
    # A group_send that returned normally has stored its copy for every named member:
    # nothing is left to a background task that could give up while the server is down.
    urls = [node.url]
    receiver, sender = make(servers=urls), make(servers=urls, timeout=1)
    await receiver.group_add("room", "named.member")
    count = 60
    await asyncio.gather(*(sender.group_send("room", {"type": "g", "i": i}) for i in range(count)))
    bring_down(node, how)
    await asyncio.sleep(2.5)  # longer than the sender's timeout (and its last attempt)
    with pytest.raises(BackendUnavailable, match="NATS is unreachable"):
        await sender.group_send("room", {"type": "g", "i": count})
    node.start()
    got = [(await receiver.receive("named.member", timeout=30))["i"] for _ in range(count)]
    assert sorted(got) == list(range(count))
    # Nothing more arrives: the group_send that raised stored nothing.
    await sender.send("named.member", {"type": "g", "i": -1})
    assert (await receiver.receive("named.member", timeout=30))["i"] == -1
