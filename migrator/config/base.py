"""What every scenario model shares: strict validation, and the pattern of a host address."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ADDRESS_PATTERN", "ScenarioModel"]

ADDRESS_PATTERN = r"^[A-Za-z0-9_.:%-]+$"
"""A host name or IP address (v4, v6 with an optional zone)."""


class ScenarioModel(BaseModel):
    """Base of every scenario table: unknown keys rejected, values never coerced, frozen."""

    # strict: TOML has real booleans and numbers, so "no" for a bool or "1024" for an int is
    # a mistake to report, never to coerce (check_host_key = "no" must not turn checking off).
    # Paths and enums still come from strings (Field(strict=False) on those fields).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
