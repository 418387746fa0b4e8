"""What a RabbitMQ p2p send costs: client CPU, broker CPU, event-loop callbacks and publishes, per message.

``.venv/bin/python bench/profile_rabbitmq_p2p.py --tree main=/tmp/rmq-main --tree new=. --repeat 4``
starts one RabbitMQ node and runs, ``repeat`` times and alternating the trees' order, a fresh worker
per tree (that tree first on ``PYTHONPATH``) doing the harness's p2p scenario with a fixed number
of messages instead of a time window: two layer instances in the worker, ``--senders`` closed-loop
sender tasks, one receiver task. Per run it prints the worker's CPU per message
(``time.process_time``), the broker's (from /proc), the event loop's handles run and loop
iterations per message, publishes per message (where the layer counts them) and the rate, then the
medians per tree. ``--functions N`` adds a cProfile (CPU clock) of each worker's sends, the top N
functions by own time (it slows those runs down).

The broker's file work in the counted window comes from its own counters
(``file_handle_cache_stats``, read with ``rabbitmqctl eval`` before and after): ``fsync``
calls a message and a publish, and their mean duration as the node timed them. ``confirm``
is the mean time from the packer's publish call to its confirm. ``--set NAME:KEY=VALUE``
changes one tree's sending or receiving layer for the run (measurement only):
``persistent=0`` (transient sends), ``in_flight=N`` (the packer's limit per inbox),
``max_frames=N`` (sends a packed publish carries at most), ``ack_delay=S`` (the receiver's
batched-ack delay, seconds); the same tree may be
given twice under two names.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
# Last: a worker imports the package from its tree (PYTHONPATH); only tests.servers comes from here.
sys.path.append(str(BENCH.parent))
import bench_rabbitmq  # noqa: E402
import harness  # noqa: E402


class LoopCounts:
    """Counts handles run and loop iterations (patched into asyncio's Python classes)."""

    def __init__(self) -> None:
        self.handles = 0
        self.turns = 0
        #: Handles run by callback (PROFILE_HANDLES=1 in the environment), for --functions runs.
        self.by_name: collections.Counter[str] | None = (
            collections.Counter() if os.environ.get("PROFILE_HANDLES") else None
        )

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        counts = self
        handle_run = asyncio.Handle._run

        by_name = self.by_name

        def run(handle: asyncio.Handle) -> None:
            counts.handles += 1
            if by_name is not None:
                by_name[_callback_name(handle)] += 1
            handle_run(handle)

        asyncio.Handle._run = run  # type: ignore[method-assign,assignment]
        run_once = loop._run_once  # type: ignore[attr-defined]

        def once() -> None:
            counts.turns += 1
            run_once()

        loop._run_once = once  # type: ignore[attr-defined]


def _callback_name(handle: asyncio.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task step {getattr(coro, '__qualname__', coro)}"
    return str(getattr(callback, "__qualname__", callback))


def broker_io(server: dict[str, Any]) -> dict[str, int]:
    """The node's file-handle counters: ``io_sync_count``, ``io_sync_time`` (µs), ``io_write_bytes``, ..."""
    expression = (
        'lists:flatten([io_lib:format("~s_~s=~b ", [Op, C, V]) '
        "|| {{Op, C}, V} <- file_handle_cache_stats:get()])."
    )
    done = subprocess.run(
        [*server["ctl"], "eval", expression],
        env={**os.environ, **server["env"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", done.stdout)}


def apply_settings(sender: Any, receiver: Any, settings: dict[str, str]) -> None:
    """Changes for one run (``--set``): transient sends, the packer's in-flight limit, the ack delay."""
    if "persistent" in settings:
        sender._persistent_sends = settings["persistent"] not in ("0", "false", "no")
    if "in_flight" in settings:
        sender._packer._limit = int(settings["in_flight"])
    if "max_frames" in settings:
        sender._packer._max_frames = int(settings["max_frames"])
    if "ack_delay" in settings:
        receiver._acks._delay = float(settings["ack_delay"])


async def measure(
    server: dict[str, Any], senders: int, messages: int, functions: int, settings: dict[str, str]
) -> dict[str, Any]:
    counts = LoopCounts()
    counts.install(asyncio.get_running_loop())
    impl = harness.find_impl("rabbitmq", "rabbitmq")
    namespace = "q" + uuid.uuid4().hex[:10]
    pids = server.get("pids", [])
    async with (
        harness.layer_pair(impl, server, namespace) as (sender, receiver),
        harness.p2p_link(sender, receiver) as (send, waiting),
    ):
        sizes = {"p2p_seconds": 600.0, "p2p_messages": 200}
        apply_settings(sender, receiver, settings)
        await harness.closed_loop(send, waiting, senders, sizes)  # warm-up
        sizes["p2p_messages"] = messages
        waiting.clear()
        packs, confirm_times = count_packs(sender)
        io_before = broker_io(server) if "ctl" in server else {}
        profile = cProfile.Profile(time.process_time) if functions else None

        def now() -> tuple[float, ...]:
            return (
                time.process_time(),
                harness.process_cpu(pids),
                counts.handles,
                counts.turns,
                getattr(sender, "publishes", 0),
                time.perf_counter(),
            )

        before = now()
        if counts.by_name is not None:
            counts.by_name.clear()
        if profile is not None:
            profile.enable()
        result = await harness.closed_loop(send, waiting, senders, sizes)
        if profile is not None:
            profile.disable()
        after = now()
        io_after = broker_io(server) if "ctl" in server else {}
    done = len(waiting)
    figures: dict[str, Any] = {
        "client_us": (after[0] - before[0]) / done * 1e6,
        "broker_us": (after[1] - before[1]) / done * 1e6,
        "handles": (after[2] - before[2]) / done,
        "turns": (after[3] - before[3]) / done,
        "publishes": (after[4] - before[4]) / done,
        "rate": done / (after[5] - before[5]),
        "p50_ms": result["p50"] * 1000,
        "package": sys.modules[type(sender).__module__].__file__,
    }
    if packs is not None:
        figures["packs"] = dict(sorted(packs.items()))
        published = sum(packs.values())
        figures["confirm_ms"] = sum(confirm_times) / max(len(confirm_times), 1) * 1000
    else:
        published = max(int(after[4] - before[4]), 1)
    if io_before and io_after:
        syncs = io_after.get("io_sync_count", 0) - io_before.get("io_sync_count", 0)
        figures["fsync_per_msg"] = syncs / done
        figures["fsync_per_publish"] = syncs / max(published, 1)
        sync_time = io_after.get("io_sync_time", 0) - io_before.get("io_sync_time", 0)
        figures["fsync_us"] = sync_time / max(syncs, 1)
        figures["fsync_share"] = sync_time / 1e6 / (after[5] - before[5])
        written = io_after.get("io_write_bytes", 0) - io_before.get("io_write_bytes", 0)
        figures["written_per_msg"] = written / done
    if counts.by_name is not None:
        figures["profile"] = "\n".join(
            f"{count / done:6.2f}/msg {name}" for name, count in counts.by_name.most_common(30)
        )
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(
            functions
        )
        figures["profile"] = figures.get("profile", "") + out.getvalue()
    return figures


def count_packs(layer: Any) -> tuple[collections.Counter[int] | None, list[float]]:
    """Publishes to an inbox by the number of sends they carried, from now on (None without a packer).

    Wraps the packer's two publish functions on this instance: the histogram shows whether the
    senders of a round travel as one message or split (``{1: 795, 15: 748}`` against ``{16: 750}``).
    The list gets each publish's time from the call to its confirm, in seconds.
    """
    times: list[float] = []
    packer = getattr(layer, "_packer", None)
    if packer is None or not hasattr(packer, "_send_one"):
        return None, times
    packs: collections.Counter[int] = collections.Counter()
    send_one, send_many = packer._send_one, packer._send_many
    clock = time.perf_counter

    async def one(destination: str, channel: str, data: bytes) -> None:
        packs[1] += 1
        began = clock()
        await send_one(destination, channel, data)
        times.append(clock() - began)

    async def many(destination: str, frames: list[tuple[str, bytes]]) -> None:
        packs[len(frames)] += 1
        began = clock()
        await send_many(destination, frames)
        times.append(clock() - began)

    packer._send_one, packer._send_many = one, many
    return packs, times


def run_worker(
    tree: Path, server: dict[str, Any], args: argparse.Namespace, settings: dict[str, str]
) -> dict[str, Any]:
    job = json.dumps(
        {"server": server, "senders": args.senders, "messages": args.messages, "settings": settings}
    )
    done = subprocess.run(
        [sys.executable, __file__, "--worker", job, "--functions", str(args.functions)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": done.stderr.strip()[-500:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


KEYS = ("client_us", "broker_us", "handles", "turns", "publishes", "rate", "p50_ms")
#: Printed when the run measured them.
IO_KEYS = ("confirm_ms", "fsync_per_msg", "fsync_per_publish", "fsync_us", "fsync_share", "written_per_msg")


def show(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    return (
        f"client {result['client_us']:6.1f} us/msg  broker {result['broker_us']:6.1f} us/msg  "
        f"handles {result['handles']:5.2f}/msg  loop turns {result['turns']:5.2f}/msg  "
        f"publishes {result['publishes']:5.3f}/msg  rate {result['rate']:8,.0f}/s  "
        f"p50 {result['p50_ms']:.2f} ms"
        + (
            f"\n    confirm {result['confirm_ms']:.3f} ms  fsync {result['fsync_per_msg']:.3f}/msg "
            f"{result['fsync_per_publish']:.3f}/publish {result['fsync_us']:.0f} us each, "
            f"{result['fsync_share']:.2f} of the window  written {result['written_per_msg']:.0f} B/msg"
            if all(key in result for key in IO_KEYS)
            else ""
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--messages", type=int, default=6_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--functions", type=int, default=0, help="cProfile (CPU clock) top N by own time")
    parser.add_argument(
        "--set", action="append", default=[], help="NAME:KEY=VALUE, a measurement-only change for one tree"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = asyncio.run(
            measure(job["server"], job["senders"], job["messages"], args.functions, job["settings"])
        )
        print(json.dumps(result), flush=True)
        return
    trees = [(name, Path(path).resolve()) for name, path in (tree.split("=", 1) for tree in args.tree)]
    if not trees:
        trees = [("here", BENCH.parent)]
    settings: dict[str, dict[str, str]] = {name: {} for name, _ in trees}
    for change in args.set:
        name, _, assignment = change.partition(":")
        key, _, value = assignment.partition("=")
        settings[name][key] = value
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    with bench_rabbitmq.server() as rabbit:
        server = {"broker": "rabbitmq", **rabbit}
        for index in range(args.repeat):
            for name, tree in trees if index % 2 == 0 else trees[::-1]:
                result = run_worker(tree, server, args, settings[name])
                results[name].append(result)
                print(f"{index} {name:8} {show(result)}  load {os.getloadavg()[0]:.1f}", flush=True)
                if "packs" in result:
                    print(f"  sends a publish: {result['packs']}")
                if index == 0 and "package" in result:
                    print(f"  {name}: {result['package']}")
                if "profile" in result:
                    print(result["profile"])
    for name, runs in results.items():
        good = [run for run in runs if "error" not in run]
        if good:
            print(
                f"median {name:8} "
                + show(
                    {
                        key: statistics.median(run[key] for run in good)
                        for key in KEYS + IO_KEYS
                        if all(key in run for run in good)
                    }
                )
            )


if __name__ == "__main__":
    main()
