"""Where each process's CPU goes in the harness's p2p2 (the sender in another process), per message.

``.venv/bin/python bench/profile_p2p2.py --backend rabbitmq --tree main=/tmp/base --tree new=. --repeat 3``
starts one broker and runs, ``repeat`` times and alternating the trees' order, the harness's own
``p2p2`` scenario (``harness.p2p2`` in a worker, ``harness.p2p_part`` in its child, that tree first
on ``PYTHONPATH``) with ``--senders`` closed-loop senders (any number from 1) and a fixed
``--messages`` count, after a one-sender loop of 50 messages. For the counted loop it prints,
per message and per process (sender = the child, receiver = the worker), user and system CPU
(from /proc, 10 ms ticks), the event loop's handles run and loop iterations, and the broker's
CPU. The worker finds the counted loop's start and end by counting arrivals (the time stamps
``p2p2`` takes for its reports), the child around ``closed_loop``.

Options, each for a separate run (each slows what it watches): ``--bytecodes`` counts Python
bytecodes a message by function in both processes (the opcode tracer of
``count_bytecodes.py``); ``--functions N`` adds a cProfile (CPU clock) of one process
(``--profile sender`` or ``receiver``), top N by own time; ``--spy FILE`` samples both
processes over the counted loop into ``FILE.sender`` and ``FILE.receiver``, with py-spy (on
``PATH``; raw stacks, whenever the process is not asleep, so waiting for a core counts) or,
with ``PROFILE_PERF=1``, with ``perf record -e cpu-clock`` (only while on a CPU, the kernel
included: ``perf report -i FILE.sender --sort dso``); ``--strace FILE`` runs the sender under
``strace -c -f`` (``PROFILE_STRACE`` replaces ``-c``, e.g. ``"-k -e trace=mmap"``), whole
process: difference two ``--messages`` to leave start-up out. ``PROFILE_HANDLES=1`` lists
handles by callback, ``PROFILE_TURNS=N`` the callbacks of the counted loop's first N handles
with their loop turn (a round, step by step). For RabbitMQ the sender also reports the broker's
``fsync`` calls over its counted loop (the node's own counters, as ``profile_rabbitmq_p2p.py``
reads them), the sends each publish to an inbox carried and the mean time from a publish to its
confirm; ``PROFILE_TRANSIENT=1`` makes the sending layer publish transient messages.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import importlib
import io
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
# Last: a worker imports the package from its tree (PYTHONPATH); only tests.servers comes from here.
sys.path.append(str(BENCH.parent))
import count_bytecodes  # noqa: E402
import count_p2p_bytecodes  # noqa: E402
import harness  # noqa: E402
import profile_rabbitmq_p2p  # noqa: E402
from profile_rabbitmq_p2p import LoopCounts  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def user_system(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far, threads included."""
    fields = harness._stat_fields(Path(f"/proc/{pid}"))
    return int(fields[11]) / TICK, int(fields[12]) / TICK


