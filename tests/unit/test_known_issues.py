"""Recognising runs that QEMU's pre-9.0 TCG dirty-tracking bug may have corrupted."""

from __future__ import annotations

import pytest

from migrator.qemu.known_issues import tcg_dirty_tracking_risk


@pytest.mark.parametrize(
    ("version", "accel", "passes", "warned"),
    [
        ("7.2.22", "tcg", 4, True),
        ("7.2.22", "tcg", 3, False),
        ("7.2.22", "kvm", 40, False),
        ("9.0.0", "tcg", 40, False),
        ("11.1.3", "tcg", 121, False),
        ("8.2.1", "tcg", None, False),
        (None, "tcg", 10, False),
        ("garbage", "tcg", 10, False),
    ],
)
def test_only_old_tcg_runs_past_three_passes_are_flagged(
    version: str | None, accel: str, passes: int | None, warned: bool
) -> None:
    warning = tcg_dirty_tracking_risk(version, accel, passes)
    assert (warning is not None) == warned
    if warning:
        assert "03bfc2188f" in warning
        assert f"{passes} dirty-sync passes" in warning
