"""``migrator hosts check`` on the two SSH namespace hosts, asserted field by field.

Both hosts are this machine seen through sshd in its own network namespace:
the same kernel, QEMU, pools and clock, so every fact can be checked against
what this process sees itself.  Each sshd also has a mount namespace of its own
(``ip netns exec`` makes one), which lets a test hide a path from one host only.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migrator.config import dump_scenario
from migrator.hosts.ssh import SSHHost
from tests.integration.children import run_migrator
from tests.integration.conftest import host_qemu_version
from tests.integration.ssh_scenarios import ssh_scenario
from tests.integration.sshhosts import SSHTestbed

# A stable path (the accelerator verdict is cached per host and binary path, so a new
# path per session would cost a KVM boot probe each time); only a symlink lives there.
QEMU_ELSEWHERE = Path("/var/tmp/migrator-it-qemu")
ZSTD_NEED = 'zstd (collect.compress = "zstd": the destination trace is compressed there)'


def hosts_check(tmp_path: Path, bed: SSHTestbed, work_root: Path,
                **sections: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """``migrator hosts check --json`` on a scenario migrating from host a to host b."""
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(ssh_scenario(bed, work_root, "it-ssh-hosts", **sections)))
    return run_migrator(["hosts", "check", str(spec), "--json"], timeout=300)


def by_what(host: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A host's needs by what they are."""
    return {need["what"]: need for need in host["needs"]}


