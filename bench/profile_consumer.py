"""Where a consumer's memory and CPU go: one uvicorn server in this process, clients in another.

Run from the repository root::

    .venv/bin/python bench/profile_consumer.py memory [--clients 1000] [--app ours_handler]
    .venv/bin/python bench/profile_consumer.py cpu [--clients 1000] [--broadcasts 200]

It serves one of the end-to-end benchmark's apps (``bench/e2e/*.py``, on the
in-memory layer unless ``FASTAPI_WEBSOCKETS_BACKEND`` says otherwise) with
uvicorn in this process and connects the clients of ``bench/e2e/clients.py``
from a child process, so that only the server's allocations and time are seen.

``memory``: tracemalloc snapshots before the clients and after they idled,
diffed; prints the bytes per connection by source line and the objects per
connection by type (from the garbage collector's view). ``rss``: the growth of
this process's resident set per connection, without tracemalloc (whose own
bookkeeping would count).
``cpu``: cProfile over ``--broadcasts`` group messages sent from this process,
each once the previous reached every client; prints the top functions by own
time and by cumulative time, per delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import gc
import json
import os
import pstats
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "bench" / "e2e"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(APPS))

from tests.servers import free_port  # noqa: E402


def rss_kb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024


def type_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(obj).__qualname__ for obj in gc.get_objects())


async def clients(count: int, port: int) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APPS / "clients.py"),
        "plain",
        str(count),
        "0",
        f"ws://127.0.0.1:{port}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=64 * 1024 * 1024,
    )
    assert proc.stdout is not None
    return proc, proc.stdout


async def next_event(stdout: asyncio.StreamReader, kind: str) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(stdout.readline(), 120)
        if not line:
            raise RuntimeError("the client process exited")
        event: dict[str, Any] = json.loads(line)
        if event["event"] == kind:
            return event


async def main(args: argparse.Namespace) -> None:
    import uvicorn

    app_module = __import__(args.app)
    port = free_port()
    config = uvicorn.Config(
        app_module.app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws=args.ws,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.05)
    from fastapi_websockets.layers import get_default_layer

    layer = get_default_layer()
    rss_before = rss_kb()
    if args.mode == "memory":
        tracemalloc.start(args.frames)
        types_before = type_counts()
        before = tracemalloc.take_snapshot()
    proc, stdout = await clients(args.clients, port)
    connected = await next_event(stdout, "connected")
    print(f"{connected['open']} clients connected ({connected['failed']} failed)")
    await asyncio.sleep(args.idle)
    if args.mode == "rss":
        gc.collect()
        print(f"RSS growth: {(rss_kb() - rss_before) / args.clients:.1f} KB per connection")
    elif args.mode == "memory":
        gc.collect()
        after = tracemalloc.take_snapshot()
        types_after = type_counts()
        tracemalloc.stop()
        stats = after.compare_to(before, "traceback" if args.tracebacks else "lineno")
        total = sum(stat.size_diff for stat in stats)
        print(f"\ntraced growth: {total / args.clients:.0f} bytes per connection; top lines:")
        for stat in stats[: args.top]:
            if args.tracebacks:
                print(f"{stat.size_diff / args.clients:8.0f} B  {stat.count_diff / args.clients:6.2f} blocks")
                for line in stat.traceback.format()[-2 * args.frames :]:
                    print("            " + line)
            else:
                frame = stat.traceback[0]
                where = f"{frame.filename.replace(str(ROOT), '.')}:{frame.lineno}"
                per_connection = stat.size_diff / args.clients
                print(f"{per_connection:8.0f} B  {stat.count_diff / args.clients:6.2f} blocks  {where}")
        print("\nobjects per connection, by type:")
        diff = types_after - types_before
        for name, count in diff.most_common(args.top):
            print(f"{count / args.clients:8.2f}  {name}")
    else:
        from payload import ROOM, message

        publish = getattr(app_module, "publish", None)  # bench/e2e/floor_app.py has no layer
        event = getattr(app_module, "event", None)  # the envelope app sends no bench.message

        async def broadcasts(first: int) -> float:
            started = time.process_time()
            for seq in range(first, first + args.broadcasts):
                if publish is not None:
                    await publish(seq)
                elif event is not None:
                    await layer.group_send(ROOM, event(seq))
                else:
                    await layer.group_send(ROOM, {"type": "bench.message", "body": message(seq)})
                await next_event(stdout, "round")
            return time.process_time() - started

        deliveries = args.broadcasts * args.clients
        await broadcasts(-args.broadcasts)  # warm-up
        unprofiled = [await broadcasts(run * args.broadcasts) for run in range(args.repeat)]
        print(
            f"without the profiler: {min(unprofiled) / deliveries * 1e6:.1f} us of server CPU per delivery "
            f"(best of {args.repeat}; all: {', '.join(f'{t / deliveries * 1e6:.1f}' for t in unprofiled)})"
        )
        if args.no_profile:
            return await stop(proc, server, serving, app_module)
        profile = cProfile.Profile()
        profile.enable()
        await broadcasts(args.repeat * args.broadcasts)
        profile.disable()
        # bench/count_bytecodes.py puts an opcode counter in cProfile's place; it printed its report.
        if not getattr(profile, "reports_itself", False):
            profiled = pstats.Stats(profile)
            total = profiled.total_tt  # type: ignore[attr-defined]
            each = total / deliveries * 1e6
            print(f"\n{deliveries} deliveries, {total:.2f} s profiled: {each:.1f} us each")
            profiled.sort_stats("tottime").print_stats(args.top)
            profiled.sort_stats("cumulative").print_stats(args.top)
    await stop(proc, server, serving, app_module)


async def stop(
    proc: asyncio.subprocess.Process, server: Any, serving: asyncio.Task[None], app_module: Any
) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"close\n")
    await proc.stdin.drain()
    await proc.wait()
    end_sockets = getattr(app_module, "end_sockets", None)  # apps whose endpoints never read
    if end_sockets is not None:
        end_sockets()
    server.should_exit = True
    await serving


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["memory", "rss", "cpu"])
    parser.add_argument("--app", default="ours_handler", help="module in bench/e2e")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--broadcasts", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="unprofiled timing runs (cpu)")
    parser.add_argument("--no-profile", action="store_true", help="cpu: timing runs only")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds the clients idle before measuring")
    parser.add_argument("--frames", type=int, default=1, help="traceback depth of tracemalloc")
    parser.add_argument("--tracebacks", action="store_true", help="group memory by traceback, not line")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--ws", default="auto")
    os.environ.setdefault("E2E_REDIS_URL", "redis://127.0.0.1:1")  # the apps read it; unused in-memory
    import uvloop

    uvloop.run(main(parser.parse_args()))
