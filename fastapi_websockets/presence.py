"""Presence: who is in a group right now, across every process, with join and leave events.

The layer API (``presence_join``, ``presence_leave``, ``presence``) lives on
:class:`~fastapi_websockets.backends.base.BaseChannelLayer`; this module holds
what it shares with the backends: the event builders and the bookkeeping of
the entries this layer instance owns, which it re-stores after the broker
lost them and removes when it closes.

Entries are stored in the broker next to the owning process's liveness record
(refreshed by one heartbeat per process every ``presence_timeout / 3``
seconds, whatever the number of members). When a process dies without
leaving, its record expires and the first live process to notice removes its
entries and announces them as left.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection
from dataclasses import dataclass
from typing import Any

from fastapi_websockets.types import Message

__all__ = ["PRESENCE_JOINED", "PRESENCE_LEFT", "LocalPresence", "QueuedWrite", "presence_event"]

#: Event types sent to a group's members (handled by ``presence_joined`` / ``presence_left``).
PRESENCE_JOINED = "presence.joined"
PRESENCE_LEFT = "presence.left"


def presence_event(kind: str, group: str, channel: str, info: dict[str, Any]) -> Message:
    """The group message announcing that ``channel`` joined or left ``group``."""
    return {"type": kind, "group": group, "channel": channel, "info": info}


@dataclass(frozen=True, slots=True)
class QueuedWrite:
    """A presence change a backend queued, in order, without waiting for the broker to store it.

    A backend's ``_presence_put`` or ``_presence_remove`` may return one when
    its changes keep the order they were queued in (RabbitMQ's publishes on
    one channel): the layer awaits ``stored`` after releasing its presence
    lock, so concurrent joins wait for the broker together instead of one
    after another. ``stored`` raises if the change was not stored (or not
    known to be), or when its caller is cancelled; the change may be applied
    all the same, so the layer then calls the backend's ``_presence_take_back``
    (unless it holds the entry again), which queues a removal behind it.
    ``info`` is what a removal removed.
    """

    stored: Awaitable[None]
    info: bytes | None = None


class LocalPresence:
    """Presence entries kept in process memory: ``{group: {channel: encoded info}}``.

    A layer keeps the entries it owns here; the in-memory backend keeps all of them.
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, bytes]] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, group: str, channel: str, info: bytes) -> None:
        """Remember an entry (a join, or an update of its info)."""
        self._entries.setdefault(group, {})[channel] = info

    def remove(self, group: str, channel: str) -> bytes | None:
        """Forget an entry; return its info, or None if it was not ours."""
        members = self._entries.get(group)
        if members is None:
            return None
        info = members.pop(channel, None)
        if not members:
            del self._entries[group]
        return info

    def members(self, group: str) -> dict[str, bytes]:
        """The entries of ``group``: ``{channel: info}`` (a copy)."""
        return dict(self._entries.get(group, {}))

    def channels(self, group: str) -> Collection[str]:
        """The channels of ``group`` this instance owns (a live view, not a copy)."""
        return self._entries.get(group, {}).keys()

    def items(self) -> list[tuple[str, str, bytes]]:
        """Every entry as ``(group, channel, info)``."""
        return [
            (group, channel, info)
            for group, members in self._entries.items()
            for channel, info in members.items()
        ]

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
