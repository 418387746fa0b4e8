"""A process that joins presence and waits to be killed (used by test_presence_processes.py).

Usage: python -m tests.e2e.presence_peer GROUP COUNT; the layer comes from FASTAPI_WEBSOCKETS_*.
Prints one line, the channels it joined (comma-separated), once they are all present.
"""

from __future__ import annotations

import asyncio
import sys

from fastapi_websockets import get_channel_layer_from_env


async def main(group: str, count: int) -> None:
    layer = get_channel_layer_from_env()
    channels = [await layer.new_channel("peer") for _ in range(count)]
    for channel in channels:
        await layer.presence_join(group, channel, {"pid": str(channel)}, notify=False)
    print(",".join(channels), flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
