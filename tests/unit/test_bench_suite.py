"""Benchmark suites: matrix expansion, ids, --only, validation, resume, the page-size table."""

from __future__ import annotations

import asyncio
import copy
import csv
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from migrator.bench.pagesize import (
    CSV_FILE,
    MARKDOWN_FILE,
    build_page_size_table,
    load_done_reports,
    render_page_size_table,
    table_csv,
    table_markdown,
    write_page_size_table,
)
from migrator.bench.runner import (
    RunRecord,
    RunStatus,
    SuiteState,
    load_state,
    run_suite,
)
from migrator.bench.suite import Suite, load_suite, parse_only, parse_suite
from migrator.cli.bench import bench
from migrator.config.models import Backing, Scenario
from migrator.errors import ConfigError, QemuError
from migrator.metrics.run_page import guest_ram_block
from migrator.metrics.summary import build_report
from migrator.rundir import RunDir
from migrator.runner import Observer

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "tests" / "data" / "runs"

BASE: dict[str, Any] = {
    "name": "t",
    "vm": {"memory_mib": 512, "backing": "memfd-4k"},
    "workload": {"working_set_mib": 256, "warmup_s": 0.5},
    "migration": {"downtime_limit_ms": 1,
                  "switchover": {"policy": "after-seconds", "seconds": 0.3}},
}
PAGE_SIZE_AXIS: dict[str, Any] = {
    "name": "page-size",
    "values": {
        "4k": {"vm.backing": "memfd-4k"},
        "2m": {"vm": {"backing": "hugetlb-2m"}},
        "1g": {"vm.backing": "hugetlb-1g", "vm.memory_mib": 1024},
        "1g-hgm": {"vm.backing": "hugetlb-1g", "vm.memory_mib": 1024, "vm.hgm": "require"},
    },
}
PREEMPT_AXIS: dict[str, Any] = {"field": "migration.preempt", "values": [False, True]}


def suite_data(*axes: dict[str, Any], repetitions: int = 1, **base: Any) -> dict[str, Any]:
    merged = {**copy.deepcopy(BASE), **base}
    return {"suite": {"name": "demo", "repetitions": repetitions}, "base": merged,
            "axes": [copy.deepcopy(a) for a in axes]}


def demo_suite(*axes: dict[str, Any], repetitions: int = 1) -> Suite:
    return parse_suite(suite_data(*axes, repetitions=repetitions), source="demo.toml")


# --- expansion and ids -------------------------------------------------------------------


def test_matrix_is_the_product_in_file_order_with_repetitions_outermost() -> None:
    suite = demo_suite(PAGE_SIZE_AXIS, PREEMPT_AXIS, repetitions=2)
    ids = [run.run_id for run in suite.runs]
    assert len(ids) == 4 * 2 * 2 == len(set(ids))
    assert ids[:3] == ["page-size=4k,preempt=false,rep=1", "page-size=4k,preempt=true,rep=1",
                       "page-size=2m,preempt=false,rep=1"]
    assert ids[7] == "page-size=1g-hgm,preempt=true,rep=1"
    assert ids[8] == "page-size=4k,preempt=false,rep=2"
    run = suite.runs[5]
    assert run.run_id == "page-size=1g,preempt=true,rep=1"
    assert run.labels == (("page-size", "1g"), ("preempt", "true"))
    assert run.combination == "page-size=1g,preempt=true"
    assert run.scenario.vm.backing is Backing.HUGETLB_1G
    assert run.scenario.vm.memory_mib == 1024
    assert run.scenario.migration.preempt is True
    # Everything the axes leave alone comes from [base].
    assert run.scenario.workload.working_set_mib == 256
    assert run.scenario.migration.downtime_limit_ms == 1
    assert run.scenario.name == "t.page-size-1g.preempt-true"
    assert suite.base.vm.backing is Backing.MEMFD_4K
    assert suite.varies_backing
    assert suite.page_axes == {"page-size"}


