"""One scenario, run end to end: preflight, boot, migrate, verify, tear down, report.

The runner owns the order of things and the guarantee that whatever happens
(an error, Ctrl-C, a QEMU crash, a lost SSH connection) every QEMU is stopped,
every socket and hugetlbfs file removed, every hugepage given back, and every
raw artifact already collected kept.  It does this with one ``AsyncExitStack``:
each resource is entered right after it exists, so it is released in reverse
order on any exit.

The pieces it orders live beside it: :mod:`~migrator.runner.journal` (run.json,
the timeline, the teardown record), :mod:`~migrator.runner.placement` (which
host plays each role, where each QEMU's files and sockets are, how it is
launched), :mod:`~migrator.runner.pinning` (each QEMU's threads on the CPUs
``[placement.*]`` asks) and :mod:`~migrator.runner.decisions` (HGM and the
accelerator, decided before anything boots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from migrator.aio import background, guarded
from migrator.cache import CACHE_DIR, HOST_FACTS
from migrator.config.loader import dump_scenario
from migrator.config.models import PoolExhaustedFault, Scenario
from migrator.errors import (
    GuestError,
    IntegrityError,
    MigratorError,
    QemuError,
    QemuExitedError,
    RunFailed,
)
from migrator.faults import FaultTargets, exhaust_hugepage_pool, inject_faults
from migrator.guest.build import ensure_guest
from migrator.guest.console import GuestConsole, Side
from migrator.guest.crash import attribute_to_guest_crash, first_guest_crash
from migrator.guest.protocol import Heartbeat, ProbeError, Ready, Verify
from migrator.hgm import GuestRamFilter, HgmDecision, HgmSupport, sample_smaps
from migrator.hosts.base import Host
from migrator.hosts.compress import compressed_when_done
from migrator.hosts.hugepages import hugetlbfs_dir, reserve_hugepages
from migrator.metrics.events import load_events, read_jsonl
from migrator.migration.driver import MigrationDriver
from migrator.migration.plan import MigrationPlan, plan_migration
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
from migrator.preflight import Role, check_hosts, memory_groups, raise_unmet
from migrator.qemu.cmdline import LaunchSpec
from migrator.qemu.probe import QemuFacts
from migrator.qemu.process import QemuProcess
from migrator.qemu.threads import THREADS_FILE, sample_threads
from migrator.rundir import ROLE_OF_SIDE, SIDES, JsonlWriter, RunDir
from migrator.runner import decisions
from migrator.runner.journal import Observer, RunJournal
from migrator.runner.pinning import SidePinner, start_pinning
from migrator.runner.placement import (
    Place,
    check_layout,
    free_tcp_port,
    incoming_uri,
    launch_spec,
    place_sides,
    remote_run_dir,
    scenario_hosts,
    ssh_target,
)

__all__ = [
    "CACHE_DIR",
    "Observer",
    "ScenarioRun",
    "destination_alive",
    "exit_stack_keeping_first_error",
    "free_tcp_port",
    "remote_run_dir",
    "run_scenario",
    "scenario_hosts",
    "ssh_target",
]

log = logging.getLogger(__name__)

VERIFY_TIMEOUT_S = 600.0
# A running guest heartbeats every few ms; this much silence means it is dead or hung.
HEARTBEAT_SILENCE_S = 30.0
# How long a failed run waits for each QEMU's exit to be reported before naming the dead.
EXIT_NOTICE_S = 0.5


class _ObservedWriter:
    """Tees samples to the observer (for live progress) and the samples artifact."""

    def __init__(self, run: RunDir, observer: Observer, *, compress: bool) -> None:
        self._out = run.jsonl("samples.jsonl", compress=compress)
        self._observer = observer

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(record)
        if "reply" in record:
            self._observer.sample(record["side"], record["reply"])

    def close(self) -> None:
        self._out.close()


class ScenarioRun(RunJournal):
    """State of one run while it executes (see :func:`run_scenario`): its journal, and the stages.

    A journal itself, so each stage records what it did as it goes.  Public for
    tests of single stages (the HGM decision, the plan); a run is started with
    :func:`run_scenario`.
    """

    def __init__(self, scenario: Scenario, run: RunDir, observer: Observer) -> None:
        super().__init__(scenario, run, observer)
        self.scenario = scenario
        self.hgm: HgmDecision | None = None
        self.booted = False
        self.recoveries = 0
        self.exited: frozenset[str] = frozenset()
        #: The sides whose ``[placement.*]`` is applied (:meth:`pin`).
        self.pinners: dict[Side, SidePinner] = {}
        #: The ``ram`` section of the source's final query-migrate, once it is taken.
        self.final_source_ram: dict[str, Any] = {}
        #: The growing raw artifacts are zstd streams (``collect.compress``).
        self.compress = scenario.collect.compress == "zstd"

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
            postcopy_missed=(postcopy_missed(statuses, self.final_source_ram)
                             if error is None and self.scenario.migration.postcopy
                             else None)))
        self.meta.update(outcome=outcome.value, statement=statement, recoveries=self.recoveries)
        return outcome

    async def preflight(self, hosts: dict[Side, Host]) -> dict[Side, QemuFacts]:
        """The hosts preflight (as ``migrator hosts check``, but answered from the host
        facts cache while the hosts' boot ids and QEMU binaries stay the same), then the
        QEMU facts to launch."""
        source, destination = hosts["src"], hosts["dst"]
        report = await check_hosts(self.scenario, source, destination, cache_file=HOST_FACTS)
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
        """Decide HGM (:func:`.decisions.decide_hgm`) and keep the decision for :meth:`plan`."""
        self.hgm = await decisions.decide_hgm(self, self.scenario, hosts, facts, known)
        return self.hgm

    async def execute(self) -> None:
        """All stages in order; every resource joins the exit stack the moment it exists."""
        scenario = self.scenario
        check_layout(scenario, self.run)
        self.mark("preflight")
        async with scenario_hosts(scenario) as (source, destination):
            hosts: dict[Side, Host] = {"src": source, "dst": destination}
            facts = await self.preflight(hosts)
            async with exit_stack_keeping_first_error(
                    self.teardown_problems, lambda: self.mark("teardown")) as stack:
                # Pushed first, so it runs last: every release has been tried by then.
                stack.callback(lambda: self.mark("teardown-done",
                                                 clean=not self.teardown_problems))
                # Memory first: a hugepage shortfall must stop the run before anything boots.
                mem_paths = await self.reserve_memory(stack, source, destination)
                self.mark("guest-build")
                guest = await ensure_guest(CACHE_DIR / "guest", scenario.guest.kernel)
                self.meta["guest"] = {k: str(v) for k, v in asdict(guest).items()}
                accel = await decisions.choose_accel(self, scenario, hosts, facts, guest,
                                                     CACHE_DIR / "accel.json")
                decisions.refuse_known_bad(self, scenario, facts["src"], accel)
                places = await place_sides(self, stack, scenario, hosts, guest)

                src, src_console = await self.start_vm(
                    stack, "src", places["src"],
                    launch_spec(scenario, "src", places["src"], facts["src"], accel,
                                mem_paths["src"]))
                self.mark("source-started", pid=src.pid)
                await self.pin(stack, "src", src)
                await self.exhaust_destination_pool(stack, destination, mem_paths["dst"])
                dst, dst_console = await self.start_vm(
                    stack, "dst", places["dst"],
                    launch_spec(scenario, "dst", places["dst"], facts["dst"], accel,
                                mem_paths["dst"]))
                self.mark("destination-started", pid=dst.pid)
                await self.pin(stack, "dst", dst)
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
        self, stack: AsyncExitStack, side: Side, place: Place, spec: LaunchSpec
    ) -> tuple[QemuProcess, GuestConsole]:
        """One QEMU and the console on its serial line, both owned by ``stack``.

        A traced QEMU's trace is compressed on its host once it has stopped
        (:mod:`migrator.hosts.compress`), before a remote host's files are fetched.
        """
        host = place.host
        # QEMU removes its listening sockets when it exits, but not when it is killed.
        stack.push_async_callback(host.remove_tree, place.serial_socket)
        if spec.trace_file is not None and self.compress:
            await self.teardown_step(stack, f"{side} trace compressed on {host.name}",
                                     compressed_when_done(host, spec.trace_file))
        qemu = await self.teardown_step(
            stack, f"{side} QEMU stopped",
            QemuProcess.from_spec(host, spec, self.run.side(side), host_dir=place.host_dir))
        self.booted = True
        serial = await stack.enter_async_context(host.forward_unix_socket(place.serial_socket))
        console = await stack.enter_async_context(
            GuestConsole(serial, self.run.side(side) / "console.jsonl", side=side,
                         compress=self.compress))
        return qemu, console

    async def reserve_memory(
        self, stack: AsyncExitStack, source: Host, destination: Host
    ) -> dict[str, Path | None]:
        """Hugepages and a hugetlbfs directory per side (nothing for 4 KiB backings).

        Pages are reserved per host and NUMA node (:func:`memory_groups`): one
        reservation for both VMs of one host unless their RAM is bound to
        different nodes.
        """
        mem_paths: dict[str, Path | None] = {"src": None, "dst": None}
        if not self.scenario.vm.backing.is_hugetlb:
            return mem_paths
        size_kib, per_vm = self.scenario.vm.hugepages
        roles: list[tuple[Host, list[Role]]] = (
            [(source, ["source", "destination"])] if source is destination
            else [(source, ["source"]), (destination, ["destination"])])
        for host, node, vms in memory_groups(self.scenario, roles):
            on_node = "" if node is None else f" on node {node}"
            added = await self.teardown_step(
                stack, f"hugepages given back on {host.name}{on_node}",
                reserve_hugepages(host, size_kib, vms * per_vm, node))
            self.mark("hugepages-added", host=host.name, page_kib=size_kib, pages=added,
                      **({} if node is None else {"node": node}))
        directories: dict[Host, Path] = {}
        for side, host in (("src", source), ("dst", destination)):
            if host not in directories:
                directories[host] = await self.teardown_step(
                    stack, f"hugetlbfs directory removed on {host.name}",
                    hugetlbfs_dir(host, size_kib, self.run.run_id))
            mem_paths[side] = directories[host]
        self.mark("hugepages-reserved", page_kib=size_kib, per_vm=per_vm)
        return mem_paths

    async def pin(self, stack: AsyncExitStack, side: Side, qemu: QemuProcess) -> None:
        """Apply ``side``'s ``[placement.*]`` to its just-started QEMU, and record it."""
        pinner = await start_pinning(stack, side, self.scenario.placement.of(ROLE_OF_SIDE[side]),
                                     qemu, self.scenario.vm.memory_mib << 20)
        if pinner is None:
            return
        self.pinners[side] = pinner
        self.save_placement()
        self.mark("pinned", side=side, threads=len(pinner.threads))

    def save_placement(self) -> None:
        """run.json's ``placement``: each pinned side's record as it stands."""
        self.meta["placement"] = {ROLE_OF_SIDE[side]: pinner.record()
                                  for side, pinner in self.pinners.items()}
        self.save_meta()

    async def exhaust_destination_pool(
        self, stack: AsyncExitStack, destination: Host, mem_path: Path | None
    ) -> None:
        """The ``pool-exhausted`` fault: the destination's free hugepages taken before it starts."""
        for index, fault in enumerate(self.scenario.faults):
            if isinstance(fault, PoolExhaustedFault) and mem_path is not None:
                size_kib, _ = self.scenario.vm.hugepages
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
        dst: QemuProcess, destination: Place, mem_path: Path | None,
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
            return await incoming_uri(scenario, stack, destination, listens)

        driver = MigrationDriver(src.monitor, dst.monitor, self.plan(),
                                 scenario.migration, self.timeline, listen_uri)
        uri = await listen_uri()
        if scenario.migration.tls is not None:
            self.meta["tls"] = await enable_tls(scenario, src, dst)
        await driver.prepare(uri)
        if scenario.vm.backing.is_hugetlb:
            await self._sample_destination_smaps(stack, dst, mem_path)
        samples = _ObservedWriter(self.run, self.observer, compress=self.compress)
        stack.callback(samples.close)
        hz = scenario.collect.query_migrate_hz
        threads = {side: JsonlWriter(self.run.side(side) / THREADS_FILE, compress=self.compress)
                   for side in SIDES}
        for writer in threads.values():
            stack.callback(writer.close)
        async with background(
            sample_query_migrate(src.monitor, "src", samples, hz),  # type: ignore[arg-type]
            sample_query_migrate(dst.monitor, "dst", samples, hz),  # type: ignore[arg-type]
            *(sample_threads(qemu.host, qemu.pid, threads[side], scenario.collect.threads_hz)
              for side, qemu in (("src", src), ("dst", dst)) if qemu.pid is not None),
            *(pinner.watch() for pinner in self.pinners.values()),
        ):
            self.observer.phase("migrating")
            faults = FaultTargets(hosts=hosts, qemus={"src": src, "dst": dst},
                                  mark=self.mark)
            try:
                result = await guarded(driver.run(uri), [
                    src.fail_if_exits(), destination_alive(dst, driver),
                    inject_faults(scenario.faults, faults)])
            finally:
                self.recoveries = driver.recovery.recoveries
                if self.pinners:
                    self.save_placement()
        for pinner in self.pinners.values():
            await pinner.read_memory()
        if self.pinners:
            self.save_placement()
        self.meta["migration"] = asdict(result)
        final = {"src": await src.monitor.query_migrate(timeout=30),
                 "dst": await dst.monitor.query_migrate(timeout=30)}
        self.run.write_json("final-query-migrate.json", final)
        self.final_source_ram = final["src"].get("ram") or {}

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
        out = JsonlWriter(self.run.side("dst") / "smaps.jsonl", compress=self.compress)
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


async def destination_alive(dst: QemuProcess, driver: MigrationDriver) -> None:
    """:meth:`QemuProcess.fail_if_exits` for the destination while migrating, except after a
    cancel rule sent migrate_cancel: the destination's exit is then the cancel's doing, and
    the driver's own error (which rule, and that the guest stays on the source) follows."""
    try:
        await dst.fail_if_exits()
    except QemuExitedError:
        if not driver.cancel_sent.is_set():
            raise
        await asyncio.Event().wait()  # until the driver ends and guarded() cancels this


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
async def exit_stack_keeping_first_error(
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


async def run_scenario(
    scenario: Scenario, runs_root: Path, observer: Observer | None = None,
    on_rundir: Callable[[RunDir], None] | None = None,
) -> RunDir:
    """Run ``scenario``; the run directory is returned, or attached to the raised error."""
    run = RunDir.create(runs_root, scenario.name)
    if on_rundir:
        on_rundir(run)
    (run.path / "scenario.toml").write_text(dump_scenario(scenario))
    state = ScenarioRun(scenario, run, observer or Observer())
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
        crash = first_guest_crash(run) if isinstance(caught, QemuError | GuestError) else None
        if crash:
            state.meta["guest_crash"] = crash
        error = attribute_to_guest_crash(caught, crash)
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


