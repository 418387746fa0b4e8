"""WebSocket clients for the end-to-end benchmark, one process of many.

Run by ``bench/bench_e2e.py``; talks to it by JSON lines. Arguments: the
protocol (``plain`` or ``socketio``), the number of clients, the first client's
global index and the servers' base URLs; client ``i`` connects to server
``i % len(urls)``. It prints ``{"event": "connected", ...}`` once every client
is in, then ``{"event": "round", "seq": n}`` when all its clients have received
broadcast ``n``. On the line ``report`` from stdin it prints what it received
(latency of every delivery of the measured broadcasts, seq >= 0) and on
``close`` it closes every socket and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Load:
    """The clients of this process and what they received."""

    def __init__(self, protocol: str, count: int, first: int, urls: list[str], deflate: bool) -> None:
        self.protocol = protocol
        self.count = count
        self.first = first
        self.urls = urls
        self.deflate = deflate
        self.sockets: list[ClientConnection] = []
        self.readers: list[asyncio.Task[None]] = []
        self.received: dict[int, int] = defaultdict(int)
        self.published: dict[int, float] = {}
        self.last: dict[int, float] = {}
        #: Per server (index in ``urls``) and broadcast: the first and the last receipt from it.
        self.first_from: dict[int, dict[int, float]] = defaultdict(dict)
        self.last_from: dict[int, dict[int, float]] = defaultdict(dict)
        self.latencies: list[float] = []
        self.closed_early = 0
        self.failed = 0
        self.closing = False

    def url_of(self, index: int) -> str:
        base = self.urls[index % len(self.urls)]
        if self.protocol == "socketio":
            return f"{base}/socket.io/?EIO=4&transport=websocket"
        return f"{base}/ws"

    async def open_one(self, index: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                ws = await connect(
                    self.url_of(index),
                    open_timeout=60,
                    ping_interval=None,
                    max_size=None,
                    compression="deflate" if self.deflate else None,
                )
                if self.protocol == "socketio":
                    # Engine.IO open packet, then connect to the default namespace.
                    opened = await ws.recv()
                    if not str(opened).startswith("0"):
                        raise ValueError(f"expected an Engine.IO open packet, got {opened!r}")
                    await ws.send("40")
                    joined = await ws.recv()
                    if not str(joined).startswith("40"):
                        raise ValueError(f"expected a Socket.IO connect packet, got {joined!r}")
            except Exception:
                self.failed += 1
                return
        self.sockets.append(ws)
        self.readers.append(asyncio.create_task(self.read(ws, index % len(self.urls))))

    async def read(self, ws: ClientConnection, server: int) -> None:
        socketio = self.protocol == "socketio"
        try:
            async for frame in ws:
                now = time.time()
                if socketio:
                    if frame == "2":  # Engine.IO ping
                        await ws.send("3")
                        continue
                    if not (isinstance(frame, str) and frame.startswith("42")):
                        continue
                    body = json.loads(frame[2:])[1]
                else:
                    body = json.loads(frame)
                seq = body["seq"]
                self.received[seq] += 1
                if seq >= 0:
                    self.latencies.append(now - body["t"])
                    self.published[seq] = body["t"]
                    self.last[seq] = now
                    self.first_from[server].setdefault(seq, now)
                    self.last_from[server][seq] = now
                if self.received[seq] == len(self.sockets):
                    emit({"event": "round", "seq": seq})
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:
                self.closed_early += 1

    async def run(self) -> None:
        gate = asyncio.Semaphore(100)
        await asyncio.gather(*(self.open_one(self.first + i, gate) for i in range(self.count)))
        emit({"event": "connected", "open": len(self.sockets), "failed": self.failed})
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while line := (await stdin.readline()).decode().strip():
            if line == "report":
                emit(
                    {
                        "event": "report",
                        "received": {str(k): v for k, v in self.received.items() if k >= 0},
                        "published": {str(k): v for k, v in self.published.items()},
                        "last": {str(k): v for k, v in self.last.items()},
                        "latencies": self.latencies,
                        "first_from": {str(w): times for w, times in self.first_from.items()},
                        "last_from": {str(w): times for w, times in self.last_from.items()},
                        "closed_early": self.closed_early,
                    }
                )
            elif line == "close":
                break
        self.closing = True
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("protocol", choices=["plain", "socketio"])
    parser.add_argument("count", type=int)
    parser.add_argument("first", type=int)
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--deflate", action="store_true")
    args = parser.parse_args()
    load = Load(args.protocol, args.count, args.first, args.urls, deflate=args.deflate)
    try:
        import uvloop
    except ImportError:
        asyncio.run(load.run())
    else:
        uvloop.run(load.run())


if __name__ == "__main__":
    main()
