"""The shared backend toolkit: backoff, task supervisor, waiter queue, timeouts, redaction, options."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest

from fastapi_websockets.backends.backoff import Backoff
from fastapi_websockets.backends.futures import wait_all
from fastapi_websockets.backends.locks import KeyedLocks, KeyedTurns, SharedRounds
from fastapi_websockets.backends.options import Memo, flag, matching, optional_positive_int, positive, url
from fastapi_websockets.backends.packing import IN_FLIGHT, MAX_FRAMES, Packer, SendMany, describe, pack
from fastapi_websockets.backends.supervisor import TaskSupervisor
from fastapi_websockets.backends.timeouts import LazyBound, reply_within, wait_event, within
from fastapi_websockets.backends.urls import location, redact_text, redact_url
from fastapi_websockets.backends.waiters import WaiterQueue
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelLayerClosed,
    InvalidChannelLayerConfig,
    MessageTooLarge,
)

# ------------------------------------------------------------------ backoff


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(first=0.1, cap=0.5, jitter=0)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1


def test_backoff_jitter_stays_within_its_spread() -> None:
    delays = [Backoff(first=1.0, cap=1.0, jitter=0.2).next() for _ in range(200)]
    assert all(0.8 <= delay <= 1.2 for delay in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(("first", "cap", "jitter"), [(0, 1, 0), (2, 1, 0), (0.1, 1, 1.5)])
def test_backoff_refuses_nonsense(first: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(first=first, cap=cap, jitter=jitter)


async def test_backoff_sleep_is_cut_short_by_its_event() -> None:
    wake = asyncio.Event()
    backoff = Backoff(first=30, cap=30, jitter=0)
    sleeper = asyncio.ensure_future(backoff.sleep(wake))
    await asyncio.sleep(0.01)
    assert not sleeper.done()
    wake.set()
    await asyncio.wait_for(sleeper, 5)


# ----------------------------------------------------------------- timeouts


async def test_wait_event_reports_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True


async def test_wait_event_passes_a_cancellation_on() -> None:
    task = asyncio.ensure_future(wait_event(asyncio.Event(), None))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_within_returns_the_result_or_raises_the_given_error() -> None:
    async def slow() -> int:
        await asyncio.sleep(30)
        return 1

    async def fast() -> int:
        return 2

    assert await within(fast(), 1, lambda: BackendUnavailable("late")) == 2
    with pytest.raises(BackendUnavailable, match="late"):
        await within(slow(), 0.01, lambda: BackendUnavailable("late"))


async def test_within_cancels_the_operation_when_the_caller_is_cancelled() -> None:
    inner_cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            inner_cancelled.set()
            raise

    outer = asyncio.ensure_future(within(slow(), 30, lambda: BackendUnavailable("late")))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.wait_for(inner_cancelled.wait(), 5)


async def test_within_ends_early_with_the_error_stop_holds_once_the_operation_has_unwound() -> None:
    unwound = asyncio.Event()

    async def retrying() -> None:  # a driver retrying a refused login until cancelled
        try:
            await asyncio.sleep(30)
        finally:
            unwound.set()

    stop: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(stop.set_result, InvalidChannelLayerConfig("refused"))
    with pytest.raises(InvalidChannelLayerConfig, match="refused"):
        await within(retrying(), 30, lambda: BackendUnavailable("late"), stop=stop)
    assert unwound.is_set()


async def test_wait_all_starts_the_first_at_once_and_the_others_before_it_waits() -> None:
    started: list[str] = []

    async def step(name: str) -> None:
        started.append(name)
        await asyncio.sleep(0)

    calls = [step("a"), step("b"), step("c")]
    waiting = asyncio.ensure_future(wait_all(calls))
    await asyncio.sleep(0)  # one loop turn: the wait_all task's first step
    assert started == ["a"]  # the first ran in that step; the others were only scheduled
    await waiting
    assert started == ["a", "b", "c"]


async def test_wait_all_waits_for_every_one_then_raises_the_first_failure() -> None:
    finished: list[str] = []

    async def fail(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        finished.append(name)
        raise ValueError(name)

    async def ok() -> None:
        await asyncio.sleep(0.02)
        finished.append("ok")

    with pytest.raises(ValueError, match="first"):
        await wait_all([fail("first", 0.01), ok(), fail("third", 0)])
    assert sorted(finished) == ["first", "ok", "third"]
    with pytest.raises(ValueError, match="second"):
        await wait_all([ok(), fail("second", 0)])


async def test_wait_all_cancelled_cancels_every_one() -> None:
    cancelled: list[int] = []

    async def slow(index: int) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise

    waiting = asyncio.ensure_future(wait_all([slow(0), slow(1), slow(2)]))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert sorted(cancelled) == [0, 1, 2]


async def test_reply_within_returns_the_reply_or_fails_the_slot() -> None:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[int] = loop.create_future()
    loop.call_soon(answered.set_result, 7)
    assert await reply_within(answered, 5, lambda: BackendUnavailable("late")) == 7

    silent: asyncio.Future[int] = loop.create_future()
    with pytest.raises(BackendUnavailable, match="late"):
        await reply_within(silent, 0.01, lambda: BackendUnavailable("late"))
    # Whoever would have answered finds the slot done and leaves it alone.
    assert silent.done()
    assert not silent.cancelled()


async def test_reply_within_passes_a_cancellation_of_the_caller_on() -> None:
    slot: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(reply_within(slot, 5, lambda: BackendUnavailable("late")))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert slot.cancelled()


async def test_lazy_bound_limits_each_await_and_keeps_no_timer_when_idle() -> None:
    loop = asyncio.get_running_loop()
    bound = LazyBound(0.05, lambda: BackendUnavailable("late"))
    # Awaits shorter than the limit each, longer than it together: none times out.
    for _ in range(4):
        assert await bound.run(asyncio.sleep(0.02, result=3)) == 3
    with pytest.raises(BackendUnavailable, match="late"):
        await bound.run(loop.create_future())
    # The task is not left cancelled: what it awaits next runs to its end.
    assert await bound.run(asyncio.sleep(0, result=4)) == 4
    await asyncio.sleep(0.1)  # the timer fired with nothing running: not armed again
    assert bound._timer is None
    bound.cancel()


async def test_lazy_bound_passes_a_cancellation_from_elsewhere_on() -> None:
    bound = LazyBound(5, lambda: BackendUnavailable("late"))
    slot: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    running = asyncio.ensure_future(bound.run(slot))
    await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    bound.cancel()


# --------------------------------------------------------------- supervisor


async def test_supervisor_logs_a_task_that_dies(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")

    async def boom() -> None:
        raise RuntimeError("kaput")

    task = tasks.spawn(boom(), "reader")
    assert task.get_name() == "fastapi_websockets.test.reader"
    with caplog.at_level(logging.ERROR, "fastapi_websockets.tasks"):
        await asyncio.wait([task])
        await asyncio.sleep(0)
    assert tasks.failures == 1
    record = next(r for r in caplog.records if "fastapi_websockets.test.reader failed" in r.getMessage())
    assert record.exc_info is not None
    assert "kaput" in str(record.exc_info[1])
    await tasks.close()


async def test_supervisor_leaves_an_awaited_tasks_error_to_its_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")

    async def boom() -> None:
        raise RuntimeError("kaput")

    with caplog.at_level(logging.DEBUG, "fastapi_websockets.tasks"):
        with pytest.raises(RuntimeError, match="kaput"):
            await asyncio.shield(tasks.spawn(boom(), "declare", awaited=True))
        await asyncio.sleep(0)
    assert tasks.failures == 0
    assert len(tasks) == 0
    assert [r.levelno for r in caplog.records if "declare" in r.getMessage()] == [logging.DEBUG]
    await tasks.close()


async def test_supervisor_restarts_a_kept_task_then_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")
    runs = 0
    given_up: list[BaseException] = []

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        raise ConnectionResetError(f"run {runs}")

    with caplog.at_level(logging.ERROR, "fastapi_websockets.tasks"):
        task = tasks.keep_running(
            flaky,
            "listener",
            max_failures=3,
            on_give_up=given_up.append,
            backoff=Backoff(first=0.001, cap=0.001, jitter=0),
        )
        await asyncio.wait_for(task, 5)
    assert runs == 3
    assert tasks.restarts == 2
    assert [str(exc) for exc in given_up] == ["run 3"]
    assert any("giving up" in r.getMessage() for r in caplog.records)
    await tasks.close()


async def test_supervisor_keeps_a_task_running_until_it_returns() -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")
    runs = 0

    async def once_flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise OSError("first run fails")

    task = tasks.keep_running(once_flaky, "reader", backoff=Backoff(first=0.001, cap=0.001, jitter=0))
    await asyncio.wait_for(task, 5)
    assert runs == 2
    await tasks.close()


async def test_supervisor_close_cancels_and_awaits_everything() -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")
    stopped: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            stopped.append(name)

    for name in ("a", "b"):
        tasks.spawn(forever(name), name)
    await asyncio.sleep(0)
    await tasks.close(timeout=5)
    assert sorted(stopped) == ["a", "b"]
    assert len(tasks) == 0

    async def late() -> None:
        pass

    with pytest.raises(ChannelLayerClosed):
        tasks.spawn(late(), "late")


# ------------------------------------------------------------------ packing


def packer_for(tasks: TaskSupervisor, send_many: SendMany, max_bytes: int = 100_000) -> Packer:
    """A Packer publishing through ``send_many`` (and a lone send that always succeeds)."""

    async def send_one(destination: str, channel: str, data: bytes) -> None:
        pass

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        tasks.spawn(coro, "packed send", awaited=True)

    return Packer(
        send_one=send_one,
        send_many=send_many,
        spawn=spawn,
        in_flight=IN_FLIGHT,
        max_frames=MAX_FRAMES,
        max_bytes=max_bytes,
        timeout=10.0,
        on_timeout=lambda channel: BackendUnavailable(f"timed out ({channel!r})"),
    )


async def test_a_pack_refused_after_its_bound_was_lowered_is_taken_again_under_the_new_one() -> None:
    # A broker that now takes packs of 2,500 bytes at most (another server, after a
    # reconnect): the layer lowers the bound as it refuses a pack sized for the old one.
    tasks = TaskSupervisor("fastapi_websockets.test")
    stored: list[list[str]] = []

    async def send_many(destination: str, frames: list[tuple[str, bytes]]) -> None:
        if len(pack(frames)) > 2_500:
            packer.max_bytes = 2_500
            raise MessageTooLarge(len(pack(frames)), 2_500)
        stored.append([channel for channel, _ in frames])

    packer = packer_for(tasks, send_many)
    channels = [f"c{i}" for i in range(4)]
    await asyncio.gather(*(packer.send("p", channel, b"x" * 1_000) for channel in channels))
    assert stored == [channels[:2], channels[2:]]
    await tasks.close()


async def test_each_caller_of_a_failed_pack_is_told_about_its_own_send() -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")
    failures: list[Exception] = []

    async def send_many(destination: str, frames: list[tuple[str, bytes]]) -> None:
        failures.append(BackendUnavailable(f"the broker is away ({describe(frames)} failed)"))
        raise failures[-1]

    packer = packer_for(tasks, send_many)
    channels = [f"c{i}" for i in range(3)]
    results = await asyncio.gather(
        *(packer.send("p", channel, b"x") for channel in channels), return_exceptions=True
    )
    assert len(failures) == 1  # one publish carried them all
    for channel, result in zip(channels, results, strict=True):
        assert isinstance(result, BackendUnavailable)
        assert str(result) == (
            f"send to {channel!r} (packed with 2 others) failed: "
            "the broker is away (packed publish of 3 sends failed)"
        )
        assert result.__cause__ is failures[0]

    closed = ChannelLayerClosed("the channel layer was closed")

    async def send_closed(destination: str, frames: list[tuple[str, bytes]]) -> None:
        raise closed

    packer = packer_for(tasks, send_closed)
    results = await asyncio.gather(
        *(packer.send("p", channel, b"x") for channel in channels), return_exceptions=True
    )
    assert all(result is closed for result in results)  # about no send in particular: as it is
    await tasks.close()


# ------------------------------------------------------------- waiter queue


#: How five users of one key end when the third fails and the fourth is cancelled waiting.
OUTCOMES = ["NoneType", "NoneType", "ValueError", "CancelledError", "NoneType"]


def outcomes(results: Sequence[object]) -> list[str]:
    """The type names of ``asyncio.gather(..., return_exceptions=True)``'s results."""
    return [type(result).__name__ for result in results]


