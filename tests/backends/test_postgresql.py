"""Behaviour only the PostgreSQL backend has, against a real server (no mocks)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import random
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, cast

import asyncpg
import pytest

from fastapi_websockets import (
    BaseChannelLayer,
    ChannelFull,
    ChannelLayerClosed,
    ChannelLayerError,
    StreamPosition,
    get_channel_layer,
    get_channel_layer_from_env,
)
from fastapi_websockets.backends import postgresql
from fastapi_websockets.backends.postgresql import (
    PostgreSQLChannelLayer,
    StatementRefused,
    lock_key,
    notify_channel,
)
from fastapi_websockets.exceptions import BackendUnavailable, InvalidChannelLayerConfig
from tests.conftest import layer_factory
from tests.faults import (
    TcpProxy,
    eventually,
    give_up_joins,
    login_refusals,
    refused_at_start,
    refused_while_running,
)
from tests.leaks import SECRET, assert_no_secret
from tests.servers import free_port
from tests.servers.certs import Certificates
from tests.servers.postgresql import PostgresServer

Factory = Callable[..., PostgreSQLChannelLayer]


@pytest.fixture
def make(postgresql_server: PostgresServer, namespace: str, layers: list[BaseChannelLayer]) -> Factory:
    return layer_factory(layers, PostgreSQLChannelLayer, dsn=postgresql_server.dsn, schema=namespace)


@pytest.fixture
async def db(postgresql_server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgresql_server.dsn)
    yield conn
    await conn.close()


async def backends_of(db: asyncpg.Connection, layer: PostgreSQLChannelLayer) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE $1",
        layer.application_name + "%",
    )


# ----------------------------------------------------------------- durability


async def test_named_message_survives_layer_restart(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    sender = make()
    await sender.send("durable.jobs", {"type": "job", "blob": b"\x00\xff"})
    await sender.close()
    stored = await db.fetchval(f'SELECT count(*) FROM "{namespace}".message WHERE queue = $1', "durable.jobs")
    assert stored == 1
    receiver = make()
    assert await receiver.receive("durable.jobs", timeout=10) == {"type": "job", "blob": b"\x00\xff"}
    assert await db.fetchval(f'SELECT count(*) FROM "{namespace}".message') == 0


async def test_close_forgets_this_instances_memberships(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    layer, other = make(), make()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await layer.group_add("room", "named.member")
    await other.group_add("room", await other.new_channel())
    await layer.close()
    owners = await db.fetch(f'SELECT channel, owner FROM "{namespace}".group_member ORDER BY channel')
    assert [row["channel"] for row in owners] != []
    assert channel not in [row["channel"] for row in owners]
    assert "named.member" in [row["channel"] for row in owners]


async def test_close_forgets_its_rows_on_a_connection_it_has(
    make: Factory, postgresql_server: PostgresServer
) -> None:
    # close() once took the cancelled listener for a lost one and expired the pool's
    # sessions: its last statements then opened a new connection (a TLS handshake, on a
    # slow server up to `timeout`), and a connect close() cut could outlive it.
    async with TcpProxy(postgresql_server.port) as proxy:
        layer = make(dsn=postgresql_server.dsn.replace(str(postgresql_server.port), str(proxy.port)))
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        opened = proxy.accepted
        await layer.close()
        assert proxy.accepted == opened


async def test_close_after_the_schema_was_lost_still_lets_go_of_every_connection(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # A crash under asynchronous commit can lose the schema (or someone dropped it): close()
    # cannot forget this instance's rows then, but must not raise asyncpg's error at the
    # caller or skip closing its pool.
    layer = make()
    await layer.group_add("room", await layer.new_channel())
    assert await backends_of(db, layer)
    await db.execute(f'DROP SCHEMA "{namespace}" CASCADE')
    await layer.close()
    assert layer.closed

    async def gone() -> bool:
        return await backends_of(db, layer) == []

    await eventually(gone, "the closed layer's connections to end")


async def test_tables_dropped_under_a_running_layer_are_created_again(
    make: Factory, db: asyncpg.Connection, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Someone drops the schema while layers run: the next statements create it again (as
    # a restarted layer would) instead of failing with asyncpg's UndefinedTableError; a
    # layer that may not create tables says what to do.
    layer, sender = make(), make()
    checker = make(ensure_schema=False)
    channel = await layer.new_channel()
    for started in (sender, checker):
        await started.new_channel()  # started while the tables exist
    await db.execute(f'DROP SCHEMA "{namespace}" CASCADE')
    with pytest.raises(ChannelLayerError, match="ensure_schema=True"):
        await checker.send("jobs", {"type": "x"})
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets"):
        await sender.send(channel, {"type": "after", "n": 1})
        await sender.group_send("room", {"type": "nobody"})
    assert [r for r in caplog.records if "created them again" in r.getMessage()]
    assert await layer.receive(channel, timeout=10) == {"type": "after", "n": 1}
    await layer.group_add("room", channel)
    await sender.group_send("room", {"type": "room", "n": 2})
    assert await layer.receive(channel, timeout=10) == {"type": "room", "n": 2}
    await checker.send("jobs", {"type": "x"})  # the tables are back for it too
    assert await checker.receive("jobs", timeout=10) == {"type": "x"}


# -------------------------------------------------------------------- fan-out


async def test_group_send_stores_one_row_per_owning_process(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    layer = make()
    # Members of two other (absent) processes, plus a named channel.
    for index in range(50):
        await layer.group_add("room", f"ws.aaaa1111!m{index}")
        await layer.group_add("room", f"ws.bbbb2222!m{index}")
    await layer.group_add("room", "room.log")
    listener = await asyncpg.connect(dsn=layer.dsn)
    seen: list[tuple[str, str]] = []
    names = {notify_channel(namespace, queue): queue for queue in ("!aaaa1111", "!bbbb2222", "room.log")}
    for name in names:
        await listener.add_listener(name, lambda _c, _p, ch, payload: seen.append((names[ch], payload)))
    try:
        await layer.group_send("room", {"type": "hello"})
        # Each owner was told of its members (one notice each, in its inbox); the
        # group message itself names only the group.
        rows = await db.fetch(f'SELECT queue, targets FROM "{namespace}".message ORDER BY queue, id')
        notices = [row for row in rows if row["targets"] and row["targets"][1] == "j"]
        assert len(notices) == 100
        messages = [(row["queue"], row["targets"]) for row in rows if row not in notices]
        assert messages == [
            ("!aaaa1111", [None, "g", "room"]),
            ("!bbbb2222", [None, "g", "room"]),
            ("room.log", None),
        ]
        await eventually(lambda: _true(len(seen) >= 3), "three notifications")
        await asyncio.sleep(0.2)
        # The owners' notifications carry the message (no claim needed); the named channel's is empty.
        assert sorted((queue, payload.split(" ")[1:3]) for queue, payload in seen) == [
            ("!aaaa1111", ["room", "-"]),
            ("!bbbb2222", ["room", "-"]),
            ("room.log", []),
        ]
    finally:
        await listener.close()


async def _true(value: bool) -> bool:
    return value


async def test_only_a_layer_with_channels_listens_on_its_inbox(make: Factory) -> None:
    # Every NOTIFY in the database wakes every session that LISTENs on anything:
    # a layer that only sends keeps its LISTEN session out of that.
    sender, receiver = make(), make()
    await sender.send("warm.up", {"type": "warm"})

    async def listening(layer: PostgreSQLChannelLayer) -> list[str]:
        assert layer._listener is not None
        async with layer._listen_lock:
            return list(
                await layer._listener.fetchval("SELECT array_agg(c) FROM pg_listening_channels() c") or []
            )

    assert await listening(sender) == []
    channel = await receiver.new_channel()
    # Sent the moment the name exists: the LISTEN took effect before new_channel() returned.
    await sender.send(channel, {"type": "first"})
    await sender.group_add("room", channel)
    await sender.group_send("room", {"type": "second"})
    assert [(await receiver.receive(channel, timeout=10))["type"] for _ in range(2)] == ["first", "second"]
    assert await listening(receiver) == [notify_channel(receiver.schema, "!" + receiver.client_token)]
    assert await listening(sender) == []


async def test_members_changed_by_another_process_get_exactly_the_next_messages(make: Factory) -> None:
    # The owner delivers group rows to its own record of members: another
    # process's group_add/group_discard of its channels reaches that record
    # ahead of the next group message, even when the member count stays the same.
    owner, other, sender = make(), make(), make()
    first, second = await owner.new_channel(), await owner.new_channel()
    await other.group_add("room", first)
    await sender.group_send("room", {"type": "one"})
    assert (await owner.receive(first, timeout=10))["type"] == "one"
    await other.group_discard("room", first)
    await other.group_add("room", second)  # same count as before, another member
    await sender.group_send("room", {"type": "two"})
    assert (await owner.receive(second, timeout=10))["type"] == "two"
    with pytest.raises(TimeoutError):
        await owner.receive(first, timeout=0.5)


async def test_a_process_has_one_owner_row_per_group_while_it_has_members(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # group_send reads these rows, not the members: the row must outlive every
    # live member (whoever adds or discards them) and go with the last one.
    owner, other = make(), make()
    first, second = await owner.new_channel(), await owner.new_channel()

    async def owner_rows() -> list[tuple[str, str]]:
        rows = await db.fetch(f'SELECT group_name, owner FROM "{namespace}".group_owner ORDER BY 1')
        return [(row["group_name"], row["owner"]) for row in rows]

    await owner.group_add("room", first)
    await other.group_add("room", second)
    await other.group_add("lobby", second)
    token = owner.client_token
    assert await owner_rows() == [("lobby", token), ("room", token)]
    await other.group_discard("room", first)
    assert await owner_rows() == [("lobby", token), ("room", token)]
    await owner.group_discard("room", second)
    assert await owner_rows() == [("lobby", token)]
    await owner.group_discard("room", second)  # not a member: nothing changes
    await owner.close()  # a closed process's rows go with it
    assert await owner_rows() == []


async def test_concurrent_joins_and_leaves_never_lose_the_owner_row(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # Leaves of the last members race joins of new ones, from several layers:
    # wherever the process still has a member, its owner row is there.
    owner, others = make(), [make() for _ in range(3)]
    channels = [await owner.new_channel() for _ in range(6)]
    for round_ in range(10):
        joining, leaving = channels[round_ % 2 :: 2], channels[(round_ + 1) % 2 :: 2]
        await asyncio.gather(
            *(layer.group_add("race", channel) for layer, channel in zip(others, joining, strict=True)),
            *(layer.group_discard("race", channel) for layer, channel in zip(others, leaving, strict=True)),
        )
        members = await db.fetchval(
            f'SELECT count(*) FROM "{namespace}".group_member WHERE group_name = $1', "race"
        )
        rows = await db.fetchval(
            f'SELECT count(*) FROM "{namespace}".group_owner WHERE group_name = $1', "race"
        )
        assert (members, rows) == (3, 1)


async def test_members_added_by_another_process_expire_one_by_one(make: Factory) -> None:
    # The owner's record of members another process added expires member by
    # member, like the table: a refresh (another add) keeps only that member.
    owner, other, sender = make(group_expiry=3), make(group_expiry=3), make()
    old, new = await owner.new_channel(), await owner.new_channel()
    await sender.new_channel()  # connected before the clock matters
    await other.group_add("expiring", old)
    await asyncio.sleep(1.5)
    await other.group_add("expiring", new)
    await sender.group_send("expiring", {"type": "both"})
    assert (await owner.receive(old, timeout=10))["type"] == "both"
    assert (await owner.receive(new, timeout=10))["type"] == "both"
    await asyncio.sleep(1.6)
    await sender.group_send("expiring", {"type": "one"})
    assert (await owner.receive(new, timeout=10))["type"] == "one"
    with pytest.raises(TimeoutError):
        await owner.receive(old, timeout=0.3)
    assert owner.local_groups.members("expiring") == [new]


async def test_membership_changes_made_while_the_owner_cannot_listen_reach_it(
    make: Factory, db: asyncpg.Connection
) -> None:
    # Notices and group rows stored while the owner's LISTEN connection is down
    # have no notification to ride: the owner claims them, in order, once back.
    owner, other, sender = make(), make(), make()
    first, second = await owner.new_channel(), await owner.new_channel()
    await other.group_add("room", first)
    await sender.group_send("room", {"type": "before"})
    assert (await owner.receive(first, timeout=10))["type"] == "before"
    (listen_pid,) = [
        r["pid"] for r in await backends_of(db, owner) if r["application_name"].endswith(":listen")
    ]
    assert await db.fetchval("SELECT pg_terminate_backend($1)", listen_pid)
    await other.group_discard("room", first)
    await other.group_add("room", second)  # the same count: only the notices tell the change
    await sender.group_send("room", {"type": "meanwhile"})
    assert (await owner.receive(second, timeout=10))["type"] == "meanwhile"
    with pytest.raises(TimeoutError):
        await owner.receive(first, timeout=0.5)
    assert owner.local_groups.members("room") == [second]


async def test_group_rows_too_big_for_a_notification_are_claimed(make: Factory) -> None:
    owner, sender = make(), make()
    channels = [await owner.new_channel() for _ in range(3)]
    for channel in channels:
        await owner.group_add("room", channel)
    body = bytes(range(256)) * 100  # base64 over 8000 bytes: an empty NOTIFY, then a claim
    await sender.group_send("room", {"type": "big", "body": body})
    await sender.group_send("room", {"type": "small"})
    for channel in channels:
        assert (await owner.receive(channel, timeout=10))["body"] == body
        assert (await owner.receive(channel, timeout=10))["type"] == "small"


async def test_a_group_message_whose_notification_would_just_pass_the_limit_is_claimed(
    make: Factory,
) -> None:
    owner, sender = make(), make()
    channels = [await owner.new_channel() for _ in range(2)]
    for channel in channels:
        await owner.group_add("room", channel)
    # Encoded, just under the size the writer still base64-encodes for a notification; with
    # the row's head ("g<id> room - - ") the payload passes 8000 bytes, so it goes out empty.
    body = b"x" * 5900
    while len(sender.encode({"type": "edge", "body": body})) < 5996:
        body += b"x"
    assert len(sender.encode({"type": "edge", "body": body})) < 6000
    await sender.group_send("room", {"type": "edge", "body": body})
    await sender.group_send("room", {"type": "small"})
    for channel in channels:
        assert (await owner.receive(channel, timeout=10))["body"] == body
        assert (await owner.receive(channel, timeout=10))["type"] == "small"


async def test_notify_payload_stays_small_for_a_large_message(make: Factory, namespace: str) -> None:
    sender, receiver = make(), make()
    channel = await receiver.new_channel()
    listener = await asyncpg.connect(dsn=sender.dsn)
    payloads: list[str] = []
    for queue in ("big.named", "!" + receiver.client_token):
        await listener.add_listener(notify_channel(namespace, queue), lambda *args: payloads.append(args[3]))
    body = bytes(range(256)) * 2000
    try:
        await sender.send("big.named", {"type": "big", "body": body})
        await sender.send(channel, {"type": "big", "body": body})
        assert (await receiver.receive("big.named", timeout=10))["body"] == body
        assert (await receiver.receive(channel, timeout=10))["body"] == body
        await eventually(lambda: _true(len(payloads) >= 2), "two notifications")
        assert all(len(payload) < 100 for payload in payloads)
    finally:
        await listener.close()


async def test_one_burst_to_two_inboxes_and_over_a_payload_arrives_in_order(make: Factory) -> None:
    # A burst made in one pass is one statement: to one inbox within one payload it takes
    # the lean statement, otherwise the general one (payloads per inbox and per 8000
    # bytes, an oversized row claimed). Both must keep each channel's order.
    sender, first, second = make(capacity=500), make(capacity=500), make(capacity=500)
    mine = [await first.new_channel("wé"), await first.new_channel("w")]
    theirs = await second.new_channel("w")
    await sender.send(theirs, {"type": "warm"})
    assert (await second.receive(theirs, timeout=10))["type"] == "warm"
    big = "x" * 3000  # three of these overflow one payload
    sends = [
        sender.send(mine[i % 2], {"type": "n", "i": i, "pad": big if i % 5 == 0 else ""}) for i in range(40)
    ]
    sends += [sender.send(theirs, {"type": "n", "i": i}) for i in range(10)]
    sends.append(sender.send(mine[0], {"type": "n", "i": 40, "pad": "y" * 9000}))  # claimed
    sends += [sender.send(mine[0], {"type": "n", "i": i}) for i in (42, 44)]
    await asyncio.gather(*sends)
    got: dict[str, list[int]] = {channel: [] for channel in (*mine, theirs)}
    for channel, count in ((mine[0], 23), (mine[1], 20), (theirs, 10)):
        for _ in range(count):
            got[channel].append(
                (await (second if channel == theirs else first).receive(channel, timeout=10))["i"]
            )
    assert got == {
        mine[0]: [*range(0, 41, 2), 42, 44],
        mine[1]: list(range(1, 40, 2)),
        theirs: list(range(10)),
    }
    # ... and nothing more came (no row delivered twice, from its notification and a claim).
    for layer, channel in ((first, mine[0]), (first, mine[1]), (second, theirs)):
        with pytest.raises(TimeoutError):
            await layer.receive(channel, timeout=0.3)


async def test_long_names_map_to_short_notify_channels(make: Factory) -> None:
    sender, receiver = make(), make()
    long_name = "n." + "x" * 190 + ".é"
    assert len(notify_channel(receiver.schema, long_name).encode()) <= 63
    waiter = asyncio.create_task(receiver.receive(long_name, timeout=10))
    await asyncio.sleep(0.3)
    await sender.send(long_name, {"type": "long"})
    assert (await waiter)["type"] == "long"
    group = "g." + "y" * 195
    await receiver.group_add(group, long_name)
    await sender.group_send(group, {"type": "via-group"})
    assert (await receiver.receive(long_name, timeout=10))["type"] == "via-group"


# ------------------------------------------------------------------ resources


async def test_hundreds_of_receivers_share_a_few_connections(make: Factory, db: asyncpg.Connection) -> None:
    layer, sender = make(), make()  # pool_size=2 by default
    specific = [await layer.new_channel("ws") for _ in range(400)]
    named = [f"jobs.{index}" for index in range(100)]
    tasks = [asyncio.create_task(layer.receive(channel, timeout=60)) for channel in specific]
    tasks += [asyncio.create_task(layer.receive(channel, timeout=60)) for channel in named]
    tasks += [asyncio.create_task(layer.receive("jobs.shared", timeout=60)) for _ in range(100)]
    await asyncio.sleep(1.0)
    held = await backends_of(db, layer)
    assert 1 <= len(held) <= 3, held
    assert sum(1 for row in held if row["application_name"].endswith(":listen")) == 1
    for channel in specific + named:
        await sender.send(channel, {"type": "wake", "to": channel})
    for index in range(100):
        await sender.send("jobs.shared", {"type": "wake", "to": "jobs.shared", "i": index})
    results = await asyncio.gather(*tasks)
    assert [r["to"] for r in results] == specific + named + ["jobs.shared"] * 100
    assert sorted(r["i"] for r in results[500:]) == list(range(100))
    assert len(await backends_of(db, layer)) <= 3


# --------------------------------------------------------------- housekeeping


async def test_prune_deletes_expired_messages_and_members(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    short = make(channel_expiry=1, group_expiry=1, prune_interval=0.2)
    keeper = make()
    await short.send("stale.named", {"type": "old"})
    await short.group_add("room", "stale.member")
    await short.group_add("room", await short.new_channel("stale"))  # and its process's owner row
    await keeper.send("fresh.named", {"type": "new"})
    await keeper.group_add("room", "fresh.member")
    fresh = await keeper.new_channel("fresh")
    await keeper.group_add("room", fresh)

    async def pruned() -> bool:
        left = await db.fetch(
            f'SELECT queue FROM "{namespace}".message '
            f'UNION ALL SELECT channel FROM "{namespace}".group_member '
            f'UNION ALL SELECT owner FROM "{namespace}".group_owner'
        )
        return sorted(row[0] for row in left) == sorted(
            ["fresh.member", "fresh.named", fresh, keeper.client_token]
        )

    await eventually(pruned, "expired rows pruned, live rows kept")


async def test_prune_runs_in_one_process_at_a_time(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    layer = make(channel_expiry=1, prune_interval=3600)
    await layer.send("stale.named", {"type": "old"})
    await asyncio.sleep(1.2)
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", lock_key(namespace, "prune"))
        assert await layer.prune() is False
        assert await db.fetchval(f'SELECT count(*) FROM "{namespace}".message') == 1
    assert await layer.prune() is True
    assert await db.fetchval(f'SELECT count(*) FROM "{namespace}".message') == 0


async def test_concurrent_schema_creation(make: Factory, db: asyncpg.Connection, namespace: str) -> None:
    starters = [make() for _ in range(8)]
    channels = await asyncio.gather(*(layer.new_channel() for layer in starters))
    assert len(set(channels)) == 8
    tables = await db.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", namespace
    )
    assert [row["table_name"] for row in tables] == ["group_member", "group_owner", "message"]
    await starters[0].send(channels[7], {"type": "ok"})
    assert (await starters[7].receive(channels[7], timeout=10))["type"] == "ok"


async def test_ensure_schema_false_needs_existing_tables(make: Factory) -> None:
    layer = make(ensure_schema=False)
    with pytest.raises(ChannelLayerError, match="ensure_schema=True"):
        await layer.send("x", {"type": "x"})
    creator = make()
    await creator.new_channel()
    again = make(ensure_schema=False)
    await again.send("x", {"type": "x"})
    assert (await again.receive("x", timeout=10))["type"] == "x"


# -------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "schema_name",
    ["", "1abc", 'x"; DROP TABLE pg_class; --', "a b", "pg_mine", "x" * 64, "dash-ed", "é"],
)
def test_bad_schema_names_are_refused(schema_name: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match="schema") as info:
        PostgreSQLChannelLayer(schema=schema_name)
    assert repr(schema_name)[:30] in str(info.value)


async def test_mixed_case_schema_is_quoted(make: Factory, db: asyncpg.Connection) -> None:
    name = "Mixed_" + uuid.uuid4().hex[:6]
    layer = make(schema=name)
    await layer.send("q", {"type": "x"})
    assert (
        await db.fetchval("SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1", name)
        == 1
    )
    assert (await layer.receive("q", timeout=10))["type"] == "x"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("poll_interval", 0),
        ("prune_interval", -1),
        ("timeout", 0),
        ("pool_size", 0),
        ("dsn", "mysql://x"),
        ("ensure_schema", "yes"),
        ("synchronous_commit", 1),
    ],
)
def test_bad_options_are_refused(option: str, value: object) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=option.split("_")[0]):
        PostgreSQLChannelLayer(**{option: value})  # type: ignore[arg-type]


def test_spec_options_from_mapping_and_environment() -> None:
    config = {
        "dsn": "postgresql://postgres:postgres@localhost:5432/postgres",
        "schema": "fastapi_websockets",
        "channel_expiry": 60,
        "group_expiry": 86400,
        "poll_interval": 0.1,
        "prune_interval": 60.0,
        "ensure_schema": True,
    }
    layer = get_channel_layer({"default": {"BACKEND": "postgresql", "CONFIG": config}})
    assert isinstance(layer, PostgreSQLChannelLayer)
    assert (layer.poll_interval, layer.prune_interval, layer.schema) == (0.1, 60.0, "fastapi_websockets")
    env = {
        "FASTAPI_WEBSOCKETS_BACKEND": "postgresql",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_DSN": "postgresql://u:p@db:5432/app",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_SCHEMA": "events",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_CHANNEL_EXPIRY": "30",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_GROUP_EXPIRY": "600",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_POLL_INTERVAL": "0.5",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_PRUNE_INTERVAL": "10",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_ENSURE_SCHEMA": "false",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_SYNCHRONOUS_COMMIT": "true",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_POOL_SIZE": "3",
    }
    from_env = get_channel_layer_from_env(env)
    assert isinstance(from_env, PostgreSQLChannelLayer)
    assert (from_env.dsn, from_env.schema, from_env.ensure_schema) == (
        "postgresql://u:p@db:5432/app",
        "events",
        False,
    )
    assert (from_env.channel_expiry, from_env.group_expiry, from_env.poll_interval) == (30.0, 600.0, 0.5)
    assert (from_env.synchronous_commit, from_env.pool_size) == (True, 3)
    with pytest.raises(InvalidChannelLayerConfig, match="schema"):
        get_channel_layer_from_env({**env, "FASTAPI_WEBSOCKETS_POSTGRESQL_SCHEMA": "bad name"})


# ------------------------------------------------------------------ failures


async def test_listener_terminated_by_the_server(make: Factory, db: asyncpg.Connection) -> None:
    layer, sender = make(), make()
    channel = await layer.new_channel()
    waiting = [
        asyncio.create_task(layer.receive(channel, timeout=30)),
        asyncio.create_task(layer.receive("after.kill", timeout=30)),
    ]
    await asyncio.sleep(0.3)
    (listen_pid,) = [
        r["pid"] for r in await backends_of(db, layer) if r["application_name"].endswith(":listen")
    ]
    assert await db.fetchval("SELECT pg_terminate_backend($1)", listen_pid)
    # Stored while the listener is down or reconnecting: its NOTIFY reaches nobody.
    await sender.send(channel, {"type": "meanwhile"})
    await sender.send("after.kill", {"type": "meanwhile"})
    assert [(await task)["type"] for task in waiting] == ["meanwhile", "meanwhile"]

    async def relistened() -> bool:
        rows = await backends_of(db, layer)
        pids = [r["pid"] for r in rows if r["application_name"].endswith(":listen")]
        return len(pids) == 1 and pids[0] != listen_pid

    await eventually(relistened, "a new LISTEN connection")
    await sender.send(channel, {"type": "later"})
    assert (await layer.receive(channel, timeout=10))["type"] == "later"


async def test_a_listener_closed_by_asyncpg_without_notice_is_replaced(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When asyncpg loses track of a connection's protocol (a stopping server's FATAL
    # read just before a LISTEN) it aborts the connection without calling its
    # termination listeners; here that abort is made directly. The keepalive would
    # notice in the end: pushed out of reach, it cannot hide a deaf layer.
    monkeypatch.setattr("fastapi_websockets.backends.postgresql._LISTENER_KEEPALIVE", 3600.0)
    layer, sender = make(), make()
    await sender.send("warm.up", {"type": "warm"})
    assert (await layer.receive("warm.up", timeout=30))["type"] == "warm"
    listener = layer._listener
    assert listener is not None
    # The protocol's own abort, which asyncpg calls on such an error (not Connection.terminate()).
    cast(Any, listener)._protocol.abort()
    assert listener.is_closed()
    # A new named channel: its reader LISTENs on the aborted connection.
    waiting = asyncio.create_task(layer.receive("after.abort", timeout=30))

    async def relistened() -> bool:
        return layer._listener not in (None, listener) and layer._listening.is_set()

    await eventually(relistened, "a new LISTEN connection")
    await sender.send("after.abort", {"type": "woken"})
    assert (await waiting)["type"] == "woken"


async def test_database_restart_with_waiting_receivers(restartable_postgresql: PostgresServer) -> None:
    dsn, schema = restartable_postgresql.dsn, "restart"
    layer = PostgreSQLChannelLayer(dsn=dsn, schema=schema)
    sender = PostgreSQLChannelLayer(dsn=dsn, schema=schema, timeout=1)
    try:
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        await sender.send("warm", {"type": "x"})
        waiting = [
            asyncio.create_task(layer.receive(channel, timeout=60)),
            asyncio.create_task(layer.receive("jobs", timeout=60)),
        ]
        await asyncio.sleep(0.3)
        restartable_postgresql.stop()
        await asyncio.sleep(0.5)
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await sender.send("jobs", {"type": "lost"})
        failed = await asyncio.gather(
            *(sender.send(channel, {"type": "lost", "i": i}) for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(result, BackendUnavailable) for result in failed), failed
        assert not any(task.done() for task in waiting)
        restartable_postgresql.start()
        await sender.group_send("room", {"type": "back"})
        await sender.send("jobs", {"type": "back"})
        assert [(await task)["type"] for task in waiting] == ["back", "back"]
        await sender.send(channel, {"type": "again"})
        assert (await layer.receive(channel, timeout=30))["type"] == "again"
    finally:
        await layer.close()
        await sender.close()


async def test_calls_fail_in_bounded_time_when_the_database_is_down(
    restartable_postgresql: PostgresServer,
) -> None:
    restartable_postgresql.stop()
    layer = PostgreSQLChannelLayer(dsn=restartable_postgresql.dsn, schema="down", timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable, match="unreachable") as info:
            await layer.send("x", {"type": "x"})
        assert isinstance(info.value, ChannelLayerError)
        assert isinstance(info.value, ConnectionError)
        restartable_postgresql.start()
        await layer.send("x", {"type": "x"})
        assert (await layer.receive("x", timeout=10))["type"] == "x"
    finally:
        await layer.close()


async def test_concurrent_sends_to_another_instance_keep_each_senders_order(make: Factory) -> None:
    sender, owner = make(), make(capacity=2000)
    channels = [await owner.new_channel("ws") for _ in range(4)]

    async def send_all(index: int) -> None:
        for i in range(50):
            await sender.send(channels[index % 4], {"type": "n", "s": index, "i": i})

    await asyncio.gather(*(send_all(index) for index in range(20)))
    seen: dict[int, list[int]] = {}
    for channel in channels:
        for _ in range(250):
            message = await owner.receive(channel, timeout=10)
            seen.setdefault(message["s"], []).append(message["i"])
    assert seen == {index: list(range(50)) for index in range(20)}


async def test_sends_cancelled_while_queued_are_not_written(make: Factory) -> None:
    # A burst queues behind its first send for one pass; sends whose callers gave up in
    # that pass must not go out with the rest (their callers were told nothing was sent).
    sender, owner = make(), make(capacity=100)
    channel = await owner.new_channel("ws")
    await sender.send(channel, {"type": "warm"})
    assert (await owner.receive(channel, timeout=10))["type"] == "warm"
    sends = [asyncio.create_task(sender.send(channel, {"type": "n", "i": i})) for i in range(8)]
    await asyncio.sleep(0)  # every send queued; the first still gathering the rest
    for i in (2, 5, 6):
        sends[i].cancel()
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert [isinstance(result, asyncio.CancelledError) for result in results] == [
        i in (2, 5, 6) for i in range(8)
    ]
    got = [(await owner.receive(channel, timeout=10))["i"] for _ in range(5)]
    assert got == [0, 1, 3, 4, 7]
    with pytest.raises(TimeoutError):
        await owner.receive(channel, timeout=0.3)


_CHILD = """
import asyncio, sys
from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer

