"""Benchmark of the PostgreSQL layer against the in-memory layer and the 0.1.0 release.

Run from the repository root::

    .venv/bin/python bench/bench_postgresql.py [--skip-010] [--quick]

It starts its own PostgreSQL (as in the test suite), then measures for each
implementation, in one run on the same server:

* ping-pong: one-way latency p50/p99 of a message bounced between two layer
  instances (two "processes" sharing the database), and messages/s with 16
  concurrent senders to one receiver;
* fan-out: ``group_send`` to 1,000 receivers waiting in another instance
  (deliveries/s, from the first send until every receiver has every message;
  best of 3 runs);
* idle: 5,000 receivers waiting on ``new_channel()`` channels, then 5,000
  waiting on distinct named channels; database connections held
  (``pg_stat_activity``) and CPU seconds used in 5 s of idling (once set up)
  by this process and by the PostgreSQL server.

The 0.1.0 release is installed into ``bench/.venv-010`` (``pip install
"fastapi-websockets[postgresql]==0.1.0"``) and driven in a subprocess with the
same scenarios, smaller where it would take minutes; a scenario it cannot
finish in its time limit is reported as such.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_010 = ROOT / "bench" / ".venv-010"

Layer = Any
Factory = Callable[[], Layer]


# ------------------------------------------------------------------ scenarios


async def warm(*layers: Layer) -> None:
    # Connect before the measurement: 0.1.0 creates its pool lazily without a lock,
    # so a burst of first calls opens one pool per call ("too many clients").
    for layer in layers:
        channel = await layer.new_channel("warm")
        await layer.send(channel, {"type": "warm"})
        await layer.receive(channel)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def ping_pong(make: Factory, rounds: int) -> dict[str, Any]:
    a, b = make(), make()
    try:
        await warm(a, b)
        ping, pong = await a.new_channel("ping"), await b.new_channel("pong")
        latencies: list[float] = []

        async def echo() -> None:
            for _ in range(rounds):
                message = await b.receive(pong)
                latencies.append(time.perf_counter() - message["t"])
                await b.send(ping, {"type": "pong", "t": time.perf_counter()})

        echoer = asyncio.create_task(echo())
        for _ in range(rounds):
            await a.send(pong, {"type": "ping", "t": time.perf_counter()})
            message = await a.receive(ping)
            latencies.append(time.perf_counter() - message["t"])
        await echoer
        return {
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
        }
    finally:
        await a.close()
        await b.close()


async def throughput(make: Factory, count: int, senders: int = 16) -> dict[str, Any]:
    a, b = make(), make()
    try:
        await warm(a, b)
        target = await b.new_channel("sink")
        per_sender = count // senders

        async def send(index: int) -> None:
            for i in range(per_sender):
                await a.send(target, {"type": "n", "i": i, "s": index})

        async def receive() -> None:
            for _ in range(per_sender * senders):
                await b.receive(target)

        started = time.perf_counter()
        receiver = asyncio.create_task(receive())
        await asyncio.gather(*(send(index) for index in range(senders)))
        await receiver
        return {"msgs_per_s": per_sender * senders / (time.perf_counter() - started)}
    finally:
        await a.close()
        await b.close()


async def fan_out(make: Factory, members: int, messages: int, limit: float) -> dict[str, Any]:
    sender, owner = make(), make()
    delivered = 0
    try:
        await warm(sender, owner)
        channels = [await owner.new_channel("fan") for _ in range(members)]
        for channel in channels:
            await owner.group_add("room", channel)

        async def receive(channel: str) -> None:
            nonlocal delivered
            for _ in range(messages):
                await owner.receive(channel)
                delivered += 1

        receivers = [asyncio.create_task(receive(channel)) for channel in channels]
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        try:
            for index in range(messages):
                await asyncio.wait_for(sender.group_send("room", {"type": "fan", "i": index}), limit)
            await asyncio.wait_for(
                asyncio.gather(*receivers), max(limit - (time.perf_counter() - started), 0.1)
            )
        except asyncio.TimeoutError:
            for task in receivers:
                task.cancel()
            await asyncio.gather(*receivers, return_exceptions=True)
            return {"timeout": f"{delivered} of {members * messages} delivered in {limit:.0f} s"}
        return {"deliveries_per_s": members * messages / (time.perf_counter() - started)}
    finally:
        await sender.close()
        await owner.close()


def process_cpu(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def server_pids(postmaster: int) -> list[int]:
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


async def settle(limit: float) -> None:
    # Wait until this process stops working (receivers set up), at most ``limit`` s.
    deadline = time.monotonic() + limit
    await asyncio.sleep(0.5)
    while time.monotonic() < deadline:
        before = time.process_time()
        await asyncio.sleep(0.5)
        if time.process_time() - before < 0.02:
            return


async def idle(
    make: Factory,
    receivers: int,
    seconds: float,
    dsn: str | None,
    postmaster: int | None,
    *,
    named: bool = False,
) -> dict[str, Any]:
    layer = make()
    try:
        await warm(layer)
        if named:
            channels = [f"idle.named.{index}" for index in range(receivers)]
        else:
            channels = [await layer.new_channel("idle") for _ in range(receivers)]
        tasks = [asyncio.create_task(layer.receive(channel)) for channel in channels]
        await settle(8.0)
        result: dict[str, Any] = {}
        if dsn is not None:
            import asyncpg

            monitor = await asyncpg.connect(dsn)
            try:
                result["connections"] = await monitor.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
            finally:
                await monitor.close()
        pg_before = process_cpu(server_pids(postmaster)) if postmaster else 0.0
        before = time.process_time()
        await asyncio.sleep(seconds)
        result["cpu_s"] = time.process_time() - before
        if postmaster:
            result["server_cpu_s"] = process_cpu(server_pids(postmaster)) - pg_before
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return result
    finally:
        await layer.close()


async def best_of(times: int, scenario: Callable[[], Any]) -> dict[str, Any]:
    # The machine is shared: keep the best of a few runs, the same way for every layer.
    best: dict[str, Any] = {}
    for _ in range(times):
        result = await scenario()
        if "timeout" in result or result["deliveries_per_s"] > best.get("deliveries_per_s", 0):
            best = result
        if "timeout" in result:
            break
    return best


async def run_all(
    make: Factory, sizes: dict[str, Any], dsn: str | None, postmaster: int | None
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    limit = sizes["limit"]

    async def guarded(name: str, coro: Any) -> None:
        try:
            results[name] = await asyncio.wait_for(coro, limit * 2)
        except asyncio.TimeoutError:
            results[name] = {"timeout": f"did not finish in {limit * 2:.0f} s"}
        except Exception as exc:
            results[name] = {"timeout": f"failed: {type(exc).__name__}: {exc}"[:200]}

    # Create the schema once up front: 0.1.0 fails when two layers create it at once.
    first = make()
    await first.send("bench.warmup", {"type": "warmup"})
    await first.receive("bench.warmup")
    await first.close()
    await guarded("ping", ping_pong(make, sizes["rounds"]))
    await guarded("throughput", throughput(make, sizes["count"]))
    await guarded(
        "fanout", best_of(sizes["repeat"], lambda: fan_out(make, sizes["members"], sizes["messages"], limit))
    )
    await guarded("idle", idle(make, sizes["idle"], sizes["idle_seconds"], dsn, postmaster))
    await guarded("idle_named", idle(make, sizes["idle"], sizes["idle_seconds"], dsn, postmaster, named=True))
    return results


# ------------------------------------------------------------- implementations


def factory(impl: str, dsn: str) -> Factory:
    if impl == "inmemory":
        from fastapi_websockets import InMemoryChannelLayer

        shared = InMemoryChannelLayer(capacity=100_000)
        return lambda: _Shared(shared)
    from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer

    schema = "bench_" + uuid.uuid4().hex[:8]
    if impl == "0.1.0":
        return lambda: PostgreSQLChannelLayer(dsn=dsn, schema=schema)
    return lambda: PostgreSQLChannelLayer(dsn=dsn, schema=schema, capacity=100_000)


class _Shared:
    """One in-memory layer seen as several instances (they share nothing otherwise)."""

    def __init__(self, layer: Layer) -> None:
        self._layer = layer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)

    async def close(self) -> None:
        """The shared layer stays open for the next scenario."""


SIZES = {
    "ours": {
        "rounds": 1000,
        "count": 5000,
        "members": 1000,
        "messages": 20,
        "repeat": 3,
        "idle": 5000,
        "idle_seconds": 5.0,
        "limit": 20.0,
    },
    "0.1.0": {
        "rounds": 30,
        "count": 300,
        "members": 1000,
        "messages": 2,
        "repeat": 1,
        "idle": 5000,
        "idle_seconds": 5.0,
        "limit": 10.0,
    },
}


def worker(impl: str, dsn: str, postmaster: int | None, quick: bool) -> dict[str, Any]:
    sizes = dict(SIZES["0.1.0" if impl == "0.1.0" else "ours"])
    if quick:
        sizes.update(
            rounds=min(sizes["rounds"], 200),
            count=min(sizes["count"], 1000),
            messages=min(sizes["messages"], 5),
        )
    use_dsn = None if impl == "inmemory" else dsn
    return asyncio.run(run_all(factory(impl, dsn), sizes, use_dsn, postmaster))


# ------------------------------------------------------------------- reporting


def fmt(result: dict[str, Any], key: str, spec: str) -> str:
    if "timeout" in result:
        return "timeout"
    value = result.get(key)
    return "-" if value is None else format(value, spec)


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("ping-pong one-way p50 (ms)", "ping", "p50_ms", ".3f"),
        ("ping-pong one-way p99 (ms)", "ping", "p99_ms", ".3f"),
        ("point-to-point msgs/s (16 senders)", "throughput", "msgs_per_s", ",.0f"),
        ("fan-out to 1,000 receivers (deliveries/s)", "fanout", "deliveries_per_s", ",.0f"),
        ("5,000 idle receivers: connections held", "idle", "connections", "d"),
        ("5,000 idle receivers: client CPU s / 5 s", "idle", "cpu_s", ".3f"),
        ("5,000 idle receivers: server CPU s / 5 s", "idle", "server_cpu_s", ".3f"),
        ("5,000 idle named-channel receivers: connections", "idle_named", "connections", "d"),
        ("5,000 idle named-channel receivers: client CPU s / 5 s", "idle_named", "cpu_s", ".3f"),
        ("5,000 idle named-channel receivers: server CPU s / 5 s", "idle_named", "server_cpu_s", ".3f"),
    ]
    names = list(results)
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':{width}} | " + " | ".join(f"{name:>14}" for name in names)]
    lines.append("-" * len(lines[0]))
    for label, scenario, key, spec in rows:
        cells = [fmt(results[name].get(scenario, {}), key, spec) for name in names]
        lines.append(f"{label:{width}} | " + " | ".join(f"{cell:>14}" for cell in cells))
    notes = [
        f"{name} {scenario}: {result['timeout']}"
        for name in names
        for scenario, result in results[name].items()
        if isinstance(result, dict) and "timeout" in result
    ]
    if "0.1.0" in results:
        small = SIZES["0.1.0"]
        notes.append(
            f"0.1.0 ran smaller sizes ({small['rounds']} ping-pong rounds, {small['count']} messages, "
            f"{small['messages']} fan-out messages) because it polls"
        )
    notes.append("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if results.get("postgresql", {}).get("fanout", {}).get("deliveries_per_s") and results.get(
        "inmemory", {}
    ).get("fanout", {}).get("deliveries_per_s"):
        ratio = (
            results["postgresql"]["fanout"]["deliveries_per_s"]
            / results["inmemory"]["fanout"]["deliveries_per_s"]
        )
        notes.append(f"postgresql fan-out = {ratio:.0%} of in-memory in this run")
    return "\n".join([*lines, "", *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-010", action="store_true", help="do not run the 0.1.0 release")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="run PostgreSQL with fsync and synchronous_commit on (default: off, as in the tests)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--postmaster", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dsn, args.postmaster, args.quick)))
        return

    sys.path.insert(0, str(ROOT))
    from tests.servers.postgresql import PostgresServer

    server = PostgresServer(fsync=args.fsync)
    results: dict[str, dict[str, Any]] = {}
    try:
        server.start()
        assert server.process is not None
        postmaster = server.process.popen.pid
        for impl in ("inmemory", "postgresql"):
            print(f"running {impl} ...", file=sys.stderr, flush=True)
            results[impl] = worker(impl, server.dsn, postmaster, args.quick)
        python_010 = VENV_010 / "bin" / "python"
        if not args.skip_010 and python_010.exists():
            print("running 0.1.0 ...", file=sys.stderr, flush=True)
            command = [str(python_010), __file__, "--worker", "0.1.0", "--dsn", server.dsn]
            command += ["--postmaster", str(postmaster)] + (["--quick"] if args.quick else [])
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd="/")
            if done.returncode == 0:
                results["0.1.0"] = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                print(f"0.1.0 run failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        elif not args.skip_010:
            print(
                f"0.1.0 not measured: create {VENV_010} with `python3 -m venv bench/.venv-010 && "
                'bench/.venv-010/bin/pip install "fastapi-websockets[postgresql]==0.1.0"`',
                file=sys.stderr,
            )
    finally:
        server.destroy()
    print(table(results))
    print("server: fsync and synchronous_commit " + ("on" if args.fsync else "off (pass --fsync for on)"))


if __name__ == "__main__":
    main()
