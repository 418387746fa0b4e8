"""Behaviour only the Redis backend has, checked on real redis-server processes.

Restart with waiting receivers, per-message expiry, atomic capacity, one copy
per process and a constant number of commands per group_send, key layout per
slot in a real cluster, connection counts with thousands of receivers, and no
password in any error, log record, repr or stats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from fastapi_websockets import BaseChannelLayer, ChannelFull, InvalidChannelLayerConfig, get_channel_layer
from fastapi_websockets.backends import redis as redis_backend
from fastapi_websockets.backends.redis import RedisChannelLayer
from fastapi_websockets.config import get_channel_layer_from_env
from fastapi_websockets.exceptions import BackendUnavailable, ChannelLayerClosed, ChannelLayerError
from fastapi_websockets.types import Message
from tests.conftest import layer_factory
from tests.doc_examples import read_doc
from tests.faults import (
    InjectedFault,
    eventually,
    fail_once,
    login_refusals,
    refused_at_start,
    refused_while_running,
)
from tests.leaks import SECRET, assert_no_secret
from tests.servers import free_port
from tests.servers.redis import RedisCluster, RedisNode

Factory = Callable[..., RedisChannelLayer]


@pytest.fixture
async def raw(redis_server: RedisNode) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def make(redis_server: RedisNode, namespace: str, layers: list[BaseChannelLayer]) -> Factory:
    return layer_factory(layers, RedisChannelLayer, url=redis_server.url, prefix=namespace)


async def _started(layer: RedisChannelLayer) -> None:
    """Start ``layer`` and wait until its reader connected, so that counts see only what follows."""
    await layer.group_send("warm-up", {"type": "warm"})
    await eventually(lambda: layer.connection.up, "the layer is connected")


# ------------------------------------------------------------------- restart


@pytest.mark.parametrize("use_pubsub", [True, False], ids=["pubsub", "nopubsub"])
async def test_restart_with_waiting_receivers(
    restartable_redis: RedisNode,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
    use_pubsub: bool,
) -> None:
    build = layer_factory(
        layers,
        RedisChannelLayer,
        url=restartable_redis.url,
        prefix=namespace,
        use_pubsub=use_pubsub,
        timeout=1,
    )
    receiver, sender = build(), build()
    member = await receiver.new_channel("ws")
    direct = await receiver.new_channel("ws")
    gone = await receiver.new_channel("ws")
    await receiver.group_add("room", member)
    await receiver.group_add("room", gone)
    # Membership changed by another process is what the owner restores, too.
    await sender.group_add("lobby", member)
    await sender.group_discard("room", gone)
    group_waiter = asyncio.create_task(receiver.receive(member))
    direct_waiter = asyncio.create_task(receiver.receive(direct))
    named_waiter = asyncio.create_task(receiver.receive("jobs"))
    await asyncio.sleep(0.3)

    restartable_redis.stop()
    with pytest.raises(BackendUnavailable, match="Redis is unreachable"):
        await sender.send("jobs", {"type": "while down"})
    with pytest.raises(BackendUnavailable, match="Redis is unreachable"):
        await sender.group_send("room", {"type": "while down"})
    with pytest.raises(BackendUnavailable, match="Redis is unreachable"):
        await receiver.group_add("other", member)
    await asyncio.sleep(1)
    assert not group_waiter.done()
    assert not direct_waiter.done()
    assert not named_waiter.done()

    restartable_redis.start()  # empty: no persistence
    raw = redis_asyncio.Redis.from_url(restartable_redis.url)
    try:
        group_key = f"{namespace}:group:{{room}}"
        await eventually(lambda: raw.zscore(group_key, member), "the receiver re-registers its group member")
        assert await raw.zscore(f"{namespace}:group:{{lobby}}", member) is not None
        assert await raw.zscore(group_key, gone) is None
    finally:
        await raw.aclose()

    refusal = ""
    # Redis lost its data: group_send is refused until every process had time to
    # re-register its members (tests/backends/test_redis_restarts.py), then accepted.
    for _ in range(300):
        try:
            await sender.group_send("room", {"type": "after", "n": 1})
            break
        except BackendUnavailable as exc:
            refusal = str(exc)
            await asyncio.sleep(0.1)
    assert "Redis lost its data" in refusal
    await sender.send(direct, {"type": "after", "n": 2})
    await sender.send("jobs", {"type": "after", "n": 3})
    assert await asyncio.wait_for(group_waiter, 30) == {"type": "after", "n": 1}
    assert await asyncio.wait_for(direct_waiter, 30) == {"type": "after", "n": 2}
    assert await asyncio.wait_for(named_waiter, 30) == {"type": "after", "n": 3}
    errors = [
        r for r in caplog.records if r.name.startswith("fastapi_websockets") and r.levelno >= logging.ERROR
    ]
    assert errors == []
    assert any("reconnected to Redis" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------- expiry, capacity


async def test_named_messages_expire_one_by_one(make: Factory, raw: redis_asyncio.Redis) -> None:
    layer = make(channel_expiry=1)
    await layer.send("expiring", {"type": "old"})
    await asyncio.sleep(0.7)
    await layer.send("expiring", {"type": "new"})
    key = f"{layer.prefix}:chan:{{expiring}}"
    assert 0 < await raw.pttl(key) <= 1000  # the key itself goes away with its last message
    await asyncio.sleep(0.5)  # "old" is now 1.2 s old, "new" 0.5 s
    assert (await layer.receive("expiring", timeout=5))["type"] == "new"
    with pytest.raises(TimeoutError):
        await layer.receive("expiring", timeout=0.3)


async def test_expired_messages_free_capacity(make: Factory) -> None:
    layer = make(capacity=2, channel_expiry=1)
    await layer.send("small", {"type": "x"})
    await layer.send("small", {"type": "x"})
    with pytest.raises(ChannelFull):
        await layer.send("small", {"type": "x"})
    await asyncio.sleep(1.2)
    await layer.send("small", {"type": "fresh"})
    assert (await layer.receive("small", timeout=5))["type"] == "fresh"


async def test_capacity_is_atomic_across_instances(make: Factory, raw: redis_asyncio.Redis) -> None:
    a, b = make(capacity=10), make(capacity=10)
    results = await asyncio.gather(
        *(layer.send("contended", {"type": "n", "i": i}) for i in range(30) for layer in (a, b)),
        return_exceptions=True,
    )
    full = [r for r in results if isinstance(r, ChannelFull)]
    assert sum(r is None for r in results) == 10
    assert len(full) == 50
    assert await raw.llen(f"{a.prefix}:chan:{{contended}}") == 10


async def test_group_expiry_sets_a_ttl_on_the_group(make: Factory, raw: redis_asyncio.Redis) -> None:
    layer = make(group_expiry=100)
    await layer.group_add("ttl-group", "named.member")
    ttl = await raw.pttl(f"{layer.prefix}:group:{{ttl-group}}")
    assert 99_000 < ttl <= 100_000


# ------------------------------------------------------ group_send round trips


async def test_group_send_writes_one_entry_per_process(make: Factory, raw: redis_asyncio.Redis) -> None:
    sender, owner = make(), make()
    members = [await owner.new_channel("ws") for _ in range(200)]
    for channel in members:
        await owner.group_add("big", channel)
    await owner.close()  # its reader stops, so its inbox keeps what arrives
    await sender.group_send("big", {"type": "fan"})
    inbox = f"{sender.prefix}:inbox:{{{owner.client_token}}}"
    entries = await raw.lrange(inbox, 0, -1)
    assert len(entries) == 1
    # The entry names the group and how many members the process holds, not the members:
    # its size does not grow with the group.
    assert b"big" in entries[0]
    assert not any(channel.encode() in entries[0] for channel in members)
    assert len(entries[0]) < 100
    owners = await raw.hgetall(f"{sender.prefix}:owners:{{big}}")
    assert owners == {f"!{owner.client_token}".encode(): b"200"}


async def test_owner_counts_follow_adds_discards_and_expiry(make: Factory, raw: redis_asyncio.Redis) -> None:
    owner, sender = make(group_expiry=1), make(group_expiry=1)
    owners_key = f"{owner.prefix}:owners:{{room}}"
    first, second = await owner.new_channel(), await owner.new_channel()
    await owner.group_add("room", first)
    await owner.group_add("room", first)  # a refresh, not a second member
    await sender.group_add("room", "jobs.a")
    assert await raw.hgetall(owners_key) == {f"!{owner.client_token}".encode(): b"1", b"jobs.a": b"1"}
    await sender.group_discard("room", "jobs.a")
    await sender.group_discard("room", "jobs.a")  # not a member any more: no change
    await asyncio.sleep(0.6)
    await owner.group_add("room", second)
    assert await raw.hgetall(owners_key) == {f"!{owner.client_token}".encode(): b"2"}
    await asyncio.sleep(0.6)  # first has expired, second has not
    await sender.group_send("room", {"type": "hello"})
    assert await owner.receive(second, timeout=10) == {"type": "hello"}
    with pytest.raises(TimeoutError):
        await owner.receive(first, timeout=0.2)
    assert await raw.hgetall(owners_key) == {f"!{owner.client_token}".encode(): b"1"}
    await owner.group_discard("room", second)
    assert await raw.hgetall(owners_key) == {}


async def test_group_send_follows_redis_when_the_owner_record_is_stale(make: Factory) -> None:
    # The owner fans out from the members it holds in memory; when Redis holds a different
    # number of them (here: a flush by another process, which the owner is not told of),
    # it reads them back from Redis, and Redis decides who gets the message.
    owner, other = make(), make()
    kept, flushed, unknown = [await owner.new_channel("ws") for _ in range(3)]
    await owner.group_add("room", kept)
    await owner.group_add("room", flushed)
    await other.flush()  # Redis forgets both; the owner still records both
    await other.group_add("room", kept)
    await other.group_add("room", unknown)
    # The owner is told of the add (its record: all three; Redis: two). Waiting for the
    # notice keeps the counts apart: a lost notice as well would leave the same count
    # on both sides, which the owner cannot tell from agreement.
    await eventually(lambda: unknown in owner.local_groups.members("room"), "the owner hears of the add")
    for sender in (other, owner):
        await sender.group_send("room", {"type": "hello"})
        assert await owner.receive(kept, timeout=10) == {"type": "hello"}
        assert await owner.receive(unknown, timeout=10) == {"type": "hello"}
        with pytest.raises(TimeoutError):
            await owner.receive(flushed, timeout=0.2)
    assert sorted(owner.local_groups.members("room")) == sorted([kept, unknown])


@pytest.mark.parametrize("use_pubsub", [True, False], ids=["pubsub", "nopubsub"])
async def test_own_members_get_a_group_message_before_redis_answers(
    make: Factory, raw: redis_asyncio.Redis, use_pubsub: bool
) -> None:
    # CLIENT PAUSE WRITE holds every script (the group_send's too) without holding the
    # connection: the write goes out, the answer waits. The sender's own member gets the
    # message meanwhile, after the sender's earlier send(); the other process's member
    # gets both, in the same order, once Redis runs the script.
    sender, other = make(timeout=60, use_pubsub=use_pubsub), make(use_pubsub=use_pubsub)
    local, remote = await sender.new_channel("ws"), await other.new_channel("ws")
    await sender.group_add("room", local)
    await sender.group_add("room", remote)
    await _started(sender)
    for channel in (local, remote):
        await sender.send(channel, {"type": "direct", "n": 1})
    await raw.client_pause(5_000, all=False)
    try:
        sending = asyncio.create_task(sender.group_send("room", {"type": "group", "n": 2}))
        assert await sender.receive(local) == {"type": "direct", "n": 1}
        assert await sender.receive(local) == {"type": "group", "n": 2}
        assert not sending.done()  # Redis has not answered yet
    finally:
        await raw.client_unpause()
    await sending
    assert await other.receive(remote, timeout=10) == {"type": "direct", "n": 1}
    assert await other.receive(remote, timeout=10) == {"type": "group", "n": 2}
    # Exactly once: the next message on the local channel is the next one sent.
    await sender.group_send("room", {"type": "group", "n": 3})
    assert await sender.receive(local, timeout=10) == {"type": "group", "n": 3}
    assert await other.receive(remote, timeout=10) == {"type": "group", "n": 3}


async def test_an_early_delivery_reaches_members_redis_holds_and_the_owner_missed_once(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    # The owner delivers its own group_send from its local record before Redis answers;
    # when Redis counts more of its members (here: one added behind its back, as a lost
    # notice would leave it), the owner reads them back and gives the message to the
    # missed one only: the ones it already reached do not get it twice.
    owner = make()
    known, missed = await owner.new_channel("ws"), await owner.new_channel("ws")
    await owner.group_add("room", known)
    await _started(owner)
    seconds, micros = await raw.time()
    await raw.zadd(f"{owner.prefix}:group:{{room}}", {missed: seconds * 1000 + micros // 1000})
    await raw.hincrby(f"{owner.prefix}:owners:{{room}}", f"!{owner.client_token}", 1)
    for n in (1, 2):
        await owner.group_send("room", {"type": "hello", "n": n})
        assert await owner.receive(known, timeout=10) == {"type": "hello", "n": n}
        assert await owner.receive(missed, timeout=10) == {"type": "hello", "n": n}
    assert sorted(owner.local_groups.members("room")) == sorted([known, missed])


async def test_group_send_costs_a_constant_number_of_commands(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    sender, first, second = make(), make(), make()
    for owner, count in ((first, 600), (second, 400)):
        for _ in range(count):
            await owner.group_add("huge", await owner.new_channel("ws"))
    await first.close()
    await second.close()
    await _started(sender)
    await raw.config_resetstat()
    await sender.group_send("huge", {"type": "fan"})
    stats = await raw.info("commandstats")
    calls = {name: value["calls"] for name, value in stats.items()}
    # One script reads the owners and pushes one entry per owning process: 1,000 members,
    # one command (a cluster, whose inboxes live in other slots, needs one more per process).
    assert calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0) == 1
    assert calls["cmdstat_rpush"] == 2  # inside the scripts: one entry per process


# ------------------------------------------------------------ resource counts


async def _connections(raw: redis_asyncio.Redis, prefix_names: set[int]) -> int:
    clients = await raw.client_list()
    return sum(1 for client in clients if int(client["id"]) not in prefix_names)


@pytest.mark.parametrize("use_pubsub", [True, False], ids=["pubsub", "nopubsub"])
async def test_thousands_of_receivers_hold_as_many_connections_as_one(
    make: Factory, raw: redis_asyncio.Redis, use_pubsub: bool
) -> None:
    before = {int(client["id"]) for client in await raw.client_list()}
    layer = make(use_pubsub=use_pubsub)
    first = await layer.new_channel("ws")
    waiters = [asyncio.create_task(layer.receive(first))]
    waiters.append(asyncio.create_task(layer.receive("named.0")))
    await layer.send("warm", {"type": "x"})
    await eventually(lambda: _connections(raw, before), "the layer connects")
    await asyncio.sleep(0.5)
    with_one = await _connections(raw, before)

    for _ in range(5000):
        waiters.append(asyncio.create_task(layer.receive(await layer.new_channel("ws"))))
    for i in range(200):
        waiters.append(asyncio.create_task(layer.receive(f"named.{i % 20}")))
    await asyncio.sleep(1)
    with_many = await _connections(raw, before)
    blocked = [c for c in await raw.client_list() if "b" in c["flags"] and int(c["id"]) not in before]

    assert with_many == with_one
    assert with_one <= 2
    assert len(blocked) == (0 if use_pubsub else 1)  # only the inbox reader ever blocks
    assert not any(waiter.done() for waiter in waiters)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


# -------------------------------------------------------------------- cluster


@pytest.fixture
async def cluster_raw(redis_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    client = ClusterClient.from_url(redis_cluster.url)
    await client.initialize()
    yield client
    await client.aclose()


async def test_cluster_key_layout_and_cross_slot_groups(
    redis_cluster: RedisCluster, cluster_raw: ClusterClient, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    build = layer_factory(layers, RedisChannelLayer, url=redis_cluster.url, prefix=namespace, cluster=True)

    # Enough instances that their inboxes live on at least two different nodes.
    instances: list[RedisChannelLayer] = []
    nodes: set[str] = set()
    while len(nodes) < 2 or len(instances) < 3:
        layer = build()
        instances.append(layer)
        node = cluster_raw.get_node_from_key(f"{namespace}:inbox:{{{layer.client_token}}}")
        assert node is not None
        nodes.add(node.name)
    group = "room:{odd}name}"
    members = {layer: await layer.new_channel("ws") for layer in instances}
    for layer, channel in members.items():
        await layer.group_add(group, channel)
    named = ["jobs.{a}", "jobs.b", "jobs.c"]
    for name in named:
        await instances[0].group_add(group, name)
    await instances[-1].group_send(group, {"type": "hello"})
    for layer, channel in members.items():
        assert await layer.receive(channel, timeout=10) == {"type": "hello"}
    for name in named:
        assert await instances[1].receive(name, timeout=10) == {"type": "hello"}

    keys = [key.decode() async for key in cluster_raw.scan_iter(match=f"{namespace}:*")]
    assert keys, "expected keys under the prefix"
    assert all(key.startswith(f"{namespace}:") for key in keys)
    assert f"{namespace}:group:{{room:%7Bodd%7Dname%7D}}" in keys
    # Keys one script touches share a slot; a process's inbox and wake channel too.
    for name in named:
        escaped = name.replace("{", "%7B").replace("}", "%7D")
        assert key_slot(f"{namespace}:chan:{{{escaped}}}".encode()) == key_slot(
            f"{namespace}:waiters:{{{escaped}}}".encode()
        )
    token = instances[0].client_token
    assert key_slot(f"{namespace}:inbox:{{{token}}}".encode()) == key_slot(
        f"{namespace}:wake:{{{token}}}".encode()
    )
    # Named channels spread over the cluster rather than piling on one node.
    slots = {key_slot(f"{namespace}:chan:{{jobs.{i}}}".encode()) for i in range(20)}
    assert len(slots) > 1

    await instances[0].flush()
    assert [key async for key in cluster_raw.scan_iter(match=f"{namespace}:*")] == []


async def test_cluster_sharded_subscription_answers_the_quiet_ping_and_the_inbox_is_re_checked(
    redis_cluster: RedisCluster,
    cluster_raw: ClusterClient,
    namespace: str,
    layers: list[BaseChannelLayer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The quiet re-check on a cluster's sharded subscription (SSUBSCRIBE, on the node of the
    # inbox's slot): after _BLOCK_SECONDS without a message the reader PINGs there, and the
    # pong makes it pop its inbox, so an entry stored without a publish is delivered. No
    # pong within another _BLOCK_SECONDS would cut the subscription ("reconnecting"): it
    # must not happen on a live one, over several quiet periods.
    monkeypatch.setattr(redis_backend, "_BLOCK_SECONDS", 0.3)
    caplog.set_level(logging.DEBUG, logger="fastapi_websockets.redis")
    build = layer_factory(layers, RedisChannelLayer, url=redis_cluster.url, prefix=namespace, cluster=True)
    receiver, sender = build(), build()
    assert isinstance(receiver, RedisChannelLayer)
    assert (receiver.use_pubsub, receiver.sharded_pubsub) == (True, True)
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm"})
    assert await receiver.receive(channel, timeout=10) == {"type": "warm"}
    await asyncio.sleep(1.5)  # five quiet periods: PINGs answered, none cut
    await store_unpublished(cluster_raw, receiver, channel, {"type": "stored"})
    assert await receiver.receive(channel, timeout=10) == {"type": "stored"}
    assert "reconnect" not in caplog.text


async def test_cluster_own_members_get_a_group_message_before_the_pushes_are_answered(
    redis_cluster: RedisCluster, cluster_raw: ClusterClient, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    # In a cluster the owners script and the pushes are two steps: the sender's own member
    # gets the message once the push to the other process is written, not answered. The
    # node holding that process's inbox holds its scripts (CLIENT PAUSE WRITE); the
    # group lives on another node, whose owners script answers.
    build = layer_factory(
        layers, RedisChannelLayer, url=redis_cluster.url, prefix=namespace, cluster=True, timeout=60
    )
    sender, other = build(), build()
    inbox_node = cluster_raw.get_node_from_key(f"{namespace}:inbox:{{{other.client_token}}}")
    assert inbox_node is not None
    groups = (f"room{i}" for i in range(1000))
    group = next(
        name
        for name in groups
        if (node := cluster_raw.get_node_from_key(f"{namespace}:group:{{{name}}}")) is not None
        and node.name != inbox_node.name
    )
    local, remote = await sender.new_channel("ws"), await other.new_channel("ws")
    await sender.group_add(group, local)
    await sender.group_add(group, remote)
    await _started(sender)
    paused = next(node for node in redis_cluster.nodes if node.port == inbox_node.port)
    paused.cli_call("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        sending = asyncio.create_task(sender.group_send(group, {"type": "group"}))
        assert await sender.receive(local) == {"type": "group"}
        assert not sending.done()  # the push's answer is held
    finally:
        paused.cli_call("CLIENT", "UNPAUSE")
    await sending
    assert await other.receive(remote, timeout=10) == {"type": "group"}


# -------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("url", "http://localhost", "url must be a redis://"),
        ("prefix", "has space", "prefix must be"),
        ("prefix", "a:b", "prefix must be"),
        ("prefix", "", "prefix must be"),
        ("timeout", 0, "timeout must be a positive"),
        ("use_pubsub", "yes", "use_pubsub must be true or false"),
        ("capacity", -1, "capacity"),
    ],
)
def test_bad_options_name_the_option(option: str, value: Any, match: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=match):
        RedisChannelLayer(**{option: value})


def test_options_from_the_environment() -> None:
    layer = get_channel_layer_from_env(
        {
            "FASTAPI_WEBSOCKETS_BACKEND": "redis",
            "FASTAPI_WEBSOCKETS_REDIS_URL": "redis://127.0.0.1:1/0",
            "FASTAPI_WEBSOCKETS_REDIS_PREFIX": "envprefix",
            "FASTAPI_WEBSOCKETS_REDIS_CLUSTER": "false",
            "FASTAPI_WEBSOCKETS_REDIS_USE_PUBSUB": "no",
            "FASTAPI_WEBSOCKETS_REDIS_SHARDED_PUBSUB": "0",
            "FASTAPI_WEBSOCKETS_REDIS_CHANNEL_EXPIRY": "30",
            "FASTAPI_WEBSOCKETS_REDIS_GROUP_EXPIRY": "600",
            "FASTAPI_WEBSOCKETS_REDIS_TIMEOUT": "2.5",
        }
    )
    assert isinstance(layer, RedisChannelLayer)
    assert layer.timeout == 2.5
    assert (layer.url, layer.prefix, layer.cluster) == ("redis://127.0.0.1:1/0", "envprefix", False)
    assert (layer.use_pubsub, layer.sharded_pubsub) == (False, False)
    assert (layer.channel_expiry, layer.group_expiry) == (30, 600)


async def test_unreachable_redis_raises_backend_unavailable(layers: list[BaseChannelLayer]) -> None:
    layer = layer_factory(layers, RedisChannelLayer)(url=f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    with pytest.raises(BackendUnavailable, match=r"unreachable at 127\.0\.0\.1"):
        await layer.send("somewhere", {"type": "x"})
    with pytest.raises(ConnectionError):  # BackendUnavailable is also a ConnectionError
        await layer.group_send("g", {"type": "x"})


@pytest.mark.parametrize(
    ("use_pubsub", "sharded_pubsub"),
    [(True, False), (False, True)],
    ids=["classic-pubsub", "nopubsub"],
)
async def test_cluster_other_wake_up_modes(
    redis_cluster: RedisCluster,
    namespace: str,
    layers: list[BaseChannelLayer],
    use_pubsub: bool,
    sharded_pubsub: bool,
) -> None:
    build = layer_factory(
        layers,
        RedisChannelLayer,
        url=redis_cluster.url,
        prefix=namespace,
        cluster=True,
        use_pubsub=use_pubsub,
        sharded_pubsub=sharded_pubsub,
    )
    a, b = build(), build()
    channel = await b.new_channel("ws")
    await b.group_add("room", channel)
    waiter = asyncio.create_task(b.receive(channel))
    named = asyncio.create_task(b.receive("work"))
    await asyncio.sleep(0.3)
    await a.group_send("room", {"type": "group"})
    await a.send("work", {"type": "named"})
    assert await asyncio.wait_for(waiter, 10) == {"type": "group"}
    assert await asyncio.wait_for(named, 10) == {"type": "named"}


async def test_a_reader_cut_off_mid_stream_delivers_each_message_once_in_order(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    # Entries reach the reader both in its subscription and in the inbox list; cutting
    # the subscription while senders keep going makes it pop what it missed, and
    # entries that came both ways must count once, in each sender's order.
    receiver, sender = make(capacity=10_000), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm"})
    assert await receiver.receive(channel, timeout=10) == {"type": "warm"}
    senders, count = 4, 300
    got: dict[int, list[int]] = {s: [] for s in range(senders)}

    async def send_all(s: int) -> None:
        for i in range(count):
            await sender.send(channel, {"type": "m", "s": s, "i": i})

    async def cut() -> None:
        for _ in range(5):
            await asyncio.sleep(0.05)
            await raw.client_kill_filter(_type="pubsub")

    async def receive_all() -> None:
        for _ in range(senders * count):
            message = await receiver.receive(channel, timeout=30)
            got[message["s"]].append(message["i"])

    receiving = asyncio.create_task(receive_all())
    await asyncio.gather(*(send_all(s) for s in range(senders)), cut())
    await receiving
    assert got == {s: list(range(count)) for s in range(senders)}
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.5)  # nothing twice
    inbox = f"{receiver.prefix}:inbox:{{{receiver.client_token}}}"
    await eventually(lambda: _is_zero(raw.llen(inbox)), "the reader removes what it delivered")


async def store_unpublished(
    raw: redis_asyncio.Redis | ClusterClient, receiver: RedisChannelLayer, channel: str, message: Message
) -> None:
    """Put ``message`` for ``channel`` in ``receiver``'s inbox as a push would, without the publish."""
    seconds, _ = await raw.time()
    deadline = b"%013d" % ((int(seconds) + 60) * 1000)
    entry = deadline + b"9" * 16 + b"D" + channel.encode() + b"\x00" + receiver.encode(message)
    await raw.rpush(f"{receiver.prefix}:inbox:{{{receiver.client_token}}}", entry)


