"""The one exit-code table (migrator.errors.ExitCode) and the docs that show it."""

from __future__ import annotations

import re

from migrator.errors import (
    ConfigError,
    ExitCode,
    MigrationError,
    MigratorError,
    PreflightError,
    RunFailed,
    StoreError,
)
from migrator.outcome import EXIT_CODES, Outcome, failure
from tests.guides import ROOT

# A Markdown table row whose first cell holds exit codes: "| 0 |", "| 130, 143 |".
_ROW = re.compile(r"^\|\s*(\d+(?:\s*,\s*\d+)*)\s*\|(.*)\|\s*$")


def _code_rows(text: str) -> list[tuple[list[int], list[str]]]:
    rows = []
    for line in text.splitlines():
        match = _ROW.match(line)
        if match:
            codes = [int(code) for code in match[1].split(",")]
            rows.append((codes, [cell.strip() for cell in match[2].split("|")]))
    return rows


def test_every_code_in_the_docs_is_in_the_table() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    seen = 0
    for page in pages:
        for codes, _cells in _code_rows(page.read_text()):
            for code in codes:
                assert code in ExitCode._value2member_map_, f"{page.name}: exit code {code}"
                seen += 1
    assert seen >= len(ExitCode)


def test_the_operator_guide_shows_each_outcome_with_its_code() -> None:
    rows = _code_rows((ROOT / "docs" / "operator.md").read_text())
    shown: dict[int, str] = {}
    for codes, cells in rows:
        outcome = Outcome(cells[0].strip("`"))
        for code in codes:
            shown[code] = outcome
            if outcome in EXIT_CODES:
                assert EXIT_CODES[outcome] == code, f"{outcome}: guide says {code}"
    assert sorted(shown) == sorted(ExitCode), "every exit code has its row in docs/operator.md"
    assert {shown[ExitCode.INTERRUPTED_SIGINT], shown[ExitCode.INTERRUPTED_SIGTERM]} == {
        Outcome.INTERRUPTED}
    assert {shown[code] for code in (1, 2, 3)} == {Outcome.NOT_STARTED}


def test_an_outcome_failure_carries_its_exit_code_and_statement() -> None:
    error = failure(Outcome.FAILED_AFTER_SWITCHOVER, "failed after switchover: x; lost")
    assert isinstance(error, RunFailed)
    assert (error.exit_code, error.outcome, str(error)) == (
        5, "failed-after-switchover", "failed after switchover: x; lost")


def test_exit_codes_4_and_5_belong_to_outcomes_only() -> None:
    # An exception class that reaches the CLI unwrapped (nothing booted) gives 1, 2 or 3;
    # 4 and 5 come only from a RunFailed with that outcome.
    assert MigrationError("x").exit_code == ExitCode.FAILED
    assert (ConfigError("x").exit_code, StoreError("x").exit_code) == (2, 2)
    assert PreflightError("x").exit_code == 3
    assert MigratorError("x").exit_code == 1
