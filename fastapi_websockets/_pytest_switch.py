"""The package's ``pytest11`` entry point: an off switch, on only when the project asks.

pytest loads every installed entry point in every run, so this module adds
only the ``fastapi_websockets_plugin`` ini option and loads
:mod:`fastapi_websockets.pytest_plugin` when it is true. Projects that do not
set it see no fixture, hook or behaviour from this package.
"""

from __future__ import annotations

import pytest

_PLUGIN = "fastapi_websockets.pytest_plugin"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "fastapi_websockets_plugin",
        type="bool",
        default=False,
        help="load fastapi_websockets.pytest_plugin (channel_layer fixture, open-connection check)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getini("fastapi_websockets_plugin") and not config.pluginmanager.has_plugin(_PLUGIN):
        config.pluginmanager.import_plugin(_PLUGIN)
