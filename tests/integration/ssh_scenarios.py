"""Scenarios migrated between the two SSH namespace hosts (sshhosts.py), and what runs leave there.

The namespaces share the PID namespace, so ``pgrep`` inside one would also see
every other QEMU on the machine (a local test's, another session's): a host's
processes are those ``ip netns pids`` lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from migrator.config import Scenario
from tests.integration.conftest import scenario
from tests.integration.sshhosts import NamespaceHost, SSHTestbed

__all__ = ["NOTHING", "host_entry", "leftovers", "programs_in", "qemus_in", "ssh_scenario"]


def programs_in(host: NamespaceHost, name: str) -> list[int]:
    """PIDs of the processes inside ``host``'s namespace whose program's name starts with
    ``name``."""
    found = []
    for pid in host.pids():
        try:
            program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        # The program, not anywhere in the command line: the SSH supervisor shells
        # that run a QEMU carry its argv too.
        if Path(program.decode()).name.startswith(name):
            found.append(pid)
    return found


def qemus_in(host: NamespaceHost) -> list[int]:
    """PIDs of the QEMU processes inside ``host``'s namespace."""
    return programs_in(host, "qemu-system")


def host_entry(bed: SSHTestbed, host: NamespaceHost, work_root: Path,
               **overrides: object) -> dict[str, object]:
    """A scenario's ``[hosts.*]`` table for one namespace host."""
    return {"kind": "ssh", "address": host.address, "identity_file": str(bed.client_key),
            "known_hosts": str(bed.known_hosts), "work_dir": str(work_root / host.label),
            "connect_timeout_s": 3.0, **overrides}


def ssh_scenario(bed: SSHTestbed, work_root: Path, name: str,
                 source: Mapping[str, object] | None = None,
                 **sections: dict[str, object] | list[dict[str, object]]) -> Scenario:
    """The integration tests' scenario, migrated from host a to host b over ``mig0``."""
    hosts: dict[str, object] = {
        "source": host_entry(bed, bed.a, work_root, **(source or {})),
        "destination": host_entry(bed, bed.b, work_root, migration_address=bed.b.peer_address),
    }
    return scenario(name, hosts=hosts, **sections)


def leftovers(bed: SSHTestbed, work_root: Path) -> dict[str, object]:
    """Whatever a run left on the hosts: QEMU and zstd processes and anything in the work
    dirs."""
    return {
        "qemu": {host.label: qemus_in(host) for host in bed.hosts},
        "zstd": {host.label: programs_in(host, "zstd") for host in bed.hosts},
        "files": sorted(str(p) for p in work_root.rglob("*")
                        if p.parent != work_root),  # the (empty) work_dirs may stay
    }


NOTHING = {"qemu": {"a": [], "b": []}, "zstd": {"a": [], "b": []}, "files": []}
"""What :func:`leftovers` finds when a run left nothing."""
