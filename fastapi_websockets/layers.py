"""Process-wide default layers, one per alias, and the FastAPI lifespan that owns them.

A consumer created without a layer uses :func:`get_default_layer`, so every
connection of a process shares one layer (and, with the in-memory backend, can
broadcast to the others). The default layer of an alias is built from the
environment on first use, unless the app's lifespan installed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from starlette.requests import HTTPConnection

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.config import (
    DEFAULT_LAYER_ALIAS,
    build_channel_layer,
    get_channel_layer_from_env,
    parse_channel_layers,
    parse_channel_layers_from_env,
)
from fastapi_websockets.exceptions import ChannelLayerError

__all__ = [
    "channel_layer_dependency",
    "channel_layers_lifespan",
    "close_default_layers",
    "get_default_layer",
    "override_default_layer",
    "set_default_layer",
]

logger = logging.getLogger("fastapi_websockets")

# Keyed by (alias, event loop): a layer's futures and locks belong to one loop, and test
# clients (Starlette's TestClient) run each app in a new loop. None is "any loop".
_defaults: dict[tuple[str, asyncio.AbstractEventLoop | None], BaseChannelLayer] = {}
# Installed by tests; they win over everything above, lifespans included.
_overrides: dict[str, BaseChannelLayer] = {}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def get_default_layer(alias: str = DEFAULT_LAYER_ALIAS) -> BaseChannelLayer:
    """The process-wide layer of ``alias``: the one the lifespan installed, else one built from env.

    Layers are kept per event loop, so an app served by several test clients in turn
    gets a working layer each time.
    """
    override = _overrides.get(alias)
    if override is not None and not override.closed:
        return override
    loop = _running_loop()
    for key in ((alias, loop), (alias, None)):
        layer = _defaults.get(key)
        if layer is not None and not layer.closed:
            return layer
    for key in [key for key, layer in _defaults.items() if layer.closed or (key[1] and key[1].is_closed())]:
        del _defaults[key]
    layer = _defaults[(alias, loop)] = get_channel_layer_from_env(alias=alias)
    return layer


def set_default_layer(layer: BaseChannelLayer, alias: str = DEFAULT_LAYER_ALIAS) -> None:
    """Install ``layer`` as the process-wide layer of ``alias`` (for the running event loop)."""
    _defaults[(alias, _running_loop())] = layer


@contextlib.contextmanager
def override_default_layer(
    layer: BaseChannelLayer, alias: str = DEFAULT_LAYER_ALIAS
) -> Iterator[BaseChannelLayer]:
    """Make ``layer`` the layer of ``alias`` for the whole process until the block ends (for tests).

    Inside the block it wins over every other default, including the layer an
    app's :func:`channel_layers_lifespan` would build for ``alias``: that
    lifespan uses ``layer`` instead and leaves it open. The caller owns and
    closes ``layer``; on exit the previous override, if any, comes back.
    """
    previous = _overrides.get(alias)
    _overrides[alias] = layer
    try:
        yield layer
    finally:
        if previous is None:
            _overrides.pop(alias, None)
        else:
            _overrides[alias] = previous


async def close_default_layers() -> None:
    """Close and forget every process-wide default layer of the running event loop."""
    loop = _running_loop()
    keys = [key for key in _defaults if key[1] in (loop, None)]
    for key in keys:
        await _defaults.pop(key).close()


def channel_layers_lifespan(
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan`` that creates and starts the app's layers at startup and closes them at shutdown.

    With ``settings`` (a ``CHANNEL_LAYERS`` mapping) each alias is built from
    it; without, from the environment variables. The layers become the
    process-wide defaults (consumers without a layer use them) and are
    available as ``app.state.channel_layers[alias]``::

        app = FastAPI(lifespan=channel_layers_lifespan(CHANNEL_LAYERS))
    """
    parsed = parse_channel_layers(settings) if settings is not None else parse_channel_layers_from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # An overridden alias (a test's layer) is used as it is, and closed by its owner.
        owned = {
            alias: build_channel_layer(entry) for alias, entry in parsed.items() if alias not in _overrides
        }
        app.state.channel_layers = {
            **owned,
            **{alias: _overrides[alias] for alias in parsed if alias not in owned},
        }
        for alias, layer in owned.items():
            set_default_layer(layer, alias)
        for alias, layer in owned.items():
            # At startup, as other libraries connect in their lifespan: the first WebSocket
            # should not pay for the driver import and the connections. A broker that is
            # down must not stop the app: the layer starts again at first use.
            try:
                await layer.start()
            except ChannelLayerError as exc:
                logger.warning("channel layer %r did not start (%s); it will try again when used", alias, exc)
        try:
            yield
        finally:
            for layer in owned.values():
                for key in [key for key, value in _defaults.items() if value is layer]:
                    del _defaults[key]
                await layer.close()

    return lifespan


def channel_layer_dependency(
    alias: str = DEFAULT_LAYER_ALIAS,
) -> Callable[[HTTPConnection], Awaitable[BaseChannelLayer]]:
    """A FastAPI dependency returning the app's layer of ``alias`` (HTTP and WebSocket routes)::

    @app.post("/notify")
    async def notify(layer: BaseChannelLayer = Depends(channel_layer_dependency())): ...

    The dependency is a coroutine function although it never waits: FastAPI
    runs a plain function dependency in a worker thread, which would put a
    thread hop before every request that publishes.
    """

    async def dependency(connection: HTTPConnection) -> BaseChannelLayer:
        layers: dict[str, BaseChannelLayer] | None = getattr(connection.app.state, "channel_layers", None)
        if layers is not None and alias in layers:
            return layers[alias]
        return get_default_layer(alias)

    return dependency
