"""Configuration from mappings and environment variables."""

from __future__ import annotations

import importlib
import logging
import math
import subprocess
import sys
from typing import Any

import pytest

from fastapi_websockets import (
    BackendSettings,
    InMemoryChannelLayer,
    InvalidChannelLayerConfig,
    NATSChannelLayer,
    PostgreSQLChannelLayer,
    RabbitMQChannelLayer,
    RedisChannelLayer,
    build_channel_layer,
    config,
    get_channel_layer,
    get_channel_layer_from_env,
    load_backend_class,
    parse_channel_layers,
    parse_channel_layers_from_env,
)
from fastapi_websockets.config import BACKEND_ALIASES, backend_options

SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    "redis": {
        "url": "redis://localhost:6379/0",
        "prefix": "fastapi-websockets",
        "cluster": False,
        "channel_expiry": 60,
        "group_expiry": 86400,
        "use_pubsub": True,
        "sharded_pubsub": True,
    },
    "postgresql": {
        "dsn": "postgresql://postgres:postgres@localhost:5432/postgres",
        "schema": "fastapi_websockets",
        "channel_expiry": 60,
        "group_expiry": 86400,
        "poll_interval": 0.1,
        "prune_interval": 60.0,
        "ensure_schema": True,
    },
    "nats": {
        "servers": ["nats://localhost:4222"],
        "prefix": "fastapi-websockets",
        "group_bucket": "fastapi_websockets_groups",
        "stream_name": "FASTAPI_WEBSOCKETS",
        "message_timeout": 60.0,
    },
    "rabbitmq": {
        "url": "amqp://guest:guest@localhost:5672//",
        "exchange_name": "fastapi_websockets",
        "queue_prefix": "fastapi-websockets",
        "durable": True,
        "message_ttl": 60000,
        "queue_expiry": 300000,
        "poll_interval": 0.1,
    },
    "inmemory": {"capacity": 100},
}


def test_default_is_in_memory() -> None:
    assert parse_channel_layers(None) == {"default": BackendSettings()}
    assert isinstance(get_channel_layer(), InMemoryChannelLayer)
    assert isinstance(get_channel_layer_from_env({}), InMemoryChannelLayer)


@pytest.mark.parametrize("name", sorted(BACKEND_ALIASES))
def test_short_names_and_dotted_paths_load_the_same_class(name: str) -> None:
    assert load_backend_class(name) is load_backend_class(BACKEND_ALIASES[name])


def test_dotted_paths_of_the_spec() -> None:
    assert load_backend_class("fastapi_websockets.backends.redis.RedisChannelLayer") is RedisChannelLayer
    assert (
        load_backend_class("fastapi_websockets.backends.postgresql.PostgreSQLChannelLayer")
        is PostgreSQLChannelLayer
    )
    assert load_backend_class("fastapi_websockets.backends.nats.NATSChannelLayer") is NATSChannelLayer
    assert (
        load_backend_class("fastapi_websockets.backends.rabbitmq.RabbitMQChannelLayer")
        is RabbitMQChannelLayer
    )


@pytest.mark.parametrize("backend_name", sorted(SPEC_DEFAULTS))
def test_spec_defaults(backend_name: str) -> None:
    options = backend_options(load_backend_class(backend_name))
    for key, default in SPEC_DEFAULTS[backend_name].items():
        value = options[key].default
        assert (list(value) if isinstance(value, tuple) else value) == default, key


def test_mapping_with_aliases() -> None:
    layers: dict[str, dict[str, Any]] = {
        "default": {"BACKEND": "inmemory", "CONFIG": {"capacity": 5}},
        "events": {"BACKEND": "fastapi_websockets.backends.inmemory.InMemoryChannelLayer"},
    }
    default = get_channel_layer(layers)
    events = get_channel_layer(layers, alias="events")
    assert default.capacity == 5
    assert events.capacity == 100
    with pytest.raises(InvalidChannelLayerConfig, match=r"alias 'missing' is not configured.*default"):
        get_channel_layer(layers, alias="missing")


def test_unknown_config_key_lists_valid_ones() -> None:
    with pytest.raises(
        InvalidChannelLayerConfig, match=r"unknown option 'capacityy'.*valid options are.*capacity"
    ):
        get_channel_layer({"default": {"BACKEND": "inmemory", "CONFIG": {"capacityy": 5}}})
    with pytest.raises(InvalidChannelLayerConfig, match=r"unknown option 'uri'.*url"):
        get_channel_layer({"default": {"BACKEND": "redis", "CONFIG": {"uri": "redis://x"}}})


