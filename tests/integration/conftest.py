"""Integration tests run real QEMU, real hugetlbfs and real hugepage pools: root only."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.config import Scenario, parse_scenario
from tests.integration.sshhosts import SSHTestbed, make_testbed

REPO = Path(__file__).resolve().parents[2]
# Where tests (and docs/qemu-notes.md) keep the Debian sid root with QEMU 11.1.
SID_ROOT = Path("/var/cache/migrator/roots/sid")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _needs_root_and_qemu() -> None:
    # Not a skip: on the machines this project targets (CI included) these hold, and the
    # core post-copy path must never be silently skipped there.
    assert os.geteuid() == 0, "integration tests reserve hugepages and need root"
    assert shutil.which("qemu-system-x86_64"), "run scripts/setup first: QEMU is missing"


def scenario(name: str, **sections: dict[str, object] | list[dict[str, object]]) -> Scenario:
    """A small, fast scenario for tests (TCG-friendly sizes), overridable per section."""
    data: dict[str, object] = {
        "name": name,
        "vm": {"memory_mib": 512, "vcpus": 1, "backing": "memfd-4k", "accel": "auto"},
        "workload": {"working_set_mib": 256, "write_pct": 50, "warmup_s": 0.5},
        # downtime_limit_ms=1 keeps pre-copy from converging before the switch (what QEMU's
        # own migration tests do), so post-copy really happens in every post-copy test.
        # The early switch keeps QEMU 7.2 under TCG within 3 dirty-sync passes: beyond that
        # its lost dirty tracking corrupts the guest (docs/qemu-notes.md, "Guest kernel crash").
        "migration": {"postcopy": True, "timeout_s": 300, "downtime_limit_ms": 1,
                      "switchover": {"policy": "after-seconds", "seconds": 0.3}},
    }
    for key, value in sections.items():
        if isinstance(value, list):  # an array of tables, such as faults
            data[key] = value
            continue
        merged = dict(data.get(key, {}))  # type: ignore[call-overload]
        merged.update(value)
        data[key] = merged
    return parse_scenario(data)


@pytest.fixture(scope="session")
def qemu_11_root() -> Path:
    """The sid root holding QEMU 11.1, made on first use by ``scripts/make-qemu-root``.

    scripts/setup does not make it (347 MB); the script is idempotent: an existing root
    is only checked (``--version``, no network), a missing one is debootstrapped (~30 s).
    Not a skip either: the 11.1 tests must run wherever the integration tests run.
    """
    made = subprocess.run([str(REPO / "scripts" / "make-qemu-root"), str(SID_ROOT)],
                          capture_output=True, text=True, timeout=1800, check=False)
    assert made.returncode == 0, f"scripts/make-qemu-root {SID_ROOT}: {made.stderr[-2000:]}"
    return SID_ROOT


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directories of the whole session (kept by pytest for inspection)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def ssh_testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHTestbed]:
    """Two namespace hosts with a real sshd each, shared by every SSH test of the session."""
    with make_testbed(tmp_path_factory.mktemp("ssh-testbed")) as bed:
        yield bed


@pytest.fixture
def work_root() -> Iterator[Path]:
    """The SSH test hosts' work_dir parent: short, so the hosts' socket paths stay short."""
    path = Path(tempfile.mkdtemp(prefix="mig-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
