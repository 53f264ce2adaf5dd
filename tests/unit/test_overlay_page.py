"""The overlay page of several runs: its data, its figures and `migrator report A B --html`.

Every run is a recorded run directory copied to tmp_path first (the command writes
report.json and report.html into each run it reads).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from migrator.cli.main import app
from migrator.errors import ArtifactError
from migrator.metrics.run_artifacts import RunArtifacts, load_run_artifacts
from migrator.metrics.run_overlay import dimensions, load_overlay_data
from migrator.metrics.run_page import guest_ram_block, load_run_page_data
from migrator.metrics.summary import derive_report
from migrator.model import Report
from migrator.pagedata import OverlayData
from migrator.report.overlay import default_overlay_path, render_overlay_html
from migrator.report.overlay_figures import (
    overlay_cdf_figures,
    overlay_stall_figure,
    overlay_thread_figure,
    overlay_transfer_figure,
    run_colour,
)
from tests.unit.html_pages import EXTERNAL, figures, values

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDED = {"2m": DATA / "runs" / "hugetlb-2m", "1g": DATA / "runs" / "hugetlb-1g",
            "crashed": DATA / "runs" / "crashed-memfd-4k",
            "threads": DATA / "threads" / "rec-threads-2m"}


def copy(name: str, tmp_path: Path, as_name: str | None = None) -> Path:
    """A recorded run copied under tmp_path (nothing is ever written into tests/data)."""
    return shutil.copytree(RECORDED[name], tmp_path / (as_name or name))


def overlaid(runs: list[tuple[RunArtifacts, Report]]) -> OverlayData:
    """The overlay data of ``runs``, with each run's page data built as the CLI does."""
    return load_overlay_data(runs, [load_run_page_data(a, r) for a, r in runs])


def derived(paths: list[Path]) -> list[tuple[RunArtifacts, Report]]:
    return [(artifacts, derive_report(artifacts))
            for artifacts in map(load_run_artifacts, paths)]


@pytest.fixture
def three(tmp_path: Path) -> OverlayData:
    """The 2 MiB, 1 GiB and thread-sampled runs, overlaid."""
    return overlaid(derived([copy(n, tmp_path) for n in ("2m", "1g", "threads")]))


def test_the_dimensions_that_differ_label_each_run(three: OverlayData) -> None:
    labels = [run.label for run in three.runs]
    # The backing first, then the QEMU version: what a comparison is usually about.
    assert labels[0].startswith("rec-hugetlb-2m · 20261125T183726Z-rec-hugetlb-2m-3cd3 · "
                                "vm.backing=hugetlb-2m · QEMU=7.2.22 · ")
    assert labels[1].startswith("rec-hugetlb-1g · 20261125T183731Z-rec-hugetlb-1g-5bf7 · "
                                "vm.backing=hugetlb-1g · QEMU=7.2.22 · ")
    assert "QEMU=10.0.2" in labels[2]
    assert labels[2].endswith("more")
    assert [run.differs["vm.memory_mib"] for run in three.runs] == ["256", "1024", "256"]
    assert [run.differs["vm.vcpus"] for run in three.runs] == ["1", "1", "2"]
    # Fields every run has alike are no dimension; a field some scenario.toml lacks is.
    assert "workload.write_pct" not in three.dimensions
    assert "name" not in three.dimensions
    assert [run.differs["collect.threads_hz"] for run in three.runs] == ["-", "-", "20.0"]


def test_repetitions_differ_in_nothing(tmp_path: Path) -> None:
    runs = derived([copy("2m", tmp_path, "a"), copy("2m", tmp_path, "b")])
    assert dimensions(runs) == {}
    data = overlaid(runs)
    assert [run.label for run in data.runs] == [
        "rec-hugetlb-2m · 20261125T183726Z-rec-hugetlb-2m-3cd3"] * 2


