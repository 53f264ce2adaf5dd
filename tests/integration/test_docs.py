"""The guides whose ``$ `` commands need root and QEMU, run here as written (RUN_DIR: the
run just made). The guides that run on recorded runs alone are tests/unit/test_guide_commands.py.

Each test runs all of one guide's commands, found by ``guide_commands("GUIDE.md")``
(tests/unit/test_docs_text.py checks that every guide with commands has such a test).
"""

from __future__ import annotations

import json
import shlex
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
