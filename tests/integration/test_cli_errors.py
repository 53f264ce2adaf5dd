"""A hugepage shortfall: one clear line, exit 3, the pool given back, nothing started.

Every other bad input (scenario files, command lines, missing files) is a case of the
corpus in tests/data/bad/, run by test_bad_input.py.
"""

from __future__ import annotations

from pathlib import Path

from migrator.config import dump_scenario
from tests.integration.conftest import scenario
from tests.integration.refused_runs import assert_nothing_started, run_expecting_failure

POOL_1G = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")


def write(tmp_path: Path, **sections: dict[str, object]) -> Path:
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(scenario("it-errors", **sections)))
    return spec


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