def test_ids_do_not_depend_on_the_rest_of_the_matrix() -> None:
    small = demo_suite(PREEMPT_AXIS)
    grown = demo_suite({"field": "migration.preempt", "values": [False, True]},
                       {"field": "vm.vcpus", "values": [1]}, repetitions=3)
    assert [run.run_id for run in small.runs] == ["preempt=false,rep=1", "preempt=true,rep=1"]
    assert "preempt=true,vcpus=1,rep=3" in {run.run_id for run in grown.runs}
    # Same scenario, same hash: a finished run stays finished when the suite grows.
    again = demo_suite(PREEMPT_AXIS, repetitions=2)
    assert again.runs[1].scenario_sha256 == small.runs[1].scenario_sha256


def test_list_labels_are_the_values_as_toml_writes_them() -> None:
    suite = demo_suite({"field": "vm.vcpus", "values": [1, 2]},
                       {"field": "migration.switchover.seconds", "values": [0.3]},
                       {"field": "vm.backing", "values": ["memfd-4k"]})
    assert suite.runs[0].run_id == "vcpus=1,seconds=0.3,backing=memfd-4k,rep=1"
    assert suite.runs[1].scenario.vm.vcpus == 2


def test_a_labelled_field_axis_replaces_a_table_and_a_quoted_path_does_too() -> None:
    suite = demo_suite(
        {"field": "migration.switchover", "name": "switch",
         "values": {"now": {"policy": "immediately"}, "p2": {"policy": "after-passes",
                                                            "passes": 2}}},
    )
    assert suite.runs[0].scenario.migration.switchover.policy == "immediately"
    assert suite.runs[1].run_id == "switch=p2,rep=1"
    named = demo_suite({"name": "switch", "values": {
        "now": {"migration.switchover": {"policy": "immediately"}, "vm.vcpus": 2}}})
    assert named.runs[0].scenario.migration.switchover.policy == "immediately"
    assert named.runs[0].scenario.vm.vcpus == 2


def test_suite_without_axes_is_its_base_repeated() -> None:
    suite = demo_suite(repetitions=3)
    assert [run.run_id for run in suite.runs] == ["rep=1", "rep=2", "rep=3"]
    assert suite.runs[0].scenario.name == "t"
    assert not suite.varies_backing


def test_the_page_size_suite_file() -> None:
    suite = load_suite(ROOT / "benchmarks" / "page-size.toml")
    rows = [(run.run_id, run.scenario.vm.backing.value, run.scenario.vm.memory_mib, run.hgm)
            for run in suite.runs]
    assert rows == [
        ("page-size=4k,rep=1", "memfd-4k", 512, False),
        ("page-size=2m,rep=1", "hugetlb-2m", 512, False),
        ("page-size=1g,rep=1", "hugetlb-1g", 1024, False),
        ("page-size=1g-hgm,rep=1", "hugetlb-1g", 1024, True),
    ]
    # The baselines never use HGM, even where the hosts have it: only the +HGM row does.
    assert [run.scenario.vm.hgm for run in suite.runs] == ["off", "off", "off", "require"]
    for run in suite.runs:
        assert run.scenario.migration.switchover.model_dump() == {
            "policy": "after-seconds", "seconds": 0.3}
        # Unset: migrator holds downtime-limit at 1 ms until the switch, so every row is
        # post-copy (a downtime_limit_ms here could let pre-copy complete first).
        assert run.scenario.migration.downtime_limit_ms is None
        assert run.scenario.workload.working_set_mib == 256


def test_a_run_that_requires_hgm_is_an_hgm_run() -> None:
    suite = demo_suite(PAGE_SIZE_AXIS)
    hgm_run = suite.runs[3]
    assert hgm_run.hgm
    assert hgm_run.scenario.vm.hgm == "require"
    assert not any(run.hgm for run in suite.runs[:3])
    # The 1g and 1g-hgm runs are different measurements.
    assert hgm_run.scenario_sha256 != suite.runs[2].scenario_sha256


@pytest.mark.parametrize("mode", ["auto", "require", "off"])
def test_a_base_hgm_setting_reaches_every_run_as_written(mode: str) -> None:
    data = suite_data(PREEMPT_AXIS, vm={"memory_mib": 512, "backing": "hugetlb-2m",
                                        "hgm": mode})
    suite = parse_suite(data, source="demo.toml")
    assert suite.base.vm.hgm == mode
    assert [run.scenario.vm.hgm for run in suite.runs] == [mode, mode]
    assert [run.hgm for run in suite.runs] == [mode == "require"] * 2