async def test_keyed_locks_take_turns_in_call_order_and_forget_keys_nobody_uses() -> None:
    locks = KeyedLocks()
    order: list[int] = []
    gate = asyncio.Event()

    async def user(i: int) -> None:
        async with locks.hold("k"):
            order.append(i)
            if i == 0:
                await gate.wait()
            if i == 2:
                raise ValueError("inside")

    users = [asyncio.ensure_future(user(i)) for i in range(5)]
    async with locks.hold("other"):  # another key is not held up
        await asyncio.sleep(0.01)
    users[3].cancel()  # waiting: it leaves the queue, the others keep their turns
    gate.set()
    results = await asyncio.gather(*users, return_exceptions=True)
    assert order == [0, 1, 2, 4]
    assert outcomes(results) == OUTCOMES
    assert locks._held == {}


async def test_keyed_turns_keep_call_order_whatever_order_preparations_end_in() -> None:
    turns = KeyedTurns()
    started: list[str] = []
    prepared = [asyncio.Event() for _ in range(5)]

    async def record(name: str) -> None:
        started.append(name)

    async def call(i: int) -> None:
        turn = turns.take("k")
        try:
            await prepared[i].wait()
            if i == 2:
                raise ValueError("preparing failed")
            await turn.place(lambda: [record(f"{i}a"), record(f"{i}b")])
        finally:
            turn.end()

    calls = [asyncio.ensure_future(call(i)) for i in range(5)]
    await asyncio.sleep(0)
    other = turns.take("other")  # another key is not held up
    await other.place(lambda: [record("other")])
    for i in (4, 3, 2, 1):
        prepared[i].set()
        await asyncio.sleep(0.01)
    assert started == ["other"]  # every later call waits for the first, still preparing
    calls[3].cancel()  # waiting for its turn: the one after it still waits for those before
    await asyncio.sleep(0.01)
    assert started == ["other"]
    prepared[0].set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert started == ["other", "0a", "0b", "1a", "1b", "4a", "4b"]
    assert outcomes(results) == OUTCOMES
    assert turns._turns == {}