def test_unknown_top_level_key() -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=r"unknown key.*OPTIONS.*BACKEND, CONFIG"):
        parse_channel_layers({"default": {"BACKEND": "inmemory", "OPTIONS": {}}})


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"capacity": "10"}, r"\['capacity'\] must be an integer, got str '10'"),
        ({"capacity": True}, r"must be an integer, got bool"),
        ({"capacity": 0}, r"capacity must be a positive integer, got 0"),
        (
            {"channel_expiry": -5},
            r"channel_expiry must be a positive number up to 315,360,000 \(ten years\), got -5",
        ),
        ({"channel_capacity": ["x"]}, r"must be a mapping"),
        ({"channel_capacity": {"a*": 0}}, r"channel_capacity\['a\*'\] must be a positive integer"),
    ],
)
def test_wrong_values_name_key_value_and_accepted(config: dict[str, object], pattern: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=pattern):
        get_channel_layer({"default": {"BACKEND": "inmemory", "CONFIG": config}})


def test_bad_backend_names() -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=r"unknown BACKEND 'kafka'.*inmemory"):
        load_backend_class("kafka")
    with pytest.raises(InvalidChannelLayerConfig, match="cannot import backend module"):
        load_backend_class("no_such_module.Layer")
    with pytest.raises(InvalidChannelLayerConfig, match="must name a BaseChannelLayer subclass"):
        load_backend_class("fastapi_websockets.config.BackendSettings")


def test_build_channel_layer_forms() -> None:
    assert isinstance(build_channel_layer("inmemory", {"capacity": 3}), InMemoryChannelLayer)
    assert build_channel_layer(BackendSettings("inmemory", {"capacity": 3})).capacity == 3


# ------------------------------------------------------------------ environment


def test_env_single_alias_with_every_spec_variable() -> None:
    env = {
        "FASTAPI_WEBSOCKETS_BACKEND": "redis",
        "FASTAPI_WEBSOCKETS_REDIS_URL": "redis://127.0.0.1:6380/1",
        "FASTAPI_WEBSOCKETS_REDIS_PREFIX": "app",
        "FASTAPI_WEBSOCKETS_REDIS_CLUSTER": "false",
        "FASTAPI_WEBSOCKETS_REDIS_CHANNEL_EXPIRY": "30",
        "FASTAPI_WEBSOCKETS_REDIS_GROUP_EXPIRY": "600",
        "FASTAPI_WEBSOCKETS_REDIS_USE_PUBSUB": "no",
        "FASTAPI_WEBSOCKETS_REDIS_SHARDED_PUBSUB": "0",
        # Variables of other backends are ignored, so switching BACKEND is one change.
        "FASTAPI_WEBSOCKETS_NATS_SERVERS": "nats://a:4222",
    }
    settings = parse_channel_layers_from_env(env)["default"]
    assert settings.backend == BACKEND_ALIASES["redis"]
    assert settings.config == {
        "url": "redis://127.0.0.1:6380/1",
        "prefix": "app",
        "cluster": False,
        "channel_expiry": 30,
        "group_expiry": 600,
        "use_pubsub": False,
        "sharded_pubsub": False,
    }


def test_env_types_per_backend() -> None:
    nats = parse_channel_layers_from_env(
        {
            "FASTAPI_WEBSOCKETS_BACKEND": "nats",
            "FASTAPI_WEBSOCKETS_NATS_SERVERS": "nats://a:4222, nats://b:4222",
            "FASTAPI_WEBSOCKETS_NATS_MESSAGE_TIMEOUT": "2.5",
        }
    )["default"]
    assert nats.config == {"servers": ["nats://a:4222", "nats://b:4222"], "message_timeout": 2.5}
    rabbit = parse_channel_layers_from_env(
        {
            "FASTAPI_WEBSOCKETS_BACKEND": "rabbitmq",
            "FASTAPI_WEBSOCKETS_RABBITMQ_MESSAGE_TTL": "",
            "FASTAPI_WEBSOCKETS_RABBITMQ_QUEUE_EXPIRY": "1000",
            "FASTAPI_WEBSOCKETS_RABBITMQ_DURABLE": "off",
        }
    )["default"]
    assert rabbit.config == {"message_ttl": None, "queue_expiry": 1000, "durable": False}
    postgres = parse_channel_layers_from_env(
        {
            "FASTAPI_WEBSOCKETS_BACKEND": "fastapi_websockets.backends.postgresql.PostgreSQLChannelLayer",
            "FASTAPI_WEBSOCKETS_POSTGRESQL_ENSURE_SCHEMA": "yes",
            "FASTAPI_WEBSOCKETS_POSTGRESQL_POLL_INTERVAL": "0.5",
        }
    )["default"]
    assert postgres.config == {"ensure_schema": True, "poll_interval": 0.5}
    memory = get_channel_layer_from_env(
        {
            "FASTAPI_WEBSOCKETS_INMEMORY_CAPACITY": "7",
            "FASTAPI_WEBSOCKETS_INMEMORY_CHANNEL_CAPACITY": '{"a*": 2}',
        }
    )
    assert memory.capacity == 7
    assert memory.capacity_for("abc") == 2


