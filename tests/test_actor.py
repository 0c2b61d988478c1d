"""winkr.actor.Reply: a one-shot answer with one waiting task."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from winkr.actor import Reply


async def test_wait_gets_the_value_set_later() -> None:
    reply: Reply[int] = Reply()
    got: list[int] = []

    async def asker() -> None:
        got.append(await reply.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        await trio.testing.wait_all_tasks_blocked()
        assert not reply.is_set()
        reply.set(7)
        assert reply.is_set()
    assert got == [7]


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
    got: list[int] = []

    async def second() -> None:
        got.append(await reply.wait())

    async with trio.open_nursery() as nursery:  # the first waiter's place was given up
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        reply.set(5)
    assert got == [5]


async def test_a_second_waiter_at_once_is_refused() -> None:
    reply: Reply[int] = Reply()
    got: list[int] = []

    async def asker() -> None:
        got.append(await reply.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await reply.wait()
        reply.set(1)  # the first waiter is still there and gets it
    assert got == [1]