def test_an_hgm_axis_uses_the_scenario_words() -> None:
    data = suite_data({"field": "vm.hgm", "values": ["auto", "require", "off"]},
                      vm={"memory_mib": 512, "backing": "hugetlb-2m"})
    suite = parse_suite(data, source="demo.toml")
    assert [run.run_id for run in suite.runs] == ["hgm=auto,rep=1", "hgm=require,rep=1",
                                                  "hgm=off,rep=1"]
    assert [run.scenario.vm.hgm for run in suite.runs] == ["auto", "require", "off"]
    assert [run.hgm for run in suite.runs] == [False, True, False]
    assert suite.page_axes == {"hgm"}


# --- validation --------------------------------------------------------------------------


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_suite(data, source="demo.toml")
    return str(caught.value)


def test_an_invalid_combination_names_the_run_and_the_axis_value() -> None:
    axis = {"name": "size", "values": {"small": {"vm.memory_mib": 512},
                                       "odd": {"vm.memory_mib": 1000}}}
    message = config_error(suite_data(axis, {"field": "vm.backing",
                                             "values": ["hugetlb-2m", "hugetlb-1g"]}))
    assert message.startswith("demo.toml: run size=small,backing=hugetlb-1g,rep=1: vm: ")
    assert "not a multiple of the hugetlb-1g page size" in message
    assert "set by axis size = small, backing = hugetlb-1g" in message


def test_an_unknown_field_names_the_axis() -> None:
    message = config_error(suite_data({"field": "vm.memroy_mib", "values": [512]}))
    assert "run memroy_mib=512,rep=1: vm.memroy_mib: unknown key" in message
    assert "set by axis memroy_mib = 512" in message


def test_a_bad_base_is_reported_as_the_base() -> None:
    message = config_error(suite_data(PREEMPT_AXIS, vm={"backing": "huge"}))
    assert message.startswith("demo.toml: [base]: vm.backing: Input should be")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["suite"].update(repetitons=2), "demo.toml: suite.repetitons: unknown key"),
        (lambda d: d["suite"].update(repetitions=0), "suite.repetitions: Input should be"),
        (lambda d: d.pop("base"), "demo.toml: base: Field required"),
        (lambda d: d["axes"].append({"values": [1]}), "axes[0]: an axis needs a field or a name"),
        (lambda d: d["axes"].append({"field": "vm.vcpus", "values": []}),
         "axis vcpus: no values"),
        (lambda d: d["axes"].append({"field": "vm.vcpus", "values": [1, 1]}),
         "axis vcpus: label '1' appears twice"),
        (lambda d: d["axes"].append({"field": "vm.qemu", "values": ["a,b"]}),
         "axis qemu: label 'a,b' must match"),
        (lambda d: d["axes"].append({"field": "migration.switchover",
                                     "values": [{"policy": "immediately"}]}),
         "a dict value has no label; write values as a table keyed by label"),
        (lambda d: d["axes"].append({"name": "x", "values": [1]}),
         "value '1' must be a table of field overrides"),
        (lambda d: d["axes"].append({"name": "rep", "field": "vm.vcpus", "values": [1]}),
         "'rep' is reserved"),
        (lambda d: d["axes"].extend([PREEMPT_AXIS, PREEMPT_AXIS]),
         "two axes are called 'preempt'"),
        (lambda d: d["axes"].extend([PREEMPT_AXIS, {"name": "p", "values": {
            "x": {"migration": {"preempt": True}}}}]),
         "axes 'preempt' and 'p' both set migration.preempt"),
        (lambda d: d["axes"].append({"field": "vm.backing.size", "values": [1]}),
         "axis size = 1: cannot set vm.backing.size: vm.backing is not a table"),
        (lambda d: d["axes"].append({"field": "vm.hgm", "values": ["yes"]}),
         "vm.hgm: Input should be 'auto', 'require' or 'off' (got 'yes') (set by axis "
         "hgm = yes)"),
        # A scenario's words, not a boolean, as in a scenario file.
        (lambda d: d["axes"].append({"name": "h", "values": {"on": {"vm.hgm": True}}}),
         "vm.hgm: Input should be 'auto', 'require' or 'off' (got True) (set by axis h = on)"),
        (lambda d: d["base"]["vm"].update(hgm=False),
         "demo.toml: [base]: vm.hgm: Input should be 'auto', 'require' or 'off' (got False)"),
    ],
)
def test_suite_errors(change: Callable[[dict[str, Any]], object], expected: str) -> None:
    data = suite_data()
    change(data)
    assert expected in config_error(data)


