"""Concurrent presence joins and leaves on RabbitMQ, interleaved across source trees.

Run from the repository root::

    .venv/bin/python bench/bench_presence_rabbitmq_concurrent.py \
        --tree base=/tmp/rabbit6-base --tree now=. [--joins 50] [--rounds 10] [--repeat 3]

It starts one private rabbitmq-server and, ``repeat`` times, runs each tree in
a fresh process (that tree first on ``PYTHONPATH``, trees alternating within a
repeat so that load from the rest of the machine falls on all of them alike).
A process holds two layer instances: one joins ``--joins`` channels to one
group's presence at once (``notify=True``, as a consumer's connect does), the
other participates in presence and must see them all; then all leave at once.
Printed per run, with the load average: the median and slowest latency of one
``presence_join`` and one ``presence_leave`` call (ms), the wall time of a
whole round of concurrent joins, and how many publishes shared a socket
write. The soak (``bench/soak_churn.py --backend rabbitmq``) is the
end-to-end view of the same cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


async def _timed(call: Any) -> float:
    start = time.perf_counter()
    await call
    return (time.perf_counter() - start) * 1000


async def measure(url: str, joins: int, rounds: int) -> dict[str, float]:
    """One tree's figures: per-call join/leave latencies (ms) and round wall times (ms)."""
    from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer

    namespace = "pc" + uuid.uuid4().hex[:8]
    joiner = RabbitMQChannelLayer(url=url, exchange_name=namespace, queue_prefix=namespace)
    observer = RabbitMQChannelLayer(url=url, exchange_name=namespace, queue_prefix=namespace)
    join_ms: list[float] = []
    leave_ms: list[float] = []
    round_ms: list[float] = []
    try:
        await observer.presence("room")  # a second participant, as in a two-process app
        for number in range(rounds + 1):  # the first round warms up
            channels = [await joiner.new_channel("ws") for _ in range(joins)]
            start = time.perf_counter()
            joined = await asyncio.gather(
                *(_timed(joiner.presence_join("room", c, {"user": c[-6:]})) for c in channels)
            )
            took = (time.perf_counter() - start) * 1000
            present = await observer.presence("room")
            if set(present) != set(channels):
                raise AssertionError(f"the observer saw {len(present)} of {joins} joins")
            left = await asyncio.gather(*(_timed(joiner.presence_leave("room", c)) for c in channels))
            if await observer.presence("room"):
                raise AssertionError("the observer still sees members after every leave")
            if number:
                join_ms += joined
                leave_ms += left
                round_ms.append(took)
        publishes, writes = joiner.publishes, joiner.publish_writes
    finally:
        await joiner.close()
        await observer.close()
    return {
        # Publishes per socket write on the joiner's confirm channel. Before presence
        # moved to that channel its changes went out through aio-pika, one write
        # each, and were not counted here: main's figure covers the events only.
        "per_write": publishes / max(writes, 1),
        "join_p50": statistics.median(join_ms),
        "join_max": max(join_ms),
        "leave_p50": statistics.median(leave_ms),
        "leave_max": max(leave_ms),
        "round_p50": statistics.median(round_ms),
    }


def _worker(tree: Path, url: str, joins: int, rounds: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, str(BENCH / Path(__file__).name), "--worker", url, str(joins), str(rounds)],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(tree.resolve())},
        timeout=600,
    )
    if done.returncode:
        raise RuntimeError(done.stderr.strip()[-500:])
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


COLUMNS = ("join_p50", "join_max", "leave_p50", "leave_max", "round_p50", "per_write")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=3, metavar=("URL", "JOINS", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        type=lambda text: tuple(text.split("=", 1)),
        metavar="NAME=PATH",
        help="a source tree to measure, repeatable (default: this one, as 'now')",
    )
    parser.add_argument("--joins", type=int, default=50, help="concurrent joins per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        url, joins, rounds = args.worker
        print(json.dumps(asyncio.run(measure(url, int(joins), int(rounds)))))
        return
    trees = [(name, Path(path)) for name, path in args.tree] or [("now", BENCH.parent)]
    sys.path.insert(0, str(BENCH.parent))
    from tests.servers.rabbitmq import RabbitNode

    print(f"{args.joins} concurrent presence joins then leaves, {args.rounds} rounds per run, ms")
    print(f"{'tree':<8} " + " ".join(f"{c:>10}" for c in COLUMNS) + "  load")
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    with tempfile.TemporaryDirectory(prefix="fw-bench-presence-conc-") as tmp:
        node = RabbitNode(Path(tmp))
        node.start()
        try:
            for _ in range(args.repeat):
                for name, tree in trees:
                    row = _worker(tree, node.url, args.joins, args.rounds)
                    results[name].append(row)
                    load = os.getloadavg()[0]
                    print(f"{name:<8} " + " ".join(f"{row[c]:>10.1f}" for c in COLUMNS) + f"  {load:.1f}")
        finally:
            node.stop()
    print("medians:")
    for name, rows in results.items():
        print(f"{name:<8} " + " ".join(f"{statistics.median(r[c] for r in rows):>10.1f}" for c in COLUMNS))


if __name__ == "__main__":
    main()
