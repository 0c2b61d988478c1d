"""winkr.actor.Reply: a one-shot answer with one waiting task."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from winkr.actor import Mailbox, Reply


async def _what_a_waiting_task_gets(reply: Reply[int], meanwhile: Callable[[], Awaitable[None]]) -> list[int]:
    """Park a task in ``reply.wait()``, run ``meanwhile`` while it waits: what the task got."""
    got: list[int] = []

    async def asker() -> None:
        got.append(await reply.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        await trio.testing.wait_all_tasks_blocked()
        await meanwhile()
    return got


async def test_wait_gets_the_value_set_later() -> None:
    reply: Reply[int] = Reply()

    async def answer() -> None:
        assert not reply.is_set()
        reply.set(7)
        assert reply.is_set()

    assert await _what_a_waiting_task_gets(reply, answer) == [7]


async def test_wait_raises_the_failure() -> None:
    reply: Reply[int] = Reply()
    failure = ValueError("no")

    async def asker() -> None:
        with pytest.raises(ValueError) as caught:
            await reply.wait()
        assert caught.value is failure

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        await trio.testing.wait_all_tasks_blocked()
        reply.fail(failure)
    assert reply.is_set()


async def test_an_answer_already_there_is_still_a_checkpoint() -> None:
    reply: Reply[str] = Reply()
    reply.set("x")
    with trio.testing.assert_checkpoints():
        assert await reply.wait() == "x"
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await reply.wait()
    reply.fail(KeyError("k"))  # set again: the last answer counts, as before
    with pytest.raises(KeyError):
        await reply.wait()


async def test_cancelling_the_wait_does_not_answer_the_reply() -> None:
    reply: Reply[int] = Reply()
    with trio.move_on_after(1) as scope:  # (autojump: no real second passes)
        await reply.wait()
    assert scope.cancelled_caught
    assert not reply.is_set()
    reply.set(3)  # the owner completes it later: nobody is woken, nothing fails
    assert await reply.wait() == 3


async def test_cancelled_while_parked_then_a_new_wait_gets_the_answer() -> None:
    reply: Reply[int] = Reply()
    cancelled = []

    async def asker(scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            await reply.wait()
        cancelled.append(scope.cancelled_caught)

    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker, scopes)
        await trio.testing.wait_all_tasks_blocked()
        scopes[0].cancel()
    assert cancelled == [True]

    async def answer() -> None:
        reply.set(5)

    assert await _what_a_waiting_task_gets(reply, answer) == [5]  # the first waiter's place was given up


async def test_a_second_waiter_at_once_is_refused() -> None:
    reply: Reply[int] = Reply()

    async def second_waiter_then_answer() -> None:
        with pytest.raises(trio.BusyResourceError):
            await reply.wait()
        reply.set(1)  # the first waiter is still there and gets it

    assert await _what_a_waiting_task_gets(reply, second_waiter_then_answer) == [1]


# --- Mailbox: a room's inbox -------------------------------------------------------------------


async def test_a_mailbox_hands_items_over_in_order_and_drains_what_waits() -> None:
    box: Mailbox[int] = Mailbox(8)
    got: list[int] = []

    async def receiver() -> None:
        first = await box.receive()  # waits: the inbox is empty
        got.extend(box.drain(first, 3))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(5):
            box.send_nowait(n)
    assert got == [0, 1, 2]  # up to the limit
    assert len(box) == 2
    assert box.drain(-1, 10) == [-1, 3, 4]
    assert box.drain(-2, 10) == [-2]


async def test_a_full_mailbox_refuses_send_nowait_and_send_waits_for_room() -> None:
    box: Mailbox[str] = Mailbox(2)
    box.send_nowait("a")
    box.send_nowait("b")
    with pytest.raises(trio.WouldBlock):
        box.send_nowait("c")
    sent: list[str] = []

    async def sender(item: str) -> None:
        await box.send(item)
        sent.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, "c")
        await trio.testing.wait_all_tasks_blocked()
        assert sent == []  # waiting for room
        assert await box.receive() == "a"
        await trio.testing.wait_all_tasks_blocked()
        assert sent == ["c"]
    assert box.drain(await box.receive(), 10) == ["b", "c"]


async def test_a_cancelled_send_queues_nothing_and_a_cancelled_receive_takes_nothing() -> None:
    box: Mailbox[int] = Mailbox(1)
    box.send_nowait(1)
    with trio.move_on_after(1) as scope:
        await box.send(2)
    assert scope.cancelled_caught
    assert box.drain(await box.receive(), 10) == [1]
    with trio.move_on_after(1) as scope:
        await box.receive()
    assert scope.cancelled_caught
    box.send_nowait(3)
    assert await box.receive() == 3


async def test_a_mailbox_receive_is_a_checkpoint_also_when_items_wait() -> None:
    box: Mailbox[int] = Mailbox(4)
    box.send_nowait(1)
    with trio.testing.assert_checkpoints():
        assert await box.receive() == 1
    box.send_nowait(2)
    with trio.CancelScope() as scope:
        scope.cancel()
        await box.receive()
    assert scope.cancelled_caught
    assert box.receive_nowait() == 2  # the cancelled receive took nothing
    with pytest.raises(trio.WouldBlock):
        box.receive_nowait()


async def _what_a_waiting_sender_gets(box: Mailbox[int], end: Callable[[], Awaitable[None]]) -> list[str]:
    """Fill ``box`` (one item), let a sender wait for room, run ``end``: what the sender got."""
    box.send_nowait(1)
    outcomes: list[str] = []

    async def blocked_sender() -> None:
        try:
            await box.send(2)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            outcomes.append(type(exc).__name__)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        await end()
    return outcomes


async def test_closing_a_mailbox_ends_its_receiver_after_what_was_queued_and_refuses_senders() -> None:
    box: Mailbox[int] = Mailbox(1)

    async def close() -> None:
        box.close()

    outcomes = await _what_a_waiting_sender_gets(box, close)
    assert outcomes == ["ClosedResourceError"]
    with pytest.raises(trio.ClosedResourceError):
        box.send_nowait(3)
    assert await box.receive() == 1
    with pytest.raises(trio.EndOfChannel):
        await box.receive()

    waiting: Mailbox[int] = Mailbox(1)

    async def receiver() -> None:
        with pytest.raises(trio.EndOfChannel):
            await waiting.receive()
        outcomes.append("ended")

    async with trio.open_nursery() as nursery:  # a receiver already waiting is woken
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        waiting.close()
    assert outcomes == ["ClosedResourceError", "ended"]


async def test_a_mailbox_whose_receiver_is_gone_breaks_its_senders() -> None:
    box: Mailbox[int] = Mailbox(1)

    async def receiver_ends() -> None:
        async with box:
            pass

    assert await _what_a_waiting_sender_gets(box, receiver_ends) == ["BrokenResourceError"]
    assert len(box) == 0  # what was queued is dropped
    with pytest.raises(trio.BrokenResourceError):
        box.send_nowait(3)
    with pytest.raises(trio.ClosedResourceError):
        box.receive_nowait()


async def test_a_mailbox_has_one_receiver_at_a_time() -> None:
    box: Mailbox[int] = Mailbox(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await box.receive()
        box.send_nowait(1)


async def test_senders_waiting_for_room_are_served_first_come_first_served() -> None:
    box: Mailbox[str] = Mailbox(1)
    box.send_nowait("a")
    async with trio.open_nursery() as nursery:
        for item in ("b", "c"):
            nursery.start_soon(box.send, item)
            await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            box.send_nowait("late")  # no overtaking the waiting senders, room or not
        got = [await box.receive()]
        with pytest.raises(trio.WouldBlock):
            box.send_nowait("late")  # "b" is woken, not yet in: still in line
        for _ in range(2):
            await trio.testing.wait_all_tasks_blocked()
            got.append(await box.receive())
    box.send_nowait("late")  # nobody waits: at once
    assert got + box.drain(await box.receive(), 10) == ["a", "b", "c", "late"]