async def test_a_turn_lets_the_next_write_from_its_own_task_once_the_tasks_it_queued_started() -> None:
    # The first turn writes its first step at once and queues the other; the next call,
    # resuming in between, must not write ahead of it (let go at once, it did).
    turns = KeyedTurns()
    started: list[str] = []

    async def record(name: str) -> None:
        started.append(name)

    async def call(name: str) -> None:
        turn = turns.take("k")
        await asyncio.sleep(0)
        await turn.place(lambda: [record(f"{name}1"), record(f"{name}2")])

    await asyncio.gather(call("a"), call("b"))
    assert started == ["a1", "a2", "b1", "b2"]
    assert turns._turns == {}


async def test_a_turn_joins_the_writes_made_at_once_only_behind_turns_that_joined_the_same() -> None:
    turns = KeyedTurns()
    known = ("p1", "p2")
    first = turns.take("k")
    assert first.joins(known)  # nothing before it
    second = turns.take("k")
    assert second.joins(known)  # the one before wrote to the same
    third = turns.take("k")
    assert not third.joins(("p1", "p2", "p3"))
    assert not turns.take("k").joins(known)  # the one before did not join
    for turn in list(turns._turns.values()):
        turn.end()
    for turn in (first, second, third):
        turn.end()
    assert turns._turns == {}
    later = turns.take("k")
    assert later.joins(("p3",))
    later.end()


