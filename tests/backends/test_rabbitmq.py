"""RabbitMQ-specific behaviour, against the real private node of the test session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import sys
import threading
import time
import types
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import pytest

from fastapi_websockets import (
    BaseChannelLayer,
    ChannelFull,
    InvalidChannelLayerConfig,
    get_channel_layer_from_env,
)
from fastapi_websockets.backends import rabbitmq
from fastapi_websockets.backends.packing import pack
from fastapi_websockets.backends.rabbitmq import (
    MAX_AMQP_NAME,
    RabbitMQChannelLayer,
    group_routing_key,
    history_stream_name,
    named_queue_name,
)
from fastapi_websockets.backends.rabbitmq_presence import RabbitPresence
from fastapi_websockets.exceptions import BackendUnavailable, ChannelLayerClosed, ChannelLayerError
from tests.conformance.test_layer import send_in_two_waves
from tests.conftest import layer_factory
from tests.faults import (
    TcpProxy,
    eventually,
    fail_once,
    login_refusals,
    refused_while_running,
    silent_server,
)
from tests.leaks import SECRET, assert_no_secret
from tests.servers import free_port
from tests.servers.rabbitmq import RabbitNode

Factory = Callable[..., RabbitMQChannelLayer]


@pytest.fixture
def node(rabbitmq_node: RabbitNode) -> RabbitNode:
    return rabbitmq_node


@pytest.fixture
def prefix(namespace: str) -> str:
    """Exchange name and queue prefix of the test's layers."""
    return f"fw-{namespace}"


@pytest.fixture
def make(rabbitmq_node: RabbitNode, prefix: str, layers: list[BaseChannelLayer]) -> Factory:
    """Layers sharing one fresh exchange and queue prefix, closed after the test."""
    return layer_factory(
        layers, RabbitMQChannelLayer, url=rabbitmq_node.url, exchange_name=prefix, queue_prefix=prefix
    )


def queues(node: RabbitNode, prefix: str) -> dict[str, dict[str, str]]:
    """The node's queues whose name starts with ``prefix``: {name: {field: value}}."""
    fields = ["name", "consumers", "messages", "exclusive", "durable", "arguments"]
    return {
        row[0]: dict(zip(fields, row, strict=True))
        for row in node.rows("list_queues", *fields)
        if row[0].startswith(prefix)
    }


def consumers(node: RabbitNode, prefix: str) -> list[str]:
    """The queue of every consumer on the node whose queue name starts with ``prefix``."""
    return sorted(row[0] for row in node.rows("list_consumers", "queue_name") if row[0].startswith(prefix))


def bindings(node: RabbitNode, exchange: str) -> set[tuple[str, str]]:
    """(queue, routing key) bindings of ``exchange``."""
    rows = node.rows("list_bindings", "source_name", "destination_name", "routing_key")
    return {(row[1], row[2]) for row in rows if row[0] == exchange}


def taps(node: RabbitNode, stream: str) -> int:
    """The number of consumers of history stream ``stream`` (list_consumers leaves streams out)."""
    return int(queues(node, stream)[stream]["consumers"])


# ----------------------------------------------------------------- options


def test_spec_options_and_defaults() -> None:
    layer = RabbitMQChannelLayer()
    assert layer.url == "amqp://guest:guest@localhost:5672//"
    assert layer.exchange_name == "fastapi_websockets"
    assert layer.queue_prefix == "fastapi-websockets"
    assert layer.durable is True
    assert layer.message_ttl == 60000
    assert layer.queue_expiry == 300000
    assert layer.poll_interval == 0.1


def test_environment_empty_means_no_limit() -> None:
    layer = get_channel_layer_from_env(
        {
            "FASTAPI_WEBSOCKETS_BACKEND": "rabbitmq",
            "FASTAPI_WEBSOCKETS_RABBITMQ_URL": "amqp://u:p@broker:5672/app",
            "FASTAPI_WEBSOCKETS_RABBITMQ_MESSAGE_TTL": "",
            "FASTAPI_WEBSOCKETS_RABBITMQ_QUEUE_EXPIRY": "",
            "FASTAPI_WEBSOCKETS_RABBITMQ_DURABLE": "false",
            "FASTAPI_WEBSOCKETS_RABBITMQ_POLL_INTERVAL": "0.5",
        }
    )
    assert isinstance(layer, RabbitMQChannelLayer)
    assert (layer.message_ttl, layer.queue_expiry, layer.durable) == (None, None, False)
    assert layer.url == "amqp://u:p@broker:5672/app"


def test_persistent_sends_is_on_by_default_and_read_from_the_environment() -> None:
    assert RabbitMQChannelLayer().persistent_sends is True
    layer = get_channel_layer_from_env(
        {"FASTAPI_WEBSOCKETS_BACKEND": "rabbitmq", "FASTAPI_WEBSOCKETS_RABBITMQ_PERSISTENT_SENDS": "off"}
    )
    assert isinstance(layer, RabbitMQChannelLayer)
    assert layer.persistent_sends is False


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("message_ttl", 0),
        ("message_ttl", 1.5),
        ("queue_expiry", -1),
        ("exchange_name", "amq.direct"),
        ("exchange_name", "has space"),
        ("queue_prefix", "x" * 101),
        ("url", "http://localhost"),
        ("poll_interval", 0),
        ("durable", "yes"),
    ],
)
def test_bad_options_name_the_option_and_value(option: str, value: object) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=option) as info:
        RabbitMQChannelLayer(**{option: value})  # type: ignore[arg-type]
    assert repr(value)[:20] in str(info.value)


# ------------------------------------------------------------------- names


def test_names_map_to_distinct_bounded_identifiers() -> None:
    names = ["a.b", "a_b", "a-b", "a:b", "A.b", "a*b", "a+2Ab", "a#b", "a/b", "ä.b", "a b"[:1] + "+20b"]
    names += ["x" * 200, "x" * 199 + "y", "😀" * 200, "😀" * 199 + "😁", "#" * 200]
    queue_names = {named_queue_name("p" * 100, name) for name in names}
    keys = {group_routing_key(name) for name in names}
    assert len(queue_names) == len(names)
    assert len(keys) == len(names)
    for identifier in queue_names | keys:
        assert len(identifier.encode()) <= MAX_AMQP_NAME
    assert named_queue_name("p", "room:demo") == "p.c.room:demo"  # readable when it can be


async def test_long_unicode_names_work_on_the_broker(make: Factory) -> None:
    layer = make()
    long_a, long_b = "😀" * 199 + "a", "😀" * 199 + "b"
    await layer.send(long_a, {"type": "a"})
    await layer.send(long_b, {"type": "b"})
    assert (await layer.receive(long_b, timeout=10))["type"] == "b"
    assert (await layer.receive(long_a, timeout=10))["type"] == "a"
    channel = await layer.new_channel()
    await layer.group_add(long_a, channel)
    await layer.group_send(long_b, {"type": "other group"})
    await layer.group_send(long_a, {"type": "mine"})
    assert (await layer.receive(channel, timeout=10))["type"] == "mine"


# ---------------------------------------------------------- ttl and expiry


async def test_message_ttl_drops_named_messages(make: Factory, prefix: str, node: RabbitNode) -> None:
    layer = make(message_ttl=300, channel_expiry=3600)
    await layer.send("ttl.named", {"type": "old"})
    info = queues(node, prefix)[named_queue_name(prefix, "ttl.named")]
    assert "x-message-ttl" in info["arguments"]
    await asyncio.sleep(1.0)
    await layer.send("ttl.named", {"type": "new"})
    assert (await layer.receive("ttl.named", timeout=10))["type"] == "new"


async def test_no_message_ttl_keeps_messages(make: Factory, prefix: str, node: RabbitNode) -> None:
    layer = make(message_ttl=None, channel_expiry=3600)
    await layer.send("kept.named", {"type": "old"})
    assert "x-message-ttl" not in queues(node, prefix)[named_queue_name(prefix, "kept.named")]["arguments"]
    await asyncio.sleep(1.0)
    assert (await layer.receive("kept.named", timeout=10))["type"] == "old"


async def test_queue_expiry_deletes_unused_named_queues(make: Factory, prefix: str, node: RabbitNode) -> None:
    import aio_pika

    layer = make(queue_expiry=1000)
    queue = named_queue_name(prefix, "short.lived")
    observer = await aio_pika.connect(node.url)

    async def consumed() -> bool:
        # A passive declare: quick at any load, as rabbitmqctl (an Erlang VM per call) is not.
        channel = await observer.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return bool(declared.declaration_result.consumer_count == 1)

    async def expired() -> bool:
        # Off the loop, so that the layer's own timers (the consumer's linger) keep their time.
        return queue not in await asyncio.to_thread(queues, node, prefix)

    # While a receiver waits, its consumer keeps the queue in use: seen then, it exists.
    first = asyncio.create_task(layer.receive("short.lived"))
    try:
        await eventually(consumed, "a consumer on the queue")
    finally:
        await observer.close()
    await layer.send("short.lived", {"type": "first"})
    assert (await first)["type"] == "first"
    await layer.send("short.lived", {"type": "lost"})
    # Once its consumer is gone, the unused queue expires with its message.
    await eventually(expired, "queue expiry")
    # Reading and sending again declare it again.
    waiter = asyncio.create_task(layer.receive("short.lived", timeout=10))
    await asyncio.sleep(0.3)
    await layer.send("short.lived", {"type": "new"})
    assert (await waiter)["type"] == "new"


async def test_no_queue_expiry_keeps_queues(make: Factory, prefix: str, node: RabbitNode) -> None:
    layer = make(queue_expiry=None)
    await layer.send("long.lived", {"type": "x"})
    assert "x-expires" not in queues(node, prefix)[named_queue_name(prefix, "long.lived")]["arguments"]


# ---------------------------------------------------------------- capacity


async def test_channel_full_comes_from_the_broker(make: Factory) -> None:
    a, b = make(capacity=2), make(capacity=2)
    await a.send("bounded", {"type": "n", "i": 0})
    await b.send("bounded", {"type": "n", "i": 1})
    # Neither instance holds these messages: only the queue's x-max-length can refuse.
    with pytest.raises(ChannelFull, match="bounded") as info:
        await a.send("bounded", {"type": "n", "i": 2})
    assert info.value.capacity == 2
    got = sorted([(await b.receive("bounded", timeout=10))["i"] for _ in range(2)])
    assert got == [0, 1]
    with pytest.raises(TimeoutError):
        await b.receive("bounded", timeout=0.3)


async def test_group_send_skips_a_full_named_member(make: Factory) -> None:
    layer = make(capacity=1)
    specific = await layer.new_channel()
    await layer.group_add("mixed", "full.member")
    await layer.group_add("mixed", specific)
    await layer.send("full.member", {"type": "pre"})
    await layer.group_send("mixed", {"type": "g"})  # no ChannelFull
    assert (await layer.receive(specific, timeout=10))["type"] == "g"
    assert (await layer.receive("full.member", timeout=10))["type"] == "pre"
    assert layer.stats.dropped_full >= 1


# ------------------------------------------------- broker resources per layer


