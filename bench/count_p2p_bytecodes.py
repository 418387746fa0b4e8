"""Python bytecodes per message, by function, of the harness's p2p closed loop: load does not move them.

Run from the repository root::

    .venv/bin/python bench/count_p2p_bytecodes.py --backend inmemory --senders 16 [--messages 4000]

One process: a sender and a receiver layer as ``python -m bench`` makes them
(one instance for in-memory, two sharing a namespace on a private server for a
broker), the harness's reader task and ``closed_loop()`` with ``--senders``
closed-loop senders; ``--warmup`` messages first, then ``--messages`` counted
with the opcode tracer of ``bench/count_bytecodes.py``. Prints the bytecodes
and calls per message by function, grouped totals (the backend's module, the rest
of this package, asyncio, the harness, the rest), and the share of messages received before their
``send()`` returned (it moves asyncio's share: such a sender wakes once).
With ``--untraced`` it only runs the loop, for an instruction count::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \
        .venv/bin/python bench/count_p2p_bytecodes.py --untraced --messages 4800

(the difference of two such counts, e.g. 4,800 and 800 messages, over 4,000).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import sys
import uuid
from pathlib import Path

import count_bytecodes
import harness

BENCH = Path(__file__).resolve().parent


async def measure(impl: harness.Impl, server: harness.Server, args: argparse.Namespace) -> float:
    """Run the closed loop, counting opcodes over the last ``args.messages``; the early share."""
    async with (
        harness.layer_pair(impl, server, "c" + uuid.uuid4().hex[:10]) as (sender, receiver),
        harness.p2p_link(sender, receiver) as (send, waiting),
    ):
        early = [0]

        async def send_counted(key: int) -> None:
            await send(key)
            early[0] += waiting[key].done()  # received before send() returned

        sizes = {"p2p_messages": args.warmup, "p2p_seconds": 1e9}
        await harness.closed_loop(send_counted, waiting, args.senders, sizes)
        early[0] = 0
        sizes["p2p_messages"] = args.messages
        if args.untraced:
            await harness.closed_loop(send_counted, waiting, args.senders, sizes)
        else:
            count_bytecodes._arm_suspended()
            sys.settrace(count_bytecodes._tracer)
            try:
                await harness.closed_loop(send_counted, waiting, args.senders, sizes)
            finally:
                sys.settrace(None)
        share: float = early[0] / args.messages
        return share


def group(key: str, backend: str) -> str:
    """Which part of the loop a function (a key of the tracer's counts) belongs to."""
    # The tracer names files of its own checkout relative to it, and another tree's in full.
    _, in_package, module = f"/{key}".rpartition("/fastapi_websockets/")
    if in_package and module.startswith(f"backends/{backend}.py"):
        return "backend module"
    if in_package:
        return "shared layer path"
    if "/asyncio/" in key:
        return "asyncio"
    if key.startswith("bench/"):
        return "harness"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inmemory", help="a broker of python -m bench (its row 'ours')")
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--untraced",
        action="store_true",
        help="no opcode trace: for callgrind, whose counts of two --messages differenced give one message's",
    )
    args = parser.parse_args()
    impl = harness.find_impl(args.backend, args.backend)
    module = importlib.import_module(f"bench_{args.backend}")
    with module.server() if hasattr(module, "server") else contextlib.nullcontext({}) as server:
        early = asyncio.run(measure(impl, {"broker": args.backend, **server}, args))
    bytecodes, calls = count_bytecodes._bytecodes, count_bytecodes._calls
    per = args.messages
    groups: collections.Counter[str] = collections.Counter()
    for key, count in bytecodes.items():
        groups[group(key, args.backend)] += count
    print(
        f"{args.backend}, {args.senders} sender(s), {per} messages; "
        f"received before send() returned {early:.2f}"
    )
    print(f"bytecodes per message: {sum(bytecodes.values()) / per:,.1f}")
    print("  " + ", ".join(f"{name} {count / per:,.1f}" for name, count in groups.most_common()))
    for key, count in bytecodes.most_common(args.top):
        print(f"{count / per:8.1f}  {calls[key] / per:5.2f} calls  {key}")


if __name__ == "__main__":
    # Only as a script: it measures its own checkout. A tool importing group() measures
    # the tree it was asked to run (its PYTHONPATH), which this must not shadow.
    sys.path.insert(1, str(BENCH.parent))
    main()
