"""A small real suite through ``migrator bench``: 2 page sizes x preempt on/off, then --resume."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from migrator.metrics.summary import build_report
from tests.integration.children import run_migrator

# 512 MiB guests, post-copy 0.3 s after the start; migrator holds downtime-limit at 1 ms until
# the switch, so every run really is post-copy (a run that is not fails, exit 7).
SUITE = """
[suite]
name = "it-bench"
repetitions = 1

[base]
name = "it-bench"
vm = { memory_mib = 512, vcpus = 1, backing = "memfd-4k", accel = "auto" }
workload = { working_set_mib = 256, write_pct = 50, warmup_s = 0.5, settle_s = 0.5 }

[base.migration]
postcopy = true
timeout_s = 300
switchover = { policy = "after-seconds", seconds = 0.3 }

[[axes]]
field = "vm.backing"
values = ["memfd-4k", "hugetlb-2m"]

[[axes]]
field = "migration.preempt"
values = [false, true]
"""

IDS = [f"backing={backing},preempt={preempt},rep=1"
       for backing in ("memfd-4k", "hugetlb-2m") for preempt in ("false", "true")]


def migrator(*args: str) -> subprocess.CompletedProcess[str]:
    """A migrator command as a user (or the nightly job) runs it."""
    return run_migrator(args, timeout=600)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``migrator bench ...``."""
    return migrator("bench", *args)


def test_small_suite_runs_resumes_and_tabulates(tmp_path: Path) -> None:
    suite_file = tmp_path / "suite.toml"
    suite_file.write_text(SUITE)
    out = tmp_path / "out"

    first = bench(str(suite_file), "--out", str(out), "--html")
    state = json.loads((out / "suite.json").read_text())
    outcomes = {}
    for run_id, record in state["runs"].items():
        postcopy_bytes = None
        if record["run_dir"]:
            report = build_report(out / record["run_dir"])
            postcopy_bytes = report.transfer["ram.postcopy-bytes"].value
        outcomes[run_id] = (record["status"], record["error"], postcopy_bytes)
    # On failure this names each run's error and how much it sent post-copy.
    assert sorted(outcomes) == sorted(IDS), outcomes
    assert all(status == "done" for status, _, _ in outcomes.values()), outcomes
    assert first.returncode == 0, first.stderr[-3000:]
    assert all(sent is not None and sent > 0 for _, _, sent in outcomes.values()), outcomes
    run_dirs = sorted((out / "runs").iterdir())
    assert len(run_dirs) == 4
    for run_dir in run_dirs:
        assert (run_dir / "report.json").exists()
        assert (run_dir / "report.html").exists()
    assert "page-size table: suite it-bench" in first.stdout
    assert "suite it-bench: 4 done (of 4 selected)" in first.stdout

    second = bench(str(suite_file), "--out", str(out), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted((out / "runs").iterdir()) == run_dirs
    again = json.loads((out / "suite.json").read_text())
    assert {record["status"] for record in again["runs"].values()} == {"done"}
    assert all(record["attempts"] == 1 for record in again["runs"].values())
    assert again["runs"] == state["runs"]

    assert (out / "page-size.md").exists()
    rows = list(csv.DictReader((out / "page-size.csv").read_text().splitlines()))
    p50 = {(row["row"].split()[0] + row["row"].split()[1], row["preempt"]):
           float(row["fetch_p50_ms"]) for row in rows}
    assert set(p50) == {("4KiB", "false"), ("4KiB", "true"), ("2MiB", "false"),
                        ("2MiB", "true")}
    for preempt in ("false", "true"):
        assert p50[("4KiB", preempt)] < p50[("2MiB", preempt)], p50
    markdown = (out / "page-size.md").read_text()
    assert "| 4 KiB preempt=false | 1 |" in markdown

    # The suite's runs go on into the store, a comparison and the dashboard, as nightly does.
    store = out / "store.sqlite"
    imported = migrator("results", "import", "--db", str(store), *map(str, run_dirs))
    assert imported.returncode == 0, imported.stderr[-3000:]
    compared = migrator("compare", "--db", str(store), "preempt=false", "preempt=true",
                        "--json")
    # Two runs a side cannot reach p < 0.01: the verdicts must say so, and nothing regresses.
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "insufficient data" in compared.stdout
    site = out / "site"
    built = migrator("dashboard", "--db", str(store), "--out", str(site), "--runs-root",
                     str(out / "runs"))
    assert built.returncode == 0, built.stderr[-3000:]
    assert (site / "index.html").exists()
    assert "migrator_" in (site / "metrics.prom").read_text()
