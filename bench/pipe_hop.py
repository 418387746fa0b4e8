"""What p2p2's report pipe costs alone: the harness's closed loops over two pipes, no broker.

``.venv/bin/python bench/pipe_hop.py --repeat 3`` runs ``p2p_loops`` (bench/harness.py) of 1
and 16 senders where a "send" is a line written to a child process's stdin and its "arrival"
the line the child writes back on stdout at once: each message is two pipe hops, each hop one
write in one process and one read in the other, as p2p2 pays once per message (the receiving
worker writes, the sending child reads). Per run it prints the rate, the round trip's p50 and
each process's CPU per message; half a round trip is what p2p2 adds to each message.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness


async def echo() -> None:
    """The child: each line read from stdin goes back on stdout, stamped as p2p2's reports are."""
    loop = asyncio.get_running_loop()
    lines = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)
    out = os.fdopen(sys.stdout.fileno(), "wb", buffering=0)
    while line := await lines.readline():
        out.write(line.rstrip() + f" {time.perf_counter()!r}\n".encode())


async def measure(sizes: dict[str, Any]) -> dict[str, Any]:
    """One run: a fresh child, closed loops of 1 and 16 senders through it."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--echo", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdin is not None
    assert child.stdout is not None
    requests, replies = child.stdin, child.stdout
    waiting: dict[int, asyncio.Future[float]] = {}

    async def read_replies() -> None:
        while line := await replies.readline():
            key, stamp = line.split()
            waiting[int(key)].set_result(float(stamp))

    async def send(key: int) -> None:
        requests.write(f"{key}\n".encode())

    reader = asyncio.create_task(read_replies())
    try:
        return await harness.p2p_loops(send, waiting, sizes, {}, peer=child.pid)
    finally:
        await harness.stop([reader])
        child.kill()
        await child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--p2p-seconds", type=float, default=2.0)
    parser.add_argument("--p2p-messages", type=int, default=40_000)
    args = parser.parse_args()
    sizes = {"p2p_seconds": args.p2p_seconds, "p2p_messages": args.p2p_messages}
    runs = []
    for index in range(args.repeat):
        result = asyncio.run(measure(sizes))
        runs.append(result)
        print(
            f"#{index} load {os.getloadavg()[0]:.2f} "
            + "; ".join(
                f"{n}: {result[f'{n}_rate']:,.0f} round trips/s, p50 {result[f'{n}_p50'] * 1e6:.0f} us, "
                f"CPU us/msg parent {result[f'{n}_cpu_us']:.1f}, child {result[f'{n}_peer_cpu_us']:.1f}"
                for n in ("p2p1", "p2p16")
            ),
            flush=True,
        )
    for key in ("p2p1_rate", "p2p1_p50", "p2p1_cpu_us", "p2p1_peer_cpu_us", "p2p16_rate", "p2p16_cpu_us"):
        print(f"median {key}: {statistics.median(run[key] for run in runs):.6g}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--echo"]:
        asyncio.run(echo())
    else:
        main()
