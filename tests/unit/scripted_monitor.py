"""Scripted QMP monitors and a migration driver over them (driver and recovery tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from migrator.config import parse_scenario
from migrator.migration import MigrationDriver, plan_migration
from migrator.qemu.monitor import EventRecord, Monitor
from migrator.rundir import JsonlWriter

__all__ = ["Reaction", "ScriptedMonitor", "complete", "driver_for", "later"]

Reaction = Callable[["ScriptedMonitor", Mapping[str, object] | None], Any]


class ScriptedMonitor(Monitor):
    """A Monitor whose commands are answered by a script and whose events are injected."""

    def __init__(self, name: str, tmp: Path) -> None:
        super().__init__(name, tmp / f"{name}-events.jsonl")
        self.commands: list[str] = []
        self.reactions: dict[str, Reaction] = {}

    def emit(self, event: str, **data: object) -> None:
        now = time.time_ns()
        self.record_event(EventRecord(event, data, now, now))

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None, *,
                      timeout: float = 30.0, oob: bool = False) -> Any:
        self.commands.append(command)
        reaction = self.reactions.get(command)
        return reaction(self, arguments) if reaction else {}


def later(delay: float, action: Callable[[], None]) -> None:
    asyncio.get_running_loop().call_later(delay, action)


def complete(src: ScriptedMonitor, dst: ScriptedMonitor, delay: float = 0.05) -> None:
    def done() -> None:
        dst.emit("MIGRATION", status="completed")
        src.emit("MIGRATION", status="completed")

    later(delay, done)


def driver_for(migration: dict[str, object], src: Monitor, dst: Monitor,
               timeline: JsonlWriter) -> MigrationDriver:
    scenario = parse_scenario({"name": "t", "migration": migration})
    listens = iter(range(2, 100))

    async def listen_uri() -> str:
        return f"tcp:127.0.0.1:{4444 + next(listens)}"

    return MigrationDriver(src, dst, plan_migration(scenario), scenario.migration, timeline,
                           listen_uri)
