"""Where a run's pieces live: which host plays each role, each QEMU's directory and sockets.

What the controller records (run.json, timeline, samples, QMP events,
consoles, argv) is written to the local run directory as it happens.  What a
QEMU writes itself (stdout/stderr, serial.log, the trace), its sockets and the
guest kernel it boots live on the QEMU's host: in the run directory for a local
host; under ``WORK_DIR/RUN_ID/`` (``src/``, ``dst/``, ``guest/``) on an SSH
host, fetched back into the run directory when the run ends and then removed
(see :func:`remote_run_dir`, which also covers a controller that dies).  QMP
and the serial consoles are reached through :meth:`Host.forward_unix_socket`;
the migration stream goes from host to host.

The destination's trace: QEMU writes ``trace.log``; with ``collect.compress =
"zstd"`` it becomes ``trace.log.zst`` on the QEMU's host once QEMU has stopped,
before it is fetched (:mod:`migrator.hosts.compress`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from migrator.config.models import HostSpec, Scenario, SSHHostSpec
from migrator.errors import ConfigError, HostError, MigratorError
from migrator.guest.build import GuestArtifacts, kernel_cmdline
from migrator.guest.console import Side, serial_chardev_args
from migrator.hosts.base import Host, HostProcess
from migrator.hosts.local import LocalHost
from migrator.migration.plan import destination_address
from migrator.qemu.accel import AccelDecision, stage_guest
from migrator.qemu.cmdline import LaunchSpec
from migrator.qemu.probe import QemuFacts
from migrator.rundir import ROLE_OF_SIDE, SIDES, ZST, RunDir
from migrator.runner.journal import RunJournal

if TYPE_CHECKING:  # asyncssh is imported only by runs that use an SSH host
    from migrator.hosts.ssh import SSHTarget

__all__ = [
    "JANITOR",
    "MAX_SOCKET_PATH",
    "QEMU_OUTPUT_FILES",
    "TRACE_LOG",
    "Place",
    "check_layout",
    "free_tcp_port",
    "incoming_uri",
    "launch_spec",
    "place_sides",
    "remote_run_dir",
    "scenario_hosts",
    "ssh_target",
]

log = logging.getLogger(__name__)

# sun_path holds 108 bytes.  Longer socket paths move to a private temp dir on a
# local host; on an SSH host they are a ConfigError (see check_layout).
MAX_SOCKET_PATH = 100
# The destination's trace as QEMU writes it.
TRACE_LOG = "trace.log"
# What a QEMU writes itself on its host (the trace compressed there, or not); fetched back
# from remote hosts after the run.
QEMU_OUTPUT_FILES = ("stdout.log", "stderr.log", "serial.log", TRACE_LOG, TRACE_LOG + ZST)

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


def ssh_target(spec: SSHHostSpec) -> SSHTarget:
    """How to reach a scenario's SSH host entry.

    The key's passphrase is read from the environment variable the entry names
    (the scenario validated that it is set when it was loaded), held as a SecretStr.
    """
    from pydantic import SecretStr

    from migrator.hosts.ssh import SSHTarget

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
        from migrator.hosts.ssh import SSHHost

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


def check_layout(scenario: Scenario, run: RunDir) -> None:
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


@dataclass(frozen=True)
class Place:
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


async def place_sides(
    journal: RunJournal, stack: AsyncExitStack, scenario: Scenario, hosts: dict[Side, Host],
    guest: GuestArtifacts,
) -> dict[Side, Place]:
    """Each side's directory on its host; an SSH host also gets the run's guest.

    The directories are released by ``stack``; where they are goes into run.json.
    """
    places: dict[Side, Place] = {}
    staged: dict[Host, GuestArtifacts] = {}
    sides: tuple[tuple[Side, HostSpec], ...] = (
        ("src", scenario.hosts.source), ("dst", scenario.hosts.destination))
    for side, spec in sides:
        host = hosts[side]
        if isinstance(spec, SSHHostSpec):
            root = spec.work_dir / journal.run.run_id
            if host not in staged:
                await journal.teardown_step(stack, f"work directory removed on {host.name}",
                                            remote_run_dir(host, root, journal.run))
                staged[host] = await stage_guest(host, guest, root / "guest")
            directory = root / side
            await host.make_private_dir(directory)
            places[side] = Place(host, directory, directory, staged[host])
        else:
            directory = journal.run.side(side)
            sockets = directory
            if len(str(directory / "serial.sock")) > MAX_SOCKET_PATH:
                sockets = await stack.enter_async_context(host.temp_dir())
            places[side] = Place(host, directory, sockets, guest)
    journal.meta["host_dirs"] = {side: {"host": place.host.name, "dir": str(place.host_dir),
                                        "sockets": str(place.sockets)}
                                 for side, place in places.items()}
    journal.save_meta()
    return places


def launch_spec(
    scenario: Scenario, side: Side, place: Place, facts: QemuFacts, accel: AccelDecision,
    mem_path: Path | None,
) -> LaunchSpec:
    """How ``side``'s QEMU is launched at ``place``: the VM, its guest, its sockets and files."""
    workload = scenario.workload
    pinned = scenario.placement.of(ROLE_OF_SIDE[side])
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
        trace_file=place.host_dir / TRACE_LOG if side == "dst" and scenario.collect.trace
        else None,
        cpus=pinned.launch_cpus if pinned is not None else None,
        memory_node=pinned.memory_node if pinned is not None else None,
    )


async def incoming_uri(scenario: Scenario, stack: AsyncExitStack, destination: Place,
                       listen: int = 1) -> str:
    """Where the destination listens (and so where the source connects).

    ``listen`` counts the destination's listens: 1 for the migration, then one
    more each time a recovery has it listen again.  A unix socket is removed by
    ``stack``.
    """
    if scenario.migration.transport == "unix":
        name = "migration.sock" if listen == 1 else f"migration-{listen}.sock"
        socket = destination.sockets / name
        stack.push_async_callback(destination.host.remove_tree, socket)
        return f"unix:{socket}"
    spec = scenario.hosts.destination
    address = destination_address(scenario)
    port = spec.migration_port if isinstance(spec, SSHHostSpec) else None
    if port is None:
        port = await _unclaimed_port(destination.host, address)
        claim = (destination.host.name, address, port)
        stack.callback(_ports_handed_out.discard, claim)
    return f"tcp:{_uri_host(address)}:{port}"


# Ports handed to runs of this process whose QEMU may not listen on them yet: a port is
# free only until its QEMU binds it, and a parallel suite's runs pick ports side by side.
_ports_handed_out: set[tuple[str, str, int]] = set()
# bind(0) draws at random from thousands of ports: a clash is rare, and more than a few
# in a row means something else is wrong.
_PORT_DRAWS = 8


async def _unclaimed_port(host: Host, address: str) -> int:
    """:func:`free_tcp_port`, never one another run of this process holds (recorded as held)."""
    for _ in range(_PORT_DRAWS):
        port = await free_tcp_port(host, address)
        claim = (host.name, address, port)
        if claim not in _ports_handed_out:
            _ports_handed_out.add(claim)
            return port
    raise HostError(f"no free TCP port on {address} on {host.name} that no other run of this "
                    f"process holds after {_PORT_DRAWS} draws; set migration_port in the "
                    "destination's host entry")
