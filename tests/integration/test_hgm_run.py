"""HGM in real runs on this machine, whose kernel has no HGM (and QEMU 7.2 no doublemap).

``hgm = "require"`` must stop a hugetlb run in preflight, before anything
boots; ``hgm = "auto"`` must run it without HGM, say why, and still sample the
destination's smaps, which here show guest RAM mapped whole at PMD level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from migrator.config import dump_scenario
from migrator.hgm import load_samples
from migrator.hgm.detect import NOT_SUPPORTED
from migrator.metrics.events import read_jsonl
from migrator.metrics.summary import build_report, write_report
from migrator.report.terminal import render_report
from migrator.rundir import artifact_path
from tests.integration.conftest import host_qemu_version, run_migration, scenario
from tests.integration.refused_runs import assert_nothing_started, run_expecting_failure

POOL_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
GUEST_KIB = 512 * 1024


def test_require_fails_the_preflight_before_anything_boots(tmp_path: Path) -> None:
    before = POOL_2M.read_text()
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(scenario("it-hgm-require",
                                           vm={"backing": "hugetlb-2m", "hgm": "require"})))
    outcome, run_dir = run_expecting_failure(tmp_path, spec)
    release = os.uname().release
    assert outcome.startswith(f"3 error: hgm = require: local: kernel {release} lacks MADV_SPLIT "
                              "(madvise(26) returned EINVAL"), outcome
    assert f"and QEMU {host_qemu_version()}" in outcome
    assert "has no hugetlb-doublemap capability" in outcome
    assert_nothing_started(run_dir)
    assert run_dir is not None
    assert POOL_2M.read_text() == before
    meta = json.loads((run_dir / "run.json").read_text())
    hgm = meta["hgm"]
    assert (hgm["mode"], hgm["enabled"]) == ("require", False)
    assert outcome.endswith(hgm["reason"])
    assert hgm["reason"] == meta["error"]["message"]
    assert meta["error"]["type"] == "PreflightError"
    for role in ("source", "destination"):
        assert hgm["hosts"][role]["madv_split"] == NOT_SUPPORTED
        assert hgm["hosts"][role]["supported"] is False
    marks = [record["what"] for record in read_jsonl(run_dir / "timeline.jsonl")]
    assert "hugepages-reserved" not in marks
    assert "source-started" not in marks
    assert artifact_path(run_dir / "dst" / "smaps.jsonl") is None  # in neither form


def test_auto_runs_without_hgm_and_samples_the_destination_mapping(runs_root: Path) -> None:
    # The conftest defaults: 512 MiB guest, 256 MiB working set, downtime_limit_ms = 1,
    # post-copy 0.3 s after migrate.
    run = run_migration(
        scenario("it-hgm-auto", vm={"backing": "hugetlb-2m", "hgm": "auto"}), runs_root)
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["outcome"] == "completed"
    hgm = meta["hgm"]
    assert (hgm["mode"], hgm["enabled"]) == ("auto", False)
    assert hgm["reason"].startswith(
        f"hgm = auto: disabled on local: kernel {os.uname().release} lacks MADV_SPLIT")
    assert hgm["hosts"]["destination"]["qemu_doublemap"] is False
    assert "hugetlb-doublemap" not in meta["plan"]["destination_capabilities"]

    samples = load_samples(run.path / "dst" / "smaps.jsonl")
    found = [s for s in samples if s.found]
    assert len(found) >= 10
    # One VMA all along: the guest RAM file under the run's hugetlbfs directory.
    assert len({s.vma for s in found}) == 1
    assert all((s.size_kb, s.page_kb) == (GUEST_KIB, 2048) for s in found)
    # No HGM counters on this kernel, and never MADV_SPLIT.
    assert all((s.pud_kb, s.pmd_kb, s.pte_kb, s.hm) == (None, None, None, False) for s in found)
    levels = [g.level for s in found if (g := s.granularity) is not None]
    assert set(levels) <= {"unmapped", "pmd"}
    assert levels[-1] == "pmd"
    mapped = [s.hugetlb_kb or 0 for s in found]
    assert all(kb % 2048 == 0 for kb in mapped)
    # The working set was written before the migration, so it is mapped on arrival.
    assert 256 * 1024 <= mapped[-1] <= GUEST_KIB
    assert samples == sorted(samples, key=lambda s: s.host_ns)

    report = build_report(run.path)
    write_report(run.path, report)
    section = report.hgm
    assert section is not None
    assert (section.mode, section.enabled, section.decided_by) == ("auto", False, "run.json hgm")
    ram = next(b for b in section.blocks if b.ramblock == "ram0")
    assert (ram.fetched, ram.matches_decision, ram.placement_granularity.value) == (
        "whole pages", True, 2 << 20)
    mapping = section.mapping
    assert mapping is not None
    assert not mapping.hgm_counters
    assert mapping.collapse.status == "no-hgm-stats"
    assert mapping.timeline[-1].level == "pmd"
    assert mapping.timeline[-1].mapped.value == mapped[-1]
    assert not [w for w in report.warnings if "HGM" in w or "smaps" in w]
    console = Console(record=True, width=200)
    render_report(report, console)
    printed = console.export_text()
    assert "HGM disabled (hgm = auto): hgm = auto: disabled on local: kernel" in printed
    assert "split/collapse: the kernel prints no HGM counters" in printed
