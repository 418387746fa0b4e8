"""RabbitMQ: a message sent after a history group_send waits for the group's tap where members are.

Members of a history group in another instance get its messages from their
instance's tap on the group's stream, not from the inbox a send goes to, so
an inbox message names its sender's recent history writes and the receiver
holds it until its tap has delivered them (docs/backends/rabbitmq.md, Order).
A tap that has not seen a write yet cannot be made on purpose, so these tests
publish such a message on the wire, as a peer would: naming a write that
comes later, or never.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import aio_pika
import pytest

from fastapi_websockets import RabbitMQChannelLayer
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.backends.rabbitmq import history_stream_name
from fastapi_websockets.exceptions import ChannelLayerClosed
from fastapi_websockets.names import process_token
from tests.backends.test_rabbitmq import _close_by_cancelled_rpc
from tests.conftest import layer_factory
from tests.faults import eventually
from tests.servers.rabbitmq import RabbitNode

Factory = Callable[..., RabbitMQChannelLayer]

HISTORY = {"room:*": 50}
ROOM = "room:1"
#: Far past any stream offset these tests reach: a write no tap here will see.
NEVER = 1_000_000_000


@pytest.fixture
def make(rabbitmq_node: RabbitNode, namespace: str, layers: list[BaseChannelLayer]) -> Factory:
    prefix = f"fw-{namespace}"
    return layer_factory(
        layers, RabbitMQChannelLayer, url=rabbitmq_node.url, exchange_name=prefix, queue_prefix=prefix
    )


async def joined(
    make: Factory, **options: object
) -> tuple[RabbitMQChannelLayer, RabbitMQChannelLayer, str, int, str]:
    """(receiver, sender, receiver's member channel of ROOM, ROOM's next stream offset and its epoch).

    The sender's first message to ROOM has reached the member: the receiver's tap
    has delivered everything up to the returned offset, exclusive, and the
    sender's next message to ROOM is the stream's next entry.
    """
    receiver, sender = make(history=HISTORY, **options), make(history=HISTORY)
    channel = await receiver.new_channel()
    await receiver.group_add(ROOM, channel)
    first = await sender.group_send(ROOM, {"type": "m", "n": "first"})
    assert first is not None
    assert (await receiver.receive(channel))["n"] == "first"
    return receiver, sender, channel, first.offset, first.epoch


async def publish_after(
    node: RabbitNode, layer: RabbitMQChannelLayer, channel: str, n: str, offset: int, epoch: str
) -> None:
    """Send ``{"n": n}`` to ``channel`` as a peer that wrote stream offset ``offset`` of ROOM just before."""
    connection = await aio_pika.connect(node.url)
    try:
        amqp = await connection.channel(publisher_confirms=True)
        exchange = await amqp.get_exchange(layer.exchange_name, ensure=False)
        message = aio_pika.Message(
            layer.encode({"type": "m", "n": n}),
            type="send",
            headers={"channel": channel, "after": f"{offset} {epoch} {ROOM}"},
            message_id=uuid.uuid4().hex,
        )
        await exchange.publish(message, routing_key=f"p.{process_token(channel)}")
    finally:
        await connection.close()


@pytest.fixture(autouse=True)
def _warnings_captured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_websockets.rabbitmq")


def hold_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings of holds that ended before the tap caught up."""
    return [r.getMessage() for r in caplog.records if "before the history of group" in r.getMessage()]


async def test_a_send_waits_until_the_tap_delivered_the_write_it_follows(
    make: Factory, rabbitmq_node: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender, channel, next_offset, epoch = await joined(make)
    await publish_after(rabbitmq_node, receiver, channel, "held", next_offset, epoch)
    # Queued behind the held one, although its own write was delivered long ago.
    await sender.send(channel, {"type": "m", "n": "next"})
    # The write the held message follows: stored after it, delivered before it.
    await sender.group_send(ROOM, {"type": "m", "n": "stored"})
    got = [(await receiver.receive(channel))["n"] for _ in range(3)]
    assert got == ["stored", "held", "next"]
    assert not hold_warnings(caplog)


async def test_a_deleted_stream_releases_what_waited_for_its_tap(
    make: Factory, rabbitmq_node: RabbitNode, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender, channel, _, epoch = await joined(make)
    await publish_after(rabbitmq_node, receiver, channel, "held", NEVER, epoch)
    await sender.send(channel, {"type": "m", "n": "next"})
    await sender.group_send(ROOM, {"type": "m", "n": "stored"})
    assert (await receiver.receive(channel))["n"] == "stored"
    # The broker cancels the tap: the write will never come, nothing waits for it.
    rabbitmq_node.ctl("delete_queue", history_stream_name(f"fw-{namespace}", ROOM))
    got = [(await receiver.receive(channel))["n"] for _ in range(2)]
    assert got == ["held", "next"]
    assert not hold_warnings(caplog)  # released by the deletion, not by the timeout


async def test_a_hold_lasts_across_a_tap_reopened_after_a_loss(
    make: Factory, rabbitmq_node: RabbitNode, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A timeout well above a tap's reopening: a hold that ended on it would warn.
    receiver, sender, channel, next_offset, epoch = await joined(make, timeout=30)
    # Past what the receiver's reopening writes (an epoch proposal or two per attempt),
    # inside what the sender stores meanwhile.
    await publish_after(rabbitmq_node, receiver, channel, "held", next_offset + 20, epoch)
    await sender.send(channel, {"type": "m", "n": "next"})
    # The receiver's tap is lost with its AMQP channel; the next one resumes where it stopped.
    await _close_by_cancelled_rpc(receiver, history_stream_name(f"fw-{namespace}", ROOM))
    stored = [f"stored {i}" for i in range(40)]
    for n in stored:
        await sender.group_send(ROOM, {"type": "m", "n": n})
    got = [(await receiver.receive(channel))["n"] for _ in range(len(stored) + 2)]
    held = got.index("held")
    assert 0 < held < len(stored), got
    assert got[held + 1] == "next", got
    assert [n for n in got if n.startswith("stored")] == stored
    assert not hold_warnings(caplog)


async def test_a_hold_ends_after_timeout_with_a_warning(
    make: Factory, rabbitmq_node: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender, channel, _, epoch = await joined(make, timeout=3)
    await publish_after(rabbitmq_node, receiver, channel, "held", NEVER, epoch)
    await sender.send(channel, {"type": "m", "n": "next"})
    got = [(await receiver.receive(channel))["n"] for _ in range(2)]
    assert got == ["held", "next"]
    warnings = hold_warnings(caplog)
    assert len(warnings) == 1, warnings
    warning = warnings[0]
    assert repr(ROOM) in warning
    assert f"stream offset {NEVER}" in warning
    assert "held for 3 s" in warning


async def test_close_drops_held_messages_with_the_mailboxes(
    make: Factory, rabbitmq_node: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, _, channel, _, epoch = await joined(make)
    waiting = asyncio.ensure_future(receiver.receive(channel))
    await publish_after(rabbitmq_node, receiver, channel, "held", NEVER, epoch)

    def taken() -> bool:
        # Acked: dispatched, or held here.
        rows = rabbitmq_node.rows("list_queues", "name", "messages")
        return [row[1] for row in rows if row[0] == receiver.inbox_name] == ["0"]

    await eventually(taken, "the receiver took the message from its inbox")
    await receiver.close()
    with pytest.raises(ChannelLayerClosed):
        await waiting
    assert not hold_warnings(caplog)
