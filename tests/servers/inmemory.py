"""The in-memory backend needs no server."""

from __future__ import annotations

from typing import Any

import pytest

from fastapi_websockets import InMemoryChannelLayer
from tests.servers import Backend

VARIANTS = {"inmemory": "inmemory_backend"}


@pytest.fixture(scope="session")
def inmemory_backend() -> Backend:
    def build(namespace: str, **options: Any) -> InMemoryChannelLayer:
        return InMemoryChannelLayer(**options)

    return Backend("inmemory", build, shared_between_instances=False)
