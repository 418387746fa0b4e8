"""The stages of a one-process fan-out round, NATS against Redis against in-memory, same run.

``.venv/bin/python bench/profile_fanout_stages.py --repeat 5`` starts one nats-server and one
Redis and, in this process, runs rows in turn (the order rotates every pass) of the shared
benchmark's fanout scenario: one ``group_send`` from a second layer instance to ``--receivers``
receivers, each receiver a task in a ``receive()`` loop. Every round is cut into stages, each a
time from the ``group_send`` call (median over rounds, then over passes):

- ``write``: the first socket write (``asyncio.StreamWriter``) after the call: the publish;
- ``driver``: (NATS) the driver's read loop parsed the delivery (``Client._process_msg``);
  (RabbitMQ) aiormq's connection reader got the delivery's ``Basic.Deliver`` frame;
- ``handed``: (RabbitMQ) the receiving instance's inbox callback got the delivery (``_on_inbox``);
- ``decode``: the receiving instance starts decoding it (``decode_or_drop``), and ``decoded``;
- ``fanned``: ``deliver_many`` returned: every mailbox has the message;
- ``first``: the first receiver's ``receive()`` call returned it;
- ``last``: the last receiver's did (the round's end, as the shared benchmark measures it);
- ``stored``, ``listed``: (NATS) the sender's publish was acknowledged, its owner listing answered;
- ``returned``: the ``group_send`` call returned (the benchmark does not wait for it).

Each stage is also printed as this process's CPU time from the call (``time.process_time``, a
second line per row): where a stage's wall time grows and its CPU does not, the process waited
(for the broker, or for a core); where both grow, it worked, or ran slower. ``--nap MS`` adds the
row ``inmemory nap``: the in-memory room, each round sleeping ``MS`` ms just before its
``group_send`` (times still from the round's start): the same work after the same idle as a
broker's hop, without the broker.

Counted per round: decodes in the receiving instance, event-loop iterations, socket writes and
reads, garbage collections (by generation) and the microseconds they took; and the share of
rounds in which the NATS sender's acknowledgement and listing were handled before the last
delivery (work on the round's critical path). ``--handles N`` times the loop's callbacks by what
they run (a receiver's step, the driver's flusher...) and prints the N costliest per row.
Instrumentation wraps methods of the two layer instances and of ``asyncio`` stream
classes in this process; it adds a little time to every stage alike. Speed figures only;
nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import bench_nats  # noqa: E402
import bench_rabbitmq  # noqa: E402
import bench_redis  # noqa: E402
import harness  # noqa: E402

STAGES = (
    "write",
    "driver",
    "handed",
    "decode",
    "decoded",
    "fanned",
    "first",
    "last",
    "stored",
    "listed",
    "returned",
)
#: Each stage's CPU time of this process from the round's start.
CPU_STAGES = tuple(f"cpu {stage}" for stage in STAGES)
COUNTS = ("decodes", "loops", "writes", "reads", "gc0", "gc1", "gc2", "gc_us")
#: Share of the rounds in which the sender's acknowledgement or listing came before the last delivery.
ORDERS = ("stored<last", "listed<last")


class Probe:
    """Times of the first occurrence of each stage in the current round, and counts."""

    def __init__(self) -> None:
        self.began = 0.0
        self.began_wall = 0.0
        self.began_cpu = 0.0
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self.active = False

    def start(self) -> None:
        self.times, self.cpu, self.counts = {}, {}, dict.fromkeys(COUNTS, 0)
        self.active = True
        self.began = time.perf_counter()
        self.began_wall = time.time()
        self.began_cpu = time.process_time()

    def mark(self, stage: str) -> None:
        if self.active and stage not in self.times:
            self.times[stage] = time.perf_counter()
            self.cpu[stage] = time.process_time()

    def count(self, what: str) -> None:
        if self.active:
            self.counts[what] += 1


PROBE = Probe()
GC_BEGAN = [0.0]


def on_gc(phase: str, info: dict[str, int]) -> None:
    """Count collections by generation and the microseconds they take, during measured rounds."""
    if phase == "start":
        GC_BEGAN[0] = time.perf_counter()
        return
    PROBE.count(f"gc{info['generation']}")
    if PROBE.active:
        PROBE.counts["gc_us"] += round((time.perf_counter() - GC_BEGAN[0]) * 1e6)


@contextlib.contextmanager
def patched_streams() -> Iterator[None]:
    """Count and time socket writes and reads of every asyncio stream in this process."""
    writer, reader = asyncio.StreamWriter, asyncio.StreamReader
    write, writelines, read = writer.write, writer.writelines, reader.read

    def new_write(self: asyncio.StreamWriter, data: Any) -> None:
        PROBE.mark("write")
        PROBE.count("writes")
        write(self, data)

    def new_writelines(self: asyncio.StreamWriter, data: Any) -> None:
        PROBE.mark("write")
        PROBE.count("writes")
        writelines(self, data)

    async def new_read(self: asyncio.StreamReader, n: int = -1) -> bytes:
        data = await read(self, n)
        PROBE.count("reads")
        return data

    writer.write, writer.writelines, reader.read = new_write, new_writelines, new_read  # type: ignore[method-assign]
    try:
        yield
    finally:
        writer.write, writer.writelines, reader.read = write, writelines, read  # type: ignore[method-assign]


def instrument(receiver: Any) -> None:
    """Wrap the receiving instance's decode and fan-out, and its NATS driver's message hand-off."""
    decode_or_drop: Callable[..., Any] = receiver.decode_or_drop
    deliver_many: Callable[..., Any] = receiver.deliver_many

    def timed_decode(*args: Any) -> Any:
        PROBE.mark("decode")
        PROBE.count("decodes")
        try:
            return decode_or_drop(*args)
        finally:
            PROBE.mark("decoded")

    def timed_deliver(*args: Any) -> Any:
        try:
            return deliver_many(*args)
        finally:
            PROBE.mark("fanned")

    receiver.decode_or_drop = timed_decode
    receiver.deliver_many = timed_deliver
    nc = getattr(receiver, "_nc", None)
    if nc is not None:
        process_msg = nc._process_msg

        async def timed_process_msg(*args: Any) -> Any:
            PROBE.mark("driver")
            return await process_msg(*args)

        nc._process_msg = timed_process_msg


@contextlib.contextmanager
def rabbitmq_marks() -> Iterator[None]:
    """Mark ``driver`` when a RabbitMQ connection's reader decoded a ``Basic.Deliver`` frame, and
    ``handed`` when the inbox callback got the delivery (patched on the class: the consumer
    binds the method when the layer connects, before ``instrument`` sees the instance)."""
    from fastapi_websockets.backends import rabbitmq, rabbitmq_wire

    method, on_inbox = rabbitmq_wire._method, rabbitmq.RabbitMQChannelLayer._on_inbox

    def timed_method(payload: bytes) -> Any:
        frame = method(payload)
        if isinstance(frame, rabbitmq_wire._DELIVER):
            PROBE.mark("driver")
        return frame

    def timed_on_inbox(self: rabbitmq.RabbitMQChannelLayer, delivered: Any) -> None:
        PROBE.mark("handed")
        on_inbox(self, delivered)

    rabbitmq_wire._method = timed_method
    rabbitmq.RabbitMQChannelLayer._on_inbox = timed_on_inbox  # type: ignore[method-assign]
    try:
        yield
    finally:
        rabbitmq_wire._method = method
        rabbitmq.RabbitMQChannelLayer._on_inbox = on_inbox  # type: ignore[method-assign]


HANDLES: dict[str, list[float]] = {}


def handle_kind(handle: asyncio.Handle) -> str:
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', type(coro).__name__)}"
    return f"callback {getattr(callback, '__qualname__', repr(callback))}"


@contextlib.contextmanager
def timed_handles() -> Iterator[None]:
    """Time and count, by what they run, the event loop's callbacks during measured rounds."""
    run = asyncio.Handle._run

    def new_run(self: asyncio.Handle) -> None:
        if not PROBE.active:
            run(self)
            return
        began = time.perf_counter()
        run(self)
        spent = HANDLES.setdefault(handle_kind(self), [0.0, 0])
        spent[0] += time.perf_counter() - began
        spent[1] += 1

    asyncio.Handle._run = new_run  # type: ignore[method-assign]
    try:
        yield
    finally:
        asyncio.Handle._run = run  # type: ignore[method-assign]


