"""The stages of a two-process fan-out round (the harness's fanout2), per receiving process.

``.venv/bin/python bench/profile_fanout2_stages.py --row postgresql --row nats --repeat 3``
starts each asked broker once and, per pass and row (the order rotates every pass), two
receiving processes of ``--receivers // 2`` receivers each (a task per channel in a
``receive()`` loop, all in group "room", as in ``bench/harness.py`` ``fanout_part``) and, in
this process, the sending instance. Each round is one ``group_send``; the next one starts when
both processes reported their last delivery. Times are wall-clock (``time.time()``, shared by
the processes) from the ``group_send`` call, medians over rounds, then over passes:

- ``ret``: the ``group_send`` call returned, in the sender;
- per receiving process (``a`` the earlier of the two to finish, ``b`` the later):
  ``decode`` the instance began decoding the round's message (``decode_or_drop``),
  ``fanned`` ``deliver_many`` returned (every local mailbox has it), ``last`` its last
  receiver's ``receive()`` returned it. The round's end is ``b last``.

Counted per round: each receiving process's CPU milliseconds (from its previous round's end
to this one's, so trailing work such as acknowledgements counts), decodes and event-loop
iterations; the sender's CPU; the broker's CPU (its process tree, over the pass divided by
rounds). Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import harness  # noqa: E402

ROWS = {
    "redis": "redis",
    "postgresql": "postgresql",
    "nats": "nats",
    "nats core": "nats",
    "rabbitmq": "rabbitmq",
    "rabbitmq durable=False": "rabbitmq",
}


def transient_rabbitmq(server: harness.Server, namespace: str) -> Any:
    """The RabbitMQ row with durable=False (transient messages and queues): what persistence costs."""
    from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer

    return RabbitMQChannelLayer(
        url=server["url"], exchange_name=namespace, queue_prefix=namespace, durable=False
    )


def find_impl(row: str) -> harness.Impl:
    """The harness's implementation of ``row``, or this script's own extra row."""
    if row == "rabbitmq durable=False":
        return harness.Impl(row, "ours", transient_rabbitmq)
    return harness.find_impl(ROWS[row], row)


class Marks:
    """Wall-clock times of the first occurrence of each stage since the last reset, and counts."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.decodes = 0
        self.loops = 0

    def mark(self, stage: str) -> None:
        if stage not in self.times:
            self.times[stage] = time.time()


def write_handles(path: str, handles: dict[str, list[float]], rounds: int) -> None:
    """The costliest kinds of loop callback, CPU and calls per round, into ``path``."""
    costliest = sorted(handles.items(), key=lambda kv: -kv[1][0])[:12]
    lines = [
        f"{spent / rounds * 1000:7.3f} ms/round {calls / rounds:7.2f}/round  {kind}"
        for kind, (spent, calls) in costliest
    ]
    Path(path).write_text("\n".join(lines) + "\n")


async def child(row: str, server: harness.Server, namespace: str, receivers: int, rounds_count: int) -> None:
    """One receiving process: reports every round's stages as a JSON line on stdout."""
    impl = find_impl(row)
    layer = impl.make(server, namespace)
    marks = Marks()
    decode_or_drop, deliver_many = layer.decode_or_drop, layer.deliver_many

    def timed_decode(*args: Any) -> Any:
        marks.mark("decode")
        marks.decodes += 1
        return decode_or_drop(*args)

    def timed_deliver(*args: Any) -> Any:
        try:
            return deliver_many(*args)
        finally:
            marks.mark("fanned")

    layer.decode_or_drop, layer.deliver_many = timed_decode, timed_deliver
    loop = asyncio.get_running_loop()
    run_once = loop._run_once  # type: ignore[attr-defined]

    def counted() -> None:
        marks.loops += 1
        run_once()

    loop._run_once = counted  # type: ignore[attr-defined]
    rounds = harness.Rounds(receivers)
    tasks = await harness.start_receivers(layer, receivers, rounds)
    print("ready", flush=True)
    handles: dict[str, list[float]] = {}  # kind of callback: [CPU seconds, calls]
    if os.environ.get("FANOUT2_HANDLES"):  # time the loop's callbacks by what they run
        from profile_fanout_stages import handle_kind

        run = asyncio.Handle._run

        def timed_run(handle: asyncio.Handle) -> None:
            began = time.process_time()
            run(handle)
            spent = handles.setdefault(handle_kind(handle), [0.0, 0])
            spent[0] += time.process_time() - began
            spent[1] += 1

        asyncio.Handle._run = timed_run  # type: ignore[method-assign,assignment]
    profiler = None
    if os.environ.get("FANOUT2_PROFILE"):  # a cProfile dump of the rounds, per process
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        cpu = time.process_time()
        for index in itertools.count():
            last = await rounds.end(index)
            now = time.process_time()
            report = {**marks.times, "last": last, "cpu": (now - cpu) * 1000}
            report |= {"decodes": marks.decodes, "loops": marks.loops}
            print(json.dumps(report), flush=True)
            cpu, marks.times, marks.decodes, marks.loops = now, {}, 0, 0
            if handles and index == rounds_count:
                write_handles(f"{os.environ['FANOUT2_HANDLES']}.{row}.{os.getpid()}", handles, index)
            if profiler is not None and index == rounds_count:  # the sender's last: it kills us next
                profiler.disable()
                profiler.dump_stats(f"{os.environ['FANOUT2_PROFILE']}.{row}.{os.getpid()}")
    finally:
        await harness.stop(tasks)
        await impl.close(layer)


