"""Where a lone Redis send's time goes: client CPU, event-loop iterations and server time per message.

``.venv/bin/python bench/profile_redis_p2p.py --repeat 3`` starts one Redis, then runs, interleaved
(A B C A B C ...), each implementation's closed loop of one sender in a second layer instance and
one receiver, each run in a fresh worker process of the implementation's virtualenv. Per run it
prints messages/s, p50 latency, the worker's CPU per message (user + system, both layers and the
loop: less load-sensitive than the rate), event-loop iterations per message, and the Redis server's
own time per message (``INFO commandstats``), then the medians and the ratios to channels_redis
PubSub. ``--profile NAME`` prints a cProfile of that implementation's loop instead.

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

DEFAULT = "redis,channels_redis pubsub,raw redis-py pipelined"


async def closed_loop(
    impl_name: str, server: dict[str, Any], namespace: str, messages: int
) -> dict[str, Any]:
    impl = harness.find_impl("redis", impl_name)
    loop = asyncio.get_running_loop()
    iterations = 0
    run_once = loop._run_once  # type: ignore[attr-defined]

    def counting() -> None:
        nonlocal iterations
        iterations += 1
        run_once()

    async with harness.layer_pair(impl, server, namespace) as (sender, receiver):
        channel = await harness.warm(sender, receiver)
        for index in range(50):  # warm caches and connections
            await sender.send(channel, {"type": "bench.p2p", "id": index})
            await receiver.receive(channel)
        latencies = []
        loop._run_once = counting  # type: ignore[attr-defined]
        cpu, wall = time.process_time(), time.perf_counter()
        for index in range(messages):
            began = time.perf_counter()
            receiving = asyncio.ensure_future(receiver.receive(channel))
            await sender.send(channel, {"type": "bench.p2p", "id": index})
            message = await receiving
            latencies.append(time.perf_counter() - began)
            assert message["id"] == index
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        loop._run_once = run_once  # type: ignore[attr-defined]
    latencies.sort()
    return {
        "rate": messages / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        # The rate is set by the slowest round trips as much as by the typical one.
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
        "cpu_us": cpu / messages * 1e6,
        "loops": iterations / messages,
    }


def worker(job: dict[str, Any]) -> None:
    coro = closed_loop(job["impl"], job["server"], job["ns"], job["messages"])
    if job.get("profile"):
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, coro)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(35)
    else:
        result = asyncio.run(coro)
    print(json.dumps(result), flush=True)


def server_usec(url: str) -> dict[str, tuple[int, int]]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {key: (value["calls"], value["usec"]) for key, value in stats.items()}


def run(
    impl: harness.Impl, server: dict[str, Any], messages: int, profile: bool, path: str | None = None
) -> dict[str, Any]:
    job = {"impl": impl.name, "server": server, "ns": "p" + uuid.uuid4().hex[:10], "messages": messages}
    job["profile"] = profile
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if path is None and impl.venv == "ours":
        # The virtualenv's editable install points at one checkout (/work/main, say): a run from
        # another worktree must measure this tree's package (as harness.run_job does).
        path = str(BENCH.parent)
    if path is not None:
        env["PYTHONPATH"] = path  # ahead of the virtualenv's own (editable) install
    before = server_usec(server["url"])
    server_cpu = harness.process_cpu(server["pids"])
    done = subprocess.run(
        [str(harness.PYTHONS[impl.venv]), __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        timeout=300,
    )
    if profile:
        print(done.stderr, file=sys.stderr)
    if done.returncode:
        return {"error": done.stderr.strip()[-400:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    server_cpu = harness.process_cpu(server["pids"]) - server_cpu
    after = server_usec(server["url"])
    used = {
        key: (after[key][0] - before.get(key, (0, 0))[0], after[key][1] - before.get(key, (0, 0))[1])
        for key in after
    }
    busy = {key.removeprefix("cmdstat_"): value for key, value in used.items() if value[0]}
    result["server_us"] = sum(usec for _, usec in busy.values()) / (messages + 51)
    result["commands"] = {
        key: f"{calls} calls {usec / max(calls, 1):.1f}us" for key, (calls, usec) in busy.items()
    }
    # CPU the server process used (clock ticks): unlike its own timings, not inflated by
    # waiting for a CPU; includes the warm-up and the layers' connection set-up.
    result["server_cpu_us"] = server_cpu / messages * 1e6
    result["load"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default=DEFAULT, help="comma-separated rows of bench_redis: %(default)s")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", default="", help="cProfile this implementation's loop once")
    parser.add_argument("--commands", action="store_true", help="print the server's per-command figures")
    parser.add_argument(
        "--baseline",
        default="",
        help="a directory holding another version's fastapi_websockets package (git archive REV "
        "fastapi_websockets | tar -x -C DIR): adds the row 'redis@baseline', run from there",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH.parent))
    import bench_redis

    names = [args.profile] if args.profile else args.impls.split(",")
    rows = [(name, harness.find_impl("redis", name), None) for name in names]
    if args.baseline:
        rows.insert(1, ("redis@baseline", harness.find_impl("redis", "redis"), args.baseline))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in rows}
    with bench_redis.server() as server:
        server = {"broker": "redis", **server}
        for round_ in range(1 if args.profile else args.repeat):
            for name, impl, path in rows:
                result = run(impl, server, args.messages, bool(args.profile), path)
                results[name].append(result)
                if "error" in result:
                    print(f"{round_} {name}: {result['error']}")
                    continue
                print(
                    f"{round_} {name:24} {result['rate']:8,.0f} msg/s  p50 {result['p50_ms']:.3f} ms  "
                    f"p99 {result['p99_ms']:.3f} ms  "
                    f"cpu {result['cpu_us']:6.1f} us/msg  loops {result['loops']:5.2f}  "
                    f"redis {result['server_us']:5.1f} us/msg (cpu {result['server_cpu_us']:5.1f})  "
                    f"load {result['load']:.1f}",
                    flush=True,
                )
                if args.commands:
                    print("   ", result["commands"])
    print("\nmedians:")
    base = None
    for name, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            continue
        med = {
            key: statistics.median(r[key] for r in good)
            for key in ("rate", "p50_ms", "p99_ms", "cpu_us", "loops", "server_us", "server_cpu_us")
        }
        if name == "channels_redis pubsub":
            base = med
        results_line = (
            f"{name:24} {med['rate']:8,.0f} msg/s  p50 {med['p50_ms']:.3f} ms  p99 {med['p99_ms']:.3f} ms  "
            f"cpu {med['cpu_us']:6.1f} us  "
            f"loops {med['loops']:5.2f}  redis {med['server_us']:5.1f} us (cpu {med['server_cpu_us']:5.1f})"
        )
        print(results_line)
        results[name] = [{**r, "median": med} for r in good]
    if base:
        for name, runs in results.items():
            if runs and "median" in runs[0]:
                med = runs[0]["median"]
                ratios = [
                    r["rate"] / b["rate"]
                    for r, b in zip(runs, results["channels_redis pubsub"], strict=False)
                ]
                print(
                    f"{name:24} rate ratio per run {', '.join(f'{x:.2f}' for x in ratios)}; "
                    f"median rate {med['rate'] / base['rate']:.2f}x, "
                    f"cpu {med['cpu_us'] / base['cpu_us']:.2f}x"
                )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
    else:
        main()
