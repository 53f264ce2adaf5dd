"""QEMU bugs that change what a run means, and how to recognise a run they may have hit."""

from __future__ import annotations

__all__ = ["TCG_DIRTY_TRACKING_SAFE_PASSES", "tcg_dirty_tracking_risk"]

# QEMU before 9.0 under TCG clears the dirty bitmap on a fast path without flushing the
# vCPU TLBs, so later writes to pages already sent are never logged again (fixed upstream
# by 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory access").
# Measured on 7.2 (docs/qemu-notes.md): 0 of 62 runs that ended within 3 dirty-sync
# passes corrupted the guest, 47 of 48 that needed 4 or more did.
TCG_DIRTY_TRACKING_SAFE_PASSES = 3
_FIXED_IN = (9, 0)


def tcg_dirty_tracking_risk(
    qemu_version: str | None, accel: str | None, dirty_sync_count: int | None
) -> str | None:
    """A warning when this run may have lost dirty pages to the TCG bug; None otherwise."""
    if accel != "tcg" or not qemu_version or dirty_sync_count is None:
        return None
    try:
        version = tuple(int(part) for part in qemu_version.split(".")[:2])
    except ValueError:
        return None
    if version >= _FIXED_IN or dirty_sync_count <= TCG_DIRTY_TRACKING_SAFE_PASSES:
        return None
    return (
        f"QEMU {qemu_version} under TCG ran {dirty_sync_count} dirty-sync passes: before 9.0 "
        "TCG loses dirty-page tracking after the first passes (upstream fix 03bfc2188f), so "
        "guest memory may be stale on the destination; switch to post-copy earlier or use "
        "QEMU >= 9.0"
    )
