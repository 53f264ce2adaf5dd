"""The guides whose ``$ `` commands run without root or QEMU, run here as written: on the
recorded run directories (tests/data/runs), or commands that never connect to a host.

The guides that boot VMs are tests/integration/test_docs.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tests.guides import ROOT, guide_commands, run_on_recorded_runs


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
