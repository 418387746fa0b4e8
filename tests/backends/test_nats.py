"""Behaviour only the NATS backend has, against real nats-server processes.

Subjects, subscriptions and the KV layout are read back from the server (its
monitoring endpoint or a plain nats-py client), never from the layer's
private state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from fastapi_websockets import (
    BaseChannelLayer,
    ChannelFull,
    ChannelLayerClosed,
    InvalidChannelLayerConfig,
    StreamPosition,
    get_channel_layer_from_env,
)
from fastapi_websockets.backends.nats import (
    NATSChannelLayer,
    _flush_in_order,
    consumer_name,
    subject_token,
    token_to_name,
)
from fastapi_websockets.backends.nats_presence import chunk_of
from fastapi_websockets.backends.packing import pack
from fastapi_websockets.exceptions import BackendUnavailable, ChannelLayerError, MessageTooLarge
from tests.conformance.test_layer import (
    assert_bursts_in_call_order,
    assert_mixed_order,
    mixed_rounds,
    send_in_two_waves,
)
from tests.conftest import layer_factory
from tests.faults import TcpProxy, eventually, give_up_joins
from tests.leaks import SECRET, assert_no_secret
from tests.servers import free_port
from tests.servers.nats import NatsCluster, NatsNode

# ------------------------------------------------------------------ fixtures


Make = Callable[..., NATSChannelLayer]
_T = TypeVar("_T")
#: Seconds a test waits for what the server does on its own (not a measure of speed).
PATIENCE = 30.0


@pytest.fixture
def make(layers: list[BaseChannelLayer], namespace: str) -> Make:
    """``make(servers=[...], **options)``: layers sharing the test's prefix, bucket and stream."""
    return layer_factory(
        layers, NATSChannelLayer, prefix=namespace, group_bucket=namespace, stream_name=namespace
    )


