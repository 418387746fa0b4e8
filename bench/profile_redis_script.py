"""What the Redis server spends on one inbox push: the push script against a bare PUBLISH.

``.venv/bin/python bench/profile_redis_script.py --tree base=/tmp/base --tree now=. --repeat 5``
starts one Redis with a subscriber on the wake channel, loads each tree's ``_PUSH_INBOX`` script,
then runs, interleaved (A B ... A B ...), ``--calls`` pushes of one small entry per row (in
pipelines of ``--pipeline`` calls; 1 makes a closed loop of round trips) and, as yardsticks, a bare
``PUBLISH`` of the same entry and an ``EVALSHA`` of ``return 1`` with the push's arguments. Per run
it prints the server's CPU per call (``/proc/PID/task/*/schedstat``: nanoseconds on a CPU, so not
inflated by waiting for one) and ``INFO commandstats``' usec_per_call (wall time inside the
command, which is), then the medians. The inbox is trimmed every pipeline, as a reader's acks do.

Speed figures only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

INBOX, SEQ, WAKE = "p:inbox:{t}", "p:seq:{t}", "p:wake:{t}"
# A msgpack'd {"type": "bench.p2p", "id": 256} and a channel name, as a send's entry carries.
BODY = b"D\x82\xa4type\xa9bench.p2p\xa2id\xcd\x01\x00ws.abcdefghijkl!1"


def push_script(tree: Path) -> str:
    """``_PUSH_INBOX`` of the Redis backend in ``tree``, read without importing the package."""
    path = tree / "fastapi_websockets" / "backends" / "redis.py"
    spec = importlib.util.spec_from_file_location(f"redis_backend_{abs(hash(tree))}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source: str = module._PUSH_INBOX
    return source


def server_cpu(pid: int) -> float:
    """Seconds the server's threads spent on a CPU so far."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a tree (default now=.)")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--pipeline", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import bench_redis
    import redis

    trees = [entry.split("=", 1) for entry in args.tree or [f"now={BENCH.parent}"]]
    rows: dict[str, str | None] = {name: push_script(Path(path)) for name, path in trees}
    rows["PUBLISH"] = None
    rows["return 1"] = "return 1"
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    with bench_redis.server() as server:
        pid = server["pids"][0]
        client = redis.Redis.from_url(server["url"])
        subscriber = redis.Redis.from_url(server["url"]).pubsub()  # type: ignore[no-untyped-call]  # untyped in redis-py
        subscriber.subscribe(WAKE)
        stop = threading.Event()

        def drain() -> None:  # a live reader, so that every publish is delivered
            while not stop.is_set():
                subscriber.get_message(timeout=0.2)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        shas = {name: client.script_load(source) if source else None for name, source in rows.items()}
        push_args = (INBOX, SEQ, 10_000, 60_000, "PUBLISH", WAKE, "1", BODY)
        try:
            for round_ in range(args.repeat):
                for name, sha in shas.items():
                    client.config_resetstat()
                    began = server_cpu(pid)
                    for _ in range(0, args.calls, args.pipeline):
                        pipe = client.pipeline(transaction=False)
                        for _ in range(args.pipeline):
                            if sha is None:
                                pipe.publish(WAKE, BODY)
                            else:
                                pipe.evalsha(sha, 2, *push_args)
                        pipe.ltrim(INBOX, -5, -1)
                        pipe.execute()
                    cpu_us = (server_cpu(pid) - began) / args.calls * 1e6
                    stats = client.info("commandstats")
                    usec = stats["cmdstat_publish" if sha is None else "cmdstat_evalsha"]["usec_per_call"]
                    results[name].append((cpu_us, usec))
                    print(
                        f"{round_} {name:10} cpu {cpu_us:6.1f} us/call  commandstats {usec:6.1f} us/call  "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
        finally:
            stop.set()
            reader.join()
            subscriber.close()
            client.close()
    print("\nmedians:")
    for name, runs in results.items():
        cpu = statistics.median(cpu for cpu, _ in runs)
        usec = statistics.median(usec for _, usec in runs)
        print(f"{name:10} cpu {cpu:6.1f} us/call  commandstats {usec:6.1f} us/call")


if __name__ == "__main__":
    main()
