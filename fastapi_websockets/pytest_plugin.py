"""pytest plugin: a ``channel_layer`` fixture, and no WebSocket left open after a test.

Nothing here runs unless you enable it, in one of three ways:

* ``pytest_plugins = ["fastapi_websockets.pytest_plugin"]`` in your top-level ``conftest.py``;
* ``pytest -p fastapi_websockets.pytest_plugin``;
* ``fastapi_websockets_plugin = true`` in your pytest configuration (the package's
  ``pytest11`` entry point only reads that switch and loads this module when it is on).

``channel_layer`` works under pytest-asyncio (strict or auto mode) and under
anyio's pytest plugin (tests marked ``anyio``). Once enabled, a test that ends
with a :class:`~fastapi_websockets.testing.WebsocketCommunicator` still
connected errors at teardown with
:class:`~fastapi_websockets.testing.ConnectionsLeftOpen`, naming where each
connection was opened; the connection's app task is cancelled.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import pytest

from fastapi_websockets.backends.inmemory import InMemoryChannelLayer
from fastapi_websockets.layers import override_default_layer
from fastapi_websockets.testing import (
    ConnectionsLeftOpen,
    abandon_running,
    cancel_left_open,
    report_leftovers,
    take_unreported_leftovers,
)

__all__ = ["channel_layer"]

_ANYIO_LAYER = "_fastapi_websockets_anyio_layer"
_ASYNCIO_LAYER = "_fastapi_websockets_asyncio_layer"


@contextlib.asynccontextmanager
async def _installed_layer() -> AsyncIterator[InMemoryChannelLayer]:
    layer = InMemoryChannelLayer()
    with override_default_layer(layer):
        try:
            yield layer
        finally:
            # Connections that outlive the test would be woken by close() into a layer error;
            # end them first, and let the teardown hook report them.
            report_leftovers(await cancel_left_open())
            await layer.close()


@pytest.fixture
def channel_layer(request: pytest.FixtureRequest) -> InMemoryChannelLayer:
    """An in-memory layer, the process-wide default for the duration of the test, closed after it.

    Consumers created without a layer use it, and so does an app's
    ``channel_layers_lifespan()`` for the ``"default"`` alias, so the test's
    ``group_send`` reaches the app's connections.
    """
    # One async fixture per runner: each plugin must set it up in the loop the test runs in.
    name = _ANYIO_LAYER if "anyio_backend" in request.fixturenames else _ASYNCIO_LAYER
    if name == _ASYNCIO_LAYER and _asyncio_fixture is None:
        raise pytest.UsageError(
            "the channel_layer fixture needs pytest-asyncio, or a test marked for anyio's pytest plugin"
        )
    layer: InMemoryChannelLayer = request.getfixturevalue(name)
    return layer


@pytest.fixture(name=_ANYIO_LAYER)
async def _anyio_layer() -> AsyncIterator[InMemoryChannelLayer]:
    async with _installed_layer() as layer:
        yield layer


_asyncio_fixture: Callable[..., Any] | None
try:
    import pytest_asyncio
except ImportError:  # anyio users need not install it
    _asyncio_fixture = None
else:

    @pytest_asyncio.fixture(name=_ASYNCIO_LAYER)
    async def _asyncio_layer() -> AsyncIterator[InMemoryChannelLayer]:
        async with _installed_layer() as layer:
            yield layer

    _asyncio_fixture = _asyncio_layer


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    take_unreported_leftovers()  # left by code outside any test; not this test's fault
    result = yield
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    __tracebackhide__ = True
    result = yield
    # Reported after every fixture is torn down: a fixture may hold a connection for the test.
    left = take_unreported_leftovers() + abandon_running()
    if left:
        raise ConnectionsLeftOpen(left)
    return result