@pytest.fixture
def private_node(tmp_path: Path) -> Iterator[NatsNode]:
    """A node of our own, which the test may stop and start again."""
    node = NatsNode(tmp_path / "node")
    node.first_start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node cluster of our own, whose nodes the test may kill."""
    cluster = NatsCluster(tmp_path / "cluster")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def raw_client(urls: list[str]) -> Client:
    return await nats.connect(servers=urls, connect_timeout=5)


async def until_subscribed(client: Client) -> None:
    """Return once nats-server has every subscription ``client`` made so far.

    ``client.flush()`` does not prove it: nats-py writes the ping at once, ahead of
    a SUB still waiting in its buffer, so the pong can come before the server has
    the subscription (a request another connection makes then is not seen). A
    message the client sends itself after the SUB comes back only once the server
    has read the SUB.
    """
    inbox = client.new_inbox()
    probe = await client.subscribe(inbox, max_msgs=1)
    await client.publish(inbox, b"")
    await probe.next_msg(timeout=None)


def connection_of(node: NatsNode, layer: NATSChannelLayer) -> dict[str, Any]:
    """The server's view of the layer's connection (/connz, with subscriptions)."""
    connz = node.monitor("/connz?subs=detail&limit=1024")
    mine = [c for c in connz["connections"] if c.get("name") == f"fastapi-websockets {layer.client_token}"]
    assert len(mine) == 1, f"expected one connection for the layer, found {len(mine)}"
    conn: dict[str, Any] = mine[0]
    return conn


def subjects_of(conn: dict[str, Any]) -> list[str]:
    return sorted(sub["subject"] for sub in conn.get("subscriptions_list_detail", []))


async def wait_connected(*layers: NATSChannelLayer, timeout: float = 60.0) -> None:
    """Wait until every layer has (re)connected and the server has its subscriptions.

    A PING/PONG round trip answered by the server proves both; a ping lost with a
    dying connection is simply sent again.
    """
    deadline = time.monotonic() + timeout
    for layer in layers:
        while True:
            assert time.monotonic() < deadline, "layer did not reconnect"
            if layer.nc.is_connected:
                try:
                    await layer.nc.flush(timeout=1)
                    break
                except nats.errors.TimeoutError:
                    pass
            await asyncio.sleep(0.05)


# ------------------------------------------------------------ names, subjects


NASTY = [
    "a.b",
    "a_b",
    "a-b",
    "a:b",
    "A.b",
    "a*b",
    "a>b",
    "*",
    ">",
    "a.*",
    "a.>",
    "..",
    "_2e",
    "ä.b",
    "room:demo",
]


def test_subject_tokens_are_reversible_and_distinct() -> None:
    tokens = [subject_token(name) for name in NASTY]
    assert len(set(tokens)) == len(NASTY)
    for name, token in zip(NASTY, tokens, strict=True):
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token
        assert token_to_name(token) == name
    assert subject_token("a.b") != subject_token("a_b")


def test_the_connection_of_a_layer_not_started_says_to_start_it() -> None:
    layer = NATSChannelLayer()
    with pytest.raises(ChannelLayerClosed, match=r"await layer\.start\(\)"):
        layer.nc  # noqa: B018 - the property is what raises
    with pytest.raises(ChannelLayerClosed, match=r"await layer\.start\(\)"):
        layer.js  # noqa: B018


async def test_names_cannot_inject_tokens_or_wildcards(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    layer, member = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    channel = await member.new_channel()
    for name in NASTY:
        await member.group_add(name, channel)
    spy = await raw_client([nats_node.url])
    seen: list[str] = []
    everything = asyncio.Event()
    total = 2 * len(NASTY) + 2

    async def record(msg: Any) -> None:
        if msg.reply.startswith("$JS.ACK."):
            return  # a delivery of the member's inbox consumer (to its .p.<token>.d)
        seen.append(msg.subject)
        if len(seen) >= total:
            everything.set()

    await spy.subscribe(f"{namespace}.>", cb=record)
    await until_subscribed(spy)
    try:
        for name in NASTY:
            await layer.send(name, {"type": "t", "name": name})
            await layer.group_send(name, {"type": "t", "group": name})
        # A process-specific name whose token tries to be a wildcard goes nowhere else.
        await layer.send("evil.*!x", {"type": "t"})
        await layer.send("evil.>!x", {"type": "t"})
        await spy.flush()
        await asyncio.wait_for(everything.wait(), 10)
        await spy.flush()  # anything unexpected would have arrived by now too
    finally:
        await spy.close()
    inbox = f"{namespace}.i.{subject_token(member.client_token)}"
    expected = sorted(
        [f"{namespace}.n.{subject_token(name)}" for name in NASTY]
        + [inbox] * len(NASTY)
        + [f"{namespace}.i.{subject_token('*')}", f"{namespace}.i.{subject_token('>')}"]
    )
    assert sorted(seen) == expected
    for subject in seen:
        assert len(subject.split(".")) == 3  # prefix, kind, token
        assert "*" not in subject
        assert ">" not in subject
    # Each named channel got exactly its own message, each group its own.
    for name in NASTY:
        assert (await layer.receive(name, timeout=10))["name"] == name
    assert [(await member.receive(channel, timeout=10))["group"] for _ in NASTY] == NASTY


# ------------------------------------------------- O(1) broker resources


async def test_one_connection_and_subscription_whatever_the_receivers(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    layer = make(servers=[nats_node.url])
    first = await layer.new_channel("ws")
    one = asyncio.create_task(layer.receive(first))
    await asyncio.sleep(0.1)
    before = subjects_of(connection_of(nats_node, layer))
    channels = [await layer.new_channel("ws") for _ in range(300)]
    waiting = [asyncio.create_task(layer.receive(channel)) for channel in channels]
    await asyncio.sleep(0.2)
    after = subjects_of(connection_of(nats_node, layer))
    ours = [subject for subject in after if not subject.startswith("_INBOX.")]  # nats-py's reply inbox
    assert before == after
    assert ours == [f"{namespace}.p.{layer.client_token}.{kind}" for kind in "cd"]
    # All 301 receivers are served through that one subscription.
    other = make(servers=[nats_node.url])
    for channel in [first, *channels]:
        await other.send(channel, {"type": "x"})
    results = await asyncio.gather(one, *waiting)
    assert len(results) == 301


async def test_groups_cost_no_subscription_and_one_consumer_per_process(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    layer = make(servers=[nats_node.url])
    for _ in range(5):
        await layer.group_add("room:demo", await layer.new_channel())
    few = subjects_of(connection_of(nats_node, layer))
    for group in ("room:demo", "other"):
        for _ in range(100):
            await layer.group_add(group, await layer.new_channel())
    many = subjects_of(connection_of(nats_node, layer))
    assert few == many
    # Ours: the inbox's deliveries and control requests. The rest are nats-py's: one
    # reply inbox for requests.
    assert [s for s in many if not s.startswith("_INBOX.")] == [
        f"{namespace}.p.{layer.client_token}.{kind}" for kind in "cd"
    ]
    assert len(many) <= 3
    client = await raw_client([nats_node.url])
    try:
        consumers = await client.jetstream().consumers_info(f"{namespace}_INBOX")
    finally:
        await client.close()
    assert [info.name for info in consumers] == [f"fwi{layer.client_token}"]


def block_numbers(nats_node: NatsNode, stream: str) -> list[int]:
    """The numbers of the file blocks the server holds for ``stream`` (``msgs/<n>.blk``)."""
    blocks = nats_node.workdir / "js" / "jetstream" / "$G" / "streams" / stream / "msgs"
    return sorted(int(block.name.split(".")[0]) for block in blocks.glob("*.blk"))


async def test_a_closed_loop_of_sends_makes_no_block_file_per_message(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # nats-server 2.15 replaces the last file block of a stream that an acknowledgement empties
    # (a new file, the old one deleted; 2.9.10 keeps it, so there this passes either way).
    # Inbox deliveries are acknowledged one late, so a send that waits for the previous
    # message's arrival finds the stream never empty.
    sender, receiver = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    channel = await receiver.new_channel()
    for i in range(50):
        await sender.send(channel, {"type": "x", "i": i})
        assert (await receiver.receive(channel, timeout=PATIENCE))["i"] == i
    numbers = block_numbers(nats_node, f"{namespace}_INBOX")
    assert numbers
    assert max(numbers) < 10, numbers


@pytest.mark.parametrize("channels", [1, 3])
async def test_a_closed_loop_over_named_channels_makes_no_block_file_per_message(
    nats_node: NatsNode, namespace: str, make: Make, channels: int
) -> None:
    # The named channels' work-queue stream is emptied by each acknowledgement of a worker
    # that keeps up; an anchor message outside every channel keeps its last block in use.
    sender, receiver = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    names = [f"work.{n}" for n in range(channels)]
    for i in range(50):
        for name in names:
            await sender.send(name, {"type": "x", "i": i})
        for name in names:
            assert (await receiver.receive(name, timeout=PATIENCE))["i"] == i
    numbers = block_numbers(nats_node, namespace)
    assert numbers
    assert max(numbers) < 10, numbers
    for name in names:
        assert await stored_in(nats_node, namespace, name) == 0
    # A closing layer takes its anchor away: nothing of it is left in the stream.
    await receiver.close()
    client = await raw_client([nats_node.url])
    try:
        assert (await client.jetstream().stream_info(namespace)).state.messages == 0
    finally:
        await client.close()


async def test_an_inbox_delivery_nothing_follows_is_acknowledged_and_close_acknowledges_the_held_one(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    sender, receiver = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "alone"})
    assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "alone"
    client = await raw_client([nats_node.url])
    try:
        js = client.jetstream()
        stream = f"{namespace}_INBOX"
        # Acknowledged without a next delivery, and well before the server would send it again.
        info = await js.consumer_info(stream, f"fwi{receiver.client_token}")
        for _ in range(int(PATIENCE / 0.05)):
            if info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
            info = await js.consumer_info(stream, f"fwi{receiver.client_token}")
        assert info.num_ack_pending == 0, info
        assert info.num_redelivered == 0, info
        assert (await js.stream_info(stream)).state.messages == 0
        # The delivery held when the layer closes is acknowledged, not left in the stream.
        await sender.send(channel, {"type": "last"})
        assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "last"
        await receiver.close()
        for _ in range(int(PATIENCE / 0.05)):
            if (await js.stream_info(stream)).state.messages == 0:
                break
            await asyncio.sleep(0.05)
        assert (await js.stream_info(stream)).state.messages == 0
    finally:
        await client.close()


# ------------------------------------------------------------ packed inbox sends


async def inbox_last_seq(nats_node: NatsNode, namespace: str) -> int:
    """The sequence of the newest message the inbox stream stored, asked of the server."""
    client = await raw_client([nats_node.url])
    try:
        return (await client.jetstream().stream_info(f"{namespace}_INBOX")).state.last_seq
    finally:
        await client.close()


async def store_raw_in_inbox(nats_node: NatsNode, namespace: str, token: str, *payloads: bytes) -> None:
    """Store ``payloads`` in the inbox of the process ``token`` with a plain client."""
    client = await raw_client([nats_node.url])
    try:
        js = client.jetstream()
        for payload in payloads:
            await js.publish(f"{namespace}.i.{subject_token(token)}", payload)
    finally:
        await client.close()


def packed_inbox_message(msg_id: int, frames: list[tuple[str, bytes]] | bytes) -> bytes:
    """An inbox message of kind ``s`` (packed sends): the frame header, then ``packing.pack``."""
    body = frames if isinstance(frames, bytes) else pack(frames)
    return struct.pack(">cQH", b"s", msg_id, 0) + body


async def test_concurrent_sends_to_one_process_are_one_stored_message_and_keep_each_senders_order(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    receiver, sender = make(servers=[nats_node.url], capacity=1000), make(servers=[nats_node.url])
    channels = [await receiver.new_channel() for _ in range(16)]
    await sender.send(channels[0], {"type": "lone", "i": -1})
    assert (await receiver.receive(channels[0], timeout=PATIENCE))["i"] == -1
    assert (sender.packed_publishes, sender.packed_sends) == (0, 0)  # a lone send goes alone
    stored = await inbox_last_seq(nats_node, namespace)
    # Sixteen sends in one loop turn: one stored message, one PubAck for all of them.
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i, channel in enumerate(channels)))
    assert [(await receiver.receive(channel, timeout=PATIENCE))["i"] for channel in channels] == list(
        range(16)
    )
    assert await inbox_last_seq(nats_node, namespace) - stored == 1
    assert (sender.packed_publishes, sender.packed_sends) == (1, 16)

    async def sends(task: int) -> None:
        for i in range(20):
            await sender.send(channels[0], {"type": "n", "task": task, "i": i})

    stored = await inbox_last_seq(nats_node, namespace)
    await asyncio.gather(*(sends(task) for task in range(16)))
    got = [await receiver.receive(channels[0], timeout=PATIENCE) for _ in range(320)]
    for task in range(16):
        assert [m["i"] for m in got if m["task"] == task] == list(range(20))
    assert await inbox_last_seq(nats_node, namespace) - stored < 320
    with pytest.raises(TimeoutError):
        await receiver.receive(channels[0], timeout=0.2)


async def test_core_inbox_sends_are_not_packed(nats_node: NatsNode, make: Make) -> None:
    receiver = make(servers=[nats_node.url], capacity=1000, inbox="core")
    sender = make(servers=[nats_node.url], inbox="core")
    channels = [await receiver.new_channel() for _ in range(16)]
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i, channel in enumerate(channels)))
    assert [(await receiver.receive(channel, timeout=PATIENCE))["i"] for channel in channels] == list(
        range(16)
    )
    assert (sender.packed_publishes, sender.packed_sends) == (0, 0)


async def test_a_packed_message_stored_twice_is_delivered_once_and_other_processes_frames_dropped(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # A publish retried after its PubAck was lost, or a delivery whose ack was lost,
    # comes again with the same message id: every frame of the pack is delivered once.
    receiver, other = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    mine, theirs = await receiver.new_channel(), await other.new_channel()
    encode = receiver.serializer.dumps
    packed = packed_inbox_message(
        0x5EED,
        [(mine, encode({"i": 0})), (theirs, encode({"i": 1})), (mine, encode({"i": 2}))],
    )
    await store_raw_in_inbox(nats_node, namespace, receiver.client_token, packed, packed)
    assert [(await receiver.receive(mine, timeout=PATIENCE))["i"] for _ in range(2)] == [0, 2]
    with pytest.raises(TimeoutError):
        await receiver.receive(mine, timeout=0.5)
    assert receiver.stats.dropped_undecodable == 0


async def test_a_malformed_packed_message_is_dropped_whole_counted_and_the_inbox_goes_on(
    nats_node: NatsNode, namespace: str, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    channel = await receiver.new_channel()
    whole = pack([(channel, receiver.serializer.dumps({"i": 0}))])
    truncated = packed_inbox_message(1, whole + pack([(channel, b"12345")])[1:-1])
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets"):
        await store_raw_in_inbox(nats_node, namespace, receiver.client_token, truncated)
        await sender.send(channel, {"i": 1})
        # Nothing of the malformed pack, its whole first frame included, was delivered.
        assert (await receiver.receive(channel, timeout=PATIENCE))["i"] == 1
    assert receiver.stats.dropped_undecodable == 1
    assert "dropped a packed inbox message" in caplog.text


async def test_sends_that_fit_the_server_alone_are_not_packed_past_its_max_payload(
    nats_node: NatsNode, make: Make
) -> None:
    # The fixture's server takes 2 MB payloads, the sender's max_message_size is 8 MiB: two
    # concurrent 1.2 MB sends, each within both, go as two stored messages, not one too large.
    receiver = make(servers=[nats_node.url])
    sender = make(servers=[nats_node.url], max_message_size=8 * 1024 * 1024)
    channels = [await receiver.new_channel() for _ in range(2)]
    await sender.send(channels[0], {"type": "warm"})
    await receiver.receive(channels[0], timeout=PATIENCE)
    body = b"\xab" * 1_200_000
    await asyncio.gather(*(sender.send(ch, {"i": i, "body": body}) for i, ch in enumerate(channels)))
    for i, channel in enumerate(channels):
        message = await receiver.receive(channel, timeout=PATIENCE)
        assert (message["i"], message["body"]) == (i, body)
    assert sender.packed_publishes == 0


@pytest.fixture
def large_and_small(tmp_path: Path) -> Iterator[tuple[NatsNode, NatsNode]]:
    """Two servers of one deployment, taking 2 MB and 256 KB payloads; only the first started.

    Requested before ``make``: layers are closed while the servers still run.
    """
    large, small = NatsNode(tmp_path / "large"), NatsNode(tmp_path / "small", max_payload="256KB")
    large.first_start()
    try:
        yield large, small
    finally:
        small.stop()
        large.stop()


async def test_packs_follow_the_max_payload_of_the_server_reconnected_to(
    large_and_small: tuple[NatsNode, NatsNode], make: Make
) -> None:
    # The layers start on the server taking 2 MB and move to the one taking 256 KB when
    # it stops. Eight concurrent 100 KB sends each fit the second alone; packed as for
    # the first they would not.
    large, small = large_and_small
    urls = [large.url, small.url]
    receiver, sender = make(servers=urls, capacity=1000), make(servers=urls)
    channels = [await receiver.new_channel() for _ in range(8)]
    await sender.send(channels[0], {"type": "warm"})
    await receiver.receive(channels[0], timeout=PATIENCE)
    assert sender.nc.max_payload == 2 * 1024 * 1024
    small.first_start()
    large.stop()
    await wait_connected(receiver, sender)
    assert sender.nc.max_payload == 256 * 1024
    packed = sender.packed_publishes
    body = b"\xab" * 100_000
    results = await asyncio.gather(
        *(sender.send(channel, {"i": i, "body": body}) for i, channel in enumerate(channels)),
        return_exceptions=True,
    )
    assert results == [None] * 8
    for i, channel in enumerate(channels):
        message = await receiver.receive(channel, timeout=PATIENCE)
        assert (message["i"], message["body"]) == (i, body)
    assert sender.packed_publishes > packed  # still packed, in packs the server takes


async def test_sends_made_while_reconnecting_to_a_server_taking_less_fail_alone(
    large_and_small: tuple[NatsNode, NatsNode], make: Make
) -> None:
    # Sends made while no server runs, sized for the first (2 MB), wait for the connection;
    # the next server takes 256 KB. Handed to nats-py meanwhile, it would buffer them and write
    # them once connected: the server ends that connection and nats-py closes its client for
    # good (every later call of the layer failing). Those over the limit fail alone, as
    # MessageTooLarge; the others arrive, and the layer goes on.
    large, small = large_and_small
    urls = [large.url, small.url]
    receiver = make(servers=urls, capacity=1000)
    sender = make(servers=urls, timeout=PATIENCE)
    channels = [await receiver.new_channel() for _ in range(8)]
    await receiver.group_add("room", channels[0])
    await sender.group_send("room", {"type": "warm"})  # the sender knows the receiver's process now
    assert (await receiver.receive(channels[0], timeout=PATIENCE))["type"] == "warm"
    large.stop()
    deadline = time.monotonic() + PATIENCE
    while sender.nc.is_connected:
        assert time.monotonic() < deadline, "the sender did not notice the server stopping"
        await asyncio.sleep(0.05)
    big, body = b"\xab" * 300_000, b"\xcd" * 100_000
    sends = [
        asyncio.ensure_future(sender.send(channels[1], {"body": big})),
        asyncio.ensure_future(sender.group_send("room", {"body": big})),
        *(asyncio.ensure_future(sender.send(c, {"i": i, "body": body})) for i, c in enumerate(channels[2:])),
    ]
    await asyncio.sleep(1)  # issued while no server runs
    small.first_start()
    results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 2 * PATIENCE)
    for too_large in results[:2]:
        assert isinstance(too_large, MessageTooLarge), results
        assert too_large.limit == 256 * 1024
    assert results[2:] == [None] * 6
    for i, channel in enumerate(channels[2:]):
        message = await receiver.receive(channel, timeout=PATIENCE)
        assert (message["i"], message["body"]) == (i, body)
    assert not sender.nc.is_closed
    # The layer goes on, on the new server: sends, receives and group sends.
    await sender.send(channels[1], {"after": 1})
    assert (await receiver.receive(channels[1], timeout=PATIENCE))["after"] == 1
    await receiver.group_add("hall", channels[0])
    await sender.group_send("hall", {"after": 2})
    assert (await receiver.receive(channels[0], timeout=PATIENCE))["after"] == 2
    with pytest.raises(TimeoutError):
        await receiver.receive(channels[1], timeout=0.5)  # nothing oversized arrived


@pytest.fixture
def few_subs(tmp_path: Path) -> Iterator[NatsNode]:
    """A server taking at most 4 subscriptions per connection (a layer holds 3, plus one per named
    channel it reads); the test may raise the limit (with a restart: nats-server does not reload
    it). Requested before ``make``: layers are closed while it still runs."""
    node = NatsNode(tmp_path / "few-subs", max_subscriptions=4)
    node.first_start()
    try:
        yield node
    finally:
        node.stop()


async def test_a_client_nats_py_closes_for_good_is_replaced_and_the_layer_works_again(
    few_subs: NatsNode, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # nats-py closes its client for good on an error the server reports on a live
    # connection (here: more subscriptions than the server allows, a named channel's
    # reader holding one) and never reconnects it. The layer connects a new client
    # (each one closed again while the cause stays, ever more slowly) and, once the
    # server takes it, restores what the old one carried: receivers that waited
    # meanwhile get their messages, calls made meanwhile wait for the new client (as
    # through a reconnect), and sends, group sends and receives work again.
    history = {"hist:*": {"size": 10, "ttl": 600}}
    layer = make(servers=[few_subs.url], timeout=PATIENCE, history=history)
    peer = make(servers=[few_subs.url])
    mine, theirs = await layer.new_channel(), await peer.new_channel()
    await layer.group_add("room", mine)
    await peer.group_add("hall", theirs)
    await layer.presence_join("lobby", mine, {"who": "layer"}, notify=False)
    before = await layer.group_send("hist:1", {"h": 0})
    assert before is not None
    first = layer.nc
    with caplog.at_level(logging.INFO, logger="fastapi_websockets"):
        readers = {name: asyncio.ensure_future(layer.receive(name)) for name in ("a", "b", "c")}
        deadline = time.monotonic() + PATIENCE
        while not first.is_closed:
            assert time.monotonic() < deadline, "nats-py kept its client"
            await asyncio.sleep(0.05)
        during = [layer.send(theirs, {"during": 1}), layer.group_send("hall", {"during": 2})]
        made_during = asyncio.ensure_future(asyncio.gather(*during))
        await asyncio.sleep(0.5)  # made while the cause stays
        few_subs.stop()
        few_subs.max_subscriptions = 1000
        few_subs.start()
        for i, name in enumerate(readers):
            await peer.send(name, {"i": i})
        received = await asyncio.wait_for(asyncio.gather(*readers.values()), PATIENCE)
        assert await made_during == [None, None]
    assert [message["i"] for message in received] == [0, 1, 2]
    # A send and a group_send to one channel travel different paths: either may come first.
    during_received = [await peer.receive(theirs, timeout=PATIENCE) for _ in range(2)]
    assert sorted(message["during"] for message in during_received) == [1, 2]
    assert "the NATS client closed for good" in caplog.text
    assert "maximum subscriptions exceeded" in caplog.text
    assert "connected a new NATS client" in caplog.text
    assert layer.nc is not first
    assert layer.connection.up is True
    assert layer.connection.reconnections >= 1
    await layer.send(theirs, {"to": "peer"})
    assert (await peer.receive(theirs, timeout=PATIENCE))["to"] == "peer"
    await peer.send(mine, {"to": "layer"})
    assert (await layer.receive(mine, timeout=PATIENCE))["to"] == "layer"
    await peer.group_send("room", {"group": "room"})
    assert (await layer.receive(mine, timeout=PATIENCE))["group"] == "room"
    await layer.group_send("hall", {"group": "hall"})
    assert (await peer.receive(theirs, timeout=PATIENCE))["group"] == "hall"
    await layer.send("d", {"named": 1})
    assert (await layer.receive("d", timeout=PATIENCE))["named"] == 1
    await layer.group_send("hist:1", {"h": 1})
    page = await layer.group_history("hist:1", since=before)
    assert [message["h"] for message in page.messages] == [1]
    assert page.recovered
    assert await layer.presence("lobby") == {mine: {"who": "layer"}}
    await layer.presence_leave("lobby", mine)
    assert await layer.presence("lobby") == {}
    # The closed clients left no connection behind on the server.
    assert connection_of(few_subs, layer)["name"] == f"fastapi-websockets {layer.client_token}"


async def test_a_rebuild_whose_attempts_fail_reads_as_one_story_in_the_log(
    few_subs: NatsNode, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # Each failed attempt of a rebuild logged a warning of its own and, through nats-py's
    # disconnected callback of the client that failed to connect, "disconnected from NATS;
    # reconnecting" as well: an outage of a minute read as dozens of disconnects.
    caplog.set_level(logging.DEBUG, logger="fastapi_websockets")
    async with TcpProxy(few_subs.port) as proxy:
        layer = make(servers=[f"nats://127.0.0.1:{proxy.port}"], timeout=2)
        await layer.send("a", {"i": 0})
        first = layer.nc
        proxy.refuse_new()  # the new clients' connections fail; the old client's stays
        start = len(caplog.records)
        # More subscriptions than the server allows: it closes the client for good.
        readers = [asyncio.ensure_future(layer.receive(name)) for name in ("a", "b", "c")]

        def story() -> list[logging.LogRecord]:
            return [r for r in caplog.records[start:] if r.name.startswith("fastapi_websockets")]

        def attempts() -> int:
            return sum("connecting a new NATS client failed" in r.getMessage() for r in story())

        await eventually(lambda: first.is_closed, "nats-py closes its client", PATIENCE)
        await eventually(lambda: attempts() >= 3, "three failed attempts", PATIENCE)
        few_subs.stop()
        few_subs.max_subscriptions = 1000
        few_subs.start()
        await proxy.reopen()
        assert (await asyncio.wait_for(readers[0], PATIENCE))["i"] == 0
        await eventually(lambda: layer.connection.up, "a new client", PATIENCE)
        told = [(r.levelname, r.getMessage()) for r in story() if r.levelno >= logging.INFO]
        for reader in readers[1:]:
            reader.cancel()
    assert not [text for _, text in told if "disconnected from NATS" in text], told
    assert [level for level, text in told if "closed for good" in text] == ["WARNING"], told
    assert [level for level, text in told if "connecting a new NATS client failed" in text] == ["WARNING"], (
        told
    )
    assert [level for level, text in told if "connected a new NATS client" in text] == ["INFO"], told
    assert attempts() >= 3  # the others, at debug


async def test_close_with_packed_sends_pending_ends_each_of_them(nats_node: NatsNode, make: Make) -> None:
    receiver, sender = make(servers=[nats_node.url], capacity=1000), make(servers=[nats_node.url])
    channels = [await receiver.new_channel() for _ in range(16)]
    await sender.send(channels[0], {"type": "warm", "i": -1})
    assert (await receiver.receive(channels[0], timeout=PATIENCE))["i"] == -1
    sends = [asyncio.ensure_future(sender.send(channel, {"i": i})) for i, channel in enumerate(channels)]
    await asyncio.sleep(0)  # queued: the first holds the turn, the others wait with it
    await sender.close()
    results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), PATIENCE)
    assert all(result is None or isinstance(result, ChannelLayerClosed) for result in results), results
    # What returned was stored: it arrives.
    for i, result in enumerate(results):
        if result is None:
            assert (await receiver.receive(channels[i], timeout=PATIENCE))["i"] == i


async def test_a_failed_packed_publish_reaches_each_of_its_senders(
    private_node: NatsNode, make: Make
) -> None:
    receiver = make(servers=[private_node.url], capacity=1000)
    sender = make(servers=[private_node.url], timeout=1)
    channels = [await receiver.new_channel() for _ in range(16)]
    await sender.send(channels[0], {"type": "warm"})
    private_node.stop()
    results = await asyncio.gather(
        *(sender.send(channel, {"type": "n"}) for channel in channels), return_exceptions=True
    )
    assert all(isinstance(result, BackendUnavailable) for result in results), results
    # Some went packed: the one failure of their publish reached each of them, each
    # naming the send it made.
    assert all(repr(channel) in str(result) for channel, result in zip(channels, results, strict=True)), (
        results
    )
    assert sum("others) failed" in str(result) for result in results) >= 2, results
    private_node.start()


async def test_group_send_costs_the_same_messages_for_any_group_size(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    sender = make(servers=[nats_node.url])
    members = make(servers=[nats_node.url])
    for size, group in ((3, "small"), (300, "large")):
        for _ in range(size):
            await members.group_add(group, await members.new_channel())
    await sender.group_send("warm-up", {"type": "x"})

    async def settled_in_msgs() -> int:
        # Messages the server has received from the sender's connection, once the
        # layer's background delivery to named members has gone quiet.
        last = -1
        while True:
            await sender.nc.flush()
            now = int(connection_of(nats_node, sender)["in_msgs"])
            if now == last:
                return now
            last = now
            await asyncio.sleep(0.3)

    rounds = 5
    cost = {}
    for group in ("small", "large"):
        before = await settled_in_msgs()
        for _ in range(rounds):
            await sender.group_send(group, {"type": "x"})
        cost[group] = await settled_in_msgs() - before
    # Per group_send: one request listing the processes with members, one stored
    # copy for the one such process, plus at most one request listing the group's
    # named members (batched across queued group_sends). Nothing per member.
    assert 2 * rounds <= cost["small"] <= 3 * rounds
    assert 2 * rounds <= cost["large"] <= 3 * rounds


async def test_group_send_follows_owners_that_join_and_leave_between_sends(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # A group_send stores copies for the owners the previous one found before it
    # lists them again: one that joined since must still be reached, and one that
    # left (or closed) must neither get the message later nor fail the send.
    sender, first, second = (make(servers=[nats_node.url]) for _ in range(3))
    one = await first.new_channel()
    await first.group_add("room", one)
    await sender.group_send("room", {"type": "m", "n": 1})
    assert await first.receive(one, timeout=10) == {"type": "m", "n": 1}

    two = await second.new_channel()
    await second.group_add("room", two)
    await sender.group_send("room", {"type": "m", "n": 2})
    assert await second.receive(two, timeout=10) == {"type": "m", "n": 2}
    assert await first.receive(one, timeout=10) == {"type": "m", "n": 2}

    await first.group_discard("room", one)
    await sender.group_send("room", {"type": "m", "n": 3})
    # The inbox delivers in order: once this arrives, so did any copy of m3.
    await sender.send(one, {"type": "after", "n": 3})
    assert await first.receive(one, timeout=10) == {"type": "after", "n": 3}
    await first.group_add("room", one)
    await sender.group_send("room", {"type": "m", "n": 4})
    assert await first.receive(one, timeout=10) == {"type": "m", "n": 4}
    assert [await second.receive(two, timeout=10) for _ in range(2)] == [
        {"type": "m", "n": 3},
        {"type": "m", "n": 4},
    ]

    await first.close()
    await sender.group_send("room", {"type": "m", "n": 5})
    assert await second.receive(two, timeout=10) == {"type": "m", "n": 5}


# ------------------------------------------------------------------ KV layout


async def test_kv_holds_one_key_per_member(nats_node: NatsNode, namespace: str, make: Make) -> None:
    layer = make(servers=[nats_node.url])
    a, b = await layer.new_channel(), await layer.new_channel()
    for channel in (a, b, "chat.room"):
        await layer.group_add("room:demo", channel)
    await layer.group_add("room:demo", a)  # a refresh, still one key
    await layer.group_add("other", a)
    client = await raw_client([nats_node.url])
    try:
        kv = await client.jetstream().key_value(namespace)
        keys = sorted(await kv.keys())
        expected = sorted(
            [
                NATSChannelLayer.member_key(group, channel)
                for group, channel in (
                    ("room:demo", a),
                    ("room:demo", b),
                    ("room:demo", "chat.room"),
                    ("other", a),
                )
            ]
            # One owner key per group with members in this process.
            + [layer.owner_key(group, layer.client_token) for group in ("room:demo", "other")]
            # The mark telling group_send that "room:demo" has named members.
            + [layer.owner_key("room:demo", "-named")]
        )
        assert keys == expected
        assert all(":" not in key for key in keys)
        entry = await kv.get(NATSChannelLayer.member_key("room:demo", a))
        assert entry.value is not None
        assert abs(float(entry.value) - time.time()) < 60
        await layer.group_discard("room:demo", b)
        assert sorted(await kv.keys()) == sorted(
            set(expected) - {NATSChannelLayer.member_key("room:demo", b)}
        )
    finally:
        await client.close()


async def test_close_removes_the_layers_members_from_the_bucket(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    leaving, staying = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    gone = [await leaving.new_channel() for _ in range(3)]
    kept = await staying.new_channel()
    for channel in gone:
        await leaving.group_add("room", channel)
    await staying.group_add("room", kept)
    await staying.group_add("room", "named.kept")
    await leaving.close()
    client = await raw_client([nats_node.url])
    try:
        kv = await client.jetstream().key_value(namespace)
        assert sorted(await kv.keys()) == sorted(
            [
                NATSChannelLayer.member_key("room", kept),
                NATSChannelLayer.member_key("room", "named.kept"),
                staying.owner_key("room", staying.client_token),
                staying.owner_key("room", "-named"),
            ]
        )
    finally:
        await client.close()


async def test_group_add_of_another_instances_channel(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    a, b = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    channel = await b.new_channel()
    await a.group_add("remote", channel)
    await a.group_send("remote", {"type": "hi"})
    assert await b.receive(channel, timeout=10) == {"type": "hi"}


async def stored_in(nats_node: NatsNode, namespace: str, channel: str) -> int:
    """How many messages the stream holds for named channel ``channel``, asked of the server."""
    client = await raw_client([nats_node.url])
    try:
        subject = f"{namespace}.n.{subject_token(channel)}"
        info = await client.jetstream().stream_info(namespace, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)
    finally:
        await client.close()


async def test_group_send_stores_named_copies_before_returning_and_skips_full_ones(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    a, b = make(servers=[nats_node.url], capacity=1), make(servers=[nats_node.url], capacity=1)
    channel = await a.new_channel()
    for member in (channel, "named.full", "named.free"):
        await a.group_add("mixed", member)
    await b.send("named.full", {"type": "pre"})
    await b.group_send("mixed", {"type": "g"})
    assert b.stats.dropped_full == 1
    # Stored by the time group_send returned, not later by some background task.
    assert await stored_in(nats_node, namespace, "named.free") == 1
    c = make(servers=[nats_node.url])
    assert (await c.receive("named.free", timeout=10))["type"] == "g"
    assert (await c.receive("named.full", timeout=10))["type"] == "pre"
    assert (await a.receive(channel, timeout=10))["type"] == "g"
    with pytest.raises(TimeoutError):
        await c.receive("named.full", timeout=0.3)


async def test_named_capacity_holds_for_concurrent_sends_and_group_sends_of_one_layer(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # The capacity check (a stream info request) and the publish are two requests:
    # checks in flight together all passed, and 9 of 9 concurrent group_sends were
    # stored at capacity 5. One process's checks now take turns per channel.
    layer = make(servers=[nats_node.url], capacity=5)
    await layer.group_add("room", "named.edge")
    results = await asyncio.gather(
        *(layer.group_send("room", {"type": "g"}) for _ in range(6)),
        *(layer.send("named.edge", {"type": "x"}) for _ in range(6)),
        return_exceptions=True,
    )
    assert [r for r in results if r is not None and not isinstance(r, ChannelFull)] == []
    assert await stored_in(nats_node, namespace, "named.edge") == 5


async def test_named_sends_made_while_the_stream_is_set_up_keep_call_order(
    nats_node: NatsNode, make: Make
) -> None:
    # The first named send makes the stream while the other early ones queue on the
    # setup lock; sends made once it was ready skipped that lock and took their
    # channel's turn ahead of the early ones still leaving it ([0, 14, 1, 15, ...]).
    layer = make(servers=[nats_node.url])
    await layer.new_channel()  # started, the stream not made yet
    await send_in_two_waves(layer, "ordered", lambda: layer._stream_ready, "the stream's setup")
    assert [(await layer.receive("ordered", timeout=10))["i"] for _ in range(30)] == list(range(30))


def count_named_requests(
    layer: NATSChannelLayer, after_count: Callable[[], Awaitable[None]] | None = None
) -> Counter[str]:
    """Counts the layer's requests by kind ("count", "read", "publish"), passing each to the client.

    Every JetStream call is a request on the connection, so its subject says what
    it is. ``after_count`` runs once, after the first count (stream info) has been
    answered and before the layer goes on: what another process does between a
    layer's count and its publish.
    """
    calls: Counter[str] = Counter()
    nc = layer.nc
    real = nc.request
    hooks = [after_count] if after_count is not None else []

    async def request(subject: str, *args: Any, **kwargs: Any) -> Msg:
        kind = (
            "count"
            if subject.startswith("$JS.API.STREAM.INFO.")
            else "read"
            if subject.startswith(("$JS.API.STREAM.MSG.GET.", "$JS.API.DIRECT.GET."))
            else "publish"
        )
        calls[kind] += 1
        reply = await real(subject, *args, **kwargs)
        if kind == "count" and hooks:
            await hooks.pop()()
        return reply

    nc.request = request  # type: ignore[method-assign]
    return calls


async def wait_stored(nats_node: NatsNode, namespace: str, channel: str, count: int) -> None:
    """Waits (up to 10 s) until the stream holds ``count`` messages of named channel ``channel``."""
    for _ in range(200):
        if await stored_in(nats_node, namespace, channel) == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{channel!r} never held {count}")


async def test_a_send_to_a_named_channel_a_reader_emptied_costs_a_count_and_a_publish(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # The layer's own last publish was consumed, so it no longer is the channel's
    # newest: a publish conditional on it would be refused every time a reader
    # keeps up. The count says the channel is empty, and "none stored" is checked.
    a, b = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    await a.send("named.kept-up", {"type": "first"})
    assert await b.receive("named.kept-up", timeout=10) == {"type": "first"}
    await wait_stored(nats_node, namespace, "named.kept-up", 0)
    calls = count_named_requests(a)
    await a.send("named.kept-up", {"type": "second"})
    assert calls == Counter({"count": 1, "publish": 1})
    assert await b.receive("named.kept-up", timeout=10) == {"type": "second"}


async def second_send_raced(
    nats_node: NatsNode,
    namespace: str,
    make: Make,
    race: Callable[[JetStreamContext, str], Awaitable[None]],
) -> tuple[BaseException | None, Counter[str]]:
    """A layer of capacity 2 sends twice to a named channel; ``race(js, subject)`` runs between
    the second send's count and its publish, on a client of its own (another process).

    Returns what the second send raised (None) and its requests by kind.
    """
    layer = make(servers=[nats_node.url], capacity=2)
    await layer.send("named.raced", {"type": "first"})
    client = await raw_client([nats_node.url])
    subject = f"{namespace}.n.{subject_token('named.raced')}"
    try:
        calls = count_named_requests(layer, lambda: race(client.jetstream(), subject))
        try:
            await layer.send("named.raced", {"type": "second"})
        except ChannelFull as exc:
            return exc, calls
        return None, calls
    finally:
        await client.close()


async def test_a_named_send_refused_because_another_process_stored_first_counts_again(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    async def other_process_stores(js: JetStreamContext, subject: str) -> None:
        await js.publish(subject, b"other", stream=namespace)

    raised, calls = await second_send_raced(nats_node, namespace, make, other_process_stores)
    # Counted 1 of 2, but the other process's message came before the publish.
    assert isinstance(raised, ChannelFull)
    assert await stored_in(nats_node, namespace, "named.raced") == 2
    # The refusal named the newest message: counted again without reading it.
    assert calls == Counter({"count": 2, "publish": 1})


async def test_a_named_send_refused_because_its_last_message_was_consumed_is_stored(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    async def reader_takes_it(js: JetStreamContext, subject: str) -> None:
        newest = await js.get_last_msg(namespace, subject)
        assert newest.seq is not None
        await js.delete_msg(namespace, newest.seq)

    raised, calls = await second_send_raced(nats_node, namespace, make, reader_takes_it)
    # Counted 1 (the layer's own), published on it, refused: it was gone and the
    # channel is empty, so "none stored" is named without counting again.
    assert raised is None
    assert await stored_in(nats_node, namespace, "named.raced") == 1
    assert calls == Counter({"count": 1, "publish": 2})


async def test_a_stream_of_the_same_name_for_other_subjects_is_refused(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    client = await raw_client([nats_node.url])
    js = client.jetstream()
    await js.add_stream(name=namespace, subjects=[f"elsewhere{namespace}.>"])
    try:
        layer = make(servers=[nats_node.url])
        message = (
            f"the stream {namespace!r} exists with subjects ['elsewhere{namespace}.>'], "
            f"not '{namespace}.n.>'; choose another stream_name or prefix"
        )
        with pytest.raises(InvalidChannelLayerConfig, match=re.escape(message)):
            await layer.send("named.x", {"type": "t"})
        # Nothing of ours was added to the other stream.
        info = await js.stream_info(namespace)
        assert info.config.subjects == [f"elsewhere{namespace}.>"]
        assert info.state.messages == 0
    finally:
        await js.delete_stream(namespace)
        await client.close()


async def test_a_stream_refused_as_existing_but_not_found_is_waited_for(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # The setup's create is refused and the stream is not found. On a fresh cluster that
    # is a stream another process has just created, whose group is still forming (a CI
    # failure): it is waited for within the timeout. Here another stream holds the
    # subjects, which is refused the same way.
    client = await raw_client([nats_node.url])
    js = client.jetstream()
    await js.add_stream(name=f"other{namespace}", subjects=[f"{namespace}.n.>"])
    try:
        with pytest.raises(ChannelLayerError, match=r"refused to create it .*still does not exist") as raised:
            await make(servers=[nats_node.url], timeout=1).send("named.x", {"type": "t"})
        assert "overlap" in str(raised.value)

        send = asyncio.ensure_future(make(servers=[nats_node.url], timeout=10).send("named.x", {"type": "t"}))
        await asyncio.sleep(0.5)
        assert not send.done()
        await js.delete_stream(f"other{namespace}")
        # Another layer makes the stream, as the other process did.
        await make(servers=[nats_node.url]).send("named.y", {"type": "t"})
        await asyncio.wait_for(send, 10)
        assert await stored_in(nats_node, namespace, "named.x") == 1
    finally:
        await client.close()


async def test_a_stream_refused_for_want_of_servers_is_created_once_they_are_there(
    nats_node: NatsNode, namespace: str, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cluster just started refuses a stream of 3 replicas until its meta leader has heard
    # from every server: "no suitable peers for placement, peer offline" (under load, at the
    # start of test_cluster_survives_losing_the_stream_and_bucket_leader). Not a stream made
    # elsewhere: it is created again within the timeout, and said as it is after that.
    # Here the driver gets that answer in place of the server's, as many times as `refusals`.
    from nats.js.api import StreamConfig, StreamInfo
    from nats.js.manager import JetStreamManager

    real = JetStreamManager.add_stream
    refusals: list[int | None] = [None]

    async def add_stream(
        self: JetStreamManager, config: StreamConfig | None = None, **params: Any
    ) -> StreamInfo:
        if refusals[0] is None or refusals[0] > 0:
            refusals[0] = None if refusals[0] is None else refusals[0] - 1
            raise nats.js.errors.BadRequestError(
                code=400, err_code=10005, description="no suitable peers for placement, peer offline"
            )
        return await real(self, config, **params)

    monkeypatch.setattr(JetStreamManager, "add_stream", add_stream)
    with pytest.raises(ChannelLayerError, match=r"could not place its 1 replicas .* peer offline\); start"):
        await make(servers=[nats_node.url], timeout=1).send("named.x", {"type": "t"})
    refusals[0] = 3
    layer = make(servers=[nats_node.url], timeout=10)
    await layer.send("named.x", {"type": "t"})
    assert refusals == [0]
    assert (await layer.receive("named.x", timeout=10))["type"] == "t"


async def test_group_send_sees_named_members_added_by_another_instance(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    a, b = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    await b.group_send("warm-up", {"type": "x"})
    for i in range(20):
        # No pause between the add and the group_send: membership is read from the
        # server after the group_send, never from a cache that may lag.
        await a.group_add(f"jobs-{i}", f"worker.{i}")
        await b.group_send(f"jobs-{i}", {"type": "job", "i": i})
        assert await a.receive(f"worker.{i}", timeout=10) == {"type": "job", "i": i}
        await a.group_discard(f"jobs-{i}", f"worker.{i}")
        await b.group_send(f"jobs-{i}", {"type": "job", "i": -1})
    await b.group_send("sync", {"type": "x"})
    for i in range(20):
        with pytest.raises(TimeoutError):
            await a.receive(f"worker.{i}", timeout=0.05)


# ------------------------------------------------------------ message_timeout


async def test_message_timeout_is_the_claim_time_of_a_dead_receiver(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    channel = "jobs.claimed"
    first = make(servers=[nats_node.url], message_timeout=2)
    with pytest.raises(TimeoutError):
        await first.receive(channel, timeout=0.2)  # creates the channel's consumer
    await first.close()
    sender = make(servers=[nats_node.url], message_timeout=2)
    await sender.send(channel, {"type": "job"})
    client = await raw_client([nats_node.url])
    try:
        js = client.jetstream()
        info = await js.consumer_info(namespace, consumer_name(channel))
        assert info.config.ack_wait == 2
        assert info.config.inactive_threshold == 600  # unread channels free their consumer
        # A receiver claims the message and dies without acknowledging it.
        pull = await js.pull_subscribe_bind(consumer_name(channel), stream=namespace)
        claimed = await pull.fetch(1, timeout=5)
        assert len(claimed) == 1
        with pytest.raises(TimeoutError):
            await sender.receive(channel, timeout=0.5)
        # After message_timeout the server hands it to the next receiver.
        assert await sender.receive(channel, timeout=30) == {"type": "job"}
    finally:
        await client.close()


# ------------------------------------------------------------- message sizes


async def test_messages_up_to_max_message_size_and_over_the_server_limit(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # The fixture's server takes 2 MB payloads: the default 1 MiB limit fits.
    a, b = make(servers=[nats_node.url]), make(servers=[nats_node.url])
    channel = await b.new_channel()
    body = b"\xab" * (1024 * 1024 - 64)
    await a.send(channel, {"type": "big", "body": body})
    assert (await b.receive(channel, timeout=10))["body"] == body
    await a.send("big.named", {"type": "big", "body": body})
    assert (await b.receive("big.named", timeout=10))["body"] == body
    # Over the server's max_payload: refused by the client, as MessageTooLarge naming
    # the server's limit (not the layer's max_message_size, which it is within) and
    # the message's own size.
    huge = make(servers=[nats_node.url], max_message_size=8 * 1024 * 1024)
    for target in (channel, "big.named"):
        with pytest.raises(MessageTooLarge) as info:
            await huge.send(target, {"type": "huge", "body": b"x" * (3 * 1024 * 1024)})
        assert info.value.limit == 2 * 1024 * 1024
        assert info.value.size > 3 * 1024 * 1024
        assert "max_message_size" not in str(info.value)
        assert f"the max_payload of the server at 127.0.0.1:{nats_node.port}" in str(info.value)
        assert "raise max_payload in its configuration" in str(info.value)


async def test_receive_outlives_its_consumer(nats_node: NatsNode, namespace: str, make: Make) -> None:
    # The server deletes consumers of channels nobody reads (inactive_threshold);
    # a receiver that comes back binds a new one and loses no stored message.
    layer = make(servers=[nats_node.url])
    await layer.send("jobs.x", {"type": "one"})
    assert (await layer.receive("jobs.x", timeout=10))["type"] == "one"
    client = await raw_client([nats_node.url])
    try:
        js = client.jetstream()
        assert await js.delete_consumer(namespace, consumer_name("jobs.x"))
        await layer.send("jobs.x", {"type": "two"})
        assert (await layer.receive("jobs.x", timeout=30))["type"] == "two"
        assert (await js.consumer_info(namespace, consumer_name("jobs.x"))).config.ack_wait == 60
    finally:
        await client.close()


# -------------------------------------------------------------- configuration


def test_options_from_the_environment() -> None:
    layer = get_channel_layer_from_env(
        {
            "FASTAPI_WEBSOCKETS_BACKEND": "nats",
            "FASTAPI_WEBSOCKETS_NATS_SERVERS": "nats://a:4222, nats://b:4223",
            "FASTAPI_WEBSOCKETS_NATS_PREFIX": "app.ws",
            "FASTAPI_WEBSOCKETS_NATS_GROUP_BUCKET": "groups",
            "FASTAPI_WEBSOCKETS_NATS_STREAM_NAME": "CHANNELS",
            "FASTAPI_WEBSOCKETS_NATS_MESSAGE_TIMEOUT": "30",
        }
    )
    assert isinstance(layer, NATSChannelLayer)
    assert layer.servers == ["nats://a:4222", "nats://b:4223"]
    assert (layer.prefix, layer.group_bucket, layer.stream_name) == ("app.ws", "groups", "CHANNELS")
    assert layer.message_timeout == 30.0


def test_defaults_match_the_spec() -> None:
    layer = NATSChannelLayer()
    assert layer.servers == ["nats://localhost:4222"]
    assert layer.prefix == "fastapi-websockets"
    assert layer.group_bucket == "fastapi_websockets_groups"
    assert layer.stream_name == "FASTAPI_WEBSOCKETS"
    assert layer.message_timeout == 60.0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("servers", []),
        ("servers", ["not a url"]),
        ("prefix", "a.*"),
        ("prefix", "a..b"),
        ("prefix", "a b"),
        ("group_bucket", "room:demo"),
        ("group_bucket", "a.b"),
        ("stream_name", "A.B"),
        ("stream_name", "A>"),
        ("message_timeout", 0),
        ("timeout", -1),
        ("replicas", 0),
    ],
)
def test_bad_options_name_the_option_and_value(option: str, value: Any) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=re.escape(option)) as info:
        NATSChannelLayer(**{option: value})
    assert repr(value) in str(info.value)


def test_importing_the_backend_does_not_import_nats() -> None:
    code = "import sys, fastapi_websockets.backends.nats; print('nats' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------- unreachable server


async def test_unreachable_server_fails_with_backend_unavailable(make: Make) -> None:
    port = free_port()
    layer = make(servers=[f"nats://127.0.0.1:{port}"], timeout=1)
    with pytest.raises(BackendUnavailable, match=f"NATS is unreachable at 127.0.0.1:{port}"):
        await layer.send("named", {"type": "x"})
    with pytest.raises(BackendUnavailable):
        await layer.new_channel()


async def test_jetstream_calls_fail_in_bounded_time_while_the_server_is_down(
    private_node: NatsNode, namespace: str, make: Make
) -> None:
    layer = make(servers=[private_node.url], timeout=1)
    await layer.send("named", {"type": "before"})
    private_node.stop()
    with pytest.raises(BackendUnavailable, match="send to 'named'"):
        await layer.send("named", {"type": "during"})
    with pytest.raises(BackendUnavailable):
        await layer.group_add("g", "named")
    private_node.start()
    await wait_connected(layer)
    assert (await layer.receive("named", timeout=30))["type"] == "before"


# ------------------------------------------------------------ server restart


async def test_restart_keeps_waiting_receivers_groups_and_stored_messages(
    private_node: NatsNode, namespace: str, make: Make
) -> None:
    urls = [private_node.url]
    receiver, sender = make(servers=urls), make(servers=urls)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room:demo", channel)
    for i in range(3):
        await sender.send("stored.q", {"type": "job", "i": i})
    waiting_specific = asyncio.create_task(receiver.receive(channel))
    waiting_named = asyncio.create_task(receiver.receive("live.q"))
    await asyncio.sleep(0.3)

    private_node.stop()
    await asyncio.sleep(0.5)
    private_node.start()
    await wait_connected(receiver, sender)

    assert not waiting_specific.done()
    assert not waiting_named.done()
    await sender.send(channel, {"type": "direct"})
    assert (await asyncio.wait_for(waiting_specific, 10))["type"] == "direct"
    await sender.group_send("room:demo", {"type": "group"})
    assert (await receiver.receive(channel, timeout=10))["type"] == "group"
    await sender.send("live.q", {"type": "named"})
    assert (await asyncio.wait_for(waiting_named, 30))["type"] == "named"
    # Named messages stored before the restart are all still there, in order.
    assert [(await receiver.receive("stored.q", timeout=30))["i"] for _ in range(3)] == [0, 1, 2]


async def test_a_server_that_lost_its_data_gets_stream_and_bucket_again(
    private_node: NatsNode, namespace: str, make: Make
) -> None:
    urls = [private_node.url]
    receiver, sender = make(servers=urls), make(servers=urls)
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await sender.send("q", {"type": "lost"})
    waiting = asyncio.create_task(receiver.receive("later.q"))
    await asyncio.sleep(0.3)

    private_node.stop()
    shutil.rmtree(private_node.workdir / "js")  # JetStream state gone: stream, bucket, consumers
    private_node.start()
    await wait_connected(receiver, sender)

    await sender.send("later.q", {"type": "new"})
    assert (await asyncio.wait_for(waiting, 30))["type"] == "new"
    await sender.group_add("room", "named.member")
    await sender.group_send("room", {"type": "group"})
    assert (await receiver.receive(channel, timeout=10))["type"] == "group"
    assert (await receiver.receive("named.member", timeout=30))["type"] == "group"


async def test_close_during_reconnect_wakes_receivers(
    private_node: NatsNode, namespace: str, make: Make
) -> None:
    layer = make(servers=[private_node.url])
    channel = await layer.new_channel()
    waiters = [asyncio.create_task(layer.receive(channel)), asyncio.create_task(layer.receive("q"))]
    await asyncio.sleep(0.3)
    private_node.stop()
    await layer.close()
    for waiter in waiters:
        with pytest.raises(ChannelLayerClosed):
            await waiter


# ------------------------------------------------------------------- cluster


async def test_cluster_survives_a_killed_node(
    private_cluster: NatsCluster, namespace: str, make: Make
) -> None:
    urls = private_cluster.urls
    a = make(servers=urls, replicas=3, timeout=30)
    b = make(servers=urls, replicas=3, timeout=30)
    channel = await b.new_channel()
    await b.group_add("room:demo", channel)
    await b.group_add("room:demo", "chat.room")
    await a.send("chat.room", {"type": "before"})
    assert (await b.receive("chat.room", timeout=30))["type"] == "before"
    await a.send("kept.q", {"type": "stored"})

    # Kill the node b is connected to: b must move to another node.
    port = b.nc.connected_url.port if b.nc.connected_url is not None else None
    victim = next(node for node in private_cluster.nodes if node.port == port)
    victim.kill()
    await wait_connected(a, b, timeout=60)

    await a.send(channel, {"type": "direct"})
    assert (await b.receive(channel, timeout=30))["type"] == "direct"
    await a.group_send("room:demo", {"type": "group"})
    assert (await b.receive(channel, timeout=30))["type"] == "group"
    assert (await b.receive("chat.room", timeout=30))["type"] == "group"
    await a.send("chat.room", {"type": "after"})
    assert (await b.receive("chat.room", timeout=30))["type"] == "after"
    assert (await b.receive("kept.q", timeout=30))["type"] == "stored"
    # The stream and bucket really are replicated on the survivors.
    client = await raw_client([node.url for node in private_cluster.nodes if node is not victim])
    try:
        js = client.jetstream()
        assert (await js.stream_info(namespace)).config.num_replicas == 3
        assert (await js.stream_info(f"KV_{namespace}")).config.num_replicas == 3
    finally:
        await client.close()


async def test_cluster_survives_losing_the_stream_and_bucket_leader(
    private_cluster: NatsCluster, namespace: str, make: Make
) -> None:
    # Default timeout: JetStream calls ride out the leader election.
    urls = private_cluster.urls
    a, b = make(servers=urls, replicas=3), make(servers=urls, replicas=3)
    channel = await b.new_channel()
    await b.group_add("room", channel)
    await a.send("jobs", {"type": "before"})
    assert (await b.receive("jobs", timeout=30))["type"] == "before"
    client = await raw_client(urls)
    try:
        js = client.jetstream()
        leaders = {
            (await js.stream_info(namespace)).cluster.leader,  # type: ignore[union-attr]
            (await js.stream_info(f"KV_{namespace}")).cluster.leader,  # type: ignore[union-attr]
        }
    finally:
        await client.close()
    victim = next(node for node in private_cluster.nodes if node.name in leaders)
    victim.kill()
    await wait_connected(a, b)

    await a.group_add("room", "jobs")
    await a.group_send("room", {"type": "group"})
    assert (await b.receive(channel, timeout=30))["type"] == "group"
    assert (await b.receive("jobs", timeout=30))["type"] == "group"
    await a.send("jobs", {"type": "after"})
    assert (await b.receive("jobs", timeout=30))["type"] == "after"


# ------------------------------------------------------------------- secrets


USER = "fw-user"


def secret_url(port: int, password: str = SECRET) -> str:
    return f"nats://{USER}:{password}@127.0.0.1:{port}"


def assert_layer_keeps_secret(
    layer: NATSChannelLayer, caplog: pytest.LogCaptureFixture, errors: list[BaseException]
) -> None:
    assert errors, "the test expected errors to check"
    assert_no_secret(errors=errors, records=caplog.records, objects=[layer, layer.stats])


@pytest.fixture
def auth_node(tmp_path: Path) -> Iterator[NatsNode]:
    """A node of our own whose clients must log in as USER with the password SECRET."""
    node = NatsNode(tmp_path / "auth", user=USER, password=SECRET)
    node.first_start()
    try:
        yield node
    finally:
        node.stop()


async def test_no_secret_when_the_connection_is_refused(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    layer = make(servers=[secret_url(port)], timeout=1)
    errors: list[BaseException] = []
    with pytest.raises(BackendUnavailable, match=re.escape(f"unreachable at 127.0.0.1:{port}")) as info:
        await layer.send("named", {"type": "x"})
    errors.append(info.value)
    with pytest.raises(BackendUnavailable) as info:
        await layer.new_channel()
    errors.append(info.value)
    assert_layer_keeps_secret(layer, caplog, errors)


async def test_no_secret_when_authentication_fails(
    tmp_path: Path, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # The layer's URL holds the secret; the server expects another password.
    wrong = NatsNode(tmp_path / "auth", user=USER, password="another-password")
    wrong.first_start()
    try:
        # A refused login is the URL's fault (InvalidChannelLayerConfig), and fails at once:
        # nats-py alone would retry it until the timeout, then BackendUnavailable.
        layer = make(servers=[secret_url(wrong.port)], timeout=PATIENCE * 10)
        with pytest.raises(InvalidChannelLayerConfig) as info:
            await layer.send("named", {"type": "x"})
        text = str(info.value)
        assert f"NATS at nats://{USER}:***@127.0.0.1:{wrong.port} refused the login" in text, text
        assert "Authorization Violation" in text  # the server's words
        assert "check the user and password" in text  # what to fix
        assert_layer_keeps_secret(layer, caplog, [info.value])
    finally:
        wrong.stop()


async def test_a_login_refused_on_reconnect_is_retried_until_the_server_takes_it_again(
    auth_node: NatsNode, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # nats-py retries a reconnect the server refuses to log in (it would close its client
    # for good only for an error on a live connection): once the password is back, the
    # layer goes on, and a send made meanwhile is stored.
    layer = make(servers=[secret_url(auth_node.port)], timeout=PATIENCE)
    await layer.send("named", {"i": 0})
    assert (await layer.receive("named", timeout=PATIENCE))["i"] == 0
    password = auth_node.password
    auth_node.password = "changed-password"
    auth_node.reload()
    deadline = time.monotonic() + PATIENCE
    while "Authorization Violation" not in caplog.text:
        assert time.monotonic() < deadline, "the server kept the layer's connection"
        await asyncio.sleep(0.05)
    send = asyncio.ensure_future(layer.send("named", {"i": 1}))
    await asyncio.sleep(1)  # nats-py retries every 0.5 s meanwhile
    assert not layer.nc.is_closed
    assert not send.done()
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "Authorization" in r.getMessage()
    ]
    # Once per outage, at ERROR, with what to fix; not a warning per attempt.
    assert len(refusals) == 1, refusals
    assert "refused the login" in refusals[0]
    assert any(r.levelno == logging.ERROR and "refused the login" in r.getMessage() for r in caplog.records)
    auth_node.password = password
    auth_node.reload()
    await asyncio.wait_for(send, PATIENCE)
    assert (await layer.receive("named", timeout=PATIENCE))["i"] == 1
    assert_no_secret(records=caplog.records, objects=[layer])


async def test_no_secret_when_connecting_times_out(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, and no INFO line ever comes

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        layer = make(servers=[secret_url(port)], timeout=1)
        with pytest.raises(BackendUnavailable, match=re.escape("no connection within 1.0 s")) as info:
            await layer.send("named", {"type": "x"})
        assert held, "the layer never reached the silent server"
        assert_layer_keeps_secret(layer, caplog, [info.value])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_no_secret_when_the_server_goes_away_and_comes_back(
    auth_node: NatsNode, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    layer = make(servers=[secret_url(auth_node.port)], timeout=1)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await layer.send("named", {"type": "before"})
    waiting = asyncio.create_task(layer.receive("later"))
    auth_node.stop()
    errors: list[BaseException] = []
    with pytest.raises(BackendUnavailable, match="send to 'named'") as info:
        await layer.send("named", {"type": "during"})
    errors.append(info.value)
    with pytest.raises(BackendUnavailable) as info:
        await layer.group_add("room", "named")
    errors.append(info.value)
    auth_node.start()
    await wait_connected(layer)
    assert any(
        record.getMessage() == f"reconnected to NATS at 127.0.0.1:{auth_node.port}"
        for record in caplog.records
    )
    await layer.send("later", {"type": "after"})
    assert (await asyncio.wait_for(waiting, 30))["type"] == "after"
    assert (await layer.receive("named", timeout=30))["type"] == "before"
    assert_layer_keeps_secret(layer, caplog, errors)


@pytest.mark.parametrize(
    "server",
    [
        f"nats://{USER}:{SECRET}@127.0.0.1:not-a-port",
        f"http://{USER}:{SECRET}@127.0.0.1:4222",
        f"nats://{USER}:{SECRET}@127.0.0.1:4222/a/path",
    ],
)
def test_a_malformed_server_url_is_refused_without_its_password(server: str) -> None:
    for servers in ([server], f"nats://127.0.0.1:4222,{server}"):
        with pytest.raises(InvalidChannelLayerConfig, match="servers must be") as info:
            NATSChannelLayer(servers=servers)  # type: ignore[arg-type]
        assert f"{USER}:***@" in str(info.value)
        assert_no_secret(errors=[info.value])


def test_repr_names_the_servers_without_the_password() -> None:
    layer = NATSChannelLayer(servers=[secret_url(4222), f"nats://{USER}:{SECRET}@other:4223"])
    assert repr(layer) == "<NATSChannelLayer 127.0.0.1:4222, other:4223 open>"


# ------------------------------------------------------------------- history


HISTORY = {"room:*": {"size": 5, "ttl": 600}, "big:*": 100, "short:*": {"size": 10, "ttl": 1}}


async def stored_per_group(urls: list[str], stream: str) -> dict[str, int]:
    """How many entries the server holds per history subject of ``stream``."""
    client = await raw_client(urls)
    try:
        info = await client.jetstream().stream_info(stream, subjects_filter=">")
        return dict(info.state.subjects or {})
    finally:
        await client.close()


async def test_history_is_one_stream_per_policy_trimmed_by_size_on_the_server(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    urls = [nats_node.url]
    layer = make(servers=urls, history=HISTORY)
    assert await layer.group_send("lobby", {"type": "m"}) is None
    client = await raw_client(urls)
    try:
        names = {info.config.name for info in await client.jetstream().streams_info()}
        assert not any(name and name.startswith(f"{namespace}_H") for name in names)  # no history, no stream
    finally:
        await client.close()

    positions = [await layer.group_send("room:1", {"type": "m", "i": i}) for i in range(8)]
    assert [p.offset for p in positions if p is not None] == list(range(1, 9))
    assert len({p.epoch for p in positions if p is not None}) == 1
    stream = f"{namespace}_H5-600000"
    assert await stored_per_group(urls, stream) == {f"{namespace}.h.5-600000.{subject_token('room:1')}": 5}
    client = await raw_client(urls)
    try:
        config = (await client.jetstream().stream_info(stream)).config
    finally:
        await client.close()
    assert (config.max_msgs_per_subject, config.max_age, config.deny_delete) == (5, 600, True)
    page = await layer.group_history("room:1")
    assert [m["i"] for m in page.messages] == [3, 4, 5, 6, 7]
    assert not page.recovered  # offsets 1-3 were trimmed


async def test_history_expires_with_its_ttl_on_the_server_and_starts_a_new_epoch(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    urls = [nats_node.url]
    layer = make(servers=urls, history=HISTORY)
    first = await layer.group_send("short:1", {"type": "m", "i": 0})
    await layer.group_send("short:1", {"type": "m", "i": 1})
    assert first is not None
    stream = f"{namespace}_H10-1000"
    assert sum((await stored_per_group(urls, stream)).values()) == 2
    deadline = time.monotonic() + 30
    while sum((await stored_per_group(urls, stream)).values()):
        assert time.monotonic() < deadline, "the server did not expire the entries"
        await asyncio.sleep(0.2)
    page = await layer.group_history("short:1", since=first)
    assert page.messages == []
    assert not page.recovered
    after = await layer.group_send("short:1", {"type": "m", "i": 2})
    assert after is not None
    assert after.epoch != first.epoch  # the whole history expired: a new life
    assert after.epoch == page.position.epoch  # the one the read started
    assert after.offset == 1


async def test_history_survives_a_server_restart(private_node: NatsNode, namespace: str, make: Make) -> None:
    urls = [private_node.url]
    sender, reader = make(servers=urls, history=HISTORY), make(servers=urls, history=HISTORY)
    positions = [await sender.group_send("room:r", {"type": "m", "i": i}) for i in range(3)]
    first, last = positions[0], positions[-1]
    assert first is not None
    assert last is not None
    assert (await reader.group_history("room:r")).position == last

    private_node.stop()
    await asyncio.sleep(0.3)
    private_node.start()
    await wait_connected(sender, reader)

    page = await reader.group_history("room:r", since=first)
    assert [m["i"] for m in page.messages] == [1, 2]
    assert page.recovered
    assert page.position == last
    following = await sender.group_send("room:r", {"type": "m", "i": 3})
    assert following == (last.offset + 1, last.epoch)


@pytest.mark.parametrize("wipe", ["delete the stream", "purge the group"])
async def test_history_wiped_out_of_band_gets_a_new_epoch(
    nats_node: NatsNode, namespace: str, make: Make, wipe: str
) -> None:
    urls = [nats_node.url]
    sender, reader = make(servers=urls, history=HISTORY), make(servers=urls, history=HISTORY)
    channel = await reader.new_channel("ws")
    await reader.group_add("room:w", channel)
    before = [await sender.group_send("room:w", {"type": "m", "i": i}) for i in range(3)]
    assert before[-1] is not None
    stream = f"{namespace}_H5-600000"
    client = await raw_client(urls)
    try:
        js = client.jetstream()
        if wipe == "delete the stream":
            await js.delete_stream(stream)
        else:
            await js.purge_stream(stream, subject=f"{namespace}.h.5-600000.{subject_token('room:w')}")
    finally:
        await client.close()

    after = await sender.group_send("room:w", {"type": "m", "i": 3})
    assert after is not None
    assert after.epoch != before[-1].epoch
    assert after.offset == 1  # a new life starts over
    page = await reader.group_history("room:w", since=before[-1])
    assert not page.recovered
    assert [m["i"] for m in page.messages] == [3]
    live = [await reader.receive(channel, timeout=10) for _ in range(4)]
    assert [m["_position"]["offset"] for m in live] == [1, 2, 3, 1]


SENDER = """
import asyncio, json, sys
from fastapi_websockets import get_channel_layer_from_env

