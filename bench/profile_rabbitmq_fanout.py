"""Where a RabbitMQ fan-out round's time goes, against the in-memory layer: CPU, phases and functions.

``.venv/bin/python bench/profile_rabbitmq_fanout.py --repeat 6`` starts one RabbitMQ node and
measures, in this process, alternating which goes first, the in-memory layer and our RabbitMQ
layer fanning one ``group_send`` out to ``--receivers`` receivers (``python -m bench``'s fanout
scenario: the sender in a second layer instance, each receiver a task in a ``receive()`` loop).
Per run it prints this process's CPU per round, the broker's CPU per round (from /proc), the
socket writes of publishes and of inbox acks per round, and the median wall time of a round
split into phases: from the ``group_send`` call until the receiving instance's inbox callback
got the message (the broker hop), the callback itself (decode and hand-off to 1,000
mailboxes), the last delivery (the receivers' tasks have run), and when ``group_send``
returned (its publisher confirm). ``--functions N`` adds a cProfile (CPU clock) of both
layers' rounds, the top N functions by own time (it slows those runs down). ``--own`` sends
from the receiving instance itself, to its own members, as the worker that handles a
broadcast request does.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import bench_rabbitmq  # noqa: E402
import harness  # noqa: E402


class Phases:
    """Wall-clock marks of each round: group_send called and returned, inbox callback in and out."""

    def __init__(self, sender: harness.Layer, receiver: harness.Layer) -> None:
        self.marks: dict[str, list[float]] = {"call": [], "confirmed": [], "inbox": [], "handed": []}
        send = sender.group_send

        async def group_send(group: str, message: dict[str, Any]) -> None:
            self.marks["call"].append(time.time())
            await send(group, message)
            self.marks["confirmed"].append(time.time())

        sender.group_send = group_send
        dispatch: Callable[[Any, bytes], None] | None = getattr(receiver, "_dispatch", None)
        if dispatch is None:
            return  # the in-memory layer has no inbox

        def dispatched(properties: Any, body: bytes) -> None:
            self.marks["inbox"].append(time.time())
            dispatch(properties, body)
            self.marks["handed"].append(time.time())

        receiver._dispatch = dispatched

    def medians_ms(self, ends: list[float]) -> dict[str, float]:
        """Median milliseconds, from the group_send call, of each mark (ends: last deliveries)."""
        calls = self.marks["call"]
        return {
            f"{name}_ms": statistics.median(
                (mark - call) * 1000 for call, mark in zip(calls, marks, strict=True)
            )
            for name, marks in (*self.marks.items(), ("last", ends))
            if name != "call" and len(marks) == len(calls)
        }


async def measure(
    impl: harness.Impl, server: harness.Server, receivers: int, rounds: int, profile: cProfile.Profile | None
) -> dict[str, float]:
    """CPU of this process and the broker, broker writes, and the phases of a round, per round."""
    namespace = "f" + os.urandom(5).hex()
    pids = server.get("pids", [])
    async with harness.fan_room(impl, server, namespace, receivers) as (sender, receiver, counts):
        phases = Phases(sender, receiver)
        publishes = getattr(sender, "publishes", 0), getattr(sender, "publish_writes", 0)
        acks = getattr(receiver, "_acks", None)
        ack_frames = acks.frames if acks is not None else 0
        cpu, server_cpu = time.process_time(), harness.process_cpu(pids)
        if profile is not None:
            profile.enable()
        walls = await harness.fan_rounds(sender, counts, rounds)
        if profile is not None:
            profile.disable()
        cpu, server_cpu = time.process_time() - cpu, harness.process_cpu(pids) - server_cpu
        ends = [counts.end(index).result() for index in range(1, rounds + 1)]
        result = {
            "cpu_ms": cpu / rounds * 1000,
            "server_ms": server_cpu / rounds * 1000,
            "publish_writes": (getattr(sender, "publish_writes", 0) - publishes[1]) / rounds,
            "ack_frames": ((acks.frames if acks is not None else 0) - ack_frames) / rounds,
            "wall_ms": statistics.median(walls) * 1000,
        }
        return result | phases.medians_ms(ends)


def show(label: str, result: dict[str, float]) -> str:
    phases = "  ".join(
        f"{name[:-3]} {result[name]:6.2f}"
        for name in ("inbox_ms", "handed_ms", "last_ms", "confirmed_ms")
        if name in result
    )
    return (
        f"{label} CPU {result['cpu_ms']:6.2f} ms/round  broker CPU {result['server_ms']:5.2f}  "
        f"publish writes {result['publish_writes']:.1f}  ack frames {result['ack_frames']:.1f}  "
        f"wall p50 {result['wall_ms']:6.2f} ms"
        + (f"  phases (ms after the call, medians): {phases}" if phases else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument(
        "--own",
        action="store_true",
        help="group_send from the receiving instance itself (to its own members) instead of a second one",
    )
    parser.add_argument(
        "--functions",
        type=int,
        default=0,
        help="cProfile (CPU clock) the rounds of both layers: top N by own time",
    )
    args = parser.parse_args()
    rows: list[tuple[str, harness.Impl]] = [
        ("inmemory", harness.find_impl("inmemory", "inmemory")),
        ("rabbitmq", harness.find_impl("rabbitmq", "rabbitmq")),
    ]
    if args.own:
        rows = [(name, dataclasses.replace(impl, shared=False)) for name, impl in rows]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in rows}
    profiles = {name: cProfile.Profile(time.process_time) for name, _ in rows} if args.functions else {}
    with bench_rabbitmq.server() as rabbit:
        servers: dict[str, Any] = {"inmemory": {}, "rabbitmq": {"broker": "rabbitmq", **rabbit}}
        for index in range(args.repeat):
            for name, impl in rows if index % 2 == 0 else rows[::-1]:
                profile = profiles.get(name)
                result = asyncio.run(measure(impl, servers[name], args.receivers, args.rounds, profile))
                results[name].append(result)
                print(f"{index} {show(f'{name:8}', result)}  load {os.getloadavg()[0]:.1f}", flush=True)
    for name, runs in results.items():
        keys = [key for key in runs[0] if all(key in run for run in runs)]
        print(show(f"median {name:8}", {key: statistics.median(run[key] for run in runs) for key in keys}))
    pairs = list(zip(results["inmemory"], results["rabbitmq"], strict=True))
    ratios = [memory["wall_ms"] / rabbit["wall_ms"] for memory, rabbit in pairs]
    print(
        "in-memory wall / RabbitMQ wall per round, per run: "
        f"{', '.join(f'{ratio:.2f}' for ratio in ratios)} (median {statistics.median(ratios):.2f})"
    )
    for name, profile in profiles.items():
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.functions)
        print(f"{name}, the rounds only, CPU clock:\n{out.getvalue()}")


if __name__ == "__main__":
    main()
