"""Every ``$ `` command the guides show is run here, as written (RUN_DIR: the run just made).

Each test runs all of one guide's commands, found by ``guide_commands("GUIDE.md")``
(tests/unit/test_docs_text.py checks that every guide with commands has such a test).
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.guides import ROOT, guide_commands


def test_operator_guide_commands_work(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run_dir: Path | None = None
    commands = guide_commands("operator.md")
    assert commands
    for command in commands:
        argv = shlex.split(command)
        if argv[1] == "run":
            argv += ["--runs-dir", str(runs)]
        if "RUN_DIR" in argv:
            assert run_dir is not None, "a guide uses RUN_DIR before any run"
            argv = [str(run_dir) if a == "RUN_DIR" else a for a in argv]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        if argv[1] == "run":
            run_dir = next(runs.iterdir())
            assert json.loads((run_dir / "run.json").read_text())["outcome"] == "completed"
    assert run_dir is not None
    assert (run_dir / "report.html").exists()


def run_on_recorded_runs(commands: list[str], where: Path) -> list[str]:
    """Run ``commands`` in ``where``, whose runs/ holds the recorded run directories
    (tests/data/runs), as the nightly job runs them; their outputs."""
    runs = where / "runs"
    for run in sorted((ROOT / "tests" / "data" / "runs").iterdir()):
        if run.is_dir():
            shutil.copytree(run, runs / run.name)
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        argv[0] = str(ROOT / argv[0])
        # What the shell does with runs/* (subprocess runs no shell).
        argv = [arg for word in argv
                for arg in (sorted(glob.glob(word, root_dir=where)) if "*" in word else [word])]
        done = subprocess.run(argv, cwd=where, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, f"{command}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
        outputs.append(done.stdout)
    return outputs


def test_nightly_guide_commands_work(tmp_path: Path) -> None:
    """The nightly guide, run where runs/ holds the recorded run directories."""
    commands = guide_commands("nightly.md")
    assert [shlex.split(c)[1] for c in commands] == ["results", "compare", "dashboard"]
    outputs = run_on_recorded_runs(commands, tmp_path)
    assert outputs[0].count("added") == 3
    assert "insufficient data" in outputs[1]
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    assert len(list((site / "scenarios").glob("*.html"))) == 2
    # The recorded runs have no report.html: their pages come from the stored reports.
    assert len(list((site / "runs").glob("*.html"))) == 2
    prom = (site / "metrics.prom").read_text()
    # prometheus_client writes labels in name order; Prometheus does not care.
    assert any(line.startswith("migrator_freeze_seconds{") and 'scenario="rec-hugetlb-2m"' in line
               for line in prom.splitlines()), prom
    assert (tmp_path / "node-exporter" / "migrator.prom").read_text() == prom


def test_hosts_guide_commands_work_without_remote_hosts() -> None:
    commands = guide_commands("hosts.md")
    assert commands
    for command in commands:
        argv = shlex.split(command)
        # The guide's remote hosts are placeholders: only what never connects may be shown.
        assert argv[1:3] == ["config", "check"], command
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        assert 'kind = "ssh"' in done.stdout


def test_benchmark_guide_commands_work(tmp_path: Path) -> None:
    commands = guide_commands("benchmarks.md")
    assert commands
    for command in commands:
        # The guide writes under bench/ in the checkout; the test writes under tmp.
        argv = [str(tmp_path / a) if a.startswith("bench/") else a for a in shlex.split(command)]
        # A QEMU root missing yet is debootstrapped: as long as conftest's _qemu_root allows.
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                              check=False)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        if argv[0] == "scripts/make-qemu-root":
            assert "QEMU emulator version 11." in done.stdout + done.stderr, command
    table = (tmp_path / "bench" / "page-size" / "page-size.md").read_text()
    assert "not supported on these hosts" in table
    suite = json.loads((tmp_path / "bench" / "page-size" / "suite.json").read_text())
    assert suite


def test_results_guide_commands_work(tmp_path: Path) -> None:
    """The results guide, run where runs/ holds the recorded run directories."""
    commands = guide_commands("results.md")
    assert [shlex.split(c)[1:3] for c in commands] == [["results", "import"],
                                                        ["results", "list"]]
    imported, listed = run_on_recorded_runs(commands, tmp_path)
    assert imported.count("added") == 3
    assert (tmp_path / "results.sqlite").is_file()  # the default store
    assert "rec-hugetlb-2m" in listed
    assert "rec-hugetlb-1g" not in listed


def test_faults_guide_commands_work() -> None:
    """The fault matrix's row list (running its rows takes minutes; tests/integration/
    test_faults.py strikes a subset of them). The rows the guide names exist."""
    commands = guide_commands("faults.md")
    assert commands
    outputs = []
    for command in commands:
        done = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        outputs.append(done.stdout)
    rows = {line.split()[0] for line in "".join(outputs).splitlines() if line.strip()}
    named = set(re.findall(r"--only ([\w-]+)", (ROOT / "docs" / "faults.md").read_text()))
    assert named
    assert named <= rows, named - rows