async def test_shared_rounds_serve_callers_that_arrive_meanwhile_in_the_next_round() -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")
    rounds: SharedRounds[int, list[int]] = SharedRounds(tasks.spawn, "read")
    calls: list[list[int]] = []
    gate = asyncio.Event()

    async def call(args: list[int]) -> list[int]:
        calls.append(list(args))
        await gate.wait()
        return sorted(args)

    first = [asyncio.ensure_future(rounds.run("k", i, call)) for i in range(3)]
    await asyncio.sleep(0.01)  # the first round is running, waiting for the gate
    second = [asyncio.ensure_future(rounds.run("k", i, call)) for i in range(3, 5)]
    other = asyncio.ensure_future(rounds.run("other", 9, call))
    await asyncio.sleep(0.01)
    assert calls == [[0, 1, 2], [9]]  # the second round waits for the first
    gate.set()
    assert await asyncio.gather(*first) == [[0, 1, 2]] * 3
    assert await asyncio.gather(*second) == [[3, 4]] * 2
    assert await other == [9]
    assert calls == [[0, 1, 2], [9], [3, 4]]
    await tasks.close()


async def test_shared_rounds_give_every_caller_the_error_and_end_waits_on_close() -> None:
    tasks = TaskSupervisor("fastapi_websockets.test")
    rounds: SharedRounds[int, int] = SharedRounds(tasks.spawn, "read")

    async def fail(args: list[int]) -> int:
        raise BackendUnavailable("down")

    results = await asyncio.gather(*(rounds.run("k", i, fail) for i in range(3)), return_exceptions=True)
    assert [type(result) for result in results] == [BackendUnavailable] * 3

    async def never(args: list[int]) -> int:
        await asyncio.Event().wait()
        return 0

    running = [asyncio.ensure_future(rounds.run("k", i, never)) for i in range(2)]
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(rounds.run("k", 2, never))
    unstarted = asyncio.ensure_future(rounds.run("j", 0, never))
    await asyncio.sleep(0)  # the round of "j" has a task that has not run yet
    await tasks.close()
    results = await asyncio.wait_for(asyncio.gather(*running, waiting, unstarted, return_exceptions=True), 5)
    assert [type(result) for result in results] == [ChannelLayerClosed] * 4


