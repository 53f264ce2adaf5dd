"""One scenario, run end to end: preflight, boot, migrate, verify, tear down, report.

The runner owns the order of things and the guarantee that whatever happens
(an error, Ctrl-C, a QEMU crash, a lost SSH connection) every QEMU is stopped,
every socket and hugetlbfs file removed, every hugepage given back, and every
raw artifact already collected kept.  It does this with one ``AsyncExitStack``:
each resource is entered right after it exists, so it is released in reverse
order on any exit.

Where files live.  What the controller records (run.json, timeline, samples,
QMP events, consoles, argv) is written to the local run directory as it
happens.  What a QEMU writes itself (stdout/stderr, serial.log, trace.log), its
sockets and the guest kernel it boots live on the QEMU's host: in the run
directory for a local host; under ``WORK_DIR/RUN_ID/`` (``src/``, ``dst/``,
``guest/``) on an SSH host, fetched back into the run directory when the run
ends and then removed (see :func:`remote_run_dir`, which also covers a
controller that dies).  QMP and the serial consoles are reached through
:meth:`Host.forward_unix_socket`; the migration stream goes from host to host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from migrator import __version__
from migrator.aio import background, first_error, guarded
from migrator.config.loader import dump_scenario
from migrator.config.models import HostSpec, PoolExhaustedFault, Scenario, SSHHostSpec
from migrator.errors import (
    ConfigError,
    GuestError,
    HostError,
    IntegrityError,
    MigratorError,
    PreflightError,
    QemuError,
    RunFailed,
)
from migrator.faults import FaultTargets, exhaust_hugepage_pool, inject_faults
from migrator.guest.build import GuestArtifacts, ensure_guest, kernel_cmdline
from migrator.guest.console import GuestConsole, Side, serial_chardev_args
from migrator.guest.crash import kernel_crash
from migrator.guest.protocol import Heartbeat, ProbeError, Ready, Verify
from migrator.hgm import (
    GuestRamFilter,
    HgmDecision,
    HgmSupport,
    decide_hgm_between,
    detect_hgm,
    sample_smaps,
)
from migrator.hosts.base import Host, HostProcess
from migrator.hosts.hugepages import hugetlbfs_dir, reserve_hugepages
from migrator.hosts.local import LocalHost
from migrator.hosts.ssh import SSHHost, SSHTarget
from migrator.metrics.events import load_events, read_jsonl
from migrator.metrics.qemu_counters import final_source_ram
from migrator.migration.driver import MigrationDriver
from migrator.migration.plan import MigrationPlan, destination_address, plan_migration
from migrator.migration.sampler import sample_query_migrate
from migrator.migration.tls import enable_tls
from migrator.outcome import (
    Outcome,
    Situation,
    describe,
    failure,
    last_source_ram,
    postcopy_missed,
    switched_over,
)
from migrator.preflight import Role, check_hosts, raise_unmet
from migrator.qemu.accel import AccelDecision, decide_accel, stage_guest
from migrator.qemu.cmdline import LaunchSpec
from migrator.qemu.known_issues import tcg_dirty_tracking_refusal
from migrator.qemu.probe import QemuFacts
from migrator.qemu.process import QemuProcess
from migrator.rundir import SIDES, JsonlWriter, RunDir

__all__ = [
    "CACHE_DIR",
    "Observer",
    "free_tcp_port",
    "remote_run_dir",
    "run_scenario",
    "scenario_hosts",
    "ssh_target",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_DIR = Path(os.environ.get("MIGRATOR_CACHE", Path.home() / ".cache" / "migrator"))
# sun_path holds 108 bytes.  Longer socket paths move to a private temp dir on a
# local host; on an SSH host they are a ConfigError (see _check_layout).
MAX_SOCKET_PATH = 100
VERIFY_TIMEOUT_S = 600.0
# A running guest heartbeats every few ms; this much silence means it is dead or hung.
HEARTBEAT_SILENCE_S = 30.0
# How long a failed run waits for each QEMU's exit to be reported before naming the dead.
EXIT_NOTICE_S = 0.5
# What a QEMU writes itself on its host; fetched back from remote hosts after the run.
QEMU_OUTPUT_FILES = ("stdout.log", "stderr.log", "serial.log", "trace.log")

# The remote run directory's janitor (``sh -c JANITOR migrator-janitor DIR``): idles
# until SIGTERM, then removes DIR and exits with rm's status.  SSHHost's supervisor
# sends that SIGTERM when the janitor's channel closes, which is also what happens
# when the controller dies or its connection drops.  `sleep & wait` rather than a
# plain `sleep`: a trap runs only after a foreground command ends, but interrupts wait.
# `exit $?`, not `exit`: in a trap, a bare exit returns the interrupted wait's 143.
JANITOR = r"""
trap 'rm -rf -- "$1"; exit $?' TERM
while :; do sleep 3600 & wait $!; done
"""

# Binding to the address (port 0) both picks a free port and proves the address is
# one of the host's own: QEMU would fail later, and less clearly, if it were not.
_FREE_PORT = (
    "import socket, sys\n"
    "family = socket.getaddrinfo(sys.argv[1], 0, type=socket.SOCK_STREAM)[0][0]\n"
    "with socket.create_server((sys.argv[1], 0), family=family) as server:\n"
    "    print(server.getsockname()[1])\n"
)


class Observer:
    """Receives progress from a run (the CLI renders it; the default ignores it)."""

    def phase(self, name: str, detail: str = "") -> None:
        """The run entered a new phase."""

    def sample(self, side: str, reply: dict[str, Any]) -> None:
        """A query-migrate sample arrived."""


class _ObservedWriter:
    """Tees samples to the observer (for live progress) and the samples artifact."""

    def __init__(self, run: RunDir, observer: Observer) -> None:
        self._out = run.jsonl("samples.jsonl")
        self._observer = observer

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(record)
        if "reply" in record:
            self._observer.sample(record["side"], record["reply"])

    def close(self) -> None:
        self._out.close()


def ssh_target(spec: SSHHostSpec) -> SSHTarget:
    """How to reach a scenario's SSH host entry.

    The key's passphrase is read from the environment variable the entry names
    (the scenario validated that it is set when it was loaded), held as a SecretStr.
    """
    from pydantic import SecretStr

    passphrase = None
    if spec.identity_passphrase_env is not None:
        value = os.environ.get(spec.identity_passphrase_env)
        if not value:
            raise ConfigError(
                "the environment variable it names is no longer set (or empty); export it "
                "with the passphrase of identity_file before running migrator",
                field=f"identity_passphrase_env of the hosts entry for {spec.address}")
        passphrase = SecretStr(value)
    return SSHTarget(
        address=spec.address, port=spec.port, user=spec.user,
        identity_file=spec.identity_file.expanduser() if spec.identity_file else None,
        known_hosts=spec.known_hosts.expanduser() if spec.known_hosts else None,
        check_host_key=spec.check_host_key, connect_timeout=spec.connect_timeout_s,
        passphrase=passphrase, passphrase_env=spec.identity_passphrase_env,
    )


def _open_host(spec: HostSpec) -> AbstractAsyncContextManager[Host]:
    if isinstance(spec, SSHHostSpec):
        return SSHHost(ssh_target(spec))
    return contextlib.nullcontext(LocalHost())


@contextlib.asynccontextmanager
async def scenario_hosts(scenario: Scenario) -> AsyncIterator[tuple[Host, Host]]:
    """The source and destination hosts of a scenario, connected for the block.

    Equal entries give one object (one LocalHost, or one SSH connection running
    both QEMUs).  Leaving the block ends every process started on the hosts and
    closes their connections.
    """
    specs = scenario.hosts
    async with AsyncExitStack() as stack:
        opened: dict[HostSpec, Host] = {}
        for spec in (specs.source, specs.destination):
            if spec not in opened:
                opened[spec] = await stack.enter_async_context(_open_host(spec))
        yield opened[specs.source], opened[specs.destination]


def _uri_host(address: str) -> str:
    """An address as a QEMU URI holds it (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


async def free_tcp_port(host: Host, address: str) -> int:
    """A TCP port on ``address`` that was free on ``host`` a moment ago (for -incoming)."""
    try:
        result = await host.run(["python3", "-c", _FREE_PORT, address], timeout=30)
    except HostError as error:
        raise HostError(f"{error}; set migration_port in the destination's host entry to "
                        "choose the port instead") from None
    result.check(f"finding a free TCP port on {address} on {host.name} (is it an address "
                 "of that host?)")
    return int(result.stdout.strip())


@contextlib.asynccontextmanager
async def remote_run_dir(host: Host, root: Path, run: RunDir) -> AsyncIterator[Path]:
    """``root`` on ``host`` (0700) for one run; on exit fetched back into ``run``, then removed.

    A janitor process (:data:`JANITOR`) started before ``root`` exists removes it:
    asked to on exit, or by itself when the controller dies or its SSH connection
    drops, so the directory never outlives the run.  The QEMUs' output files in
    ``root/src`` and ``root/dst`` are copied into the run directory first (unless
    the connection dropped: the janitor has removed them with it).  When
    the block raises, a failing clean-up is logged rather than raised, so the
    error that ended the run is the one reported.
    """
    janitor = await host.start(["sh", "-c", JANITOR, "migrator-janitor", str(root)],
                               stdout=Path("/dev/null"), stderr=Path("/dev/null"))
    completed = False
    try:
        await host.make_private_dir(root)
        yield root
        completed = True
    finally:
        try:
            try:
                for side in SIDES:
                    for name in QEMU_OUTPUT_FILES:
                        with contextlib.suppress(FileNotFoundError):
                            await host.get(root / side / name, run.side(side) / name)
            finally:
                await _end_janitor(host, root, janitor)
        except MigratorError as error:
            if completed:
                raise
            log.warning("%s: cleaning up %s after a failed run: %s", host.name, root, error)


async def _end_janitor(host: Host, root: Path, janitor: HostProcess) -> None:
    """Have the janitor remove ``root`` now; :class:`HostError` if that failed."""
    await janitor.send_signal(signal.SIGTERM)
    status = await janitor.wait()
    if status != 0:
        raise HostError(f"removing {root} on {host.name} failed", status=status)


def _check_layout(scenario: Scenario, run: RunDir) -> None:
    """Topology problems found before connecting to anything (:class:`ConfigError`)."""
    for role, spec in (("source", scenario.hosts.source),
                       ("destination", scenario.hosts.destination)):
        if isinstance(spec, SSHHostSpec):
            longest = spec.work_dir / run.run_id / "src" / "serial.sock"
            if len(str(longest)) > MAX_SOCKET_PATH:
                raise ConfigError(
                    f"socket paths such as {longest} exceed {MAX_SOCKET_PATH} bytes (the unix "
                    "socket limit); use a shorter work_dir or scenario name",
                    field=f"hosts.{role}.work_dir")


def _pages_needed(scenario: Scenario) -> tuple[int, int]:
    """(page size in kB, pages per VM) for hugetlb backings."""
    backing = scenario.vm.backing
    page = backing.page_size
    return page // 1024, scenario.vm.memory_mib * (1 << 20) // page


@dataclass(frozen=True)
class _Place:
    """Where one side's QEMU runs: its host, its files' directory there, the guest it boots."""

    host: Host
    host_dir: Path
    sockets: Path
    guest: GuestArtifacts

    @property
    def qmp_socket(self) -> Path:
        """QMP's unix socket on the host."""
        return self.sockets / "qmp.sock"

    @property
    def serial_socket(self) -> Path:
        """The serial line's unix socket on the host."""
        return self.sockets / "serial.sock"


class _Run:
    """State of one run while it executes (see :func:`run_scenario`)."""

    def __init__(self, scenario: Scenario, run: RunDir, observer: Observer) -> None:
        self.scenario = scenario
        self.run = run
        self.observer = observer
        self.meta: dict[str, Any] = {
            "schema": 1,
            "run_id": run.run_id,
            "scenario": scenario.name,
            "migrator_version": __version__,
            "started_ns": time.time_ns(),
            "controller": {"hostname": platform.node(), "kernel": platform.release(),
                           "python": platform.python_version()},
            "outcome": "running",
        }
        self.timeline = run.jsonl("timeline.jsonl")
        self.hgm: HgmDecision | None = None
        self.booted = False
        self.teardown_problems: list[str] = []
        self.recoveries = 0
        self.exited: frozenset[str] = frozenset()

    def save_meta(self) -> None:
        self.run.write_json("run.json", self.meta)

    def conclude(self, error: MigratorError | None) -> Outcome:
        """State how the run ended (``outcome``, ``statement`` in run.json), from raw artifacts.

        Whether the switch happened comes from both QEMUs' MIGRATION events as
        recorded in ``events.jsonl``; what the source still held, from its last
        ``query-migrate`` sample.
        """
        statuses = load_events(self.run.path).statuses()
        remaining, transferred = last_source_ram(read_jsonl(self.run.path / "samples.jsonl"))
        outcome, statement = describe(Situation(
            switched=switched_over(statuses), completed=("dst", "completed") in statuses,
            recoveries=self.recoveries, error=error,
            booted=self.booted, source_remaining_bytes=remaining,
            destination_received_bytes=transferred, exited=self.exited,
            postcopy_missed=self._postcopy_missed(statuses) if error is None else None))
        self.meta.update(outcome=outcome.value, statement=statement, recoveries=self.recoveries)
        return outcome

    def _postcopy_missed(self, statuses: list[tuple[str, str]]) -> str | None:
        """Why a run that asked for post-copy fetched nothing post-copy; None if it did."""
        if not self.scenario.migration.postcopy:
            return None
        return postcopy_missed(statuses, final_source_ram(self.run.path))

    def mark(self, what: str, **details: Any) -> None:
        self.timeline.write({"host_ns": time.time_ns(), "what": what, **details})
        self.observer.phase(what, ", ".join(f"{k}={v}" for k, v in details.items()))

    async def teardown_step(self, stack: AsyncExitStack, step: str,
                            resource: AbstractAsyncContextManager[T]) -> T:
        """Enter ``resource`` on ``stack``; its release is marked on the timeline as ``step``.

        A release that fails is also kept in :attr:`teardown_problems` (run.json's
        ``teardown``), so nothing claims a clean teardown that did not happen.
        """
        return await stack.enter_async_context(_RecordedRelease(self, step, resource))

    def released(self, step: str, error: BaseException | None) -> None:
        """Record one teardown step (see :meth:`teardown_step`)."""
        if error is None:
            self.mark("teardown-step", step=step, ok=True)
        else:
            problem = f"{step}: {error}"
            self.teardown_problems.append(problem)
            self.mark("teardown-step", step=step, ok=False, error=str(error))

    def refuse_known_bad(self, facts: QemuFacts, accel: AccelDecision) -> None:
        """:class:`PreflightError` for a QEMU and accelerator known to corrupt this plan.

        Only the source's QEMU tracks dirty pages, so only its version matters.
        """
        reason = tcg_dirty_tracking_refusal(facts.version, accel.accel, self.scenario.migration)
        if reason is not None:
            self.mark("refused", reason=reason)
            raise PreflightError(f"vm.qemu: {reason}")

    async def preflight(self, hosts: dict[Side, Host]) -> dict[Side, QemuFacts]:
        """The hosts preflight (as ``migrator hosts check``), then the QEMU facts to launch."""
        source, destination = hosts["src"], hosts["dst"]
        report = await check_hosts(self.scenario, source, destination)
        self.run.write_json("preflight.json", report.model_dump(mode="json"))
        raise_unmet(report)
        # The preflight already probed QEMU and HGM on each host: reuse, never probe twice.
        roles: tuple[tuple[Side, Role], ...] = (("src", "source"), ("dst", "destination"))
        by_role = {side: next(h for h in report.hosts if h.for_role(role))
                   for side, role in roles}
        facts: dict[Side, QemuFacts] = {}
        for side, host_report in by_role.items():
            probed = host_report.qemu_facts
            assert probed is not None  # raise_unmet refused a host without QEMU
            facts[side] = probed
        self.meta["qemu"] = {"source": asdict(facts["src"]), "destination": asdict(facts["dst"])}
        self.save_meta()
        await self.decide_hgm(hosts, facts, known={
            side: support for side, r in by_role.items()
            if (support := r.hgm_support) is not None})
        self.meta["plan"] = asdict(self.plan())
        self.save_meta()
        return facts

    def plan(self) -> MigrationPlan:
        """Both sides' capabilities and parameters, with the HGM decision applied."""
        return plan_migration(self.scenario, hgm=self.hgm is not None and self.hgm.enabled)

    async def decide_hgm(
        self, hosts: dict[Side, Host], facts: dict[Side, QemuFacts],
        known: dict[Side, HgmSupport] | None = None,
    ) -> HgmDecision:
        """Apply ``vm.hgm`` to what the hosts offer: kept for :meth:`plan`, and in run.json.

        Hosts are probed (:func:`detect_hgm`) only when HGM could matter: a
        hugetlb backing, post-copy on, and ``hgm`` not ``off``.  ``require`` on a
        host without HGM raises :class:`PreflightError` before anything boots.
        """
        vm = self.scenario.vm
        record: dict[str, Any] = {"mode": vm.hgm, "enabled": False, "reason": "",
                                  "hosts": {}}
        self.meta["hgm"] = record
        if not vm.backing.is_hugetlb:
            decision = HgmDecision(vm.hgm, enabled=False, reason=(
                f"not applicable: vm.backing = {vm.backing.value} has 4 KiB pages (HGM maps "
                "pieces of hugetlb pages)"))
        elif not self.scenario.migration.postcopy:
            decision = HgmDecision(vm.hgm, enabled=False, reason=(
                "not applicable: migration.postcopy = false (HGM changes how post-copy "
                "resolves faults)"))
        elif vm.hgm == "off":
            decision = HgmDecision(vm.hgm, enabled=False, reason="hgm = off: not used")
        else:
            # One after the other: two "hosts" can share one hugepage pool (network
            # namespaces on one machine), and each probe grows and shrinks it.
            # ``known``: what the preflight detected; detection probes only what it lacks.
            supports: dict[Side, HgmSupport] = dict(known or {})
            if "src" not in supports:
                supports["src"] = await detect_hgm(hosts["src"], facts["src"])
            if "dst" not in supports:
                supports["dst"] = (supports["src"] if hosts["dst"] is hosts["src"]
                                   else await detect_hgm(hosts["dst"], facts["dst"]))
            record["hosts"] = {"source": supports["src"].to_dict(),
                               "destination": supports["dst"].to_dict()}
            distinct = [supports["src"]] if hosts["dst"] is hosts["src"] else [
                supports["src"], supports["dst"]]
            try:
                decision = decide_hgm_between(vm.hgm, distinct)
            except PreflightError as error:
                record["reason"] = str(error)
                self.save_meta()
                raise
        record.update(enabled=decision.enabled, reason=decision.reason)
        self.hgm = decision
        self.save_meta()
        self.mark("hgm-decided", mode=decision.mode, enabled=decision.enabled)
        return decision

    async def choose_accel(
        self, hosts: dict[Side, Host], facts: dict[Side, QemuFacts], guest: GuestArtifacts
    ) -> AccelDecision:
        """One accelerator for both QEMUs: KVM only if it really runs a guest on every host."""
        # Probed concurrently: a KVM that does not work costs each probe its whole timeout.
        distinct = {hosts[side]: facts[side] for side in ("src", "dst")}
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(decide_accel(host, self.scenario.vm.accel, qemu,
                                                        guest, CACHE_DIR / "accel.json"))
                         for host, qemu in distinct.items()]
        except BaseExceptionGroup as error:
            raise first_error(error) from None
        decisions = [task.result() for task in tasks]
        chosen = next((d for d in decisions if d.accel != "kvm"), decisions[0])
        self.meta["accel"] = asdict(chosen)
        if len(decisions) > 1:
            self.meta["accel_by_host"] = {host.name: asdict(decision)
                                          for host, decision in zip(distinct, decisions,
                                                                    strict=True)}
        self.save_meta()
        self.mark("accel", accel=chosen.accel, method=chosen.method)
        return chosen

    async def place(
        self, stack: AsyncExitStack, hosts: dict[Side, Host], guest: GuestArtifacts
    ) -> dict[Side, _Place]:
        """Each side's directory on its host; an SSH host also gets the run's guest."""
        places: dict[Side, _Place] = {}
        staged: dict[Host, GuestArtifacts] = {}
        sides: tuple[tuple[Side, HostSpec], ...] = (
            ("src", self.scenario.hosts.source), ("dst", self.scenario.hosts.destination))
        for side, spec in sides:
            host = hosts[side]
            if isinstance(spec, SSHHostSpec):
                root = spec.work_dir / self.run.run_id
                if host not in staged:
                    await self.teardown_step(stack, f"work directory removed on {host.name}",
                                             remote_run_dir(host, root, self.run))
                    staged[host] = await stage_guest(host, guest, root / "guest")
                directory = root / side
                await host.make_private_dir(directory)
                places[side] = _Place(host, directory, directory, staged[host])
            else:
                directory = self.run.side(side)
                sockets = directory
                if len(str(directory / "serial.sock")) > MAX_SOCKET_PATH:
                    sockets = await stack.enter_async_context(host.temp_dir())
                places[side] = _Place(host, directory, sockets, guest)
        self.meta["host_dirs"] = {side: {"host": place.host.name, "dir": str(place.host_dir),
                                         "sockets": str(place.sockets)}
                                  for side, place in places.items()}
        self.save_meta()
        return places

    def launch_spec(
        self, side: Side, place: _Place, facts: QemuFacts, accel: AccelDecision,
        mem_path: Path | None,
    ) -> LaunchSpec:
        scenario = self.scenario
        workload = scenario.workload
        append = kernel_cmdline(
            working_set_mib=workload.working_set_mib, write_pct=workload.write_pct,
            pattern=workload.pattern.value, stall_threshold_us=workload.stall_threshold_us,
            heartbeat_ms=workload.heartbeat_ms, threads=workload.threads,
        )
        return LaunchSpec(
            launcher=facts.launcher, name=side, memory_mib=scenario.vm.memory_mib,
            vcpus=scenario.vm.vcpus, backing=scenario.vm.backing, accel=accel.accel,
            machine=scenario.vm.machine, kernel=place.guest.kernel, initrd=place.guest.initrd,
            append=append, qmp_socket=place.qmp_socket,
            serial_args=tuple(serial_chardev_args(place.serial_socket,
                                                  place.host_dir / "serial.log")),
            mem_path=mem_path, incoming=side == "dst",
            trace_file=place.host_dir / "trace.log" if side == "dst" and scenario.collect.trace
            else None,
        )

    async def execute(self) -> None:
        """All stages in order; every resource joins the exit stack the moment it exists."""
        scenario = self.scenario
        _check_layout(scenario, self.run)
        self.mark("preflight")
        async with scenario_hosts(scenario) as (source, destination):
            hosts: dict[Side, Host] = {"src": source, "dst": destination}
            facts = await self.preflight(hosts)
            async with _exit_stack_keeping_first_error(
                    self.teardown_problems, lambda: self.mark("teardown")) as stack:
                # Pushed first, so it runs last: every release has been tried by then.
                stack.callback(lambda: self.mark("teardown-done",
                                                 clean=not self.teardown_problems))
                # Memory first: a hugepage shortfall must stop the run before anything boots.
                mem_paths = await self.reserve_memory(stack, source, destination)
                self.mark("guest-build")
                guest = await ensure_guest(CACHE_DIR / "guest", scenario.guest.kernel)
                self.meta["guest"] = {k: str(v) for k, v in asdict(guest).items()}
                accel = await self.choose_accel(hosts, facts, guest)
                self.refuse_known_bad(facts["src"], accel)
                places = await self.place(stack, hosts, guest)

                src, src_console = await self.start_vm(
                    stack, "src", places["src"],
                    self.launch_spec("src", places["src"], facts["src"], accel,
                                     mem_paths["src"]))
                self.mark("source-started", pid=src.pid)
                await self.exhaust_destination_pool(stack, destination, mem_paths["dst"])
                dst, dst_console = await self.start_vm(
                    stack, "dst", places["dst"],
                    self.launch_spec("dst", places["dst"], facts["dst"], accel,
                                     mem_paths["dst"]))
                self.mark("destination-started", pid=dst.pid)
                (self.run.side("dst") / "ramblocks.txt").write_text(
                    await dst.monitor.hmp("info ramblock"))

                try:
                    await self.boot_and_warm_up(src, dst, src_console)
                    await self.migrate(stack, hosts, src, dst, places["dst"],
                                       mem_paths["dst"])
                    await self.settle_and_verify(dst, dst_console)
                except MigratorError:
                    self.exited = await _exited_by_themselves(src, dst)
                    raise
                self.mark("shutdown")
            self.mark("cleaned-up")

    async def start_vm(
        self, stack: AsyncExitStack, side: Side, place: _Place, spec: LaunchSpec
    ) -> tuple[QemuProcess, GuestConsole]:
        """One QEMU and the console on its serial line, both owned by ``stack``."""
        host = place.host
        # QEMU removes its listening sockets when it exits, but not when it is killed.
        stack.push_async_callback(host.remove_tree, place.serial_socket)
        qemu = await self.teardown_step(
            stack, f"{side} QEMU stopped",
            QemuProcess.from_spec(host, spec, self.run.side(side), host_dir=place.host_dir))
        self.booted = True
        serial = await stack.enter_async_context(host.forward_unix_socket(place.serial_socket))
        console = await stack.enter_async_context(
            GuestConsole(serial, self.run.side(side) / "console.jsonl", side=side))
        return qemu, console

    async def reserve_memory(
        self, stack: AsyncExitStack, source: Host, destination: Host
    ) -> dict[str, Path | None]:
        """Hugepages and a hugetlbfs directory per side (nothing for 4 KiB backings)."""
        mem_paths: dict[str, Path | None] = {"src": None, "dst": None}
        if not self.scenario.vm.backing.is_hugetlb:
            return mem_paths
        size_kib, per_vm = _pages_needed(self.scenario)
        if source is destination:
            added = await self.teardown_step(
                stack, f"hugepages given back on {source.name}",
                reserve_hugepages(source, size_kib, 2 * per_vm))
            shared = await self.teardown_step(
                stack, f"hugetlbfs directory removed on {source.name}",
                hugetlbfs_dir(source, size_kib, self.run.run_id))
            mem_paths = {"src": shared, "dst": shared}
            self.mark("hugepages-added", host=source.name, page_kib=size_kib, pages=added)
        else:
            for side, host in (("src", source), ("dst", destination)):
                added = await self.teardown_step(
                    stack, f"hugepages given back on {host.name}",
                    reserve_hugepages(host, size_kib, per_vm))
                mem_paths[side] = await self.teardown_step(
                    stack, f"hugetlbfs directory removed on {host.name}",
                    hugetlbfs_dir(host, size_kib, self.run.run_id))
                self.mark("hugepages-added", host=host.name, page_kib=size_kib, pages=added)
        self.mark("hugepages-reserved", page_kib=size_kib, per_vm=per_vm)
        return mem_paths

    async def exhaust_destination_pool(
        self, stack: AsyncExitStack, destination: Host, mem_path: Path | None
    ) -> None:
        """The ``pool-exhausted`` fault: the destination's free hugepages taken before it starts."""
        for index, fault in enumerate(self.scenario.faults):
            if isinstance(fault, PoolExhaustedFault) and mem_path is not None:
                size_kib, _ = _pages_needed(self.scenario)
                hog = await exhaust_hugepage_pool(destination, mem_path, size_kib)
                stack.push_async_callback(destination.remove_tree, hog)
                self.mark("fault-injected", index=index, kind=fault.kind, file=str(hog))

    async def boot_and_warm_up(
        self, src: QemuProcess, dst: QemuProcess, console: GuestConsole
    ) -> None:
        """Wait for the probe's ready line, then let the workload run for warmup_s."""
        scenario = self.scenario

        async def boot() -> None:
            try:
                await console.wait_for(Ready, timeout=scenario.guest.boot_timeout_s)
            except GuestError as error:
                raise GuestError(
                    f"guest.boot_timeout_s: the guest did not report ready within "
                    f"{scenario.guest.boot_timeout_s:g} s ({error})"
                ) from None

        async def probe_error() -> None:
            line = await console.wait_for(ProbeError, timeout=3600 * 24)
            raise GuestError(f"the guest probe failed: {line.event.msg}")

        self.mark("guest-booting")
        await guarded(boot(), [probe_error(), src.fail_if_exits(), dst.fail_if_exits()])
        self.mark("guest-ready")
        await guarded(asyncio.sleep(scenario.workload.warmup_s),
                      [src.fail_if_exits(), dst.fail_if_exits()])

    async def migrate(
        self, stack: AsyncExitStack, hosts: dict[Side, Host], src: QemuProcess,
        dst: QemuProcess, destination: _Place, mem_path: Path | None,
    ) -> None:
        """Drive the migration with both query-migrate samplers running beside it.

        On hugetlb backings the destination's smaps sampler starts here too, but
        belongs to ``stack``: it keeps sampling after completion (QEMU collapses
        split mappings at load cleanup) until the destination QEMU stops.
        """
        scenario = self.scenario
        listens = 0

        async def listen_uri() -> str:
            # Each listen (the first, then each one a recovery asks for) gets its own port
            # or socket, unless the scenario fixed the port (migration_port).
            nonlocal listens
            listens += 1
            return await self._incoming_uri(stack, destination, listens)

        driver = MigrationDriver(src.monitor, dst.monitor, self.plan(),
                                 scenario.migration, self.timeline, listen_uri)
        uri = await listen_uri()
        if scenario.migration.tls is not None:
            self.meta["tls"] = await enable_tls(scenario, src, dst)
        await driver.prepare(uri)
        if scenario.vm.backing.is_hugetlb:
            await self._sample_destination_smaps(stack, dst, mem_path)
        samples = _ObservedWriter(self.run, self.observer)
        stack.callback(samples.close)
        hz = scenario.collect.query_migrate_hz
        async with background(
            sample_query_migrate(src.monitor, "src", samples, hz),  # type: ignore[arg-type]
            sample_query_migrate(dst.monitor, "dst", samples, hz),  # type: ignore[arg-type]
        ):
            self.observer.phase("migrating")
            faults = FaultTargets(hosts=hosts, qemus={"src": src, "dst": dst},
                                  mark=self.mark)
            try:
                result = await guarded(driver.run(uri), [
                    src.fail_if_exits(), dst.fail_if_exits(),
                    inject_faults(scenario.faults, faults)])
            finally:
                self.recoveries = driver.recovery.recoveries
        self.meta["migration"] = asdict(result)
        self.run.write_json("final-query-migrate.json", {
            "src": await src.monitor.query_migrate(timeout=30),
            "dst": await dst.monitor.query_migrate(timeout=30),
        })

    async def _sample_destination_smaps(
        self, stack: AsyncExitStack, dst: QemuProcess, mem_path: Path | None
    ) -> None:
        """Sample the destination QEMU's guest RAM mapping into ``dst/smaps.jsonl``.

        Cheap, and informative with or without HGM: a stock kernel shows pages
        mapped whole (PMD or PUD), a HGM kernel the PTE-mapped pieces and their
        collapse.  ``dst.pid`` is the pid on the destination's host (an SSH
        host reports the remote one), so ``/proc/PID/smaps`` is read there.
        """
        if dst.pid is None:
            return
        out = JsonlWriter(self.run.side("dst") / "smaps.jsonl")
        # Entered before the sampler: closed only after the sampler has stopped.
        stack.callback(out.close)
        # The guest RAM is the shared hugetlb mapping of the backend's size whose file
        # QEMU created under mem-path (the directory as /proc/mounts names it).
        ram = GuestRamFilter(size_bytes=self.scenario.vm.memory_mib << 20,
                             path_prefix=str(mem_path) if mem_path is not None else None)
        await stack.enter_async_context(background(
            sample_smaps(dst.host, dst.pid, out, self.scenario.collect.smaps_hz, ram)))

    async def settle_and_verify(self, dst: QemuProcess, console: GuestConsole) -> None:
        """Let the guest run on the destination, then check every page it wrote."""
        self.mark("settling")

        def alive() -> list[Coroutine[Any, Any, None]]:
            return [dst.fail_if_exits(), _heartbeats_continue(console)]

        await guarded(asyncio.sleep(self.scenario.workload.settle_s), alive())
        self.mark("verifying")
        mark = await console.send("verify")
        line = await guarded(console.wait_for(Verify, timeout=VERIFY_TIMEOUT_S, since=mark),
                             alive())
        verify = line.event
        self.meta["verify"] = verify.model_dump(mode="json")
        self.mark("verified", bad_pages=verify.bad_pages)
        if not verify.ok:
            raise IntegrityError(
                f"guest integrity check failed: {verify.bad_pages} of {verify.pages} pages "
                f"hold wrong content after migration ({verify.read_mismatches} bad reads "
                f"during the run); first bad pages {list(verify.first_bad)}"
            )

    async def _incoming_uri(self, stack: AsyncExitStack, destination: _Place,
                            listen: int = 1) -> str:
        """Where the destination listens (and so where the source connects).

        ``listen`` counts the destination's listens: 1 for the migration, then one
        more each time a recovery has it listen again.
        """
        if self.scenario.migration.transport == "unix":
            name = "migration.sock" if listen == 1 else f"migration-{listen}.sock"
            socket = destination.sockets / name
            stack.push_async_callback(destination.host.remove_tree, socket)
            return f"unix:{socket}"
        spec = self.scenario.hosts.destination
        address = destination_address(self.scenario)
        port = spec.migration_port if isinstance(spec, SSHHostSpec) else None
        port = port or await free_tcp_port(destination.host, address)
        return f"tcp:{_uri_host(address)}:{port}"


