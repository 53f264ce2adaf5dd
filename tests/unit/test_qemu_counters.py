"""QEMU's own counters, read from real query-migrate replies of QEMU 7.2 and 11.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from migrator.metrics.qemu_counters import LAST_SAMPLE, load_counters, read_samples
from migrator.metrics.summary import build_report
from migrator.model import Metric, Report
from migrator.report.run_tables import comparison_table, headline_tables
from migrator.report.sources import Sources
from tests.unit.rendering import terminal_text

DATA = Path(__file__).resolve().parents[1] / "data"
RUNS = DATA / "runs"


def final_replies(version: str, backing: str) -> dict[str, dict[str, object]]:
    """The last query-migrate reply of each side in a recorded run (after completion)."""
    last: dict[str, dict[str, object]] = {}
    for line in (DATA / f"qemu-{version}" / backing / "query-migrate.jsonl").open():
        record = json.loads(line)
        last[record["side"]] = record["return"]
    return last


@pytest.fixture
def run_with_11_1_counters(tmp_path: Path) -> Path:
    """A recorded run dir whose final replies are swapped for real QEMU 11.1 ones."""
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    (run / "final-query-migrate.json").write_text(json.dumps(final_replies("11.1",
                                                                          "hugetlbfs-2m")))
    return run


def test_qemu_11_1_latency_fields_reach_the_report(run_with_11_1_counters: Path) -> None:
    report = build_report(run_with_11_1_counters)
    latency = report.qemu_latency["postcopy-latency"]
    assert latency.unit == "ms"
    assert latency.value == pytest.approx(5.107942)
    assert report.qemu_latency["postcopy-vcpu-latency[0]"].value == pytest.approx(5.1079)
    assert report.qemu_latency_dist is not None
    assert sum(report.qemu_latency_dist["counts"]) == 254
    assert report.blocktime["postcopy-blocktime (all vCPUs)"].value == 1600
    quantities = {c.quantity for c in report.comparisons}
    assert "mean fetch latency" in quantities


def test_qemu_7_2_has_no_latency_fields() -> None:
    report = build_report(RUNS / "hugetlb-2m")
    assert report.qemu_latency == {}
    assert report.qemu_latency_dist is None


def test_last_samples_stand_in_when_the_run_died(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    (run / "final-query-migrate.json").unlink()
    counters = load_counters(run)
    assert counters.origin == LAST_SAMPLE
    assert counters.metric("src", "ram.transferred", "bytes").value is not None
    assert counters.metric("src", "no.such.field", "x").value is None


def with_final(tmp_path: Path, side: str, path: str, value: int) -> Path:
    """A copy of the recorded 1 GiB run whose final query-migrate says ``value`` for ``path``."""
    run = shutil.copytree(RUNS / "hugetlb-1g", tmp_path / "run")
    final = json.loads((run / "final-query-migrate.json").read_text())
    *parents, name = path.split(".")
    node = final[side]
    for key in parents:
        node = node[key]
    node[name] = value
    (run / "final-query-migrate.json").write_text(json.dumps(final))
    return run


SAMPLED_SRC = "QEMU query-migrate, highest earlier sample (samples.jsonl, src)"


def test_a_final_counter_below_an_earlier_sample_is_contradicted(tmp_path: Path) -> None:
    # As after a real after-passes run: total-time 0 after completion, while the last
    # sample (samples.jsonl, src) said 4,500 ms here.
    run = with_final(tmp_path, "src", "total-time", 0)
    clean = build_report(RUNS / "hugetlb-1g")
    report = build_report(run)

    total = report.timings["total-time"]
    assert (total.value, total.unit) == (0, "ms")  # QEMU's value is kept...
    assert total.source == "QEMU query-migrate after completion (src)"
    # ... beside the sample that contradicts it.
    assert total.contradicted_by == Metric(value=4500, unit="ms", source=SAMPLED_SRC)
    assert all(m.contradicted_by is None for name, m in report.timings.items()
               if name != "total-time")
    assert all(m.contradicted_by is None for m in report.transfer.values())

    assert [w for w in report.warnings if w not in clean.warnings] == [
        "QEMU src total-time contradicted: QEMU query-migrate after completion "
        "(final-query-migrate.json, src) says 0 ms, but the last sample (samples.jsonl, src) "
        "said 4,500 ms; a cumulative counter cannot go down, so QEMU's final value is shown "
        "marked as contradicted"]

    row = next(line for line in terminal_text(report).splitlines()
               if line.lstrip().startswith("total-time"))
    assert "0 ⚠ contradicted: 4,500 ms" in row
    cells = [c for t in headline_tables(report, Sources()) for r in t.rows for c in r]
    assert any(c.text == "0 ⚠ contradicted: 4,500 ms" and SAMPLED_SRC in c.title
               for c in cells)
    # report.json keeps the mark; metrics without one are written as before.
    assert Report.model_validate_json(report.model_dump_json()) == report
    assert "contradicted_by" not in report.timings["setup-time"].model_dump_json()


def test_a_contradicted_counter_is_marked_in_its_comparison(tmp_path: Path) -> None:
    report = build_report(with_final(tmp_path, "src", "ram.postcopy-requests", 0))
    assert report.transfer["ram.postcopy-requests"].contradicted_by == Metric(
        value=1, unit="requests", source=SAMPLED_SRC)
    compared = {c.quantity: c for c in report.comparisons}["post-copy page requests"]
    assert compared.a.value == 0
    assert compared.a.contradicted_by is not None
    assert any("ram.postcopy-requests contradicted" in w and "says 0 requests" in w
               and "said 1 requests" in w for w in report.warnings)
    [cell] = [r[1] for r in comparison_table(report, Sources()).rows
              if r[0].text == "post-copy page requests"]
    assert cell.text == "0 requests ⚠ contradicted: 1 requests"
    assert "post-copy page requests" in terminal_text(report)


@pytest.mark.parametrize("run", ["hugetlb-1g", "hugetlb-2m", "crashed-memfd-4k"])
def test_recorded_final_counters_agree_with_their_samples(run: str) -> None:
    counters = load_counters(RUNS / run)
    assert counters.contradictions == {}
    assert counters.warnings == []


def test_read_samples_keeps_timed_replies_in_file_order_and_counts_the_others(
        tmp_path: Path) -> None:
    ram = {"ram": {"remaining": 5, "transferred": 7}}
    records = [
        {"side": "src", "reply_ns": 30, "host_ns": 20, "reply": ram},
        {"side": "src", "host_ns": 10, "reply": {"status": "active"}},  # an older run
        {"side": "dst", "reply": {"status": "active"}},  # no time at all
        {"side": "dst", "reply_ns": 40, "reply": "not a reply"},
        {"side": "elsewhere", "reply_ns": 50, "reply": ram},
    ]
    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in records) + '{"side": "src", "rep')
    samples = read_samples(tmp_path)
    assert samples.timed == {"src": [(30, ram), (10, {"status": "active"})], "dst": []}
    assert samples.untimed == {"src": 0, "dst": 1}
    assert (samples.replies("src"), samples.replies("dst")) == (2, 1)
    assert load_counters(tmp_path, samples) == load_counters(tmp_path)
