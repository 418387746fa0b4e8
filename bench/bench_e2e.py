"""End-to-end benchmark: broadcasts from an HTTP request to real WebSocket clients.

Run from the repository root, after ``bash bench/setup-peers``::

    .venv/bin/python bench/bench_e2e.py [--workers 2] [--clients 1000[,500]] [--broadcasts 20]

For every library (``--libs`` to choose), it starts W uvicorn processes of that
library's app (``bench/e2e/*.py``, each written the way the library's docs
show), all on one local redis-server started with the test suite's helper,
then:

1. connects C WebSocket clients, spread evenly over the W processes, from one
   or two client processes of their own (``bench/e2e/clients.py``, asyncio +
   websockets), and leaves them idle for 10 s: the growth of the workers' RSS
   divided by C is the memory per idle connection;
2. publishes warm-up broadcasts until every client has received one;
3. triggers K broadcasts of a ~100-byte JSON message over HTTP (alternating
   between the workers), each once the previous one reached every client (or
   a timeout passed). The message carries its publish time; clients subtract
   it from their receipt time.

Clients offer no compression unless ``--deflate``.

``--python 3.12`` runs every library's workers on that interpreter: it makes
(once) ``bench/.venv-e2e-py3.12-<ours|peer>`` with the packages and versions of
the usual virtualenvs (their ``pip freeze`` as constraints), so a table
compares libraries on one Python; the driver and the clients stay on
``.venv``. ``--profile DIR`` samples each worker with py-spy (``--native``,
``.venv/bin/pip install py-spy``) during the measured broadcasts and prints
where the main threads' samples fall (by package and by function); CPU and
latency then include py-spy's pauses, so profile and measure in separate runs.
The ``floor`` row is FastAPI fed by one redis-py pub/sub subscription per
worker (``bench/e2e/floor_redis_app.py``): no channel layer at all.

Figures per library: deliveries/s (C divided by the median time from publish
to the last client's receipt; the machine is shared, so one descheduled round
should not decide), latency p50/p99 over every delivery, messages lost, the
workers' CPU seconds during the K broadcasts (from /proc), and RSS per idle
connection; and, per worker, when its first and its last client got each
broadcast (the worker that served the POST and the other one). It writes a
markdown report and a PNG plot (``--out``, ``--plot``; defaults
``docs/bench-e2e.md`` and ``docs/bench-e2e.png``; ``--out ''`` for neither)
and the raw numbers to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import free_port, port_open  # noqa: E402
from tests.servers.redis import RedisNode  # noqa: E402

APPS = ROOT / "bench" / "e2e"
OUR_PYTHON = ROOT / ".venv" / "bin" / "python"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024


@dataclass(frozen=True)
class Lib:
    """One row: which app, in which virtualenv, spoken to in which protocol."""

    label: str
    short: str
    module: str
    venv: Path
    packages: tuple[str, ...]
    protocol: str = "plain"
    env: dict[str, str] = field(default_factory=dict)
    #: Directory the workers start in, so that its ``fastapi_websockets`` is the one imported.
    source: Path = ROOT

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def _peer(name: str) -> Path:
    return ROOT / "bench" / f".venv-e2e-{name}"


LIBS = {
    "ours-handler": Lib(
        "fastapi-websockets (handler + send_json)",
        "ours: handler\n+ send_json",
        "ours_handler",
        ROOT / ".venv",
        ("fastapi-websockets", "fastapi", "redis"),
    ),
    "ours-envelope": Lib(
        "fastapi-websockets (websocket_json_message envelope, no handler)",
        "ours: envelope,\nno handler",
        "ours_envelope",
        ROOT / ".venv",
        ("fastapi-websockets", "fastapi", "redis"),
    ),
    "floor": Lib(
        "floor: FastAPI + redis-py pub/sub, no layer",
        "floor: FastAPI\n+ redis pub/sub",
        "floor_redis_app",
        ROOT / ".venv",
        ("fastapi", "redis"),
    ),
    "broadcaster": Lib(
        "encode/broadcaster",
        "broadcaster",
        "broadcaster_app",
        _peer("broadcaster"),
        ("broadcaster", "starlette", "redis"),
    ),
    "socketio": Lib(
        "python-socketio + AsyncRedisManager",
        "python-socketio\n+ Redis manager",
        "socketio_app",
        _peer("socketio"),
        ("python-socketio", "python-engineio", "starlette", "redis"),
        protocol="socketio",
    ),
    "channels-pubsub": Lib(
        "Django Channels + channels_redis PubSub",
        "Channels +\nredis PubSub",
        "channels_app",
        _peer("channels"),
        ("channels", "channels-redis", "django", "redis"),
        env={"E2E_CHANNELS_LAYER": "pubsub"},
    ),
    "channels-core": Lib(
        "Django Channels + channels_redis core",
        "Channels +\nredis core",
        "channels_app",
        _peer("channels"),
        ("channels", "channels-redis", "django", "redis"),
        env={"E2E_CHANNELS_LAYER": "core"},
    ),
}


# ================================================================ processes


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(int(statm.read().split()[1]) * PAGE_KB)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces; fields after it are fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def versions(lib: Lib) -> dict[str, str]:
    """Versions of the workers' Python, the library's packages and the server stack in its virtualenv."""
    names = [*lib.packages, "uvicorn", "websockets", "uvloop", "httptools"]
    code = (
        "import importlib.metadata as m, json, platform, sys\n"
        "out = {'Python': platform.python_version()}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    result = subprocess.run([str(lib.python), "-c", code, *names], capture_output=True, text=True, check=True)
    found: dict[str, str] = json.loads(result.stdout)
    return found


def interpreter(spec: str) -> Path:
    """The Python ``--python`` names: a path, or ``X.Y`` under pyenv's versions or on PATH.

    pyenv's own installs come first: its shims on PATH fail for a version the
    directory has not selected.
    """
    if os.sep in spec:
        return Path(spec)
    candidates = sorted(Path.home().glob(f".pyenv/versions/{spec}*/bin/python{spec}"), reverse=True)
    found = shutil.which(f"python{spec}")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if subprocess.run([str(candidate), "-c", ""], capture_output=True).returncode == 0:
            return candidate
    raise SystemExit(f"no working python{spec} under ~/.pyenv/versions or on PATH")


def on_python(lib: Lib, python: Path) -> Lib:
    """``lib`` in a virtualenv on ``python`` holding what its usual virtualenv holds, made if missing.

    The new virtualenv gets the requirements of every library that shares
    ``lib``'s usual virtualenv, pinned to the versions installed there (its
    ``pip freeze`` as constraints), so that only the interpreter differs.
    """
    tag = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    usual = lib.venv
    name = "ours" if usual == ROOT / ".venv" else usual.name.removeprefix(".venv-e2e-")
    venv = ROOT / "bench" / f".venv-e2e-py{tag}-{name}"
    if not (venv / "bin" / "python").exists():
        if not (usual / "bin" / "python").exists():
            raise SystemExit(f"{usual} is missing: run bash bench/setup-peers")
        print(f"making {venv.name} on {python} ...", file=sys.stderr, flush=True)
        frozen = subprocess.run(
            [str(usual / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        packages = sorted(
            {package for other in LIBS.values() if other.venv == usual for package in other.packages}
        )
        requirements = ["uvicorn[standard]"]
        requirements += [str(ROOT) if package == "fastapi-websockets" else package for package in packages]
        subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text(
            "".join(
                line + "\n" for line in frozen.splitlines() if " @ " not in line and not line.startswith("-")
            )
        )
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints)]
        subprocess.run([*pip, *requirements], check=True)
    return dataclasses.replace(lib, venv=venv)


def stop_processes(procs: list[subprocess.Popen[bytes]], sig: signal.Signals, timeout: float) -> None:
    """Send ``sig`` to those of ``procs`` still running, wait ``timeout`` s for each, then kill."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Workers:
    """``count`` uvicorn processes of one app, each on its own port, stopped by PID."""

    def __init__(
        self,
        python: Path,
        app: str,
        count: int,
        env: Mapping[str, str],
        *,
        ws: str = "auto",
        app_dir: Path | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="bench-uvicorn-"))
        for index in range(count):
            port = free_port()
            log = self.logdir / f"worker{index}.log"
            command = [str(python), "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
            command += ["--log-level", "warning", "--ws", ws]
            if app_dir is not None:
                command += ["--app-dir", str(app_dir)]
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    command, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
                )
            self.procs.append(proc)
            self.ports.append(port)
            self.logs.append(log)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for proc, port, log in zip(self.procs, self.ports, self.logs, strict=True):
            while not port_open(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker on port {port} did not start:\n{log.read_text()}")
                time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}" for port in self.ports]

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.pids)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(
            f"[worker {index}] {line}"
            for index, log in enumerate(self.logs)
            for line in log.read_text(errors="replace").splitlines()[-lines:]
        )

    def stop(self) -> None:
        stop_processes(self.procs, signal.SIGTERM, 15)
        shutil.rmtree(self.logdir, ignore_errors=True)


