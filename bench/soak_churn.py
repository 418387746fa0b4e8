"""Churn soak: does the demo app's memory stay flat while users come and go?

Run from the repository root::

    .venv/bin/python bench/soak_churn.py --backend redis [--cycles 60000] [--concurrency 50]

It starts the chosen broker with the test suite's server helpers (none for
in-memory), serves the demo app (``examples/chat/app.py``) with one uvicorn
process configured by the ``FASTAPI_WEBSOCKETS_*`` variables of
``.env.sample``, and runs ``--cycles`` user cycles, ``--concurrency`` at a
time, all in one room: connect, send a chat line, wait for it to come back,
disconnect. It prints the server's RSS after the first 10% of the cycles
(the baseline: imports, caches and pools have warmed up by then) and every
10% after that, the RSS at the end and the ratio end / baseline. The issue's
goal: within 1.25 on every backend at 60,000 cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_e2e import OUR_PYTHON, ROOT, Workers, machine, rss_kb
from websockets.asyncio.client import connect

from tests.servers import free_port  # importable: bench_e2e put the root on sys.path

BACKENDS = ("inmemory", "redis", "postgresql", "nats", "rabbitmq")
PREFIX = "soak"
#: The issue's goal: RSS at the end within this ratio of RSS after the first 10% of the cycles.
GOAL = 1.25


@contextlib.contextmanager
def broker(name: str) -> Iterator[tuple[dict[str, str], str, Callable[[], str]]]:
    """Start the broker ``name`` needs; yield the app's environment, the broker's address and
    a function that describes what the broker holds (Redis only; empty elsewhere)."""
    env = {"FASTAPI_WEBSOCKETS_BACKEND": name}
    if name == "inmemory":
        yield env, "no broker", str
        return
    with tempfile.TemporaryDirectory(prefix=f"soak-{name}-") as tmp:
        if name == "redis":
            from tests.servers.redis import RedisNode

            node = RedisNode(Path(tmp), free_port())
            node.start()
            try:
                env |= {"FASTAPI_WEBSOCKETS_REDIS_URL": node.url, "FASTAPI_WEBSOCKETS_REDIS_PREFIX": PREFIX}

                def held() -> str:
                    memory = node.cli_call("info", "memory").split("used_memory_human:")[1].split()[0]
                    return f"Redis holds {node.cli_call('dbsize').strip()} keys, {memory}"

                yield env, node.url, held
            finally:
                node.stop()
        elif name == "postgresql":
            from tests.servers.postgresql import PostgresServer

            server = PostgresServer()
            server.start()
            try:
                env |= {
                    "FASTAPI_WEBSOCKETS_POSTGRESQL_DSN": server.dsn,
                    "FASTAPI_WEBSOCKETS_POSTGRESQL_SCHEMA": PREFIX,
                }
                yield env, server.dsn, str
            finally:
                server.destroy()
        elif name == "nats":
            from tests.servers.nats import NatsNode, env_factory

            nats = NatsNode(Path(tmp))
            nats.start()
            try:
                yield env | env_factory([nats.url], 1)(PREFIX), nats.url, str
            finally:
                nats.stop()
        elif name == "rabbitmq":
            from tests.servers.rabbitmq import RabbitNode

            rabbit = RabbitNode(Path(tmp))
            rabbit.start()
            try:
                env |= {
                    "FASTAPI_WEBSOCKETS_RABBITMQ_URL": rabbit.url,
                    "FASTAPI_WEBSOCKETS_RABBITMQ_EXCHANGE_NAME": PREFIX,
                    "FASTAPI_WEBSOCKETS_RABBITMQ_QUEUE_PREFIX": PREFIX,
                }
                yield env, rabbit.url, str
            finally:
                rabbit.close()
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


class Soak:
    """The churning clients and the RSS samples of the server they churn on."""

    def __init__(
        self,
        url: str,
        pid: int,
        cycles: int,
        concurrency: int,
        timeout: float,
        seconds: float | None = None,
        open_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.pid = pid
        #: Ask the server for a memory probe (bench/soak_probe.py) at every sample.
        self.probe = False
        self.cycles = cycles
        self.concurrency = concurrency
        self.timeout = timeout
        #: Seconds a connection's opening handshake may take. websockets' own default (10 s)
        #: failed cycles under load that the cycle's limit would have let finish.
        self.open_timeout = timeout if open_timeout is None else open_timeout
        self.started = 0
        self.done = 0
        self.failed = 0
        self.samples: list[tuple[int, float, float]] = []  # (cycles done, seconds, RSS MB)
        self.began = 0.0
        self.slowest = 0.0
        self.slow = 0
        #: Start no new cycle after this many seconds (None: run every cycle).
        self.seconds = seconds
        #: How far each running cycle got; failed cycles are counted by error and that stage.
        self.stages: dict[int, str] = {}
        self.failed_at: Counter[str] = Counter()

    async def user(self, number: int) -> None:
        line = f"line {number}"
        # max_queue=None: with websockets' default flow control, a client that stops reading
        # (as this one does once its line came back) never sees the server's close frame
        # behind the room's unread notices, and close() waits 10 s for it.
        url = f"{self.url}/ws/soak?name=u{number}"
        self.stages[number] = "connecting"
        async with connect(url, ping_interval=None, max_queue=None, open_timeout=self.open_timeout) as ws:
            self.stages[number] = "before hello"
            await ws.send(json.dumps({"text": line}))
            async for frame in ws:
                event = json.loads(frame)
                kind = event.get("kind")
                if kind == "hello":
                    self.stages[number] = "in connect() (hello, no online list yet)"
                elif kind == "online":
                    self.stages[number] = "after connect() (online list, own line not back)"
                elif kind == "message" and event.get("text") == line:
                    return

    async def worker(self) -> None:
        while self.started < self.cycles and not self.out_of_time():
            number = self.started
            self.started += 1
            began = time.monotonic()
            try:
                await asyncio.wait_for(self.user(number), self.timeout)
                took = time.monotonic() - began
                self.slowest = max(self.slowest, took)
                self.slow += took > 1.0
            except Exception as error:
                self.failed += 1
                stage = self.stages.get(number, "?")
                self.failed_at[f"{type(error).__name__} {stage}"] += 1
                if self.failed <= 5:
                    print(self.failure(number, stage, error, time.monotonic() - began), file=sys.stderr)
            self.stages.pop(number, None)
            self.done += 1
            if self.done % max(1, self.cycles // 10) == 0 or self.done == self.cycles:
                self.sample()
            elif self.done == self.started and self.out_of_time():
                self.sample()  # the last cycle in flight when time ran out

    def failure(self, number: int, stage: str, error: Exception, took: float) -> str:
        """One line saying which cycle failed, where, after how long, and why.

        A timeout's own text is empty: the line names the limit it hit instead.
        """
        timed_out = isinstance(error, (TimeoutError, asyncio.TimeoutError))  # (distinct before 3.11)
        if timed_out and stage == "connecting" and took < self.timeout:
            why = f"the opening handshake took over {self.open_timeout:g} s (--open-timeout)"
        elif timed_out:
            why = f"the cycle took over {self.timeout:g} s (--timeout)"
        else:
            why = f"{type(error).__name__}: {error}"
        return f"cycle {number} failed {stage}, after {took:.1f} s: {why}"

    def sample(self) -> None:
        elapsed = time.monotonic() - self.began
        rss = rss_kb(self.pid) / 1024
        self.samples.append((self.done, elapsed, rss))
        if self.probe:
            os.kill(self.pid, signal.SIGUSR1)
        print(
            f"{self.done:>8,} cycles  {elapsed:7.1f} s  {self.done / elapsed:6.0f} cycles/s  "
            f"RSS {rss:7.1f} MB",
            flush=True,
        )

    def out_of_time(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.began > self.seconds

    async def run(self) -> None:
        self.began = time.monotonic()
        await asyncio.gather(*(self.worker() for _ in range(self.concurrency)))


def server_version(backend: str) -> str:
    """The broker server's name and version, as its binary or package reports it."""
    if backend == "inmemory":
        return "no broker"
    if backend == "redis":
        command = ["redis-server", "--version"]
    elif backend == "postgresql":
        from tests.servers.postgresql import _bin_dir

        command = [str(_bin_dir() / "postgres"), "--version"]
    elif backend == "nats":
        from tests.servers.nats import nats_server_binary

        command = [nats_server_binary(), "--version"]
    else:
        command = ["dpkg-query", "-W", "-f", "rabbitmq-server ${Version}", "rabbitmq-server"]
    found = subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()
    return found.split(" sha=")[0] or "unknown"


