"""The scenario: typed, frozen, validated description of one migration run.

A scenario names the two hosts, the VM, the guest workload, how to migrate and
what to collect.  Unknown keys are rejected everywhere (``extra="forbid"``) so a
typo is an error, not a silently ignored setting.  Sizes are MiB, times are
seconds unless the field name says otherwise (``_ms``, ``_us``).
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from migrator.config.base import ADDRESS_PATTERN, ScenarioModel
from migrator.config.migration import (
    AfterPasses,
    AfterSeconds,
    Immediately,
    MigrationSpec,
    PauseSourceAfterPasses,
    RecoverySpec,
    SwitchoverPolicy,
    TlsSpec,
)
from migrator.config.placement import PlacementSpec, SidePlacement

__all__ = [
    "NO_ECHO_FIELDS",
    "Accel",
    "AfterPasses",
    "AfterSeconds",
    "Backing",
    "CollectSpec",
    "FaultSpec",
    "GuestSpec",
    "HostSpec",
    "HostsSpec",
    "Immediately",
    "LocalHostSpec",
    "MigrationSpec",
    "Pattern",
    "PauseSourceAfterPasses",
    "PlacementSpec",
    "RecoverySpec",
    "SSHHostSpec",
    "Scenario",
    "SidePlacement",
    "SwitchoverPolicy",
    "TlsSpec",
    "VmSpec",
    "WorkloadSpec",
    "fault_role",
]


class Backing(StrEnum):
    """How guest RAM is backed on both hosts, and so the host page size."""

    ANON_4K = "anon-4k"
    MEMFD_4K = "memfd-4k"
    HUGETLB_2M = "hugetlb-2m"
    HUGETLB_1G = "hugetlb-1g"

    @property
    def page_size(self) -> int:
        """Host page size of the guest RAM block, in bytes."""
        return {
            Backing.ANON_4K: 4096,
            Backing.MEMFD_4K: 4096,
            Backing.HUGETLB_2M: 2 << 20,
            Backing.HUGETLB_1G: 1 << 30,
        }[self]

    @property
    def is_hugetlb(self) -> bool:
        """True when guest RAM lives on hugetlbfs."""
        return self in (Backing.HUGETLB_2M, Backing.HUGETLB_1G)


class Accel(StrEnum):
    """Accelerator; ``auto`` boots a probe guest under KVM and falls back to TCG."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class Pattern(StrEnum):
    """Order in which the guest workload walks its working set."""

    SEQUENTIAL = "sequential"
    RANDOM = "random"


class LocalHostSpec(ScenarioModel):
    """The machine migrator runs on."""

    kind: Literal["local"] = "local"


# A host or IP address as QEMU's URI and SSH both take it: no spaces, brackets or
# commas (QEMU option syntax), not empty.
# An environment variable name as a POSIX shell can export it.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Fields whose value may be a secret written there by mistake (a passphrase instead of the
#: name of the variable holding it): a validation error names the field, never its value.
NO_ECHO_FIELDS = frozenset({"identity_passphrase_env"})