class Sampler:
    """py-spy sampling each worker during the measured broadcasts (``--profile``), stopped by PID."""

    def __init__(self, pids: list[int], outdir: Path, name: str, rate: int) -> None:
        spy = shutil.which("py-spy", path=str(OUR_PYTHON.parent)) or shutil.which("py-spy")
        if spy is None:
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        outdir.mkdir(parents=True, exist_ok=True)
        self.outputs = [outdir / f"{name}-worker{index}.txt" for index in range(len(pids))]
        record = [spy, "record", "--native", "--rate", str(rate), "--format", "raw"]
        self.procs = [
            subprocess.Popen(
                [*record, "--pid", str(pid), "--output", str(output)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, output in zip(pids, self.outputs, strict=True)
        ]

    def stop(self) -> None:
        stop_processes(self.procs, signal.SIGINT, 30)  # py-spy writes its output on SIGINT


#: Where a sampled frame's file lives -> the area its time is counted under.
AREAS = (
    ("fastapi_websockets", "fastapi-websockets"),
    ("broadcaster", "broadcaster"),
    ("socketio", "socketio/engineio"),
    ("engineio", "socketio/engineio"),
    ("/channels", "channels"),
    ("django", "channels"),
    ("floor_", "the app"),
    ("bench/e2e", "the app"),
    ("starlette", "starlette/fastapi"),
    ("fastapi", "starlette/fastapi"),
    ("uvicorn", "uvicorn"),
    ("websockets", "websockets"),
    ("redis", "redis-py"),
    ("json", "json"),
    ("anyio", "anyio"),
    ("asyncio", "asyncio"),
)


#: Native calls the event loop waits in: samples ending there are idle time.
IDLE_CALLS = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "select", "poll"})


