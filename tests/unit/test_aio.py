"""Structured-concurrency helpers: guards, background collectors, error unwrapping."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from migrator.aio import background, finish_even_if_cancelled, first_error, guarded, paced
from migrator.errors import QemuExitedError


async def test_guard_failure_cancels_main_and_is_raised_unwrapped() -> None:
    main_cancelled = asyncio.Event()

    async def main() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            main_cancelled.set()
            raise

    async def guard() -> None:
        await asyncio.sleep(0.01)
        raise QemuExitedError("exited unexpectedly", name="dst")

    with pytest.raises(QemuExitedError, match="dst: exited unexpectedly"):
        await guarded(main(), [guard()])
    assert main_cancelled.is_set()


async def test_main_result_returned_and_guards_stopped() -> None:
    guard_stopped = asyncio.Event()

    async def guard() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            guard_stopped.set()

    async def main() -> int:
        return 42

    assert await guarded(main(), [guard()]) == 42
    assert guard_stopped.is_set()


async def test_background_stops_collectors_and_swallows_their_errors() -> None:
    ran = asyncio.Event()

    async def collector() -> None:
        ran.set()
        await asyncio.sleep(10)

    async def broken() -> None:
        raise RuntimeError("sampler broke")

    async with background(collector(), broken()) as tasks:
        await ran.wait()
    assert all(task.done() for task in tasks)


def test_first_error_skips_cancellations() -> None:
    group = BaseExceptionGroup("g", [asyncio.CancelledError(), ValueError("real")])
    assert isinstance(first_error(group), ValueError)
    assert isinstance(first_error(KeyError("k")), KeyError)


async def test_finish_even_if_cancelled_survives_repeated_cancellation() -> None:
    finished: list[str] = []

    async def undo() -> None:
        await asyncio.sleep(0.05)
        finished.append("undone")

    caller = asyncio.create_task(finish_even_if_cancelled(undo()))
    for _ in range(3):  # a task group's cancel, then asyncio.run's own, and more
        await asyncio.sleep(0.005)
        caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["undone"]


async def test_paced_keeps_the_rate_and_never_bursts() -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    times: list[float] = []
    async for _ in paced(50):
        times.append(loop.time() - began)
        if len(times) == 3:
            await asyncio.sleep(0.1)  # a slow sample: five periods late
        if len(times) == 6:
            break
    assert times[0] < 0.01  # the first at once
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # After the slow one, the next comes at once, then one period apart: no catch-up burst.
    assert all(gap >= 0.015 for gap in gaps[3:])
    assert gaps[2] >= 0.1