def test_each_run_is_aligned_at_its_switchover(three: OverlayData) -> None:
    for run in three.runs:
        freeze = next(p for p in run.page.report.phases if p.name == "freeze")
        assert run.zero_ns == freeze.start_ns
        assert run.zero_what == "switchover (src STOP)"
    figure = overlay_stall_figure(three)
    stalls = [t for t in figure.data if t.name.startswith("guest stalls")]
    assert len(stalls) == 3
    # The 1 GiB run's longest stall, placed on the overlay's axis: s since its src STOP.
    run = three.runs[1]
    longest = max((s for series in run.page.stalls.series
                   for s in zip(series.starts_ns, series.gaps_ms, strict=True)),
                  key=lambda s: s[1])
    index = int(np.argmax(stalls[1].y))
    assert stalls[1].y[index] == pytest.approx(longest[1])
    assert stalls[1].x[index] == pytest.approx((longest[0] - run.zero_ns) / 1e9)
    # One colour per run, the same in every figure.
    assert {trace.marker.color for trace in stalls} == {run_colour(i) for i in range(3)}
    assert stalls[1].legendgrouptitle.text == run.label


def test_a_run_that_never_switched_is_aligned_at_migrate(tmp_path: Path) -> None:
    run = copy("2m", tmp_path)
    events = [line for line in (run / "src" / "events.jsonl").read_text().splitlines()
              if '"STOP"' not in line]
    (run / "src" / "events.jsonl").write_text("\n".join(events) + "\n")
    data = overlaid(derived([run, copy("1g", tmp_path)]))
    first = data.runs[0]
    assert first.zero_what == "migrate (the run never switched over)"
    assert first.shift_s == 0.0


def test_a_run_that_never_migrated_has_nothing_to_overlay(tmp_path: Path) -> None:
    never = tmp_path / "never"
    never.mkdir()
    for name in ("run.json", "scenario.toml"):
        shutil.copy(RECORDED["2m"] / name, never / name)
    with pytest.raises(ArtifactError, match=rf"^{never}: nothing to overlay: the run never "
                                            r"started migrating \(outcome not-started"):
        overlaid(derived([copy("2m", tmp_path), never]))


def test_headline_numbers_are_each_reports_own(three: OverlayData) -> None:
    rows = {row.name: row for row in three.headline}
    reports = [run.page.report for run in three.runs]
    freeze = rows["freeze (src STOP → dst RESUME)"]
    assert [m and m.value for m in freeze.metrics] == [
        r.freeze.freeze.value if r.freeze else None for r in reports]
    assert freeze.unit == "ms"
    assert rows["total time"].metrics == [r.timings["total-time"] for r in reports]
    p99 = rows["fetch p99 (guest RAM block)"]
    for metric, report in zip(p99.metrics, reports, strict=True):
        block = guest_ram_block(report, None)
        assert block is not None
        assert metric == block.latency_ms["p99"]
    assert [m and m.value for m in rows["faults on the guest RAM block"].metrics] == [15, 1, 14]
    stall = rows["guest stall p99 (worst vCPU)"]
    assert all(m is not None and m.unit == "ms" and "guest probe" in m.source
               for m in stall.metrics)


def test_a_run_without_a_trace_has_no_fetch_numbers(tmp_path: Path) -> None:
    data = overlaid(derived([copy("2m", tmp_path), copy("crashed", tmp_path)]))
    rows = {row.name: row for row in data.headline}
    p50 = rows["fetch p50 (guest RAM block)"].metrics
    assert p50[0] is not None
    assert p50[1] is None
    html = render_overlay_html(data, tmp_path)
    assert "failed-after-switchover" in html


def test_one_cdf_per_page_size_holds_every_run_of_that_size(three: OverlayData) -> None:
    figs = dict(overlay_cdf_figures(three))
    assert sorted(figs) == [2 << 20, 1 << 30]
    two = figs[2 << 20]
    assert [trace.name.split(" · ")[1] for trace in two.data] == [
        "20261125T183726Z-rec-hugetlb-2m-3cd3", "20261205T234958Z-rec-threads-2m-60a9"]
    assert [trace.line.color for trace in two.data] == [run_colour(0), run_colour(2)]
    assert two.data[0].name.endswith("ram0 · 15 faults")
    assert list(two.data[0].y)[-1] == 1.0
    assert two.layout.xaxis.type == "log"
    [one_gig] = figs[1 << 30].data
    assert one_gig.x[-1] == pytest.approx(1008.807, abs=1e-3)


