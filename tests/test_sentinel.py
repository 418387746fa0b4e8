"""Redis Sentinel: the layer finds the master through the sentinels and follows a failover.

The group (tests/servers/redis.py: one master, one replica, three sentinels)
is the test's own: its master is killed with SIGKILL while receivers wait and
a sender keeps sending. The conformance suite runs on a separate, never
failed-over group as the ``redis-sentinel`` variant.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from fastapi_websockets import BaseChannelLayer, InvalidChannelLayerConfig
from fastapi_websockets.backends.redis import RedisChannelLayer
from fastapi_websockets.config import get_channel_layer_from_env
from fastapi_websockets.exceptions import ChannelLayerError
from tests.servers.redis import SENTINEL_MASTER, SentinelGroup, sentinel_backend
from tests.test_servers import taken


async def _until_accepted(send: Any, *args: Any) -> None:
    """Retry a send that the layer refuses while the sentinels elect a new master."""
    for _ in range(600):
        try:
            await send(*args)
            return
        except ChannelLayerError:
            await asyncio.sleep(0.05)
    pytest.fail(f"never accepted after the failover: {args!r}")


async def test_layers_follow_a_failover_when_the_master_is_killed(
    sentinel_group: SentinelGroup, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    build = sentinel_backend(sentinel_group).build
    # Room for everything sent while the receiver reconnects: capacity must drop nothing here.
    receiver, sender = build(namespace, timeout=2.0, capacity=10_000), build(namespace, timeout=2.0)
    layers += [receiver, sender]
    direct, member, noise = [await receiver.new_channel("fo") for _ in range(3)]
    await receiver.group_add("room", member)
    await sender.send(direct, {"type": "warm.up"})
    assert await receiver.receive(direct) == {"type": "warm.up"}

    # Receivers waiting across the failover, and a sender that never stops.
    waiting = [asyncio.create_task(receiver.receive(direct)), asyncio.create_task(receiver.receive(member))]
    failed_over = asyncio.Event()
    accepted_after: list[int] = []
    received: list[int] = []

    async def send_noise() -> None:
        for number in range(1_000_000):
            after = failed_over.is_set()
            with contextlib.suppress(ChannelLayerError):  # refused while there is no master
                await sender.send(noise, {"type": "noise", "n": number})
                if after:
                    accepted_after.append(number)
            await asyncio.sleep(0.01)

    async def receive_noise() -> None:
        while True:
            received.append((await receiver.receive(noise))["n"])

    tasks = [asyncio.create_task(send_noise()), asyncio.create_task(receive_noise())]
    try:
        await asyncio.sleep(0.3)
        killed = await asyncio.to_thread(sentinel_group.kill_master)
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(sentinel_group.master_port) == killed.port:
            assert time.monotonic() < deadline, "the sentinels never promoted the replica"
            await asyncio.sleep(0.1)
        failed_over.set()
        assert not any(task.done() for task in waiting)

        await _until_accepted(sender.send, direct, {"type": "after.direct"})
        await _until_accepted(sender.group_send, "room", {"type": "after.group"})
        results = await asyncio.wait_for(asyncio.gather(*waiting), 30)
        assert results == [{"type": "after.direct"}, {"type": "after.group"}]

        # Keep sending a while on the new master, then check nothing accepted was lost.
        await asyncio.sleep(1.0)
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        assert accepted_after, "no send was accepted after the failover"
        expected = set(accepted_after)
        for _ in range(300):
            if expected <= set(received):
                break
            await asyncio.sleep(0.05)
        assert sorted(expected - set(received)) == [], receiver.stats
    finally:
        for task in [*tasks, *waiting]:
            task.cancel()
        await asyncio.gather(*tasks, *waiting, return_exceptions=True)


@pytest.mark.parametrize("which", ["master", "replica", "sentinel"])
def test_the_group_starts_when_one_of_its_ports_is_taken(tmp_path: Path, which: str) -> None:
    # Seen in CI: a sentinel died at bind and the first one waited 60 s for it.
    group = SentinelGroup(tmp_path)
    node = {"master": group.master, "replica": group.replica}.get(which)
    chosen = node.port if node is not None else group.sentinel_ports[1]
    try:
        with taken(chosen):
            group.start()
        assert chosen not in [group.master.port, group.replica.port, *group.sentinel_ports]
        assert group.master_port() == group.master.port
    finally:
        group.stop()


async def test_the_layer_names_the_sentinels_when_none_answers(
    namespace: str, layers: list[BaseChannelLayer]
) -> None:
    layer = RedisChannelLayer(
        url="redis:///0", prefix=namespace, sentinels=["127.0.0.1:1"], sentinel_master="absent", timeout=1
    )
    layers.append(layer)
    with pytest.raises(ChannelLayerError, match=r"via sentinels 127\.0\.0\.1:1"):
        await layer.send("x", {"type": "x"})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sentinels": ["127.0.0.1:26379"]}, "go together"),
        ({"sentinel_master": "m"}, "go together"),
        ({"sentinels": "127.0.0.1:26379", "sentinel_master": "m"}, "list of 'host:port'"),
        ({"sentinels": ["127.0.0.1:notaport"], "sentinel_master": "m"}, "'host:port'"),
        ({"sentinels": ["a:1"], "sentinel_master": "m", "cluster": True}, "cluster=False"),
        ({"sentinels": ["a:1"], "sentinel_master": "m", "url": "unix:///tmp/r.sock"}, "unix"),
    ],
)
def test_sentinel_options_are_checked(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=match):
        RedisChannelLayer(**options)


async def test_sentinels_come_from_the_environment() -> None:
    layer = get_channel_layer_from_env(
        {
            "FASTAPI_WEBSOCKETS_BACKEND": "redis",
            "FASTAPI_WEBSOCKETS_REDIS_URL": "redis://:pw@/2",
            "FASTAPI_WEBSOCKETS_REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26380,10.0.0.3",
            "FASTAPI_WEBSOCKETS_REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
        }
    )
    try:
        assert isinstance(layer, RedisChannelLayer)
        assert layer.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)]
        assert layer.sentinel_master == SENTINEL_MASTER
        assert "pw" not in repr(layer)
    finally:
        await layer.close()
