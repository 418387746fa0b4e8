"""The PostgreSQL backend: messages live in tables, LISTEN/NOTIFY wakes readers.

Three tables in the configured schema hold everything:

* ``message``: one row per stored message (per burst, for sends to an
  inbox). ``queue`` is the channel name of a named channel, or ``"!" + token``
  for the inbox of one layer instance (a channel name never starts with
  ``!``). An inbox row says in ``targets`` what it is for: ``{NULL, s}`` for
  sends written in one statement (``data`` holds a line ``channel base64`` per
  send), or ``{NULL, kind, group, ...}`` for a group message (``g``) or a
  membership notice (``j``/``l``), so one ``group_send`` stores one small row
  per owning process, not one per member. (Rows of earlier versions,
  ``{channel}`` with one message, are still read.)
* ``group_member``: one row per (group, channel), each with its own expiry;
  ``owner`` is the process token of a process-specific member, NULL for a
  named one.
* ``group_owner``: one row per (group, process with members in it), expiring
  with its longest-lived member and removed with its last one. ``group_send``
  reads these, not the members: each owning process delivers to its own
  record of its members (``local_groups``), which its own joins and leaves
  keep, and another process's joins and leaves of its channels reach as
  notices in its inbox, in order with the group's messages.

Layers with the ``history`` option add ``history_stream`` (a counter row per
group) and ``history_entry`` (the stored messages), and functions that send or
read a history group in one round trip (see :func:`_history_ddl`).

Each layer instance holds one LISTEN connection and a small pool; it LISTENs on
its inbox from its first ``new_channel()`` (a NOTIFY wakes every listening
session of the database, so a layer that only sends stays out of that). ``send`` is a
single statement (insert + ``pg_notify``); ``group_send`` is a single
statement that reads the owner rows and the named members, stores one row per
owning process and per named member, and notifies each queue once. Sends to
``new_channel()`` names and ``group_send``s made while such a statement is in
flight share the next one (one writer per layer, in call order), and their
sends to one inbox are one row. An inbox row rides in its notification's
payload when it fits, so the owner handles it without a round trip and deletes
it later in a batch; the notifications of named channels are
empty, and their rows are claimed in batches with ``DELETE ... RETURNING``
(``FOR UPDATE SKIP LOCKED`` so several processes can read one named channel).
Nothing polls while the listener is connected; while it is reconnecting,
readers re-check the tables every ``poll_interval``, and after it is back they
re-check once, so whatever was stored meanwhile is delivered.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import hashlib
import inspect
import itertools
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload
from urllib.parse import parse_qsl

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.backoff import Backoff
from fastapi_websockets.backends.base import missing_driver
from fastapi_websockets.backends.broker import BrokerChannelLayer
from fastapi_websockets.backends.futures import settle
from fastapi_websockets.backends.locks import KeyedLocks
from fastapi_websockets.backends.options import Memo, flag, matching, positive, positive_int, url
from fastapi_websockets.backends.timeouts import LazyDeadline, wait_event, within
from fastapi_websockets.backends.tls import client_context, require_secure, tls_failure
from fastapi_websockets.backends.urls import user_of
from fastapi_websockets.backends.waiters import WaiterQueue
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelFull,
    ChannelLayerClosed,
    ChannelLayerError,
)
from fastapi_websockets.history import POSITION_KEY, HistoryPolicy, HistorySlice, StreamPosition, new_epoch
from fastapi_websockets.names import is_process_specific, process_token
from fastapi_websockets.presence import QueuedWrite
from fastapi_websockets.types import Message

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    _Conn = PoolConnectionProxy[asyncpg.Record]

__all__ = ["PostgreSQLChannelLayer", "StatementRefused", "lock_key", "notify_channel"]

logger = logging.getLogger("fastapi_websockets.postgresql")


class StatementRefused(ChannelLayerError):
    """PostgreSQL answered a statement with an error: it was rolled back, nothing of it stored.

    A deadlock, a statement cancelled (``statement_timeout``, ``lock_timeout``,
    ``pg_cancel_backend``), a read-only server, a role without rights: the text
    says which and what to do, ``sqlstate`` is the server's code (``40P01`` for a
    deadlock) and the asyncpg error is the ``__cause__``. A lost connection is
    :class:`BackendUnavailable` instead.
    """

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


#: What to do about a refused statement, by SQLSTATE (then by its two-character class).
_REFUSAL_ADVICE = {
    "40P01": "it was chosen to break a deadlock with another session; the call can be made again",
    "40": "the server rolled the transaction back (serialization failure); the call can be made again",
    "57014": (
        "the server cancelled it (statement_timeout of the role or database, or pg_cancel_backend); "
        "raise statement_timeout for this role if it is too low, then make the call again"
    ),
    "55P03": (
        "a lock it needs was not granted within lock_timeout (another session holds it); "
        "make the call again, or look for the session holding locks on the schema's tables"
    ),
    "25006": "the server is read-only (a standby, or default_transaction_read_only): point dsn at a primary",
    "42501": "the layer's role lacks rights on the schema's tables or functions: grant them to it",
}

T = TypeVar("T")
FutureT = TypeVar("FutureT", bound="asyncio.Future[Any]")

#: A schema name: an identifier of at most 63 bytes (NAMEDATALEN - 1), not in
#: the ``pg_`` namespace PostgreSQL reserves.
_SCHEMA_RE = re.compile(r"(?![pP][gG]_)[A-Za-z_][A-Za-z0-9_]{0,62}")
_SCHEMA_RULE = (
    "a PostgreSQL schema name: a letter or '_' then letters, digits or '_', "
    "at most 63 bytes, not starting with 'pg_'"
)
#: Rows claimed per round trip from an inbox.
_INBOX_BATCH = 500
#: Seconds the inbox reader gathers delivered ids before deleting their rows. Each
#: DELETE wakes a server backend and costs ~0.3 ms of its CPU: at 0.05 s, two fan-out
#: rounds in five shared the machine with one; a claim skips delivered rows anyway.
_ACK_DELAY = 0.25
#: Claimed ids remembered before the ones older than channel_expiry are forgotten.
_CLAIMED_KEPT = 10_000
#: Most sends to process-specific channels written in one statement.
_SEND_BATCH = 500
#: An outbox entry's inbox: set for a send, None for a group message.
_QUEUE = attrgetter("queue")
#: Most presence changes written in one statement.
_PRESENCE_BATCH = 500
#: Bytes of send lines one NOTIFY payload carries: PostgreSQL refuses 8000 and more, and
#: the row's head ("s", the longest bigint, a newline) comes first.
_NOTE_LIMIT = 7900
#: Messages of this many bytes and more are not base64-encoded for a group row's notification:
#: their base64 alone would pass PostgreSQL's 8000-byte payload limit.
_GROUP_NOTE_BYTES = 6000
#: Most rows claimed per round trip from a named channel (never more than waiters).
_NAMED_BATCH = 100
#: Seconds a named channel stays LISTENed after its last local receiver left, so
#: a ``while True: await receive(name)`` loop does not LISTEN/UNLISTEN per message.
_NAMED_LINGER = 10.0
#: Seconds between liveness checks of an otherwise silent listener connection.
_LISTENER_KEEPALIVE = 30.0
#: Seconds the ordered writer keeps its pooled connection after a statement, for the next
#: one: an acquire and release cost ~20 µs of CPU and a pass of the event loop (asyncpg
#: releases in a task of its own), once per statement of a closed-loop sender, while other
#: callers wait at most this long for the pool's other connections.
_WRITER_LINGER = 0.01


def notify_channel(schema: str, queue: str) -> str:
    """The NOTIFY channel that wakes readers of ``queue`` in ``schema``.

    Channel names are identifiers of at most 63 bytes, and the NOTIFY namespace is
    per database, so the name is a hash of schema and queue (the same expression
    runs in SQL in ``group_send``).
    """
    return "fws_" + hashlib.sha256(f"{schema}/{queue}".encode()).hexdigest()[:40]


def _notify_sql(schema: str, queue: str) -> str:
    """The SQL expression of :func:`notify_channel` for SQL expressions ``schema`` and ``queue``."""
    return f"'fws_' || left(encode(sha256(convert_to({schema} || '/' || {queue}, 'UTF8')), 'hex'), 40)"


def lock_key(schema: str, purpose: str) -> int:
    """The advisory-lock key (a signed 64-bit int) used for ``purpose`` in ``schema``."""
    digest = hashlib.sha256(f"fastapi_websockets/{purpose}/{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: The version of the SQL functions this backend makes. Bump it with any change to
#: their definitions (a test pins it to a digest of them): a layer with ``ensure_schema``
#: that finds functions of a lower version (or none, made before versions were
#: marked) replaces them all, and one finding a higher version leaves them, so an
#: older process restarting during a rolling upgrade does not bring old ones back.
FUNCTIONS_VERSION = 1
_FUNCTION_RE = re.compile(r"CREATE OR REPLACE FUNCTION .*?\$fn\$.*?\$fn\$", re.DOTALL)


# The first half of the advisory-lock key a named channel's senders take turns on
# (the second: hashtext of the channel), in send_named and send_named_members.
_NAMED_LOCK = "hashtext('fastapi_websockets/send_named')"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _inbox_queue(token: str) -> str:
    return "!" + token


class _Sql:
    """Every statement the backend runs, with the schema quoted in once."""

    def __init__(self, schema: str) -> None:
        s = _quote_ident(schema)
        self.create_schema = f"CREATE SCHEMA IF NOT EXISTS {s}"
        self.create = f"""
