"""The NATS backend: JetStream process inboxes, JetStream named channels, KV for groups.

Layout on the server, for ``prefix="app"`` (names are escaped into subject
tokens by :func:`subject_token`):

* ``app.i.<process-token>``: the one inbox of a layer instance, stored in the
  JetStream stream ``<stream_name>_INBOX`` (work-queue retention, messages
  kept at most ``channel_expiry``). Every process-specific channel of that
  instance, and every group it holds members of, receives through it: the
  channel or group name travels in front of the payload, with a message id,
  and the layer demultiplexes locally. A send returns once the stream has
  stored the message, and the instance's one durable push consumer
  (``fwi<process-token>``, deleted by the server ``channel_expiry`` after
  its process is gone) delivers it to ``app.p.<process-token>.d``, where
  every message is acknowledged after it reached the local mailbox. A
  message sent while its receiver reconnects therefore waits in the stream;
  one lost on a dropped connection is delivered again (``_INBOX_ACK_WAIT``),
  and the message id drops the second copy.
  ``app.p.<process-token>.c`` carries membership changes made by *other*
  processes (request/reply).
* KV key ``<group>.o.<process-token>``: the process holds members of the
  group. ``group_send`` lists these keys (one request) and stores one copy
  in the inbox of each such process, however many members they hold.
* ``app.n.<channel>``: named channels (no ``!``), stored in the JetStream
  stream ``stream_name`` with work-queue retention. Each named channel that a
  process reads has one durable pull consumer shared by every process, so
  every message is delivered once. ``app.n._anchor.<process-token>``: one
  empty message per reading process in that stream, which keeps its last
  file block in use (see ``_anchor_named_stream``).
* KV bucket ``group_bucket``: one key per (group, member),
  ``<group>.p.<member>`` or ``<group>.n.<member>``, whose value is the join
  time, and the owner keys above. The bucket's TTL is ``group_expiry``, so a member that is not added
  again expires on its own, on the server.
* ``app.h.<size>-<ttl ms>.<group>``: the history of a group matching a
  ``history`` pattern, in the stream ``<stream_name>_H<size>-<ttl ms>`` (one
  stream per distinct policy, created on first use, so groups without history
  cost nothing). The stream keeps ``size`` messages per group for ``ttl``
  seconds. Each entry carries its offset and epoch in headers; an append
  publishes offset ``n + 1`` with ``Nats-Expected-Last-Subject-Sequence`` set
  to the stream sequence of entry ``n``, so the server refuses it if another
  writer got there first, and offsets are contiguous per group.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.base import missing_driver
from fastapi_websockets.backends.broker import BrokerChannelLayer
from fastapi_websockets.backends.futures import wait_all
from fastapi_websockets.backends.locks import KeyedLocks, KeyedTurns, SharedRounds, Turn
from fastapi_websockets.backends.options import Memo, matching, positive, url
from fastapi_websockets.backends.packing import Packer, describe, pack
from fastapi_websockets.backends.timeouts import wait_event, within
from fastapi_websockets.backends.tls import client_context, require_secure, tls_failure
from fastapi_websockets.backends.urls import location, redact_url
from fastapi_websockets.backends.waiters import WaiterQueue
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelFull,
    ChannelLayerClosed,
    ChannelLayerError,
    InvalidChannelLayerConfig,
    MessageTooLarge,
)
from fastapi_websockets.history import POSITION_KEY, HistoryPolicy, HistorySlice, StreamPosition, new_epoch
from fastapi_websockets.names import is_process_specific, new_token, process_token
from fastapi_websockets.types import Message

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.api import ConsumerConfig, ConsumerInfo, StreamConfig
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

    from fastapi_websockets.backends.nats_presence import NatsPresence
    from fastapi_websockets.presence import QueuedWrite

__all__ = ["NATSChannelLayer", "consumer_name", "subject_token", "token_to_name"]

logger = logging.getLogger("fastapi_websockets.nats")

_T = TypeVar("_T")

_DEFAULT_SERVERS = ["nats://localhost:4222"]
_NOT_CONNECTED = "the NATS connection is not open: `await layer.start()` first (a closed layer cannot reopen)"
_SCHEMES = ("nats", "tls", "ws", "wss")
_SUBJECT_TOKENS = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_PROCESS_TOKEN = re.compile(r"[0-9a-f]{1,64}")
_JS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
#: A pull request lingers this long on the server; a safety net for requests lost
#: across a reconnect, not a poll interval (messages arrive by push meanwhile).
_PULL_EXPIRES = 5.0
_EXPIRES_HEADER = "Fw-Expires"
#: Empty pulls after which a waiting reader checks that its consumer still exists.
_CHECK_EVERY = 2
#: Seconds without pull requests after which the server deletes a named channel's consumer.
_CONSUMER_INACTIVE = 600.0
#: Last token of the KV key ``<group>.o.-named``, put when a named channel joins the group.
#: It sits among the owner keys (never a process token: those are hex), so the one listing
#: group_send makes also says whether the group may have named members to look up.
_NAMED_MARK = "-named"
#: One JetStream request may take this long before it is retried (within ``timeout``).
_ATTEMPT_TIMEOUT = 2.0
#: Headers of a history entry: its offset in the group, and the epoch of the group's history.
_OFFSET_HEADER = "Fw-Offset"
_EPOCH_HEADER = "Fw-Epoch"
_MSG_ID_HEADER = "Nats-Msg-Id"
_EXPECTED_HEADER = "Nats-Expected-Last-Subject-Sequence"
#: JetStream error codes: a publish whose expected last subject sequence is stale, a missing
#: stream, a subject without messages.
#: (A clustered stream's leader answers a stale expectation with 10164 before proposing it.)
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
_WRONG_SEQUENCE_SAYS_NEWEST = 10071  # its description ends with the newest sequence
_STREAM_NOT_FOUND = 10059
#: "No suitable peers for placement": fewer servers with JetStream online than the replicas
#: asked for (one restarting, or a cluster just started whose meta leader has not heard
#: from every server yet).
_NO_PEERS = 10005
_NO_MESSAGE = 10037
#: Seconds the server keeps a history reader's consumer should its deletion get lost.
_READER_IDLE = 30.0
#: Seconds a history read waits for a replica that lags behind the stream leader.
_REPLICA_LAG = 1.0
#: Positions of a group's history remembered with their stream sequences (see _read_round).
_MARKS = 16
#: Seconds after which the server delivers an inbox message again when its acknowledgement
#: did not come (it was lost with a dropped connection).
_INBOX_ACK_WAIT = 5.0
#: Seconds between the server's heartbeats to an idle inbox; two missed ones make the
#: layer check that its consumer still exists (a safety net, not a poll: they are pushed).
_INBOX_HEARTBEAT = 5.0
#: Seconds at most an inbox delivery waits for its acknowledgement when no other follows it
#: (see _on_delivery); well within _INBOX_ACK_WAIT, so that the server never sends it again.
_INBOX_ACK_DELAY = 0.2
#: A process that reads named channels stores an anchor message in their stream (see
#: _anchor_named_stream) and stores it again after this many of its acknowledgements,
#: or when it is half its life old.
_ANCHOR_EVERY = 256
#: Seconds the server keeps an anchor message that nothing replaces (its process went away).
_ANCHOR_TTL = 60.0
#: Fewest seconds the server keeps the inbox consumer of a process that went away.
_INBOX_MIN_IDLE = 30.0
#: Most unacknowledged inbox messages the server has out to one process at a time.
_INBOX_MAX_PENDING = 20_000
#: Ids of the newest inbox messages a layer remembers, to drop a second copy (a redelivery,
#: or a publish retried after its acknowledgement was lost).
_SEEN_IDS = 100_000
#: Frame of an inbox message: kind, message id, name length, then the name and the payload.
_FRAME = struct.Struct(">cQH")
_TO_CHANNEL = b"c"
_TO_GROUP = b"g"
#: Several sends to this process's channels in one stored message (``packing.pack``), no name.
_TO_CHANNELS = b"s"
#: Bytes of a packed inbox message beyond what the packer bounds: the frame header and the
#: pack's version byte.
_PACK_OVERHEAD = _FRAME.size + 1
#: Loop passes to wait for nats-py's flusher task before a flush (it takes one or two).
_FLUSHER_PASSES = 100
#: Seconds a new client must have lived for the delay before the next one to start over.
_HEALTHY_CLIENT = 30.0
#: Values of the ``inbox`` option: stored until acknowledged, or plain core publishes.
_INBOX_KINDS = ("jetstream", "core")


def subject_token(name: str) -> str:
    """Escape ``name`` into one subject token (also a valid KV key part).

    Letters, digits and ``-`` stay; every other byte of the UTF-8 encoding,
    ``_`` included, becomes ``_xx`` (lowercase hex). The mapping is reversible,
    so ``a.b``, ``a_b`` and ``a:b`` stay distinct, and no name can produce
    ``.``, ``*`` or ``>``.
    """
    return "".join(chr(byte) if byte in _SAFE else f"_{byte:02x}" for byte in name.encode())


def token_to_name(token: str) -> str:
    """Invert :func:`subject_token`."""
    # A token holds no "%" (it is escaped as "_25"), so "_xx" read as "%xx" is exact.
    return unquote(token.replace("_", "%"), errors="strict")


def consumer_name(channel: str) -> str:
    """The durable JetStream consumer shared by every reader of a named channel."""
    return "fw" + hashlib.sha256(channel.encode()).hexdigest()[:40]


def _server_urls(servers: object) -> list[str]:
    """The ``servers`` option as a list of NATS URLs with a scheme (nats-py assumes ``nats://``)."""
    if isinstance(servers, str):
        servers = [part.strip() for part in servers.split(",") if part.strip()]
    if isinstance(servers, (list, tuple)) and servers and all(isinstance(s, str) for s in servers):
        urls = [server if "://" in server else f"nats://{server}" for server in servers]
        if all(_is_server_url(server) for server in urls):
            return urls
        servers = [redact_url(server) for server in servers]
    raise InvalidChannelLayerConfig(
        f"servers must be a non-empty list of NATS URLs such as 'nats://host:4222', got {servers!r}"
    )


def _is_server_url(text: str) -> bool:
    try:
        parts = url("servers", text, _SCHEMES)
    except InvalidChannelLayerConfig:
        return False
    return bool(parts.hostname) and parts.path in ("", "/") and not any(c.isspace() for c in text)


@dataclass
class _NamedReader:
    """This process's reader of one named channel: its receivers and its pull subscription."""

    subject: str
    waiters: WaiterQueue[Message]
    pull: JetStreamContext.PullSubscription | None = None


@dataclass(frozen=True)
class _HistoryStore:
    """The stream holding the history of every group with one policy."""

    name: str
    #: A group's entries go to ``<subjects>.<group token>``.
    subjects: str
    policy: HistoryPolicy


@dataclass(frozen=True)
class _Entry:
    """One stored history entry: where it sits, who wrote it, when, and the encoded message."""

    seq: int
    offset: int
    epoch: str
    writer: str
    stamp: float
    data: bytes


class _RecentIds:
    """The ids of the last ``size`` messages seen: answers "seen before?" for each new one."""

    __slots__ = ("_order", "_seen", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: set[int] = set()
        self._order: deque[int] = deque()

    def first_time(self, msg_id: int) -> bool:
        """Record ``msg_id``; False if it was already among the recent ones."""
        if msg_id in self._seen:
            return False
        self._seen.add(msg_id)
        self._order.append(msg_id)
        if len(self._order) > self._size:
            self._seen.discard(self._order.popleft())
        return True


def _inbox_consumer(token: str) -> str:
    """The durable consumer of the inbox of the process ``token``."""
    return f"fwi{token}"


def _frame(kind: bytes, name: str, data: bytes) -> bytes:
    raw = name.encode()
    return _FRAME.pack(kind, random.getrandbits(64), len(raw)) + raw + data


class NATSChannelLayer(BrokerChannelLayer):
    """A channel layer on NATS, with JetStream for named channels and KV for groups.

    Options (besides the shared ones of :class:`BrokerChannelLayer`, ``timeout``
    included: the bound on connecting and on each JetStream call, transient
    failures such as a leader election being retried within it):

    * ``servers``: NATS URLs (comma-separated in ``FASTAPI_WEBSOCKETS_NATS_SERVERS``).
    * ``prefix``: first subject tokens of every subject the layer uses.
    * ``group_bucket``: the KV bucket of group membership.
    * ``stream_name``: the JetStream stream of named channels.
    * ``message_timeout``: seconds a named-channel message claimed by a
      receiver that dies before acknowledging it stays invisible to other
      receivers (the consumers' ack wait); then it is delivered again.
    * ``replicas``: JetStream replicas of the stream and the bucket (3 on a
      3-node cluster).
    * ``inbox``: how messages reach process-specific channels and groups.
      ``"jetstream"`` (the default): stored in the inbox stream until their
      process acknowledges them; ``send()``/``group_send()`` return once the
      server has stored them, so nothing accepted is lost across a server
      restart or a dropped connection; concurrent sends to one process are
      stored packed, one message for the lot. ``"core"``: plain core-NATS
      publishes, not packed, no faster point to point (measured in
      docs/backends/nats.md), and a message sent while its receiving process
      reconnects is lost. Every process sharing a ``prefix`` must use the
      same value.
    """

    backend_name = "nats"
    broker_label = "NATS"
    default_port = 4222

    def __init__(
        self,
        *,
        servers: list[str] = _DEFAULT_SERVERS,
        prefix: str = "fastapi-websockets",
        group_bucket: str = "fastapi_websockets_groups",
        stream_name: str = "FASTAPI_WEBSOCKETS",
        message_timeout: float = 60.0,
        replicas: int = 1,
        inbox: str = "jetstream",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.servers = _server_urls(servers)
        self.set_location(*self.servers)
        if self.tls_ca_file is not None:
            for server in self.servers:
                secure = server.startswith(("tls://", "wss://"))
                require_secure("servers", server, secure, "tls:// (or wss://) server URLs")
        self.prefix = matching(
            "prefix",
            prefix,
            _SUBJECT_TOKENS,
            "one or more '.'-separated subject tokens of letters, digits, '-' and '_'",
        )
        self.group_bucket = matching(
            "group_bucket", group_bucket, _JS_NAME, "a KV bucket name of 1-64 letters, digits, '-', '_'"
        )
        self.stream_name = matching(
            "stream_name", stream_name, _JS_NAME, "a stream name of 1-64 letters, digits, '-', '_'"
        )
        self.message_timeout = positive("message_timeout", message_timeout, "seconds")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
            raise InvalidChannelLayerConfig(f"replicas must be an integer from 1 to 5, got {replicas!r}")
        self.replicas = replicas
        if inbox not in _INBOX_KINDS:
            raise InvalidChannelLayerConfig(f"inbox must be one of {', '.join(_INBOX_KINDS)}, got {inbox!r}")
        self.inbox = inbox
        self._stored = inbox == "jetstream"

        self._inbox = f"{self.prefix}.p.{self.client_token}"
        self._kv_stream = f"KV_{self.group_bucket}"
        self._kv_subject_prefix = f"$KV.{self.group_bucket}."
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._msg_ttl = False
        self._stream_ready = False
        self._setup_lock = asyncio.Lock()
        self._readers: dict[str, _NamedReader] = {}
        self._named_sends = KeyedLocks()  # one capacity check and publish at a time per named channel
        #: Per named channel, the sequence of this layer's last publish (handed out before the
        #: next send's count, so a publish may name it) and the creation time of its stream.
        self._named_last: Memo[str, tuple[int, str | None]] = Memo()
        #: This layer's anchor message in the named channels' stream (see _anchor_named_stream):
        #: its sequence (0: none), the acknowledgements left before it is stored again, and
        #: loop.time() when it was stored.
        self._anchor_seq = 0
        self._anchor_due = 0
        self._anchor_at = 0.0
        # process token -> "<prefix>.p.<token>." (control requests)
        self._inboxes: Memo[str, str] = Memo(lambda token: f"{self.prefix}.p.{subject_token(token)}.")
        # process token -> "<prefix>.i.<token>" (the stored inbox)
        self._stored_inboxes: Memo[str, str] = Memo(lambda token: f"{self.prefix}.i.{subject_token(token)}")
        self._inbox_stream = f"{self.stream_name}_INBOX"
        self._inbox_consumer = _inbox_consumer(self.client_token)
        self._inbox_ready = False
        #: Set when the connection comes back, or heartbeats stop: the keeper checks the consumer.
        self._check_inbox = asyncio.Event()
        #: Set when nats-py has connected again, or closed: calls waiting for the connection go on.
        self._reconnected = asyncio.Event()
        #: loop.time() of the last message or heartbeat on the inbox.
        self._inbox_heard = 0.0
        self._seen = _RecentIds(_SEEN_IDS)
        # Concurrent sends to one process are stored as one message: one PubAck, one
        # delivery and one acknowledgement for them all.
        self._packer: Packer = self.make_packer(self._store_send, self._store_sends, confirmation="PubAck")
        #: The newest inbox delivery, taken in but not yet acknowledged (see _on_delivery).
        self._unacked: Msg | None = None
        #: Set when a delivery is held with none before it: _ack_late acknowledges it in time.
        self._ack_due = asyncio.Event()
        #: group -> loop.time() when this layer last put its owner key of the group.
        self._owned: dict[str, float] = {}
        #: group -> the other owners this layer's last group_send to it found: the next
        #: group_send stores their copies at once, while it lists the owners again.
        self._last_owners: Memo[str, tuple[str, ...]] = Memo()
        #: Group_sends to one group take turns to place their copies (see _group_send).
        self._group_turns = KeyedTurns()
        self._owner_locks = KeyedLocks()
        self._history_stores: Memo[HistoryPolicy, _HistoryStore] = Memo(self._history_store_of)
        self._history_ready: set[str] = set()
        #: history subject -> its newest entry as this layer last saw it (the next append's guess).
        self._newest: Memo[str, _Entry] = Memo()
        self._appending = KeyedLocks()
        #: history subject -> its last entries this layer read as newest or appended: where
        #: a read of what follows one of them can start in the stream.
        self._marks: Memo[str, deque[_Entry]] = Memo(lambda _: deque(maxlen=_MARKS))
        #: Concurrent reads of one group's history share one read per round (see _history_read).
        self._reading: SharedRounds[int, tuple[_Entry, list[_Entry]]] = SharedRounds(
            self.tasks.spawn, "history read"
        )
        #: nats-py's base error class, set when the driver is imported.
        self._driver_error: type[Exception] = ChannelLayerError
        #: What _retry retries (leader elections, reconnects), set when the driver is imported.
        self._transient: tuple[type[Exception], ...] = (asyncio.TimeoutError,)
        self._presence_kept: NatsPresence | None = None
        #: Making a new client in place of one nats-py closed for good (see _rebuild_later).
        self._rebuilding: asyncio.Task[None] | None = None
        #: Delays between new clients: kept across rebuilds, so that a cause that closes
        #: every new client at once is retried ever more slowly, not in a loop.
        self._rebuilds = self.backoff()
        #: time.monotonic() when the last new client was connected.
        self._built_at = 0.0
        #: Set while a client connects: the error for a login the server refused (see _connect).
        self._login_refusal: asyncio.Future[BaseException] | None = None

    # ------------------------------------------------------------ subjects

    def _named_subject(self, channel: str) -> str:
        return f"{self.prefix}.n.{subject_token(channel)}"

    def _process_subject(self, channel: str, kind: str) -> str:
        return self._inboxes(process_token(channel)) + kind

    def owner_key(self, group: str, token: str) -> str:
        """The KV key saying that the layer with process token ``token`` holds members of ``group``."""
        return f"{subject_token(group)}.o.{subject_token(token)}"

    @staticmethod
    def member_key(group: str, channel: str) -> str:
        """The KV key of one group member: ``<group>.<p|n>.<channel>``, escaped."""
        kind = "p" if is_process_specific(channel) else "n"
        return f"{subject_token(group)}.{kind}.{subject_token(channel)}"

    # ----------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        try:
            from nats.errors import ConnectionClosedError, NoRespondersError
            from nats.errors import Error as DriverError
            from nats.js.errors import NoStreamResponseError, ServiceUnavailableError
        except ImportError as exc:
            raise missing_driver("nats", exc) from exc
        self._driver_error = DriverError
        self._transient = (
            asyncio.TimeoutError,
            NoRespondersError,
            NoStreamResponseError,
            ServiceUnavailableError,
            # A call made with a client nats-py closed for good: _retry waits for the
            # new one (see _rebuild); once the layer is closed, it is not retried.
            ConnectionClosedError,
        )
        nc = await self._connect()
        self._use(nc)
        self.report_connection(True)
        if not self._stored:
            return
        try:
            await self._ensure_inbox()
        except BaseException:
            self._nc = self._js = None
            await nc.close()
            raise
        self.tasks.keep_running(self._keep_inbox, "inbox keeper")
        self.tasks.keep_running(self._ack_late, "inbox acknowledgements")

    async def _connect(self) -> Client:
        """A new connected client, subscribed to this layer's control and inbox subjects.

        Raises ``BackendUnavailable`` when no server takes it within ``timeout``;
        the client is closed on any failure, a cancellation included.
        """
        from nats.aio.client import Client

        nc = Client()
        # nats-py retries the first connection forever (max_reconnect_attempts=-1),
        # so a refused or failing connection shows up as our timeout; the message
        # names the last error nats-py met.
        error: ChannelLayerError | None = None
        try:
            # A refused login ends the wait at once (see _on_error): nats-py would retry it
            # until our timeout, as it does a refused connection.
            refusal = self._login_refusal = running_loop().create_future()
            await within(
                nc.connect(
                    servers=self.servers,
                    name=f"fastapi-websockets {self.client_token}",
                    # Our own group publishes are delivered locally without the round
                    # trip, so the server must not echo them back.
                    no_echo=True,
                    connect_timeout=max(1, math.ceil(self.timeout)),
                    # Without a CA file, nats-py verifies tls:// servers against the system's CAs.
                    tls=client_context(self.tls_ca_file) if self.tls_ca_file is not None else None,
                    # Typed int in nats-py but used as a sleep; half a second heals fast.
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    # Bound to their client: a callback of a client replaced meanwhile, or of
                    # one still connecting (see _on_disconnected), is ignored.
                    disconnected_cb=partial(self._on_disconnected, nc),
                    reconnected_cb=self._on_reconnected,
                    closed_cb=partial(self._on_closed, nc),
                ),
                self.timeout,
                lambda: self._connect_failed(nc),
                stop=refusal,
            )
            await nc.subscribe(f"{self._inbox}.c", cb=self._on_control)
            if self._stored:
                # A literal subject, not a wildcard: the server tells a push consumer
                # about interest in its exact deliver subject only.
                await nc.subscribe(f"{self._inbox}.d", cb=self._on_delivery)
            else:
                await nc.subscribe(self._stored_inboxes(self.client_token), cb=self._on_core_delivery)
            await _flush_in_order(nc, self.timeout)
        except BackendUnavailable as exc:
            error = exc
        except (OSError, asyncio.TimeoutError, self._driver_error) as exc:
            error = self._connect_failed(nc, exc)
        except BaseException:
            await nc.close()
            raise
        finally:
            self._login_refusal = None
        if error is not None:
            await nc.close()
            # Raised outside the handler, not chained: a driver error may quote the
            # server URL, password included.
            raise error
        return nc

    def _use(self, nc: Client) -> None:
        """Make ``nc`` the layer's client: its JetStream context, and what depends on its server."""
        self._nc = nc
        # Each JetStream request gets a short timeout and is retried until
        # ``timeout``: a request lost in a leader election is sent again instead
        # of being waited for until the very end.
        self._js = nc.jetstream(timeout=min(_ATTEMPT_TIMEOUT, self.timeout))
        # The bucket's handle holds the JetStream context it was made with.
        self._kv = None
        version = nc.connected_server_version
        # Per-message TTL (Nats-TTL) exists from server 2.11; older servers accept
        # and ignore it, so only use it where it works.
        self._msg_ttl = (version.major, version.minor) >= (2, 11)
        self._bound_packs()

    def _bound_packs(self) -> None:
        """Bound packed sends by the ``max_payload`` of the server connected to now.

        It may be below ``max_message_size``, and differ between the servers of
        ``servers`` (nats-py reads it from each server's INFO on every connect):
        sends that fit it alone must not fail for having been packed together.
        """
        self._packer.max_bytes = min(self.max_message_size, self.nc.max_payload) - _PACK_OVERHEAD

    def _login_failed(self, exc: Exception) -> ChannelLayerError:
        return self.login_refused(
            str(exc),
            "check the user and password (or token) in the servers' URLs against the server's "
            "authorization block or accounts",
        )

    def _connect_failed(self, nc: Client, exc: BaseException | None = None) -> ChannelLayerError:
        last = exc or nc.last_error
        if isinstance(last, Exception) and _login_refused(last):
            return self._login_failed(last)
        if last is not None and tls_failure(last) is not None:
            return self.unavailable(last)
        reason = f"no connection within {self.timeout} s"
        if last is not None:
            reason += f"; last error: {type(last).__name__}: {last}"
        return self.unavailable(reason)

    async def _close(self) -> None:
        self._packer.close()
        await self._forget_local_members()
        await self._drop_inbox_consumer()
        # nats-py can swallow a cancellation that races with a reply (asyncio.wait_for
        # on Python 3.11): closing the connection makes such a task's next call fail.
        await self.tasks.close(self.timeout, unblock=self._disconnect)
        # After the readers stopped, which store it; left behind, it expires (_ANCHOR_TTL).
        await self._drop_anchor()
        await self._disconnect()

    async def _disconnect(self) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        try:
            # Hand queued publishes (a group_send just before close) to the server.
            await _flush_in_order(nc, 1)
        except (asyncio.TimeoutError, self._driver_error) as exc:
            logger.debug("flush before close failed: %s", self.redact(repr(exc)))
        try:
            await nc.close()
        except OSError as exc:
            # The connection died as it was closed (the server went away): closed all the same.
            logger.debug("closing the NATS connection: %s", self.redact(repr(exc)))

    async def _forget_local_members(self) -> None:
        """Remove this layer's channels from the bucket: they die with the layer.

        Best effort, bounded by ``timeout``; what is left expires with the
        bucket's TTL (``group_expiry``).
        """
        kv = self._kv
        if kv is None or self._nc is None or not self._nc.is_connected:
            return
        keys = [
            self.member_key(group, channel)
            for group in self.local_groups.groups()
            for channel in self.local_groups.members(group)
        ]
        keys += [self.owner_key(group, self.client_token) for group in self._owned]
        if not keys:
            return
        try:
            results = await within(
                asyncio.gather(*(self._forget(kv, key) for key in keys), return_exceptions=True),
                self.timeout,
                lambda: self.unavailable(f"removing {len(keys)} member keys on close timed out"),
            )
        except BackendUnavailable as exc:
            logger.debug("%s", exc)
            return
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            logger.debug(
                "removing member keys on close: %d of %d failed: %s",
                len(failed),
                len(keys),
                self.redact(repr(failed[0])),
            )

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import NoServersError, StaleConnectionError, UnexpectedEOF

        if _login_refused(exc):
            refusal = self._login_refusal
            if refusal is not None and not refusal.done():
                refusal.set_result(self._login_failed(exc))  # the first connection: fail it now
            else:
                # Logged at ERROR once per outage; nats-py keeps retrying meanwhile.
                self._login_failed(exc)
            return
        if isinstance(
            exc, (OSError, asyncio.TimeoutError, NoServersError, StaleConnectionError, UnexpectedEOF)
        ):
            # Refused or dropped connections repeat every reconnect attempt; the
            # disconnect itself is logged once, as a warning.
            logger.debug("NATS connection error: %s", self.redact(repr(exc)))
        else:
            logger.warning("NATS error: %s", self.redact(repr(exc)))

    async def _on_disconnected(self, nc: Client) -> None:
        # Only for the layer's client, and only when nats-py will reconnect it: nats-py calls
        # this on every close too, so each failed attempt of _connect (a first start, or a
        # rebuild that its caller reports) and a client closed for good (_rebuild_later says
        # so) would otherwise each add a "reconnecting" that never comes.
        if not self.closed and nc is self._nc and not nc.is_closed:
            self.report_connection(False)
            logger.warning("disconnected from NATS; reconnecting (pending receives keep waiting)")

    async def _on_reconnected(self) -> None:
        # nats-py re-sends every SUB (inbox deliveries, pull inboxes) on reconnect, so
        # the inbox consumer resumes by itself (the keeper checks it still exists);
        # named-channel readers re-issue their pull requests within _PULL_EXPIRES.
        self._check_inbox.set()
        self._reconnected.set()
        if self._nc is not None:
            self._bound_packs()
        url = self._nc.connected_url if self._nc is not None else None
        where = location(url.geturl(), self.default_port) if url is not None else "?"
        logger.info("reconnected to NATS at %s", where)
        self.report_connection(True)

    async def _on_closed(self, nc: Client) -> None:
        self._reconnected.set()
        self._rebuild_later(nc)

    def _rebuild_later(self, nc: Client) -> None:
        """Start making a new client in place of ``nc``, closed for good while the layer is open.

        nats-py closes its client for good on any error a server reports on a live
        connection but a stale connection or a permissions violation (more
        subscriptions than the server allows, a buffered publish over its
        max_payload), and when ``max_reconnect_attempts`` runs out: it never
        reconnects it. Idempotent; nothing happens for a client the layer closed,
        one already replaced, or while the layer starts (``_start`` fails instead).
        """
        if self.closed or not self._started or self._nc is not nc or self._rebuilding is not None:
            return
        self.report_connection(False)
        logger.warning(
            "the NATS client closed for good (%s); connecting a new one (pending receives keep waiting)",
            self.redact(repr(nc.last_error)),
        )
        self._rebuilding = self.tasks.spawn(self._rebuild(), "client rebuild")

    async def _rebuild(self) -> None:
        """Connect a new client, with backoff, and restore what the closed one carried.

        The control and inbox subscriptions come with the client (``_connect``);
        the keeper checks the inbox consumer (the server deletes it after its
        inactive threshold without a client); named-channel readers bind again
        when their pull fails on the closed client, and the bucket's handle is
        made again on first use. JetStream calls waiting meanwhile go on.
        """
        backoff = self._rebuilds
        if time.monotonic() - self._built_at >= _HEALTHY_CLIENT:
            backoff.reset()
        failed = 0
        try:
            while True:
                # Before the first attempt too: a cause that stays (a receiver on more
                # named channels than the server's max_subscriptions allows) closes the
                # next client as well, and must not make a new connection per loop turn.
                await backoff.sleep()
                try:
                    nc = await self._connect()
                except BackendUnavailable as exc:
                    # One outage, one story: closed for good, why the first new client failed,
                    # connected again; the attempts between at debug.
                    log = logger.debug if failed else logger.warning
                    failed += 1
                    log("connecting a new NATS client failed (%s); trying again (attempt %d)", exc, failed)
                    continue
                break
        finally:
            self._rebuilding = None
        # The held delivery was the old client's to acknowledge: the server delivers it
        # again after _INBOX_ACK_WAIT, and its id drops that copy.
        self._unacked = None
        self._use(nc)
        self._built_at = time.monotonic()
        self._check_inbox.set()
        self._reconnected.set()
        url = nc.connected_url
        where = location(url.geturl(), self.default_port) if url is not None else "?"
        logger.info("connected a new NATS client to %s", where)
        self.report_connection(True)

    async def _until_connected(self, deadline: float, what: str) -> None:
        """Wait until the layer's client is connected, up to ``deadline`` (loop time).

        Through a reconnect, and through the making of a new client when nats-py
        closed the old one for good (returns at once once the layer is closed).
        Handed a publish while it reconnects, nats-py checks it against the
        previous server's ``max_payload`` and buffers it; a server taking less
        ends the connection on it, and nats-py closes its client for good.
        Published once connected, a message too large for the new server is
        refused by nats-py alone (``MessageTooLarge``), and requests do not pile
        up in the buffer, one per retry.
        """
        loop = running_loop()
        while True:
            nc = self._nc
            if nc is None or nc.is_connected or self.closed:
                return
            if nc.is_closed:
                # Its closed callback may not have run yet (nats-py closes first).
                self._rebuild_later(nc)
            # Set only by the callbacks and _rebuild: cleared here, it says the next connection.
            self._reconnected.clear()
            if not await wait_event(self._reconnected, max(0.0, deadline - loop.time())):
                raise self.unavailable(f"{what}: not connected within {self.timeout} s (reconnecting)")

    def _translate(self, exc: BaseException, what: str, size: int = 0) -> ChannelLayerError:
        """Our error for a driver error, naming the operation."""
        from nats.errors import (
            ConnectionClosedError,
            MaxPayloadError,
            NoRespondersError,
            OutboundBufferLimitError,
        )
        from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

        if isinstance(exc, MaxPayloadError):
            # Refused by nats-py against the max_payload the server announced: the
            # layer's max_message_size is not the limit here, the server's is.
            nc = self._nc
            url = nc.connected_url if nc is not None else None
            server = location(url.geturl(), self.default_port) if url is not None else self.where
            limit = nc.max_payload if nc is not None else 0
            return MessageTooLarge(max(size, limit + 1), limit, server=server)
        if isinstance(
            exc,
            (
                asyncio.TimeoutError,
                NoRespondersError,
                NoStreamResponseError,
                ServiceUnavailableError,
                OutboundBufferLimitError,
            ),
        ):
            return self.unavailable(f"{what} failed within {self.timeout} s: {type(exc).__name__}")
        if isinstance(exc, ConnectionClosedError):
            if self.closed:
                return ChannelLayerClosed("the channel layer was closed")
            return self.unavailable(f"{what} failed: the connection is closed")
        return ChannelLayerError(f"NATS {what} failed: {self.redact(repr(exc))}")

    async def _retry(
        self,
        what: str,
        call: Callable[[], Awaitable[_T]],
        recover: Callable[[], Awaitable[None]] | None = None,
        also: tuple[type[Exception], ...] = (),
        size: int = 0,
    ) -> _T:
        """Run a JetStream request, retrying transient failures until ``timeout``.

        Transient: no responders or timeouts while a stream leader is elected or
        the connection is re-established, and the errors in ``also``. Anything
        else fails at once. When no stream answers a publish, ``recover`` (once)
        re-creates the stream or bucket, in case the server lost its JetStream state.
        ``size``: the bytes a publish carries, for the error if the server's
        ``max_payload`` is smaller.
        """
        transient = self._transient + also if also else self._transient
        loop = running_loop()
        deadline = loop.time() + self.timeout
        backoff = self.backoff()
        while True:
            nc = self._nc
            if nc is not None and not nc.is_connected:
                await self._until_connected(deadline, what)
            try:
                return await call()
            except transient as exc:
                delay = backoff.next()
                if self.closed or loop.time() + delay >= deadline:
                    raise self._translate(exc, what, size) from exc
                logger.debug("NATS %s: %r; retrying in %.2f s", what, exc, delay)
                from nats.js.errors import NoStreamResponseError  # imported at _start: a lookup

                if recover is not None and isinstance(exc, NoStreamResponseError):
                    again: Callable[[], Awaitable[None]] = recover
                    recover = None
                    try:
                        await again()
                    except ChannelLayerError as error:
                        logger.debug("NATS %s: recovery failed: %s", what, error)
            except self._driver_error as exc:
                raise self._translate(exc, what, size) from exc
            await asyncio.sleep(delay)

    @property
    def nc(self) -> Client:
        """The layer's NATS connection (connected lazily on first use)."""
        if self._nc is None:
            raise ChannelLayerClosed(_NOT_CONNECTED)
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The layer's JetStream context (created with the connection)."""
        if self._js is None:
            raise ChannelLayerClosed(_NOT_CONNECTED)
        return self._js

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        async with self._setup_lock:
            if self._stream_ready:
                return
            wanted = f"{self.prefix}.n.>"
            config = StreamConfig(
                name=self.stream_name,
                subjects=[wanted],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                allow_msg_ttl=True if self._msg_ttl else None,
                # Servers without per-message TTL bound the age stream-wide.
                max_age=None if self._msg_ttl else self.channel_expiry,
            )
            await self._stream_with(config, "stream")
            self._stream_ready = True

    async def _bucket(self) -> KeyValue:
        if self._kv is not None:
            return self._kv
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError

        async with self._setup_lock:
            if self._kv is None:
                config = KeyValueConfig(
                    bucket=self.group_bucket,
                    history=1,
                    # Per-member expiry on the server: a key not put again within
                    # group_expiry goes away. Set by the first layer to create it.
                    ttl=self.group_expiry,
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                )
                self._kv = await self._get_or_create(
                    f"setup of KV bucket {self.group_bucket}",
                    lambda: self.js.key_value(self.group_bucket),
                    lambda: self.js.create_key_value(config),
                    BucketNotFoundError,
                )
            return self._kv

    async def _in_bucket(self, what: str, call: Callable[[KeyValue], Awaitable[_T]]) -> _T:
        """``call(bucket)`` on the group bucket, retried as ``_retry`` does (the bucket made again if lost).

        The bucket's handle is taken anew on each attempt: one made for a new
        client (see ``_rebuild``) replaces the closed client's.
        """

        async def attempt() -> _T:
            return await call(await self._bucket())

        return await self._retry(what, attempt, self._recover_bucket)

    async def _get_or_create(
        self,
        what: str,
        get: Callable[[], Awaitable[_T]],
        create: Callable[[], Awaitable[_T]],
        missing: type[Exception],
    ) -> _T:
        """``get()`` a stream or bucket, ``create()`` it if ``missing`` says it does not exist."""
        from nats.js.errors import BadRequestError

        try:
            return await self._retry(what, get)
        except ChannelLayerError as exc:
            if not isinstance(exc.__cause__, missing):
                raise

        async def create_when_placed() -> _T:
            try:
                return await create()
            except BadRequestError as exc:
                if exc.err_code == _NO_PEERS:
                    # Not a stream made elsewhere (waited for below): a server it needs is
                    # not counted online yet, seen under load on a cluster just started.
                    raise _NotPlaced(exc.description) from exc
                raise

        try:
            return await self._retry(what, create_when_placed, also=(_NotPlaced,))
        except ChannelLayerError as exc:
            if isinstance(exc.__cause__, _NotPlaced):
                raise ChannelLayerError(
                    f"NATS {what} failed: the servers could not place its {self.replicas} replicas "
                    f"within {self.timeout} s ({exc.__cause__}); start the servers that are "
                    "missing, or lower replicas"
                ) from exc.__cause__.__cause__
            if not isinstance(exc.__cause__, BadRequestError):
                raise
            refused = exc
        # Created by another process meanwhile (or a clash the caller reports). In a
        # cluster the new stream can still answer "not found" for a moment, until its
        # group has formed (seen in CI: two layers starting on a fresh 3-node cluster),
        # so that is waited out within ``timeout`` rather than taken as final.
        try:
            return await self._retry(what, get, also=(missing,))
        except ChannelLayerError as exc:
            if not isinstance(exc.__cause__, missing):
                raise
            why = getattr(refused.__cause__, "description", None) or repr(refused.__cause__)
            raise ChannelLayerError(
                f"NATS {what} failed: the server refused to create it ({why}) and it still "
                f"does not exist after {self.timeout} s; if another stream holds its "
                "subjects, choose another stream_name or prefix"
            ) from refused.__cause__

    async def _stream_with(self, config: StreamConfig, kind: str) -> None:
        """Get the stream ``config`` names, creating it with ``config`` if it does not exist.

        A stream of that name made for other subjects (another app's, or ours
        under another prefix) is refused rather than shared: ``kind`` names it
        in the error, which says how to choose another.
        """
        from nats.js.errors import NotFoundError

        name, wanted = config.name, (config.subjects or [""])[0]
        assert name is not None  # every config here names its stream
        info = await self._get_or_create(
            f"setup of {kind} {name}",
            lambda: self.js.stream_info(name),
            lambda: self.js.add_stream(config),
            NotFoundError,
        )
        subjects = info.config.subjects or []
        if wanted not in subjects:
            raise InvalidChannelLayerConfig(
                f"the {kind} {name!r} exists with subjects {subjects}, not {wanted!r}; "
                "choose another stream_name or prefix"
            )

    async def _recover_stream(self) -> None:
        self._stream_ready = False
        await self._ensure_stream()

    async def _recover_bucket(self) -> None:
        self._kv = None
        await self._bucket()

    # ------------------------------------------------------------------ inbox

    async def _ensure_inbox(self) -> bool:
        """Create the inbox stream and this layer's consumer on it, where they are missing.

        Returns whether the consumer had to be created.
        """
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        await self._ensure_inbox_stream()
        config = ConsumerConfig(
            durable_name=self._inbox_consumer,
            deliver_subject=f"{self._inbox}.d",
            filter_subject=self._stored_inboxes(self.client_token),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=_INBOX_ACK_WAIT,
            max_ack_pending=_INBOX_MAX_PENDING,
            idle_heartbeat=_INBOX_HEARTBEAT,
            # The server deletes the consumer of a process gone for this long; what
            # it held would have expired by then anyway.
            inactive_threshold=max(self.channel_expiry, _INBOX_MIN_IDLE),
            num_replicas=self.replicas,
            description=f"fastapi-websockets inbox of process {self.client_token}",
        )
        what = "setup of this process's inbox consumer"
        try:
            try:
                await self._retry(
                    what, lambda: self.js.consumer_info(self._inbox_stream, self._inbox_consumer)
                )
                created = False
            except ChannelLayerError as exc:
                if not isinstance(exc.__cause__, NotFoundError):
                    raise
                await self._retry(what, lambda: self.js.add_consumer(self._inbox_stream, config))
                created = True
        except ChannelLayerError as exc:
            if _error_code(exc) != _STREAM_NOT_FOUND:
                raise
            # The stream went away since we last saw it: next time, create it first.
            self._inbox_ready = False
            raise self.unavailable("the inbox stream disappeared while its consumer was created") from exc
        self._inbox_heard = time.monotonic()
        return created

    async def _ensure_inbox_stream(self) -> None:
        if self._inbox_ready:
            return
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        wanted = f"{self.prefix}.i.*"
        config = StreamConfig(
            name=self._inbox_stream,
            description="fastapi-websockets process inboxes: messages wait here for their process",
            subjects=[wanted],
            # Each process's consumer filters its own subject; an acknowledged message
            # goes away, one for a process that is gone expires.
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            max_age=self.channel_expiry,
        )
        await self._stream_with(config, "inbox stream")
        self._inbox_ready = True

    async def _recover_inbox_stream(self) -> None:
        self._inbox_ready = False
        await self._ensure_inbox_stream()

    async def _keep_inbox(self) -> None:
        """The keeper: after a reconnect, or when the server's heartbeats stop, check the consumer.

        The server may have lost it (its JetStream data) or deleted it (the
        process was away longer than the consumer's inactive threshold); it is
        created again, and what waits in the stream for this process follows.
        """
        backoff = self.backoff()
        while True:
            await wait_event(self._check_inbox, _INBOX_HEARTBEAT)
            if not self.nc.is_connected:
                # The reconnect sets it again (_on_reconnected). Left set (by a failed
                # check, or a reconnect the connection did not outlive), the wait above
                # would return at once and this loop never yield: the event loop froze,
                # and with it the reconnect.
                self._check_inbox.clear()
                continue
            silent = time.monotonic() - self._inbox_heard > 2 * _INBOX_HEARTBEAT
            if not (self._check_inbox.is_set() or silent):
                continue
            self._check_inbox.clear()
            try:
                if await self._ensure_inbox():
                    # The server lost its state, or forgot this process: so were its
                    # owner keys, maybe. Put them back, or no group_send comes here.
                    logger.warning("the NATS server had lost this process's inbox; created it again")
                    self._owned.clear()
                    for group in self.local_groups.groups():
                        await self._own(group)
            except BackendUnavailable as exc:
                logger.debug("inbox check failed (%s); trying again", exc)
                self._check_inbox.set()
                await backoff.sleep()
                continue
            backoff.reset()

    async def _drop_inbox_consumer(self) -> None:
        """Delete this layer's inbox consumer on close (else the server does, after its threshold)."""
        if self._nc is None or not self._nc.is_connected or self._js is None or not self._stored:
            return
        # Confirmed before the consumer goes: an acknowledgement that reaches the server
        # after the deletion is dropped, and its message would wait until channel_expiry.
        await self._ack_held(confirmed=True)
        try:
            # Briefly: the server deletes it after its inactive threshold anyway.
            await within(
                self.js.delete_consumer(self._inbox_stream, self._inbox_consumer),
                min(self.timeout, 1.0),
                lambda: self.unavailable("deleting the inbox consumer on close timed out"),
            )
        except (BackendUnavailable, OSError, asyncio.TimeoutError, self._driver_error) as exc:
            logger.debug("deleting the inbox consumer on close failed: %s", self.redact(repr(exc)))

    async def _store_in_inbox(self, token: str, payload: bytes, what: str) -> None:
        """Store ``payload`` in the inbox of the process ``token``; return once the stream has it.

        Retried (the same message id, so the receiver drops a second copy)
        until ``timeout``: a publish lost with a dropped connection, or made
        while the server restarts, is made again.
        """
        subject = self._stored_inboxes(token)
        if self._stored:
            await self._retry(
                what, lambda: self.js.publish(subject, payload), self._recover_inbox_stream, size=len(payload)
            )
            return
        nc = self.nc
        if not nc.is_connected:
            # nats-py would buffer it and report success; it may then be lost.
            raise self.unavailable(f"{what}: not connected (reconnecting)")
        try:
            await nc.publish(subject, payload)
        except (asyncio.TimeoutError, self._driver_error) as exc:
            raise self._translate(exc, what, len(payload)) from exc

    async def _on_delivery(self, msg: Msg) -> None:
        """One message (or heartbeat) from this layer's inbox consumer."""
        self._inbox_heard = time.monotonic()
        if not msg.reply:
            return  # an idle heartbeat
        self._accept(msg.data)
        # Acknowledged one delivery late: an acknowledged message leaves the work-queue
        # stream, and when that empties its last file block nats-server creates a new
        # block file and deletes the old one, a file system round per message that cost
        # the server more CPU than the rest of the message did (docs/performance/nats.md,
        # "Why a run's rates moved 3x"). With the newest delivery held, the
        # stream keeps a message while deliveries follow each other; one left alone is
        # acknowledged by _ack_late within _INBOX_ACK_DELAY. Redelivery is unchanged: a
        # held message comes again only if its acknowledgement never came, and its id drops it.
        held, self._unacked = self._unacked, msg
        if held is None:
            self._ack_due.set()
        else:
            await self._ack(held)

    async def _ack_late(self) -> None:
        """Acknowledge a held inbox delivery at most ``_INBOX_ACK_DELAY`` after it was held."""
        while True:
            await self._ack_due.wait()
            await asyncio.sleep(_INBOX_ACK_DELAY)
            self._ack_due.clear()
            await self._ack_held()

    async def _ack_held(self, *, confirmed: bool = False) -> None:
        """Acknowledge the held inbox delivery now, if there is one."""
        held, self._unacked = self._unacked, None
        if held is not None:
            await self._ack(held, confirmed=confirmed)

    async def _ack(self, msg: Msg, *, confirmed: bool = False) -> None:
        """Acknowledge one inbox delivery: a core publish, or (``confirmed``) a request the server answers."""
        try:
            if confirmed:
                await msg.ack_sync(timeout=min(self.timeout, 1.0))
            else:
                await msg.ack()
        except (self._driver_error, asyncio.TimeoutError) as exc:
            # The server delivers it again after _INBOX_ACK_WAIT; its id drops that copy.
            logger.debug("inbox ack failed: %r", exc)

    async def _on_core_delivery(self, msg: Msg) -> None:
        """One message published straight to this layer's inbox subject (``inbox="core"``)."""
        self._accept(msg.data)

    def _accept(self, data: bytes) -> None:
        """Demultiplex one inbox message to its channel or group, unless it came before."""
        try:
            kind, msg_id, size = _FRAME.unpack_from(data)
            name = data[_FRAME.size : _FRAME.size + size].decode()
        except (struct.error, UnicodeDecodeError):
            logger.warning("dropped a malformed message from the inbox (%d bytes)", len(data))
        else:
            if self._seen.first_time(msg_id):
                self._deliver_from_inbox(kind, name, data[_FRAME.size + size :])

    def _deliver_from_inbox(self, kind: bytes, name: str, payload: bytes) -> None:
        if kind == _TO_CHANNELS:
            self.deliver_packed(payload)
            return
        if kind == _TO_CHANNEL:
            self.deliver_sent(name, payload)
            return
        if kind != _TO_GROUP:
            logger.warning("dropped an inbox message of unknown kind %r", kind)
            return
        message = self.decode_or_drop(payload, f"inbox (group {name!r})")
        if message is None:
            return
        self.deliver_to_local_members(name, message)
        if name not in self.local_groups and name in self._owned and not self.closed:
            # Every local member expired: other processes may stop sending here.
            self.tasks.spawn(self._disown_quietly(name), f"disowning {name!r}")

    # --------------------------------------------------------- point to point

    async def _send_remote(self, channel: str, data: bytes) -> None:
        if is_process_specific(channel):
            if self._stored:
                # The server's cost is per stored message (its PubAck, delivery and
                # acknowledgement): concurrent sends to one process are stored packed.
                await self._packer.send(process_token(channel), channel, data)
            else:
                await self._store_send(process_token(channel), channel, data)
            return
        await self._send_named(channel, data)

    async def _store_send(self, token: str, channel: str, data: bytes) -> None:
        await self._store_in_inbox(token, _frame(_TO_CHANNEL, channel, data), f"send to {channel!r}")

    async def _store_sends(self, token: str, frames: list[tuple[str, bytes]]) -> None:
        # One message id for the pack: a retried publish, or a redelivery, is dropped whole.
        try:
            await self._store_in_inbox(token, _frame(_TO_CHANNELS, "", pack(frames)), describe(frames))
        except MessageTooLarge:
            # Packed for the server before a reconnect (the new one takes less, and
            # _on_reconnected may not have run yet): the packer takes the sends again
            # under the new bound.
            self._bound_packs()
            raise

    async def _send_named(self, channel: str, data: bytes) -> None:
        subject = self._named_subject(channel)
        # Senders of this process take turns per channel: the server takes one
        # conditional publish per channel at a time, so the others would only be
        # refused and count the channel again (docs/backends/nats.md, Limits).
        # The turn is taken first, before anything that may wait, so turns follow
        # call order: a send made once the stream was ready went ahead of earlier
        # ones still queued on the stream's setup.
        async with self._named_sends.hold(subject):
            await self._ensure_stream()
            await self._check_and_publish(channel, subject, data)

    async def _js_request(self, api: str, request: dict[str, Any]) -> dict[str, Any]:
        """One attempt at the JetStream API request ``$JS.API.<api>``; its decoded reply.

        For requests whose reply this layer reads only a few fields of, where
        nats-py's own call would build every field as dataclasses (or do more, as
        ``delete_msg``'s erase). An error reply raises nats-py's matching
        ``APIError`` subclass, as its own calls do, so ``_retry`` and
        ``_error_code`` treat both alike.
        """
        from nats.js.errors import APIError

        timeout = min(_ATTEMPT_TIMEOUT, self.timeout)
        message = await self.nc.request(f"$JS.API.{api}", json.dumps(request).encode(), timeout=timeout)
        reply: dict[str, Any] = json.loads(message.data)
        if "error" in reply:
            APIError.from_error(reply["error"])  # raises the matching APIError subclass
        return reply

    async def _check_and_publish(self, channel: str, subject: str, data: bytes) -> None:
        """Store ``data`` on a named channel unless it holds ``capacity`` messages, exactly.

        The stream counts a subject's messages but a publish does not check that
        count, so the publish is conditional (``Nats-Expected-Last-Subject-Sequence``):
        the server stores it only if the subject's newest stored message has the
        sequence named, 0 meaning "none stored". Let ``c`` < ``capacity`` be the
        count read and ``bound`` a sequence handed out before it was read (this
        layer's own last publish to the channel, or the newest sequence the server
        reported before the count). A publish naming any ``n`` <= ``bound`` is exact:

        - ``n`` = 0: stored only if the channel holds nothing then (whatever other
          processes stored after the count makes it refused); capacity is >= 1.
        - ``n`` > 0: accepted means no stored message is newer than ``n``; sequences
          are handed out in order, so every message stored then was stored before
          the count and only deletions (consumers, expiry) came since: the channel
          holds at most ``c``.

        The publish names ``bound`` when the count saw messages, else 0. A refusal
        reports the channel's newest sequence. 0 (a reader emptied the channel
        since the count) is named next without counting again: 0 needs no count.
        Any other is the next ``bound``, handed out before the count made next.
        Until ``timeout``. So a send costs two requests (count, publish) whether a
        reader keeps the channel empty or none reads, three when a reader takes
        the newest message in between. A stream made again (the server lost it)
        starts its sequences over, so a remembered ``bound`` is used only while
        the stream's ``created`` time, which the count's reply carries, is the one
        it was remembered with; and a refusal's sequence other than 0 is named
        only after counting again, since the refusal may come from a stream made
        again after the count (0 is exact in any stream).
        """
        capacity = self.capacity_for(channel)
        what = f"send to {channel!r}"
        headers = {
            _EXPIRES_HEADER: repr(time.time() + self.channel_expiry),
            # Retries after a lost ack are stored once (the stream's duplicate window).
            _MSG_ID_HEADER: new_token(12),
        }
        ttl = max(1, math.ceil(self.channel_expiry)) if self._msg_ttl else None
        loop = running_loop()
        deadline = loop.time() + self.timeout
        # Our own last publish is usually the newest or consumed; with none
        # remembered the newest is read first (it must precede the count).
        bound, created = self._named_last.get(subject) or (None, None)
        made = None
        expected = None
        while True:
            if expected is None:
                if bound is None:
                    bound = await self._last_named_seq(subject, what)
                stored, made = await self._count_named(subject, what)
                if created is not None and made != created:
                    # The stream was made again (the server lost it): its sequences
                    # start over, so a remembered one says nothing about the count.
                    bound = created = None
                    continue
                if stored >= capacity:
                    raise ChannelFull(channel, capacity)
                expected = bound if stored else 0
            headers[_EXPECTED_HEADER] = str(expected)
            try:
                ack = await self._retry(
                    what,
                    lambda: self.js.publish(
                        subject, data, stream=self.stream_name, headers=headers, msg_ttl=ttl
                    ),
                    self._recover_stream,
                    size=len(data),
                )
            except ChannelLayerError as exc:
                if _error_code(exc) not in _WRONG_LAST_SEQUENCE:
                    raise
                if loop.time() >= deadline:
                    raise self.unavailable(
                        f"{what}: other senders kept storing for {self.timeout} s"
                    ) from None
                newest = _newest_in_refusal(exc)
                if newest == 0:
                    expected = 0  # emptied since the count
                else:
                    bound, created, expected = newest, None, None
                continue
            self._named_last.add(subject, (ack.seq, made))
            return

    async def _count_named(self, subject: str, what: str) -> tuple[int, str | None]:
        """How many messages a named channel holds, and its stream's ``created`` time (one request).

        A STREAM.INFO request of our own: nats-py's ``stream_info`` builds the
        stream's whole config and state as dataclasses for the two fields a send
        needs, a quarter of the request's CPU in this process (about 60 of 230 µs).
        """
        api = f"STREAM.INFO.{self.stream_name}"

        async def call() -> tuple[int, str | None]:
            reply = await self._js_request(api, {"subjects_filter": subject})
            return (reply["state"].get("subjects") or {}).get(subject, 0), reply.get("created")

        return await self._on_named_stream(what, call)

    async def _last_named_seq(self, subject: str, what: str) -> int:
        """The stream sequence of a named channel's newest stored message; 0 when it has none."""
        try:
            raw = await self._on_named_stream(what, lambda: self.js.get_last_msg(self.stream_name, subject))
        except ChannelLayerError as exc:
            if _error_code(exc) == _NO_MESSAGE:
                return 0
            raise
        return raw.seq or 0

    async def _on_named_stream(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """A request about the named-channel stream; made again once if the server lost the stream."""
        try:
            return await self._retry(what, call)
        except ChannelLayerError as exc:
            if _error_code(exc) != _STREAM_NOT_FOUND:
                raise
            await self._recover_stream()
            return await self._retry(what, call)

    async def _receive_remote(self, channel: str) -> Message:
        reader = self._readers.get(channel)
        if reader is None:
            reader = self._new_reader(channel)
        return await reader.waiters.wait()

    def _new_reader(self, channel: str) -> _NamedReader:
        def hand_back(message: Message) -> None:
            # A receiver cancelled just after it was handed a message: the next
            # waiting receiver gets it, else the channel's local mailbox keeps it.
            if not reader.waiters.hand_over(message):
                self.deliver_local(channel, message)

        reader = _NamedReader(self._named_subject(channel), WaiterQueue(hand_back))
        self._readers[channel] = reader
        self.tasks.keep_running(lambda: self._read_named(channel, reader), f"reader of {channel!r}")
        return reader

    async def _read_named(self, channel: str, reader: _NamedReader) -> None:
        """The one reader of a named channel in this process: pulls while receivers wait.

        One fetch at a time per channel and process: the consumer's pull inbox is
        shared by the local receivers, which wait in ``reader.waiters``.
        """
        from nats.errors import TimeoutError as NatsTimeout

        waiters = reader.waiters
        backoff = self.backoff()
        idle = 0
        while not self.closed:
            if not waiters.pending():
                waiters.demand.clear()
                await waiters.demand.wait()
                continue
            if reader.pull is None:
                try:
                    reader.pull = await self._bind(channel, reader)
                except BackendUnavailable as exc:
                    # Unreachable, or no JetStream leader yet: keep the receivers waiting.
                    logger.debug("binding %r failed (%s); trying again", channel, exc)
                    await backoff.sleep()
                    continue
                except ChannelLayerError as exc:
                    # A server limit or a stream clash: the receivers' error, not ours to retry.
                    waiters.fail_all(exc)
                    continue
            try:
                msgs = await reader.pull.fetch(1, timeout=_PULL_EXPIRES)
            except NatsTimeout:
                # Nothing arrived; the next pull request also covers a reconnect.
                # Now and then, check that the consumer still exists: servers
                # before 2.10 answer a pull to a deleted consumer with silence.
                idle += 1
                if idle % _CHECK_EVERY == 0 and not await self._consumer_exists(channel):
                    await self._unbind(reader)
                continue
            except (ChannelLayerError, self._driver_error) as exc:
                if self.closed:
                    return
                # The consumer or stream is gone (deleted for inactivity, or the
                # server lost its state): bind again, with backoff.
                logger.debug("pull on %r failed (%s); binding again", channel, self.redact(repr(exc)))
                await self._unbind(reader)
                self._stream_ready = False
                await backoff.sleep()
                continue
            backoff.reset()
            idle = 0
            await self._claim(channel, msgs[0], waiters)

    async def _claim(self, channel: str, msg: Msg, waiters: WaiterQueue[Message]) -> None:
        """Acknowledge a pulled message and hand it to a waiting receiver."""
        if not waiters.pending():
            # Every receiver left while the pull was out: back to the stream, for
            # any process's next receiver, rather than kept here.
            try:
                await msg.nak()
            except self._driver_error as exc:
                logger.debug("nak on %r failed: %r", channel, exc)
            return
        expires = msg.headers.get(_EXPIRES_HEADER) if msg.headers else None
        message: Message | None = None
        if _expired(expires):
            self.stats.dropped_expired += 1
        else:
            message = self.decode_or_drop(msg.data, f"named channel {channel!r}")
        await self._anchor_named_stream()
        try:
            # A confirmed ack: the work queue has dropped the message before the
            # receiver returns, so a send() right after sees the room it freed.
            await msg.ack_sync(timeout=min(_ATTEMPT_TIMEOUT, self.timeout))
        except (asyncio.TimeoutError, self._driver_error) as exc:
            # Delivered anyway; at worst it comes again after message_timeout.
            logger.debug("ack on %r not confirmed: %r", channel, exc)
        if message is not None:
            waiters.deliver(message)

    async def _anchor_named_stream(self) -> None:
        """Keep a message of this layer's in the named channels' stream, outside every channel.

        An acknowledgement that empties the work-queue stream's last file block makes
        nats-server 2.15 create a new block file and delete the old one: with a worker
        that keeps up, once per message (docs/performance/nats.md, "Named channels:
        a block file per message too"). The inbox holds its newest delivery back for
        that; a named channel cannot, since a held message would count against its
        capacity. The anchor's subject has a token more than a channel's, so no
        channel counts it and no consumer takes it. Called before each acknowledgement;
        stored again every ``_ANCHOR_EVERY`` of them so that a recent one sits in the
        block being written (writes fill a block, then start the next), and half-way
        through its life. The one it replaces is deleted. Best effort: a failure leaves
        the server replacing blocks, as it did without the anchor.
        """
        self._anchor_due -= 1
        now = running_loop().time()
        if self._anchor_due > 0 and now - self._anchor_at < self._anchor_life() / 2:
            return
        # Set before the first await: concurrent readers store one anchor, not one each.
        self._anchor_due, self._anchor_at = _ANCHOR_EVERY, now
        ttl = _ANCHOR_TTL if self._msg_ttl else None
        subject = f"{self.prefix}.n._anchor.{self.client_token}"
        timeout = min(_ATTEMPT_TIMEOUT, self.timeout)
        try:
            ack = await self.js.publish(subject, timeout=timeout, stream=self.stream_name, msg_ttl=ttl)
        except (asyncio.TimeoutError, self._driver_error) as exc:
            logger.debug("storing the anchor message failed: %r", exc)
            return
        await self._drop_anchor()
        self._anchor_seq = ack.seq

    def _anchor_life(self) -> float:
        """Seconds the server keeps an anchor message: its own TTL, else the stream's ``max_age``."""
        return _ANCHOR_TTL if self._msg_ttl else min(_ANCHOR_TTL, self.channel_expiry)

    async def _drop_anchor(self) -> None:
        """Delete this layer's anchor message from the named channels' stream, if it stored one."""
        seq, self._anchor_seq = self._anchor_seq, 0
        if not seq or self._nc is None or self._nc.is_closed:
            return
        try:
            await self._js_request(f"STREAM.MSG.DELETE.{self.stream_name}", {"seq": seq, "no_erase": True})
        except (asyncio.TimeoutError, self._driver_error) as exc:
            # Gone already (expired, purged, the stream made again) or unreachable: it expires.
            logger.debug("deleting the anchor message failed: %r", exc)

    async def _bind(self, channel: str, reader: _NamedReader) -> JetStreamContext.PullSubscription:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await self._ensure_stream()
        durable = consumer_name(channel)
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=reader.subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.message_timeout,
            deliver_policy=DeliverPolicy.ALL,
            max_waiting=4096,
            # The server deletes the consumer of a channel nobody has read for this
            # long (servers hold 1,000 consumers per stream by default); the next
            # receive() creates it again, and stored messages stay in the stream.
            inactive_threshold=_CONSUMER_INACTIVE,
            description=f"fastapi-websockets named channel {channel[:100]}",
        )
        return await self._retry(
            f"consumer for {channel!r}",
            lambda: self.js.pull_subscribe(
                reader.subject, durable=durable, stream=self.stream_name, config=config
            ),
        )

    async def _consumer_exists(self, channel: str) -> bool:
        from nats.js.errors import NotFoundError

        try:
            await self._retry(
                f"consumer check of {channel!r}",
                lambda: self.js.consumer_info(self.stream_name, consumer_name(channel)),
            )
        except ChannelLayerError as exc:
            if isinstance(exc.__cause__, NotFoundError):
                return False
            logger.debug("consumer check of %r failed: %s", channel, exc)
        return True

    async def _unbind(self, reader: _NamedReader) -> None:
        pull, reader.pull = reader.pull, None
        if pull is not None:
            try:
                await pull.unsubscribe()
            except self._driver_error as exc:
                logger.debug("unsubscribe of a pull subscription failed: %r", exc)

    # ------------------------------------------------------------------ groups

    async def _group_add(self, group: str, channel: str) -> None:
        await self._change_member("add", group, channel)

    async def _group_discard(self, group: str, channel: str) -> None:
        await self._change_member("discard", group, channel)

    async def _change_member(self, op: str, group: str, channel: str) -> None:
        """Add or discard a member: in its owner's local groups first, then its KV key."""
        if self.is_local(channel):
            await self._change_local(op, group, channel)
        elif is_process_specific(channel):
            await self._tell_owner(channel, op, group)
        key = self.member_key(group, channel)
        joined = repr(time.time()).encode()
        what = f"group_{op} of {channel!r} in {group!r}"
        if op == "add":
            await self._in_bucket(what, lambda kv: kv.put(key, joined))
        else:
            await self._in_bucket(what, lambda kv: self._forget(kv, key))
        if op == "add" and not is_process_specific(channel):
            # Put after the member key, so it outlives the member (the bucket's TTL
            # counts from the last put). Left to expire on discard: a stale mark only
            # costs group_send a listing that finds no named member.
            mark = self.owner_key(group, _NAMED_MARK)
            await self._in_bucket(what, lambda kv: kv.put(mark, b""))

    async def _change_local(self, op: str, group: str, channel: str) -> None:
        if op == "add":
            await self._add_local(group, channel)
        else:
            await self._discard_local(group, channel)

    async def _forget(self, kv: KeyValue, key: str) -> None:
        if self._msg_ttl:
            # A purge marker with a TTL goes away by itself, which keeps the key
            # listing that group_send reads short.
            await kv.purge(key, msg_ttl=1)
        else:
            await kv.delete(key)

    async def _add_local(self, group: str, channel: str) -> None:
        self.local_groups.add(group, channel)
        await self._own(group)

    async def _discard_local(self, group: str, channel: str) -> None:
        self.local_groups.discard(group, channel)
        if group not in self.local_groups:
            await self._disown(group)

    def _owns(self, group: str) -> bool:
        """Whether this layer's owner key of ``group`` is fresh (put within half its lifetime)."""
        put = self._owned.get(group)
        return put is not None and time.monotonic() - put < self.group_expiry / 2

    async def _own(self, group: str) -> None:
        """Put this layer's owner key of ``group``, so that group_sends store a copy in its inbox.

        Put again when half of its lifetime (``group_expiry``) has passed, so it
        outlives every local member, each of which expires ``group_expiry`` after
        it was last added.
        """
        if self._owns(group):
            return
        async with self._owner_locks.hold(group):
            if self._owns(group) or group not in self.local_groups:
                return
            key = self.owner_key(group, self.client_token)
            await self._in_bucket(f"group_add to {group!r}", lambda kv: kv.put(key, b""))
            self._owned[group] = time.monotonic()

    async def _disown(self, group: str) -> None:
        """Remove this layer's owner key of ``group`` once it holds no member of it."""
        async with self._owner_locks.hold(group):
            if group in self.local_groups or group not in self._owned:
                return
            key = self.owner_key(group, self.client_token)
            await self._in_bucket(f"group_discard from {group!r}", lambda kv: self._forget(kv, key))
            del self._owned[group]

    async def _disown_quietly(self, group: str) -> None:
        try:
            await self._disown(group)
        except ChannelLayerError as exc:
            # A stale owner key only costs other processes a copy this layer ignores.
            logger.debug("removing the owner key of %r failed: %s", group, exc)

    async def _owners(self, group: str) -> tuple[list[str], bool]:
        """The process tokens of the other layers holding members of ``group`` (one request).

        Also whether ``group`` may have named members (its ``-named`` mark).
        """
        from nats.js.errors import NotFoundError

        await self._bucket()
        pattern = f"{self._kv_subject_prefix}{subject_token(group)}.o.*"
        what = f"group_send to {group!r}"
        try:
            info = await self._retry(
                what, lambda: self.js.stream_info(self._kv_stream, subjects_filter=pattern)
            )
        except ChannelLayerError as exc:
            if not isinstance(exc.__cause__, NotFoundError):
                raise
            await self._recover_bucket()  # the server lost it: nobody owns anything
            self._owned.clear()
            self._last_owners.clear()
            return [], False
        tokens = {token_to_name(subject.rsplit(".", 1)[-1]) for subject in info.state.subjects or {}}
        named = _NAMED_MARK in tokens
        tokens.discard(_NAMED_MARK)
        tokens.discard(self.client_token)
        return sorted(tokens), named

    async def _tell_owner(self, channel: str, op: str, group: str) -> None:
        """Ask the layer that owns ``channel`` to change its local membership, and wait for it."""
        from nats.errors import NoRespondersError

        body = json.dumps({"op": op, "group": group, "channel": channel}).encode()
        loop = running_loop()
        deadline = loop.time() + self.timeout
        backoff = self.backoff()
        while True:
            await self._until_connected(deadline, f"group change for {channel!r}")
            try:
                reply = await self.nc.request(
                    self._process_subject(channel, "c"), body, timeout=max(deadline - loop.time(), 0.1)
                )
                break
            except NoRespondersError:
                # Nobody listens: the owner is gone, or reconnecting. Its inbox consumer
                # tells which; a live owner must hear of the change, or it never
                # receives the group's messages.
                delay = backoff.next()
                if loop.time() + delay >= deadline or not await self._owner_alive(channel):
                    logger.debug("the owner of %r is gone; only the KV entry changes", channel)
                    return
                await asyncio.sleep(delay)
            except (asyncio.TimeoutError, self._driver_error) as exc:
                raise self._translate(exc, f"group change for {channel!r}") from exc
        if reply.data != b"ok":
            raise ChannelLayerError(f"the owner of {channel!r} refused the group change: {reply.data!r}")

    async def _owner_alive(self, channel: str) -> bool:
        """Whether the process owning ``channel`` still has its inbox consumer (it may be reconnecting)."""
        from nats.js.errors import NotFoundError

        token = process_token(channel)
        if not self._stored or not _PROCESS_TOKEN.fullmatch(token):
            return False  # no layer makes such a token
        try:
            await self._retry(
                f"group change for {channel!r}",
                lambda: self.js.consumer_info(self._inbox_stream, _inbox_consumer(token)),
            )
        except ChannelLayerError as exc:
            if isinstance(exc.__cause__, NotFoundError):
                return False
            raise
        return True

    async def _on_control(self, msg: Msg) -> None:
        try:
            request = json.loads(msg.data)
            op, group, channel = request["op"], request["group"], request["channel"]
        except (ValueError, KeyError, TypeError):
            logger.warning("dropped a malformed group change on %s", msg.subject)
            return
        try:
            if self.is_local(channel):
                await self._change_local(op, group, channel)
        except ChannelLayerError as exc:
            logger.warning("group change for %r failed: %r", channel, exc)
            await msg.respond(str(exc).encode())
            return
        await msg.respond(b"ok")

    async def _group_send(self, group: str, data: bytes) -> None:
        if group in self.local_groups:
            self.deliver_to_local_members(group, self.decode(data))
        # One copy in the inbox of every other process with members, whatever their
        # number, and one per named member; it returns once every copy is stored, so
        # nothing accepted is left to a task that could give up during an outage.
        # The owners found last time get their copies at once, without waiting for
        # the listing: that takes a round trip off the way to their members. The
        # listing still decides: owners it finds that were not known get theirs once
        # it answers, before this returns, so a member added (by any process) before
        # the call is reached; a known owner that left only gets a copy it ignores.
        # Group_sends to one group write their copies in call order: made concurrently,
        # their listings came back in any order, and so did the copies that waited for
        # them (docs/backends/nats.md, Order). Each takes its turn at the call; the
        # known owners' copies go at once only where no earlier call still waiting
        # for its listing may write (the same known owners: it writes to others).
        turn = self._group_turns.take(group)
        try:
            known = self._last_owners.get(group) or ()
            if known and not turn.joins(known):
                known = ()
            payload = _frame(_TO_GROUP, group, data)
            if known:
                what = f"group_send to {group!r}"
                await wait_all([self._store_in_inbox(token, payload, what) for token in known])
                if not self._stored:
                    # Nothing acknowledges a core publish: the pong to a ping written
                    # after the copies (_flush_in_order) says that nats-server has routed them.
                    try:
                        await _flush_in_order(self.nc, self.timeout)
                    except (asyncio.TimeoutError, self._driver_error) as exc:
                        raise self._translate(exc, what) from exc
            # Only now the listing: a stream-info request that nats-server handles while it
            # stores and pushes the copies delays their delivery by about 0.2 ms (measured
            # in docs/performance/nats.md), in the same write or the next one.
            await self._send_to_listed(group, data, payload, known, turn)
        finally:
            turn.end()

    async def _send_to_listed(
        self, group: str, data: bytes, payload: bytes, known: tuple[str, ...], turn: Turn
    ) -> None:
        """List the owners and named members of ``group``; in ``turn``, copy to those not in ``known``.

        Membership is read from the server at the time of the call, so a member
        added (by any process) before the group_send gets it.
        """
        owners, named = await self._owners(group)
        self._last_owners.add(group, tuple(owners))
        members = await self._named_members(group) if named else []
        what = f"group_send to {group!r}"

        def copies() -> list[Coroutine[Any, Any, None]]:
            # Each writes its publish (or queues for its named channel's turn) before
            # its first await, which is what the turn orders.
            made = [self._store_in_inbox(token, payload, what) for token in owners if token not in known]
            return made + [self._send_to_named_member(group, channel, data) for channel in members]

        await turn.place(copies)

    async def _send_to_named_member(self, group: str, channel: str, data: bytes) -> None:
        """Store ``data`` for the named member ``channel``; a full one is skipped and counted."""
        try:
            await self._send_named(channel, data)
        except ChannelFull:
            self.stats.dropped_full += 1
            logger.debug("group_send to %r skipped full channel %r", group, channel)

    async def _named_members(self, group: str) -> list[str]:
        """The named (stored) channels in ``group``; expired ones are skipped and pruned."""
        from nats.js.errors import KeyNotFoundError

        await self._bucket()
        pattern = f"{self._kv_subject_prefix}{subject_token(group)}.n.*"
        what = f"member list of {group!r}"
        # One request lists the group's named-member keys (usually none); groups of
        # process-specific channels cost nothing more however large they are.
        info = await self._retry(what, lambda: self.js.stream_info(self._kv_stream, subjects_filter=pattern))
        keys = [subject[len(self._kv_subject_prefix) :] for subject in info.state.subjects or {}]
        members = []
        cutoff = time.time() - self.group_expiry
        for key in keys:
            try:
                entry = await self._in_bucket(what, lambda kv, key=key: kv.get(key))  # type: ignore[misc]
            except ChannelLayerError as exc:
                if isinstance(exc.__cause__, KeyNotFoundError):
                    continue  # discarded; its marker goes away by itself
                raise
            if _joined(entry.value) <= cutoff:
                if not self.closed:
                    self.tasks.spawn(self._prune(key), f"pruning {key}")
                continue
            members.append(token_to_name(key.rsplit(".", 1)[-1]))
        return members

    async def _prune(self, key: str) -> None:
        await self._in_bucket("pruning an expired member", lambda kv: self._forget(kv, key))

    # ----------------------------------------------------------------- history

    def _history_store_of(self, policy: HistoryPolicy) -> _HistoryStore:
        key = f"{policy.size}-{round(policy.ttl * 1000)}"
        return _HistoryStore(f"{self.stream_name}_H{key}", f"{self.prefix}.h.{key}", policy)

    async def _history_store(self, policy: HistoryPolicy) -> _HistoryStore:
        store = self._history_stores(policy)
        if store.name not in self._history_ready:
            await self._create_history_store(store)
        return store

    async def _create_history_store(self, store: _HistoryStore) -> None:
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

        policy = store.policy
        wanted = f"{store.subjects}.>"
        config = StreamConfig(
            name=store.name,
            description=(
                f"fastapi-websockets group history: the last {policy.size} messages "
                f"of each group, for {policy.ttl:g} s"
            ),
            subjects=[wanted],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_msgs_per_subject=policy.size,
            max_age=policy.ttl,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            # Offsets chain from each group's newest entry: deleting single entries
            # could let an offset be given twice. Purging a group (all of it) is fine.
            deny_delete=True,
        )
        await self._stream_with(config, "history stream")
        self._history_ready.add(store.name)

    async def _in_history(
        self, store: _HistoryStore, what: str, call: Callable[[], Awaitable[_T]], size: int = 0
    ) -> _T:
        """Run a JetStream call on a history stream, creating the stream again if the server lost it.

        ``size`` as for ``_retry``.
        """

        async def recreate() -> None:
            self._history_ready.discard(store.name)
            await self._create_history_store(store)

        try:
            return await self._retry(what, call, recreate, size=size)
        except ChannelLayerError as exc:
            if _error_code(exc) != _STREAM_NOT_FOUND:
                raise
        await recreate()
        return await self._retry(what, call, size=size)

    def _history_subject(self, store: _HistoryStore, group: str) -> str:
        return f"{store.subjects}.{subject_token(group)}"

    async def _group_send_history(
        self, group: str, message: Message, policy: HistoryPolicy
    ) -> StreamPosition:
        # One process appends to a group one message at a time: concurrent appends
        # would only refuse each other, and members get this process's messages in
        # offset order.
        data = self.encode(message)
        async with self._appending.hold(group):
            position = await self._history_append(group, data, policy)
            await self._group_send(group, self.encode({**message, POSITION_KEY: position.as_dict()}))
        return position

    async def _history_append(self, group: str, data: bytes, policy: HistoryPolicy) -> StreamPosition:
        store = await self._history_store(policy)
        subject = self._history_subject(store, group)
        what = f"group_send to {group!r} (history)"
        writer = new_token(12)
        loop = running_loop()
        deadline = loop.time() + self.timeout
        newest = self._newest.get(subject)
        while True:
            if newest is None:
                newest = await self._history_last(store, subject, what)
            # A group without entries starts a new life of its history: offset 1, new epoch.
            after, epoch = (newest.offset, newest.epoch) if newest is not None else (0, new_epoch())
            headers = {
                _EXPECTED_HEADER: str(newest.seq if newest is not None else 0),
                _OFFSET_HEADER: str(after + 1),
                _EPOCH_HEADER: epoch,
                # The same id on every attempt: an attempt stored although its
                # acknowledgement was lost is recognised, never stored twice.
                _MSG_ID_HEADER: writer,
            }
            try:
                ack = await self._in_history(
                    store,
                    what,
                    lambda headers=headers: self.js.publish(  # type: ignore[misc]
                        subject, data, stream=store.name, headers=headers
                    ),
                    len(data),
                )
            except ChannelLayerError as exc:
                if _error_code(exc) not in _WRONG_LAST_SEQUENCE:
                    raise
                # Another writer appended first (or the group's entries expired, or
                # an earlier attempt of ours was stored): start from the real newest.
                newest = await self._history_last(store, subject, what)
                if newest is not None and newest.writer == writer:
                    self._newest.add(subject, newest)
                    return StreamPosition(newest.offset, newest.epoch)
                if loop.time() >= deadline:
                    raise self.unavailable(
                        f"{what}: other writers kept appending for {self.timeout} s"
                    ) from None
                continue
            if ack.duplicate:
                # Stored by an attempt whose acknowledgement was lost, before the
                # writer we just chained after: read back which offset it got.
                seq = ack.seq
                raw = await self._in_history(
                    store,
                    what,
                    lambda seq=seq: self.js.get_msg(store.name, seq=seq),  # type: ignore[misc]
                )
                mine = _entry_of(raw.seq, raw.headers, 0.0, b"", subject)
                return StreamPosition(mine.offset, mine.epoch)
            appended = _Entry(ack.seq, after + 1, epoch, writer, 0.0, b"")
            self._newest.add(subject, appended)
            self._marks(subject).append(appended)
            return StreamPosition(after + 1, epoch)

    async def _history_last(self, store: _HistoryStore, subject: str, what: str) -> _Entry | None:
        """The newest stored entry of a group, read from the stream leader; None when there is none."""
        try:
            raw = await self._in_history(store, what, lambda: self.js.get_last_msg(store.name, subject))
        except ChannelLayerError as exc:
            if _error_code(exc) == _NO_MESSAGE:
                self._newest.discard(subject)
                return None
            raise
        return _entry_of(raw.seq, raw.headers, 0.0, b"", subject)

    async def _start_history(self, store: _HistoryStore, subject: str, what: str) -> _Entry | None:
        """Store an empty entry at offset 0: it fixes the epoch of a group's new history.

        Returns None when another writer stored a first entry meanwhile and it is
        gone again (expired); the caller then looks again.
        """
        epoch, writer = new_epoch(), new_token(12)
        headers = {_EXPECTED_HEADER: "0", _OFFSET_HEADER: "0", _EPOCH_HEADER: epoch, _MSG_ID_HEADER: writer}
        try:
            ack = await self._in_history(
                store, what, lambda: self.js.publish(subject, b"", stream=store.name, headers=headers)
            )
        except ChannelLayerError as exc:
            if _error_code(exc) not in _WRONG_LAST_SEQUENCE:
                raise
            return await self._history_last(store, subject, what)
        return _Entry(ack.seq, 0, epoch, writer, 0.0, b"")

    async def _history_read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        store = await self._history_store(policy)
        subject = self._history_subject(store, group)
        # Joiners of a busy group read its history together: one newest-entry request
        # and at most one reader per round serve every read that arrived meanwhile.
        newest, entries = await self._reading.run(
            subject, after, partial(self._read_round, store, subject, f"history of {group!r}")
        )
        if newest.offset <= after:
            return HistorySlice([], newest.offset, newest.epoch, complete=True)
        cutoff = time.time() - policy.ttl
        # Entries above the newest one read are not in this page: their live copies are.
        kept = [
            (entry.offset, entry.data)
            for entry in entries
            if entry.epoch == newest.epoch and after < entry.offset <= newest.offset and entry.stamp > cutoff
        ]
        # Offsets are contiguous: anything missing between `after` and the newest was trimmed.
        complete = [offset for offset, _ in kept] == list(range(after + 1, newest.offset + 1))
        return HistorySlice(kept[-limit:], newest.offset, newest.epoch, complete)

    async def _read_round(
        self, store: _HistoryStore, subject: str, what: str, afters: list[int]
    ) -> tuple[_Entry, list[_Entry]]:
        """One round of reads of a group: its newest entry, and its entries if any read needs them."""
        newest = await self._history_last(store, subject, what)
        while newest is None:
            newest = await self._start_history(store, subject, what)
        self._newest.add(subject, newest)
        lowest = min(afters)
        marks = self._marks(subject)
        # Within one epoch offsets grow with stream sequences: every entry after a
        # remembered one sits after its sequence (a catch-up from the end of the
        # page just read streams only what came since, not the whole page again).
        start = max(
            (m.seq for m in marks if m.epoch == newest.epoch and m.offset <= lowest and m.seq <= newest.seq),
            default=0,
        )
        marks.append(newest)
        if newest.offset <= lowest:
            return newest, []
        return newest, await self._history_entries(store, subject, newest.seq, what, after=start)

    async def _history_entries(
        self, store: _HistoryStore, subject: str, upto: int, what: str, *, after: int = 0
    ) -> list[_Entry]:
        """The stored entries of a group after stream sequence ``after`` up to ``upto``, oldest first.

        An ephemeral push consumer without acks streams them to a private inbox
        (one request, then the entries); it is deleted in the background.
        """
        from nats.errors import TimeoutError as NatsTimeout

        entries: list[_Entry] = []
        loop = running_loop()
        reader = self._stream_reader(
            store.name,
            subject,
            kind="history",
            what=what,
            idle=_READER_IDLE,
            after=after,
            add=lambda config: self._in_history(
                store, what, lambda: self.js.add_consumer(store.name, config)
            ),
        )
        async with reader as (sub, info):
            deadline = loop.time() + (self.timeout if info.num_pending else _REPLICA_LAG)
            while True:
                try:
                    msg = await sub.next_msg(timeout=max(deadline - loop.time(), 0.001))
                except NatsTimeout:
                    if info.num_pending and not entries:
                        raise self.unavailable(f"{what}: no entry arrived within {self.timeout} s") from None
                    # The newest entry did not come (it expired meanwhile): what
                    # arrived is all there is; the caller sees the gap.
                    break
                except self._driver_error as exc:
                    # The client closed under the read (nats-py closed it for good).
                    raise self._translate(exc, what) from exc
                metadata = msg.metadata
                entries.append(
                    _entry_of(
                        metadata.sequence.stream,
                        msg.headers,
                        metadata.timestamp.timestamp(),
                        msg.data,
                        subject,
                    )
                )
                if metadata.sequence.stream >= upto:
                    break
                if not metadata.num_pending:
                    # Everything this consumer's replica holds arrived; a lagging
                    # replica gets the newest entry in a moment.
                    deadline = min(deadline, loop.time() + _REPLICA_LAG)
        return entries

    @contextlib.asynccontextmanager
    async def _stream_reader(
        self,
        stream: str,
        subjects: str,
        *,
        kind: str,
        what: str,
        idle: float,
        add: Callable[[ConsumerConfig], Awaitable[ConsumerInfo]],
        last_per_subject: bool = False,
        after: int = 0,
        cb: Callable[[Msg], Awaitable[None]] | None = None,
    ) -> AsyncIterator[tuple[Subscription, ConsumerInfo]]:
        """An ephemeral push consumer without acks streaming ``subjects`` of ``stream`` to a private inbox.

        One request creates it (``add`` sends it, with the caller's retry and
        recovery), then the messages flow to the yielded subscription, or to
        ``cb``; the yielded info's ``num_pending`` says how many will come. On exit
        the subscription ends and the consumer is deleted in the background; the
        server drops it after ``idle`` seconds anyway. With ``after``, it starts at
        the next stream sequence. History and presence reads both read this way.
        """
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await self._until_connected(running_loop().time() + self.timeout, what)
        inbox = self.nc.new_inbox()
        try:
            sub = await self.nc.subscribe(inbox, cb=cb)
        except self._driver_error as exc:
            raise self._translate(exc, what) from exc
        if last_per_subject:
            policy = DeliverPolicy.LAST_PER_SUBJECT
        else:
            policy = DeliverPolicy.BY_START_SEQUENCE if after else DeliverPolicy.ALL
        config = ConsumerConfig(
            deliver_subject=inbox,
            filter_subject=subjects,
            deliver_policy=policy,
            opt_start_seq=after + 1 if after else None,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=idle,
            description=f"fastapi-websockets {kind} reader",
        )
        consumer: str | None = None
        try:
            info = await add(config)
            consumer = info.name
            yield sub, info
        finally:
            try:
                await sub.unsubscribe()
            except self._driver_error as exc:
                logger.debug("unsubscribe of a %s reader failed: %r", kind, exc)
            if consumer is not None and not self.closed:
                self.tasks.spawn(
                    self._drop_reader(stream, consumer, kind), f"dropping {kind} reader {consumer}"
                )

    async def _drop_reader(self, stream: str, consumer: str, kind: str) -> None:
        try:
            await self._retry(f"dropping a {kind} reader", lambda: self.js.delete_consumer(stream, consumer))
        except ChannelLayerError as exc:
            # The server deletes it after its idle time anyway.
            logger.debug("dropping %s reader %s failed: %s", kind, consumer, exc)

    async def _flush_history(self) -> None:
        """Purge the history streams of this layer's policies: every group starts a new epoch."""
        for policy in {policy for _, policy in self.history}:
            store = self._history_stores(policy)
            try:
                await self._retry("flush", lambda name=store.name: self.js.purge_stream(name))  # type: ignore[misc]
            except ChannelLayerError as exc:
                if _error_code(exc) != _STREAM_NOT_FOUND:
                    raise
        self._newest.clear()
        self._marks.clear()

    # ---------------------------------------------------------------- presence
    # Kept in a stream of its own (see nats_presence.py), made on the first presence call.

    def _presence_store(self) -> NatsPresence:
        if self._presence_kept is None:
            from fastapi_websockets.backends.nats_presence import NatsPresence

            self._presence_kept = NatsPresence(self)
        return self._presence_kept

    async def _presence_put(self, group: str, channel: str, info: bytes) -> QueuedWrite:
        return await self._presence_store().put(group, channel, info)

    async def _presence_remove(self, group: str, channel: str) -> bytes | QueuedWrite | None:
        return await self._presence_store().remove(group, channel)

    def _presence_take_back(self, group: str, channel: str) -> None:
        self._presence_store().take_back(group, channel)

    async def _presence_read(self, group: str) -> dict[str, bytes]:
        return await self._presence_store().read(group)

    async def _presence_beat(self) -> bool:
        return await self._presence_store().beat()

    async def _presence_reap(self) -> list[tuple[str, str, bytes]]:
        return await self._presence_store().reap()

    # ------------------------------------------------------------------ flush

    async def _flush(self) -> None:
        from nats.js.errors import NotFoundError

        for stream in (self.stream_name, self._kv_stream, self._inbox_stream):
            try:
                await self._retry("flush", lambda stream=stream: self.js.purge_stream(stream))  # type: ignore[misc]
            except ChannelLayerError as exc:
                if not isinstance(exc.__cause__, NotFoundError):
                    raise
        if self.history:
            await self._flush_history()
        await self._presence_store().flush()
        # The owner keys went with the bucket.
        self._owned.clear()
        self._last_owners.clear()


async def _flush_in_order(nc: Client, timeout: float) -> None:
    """``nc.flush()``, with every command nats-py has buffered written before its PING.

    nats-py (2.16) writes a flush's PING straight to the socket while the
    commands queued before it (SUB, PUB) wait for its flusher task, so the PONG
    could come back before the server had them: a subscription not yet
    registered, a core publish not yet routed. Waiting for that task to empty the
    buffer first puts the PING behind them. Bounded: a flusher that does not run
    (a dead connection) leaves it to ``flush()`` itself to fail.
    """
    for _ in range(_FLUSHER_PASSES):
        if not nc.pending_data_size or not nc.is_connected:
            break
        await asyncio.sleep(0)
    await nc.flush(timeout=max(1, math.ceil(timeout)))


def _joined(value: bytes | None) -> float:
    try:
        return float(value or b"0")
    except ValueError:
        return 0.0


def _expired(expires: str | None) -> bool:
    if not expires:
        return False
    try:
        return float(expires) <= time.time()
    except ValueError:
        return False


class _NotPlaced(Exception):
    """A stream or bucket create refused with ``_NO_PEERS``: retried like a leader election."""


def _error_code(exc: BaseException) -> int | None:
    """The JetStream error code behind one of our errors (``err_code`` of nats-py's APIError)."""
    from nats.js.errors import APIError

    cause = exc.__cause__
    return cause.err_code if isinstance(cause, APIError) else None


def _login_refused(exc: Exception) -> bool:
    """Whether ``exc`` is nats-py's report of a login the server refused.

    A refused CONNECT is a plain ``nats.errors.Error`` quoting the server's
    ``-ERR 'Authorization Violation'``; one on a live connection is an
    ``AuthorizationError``.
    """
    from nats.errors import AuthorizationError

    return isinstance(exc, AuthorizationError) or "authorization violation" in str(exc).lower()


def _newest_in_refusal(exc: BaseException) -> int | None:
    """The subject's newest sequence a refused conditional publish reports, or None.

    The server answers "wrong last sequence: N" with the sequence it compared
    with (0 for none); a clustered leader's pre-check leaves N out.
    """
    from nats.js.errors import APIError

    cause = exc.__cause__
    if not isinstance(cause, APIError) or cause.err_code != _WRONG_SEQUENCE_SAYS_NEWEST:
        return None
    _, _, newest = (cause.description or "").rpartition(": ")
    return int(newest) if newest.isdigit() else None


def _entry_of(
    seq: int | None, headers: dict[str, str] | None, stamp: float, data: bytes, subject: str
) -> _Entry:
    """A history entry from a stored message's sequence and headers."""
    headers = headers or {}
    try:
        return _Entry(
            seq or 0,
            int(headers[_OFFSET_HEADER]),
            headers[_EPOCH_HEADER],
            headers.get(_MSG_ID_HEADER, ""),
            stamp,
            data,
        )
    except (KeyError, ValueError):
        raise ChannelLayerError(
            f"message {seq} on {subject!r} has no history offset and epoch: only the layer may publish there"
        ) from None