def area_of(frame: str) -> str | None:
    """The area of a py-spy frame ``func (file:line)``; None for a native frame."""
    if ".py:" not in frame:
        return None
    where = frame.rsplit("(", 1)[-1]
    for needle, area in AREAS:
        if needle in where:
            return area
    return "other Python"


def profile_summary(outputs: list[Path], rate: int, top: int = 12) -> str:
    """Samples of the workers by area (innermost Python frame) and by own function."""
    areas: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    native: Counter[str] = Counter()
    total = idle = elsewhere = 0
    for output in outputs:
        if not output.exists():
            continue
        for line in output.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            count = int(count_text)
            frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
            if frames and frames[0].startswith("thread "):
                frames = frames[1:]
            if not any(frame.startswith("_run_module_as_main ") for frame in frames):
                elsewhere += count  # another thread (a thread pool's worker, mostly waiting)
                continue
            if frames and frames[-1].split(" (")[0] in IDLE_CALLS:
                idle += count  # the event loop waiting for the next event
                continue
            python = [frame for frame in frames if ".py:" in frame]
            leaf = python[-1] if python else "(no Python frame)"
            areas[area_of(leaf) or "native"] += count
            functions[leaf.split(" (")[0] + " " + leaf.rsplit("/", 1)[-1].rstrip(")")] += count
            if frames and ".py:" not in frames[-1]:
                native[frames[-1].split(" (")[0]] += count
            total += count
    if not total:
        return "no samples"
    lines = [
        f"main threads: {total} busy samples at {rate} Hz over the workers (~{total / rate:.2f} s), "
        f"{idle} waiting in the event loop; {elsewhere} samples of other threads"
    ]
    lines += [f"  {n / total:6.1%}  {area}" for area, n in areas.most_common()]
    lines.append("  innermost Python function:")
    lines += [f"  {n / total:6.1%}  {name}" for name, n in functions.most_common(top)]
    lines.append("  native leaf (time under the Python frame, e.g. the write system call):")
    lines += [f"  {n / total:6.1%}  {name}" for name, n in native.most_common(6)]
    return "\n".join(lines)


