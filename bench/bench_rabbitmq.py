"""RabbitMQ backend benchmark: ``.venv/bin/python bench/bench_rabbitmq.py``.

Starts its own private rabbitmq-server node, then measures on it, in one run:

* point to point: msgs/s (50 sends in flight) and p50/p99 round-trip latency
  to a process-specific channel and to a named channel;
* fan-out: one ``group_send`` reaching 1,000 waiting receivers in one process,
  and 2 x 500 in two processes (deliveries/s);
* idle: 5,000 receivers waiting (each in a group): broker queues, consumers
  and connections held, and CPU seconds of the app and of the broker over an
  idle window;

for this backend, for the in-memory layer (the baseline) and, when
``bench/.venv-010`` holds ``fastapi-websockets==0.1.0``, for the 0.1.0 release
(driven in a subprocess; smaller sizes, because it declares one quorum queue
per receiver). Prints a table. A full run takes about two minutes.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_010 = ROOT / "bench" / ".venv-010" / "bin" / "python"
IDLE_SECONDS = 5.0

Make = Callable[[], Any]


# --------------------------------------------------------------- scenarios


async def point_to_point(
    make: Make, *, shared: bool, named: bool, n: int, inflight: int = 50
) -> dict[str, Any]:
    a = make()
    b = make() if shared else a
    channel = "bench.named" if named else await b.new_channel("bench")
    await a.send(channel, {"type": "warm"})
    await b.receive(channel, timeout=30)

    async def drain() -> None:
        for _ in range(n):
            await b.receive(channel, timeout=60)

    reader = asyncio.create_task(drain())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    for first in range(0, n, inflight):
        await asyncio.gather(
            *(a.send(channel, {"type": "m", "i": i}) for i in range(first, min(first + inflight, n)))
        )
    await reader
    rate = n / (time.perf_counter() - start)

    latencies = []
    for i in range(min(n, 300)):
        sent = time.perf_counter()
        await a.send(channel, {"type": "ping", "i": i})
        await b.receive(channel, timeout=30)
        latencies.append((time.perf_counter() - sent) * 1000)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    for layer in {a, b}:
        await layer.close()
    return {"msgs_s": rate, "p50_ms": statistics.median(latencies), "p99_ms": p99}


class Counter:
    """Deliveries so far, with a wake-up when a target is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.reached = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()

    async def wait_for(self, target: int) -> None:
        self.target = target
        self.reached.clear()
        if self.count < target:
            await self.reached.wait()


async def join_and_wait(
    layer: Any, receivers: int, messages: int, counter: Counter | None = None
) -> tuple[list[asyncio.Task[None]], list[str]]:
    channels = [await layer.new_channel("fan") for _ in range(receivers)]
    for channel in channels:
        await layer.group_add("fanout", channel)

    async def receive_all(channel: str) -> None:
        for _ in range(messages):
            await layer.receive(channel, timeout=120)
            if counter is not None:
                counter.hit()

    return [asyncio.create_task(receive_all(channel)) for channel in channels], channels


async def fan_out(make: Make, *, shared: bool, receivers: int, messages: int) -> dict[str, Any]:
    """Two patterns, each ``messages`` group_sends to ``receivers`` waiting receivers.

    rounds: each group_send waits until every receiver has the message (room
    events spaced in time: every message wakes every receiver).
    burst: the group_sends back to back (the in-memory layer then hands each
    receiver all of them in one wake-up).
    """
    a = make()
    b = make() if shared else a
    counter = Counter()
    tasks, _ = await join_and_wait(b, receivers, 2 * messages, counter)
    await asyncio.sleep(0.3)
    start = time.perf_counter()
    for i in range(messages):
        await a.group_send("fanout", {"type": "fan", "i": i})
        await counter.wait_for(receivers * (i + 1))
    rounds = receivers * messages / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(messages):
        await a.group_send("fanout", {"type": "fan", "i": i})
    await asyncio.gather(*tasks)
    burst = receivers * messages / (time.perf_counter() - start)
    for layer in {a, b}:
        await layer.close()
    return {"rounds_s": rounds, "burst_s": burst, "receivers": receivers}


async def idle(make: Make, *, receivers: int, report: Callable[[], None] | None = None) -> dict[str, Any]:
    layer = make()
    tasks, _ = await join_and_wait(layer, receivers, 1)
    await asyncio.sleep(0.5)
    if report is not None:
        report()
    cpu = time.process_time()
    await asyncio.sleep(IDLE_SECONDS)
    cpu = time.process_time() - cpu
    alive = sum(1 for task in tasks if not task.done())
    result = {"receivers": receivers, "alive": alive, "app_cpu_pct": 100 * cpu / IDLE_SECONDS}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result | {"layer": layer}