async def main():
    layer = PostgreSQLChannelLayer(dsn=sys.argv[1], schema=sys.argv[2])
    channels = [await layer.new_channel("ws") for _ in range(50)]
    for channel in channels:
        await layer.group_add("broadcast", channel)
    print("ready", flush=True)
    got = await asyncio.gather(*(layer.receive(channel, timeout=30) for channel in channels))
    job = await layer.receive("work", timeout=30)
    print(sum(1 for m in got if m["text"] == "hi"), job["n"], flush=True)
    await layer.close()

asyncio.run(main())
"""


async def test_broadcast_and_work_queue_between_two_os_processes(make: Factory, namespace: str) -> None:
    layer = make()
    await layer.new_channel()  # creates the schema before the child starts
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, layer.dsn, namespace, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    try:
        assert (await asyncio.wait_for(child.stdout.readline(), 30)).strip() == b"ready"
        local = await layer.new_channel("ws")
        await layer.group_add("broadcast", local)
        await layer.group_send("broadcast", {"type": "chat", "text": "hi"})
        await layer.send("work", {"type": "job", "n": 7})
        assert (await layer.receive(local, timeout=10))["text"] == "hi"
        assert (await asyncio.wait_for(child.stdout.readline(), 30)).split() == [b"50", b"7"]
        assert await asyncio.wait_for(child.wait(), 30) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_group_send_skips_full_named_members(
    make: Factory, namespace: str, db: asyncpg.Connection
) -> None:
    layer = make(capacity=2)
    other = await layer.new_channel()
    await layer.group_add("g", "named.full")
    await layer.group_add("g", "named.free")
    await layer.group_add("g", other)
    await layer.send("named.full", {"type": "pre"})
    await layer.send("named.full", {"type": "pre"})
    await layer.group_send("g", {"type": "g"})
    counts = {
        row[0]: row[1]
        for row in await db.fetch(
            f'SELECT queue, count(*) FROM "{namespace}".message GROUP BY queue ORDER BY queue'
        )
    }
    assert counts == {"named.free": 1, "named.full": 2}
    assert (await layer.receive("named.free", timeout=10))["type"] == "g"
    assert (await layer.receive(other, timeout=10))["type"] == "g"
    assert [(await layer.receive("named.full", timeout=10))["type"] for _ in range(2)] == ["pre", "pre"]


async def test_concurrent_group_sends_share_one_statement(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # A room's presence events and chat lines are group_sends from many consumers at
    # once: each took a pooled connection for its own statement, and under churn the
    # tasks queued for the pool's two connections. Queued on the writer the sends
    # use, those made while a statement is in flight go out together in the next.
    sender, owner = make(capacity=100), make(capacity=100)
    mine, theirs = await sender.new_channel("ws"), await owner.new_channel("ws")
    for channel in (mine, theirs, "named.log"):
        await sender.group_add("room", channel)
    await sender.group_send("room", {"type": "n", "i": -1})  # the writer is idle again after it
    await asyncio.gather(*(sender.group_send("room", {"type": "n", "i": i}) for i in range(30)))

    # A row's xmin is the transaction (here: the statement) that stored it; the named
    # channel's rows stay until it is read.
    rows = await db.fetch(
        f'SELECT xmin::text AS tx FROM "{namespace}".message WHERE queue = $1 ORDER BY id', "named.log"
    )
    assert len(rows) == 31
    assert len({row["tx"] for row in rows[1:]}) == 1  # 30 statements before
    expected = list(range(-1, 30))
    for layer, channel in ((sender, mine), (owner, theirs), (sender, "named.log")):
        got = [(await layer.receive(channel, timeout=10))["i"] for _ in expected]
        assert got == expected, channel
    # Each exactly once: our own member is served by the sender, not from a row.
    for layer, channel in ((sender, mine), (owner, theirs)):
        with pytest.raises(TimeoutError):
            await layer.receive(channel, timeout=0.3)


def _losing_rows_of_sends(layer: PostgreSQLChannelLayer) -> list[bool]:
    """Make ``layer`` miss the notifications of rows of sends while the returned flag is set.

    Call before the layer's first ``new_channel()``: its LISTEN registers the callback it finds.
    """
    missing = [True]
    on_notify = layer._on_notify

    def losing(conn: object, pid: int, channel: str, payload: object) -> None:
        if not (missing[0] and isinstance(payload, str) and payload.startswith("s")):
            on_notify(conn, pid, channel, payload)

    layer._on_notify = losing  # type: ignore[method-assign]
    return missing


async def test_a_row_of_sends_whose_notification_was_missed_is_claimed_in_order(make: Factory) -> None:
    # Sends written together are one row; a reader that missed its notification (a
    # LISTEN connection lost meanwhile) claims the row from the table and delivers
    # each send once, in order.
    sender, receiver = make(capacity=100), make(capacity=100)
    missing = _losing_rows_of_sends(receiver)
    channel = await receiver.new_channel()
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i in range(16)))
    missing[0] = False
    receiver._wake_all()  # what a reconnected listener does
    got = [(await receiver.receive(channel, timeout=10))["i"] for _ in range(16)]
    assert got == list(range(16))
    await sender.send(channel, {"type": "n", "i": 16})  # delivered from its notification
    assert (await receiver.receive(channel, timeout=10))["i"] == 16
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.3)


async def test_a_notification_that_comes_during_a_claim_is_delivered_after_it(make: Factory) -> None:
    # The LISTEN callback delivers a notification's rows itself only while the inbox
    # reader waits with nothing queued; one that comes while the reader claims (here a
    # row whose notification was missed) must not overtake the claimed rows.
    sender, receiver = make(capacity=100), make(capacity=100)
    missing, seen = [True], asyncio.Event()
    on_notify = receiver._on_notify

    def noted(conn: object, pid: int, channel: str, payload: object) -> None:
        if isinstance(payload, str) and payload.startswith("s"):
            if missing[0]:
                return
            seen.set()
        on_notify(conn, pid, channel, payload)

    receiver._on_notify = noted  # type: ignore[method-assign]
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "n", "i": 0})  # stored; its notification lost
    missing[0] = False
    claiming, resume = asyncio.Event(), asyncio.Event()
    claim = receiver._claim

    async def held(queue: str, limit: int) -> list[asyncpg.Record]:
        claiming.set()
        await resume.wait()
        return await claim(queue, limit)

    receiver._claim = held  # type: ignore[method-assign]
    receiver._wake_all()  # what a reconnected listener does: claim
    await asyncio.wait_for(claiming.wait(), 10)
    await sender.send(channel, {"type": "n", "i": 1})
    await asyncio.wait_for(seen.wait(), 10)  # its notification came while the claim waits
    resume.set()
    got = [(await receiver.receive(channel, timeout=10))["i"] for _ in range(2)]
    assert got == [0, 1]
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.3)


async def test_notifications_are_handled_as_asyncpg_reads_them(make: Factory) -> None:
    # asyncpg hands a notification to its listeners with call_soon, a pass of the event
    # loop later; the LISTEN connection's class takes it as asyncpg's protocol parses it.
    # Fails when asyncpg no longer calls Connection._process_notification as it does now
    # (the layer then falls back to asyncpg's listeners, which still work).
    sender, receiver = make(), make()
    callers: list[str] = []
    on_notify = receiver._on_notify

    def noted(conn: object, pid: int, channel: str, payload: object) -> None:
        callers.append(sys._getframe(1).f_code.co_name)
        on_notify(conn, pid, channel, payload)

    receiver._on_notify = noted  # type: ignore[method-assign]
    channel = await receiver.new_channel()
    for i in range(3):
        await sender.send(channel, {"type": "n", "i": i})
        assert (await receiver.receive(channel, timeout=10))["i"] == i
    assert callers
    assert set(callers) == {"_process_notification"}, callers
    assert postgresql._listen_connection_class() is not asyncpg.Connection


async def test_an_expired_row_of_sends_counts_each_send_expired(make: Factory) -> None:
    sender, receiver = make(channel_expiry=1), make()
    missing = _losing_rows_of_sends(receiver)
    channel = await receiver.new_channel()
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i in range(16)))
    await asyncio.sleep(1.5)  # the row's expires_at (the sender's channel_expiry) passes
    missing[0] = False
    receiver._wake_all()
    await eventually(lambda: _true(receiver.stats.dropped_expired == 16), "16 sends dropped as expired")
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.3)


async def test_sends_stored_by_the_previous_version_are_delivered(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # Before rows of sends, each send was a row of its own (targets {channel}) and its
    # notification a line "m<id> channel base64"; rows and notifications of that format
    # left in a database at the upgrade still reach their channels, once each.
    receiver = make()
    channel = await receiver.new_channel()
    inbox = "!" + receiver.client_token
    insert = (
        f'INSERT INTO "{namespace}".message (queue, targets, expires_at, data) '
        "VALUES ($1, $2, now() + interval '1 minute', $3) RETURNING id"
    )
    notify = notify_channel(namespace, inbox)
    data = receiver.encode({"type": "old", "i": 0})
    notified = await db.fetchval(insert, inbox, [channel], data)
    await db.execute(
        "SELECT pg_notify($1, $2)", notify, f"m{notified} {channel} {base64.b64encode(data).decode()}"
    )
    assert (await receiver.receive(channel, timeout=10))["i"] == 0
    await db.fetchval(insert, inbox, [channel], receiver.encode({"type": "old", "i": 1}))
    await db.execute("SELECT pg_notify($1, '')", notify)  # claimed
    assert (await receiver.receive(channel, timeout=10))["i"] == 1
    with pytest.raises(TimeoutError):
        await receiver.receive(channel, timeout=0.3)


async def test_sends_woken_together_share_one_statement(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # Closed-loop senders whose replies came in one notification all send in the same
    # pass of the event loop. The first found the writer idle and wrote its message
    # alone, the other 15 waited for that round trip and went in a second statement,
    # cycle after cycle: two round trips in series where one does.
    sender = make(capacity=100)
    nobody = "specific.0badc0de0badc0de!"  # an inbox nobody reads, so its rows stay
    await sender.send(nobody + "warm", {"type": "warm"})  # connected; the writer is idle again
    for cycle in range(2):
        await asyncio.gather(*(sender.send(nobody + "c", {"type": "n", "i": cycle}) for _ in range(16)))
    await sender.send(nobody + "c", {"type": "n", "i": 2})  # alone

    # A statement stores its sends to one inbox as one row (a line per send); a row's
    # xmin is the transaction (the statement) that stored it.
    sql = f'SELECT xmin::text AS tx, data FROM "{namespace}".message WHERE queue = $1 ORDER BY id'
    rows = await db.fetch(sql, "!0badc0de0badc0de")
    assert [len(row["data"].split(b"\n")) for row in rows] == [1, 16, 16, 1]
    assert len({row["tx"] for row in rows}) == 4


async def _writer_parked_after_a_burst(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> tuple[PostgreSQLChannelLayer, PostgreSQLChannelLayer, str, asyncio.Task[object]]:
    """A sender, its owner, ``channel`` (sent -1 to 3) and the sender's writer, waiting for a burst."""
    monkeypatch.setattr(postgresql, "_WRITER_LINGER", 3600.0, raising=False)
    sender, owner = make(), make()
    channel = await owner.new_channel()
    await sender.send(channel, {"type": "n", "i": -1})  # connected; the writer is idle again
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i in range(4)))
    await eventually(lambda: sender._writer_parked is not None, "the writer waiting for a burst")
    writer = sender._outbox_task
    assert writer is not None
    return sender, owner, channel, writer


