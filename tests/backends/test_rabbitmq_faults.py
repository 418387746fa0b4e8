"""A driver error nobody expected, injected once into each RabbitMQ background task.

RabbitMQ's supervised tasks run after a reconnect: re-binding groups whose
bind failed during the outage, and restarting named-channel consumers. The
receiver reaches the broker through a :class:`TcpProxy` that is cut and
reopened; the fault is a real aio-pika method raising :class:`InjectedFault`
once against the real broker. The task must be started again with backoff and
logged, never leave the process connected and deaf.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from aio_pika.queue import Queue

from fastapi_websockets import BaseChannelLayer
from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer, group_routing_key
from fastapi_websockets.exceptions import BackendUnavailable
from tests.conftest import layer_factory
from tests.faults import TcpProxy, fail_once, restarted_after_fault
from tests.servers.rabbitmq import RabbitNode

Factory = Callable[..., RabbitMQChannelLayer]

#: A hang guard for waits on messages, not a speed goal.
PATIENCE = 60.0


@pytest.fixture
def make(rabbitmq_node: RabbitNode, namespace: str, layers: list[BaseChannelLayer]) -> Factory:
    prefix = f"fw-{namespace}"
    return layer_factory(
        layers,
        RabbitMQChannelLayer,
        url=rabbitmq_node.url,
        exchange_name=prefix,
        queue_prefix=prefix,
        timeout=3,
    )


@pytest.fixture(autouse=True)
def _errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="fastapi_websockets")


async def test_the_binding_resync_after_a_reconnect_is_restarted(
    make: Factory,
    rabbitmq_node: RabbitNode,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with TcpProxy(rabbitmq_node.port) as proxy:
        receiver = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        sender = make()
        channel = await receiver.new_channel()
        key = group_routing_key("late")
        await proxy.cut()
        # Joined while the broker is unreachable: a local member without a binding,
        # which the resync after the reconnect binds (and first hits the fault).
        with pytest.raises(BackendUnavailable):
            await receiver.group_add("late", channel)
        fired = fail_once(
            monkeypatch,
            Queue,
            "bind",
            lambda *args, **kwargs: key in args or kwargs.get("routing_key") == key,
        )
        await proxy.reopen()
        for _ in range(int(PATIENCE / 0.1)):
            await sender.group_send("late", {"type": "group"})
            try:
                message = await receiver.receive(channel, timeout=0.1)
            except TimeoutError:
                continue
            break
        else:
            raise AssertionError("the group was never bound after the reconnect")
        assert message["type"] == "group"
        assert fired
        assert restarted_after_fault(caplog, "fastapi_websockets.rabbitmq.binding resync after reconnect")


async def test_a_named_consumer_restart_is_restarted(
    make: Factory,
    rabbitmq_node: RabbitNode,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with TcpProxy(rabbitmq_node.port) as proxy:
        receiver = make(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        sender = make()
        await sender.send("jobs", {"type": "warm"})
        assert (await receiver.receive("jobs", timeout=PATIENCE))["type"] == "warm"
        waiting = asyncio.create_task(receiver.receive("jobs", timeout=PATIENCE))
        await asyncio.sleep(0.2)
        tag = f"fw-{receiver.client_token}-"
        fired = fail_once(
            monkeypatch,
            Queue,
            "consume",
            lambda *args, consumer_tag=None, **kwargs: (consumer_tag or "").startswith(tag),
        )
        await proxy.cut()  # the consumer goes with the connection; its restart hits the fault
        await proxy.reopen()
        await sender.send("jobs", {"type": "after"})
        assert (await waiting)["type"] == "after"
        await sender.send("jobs", {"type": "next"})
        assert (await receiver.receive("jobs", timeout=PATIENCE))["type"] == "next"
        assert fired
        assert restarted_after_fault(caplog, "fastapi_websockets.rabbitmq.consumer restart of 'jobs'")