async def test_an_entry_that_missed_the_subscription_is_found_by_the_quiet_re_check(
    make: Factory,
    raw: redis_asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The safety net against a silently dead subscription: after _BLOCK_SECONDS without a
    # message the reader pops its inbox, so an entry stored without a publish is delivered.
    # A live subscription answers the reader's PING: no reconnect is needed for that.
    monkeypatch.setattr(redis_backend, "_BLOCK_SECONDS", 0.3)
    caplog.set_level(logging.DEBUG, logger="fastapi_websockets.redis")
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm"})
    assert await receiver.receive(channel, timeout=10) == {"type": "warm"}
    await store_unpublished(raw, receiver, channel, {"type": "stored"})
    assert await receiver.receive(channel, timeout=10) == {"type": "stored"}
    assert "reconnect" not in caplog.text


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_url_naming_a_protocol_still_delivers(
    redis_server: RedisNode, namespace: str, layers: list[BaseChannelLayer], protocol: int
) -> None:
    # The inbox reader picks its own protocol: one named in the url must not clash with it.
    build = layer_factory(
        layers, RedisChannelLayer, url=f"{redis_server.url}?protocol={protocol}", prefix=namespace
    )
    receiver, sender = build(), build()
    channel = await receiver.new_channel()
    for index in range(3):
        await sender.send(channel, {"type": "m", "i": index})
        assert await receiver.receive(channel, timeout=10) == {"type": "m", "i": index}


async def _is_zero(length: Any) -> bool:
    return int(await length) == 0


async def test_full_inbox_of_another_process_raises_channel_full(make: Factory) -> None:
    sender, owner = make(capacity=1), make()
    channel = await owner.new_channel("ws")
    await owner.close()  # nobody drains its inbox any more
    for _ in range(100):  # the inbox holds 100 x capacity entries
        await sender.send(channel, {"type": "x"})
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"type": "x"})


