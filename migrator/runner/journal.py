"""What a run writes down as it goes: run.json, the timeline, progress, the teardown steps.

run.json (``meta``) is rewritten whole each time it is saved, so a run that
dies leaves what was decided until then; the timeline is appended mark by mark.
"""

from __future__ import annotations

import platform
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

from migrator import __version__
from migrator.config.models import Scenario
from migrator.rundir import RunDir, RunMeta, timeline_record

__all__ = ["Observer", "RunJournal"]

T = TypeVar("T")


class Observer:
    """Receives progress from a run (the CLI renders it; the default ignores it)."""

    def phase(self, name: str, detail: str = "") -> None:
        """The run entered a new phase."""

    def sample(self, side: str, reply: dict[str, Any]) -> None:
        """A query-migrate sample arrived."""


class RunJournal:
    """One run's run.json (:attr:`meta`), timeline and teardown record, kept as it executes."""

    def __init__(self, scenario: Scenario, run: RunDir, observer: Observer) -> None:
        self.run = run
        self.observer = observer
        self.meta: dict[str, Any] = {
            "schema": 1,
            "run_id": run.run_id,
            "scenario": scenario.name,
            "migrator_version": __version__,
            "started_ns": time.time_ns(),
            "controller": {"hostname": platform.node(), "kernel": platform.release(),
                           "python": platform.python_version()},
            "outcome": "running",
        }
        self.timeline = run.jsonl("timeline.jsonl")
        self.teardown_problems: list[str] = []

    def save_meta(self) -> None:
        """Write run.json, checked against :class:`RunMeta` (the model every reader uses)."""
        self.run.write_json("run.json", RunMeta.model_validate(self.meta).document())

    def mark(self, what: str, **details: Any) -> None:
        self.timeline.write(timeline_record(what, details))
        self.observer.phase(what, ", ".join(f"{k}={v}" for k, v in details.items()))

    async def teardown_step(self, stack: AsyncExitStack, step: str,
                            resource: AbstractAsyncContextManager[T]) -> T:
        """Enter ``resource`` on ``stack``; its release is marked on the timeline as ``step``.

        A release that fails is also kept in :attr:`teardown_problems` (run.json's
        ``teardown``), so nothing claims a clean teardown that did not happen.
        """
        return await stack.enter_async_context(_RecordedRelease(self, step, resource))

    def released(self, step: str, error: BaseException | None) -> None:
        """Record one teardown step (see :meth:`teardown_step`)."""
        if error is None:
            self.mark("teardown-step", step=step, ok=True)
        else:
            problem = f"{step}: {error}"
            self.teardown_problems.append(problem)
            self.mark("teardown-step", step=step, ok=False, error=str(error))


class _RecordedRelease(AbstractAsyncContextManager[T]):
    """A resource whose release is reported to the journal (:meth:`RunJournal.teardown_step`)."""

    def __init__(self, journal: RunJournal, step: str,
                 resource: AbstractAsyncContextManager[T]) -> None:
        self.journal = journal
        self.step = step
        self.resource = resource

    async def __aenter__(self) -> T:
        return await self.resource.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> bool | None:
        try:
            suppress = await self.resource.__aexit__(kind, error, trace)
        except BaseException as failure:
            # Re-raising the error that ended the block is no failure of the release.
            self.journal.released(self.step, None if failure is error else failure)
            raise
        self.journal.released(self.step, None)
        return suppress