class SSHHostSpec(ScenarioModel):
    """A machine reached over SSH; its QEMU-side files live under ``work_dir`` there."""

    kind: Literal["ssh"]
    address: str = Field(pattern=ADDRESS_PATTERN, description="host name or IP address to SSH to")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("root", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    identity_file: Path | None = Field(
        None, strict=False, description="private key; unset: the SSH agent and ~/.ssh/id_*"
    )
    identity_passphrase_env: str | None = Field(
        None,
        description="NAME of an environment variable holding the passphrase of an encrypted "
                    "identity_file (never the passphrase itself); it must be set wherever "
                    "the scenario is loaded; unset: identity_file is not encrypted",
    )
    known_hosts: Path | None = Field(
        None, strict=False, description="trusted host keys; unset: ~/.ssh/known_hosts"
    )
    check_host_key: bool = Field(
        True, description="false trusts ANY host key: anyone on the path can impersonate "
                          "the host (a warning is logged on every connection)"
    )
    connect_timeout_s: float = Field(10.0, gt=0, le=300)
    migration_address: str | None = Field(
        None, pattern=ADDRESS_PATTERN,
        description="address the destination QEMU listens on for the migration stream (the "
                    "source connects to it); unset: address",
    )
    migration_port: int | None = Field(
        None, ge=1, le=65535,
        description="TCP port of the migration stream on a destination; unset: a port free "
                    "at the time, picked on the host (with python3 there)",
    )
    work_dir: Path = Field(
        Path("/var/tmp/migrator"),
        strict=False,
        description="directory on the host for a run's QEMU-side files (WORK_DIR/RUN_ID, "
                    "removed after the run)",
    )

    @field_validator("identity_passphrase_env")
    @classmethod
    def _passphrase_in_environment(cls, name: str | None, info: ValidationInfo) -> str | None:
        # The value is never quoted back (NO_ECHO_FIELDS): it may be a passphrase written
        # where its variable's name belongs.
        if name is None:
            return None
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(
                "not an environment variable name (letters, digits and _, not starting with "
                "a digit): give the NAME of a variable that holds identity_file's passphrase, "
                "never the passphrase itself"
            )
        if "identity_file" in info.data and info.data["identity_file"] is None:
            raise ValueError("needs identity_file: it is the passphrase of that key")
        if not os.environ.get(name):
            raise ValueError(
                "the environment variable it names is not set (or empty); export it with the "
                "passphrase of identity_file before running migrator, or remove "
                "identity_passphrase_env if the key is not encrypted"
            )
        return name

    @model_validator(mode="after")
    def _absolute_work_dir(self) -> SSHHostSpec:
        # The run's directory under it is removed with rm -rf: never relative to a
        # login directory, never the root.
        if not self.work_dir.is_absolute() or self.work_dir == Path("/"):
            raise ValueError(f"work_dir={str(self.work_dir)!r} must be an absolute path "
                             "other than /")
        return self

    @property
    def stream_address(self) -> str:
        """Where the destination QEMU listens for the migration stream."""
        return self.migration_address or self.address


HostSpec = Annotated[LocalHostSpec | SSHHostSpec, Field(discriminator="kind")]


class HostsSpec(ScenarioModel):
    """Where the source and destination QEMU run.

    Two equal entries are one host running both QEMUs (one SSH connection).
    """

    source: HostSpec = Field(default_factory=LocalHostSpec)
    destination: HostSpec = Field(default_factory=LocalHostSpec)

    @model_validator(mode="after")
    def _destination_reachable(self) -> HostsSpec:
        # A local destination listens on loopback; a QEMU on another machine cannot reach it.
        if isinstance(self.source, SSHHostSpec) and isinstance(self.destination, LocalHostSpec):
            raise ValueError(
                "a local destination with an ssh source is not supported: the destination "
                "listens on 127.0.0.1, which the source host cannot reach; make the "
                "destination an ssh host too"
            )
        return self


class VmSpec(ScenarioModel):
    """The virtual machine, identical on both sides."""

    memory_mib: int = Field(1024, ge=128, le=1 << 22, description="guest RAM in MiB")
    vcpus: int = Field(1, ge=1, le=256)
    backing: Backing = Field(Backing.HUGETLB_1G, strict=False)
    accel: Accel = Field(Accel.AUTO, strict=False)
    qemu: str = Field(
        "qemu-system-x86_64", min_length=1,
        description="QEMU binary: a name looked up in PATH or a path",
    )
    qemu_root: str | None = Field(
        None, pattern=r"^/",
        description="absolute path of a root filesystem holding the QEMU to run (made by "
                    "scripts/make-qemu-root, on every host that runs a QEMU); vm.qemu is then "
                    "looked up inside it (a name in its usr/bin, a path relative to it) and run "
                    "with the root's own loader, libraries, modules and firmware; unset: the "
                    "host's QEMU",
    )
    machine: str = Field("pc", pattern=r"^[a-z0-9._-]+$")
    hgm: Literal["auto", "require", "off"] = Field(
        "auto",
        description="HugeTLB high-granularity mapping (post-copy faults resolved in 4 KiB "
                    "pieces of hugetlb pages, QEMU capability hugetlb-doublemap), hugetlb "
                    "backings only: auto = use it where every host's kernel and QEMU support "
                    "it; require = fail the preflight where they do not; off = never",
    )

    @field_validator("hgm")
    @classmethod
    def _hgm_needs_huge_pages(cls, hgm: str, info: ValidationInfo) -> str:
        # "auto" (the default) is accepted on any backing and simply does nothing on small
        # pages; asking for HGM explicitly on 4 KiB pages is a contradiction.
        backing = info.data.get("backing")
        if hgm == "require" and isinstance(backing, Backing) and not backing.is_hugetlb:
            raise ValueError(
                f'"require" needs a hugetlb backing (vm.backing = "{backing.value}" has '
                '4 KiB pages; HGM maps pieces of huge pages): use hugetlb-2m or hugetlb-1g, or '
                'set hgm = "auto" or "off"'
            )
        return hgm

    @property
    def hugepages(self) -> tuple[int, int]:
        """(page size in kB, pages per VM) of a hugetlb backing: what each of its QEMUs
        reserves (the preflight, the run and a parallel suite's capacity all count so)."""
        page = self.backing.page_size
        return page // 1024, (self.memory_mib << 20) // page

    @model_validator(mode="after")
    def _memory_fits_pages(self) -> VmSpec:
        page_mib = self.backing.page_size >> 20
        if page_mib and self.memory_mib % page_mib:
            raise ValueError(
                f"memory_mib={self.memory_mib} is not a multiple of the {self.backing.value} "
                f"page size ({page_mib} MiB)"
            )
        return self


class GuestSpec(ScenarioModel):
    """The microguest: distribution kernel + migrator's initramfs."""

    kernel: Path | None = Field(
        None, strict=False, description="guest kernel; default: newest /boot/vmlinuz-*"
    )
    boot_timeout_s: float = Field(120.0, gt=0, le=3600)


class WorkloadSpec(ScenarioModel):
    """What the guest probe does while it is migrated."""

    working_set_mib: int = Field(512, ge=1)
    write_pct: int = Field(50, ge=0, le=100, description="share of accesses that write, percent")
    pattern: Pattern = Field(Pattern.SEQUENTIAL, strict=False)
    threads: int = Field(0, ge=0, le=256, description="worker threads; 0 = one per vCPU")
    stall_threshold_us: int = Field(
        2000, ge=10, le=60_000_000,
        description="a gap between two accesses longer than this is a stall",
    )
    heartbeat_ms: int = Field(5, ge=1, le=1000)
    warmup_s: float = Field(1.0, ge=0, description="run time after 'ready' before migrating")
    settle_s: float = Field(
        1.0, ge=0, description="run time on the destination after completion, before verifying"
    )


class CollectSpec(ScenarioModel):
    """What to observe while migrating."""

    query_migrate_hz: float = Field(10.0, gt=0, le=1000)
    trace: bool = Field(True, description="destination QEMU trace of page requests/placements")
    blocktime: bool = Field(True, description="postcopy-blocktime capability on the destination")
    threads_hz: float = Field(
        10.0, gt=0, le=100,
        description="samples per second of each QEMU thread's CPU time (/proc/PID/task/*/stat "
                    "on its host, both sides)",
    )
    smaps_hz: float = Field(
        10.0, gt=0, le=100,
        description="samples per second of the destination QEMU's /proc/PID/smaps (guest RAM "
                    "mapping granularity; hugetlb backings only)",
    )
    compress: Literal["zstd", "none"] = Field(
        "zstd",
        description="how the growing raw artifacts are kept: zstd streams (the samples and "
                    "consoles as migrator records them, dst/trace.log.zst by the zstd command "
                    "on the destination's host once its QEMU has stopped), or plain files "
                    "('none')",
    )


Side = Literal["source", "destination"]
FaultPhase = Literal["precopy", "postcopy", "recovery", "recovered"]


class _TimedFault(ScenarioModel):
    """A fault injected once, ``after_ms`` after a migration phase begins.

    Phases: ``precopy`` (the source reports ``active``), ``postcopy`` (the
    destination reports ``postcopy-active``), ``recovery`` (the source first
    reports ``postcopy-recover``), ``recovered`` (post-copy runs again after the
    first recovery).  A fault whose phase never comes is recorded as not injected.
    """

    at: FaultPhase = "postcopy"
    after_ms: int = Field(0, ge=0, le=3_600_000)


class LinkDownFault(_TimedFault):
    """Take a network interface of a host down for ``duration_s``, then up again.

    Name the interface that carries the migration stream and not the SSH
    control connection (``ip link set DEV down`` runs on the host, as root).
    """

    kind: Literal["link-down"]
    host: Side = "destination"
    interface: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,15}$")
    duration_s: float = Field(gt=0, le=3600)


