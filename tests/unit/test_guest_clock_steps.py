"""A guest clock that steps back is a clock step, never a stall.

On a real run the destination guest's CLOCK_MONOTONIC went back about 6.5 ms
after the migration; the probe of that time subtracted unsigned and printed a
stall of 2**64 ns minus the step (18,446,744,073,703 ms in every table).  The
probe now prints a ``clock_step`` line instead, and the metrics read an older
probe's impossible stall line as the clock step it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from migrator.guest.protocol import (
    ClockStep,
    Heartbeat,
    Hist,
    Stall,
    Stats,
    Verify,
    parse_line,
)
from migrator.metrics.guest import WRAPPED, load_guest
from migrator.metrics.run_page import load_run_page_data, run_clock
from migrator.metrics.summary import build_report
from migrator.model import Report
from migrator.report.html import render_run_html
from migrator.report.run_tables import stall_tables
from migrator.report.sources import Sources
from tests.unit.rendering import terminal_text

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "tests" / "data" / "runs"
PROBE = ROOT / "guests" / "probe" / "migrator-probe.c"

#: The step of the real run, and what the probe of that time printed for it.
BACK_NS = 6_551_616
WRAPPED_GAP = (1 << 64) - BACK_NS


def _line(event: dict[str, object]) -> str:
    return "@MIG " + json.dumps(event, separators=(",", ":"))


def stepped_run(tmp_path: Path, step_line: str, hist_max: int | None = None) -> Path:
    """The recorded 1 GiB run with ``step_line`` on the destination console after a heartbeat.

    ``hist_max``: the destination's ``hist`` line gets this maximum in its own
    bucket, as a probe that counted the step as a gap printed it.
    """
    run = shutil.copytree(RUNS / "hugetlb-1g", tmp_path / "run")
    console = run / "dst" / "console.jsonl"
    records = [json.loads(raw) for raw in console.read_text().splitlines()]
    # The second record is heartbeat 695, the destination's first after the switchover.
    beat = records[1]
    assert isinstance(parse_line(beat["line"]), Heartbeat)
    records.insert(2, {"host_ns": beat["host_ns"], "side": "dst", "line": step_line})
    if hist_max is not None:
        record = next(r for r in records if '"t":"hist"' in r["line"])
        hist = json.loads(record["line"].removeprefix("@MIG "))
        bucket = hist_max.bit_length() - 1
        hist["buckets"] += [0] * (bucket - len(hist["buckets"])) + [1]
        hist["max"] = hist_max
        hist["ops"] += 1
        record["line"] = _line(hist)
    console.write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def old_probe_run(tmp_path: Path) -> Path:
    """What a probe that predates clock_step lines recorded for the real step."""
    return stepped_run(
        tmp_path, _line({"t": "stall", "cpu": 0, "g": 5_269_300_000, "gap": WRAPPED_GAP}),
        hist_max=WRAPPED_GAP)


def new_probe_run(tmp_path: Path) -> Path:
    """What the probe records for it now."""
    return stepped_run(
        tmp_path, _line({"t": "clock_step", "cpu": 0, "g": 5_269_300_000, "back": BACK_NS}))


def test_the_probe_line_of_a_step_back_parses() -> None:
    step = parse_line('@MIG {"t":"clock_step","cpu":1,"g":5269300000,"back":6551616}')
    assert step == ClockStep(cpu=1, before_ns=5_269_300_000, back_ns=BACK_NS)
    stats = parse_line('@MIG {"t":"stats","g":1,"ops":[5],"stalls":2,"clock_steps":1,'
                       '"dropped":0,"running":true}')
    assert isinstance(stats, Stats)
    assert stats.clock_steps == 1
    # Probes that predate clock_step lines print no count: none seen.
    older = parse_line('@MIG {"t":"stats","g":1,"ops":[5],"stalls":2,"dropped":0,'
                       '"running":true}')
    assert isinstance(older, Stats)
    assert older.clock_steps == 0


@pytest.mark.parametrize("recording", [old_probe_run, new_probe_run])
def test_a_step_back_is_one_clock_step_and_no_stall(
        tmp_path: Path, recording: Callable[[Path], Path]) -> None:
    run = recording(tmp_path)
    clean = build_report(RUNS / "hugetlb-1g")
    report = build_report(run)

    # The stalls, their totals and comparisons are the recorded run's, untouched (but
    # for the histogram, in which the older probe counted one more access).
    assert [v.model_copy(update={"histogram": None}) for v in report.guest_stalls] == [
        v.model_copy(update={"histogram": None}) for v in clean.guest_stalls]
    assert report.worst_guest_stalls == clean.worst_guest_stalls
    assert report.comparisons == clean.comparisons
    assert all((v.max_ms.value or 0) < 1000 for v in report.guest_stalls)

    steps = report.guest_clock_steps
    assert steps is not None
    assert (steps.count.value, steps.count.unit) == (1, "steps")
    assert steps.count.source.startswith("guest probe")
    assert (steps.largest_back.value, steps.largest_back.unit) == (6.5516, "ms")
    [step] = steps.steps
    assert (step.vcpu, step.step.value, step.step.unit) == (0, -6.5516, "ms")
    # Heartbeat 695, the destination's first, came after it completed.
    assert step.phase == "settle"
    assert step.host_ns is not None

    new = [w for w in report.warnings if w not in clean.warnings]
    assert len(new) == 1
    assert new[0].startswith("guest clock: CLOCK_MONOTONIC stepped 1 time(s), largest back "
                             "6.552 ms on vCPU 0 (settle); counted as clock steps, not as "
                             "stalls")

    text = terminal_text(report)
    # Only the warning about an older probe's line quotes the impossible gap.
    assert text.count("18,446,744") == sum(w.count("18,446,744") for w in report.warnings)
    assert "Guest clock steps, not stalls: 1 [" in text
    assert "guest clock: CLOCK_MONOTONIC stepped 1 time(s)" in text
    assert report == Report.model_validate_json(report.model_dump_json())


def test_an_older_probes_impossible_stall_is_named_in_the_warning(tmp_path: Path) -> None:
    report = build_report(old_probe_run(tmp_path))
    steps = report.guest_clock_steps
    assert steps is not None
    assert steps.steps[0].reported_as == "stall"
    assert "came as stall lines with an impossible gap (up to 18,446,744,073,703 ms, longer " \
           "than the " in report.warnings[-1]
    # The histogram counts the step as a gap of 0, as the probe now does.
    guest = load_guest(tmp_path / "run")
    hist = guest.histograms[0]
    assert hist.max_gap_ns == 70_874_624  # the longest real stall
    assert sum(hist.buckets) == hist.ops
    assert len(hist.buckets) == 27


def test_a_stall_longer_than_the_consoles_recorded_is_a_clock_step(tmp_path: Path) -> None:
    # 1000 s: no wrap, but the run's consoles hold a few seconds in all.
    run = stepped_run(tmp_path, _line({"t": "stall", "cpu": 0, "g": 5_269_300_000,
                                       "gap": 1000 * 10**9}))
    guest = load_guest(run)
    assert guest.console_span_ns is not None
    assert guest.console_span_ns < 10 * 10**9
    assert max(s.gap_ns for s in guest.stalls) < 10**9
    [step] = guest.clock_steps
    assert (step.step_ns, step.reported_as) == (1000 * 10**9, "stall")
    report = build_report(run)
    assert "largest ahead 1,000,000.000 ms" in report.warnings[-1]


def test_the_html_report_lists_the_step_apart_from_the_stalls(tmp_path: Path) -> None:
    run = new_probe_run(tmp_path)
    report = build_report(run)
    html = render_run_html(load_run_page_data(run))
    assert "Guest clock steps, not stalls: 1" in html
    assert "18,446,744" not in html
    clock = run_clock(run, report, json.loads((run / "run.json").read_text()), load_guest(run))
    tables = stall_tables(report, Sources(), clock)
    [rows] = [t.rows for t in tables if t.title.startswith("Guest clock steps")]
    assert [c.text for c in rows[0][1:5]] == ["-6.552", "0", "settle", "clock_step"]


# ------------------------------------------------------------------ the probe itself

FAKE_CLOCK = r"""
#include <stdint.h>
#include <time.h>

