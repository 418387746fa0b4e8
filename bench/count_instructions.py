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
"""

from __future__ import annotations

import argparse
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
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(ROOT / "bench" / "profile_consumer.py"),
        *profile_consumer_args(app, clients, broadcasts),
        "--no-profile",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--app", default="ours_handler", help="module in bench/e2e")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--low", type=int, default=5, help="broadcasts of the shorter run")
    parser.add_argument("--high", type=int, default=25, help="broadcasts of the longer run")
    args = parser.parse_args()
    low = instructions(args.app, args.clients, args.low)
    high = instructions(args.app, args.clients, args.high)
    deliveries = 2 * (args.high - args.low) * args.clients
    print(
        f"{args.app}: {(high - low) / deliveries:,.0f} instructions per delivery "
        f"({low:,} with {args.low} broadcasts, {high:,} with {args.high}; {args.clients} clients)"
    )


if __name__ == "__main__":
    main()
