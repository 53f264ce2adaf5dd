"""Scenario host entries, their mapping to SSH targets, and copying files onto hosts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from migrator.config import dump_scenario, load_scenario, parse_scenario
from migrator.config.models import LocalHostSpec, SSHHostSpec
from migrator.errors import ConfigError
from migrator.hosts.fake import FakeHost
from migrator.hosts.local import LocalHost
from migrator.runner import run_scenario, scenario_hosts, ssh_target


def ssh(**fields: object) -> dict[str, object]:
    return {"kind": "ssh", "address": "192.0.2.10", **fields}


def test_ssh_entry_defaults() -> None:
    scenario = parse_scenario({"name": "x", "hosts": {"source": ssh(),
                                                       "destination": ssh(address="h2")}})
    source = scenario.hosts.source
    assert isinstance(source, SSHHostSpec)
    assert (source.port, source.user, source.check_host_key) == (22, "root", True)
    assert source.work_dir == Path("/var/tmp/migrator")
    assert source.identity_file is None
    assert source.known_hosts is None
    assert source.migration_port is None
    assert source.stream_address == "192.0.2.10"
    destination = scenario.hosts.destination
    assert isinstance(destination, SSHHostSpec)
    assert destination.model_copy(update={"migration_address": "10.0.0.2"}).stream_address \
        == "10.0.0.2"


def test_ssh_entries_round_trip(tmp_path: Path) -> None:
    scenario = parse_scenario({"name": "x", "hosts": {
        "source": ssh(identity_file="~/.ssh/id_ed25519", known_hosts="/etc/kh", port=2222,
                      check_host_key=False, work_dir="/srv/mig"),
        "destination": ssh(address="fe80::1%mig0", migration_port=4444)}})
    path = tmp_path / "s.toml"
    path.write_text(dump_scenario(scenario))
    assert load_scenario(path) == scenario


def test_ssh_target_mapping() -> None:
    spec = SSHHostSpec(kind="ssh", address="h1", port=2222, user="mig",
                       identity_file=Path("~/.ssh/id"), known_hosts=Path("/etc/kh"),
                       check_host_key=False, connect_timeout_s=4.0)
    target = ssh_target(spec)
    assert (target.address, target.port, target.user) == ("h1", 2222, "mig")
    assert target.identity_file == Path.home() / ".ssh" / "id"
    assert target.known_hosts == Path("/etc/kh")
    assert target.check_host_key is False
    assert target.connect_timeout == 4.0


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ({"source": ssh(kind="rsh")}, "hosts.source: Input tag 'rsh'"),
        ({"source": ssh(prot=22)}, "hosts.source.ssh.prot: unknown key"),
        ({"source": ssh(address="")}, "hosts.source.ssh.address: String should match"),
        ({"source": ssh(address="a b")}, "hosts.source.ssh.address: String should match"),
        ({"source": ssh(port=0)}, "hosts.source.ssh.port: Input should be greater"),
        ({"source": ssh(work_dir="tmp/mig")}, "work_dir='tmp/mig' must be an absolute path"),
        ({"source": ssh(work_dir="/")}, "must be an absolute path other than /"),
        ({"source": ssh()}, "a local destination with an ssh source is not supported"),
    ],
)
def test_invalid_host_entries_name_the_field(hosts: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario({"name": "x", "hosts": hosts}, source="s.toml")
    assert expected in str(caught.value)


def test_unix_transport_needs_one_host() -> None:
    # Refused when the scenario loads (config check too), before any runner exists.
    with pytest.raises(ConfigError) as caught:
        parse_scenario({"name": "x", "migration": {"transport": "unix"},
                        "hosts": {"source": ssh(), "destination": ssh(address="192.0.2.11")}},
                       source="s.toml")
    assert str(caught.value).startswith('s.toml: migration.transport = "unix" needs source '
                                        "and destination on one host")
    assert "\n" not in str(caught.value)
    # Equal entries are one host; two local entries too.
    for hosts in ({"source": ssh(), "destination": ssh()}, {}):
        scenario = parse_scenario({"name": "x", "migration": {"transport": "unix"},
                                   "hosts": hosts})
        assert scenario.migration.transport == "unix"


async def test_local_entries_share_one_local_host() -> None:
    scenario = parse_scenario({"name": "x", "hosts": {"source": {"kind": "local"}}})
    assert scenario.hosts.source == LocalHostSpec()
    async with scenario_hosts(scenario) as (source, destination):
        assert isinstance(source, LocalHost)
        assert source is destination


async def test_put_copies_onto_hosts(tmp_path: Path) -> None:
    local = tmp_path / "kernel"
    local.write_bytes(b"\x7fELF kernel")
    fake = FakeHost()
    await fake.put(local, Path("/remote/vmlinuz"))
    assert fake.files[Path("/remote/vmlinuz")] == b"\x7fELF kernel"
    host = LocalHost()
    await host.put(local, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"\x7fELF kernel"
    await host.put(local, local)  # the same file: nothing to do, not an error
    assert local.read_bytes() == b"\x7fELF kernel"
    with pytest.raises(FileNotFoundError):
        await host.put(tmp_path / "absent", tmp_path / "copy")


async def test_temp_dir_is_private_and_removed() -> None:
    host = LocalHost()
    async with host.temp_dir("migrator-test-") as path:
        assert path.is_dir()
        assert path.name.startswith("migrator-test-")
        assert path.stat().st_mode & 0o777 == 0o700
        (path / "file").write_text("x")
    assert not path.exists()


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"hosts": {"source": ssh(work_dir="/var/tmp/" + "w" * 60), "destination": ssh()}},
         "hosts.source.work_dir: socket paths such as /var/tmp/www"),
    ],
)
def test_impossible_layouts_fail_before_connecting(
    tmp_path: Path, sections: dict[str, object], expected: str
) -> None:
    # 192.0.2.0/24 is TEST-NET-1: nothing is ever contacted, the check comes first.
    scenario = parse_scenario({"name": "x", **sections})
    with pytest.raises(ConfigError, match=expected):
        asyncio.run(run_scenario(scenario, tmp_path))
    [run_dir] = tmp_path.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["outcome"] == "not-started"
