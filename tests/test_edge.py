"""Origin patterns, the token bucket and consumer edge settings, checked without a server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import pytest

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    AsyncWebSocketConsumer,
    InvalidChannelLayerConfig,
    config,
)
from fastapi_websockets.config import consumer_settings_from_env
from fastapi_websockets.edge import FrameGuard, OriginPolicy, TokenBucket, resolve_limits

SAME_ORIGIN = [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
    ("http://LOCALHOST:8000", "localhost:8000", True),
    ("https://app.example.com", "app.example.com", True),  # TLS ended at a proxy: Host has no port
    ("http://app.example.com", "app.example.com", True),
    ("https://app.example.com", "app.example.com:443", True),
    ("https://app.example.com:8443", "app.example.com:8443", True),
    ("http://127.0.0.1:8001", "127.0.0.1:8000", False),
    ("http://127.0.0.1", "127.0.0.1:8000", False),
    ("http://app.example.com:8080", "app.example.com", False),
    ("https://evil.example", "app.example.com", False),
    ("https://app.example.com.evil.net", "app.example.com", False),
    ("http://[::1]:8000", "[::1]:8000", True),
    ("null", "app.example.com", False),
    ("not a url", "app.example.com", False),
    ("http://app.example.com:99999", "app.example.com", False),
    ("http://app.example.com", None, False),
]


@pytest.mark.parametrize(("origin", "host", "allowed"), SAME_ORIGIN)
def test_default_policy_allows_only_the_same_origin(origin: str, host: str | None, allowed: bool) -> None:
    assert OriginPolicy(None).allows(origin, host) is allowed


PATTERNS = ["https://app.example.com", "https://*.example.com", "http://localhost:3000", "partner.org"]
LISTED = [
    ("https://app.example.com", True),
    ("https://app.example.com:443", True),
    ("https://chat.example.com", True),
    ("https://a.b.example.com", False),  # * is one level
    ("https://example.com", False),
    ("https://example.com.evil.net", False),
    ("https://chat.example.com.evil.net", False),
    ("https://evilexample.com", False),
    ("http://chat.example.com", False),  # another scheme
    ("https://chat.example.com:8443", False),  # another port
    ("http://localhost:3000", True),
    ("http://localhost:3001", False),
    ("https://partner.org", True),  # no scheme in the pattern: any scheme and port
    ("http://partner.org:8080", True),
    ("https://www.partner.org", False),
    ("http://127.0.0.1:8000", False),  # a list replaces the same-origin default
]


@pytest.mark.parametrize(("origin", "allowed"), LISTED)
def test_listed_patterns(origin: str, allowed: bool) -> None:
    assert OriginPolicy(PATTERNS).allows(origin, "127.0.0.1:8000") is allowed


def test_star_allows_anything() -> None:
    policy = OriginPolicy(["*"])
    assert policy.allows("https://evil.example", "app.example.com")
    assert policy.allows("null", None)


@pytest.mark.parametrize(
    "pattern", ["https://*", "https://a.*.example.com", "*.*.com", "https://x.com/path", ""]
)
def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match="is not an origin pattern"):
        OriginPolicy([pattern], where="Chat.allowed_origins")


def test_token_bucket_allows_bursts_of_two_seconds_then_the_rate() -> None:
    now = [100.0]
    bucket = TokenBucket(rate=10, burst=20, clock=lambda: now[0])
    assert all(bucket.take() for _ in range(20))
    assert not bucket.take()
    now[0] += 0.5  # five tokens back
    assert sum(bucket.take() for _ in range(10)) == 5
    now[0] += 60  # never more than the burst
    assert sum(bucket.take() for _ in range(100)) == 20


def test_frame_guard_measures_text_in_utf8_bytes() -> None:
    guard = FrameGuard(max_frame_bytes=10, max_frames_per_second=None)
    assert guard.check({"type": "websocket.receive", "text": "é" * 5}) is None  # 10 bytes
    violation = guard.check({"type": "websocket.receive", "text": "é" * 6})  # 12 bytes, 6 characters
    assert violation is not None
    assert violation.code == 1009
    assert "12-byte" in violation.detail
    over = guard.check({"type": "websocket.receive", "bytes": b"x" * 11})
    assert over is not None
    assert over.code == 1009
    assert guard.check({"type": "websocket.receive", "bytes": b"x" * 10}) is None


def test_frame_guard_rate() -> None:
    guard = FrameGuard(max_frame_bytes=100, max_frames_per_second=5)
    results = [guard.check({"type": "websocket.receive", "text": "x"}) for _ in range(50)]
    first = next(i for i, result in enumerate(results) if result is not None)
    assert first >= 10  # a burst of 2 s worth always passes
    violation = results[first]
    assert violation is not None
    assert violation.code == 1008


def test_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert consumer_settings_from_env({}) == {}
    env = {
        "FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS": "https://a.example.com, https://*.example.org",
        "FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES": "4096",
        "FASTAPI_WEBSOCKETS_MAX_FRAMES_PER_SECOND": "12.5",
    }
    assert consumer_settings_from_env(env) == {
        "allowed_origins": ["https://a.example.com", "https://*.example.org"],
        "max_frame_bytes": 4096,
        "max_frames_per_second": 12.5,
    }
    assert consumer_settings_from_env(
        {"FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS": "", "FASTAPI_WEBSOCKETS_MAX_FRAMES_PER_SECOND": ""}
    ) == {"allowed_origins": None, "max_frames_per_second": None}


@pytest.mark.parametrize(
    ("var", "value", "match"),
    [
        ("FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES", "1MB", "='1MB' is not valid: expected an integer"),
        ("FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES", "0", "MAX_FRAME_BYTES='0' must be positive"),
        ("FASTAPI_WEBSOCKETS_MAX_FRAMES_PER_SECOND", "fast", "expected a number"),
        ("FASTAPI_WEBSOCKETS_MAX_FRAMES_PER_SECOND", "-1", "must be positive"),
        ("FASTAPI_WEBSOCKETS_MAX_FRAMES_PER_SECOND", "nan", "must be positive"),
        (
            "FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS",
            "https://*",
            "FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS: 'https://\\*'",
        ),
    ],
)
def test_bad_env_values_name_the_variable(var: str, value: str, match: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=match):
        resolve_limits(AsyncWebSocketConsumer, AsyncWebSocketConsumer, {var: value})


class Strict(AsyncJsonWebSocketConsumer):
    allowed_origins: ClassVar[list[str] | None] = ["https://app.example.com"]
    max_frame_bytes = 2048


class StrictChild(Strict):
    max_frames_per_second = 3


def test_class_attributes_win_over_env_and_env_over_defaults() -> None:
    env = {
        "FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS": "*",
        "FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES": "100",
        "FASTAPI_WEBSOCKETS_MAX_FRAMES_PER_SECOND": "7",
    }
    defaults = resolve_limits(AsyncJsonWebSocketConsumer, AsyncWebSocketConsumer, {})
    assert defaults.origins.allowed_origins is None
    assert (defaults.max_frame_bytes, defaults.max_frames_per_second, defaults.require_origin) == (
        1_048_576,
        None,
        False,
    )
    from_env = resolve_limits(AsyncJsonWebSocketConsumer, AsyncWebSocketConsumer, env)
    assert from_env.origins.allow_any
    assert (from_env.max_frame_bytes, from_env.max_frames_per_second) == (100, 7)
    child = resolve_limits(StrictChild, AsyncWebSocketConsumer, env)
    assert child.origins.allowed_origins == ("https://app.example.com",)
    assert (child.max_frame_bytes, child.max_frames_per_second) == (2048, 3)


def test_wrong_class_attributes_fail_when_mounted() -> None:
    class Sloppy(AsyncWebSocketConsumer):
        max_frame_bytes = "1MB"  # type: ignore[assignment]

    with pytest.raises(InvalidChannelLayerConfig, match=r"Sloppy\.max_frame_bytes must be an integer"):
        Sloppy.as_endpoint()

    class NotBool(AsyncWebSocketConsumer):
        require_origin = "yes"  # type: ignore[assignment]

    with pytest.raises(InvalidChannelLayerConfig, match=r"NotBool\.require_origin must be True or False"):
        NotBool.as_endpoint()

    class BadPattern(AsyncWebSocketConsumer):
        allowed_origins = ("https://*.*.example.com",)

    with pytest.raises(InvalidChannelLayerConfig, match=r"BadPattern\.allowed_origins"):
        BadPattern.as_endpoint()


def test_env_sample_consumer_lines_keep_the_defaults() -> None:
    sample = Path(__file__).parents[1] / ".env.sample"
    env = dict(
        line.partition("=")[::2]
        for line in sample.read_text().splitlines()
        if line.startswith("FASTAPI_WEBSOCKETS_")
    )
    assert "FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS" in env
    limits = resolve_limits(AsyncWebSocketConsumer, AsyncWebSocketConsumer, env)
    assert limits.origins.allowed_origins is None
    assert (limits.max_frame_bytes, limits.max_frames_per_second) == (1_048_576, None)


def test_settings_follow_changed_attributes_and_unhashable_values_are_reported() -> None:
    class Changing(AsyncWebSocketConsumer):
        allowed_origins: ClassVar[list[str] | None] = ["https://a.example.com"]

    assert Changing.edge_limits().origins.allowed_origins == ("https://a.example.com",)
    origins = Changing.allowed_origins
    assert origins is not None
    origins.append("https://b.example.com")  # mutated in place: not a stale cache
    assert Changing.edge_limits().origins.allowed_origins == (
        "https://a.example.com",
        "https://b.example.com",
    )
    Changing.allowed_origins = [["https://c.example.com"]]  # type: ignore[list-item]
    with pytest.raises(InvalidChannelLayerConfig, match=r"Changing\.allowed_origins must be a list"):
        Changing.edge_limits()


def test_a_misspelled_variable_is_logged_when_a_consumer_is_mounted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # It was ignored: the frame limit stayed at its default without a word.
    config._warned.clear()
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_MAX_FRAME_BYTE", "4096")
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets.config"):
        AsyncWebSocketConsumer.as_endpoint()
    assert (
        "environment variable FASTAPI_WEBSOCKETS_MAX_FRAME_BYTE is set but no setting reads it; "
        "did you mean FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES?"
    ) in caplog.messages