def test_env_aliases() -> None:
    env = {
        "FASTAPI_WEBSOCKETS_ALIASES": "default,events",
        "FASTAPI_WEBSOCKETS_DEFAULT_BACKEND": "inmemory",
        "FASTAPI_WEBSOCKETS_DEFAULT_INMEMORY_CAPACITY": "100",
        "FASTAPI_WEBSOCKETS_EVENTS_BACKEND": "postgresql",
        "FASTAPI_WEBSOCKETS_EVENTS_POSTGRESQL_DSN": "postgresql://postgres:postgres@localhost:5432/postgres",
        "FASTAPI_WEBSOCKETS_EVENTS_POSTGRESQL_SCHEMA": "fastapi_websockets_events",
    }
    layers = parse_channel_layers_from_env(env)
    assert set(layers) == {"default", "events"}
    assert layers["default"].config == {"capacity": 100}
    assert layers["events"].backend == BACKEND_ALIASES["postgresql"]
    assert layers["events"].config["schema"] == "fastapi_websockets_events"
    events = get_channel_layer_from_env(env, alias="events")
    assert isinstance(events, PostgreSQLChannelLayer)
    with pytest.raises(
        InvalidChannelLayerConfig,
        match=r"alias 'other' is not listed.*add it there, with its FASTAPI_WEBSOCKETS_OTHER_BACKEND",
    ):
        get_channel_layer_from_env(env, alias="other")


@pytest.mark.parametrize(
    ("env", "pattern"),
    [
        (
            {"FASTAPI_WEBSOCKETS_INMEMORY_CAPACITY": "lots"},
            r"FASTAPI_WEBSOCKETS_INMEMORY_CAPACITY='lots'.*an integer",
        ),
        (
            {"FASTAPI_WEBSOCKETS_BACKEND": "redis", "FASTAPI_WEBSOCKETS_REDIS_CLUSTER": "maybe"},
            r"REDIS_CLUSTER='maybe'.*boolean \(true/false",
        ),
        ({"FASTAPI_WEBSOCKETS_BACKEND": "kafka"}, r"FASTAPI_WEBSOCKETS_BACKEND='kafka'.*inmemory"),
        (
            {"FASTAPI_WEBSOCKETS_BACKEND": "redis", "FASTAPI_WEBSOCKETS_REDIS_URI": "redis://x"},
            r"unknown environment variable FASTAPI_WEBSOCKETS_REDIS_URI.*FASTAPI_WEBSOCKETS_REDIS_URL",
        ),
        ({"FASTAPI_WEBSOCKETS_INMEMORY_CAPACITY": "0"}, r"capacity must be a positive integer, got 0"),
        ({"FASTAPI_WEBSOCKETS_ALIASES": " , "}, r"names no alias"),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], pattern: str) -> None:
    with pytest.raises(InvalidChannelLayerConfig, match=pattern):
        get_channel_layer_from_env(env)


def test_env_sample_parses(caplog: pytest.LogCaptureFixture) -> None:
    from pathlib import Path

    config._warned.clear()

    env: dict[str, str] = {}
    for line in (Path(__file__).parents[1] / ".env.sample").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    assert parse_channel_layers_from_env(env)["default"].backend == BACKEND_ALIASES["inmemory"]
    for backend in ("redis", "postgresql", "nats", "rabbitmq"):
        switched = {**env, "FASTAPI_WEBSOCKETS_BACKEND": backend}
        assert parse_channel_layers_from_env(switched)["default"].backend == BACKEND_ALIASES[backend]
    # Every backend's variables, one picked by BACKEND: nothing is reported as unread.
    assert not [record for record in caplog.records if record.name == "fastapi_websockets.config"]