class Probe:
    """This process's counts around the counted loop: CPU split, loop handles, an optional profile."""

    def __init__(self, profile: bool, spy: str | None = None, bytecodes: bool = False) -> None:
        #: The opcode tracer of count_bytecodes.py over the counted loop (slows it 10x and more).
        self.bytecodes = bytecodes
        self.turn_log: list[str] = []
        self.counts = LoopCounts()
        #: py-spy's output file: a sampling profile of this process over the counted loop.
        self.spy = spy
        self.spying: subprocess.Popen[bytes] | None = None
        self.profile = cProfile.Profile(time.process_time) if profile else None
        self.before: tuple[float, ...] = ()
        self.after: tuple[float, ...] = ()

    def timeline(self, handles: int) -> None:
        """Record the callback of the next ``handles`` handles, by loop turn (PROFILE_TURNS=N)."""
        counts, record = self.counts, self.turn_log
        handle_run = asyncio.Handle._run

        def run(handle: asyncio.Handle) -> None:
            if len(record) < handles:
                record.append(f"turn {counts.turns:6d}  {profile_rabbitmq_p2p._callback_name(handle)}")
            handle_run(handle)

        asyncio.Handle._run = run  # type: ignore[method-assign,assignment]

    def now(self) -> tuple[float, ...]:
        return (*user_system(os.getpid()), self.counts.handles, self.counts.turns)

    def start(self) -> None:
        if self.counts.by_name is not None:
            self.counts.by_name.clear()
        if os.environ.get("PROFILE_TURNS"):
            self.timeline(int(os.environ["PROFILE_TURNS"]))
        if self.spy:
            pid = str(os.getpid())
            if os.environ.get("PROFILE_PERF"):
                # perf samples on the CPU clock: only while this process runs, kernel included.
                command = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-p", pid, "-o", self.spy]
            else:
                # py-spy samples whatever is not asleep: runnable but waiting for a core counts too.
                command = ["py-spy", "record", "--pid", pid, "--nonblocking", "-r", "500", "--format", "raw"]
                command += ["-o", self.spy]
            self.spying = subprocess.Popen(command)
            time.sleep(0.5)  # its attach
        self.before = self.now()
        if self.profile is not None:
            self.profile.enable()
        if self.bytecodes:
            count_bytecodes._arm_suspended()
            sys.settrace(count_bytecodes._tracer)

    def stop(self) -> None:
        if self.bytecodes:
            sys.settrace(None)
        if self.profile is not None:
            self.profile.disable()
        self.after = self.now()
        if self.spying is not None:
            self.spying.send_signal(signal.SIGINT)
            self.spying.wait()

    def figures(self, messages: int, functions: int) -> dict[str, Any]:
        """Per message of the counted loop; ``package``: where this process's layer came from."""
        keys = ("user_us", "system_us", "handles", "turns")
        scale = (1e6, 1e6, 1, 1)
        figures: dict[str, Any] = {
            key: (b - a) * s / messages
            for key, a, b, s in zip(keys, self.before, self.after, scale, strict=True)
        }
        package = sys.modules.get("fastapi_websockets")
        figures["package"] = getattr(package, "__file__", None)
        text = "\n".join(self.turn_log)
        if self.counts.by_name is not None:
            text += "\n".join(
                f"{count / messages:6.2f}/msg {name}" for name, count in self.counts.by_name.most_common(25)
            )
        if self.bytecodes:
            counts, calls = count_bytecodes._bytecodes, count_bytecodes._calls
            groups: collections.Counter[str] = collections.Counter()
            for key, count in counts.items():
                groups[count_p2p_bytecodes.group(key, "rabbitmq")] += count
            text += f"bytecodes a message: {sum(counts.values()) / messages:,.1f}\n  "
            text += ", ".join(f"{name} {count / messages:,.1f}" for name, count in groups.most_common())
            for key, count in counts.most_common(60):
                text += f"\n{count / messages:8.1f}  {calls[key] / messages:5.2f} calls  {key}"
        if self.profile is not None:
            out = io.StringIO()
            stats = pstats.Stats(self.profile, stream=out)
            stats.sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(functions)
            text += "\n" + out.getvalue()
        if text:
            figures["profile"] = text
        return figures


def counted_loops(
    probe: Probe, messages: int, server: dict[str, Any] | None = None, packs: Any = None
) -> dict[str, Any]:
    """Patch harness.closed_loop: the first loop 50 messages long, the next one counted by ``probe``.

    The sending process runs ``p2p_loops`` with sizes["p2p_senders"] = [1, --senders] (see
    :func:`part`): one sender warms the link up, as the harness's one-sender loop did before
    its 16-sender one, whatever the counted loop's number of senders.

    With a RabbitMQ ``server``, the returned dict gets the node's file-handle counters before
    and after the counted loop (``io_before``, ``io_after``), and with ``packs`` (from
    :func:`count_all_packs`) its totals then (``packs_before``, ``packs_after``).
    """
    closed_loop = harness.closed_loop
    io: dict[str, Any] = {}
    loops = 0

    async def loop(send: Any, waiting: Any, count: int, sizes: Any) -> dict[str, float]:
        nonlocal loops
        loops += 1
        if loops == 1:
            return await closed_loop(send, waiting, count, {**sizes, "p2p_messages": 50})
        if server is not None and "ctl" in server:
            io["io_before"] = profile_rabbitmq_p2p.broker_io(server)
        if packs is not None:
            io["packs_before"] = packs()
        probe.start()
        result = await closed_loop(send, waiting, count, {**sizes, "p2p_messages": messages})
        probe.stop()
        if packs is not None:
            io["packs_after"] = packs()
        if server is not None and "ctl" in server:
            io["io_after"] = profile_rabbitmq_p2p.broker_io(server)
        return result

    harness.closed_loop = loop  # type: ignore[assignment]
    return io


def count_all_packs() -> Any:
    """Every RabbitMQ layer made from now on counts its publishes to an inbox by sends carried.

    Returns a function giving the totals so far: (sends a publish -> publishes, the times from
    each publish to its confirm, in seconds).
    """
    from fastapi_websockets.backends import packing

    counters: list[tuple[collections.Counter[int], list[float]]] = []
    init = packing.Packer.__init__

    def counting_init(packer: Any, **kwargs: Any) -> None:
        init(packer, **kwargs)
        packs, times = profile_rabbitmq_p2p.count_packs(type("Holder", (), {"_packer": packer})())
        assert packs is not None
        counters.append((packs, times))

    packing.Packer.__init__ = counting_init  # type: ignore[method-assign,assignment]

    def totals() -> tuple[collections.Counter[int], list[float]]:
        packs: collections.Counter[int] = collections.Counter()
        times: list[float] = []
        for counted, timed in counters:
            packs.update(counted)
            times += timed
        return packs, times

    return totals


