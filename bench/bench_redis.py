"""Benchmark of the Redis backend against its baseline, its ceiling and channels_redis.

Run from the repository root::

    .venv/bin/python bench/bench_redis.py [--idle-seconds 10]

It starts its own redis-server (persistence off, loopback, free port), runs
every measurement in a fresh worker process and prints one table:

* point-to-point: messages/s with 50 concurrent senders in one layer instance
  and one receiver in another, and latency p50/p99 of one message at a time;
* fan-out: one ``group_send`` to 1,000 receivers, deliveries/s (receivers divided
  by the median time from ``group_send`` to the last delivery of a round) and p99
  latency, with the receivers in one process and split over two processes
  (the sender is a separate layer instance, so messages cross Redis; the
  in-memory layer can only send to itself);
* idle: 5,000 pending ``receive()`` calls: Redis connections the process
  holds, CPU seconds it uses in the idle window, and its RSS.

Rows: the in-memory layer (baseline: local delivery only), our Redis layer with
and without pub/sub wake-ups, raw redis-py (RPUSH pipelined, BLPOP on one
connection: the ceiling for point-to-point), and channels_redis 4.3 core and
PubSub layers if ``bench/.venv-channels`` exists (create it with
``python3 -m venv bench/.venv-channels && bench/.venv-channels/bin/pip install
"channels_redis==4.3.*"``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUR_PYTHON = ROOT / ".venv" / "bin" / "python"
CHANNELS_PYTHON = ROOT / "bench" / ".venv-channels" / "bin" / "python"

IMPLS = [
    "inmemory",
    "ours-pubsub",
    "ours-nopubsub",
    "raw-redis-py",
    "channels_redis-core",
    "channels_redis-pubsub",
]
P2P_MESSAGES = 10_000
P2P_SENDERS = 50
LATENCY_SAMPLES = 300
FANOUT_RECEIVERS = 1_000
FANOUT_ROUNDS = 20
IDLE_RECEIVERS = 5_000


# =================================================================== workers


def _make_layer(impl: str, url: str, **options: Any) -> Any:
    if impl == "inmemory":
        from fastapi_websockets import InMemoryChannelLayer

        return InMemoryChannelLayer(**options)
    if impl.startswith("ours"):
        from fastapi_websockets.backends.redis import RedisChannelLayer

        return RedisChannelLayer(url=url, prefix="bench", use_pubsub=impl == "ours-pubsub", **options)
    if impl == "channels_redis-core":
        from channels_redis.core import RedisChannelLayer as CoreLayer

        return CoreLayer(hosts=[url], **options)
    if impl == "channels_redis-pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(hosts=[url])
    raise ValueError(impl)


async def _close(layer: Any) -> None:
    if hasattr(layer, "close_pools"):
        await layer.close_pools()
    elif type(layer).__name__ == "RedisPubSubChannelLayer":
        await layer.flush()
    else:
        await layer.close()


def _pair(impl: str, url: str, **options: Any) -> tuple[Any, Any]:
    """A sender and a receiver layer; in-memory has to be one instance."""
    receiver = _make_layer(impl, url, **options)
    sender = receiver if impl == "inmemory" else _make_layer(impl, url, **options)
    return sender, receiver


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct))]


async def _p2p_raw(url: str) -> dict[str, float]:
    import redis.asyncio as redis_asyncio

    sender = redis_asyncio.Redis.from_url(url)
    receiver = redis_asyncio.Redis.from_url(url)
    key = "bench:raw"
    await sender.delete(key)
    payload = b"x" * 40

    async def receive_all(count: int) -> None:
        for _ in range(count):
            await receiver.blpop([key], timeout=10)

    start = time.perf_counter()
    reader = asyncio.create_task(receive_all(P2P_MESSAGES))
    for offset in range(0, P2P_MESSAGES, 100):
        pipe = sender.pipeline(transaction=False)
        for _ in range(min(100, P2P_MESSAGES - offset)):
            pipe.rpush(key, payload)
        await pipe.execute()
    await reader
    rate = P2P_MESSAGES / (time.perf_counter() - start)
    latencies = []
    for _ in range(LATENCY_SAMPLES):
        began = time.perf_counter()
        await sender.rpush(key, payload)
        await receiver.blpop([key], timeout=10)
        latencies.append(time.perf_counter() - began)
    await sender.aclose()
    await receiver.aclose()
    return {"rate": rate, "p50": _percentile(latencies, 0.5), "p99": _percentile(latencies, 0.99)}


async def bench_p2p(impl: str, url: str) -> dict[str, float]:
    if impl == "raw-redis-py":
        return await _p2p_raw(url)
    sender, receiver = _pair(impl, url, capacity=P2P_MESSAGES * 2)
    channel = await receiver.new_channel()
    message = {"type": "bench.message", "text": "x" * 20}

    async def send_many(count: int) -> None:
        for _ in range(count):
            await sender.send(channel, message)

    async def receive_all(count: int) -> None:
        for _ in range(count):
            await receiver.receive(channel)

    await sender.send(channel, message)  # connect both sides first
    await receiver.receive(channel)
    start = time.perf_counter()
    reader = asyncio.create_task(receive_all(P2P_MESSAGES))
    await asyncio.gather(*(send_many(P2P_MESSAGES // P2P_SENDERS) for _ in range(P2P_SENDERS)))
    await asyncio.wait_for(reader, 120)
    rate = P2P_MESSAGES / (time.perf_counter() - start)
    latencies = []
    for _ in range(LATENCY_SAMPLES):
        began = time.perf_counter()
        await sender.send(channel, message)
        await receiver.receive(channel)
        latencies.append(time.perf_counter() - began)
    for layer in {id(sender): sender, id(receiver): receiver}.values():
        await _close(layer)
    return {"rate": rate, "p50": _percentile(latencies, 0.5), "p99": _percentile(latencies, 0.99)}


async def _fanout_receivers(layer: Any, count: int, rounds: int) -> tuple[list[Any], list[list[float]]]:
    channels = [await layer.new_channel() for _ in range(count)]
    for channel in channels:
        await layer.group_add("bench-room", channel)
    arrivals: list[list[float]] = [[] for _ in range(rounds)]

    async def listen(channel: str) -> None:
        for _ in range(rounds):
            message = await layer.receive(channel)
            arrivals[message["round"]].append(time.time() - message["sent"])

    tasks = [asyncio.create_task(listen(channel)) for channel in channels]
    return tasks, arrivals


def _fanout_result(arrivals: list[list[float]], expected: int) -> dict[str, float]:
    delivered = sum(len(r) for r in arrivals)
    durations = [max(r) for r in arrivals if r]
    latencies = [value for r in arrivals for value in r]
    return {
        # Median round: the machine is shared, and one descheduled round should not decide.
        "rate": expected / len(arrivals) / statistics.median(durations) if durations else 0.0,
        "p99": _percentile(latencies, 0.99) if latencies else float("nan"),
        "lost": expected - delivered,
        "rounds_ms": [round(d * 1000, 1) for d in durations],
    }


async def bench_fanout(impl: str, url: str) -> dict[str, float]:
    sender, receiver = _pair(impl, url)
    tasks, arrivals = await _fanout_receivers(receiver, FANOUT_RECEIVERS, FANOUT_ROUNDS)
    await sender.group_send("bench-warmup", {"type": "warmup"})  # connect before measuring
    await asyncio.sleep(0.5)
    for index in range(FANOUT_ROUNDS):
        await sender.group_send("bench-room", {"type": "bench.fan", "round": index, "sent": time.time()})
        await asyncio.sleep(0.1)
    await asyncio.wait(tasks, timeout=30)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for layer in {id(sender): sender, id(receiver): receiver}.values():
        await _close(layer)
    return _fanout_result(arrivals, FANOUT_ROUNDS * FANOUT_RECEIVERS)


async def bench_fanout_receiver_process(impl: str, url: str, count: int) -> dict[str, Any]:
    layer = _make_layer(impl, url)
    tasks, arrivals = await _fanout_receivers(layer, count, FANOUT_ROUNDS)
    print("READY", flush=True)
    await asyncio.wait(tasks, timeout=60)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _close(layer)
    return {"arrivals": arrivals}


async def bench_fanout_two_processes(impl: str, url: str) -> dict[str, float]:
    half = FANOUT_RECEIVERS // 2
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
            [sys.executable, __file__, "--worker", impl, "fanout-part", "--url", url, "--count", str(half)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.strip() != "READY":
            raise RuntimeError(f"receiver process did not start: {line!r}")
    sender = _make_layer(impl, url)
    await sender.group_send("bench-warmup", {"type": "warmup"})  # connect before measuring
    await asyncio.sleep(0.5)
    for index in range(FANOUT_ROUNDS):
        await sender.group_send("bench-room", {"type": "bench.fan", "round": index, "sent": time.time()})
        await asyncio.sleep(0.2)
    merged: list[list[float]] = [[] for _ in range(FANOUT_ROUNDS)]
    for proc in procs:
        out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
        for index, values in enumerate(json.loads(out.strip().splitlines()[-1])["arrivals"]):
            merged[index].extend(values)
    await _close(sender)
    return _fanout_result(merged, FANOUT_ROUNDS * FANOUT_RECEIVERS)


def _redis_sockets(port: int) -> int:
    """Established TCP connections of this process to ``port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def bench_idle(impl: str, url: str, seconds: float) -> dict[str, float]:
    layer = _make_layer(impl, url)
    channels = [await layer.new_channel() for _ in range(IDLE_RECEIVERS)]
    tasks = [asyncio.create_task(layer.receive(channel)) for channel in channels]
    await asyncio.sleep(2)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(seconds)
    after = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "connections": _redis_sockets(port),
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "rss": _rss_mb(),
    }
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _close(layer)
    return result


