"""``migrator hosts check``: the preflight every operator runs before a migration.

The preflight machinery (QEMU probing, the guest build, SSH) is imported when
the command runs, not with this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from migrator.cli.common import (
    ScenarioArgument,
    VerboseOption,
    err,
    fail,
    out,
    print_json,
    setup_logging,
)
from migrator.errors import ExitCode, MigratorError

if TYPE_CHECKING:
    from rich.table import Table

    from migrator.config.models import Scenario
    from migrator.hosts.base import Host
    from migrator.preflight import HostReport, PreflightReport

__all__ = ["hosts_app"]

hosts_app = typer.Typer(no_args_is_help=True, help="The hosts a scenario runs on.")


async def _kvm_verdict(host: Host, scenario: Scenario) -> tuple[bool | None, str]:
    """Whether KVM can really run a guest on ``host`` (booted, not guessed)."""
    from migrator.cache import CACHE_DIR
    from migrator.config.models import Accel
    from migrator.guest.build import ensure_guest
    from migrator.qemu.accel import decide_accel
    from migrator.qemu.probe import probe_qemu

    try:
        facts = await probe_qemu(host, scenario.vm.qemu, scenario.vm.qemu_root)
        guest = await ensure_guest(CACHE_DIR / "guest", scenario.guest.kernel)
        decision = await decide_accel(host, Accel.AUTO, facts, guest, CACHE_DIR / "accel.json")
    except MigratorError as error:
        return None, f"not probed: {error}"
    return decision.accel == "kvm", f"{decision.reason} ({decision.method})"


async def run_checks(scenario: Scenario) -> PreflightReport:
    """The preflight of both hosts, KVM usability included."""
    from migrator.preflight import check_hosts
    from migrator.runner import scenario_hosts

    async with scenario_hosts(scenario) as (source, destination):
        kvm = {source.name: await _kvm_verdict(source, scenario)}
        if destination is not source:
            kvm[destination.name] = await _kvm_verdict(destination, scenario)
        return await check_hosts(scenario, source, destination, kvm)


def _host_table(host: HostReport) -> Table:
    from rich.table import Table

    table = Table(title=f"{host.host} ({' + '.join(host.roles)})", title_justify="left",
                  show_header=False, show_edge=False)
    table.add_column("fact", style="bold")
    table.add_column("value")
    kvm = {True: "usable", False: "not usable", None: "unknown"}[host.kvm_usable]
    table.add_row("kernel", host.kernel)
    table.add_row("KVM", f"/dev/kvm {'present' if host.kvm_device else 'absent'}, {kvm}: "
                         f"{host.kvm_detail}")
    table.add_row("QEMU", f"{host.qemu_binary} {host.qemu_version}" if host.qemu_binary
                  else "not found")
    table.add_row("capabilities", ", ".join(host.qemu_capabilities) or "-")
    table.add_row("hugepages", ", ".join(
        f"{p.page_size_kib} kB: {p.free} free of {p.total}" for p in host.hugepage_pools))
    table.add_row("hugetlbfs", ", ".join(f"{m.path} ({m.options})"
                                         for m in host.hugetlbfs_mounts) or "none mounted")
    table.add_row("userfaultfd", "yes" if host.userfaultfd else "no")
    table.add_row("HGM", "supported" if host.hgm.get("supported") else
                  f"not supported: {host.hgm.get('reason')}")
    table.add_row("memory available", f"{host.mem_available_mib} MiB")
    table.add_row("CPUs online", host.cpus_online)
    table.add_row("NUMA nodes", host.numa_nodes)
    table.add_row("clock offset", f"{host.clock_offset_ms} ms (round trip {host.clock_rtt_ms} ms)"
                  if host.clock_offset_ms is not None else "unknown")
    for need in host.needs:
        mark = "[green]ok[/green]" if need.met else "[red]UNMET[/red]"
        fix = f" -> {need.fix}" if need.fix and not need.met else ""
        table.add_row(f"need: {need.what}", f"{mark} {need.detail}{fix}")
    return table


@hosts_app.command("check")
def check(
    scenario: ScenarioArgument,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON, not tables")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Check each host of a scenario; exit 3 when any need is unmet."""
    import asyncio

    from migrator.config.loader import load_scenario

    setup_logging(verbose)
    try:
        loaded = load_scenario(scenario)
        report = asyncio.run(run_checks(loaded))
    except MigratorError as error:
        raise fail(error) from None
    if json_out:
        print_json(report.model_dump_json())
    else:
        for host in report.hosts:
            out.print(_host_table(host))
    if not report.ok:
        unmet = sum(len(host.unmet) for host in report.hosts)
        err.print(f"[bold red]{unmet} unmet need(s)[/bold red]", highlight=False)
        raise typer.Exit(ExitCode.PREFLIGHT)