def test_runs_without_fetch_latencies_get_one_empty_cdf_that_says_so(tmp_path: Path) -> None:
    data = overlaid(derived([copy("crashed", tmp_path, "a"),
                                      copy("crashed", tmp_path, "b")]))
    [(size, figure)] = list(overlay_cdf_figures(data))
    assert size == 0
    assert figure.data == ()
    assert "no run has fetch latencies" in figure.layout.annotations[0].text
    assert "plot-fetch-cdf" in figures(render_overlay_html(data, tmp_path))


def test_throughput_is_shifted_with_its_run(three: OverlayData) -> None:
    figure = overlay_transfer_figure(three)
    rates = [t for t in figure.data if t.name == "source: Δ ram.transferred / Δt"]
    assert len(rates) == 3
    run = three.runs[2]
    samples = run.page.samples["src"]
    assert rates[2].x[0] == pytest.approx((samples.t_s[0] + samples.t_s[1]) / 2 + run.shift_s)
    mib = (samples.transferred[1] - samples.transferred[0]) / (1 << 20)
    assert rates[2].y[0] == pytest.approx(mib / (samples.t_s[1] - samples.t_s[0]))


def test_thread_cpu_of_the_runs_that_sampled_it(three: OverlayData) -> None:
    run = three.runs[2]
    kinds = [(load.side, load.thread) for load in run.threads]
    assert kinds == [("src", "migration"), ("src", "vCPUs"), ("dst", "post-copy fault"),
                     ("dst", "vCPUs")]
    vcpus = run.threads[1]
    per_vcpu = [load for load in run.page.threads
                if load.side == "src" and load.thread.startswith("vCPU ")]
    assert vcpus.threads == len(per_vcpu) == 2
    assert list(vcpus.percent) == pytest.approx(list(np.sum([v.percent for v in per_vcpu],
                                                            axis=0)))
    figure = overlay_thread_figure(three)
    assert [t.name for t in figure.data] == [
        "src: migration", "src: vCPUs (2 threads, summed)", "dst: post-copy fault",
        "dst: vCPUs (2 threads, summed)"]
    assert figure.data[0].x[0] == pytest.approx(run.page.threads[0].t_s[0] + run.shift_s)
    notes = " ".join(a.text for a in figure.layout.annotations)
    assert "no thread samples (recorded before thread sampling?): " \
           "20261125T183726Z-rec-hugetlb-2m-3cd3, 20261125T183731Z-rec-hugetlb-1g-5bf7" in notes


def test_page_is_self_contained_and_cites_every_number(three: OverlayData,
                                                       tmp_path: Path) -> None:
    html = render_overlay_html(three, tmp_path)
    assert html.startswith("<!DOCTYPE html>")
    assert html.count("* plotly.js v") == 1
    assert EXTERNAL.search(html) is None
    assert set(figures(html)) == {"plot-fetch-cdf-2097152", "plot-fetch-cdf-1073741824",
                                  "plot-stall-overlay", "plot-transfer-overlay",
                                  "plot-threads-overlay"}
    for text in ("What differs between the runs", "Headline numbers side by side",
                 "#1 20261125T183726Z-rec-hugetlb-2m-3cd3", "1,436.122",
                 "src STOP -&gt; dst RESUME, QMP event timestamps",
                 "QEMU query-migrate after completion (src)", "switchover (src STOP)"):
        assert text in html, text
    # No run has a report.html yet: no links.
    assert "report.html</a>" not in html
    cdf = figures(html)["plot-fetch-cdf-2097152"]
    assert values(cdf["data"][0]["y"])[-1] == 1.0