def test_load_suite_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such suite file"):
        load_suite(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[suite\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_suite(bad)


# --- --only ------------------------------------------------------------------------------


def test_only_keeps_alternatives_of_one_key_and_requires_every_key() -> None:
    suite = demo_suite(PAGE_SIZE_AXIS, PREEMPT_AXIS, repetitions=2)
    selection = parse_only(["page-size=4k,preempt=true", "page-size=2m"], suite)
    assert [run.run_id for run in suite.select(selection)] == [
        "page-size=4k,preempt=true,rep=1", "page-size=2m,preempt=true,rep=1",
        "page-size=4k,preempt=true,rep=2", "page-size=2m,preempt=true,rep=2"]
    assert [run.run_id for run in suite.select(parse_only(["rep=2", "page-size=1g"], suite))] \
        == ["page-size=1g,preempt=false,rep=2", "page-size=1g,preempt=true,rep=2"]
    assert parse_only([], suite) is None
    assert len(suite.select(None)) == 16


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("page-size", "'page-size' is not KEY=VALUE"),
        ("size=4k", "no axis 'size'; the suite has: page-size, preempt, rep"),
        ("page-size=8k", "page-size has no value '8k'; it has: 4k, 2m, 1g, 1g-hgm"),
        ("rep=3", "rep has no value '3'; it has: 1, 2"),
    ],
)
def test_only_errors_list_what_exists(term: str, expected: str) -> None:
    suite = demo_suite(PAGE_SIZE_AXIS, PREEMPT_AXIS, repetitions=2)
    with pytest.raises(ConfigError) as caught:
        parse_only([term], suite)
    assert str(caught.value) == f"--only: {expected}"


# --- running: resume, failures, HGM ------------------------------------------------------


class FakeRuns:
    """A run function that makes real (empty) run directories and fails where told."""

    def __init__(self, out_dir: Path, fail: dict[str, BaseException] | None = None) -> None:
        self.out_dir = out_dir
        self.fail = fail or {}
        self.calls: list[str] = []
        self.seen_states: list[dict[str, Any]] = []

    async def __call__(self, scenario: Scenario, runs_root: Path, observer: Observer,
                       on_rundir: Callable[[RunDir], None]) -> Path:
        self.calls.append(scenario.name)
        run = RunDir.create(runs_root, scenario.name)
        on_rundir(run)
        # What a watcher of suite.json sees while this run is going.
        self.seen_states.append(json.loads((self.out_dir / "suite.json").read_text()))
        observer.phase("migrating")
        error = self.fail.get(scenario.name)
        if error is not None:
            error.run_dir = run.path  # type: ignore[attr-defined]
            raise error
        return run.path


async def never_supported(scenario: Scenario) -> str | None:
    return f"kernel lacks MADV_SPLIT ({scenario.vm.backing.value})"


def statuses(state: SuiteState) -> dict[str, str]:
    return {run_id: record.status.value for run_id, record in state.runs.items()}


def run(suite: Suite, out_dir: Path, fake: FakeRuns, **options: Any) -> SuiteState:
    return asyncio.run(run_suite(suite, out_dir, run_fn=fake, hgm_check=never_supported,
                                 **options))