def _inbox_ids(entries: list[Any]) -> list[int]:
    return [int(entry[13:29]) for entry in entries]


async def test_a_push_past_the_inbox_limit_takes_back_only_what_does_not_fit(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    # The push script stores first and takes back what went past the limit: concurrent
    # sends share one script call, and exactly the first 100 of them must stay.
    sender, owner = make(capacity=1), make()
    channel = await owner.new_channel("ws")
    await owner.close()
    results = await asyncio.gather(
        *(sender.send(channel, {"type": "x", "i": i}) for i in range(150)), return_exceptions=True
    )
    assert results[:100] == [None] * 100
    assert all(isinstance(result, ChannelFull) for result in results[100:])
    entries = await raw.lrange(f"{sender.prefix}:inbox:{{{owner.client_token}}}", 0, -1)
    assert len(entries) == 100
    ids = _inbox_ids(entries)
    assert ids == sorted(set(ids))


async def test_expired_entries_free_room_in_an_inbox(make: Factory, raw: redis_asyncio.Redis) -> None:
    sender, owner = make(capacity=1, channel_expiry=1), make()
    channel = await owner.new_channel("ws")
    await owner.close()
    for _ in range(100):
        await sender.send(channel, {"type": "old"})
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"type": "x"})
    await asyncio.sleep(1.2)
    await sender.send(channel, {"type": "fresh"})
    assert await raw.llen(f"{sender.prefix}:inbox:{{{owner.client_token}}}") == 1


