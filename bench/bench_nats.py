"""NATS backend benchmark: point to point, fan-out, idle receivers; in-memory and 0.1.0 beside it.

Run from the repository root::

    .venv/bin/python bench/bench_nats.py [--quick] [--no-010]

It starts its own nats-server (JetStream, private temp dir, free ports) and
stops it at the end. The 0.1.0 release is measured when
``bench/.venv-010`` exists (``python -m venv bench/.venv-010 &&
bench/.venv-010/bin/pip install "fastapi-websockets[nats]==0.1.0"``); it runs
in a subprocess of that venv against the same server. Numbers are for this
machine and this run only; the table says what each column measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OLD_VENV_PYTHON = ROOT / "bench" / ".venv-010" / "bin" / "python"

FANOUT_RECEIVERS = 1000
IDLE_RECEIVERS = 5000
IDLE_SECONDS = 5.0


# ---------------------------------------------------------------- helpers


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def server_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def p2p(send_layer: Any, recv_layer: Any, count: int, pings: int) -> dict[str, float]:
    """Throughput of ``count`` sends to one channel, then ``pings`` one-at-a-time round trips."""
    channel = await recv_layer.new_channel("bench")
    await send_layer.send(channel, {"type": "warm"})
    await recv_layer.receive(channel, timeout=30)

    async def drain() -> None:
        for _ in range(count):
            await recv_layer.receive(channel, timeout=60)

    receiver = asyncio.create_task(drain())
    start = time.perf_counter()
    for i in range(count):
        await send_layer.send(channel, {"type": "p2p", "i": i, "body": "x" * 64})
    await receiver
    elapsed = time.perf_counter() - start
    latencies = []
    for i in range(pings):
        t0 = time.perf_counter()
        await send_layer.send(channel, {"type": "ping", "i": i})
        await recv_layer.receive(channel, timeout=30)
        latencies.append((time.perf_counter() - t0) * 1000)
    return {
        "p2p_msgs_s": count / elapsed,
        "p2p_p50_ms": percentile(latencies, 0.5),
        "p2p_p99_ms": percentile(latencies, 0.99),
    }


async def fanout_receivers(layer: Any, group: str, receivers: int, messages: int) -> tuple[Any, float]:
    """Join ``receivers`` channels to ``group`` and start one task per channel; return (gathered, ready)."""
    channels = [await layer.new_channel("ws") for _ in range(receivers)]
    for channel in channels:
        await layer.group_add(group, channel)

    async def consume(channel: str) -> float:
        last = 0.0
        for _ in range(messages):
            await layer.receive(channel, timeout=120)
            last = time.time()
        return last

    tasks = asyncio.gather(*(consume(channel) for channel in channels))
    await asyncio.sleep(0.2)
    return tasks, time.time()


async def fanout(send_layer: Any, recv_layer: Any, receivers: int, messages: int, runs: int = 5) -> float:
    """Deliveries per second of ``messages`` group_sends to ``receivers`` members in one process.

    The median of ``runs`` runs, each on a new group: the machine is shared, so
    single runs are noisy.
    """
    rates = []
    for _ in range(runs):
        group = "room-" + uuid.uuid4().hex[:6]
        tasks, _ = await fanout_receivers(recv_layer, group, receivers, messages)
        start = time.time()
        for i in range(messages):
            await send_layer.group_send(group, {"type": "fan", "i": i})
        ends = await tasks
        rates.append(receivers * messages / (max(ends) - start))
    return sorted(rates)[len(rates) // 2]


# ------------------------------------------------------------ our layers


def our_layer(url: str, namespace: str, **options: Any) -> Any:
    from fastapi_websockets.backends.nats import NATSChannelLayer

    return NATSChannelLayer(
        servers=[url], prefix=namespace, group_bucket=namespace, stream_name=namespace, **options
    )


def inmemory_layer(**options: Any) -> Any:
    from fastapi_websockets import InMemoryChannelLayer

    return InMemoryChannelLayer(**options)


async def fanout_two_processes(url: str, receivers: int, messages: int) -> float:
    """Two child processes with receivers/2 members each; this process sends."""
    namespace = "b" + uuid.uuid4().hex[:8]
    group = "room"
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--child-fanout",
            url,
            namespace,
            group,
            str(receivers // 2),
            str(messages),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        assert line.strip() == b"ready", line
    sender = our_layer(url, namespace)
    try:
        start = time.time()
        for i in range(messages):
            await sender.group_send(group, {"type": "fan", "i": i})
        ends = []
        for child in children:
            assert child.stdout is not None
            ends.append(float((await asyncio.wait_for(child.stdout.readline(), 120)).strip()))
            await child.wait()
    finally:
        await sender.close()
    return receivers // 2 * 2 * messages / (max(ends) - start)


async def child_fanout(url: str, namespace: str, group: str, receivers: int, messages: int) -> None:
    layer = our_layer(url, namespace, capacity=10_000)
    try:
        tasks, _ = await fanout_receivers(layer, group, receivers, messages)
        print("ready", flush=True)
        ends = await tasks
        print(repr(max(ends)), flush=True)
    finally:
        await layer.close()


async def idle(layer: Any, receivers: int, node: Any | None) -> dict[str, float]:
    """Hold ``receivers`` pending receive() calls; report broker resources and CPU while idle."""
    channels = [await layer.new_channel("ws") for _ in range(receivers)]
    waiting = [asyncio.create_task(layer.receive(channel)) for channel in channels]
    await asyncio.sleep(1.0)
    result: dict[str, float] = {}
    if node is not None:
        connz = node.monitor("/connz?subs=1&limit=4096")
        mine = [c for c in connz["connections"] if c.get("name", "").endswith(layer.client_token)]
        result["idle_connections"] = len(mine)
        result["idle_subscriptions"] = sum(c.get("subscriptions", 0) for c in mine)
        result["idle_consumers"] = node.monitor("/jsz").get("consumers", 0)
        server_before = server_cpu_seconds(node.proc.popen.pid)
    cpu_before = time.process_time()
    await asyncio.sleep(IDLE_SECONDS)
    result["idle_cpu_s"] = time.process_time() - cpu_before
    if node is not None:
        result["idle_server_cpu_s"] = server_cpu_seconds(node.proc.popen.pid) - server_before
        # The same receivers, all members of one group (as in a chat room).
        for start in range(0, receivers, 500):
            await asyncio.gather(
                *(layer.group_add("lobby", channel) for channel in channels[start : start + 500])
            )
        connz = node.monitor("/connz?subs=1&limit=4096")
        mine = [c for c in connz["connections"] if c.get("name", "").endswith(layer.client_token)]
        result["idle_group_subscriptions"] = sum(c.get("subscriptions", 0) for c in mine)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    return result


# --------------------------------------------------------------- the runs


async def run_ours(node: Any, quick: bool) -> dict[str, dict[str, float]]:
    count, pings, messages = (2000, 200, 5) if quick else (20000, 2000, 20)
    results: dict[str, dict[str, float]] = {"inmemory": {}, "nats": {}}

    layer = inmemory_layer(capacity=100_000)
    results["inmemory"].update(await p2p(layer, layer, count, pings))
    results["inmemory"]["fanout_1p"] = await fanout(layer, layer, FANOUT_RECEIVERS, messages)
    results["inmemory"].update(await idle(layer, IDLE_RECEIVERS, None))
    await layer.close()

    namespace = "b" + uuid.uuid4().hex[:8]
    a = our_layer(node.url, namespace, capacity=100_000)
    b = our_layer(node.url, namespace, capacity=100_000)
    try:
        results["nats"].update(await p2p(a, b, count, pings))
        results["nats"]["fanout_1p"] = await fanout(a, b, FANOUT_RECEIVERS, messages)
    finally:
        await a.close()
        await b.close()
    results["nats"]["fanout_2p"] = await fanout_two_processes(node.url, FANOUT_RECEIVERS, messages)
    layer = our_layer(node.url, "b" + uuid.uuid4().hex[:8])
    try:
        results["nats"].update(await idle(layer, IDLE_RECEIVERS, node))
    finally:
        await layer.close()
    return results


def run_old(node: Any, quick: bool) -> dict[str, float]:
    """Drive 0.1.0 in its own venv; idle resources are read here from the server."""
    count, pings, messages, receivers, idle_receivers = (
        (300, 50, 2, 200, 200) if quick else (2000, 300, 3, FANOUT_RECEIVERS, 1000)
    )
    with subprocess.Popen(
        [
            str(OLD_VENV_PYTHON),
            __file__,
            "--child-old",
            node.url,
            json.dumps([count, pings, messages, receivers, idle_receivers]),
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        cwd=str(ROOT / "bench"),  # keep the working tree's package off its path
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        results: dict[str, float] = {}
        for line in child.stdout:
            if line.startswith("idle-start"):
                consumers_before = node.monitor("/jsz").get("consumers", 0)
            elif line.startswith("idle-ready"):
                connz = node.monitor("/connz?subs=1&limit=4096")
                results["idle_connections"] = connz["num_connections"]
                results["idle_subscriptions"] = sum(c.get("subscriptions", 0) for c in connz["connections"])
                jsz = node.monitor("/jsz")
                results["idle_consumers"] = jsz.get("consumers", 0) - consumers_before
                before = server_cpu_seconds(node.proc.popen.pid)
                child.stdin.write("go\n")
                child.stdin.flush()
            elif line.startswith("idle-done"):
                results["idle_server_cpu_s"] = server_cpu_seconds(node.proc.popen.pid) - before
                child.stdin.write("go\n")
                child.stdin.flush()
            elif line.startswith("{"):
                results.update(json.loads(line))
        child.wait()
    results["receivers_note"] = receivers
    results["idle_receivers_note"] = idle_receivers
    return results  # may hold "errors": what 0.1.0 failed at


async def child_old(url: str, params: str) -> None:
    """Runs in bench/.venv-010 with fastapi-websockets 0.1.0 installed; prints one JSON line."""
    from fastapi_websockets.backends.nats import NATSChannelLayer  # the 0.1.0 one

    count, pings, messages, receivers, idle_receivers = json.loads(params)

    def make(namespace: str) -> Any:
        return NATSChannelLayer(
            servers=[url], prefix=namespace, group_bucket=namespace, stream_name=namespace
        )

    out: dict[str, Any] = {"errors": []}

    async def close_quietly(layer: Any) -> None:
        try:
            await asyncio.wait_for(layer.close(), 30)
        except Exception as exc:  # 0.1.0's own failures are reported, not fixed
            out["errors"].append(f"close: {exc!r}"[:160])

    # Each phase on its own stream, so that one phase's consumers do not count in the next.
    namespace = "o" + uuid.uuid4().hex[:8]
    a, b = make(namespace), make(namespace)
    try:
        # 0.1.0 creates its client without a lock: connect once before going concurrent.
        await a.send("warm", {"type": "x"})
        await b.receive("warm", timeout=30)
        out.update(await p2p(a, b, count, pings))
    except Exception as exc:
        out["errors"].append(f"point-to-point: {exc!r}"[:160])
    await close_quietly(a)
    await close_quietly(b)

    for size in (receivers, 100):
        namespace = "o" + uuid.uuid4().hex[:8]
        a, b = make(namespace), make(namespace)
        try:
            await a.send("warm", {"type": "x"})
            await b.receive("warm", timeout=30)
            out["fanout_1p"] = await fanout(a, b, size, messages, runs=1)
            out["fanout_receivers"] = size
        except Exception as exc:
            out["errors"].append(f"fan-out to {size} receivers: {type(exc).__name__}: {exc}"[:160])
        await close_quietly(a)
        await close_quietly(b)
        if "fanout_1p" in out:
            break

    layer = make("o" + uuid.uuid4().hex[:8])
    waiting: list[asyncio.Task[Any]] = []
    try:
        await layer.send("warm", {"type": "x"})
        print("idle-start", flush=True)
        await asyncio.sleep(0.5)
        channels = [await layer.new_channel("ws") for _ in range(idle_receivers)]
        waiting = [asyncio.create_task(layer.receive(channel)) for channel in channels]
        await asyncio.sleep(3.0)
        failed = [t for t in waiting if t.done() and t.exception() is not None]
        if failed:
            out["errors"].append(f"idle: {len(failed)} receivers failed: {failed[0].exception()!r}"[:160])
        loop = asyncio.get_running_loop()
        print("idle-ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        cpu_before = time.process_time()
        await asyncio.sleep(IDLE_SECONDS)
        out["idle_cpu_s"] = time.process_time() - cpu_before
        print("idle-done", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    except Exception as exc:
        out["errors"].append(f"idle: {exc!r}"[:160])
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await close_quietly(layer)
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------ table


ROWS = [
    ("p2p_msgs_s", "point-to-point msgs/s (1 sender, 1 channel)", "{:,.0f}"),
    ("p2p_p50_ms", "point-to-point latency p50 ms", "{:.3f}"),
    ("p2p_p99_ms", "point-to-point latency p99 ms", "{:.3f}"),
    ("fanout_1p", "fan-out deliveries/s, 1,000 receivers, 1 process", "{:,.0f}"),
    ("fanout_2p", "fan-out deliveries/s, 1,000 receivers, 2 processes", "{:,.0f}"),
    ("idle_connections", "idle: broker connections held", "{:.0f}"),
    ("idle_subscriptions", "idle: subscriptions held", "{:.0f}"),
    ("idle_group_subscriptions", "idle: subscriptions, all receivers in one group", "{:.0f}"),
    ("idle_consumers", "idle: JetStream consumers on the server", "{:.0f}"),
    ("idle_cpu_s", f"idle: client CPU s over {IDLE_SECONDS:.0f} s", "{:.3f}"),
    ("idle_server_cpu_s", f"idle: nats-server CPU s over {IDLE_SECONDS:.0f} s", "{:.3f}"),
]


def print_table(columns: dict[str, dict[str, Any]], notes: list[str]) -> None:
    names = list(columns)
    width = max(len(label) for _, label, _ in ROWS)
    print()
    print(f"| {'metric':<{width}} | " + " | ".join(f"{name:>14}" for name in names) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 16 for _ in names) + "|")
    for key, label, fmt in ROWS:
        cells = []
        for name in names:
            value = columns[name].get(key)
            cells.append(f"{fmt.format(value) if isinstance(value, (int, float)) else 'n/a':>14}")
        print(f"| {label:<{width}} | " + " | ".join(cells) + " |")
    for note in notes:
        print(f"  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--no-010", action="store_true", help="skip the 0.1.0 release")
    parser.add_argument("--child-fanout", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--child-old", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_old:
        asyncio.run(child_old(*args.child_old))
        return
    sys.path.insert(0, str(ROOT))
    if args.child_fanout:
        url, namespace, group, receivers, messages = args.child_fanout
        asyncio.run(child_fanout(url, namespace, group, int(receivers), int(messages)))
        return

    from tests.servers.nats import NatsNode, nats_server_binary

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fw-bench-nats-") as tmp:
        node = NatsNode(Path(tmp))
        node.start()
        try:
            version = subprocess.run(
                [nats_server_binary(), "--version"], capture_output=True, text=True, check=True
            ).stdout.strip()
            print(f"server: {version}; python {sys.version.split()[0]}", flush=True)
            columns: dict[str, dict[str, Any]] = dict(asyncio.run(run_ours(node, args.quick)))
            notes = [
                f"idle: {IDLE_RECEIVERS:,} pending receive() on process-specific channels of one layer",
                "fan-out: sender and receivers in different layers (separate connections)",
            ]
            if not args.no_010 and OLD_VENV_PYTHON.exists():
                old = run_old(node, args.quick)
                columns["nats 0.1.0"] = old
                old.pop("receivers_note")
                notes.append(
                    f"0.1.0: fan-out to {old.pop('fanout_receivers', 0):.0f} receivers, idle with "
                    f"{old.pop('idle_receivers_note'):.0f} receivers (one durable consumer each), "
                    "2-process fan-out not run"
                )
                notes.extend(f"0.1.0 failed: {error}" for error in old.pop("errors", []))
            elif not args.no_010:
                notes.append("0.1.0 not measured: bench/.venv-010 is missing (see the module docstring)")
            nats_fan = columns["nats"]["fanout_1p"]
            memory_fan = columns["inmemory"]["fanout_1p"]
            notes.append(f"fan-out 1 process, nats / in-memory: {nats_fan / memory_fan:.0%}")
        finally:
            node.stop()
    print_table(columns, notes)
    print(f"  total run time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
