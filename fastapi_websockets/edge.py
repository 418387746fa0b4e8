"""The WebSocket edge: which pages may open a socket, and how much a client may send.

Browsers send a page's cookies with every WebSocket handshake, whatever site the
page came from, so a consumer that trusts cookies must check the ``Origin``
header (cross-site WebSocket hijacking). This module decides; it does no I/O and
no logging. The consumer asks :meth:`EdgeLimits.refusal` before it creates a
channel or runs ``connect()``, and a per-connection :class:`FrameGuard` about
each client frame before the frame is decoded or dispatched, then closes and
logs itself.

Origin patterns:

- ``None`` (the default): the Origin's host and port must equal the ``Host``
  header's (a ``Host`` without a port matches the Origin scheme's default port,
  since TLS often ends at a proxy in front of the app).
- ``"https://app.example.com"``: that scheme, host and port (default ports implied).
- ``"https://*.example.com"``: any one subdomain level (``a.example.com``, not
  ``example.com`` nor ``a.b.example.com``).
- ``"app.example.com"`` / ``"*.example.com[:port]"``: the host with any scheme, and
  the port if one is given.
- ``"*"``: any origin (the 0.1.0 behaviour).

A handshake without an ``Origin`` header (a non-browser client) is allowed
unless ``require_origin`` is set; several ``Origin`` headers are refused.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from fastapi_websockets.config import (
    CONSUMER_SETTINGS,
    DEFAULT_ENV_PREFIX,
    check_consumer_setting,
    consumer_settings_from_env,
)
from fastapi_websockets.exceptions import InvalidChannelLayerConfig

__all__ = [
    "BURST_SECONDS",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION",
    "EdgeLimits",
    "FrameGuard",
    "OriginPolicy",
    "TokenBucket",
    "Violation",
    "resolve_limits",
]

#: Close codes (RFC 6455 section 7.4.1).
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
#: A rate-limited client may send this many seconds' worth of frames at once.
BURST_SECONDS = 2.0
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_MAX_LOGGED_ORIGIN = 200


# ------------------------------------------------------------------ origins


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int | None


def _split(text: str) -> SplitResult | None:
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        return None
    return parts


def _parse_origin(text: str) -> _Origin | None:
    parts = _split(text)
    if parts is None or not parts.scheme or not parts.hostname:
        return None  # includes "null", sent by sandboxed frames and file:// pages
    scheme = parts.scheme.lower()
    port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(scheme)
    return _Origin(scheme, parts.hostname.rstrip("."), port)


def _parse_host(header: str) -> tuple[str, int | None] | None:
    parts = _split("//" + header)
    if parts is None or not parts.hostname:
        return None
    return parts.hostname.rstrip("."), parts.port


@dataclass(frozen=True)
class _Pattern:
    scheme: str | None  # None: any scheme
    host: str  # for a wildcard pattern, the part after "*."
    wildcard: bool
    port: int | None  # None: any port (only for a pattern without a scheme)

    def matches(self, origin: _Origin) -> bool:
        if self.scheme is not None and self.scheme != origin.scheme:
            return False
        if self.port is not None and self.port != origin.port:
            return False
        if not self.wildcard:
            return origin.host == self.host
        label, _, parent = origin.host.partition(".")
        return bool(label) and parent == self.host


def _parse_pattern(pattern: str, where: str) -> _Pattern:
    text = pattern.strip().lower()
    has_scheme = "://" in text
    parts = _split(text if has_scheme else "//" + text)
    host = parts.hostname.rstrip(".") if parts is not None and parts.hostname else ""
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if parts is None or not host or "*" in host or (has_scheme and not parts.scheme):
        raise InvalidChannelLayerConfig(
            f"{where}: {pattern!r} is not an origin pattern; use 'https://app.example.com', "
            "'https://*.example.com' (one subdomain level), 'app.example.com' (any scheme) or '*'"
        )
    scheme = parts.scheme or None
    port = parts.port
    if port is None and scheme is not None:
        port = _DEFAULT_PORTS.get(scheme)
    return _Pattern(scheme, host, wildcard, port)


class OriginPolicy:
    """Which page origins may open a WebSocket (see the module docstring for the patterns).

    ``None`` allows only the origin whose host and port equal the ``Host``
    header's; a list allows the origins its patterns match (and only those);
    ``["*"]`` allows any. Patterns are checked here: a malformed one raises
    :class:`InvalidChannelLayerConfig` naming ``where`` it came from.
    """

    def __init__(self, allowed_origins: Sequence[str] | None, *, where: str = "allowed_origins") -> None:
        self.allowed_origins = None if allowed_origins is None else tuple(allowed_origins)
        self.allow_any = self.allowed_origins is not None and "*" in self.allowed_origins
        self._patterns = tuple(
            _parse_pattern(pattern, where) for pattern in self.allowed_origins or () if pattern != "*"
        )

    def allows(self, origin: str, host: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header (and ``Host`` header) may proceed."""
        if self.allow_any:
            return True
        parsed = _parse_origin(origin)
        if parsed is None:
            return False
        if self.allowed_origins is not None:
            return any(pattern.matches(parsed) for pattern in self._patterns)
        target = _parse_host(host) if host else None
        if target is None:
            return False
        target_host, target_port = target
        if parsed.host != target_host:
            return False
        if target_port is None:
            return parsed.port == _DEFAULT_PORTS.get(parsed.scheme)
        return parsed.port == target_port

    def describe(self) -> str:
        """The policy in words, for log lines."""
        if self.allowed_origins is None:
            return "only the same origin as the Host header"
        return f"allowed_origins={list(self.allowed_origins)!r}"


