"""The migration driver's sequencing and switchover policies, against scripted monitors."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from migrator.config import parse_scenario
from migrator.errors import ConfigError, MigrationError, MigrationTimeout, QmpCommandError
from tests.unit.scripted_monitor import ScriptedMonitor, complete, driver_for, later


async def test_prepare_sets_both_sides_then_listens(sides: Any) -> None:
    src, dst, timeline = sides
    driver = driver_for({"preempt": True}, src, dst, timeline)
    await driver.prepare("tcp:127.0.0.1:4444")
    # Each side is asked what it took (the settings-in-effect mark) before dst listens.
    taken = ["query-migrate-capabilities", "query-migrate-parameters"]
    assert dst.commands == ["migrate-set-capabilities", *taken, "migrate-incoming"]
    assert src.commands == ["migrate-set-capabilities", "migrate-set-parameters", *taken]
    marks = [json.loads(line) for line in timeline.path.read_text().splitlines()]
    [settings] = [mark for mark in marks if mark["what"] == "settings-in-effect"]
    assert set(settings) >= {"source", "destination"}


async def test_immediate_switchover(sides: Any) -> None:
    src, dst, timeline = sides
    src.reactions["migrate-start-postcopy"] = lambda m, a: complete(src, dst)
    driver = driver_for({"switchover": {"policy": "immediately"}}, src, dst, timeline)
    result = await driver.run("tcp:x")
    assert src.commands == ["migrate", "migrate-start-postcopy"]
    assert result.source_status == result.destination_status == "completed"
    assert result.postcopy_requested_ns is not None


async def test_after_passes_waits_for_the_pass_event(sides: Any) -> None:
    src, dst, timeline = sides

    def on_migrate(m: ScriptedMonitor, a: object) -> None:
        later(0.02, lambda: src.emit("MIGRATION_PASS", **{"pass": 1}))
        later(0.04, lambda: src.emit("MIGRATION_PASS", **{"pass": 2}))

    switched_at: list[int] = []

    def on_switch(m: ScriptedMonitor, a: object) -> None:
        switched_at.append(len(src.find_events("MIGRATION_PASS")))
        complete(src, dst)

    src.reactions["migrate"] = on_migrate
    src.reactions["migrate-start-postcopy"] = on_switch
    driver = driver_for({"switchover": {"policy": "after-passes", "passes": 2}}, src, dst,
                        timeline)
    await driver.run("tcp:x")
    assert switched_at == [2]


async def test_precopy_finishing_first_skips_postcopy(sides: Any) -> None:
    src, dst, timeline = sides
    src.reactions["migrate"] = lambda m, a: complete(src, dst, delay=0.01)
    driver = driver_for({"switchover": {"policy": "after-seconds", "seconds": 5}}, src, dst,
                        timeline)
    result = await driver.run("tcp:x")
    assert "migrate-start-postcopy" not in src.commands
    assert result.postcopy_skipped_reason is not None
    marks = [json.loads(line)["what"] for line in timeline.path.read_text().splitlines()]
    assert "postcopy-skipped" in marks


async def test_failure_is_an_error_with_qemus_reason(sides: Any) -> None:
    src, dst, timeline = sides
    src.reactions["migrate"] = lambda m, a: later(0.01, lambda: src.emit("MIGRATION",
                                                                         status="failed"))
    src.reactions["query-migrate"] = lambda m, a: {"status": "failed",
                                                   "error-desc": "Unable to write to socket"}
    driver = driver_for({"postcopy": False}, src, dst, timeline)
    with pytest.raises(MigrationError, match="failed on the source: Unable to write to socket"):
        await driver.run("tcp:x")


async def test_timeout_names_the_field_and_states(sides: Any) -> None:
    src, dst, timeline = sides
    src.reactions["migrate"] = lambda m, a: src.emit("MIGRATION", status="active")
    driver = driver_for({"postcopy": False, "timeout_s": 0.2}, src, dst, timeline)
    with pytest.raises(MigrationTimeout, match=r"migration.timeout_s: .*source active"):
        await driver.run("tcp:x")


async def test_start_postcopy_refused_while_running_is_raised(sides: Any) -> None:
    src, dst, timeline = sides

    def refuse(m: ScriptedMonitor, a: object) -> None:
        raise QmpCommandError("src", "migrate-start-postcopy", "GenericError", "nope")

    src.reactions["migrate-start-postcopy"] = refuse
    driver = driver_for({"switchover": {"policy": "immediately"}}, src, dst, timeline)
    with pytest.raises(QmpCommandError, match="nope"):
        await driver.run("tcp:x")


def cancelled_on_request(src: ScriptedMonitor, dst: ScriptedMonitor) -> None:
    """QEMU's answer to migrate_cancel: both sides leave the migration."""
    def on_cancel(m: ScriptedMonitor, a: object) -> None:
        src.emit("MIGRATION", status="cancelled")
        dst.emit("MIGRATION", status="failed")

    src.reactions["migrate_cancel"] = on_cancel


