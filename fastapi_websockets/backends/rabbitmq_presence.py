"""Presence on RabbitMQ: every participating process keeps a replica of everyone's entries.

RabbitMQ has no key-value store and cannot list queues or bindings over
AMQP, so entries cannot be stored and read back. Instead (as Phoenix does),
each process that uses presence owns its entries and tells the others:

* **Replica queue**: one exclusive classic queue ``P.pr.<token>`` per
  participating layer instance, bound to the layer's exchange on the routing
  key ``presence``. Every change (put, remove), every heartbeat and every
  snapshot request goes to that key, so each participant sees every other
  one's changes in the order they were made (one channel, one queue: FIFO).
* **Roster queue**: ``P.presence``, a classic queue that every participant
  consumes (nothing is ever published to it). Its consumer count, read when a
  process starts participating, is exactly the number of peers whose
  snapshots it must wait for: it asks them all at once and waits for that
  many answers (bounded by ``timeout``; a peer that does not answer is dead).
* **Versions**: each owner numbers its changes; a heartbeat carries the
  number. A replica that sees a gap (a message lost in a broker restart)
  asks that owner for a fresh snapshot, sent to its replica queue directly.
* **Reads** answer from the replica after one round trip through the
  reader's own replica queue (a barrier), so everything an owner published
  before ``presence_join`` returned is applied: ``presence()`` costs one
  round trip whatever the number of members.
* **Death**: an owner that has not been heard from for ``presence_timeout``
  seconds is dropped from every replica; its leaves are announced by one
  process only, the one whose claim (an exclusive queue named after the dead
  owner) the broker accepted.

The broker holds no per-member state: only messages in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi_websockets.backends.timeouts import within
from fastapi_websockets.exceptions import BackendUnavailable
from fastapi_websockets.names import new_token
from fastapi_websockets.presence import LocalPresence, QueuedWrite

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel

    from fastapi_websockets.backends.rabbitmq import PublishQueue, RabbitMQChannelLayer

__all__ = ["PRESENCE_ROUTING_KEY", "RabbitPresence"]

logger = logging.getLogger("fastapi_websockets.rabbitmq")

#: The routing key every participant's replica queue is bound to.
PRESENCE_ROUTING_KEY = "presence"
#: Milliseconds the roster queue outlives its last consumer.
ROSTER_EXPIRY_MS = 60_000

# Kinds, in the AMQP ``type`` property.
_PUT = "presence.put"
_REMOVE = "presence.remove"
_BEAT = "presence.beat"
_ASK = "presence.ask"  # a snapshot request; reply_to = the asker's replica queue
_SNAPSHOT = "presence.snapshot"
_BARRIER = "presence.barrier"
_DROP = "presence.drop"  # another process asks the owner to remove one of its entries


@dataclass
class _Owner:
    """What this replica knows about one other layer instance's entries."""

    version: int = 0
    deadline: float = 0.0
    entries: dict[str, dict[str, bytes]] = field(default_factory=dict)


def _encode_snapshot(entries: list[tuple[str, str, bytes]]) -> bytes:
    # Latin-1 maps bytes to code points one to one, so any encoded info survives JSON.
    return json.dumps([[group, channel, info.decode("latin-1")] for group, channel, info in entries]).encode()


def _decode_snapshot(body: bytes) -> dict[str, dict[str, bytes]]:
    entries: dict[str, dict[str, bytes]] = {}
    for group, channel, info in json.loads(body):
        entries.setdefault(group, {})[channel] = info.encode("latin-1")
    return entries


