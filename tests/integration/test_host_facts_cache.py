"""The host facts cache: a run's preflight answers from it until the host or QEMU changes.

Real probes on this machine: a ``-machine none`` QEMU and the MADV_SPLIT probe (which
holds a 2 MiB hugepage, hence the integration lock like every test that touches the
pools).  The cache file is the test's own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from migrator.cache import read_cache
from migrator.hgm import detect, detect_hgm
from migrator.hosts.identity import host_key
from migrator.hosts.local import LocalHost
from migrator.qemu import probe
from migrator.qemu.probe import SettingsTrial, probe_qemu_cached

pytestmark = pytest.mark.asyncio

TRIAL = SettingsTrial("the source's", {"postcopy-ram": True}, {"downtime-limit": 250})


async def test_host_key_changes_when_the_file_is_rewritten(tmp_path: Path) -> None:
    host = LocalHost()
    binary = tmp_path / "qemu"
    binary.write_bytes(b"one")
    before = await host_key(host, str(binary))
    assert before is not None
    boot_id = (await host.read_text(Path("/proc/sys/kernel/random/boot_id"))).strip()
    assert before.startswith(f"{host.name}|{boot_id}|")
    assert await host_key(host, str(binary)) == before
    binary.write_bytes(b"two")
    assert await host_key(host, str(binary)) != before
    assert await host_key(host, str(tmp_path / "missing")) is None


async def test_qemu_probe_is_answered_from_the_cache_until_the_binary_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, cache = LocalHost(), tmp_path / "host-facts.json"
    system_qemu = shutil.which("qemu-system-x86_64")
    assert system_qemu, "setup installs qemu-system-x86_64"
    binary = tmp_path / "qemu-system-x86_64"
    shutil.copy2(system_qemu, binary)
    probed: list[str] = []
    real_probe = probe._probe

    async def counted(*args: object, **kwargs: object) -> object:
        probed.append(str(args[1]))
        return await real_probe(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(probe, "_probe", counted)
    first = await probe_qemu_cached(host, str(binary), None, [TRIAL], cache)
    again = await probe_qemu_cached(host, str(binary), None, [TRIAL], cache)
    assert probed == [str(binary)]
    assert again == first
    assert first[0].version
    assert "postcopy-ram" in first[0].capabilities
    # Other settings are another question for the same binary.
    other = SettingsTrial("the source's", {"postcopy-ram": True}, {"downtime-limit": 10**9})
    _, refused = await probe_qemu_cached(host, str(binary), None, [other], cache)
    assert len(probed) == 2
    assert refused
    assert "downtime-limit" in refused[0].lower().replace("_", "-")
    # A rewritten binary (same bytes, new ctime) is probed again.
    os.utime(binary)
    await probe_qemu_cached(host, str(binary), None, [TRIAL], cache)
    assert len(probed) == 3
    assert len(read_cache(cache)) == 3


async def test_hgm_kernel_probe_is_cached_by_boot_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, cache = LocalHost(), tmp_path / "host-facts.json"
    probes: list[int] = []
    real = detect.probe_madv_split

    async def counted(*args: object, **kwargs: object) -> tuple[str, str]:
        probes.append(1)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(detect, "probe_madv_split", counted)
    first = await detect_hgm(host, None, cache)
    second = await detect_hgm(host, None, cache)
    assert len(probes) == 1
    assert second == first
    assert first.madv_split == detect.NOT_SUPPORTED  # this kernel has no HGM series
    # Without a cache file every call probes.
    await detect_hgm(host, None)
    assert len(probes) == 2


async def test_could_not_probe_is_never_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "host-facts.json"

    async def cannot(*args: object, **kwargs: object) -> tuple[str, str]:
        return "could not probe: no free hugepage", "no free hugepage"

    monkeypatch.setattr(detect, "probe_madv_split", cannot)
    await detect_hgm(LocalHost(), None, cache)
    assert read_cache(cache) == {}