async def test_max_passes_cancels_a_precopy_that_does_not_converge(sides: Any) -> None:
    src, dst, timeline = sides

    def on_migrate(m: ScriptedMonitor, a: object) -> None:
        for number in (1, 2, 3):
            later(0.02 * number, functools.partial(src.emit, "MIGRATION_PASS", **{"pass": number}))

    src.reactions["migrate"] = on_migrate
    cancelled_on_request(src, dst)
    driver = driver_for({"postcopy": False, "max_passes": 2}, src, dst, timeline)
    with pytest.raises(MigrationError) as caught:
        await driver.run("tcp:x")
    assert str(caught.value) == ("migration.max_passes: pre-copy did not converge in 2 passes; "
                                 "migrate_cancel sent, the guest stays on the source")
    assert src.commands == ["migrate", "migrate_cancel"]
    # Cancelled as pass 3 began, not before.
    assert len(src.find_events("MIGRATION_PASS")) == 3


async def test_max_seconds_cancels_and_a_converging_precopy_is_left_alone(
        sides: Any, tmp_path: Path) -> None:
    src, dst, timeline = sides
    cancelled_on_request(src, dst)
    driver = driver_for({"postcopy": False, "max_seconds": 0.05}, src, dst, timeline)
    with pytest.raises(MigrationError, match=r"^migration.max_seconds: pre-copy did not "
                                             r"converge in 0.05 s; migrate_cancel sent"):
        await driver.run("tcp:x")

    src2, dst2 = ScriptedMonitor("src", tmp_path / "2"), ScriptedMonitor("dst", tmp_path / "2")
    src2.reactions["migrate"] = lambda m, a: complete(src2, dst2, delay=0.01)
    driver = driver_for({"postcopy": False, "max_seconds": 5.0}, src2, dst2, timeline)
    result = await driver.run("tcp:x")
    assert result.source_status == "completed"
    assert "migrate_cancel" not in src2.commands


def test_cancel_rules_are_for_precopy_only() -> None:
    with pytest.raises(ConfigError, match="max_passes cancels a pre-copy-only migration"):
        parse_scenario({"name": "t", "migration": {"max_passes": 3}})


async def test_pause_source_after_passes_stops_the_source_then_resumes_the_destination(
        sides: Any) -> None:
    src, dst, timeline = sides

    def on_migrate(m: ScriptedMonitor, a: object) -> None:
        for number in (1, 2):
            later(0.02 * number, functools.partial(src.emit, "MIGRATION_PASS", **{"pass": number}))

    paused_at: list[int] = []

    def on_stop(m: ScriptedMonitor, a: object) -> None:
        paused_at.append(len(src.find_events("MIGRATION_PASS")))
        complete(src, dst)  # with the guest's memory still, pre-copy converges

    src.reactions["migrate"] = on_migrate
    src.reactions["stop"] = on_stop
    driver = driver_for({"postcopy": False,
                         "switchover": {"policy": "pause-source-after-passes", "passes": 2}},
                        src, dst, timeline)
    result = await driver.run("tcp:x")
    assert result.source_status == result.destination_status == "completed"
    assert paused_at == [2]
    assert src.commands == ["migrate", "stop"]
    assert dst.commands[-1] == "cont"
    marks = [json.loads(line)["what"] for line in timeline.path.read_text().splitlines()]
    assert marks.index("source-paused") < marks.index("destination-resumed")


def test_pausing_the_source_is_for_precopy_only() -> None:
    with pytest.raises(ConfigError, match='"pause-source-after-passes" ends a pre-copy-only'):
        parse_scenario({"name": "t", "migration": {
            "switchover": {"policy": "pause-source-after-passes", "passes": 2}}})