def soak_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``backend``'s broker and the demo app on it, churn, and return the figures."""
    with broker(backend) as (env, where, held), tempfile.TemporaryDirectory(prefix="soak-probe-") as probes:
        app, extra = "examples.chat.app:app", {}
        if args.probe or args.trace:
            app = "bench.soak_probe:app"
            extra = {"SOAK_PROBE_DIR": probes, "SOAK_PROBE_TRACE": str(args.trace)}
        server = Workers(OUR_PYTHON, app, 1, env | args.env | extra, ws=args.ws)
        try:
            server.wait_ready()
            start_mb = rss_kb(server.pids[0]) / 1024
            print(
                f"backend {backend} ({where}); demo app pid {server.pids[0]}, RSS at start "
                f"{start_mb:.1f} MB; {args.cycles:,} cycles, {args.concurrency} at a time",
                flush=True,
            )
            seconds = args.max_minutes * 60 if args.max_minutes else None
            soak = Soak(
                server.urls[0],
                server.pids[0],
                args.cycles,
                args.concurrency,
                args.timeout,
                seconds,
                open_timeout=args.open_timeout,
            )
            soak.probe = bool(args.probe or args.trace)
            try:
                import uvloop
            except ImportError:
                asyncio.run(soak.run())
            else:
                uvloop.run(soak.run())
            broker_holds = held()
            if soak.probe:
                time.sleep(5)  # the last probe takes a moment (gc.get_objects)
                os.kill(server.pids[0], signal.SIGUSR2)
                time.sleep(2)
        finally:
            server.stop()
        probe = probe_summary(Path(probes)) if soak.probe else None
    (base_cycles, _, base_mb), (end_cycles, end_s, end_mb) = soak.samples[0], soak.samples[-1]
    return {
        "backend": backend,
        "env": args.env,
        "server": server_version(backend),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_1m": os.getloadavg()[0],
        "cycles": end_cycles,
        "cycles_planned": args.cycles,
        "concurrency": args.concurrency,
        "rss_start_mb": start_mb,
        "rss_baseline_mb": base_mb,
        "baseline_cycles": base_cycles,
        "rss_end_mb": end_mb,
        "rss_peak_mb": max(mb for _, _, mb in soak.samples),
        # A server that died before the first sample reads 0 MB: no ratio, rather than a crash.
        "ratio": end_mb / base_mb if base_mb else float("nan"),
        "bytes_per_cycle": (end_mb - base_mb) * 1024 * 1024 / max(1, end_cycles - base_cycles),
        "failed": soak.failed,
        "failed_at": dict(soak.failed_at),
        "cycles_per_s": end_cycles / end_s,
        "slowest_s": soak.slowest,
        "over_1s": soak.slow,
        "samples": soak.samples,
        "broker_holds": broker_holds,
        **({"probe": probe} if probe else {}),
    }


