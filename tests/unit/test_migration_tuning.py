"""Migration tuning in the scenario: auto-converge, xbzrle, multifd and any other QMP knob."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from migrator.config import parse_scenario
from migrator.config.migration import tuning_label
from migrator.errors import ConfigError, QemuExitedError
from migrator.metrics.events import MigrationEvents
from migrator.metrics.summary import build_report
from migrator.metrics.tuning import tuning_of, tuning_warnings
from migrator.migration.plan import plan_migration
from migrator.qemu.known_issues import postcopy_multifd_refusal
from migrator.report.run_tables import environment_line
from migrator.results.store import ResultsStore, parse_selector
from migrator.rundir import RunMeta
from migrator.runner import destination_alive
from tests.unit.rendering import terminal_text


def migration(**fields: Any) -> dict[str, Any]:
    return {"name": "t", "migration": fields}


def test_every_tuning_field_reaches_both_sides_plan() -> None:
    scenario = parse_scenario(migration(
        auto_converge={"initial_pct": 30, "increment_pct": 5}, xbzrle_cache_mib=32,
        multifd={"channels": 4, "compression": "zstd"},
        capabilities={"validate-uuid": True, "zero-page-detection-x": False},
        parameters={"announce-rounds": 3, "cpu-throttle-tailslow": True}))
    plan = plan_migration(scenario)
    for capabilities in (plan.source_capabilities, plan.destination_capabilities):
        assert {name: capabilities[name] for name in (
            "auto-converge", "xbzrle", "multifd", "validate-uuid", "zero-page-detection-x")} == {
            "auto-converge": True, "xbzrle": True, "multifd": True, "validate-uuid": True,
            "zero-page-detection-x": False}
    tuned = {"cpu-throttle-initial": 30, "cpu-throttle-increment": 5,
             "xbzrle-cache-size": 32 << 20, "multifd-channels": 4,
             "multifd-compression": "zstd", "announce-rounds": 3,
             "cpu-throttle-tailslow": True}
    assert tuned.items() <= plan.source_parameters.items()
    assert plan.destination_parameters == tuned
    # The run's own settings are still there, untouched.
    assert plan.source_capabilities["postcopy-ram"] is True
    assert "downtime-limit" in plan.source_parameters


def test_no_tuning_changes_nothing() -> None:
    plan = plan_migration(parse_scenario({"name": "t"}))
    assert tuning_label(plan.source_capabilities, plan.source_parameters) == ""
    assert plan.destination_parameters == {}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"capabilities": {"postcopy-ram": True}},
     "capabilities.postcopy-ram: migrator sets it; use migration.postcopy"),
    ({"capabilities": {"multifd": True}},
     "capabilities.multifd: migrator sets it; use [migration.multifd]"),
    ({"parameters": {"downtime-limit": 5}},
     "parameters.downtime-limit: migrator sets it; use migration.downtime_limit_ms"),
    ({"parameters": {"xbzrle-cache-size": 5}},
     "parameters.xbzrle-cache-size: migrator sets it; use migration.xbzrle_cache_mib"),
    ({"parameters": {"Max Bandwidth": 5}}, "parameters.Max Bandwidth: not a QMP parameter name"),
    ({"auto_converge": {"initial_pct": 100}}, "migration.auto_converge.initial_pct"),
    ({"multifd": {"compression": "gzip"}}, "migration.multifd.compression"),
    ({"capabilities": {"validate-uuid": "yes"}}, "migration.capabilities.validate-uuid"),
])
def test_bad_tuning_names_the_field(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(migration(**fields), source="s.toml")
    assert expected in str(caught.value)
    assert caught.value.exit_code == 2


def test_tuning_label_is_stable_and_selector_safe() -> None:
    label = tuning_label(
        {"events": True, "postcopy-ram": True, "xbzrle": True, "validate-uuid": False},
        {"max-bandwidth": 1, "xbzrle-cache-size": 33554432, "cpu-throttle-tailslow": True,
         "tls-creds": "x"})
    assert label == ("cpu-throttle-tailslow=true;validate-uuid=false;xbzrle;"
                     "xbzrle-cache-size=33554432")
    assert "," not in label


def meta_with_plan(**plan: Any) -> RunMeta:
    return RunMeta.model_validate({"run_id": "r", "scenario": "s", "plan": plan})


def settings_mark(source: dict[str, Any], destination: dict[str, Any]) -> MigrationEvents:
    return MigrationEvents(events=[], marks={}, timeline=[
        {"host_ns": 1, "what": "settings-in-effect", "source": source,
         "destination": destination}])


def test_tuning_that_qemu_took_gives_no_warning() -> None:
    meta = meta_with_plan(source_capabilities={"events": True, "xbzrle": True},
                          source_parameters={"xbzrle-cache-size": 64})
    taken = {"capabilities": ["events", "xbzrle"], "parameters": {"xbzrle-cache-size": 64}}
    assert tuning_of(meta) == "xbzrle;xbzrle-cache-size=64"
    assert tuning_warnings(meta, settings_mark(taken, {"capabilities": [], "parameters": {}})) \
        == []


def test_tuning_qemu_reports_otherwise_is_a_warning() -> None:
    meta = meta_with_plan(destination_capabilities={"multifd": True},
                          destination_parameters={"multifd-channels": 4})
    taken = {"capabilities": [], "parameters": {"multifd-channels": 2}}
    assert tuning_warnings(meta, settings_mark({}, taken)) == [
        "tuning: the destination QEMU reports capability multifd off, the plan asked on "
        "(settings-in-effect, timeline.jsonl)",
        "tuning: the destination QEMU reports multifd-channels = 2, the plan asked 4 "
        "(settings-in-effect, timeline.jsonl)"]


def test_recorded_runs_have_no_tuning() -> None:
    runs = Path(__file__).resolve().parents[1] / "data" / "runs"
    for run in (path for path in runs.iterdir() if path.is_dir()):
        meta = RunMeta.read(run)
        assert tuning_of(meta) == "", run.name
        assert json.loads((run / "run.json").read_text())["plan"]


@pytest.mark.parametrize(("version", "refused"), [
    ("7.2.22", True), ("8.0.5", True), ("8.1.0", False), ("10.0.2", False), ("11.1.3", False),
    ("garbage", False), (None, False)])
def test_postcopy_with_multifd_is_refused_only_before_8_1(version: str | None,
                                                          refused: bool) -> None:
    both = {"postcopy-ram": True, "multifd": True}
    assert (postcopy_multifd_refusal(version, both) is not None) is refused
    assert postcopy_multifd_refusal(version, {"multifd": True}) is None
    assert postcopy_multifd_refusal(version, {"postcopy-ram": True}) is None


def test_the_results_store_keeps_the_tuning_as_a_dimension(tmp_path: Path) -> None:
    runs = Path(__file__).resolve().parents[1] / "data" / "runs"
    tuned = tmp_path / "tuned"
    shutil.copytree(runs / "hugetlb-2m", tuned)
    meta = json.loads((tuned / "run.json").read_text())
    meta["run_id"] += "-tuned"
    meta["plan"]["source_capabilities"]["xbzrle"] = True
    meta["plan"]["source_parameters"]["xbzrle-cache-size"] = 1 << 25
    (tuned / "run.json").write_text(json.dumps(meta))
    with ResultsStore.open(tmp_path / "results.sqlite", create=True) as store:
        store.import_run(runs / "hugetlb-2m")
        store.import_run(tuned)
        [row] = store.select(parse_selector("tuning=xbzrle;xbzrle-cache-size=33554432"))
        assert row["run_id"] == meta["run_id"]
        [plain] = store.select(parse_selector("tuning="))
        assert plain["tuning"] == ""


def test_the_report_shows_the_tuning_in_both_renderers(tmp_path: Path) -> None:
    runs = Path(__file__).resolve().parents[1] / "data" / "runs"
    tuned = tmp_path / "tuned"
    shutil.copytree(runs / "hugetlb-2m", tuned)
    meta = json.loads((tuned / "run.json").read_text())
    meta["plan"]["source_capabilities"]["auto-converge"] = True
    (tuned / "run.json").write_text(json.dumps(meta))
    report = build_report(tuned)
    assert report.environment["tuning"] == "auto-converge"
    assert "tuning auto-converge" in terminal_text(report, width=120)
    assert "tuning auto-converge" in environment_line(report)
    plain = build_report(runs / "hugetlb-2m")
    assert "tuning" not in terminal_text(plain, width=120)


class _ExitingDestination:
    """A destination QEMU that has just exited (what a cut incoming stream does to it)."""

    async def fail_if_exits(self) -> None:
        raise QemuExitedError("QEMU exited unexpectedly", name="dst", status=1)


class _Driver:
    def __init__(self) -> None:
        self.cancel_sent = asyncio.Event()


async def test_a_destination_exit_is_a_failure_unless_a_cancel_rule_sent_migrate_cancel() -> None:
    driver = _Driver()
    with pytest.raises(QemuExitedError):
        await destination_alive(_ExitingDestination(), driver)  # type: ignore[arg-type]
    # After the cancel, the exit is the cancel's doing: the guard waits for the driver's
    # own error (which rule fired) instead of racing it with "QEMU exited unexpectedly".
    driver.cancel_sent.set()
    waiting = asyncio.create_task(
        destination_alive(_ExitingDestination(), driver))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
