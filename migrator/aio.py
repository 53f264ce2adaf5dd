"""Small structured-concurrency helpers shared by the runner and the driver."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

__all__ = ["background", "finish_even_if_cancelled", "first_error", "guarded", "paced"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def first_error(error: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group; the error itself otherwise.

    Cancellation leaves are skipped when a real error sits beside them.
    """
    while isinstance(error, BaseExceptionGroup):
        leaves = [e for e in error.exceptions if not isinstance(e, asyncio.CancelledError)]
        error = (leaves or list(error.exceptions))[0]
    return error


async def guarded(main: Awaitable[T], guards: Iterable[Coroutine[Any, Any, Any]]) -> T:
    """Run ``main`` while ``guards`` watch (e.g. "raise if QEMU dies").

    The first guard to raise cancels ``main`` and its error propagates (unwrapped
    from the task group); when ``main`` returns, the guards are cancelled.
    """
    guard_tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.TaskGroup() as group:
            guard_tasks = [group.create_task(guard) for guard in guards]

            async def run_main() -> T:
                try:
                    return await main
                finally:
                    for task in guard_tasks:
                        task.cancel()

            main_task = group.create_task(run_main())
    except BaseExceptionGroup as group_error:
        raise first_error(group_error) from None
    return main_task.result()


@contextlib.asynccontextmanager
async def background(
    *coroutines: Coroutine[Any, Any, Any],
) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Run collectors beside the body; on exit cancel them and wait until they have stopped.

    A collector that failed is logged, not raised: collectors observe, and losing
    one must not turn a finished migration into an error (its artifact shows the gap).
    """
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("collector failed: %s", result)


async def finish_even_if_cancelled(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even when the caller is cancelled meanwhile (then re-raised).

    For what must not be left half done: undoing a fault, reconnecting for clean-up.
    """
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # However often: a task group's cancel and then asyncio.run's own at exit.
            interrupted = True
    if interrupted:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise asyncio.CancelledError
    return task.result()


async def paced(hz: float) -> AsyncIterator[None]:
    """Yield ``hz`` times a second, the first time at once, until the consumer stops.

    A sampler loops over it: ``async for _ in paced(hz): take one sample``.  One that
    fell behind (a slow reply, a busy host) carries on at the rate from then on and
    never bursts to catch up.
    """
    loop = asyncio.get_running_loop()
    period = 1.0 / hz
    due = loop.time()
    while True:
        yield
        due += period
        now = loop.time()
        due = max(due, now)
        await asyncio.sleep(due - now)
