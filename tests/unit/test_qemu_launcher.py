"""How a QEMU is started: the host's own binary, or one inside a separate root filesystem."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from migrator.config import Backing, parse_scenario
from migrator.config.loader import dump_scenario
from migrator.errors import ConfigError, MissingResource
from migrator.guest.build import GuestArtifacts
from migrator.hosts.fake import FakeHost
from migrator.qemu.accel import kvm_probe_argv
from migrator.qemu.cmdline import LaunchSpec, qemu_argv
from migrator.qemu.launcher import QemuLauncher, binary_in_root, qemu_launcher
from migrator.qemu.probe import QemuFacts, resolve_binary

ROOT = "/var/cache/migrator/roots/sid"
ROOT_QEMU = f"{ROOT}/usr/bin/qemu-system-x86_64"
# The form docs/qemu-notes.md section 2A gives, with QEMU's own arguments in the middle.
ROOT_PREFIX = [
    "env", f"QEMU_MODULE_DIR={ROOT}/usr/lib/x86_64-linux-gnu/qemu",
    f"{ROOT}/lib64/ld-linux-x86-64.so.2",
    "--library-path", f"{ROOT}/usr/lib/x86_64-linux-gnu:{ROOT}/lib/x86_64-linux-gnu",
    ROOT_QEMU,
]
ROOT_TRAILING = ["-L", f"{ROOT}/usr/share/qemu", "-L", f"{ROOT}/usr/share/seabios"]


def test_host_qemu_is_just_its_binary() -> None:
    launcher = qemu_launcher("/usr/bin/qemu-system-x86_64")
    assert launcher == QemuLauncher("/usr/bin/qemu-system-x86_64")
    assert launcher.argv(["-machine", "none"]) == ["/usr/bin/qemu-system-x86_64", "-machine",
                                                   "none"]


def test_root_qemu_runs_with_the_roots_loader_modules_and_firmware() -> None:
    launcher = qemu_launcher(ROOT_QEMU, ROOT)
    assert launcher.env == (("QEMU_MODULE_DIR", f"{ROOT}/usr/lib/x86_64-linux-gnu/qemu"),)
    assert launcher.argv(["-machine", "none"]) == [*ROOT_PREFIX, "-machine", "none",
                                                   *ROOT_TRAILING]
    # A trailing slash on the root changes nothing.
    assert qemu_launcher(ROOT_QEMU, ROOT + "/") == launcher


@pytest.mark.parametrize(("binary", "path"), [
    ("qemu-system-x86_64", ROOT_QEMU),
    ("/usr/local/bin/qemu-system-x86_64", f"{ROOT}/usr/local/bin/qemu-system-x86_64"),
    ("opt/qemu/bin/qemu", f"{ROOT}/opt/qemu/bin/qemu"),
])
def test_binary_is_looked_up_inside_the_root(binary: str, path: str) -> None:
    assert binary_in_root(ROOT, binary) == path


def _spec(launcher: QemuLauncher) -> LaunchSpec:
    return LaunchSpec(
        launcher=launcher, name="dst", memory_mib=512, vcpus=1, backing=Backing.MEMFD_4K,
        accel="tcg", machine="pc", kernel=Path("/k"), initrd=Path("/i"), append="console=ttyS0",
        qmp_socket=Path("/r/qmp.sock"), serial_args=("-serial", "null"), incoming=True,
        trace_file=Path("/r/trace.log"),
    )


def test_vm_argv_wraps_the_same_arguments_in_the_roots_launcher() -> None:
    host = qemu_argv(_spec(qemu_launcher("/usr/bin/qemu-system-x86_64")))
    rooted = qemu_argv(_spec(qemu_launcher(ROOT_QEMU, ROOT)))
    assert rooted == [*ROOT_PREFIX, *host[1:], *ROOT_TRAILING]


def test_facts_and_both_probes_use_one_launcher() -> None:
    facts = QemuFacts(ROOT_QEMU, "11.1.3", "Debian 1:11.1.3+ds-1", ("postcopy-ram",), root=ROOT)
    assert facts.launcher == qemu_launcher(ROOT_QEMU, ROOT)
    assert QemuFacts("/usr/bin/q", "7.2.22", "", ()).launcher == QemuLauncher("/usr/bin/q")
    guest = GuestArtifacts(kernel=Path("/g/vmlinuz"), initrd=Path("/g/initrd"),
                           kernel_release="6.1.0", probe_sha256="x")
    argv = kvm_probe_argv(facts.launcher, guest, Path("/tmp/p"), qmp_connects=True)
    assert argv[:len(ROOT_PREFIX)] == ROOT_PREFIX
    assert argv[-len(ROOT_TRAILING):] == ROOT_TRAILING
    assert argv[argv.index("-accel") + 1] == "kvm"


def _root_host(*present: str) -> FakeHost:
    host = FakeHost("h1")
    for path in present:
        host.set_text(path, "")
    return host


def test_missing_root_names_the_setting_and_the_script_that_makes_it() -> None:
    with pytest.raises(MissingResource) as caught:
        asyncio.run(resolve_binary(_root_host(), "qemu-system-x86_64", ROOT))
    message = str(caught.value)
    assert message.startswith(f"vm.qemu_root: {ROOT} does not exist on h1")
    assert f"scripts/make-qemu-root {ROOT}" in message


def test_root_without_the_binary_or_loader_is_refused() -> None:
    loader = f"{ROOT}/lib64/ld-linux-x86-64.so.2"
    with pytest.raises(MissingResource, match=f"has no {ROOT_QEMU} .*make-qemu-root"):
        asyncio.run(resolve_binary(_root_host(loader), "qemu-system-x86_64", ROOT))
    with pytest.raises(MissingResource, match=f"has no {loader}"):
        asyncio.run(resolve_binary(_root_host(ROOT_QEMU), "qemu-system-x86_64", ROOT))
    found = asyncio.run(resolve_binary(_root_host(ROOT_QEMU, loader), "qemu-system-x86_64",
                                       ROOT))
    assert found == ROOT_QEMU


def test_qemu_root_must_be_absolute_and_is_optional() -> None:
    with pytest.raises(ConfigError, match=r"vm\.qemu_root"):
        parse_scenario({"name": "x", "vm": {"qemu_root": "roots/sid"}})
    assert parse_scenario({"name": "x", "vm": {"qemu_root": ROOT}}).vm.qemu_root == ROOT
    # Unset, it is not written out: scenarios (and their hashes) without it stay the same.
    assert "qemu_root" not in dump_scenario(parse_scenario({"name": "x"}))