class RabbitPresence:
    """One layer instance's participation in presence: its published entries and its replica of the others."""

    def __init__(self, layer: RabbitMQChannelLayer) -> None:
        self.layer = layer
        self.token = layer.client_token
        self.queue_name = f"{layer.queue_prefix}.pr.{self.token}"
        #: What the other processes have been told this instance owns.
        self.published = LocalPresence()
        self.version = 0
        self.owners: dict[str, _Owner] = {}
        #: Consumes the replica queue; publishes go through the layer's confirm channel.
        self._channel: AbstractRobustChannel | None = None
        self._started: asyncio.Task[None] | None = None
        self._sync: tuple[str, int, set[str], asyncio.Future[None]] | None = None
        self._barriers: dict[str, asyncio.Future[None]] = {}
        #: The confirm channel's queue of the last entry published: take-backs go behind it.
        self._outlet: PublishQueue | None = None

    # ------------------------------------------------------------ joining

    async def ensure_started(self) -> None:
        """Join the presence participants (once): replica queue, roster, snapshots of every peer."""
        started = self._started
        if started is None or (started.done() and (started.cancelled() or started.exception())):
            started = self._started = self.layer.tasks.spawn(self._start(), "presence start", awaited=True)
        await asyncio.shield(started)

    async def _start(self) -> None:
        layer = self.layer
        connection = layer._connection
        assert connection is not None
        channel = await layer._broker(
            layer._channel, "presence channel", lambda: connection.channel(publisher_confirms=False)
        )
        self._channel = channel
        try:
            queue = await layer._broker(
                channel,
                "declare of the presence queue",
                lambda: channel.declare_queue(
                    self.queue_name, exclusive=True, auto_delete=True, arguments={"x-queue-type": "classic"}
                ),
            )
            await layer._broker(
                channel,
                "bind of the presence queue",
                lambda: queue.bind(layer.exchange_name, PRESENCE_ROUTING_KEY),
            )
            await layer._broker(
                channel, "consume of the presence queue", lambda: queue.consume(self._on_message, no_ack=True)
            )
            # Bound before counting: every peer counted below gets the request.
            roster = await layer._broker(
                channel,
                "declare of the presence roster",
                lambda: channel.declare_queue(
                    f"{layer.queue_prefix}.presence",
                    arguments={"x-queue-type": "classic", "x-expires": ROSTER_EXPIRY_MS},
                ),
            )
            peers = roster.declaration_result.consumer_count or 0
            await layer._broker(
                channel, "consume of the presence roster", lambda: roster.consume(_ignore, no_ack=True)
            )
            if peers:
                await self._ask_all(peers)
        except BaseException:
            # A retry starts from a fresh channel; this one would keep a half-made setup.
            await channel.close()
            raise
        connection.reconnect_callbacks.add(self._on_reconnect)

    async def _ask_all(self, peers: int) -> None:
        request = new_token(8)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sync = (request, peers, set(), done)
        try:
            await self._publish(
                _ASK, b"", key=PRESENCE_ROUTING_KEY, correlation_id=request, reply_to=self.queue_name
            )
            try:
                await asyncio.wait_for(asyncio.shield(done), self.layer.timeout)
            except asyncio.TimeoutError:
                # A peer counted in the roster that does not answer is dead (or dying).
                logger.info("presence: %d of %d peers answered", len(self._sync[2]), peers)
        finally:
            self._sync = None

    def _on_reconnect(self, connection: object) -> None:
        # Nobody could beat while the broker was away: give every owner a full timeout again.
        deadline = time.monotonic() + self.layer.presence_timeout
        for owner in self.owners.values():
            owner.deadline = max(owner.deadline, deadline)

    # ---------------------------------------------------------- publishing

    # Every publish goes through the layer's confirm channel, queued in call order
    # (see ``RabbitMQChannelLayer._confirm_outlet``): a change is numbered and
    # queued with no await in between, so the replicas get the changes in the
    # order of their versions while their callers all wait for their confirms
    # at once. Nothing else orders them, and no lock is held across a confirm.

    def _queue(
        self,
        queue: PublishQueue,
        kind: str,
        body: bytes,
        *,
        key: str,
        exchange: bool = True,
        headers: dict[str, Any] | None = None,
        **properties: Any,
    ) -> Coroutine[Any, Any, None]:
        layer = self.layer
        marked = layer._properties(kind, headers={"o": self.token, **(headers or {})}, **properties)
        return queue(layer.exchange_name if exchange else "", key, body, marked)

    async def _publish(
        self,
        kind: str,
        body: bytes,
        *,
        key: str,
        exchange: bool = True,
        headers: dict[str, Any] | None = None,
        **properties: Any,
    ) -> None:
        queue = await self.layer._confirm_outlet(f"presence {kind}")
        await self._queue(queue, kind, body, key=key, exchange=exchange, headers=headers, **properties)

    async def put(self, group: str, channel: str, info: bytes) -> QueuedWrite:
        """Queue one entry (a join or an info update); the write settles when the broker confirms it."""
        await self.ensure_started()
        queue = await self.layer._confirm_outlet(f"presence {_PUT}")
        self.published.add(group, channel, info)
        self.version += 1
        sent = self._queue(
            queue, _PUT, info, key=PRESENCE_ROUTING_KEY, headers={"v": self.version, "g": group, "c": channel}
        )
        self._outlet = queue
        return QueuedWrite(sent)

    def take_back(self, group: str, channel: str) -> None:
        """Queue the removal of an entry published here (a join not known to be stored) behind it.

        If that one is lost too, the replicas see the version gap at the next beat and ask.
        """
        if self._outlet is None or self.published.remove(group, channel) is None:
            return
        self.version += 1
        headers = {"v": self.version, "g": group, "c": channel}
        sent = self._queue(self._outlet, _REMOVE, b"", key=PRESENCE_ROUTING_KEY, headers=headers)
        self.layer._spawn(sent, "presence take-back")

    async def remove(self, group: str, channel: str) -> QueuedWrite | None:
        """Queue the removal of an entry: ours directly, another process's by asking its owner."""
        await self.ensure_started()
        queue = await self.layer._confirm_outlet(f"presence {_REMOVE}")
        info = self.published.remove(group, channel)
        if info is not None:
            self.version += 1
            sent = self._queue(
                queue,
                _REMOVE,
                b"",
                key=PRESENCE_ROUTING_KEY,
                headers={"v": self.version, "g": group, "c": channel},
            )
            return QueuedWrite(sent, info)
        for token, owner in self.owners.items():
            members = owner.entries.get(group)
            if members is not None and channel in members:
                info = members.pop(channel)
                if not members:
                    del owner.entries[group]
                sent = self._queue(
                    queue,
                    _DROP,
                    b"",
                    key=self._queue_of(token),
                    exchange=False,
                    headers={"g": group, "c": channel},
                )
                return QueuedWrite(sent, info)
        return None

    async def read(self, group: str) -> dict[str, bytes]:
        """Every live entry of ``group``, after everything published before this call is applied."""
        await self.ensure_started()
        await self._barrier()
        entries = self.published.members(group)
        now = time.monotonic()
        for owner in self.owners.values():
            if owner.deadline > now:
                entries.update(owner.entries.get(group, {}))
        return entries

    async def _barrier(self) -> None:
        # Our own queue is FIFO: once this comes back, every change the broker queued
        # for us before it (all that a peer's confirmed publish put there) is applied.
        mark = new_token(8)
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[mark] = arrived
        channel = self._channel
        assert channel is not None
        try:
            # Published on the layer's channel, which can be back before this one has
            # declared our queue again after a reconnect: the barrier would be unroutable.
            await within(
                channel.ready(),
                self.layer.timeout,
                lambda: self.layer.unavailable(f"no presence queue within {self.layer.timeout} s"),
            )
            await self._publish(_BARRIER, b"", key=self.queue_name, exchange=False, correlation_id=mark)
            await within(
                arrived, self.layer.timeout, lambda: self.layer.unavailable("presence barrier did not return")
            )
        finally:
            self._barriers.pop(mark, None)

    async def beat(self) -> bool:
        """One heartbeat for this instance, whatever its number of entries (never asks for a re-store)."""
        await self.ensure_started()
        queue = await self.layer._confirm_outlet(f"presence {_BEAT}")
        await self._queue(queue, _BEAT, b"", key=PRESENCE_ROUTING_KEY, headers={"v": self.version})
        return False

    async def reap(self) -> list[tuple[str, str, bytes]]:
        """Drop owners silent for ``presence_timeout``; return the entries of those this instance claimed."""
        if all(owner.deadline > time.monotonic() for owner in self.owners.values()):
            return []
        # A loaded process may not yet have read the beats the broker already delivered to
        # it; judged on what it has read, a live peer looks silent and its members are
        # announced gone. Everything queued for us before the barrier is applied after it.
        await self._barrier()
        now = time.monotonic()
        left: list[tuple[str, str, bytes]] = []
        for token, owner in list(self.owners.items()):
            if owner.deadline > now:
                continue
            # A failed claim raises and keeps the owner (out of reads): the next beat retries.
            if owner.entries and await self._claim(token, owner.version):
                left.extend(
                    (group, channel, info)
                    for group, members in owner.entries.items()
                    for channel, info in members.items()
                )
            self.owners.pop(token, None)
        return left

    async def _claim(self, token: str, version: int) -> bool:
        """Win the right to announce a dead owner's leaves: exactly one live process does.

        The claim is an exclusive queue named after the owner and its last
        change: the broker lets one connection declare it and refuses the
        others (RESOURCE_LOCKED, which closes the throwaway channel used for
        it). It expires a while after every replica has dropped the owner.
        """
        import aiormq.exceptions

        layer = self.layer
        connection = layer._connection
        assert connection is not None
        name = f"{layer.queue_prefix}.prc.{token}.{version}"
        expiry = int(max(4 * layer.presence_timeout, 60) * 1000)
        channel = await layer._broker(
            self._channel, "presence claim channel", lambda: connection.channel(publisher_confirms=False)
        )
        try:
            await layer._broker(
                channel,
                "presence claim",
                lambda: channel.declare_queue(
                    name, exclusive=True, arguments={"x-expires": expiry}, robust=False
                ),
            )
        except BackendUnavailable as exc:
            if isinstance(exc.__cause__, aiormq.exceptions.ChannelLockedResource):
                return False
            raise
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    async def wipe(self) -> None:
        """Forget every entry this instance published, and tell the others (``flush``)."""
        if self._started is None:
            return
        await self.ensure_started()
        queue = await self.layer._confirm_outlet(f"presence {_SNAPSHOT}")
        self.published.clear()
        self.version += 1
        await self._queue(
            queue, _SNAPSHOT, _encode_snapshot([]), key=PRESENCE_ROUTING_KEY, headers={"v": self.version}
        )

    def close(self) -> None:
        """Fail the calls still waiting (the layer closes the connection and the queues with it)."""
        for waiter in [*self._barriers.values(), *([self._sync[3]] if self._sync else [])]:
            if not waiter.done():
                waiter.cancel()

    def _queue_of(self, token: str) -> str:
        return f"{self.layer.queue_prefix}.pr.{token}"

    # ----------------------------------------------------------- receiving

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        # Synchronous up to any publish, so replicas apply changes in arrival order.
        kind = incoming.type
        headers = incoming.headers
        token = str(headers.get("o", ""))
        if kind == _BARRIER:
            arrived = self._barriers.get(str(incoming.correlation_id))
            if arrived is not None and not arrived.done():
                arrived.set_result(None)
            return
        if token == self.token:
            return
        if kind == _ASK:
            self.layer._spawn(
                self._answer(str(incoming.reply_to), str(incoming.correlation_id)), "presence snapshot"
            )
            return
        if kind == _DROP:
            self.layer._spawn(self._drop(str(headers["g"]), str(headers["c"])), "presence drop")
            return
        owner = self.owners.get(token)
        if owner is None:
            owner = self.owners[token] = _Owner()
        owner.deadline = time.monotonic() + self.layer.presence_timeout
        version = headers.get("v")
        if not isinstance(version, int):
            return
        if kind == _SNAPSHOT:
            owner.entries = _decode_snapshot(incoming.body)
            owner.version = version
            sync = self._sync
            if sync is not None and incoming.correlation_id == sync[0]:
                sync[2].add(token)
                if len(sync[2]) >= sync[1] and not sync[3].done():
                    sync[3].set_result(None)
            return
        if kind == _BEAT:
            if version != owner.version:
                self._ask(token)
            return
        if version != owner.version + 1:
            self._ask(token)  # a change was lost: the snapshot will set things right
        owner.version = version
        group, channel = str(headers["g"]), str(headers["c"])
        if kind == _PUT:
            owner.entries.setdefault(group, {})[channel] = incoming.body
        elif kind == _REMOVE:
            members = owner.entries.get(group)
            if members is not None:
                members.pop(channel, None)
                if not members:
                    del owner.entries[group]

    def _ask(self, token: str) -> None:
        self.layer._spawn(
            self._publish(_ASK, b"", key=self._queue_of(token), exchange=False, reply_to=self.queue_name),
            "presence snapshot request",
        )

    async def _answer(self, reply_to: str, request: str) -> None:
        queue = await self.layer._confirm_outlet(f"presence {_SNAPSHOT}")
        # Taken with the version it is queued at: the changes after it follow it.
        body = _encode_snapshot(self.published.items())
        await self._queue(
            queue,
            _SNAPSHOT,
            body,
            key=reply_to,
            exchange=False,
            headers={"v": self.version},
            correlation_id=request,
        )

    async def _drop(self, group: str, channel: str) -> None:
        # Another process removed one of our entries (its leave is announced there).
        async with self.layer._presence_lock:
            self.layer._presence.remove(group, channel)
            removed = await self.remove(group, channel)
        if removed is not None:
            await removed.stored


async def _ignore(incoming: AbstractIncomingMessage) -> None:
    """The roster queue never gets messages; its consumers are only counted."""
