"""Why PostgreSQL p2p with 16 senders swings between runs: counts and server state per run.

``.venv/bin/python bench/profile_postgresql_p2p.py --repeat 6`` starts one PostgreSQL and runs,
``repeat`` times, each in a fresh worker process as ``python -m bench`` does (fresh schema, a
sender layer and a receiver layer), the harness's p2p scenario: a warm-up message, 1 closed-loop
sender, then 16, at most ``--p2p-messages`` messages or ``--p2p-seconds`` each. Per run it prints
the 16-sender rate and p50, the worker's and the server's CPU per message, the statements the
sender wrote and their mean batch, the claims and the notifications the receiver handled, the
time from the first to the last message, the longest gap between two deliveries (a stall), the
garbage collections during the loop, and between runs the server's checkpoints, autovacuums and
dead tuples of the message table. Also printed: the rate in each quarter of the loop, the five
longest gaps between deliveries (when in the loop, how long), the whole machine's CPU during the
loop (what other programs used, and steal) and the batch sizes. ``--pin free,split,same`` runs
each placement in turn (free; worker on CPU 0 and server on CPU 1; all on CPU 0).

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
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
sys.path.insert(0, str(BENCH.parent))
import bench_postgresql  # noqa: E402
import harness  # noqa: E402


async def probe(server: harness.Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """One p2p scenario as the harness runs it, with the layers' work counted."""
    impl = harness.find_impl("postgresql", "postgresql")
    counts: dict[str, Any] = {"batches": [], "claims": 0, "notes": 0, "gc": 0, "deletes": 0}
    async with harness.layer_pair(impl, server, namespace) as (sender, receiver):
        write_batch, claim, on_notify = sender._write_batch, receiver._claim, receiver._on_notify
        delete_rows = receiver._delete_rows

        async def counted_write(batch: list[Any], expiry: float) -> Any:
            counts["batches"].append(len(batch))
            return await write_batch(batch, expiry)

        async def counted_claim(queue: str, limit: int) -> Any:
            counts["claims"] += 1
            return await claim(queue, limit)

        async def counted_delete(ids: list[int]) -> None:
            counts["deletes"] += 1
            await delete_rows(ids)

        def noted(*args: Any) -> None:
            counts["notes"] += 1
            on_notify(*args)

        # Before the receiver starts: its LISTEN registers the bound method it finds.
        receiver._on_notify = noted
        sender._write_batch, receiver._claim = counted_write, counted_claim
        receiver._delete_rows = counted_delete
        channel = await harness.warm(sender, receiver)
        waiting: dict[int, asyncio.Future[float]] = {}
        arrivals: list[float] = []

        async def receive_all() -> None:
            while True:
                message = await receiver.receive(channel)
                now = time.perf_counter()
                arrivals.append(now)
                waiting[message["id"]].set_result(now)

        async def send(key: int) -> None:
            await sender.send(channel, {"type": "bench.p2p", "id": key})

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                counts["gc"] += 1
                counts["gc_full"] = counts.get("gc_full", 0) + (info["generation"] == 2)
                counts["gc_began"] = time.perf_counter()
            else:
                counts["gc_ms"] = counts.get("gc_ms", 0.0) + (time.perf_counter() - counts["gc_began"]) * 1000

        reader = asyncio.create_task(receive_all())
        try:
            one = await harness.closed_loop(send, waiting, 1, sizes)
            for key in ("batches", "claims", "notes", "deletes"):
                counts[key] = [] if key == "batches" else 0
            arrivals.clear()
            pids = server.get("pids", [])
            server_cpu, cpu = harness.process_cpu(pids), time.process_time()
            switches, machine = preempted(), machine_cpu()
            gc.callbacks.append(on_gc)
            began = time.perf_counter()
            many = await harness.closed_loop(send, waiting, 16, sizes)
            took = time.perf_counter() - began
            gc.callbacks.remove(on_gc)
            cpu, server_cpu = time.process_time() - cpu, harness.process_cpu(pids) - server_cpu
            switches = preempted() - switches
            used = [b - a for a, b in zip(machine, machine_cpu(), strict=True)]
        finally:
            await harness.stop([reader])
    sent = len(arrivals)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    worst = sorted(range(len(gaps)), key=lambda i: -gaps[i])[:5]
    batches = counts.pop("batches")
    return {
        "p2p1_rate": one["rate"],
        "rate": many["rate"],
        "p50_ms": many["p50"] * 1000,
        "messages": sent,
        "seconds": took,
        "cpu_us": cpu / max(sent, 1) * 1e6,
        "server_us": server_cpu / max(sent, 1) * 1e6,
        "preempted": switches,
        # Cores' worth of CPU during the loop: everything busy, stolen by the hypervisor,
        # and what neither this worker nor the server used (other programs).
        "busy": used[0] / took,
        "steal": used[1] / took,
        "others": (used[0] - cpu - server_cpu) / took,
        "statements": len(batches),
        "mean_batch": statistics.mean(batches) if batches else 0.0,
        "batch_hist": {size: batches.count(size) for size in sorted(set(batches))},
        "max_gap_ms": max(gaps) * 1000 if gaps else 0.0,
        # Deliveries per second in each quarter of the loop: does the rate fall as it goes?
        "quarters": [
            round(sum(1 for at in arrivals if q <= (at - began) / took * 4 < q + 1) / took * 4)
            for q in range(4)
        ],
        "worst_gaps": [(round((arrivals[i] - began) * 1000, 1), round(gaps[i] * 1000, 2)) for i in worst],
        **counts,
    }


