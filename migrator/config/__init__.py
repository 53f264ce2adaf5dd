"""Scenario models and their TOML loader."""

from migrator.config.loader import dump_scenario, load_scenario, parse_scenario, scenario_schema
from migrator.config.models import (
    Accel,
    Backing,
    MigrationSpec,
    Pattern,
    Scenario,
    VmSpec,
    WorkloadSpec,
)

__all__ = [
    "Accel",
    "Backing",
    "MigrationSpec",
    "Pattern",
    "Scenario",
    "VmSpec",
    "WorkloadSpec",
    "dump_scenario",
    "load_scenario",
    "parse_scenario",
    "scenario_schema",
]
