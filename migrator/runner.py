"""One scenario, run end to end: preflight, boot, migrate, verify, tear down, report.

The runner owns the order of things and the guarantee that whatever happens
(an error, Ctrl-C, a QEMU crash) every QEMU is stopped, every socket and
hugetlbfs file removed, every hugepage given back, and every raw artifact
already collected kept.  It does this with one ``AsyncExitStack``: each
resource is entered right after it exists, so it is released in reverse order
on any exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from migrator import __version__
from migrator.aio import background, guarded
from migrator.config.loader import dump_scenario
from migrator.config.models import Scenario
from migrator.errors import GuestError, MigratorError, QemuError
from migrator.guest.build import GuestArtifacts, ensure_guest, kernel_cmdline
from migrator.guest.console import GuestConsole, Side, serial_chardev_args
from migrator.guest.crash import kernel_crash
from migrator.guest.protocol import Heartbeat, ProbeError, Ready, Verify
from migrator.hosts.base import Host
from migrator.hosts.hugepages import hugetlbfs_dir, reserve_hugepages
from migrator.hosts.local import LocalHost
from migrator.metrics.sampler import sample_query_migrate
from migrator.migration.driver import MigrationDriver
from migrator.migration.plan import plan_migration
from migrator.preflight import check_hosts, raise_unmet
from migrator.qemu.accel import AccelDecision, decide_accel
from migrator.qemu.cmdline import LaunchSpec
from migrator.qemu.probe import QemuFacts, probe_qemu
from migrator.qemu.process import QemuProcess
from migrator.rundir import RunDir

__all__ = ["CACHE_DIR", "Observer", "run_scenario", "scenario_hosts"]

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("MIGRATOR_CACHE", Path.home() / ".cache" / "migrator"))
# sun_path holds 108 bytes; longer socket paths move to a private temp dir.
MAX_SOCKET_PATH = 100
VERIFY_TIMEOUT_S = 600.0
# A running guest heartbeats every few ms; this much silence means it is dead or hung.
HEARTBEAT_SILENCE_S = 30.0


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


def scenario_hosts(scenario: Scenario) -> tuple[Host, Host]:
    """The source and destination hosts of a scenario (one object when both are local)."""
    # Both sides are "local" until remote hosts exist; one LocalHost serves both.
    local = LocalHost()
    return local, local


def _serial_socket(sockets: Path, side: str) -> Path:
    """The unix socket of one QEMU's serial line (next to its QMP socket)."""
    return sockets / f"{side}-serial.sock"


