"""Faults for failure tests: a server that never answers, a TCP proxy that can be cut, a driver error."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fastapi_websockets import BaseChannelLayer, InvalidChannelLayerConfig
from fastapi_websockets.exceptions import BackendUnavailable

__all__ = [
    "InjectedFault",
    "ReceiverProcess",
    "TcpProxy",
    "eventually",
    "fail_once",
    "give_up_joins",
    "login_refusals",
    "refused_at_start",
    "refused_while_running",
    "receiver_process",
    "restarted_after_fault",
    "send_burst",
    "send_steadily",
    "silent_server",
]


class InjectedFault(RuntimeError):
    """The error :func:`fail_once` raises: of no class a backend expects from its driver."""


def fail_once(
    monkeypatch: pytest.MonkeyPatch,
    owner: type,
    name: str,
    when: Callable[..., bool] = lambda *args, **kwargs: True,
) -> list[str]:
    """Make the driver method ``owner.name`` raise :class:`InjectedFault` once, then work again.

    The first call for which ``when(*args, **kwargs)`` is true (``args``
    includes ``self``) raises instead of running; every other call runs the
    real method against the real server. Returns a list that gets one entry
    when the fault fires, so a test can check that it did.
    """
    real = getattr(owner, name)
    fired: list[str] = []

    @functools.wraps(real)
    def faulty(*args: Any, **kwargs: Any) -> Any:
        if not fired and when(*args, **kwargs):
            fired.append(f"{owner.__name__}.{name}")
            raise InjectedFault(f"injected fault in {owner.__name__}.{name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)
    return fired


def restarted_after_fault(caplog: pytest.LogCaptureFixture, task: str) -> bool:
    """Whether the layer's supervisor logged ``task`` (its full name) failing with an
    :class:`InjectedFault` and being started again."""
    return any(
        record.name == "fastapi_websockets.tasks"
        and record.getMessage().startswith(f"background task {task} failed;")
        and "restarting it" in record.getMessage()
        and record.exc_info is not None
        and isinstance(record.exc_info[1], InjectedFault)
        for record in caplog.records
    )


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never sends a byte (a broker that hangs)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


class TcpProxy:
    """Forwards a loopback port to ``target_port``; :meth:`cut` drops every connection.

    After a cut the port refuses connections, like a broker host that went away,
    until :meth:`reopen`.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._downstream = asyncio.Event()  # clear: what the server sends waits in the proxy
        self._downstream.set()
        #: One per connection, in order of acceptance: clear, what the server sends on it waits.
        self._gates: list[asyncio.Event] = []
        #: Whether the next connection accepted starts held (see hold_next).
        self._hold_next = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        #: One more at each cut: a connection accepted before a cut is cut too.
        self._cuts = 0
        #: Connections accepted so far.
        self.accepted = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cut()

    async def reopen(self) -> None:
        """Accept connections again, on the same port, after a :meth:`cut` (the host is back)."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )

    def refuse_new(self) -> None:
        """Stop accepting connections but keep those accepted (until :meth:`reopen`)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes the listening socket only

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cuts = self._cuts
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except BaseException:
            # asyncio closes the client's transport after an error, not after a cancellation.
            writer.close()
            raise
        if cuts != self._cuts:
            # Cut while this connection was reaching the target: it was in no
            # _writers to close, and piping it now would leave it open after the cut.
            writer.close()
            up_writer.close()
            return
        self._writers |= {writer, up_writer}
        gate = asyncio.Event()
        if self._hold_next:
            self._hold_next = False
        else:
            gate.set()
        self._gates.append(gate)
        for source, sink, gates in ((reader, up_writer, ()), (up_reader, writer, (self._downstream, gate))):
            task = asyncio.ensure_future(self._pipe(source, sink, gates))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, gates: tuple[asyncio.Event, ...]
    ) -> None:
        try:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    for gate in gates:
                        await gate.wait()
                    sink.write(data)
                    await sink.drain()
        finally:
            sink.close()  # cancelled too (the loop ending): an open transport would leak

    def hold(self) -> None:
        """Keep what the server sends from reaching the clients (it waits, in order) until :meth:`release`."""
        self._downstream.clear()

    def hold_newest(self) -> None:
        """Like :meth:`hold`, for the connection accepted last only (a client's connect stalls)."""
        self._gates[-1].clear()

    def hold_next(self) -> None:
        """Like :meth:`hold_newest`, for the next connection accepted (a connect yet to come stalls)."""
        self._hold_next = True

    def release(self) -> None:
        """Pass on what every hold (:meth:`hold` and the others) kept, and what follows."""
        self._hold_next = False
        self._downstream.set()
        for gate in self._gates:
            gate.set()

    async def cut(self) -> None:
        """Stop accepting and close every connection through the proxy."""
        self._cuts += 1
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        self._writers.clear()
        if server is not None:
            # Last: from Python 3.12 on it also waits for the connections to close.
            await server.wait_closed()


# ------------------------------------------- a receiver in another OS process

#: A child process that builds its layer from the environment, joins "room" with a
#: new channel, prints that channel, then prints every message of it and of "named.q".
_RECEIVER = """
import asyncio, json
from fastapi_websockets import get_channel_layer_from_env

async def main():
    layer = get_channel_layer_from_env()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    print(json.dumps({"channel": channel}), flush=True)

    async def read(name):
        while True:
            message = await layer.receive(name)
            print(json.dumps(message), flush=True)

    await asyncio.gather(read(channel), read("named.q"))

asyncio.run(main())
"""


