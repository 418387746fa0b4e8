"""A driver error nobody expected, injected once into each PostgreSQL background task.

The fault is a real asyncpg method raising :class:`InjectedFault` once against
the real server (no fake broker). Each task must be started again with backoff
and logged, or fail the calls that depend on it; never leave the process
connected and deaf.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from fastapi_websockets import BaseChannelLayer
from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer
from tests.backends.test_postgresql import backends_of
from tests.conftest import layer_factory
from tests.faults import InjectedFault, eventually, fail_once, restarted_after_fault
from tests.servers.postgresql import PostgresServer

Factory = Callable[..., PostgreSQLChannelLayer]
Connection = asyncpg.connection.Connection

#: A hang guard for waits on messages, not a speed goal.
PATIENCE = 30.0


@pytest.fixture
def make(postgresql_server: PostgresServer, namespace: str, layers: list[BaseChannelLayer]) -> Factory:
    return layer_factory(layers, PostgreSQLChannelLayer, dsn=postgresql_server.dsn, schema=namespace)


@pytest.fixture
async def db(postgresql_server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgresql_server.dsn)
    yield conn
    await conn.close()


@pytest.fixture(autouse=True)
def _errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="fastapi_websockets")


async def test_the_inbox_reader_is_restarted(
    make: Factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    claim = receiver._sql.claim
    fired = fail_once(
        monkeypatch,
        Connection,
        "fetch",
        lambda _conn, query, *args, **kwargs: query == claim and args[0] == receiver._inbox,
    )
    # Too big to ride in its notification (8000 bytes): the inbox reader claims it from the table.
    pad = "x" * 9000
    await sender.group_send("room", {"type": "first", "pad": pad})
    await sender.group_send("room", {"type": "second", "pad": pad})
    got = [(await receiver.receive(channel, timeout=PATIENCE))["type"] for _ in range(2)]
    assert got == ["first", "second"]
    assert fired
    assert restarted_after_fault(caplog, "fastapi_websockets.postgresql.inbox")
    assert receiver.tasks.restarts == 1


async def test_a_named_channel_reader_is_restarted(
    make: Factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender = make(), make()
    claim = receiver._sql.claim
    fired = fail_once(
        monkeypatch,
        Connection,
        "fetch",
        lambda _conn, query, *args, **kwargs: query == claim and args[0] == "jobs",
    )
    waiting = asyncio.create_task(receiver.receive("jobs", timeout=PATIENCE))
    await sender.send("jobs", {"type": "job"})
    assert (await waiting)["type"] == "job"
    await sender.send("jobs", {"type": "next"})
    assert (await receiver.receive("jobs", timeout=PATIENCE))["type"] == "next"
    assert fired
    assert restarted_after_fault(caplog, "fastapi_websockets.postgresql.named:jobs")


async def test_the_listener_is_restarted(
    make: Factory,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm"})
    assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "warm"
    fired = fail_once(monkeypatch, Connection, "add_listener")
    # The server ends the LISTEN session; the listener's reconnect hits the fault.
    (listen_pid,) = [
        r["pid"] for r in await backends_of(db, receiver) if r["application_name"].endswith(":listen")
    ]
    assert await db.fetchval("SELECT pg_terminate_backend($1)", listen_pid)
    await eventually(lambda: _true(bool(fired)), "the fault fired")

    async def listening_again() -> bool:
        rows = await backends_of(db, receiver)
        pids = [r["pid"] for r in rows if r["application_name"].endswith(":listen")]
        return len(pids) == 1 and pids[0] != listen_pid

    await eventually(listening_again, "a new LISTEN connection")
    await sender.send(channel, {"type": "after"})
    assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "after"
    assert restarted_after_fault(caplog, "fastapi_websockets.postgresql.listener")


async def test_a_failed_outbox_write_fails_its_sends_and_the_next_ones_work(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox writer is started per burst of sends: an error is the senders'
    # (each send raises it), and the next send starts a new writer.
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    fired = fail_once(
        monkeypatch,
        Connection,
        "fetchval",
        lambda _conn, query, *args, **kwargs: query in (sender._sql.send_inbox, sender._sql.send_inboxes),
    )
    with pytest.raises(InjectedFault):
        await sender.send(channel, {"type": "failed"})
    assert fired
    await sender.send(channel, {"type": "after"})
    assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "after"


async def test_a_failed_group_statement_fails_every_group_send_in_it(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # group_sends queued together share one statement: its failure is each caller's,
    # and none of them reached anyone (our own members are served after the commit).
    sender, owner = make(), make()
    mine, theirs = await sender.new_channel("ws"), await owner.new_channel("ws")
    await sender.group_add("room", mine)
    await sender.group_add("room", theirs)
    fired = fail_once(
        monkeypatch,
        Connection,
        "fetchrow",
        lambda _conn, query, *args, **kwargs: query == sender._sql.group_send and len(args[0]) > 1,
    )
    # Made in one pass of the event loop, the ten share one statement.
    results = await asyncio.gather(
        *(sender.group_send("room", {"type": "failed", "i": i}) for i in range(10)), return_exceptions=True
    )
    assert fired
    assert all(isinstance(result, InjectedFault) for result in results), results
    await sender.group_send("room", {"type": "after"})
    assert (await owner.receive(theirs, timeout=PATIENCE))["type"] == "after"
    assert (await sender.receive(mine, timeout=PATIENCE))["type"] == "after"


async def test_a_failed_ack_is_logged_and_its_rows_are_still_deleted(
    make: Factory,
    db: asyncpg.Connection,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver, sender = make(), make()
    channel = await receiver.new_channel()
    fired = fail_once(
        monkeypatch,
        Connection,
        "execute",
        lambda _conn, query, *args, **kwargs: query == receiver._sql.delete_ids,
    )
    # Delivered from its NOTIFY; the row is deleted afterwards, in a batch.
    await sender.send(channel, {"type": "first"})
    assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "first"
    await eventually(lambda: _true(bool(fired)), "the fault fired")
    await sender.send(channel, {"type": "second"})
    assert (await receiver.receive(channel, timeout=PATIENCE))["type"] == "second"
    assert any(
        record.exc_info is not None and isinstance(record.exc_info[1], InjectedFault)
        for record in caplog.records
    )

    async def inbox_empty() -> bool:
        count = await db.fetchval(
            f'SELECT count(*) FROM "{namespace}".message WHERE queue = $1', receiver._inbox
        )
        return bool(count == 0)

    # The first message's row too: its delete is not forgotten with the failed batch.
    await eventually(inbox_empty, "the delivered rows deleted")


async def test_the_pruner_is_restarted(
    make: Factory,
    db: asyncpg.Connection,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    layer = make(prune_interval=0.2, channel_expiry=1)
    fired = fail_once(
        monkeypatch,
        Connection,
        "execute",
        lambda _conn, query, *args, **kwargs: query == layer._sql.prune_messages,
    )
    await layer.send("unread", {"type": "expires"})
    await eventually(lambda: _true(bool(fired)), "the fault fired")

    async def pruned() -> bool:
        count = await db.fetchval(f'SELECT count(*) FROM "{namespace}".message WHERE queue = $1', "unread")
        return bool(count == 0)

    await eventually(pruned, "the expired message pruned")
    assert restarted_after_fault(caplog, "fastapi_websockets.postgresql.prune")


async def _true(value: bool) -> bool:
    return value