def test_failures_are_recorded_and_never_stop_the_rest(tmp_path: Path) -> None:
    suite = demo_suite(PAGE_SIZE_AXIS)
    out = tmp_path / "out"
    fake = FakeRuns(out, fail={"t.page-size-2m": QemuError("exited", name="dst", status=-9),
                               "t.page-size-1g": RuntimeError("a bug")})
    state = run(suite, out, fake)
    assert fake.calls == ["t.page-size-4k", "t.page-size-2m", "t.page-size-1g"]
    assert statuses(state) == {"page-size=4k,rep=1": "done", "page-size=2m,rep=1": "failed",
                               "page-size=1g,rep=1": "failed",
                               "page-size=1g-hgm,rep=1": "unsupported"}
    saved = load_state(out)
    assert statuses(saved) == statuses(state)
    failed = saved.runs["page-size=2m,rep=1"]
    assert failed.error == "dst: exited (killed by SIGKILL)"
    assert failed.error_type == "QemuError"
    assert failed.run_dir is not None
    assert failed.run_dir.startswith("runs/")
    assert (out / failed.run_dir / "src").is_dir()
    assert saved.runs["page-size=1g,rep=1"].error == "RuntimeError: a bug"
    hgm = saved.runs["page-size=1g-hgm,rep=1"]
    assert hgm.reason == "not supported on these hosts: kernel lacks MADV_SPLIT (hugetlb-1g)"
    assert hgm.run_dir is None
    done = saved.runs["page-size=4k,rep=1"]
    assert done.duration_s is not None
    assert done.started
    assert done.finished
    assert done.attempts == 1
    # suite.json is whole while a run goes, and already names its run directory.
    during = fake.seen_states[1]["runs"]["page-size=2m,rep=1"]
    assert during["status"] == "running"
    assert during["run_dir"].startswith("runs/")
    assert fake.seen_states[0]["runs"]["page-size=2m,rep=1"]["status"] == "pending"
    assert (out / "suite.toml").exists()


def test_resume_skips_what_is_done_and_retries_the_rest(tmp_path: Path) -> None:
    suite = demo_suite(PAGE_SIZE_AXIS)
    out = tmp_path / "out"
    run(suite, out, FakeRuns(out, fail={"t.page-size-2m": QemuError("exited")}))
    with pytest.raises(ConfigError, match="already holds a suite"):
        run(suite, out, FakeRuns(out))
    again = FakeRuns(out)
    state = run(suite, out, again, resume=True)
    # Only the failed run is run again; unsupported ones are checked again (no run).
    assert again.calls == ["t.page-size-2m"]
    assert statuses(state)["page-size=2m,rep=1"] == "done"
    assert state.runs["page-size=2m,rep=1"].attempts == 2
    assert state.runs["page-size=4k,rep=1"].attempts == 1
    idle = FakeRuns(out)
    run(suite, out, idle, resume=True)
    assert idle.calls == []


def test_only_skips_the_rest_until_a_resume_without_it(tmp_path: Path) -> None:
    suite = demo_suite(PAGE_SIZE_AXIS, PREEMPT_AXIS)
    out = tmp_path / "out"
    first = FakeRuns(out)
    state = run(suite, out, first, selection=parse_only(["preempt=true"], suite),
                only=["preempt=true"])
    assert first.calls == [f"t.page-size-{size}.preempt-true" for size in ("4k", "2m", "1g")]
    assert statuses(state)["page-size=4k,preempt=false,rep=1"] == "skipped"
    assert state.only == ["preempt=true"]
    rest = FakeRuns(out)
    state = run(suite, out, rest, resume=True)
    assert rest.calls == [f"t.page-size-{size}.preempt-false" for size in ("4k", "2m", "1g")]
    assert set(statuses(state).values()) == {"done", "unsupported"}


def test_a_changed_scenario_is_run_again_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(demo_suite(PREEMPT_AXIS), out, FakeRuns(out))
    changed = parse_suite(suite_data(PREEMPT_AXIS, workload={"working_set_mib": 128}),
                          source="demo.toml")
    again = FakeRuns(out)
    run(changed, out, again, resume=True)
    assert again.calls == ["t.preempt-false", "t.preempt-true"]


def test_resume_refuses_another_suites_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(demo_suite(PREEMPT_AXIS), out, FakeRuns(out))
    other = suite_data(PREEMPT_AXIS)
    other["suite"]["name"] = "other"
    with pytest.raises(ConfigError, match="holds suite 'demo', not 'other'"):
        run(parse_suite(other), out, FakeRuns(out), resume=True)


def test_an_interrupted_run_is_recorded_and_the_interruption_propagates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = FakeRuns(out, fail={"t.preempt-false": asyncio.CancelledError()})
    with pytest.raises(asyncio.CancelledError):
        run(demo_suite(PREEMPT_AXIS), out, fake)
    state = load_state(out)
    assert statuses(state) == {"preempt=false,rep=1": "failed", "preempt=true,rep=1": "pending"}
    assert state.runs["preempt=false,rep=1"].error == "interrupted"


