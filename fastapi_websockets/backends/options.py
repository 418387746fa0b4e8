"""Validation of backend options, and the size-capped memo every backend uses.

Each check raises :class:`InvalidChannelLayerConfig` naming the option, what
it accepts and the value it got (a URL with its password redacted), so a
configuration mistake is found when the layer is built, not on first use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Generic, TypeGuard, TypeVar
from urllib.parse import SplitResult, urlsplit

from fastapi_websockets.backends.urls import redact_url
from fastapi_websockets.exceptions import InvalidChannelLayerConfig

__all__ = [
    "MAX_MILLISECONDS",
    "MAX_SECONDS",
    "Memo",
    "flag",
    "matching",
    "optional_positive_int",
    "positive",
    "positive_int",
    "url",
]

K = TypeVar("K")
V = TypeVar("V")


#: The largest value :func:`positive` accepts (ten years in seconds). Every option it checks is
#: a duration that some broker turns into milliseconds or nanoseconds: ten years worked on
#: each broker, 100 years overflowed RabbitMQ's TTL, 1e11 s made Redis lose the message and
#: NATS fail its setup, and infinity overflowed each conversion (measured 2026-12-02).
MAX_SECONDS = 315_360_000
#: The same for options given in milliseconds (RabbitMQ's TTLs: 10**12 ms was "value_too_large").
MAX_MILLISECONDS = MAX_SECONDS * 1000


def positive(name: str, value: object, unit: str = "") -> float:
    """A positive, finite duration of at most :data:`MAX_SECONDS` (``unit`` names it in the error)."""
    # `not 0 < value <= MAX_SECONDS` also refuses NaN.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
        what = f"a positive number of {unit}" if unit else "a positive number"
        raise InvalidChannelLayerConfig(
            f"{name} must be {what} up to {MAX_SECONDS:,} (ten years), got {value!r}"
        )
    return float(value)


def positive_int(name: str, value: object, unit: str = "", most: int | None = None) -> int:
    """A positive integer, at most ``most`` if given (:data:`MAX_MILLISECONDS` for a duration)."""
    if not _is_positive_int(value, most):
        raise InvalidChannelLayerConfig(f"{name} must be {_integer(unit, most)}, got {value!r}")
    return value


def optional_positive_int(name: str, value: object, unit: str = "", most: int | None = None) -> int | None:
    """A positive integer (at most ``most`` if given), or None for "no limit"."""
    if value is None:
        return None
    if not _is_positive_int(value, most):
        raise InvalidChannelLayerConfig(
            f"{name} must be {_integer(unit, most)}, or None (or empty) for no limit; got {value!r}"
        )
    return value


def _is_positive_int(value: object, most: int | None) -> TypeGuard[int]:
    return (
        not isinstance(value, bool)
        and isinstance(value, int)
        and value > 0
        and (most is None or value <= most)
    )


def _integer(unit: str, most: int | None) -> str:
    what = f"a positive integer of {unit}" if unit else "a positive integer"
    return f"{what} up to {most:,}" if most is not None else what


def flag(name: str, value: object) -> bool:
    """A boolean (``true``/``false``; the environment parser already maps ``1``, ``yes``...)."""
    if not isinstance(value, bool):
        raise InvalidChannelLayerConfig(f"{name} must be true or false, got {value!r}")
    return value


def matching(name: str, value: object, pattern: re.Pattern[str], accepted: str) -> str:
    """A string that fully matches ``pattern``; ``accepted`` says what that means, for the error."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidChannelLayerConfig(f"{name} must be {accepted}, got {value!r}")
    return value


def url(name: str, value: object, schemes: Collection[str]) -> SplitResult:
    """A URL with one of ``schemes`` and a numeric port if any; returns it split.

    The error quotes the URL with its password replaced by ``***``.
    """
    accepted = ", ".join(f"{scheme}://" for scheme in schemes)
    if not isinstance(value, str):
        raise InvalidChannelLayerConfig(f"{name} must be a URL ({accepted}), got {type(value).__name__}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidChannelLayerConfig(f"{name} is not a valid URL ({exc}): {redact_url(value)!r}") from None
    if parts.scheme not in schemes:
        raise InvalidChannelLayerConfig(f"{name} must be a {accepted} URL, got {redact_url(value)!r}")
    return parts


class Memo(Generic[K, V]):
    """A dict of computed values that forgets everything once it holds ``size`` entries.

    For memos of pure functions of a name (escaped subjects, capacities,
    declared queues): clearing the whole memo at the cap is cheaper to keep
    than an LRU and bounds memory when names never repeat.
    """

    def __init__(self, compute: Callable[[K], V] | None = None, size: int = 4096) -> None:
        # Without ``compute``, the caller fills it with add() (an async result, say).
        self._compute = compute
        self._size = size
        self._values: dict[K, V] = {}
        #: The remembered values, read-only: a hot path's ``in`` or ``get()`` on it costs no
        #: Python call. The same dict for the memo's whole life (it is only cleared in place).
        self.known: Mapping[K, V] = self._values

    def __call__(self, key: K) -> V:
        """The value for ``key``, computed on first use."""
        try:
            return self._values[key]
        except KeyError:
            if self._compute is None:
                raise
        value = self._compute(key)
        if len(self._values) >= self._size:
            self._values.clear()
        self._values[key] = value
        return value

    def get(self, key: K) -> V | None:
        """The value remembered for ``key``, or None (never computes)."""
        return self._values.get(key)

    def values(self) -> list[V]:
        """The values remembered now (a copy)."""
        return list(self._values.values())

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def add(self, key: K, value: V) -> None:
        """Remember ``value`` for ``key`` (for memos filled by the caller, e.g. "declared")."""
        if len(self._values) >= self._size:
            self._values.clear()
        self._values[key] = value

    def discard(self, key: K) -> None:
        """Forget ``key``."""
        self._values.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)