async def test_waiter_queue_hands_items_over_in_arrival_order() -> None:
    returned: list[str] = []
    queue: WaiterQueue[str] = WaiterQueue(returned.append)
    first = asyncio.ensure_future(queue.wait())
    second = asyncio.ensure_future(queue.wait())
    await asyncio.sleep(0)
    assert queue.pending() == 2
    assert queue.demand.is_set()
    assert queue.hand_over("one")
    queue.deliver("two")
    queue.deliver("three")
    assert await first == "one"
    assert await second == "two"
    assert returned == ["three"]
    assert not queue.hand_over("four")


async def test_waiter_queue_gives_back_an_item_whose_receiver_was_cancelled() -> None:
    returned: list[str] = []
    queue: WaiterQueue[str] = WaiterQueue(returned.append)
    receiver = asyncio.ensure_future(queue.wait())
    await asyncio.sleep(0)
    assert queue.hand_over("claimed")
    receiver.cancel()  # cancelled after the item was handed to it, before it ran
    with pytest.raises(asyncio.CancelledError):
        await receiver
    assert returned == ["claimed"]
    assert queue.pending() == 0


async def test_waiter_queue_cancelled_before_an_item_leaves_nothing_behind() -> None:
    returned: list[str] = []
    queue: WaiterQueue[str] = WaiterQueue(returned.append)
    receiver = asyncio.ensure_future(queue.wait())
    await asyncio.sleep(0)
    queue.demand.clear()
    receiver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiver
    assert queue.pending() == 0
    assert queue.demand.is_set()  # the reader learns that demand went down
    assert not queue.hand_over("x")
    assert returned == []