def test_the_hgm_check_runs_once_per_hosts_and_qemu(tmp_path: Path) -> None:
    checks: list[str] = []

    async def check(scenario: Scenario) -> str | None:
        checks.append(scenario.name)
        return "no"

    suite = demo_suite(PAGE_SIZE_AXIS, PREEMPT_AXIS)
    out = tmp_path / "out"
    state = asyncio.run(run_suite(suite, out, run_fn=FakeRuns(out), hgm_check=check))
    assert checks == ["t.page-size-1g-hgm.preempt-false"]
    assert state.count(RunStatus.UNSUPPORTED) == 2


# --- the page-size table -----------------------------------------------------------------


def recorded_suite(tmp_path: Path, runs: dict[str, list[tuple[str, Path | None]]],
                   repetitions: int = 1) -> tuple[Suite, SuiteState, Path]:
    """A suite over 2m/1g/1g-hgm whose state points at the given run dirs per label."""
    axis = {"name": "page-size", "values": {
        "2m": {"vm.backing": "hugetlb-2m"},
        "1g": {"vm.backing": "hugetlb-1g", "vm.memory_mib": 1024},
        "1g-hgm": {"vm.backing": "hugetlb-1g", "vm.memory_mib": 1024, "vm.hgm": "require"}}}
    suite = parse_suite(suite_data(axis, repetitions=repetitions), source="recorded")
    out = tmp_path / "suite"
    out.mkdir()
    state = SuiteState(suite=suite.name, source="recorded", repetitions=repetitions,
                       created="2026-11-26T00:00:00Z", updated="2026-11-26T00:00:00Z")
    for planned in suite.runs:
        label = dict(planned.labels)["page-size"]
        status, path = runs[label][planned.repetition - 1]
        state.runs[planned.run_id] = RunRecord(
            run_id=planned.run_id, labels=dict(planned.labels), repetition=planned.repetition,
            hgm=planned.hgm, scenario_sha256=planned.scenario_sha256, status=RunStatus(status),
            run_dir=str(path) if path else None,
            error="dst: exited" if status == "failed" else None,
            reason="not supported on these hosts: kernel lacks MADV_SPLIT"
            if status == "unsupported" else None)
    return suite, state, out