def best(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Per-field maximum of two fan-out results."""
    if old is None:
        return new
    return {key: max(old[key], new[key]) for key in new}


# ---------------------------------------------------------- broker helpers


def beam_cpu(node: Any) -> float:
    pid = (node.workdir / "rabbit.pid").read_text().strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_counts(node: Any, prefix: str) -> dict[str, int]:
    queues = [row for row in node.rows("list_queues", "name") if row[0].startswith(prefix)]
    consumers = [row for row in node.rows("list_consumers", "queue_name") if row[0].startswith(prefix)]
    connections = node.rows("list_connections", "name")
    return {"queues": len(queues), "consumers": len(consumers), "connections": len(connections)}


async def idle_on_broker(node: Any, make: Make, prefix: str, receivers: int) -> dict[str, Any]:
    before = len(node.rows("list_connections", "name"))
    beam = beam_cpu(node)
    result = await idle(make, receivers=receivers)
    beam = beam_cpu(node) - beam
    counts = await asyncio.to_thread(broker_counts, node, prefix)
    await result.pop("layer").close()
    counts["connections"] -= before
    return result | counts | {"broker_cpu_pct": 100 * beam / IDLE_SECONDS}


# --------------------------------------------------------------- workers


def ours(url: str, namespace: str) -> Make:
    from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer

    return lambda: RabbitMQChannelLayer(
        url=url, exchange_name=f"bench-{namespace}", queue_prefix=f"bench-{namespace}", capacity=100_000
    )


async def fanout_worker(url: str, namespace: str, receivers: int, messages: int) -> None:
    """One of the two receiving processes of the two-process fan-out."""
    layer = ours(url, namespace)()
    tasks, _ = await join_and_wait(layer, receivers, messages)
    print("READY", flush=True)
    await asyncio.gather(*tasks)
    print(json.dumps({"end": time.time()}), flush=True)
    await layer.close()


async def worker_010(url: str) -> None:
    """Run the scenarios against the 0.1.0 release (in its own venv); print JSON lines."""
    from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer  # 0.1.0

    namespace = uuid.uuid4().hex[:8]

    def make() -> Any:
        return RabbitMQChannelLayer(
            url=url, exchange_name=f"old-{namespace}", queue_prefix=f"old-{namespace}"
        )

    async def attempt(name: str, coro: Any) -> None:
        try:
            result = await asyncio.wait_for(coro, 30)
        except Exception as exc:  # report whatever 0.1.0 does, then go on
            result = {"error": f"{type(exc).__name__}: {str(exc) or 'no result within 30 s'}"[:100]}
        print(json.dumps({name: result}), flush=True)

    await attempt("p2p", point_to_point(make, shared=True, named=False, n=300))
    await attempt("fanout1", fan_out(make, shared=True, receivers=100, messages=5))

    async def idle_010() -> dict[str, Any]:
        result = await idle(make, receivers=200, report=lambda: print("IDLE", f"old-{namespace}", flush=True))
        layer = result.pop("layer")
        await asyncio.wait_for(layer.close(), 30)
        return result

    await attempt("idle", idle_010())


# ------------------------------------------------------------------ main


async def two_process_fanout(url: str, receivers: int, messages: int) -> dict[str, Any]:
    namespace = uuid.uuid4().hex[:8]
    per = receivers // 2
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--fanout-worker",
            url,
            namespace,
            str(per),
            str(messages),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            assert line.strip() == b"READY", line
        sender = ours(url, namespace)()
        await asyncio.sleep(0.3)
        start = time.time()
        for i in range(messages):
            await sender.group_send("fanout", {"type": "fan", "i": i})
        ends = []
        for proc in procs:
            assert proc.stdout is not None
            ends.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 120))["end"])
        await sender.close()
    finally:
        for proc in procs:
            if proc.returncode is None:
                await asyncio.wait_for(proc.wait(), 30)
    return {"burst_s": per * 2 * messages / (max(ends) - start), "receivers": per * 2}


def run_010(node: Any) -> dict[str, Any]:
    if not VENV_010.exists():
        return {}
    proc = subprocess.Popen(
        [str(VENV_010), __file__, "--worker-010", node.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd="/",
    )
    results: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("IDLE "):
            # Our own layers are closed by now: every connection is 0.1.0's.
            beam = beam_cpu(node)
            time.sleep(3.0)
            beam = beam_cpu(node) - beam
            results["idle_counts"] = broker_counts(node, line.split()[1]) | {
                "broker_cpu_pct": 100 * beam / 3.0
            }
            continue
        results.update(json.loads(line))
    proc.wait(timeout=120)
    return results


async def main() -> None:
    sys.path.insert(0, str(ROOT))
    from fastapi_websockets import InMemoryChannelLayer
    from tests.servers.rabbitmq import RabbitNode

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fw-bench-rabbitmq-") as tmp:
        node = RabbitNode(Path(tmp))
        try:
            node.start()
            url = node.url

            def memory() -> Any:
                return InMemoryChannelLayer(capacity=100_000)

            ns = uuid.uuid4().hex[:8]
            make = ours(url, ns)
            rows: dict[str, dict[str, Any]] = {"in-memory": {}, "rabbitmq (this)": {}, "rabbitmq 0.1.0": {}}
            mem, new, old = rows["in-memory"], rows["rabbitmq (this)"], rows["rabbitmq 0.1.0"]

            mem["p2p"] = await point_to_point(memory, shared=False, named=False, n=5000)
            mem["named"] = await point_to_point(memory, shared=False, named=True, n=5000)
            new["p2p"] = await point_to_point(make, shared=True, named=False, n=5000)
            new["named"] = await point_to_point(make, shared=True, named=True, n=2000)
            # Best of three, alternating, to damp the noise of a shared machine.
            for _ in range(3):
                mem["fan1"] = best(
                    mem.get("fan1"), await fan_out(memory, shared=False, receivers=1000, messages=20)
                )
                new["fan1"] = best(
                    new.get("fan1"), await fan_out(make, shared=True, receivers=1000, messages=20)
                )
            new["fan2"] = await two_process_fanout(url, 1000, 20)
            mem_idle = await idle(memory, receivers=5000)
            await mem_idle.pop("layer").close()
            mem["idle"] = mem_idle
            idle_ns = uuid.uuid4().hex[:8]
            new["idle"] = await idle_on_broker(node, ours(url, idle_ns), f"bench-{idle_ns}", 5000)

            old_raw = await asyncio.to_thread(run_010, node)
            if old_raw:
                old["p2p"] = old_raw.get("p2p", {})
                old["fan1"] = old_raw.get("fanout1", {})
                old["idle"] = old_raw.get("idle", {}) | old_raw.get("idle_counts", {})
        finally:
            node.close()

    print()
    print(f"RabbitMQ backend benchmark (private node on loopback), {time.monotonic() - started:.0f} s")
    print(table(rows))


METRICS: list[tuple[str, str, str, str]] = [
    # (label, scenario, field, format)
    ("p2p msgs/s (50 in flight)", "p2p", "msgs_s", ",.0f"),
    ("p2p latency p50 ms", "p2p", "p50_ms", ".2f"),
    ("p2p latency p99 ms", "p2p", "p99_ms", ".2f"),
    ("named channel msgs/s", "named", "msgs_s", ",.0f"),
    ("named latency p50 ms", "named", "p50_ms", ".2f"),
    ("fan-out 1 proc, rounds, deliveries/s (best of 3)", "fan1", "rounds_s", ",.0f"),
    ("fan-out 1 proc, burst, deliveries/s (best of 3)", "fan1", "burst_s", ",.0f"),
    ("fan-out receivers", "fan1", "receivers", ",d"),
    ("fan-out 2 procs, burst, deliveries/s", "fan2", "burst_s", ",.0f"),
    ("idle receivers", "idle", "receivers", ",d"),
    ("idle receivers still waiting", "idle", "alive", ",d"),
    ("  broker queues held", "idle", "queues", ",d"),
    ("  broker consumers held", "idle", "consumers", ",d"),
    ("  broker connections held", "idle", "connections", ",d"),
    ("  app CPU % while idle", "idle", "app_cpu_pct", ".1f"),
    ("  broker CPU % while idle", "idle", "broker_cpu_pct", ".1f"),
]


def table(rows: dict[str, dict[str, Any]]) -> str:
    names = list(rows)
    width = max(len(label) for label, *_ in METRICS)
    lines = [f"{'':<{width}}  " + "  ".join(f"{name:>16}" for name in names)]
    lines.append("-" * len(lines[0]))
    for label, scenario, key, spec in METRICS:
        cells = []
        for name in names:
            result = rows[name].get(scenario, {})
            value = result.get(key)
            if value is None and "error" in result:
                cells.append("error")
            elif value is None:
                cells.append("-")
            else:
                cells.append(format(value, spec))
        lines.append(f"{label:<{width}}  " + "  ".join(f"{cell:>16}" for cell in cells))
    for name in names:
        for scenario, result in rows[name].items():
            if "error" in result:
                lines.append(f"{name} {scenario}: {result['error']}")
    mem, new = rows.get("in-memory", {}), rows.get("rabbitmq (this)", {})
    if mem.get("fan1") and new.get("fan1"):
        for key in ("rounds_s", "burst_s"):
            ratio = new["fan1"][key] / mem["fan1"][key]
            lines.append(f"fan-out 1 proc {key[:-2]} vs in-memory: {ratio:.0%}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fanout-worker", nargs=4, metavar=("URL", "NS", "RECEIVERS", "MESSAGES"))
    parser.add_argument("--worker-010", metavar="URL")
    args = parser.parse_args()
    if args.fanout_worker:
        sys.path.insert(0, str(ROOT))
        url, namespace, receivers, messages = args.fanout_worker
        asyncio.run(fanout_worker(url, namespace, int(receivers), int(messages)))
    elif args.worker_010:
        asyncio.run(worker_010(args.worker_010))
    else:
        asyncio.run(main())
