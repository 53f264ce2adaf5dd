"""What a run decides before it boots anything, each decision recorded in run.json.

The deciding is done below (:mod:`migrator.hgm`, :mod:`migrator.qemu.accel`,
:mod:`migrator.qemu.known_issues`); here it is applied to both sides of the
run, written into run.json and marked on the timeline.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from migrator.config.models import Scenario
from migrator.errors import PreflightError
from migrator.guest.build import GuestArtifacts
from migrator.guest.console import Side
from migrator.hgm import (
    HgmDecision,
    HgmSupport,
    decide_hgm_between,
    detect_hgm_for_sides,
    hgm_not_applicable,
)
from migrator.hosts.base import Host
from migrator.qemu.accel import AccelDecision, decide_accel_between
from migrator.qemu.known_issues import tcg_dirty_tracking_refusal
from migrator.qemu.probe import QemuFacts
from migrator.runner.journal import RunJournal

__all__ = ["choose_accel", "decide_hgm", "refuse_known_bad"]


async def decide_hgm(
    journal: RunJournal, scenario: Scenario, hosts: dict[Side, Host],
    facts: dict[Side, QemuFacts], known: dict[Side, HgmSupport] | None = None,
) -> HgmDecision:
    """Apply ``vm.hgm`` to what the hosts offer, and record it in run.json.

    Hosts are probed only when HGM could matter (:func:`hgm_not_applicable`),
    and only for what ``known`` (what the preflight detected) lacks.
    ``require`` on a host without HGM raises :class:`PreflightError` before
    anything boots.
    """
    vm = scenario.vm
    record: dict[str, Any] = {"mode": vm.hgm, "enabled": False, "reason": "",
                              "hosts": {}}
    journal.meta["hgm"] = record
    decision = hgm_not_applicable(scenario)
    if decision is None:
        supports = await detect_hgm_for_sides(hosts, facts, known)
        record["hosts"] = {"source": supports["src"].to_dict(),
                           "destination": supports["dst"].to_dict()}
        distinct = [supports["src"]] if hosts["dst"] is hosts["src"] else [
            supports["src"], supports["dst"]]
        try:
            decision = decide_hgm_between(vm.hgm, distinct)
        except PreflightError as error:
            record["reason"] = str(error)
            journal.save_meta()
            raise
    record.update(enabled=decision.enabled, reason=decision.reason)
    journal.save_meta()
    journal.mark("hgm-decided", mode=decision.mode, enabled=decision.enabled)
    return decision


async def choose_accel(
    journal: RunJournal, scenario: Scenario, hosts: dict[Side, Host],
    facts: dict[Side, QemuFacts], guest: GuestArtifacts, cache_file: Path,
) -> AccelDecision:
    """One accelerator for both QEMUs (:func:`decide_accel_between`), recorded in run.json."""
    distinct = {hosts[side]: facts[side] for side in ("src", "dst")}
    chosen, decisions = await decide_accel_between(scenario.vm.accel, distinct, guest,
                                                   cache_file)
    journal.meta["accel"] = asdict(chosen)
    if len(decisions) > 1:
        journal.meta["accel_by_host"] = {host.name: asdict(decision)
                                         for host, decision in zip(distinct, decisions,
                                                                   strict=True)}
    journal.save_meta()
    journal.mark("accel", accel=chosen.accel, method=chosen.method)
    return chosen


def refuse_known_bad(journal: RunJournal, scenario: Scenario, facts: QemuFacts,
                     accel: AccelDecision) -> None:
    """:class:`PreflightError` for a QEMU and accelerator known to corrupt this plan.

    Only the source's QEMU tracks dirty pages, so only its version (``facts``) matters.
    """
    reason = tcg_dirty_tracking_refusal(facts.version, accel.accel, scenario.migration)
    if reason is not None:
        journal.mark("refused", reason=reason)
        raise PreflightError(f"vm.qemu: {reason}")