def test_importing_backends_imports_no_driver() -> None:
    code = (
        "import sys, fastapi_websockets\n"
        "import fastapi_websockets.backends.redis, fastapi_websockets.backends.nats\n"
        "import fastapi_websockets.backends.postgresql, fastapi_websockets.backends.rabbitmq\n"
        "bad = [m for m in ('redis', 'asyncpg', 'nats', 'aio_pika', 'aiormq') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_is_pinned() -> None:
    module = importlib.import_module("fastapi_websockets")
    assert sorted(module.__all__) == sorted(
        [
            "AsyncJsonWebSocketConsumer",
            "AsyncWebSocketConsumer",
            "BackendSettings",
            "BackendUnavailable",
            "BaseChannelLayer",
            "ChannelFull",
            "ChannelLayerClosed",
            "ChannelLayerError",
            "History",
            "InMemoryChannelLayer",
            "InvalidChannelLayerConfig",
            "InvalidChannelName",
            "InvalidMessage",
            "MessageTooLarge",
            "NATSChannelLayer",
            "PostgreSQLChannelLayer",
            "RabbitMQChannelLayer",
            "ReceiveTimeout",
            "RedisChannelLayer",
            "SerializationError",
            "StreamPosition",
            "build_channel_layer",
            "channel_layer_dependency",
            "channel_layers_lifespan",
            "close_default_layers",
            "get_channel_layer",
            "get_channel_layer_from_env",
            "get_default_layer",
            "load_backend_class",
            "parse_channel_layers",
            "parse_channel_layers_from_env",
            "send_bytes_message",
            "send_json_message",
            "set_default_layer",
            "websocket_bytes_message",
            "websocket_json_message",
        ]
    )
    for name in module.__all__:
        assert getattr(module, name).__doc__, f"{name} has no docstring"


def test_settings_and_config_errors_never_show_a_password() -> None:
    from fastapi_websockets.config import parse_channel_layers
    from tests.leaks import SECRET, assert_no_secret

    url = f"redis://user:{SECRET}@cache.example:6379/0"
    settings = parse_channel_layers({"default": {"BACKEND": "redis", "CONFIG": {"url": url}}})
    assert "cache.example" in repr(settings["default"])
    errors = []
    bad: object
    for bad in ({"BACKEND": "redis", "CONFIG": {"url": url, "timeout": "soon"}}, [url]):
        with pytest.raises(InvalidChannelLayerConfig) as caught:
            parse_channel_layers({"default": bad})  # type: ignore[dict-item]
        errors.append(caught.value)
    assert_no_secret(errors=errors, objects=[settings, settings["default"]])


def test_history_option_from_the_environment() -> None:
    from fastapi_websockets.config import parse_channel_layers_from_env

    env = {
        "FASTAPI_WEBSOCKETS_BACKEND": "inmemory",
        "FASTAPI_WEBSOCKETS_INMEMORY_HISTORY": '{"room:*": {"size": 100, "ttl": 60}, "feed:*": 20}',
    }
    settings = parse_channel_layers_from_env(env)["default"]
    assert settings.config["history"] == {"room:*": {"size": 100, "ttl": 60}, "feed:*": 20}
    layer = build_channel_layer(settings)
    policy = layer.history_policy("room:1")
    assert policy is not None
    assert (policy.size, policy.ttl) == (100, 60)
    feed = layer.history_policy("feed:x")
    assert feed is not None
    assert feed.size == 20
    assert layer.history_policy("lobby") is None


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([1], "mapping"),
        ({"room:*": 0}, "size must be a positive integer"),
        ({"room:*": {"size": 5, "ttl": -1}}, "ttl must be a positive number"),
        ({"room:*": {"size": 5, "ttl": float("nan")}}, r"history\['room:\*'\] ttl must be a positive number"),
        ({"room:*": {"size": 5, "ttl": float("inf")}}, "ttl must be a positive number of seconds up to"),
        ({"room:*": {"size": 5, "keep": 1}}, "unknown key"),
    ],
)
def test_bad_history_option_is_refused(history: object, message: str) -> None:
    from fastapi_websockets import InMemoryChannelLayer

    with pytest.raises(InvalidChannelLayerConfig, match=message):
        InMemoryChannelLayer(history=history)


