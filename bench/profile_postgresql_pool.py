"""Who waits for the PostgreSQL layer's pool under a churning room, and what it does to sends.

``.venv/bin/python bench/profile_postgresql_pool.py --pool-size 2,4 --repeat 2`` starts one
PostgreSQL and runs, per pool size and pass, a fresh worker process: one layer plays the demo
app's worker with ``--users`` concurrent users in a loop (``new_channel``, ``group_history``,
``group_add(since=)``, ``presence_join``, ``presence()``, a ``group_send`` read back on the
user's channel, ``presence_leave``, ``group_discard``; history on, mailboxes large enough that
nothing is dropped), a second layer exchanges a p2p message each way with it every 10 ms, for
``--seconds`` with no users and then as long with them. Every pool acquire of the worker is
timed (asyncpg's ``Pool._acquire`` wrapped) and filed under the layer function that asked. Per
phase it prints cycles/s, acquire waits (p50, p99, max, most waiting at once), each probe's
``send()`` time (into the churning layer and out of it) and the delivery time, then the waits
by caller. ``--linger S`` sets the ordered writer's linger (``_WRITER_LINGER``) for an
experiment. See "Named-channel capacity across processes, and the pool under churn" in
docs/performance/postgresql.md.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import bench_postgresql  # noqa: E402

#: Layer functions that are not the caller worth naming (the pool's and the layer's plumbing).
_PLUMBING = {"_timed", "_acquire", "__aenter__", "_with_conn", "_retry", "<lambda>"}


class AcquireWaits:
    """Times every ``asyncpg.Pool._acquire`` of this process, by the function that asked."""

    def __init__(self) -> None:
        self.by_caller: dict[str, list[float]] = collections.defaultdict(list)
        self.waiting = 0
        self.most_waiting = 0

    def install(self) -> None:
        from asyncpg import pool

        acquire = pool.Pool._acquire  # type: ignore[attr-defined]
        waits = self

        async def timed(self: Any, timeout: float | None) -> Any:
            caller = _caller(sys._getframe(1))
            began = time.perf_counter()
            waits.waiting += 1
            waits.most_waiting = max(waits.most_waiting, waits.waiting)
            try:
                return await acquire(self, timeout)
            finally:
                waits.waiting -= 1
                waits.by_caller[caller].append(time.perf_counter() - began)

        pool.Pool._acquire = timed  # type: ignore[attr-defined]

    def reset(self) -> None:
        self.by_caller.clear()
        self.most_waiting = self.waiting

    def all(self) -> list[float]:
        return [wait for waits in self.by_caller.values() for wait in waits]


def _caller(frame: Any) -> str:
    while frame is not None and frame.f_code.co_name in _PLUMBING:
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "?"


def ms(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (seconds) in milliseconds; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


async def measure(dsn: str, pool_size: int, users: int, seconds: float) -> list[dict[str, Any]]:
    from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer

    waits = AcquireWaits()
    waits.install()
    schema, room = "p" + uuid.uuid4().hex[:10], "room:demo"
    worker = PostgreSQLChannelLayer(
        dsn=dsn, schema=schema, history={"room:*": 100}, pool_size=pool_size, capacity=100_000
    )
    peer = PostgreSQLChannelLayer(dsn=dsn, schema=schema, pool_size=pool_size)
    inbound, outbound = await worker.new_channel("probe"), await peer.new_channel("probe")
    stop = asyncio.Event()
    times: dict[str, list[float]] = collections.defaultdict(list)

    async def timed(key: str, call: Awaitable[None]) -> None:
        began = time.perf_counter()
        await call
        times[key].append(time.perf_counter() - began)

    async def probe() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            await timed("send_in", peer.send(inbound, {"type": "probe"}))
            await worker.receive(inbound, timeout=60)
            times["delivery_in"].append(time.perf_counter() - began)
            await timed("send_out", worker.send(outbound, {"type": "probe"}))
            await peer.receive(outbound, timeout=60)
            await asyncio.sleep(0.01)

    async def user(name: str) -> None:
        while not stop.is_set():
            began = time.perf_counter()
            channel = await worker.new_channel("ws")
            latest = await worker.group_history(room)
            await worker.group_add(room, channel, since=latest.position)
            await worker.presence_join(room, channel, {"name": name})
            await worker.presence(room)
            await worker.group_send(room, {"type": "chat.message", "from": channel})
            while (await worker.receive(channel, timeout=60)).get("from") != channel:
                pass
            await worker.presence_leave(room, channel)
            await worker.group_discard(room, channel)
            times["cycle"].append(time.perf_counter() - began)

    phases = []
    for phase, count in (("idle", 0), ("churn", users)):
        waits.reset()
        times.clear()
        stop.clear()
        tasks = [asyncio.create_task(probe())] + [asyncio.create_task(user(f"u{n}")) for n in range(count)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
        every = waits.all()
        phases.append(
            {
                "phase": phase,
                "cycles_per_s": len(times["cycle"]) / seconds,
                "acquires": len(every),
                "wait_ms": [ms(every, 0.5), ms(every, 0.99), ms(every, 1.0)],
                "most_waiting": waits.most_waiting,
                **{key: [ms(times[key], 0.5), ms(times[key], 0.99), ms(times[key], 1.0)] for key in PROBES},
                "by_caller": {
                    caller: [len(values), ms(values, 0.5), ms(values, 0.99), sum(values)]
                    for caller, values in sorted(waits.by_caller.items(), key=lambda item: -sum(item[1]))
                },
            }
        )
    await worker.flush()
    await peer.close()
    await worker.close()
    return phases


#: The probe's figures: into the churning layer (send, send to delivery) and out of it.
PROBES = ("send_in", "delivery_in", "send_out")


def show(run: dict[str, Any]) -> str:
    p50, p99, top = run["wait_ms"]
    line = (
        f"{run['phase']:5} cycles/s {run['cycles_per_s']:5.0f}; acquires {run['acquires']:6} wait p50 "
        f"{p50:.2f} p99 {p99:.1f} max {top:.1f} ms, most waiting {run['most_waiting']}"
    )
    for key in PROBES:
        p50, p99, top = run[key]
        line += f"; {key} p50 {p50:.2f} p99 {p99:.1f} max {top:.1f} ms"
    return line


def run_worker(dsn: str, pool_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    job = json.dumps({"dsn": dsn, "pool_size": pool_size, "users": args.users, "seconds": args.seconds})
    env = dict(os.environ)
    if args.linger is not None:
        env["PROFILE_WRITER_LINGER"] = str(args.linger)
    done = subprocess.run(
        [sys.executable, __file__, "--worker", job], capture_output=True, text=True, timeout=600, env=env
    )
    if done.returncode:
        raise SystemExit(f"worker failed: {done.stderr.strip()[-2000:]}")
    result: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def worker(job: dict[str, Any]) -> None:
    linger = os.environ.get("PROFILE_WRITER_LINGER")
    if linger is not None:
        from fastapi_websockets.backends import postgresql

        postgresql._WRITER_LINGER = float(linger)
    phases = asyncio.run(measure(job["dsn"], job["pool_size"], job["users"], job["seconds"]))
    print(json.dumps(phases), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-size", default="2", help="comma-separated pool sizes")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--linger", type=float, help="the writer's linger in seconds (default: the layer's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sizes = [int(size) for size in args.pool_size.split(",")]
    with bench_postgresql.server() as server:
        for index in range(args.repeat):
            for size in sizes:
                for run in run_worker(server["url"], size, args):
                    print(f"{index} pool_size={size} {show(run)}  load {os.getloadavg()[0]:.1f}", flush=True)
                    for caller, (count, p50, p99, total) in run["by_caller"].items():
                        waited = f"p50 {p50:.2f} p99 {p99:.1f} ms, {total:.2f} s in all"
                        print(f"    {caller}: {count} acquires, {waited}")


if __name__ == "__main__":
    main()
