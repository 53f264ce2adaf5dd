"""QEMU bugs that change what a run means: refused before boot, or flagged after a run.

**Post-copy with multifd before QEMU 8.1.**  Such a QEMU takes the ``multifd`` and
``postcopy-ram`` capabilities together without a word, although its post-copy
does not work with multifd: on Debian 12's 7.2.22 the destination aborted right
after the switch (``yank_unregister_instance: Assertion
`QLIST_EMPTY(&entry->yankfns)' failed``; tests/integration/test_migration_tuning.py
is that run, refused now).  QEMU 8.1 and later refuse the pair themselves
("Postcopy is not yet compatible with multifd"), which preflight's trial of the
settings reports, until QEMU learned to do both (11.1 takes it).  So migrator
refuses the pair before 8.1 (:func:`postcopy_multifd_refusal`).

**Dirty tracking under TCG before QEMU 9.0**, with its evidence in docs/qemu-notes.md
("Guest kernel crash after post-copy with small TCG guests"):

QEMU before 9.0 under TCG clears the dirty bitmap on a fast path without flushing the
vCPU TLBs, so later writes to pages already sent are never logged again (fixed upstream
by 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory access",
in 9.0). Measured on Debian 12's 7.2: 47 of 48 runs whose source ended with 4 or more
dirty-sync passes crashed the guest on the destination, and a 2 MiB page-size run that
ended at 3 passes crashed too; runs that switched to post-copy within pre-copy's first
round (2 passes) never did. KVM tracks dirty pages in the kernel and is not affected.

So on such a QEMU under TCG migrator only runs plans that cannot pass 2 dirty-sync
passes: post-copy with ``switchover = { policy = "immediately" }``.
"""

from __future__ import annotations

from migrator.config.models import AfterPasses, AfterSeconds, Immediately, MigrationSpec

__all__ = [
    "POSTCOPY_MULTIFD_REFUSED_FROM",
    "TCG_DIRTY_TRACKING_FIXED_IN",
    "TCG_DIRTY_TRACKING_SAFE_PASSES",
    "postcopy_multifd_refusal",
    "tcg_dirty_tracking_refusal",
    "tcg_dirty_tracking_risk",
]

TCG_DIRTY_TRACKING_SAFE_PASSES = 2
"""The most dirty-sync passes a run on an affected QEMU under TCG is known to survive."""
TCG_DIRTY_TRACKING_FIXED_IN = (9, 0)
_FIX = ('upstream fix 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG '
        'memory access", in QEMU 9.0')


POSTCOPY_MULTIFD_REFUSED_FROM = (8, 1)
"""The first QEMU that refuses post-copy with multifd itself, rather than crash on it."""


def _version(qemu_version: str | None) -> tuple[int, ...] | None:
    """(major, minor) of a version string; None when it cannot be read."""
    try:
        return tuple(int(part) for part in (qemu_version or "").split(".")[:2])
    except ValueError:
        return None


def postcopy_multifd_refusal(qemu_version: str | None, capabilities: dict[str, bool]) -> str | None:
    """Why ``capabilities`` (a side's plan) must not run on this QEMU, or None.

    Post-copy with multifd on a QEMU older than 8.1 (see module docstring).
    """
    version = _version(qemu_version)
    if not (capabilities.get("postcopy-ram") and capabilities.get("multifd")):
        return None
    if version is None or version >= POSTCOPY_MULTIFD_REFUSED_FROM:
        return None
    return (f"QEMU {qemu_version} takes post-copy with multifd but its destination aborts "
            "after the switch (yank_unregister_instance assertion, measured on 7.2.22); "
            "QEMU 8.1 and later refuse the pair, 11.1 runs it: drop [migration.multifd] "
            "or use a newer QEMU (vm.qemu_root)")


def _affected(qemu_version: str | None, accel: str | None) -> bool:
    """True for a QEMU older than 9.0 running under TCG (an unreadable version is not)."""
    version = _version(qemu_version)
    return accel == "tcg" and version is not None and version < TCG_DIRTY_TRACKING_FIXED_IN


def _bounded(spec: MigrationSpec) -> bool:
    """Whether the plan switches to post-copy before pre-copy's first round ends.

    ``immediately`` asks for post-copy as the migration starts, so the source
    syncs its dirty bitmap twice: at setup and at the switch.  Any other policy,
    and pre-copy alone, runs as many rounds as the bandwidth and the guest allow.
    """
    return spec.postcopy and isinstance(spec.switchover, Immediately)


def _plan_text(spec: MigrationSpec) -> str:
    if not spec.postcopy:
        return "a pre-copy-only migration (migration.postcopy = false)"
    switch = spec.switchover
    detail = ""
    if isinstance(switch, AfterSeconds):
        detail = f", seconds = {switch.seconds:g}"
    elif isinstance(switch, AfterPasses):
        detail = f", passes = {switch.passes}"
    return f'migration.switchover = {{ policy = "{switch.policy}"{detail} }}'


def tcg_dirty_tracking_refusal(
    qemu_version: str | None, accel: str | None, spec: MigrationSpec
) -> str | None:
    """Why ``spec`` must not run on the source's QEMU ``qemu_version`` under ``accel``.

    None when the QEMU is not affected (9.0 or later, or KVM) or the plan stays
    within :data:`TCG_DIRTY_TRACKING_SAFE_PASSES`.
    """
    if not _affected(qemu_version, accel) or _bounded(spec):
        return None
    return (
        f"QEMU {qemu_version} under TCG loses dirty-page tracking once pre-copy runs past its "
        f"first round ({_FIX}), and {_plan_text(spec)} can run more than "
        f"{TCG_DIRTY_TRACKING_SAFE_PASSES} dirty-sync passes: the guest would go on from "
        "stale memory on the destination. Use QEMU >= 9.0 (scripts/setup installs 10.0 from "
        "bookworm-backports; or set vm.qemu_root), or on this QEMU migrate with "
        'postcopy = true and switchover = { policy = "immediately" }'
    )


def tcg_dirty_tracking_risk(
    qemu_version: str | None, accel: str | None, dirty_sync_count: int | None
) -> str | None:
    """A warning when this run may have lost dirty pages to the TCG bug; None otherwise.

    For runs made before migrator refused such plans, or on hosts whose version
    string it could not read at the time.
    """
    if (not _affected(qemu_version, accel) or dirty_sync_count is None
            or dirty_sync_count <= TCG_DIRTY_TRACKING_SAFE_PASSES):
        return None
    return (
        f"QEMU {qemu_version} under TCG ran {dirty_sync_count} dirty-sync passes: before 9.0 "
        f"TCG loses dirty-page tracking after the first round ({_FIX}), so guest memory may "
        "be stale on the destination; use QEMU >= 9.0, or switch to post-copy immediately"
    )