def test_page_size_table_from_recorded_runs(tmp_path: Path) -> None:
    suite, state, out = recorded_suite(tmp_path, {
        "2m": [("done", RUNS / "hugetlb-2m")], "1g": [("done", RUNS / "hugetlb-1g")],
        "1g-hgm": [("unsupported", None)]})
    table = build_page_size_table(suite, state, out)
    assert [row.label for row in table.rows] == ["2 MiB", "1 GiB", "1 GiB+HGM"]
    two, one, hgm = table.rows
    assert two.status == "done"
    assert two.runs == 1
    assert two.values["faults"] == 15
    assert two.values["fetch_p50_ms"] == pytest.approx(6.8977)
    assert two.values["fetch_p99_ms"] == pytest.approx(143.712)
    assert two.values["freeze_ms"] == pytest.approx(15.932)
    assert two.values["qemu_downtime_ms"] == 8
    assert two.values["guest_stall_max_ms"] == pytest.approx(352.1827)
    assert two.values["outside_stall_max_ms"] == pytest.approx(497.4166)
    assert two.values["blocktime_ms"] == 325
    assert two.values["postcopy_ms"] == pytest.approx(661.051)
    # Link bandwidth from the run itself: ram.transferred / total-time.
    bandwidth = 207726488 / 1.319
    assert two.values["link_bandwidth_bytes_per_s"] == pytest.approx(bandwidth)
    floor_ms = (2 << 20) / bandwidth * 1e3
    assert two.values["wire_floor_ms"] == pytest.approx(floor_ms)
    assert two.values["p50_over_wire_floor"] == pytest.approx(6.8977 / floor_ms)
    # Pages placed between a request and its own page, median: the queue ahead of it.
    assert two.values["backlog_p50"] == 4
    assert one.values["faults"] == 1
    assert one.values["fetch_p50_ms"] == pytest.approx(1008.807)
    assert one.values["freeze_ms"] == pytest.approx(1436.122)
    assert one.values["qemu_downtime_ms"] == 3
    assert hgm.status == "unsupported"
    assert hgm.runs == 0
    assert hgm.note == "not supported on these hosts: kernel lacks MADV_SPLIT"
    assert all(value is None for value in hgm.values.values())
    # Recorded runs are read, never written into.
    assert not (RUNS / "hugetlb-2m" / "report.json").exists()

    markdown = table_markdown(table)
    lines = markdown.splitlines()
    assert lines[0] == "## Page-size table: suite `demo`"
    assert "QEMU 7.2.22, accel tcg" in lines[2]
    header = next(line for line in lines if line.startswith("| page size"))
    assert "freeze ms (STOP->RESUME) | QEMU downtime ms" in header
    rows = [line for line in lines if line.startswith("| ") and line != header]
    assert rows[0].startswith("| 2 MiB | 1 | 15 | 6.90 | 144 | 144 | 4 | 15.9 | 8 | ")
    assert rows[1].startswith("| 1 GiB | 1 | 1 | 1,009 | ")
    assert rows[2].startswith("| 1 GiB+HGM | 0 | - | ")
    assert rows[2].endswith("| not supported on these hosts: kernel lacks MADV_SPLIT |")
    assert "ram.transferred` / `total-time`" in markdown

    parsed = list(csv.DictReader(io.StringIO(table_csv(table))))
    assert [row["row"] for row in parsed] == ["2 MiB", "1 GiB", "1 GiB+HGM"]
    assert float(parsed[0]["fetch_p50_ms"]) == pytest.approx(6.8977)
    assert parsed[0]["page_size_bytes"] == str(2 << 20)
    assert parsed[2]["status"] == "unsupported"
    assert parsed[2]["fetch_p50_ms"] == ""

    markdown_path, csv_path = write_page_size_table(table, out)
    assert markdown_path == out / MARKDOWN_FILE
    assert csv_path == out / CSV_FILE
    assert markdown_path.read_text() == markdown
    printed = io.StringIO()
    render_page_size_table(table, Console(file=printed, width=250))
    assert "1 GiB+HGM" in printed.getvalue()
    assert "1 GiB+HGM: not supported on these hosts" in printed.getvalue()


def copy_with_p50(source: Path, target: Path, p50_ms: float) -> Path:
    """A copy of a recorded run whose report.json says another fetch p50."""
    shutil.copytree(source, target)
    report = json.loads(build_report(target).model_dump_json())
    block = max(report["fetch"], key=lambda b: b["faults"])
    block["latency_ms"]["p50"]["value"] = p50_ms
    (target / "report.json").write_text(json.dumps(report))
    return target


def test_repetitions_give_medians_and_say_how_many_finished(tmp_path: Path) -> None:
    reps = [copy_with_p50(RUNS / "hugetlb-2m", tmp_path / f"r{n}", p50)
            for n, p50 in ((1, 1.0), (2, 9.0), (3, 5.0))]
    suite, state, out = recorded_suite(tmp_path, {
        "2m": [("done", reps[0]), ("done", reps[1]), ("done", reps[2]), ("failed", None)],
        "1g": [("failed", None)] * 4, "1g-hgm": [("pending", None)] * 4}, repetitions=4)
    table = build_page_size_table(suite, state, out)
    two, one, hgm = table.rows
    assert two.values["fetch_p50_ms"] == 5.0
    assert (two.runs, two.planned, two.status) == (3, 4, "partial")
    assert two.note == "1 of 4 repetitions failed: dst: exited"
    assert one.status == "failed"
    assert one.note == "failed: dst: exited"
    assert hgm.status == "not run"
    assert hgm.note == "not run (pending)"
    markdown = table_markdown(table)
    assert "| runs (medians) |" in markdown
    assert "| 2 MiB | 3/4 | 15 | 5 |" in markdown
    assert "median over the finished repetitions" in markdown


