"""A lone Redis send with the sender in another process: a ping-pong between two processes.

``.venv/bin/python bench/pingpong_redis.py --repeat 4 --trees now=. --trees main=/tmp/base``
starts one Redis, then for each run and row (interleaved, a fresh pair of processes each
time): process B receives on its channel and sends each message back to the channel the
message names; process A sends message i, waits for its echo, then sends i + 1. Every
message crosses Redis from one process to the other (``python -m bench``'s p2p has the
sender and the receiver in one process). Per run it prints messages/s (two per round
trip), the round trip's p50 and p99, and process A's CPU per round trip, then each row's
rate over channels_redis PubSub's in the same run. Our rows run the package of the tree
they name; the channels_redis PubSub row runs in its peer virtualenv.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402

PEER = "channels_redis pubsub"


async def echo(job: dict[str, Any]) -> None:
    """Process B: send every message back to the channel it names until told to stop."""
    impl = harness.find_impl("redis", job["impl"])
    layer = impl.make(job["server"], job["ns"])
    channel = await layer.new_channel("echo")
    print(channel, flush=True)
    try:
        while not (message := await layer.receive(channel)).get("stop"):
            await layer.send(message["reply"], message)
    finally:
        await impl.close(layer)


async def ping(job: dict[str, Any]) -> None:
    """Process A: ``job["n"]`` round trips through process B, one at a time."""
    impl = harness.find_impl("redis", job["impl"])
    layer = impl.make(job["server"], job["ns"])
    mine = await layer.new_channel("ping")
    other = job["echo"]

    async def round_trip(index: int) -> None:
        await layer.send(other, {"type": "bench.ping", "i": index, "reply": mine})
        await layer.receive(mine)

    try:
        for index in range(50):  # warm caches and connections
            await round_trip(index)
        latencies = []
        cpu, wall = time.process_time(), time.perf_counter()
        for index in range(job["n"]):
            began = time.perf_counter()
            await round_trip(index)
            latencies.append(time.perf_counter() - began)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await layer.send(other, {"type": "bench.ping", "stop": True})
    finally:
        await impl.close(layer)
    latencies.sort()
    result = {
        "rate": 2 * job["n"] / wall,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(0.99 * (len(latencies) - 1))] * 1e6,
        "cpu_us": cpu / job["n"] * 1e6,
    }
    print(json.dumps(result), flush=True)


def run(tree: str | None, server: dict[str, Any], n: int) -> dict[str, Any]:
    """One run of a row: B started first (its channel name is A's argument), then A."""
    impl = harness.find_impl("redis", PEER if tree is None else "redis")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = tree  # ahead of the virtualenv's own (editable) install
    python = str(harness.PYTHONS[impl.venv])
    job: dict[str, Any] = {"impl": impl.name, "server": server, "ns": "q" + uuid.uuid4().hex[:10], "n": n}
    command = [python, __file__, "--worker"]
    echoing = subprocess.Popen(
        [*command, "echo", json.dumps(job)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert echoing.stdout is not None
        job["echo"] = echoing.stdout.readline().strip()
        done = subprocess.run(
            [*command, "ping", json.dumps(job)], capture_output=True, text=True, env=env, timeout=300
        )
        echoing.wait(timeout=30)
    finally:
        if echoing.poll() is None:
            echoing.kill()
            echoing.wait()
    if done.returncode:
        return {"error": done.stderr.strip()[-400:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trees", action="append", default=[], help="NAME=PATH of a tree of ours (repeatable)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH.parent))
    import bench_redis

    rows: list[tuple[str, str | None]] = [
        (name, path) for name, _, path in (t.partition("=") for t in args.trees)
    ]
    rows.append((PEER, None))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in rows}
    with bench_redis.server() as server:
        server = {"broker": "redis", **server}
        for round_ in range(args.repeat):
            for name, tree in rows:
                result = run(str(Path(tree).resolve()) if tree else None, server, args.round_trips)
                results[name].append(result)
                if "error" in result:
                    print(f"{round_} {name}: {result['error']}", flush=True)
                    continue
                print(
                    f"{round_} {name:24} {result['rate']:8,.0f} msg/s  "
                    f"round trip p50 {result['p50_us']:.0f} us  p99 {result['p99_us']:.0f} us  "
                    f"cpu {result['cpu_us']:.0f} us  load {result['load']:.1f}",
                    flush=True,
                )
    print()
    for name, runs in results.items():
        pairs = [
            (r, p) for r, p in zip(runs, results[PEER], strict=True) if "error" not in r and "error" not in p
        ]
        if not pairs:
            continue
        rate = statistics.median(r["rate"] for r, _ in pairs)
        p50 = statistics.median(r["p50_us"] for r, _ in pairs)
        ratios = ", ".join(f"{r['rate'] / p['rate']:.2f}" for r, p in pairs)
        print(f"{name:24} medians: {rate:8,.0f} msg/s, round trip p50 {p50:.0f} us; over the peer {ratios}")


def worker(role: str, job: dict[str, Any]) -> None:
    """One of the two processes of a run (see :func:`run`)."""
    asyncio.run(echo(job) if role == "echo" else ping(job))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