async def main():
    layer = get_channel_layer_from_env()
    await layer.group_history("big:p")  # connected and ready before the start line
    print("ready", flush=True)
    sys.stdin.readline()
    offsets = []
    for i in range(int(sys.argv[1])):
        position = await layer.group_send("big:p", {"type": "m", "i": i})
        offsets.append(position.offset)
    print(json.dumps(offsets), flush=True)
    await layer.close()

asyncio.run(main())
"""


async def test_offsets_from_several_processes_are_contiguous(
    nats_backend: Any, namespace: str, make: Make
) -> None:
    env = {
        **os.environ,
        **nats_backend.env(namespace),
        "FASTAPI_WEBSOCKETS_NATS_HISTORY": json.dumps(HISTORY),
    }
    count, processes = 20, 3
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SENDER,
            str(count),
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        for proc in procs:  # all start sending at once
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        results = []
        for proc in procs:
            assert proc.stdout is not None
            results.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for offsets in results:
        assert offsets == sorted(offsets)
    every = sorted(offset for offsets in results for offset in offsets)
    assert every == list(range(1, count * processes + 1))
    page = await make(servers=nats_backend.extra["node"].url.split(","), history=HISTORY).group_history(
        "big:p"
    )
    assert page.recovered
    assert [m["_position"]["offset"] for m in page.messages] == every


async def api_requests(client: Client, during: Callable[[], Awaitable[_T]]) -> tuple[_T, list[Msg]]:
    """What ``during()`` returns, and the JetStream API requests the server saw meanwhile."""
    sub = await client.subscribe("$JS.API.>")
    await until_subscribed(client)
    result = await during()
    await client.flush()  # every request routed before this is already queued for `sub`
    requests = [await sub.next_msg() for _ in range(sub.pending_msgs)]
    await sub.unsubscribe()
    return result, requests


def by_kind(requests: list[Msg]) -> Counter[str]:
    """``CONSUMER.CREATE``, ``STREAM.MSG``... -> how many such requests."""
    return Counter(".".join(msg.subject.split(".")[2:4]) for msg in requests)


async def filled_room(
    node: NatsNode, make: Make, group: str, count: int
) -> tuple[NATSChannelLayer, NATSChannelLayer, list[StreamPosition]]:
    """A writer and a reader layer on ``node``; the writer sent ``count`` messages to ``group``."""
    urls = [node.url]
    writer, reader = make(servers=urls, history=HISTORY), make(servers=urls, history=HISTORY)
    positions = [await writer.group_send(group, {"type": "m", "i": i}) for i in range(count)]
    assert all(positions)
    return writer, reader, [position for position in positions if position is not None]


async def test_concurrent_history_reads_of_one_group_share_one_read(nats_node: NatsNode, make: Make) -> None:
    _, reader, positions = await filled_room(nats_node, make, "big:c", 6)
    alone = [await reader.group_history("big:c", since=positions[i % 6]) for i in range(30)]
    client = await raw_client([nats_node.url])
    try:
        pages, requests = await api_requests(
            client,
            lambda: asyncio.gather(
                *(reader.group_history("big:c", since=positions[i % 6]) for i in range(30))
            ),
        )
    finally:
        await client.close()
    assert pages == alone  # each read gets its own page, as if it had read alone
    # One round for all 30 (main: 30 newest-entry requests, 25 readers made for the 25 with entries).
    assert by_kind(requests)["STREAM.MSG"] == 1
    assert by_kind(requests)["CONSUMER.CREATE"] == 1


async def test_a_catch_up_from_a_position_this_layer_read_streams_only_what_follows(
    nats_node: NatsNode, make: Make
) -> None:
    writer, reader, _ = await filled_room(nats_node, make, "big:m", 50)
    page = await reader.group_history("big:m")  # the demo's join: the page, then a catch-up from its end
    for i in range(50, 53):
        await writer.group_send("big:m", {"type": "m", "i": i})
    client = await raw_client([nats_node.url])
    try:
        caught_up, requests = await api_requests(
            client, lambda: reader.group_history("big:m", since=page.position)
        )
        # From a position it never saw, the reader streams the whole page again.
        whole, whole_requests = await api_requests(
            client, lambda: reader.group_history("big:m", since=StreamPosition(10, page.position.epoch))
        )
    finally:
        await client.close()
    assert [m["i"] for m in caught_up.messages] == [50, 51, 52]
    assert caught_up.recovered
    assert [m["i"] for m in whole.messages] == list(range(10, 53))
    assert whole.recovered
    creates = [
        json.loads(msg.data)["config"]
        for msg in requests + whole_requests
        if "CONSUMER.CREATE" in msg.subject
    ]
    # The catch-up's reader starts after the entry at the page's end: 3 entries streamed, not 53.
    assert [(c["deliver_policy"], c.get("opt_start_seq")) for c in creates] == [
        ("by_start_sequence", 51),
        ("all", None),
    ]


async def test_a_history_read_sees_writes_that_returned_before_it_began(
    nats_node: NatsNode, make: Make
) -> None:
    # A read that starts while another is running must not take that one's answer:
    # the running one may have read the newest entry before this write was stored.
    writer, reader, _ = await filled_room(nats_node, make, "big:s", 60)
    for i in range(60, 70):
        running = asyncio.ensure_future(reader.group_history("big:s"))
        await asyncio.sleep(0)
        written = await writer.group_send("big:s", {"type": "m", "i": i})
        page = await reader.group_history("big:s")
        assert page.position == written
        assert page.messages[-1]["i"] == i
        assert (await running).position.offset in (i, i + 1)


async def test_a_history_reader_that_gives_up_leaves_the_others_their_page(
    nats_node: NatsNode, make: Make
) -> None:
    _, reader, _ = await filled_room(nats_node, make, "big:g", 3)
    reads = [asyncio.ensure_future(reader.group_history("big:g")) for _ in range(6)]
    await asyncio.sleep(0)
    for read in reads[::2]:
        read.cancel()
    done = await asyncio.gather(*reads, return_exceptions=True)
    assert [isinstance(page, asyncio.CancelledError) for page in done] == [True, False] * 3
    assert [[m["i"] for m in page.messages] for page in done[1::2]] == [[0, 1, 2]] * 3  # type: ignore[union-attr]
    assert [m["i"] for m in (await reader.group_history("big:g")).messages] == [0, 1, 2]


async def test_cluster_history_survives_losing_its_stream_leader(
    private_cluster: NatsCluster, namespace: str, make: Make
) -> None:
    urls = private_cluster.urls
    sender = make(servers=urls, replicas=3, history=HISTORY, timeout=30)
    reader = make(servers=urls, replicas=3, history=HISTORY, timeout=30)
    positions = [await sender.group_send("room:l", {"type": "m", "i": i}) for i in range(3)]
    first = positions[0]
    assert first is not None
    assert (await reader.group_history("room:l")).position == positions[-1]
    client = await raw_client(urls)
    try:
        info = await client.jetstream().stream_info(f"{namespace}_H5-600000")
        assert info.config.num_replicas == 3
        leader = info.cluster.leader  # type: ignore[union-attr]
    finally:
        await client.close()
    next(node for node in private_cluster.nodes if node.name == leader).kill()
    await wait_connected(sender, reader)

    following = await sender.group_send("room:l", {"type": "m", "i": 3})
    assert following == (4, first.epoch)
    page = await reader.group_history("room:l", since=first)
    assert [m["i"] for m in page.messages] == [1, 2, 3]
    assert page.recovered


# ----------------------------------------------------------------- presence


async def presence_subjects(urls: list[str], namespace: str) -> dict[str, int]:
    """Subject -> stored messages of the presence stream, read back from the server."""
    nc = await raw_client(urls)
    try:
        info = await nc.jetstream().stream_info(f"{namespace}_P", subjects_filter=">")
        return dict(info.state.subjects or {})
    finally:
        await nc.close()


async def test_presence_is_chunks_per_owner_and_an_owner_record_and_leaves_nothing(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    layer = make(servers=[nats_node.url])
    channels = [await layer.new_channel("ws") for _ in range(200)]
    for channel in channels:
        await layer.presence_join("room:a", channel, {"n": 1}, notify=False)
    await layer.presence_join("room:b", channels[0], notify=False)
    owner = subject_token(layer.client_token)
    stored = await presence_subjects([nats_node.url], namespace)
    record = f"{namespace}.pr.o.{owner}"
    chunks_a = {s for s in stored if s.startswith(f"{namespace}.pr.e.{subject_token('room:a')}.{owner}.")}
    # At most 64 messages per owner and group, whatever the number of entries; one record.
    assert 1 < len(chunks_a) <= 64
    assert set(stored) == chunks_a | {
        record,
        f"{namespace}.pr.e.{subject_token('room:b')}.{owner}.{chunk_of(channels[0])}",
    }
    assert all(count == 1 for count in stored.values())

    for channel in channels:
        await layer.presence_leave("room:a", channel, notify=False)
    assert set(await presence_subjects([nats_node.url], namespace)) == {
        record,
        f"{namespace}.pr.e.{subject_token('room:b')}.{owner}.{chunk_of(channels[0])}",
    }
    await layer.presence_leave("room:b", channels[0], notify=False)
    assert await presence_subjects([nats_node.url], namespace) == {}  # the record went with the last entry


_PRESENT = """
import asyncio, json, sys
from fastapi_websockets.backends.nats import NATSChannelLayer

