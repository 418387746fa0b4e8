"""start_task(): on Python 3.12+ a task's first step runs before the call returns, never nested."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from fastapi_websockets._eager import EAGER_TASKS, start_task

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="caller")

eager_only = pytest.mark.skipif(not EAGER_TASKS, reason="eager tasks need Python 3.12+")


def connection_context(name: str) -> contextvars.Context:
    context = contextvars.copy_context()
    context.run(WHO.set, name)
    return context


async def test_the_task_runs_in_the_connection_s_context_and_is_its_own_current_task() -> None:
    seen: list[object] = []

    async def handler() -> None:
        seen.append(WHO.get())
        seen.append(asyncio.current_task())

    task = start_task(handler(), connection_context("conn-1"))
    await task
    assert seen == ["conn-1", task]
    assert WHO.get() == "caller"


async def test_not_eager_is_only_scheduled() -> None:
    ran: list[str] = []

    async def handler() -> None:
        ran.append("ran")

    task = start_task(handler(), connection_context("c"), eager=False)
    assert ran == []
    await task
    assert ran == ["ran"]


@pytest.mark.skipif(EAGER_TASKS, reason="Python 3.12+ starts eagerly")
async def test_before_python_3_12_the_task_is_only_scheduled() -> None:
    ran: list[str] = []

    async def handler() -> None:
        ran.append("ran")

    task = start_task(handler(), connection_context("c"))
    assert ran == []
    await task
    assert ran == ["ran"]


@eager_only
async def test_a_handler_that_does_not_wait_is_done_when_the_call_returns() -> None:
    ran: list[str] = []

    async def handler() -> None:
        ran.append(WHO.get())

    task = start_task(handler(), connection_context("conn-2"))
    assert task.done()
    assert ran == ["conn-2"]


@eager_only
async def test_a_handler_that_waits_goes_on_in_its_task() -> None:
    steps: list[str] = []
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        steps.append("before")
        steps.append(await gate)

    task = start_task(handler(), connection_context("c"))
    assert steps == ["before"]
    gate.set_result("after")
    await task
    assert steps == ["before", "after"]


@eager_only
async def test_a_start_inside_an_eager_step_is_scheduled_so_relays_do_not_nest() -> None:
    order: list[str] = []
    inner_tasks: list[asyncio.Task[None]] = []

    async def inner() -> None:
        order.append("inner")

    async def outer() -> None:
        inner_tasks.append(start_task(inner(), connection_context("inner")))
        order.append("outer done")

    assert start_task(outer(), connection_context("outer")).done()
    assert order == ["outer done"]
    await inner_tasks[0]
    assert order == ["outer done", "inner"]
    assert start_task(inner(), connection_context("again")).done()