async def _heartbeats_continue(console: GuestConsole) -> None:
    """Raise :class:`GuestError` once the guest stays silent for HEARTBEAT_SILENCE_S."""
    while True:
        mark = console.mark()
        try:
            await console.wait_for(Heartbeat, timeout=HEARTBEAT_SILENCE_S, since=mark)
        except GuestError as error:
            raise GuestError(
                f"the guest on {console.side} sent no heartbeat for {HEARTBEAT_SILENCE_S:g} s "
                f"while running ({error})"
            ) from None
        await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def _exit_stack_keeping_first_error(
    problems: list[str], begin_teardown: Callable[[], None],
) -> AsyncIterator[AsyncExitStack]:
    """An exit stack whose clean-up errors never replace the error that ended its block.

    They are logged and kept in ``problems`` instead: the outcome must state what
    went wrong (or that the run was interrupted), not what failed afterwards
    while tidying up.  ``begin_teardown`` is called as the block ends, however
    it ends, before the first resource is released.
    """
    failure: BaseException | None = None
    try:
        async with AsyncExitStack() as stack:
            try:
                yield stack
            except BaseException as error:
                failure = error
                raise
            finally:
                begin_teardown()
    except Exception as cleanup_error:
        if failure is None or cleanup_error is failure:
            raise
        log.warning("clean-up after the failure also failed: %s", cleanup_error)
        if not any(str(cleanup_error) in problem for problem in problems):
            problems.append(f"clean-up: {cleanup_error}")
        raise failure from failure.__cause__


