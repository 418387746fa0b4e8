"""Interleaved A/B runs of one backend's scenarios across source trees (a commit before and after).

``python bench/compare_trees.py --backend postgresql --tree base=/tmp/pg-base --tree now=. --repeat 5``
runs, ``repeat`` times, every (tree, scenario) pair in a fresh worker of the shared harness
(``bench/harness.py``) with that tree first on ``PYTHONPATH``, alternating the trees within each
repeat so that load from the rest of the machine falls on all of them alike; the in-memory layer
of the current tree runs in each repeat as a job of its own. A fan-out job's ``ratio`` is the
harness's ``vs mem``: its rate over that of an in-memory room of the same tree that took turns
with it in the same worker (``memory_round_ms``), so a change to shared delivery code moves both.
Prints every run with the load average, then the medians. Checkouts of old commits:
``git worktree add /tmp/x <commit>``. ``--row`` picks another row of the backend than its first
(``--backend nats --row "nats core"``); only rows of this project's virtualenv, whose layer comes
from the trees (a peer's row would measure its own virtualenv, not the trees).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))  # tests.servers, to start the broker


FIGURES = {
    "p2p": ("p2p1_rate", "p2p1_p50", "p2p16_rate", "p2p16_p50"),
    # p2p with the sender in a child process; report_hop_p50 is the pipe that tells it of arrivals.
    "p2p2": ("p2p1_rate", "p2p1_p50", "p2p16_rate", "p2p16_p50", "report_hop_p50", "p2p16_reads_per_msg"),
    # ratio: the row's rate over the in-memory room's that took turns with it in the same worker.
    "fanout": ("rate", "p50_round", "ratio", "memory_round_ms"),
    "fanout2": ("rate", "p50_round", "ratio", "memory_round_ms"),
}


def shown(key: str, value: float) -> str:
    """A figure as printed: seconds as milliseconds, ratios with two decimals, rates whole."""
    if "p50" in key:
        return f"{value * 1000:.2f} ms"
    if key.endswith("_ms"):
        return f"{value:.2f} ms"
    return f"{value:.2f}" if key.endswith(("ratio", "_per_msg")) else f"{value:,.0f}"


def run_in_tree(tree: Path, argv: list[str], timeout: float) -> dict[str, Any]:
    """Python with ``argv`` in a fresh process, ``tree`` first on ``PYTHONPATH``: its last stdout line
    as JSON, or ``{"error": the end of its stderr}``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd="/", env=env
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": done.stderr.strip()[-300:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run(
    tree: Path, impl: str, broker: str, scenario: str, server: dict[str, Any], sizes: dict[str, Any]
) -> dict[str, Any]:
    job = {
        "impl": impl,
        "scenario": scenario,
        "server": {"broker": broker, **server},
        "ns": "c" + uuid.uuid4().hex[:10],
    }
    argv = [str(BENCH / "__main__.py"), "--worker", json.dumps(job), json.dumps(sizes)]
    result = run_in_tree(tree, argv, sizes["limit"] * 2 + 30)
    if "rate" in result:
        result["p50_round"] = sizes["receivers"] / result["rate"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="postgresql")
    parser.add_argument("--row", help="a row of the backend in python -m bench's table (default: its first)")
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH, in run order")
    parser.add_argument("--scenarios", default="p2p,fanout,fanout2", help="of p2p, p2p2, fanout, fanout2")
    parser.add_argument("--repeat", type=int, default=3)
    for flag, default in (("--p2p-messages", 40_000), ("--receivers", 1000), ("--rounds", 30)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--p2p-seconds", type=float, default=2.0)
    parser.add_argument("--fanout-seconds", type=float, default=10.0)
    parser.add_argument("--limit", type=float, default=60.0)
    parser.add_argument("--stall", type=float, default=10.0, help="as python -m bench's --stall")
    args = parser.parse_args()
    sizes = {k: v for k, v in vars(args).items() if isinstance(v, (int, float)) and k != "repeat"}
    trees = [(name, Path(path).resolve()) for name, path in (t.split("=", 1) for t in args.tree)]
    scenarios = args.scenarios.split(",")
    module = importlib.import_module(f"bench_{args.backend}")
    choices = {row.name: row for row in module.IMPLS if row.venv == "ours"}
    row = choices.get(args.row or module.IMPLS[0].name)
    if row is None:
        parser.error(f"--row: one of {', '.join(repr(name) for name in choices)}")
    for scenario in scenarios:
        if reason := row.cannot_run(scenario):
            parser.error(f"{row.name} does not run {scenario}: {reason}")
    impl = row.name
    print(f"row {impl!r} of {args.backend}, from each tree", flush=True)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with module.server() as server:
        for index in range(args.repeat):
            order = trees if index % 2 == 0 else trees[::-1]
            for scenario in scenarios:
                runs = [("inmemory", BENCH.parent, "inmemory", "inmemory")] if scenario == "fanout" else []
                runs += [(name, tree, impl, args.backend) for name, tree in order]
                for name, tree, row, broker in runs:
                    result = run(tree, row, broker, scenario, server if broker == args.backend else {}, sizes)
                    results.setdefault((name, scenario), []).append(result)
                    printed = {k: shown(k, v) for k, v in result.items() if isinstance(v, float)}
                    print(
                        f"#{index} load {os.getloadavg()[0]:.2f} {name:>9} {scenario:8} {printed or result}",
                        flush=True,
                    )
    print("\nmedians:")
    for (name, scenario), rows in results.items():
        good = [r for r in rows if "error" not in r]
        figures = {
            key: statistics.median(r[key] for r in good)
            for key in FIGURES[scenario]
            if good and key in good[0]
        }
        medians = {k: shown(k, v) for k, v in figures.items()}
        print(f"{name:>9} {scenario:8} n={len(good)} {medians}", flush=True)
    first = trees[0][0]
    print(f"\nrates over {first}'s in the same repeat (per repeat; median):")
    for (name, scenario), rows in results.items():
        if name in (first, "inmemory"):
            continue
        for key in ("p2p1_rate", "p2p16_rate", "rate"):
            pairs = zip(rows, results[first, scenario], strict=True)
            each = [run[key] / base[key] for run, base in pairs if key in run and key in base]
            if each:
                listed = " / ".join(f"{ratio:.2f}" for ratio in each)
                print(f"{name:>9} {scenario:8} {key}: {listed}; {statistics.median(each):.2f}", flush=True)


if __name__ == "__main__":
    main()
