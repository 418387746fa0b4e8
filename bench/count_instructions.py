"""Instructions per delivery of an end-to-end app's server, counted by callgrind: load does not move them.

Run from the repository root (needs ``valgrind``)::

    .venv/bin/python bench/count_instructions.py [--app ours_handler] [--clients 100] [--low 5] [--high 25]

CPU seconds on a shared machine move by 20% and more between runs; the
instructions a process executes do not. This runs ``bench/profile_consumer.py
cpu`` (uvicorn and the app in one process, the clients in another, not
counted) under callgrind twice, with ``--low`` and with ``--high`` broadcasts
(each run sends twice its count: a warm-up and a timed pass), and divides the
difference of the two totals by the difference in deliveries: start-up,
connecting and shutting down cancel out. ``PYTHONHASHSEED`` is fixed so that
both runs hash alike. Compare trees by running it in each (a /tmp worktree
with this ``.venv`` linked in).

``--fanout BACKEND`` counts the benchmark's one-process fan-out instead: a room of
``--receivers`` receivers of ``BACKEND`` (``inmemory``, ``redis``, ``postgresql``,
``nats``, ``rabbitmq``: the sender a second layer instance, as in ``python -m bench``),
played ``--low`` then ``--high`` rounds in two runs of this process (the broker's server
runs outside it, uncounted); it prints instructions per round. A broker row's count
against the in-memory one says how much more work our process does per round; what
it does not count (the kernel's side of the sockets, the broker's wake-ups, waiting)
is what a wall-clock ratio adds on top.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def profile_consumer_args(app: str, clients: int, broadcasts: int) -> list[str]:
    """``profile_consumer.py``'s arguments: ``broadcasts`` warm-up and as many measured broadcasts."""
    return [
        "cpu",
        "--app",
        app,
        "--clients",
        str(clients),
        "--broadcasts",
        str(broadcasts),
        "--repeat",
        "1",
    ]


def instructions(app: str, clients: int, broadcasts: int) -> int:
    """Instructions the server process executed for ``broadcasts`` warm-up and as many timed broadcasts."""
    consumer = str(ROOT / "bench" / "profile_consumer.py")
    return callgrind_total([consumer, *profile_consumer_args(app, clients, broadcasts), "--no-profile"])


def callgrind_total(arguments: list[str]) -> int:
    """Instructions callgrind counted in a run of this Python with ``arguments``."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, *arguments]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def play_fanout(backend: str, receivers: int, rounds: int) -> None:
    """Start ``backend``'s server, then play ``rounds`` rounds of a fan-out room (run under callgrind)."""
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
    import harness

    async def play(server: harness.Server) -> None:
        impl = harness.find_impl(backend, backend)
        async with harness.fan_room(impl, server, "i" + os.urandom(5).hex(), receivers) as (sender, _, room):
            await harness.fan_rounds(sender, room, rounds)

    module = importlib.import_module(f"bench_{backend}")
    with getattr(module, "server", harness.no_server)() as server:
        asyncio.run(play({"broker": backend, **server}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fanout", metavar="BACKEND", help="count a one-process fan-out room instead")
    parser.add_argument("--receivers", type=int, default=1_000, help="receivers of the --fanout room")
    parser.add_argument("--play", type=int, help=argparse.SUPPRESS)  # a run under callgrind: rounds to play
    parser.add_argument("--app", default="ours_handler", help="module in bench/e2e")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--low", type=int, default=5, help="broadcasts of the shorter run")
    parser.add_argument("--high", type=int, default=25, help="broadcasts of the longer run")
    args = parser.parse_args()
    if args.fanout is not None:
        if args.play is not None:
            play_fanout(args.fanout, args.receivers, args.play)
            return
        own = [str(Path(__file__).resolve()), "--fanout", args.fanout, "--receivers", str(args.receivers)]
        counts = [callgrind_total([*own, "--play", str(rounds)]) for rounds in (args.low, args.high)]
        print(
            f"{args.fanout} fan-out to {args.receivers}: "
            f"{(counts[1] - counts[0]) / (args.high - args.low):,.0f} instructions per round "
            f"({counts[0]:,} with {args.low} rounds, {counts[1]:,} with {args.high})"
        )
        return
    low = instructions(args.app, args.clients, args.low)
    high = instructions(args.app, args.clients, args.high)
    deliveries = 2 * (args.high - args.low) * args.clients
    print(
        f"{args.app}: {(high - low) / deliveries:,.0f} instructions per delivery "
        f"({low:,} with {args.low} broadcasts, {high:,} with {args.high}; {args.clients} clients)"
    )


if __name__ == "__main__":
    main()