class ClientProcs:
    """The client processes: JSON lines out, commands in."""

    def __init__(self, protocol: str, clients: int, procs: int, urls: list[str], deflate: bool) -> None:
        self.protocol = protocol
        self.shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        self.urls = urls
        self.deflate = deflate
        self.procs: list[asyncio.subprocess.Process] = []
        self.rounds: dict[int, int] = {}
        self.round_done = asyncio.Event()
        self.pending: list[asyncio.Queue[dict[str, Any]]] = []
        self.readers: list[asyncio.Task[None]] = []

    async def start(self) -> list[dict[str, Any]]:
        first = 0
        for share in self.shares:
            proc = await asyncio.create_subprocess_exec(
                str(OUR_PYTHON),
                str(APPS / "clients.py"),
                self.protocol,
                str(share),
                str(first),
                *self.urls,
                *(["--deflate"] if self.deflate else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=64 * 1024 * 1024,
            )
            first += share
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            self.procs.append(proc)
            self.pending.append(queue)
            self.readers.append(asyncio.create_task(self._read(proc, queue)))
        return [await self._next(queue, "connected", 600) for queue in self.pending]

    async def _read(self, proc: asyncio.subprocess.Process, queue: asyncio.Queue[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            event = json.loads(line)
            if event["event"] == "round":
                self.rounds[event["seq"]] = self.rounds.get(event["seq"], 0) + 1
                self.round_done.set()
            else:
                await queue.put(event)
        await queue.put({"event": "exited"})

    async def _next(self, queue: asyncio.Queue[dict[str, Any]], kind: str, timeout: float) -> dict[str, Any]:
        event = await asyncio.wait_for(queue.get(), timeout)
        if event["event"] != kind:
            raise RuntimeError(f"client process sent {event['event']!r}, expected {kind!r}")
        return event

    async def wait_round(self, seq: int, timeout: float) -> bool:
        """Whether every client process reported round ``seq`` complete within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.rounds.get(seq, 0) < len(self.procs):
            self.round_done.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.round_done.wait(), remaining)
        return True

    async def command(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")
            await proc.stdin.drain()

    async def report(self) -> list[dict[str, Any]]:
        await self.command("report")
        return [await self._next(queue, "report", 120) for queue in self.pending]

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.command("close")
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


# ================================================================ one run


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct))]


async def run_lib(
    lib: Lib, redis: RedisNode, args: argparse.Namespace, clients: int, run_id: str = ""
) -> dict[str, Any]:
    redis.cli_call("flushall")
    env = {
        **lib.env,
        "E2E_REDIS_URL": redis.url,
        "FASTAPI_WEBSOCKETS_BACKEND": "redis",
        "FASTAPI_WEBSOCKETS_REDIS_URL": redis.url,
        "FASTAPI_WEBSOCKETS_REDIS_PREFIX": "bench-e2e",
    }
    workers = Workers(
        lib.python, f"{lib.module}:app", args.workers, env, ws=args.ws, app_dir=APPS, cwd=lib.source
    )
    loads: ClientProcs | None = None
    try:
        await asyncio.to_thread(workers.wait_ready)
        await asyncio.sleep(args.settle)
        rss_before = workers.rss_kb()
        loads = ClientProcs(lib.protocol, clients, args.client_procs, workers.urls, args.deflate)
        connected = await loads.start()
        opened = sum(event["open"] for event in connected)
        if opened < clients:
            raise RuntimeError(f"only {opened} of {clients} clients connected\n{workers.log_tail()}")
        await asyncio.sleep(args.idle_seconds)
        rss_idle = workers.rss_kb()

        http_urls = [url.replace("ws://", "http://") for url in workers.urls]
        async with httpx.AsyncClient(timeout=30) as http:

            async def publish(seq: int) -> None:
                response = await http.post(f"{http_urls[abs(seq) % len(http_urls)]}/broadcast?seq={seq}")
                response.raise_for_status()

            for attempt in range(1, 11):
                await publish(-attempt)
                if await loads.wait_round(-attempt, args.round_timeout):
                    break
            else:
                raise RuntimeError(f"no warm-up broadcast reached every client\n{workers.log_tail()}")
            # Let stragglers of the warm-up land before CPU is counted.
            await asyncio.sleep(0.5)
            load = os.getloadavg()[0]
            sampler = None
            if args.profile is not None:
                sampler = Sampler(workers.pids, args.profile, f"{lib.module}-{run_id}", args.profile_rate)
                await asyncio.sleep(1.0)  # py-spy attaches
            cpu_before = workers.cpu_seconds()
            timed_out = 0
            try:
                for seq in range(args.broadcasts):
                    await publish(seq)
                    if not await loads.wait_round(seq, args.round_timeout):
                        timed_out += 1
                cpu = workers.cpu_seconds() - cpu_before
            finally:
                if sampler is not None:
                    await asyncio.to_thread(sampler.stop)
        reports = await loads.report()
    finally:
        if loads is not None:
            await loads.close()
        workers.stop()

    latencies = [value for report in reports for value in report["latencies"]]
    durations = []
    for seq in range(args.broadcasts):
        key = str(seq)
        lasts = [report["last"][key] for report in reports if key in report["last"]]
        published = [report["published"][key] for report in reports if key in report["published"]]
        if lasts:
            durations.append(max(lasts) - published[0])
    hops = worker_hops(reports, args.broadcasts, args.workers)
    profile = None
    if sampler is not None:
        profile = profile_summary(sampler.outputs, args.profile_rate)
        print(f"{lib.label}, run {run_id}:\n{profile}", file=sys.stderr, flush=True)
    received = sum(sum(report["received"].values()) for report in reports)
    expected = clients * args.broadcasts
    return {
        "lib": lib.label,
        "short": lib.short,
        "clients": clients,
        "deliveries_per_s": clients / statistics.median(durations) if durations else 0.0,
        "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
        "lost": expected - received,
        "rounds_timed_out": timed_out,
        "closed_early": sum(report["closed_early"] for report in reports),
        "cpu_s": cpu,
        "rss_per_conn_kb": (rss_idle - rss_before) / clients,
        "rss_before_mb": rss_before / 1024,
        "rss_idle_mb": rss_idle / 1024,
        "rounds_ms": [round(d * 1000, 1) for d in durations],
        "load_avg_1m": load,
        **hops,
        **({"profile": profile} if profile is not None else {}),
    }


def worker_hops(reports: list[dict[str, Any]], broadcasts: int, workers: int) -> dict[str, float]:
    """When each worker's sockets got a broadcast, from its publish: medians over the broadcasts, ms.

    ``served_*`` is the worker that took the HTTP POST, ``other_*`` the other
    one(s); ``*_first`` the first of its clients' receipts, ``*_last`` the last.
    """
    spans: dict[str, list[float]] = {
        key: [] for key in ("served_first", "served_last", "other_first", "other_last")
    }
    for seq in range(broadcasts):
        key = str(seq)
        published = [report["published"][key] for report in reports if key in report["published"]]
        if not published:
            continue
        for worker in range(workers):
            firsts = [
                r["first_from"][str(worker)][key]
                for r in reports
                if key in r["first_from"].get(str(worker), {})
            ]
            lasts = [
                r["last_from"][str(worker)][key]
                for r in reports
                if key in r["last_from"].get(str(worker), {})
            ]
            if not firsts:
                continue
            side = "served" if worker == seq % workers else "other"
            spans[f"{side}_first"].append((min(firsts) - published[0]) * 1000)
            spans[f"{side}_last"].append((max(lasts) - published[0]) * 1000)
    return {f"{key}_ms": statistics.median(values) for key, values in spans.items() if values}


# ================================================================ report


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        mem_gb = int(meminfo.readline().split()[1]) / 1024 / 1024
    return (
        f"{os.cpu_count()} cores ({model}), {mem_gb:.0f} GB RAM, "
        f"{platform.system()} {platform.release()}; driver and clients on Python {platform.python_version()}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| library | deliveries/s | p50 ms | p99 ms | lost | server CPU s | RSS per idle connection |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['lib']} | {row['deliveries_per_s']:,.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
            f"| {row['lost']} | {row['cpu_s']:.2f} | {row['rss_per_conn_kb']:.1f} KB |"
        )
    return "\n".join(lines)


def hops_table(rows: list[dict[str, Any]]) -> str:
    """When each worker's clients got a broadcast: the one that took the POST, and the other."""
    lines = [
        "| library | POSTed worker: first / last receipt ms | other worker: first / last receipt ms |",
        "|---|---|---|",
    ]
    for row in rows:
        if "served_first_ms" not in row or "other_first_ms" not in row:
            continue
        lines.append(
            f"| {row['lib']} | {row['served_first_ms']:.1f} / {row['served_last_ms']:.1f} "
            f"| {row['other_first_ms']:.1f} / {row['other_last_ms']:.1f} |"
        )
    return "\n".join(lines)


def write_report(
    runs: dict[int, list[dict[str, Any]]], libs: list[str], args: argparse.Namespace, redis_version: str
) -> None:
    out = [
        "# End-to-end benchmark: HTTP-triggered broadcasts to WebSocket clients",
        "",
        f"Generated by `{' '.join(['.venv/bin/python', 'bench/bench_e2e.py', *sys.argv[1:]])}` "
        f"on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"- Machine: {machine()}; shared with other work while this ran.",
        f"- Workload: {args.workers} uvicorn worker processes (one per port, clients spread evenly), "
        f"{args.broadcasts} broadcasts of a ~100-byte JSON message into one room, each triggered by an "
        "HTTP POST (alternating between the workers) once the previous one reached every client; "
        f"{args.client_procs} client processes (asyncio + websockets, "
        f"{'permessage-deflate offered, as browsers do' if args.deflate else 'no compression offered'}); "
        f"one local {redis_version}; uvicorn `--ws {args.ws}`; "
        f"{args.repeat} run(s) per library, interleaved, medians shown (losses summed).",
        "- deliveries/s: clients / median time from publish to the last client's receipt. Latency: "
        "publish (a timestamp in the message) to receipt, over every delivery. CPU: user + system "
        "seconds of the worker processes during the measured broadcasts. RSS per idle connection: "
        f"growth of the workers' RSS after the clients connected and idled {args.idle_seconds:g} s, "
        "divided by the clients.",
        "- On a shared machine deliveries/s and latency move by up to 2x between runs (the load "
        "average is noted per row); CPU seconds and RSS are the steadier figures. `--repeat N` "
        "interleaves N runs per library and shows medians.",
        "",
        "Versions:",
        "",
    ]
    for name in libs:
        lib = LIBS[name]
        found = versions(lib)
        if lib.source != ROOT:
            found["fastapi-websockets"] = f"{args.baseline} of this repository"
        out.append(f"- {lib.label}: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    for clients, rows in runs.items():
        out += ["", f"## {clients:,} clients", "", table(rows)]
        out += [
            "",
            "From publish to the first and the last receipt among each worker's clients (medians over "
            "the broadcasts and runs): the worker that served the POST, and the other one.",
            "",
            hops_table(rows),
            "",
        ]
        for row in rows:
            extra = []
            if row["rounds_timed_out"]:
                extra.append(f"{row['rounds_timed_out']} rounds timed out")
            if row["closed_early"]:
                extra.append(f"{row['closed_early']} sockets closed by the server")
            out.append(
                f"- {row['lib']}: load average {row['load_avg_1m']:.1f} when the broadcasts began; "
                f"rounds (ms{', first run' if row['runs'] > 1 else ''}) {row['rounds_ms']}; workers' RSS "
                f"{row['rss_before_mb']:.1f} MB before the clients, "
                f"{row['rss_idle_mb']:.1f} MB idle with them" + (f"; {', '.join(extra)}" if extra else "")
            )
    out += ["", f"![plot]({args.plot.name})", ""]
    args.out.write_text("\n".join(out))


def plot(runs: dict[int, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("deliveries_per_s", "deliveries/s (higher is better)"),
        ("p99_ms", "p99 latency, ms (lower is better)"),
        ("cpu_s", "server CPU s (lower is better)"),
        ("rss_per_conn_kb", "RSS per idle connection, KB (lower is better)"),
    ]
    labels = [row["short"] for row in next(iter(runs.values()))]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    width = 0.8 / len(runs)
    for ax, (key, title) in zip(axes.flat, metrics, strict=True):
        for index, (clients, rows) in enumerate(runs.items()):
            positions = [i + (index - (len(runs) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(positions, [row[key] for row in rows], width, label=f"{clients:,} clients")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("End to end over one Redis: HTTP-triggered broadcasts to WebSocket clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ================================================================ main


async def run_all(
    args: argparse.Namespace, libs: list[str], redis: RedisNode
) -> dict[int, list[dict[str, Any]]]:
    runs: dict[int, list[dict[str, Any]]] = {}
    for clients in args.clients:
        # Repeats are interleaved (every library once, then again) so that a burst of other
        # work on the shared machine lands on several libraries instead of one.
        tries: dict[str, list[dict[str, Any]]] = {name: [] for name in libs}
        for attempt in range(args.repeat):
            for name in libs:
                print(f"[{clients} clients, run {attempt + 1}] {name} ...", file=sys.stderr, flush=True)
                row = await run_lib(LIBS[name], redis, args, clients, f"{clients}c-run{attempt + 1}")
                print(json.dumps(row), file=sys.stderr, flush=True)
                tries[name].append(row)
        runs[clients] = [median_row(tries[name]) for name in libs]
    return runs


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of several runs of a library: the median of every figure, losses summed."""
    merged = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and key not in (
            "clients",
            "lost",
            "rounds_timed_out",
            "closed_early",
        ):
            merged[key] = statistics.median(row[key] for row in rows)
        elif key in ("lost", "rounds_timed_out", "closed_early"):
            merged[key] = sum(row[key] for row in rows)
    merged["runs"] = len(rows)
    return merged


def baseline_lib(ref: str, workdir: Path) -> Lib:
    """The handler app on the package as of git ``ref``, exported into ``workdir``."""
    source = workdir / "baseline"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "fastapi_websockets"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    return Lib(
        f"fastapi-websockets at {ref} (handler + send_json)",
        f"ours at {ref}:\nhandler",
        "ours_handler",
        ROOT / ".venv",
        ("fastapi", "redis"),
        source=source,
    )


def run(args: argparse.Namespace) -> None:
    libs = args.libs.split(",")
    for name in libs:
        if name not in LIBS:
            raise SystemExit(f"unknown library {name!r}; choose from {', '.join(LIBS)}")
        if not LIBS[name].python.exists():
            raise SystemExit(f"{LIBS[name].python} is missing: run bash bench/setup-peers")
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-redis-"))
    if args.baseline:
        libs.insert(libs.index("ours-handler") + 1 if "ours-handler" in libs else 0, "ours-baseline")
        LIBS["ours-baseline"] = baseline_lib(args.baseline, workdir)
    if args.python:
        python = interpreter(args.python)
        for name in libs:
            LIBS[name] = on_python(LIBS[name], python)
    redis = RedisNode(workdir, free_port())
    redis.start()
    try:
        redis_version = subprocess.run(
            [redis.server, "--version"], capture_output=True, text=True, check=True
        ).stdout.split(" sha")[0]
        runs = asyncio.run(run_all(args, libs, redis))
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(runs, indent=1))
    for clients, rows in runs.items():
        print(f"\n{clients:,} clients\n{table(rows)}\n\n{hops_table(rows)}")
    if args.out:
        write_report(runs, libs, args, redis_version)
        plot(runs, args.plot)
        print(f"\nwrote {args.out} and {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--clients",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1000],
        help="comma-separated: one full run per value",
    )
    parser.add_argument("--broadcasts", type=int, default=20)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per library, interleaved; the table shows medians"
    )
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait after the workers start")
    parser.add_argument("--round-timeout", type=float, default=10.0)
    parser.add_argument("--ws", default="auto", help="uvicorn --ws implementation")
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="clients offer permessage-deflate, as browsers do (it costs the server ~150 KB a socket)",
    )
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument(
        "--python",
        metavar="X.Y|PATH",
        help="run every library's workers on this Python: virtualenvs bench/.venv-e2e-pyX.Y-* are made "
        "if missing, with the package versions of the usual ones",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample each worker with py-spy (--native) during the measured broadcasts, write the raw "
        "stacks to DIR and print where the samples fall (CPU and latency figures then include py-spy's cost)",
    )
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the handler app on the package as of this git ref (before/after in one run)",
    )
    parser.add_argument(
        "--out",
        type=lambda text: Path(text) if text else None,
        default=ROOT / "docs" / "bench-e2e.md",
        help="markdown report ('' for none; the plot goes with it)",
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench-e2e.png")
    args = parser.parse_args()
    # SIGTERM would end the process without running `finally` blocks, leaving the
    # uvicorn workers, client processes and redis-server behind; exit the same way
    # Ctrl-C does instead, so each one is stopped.
    signal.signal(signal.SIGTERM, _terminate)
    run(args)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    main()
