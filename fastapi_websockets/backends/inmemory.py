"""The in-memory backend: everything lives in this process.

For development, tests and single-process apps. It enforces the same rules as
the broker backends (names, serialization, size, capacity, expiry), so code
that works here does not meet new errors when it moves to Redis or NATS.
"""

from __future__ import annotations

from typing import Any

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.history import HistoryPolicy, HistorySlice, LocalHistory, StreamPosition
from fastapi_websockets.presence import LocalPresence
from fastapi_websockets.types import Message

__all__ = ["InMemoryChannelLayer"]


class InMemoryChannelLayer(BaseChannelLayer):
    """A process-local channel layer; every channel and group lives in this instance.

    ``group_send`` costs O(members): it decodes the message once and puts it in
    each member's mailbox, with no scan of other channels or groups.
    """

    backend_name = "inmemory"

    def __init__(self, capacity: int = 100, **options: Any) -> None:
        # ``capacity`` may be passed positionally, as in 0.1.0.
        super().__init__(capacity=capacity, **options)
        self._stored_history = LocalHistory()
        self._stored_presence = LocalPresence()

    def is_local(self, channel: str) -> bool:
        """Every channel is local to an in-memory layer."""
        return True

    async def _send_remote(self, channel: str, data: bytes) -> None:
        raise AssertionError("unreachable: every in-memory channel is local")

    async def _receive_remote(self, channel: str) -> Message:
        raise AssertionError("unreachable: every in-memory channel is local")

    async def _group_add(self, group: str, channel: str) -> None:
        self.local_groups.add(group, channel)

    async def _group_discard(self, group: str, channel: str) -> None:
        self.local_groups.discard(group, channel)

    async def _group_send(self, group: str, data: bytes) -> None:
        if group in self.local_groups:
            self.deliver_to_local_members(group, self.decode(data))

    async def _history_append(self, group: str, data: bytes, policy: HistoryPolicy) -> StreamPosition:
        return self._stored_history.append(group, data, policy)

    async def _history_read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        return self._stored_history.read(group, after, limit, policy)

    async def _presence_put(self, group: str, channel: str, info: bytes) -> None:
        self._stored_presence.add(group, channel, info)

    async def _presence_remove(self, group: str, channel: str) -> bytes | None:
        return self._stored_presence.remove(group, channel)

    async def _presence_read(self, group: str) -> dict[str, bytes]:
        return self._stored_presence.members(group)

    async def _flush(self) -> None:
        """Forget group history and presence; the base class clears mailboxes and groups."""
        self._stored_history.clear()
        self._stored_presence.clear()
