"""The channel-layer contract and the machinery every backend shares.

:class:`BaseChannelLayer` implements the public API (``send``, ``receive``,
``new_channel``, ``group_add``, ``group_discard``, ``group_send``, ``flush``,
``close``) once: name validation, the closed state, encoding and size limits,
lazy start under a lock, timeouts, and the local demultiplexer
(:class:`~fastapi_websockets.mailboxes.Mailboxes`) into which a backend's single
per-process inbox is drained. A backend fills in the ``_``-prefixed template
methods with broker code only.
"""

from __future__ import annotations

import abc
import asyncio
import fnmatch
import logging
import re
import time
from collections.abc import Awaitable, Iterable, Mapping
from functools import partial
from types import TracebackType
from typing import Any, ClassVar

from fastapi_websockets import observing
from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.futures import wait_all
from fastapi_websockets.backends.options import Memo, positive, positive_int
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelFull,
    ChannelLayerClosed,
    ChannelLayerError,
    InvalidChannelLayerConfig,
    InvalidChannelName,
    InvalidMessage,
    MessageTooLarge,
    ReceiveTimeout,
)
from fastapi_websockets.history import (
    POSITION_KEY,
    History,
    HistoryPolicy,
    HistorySlice,
    StreamPosition,
    parse_history_option,
)
from fastapi_websockets.local_groups import LocalGroups
from fastapi_websockets.mailboxes import Listener, Mailboxes, MailboxStats
from fastapi_websockets.names import (
    is_process_specific,
    known_channel_names,
    new_token,
    process_token,
    validate_channel_name,
    validate_group_name,
    validate_prefix,
)
from fastapi_websockets.presence import (
    PRESENCE_JOINED,
    PRESENCE_LEFT,
    LocalPresence,
    QueuedWrite,
    presence_event,
)
from fastapi_websockets.serialization import default_serializer, not_a_dict
from fastapi_websockets.types import Message, Serializer

__all__ = ["BaseChannelLayer", "missing_driver"]

logger = logging.getLogger("fastapi_websockets")


def missing_driver(extra: str, exc: ImportError) -> InvalidChannelLayerConfig:
    """The error a backend raises when its optional driver is not installed."""
    return InvalidChannelLayerConfig(
        f"this backend needs the {extra!r} extra, which is not installed ({exc}); "
        f'install it with: pip install "fastapi-websockets[{extra}]"'
    )


def _compile_capacities(
    channel_capacity: Mapping[str | re.Pattern[str], int] | None,
) -> list[tuple[re.Pattern[str], int]]:
    compiled: list[tuple[re.Pattern[str], int]] = []
    if channel_capacity is None:
        return compiled
    if not isinstance(channel_capacity, Mapping):
        raise InvalidChannelLayerConfig(
            "channel_capacity must be a mapping of glob pattern (or compiled regex) to "
            f"capacity, got {type(channel_capacity).__name__}"
        )
    for pattern, value in channel_capacity.items():
        positive_int(f"channel_capacity[{pattern!r}]", value)
        if isinstance(pattern, re.Pattern):
            compiled.append((pattern, value))
        elif isinstance(pattern, str):
            compiled.append((re.compile(fnmatch.translate(pattern)), value))
        else:
            raise InvalidChannelLayerConfig(
                f"channel_capacity keys must be glob strings or compiled regexes, got {pattern!r}"
            )
    return compiled


