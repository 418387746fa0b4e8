"""Django-Channels-style channel layers and consumers for FastAPI WebSockets."""

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.backends.inmemory import InMemoryChannelLayer
from fastapi_websockets.backends.nats import NATSChannelLayer
from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer
from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer
from fastapi_websockets.backends.redis import RedisChannelLayer
from fastapi_websockets.config import (
    BackendSettings,
    build_channel_layer,
    get_channel_layer,
    get_channel_layer_from_env,
    load_backend_class,
    parse_channel_layers,
    parse_channel_layers_from_env,
)
from fastapi_websockets.consumers import AsyncJsonWebSocketConsumer, AsyncWebSocketConsumer
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
    SerializationError,
)
from fastapi_websockets.history import History, StreamPosition
from fastapi_websockets.layers import (
    channel_layer_dependency,
    channel_layers_lifespan,
    close_default_layers,
    get_default_layer,
    set_default_layer,
)
from fastapi_websockets.messages import (
    send_bytes_message,
    send_json_message,
    websocket_bytes_message,
    websocket_json_message,
)

__version__ = "0.2.0.dev0"

__all__ = [
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
