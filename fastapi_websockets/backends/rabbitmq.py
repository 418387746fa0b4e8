"""The RabbitMQ backend (aio-pika): one push-consumed inbox per layer, fan-out by bindings.

Broker topology for one layer instance (``P`` = ``queue_prefix``, ``X`` =
``exchange_name``, a durable direct exchange):

* **Inbox**: one classic queue ``P.p.<token>`` bound to ``X`` with routing
  key ``p.<token>``. Every message for this instance's process-specific
  channels arrives there (the channel name in a header; concurrent sends
  from one process packed into one message, see ``packing``) and is
  demultiplexed into local mailboxes. It is consumed by push with a
  prefetch window; nothing polls. It is neither exclusive nor auto-deleted, and durable with
  ``durable``: it and its bindings outlive a dropped connection and a broker
  restart, so what is sent while this instance reconnects waits for it. A
  dead process's inbox goes away ``inbox_expiry`` ms after its last consumer
  (``x-expires``); ``close()`` deletes it at once.
* **Groups**: the inbox is bound to ``X`` with the group's routing key while
  at least one local channel is a member (bound on the first join, unbound
  after the last leaves), so ``group_send`` is one publish and the broker
  delivers one copy per process that has members. The sender's own members
  get the message from the sender once the publish is on the socket; the copy
  the broker routes back to its inbox (marked with its token) is skipped.
* **Named channels** (no ``!``): one queue each, ``P.c.<name>``, a durable
  quorum queue (a classic queue with ``durable=False``) bounded by
  ``x-max-length`` with ``reject-publish``, so the publisher confirm of a send
  to a full channel is a nack and surfaces as ``ChannelFull``. While receivers
  wait on a named channel, this instance holds one consumer on it, whatever
  their number. A named channel in a group is a binding of its queue on the
  group's routing key: that membership lives in the broker.
* **History** (groups matching the ``history`` option only): one stream
  queue per group, ``P.h.<group>``, holding the stored messages and the
  marks and epoch proposals that let a reader find the stream's end (AMQP
  0.9.1 cannot ask a stream for it). A message's offset is its stream offset
  plus one. This instance's consumer on the stream ("tap", from ``next``)
  sees every entry written after it started, with the ``x-stream-offset``
  header: it reports the offsets of what this instance writes, and it
  delivers the stored messages to the group's local members (the inbox is
  never bound to a history group). So a history ``group_send`` is one
  confirmed stream write, plus a publish on the group's routing key only
  when named channels may be members. The tap also keeps the newest stored
  messages it saw, so a read (a mark written, then seen by the tap) is
  answered without reading the stream back whenever they reach far enough.
  Since the tap and the inbox are two queues, an inbox message published
  shortly after history writes names them (``_AFTER``), and an instance with
  members of those groups holds it until its tap has delivered them
  (``_HeldInbox``): a send awaited after a ``group_send`` stays after it.

Every publish waits for its publisher confirm, at most ``timeout`` seconds;
concurrent publishes share socket writes and wait for their confirms together
(``rabbitmq_wire``). The connection is aio-pika's robust connection: after a
broker restart or a dropped connection it declares the exchange and the inbox
again (a no-op when the broker kept them) and restores the inbox's bindings,
while waiting ``receive()`` calls keep waiting. The inbox consumer (on aiormq's
channel, below aio-pika) and the named-channel consumers are restarted by this
module instead, each in a supervised task with bounded
RPCs: a quorum queue that does not answer (RabbitMQ 3.10 after a crash) must
not stall the whole connection's recovery. Calls made while the broker is
unreachable, and RPCs it does not answer, raise ``BackendUnavailable`` after
``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.backoff import Backoff
from fastapi_websockets.backends.base import missing_driver
from fastapi_websockets.backends.broker import BrokerChannelLayer
from fastapi_websockets.backends.locks import KeyedLocks
from fastapi_websockets.backends.options import (
    MAX_MILLISECONDS,
    Memo,
    flag,
    matching,
    optional_positive_int,
    positive,
    positive_int,
)
from fastapi_websockets.backends.options import url as url_option
from fastapi_websockets.backends.packing import Packer, describe, pack
from fastapi_websockets.backends.rabbitmq_presence import RabbitPresence
from fastapi_websockets.backends.timeouts import within
from fastapi_websockets.backends.tls import client_context, require_secure
from fastapi_websockets.backends.urls import user_of
from fastapi_websockets.backends.waiters import WaiterQueue
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelFull,
    ChannelLayerClosed,
    ChannelLayerError,
    InvalidChannelLayerConfig,
)
from fastapi_websockets.history import (
    POSITION_KEY,
    HistoryPolicy,
    HistorySlice,
    StreamPosition,
    new_epoch,
)
from fastapi_websockets.names import is_process_specific, new_token, process_token
from fastapi_websockets.presence import QueuedWrite
from fastapi_websockets.types import Message

if TYPE_CHECKING:
    import aiormq
    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractRobustChannel,
        AbstractRobustConnection,
        AbstractRobustExchange,
        AbstractRobustQueue,
    )

    from fastapi_websockets.backends.rabbitmq_wire import BatchedAcks, ConfirmingPublisher, Refusal

    #: What a named-channel consumer holds for its receivers: deliveries not acked yet.
    _Held = AbstractIncomingMessage

__all__ = ["RabbitMQChannelLayer", "group_routing_key", "history_stream_name", "named_queue_name"]

logger = logging.getLogger("fastapi_websockets.rabbitmq")

T = TypeVar("T")

#: Queues one publish on the confirm channel at once; the coroutine waits for its confirm.
PublishQueue = Callable[..., Coroutine[Any, Any, None]]

#: AMQP queue names, exchange names and routing keys are short strings: at most 255 bytes.
MAX_AMQP_NAME = 255
#: Unacknowledged messages the broker may push to the inbox before we ack.
INBOX_PREFETCH = 1000
#: Unacknowledged messages per named-channel consumer: small, so that an
#: instance holds few jobs that receivers elsewhere could take.
NAMED_PREFETCH = 10
#: Seconds a named-channel consumer stays after its last waiting receiver left,
#: so a receive loop does not cost one basic.consume/basic.cancel per message.
NAMED_LINGER = 1.0
#: Named queues remembered as declared (sends skip the declare for those).
DECLARED_CACHE_SIZE = 10_000
#: Seconds between reconnect attempts of the robust connection. aio-pika's
#: reconnect loop (which also restores channels, queues, bindings and
#: consumers) takes one fixed interval, so the shared Backoff cannot drive it.
RECONNECT_INTERVAL = 1.0
#: Message ids of the last inbox deliveries remembered, so that a message
#: redelivered after a dropped connection (its ack was lost) is not handed out
#: twice. More than the prefetch window: only unacked deliveries come back.
RECENT_IDS = 4 * INBOX_PREFETCH
#: Unacknowledged deliveries per history stream consumer (stream consumers need a prefetch).
HISTORY_PREFETCH = 1000
#: Segment size of history streams: retention (``x-max-age``) drops whole
#: segments, so small ones keep what the broker holds close to the ttl.
HISTORY_SEGMENT_BYTES = 1_000_000

_IDENTIFIER_RULE = (
    "1 to {} characters of letters, digits and '.', '_', ':', '-', "
    "starting with a letter or digit and not with 'amq.' (reserved)"
)
_EXCHANGE_NAME = re.compile(r"(?!amq\.)[A-Za-z0-9][A-Za-z0-9._:-]{0,126}")
_QUEUE_PREFIX = re.compile(r"(?!amq\.)[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
_QUEUE_SAFE = re.compile(r"[A-Za-z0-9._:@,/-]")
_HASH_CHARS = 40

# Message kinds, in the AMQP ``type`` property of what we publish.
_SEND = "send"
#: Several sends to this inbox's channels in one message (``packing.pack``).
_SENDS = "sends"
_GROUP = "group"
_ADD = "group_add"
_DISCARD = "group_discard"
_REPLY = "reply"
# Kinds of history stream entries: a stored message, a reader's mark (where
# the stream ended when it read), a writer's epoch proposal, a named channel
# that joined the group (so that taps learn the group has named members).
_STORED = "h"
_MARK = "m"
_PROPOSAL = "e"
_NAMED = "n"
#: A layer event (presence) for the members of a history group: in the stream, never in a page.
_EVENT = "v"
#: Published on a history group's routing key to learn whether named channels are bound to it.
_PROBE = "probe"
#: Header of inbox messages (sends, packed sends, group messages) made shortly after history
#: writes: "offset epoch group" for the sender's last write to each group, space-separated
#: (group names hold no whitespace). One string: as nested arrays, pamqp's encoding and
#: decoding made a send naming 8 writes cost 70 % more bytecodes than a plain one.
_AFTER = "after"
#: Inbox message kinds that may wait for a history tap (see _HeldInbox); the others never do.
_MESSAGES = frozenset((_SEND, _SENDS, _GROUP))
#: History groups whose last write an inbox message carries at most: the newest.
AFTER_GROUPS = 8
#: Inbox messages held back for a history tap at most: past it, the oldest is delivered at once.
HELD_LIMIT = INBOX_PREFETCH


# ------------------------------------------------------------------- names


def _hashed(name: str, head: str, budget: int) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    room = max(budget - 1 - _HASH_CHARS, 0)
    return f"{head.encode()[:room].decode('utf-8', errors='ignore')}#{digest}"


def _escape(name: str) -> str:
    # AMQP clients (pamqp) accept only [A-Za-z0-9-_.:@#,/+ ] in queue names.
    # Every other byte, and '+' and '#' themselves, become '+XX', so the escape
    # is reversible and the plain form never holds '#'.
    return "".join(
        char if _QUEUE_SAFE.fullmatch(char) else "".join(f"+{byte:02X}" for byte in char.encode())
        for char in name
    )


def _queue_name(head: str, name: str) -> str:
    escaped = _escape(name)
    if len(head) + len(escaped) <= MAX_AMQP_NAME:
        return head + escaped
    return head + _hashed(name, escaped, MAX_AMQP_NAME - len(head))


def named_queue_name(queue_prefix: str, channel: str) -> str:
    """The queue that stores named channel ``channel``: escaped, at most 255 bytes.

    Names whose escaped form is too long keep a readable head and end in
    ``#`` and a hash of the whole name; plain forms never contain ``#``, so
    distinct channels never share a queue.
    """
    return _queue_name(f"{queue_prefix}.c.", channel)


def history_stream_name(queue_prefix: str, group: str) -> str:
    """The stream queue that keeps the history of ``group`` (escaped like named queues)."""
    return _queue_name(f"{queue_prefix}.h.", group)


def group_routing_key(group: str) -> str:
    """The routing key on which the members of ``group`` are bound (at most 255 bytes).

    Routing keys may hold any UTF-8, so only the length needs care: a key
    that would be too long is ``g#`` plus a readable head and a hash.
    """
    plain = f"g.{group}"
    if len(plain.encode()) <= MAX_AMQP_NAME:
        return plain
    return "g#" + _hashed(group, group, MAX_AMQP_NAME - 2)


def _inbox_routing_key(token: str) -> str:
    return f"p.{token}"


def _inbox_key_of(channel: str) -> str | None:
    # The routing key of the inbox a process-specific channel lives in; None for a named channel.
    return _inbox_routing_key(process_token(channel)) if is_process_specific(channel) else None


# ------------------------------------------------------------ named readers


class _Reader:
    """This instance's consumer on one named channel, shared by all its receivers."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.lock = asyncio.Lock()
        self.queue: AbstractRobustQueue | None = None
        self.tag: str | None = None
        #: Receivers currently inside ``_receive_remote`` for this channel.
        self.users = 0
        #: Deliveries that arrived while no receiver waited, oldest first.
        self.held: deque[_Held] = deque()
        self.waiters: WaiterQueue[_Held] = WaiterQueue(self.put_back)
        self.linger: asyncio.TimerHandle | None = None
        self.starting: asyncio.Task[None] | None = None
        #: A supervised restart of the consumer is under way.
        self.reviving = False

    def offer(self, item: _Held) -> None:
        """A new delivery: to the longest-waiting receiver, else held in arrival order."""
        if not self.waiters.hand_over(item):
            self.held.append(item)

    def put_back(self, item: _Held) -> None:
        """An item a receiver will not take after all: to the next receiver, else first in line."""
        if not self.waiters.hand_over(item):
            self.held.appendleft(item)

    async def next(self) -> _Held:
        """The oldest held item, or the next delivery."""
        return self.held.popleft() if self.held else await self.waiters.wait()