class BaseChannelLayer(abc.ABC):
    """A Django-Channels-style channel layer.

    Options (keyword-only, shared by every backend):

    * ``capacity``: most undelivered messages a channel holds (default 100);
      ``send()`` to a full channel raises :class:`ChannelFull`, ``group_send()``
      skips full members.
    * ``channel_capacity``: per-channel capacities, ``{glob-or-regex: capacity}``;
      the first matching pattern wins.
    * ``channel_expiry``: seconds an undelivered message is kept (default 60).
    * ``group_expiry``: seconds a group member stays without being added again
      (default 86400); each member expires on its own.
    * ``max_message_size``: largest encoded message in bytes (default 1 MiB).
    * ``serializer``: a :class:`~fastapi_websockets.types.Serializer`
      (default msgpack).
    * ``history``: ``{group glob: size | {"size": n, "ttl": seconds}}``: groups
      that keep their last messages in the broker for recovery (see
      :meth:`group_history`); other groups pay nothing.
    * ``presence_timeout``: seconds after which the presence entries of a
      process that died without leaving disappear (default 30).

    Messages handed to receivers may be shared between the recipients of one
    ``group_send()`` in a process: treat received messages as read-only.
    """

    #: Short name used in configuration and environment variable names.
    backend_name: ClassVar[str] = ""
    #: Whether the offsets of a group's history are contiguous (each the previous plus one),
    #: so that a client can detect a gap by itself.
    contiguous_history_offsets: ClassVar[bool] = True
    #: Django Channels' extension flags.
    extensions: ClassVar[list[str]] = ["groups", "flush"]

    def __init__(
        self,
        *,
        capacity: int = 100,
        channel_capacity: Mapping[str | re.Pattern[str], int] | None = None,
        channel_expiry: float = 60,
        group_expiry: float = 86400,
        max_message_size: int = 1024 * 1024,
        serializer: Serializer | None = None,
        history: Mapping[str, int | Mapping[str, float]] | None = None,
        presence_timeout: float = 30.0,
    ) -> None:
        positive_int("capacity", capacity)
        positive("channel_expiry", channel_expiry)
        positive("group_expiry", group_expiry)
        positive_int("max_message_size", max_message_size)
        if serializer is not None and not isinstance(serializer, Serializer):
            raise InvalidChannelLayerConfig(
                f"serializer must have dumps() and loads() methods, got {serializer!r}"
            )
        self.capacity = capacity
        self.channel_capacity = _compile_capacities(channel_capacity)
        self.channel_expiry = channel_expiry
        self.group_expiry = group_expiry
        self.max_message_size = max_message_size
        self.serializer: Serializer = serializer or default_serializer
        #: Random token naming this layer instance in process-specific channel names.
        self.client_token = new_token()
        self._mailboxes = Mailboxes(self.capacity_for, channel_expiry, self._is_released)
        #: This instance's process-specific channels that are still in use.
        self._live_channels: set[str] = set()
        self._local_groups = LocalGroups(group_expiry)
        self._capacity_memo: Memo[str, int] = Memo(self._capacity_of)
        #: Process-specific channel -> whether this instance made it (a pure function of the name).
        self._mine: Memo[str, bool] = Memo(self._made_here)
        self.presence_timeout = positive("presence_timeout", presence_timeout, "seconds")
        self._presence = LocalPresence()
        self._presence_lock = asyncio.Lock()
        self._beat_lock = asyncio.Lock()
        self._reap_lock = asyncio.Lock()  # see _presence_clean_up
        #: The broker lost our entries and storing them again has not succeeded yet.
        self._restore_due = False
        self.history = parse_history_option(history)
        self._history_memo: Memo[str, HistoryPolicy | None] = Memo(self._history_policy_of)
        #: channel -> {epoch: (offset, deadline)}: live group messages at or below the offset
        #: were already given to the channel by a catch-up page; deliveries drop them.
        self._floors: dict[str, dict[str, tuple[int, float]]] = {}
        #: How many channels had floors after the last sweep of expired ones.
        self._floors_pruned_at = 0
        #: channel -> (catch-ups in progress, live messages with a position held meanwhile):
        #: a copy that arrives before the floor is set must not reach the mailbox yet.
        self._held: dict[str, tuple[int, list[Message]]] = {}
        self._closed = False
        self._started = False
        self._start_lock = asyncio.Lock()
        #: Callers in _ensure_started, and whether it may be skipped: started and none of
        #: them still there (see _ensure_started).
        self._start_queued = 0
        self._start_clear = False
        self._remote_receives: set[asyncio.Task[Message]] = set()
        #: (channel, message) claimed from the broker for cancelled receives once close() began.
        self._claimed_on_close: list[tuple[str, Message]] = []
        #: Set by the first close(), resolved when it ends: a close() made meanwhile waits for it.
        self._close_done: asyncio.Future[None] | None = None
        observing.live_layers.add(self)
        if observing.hooks is not None:
            observing.hooks.layer_created(self)

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    @property
    def stats(self) -> MailboxStats:
        """Counters of messages received, and of those dropped here (full mailbox, expiry, undecodable)."""
        return self._mailboxes.stats

    def capacity_for(self, channel: str) -> int:
        """The capacity that applies to ``channel``."""
        if not self.channel_capacity:
            return self.capacity
        return self._capacity_memo(channel)

    def _capacity_of(self, channel: str) -> int:
        for pattern, pattern_capacity in self.channel_capacity:
            if pattern.match(channel):
                return pattern_capacity
        return self.capacity

    def history_policy(self, group: str) -> HistoryPolicy | None:
        """The history kept for ``group`` (from the ``history`` option), or None."""
        if not self.history:
            return None
        return self._history_memo(group)

    def _history_policy_of(self, group: str) -> HistoryPolicy | None:
        for pattern, policy in self.history:
            if pattern.match(group):
                return policy
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelLayerClosed(f"{type(self).__name__} is closed; create a new layer")

    async def start(self) -> None:
        """Connect and start the background readers now instead of at first use.

        Every operation starts the layer anyway; :func:`channel_layers_lifespan`
        calls this at startup so that importing the driver, connecting and starting
        the readers (several MB on Redis) is not left to the first WebSocket.
        Idempotent. Raises :class:`ChannelLayerClosed` on a closed layer and what the
        backend raises when its broker is unreachable (``BackendUnavailable``).
        """
        self._check_open()
        await self._ensure_started()

    async def _ensure_started(self) -> None:
        if self._start_clear:
            return
        # Callers queued on the start lock leave it one per loop turn once the start is
        # done. A call made meanwhile queues behind them rather than going ahead: sends
        # made during the start keep their call order (a send made once the layer was
        # started overtook 13 earlier ones still leaving the lock).
        self._start_queued += 1
        try:
            async with self._start_lock:
                self._check_open()
                if not self._started:
                    await self._start()
                    self._started = True
        finally:
            self._start_queued -= 1
            self._start_clear = self._started and not self._start_queued

    def is_local(self, channel: str) -> bool:
        """Whether messages for ``channel`` are delivered to this instance's mailboxes."""
        # Every receive asks this: a set lookup answers for the channels in use without
        # parsing the name (a fan-out to 1,000 local receivers asks 1,000 times a round).
        if channel in self._live_channels:
            return True
        if "!" not in channel:  # not is_process_specific(): a named channel
            return False
        # Another instance's channel: every send() to it asks again, and the remembered
        # answer costs a dict lookup where process_token() is a call and two splits.
        owned = self._mine.known.get(channel)
        return self._mine(channel) if owned is None else owned

    def _made_here(self, channel: str) -> bool:
        return process_token(channel) == self.client_token

    # ---------------------------------------------------------- serialization

    def encode(self, message: Message) -> bytes:
        """Serialize ``message``, enforcing ``max_message_size``."""
        data = self.serializer.dumps(message)
        if len(data) > self.max_message_size:
            raise MessageTooLarge(len(data), self.max_message_size)
        return data

    def decode(self, data: bytes) -> Message:
        """Deserialize a message produced by :meth:`encode`."""
        message = self.serializer.loads(data)
        if type(message) is dict and observing.RESERVED_KEY in message:
            return observing.incoming(self, message)
        return message

    def decode_or_drop(self, data: bytes, where: str, *names: object) -> Message | None:
        """Deserialize ``data`` received from the broker, or log, count and return None.

        For readers: a message another program (or another serializer) wrote
        must not stop the reader; it is dropped, logged at WARNING with
        ``where`` it came from (``where % names`` when ``names`` are given:
        formatted only then, not for every message of a hot path), and
        counted in ``stats.dropped_undecodable``.
        """
        try:
            return self.decode(data)
        except Exception as exc:
            self._mailboxes.stats.dropped_undecodable += 1
            logger.warning(
                "dropped an undecodable message (%s) from %s: %s: %s",
                f"{len(data)} bytes"
                if isinstance(data, (bytes, bytearray, memoryview))
                else type(data).__name__,
                where % names if names else where,
                type(exc).__name__,
                exc,
            )
            return None

    # ------------------------------------------------------------- public API

    async def send(self, channel: str, message: Message) -> None:
        """Send ``message`` (a dict) to ``channel``.

        Raises :class:`ChannelFull` if the channel already holds ``capacity``
        messages, :class:`~fastapi_websockets.exceptions.SerializationError` if a
        value cannot be carried, and :class:`MessageTooLarge` over the size limit.
        """
        if self._closed:
            self._check_open()
        if type(channel) is not str or channel not in known_channel_names:
            validate_channel_name(channel)  # what it would find in the memo, without two calls
        if observing.hooks is not None:
            await observing.hooks.message_out(self, "send", message, partial(self._send_message, channel))
            return
        # What _send_message() does, without its coroutine, and _ensure_started() only
        # awaited before the start: each was a coroutine per message, for every backend.
        data = self._deliver_or_encode(channel, message)
        if data is not None:
            if not self._start_clear:
                await self._ensure_started()
            await self._send_remote(channel, data)

    async def _send_message(self, channel: str, message: Message) -> None:
        data = self._deliver_or_encode(channel, message)
        if data is not None:
            await self._ensure_started()
            await self._send_remote(channel, data)

    def _deliver_or_encode(self, channel: str, message: Message) -> bytes | None:
        """``message`` encoded for the broker, or None once delivered to a local mailbox."""
        data = self.encode(message)
        if self.is_local(channel):
            self.deliver_local(channel, self.decode(data), raise_full=True)
            return None
        return data

    async def receive(self, channel: str, timeout: float | None = None) -> Message:
        """Wait for the next message on ``channel`` and return it.

        With ``timeout`` (seconds), raises :class:`ReceiveTimeout` (a
        ``TimeoutError``) when nothing arrives in time. Raises
        :class:`ChannelLayerClosed` when the layer is closed while waiting.
        Cancelling a pending ``receive()`` loses no message.
        """
        if (
            timeout is None
            and type(channel) is str  # an unhashable non-name must reach the name check
            and channel in self._live_channels
            and self._started
            and not self._closed
        ):
            # The common case without _receive_message(): a fan-out to 1,000 receivers of one
            # process makes 1,000 calls a round, and its coroutine, name check and is_local()
            # cost a quarter of the in-memory layer's instructions per round (a live channel
            # came from new_channel(): its name is valid and it is local).
            message = await self._mailboxes.get(channel)
        else:
            message = await self._receive_message(channel, timeout)
        self._mailboxes.stats.received += 1
        return message

    def listen(self, channel: str, listener: Listener) -> Message | None:
        """Take the next message of one of this instance's channels, or leave ``listener`` for it.

        The callback form of :meth:`receive`, for a channel's single reader (a
        consumer): an idle reader then needs no waiting task. Returns the oldest
        queued message, or None; in that case ``listener`` is called once,
        synchronously from the delivery, with the next message, or with
        :class:`ChannelLayerClosed` when the layer closes or the channel is
        released. It runs inside the sender's delivery, so it must return
        without waiting; it may start a task, eagerly too (consumers do on
        Python 3.12+: a handler that does not wait runs within the delivery),
        and may leave a listener again, since it was removed before the call.
        :meth:`unlisten` withdraws it.
        Raises :class:`ChannelLayerClosed` on a closed layer and
        :class:`InvalidChannelName` for any other channel than a live one of
        this instance's :meth:`new_channel`.
        """
        # The check of _check_open() inline: a consumer calls this once per event it handles.
        if self._closed or channel not in self._live_channels:
            self._check_open()
            raise InvalidChannelName(
                f"listen() needs a channel this layer instance's new_channel() returned and that "
                f"is not released, got {channel!r}"
            )
        message = self._mailboxes.listen(channel, listener)
        if message is not None:
            self._mailboxes.stats.received += 1
        return message

    def unlisten(self, channel: str) -> None:
        """Withdraw the listener :meth:`listen` left for ``channel``; it will not be called."""
        self._mailboxes.unlisten(channel)

    async def _receive_message(self, channel: str, timeout: float | None) -> Message:
        self._check_open()
        validate_channel_name(channel)
        # `not timeout >= 0` also refuses NaN, whose timer would never be due (or due at
        # once) and would sit in the event loop's timer heap, which orders by comparison.
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise ValueError(
                f"timeout must be a non-negative number of seconds, or None to wait forever; got {timeout!r}"
            )
        if self.is_local(channel):
            if not self._started:
                await self._ensure_started()
            return await self._mailboxes.get(channel, timeout)
        if is_process_specific(channel):
            raise InvalidChannelName(
                f"channel {channel!r} was created by another layer instance; only the layer "
                "whose new_channel() returned it can receive from it"
            )
        parked = self._mailboxes.pop_nowait(channel)
        if parked is not None:
            return parked
        await self._ensure_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                message = await self._receive_named(channel, remaining)
            except ReceiveTimeout as exc:
                # It names what was left of the wait ("within 0.2999987 s"); the caller gave timeout.
                raise ReceiveTimeout(channel, exc.timeout if timeout is None else timeout) from None
            if EXCLUDE_KEY not in message:
                return message
            if channel not in message[EXCLUDE_KEY]:
                return _without_exclude(message)
            # A group_send that excluded this named channel: not for us.

    async def _receive_named(self, channel: str, timeout: float | None) -> Message:
        inner = asyncio.ensure_future(self._receive_remote(channel))
        self._remote_receives.add(inner)
        inner.add_done_callback(self._forget_remote_receive)
        # A timer rather than asyncio.wait_for(), which can swallow a cancellation of the
        # caller that arrives together with the result.
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            if not inner.done():
                timed_out = True
                inner.cancel()

        timer = running_loop().call_later(timeout, expire) if timeout is not None else None
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done() and not inner.cancelled() and inner.exception() is None:
                # Claimed from the broker just as we were cancelled: keep it for the
                # next receiver instead of losing it.
                self._keep_claimed(channel, inner.result())
            else:
                self._cancel_keeping_late_result(inner, channel)
            if not _cancelling():
                if timed_out and timeout is not None:
                    raise ReceiveTimeout(channel, timeout) from None
                if self._closed:
                    raise ChannelLayerClosed("the channel layer was closed") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not inner.done():
                self._cancel_keeping_late_result(inner, channel)

    def _cancel_keeping_late_result(self, inner: asyncio.Future[Message], channel: str) -> None:
        # A driver may swallow the cancellation and still return a message it claimed;
        # park such a late result in the local mailbox rather than dropping it.
        def park(task: asyncio.Future[Message]) -> None:
            if not task.cancelled() and task.exception() is None:
                self._keep_claimed(channel, task.result())

        inner.add_done_callback(park)
        inner.cancel()

    def _keep_claimed(self, channel: str, message: Message) -> None:
        """A named-channel message claimed for a receive that was cancelled: for the next
        receive here, or, once the layer is closing, to go back to the broker."""
        if self._closed:
            self._claimed_on_close.append((channel, message))
        else:
            self.deliver_local(channel, message)

    def _forget_remote_receive(self, task: asyncio.Task[Message]) -> None:
        self._remote_receives.discard(task)
        if not task.cancelled() and task.exception() is not None and self._closed:
            # The receiver was already woken by close(); nobody else will look at this.
            logger.debug("receive task ended after close", exc_info=task.exception())

    async def new_channel(self, prefix: str = "specific") -> str:
        """Return a new process-specific channel name, ``"{prefix}.{token}!{id}"``.

        Only this layer instance can receive from it; any process can send to it.
        """
        self._check_open()
        validate_prefix(prefix)
        await self._ensure_started()
        channel = f"{prefix}.{self.client_token}!{new_token(6)}"
        self._live_channels.add(channel)
        return channel

    def forget_channel(self, channel: str) -> None:
        """Release one of this instance's channels: its connection ended, nobody will read it again.

        Its queued messages and everything sent to it from now on are dropped
        at once (counted in ``stats.dropped_released``) instead of being kept
        until ``channel_expiry``; a receive still waiting on it gets
        :class:`ChannelLayerClosed`. Consumers call it when their connection
        ends, before they leave their groups, so that what the groups send
        meanwhile is not queued. Group memberships are not touched (leave them too).
        """
        self._live_channels.discard(channel)
        # Its catch-up floors would otherwise wait for a message that never comes to expire.
        self._floors.pop(channel, None)
        if self.is_local(channel) and is_process_specific(channel):
            self._mailboxes.drop(channel, ChannelLayerClosed(f"channel {channel!r} was released"))

    def _is_released(self, channel: str) -> bool:
        return (
            channel not in self._live_channels
            and is_process_specific(channel)
            and process_token(channel) == self.client_token
        )

    async def group_add(
        self, group: str, channel: str, *, since: StreamPosition | None = None
    ) -> History | None:
        """Add ``channel`` to ``group`` (or refresh its join time).

        With ``since`` (a :class:`StreamPosition` the client last saw), also
        catch up: returns the :class:`History` page of what was sent after it.
        For a channel of this layer instance, every message sent to the group
        is then either in the page or delivered live, never both and never
        neither; live ones have offsets above ``page.position.offset``.
        """
        self._check_open()
        validate_group_name(group)
        validate_channel_name(channel)
        if since is not None:
            self._require_history(group)
            since = _as_position(since)
        await self._ensure_started()
        if since is None:
            await self._group_add(group, channel)
            return None
        # Member first, then read: a message sent in between is in the page and maybe
        # also on its way live, so live copies at or below the page's end are dropped.
        # Live copies that arrive before the page do are held until the floor is set.
        local = self.is_local(channel)
        if local:
            self._hold(channel)
        try:
            await self._group_add(group, channel)
            page = await self.group_history(group, since=since)
            if local:
                self._set_floor(channel, page.position)
        finally:
            if local:
                self._release(channel)
        return page

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; a no-op if it is not a member."""
        self._check_open()
        validate_group_name(group)
        validate_channel_name(channel)
        await self._ensure_started()
        await self._group_discard(group, channel)

    async def group_send(
        self, group: str, message: Message, *, exclude: str | Iterable[str] | None = None
    ) -> StreamPosition | None:
        """Send ``message`` to every member of ``group``.

        The message is encoded once. Members whose channel is full are skipped
        (counted in :attr:`stats`), never blocking the others. For a group with
        history, returns the message's :class:`StreamPosition` (members get it
        under ``"_position"``); otherwise None.
        """
        self._check_open()
        validate_group_name(group)
        if observing.hooks is not None:
            send = partial(self._group_send_message, group, exclude=exclude)
            return await observing.hooks.message_out(self, "group_send", message, send)
        return await self._group_send_message(group, message, exclude=exclude)

    async def _group_send_message(
        self, group: str, message: Message, *, exclude: str | Iterable[str] | None
    ) -> StreamPosition | None:
        if exclude is not None:
            skipped = _excluded(exclude)
            if skipped:
                if not isinstance(message, dict):
                    raise not_a_dict(message)
                if EXCLUDE_KEY in message:
                    raise InvalidMessage(f"message has the reserved key {EXCLUDE_KEY!r}; rename that key")
                message = {**message, EXCLUDE_KEY: skipped}
        policy = self.history_policy(group) if self.history else None
        if policy is None:
            data = self.encode(message)
            await self._ensure_started()
            await self._group_send(group, data)
            return None
        if POSITION_KEY in message:
            raise InvalidMessage(
                f"message for group {group!r} has the reserved key {POSITION_KEY!r}: the layer sets it "
                "on groups with history; rename that key"
            )
        await self._ensure_started()
        return await self._group_send_history(group, message, policy)

    async def group_history(
        self, group: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> History:
        """The stored history of ``group``: the newest ``limit`` messages, or those after ``since``.

        ``limit`` defaults to the group's history size. ``recovered`` is True
        when the page holds exactly every message after ``since`` (without
        ``since``: every message of the current epoch). Raises
        :class:`InvalidChannelLayerConfig` for a group no ``history`` pattern matches.
        """
        self._check_open()
        validate_group_name(group)
        policy = self._require_history(group)
        if limit is None:
            limit = policy.size
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if since is not None:
            since = _as_position(since)
        await self._ensure_started()
        after = since.offset if since is not None else 0
        part = await self._history_read(group, after, limit + 1, policy)
        if since is not None and since.epoch != part.epoch:
            # Another life of the history: the offsets say nothing; give the newest.
            part = await self._history_read(group, 0, limit, policy) if after else part
            recovered = False
        else:
            recovered = part.complete and len(part.entries) <= limit
        entries = part.entries[-limit:]
        messages = []
        for offset, data in entries:
            message = self.decode_or_drop(data, f"the history of group {group!r}")
            if message is None:
                recovered = False
                continue
            # An exclude applies to live delivery only; a page is the group's history.
            message.pop(EXCLUDE_KEY, None)
            message[POSITION_KEY] = {"offset": offset, "epoch": part.epoch}
            messages.append(message)
        return History(messages, StreamPosition(part.newest, part.epoch), recovered)

    def _require_history(self, group: str) -> HistoryPolicy:
        policy = self.history_policy(group)
        if policy is None:
            raise InvalidChannelLayerConfig(
                f"group {group!r} keeps no history: add a glob matching it to the 'history' option, "
                'e.g. {"history": {"room:*": {"size": 100, "ttl": 600}}}'
            )
        return policy

    # --------------------------------------------------------------- presence

    async def presence_join(
        self, group: str, channel: str, info: Mapping[str, Any] | None = None, *, notify: bool = True
    ) -> None:
        """Mark ``channel`` present in ``group`` with ``info`` (a dict the serializer can carry).

        Joining again updates the info. The entry lives until
        :meth:`presence_leave`, until this layer closes, or, if the process dies
        without either, at most ``presence_timeout`` seconds. Unless ``notify``
        is False, the group's members get ``{"type": "presence.joined", "group",
        "channel", "info"}``. Joining presence does not add ``channel`` to the
        group (a consumer's ``presence_join`` does both).
        """
        self._check_open()
        validate_group_name(group)
        validate_channel_name(channel)
        details = _presence_info(info)
        data = self.encode(details)
        await self._ensure_started()
        async with self._presence_lock:
            first = not self._presence
            try:
                queued = await self._presence_put(group, channel, data)
            except BaseException:
                self._take_back(group, channel)
                raise
            self._presence.add(group, channel, data)
        if first:
            self._presence_started()
        if queued is not None:
            try:
                await queued.stored
            except BaseException:
                if self._presence.members(group).get(channel) is data:
                    self._presence.remove(group, channel)
                self._take_back(group, channel)
                raise
        if notify:
            await self._send_event(group, presence_event(PRESENCE_JOINED, group, channel, details))

    async def presence_leave(self, group: str, channel: str, *, notify: bool = True) -> None:
        """Remove ``channel`` from the presence of ``group``; a no-op if it is not present.

        Unless ``notify`` is False, the group's members get ``{"type":
        "presence.left", ...}`` with the info the entry had.
        """
        self._check_open()
        validate_group_name(group)
        validate_channel_name(channel)
        await self._ensure_started()
        async with self._presence_lock:
            removed = await self._presence_remove(group, channel)
            self._presence.remove(group, channel)
        try:
            data = await _stored(removed)
        except Exception:
            # A cancelled caller's removal is still written; a failed one is queued once more.
            self._take_back(group, channel)
            raise
        if notify and data is not None:
            await self._announce_left(group, channel, data)

    async def presence(self, group: str) -> dict[str, dict[str, Any]]:
        """Who is present in ``group``: ``{channel: info}`` across every process and instance."""
        self._check_open()
        validate_group_name(group)
        await self._ensure_started()
        entries = await self._presence_read(group)
        present = {}
        for channel, data in entries.items():
            info = self.decode_or_drop(data, f"the presence of group {group!r}")
            if info is not None:
                present[channel] = info
        return present

    def _take_back(self, group: str, channel: str) -> None:
        """Remove from the broker an entry a join or a leave may have left there, unless it is wanted.

        Called when a join failed or its caller gave up (a caller that saw that will
        not leave), and when a queued removal failed. The write may have been applied
        anyway (it was queued, or its reply was lost), so unless the layer holds the
        entry again (joined meanwhile; it is decided here, once the caller forgot it),
        a removal is queued behind it. Closing removes every entry this process owns.
        """
        if not self._closed and channel not in self._presence.channels(group):
            self._presence_take_back(group, channel)

    async def _announce_left(self, group: str, channel: str, data: bytes) -> None:
        info = self.decode_or_drop(data, f"the presence of group {group!r}") or {}
        await self._send_event(group, presence_event(PRESENCE_LEFT, group, channel, info))

    async def _send_event(self, group: str, message: Message) -> None:
        # Layer events (presence) reach the members but never the group's history.
        await self._group_send(group, self.encode(message))

    async def presence_heartbeat(self) -> None:
        """Refresh this process's liveness, restore lost entries, and clean up after dead processes.

        Broker backends do both halves every ``presence_timeout / 3`` seconds
        while this layer has presence entries, each on its own schedule so that
        a slow clean-up never delays a beat; it is public for tests and for apps
        that drive their own schedule.
        """
        await self._presence_keep_alive()
        await self._presence_clean_up()

    async def _presence_keep_alive(self) -> None:
        """Beat once, and store every entry again if the broker lost this process's record."""
        # The beat holds its own lock, not the presence lock: held across the beat's round
        # trip, that would make every join and leave arriving meanwhile queue, and an asyncio
        # lock with a queue hands itself on once per loop turn, so under steady churn the
        # queue never drained (the churn soak's full mailboxes).
        async with self._beat_lock:
            # The beat stores our liveness record again when the broker lost it, so a
            # restore that failed is only seen as due by our own flag at the next beat.
            if self._presence and (await self._presence_beat() or self._restore_due):
                self._restore_due = True
                async with self._presence_lock:
                    # The broker lost our record (restarted without persistence): store ours
                    # again, every write queued before any is waited for (and each waited for).
                    puts: list[QueuedWrite | None] = []
                    try:
                        for entry in self._presence.items():
                            puts.append(await self._presence_put(*entry))
                    finally:
                        await wait_all([_stored(put) for put in puts])
                self._restore_due = False

    async def _presence_clean_up(self) -> None:
        """Remove the entries of processes that stopped beating and announce them as left."""
        # One reap at a time per layer. Two at once (a manual presence_heartbeat() beside the
        # background reaper) both claimed the same dead process: on RabbitMQ both won (its claim
        # is an exclusive queue, which the connection that declared it may declare again) and
        # every leave was announced twice; on NATS the second failed (the sequence was gone).
        # The reap after a finished one finds the claimed process gone.
        async with self._reap_lock:
            reaped = await self._presence_reap()
        for group, channel, _ in reaped:
            logger.info("presence: %r left %r (its process stopped answering)", channel, group)
        # Announced together: a dead process may have left many entries, and each
        # announcement is a group message the backend can write along with the others.
        await wait_all([self._announce_left(*entry) for entry in reaped])

    async def _leave_presence_on_close(self) -> None:
        removals: list[tuple[str, str, bytes, bytes | QueuedWrite | None]] = []
        unreachable: BackendUnavailable | None = None
        skipped = 0
        try:
            for group, channel, data in self._presence.items():
                if unreachable is not None:
                    # Each would wait out `timeout` as the last one did (a close with many
                    # entries took that many timeouts): left to expire, as a dead process's are.
                    skipped += 1
                    continue
                try:
                    removals.append((group, channel, data, await self._presence_remove(group, channel)))
                except ChannelLayerError as exc:
                    _not_removed(group, channel, exc)
                    if isinstance(exc, BackendUnavailable):
                        unreachable = exc
                    continue
                # Forgotten one by one, as presence_leave does: a backend can tell the last
                # entry of a group (or of this layer) and drop its own records with it.
                self._presence.remove(group, channel)
        finally:
            # Every removal is queued before any is waited for; each entry is announced once removed.
            await wait_all([self._left_on_close(*removal) for removal in removals])
        if skipped:
            logger.warning(
                "did not try to remove %d more presence entries on close: %s", skipped, unreachable
            )
        self._presence.clear()

    async def _left_on_close(
        self, group: str, channel: str, data: bytes, removal: bytes | QueuedWrite | None
    ) -> None:
        try:
            await _stored(removal)
            await self._announce_left(group, channel, data)
        except ChannelLayerError as exc:
            _not_removed(group, channel, exc)

    async def flush(self) -> None:
        """Drop every message and group this layer's storage holds (for tests)."""
        self._check_open()
        await self._ensure_started()
        await self._flush()
        self._mailboxes.clear()
        self._local_groups.clear()
        self._floors.clear()
        self._presence.clear()

    async def close(self) -> None:
        """Close the layer: wake pending receivers with ``ChannelLayerClosed``, release resources.

        First, named-channel messages this instance claimed for receivers that were
        cancelled, still waiting here for a next receive, are sent back to their
        channel (at its tail, with a new expiry), so a reader elsewhere gets them.
        Idempotent; awaits every background task the layer started. A close() made while
        another is under way waits for that one instead of closing a second time.
        """
        if self._close_done is not None:
            # The first close() may still be leaving presence or sending parked messages
            # back: a second one closing the backend under it would make those fail.
            await asyncio.shield(self._close_done)
            return
        self._close_done = running_loop().create_future()
        try:
            await self._close_once()
        finally:
            self._close_done.set_result(None)

    async def _close_once(self) -> None:
        if self._presence and self._started:
            await self._leave_presence_on_close()
        if self._started:
            # Named-channel messages claimed from the broker for receivers that were
            # cancelled, parked here for the next receive: nobody will receive them here
            # any more. Sent back while the layer still sends (some refuse once closed).
            await self._give_back_claimed(self._mailboxes.take_all(lambda name: not self.is_local(name)))
        self._closed = True
        self._mailboxes.close()
        for task in list(self._remote_receives):
            task.cancel()
        if self._remote_receives:
            await asyncio.gather(*self._remote_receives, return_exceptions=True)
        async with self._start_lock:
            if self._started:
                # Claimed by a cancelled receive's late result meanwhile; a backend whose
                # sends refuse once closed (Redis) loses these, with a warning.
                late, self._claimed_on_close = self._claimed_on_close, []
                await self._give_back_claimed(late)
                await self._close()

    async def _give_back_claimed(self, claimed: list[tuple[str, Message]]) -> None:
        """Send named-channel messages claimed for receivers that are gone back to their channels.

        Back at the tail of the channel, with a new expiry: a reader elsewhere gets them
        after what was sent meanwhile, rather than never.
        """
        for channel, message in claimed:
            try:
                await self._send_remote(channel, self.encode(message))
            except ChannelLayerError as exc:
                logger.warning("lost a message of %r claimed for a cancelled receive: %s", channel, exc)

    async def __aenter__(self) -> BaseChannelLayer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------ for the backends

    def deliver_local(self, channel: str, message: Message, *, raise_full: bool = False) -> bool:
        """Put ``message`` into the local mailbox of ``channel``.

        Returns False when the mailbox is full and the message was dropped, or
        raises :class:`ChannelFull` if ``raise_full``.
        """
        if EXCLUDE_KEY in message:
            if channel in message[EXCLUDE_KEY]:
                return True
            message = _without_exclude(message)
        if self._held and POSITION_KEY in message and channel in self._held:
            self._held[channel][1].append(message)
            return True
        if self._floors and POSITION_KEY in message and self._below_floor(channel, message):
            return True
        if self._mailboxes.put(channel, message):
            return True
        if raise_full:
            raise ChannelFull(channel, self.capacity_for(channel))
        self._mailboxes.stats.dropped_full += 1
        logger.debug("dropped a message for full channel %r", channel)
        return False

    def deliver_many(self, channels: list[str], message: Message) -> int:
        """Put one ``message`` into the mailboxes of ``channels``; full ones are skipped and counted.

        Returns how many channels got it.
        """
        if EXCLUDE_KEY in message:
            excluded = set(message[EXCLUDE_KEY])
            channels = [channel for channel in channels if channel not in excluded]
            message = _without_exclude(message)
        if self._held and POSITION_KEY in message:
            held = [channel for channel in channels if channel in self._held]
            for channel in held:
                self._held[channel][1].append(message)
            if held:
                channels = [channel for channel in channels if channel not in self._held]
        if self._floors and POSITION_KEY in message:
            channels = [channel for channel in channels if not self._below_floor(channel, message)]
        full = self._mailboxes.put_many(channels, message)
        if full:
            self._mailboxes.stats.dropped_full += len(full)
            logger.debug("skipped %d full channel(s), e.g. %r", len(full), full[0])
        return len(channels) - len(full)

    def deliver_to_local_members(self, group: str, message: Message) -> int:
        """Fan ``message`` out to this process's members of ``group``; return how many got it."""
        return self.deliver_many(self._local_groups.members(group), message)

    def _hold(self, channel: str) -> None:
        count, held = self._held.get(channel, (0, []))
        self._held[channel] = (count + 1, held)

    def _release(self, channel: str) -> None:
        count, held = self._held.pop(channel)
        if count > 1:
            self._held[channel] = (count - 1, held)
            return
        for message in held:
            self.deliver_local(channel, message)

    def _set_floor(self, channel: str, position: StreamPosition) -> None:
        now = time.monotonic()
        if len(self._floors) >= self._floors_pruned_at * 2 + 64:
            # A floor is otherwise dropped only by a later message for its channel, and a
            # channel nobody released (no forget_channel) may never get one: sweep expired
            # floors, amortised over as many new floors as were kept.
            for stale in [name for name, floors in self._floors.items() if _floors_expired(floors, now)]:
                del self._floors[stale]
            self._floors_pruned_at = len(self._floors)
        floors = self._floors.setdefault(channel, {})
        floors[position.epoch] = (position.offset, now + _FLOOR_SECONDS)

    def _below_floor(self, channel: str, message: Message) -> bool:
        floors = self._floors.get(channel)
        if floors is None:
            return False
        position = message[POSITION_KEY]
        epoch = position.get("epoch") if isinstance(position, dict) else None
        floor = floors.get(epoch) if isinstance(epoch, str) else None
        if floor is None:
            return False
        offset, deadline = floor
        if time.monotonic() > deadline:
            del floors[position["epoch"]]
            if not floors:
                del self._floors[channel]
            return False
        return isinstance(position.get("offset"), int) and position["offset"] <= offset

    @property
    def local_groups(self) -> LocalGroups:
        """Membership of the channels that live in this layer instance."""
        return self._local_groups

    # ------------------------------------------------------- template methods

    async def _start(self) -> None:  # noqa: B027 - optional hook
        """Connect and start background readers; called once, lazily, under a lock."""

    @abc.abstractmethod
    def _send_remote(self, channel: str, data: bytes) -> Awaitable[None]:
        """Deliver encoded ``data`` to a named channel or another instance's channel.

        Typed as an awaitable so a backend may hand back a future or another coroutine
        instead of one around it; an ``async def`` override fits too.
        """

    @abc.abstractmethod
    async def _receive_remote(self, channel: str) -> Message:
        """Claim one message of a named channel; must lose nothing when cancelled."""

    @abc.abstractmethod
    async def _group_add(self, group: str, channel: str) -> None:
        """Record membership (a refresh if already a member)."""

    @abc.abstractmethod
    async def _group_discard(self, group: str, channel: str) -> None:
        """Forget membership."""

    @abc.abstractmethod
    async def _group_send(self, group: str, data: bytes) -> None:
        """Deliver encoded ``data`` to every member of ``group``."""

    async def _group_send_history(
        self, group: str, message: Message, policy: HistoryPolicy
    ) -> StreamPosition:
        """Store ``message`` in the group's history, then deliver it with its ``"_position"``.

        Backends that can do both in one round trip override this.
        """
        position = await self._history_append(group, self.encode(message), policy)
        await self._group_send(group, self.encode({**message, POSITION_KEY: position.as_dict()}))
        return position

    async def _history_append(self, group: str, data: bytes, policy: HistoryPolicy) -> StreamPosition:
        """Store ``data`` as the group's next message (offset assigned atomically); return its position."""
        raise NotImplementedError(f"{type(self).__name__} does not keep group history yet")

    async def _history_read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        """The newest ``limit`` stored messages of ``group`` with an offset above ``after``."""
        raise NotImplementedError(f"{type(self).__name__} does not keep group history yet")

    def _presence_started(self) -> None:  # noqa: B027 - optional hook
        """Called when this layer's presence goes from no entry to one, again after every member
        left; broker layers start their one heartbeat (so it must be idempotent)."""

    async def _presence_put(self, group: str, channel: str, info: bytes) -> QueuedWrite | None:
        """Store (or update) this process's entry ``channel`` in the presence of ``group``.

        Called under the presence lock; a backend may return a :class:`QueuedWrite`
        instead of waiting (its changes must then apply in the order they were queued).
        """
        raise NotImplementedError(f"{type(self).__name__} does not keep presence yet")

    async def _presence_remove(self, group: str, channel: str) -> bytes | QueuedWrite | None:
        """Remove an entry; return its info, or None if there was none (or a :class:`QueuedWrite`)."""
        raise NotImplementedError(f"{type(self).__name__} does not keep presence yet")

    def _presence_take_back(self, group: str, channel: str) -> None:  # noqa: B027 - optional hook
        """Queue the removal of this process's entry ``channel`` in ``group``, without waiting.

        Queued behind every presence change queued before it (the join or leave it
        takes back included), so it applies after them; a failure is logged, not
        raised. Backends whose writes are awaited in full under the presence lock
        (in memory) have nothing to take back.
        """

    async def _presence_read(self, group: str) -> dict[str, bytes]:
        """The entries of ``group`` whose process is alive: ``{channel: info}``."""
        raise NotImplementedError(f"{type(self).__name__} does not keep presence yet")

    async def _presence_beat(self) -> bool:
        """Mark this process alive for ``presence_timeout`` more seconds; True if its record was lost."""
        return False

    async def _presence_reap(self) -> list[tuple[str, str, bytes]]:
        """Remove the entries of processes that stopped beating; return ``(group, channel, info)``.

        Each dead process's entries must be returned by one caller only (claimed
        atomically), so each leave is announced once. Within a layer, reaps run
        one at a time (:meth:`_presence_clean_up`).
        """
        return []

    @abc.abstractmethod
    async def _flush(self) -> None:
        """Drop everything the broker stores for this layer's prefix."""

    async def _close(self) -> None:  # noqa: B027 - optional hook
        """Cancel and await background tasks, release connections."""


