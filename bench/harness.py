"""The benchmark harness: one definition of every scenario and figure, for every backend and peer.

``python -m bench`` (see ``__main__.py``) starts one broker at a time through
``tests/servers``, runs each (implementation, scenario) pair in a fresh worker
process, in the virtualenv the implementation needs, and prints one table.
Each ``bench_<broker>.py`` holds only what is specific to its broker: a
``server()`` context manager, the layer factories (``IMPLS``) and, where the
broker can say more than a socket count, a ``probe()`` of its resources.

This module imports only the standard library at the top: workers run it in
the peers' virtualenvs too, where this working tree's package is not importable.

The figures, identical for every row:

* **p2p**: N closed-loop senders (each sends its next message once the previous
  one was received) in a second layer instance, one receiver in the first, so
  every message crosses the broker; msgs/s and median send-to-receive latency,
  at 1 and at 16 senders. Each lasts about ``--p2p-seconds`` (2 s): a cap of
  2,000 messages used to end 16 fast senders within 0.1-0.3 s, where a few
  stalls of 10 ms moved the figure by 20% (measured on PostgreSQL).
* **p2p 2p**: the same closed loops with the sending layer (and the loops) in a
  second process, a child of the worker (``p2p_part``), as issue 15's check runs
  them. The receiving worker writes each message's id and the ``perf_counter``
  time it arrived (CLOCK_MONOTONIC, one clock for both processes) to the child's
  stdin, the arrivals of one pass of its loop in one write; the child's next send
  waits for that line. So every message crosses the broker once, as in p2p, and
  the latency is the same send-to-receive one; the closed loop pays one pipe hop
  more per message than p2p's, the same for every row. Its cost is printed per
  job in the notes (``report hop``: the pipe line's arrival in the child after
  the message's in the worker, median; ``reads/msg``: 1/16 when a loop of 16 sees
  all of a round's arrivals in one read), beside each process's CPU and wake-ups
  per message and the broker's CPU, also printed for p2p. ``bench/pipe_hop.py``
  measures the pipe alone.
* **fan-out**: one ``group_send`` from a second instance to R receivers waiting
  in the first; deliveries/s = R / the median round, a round lasting from the
  ``group_send`` call to the last delivery. ``vs mem`` compares like with like:
  the same worker also holds a room of R receivers of this tree's in-memory
  layer, and the two rooms take turns (``paired_rounds``), two rounds a turn of
  which the second is measured, so both rooms' rounds fall in the same slow and
  fast periods of the machine; ``vs mem`` is the in-memory room's median round
  over the row's. Each room's 1,000 waiting tasks live in the same loop, so
  both rooms pay for the other's alike. The notes print, per job, both medians,
  the worker's CPU per round of each, and the median of the turns' first
  (unmeasured) rounds. The in-memory row's job pits two in-memory rooms against
  each other: its ``vs mem`` should read 1.00, a check of the method. The last
  notes divide each row's median by the in-memory row's, measured in other jobs.
  Peers' workers cannot import this tree's layer: their rows have no ``vs mem``.
* **fan-out 2p**: the same, with the receivers split over two processes; the
  in-memory room is in the sending process.

``--repeat N`` makes N passes over each broker's rows, interleaved (A B C A B C),
and the table shows medians; ratios (``vs mem`` within each job, ``--versus ROW``
for p2p within each pass) are taken first, then their median is shown. On a shared machine a
ratio from one pass is worth more than an absolute figure from two.
* **idle**: R pending ``receive()`` calls on ``new_channel()`` channels of one
  layer: TCP connections to the broker, what ``probe()`` adds, and CPU of the
  process and of the broker over the idle window.

A cell with no figure says why in a word, and a note under the table in a line:
``cannot`` (the row's ``Impl.cannot``: not run), ``skipped`` (fanout2 after the
same pass's fanout failed), ``error`` (the job's error, with the row's known
``flaws``). Jobs do not wait out ``--limit`` on what will not come: a receiver
that raises ends its job at once, and a p2p loop that receives nothing, or a
fan-out round that does not end, for ``--stall`` seconds ends it saying what was
missing (``stall_guard``).

The in-memory layer (and Django Channels' one) share nothing between two
instances, so their sender is the receiving instance itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BROKERS = ("inmemory", "redis", "postgresql", "nats", "rabbitmq")
SCENARIOS = ("p2p", "p2p2", "fanout", "fanout2", "idle")
#: The p2p scenarios, in one process and in two: ``--versus`` divides their rates.
P2P = ("p2p", "p2p2")
#: Where each kind of implementation runs; the peers' virtualenvs come from bench/setup-peers.
PYTHONS = {
    "ours": Path(sys.executable),
    "channels": BENCH / ".venv-channels" / "bin" / "python",
    "0.1.0": BENCH / ".venv-010" / "bin" / "python",
}

Layer = Any
#: ``Impl.cannot`` of a bare client beside the layers (raw redis-py, aio-pika): it has no groups.
P2P_ONLY: Mapping[str, str] = dict.fromkeys(
    ("fanout", "fanout2", "idle"), "a bare client, no groups: p2p only"
)
#: JSON-able facts about the running broker: "url", "port", "pids", and broker-specific keys.
Server = dict[str, Any]


@dataclass(frozen=True)
class Impl:
    """One row of the table: how a worker builds (and closes) a layer of this implementation."""

    name: str
    #: A key of PYTHONS: the virtualenv the worker runs in.
    venv: str
    #: make(server, namespace) -> a new layer; the same namespace means shared state.
    make: Callable[[Server, str], Layer]
    #: False where two instances share nothing (in-memory layers).
    shared: bool = True
    #: The layer's own way to release its resources (peers differ).
    close: Callable[[Layer], Awaitable[Any]] = lambda layer: layer.close()
    #: Scenarios it cannot run, each with the reason the table prints instead of running it
    #: (a bare client has no groups; see each bench_<broker>.py for the peers' reasons).
    cannot: Mapping[str, str] = field(default_factory=dict)
    #: Why a scenario it runs may fail, printed beside such a failure: causes seen and
    #: checked (bench_<broker>.py says how), so that an error cell is not a mystery.
    flaws: Mapping[str, str] = field(default_factory=dict)

    def cannot_run(self, scenario: str) -> str | None:
        """Why this row does not run ``scenario``, or None where it does."""
        if scenario in ("p2p2", "fanout2") and not self.shared:
            return "two processes share nothing in memory"
        return self.cannot.get(scenario)


# ------------------------------------------------------------------ figures from /proc


def _stat_fields(process: Path) -> list[str]:
    """A process's ``/proc/<pid>/stat`` fields after the command name (state first)."""
    return (process / "stat").read_text().rsplit(")", 1)[1].split()


