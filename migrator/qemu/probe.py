"""What a QEMU binary can do, asked of a throwaway ``-machine none`` instance."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from migrator.errors import MissingResource
from migrator.hosts.base import Host
from migrator.qemu.process import QemuProcess

__all__ = ["QemuFacts", "probe_qemu", "resolve_binary"]


@dataclass(frozen=True)
class QemuFacts:
    """A QEMU binary's identity and migration capabilities."""

    binary: str
    version: str
    package: str
    capabilities: tuple[str, ...]

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """Version as integers, for comparisons."""
        return tuple(int(part) for part in self.version.split("."))


async def resolve_binary(host: Host, binary: str) -> str:
    """Absolute path of a QEMU binary given by name or path; :class:`MissingResource` if absent."""
    if "/" in binary:
        if not await host.exists(Path(binary)):
            raise MissingResource(
                f"vm.qemu: {binary} does not exist on {host.name}; "
                "install qemu-system-x86 or fix the path"
            )
        return binary
    result = await host.run(["sh", "-c", 'command -v "$1"', "sh", binary])
    path = result.stdout.strip()
    if result.status != 0 or not path:
        raise MissingResource(
            f"vm.qemu: {binary} not found in PATH on {host.name}; "
            "install it (apt-get install qemu-system-x86) or give a path"
        )
    return path


async def probe_qemu(host: Host, binary: str) -> QemuFacts:
    """Start ``binary -machine none`` and ask it for its version and capabilities."""
    path = await resolve_binary(host, binary)
    # QEMU's socket and logs on its own host; the monitor's event log here.
    with tempfile.TemporaryDirectory(prefix="migrator-probe-") as local:
        async with host.temp_dir("migrator-probe-") as host_dir:
            socket = host_dir / "qmp.sock"
            argv = [path, "-machine", "none", "-nodefaults", "-no-user-config", "-display",
                    "none", "-qmp", f"unix:{socket},server=on,wait=off"]
            async with QemuProcess(host, "probe", argv, socket, Path(local), host_dir=host_dir,
                                   start_timeout=15) as qemu:
                reply = await qemu.monitor.execute("query-version")
                capabilities = await qemu.monitor.migrate_capabilities()
    q = reply["qemu"]
    return QemuFacts(
        binary=path,
        version=f"{q['major']}.{q['minor']}.{q['micro']}",
        package=str(reply.get("package", "")).strip(),
        capabilities=tuple(sorted(capabilities)),
    )
