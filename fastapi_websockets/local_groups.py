"""Group membership held in process memory, with a join time per member.

The in-memory backend keeps all groups here. Broker backends keep here the
members that live in *this* process, so that one broker message per group
reaches the process and is fanned out locally, and so that they can restore
their broker-side interest (subscriptions, bindings) after a reconnect.
"""

from __future__ import annotations

import time

__all__ = ["LocalGroups"]


class LocalGroups:
    """``group -> {channel: joined_at}`` with per-member expiry."""

    def __init__(self, expiry: float) -> None:
        self._expiry = expiry
        self._groups: dict[str, dict[str, float]] = {}

    def add(self, group: str, channel: str) -> bool:
        """Add or refresh a member; return True if the group had no member before."""
        members = self._groups.get(group)
        first = members is None
        if members is None:
            members = self._groups[group] = {}
        members.pop(channel, None)  # re-insert so iteration order tracks join time
        members[channel] = time.monotonic()
        return first

    def discard(self, group: str, channel: str) -> bool:
        """Remove a member; return True if the group is now empty (and forgotten)."""
        members = self._groups.get(group)
        if members is None:
            return False
        members.pop(channel, None)
        if not members:
            del self._groups[group]
            return True
        return False

    def members(self, group: str) -> list[str]:
        """Current members of ``group``; members older than the expiry are dropped first."""
        members = self._groups.get(group)
        if members is None:
            return []
        cutoff = time.monotonic() - self._expiry
        # Members are ordered by join time, so the expired ones are at the front.
        stale = []
        for channel, joined in members.items():
            if joined > cutoff:
                break
            stale.append(channel)
        for channel in stale:
            del members[channel]
        if not members:
            del self._groups[group]
            return []
        return list(members)

    def groups(self) -> list[str]:
        """Names of the groups with at least one member."""
        return list(self._groups)

    def clear(self) -> None:
        """Forget every group."""
        self._groups.clear()

    def __contains__(self, group: object) -> bool:
        return group in self._groups
