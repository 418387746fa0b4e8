"""In-memory layers for ``python -m bench``: ours (the baseline of every ratio), Django Channels', 0.1.0's.

No server: two instances share nothing, so each row sends from the receiving instance.
"""

from __future__ import annotations

from typing import Any

from harness import Impl, Server


def ours(server: Server, namespace: str) -> Any:
    """This working tree's layer (or 0.1.0's, in the 0.1.0 virtualenv: same import path)."""
    from fastapi_websockets import InMemoryChannelLayer

    return InMemoryChannelLayer()


def django_channels(server: Server, namespace: str) -> Any:
    from channels.layers import InMemoryChannelLayer  # type: ignore[import-untyped, import-not-found, unused-ignore]

    return InMemoryChannelLayer()


IMPLS = [
    Impl("inmemory", "ours", ours, shared=False),
    Impl("channels inmemory", "channels", django_channels, shared=False, close=lambda layer: layer.flush()),
    Impl("inmemory 0.1.0", "0.1.0", ours, shared=False),
]