@pytest.mark.parametrize("alias", sorted(BACKEND_ALIASES))
@pytest.mark.parametrize("option", ["channel_expiry", "group_expiry", "presence_timeout"])
@pytest.mark.parametrize("value", [math.inf, math.nan, 1e11, 315_360_001])
def test_durations_past_ten_years_are_refused_on_every_backend(alias: str, option: str, value: float) -> None:
    # Infinity overflowed each backend's conversion (on Redis at construction, elsewhere at first
    # use, as a DatetimeFieldOverflowError, an OverflowError or a "RabbitMQ is unreachable"); 1e11 s
    # lost Redis's messages and failed NATS's setup. Ten years works on every broker.
    with pytest.raises(
        InvalidChannelLayerConfig, match=rf"{option} must be a positive number.* up to 315,360,000"
    ):
        build_channel_layer(alias, {option: value})


def test_an_environment_duration_of_inf_is_refused() -> None:
    env = {"FASTAPI_WEBSOCKETS_BACKEND": "redis", "FASTAPI_WEBSOCKETS_REDIS_CHANNEL_EXPIRY": "inf"}
    with pytest.raises(InvalidChannelLayerConfig, match="channel_expiry must be a positive number"):
        get_channel_layer_from_env(env)


@pytest.mark.parametrize("value", [5, None, InMemoryChannelLayer])
def test_a_backend_that_is_not_a_string_is_refused_clearly(value: object) -> None:
    # It raised AttributeError: '...' object has no attribute 'strip'.
    with pytest.raises(InvalidChannelLayerConfig, match=r"BACKEND must be one of .* or a dotted path"):
        get_channel_layer({"default": {"BACKEND": value}})


@pytest.mark.parametrize(
    ("env", "warning"),
    [
        (
            {"FASTAPI_WEBSOCKETS_REDIS_URL": "redis://cache:6379/0"},
            "FASTAPI_WEBSOCKETS_REDIS_URL set but FASTAPI_WEBSOCKETS_BACKEND is not, so the layer is "
            "in-memory (each process on its own) and ignores them; set FASTAPI_WEBSOCKETS_BACKEND=redis",
        ),
        (
            {"FASTAPI_WEBSOCKETS_BACKEND": "redis", "FASTAPI_WEBSOCKETS_CAPACITY": "5"},
            "FASTAPI_WEBSOCKETS_CAPACITY is set but no setting reads it; "
            "did you mean FASTAPI_WEBSOCKETS_REDIS_CAPACITY?",
        ),
        (
            {"FASTAPI_WEBSOCKETS_MAX_FRAME_BYTE": "4096"},
            "did you mean FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES?",
        ),
        (
            {"FASTAPI_WEBSOCKETS_EVENTS_BACKEND": "redis"},
            "an alias's variables are read only when FASTAPI_WEBSOCKETS_ALIASES names the alias",
        ),
        (
            {"FASTAPI_WEBSOCKETS_ALIASES": "default,events", "FASTAPI_WEBSOCKETS_EVNTS_BACKEND": "redis"},
            "FASTAPI_WEBSOCKETS_EVNTS_BACKEND is set but no setting reads it; "
            "did you mean FASTAPI_WEBSOCKETS_EVENTS_BACKEND?",
        ),
    ],
)
def test_environment_variables_nothing_reads_are_logged(
    env: dict[str, str], warning: str, caplog: pytest.LogCaptureFixture
) -> None:
    config._warned.clear()  # each warning is logged once per process
    # Each was silently ignored: a process meant to share Redis ran an in-memory layer alone.
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets.config"):
        parse_channel_layers_from_env(env)
    assert any(warning in record.getMessage() for record in caplog.records), caplog.text


@pytest.mark.parametrize("option", ["message_ttl", "queue_expiry", "inbox_expiry"])
def test_rabbitmq_milliseconds_past_ten_years_are_refused(option: str) -> None:
    # 10**12 ms reached the broker, which refused the queue ("value_too_large"), reported as
    # "RabbitMQ is unreachable" or as an exchange declared with other settings.
    assert build_channel_layer("rabbitmq", {option: 315_360_000_000})
    refused = rf"{option} must be .* up to 315,360,000,000.*got 1000000000000"
    with pytest.raises(InvalidChannelLayerConfig, match=refused):
        build_channel_layer("rabbitmq", {option: 10**12})