class _RecentIds:
    """The last ``size`` message ids seen, to drop redelivered duplicates."""

    def __init__(self, size: int) -> None:
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._size = size

    def first_time(self, message_id: str) -> bool:
        """Remember ``message_id``; False if it was seen already."""
        if message_id in self._ids:
            return False
        self._ids.add(message_id)
        self._order.append(message_id)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        return True


# ---------------------------------------------------------------- history


@dataclass
class _Entry:
    """One entry of a history stream, as a reader saw it."""

    offset: int  # the stream's own offset (a message's position offset is this plus one)
    kind: str
    epoch: str
    written: float  # the writer's wall clock in seconds, for the ttl
    body: bytes


def _entry(incoming: AbstractIncomingMessage) -> _Entry:
    """A stream delivery as a history entry."""
    written = incoming.headers.get("t")
    return _Entry(
        _stream_offset(incoming),
        str(incoming.type),
        str(incoming.headers.get("e", "")),
        written / 1000 if isinstance(written, int) else 0.0,
        incoming.body,
    )


class _Once:
    """Calls ``action`` the first time it is called, and never again."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action

    def __call__(self) -> None:
        action, self.action = self.action, None
        if action is not None:
            action()


@dataclass
class _HistoryStream:
    """This instance's handle on one group's history stream and its tap consumer.

    The tap reports the offsets of this instance's writes and delivers every
    stored message to the group's local members.
    """

    group: str
    name: str
    queue: AbstractRobustQueue
    tag: str
    epoch: str = ""
    #: message_id -> future of the stream offset the tap sees it at.
    pending: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    #: The highest stream offset the tap has handled (-1: none yet).
    seen: int = -1
    #: Whether named channels may be members (bound on the group's routing key).
    named: bool = False
    #: Opened (or kept) for local members: closed again when the last one leaves.
    #: A tap only writes and reads use stays for the layer's lifetime.
    for_members: bool = False
    #: No longer the group's tap (forgotten, stopped or replaced): it delivers nothing.
    #: Not "absent from _streams": a tap delivers from consume-ok on, before it is listed.
    retired: bool = False
    #: How many stored entries a read needs: the policy's size plus one,
    #: which tells whether anything older was trimmed by size.
    keep: int = 1
    #: The stored entries the tap handled, oldest first: every stored entry
    #: with a stream offset from ``covered`` to ``seen``, the newest ``2 * keep``.
    #: Twice what a read needs: a read's mark is followed by the messages
    #: written concurrently (up to ``keep`` of them are fine), and a read
    #: that finds fewer than ``keep`` below its mark must scan the stream.
    #: The broker's own entries as the tap saw them in order, not a second
    #: store: it dies with the tap (a new tap is a new handle).
    recent: deque[_Entry] = field(default_factory=deque)
    #: The stream offset from which ``recent`` holds every stored entry (-1: the tap saw nothing yet).
    covered: int = -1
    #: One scan at a time: reads that arrive meanwhile are answered from what it seeds.
    scanning: asyncio.Lock = field(default_factory=asyncio.Lock)

    def remember(self, entry: _Entry) -> None:
        """Keep a stored entry the tap handled, trimming ``recent`` to ``2 * keep`` entries."""
        self.recent.append(entry)
        if len(self.recent) > 2 * self.keep:
            self.recent.popleft()
            self.covered = self.recent[0].offset

    def seed(self, entries: list[_Entry]) -> None:
        """Prepend what a scan read back: every entry from ``entries[0]`` up to where the tap began."""
        room = 2 * self.keep - len(self.recent)
        if not entries or self.retired or self.covered < 0 or room <= 0:
            # Not trimmed yet (room left), so `covered` is still where
            # the tap began, at or below the scan's end: the two runs join.
            return
        older = [entry for entry in entries if entry.kind == _STORED and entry.offset < self.covered]
        self.recent.extendleft(reversed(older[-room:]))
        self.covered = self.recent[0].offset if len(older) >= room else entries[0].offset

    def stored_up_to(self, last: int, after: int) -> list[_Entry] | None:
        """The stored entries a read up to stream offset ``last`` needs, if ``recent`` holds them all.

        Enough are the ones after position ``after`` (a page never holds older
        ones) plus the newest stored one (it gives the page's position), or
        more than the size (older ones are trimmed by size whatever they are);
        otherwise None, and the read scans the stream.
        """
        if self.retired or self.covered < 0 or self.seen < last:
            return None
        stored = [entry for entry in self.recent if entry.offset <= last]
        if len(stored) >= self.keep:
            return stored[-self.keep :]
        # Position `after` is stream offset `after - 1`: held when it is stored
        # and at or above `covered`; an empty run is the newest only from the stream's start.
        if self.covered <= after and (stored or self.covered == 0):
            return stored
        return None

    def fail(self, error: BaseException) -> None:
        """Retire the tap and fail every write still waiting for its offset."""
        self.retired = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()


def _now_ms() -> int:
    # An int: pamqp sends a Python float header as a 32-bit float, which
    # rounds today's Unix time to minutes.
    return int(time.time() * 1000)


class _StreamGone(BackendUnavailable):
    """A history stream was deleted (flushed, or out of band) since this instance opened it."""


def _stream_offset(incoming: AbstractIncomingMessage) -> int:
    offset = incoming.headers.get("x-stream-offset")
    if not isinstance(offset, int):
        # Only a stream queue sets it; without it the offset is unknowable.
        raise TypeError(f"a history stream delivery has no integer x-stream-offset: {offset!r}")
    return offset


#: (group, stream offset, epoch): a history write an inbox message must not overtake.
_Write = tuple[str, int, str]


def _writes(value: object) -> list[_Write]:
    """The writes an ``after`` header names; a garbled header names none (nothing waits for it)."""
    if not isinstance(value, str):
        return []
    parts = value.split(" ")
    if len(parts) % 3:
        return []
    try:
        return [(parts[at + 2], int(parts[at]), parts[at + 1]) for at in range(0, len(parts), 3)]
    except ValueError:
        return []


@dataclass
class _HeldMessage:
    properties: Any
    body: bytes
    writes: list[_Write]
    deadline: float  # loop time


class _HeldInbox:
    """Inbox messages held back until this instance's history taps have delivered what they follow.

    A message sent after a history ``group_send`` names that write (group,
    stream offset, epoch); members here get the group's message from the
    group's tap, which may lag behind the inbox, so the message waits until
    ``caught_up`` says the tap is past the write. Messages that arrive while
    one waits queue behind it, which keeps the inbox's order. A hold never
    becomes a loss: after ``wait`` seconds, or past ``limit`` held messages,
    the oldest is delivered anyway with a warning; :meth:`release` with
    ``everything`` delivers them all at once (flush), and :meth:`close` drops
    them with the layer's mailboxes.
    """

    def __init__(
        self,
        caught_up: Callable[[str, int, str], bool],
        dispatch: Callable[[Any, bytes], None],
        wait: float,
        limit: int,
    ) -> None:
        self._caught_up = caught_up
        self._dispatch = dispatch
        self._wait = wait
        self._limit = limit
        #: What waits, oldest first (a plain deque: the inbox checks it for every delivery).
        self.messages: deque[_HeldMessage] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: A hold ended early since the queue was last empty: one warning per such episode.
        self._warned = False

    def offer(self, properties: Any, body: bytes) -> bool:
        """Hold an inbox message if it must wait; False if the caller dispatches it now."""
        headers = properties.headers or {}
        writes = _writes(headers.get(_AFTER))
        if self._closed or (not self.messages and all(self._caught_up(*write) for write in writes)):
            return False
        loop = running_loop()
        self.messages.append(_HeldMessage(properties, body, writes, loop.time() + self._wait))
        self.release()
        return True

    def release(self, *, everything: bool = False) -> None:
        """Dispatch the held messages, oldest first, up to the first that must still wait."""
        loop = running_loop()
        now = loop.time()
        queue = self.messages
        while queue:
            head = queue[0]
            behind = [write for write in head.writes if not self._caught_up(*write)]
            over = len(queue) > self._limit
            if behind and not everything and not over and head.deadline > now:
                break
            queue.popleft()
            if behind and not everything and not self._warned:
                self._warned = True
                group, offset, _ = behind[0]
                logger.warning(
                    "delivered an inbox message before the history of group %r reached stream offset %d "
                    "here (%s): it was sent after that write, and members may get the group's message "
                    "after it (not logged again until no message waits)",
                    group,
                    offset,
                    f"more than {self._limit} messages held" if over else f"held for {self._wait:g} s",
                )
            self._dispatch(head.properties, head.body)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if queue:
            self._timer = loop.call_at(queue[0].deadline, self.release)
        else:
            self._warned = False

    def close(self) -> None:
        """Drop what is held, as the layer's close drops its mailboxes, and hold nothing from now on."""
        self._closed = True
        self.messages.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# ------------------------------------------------------------------ layer


class RabbitMQChannelLayer(BrokerChannelLayer):
    """A channel layer on RabbitMQ through aio-pika (``pip install "fastapi-websockets[rabbitmq]"``).

    Options (keyword-only; plus the base options such as ``capacity``,
    ``channel_expiry`` and ``group_expiry``):

    * ``url``: AMQP URL of the broker.
    * ``exchange_name``: the direct exchange all routing goes through.
    * ``queue_prefix``: prefix of every queue name this layer declares.
    * ``durable``: durable exchange and inboxes, named channels as durable
      quorum queues, persistent messages (``False``: transient classic queues,
      which a broker restart loses).
    * ``persistent_sends``: with ``durable``, sends to process-specific channels
      are persistent, so one waiting in the inbox of a process that is away
      survives a broker restart. ``False`` publishes them transient: faster
      point to point (the broker then confirms without first writing and
      syncing its queue journal), and such a restart loses what waited in an
      inbox.
    * ``message_ttl``: ``x-message-ttl`` of the queues, in ms (``None``: no
      queue-level TTL; every message still expires after ``channel_expiry``).
    * ``queue_expiry``: ``x-expires`` of named-channel queues, in ms: a queue
      nobody consumed or declared for that long is deleted with its messages
      and bindings (``None``: never).
    * ``inbox_expiry``: ``x-expires`` of this instance's inbox, in ms: how long
      it keeps messages (and group bindings) for a process that lost its
      connection before the broker deletes it as the queue of a dead process.
    * ``poll_interval``: accepted for compatibility with 0.1.0; nothing polls.
    * ``timeout`` (from :class:`BrokerChannelLayer`): seconds a call waits for
      an unreachable broker before raising ``BackendUnavailable``.
    """

    backend_name = "rabbitmq"
    #: Marks and epoch proposals share the stream with the stored messages, so
    #: history offsets are strictly increasing but have gaps.
    contiguous_history_offsets = False
    broker_label = "RabbitMQ"
    default_port = 5672

    def __init__(
        self,
        *,
        url: str = "amqp://guest:guest@localhost:5672//",
        exchange_name: str = "fastapi_websockets",
        queue_prefix: str = "fastapi-websockets",
        durable: bool = True,
        message_ttl: int | None = 60000,
        queue_expiry: int | None = 300000,
        inbox_expiry: int = 300000,
        persistent_sends: bool = True,
        poll_interval: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        # Checked here, port included: aio-pika would raise a bare ValueError on first use.
        scheme = url_option("url", url, ("amqp", "amqps")).scheme
        self.url = url
        self.set_location(url)
        if self.tls_ca_file is not None:
            require_secure("url", url, scheme == "amqps", "an amqps:// url")
        self.exchange_name = matching(
            "exchange_name", exchange_name, _EXCHANGE_NAME, _IDENTIFIER_RULE.format(127)
        )
        self.queue_prefix = matching(
            "queue_prefix", queue_prefix, _QUEUE_PREFIX, _IDENTIFIER_RULE.format(100)
        )
        self.durable = flag("durable", durable)
        self.persistent_sends = flag("persistent_sends", persistent_sends)
        # Transient queues lose every message on a restart: persistence buys nothing there.
        self._persistent_sends = self.durable and self.persistent_sends
        self.message_ttl = optional_positive_int("message_ttl", message_ttl, "milliseconds", MAX_MILLISECONDS)
        self.queue_expiry = optional_positive_int(
            "queue_expiry", queue_expiry, "milliseconds", MAX_MILLISECONDS
        )
        self.inbox_expiry = positive_int("inbox_expiry", inbox_expiry, "milliseconds", MAX_MILLISECONDS)
        self.poll_interval = positive("poll_interval", poll_interval, "seconds")
        #: Name of this instance's inbox queue.
        self.inbox_name = f"{self.queue_prefix}.p.{self.client_token}"

        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None  # publishes, inbox, inbox bindings
        self._declare_channel: AbstractRobustChannel | None = None  # named queues and their bindings
        self._reader_channel: AbstractRobustChannel | None = None  # named-channel consumers
        self._exchange: AbstractRobustExchange | None = None
        self._inbox: AbstractRobustQueue | None = None
        # Named queues by name, so that sends skip the declare.
        self._declared: Memo[str, AbstractRobustQueue] = Memo(size=DECLARED_CACHE_SIZE)
        #: Named queues found with other arguments than this layer's, used as they are (see
        #: _declare_named); forgotten once a declare with this layer's arguments works again.
        self._as_is: Memo[str, bool] = Memo(size=DECLARED_CACHE_SIZE)
        # The owner's inbox by channel name (None: a named channel), once per name, not per send.
        self._inbox_keys: Memo[str, str | None] = Memo(_inbox_key_of)
        self._named_sends = KeyedLocks()  # one send in flight per quorum queue (see _send_named)
        self._named_bindings: set[tuple[str, str]] = set()  # (channel, group) bindings it made
        self._bound: set[str] = set()  # groups the inbox is bound to
        self._group_ops: dict[str, tuple[asyncio.Lock, int]] = {}
        self._readers: dict[str, _Reader] = {}
        self._reader_queues: dict[str, AbstractRobustQueue] = {}
        self._replies: dict[str, asyncio.Future[None]] = {}
        self._recent = _RecentIds(RECENT_IDS)
        #: Inbox messages waiting for a history tap here to deliver what was sent before them.
        self._held_inbox = _HeldInbox(self._caught_up, self._dispatch, self.timeout, HELD_LIMIT)
        #: History groups this instance wrote to within ``timeout``, oldest first: group ->
        #: (stream offset of its last write, the stream's epoch, loop time, write count then).
        self._written: dict[str, tuple[int, str, float, int]] = {}
        self._writes_made = 0
        #: Inbox routing key -> the write count up to which a confirmed message to that inbox
        #: named the writes: the messages after it there wait behind it, they need not again.
        self._told: Memo[str, int] = Memo()
        self._inbox_tag: str | None = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._delivery_error: type[Exception] = Exception
        self._publish_error: type[Exception] = Exception
        self._refusal: Callable[[BaseException], Refusal | None] = lambda exc: None
        #: The broker's refusal of the last reconnect attempt's login (None: not refused).
        self._login_refusal: BaseException | None = None
        self._message_class: Any = None  # aio-pika's, for publishes on other channels
        self._properties_class: Any = None  # pamqp's, for publishes on the confirm channel
        self._publisher: ConfirmingPublisher | None = None
        self._packer: Packer = self.make_packer(
            self._send_one, self._send_many, confirmation="publisher confirm"
        )
        self._acks: BatchedAcks | None = None
        self._starting: asyncio.Task[None] | None = None
        self._history_channel: AbstractRobustChannel | None = None  # history stream consumers
        self._streams: dict[str, _HistoryStream] = {}  # by group
        self._stream_locks: dict[str, asyncio.Lock] = {}
        #: Where the next tap of a group with local members starts: after what its lost
        #: tap handled (a stream offset), or "first" when the stream was deleted.
        self._resume: dict[str, int | str] = {}
        self._tap_restarts: set[str] = set()  # groups whose tap a supervised task reopens
        #: Counts closes of the history channel: a stream opened across one has a dead tap.
        self._history_closes = 0
        self._history_reviving = False
        #: Stream consumers opened to read a history stream back (the taps
        #: excepted): reads answered from a tap's recent entries open none.
        self.history_scans = 0
        self._presence_replica: RabbitPresence | None = None  # made on first use of presence

    @property
    def publishes(self) -> int:
        """Messages published on this instance's confirm channel so far (sends, group sends, replies,
        presence changes)."""
        return self._publisher.published if self._publisher is not None else 0

    @property
    def publish_writes(self) -> int:
        """The socket writes that carried :attr:`publishes`: concurrent publishes share one."""
        return self._publisher.writes if self._publisher is not None else 0

    # ---------------------------------------------------------- connection

    async def _start(self) -> None:
        # Connecting runs in its own task, shielded: a caller cancelled half way
        # (a WebSocket that disconnects during the first receive) neither
        # cancels AMQP RPCs nor leaves a half-made connection for a retry to
        # duplicate; the next call awaits the same attempt.
        starting = self._starting
        if starting is None or (starting.done() and (starting.cancelled() or starting.exception())):
            starting = self._starting = self.tasks.spawn(self._connect(), "connect", awaited=True)
        await asyncio.shield(starting)

    async def _connect(self) -> None:
        try:
            import aio_pika
            import aiormq.exceptions
        except ImportError as exc:
            raise missing_driver("rabbitmq", exc) from exc
        from pamqp.commands import Basic

        from fastapi_websockets.backends.rabbitmq_wire import (
            CHANNEL_ERRORS,
            BatchedAcks,
            ConfirmingPublisher,
            frames_read_by_the_layer,
            refusal,
            render_callback_errors_at_once,
        )

        render_callback_errors_at_once()

        self._errors = CHANNEL_ERRORS
        self._delivery_error = aiormq.exceptions.DeliveryError
        self._publish_error = aiormq.exceptions.PublishError
        self._refusal = refusal
        self._message_class = aio_pika.Message
        self._properties_class = Basic.Properties
        self._publisher = ConfirmingPublisher(self._spawn_writer, self.timeout)
        self._acks = BatchedAcks(partial(self._spawn, what="inbox acks"), self.timeout)
        try:
            # No time limit around it: cancelling connect_robust half way would
            # leave its reconnect task running; its own timeout applies.
            # Without a CA file, aiormq verifies amqps:// servers against the system's CAs.
            # aio-pika starts its reconnects from tasks that copy this context.
            with frames_read_by_the_layer():
                self._connection = await aio_pika.connect_robust(
                    self.url,
                    timeout=self.timeout,
                    reconnect_interval=RECONNECT_INTERVAL,
                    ssl_context=self._ssl_context(),
                )
        except asyncio.TimeoutError:
            raise self.unavailable(f"no answer within {self.timeout} s") from None
        except self._errors as exc:
            raise self._refused("connection", exc) or self.unavailable(exc) from exc
        try:
            await self._declare_topology(aio_pika)
        except BaseException:
            await self._connection.close()
            raise
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self.report_connection(True)
        if self.closed:
            # close() ran while we connected for a caller that was cancelled:
            # nobody will call _close() for this connection.
            await self._connection.close()

    def _on_connection_lost(self, connection: object, exc: BaseException | None = None) -> None:
        # aio-pika calls this for the connection dropped and again for every reconnect
        # attempt that fails, with its error: the one hook its reconnect loop offers
        # (it logs each attempt itself, at WARNING).
        if self.closed:
            return
        self.report_connection(False)
        if exc is not None and isinstance(self._refused("login", exc), BackendUnavailable):
            # A login or vhost refused once the layer ran: login_refused logged it once
            # for this outage; callers meanwhile are told so (see _no_connection).
            self._login_refusal = exc

    def _on_reconnect(self, connection: object) -> None:
        self._login_refusal = None
        self.report_connection(True)
        # The broker kept the inbox's bindings (and aio-pika made them again if
        # it did not). A group_add that failed during the outage left a local
        # member without one: bind now, retrying until it works.
        if not self.closed:
            self.tasks.keep_running(self._resync_bindings, "binding resync after reconnect")
        self._revive_readers()

    async def _resync_bindings(self) -> None:
        for group in sorted(set(self.local_groups.groups()) | self._bound):
            await self._sync_binding(group)

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The context verifying an ``amqps://`` server against ``tls_ca_file`` (None: aiormq's default)."""
        return client_context(self.tls_ca_file) if self.tls_ca_file is not None else None

    async def _declare_topology(self, aio_pika: Any) -> None:
        assert self._connection is not None
        try:
            channel = self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await channel.set_qos(prefetch_count=INBOX_PREFETCH)
            self._exchange = await channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.DIRECT, durable=self.durable
            )
            arguments: dict[str, Any] = {"x-queue-type": "classic", "x-expires": self.inbox_expiry}
            if self.message_ttl is not None:
                arguments["x-message-ttl"] = self.message_ttl
            # Not exclusive, not auto-deleted: the queue and its bindings stay
            # while this instance reconnects, so nothing sent meanwhile is lost.
            self._inbox = await channel.declare_queue(
                self.inbox_name, durable=self.durable, arguments=arguments
            )
            await self._inbox.bind(self._exchange, _inbox_routing_key(self.client_token))
            # Not through aio-pika (see _consume_inbox), restored by reopen callbacks.
            self._inbox_tag = f"fw-i-{self.client_token}"
            channel.reopen_callbacks.add(self._on_channel_reopen)
            await self._consume_inbox()
            self._declare_channel = await self._connection.channel(publisher_confirms=False)
            reader_channel = self._reader_channel = await self._connection.channel(publisher_confirms=False)
            await reader_channel.set_qos(prefetch_count=NAMED_PREFETCH)
            await self._watch_reader_cancels(reader_channel)
            reader_channel.reopen_callbacks.add(self._on_reader_reopen)
            if self.history:
                # Only layers with a history option pay for this channel.
                await self._open_history_channel()
        except self._errors as exc:
            raise self._refused("setup", exc) or self.unavailable(f"setup failed: {exc!r}") from exc

    def _refused(self, what: str, exc: BaseException) -> ChannelLayerError | None:
        """The error for ``what`` (an operation) that the broker refused for good with ``exc``, else None.

        The one place a broker's refusal becomes the library's error, not
        :class:`BackendUnavailable` ("retry later"), since asking again cannot help: an
        argument that clashes is :class:`InvalidChannelLayerConfig`, a missing permission
        a :class:`ChannelLayerError`, each quoting the broker and saying what to do; a
        login or vhost refused goes by :meth:`login_refused` (a wrong URL before the layer
        first connected, the server's change after). None for anything else (a lost
        connection or channel).
        """
        refused = self._refusal(exc)
        if refused is None:
            return None
        parts = urlsplit(self.url)
        user = user_of(self.url, "guest")
        # aiormq's reading of the URL's path: "/" when empty, %2F decoded.
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        if refused.code == 406:
            advice = (
                "the queue or exchange already exists with other arguments (made by another "
                "version or configuration of the app): give this layer the same option values (durable, "
                "capacity, channel_capacity, message_ttl, queue_expiry, history...) or delete the old one "
                "(rabbitmqctl delete_queue or delete_exchange; its messages go with it)"
            )
        elif refused.code == 530:
            return self.login_refused(
                refused.text,
                f"vhost {vhost!r} does not exist or user {user!r} has no permissions on it: correct the "
                f"url's path, or create the vhost (rabbitmqctl add_vhost) and grant the user permissions "
                f"on it (rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*')",
            )
        elif refused.config:
            return self.login_refused(
                refused.text,
                f"check the user name and password in url (user {user!r}); RabbitMQ lets 'guest' log in "
                "from localhost only",
            )
        else:
            advice = (
                f"user {user!r} lacks a permission on vhost {vhost!r}: grant it configure, write and read "
                f"on the layer's exchange {self.exchange_name!r} and queues '{self.queue_prefix}.*' "
                f"(rabbitmqctl set_permissions -p {vhost} {user} ...)"
            )
        return self.refused(what, refused.text, advice, config=refused.config)

    async def _ready(self, channel: AbstractRobustChannel | None, what: str) -> float:
        """Wait at most ``timeout`` for ``channel`` to be usable; return the time left."""
        assert channel is not None
        assert self._connection is not None
        loop = running_loop()
        deadline = loop.time() + self.timeout
        if channel.is_closed or not self._connection.connected.is_set():
            await within(channel.ready(), self.timeout, lambda: self._no_connection(what))
        # Never zero: the operation still gets its chance to answer at once.
        return max(deadline - loop.time(), 0.05)

    def _no_connection(self, what: str) -> ChannelLayerError:
        """The error for ``what``, which waited ``timeout`` for a connection that did not come back."""
        refusal = self._login_refusal
        if refusal is not None:
            # Not "no connection": the broker answers, and says what to fix on it.
            error = self._refused("login", refusal)
            if error is not None:
                return error
        return self.unavailable(f"no connection within {self.timeout} s ({what})")

    async def _broker(
        self, channel: AbstractRobustChannel | None, what: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run one broker RPC, waiting at most ``timeout`` for the connection and the answer.

        An RPC that gets no answer within the time left is cancelled, which
        makes aiormq close its channel (aio-pika then opens it again): a broker
        that holds an RPC forever (a quorum queue that never recovered, say)
        costs one channel reopen per ``timeout``, not a caller blocked for good.
        """
        left = await self._ready(channel, what)
        try:
            return await within(
                call(), left, lambda: self.unavailable(f"no answer within {self.timeout} s ({what})")
            )
        except (self._delivery_error, BackendUnavailable):
            raise
        except self._errors as exc:
            raise self._refused(what, exc) or self.unavailable(f"{what} failed: {exc!r}") from exc

    async def _publish_with(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Any,
        *,
        what: str,
        mandatory: bool,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        """Publish on the confirm channel; BackendUnavailable if no confirm comes within ``timeout``.

        Through the batching publisher (see ``rabbitmq_wire``): concurrent
        publishes share one write and wait for their confirms together. Not
        through :meth:`_broker`: a publish is no RPC (giving up on its confirm
        leaves the channel open). A message whose confirm came too late may
        still be delivered: the caller was told it might not be, never that it was.
        ``on_written`` runs once the publish is on the socket (see ``ConfirmingPublisher``).
        """
        queue = await self._confirm_outlet(what)
        await queue(exchange, routing_key, body, properties, mandatory, on_written)

    async def _confirm_outlet(self, what: str) -> PublishQueue:
        """Wait (at most ``timeout``) until the confirm channel is usable; return a function that
        queues one publish on it.

        The function queues at once, with no await between its call and the
        queueing, and returns the wait for that publish's confirm (which
        raises as :meth:`_publish_with` does). So publishes queued through
        it go out, and reach each queue, in the order of the calls, whoever
        awaits their confirms and when: presence numbers its changes at that
        call and lets every caller wait for its own confirm, all outstanding
        at once.
        """
        channel, publisher = self._channel, self._publisher
        assert channel is not None
        assert publisher is not None
        left = await self._ready(channel, what)
        try:
            underlay = cast("aiormq.Channel", await channel.get_underlay_channel())
        except self._errors as exc:
            raise self.unavailable(f"{what} failed: {exc!r}") from exc

        def queue(
            exchange: str,
            routing_key: str,
            body: bytes,
            properties: Any,
            mandatory: bool = False,
            on_written: Callable[[], None] | None = None,
        ) -> Coroutine[Any, Any, None]:
            confirm = publisher.publish(
                underlay, exchange, routing_key, body, properties, mandatory=mandatory, on_written=on_written
            )
            return self._confirmed(underlay, confirm, left, what)

        return queue

    async def _confirmed(
        self, channel: aiormq.Channel, confirm: asyncio.Future[Any], left: float, what: str
    ) -> None:
        # The confirm itself is awaited: its caller wakes once when it is settled (a
        # waiter set by the confirm's callback cost a loop pass and a callback more per
        # publish). A confirm never holds a CancelledError (a closing channel's and the
        # timeout's errors are others, see ConfirmingPublisher.give_up), so one raised
        # here is the caller's own cancellation, which cancels the confirm as well: a
        # publish not written yet is withdrawn.
        timer = running_loop().call_later(left, self._no_confirm, channel, confirm, what)
        try:
            await confirm
        except BackendUnavailable:
            raise  # the timeout's (_no_confirm)
        except self._delivery_error:
            raise  # a nack (ChannelFull to a named send) or a return
        except self._errors as error:
            raise self.unavailable(f"{what} failed: {error!r}") from error
        finally:
            timer.cancel()

    def _no_confirm(self, channel: aiormq.Channel, confirm: asyncio.Future[Any], what: str) -> None:
        publisher = self._publisher
        assert publisher is not None  # it made the confirm
        if not confirm.done():
            error = self.unavailable(f"no publisher confirm within {self.timeout} s ({what})")
            publisher.give_up(channel, confirm, error)

    def _properties(
        self,
        kind: str,
        *,
        headers: dict[str, Any] | None = None,
        expiration: float | None = None,
        persistent: bool = False,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> Any:
        """The AMQP properties of a publish on the confirm channel (pamqp's ``Basic.Properties``).

        Every publish gets a random ``message_id``: returns are matched by it,
        and the inbox drops a redelivery of an id it already handed out.
        """
        return self._properties_class(
            message_type=kind,
            headers=headers,
            expiration=None if expiration is None else str(int(expiration * 1000)),
            delivery_mode=2 if persistent else 1,
            message_id=message_id or f"{random.getrandbits(128):032x}",
            correlation_id=correlation_id,
            reply_to=reply_to,
        )

    def _spawn_writer(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.spawn(coro, "publish batch")

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        # From driver callbacks, which may still fire while the layer closes.
        if self.closed:
            coro.close()
        else:
            self.tasks.spawn(coro, what)

    async def _uncancellable(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        # Broker state changes (declare, bind, unbind) run to completion even if
        # the caller is cancelled: a cancelled AMQP RPC closes its channel, and
        # a half-applied change would leave our bookkeeping out of step.
        return await asyncio.shield(self.tasks.spawn(coro, what, awaited=True))

    # --------------------------------------------------------------- inbox

    # The inbox is consumed on aiormq's channel, below aio-pika: an
    # aio-pika IncomingMessage per delivery was the largest single cost of a
    # message received (see docs/performance/rabbitmq.md).
    # So the consumer is this module's to restore: after every reopen of the
    # channel (aio-pika has declared the inbox and its bindings again by
    # then), and when the broker cancels it (the inbox was deleted). Its
    # deliveries are handed out by the channel's reader (take_deliveries),
    # not by a task per delivery.

    async def _consume_inbox(self) -> None:
        from fastapi_websockets.backends.rabbitmq_wire import take_deliveries

        channel, tag = self._channel, self._inbox_tag
        assert channel is not None
        assert tag is not None
        underlay = cast("aiormq.Channel", await channel.get_underlay_channel())
        if tag in underlay.consumers:
            return  # several triggers may fire for one loss
        underlay.on_consumer_cancel_callbacks.add(self._on_inbox_cancel)
        # Handed out by the channel's reader, not in a task per delivery.
        take_deliveries(underlay, tag, self._on_inbox)
        await underlay.basic_consume(self.inbox_name, self._on_inbox_in_task, consumer_tag=tag)

    async def _on_channel_reopen(self, channel: AbstractRobustChannel | None) -> None:
        if not self.closed:
            await self._consume_inbox()

    def _on_inbox_cancel(self, frame: Any) -> None:
        if frame.consumer_tag == self._inbox_tag and not self.closed:
            self.tasks.keep_running(self._restore_inbox, "inbox restore")

    async def _restore_inbox(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        # Declared and bound again by aio-pika's own restore, then consumed.
        await self._broker(self._channel, "inbox restore", inbox.restore)
        await self._broker(self._channel, "inbox consume", self._consume_inbox)

    async def _on_inbox_in_task(self, delivered: aiormq.abc.DeliveredMessage) -> None:
        # aiormq's way, a task per delivery: only where take_deliveries' hook is not reached.
        self._on_inbox(delivered)

    def _on_inbox(self, delivered: aiormq.abc.DeliveredMessage) -> None:
        # Synchronous up to the ack, so messages reach the mailboxes in the
        # order the broker delivered them. Every publish has a random message
        # id; a redelivery (the connection dropped before our ack reached the
        # broker) of one already handed out is skipped.
        properties = delivered.header.properties
        message_id = properties.message_id
        if message_id is None or self._recent.first_time(message_id) or not delivered.redelivered:
            # Held (and acked: the hold keeps it) if it follows a history write whose tap
            # here has not delivered it yet, or a message that waits.
            headers, held = properties.headers, self._held_inbox
            if (
                (not held.messages and (headers is None or _AFTER not in headers))
                or properties.message_type not in _MESSAGES
                or not held.offer(properties, delivered.body)
            ):
                self._dispatch(properties, delivered.body)
        acks = self._acks
        assert acks is not None
        assert delivered.delivery_tag is not None
        # Batched: one multiple ack for the deliveries of a few milliseconds.
        acks.ack(cast("aiormq.Channel", delivered.channel), delivered.delivery_tag)

    def _dispatch(self, properties: Any, body: bytes) -> None:
        """Hand one inbox message to its receivers; a message it cannot handle is dropped and logged."""
        try:
            kind = properties.message_type
            headers = properties.headers or {}
            if kind == _SEND:
                channel = str(headers["channel"])
                message = self.decode_or_drop(body, "the inbox (for %r)", channel)
                if message is not None:
                    self.deliver_local(channel, message)
            elif kind == _SENDS:
                self.deliver_packed(body)
            elif kind == _GROUP:
                group = str(headers["group"])
                # Our own group_send handed its copy to our members when it published it.
                if group in self.local_groups and headers.get("from") != self.client_token:
                    message = self.decode_or_drop(body, f"the inbox (group {group!r})")
                    if message is None:
                        return
                    self.deliver_to_local_members(group, message)
                if group not in self.local_groups:
                    # Every local member left or expired: stop receiving this group.
                    self._spawn(self._sync_binding(group), f"unbind of group {group!r}")
            elif kind in (_ADD, _DISCARD):
                group, channel = str(headers["group"]), str(headers["channel"])
                if not self.is_local(channel):
                    logger.warning("ignored %s of channel %r, which is not ours", kind, channel)
                elif kind == _ADD:
                    self.local_groups.add(group, channel)
                else:
                    self.local_groups.discard(group, channel)
                self._spawn(
                    self._apply_and_reply(group, properties.reply_to, properties.correlation_id),
                    f"{kind} of {channel!r}",
                )
            elif kind == _REPLY:
                pending = self._replies.pop(str(properties.correlation_id), None)
                if pending is not None and not pending.done():
                    pending.set_result(None)
            else:
                logger.warning("ignored an inbox message of unknown type %r", kind)
        except KeyError as exc:
            # Not ours to crash on: a foreign publisher left out a header.
            self.stats.dropped_undecodable += 1
            logger.warning(
                "dropped an inbox message (type %r) without header %s", properties.message_type, exc
            )
        except Exception:
            # Acked all the same: a message we cannot handle must not stay
            # unacked and, a prefetch window later, leave this process deaf.
            self.stats.dropped_undecodable += 1
            logger.exception(
                "dropped an inbox message (type %r) that failed to dispatch", properties.message_type
            )

    # --------------------------------------------------------------- sends

    async def _send_remote(self, channel: str, data: bytes) -> None:
        routing_key = self._inbox_keys(channel)
        if routing_key is not None:
            # The broker's cost is per message: concurrent sends to one inbox
            # travel packed (capacity is checked by the receiving instance).
            await self._packer.send(routing_key, channel, data)
            return
        await self._send_named(channel, data)

    async def _send_one(self, routing_key: str, channel: str, data: bytes) -> None:
        # Persistent with ``durable``: the inbox outlives a broker restart, and a send
        # waiting in it for a process that is away must too (a transient one would not),
        # unless persistent_sends=False chose speed over that.
        if self._written:
            await self._send_after(_SEND, {"channel": channel}, data, routing_key, f"send to {channel!r}")
            return
        properties = self._properties(
            _SEND,
            headers={"channel": channel},
            expiration=self.channel_expiry,
            persistent=self._persistent_sends,
        )
        await self._publish(data, properties, routing_key, what=f"send to {channel!r}")

    async def _send_many(self, routing_key: str, frames: list[tuple[str, bytes]]) -> None:
        if self._written:
            await self._send_after(_SENDS, {}, pack(frames), routing_key, describe(frames))
            return
        # One expiration fits them all: every send to an inbox gets channel_expiry.
        properties = self._properties(
            _SENDS, expiration=self.channel_expiry, persistent=self._persistent_sends
        )
        await self._publish(pack(frames), properties, routing_key, what=describe(frames))

    async def _send_after(
        self, kind: str, headers: dict[str, Any], body: bytes, routing_key: str, what: str
    ) -> None:
        """Publish a send (or packed sends) to an inbox from a layer that wrote history lately.

        It names the writes that inbox was not told of yet (see :meth:`_add_after`);
        once confirmed, the inbox was told of them.
        """
        told = self._add_after(headers, routing_key)
        properties = self._properties(
            kind, headers=headers or None, expiration=self.channel_expiry, persistent=self._persistent_sends
        )
        await self._publish(body, properties, routing_key, what=what)
        if told:
            self._note_told(routing_key, told)

    def _add_after(self, headers: dict[str, Any], inbox: str | None = None) -> int:
        """Name in ``headers`` (``_AFTER``) the history writes an inbox message sent now must not overtake.

        A member in another instance gets a history group's message from its
        tap, not its inbox: the receiver holds this message until its tap has
        delivered these writes (see _HeldInbox). Only writes within ``timeout``
        (a receiver holds a message that long at most), and, for one ``inbox``
        (a routing key), those it was not told of yet. Returns the write count
        the header covers, 0 if it names none.
        """
        written = self._written
        horizon = running_loop().time() - self.timeout
        while written:
            group, (_, _, at, _) = next(iter(written.items()))
            if at >= horizon:
                break
            del written[group]
        told = self._told.known.get(inbox, 0) if inbox is not None else 0
        if told >= self._writes_made:
            return 0
        writes = [f"{offset} {epoch} {group}" for group, (offset, epoch, _, n) in written.items() if n > told]
        if not writes:
            return 0
        headers[_AFTER] = " ".join(writes)
        return self._writes_made

    def _note_write(self, group: str, offset: int, epoch: str) -> None:
        """Remember this instance's newest write to history ``group`` for the inbox messages after it."""
        self._writes_made += 1
        written = self._written
        written.pop(group, None)
        written[group] = (offset, epoch, running_loop().time(), self._writes_made)
        if len(written) > AFTER_GROUPS:
            del written[next(iter(written))]

    def _note_told(self, routing_key: str, told: int) -> None:
        """A confirmed message to the inbox at ``routing_key`` named the writes up to count ``told``."""
        if told > self._told.known.get(routing_key, 0):
            self._told.add(routing_key, told)

    def _caught_up(self, group: str, offset: int, epoch: str) -> bool:
        """Whether an inbox message sent after write ``offset`` to history ``group`` may be delivered.

        True once this instance's tap on the group has handled that stream
        offset (members here got the write), or when no tap here ever will:
        no local member, a stream of another epoch, or a lost tap whose
        successor does not resume where it stopped (the stream was deleted).
        """
        if group not in self.local_groups:
            return True
        stream = self._streams.get(group)
        if stream is None:
            # A lost tap's successor resumes after the last offset it handled.
            return not isinstance(self._resume.get(group), int)
        return stream.seen >= offset or stream.epoch not in ("", epoch)

    async def _publish(
        self,
        body: bytes,
        properties: Any,
        routing_key: str,
        *,
        what: str,
        mandatory: bool = False,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        await self._publish_with(
            self.exchange_name,
            routing_key,
            body,
            properties,
            what=what,
            mandatory=mandatory,
            on_written=on_written,
        )

    async def _send_named(self, channel: str, data: bytes) -> None:
        name = named_queue_name(self.queue_prefix, channel)
        properties = self._properties(_SEND, expiration=self.channel_expiry, persistent=self.durable)
        if not self.durable and name in self._declared and not self._named_sends.busy(name):
            await self._publish_named(channel, name, data, properties)
            return
        # The turn is taken before the declare, which waits for the broker: sends made
        # once an earlier one had declared the queue went ahead of earlier ones still
        # declaring it. A quorum queue checks x-max-length against what it has applied,
        # so publishes in flight together all pass the check (measured: 12 of 12
        # concurrent sends accepted at capacity 5 when batched, 7 to 12 before
        # batching). One at a time per queue from this instance keeps `capacity`
        # exact; concurrent sends to other channels still share writes. A classic
        # queue (not durable) needs the turn only while its queue is declared.
        async with self._named_sends.hold(name):
            if name not in self._declared:
                await self._uncancellable(self._declare_named(channel), f"declare of {name!r}")
            if self.durable:
                await self._publish_named(channel, name, data, properties)
                return
        # Queued before this task yields (aio-pika's readiness wait returns at once while
        # connected, and wakes its waiters in order while not): before the next holder's.
        await self._publish_named(channel, name, data, properties)

    async def _publish_named(self, channel: str, queue: str, data: bytes, properties: Any) -> None:
        for attempt in (1, 2):
            try:
                # The default exchange routes by queue name.
                await self._publish_with(
                    "", queue, data, properties, what=f"send to {channel!r}", mandatory=True
                )
                return
            except self._publish_error:
                # Returned as unroutable: the queue expired (x-expires) since we
                # declared it. Declare it again and retry once.
                self._declared.discard(queue)
                if attempt == 2:
                    raise BackendUnavailable(f"queue {queue!r} vanished twice while sending") from None
                await self._uncancellable(self._declare_named(channel), f"declare of {queue!r}")
            except self._delivery_error:
                raise ChannelFull(channel, self.capacity_for(channel)) from None

    # ---------------------------------------------------------- named queues

    def _named_arguments(self, channel: str) -> dict[str, Any]:
        capacity = self.capacity_for(channel)
        arguments: dict[str, Any] = {"x-overflow": "reject-publish"}
        if self.durable:
            # A quorum queue accepts one message past x-max-length before it
            # starts rejecting, so this bound makes `capacity` the real limit.
            arguments["x-queue-type"] = "quorum"
            arguments["x-max-length"] = capacity - 1
        else:
            arguments["x-queue-type"] = "classic"
            arguments["x-max-length"] = capacity
        if self.message_ttl is not None:
            arguments["x-message-ttl"] = self.message_ttl
        if self.queue_expiry is not None:
            arguments["x-expires"] = self.queue_expiry
        return arguments

    async def _declare_named(self, channel: str) -> AbstractRobustQueue:
        """Declare the queue of named ``channel`` once per instance and return it."""
        name = named_queue_name(self.queue_prefix, channel)
        queue = self._declared.get(name)
        if queue is not None:
            return queue
        declare_channel = self._declare_channel
        assert declare_channel is not None
        arguments = self._named_arguments(channel)
        what = f"declare of queue {name!r}"
        try:
            queue = await self._broker(
                declare_channel,
                what,
                lambda: declare_channel.declare_queue(
                    name, durable=self.durable, arguments=arguments, robust=False
                ),
            )
            self._as_is.discard(name)
        except InvalidChannelLayerConfig as exc:
            if "inequivalent arg" not in str(exc.__cause__):
                raise
            # Declared by processes with other options (a rolling deploy that changed
            # capacity, say): raising would fail every send to the channel until the old
            # queue goes, so use it as it is. The refused declare closed the channel;
            # aio-pika opens it again, and a passive declare checks no argument.
            self._warn_as_is(channel, name, exc)
            queue = await self._broker(
                declare_channel, what, lambda: declare_channel.declare_queue(name, passive=True, robust=False)
            )
        self._declared.add(name, queue)  # bounded: a forgotten entry costs one more declare
        return queue

    def _warn_as_is(self, channel: str, name: str, exc: InvalidChannelLayerConfig) -> None:
        """Warn, once per queue, that named ``channel``'s queue is used with arguments not this layer's."""
        if name in self._as_is:
            return
        self._as_is.add(name, True)
        refused = self._refusal(exc.__cause__) if exc.__cause__ is not None else None
        logger.warning(
            "the queue %r of named channel %r exists with other arguments than this layer's (RabbitMQ "
            "names the first that differs: %s); using it as it is, so its own limits apply: its "
            "x-max-length, not this layer's capacity of %d, decides when send() raises ChannelFull (which "
            "quotes this layer's capacity), and its TTL and expiry stay. To apply this layer's options, "
            "delete the queue (rabbitmqctl delete_queue %s; its messages go with it) or let it expire "
            "(x-expires) once no process declares it with the old options",
            name,
            channel,
            refused.text if refused is not None else exc,
            self.capacity_for(channel),
            name,
        )

    async def _receive_remote(self, channel: str) -> Message:
        reader = self._readers.get(channel)
        if reader is None:
            reader = self._readers[channel] = _Reader(channel)
        reader.users += 1
        if reader.linger is not None:
            reader.linger.cancel()
            reader.linger = None
        try:
            if reader.tag is None:
                if reader.starting is None or reader.starting.done():
                    reader.starting = self.tasks.spawn(
                        self._start_reader(reader), f"consumer start of {channel!r}", awaited=True
                    )
                # Shielded: a cancelled receive must not cancel a basic.consume
                # RPC half way (aiormq would close the channel).
                await asyncio.shield(reader.starting)
            return await self._next_named(reader)
        finally:
            reader.users -= 1
            if reader.users == 0 and not self.closed:
                loop = running_loop()
                reader.linger = loop.call_later(NAMED_LINGER, self._linger_expired, reader)

    async def _start_reader(self, reader: _Reader) -> None:
        async with reader.lock:
            if reader.tag is None:
                await self._start_reader_locked(reader)

    async def _start_reader_locked(self, reader: _Reader) -> None:
        name = named_queue_name(self.queue_prefix, reader.channel)
        if name in self._as_is:
            # The old queue may have expired since: declared again on the declare channel,
            # whose refusals close no consumer, before a passive declare here.
            self._declared.discard(name)
        await self._declare_named(reader.channel)
        as_is = name in self._as_is
        queue = None if as_is else self._reader_queues.get(name)
        reader_channel = self._reader_channel
        assert reader_channel is not None
        if queue is not None:
            # Declared again before each (rare) consumer start: x-expires may
            # have deleted it since, and basic.consume on a missing queue
            # would close the channel of every other named consumer.
            await self._broker(reader_channel, f"declare of queue {name!r}", queue.declare)
        else:
            # Declared (not passively) with its arguments, so that a restart of
            # the consumer declares it again if the broker lost it. Not robust:
            # aio-pika would restore it inside the connection's recovery, where
            # an RPC the broker never answers stalls everything (see _revive_reader).
            arguments = self._named_arguments(reader.channel)
            queue = await self._broker(
                reader_channel,
                f"declare of queue {name!r}",
                lambda: reader_channel.declare_queue(
                    name, passive=as_is, durable=self.durable, arguments=arguments, robust=False
                ),
            )
            if not as_is:
                self._reader_queues[name] = queue
        reader.queue = queue
        # The tag is known before basic.consume returns: deliveries can arrive
        # before this coroutine resumes.
        tag = reader.tag = f"fw-{self.client_token}-{new_token(6)}"
        try:
            await self._broker(
                reader_channel,
                f"consume from {name!r}",
                lambda: queue.consume(partial(self._on_named, reader), consumer_tag=tag, robust=False),
            )
        except BaseException:
            reader.tag = None
            raise

    # The named consumers are not robust (see _start_reader_locked): whenever
    # one may be gone (a reconnect, its channel reopened, the broker cancelled
    # it), a supervised task starts it again, with backoff until it works.

    def _revive_readers(self) -> None:
        for reader in list(self._readers.values()):
            self._revive(reader)

    def _revive(self, reader: _Reader) -> None:
        if self.closed or reader.reviving:
            return
        reader.reviving = True
        self.tasks.keep_running(
            partial(self._revive_reader, reader), f"consumer restart of {reader.channel!r}"
        )

    async def _revive_reader(self, reader: _Reader) -> None:
        import aiormq

        try:
            async with reader.lock:
                if self._readers.get(reader.channel) is not reader:
                    return  # stopped meanwhile
                if reader.tag is None and not reader.users:
                    return  # never started, and nobody waits
                # A tag of None with receivers waiting: a restart failed half way
                # (its consume raised); this run (the supervisor's retry) starts it.
                channel = self._reader_channel
                assert channel is not None
                underlay = await within(
                    channel.get_underlay_channel(),
                    self.timeout,
                    lambda: self._no_connection("consumer restart"),
                )
                # Several triggers (reconnect, reopen, cancel) may fire for one loss.
                if isinstance(underlay, aiormq.Channel) and reader.tag in underlay.consumers:
                    return
                reader.tag = None
                # Unacked deliveries of the lost consumer are requeued by the
                # broker; acking them on a new channel is impossible.
                reader.held.clear()
                if reader.users:
                    await self._start_reader_locked(reader)
                    return
            # Nobody waits any more: let it go as if it had lingered.
            await self._stop_reader(reader)
        finally:
            reader.reviving = False

    async def _watch_reader_cancels(self, channel: AbstractRobustChannel) -> None:
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_reader_cancel)

    async def _on_reader_reopen(self, channel: AbstractRobustChannel | None) -> None:
        # aio-pika types a callback's sender as optional; a reopen always passes the channel.
        assert channel is not None
        await self._watch_reader_cancels(channel)
        self._revive_readers()

    def _on_reader_cancel(self, frame: Any) -> None:
        # The broker cancelled a named consumer: its queue was deleted.
        for reader in list(self._readers.values()):
            if reader.tag == frame.consumer_tag:
                self._revive(reader)

    async def _on_named(self, reader: _Reader, incoming: AbstractIncomingMessage) -> None:
        if incoming.type == _PROBE:
            # A history group's writer asking whether named members exist: not a message.
            try:
                await incoming.ack()
            except self._errors as exc:
                logger.debug("could not ack a probe: %r", exc)
            return
        if reader.tag is None or incoming.consumer_tag != reader.tag:
            # Arrived while the consumer was being cancelled: give it back.
            await self._give_back(incoming)
            return
        reader.offer(incoming)

    async def _give_back(self, incoming: AbstractIncomingMessage) -> None:
        try:
            await incoming.nack(requeue=True)
        except self._errors as exc:
            logger.debug("could not requeue a named-channel message: %r", exc)

    async def _next_named(self, reader: _Reader) -> Message:
        while True:
            message = await self._claim(reader, await reader.next())
            if message is not None:
                return message

    async def _claim(self, reader: _Reader, incoming: AbstractIncomingMessage) -> Message | None:
        """Ack ``incoming`` and decode it; None if the ack cannot be sent (the broker redelivers it).

        The ack is queued for the connection's writer, not waited for: the only
        point a cancellation can land is before it is queued (the frame buffer
        full), and the delivery then goes to the next receiver, still unacked.
        Waited for, a cancellation could land once it was on its way, leaving the
        message acked and held in this process alone, lost if the layer closed
        before another receive took it.
        """
        assert incoming.delivery_tag is not None  # named consumers ack (no no_ack)
        try:
            await incoming.channel.basic_ack(incoming.delivery_tag, wait=False)
        except asyncio.CancelledError:
            reader.put_back(incoming)
            raise
        except self._errors as exc:
            logger.debug("could not ack a message of %r: %r", reader.channel, exc)
            return None
        return self.decode_or_drop(incoming.body, f"named channel {reader.channel!r}")

    def _linger_expired(self, reader: _Reader) -> None:
        reader.linger = None
        if reader.users == 0 and not self.closed:
            self._spawn(self._stop_reader(reader), f"consumer stop of {reader.channel!r}")

    async def _stop_reader(self, reader: _Reader) -> None:
        async with reader.lock:
            if reader.users or reader.queue is None:
                return
            tag, reader.tag = reader.tag, None
            queue = reader.queue
            if tag is not None:
                try:
                    await self._broker(self._reader_channel, "consumer cancel", lambda: queue.cancel(tag))
                except BackendUnavailable as exc:
                    logger.debug("consumer cancel of %r failed: %s", reader.channel, exc)
            held, reader.held = list(reader.held), deque()
            for item in held:
                await self._give_back(item)
            if reader.users == 0 and self._readers.get(reader.channel) is reader:
                del self._readers[reader.channel]

    # --------------------------------------------------------------- groups

    async def _group_add(self, group: str, channel: str) -> None:
        if self.is_local(channel):
            self.local_groups.add(group, channel)
            await self._uncancellable(self._sync_binding(group), f"binding of group {group!r}")
        elif is_process_specific(channel):
            await self._tell_owner(_ADD, group, channel)
        else:
            await self._uncancellable(self._bind_named(group, channel, bind=True), f"bind of {channel!r}")

    async def _group_discard(self, group: str, channel: str) -> None:
        if self.is_local(channel):
            self.local_groups.discard(group, channel)
            await self._uncancellable(self._sync_binding(group), f"binding of group {group!r}")
        elif is_process_specific(channel):
            await self._tell_owner(_DISCARD, group, channel)
        else:
            await self._uncancellable(self._bind_named(group, channel, bind=False), f"unbind of {channel!r}")

    async def _tell_owner(self, kind: str, group: str, channel: str) -> None:
        # Membership of a process-specific channel lives with the instance that
        # owns it: ask it to apply the change and wait until it has (bindings
        # included), so that a group_send from anywhere afterwards sees it.
        token = new_token()
        properties = self._properties(
            kind,
            headers={"group": group, "channel": channel},
            correlation_id=token,
            reply_to=_inbox_routing_key(self.client_token),
            expiration=self.timeout,
        )
        reply: asyncio.Future[None] = running_loop().create_future()
        self._replies[token] = reply
        try:
            try:
                await self._publish(
                    b"",
                    properties,
                    _inbox_routing_key(process_token(channel)),
                    what=f"{kind} of {channel!r}",
                    mandatory=True,
                )
            except self._publish_error:
                logger.debug("%s of %r: its layer is gone, nothing to do", kind, channel)
                return
            try:
                await within(reply, self.timeout, TimeoutError)
            except TimeoutError:
                logger.warning("%s of %r: its layer did not confirm within %s s", kind, channel, self.timeout)
        finally:
            self._replies.pop(token, None)

    async def _apply_and_reply(self, group: str, reply_to: str | None, correlation_id: str | None) -> None:
        await self._sync_binding(group)
        if reply_to and correlation_id:
            reply = self._properties(_REPLY, correlation_id=correlation_id)
            await self._publish(b"", reply, reply_to, what="group membership reply")

    async def _sync_binding(self, group: str) -> None:
        """Bind the inbox to ``group`` iff a local channel is a member."""
        lock, users = self._group_ops.get(group, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._group_ops[group] = (lock, users + 1)
        try:
            async with lock:
                wanted = bool(self.local_groups.members(group))
                policy = self.history_policy(group)
                if policy is not None:
                    await self._sync_tap(group, policy, wanted)
                    return
                inbox, exchange = self._inbox, self._exchange
                assert inbox is not None
                assert exchange is not None
                key = group_routing_key(group)
                if wanted and group not in self._bound:
                    await self._broker(
                        self._channel, f"bind of group {group!r}", lambda: inbox.bind(exchange, key)
                    )
                    self._bound.add(group)
                elif not wanted and group in self._bound:
                    await self._broker(
                        self._channel, f"unbind of group {group!r}", lambda: inbox.unbind(exchange, key)
                    )
                    self._bound.discard(group)
        finally:
            lock, users = self._group_ops[group]
            if users == 1:
                del self._group_ops[group]
            else:
                self._group_ops[group] = (lock, users - 1)

    async def _sync_tap(self, group: str, policy: HistoryPolicy, wanted: bool) -> None:
        """Hold a tap on ``group``'s history stream iff a local channel is a member.

        Members of a history group get its messages from the stream (the
        inbox is never bound to it): the tap is running (consume-ok) when this
        returns, so a message stored afterwards reaches them.
        """
        if wanted:
            (await self._history_stream(group, policy)).for_members = True
            return
        self._resume.pop(group, None)
        if self._held_inbox.messages:
            self._held_inbox.release()  # no member here waits for the group's messages any more
        stream = self._streams.get(group)
        if stream is None or not stream.for_members or stream.pending:
            return  # a write in flight waits for this tap: it stays, as a writer's does
        del self._streams[group]
        stream.retired = True
        await self._cancel_consumer(stream.queue, stream.tag)

    async def _bind_named(self, group: str, channel: str, *, bind: bool) -> None:
        # A named member is a broker binding of its queue: it needs no process
        # alive and does not expire with group_expiry (it lasts until
        # group_discard, or until queue_expiry deletes an unused queue).
        # Declared again first: a bind to a queue x-expires deleted would
        # close the channel.
        self._declared.discard(named_queue_name(self.queue_prefix, channel))
        queue = await self._declare_named(channel)
        key = group_routing_key(group)
        if bind:
            await self._broker(
                self._declare_channel,
                f"bind of {channel!r} to group {group!r}",
                lambda: queue.bind(self.exchange_name, key, robust=False),
            )
            self._named_bindings.add((channel, group))
            policy = self.history_policy(group)
            if policy is not None:
                # After the binding: every tap that has not probed it yet sees
                # this entry before any message sent once this join returned,
                # so its writers publish the named members' copy.
                await self._append_entry(group, policy, _NAMED)
        else:
            await self._broker(
                self._declare_channel,
                f"unbind of {channel!r} from group {group!r}",
                lambda: queue.unbind(self.exchange_name, key),
            )
            self._named_bindings.discard((channel, group))

    async def _group_send(self, group: str, data: bytes) -> None:
        # This layer's own members get the message once its publish is on the
        # socket, not from the copy the broker routes back to the inbox (which
        # _dispatch skips by the "from" header): they are spared the hop and get it
        # in the order of this layer's calls, as they get its send()s; and the
        # other processes' copy is on its way before this one fans out locally.
        # Members of a history group read the group's stream instead.
        headers: dict[str, Any] = {"group": group, "from": self.client_token}
        if self._written:
            # Every time: the inboxes bound to a group change, the ones told may not be those.
            self._add_after(headers)
        properties = self._properties(
            _GROUP, headers=headers, expiration=self.channel_expiry, persistent=self.durable
        )
        history = self.history and self.history_policy(group) is not None
        # Without members here, nothing waits for the socket: the publisher writes the
        # publish from this task at once, not from its writer task a loop turn later.
        serve_own = not history and group in self.local_groups
        own = _Once(partial(self._deliver_own, group, data)) if serve_own else None
        try:
            await self._publish(
                data, properties, group_routing_key(group), what=f"group_send to {group!r}", on_written=own
            )
        except self._delivery_error:
            # A full named member refused its copy; the others got theirs.
            self.stats.dropped_full += 1
            logger.debug("group_send to %r: a full named member skipped the message", group)
        if own is not None:
            # Confirmed, so written: the callback ran unless the publisher stopped
            # waiting for the socket before it took the publish.
            own()

    def _deliver_own(self, group: str, data: bytes) -> None:
        if group in self.local_groups:
            self.deliver_to_local_members(group, self.decode(data))

    # -------------------------------------------------------------- history

    async def _watch_cancels(self, channel: AbstractRobustChannel) -> None:
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_consumer_cancel)

    async def _on_history_reopen(self, channel: AbstractRobustChannel | None) -> None:
        # aio-pika types a callback's sender as optional; a reopen always passes the channel.
        assert channel is not None
        await self._watch_cancels(channel)

    async def _open_history_channel(self) -> None:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=HISTORY_PREFETCH)
        await self._watch_cancels(channel)
        channel.reopen_callbacks.add(self._on_history_reopen)
        channel.close_callbacks.add(self._on_history_closed)
        self._history_channel = channel

    # The taps are not robust (aio-pika would restore them inside its channel
    # recovery, where one RPC the broker does not answer leaves the channel
    # unrestored for good): when the history channel closes for any reason
    # (a cancelled RPC, a channel error, a lost connection), every stream is
    # forgotten so that the next use opens it again with a new tap, and a
    # supervised task makes sure the channel comes back.

    def _on_history_closed(self, channel: object, exc: BaseException | None = None) -> None:
        if self.closed or channel is not self._history_channel:
            return
        self._history_closes += 1
        for group in list(self._streams):
            self._forget_stream(group, f"the history channel closed ({exc!r})")
        if not self._history_reviving:
            self._history_reviving = True
            self.tasks.keep_running(self._revive_history, "history channel recovery")

    async def _revive_history(self) -> None:
        """Wait for aio-pika to restore the history channel; replace it if it does not."""
        try:
            channel, connection = self._history_channel, self._connection
            assert channel is not None
            assert connection is not None
            while not self.closed:
                # No time limit while the connection is down: its recovery restores the channel.
                await connection.connected.wait()
                try:
                    await within(channel.ready(), self.timeout, TimeoutError)
                    underlay = await channel.get_underlay_channel()
                    if not underlay.is_closed:
                        return
                except TimeoutError:
                    logger.debug("history channel not restored within %s s", self.timeout)
                except self._errors as exc:
                    logger.debug("history channel not restored: %r", exc)
                if connection.connected.is_set():
                    break
            if self.closed:
                return
            # Connected, yet aio-pika did not restore it within `timeout`: use a new one.
            await within(
                self._open_history_channel(),
                self.timeout,
                lambda: self.unavailable(f"no new history channel within {self.timeout} s"),
            )
            self._history_closes += 1
            for group in list(self._streams):
                self._forget_stream(group, "the history channel was replaced")
            self._spawn(self._close_quietly(channel), "close of the old history channel")
        finally:
            self._history_reviving = False

    async def _close_quietly(self, channel: AbstractRobustChannel) -> None:
        try:
            await within(channel.close(), self.timeout, TimeoutError)
        except TimeoutError:
            logger.debug("close of the old history channel got no answer")
        except self._errors as exc:
            logger.debug("close of the old history channel failed: %r", exc)

    def _on_consumer_cancel(self, frame: Any) -> None:
        # The broker cancelled a tap: its stream was deleted. Forget it, so the
        # next use declares a new stream (and a new epoch) instead of waiting
        # for offsets a dead consumer will never report.
        for group, stream in list(self._streams.items()):
            if stream.tag == frame.consumer_tag:
                self._forget_stream(group, f"history stream {stream.name!r} was deleted", deleted=True)

    def _forget_stream(self, group: str, why: str, *, deleted: bool = False) -> None:
        stream = self._streams.pop(group, None)
        if stream is None:
            return
        stream.fail(self.unavailable(why))
        if stream.for_members and not self.closed:
            # Local members wait on this tap: a new one resumes after what it
            # handled (a new stream, from its start), retrying until it works.
            resume: int | str = "first" if deleted else (stream.seen + 1 if stream.seen >= 0 else "next")
            self._resume[group] = resume
            if group not in self._tap_restarts:
                self._tap_restarts.add(group)
                self.tasks.keep_running(partial(self._restart_tap, group), f"tap restart of {group!r}")
        if self._held_inbox.messages:
            self._held_inbox.release()  # a deleted stream's writes will never come

    async def _restart_tap(self, group: str) -> None:
        try:
            await self._sync_binding(group)
        finally:
            self._tap_restarts.discard(group)

    async def _group_send_history(
        self, group: str, message: Message, policy: HistoryPolicy
    ) -> StreamPosition:
        # One confirmed write to the stream: the taps of the processes with
        # members deliver it. Only named members (queues bound on the group's
        # routing key) need a copy published with its position.
        offset, stream = await self._uncancellable(
            self._append_entry(group, policy, _STORED, self.encode(message)), f"history of {group!r}"
        )
        position = StreamPosition(offset + 1, stream.epoch)
        if stream.named:
            await self._group_send(group, self.encode({**message, POSITION_KEY: position.as_dict()}))
        return position

    async def _send_event(self, group: str, message: Message) -> None:
        policy = self.history_policy(group) if self.history else None
        if policy is None:
            await super()._send_event(group, message)
            return
        # The members of a history group listen to its stream only: the event goes
        # there too, in order with the messages, as a kind that pages leave out.
        data = self.encode(message)
        _, stream = await self._uncancellable(
            self._append_entry(group, policy, _EVENT, data), f"event to {group!r}"
        )
        if stream.named:
            await self._group_send(group, data)

    async def _history_append(self, group: str, data: bytes, policy: HistoryPolicy) -> StreamPosition:
        # Run to completion even if the caller is cancelled: a cancelled AMQP RPC
        # closes its channel, and the tap consumer lives on one.
        offset, stream = await self._uncancellable(
            self._append_entry(group, policy, _STORED, data), f"history of {group!r}"
        )
        return StreamPosition(offset + 1, stream.epoch)

    async def _append_entry(
        self, group: str, policy: HistoryPolicy, kind: str, data: bytes = b""
    ) -> tuple[int, _HistoryStream]:
        """Write one entry to ``group``'s stream; its stream offset and the stream's handle."""
        try:
            stream = await self._history_stream(group, policy)
            offset = await self._write(group, stream, kind, data)
        except _StreamGone:
            # Deleted since we last used it: a new stream, with a new epoch.
            stream = await self._history_stream(group, policy)
            offset = await self._write(group, stream, kind, data)
        if kind in (_STORED, _EVENT):
            self._note_write(group, offset, stream.epoch)
        return offset, stream

    async def _history_read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        return await self._uncancellable(self._read(group, after, limit, policy), f"history of {group!r}")

    async def _read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        # AMQP 0.9.1 cannot tell where a stream ends: a mark written now is
        # after every message stored before this read began.
        try:
            stream = await self._history_stream(group, policy)
            mark = await self._write(group, stream, _MARK, b"")
        except _StreamGone:
            stream = await self._history_stream(group, policy)
            mark = await self._write(group, stream, _MARK, b"")

        def enough(entries: list[_Entry]) -> bool:
            stored = [entry for entry in entries if entry.kind == _STORED]
            # More than `size` stored ones, or everything after `after` plus
            # the message at `after` itself (it tells the newest offset).
            return len(stored) > policy.size or bool(stored and entries[0].offset < after)

        # The tap handled every entry up to the mark, in order: what it kept
        # answers the read when it reaches back far enough.
        held = stream.stored_up_to(mark, after)
        if held is None:
            async with stream.scanning:
                held = stream.stored_up_to(mark, after)
                if held is None:
                    entries, lost_below = await self._scan_back(stream, mark, enough, policy)
                    if not lost_below:
                        stream.seed(entries)
                    stored = [entry for entry in entries if entry.kind == _STORED]
        if held is not None:
            stored, lost_below = held, 0
        now = time.time()
        alive = [entry for entry in stored if now - entry.written < policy.ttl][-policy.size :]
        kept = {entry.offset for entry in alive}
        # Position offsets at or below `trimmed` are gone (by size, ttl or the
        # broker's retention); those above it are all in `alive`.
        trimmed = max([entry.offset + 1 for entry in stored if entry.offset not in kept] + [lost_below])
        newest = stored[-1].offset + 1 if stored else 0
        page = [(entry.offset + 1, entry.body) for entry in alive if entry.offset + 1 > after]
        return HistorySlice(page[-limit:], newest, stream.epoch, complete=trimmed <= after)

    async def _history_stream(self, group: str, policy: HistoryPolicy) -> _HistoryStream:
        stream = self._streams.get(group)
        if stream is not None:
            return stream
        lock = self._stream_locks.setdefault(group, asyncio.Lock())
        try:
            async with lock:
                stream = self._streams.get(group)
                if stream is None:
                    stream = await self._open_stream(group, policy)
                return stream
        finally:
            if group in self._streams:
                self._stream_locks.pop(group, None)

    async def _open_stream(self, group: str, policy: HistoryPolicy) -> _HistoryStream:
        name = history_stream_name(self.queue_prefix, group)
        declare_channel, history_channel = self._declare_channel, self._history_channel
        closes = self._history_closes
        assert declare_channel is not None
        assert history_channel is not None
        arguments: dict[str, Any] = {
            "x-queue-type": "stream",
            # Retention is by whole segments, so the broker keeps somewhat more;
            # reads apply the exact size and ttl.
            "x-max-age": f"{max(math.ceil(policy.ttl), 1)}s",
            "x-stream-max-segment-size-bytes": HISTORY_SEGMENT_BYTES,
        }
        try:
            await self._broker(
                declare_channel,
                f"declare of stream {name!r}",
                lambda: declare_channel.declare_queue(name, durable=True, arguments=arguments, robust=False),
            )
        except InvalidChannelLayerConfig as exc:
            # Declared by a layer with another ttl: the existing stream wins (reads apply
            # each layer's own size and ttl). The failed declare closed the channel;
            # aio-pika reopens it.
            logger.warning(
                "stream %r exists with other arguments than %r; using it as is: %s", name, arguments, exc
            )
        await self._await_stream_ready(name)
        # Passive on the consumers' channel: a reconnect declares it again
        # without arguments that might differ.
        queue = await self._broker(
            history_channel,
            f"declare of stream {name!r}",
            lambda: history_channel.declare_queue(name, passive=True, robust=False),
        )
        tag = f"fw-h-{self.client_token}-{new_token(6)}"
        stream = _HistoryStream(
            group, name, queue, tag, for_members=group in self.local_groups, keep=policy.size + 1
        )
        # A tap replacing a lost one while local members wait resumes where that
        # one stopped, so they miss nothing; a new one starts at the stream's end.
        start = self._resume.get(group, "next")
        if isinstance(start, int):
            stream.seen = start - 1
        await self._broker(
            history_channel,
            f"consume from {name!r}",
            lambda: queue.consume(
                partial(self._on_tap, stream),
                consumer_tag=tag,
                arguments={"x-stream-offset": start},
                robust=False,
            ),
        )
        if self._history_closes != closes:
            # The channel closed meanwhile: the tap may be gone with it.
            self._retire_unopened(stream)
            await self._cancel_consumer(queue, tag)
            raise self.unavailable(f"the history channel closed while opening {name!r}")
        self._streams[group] = stream
        try:
            # After the tap started: a named channel bound later writes a _NAMED
            # entry that the tap sees before any message sent after that join.
            stream.named = await self._has_named_members(group)
            stream.epoch = await self._agree_epoch(group, stream)
        except BaseException:
            self._streams.pop(group, None)
            self._retire_unopened(stream)
            await self._cancel_consumer(queue, tag)
            raise
        self._resume.pop(group, None)
        if self._held_inbox.messages:
            self._held_inbox.release()  # what waited for the lost tap waits for this one
        return stream

    def _retire_unopened(self, stream: _HistoryStream) -> None:
        """Retire a tap whose opening failed; the next one resumes after what it delivered."""
        stream.retired = True
        if stream.seen >= 0 and stream.group in self.local_groups:
            self._resume[stream.group] = stream.seen + 1

    async def _has_named_members(self, group: str) -> bool:
        """Whether a queue is bound on ``group``'s routing key: for a history group, a named member.

        The probe is mandatory: the broker returns it when nothing is bound.
        Named readers drop it, and it expires at once where nobody reads.
        """
        probe = self._properties(_PROBE, expiration=0.001)
        try:
            await self._publish(
                b"", probe, group_routing_key(group), what=f"probe of group {group!r}", mandatory=True
            )
        except self._publish_error:
            return False  # returned: nothing is bound
        except self._delivery_error:
            return True  # a full named member refused it
        return True

    async def _await_stream_ready(self, name: str) -> None:
        """Wait until the broker can serve the stream ``name``, on a connection of its own.

        RabbitMQ 3.10 answers queue.declare for a stream that another client
        is creating at that moment before the stream's writer runs, and a
        publish or consume then kills the whole connection (INTERNAL_ERROR,
        or RESOURCE_ERROR "Stream not found"). A confirmed publish of an epoch
        proposal on a throwaway connection proves it ready without risking the
        layer's own; the proposal is harmless (see :meth:`_agree_epoch`).
        """
        import aio_pika
        import aiormq.exceptions

        backoff = Backoff(first=0.02, cap=0.5)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                connection = await aio_pika.connect(
                    self.url, timeout=self.timeout, ssl_context=self._ssl_context()
                )
            except asyncio.TimeoutError:
                raise self.unavailable(f"no connection within {self.timeout} s (stream {name!r})") from None
            except self._errors as exc:
                raise self.unavailable(f"no connection to check stream {name!r}: {exc!r}") from exc
            try:
                channel = await connection.channel(publisher_confirms=True)
                message = self._message_class(
                    b"", type=_PROPOSAL, headers={"e": new_epoch(), "t": _now_ms()}, delivery_mode=2
                )
                await channel.default_exchange.publish(message, name, mandatory=True)
                return
            except (
                aiormq.exceptions.ConnectionInternalError,
                aiormq.exceptions.ConnectionResourceError,
            ) as exc:
                if time.monotonic() > deadline:
                    raise self.unavailable(f"stream {name!r} did not become ready: {exc!r}") from exc
                logger.debug("stream %r is not ready yet: %r", name, exc)
            except self._errors as exc:
                raise self.unavailable(f"check of stream {name!r} failed: {exc!r}") from exc
            finally:
                await connection.close()
            await backoff.sleep()

    async def _agree_epoch(self, group: str, stream: _HistoryStream) -> str:
        """The epoch of the stream: the one on its newest mark or stored message, else its first proposal.

        Every writer proposes an epoch before its first write, then adopts the
        stream's: so two processes that find a new (or recreated) stream at
        the same time agree on the first proposal written to it.
        """
        proposal = await self._write(group, stream, _PROPOSAL, b"", epoch=new_epoch())

        def decided(entries: list[_Entry]) -> bool:
            return any(entry.kind != _PROPOSAL for entry in entries)

        entries, _ = await self._scan_back(stream, proposal, decided, None)
        settled = [entry for entry in entries if entry.kind != _PROPOSAL]
        if settled:
            return settled[-1].epoch
        return next(entry.epoch for entry in entries if entry.kind == _PROPOSAL)

    async def _write(
        self, group: str, stream: _HistoryStream, kind: str, body: bytes, *, epoch: str | None = None
    ) -> int:
        """Append one entry to the stream; return its stream offset, as the tap reports it."""
        token = new_token()
        properties = self._properties(
            kind, message_id=token, headers={"e": epoch or stream.epoch, "t": _now_ms()}, persistent=True
        )
        seen: asyncio.Future[int] = running_loop().create_future()
        stream.pending[token] = seen
        try:
            try:
                what = f"history write to {stream.name!r}"
                await self._publish_with("", stream.name, body, properties, what=what, mandatory=True)
            except self._publish_error:
                # Returned as unroutable: the stream was deleted.
                self._forget_stream(group, f"history stream {stream.name!r} was deleted", deleted=True)
                raise _StreamGone(f"history stream {stream.name!r} was deleted") from None
            try:
                return await within(
                    seen,
                    self.timeout,
                    lambda: self.unavailable(f"the offset of a write to {stream.name!r} did not come back"),
                )
            except BackendUnavailable:
                # A tap that misses a confirmed write may be gone for good:
                # the next call opens the stream again with a new one.
                if self._streams.get(group) is stream:
                    self._forget_stream(group, f"the tap of {stream.name!r} missed a write")
                    self._spawn(self._cancel_consumer(stream.queue, stream.tag), f"tap cancel of {group!r}")
                raise
        finally:
            stream.pending.pop(token, None)

    async def _on_tap(self, stream: _HistoryStream, incoming: AbstractIncomingMessage) -> None:
        # Synchronous up to the ack, so members get the entries in stream order.
        offset = _stream_offset(incoming)
        if offset > stream.seen and not stream.retired:
            # Only the current tap of the group delivers, and each offset once: a
            # tap resumed after a lost one may start inside a chunk it had handled.
            stream.seen = offset
            if stream.covered < 0:
                stream.covered = offset
            if incoming.type == _STORED:
                stream.remember(_entry(incoming))
            if incoming.type in (_STORED, _EVENT):
                self._deliver_entry(stream, offset, incoming)
            elif incoming.type == _NAMED:
                stream.named = True
            if self._held_inbox.messages:
                self._held_inbox.release()
        # After the delivery: a sender's own members have the message when group_send returns.
        seen = stream.pending.pop(str(incoming.message_id), None)
        if seen is not None and not seen.done():
            seen.set_result(offset)
        try:
            await incoming.ack()
        except self._errors as exc:
            logger.debug("could not ack a history tap delivery: %r", exc)

    def _deliver_entry(self, stream: _HistoryStream, offset: int, incoming: AbstractIncomingMessage) -> None:
        """Hand a stored message (with its position) or an event from the tap to the group's local members."""
        group = stream.group
        if group in self.local_groups:
            message = self.decode_or_drop(incoming.body, f"the history stream of group {group!r}")
            if message is None:
                return
            if incoming.type == _STORED:
                # The writer's epoch: the one its group_send returned.
                message[POSITION_KEY] = {"offset": offset + 1, "epoch": str(incoming.headers.get("e", ""))}
            self.deliver_to_local_members(group, message)
        if stream.for_members and group not in self.local_groups:
            # Every local member expired: stop the tap.
            self._spawn(self._sync_binding(group), f"tap stop of group {group!r}")

    async def _scan_back(
        self,
        stream: _HistoryStream,
        last: int,
        enough: Callable[[list[_Entry]], bool],
        policy: HistoryPolicy | None,
    ) -> tuple[list[_Entry], int]:
        """The entries up to stream offset ``last``, read back until ``enough`` or the stream's start.

        Also returns the position offset at and below which the broker has
        dropped entries (0 if it dropped none that the scan reached).
        """
        width = 2 * (policy.size + 1) if policy is not None else 16
        while True:
            start = max(last + 1 - width, 0)
            entries, first = await self._read_stream(stream, start, last)
            if first > start:
                return entries, first  # the broker's retention dropped everything below `first`
            if start == 0 or enough(entries):
                return entries, 0
            width *= 4

    async def _read_stream(self, stream: _HistoryStream, start: int, last: int) -> tuple[list[_Entry], int]:
        """Entries with stream offsets in ``[start, last]``, and the first offset found from ``start``.

        ``last`` must exist (this instance wrote it and its tap saw it), so the
        read ends when it arrives.
        """
        channel = self._history_channel
        assert channel is not None
        entries: list[_Entry] = []
        firsts: list[int] = []
        done: asyncio.Future[None] = running_loop().create_future()

        async def on_message(incoming: AbstractIncomingMessage) -> None:
            offset = _stream_offset(incoming)
            if not firsts:
                firsts.append(offset)
            if not done.done() and offset <= last:
                entries.append(_entry(incoming))
            if offset >= last and not done.done():
                done.set_result(None)
            try:
                await incoming.ack()
            except self._errors as exc:
                logger.debug("could not ack a history delivery: %r", exc)

        tag = f"fw-r-{self.client_token}-{new_token(6)}"
        queue = stream.queue
        self.history_scans += 1
        await self._broker(
            channel,
            f"read of {stream.name!r}",
            lambda: queue.consume(
                on_message, consumer_tag=tag, arguments={"x-stream-offset": start}, robust=False
            ),
        )
        try:
            await within(
                done, self.timeout, lambda: self.unavailable(f"read of {stream.name!r} did not reach its end")
            )
        finally:
            await self._cancel_consumer(queue, tag)
        return entries, firsts[0]

    async def _cancel_consumer(self, queue: AbstractRobustQueue, tag: str) -> None:
        try:
            await self._broker(self._history_channel, "consumer cancel", lambda: queue.cancel(tag))
        except BackendUnavailable as exc:
            logger.debug("consumer cancel on %r failed: %s", queue.name, exc)

    async def _flush_history(self) -> None:
        # Only the streams this instance used: AMQP cannot list queues.
        self._resume.clear()
        for group, stream in list(self._streams.items()):
            self._streams.pop(group, None)
            stream.fail(ChannelLayerClosed("the group's history was flushed"))
            await self._cancel_consumer(stream.queue, stream.tag)
            await self._delete_stream(stream.name)

    async def _delete_stream(self, name: str) -> None:
        declare_channel = self._declare_channel
        assert declare_channel is not None
        await self._broker(
            declare_channel, f"delete of stream {name!r}", lambda: declare_channel.queue_delete(name)
        )

    # ------------------------------------------------------------ presence
    # Kept in rabbitmq_presence.py: a replica of every participant's entries.

    def _replica(self) -> RabbitPresence:
        if self._presence_replica is None:
            self._presence_replica = RabbitPresence(self)
        return self._presence_replica

    async def _presence_put(self, group: str, channel: str, info: bytes) -> QueuedWrite:
        return await self._replica().put(group, channel, info)

    async def _presence_remove(self, group: str, channel: str) -> QueuedWrite | None:
        return await self._replica().remove(group, channel)

    def _presence_take_back(self, group: str, channel: str) -> None:
        self._replica().take_back(group, channel)

    async def _presence_read(self, group: str) -> dict[str, bytes]:
        return await self._replica().read(group)

    async def _presence_beat(self) -> bool:
        return await self._replica().beat()

    async def _presence_reap(self) -> list[tuple[str, str, bytes]]:
        return await self._replica().reap()

    # ---------------------------------------------------------- flush, close

    async def _flush(self) -> None:
        self._held_inbox.release(everything=True)  # into the mailboxes that flush() empties
        # Only what this instance declared or bound: AMQP cannot list queues.
        for queue in self._declared.values():
            try:
                await self._broker(self._declare_channel, f"purge of {queue.name!r}", queue.purge)
            except BackendUnavailable as exc:  # e.g. deleted by x-expires meanwhile
                logger.debug("flush: %s", exc)
        for channel, group in sorted(self._named_bindings):
            self._declared.discard(named_queue_name(self.queue_prefix, channel))
            queue = await self._declare_named(channel)
            name = queue.name
            key = group_routing_key(group)
            await self._broker(
                self._declare_channel,
                f"unbind of {name!r}",
                lambda queue=queue, key=key: queue.unbind(self.exchange_name, key),  # type: ignore[misc]
            )
        self._named_bindings.clear()
        await self._flush_history()
        if self._presence_replica is not None:
            await self._presence_replica.wipe()
        self.local_groups.clear()
        for group in sorted(self._bound):
            await self._sync_binding(group)
        for reader in self._readers.values():
            held, reader.held = list(reader.held), deque()
            for item in held:
                await self._claim(reader, item)

    async def _close(self) -> None:
        self._packer.close()
        self._held_inbox.close()
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(ChannelLayerClosed("the channel layer was closed"))
        for reader in self._readers.values():
            if reader.linger is not None:
                reader.linger.cancel()
        for stream in self._streams.values():
            stream.fail(ChannelLayerClosed("the channel layer was closed"))
        if self._presence_replica is not None:
            self._presence_replica.close()
        if self._publisher is not None:
            self._publisher.stop()  # from here on publishes need the writer task, which spawn refuses
        # Tasks first: one still using the connection would fail (and log) once it closes.
        await self.tasks.close(self.timeout)
        if self._connection is not None:
            await self._delete_inbox()
            await self._connection.close()

    async def _delete_inbox(self) -> None:
        # It outlives connections: gone now rather than inbox_expiry ms from now.
        inbox, tag = self._inbox, self._inbox_tag
        if inbox is None or tag is None or self._channel is None or self._channel.is_closed:
            return

        async def delete() -> None:
            # The consumer first: a consumer the broker cancels while the layer
            # is open is restored, declaring the queue again.
            await inbox.cancel(tag)
            await inbox.delete(if_unused=False, if_empty=False)

        try:
            await within(delete(), self.timeout, lambda: self.unavailable("no answer to the inbox delete"))
        except BackendUnavailable as exc:
            logger.debug("could not delete inbox %r (x-expires will): %s", inbox.name, exc)
        except self._errors as exc:
            logger.debug("could not delete inbox %r (x-expires will): %r", inbox.name, exc)