async def test_one_queue_and_one_consumer_per_layer(make: Factory, prefix: str, node: RabbitNode) -> None:
    connections_before = len(node.rows("list_connections", "name"))
    layer = make()
    channels = [await layer.new_channel() for _ in range(300)]
    for index, channel in enumerate(channels):
        await layer.group_add(f"room{index % 3}", channel)
    waiting = [asyncio.create_task(layer.receive(channel)) for channel in channels]
    named = [asyncio.create_task(layer.receive("work")) for _ in range(50)]
    await asyncio.sleep(0.5)
    found = queues(node, prefix)
    assert sorted(found) == sorted([layer.inbox_name, named_queue_name(prefix, "work")])
    # It outlives the connection (see test_rabbitmq_restarts.py), expiring once its process is gone.
    assert (found[layer.inbox_name]["exclusive"], found[layer.inbox_name]["durable"]) == ("false", "true")
    assert "x-expires" in found[layer.inbox_name]["arguments"]
    assert "quorum" in found[named_queue_name(prefix, "work")]["arguments"]
    assert consumers(node, prefix) == sorted([layer.inbox_name, named_queue_name(prefix, "work")])
    assert len(node.rows("list_connections", "name")) == connections_before + 1
    # One binding per group, not per member.
    group_bindings = {key for queue, key in bindings(node, prefix) if queue == layer.inbox_name}
    assert group_bindings == {f"p.{layer.client_token}", "g.room0", "g.room1", "g.room2"}
    for task in [*waiting, *named]:
        task.cancel()
    await asyncio.gather(*waiting, *named, return_exceptions=True)