CREATE TABLE IF NOT EXISTS {s}.message (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    targets text[],
    expires_at timestamptz NOT NULL,
    data bytea NOT NULL,
    history_offset bigint,
    history_epoch text
);
-- A fan-out row's target list (tens of KB for big groups) lives for milliseconds:
-- storing it out of line uncompressed is cheaper than compressing it.
ALTER TABLE {s}.message ALTER COLUMN targets SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS message_queue_id ON {s}.message (queue, id);
CREATE INDEX IF NOT EXISTS message_expires_at ON {s}.message (expires_at);
CREATE TABLE IF NOT EXISTS {s}.group_member (
    group_name text NOT NULL,
    channel text NOT NULL,
    owner text,
    capacity integer NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, channel)
);
CREATE INDEX IF NOT EXISTS group_member_owner ON {s}.group_member (owner);
CREATE INDEX IF NOT EXISTS group_member_expires_at ON {s}.group_member (expires_at);
CREATE INDEX IF NOT EXISTS group_member_group_owner ON {s}.group_member (group_name, owner);
CREATE INDEX IF NOT EXISTS group_member_named ON {s}.group_member (group_name) WHERE owner IS NULL;
-- One row per (group, process with members in it), living as long as its
-- longest-lived member: group_send reads these (a few rows), not every member.
CREATE TABLE IF NOT EXISTS {s}.group_owner (
    group_name text NOT NULL,
    owner text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, owner)
);
CREATE INDEX IF NOT EXISTS group_owner_owner ON {s}.group_owner (owner);
CREATE INDEX IF NOT EXISTS group_owner_expires_at ON {s}.group_owner (expires_at);
-- Removes a process-specific member, and its process's owner row when that was
-- its last live member in the group. Statements of their own (each with a fresh
-- snapshot) after the owner row's lock: a member added meanwhile by another
-- session (which takes that lock first, see group_join) is seen, so the owner
-- row is never dropped from under a live member.
CREATE OR REPLACE FUNCTION {s}.group_leave(p_group text, p_channel text, p_owner text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM {s}.group_owner WHERE group_name = p_group AND owner = p_owner FOR UPDATE;
    DELETE FROM {s}.group_member WHERE group_name = p_group AND channel = p_channel;
    DELETE FROM {s}.group_owner AS o
    WHERE o.group_name = p_group AND o.owner = p_owner AND NOT EXISTS (
        SELECT 1 FROM {s}.group_member AS m
        WHERE m.group_name = p_group AND m.owner = p_owner AND m.expires_at > now()
    );
    RETURN 1;
END
$fn$;
-- Stores a message in named channel p_queue while it holds fewer than p_capacity
-- live ones. Counting and inserting in one statement let sends in flight together
-- (several processes, or several pooled connections) all pass the count, since
-- each saw only rows committed before it began. Senders to one queue take turns on
-- a transaction-scoped advisory lock instead, and the count, a statement of its own
-- after the lock, sees what the previous holder committed. Its count and insert repeat
-- send_named_members' loop body on purpose: a send() through send_named_members took
-- 1.27-1.31x the server time of this function, and one through a count-and-insert
-- function both call 1.03-1.04x (a DO loop of 200 calls, 30 blocks interleaved, three
-- runs each, 2026-12-01), for eight lines kept alike by hand.
CREATE OR REPLACE FUNCTION {s}.send_named(
    p_queue text, p_secs float8, p_data bytea, p_capacity integer, p_notify text
)
RETURNS boolean LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock({_NAMED_LOCK}, hashtext(p_queue));
    IF (SELECT count(*) FROM {s}.message WHERE queue = p_queue AND expires_at > now()) >= p_capacity THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.message (queue, expires_at, data)
    VALUES (p_queue, now() + make_interval(secs => p_secs), p_data);
    PERFORM pg_notify(p_notify, '');
    RETURN true;
END
$fn$;
-- A group message's copies for its named members: p_queues[i] gets message
-- p_datas[p_messages[i]] (the first when p_messages is NULL) while it holds fewer
-- than p_capacities[i] live ones; returns the queues that got one, in input order.
-- The same locks as send_named, so group messages and sends from other processes
-- take turns per queue. A statement takes all of its locks before counting and keeps
-- them to its commit: in ascending key order (keys, not names, since two names can
-- share a key), so two group statements never wait for each other in a cycle. Each
-- count is a statement of its own, after the locks, and sees the copies inserted
-- earlier in the loop as well as what other holders committed.
CREATE OR REPLACE FUNCTION {s}.send_named_members(
    p_queues text[], p_capacities integer[], p_messages bigint[], p_datas bytea[],
    p_secs float8, p_offset bigint, p_epoch text
)
RETURNS SETOF text LANGUAGE plpgsql AS $fn$
DECLARE
    key integer;
    i integer;
BEGIN
    FOR key IN SELECT DISTINCT hashtext(q) FROM unnest(p_queues) AS q ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock({_NAMED_LOCK}, key);
    END LOOP;
    FOR i IN 1 .. cardinality(p_queues) LOOP
        IF (
            SELECT count(*) FROM {s}.message WHERE queue = p_queues[i] AND expires_at > now()
        ) < p_capacities[i] THEN
            INSERT INTO {s}.message (queue, expires_at, data, history_offset, history_epoch)
            VALUES (
                p_queues[i], now() + make_interval(secs => p_secs),
                p_datas[coalesce(p_messages[i], 1)], p_offset, p_epoch
            );
            RETURN NEXT p_queues[i];
        END IF;
    END LOOP;
END
$fn$;
"""
        # A named channel: stored (true) only while it holds fewer than $4 live messages.
        self.send_named = f"SELECT {s}.send_named($1, $2, $3, $4, $5)"
        # Process-specific channels: sends to an inbox are stored as rows of several
        # sends each (one per NOTIFY payload: consecutive sends to one inbox whose lines
        # "channel base64" fit 8000 bytes; a send too big for a payload is a row of its
        # own). The caller writes the lines ($2); the row keeps them as its data, marked
        # by targets {NULL,s}, and its NOTIFY carries them after the row's id, so the
        # owner delivers them without a claim round trip and deletes the row later. One
        # row, one set of index entries and one id to delete for a burst of sends, not
        # one of each per send. Their capacity is enforced by the owner's mailboxes.
        # The usual batch is one such row (closed-loop senders of one process, a burst
        # to the sockets of one worker, or one send); $4 is its NOTIFY channel, computed
        # by the caller.
        self.send_inbox = f"""
INSERT INTO {s}.message (queue, targets, expires_at, data)
VALUES ($1, '{{NULL,s}}', now() + make_interval(secs => $3), convert_to($2, 'UTF8'))
RETURNING pg_notify($4, CASE WHEN octet_length($2) <= {_NOTE_LIMIT} THEN 's' || id || E'\\n' || $2 ELSE '' END
)
"""
        # Several rows (several inboxes, or more than a payload), in order. A row too big
        # for a payload (one send) gets an empty one here and above: its owner claims it.
        self.send_inboxes = f"""
WITH stored AS (
    INSERT INTO {s}.message (queue, targets, expires_at, data)
    SELECT r.queue, '{{NULL,s}}', now() + make_interval(secs => $3), convert_to(r.lines, 'UTF8')
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(queue, lines, n)
    ORDER BY r.n
    RETURNING id, queue, data
),
woken AS (
    SELECT pg_notify(
        {_notify_sql("$4", "r.queue")},
        CASE WHEN octet_length(r.data) <= {_NOTE_LIMIT}
            THEN 's' || r.id || E'\\n' || convert_from(r.data, 'UTF8') ELSE '' END
    )
    FROM (SELECT id, queue, data FROM stored ORDER BY id) AS r
)
SELECT count(*) FROM woken
"""
        self.delete_ids = f"DELETE FROM {s}.message WHERE id = ANY($1::bigint[])"
        self.claim = f"""
WITH claimed AS (
    DELETE FROM {s}.message
    WHERE id = ANY(ARRAY(
        SELECT id FROM {s}.message WHERE queue = $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, targets, expires_at, data, history_offset, history_epoch, expires_at > now() AS live
)
SELECT id, targets, expires_at, data, history_offset, history_epoch, live FROM claimed ORDER BY id
"""
        # Claimed rows nobody was left to take go back under their original ids,
        # so they keep their place in the queue.
        self.restore = f"""
WITH restored AS (
    INSERT INTO {s}.message (id, queue, expires_at, data, history_offset, history_epoch)
    SELECT r.id, $1, r.expires_at, r.data, r.history_offset, r.history_epoch
    FROM unnest($2::bigint[], $3::timestamptz[], $4::bytea[], $6::bigint[], $7::text[])
        AS r(id, expires_at, data, history_offset, history_epoch)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM restored, pg_notify($5, '')
"""
        # A named channel ($3 is NULL).
        self.group_add = f"""
INSERT INTO {s}.group_member (group_name, channel, owner, capacity, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
ON CONFLICT (group_name, channel) DO UPDATE
SET owner = EXCLUDED.owner, capacity = EXCLUDED.capacity, expires_at = EXCLUDED.expires_at
"""
        self.group_discard = f"DELETE FROM {s}.group_member WHERE group_name = $1 AND channel = $2"
        # A process-specific channel ($3: its owner's token): the owner row first
        # (the member's insert reads its result, so it runs after it), so that
        # joins and group_leave take their locks in the same order.
        self.group_join = f"""
WITH owner_row AS (
    INSERT INTO {s}.group_owner AS o (group_name, owner, expires_at)
    VALUES ($1, $3, now() + make_interval(secs => $5))
    ON CONFLICT (group_name, owner) DO UPDATE SET expires_at = greatest(o.expires_at, EXCLUDED.expires_at)
    RETURNING group_name
),
member AS (
    INSERT INTO {s}.group_member (group_name, channel, owner, capacity, expires_at)
    SELECT group_name, $2::text, $3::text, $4::integer, now() + make_interval(secs => $5) FROM owner_row
    ON CONFLICT (group_name, channel) DO UPDATE
    SET owner = EXCLUDED.owner, capacity = EXCLUDED.capacity, expires_at = EXCLUDED.expires_at
    RETURNING 1
)"""
        self.group_join_own = self.group_join + "\nSELECT count(*) FROM member"
        self.group_leave = f"SELECT {s}.group_leave($1, $2, $3)"
        # A member of another process: its owner keeps a record of its members
        # (group rows carry only the group's name), so it is told, through its inbox
        # and in order with the group's messages ($3: the owner's token).
        self.group_add_notice = f"""{self.group_join},
{_notice(s, "j", "member", "$6", "$7")}"""
        self.group_discard_notice = f"""
WITH gone AS (
    SELECT {s}.group_leave($1, $2, $3) AS done
),
{_notice(s, "l", "gone", "$4", "$5")}"""
        # Many group messages without history in one statement (in order): for each,
        # one row per other process with members and one per named member with room
        # (send_named_members stores those in message order, counting the earlier
        # ones of the batch). One NOTIFY per inbox row, in id order, which follows
        # the input order.
        self.group_send = f"""
WITH sent AS (
    SELECT * FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS g(group_name, data, n)
),
inboxes AS (
    -- One row per other process with members, naming only the group: that
    -- process delivers to its own record of its members.
    INSERT INTO {s}.message (queue, targets, expires_at, data)
    SELECT '!' || o.owner, ARRAY[NULL, 'g', g.group_name], now() + make_interval(secs => $3), g.data
    FROM sent AS g JOIN {s}.group_owner AS o ON o.group_name = g.group_name
    WHERE o.expires_at > now() AND o.owner <> $4
    ORDER BY g.n, o.owner
    RETURNING id, queue, targets[3] AS group_name, data
),
members AS (
    SELECT g.n, m.channel, m.capacity
    FROM sent AS g JOIN {s}.group_member AS m ON m.group_name = g.group_name
    WHERE m.owner IS NULL AND m.expires_at > now()
),
named AS ({_named_copies(s, "m.n, m.channel", "m.n", "$2", "NULL::bigint", "NULL::text")}),
woken AS (
    SELECT pg_notify(
        {_notify_sql("$5", "note.queue")},
        CASE WHEN octet_length(note.payload) < 8000 THEN note.payload ELSE '' END
    )
    FROM (
        SELECT queue, payload FROM (
            SELECT i.id, i.queue, 'g' || i.id || ' ' || i.group_name || ' - - '
                || translate(encode(i.data, 'base64'), E'\\n', '') AS payload
            FROM inboxes AS i
            UNION ALL
            SELECT NULL, queue, '' FROM named
        ) AS line ORDER BY id
    ) AS note
)
SELECT (SELECT count(*) FROM woken) AS woken,
    (SELECT count(*) FROM members) - (SELECT count(*) FROM named) AS skipped
"""
        # One group message without history (a lone group_send, the usual statement):
        # scalar parameters and the notification's base64 from the caller ($6; NULL when
        # it cannot fit), so no unnest, window, sorts or encoding on the server while the
        # receivers wait for their notification.
        self.group_send_one = _fan_out(s, b64="$6::text")
        self.flush = f"DELETE FROM {s}.message; DELETE FROM {s}.group_owner; DELETE FROM {s}.group_member"
        self.flush_history = f"DELETE FROM {s}.history_entry; DELETE FROM {s}.history_stream"
        # Messages to one history group ($1), one history_send call each, in order: the
        # function locks the group's counter first, so the calls take offsets in turn.
        self.history_send_many = f"""
SELECT h.position_offset, h.position_epoch, h.skipped
FROM unnest($2::bytea[], $6::text[], $7::float8[], $8::bigint[])
    WITH ORDINALITY AS m(data, epoch, ttl, size, n)
CROSS JOIN LATERAL {s}.history_send($1, m.data, $3, $4, $5, m.epoch, m.ttl, m.size) AS h
ORDER BY m.n
"""
        self.history_append = f"SELECT * FROM {s}.history_append($1, $2, $3, $4, $5)"
        self.history_read = f"SELECT * FROM {s}.history_read($1, $2, $3, $4, $5)"
        self.prune_history = f"""
WITH streams AS (DELETE FROM {s}.history_stream WHERE expires_at <= now() RETURNING 1),
entries AS (DELETE FROM {s}.history_entry WHERE expires_at <= now() RETURNING 1)
SELECT (SELECT count(*) FROM streams) AS streams, (SELECT count(*) FROM entries) AS entries
"""
        # Owner rows before member rows: the order group_leave locks them in.
        self.forget_owner = [
            f"DELETE FROM {s}.group_owner WHERE owner = $1",
            f"DELETE FROM {s}.group_member WHERE owner = $1",
        ]
        self.drop_inbox = f"DELETE FROM {s}.message WHERE queue = $1"
        self.prune_messages = f"DELETE FROM {s}.message WHERE expires_at <= now()"
        self.prune_members = [
            f"DELETE FROM {s}.group_owner WHERE expires_at <= now()",
            f"DELETE FROM {s}.group_member WHERE expires_at <= now()",
        ]
        # A catalog query, not to_regclass(): that one answers from the session's
        # cache, which can still say "missing" after another session created the
        # tables and so make this one run DDL against tables already in use. The
        # names may also be functions: a schema made by an earlier version that
        # lacks one is then made up to date like a missing table.
        complete = """(
    SELECT count(*) FROM pg_catalog.pg_class AS c
    WHERE c.relnamespace = n.oid AND c.relname = ANY($2::text[])
) + (
    SELECT count(DISTINCT p.proname) FROM pg_catalog.pg_proc AS p
    WHERE p.pronamespace = n.oid AND p.proname = ANY($2::text[])
) = cardinality($2::text[])"""
        self.tables_exist = f"SELECT {complete}\nFROM pg_catalog.pg_namespace AS n WHERE n.nspname = $1"
        # What a starting layer needs to know (no row: no schema): whether the names
        # exist, whether every function of ours in the schema ($3) is as recent as
        # this version's ($4: a function without a mark, made before marks, is older),
        # and whether the schema has history (whose functions a layer without the
        # option then brings up to date too).
        self.schema_state = f"""
SELECT {complete} AS complete,
    NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_proc AS p
        WHERE p.pronamespace = n.oid AND p.proname = ANY($3::text[]) AND coalesce(substring(
            pg_catalog.obj_description(p.oid, 'pg_proc') FROM '^fastapi_websockets functions ([0-9]{{1,9}})$'
        )::integer, 0) < $4
    ) AS current,
    EXISTS (
        SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.relnamespace = n.oid AND c.relname = 'history_stream'
    ) AS history
FROM pg_catalog.pg_namespace AS n WHERE n.nspname = $1
"""
        self.tables = ["message", "group_member", "group_owner", "send_named", "send_named_members"]
        self.functions = ["group_leave", "send_named", "send_named_members"]
        self.functions += ["history_append", "history_send", "history_read"]
        # Every function of ours, as a signature COMMENT ON FUNCTION takes.
        self.signatures = """
SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc AS p
JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND p.proname = ANY($2::text[])
"""
        self.history_tables = ["history_stream", "history_entry"]
        self.create_history = _history_ddl(s)
        # The mark of this version on the functions it made (see _create_schema).
        self.mark = f"fastapi_websockets functions {FUNCTIONS_VERSION}"
        #: A digest of the functions' definitions (not the comments between them), which
        #: a test pins to FUNCTIONS_VERSION.
        functions = _FUNCTION_RE.findall(self.create + self.create_history)
        self.digest = hashlib.sha256("".join(functions).encode()).hexdigest()
        self.presence_tables = ["presence_owner", "presence"]
        # UNLOGGED: no WAL for joins and beats. A crash of the server empties these
        # tables, and every live process's next heartbeat puts its entries back.
        self.create_presence = f"""
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.presence_owner (
    owner text PRIMARY KEY,
    deadline timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS presence_owner_deadline ON {s}.presence_owner (deadline);
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.presence (
    group_name text NOT NULL,
    channel text NOT NULL,
    owner text NOT NULL,
    info bytea NOT NULL,
    PRIMARY KEY (group_name, channel)
);
CREATE INDEX IF NOT EXISTS presence_owner_entries ON {s}.presence (owner);
"""
        self.presence_remove = (
            f"DELETE FROM {s}.presence WHERE group_name = $1 AND channel = $2 RETURNING info"
        )
        # A batch of this process's changes, at most one per entry (see _PresenceWriter);
        # a NULL info removes the entry. When the batch stores anything ($6), the owner's
        # record is written in the same statement, so an entry never exists without one.
        # The record's deadline moves only when the heartbeat is late (a burst of joins
        # does not rewrite it each time); `inserted` says it was missing (see
        # _write_presence). The entries come after the record (`change` waits for it): a
        # reaper holding the record must not wait for entry rows we locked while we wait
        # for the record.
        self.presence_write = f"""
WITH alive AS (
    INSERT INTO {s}.presence_owner AS o (owner, deadline)
    SELECT $4, now() + make_interval(secs => $5) WHERE $6
    ON CONFLICT (owner) DO UPDATE SET deadline = EXCLUDED.deadline
    WHERE o.deadline < now() + make_interval(secs => $5 / 2)
    RETURNING o.xmax = 0 AS inserted
),
change AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) AS c (group_name, channel, info)
    WHERE (SELECT count(*) FROM alive) >= 0
),
entry AS (
    INSERT INTO {s}.presence (group_name, channel, owner, info)
    SELECT group_name, channel, $4, info FROM change WHERE info IS NOT NULL
    ON CONFLICT (group_name, channel) DO UPDATE SET owner = EXCLUDED.owner, info = EXCLUDED.info
    RETURNING 1
),
gone AS (
    DELETE FROM {s}.presence AS p USING change AS c
    WHERE c.info IS NULL AND p.group_name = c.group_name AND p.channel = c.channel
    RETURNING 1
)
SELECT coalesce((SELECT inserted FROM alive), false) AS inserted,
    (SELECT count(*) FROM entry) AS stored, (SELECT count(*) FROM gone) AS removed
"""
        self.presence_read = f"""
SELECT array_agg(p.channel) AS channels, array_agg(p.info) AS infos
FROM {s}.presence AS p JOIN {s}.presence_owner AS o ON o.owner = p.owner
WHERE p.group_name = $1 AND o.deadline > now()
"""
        # A row inserted by this statement has xmax 0; one it updated carries our
        # lock. Asking the upsert itself (not a prior SELECT) is right even when a
        # reaper deletes the record concurrently: we wait for it and then insert.
        self.presence_beat = f"""
INSERT INTO {s}.presence_owner AS o (owner, deadline) VALUES ($1, now() + make_interval(secs => $2))
ON CONFLICT (owner) DO UPDATE SET deadline = EXCLUDED.deadline
RETURNING o.xmax = 0 AS inserted
"""
        # Claim the expired records (SKIP LOCKED: a record another process is
        # reaping, or its live owner is refreshing, is left alone), then take their
        # entries: each dead process is reaped by exactly one caller.
        self.presence_reap = f"""
WITH dead AS (
    DELETE FROM {s}.presence_owner
    WHERE owner = ANY(ARRAY(
        SELECT owner FROM {s}.presence_owner WHERE deadline <= now() FOR UPDATE SKIP LOCKED
    ))
    RETURNING owner
)
DELETE FROM {s}.presence AS p USING dead WHERE p.owner = dead.owner
RETURNING p.group_name, p.channel, p.info
"""
        # Record first, then entries (the order every statement here locks them in).
        self.presence_forget = [
            f"DELETE FROM {s}.presence_owner WHERE owner = $1",
            f"DELETE FROM {s}.presence WHERE owner = $1",
        ]
        self.flush_presence = f"DELETE FROM {s}.presence; DELETE FROM {s}.presence_owner"


def _notice(s: str, kind: str, after: str, expiry: str, schema: str) -> str:
    """The end of a statement that tells owner ``$3`` that its channel ``$2`` joined or left group ``$1``.

    ``kind`` is ``j`` or ``l``; the notice is stored in the owner's inbox (once
    the CTE ``after`` has run) and rides in its notification.
    """
    return f"""notice AS (
    INSERT INTO {s}.message (queue, targets, expires_at, data)
    SELECT '!' || $3, ARRAY[NULL, '{kind}', $1, $2], now() + make_interval(secs => {expiry}), ''::bytea
    FROM {after}
    RETURNING id, queue
)
SELECT pg_notify({_notify_sql(schema, "notice.queue")}, '{kind}' || notice.id || ' ' || $1 || ' ' || $2)
FROM notice
"""


def _named_copies(s: str, order: str, messages: str, datas: str, offset: str, epoch: str) -> str:
    """The query storing a group statement's copies for the named members of CTE ``members``.

    ``members`` (``m``) has ``channel`` and ``capacity`` columns, stored in
    ``order``; ``messages`` and ``datas`` are SQL expressions for
    ``send_named_members``'s message numbers (a column of ``m``, or NULL) and
    messages, ``offset`` and ``epoch`` for the copies' history position. With no
    named members (groups of process channels only, the usual case) the function
    is not called, so such statements take no lock.
    """
    return f"""
    SELECT copy.queue FROM (
        SELECT array_agg(m.channel ORDER BY {order}) AS queues,
            array_agg(m.capacity ORDER BY {order}) AS capacities,
            array_agg({messages} ORDER BY {order}) AS messages
        FROM members AS m
    ) AS agg
    CROSS JOIN LATERAL {s}.send_named_members(
        agg.queues, agg.capacities, agg.messages, {datas}, $3, {offset}, {epoch}
    ) AS copy(queue)
    WHERE agg.queues IS NOT NULL
"""


def _fan_out(
    s: str,
    offset: str = "NULL::bigint",
    epoch: str = "NULL::text",
    b64: str = "translate(encode($2, 'base64'), E'\\n', '')",
) -> str:
    """The ``group_send`` statement (parameters $1 to $5), stamping rows with a history position.

    One statement: read the processes with members (other than ours) and the
    named members, store one row per such process and one per named member with
    room, and notify each queue once; our own members are delivered from our
    record. ``offset`` and ``epoch`` are SQL expressions for the message's
    position (NULL outside history groups), also returned first; the reader adds
    it to the decoded message, so the encoded bytes are the same for the store
    and every copy. ``local_members`` stays NULL (the history function's row
    type keeps it). ``b64`` is the SQL expression of the message's base64 for the
    notifications (a parameter where the caller encodes it).
    """
    return f"""
WITH inboxes AS (
    -- One row per other process with members, naming only the group: that
    -- process delivers to its own record of its members.
    INSERT INTO {s}.message (queue, targets, expires_at, data, history_offset, history_epoch)
    SELECT '!' || o.owner, ARRAY[NULL, 'g', $1], now() + make_interval(secs => $3), $2, {offset}, {epoch}
    FROM {s}.group_owner AS o
    WHERE o.group_name = $1 AND o.expires_at > now() AND o.owner <> $4
    RETURNING id, queue, history_offset, history_epoch
),
members AS (
    SELECT channel, capacity FROM {s}.group_member
    WHERE group_name = $1 AND owner IS NULL AND expires_at > now()
),
named AS ({_named_copies(s, "m.channel", "NULL::bigint", "ARRAY[$2]", offset, epoch)}),
encoded AS (
    SELECT {b64} AS b64
),
woken AS (
    SELECT pg_notify(
        {_notify_sql("$5", "note.queue")},
        CASE WHEN octet_length(note.payload) < 8000 THEN note.payload ELSE '' END
    )
    FROM (
        SELECT i.queue, 'g' || i.id || ' ' || $1 || ' '
            || coalesce(i.history_offset::text, '-') || ' ' || coalesce(i.history_epoch, '-') || ' '
            || e.b64 AS payload
        FROM inboxes AS i, encoded AS e
        UNION ALL
        SELECT queue, '' FROM named
    ) AS note
)
SELECT
    {offset} AS position_offset,
    {epoch} AS position_epoch,
    NULL::text[] AS local_members,
    (SELECT count(*) FROM woken) AS woken,
    (SELECT count(*) FROM members) - (SELECT count(*) FROM named) AS skipped
"""


def _history_ddl(s: str) -> str:
    """Tables and functions of group history, created only by layers that have the ``history`` option.

    ``history_stream`` holds one row per group: its counter (``newest``), its
    epoch and, in ``id``, which life of the history its entries belong to
    (a stream that expired whole or was deleted comes back with a new id and
    epoch, so old entries never mix in). Every append updates that row first,
    so concurrent senders take turns on its lock and offsets are contiguous.

    Why functions rather than one CTE: a statement reads with the snapshot of
    its start, taken before it waited for the counter row. ``history_send``
    reads the members in a statement of its own after it holds the lock, and
    ``history_read`` waits on that lock before reading, so a member added
    while a message is in flight either gets it live or finds it in the page.
    """
    append = f"""
    INSERT INTO {s}.history_stream AS h (group_name, epoch, newest, expires_at)
    VALUES (p_group, p_epoch, 1, now() + make_interval(secs => p_ttl))
    ON CONFLICT (group_name) DO UPDATE SET
        id = CASE WHEN h.expires_at > now() THEN h.id ELSE EXCLUDED.id END,
        epoch = CASE WHEN h.expires_at > now() THEN h.epoch ELSE EXCLUDED.epoch END,
        newest = CASE WHEN h.expires_at > now() THEN h.newest + 1 ELSE 1 END,
        expires_at = EXCLUDED.expires_at
    RETURNING h.id, h.epoch, h.newest INTO stream;
    INSERT INTO {s}.history_entry (stream, "offset", expires_at, data)
    VALUES (stream.id, stream.newest, now() + make_interval(secs => p_ttl), p_data);
    DELETE FROM {s}.history_entry AS e WHERE e.stream = stream.id AND e."offset" <= stream.newest - p_size;
"""
    return f"""
CREATE TABLE IF NOT EXISTS {s}.history_stream (
    group_name text PRIMARY KEY,
    id bigserial NOT NULL,
    epoch text NOT NULL,
    newest bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS history_stream_expires_at ON {s}.history_stream (expires_at);
CREATE TABLE IF NOT EXISTS {s}.history_entry (
    stream bigint NOT NULL,
    "offset" bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (stream, "offset")
);
CREATE INDEX IF NOT EXISTS history_entry_expires_at ON {s}.history_entry (expires_at);

CREATE OR REPLACE FUNCTION {s}.history_append(
    p_group text, p_data bytea, p_epoch text, p_ttl float8, p_size bigint
) RETURNS TABLE (position_offset bigint, position_epoch text)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    stream record;
BEGIN
{append}
    RETURN QUERY SELECT stream.newest, stream.epoch;
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.history_send(
    p_group text, p_data bytea, p_expiry float8, p_token text, p_schema text,
    p_epoch text, p_ttl float8, p_size bigint
) RETURNS TABLE (
    position_offset bigint, position_epoch text, local_members text[], woken bigint, skipped bigint
)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    stream record;
BEGIN
{append}
    -- A new statement, so a new snapshot: it sees every member added before the lock was ours.
    RETURN QUERY {_fan_out(s, "stream.newest", "stream.epoch")};
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.history_read(
    p_group text, p_after bigint, p_limit bigint, p_epoch text, p_ttl float8
) RETURNS TABLE (epoch text, newest bigint, available bigint, offsets bigint[], entries bytea[])
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    stream record;
BEGIN
    LOOP
        -- FOR SHARE waits for a send in flight, and returns the counter it committed.
        SELECT h.id, h.epoch, h.newest INTO stream FROM {s}.history_stream AS h
        WHERE h.group_name = p_group AND h.expires_at > now() FOR SHARE;
        EXIT WHEN FOUND;
        -- No live stream: start one, so the next send uses this epoch.
        INSERT INTO {s}.history_stream AS h (group_name, epoch, newest, expires_at)
        VALUES (p_group, p_epoch, 0, now() + make_interval(secs => p_ttl))
        ON CONFLICT (group_name) DO UPDATE SET
            id = EXCLUDED.id, epoch = EXCLUDED.epoch, newest = 0, expires_at = EXCLUDED.expires_at
        WHERE h.expires_at <= now()
        RETURNING h.id, h.epoch, h.newest INTO stream;
        EXIT WHEN FOUND;
        -- Another session started it meanwhile: read that one.
    END LOOP;
    RETURN QUERY
    WITH live AS (
        SELECT e."offset", e.data FROM {s}.history_entry AS e
        WHERE e.stream = stream.id AND e."offset" > p_after AND e.expires_at > now()
    ),
    page AS (SELECT * FROM live ORDER BY "offset" DESC LIMIT p_limit)
    SELECT
        stream.epoch,
        stream.newest,
        (SELECT count(*) FROM live),
        (SELECT array_agg(page."offset" ORDER BY page."offset") FROM page),
        (SELECT array_agg(page.data ORDER BY page."offset") FROM page);
END
$fn$;
"""


@dataclass(slots=True)
class _Outgoing:
    """A write waiting in the outbox: a send, or a group message with or without history."""

    #: The inbox of the send's channel; None for a group message.
    queue: str | None
    #: The send's channel, or the group.
    target: str
    data: bytes
    #: Settled once written: None, or the message's position in a history group.
    done: asyncio.Future[StreamPosition | None]
    #: The group's history policy (a group message with history only).
    policy: HistoryPolicy | None = None

    def joins(self, other: _Outgoing) -> bool:
        """Whether ``other`` can go out in the same statement as this write.

        Group messages with history go out with those of the same group only, so
        that a statement locks one history counter (two statements that locked
        several, in different orders, could deadlock).
        """
        if self.policy is not None or other.policy is not None:
            return self.policy is not None and other.policy is not None and other.target == self.target
        return (self.queue is None) == (other.queue is None)


@dataclass(slots=True)
class _Change:
    """A presence change waiting to be written: an entry's new info, or None to remove it."""

    group: str
    channel: str
    info: bytes | None
    #: Settled when the change is written; None for a take-back nobody waits for.
    done: asyncio.Future[None] | None


class _PresenceWriter:
    """One layer's presence changes, written to the database in the order they were queued.

    The pool gives no order between statements (a join and the leave after it, sent on
    two connections, can land either way round), so the layer's presence lock used to be
    held across each change's round trip, and under churn joins and leaves waited for
    each other's. Here one task writes everything queued meanwhile in one statement, one
    statement after another; within one, an entry's last change is what applying them in
    turn would leave. A join whose caller gave up before it went out is not written.
    """

    def __init__(
        self,
        write: Callable[[list[_Change]], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    ) -> None:
        self._write = write
        self._spawn = spawn
        self._queue: deque[_Change] = deque()
        self._task: asyncio.Task[None] | None = None

    def queue(self, group: str, channel: str, info: bytes | None) -> asyncio.Future[None]:
        """Queue a change behind every change queued before it; await the result to see it written."""
        done: asyncio.Future[None] = running_loop().create_future()
        self._append(_Change(group, channel, info, done))
        return done

    def take_back(self, group: str, channel: str) -> None:
        """Queue the removal of an entry behind every change queued before it; nobody waits for it."""
        self._append(_Change(group, channel, None, None))

    def queued(self) -> set[tuple[str, str]]:
        """The entries with a change still waiting to be written."""
        return {(change.group, change.channel) for change in self._queue}

    def fail(self, exc: BaseException) -> None:
        """Fail every waiting change (the layer is closing)."""
        _settled(list(self._queue), exc)
        self._queue.clear()

    def _append(self, change: _Change) -> None:
        self._queue.append(change)
        if self._task is None:
            self._task = self._spawn(self._run(), "presence-writer")

    def _take(self) -> tuple[list[_Change], list[_Change]]:
        """The next changes to settle, and the one per entry to write."""
        taken: list[_Change] = []
        last: dict[tuple[str, str], _Change] = {}
        while self._queue and len(taken) < _PRESENCE_BATCH:
            change = self._queue.popleft()
            if change.info is not None and change.done is not None and change.done.done():
                continue  # a join its caller gave up before it went out: never written
            taken.append(change)
            last[change.group, change.channel] = change
        return taken, list(last.values())

    async def _run(self) -> None:
        try:
            while self._queue:
                taken, batch = self._take()
                if not batch:
                    continue
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    _settled(taken, ChannelLayerClosed("the channel layer was closed"))
                    raise
                except Exception as exc:
                    # The layer takes back the joins that failed and retries the removals.
                    _settled(taken, exc)
                else:
                    _settled(taken, None)
        finally:
            self._task = None


def _settled(changes: list[_Change], exc: BaseException | None) -> None:
    """Settle the callers' changes; log a take-back that failed (the entry waits for the reapers)."""
    for change in changes:
        if change.done is None and exc is not None:
            logger.warning("could not take back presence of %r in %r: %s", change.channel, change.group, exc)
        settle(change.done, exc)


class _StatementWatch(LazyDeadline):
    """The ordered writer's deadline: one timer for its statements instead of asyncpg's timer each.

    On a connection with ``command_timeout`` asyncpg arms a timer per statement. The
    writer's statements never overlap, so while the writer holds its connection
    that connection goes without ``command_timeout`` (see :func:`_statement_timer`)
    and this watch bounds its statements: it ends the connection of one still
    running ``timeout`` seconds after it began (asyncpg then fails that statement as
    a lost connection). No coroutine of its own, no task cancellation.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        #: The connection of the statement in flight (None: none is).
        self._conn: _Conn | None = None
        #: Whether the watch ended the last statement's connection.
        self.expired = False

    def start(self, conn: _Conn) -> None:
        """A statement of the writer goes out on ``conn``."""
        self._conn = conn
        self.expired = False
        self.begin(running_loop())

    def end(self) -> None:
        """The statement in flight is done."""
        self._conn = None
        super().end()

    def expire(self) -> None:
        conn = self._conn
        self.end()
        if conn is not None:
            self.expired = True
            # (A proxy that close() released in this same instant refuses the call: nothing to end.)
            with contextlib.suppress(Exception):
                conn.terminate()


def _statement_timer(conn: _Conn, timeout: float | None) -> None:
    """Set ``conn``'s ``command_timeout`` (None: asyncpg arms no timer per statement).

    asyncpg reads it from the connection's configuration (``_config``, not public)
    at every statement; where that is not a named tuple with the field (another
    asyncpg version) the connection keeps its own and its timer.
    """
    raw = getattr(conn, "_con", None)
    config: Any = getattr(raw, "_config", None)
    if "command_timeout" in getattr(config, "_fields", ()) and config.command_timeout != timeout:
        raw._config = config._replace(command_timeout=timeout)  # type: ignore[union-attr]


class PostgreSQLChannelLayer(BrokerChannelLayer):
    """A channel layer stored in PostgreSQL tables, woken by LISTEN/NOTIFY (asyncpg).

    Options (besides those of :class:`BrokerChannelLayer`, ``timeout`` included):

    * ``dsn``: a ``postgresql://`` URL.
    * ``schema``: the schema holding the tables (a letter or ``_``, then letters,
      digits, ``_``; at most 63 bytes; not ``pg_*``; always quoted). Layers that
      share a schema share channels and groups.
    * ``poll_interval``: seconds between table re-checks while the LISTEN
      connection is reconnecting (nothing polls while it is connected).
    * ``prune_interval``: seconds between deletions of expired messages and group
      members; one process at a time does it, under an advisory lock.
    * ``ensure_schema``: create the schema and tables if missing (safe when
      several processes start at once), at start and again if they are dropped
      while the layer runs.
    * ``pool_size``: most pooled connections for writes and claims (plus one
      LISTEN connection).
    * ``synchronous_commit``: make every write wait for its WAL flush, so that
      messages also survive a crash of the server (slower on real disks).
    """

    backend_name = "postgresql"
    broker_label = "PostgreSQL"
    default_port = 5432

    def __init__(
        self,
        *,
        dsn: str = "postgresql://postgres:postgres@localhost:5432/postgres",
        schema: str = "fastapi_websockets",
        channel_expiry: float = 60,
        group_expiry: float = 86400,
        poll_interval: float = 0.1,
        prune_interval: float = 60.0,
        ensure_schema: bool = True,
        pool_size: int = 2,
        synchronous_commit: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(channel_expiry=channel_expiry, group_expiry=group_expiry, **options)
        parts = url("dsn", dsn, ("postgresql", "postgres"))
        self.dsn = dsn
        self.set_location(dsn)
        # None: asyncpg applies the DSN's own sslmode (and sslrootcert).
        self._ssl: ssl.SSLContext | None = None
        if self.tls_ca_file is not None:
            sslmode = dict(parse_qsl(parts.query)).get("sslmode", "")
            verified = sslmode in ("verify-full", "verify-ca")
            require_secure("dsn", dsn, verified, "sslmode=verify-full (or verify-ca) in the dsn")
            self._ssl = client_context(self.tls_ca_file, check_hostname=sslmode == "verify-full")
        self.schema = matching("schema", schema, _SCHEMA_RE, _SCHEMA_RULE)
        self.poll_interval = positive("poll_interval", poll_interval, "seconds")
        self.prune_interval = positive("prune_interval", prune_interval, "seconds")
        self.ensure_schema = flag("ensure_schema", ensure_schema)
        self.pool_size = positive_int("pool_size", pool_size, "connections")
        self.synchronous_commit = flag("synchronous_commit", synchronous_commit)
        self._sql = _Sql(schema)
        self._inbox = _inbox_queue(self.client_token)
        self._inbox_notify = notify_channel(schema, self._inbox)
        self._inbox_wake = asyncio.Event()
        #: The inbox is LISTENed (or will be once the listener is back): set by the first
        #: new_channel(), since only this instance's channels receive through it.
        self._inbox_listened = False
        #: Notifications of the inbox not handled yet: a payload, or None for "claim".
        self._inbox_notes: deque[str | None] = deque()
        #: The inbox reader waits for a notification with nothing queued and nothing to
        #: claim: the next notification's rows can be delivered by _on_notify itself.
        self._inbox_idle = False
        self._inbox_where = f"the inbox of {self.application_name}"
        #: Ids of rows delivered from their notification and not deleted yet.
        self._acking: set[int] = set()
        self._acks: list[int] = []
        self._ack_task: asyncio.Task[None] | None = None
        #: Ids of claimed rows whose notification may still arrive, with when.
        self._claimed: dict[int, float] = {}
        self._named: dict[str, WaiterQueue[Message]] = {}
        self._named_by_notify: dict[str, str] = {}
        self._notify_name: Memo[str, str] = Memo(lambda queue: notify_channel(self.schema, queue))
        #: The inbox queue of a process-specific channel (every send to one asks).
        self._inbox_of: Memo[str, str] = Memo(lambda channel: _inbox_queue(process_token(channel)))
        self._pool: asyncpg.Pool | None = None
        #: Pooled connects under way, and those whose caller was cancelled going on to close
        #: what they open: close() waits for both (see _settle_connects).
        self._connects: set[asyncio.Future[asyncpg.Connection]] = set()
        self._settling: set[asyncio.Task[None]] = set()
        self._listener: asyncpg.Connection | None = None
        self._listen_lock = asyncio.Lock()
        self._listened: set[str] = set()
        self._listening = asyncio.Event()
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_task: asyncio.Task[None] | None = None
        self._named_sends = KeyedLocks()  # one send in flight per named channel (see _send_named)
        #: A caller is writing its own message (the writer was idle); see _write.
        self._writing = False
        #: Set while the writer task waits for the next burst (see _next_burst): resolved by
        #: the next write, or when the writer's connection goes back to the pool.
        self._writer_parked: asyncio.Future[None] | None = None
        #: The pooled connection the writer keeps between statements (see _writer_statement),
        #: and the timer that hands it back to the pool.
        self._writer_conn: _Conn | None = None
        self._writer_linger: asyncio.TimerHandle | None = None
        #: When the writer's last statement ended (loop time): its linger counts from there.
        self._writer_used = 0.0
        self._statement_watch = _StatementWatch(self.timeout)
        # Filled in by _start once asyncpg is imported.
        self._broken: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
        self._misuse: tuple[type[BaseException], ...] = ()
        self._aborted: tuple[type[BaseException], ...] = ()
        self._reader_errors: tuple[type[BaseException], ...] = (BackendUnavailable, StatementRefused)
        self._server_errors: tuple[type[BaseException], ...] = ()
        self._no_table: tuple[type[BaseException], ...] = ()
        self._no_rights: tuple[type[BaseException], ...] = ()
        self._tables_gone: tuple[type[BaseException], ...] = ()
        #: A login the server refused: role, password, pg_hba.conf, database (see _login_failed).
        self._login_errors: tuple[type[BaseException], ...] = ()
        #: Held while tables found gone are created again (see _restore_tables).
        self._restoring = asyncio.Lock()
        #: The presence tables exist (made or checked by this layer's first join).
        self._presence_ready = False
        self._presence_setup = asyncio.Lock()
        #: Our liveness record was found missing by a join: the next beat restores our entries.
        self._presence_lost = False
        self._presence_writer = _PresenceWriter(self._write_presence, self.tasks.spawn)

    # ------------------------------------------------------------ connection

    @property
    def application_name(self) -> str:
        """The ``application_name`` this layer's connections show in ``pg_stat_activity``."""
        return f"fastapi_websockets:{self.client_token}"

    async def _start(self) -> None:
        try:
            import asyncpg
        except ImportError as exc:
            raise missing_driver("postgresql", exc) from exc
        # Whatever their class, these mean "this connection is unusable": asyncpg
        # reports a session cut in the middle of a statement as an InterfaceError
        # or, depending on where the protocol was, an InternalClientError ("cannot
        # switch to state 12; another operation is in progress"), and such a
        # connection refuses every later statement.
        self._broken = (
            OSError,
            asyncio.TimeoutError,
            asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError,
            asyncpg.AdminShutdownError,
            asyncpg.CrashShutdownError,
            asyncpg.InsufficientResourcesError,  # too many connections, out of memory/disk
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        )
        # The server ended the session and so rolled back whatever it was running:
        # a statement that failed with one of these did not commit (unless the end
        # came in the instant between its commit and its reply), so it is sent
        # again. This is what a connection left over from before a restart reports.
        self._aborted = (
            asyncpg.AdminShutdownError,
            asyncpg.CrashShutdownError,
            asyncpg.CannotConnectNowError,
        )
        # Interface errors that are our mistake, not the connection's.
        self._misuse = (asyncpg.exceptions.ClientConfigurationError, asyncpg.exceptions.DataError)
        # What a background reader survives (logged, then retried once reconnected).
        self._reader_errors = (BackendUnavailable, StatementRefused, asyncpg.PostgresError)
        # The server's answer to a statement (the session goes on): see _refused.
        self._server_errors = (asyncpg.PostgresError,)
        # A role that may not replace functions another role made (see _create_tables).
        self._no_rights = (asyncpg.InsufficientPrivilegeError,)
        # Presence reads before any layer of the schema made the presence tables.
        self._no_table = (asyncpg.UndefinedTableError,)
        # What a statement meets once the layer's schema or tables were dropped under it.
        self._tables_gone = (
            asyncpg.UndefinedTableError,
            asyncpg.InvalidSchemaNameError,
            asyncpg.UndefinedFunctionError,
        )
        # 28000 (no such role, no pg_hba.conf entry), 28P01 (password), 3D000 (no such database).
        self._login_errors = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)
        try:
            self._pool = await self._retry(
                "connect",
                lambda: asyncpg.create_pool(
                    self.dsn,
                    connect=self._open_pooled,
                    min_size=1,
                    max_size=self.pool_size,
                    max_inactive_connection_lifetime=60.0,
                    timeout=self.timeout,
                    ssl=self._ssl,
                    command_timeout=self.timeout,
                    reset=_keep_session,
                    server_settings={
                        "application_name": self.application_name,
                        # Channel messages live for seconds: by default a commit does not
                        # wait for its WAL flush (only a server crash can lose the last
                        # few hundred ms of them; a clean restart loses nothing).
                        "synchronous_commit": "on" if self.synchronous_commit else "off",
                    },
                ),
            )
            if self.ensure_schema:
                await self._create_schema()
            else:
                await self._check_schema()
            await self._retry("LISTEN", self._connect_listener)
        except self._login_errors as exc:
            await self._release_connections()
            raise self._login_failed(exc) from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._release_connections()
            raise ChannelLayerError(
                f"cannot start the PostgreSQL layer on {self.where}: "
                f"{type(exc).__name__}: {self.redact(str(exc))}"
            ) from exc
        except BaseException:
            await self._release_connections()
            raise
        # Now, not when the listener task first runs: a login refused from here on is the
        # server's change under a running layer (see login_refused), also for the readers.
        self.report_connection(True)
        self.tasks.keep_running(self._run_listener, "listener")
        self.tasks.keep_running(self._drain_inbox, "inbox")
        self.tasks.keep_running(self._prune_forever, "prune")

    async def _create_schema(self) -> bool:
        """Create the schema's tables and functions when missing, or bring its functions up to date.

        Functions made by an earlier version (a lower :data:`FUNCTIONS_VERSION` in
        their mark, or none) are all replaced, history ones too where the schema has
        history, so the first layer with ``ensure_schema`` to start after an upgrade
        puts this version's SQL in place for every process, whatever its options. A
        layer whose role may not replace them (another role owns them) logs a warning
        and starts with them.
        """
        sql = self._sql

        def ddl(history: bool) -> list[str]:
            return [sql.create] + ([sql.create_history] if self.history or history else [])

        return await self._create_tables(self._tables(), ddl, sql.functions)

    async def _create_tables(
        self, names: list[str], ddl: Callable[[bool], list[str]], functions: Sequence[str] = ()
    ) -> bool:
        """Run ``ddl`` unless the tables ``names`` exist and ``functions`` are of this version or later.

        ``ddl`` gives the statements, told whether the schema has history; the
        schema's functions named in ``functions`` are then marked with this version.
        Returns whether it ran them.
        """
        # DDL runs only when something is missing or outdated, so a role without
        # CREATE rights can use tables an administrator made. Concurrent CREATE ...
        # IF NOT EXISTS (and CREATE OR REPLACE FUNCTION, "tuple concurrently
        # updated") can still collide in the catalogs: the advisory lock makes
        # processes starting together take turns, and each checks again under it.
        sql, schema = self._sql, self.schema

        async def create(conn: _Conn) -> bool:
            complete, current, _ = await self._schema_state(conn, names, functions)
            if complete and current:
                return False
            try:
                async with conn.transaction():
                    # Whatever the layer's synchronous_commit: losing a few messages to a crash
                    # is the documented trade, losing the tables would fail every layer after it.
                    await conn.execute("SET LOCAL synchronous_commit TO on")
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(schema, "schema"))
                    complete, current, history = await self._schema_state(conn, names, functions)
                    if complete and current:
                        return False
                    if await conn.fetchval("SELECT to_regnamespace($1) IS NULL", _quote_ident(schema)):
                        await conn.execute(sql.create_schema)
                    for statements in ddl(history):
                        await conn.execute(statements)
                    for (signature,) in await conn.fetch(sql.signatures, schema, list(functions)):
                        await conn.execute(f"COMMENT ON FUNCTION {signature} IS '{sql.mark}'")
            except self._no_rights as exc:
                if not complete:
                    raise
                self._warn_outdated(f"this layer's role may not replace them ({self.redact(str(exc))})")
                return False
            return True

        return await self._with_conn(create, retry=True)

    async def _schema_state(
        self, conn: _Conn, names: list[str], functions: Sequence[str]
    ) -> tuple[bool, bool, bool]:
        """Whether ``names`` exist, ``functions`` are of this version or later, and the schema has history."""
        sql = self._sql
        row = await conn.fetchrow(sql.schema_state, self.schema, names, list(functions), FUNCTIONS_VERSION)
        return (False, True, False) if row is None else (row["complete"], row["current"], row["history"])

    def _warn_outdated(self, why: str) -> None:
        logger.warning(
            "the functions of schema %r at %s were made by an earlier version of fastapi_websockets and "
            "%s; start a layer of this version with ensure_schema=True (the default) as their owner "
            "to bring them up to date",
            self.schema,
            self.where,
            why,
        )

    async def _restore_tables(self, exc: BaseException) -> None:
        """Create again the tables a statement found gone, or raise what to do about it.

        Someone dropped the layer's schema or tables while it ran (a crash right after
        their creation can no longer lose them: it commits synchronously). With
        ``ensure_schema`` they are created again, as a restarted layer would, and the
        failed statement, which changed nothing, is run once more; what the old tables
        held (memberships, stored messages) is gone. Without it, the caller gets a
        :class:`ChannelLayerError` that says so.
        """
        if self.closed:
            raise exc  # closing: nothing left to use them
        if not self.ensure_schema:
            raise ChannelLayerError(
                f"the tables of schema {self.schema!r} are gone from the database at {self.where} "
                f"({type(exc).__name__}: {self.redact(str(exc))}); create them again, or let a layer "
                "with ensure_schema=True (the default) do it"
            ) from exc
        async with self._restoring:  # statements failing together create them once
            created = await self._create_schema()
            if self._presence_ready:
                names = self._sql.presence_tables
                created = await self._create_tables(names, lambda _: [self._sql.create_presence]) or created
        if created:
            logger.warning(
                "the tables of schema %r were gone from %s (%s); created them again: the group "
                "memberships and messages they held are lost",
                self.schema,
                self.where,
                self.redact(f"{type(exc).__name__}: {exc}"),
            )

    def _tables(self) -> list[str]:
        # History tables exist only where a layer with the history option created them.
        return self._sql.tables + (self._sql.history_tables if self.history else [])

    async def _check_schema(self) -> None:
        names, functions = self._tables(), self._sql.functions
        complete, current, _ = await self._with_conn(
            lambda conn: self._schema_state(conn, names, functions), retry=True
        )
        if complete and not current:
            self._warn_outdated("this layer has ensure_schema=False")
        if not complete:
            raise ChannelLayerError(
                f"the tables of schema {self.schema!r} do not exist in the database at {self.where}; "
                "start one layer with ensure_schema=True (the default) to create them"
            )

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` until it succeeds or ``timeout`` passes."""
        deadline = time.monotonic() + self.timeout
        backoff = self.backoff()
        while True:
            try:
                return await attempt()
            except self._misuse:
                raise
            except self._broken as exc:
                if tls_failure(exc) is not None:
                    # A certificate that does not verify will not verify on the next try.
                    raise self.unavailable(exc) from exc
                delay = backoff.next()
                if time.monotonic() + delay >= deadline:
                    raise self.unavailable(
                        f"{what} failed for {self.timeout} s: {type(exc).__name__}: {exc}"
                    ) from exc
                await asyncio.sleep(delay)

    async def _with_conn(
        self,
        operation: Callable[[_Conn], Awaitable[T]],
        *,
        retry: bool = False,
        patient: bool = True,
        no_table_ok: bool = False,
    ) -> T:
        """Run ``operation`` on a pooled connection; map connection errors to BackendUnavailable.

        Failing to get a connection is retried until ``timeout`` (not at all
        unless ``patient``); a statement that failed after it was sent is
        retried only if ``retry`` (it is idempotent), because it may have committed.
        A server error is raised as :class:`StatementRefused`, except a table still
        missing after the tables were made again when ``no_table_ok`` (presence
        reads before any layer of the schema made the presence tables: the caller's
        own ``_no_table`` case).
        """
        pool = self._pool
        if pool is None:
            if self.closed:
                raise ChannelLayerClosed("the channel layer was closed")
            raise self.unavailable("not connected")
        deadline = time.monotonic() + (self.timeout if patient else 0.0)
        backoff = self.backoff()
        restored = False
        while True:
            sent = False
            try:
                timeout = max(deadline - time.monotonic(), 0.0) or self.timeout
                async with pool.acquire(timeout=timeout) as conn:
                    sent = True
                    try:
                        return await operation(conn)
                    except self._misuse:
                        raise
                    except self._broken:
                        # Never hand a broken connection back to the pool: asyncpg may
                        # not notice it is unusable, and every later caller would fail.
                        # (If asyncpg already released it, there is nothing to do.)
                        with contextlib.suppress(*self._broken):
                            conn.terminate()
                        raise
            except self._misuse:
                raise
            except self._tables_gone as exc:
                if restored:
                    if no_table_ok and isinstance(exc, self._no_table):
                        raise
                    raise self._refused(exc) from exc
                restored = True
                await self._restore_tables(exc)
            except self._broken as exc:
                if self.closed:  # the pool was closed under us
                    raise ChannelLayerClosed("the channel layer was closed") from exc
                delay = backoff.next()
                committed_maybe = (
                    sent and not _aborted_by_server(exc, self._aborted) and not _refused_unsent(exc)
                )
                if (committed_maybe and not retry) or time.monotonic() + delay >= deadline:
                    raise self.unavailable(exc) from exc
                await asyncio.sleep(delay)
            except self._login_errors as exc:  # a new pooled connection's login
                raise self._login_failed(exc) from exc
            except self._server_errors as exc:
                raise self._refused(exc) from exc

    async def _open_pooled(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """The pool's connect (``asyncpg.connect``), which a cancellation of its caller does not cut.

        Cancelled half way, asyncpg closes what it opened without waiting: over
        TLS, the shutdown then waits for the server's close_notify with nobody
        owning it, and outlived close(), which cancels the readers (a pooled
        statement of the inbox reader opening a connection, say) and whose
        ``pool.close()`` cancels the pool's own top-up of its ``min_size``. The
        connect goes on instead, and what it opens is closed; close() waits for
        that (:meth:`_settle_connects`). Only connects pay for this, not acquires.
        """
        import asyncpg

        opening = asyncio.ensure_future(asyncpg.connect(*args, **kwargs))
        _track(self._connects, opening)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            if not opening.done():
                _track(self._settling, asyncio.ensure_future(_close_when_open(opening, self.timeout)))
            elif not opening.cancelled() and opening.exception() is None:
                # Opened just as the caller was cancelled: nothing else would close it (and
                # close() may have waited for this connect already).
                opening.result().terminate()
            raise

    async def _settle_connects(self) -> None:
        """Wait for the pooled connects under way, and for what cancelled ones opened to close.

        Called once the pool is closed, so none begins after: its ``close()``
        cancels the top-up it runs, whose connect goes on from here. Bounded:
        asyncpg's own connect timeout ends each, and this one ends the wait; what
        is left then is cancelled, and awaited.
        """
        with contextlib.suppress(BackendUnavailable):
            await within(
                _until_empty(self._connects, self._settling),
                self.timeout,
                lambda: self.unavailable("opening connections timed out"),
            )
        left: list[asyncio.Future[Any]] = [*self._connects, *self._settling]
        for future in left:
            future.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    def _login_failed(self, exc: BaseException) -> ChannelLayerError:
        """What a caller gets for a login the server refused (see ``login_refused``)."""
        import asyncpg

        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            advice = "the database does not exist: correct the dsn's path, or create it (CREATE DATABASE)"
        else:
            user = user_of(self.dsn, "")
            who = f"user {user!r}" if user else "its user"
            advice = (
                f"check the user name and password in dsn ({who}), that the role exists and may "
                "log in (CREATE ROLE ... LOGIN PASSWORD ...), and that pg_hba.conf admits it from this host"
            )
        return self.login_refused(f"{type(exc).__name__}: {exc}", advice)

    def _refused(self, exc: BaseException) -> StatementRefused:
        """The error a caller gets for a statement the server answered with ``exc`` (rolled back).

        The one place asyncpg's server errors become the library's: a deadlock or a
        cancelled statement reaches callers of ``send``, ``group_send`` and the rest as
        a :class:`ChannelLayerError` that says what happened and what to do.
        """
        sqlstate: str | None = getattr(exc, "sqlstate", None)
        code = sqlstate or ""
        advice = _REFUSAL_ADVICE.get(code) or _REFUSAL_ADVICE.get(code[:2]) or "see the server's log"
        return StatementRefused(
            f"PostgreSQL at {self.where} refused a statement and rolled it back, nothing of it stored "
            f"({type(exc).__name__}, SQLSTATE {code or '?'}: {self.redact(str(exc))}): {advice}",
            sqlstate,
        )

    async def _release_connections(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            stuck: tuple[type[BaseException], ...] = (BackendUnavailable, *self._broken)
            try:
                await within(pool.close(), self.timeout, lambda: self.unavailable("closing timed out"))
            except stuck:
                pool.terminate()
        # Connections being opened for callers close() cancelled, the pool's top-up among
        # them: closed in full rather than left half-open, before close() returns.
        await self._settle_connects()

    async def _terminate_connections(self) -> None:
        # For tasks stuck in the driver on close: cut their sockets under them.
        if self._listener is not None:
            self._listener.terminate()
        if self._pool is not None:
            self._pool.terminate()

    # --------------------------------------------------------------- listener

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if channel == self._inbox_notify:
            note = payload if isinstance(payload, str) and payload else None
            if note is not None and self._inbox_idle and not self._inbox_notes:
                # Nothing before it is left to hand out or claim, so it cannot overtake
                # anything: delivered here, without a wake-up and a pass of the reader task.
                self._deliver_note(note, self._inbox_where)
                return
            # Handled in arrival order by the inbox reader: a row carried here must
            # not overtake rows of an earlier empty notification, still to be claimed.
            self._inbox_notes.append(note)
            self._inbox_wake.set()
            return
        named = self._named.get(self._named_by_notify.get(channel, ""))
        if named is not None:
            named.demand.set()

    def _wake_all(self) -> None:
        self._inbox_notes.append(None)  # re-check the table: notifications may have been missed
        self._inbox_wake.set()
        for named in self._named.values():
            named.demand.set()

    async def _connect_listener(self) -> None:
        """Open the LISTEN connection and LISTEN on everything this layer reads."""
        import asyncpg

        listen_class = _listen_connection_class()
        conn = await asyncpg.connect(
            self.dsn,
            timeout=self.timeout,
            ssl=self._ssl,
            command_timeout=self.timeout,
            server_settings={"application_name": self.application_name + ":listen"},
            connection_class=listen_class,
        )
        if listen_class is not asyncpg.Connection:
            # (Before any LISTEN: no notification can come earlier.)
            cast(Any, conn).on_notification = self._on_notify
        try:
            async with self._listen_lock:
                for name in self._listened:
                    await conn.add_listener(name, self._on_notify)
                self._listener = conn
        except BaseException:
            conn.terminate()
            raise

    async def _run_listener(self) -> None:
        """Hold the LISTEN connection; reconnect with backoff whenever it is lost."""
        import asyncpg

        errors: tuple[type[BaseException], ...] = (*self._broken, asyncpg.PostgresError)
        backoff = self.backoff()
        while True:
            conn = self._listener
            if conn is None:
                try:
                    await self._connect_listener()
                except self._login_errors as exc:
                    self._login_failed(exc)  # logged at ERROR once per outage (login_refused)
                    await backoff.sleep()
                    continue
                except errors as exc:
                    logger.warning(
                        "cannot connect the LISTEN connection to %s (%s); retrying",
                        self.where,
                        self.redact(f"{type(exc).__name__}: {exc}"),
                    )
                    await backoff.sleep()
                    continue
                conn = self._listener
                assert conn is not None
            backoff.reset()
            self._listening.set()
            self.report_connection(True)
            # Whatever was stored while nobody listened is in the tables.
            self._wake_all()
            try:
                await self._watch(conn)
            except errors as exc:
                logger.warning(
                    "the LISTEN connection failed (%s); reconnecting",
                    self.redact(f"{type(exc).__name__}: {exc}"),
                )
            finally:
                self._listening.clear()
                self._listener = None
                if not self.closed:
                    self.report_connection(False)
                conn.terminate()
                if self._pool is not None and not self.closed:
                    # The pooled sessions most likely went with it: replace them on
                    # their next use instead of failing one call on each. (Not when
                    # close() cancelled it: its last statements would open a new one.)
                    self._release_writer_conn()
                    await self._pool.expire_connections()
                # Readers fall back to re-checking every poll_interval until we are back.
                self._wake_all()
            await backoff.sleep()

    async def _watch(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        if conn.is_closed():
            return
        # A silent peer (a dropped network path) sends no FIN: ping now and then.
        while not await wait_event(lost, _LISTENER_KEEPALIVE):
            async with self._listen_lock:
                await conn.execute("SELECT 1", timeout=self.timeout)
        logger.warning("the LISTEN connection was closed; reconnecting")

    async def _listen(self, name: str, *, on: bool = True) -> None:
        """LISTEN on ``name`` (UNLISTEN if not ``on``) now if connected, and after every reconnect."""
        async with self._listen_lock:
            if on:
                self._listened.add(name)
            else:
                self._listened.discard(name)
            conn = self._listener
            if conn is None:
                return
            failed = False
            try:
                if on:
                    await conn.add_listener(name, self._on_notify)
                else:
                    await conn.remove_listener(name, self._on_notify)
            except self._broken as exc:
                # The listener task LISTENs on exactly self._listened once it reconnects.
                logger.debug("(UN)LISTEN failed (%s); reconnecting", type(exc).__name__)
                failed = True
            if failed or conn.is_closed():
                # asyncpg closes a connection whose protocol it lost track of (a
                # stopping server's FATAL read just before a LISTEN) without calling
                # its termination listeners: _watch would not notice before its next
                # keepalive, and the layer would stay deaf. terminate() calls them.
                conn.terminate()

    async def new_channel(self, prefix: str = "specific") -> str:
        """Return a new process-specific channel name (see :meth:`BaseChannelLayer.new_channel`).

        The first one also LISTENs on this instance's inbox: every NOTIFY in the
        database wakes every listening session, so an instance that only sends
        (no channels, so nothing can reach its inbox) keeps its session asleep.
        """
        channel = await super().new_channel(prefix)
        if not self._inbox_listened:
            await self._listen(self._inbox_notify)
            self._inbox_listened = True
            # Rows stored before the LISTEN took effect were notified to nobody.
            self._inbox_notes.append(None)
            self._inbox_wake.set()
        return channel

    async def _wait_for_wake(self, event: asyncio.Event) -> None:
        if self._listening.is_set():
            await event.wait()
        else:
            # No LISTEN connection: a NOTIFY may be missed, re-check on a timer.
            await wait_event(event, self.poll_interval)

    # ----------------------------------------------------------------- claims

    async def _claim(self, queue: str, limit: int) -> list[asyncpg.Record]:
        # Not patient: a reader that cannot reach the database waits for the
        # listener (the one task that reconnects) instead of retrying on its own.
        return await self._with_conn(
            lambda conn: conn.fetch(self._sql.claim, queue, limit), retry=True, patient=False
        )

    async def _pause(self, backoff: Backoff) -> None:
        """Back off, then wait until the LISTEN connection is back."""
        await backoff.sleep()
        await self._listening.wait()

    async def _drain_inbox(self) -> None:
        """The one reader of this instance's inbox; demultiplexes into local mailboxes.

        Notifications are taken in arrival order: one that carries its row is
        delivered at once (the row is deleted later, in a batch, by
        :meth:`_ack_notes`); an empty one (a fan-out row, a row too big for a
        payload, a reconnect) makes the reader claim rows from the table until
        it is empty. A row can come both ways (claimed before its notification
        was read): the ids in ``_acking`` and ``_claimed`` keep it from being
        delivered twice.
        """
        backoff = self.backoff()
        where = self._inbox_where
        claim = True  # rows stored before we listened
        while True:
            self._inbox_wake.clear()
            notes = self._inbox_notes
            while notes and not claim:
                note = notes.popleft()
                if note is None:
                    claim = True
                else:
                    self._deliver_note(note, where)
            if not claim:
                self._inbox_idle = self._listening.is_set()
                try:
                    await self._wait_for_wake(self._inbox_wake)
                finally:
                    self._inbox_idle = False
                # Woken by the poll timer (no LISTEN connection): re-check the table.
                claim = not self._inbox_notes and not self._listening.is_set()
                continue
            try:
                rows = await self._claim(self._inbox, _INBOX_BATCH)
            except self._reader_errors as exc:
                logger.warning("cannot read the inbox: %s; retrying once reconnected", exc)
                await self._pause(backoff)
                continue
            backoff.reset()
            claim = len(rows) == _INBOX_BATCH
            now = time.monotonic()
            for row in rows:
                if row["id"] in self._acking:  # delivered from its notification already
                    continue
                self._claimed[row["id"]] = now  # its notification may still come
                targets: list[str | None] = row["targets"] or []
                kind = targets[1] if targets and targets[0] is None else None
                if kind == "s":
                    sends: bytes = row["data"]
                    if not row["live"]:
                        self.stats.dropped_expired += sends.count(b"\n") + 1
                    else:
                        try:
                            self._deliver_sends(sends.decode(), where)
                        except UnicodeDecodeError:
                            self._drop_malformed(where)
                    continue
                if kind is not None and kind != "g":
                    self._apply_notice(kind, targets[2], targets[3])
                    continue
                if not row["live"]:
                    self.stats.dropped_expired += 1
                    continue
                message = self._decode_row(row, where)
                if message is None:
                    continue
                if targets and targets[0] is None:
                    self.deliver_to_local_members(targets[2] or "", message)
                else:
                    self.deliver_many([target for target in targets if target is not None], message)
            if len(self._claimed) > _CLAIMED_KEPT:
                # Notifications lost with a LISTEN connection never come: forget old ids.
                cutoff = now - float(self.channel_expiry)
                self._claimed = {key: at for key, at in self._claimed.items() if at > cutoff}

    def _deliver_note(self, note: str, where: str) -> None:
        """Handle the rows a notification carries, except rows claimed already.

        A row of sends is ``s<id>``, then a line ``channel base64`` per send (see
        :meth:`_deliver_sends`), and takes the whole notification. Other rows are a
        line each: ``g<id> group offset epoch base64`` (a group message for this
        process's members of ``group``; ``-`` for no history position), ``j<id>
        group channel`` and ``l<id> group channel`` (another process added or
        discarded one of our channels), and ``m<id> channel base64`` (one send, as
        versions before rows of sends wrote them).
        """
        if note[:1] == "s":  # most notifications
            head, _, sends = note.partition("\n")
            try:
                row_id = int(head[1:])
            except ValueError:
                self._drop_malformed(where)
                return
            if self._new_row(row_id):
                self._deliver_sends(sends, where)
        else:
            for line in note.split("\n"):
                kind = line[:1]
                try:
                    if kind == "g":
                        head, group, offset, epoch, encoded = line.split(" ", 4)
                        position = None if offset == "-" else {"offset": int(offset), "epoch": epoch}
                    elif kind in ("j", "l"):
                        head, group, channel = line.split(" ", 2)
                        encoded = ""
                    elif kind == "m":
                        head, channel, encoded = line.split(" ", 2)
                    else:
                        raise ValueError(kind)
                    row_id = int(head[1:])
                    data = binascii.a2b_base64(encoded)
                except ValueError:  # (binascii.Error is one)
                    self._drop_malformed(where)
                    continue
                if not self._new_row(row_id):
                    continue
                if kind == "j" or kind == "l":
                    self._apply_notice(kind, group, channel)
                    continue
                message = self.decode_or_drop(data, where)
                if message is None:
                    continue
                if kind == "m":
                    self.deliver_local(channel, message)
                else:
                    if position is not None:
                        message[POSITION_KEY] = position
                    self.deliver_to_local_members(group, message)
        if self._acks and self._ack_task is None:
            self._ack_task = self.tasks.spawn(self._ack_notes(), "ack")

    def _new_row(self, row_id: int) -> bool:
        """Whether a row that came with its notification is still to be delivered (not claimed
        already); if so, it is deleted later, with the others delivered meanwhile."""
        if self._claimed and self._claimed.pop(row_id, None) is not None:
            return False
        self._acking.add(row_id)
        self._acks.append(row_id)
        return True

    def _deliver_sends(self, sends: str, where: str) -> None:
        """Deliver a row of sends, in order: a line ``channel base64`` per send."""
        decode, deliver, a2b = self.decode, self.deliver_local, binascii.a2b_base64
        for line in sends.split("\n"):
            channel, _, encoded = line.partition(" ")
            try:
                data = a2b(encoded)
            except ValueError:
                self._drop_malformed(where)
                continue
            try:
                message = decode(data)
            except Exception:
                # Decoded again to be logged and counted there (rare: another writer's bytes).
                dropped = self.decode_or_drop(data, where)
                if dropped is None:
                    continue
                message = dropped
            deliver(channel, message)

    def _drop_malformed(self, where: str) -> None:
        self.stats.dropped_undecodable += 1
        logger.warning("dropped a malformed notification on %s", where)

    def _apply_notice(self, kind: str | None, group: str | None, channel: str | None) -> None:
        """Record that another process added (``j``) or discarded (``l``) one of our channels."""
        if group is None or channel is None or not self.is_local(channel):
            return
        if kind == "j":
            self.local_groups.add(group, channel)
        elif kind == "l":
            self.local_groups.discard(group, channel)

    async def _ack_notes(self) -> None:
        """Delete rows delivered from their notifications, many per statement."""
        backoff = self.backoff()
        try:
            while self._acks:
                # Off the delivery path: waiting lets one statement take many rows.
                await asyncio.sleep(_ACK_DELAY)
                ids, self._acks = self._acks, []
                try:
                    await self._delete_rows(ids)
                except self._reader_errors as exc:
                    # Still in _acking, so never delivered again; deleted with the inbox on close.
                    logger.debug("cannot delete %d delivered row(s): %s; retrying", len(ids), exc)
                    self._acks[:0] = ids
                    await self._pause(backoff)
                    continue
                except BaseException:
                    # This task ends (logged by the supervisor); the next delivered
                    # row starts another, which deletes these too.
                    self._acks[:0] = ids
                    raise
                backoff.reset()
                self._acking.difference_update(ids)
        finally:
            self._ack_task = None

    async def _delete_rows(self, ids: list[int]) -> None:
        await self._with_conn(lambda conn: conn.execute(self._sql.delete_ids, ids), retry=True, patient=False)

    async def _read_named(self, channel: str, waiters: WaiterQueue[Message]) -> None:
        """Claim rows of one named channel for as long as local receivers wait on it."""
        notify = self._notify_name(channel)
        await self._listen(notify)
        backoff = self.backoff()
        idle_until: float | None = None
        while True:
            pending = waiters.pending()
            waiters.demand.clear()
            if not pending:
                # Linger for a while (NOTIFYs for other processes' receivers do
                # not extend it), then stop listening.
                now = time.monotonic()
                idle_until = idle_until or now + _NAMED_LINGER
                if now >= idle_until:
                    break
                await wait_event(waiters.demand, idle_until - now)
                continue
            idle_until = None
            limit = min(pending, _NAMED_BATCH)
            try:
                rows = await self._claim_named(channel, limit)
            except self._reader_errors as exc:
                logger.debug("cannot read channel %r: %s; retrying once reconnected", channel, exc)
                await self._pause(backoff)
                continue
            backoff.reset()
            await self._hand_out(channel, waiters, rows)
            if len(rows) < limit and waiters.pending():
                await self._wait_for_wake(waiters.demand)
        if self._named.get(channel) is waiters:
            del self._named[channel]
            del self._named_by_notify[notify]
        await self._listen(notify, on=False)

    async def _claim_named(self, channel: str, limit: int) -> list[asyncpg.Record]:
        claim = asyncio.ensure_future(self._claim(channel, limit))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            # The DELETE may have committed already: put its rows back rather than lose them.
            try:
                rows = await claim
            except self._reader_errors:
                raise asyncio.CancelledError from None
            await self._restore(channel, [row for row in rows if row["live"]])
            raise

    async def _hand_out(
        self, channel: str, waiters: WaiterQueue[Message], rows: Sequence[asyncpg.Record]
    ) -> None:
        leftovers = []
        for row in rows:
            if not row["live"]:
                continue
            message = self._decode_row(row, f"channel {channel!r}")
            if message is not None and not waiters.hand_over(message):
                leftovers.append(row)
        if leftovers:
            # Receivers left (timed out, cancelled) while we claimed.
            await self._restore(channel, leftovers)

    async def _restore(self, channel: str, rows: Sequence[asyncpg.Record]) -> None:
        if not rows:
            return
        ids = [row["id"] for row in rows]
        expires = [row["expires_at"] for row in rows]
        data = [row["data"] for row in rows]
        offsets = [row["history_offset"] for row in rows]
        epochs = [row["history_epoch"] for row in rows]
        notify = self._notify_name(channel)
        logger.debug("returning %d claimed message(s) of channel %r to the table", len(rows), channel)
        try:
            await self._with_conn(
                lambda conn: conn.fetchval(
                    self._sql.restore, channel, ids, expires, data, notify, offsets, epochs
                ),
                retry=True,
            )
        except self._reader_errors:
            logger.exception("lost %d claimed message(s) of channel %r", len(rows), channel)

    def _decode_row(self, row: asyncpg.Record, where: str) -> Message | None:
        # A history group's rows carry the message's position beside the bytes
        # that the history stores, so one encoding serves both.
        message = self.decode_or_drop(row["data"], where)
        if message is not None and row["history_offset"] is not None:
            message[POSITION_KEY] = {"offset": row["history_offset"], "epoch": row["history_epoch"]}
        return message

    # --------------------------------------------------------------- template

    def _send_remote(self, channel: str, data: bytes) -> Awaitable[None]:
        # What the write returns (its entry's future, or the coroutine that gathers or writes
        # alone), not a coroutine around it: a frame less per send, made and resumed.
        if "!" in channel:  # is_process_specific(), without a call per send
            return self._write(self._inbox_of(channel), channel, data)
        return self._send_named(channel, data)

    async def _send_named(self, channel: str, data: bytes) -> None:
        expiry = float(self.channel_expiry)
        capacity = self.capacity_for(channel)
        notify = self._notify_name(channel)
        # This layer's sends to one channel take turns, each stored before the next
        # starts: on pooled connections of their own, concurrent ones committed (and
        # took their ids, the order readers claim in) in any order. Sends to other
        # channels, and from other processes, still go on at once.
        async with self._named_sends.hold(channel):
            stored = await self._with_conn(
                lambda conn: conn.fetchval(self._sql.send_named, channel, expiry, data, capacity, notify)
            )
        if not stored:
            raise ChannelFull(channel, capacity)

    # A send (an inbox, no policy: written by _write_batch) settles to None; typed so,
    # _send_remote can hand out what the write returns as a send's awaitable.
    @overload
    def _write(self, queue: str, target: str, data: bytes, policy: None = None) -> Awaitable[None]: ...

    @overload
    def _write(
        self, queue: None, target: str, data: bytes, policy: HistoryPolicy | None = None
    ) -> Awaitable[StreamPosition | None]: ...

    def _write(
        self, queue: str | None, target: str, data: bytes, policy: HistoryPolicy | None = None
    ) -> Awaitable[StreamPosition | None]:
        """Write a send (``queue``: the inbox of ``target``) or a message to group ``target``.

        Writes made while a statement is in flight go out together in the next
        one: one round trip, one pooled connection and one commit for many
        messages, delaying a lone one by one pass of the event loop (see
        :meth:`_gathered`), never by a timer. One writer, statements in the
        order their writes were queued, so no write overtakes an earlier one.
        Queued at the call (callers await at once): what is awaited settles
        once the write is stored.
        """
        entry = _Outgoing(queue, target, data, running_loop().create_future(), policy)
        if self._writing or self._outbox_task is not None or self._outbox:
            # Queued here rather than in a helper: a closed-loop burst queues 15 of every 16
            # sends. Their callers await the entry's future itself, not a coroutine around
            # it: across processes each send's task is resumed once by its statement's reply,
            # and a coroutine was one more frame made, run and resumed per send.
            self._outbox.append(entry)
            parked = self._writer_parked
            if parked is not None:
                self._writer_parked = None
                parked.set_result(None)
            elif self._outbox_task is None and not self._writing:
                self._outbox_task = self.tasks.spawn(self._write_outbox(), "outbox")
            return entry.done
        return self._write_first(entry)

    async def _write_first(self, entry: _Outgoing) -> StreamPosition | None:
        """Write ``entry`` when nothing is queued or in flight: with what joins it in this pass, or alone."""
        if await self._gathered(entry):
            return await entry.done
        # Alone: the caller runs its statement itself, without the hops through the
        # writer task and a future (~0.3 ms a call); what is queued meanwhile follows it.
        self._writing = True
        try:
            return (await self._write_run([entry], float(self.channel_expiry)))[0]
        except BackendUnavailable as exc:
            # Writes queued meanwhile have waited as long: fail them too.
            _fail(self._outbox, exc)
            self._outbox.clear()
            raise
        finally:
            self._writing = False
            self._resume_writer()

    async def _gathered(self, entry: _Outgoing) -> bool:
        """Let the callers of this pass of the event loop queue behind ``entry``; whether any did.

        Callers woken together (closed-loop senders whose replies came in one
        notification) then share one statement, where the first one used to go out
        alone and the rest wait for its round trip: two round trips in series per
        cycle, and the two halves stayed out of step from then on.
        """
        self._writing = True
        self._outbox.append(entry)
        try:
            await asyncio.sleep(0)
        except BaseException:
            entry.done.cancel()
            self._writing = False
            self._resume_writer()
            raise
        self._writing = False
        if len(self._outbox) == 1 and not entry.done.done():  # (done: failed by close meanwhile)
            self._outbox.clear()
            return False
        self._resume_writer()
        return True

    def _resume_writer(self) -> None:
        """Hand what was queued while a caller wrote to the writer task (fail it once closed)."""
        if not self._outbox:
            return
        if self.closed:
            _fail(self._outbox, ChannelLayerClosed("the channel layer was closed"))
            self._outbox.clear()
        else:
            self._outbox_task = self.tasks.spawn(self._write_outbox(), "outbox")

    def _take_outbox(self) -> list[_Outgoing]:
        """The next statement's writes: the longest run of queued writes that can share one."""
        outbox = self._outbox
        first = outbox.popleft()
        if first.queue is not None:
            # Sends (never with a policy): every one queued before the next group message.
            # Once per closed-loop cycle of many senders, so found at C speed, not entry by entry.
            sends = [first, *itertools.islice(itertools.takewhile(_QUEUE, outbox), _SEND_BATCH - 1)]
            if len(sends) > len(outbox):
                outbox.clear()
            else:
                for _ in range(len(sends) - 1):
                    outbox.popleft()
            return [entry for entry in sends if not entry.done.done()]  # (done: cancelled)
        batch = [first] if not first.done.done() else []  # (done: cancelled before it went out)
        plain = first.policy is None
        kind = first.queue is None
        while outbox and len(batch) < _SEND_BATCH:
            entry = outbox[0]
            # What _Outgoing.joins says, inline for the usual case (sends, no history).
            if plain and entry.policy is None:
                if (entry.queue is None) != kind:
                    break
            elif not first.joins(entry):
                break
            outbox.popleft()
            if not entry.done.done():
                batch.append(entry)
        return batch

    async def _write_outbox(self) -> None:
        expiry = float(self.channel_expiry)
        burst = False
        try:
            while True:
                if not self._outbox:
                    # Callers woken by the statement just settled often write again in
                    # the next pass (closed-loop senders): they queue here, and their
                    # statement goes out in that pass, instead of the first one starting
                    # a write of its own, gathering for a pass and this task's successor
                    # starting in the pass after.
                    await asyncio.sleep(0)
                    if not self._outbox and burst:
                        await self._next_burst()
                    if not self._outbox:
                        break
                batch = self._take_outbox()
                burst = len(batch) > 1
                if not batch:
                    continue
                try:
                    positions = await self._write_run(batch, expiry)
                except asyncio.CancelledError:
                    _fail(batch, ChannelLayerClosed("the channel layer was closed"))
                    raise
                except Exception as exc:
                    # Handed to every caller of the batch, each of which re-raises it.
                    _fail(batch, exc)
                    if isinstance(exc, BackendUnavailable):
                        # Writes queued meanwhile have waited as long: fail them too
                        # rather than start another timeout for them.
                        _fail(self._outbox, exc)
                        self._outbox.clear()
                    continue
                for entry, position in zip(batch, positions, strict=True):
                    if not entry.done.done():
                        entry.done.set_result(position)
        finally:
            self._outbox_task = None
            self._writer_parked = None
            if self.closed:
                _fail(self._outbox, ChannelLayerClosed("the channel layer was closed"))
                self._outbox.clear()

    async def _next_burst(self) -> None:
        """Wait for the next write while the writer keeps its connection, or until it is given back.

        Senders woken by something other than their statement's reply (an answer from
        another process: closed-loop senders across processes) write again passes
        after this writer settled them: a writer that ended would leave the first of
        them to gather for a pass and start a successor the pass after, and its own
        end cost a pass too. Only after a burst (a statement of several writes) and
        only while the connection is kept, so lone writes still run in their callers.
        """
        if self._writer_conn is not None:
            self._writer_parked = running_loop().create_future()
            await self._writer_parked

    async def _write_run(self, batch: list[_Outgoing], expiry: float) -> Sequence[StreamPosition | None]:
        """Write ``batch`` (writes that can share a statement) in one statement."""
        if batch[0].policy is not None:
            return await self._write_history_batch(batch, expiry)
        if batch[0].queue is None:
            return await self._write_group_batch(batch, expiry)
        return await self._write_batch(batch, expiry)

    async def _writer_statement(self, operation: Callable[[_Conn], Awaitable[T]]) -> T:
        """Run the ordered writer's ``operation`` as :meth:`_with_conn` does, on a connection it keeps.

        Statements of the writer never overlap (one writer, see :meth:`_write`), so
        one connection serves them all; it goes back to the pool ``_WRITER_LINGER``
        seconds after the last one, and at once when a statement fails.
        """
        conn = self._writer_conn
        if conn is None:
            conn = await self._acquire_for_writer()
        else:
            self._writer_conn = None  # ours until the statement is done
        watch = self._statement_watch
        watch.start(conn)
        try:
            try:
                result = await operation(conn)
            finally:
                watch.end()
        except self._misuse:
            self._give_back(conn)
            raise
        except self._broken as exc:
            # As in _with_conn: a broken connection never goes back to the pool, and a
            # statement that may have committed is not sent again.
            with contextlib.suppress(*self._broken):
                conn.terminate()
            if self.closed:
                raise ChannelLayerClosed("the channel layer was closed") from exc
            if watch.expired:
                raise self.unavailable(f"no reply within {self.timeout} s") from exc
            if _aborted_by_server(exc, self._aborted) or _refused_unsent(exc):
                return await self._with_conn(operation)
            raise self.unavailable(exc) from exc
        except self._tables_gone as exc:
            self._give_back(conn)
            await self._restore_tables(exc)
            return await self._with_conn(operation)
        except self._server_errors as exc:
            self._give_back(conn)  # the session is still usable
            raise self._refused(exc) from exc
        except BaseException:
            # A cancellation (the session may be mid-statement): the pool's release puts it right.
            self._give_back(conn)
            raise
        if self.closed or conn.is_closed() or self.pool_size == 1:
            # (A pool of one: everything else would wait for the writer's linger.)
            self._give_back(conn)
        else:
            self._writer_conn = conn
            loop = running_loop()
            self._writer_used = loop.time()
            # One timer for many statements (a new one per statement was a timer
            # handle, a heap push and a cancel each): it re-arms itself while in use.
            if self._writer_linger is None:
                self._writer_linger = loop.call_later(_WRITER_LINGER, self._writer_lingered)
        return result

    def _writer_lingered(self) -> None:
        """The linger timer: give the writer's connection back once idle ``_WRITER_LINGER`` seconds."""
        self._writer_linger = None
        if self._writer_conn is None:
            return  # in use (re-armed when its statement ends) or given back already
        idle = running_loop().time() - self._writer_used
        if idle < _WRITER_LINGER:
            self._writer_linger = running_loop().call_later(_WRITER_LINGER - idle, self._writer_lingered)
        else:
            self._release_writer_conn()

    async def _acquire_for_writer(self) -> _Conn:
        """A pooled connection, waiting and retrying as :meth:`_with_conn` does for its own."""
        deadline = time.monotonic() + self.timeout
        backoff = self.backoff()
        while True:
            pool = self._pool
            if pool is None or self.closed:
                if self.closed:
                    raise ChannelLayerClosed("the channel layer was closed")
                raise self.unavailable("not connected")
            try:
                conn: _Conn = await pool.acquire(
                    timeout=max(deadline - time.monotonic(), 0.0) or self.timeout
                )
                _statement_timer(conn, None)  # bounded by _statement_watch while the writer has it
                return conn
            except self._misuse:
                raise
            except self._login_errors as exc:
                raise self._login_failed(exc) from exc
            except self._broken as exc:
                if self.closed:
                    raise ChannelLayerClosed("the channel layer was closed") from exc
                delay = backoff.next()
                if time.monotonic() + delay >= deadline:
                    raise self.unavailable(exc) from exc
                await asyncio.sleep(delay)

    def _release_writer_conn(self) -> None:
        """Hand the writer's kept connection back to the pool (idle for a while, or reconnecting)."""
        if self._writer_linger is not None:
            self._writer_linger.cancel()
            self._writer_linger = None
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            self._give_back(conn)
        parked, self._writer_parked = self._writer_parked, None
        # Done already when close() cancelled the waiting writer and this runs (from the
        # linger timer) before the writer's own cleanup.
        if parked is not None and not parked.done():
            parked.set_result(None)  # the writer waiting for a burst ends (nothing queued)

    def _give_back(self, conn: _Conn) -> None:
        """Hand the writer's connection back to the pool, with asyncpg's statement timer again."""
        _statement_timer(conn, self.timeout)
        pool = self._pool
        if pool is not None and not self.closed:
            self.tasks.spawn(pool.release(conn), "release")
        elif not conn.is_closed():
            conn.terminate()

    async def _write_batch(self, batch: list[_Outgoing], expiry: float) -> list[None]:
        queues, rows = _send_rows(batch)
        if len(rows) == 1:
            queue, lines = queues[0], rows[0]
            await self._writer_statement(
                lambda conn: conn.fetchval(
                    self._sql.send_inbox, queue, lines, expiry, self._notify_name(queue)
                )
            )
        else:
            await self._writer_statement(
                lambda conn: conn.fetchval(self._sql.send_inboxes, queues, rows, expiry, self.schema)
            )
        return [None] * len(batch)

    async def _write_group_batch(self, batch: list[_Outgoing], expiry: float) -> list[None]:
        groups = [entry.target for entry in batch]
        if len(batch) == 1:
            group, data = batch[0].target, batch[0].data
            # Larger messages could not ride in a notification whatever the row's id.
            b64 = binascii.b2a_base64(data, newline=False).decode() if len(data) < _GROUP_NOTE_BYTES else None
            row = await self._writer_statement(
                lambda conn: conn.fetchrow(
                    self._sql.group_send_one, group, data, expiry, self.client_token, self.schema, b64
                )
            )
        else:
            datas = [entry.data for entry in batch]
            row = await self._writer_statement(
                lambda conn: conn.fetchrow(
                    self._sql.group_send, groups, datas, expiry, self.client_token, self.schema
                )
            )
        if row is not None and row["skipped"]:
            logger.debug(
                "group_send to %s skipped %d full named channel(s)", sorted(set(groups)), row["skipped"]
            )
        return [None] * len(batch)

    async def _write_history_batch(self, batch: list[_Outgoing], expiry: float) -> list[StreamPosition]:
        # One group (see _Outgoing.joins): each message is one history_send call, in order.
        group = batch[0].target
        data = [entry.data for entry in batch]
        policies = [entry.policy for entry in batch if entry.policy is not None]
        rows = await self._writer_statement(
            lambda conn: conn.fetch(
                self._sql.history_send_many,
                group,
                data,
                expiry,
                self.client_token,
                self.schema,
                [new_epoch() for _ in batch],
                [policy.ttl for policy in policies],
                [policy.size for policy in policies],
            )
        )
        skipped = sum(row["skipped"] for row in rows)
        if skipped:
            logger.debug("group_send to %r skipped %d full named channel(s)", group, skipped)
        return [StreamPosition(row["position_offset"], row["position_epoch"]) for row in rows]

    async def _receive_remote(self, channel: str) -> Message:
        waiters = self._named.get(channel)
        if waiters is None:
            waiters = WaiterQueue(lambda message: self.deliver_local(channel, message))
            self._named[channel] = waiters
            self._named_by_notify[self._notify_name(channel)] = channel
            queue = waiters
            self.tasks.keep_running(lambda: self._read_named(channel, queue), f"named:{channel}")
        return await waiters.wait()

    async def _group_add(self, group: str, channel: str) -> None:
        capacity = self.capacity_for(channel)
        expiry = float(self.group_expiry)
        if not is_process_specific(channel):
            await self._with_conn(
                lambda conn: conn.execute(self._sql.group_add, group, channel, None, capacity, expiry),
                retry=True,
            )
            return
        owner = process_token(channel)
        if owner == self.client_token:
            await self._with_conn(
                lambda conn: conn.fetchval(self._sql.group_join_own, group, channel, owner, capacity, expiry),
                retry=True,
            )
            self.local_groups.add(group, channel)
            return
        notice_expiry = float(self.channel_expiry)
        await self._with_conn(
            lambda conn: conn.execute(
                self._sql.group_add_notice,
                group,
                channel,
                owner,
                capacity,
                expiry,
                notice_expiry,
                self.schema,
            ),
            retry=True,
        )

    async def _group_discard(self, group: str, channel: str) -> None:
        if not is_process_specific(channel):
            await self._with_conn(
                lambda conn: conn.execute(self._sql.group_discard, group, channel), retry=True
            )
            return
        owner = process_token(channel)
        if owner == self.client_token:
            await self._with_conn(
                lambda conn: conn.fetchval(self._sql.group_leave, group, channel, owner), retry=True
            )
            self.local_groups.discard(group, channel)
            return
        notice_expiry = float(self.channel_expiry)
        await self._with_conn(
            lambda conn: conn.execute(
                self._sql.group_discard_notice, group, channel, owner, notice_expiry, self.schema
            ),
            retry=True,
        )

    async def _group_send(self, group: str, data: bytes) -> None:
        await self._write(None, group, data)
        # Our own members only once the statement has committed (serving them when
        # queued measured no faster: a round's time is their wake-ups, which overlap
        # the round trip either way), so a caller that sees an error delivered nothing.
        if group in self.local_groups:
            self.deliver_to_local_members(group, self.decode(data))

    async def _group_send_history(
        self, group: str, message: Message, policy: HistoryPolicy
    ) -> StreamPosition:
        # One round trip: assign the offset, store, trim and fan out in one function
        # call; history_send calls queued meanwhile for the group share the statement.
        data = self.encode(message)
        position = await self._write(None, group, data, policy)
        assert position is not None  # a history write's result
        if group in self.local_groups:
            self.deliver_to_local_members(group, {**self.decode(data), POSITION_KEY: position.as_dict()})
        return position

    async def _history_append(self, group: str, data: bytes, policy: HistoryPolicy) -> StreamPosition:
        row = await self._with_conn(
            lambda conn: conn.fetchrow(
                self._sql.history_append, group, data, new_epoch(), policy.ttl, policy.size
            )
        )
        assert row is not None  # the function returns one row
        return StreamPosition(row["position_offset"], row["position_epoch"])

    async def _history_read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        row = await self._with_conn(
            lambda conn: conn.fetchrow(self._sql.history_read, group, after, limit, new_epoch(), policy.ttl),
            retry=True,
        )
        assert row is not None  # the function returns one row
        entries = list(zip(row["offsets"] or [], row["entries"] or [], strict=True))
        # Offsets are contiguous: nothing was trimmed after `after` exactly when
        # every offset from after + 1 to newest is still stored.
        complete = row["available"] >= row["newest"] - after
        return HistorySlice(entries, row["newest"], row["epoch"], complete)

    # --------------------------------------------------------------- presence

    async def _ensure_presence_tables(self) -> None:
        """Create the presence tables on this layer's first join (layers that never join make none)."""
        if self._presence_ready:
            return
        async with self._presence_setup:
            if self._presence_ready:
                return
            names = self._sql.presence_tables
            if self.ensure_schema:
                await self._create_tables(names, lambda _: [self._sql.create_presence])
            elif not await self._with_conn(
                lambda conn: conn.fetchval(self._sql.tables_exist, self.schema, names), retry=True
            ):
                raise ChannelLayerError(
                    f"the presence tables of schema {self.schema!r} do not exist in the database at "
                    f"{self.where}; join presence once from a layer with ensure_schema=True to create them"
                )
            self._presence_ready = True

    async def _presence_put(self, group: str, channel: str, info: bytes) -> QueuedWrite | None:
        await self._ensure_presence_tables()
        stored = self._presence_writer.queue(group, channel, info)
        if not self._presence:
            # Our first entry: the heartbeat starts once it is stored, so its first beat
            # finds our record there, not missing (which would make it store every entry again).
            await stored
            return None
        return QueuedWrite(stored)

    def _presence_take_back(self, group: str, channel: str) -> None:
        if self._presence_ready:  # no presence table made or seen yet: nothing was written
            self._presence_writer.take_back(group, channel)

    async def _presence_remove(self, group: str, channel: str) -> bytes | QueuedWrite | None:
        ours = self._presence.members(group).get(channel)
        if ours is not None:
            # Our own entry: its info is known here, so the removal is queued like a join.
            return QueuedWrite(self._presence_writer.queue(group, channel, None), ours)
        try:
            info: bytes | None = await self._with_conn(
                lambda conn: conn.fetchval(self._sql.presence_remove, group, channel),
                retry=True,
                no_table_ok=True,
            )
        except self._no_table:
            return None
        return info

    async def _write_presence(self, changes: list[_Change]) -> None:
        """Write a batch of the presence writer's changes (at most one per entry) in one statement."""
        groups = [change.group for change in changes]
        channels = [change.channel for change in changes]
        infos = [change.info for change in changes]
        stores = any(info is not None for info in infos)
        ttl = float(self.presence_timeout)
        row = await self._with_conn(
            lambda conn: conn.fetchrow(
                self._sql.presence_write, groups, channels, infos, self.client_token, ttl, stores
            ),
            retry=True,  # the batch's entries end as they would again: safe to repeat
        )
        assert row is not None  # the query aggregates into one row
        if row["inserted"]:
            # Our record was missing. Unless this batch stores our first entries, another
            # process reaped us while we could not beat, or a crash emptied the tables, and
            # our other entries went with it: the next beat stores them again.
            written = {(change.group, change.channel) for change in changes} | self._presence_writer.queued()
            if any((group, channel) not in written for group, channel, _ in self._presence.items()):
                self._presence_lost = True

    async def _presence_read(self, group: str) -> dict[str, bytes]:
        try:
            row = await self._with_conn(
                lambda conn: conn.fetchrow(self._sql.presence_read, group), retry=True, no_table_ok=True
            )
        except self._no_table:
            return {}
        assert row is not None  # the query aggregates into one row
        return dict(zip(row["channels"] or [], row["infos"] or [], strict=True))

    async def _presence_beat(self) -> bool:
        inserted = await self._with_conn(
            lambda conn: conn.fetchval(
                self._sql.presence_beat, self.client_token, float(self.presence_timeout)
            ),
            retry=True,
        )
        lost, self._presence_lost = self._presence_lost, False
        return bool(inserted) or lost

    async def _presence_reap(self) -> list[tuple[str, str, bytes]]:
        try:
            rows = await self._with_conn(
                lambda conn: conn.fetch(self._sql.presence_reap), retry=True, no_table_ok=True
            )
        except self._no_table:
            return []
        return [(row["group_name"], row["channel"], row["info"]) for row in rows]

    async def _flush(self) -> None:
        async def flush(conn: _Conn) -> None:
            async with conn.transaction():
                await conn.execute(self._sql.flush)
                # Also when this layer keeps no history or presence: another one
                # sharing the schema may.
                if await conn.fetchval(self._sql.tables_exist, self.schema, self._sql.history_tables):
                    await conn.execute(self._sql.flush_history)
                if await conn.fetchval(self._sql.tables_exist, self.schema, self._sql.presence_tables):
                    await conn.execute(self._sql.flush_presence)

        await self._with_conn(flush, retry=True)

    # ------------------------------------------------------------ housekeeping

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval)
            try:
                await self._prune_once()
            except self._reader_errors as exc:
                logger.warning("pruning skipped: %s", exc)

    async def prune(self) -> bool:
        """Delete expired messages and group members now; False if another process is pruning."""
        self._check_open()
        await self._ensure_started()
        return await self._prune_once()

    async def _prune_once(self) -> bool:
        key = lock_key(self.schema, "prune")

        async def prune(conn: _Conn) -> bool:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", key):
                    return False
                messages = await conn.execute(self._sql.prune_messages)
                members = [await conn.execute(statement) for statement in self._sql.prune_members]
                history = await conn.fetchrow(self._sql.prune_history) if self.history else None
            logger.debug(
                "pruned expired rows: %s messages, %s group members, history %s", messages, members, history
            )
            return True

        return await self._with_conn(prune, retry=True)

    async def _close(self) -> None:
        await self.tasks.close(self.timeout, unblock=self._terminate_connections)
        self._statement_watch.cancel()
        if self._writer_linger is not None:
            self._writer_linger.cancel()
            self._writer_linger = None
        kept, self._writer_conn = self._writer_conn, None
        if kept is not None and self._pool is not None:
            _statement_timer(kept, self.timeout)
            # Before the pool closes, which waits for every connection to come back.
            with contextlib.suppress(ChannelLayerError, *self._broken):
                await within(
                    self._pool.release(kept), self.timeout, lambda: self.unavailable("release timed out")
                )
        # A writer cancelled before it ran never reached its own cleanup.
        self._outbox_task = None
        self._ack_task = None
        _fail(self._outbox, ChannelLayerClosed("the channel layer was closed"))
        self._outbox.clear()
        self._presence_writer.fail(ChannelLayerClosed("the channel layer was closed"))
        if self._pool is not None:
            # Nobody can receive on this instance's channels any more: drop its inbox
            # and memberships instead of letting group_send feed them until expiry.
            async def forget(conn: _Conn) -> None:
                for statement in self._sql.forget_owner:
                    await conn.execute(statement, self.client_token)
                await conn.execute(self._sql.drop_inbox, self._inbox)
                if self._presence_ready:
                    # Our liveness record (and any entry left over): nobody need reap us.
                    for statement in self._sql.presence_forget:
                        await conn.execute(statement, self.client_token)

            try:
                await self._with_conn(forget, patient=False)
            except StatementRefused as exc:
                logger.warning("could not remove this instance's rows on close: %s", exc)
            except ChannelLayerError as exc:
                logger.debug("could not remove this instance's rows on close: %s", exc)
            except self._reader_errors as exc:
                # The server refused (its schema lost in a crash, say): the pool must close anyway.
                logger.warning("could not remove this instance's rows on close: %r", exc)
        await self._release_connections()


def _track(futures: set[FutureT], future: FutureT) -> None:
    """Keep ``future`` in ``futures`` until it is done."""
    futures.add(future)
    future.add_done_callback(futures.discard)


async def _until_empty(*sets: AbstractSet[asyncio.Future[Any]]) -> None:
    """Wait until every one of ``sets`` (which others add to meanwhile) is empty; see :func:`_track`."""
    while pending := set().union(*sets):
        await asyncio.wait(pending)


async def _close_when_open(opening: asyncio.Future[asyncpg.Connection], timeout: float) -> None:
    """Close the connection a pooled connect opens after its caller was cancelled."""
    try:
        conn = await opening
    except Exception:
        return  # nothing opened (asyncpg closed what it had begun)
    try:
        await conn.close(timeout=timeout)
    except Exception:
        conn.terminate()


def _aborted_by_server(exc: BaseException, aborted: tuple[type[BaseException], ...]) -> bool:
    # asyncpg reports the server's FATAL message as the cause of its own error.
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, aborted):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _refused_unsent(exc: BaseException) -> bool:
    """Whether asyncpg refused to start the statement, so none of it reached the server.

    A session the server ended while it was idle (a restart) can stay in the
    pool with its protocol left mid-state; asyncpg then refuses the next
    statement before writing a byte ("cannot switch to state 11; another
    operation (2) is in progress", "not connected"). Sending it again on
    another connection cannot store it twice.
    """
    import asyncpg

    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith(
        ("cannot switch to state", "not connected")
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is.

    asyncpg's default reset (``RESET ALL; UNLISTEN *; ...``) is one more round
    trip for every statement; pooled sessions here never change session state
    (advisory locks are transaction-scoped, LISTEN runs on its own connection),
    and asyncpg still rolls back a transaction left open.
    """


@functools.cache
def _listen_connection_class() -> type[asyncpg.Connection]:
    """The class of LISTEN connections: asyncpg's, handing each notification over at once.

    asyncpg hands a notification to its listeners with ``call_soon``: one more pass of
    the event loop per notification before the inbox sees it, during which the reply to
    a statement read with it wakes closed-loop senders before their messages are
    delivered (so each wakes twice). Here the connection's ``on_notification`` is called
    from asyncpg's protocol as it parses the notification, through
    ``Connection._process_notification(pid, channel, payload)``, which asyncpg does not
    document: where that method is missing or has other parameters, asyncpg's own class
    (and its ``call_soon``) is used, and a test says so.
    """
    import asyncpg

    hook: Any = getattr(asyncpg.Connection, "_process_notification", None)
    try:
        parameters = list(inspect.signature(hook).parameters) if callable(hook) else []
    except (TypeError, ValueError):
        parameters = []
    if parameters != ["self", "pid", "channel", "payload"]:
        return asyncpg.Connection

    class ListenConnection(asyncpg.Connection):
        #: Called with ``(connection, pid, channel, payload)`` for every notification;
        #: None: asyncpg's listeners are called (with call_soon) as usual.
        on_notification: Callable[[object, int, str, object], None] | None = None

        def _process_notification(self, pid: int, channel: str, payload: object) -> None:
            handler = self.on_notification
            if handler is None:
                hook(self, pid, channel, payload)
                return
            try:
                handler(self, pid, channel, payload)
            except Exception:
                # Raised into asyncpg's protocol, it would break the connection's parsing.
                logger.exception("handling a notification on %r failed", channel)

    return ListenConnection


def _payload_len(text: str) -> int:
    """``text``'s length in a NOTIFY payload (UTF-8 bytes; channel names may be non-ASCII)."""
    return len(text) if text.isascii() else len(text.encode())


def _send_rows(batch: Sequence[_Outgoing]) -> tuple[list[str], list[str]]:
    """The inbox rows of a batch of sends: their queues, and each row's lines ("channel base64").

    A row holds consecutive sends to one inbox whose lines fit one NOTIFY payload
    (so the notification carries it); a send that cannot fit alone is a row of
    its own (its notification is empty, and its owner claims it).
    """
    encode = binascii.b2a_base64
    lines = [f"{entry.target} {encode(entry.data, newline=False).decode()}" for entry in batch]
    if len(set(map(_QUEUE, batch))) == 1:
        # The usual batch (closed-loop senders of one worker's sockets): one inbox, one
        # payload, told without sizing each line.
        text = "\n".join(lines)
        if _payload_len(text) < _NOTE_LIMIT:
            return [batch[0].queue or ""], [text]
    queues: list[str] = []
    rows: list[str] = []
    row: list[str] = []
    queue = ""
    size = 0
    for entry, line in zip(batch, lines, strict=True):
        length = _payload_len(line) + 1  # and its newline
        if row and (entry.queue != queue or size + length > _NOTE_LIMIT):
            queues.append(queue)
            rows.append("\n".join(row))
            row, size = [], 0
        queue = entry.queue or ""
        row.append(line)
        size += length
    queues.append(queue)
    rows.append("\n".join(row))
    return queues, rows


def _fail(entries: Iterable[_Outgoing], exc: BaseException) -> None:
    for entry in entries:
        if not entry.done.done():
            entry.done.set_exception(exc)
