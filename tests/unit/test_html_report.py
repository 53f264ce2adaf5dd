"""The HTML run report, rendered from the recorded run directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from migrator.metrics.guest import load_guest
from migrator.metrics.run_artifacts import load_run_artifacts
from migrator.metrics.run_page import fetch_cdfs, load_run_page_data
from migrator.metrics.summary import build_report, derive_report, write_report
from migrator.report.figures import MAX_POINTS, blocktime_figure, fetch_cdf_figure, largest_indices
from migrator.report.html import render_run_html, write_run_html
from tests.unit.html_pages import EXTERNAL, figures, values

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
THREADS_RUN = Path(__file__).resolve().parents[1] / "data" / "threads" / "rec-threads-2m"
PLOT_IDS = ("plot-fetch-cdf", "plot-stall-timeline", "plot-transfer", "plot-blocktime",
            "plot-threads")
def run_page(run: Path) -> str:
    """The HTML page of the run directory ``run``."""
    return render_run_html(load_run_page_data(load_run_artifacts(run)))


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    """Each recorded run rendered once (reading only; nothing is written into tests/data)."""
    return {run: run_page(RUNS / run)
            for run in ("hugetlb-2m", "hugetlb-1g", "crashed-memfd-4k")}


@pytest.mark.parametrize("run", ["hugetlb-2m", "hugetlb-1g", "crashed-memfd-4k"])
def test_page_is_one_self_contained_file_with_five_plots(pages: dict[str, str], run: str) -> None:
    html = pages[run]
    assert html.startswith("<!DOCTYPE html>")
    for div in PLOT_IDS:
        assert f'<div id="{div}" class="plot plotly-graph-div"></div>' in html
    assert set(figures(html)) == set(PLOT_IDS)
    # plotly.js inline, exactly once; no script or stylesheet from anywhere else.
    assert html.count("* plotly.js v") == 1
    assert EXTERNAL.search(html) is None, EXTERNAL.search(html)
    assert "<script src" not in html
    size = len(html.encode())
    assert size < 5 << 20, f"{size} bytes"
    # Everything but plotly.js is the run's own content: keep it small too.
    assert size - html.index("</head>") < 4_900_000
    plotly_end = html.index("</script>", html.index("* plotly.js v"))
    assert size - plotly_end < 400_000


def test_every_plot_number_comes_from_the_run(pages: dict[str, str]) -> None:
    run = RUNS / "hugetlb-2m"
    report = build_report(run)
    figs = figures(pages["hugetlb-2m"])

    cdf = figs["plot-fetch-cdf"]["data"]
    assert [t["name"] for t in cdf] == ["ram0 · 2 MiB pages · 15 faults"]
    fractions = values(cdf[0]["y"])
    assert fractions[0] == 0
    assert fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    latency_ms = values(cdf[0]["x"])
    ram0 = report.fetch[0]
    assert latency_ms[0] == pytest.approx(ram0.histogram["min"] / 1e6)
    assert latency_ms[-1] == pytest.approx(ram0.latency_ms["max"].value)
    assert figs["plot-fetch-cdf"]["layout"]["xaxis"]["type"] == "log"

    timeline = figs["plot-stall-timeline"]
    guest = load_guest(run)
    stalls = next(t for t in timeline["data"] if t["name"].startswith("vCPU 0"))
    placed = [s for s in guest.stalls if s.host_start_ns is not None]
    assert len(values(stalls["y"])) == len(placed)
    assert max(values(stalls["y"])) == pytest.approx(max(s.gap_ns for s in placed) / 1e6)
    gaps = next(t for t in timeline["data"] if t["name"].startswith("outside view"))
    assert report.outside_stalls is not None
    # The same cut as report.json's count of gaps over period + threshold.
    assert len(values(gaps["y"])) == report.outside_stalls.gaps_over_threshold
    assert max(values(gaps["y"])) == pytest.approx(report.outside_stalls.max_gap.value)
    assert timeline["layout"]["yaxis"]["type"] == "log"
    shapes = [s for s in timeline["layout"]["shapes"] if s["type"] == "rect"]
    assert len(shapes) == len(report.phases)
    freeze = next(s for s in shapes if s["name"] == "freeze")
    assert (freeze["x1"] - freeze["x0"]) * 1e3 == pytest.approx(15.932, abs=1e-3)

    transfer = figs["plot-transfer"]
    names = [t["name"] for t in transfer["data"]]
    assert names[:2] == ["source: ram.remaining", "source: Δ ram.transferred / Δt"]
    assert not any(n.startswith("destination") for n in names)
    notes = " ".join(a["text"] for a in transfer["layout"]["annotations"])
    assert "dst: 10 query-migrate replies, none with ram statistics" in notes
    remaining = []
    for line in (run / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["side"] == "src" and "ram" in record["reply"]:
            remaining.append(record["reply"]["ram"]["remaining"] / (1 << 20))
    assert values(transfer["data"][0]["y"]) == pytest.approx(remaining)

    bars = {t["name"].split(" (")[0]: values(t["y"]) for t in figs["plot-blocktime"]["data"]}
    assert bars["QEMU postcopy-vcpu-blocktime"] == [325.0]
    assert bars["trace: blocktime begin → placed"] == pytest.approx([460.413])


def test_thread_plot_integrates_to_the_thread_cpu_table() -> None:
    figs = figures(run_page(THREADS_RUN))
    threads = figs["plot-threads"]
    report = build_report(THREADS_RUN)
    lines = {t["name"]: t for t in threads["data"]}
    assert {"src: vCPU 0", "src: vCPU 1", "src: migration", "dst: vCPU 0", "dst: vCPU 1",
            "dst: post-copy fault"} <= set(lines)
    # Shown at first: the vCPUs, the migration and fault threads; the others a click away.
    hidden = {name for name, t in lines.items() if t.get("visible") == "legendonly"}
    assert "src: return path" in hidden
    assert not hidden & {"src: vCPU 0", "src: migration", "dst: post-copy fault"}
    # The same ticks as the table's: % of one core over each interval sums to its CPU s.
    raw = [json.loads(line) for line in (THREADS_RUN / "src" / "threads.jsonl").open()]
    times = np.array([r["host_ns"] for r in raw[1:]]) / 1e9
    migration = lines["src: migration"]
    cpu_s = float(np.sum(np.array(values(migration["y"])) / 100 * np.diff(times)))
    [row] = [r for r in report.thread_cpu if (r.side, r.thread) == ("src", "migration")]
    assert cpu_s == pytest.approx(row.sampled.value, abs=0.005)
    assert row.sampled.value is not None
    assert row.sampled.value > 0
    # x: the middle of each interval, on the page's clock (s since migrate).
    timeline = map(json.loads, (THREADS_RUN / "timeline.jsonl").open())
    migrate = next(r["host_ns"] for r in timeline if r["what"] == "migrate")
    x = values(migration["x"])
    # (in integers first: epoch ns overflow a float's mantissa)
    first = (raw[1]["host_ns"] - migrate + raw[2]["host_ns"] - migrate) / 2e9
    assert x[0] == pytest.approx(first, abs=1e-6)
    # The switchover: the source's STOP, the start of the freeze phase.
    freeze = next(p for p in report.phases if p.name == "freeze")
    [line] = [s for s in threads["layout"]["shapes"] if s["type"] == "line"]
    assert line["x0"] == pytest.approx((freeze.start_ns - migrate) / 1e9)
    notes = " ".join(a["text"] for a in threads["layout"]["annotations"])
    assert "src: resolution 20 % of one core" in notes
    assert "% of one core" in threads["layout"]["title"]["text"]


def test_a_run_without_thread_samples_says_so(pages: dict[str, str]) -> None:
    threads = figures(pages["hugetlb-2m"])["plot-threads"]
    assert threads["data"] == []
    notes = " ".join(a["text"] for a in threads["layout"]["annotations"])
    assert "src: no src/threads.jsonl with two samples or more" in notes
    assert "dst: no dst/threads.jsonl" in notes


def test_tables_carry_units_sources_scenario_and_host_facts(pages: dict[str, str]) -> None:
    html = pages["hugetlb-1g"]
    scenario = (RUNS / "hugetlb-1g" / "scenario.toml").read_text()
    assert 'backing = &#34;hugetlb-1g&#34;' in html
    assert scenario.splitlines()[0].replace('"', "&#34;") in html
    for text in ("freeze (src STOP → dst RESUME)", "1,436.122", "QEMU downtime",
                 "VM stopped during switchover", "qemu.destination.version", "7.2.22",
                 "Debian 1:7.2+dfsg-7+deb12u18+b3", "controller.kernel", "accel.reason",
                 "src STOP -&gt; dst RESUME, QMP event timestamps (QEMU, host wall clock)",
                 "<th>backlog p50 (placements)</th><th>backlog max (placements)</th>",
                 "dst QEMU trace: placements between postcopy_ram_fault_thread_request"):
        assert text in html, text
    crashed = pages["crashed-memfd-4k"]
    assert "no fetch latencies" in crashed
    assert 'class="badge bad">failed-after-switchover' in crashed
    assert "dirty-sync passes" in crashed  # the report's warning


def test_text_from_the_run_is_escaped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    meta = json.loads((run / "run.json").read_text())
    meta["scenario"] = "</script><script>alert(1)</script>"
    (run / "run.json").write_text(json.dumps(meta))
    html = run_page(run)
    assert "<script>alert(1)" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in html


def test_report_json_is_used_when_current_and_rebuilt_when_not(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    page = run_page(run)
    assert "no report.json: derived again from the raw artifacts" in page
    write_report(run, build_report(run))
    assert "numbers from report.json</div>" in run_page(run)
    stale = json.loads((run / "report.json").read_text())
    stale["schema_version"] = 0
    (run / "report.json").write_text(json.dumps(stale))
    page = run_page(run)
    assert "report.json has schema 0, not 1: derived again" in page


def test_replies_without_a_time_count_in_the_transfer_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    with (run / "samples.jsonl").open("a") as samples:
        samples.write(json.dumps({"side": "dst", "reply": {"status": "active"}}) + "\n")
    transfer = figures(run_page(run))["plot-transfer"]
    notes = " ".join(a["text"] for a in transfer["layout"]["annotations"])
    assert "dst: 11 query-migrate replies, none with ram statistics" in notes


def test_the_page_reads_nothing_the_artifacts_hold(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    artifacts = load_run_artifacts(run)
    report = derive_report(artifacts)
    page = render_run_html(load_run_page_data(artifacts, report))
    write_report(run, report)
    assert page == run_page(run)
    shutil.rmtree(run)
    assert render_run_html(load_run_page_data(artifacts, report)) == page


def test_write_run_html_writes_report_html_atomically(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-1g", run)
    before = set(run.iterdir())
    target = write_run_html(run, load_run_page_data(load_run_artifacts(run)))
    assert target == run / "report.html"
    assert set(run.iterdir()) - before == {target}  # no temporary file left behind
    assert target.read_text() == run_page(run)


def test_long_series_keep_their_largest_points() -> None:
    data = np.arange(MAX_POINTS + 500, dtype=np.float64)[::-1].copy()
    keep = largest_indices(data)
    assert keep.size == MAX_POINTS
    assert list(keep) == sorted(keep)
    assert data[keep].min() == 500
    assert largest_indices(data[:10]).tolist() == list(range(10))


def test_qemu_latency_dist_and_several_vcpus_are_plotted() -> None:
    report = build_report(RUNS / "hugetlb-2m")
    counts = [0] * 10 + [3, 5, 0, 2]  # QEMU 11.1: bucket k = [2^k, 2^(k+1)) us
    blocktime = dict(report.blocktime)
    blocktime["postcopy-vcpu-blocktime[1]"] = blocktime["postcopy-vcpu-blocktime[0]"]
    report = report.model_copy(update={
        "qemu_latency_dist": {"unit": "us", "source": "QEMU", "counts": counts},
        "blocktime": blocktime,
    })
    cdf = fetch_cdf_figure(report, fetch_cdfs(report))
    qemu = cdf.data[-1]
    assert qemu.name.startswith("QEMU postcopy-latency-dist")
    assert list(qemu.y)[-1] == 1.0
    assert list(qemu.x)[10] == pytest.approx(2**11 / 1e3)
    bars = blocktime_figure(report)
    assert list(bars.data[0].x) == ["vCPU 0", "vCPU 1"]
    assert list(bars.data[0].y) == [325.0, 325.0]
    assert list(bars.data[1].y) == pytest.approx([460.413, None])
