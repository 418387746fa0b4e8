"""Where a PostgreSQL fan-out round's time goes, against the in-memory layer: stages, CPU, profile.

``.venv/bin/python bench/profile_postgresql_fanout.py --repeat 4`` starts one PostgreSQL and
measures, in this process, alternating which goes first, the in-memory layer and our PostgreSQL
layer fanning one ``group_send`` out to ``--receivers`` receivers (as ``python -m bench``'s fanout
scenario: the sender in a second layer instance, each receiver a task in a ``receive()`` loop).
Per run it prints the CPU per round of this process and of the server (as
``profile_redis_fanout.py``), the median wall time of a round, and for PostgreSQL the median
time from the ``group_send`` call to each stage of the round: the inbox notification reaching
the receiving layer, ``group_send`` returning, the local fan-out done, the last delivery.
``--cprofile N`` prints the N costliest functions (cumulative) of one more PostgreSQL run;
``--explain`` prints ``EXPLAIN ANALYZE`` of the ``group_send`` statement to 1,000 members.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import bench_postgresql  # noqa: E402
import harness  # noqa: E402
from profile_redis_fanout import measure  # noqa: E402


async def stages(impl: harness.Impl, server: harness.Server, receivers: int, rounds: int) -> dict[str, float]:
    """Median milliseconds from the ``group_send`` call to each stage of a round."""
    namespace = "s" + os.urandom(5).hex()
    marks: dict[str, float] = {}
    async with harness.layer_pair(impl, server, namespace) as (sender, receiver):
        # The in-memory layer has no notifications: its fan-out begins inside group_send.
        on_notify = receiver._on_notify if impl.name == "postgresql" else None
        fan_out = receiver.deliver_to_local_members

        def noted(*args: Any) -> None:
            marks.setdefault("notified", time.perf_counter())
            assert on_notify is not None
            on_notify(*args)

        def fanned(group: str, message: Any) -> int:
            marks.setdefault("fan-out began", time.perf_counter())
            count: int = fan_out(group, message)
            marks.setdefault("fanned out", time.perf_counter())
            return count

        # Before the layer starts: its LISTEN registers the bound method it finds.
        if on_notify is not None:
            receiver._on_notify = noted
        receiver.deliver_to_local_members = fanned
        counts = harness.Rounds(receivers)
        tasks = await harness.start_receivers(receiver, receivers, counts)
        samples: dict[str, list[float]] = {}
        try:
            await asyncio.sleep(0.5)
            for index in range(rounds + 1):
                marks.clear()
                began = time.perf_counter()
                await sender.group_send("room", {"type": "bench.fan", "round": index})
                marks["returned"] = time.perf_counter()
                await counts.end(index)
                marks["last delivery"] = time.perf_counter()
                if index:
                    for stage, at in marks.items():
                        samples.setdefault(stage, []).append((at - began) * 1000)
        finally:
            await harness.stop(tasks)
    return {stage: statistics.median(values) for stage, values in samples.items()}


async def profiled(
    impl: harness.Impl, server: harness.Server, receivers: int, rounds: int
) -> cProfile.Profile:
    """The rounds (not the set-up) of one fan-out run under cProfile."""
    profile = cProfile.Profile()
    async with harness.fan_room(impl, server, "p" + os.urandom(5).hex(), receivers) as (sender, _, counts):
        profile.enable()
        await harness.fan_rounds(sender, counts, rounds)
        profile.disable()
    return profile


def pid_cpu(pids: list[int]) -> dict[int, tuple[float, int]]:
    """CPU seconds and voluntary context switches (wake-ups) so far of each of ``pids``."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        switches = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        cpu[pid] = ((int(fields[11]) + int(fields[12])) / ticks, switches)
    return cpu