def part(job: dict[str, Any], args: argparse.Namespace) -> None:
    """The child: ``harness.p2p_part`` with the counted loop; its figures on stdout as p2p2 expects."""
    probe = Probe(
        args.profile == "sender" and args.functions > 0, args.spy and f"{args.spy}.sender", args.bytecodes
    )
    packs = count_all_packs() if job["server"]["broker"] == "rabbitmq" else None
    if os.environ.get("PROFILE_TRANSIENT"):
        # Measurement only: the sending layer publishes transient messages (persistent_sends=False).
        from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer

        make = RabbitMQChannelLayer.__init__

        def transient(layer: Any, *args: Any, **kwargs: Any) -> None:
            make(layer, *args, **{**kwargs, "persistent_sends": False})

        RabbitMQChannelLayer.__init__ = transient  # type: ignore[method-assign,assignment]
    io = counted_loops(probe, args.messages, job["server"], packs)
    impl = harness.find_impl(job["server"]["broker"], job["impl"])
    sizes = {
        "p2p_seconds": 600.0,
        "p2p_messages": args.messages,
        "limit": 600.0,
        "p2p_senders": [1, args.senders],
    }

    async def run() -> dict[str, Any]:
        probe.counts.install(asyncio.get_running_loop())
        result = await harness.p2p_part(impl, job["server"], job["ns"], sizes)
        figures = probe.figures(args.messages, args.functions)
        if "packs_after" in io:
            (packs_before, times_before), (packs_after, times_after) = io["packs_before"], io["packs_after"]
            figures["packs"] = dict(sorted((packs_after - packs_before).items()))
            counted = times_after[len(times_before) :]
            figures["confirm_ms"] = sum(counted) / max(len(counted), 1) * 1000
        if "io_after" in io:
            a, b = io["io_before"], io["io_after"]
            syncs = b.get("io_sync_count", 0) - a.get("io_sync_count", 0)
            figures["fsync_per_msg"] = syncs / args.messages
            figures["fsync_us"] = (b.get("io_sync_time", 0) - a.get("io_sync_time", 0)) / max(syncs, 1)
        return result | {"sender": figures}

    try:
        result = asyncio.run(run())
    except Exception as exc:  # the worker prints this as the sending process's error
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)


