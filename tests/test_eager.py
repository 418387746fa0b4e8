"""start_eagerly(): a coroutine runs in the caller's turn until it waits, then goes on in a task."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from fastapi_websockets._eager import start_eagerly

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="caller")


def connection_context(name: str) -> contextvars.Context:
    context = contextvars.copy_context()
    context.run(WHO.set, name)
    return context


async def test_a_coroutine_that_does_not_wait_finishes_before_the_call_returns() -> None:
    seen: list[str] = []

    async def handler() -> None:
        seen.append(WHO.get())

    assert start_eagerly(handler(), connection_context("conn-1")) is None
    assert seen == ["conn-1"]
    assert WHO.get() == "caller"


async def test_a_coroutine_that_waits_goes_on_in_a_task_from_where_it_stopped() -> None:
    steps: list[object] = []
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        steps.append("before")
        steps.append(await gate)
        await asyncio.sleep(0)  # a bare yield inside the task
        steps.append(WHO.get())

    task = start_eagerly(handler(), connection_context("conn-2"))
    assert task is not None
    assert steps == ["before"]
    gate.set_result("value")
    await task
    assert steps == ["before", "value", "conn-2"]


async def test_an_exception_after_waiting_is_the_task_s_and_before_is_the_caller_s() -> None:
    async def fails_at_once() -> None:
        raise KeyError("now")

    with pytest.raises(KeyError, match="now"):
        start_eagerly(fails_at_once(), connection_context("c"))

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    task = start_eagerly(fails_later(), connection_context("c"))
    assert task is not None
    with pytest.raises(KeyError, match="later"):
        await task


async def test_cancelling_the_task_before_it_ran_cancels_the_coroutine_where_it_waits() -> None:
    outcome: list[str] = []
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        try:
            await never
        except asyncio.CancelledError:
            outcome.append("cancelled where it waited")
            raise

    task = start_eagerly(handler(), connection_context("c"))
    assert task is not None
    task.cancel()  # before the task's first step
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert outcome == ["cancelled where it waited"]


async def test_cancelling_a_waiting_task_cancels_what_it_waits_for() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        await never

    task = start_eagerly(handler(), connection_context("c"))
    assert task is not None
    await asyncio.sleep(0)  # the task now waits on the future itself
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert never.cancelled()


async def test_a_start_inside_an_eager_step_is_a_task_so_relays_do_not_nest() -> None:
    order: list[str] = []
    inner_task: list[asyncio.Task[None] | None] = []

    async def inner() -> None:
        order.append("inner")

    async def outer() -> None:
        inner_task.append(start_eagerly(inner(), connection_context("inner")))
        order.append("outer done")

    assert start_eagerly(outer(), connection_context("outer")) is None
    assert order == ["outer done"]
    task = inner_task[0]
    assert task is not None
    await task
    assert order == ["outer done", "inner"]
    # Outside any step again: eager.
    assert start_eagerly(inner(), connection_context("again")) is None


async def test_a_cancelled_error_raised_at_once_is_dropped_like_an_unawaited_task_s() -> None:
    async def handler() -> None:
        raise asyncio.CancelledError

    assert start_eagerly(handler(), connection_context("c")) is None


async def test_not_eager_is_a_task_from_the_start() -> None:
    ran: list[str] = []

    async def handler() -> None:
        ran.append("ran")

    task = start_eagerly(handler(), connection_context("c"), eager=False)
    assert task is not None
    assert ran == []
    await task
    assert ran == ["ran"]
