"""A driver error nobody expected, injected once into each NATS background task.

The fault is a real nats-py method raising :class:`InjectedFault` once against
the real server (no fake broker). Each task must be started again with backoff
and logged, or its error reported; never leave the process connected and deaf.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.manager import JetStreamManager

from fastapi_websockets import BaseChannelLayer
from fastapi_websockets.backends.nats import NATSChannelLayer
from tests.backends.test_nats import Make, raw_client
from tests.conftest import layer_factory
from tests.faults import fail_once, restarted_after_fault
from tests.servers.nats import NatsNode

#: A hang guard for waits on messages, not a speed goal.
PATIENCE = 60.0


@pytest.fixture
def make(nats_node: NatsNode, layers: list[BaseChannelLayer], namespace: str) -> Make:
    return layer_factory(
        layers,
        NATSChannelLayer,
        servers=[nats_node.url],
        prefix=namespace,
        group_bucket=namespace,
        stream_name=namespace,
    )


@pytest.fixture(autouse=True)
def _warnings_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_websockets")


async def test_a_named_channel_reader_is_restarted(
    make: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender = make(), make()
    fired = fail_once(monkeypatch, JetStreamContext.PullSubscription, "fetch")
    waiting = asyncio.create_task(receiver.receive("jobs", timeout=PATIENCE))
    await sender.send("jobs", {"type": "job"})
    assert (await waiting)["type"] == "job"
    await sender.send("jobs", {"type": "next"})
    assert (await receiver.receive("jobs", timeout=PATIENCE))["type"] == "next"
    assert fired
    assert restarted_after_fault(caplog, "fastapi_websockets.nats.reader of 'jobs'")


async def test_the_inbox_keeper_is_restarted(
    make: Make, nats_node: NatsNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    consumer = receiver._inbox_consumer
    fired = fail_once(
        monkeypatch,
        JetStreamManager,
        "consumer_info",
        lambda _jsm, _stream, name, *args, **kwargs: name == consumer,
    )
    # The server forgets the consumer: its heartbeats stop, the keeper checks (and
    # hits the fault), is restarted, checks again and creates it again.
    client = await raw_client([nats_node.url])
    try:
        await client.jetstream().delete_consumer(receiver._inbox_stream, consumer)
    finally:
        await client.close()
    await sender.send(channel, {"type": "after"})
    await sender.group_send("room", {"type": "group"})
    got = [(await receiver.receive(channel, timeout=PATIENCE))["type"] for _ in range(2)]
    assert got == ["after", "group"]
    assert fired
    assert restarted_after_fault(caplog, "fastapi_websockets.nats.inbox keeper")


async def test_a_failed_inbox_ack_is_reported_and_nothing_is_lost_or_doubled(
    make: Make, nats_node: NatsNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The inbox consumer's deliveries run in nats-py's subscription task; an error
    # there goes to the layer's error callback, and the unacked message comes again
    # (the layer drops that second copy by its id).
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    fired = fail_once(monkeypatch, Msg, "ack")
    await sender.send(channel, {"type": "first"})
    await sender.send(channel, {"type": "second"})
    got = [(await receiver.receive(channel, timeout=PATIENCE))["type"] for _ in range(2)]
    assert got == ["first", "second"]
    assert fired
    assert any(record.getMessage().startswith("NATS error: InjectedFault") for record in caplog.records), [
        record.getMessage() for record in caplog.records
    ]
    # Wait until the server has delivered the unacked message again and got its ack:
    # that second copy must not reach the receiver before the next message.
    client = await raw_client([nats_node.url])
    try:
        jsm = client.jetstream()
        for _ in range(int(PATIENCE / 0.1)):
            info = await jsm.consumer_info(receiver._inbox_stream, receiver._inbox_consumer)
            # More deliveries than stored messages: one came twice.
            delivered = info.delivered
            if delivered.consumer_seq > delivered.stream_seq and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the unacked message was never delivered again: {info}")
    finally:
        await client.close()
    await sender.send(channel, {"type": "third"})
    assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "third"
