"""Nothing accepted is lost on PostgreSQL around a restart, a crash or a dropped connection.

Sends are issued the instant the server accepts connections again, without
waiting for any layer to reconnect. Servers are private to the test, stopped
with a fast shutdown (SIGINT) or killed with SIGKILL (``kill -9``) and started
again on the same port and data directory.
"""

from __future__ import annotations

import asyncio
import base64
import time

import asyncpg
import pytest

from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer
from tests.faults import TcpProxy, receiver_process, send_burst
from tests.servers.postgresql import PostgresServer

#: A hang guard for waits on messages, not a speed goal.
PATIENCE = 60.0


def bring_down(server: PostgresServer, how: str) -> None:
    """Stop the server (fast shutdown) or kill -9 its postmaster."""
    if how == "kill":
        assert server.process is not None
        server.process.kill()
    else:
        server.stop()


def bring_up(server: PostgresServer) -> None:
    """Start the server again; returns as soon as it accepts connections.

    After a kill -9 the old backends notice their postmaster is gone and exit
    on their own; until they have, a new postmaster refuses to start ("shared
    memory block is still in use"), so that start is tried again.
    """
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            server.start()
            return
        except RuntimeError:
            if server.process is not None:
                server.process.stop()  # exited already: closes its log
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_sends_the_instant_the_server_is_back_all_arrive(
    restartable_postgresql: PostgresServer, how: str
) -> None:
    server, schema = restartable_postgresql, f"back_{how}"
    # Under the default asynchronous commit a kill -9 loses what was committed in its last
    # few hundred ms (documented): at load 6-8, 4 of 8 kills 0.2 s after a new layer's
    # group_adds lost the memberships or the whole schema, and the group messages then
    # reached nobody. The guarantee under a crash is synchronous_commit=True's.
    durable = how == "kill"
    receiver = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema, synchronous_commit=durable)
    sender = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema, synchronous_commit=durable)
    fresh = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema, synchronous_commit=durable)
    try:
        channel = await receiver.new_channel()
        await receiver.group_add("room", channel)
        await receiver.group_add("room", "named.member")
        await sender.send("warm", {"type": "x"})
        waiting = asyncio.create_task(receiver.receive(channel, timeout=PATIENCE))
        waiting_named = asyncio.create_task(receiver.receive("jobs", timeout=PATIENCE))
        await asyncio.sleep(0.2)

        bring_down(server, how)
        bring_up(server)
        # An old layer (its connections are dead) and a new process's layer send at once.
        await asyncio.gather(
            sender.send(channel, {"type": "direct", "by": "old"}),
            fresh.send(channel, {"type": "direct", "by": "new"}),
            sender.group_send("room", {"type": "group", "by": "old"}),
            fresh.group_send("room", {"type": "group", "by": "new"}),
            fresh.send("jobs", {"type": "named"}),
        )

        assert (await waiting_named)["type"] == "named"
        got = [await waiting]
        got += [await receiver.receive(channel, timeout=PATIENCE) for _ in range(3)]
        assert sorted((m["type"], m["by"]) for m in got) == [
            ("direct", "new"),
            ("direct", "old"),
            ("group", "new"),
            ("group", "old"),
        ]
        named = [await receiver.receive("named.member", timeout=PATIENCE) for _ in range(2)]
        assert sorted(m["by"] for m in named) == ["new", "old"]
        assert receiver.tasks.failures == 0
    finally:
        for layer in (receiver, sender, fresh):
            await layer.close()


async def test_a_cut_connection_of_the_receiver_loses_nothing(restartable_postgresql: PostgresServer) -> None:
    server, schema = restartable_postgresql, "cut"
    async with TcpProxy(server.port) as proxy:
        receiver = PostgreSQLChannelLayer(
            dsn=server.dsn.replace(str(server.port), str(proxy.port)), schema=schema
        )
        sender = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema)
        try:
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
            await proxy.cut()  # every connection of the receiver drops; new ones are refused
            await send_for(3.0)
            await proxy.reopen()
            await send_for(4.5)
            # The last message is the sender's last one to this channel: once it is in,
            # everything sent before it has had its chance to arrive (or to come twice).
            await sender.send(channel, {"type": "p", "i": -1})
            try:
                for _ in range(int(PATIENCE / 0.05)):
                    if -1 in got:
                        break
                    await asyncio.sleep(0.05)
            finally:
                collecting.cancel()
                await asyncio.gather(collecting, return_exceptions=True)
        finally:
            await receiver.close()
            await sender.close()
    assert sent == 72
    lost = sorted(set(range(sent)) - set(got))
    twice = sorted(i for i in set(got) if got.count(i) > 1)
    assert (lost, twice) == ([], []), f"lost {lost}, twice {twice}"
    assert sorted(got) == [-1, *range(sent)]