# ------------------------------------------------------------------ frames


class TokenBucket:
    """A token bucket: ``rate`` events per second on average, bursts of up to ``burst``.

    It starts full, so a client that just connected may send a burst at once.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def take(self) -> bool:
        """Spend one token if there is one; False means the caller is over its rate."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class Violation:
    """A client frame broke a limit: the close ``code``, a short close ``reason``, a log ``detail``."""

    code: int
    reason: str
    detail: str


def _frame_size_over(frame: Mapping[str, Any], limit: int) -> int | None:
    data = frame.get("bytes")
    if data is not None:
        return len(data) if len(data) > limit else None
    text = frame.get("text")
    if text is None:
        return None
    # A character takes 1 to 4 UTF-8 bytes: encode only when the count alone cannot tell.
    if len(text) * 4 <= limit:
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > limit else None


class FrameGuard:
    """One connection's frame limits: checks each ASGI ``websocket.receive`` message in turn.

    The size is that of the text (in UTF-8 bytes) or bytes the server already
    read; the check runs before the frame is decoded or dispatched, so an
    oversized JSON frame is never parsed. Bounding what the server reads at all
    is the server's setting (uvicorn ``--ws-max-size``, 16 MiB by default).
    """

    def __init__(
        self,
        max_frame_bytes: int,
        max_frames_per_second: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_frames_per_second = max_frames_per_second
        self._bucket = (
            None
            if max_frames_per_second is None
            else TokenBucket(max_frames_per_second, max(1.0, max_frames_per_second * BURST_SECONDS), clock)
        )

    def check(self, frame: Mapping[str, Any]) -> Violation | None:
        """The limit this frame breaks, or None if it may be dispatched."""
        size = _frame_size_over(frame, self.max_frame_bytes)
        if size is not None:
            return Violation(
                CLOSE_MESSAGE_TOO_BIG,
                "frame too large",
                f"a {size}-byte frame is over max_frame_bytes={self.max_frame_bytes}",
            )
        if self._bucket is not None and not self._bucket.take():
            return Violation(
                CLOSE_POLICY_VIOLATION,
                "too many frames",
                f"more than max_frames_per_second={self.max_frames_per_second:g} "
                f"(bursts of {self._bucket.burst:g})",
            )
        return None


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class EdgeLimits:
    """A consumer class's resolved edge settings; see :func:`resolve_limits`."""

    origins: OriginPolicy
    require_origin: bool
    max_frame_bytes: int
    max_frames_per_second: float | None

    def refusal(self, origin_headers: Sequence[str], host: str | None) -> str | None:
        """Why a handshake with these ``Origin`` header values must be refused, or None."""
        if not origin_headers:
            return "no Origin header (require_origin is set)" if self.require_origin else None
        if len(origin_headers) > 1:
            return f"{len(origin_headers)} Origin headers"
        origin = origin_headers[0]
        if self.origins.allows(origin, host):
            return None
        return (
            f"origin {origin[:_MAX_LOGGED_ORIGIN]!r} is not allowed "
            f"(Host {str(host)[:_MAX_LOGGED_ORIGIN]!r}; {self.origins.describe()})"
        )

    def frame_guard(self) -> FrameGuard:
        """A new guard for one connection (the rate is counted per connection)."""
        return FrameGuard(self.max_frame_bytes, self.max_frames_per_second)


def resolve_limits(consumer: type, defaults: type, environ: Mapping[str, str] | None = None) -> EdgeLimits:
    """The edge settings of ``consumer``: its own class attributes, else the environment, else the defaults.

    ``defaults`` is the class that holds the default values
    (``AsyncWebSocketConsumer``); an attribute that ``consumer`` or a class
    between them sets wins over the ``FASTAPI_WEBSOCKETS_*`` environment
    variable. Every value is checked; a wrong one raises
    :class:`InvalidChannelLayerConfig` naming the attribute or variable.
    Results are cached by the values themselves, so a changed variable or
    class attribute applies to the next call.
    """
    env = os.environ if environ is None else environ
    env_texts = tuple((var, env.get(var)) for var in _ENV_VARS)
    sources: list[tuple[str, str | None, Any]] = []
    for name in _SETTING_NAMES:
        owner = next(klass for klass in consumer.__mro__ if name in klass.__dict__)
        value = owner.__dict__[name]
        if isinstance(value, list):
            value = tuple(value)  # hashable for the cache; checked as a sequence either way
        sources.append((name, None if owner is defaults else f"{owner.__qualname__}.{name}", value))
    try:
        return _resolve(env_texts, tuple(sources))
    except TypeError:  # an unhashable value: resolve uncached, which reports what is wrong with it
        return _resolve.__wrapped__(env_texts, tuple(sources))


_SETTING_NAMES = (*CONSUMER_SETTINGS, "require_origin")
_ENV_VARS = tuple(f"{DEFAULT_ENV_PREFIX}{name.upper()}" for name in CONSUMER_SETTINGS)


@functools.lru_cache(maxsize=256)
def _resolve(
    env_texts: tuple[tuple[str, str | None], ...], sources: tuple[tuple[str, str | None, Any], ...]
) -> EdgeLimits:
    # Checking and parsing costs tens of microseconds; a handshake should not pay it each time.
    from_env = consumer_settings_from_env({var: text for var, text in env_texts if text is not None})
    values: dict[str, Any] = {}
    origins_where = f"{DEFAULT_ENV_PREFIX}ALLOWED_ORIGINS"
    for name, set_by, value in sources:
        if set_by is None and name in from_env:
            values[name] = from_env[name]
            continue
        where = set_by or f"the default {name}"
        if name == "allowed_origins":
            origins_where = where
        if name == "require_origin":
            if not isinstance(value, bool):
                raise InvalidChannelLayerConfig(f"{where} must be True or False, got {value!r}")
            values[name] = value
        else:
            values[name] = check_consumer_setting(where, name, value)
    return EdgeLimits(
        origins=OriginPolicy(values["allowed_origins"], where=origins_where),
        require_origin=values["require_origin"],
        max_frame_bytes=values["max_frame_bytes"],
        max_frames_per_second=values["max_frames_per_second"],
    )
