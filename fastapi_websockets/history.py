"""Group history: the last messages of a group, kept in the broker, and exact recovery.

A group whose name matches a pattern of the ``history`` option keeps its last
``size`` messages for ``ttl`` seconds. Each message sent to it gets a
:class:`StreamPosition` (an offset, strictly increasing per group, and the
epoch of the history's current life) which every member receives under the
reserved key ``"_position"``. A client that lost its connection comes back
with the last position it saw, and ``group_add(group, channel, since=...)``
or ``group_history(group, since=...)`` gives it exactly what it missed, or
says (``recovered=False``) that it cannot.

This module holds the types, the option parsing and the in-process store
used by the in-memory backend; each broker backend stores history in its
broker (see the backend pages in docs/backends/).
"""

from __future__ import annotations

import fnmatch
import re
import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fastapi_websockets.backends.options import positive
from fastapi_websockets.exceptions import InvalidChannelLayerConfig
from fastapi_websockets.types import Message

__all__ = [
    "DEFAULT_HISTORY_TTL",
    "POSITION_KEY",
    "History",
    "HistoryPolicy",
    "HistorySlice",
    "LocalHistory",
    "StreamPosition",
    "new_epoch",
    "parse_history_option",
]

#: The reserved message key that carries a message's position.
POSITION_KEY = "_position"
#: Seconds a message is kept when the ``history`` option gives only a size.
DEFAULT_HISTORY_TTL = 600.0


class StreamPosition(NamedTuple):
    """Where a message sits in its group's history: ``(offset, epoch)``.

    ``StreamPosition(**message["_position"])`` rebuilds one from a received message.
    """

    offset: int
    epoch: str

    def as_dict(self) -> dict[str, Any]:
        """The form carried in messages under ``"_position"``."""
        return {"offset": self.offset, "epoch": self.epoch}


@dataclass(frozen=True)
class History:
    """One page of a group's history, as returned by ``group_history`` and ``group_add(..., since=)``.

    * ``messages``: oldest first, each with its ``"_position"``;
    * ``position``: the position of the newest message of the group (offset 0
      when it has none yet);
    * ``recovered``: True when ``messages`` is exactly everything sent after
      the requested position (same epoch, nothing trimmed, at most ``limit``).
    """

    messages: list[Message]
    position: StreamPosition
    recovered: bool


@dataclass(frozen=True)
class HistoryPolicy:
    """How much history a group keeps: the last ``size`` messages, each for ``ttl`` seconds."""

    size: int
    ttl: float


@dataclass(frozen=True)
class HistorySlice:
    """What a backend read from its store, before the layer decodes and judges it.

    ``entries`` are ``(offset, data)``, oldest first: the newest ones with an
    offset above the requested one, at most the requested count. ``complete``
    is False when messages above the requested offset were trimmed (by size or
    ttl) and are not in the store any more.
    """

    entries: list[tuple[int, bytes]]
    newest: int
    epoch: str
    complete: bool


def new_epoch() -> str:
    """A fresh epoch: names one life of a group's history."""
    return secrets.token_hex(6)


def parse_history_option(value: object) -> list[tuple[re.Pattern[str], HistoryPolicy]]:
    """Validate the ``history`` option: ``{group glob: size | {"size": n, "ttl": seconds}}``."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise InvalidChannelLayerConfig(
            'history must be a mapping of group glob to a size or {"size": n, "ttl": seconds}, '
            f"got {type(value).__name__}"
        )
    parsed = []
    for pattern, spec in value.items():
        where = f"history[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern:
            raise InvalidChannelLayerConfig(f"history keys must be group name globs, got {pattern!r}")
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"size", "ttl"}
            if unknown:
                raise InvalidChannelLayerConfig(
                    f"{where} has unknown key(s) {sorted(unknown)}; use size and ttl"
                )
            size, ttl = spec.get("size"), spec.get("ttl", DEFAULT_HISTORY_TTL)
        else:
            size, ttl = spec, DEFAULT_HISTORY_TTL
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidChannelLayerConfig(f"{where} size must be a positive integer, got {size!r}")
        seconds = positive(f"{where} ttl", ttl, "seconds")  # NaN and infinity were accepted
        parsed.append((re.compile(fnmatch.translate(pattern)), HistoryPolicy(size, seconds)))
    return parsed


@dataclass
class _Stream:
    epoch: str
    newest: int = 0
    #: (offset, expires at, data), oldest first.
    entries: deque[tuple[int, float, bytes]] = field(default_factory=deque)
    #: Highest offset dropped by size or ttl.
    trimmed: int = 0
    last_append: float = 0.0


class LocalHistory:
    """History kept in this process (the in-memory backend's store)."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}

    def append(self, group: str, data: bytes, policy: HistoryPolicy) -> StreamPosition:
        """Store ``data`` as the group's next message; return its position."""
        now = time.monotonic()
        stream = self._live_stream(group, policy, now)
        if stream is None:
            stream = self._streams[group] = _Stream(new_epoch())
        stream.newest += 1
        stream.last_append = now
        stream.entries.append((stream.newest, now + policy.ttl, data))
        while len(stream.entries) > policy.size:
            stream.trimmed = stream.entries.popleft()[0]
        return StreamPosition(stream.newest, stream.epoch)

    def read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        """The newest ``limit`` entries with an offset above ``after``."""
        now = time.monotonic()
        stream = self._live_stream(group, policy, now)
        if stream is None:
            stream = self._streams[group] = _Stream(new_epoch(), last_append=now)
        newer = [(offset, data) for offset, _, data in stream.entries if offset > after]
        return HistorySlice(newer[-limit:], stream.newest, stream.epoch, complete=stream.trimmed <= after)

    def clear(self) -> None:
        """Forget every group's history."""
        self._streams.clear()

    def _live_stream(self, group: str, policy: HistoryPolicy, now: float) -> _Stream | None:
        stream = self._streams.get(group)
        if stream is None:
            return None
        while stream.entries and stream.entries[0][1] <= now:
            stream.trimmed = stream.entries.popleft()[0]
        if not stream.entries and now - stream.last_append > policy.ttl:
            # Idle for a whole ttl with nothing left: this life of the history is over.
            del self._streams[group]
            return None
        return stream