async def test_a_first_channel_made_while_cut_off_receives_once_reconnected(
    restartable_postgresql: PostgresServer,
) -> None:
    # A layer LISTENs on its inbox from its first new_channel(); made while its
    # connections are cut, that LISTEN happens on reconnecting, and what was stored
    # meanwhile (a send, a membership notice, a group message) is claimed then.
    server, schema = restartable_postgresql, "first_cut"
    async with TcpProxy(server.port) as proxy:
        receiver = PostgreSQLChannelLayer(
            dsn=server.dsn.replace(str(server.port), str(proxy.port)), schema=schema
        )
        sender = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema)
        try:
            await receiver.group_send("nobody", {"type": "start"})  # started, no channel yet
            await proxy.cut()
            channel = await receiver.new_channel()
            await sender.send(channel, {"type": "first"})
            await sender.group_add("room", channel)
            await sender.group_send("room", {"type": "second"})
            await proxy.reopen()
            got = [(await receiver.receive(channel, timeout=PATIENCE))["type"] for _ in range(2)]
            assert got == ["first", "second"]
        finally:
            await receiver.close()
            await sender.close()


async def queue_counts(dsn: str, schema: str) -> list[dict[str, object]]:
    """Rows per queue (live ones, id range) in ``schema``'s message table, for failure messages."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT queue, count(*) AS rows, count(*) FILTER (WHERE expires_at > now()) AS live, "
            f'min(id) AS first, max(id) AS last FROM "{schema}".message GROUP BY queue'
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def test_ten_restarts_and_kills_in_a_row_lose_nothing_across_processes(
    restartable_postgresql: PostgresServer,
) -> None:
    # Each burst is followed at once by the next cycle's stop or kill -9. With the
    # default asynchronous commit, a kill -9 loses the commits of its last few hundred
    # ms (documented; measured here: 1 to 11 of 180 per run, all sent just before a
    # kill, and a claim undone the same way would deliver twice). The guarantee
    # under a crash is synchronous_commit=True's, on both sides.
    server, schema = restartable_postgresql, "across"
    sender = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema, synchronous_commit=True)
    await sender.send("warm", {"type": "x"})  # the schema exists before the child starts
    env = {
        "FASTAPI_WEBSOCKETS_BACKEND": "postgresql",
        "FASTAPI_WEBSOCKETS_POSTGRESQL_DSN": server.dsn,
        "FASTAPI_WEBSOCKETS_POSTGRESQL_SCHEMA": schema,
        "FASTAPI_WEBSOCKETS_POSTGRESQL_SYNCHRONOUS_COMMIT": "true",
    }
    try:
        async with receiver_process(env, PATIENCE) as receiver:
            sent: list[str] = []

            async def burst(tag: str) -> None:
                try:
                    sent.extend(await send_burst(sender, receiver.channel, tag, 3))
                except Exception as exc:
                    # Say what the table holds (a ChannelFull on "named.q" means the
                    # receiver's named reader stopped reading: at most 60 are sent to it).
                    raise AssertionError(
                        f"{exc!r}; stored: {await queue_counts(server.dsn, schema)}"
                    ) from exc

            for cycle in range(10):
                bring_down(server, "kill" if cycle % 2 else "stop")
                bring_up(server)
                await burst(f"{cycle}-at-once")
                await asyncio.sleep(1.0)
                await burst(f"{cycle}-later")
            await receiver.wait_for(sent, PATIENCE)
            lost = sorted(set(sent) - set(receiver.got))
            if lost:
                # Still stored (a reader that stopped reading) or gone (deleted undelivered)?
                conn = await asyncpg.connect(server.dsn)
                try:
                    rows = await conn.fetch(f'SELECT id, queue, targets, data FROM "{schema}".message')
                finally:
                    await conn.close()
                stored = [
                    (r["id"], r["queue"]) for r in rows if any(key.encode() in _content(r) for key in lost)
                ]
                raise AssertionError(f"{len(lost)} of {len(sent)} lost: {lost[:10]}; still stored: {stored}")
            assert len(sent) == 180
            assert sorted(receiver.got) == sorted(sent), "a message arrived twice"
    finally:
        await sender.close()


def _content(row: asyncpg.Record) -> bytes:
    """The encoded messages a message row holds: a row of sends keeps them as lines "channel base64"."""
    if row["targets"] and row["targets"][:2] == [None, "s"]:
        return b"".join(base64.b64decode(line.split(b" ", 1)[1]) for line in row["data"].split(b"\n"))
    data: bytes = row["data"]
    return data


async def tables_of(dsn: str, schema: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n "
            "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY 1",
            schema,
        )
    finally:
        await conn.close()
    return [row["relname"] for row in rows]


async def test_the_schema_a_layer_created_survives_a_crash_right_after(
    restartable_postgresql: PostgresServer,
) -> None:
    # Messages are written with asynchronous commit by default (a crash may lose the last few
    # hundred ms of them), but the tables they go in must not be lost with them: a layer
    # started before the crash would then fail every send and receive.
    server = restartable_postgresql
    for attempt in range(3):
        schema = f"ddl_{attempt}"
        layer = PostgreSQLChannelLayer(dsn=server.dsn, schema=schema, history={"room.*": 10})
        try:
            await layer.new_channel()  # starts the layer: the schema is made
            bring_down(server, "kill")
            bring_up(server)
            assert await tables_of(server.dsn, schema) == [
                "group_member",
                "group_owner",
                "history_entry",
                "history_stream",
                "message",
            ]
        finally:
            await layer.close()
