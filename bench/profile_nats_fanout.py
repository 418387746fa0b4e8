"""Where a NATS fan-out round's time goes, against the in-memory layer: CPU, messages and functions.

``.venv/bin/python bench/profile_nats_fanout.py --repeat 6`` starts one nats-server and measures, in
this process, alternating which goes first, the in-memory layer and our NATS layer fanning one
``group_send`` out to ``--receivers`` receivers (as ``python -m bench``'s fanout scenario: the
sender in a second layer instance, each receiver a task in a ``receive()`` loop). Per run it
prints this process's CPU per round, nats-server's CPU per round (from /proc), the messages the
server received and sent per round (its ``/varz`` counters: each JetStream request, reply,
publish, delivery and ack is one), and the median wall time of a round. ``--functions N`` adds a
cProfile of the NATS rounds, its top N functions by own time (it slows the NATS runs down). On a
busy machine wall time mostly measures waiting for a CPU; CPU per round is what the layer costs.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import bench_nats  # noqa: E402
import harness  # noqa: E402


def server_messages(server: harness.Server) -> int:
    """Messages in plus messages out, so far, by the server's monitoring counters."""
    if "monitor" not in server:
        return 0
    with urllib.request.urlopen(server["monitor"] + "/varz", timeout=5) as response:
        varz = json.loads(response.read())
    return int(varz["in_msgs"]) + int(varz["out_msgs"])


async def measure(
    impl: harness.Impl, server: harness.Server, receivers: int, rounds: int
) -> dict[str, float]:
    """CPU of this process and of the server, server messages and median wall time, per round."""
    namespace = "f" + os.urandom(5).hex()
    pids = server.get("pids", [])
    async with harness.fan_room(impl, server, namespace, receivers) as (sender, _, counts):
        messages = server_messages(server)
        cpu, server_cpu = time.process_time(), harness.process_cpu(pids)
        walls = await harness.fan_rounds(sender, counts, rounds)
        cpu, server_cpu = time.process_time() - cpu, harness.process_cpu(pids) - server_cpu
        # Read once the rounds are over, so a straggling ack may fall in: an upper bound.
        messages = server_messages(server) - messages
    return {
        "cpu_ms": cpu / rounds * 1000,
        "server_ms": server_cpu / rounds * 1000,
        "messages": messages / rounds,
        "wall_ms": statistics.median(walls) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--functions", type=int, default=0, help="cProfile the NATS runs: top N by own time")
    args = parser.parse_args()
    rows: list[tuple[str, harness.Impl]] = [
        ("inmemory", harness.find_impl("inmemory", "inmemory")),
        ("nats", harness.find_impl("nats", "nats")),
    ]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in rows}
    profile = cProfile.Profile() if args.functions else None
    with bench_nats.server() as nats_server:
        servers: dict[str, Any] = {"inmemory": {}, "nats": {"broker": "nats", **nats_server}}
        for index in range(args.repeat):
            for name, impl in rows if index % 2 == 0 else rows[::-1]:
                if profile is not None and name == "nats":
                    profile.enable()
                result = asyncio.run(measure(impl, servers[name], args.receivers, args.rounds))
                if profile is not None:
                    profile.disable()
                results[name].append(result)
                print(
                    f"{index} {name:8} client CPU {result['cpu_ms']:6.2f} ms/round  "
                    f"server CPU {result['server_ms']:5.2f} ms/round  "
                    f"server msgs {result['messages']:6.1f}/round  wall p50 {result['wall_ms']:6.2f} ms  "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    for name, med in medians.items():
        print(
            f"median {name:8} client CPU {med['cpu_ms']:6.2f} ms/round  "
            f"server CPU {med['server_ms']:5.2f} ms/round  wall p50 {med['wall_ms']:6.2f} ms"
        )
    pairs = list(zip(results["inmemory"], results["nats"], strict=True))
    walls = [m["wall_ms"] / n["wall_ms"] for m, n in pairs]
    cpus = [m["cpu_ms"] / (n["cpu_ms"] + n["server_ms"]) for m, n in pairs]
    print(f"in-memory wall / NATS wall per round, per run: {', '.join(f'{r:.2f}' for r in walls)}")
    print(
        "in-memory CPU / NATS CPU (client + server) per round, per run: "
        f"{', '.join(f'{r:.2f}' for r in cpus)} (median {statistics.median(cpus):.2f})"
    )
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.functions)
        print(out.getvalue())


if __name__ == "__main__":
    main()