def worker(job: dict[str, Any], args: argparse.Namespace) -> None:
    """The receiving worker: ``harness.p2p2`` with this script as the child and itself counted.

    It does not see the child's loop begin and end, so it counts by arrivals: from the first
    of the counted loop (after the warm-up and the one-sender loop's 50) to the last.
    """
    probe = Probe(
        args.profile == "receiver" and args.functions > 0, args.spy and f"{args.spy}.receiver", args.bytecodes
    )
    child_args = ["--part", json.dumps(job), *forwarded(args)]
    # PROFILE_STRACE replaces -c (a summary): "-k -e trace=mmap" lists those calls with their stacks.
    options = os.environ.get("PROFILE_STRACE", "-c").split()
    strace = ["strace", *options, "-f", "-o", args.strace] if args.strace else []

    @contextlib.asynccontextmanager
    async def parts(*_: Any) -> AsyncIterator[list[asyncio.subprocess.Process]]:
        child = await asyncio.create_subprocess_exec(
            *strace,
            sys.executable,
            __file__,
            *child_args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            yield [child]
            # strace writes its summary as it exits: not killed before it did.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(child.wait(), 10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()

    harness.parts = parts  # type: ignore[assignment]
    # The worker counts from the first message of the counted loop to its last, known by id:
    # the warm-up (-1) and the one-sender loop's 50 come first.
    first, last = 50, 50 + args.messages - 1
    time_perf = time.perf_counter

    class Clock:
        """perf_counter, as p2p2 stamps each arrival, starting and stopping the probe by id."""

        seen = 0

        @staticmethod
        def perf_counter() -> float:
            Clock.seen += 1
            if Clock.seen == first + 2:  # the warm-up message and the first 50 arrived
                probe.start()
            elif Clock.seen == last + 2:
                probe.stop()
            return time_perf()

    sizes = {"p2p_seconds": 600.0, "p2p_messages": args.messages, "limit": 600.0}
    impl = harness.find_impl(job["server"]["broker"], job["impl"])

    async def run() -> dict[str, Any]:
        probe.counts.install(asyncio.get_running_loop())
        real_time = harness.time  # type: ignore[attr-defined]
        harness.time = Clock  # type: ignore[attr-defined,assignment]
        try:
            result = await harness.p2p2(impl, job["server"], job["ns"], sizes)
        finally:
            harness.time = real_time  # type: ignore[attr-defined]
        return result | {"receiver": probe.figures(args.messages, args.functions)}

    print(json.dumps(asyncio.run(run())), flush=True)


def forwarded(args: argparse.Namespace) -> list[str]:
    """The options the worker and its child are run with: what to count and how."""
    options = ["--senders", str(args.senders), "--messages", str(args.messages)]
    options += ["--profile", args.profile, "--functions", str(args.functions)]
    if args.spy:
        options += ["--spy", args.spy]
    if args.bytecodes:
        options.append("--bytecodes")
    return options


def run_worker(tree: Path, server: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    job = {
        "impl": args.row or args.backend,
        "scenario": "p2p2",
        "server": server,
        "ns": "q" + uuid.uuid4().hex[:10],
    }
    command = [sys.executable, __file__, "--worker", json.dumps(job), *forwarded(args)]
    if args.strace:
        command += ["--strace", args.strace]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    cleanup = getattr(importlib.import_module(f"bench_{args.backend}"), "cleanup", None)
    if cleanup is not None:
        cleanup(server, job["ns"])
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": done.stderr.strip()[-800:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def show(result: dict[str, Any], senders: int) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    name = f"p2p{senders}"
    s, r = result["sender"], result["receiver"]
    return (
        f"rate {result[name + '_rate']:8,.0f}/s  sender user {s['user_us']:5.1f} sys {s['system_us']:5.1f} "
        f"handles {s['handles']:5.2f} turns {s['turns']:5.2f} | receiver user {r['user_us']:5.1f} "
        f"sys {r['system_us']:5.1f} handles {r['handles']:5.2f} turns {r['turns']:5.2f} | broker "
        f"{result.get(name + '_broker_cpu_us', 0):5.1f} us/msg  "
        f"reads {result.get(name + '_reads_per_msg', 0):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="rabbitmq")
    parser.add_argument("--row", help="the harness row (default: the backend's name)")
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--functions", type=int, default=0)
    parser.add_argument("--profile", choices=("sender", "receiver"), default="sender")
    parser.add_argument("--strace", help="strace -c -f the sender into this file")
    parser.add_argument(
        "--spy", help="py-spy (on PATH) both processes' counted loop into FILE.sender/.receiver"
    )
    parser.add_argument("--bytecodes", action="store_true", help="Python bytecodes a message, by function")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.senders < 1:
        parser.error("--senders: at least 1 closed-loop sender")
    if args.part:
        part(json.loads(args.part), args)
        return
    if args.worker:
        worker(json.loads(args.worker), args)
        return
    trees = [(name, Path(path).resolve()) for name, path in (tree.split("=", 1) for tree in args.tree)]
    if not trees:
        trees = [("here", BENCH.parent)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    module = importlib.import_module(f"bench_{args.backend}")
    with module.server() as running:
        server = {"broker": args.backend, **running}
        for index in range(args.repeat):
            for name, tree in trees if index % 2 == 0 else trees[::-1]:
                result = run_worker(tree, server, args)
                results[name].append(result)
                print(
                    f"{index} {name:6} {show(result, args.senders)}  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                sender = result.get("sender", {})
                if "fsync_per_msg" in sender:
                    print(
                        f"  fsync {sender['fsync_per_msg']:.3f}/msg, {sender['fsync_us']:.0f} us each; "
                        f"confirm {sender['confirm_ms']:.3f} ms; sends a publish: {sender['packs']}"
                    )
                for side in ("sender", "receiver"):
                    if index == 0 and "package" in result.get(side, {}):
                        print(f"  {name} {side}: {result[side]['package']}")
                    if "profile" in result.get(side, {}):
                        print(f"--- {side}\n{result[side]['profile']}")
                if args.strace and "PROFILE_STRACE" not in os.environ:
                    print(Path(args.strace).read_text())
    for name, runs in results.items():
        good = [run for run in runs if "error" not in run]
        if good:
            med = {
                side: {
                    k: statistics.median(r[side][k] for r in good)
                    for k in ("user_us", "system_us", "handles", "turns")
                }
                for side in ("sender", "receiver")
            }
            rate = statistics.median(r[f"p2p{args.senders}_rate"] for r in good)
            broker = statistics.median(r.get(f"p2p{args.senders}_broker_cpu_us", 0) for r in good)
            figures = {f"p2p{args.senders}_rate": rate, f"p2p{args.senders}_broker_cpu_us": broker, **med}
            print(f"median {name:6} {show(figures, args.senders)}")


if __name__ == "__main__":
    main()