def preempted() -> int:
    """Times this process was descheduled while it could still run (another task took its core)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])


def machine_cpu() -> tuple[float, float]:
    """CPU seconds so far of the whole machine: (busy, stolen)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


STATE = """
SELECT (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter) AS checkpoints,
       (SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables) AS autovacuums,
       (SELECT coalesce(sum(autoanalyze_count), 0) FROM pg_stat_user_tables) AS autoanalyzes,
       (SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables) AS dead,
       (SELECT count(*) FROM pg_namespace) AS schemas,
       (SELECT pg_database_size(current_database())) AS db_bytes
"""


async def server_state(dsn: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(STATE)
    finally:
        await conn.close()
    assert row is not None
    return dict(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--p2p-messages", type=int, default=40_000)
    parser.add_argument("--p2p-seconds", type=float, default=2.0)
    parser.add_argument(
        "--pin",
        default="free",
        help="placements in turn, comma-separated: free, split (worker on CPU 0, server on 1), same (on 0)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-cpus", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = {"p2p_messages": args.p2p_messages, "p2p_seconds": args.p2p_seconds}
    if args.worker:
        if args.worker_cpus:
            os.sched_setaffinity(0, {int(cpu) for cpu in args.worker_cpus.split(",")})
        job = json.loads(args.worker)
        print(json.dumps(asyncio.run(probe(job["server"], job["ns"], sizes))), flush=True)
        return
    with bench_postgresql.server() as pg_server:
        server = {"broker": "postgresql", **pg_server}
        every = set(range(os.cpu_count() or 1))
        placements = {"free": (every, every), "split": ({0}, {1}), "same": ({0}, {0})}
        runs = [(index, pin) for index in range(args.repeat) for pin in args.pin.split(",")]
        for index, pin in runs:
            worker_cpus, server_cpus = placements[pin]
            for pid in harness.process_tree(server["pids"]):
                os.sched_setaffinity(pid, server_cpus)  # backends forked later inherit it
            before = asyncio.run(server_state(server["url"]))
            job = json.dumps({"server": server, "ns": "q" + uuid.uuid4().hex[:10]})
            command = [sys.executable, __file__, "--worker", job]
            command += ["--p2p-messages", str(args.p2p_messages), "--p2p-seconds", str(args.p2p_seconds)]
            command += ["--worker-cpus", ",".join(map(str, sorted(worker_cpus)))]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
            after = asyncio.run(server_state(server["url"]))
            if done.returncode:
                print(done.stderr[-2000:])
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            delta = {k: after[k] - before[k] for k in ("checkpoints", "autovacuums", "autoanalyzes")}
            print(
                f"#{index} {pin} load {os.getloadavg()[0]:.2f} p2p16 {result['rate']:,.0f} msgs/s "
                f"p50 {result['p50_ms']:.2f} ms, {result['messages']} in {result['seconds'] * 1000:.0f} ms; "
                f"p2p1 {result['p2p1_rate']:,.0f}\n"
                f"   cpu/msg worker {result['cpu_us']:.0f} us server {result['server_us']:.0f} us; "
                f"statements {result['statements']} mean batch {result['mean_batch']:.1f}; "
                f"claims {result['claims']} notes {result['notes']} deletes {result['deletes']}; "
                f"gc {result['gc']} ({result.get('gc_full', 0)} full, {result.get('gc_ms', 0.0):.0f} ms); "
                f"worker preempted {result['preempted']}\n"
                f"   cores busy {result['busy']:.2f} (others {result['others']:.2f}) "
                f"stolen {result['steal']:.2f}\n"
                f"   rate by quarter {result['quarters']}\n"
                f"   max gap {result['max_gap_ms']:.1f} ms, worst (at ms, gap ms) {result['worst_gaps']}\n"
                f"   batches {result['batch_hist']}\n"
                f"   server: {delta} dead tuples {after['dead']} db {after['db_bytes'] / 1e6:.1f} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