async def test_a_burst_writer_waits_for_the_next_burst_and_ends_with_its_connection(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a statement of several writes the writer task waits for the next burst
    # instead of ending (senders in another process are woken passes later by their
    # answers), and ends when its kept connection goes back to the pool. A write
    # queued between that hand-back and the writer's wake-up must still be written:
    # the first version ended on the hand-back whatever had been queued meanwhile.
    sender, owner, channel, writer = await _writer_parked_after_a_burst(make, monkeypatch)
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": i}) for i in range(4, 8)))
    assert sender._outbox_task is writer  # the same task wrote the second burst
    await eventually(lambda: sender._writer_parked is not None, "the writer waiting again")

    late = asyncio.ensure_future(sender.send(channel, {"type": "n", "i": 8}))
    sender._release_writer_conn()  # as the linger timer does; the send queues before the writer wakes
    await asyncio.wait_for(late, 20)
    assert [(await owner.receive(channel, timeout=10))["i"] for _ in range(10)] == list(range(-1, 9))
    await eventually(lambda: sender._outbox_task is None, "the writer ending with its connection")
    assert sender._writer_parked is None


async def test_the_linger_timer_after_a_cancelled_burst_writer_raises_nothing(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() cancels the writer waiting for a burst, which cancels the future it
    # waits on at once; the linger timer can fire before the task runs its cleanup,
    # and handing the connection back then must not set that cancelled future (it
    # raised InvalidStateError in the timer's callback, logged by asyncio).
    sender, owner, channel, writer = await _writer_parked_after_a_burst(make, monkeypatch)
    writer.cancel()  # as tasks.close() does; the task has not run since
    parked = sender._writer_parked
    assert parked is not None
    assert parked.cancelled()
    sender._writer_used -= 2 * 3600.0
    sender._writer_lingered()  # the timer's callback, in the same pass
    assert sender._writer_conn is None
    assert sender._writer_parked is None
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    assert [(await owner.receive(channel, timeout=10))["i"] for _ in range(5)] == list(range(-1, 4))


async def test_the_writer_keeps_its_connection_between_statements(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An acquire and a release of a pooled connection cost more CPU than a send's own
    # work in the statement, and the release a pass of the event loop: the writer
    # keeps its connection while writes keep coming (here: as long as the test runs).
    monkeypatch.setattr(postgresql, "_WRITER_LINGER", 3600.0, raising=False)
    sender, owner = make(timeout=600), make()
    channel = await owner.new_channel()
    await sender.send(channel, {"type": "n", "i": -1})  # connected, and the writer has one
    pool = sender._pool
    assert pool is not None
    acquired = 0
    acquire = asyncpg.Pool.acquire
    # The sender's inbox reader claims too (once at start, once more when its listener
    # is connected), in a task of its own: under load those came after this point.
    reader = f"{sender.tasks.name}.inbox"

    def counted(self: asyncpg.Pool, *args: Any, **kwargs: Any) -> Any:
        nonlocal acquired
        task = asyncio.current_task()
        acquired += self is pool and (task is None or task.get_name() != reader)
        return acquire(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Pool, "acquire", counted)
    for i in range(10):
        await sender.send(channel, {"type": "n", "i": i})
        await sender.group_send("nobody-here", {"type": "g", "i": i})
    await asyncio.gather(*(sender.send(channel, {"type": "n", "i": 10 + i}) for i in range(16)))
    assert acquired == 0
    got = [(await owner.receive(channel, timeout=10))["i"] for _ in range(27)]
    assert sorted(got) == list(range(-1, 26))
    # The kept connection goes back to the pool on close, which would otherwise wait
    # for it until the layer's timeout.
    await asyncio.wait_for(sender.close(), 60)


async def test_group_sends_in_one_statement_respect_a_named_members_capacity(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # The statement sees only rows stored before it: the batch's own earlier
    # messages to a named channel must count against its capacity too.
    layer = make(capacity=5)
    await layer.group_add("g", "named.small")
    await layer.send("named.small", {"type": "pre"})
    await asyncio.gather(*(layer.group_send("g", {"type": "g", "i": i}) for i in range(10)))
    count = await db.fetchval(f'SELECT count(*) FROM "{namespace}".message WHERE queue = $1', "named.small")
    assert count == 5
    got = [await layer.receive("named.small", timeout=10) for _ in range(5)]
    assert [message.get("i") for message in got] == [None, 0, 1, 2, 3]


async def _two_processes(make: Factory, capacity: int) -> tuple[BaseChannelLayer, BaseChannelLayer]:
    """Two layers (as two processes, each with its own pool), connected so their sends start together."""
    layers = make(capacity=capacity, pool_size=4), make(capacity=capacity, pool_size=4)
    for layer in layers:
        await layer.new_channel()
    return layers


async def _stored(db: asyncpg.Connection, namespace: str, queue: str) -> int:
    """The rows stored for ``queue``."""
    count: int = await db.fetchval(f'SELECT count(*) FROM "{namespace}".message WHERE queue = $1', queue)
    return count


async def test_named_capacity_holds_for_sends_from_two_layers(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # Two processes (two layers, two pools) sending to one named channel near its
    # capacity: each statement counted the rows committed before it started, so sends
    # in flight together all passed the check and the channel held more than capacity.
    capacity, rounds = 5, 40
    first, second = await _two_processes(make, capacity)
    outcomes = []
    for attempt in range(rounds):
        channel = f"named.edge{attempt}"
        results = await asyncio.gather(
            *(layer.send(channel, {"type": "x"}) for layer in (first, second) for _ in range(6)),
            return_exceptions=True,
        )
        assert [r for r in results if r is not None and not isinstance(r, ChannelFull)] == []
        stored = await _stored(db, namespace, channel)
        outcomes.append((sum(r is None for r in results), stored))
    assert outcomes == [(capacity, capacity)] * rounds, f"(accepted, stored) per round: {outcomes}"


@pytest.mark.parametrize("group_sends", [1, 3], ids=["lone", "batched"])
async def test_named_capacity_holds_for_group_sends_from_two_layers(
    make: Factory, db: asyncpg.Connection, namespace: str, group_sends: int
) -> None:
    # A group with a named member near its capacity, fed by group_sends and sends from
    # two processes at once: the group statements counted the member's rows committed
    # before they began, so in flight together they (and a send) all passed the check.
    # group_send drops for a full member rather than raising, so every round must end
    # with the member exactly full. A layer's group messages sent together go out in
    # one statement: one alone, or three batched.
    capacity, rounds = 5, 30
    first, second = await _two_processes(make, capacity)
    outcomes = []
    for attempt in range(rounds):
        channel, group = f"named.member{attempt}", f"room{attempt}"
        await first.group_add(group, channel)
        await first.group_add(group, f"named.other{attempt}")
        await first.send(channel, {"type": "early"})
        await second.send(channel, {"type": "early"})
        results = await asyncio.gather(
            *(
                layer.group_send(group, {"type": "g"})
                for layer in (first, second)
                for _ in range(group_sends)
            ),
            *(
                layer.send(channel, {"type": "x"})
                for layer in (first, second)
                for _ in range(6 - group_sends)
            ),
            return_exceptions=True,
        )
        assert [r for r in results if r is not None and not isinstance(r, ChannelFull)] == []
        stored = await _stored(db, namespace, channel)
        outcomes.append(stored)
    assert outcomes == [capacity] * rounds, f"stored per round: {outcomes}"


async def test_group_statements_with_overlapping_named_members_never_deadlock(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # A group statement holds its named members' capacity locks to its commit. Two
    # statements taking two shared locks in opposite orders would wait for each other
    # until PostgreSQL broke the cycle with a "deadlock detected" error. A layer's
    # group_sends in flight together share one statement, in call order, so here each
    # layer's statements list three groups (each with two of three named members) in
    # an order of its own, while sends to the members take their locks one at a time.
    # Each member gets 14 messages at capacity 13: full members skip or refuse exactly.
    capacity, rounds = 13, 30
    first, second = await _two_processes(make, capacity)
    shuffle = random.Random(0).shuffle
    for attempt in range(rounds):
        a, b, c = (f"named.{name}{attempt}" for name in "abc")
        groups = {f"g1-{attempt}": [a, b], f"g2-{attempt}": [b, c], f"g3-{attempt}": [c, a]}
        for members in groups.values():
            shuffle(members)
        orders = {first: list(groups) * 3, second: list(groups) * 3}
        for layer, order in orders.items():
            shuffle(order)
            for group in dict.fromkeys(order):  # each layer adds the members in an order of its own
                for member in groups[group][:: 1 if layer is first else -1]:
                    await layer.group_add(group, member)
        results = await asyncio.gather(
            *(layer.group_send(group, {"type": "g"}) for layer, order in orders.items() for group in order),
            *(layer.send(member, {"type": "x"}) for layer in (first, second) for member in (a, b, c)),
            return_exceptions=True,
        )
        assert [r for r in results if r is not None and not isinstance(r, ChannelFull)] == []
        stored = [await _stored(db, namespace, member) for member in (a, b, c)]
        assert stored == [capacity] * 3, f"round {attempt}: stored {stored}"


@pytest.mark.parametrize("function", ["send_named", "send_named_members"])
async def test_a_schema_without_the_send_named_function_gets_it(
    make: Factory, db: asyncpg.Connection, namespace: str, function: str
) -> None:
    # Schemas made before named sends (then group messages to named members) took
    # turns have the tables but not the function: a starting layer makes it, and so
    # does a running one whose send finds it missing.
    running = make()
    for name in ("named.a", "named.b"):
        await running.group_add("room", name)

    async def send(layer: BaseChannelLayer, name: str) -> None:
        if function == "send_named":
            await layer.send(name, {"type": "x"})
        else:
            await layer.group_send("room", {"type": "x", "to": name})

    await db.execute(f'DROP FUNCTION "{namespace}".{function}')
    starting = make()
    await send(starting, "named.a")
    await db.execute(f'DROP FUNCTION "{namespace}".{function}')
    await send(running, "named.b")
    got = [await running.receive(name, timeout=10) for name in ("named.a", "named.b")]
    assert [message["type"] for message in got] == ["x", "x"]


# Every function of ours in a schema, with its body and mark.
_FUNCTIONS = """
SELECT p.oid::regprocedure::text AS signature, p.proname, p.prosrc,
    obj_description(p.oid, 'pg_proc') AS mark, pg_get_functiondef(p.oid) AS ddl
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = $1 ORDER BY p.proname
"""


async def _functions(db: asyncpg.Connection, namespace: str) -> dict[str, tuple[str, str | None]]:
    """Each function of the schema by name: its body and its mark."""
    return {row["proname"]: (row["prosrc"], row["mark"]) for row in await db.fetch(_FUNCTIONS, namespace)}


async def _outdate_functions(db: asyncpg.Connection, namespace: str, mark: str | None) -> None:
    """Make every function of the schema look like an earlier version's: other bodies, ``mark``.

    The named-capacity locks are taken out (what earlier versions lacked), and every
    body gets a line of its own, so each function differs from this version's.
    """
    for row in await db.fetch(_FUNCTIONS, namespace):
        lines = [line for line in row["ddl"].splitlines() if "pg_advisory_xact_lock" not in line]
        ddl = "\n".join(lines).replace("AS $function$", "AS $function$\n-- made by an earlier version", 1)
        await db.execute(ddl)
        await db.execute(
            f"COMMENT ON FUNCTION {row['signature']} IS {'NULL' if mark is None else repr(mark)}"
        )


_EARLIER_MARKS = [None, f"fastapi_websockets functions {postgresql.FUNCTIONS_VERSION - 1}"]


@pytest.mark.parametrize("mark", _EARLIER_MARKS, ids=["unmarked", "lower"])
async def test_functions_of_an_earlier_version_are_replaced_by_a_layer_without_history(
    make: Factory, db: asyncpg.Connection, namespace: str, mark: str | None
) -> None:
    # A schema's functions (history ones included) made by an earlier version are
    # replaced by the first layer with ensure_schema to start, whatever its options:
    # they used to stay until a layer with history found one missing.
    await make(history=HISTORY).group_send("room:x", {"type": "m"})
    made = await _functions(db, namespace)
    assert set(made) == {*postgresql._Sql(namespace).functions}
    assert {current for _, current in made.values()} == {
        f"fastapi_websockets functions {postgresql.FUNCTIONS_VERSION}"
    }
    await _outdate_functions(db, namespace, mark)
    assert all(body != made[name][0] for name, (body, _) in (await _functions(db, namespace)).items())
    await make().new_channel()
    assert await _functions(db, namespace) == made


async def test_functions_of_a_later_version_are_left_alone(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # An older process restarting during a rolling upgrade does not bring back its functions.
    await make().new_channel()
    await _outdate_functions(
        db, namespace, f"fastapi_websockets functions {postgresql.FUNCTIONS_VERSION + 1}"
    )
    later = await _functions(db, namespace)
    await make().new_channel()
    assert await _functions(db, namespace) == later


async def test_layers_starting_together_on_an_outdated_schema_all_start(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # Concurrent CREATE OR REPLACE FUNCTION of one function fails with "tuple
    # concurrently updated": the layers replacing them take turns.
    await make(history=HISTORY).new_channel()
    made = await _functions(db, namespace)
    for _ in range(5):
        await _outdate_functions(db, namespace, None)
        starters = [make() for _ in range(8)]
        channels = await asyncio.gather(*(layer.new_channel() for layer in starters))
        assert len(set(channels)) == 8
        assert await _functions(db, namespace) == made
        await asyncio.gather(*(layer.close() for layer in starters))


async def test_outdated_functions_a_layer_cannot_replace_are_used_with_a_warning(
    make: Factory,
    db: asyncpg.Connection,
    namespace: str,
    postgresql_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A role that does not own the functions (or a layer with ensure_schema=False)
    # starts with them as before, and says what to do.
    admin = make()
    await admin.new_channel()
    await _outdate_functions(db, namespace, None)
    outdated = await _functions(db, namespace)
    role = await _limited_role(db, namespace)
    dsn = postgresql_server.dsn.replace("postgres@", f"{role}@")
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets"):
        for layer in (make(dsn=dsn), make(ensure_schema=False)):
            await layer.send("limited.q", {"type": "x"})
            assert (await layer.receive("limited.q", timeout=10))["type"] == "x"
    warnings = [r.getMessage() for r in caplog.records if "earlier version" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "may not replace them" in warnings[0]
    assert "ensure_schema=False" in warnings[1]
    assert await _functions(db, namespace) == outdated


def test_a_change_to_the_functions_bumps_their_version() -> None:
    # Layers replace a schema's functions only when their version is higher: a
    # change to a function without a new FUNCTIONS_VERSION would never reach a schema.
    sql = postgresql._Sql("fastapi_websockets")
    assert len(postgresql._FUNCTION_RE.findall(sql.create + sql.create_history)) == len(sql.functions)
    assert (postgresql.FUNCTIONS_VERSION, sql.digest) == (
        1,
        "7e65348d2a1afc95cb6ce7a6d2146defcd2291e4a026c35168bac6da5e59f637",
    ), "a function changed: bump FUNCTIONS_VERSION and put the new version and digest here"


async def test_concurrent_history_group_sends_share_one_statement(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # The demo's chat lines go to a room with history: under churn each took a pooled
    # connection for its own call. Calls queued while one is written share the next
    # statement (one history_send call each, in order), and keep their positions.
    sender, owner = make(history={"room:*": 100}), make(history={"room:*": 100}, capacity=100)
    mine, theirs = await sender.new_channel("ws"), await owner.new_channel("ws")
    await sender.group_add("room:h", mine)
    await owner.group_add("room:h", theirs)
    first = await sender.group_send("room:h", {"type": "n", "i": -1})
    positions = await asyncio.gather(*(sender.group_send("room:h", {"type": "n", "i": i}) for i in range(30)))

    assert first is not None
    assert [p.offset if p else None for p in positions] == list(range(first.offset + 1, first.offset + 31))
    rows = await db.fetch(
        f'SELECT "offset", xmin::text AS tx FROM "{namespace}".history_entry ORDER BY "offset"'
    )
    assert [row["offset"] for row in rows] == list(range(first.offset, first.offset + 31))
    assert len({row["tx"] for row in rows[1:]}) == 1  # 30 statements before
    for layer, channel in ((sender, mine), (owner, theirs)):
        got = [await layer.receive(channel, timeout=10) for _ in range(31)]
        assert [(m["i"], m["_position"]["offset"]) for m in got] == [
            (i, first.offset + 1 + i) for i in range(-1, 30)
        ], channel


async def test_a_layer_event_and_a_history_message_to_one_group_go_out_apart(make: Factory) -> None:
    # Presence events reach a history group's members but never its history: queued
    # next to the group's chat lines, they must not join their history statement.
    layer = make(history={"room:*": 100})
    channel = await layer.new_channel("ws")
    await layer.group_add("room:e", channel)
    _, position = await asyncio.gather(
        layer._send_event("room:e", {"type": "event"}), layer.group_send("room:e", {"type": "chat"})
    )
    assert position is not None
    got = [await layer.receive(channel, timeout=10) for _ in range(2)]
    assert [(m["type"], "_position" in m) for m in got] == [("event", False), ("chat", True)]
    assert [m["_position"]["offset"] for m in (await layer.group_history("room:e")).messages] == [
        position.offset
    ]


async def test_a_send_then_a_group_send_arrive_in_that_order(make: Factory) -> None:
    # Sends and group messages share one ordered writer; whatever a sender awaited
    # first reaches a channel that gets both first, in this process and in another.
    sender, owner = make(capacity=1000), make(capacity=1000)
    theirs, mine = await owner.new_channel("ws"), await sender.new_channel("ws")
    await sender.group_add("room", theirs)
    await sender.group_add("room", mine)

    async def talk(index: int) -> None:
        for i in range(20):
            for channel in (theirs, mine):
                await sender.send(channel, {"type": "d", "s": index, "i": i, "via": "send"})
            await sender.group_send("room", {"type": "g", "s": index, "i": i, "via": "group"})

    await asyncio.gather(*(talk(index) for index in range(10)))
    for layer, channel in ((owner, theirs), (sender, mine)):
        seen: dict[int, list[tuple[int, str]]] = {}
        for _ in range(10 * 20 * 2):
            message = await layer.receive(channel, timeout=10)
            seen.setdefault(message["s"], []).append((message["i"], message["via"]))
        expected = [(i, via) for i in range(20) for via in ("send", "group")]
        assert seen == {index: expected for index in range(10)}, channel


async def test_close_while_the_database_is_down(restartable_postgresql: PostgresServer) -> None:
    layer = PostgreSQLChannelLayer(dsn=restartable_postgresql.dsn, schema="closing")
    channel = await layer.new_channel()
    waiters = [
        asyncio.create_task(layer.receive(channel)),
        asyncio.create_task(layer.receive("named.waiting")),
    ]
    await asyncio.sleep(0.3)
    restartable_postgresql.stop()
    await asyncio.sleep(0.3)
    await asyncio.wait_for(layer.close(), 60)
    for waiter in waiters:
        with pytest.raises(ChannelLayerClosed):
            await waiter
    assert layer.closed


async def test_sends_in_flight_when_closing_end_instead_of_hanging(make: Factory) -> None:
    sender, owner = make(), make()
    channel = await owner.new_channel()
    await sender.new_channel()  # connected
    sends = [asyncio.create_task(sender.send(channel, {"type": "n", "i": i})) for i in range(50)]
    await asyncio.sleep(0)
    await sender.close()
    results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 30)
    assert all(result is None or isinstance(result, ChannelLayerClosed) for result in results), results


async def test_named_receives_that_time_out_lose_nothing_and_keep_order(make: Factory) -> None:
    sender, receiver = make(), make()
    await receiver.new_channel()  # connected

    async def send_all() -> None:
        for i in range(100):
            await sender.send("jobs.flaky", {"type": "n", "i": i})
            await asyncio.sleep(0)

    got: list[int] = []
    task = asyncio.create_task(send_all())
    attempt = 0
    while len(got) < 100:
        attempt += 1
        try:
            message = await receiver.receive(
                "jobs.flaky", timeout=0.0005 * (attempt % 4) if attempt % 5 else 10
            )
        except TimeoutError:
            continue
        got.append(message["i"])
    await task
    assert got == list(range(100))


async def _limited_role(db: asyncpg.Connection, namespace: str) -> str:
    """A new login role that may use the schema's tables but create nothing."""
    role = "r" + uuid.uuid4().hex[:10]
    await db.execute(f"CREATE ROLE {role} LOGIN")
    await db.execute(f'GRANT USAGE ON SCHEMA "{namespace}" TO {role}')
    await db.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{namespace}" TO {role}')
    await db.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{namespace}" TO {role}')
    return role


async def test_a_role_without_create_rights_uses_existing_tables(
    make: Factory, db: asyncpg.Connection, namespace: str, postgresql_server: PostgresServer
) -> None:
    admin = make()
    await admin.new_channel()  # creates schema and tables
    role = await _limited_role(db, namespace)
    limited = make(dsn=postgresql_server.dsn.replace("postgres@", f"{role}@"))
    await limited.send("limited.q", {"type": "x"})
    await limited.group_add("g", "limited.q")
    await admin.group_send("g", {"type": "y"})
    assert [(await limited.receive("limited.q", timeout=10))["type"] for _ in range(2)] == ["x", "y"]
    assert await db.fetchval("SELECT has_database_privilege($1, 'postgres', 'CREATE')", role) is False


async def test_synchronous_commit_layers_work_with_the_default_ones(make: Factory) -> None:
    durable, fast = make(synchronous_commit=True), make()
    channel = await fast.new_channel()
    await durable.send(channel, {"type": "x"})
    await durable.send("sync.named", {"type": "y"})
    assert (await fast.receive(channel, timeout=10))["type"] == "x"
    assert (await fast.receive("sync.named", timeout=10))["type"] == "y"


async def _waiting_for_a_lock(dsn: str, layer: PostgreSQLChannelLayer) -> int:
    """The pid of a pooled session of ``layer`` waiting for a lock (polled from a session of its own:
    a transaction sees one snapshot of pg_stat_activity)."""
    conn = await asyncpg.connect(dsn)
    try:
        pids: list[int] = []

        async def waiting() -> bool:
            pids[:] = [
                row["pid"]
                for row in await conn.fetch(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    layer.application_name,
                )
            ]
            return bool(pids)

        await eventually(waiting, "a statement of the layer waiting for a lock")
        return pids[0]
    finally:
        await conn.close()


async def test_a_deadlock_reaches_the_caller_as_a_channel_layer_error(
    make: Factory, db: asyncpg.Connection, namespace: str, postgresql_server: PostgresServer
) -> None:
    # A send to a named channel takes the channel's advisory lock, then waits to insert
    # behind this session's table lock; this session then asks for that advisory lock.
    # The send waited first, so its deadlock check (deadlock_timeout, 1 s; this session's
    # is 60 s) finds the cycle and PostgreSQL aborts it.
    sender, receiver = make(), make()
    await sender.send("deadlock.jobs", {"type": "warm"})
    async with db.transaction():
        await db.execute("SET LOCAL deadlock_timeout = '60s'")
        await db.execute(f'LOCK TABLE "{namespace}".message IN SHARE MODE')
        sending = asyncio.create_task(sender.send("deadlock.jobs", {"type": "victim"}))
        await _waiting_for_a_lock(postgresql_server.dsn, sender)
        await db.execute(
            f"SELECT pg_advisory_xact_lock({postgresql._NAMED_LOCK}, hashtext($1))", "deadlock.jobs"
        )
        with pytest.raises(ChannelLayerError, match="deadlock") as info:
            await sending
    assert isinstance(info.value, StatementRefused)
    assert info.value.sqlstate == "40P01"
    assert isinstance(info.value.__cause__, asyncpg.DeadlockDetectedError)
    await sender.send("deadlock.jobs", {"type": "after"})
    got = [(await receiver.receive("deadlock.jobs", timeout=10))["type"] for _ in range(2)]
    assert got == ["warm", "after"]  # the refused one was rolled back


@pytest.mark.parametrize("call", ["send", "group_send"])
async def test_a_cancelled_statement_of_the_writer_fails_each_of_its_calls_with_a_channel_layer_error(
    make: Factory, db: asyncpg.Connection, namespace: str, postgresql_server: PostgresServer, call: str
) -> None:
    # Sends to new_channel() names and group_sends share the writer's statement: a server
    # error of that statement (here pg_cancel_backend while it waits for a lock, as
    # statement_timeout would) is every caller's, as a ChannelLayerError.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await sender.send(channel, {"type": "warm"})
    assert (await receiver.receive(channel, timeout=10))["type"] == "warm"

    async def write(kind: str) -> None:
        if call == "send":
            await sender.send(channel, {"type": kind})
        else:
            await sender.group_send("room", {"type": kind})

    watcher = await asyncpg.connect(postgresql_server.dsn)
    try:
        async with db.transaction():
            await db.execute(f'LOCK TABLE "{namespace}".message IN SHARE MODE')
            calls = [asyncio.create_task(write("cancelled")) for _ in range(3)]
            await _waiting_for_a_lock(postgresql_server.dsn, sender)

            async def cancelled_all() -> bool:
                # The calls usually share one statement, but a loop pass can split them over
                # two, the second waiting for the lock once the first is cancelled: cancel
                # whatever of the sender waits until every call has ended.
                for row in await watcher.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
                    "AND wait_event_type = 'Lock'",
                    sender.application_name,
                ):
                    await watcher.fetchval("SELECT pg_cancel_backend($1)", row["pid"])
                return all(call.done() for call in calls)

            await eventually(cancelled_all, "every call of the cancelled statements ended")
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await watcher.close()
    assert all(isinstance(result, StatementRefused) for result in results), results
    refused = cast(StatementRefused, results[0])
    assert refused.sqlstate == "57014"
    assert "statement_timeout" in str(refused)
    assert isinstance(refused.__cause__, asyncpg.QueryCanceledError)
    await write("after")
    assert (await receiver.receive(channel, timeout=10))["type"] == "after"


# ------------------------------------------------------- broken connections


@pytest.mark.parametrize("call", ["send", "group_send", "send_named", "send_named_pool_of_one"])
async def test_a_statement_the_server_never_answers_fails_after_timeout(
    make: Factory, postgresql_server: PostgresServer, call: str
) -> None:
    # Connected, then nothing comes back (a frozen server, a dead link): the writer's
    # statement (on the connection it keeps: the warm-up's) and a pooled one each fail
    # with BackendUnavailable once the layer's timeout has passed, instead of waiting.
    # With a pool of one, the pooled statement runs on the connection the writer just
    # gave back (the writer bounds its statements itself: the connection's own bound
    # must be back).
    receiver = make()
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    async with TcpProxy(postgresql_server.port) as proxy:
        sender = make(
            dsn=postgresql_server.dsn.replace(str(postgresql_server.port), str(proxy.port)),
            timeout=2,
            pool_size=1 if call == "send_named_pool_of_one" else 2,
        )
        await sender.send("unanswered.named", {"type": "warm"})
        await sender.send(channel, {"type": "warm"})
        assert (await receiver.receive(channel, timeout=10))["type"] == "warm"
        assert sender._pool is not None
        async with sender._pool.acquire():  # once the writer's connection is back in the pool
            pass
        proxy.hold()
        writing: Coroutine[Any, Any, object]
        if call == "send":
            writing = sender.send(channel, {"type": "x"})
        elif call == "group_send":
            writing = sender.group_send("room", {"type": "x"})
        else:
            writing = sender.send("unanswered.named", {"type": "x"})
        # A hang guard, not a speed goal: the layer's own bound is 2 s. (Not wait_for: the
        # cancellation it ends a hang with can come out as a BackendUnavailable too.)
        done, _ = await asyncio.wait([asyncio.ensure_future(writing)], timeout=30)
        assert done, "no answer and no error after 30 s"
        with pytest.raises(BackendUnavailable):
            done.pop().result()
        proxy.release()
        await sender.close()  # before the proxy goes: its sockets are closed by their owners


def open_sockets_to(port: int) -> list[asyncio.Transport]:
    """This process's transports whose socket to ``port`` is still open."""
    found = []
    for thing in gc.get_objects():
        # type(), not isinstance(): that would ask every object its __class__, proxies included.
        if issubclass(type(thing), asyncio.Transport):
            sock, peer = thing.get_extra_info("socket"), thing.get_extra_info("peername")
            if sock is not None and sock.fileno() != -1 and peer is not None and peer[1] == port:
                found.append(thing)
    return found


async def test_close_finishes_a_pooled_tls_connection_it_cut_half_open(
    postgresql_tls_server: PostgresServer,
    tls_certs: Certificates,
    namespace: str,
    layers: list[BaseChannelLayer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # close() cancels the inbox reader while the pool opens a TLS connection for its claim.
    # Cut after the handshake, asyncpg closes the TLS transport and leaves its shutdown
    # (the server's close_notify) to the event loop: once, CI's unclosed-transport check
    # found its socket open after the test's loop had ended. Here the server's answers on
    # that connection wait in a proxy until close() has cancelled the reader: its socket
    # must be closed when close() returns.
    server, ca = postgresql_tls_server, str(tls_certs.ca_file)
    async with TcpProxy(server.port) as proxy:
        receiver = PostgreSQLChannelLayer(
            dsn=server.dsn.replace(f":{server.port}/", f":{proxy.port}/"), schema=namespace, tls_ca_file=ca
        )
        sender = PostgreSQLChannelLayer(dsn=server.dsn, schema=namespace, tls_ca_file=ca)
        layers += [receiver, sender]
        channel = await receiver.new_channel()
        await sender.start()
        assert receiver._pool is not None
        busy = await receiver._pool.acquire()  # the pool's connection: the reader's claim opens another
        connecting = asyncio.Event()
        handshake = asyncpg.connect_utils._create_ssl_connection  # type: ignore[attr-defined]

        async def stalled(*args: Any, **kwargs: Any) -> Any:
            connection = await handshake(*args, **kwargs)
            if args[2] == proxy.port and not connecting.is_set():
                # The claim's connect only: one made after proxy.release() would wait for good.
                proxy.hold_newest()  # TLS up and the startup packet sent: the server's answers wait
                connecting.set()
            return connection

        monkeypatch.setattr(asyncpg.connect_utils, "_create_ssl_connection", stalled)
        # Too big to ride in its notification (8000 bytes): the inbox reader claims it.
        await sender.send(channel, {"type": "big", "pad": "x" * 9000})
        await asyncio.wait_for(connecting.wait(), 30)  # a hang guard
        await receiver._pool.release(busy)
        closing = asyncio.ensure_future(receiver.close())
        await eventually(lambda: closing.done() or receiver._settling, "close() cancelled the inbox reader")
        proxy.release()
        await closing
        leftover = [repr(transport) for transport in open_sockets_to(proxy.port)]
        assert leftover == []


def running_tasks_of(*packages: str) -> list[str]:
    """This loop's unfinished tasks whose coroutine is code of one of ``packages``."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if not task.done() and code is not None and any(f"/{name}/" in code.co_filename for name in packages):
            found.append(repr(task))
    return found


async def test_close_waits_for_the_pools_top_up_connect_it_cancelled(
    postgresql_server: PostgresServer, namespace: str, layers: list[BaseChannelLayer], db: asyncpg.Connection
) -> None:
    # asyncpg (0.32) keeps min_size connections open: when one dies, a task of the pool's opens
    # another. pool.close() cancels that task, and the connect it was waiting for went on to
    # close what it opened after close() had returned (its task, and its socket, outlived it).
    # Here that connect stalls until asyncpg's connect timeout (the layer's timeout) ends it.
    async with TcpProxy(postgresql_server.port) as proxy:
        layer = PostgreSQLChannelLayer(
            dsn=postgresql_server.dsn.replace(f":{postgresql_server.port}/", f":{proxy.port}/"),
            schema=namespace,
        )
        layers.append(layer)
        await layer.start()
        accepted = proxy.accepted
        proxy.hold_next()  # the top-up's connect: the server's answers wait in the proxy
        for row in await backends_of(db, layer):
            if row["application_name"] == layer.application_name:  # the pool's, not the listener's
                await db.execute("SELECT pg_terminate_backend($1)", row["pid"])
        await eventually(lambda: proxy.accepted > accepted, "the pool opening a connection to top up")
        await layer.close()
        assert running_tasks_of("fastapi_websockets", "asyncpg") == []
        assert [repr(transport) for transport in open_sockets_to(proxy.port)] == []


async def test_inbox_reader_survives_its_connections_killed_mid_claim(
    make: Factory, db: asyncpg.Connection
) -> None:
    # Cutting a pooled session while it claims makes asyncpg raise InterfaceError or
    # InternalClientError ("cannot switch to state 12; another operation is in
    # progress"); the inbox reader once died of it and the process went deaf.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm"})
    assert (await receiver.receive(channel, timeout=10))["type"] == "warm"
    for cycle in range(25):
        pool_pids = [
            row["pid"]
            for row in await backends_of(db, receiver)
            if row["application_name"] == receiver.application_name
        ]
        burst = [asyncio.create_task(sender.send(channel, {"type": "burst"})) for _ in range(50)]
        await asyncio.sleep(0.002 * (cycle % 10))
        for pid in pool_pids:
            await db.execute("SELECT pg_terminate_backend($1)", pid)
        await asyncio.gather(*burst)
        await sender.send(channel, {"type": "probe", "cycle": cycle})
        # Burst rows whose claim committed as the session died are lost (at most
        # once); the probe sent afterwards must arrive.
        while (message := await receiver.receive(channel, timeout=20))["type"] != "probe":
            pass
        assert message["cycle"] == cycle
    # The reader never had to be restarted: a broken connection is a pause, not a crash.
    assert receiver.tasks.failures == 0


async def test_a_row_that_breaks_the_inbox_reader_does_not_leave_it_deaf(
    make: Factory, db: asyncpg.Connection, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A row no layer writes (NULL data) breaks the reader's decoding outside the
    # driver errors it expects: it is dropped, or the reader fails and the
    # supervisor starts it again; either way the process is not left deaf.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await db.execute(f'ALTER TABLE "{namespace}".message ALTER COLUMN data DROP NOT NULL')
    await db.execute(
        f'INSERT INTO "{namespace}".message (queue, targets, expires_at, data) '
        "VALUES ($1, $2, now() + interval '1 minute', NULL)",
        "!" + receiver.client_token,
        [channel],
    )
    await db.execute("SELECT pg_notify($1, '')", notify_channel(namespace, "!" + receiver.client_token))
    await sender.send(channel, {"type": "after"})
    assert (await receiver.receive(channel, timeout=20))["type"] == "after"
    if receiver.tasks.restarts:
        assert any("restarting it" in record.getMessage() for record in caplog.records)
    else:
        assert receiver.stats.dropped_undecodable == 1


async def test_ten_restarts_in_a_row_lose_nothing(restartable_postgresql: PostgresServer) -> None:
    dsn = restartable_postgresql.dsn
    receiver = PostgreSQLChannelLayer(dsn=dsn, schema="restarts")
    sender = PostgreSQLChannelLayer(dsn=dsn, schema="restarts")
    try:
        direct, member = await receiver.new_channel(), await receiver.new_channel()
        await receiver.group_add("room", member)
        await sender.send("warm", {"type": "x"})
        lost = []
        for cycle in range(10):
            waiting = [
                asyncio.create_task(receiver.receive(direct, timeout=30)),
                asyncio.create_task(receiver.receive(member, timeout=30)),
                asyncio.create_task(receiver.receive("restart.jobs", timeout=30)),
            ]
            await asyncio.sleep(0.1)
            restartable_postgresql.stop()
            restartable_postgresql.start()
            # Sent the instant the server accepts connections, before the receiver
            # has reconnected.
            await sender.send(direct, {"type": "direct", "cycle": cycle})
            await sender.group_send("room", {"type": "group", "cycle": cycle})
            await sender.send("restart.jobs", {"type": "named", "cycle": cycle})
            for task in waiting:
                try:
                    message = await task
                except TimeoutError:
                    lost.append(cycle)
                else:
                    assert message["cycle"] == cycle
        assert lost == []
        assert receiver.tasks.failures == 0
    finally:
        await receiver.close()
        await sender.close()


# ------------------------------------------------------------------ secrets


@pytest.fixture
def password_postgresql() -> Iterator[PostgresServer]:
    """A PostgreSQL of its own whose ``postgres`` user logs in over TCP with ``SECRET`` only."""
    server = PostgresServer(max_connections=50, password=SECRET)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def _assert_nothing_leaks(
    layer: PostgreSQLChannelLayer, caplog: pytest.LogCaptureFixture, *errors: BaseException
) -> None:
    assert_no_secret(errors=errors, records=caplog.records, objects=[layer, layer.stats])
    assert SECRET not in str(layer.stats)


@pytest.mark.parametrize(
    "dsn",
    [
        f"mysql://postgres:{SECRET}@127.0.0.1:5432/postgres",
        f"postgresql://postgres:{SECRET}@127.0.0.1:port/postgres",
        f"postgresql://postgres:{SECRET}@127.0.0.1:99999999/postgres",
    ],
)
def test_a_malformed_dsn_is_refused_at_construction_without_its_password(dsn: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match="dsn") as info:
        PostgreSQLChannelLayer(dsn=dsn)
    assert_no_secret(errors=[info.value])


async def test_connection_refused_leaks_no_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres"
    layer = PostgreSQLChannelLayer(dsn=dsn, timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable, match=r"unreachable at 127\.0\.0\.1:") as info:
            await layer.send("x", {"type": "x"})
        _assert_nothing_leaks(layer, caplog, info.value)
    finally:
        await layer.close()


async def test_a_server_that_never_answers_times_out_without_leaking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    layer = PostgreSQLChannelLayer(dsn=f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/db", timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable, match="unreachable") as info:
            await layer.new_channel()
        assert accepted
        _assert_nothing_leaks(layer, caplog, info.value)
    finally:
        await layer.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_authentication_failure_leaks_no_password(
    password_postgresql: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await asyncpg.connect(password_postgresql.dsn)
    try:
        await admin.execute("CREATE ROLE someone LOGIN PASSWORD 'another-password'")
    finally:
        await admin.close()
    dsn = password_postgresql.dsn.replace("postgres:", "someone:", 1)
    layer = PostgreSQLChannelLayer(dsn=dsn, timeout=2)
    try:
        with pytest.raises(ChannelLayerError, match="password authentication failed") as info:
            await layer.send("x", {"type": "x"})
        _assert_nothing_leaks(layer, caplog, info.value)
    finally:
        await layer.close()


async def test_logins_refused_at_start_are_config_errors_saying_what_to_fix(
    password_postgresql: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Each was ChannelLayerError("cannot start the PostgreSQL layer"), or BackendUnavailable
    # ("retry later") once the pool opened a new connection: asking again cannot help.
    caplog.set_level(logging.DEBUG)
    port = password_postgresql.port
    cases = [
        (
            f"postgresql://postgres:{SECRET}-wrong@127.0.0.1:{port}/postgres",
            "InvalidPasswordError",
            "password in dsn",
        ),
        (f"postgresql://nobody:{SECRET}@127.0.0.1:{port}/postgres", "InvalidPasswordError", "user 'nobody'"),
        (
            f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/no_such_db",
            "InvalidCatalogNameError",
            "the database does not exist",
        ),
    ]
    errors: list[BaseException] = []
    for dsn, said, advice in cases:
        layer = PostgreSQLChannelLayer(dsn=dsn, timeout=60)
        error = await refused_at_start(layer)
        text = str(error)
        assert f"PostgreSQL at {layer.redact_url(dsn)} refused the login ({said}: " in text, text
        assert advice in text, text
        errors.append(error)
    assert_no_secret(errors=errors, records=caplog.records)


async def test_a_password_rotated_under_a_running_layer_is_retried_and_logged_once(
    password_postgresql: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    layer = PostgreSQLChannelLayer(dsn=password_postgresql.dsn, timeout=2, poll_interval=0.05)
    rotated = password_postgresql.dsn.replace(SECRET, "rotated-password")
    try:
        channel = await layer.new_channel()
        waiting = asyncio.create_task(layer.receive(channel))
        admin = await asyncpg.connect(password_postgresql.dsn)
        try:
            await admin.execute("ALTER ROLE postgres PASSWORD 'rotated-password'")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
                f"fastapi_websockets:{layer.client_token}%",
            )
        finally:
            await admin.close()
        refused = await refused_while_running(layer)
        await eventually(lambda: login_refusals(caplog), "the refusal is logged")
        await asyncio.sleep(1)  # the listener retries meanwhile, without logging again
        assert len(login_refusals(caplog)) == 1, login_refusals(caplog)
        assert "InvalidPasswordError" in login_refusals(caplog)[0]
        assert not waiting.done()
        admin = await asyncpg.connect(rotated)
        try:
            await admin.execute(f"ALTER ROLE postgres PASSWORD '{SECRET}'")
        finally:
            await admin.close()
        await layer.send(channel, {"type": "back"})
        assert await asyncio.wait_for(waiting, 30) == {"type": "back"}
        _assert_nothing_leaks(layer, caplog, *refused)
    finally:
        await layer.close()


async def test_the_database_gone_mid_operation_leaks_no_password(
    password_postgresql: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    layer = PostgreSQLChannelLayer(
        dsn=password_postgresql.dsn, schema="gone", timeout=0.5, poll_interval=0.05
    )
    errors: list[BaseException] = []
    try:
        channel = await layer.new_channel()
        waiting = [
            asyncio.create_task(layer.receive(channel, timeout=30)),
            asyncio.create_task(layer.receive("gone.named", timeout=30)),
        ]
        await asyncio.sleep(0.2)
        password_postgresql.stop()
        for call in (
            layer.send("gone.named", {"type": "x"}),
            layer.send(f"other.{'a' * 8}!x", {"type": "x"}),
            layer.group_send("g", {"type": "x"}),
            layer.group_add("g", channel),
        ):
            with pytest.raises(BackendUnavailable) as info:
                await call
            errors.append(info.value)
        await asyncio.sleep(1.0)  # the listener and readers retry and log meanwhile
        password_postgresql.start()
        await layer.send(channel, {"type": "back"})
        await layer.send("gone.named", {"type": "back"})
        assert [(await task)["type"] for task in waiting] == ["back", "back"]
        assert any(record.levelno >= logging.WARNING for record in caplog.records)
        _assert_nothing_leaks(layer, caplog, *errors)
    finally:
        await layer.close()
    _assert_nothing_leaks(layer, caplog, *errors)


# -------------------------------------------------------------------- history

HISTORY = {"room:*": {"size": 50, "ttl": 600}, "tiny:*": 3, "short:*": {"size": 10, "ttl": 0.5}}


async def test_history_survives_a_database_restart(restartable_postgresql: PostgresServer) -> None:
    dsn, schema = restartable_postgresql.dsn, "history_restart"
    layer = PostgreSQLChannelLayer(dsn=dsn, schema=schema, history=HISTORY)
    try:
        sent = [await layer.group_send("room:r", {"type": "m", "i": i}) for i in range(5)]
        assert all(sent)
    finally:
        await layer.close()
    restartable_postgresql.stop()
    restartable_postgresql.start()
    layer = PostgreSQLChannelLayer(dsn=dsn, schema=schema, history=HISTORY)
    try:
        first = sent[0]
        assert first is not None
        page = await layer.group_history("room:r", since=first)
        assert page.recovered
        assert [m["i"] for m in page.messages] == [1, 2, 3, 4]
        assert page.position == sent[-1]
        after = await layer.group_send("room:r", {"type": "m", "i": 5})
        assert after == (first.offset + 5, first.epoch)  # same epoch, the counter goes on
    finally:
        await layer.close()


async def test_history_deleted_out_of_band_gets_a_new_epoch(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    layer = make(history=HISTORY)
    before = [await layer.group_send("room:w", {"type": "m", "i": i}) for i in range(3)]
    last = before[-1]
    assert last is not None
    await db.execute(f'DELETE FROM "{namespace}".history_stream WHERE group_name = $1', "room:w")
    page = await layer.group_history("room:w", since=last)
    assert not page.recovered
    assert page.messages == []  # the old life's entries are not mixed in
    assert page.position.offset == 0
    assert page.position.epoch != last.epoch
    after = await layer.group_send("room:w", {"type": "m", "i": 3})
    assert after == (1, page.position.epoch)  # the epoch the read started is the one used


async def test_history_rows_are_trimmed_by_size_and_pruned_by_ttl(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    layer = make(history=HISTORY, prune_interval=0.2)
    for i in range(10):
        await layer.group_send("tiny:t", {"type": "m", "i": i})
        stored = await db.fetch(f'SELECT "offset" FROM "{namespace}".history_entry ORDER BY "offset"')
        assert [row[0] for row in stored] == list(range(max(1, i - 1), i + 2))  # at most size = 3
    await layer.group_send("short:s", {"type": "m"})

    async def expired_gone() -> bool:
        streams = await db.fetch(f'SELECT group_name FROM "{namespace}".history_stream')
        entries = await db.fetchval(f'SELECT count(*) FROM "{namespace}".history_entry')
        return [row[0] for row in streams] == ["tiny:t"] and entries == 3

    await eventually(expired_gone, "the expired stream and its entries pruned, the live ones kept")


async def test_groups_without_history_create_no_history_tables(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    plain = make()
    await plain.group_send("room:x", {"type": "m"})
    tables = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", namespace)
    assert sorted(row[0] for row in tables) == ["group_member", "group_owner", "message"]
    with_history = make(history=HISTORY)
    await with_history.group_send("room:x", {"type": "m"})
    await plain.flush()  # wipes the history a layer sharing the schema keeps, too
    assert await db.fetchval(f'SELECT count(*) FROM "{namespace}".history_entry') == 0


async def test_a_named_member_of_a_history_group_gets_positions(make: Factory) -> None:
    sender, reader = make(history=HISTORY), make()
    await sender.group_add("room:n", "jobs.named")
    first = await sender.group_send("room:n", {"type": "m", "i": 0})
    second = await sender.group_send("room:n", {"type": "m", "i": 1})
    assert first is not None
    assert second is not None
    got = [await reader.receive("jobs.named", timeout=10) for _ in range(2)]
    assert [StreamPosition(**m["_position"]) for m in got] == [first, second]


_HISTORY_CHILD = """
import asyncio, sys
from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer

async def main():
    layer = PostgreSQLChannelLayer(dsn=sys.argv[1], schema=sys.argv[2], history={"room:*": 1000})
    print("ready", flush=True)
    sys.stdin.readline()
    offsets = [(await layer.group_send("room:p", {"type": "m", "who": sys.argv[3], "i": i})).offset
               for i in range(100)]
    print(" ".join(map(str, offsets)), flush=True)
    await layer.close()

asyncio.run(main())
"""


async def test_offsets_from_several_os_processes_are_contiguous(make: Factory, namespace: str) -> None:
    layer = make(history={"room:*": 1000}, capacity=1000)
    channel = await layer.new_channel("ws")
    await layer.group_add("room:p", channel)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _HISTORY_CHILD,
            layer.dsn,
            namespace,
            str(who),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for who in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert (await asyncio.wait_for(child.stdout.readline(), 30)).strip() == b"ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        per_child = []
        for child in children:
            assert child.stdout is not None
            per_child.append([int(n) for n in (await asyncio.wait_for(child.stdout.readline(), 60)).split()])
            assert await asyncio.wait_for(child.wait(), 30) == 0
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    for offsets in per_child:
        assert offsets == sorted(offsets)
    assert sorted(n for offsets in per_child for n in offsets) == list(range(1, 301))
    # Members get them in offset order, each once.
    live = [await layer.receive(channel, timeout=10) for _ in range(300)]
    assert [m["_position"]["offset"] for m in live] == list(range(1, 301))
    page = await layer.group_history("room:p", limit=300)
    assert page.recovered
    assert [m["_position"]["offset"] for m in page.messages] == list(range(1, 301))


async def test_catch_up_is_exact_with_several_publishers(make: Factory) -> None:
    """Members added while other instances publish concurrently: page + live = everything after since."""
    publishers = [make(history={"room:*": 5000}) for _ in range(3)]
    joiner = make(history={"room:*": 5000}, capacity=5000)
    sent: list[int] = []
    started = asyncio.Event()

    async def publish(layer: PostgreSQLChannelLayer) -> None:
        for i in range(150):
            position = await layer.group_send("room:many", {"type": "m", "i": i})
            assert position is not None
            sent.append(position.offset)
            if len(sent) >= 30:
                started.set()

    tasks = [asyncio.ensure_future(publish(layer)) for layer in publishers]
    try:
        await asyncio.wait_for(started.wait(), 30)
        since = await joiner.group_history("room:many", limit=1)
        channels = []
        pages = []
        for _ in range(5):  # several joins while the publishers run
            channel = await joiner.new_channel("ws")
            page = await joiner.group_add("room:many", channel, since=since.position)
            assert page is not None
            assert page.recovered
            channels.append(channel)
            pages.append(page)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    expected = sorted(n for n in sent if n > since.position.offset)
    for channel, page in zip(channels, pages, strict=True):
        live_count = sum(1 for n in sent if n > page.position.offset)
        live = [await joiner.receive(channel, timeout=10) for _ in range(live_count)]
        with pytest.raises(TimeoutError):
            await joiner.receive(channel, timeout=0.5)
        offsets = [m["_position"]["offset"] for m in page.messages + live]
        assert offsets == expected


# ------------------------------------------------------------------- presence


async def presence_rows(db: asyncpg.Connection, namespace: str) -> tuple[set[tuple[str, str, str]], set[str]]:
    entries = await db.fetch(f'SELECT group_name, channel, owner FROM "{namespace}".presence')
    owners = await db.fetch(f'SELECT owner FROM "{namespace}".presence_owner')
    return {(r[0], r[1], r[2]) for r in entries}, {r[0] for r in owners}


async def test_layers_without_presence_make_no_presence_tables(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    plain = make()
    await plain.group_send("room:p", {"type": "m"})
    assert await plain.presence("room:p") == {}  # a read alone creates nothing
    await plain.presence_leave("room:p", "nobody")
    await plain.presence_heartbeat()
    tables = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", namespace)
    assert sorted(row[0] for row in tables) == ["group_member", "group_owner", "message"]
    checker = make(ensure_schema=False)
    with pytest.raises(ChannelLayerError, match="presence tables"):
        await checker.presence_join("room:p", await checker.new_channel(), {})


async def test_presence_rows_after_join_leave_reap_and_close(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # A long timeout: the background heartbeat beats once at the first join, then
    # the test drives presence_heartbeat() itself.
    a, b = make(presence_timeout=300), make(presence_timeout=300)
    a1, a2, bob = await a.new_channel("ws"), await a.new_channel("ws"), await b.new_channel("ws")
    await a.presence_join("room:p", a1, {"u": "a1"})
    await a.presence_join("room:p", a2, {"u": "a2"})
    await a.presence_join("room:q", a1, {"u": "a1"})
    await b.presence_join("room:p", bob, {"u": "bob"})
    entries, owners = await presence_rows(db, namespace)
    ta, tb = a.client_token, b.client_token
    assert entries == {("room:p", a1, ta), ("room:p", a2, ta), ("room:q", a1, ta), ("room:p", bob, tb)}
    assert owners == {ta, tb}
    await a.presence_leave("room:p", a2)
    assert ("room:p", a2, ta) not in (await presence_rows(db, namespace))[0]

    # `a` stops beating (its record runs out): it vanishes at once, and the first
    # heartbeat of a live process removes its rows and announces its leaves, once.
    watcher = await b.new_channel("ws")
    await b.group_add("room:p", watcher)
    await db.execute(
        f"UPDATE \"{namespace}\".presence_owner SET deadline = now() - interval '1 second' WHERE owner = $1",
        ta,
    )
    assert await b.presence("room:p") == {bob: {"u": "bob"}}
    await b.presence_heartbeat()
    assert await b.receive(watcher, timeout=10) == {
        "type": "presence.left",
        "group": "room:p",
        "channel": a1,
        "info": {"u": "a1"},
    }
    assert await presence_rows(db, namespace) == ({("room:p", bob, tb)}, {tb})
    await b.presence_heartbeat()
    with pytest.raises(TimeoutError):
        await b.receive(watcher, timeout=0.3)

    # `a` was alive after all: a join finds its record gone, and its next beat
    # stores every entry it holds again.
    a3 = await a.new_channel("ws")
    await a.presence_join("room:q", a3, {"u": "a3"}, notify=False)
    await a.presence_heartbeat()
    assert await b.presence("room:p") == {a1: {"u": "a1"}, bob: {"u": "bob"}}
    assert await b.presence("room:q") == {a1: {"u": "a1"}, a3: {"u": "a3"}}

    await a.close()
    assert await presence_rows(db, namespace) == ({("room:p", bob, tb)}, {tb})
    await b.flush()
    assert await presence_rows(db, namespace) == (set(), set())


@pytest.mark.parametrize("members", [1, 500])
async def test_a_heartbeat_writes_one_row_whatever_the_number_of_members(
    make: Factory, db: asyncpg.Connection, namespace: str, members: int
) -> None:
    layer = make(presence_timeout=300)
    channels = [await layer.new_channel("ws") for _ in range(members)]
    await asyncio.gather(*(layer.presence_join("room:h", c, {}, notify=False) for c in channels))

    async def versions() -> dict[str, str]:
        # A row's (ctid, xmin) changes with every write to it.
        rows = await db.fetch(
            f'SELECT channel, ctid::text || xmin::text FROM "{namespace}".presence UNION ALL '
            f"SELECT 'owner', ctid::text || xmin::text FROM \"{namespace}\".presence_owner"
        )
        return {row[0]: row[1] for row in rows}

    before = await versions()
    await layer.presence_heartbeat()
    after = await versions()
    assert len(before) == len(after) == members + 1
    assert [key for key in before if before[key] != after[key]] == ["owner"]


async def test_concurrent_joins_are_written_in_one_statement(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # A consumer's connect joins while dozens of others do (the churn soak: 50 at a
    # time). Each join used to hold the presence lock across its own round trip, so the
    # joins (and the leaves among them) waited for each other while the room's chat
    # filled their mailboxes; queued on one writer, they go out together.
    layer = make(presence_timeout=300)
    first = await layer.new_channel("ws")
    await layer.presence_join("room:b", first, {}, notify=False)  # makes the tables
    channels = [await layer.new_channel("ws") for _ in range(50)]
    await asyncio.gather(*(layer.presence_join("room:b", c, {"c": c}, notify=False) for c in channels))

    rows = await db.fetch(f'SELECT channel, xmin::text AS tx FROM "{namespace}".presence')
    # A row's xmin is the transaction that wrote it: one per statement here.
    assert {row["channel"] for row in rows} == {first, *channels}
    # The first goes out alone; the others, queued while it is written, together.
    assert len({row["tx"] for row in rows if row["channel"] != first}) <= 2
    assert await layer.presence("room:b") == {first: {}} | {c: {"c": c} for c in channels}

    await asyncio.gather(*(layer.presence_leave("room:b", c, notify=False) for c in channels))
    assert await layer.presence("room:b") == {first: {}}


async def test_a_join_its_caller_gave_up_on_leaves_no_entry_behind(
    make: Factory, db: asyncpg.Connection, namespace: str
) -> None:
    # Cancelled before its change went out, after, or while it was being written: a
    # caller that saw its join cancelled will not leave, so the entry must not stay.
    layer = make(presence_timeout=300)
    await layer.presence_join("room:g", await layer.new_channel("ws"), {}, notify=False)
    given_up = await give_up_joins(layer, "room:g", rounds=12)
    assert given_up  # a join that completed before its cancel is a join like any other
    stored = {row[0] for row in await db.fetch(f'SELECT channel FROM "{namespace}".presence')}
    assert not stored & set(given_up)
    assert not set(await layer.presence("room:g")) & set(given_up)


async def test_presence_survives_a_database_restart_and_a_crash(
    restartable_postgresql: PostgresServer,
) -> None:
    server, schema = restartable_postgresql, "presence_restart"
    owner = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema, presence_timeout=300)
    viewer = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema)
    try:
        channels = [await owner.new_channel("ws") for _ in range(3)]
        for i, channel in enumerate(channels):
            await owner.presence_join("room:r", channel, {"i": i})
        expected = {channel: {"i": i} for i, channel in enumerate(channels)}
        server.stop()
        server.start()
        assert await viewer.presence("room:r") == expected  # a clean restart keeps the tables

        server.crash()  # crash recovery empties the (unlogged) presence tables
        server.start()
        assert await viewer.presence("room:r") == {}
        await owner.presence_heartbeat()  # one beat puts every entry back
        assert await viewer.presence("room:r") == expected
    finally:
        await owner.close()
        await viewer.close()