async def measure(row: str, server: harness.Server, receivers: int, rounds: int) -> dict[str, float]:
    """Medians over ``rounds`` rounds of one pass of ``row``."""
    namespace = "f" + os.urandom(5).hex()
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    job = json.dumps([row, server, namespace, receivers // 2, rounds])
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child", job, stdout=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outputs = [proc.stdout for proc in procs if proc.stdout is not None]
    impl = find_impl(row)
    sender = impl.make(server, namespace)
    samples: dict[str, list[float]] = {}
    try:
        for output in outputs:
            if (await output.readline()).strip() != b"ready":
                raise RuntimeError("a receiving process did not start")
        await asyncio.sleep(0.5)  # group_add's subscriptions settle on the broker
        broker_cpu = 0.0
        by_pid: dict[int, float] = {}
        profiler = None
        for index in range(rounds + 1):
            if index == 1:  # round 0 warms up; count the broker from here on
                broker_cpu = harness.process_cpu(server["pids"])
                by_pid = broker_threads(server["pids"])
                if os.environ.get("FANOUT2_PROFILE"):
                    import cProfile

                    profiler = cProfile.Profile()
                    profiler.enable()
            began, cpu = time.time(), time.process_time()
            await sender.group_send("room", {"type": "bench.fan", "round": index})
            returned = time.time()
            sender_cpu = time.process_time() - cpu
            reports = [json.loads(await output.readline()) for output in outputs]
            if index == 0:
                continue
            reports.sort(key=lambda report: report["last"])
            values = {"ret": (returned - began) * 1000, "sender cpu": sender_cpu * 1000}
            for name, report in zip("ab", reports, strict=True):
                for stage in ("decode", "fanned", "last"):
                    if stage in report:
                        values[f"{name} {stage}"] = (report[stage] - began) * 1000
                for what in ("cpu", "decodes", "loops"):
                    values[f"{name} {what}"] = report[what]
            for key, value in values.items():
                samples.setdefault(key, []).append(value)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{os.environ['FANOUT2_PROFILE']}.{row}.sender")
        result = {key: statistics.median(values) for key, values in samples.items()}
        result["broker cpu"] = (harness.process_cpu(server["pids"]) - broker_cpu) * 1000 / rounds
        if os.environ.get("FANOUT2_BROKER"):
            after = broker_threads(server["pids"])
            spent = sorted(((after[key] - by_pid.get(key, 0.0), key) for key in after), reverse=True)
            print(
                "   broker ms/round by process/thread:",
                ", ".join(f"{name} {cpu * 1000 / rounds:.3f}" for cpu, name in spent[:8] if cpu),
            )
        return result
    finally:
        await impl.close(sender)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def broker_threads(pids: list[int]) -> dict[Any, float]:
    """CPU seconds so far of every thread of the broker's process tree, by (pid, thread name)."""
    spent: dict[Any, float] = {}
    for pid in harness.process_tree(pids):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                name, fields = (task / "stat").read_text().rsplit(")", 1)
                ticks = int(fields.split()[11]) + int(fields.split()[12])
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[:40]
                spent[f"{pid}/{name.split('(', 1)[1]}/{title}"] = ticks / os.sysconf("SC_CLK_TCK")
    return spent


KEYS = (
    "ret",
    "a decode",
    "a fanned",
    "a last",
    "b decode",
    "b fanned",
    "b last",
    "sender cpu",
    "a cpu",
    "b cpu",
    "broker cpu",
    "a decodes",
    "a loops",
    "b loops",
)


def line(result: dict[str, float]) -> str:
    return "  ".join(f"{key} {result[key]:.3g}" for key in KEYS if key in result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--row", action="append", choices=sorted(ROWS), default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(*json.loads(args.child)))
        return
    names = args.row or ["redis", "postgresql", "nats", "rabbitmq"]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        started: dict[str, harness.Server] = {}
        for broker in {ROWS[name] for name in names}:
            module = __import__(f"bench_{broker}")
            started[broker] = {"broker": broker, **stack.enter_context(module.server())}
        servers = {name: started[ROWS[name]] for name in names}
        for index in range(args.repeat):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                result = asyncio.run(measure(name, servers[name], args.receivers, args.rounds))
                results[name].append(result)
                print(f"{index} {name:10} {line(result)}  load {os.getloadavg()[0]:.1f}", flush=True)
    print("\nmedians over passes (ms from the group_send call; CPU ms and counts per round):")
    for name, runs in results.items():
        keys = [key for key in KEYS if all(key in run for run in runs)]
        print(f"{name:10} {line({key: statistics.median(run[key] for run in runs) for key in keys})}")


if __name__ == "__main__":
    main()
