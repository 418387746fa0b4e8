"""broadcaster's app for ``bench/profile_consumer.py`` and ``bench/count_instructions.py``: one process.

The same app as ``broadcaster_app.py`` (its README's chat example) on
broadcaster's in-memory backend, with a ``publish(seq)`` coroutine as the
profilers call it, so a delivery's cost can be set against ours on the
in-memory layer. Run with the broadcaster virtualenv's Python.
"""

from __future__ import annotations

import json
import os

os.environ["E2E_REDIS_URL"] = "memory://"

from broadcaster_app import app, broadcast
from payload import ROOM, message

__all__ = ["app", "publish"]


async def publish(seq: int) -> None:
    """Broadcast message ``seq`` to every socket of this process."""
    await broadcast.publish(channel=ROOM, message=json.dumps(message(seq)))
