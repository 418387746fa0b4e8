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


async def measure(server: dict[str, Any], senders: int, messages: int, functions: int) -> dict[str, Any]:
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
        await harness.closed_loop(send, waiting, senders, sizes)  # warm-up
        sizes["p2p_messages"] = messages
        waiting.clear()
        packs = count_packs(sender)
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


def count_packs(layer: Any) -> collections.Counter[int] | None:
    """Publishes to an inbox by the number of sends they carried, from now on (None without a packer).

    Wraps the packer's two publish functions on this instance: the histogram shows whether the
    senders of a round travel as one message or split (``{1: 795, 15: 748}`` against ``{16: 750}``).
    """
    packer = getattr(layer, "_packer", None)
    if packer is None or not hasattr(packer, "_send_one"):
        return None
    packs: collections.Counter[int] = collections.Counter()
    send_one, send_many = packer._send_one, packer._send_many

    async def one(destination: str, channel: str, data: bytes) -> None:
        packs[1] += 1
        await send_one(destination, channel, data)

    async def many(destination: str, frames: list[tuple[str, bytes]]) -> None:
        packs[len(frames)] += 1
        await send_many(destination, frames)

    packer._send_one, packer._send_many = one, many
    return packs


def run_worker(tree: Path, server: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    job = json.dumps({"server": server, "senders": args.senders, "messages": args.messages})
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


def show(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    return (
        f"client {result['client_us']:6.1f} us/msg  broker {result['broker_us']:6.1f} us/msg  "
        f"handles {result['handles']:5.2f}/msg  loop turns {result['turns']:5.2f}/msg  "
        f"publishes {result['publishes']:5.3f}/msg  rate {result['rate']:8,.0f}/s  "
        f"p50 {result['p50_ms']:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--messages", type=int, default=6_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--functions", type=int, default=0, help="cProfile (CPU clock) top N by own time")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = asyncio.run(measure(job["server"], job["senders"], job["messages"], args.functions))
        print(json.dumps(result), flush=True)
        return
    trees = [(name, Path(path).resolve()) for name, path in (tree.split("=", 1) for tree in args.tree)]
    if not trees:
        trees = [("here", BENCH.parent)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    with bench_rabbitmq.server() as rabbit:
        server = {"broker": "rabbitmq", **rabbit}
        for index in range(args.repeat):
            for name, tree in trees if index % 2 == 0 else trees[::-1]:
                result = run_worker(tree, server, args)
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
                f"median {name:8} " + show({key: statistics.median(run[key] for run in good) for key in KEYS})
            )


if __name__ == "__main__":
    main()