async def main(url, namespace):
    layer = NATSChannelLayer(
        servers=[url], prefix=namespace, group_bucket=namespace, stream_name=namespace, presence_timeout=1
    )
    mine = [await layer.new_channel("ws") for _ in range(100)]
    for channel in mine:
        await layer.presence_join("room:r", channel, {"who": "dead"}, notify=False)
    print(json.dumps([layer.client_token, mine]), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def died_present(node: NatsNode, namespace: str) -> tuple[str, list[str]]:
    """The owner token and the channels of a process that joined ``room:r`` and was killed.

    Its connection went without leaving; its data stays on the server. (Closing a layer's
    client from outside is not a death: the layer connects a new one.)
    """
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PRESENT, node.url, namespace, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        token, channels = json.loads(await child.stdout.readline())
    finally:
        child.kill()
        await child.wait()
    return token, channels


async def test_a_dead_owner_is_claimed_by_one_reaper_and_nothing_is_left(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    urls = [nats_node.url]
    watcher_layer = make(servers=urls)
    watcher = await watcher_layer.new_channel("ws")
    await watcher_layer.group_add("room:r", watcher)
    dead_token, mine = await died_present(nats_node, namespace)
    # Three live processes reap on their own heartbeats, racing for the dead owner.
    reapers = [make(servers=urls, presence_timeout=1) for _ in range(3)]
    for reaper in reapers:
        await reaper.presence_join("room:r", await reaper.new_channel("ws"), notify=False)
    left = [(await watcher_layer.receive(watcher, timeout=10))["channel"] for _ in mine]
    assert sorted(left) == sorted(mine)
    with pytest.raises(TimeoutError):  # each leave announced once: nothing more comes
        await watcher_layer.receive(watcher, timeout=1.5)
    dead_owner = subject_token(dead_token)
    assert not [s for s in await presence_subjects(urls, namespace) if dead_owner in s]
    assert set(await watcher_layer.presence("room:r")) == {
        channel for reaper in reapers for channel in reaper._presence.channels("room:r")
    }


async def test_two_processes_claiming_one_dead_owner_at_once_both_reap_without_error(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # The loser's delete of the claimed record used to raise "sequence not found" (10043:
    # the server's answer for a message deleted from within the stream) out of the reap.
    async with TcpProxy(nats_node.port) as proxy:
        first, second = (make(servers=[f"nats://127.0.0.1:{proxy.port}"]) for _ in range(2))
        watcher = await first.new_channel("ws")
        await first.group_add("room:r", watcher)
        # The stream's first message stays: the dead owner's record is not first, and the
        # server answers a second delete of it with 10043, not 10057 (a first sequence).
        # A long presence_timeout: this layer's reaper runs at its join, then waits 200 s.
        keeper = make(servers=[nats_node.url], presence_timeout=600)
        await keeper.presence_join("room:k", await keeper.new_channel("ws"), notify=False)
        _, mine = await died_present(nats_node, namespace)

        async def silent() -> bool:
            # Neither owns an entry: no background reaper of theirs runs.
            return await first.presence("room:r") == {} == await second.presence("room:r")

        await eventually(silent, "the killed process's entries read as gone")
        nc = await raw_client([nats_node.url])
        try:
            jsm = nc.jsm()

            async def both_scans_sent() -> bool:
                consumers = await jsm.consumers_info(f"{namespace}_P")
                return len(consumers) == 2 and not any(c.num_pending for c in consumers)

            # Neither reaper hears the server until both scans were served: both see the
            # dead owner's record and both try to delete it.
            proxy.hold()
            reaps = asyncio.gather(first.presence_heartbeat(), second.presence_heartbeat())
            await eventually(both_scans_sent, "both reapers' scans served")
            proxy.release()
            await reaps
        finally:
            await nc.close()
        left = [(await first.receive(watcher, timeout=10))["channel"] for _ in mine]
        assert sorted(left) == sorted(mine)
        await first.group_send("room:r", {"type": "mark"})
        assert (await first.receive(watcher, timeout=10))["type"] == "mark"  # each leave once


async def test_heartbeat_is_one_write_whatever_the_number_of_members(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    nc = await raw_client([nats_node.url])
    try:
        js = nc.jetstream()
        for members in (1, 500):
            # A long timeout: the background heartbeat beats once, then sleeps.
            layer = make(
                servers=[nats_node.url],
                prefix=f"{namespace}{members}",
                stream_name=f"{namespace}{members}",
                presence_timeout=600,
            )
            for _ in range(members):
                await layer.presence_join("room:h", await layer.new_channel("ws"), notify=False)
            await layer.presence_heartbeat()
            before = (await js.stream_info(f"{namespace}{members}_P")).state.last_seq
            for _ in range(5):
                await layer.presence_heartbeat()
            after = (await js.stream_info(f"{namespace}{members}_P")).state.last_seq
            assert after - before == 5, f"{members} members: {after - before} writes for 5 beats"
    finally:
        await nc.close()


async def test_presence_survives_a_restart_and_a_server_that_lost_its_data(
    private_node: NatsNode, namespace: str, make: Make
) -> None:
    urls = [private_node.url]
    holder, viewer = make(servers=urls), make(servers=urls)
    channels = [await holder.new_channel("ws") for _ in range(50)]
    for channel in channels:
        await holder.presence_join("room:s", channel, {"c": channel}, notify=False)
    expected = {channel: {"c": channel} for channel in channels}
    assert await viewer.presence("room:s") == expected

    private_node.stop()
    private_node.start()
    await wait_connected(holder, viewer)
    assert await viewer.presence("room:s") == expected  # kept on disk

    private_node.stop()
    shutil.rmtree(private_node.workdir / "js")  # JetStream state gone: presence stream included
    private_node.start()
    await wait_connected(holder, viewer)
    await holder.presence_heartbeat()  # one beat notices the lost record and stores every entry again
    assert await viewer.presence("room:s") == expected


async def test_a_leave_by_another_process_is_not_undone_by_the_owner(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    urls = [nats_node.url]
    owner, other = make(servers=urls), make(servers=urls)
    # Two channels in one chunk of the owner's entries.
    first = await owner.new_channel("ws")
    second = await owner.new_channel("ws")
    while chunk_of(second) != chunk_of(first):
        second = await owner.new_channel("ws")
    await owner.presence_join("room:f", first, {"n": 1}, notify=False)
    await owner.presence_join("room:f", second, {"n": 2}, notify=False)
    await other.presence_leave("room:f", first, notify=False)
    assert await other.presence("room:f") == {second: {"n": 2}}
    await owner.presence_join("room:f", second, {"n": 3}, notify=False)  # rewrites that chunk
    assert await other.presence("room:f") == {second: {"n": 3}}


async def last_sequence(urls: list[str], namespace: str) -> int:
    """The presence stream's last sequence: one more for every message published to it."""
    nc = await raw_client(urls)
    try:
        info = await nc.jetstream().stream_info(f"{namespace}_P")
        return info.state.last_seq
    finally:
        await nc.close()


async def test_concurrent_joins_of_one_chunk_are_written_together(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # The churn soak joins 50 consumers at a time. Each join used to publish its chunk
    # under the presence lock, one round trip after another, while the room's chat filled
    # the waiting consumers' mailboxes; queued on the chunk's writer, they go out together.
    urls = [nats_node.url]
    layer = make(servers=urls, presence_timeout=300)
    first = await layer.new_channel("ws")
    await layer.presence_join("room:c", first, {}, notify=False)  # the stream and the owner record
    channels: list[str] = []
    while len(channels) < 30:
        channel = await layer.new_channel("ws")
        if chunk_of(channel) == chunk_of(first):
            channels.append(channel)
    before = await last_sequence(urls, namespace)
    await asyncio.gather(*(layer.presence_join("room:c", c, {"c": c}, notify=False) for c in channels))
    published = await last_sequence(urls, namespace) - before
    assert 1 <= published < len(channels)
    expected: dict[str, dict[str, Any]] = {first: {}} | {c: {"c": c} for c in channels}
    assert await make(servers=urls).presence("room:c") == expected

    await asyncio.gather(*(layer.presence_leave("room:c", c, notify=False) for c in channels))
    assert await make(servers=urls).presence("room:c") == {first: {}}
    await layer.presence_leave("room:c", first, notify=False)
    assert await presence_subjects(urls, namespace) == {}  # the record went with the last entry


async def test_a_join_its_caller_gave_up_on_leaves_no_entry_behind(
    nats_node: NatsNode, namespace: str, make: Make
) -> None:
    # Cancelled before its chunk went out, after, or while it was being written: a caller
    # that saw its join cancelled will not leave, so its entry must not stay.
    urls = [nats_node.url]
    layer = make(servers=urls, presence_timeout=300)
    await layer.presence_join("room:g", await layer.new_channel("ws"), {}, notify=False)

    async def join_in_the_same_chunk(channel: str) -> None:
        # Written after every take-back queued before it: a chunk's writes keep their order.
        later = await layer.new_channel("ws")
        while chunk_of(later) != chunk_of(channel):
            later = await layer.new_channel("ws")
        await layer.presence_join("room:g", later, {}, notify=False)

    given_up = await give_up_joins(layer, "room:g", join_in_the_same_chunk, rounds=12)
    assert given_up  # a join that completed before its cancel is a join like any other
    assert not set(await make(servers=urls).presence("room:g")) & set(given_up)


@pytest.mark.parametrize("history", [False, True], ids=["plain", "history"])
@pytest.mark.parametrize("receiver", ["own-process", "other-process"])
async def test_core_inbox_keeps_sends_and_group_sends_in_call_order(
    nats_node: NatsNode, make: Make, receiver: str, history: bool
) -> None:
    # The conformance suite's order tests run the JetStream inbox; the core inbox publishes
    # a send and a group's copy to the same subject without storing either. Its bursts
    # to one group swapped as the stored inbox's did (other-process, before the fix: 1 to 4
    # of 20 rounds in each of 5 runs).
    options: dict[str, Any] = {"servers": [nats_node.url], "inbox": "core"}
    if history:
        options["history"] = {"mixed-order-*": 50, "burst-order-*": 50}
    sender = make(**options)
    owner = sender if receiver == "own-process" else make(**options)
    assert_mixed_order(await mixed_rounds(sender, owner, "process", gathered=False), gathered=False)
    gathered = await mixed_rounds(sender, owner, "process", gathered=True, prefix="gathered")
    assert_mixed_order(gathered, gathered=True)
    await assert_bursts_in_call_order(sender, owner, receiver)


async def test_a_flush_writes_its_ping_after_the_commands_nats_py_buffered(
    nats_node: NatsNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The layer's start (its subscriptions) and a core-inbox group_send (its copies)
    # count on a flush's pong meaning the server has read what came before it. nats-py
    # writes the ping straight to the socket, ahead of a SUB or PUB still in its buffer.
    nc = await nats.connect(nats_node.url)
    try:
        written: list[bytes] = []
        transport = nc._transport
        assert transport is not None
        write, writelines = transport.write, transport.writelines

        def record(payload: bytes) -> None:
            written.append(bytes(payload))
            write(payload)

        def record_lines(payload: list[bytes]) -> None:
            written.extend(bytes(part) for part in payload)
            writelines(payload)

        monkeypatch.setattr(transport, "write", record)
        monkeypatch.setattr(transport, "writelines", record_lines)
        await nc.subscribe("order.probe")
        await nc.publish("order.probe", b"x")
        await _flush_in_order(nc, 5)
        verbs = [part.split(b" ", 1)[0].strip() for part in written]
        assert verbs == [b"SUB", b"PUB", b"PING"]
    finally:
        await nc.close()