def worker_main(args: argparse.Namespace) -> None:
    impl, scenario = args.worker
    if scenario == "p2p":
        result: Any = asyncio.run(bench_p2p(impl, args.url))
    elif scenario == "fanout":
        result = asyncio.run(bench_fanout(impl, args.url))
    elif scenario == "fanout2":
        result = asyncio.run(bench_fanout_two_processes(impl, args.url))
    elif scenario == "fanout-part":
        result = asyncio.run(bench_fanout_receiver_process(impl, args.url, args.count))
    elif scenario == "idle":
        result = asyncio.run(bench_idle(impl, args.url, args.idle_seconds))
    else:
        raise ValueError(scenario)
    print(json.dumps(result), flush=True)


# ====================================================================== main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    FLAGS = ("--save", "", "--appendonly", "no", "--maxclients", "20000")

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="fw-bench-redis-")
        self.port = _free_port()
        self.log = open(os.path.join(self.dir, "redis.log"), "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, *self.FLAGS],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        self.stop()
        raise SystemExit("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _python_for(impl: str) -> Path:
    return CHANNELS_PYTHON if impl.startswith("channels_redis") else OUR_PYTHON


def _run(impl: str, scenario: str, url: str, idle_seconds: float) -> dict[str, Any] | None:
    command = [str(_python_for(impl)), __file__, "--worker", impl, scenario, "--url", url]
    command += ["--idle-seconds", str(idle_seconds)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        print(f"  {impl} {scenario} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.2f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SCENARIO"))
    parser.add_argument("--url")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    impls = [i for i in IMPLS if not i.startswith("channels_redis") or CHANNELS_PYTHON.exists()]
    if len(impls) < len(IMPLS):
        print("(bench/.venv-channels is missing: channels_redis rows skipped)")
    server = Server()
    started = time.monotonic()
    rows: dict[str, dict[str, Any]] = {impl: {} for impl in impls}
    try:
        # The idle measurements only wait, so they run side by side.
        idle_impls = [i for i in impls if i != "raw-redis-py"]
        with_idle = [
            (
                impl,
                subprocess.Popen(
                    [
                        str(_python_for(impl)),
                        __file__,
                        "--worker",
                        impl,
                        "idle",
                        "--url",
                        server.url,
                        "--idle-seconds",
                        str(args.idle_seconds),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=dict(os.environ, PYTHONPATH=str(ROOT)),
                ),
            )
            for impl in idle_impls
        ]
        for impl, proc in with_idle:
            out, err = proc.communicate(timeout=300)
            if proc.returncode == 0:
                rows[impl]["idle"] = json.loads(out.strip().splitlines()[-1])
            else:
                print(f"  {impl} idle failed:\n{err[-2000:]}", file=sys.stderr)
        for scenario in ("p2p", "fanout", "fanout2"):
            for impl in impls:
                if impl == "raw-redis-py" and scenario != "p2p":
                    continue
                if impl == "inmemory" and scenario == "fanout2":
                    continue
                print(f"  running {scenario} on {impl}", file=sys.stderr)
                rows[impl][scenario] = _run(impl, scenario, server.url, args.idle_seconds)
    finally:
        server.stop()

    header = (
        f"{'implementation':<22} {'p2p msg/s':>10} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'fan-out 1 proc/s':>16} {'p99 ms':>7} | {'fan-out 2 procs/s':>17} {'p99 ms':>7} | "
        f"{'idle conns':>10} {'CPU s':>6} {'RSS MB':>7}"
    )
    print()
    print(
        f"5,000 idle receivers for {args.idle_seconds:g} s; fan-out to {FANOUT_RECEIVERS} receivers, "
        f"{FANOUT_ROUNDS} rounds; {P2P_MESSAGES} p2p messages from {P2P_SENDERS} senders"
    )
    print(header)
    print("-" * len(header))
    for impl, row in rows.items():
        p2p = row.get("p2p") or {}
        fan = row.get("fanout") or {}
        fan2 = row.get("fanout2") or {}
        idle = row.get("idle") or {}
        print(
            f"{impl:<22} {_fmt(p2p.get('rate')):>10} {_fmt(p2p.get('p50'), 'ms'):>7} "
            f"{_fmt(p2p.get('p99'), 'ms'):>7} | "
            f"{_fmt(fan.get('rate')):>16} {_fmt(fan.get('p99'), 'ms'):>7} | "
            f"{_fmt(fan2.get('rate')):>17} {_fmt(fan2.get('p99'), 'ms'):>7} | "
            f"{_fmt(idle.get('connections')):>10} {_fmt(idle.get('cpu')):>6} {_fmt(idle.get('rss')):>7}"
        )
    lost = {
        f"{impl} {scenario}": (row.get(scenario) or {}).get("lost")
        for impl, row in rows.items()
        for scenario in ("fanout", "fanout2")
    }
    if any(lost.values()):
        print("messages lost in fan-out:", {k: v for k, v in lost.items() if v})
    print(
        f"(total {time.monotonic() - started:.0f} s; python {sys.version.split()[0]}; "
        f"fan-out rate = receivers / median time from group_send to the last delivery of a round)"
    )


if __name__ == "__main__":
    main()