@pytest.mark.parametrize(
    ("env", "alias", "named"),
    [
        (
            {"FASTAPI_WEBSOCKETS_BACKEND": "redis", "FASTAPI_WEBSOCKETS_REDIS_CAPACITY": "-1"},
            "default",
            r"^FASTAPI_WEBSOCKETS_REDIS_CAPACITY: capacity must be a positive integer, got -1$",
        ),
        (
            {
                "FASTAPI_WEBSOCKETS_ALIASES": "default,events",
                "FASTAPI_WEBSOCKETS_EVENTS_BACKEND": "rabbitmq",
                "FASTAPI_WEBSOCKETS_EVENTS_RABBITMQ_MESSAGE_TTL": "0",
            },
            "events",
            r"^FASTAPI_WEBSOCKETS_EVENTS_RABBITMQ_MESSAGE_TTL: message_ttl must be",
        ),
        (
            # Two options that only clash together: both variables are named.
            {
                "FASTAPI_WEBSOCKETS_BACKEND": "redis",
                "FASTAPI_WEBSOCKETS_REDIS_URL": "redis://user:secret@cache:6379/0",
                "FASTAPI_WEBSOCKETS_REDIS_TLS_CA_FILE": __file__,
            },
            "default",
            r"^FASTAPI_WEBSOCKETS_REDIS_TLS_CA_FILE(, FASTAPI_WEBSOCKETS_REDIS_URL)?: ",
        ),
    ],
)
def test_a_constructor_error_names_the_environment_variable(
    env: dict[str, str], alias: str, named: str
) -> None:
    # It said "capacity must be a positive integer, got -1", leaving the reader to guess the variable.
    with pytest.raises(InvalidChannelLayerConfig, match=named) as caught:
        get_channel_layer_from_env(env, alias=alias)
    assert "secret" not in str(caught.value)


def test_both_variables_of_a_clash_are_named() -> None:
    env = {
        "FASTAPI_WEBSOCKETS_BACKEND": "redis",
        "FASTAPI_WEBSOCKETS_REDIS_SENTINELS": "s1:26379",
        "FASTAPI_WEBSOCKETS_REDIS_CLUSTER": "true",
        "FASTAPI_WEBSOCKETS_REDIS_SENTINEL_MASTER": "mymaster",
    }
    with pytest.raises(InvalidChannelLayerConfig) as caught:
        get_channel_layer_from_env(env)
    assert str(caught.value).startswith(
        "FASTAPI_WEBSOCKETS_REDIS_SENTINELS, FASTAPI_WEBSOCKETS_REDIS_CLUSTER: sentinels need"
    ), caught.value


@pytest.mark.parametrize(
    ("kind", "options", "named"),
    [
        ("redis", {"capacity": -1}, "CHANNEL_LAYERS['events']['CONFIG']['capacity']: capacity must be"),
        (
            "inmemory",
            {"channel_capacity": {"capacity:*": 0}, "capacity": 5},
            "CHANNEL_LAYERS['events']['CONFIG']['channel_capacity']: channel_capacity['capacity:*'] must be",
        ),
        ("nats", {"replicas": 9}, "CHANNEL_LAYERS['events']['CONFIG']['replicas']: replicas must be"),
        (
            "postgresql",
            {"pool_size": 0, "schema": "pool_size"},
            "CHANNEL_LAYERS['events']['CONFIG']['pool_size']: pool_size must be",
        ),
        (
            "inmemory",
            {"history": {"room:*": 0}},
            "CHANNEL_LAYERS['events']['CONFIG']['history']: history['room:*'] size must be",
        ),
    ],
)
def test_a_constructor_error_names_the_alias_and_key(kind: str, options: dict[str, Any], named: str) -> None:
    settings: dict[str, dict[str, Any]] = {
        "default": {"BACKEND": "inmemory"},
        "events": {"BACKEND": kind, "CONFIG": options},
    }
    with pytest.raises(InvalidChannelLayerConfig) as caught:
        get_channel_layer(settings, alias="events")
    # Only the option at fault is named: not one whose name is merely quoted in a value.
    assert str(caught.value).startswith(named), caught.value


def test_a_constructor_error_without_a_source_is_unchanged() -> None:
    with pytest.raises(InvalidChannelLayerConfig) as caught:
        build_channel_layer("redis", {"capacity": -1})
    assert str(caught.value) == "capacity must be a positive integer, got -1"
    with pytest.raises(InvalidChannelLayerConfig) as caught:
        RedisChannelLayer(capacity=-1)
    assert str(caught.value) == "capacity must be a positive integer, got -1"