def _process_stats() -> dict[int, list[str]]:
    """Every process's ``/proc/<pid>/stat`` fields after the command name (state first)."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stats[int(entry.name)] = _stat_fields(entry)
    return stats


def own_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` alone, not its children."""
    fields = _stat_fields(Path(f"/proc/{pid}"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """How many times the main thread of ``pid`` has gone to sleep (its voluntary context switches).

    An event loop sleeps in its selector when it has nothing to run, so this counts the
    times it was woken again: one loop pass that found work after waiting for it.
    """
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:", 1)[1].split()[0])


def process_tree(pids: list[int], stats: dict[int, list[str]] | None = None) -> set[int]:
    """``pids`` and all their descendants."""
    stats = _process_stats() if stats is None else stats
    tree, found = set(pids), True
    while found:
        children = {pid for pid, fields in stats.items() if int(fields[1]) in tree} - tree
        tree |= children
        found = bool(children)
    return tree


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids`` and all their descendants."""
    stats = _process_stats()
    tree = process_tree(pids, stats)
    ticks = sum(int(stats[pid][11]) + int(stats[pid][12]) for pid in tree if pid in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def broker_sockets(port: int) -> set[int]:
    """Local ports of this process's established TCP connections to ``port``."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    local = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                local.add(int(fields[1].rsplit(":", 1)[1], 16))
    return local


# ------------------------------------------------------------------ scenarios (in a worker)


@contextlib.asynccontextmanager
async def layer_pair(impl: Impl, server: Server, namespace: str) -> Any:
    """(sender, receiver): two instances sharing ``namespace``, or one where nothing is shared."""
    receiver = impl.make(server, namespace)
    sender = impl.make(server, namespace) if impl.shared else receiver
    try:
        yield sender, receiver
    finally:
        for layer in {id(layer): layer for layer in (sender, receiver)}.values():
            await impl.close(layer)


async def warm(sender: Layer, receiver: Layer) -> str:
    """Send one message first, so that lazy connections and schemas are set up one at a time.

    0.1.0 creates its clients without a lock: a burst of first calls opens one pool each.
    """
    channel: str = await receiver.new_channel("bench")
    await sender.send(channel, {"type": "bench.warm", "id": -1})
    await receiver.receive(channel)
    return channel


@contextlib.asynccontextmanager
async def stall_guard(
    stall: float | None, progress: Callable[[], object], what: Callable[[], str]
) -> AsyncIterator[None]:
    """Fail the block with ``RuntimeError(what())`` once ``progress()`` stayed the same ``stall`` seconds.

    A message or a round that never comes (0.1.0 loses some, see the rows' ``flaws``) held
    a job until ``--limit`` and said only that it was not done; the guard ends it after
    ``--stall`` seconds without a message received (or a round ended) and says what was
    missing. It wakes once per ``stall`` seconds, outside the measured paths; ``stall``
    None (the profilers' own sizes have no "stall") guards nothing.
    """
    if stall is None:
        yield
        return
    task = asyncio.current_task()
    assert task is not None
    reasons: list[str] = []

    async def watch() -> None:
        seen = progress()
        while True:
            await asyncio.sleep(stall)
            if (now := progress()) == seen:
                reasons.append(what())
                task.cancel()
                return
            seen = now

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not reasons:
            raise
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+: the cancel was ours, not a caller's
        if uncancel is not None:
            uncancel()
        raise RuntimeError(reasons[0]) from None
    finally:
        await stop([watcher])


async def closed_loop(
    send: Send,
    waiting: dict[int, asyncio.Future[float]],
    senders: int,
    sizes: Any,
) -> dict[str, float]:
    """``senders`` tasks, each sending its next message once its previous one was received."""
    latencies: list[float] = []
    deadline = time.perf_counter() + sizes["p2p_seconds"]

    async def send_loop() -> None:
        while len(latencies) < sizes["p2p_messages"] and time.perf_counter() < deadline:
            key = len(waiting)  # never removed from: a fresh id
            received = waiting[key] = asyncio.get_running_loop().create_future()
            began = time.perf_counter()
            await send(key)
            latencies.append(await received - began)

    def lost() -> str:
        missing = sorted(key for key, future in waiting.items() if not future.done())
        shown = ", ".join(map(str, missing[:4])) + (", ..." if len(missing) > 4 else "")
        return (
            f"p2p{senders}: message {shown} not received in {sizes['stall']:g} s "
            f"({len(latencies):,} of this loop were)"
        )

    started = time.perf_counter()
    async with stall_guard(sizes.get("stall"), latencies.__len__, lost):
        await asyncio.gather(*(send_loop() for _ in range(senders)))
    return {"rate": len(latencies) / (time.perf_counter() - started), "p50": statistics.median(latencies)}


#: Sends message ``id`` of a p2p scenario (see :func:`p2p_link`).
Send = Callable[[int], Awaitable[None]]


@contextlib.asynccontextmanager
async def p2p_link(
    sender: Layer, receiver: Layer
) -> AsyncIterator[tuple[Send, dict[int, asyncio.Future[float]]]]:
    """``(send, waiting)`` for :func:`closed_loop`: ``sender`` to a channel of ``receiver``.

    A task receives on the channel while the block runs and resolves each message's
    future in ``waiting`` (by its id) with the time it arrived; the p2p scenario and
    the profilers that replay it share this set-up.
    """
    channel = await warm(sender, receiver)
    waiting: dict[int, asyncio.Future[float]] = {}

    async def receive_all() -> None:
        try:
            while True:
                message = await receiver.receive(channel)
                waiting[message["id"]].set_result(time.perf_counter())
        except Exception as exc:
            # The loops wait for what this task would have received: they fail now, saying why.
            error = failed("the receiver", exc)
            for future in waiting.values():
                if not future.done():
                    future.set_exception(error)
            raise

    async def send(key: int) -> None:
        await sender.send(channel, {"type": "bench.p2p", "id": key})

    reader = asyncio.create_task(receive_all())
    try:
        yield send, waiting
    finally:
        await stop([reader])


async def p2p_loops(
    send: Send,
    waiting: dict[int, asyncio.Future[float]],
    sizes: dict[str, Any],
    server: Server,
    peer: int | None = None,
    reads: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """The p2p figures of a link: closed loops of 1 then 16 senders, rate and median latency.

    Beside them, per message of each loop, the CPU microseconds of this process
    (``_cpu_us``), of the ``peer`` process where the receiver is in another one
    (``_peer_cpu_us``, from /proc: 10 ms ticks, fine over a loop of seconds) and of
    the broker's processes (``_broker_cpu_us``), all read outside the timed loop;
    where ``reads`` counts p2p2's reads of arrival reports, ``_reads_per_msg``: 1.0
    when every arrival woke the sending process on its own, 1/16 when a closed loop
    of 16 sees all of its arrivals at once, as one process does. ``_wakes_per_msg``
    (and ``_peer_wakes_per_msg``): how often each process's loop slept and was woken.
    """
    figures: dict[str, Any] = {}
    pids = server.get("pids", [])
    # A profiler may ask for other loops (profile_p2p2.py --senders N); the table has these.
    for senders in sizes.get("p2p_senders", (1, 16)):
        sent = len(waiting)
        cpu, peer_cpu, broker_cpu = time.process_time(), own_cpu(peer) if peer else 0.0, process_cpu(pids)
        read = reads() if reads else 0
        slept, peer_slept = sleeps(os.getpid()), sleeps(peer) if peer else 0
        loop = await closed_loop(send, waiting, senders, sizes)
        per_message = 1e6 / max(1, len(waiting) - sent)
        name = f"p2p{senders}"
        figures[f"{name}_wakes_per_msg"] = (sleeps(os.getpid()) - slept) * per_message / 1e6
        if reads:
            figures[f"{name}_reads_per_msg"] = (reads() - read) * per_message / 1e6
        figures[f"{name}_rate"], figures[f"{name}_p50"] = loop["rate"], loop["p50"]
        figures[f"{name}_cpu_us"] = (time.process_time() - cpu) * per_message
        if peer:
            figures[f"{name}_peer_cpu_us"] = (own_cpu(peer) - peer_cpu) * per_message
            figures[f"{name}_peer_wakes_per_msg"] = (sleeps(peer) - peer_slept) * per_message / 1e6
        if pids:
            figures[f"{name}_broker_cpu_us"] = (process_cpu(pids) - broker_cpu) * per_message
    return figures


async def p2p(impl: Impl, server: Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    async with (
        layer_pair(impl, server, namespace) as (sender, receiver),
        p2p_link(sender, receiver) as (send, waiting),
    ):
        return await p2p_loops(send, waiting, sizes, server)


async def p2p_part(impl: Impl, server: Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """The sending process of p2p2: its layer sends, each message's arrival comes back on stdin.

    The first line names the receiver's channel; each later one is ``id time``, the
    receiving worker's ``perf_counter`` when the message arrived there, which resolves
    the message's future in ``waiting`` (so the latency is the one-way one, as in p2p).
    """
    loop = asyncio.get_running_loop()
    reports = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reports), sys.stdin)
    channel = (await reports.readline()).decode().strip()
    sender = impl.make(server, namespace)
    waiting: dict[int, asyncio.Future[float]] = {}
    hops: list[float] = []
    reads = 0

    async def read_reports() -> None:
        nonlocal reads
        tail = b""
        # Whatever arrived since the last wake-up in one read, as a socket's reader takes it.
        while data := await reports.read(65536):
            reads += 1
            now = time.perf_counter()
            *lines, tail = (tail + data).split(b"\n")
            for line in lines:
                key, stamp = line.split()
                hops.append(now - float(stamp))
                waiting[int(key)].set_result(float(stamp))

    async def send(key: int) -> None:
        await sender.send(channel, {"type": "bench.p2p", "id": key})

    reader = asyncio.create_task(read_reports())
    try:
        # One message first, as warm() does in p2p: lazy connections set up one at a time.
        waiting[-1] = loop.create_future()
        await send(-1)
        await waiting[-1]
        result = await p2p_loops(send, waiting, sizes, server, peer=os.getppid(), reads=lambda: reads)
    finally:
        await stop([reader])
        await impl.close(sender)
    return result | {"report_hop_p50": statistics.median(hops)}


async def p2p2(impl: Impl, server: Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """p2p with the sender in a child process (``p2p_part``); this one receives and reports arrivals."""
    receiver = impl.make(server, namespace)
    try:
        channel = await receiver.new_channel("bench")
        async with parts(impl, server, namespace, sizes, "p2p_part", 1) as [child]:
            assert child.stdin is not None
            assert child.stdout is not None
            reports = child.stdin
            reports.write(f"{channel}\n".encode())
            pending: list[bytes] = []

            def flush() -> None:
                reports.write(b"".join(pending))
                pending.clear()

            async def report_all() -> None:
                while True:
                    message = await receiver.receive(channel)
                    if not pending:
                        # The arrivals of one pass of this loop go in one write: with a write each,
                        # the sending process often woke on the first arrivals of a round and sent
                        # before the rest came (RabbitMQ at 16 senders: 8-15 reads per 100
                        # messages, not 6), splitting its batches where one process (p2p) does not.
                        asyncio.get_running_loop().call_soon(flush)
                    pending.append(f"{message['id']} {time.perf_counter()!r}\n".encode())

            reporter = asyncio.create_task(report_all())
            reading = asyncio.ensure_future(child.stdout.read())
            try:
                await asyncio.wait([reading, reporter], return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    # The sending process would wait for reports that never come.
                    raise failed("the receiver", reporter.exception())
                lines = reading.result().decode().strip().splitlines()
            finally:
                await stop([reporter, reading])
    finally:
        await impl.close(receiver)
    if not lines:
        raise RuntimeError(f"the sending process printed nothing (exit status {await child.wait()})")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise RuntimeError(f"the sending process: {result['error']}")
    return result


class Rounds:
    """Counts the deliveries of each fan-out round; knows when a round reached every receiver."""

    def __init__(self, receivers: int) -> None:
        self.receivers = receivers
        self.counts: dict[int, int] = {}
        self.ends: dict[int, asyncio.Future[float]] = {}
        #: Why a receiver stopped (see :meth:`fail`); no round can reach every receiver after it.
        self.error: BaseException | None = None

    def end(self, index: int) -> asyncio.Future[float]:
        """Resolves to the wall-clock time of the round's last delivery."""
        if index not in self.ends:
            self.ends[index] = end = asyncio.get_running_loop().create_future()
            if self.error is not None:
                end.set_exception(self.error)
        return self.ends[index]

    def delivered(self, index: int) -> None:
        self.counts[index] = self.counts.get(index, 0) + 1
        if self.counts[index] == self.receivers and not (end := self.end(index)).done():
            end.set_result(time.time())

    def fail(self, error: BaseException) -> None:
        """A receiver failed: the rounds waited for, and later ones, fail now with ``error``."""
        if self.error is None:
            self.error = error
        for end in self.ends.values():
            if not end.done():
                end.set_exception(error)

    def ended(self) -> int:
        """How many rounds reached every receiver (the progress :func:`stall_guard` watches)."""
        return sum(1 for end in self.ends.values() if end.done())

    def progress(self) -> str:
        """How far each round not ended yet got, for a stalled round's error."""
        return "; ".join(
            f"round {index} reached {self.counts.get(index, 0):,} of {self.receivers:,} receivers"
            for index, end in self.ends.items()
            if not end.done()
        )


async def start_receivers(layer: Layer, count: int, rounds: Rounds) -> list[asyncio.Task[None]]:
    """``count`` channels in the group "room", each with a task receiving forever."""
    channels = [await layer.new_channel("fan") for _ in range(count)]
    for channel in channels:
        await layer.group_add("room", channel)

    async def listen(channel: str) -> None:
        try:
            while True:
                rounds.delivered((await layer.receive(channel))["round"])
        except Exception as exc:
            rounds.fail(failed(f"a receiver of {count:,}", exc))
            raise

    return [asyncio.create_task(listen(channel)) for channel in channels]


async def stop(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def failed(who: str, exc: BaseException | None) -> RuntimeError:
    """The error a job ends with when a task it waits on failed: who, and the exception's own words."""
    return RuntimeError(f"{who} failed: {type(exc).__name__}: {exc}")


@contextlib.asynccontextmanager
async def fan_room(
    impl: Impl, server: Server, namespace: str, receivers: int, stall: float | None = None
) -> AsyncIterator[tuple[Layer, Layer, Rounds]]:
    """(sender, receiver, rounds) of a room of ``receivers`` channels, once round 0 reached them all.

    ``stall``: the seconds round 0 may take (see :func:`stall_guard`), None for no limit.
    """
    async with layer_pair(impl, server, namespace) as (sender, receiver):
        rounds = Rounds(receivers)
        tasks = await start_receivers(receiver, receivers, rounds)
        try:
            await asyncio.sleep(0.5)  # let subscriptions made by group_add settle on the broker
            async with stall_guard(stall, rounds.ended, lambda: f"{rounds.progress()} in {stall:g} s"):
                await sender.group_send("room", {"type": "bench.fan", "round": 0})
                await rounds.end(0)
            yield sender, receiver, rounds
        finally:
            await stop(tasks)


async def fan_rounds(sender: Layer, rounds: Rounds, count: int) -> list[float]:
    """Rounds 1 to ``count`` of a :func:`fan_room`, one after the other; each one's wall seconds."""
    walls = []
    for index in range(1, count + 1):
        began = time.perf_counter()
        await sender.group_send("room", {"type": "bench.fan", "round": index})
        await rounds.end(index)
        walls.append(time.perf_counter() - began)
    return walls


#: Plays round ``index`` of a room (its ``group_send``); resolves to the wall-clock time
#: (``time.time()``, comparable across processes) of the round's last delivery.
Play = Callable[[int], Awaitable[float]]


@contextlib.asynccontextmanager
async def reference_room(impl: Impl, receivers: int) -> AsyncIterator[Play | None]:
    """A room of this tree's in-memory layer beside a row's, in the row's worker; None for peers.

    A peer's worker runs in the peer's virtualenv, where this tree's layer cannot be imported
    (0.1.0's has the same import path), so the peers' rows get no ratio of their own.
    """
    if impl.venv != "ours":
        yield None
        return
    memory = importlib.import_module("bench_inmemory").IMPLS[0]
    async with fan_room(memory, {}, "reference", receivers) as (sender, _, rounds):

        async def play(index: int) -> float:
            await sender.group_send("room", {"type": "bench.fan", "round": index})
            return await rounds.end(index)

        yield play


async def paired_rounds(
    sizes: dict[str, Any], row: Play, reference: Play | None, progress: Callable[[], str] | None = None
) -> dict[str, Any]:
    """Rounds of the row's room and of the in-memory reference room, alternated, in one loop.

    Each turn plays two rounds of one room back to back and measures only the second, so that
    a measured round follows one of its own room, as in a run of that room alone: what a
    broker's round leaves to do after its last delivery (acknowledgements, a reply) falls in
    the next round of the same room, not in the in-memory room's measured one. The rooms take
    turns (row first, then reference first, and so on) until ``rounds`` measured rounds of
    each or ``fanout_seconds`` (no turn begins that the last one's length says would end
    after it: 0.1.0's rounds take seconds), so both draw from the same slow and fast periods
    of the machine (0.3-1 s long on the shared one). Round 0 of each room warmed it up already.

    Per room: the median measured round (``round_ms``, and ``memory_round_ms``), this
    process's CPU per measured round (where both grow together the process ran slower on its
    core, where only the wall grows it waited for one), the median first round of a turn
    (``first_round_ms``: after the other room's), and ``ratio``, the reference's median round
    over the row's: the row's deliveries/s over the in-memory layer's in the same job;
    ``pair_ratio``, the median over turns of the two rooms' measured rounds' ratio.

    A round not done in ``sizes["stall"]`` seconds ends the job (:func:`stall_guard`), its
    error saying how far the row's round got where ``progress`` can tell.
    """
    plays = {"": row} | ({"memory_": reference} if reference is not None else {})
    walls: dict[str, list[float]] = {name: [] for name in plays}
    firsts: dict[str, list[float]] = {name: [] for name in plays}
    cpus: dict[str, list[float]] = {name: [] for name in plays}
    played = dict.fromkeys(plays, 0)

    async def timed(name: str) -> tuple[float, float]:
        played[name] += 1
        began, cpu = time.time(), time.process_time()
        ended = await plays[name](played[name])
        return ended - began, time.process_time() - cpu

    playing = ""

    def stalled() -> str:
        if progress is not None and not playing:
            return f"{progress()} in {sizes['stall']:g} s"
        room = "the in-memory room's" if playing else "the row's"
        return f"{room} round {played[playing]} not done in {sizes['stall']:g} s"

    began = time.perf_counter()
    deadline = began + sizes["fanout_seconds"]
    async with stall_guard(sizes.get("stall"), lambda: sum(played.values()), stalled):
        for turn in range(sizes["rounds"]):
            now = time.perf_counter()
            if turn and now + (now - began) > deadline:  # now - began: the last turn's length
                break
            began = now
            for playing in list(plays)[:: 1 if turn % 2 == 0 else -1]:
                firsts[playing].append((await timed(playing))[0])
                wall, cpu = await timed(playing)
                walls[playing].append(wall)
                cpus[playing].append(cpu)
    result: dict[str, Any] = {
        "rate": sizes["receivers"] / statistics.median(walls[""]),
        "rounds": len(walls[""]),
    }
    for name in plays:
        result[f"{name}round_ms"] = statistics.median(walls[name]) * 1000
        result[f"{name}round_cpu_ms"] = statistics.median(cpus[name]) * 1000
        result[f"{name}first_round_ms"] = statistics.median(firsts[name]) * 1000
    if reference is not None:
        result["ratio"] = result["memory_round_ms"] / result["round_ms"]
        # A check on the ratio of medians: each turn's pair of measured rounds, a few
        # milliseconds apart, shares its moment of the machine more closely still.
        pairs = zip(walls["memory_"], walls[""], strict=True)
        result["pair_ratio"] = statistics.median(memory / own for memory, own in pairs)
    return result


async def fanout(impl: Impl, server: Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """The row's room and the in-memory reference room, both in this worker (``paired_rounds``)."""
    async with (
        fan_room(impl, server, namespace, sizes["receivers"], sizes.get("stall")) as (sender, _, rounds),
        reference_room(impl, sizes["receivers"]) as reference,
    ):

        async def play(index: int) -> float:
            await sender.group_send("room", {"type": "bench.fan", "round": index})
            return await rounds.end(index)

        return await paired_rounds(sizes, play, reference, rounds.progress)


async def fanout_part(impl: Impl, server: Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """One of the two receiving processes of fanout2: prints each round's last delivery time."""
    layer = impl.make(server, namespace)
    rounds = Rounds(sizes["receivers"] // 2)
    tasks = await start_receivers(layer, rounds.receivers, rounds)
    print("ready", flush=True)
    try:
        for index in itertools.count():
            print(json.dumps(await rounds.end(index)), flush=True)
    finally:
        await stop(tasks)
        await impl.close(layer)
    return {}


@contextlib.asynccontextmanager
async def parts(
    impl: Impl, server: Server, namespace: str, sizes: dict[str, Any], scenario: str, count: int
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """``count`` child workers running ``scenario`` with this one's interpreter and environment.

    The children run in the same virtualenv, on the same ``PYTHONPATH`` (so a peer's row
    and compare_trees' old trees work as in this worker), with piped stdin and stdout;
    they are killed, if still running, and awaited when the block ends.
    """
    job = json.dumps({"impl": impl.name, "scenario": scenario, "server": server, "ns": namespace})
    children: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(count):
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    BENCH / "__main__.py",
                    "--worker",
                    job,
                    json.dumps(sizes),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        yield children
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):  # it may have failed and exited already
                child.kill()
            await child.wait()


def why_stopped(line: bytes) -> str:
    """What a child worker's unexpected line says: the error it reported, or that it exited."""
    text = line.decode(errors="replace").strip()
    with contextlib.suppress(ValueError, TypeError, KeyError):
        text = json.loads(text)["error"]  # what worker() prints when its scenario failed
    return text or "it exited"


def reported(line: bytes) -> float:
    """A receiving process's line in fanout2: when its round ended, or (raised) why it stopped."""
    try:
        return float(line)
    except ValueError:
        raise RuntimeError(f"a receiving process stopped: {why_stopped(line)}") from None


async def fanout2(impl: Impl, server: Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """Receivers in two child processes (``fanout_part``); the reference room in this one.

    The second process starts once the first has its receivers in the group: 0.1.0's NATS
    ``group_add`` rewrites the whole group under a revision check and gives up after 8
    conflicts, which two processes adding 500 receivers each at once ran into.
    """
    async with contextlib.AsyncExitStack() as stack:
        outputs = []
        for _ in range(2):
            [child] = await stack.enter_async_context(parts(impl, server, namespace, sizes, "fanout_part", 1))
            assert child.stdout is not None
            if (line := await child.stdout.readline()).strip() != b"ready":
                raise RuntimeError(f"a receiving process did not start: {why_stopped(line)}")
            outputs.append(child.stdout)
        sender = impl.make(server, namespace)
        try:

            async def play(index: int) -> float:
                await sender.group_send("room", {"type": "bench.fan", "round": index})
                # Each receiving process prints its rounds' last deliveries in order.
                return max([reported(await output.readline()) for output in outputs])

            await asyncio.sleep(0.5)  # let subscriptions made by group_add settle on the broker
            stall = sizes.get("stall")
            async with stall_guard(stall, lambda: 0, lambda: f"round 0 not done in {stall:g} s"):
                await play(0)
            async with reference_room(impl, sizes["receivers"]) as reference:
                return await paired_rounds(sizes, play, reference)
        finally:
            await impl.close(sender)


async def settle(limit: float) -> None:
    """Wait until this process stops working (receivers set up), at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = time.process_time()
        await asyncio.sleep(0.5)
        if time.process_time() - before < 0.02:
            return


async def idle(impl: Impl, server: Server, namespace: str, sizes: dict[str, Any]) -> dict[str, Any]:
    probe = getattr(importlib.import_module(f"bench_{server['broker']}"), "probe", None)
    before = probe(server, set()) if probe else {}
    layer = impl.make(server, namespace)
    await warm(layer, layer)
    channels = [await layer.new_channel("idle") for _ in range(sizes["idle_receivers"])]
    tasks = [asyncio.create_task(layer.receive(channel)) for channel in channels]
    try:
        await settle(10.0)
        sockets = broker_sockets(server["port"]) if "port" in server else set()
        result: dict[str, Any] = {"connections": len(sockets)}
        if probe:
            after = await asyncio.to_thread(probe, server, sockets)
            result |= {key: after[key] - before.get(key, 0) for key in after}
        pids, seconds = server.get("pids", []), sizes["idle_seconds"]
        cpu, server_cpu = time.process_time(), process_cpu(pids)
        await asyncio.sleep(seconds)
        result["cpu"] = (time.process_time() - cpu) / seconds
        result["server_cpu"] = (process_cpu(pids) - server_cpu) / seconds if pids else None
        result["receivers failed"] = sum(1 for task in tasks if task.done())
        return result
    finally:
        await stop(tasks)
        await impl.close(layer)


def find_impl(broker: str, name: str) -> Impl:
    impls: list[Impl] = importlib.import_module(f"bench_{broker}").IMPLS
    return next(impl for impl in impls if impl.name == name)


def worker(job: dict[str, Any], sizes: dict[str, Any]) -> None:
    """Run one scenario and print its figures as the last line of stdout (JSON)."""
    scenario = globals()[job["scenario"]]
    impl = find_impl(job["server"]["broker"], job["impl"])

    async def run() -> dict[str, Any]:
        try:
            result: dict[str, Any] = await asyncio.wait_for(
                scenario(impl, job["server"], job["ns"], sizes), sizes["limit"]
            )
        except asyncio.TimeoutError:
            return {"error": f"not done in {sizes['limit']:g} s"}
        except Exception as exc:  # a peer's failure is a result, not a crash of the run
            return {"error": f"{type(exc).__name__}: {exc}"[:240]}
        return result

    print(json.dumps(asyncio.run(run())), flush=True)


# ------------------------------------------------------------------ the coordinator


def run_job(impl: Impl, scenario: str, server: Server, sizes: dict[str, Any]) -> dict[str, Any]:
    """Run one scenario in a fresh worker process of the implementation's virtualenv."""
    job = {"impl": impl.name, "scenario": scenario, "server": server, "ns": "b" + uuid.uuid4().hex[:10]}
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if impl.venv == "ours":
        # The virtualenv's editable install points at one checkout (/work/main, say); a run from
        # another worktree must measure that worktree's package, not the install's.
        env["PYTHONPATH"] = str(ROOT)
    # cwd=/ keeps this working tree's package off the path of the 0.1.0 and channels workers.
    command = [str(PYTHONS[impl.venv]), str(BENCH / "__main__.py"), "--worker", json.dumps(job)]
    try:
        done = subprocess.run(
            [*command, json.dumps(sizes)],
            capture_output=True,
            text=True,
            timeout=sizes["limit"] * 2 + 30,
            cwd="/",
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": "the worker hung"}
    finally:
        # What a worker left on the broker (0.1.0 leaves a quorum queue per receiver) would
        # load it during every later job of the run: each job leaves the broker as it found it.
        cleanup = getattr(
            importlib.import_module(f"bench_{server.get('broker', 'inmemory')}"), "cleanup", None
        )
        try:
            if cleanup is not None:
                cleanup(server, job["ns"])
        except Exception as exc:  # the job's figures still count; later jobs may be slower
            print(f"  cleanup after {impl.name} {scenario} failed: {exc!r}", file=sys.stderr, flush=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": f"worker exited with {done.returncode}: {done.stderr.strip()[-300:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], Any], str]] = [
    # (header, scenario, value, format)
    ("p2p1 msg/s", "p2p", lambda r: r["p2p1_rate"], ",.0f"),
    ("p50 ms", "p2p", lambda r: r["p2p1_p50"] * 1000, ".2f"),
    ("p2p16 msg/s", "p2p", lambda r: r["p2p16_rate"], ",.0f"),
    ("p50 ms", "p2p", lambda r: r["p2p16_p50"] * 1000, ".2f"),
    ("2p p2p1/s", "p2p2", lambda r: r["p2p1_rate"], ",.0f"),
    ("p50 ms", "p2p2", lambda r: r["p2p1_p50"] * 1000, ".2f"),
    ("2p p2p16/s", "p2p2", lambda r: r["p2p16_rate"], ",.0f"),
    ("p50 ms", "p2p2", lambda r: r["p2p16_p50"] * 1000, ".2f"),
    ("fan-out/s", "fanout", lambda r: r["rate"], ",.0f"),
    ("vs mem", "fanout", lambda r: r["ratio"], ".0%"),
    ("fan-out 2p/s", "fanout2", lambda r: r["rate"], ",.0f"),
    ("2p vs mem", "fanout2", lambda r: r["ratio"], ".0%"),
    ("idle conns", "idle", lambda r: r["connections"], "d"),
    ("idle CPU %", "idle", lambda r: r["cpu"] * 100, ".2f"),
    ("broker CPU %", "idle", lambda r: r["server_cpu"] * 100, ".2f"),
]


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the passes that did not fail; an error only if all failed."""
    done = [run for run in runs if "error" not in run]
    if not done:
        return runs[0]
    merged: dict[str, Any] = {}
    for key in done[0]:
        values = [run[key] for run in done if isinstance(run.get(key), (int, float))]
        merged[key] = statistics.median(values) if values else done[0][key]
    if len(done) < len(runs):
        merged["failed passes"] = len(runs) - len(done)
    return merged


def add_versus(runs: dict[str, dict[str, list[dict[str, Any]]]], versus: str) -> None:
    """Each row's p2p and p2p2 rates over the ``versus`` row's rates of the same scenario and pass."""
    for scenario in P2P:
        against = {run["pass"]: run for run in runs.get(versus, {}).get(scenario, [])}
        for scenarios in runs.values():
            for run in scenarios.get(scenario, []):
                other = against.get(run["pass"], {})
                for key in ("p2p1_rate", "p2p16_rate"):
                    if key in run and other.get(key):
                        run[f"{key} vs"] = run[key] / other[key]


def pass_notes(name: str, scenarios: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each pass's main figures, so that a reader can see the spread behind a median."""
    notes = []
    for scenario, passes in scenarios.items():
        keys = [
            k
            for k in ("p2p1_rate", "p2p16_rate", "p2p1_rate vs", "p2p16_rate vs", "rate", "ratio")
            if k in passes[0]
        ]
        for key in keys:
            values = [run.get(key) for run in passes]
            spec = ".2f" if key.endswith(("vs", "ratio")) else ",.0f"
            shown = " / ".join("error" if v is None else format(v, spec) for v in values)
            notes.append(f"{name} {scenario} {key}: {shown}")
    return notes


#: What a cell shows where a row has no figure, by the key its result holds instead (the notes
#: below the table say why).
NO_FIGURE = ("error", "cannot", "skipped")


def table(rows: dict[str, dict[str, dict[str, Any]]], scenarios: list[str]) -> str:
    """One line per implementation, one column per figure of ``scenarios``; the whys as notes below.

    A cell with no figure says why in a word (``NO_FIGURE``; "-" for a figure its scenario does
    not give, as a peer's ``vs mem``), and a note below gives the reason in a line.
    """
    notes = []
    for name, results in rows.items():
        for scenario, outcome in results.items():
            if "error" in outcome:
                why = f"; why: {outcome['flaw']}" if "flaw" in outcome else ""
                notes.append(f"{name} {scenario}: {outcome['error']}{why}")
        reasons: dict[str, list[str]] = {}
        for scenario, outcome in results.items():
            for key in ("cannot", "skipped"):
                if key in outcome:
                    reasons.setdefault(f"{key}: {outcome[key]}", []).append(scenario)
        notes += [f"{name} {', '.join(listed)}: {reason}" for reason, listed in reasons.items()]
        for scenario, figures in results.items():
            ratios = [
                f"{k.removesuffix('_rate vs')} {v:.2f}" for k, v in figures.items() if k.endswith(" vs")
            ]
            if ratios:
                notes.append(
                    f"{name} {scenario} over the --versus row, median per-pass ratio: {', '.join(ratios)}"
                )
        shown = ("connections", "cpu", "server_cpu", "pass", "flaw", *NO_FIGURE)
        extra = {k: v for k, v in results.get("idle", {}).items() if k not in shown and v}
        if extra:
            notes.append(f"{name} idle: " + ", ".join(f"{k} {v:g}" for k, v in extra.items()))
    columns = [column for column in COLUMNS if column[1] in scenarios]
    width = max(len(name) for name in rows)
    lines = [f"{'':{width}} | " + " | ".join(f"{header:>12}" for header, *_ in columns)]
    lines.append("-" * len(lines[0]))
    for name, results in rows.items():
        cells = []
        for _, scenario, value, spec in columns:
            result = results.get(scenario)
            if result is None:
                cells.append("")
                continue
            with contextlib.suppress(KeyError, TypeError):
                cells.append(format(value(result), spec))
                continue
            cells.append(next((key for key in NO_FIGURE if key in result), "-"))
        lines.append(f"{name:{width}} | " + " | ".join(f"{cell:>12}" for cell in cells))
    return "\n".join([*lines, "", *notes])


def row_ratios(rows: dict[str, dict[str, dict[str, Any]]], memory: str) -> list[str]:
    """Each row's median fan-out rates over the in-memory row's median, the other way to read ``vs mem``.

    The in-memory row ran in jobs of its own, with no broker server, so this ratio does not
    share the row's periods of the machine as ``vs mem`` does (both rooms in one job); where
    the two readings disagree, the jobs' CPU per round in the notes tells which drew slow ones.
    """
    ceiling = rows.get(memory, {}).get("fanout", {}).get("rate")
    if not ceiling:
        return []
    notes = []
    for name, results in rows.items():
        shown = [
            f"{scenario} {results[scenario]['rate'] / ceiling:.2f}"
            for scenario in ("fanout", "fanout2")
            if name != memory and "rate" in results.get(scenario, {})
        ]
        if shown:
            head = f"{name} over the in-memory row's median fan-out ({ceiling:,.0f}/s)"
            notes.append(f"{head}: {', '.join(shown)}")
    return notes


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "fan-out: each job also holds a room of this tree's in-memory layer of the same size; the two "
            "rooms take turns of two rounds (the second measured) and 'vs mem' is the in-memory room's "
            "median round over the row's, both from the same job. The notes give both medians, the CPU per "
            "round and each turn's first round. See bench/harness.py."
        ),
    )
    parser.add_argument("--backends", default=",".join(BROKERS), help="comma-separated: %(default)s")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: %(default)s")
    parser.add_argument("--no-peers", action="store_true", help="only this working tree's layers")
    parser.add_argument("--match", default="", help="only rows whose name contains this")
    parser.add_argument("--p2p-messages", type=int, default=40_000, help="at most, per sender count")
    parser.add_argument("--p2p-seconds", type=float, default=2.0, help="at most, per sender count")
    parser.add_argument("--receivers", type=int, default=1_000, help="fan-out receivers")
    parser.add_argument(
        "--rounds", type=int, default=30, help="fan-out turns of each room, at most (one measured round each)"
    )
    parser.add_argument("--fanout-seconds", type=float, default=10.0, help="fan-out turns stop after")
    parser.add_argument("--idle-receivers", type=int, default=1_000)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--limit", type=float, default=30.0, help="seconds per scenario before an error")
    parser.add_argument(
        "--stall",
        type=float,
        default=10.0,
        help="seconds a p2p loop may go without a message, or a fan-out round take, before an error",
    )
    parser.add_argument("--repeat", type=int, default=1, help="passes over each broker's rows, interleaved")
    parser.add_argument(
        "--versus", default="", help="a row name: p2p ratios of every row of its broker to it"
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def no_server() -> Iterator[Server]:
    yield {}


def p2p_note(result: dict[str, Any]) -> str:
    """One p2p job's CPU and wake-ups per message per process (and the broker's CPU), and p2p2's pipe."""
    if "error" in result:
        return str(result["error"])
    shown = []
    for name in ("p2p1", "p2p16"):
        # In p2p one process both sends and receives; in p2p2 the peer is the receiving one.
        own = "sender" if f"{name}_peer_cpu_us" in result else "process"
        cpus = [
            f"{who} {result[key]:.0f}"
            for who, key in (
                (own, f"{name}_cpu_us"),
                ("receiver", f"{name}_peer_cpu_us"),
                ("broker", f"{name}_broker_cpu_us"),
            )
            if key in result
        ]
        wakes = [
            f"{who} {result[key]:.2f}"
            for who, key in ((own, f"{name}_wakes_per_msg"), ("receiver", f"{name}_peer_wakes_per_msg"))
            if key in result
        ]
        shown.append(f"{name} CPU us/msg {', '.join(cpus)}, wakes/msg {', '.join(wakes)}")
    if "report_hop_p50" in result:
        shown.append(f"report hop p50 {result['report_hop_p50'] * 1e6:.0f} us")
        shown += [f"{name} reads/msg {result[f'{name}_reads_per_msg']:.2f}" for name in ("p2p1", "p2p16")]
    return "; ".join(shown)


def pair_note(result: dict[str, Any], scenario: str) -> str:
    """One job's two rooms: median rounds, CPU per round, first rounds of a turn, and their ratio."""
    if "memory_round_ms" not in result:
        return str(
            result.get("error", f"{result.get('round_ms', 0):.2f} ms, no in-memory room in its worker")
        )
    # In fanout2 the row's receivers work in other processes: this one's CPU is only the sender's.
    cpu = result["memory_round_cpu_ms"] / result["round_cpu_ms"]
    of_cpu = f" (of this process's CPU {cpu:.2f})" if scenario == "fanout" else ""
    return (
        f"in-memory {result['memory_round_ms']:.2f} ms (CPU {result['memory_round_cpu_ms']:.2f}), "
        f"row {result['round_ms']:.2f} ms (CPU {result['round_cpu_ms']:.2f}), ratio {result['ratio']:.2f}"
        f"{of_cpu}, median of turns' ratios {result['pair_ratio']:.2f}; "
        f"a turn's first round {result['memory_first_round_ms']:.2f} / {result['first_round_ms']:.2f} ms; "
        f"{result['rounds']} turns each"
    )


def coordinate(args: argparse.Namespace) -> None:
    sizes = {key: value for key, value in vars(args).items() if isinstance(value, (int, float))}
    scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    backends = args.backends.split(",")
    if unknown := (set(backends) - set(BROKERS)) | (set(args.scenarios.split(",")) - set(SCENARIOS)):
        raise SystemExit(f"unknown backend or scenario: {', '.join(sorted(unknown))}")
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    notes: list[str] = []
    skipped = set()
    started = time.monotonic()
    memory = importlib.import_module("bench_inmemory").IMPLS[0]
    # The in-memory layer (the first row of bench_inmemory) always runs: its fan-out, in-memory
    # against in-memory, checks the method (vs mem 1.00), and the last notes divide by it.
    for broker in ["inmemory", *(b for b in BROKERS[1:] if b in backends)]:
        module = importlib.import_module(f"bench_{broker}")
        impls = [i for i in module.IMPLS if args.match in i.name and not (args.no_peers and i.venv != "ours")]
        if broker == "inmemory":
            impls = [memory, *(i for i in impls if i.venv != "ours" and "inmemory" in backends)]
        skipped |= {i.venv for i in impls if not PYTHONS[i.venv].exists()}
        impls = [i for i in impls if PYTHONS[i.venv].exists()]
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        print(f"{broker}: starting the server", file=sys.stderr, flush=True)
        with getattr(module, "server", no_server)() as server:
            server = {"broker": broker, **server}
            for index in range(args.repeat):
                load = os.getloadavg()[0]
                for impl, scenario in itertools.product(impls, scenarios):
                    done = runs.setdefault(impl.name, {})
                    if reason := impl.cannot_run(scenario):
                        done.setdefault(scenario, []).append({"cannot": reason, "pass": index})
                        continue
                    # Two processes do not finish what one could not: no minutes spent to learn it.
                    fanout_failed = any("error" in run for run in done.get("fanout", [])[index:])
                    if scenario == "fanout2" and fanout_failed:
                        done.setdefault(scenario, []).append({"skipped": "fanout failed", "pass": index})
                        continue
                    print(f"  pass {index + 1}: {impl.name}: {scenario}", file=sys.stderr, flush=True)
                    result = run_job(impl, scenario, server, sizes)
                    result["pass"] = index
                    if "error" in result and scenario in impl.flaws:
                        result["flaw"] = impl.flaws[scenario]
                    done.setdefault(scenario, []).append(result)
                    if scenario in ("fanout", "fanout2"):
                        notes.append(
                            f"{impl.name} {scenario} pass {index + 1}: {pair_note(result, scenario)}"
                        )
                    if scenario in P2P:
                        notes.append(f"{impl.name} {scenario} pass {index + 1}: {p2p_note(result)}")
                notes.append(f"{broker} pass {index + 1}: load {load:.2f} when it began")
        add_versus(runs, args.versus)
        for name, scenario_runs in runs.items():
            rows[name] = {scenario: merge(passes) for scenario, passes in scenario_runs.items()}
            if args.repeat > 1:
                notes += pass_notes(name, scenario_runs)
    print(
        f"\np2p: closed loop, at most {args.p2p_messages:,} messages or {args.p2p_seconds:g} s "
        "(2p: the sender in a child process, told of each arrival over a pipe); "
        f"fan-out: {args.receivers:,} receivers, median of at most {args.rounds} rounds, each after one of "
        "the same room, taking turns with an in-memory room of the same size in the same worker; vs mem: "
        "its median round over the row's; "
        f"idle: {args.idle_receivers:,} receivers, {args.idle_seconds:g} s; "
        f"{args.repeat} pass(es), medians; python {sys.version.split()[0]}; load {os.getloadavg()[0]:.2f}; "
        f"{time.monotonic() - started:.0f} s in all\n"
    )
    print(table(rows, scenarios))
    print("\n".join([*notes, *row_ratios(rows, memory.name)]))
    for venv in sorted(skipped):
        print(f"{venv} rows skipped: {PYTHONS[venv]} is missing (run bash bench/setup-peers)")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]), json.loads(argv[2]))
    else:
        sys.path.insert(0, str(ROOT))  # tests.servers, to start the brokers
        coordinate(parse(argv))