async def test_an_inbox_outlives_its_newest_entry_by_at_most_an_eighth(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    sender, owner = make(channel_expiry=8), make()
    channel = await owner.new_channel("ws")
    await owner.close()
    inbox = f"{sender.prefix}:inbox:{{{owner.client_token}}}"
    await sender.send(channel, {"type": "x"})
    assert 7_000 < await raw.pttl(inbox) <= 9_000
    # An inbox emptied by its reader is deleted; the push that creates it again sets its
    # expiry, whatever the id counter says.
    await raw.delete(inbox)
    await sender.send(channel, {"type": "x"})
    assert 7_000 < await raw.pttl(inbox) <= 9_000
    await raw.persist(inbox)
    await raw.delete(f"{sender.prefix}:seq:{{{owner.client_token}}}")
    await sender.send(channel, {"type": "x"})
    assert 7_000 < await raw.pttl(inbox) <= 9_000


async def test_ids_keep_growing_when_the_counter_is_ahead_of_the_clock(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm"})
    assert await receiver.receive(channel, timeout=10) == {"type": "warm"}
    ahead = 9_000_000_000_000_000  # ~2255 in us: far ahead of Redis's clock
    await raw.set(f"{sender.prefix}:seq:{{{receiver.client_token}}}", ahead)
    for i in range(3):
        await sender.send(channel, {"type": "m", "i": i})
    assert [(await receiver.receive(channel, timeout=10))["i"] for _ in range(3)] == [0, 1, 2]
    assert int(cast(bytes, await raw.get(f"{sender.prefix}:seq:{{{receiver.client_token}}}"))) == ahead + 3


async def test_ids_start_from_the_clock_again_when_the_counter_is_lost(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    seq = f"{sender.prefix}:seq:{{{receiver.client_token}}}"
    for i in range(3):
        await sender.send(channel, {"type": "m", "i": i})
        assert (await receiver.receive(channel, timeout=10))["i"] == i
        # Lost as in a Redis that lost its data: an INCRBY alone would start again from 1,
        # below the ids delivered, and the reader would skip the next message.
        await raw.delete(seq)


async def test_a_send_written_before_its_caller_was_cancelled_keeps_the_replies_in_step(
    make: Factory,
) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    # The sender's reader writes too as it starts (TIME, ready mark, first take): under load
    # those overlapped the send below, which then waited for the writer and was taken back.
    await _started(sender)
    await sender.send(channel, {"type": "warm"})
    assert await receiver.receive(channel, timeout=10) == {"type": "warm"}
    # With the writer idle, a lone send is written by its caller before it yields: it
    # can no longer be taken back, and its reply must not be read as a later send's.
    sending = asyncio.ensure_future(sender.send(channel, {"type": "m", "i": 0}))
    await asyncio.sleep(0)
    sending.cancel()
    for i in range(1, 4):
        await sender.send(channel, {"type": "m", "i": i})
    assert [(await receiver.receive(channel, timeout=10))["i"] for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(asyncio.CancelledError):
        await sending


async def test_the_subscription_parses_messages_split_and_joined_by_the_socket(make: Factory) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    # Messages larger than one read of the socket arrive in pieces; small ones sent
    # together arrive several to a read, and concurrent sends share one publish.
    sizes = [1, 70_000, 3, 300_000, 17, 900_000, 5, 0, 200_000]
    for i, size in enumerate(sizes):
        await sender.send(channel, {"type": "m", "i": i, "data": bytes([i]) * size})
    for i, size in enumerate(sizes):
        assert await receiver.receive(channel, timeout=10) == {"type": "m", "i": i, "data": bytes([i]) * size}
    await asyncio.gather(*(sender.send(channel, {"type": "m", "i": i}) for i in range(50)))
    got = [(await receiver.receive(channel, timeout=10))["i"] for _ in range(50)]
    assert sorted(got) == list(range(50))


async def test_a_batch_cut_after_some_replies_writes_again_only_unanswered_commands(make: Factory) -> None:
    # The writer retries a batch once on a fresh connection when its connection breaks.
    # Commands whose replies were read ran already: written again, a push would be
    # delivered twice. Here the batch's second command kills its own connection.
    layer = make()
    await layer.send(await layer.new_channel(), {"type": "warm"})  # the writer's connection is open
    key = f"{layer.prefix}:retry-count"
    [own_id] = await layer._exchange([("CLIENT", "ID")], lambda: None)
    replies = await layer._exchange(
        [("INCR", key), ("CLIENT", "KILL", "ID", own_id, "SKIPME", "no"), ("INCR", key + "2")], lambda: None
    )
    assert replies[0] == 1
    assert replies[2] == 1
    assert await layer._exchange([("GET", key)], lambda: None) == [b"1"]


def test_the_python_reply_reader_reads_what_hiredis_reads() -> None:
    # Without hiredis (a plain `pip install redis`) the subscription is parsed by
    # _PyReader: it must give, chunk by chunk, what hiredis's reader gives.
    stream = (
        b"*3\r\n$9\r\nsubscribe\r\n$3\r\nabc\r\n:1\r\n"
        + b"*3\r\n$7\r\nmessage\r\n$3\r\nabc\r\n$0\r\n\r\n"
        + b"*3\r\n$8\r\nsmessage\r\n$3\r\nabc\r\n$12\r\nline\r\nbreak!\r\n"
        + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n+OK\r\n$-1\r\n*1\r\n*1\r\n:-7\r\n"
        + b"-ERR unknown command\r\n"
    )

    def read(reader: Any, size: int) -> list[Any]:
        replies = []
        for start in range(0, len(stream), size):
            reader.feed(stream[start : start + size])
            while (reply := reader.gets()) is not False:
                replies.append(str(reply) if isinstance(reply, Exception) else reply)
        return replies

    expected = read(redis_backend._reply_reader(), len(stream))
    assert type(redis_backend._reply_reader()).__module__.startswith("hiredis")  # the extra's reader is used
    assert expected[-1] == "ERR unknown command"
    assert len(expected) == 8
    for size in (1, 2, 5, 13, len(stream)):
        assert read(redis_backend._PyReader(), size) == expected
    for reader in (redis_backend._reply_reader(), redis_backend._PyReader()):
        reader.feed(b"?oops\r\n")
        with pytest.raises(ValueError, match="reply"):  # hiredis: "... as reply type byte"
            reader.gets()


async def test_a_send_whose_writer_never_ran_fails_when_the_layer_closes(make: Factory) -> None:
    receiver, sender = make(), make(timeout=30)
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm"})
    assert await receiver.receive(channel, timeout=10) == {"type": "warm"}
    sending = asyncio.ensure_future(sender.send(channel, {"type": "m"}))
    await asyncio.sleep(0)  # written by the send itself; the writer task that reads its reply is not started
    await sender.close()
    with pytest.raises(ChannelLayerClosed):
        await sending


# ------------------------------------------------------------- no secret leaks
#
# Every layer below is given a URL with a user and the password SECRET; the password
# must appear in no raised exception (whole chain), no log record at any level, no
# repr() of the layer and nothing in its stats.


async def _errors_of_every_call(layer: RedisChannelLayer) -> list[BaseException]:
    """Run each kind of call once; return what they raised (each must be a ChannelLayerError)."""
    calls = [
        layer.send("jobs", {"type": "x"}),
        layer.group_add("room", "jobs"),
        layer.group_send("room", {"type": "x"}),
        layer.group_discard("room", "jobs"),
        layer.receive("jobs", timeout=max(1.0, layer.timeout)),
        layer.send(f"ws.{'a' * 12}!b", {"type": "x"}),
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [result for result in results if isinstance(result, BaseException)]
    assert errors, "expected the calls to fail"
    for error in errors:
        assert isinstance(error, (ChannelLayerError, TimeoutError)), repr(error)
    return errors


def _assert_nothing_leaked(
    layer: RedisChannelLayer,
    errors: list[BaseException],
    caplog: pytest.LogCaptureFixture,
    *,
    logged: bool = True,
) -> None:
    if logged:
        assert any(r.name.startswith("fastapi_websockets") for r in caplog.records), "expected a log"
    assert_no_secret(
        SECRET, errors=errors, records=caplog.records, objects=[layer, layer.stats, vars(layer.stats)]
    )


@pytest.mark.parametrize("refusal", ["connection", "auth"])
async def test_no_secret_when_redis_refuses(
    redis_server: RedisNode,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
    refusal: str,
) -> None:
    # "connection": nothing listens on the port. "auth": the test server has no such
    # user, so AUTH fails. (Without a user name, AUTH to the default user succeeds
    # with any password while that user has none.)
    caplog.set_level(logging.DEBUG)
    port = free_port() if refusal == "connection" else redis_server.port
    url = f"redis://fwuser:{SECRET}@127.0.0.1:{port}/0"
    layer = layer_factory(layers, RedisChannelLayer)(url=url, prefix=namespace, timeout=1)
    errors = await _errors_of_every_call(layer)
    # A refused login is the URL's fault, not "retry later" (login_refused).
    expected = InvalidChannelLayerConfig if refusal == "auth" else BackendUnavailable
    assert any(isinstance(e, expected) and f"127.0.0.1:{port}" in str(e) for e in errors), errors
    await asyncio.sleep(0.5)  # the reader retries and logs meanwhile
    await layer.close()
    _assert_nothing_leaked(layer, errors, caplog)


async def test_no_secret_when_a_cluster_refuses_the_password(
    redis_cluster: RedisCluster,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://fwuser:{SECRET}@127.0.0.1:{redis_cluster.nodes[0].port}/0"
    layer = layer_factory(layers, RedisChannelLayer)(url=url, prefix=namespace, cluster=True, timeout=1)
    errors = await _errors_of_every_call(layer)
    assert all(isinstance(e, InvalidChannelLayerConfig) for e in errors), errors
    assert all("refused the login (invalid username-password pair" in str(e) for e in errors), errors
    await layer.close()
    # Connecting fails before any reader starts: nothing of ours to log.
    _assert_nothing_leaked(layer, errors, caplog, logged=False)


async def test_no_secret_when_redis_does_not_answer(
    namespace: str, layers: list[BaseChannelLayer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    held: list[asyncio.StreamWriter] = []

    async def accept_and_stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept_and_stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"redis://fwuser:{SECRET}@127.0.0.1:{port}/0"
        layer = layer_factory(layers, RedisChannelLayer)(url=url, prefix=namespace, timeout=0.5)
        errors = await _errors_of_every_call(layer)
        assert any(isinstance(e, BackendUnavailable) for e in errors)
        assert held, "the layer never connected to the silent server"
        await layer.close()
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    _assert_nothing_leaked(layer, errors, caplog)


async def test_no_secret_when_redis_goes_away_mid_operation(
    restartable_redis: RedisNode,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def allow_user() -> None:
        admin = redis_asyncio.Redis.from_url(restartable_redis.url)
        try:
            await admin.execute_command(  # type: ignore[no-untyped-call]
                "ACL", "SETUSER", "fwuser", "on", f">{SECRET}", "~*", "&*", "+@all"
            )
        finally:
            await admin.aclose()

    await allow_user()
    url = f"redis://fwuser:{SECRET}@127.0.0.1:{restartable_redis.port}/0"
    build = layer_factory(layers, RedisChannelLayer, url=url, prefix=namespace, timeout=1)
    receiver, sender = build(), build()
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room", channel)
    await sender.group_send("room", {"type": "before"})
    assert await receiver.receive(channel, timeout=10) == {"type": "before"}
    waiting = asyncio.create_task(receiver.receive("jobs"))

    restartable_redis.stop()
    errors = await _errors_of_every_call(sender)
    # Back, but without the user: every reconnect attempt is refused until it exists again.
    restartable_redis.start()
    await asyncio.sleep(1)
    assert not waiting.done()
    await allow_user()
    await eventually(lambda: _sends(sender, "jobs"), "the sender gets through again")
    assert await asyncio.wait_for(waiting, 30) == {"type": "after"}
    await receiver.close()
    await sender.close()
    _assert_nothing_leaked(sender, errors, caplog)
    assert_no_secret(SECRET, objects=[receiver, receiver.stats])


async def _sends(layer: RedisChannelLayer, channel: str) -> bool:
    try:
        await layer.send(channel, {"type": "after"})
    except BackendUnavailable:
        return False
    return True


# ------------------------------------------------------------ refused logins
# One policy on every broker (BrokerChannelLayer.login_refused): a login refused before the
# layer ever connected is its URL's fault, InvalidChannelLayerConfig; one refused once it
# ran is the server's change, retried until it heals, logged at ERROR once per outage.


async def test_a_wrong_password_at_start_is_a_config_error_quoting_redis(
    redis_server: RedisNode, raw: redis_asyncio.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = f"fw-{namespace}"
    await raw.execute_command("ACL", "SETUSER", user, "on", ">right-password", "~*", "&*", "+@all")  # type: ignore[no-untyped-call]
    layer = RedisChannelLayer(
        url=f"redis://{user}:{SECRET}@127.0.0.1:{redis_server.port}/0", prefix=namespace
    )
    error = await refused_at_start(layer)
    text = str(error)
    assert f"Redis at redis://{user}:***@127.0.0.1:{redis_server.port}/0 refused the login" in text
    assert "invalid username-password pair" in text  # the server's words
    assert f"ACL SETUSER {user} on" in text  # what to fix
    assert_no_secret(errors=[error], records=caplog.records, objects=[layer])


async def test_a_password_rotated_under_a_running_layer_is_retried_and_logged_once(
    redis_server: RedisNode,
    raw: redis_asyncio.Redis,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = f"fw-{namespace}"

    async def password(value: str) -> None:
        await raw.execute_command("ACL", "SETUSER", user, "on", "resetpass", f">{value}", "~*", "&*", "+@all")  # type: ignore[no-untyped-call]

    await password(SECRET)
    url = f"redis://{user}:{SECRET}@127.0.0.1:{redis_server.port}/0"
    layer = layer_factory(layers, RedisChannelLayer, url=url, prefix=namespace, timeout=2)()
    await _started(layer)
    waiting = asyncio.create_task(layer.receive(await layer.new_channel()))
    await password("rotated-password")
    await raw.execute_command("CLIENT", "KILL", "USER", user)  # type: ignore[no-untyped-call]
    refused = await refused_while_running(layer)
    logged = login_refusals(caplog)
    assert len(logged) == 1, logged
    assert "invalid username-password pair" in logged[0]
    assert not waiting.done()
    await password(SECRET)
    await eventually(lambda: _sends(layer, "jobs"), "the layer gets through again")
    assert await layer.receive("jobs", timeout=10) == {"type": "after"}
    waiting.cancel()
    assert_no_secret(errors=refused, records=caplog.records, objects=[layer])


# ------------------------------------------------------------ ACL refusals
# A command, key or channel the user's ACL refuses (NOPERM) stays refused until someone
# grants it: an error naming the rules to grant, never "retry later", at start as later.


async def _acl_user(raw: redis_asyncio.Redis, user: str, *rules: str) -> None:
    await raw.execute_command("ACL", "SETUSER", user, "reset", "on", f">{SECRET}", *rules)  # type: ignore[no-untyped-call]


def _granted(error: BaseException, user: str) -> list[str]:
    """The ACL rules ``error`` says to grant ``user`` (what follows ``ACL SETUSER user``)."""
    found = re.search(rf"ACL SETUSER {re.escape(user)} ([^;)]+)", str(error))
    assert found is not None, str(error)
    return found[1].split()


@pytest.mark.parametrize(
    ("refused", "rules", "said"),
    [
        ("keys", ("~other:*", "&*", "+@all"), "no permissions to access one of the keys"),
        ("command", ("~*", "&*", "+@all", "-evalsha"), "no permissions to run the 'evalsha' command"),
    ],
)
async def test_a_command_the_acl_refuses_is_an_error_naming_what_to_grant(
    redis_server: RedisNode,
    raw: redis_asyncio.Redis,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
    refused: str,
    rules: tuple[str, ...],
    said: str,
) -> None:
    # It was "Redis refused EVALSHA: NOPERM ...", which named neither the user, the script,
    # its keys, nor what to grant.
    user = f"fw-{namespace}"
    await _acl_user(raw, user, *rules)
    url = f"redis://{user}:{SECRET}@127.0.0.1:{redis_server.port}/0"
    layer = layer_factory(layers, RedisChannelLayer, url=url, prefix=namespace, timeout=5)()
    for _ in range(2):  # the second as the first: asking again cannot help
        with pytest.raises(ChannelLayerError) as info:
            await layer.send("jobs", {"type": "x"})
        error = info.value
        assert not isinstance(error, (BackendUnavailable, InvalidChannelLayerConfig)), error
        text = str(error)
        assert (
            f"Redis at redis://{user}:***@127.0.0.1:{redis_server.port}/0 refused the command EVALSHA" in text
        )
        assert f"script push_named on {namespace}:chan:{{jobs}}" in text
        assert said in text  # Redis's words
        assert f"ACL SETUSER {user} ~{namespace}:* &{namespace}:wake:* " in text
        assert_no_secret(errors=[error], records=caplog.records, objects=[layer])


async def test_the_acl_rule_of_the_docs_is_the_one_a_refusal_names(
    redis_server: RedisNode, raw: redis_asyncio.Redis, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    user = f"fw-{namespace}"
    await _acl_user(raw, user)
    url = f"redis://{user}:{SECRET}@127.0.0.1:{redis_server.port}/0"
    layer = layer_factory(layers, RedisChannelLayer, url=url, timeout=5)()  # the default prefix
    with pytest.raises(ChannelLayerError) as info:
        await layer.send("jobs", {"type": "x"})
    documented = re.search(r"^ACL SETUSER app on >PASSWORD (.+)$", read_doc("docs/backends/redis.md"), re.M)
    assert documented is not None
    assert documented[1].split() == _granted(info.value, user)


@pytest.mark.parametrize("where", ["pubsub", "nopubsub", "cluster"])
async def test_the_acl_rules_a_refusal_names_are_all_the_layer_needs(
    request: pytest.FixtureRequest,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    cluster = where == "cluster"
    nodes = (
        request.getfixturevalue("redis_cluster").nodes
        if cluster
        else [request.getfixturevalue("redis_server")]
    )
    user = f"fw-{namespace}"

    def acl(*rules: str) -> None:
        for node in nodes:
            node.cli_call("ACL", "SETUSER", user, "reset", "on", f">{SECRET}", *rules)

    acl()  # may log in, and nothing else
    url = f"redis://{user}:{SECRET}@127.0.0.1:{nodes[0].port}/0"
    use_pubsub = where != "nopubsub"
    make = layer_factory(
        layers,
        RedisChannelLayer,
        url=url,
        prefix=namespace,
        use_pubsub=use_pubsub,
        cluster=cluster,
        history=HISTORY,
        timeout=5,
    )
    first = make()
    with pytest.raises(ChannelLayerError) as info:
        await first.send("jobs", {"type": "x"})
    await first.close()
    assert not isinstance(info.value, BackendUnavailable), info.value  # a cluster's map too
    acl(*_granted(info.value, user))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets"):
        receiver, sender = make(), make()
        channel = await receiver.new_channel()
        await receiver.group_add("room:1", channel)
        await receiver.presence_join("room:1", channel, {"name": "a"})
        await sender.send(channel, {"type": "direct"})
        await sender.send("jobs", {"type": "named"})
        await sender.group_send("room:1", {"type": "group"})
        got = [(await receiver.receive(channel, timeout=10))["type"] for _ in range(3)]
        assert got == ["presence.joined", "direct", "group"]
        assert (await receiver.receive("jobs", timeout=10))["type"] == "named"
        assert [m["type"] for m in (await sender.group_history("room:1")).messages] == ["group"]
        assert list(await sender.presence("room:1")) == [channel]
        await receiver.presence_leave("room:1", channel)
        await receiver.group_discard("room:1", channel)
        await receiver.flush()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("fastapi_websockets")]


async def test_a_refused_presence_heartbeat_is_logged_once_at_error_until_it_works_again(
    redis_server: RedisNode,
    raw: redis_asyncio.Redis,
    namespace: str,
    layers: list[BaseChannelLayer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It warned on every beat (three a presence_timeout) for as long as the rule was missing.
    user = f"fw-{namespace}"
    await _acl_user(raw, user, "~*", "&*", "+@all")
    url = f"redis://{user}:{SECRET}@127.0.0.1:{redis_server.port}/0"
    layer = layer_factory(layers, RedisChannelLayer, url=url, prefix=namespace, presence_timeout=0.6)()
    await layer.presence_join("room", await layer.new_channel(), {})
    caplog.set_level(logging.DEBUG, logger="fastapi_websockets")

    async def refused_six_times() -> bool:
        # Both presence tasks run scripts: one of them was refused three times at least.
        log = await raw.acl_log()
        return sum(cast(int, entry["count"]) for entry in log if entry["username"] == user) >= 6

    def said(what: str) -> list[tuple[str, str]]:
        prefix = f"presence {what} on "
        return [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith(prefix)]

    await raw.acl_setuser(user, commands=["-evalsha"])
    await eventually(refused_six_times, "six refused presence scripts")
    for what in ("heartbeat", "reaping"):
        logged = [(level, text) for level, text in said(what) if level != "DEBUG"]
        assert [level for level, _ in logged] == ["ERROR"], logged
        assert f"ACL SETUSER {user} " in logged[0][1]  # the rule to grant
    await raw.acl_setuser(user, commands=["+evalsha"])
    await eventually(lambda: "INFO" in dict(said("heartbeat")), "the heartbeat logs that it works again")
    assert [level for level, _ in said("heartbeat") if level != "DEBUG"] == ["ERROR", "INFO"]


@pytest.mark.parametrize(
    ("url", "match"),
    [
        (f"http://fwuser:{SECRET}@127.0.0.1:6379/0", "url must be a redis://"),
        (f"redis://fwuser:{SECRET}@127.0.0.1:notaport/0", "url is not a valid URL"),
        (f"redis://fwuser:{SECRET}@127.0.0.1:99999/0", "url is not a valid URL"),
    ],
    ids=["wrong-scheme", "non-numeric-port", "port-out-of-range"],
)
def test_malformed_url_is_refused_at_construction_without_the_password(url: str, match: str) -> None:
    errors: list[BaseException] = []
    with pytest.raises(InvalidChannelLayerConfig, match=match) as direct:
        RedisChannelLayer(url=url)
    errors.append(direct.value)
    with pytest.raises(InvalidChannelLayerConfig) as mapped:
        get_channel_layer({"default": {"BACKEND": "redis", "CONFIG": {"url": url}}})
    errors.append(mapped.value)
    with pytest.raises(InvalidChannelLayerConfig) as from_env:
        get_channel_layer_from_env(
            {"FASTAPI_WEBSOCKETS_BACKEND": "redis", "FASTAPI_WEBSOCKETS_REDIS_URL": url}
        )
    errors.append(from_env.value)
    assert_no_secret(SECRET, errors=errors)


# -------------------------------------------------------------------- history

HISTORY = {"room:*": {"size": 5, "ttl": 600}, "short:*": {"size": 100, "ttl": 0.5}}

# One OS process sending to a history group as fast as it can; prints its offsets.
_SENDER = """
import asyncio, json, sys
from fastapi_websockets.backends.redis import RedisChannelLayer

async def main(url, prefix):
    async with RedisChannelLayer(url=url, prefix=prefix, history={"room:*": 1000}) as layer:
        positions = [await layer.group_send("room:p", {"type": "m", "i": i}) for i in range(60)]
    print(json.dumps([[p.offset, p.epoch] for p in positions]))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_history_offsets_from_several_processes_are_contiguous(
    make: Factory, redis_server: RedisNode, namespace: str
) -> None:
    layer = make(history={"room:*": 1000})
    await layer.group_send("room:p", {"type": "m", "i": -1})
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SENDER, redis_server.url, namespace, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    outputs = [await child.communicate() for child in children]
    assert [child.returncode for child in children] == [0, 0, 0]
    per_process = [json.loads(stdout) for stdout, _ in outputs]
    offsets = [offset for positions in per_process for offset, _ in positions]
    assert sorted(offsets) == list(range(2, 2 + 3 * 60))
    assert {epoch for positions in per_process for _, epoch in positions} == {
        (await layer.group_history("room:p", limit=1)).position.epoch
    }
    for positions in per_process:
        assert [offset for offset, _ in positions] == sorted(offset for offset, _ in positions)
    page = await layer.group_history("room:p")
    assert [m["_position"]["offset"] for m in page.messages] == list(range(1, 2 + 3 * 60))
    assert page.recovered


async def test_history_trims_by_size_and_ttl_in_redis(make: Factory, raw: redis_asyncio.Redis) -> None:
    layer = make(history=HISTORY)
    for i in range(12):
        await layer.group_send("room:t", {"type": "m", "i": i})
    entries = f"{layer.prefix}:history:{{room:t}}"
    meta = f"{layer.prefix}:hmeta:{{room:t}}"
    assert await raw.llen(entries) == 5
    assert await raw.hget(meta, "offset") == b"12"
    # The whole history expires ttl after its last append.
    assert 590_000 < await raw.pttl(entries) <= 600_000
    assert 590_000 < await raw.pttl(meta) <= 600_000

    await layer.group_send("short:t", {"type": "m"})
    assert 0 < await raw.pttl(f"{layer.prefix}:history:{{short:t}}") <= 500
    await asyncio.sleep(0.7)
    assert await raw.exists(f"{layer.prefix}:history:{{short:t}}", f"{layer.prefix}:hmeta:{{short:t}}") == 0


async def test_groups_without_history_write_no_history_key(make: Factory, raw: redis_asyncio.Redis) -> None:
    layer = make(history=HISTORY)
    await layer.group_add("lobby", await layer.new_channel())
    await layer.group_send("lobby", {"type": "m"})
    keys = [key async for key in raw.scan_iter(match=f"{layer.prefix}:*")]
    assert keys
    assert not [key for key in keys if b":history:" in key or b":hmeta:" in key]


async def test_history_group_send_costs_its_store_and_a_push_per_process(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    sender, first, second = make(history=HISTORY), make(), make()
    for owner in (first, second):
        for group in ("room:cost", "plain"):
            await owner.group_add(group, await owner.new_channel("ws"))
    await first.close()
    await second.close()
    await _started(sender)
    calls = []
    for group in ("plain", "room:cost"):
        await raw.config_resetstat()
        await sender.group_send(group, {"type": "fan"})
        stats = await raw.info("commandstats")
        calls.append({name: value["calls"] for name, value in stats.items() if name != "cmdstat_config"})
    plain, history = calls
    # Plain: one script reads the owners and pushes to their inboxes. History: one script
    # stores the entry and reads the owners, then one push per owning process (the copy
    # they get carries the offset, known only once stored).
    assert plain["cmdstat_evalsha"] == 1
    assert history["cmdstat_evalsha"] == 3
    assert plain["cmdstat_rpush"] == 2
    assert history["cmdstat_rpush"] == 3  # the two inboxes and the history list


async def test_history_wiped_out_of_band_gets_a_new_epoch(make: Factory, raw: redis_asyncio.Redis) -> None:
    layer = make(history=HISTORY)
    channel = await layer.new_channel()
    await layer.group_add("room:w", channel)
    first = await layer.group_send("room:w", {"type": "m"})
    assert first is not None
    await raw.delete(f"{layer.prefix}:hmeta:{{room:w}}")
    second = await layer.group_send("room:w", {"type": "m"})
    assert second is not None
    assert second.epoch != first.epoch
    assert second.offset == 1
    # The entries list alone lost: the stored history is gone, so is its epoch.
    await raw.delete(f"{layer.prefix}:history:{{room:w}}")
    page = await layer.group_history("room:w", since=second)
    assert not page.recovered
    assert page.position.epoch not in (first.epoch, second.epoch)
    assert page.position.offset == 0
    third = await layer.group_send("room:w", {"type": "m"})
    assert third == (1, page.position.epoch)
    # Membership is not history: the member still got every message.
    got = [await layer.receive(channel, timeout=5) for _ in range(3)]
    assert [m["_position"]["epoch"] for m in got] == [first.epoch, second.epoch, third.epoch]


async def test_history_survives_a_restart_when_redis_persists(
    restartable_redis: RedisNode, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    build = layer_factory(layers, RedisChannelLayer, url=restartable_redis.url, prefix=namespace, timeout=1)
    layer = build(history=HISTORY)
    positions = [await layer.group_send("room:r", {"type": "m", "i": i}) for i in range(3)]
    first = positions[0]
    assert first is not None
    restartable_redis.cli_call("SAVE")  # the dump the restarted server loads
    restartable_redis.stop()
    restartable_redis.start()
    reader = build(history=HISTORY)
    page = await reader.group_history("room:r", since=first)
    assert page.recovered
    assert [m["i"] for m in page.messages] == [1, 2]
    assert page.position == positions[-1]
    after = await layer.group_send("room:r", {"type": "m", "i": 3})
    assert after == (4, first.epoch)

    # Without a dump, the history is lost: a new epoch, offsets start again.
    (restartable_redis.workdir / "dump.rdb").unlink()
    restartable_redis.stop()
    restartable_redis.start()
    lost = await reader.group_history("room:r", since=after)
    assert not lost.recovered
    assert lost.messages == []
    assert lost.position.epoch != first.epoch


async def test_cluster_history_keys_share_the_slot_of_their_group(
    redis_cluster: RedisCluster, cluster_raw: ClusterClient, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    build = layer_factory(layers, RedisChannelLayer, url=redis_cluster.url, prefix=namespace, cluster=True)
    sender, receiver = build(history=HISTORY), build(history=HISTORY)
    group = "room:{odd}name}"
    channel = await receiver.new_channel("ws")
    await receiver.group_add(group, channel)
    position = await sender.group_send(group, {"type": "m"})
    assert position is not None
    assert (await receiver.receive(channel, timeout=10))["_position"] == position.as_dict()
    tag = "{room:%7Bodd%7Dname%7D}"
    keys = {key.decode() async for key in cluster_raw.scan_iter(match=f"{namespace}:*")}
    assert {f"{namespace}:history:{tag}", f"{namespace}:hmeta:{tag}"} <= keys
    kinds = ("group", "owners", "history", "hmeta")
    slots = {key_slot(f"{namespace}:{kind}:{tag}".encode()) for kind in kinds}
    assert len(slots) == 1


# ------------------------------------------------------------------- presence

# One OS process that joins presence and waits to be killed; prints its token.
_PRESENT = """
import asyncio, sys
from fastapi_websockets.backends.redis import RedisChannelLayer

async def main(url, prefix):
    layer = RedisChannelLayer(url=url, prefix=prefix, presence_timeout=1)
    for group in ("room:a", "room:b"):
        for _ in range(3):
            await layer.presence_join(group, await layer.new_channel("ws"), {"g": group}, notify=False)
    print(layer.client_token, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def _presence_keys(raw: redis_asyncio.Redis, prefix: str) -> set[str]:
    keys = {key.decode() async for key in raw.scan_iter(match=f"{prefix}:*")}
    return {key for key in keys if key.split(":")[1] in ("presence", "plive", "pgroups")}


async def test_presence_data_in_redis_after_join_leave_and_close(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    layer, other = make(), make()
    prefix, token = layer.prefix, layer.client_token
    live, groups = f"{prefix}:plive:{{presence}}", f"{prefix}:pgroups:{{presence}}:{token}"
    assert await _presence_keys(raw, prefix) == set()
    await layer.group_add("room:x", await layer.new_channel("ws"))
    assert await _presence_keys(raw, prefix) == set()  # groups alone write no presence key

    first, second = await layer.new_channel("ws"), await layer.new_channel("ws")
    await layer.presence_join("room:x", first, {"n": 1})
    await layer.presence_join("room:x", second, {"n": 2})
    await layer.presence_join("room:y", first, {"n": 3})
    assert await _presence_keys(raw, prefix) == {
        f"{prefix}:presence:{{room:x}}",
        f"{prefix}:presence:{{room:y}}",
        live,
        groups,
    }
    assert await raw.hlen(f"{prefix}:presence:{{room:x}}") == 2
    assert await raw.smembers(groups) == {b"room:x", b"room:y"}
    assert await raw.zscore(live, token) is not None

    await layer.presence_leave("room:x", first)
    assert await raw.smembers(groups) == {b"room:x", b"room:y"}  # second is still in room:x
    await layer.presence_leave("room:x", second)
    assert await raw.smembers(groups) == {b"room:y"}
    assert not await raw.exists(f"{prefix}:presence:{{room:x}}")
    await layer.presence_leave("room:y", first)
    assert await _presence_keys(raw, prefix) == set()

    await layer.presence_join("room:z", first, {"n": 4})
    await other.presence_join("room:z", await other.new_channel("ws"), {"n": 5})
    await layer.close()
    # The closing layer leaves no record behind; the other's entry and records stay.
    assert set(await other.presence("room:z")) != {first}
    assert await raw.hlen(f"{prefix}:presence:{{room:z}}") == 1
    assert await raw.zrange(live, 0, -1) == [other.client_token.encode()]
    assert not await raw.exists(groups)


async def test_a_dead_process_is_reaped_once_and_leaves_nothing(
    make: Factory, raw: redis_asyncio.Redis, redis_server: RedisNode, namespace: str
) -> None:
    reapers = [make(presence_timeout=1) for _ in range(3)]
    watcher = await reapers[0].new_channel("ws")
    for group in ("room:a", "room:b"):
        await reapers[0].group_add(group, watcher)
    for layer in reapers:
        await layer.presence_join("room:a", await layer.new_channel("ws"), {"live": True}, notify=False)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PRESENT, redis_server.url, namespace, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        dead = (await child.stdout.readline()).decode().strip()
        assert dead
        assert len(await reapers[1].presence("room:b")) == 3
    finally:
        child.kill()
        await child.wait()
    # Every reaper beats (and reaps) on its own; each leave is announced exactly once.
    left = [await reapers[0].receive(watcher, timeout=10) for _ in range(6)]
    assert {event["type"] for event in left} == {"presence.left"}
    assert sorted(event["info"]["g"] for event in left) == ["room:a"] * 3 + ["room:b"] * 3
    assert len({event["channel"] for event in left}) == 6
    for layer in reapers:
        await layer.presence_heartbeat()
    with pytest.raises(TimeoutError):
        await reapers[0].receive(watcher, timeout=0.5)

    prefix = namespace
    assert await _presence_keys(raw, prefix) == {
        f"{prefix}:presence:{{room:a}}",
        f"{prefix}:plive:{{presence}}",
        *(f"{prefix}:pgroups:{{presence}}:{layer.client_token}" for layer in reapers),
    }
    live = cast("list[bytes]", await raw.zrange(f"{prefix}:plive:{{presence}}", 0, -1))
    assert {token.decode() for token in live} == {layer.client_token for layer in reapers}
    live = cast("list[bytes]", await raw.zrange(f"{prefix}:plive:{{presence}}", 0, -1))
    assert dead not in {token.decode() for token in live}
    assert await raw.hlen(f"{prefix}:presence:{{room:a}}") == 3


async def test_a_failed_announcement_of_a_reaped_entry_does_not_stop_the_others(
    make: Factory, redis_server: RedisNode, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No presence of its own: the reaper beats only when the test says so.
    reaper = make(presence_timeout=1)
    watcher = await reaper.new_channel("ws")
    for group in ("room:a", "room:b"):
        await reaper.group_add(group, watcher)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PRESENT, redis_server.url, namespace, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert (await child.stdout.readline()).strip()
        assert len(await reaper.presence("room:a")) == 3
    finally:
        child.kill()
        await child.wait()

    async def expired() -> bool:
        return await reaper.presence("room:a") == {} and await reaper.presence("room:b") == {}

    await eventually(expired, "the killed process's entries are no longer listed")
    # Reaping claims all six entries at once; the first announcement fails.
    fired = fail_once(monkeypatch, RedisChannelLayer, "_group_send")
    with pytest.raises(InjectedFault):
        await reaper.presence_heartbeat()
    assert fired
    left = [await reaper.receive(watcher, timeout=10) for _ in range(5)]
    assert {event["type"] for event in left} == {"presence.left"}
    assert len({event["channel"] for event in left}) == 5
    with pytest.raises(TimeoutError):
        await reaper.receive(watcher, timeout=0.5)


async def test_presence_heartbeat_costs_the_same_whatever_the_members(
    make: Factory, raw: redis_asyncio.Redis
) -> None:
    # A long timeout: the background beat runs once at the first join, then sleeps.
    small, large = make(presence_timeout=300), make(presence_timeout=300)
    await small.presence_join("room:h", await small.new_channel("ws"), notify=False)
    for i in range(1000):
        await large.presence_join(f"room:h{i % 10}", await large.new_channel("ws"), notify=False)
    calls = []
    for layer in (small, large):
        await raw.config_resetstat()
        await layer.presence_heartbeat()
        stats = await raw.info("commandstats")
        calls.append(
            {name: value["calls"] for name, value in stats.items() if not name.startswith("cmdstat_config")}
        )
    # One script refreshes the owner record, one lists the owners to find dead ones.
    assert (
        calls[0]
        == calls[1]
        == {"cmdstat_evalsha": 2, "cmdstat_zadd": 1, "cmdstat_zrange": 1, "cmdstat_time": 2}
    )


async def test_presence_is_back_within_a_heartbeat_after_a_restart(
    restartable_redis: RedisNode, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    build = layer_factory(
        layers,
        RedisChannelLayer,
        url=restartable_redis.url,
        prefix=namespace,
        timeout=1,
        presence_timeout=1.5,
    )
    owner, viewer = build(), build()
    mine = {await owner.new_channel("ws"): {"i": i} for i in range(50)}
    for channel, info in mine.items():
        await owner.presence_join("room:r" if info["i"] % 2 else "lobby", channel, info, notify=False)
    theirs = await viewer.new_channel("ws")
    await viewer.presence_join("lobby", theirs, {"viewer": True}, notify=False)
    expected_lobby = {c: i for c, i in mine.items() if not i["i"] % 2} | {theirs: {"viewer": True}}
    assert await viewer.presence("lobby") == expected_lobby

    restartable_redis.stop()
    restartable_redis.start()  # empty: no persistence

    async def restored() -> bool:
        try:
            lobby, room = await viewer.presence("lobby"), await viewer.presence("room:r")
        except BackendUnavailable:
            return False
        return lobby == expected_lobby and room == {c: i for c, i in mine.items() if i["i"] % 2}

    await eventually(restored, "every live process stores its presence entries again")


async def test_a_restore_that_failed_is_tried_again_at_the_next_beat(
    make: Factory, raw: redis_asyncio.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, viewer = make(), make()
    mine = {await owner.new_channel("ws"): {"i": i} for i in range(5)}
    for channel, info in mine.items():
        await owner.presence_join("lobby", channel, info, notify=False)
    assert await viewer.presence("lobby") == mine

    # Redis loses the presence records (as after a restart without persistence).
    presence_keys = [key async for key in raw.scan_iter(match=f"{namespace}:p*")]
    assert presence_keys
    await raw.delete(*presence_keys)
    assert await viewer.presence("lobby") == {}

    # The beat sees the loss and stores its record again, but storing the entries fails.
    fired = fail_once(monkeypatch, RedisChannelLayer, "_presence_put")
    with pytest.raises(InjectedFault):
        await owner.presence_heartbeat()
    assert fired
    assert await viewer.presence("lobby") == {}

    # The record is back, so only the layer knows the entries are still missing.
    await owner.presence_heartbeat()
    assert await viewer.presence("lobby") == mine


async def test_cluster_presence_keys_by_slot(
    redis_cluster: RedisCluster, cluster_raw: ClusterClient, namespace: str, layers: list[BaseChannelLayer]
) -> None:
    build = layer_factory(layers, RedisChannelLayer, url=redis_cluster.url, prefix=namespace, cluster=True)
    first, second = build(), build()
    groups = [f"room:{i}" for i in range(8)]
    for layer in (first, second):
        for group in groups:
            await layer.presence_join(group, await layer.new_channel("ws"), {"g": group}, notify=False)
    assert len(await second.presence("room:{odd}")) == 0
    assert [len(await first.presence(group)) for group in groups] == [2] * len(groups)
    keys = {key.decode() async for key in cluster_raw.scan_iter(match=f"{namespace}:*")}
    records = {key for key in keys if key.split(":")[1] in ("plive", "pgroups")}
    assert len(records) == 3
    assert len({key_slot(key.encode()) for key in records}) == 1  # a claim is one script
    # A group's presence lives in its group's slot; the groups spread over the cluster.
    slots = {key_slot(f"{namespace}:presence:{{{group}}}".encode()) for group in groups}
    assert {key_slot(f"{namespace}:group:{{{group}}}".encode()) for group in groups} == slots
    nodes = {cluster_raw.get_node_from_key(f"{namespace}:presence:{{{group}}}") for group in groups}
    assert len({node.name for node in nodes if node is not None}) > 1
    await first.close()
    assert [len(await second.presence(group)) for group in groups] == [1] * len(groups)
