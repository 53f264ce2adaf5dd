"""A hugepage shortfall: one clear line, exit 3, the pool given back, nothing started.

Every other bad input (scenario files, command lines, missing files) is a case of the
corpus in tests/data/bad/, run by test_bad_input.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from migrator.config import dump_scenario
from tests.integration.children import run_migrator
from tests.integration.conftest import one_error_line, scenario
from tests.integration.test_interrupt import qemu_processes_mentioning

POOL_1G = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")


def migrator(*args: str) -> subprocess.CompletedProcess[str]:
    return run_migrator(args, timeout=120)


def run_expecting_failure(tmp_path: Path, spec_file: Path) -> tuple[str, Path | None]:
    runs = tmp_path / "runs"
    done = migrator("run", str(spec_file), "--runs-dir", str(runs))
    assert done.returncode != 0
    error = one_error_line(done.stderr)
    run_dirs = list(runs.iterdir()) if runs.exists() else []
    return f"{done.returncode} {error}", (run_dirs[0] if run_dirs else None)


def write(tmp_path: Path, **sections: dict[str, object]) -> Path:
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(scenario("it-errors", **sections)))
    return spec


def assert_nothing_started(run_dir: Path | None) -> None:
    assert run_dir is not None
    assert qemu_processes_mentioning(run_dir.name) == []
    assert not (run_dir / "src" / "argv.json").exists()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "not-started"


def test_hugepage_shortfall_says_how_many(tmp_path: Path) -> None:
    before = POOL_1G.read_text()
    # 2 x 64 GiB of 1 GiB pages on a machine with far less memory.
    outcome, run_dir = run_expecting_failure(
        tmp_path, write(tmp_path, vm={"backing": "hugetlb-1g", "memory_mib": 65536}))
    assert outcome.startswith("3 error:")
    assert "needs 128 free hugepages of 1048576 kB: only " in outcome
    assert "hugepagesz=1G hugepages=128" in outcome
    assert POOL_1G.read_text() == before
    assert_nothing_started(run_dir)