class MigratePauseFault(_TimedFault):
    """QMP ``migrate-pause`` on one side (post-copy only): the stream is cut cleanly."""

    kind: Literal["migrate-pause"]
    side: Side = "source"


class KillFault(_TimedFault):
    """SIGKILL one side's QEMU."""

    kind: Literal["kill"]
    side: Side


class StopFault(_TimedFault):
    """SIGSTOP one side's QEMU, SIGCONT it ``duration_s`` later."""

    kind: Literal["stop"]
    side: Side
    duration_s: float = Field(gt=0, le=3600)


class ConnectionLossFault(_TimedFault):
    """Drop the controller's SSH connection to a host abruptly (an SSH host only).

    Everything migrator runs on a host is bound to its connection (nothing may
    outlive the controller), so that host's QEMU ends with it; migrator then
    reconnects to clean up.
    """

    kind: Literal["connection-loss"]
    side: Side


class PoolExhaustedFault(ScenarioModel):
    """The destination's hugepage pool is taken (filled by a hugetlbfs file) before it starts."""

    kind: Literal["pool-exhausted"]


FaultSpec = Annotated[
    LinkDownFault | MigratePauseFault | KillFault | StopFault | ConnectionLossFault
    | PoolExhaustedFault,
    Field(discriminator="kind"),
]


