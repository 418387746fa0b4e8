"""Presence on NATS: entries and owner records in one JetStream stream, one message per subject.

Layout, for ``prefix="app"`` and ``stream_name="S"`` (names escaped by
:func:`~fastapi_websockets.backends.nats.subject_token`):

* stream ``S_P`` with subjects ``app.pr.>``, keeping the last message of each
  subject (``max_msgs_per_subject=1``), created on the first presence call;
* ``app.pr.e.<group>.<owner>.<channel>``: one entry, its payload the encoded
  info. The owner (the layer's ``client_token``) is part of the subject, so a
  group's entries are one subject filter (``app.pr.e.<group>.>``) and a dead
  owner's entries another (``app.pr.e.*.<owner>.*``): no index to keep;
* ``app.pr.o.<owner>``: the owner's liveness record, ``{"timeout": seconds,
  "beat": n}``. Its deadline is the server's timestamp of the message plus
  ``timeout``: every deadline is on the clock of the stream's leader.

The stream sequence of a message is its revision. A heartbeat publishes the
owner record with ``Nats-Expected-Last-Subject-Sequence`` set to its last
sequence, so a record that was claimed (or lost with the server's data) is
noticed by the owner on its next beat. A reaper claims a dead owner by
deleting the record's message by sequence: the server deletes a sequence once,
so exactly one reaper wins, and a record written again meanwhile has a new
sequence and is not touched. Deleting by sequence leaves no delete marker
behind (a KV bucket would: its stream denies message deletes).

A join or leave only changes this process's copy of a chunk under the layer's
presence lock and queues the chunk for writing: one writer task per chunk
publishes the chunk's latest state (each publish still checked against the
chunk's previous sequence) and settles every change queued before it took
them, so changes arriving while a write is under way go out together in the
next one, and joins and leaves never wait for each other's round trips.

Reads go through an ephemeral push consumer (last message per subject, no
acks, in memory, one replica) that streams every match in one go.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack

from fastapi_websockets.backends.futures import settle
from fastapi_websockets.backends.nats import (
    _EXPECTED_HEADER,
    _STREAM_NOT_FOUND,
    _WRONG_LAST_SEQUENCE,
    NATSChannelLayer,
    _error_code,
    subject_token,
    token_to_name,
)
from fastapi_websockets.backends.timeouts import within
from fastapi_websockets.exceptions import ChannelLayerClosed, ChannelLayerError
from fastapi_websockets.presence import QueuedWrite

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = ["NatsPresence"]

logger = logging.getLogger("fastapi_websockets.nats")

#: JetStream errors for a message that is not there (any more): on get, on delete. A delete
#: of one deleted already says 10057 ("no message found") for a stream's first sequence, and
#: 10043 ("sequence not found") for one within: both mean another reaper claimed it first.
_NO_MESSAGE = frozenset({10037, 10043, 10057})
#: Chunks of one owner's entries in one group: a join rewrites one chunk (1/CHUNKS of the
#: owner's entries there), and presence() reads at most CHUNKS messages per owner.
CHUNKS = 64
#: Writes of a chunk that another process changed meanwhile before giving up.
_CAS_ATTEMPTS = 5
#: Seconds the server keeps a reader's consumer should its deletion get lost.
_READER_IDLE = 5.0

#: A chunk's change waiting for its writer: the channel it stores (None for a removal)
#: and the future its caller awaits (None for a take-back nobody waits for).
_Queued = tuple["str | None", "asyncio.Future[None] | None"]


@dataclass(frozen=True)
class _Stored:
    """One message read back: its subject, sequence (revision), server time and payload."""

    subject: str
    seq: int
    stamp: float
    data: bytes


class NatsPresence:
    """The presence entries of every process, kept in a JetStream stream (see the module docs).

    One per layer, made on the layer's first presence call; it holds the
    sequences of this process's messages (to beat and leave with one checked
    write each) and an estimate of the server's clock.
    """

    def __init__(self, layer: NATSChannelLayer) -> None:
        self.layer = layer
        self.stream = f"{layer.stream_name}_P"
        self.subjects = f"{layer.prefix}.pr"
        self._owner = subject_token(layer.client_token)
        self._ready = False
        self._setup_lock = asyncio.Lock()
        #: The sequence of this process's owner record; None while it has none.
        self._owner_seq: int | None = None
        self._beats = 0
        #: (group, chunk) -> {channel: info}: this process's entries, as stored.
        self._chunks: dict[tuple[str, int], dict[str, bytes]] = {}
        #: (group, chunk) -> the stream sequence of its stored message.
        self._seqs: dict[tuple[str, int], int] = {}
        #: (group, chunk) -> changes queued for its writer, and the writer while it runs.
        self._queued: dict[tuple[str, int], list[_Queued]] = {}
        self._writers: dict[tuple[str, int], asyncio.Task[None]] = {}
        #: Server time minus local time, learnt from this process's own record.
        self._clock_offset = 0.0
        self._beat_at = 0.0

    # ------------------------------------------------------------ subjects

    def chunk_subject(self, group: str, chunk: int, owner: str | None = None) -> str:
        """The subject of one chunk of an owner's entries in ``group`` (this process's by default)."""
        return f"{self.subjects}.e.{subject_token(group)}.{owner or self._owner}.{chunk}"

    def owner_subject(self, owner: str | None = None) -> str:
        """The subject of an owner's liveness record."""
        return f"{self.subjects}.o.{owner or self._owner}"

    # --------------------------------------------------------- the template

    async def put(self, group: str, channel: str, info: bytes) -> QueuedWrite:
        """Queue this process's entry for storing; its owner record is written first when it has none.

        Called under the layer's presence lock, which is released before the
        returned write is awaited: the entry is in this process's chunk by then,
        so a change queued after it is written after (or with) it.
        """
        await self._ensure_stream()
        if self._owner_seq is None:
            # The record first: an entry is never stored where a reaper could not see its owner.
            await self._write_owner(expected=None)
        key = (group, chunk_of(channel))
        self._chunks.setdefault(key, {})[channel] = info
        done = self._queue(key, channel)
        return QueuedWrite(done if self.layer.is_local(channel) else self._joined(group, channel, done))

    async def remove(self, group: str, channel: str) -> bytes | QueuedWrite | None:
        """Remove the entry of ``channel`` (whoever owns it); its info, or None (or the queued write)."""
        await self._ensure_stream()
        key = (group, chunk_of(channel))
        info = self._chunks.get(key, {}).pop(channel, None)
        if info is not None:
            done = self._queue(key, None)
            if not self._last_entry(group, channel):
                if self.layer.is_local(channel):
                    return QueuedWrite(done, info)
                await done
            else:
                # Every chunk written before the record goes: an entry left without its
                # record would never be reaped. Awaited under the lock, so no join can
                # rely meanwhile on the record about to be deleted.
                while self._writers:
                    await asyncio.wait(set(self._writers.values()))
                await done
                await self._drop_owner()
        if info is None or not self.layer.is_local(channel):
            found = await self._remove_foreign(group, channel, keep=self._owner)
            info = info if info is not None else found
        return info

    async def read(self, group: str) -> dict[str, bytes]:
        """The entries of ``group`` whose owner is alive: ``{channel: info}``."""
        await self._ensure_stream()
        what = f"presence of {group!r}"
        chunks, owners = await asyncio.gather(
            self._scan(f"{self.subjects}.e.{subject_token(group)}.>", what),
            self._scan(f"{self.subjects}.o.*", what),
        )
        now = self._server_now(owners)
        alive = {self._owner} | {
            _last_token(record.subject) for record in owners if not _expired(record, now)
        }
        present: dict[str, bytes] = {}
        # Oldest first: should two owners hold one channel, the newer write wins.
        for chunk in sorted(chunks, key=lambda chunk: chunk.seq):
            if chunk.subject.rsplit(".", 2)[1] in alive:
                present.update(_decode(chunk.data))
        return present

    async def beat(self) -> bool:
        """Refresh this process's record (one write); True if it was gone (claimed, or lost)."""
        await self._ensure_stream()
        lost = self._owner_seq is None or not await self._write_owner(expected=self._owner_seq)
        if lost:
            await self._write_owner(expected=None)
            # The base class stores every entry again.
            self._chunks.clear()
            self._seqs.clear()
        return lost

    async def reap(self) -> list[tuple[str, str, bytes]]:
        """Claim the records of dead owners, remove their entries, return them."""
        if not self._ready:
            return []  # no stream made by this layer yet: it has seen no presence
        what = "presence reaping"
        owners = await self._scan(f"{self.subjects}.o.*", what)
        now = self._server_now(owners)
        dead = [record for record in owners if _last_token(record.subject) != self._owner]
        dead = [record for record in dead if _expired(record, now)]
        claimed = await asyncio.gather(*(self._delete(record.seq, what) for record in dead))
        gone = []
        for record, won in zip(dead, claimed, strict=True):
            if not won:
                continue  # another process claimed it, or it beat again
            owner = _last_token(record.subject)
            logger.info("presence: process %s stopped answering; removing its entries", owner)
            chunks = await self._scan(f"{self.subjects}.e.*.{owner}.*", what)
            removed = await asyncio.gather(*(self._delete(chunk.seq, what) for chunk in chunks))
            for chunk, done in zip(chunks, removed, strict=True):
                if done:
                    group = token_to_name(chunk.subject.rsplit(".", 3)[1])
                    gone += [(group, channel, info) for channel, info in _decode(chunk.data).items()]
        return gone

    async def flush(self) -> None:
        """Purge every entry and record (a stream that does not exist is fine)."""
        try:
            await self.layer._retry("flush", lambda: self.layer.js.purge_stream(self.stream))
        except ChannelLayerError as exc:
            if _error_code(exc) != _STREAM_NOT_FOUND:
                raise
        self._owner_seq = None
        self._chunks.clear()
        self._seqs.clear()

    # -------------------------------------------------------------- writers

    def _queue(
        self, key: tuple[str, int], joining: str | None, *, waited: bool = True
    ) -> asyncio.Future[None]:
        """Queue chunk ``key`` for writing as it will be then; the future settles once it is."""
        done = asyncio.get_running_loop().create_future()
        self._queued.setdefault(key, []).append((joining, done if waited else None))
        if key not in self._writers:
            self._writers[key] = self.layer.tasks.spawn(self._write_queued(key), "presence writer")
        return done

    async def _write_queued(self, key: tuple[str, int]) -> None:
        """Write chunk ``key`` until nothing is queued for it; settle each change written."""
        group = key[0]
        try:
            while queued := self._queued.pop(key, None):
                joining = {channel for channel, _ in queued if channel is not None}
                what = f"presence_join in {group!r}" if joining else f"presence_leave in {group!r}"
                try:
                    await self._write_chunk(key, joining, what)
                except asyncio.CancelledError:
                    # The layer is closing: fail this write's changes and those queued behind it.
                    for _, done in queued + self._queued.pop(key, []):
                        settle(done, ChannelLayerClosed("the channel layer was closed"))
                    raise
                except Exception as exc:
                    if all(done is None for _, done in queued):
                        logger.warning("could not write presence in %r again: %s", group, exc)
                    else:
                        # The stored chunk may still hold what failed (a removal, or a join
                        # its caller saw fail and the layer took back), or lack a restored
                        # entry: written once more, as it is then. Not retried again.
                        self._queued.setdefault(key, []).append((None, None))
                    for _, done in queued:
                        settle(done, exc)
                else:
                    for _, done in queued:
                        settle(done, None)
        finally:
            del self._writers[key]

    async def _joined(self, group: str, channel: str, done: asyncio.Future[None]) -> None:
        await done
        # Another process may hold this channel's entry: one entry per channel and group.
        await self._remove_foreign(group, channel, keep=self._owner)

    def take_back(self, group: str, channel: str) -> None:
        """Queue this process's chunk holding ``channel`` without it, behind its writes queued before."""
        key = (group, chunk_of(channel))
        if self._chunks.get(key, {}).pop(channel, None) is not None:
            self._queue(key, None, waited=False)

    # -------------------------------------------------------------- helpers

    def _last_entry(self, group: str, channel: str) -> bool:
        """Whether ``channel`` in ``group`` is the last entry this layer owns."""
        local = self.layer._presence
        channels = local.channels(group)
        if len(channels) > 1 or (channels and channel not in channels):
            return False
        return len(local.items()) <= 1

    async def _write_owner(self, *, expected: int | None) -> bool:
        """Publish this process's record; False if ``expected`` is not its last sequence."""
        self._beats += 1
        payload = json.dumps({"timeout": self.layer.presence_timeout, "beat": self._beats}).encode()
        subject = self.owner_subject()
        headers = None if expected is None else {_EXPECTED_HEADER: str(expected)}
        try:
            seq = await self._publish(subject, payload, "presence heartbeat", headers)
        except ChannelLayerError as exc:
            if _error_code(exc) not in _WRONG_LAST_SEQUENCE:
                raise
            # Claimed by a reaper, lost with the server's data, or stored by an
            # earlier attempt whose acknowledgement was lost: only the last is ours.
            current = await self._last(subject)
            if current is None or current.data != payload:
                return False
            seq = current.seq
        self._owner_seq = seq
        self._beat_at = time.time()
        return True

    async def _drop_owner(self) -> None:
        seq, self._owner_seq = self._owner_seq, None
        if seq is not None:
            await self._delete(seq, "presence_leave")

    async def _write_chunk(self, key: tuple[str, int], adding: Collection[str], what: str) -> None:
        """Store this process's chunk ``key`` as it is now (delete it when empty).

        The write expects the sequence this process stored last: if another
        process removed one of its entries meanwhile (a ``presence_leave`` of
        a channel this process joined), the chunk is re-read and that removal
        kept, so it is not undone (the channels in ``adding``, and those of
        joins queued since, are kept: they are being joined).
        """
        group, chunk = key
        subject = self.chunk_subject(group, chunk)
        for _ in range(_CAS_ATTEMPTS):
            entries = self._chunks.get(key, {})
            seq = self._seqs.get(key, 0)
            if not entries:
                self._chunks.pop(key, None)
                self._seqs.pop(key, None)
                if seq:
                    await self._delete(seq, what)
                return
            headers = {_EXPECTED_HEADER: str(seq)}
            try:
                self._seqs[key] = await self._publish(subject, _encode(entries), what, headers)
                return
            except ChannelLayerError as exc:
                if _error_code(exc) not in _WRONG_LAST_SEQUENCE:
                    raise
            stored = await self._last(subject)
            kept = _decode(stored.data) if stored is not None else {}
            joining = {channel for channel, _ in self._queued.get(key, ()) if channel is not None}
            self._chunks[key] = {
                channel: info
                for channel, info in entries.items()
                if channel in kept or channel in adding or channel in joining
            }
            self._seqs[key] = stored.seq if stored is not None else 0
        raise self.layer.unavailable(
            f"{what}: other writers kept changing the entries for {self.layer.timeout} s"
        )

    async def _remove_foreign(self, group: str, channel: str, keep: str) -> bytes | None:
        """Remove ``channel`` from other owners' chunks of ``group``; the newest info it had."""
        what = f"presence_leave in {group!r}"
        found = await self._scan(f"{self.subjects}.e.{subject_token(group)}.*.{chunk_of(channel)}", what)
        info: bytes | None = None
        for stored in sorted(found, key=lambda stored: stored.seq):
            if stored.subject.rsplit(".", 2)[1] == keep:
                continue
            entries = _decode(stored.data)
            if channel not in entries:
                continue
            info = entries.pop(channel)
            # Checked against the sequence read: a chunk its owner rewrote meanwhile is left
            # alone (the owner's newer write wins), as is one a reaper removed.
            if not entries:
                await self._delete(stored.seq, what)
                continue
            try:
                await self._publish(
                    stored.subject, _encode(entries), what, {_EXPECTED_HEADER: str(stored.seq)}
                )
            except ChannelLayerError as exc:
                if _error_code(exc) not in _WRONG_LAST_SEQUENCE:
                    raise
        return info

    def _server_now(self, owners: list[_Stored]) -> float:
        """The server's clock now, from the stamp of this process's last beat (else the last estimate)."""
        for record in owners:
            if record.seq == self._owner_seq:
                self._clock_offset = record.stamp - self._beat_at
        return time.time() + self._clock_offset

    async def _ensure_stream(self) -> None:
        if self._ready:
            return
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

        async with self._setup_lock:
            if self._ready:
                return
            wanted = f"{self.subjects}.>"
            config = StreamConfig(
                name=self.stream,
                description="fastapi-websockets presence: entries and owner liveness records",
                subjects=[wanted],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_msgs_per_subject=1,
                storage=StorageType.FILE,
                num_replicas=self.layer.replicas,
            )
            await self.layer._stream_with(config, "presence stream")
            self._ready = True

    async def _recover(self) -> None:
        self._ready = False
        await self._ensure_stream()

    async def _publish(
        self, subject: str, payload: bytes, what: str, headers: dict[str, str] | None = None
    ) -> int:
        js = self.layer.js
        ack = await self.layer._retry(
            what,
            lambda: js.publish(subject, payload, stream=self.stream, headers=dict(headers or {})),
            self._recover,
        )
        return ack.seq

    async def _delete(self, seq: int, what: str) -> bool:
        """Delete one message by sequence; False if it is gone already (someone else was first)."""
        # nats-py's delete_msg erases the bytes first, ten times slower on a file
        # store; entries hold nothing secret, so they are only removed.
        api = f"STREAM.MSG.DELETE.{self.stream}"

        async def call() -> bool:
            reply = await self.layer._js_request(api, {"seq": seq, "no_erase": True})
            return bool(reply.get("success"))

        try:
            return await self.layer._retry(what, call)
        except ChannelLayerError as exc:
            if _error_code(exc) in _NO_MESSAGE or _error_code(exc) == _STREAM_NOT_FOUND:
                return False
            raise

    async def _last(self, subject: str) -> _Stored | None:
        try:
            raw = await self.layer._retry(
                "presence heartbeat", lambda: self.layer.js.get_last_msg(self.stream, subject)
            )
        except ChannelLayerError as exc:
            if _error_code(exc) in _NO_MESSAGE or _error_code(exc) == _STREAM_NOT_FOUND:
                return None
            raise
        return _Stored(subject, raw.seq or 0, 0.0, raw.data or b"")

    async def _scan(self, subjects: str, what: str) -> list[_Stored]:
        """The last message of every subject matching ``subjects``, in one consumer's push."""
        layer = self.layer
        found: list[_Stored] = []
        complete: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def collect(msg: Msg) -> None:
            metadata = msg.metadata
            found.append(
                _Stored(msg.subject, metadata.sequence.stream, metadata.timestamp.timestamp(), msg.data)
            )
            if not metadata.num_pending and not complete.done():
                complete.set_result(None)

        reader = layer._stream_reader(
            self.stream,
            subjects,
            kind="presence",
            what=what,
            idle=_READER_IDLE,
            add=lambda config: layer._retry(
                what, lambda: layer.js.add_consumer(self.stream, config), self._recover
            ),
            last_per_subject=True,
            cb=collect,
        )
        async with reader as (_, info):
            if info.num_pending or found:
                await within(
                    complete,
                    layer.timeout,
                    lambda: layer.unavailable(f"{what}: entries still arriving after {layer.timeout} s"),
                )
        return found


def chunk_of(channel: str) -> int:
    """The chunk of an owner's entries in a group that holds ``channel`` (the same in every process)."""
    return zlib.crc32(channel.encode()) % CHUNKS


def _encode(entries: dict[str, bytes]) -> bytes:
    packed: bytes = msgpack.packb(entries, use_bin_type=True)
    return packed


def _decode(data: bytes) -> dict[str, bytes]:
    try:
        entries = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException):
        entries = None
    if not isinstance(entries, dict):
        logger.warning("skipped a presence chunk that is not a map (only the layer may publish there)")
        return {}
    return {channel: info for channel, info in entries.items() if isinstance(info, bytes)}


def _last_token(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def _expired(record: _Stored, now: float) -> bool:
    """Whether an owner record's deadline (its server stamp plus its timeout) has passed."""
    try:
        timeout = float(json.loads(record.data)["timeout"])
    except (ValueError, KeyError, TypeError):
        return True  # not a record this layer wrote
    return record.stamp + timeout < now