def _pages_needed(scenario: Scenario) -> tuple[int, int]:
    """(page size in kB, pages per VM) for hugetlb backings."""
    backing = scenario.vm.backing
    page = backing.page_size
    return page // 1024, scenario.vm.memory_mib * (1 << 20) // page


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

    def save_meta(self) -> None:
        self.run.write_json("run.json", self.meta)

    def mark(self, what: str, **details: Any) -> None:
        self.timeline.write({"host_ns": time.time_ns(), "what": what, **details})
        self.observer.phase(what, ", ".join(f"{k}={v}" for k, v in details.items()))

    async def preflight(self, source: Host, destination: Host) -> tuple[QemuFacts, QemuFacts]:
        """The hosts preflight (as ``migrator hosts check``), then the QEMU facts to launch."""
        report = await check_hosts(self.scenario, source, destination)
        self.run.write_json("preflight.json", report.model_dump(mode="json"))
        raise_unmet(report)
        src_facts = await probe_qemu(source, self.scenario.vm.qemu)
        dst_facts = src_facts if destination is source else await probe_qemu(
            destination, self.scenario.vm.qemu)
        self.meta["qemu"] = {"source": asdict(src_facts), "destination": asdict(dst_facts)}
        self.meta["plan"] = asdict(plan_migration(self.scenario))
        self.save_meta()
        return src_facts, dst_facts

    def socket_dir(self, stack: AsyncExitStack) -> Path:
        if len(str(self.run.side("src") / "serial.sock")) <= MAX_SOCKET_PATH:
            return self.run.path
        private = Path(tempfile.mkdtemp(prefix="migrator-"))
        stack.callback(shutil.rmtree, private, True)
        self.meta["socket_dir"] = str(private)
        return private

    def launch_spec(
        self, side: str, facts: QemuFacts, accel: AccelDecision, guest: GuestArtifacts,
        mem_path: Path | None, sockets: Path,
    ) -> LaunchSpec:
        scenario = self.scenario
        workload = scenario.workload
        side_dir = self.run.side(side)
        append = kernel_cmdline(
            working_set_mib=workload.working_set_mib, write_pct=workload.write_pct,
            pattern=workload.pattern.value, stall_threshold_us=workload.stall_threshold_us,
            heartbeat_ms=workload.heartbeat_ms, threads=workload.threads,
        )
        return LaunchSpec(
            binary=facts.binary, name=side, memory_mib=scenario.vm.memory_mib,
            vcpus=scenario.vm.vcpus, backing=scenario.vm.backing, accel=accel.accel,
            machine=scenario.vm.machine, kernel=guest.kernel, initrd=guest.initrd,
            append=append, qmp_socket=sockets / f"{side}-qmp.sock",
            serial_args=tuple(serial_chardev_args(_serial_socket(sockets, side),
                                                  side_dir / "serial.log")),
            mem_path=mem_path, incoming=side == "dst",
            trace_file=side_dir / "trace.log" if side == "dst" and scenario.collect.trace
            else None,
        )

    async def execute(self) -> None:
        """All stages in order; every resource joins the exit stack the moment it exists."""
        scenario = self.scenario
        source, destination = scenario_hosts(scenario)
        self.mark("preflight")
        src_facts, dst_facts = await self.preflight(source, destination)
        async with AsyncExitStack() as stack:
            # Memory first: a hugepage shortfall must stop the run before anything boots.
            mem_paths = await self.reserve_memory(stack, source, destination)
            self.mark("guest-build")
            guest = await ensure_guest(CACHE_DIR / "guest", scenario.guest.kernel)
            self.meta["guest"] = {k: str(v) for k, v in asdict(guest).items()}
            accel = await decide_accel(source, scenario.vm.accel, src_facts, guest,
                                       CACHE_DIR / "accel.json")
            self.meta["accel"] = asdict(accel)
            self.save_meta()
            self.mark("accel", accel=accel.accel, method=accel.method)

            sockets = self.socket_dir(stack)
            src, src_console = await self.start_vm(
                stack, "src", source,
                self.launch_spec("src", src_facts, accel, guest, mem_paths["src"], sockets))
            self.mark("source-started", pid=src.pid)
            dst, dst_console = await self.start_vm(
                stack, "dst", destination,
                self.launch_spec("dst", dst_facts, accel, guest, mem_paths["dst"], sockets))
            self.mark("destination-started", pid=dst.pid)
            (self.run.side("dst") / "ramblocks.txt").write_text(
                await dst.monitor.hmp("info ramblock"))

            await self.boot_and_warm_up(src, dst, src_console)
            await self.migrate(stack, src, dst, destination, sockets)
            await self.settle_and_verify(dst, dst_console)
            self.mark("shutdown")
        self.mark("cleaned-up")

    async def start_vm(
        self, stack: AsyncExitStack, side: Side, host: Host, spec: LaunchSpec
    ) -> tuple[QemuProcess, GuestConsole]:
        """One QEMU and the console on its serial line, both owned by ``stack``."""
        qemu = await stack.enter_async_context(
            QemuProcess.from_spec(host, spec, self.run.side(side)))
        console = await stack.enter_async_context(GuestConsole(
            _serial_socket(spec.qmp_socket.parent, side),
            self.run.side(side) / "console.jsonl", side=side))
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
            await stack.enter_async_context(reserve_hugepages(source, size_kib, 2 * per_vm))
            shared = await stack.enter_async_context(
                hugetlbfs_dir(source, size_kib, self.run.run_id))
            mem_paths = {"src": shared, "dst": shared}
        else:
            for side, host in (("src", source), ("dst", destination)):
                await stack.enter_async_context(reserve_hugepages(host, size_kib, per_vm))
                mem_paths[side] = await stack.enter_async_context(
                    hugetlbfs_dir(host, size_kib, self.run.run_id))
        self.mark("hugepages-reserved", page_kib=size_kib, per_vm=per_vm)
        return mem_paths

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
        self, stack: AsyncExitStack, src: QemuProcess, dst: QemuProcess, destination: Host,
        sockets: Path,
    ) -> None:
        """Drive the migration with both samplers running beside it."""
        scenario = self.scenario
        driver = MigrationDriver(src.monitor, dst.monitor, plan_migration(scenario),
                                 scenario.migration, self.timeline)
        uri = self._incoming_uri(destination, sockets)
        await driver.prepare(uri)
        samples = _ObservedWriter(self.run, self.observer)
        stack.callback(samples.close)
        hz = scenario.collect.query_migrate_hz
        async with background(
            sample_query_migrate(src.monitor, "src", samples, hz),  # type: ignore[arg-type]
            sample_query_migrate(dst.monitor, "dst", samples, hz),  # type: ignore[arg-type]
        ):
            self.observer.phase("migrating")
            result = await guarded(driver.run(uri), [src.fail_if_exits(), dst.fail_if_exits()])
        self.meta["migration"] = asdict(result)
        self.run.write_json("final-query-migrate.json", {
            "src": await src.monitor.query_migrate(timeout=30),
            "dst": await dst.monitor.query_migrate(timeout=30),
        })

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
            raise GuestError(
                f"guest integrity check failed: {verify.bad_pages} of {verify.pages} pages "
                f"hold wrong content after migration ({verify.read_mismatches} bad reads "
                f"during the run); first bad pages {list(verify.first_bad)}"
            )

    def _incoming_uri(self, destination: Host, sockets: Path) -> str:
        """Where the destination listens (and so where the source connects)."""
        if self.scenario.migration.transport == "unix":
            return f"unix:{sockets / 'migration.sock'}"
        assert isinstance(destination, LocalHost)
        return f"tcp:127.0.0.1:{destination.free_tcp_port()}"



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


def _diagnose(run: RunDir, error: MigratorError) -> MigratorError:
    """Name a guest kernel crash behind a QEMU that exited or a console that went quiet."""
    if not isinstance(error, QemuError | GuestError):
        return error
    for side in ("dst", "src"):
        try:
            text = (run.side(side) / "serial.log").read_text(errors="replace")
        except FileNotFoundError:
            continue
        crash = kernel_crash(text)
        if crash:
            diagnosed = GuestError(
                f"the guest kernel crashed on {side} ({crash}); see {side}/serial.log"
            )
            diagnosed.__cause__ = error
            return diagnosed
    return error


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
        state.meta["outcome"] = "completed"
    except MigratorError as caught:
        error = _diagnose(run, caught)
        state.meta["outcome"] = "error"
        state.meta["error"] = {"type": type(error).__name__, "message": str(error)}
        error.run_dir = run.path  # type: ignore[attr-defined]
        raise error from caught
    except (asyncio.CancelledError, KeyboardInterrupt):
        state.meta["outcome"] = "interrupted"
        raise
    finally:
        state.meta["finished_ns"] = time.time_ns()
        state.timeline.close()
        state.save_meta()
    return run


