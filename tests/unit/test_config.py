"""Scenario models and loader: defaults, validation messages, round trip, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migrator.config import Backing, dump_scenario, load_scenario, parse_scenario, scenario_schema
from migrator.config.models import AfterPasses
from migrator.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    scenario = load_scenario(path)
    again = tmp_path / "again.toml"
    again.write_text(dump_scenario(scenario))
    assert load_scenario(again) == scenario


def test_defaults_are_the_main_job() -> None:
    scenario = parse_scenario({"name": "x"})
    assert scenario.vm.backing is Backing.HUGETLB_1G
    assert scenario.vm.memory_mib == 1024
    assert scenario.migration.postcopy
    assert scenario.collect.compress == "zstd"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "x", "vm": {"backng": "x"}}, "vm.backng: unknown key"),
        ({"name": "x", "vm": {"backing": "huge"}}, "vm.backing: Input should be"),
        ({"name": "x", "vm": {"memory_mib": "lots"}}, "vm.memory_mib: Input should be a valid"),
        ({"name": "x", "vm": {"memory_mib": 1000}}, "not a multiple of the hugetlb-1g page"),
        ({"name": "x", "migration": {"postcopy": False, "preempt": True}},
         "preempt = true needs postcopy = true"),
        ({"name": "x", "workload": {"working_set_mib": 1000}}, "workload.working_set_mib=1000"),
        ({"name": "x", "migration": {"switchover": {"policy": "after-seconds"}}},
         "migration.switchover.after-seconds.seconds: Field required"),
        ({"name": "x", "migration": {"switchover": {"policy": "whenever"}}},
         "migration.switchover"),
        ({"name": "x", "collect": {"compress": "gzip"}},
         "collect.compress: Input should be 'zstd' or 'none'"),
        ({"name": "bad name"}, "name: String should match"),
        ({}, "name: Field required"),
    ],
)
def test_invalid_scenarios_name_the_field(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(data, source="s.toml")
    message = str(caught.value)
    assert expected in message
    assert message.startswith("s.toml")
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_switchover_policies_parse() -> None:
    scenario = parse_scenario(
        {"name": "x", "migration": {"switchover": {"policy": "after-passes", "passes": 3}}}
    )
    assert scenario.migration.switchover == AfterPasses(passes=3)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such scenario file"):
        load_scenario(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(broken)


def test_schema_is_json_and_forbids_unknown_keys() -> None:
    schema = json.loads(scenario_schema())
    assert schema["additionalProperties"] is False
    assert "vm" in schema["properties"]
