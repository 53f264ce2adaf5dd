"""Post-copy pauses, recoveries and faults in the report: derived offline from raw artifacts.

The recorded run (tests/data/recovery/link-down-twice, see the README there) lost its
migration link twice for 3 s; synthetic run directories cover what it does not: a
pause never recovered, a fault never injected, a run without recovery marks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migrator.metrics.events import load_events, read_jsonl, time_zero
from migrator.metrics.guest import GuestObservations, HeartbeatArrival, ProbeStall
from migrator.metrics.recovery import analyze_recovery
from migrator.metrics.run_artifacts import load_run_artifacts
from migrator.metrics.run_page import load_run_page_data
from migrator.metrics.summary import build_report, write_report
from migrator.model import Metric, Phase, Report
from migrator.report.html import render_run_html
from migrator.report.terminal import render_report
from migrator.rundir import RunMeta
from tests.unit.rendering import terminal_text

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDED = DATA / "recovery" / "link-down-twice"
S = 1_000_000_000
MS = 1_000_000
T0 = 1_800_000_000 * S  # the synthetic runs' migrate mark


@pytest.fixture(scope="module")
def report() -> Report:
    return build_report(RECORDED)


def _meta(recoveries: int | None = None) -> RunMeta:
    """A run.json with only what analyze_recovery reads."""
    return RunMeta(run_id="run", scenario="scenario", recoveries=recoveries)


def marks(run: Path, what: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run / "timeline.jsonl") if r["what"] == what]


# ---------------------------------------------------------------------------
# The recorded run: two link outages, both recovered


def test_recorded_run_has_two_pauses_both_recovered(report: Report) -> None:
    assert report.outcome == "completed-after-recovery"
    assert report.statement is not None
    assert report.statement.startswith("completed after 2 recoveries")
    first, second = report.recoveries
    assert [p.number for p in report.recoveries] == [1, 2]
    for pause, fault in ((first, 0), (second, 1)):
        assert pause.result == "recovered"
        assert pause.cause == "stream stalled 1.0 s (watchdog)"
        assert pause.fault == fault
        # The first resume attempt found the link still down; the second got through.
        assert pause.attempts.value == 2
        assert pause.attempts.source == "recover-attempt marks (timeline.jsonl)"
        assert pause.note.startswith("1 failed attempt; last: no connection to tcp:")
        assert pause.both_paused_ns is not None
        assert pause.recovered_ns is not None
        assert pause.began_ns <= pause.both_paused_ns < pause.recovered_ns
        assert pause.duration.value == pytest.approx(
            (pause.recovered_ns - pause.began_ns) / S, abs=1e-3)
        assert pause.duration.value is not None
        assert 2.0 < pause.duration.value < 4.0
    assert first.recovered_ns is not None
    assert first.recovered_ns < second.began_ns
    assert not [w for w in report.warnings if "recoveries" in w]


def test_pause_times_count_from_the_migrate_mark_like_the_phases(report: Report) -> None:
    [migrate] = marks(RECORDED, "migrate")
    # The same origin as the HTML plots, whose t = 0 is the migrate command; the
    # report's "setup" phase starts there too.
    setup = next(p for p in report.phases if p.name == "setup")
    assert setup.start_ns == migrate["host_ns"]
    [stalled, _] = marks(RECORDED, "stream-stalled")
    [recovered, _] = marks(RECORDED, "recovered")
    first = report.recoveries[0]
    assert first.began_ns == stalled["host_ns"]
    assert first.recovered_ns == recovered["host_ns"]
    assert first.began.value == round((stalled["host_ns"] - migrate["host_ns"]) / S, 3)
    assert first.recovered.value == round((recovered["host_ns"] - migrate["host_ns"]) / S, 3)


def test_the_guest_stalled_through_each_pause(report: Report) -> None:
    guest_ns = sorted(h["host_ns"] for side in ("src", "dst")
                      for h in _heartbeats(RECORDED / side / "console.jsonl"))
    for pause in report.recoveries:
        # The link was down 3 s: the guest cannot have gone on unhindered.
        assert pause.guest_gap.value is not None
        assert pause.guest_gap.value > 1.0
        assert pause.guest_gap_start_ns is not None
        assert pause.recovered_ns is not None
        gap_end = pause.guest_gap_start_ns + pause.guest_gap.value * S
        assert pause.guest_gap_start_ns < pause.recovered_ns
        assert gap_end > pause.began_ns
        # A real gap between two heartbeats the controller received.
        assert pause.guest_gap_start_ns in guest_ns
        assert not pause.guest_gap_open
        # The guest's own clock saw a long stall over it too.
        assert pause.probe_stall.value is not None
        assert pause.probe_stall.value > 1.0
        assert pause.probe_stall_vcpu == 0
    # The outside view's worst gap is the same measurement.
    assert report.outside_stalls is not None
    worst = report.outside_stalls.max_gap.value
    assert worst is not None
    assert max(p.guest_gap.value or 0 for p in report.recoveries) == pytest.approx(
        worst / 1e3, abs=1e-3)


def _heartbeats(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(path) if '"t":"hb"' in r.get("line", "")]


def test_every_recovery_metric_states_unit_and_source(report: Report) -> None:
    metrics: list[Metric] = []
    for pause in report.recoveries:
        metrics += [pause.began, pause.both_paused, pause.recovered, pause.duration,
                    pause.guest_gap, pause.probe_stall]
    for fault in report.faults:
        metrics += [fault.injected, fault.cleared]
    assert metrics
    for metric in metrics:
        assert metric.unit == "s"
        assert metric.source


def test_recorded_faults_in_order_with_the_pauses(report: Report) -> None:
    first, second = report.faults
    for fault, phase in ((first, "postcopy"), (second, "recovered")):
        assert fault.kind == "link-down"
        assert fault.target == "mig0 on destination"
        assert fault.at == phase
        assert fault.after_ms == 300
        assert fault.duration_s == 3.0
        assert fault.status == "cleared"
        assert fault.reason is None
        assert fault.injected_ns is not None
        assert fault.cleared_ns is not None
        assert fault.injected.value is not None
        assert fault.cleared.value is not None
        assert 3.0 <= fault.cleared.value - fault.injected.value < 4.0
    [first_pause, second_pause] = report.recoveries
    instants = [first.injected_ns, first_pause.began_ns, first.cleared_ns,
                first_pause.recovered_ns, second.injected_ns, second_pause.began_ns,
                second.cleared_ns, second_pause.recovered_ns]
    assert instants == sorted(instants)  # type: ignore[type-var]


def test_terminal_shows_the_statement_and_both_tables(report: Report) -> None:
    text = terminal_text(report, width=100)
    assert "outcome completed-after-recovery" in text
    assert report.statement is not None
    assert " ".join(report.statement.split()) in " ".join(text.split())
    assert "Post-copy pauses and recoveries, s since migrate" in text
    pauses = text.split("Faults injected")[0]
    rows = [line for line in pauses.splitlines() if line.lstrip().startswith(("1 ", "2 "))]
    assert len(rows) == 2
    assert "2.183" in rows[0]
    assert "13.895" in rows[0]
    assert "#1: stream stalled 1.0 s (watchdog), 1.3 s after fault 0 (link-down)" in text
    assert "Faults injected, s since migrate" in text
    assert "mig0 on destination" in text
    assert "recovered + 300 ms" in text
    # An 80-column terminal cuts no value of the pauses table.
    narrow = terminal_text(report, width=80)
    assert "…" not in narrow.split("Faults injected")[0]


def test_terminal_colours_the_outcome(report: Report) -> None:
    def ansi(outcome: str) -> str:
        # A height too, or TERM=dumb overrides the width (rich's rule for dumb terminals).
        console = Console(record=True, width=100, height=50, force_terminal=True,
                          color_system="standard")
        render_report(report.model_copy(update={"outcome": outcome}), console)
        return console.export_text(styles=True).splitlines()[0]

    assert "\x1b[33mcompleted-after-recovery" in ansi("completed-after-recovery")  # yellow
    assert "\x1b[32mcompleted" in ansi("completed")  # green
    assert "\x1b[31mfailed-after-switchover" in ansi("failed-after-switchover")  # red


def test_html_shows_statement_tables_and_shaded_pauses(report: Report) -> None:
    html = render_run_html(load_run_page_data(load_run_artifacts(RECORDED)))
    assert 'class="badge warn">completed-after-recovery' in html
    assert report.statement is not None
    assert f'<div class="statement warn">{report.statement}</div>' in html
    assert "<h3>Post-copy pauses and recoveries, s since migrate</h3>" in html
    assert "<h3>Faults injected, s since migrate</h3>" in html
    # The guest gap, then when it began.
    assert re.search(r">13\.895<a [^>]*>\[\d+\]</a></td>\s*<td class=\"num\">0\.344</td>", html)
    [migrate] = marks(RECORDED, "migrate")
    for plot in ("plot-stall-timeline", "plot-transfer"):
        start = html.index(f'Plotly.newPlot("{plot}", ') + len(f'Plotly.newPlot("{plot}", ')
        figure = json.loads(html[start:html.index(");</script>", start)])
        shaded = [s for s in figure["layout"]["shapes"] if s.get("name") == "post-copy pause"]
        assert len(shaded) == 2
        for shape, pause in zip(shaded, report.recoveries, strict=True):
            assert pause.recovered_ns is not None
            assert shape["x0"] == pytest.approx((pause.began_ns - migrate["host_ns"]) / S)
            assert shape["x1"] == pytest.approx((pause.recovered_ns - migrate["host_ns"]) / S)


# ---------------------------------------------------------------------------
# Old report.json files and runs without pauses


def test_old_report_json_without_the_new_fields_still_loads(report: Report) -> None:
    old = report.model_dump(mode="json")
    for name in ("statement", "recoveries", "faults"):
        del old[name]
    loaded = Report.model_validate_json(json.dumps(old))
    assert loaded.statement is None
    assert loaded.recoveries == []
    assert loaded.faults == []
    assert loaded.outcome == "completed-after-recovery"
    assert "Post-copy pauses" not in terminal_text(loaded, width=100)


def test_run_without_pauses_or_faults_has_empty_sections() -> None:
    plain = build_report(DATA / "runs" / "hugetlb-1g")
    assert plain.recoveries == []
    assert plain.faults == []
    assert plain.statement is None  # recorded before run.json had one
    text = terminal_text(plain, width=100)
    assert "Post-copy pauses" not in text
    assert "Faults injected" not in text


def test_report_round_trips_with_the_new_fields(tmp_path: Path, report: Report) -> None:
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    written = write_report(run, build_report(run))
    assert Report.model_validate_json(written.read_text()) == report


# ---------------------------------------------------------------------------
# Synthetic run directories


def write_run(run: Path, timeline: list[tuple[int, str, dict[str, Any]]],
              events: list[tuple[int, str, str]]) -> None:
    """timeline: (ms since migrate, what, details); events: (ms, side, MIGRATION status)."""
    for side in ("src", "dst"):
        (run / side).mkdir(parents=True)
        with (run / side / "events.jsonl").open("w") as out:
            for ms, who, status in events:
                if who == side:
                    at = T0 + ms * MS
                    out.write(json.dumps({"side": side, "event": "MIGRATION",
                                          "data": {"status": status}, "qemu_ns": at - 1000,
                                          "host_ns": at}) + "\n")
    with (run / "timeline.jsonl").open("w") as out:
        for ms, what, details in [(0, "migrate", {}), *timeline]:
            out.write(json.dumps({"host_ns": T0 + ms * MS, "what": what, **details}) + "\n")


def beats(until_ms: int, every_ms: int = 5) -> GuestObservations:
    """A guest whose heartbeats stop at ``until_ms`` (and whose probe saw one stall)."""
    seen = GuestObservations()
    seen.heartbeats = [HeartbeatArrival(n, n * every_ms * MS, T0 + n * every_ms * MS, "dst")
                       for n in range(until_ms // every_ms + 1)]
    seen.stalls = [ProbeStall(0, 1000 * MS, 1500 * MS, T0 + 1000 * MS)]
    return seen


FAULTS = [
    {"kind": "migrate-pause", "side": "source", "at": "postcopy", "after_ms": 200},
    {"kind": "stop", "side": "destination", "duration_s": 2.0, "at": "recovery",
     "after_ms": 0},
    {"kind": "kill", "side": "source", "at": "recovered", "after_ms": 100},
]


def test_pause_never_recovered_and_a_fault_never_injected(tmp_path: Path,
                                                         report: Report) -> None:
    run = tmp_path / "run"
    write_run(run, [
        (100, "postcopy-requested", {}),
        (700, "fault-injected", {"index": 0, **FAULTS[0]}),
        (800, "postcopy-paused", {"side": "src", "by": "qemu"}),
        (1800, "migrate-pause", {"side": "dst"}),
        (1810, "both-paused", {}),
        (1900, "recover-listening", {"uri": "tcp:h:1"}),
        (1901, "recover-attempt", {"attempt": 1, "uri": "tcp:h:1"}),
        (3901, "recover-failed", {"attempt": 1, "error": "no connection within 2.0 s"}),
        (4400, "recover-attempt", {"attempt": 2, "uri": "tcp:h:1"}),
        (6400, "recover-failed", {"attempt": 2, "error": "Connection refused"}),
        (9000, "fault-not-injected", {"index": 1, "kind": "stop",
                                      "reason": "the recovery phase never began"}),
        (9100, "cleaned-up", {}),
    ], [(200, "src", "postcopy-active"), (210, "dst", "postcopy-active"),
        (790, "src", "postcopy-paused"), (1805, "dst", "postcopy-paused")])
    result = analyze_recovery(load_events(run), {"faults": FAULTS}, _meta(recoveries=0),
                              beats(until_ms=850))
    [pause] = result.pauses
    assert pause.result == "not recovered"
    assert pause.cause == "migrate-pause fault on src (faults[0])"
    assert pause.fault == 0
    assert pause.began.value == 0.79  # src's own event came before migrator's mark
    assert pause.both_paused.value == 1.81  # migrator's mark, not the events
    assert pause.recovered.value is None
    assert pause.recovered_ns is None
    assert pause.duration.value is None
    assert pause.attempts.value == 2
    assert pause.note == "recovery gave up after 2 attempts; last: Connection refused"
    # The guest went silent at 0.85 s and stayed so to the end of the run.
    assert pause.guest_gap.value == pytest.approx(9.1 - 0.85)
    assert pause.guest_gap_start_ns == T0 + 850 * MS
    assert pause.guest_gap_open  # a lower bound
    assert pause.probe_stall.value == 1.5
    injected, refused, unrecorded = result.faults
    assert (injected.status, injected.injected.value, injected.cleared.value) == (
        "injected", 0.7, None)
    assert injected.target == "source QEMU"
    assert (refused.index, refused.kind, refused.status) == (1, "stop", "not injected")
    assert refused.reason == "the recovery phase never began"
    assert refused.target == "destination QEMU"
    assert (refused.at, refused.after_ms, refused.duration_s) == ("recovery", 0, 2.0)
    assert refused.injected.value is None
    assert (unrecorded.index, unrecorded.status) == (2, "not recorded")
    assert result.warnings == []
    text = terminal_text(report.model_copy(update={"recoveries": result.pauses,
                                             "faults": result.faults}), width=120)
    row = next(line for line in text.splitlines() if "not recovered" in line)
    assert "≥ 8.250" in row  # the guest's silence, still open: a lower bound
    assert "#1: migrate-pause fault on src (faults[0]); recovery gave up after 2 attempts" in text
    assert "#1 not injected: the recovery phase never began" in text
    assert "#2 not recorded: no fault mark in timeline.jsonl" in text


def test_not_recovered_pause_in_the_report_and_terminal(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    lines = (run / "timeline.jsonl").read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if '"what":"recovered"' in line)
    (run / "timeline.jsonl").write_text("".join(lines[:last]))
    meta = json.loads((run / "run.json").read_text())
    meta.update(outcome="failed-after-switchover", statement=(
        "failed after switchover: post-copy recovery gave up [deadline]; the VM is lost"),
        error={"type": "MigrationError", "message": "post-copy recovery gave up [deadline]"})
    (run / "run.json").write_text(json.dumps(meta))
    rebuilt = build_report(run)
    assert [p.result for p in rebuilt.recoveries] == ["recovered", "not recovered"]
    assert "run.json counts 2 recoveries, the timeline and events show 1" in rebuilt.warnings
    text = terminal_text(rebuilt, width=120)
    # Rich markup in the statement is printed, not interpreted.
    assert "gave up [deadline]; the VM is lost" in text
    assert "not recovered" in text
    assert "the run ended while post-copy was paused" not in text
    assert "#2: stream stalled 1.0 s (watchdog)" in text


def test_run_without_recovery_marks_is_read_from_events(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [(5000, "cleaned-up", {})], [
        (200, "src", "postcopy-active"), (210, "dst", "postcopy-active"),
        (1000, "dst", "postcopy-paused"), (1002, "src", "postcopy-paused"),
        (2000, "dst", "postcopy-recover"), (2001, "src", "postcopy-recover"),
        (2010, "src", "postcopy-active"), (2020, "dst", "postcopy-active"),
        (4000, "src", "completed"), (4001, "dst", "completed"),
    ])
    result = analyze_recovery(load_events(run), {}, _meta(), beats(until_ms=5000))
    [pause] = result.pauses
    assert pause.cause == "QEMU on dst reported a broken stream"
    assert (pause.began.value, pause.both_paused.value, pause.recovered.value) == (
        1.0, 1.002, 2.02)
    assert pause.duration.value == 1.02
    assert pause.attempts.value == 1
    assert pause.attempts.source == "src MIGRATION events entering postcopy-recover"
    assert pause.result == "recovered"
    assert "MIGRATION events" in pause.began.source
    # Heartbeats every 5 ms throughout: the longest gap overlapping is one period.
    assert pause.guest_gap.value == 0.005
    assert pause.probe_stall.value == 1.5
    assert result.faults == []


def test_recovery_disabled_and_pool_exhausted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    pool = {"kind": "pool-exhausted"}
    write_run(run, [
        (-3000, "fault-injected", {"index": 0, "kind": "pool-exhausted", "file": "/x"}),
        (1500, "stream-stalled", {"seconds": 10.02, "stall_timeout_s": 10.0}),
        (1501, "migrate-pause", {"side": "src"}),
        (1502, "migrate-pause", {"side": "dst"}),
        (1510, "both-paused", {}),
        (1511, "recovery-disabled", {}),
    ], [(200, "src", "postcopy-active"), (1505, "src", "postcopy-paused"),
        (1506, "dst", "postcopy-paused")])
    result = analyze_recovery(load_events(run), {"faults": [pool]}, _meta(recoveries=0),
                              GuestObservations())
    [pause] = result.pauses
    assert pause.cause == "stream stalled 10.0 s (watchdog)"
    assert pause.fault is None  # the pool was taken before the QEMUs started: not a cause
    assert pause.note == "not recovered: migration.recovery.auto = false"
    assert pause.guest_gap.value is None
    assert pause.probe_stall.value is None
    [fault] = result.faults
    assert (fault.kind, fault.status, fault.at, fault.injected.value) == (
        "pool-exhausted", "injected", None, -3.0)
    assert fault.target == "destination hugepages"


def test_pause_times_and_plots_share_one_time_zero() -> None:
    boot = Phase(name="boot", start_ns=50, end_ns=90)
    assert time_zero({"migrate": 100}, [boot], 10) == (100, "migrate")
    assert time_zero({}, [boot], 10) == (50, "boot")
    assert time_zero({}, [], 10) == (10, None)


def test_a_report_with_a_bare_attempt_count_still_loads(report: Report) -> None:
    document = json.loads(report.model_dump_json())
    for pause in document["recoveries"]:
        pause["attempts"] = 2  # as report.json held it before it named its source
    [first, _] = Report.model_validate(document).recoveries
    assert first.attempts.value == 2
    assert first.attempts.source.startswith("not recorded")
