"""What every broker backend shares on top of :class:`BaseChannelLayer`.

:class:`BrokerChannelLayer` gives a backend the common option ``timeout``
(one name for "how long a broker call may take" on every broker), a
:class:`~fastapi_websockets.backends.supervisor.TaskSupervisor` for its
background tasks, the one :class:`~fastapi_websockets.backends.backoff.Backoff`
policy, and the way to describe its broker in errors and logs without a
password (:meth:`BrokerChannelLayer.unavailable`, :meth:`BrokerChannelLayer.redact`),
the one policy for a refusal asking again cannot fix, a refused login above all
(:meth:`BrokerChannelLayer.refused`, :meth:`BrokerChannelLayer.login_refused`),
and the place to report the broker connection going down and up again
(:meth:`BrokerChannelLayer.report_connection`, read by the metrics at scrape time).
A backend module then holds broker code only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.backoff import Backoff
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.backends.options import positive
from fastapi_websockets.backends.packing import IN_FLIGHT, MAX_FRAMES, Packer, SendMany, SendOne, unpack
from fastapi_websockets.backends.supervisor import TaskSupervisor
from fastapi_websockets.backends.tls import ca_file, describe_tls, tls_failure
from fastapi_websockets.backends.urls import location, redact_text, redact_url
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelLayerClosed,
    ChannelLayerError,
    InvalidChannelLayerConfig,
)

__all__ = ["BrokerChannelLayer", "ConnectionStats"]

logger = logging.getLogger("fastapi_websockets")


@dataclass
class ConnectionStats:
    """The state of a layer's broker connection, as its backend reports it."""

    #: True while connected, False while not, None before the first connection.
    up: bool | None = None
    #: Times the connection came back after being lost.
    reconnections: int = 0