int __real_clock_gettime(clockid_t id, struct timespec *ts);

/* The real clock, 6 ms ahead until the 200,000th read, then back on time. */
int __wrap_clock_gettime(clockid_t id, struct timespec *ts)
{
	static unsigned long reads;
	int r = __real_clock_gettime(id, ts);
	uint64_t ns = (uint64_t)ts->tv_sec * 1000000000ull + (uint64_t)ts->tv_nsec;

	if (__atomic_add_fetch(&reads, 1, __ATOMIC_RELAXED) < 200000)
		ns += 6000000ull;
	ts->tv_sec = (time_t)(ns / 1000000000ull);
	ts->tv_nsec = (long)(ns % 1000000000ull);
	return r;
}
"""


def test_the_probe_reports_a_step_back_and_no_stall(tmp_path: Path) -> None:
    """The real probe on this host, its clock stepped back 6 ms once (no VM involved)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    (tmp_path / "clock.c").write_text(FAKE_CLOCK)
    probe = tmp_path / "probe"
    subprocess.run([gcc, "-O2", "-pthread", "-Wall", "-Wextra", "-Werror",
                    "-Wl,--wrap=clock_gettime", "-o", str(probe), str(PROBE),
                    str(tmp_path / "clock.c")], check=True, capture_output=True, timeout=120)
    with subprocess.Popen(
            [str(probe), "--cmdline", "migrator.ws_mib=1 migrator.threads=1 migrator.hb_ms=1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        events = []
        # A probe that never reports the step must not hang the suite.
        deadline = threading.Timer(30, proc.kill)
        deadline.start()
        try:
            for text in proc.stdout:
                event = parse_line(text)
                events.append(event)
                # A probe that counts the step as a stall prints that instead.
                if isinstance(event, ClockStep) or (
                        isinstance(event, Stall) and event.gap_ns >= WRAPPED):
                    proc.stdin.write("verify\n")
                    proc.stdin.flush()
                elif isinstance(event, Verify):
                    proc.stdin.write("poweroff\n")
                    proc.stdin.close()
        finally:
            deadline.cancel()
            proc.kill()
    assert not [e for e in events if isinstance(e, Stall) and e.gap_ns >= WRAPPED]
    [step] = [e for e in events if isinstance(e, ClockStep)]
    assert 0 < step.back_ns <= 6_000_000
    [hist] = [e for e in events if isinstance(e, Hist)]
    assert hist.max_gap_ns < WRAPPED
    assert sum(hist.buckets) == hist.ops
