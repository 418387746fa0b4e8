"""Sends per second to one NATS named channel, source trees alternating in one run.

``python bench/rate_nats_named.py --tree main=/tmp/base --tree now=. --repeat 4`` starts one
nats-server and, ``repeat`` times, runs every case in a fresh process per tree (that tree first on
``PYTHONPATH``), alternating the trees' order from one repeat to the next so that load from the
rest of the machine falls on all of them alike. A case is ``--sends`` sends from one layer to one
named channel, split over 1, 4 or 16 concurrent senders, either with a reader (a second layer, in a
process of its own, receiving on the channel as fast as it can) or with none (capacity above the
sends). Each run prints sends/s, the JetStream requests per send the sending layer's client made
(counted by wrapping nats-py's ``Client.request`` in this script, by subject: counts, reads of
the newest message, publishes), how many publishes were refused, and the CPU time per send of
the sending process and of nats-server (from /proc, so Linux; the server's includes the reader's
requests); then the medians per (tree, case) with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi_websockets.backends.nats import NATSChannelLayer

SCRIPT = Path(__file__).resolve()
BENCH = SCRIPT.parent
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402

CHANNEL = "named.rate"
#: The sending layer's client methods a named send may call: what a send costs in requests.
REQUESTS = ("count", "read", "publish", "other")
WARM = 3


@contextlib.contextmanager
def counting_requests(calls: Counter[str]) -> Iterator[None]:
    """Count the requests of every NATS client of this process in ``calls`` by kind, and refused publishes.

    Every JetStream call is a request on the connection (nats-py's and any the
    layer makes itself), so the subject says which kind it is. Wrapped on the
    class, not on the layer's client: a layer replaces a client that nats-py
    closed for good (``_rebuild``), and a wrap of the old one counted nothing
    after that. Only the sending layer's clients live in a case's process.
    """
    from nats.aio.client import Client

    async def request(nc: Client, subject: str, *args: Any, **kwargs: Any) -> Any:
        kind = (
            "count"
            if subject.startswith("$JS.API.STREAM.INFO.")
            else "read"
            if subject.startswith(("$JS.API.STREAM.MSG.GET.", "$JS.API.DIRECT.GET."))
            else "publish"
            if not subject.startswith("$JS.API.")
            else "other"
        )
        calls[kind] += 1
        reply = await real(nc, subject, *args, **kwargs)
        if kind == "publish" and (b'"err_code":10071' in reply.data or b'"err_code":10164' in reply.data):
            calls["refused"] += 1
        return reply

    real = Client.request
    Client.request = request  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Client.request = real  # type: ignore[method-assign]


def layer_options(job: dict[str, Any]) -> dict[str, Any]:
    """The options of the sending and the reading layer: one namespace, capacity above the sends."""
    ns = job["ns"]
    return {
        "servers": [job["url"]],
        "prefix": ns,
        "group_bucket": ns,
        "stream_name": ns,
        "capacity": job["sends"] + 100,
    }


async def reader_child(job: dict[str, Any]) -> None:
    """The reader's process: takes the warm-up messages, says so, then receives every send."""
    from fastapi_websockets.backends.nats import NATSChannelLayer

    reader = NATSChannelLayer(**layer_options(job))
    try:
        for _ in range(WARM):
            await reader.receive(CHANNEL, timeout=30)
        print("ready", flush=True)
        for _ in range(job["sends"] // job["senders"] * job["senders"]):
            await reader.receive(CHANNEL, timeout=60)
    finally:
        await reader.close()


async def child(job: dict[str, Any]) -> dict[str, Any]:
    """One case in this process: ``job`` says the server, namespace, senders, sends and reader."""
    from fastapi_websockets.backends.nats import NATSChannelLayer

    calls: Counter[str] = Counter()
    with counting_requests(calls):
        return await _case(job, NATSChannelLayer(**layer_options(job)), calls)


async def _case(job: dict[str, Any], sender: NATSChannelLayer, calls: Counter[str]) -> dict[str, Any]:
    """:func:`child`'s case, ``sender`` sending, its requests counted in ``calls``."""
    sends, senders = job["sends"], job["senders"]
    reader: asyncio.subprocess.Process | None = None
    try:
        # Warm-up: the stream, the connection and (with a reader) its consumer exist before timing.
        for _ in range(WARM):
            await sender.send(CHANNEL, {"type": "warm"})
        if job["reader"]:
            # In a process of its own, as a reader elsewhere: it takes messages as soon as
            # they are stored, not when this process's sends let its event loop turn.
            reader = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SCRIPT),
                "--reader-child",
                json.dumps(job),
                stdout=asyncio.subprocess.PIPE,
            )
            assert reader.stdout is not None
            assert (await reader.stdout.readline()).strip() == b"ready"
        calls.clear()  # the warm-up's

        async def send_some(count: int) -> None:
            for _ in range(count):
                await sender.send(CHANNEL, {"type": "m"})

        share = sends // senders
        server_cpu = harness.own_cpu(job["server_pid"])
        cpu = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(send_some(share) for _ in range(senders)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        server_cpu = harness.own_cpu(job["server_pid"]) - server_cpu
        if reader is not None:
            assert await reader.wait() == 0
        sent = share * senders
        return {
            "rate": sent / elapsed,
            "cpu_us": cpu / sent * 1e6,
            "server_cpu_us": server_cpu / sent * 1e6,
            "requests": sum(calls[name] for name in REQUESTS) / sent,
            "reads": calls["read"] / sent,
            "refused": calls["refused"] / sent,
        }
    finally:
        if reader is not None and reader.returncode is None:
            reader.kill()
            await reader.wait()
        await sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="NAME=PATH, in run order (default: this tree)")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--sends", type=int, default=480, help="sends per run, split over the senders")
    parser.add_argument("--senders", default="1,4,16", help="concurrent senders of the one layer")
    parser.add_argument("--readers", default="reader,none", help="with a reader, with none, or both")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--reader-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader_child:
        asyncio.run(reader_child(json.loads(args.reader_child)))
        return
    if args.child:
        print(json.dumps(asyncio.run(child(json.loads(args.child)))), flush=True)
        return
    sys.path.insert(0, str(BENCH.parent))  # tests.servers, to start the broker
    import bench_nats
    import compare_trees

    named = args.tree or [f"this={BENCH.parent}"]
    trees = [(name, Path(path).resolve()) for name, path in (t.split("=", 1) for t in named)]
    cases = [(int(n), mode) for mode in args.readers.split(",") for n in args.senders.split(",")]
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    with bench_nats.server() as server:
        for index in range(args.repeat):
            order = trees if index % 2 == 0 else trees[::-1]
            for senders, mode in cases:
                for name, tree in order:
                    job = {
                        "url": server["url"],
                        "server_pid": server["pids"][0],
                        "ns": "r" + uuid.uuid4().hex[:10],
                        "sends": args.sends,
                        "senders": senders,
                        "reader": mode == "reader",
                    }
                    result = compare_trees.run_in_tree(tree, [str(SCRIPT), "--child", json.dumps(job)], 300)
                    results.setdefault((name, senders, mode), []).append(result)
                    shown = (
                        f"{result['rate']:,.0f} sends/s, {result['requests']:.2f} requests/send "
                        f"CPU/send {result['cpu_us']:.0f} µs here, {result['server_cpu_us']:.0f} µs server "
                        f"({result['reads']:.2f} reads, {result['refused']:.2f} refused)"
                        if "rate" in result
                        else result
                    )
                    print(
                        f"#{index} load {os.getloadavg()[0]:.2f} {name:>8} {senders:>2} senders "
                        f"{mode:6} {shown}",
                        flush=True,
                    )
    print("\nmedians:")
    for (name, senders, mode), rows in results.items():
        good = [r for r in rows if "error" not in r]
        if not good:
            print(f"{name:>8} {senders:>2} senders {mode:6} all {len(rows)} runs failed", flush=True)
            continue
        rates = ", ".join(f"{r['rate']:,.0f}" for r in good)
        print(
            f"{name:>8} {senders:>2} senders {mode:6} n={len(good)} "
            f"{statistics.median(r['rate'] for r in good):,.0f} sends/s ({rates}); "
            f"{statistics.median(r['requests'] for r in good):.2f} requests/send, "
            f"CPU/send {statistics.median(r['cpu_us'] for r in good):.0f} µs here, "
            f"{statistics.median(r['server_cpu_us'] for r in good):.0f} µs server, "
            f"{statistics.median(r['refused'] for r in good):.2f} refused",
            flush=True,
        )


if __name__ == "__main__":
    main()