def fault_role(fault: FaultSpec) -> Side:
    """The role of the host a fault acts on."""
    if isinstance(fault, PoolExhaustedFault):
        return "destination"
    if isinstance(fault, LinkDownFault):
        return fault.host
    return fault.side


class Scenario(ScenarioModel):
    """One migration run, fully described."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""
    hosts: HostsSpec = Field(default_factory=HostsSpec)
    vm: VmSpec = Field(default_factory=VmSpec)
    guest: GuestSpec = Field(default_factory=GuestSpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    migration: MigrationSpec = Field(default_factory=MigrationSpec)
    collect: CollectSpec = Field(default_factory=CollectSpec)
    faults: tuple[FaultSpec, ...] = Field(
        (), strict=False,
        description="faults to inject while the scenario runs ([[faults]] tables)")
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec,
        description="CPUs and NUMA node of each side's QEMU ([placement.source], "
                    "[placement.destination])")

    @model_validator(mode="after")
    def _unix_transport_on_one_host(self) -> Scenario:
        # A unix socket joins two QEMUs of one machine only (equal entries are one host).
        if self.migration.transport == "unix" and self.hosts.source != self.hosts.destination:
            raise ValueError(
                'migration.transport = "unix" needs source and destination on one host (equal '
                'hosts entries); use transport = "tcp" between two hosts'
            )
        return self

    @model_validator(mode="after")
    def _working_set_fits(self) -> Scenario:
        # The guest kernel, initramfs and probe need some RAM of their own.
        headroom = 96
        if self.workload.working_set_mib > self.vm.memory_mib - headroom:
            raise ValueError(
                f"workload.working_set_mib={self.workload.working_set_mib} leaves less than "
                f"{headroom} MiB of vm.memory_mib={self.vm.memory_mib} for the guest kernel"
            )
        if self.vm.hgm == "require" and not self.migration.postcopy:
            # HGM changes how post-copy resolves faults; pre-copy alone never uses it.
            raise ValueError('vm.hgm = "require" needs migration.postcopy = true')
        for index, fault in enumerate(self.faults):
            _check_fault(self, fault, f"faults.{index}")
        if self.workload.threads > self.vm.vcpus:
            raise ValueError(
                f"workload.threads={self.workload.threads} exceeds vm.vcpus={self.vm.vcpus}"
            )
        return self

    @model_validator(mode="after")
    def _one_cpu_per_vcpu(self) -> Scenario:
        for role in ("source", "destination"):
            side = getattr(self.placement, role)
            if side is not None and isinstance(side.vcpu_cpus, list) \
                    and len(side.vcpu_cpus) != self.vm.vcpus:
                raise ValueError(
                    f"placement.{role}.vcpu_cpus: {len(side.vcpu_cpus)} CPUs for vm.vcpus = "
                    f"{self.vm.vcpus}; give one CPU per vCPU, or one CPU list string that "
                    "every vCPU may run on")
        return self


def _check_fault(scenario: Scenario, fault: FaultSpec, where: str) -> None:
    """A fault the scenario cannot meet is a ValueError naming it (``where``)."""
    if isinstance(fault, PoolExhaustedFault):
        if not scenario.vm.backing.is_hugetlb:
            raise ValueError(f"{where}: pool-exhausted needs a hugetlb vm.backing "
                             f"(not {scenario.vm.backing.value})")
        return
    if fault.at != "precopy" and not scenario.migration.postcopy:
        raise ValueError(f'{where}: at = "{fault.at}" needs migration.postcopy = true')
    if isinstance(fault, MigratePauseFault) and fault.at == "precopy":
        raise ValueError(f'{where}: migrate-pause works in post-copy only; use at = '
                         '"postcopy", "recovery" or "recovered"')
    if isinstance(fault, ConnectionLossFault):
        host = getattr(scenario.hosts, fault.side)
        if not isinstance(host, SSHHostSpec):
            raise ValueError(f"{where}: connection-loss needs hosts.{fault.side} to be an "
                             "ssh host")
