"""Scenario files in and out: TOML -> :class:`Scenario`, and back to TOML or JSON Schema."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from migrator.config.models import NO_ECHO_FIELDS, Scenario
from migrator.errors import ConfigError

__all__ = ["dump_scenario", "load_scenario", "parse_scenario", "read_toml", "scenario_schema"]


def _describe(error: ValidationError) -> tuple[str, str]:
    """The first validation problem as (dotted field, message), plus a count of the rest."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    # Discriminated unions add the tag to the location ("switchover.after-seconds.seconds");
    # that is still the clearest name for the field.
    message = first["msg"].removeprefix("Value error, ")
    secret = bool(first["loc"]) and first["loc"][-1] in NO_ECHO_FIELDS
    if first["type"] not in ("missing", "extra_forbidden") and "input" in first and not secret:
        given = first["input"]
        if not isinstance(given, dict | list):
            message += f" (got {given!r})"
    if first["type"] == "extra_forbidden":
        message = "unknown key; remove it or check its spelling"
    more = error.error_count() - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return field, message


def parse_scenario(data: dict[str, Any], *, source: str = "scenario") -> Scenario:
    """Validate an already-decoded scenario mapping; :class:`ConfigError` names the field."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as error:
        field, message = _describe(error)
        where = f"{source}: {field}" if field else source
        raise ConfigError(message, field=where) from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Decode a TOML file; every way it can fail is a :class:`ConfigError` naming ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no such {what} file", field=str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        # A directory, no permission, a path component that is a file, a name too long...
        raise ConfigError(f"cannot read {what} file: {error}", field=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", field=str(path)) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError("not valid TOML: arrays or tables nested too deeply",
                          field=str(path)) from None


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario TOML file."""
    return parse_scenario(read_toml(path, "scenario"), source=str(path))


def dump_scenario(scenario: Scenario) -> str:
    """Render a scenario as TOML with every default made explicit (the resolved config)."""
    data = scenario.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def scenario_schema() -> str:
    """JSON Schema of scenario files, for editors."""
    return json.dumps(Scenario.model_json_schema(), indent=2, sort_keys=True)
