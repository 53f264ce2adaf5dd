"""``migrator bench --parallel 2``: real migrations side by side in one controller process.

Three small TCG runs (256 MiB, memfd and 2 MiB hugetlb) on this machine: two go at
once, the third when a slot frees.  Every result is stored in suite order, the runs'
own timelines show they overlapped, and nothing is left behind, after a full suite as
after a Ctrl-C that catches two runs at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.integration.children import migrator_child, run_migrator
from tests.integration.mid_postcopy import wait_for
from tests.integration.qemu_leftovers import POOL, assert_released, qemu_processes_mentioning

SUITE = """
[suite]
name = "it-parallel"

[base]
vm = { memory_mib = 256, vcpus = 1, backing = "memfd-4k", accel = "auto" }
workload = { working_set_mib = 128, write_pct = 50, warmup_s = 0.5, settle_s = 0.5 }

[base.migration]
postcopy = true
timeout_s = 300
switchover = { policy = "after-seconds", seconds = 0.3 }

[[axes]]
name = "backing"
[axes.values]
4k = { "vm.backing" = "memfd-4k" }
2m = { "vm.backing" = "hugetlb-2m" }
2m-preempt = { "vm.backing" = "hugetlb-2m", "migration.preempt" = true }
"""

IDS = ["backing=4k,rep=1", "backing=2m,rep=1", "backing=2m-preempt,rep=1"]
CLAIMS = Path("/run/migrator/hugepages/claims")


def marks(run_dir: Path) -> dict[str, int]:
    """The first time of each timeline mark of a run, host ns."""
    found: dict[str, int] = {}
    for line in (run_dir / "timeline.jsonl").read_text().splitlines():
        record = json.loads(line)
        found.setdefault(record["what"], record["host_ns"])
    return found


def claims() -> list[Path]:
    return sorted(CLAIMS.glob("*")) if CLAIMS.exists() else []


def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(SUITE)
    return path


def test_two_runs_at_once_store_every_result_in_order_and_leave_nothing(tmp_path: Path) -> None:
    pool_before = POOL.read_text()
    out = tmp_path / "out"
    done = run_migrator(["bench", str(suite_file(tmp_path)), "--out", str(out),
                         "--parallel", "2"], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "suite it-parallel: 3 done (of 3 selected)" in done.stdout
    state = json.loads((out / "suite.json").read_text())
    assert list(state["runs"]) == IDS  # suite order, whatever order they finished in
    assert [record["status"] for record in state["runs"].values()] == ["done"] * 3
    run_dirs = [out / record["run_dir"] for record in state["runs"].values()]
    for run_dir in run_dirs:
        assert (run_dir / "report.json").exists()
        assert_released(run_dir, pool_before)
    assert claims() == []
    # The first two ran side by side: both guests were up before either run ended.
    first, second, third = (marks(run_dir) for run_dir in run_dirs)
    assert max(first["guest-ready"], second["guest-ready"]) < min(first["cleaned-up"],
                                                                  second["cleaned-up"])
    # The third took the slot the first to end left.
    assert third["preflight"] >= min(first["cleaned-up"], second["cleaned-up"])
    log = (out / "bench.log").read_text()
    assert all(f"[{run_id}]" in log for run_id in IDS)


def test_ctrl_c_stops_both_runs_and_leaves_nothing(tmp_path: Path) -> None:
    pool_before = POOL.read_text()
    out = tmp_path / "out"
    with migrator_child(["bench", str(suite_file(tmp_path)), "--out", str(out),
                         "--parallel", "2"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE) as child:
        def both_guests_up() -> bool:
            runs = out / "runs"
            return runs.exists() and sum(
                "guest-ready" in marks(run) for run in runs.iterdir()
                if (run / "timeline.jsonl").exists()) == 2

        wait_for(both_guests_up, 120, "both runs' guests")
        run_dirs = sorted((out / "runs").iterdir())
        assert [len(qemu_processes_mentioning(run.name)) for run in run_dirs] == [2, 2]
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.count("interrupted: torn down cleanly") == 2, stderr
    assert "runs backing=4k,rep=1; backing=2m,rep=1 are recorded as failed" in stderr
    for run_dir in run_dirs:
        assert_released(run_dir, pool_before)
        assert json.loads((run_dir / "run.json").read_text())["teardown"] == {
            "clean": True, "problems": []}
    assert claims() == []
    state = json.loads((out / "suite.json").read_text())
    assert {run_id: (r["status"], r["error"]) for run_id, r in state["runs"].items()} == {
        IDS[0]: ("failed", "interrupted"), IDS[1]: ("failed", "interrupted"),
        IDS[2]: ("pending", None)}
