"""Post-copy recovery against scripted monitors: pauses noticed, mended, retried, given up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from migrator.errors import GuestError, IntegrityError, MigrationError, QemuExitedError
from migrator.migration import recovery
from migrator.outcome import (
    EXIT_CODES,
    Outcome,
    Situation,
    describe,
    last_source_ram,
    switched_over,
)
from migrator.qemu.monitor import status_in
from migrator.rundir import JsonlWriter
from tests.unit.scripted_monitor import ScriptedMonitor, complete, driver_for, later


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "CONNECT_WAIT_S", 0.1)
    monkeypatch.setattr(recovery, "WATCH_INTERVAL_S", 0.01)
    monkeypatch.setattr(recovery, "PARTNER_PAUSE_WAIT_S", 0.05)


# timeout_s: a recovery that misses its pause fails the test in seconds instead of hanging.
FAST = {"switchover": {"policy": "immediately"}, "timeout_s": 5,
        "recovery": {"stall_timeout_s": 0.1, "deadline_s": 2.0, "backoff_initial_s": 0.01,
                     "backoff_max_s": 0.02}}


def enter_postcopy(src: ScriptedMonitor, dst: ScriptedMonitor) -> None:
    src.emit("MIGRATION", status="postcopy-active")
    dst.emit("MIGRATION", status="postcopy-active")


def pause_both(src: ScriptedMonitor, dst: ScriptedMonitor) -> None:
    """Both sides noticed the broken stream themselves."""
    src.emit("MIGRATION", status="postcopy-paused")
    dst.emit("MIGRATION", status="postcopy-paused")


def pause_after_switch(src: ScriptedMonitor, dst: ScriptedMonitor) -> None:
    """Script the switch: both sides enter post-copy, and both pause 20 ms later."""

    def switch(m: ScriptedMonitor, a: object) -> None:
        enter_postcopy(src, dst)
        later(0.02, lambda: pause_both(src, dst))

    src.reactions["migrate-start-postcopy"] = switch


def reconnects(src: ScriptedMonitor, dst: ScriptedMonitor, failures: int = 0) -> list[str]:
    """Script ``migrate resume``: fail silently ``failures`` times (as QEMU 7.2), then work."""
    uris: list[str] = []

    def resume(m: ScriptedMonitor, arguments: Any) -> None:
        uris.append(arguments["uri"])
        if len(uris) <= failures:
            return  # 7.2: the failed connect shows only on stderr, no event

        def connected() -> None:
            for side in (src, dst):
                side.emit("MIGRATION", status="postcopy-recover")
            for side in (dst, src):
                side.emit("MIGRATION", status="postcopy-active")
            complete(src, dst, 0.02)

        later(0.01, connected)

    def migrate(m: ScriptedMonitor, arguments: Any) -> None:
        if arguments.get("resume"):
            resume(m, arguments)

    src.reactions["migrate"] = migrate
    return uris


def timeline(path: Path) -> list[str]:
    return [json.loads(line)["what"] for line in path.read_text().splitlines()]


async def test_a_pause_qemu_reports_is_recovered(sides: Any) -> None:
    src, dst, writer = sides
    uris = reconnects(src, dst)

    pause_after_switch(src, dst)
    driver = driver_for(FAST, src, dst, writer)
    result = await driver.run("tcp:x")
    assert result.recoveries == 1
    assert "migrate-recover" in dst.commands
    assert uris == ["tcp:127.0.0.1:4446"]  # a fresh listen, not the first URI
    marks = timeline(writer.path)
    assert marks.index("both-paused") < marks.index("recover-listening") < marks.index(
        "recovered")
    assert "migrate-pause" not in marks  # both paused by themselves


async def test_a_side_that_does_not_notice_is_paused(sides: Any) -> None:
    src, dst, writer = sides
    reconnects(src, dst)
    dst.reactions["migrate-pause"] = lambda m, a: dst.emit("MIGRATION",
                                                          status="postcopy-paused")

    def switch(m: ScriptedMonitor, a: object) -> None:
        enter_postcopy(src, dst)
        later(0.02, lambda: src.emit("MIGRATION", status="postcopy-paused"))

    src.reactions["migrate-start-postcopy"] = switch
    result = await driver_for(FAST, src, dst, writer).run("tcp:x")
    assert result.recoveries == 1
    assert dst.commands.count("migrate-pause") == 1
    assert "migrate-pause" not in src.commands


async def test_a_stalled_stream_is_paused_by_the_watchdog(sides: Any) -> None:
    src, dst, writer = sides
    reconnects(src, dst)
    src.reactions["query-migrate"] = lambda m, a: {
        "status": m.migration_status(), "ram": {"transferred": 100, "remaining": 4096}}
    for side in (src, dst):
        side.reactions["migrate-pause"] = lambda m, a: m.emit("MIGRATION",
                                                              status="postcopy-paused")
    src.reactions["migrate-start-postcopy"] = lambda m, a: enter_postcopy(src, dst)
    result = await driver_for(FAST, src, dst, writer).run("tcp:x")
    assert result.recoveries == 1
    assert "stream-stalled" in timeline(writer.path)
    assert src.commands.count("migrate-pause") == dst.commands.count("migrate-pause") == 1


async def test_nothing_left_to_send_is_not_a_stall(sides: Any) -> None:
    src, dst, writer = sides
    src.reactions["query-migrate"] = lambda m, a: {
        "status": "postcopy-active", "ram": {"transferred": 100, "remaining": 0}}

    def switch(m: ScriptedMonitor, a: object) -> None:
        enter_postcopy(src, dst)
        complete(src, dst, 0.4)  # four stall timeouts of idling

    src.reactions["migrate-start-postcopy"] = switch
    result = await driver_for(FAST, src, dst, writer).run("tcp:x")
    assert result.recoveries == 0
    assert "migrate-pause" not in src.commands


async def test_failed_reconnects_are_retried_with_backoff(sides: Any) -> None:
    src, dst, writer = sides
    uris = reconnects(src, dst, failures=2)

    pause_after_switch(src, dst)
    result = await driver_for(FAST, src, dst, writer).run("tcp:x")
    assert result.recoveries == 1
    assert len(uris) == 3
    assert len(set(uris)) == 1
    assert dst.commands.count("migrate-recover") == 1
    assert timeline(writer.path).count("recover-failed") == 2


async def test_recovery_gives_up_at_the_deadline(sides: Any) -> None:
    src, dst, writer = sides
    reconnects(src, dst, failures=1000)

    pause_after_switch(src, dst)
    spec = {**FAST, "recovery": {**FAST["recovery"], "deadline_s": 0.5}}  # type: ignore[dict-item]
    with pytest.raises(MigrationError, match=r"recovery gave up after 0.5 s .*deadline_s"):
        await driver_for(spec, src, dst, writer).run("tcp:x")


async def test_recovery_turned_off_fails_the_pause(sides: Any) -> None:
    src, dst, writer = sides

    pause_after_switch(src, dst)
    spec = {**FAST, "recovery": {"auto": False}}
    with pytest.raises(MigrationError, match=r"recovery.auto = false"):
        await driver_for(spec, src, dst, writer).run("tcp:x")
    assert "migrate-recover" not in dst.commands


# Outcomes.

def test_switch_is_read_from_either_sides_statuses() -> None:
    assert not switched_over([("src", "setup"), ("src", "active"), ("dst", "active")])
    assert switched_over([("src", "active"), ("src", "postcopy-active")])
    assert switched_over([("dst", "postcopy-paused")])
    assert switched_over([("src", "completed")])  # pre-copy handed everything over


def test_every_outcome_has_its_statement() -> None:
    dead_src = QemuExitedError("QEMU exited unexpectedly", name="src", status=-9)
    dead_dst = QemuExitedError("QEMU exited unexpectedly", name="dst", status=-9)
    assert describe(Situation(switched=True, recoveries=0))[0] is Outcome.COMPLETED
    outcome, said = describe(Situation(switched=True, recoveries=2))
    assert outcome is Outcome.COMPLETED_AFTER_RECOVERY
    assert "2 recoveries" in said
    outcome, said = describe(Situation(switched=False, recoveries=0, error=dead_src))
    assert outcome is Outcome.FAILED_BEFORE_SWITCHOVER
    assert "died with its source QEMU" in said
    assert "killed by SIGKILL" in said
    outcome, said = describe(Situation(switched=False, recoveries=0, error=dead_dst))
    assert outcome is Outcome.FAILED_BEFORE_SWITCHOVER
    assert "still running on the source" in said
    outcome, said = describe(Situation(switched=True, recoveries=0, error=dead_dst,
                                       destination_received_bytes=300 << 20))
    assert outcome is Outcome.FAILED_AFTER_SWITCHOVER
    assert "300 MiB" in said
    assert "the VM is lost" in said
    # Each number names its source and what it counts: ram.transferred includes resends,
    # so it can exceed the guest's memory and must not read as "memory received".
    assert "300 MiB of memory sent to it" in said
    assert "received" not in said
    assert "memory sent is ram.transferred, resent pages included" in said
    outcome, said = describe(Situation(switched=True, recoveries=1, error=dead_src,
                                       source_remaining_bytes=64 << 20))
    assert outcome is Outcome.FAILED_AFTER_SWITCHOVER
    assert "64 MiB of guest memory not yet sent" in said
    assert "not yet sent is ram.remaining" in said
    outcome, said = describe(Situation(
        switched=True, recoveries=0,
        postcopy_missed="pre-copy completed before the switchover policy fired"))
    assert outcome is Outcome.COMPLETED_WITHOUT_POSTCOPY
    assert EXIT_CODES[outcome] == 7
    assert "no page was fetched post-copy" in said
    assert "pre-copy completed before the switchover policy fired" in said


def test_a_dead_source_is_named_whichever_failure_was_noticed_first() -> None:
    # The source was killed; the destination's failed load was the error noticed first.
    dst_failed = QemuExitedError("QEMU exited unexpectedly", name="dst", status=1)
    outcome, said = describe(Situation(switched=False, recoveries=0, error=dst_failed,
                                       exited=frozenset({"src", "dst"})))
    assert outcome is Outcome.FAILED_BEFORE_SWITCHOVER
    assert "died with its source QEMU" in said
    # After the switch, a dead destination stays the one named.
    _, said = describe(Situation(switched=True, recoveries=0, error=dst_failed,
                                 exited=frozenset({"dst"})))
    assert "the destination QEMU, which ran the guest" in said


def test_the_last_source_sample_says_what_it_held() -> None:
    samples: list[dict[str, Any]] = [
               {"side": "src", "reply": {"ram": {"remaining": 10, "transferred": 1}}},
               {"side": "dst", "reply": {"status": "active"}},
               {"side": "src", "reply": {"ram": {"remaining": 4, "transferred": 7}}},
               {"side": "src", "error": "timeout"}]
    assert last_source_ram(samples) == (4, 7)
    assert last_source_ram([]) == (None, None)


async def test_a_pause_right_at_the_switch_is_not_missed(sides: Any) -> None:
    src, dst, writer = sides
    reconnects(src, dst)

    def switch(m: ScriptedMonitor, a: object) -> None:
        enter_postcopy(src, dst)
        pause_both(src, dst)  # before the recovery watcher has even woken up

    src.reactions["migrate-start-postcopy"] = switch
    result = await driver_for(FAST, src, dst, writer).run("tcp:x")
    assert result.recoveries == 1


async def test_a_handshake_that_breaks_again_is_listened_for_and_retried(sides: Any) -> None:
    src, dst, writer = sides
    resumes: list[str] = []

    def migrate(m: ScriptedMonitor, arguments: Any) -> None:
        if not arguments.get("resume"):
            return
        resumes.append(arguments["uri"])

        def handshake() -> None:
            for side in (src, dst):
                side.emit("MIGRATION", status="postcopy-recover")
            if len(resumes) == 1:
                pause_both(src, dst)  # the link dropped again mid-handshake
                return
            for side in (dst, src):
                side.emit("MIGRATION", status="postcopy-active")
            complete(src, dst, 0.02)

        later(0.01, handshake)

    src.reactions["migrate"] = migrate

    pause_after_switch(src, dst)
    result = await driver_for(FAST, src, dst, writer).run("tcp:x")
    assert result.recoveries == 1
    assert dst.commands.count("migrate-recover") == 2  # listening again after the break
    assert len(set(resumes)) == 2
    assert "the stream broke again" in writer.path.read_text()


def test_after_the_switch_the_statement_follows_what_failed() -> None:
    bad_pages = IntegrityError("guest integrity check failed: 3 of 100 pages")
    _, said = describe(Situation(switched=True, completed=True, recoveries=0, error=bad_pages))
    assert "not what the guest wrote" in said
    silent = GuestError("the guest on dst sent no heartbeat for 30 s")
    _, said = describe(Situation(switched=True, completed=True, recoveries=0, error=silent))
    assert "had completed" in said  # not "memory only on the source"
    _, said = describe(Situation(switched=True, recoveries=0, error=silent))
    assert "stopped answering there" in said


async def test_a_clean_up_error_never_replaces_the_error_that_ended_the_run() -> None:
    from migrator.errors import HostError
    from migrator.runner import exit_stack_keeping_first_error

    async def failing_cleanup() -> None:
        raise HostError("not connected")

    problems: list[str] = []
    teardowns: list[str] = []

    async def run(failure: Exception | None) -> None:
        async with exit_stack_keeping_first_error(
                problems, lambda: teardowns.append("begun")) as stack:
            stack.push_async_callback(failing_cleanup)
            if failure is not None:
                raise failure

    with pytest.raises(QemuExitedError, match="killed"):
        await run(QemuExitedError("killed", name="dst"))
    # Kept for run.json's teardown record, so no one claims a clean teardown.
    assert problems == ["clean-up: not connected"]
    with pytest.raises(HostError, match="not connected"):  # alone, it is the error
        await run(None)
    assert teardowns == ["begun", "begun"]


async def test_the_watchdog_reads_the_samplers_replies_when_fresh(tmp_path: Path) -> None:
    source = ScriptedMonitor("src", tmp_path)
    await source.query_migrate()  # the sampler's query
    await source.fresh_query_migrate(10.0, timeout=1.0)
    assert source.commands == ["query-migrate"]  # served from the sampler's reply
    await source.fresh_query_migrate(0.0, timeout=1.0)
    assert source.commands == ["query-migrate", "query-migrate"]  # too old: asked anew


def test_the_latest_matching_event_is_found_without_copying_the_history(
    sides: tuple[ScriptedMonitor, ScriptedMonitor, JsonlWriter],
) -> None:
    src, _, _ = sides
    assert src.last_event_index("MIGRATION", status_in("postcopy-active")) is None
    for status in ("postcopy-active", "postcopy-paused", "postcopy-active", "completed"):
        src.emit("MIGRATION", status=status)
    assert src.last_event_index("MIGRATION", status_in("postcopy-active")) == 2
    assert src.last_event_index("MIGRATION", status_in("postcopy-paused")) == 1
    assert src.last_event_index("MIGRATION") == 3
    assert src.last_event_index("STOP") is None