#: The reserved key carrying a group_send's ``exclude`` to the processes that deliver it.
EXCLUDE_KEY = "__exclude__"


def _excluded(exclude: object) -> list[str]:
    """The channel names of group_send()'s ``exclude``, checked, sorted and without repeats."""
    if isinstance(exclude, str):
        return [validate_channel_name(exclude)]
    if isinstance(exclude, (bytes, bytearray, Mapping)) or not isinstance(exclude, Iterable):
        raise InvalidChannelName(
            f"exclude must be a channel name or an iterable of channel names, got "
            f"{type(exclude).__name__}: {exclude!r:.60}"
        )
    return sorted({validate_channel_name(name) for name in exclude})


def _without_exclude(message: Message) -> Message:
    return {key: value for key, value in message.items() if key != EXCLUDE_KEY}


#: Seconds a catch-up floor is kept: enough for every copy sent before the page was read.
_FLOOR_SECONDS = 60.0


def _floors_expired(floors: dict[str, tuple[int, float]], now: float) -> bool:
    return all(deadline < now for _, deadline in floors.values())


def _as_position(value: object) -> StreamPosition:
    if isinstance(value, StreamPosition):
        return value
    if isinstance(value, Mapping):
        value = (value.get("offset"), value.get("epoch"))
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], str)
    ):
        return StreamPosition(value[0], value[1])
    raise ValueError(f"since must be a StreamPosition(offset, epoch), got {value!r}")


async def _stored(change: bytes | QueuedWrite | None) -> bytes | None:
    """Wait for a presence change a backend queued (if it did); the info it removed."""
    if isinstance(change, QueuedWrite):
        await change.stored
        return change.info
    return change


def _not_removed(group: str, channel: str, exc: ChannelLayerError) -> None:
    logger.warning("could not remove presence of %r in %r on close: %s", channel, group, exc)


def _presence_info(info: object) -> dict[str, Any]:
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise InvalidMessage(f"presence info must be a dict, got {type(info).__name__}")
    return dict(info)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and hasattr(task, "cancelling") and task.cancelling() > 0
