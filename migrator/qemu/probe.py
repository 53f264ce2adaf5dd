"""What a QEMU binary can do, asked of a throwaway ``-machine none`` instance."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from migrator.cache import read_cache, store_in_cache
from migrator.errors import MissingResource, QmpCommandError
from migrator.hosts.base import Host
from migrator.hosts.identity import host_key
from migrator.qemu.cmdline import qmp_args
from migrator.qemu.launcher import ROOT_LOADER, QemuLauncher, binary_in_root, qemu_launcher
from migrator.qemu.process import QemuProcess

__all__ = [
    "QemuFacts",
    "SettingsTrial",
    "probe_qemu",
    "probe_qemu_cached",
    "probe_qemu_trying",
    "resolve_binary",
]

MAKE_ROOT = "scripts/make-qemu-root"


@dataclass(frozen=True)
class QemuFacts:
    """A QEMU binary's identity and migration capabilities.

    ``binary`` is the executable's path on its host; ``root`` the root
    filesystem it lives in (``vm.qemu_root``), None for the host's own QEMU.
    """

    binary: str
    version: str
    package: str
    capabilities: tuple[str, ...]
    root: str | None = None

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """Version as integers, for comparisons."""
        return tuple(int(part) for part in self.version.split("."))

    @property
    def launcher(self) -> QemuLauncher:
        """How every QEMU of this binary is started (see :mod:`migrator.qemu.launcher`)."""
        return qemu_launcher(self.binary, self.root)


async def _resolve_in_root(host: Host, binary: str, root: str) -> str:
    """Host path of ``binary`` inside ``root``, after checking the root can run it."""
    fix = f"make it with {MAKE_ROOT} {root} (as root, on {host.name})"
    if not await host.exists(Path(root)):
        raise MissingResource(f"vm.qemu_root: {root} does not exist on {host.name}; {fix}")
    path = binary_in_root(root, binary)
    for needed in (path, str(Path(root) / ROOT_LOADER)):
        if not await host.exists(Path(needed)):
            raise MissingResource(
                f"vm.qemu_root: {root} on {host.name} has no {needed} (vm.qemu = {binary!r} "
                f"is looked up inside the root); {fix}, or fix vm.qemu"
            )
    return path


async def resolve_binary(host: Host, binary: str, root: str | None = None) -> str:
    """Absolute path of a QEMU binary given by name or path; :class:`MissingResource` if absent.

    With ``root`` the binary is looked up inside that root filesystem (a name in
    its ``usr/bin``, a path relative to the root).
    """
    if root is not None:
        return await _resolve_in_root(host, binary, root)
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


@dataclass(frozen=True)
class SettingsTrial:
    """Migration capabilities and parameters to hand a probe QEMU, and whose they are.

    QEMU checks names, types, ranges and combinations (post-copy with multifd or
    compression, say) when they are set, so setting them on a ``-machine none``
    instance before any VM boots gives its verdict, in its own words, for the
    very binary the run will use.
    """

    who: str
    capabilities: Mapping[str, bool]
    parameters: Mapping[str, object]


async def probe_qemu(host: Host, binary: str, root: str | None = None) -> QemuFacts:
    """Start ``binary -machine none`` (from ``root`` if given): its version and capabilities."""
    facts, _ = await probe_qemu_trying(host, binary, root)
    return facts


async def probe_qemu_trying(host: Host, binary: str, root: str | None = None,
                            trials: Sequence[SettingsTrial] = ()) -> tuple[QemuFacts, list[str]]:
    """:func:`probe_qemu`, and each trial's settings handed to the same instance.

    Returns the facts and what QEMU refused, one ``who: QEMU's error`` line per
    trial it refused.  Capabilities the binary does not have are left out of a
    trial (the facts say which are missing).
    """
    return await _probe(host, await resolve_binary(host, binary, root), root, trials)


async def probe_qemu_cached(host: Host, binary: str, root: str | None,
                            trials: Sequence[SettingsTrial], cache_file: Path,
                            ) -> tuple[QemuFacts, list[str]]:
    """:func:`probe_qemu_trying`, answered from ``cache_file`` while nothing changed.

    The answer is kept under the host's boot id, the binary's identity (see
    :func:`~migrator.hosts.identity.host_key`), the root and the trials' settings,
    so a new QEMU, a reboot or other settings probe again.  A host whose identity
    cannot be read is probed every time.
    """
    path = await resolve_binary(host, binary, root)
    identity = await host_key(host, path)
    if identity is None:
        return await _probe(host, path, root, trials)
    key = json.dumps(["qemu-probe", identity, root,
                      [[t.who, dict(t.capabilities), dict(t.parameters)] for t in trials]],
                     sort_keys=True, default=str)
    cached = (await asyncio.to_thread(read_cache, cache_file)).get(key)
    if isinstance(cached, dict):
        facts = cached["facts"]
        return (QemuFacts(**{**facts, "capabilities": tuple(facts["capabilities"])}),
                list(cached["refused"]))
    facts, refused = await _probe(host, path, root, trials)
    await asyncio.to_thread(store_in_cache, cache_file, key,
                            {"facts": asdict(facts), "refused": refused})
    return facts, refused


async def _probe(host: Host, path: str, root: str | None,
                 trials: Sequence[SettingsTrial]) -> tuple[QemuFacts, list[str]]:
    launcher = qemu_launcher(path, root)
    # QEMU's socket and logs on its own host; the monitor's event log here.
    with tempfile.TemporaryDirectory(prefix="migrator-probe-") as local:
        async with host.temp_dir("migrator-probe-") as host_dir:
            socket = host_dir / "qmp.sock"
            argv = launcher.argv(["-machine", "none", "-nodefaults", "-no-user-config",
                                  "-display", "none",
                                  *qmp_args(socket, qemu_connects=host.is_controller_machine)])
            async with QemuProcess(host, "probe", argv, socket, Path(local), host_dir=host_dir,
                                   start_timeout=15) as qemu:
                reply = await qemu.monitor.execute("query-version")
                capabilities = await qemu.monitor.migrate_capabilities()
                turned_on: set[str] = set()
                refused = [refusal for trial in trials
                           if (refusal := await _try(qemu, trial, capabilities, turned_on))]
    q = reply["qemu"]
    return QemuFacts(
        binary=path,
        version=f"{q['major']}.{q['minor']}.{q['micro']}",
        package=str(reply.get("package", "")).strip(),
        capabilities=tuple(sorted(capabilities)),
        root=root,
    ), refused


async def _try(qemu: QemuProcess, trial: SettingsTrial, known: Mapping[str, bool],
               turned_on: set[str]) -> str | None:
    """QEMU's error for ``trial``'s settings, or None when it took them.

    ``turned_on``: capabilities earlier trials turned on; those this trial does not
    name are turned off first, so each trial is judged alone.
    """
    wanted = {name: on for name, on in trial.capabilities.items() if name in known}
    try:
        await qemu.monitor.set_capabilities(
            {name: False for name in turned_on - wanted.keys()} | wanted)
        turned_on.clear()
        turned_on.update(name for name, on in wanted.items() if on)
        await qemu.monitor.set_parameters(trial.parameters)
    except QmpCommandError as error:
        return f"{trial.who}: {error.desc}"
    return None