def test_rows_name_their_qemu_when_the_table_mixes_qemu_builds(tmp_path: Path) -> None:
    newer = tmp_path / "newer-1g"
    shutil.copytree(RUNS / "hugetlb-1g", newer)
    meta = json.loads((newer / "run.json").read_text())
    meta["qemu"]["destination"].update(version="11.1.3", root="/var/cache/migrator/roots/sid")
    (newer / "run.json").write_text(json.dumps(meta))
    mixed: dict[str, list[tuple[str, Path | None]]] = {
        "2m": [("done", RUNS / "hugetlb-2m")], "1g": [("done", newer)],
        "1g-hgm": [("unsupported", None)]}
    table = build_page_size_table(*recorded_suite(tmp_path, mixed))
    assert [row.label for row in table.rows] == ["2 MiB QEMU 7.2.22", "1 GiB QEMU 11.1.3",
                                                 "1 GiB+HGM"]
    assert "| 1 GiB QEMU 11.1.3 | 1 |" in table_markdown(table)
    # One QEMU for every run: the environment line names it, the rows do not.
    same = dict(mixed)
    same["1g"] = [("done", RUNS / "hugetlb-1g")]
    (tmp_path / "same").mkdir()
    table = build_page_size_table(*recorded_suite(tmp_path / "same", same))
    assert [row.label for row in table.rows] == ["2 MiB", "1 GiB", "1 GiB+HGM"]


def test_page_size_table_takes_the_reports_already_loaded(tmp_path: Path) -> None:
    copies = {name: tmp_path / name for name in ("hugetlb-2m", "hugetlb-1g")}
    for name, run_dir in copies.items():
        shutil.copytree(RUNS / name, run_dir)
    suite, state, out = recorded_suite(tmp_path, {
        "2m": [("done", copies["hugetlb-2m"])], "1g": [("failed", copies["hugetlb-1g"])],
        "1g-hgm": [("unsupported", None)]})
    reports = load_done_reports(state.runs, out)
    assert list(reports) == ["page-size=2m,rep=1"]  # only the runs marked done
    loaded = build_page_size_table(suite, state, out)
    for run_dir in copies.values():
        shutil.rmtree(run_dir)
    given = build_page_size_table(suite, state, out, reports)  # reads no run directory
    assert given.rows == loaded.rows
    assert given.environment == loaded.environment
    assert given.rows[0].values["faults"] == 15


def test_guest_ram_block_is_the_block_of_the_page_size_with_most_faults() -> None:
    report = build_report(RUNS / "hugetlb-2m")
    two = guest_ram_block(report, 2 << 20)
    assert two is not None
    assert two.faults == max(b.faults for b in report.fetch if b.page_size == 2 << 20)
    assert guest_ram_block(report, 1 << 30) is None
    anywhere = guest_ram_block(report, None)
    assert anywhere is not None
    assert anywhere.faults == max(b.faults for b in report.fetch)


def test_rows_split_by_the_other_axes(tmp_path: Path) -> None:
    suite = demo_suite({"field": "vm.backing", "values": ["memfd-4k", "hugetlb-2m"]},
                       PREEMPT_AXIS)
    state = asyncio.run(run_suite(suite, tmp_path / "out", run_fn=FakeRuns(tmp_path / "out"),
                                  hgm_check=never_supported))
    table = build_page_size_table(suite, state, tmp_path / "out")
    # Fake runs have no artifacts: every row says it has no report.
    assert [row.label for row in table.rows] == [
        "4 KiB preempt=false", "4 KiB preempt=true", "2 MiB preempt=false",
        "2 MiB preempt=true"]
    assert table.other_axes == ("preempt",)
    assert {row.status for row in table.rows} == {"failed"}
    assert table.rows[0].note == "failed: no report"
    assert "preempt" in next(csv.reader(io.StringIO(table_csv(table))))


# --- command line (errors that stop before anything runs) --------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(bench)
    # A second command keeps typer from flattening the app into the bench command itself.
    app.command("noop")(lambda: None)
    return app


def test_cli_rejects_a_bad_suite_with_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[suite]\nname = "x"\n[base]\nname = "x"\n[[axes]]\nfield = "vm.vcpus"\n'
                   "values = [0]\n")
    result = CliRunner().invoke(cli(), ["bench", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"{bad}: run vcpus=0,rep=1: vm.vcpus: Input should be greater than or equal to 1" \
        in result.output
    assert not (tmp_path / "o").exists()


def test_cli_rejects_a_bad_only_filter(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["bench", str(ROOT / "benchmarks" / "page-size.toml"),
                                        "--only", "page-size=8k", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--only: page-size has no value '8k'; it has: 4k, 2m, 1g, 1g-hgm" in result.output
