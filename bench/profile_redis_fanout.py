"""Where a Redis fan-out round's time goes, against the in-memory layer: CPU per round, not wall time.

``.venv/bin/python bench/profile_redis_fanout.py --repeat 6`` starts one Redis and measures, in
this process, alternating which goes first, the in-memory layer and our Redis layer fanning one
``group_send`` out to ``--receivers`` receivers (as ``python -m bench``'s fanout scenario: the
sender in a second layer instance, each receiver a task in a ``receive()`` loop). Per run it
prints this process's CPU per round (both layers and every receiver), the Redis server's CPU per
round (from /proc) and the median wall time of a round. On a busy machine the wall time of a
round mostly measures waiting for a CPU; CPU per round is what the layer itself costs.

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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import bench_redis  # noqa: E402
import harness  # noqa: E402


async def measure(
    impl: harness.Impl, server: harness.Server, receivers: int, rounds: int
) -> dict[str, float]:
    namespace = "f" + os.urandom(5).hex()
    pids = server.get("pids", [])
    async with harness.fan_room(impl, server, namespace, receivers) as (sender, _, counts):
        cpu, server_cpu = time.process_time(), harness.process_cpu(pids)
        walls = await harness.fan_rounds(sender, counts, rounds)
        cpu, server_cpu = time.process_time() - cpu, harness.process_cpu(pids) - server_cpu
    return {
        "cpu_ms": cpu / rounds * 1000,
        "server_ms": server_cpu / rounds * 1000,
        "wall_ms": statistics.median(walls) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument(
        "--row",
        action="append",
        default=None,
        help="a Redis row of the shared benchmark to measure (repeatable; default: redis)",
    )
    args = parser.parse_args()
    redis_rows = args.row or ["redis"]
    rows: list[tuple[str, harness.Impl]] = [
        ("inmemory", harness.find_impl("inmemory", "inmemory")),
        *((name, harness.find_impl("redis", name)) for name in redis_rows),
    ]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in rows}
    with bench_redis.server() as redis_server:
        servers: dict[str, Any] = {"inmemory": {}}
        servers.update({name: {"broker": "redis", **redis_server} for name in redis_rows})
        for index in range(args.repeat):
            for name, impl in rows if index % 2 == 0 else rows[::-1]:
                result = asyncio.run(measure(impl, servers[name], args.receivers, args.rounds))
                results[name].append(result)
                print(
                    f"{index} {name:22} client CPU {result['cpu_ms']:6.2f} ms/round  "
                    f"Redis CPU {result['server_ms']:5.2f} ms/round  wall p50 {result['wall_ms']:6.2f} ms  "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    for name, med in medians.items():
        print(
            f"median {name:22} client CPU {med['cpu_ms']:6.2f} ms/round  "
            f"Redis CPU {med['server_ms']:5.2f} ms/round  wall p50 {med['wall_ms']:6.2f} ms"
        )
    memory = medians["inmemory"]
    for name in redis_rows:
        redis = medians[name]
        per_run = [
            m["cpu_ms"] / (r["cpu_ms"] + r["server_ms"])
            for m, r in zip(results["inmemory"], results[name], strict=True)
        ]
        print(
            f"in-memory CPU / {name} CPU (client + server) per round: "
            f"{memory['cpu_ms'] / (redis['cpu_ms'] + redis['server_ms']):.2f} (medians); "
            f"per run: {', '.join(f'{ratio:.2f}' for ratio in per_run)}"
        )


if __name__ == "__main__":
    main()
