"""QEMU's pre-9.0 TCG dirty-tracking bug: plans refused before boot, old runs flagged."""

from __future__ import annotations

import pytest

from migrator.config import parse_scenario
from migrator.config.models import MigrationSpec
from migrator.qemu.known_issues import tcg_dirty_tracking_refusal, tcg_dirty_tracking_risk


def _migration(**fields: object) -> MigrationSpec:
    return parse_scenario({"name": "t", "migration": fields}).migration


@pytest.mark.parametrize(
    ("version", "accel", "passes", "warned"),
    [
        ("7.2.22", "tcg", 4, True),
        ("7.2.22", "tcg", 3, True),
        ("7.2.22", "tcg", 2, False),
        ("7.2.22", "kvm", 40, False),
        ("9.0.0", "tcg", 40, False),
        ("10.0.2", "tcg", 40, False),
        ("11.1.3", "tcg", 121, False),
        ("8.2.1", "tcg", None, False),
        (None, "tcg", 10, False),
        ("garbage", "tcg", 10, False),
    ],
)
def test_only_old_tcg_runs_past_two_passes_are_flagged(
    version: str | None, accel: str, passes: int | None, warned: bool
) -> None:
    warning = tcg_dirty_tracking_risk(version, accel, passes)
    assert (warning is not None) == warned
    if warning:
        assert "03bfc2188f" in warning
        assert f"{passes} dirty-sync passes" in warning


@pytest.mark.parametrize(
    ("migration", "plan"),
    [
        ({"switchover": {"policy": "after-seconds", "seconds": 1.0}},
         'policy = "after-seconds", seconds = 1'),
        ({"switchover": {"policy": "after-passes", "passes": 2}},
         'policy = "after-passes", passes = 2'),
        ({"postcopy": False}, "pre-copy-only"),
        ({"postcopy": False, "switchover": {"policy": "immediately"}}, "pre-copy-only"),
    ],
)
def test_old_tcg_refuses_plans_that_can_run_a_second_round(
    migration: dict[str, object], plan: str
) -> None:
    reason = tcg_dirty_tracking_refusal("7.2.22", "tcg", _migration(**migration))
    assert reason is not None
    assert plan in reason
    assert "03bfc2188f" in reason
    assert "QEMU 9.0" in reason
    assert 'policy = "immediately"' in reason  # the safe setting is named
    assert "vm.qemu_root" in reason


@pytest.mark.parametrize(
    ("version", "accel", "migration"),
    [
        ("7.2.22", "tcg", {"switchover": {"policy": "immediately"}}),
        ("7.2.22", "kvm", {"switchover": {"policy": "after-seconds", "seconds": 3.0}}),
        ("9.0.0", "tcg", {"postcopy": False}),
        ("10.0.2", "tcg", {"switchover": {"policy": "after-seconds", "seconds": 3.0}}),
        ("11.1.3", "tcg", {"switchover": {"policy": "after-passes", "passes": 40}}),
    ],
)
def test_sound_combinations_are_not_refused(
    version: str, accel: str, migration: dict[str, object]
) -> None:
    assert tcg_dirty_tracking_refusal(version, accel, _migration(**migration)) is None
