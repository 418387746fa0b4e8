"""running_loop(): the running loop without a getpid() per lookup, right across loops, threads and forks."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.inmemory import InMemoryChannelLayer

before_3_12 = pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ needs no getpid() per lookup")


async def current() -> asyncio.AbstractEventLoop:
    return running_loop()


def test_each_loop_run_in_turn_is_the_one_returned() -> None:
    # A layer kept across test clients is used from a new loop each time (the old one stopped).
    for _ in range(3):
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(current()) is loop
        finally:
            loop.close()


def test_without_a_running_loop_it_raises_as_asyncio_does() -> None:
    asyncio.run(current())  # one remembered, then stopped
    with pytest.raises(RuntimeError):
        running_loop()


async def test_a_loop_in_another_thread_is_that_thread_s() -> None:
    mine = running_loop()
    seen: list[asyncio.AbstractEventLoop] = []
    other = asyncio.new_event_loop()

    def run() -> None:
        seen.append(other.run_until_complete(current()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    other.close()
    assert seen == [other]
    assert running_loop() is mine is asyncio.get_running_loop()


def test_a_loop_restarted_in_another_thread_is_not_returned_to_the_first() -> None:
    # This thread found `first` running, then `first` stopped and another thread runs it
    # while this one runs `second`: `first` is running, but not here.
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    assert first.run_until_complete(current()) is first
    started, release = threading.Event(), asyncio.Event()

    async def hold() -> None:
        started.set()
        await release.wait()

    thread = threading.Thread(target=first.run_until_complete, args=(hold(),))
    thread.start()
    try:
        assert started.wait(10)
        assert second.run_until_complete(current()) is second
    finally:
        first.call_soon_threadsafe(release.set)
        thread.join()
        first.close()
        second.close()


@before_3_12  # where the remembered loop could outlive a fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_finds_its_own_loop() -> None:
    async def fork() -> tuple[int, int]:
        parent = running_loop()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            ok = False
            try:
                loop = asyncio.new_event_loop()
                ok = loop.run_until_complete(current()) is loop is not parent
            finally:
                os.write(write, b"1" if ok else b"0")
                os._exit(0)
        os.close(write)
        return pid, read

    pid, read = asyncio.run(fork())
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


@before_3_12
async def test_a_waiting_receive_does_not_ask_asyncio_for_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio.get_running_loop() makes a getpid() system call before 3.12: one per waiting
    # receiver of every fan-out round.
    layer = InMemoryChannelLayer()
    channel = await layer.new_channel()
    running_loop()  # remembered before counting
    asked = 0
    ask = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        nonlocal asked
        asked += 1
        return ask()

    monkeypatch.setattr(asyncio, "get_running_loop", counting)
    receiving = asyncio.ensure_future(layer.receive(channel, timeout=5))
    await asyncio.sleep(0)
    await layer.send(channel, {"type": "hello"})
    assert (await receiving)["type"] == "hello"
    await layer.close()
    assert asked == 0