class _RecordedRelease(AbstractAsyncContextManager[T]):
    """A resource whose release is reported to the run (see :meth:`_Run.teardown_step`)."""

    def __init__(self, run: _Run, step: str, resource: AbstractAsyncContextManager[T]) -> None:
        self.run = run
        self.step = step
        self.resource = resource

    async def __aenter__(self) -> T:
        return await self.resource.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> bool | None:
        try:
            suppress = await self.resource.__aexit__(kind, error, trace)
        except BaseException as failure:
            # Re-raising the error that ended the block is no failure of the release.
            self.run.released(self.step, None if failure is error else failure)
            raise
        self.run.released(self.step, None)
        return suppress


async def _exited_by_themselves(*qemus: QemuProcess) -> frozenset[str]:
    """Which of ``qemus`` have exited (or do within a moment) before migrator stops them.

    The moment matters: when one QEMU is killed, the other's failure may be the
    one noticed first, and the outcome must name the one that died.
    """
    async def exits(qemu: QemuProcess) -> bool:
        try:
            async with asyncio.timeout(EXIT_NOTICE_S):
                await qemu.wait_exit()
        except TimeoutError:
            return False
        except QemuError:
            return True  # ended with its host connection
        return True

    async with asyncio.TaskGroup() as group:
        checks = {qemu.name: group.create_task(exits(qemu)) for qemu in qemus}
    return frozenset(name for name, check in checks.items() if check.result())


