"""Test configuration: broker server plugins and the per-backend layer factory."""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

import tests.servers
from fastapi_websockets import BaseChannelLayer
from tests.servers import Backend

_SERVER_MODULES = [
    f"tests.servers.{info.name}"
    for info in pkgutil.iter_modules(tests.servers.__path__)
    if not info.name.startswith("_")
]
pytest_plugins = [*_SERVER_MODULES, "fastapi_websockets.pytest_plugin", "tests.unclosed"]


def variants() -> dict[str, str]:
    """``{variant: fixture name}``, gathered from every server module (loaded as plugins)."""
    found: dict[str, str] = {}
    for module in _SERVER_MODULES:
        found.update(getattr(importlib.import_module(module), "VARIANTS", {}))
    return found


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        help="run the conformance suite only on these variants (repeatable); default: all",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        known = variants()
        chosen = metafunc.config.getoption("--backend") or list(known)
        unknown = set(chosen) - set(known)
        if unknown:
            raise pytest.UsageError(f"unknown --backend {sorted(unknown)}; known: {sorted(known)}")
        metafunc.parametrize("backend", chosen, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With --backend, leave out the backend-specific files of the backends not chosen."""
    chosen = config.getoption("--backend")
    if not chosen:
        return
    keep, drop = [], []
    for item in items:
        stem = item.path.stem
        if item.path.parent.name == "backends" and stem.startswith("test_"):
            # test_nats_restarts.py belongs to nats as much as test_nats.py does.
            name = stem.removeprefix("test_").split("_")[0]
            if not any(variant == name or variant.startswith(name + "-") for variant in chosen):
                drop.append(item)
                continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """The backend variant under test (its server is started once per session)."""
    result: Backend = request.getfixturevalue(variants()[request.param])
    return result


LayerFactory = Callable[..., BaseChannelLayer]
L = TypeVar("L", bound=BaseChannelLayer)


@pytest.fixture
def namespace() -> str:
    """A fresh prefix / schema / namespace: layers built with it share state only with each other."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def layers() -> AsyncIterator[list[BaseChannelLayer]]:
    """Layers a test creates (append them, or build them with :func:`layer_factory`); closed after it."""
    made: list[BaseChannelLayer] = []
    yield made
    for layer in made:
        await layer.close()


def layer_factory(made: list[BaseChannelLayer], cls: type[L], **defaults: Any) -> Callable[..., L]:
    """A ``make(**options)`` building ``cls`` layers with ``defaults``, each closed after the test.

    The one layer-factory shape of the suite: backend test files build their
    ``make`` fixture with it, from the ``layers`` and ``namespace`` fixtures.
    """

    def make(**options: Any) -> L:
        layer = cls(**{**defaults, **options})
        made.append(layer)
        return layer

    return make


@pytest.fixture
def make_layer(backend: Backend, namespace: str, layers: list[BaseChannelLayer]) -> LayerFactory:
    """Build layers on the backend under test; all share one fresh namespace and are closed after."""

    def make(**options: Any) -> BaseChannelLayer:
        layer = backend.build(namespace, **options)
        layers.append(layer)
        return layer

    return make