def test_default_page_name_is_in_the_current_directory() -> None:
    from datetime import UTC, datetime

    when = datetime(2026, 12, 5, 23, 58, 15, tzinfo=UTC)
    assert default_overlay_path(when) == Path("migrator-compare-20261205T235815Z.html")


# The command.

def run_report(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["report", *args])
    return result.exit_code, result.stdout, result.stderr


def test_report_of_two_runs_writes_both_reports_their_pages_and_the_overlay(
        tmp_path: Path) -> None:
    a, b = copy("2m", tmp_path), copy("threads", tmp_path)
    page = tmp_path / "pages" / "both.html"
    page.parent.mkdir()
    code, stdout, stderr = run_report(str(a), str(b), "--html", "--out", str(page))
    assert code == 0, stderr
    for run in (a, b):
        assert (run / "report.json").exists()
        assert (run / "report.html").exists()
    assert f"overlay page: {page}" in stderr
    assert stdout.count("Per-page fetch latency") == 2
    html = page.read_text()
    # Each run's own page, linked relative to the overlay page.
    assert '<a href="../2m/report.html">' in html
    assert '<a href="../threads/report.html">' in html
    assert list(page.parent.iterdir()) == [page]


def test_report_of_two_runs_prints_a_json_array(tmp_path: Path) -> None:
    a, b = copy("2m", tmp_path), copy("1g", tmp_path)
    code, stdout, stderr = run_report(str(a), str(b), "--json")
    assert code == 0, stderr
    reports = json.loads(stdout)
    assert [r["run_id"] for r in reports] == ["20261125T183726Z-rec-hugetlb-2m-3cd3",
                                              "20261125T183731Z-rec-hugetlb-1g-5bf7"]
    # One run: the report itself, as before.
    code, stdout, _ = run_report(str(a), "--json")
    assert json.loads(stdout)["run_id"] == "20261125T183726Z-rec-hugetlb-2m-3cd3"


def test_the_default_overlay_page_goes_to_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = copy("2m", tmp_path), copy("1g", tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, stderr = run_report(str(a), str(b), "--html")
    assert code == 0, stderr
    [page] = work.iterdir()
    assert page.name.startswith("migrator-compare-")
    assert f"overlay page: {page.name}" in stderr


@pytest.mark.parametrize("case", ["not a run", "never migrated", "missing", "twice",
                                  "--out without --html", "--out in no directory"])
def test_bad_input_names_the_dir_exits_2_and_writes_nothing(case: str, tmp_path: Path) -> None:
    good = copy("2m", tmp_path)
    other = tmp_path / "other"
    out: list[str] = []
    if case == "not a run":
        other.mkdir()
        expected = f"error: {other}/run.json: missing; is this a migrator run directory?"
    elif case == "never migrated":
        other.mkdir()
        for name in ("run.json", "scenario.toml"):
            shutil.copy(RECORDED["2m"] / name, other / name)
        expected = f"error: {other}: nothing to overlay: the run never started migrating"
    elif case == "missing":
        expected = f"error: {other}: no such directory"
    elif case == "twice":
        other = good
        expected = f"error: {good}: given twice: each run directory once"
    elif case == "--out without --html":
        other = copy("1g", tmp_path)
        out = ["--out", str(tmp_path / "x.html")]
        expected = "error: --out: the overlay page needs --html and two or more run directories"
    else:
        other = copy("1g", tmp_path)
        out = ["--html", "--out", str(tmp_path / "nowhere" / "x.html")]
        expected = f"error: --out {tmp_path}/nowhere/x.html: no such directory"
    before = sorted(p for p in tmp_path.rglob("*"))
    if not out:
        out = ["--html", "--out", str(tmp_path / "x.html")]
    code, _, stderr = run_report(str(good), str(other), *out)
    assert code == 2
    assert stderr.startswith(expected), stderr
    assert len(stderr.strip().splitlines()) == 1
    assert "Traceback" not in stderr
    # Nothing written: no report.json, no report.html, no overlay page.
    assert sorted(p for p in tmp_path.rglob("*")) == before