def _guest_crash(run: RunDir) -> dict[str, str] | None:
    """The first guest kernel crash on a console, ``{"side", "line"}``; None if none crashed."""
    for side in ("dst", "src"):
        try:
            text = (run.side(side) / "serial.log").read_text(errors="replace")
        except FileNotFoundError:
            continue
        crash = kernel_crash(text)
        if crash:
            return {"side": side, "line": crash}
    return None


def _diagnose(error: MigratorError, crash: dict[str, str] | None) -> MigratorError:
    """Name a guest kernel crash behind a QEMU that exited or a console that went quiet."""
    if crash is None:
        return error
    side = crash["side"]
    diagnosed = GuestError(
        f"the guest kernel crashed on {side} ({crash['line']}); see {side}/serial.log"
    )
    diagnosed.__cause__ = error
    return diagnosed


async def run_scenario(
    scenario: Scenario, runs_root: Path, observer: Observer | None = None,
    on_rundir: Callable[[RunDir], None] | None = None,
) -> RunDir:
    """Run ``scenario``; the run directory is returned, or attached to the raised error."""
    run = RunDir.create(runs_root, scenario.name)
    if on_rundir:
        on_rundir(run)
    (run.path / "scenario.toml").write_text(dump_scenario(scenario))
    state = _Run(scenario, run, observer or Observer())
    state.save_meta()
    try:
        await state.execute()
        if state.conclude(None) is Outcome.COMPLETED_WITHOUT_POSTCOPY:
            # It completed, but did not measure what it was asked to: not a success.
            missed = failure(Outcome.COMPLETED_WITHOUT_POSTCOPY, state.meta["statement"])
            missed.run_dir = run.path  # type: ignore[attr-defined]
            raise missed
    except RunFailed:
        raise
    except MigratorError as caught:
        crash = _guest_crash(run) if isinstance(caught, QemuError | GuestError) else None
        if crash:
            state.meta["guest_crash"] = crash
        error = _diagnose(caught, crash)
        outcome = state.conclude(error)
        state.meta["error"] = {"type": type(error).__name__, "message": str(error)}
        if outcome is not Outcome.NOT_STARTED:
            error = failure(outcome, state.meta["statement"])
        error.run_dir = run.path  # type: ignore[attr-defined]
        raise error from caught
    except (asyncio.CancelledError, KeyboardInterrupt):
        state.meta["outcome"] = Outcome.INTERRUPTED.value
        raise
    finally:
        state.meta["teardown"] = {"clean": not state.teardown_problems,
                                  "problems": state.teardown_problems}
        state.meta["finished_ns"] = time.time_ns()
        state.timeline.close()
        state.save_meta()
    return run


