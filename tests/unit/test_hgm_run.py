"""HGM in runs: the scenario option, the plan, the runner's decision and sampler, the report.

The enabled path cannot run on this machine (no HGM kernel, no doublemap QEMU),
so it is exercised here with fake hosts and the hand-written fixtures of
``tests/data/hgm`` (see its README) grafted onto recorded run directories.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migrator.config import parse_scenario
from migrator.config.models import Scenario
from migrator.errors import ConfigError, PreflightError
from migrator.hgm import HgmSupport, decide_hgm_between, load_samples
from migrator.hgm.detect import NOT_SUPPORTED, SUPPORTED
from migrator.hosts.base import Host
from migrator.metrics.summary import build_report
from migrator.migration.plan import plan_migration
from migrator.model import Report
from migrator.report.terminal import render_report
from migrator.rundir import RunDir, artifact_path
from migrator.runner import Observer, ScenarioRun
from tests.unit.hgm_fakes import QEMU_72, QEMU_RFC, ScriptedSmaps, kernel, probe_report, text

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
HGM = Path(__file__).resolve().parents[1] / "data" / "hgm"
GIB_KB = 1 << 20
# Completion in smaps-samples-hgm-1g.jsonl (its README), and in the recorded 1 GiB run
# (dst MIGRATION completed, as it reached the controller).
FIXTURE_COMPLETED_NS = 1795630601250000000
RUN_1G_COMPLETED_NS = 1795631861625410253
HGM_RELEASE = "6.2.0-rc2-hgm-v1"
# Where the 1 GiB fixtures' guest RAM file lives (its mem-path directory).
FIXTURE_MEM_PATH = Path("/run/migrator/hugetlbfs-1048576k-20261125T190000Z-hgm-1g-ab12/"
                        "migrator-20261125T190000Z-hgm-1g-ab12")


def scenario(**vm: Any) -> Scenario:
    return parse_scenario({"name": "t", "vm": {"backing": "hugetlb-1g", **vm}})


# ---------------------------------------------------------------------------
# Scenario option


def test_hgm_defaults_to_auto_and_takes_three_words() -> None:
    assert scenario().vm.hgm == "auto"
    for mode in ("auto", "require", "off"):
        assert scenario(hgm=mode).vm.hgm == mode


@pytest.mark.parametrize("backing", ["memfd-4k", "anon-4k"])
def test_require_on_a_4k_backing_names_the_field(backing: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario({"name": "t", "vm": {"backing": backing, "hgm": "require"}},
                       source="s.toml")
    message = str(caught.value)
    assert message.startswith(f's.toml: vm.hgm: "require" needs a hugetlb backing (vm.backing '
                              f'= "{backing}" has 4 KiB pages')
    assert "\n" not in message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_auto_and_off_are_fine_on_4k_backings(mode: str) -> None:
    assert parse_scenario({"name": "t", "vm": {"backing": "memfd-4k", "hgm": mode}}).vm.hgm == mode


def test_bad_words_and_require_without_postcopy_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"vm\.hgm: Input should be 'auto', 'require' or 'off'"):
        scenario(hgm=True)
    with pytest.raises(ConfigError, match=r'vm\.hgm = "require" needs migration\.postcopy'):
        parse_scenario({"name": "t", "vm": {"backing": "hugetlb-2m", "hgm": "require"},
                        "migration": {"postcopy": False}})


# ---------------------------------------------------------------------------
# Plan


def test_plan_with_hgm_adds_doublemap_on_both_sides() -> None:
    plan = plan_migration(scenario(), hgm=True)
    assert plan.source_capabilities["hugetlb-doublemap"] is True
    assert plan.destination_capabilities["hugetlb-doublemap"] is True
    assert "hugetlb-doublemap" in plan.needed
    # Everything else is as without HGM.
    without = plan_migration(scenario())
    assert "hugetlb-doublemap" not in without.needed
    assert {k: v for k, v in plan.destination_capabilities.items()
            if k != "hugetlb-doublemap"} == without.destination_capabilities
    assert plan.source_parameters == without.source_parameters


def test_plan_refuses_hgm_without_postcopy() -> None:
    precopy = parse_scenario({"name": "t", "migration": {"postcopy": False}})
    with pytest.raises(ValueError, match="hugetlb-doublemap needs post-copy"):
        plan_migration(precopy, hgm=True)


# ---------------------------------------------------------------------------
# One decision for two hosts


def support(host: str, ok: bool) -> HgmSupport:
    return HgmSupport(host=host, kernel_release="r", kernel_config=ok,
                      kernel_config_source="/boot/config-r",
                      madv_split=SUPPORTED if ok else NOT_SUPPORTED, probe_detail="...",
                      qemu_binary="q", qemu_version="7.2.50", qemu_doublemap=ok)


def test_auto_between_hosts_needs_every_host() -> None:
    both = decide_hgm_between("auto", [support("a", True), support("b", True)])
    assert both.enabled
    assert both.reason.startswith("hgm = auto: a: kernel r has MADV_SPLIT")
    assert "; b: kernel r has MADV_SPLIT" in both.reason
    one = decide_hgm_between("auto", [support("a", True), support("b", False)])
    assert not one.enabled
    assert one.reason.startswith("hgm = auto: disabled on b: kernel r lacks MADV_SPLIT")
    assert "disabled on a" not in one.reason
    single = decide_hgm_between("auto", [support("a", False)])
    assert single.reason.startswith("hgm = auto: disabled on a: ")
    assert decide_hgm_between("off", [support("a", True), support("b", True)]).reason == (
        "hgm = off: not used")


def test_require_between_hosts_names_the_host_without_it() -> None:
    with pytest.raises(PreflightError, match=r"^hgm = require: b: kernel r lacks MADV_SPLIT"):
        decide_hgm_between("require", [support("a", True), support("b", False)])
    with pytest.raises(ValueError, match="at least one host"):
        decide_hgm_between("auto", [])


# ---------------------------------------------------------------------------
# The runner's decision and sampler, on fake hosts


def hgm_host() -> Host:
    """A fake host whose kernel has HGM: the MADV_SPLIT probe succeeds."""
    host = kernel([probe_report(madvise_errno=None, madvise_error=None)], release=HGM_RELEASE)
    host.set_text(f"/boot/config-{HGM_RELEASE}", text("config-6.2.0-rc2-hgm-v1"))
    return host


def stock_host() -> Host:
    return kernel([probe_report()])


def new_run(tmp_path: Path, scenario: Scenario) -> ScenarioRun:
    return ScenarioRun(scenario, RunDir.create(tmp_path, scenario.name), Observer())


def run_json(state: ScenarioRun) -> dict[str, Any]:
    return json.loads((state.run.path / "run.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["auto", "require"])
async def test_hgm_hosts_enable_doublemap_and_record_why(tmp_path: Path, mode: str) -> None:
    state = new_run(tmp_path, scenario(hgm=mode))
    src, dst = hgm_host(), hgm_host()
    decision = await state.decide_hgm({"src": src, "dst": dst}, {"src": QEMU_RFC, "dst": QEMU_RFC})
    assert decision.enabled
    record = run_json(state)["hgm"]
    assert (record["mode"], record["enabled"]) == (mode, True)
    assert record["reason"] == decision.reason
    assert set(record["hosts"]) == {"source", "destination"}
    assert record["hosts"]["destination"]["supported"] is True
    assert record["hosts"]["destination"]["madv_split"] == SUPPORTED
    assert record["hosts"]["source"]["qemu_doublemap"] is True
    plan = state.plan()
    assert plan.source_capabilities["hugetlb-doublemap"] is True
    assert plan.destination_capabilities["hugetlb-doublemap"] is True


async def test_auto_on_a_stock_destination_disables_and_records_both_hosts(
    tmp_path: Path,
) -> None:
    state = new_run(tmp_path, scenario())
    decision = await state.decide_hgm({"src": hgm_host(), "dst": stock_host()},
                                      {"src": QEMU_RFC, "dst": QEMU_72})
    assert not decision.enabled
    assert decision.reason.startswith("hgm = auto: disabled on fake: kernel ")
    record = run_json(state)["hgm"]
    assert record["enabled"] is False
    assert record["hosts"]["source"]["supported"] is True
    assert record["hosts"]["destination"]["supported"] is False
    assert "hugetlb-doublemap" not in state.plan().needed


async def test_require_on_a_stock_host_raises_and_records_the_reason(tmp_path: Path) -> None:
    state = new_run(tmp_path, scenario(hgm="require"))
    host = stock_host()
    with pytest.raises(PreflightError) as caught:
        await state.decide_hgm({"src": host, "dst": host}, {"src": QEMU_72, "dst": QEMU_72})
    assert caught.value.exit_code == 3
    assert "\n" not in str(caught.value)
    record = run_json(state)["hgm"]
    assert (record["mode"], record["enabled"], record["reason"]) == (
        "require", False, str(caught.value))
    assert record["hosts"]["source"] == record["hosts"]["destination"]
    # One machine in both roles is probed once.
    assert len([c for c in host.calls if c[:2] == ("run", "python3")]) == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"vm": {"backing": "memfd-4k"}}, "not applicable: vm.backing = memfd-4k has 4 KiB pages"),
        ({"vm": {"backing": "hugetlb-2m"}, "migration": {"postcopy": False}},
         "not applicable: migration.postcopy = false"),
        ({"vm": {"backing": "hugetlb-2m", "hgm": "off"}}, "hgm = off: not used"),
    ],
)
async def test_nothing_is_probed_when_hgm_cannot_matter(
    tmp_path: Path, data: dict[str, Any], reason: str
) -> None:
    state = new_run(tmp_path, parse_scenario({"name": "t", **data}))
    host = hgm_host()
    decision = await state.decide_hgm({"src": host, "dst": host}, {"src": QEMU_RFC,
                                                                   "dst": QEMU_RFC})
    assert not decision.enabled
    assert decision.reason.startswith(reason)
    assert host.calls == []  # type: ignore[attr-defined]
    assert run_json(state)["hgm"]["hosts"] == {}


class DrainedSmaps(ScriptedSmaps):
    """A scripted destination whose ``drained`` is set once every scripted smaps was read.

    The next read finds the process gone and the sampler stops: everything it
    was going to write is written by then.
    """

    def __init__(self, path: Path, reads: list[str | BaseException]) -> None:
        super().__init__(path, reads)
        self.drained = asyncio.Event()

    def _sample(self, argv: tuple[str, ...], line: str) -> str:
        if not self.reads:
            self.drained.set()
        return super()._sample(argv, line)


class FakeQemu:
    """What the smaps sampler needs of a QemuProcess: its host and its pid there."""

    def __init__(self, host: Host, pid: int | None) -> None:
        self.host = host
        self.pid = pid


async def test_destination_smaps_are_sampled_on_its_host_until_the_stack_closes(
    tmp_path: Path,
) -> None:
    state = new_run(tmp_path, parse_scenario({
        "name": "t", "vm": {"backing": "hugetlb-1g"}, "collect": {"smaps_hz": 100}}))
    # A remote destination's QEMU pid is the pid on that host: only its /proc is read.
    host = DrainedSmaps(Path("/proc/31040/smaps"), [
        text("smaps-hgm-1g-postcopy.txt"), text("smaps-hgm-1g-completed.txt")])
    out = state.run.side("dst") / "smaps.jsonl"
    async with AsyncExitStack() as stack:
        await state._sample_destination_smaps(stack, FakeQemu(host, 31040),  # type: ignore[arg-type]
                                              FIXTURE_MEM_PATH)
        await asyncio.wait_for(host.drained.wait(), 5)
    samples = load_samples(out)
    assert [(s.vma, s.pte_kb, s.pud_kb) for s in samples] == [
        ("7f2c40000000-7f2c80000000", 81920, 0), ("7f2c40000000-7f2c80000000", 0, GIB_KB)]


async def test_guest_ram_is_matched_by_size_and_mem_path(tmp_path: Path) -> None:
    state = new_run(tmp_path, scenario())
    host = DrainedSmaps(Path("/proc/7/smaps"), [text("smaps-hgm-1g-completed.txt")])
    out = state.run.side("dst") / "smaps.jsonl"
    async with AsyncExitStack() as stack:
        # No pid (QEMU not started): nothing to sample.
        await state._sample_destination_smaps(stack, FakeQemu(host, None),  # type: ignore[arg-type]
                                              None)
        assert artifact_path(out) is None  # in neither form
        await state._sample_destination_smaps(stack, FakeQemu(host, 7),  # type: ignore[arg-type]
                                              Path("/dev/hugepages/elsewhere"))
        await asyncio.wait_for(host.drained.wait(), 5)
    (only,) = load_samples(out)
    assert not only.found  # a 1 GiB hugetlb VMA, but not under this mem-path


# ---------------------------------------------------------------------------
# The report's hgm section


def test_recorded_runs_say_hgm_was_off_and_that_no_smaps_were_sampled() -> None:
    for name, page in (("hugetlb-1g", 1 << 30), ("hugetlb-2m", 2 << 20)):
        report = build_report(RUNS / name)
        hgm = report.hgm
        assert hgm is not None
        assert (hgm.mode, hgm.enabled, hgm.decided_by) == (None, False, "run.json plan")
        assert hgm.reason == ("no HGM decision in run.json; its plan did not enable "
                              "hugetlb-doublemap")
        assert report.environment["hgm"] is False
        (ram,) = hgm.blocks
        assert (ram.ramblock, ram.page_size, ram.fetched, ram.matches_decision) == (
            "ram0", page, "whole pages", True)
        assert ram.placement_granularity.value == page
        assert (ram.placement_granularity.unit, ram.subpage_resolution) == ("bytes", False)
        assert "postcopy_place_page" in ram.placement_granularity.source
        assert hgm.mapping is None
        assert hgm.notes == ["no dst/smaps.jsonl: the guest RAM mapping was not sampled "
                             "(recorded before migrator sampled smaps, or the run stopped "
                             "before migrating)"]
        assert not [w for w in report.warnings if "HGM" in w or "smaps" in w]


def test_a_4k_run_without_trace_says_so() -> None:
    hgm = build_report(RUNS / "crashed-memfd-4k").hgm
    assert hgm is not None
    assert not hgm.enabled
    assert hgm.blocks == []
    assert hgm.notes == [
        "no dst/trace.log: the fault granularity is unknown",
        "no dst/smaps.jsonl: the guest RAM mapping was not sampled (nothing to sample on a "
        "4 KiB backing)",
    ]


def set_decision(run: Path, mode: str, enabled: bool) -> None:
    meta = json.loads((run / "run.json").read_text())
    meta["hgm"] = {"mode": mode, "enabled": enabled, "reason": f"hgm = {mode}: test",
                   "hosts": {}}
    (run / "run.json").write_text(json.dumps(meta))


@pytest.fixture
def hgm_1g_run(tmp_path: Path) -> Path:
    """The recorded 1 GiB run with the HGM smaps samples of the fixtures, claiming HGM.

    The samples are shifted in time so that their completion falls on the
    run's own (dst ``MIGRATION completed``).
    """
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-1g", run)
    shift = RUN_1G_COMPLETED_NS - FIXTURE_COMPLETED_NS
    lines = []
    for line in (HGM / "smaps-samples-hgm-1g.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["host_ns"] += shift
        lines.append(json.dumps(record))
    (run / "dst" / "smaps.jsonl").write_text("\n".join(lines) + "\n")
    set_decision(run, "require", True)
    return run


def test_collapse_after_completion_from_the_smaps_samples(hgm_1g_run: Path) -> None:
    report = build_report(hgm_1g_run)
    hgm = report.hgm
    assert hgm is not None
    assert (hgm.mode, hgm.enabled, hgm.decided_by) == ("require", True, "run.json hgm")
    assert report.environment["hgm"] is True
    mapping = hgm.mapping
    assert mapping is not None
    assert (mapping.samples, mapping.found, mapping.hgm_counters) == (16, 15, True)
    assert (mapping.vma, mapping.page_size_kib) == ("7f2c40000000-7f2c80000000", GIB_KB)
    assert [(s.level, s.samples) for s in mapping.timeline] == [
        ("not-found", 1), ("unmapped", 1), ("pud", 1), ("unmapped", 1), ("pte", 10), ("pud", 2)]
    pte = mapping.timeline[4]
    assert (pte.mapped.value, pte.split_peak.value, pte.mapped.unit) == (GIB_KB, GIB_KB, "KiB")
    assert mapping.timeline[-1].split_peak.value == 0
    collapse = mapping.collapse
    assert collapse.status == "collapsed"
    assert collapse.completed_ns == RUN_1G_COMPLETED_NS
    assert (collapse.peak_split.value, collapse.split_at_completion.value) == (GIB_KB, GIB_KB)
    assert collapse.collapsed_after_completion.value == 150.003  # 150_002_866 ns
    assert collapse.collapsed_after_completion.unit == "ms"
    assert collapse.uncertainty.value == 100.002
    assert collapse.final_level == "pud"
    assert collapse.final is not None
    assert (collapse.final["pud_kb"], collapse.final["split_kb"], collapse.final["hm"]) == (
        GIB_KB, 0, True)
    for metric in (collapse.peak_split, collapse.collapsed_after_completion, pte.mapped):
        assert metric.unit
        assert "smaps" in metric.source
    # The fixture's sampler stopped on a read error; the recorded trace is a stock one.
    assert "dst/smaps.jsonl: the sampler stopped early: reading /proc/31040/smaps: " \
           "Permission denied" in report.warnings
    assert any(w.startswith("ram0: HGM was enabled (hugetlb-doublemap) but the destination "
                            "placed whole 1 GiB pages") for w in report.warnings)
    assert Report.model_validate_json(report.model_dump_json()) == report


def test_split_mappings_without_hgm_are_flagged(hgm_1g_run: Path) -> None:
    set_decision(hgm_1g_run, "auto", False)
    warnings = build_report(hgm_1g_run).warnings
    assert ("guest RAM was mapped in pieces (1,048,576 KiB below huge-page level at peak) "
            "although HGM was not enabled") in warnings
    assert not any("HGM was enabled" in w for w in warnings)


def test_the_terminal_shows_a_short_hgm_block(hgm_1g_run: Path) -> None:
    console = Console(record=True, width=200)
    render_report(build_report(hgm_1g_run), console)
    printed = console.export_text()
    assert "HGM enabled (hgm = require): hgm = require: test" in printed
    assert ("ram0 (1 GiB pages): whole pages, placed at 1 GiB over 1 placement [3] NOT as "
            "decided") in printed
    # The shifted samples fall into the recorded run's 1.4 s freeze and the settle after it.
    assert ("guest RAM mapping, 15 of 16 samples [4]: NOT-FOUND (freeze) -> UNMAPPED "
            "(freeze) -> PUD (freeze) -> UNMAPPED (freeze) -> PTE (freeze->settle) -> "
            "PUD (settle), 1,048,576 KiB mapped at the end") in printed
    assert "split/collapse: collapsed 150.003 ms after completion (+/- 100.002 ms)" in printed
    assert "peak split 1,048,576 KiB" in printed


@pytest.fixture
def run_2m(tmp_path: Path) -> Path:
    run = tmp_path / "run2m"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    return run


def use_hgm_trace(run: Path) -> None:
    shutil.copy(HGM / "dst-trace-hgm-2m.log", run / "dst" / "trace.log")
    shutil.copy(HGM / "info-ramblock-hgm-2m.txt", run / "dst" / "ramblocks.txt")


def test_claimed_hgm_but_whole_pages_fetched_is_a_warning(run_2m: Path) -> None:
    set_decision(run_2m, "auto", True)
    report = build_report(run_2m)
    assert report.hgm is not None
    (ram,) = report.hgm.blocks
    assert (ram.fetched, ram.matches_decision) == ("whole pages", False)
    assert ("ram0: HGM was enabled (hugetlb-doublemap) but the destination placed whole 2 MiB "
            "pages (every one of 99 placements 2 MiB-aligned): faults were not resolved in "
            "4 KiB pieces") in report.warnings


def test_hgm_trace_matches_an_enabled_decision(run_2m: Path) -> None:
    set_decision(run_2m, "auto", True)
    use_hgm_trace(run_2m)
    report = build_report(run_2m)
    assert report.hgm is not None
    (ram,) = report.hgm.blocks
    assert (ram.fetched, ram.matches_decision, ram.subpage_resolution) == (
        "4 KiB pieces", True, True)
    assert ram.placement_granularity.value == 4096
    assert not [w for w in report.warnings if "ram0" in w]


def test_pieces_placed_without_hgm_are_a_warning(run_2m: Path) -> None:
    set_decision(run_2m, "off", False)
    use_hgm_trace(run_2m)
    report = build_report(run_2m)
    assert report.hgm is not None
    assert report.hgm.blocks[0].matches_decision is False
    assert ("ram0: the destination placed 4 KiB pieces of 2 MiB pages although HGM was not "
            "enabled") in report.warnings


def test_torn_or_broken_smaps_samples(hgm_1g_run: Path) -> None:
    path = hgm_1g_run / "dst" / "smaps.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])  # the last line cut mid-way (run killed)
    mapping = build_report(hgm_1g_run).hgm.mapping  # type: ignore[union-attr]
    assert mapping is not None
    assert mapping.samples == 16
    path.write_text("not json\n" + data.decode())
    report = build_report(hgm_1g_run)
    assert report.hgm is not None
    assert report.hgm.mapping is None
    assert any(w.startswith("dst/smaps.jsonl: ") and "not a smaps sample" in w
               for w in report.warnings)


def test_reports_written_before_the_section_still_load() -> None:
    report = build_report(RUNS / "hugetlb-2m")
    old = json.loads(report.model_dump_json())
    del old["hgm"]
    assert Report.model_validate(old).hgm is None