def instrument_sender(sender: Any) -> None:
    """Mark when a NATS sender's inbox publish is acknowledged and its owner listing answered."""
    if not hasattr(sender, "_owners"):
        return
    store, owners = sender._store_in_inbox, sender._owners

    async def timed_store(*args: Any) -> Any:
        try:
            return await store(*args)
        finally:
            PROBE.mark("stored")

    async def timed_owners(*args: Any) -> Any:
        try:
            return await owners(*args)
        finally:
            PROBE.mark("listed")

    sender._store_in_inbox, sender._owners = timed_store, timed_owners


def count_loop_iterations() -> None:
    loop = asyncio.get_running_loop()
    run_once = loop._run_once  # type: ignore[attr-defined]

    def counted() -> None:
        PROBE.count("loops")
        run_once()

    loop._run_once = counted  # type: ignore[attr-defined]


async def measure(
    impl: harness.Impl, server: harness.Server, receivers: int, rounds: int, nap: float = 0.0
) -> dict[str, float]:
    """Median time (and CPU, as ``cpu <stage>``) of each stage from the round's start, and median
    counts, over ``rounds`` rounds; with ``nap``, each round sleeps that many seconds first."""
    namespace = "s" + os.urandom(5).hex()
    count_loop_iterations()
    async with harness.fan_room(impl, server, namespace, receivers) as (sender, receiver, counts):
        if impl.shared:
            await sender.send(await receiver.new_channel("warm"), {"type": "warm"})  # connect both
        instrument(receiver)
        instrument_sender(sender)
        delivered = counts.delivered

        def timed_delivered(index: int) -> None:
            PROBE.mark("first")
            delivered(index)
            if counts.counts[index] == counts.receivers:
                # Its CPU (the wall time is the one the round's future resolves to). The receivers
                # looked this method up before round 1 reached them: "first" and "last" from round 2.
                PROBE.mark("last")

        counts.delivered = timed_delivered  # type: ignore[method-assign]
        samples: dict[str, list[float]] = {name: [] for name in (*STAGES, *CPU_STAGES, *COUNTS, *ORDERS)}
        for index in range(1, rounds + 1):
            PROBE.start()
            if nap:
                await asyncio.sleep(nap)
            await sender.group_send("room", {"type": "bench.fan", "round": index})
            PROBE.mark("returned")
            ended = await counts.end(index)
            PROBE.active = False
            for stage in STAGES:
                if stage in PROBE.times:
                    if stage != "last":
                        samples[stage].append((PROBE.times[stage] - PROBE.began) * 1000)
                    samples[f"cpu {stage}"].append((PROBE.cpu[stage] - PROBE.began_cpu) * 1000)
            samples["last"].append((ended - PROBE.began_wall) * 1000)
            for stage in ("stored", "listed"):
                if stage in PROBE.times:
                    before = (PROBE.times[stage] - PROBE.began) * 1000 < samples["last"][-1]
                    samples[f"{stage}<last"].append(float(before))
            for what in COUNTS:
                samples[what].append(PROBE.counts[what])
    return {
        name: statistics.fmean(values) if "<" in name else statistics.median(values)
        for name, values in samples.items()
        if values
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--handles", type=int, default=0, help="print the N costliest kinds of loop callback")
    parser.add_argument(
        "--row",
        action="append",
        default=None,
        help="rows: inmemory, redis, nats, 'nats core', rabbitmq (repeatable; RabbitMQ starts only if asked)",
    )
    parser.add_argument(
        "--nap", type=float, default=0.0, help="add the row 'inmemory nap': each round sleeps MS ms first"
    )
    args = parser.parse_args()
    gc.callbacks.append(on_gc)
    names = (args.row or ["inmemory", "redis", "nats"]) + (["inmemory nap"] if args.nap else [])
    naps = {"inmemory nap": args.nap / 1000}
    brokers = {
        "inmemory nap": "inmemory",
        "inmemory": "inmemory",
        "redis": "redis",
        "nats": "nats",
        "nats core": "nats",
        "rabbitmq": "rabbitmq",
    }
    rows = [(name, harness.find_impl(brokers[name], name.removesuffix(" nap"))) for name in names]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        servers: dict[str, Any] = {
            "inmemory": {},
            "redis": {"broker": "redis", **stack.enter_context(bench_redis.server())},
            "nats": {"broker": "nats", **stack.enter_context(bench_nats.server())},
        }
        if "rabbitmq" in names:
            servers["rabbitmq"] = {"broker": "rabbitmq", **stack.enter_context(bench_rabbitmq.server())}
        stack.enter_context(patched_streams())
        if "rabbitmq" in names:
            stack.enter_context(rabbitmq_marks())
        for index in range(args.repeat):
            shift = index % len(rows)
            for name, impl in rows[shift:] + rows[:shift]:
                HANDLES.clear()
                with timed_handles() if args.handles else contextlib.nullcontext():
                    nap = naps.get(name, 0.0)
                    result = asyncio.run(
                        measure(impl, servers[brokers[name]], args.receivers, args.rounds, nap)
                    )
                if args.handles:
                    costliest = sorted(HANDLES.items(), key=lambda kv: -kv[1][0])[: args.handles]
                    for kind, (spent, calls) in costliest:
                        per_round = spent / args.rounds * 1000
                        print(f"    {per_round:6.3f} ms/round {calls / args.rounds:7.1f} calls/round  {kind}")
                results[name].append(result)
                stages = "  ".join(f"{stage} {result[stage]:5.2f}" for stage in STAGES if stage in result)
                shown = [what for what in (*COUNTS, *ORDERS) if what in result]
                tallies = "  ".join(f"{what} {result[what]:.3g}" for what in shown)
                load = os.getloadavg()[0]
                print(f"{index} {name:9} ms: {stages}  | {tallies}  load {load:.1f}", flush=True)
                cpu = "  ".join(
                    f"{stage} {result['cpu ' + stage]:5.2f}" for stage in STAGES if "cpu " + stage in result
                )
                print(f"{index} {name:9} cpu ms: {cpu}", flush=True)
    print("\nmedians over passes (ms from the group_send call; counts per round):")
    for name, runs in results.items():
        keys = [key for key in (*STAGES, *COUNTS, *ORDERS) if all(key in run for run in runs)]
        med = {key: statistics.median(run[key] for run in runs) for key in keys}
        stages = "  ".join(f"{stage} {med[stage]:5.2f}" for stage in STAGES if stage in med)
        tallies = "  ".join(f"{what} {med[what]:.3g}" for what in (*COUNTS, *ORDERS) if what in med)
        print(f"{name:9} {stages}  | {tallies}")
        cpus = [stage for stage in STAGES if all(f"cpu {stage}" in run for run in runs)]
        cpu = "  ".join(
            f"{stage} {statistics.median(run['cpu ' + stage] for run in runs):5.2f}" for stage in cpus
        )
        print(f"{name:9} cpu ms: {cpu}")
    if "inmemory" in results:
        for name in names:
            if name != "inmemory":
                pairs = zip(results["inmemory"], results[name], strict=True)
                ratios = [m["last"] / r["last"] for m, r in pairs]
                print(f"in-memory last / {name} last, per pass: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