async def backends(server: harness.Server, receivers: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Server CPU ms and wake-ups per round, by what each server process does for us."""
    impl = harness.find_impl("postgresql", "postgresql")
    namespace = "b" + os.urandom(5).hex()
    async with harness.fan_room(impl, server, namespace, receivers) as (sender, receiver, counts):
        names = {sender.client_token: "sender", receiver.client_token: "receiver"}
        rows = await sender._with_conn(
            lambda conn: conn.fetch("SELECT pid, application_name, backend_type FROM pg_stat_activity")
        )
        labels: dict[int, str] = {}
        for row in rows:
            app, kind = row["application_name"] or "", row["backend_type"]
            token = app.split(":")[1] if app.count(":") >= 1 else ""
            if token in names:
                labels[row["pid"]] = names[token] + (" listen" if app.endswith(":listen") else " pool")
            else:
                labels[row["pid"]] = kind
        before = pid_cpu(list(labels))
        await harness.fan_rounds(sender, counts, rounds)
        after = pid_cpu(list(labels))
    per_label: dict[str, tuple[float, float]] = {}
    for pid, label in labels.items():
        if pid in before and pid in after:
            cpu, woken = per_label.get(label, (0.0, 0.0))
            per_label[label] = (
                cpu + (after[pid][0] - before[pid][0]) / rounds * 1000,
                woken + (after[pid][1] - before[pid][1]) / rounds,
            )
    return per_label


async def explain(server: harness.Server, receivers: int) -> None:
    impl = harness.find_impl("postgresql", "postgresql")
    namespace = "e" + os.urandom(5).hex()
    async with harness.layer_pair(impl, server, namespace) as (sender, receiver):
        for _ in range(receivers):
            await receiver.group_add("room", await receiver.new_channel("fan"))
        data = sender.encode({"type": "bench.fan", "round": 1})
        sql = sender._sql.group_send
        args = (["room"], [data], 60.0, sender.client_token, sender.schema)
        await sender.send(await receiver.new_channel("warm"), {"type": "warm"})

        async def run(conn: Any) -> None:
            async with conn.transaction():
                for row in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, VERBOSE) " + sql, *args):
                    print(row[0])
                raise _Rollback

        with contextlib.suppress(_Rollback):
            await sender._with_conn(run)


class _Rollback(Exception):
    """Leaves the EXPLAIN ANALYZE transaction without committing what it wrote."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N")
    parser.add_argument("--explain", action="store_true")
    args = parser.parse_args()
    rows = [("inmemory", harness.find_impl("inmemory", "inmemory")), ("postgresql", None)]
    with bench_postgresql.server() as pg_server:
        servers: dict[str, Any] = {"inmemory": {}, "postgresql": {"broker": "postgresql", **pg_server}}
        pg = harness.find_impl("postgresql", "postgresql")
        if args.explain:
            asyncio.run(explain(servers["postgresql"], args.receivers))
        for index in range(args.repeat):
            for name, impl in rows if index % 2 == 0 else rows[::-1]:
                result = asyncio.run(measure(impl or pg, servers[name], args.receivers, args.rounds))
                line = (
                    f"{index} {name:10} client CPU {result['cpu_ms']:6.2f} ms/round  "
                    f"server CPU {result['server_ms']:5.2f} ms/round  wall p50 {result['wall_ms']:6.2f} ms"
                )
                marks = asyncio.run(stages(impl or pg, servers[name], args.receivers, args.rounds))
                shown = ", ".join(f"{k} {v:.2f}" for k, v in marks.items())
                line += f"\n    stages (ms after the call) {shown}"
                if impl is None:
                    split = asyncio.run(backends(servers[name], args.receivers, args.rounds))
                    line += "\n    server CPU ms, wake-ups per round: " + ", ".join(
                        f"{k} {cpu:.2f}, {woken:.2f}"
                        for k, (cpu, woken) in sorted(split.items(), key=lambda kv: -kv[1][1])
                        if cpu or woken >= 0.01
                    )
                print(f"{line}  load {os.getloadavg()[0]:.1f}", flush=True)
        for name, impl in rows if args.cprofile else []:
            print(f"cProfile of {args.rounds} {name} rounds, by own time:")
            profile = asyncio.run(profiled(impl or pg, servers[name], args.receivers, args.rounds))
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