async def test_waiter_queue_fail_all_wakes_everyone() -> None:
    queue: WaiterQueue[str] = WaiterQueue(lambda item: None)
    receivers = [asyncio.ensure_future(queue.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    queue.fail_all(BackendUnavailable("reader stopped"))
    for receiver in receivers:
        with pytest.raises(BackendUnavailable, match="reader stopped"):
            await receiver


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("raw", "redacted"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://user:s3cret@host/vhost", "amqp://user:***@host/vhost"),
        ("nats://s3cret@host:4222", "nats://***@host:4222"),
        ("postgresql://u:p%40ss@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require"),
        ("postgresql://h/db?user=u&password=s3cret", "postgresql://h/db?user=u&password=%2A%2A%2A"),
        ("redis://:s3cret@host:notaport/0", "redis://:***@host:notaport/0"),
        ("redis://localhost:6379", "redis://localhost:6379"),
    ],
)
def test_redact_url(raw: str, redacted: str) -> None:
    assert redact_url(raw) == redacted
    assert "s3cret" not in redact_url(raw)


def test_location_never_has_credentials() -> None:
    assert location("redis://:s3cret@cache.example:6380/0") == "cache.example:6380"
    assert location("amqp://u:s3cret@mq.example/", 5672) == "mq.example:5672"
    assert location("unix:///run/redis.sock") == "/run/redis.sock"
    assert "s3cret" not in location("redis://:s3cret@host:bad/0")
    assert redact_text("auth failed for s3cret", ["s3cret", ""]) == "auth failed for ***"


# ------------------------------------------------------------------ options


def test_option_validators_name_the_option_and_the_value() -> None:
    assert positive("timeout", 2, "seconds") == 2.0
    with pytest.raises(
        InvalidChannelLayerConfig,
        match=r"timeout must be a positive number of seconds up to 315,360,000 \(ten years\), got 0",
    ):
        positive("timeout", 0, "seconds")
    with pytest.raises(InvalidChannelLayerConfig, match="got True"):
        positive("timeout", True)
    assert optional_positive_int("max_length", None) is None
    with pytest.raises(InvalidChannelLayerConfig, match="or None"):
        optional_positive_int("max_length", -1)
    assert flag("cluster", False) is False
    with pytest.raises(InvalidChannelLayerConfig, match="true or false"):
        flag("cluster", "yes")
    with pytest.raises(InvalidChannelLayerConfig, match="letters only"):
        matching("prefix", "a b", re.compile(r"[a-z]+"), "letters only")


def test_url_validator_never_quotes_the_password() -> None:
    assert url("url", "redis://h:1/0", ("redis",)).port == 1
    for bad in ("http://u:s3cret@h/", "redis://u:s3cret@h:port/0"):
        with pytest.raises(InvalidChannelLayerConfig) as caught:
            url("url", bad, ("redis", "rediss"))
        assert "s3cret" not in str(caught.value)
        assert "url" in str(caught.value)


def test_memo_computes_once_and_stays_bounded() -> None:
    calls: list[int] = []

    def square(n: int) -> int:
        calls.append(n)
        return n * n

    memo: Memo[int, int] = Memo(square, size=3)
    assert [memo(2), memo(2), memo(3)] == [4, 4, 9]
    assert calls == [2, 3]
    for n in range(10):
        memo(n)
    assert len(memo) <= 3


def test_memo_get_and_values_never_compute() -> None:
    memo: Memo[str, int] = Memo(len, size=10)
    assert memo.get("abc") is None
    memo.add("abc", 7)
    assert memo("xy") == 2
    assert memo.get("abc") == 7
    assert sorted(memo.values()) == [2, 7]


def test_memo_without_compute_is_filled_by_its_caller() -> None:
    memo: Memo[str, int] = Memo(size=2)
    with pytest.raises(KeyError):
        memo("a")
    memo.add("a", 1)
    assert memo("a") == 1
    memo.add("b", 2)
    memo.add("c", 3)
    assert len(memo) <= 2
