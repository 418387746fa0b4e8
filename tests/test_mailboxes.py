"""The mailboxes' own paths: a put into a mailbox that already holds messages."""

from __future__ import annotations

import asyncio
import time

import pytest

from fastapi_websockets.mailboxes import Mailboxes


def test_a_full_mailbox_refuses_until_its_messages_expire_then_takes_the_next() -> None:
    mailboxes = Mailboxes(lambda channel: 2, expiry=0.2)
    # No amortised sweep: the put's own check at a full mailbox is what must make room.
    mailboxes._next_sweep = float("inf")
    assert mailboxes.put("c", {"n": 1})
    assert mailboxes.put("c", {"n": 2})
    assert not mailboxes.put("c", {"n": 3})
    time.sleep(0.25)
    assert mailboxes.put("c", {"n": 4})
    assert mailboxes.stats.dropped_expired == 2
    assert mailboxes.pop_nowait("c") == {"n": 4}
    assert mailboxes.pop_nowait("c") is None
    assert len(mailboxes) == 0


async def test_queued_messages_come_out_in_order_and_leave_no_mailbox() -> None:
    mailboxes = Mailboxes(lambda channel: 10, expiry=60)
    for n in range(5):
        assert mailboxes.put("c", {"n": n})
    assert [(await mailboxes.get("c"))["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert len(mailboxes) == 0
    waiting = asyncio.ensure_future(mailboxes.get("c"))
    await asyncio.sleep(0)
    assert mailboxes.put("c", {"n": 5})
    assert await waiting == {"n": 5}
    assert len(mailboxes) == 0


async def test_a_listener_left_beside_a_waiting_receiver_gets_the_message_after_it() -> None:
    mailboxes = Mailboxes(lambda channel: 10, expiry=60)
    waiting = asyncio.ensure_future(mailboxes.get("c"))
    await asyncio.sleep(0)
    heard: list[object] = []
    assert mailboxes.listen("c", heard.append) is None
    assert mailboxes.put("c", {"n": 1})  # the waiting receiver first
    assert mailboxes.put("c", {"n": 2})  # then the listener, not the queue
    assert await waiting == {"n": 1}
    assert heard == [{"n": 2}]
    assert mailboxes.pending("c") == 0


@pytest.mark.parametrize("timeout", [None, 0.05])
async def test_a_receiver_cancelled_after_the_hand_off_gives_the_message_back(timeout: float | None) -> None:
    mailboxes = Mailboxes(lambda channel: 10, expiry=60)
    waiting = asyncio.ensure_future(mailboxes.get("c", timeout))
    await asyncio.sleep(0)
    assert mailboxes.put("c", {"n": 1})
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert mailboxes.pop_nowait("c") == {"n": 1}
    assert len(mailboxes) == 0