def probe_summary(probes: Path) -> dict[str, Any]:
    """What the server's memory probes saw: figures per sample, and the object types and
    (when traced) the allocating lines that grew most between the first probe and the last."""
    found = sorted(probes.glob("probe-*.json"), key=lambda path: int(path.stem.split("-")[1]))
    probes_seen = [json.loads(path.read_text()) for path in found]
    if len(probes_seen) < 2:
        return {"error": f"{len(probes_seen)} probe(s) written"}
    first, last = probes_seen[0], probes_seen[-1]
    grown = {
        name: last["types"].get(name, 0) - first["types"].get(name, 0)
        for name in set(first["types"]) | set(last["types"])
    }
    summary: dict[str, Any] = {
        "per_sample": [
            {
                "rss_mb": round(seen["rss"] / 2**20, 1),
                "python_blocks": seen["python_blocks"],
                "malloc_arena_mb": round(seen["malloc"].get("arena", 0) / 2**20, 1),
                "malloc_in_use_mb": round(seen["malloc"].get("in_use", 0) / 2**20, 1),
                "malloc_free_mb": round(seen["malloc"].get("free", 0) / 2**20, 1),
                "threads": seen["threads"],
                "waits": seen.get("waits", {}),
                "dropped_full": sum(stats["dropped_full"] for stats in seen.get("layer_stats", [])),
                **(
                    {
                        "traced_mb": round(seen["traced"] / 2**20, 1),
                        "traced_peak_mb": round(seen["traced_peak"] / 2**20, 1),
                    }
                    if "traced" in seen
                    else {}
                ),
            }
            for seen in probes_seen
        ],
        "types_grown": dict(sorted(grown.items(), key=lambda item: -abs(item[1]))[:15]),
        "tasks_at_end": last.get("tasks", {}),
        "layer_stats_at_end": last.get("layer_stats", []),
    }
    trim = probes / "trim.json"
    if trim.exists():
        trimmed = json.loads(trim.read_text())
        summary["rss_before_trim_mb"] = round(trimmed["rss_before"] / 2**20, 1)
        summary["rss_after_trim_mb"] = round(trimmed["rss_after"] / 2**20, 1)
    traces = [path.with_suffix(".trace") for path in (found[0], found[-1])]
    if all(trace.exists() for trace in traces):
        import tracemalloc

        before, after = (tracemalloc.Snapshot.load(str(trace)) for trace in traces)
        summary["lines_grown"] = [str(stat) for stat in after.compare_to(before, "lineno")[:15]]
    return summary


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table, one row per backend."""
    lines = [
        "| backend | cycles | RSS at start | RSS after 10% | RSS at end | peak | end / 10% | bytes per cycle "
        "| failed | cycles/s | slowest cycle | load avg at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        verdict = "" if row["ratio"] <= GOAL else " (over 1.25)"
        settings = "".join(f", {key}={value}" for key, value in row.get("env", {}).items())
        planned = row.get("cycles_planned", row["cycles"])
        why = "stopped by hand" if row.get("stopped_by_hand") else "time limit"
        cycles = f"{row['cycles']:,}" + (f" of {planned:,} ({why})" if planned != row["cycles"] else "")
        lines.append(
            f"| {row['backend']}{settings} | {cycles} | {row['rss_start_mb']:.1f} MB | "
            f"{row['rss_baseline_mb']:.1f} MB | {row['rss_end_mb']:.1f} MB | {row['rss_peak_mb']:.1f} MB | "
            f"**{row['ratio']:.2f}**{verdict} | {row['bytes_per_cycle']:,.0f} | {row['failed']} | "
            f"{row['cycles_per_s']:.0f} | {_seconds(row.get('slowest_s'))} | {row['load_avg_1m']:.1f} |"
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    # Rows rebuilt from a run's printed samples have no per-cycle timings.
    return "n/a" if value is None else f"{value:.2f} s"


def package_versions() -> str:
    """Versions of the Python packages the soaked app runs on."""
    names = ("fastapi", "starlette", "uvicorn", "websockets", "redis", "asyncpg", "nats-py", "aio-pika")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def write_report(path: Path, results: list[dict[str, Any]], note: str = "") -> None:
    """Write the markdown report: how it ran, on what, and the table."""
    out = [
        "# Churn soak: memory while users come and go",
        "",
        "Generated by `.venv/bin/python bench/soak_churn.py "
        + " ".join(f"--backend {row['backend']}" for row in results)
        + f" --cycles {results[0].get('cycles_planned', results[0]['cycles'])} --out {path}` (or rebuilt "
        "from the runs' saved results"
        " with `--from-results`).",
        "",
        "The demo app (`examples/chat/app.py`, rooms with 100 messages of history, presence) in one "
        "uvicorn process; clients connect, get the hello, history and presence, send a chat line, wait "
        f"for it to come back and disconnect, {results[0]['concurrency']} at a time, all in one room. "
        "RSS is the uvicorn process's, sampled every 10% of the cycles; the baseline is the sample after "
        f"the first 10% (imports, caches and pools have warmed up by then). Goal (issue 15): the end "
        f"within {GOAL:.2f}x the baseline on every backend.",
        "",
        f"- Machine: {machine()}; 2 cores shared with other work while this ran (load average per row "
        "below), so cycles/s are indicative only.",
        f"- Packages: {package_versions()}.",
        "",
        table(results),
        "",
        *([note, ""] if note else []),
    ]
    for row in results:
        samples = ", ".join(f"{mb:.0f}" for _, _, mb in row["samples"])
        holds = f"; at the end {row['broker_holds']}" if row["broker_holds"] else ""
        if "rss_after_trim_mb" in row.get("probe", {}):
            probe = row["probe"]
            holds += (
                f"; RSS {probe['rss_before_trim_mb']:.1f} MB before and {probe['rss_after_trim_mb']:.1f} MB "
                "after `malloc_trim(0)` at the end"
            )
        out.append(
            f"- {row['backend']} ({row['server']}), ended {row['date']}, "
            f"load average {row['load_avg_1m']:.1f} at the end: RSS every 10% (MB) {samples}; "
            f"{row.get('over_1s', '?')} cycles over 1 s{holds}."
        )
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=(*BACKENDS, "all"),
        help="repeat for several, run one after the other; 'all' for every backend (default inmemory)",
    )
    parser.add_argument("--cycles", type=int, default=60_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--ws", default="auto", help="uvicorn --ws implementation")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one cycle may take")
    parser.add_argument(
        "--open-timeout",
        type=float,
        help="seconds a connection's opening handshake may take (default: --timeout)",
    )
    parser.add_argument(
        "--out",
        type=lambda text: Path(text) if text else None,
        help="also write the results as markdown (docs/bench-soak.md); '' for none",
    )
    parser.add_argument(
        "--env",
        type=lambda text: dict([text.split("=", 1)]),
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the app (e.g. FASTAPI_WEBSOCKETS_REDIS_HISTORY={}), repeatable",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="start no new cycle after this long; the row then shows the cycles done (of --cycles)",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="serve bench/soak_probe.py (the demo app with a memory probe) and probe it at every sample",
    )
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="FRAMES",
        help="with --probe: also trace allocations (tracemalloc, this many frames; slow, inflates RSS)",
    )
    parser.add_argument("--note", default="", help="a paragraph for the report, under the table")
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="run nothing: report the newest saved result (bench/results/soak-*.json) of each backend",
    )
    args = parser.parse_args()
    args.env = {name: value for pair in args.env for name, value in pair.items()}
    chosen = args.backend or ["inmemory"]
    backends = list(BACKENDS) if "all" in chosen else list(dict.fromkeys(chosen))

    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    results: list[dict[str, Any]] = []
    if args.from_results:
        for backend in backends:
            # The names end in a sortable timestamp, so the last one is the newest; one row per
            # backend and app settings (RabbitMQ with and without history are two rows).
            newest: dict[str, dict[str, Any]] = {}
            for saved in sorted(results_dir.glob(f"soak-{backend}-*.json")):
                row = json.loads(saved.read_text())
                newest[json.dumps(row.get("env", {}), sort_keys=True)] = row
            results += newest.values()
        backends = []
    for backend in backends:
        row = soak_backend(backend, args)
        results.append(row)
        # Saved as each backend ends: a long run that stops half-way keeps what it measured.
        (results_dir / f"soak-{backend}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
            json.dumps(row, indent=1)
        )
        print(
            f"\n{backend}: RSS {row['rss_baseline_mb']:.1f} MB after {row['baseline_cycles']:,} cycles, "
            f"{row['rss_end_mb']:.1f} MB at the end; ratio {row['ratio']:.2f}; "
            f"{row['bytes_per_cycle']:,.0f} bytes per cycle; {row['failed']} cycles failed "
            f"{row['failed_at'] or ''}; "
            f"{row['broker_holds'] or 'no broker figures'}\n",
            flush=True,
        )
        if "probe" in row:
            print(json.dumps(row["probe"], indent=1), flush=True)
    print(table(results))
    if args.out:
        write_report(args.out, results, args.note)
        print(f"\nwrote {args.out}")
    # A soak whose cycles failed measured less churn than it claims: not a pass either.
    if any(row["ratio"] > GOAL or row["failed"] for row in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