class BrokerChannelLayer(BaseChannelLayer):
    """Base class of the layers that talk to a broker server.

    Options, besides those of :class:`BaseChannelLayer`:

    * ``timeout``: seconds a broker call may take, reconnecting included;
      past it (or when the broker refuses connections) calls raise
      :class:`~fastapi_websockets.exceptions.BackendUnavailable`.
    * ``tls_ca_file``: a PEM bundle of the CAs that sign the broker's
      certificate, for the broker's secure scheme (``rediss://``, ``tls://``,
      ``amqps://``, PostgreSQL ``sslmode=verify-full``); see
      :mod:`fastapi_websockets.backends.tls`.
    """

    #: The broker's name in messages ("Redis").
    broker_label: ClassVar[str] = "the broker"
    #: The port assumed when a URL names none, for messages.
    default_port: ClassVar[int | None] = None

    def __init__(self, *, timeout: float = 10.0, tls_ca_file: str | None = None, **options: Any) -> None:
        #: What :meth:`report_connection` was told. Set first: BaseChannelLayer's __init__
        #: announces the layer to instrumentation, which keeps a reference to it.
        self.connection = ConnectionStats()
        super().__init__(**options)
        self.timeout = positive("timeout", timeout, "seconds")
        #: The CA bundle that verifies the broker's certificate (None: the system's).
        self.tls_ca_file = ca_file("tls_ca_file", tls_ca_file)
        #: The owner of this layer's background tasks.
        self.tasks = TaskSupervisor(f"fastapi_websockets.{self.backend_name or 'broker'}")
        self._where = self.broker_label
        self._urls = self.broker_label
        self._secrets: list[str] = []
        #: Whether the broker connection was ever up: a refused login means a wrong URL
        #: before, a server changed under a running layer after (see login_refused).
        self._connected_once = False
        #: The refusals logged since the connection was last up (once each per outage).
        self._refusals_logged: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None

    def set_location(self, *urls: str, where: str | None = None) -> None:
        """Record the broker URL(s): where messages say the broker is, and which secrets to hide.

        ``where`` replaces the ``host:port`` list taken from the URLs (for a
        broker found through a directory service, such as Redis Sentinel).
        """
        listed = ", ".join(location(url, self.default_port) for url in urls)
        self._where = where or listed or self.broker_label
        self._urls = ", ".join(redact_url(url) for url in urls) or self._where
        secrets = []
        for url in urls:
            try:
                parts = urlsplit(url)
                password, user = parts.password, parts.username
            except ValueError:
                password = user = None
            # The raw (URL-encoded) form too: drivers may quote the URL as given.
            userinfo = url.split("//", 1)[-1].split("@", 1)[0] if "@" in url else ""
            if password:
                secrets += [password, userinfo.rsplit(":", 1)[-1]]
            elif user:
                # nats://TOKEN@host: a user part without a password is a token.
                secrets += [user, userinfo]
        self._secrets = secrets

    @property
    def where(self) -> str:
        """Where the broker is (``host:port``), for messages; never credentials."""
        return self._where

    def redact(self, text: str) -> str:
        """``text`` (a driver's error message, say) with this layer's secrets replaced by ``***``."""
        return redact_text(text, self._secrets)

    def redact_url(self, url: str) -> str:
        """``url`` with its password replaced by ``***``."""
        return redact_url(url)

    #: Packs concurrent sends to one process's inbox (see :meth:`make_packer`); None where
    #: the backend does not pack.
    _packer: Packer | None = None

    def make_packer(self, send_one: SendOne, send_many: SendMany, *, confirmation: str) -> Packer:
        """A :class:`~fastapi_websockets.backends.packing.Packer` for this layer's sends to process inboxes.

        Its publishing tasks are tracked (cancelled on close, their callers
        get the error); packs are bounded by ``max_message_size`` and a queued
        send by ``timeout``, past which it raises ``BackendUnavailable`` saying
        that no ``confirmation`` (the broker's word for a stored publish) came.
        """

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            # Awaited by the senders through their frames: they get its exception.
            self.tasks.spawn(coro, "packed send", awaited=True)

        def timed_out(channel: str) -> BackendUnavailable:
            return self.unavailable(f"no {confirmation} within {self.timeout} s (send to {channel!r})")

        return Packer(
            send_one=send_one,
            send_many=send_many,
            spawn=spawn,
            in_flight=IN_FLIGHT,
            max_frames=MAX_FRAMES,
            max_bytes=self.max_message_size,
            timeout=self.timeout,
            on_timeout=timed_out,
        )

    @property
    def packed_publishes(self) -> int:
        """Publishes that carried several sends to one process's inbox (see ``packing``).

        Counted on NATS (``inbox="jetstream"``) and RabbitMQ; always 0 on the
        backends that do not pack sends (Redis, PostgreSQL, NATS with
        ``inbox="core"``).
        """
        return self._packer.packed if self._packer is not None else 0

    @property
    def packed_sends(self) -> int:
        """The sends that :attr:`packed_publishes` carried (0 where sends are not packed)."""
        return self._packer.packed_frames if self._packer is not None else 0

    def deliver_packed(self, body: bytes) -> None:
        """Deliver the sends of one packed inbox message (``packing.pack``) to their local channels.

        Each frame is handled as a lone send would be: one for a channel
        that is not this instance's is dropped, an undecodable payload or a
        full mailbox is counted per frame. A malformed body is dropped whole,
        logged and counted in ``stats.dropped_undecodable``.
        """
        try:
            frames = unpack(body)
        except ValueError as exc:
            self.stats.dropped_undecodable += 1
            logger.warning("dropped a packed inbox message of %d bytes: %s", len(body), exc)
            return
        for channel, data in frames:
            self.deliver_sent(channel, data)

    def deliver_sent(self, channel: str, data: bytes) -> None:
        """Deliver one send from the inbox to ``channel``, which must be this instance's.

        One for another instance's channel is dropped (logged at debug); an
        undecodable payload or a full mailbox is counted as for any delivery.
        """
        if not self.is_local(channel):
            logger.debug("dropped a send to %r, not a channel of this layer", channel)
            return
        message = self.decode_or_drop(data, "the inbox (for %r)", channel)
        if message is not None:
            self.deliver_local(channel, message)

    def unavailable(self, cause: BaseException | str) -> BackendUnavailable:
        """The :class:`BackendUnavailable` to raise when the broker cannot be reached.

        ``cause`` (a driver exception or a short reason) is described without
        any secret; chain the driver exception with ``raise ... from None`` or
        ``from exc`` as the case needs (its text may still hold a secret).
        """
        if isinstance(cause, BaseException):
            refused = tls_failure(cause)
            if refused is not None:
                detail = describe_tls(refused)
            else:
                detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        else:
            detail = cause
        return BackendUnavailable(
            f"{self.broker_label} is unreachable at {self._where} ({self.redact(detail)})"
        )

    def refused(self, what: str, said: str, advice: str, *, config: bool = True) -> ChannelLayerError:
        """The error for ``what`` (an operation), which the broker refused for good saying ``said``.

        Asking again cannot help, so it is not :class:`BackendUnavailable`
        ("retry later"): :class:`InvalidChannelLayerConfig` when the layer's own URL
        or options are what the broker refused (``config``), else a plain
        :class:`ChannelLayerError` (a permission to grant on the broker). The text
        names the broker, its URL without the password, the broker's words and
        ``advice``: what to fix.
        """
        error = InvalidChannelLayerConfig if config else ChannelLayerError
        # Redacted whole: the broker's words may quote a secret (a NATS token as user name).
        text = f"{self.broker_label} at {self._urls} refused the {what} ({said}): {advice}"
        return error(self.redact(text))

    def login_refused(self, said: str, advice: str) -> ChannelLayerError:
        """What a login the broker refused (``said``: its words) means, by when it came.

        One policy for every broker. Before this layer ever connected, its URL
        (user, password, database, vhost) is wrong and retrying cannot help:
        :class:`InvalidChannelLayerConfig` from :meth:`refused`, saying ``advice``.
        Once it has connected, the server changed under a running layer (a
        password rotated, a user dropped): the fix is on the server, so the
        backend keeps reconnecting with its backoff and heals once the server takes
        the login again; callers meanwhile get :class:`BackendUnavailable` quoting
        the broker, and the refusal is logged at ERROR once per outage.
        """
        error = self.refused("login", said, advice)
        if not self._connected_once:
            return error
        if said not in self._refusals_logged:
            self._refusals_logged.add(said)
            logger.error("%s; reconnecting until it takes the login again", error)
        return BackendUnavailable(
            f"{self.broker_label} at {self._where} refuses this layer's login ({self.redact(said)}); "
            "reconnecting"
        )

    def report_connection(self, up: bool) -> None:
        """Record that the broker connection is up (``True``) or lost (``False``).

        Backends call it where they connect, notice a lost connection and
        reconnect; repeating the current state is harmless. Up after down
        counts one reconnection.
        """
        state = self.connection
        if up and state.up is False:
            state.reconnections += 1
        if up:
            self._connected_once = True
            self._refusals_logged.clear()
        state.up = up

    def backoff(self) -> Backoff:
        """A fresh delay policy for one retry or reconnect loop (the same for every broker)."""
        return Backoff()

    def _presence_started(self) -> None:
        # Presence empties and fills again whenever a quiet room's last member leaves and a new
        # one joins: one heartbeat for the layer's life, not one more per refill. Reaping runs
        # beside it: claims on a loaded broker can take seconds, and the next beat waiting for
        # them let other processes judge this live one dead.
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = self.tasks.keep_running(
                lambda: self._presence_every_third(self._presence_keep_alive, "heartbeat"),
                "presence-heartbeat",
            )
        if self._reaper is None or self._reaper.done():
            self._reaper = self.tasks.keep_running(
                lambda: self._presence_every_third(self._presence_clean_up, "reaping"), "presence-reaper"
            )

    async def _presence_every_third(self, step: Callable[[], Awaitable[None]], what: str) -> None:
        # One write per process, whatever the number of members: a third of the timeout
        # leaves two beats of slack before other processes consider this one dead. At a
        # fixed rate: a step that took long (a loaded broker) does not push every later one
        # back; one that overran its slot is followed at once, never run twice at a time.
        interval = self.presence_timeout / 3
        loop = running_loop()
        due = loop.time()
        # As the readers do: the first failure of a run is logged, the same again only at
        # DEBUG (three a presence_timeout otherwise), the end of the run at INFO. Its kind is
        # "away" for any outage (the driver's text changes between attempts), else the error.
        failing: str | None = None
        while True:
            try:
                await step()
            except ChannelLayerClosed:
                return
            except ChannelLayerError as exc:
                # The next step (or the reconnect) catches up.
                kind = "away" if isinstance(exc, BackendUnavailable) else str(exc)
                if kind == failing:
                    logger.debug("presence %s on %s still fails: %s", what, self._where, exc)
                elif kind == "away":
                    logger.warning("presence %s on %s failed: %s", what, self._where, exc)
                else:
                    # Refused (an ACL, a permission) until someone grants it: not a passing outage.
                    logger.error("presence %s on %s failed: %s; retrying", what, self._where, exc)
                failing = kind
            else:
                if failing is not None:
                    logger.info("presence %s on %s works again", what, self._where)
                    failing = None
            now = loop.time()
            due = max(due + interval, now)
            await asyncio.sleep(due - now)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self._where} {state}>"

    async def close(self) -> None:
        """Close the layer (see :meth:`BaseChannelLayer.close`), then stop every background task."""
        await super().close()
        await self.tasks.close(self.timeout)