class ReceiverProcess:
    """The ``_RECEIVER`` child: its channel, and the ``id`` of every message it printed."""

    def __init__(self, channel: str, got: list[str]) -> None:
        self.channel = channel
        self.got = got

    async def wait_for(self, sent: list[str], patience: float) -> None:
        """Wait until every id in ``sent`` arrived, for at most ``patience`` seconds."""
        for _ in range(int(patience / 0.05)):
            if set(self.got) >= set(sent):
                return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def receiver_process(env: dict[str, str], patience: float) -> AsyncIterator[ReceiverProcess]:
    """Run the receiver child with ``env`` (the layer's settings) until the block ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RECEIVER, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    got: list[str] = []

    async def collect() -> None:
        while line := await stdout.readline():
            got.append(json.loads(line)["id"])

    collecting: asyncio.Task[None] | None = None
    try:
        channel = json.loads(await asyncio.wait_for(stdout.readline(), patience))["channel"]
        collecting = asyncio.create_task(collect())
        yield ReceiverProcess(channel, got)
    finally:
        if collecting is not None:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
        proc.kill()
        await proc.wait()


async def send_burst(sender: BaseChannelLayer, channel: str, tag: str, per_kind: int) -> list[str]:
    """``per_kind`` messages at once to ``channel``, to group "room" and to "named.q"; their ids."""
    sends: list[Awaitable[object]] = []
    ids: list[str] = []
    for kind in ("p", "g", "n"):
        for i in range(per_kind):
            key = f"{tag}-{kind}-{i}"
            message = {"type": "m", "id": key}
            if kind == "p":
                sends.append(sender.send(channel, message))
            elif kind == "g":
                sends.append(sender.group_send("room", message))
            else:
                sends.append(sender.send("named.q", message))
            ids.append(key)
    await asyncio.gather(*sends)
    return ids


async def send_steadily(
    sender: BaseChannelLayer,
    group: str,
    count: int,
    sent: list[str],
    *,
    channel: str | None = None,
    interval: float = 0.25,
) -> None:
    """``count`` times, one every ``interval`` s: a message to ``channel`` (if given), then one to ``group``.

    Traffic that spans a fault while the test cuts and restores the broker: each
    message's ``n`` (``"{i}-p2p"``, ``"{i}-group"``) is appended to ``sent`` once
    its send returned, so ``sent`` holds what was accepted, in the order it was.
    """
    for i in range(count):
        if channel is not None:
            await sender.send(channel, {"type": "p2p", "n": f"{i}-p2p"})
            sent.append(f"{i}-p2p")
        await sender.group_send(group, {"type": "group", "n": f"{i}-group"})
        sent.append(f"{i}-group")
        await asyncio.sleep(interval)


async def eventually(
    check: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Re-check ``check`` (sync, or returning an awaitable) every ``interval`` s until its result is truthy.

    A deadline against hangs, not a speed goal: fails naming ``what`` after ``timeout`` seconds
    (measured on the clock, so a slow check such as a ``rabbitmqctl`` call does not stretch it).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(interval)
    pytest.fail(f"never happened: {what}")


async def refused_at_start(layer: BaseChannelLayer) -> InvalidChannelLayerConfig:
    """The error of ``layer``'s first send: a refusal asking again cannot fix. Closes ``layer``."""
    try:
        with pytest.raises(InvalidChannelLayerConfig) as info:
            await layer.send("jobs", {"type": "x"})
    finally:
        await layer.close()
    return info.value


async def refused_while_running(layer: BaseChannelLayer, times: int = 3) -> list[BackendUnavailable]:
    """The errors of ``times`` sends of ``layer`` made while the broker refuses its login on reconnect."""
    errors = []
    for _ in range(times):
        with pytest.raises(BackendUnavailable, match="refuses this layer's login") as info:
            await layer.send("jobs", {"type": "x"})
        errors.append(info.value)
    return errors


def login_refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The records the layer logged at ERROR that say the broker refused a running layer's login."""
    # The layer's own records only: aio-pika logs some whose formatting raises (a callback's
    # repr after it deleted the callback).
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.ERROR
        and record.name.startswith("fastapi_websockets")
        and "refused the login" in record.getMessage()
    ]


async def give_up_joins(
    layer: BaseChannelLayer,
    group: str,
    after: Callable[[str], Awaitable[None]] | None = None,
    rounds: int = 16,
) -> list[str]:
    """Start presence joins and cancel each a few more loop turns later; the channels given up.

    Each round's join is cancelled after 0, 1, 2, ... loop turns: before its write
    goes out, while it is written, or after it was stored but before its caller
    heard. ``after(channel)`` runs after each round (by default: another, completed
    join), so that writes queued behind a take-back are seen too. A caller that saw
    its join cancelled will not leave: none of the channels returned may stay present.
    """
    given_up = []
    for turns in range(rounds):
        channel = await layer.new_channel("ws")
        join = asyncio.create_task(layer.presence_join(group, channel, {}, notify=False))
        for _ in range(turns):
            await asyncio.sleep(0)
        join.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await join
        if join.cancelled():
            given_up.append(channel)
        if after is None:
            await layer.presence_join(group, await layer.new_channel("ws"), {}, notify=False)
        else:
            await after(channel)
    return given_up