async def test_binding_follows_first_join_and_last_leave(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    layer = make()
    a, b = await layer.new_channel(), await layer.new_channel()

    def bound() -> bool:
        return (layer.inbox_name, "g.lobby") in bindings(node, prefix)

    assert not bound()
    await layer.group_add("lobby", a)
    await layer.group_add("lobby", b)
    assert bound()
    await layer.group_discard("lobby", a)
    assert bound()
    await layer.group_discard("lobby", b)
    assert not bound()


async def test_named_member_is_a_broker_binding(make: Factory, prefix: str, node: RabbitNode) -> None:
    a = make()
    await a.group_add("jobs-group", "job.queue")
    await a.close()
    assert (named_queue_name(prefix, "job.queue"), "g.jobs-group") in bindings(node, prefix)
    # Another instance (no local members at all) reaches the named member.
    b = make()
    await b.group_send("jobs-group", {"type": "job"})
    assert (await b.receive("job.queue", timeout=10))["type"] == "job"


async def test_flush_removes_named_member_bindings(make: Factory, prefix: str, node: RabbitNode) -> None:
    layer = make()
    await layer.group_add("flushed-group", "flushed.member")
    await layer.send("flushed.member", {"type": "old"})
    await layer.flush()
    assert (named_queue_name(prefix, "flushed.member"), "g.flushed-group") not in bindings(node, prefix)
    await layer.group_send("flushed-group", {"type": "x"})
    with pytest.raises(TimeoutError):
        await layer.receive("flushed.member", timeout=0.5)


async def test_cross_instance_group_add(make: Factory) -> None:
    a, b = make(), make()
    channel = await b.new_channel()
    await a.group_add("remote", channel)
    await a.group_send("remote", {"type": "hi"})
    assert (await b.receive(channel, timeout=10))["type"] == "hi"


async def test_a_senders_own_members_get_its_group_message_before_the_broker_answers(
    make: Factory, node: RabbitNode
) -> None:
    async with TcpProxy(node.port) as proxy:
        sender, other = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"), make()
        own, remote = await sender.new_channel(), await other.new_channel()
        await sender.group_add("room", own)
        await sender.group_add("room", remote)
        proxy.hold()  # nothing the broker sends reaches the sender: no confirm, no routed copy
        sending = asyncio.ensure_future(sender.group_send("room", {"type": "m"}))
        assert (await sender.receive(own, timeout=10))["type"] == "m"
        assert not sending.done()  # its confirm is still held
        proxy.release()
        await asyncio.wait_for(sending, 10)
        assert (await other.receive(remote, timeout=10))["type"] == "m"


async def test_a_senders_own_members_get_each_group_message_once_in_order_with_its_sends(
    make: Factory,
) -> None:
    sender, other = make(), make()
    own, remote = await sender.new_channel(), await other.new_channel()
    await sender.group_add("room", own)
    await other.group_add("room", remote)
    for i in range(10):
        await sender.group_send("room", {"type": "group", "i": i})
        await sender.send(own, {"type": "send", "i": i})
    # Sent once the group_sends were confirmed: it reaches the sender's inbox after the
    # copies the broker routed back there, which must not reach `own` a second time.
    await other.send(own, {"type": "marker", "i": -1})
    got = [await sender.receive(own, timeout=10) for _ in range(21)]
    expected = [(kind, i) for i in range(10) for kind in ("group", "send")]
    assert [(m["type"], m["i"]) for m in got] == [*expected, ("marker", -1)]
    assert [(await other.receive(remote, timeout=10))["i"] for _ in range(10)] == list(range(10))


async def test_group_add_of_a_gone_instances_channel_is_a_no_op(make: Factory) -> None:
    a, b = make(timeout=30), make()
    channel = await b.new_channel()
    await b.close()
    # The owner's inbox is gone: the broker returns the request, nobody waits 30 s.
    await asyncio.wait_for(a.group_add("orphans", channel), 10)
    await asyncio.wait_for(a.group_discard("orphans", channel), 10)


async def test_transient_classic_queues_with_durable_false(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    layer = make(durable=False, capacity=2)
    await layer.send("transient", {"type": "n", "i": 0})
    await layer.send("transient", {"type": "n", "i": 1})
    with pytest.raises(ChannelFull):
        await layer.send("transient", {"type": "n", "i": 2})
    info = queues(node, prefix)[named_queue_name(prefix, "transient")]
    assert info["durable"] == "false"
    assert "classic" in info["arguments"]
    assert [(await layer.receive("transient", timeout=10))["i"] for _ in range(2)] == [0, 1]


async def test_receives_cancelled_around_their_ack_lose_nothing_when_the_layer_closes(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each receive takes a delivery the consumer already holds and is cancelled after
    # 0 to 5 loop turns, around its ack. A cancellation once landed after the ack was
    # queued: the message, acked, waited in the consumer for the next receive and was
    # gone when the layer closed. Whatever the turn, each message is now either returned
    # or left for the next reader: unacked (the broker requeues it in place), or, claimed
    # for a receive cancelled as it returned, sent back by close() to the queue's tail.
    monkeypatch.setattr(rabbitmq, "NAMED_LINGER", 600.0)  # each consumer keeps its deliveries meanwhile
    receiver, sender = make(), make()
    turns = range(6)
    for turn in turns:
        for i in range(3):
            await sender.send(f"acked.{turn}", {"type": "job", "i": i})

    def held(channel: str) -> bool:
        # The other deliveries come within the prefetch window: held, not yet acked.
        return len(receiver._readers[channel].held) == 2

    got: dict[int, list[int]] = {}
    for turn in turns:
        channel = f"acked.{turn}"
        got[turn] = [(await receiver.receive(channel, timeout=10))["i"]]
        await eventually(partial(held, channel), "deliveries held")
        receiving = asyncio.ensure_future(receiver.receive(channel, timeout=10))
        for _ in range(turn):
            await asyncio.sleep(0)
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            got[turn].append((await receiving)["i"])
    await receiver.close()
    reader = make()
    for turn in turns:
        while len(got[turn]) < 3:
            got[turn].append((await reader.receive(f"acked.{turn}", timeout=10))["i"])
    assert {turn: sorted(values) for turn, values in got.items()} == {turn: [0, 1, 2] for turn in turns}


async def test_cancelled_calls_never_cancel_an_amqp_rpc(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    layer = make()
    channel = await layer.new_channel()
    # Each of these receives starts a consumer (declare + basic.consume RPCs) and
    # is cancelled by its timeout long before the broker answers.
    for index in range(20):
        with pytest.raises(TimeoutError):
            await layer.receive(f"fresh.{index}", timeout=0.0001)
    adding = [asyncio.create_task(layer.group_add(f"g{index}", channel)) for index in range(10)]
    await asyncio.sleep(0)
    for task in adding:
        task.cancel()
    await asyncio.gather(*adding, return_exceptions=True)
    await layer.send("fresh.3", {"type": "still works"})
    assert (await layer.receive("fresh.3", timeout=10))["type"] == "still works"
    await layer.group_add("g1", channel)
    await layer.group_send("g1", {"type": "bound"})
    assert (await layer.receive(channel, timeout=10))["type"] == "bound"
    closed = [record for record in caplog.records if "because RPC call" in record.getMessage()]
    assert closed == []


async def test_a_cancelled_first_call_leaves_one_connection(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    before = len(node.rows("list_connections", "name"))
    layer = make()
    for delay in (0.0, 0.005, 0.02):
        first = asyncio.create_task(layer.receive("first.use", timeout=30))
        await asyncio.sleep(delay)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
    await layer.send("first.use", {"type": "works"})
    assert (await layer.receive("first.use", timeout=10))["type"] == "works"
    assert len(node.rows("list_connections", "name")) == before + 1


async def test_what_aio_pika_logs_about_a_dropped_connection_formats_later_too(
    make: Factory, node: RabbitNode, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    # Handlers that format after the call (a MemoryHandler, a queue's listener, a test's
    # records) are where aio-pika's callback error records used to fail.
    caplog.set_level(logging.DEBUG, logger="aio_pika.tools")
    buffered = logging.handlers.MemoryHandler(
        capacity=100_000, flushLevel=logging.CRITICAL + 1, target=logging.StreamHandler(sys.stderr)
    )
    aio_pika_logger = logging.getLogger("aio_pika")
    aio_pika_logger.addHandler(buffered)
    try:
        async with TcpProxy(node.port) as proxy:
            layer = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
            await layer.send("before.drop", {"type": "x"})
            assert (await layer.receive("before.drop", timeout=10))["type"] == "x"
            await proxy.cut()
            # Without such a record this test would check nothing.
            await eventually(lambda: callback_errors(caplog), "aio-pika logs a channel's failed restore")
            await proxy.reopen()
            await layer.close()
    finally:
        aio_pika_logger.removeHandler(buffered)
        buffered.close()  # flushes: formats every record now
    assert "Logging error" not in capfd.readouterr().err
    assert all(record.getMessage() for record in callback_errors(caplog))


def callback_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "aio_pika.tools"]


# ---------------------------------------------------------- broker restart


async def test_unreachable_broker_raises_backend_unavailable() -> None:
    layer = RabbitMQChannelLayer(url=f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=1)
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1") as info:
        await layer.send("anything", {"type": "x"})
    assert isinstance(info.value, ConnectionError)
    assert "guest:guest" not in str(info.value)  # the password is redacted
    await layer.close()


async def test_broker_restart(make: Factory, prefix: str, node: RabbitNode) -> None:
    a, b = make(timeout=2), make(timeout=60)
    specific = await a.new_channel()
    await a.group_add("survivors", specific)
    await b.send("durable.kept", {"type": "stored"})
    waiting = asyncio.create_task(a.receive(specific))
    waiting_named = asyncio.create_task(a.receive("restart.named"))
    await asyncio.sleep(0.3)

    await asyncio.to_thread(node.stop)
    with pytest.raises(BackendUnavailable):
        await a.send("restart.named", {"type": "while down"})
    with pytest.raises(BackendUnavailable):
        await a.group_add("joined.while.down", specific)
    await asyncio.to_thread(node.start)

    assert not waiting.done()
    assert not waiting_named.done()
    # The layer declares its inbox again and restores its bindings and consumers
    # by itself. (Until it has, messages routed to its inbox have nowhere to go.)
    inbox_keys = {
        (a.inbox_name, f"p.{a.client_token}"),
        (a.inbox_name, "g.survivors"),
        (a.inbox_name, "g.joined.while.down"),
    }
    await eventually(lambda: inbox_keys <= bindings(node, prefix), "inbox bindings restored")
    named_queue = named_queue_name(prefix, "restart.named")
    await eventually(
        lambda: consumers(node, prefix) == sorted([a.inbox_name, b.inbox_name, named_queue]),
        "consumers restored",
    )
    assert not waiting.done()
    assert not waiting_named.done()
    # b's calls wait for its reconnect (within timeout) instead of failing.
    await b.send(specific, {"type": "after restart"})
    assert (await asyncio.wait_for(waiting, 30))["type"] == "after restart"
    await b.send("restart.named", {"type": "named after restart"})
    assert (await asyncio.wait_for(waiting_named, 30))["type"] == "named after restart"
    await b.group_send("survivors", {"type": "group after restart"})
    assert (await a.receive(specific, timeout=10))["type"] == "group after restart"
    assert (await a.receive("durable.kept", timeout=10))["type"] == "stored"
    await b.group_send("joined.while.down", {"type": "joined"})
    assert (await a.receive(specific, timeout=10))["type"] == "joined"


# ---------------------------------------------------------------- history

HISTORY = {"room:*": {"size": 50, "ttl": 600}, "tiny:*": 3}
#: A hang guard for a recovery, not a speed goal.
PATIENCE = 60.0


async def test_history_lives_in_one_stream_per_history_group(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    layer = make(history=HISTORY)
    await layer.group_send("lobby", {"type": "m"})
    assert not [name for name in queues(node, prefix) if ".h." in name]  # plain groups pay nothing
    position = await layer.group_send("room:1", {"type": "m"})
    assert position is not None
    name = history_stream_name(prefix, "room:1")
    rows = {row[0]: row[1:] for row in node.rows("list_queues", "name", "type", "arguments")}
    assert rows[name][0] == "stream"
    assert "x-max-age" in rows[name][1]
    assert "600s" in rows[name][1]


async def test_history_survives_a_broker_restart(make: Factory, prefix: str, node: RabbitNode) -> None:
    before = make(history=HISTORY)
    positions = [await before.group_send("room:kept", {"type": "m", "i": i}) for i in range(5)]
    first = positions[0]
    assert first is not None
    await asyncio.to_thread(node.restart)
    after = make(history=HISTORY, timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            page = await after.group_history("room:kept", since=first)
            break
        except BackendUnavailable:
            # The AMQP port opens a moment before the node has recovered its
            # streams ("home node ... is down or inaccessible").
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
    assert page.recovered
    assert [m["i"] for m in page.messages] == [1, 2, 3, 4]
    assert page.position == positions[-1]
    # The layer that was connected across the restart goes on in the same epoch.
    again = make(history=HISTORY, timeout=60)
    nxt = await again.group_send("room:kept", {"type": "m", "i": 5})
    assert nxt is not None
    assert nxt.epoch == first.epoch
    assert nxt.offset > page.position.offset


async def test_a_stream_deleted_out_of_band_starts_a_new_epoch(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    sender, other = make(history=HISTORY), make(history=HISTORY)
    old = await sender.group_send("room:wiped", {"type": "m"})
    assert old is not None
    assert (await other.group_history("room:wiped")).position == old
    node.ctl("delete_queue", history_stream_name(prefix, "room:wiped"))
    new = await sender.group_send("room:wiped", {"type": "m", "after": True})
    assert new is not None
    assert new.epoch != old.epoch
    # An instance that only read before the wipe learns the new epoch too.
    page = await other.group_history("room:wiped", since=old)
    assert not page.recovered
    assert page.position == new
    assert [m.get("after") for m in page.messages] == [True]


async def _close_by_cancelled_rpc(layer: RabbitMQChannelLayer, stream: str) -> None:
    """Cancel an RPC in flight on the history channel, as a ``timeout`` does: aiormq closes the channel."""
    assert layer._history_channel is not None
    underlay = await layer._history_channel.get_underlay_channel()
    rpc = asyncio.ensure_future(underlay.queue_declare(stream, passive=True))
    await asyncio.sleep(0)
    rpc.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rpc


async def _close_by_the_broker(layer: RabbitMQChannelLayer, stream: str) -> None:
    """A channel error: the broker closes the history channel (404 on a passive declare)."""
    import aiormq.exceptions

    assert layer._history_channel is not None
    underlay = await layer._history_channel.get_underlay_channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await underlay.queue_declare(f"{stream}.missing", passive=True)


async def _close_and_fail_its_restore(layer: RabbitMQChannelLayer, stream: str) -> None:
    """The channel closes and aio-pika's own restore of it fails (as under load): it stays unrestored."""
    from aio_pika.robust_channel import RobustChannel

    with pytest.MonkeyPatch.context() as patch:
        fired = fail_once(patch, RobustChannel, "reopen", lambda channel: channel is layer._history_channel)
        await _close_by_the_broker(layer, stream)
        for _ in range(int(PATIENCE / 0.05)):
            if fired:
                break
            await asyncio.sleep(0.05)
        assert fired


@pytest.mark.parametrize(
    "close", [_close_by_cancelled_rpc, _close_by_the_broker, _close_and_fail_its_restore]
)
async def test_history_works_again_after_its_amqp_channel_closed(
    make: Factory,
    prefix: str,
    close: Callable[[RabbitMQChannelLayer, str], Awaitable[None]],
) -> None:
    layer, other = make(history=HISTORY, timeout=3), make(history=HISTORY)
    first = await layer.group_send("room:chan", {"type": "m", "i": 0})
    assert first is not None
    assert (await layer.group_history("room:chan")).position == first
    await close(layer, history_stream_name(prefix, "room:chan"))
    # Callers during the recovery may get BackendUnavailable; the layer must not stay broken.
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            sent = await layer.group_send("room:chan", {"type": "m", "i": 1})
            break
        except BackendUnavailable:
            assert time.monotonic() < deadline, "history writes never worked again"
            await asyncio.sleep(0.2)
    assert sent is not None
    assert sent.epoch == first.epoch
    page = await layer.group_history("room:chan", since=first)
    assert page.recovered
    assert page.position == sent
    # A write that failed during the recovery may have been stored all the same.
    assert {m["i"] for m in page.messages} == {1}
    # Its tap is back: writes by another instance and its own still get their offsets.
    theirs = await other.group_send("room:chan", {"type": "m", "i": 2})
    mine = await layer.group_send("room:chan", {"type": "m", "i": 3})
    assert theirs is not None
    assert mine is not None
    assert first.offset < sent.offset < theirs.offset < mine.offset
    page = await layer.group_history("room:chan", since=sent)
    assert [m["i"] for m in page.messages] == [2, 3]


_SENDER = """
import asyncio, json, sys
from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer

async def main():
    url, prefix = sys.argv[1], sys.argv[2]
    layer = RabbitMQChannelLayer(url=url, exchange_name=prefix, queue_prefix=prefix, history={"room:*": 200})
    offsets = [(await layer.group_send("room:procs", {"type": "m"})).offset for _ in range(25)]
    await layer.close()
    print(json.dumps(offsets))

asyncio.run(main())
"""


async def test_offsets_from_several_processes_are_unique_and_all_stored(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SENDER, node.url, prefix, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    here = make(history={"room:*": 200})
    mine = [await here.group_send("room:procs", {"type": "m"}) for _ in range(25)]
    outputs = [await proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    theirs = [json.loads(out) for out, _ in outputs]
    offsets = [p.offset for p in mine if p is not None] + [o for part in theirs for o in part]
    assert len(offsets) == 100
    assert len(set(offsets)) == 100
    for part in [[p.offset for p in mine if p is not None], *theirs]:
        assert part == sorted(part)
    page = await here.group_history("room:procs")
    assert page.recovered
    assert [m["_position"]["offset"] for m in page.messages] == sorted(offsets)


async def test_size_and_ttl_are_applied_to_what_the_stream_holds(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    layer = make(history={"tiny:*": 3, "short:*": {"size": 10, "ttl": 1}})
    sent = [await layer.group_send("tiny:1", {"type": "m", "i": i}) for i in range(6)]
    name = history_stream_name(prefix, "tiny:1")
    # The stream keeps more than `size` (retention drops whole segments) ... The broker's
    # message count lags behind what it stores (CI once read 1 of the 6), so wait for it.
    await eventually(
        lambda: int(queues(node, prefix)[name]["messages"] or 0) >= 6, "the stream's count to reach 6"
    )
    # ... and reads keep exactly the newest `size`.
    page = await layer.group_history("tiny:1")
    assert [m["i"] for m in page.messages] == [3, 4, 5]
    assert page.position == sent[-1]
    await layer.group_send("short:1", {"type": "m"})
    await asyncio.sleep(1.5)
    assert (await layer.group_history("short:1")).messages == []


async def test_repeated_reads_are_exact_and_answered_from_the_tap_without_a_scan(make: Factory) -> None:
    writer, reader = make(history=HISTORY), make(history=HISTORY)
    sent = [await writer.group_send("room:reads", {"type": "m", "i": i}) for i in range(5)]
    # The reader's tap starts after these five: its first read must scan back to them.
    sent.append(await reader.group_send("room:reads", {"type": "m", "i": 5}))
    scans = reader.history_scans
    page = await reader.group_history("room:reads", since=sent[1])
    assert [m["i"] for m in page.messages] == [2, 3, 4, 5]
    assert page.recovered
    assert reader.history_scans > scans
    scans = reader.history_scans
    for round_ in range(300):
        if round_ % 50 == 49:
            # Writes by another process between reads: the tap keeps up with them.
            sent.append(await writer.group_send("room:reads", {"type": "m", "i": len(sent)}))
        newest = sent[-1]
        assert newest is not None
        since = sent[round_ % len(sent)]
        assert since is not None
        page = await reader.group_history("room:reads", since=since)
        assert [m["_position"]["offset"] for m in page.messages] == [
            p.offset for p in sent if p is not None and p.offset > since.offset
        ]
        assert page.recovered
        assert page.position == newest
        whole = await reader.group_history("room:reads")
        assert [m["i"] for m in whole.messages] == list(range(len(sent)))
    channel = await reader.new_channel("ws")
    joined = await reader.group_add("room:reads", channel, since=sent[2])
    assert joined is not None
    assert [m["i"] for m in joined.messages] == list(range(3, len(sent)))
    assert joined.recovered
    assert reader.history_scans == scans


async def test_concurrent_reads_share_one_scan(make: Factory) -> None:
    writer, reader = make(history=HISTORY), make(history=HISTORY)
    sent = [await writer.group_send("room:many", {"type": "m", "i": i}) for i in range(5)]
    await reader.group_send("room:many", {"type": "m", "i": 5})  # the reader's tap starts late
    scans = reader.history_scans
    pages = await asyncio.gather(*(reader.group_history("room:many", since=sent[1]) for _ in range(20)))
    assert all([m["i"] for m in page.messages] == [2, 3, 4, 5] and page.recovered for page in pages)
    assert reader.history_scans == scans + 1


async def test_reads_past_the_size_are_exact_without_a_scan(make: Factory) -> None:
    writer, reader = make(history={"tiny:*": 3}), make(history={"tiny:*": 3})
    early = await writer.group_send("tiny:r", {"type": "m", "i": -1})
    await reader.group_send("tiny:r", {"type": "m", "i": 0})  # starts the reader's tap
    sent = [await writer.group_send("tiny:r", {"type": "m", "i": i}) for i in range(1, 8)]
    scans = reader.history_scans
    for _ in range(20):
        page = await reader.group_history("tiny:r", since=early)
        assert [m["i"] for m in page.messages] == [5, 6, 7]
        assert not page.recovered  # trimmed by size
        page = await reader.group_history("tiny:r", since=sent[3])
        assert [m["i"] for m in page.messages] == [5, 6, 7]
        assert page.recovered
        assert page.position == sent[-1]
    assert reader.history_scans == scans


async def test_reads_overtaken_by_concurrent_writes_need_no_scan(make: Factory) -> None:
    # Messages the tap handles between a read's mark and the read itself must not push what
    # the read needs out of the tap's recent entries: in the demo's churn soak every such
    # read scanned the stream, one scan at a time, and joins waited for over 30 s.
    writer, reader = make(history=HISTORY), make(history=HISTORY)
    await reader.group_send("room:busy", {"type": "m", "i": 0})  # starts the reader's tap
    for i in range(1, 60):
        await writer.group_send("room:busy", {"type": "m", "i": i})
    await reader.group_history("room:busy")
    scans = reader.history_scans

    async def write(i: int) -> None:
        await writer.group_send("room:busy", {"type": "m", "i": i})

    done = await asyncio.gather(
        *(reader.group_history("room:busy") for _ in range(20)), *(write(i) for i in range(60, 80))
    )
    for page in done[:20]:
        assert page is not None
        numbers = [m["i"] for m in page.messages]
        assert len(numbers) == 50
        assert numbers == list(range(numbers[0], numbers[0] + 50))
        assert page.position.offset == page.messages[-1]["_position"]["offset"]
    assert reader.history_scans == scans


async def test_the_tap_keeps_what_a_read_overtaken_by_newer_messages_needs(make: Factory) -> None:
    writer, reader = make(history=HISTORY), make(history=HISTORY)
    await reader.group_send("tiny:o", {"type": "m", "i": 0})  # starts the reader's tap
    sent = [await writer.group_send("tiny:o", {"type": "m", "i": i}) for i in range(1, 9)]
    await reader.group_history("tiny:o")  # returns once the tap has handled all of them
    stream = reader._streams["tiny:o"]
    fourth = sent[3]
    assert fourth is not None
    # A read whose mark came right after message 4, answered once the tap had handled
    # 5 to 8 (written meanwhile): the newest `size + 1` up to the mark, without a scan.
    held = stream.stored_up_to(fourth.offset - 1, 0)
    assert held is not None
    assert [reader.decode(entry.body)["i"] for entry in held] == [1, 2, 3, 4]


async def test_history_members_read_the_stream_and_leave_no_tap_behind(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    sender, receiver = make(history=HISTORY), make(history=HISTORY)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room:tap", channel)
    stream = history_stream_name(prefix, "room:tap")
    # Members of a history group are served by a tap on its stream, not by an inbox binding.
    assert (receiver.inbox_name, group_routing_key("room:tap")) not in bindings(node, prefix)
    assert taps(node, stream) == 1
    position = await sender.group_send("room:tap", {"type": "m"})
    assert position is not None
    assert await receiver.receive(channel, timeout=10) == {"type": "m", "_position": position.as_dict()}
    assert taps(node, stream) == 2  # the sender's tap reports its offsets
    await receiver.group_discard("room:tap", channel)
    await eventually(lambda: taps(node, stream) == 1, "the receiver's tap stopped")


async def test_named_members_of_a_history_group_get_every_message_with_its_position(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    early, admin = make(history=HISTORY), make(history=HISTORY)
    # `early` holds its tap from before the named member joined; `late` probes on its first use.
    first = await early.group_send("room:named", {"type": "m", "i": 0})
    assert first is not None
    await admin.group_add("room:named", "jobs.named")
    late = make(history=HISTORY)
    sent = [
        await early.group_send("room:named", {"type": "m", "i": 1}),
        await late.group_send("room:named", {"type": "m", "i": 2}),
    ]
    got = [await admin.receive("jobs.named", timeout=10) for _ in sent]
    assert got == [
        {"type": "m", "i": i, "_position": position.as_dict()}
        for i, position in enumerate(sent, 1)
        if position is not None
    ]
    with pytest.raises(TimeoutError):  # nothing else, the probes included
        await admin.receive("jobs.named", timeout=0.5)


async def test_a_plain_member_gets_no_extra_copy_when_named_members_are_gone(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    sender, receiver = make(history=HISTORY), make(history=HISTORY)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room:mixed", channel)
    await receiver.group_add("room:mixed", "jobs.mixed")
    await receiver.group_discard("room:mixed", "jobs.mixed")
    # The sender still publishes the named members' copy: nobody may get it twice.
    positions = [await sender.group_send("room:mixed", {"type": "m", "i": i}) for i in range(3)]
    got = [await receiver.receive(channel, timeout=10) for _ in positions]
    assert [m["_position"] for m in got] == [p.as_dict() for p in positions if p is not None]
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.5)


async def test_presence_events_reach_history_members_in_order_and_stay_out_of_pages(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    sender, receiver = make(history=HISTORY), make(history=HISTORY)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room:ev", channel)
    before = await sender.group_send("room:ev", {"type": "m", "i": 0})
    await sender.presence_join("room:ev", await sender.new_channel("ws"), {"user": "ann"})
    after = await sender.group_send("room:ev", {"type": "m", "i": 1})
    got = [await receiver.receive(channel, timeout=10) for _ in range(3)]
    assert [m["type"] for m in got] == ["m", "presence.joined", "m"]
    assert [got[0]["_position"], got[2]["_position"]] == [p.as_dict() for p in (before, after) if p]
    assert "_position" not in got[1]
    page = await receiver.group_history("room:ev")
    assert [m["i"] for m in page.messages] == [0, 1]


@pytest.mark.parametrize(
    "close", [_close_by_cancelled_rpc, _close_by_the_broker, _close_and_fail_its_restore]
)
async def test_members_miss_nothing_while_their_tap_is_replaced(
    make: Factory,
    prefix: str,
    close: Callable[[RabbitMQChannelLayer, str], Awaitable[None]],
) -> None:
    sender, receiver = make(history=HISTORY), make(history=HISTORY, timeout=3)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room:lost", channel)
    sent = [await sender.group_send("room:lost", {"type": "m", "i": 0})]
    # Sends go on while the receiver's history channel closes and its tap comes back.
    closing = asyncio.ensure_future(close(receiver, history_stream_name(prefix, "room:lost")))
    while not closing.done() or len(sent) < 20:
        sent.append(await sender.group_send("room:lost", {"type": "m", "i": len(sent)}))
    await closing
    got = [await receiver.receive(channel, timeout=PATIENCE) for _ in sent]
    assert [m["_position"] for m in got] == [p.as_dict() for p in sent if p is not None]
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.5)


async def test_members_follow_a_deleted_stream_into_its_new_epoch(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    sender, receiver = make(history=HISTORY), make(history=HISTORY)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room:gone", channel)
    old = await sender.group_send("room:gone", {"type": "m", "i": 0})
    assert old is not None
    assert (await receiver.receive(channel, timeout=10))["_position"] == old.as_dict()
    node.ctl("delete_queue", history_stream_name(prefix, "room:gone"))
    new = await sender.group_send("room:gone", {"type": "m", "i": 1})
    assert new is not None
    assert new.epoch != old.epoch
    assert await receiver.receive(channel, timeout=PATIENCE) == {
        "type": "m",
        "i": 1,
        "_position": new.as_dict(),
    }


# ------------------------------------------------------------- no secrets


@pytest.fixture(scope="module")
def secret_user(rabbitmq_node: RabbitNode) -> str:
    """A user of the test node whose password is ``SECRET``; returns its name."""
    user = "fw-" + uuid.uuid4().hex[:8]
    rabbitmq_node.ctl("add_user", user, SECRET)
    rabbitmq_node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    return user


def assert_layer_keeps_secret(
    layer: RabbitMQChannelLayer, caplog: pytest.LogCaptureFixture, *errors: BaseException
) -> None:
    assert_no_secret(errors=errors, records=caplog.records, objects=[layer, layer.stats])
    assert SECRET not in caplog.text  # every record as it was formatted when logged
    assert SECRET not in str(layer.stats)


async def test_no_secret_when_the_connection_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    layer = RabbitMQChannelLayer(url=f"amqp://user:{SECRET}@127.0.0.1:{free_port()}/", timeout=2)
    with pytest.raises(BackendUnavailable, match=r"RabbitMQ is unreachable at 127\.0\.0\.1") as info:
        await layer.send("anything", {"type": "x"})
    assert_layer_keeps_secret(layer, caplog, info.value)
    await layer.close()


async def test_no_secret_when_authentication_fails(
    rabbitmq_node: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    layer = RabbitMQChannelLayer(url=f"amqp://guest:{SECRET}@127.0.0.1:{rabbitmq_node.port}/", timeout=5)
    # Not BackendUnavailable ("retry later"): a wrong password stays wrong.
    with pytest.raises(
        InvalidChannelLayerConfig, match=r"ACCESS_REFUSED - Login was refused.*password"
    ) as info:
        await layer.send("anything", {"type": "x"})
    assert_layer_keeps_secret(layer, caplog, info.value)
    await layer.close()


async def test_no_secret_when_the_broker_never_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with silent_server() as port:
        layer = RabbitMQChannelLayer(url=f"amqp://user:{SECRET}@127.0.0.1:{port}/", timeout=0.5)
        with pytest.raises(BackendUnavailable, match=r"no answer within 0\.5 s") as info:
            await layer.receive("anything", timeout=30)
        assert_layer_keeps_secret(layer, caplog, info.value)
        await layer.close()


async def test_no_secret_when_the_broker_goes_away_mid_operation(
    rabbitmq_node: RabbitNode, secret_user: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with TcpProxy(rabbitmq_node.port) as proxy:
        layer = RabbitMQChannelLayer(
            url=f"amqp://{secret_user}:{SECRET}@127.0.0.1:{proxy.port}/",
            exchange_name=prefix,
            queue_prefix=prefix,
            # Long enough for a loaded machine to connect and declare a quorum queue
            # before the cut (1 s failed there); after it, each call waits this long.
            timeout=10,
        )
        await layer.send("before.cut", {"type": "x"})
        assert (await layer.receive("before.cut", timeout=10))["type"] == "x"
        waiting = asyncio.create_task(layer.receive("after.cut"))
        named = named_queue_name(prefix, "after.cut")
        await eventually(lambda: named in consumers(rabbitmq_node, prefix), "consumer started")
        await proxy.cut()
        with pytest.raises(BackendUnavailable) as sent:
            await layer.send("after.cut", {"type": "y"})
        with pytest.raises(BackendUnavailable) as added:
            await layer.group_add("cut-group", await layer.new_channel())
        assert not waiting.done()  # still waiting for the broker to come back
        await layer.close()
        with pytest.raises(ChannelLayerClosed):
            await waiting
        assert_layer_keeps_secret(layer, caplog, sent.value, added.value)


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@127.0.0.1:5672/",
        f"amqp://user:{SECRET}@127.0.0.1:port/",
        f"amqp://user:{SECRET}@127.0.0.1:99999/",
    ],
)
def test_a_malformed_url_is_refused_at_construction_without_the_secret(url: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match="url") as info:
        RabbitMQChannelLayer(url=url)
    assert_no_secret(errors=[info.value])
    with pytest.raises(InvalidChannelLayerConfig, match="url") as info:
        get_channel_layer_from_env(
            {"FASTAPI_WEBSOCKETS_BACKEND": "rabbitmq", "FASTAPI_WEBSOCKETS_RABBITMQ_URL": url}
        )
    assert_no_secret(errors=[info.value])


def test_repr_names_the_broker_without_the_secret() -> None:
    layer = RabbitMQChannelLayer(url=f"amqp://user:{SECRET}@broker.example:5673/app")
    assert repr(layer) == "<RabbitMQChannelLayer broker.example:5673 open>"
    assert RabbitMQChannelLayer(url="amqp://broker.example/").where == "broker.example:5672"


# ---------------------------------------------------------------- presence


async def test_presence_queues_exist_only_while_used_and_hold_nothing(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    plain, owner, viewer = make(), make(), make()
    await plain.group_add("room:p", await plain.new_channel("ws"))
    assert not [name for name in queues(node, prefix) if ".pr." in name or name.endswith(".presence")]

    alice = await owner.new_channel("ws")
    await owner.presence_join("room:p", alice, {"user": "alice"}, notify=False)
    assert await viewer.presence("room:p") == {alice: {"user": "alice"}}
    present = queues(node, prefix)
    replicas = {f"{prefix}.pr.{owner.client_token}", f"{prefix}.pr.{viewer.client_token}"}
    assert replicas | {f"{prefix}.presence"} == {n for n in present if ".pr." in n or n.endswith(".presence")}
    assert present[f"{prefix}.presence"]["consumers"] == "2"  # the roster: one consumer per participant
    assert (f"{prefix}.pr.{owner.client_token}", "presence") in bindings(node, prefix)
    # Entries live in the processes' replicas: the broker keeps no message for them.
    await eventually(
        lambda: all(queues(node, prefix)[name]["messages"] == "0" for name in replicas),
        "presence queues drained",
    )

    await owner.presence_leave("room:p", alice, notify=False)
    assert await viewer.presence("room:p") == {}
    await owner.close()
    await viewer.close()
    await eventually(
        lambda: not [name for name in queues(node, prefix) if ".pr." in name],
        "replica queues gone with their layers",
    )
    assert queues(node, prefix)[f"{prefix}.presence"]["consumers"] == "0"  # and it expires by x-expires


async def test_presence_heartbeat_is_one_message_whatever_the_members(
    make: Factory, prefix: str, node: RabbitNode
) -> None:
    import aio_pika

    # A long timeout: the background beat runs once at the first join, then sleeps.
    small, large = make(presence_timeout=300), make(presence_timeout=300)
    await small.presence_join("room:h", await small.new_channel("ws"), notify=False)
    for i in range(1000):
        await large.presence_join(f"room:h{i % 10}", await large.new_channel("ws"), notify=False)

    connection = await aio_pika.connect(node.url)
    try:
        channel = await connection.channel()
        observer = await channel.declare_queue(exclusive=True)
        await observer.bind(prefix, "presence")
        counts = []
        for layer in (small, large):
            await layer.presence_heartbeat()
            await small.presence("room:h")  # a barrier: the beat has been routed
            seen = []
            while (message := await observer.get(no_ack=True, fail=False)) is not None:
                seen.append((message.type, message.headers["o"]))
            counts.append(seen)
        assert counts == [[("presence.beat", small.client_token)], [("presence.beat", large.client_token)]]
    finally:
        await connection.close()


async def test_presence_survives_a_broker_restart(make: Factory, node: RabbitNode) -> None:
    owner, viewer = make(timeout=60, presence_timeout=1.5), make(timeout=60, presence_timeout=1.5)
    mine = {await owner.new_channel("ws"): {"i": i} for i in range(50)}
    for channel, info in mine.items():
        await owner.presence_join("room:r", channel, info, notify=False)
    theirs = await viewer.new_channel("ws")
    await viewer.presence_join("room:r", theirs, {"viewer": True}, notify=False)
    expected = {**mine, theirs: {"viewer": True}}
    assert await viewer.presence("room:r") == expected

    await asyncio.to_thread(node.restart)
    deadline = time.monotonic() + 60
    while True:
        try:
            if await viewer.presence("room:r") == expected and await owner.presence("room:r") == expected:
                break
        except BackendUnavailable:
            pass
        assert time.monotonic() < deadline, "every live process's entries are back"
        await asyncio.sleep(0.5)
    # And the replicas follow changes again.
    gone = next(iter(mine))
    await owner.presence_leave("room:r", gone, notify=False)
    assert gone not in await viewer.presence("room:r")


async def test_a_foreign_leave_reaches_the_owner(make: Factory) -> None:
    owner, other = make(), make()
    alice = await owner.new_channel("ws")
    await owner.presence_join("room:f", alice, {"user": "alice"}, notify=False)
    await other.presence_leave("room:f", alice, notify=False)
    assert await other.presence("room:f") == {}
    deadline = time.monotonic() + 10
    while await owner.presence("room:f"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await owner.presence_heartbeat()  # the owner does not store it again
    assert await other.presence("room:f") == {}


async def test_a_dead_owner_is_announced_once_by_three_racing_reapers(make: Factory) -> None:
    dead = make(presence_timeout=2)
    # The survivors own no entries, so no background beat of theirs runs: the test beats for
    # them, all three at once. (With entries and beats of their own, a loaded machine made
    # them reap each other: 2 of 20 runs announced a survivor's own entry as left.)
    survivors = [make(presence_timeout=2) for _ in range(3)]
    watchers = []
    for layer in survivors:
        watcher = await layer.new_channel("ws")
        await layer.group_add("room:d", watcher)
        assert await layer.presence("room:d") == {}  # a participant from here on
        watchers.append(watcher)
    theirs = [await dead.new_channel("ws") for _ in range(3)]
    for channel in theirs:
        await dead.presence_join("room:d", channel, {"dead": True}, notify=False)
    for layer in survivors:
        assert set(await layer.presence("room:d")) == set(theirs)

    # The process vanishes without a word: its connection is gone, its beats stop.
    assert dead._connection is not None
    await dead._connection.close()

    async def silent_to_all() -> bool:
        seen = [await layer.presence("room:d") for layer in survivors]
        return not any(seen)

    await eventually(silent_to_all, "every survivor finds the dead owner silent")
    # Every survivor's reap now drops it: three reapers at once, one announcement each.
    await asyncio.gather(*(layer.presence_heartbeat() for layer in survivors))
    # Published after every announcement was confirmed: behind them in every inbox.
    await survivors[0].group_send("room:d", {"type": "mark"})
    for layer, watcher in zip(survivors, watchers, strict=True):
        left = []
        while (event := await layer.receive(watcher, timeout=30))["type"] != "mark":
            assert event["type"] == "presence.left"
            left.append(event["channel"])
        assert sorted(left) == sorted(theirs)  # each leave once, though three processes reaped
        assert await layer.presence("room:d") == {}


def count_beats(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the presence beats the broker confirmed, by the beating layer's client token."""
    real = RabbitPresence.beat
    counts: dict[str, int] = {}

    async def counted(self: RabbitPresence) -> bool:
        lost = await real(self)
        counts[self.token] = counts.get(self.token, 0) + 1
        return lost

    monkeypatch.setattr(RabbitPresence, "beat", counted)
    return counts


async def test_a_stalled_reaper_reads_the_beats_waiting_for_it_before_judging_a_peer(
    node: RabbitNode, prefix: str, make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The live peer runs on its own event loop (a thread), so it keeps beating while the
    # reaper's loop is stalled the way a loaded process's is: its beats wait, unread, in
    # the reaper's socket. Reaping on what it had read announced the live peer's members
    # as gone.
    timeout = 2.0
    ready, stop, beats = threading.Event(), threading.Event(), count_beats(monkeypatch)
    theirs: list[str] = []
    peer = RabbitMQChannelLayer(
        url=node.url, exchange_name=prefix, queue_prefix=prefix, presence_timeout=timeout
    )

    async def live_peer() -> None:
        try:
            for _ in range(3):
                theirs.append(await peer.new_channel("ws"))
                await peer.presence_join("room:s", theirs[-1], {"live": True}, notify=False)
            ready.set()
            await asyncio.to_thread(stop.wait)
        finally:
            await peer.close()

    peer_thread = asyncio.create_task(asyncio.to_thread(asyncio.run, live_peer()))
    try:
        await asyncio.to_thread(ready.wait)
        reaper = make(presence_timeout=timeout)
        watcher = await reaper.new_channel("ws")
        await reaper.group_add("room:s", watcher)
        assert set(await reaper.presence("room:s")) == set(theirs)

        # Stalled past the timeout, and until the peer has beaten meanwhile (never reading).
        stalled_at, beaten = time.monotonic(), beats.get(peer.client_token, 0)
        while time.monotonic() - stalled_at <= timeout or beats.get(peer.client_token, 0) == beaten:
            time.sleep(0.05)  # noqa: ASYNC251 - the stall is the point
        await reaper.presence_heartbeat()

        await reaper.group_send("room:s", {"type": "mark"})
        events = []
        while (event := await reaper.receive(watcher, timeout=30))["type"] != "mark":
            events.append(event)
        assert events == []  # no live member announced as gone
        assert set(await reaper.presence("room:s")) == set(theirs)
    finally:
        stop.set()
        await peer_thread


async def test_a_process_keeps_beating_while_its_reaping_is_stuck_in_a_claim(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Claims on a loaded broker can take seconds. The next beat used to wait for the reap
    # before it, so a process stuck claiming a dead one went silent and was announced gone.
    timeout = 2.0
    dead, busy, viewer = (make(presence_timeout=timeout) for _ in range(3))
    stuck, release, beats = asyncio.Event(), asyncio.Event(), count_beats(monkeypatch)
    real_claim = RabbitPresence._claim

    async def slow_claim(self: RabbitPresence, token: str, version: int) -> bool:
        if self.layer is busy:
            stuck.set()
            await release.wait()
        return await real_claim(self, token, version)

    monkeypatch.setattr(RabbitPresence, "_claim", slow_claim)
    watcher = await viewer.new_channel("ws")
    await viewer.group_add("room:b", watcher)
    assert await viewer.presence("room:b") == {}  # a participant from here on (no beats of its own)
    await dead.presence_join("room:b", await dead.new_channel("ws"), notify=False)
    mine = [await busy.new_channel("ws") for _ in range(2)]
    for channel in mine:
        await busy.presence_join("room:b", channel, {"busy": True}, notify=False)
    assert set(mine) <= set(await viewer.presence("room:b"))

    assert dead._connection is not None
    await dead._connection.close()
    try:
        await eventually(stuck.is_set, "the busy process's reaping claims the dead one")
        stuck_at = time.monotonic()
        await eventually(lambda: time.monotonic() - stuck_at > timeout, "a timeout spent stuck")
        beaten = beats[busy.client_token]
        await eventually(
            lambda: beats[busy.client_token] > beaten, "the busy process beats while its reaping is stuck"
        )
        await viewer.presence_heartbeat()  # the viewer reaps: the dead process, not the busy one
        await viewer.group_send("room:b", {"type": "mark"})
        left = []
        while (event := await viewer.receive(watcher, timeout=30))["type"] != "mark":
            left.append(event["channel"])
        assert not set(left) & set(mine)
        assert set(mine) <= set(await viewer.presence("room:b"))
    finally:
        release.set()


async def test_close_without_the_broker_waits_for_one_removal_not_one_per_entry(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # close() leaves presence entry by entry; with the broker gone each removal waited out
    # `timeout` for a connection (3 entries: 30 s, a close with 1,000: hours). After the
    # first, the others are left to expire as a dead process's entries do.
    layer = make()
    for _ in range(3):
        await layer.presence_join("room:c", await layer.new_channel("ws"), notify=False)
    assert layer._connection is not None
    await layer._connection.close()
    await layer.close()
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if m.startswith("could not remove presence of")]) == 1
    assert "did not try to remove 2 more presence entries on close" in "\n".join(messages)


# ----------------------------------------------------------- batched publishes


async def test_concurrent_sends_share_writes_and_keep_each_senders_order(make: Factory) -> None:
    # Four receiving instances: sends to one inbox also travel packed (below),
    # sends to different inboxes share socket writes.
    receivers, sender = [make(capacity=1000) for _ in range(4)], make()
    channels = [await receiver.new_channel() for receiver in receivers]
    for receiver, channel in zip(receivers, channels, strict=True):
        await sender.send(channel, {"type": "warm", "task": -1, "i": -1})
        await receiver.receive(channel, timeout=10)
    before = (sender.publishes, sender.publish_writes)

    async def sends(task: int) -> None:
        for i in range(10):
            await sender.send(channels[task % 4], {"type": "n", "task": task, "i": i})

    await asyncio.gather(*(sends(task) for task in range(16)))
    for index, (receiver, channel) in enumerate(zip(receivers, channels, strict=True)):
        got = [await receiver.receive(channel, timeout=10) for _ in range(40)]
        for task in range(index, 16, 4):
            assert [m["i"] for m in got if m["task"] == task] == list(range(10))
    publishes, writes = sender.publishes - before[0], sender.publish_writes - before[1]
    assert publishes < 160  # packed: concurrent sends to one inbox share AMQP messages
    assert writes < publishes  # sends to the four inboxes at once: some publishes shared a write


@pytest.mark.parametrize("durable", [True, False], ids=["quorum", "classic"])
async def test_concurrent_sends_to_a_full_channel_each_get_their_own_answer(
    make: Factory, durable: bool
) -> None:
    # Acks and nacks of one batch come back together (often as one `multiple`
    # frame): each send must get its own, so exactly `capacity` are accepted.
    # A quorum queue checks its length against what it applied, so the layer
    # keeps one send in flight per quorum queue (12 of 12 got in without).
    sender = make(capacity=5, durable=durable)
    results = await asyncio.gather(
        *(sender.send("full.batch", {"type": "n", "i": i}) for i in range(12)), return_exceptions=True
    )
    assert sum(result is None for result in results) == 5
    assert all(result is None or isinstance(result, ChannelFull) for result in results)
    kept = sorted([(await sender.receive("full.batch", timeout=10))["i"] for _ in range(5)])
    assert len(set(kept)) == 5
    with pytest.raises(TimeoutError):
        await sender.receive("full.batch", timeout=0.5)


# ------------------------------------------------------------ wire

PROPERTY_SETS = [
    {},
    {"message_type": "sends", "expiration": "86400000", "delivery_mode": 1, "message_id": "a" * 32},
    {
        "message_type": "send",
        "headers": {"channel": "room.ab!c", "n": 5, "f": 1.5, "ok": True, "list": [1, "x"]},
        "delivery_mode": 2,
        "message_id": "\u00e9" * 10,
        "correlation_id": "c",
        "reply_to": "r",
    },
    {"content_type": "application/json", "headers": {}, "priority": 9, "user_id": "guest", "app_id": "a"},
    {"message_type": "group", "headers": {"group": "g" * 200}, "expiration": "", "message_id": ""},
]


@pytest.mark.parametrize("properties", PROPERTY_SETS)
def test_a_publish_is_written_as_the_frames_pamqp_makes(properties: dict[str, object]) -> None:
    # The publisher marshals publishes itself (cached method frames, its own
    # content header and body frames): byte for byte what pamqp writes.
    import pamqp.frame
    from pamqp import commands
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    from fastapi_websockets.backends import rabbitmq_wire

    class FakeChannel:  # what _marshal reads of an aiormq channel
        number = 7
        max_content_size = 1000

    channel = cast(Any, FakeChannel)
    props = commands.Basic.Properties(**properties)  # type: ignore[arg-type]
    for body in (b"", b"x" * 10, bytes(range(256)) * 10):
        for mandatory in (False, True):
            publish = rabbitmq_wire._Publish(
                channel, "ex", "p.token", body, props, mandatory, cast(Any, None), None
            )
            method = commands.Basic.Publish(exchange="ex", routing_key="p.token", mandatory=mandatory)
            expected = [
                pamqp.frame.marshal(method, 7),
                pamqp.frame.marshal(ContentHeader(body_size=len(body), properties=props), 7),
            ]
            expected += [
                pamqp.frame.marshal(ContentBody(body[i : i + 1000]), 7) for i in range(0, len(body), 1000)
            ]
            assert rabbitmq_wire._marshal(channel, publish) == b"".join(expected)


def _frames_read(data: bytes, receiver_class: Any, count: int) -> list[Any]:
    async def read() -> list[Any]:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        receiver = receiver_class(stream)
        frames: list[Any] = []
        for _ in range(count):
            try:
                frames.append(await receiver.get_frame())
            except Exception as exc:
                frames.append(exc)
                break
        return frames

    return asyncio.run(read())


def _described(item: Any) -> Any:
    # A frame as the tuple of its attribute values, to compare pamqp's objects field by field.
    from pamqp import body, header

    if isinstance(item, BaseException):
        return (type(item), str(item))
    size, number, frame = item
    if isinstance(frame, header.ContentHeader):
        values: Any = (frame.class_id, frame.weight, frame.body_size)
        values += tuple(getattr(frame.properties, name) for name in frame.properties.__slots__)
    elif isinstance(frame, body.ContentBody):
        values = frame.value
    else:
        values = tuple(getattr(frame, name) for name in frame.__slots__)
    return (size, number, type(frame), values)


def test_the_frame_reader_reads_what_aiormqs_reads() -> None:
    # FrameReader decodes deliveries, content headers and bodies and confirms
    # itself: the same pamqp objects as aiormq's receiver, attribute for
    # attribute; any other frame, and what is malformed, goes through pamqp.
    import datetime

    import pamqp.frame
    from pamqp import body, commands, header

    from fastapi_websockets.backends.rabbitmq_wire import _AIORMQ_FRAME_RECEIVER as FrameReceiver
    from fastapi_websockets.backends.rabbitmq_wire import FrameReader

    every = commands.Basic.Properties(
        content_type="application/x", content_encoding="gzip", headers={"channel": "a.b!c", "n": 3},
        delivery_mode=2, priority=4, correlation_id="é", reply_to="r", expiration="60000",
        message_id="0" * 32, timestamp=datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc),
        message_type="send", user_id="guest", app_id="app",
    )  # fmt: skip
    frames: list[tuple[Any, int]] = [
        (commands.Basic.Deliver(consumer_tag="fw-i-x", delivery_tag=7, exchange="e", routing_key="p.x"), 1),
        (commands.Basic.Deliver(consumer_tag="", delivery_tag=2**40, redelivered=True, routing_key="ü"), 9),
        (header.ContentHeader(0, 600, commands.Basic.Properties(message_type="sends", delivery_mode=1)), 1),
        (header.ContentHeader(0, 5, every), 1),
        (header.ContentHeader(0, 0, commands.Basic.Properties()), 1),
        (body.ContentBody(b"x" * 600), 1),
        (commands.Basic.Ack(delivery_tag=9), 2),
        (commands.Basic.Ack(delivery_tag=12, multiple=True), 2),
        (commands.Basic.Nack(delivery_tag=3, multiple=True, requeue=False), 2),
        (commands.Basic.ConsumeOk(consumer_tag="fw-i-x"), 1),
    ]
    data = b"".join(pamqp.frame.marshal(frame, number) for frame, number in frames)
    expected = [_described(item) for item in _frames_read(data, FrameReceiver, len(frames))]
    assert [_described(item) for item in _frames_read(data, FrameReader, len(frames))] == expected
    assert all(not isinstance(item, BaseException) for item in expected)
    # Malformed: the frame end byte wrong, an empty body frame, a stream cut short
    # (each an error), a routing key whose length overruns the frame (read alike).
    deliver = pamqp.frame.marshal(frames[0][0], 1)
    for bad in (deliver[:-1] + b"\x00", b"\x03\x00\x01\x00\x00\x00\x00\xce", deliver[:-3]):
        expected = [_described(item) for item in _frames_read(bad, FrameReceiver, 1)]
        assert isinstance(_frames_read(bad, FrameReceiver, 1)[0], BaseException)
        assert [_described(item) for item in _frames_read(bad, FrameReader, 1)] == expected
    overrun = deliver[:-5] + b"\x0a" + deliver[-4:]
    expected = [_described(item) for item in _frames_read(overrun, FrameReceiver, 1)]
    assert [_described(item) for item in _frames_read(overrun, FrameReader, 1)] == expected


async def test_connections_read_frames_with_the_frame_reader(make: Factory) -> None:
    # frames_read_by_the_layer relies on aiormq internals: Connection.connect builds
    # its receiver from aiormq.connection.FrameReceiver and its reader task
    # iterates it. Should aiormq change that, this fails.

    from fastapi_websockets.backends.rabbitmq_wire import FrameReader

    layer = make()
    channel = await layer.new_channel()
    await layer.send(channel, {"x": 1})
    assert layer._connection is not None
    transport = layer._connection.transport
    assert transport is not None
    assert type(_receiver_of(transport.connection)) is FrameReader


def _receiver_of(connection: Any) -> object:
    """The frame receiver an aiormq connection's reader task iterates."""
    coroutine = cast("types.CoroutineType[Any, Any, Any]", connection._reader_task.get_coro())
    assert coroutine.cr_frame is not None  # suspended, reading
    return coroutine.cr_frame.f_locals["frame_receiver"]


async def test_other_aiormq_connections_keep_aiormqs_frame_receiver(make: Factory, node: RabbitNode) -> None:
    # The layer's reader is chosen per connection: an aiormq connection that other code
    # opens in the same process, after a layer connected, reads as aiormq reads.
    import aiormq

    from fastapi_websockets.backends.rabbitmq_wire import _AIORMQ_FRAME_RECEIVER, FrameReader

    layer = make()
    await layer.send(await layer.new_channel(), {"x": 1})
    connection = await aiormq.connect(node.url)
    try:
        assert type(_receiver_of(connection)) is _AIORMQ_FRAME_RECEIVER
    finally:
        await connection.close()
    assert layer._connection is not None
    assert layer._connection.transport is not None
    assert type(_receiver_of(layer._connection.transport.connection)) is FrameReader


def test_a_property_pamqp_cannot_encode_fails_alike() -> None:
    from pamqp import commands

    from fastapi_websockets.backends import rabbitmq_wire

    with pytest.raises(TypeError):
        rabbitmq_wire._header_frame(1, 0, commands.Basic.Properties(message_type="x" * 256))


async def test_inbox_deliveries_are_all_acked_in_shared_frames(make: Factory, node: RabbitNode) -> None:
    # Acks wait a few milliseconds to share a frame; none may be left behind.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    for i in range(30):
        await sender.send(channel, {"i": i})
        assert (await receiver.receive(channel, timeout=10))["i"] == i
    acks = receiver._acks
    assert acks is not None
    assert acks.acked >= 30

    def none_unacked() -> bool:
        rows = node.rows("list_queues", "name", "messages_unacknowledged")
        return [row[1] for row in rows if row[0] == receiver.inbox_name] == ["0"]

    await eventually(none_unacked, "every inbox delivery acked")
    assert acks.frames <= acks.acked


def _handing_tasks(receiver: RabbitMQChannelLayer) -> list[str]:
    """The name of the task each of the receiver's later local deliveries runs in, as they come."""
    deliver_local = receiver.deliver_local
    names: list[str] = []

    def spy(name: str, message: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        names.append(str(task.get_coro().__qualname__))  # type: ignore[union-attr]
        return deliver_local(name, message)

    receiver.deliver_local = spy  # type: ignore[method-assign,assignment]
    return names


async def test_inbox_deliveries_are_handed_out_by_the_channel_reader(make: Factory) -> None:
    # A delivery that finds frames of its channel queued goes through the queue, and
    # take_deliveries relies on aiormq internals there (the channel's reader calls the
    # channel's _on_deliver_frame for each delivery). Should aiormq stop doing so, the
    # deliveries would come through the consumer callback, a task each: this fails.
    import aiormq

    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"i": -1})
    assert (await receiver.receive(channel, timeout=10))["i"] == -1
    assert receiver._channel is not None
    assert receiver._inbox_tag is not None
    underlay = cast("aiormq.Channel", await receiver._channel.get_underlay_channel())
    callback = underlay.consumers[receiver._inbox_tag]
    in_tasks: list[object] = []

    async def spy(message: Any) -> Any:
        in_tasks.append(message)
        return await callback(message)

    underlay.consumers[receiver._inbox_tag] = spy
    # As if frames of the channel were always queued when a delivery comes: every
    # delivery takes the queue (the queue itself is left as it is).
    deliveries = underlay.frames.put.__self__  # type: ignore[attr-defined]
    deliveries._queue = types.SimpleNamespace(empty=lambda: False)
    handed_in = _handing_tasks(receiver)
    for i in range(5):
        await sender.send(channel, {"i": i})
        assert (await receiver.receive(channel, timeout=10))["i"] == i
    assert in_tasks == []
    assert handed_in == ["Channel._reader"] * 5


async def test_inbox_deliveries_are_handed_out_by_the_connection_reader(make: Factory) -> None:
    # take_deliveries takes a delivery's frames as aiormq's connection reader puts them
    # on the channel's queue (it looks ``frames.put`` up on the queue instance). Should
    # aiormq stop doing so, the channel's reader task would hand them out: this fails.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"i": -1})
    assert (await receiver.receive(channel, timeout=10))["i"] == -1
    handed_in = _handing_tasks(receiver)
    for i in range(5):
        await sender.send(channel, {"i": i})
        assert (await receiver.receive(channel, timeout=10))["i"] == i
    assert handed_in == ["Connection.__reader"] * 5


async def test_publisher_confirms_are_handled_by_the_connection_reader(make: Factory) -> None:
    # take_deliveries passes a confirm that finds the confirm channel's queue empty to
    # aiormq's _on_confirm_frame from the connection's reader, a loop turn before the
    # channel's reader would. Without that step the channel's reader handles them: this fails.
    import aiormq

    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"i": -1})
    assert (await receiver.receive(channel, timeout=10))["i"] == -1
    assert sender._channel is not None
    underlay = cast("aiormq.Channel", await sender._channel.get_underlay_channel())
    on_confirm = underlay._on_confirm_frame
    names: list[str] = []

    async def spy(frame: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        names.append(str(task.get_coro().__qualname__))  # type: ignore[union-attr]
        await on_confirm(frame)

    underlay._on_confirm_frame = spy  # type: ignore[method-assign]
    for i in range(5):
        await sender.send(channel, {"i": i})
        assert (await receiver.receive(channel, timeout=10))["i"] == i
    assert names == ["Connection.__reader"] * 5


async def test_an_inbox_delivery_of_several_body_frames_is_handed_out_whole(make: Factory) -> None:
    # Above the broker's frame_max (128 KiB) a body comes in several frames; the
    # connection reader's hand-out joins them, in order.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    text = "".join(chr(ord("a") + i % 26) for i in range(300_000))
    for i in range(3):
        await sender.send(channel, {"i": i, "text": text})
    for i in range(3):
        message = await receiver.receive(channel, timeout=10)
        assert (message["i"], message["text"]) == (i, text)


# ------------------------------------------------------------ packed sends


async def test_sends_of_one_loop_turn_after_a_lone_one_are_one_amqp_message(make: Factory) -> None:
    # The first of senders woken together used to go out alone and the rest a
    # turn later, packed: two messages a round. Counted as the receiver's inbox
    # deliveries, i.e. the AMQP messages the broker delivered.
    receiver, sender = make(capacity=1000), make()
    channels = [await receiver.new_channel() for _ in range(16)]
    await sender.send(channels[0], {"type": "lone"})
    await receiver.receive(channels[0], timeout=10)
    acks = receiver._acks
    assert acks is not None
    delivered, published = acks.acked, sender.publishes
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i, channel in enumerate(channels)))
    assert [(await receiver.receive(channel, timeout=10))["i"] for channel in channels] == list(range(16))
    assert (acks.acked - delivered, sender.publishes - published) == (1, 1)
    assert (sender.packed_publishes, sender.packed_sends) == (1, 16)


async def test_a_lone_senders_next_send_is_handed_over_before_the_next_loop_turn(make: Factory) -> None:
    # The first send waits a loop turn for others to go with it; once a task's
    # send found nobody, its next one (nothing in flight) is written at once.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    for i in range(2):
        await sender.send(channel, {"i": i})
    seen: list[int] = []
    asyncio.get_running_loop().call_soon(lambda: seen.append(sender.publishes))
    before = sender.publishes
    await sender.send(channel, {"i": 2})
    assert seen == [before + 1]
    assert [(await receiver.receive(channel, timeout=10))["i"] for _ in range(3)] == [0, 1, 2]


async def test_a_closed_loop_of_sixteen_senders_is_one_amqp_message_a_round(make: Factory) -> None:
    # Each round's senders are woken by one confirm, in one loop turn: none may
    # go out alone, or the round splits in two and stays split.
    receiver, sender = make(capacity=1000), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "lone", "task": -1, "i": -1})
    await receiver.receive(channel, timeout=10)
    published, packed = sender.publishes, sender.packed_publishes

    async def sends(task: int) -> None:
        for i in range(10):
            await sender.send(channel, {"type": "n", "task": task, "i": i})

    await asyncio.gather(*(sends(task) for task in range(16)))
    assert (sender.publishes - published, sender.packed_publishes - packed) == (10, 10)
    got = [await receiver.receive(channel, timeout=10) for _ in range(160)]
    for task in range(16):
        assert [m["i"] for m in got if m["task"] == task] == list(range(10))


async def test_a_cancelled_queued_send_is_withdrawn_and_the_others_still_arrive(make: Factory) -> None:
    receiver, sender = make(capacity=1000), make()
    channels = [await receiver.new_channel() for _ in range(16)]
    await sender.send(channels[0], {"type": "warm"})
    await receiver.receive(channels[0], timeout=10)
    tasks = [asyncio.ensure_future(sender.send(channel, {"i": i})) for i, channel in enumerate(channels)]
    await asyncio.sleep(0)  # each task ran up to its wait: the first holds the turn, the others queued
    for i in (13, 15):
        tasks[i].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [i for i, result in enumerate(results) if result is not None] == [13, 15]
    assert sender.packed_publishes >= 1
    kept = [i for i in range(16) if i not in (13, 15)]
    assert [(await receiver.receive(channels[i], timeout=10))["i"] for i in kept] == kept
    for i in (13, 15):  # withdrawn before their packed message was made: never sent
        with pytest.raises(TimeoutError):
            await receiver.receive(channels[i], timeout=0.2)


async def test_packed_sends_keep_each_senders_order_to_one_channel(make: Factory) -> None:
    receiver, sender = make(capacity=1000), make()
    channel = await receiver.new_channel()
    before = sender.publishes

    async def sends(task: int) -> None:
        for i in range(20):
            await sender.send(channel, {"type": "n", "task": task, "i": i})

    await asyncio.gather(*(sends(task) for task in range(16)))
    got = [await receiver.receive(channel, timeout=10) for _ in range(320)]
    for task in range(16):
        assert [m["i"] for m in got if m["task"] == task] == list(range(20))
    assert sender.publishes - before < 320
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.2)


async def test_capacity_of_packed_sends_is_exact_at_the_receiver(make: Factory) -> None:
    receiver, sender = make(capacity=5), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm", "i": -1})
    assert (await receiver.receive(channel, timeout=10))["i"] == -1
    before = sender.publishes
    # Remote process channels are full at the receiver: the sends succeed, the extra is counted there.
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i in range(12)))
    assert sender.publishes - before < 12
    barrier = await receiver.new_channel()
    await sender.send(barrier, {"type": "barrier"})
    await receiver.receive(barrier, timeout=10)  # the inbox is ordered: all 12 were dispatched before it
    assert receiver.stats.dropped_full == 7
    kept = [(await receiver.receive(channel, timeout=10))["i"] for _ in range(5)]
    assert kept == sorted(kept)
    assert len(set(kept)) == 5
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.2)


async def test_a_malformed_packed_message_is_dropped_and_the_inbox_goes_on(
    make: Factory, prefix: str, node: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    import aio_pika

    receiver = make()
    channel = await receiver.new_channel()
    await receiver.start()
    good = receiver.encode({"type": "good"})
    bodies = [
        b"",  # no version byte
        b"\x09" + pack([(channel, good)])[1:],  # another format version
        pack([(channel, good)])[:-1],  # truncated
        pack([(channel, good)]) + b"\x00",  # trailing bytes
        pack([(channel, b"\xc1not msgpack"), (channel, receiver.encode({"type": "kept"}))]),
    ]
    connection = await aio_pika.connect(node.url)
    try:
        exchange = await (await connection.channel()).get_exchange(prefix)
        for body in bodies:
            await exchange.publish(
                aio_pika.Message(body, type="sends", message_id=uuid.uuid4().hex),
                routing_key=f"p.{receiver.client_token}",
            )
    finally:
        await connection.close()
    # Only the well-formed frame of the last body is delivered; nothing of the malformed ones.
    assert (await receiver.receive(channel, timeout=10))["type"] == "kept"
    await make().send(channel, {"type": "after"})
    assert (await receiver.receive(channel, timeout=10))["type"] == "after"
    assert receiver.stats.dropped_undecodable == 5
    assert sum("dropped a packed inbox message" in record.getMessage() for record in caplog.records) == 4


async def test_a_failed_packed_publish_raises_in_every_caller(make: Factory, node: RabbitNode) -> None:
    receiver = make()
    channel = await receiver.new_channel()
    async with TcpProxy(node.port) as proxy:
        sender = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", timeout=1)
        await sender.send(channel, {"type": "warm"})
        before = sender.publishes
        proxy.hold()  # no publisher confirm reaches the sender
        results = await asyncio.gather(
            *(sender.send(channel, {"type": "n", "i": i}) for i in range(16)), return_exceptions=True
        )
        proxy.release()
        assert all(isinstance(result, BackendUnavailable) for result in results), results
        assert sender.publishes - before < 16


async def test_each_caller_of_a_failed_packed_publish_is_told_about_its_own_send(
    make: Factory, node: RabbitNode
) -> None:
    # Sixteen sends to sixteen channels go as one message; the connection drops before
    # its confirm. Each caller's error names the channel it passed, not the pack's first.
    receiver = make()
    channels = [await receiver.new_channel() for _ in range(16)]
    async with TcpProxy(node.port) as proxy:
        sender = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", timeout=10)
        await sender.send(channels[0], {"type": "warm"})
        before = sender.publishes
        proxy.hold()  # no publisher confirm reaches the sender
        sends = asyncio.gather(
            *(sender.send(channel, {"type": "n", "i": i}) for i, channel in enumerate(channels)),
            return_exceptions=True,
        )
        await eventually(lambda: sender.publishes > before, "the packed publish written")
        await proxy.cut()
        results = await sends
        await proxy.reopen()
    assert sender.publishes - before == 1
    for channel, result in zip(channels, results, strict=True):
        assert isinstance(result, BackendUnavailable), result
        assert f"send to {channel!r} (packed with 15 others)" in str(result), result


async def test_a_send_without_a_confirm_times_out_and_a_cancelled_one_stays_cancelled(
    make: Factory, node: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    # A caller awaits its confirm itself: the timeout fails the confirm with
    # BackendUnavailable, and a caller cancelled meanwhile sees its own
    # CancelledError, never the layer's errors. The confirms that come late are
    # ignored quietly (aiormq warns of one for a failed future, not a cancelled one).
    caplog.set_level(logging.WARNING)
    receiver = make()
    channel = await receiver.new_channel()
    async with TcpProxy(node.port) as proxy:
        sender = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", timeout=1)
        await sender.send(channel, {"type": "warm"})
        proxy.hold()  # no publisher confirm reaches the sender
        with pytest.raises(BackendUnavailable, match="no publisher confirm within"):
            await sender.send(channel, {"type": "lone"})
        before = sender.publishes
        cancelled = asyncio.ensure_future(sender.send(channel, {"type": "cancelled"}))
        await eventually(lambda: sender.publishes > before, "the publish written")
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        proxy.release()
        await sender.send(channel, {"type": "after"})  # confirmed after the late ones
    assert not [record for record in caplog.records if "was ignored" in record.getMessage()]
    assert [(await receiver.receive(channel, timeout=10))["type"] for _ in range(4)] == [
        "warm",
        "lone",
        "cancelled",
        "after",
    ]


async def test_a_channel_closed_by_a_cancellation_fails_its_confirms_with_another_error() -> None:
    # A confirm never holds a CancelledError: its caller awaits it, and a CancelledError
    # raised there must be the caller's own cancellation (see _confirmed). A channel whose
    # close was cancelled, or caused by a cancellation, fails its confirms with aiormq's
    # ChannelInvalidStateError instead.
    from aiormq.exceptions import ChannelInvalidStateError

    from fastapi_websockets.backends import rabbitmq_wire

    loop = asyncio.get_running_loop()
    for cancelled in (True, False):
        confirm: asyncio.Future[Any] = loop.create_future()
        channel = types.SimpleNamespace(confirmations={1: confirm})
        closing: asyncio.Future[Any] = loop.create_future()
        if cancelled:
            closing.cancel()
        else:
            closing.set_exception(asyncio.CancelledError())
        rabbitmq_wire._fail_unconfirmed(cast(Any, channel), closing)
        assert isinstance(confirm.exception(), ChannelInvalidStateError)


async def test_unconfirmed_sends_fail_when_the_connection_drops(make: Factory, node: RabbitNode) -> None:
    # Confirms are the publisher's own futures, not aiormq's: the channel's
    # close must still fail every unconfirmed one with its cause, at once,
    # rather than leave its caller to the confirm timeout.
    receiver = make()
    channel = await receiver.new_channel()
    async with TcpProxy(node.port) as proxy:
        sender = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", timeout=120)
        await sender.send(channel, {"type": "warm"})
        before = sender.publishes
        proxy.hold()  # no publisher confirm reaches the sender
        sends = [asyncio.ensure_future(sender.send(channel, {"type": "n", "i": i})) for i in range(16)]
        await eventually(lambda: sender.publishes - before >= 1, "the packed publish written")
        await proxy.cut()
        results = await asyncio.gather(*sends, return_exceptions=True)
    assert all(isinstance(result, BackendUnavailable) for result in results), results
    assert not any("no publisher confirm within" in str(result) for result in results), results


# ------------------------------------------------------------- broker refusals
# A refusal that asking again cannot change was "RabbitMQ is unreachable" (BackendUnavailable,
# which means retry later) or a guess ("durable=True differs?"); it quotes the broker now.


async def test_a_named_queue_declared_with_other_arguments_is_used_as_it_is_with_one_warning(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # A rolling deploy that changes capacity: the new processes' sends to an existing named
    # channel raised InvalidChannelLayerConfig until the old queue went. They use it as it
    # is now, its own x-max-length deciding when it is full, and say so once per queue.
    old = make(capacity=3)
    await old.send("jobs", {"i": 0})
    new = make(capacity=5)
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets.rabbitmq"):
        await new.send("jobs", {"i": 1})
        await new.send("jobs", {"i": 2})
        with pytest.raises(ChannelFull):  # the old queue's limit of 3, not this layer's 5
            await new.send("jobs", {"i": 3})
        assert [(await new.receive("jobs", timeout=10))["i"] for _ in range(3)] == [0, 1, 2]
        await old.send("jobs", {"i": 4})
        assert (await new.receive("jobs", timeout=10))["i"] == 4
    warnings = [r.getMessage() for r in caplog.records if "exists with other arguments" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "PRECONDITION_FAILED - inequivalent arg 'x-max-length'" in warnings[0]
    assert "ChannelFull" in warnings[0]
    assert "rabbitmqctl delete_queue" in warnings[0]


async def test_a_named_queue_used_as_it_is_takes_this_layers_arguments_once_deleted(
    make: Factory, node: RabbitNode, prefix: str
) -> None:
    await make(capacity=2).send("jobs", {"i": 0})
    new = make(capacity=4)
    await new.send("jobs", {"i": 1})
    with pytest.raises(ChannelFull):  # the old queue's limit
        await new.send("jobs", {"i": 2})
    # What the warning says to do: the next send declares the queue with this layer's arguments.
    node.ctl("delete_queue", named_queue_name(prefix, "jobs"))
    for i in range(4):
        await new.send("jobs", {"i": i})
    with pytest.raises(ChannelFull):  # this layer's capacity now
        await new.send("jobs", {"i": 4})
    assert [(await new.receive("jobs", timeout=10))["i"] for _ in range(4)] == [0, 1, 2, 3]


async def test_an_exchange_declared_with_other_arguments_is_refused_naming_the_argument(
    make: Factory,
) -> None:
    await make(durable=False).send("jobs", {"type": "x"})
    with pytest.raises(InvalidChannelLayerConfig, match="inequivalent arg 'durable' for exchange"):
        await make(durable=True).send("jobs", {"type": "x"})


async def test_a_history_stream_declared_with_another_ttl_is_used_as_it_is(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # The existing stream wins (reads apply each layer's own ttl): a warning, not an error.
    assert await make(history={"room:*": {"size": 5, "ttl": 60}}).group_send("room:1", {"type": "m"})
    later = make(history={"room:*": {"size": 5, "ttl": 3600}})
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets.rabbitmq"):
        assert await later.group_send("room:1", {"type": "m"})
    assert "exists with other arguments" in caplog.text
    assert [m["type"] for m in (await later.group_history("room:1")).messages] == ["m", "m"]


async def test_a_vhost_that_does_not_exist_is_refused_as_config(node: RabbitNode, make: Factory) -> None:
    layer = make(url=f"amqp://guest:guest@127.0.0.1:{node.port}/no-such-vhost", timeout=5)
    with pytest.raises(InvalidChannelLayerConfig, match="vhost 'no-such-vhost' does not exist or user"):
        await layer.send("jobs", {"type": "x"})


@pytest.fixture(scope="module")
def powerless_user(rabbitmq_node: RabbitNode) -> str:
    """A user (password ``pw``) with no permissions on any vhost."""
    user = "fw-" + uuid.uuid4().hex[:8]
    rabbitmq_node.ctl("add_user", user, "pw")
    return user


async def test_a_user_without_permissions_on_the_vhost_is_refused_as_config(
    node: RabbitNode, make: Factory, powerless_user: str
) -> None:
    layer = make(url=f"amqp://{powerless_user}:pw@127.0.0.1:{node.port}/", timeout=5)
    with pytest.raises(InvalidChannelLayerConfig, match=f"user '{powerless_user}' has no permissions on it"):
        await layer.send("jobs", {"type": "x"})


async def close_connections_of(node: RabbitNode, user: str) -> None:
    """Have the broker close every connection of ``user`` (a dropped connection, as the layer sees it)."""
    rows = await asyncio.to_thread(node.rows, "list_connections", "pid", "user")
    for pid, who in rows:
        if who == user:
            await asyncio.to_thread(node.ctl, "close_connection", pid, "the test changed the login")


@pytest.mark.parametrize("change", ["password", "permissions"])
async def test_a_login_refused_under_a_running_layer_is_retried_and_logged_once(
    node: RabbitNode, make: Factory, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    # aio-pika retries such a login on its own and warns per attempt: the layer said nothing
    # of its own, and callers got "no connection within", not what the broker answered.
    caplog.set_level(logging.DEBUG)
    user = "fw-" + uuid.uuid4().hex[:8]
    node.ctl("add_user", user, SECRET)
    node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    layer = make(url=f"amqp://{user}:{SECRET}@127.0.0.1:{node.port}/", timeout=2)
    channel = await layer.new_channel()
    await layer.send("jobs", {"type": "before"})
    assert (await layer.receive("jobs", timeout=10))["type"] == "before"
    waiting = asyncio.create_task(layer.receive(channel))
    if change == "password":
        node.ctl("change_password", user, "rotated-password")
    else:
        node.ctl("clear_permissions", "-p", "/", user)
    await close_connections_of(node, user)
    refused = await refused_while_running(layer)
    logged = login_refusals(caplog)
    assert len(logged) == 1, logged  # the retries meanwhile log nothing more of the layer's
    assert ("ACCESS_REFUSED" if change == "password" else "rabbitmqctl set_permissions") in logged[0]
    assert not waiting.done()
    if change == "password":
        node.ctl("change_password", user, SECRET)
    else:
        node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    await make().send(channel, {"type": "back"})
    assert await asyncio.wait_for(waiting, 30) == {"type": "back"}
    assert layer.connection.up
    assert_layer_keeps_secret(layer, caplog, *refused)


async def test_a_permission_refused_on_the_exchange_says_which(
    node: RabbitNode, make: Factory, prefix: str
) -> None:
    user = "fw-" + uuid.uuid4().hex[:8]
    node.ctl("add_user", user, "pw")
    node.ctl("set_permissions", "-p", "/", user, "^$", "^$", "^$")
    layer = make(url=f"amqp://{user}:pw@127.0.0.1:{node.port}/", timeout=5)
    with pytest.raises(ChannelLayerError) as info:
        await layer.send("jobs", {"type": "x"})
    assert not isinstance(info.value, BackendUnavailable)
    assert f"ACCESS_REFUSED - access to exchange '{prefix}' in vhost '/' refused for user '{user}'" in str(
        info.value
    )
    assert "rabbitmqctl set_permissions" in str(info.value)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "transient"])
async def test_sends_to_a_named_channel_made_while_it_is_declared_keep_call_order(
    make: Factory, durable: bool
) -> None:
    # Each send to a named channel this layer has not declared yet declares its queue
    # first: sends made once the first declare was answered found it declared and went
    # ahead of earlier ones still waiting for theirs ([28, 29, 0, 27, 1, ...] once under load).
    sender, receiver = make(durable=durable), make(durable=durable)
    await sender.start()
    queue = named_queue_name(sender.queue_prefix, "declared.late")
    await send_in_two_waves(sender, "declared.late", lambda: queue in sender._declared, "the queue's declare")
    assert [(await receiver.receive("declared.late", timeout=10))["i"] for _ in range(30)] == list(range(30))
