"""Placeholder: the postgresql backend is being written (see its issue)."""

from __future__ import annotations

from typing import Any

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.types import Message

__all__ = ["PostgreSQLChannelLayer"]


class PostgreSQLChannelLayer(BaseChannelLayer):
    """Not implemented yet."""

    backend_name = "postgresql"

    def __init__(
        self,
        *,
        dsn: str = "postgresql://postgres:postgres@localhost:5432/postgres",
        schema: str = "fastapi_websockets",
        channel_expiry: float = 60,
        group_expiry: float = 86400,
        poll_interval: float = 0.1,
        prune_interval: float = 60.0,
        ensure_schema: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(channel_expiry=channel_expiry, group_expiry=group_expiry, **options)

    async def _start(self) -> None:
        raise NotImplementedError("the postgresql backend is not implemented yet")

    async def _send_remote(self, channel: str, data: bytes) -> None:
        raise NotImplementedError

    async def _receive_remote(self, channel: str) -> Message:
        raise NotImplementedError

    async def _group_add(self, group: str, channel: str) -> None:
        raise NotImplementedError

    async def _group_discard(self, group: str, channel: str) -> None:
        raise NotImplementedError

    async def _group_send(self, group: str, data: bytes) -> None:
        raise NotImplementedError

    async def _flush(self) -> None:
        raise NotImplementedError