def test_facts_and_needs_of_both_hosts(
    tmp_path: Path, ssh_testbed: SSHTestbed, work_root: Path,
    record_property: Any,
) -> None:
    bed = ssh_testbed
    done = hosts_check(tmp_path, bed, work_root, vm={"backing": "hugetlb-2m"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["scenario"] == "it-ssh-hosts"
    source, destination = report["hosts"]
    # Roles per host, each host named by its address.
    assert (source["roles"], source["host"]) == (["source"], bed.a.address)
    assert (destination["roles"], destination["host"]) == (["destination"], bed.b.address)
    for host in (source, destination):
        assert host["kernel"] == platform.release()
        # /dev/kvm is there, but no guest boots under it on this machine.
        assert host["kvm_device"] == os.path.exists("/dev/kvm")
        assert host["kvm_usable"] is False
        assert "KVM present but not usable" in host["kvm_detail"]
        assert host["qemu_binary"] == shutil.which("qemu-system-x86_64")
        assert host["qemu_version"] == host_qemu_version()
        assert {"postcopy-ram", "postcopy-blocktime", "postcopy-preempt", "events",
                "return-path"} <= set(host["qemu_capabilities"])
        assert "hugetlb-doublemap" not in host["qemu_capabilities"]
        # The pools of this kernel, as its sysfs says (the pool may move meanwhile:
        # other tests share it, so only its shape is checked).
        pools = {pool["page_size_kib"]: pool for pool in host["hugepage_pools"]}
        assert set(pools) == {2048, 1048576}
        for pool in pools.values():
            assert pool["total"] >= pool["free"] >= pool["reserved"] >= 0
        assert all(m["path"].startswith("/") and "pagesize=" in m["options"]
                   for m in host["hugetlbfs_mounts"])
        assert host["userfaultfd"] is True
        assert host["mem_available_mib"] > 512
        # HGM: this kernel has no MADV_SPLIT, this QEMU no hugetlb-doublemap.
        hgm = host["hgm"]
        assert hgm["host"] == host["host"]
        assert hgm["supported"] is False
        assert hgm["madv_split"] == "not supported: EINVAL"
        assert hgm["kernel_release"] == platform.release()
        assert hgm["qemu_doublemap"] is False
        assert "lacks MADV_SPLIT" in hgm["reason"]
        # One machine clock: the offset is within the error bound of its measurement.
        offset, rtt = host["clock_offset_ms"], host["clock_rtt_ms"]
        record_property(f"clock_{host['roles'][0]}_offset_rtt_ms", [offset, rtt])
        assert 0 < rtt < 50
        assert abs(offset) <= rtt / 2 + 1
    # Needs per role: capabilities for each side's part, userfaultfd and zstd (which
    # compresses its trace there) on the destination only, and the hugepages of both VMs on
    # the one kernel both hosts share.
    src_needs, dst_needs = by_what(source), by_what(destination)
    settings = "migration settings (capabilities and parameters)"
    assert list(src_needs) == ["migration capabilities events, postcopy-ram", settings,
                               "256 free hugepages of 2048 kB"]
    assert list(dst_needs) == ["migration capabilities events, postcopy-blocktime, postcopy-ram",
                               settings, "256 free hugepages of 2048 kB",
                               "userfaultfd (post-copy)", ZSTD_NEED]
    # Each side's probe QEMU, over SSH, was handed that side's settings and took them.
    for needs in (src_needs, dst_needs):
        assert needs[settings]["detail"].endswith(" takes them")
    assert all(need["met"] and not need["fix"] for need in [*source["needs"],
                                                            *destination["needs"]])
    assert "alongside" not in src_needs["256 free hugepages of 2048 kB"]["detail"]
    assert dst_needs["256 free hugepages of 2048 kB"]["detail"].startswith(
        "could be reserved alongside 256 claimed for other VMs on the same kernel")
    assert dst_needs["userfaultfd (post-copy)"]["detail"] == "present"


@pytest.fixture
def qemu_only_on_a(ssh_testbed: SSHTestbed) -> Iterator[Path]:
    """A QEMU path that exists on host a and not on host b."""
    QEMU_ELSEWHERE.mkdir(exist_ok=True)
    link = QEMU_ELSEWHERE / "qemu-system-x86_64"
    if not link.is_symlink():
        real = shutil.which("qemu-system-x86_64")
        assert real is not None
        link.symlink_to(real)

    async def on_b(*argv: str) -> None:
        async with SSHHost(ssh_testbed.target(ssh_testbed.b)) as host:
            (await host.run(argv)).check(" ".join(argv))

    # An empty tmpfs over the directory, in host b's mount namespace only.
    asyncio.run(on_b("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "migrator-it",
                     str(QEMU_ELSEWHERE)))
    try:
        yield link
    finally:
        asyncio.run(on_b("umount", str(QEMU_ELSEWHERE)))


def test_qemu_missing_on_the_destination_is_an_unmet_need_exit_3(
    tmp_path: Path, ssh_testbed: SSHTestbed, work_root: Path, qemu_only_on_a: Path,
) -> None:
    bed = ssh_testbed
    done = hosts_check(tmp_path, bed, work_root, vm={"qemu": str(qemu_only_on_a)})
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert "1 unmet need(s)" in done.stderr
    source, destination = json.loads(done.stdout)["hosts"]
    # The source is fine, and says so in full.
    assert source["qemu_binary"] == str(qemu_only_on_a)
    assert source["qemu_version"] == host_qemu_version()
    assert all(need["met"] for need in source["needs"])
    # The destination: no QEMU, so no capabilities, and the unmet need names the fix.
    assert destination["qemu_binary"] is None
    assert destination["qemu_version"] is None
    assert destination["qemu_capabilities"] == []
    assert destination["hgm"]["qemu_doublemap"] is None
    assert destination["kvm_usable"] is None
    assert destination["kvm_detail"].startswith("not probed: vm.qemu:")
    [unmet] = [need for need in destination["needs"] if not need["met"]]
    assert unmet["what"] == f"QEMU {qemu_only_on_a}"
    assert unmet["detail"] == (f"vm.qemu: {qemu_only_on_a} does not exist on {bed.b.address}; "
                               "install qemu-system-x86 or fix the path")
    # The other facts of the destination are still reported.
    assert destination["kernel"] == platform.release()
    assert destination["userfaultfd"] is True
    assert destination["clock_rtt_ms"] is not None
