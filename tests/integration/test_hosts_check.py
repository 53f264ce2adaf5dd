"""``migrator hosts check`` on this machine, asserted field by field."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from migrator.config import dump_scenario
from tests.integration.children import run_migrator
from tests.integration.conftest import scenario


def check(tmp_path: Path, **sections: dict[str, object]) -> subprocess.CompletedProcess[str]:
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(scenario("it-hosts", **sections)))
    return run_migrator(["hosts", "check", str(spec), "--json"], timeout=120)


def test_local_host_facts_and_needs(tmp_path: Path) -> None:
    done = check(tmp_path, vm={"backing": "hugetlb-2m"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["scenario"] == "it-hosts"
    [host] = report["hosts"]
    assert host["roles"] == ["source", "destination"]
    assert host["host"] == "local"
    assert host["kernel"] == platform.release()
    assert host["kvm_device"] == os.path.exists("/dev/kvm")
    assert isinstance(host["kvm_usable"], bool)
    assert host["qemu_binary"].endswith("qemu-system-x86_64")
    assert host["qemu_version"].count(".") == 2
    assert {"postcopy-ram", "postcopy-blocktime", "events"} <= set(host["qemu_capabilities"])
    assert {p["page_size_kib"] for p in host["hugepage_pools"]} >= {2048}
    assert host["userfaultfd"] is True
    assert host["mem_available_mib"] > 0
    assert abs(host["clock_offset_ms"]) <= host["clock_rtt_ms"]
    # This kernel has no HGM: the real MADV_SPLIT probe says so; the host's QEMU has no
    # hugetlb-doublemap.
    assert host["hgm"]["supported"] is False
    assert host["hgm"]["madv_split"] == "not supported: EINVAL"
    assert host["hgm"]["qemu_doublemap"] is False
    needs = {n["what"]: n for n in host["needs"]}
    assert needs["512 free hugepages of 2048 kB"]["met"] is True
    assert needs["userfaultfd (post-copy)"]["met"] is True
    assert all(n["met"] for n in host["needs"])


def test_unmet_need_exits_3_with_the_fix(tmp_path: Path) -> None:
    done = check(tmp_path, vm={"backing": "hugetlb-1g", "memory_mib": 65536})
    assert done.returncode == 3
    report = json.loads(done.stdout)
    [host] = report["hosts"]
    unmet = [n for n in host["needs"] if not n["met"]]
    assert [n["what"] for n in unmet] == ["128 free hugepages of 1048576 kB"]
    assert "hugepagesz=1G hugepages=128" in unmet[0]["fix"]
    assert "1 unmet need" in done.stderr
