"""The broadcast message every app of the end-to-end benchmark publishes.

Imported by the apps in every virtualenv, so it uses the standard library only.
The publish timestamp travels in the message: clients on the same machine
subtract it from their own ``time.time()`` at receipt.
"""

from __future__ import annotations

import os
import time
from typing import Any

ROOM = "room"
#: Padding that makes the JSON text of a message about 100 bytes long.
_PAD = "x" * 52


def redis_url() -> str:
    """The Redis the driver started for this run."""
    return os.environ["E2E_REDIS_URL"]


def message(seq: int) -> dict[str, Any]:
    """Broadcast number ``seq``, stamped with the time of publishing."""
    return {"seq": seq, "t": time.time(), "text": _PAD}
