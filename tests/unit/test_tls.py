"""Migration over TLS: throwaway certificates, the QEMU objects, plan parameters, config."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from migrator.config import dump_scenario, parse_scenario
from migrator.config.models import Scenario
from migrator.errors import ConfigError, ExitCode, MigrationError, QmpCommandError
from migrator.hosts.base import CommandResult, Host
from migrator.hosts.fake import FakeHost
from migrator.migration.plan import TLS_CREDS_ID, plan_migration, tls_hostname
from migrator.migration.tls import (
    certificate_record,
    enable_tls,
    generate_credentials,
    tls_hint,
)
from migrator.preflight import Need, check_hosts
from migrator.qemu.process import QemuProcess

SSH_HOSTS = {
    "source": {"kind": "ssh", "address": "10.0.0.1"},
    "destination": {"kind": "ssh", "address": "10.0.0.2", "migration_address": "10.1.0.2"},
}


def tls_scenario(tls: dict[str, object] | None = None, *, ssh: bool = True) -> Scenario:
    data: dict[str, Any] = {"name": "tls", "migration": {"tls": tls or {}}}
    if ssh:
        data["hosts"] = SSH_HOSTS
    return parse_scenario(data)


# -- certificates ---------------------------------------------------------------------


def test_generated_chain_verifies_and_names_the_destination() -> None:
    made = generate_credentials(["10.1.0.2", "dst.example"])
    ca = x509.load_pem_x509_certificate(made.ca_cert)
    server = x509.load_pem_x509_certificate(made.server.cert)
    client = x509.load_pem_x509_certificate(made.client.cert)
    # Each side gets the same CA, which issued both certificates.
    assert made.server.ca_cert == made.client.ca_cert == made.ca_cert
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    # A real path validation, as a TLS client checking the server would do it.
    store = verification.Store([ca])
    now = datetime.datetime.now(datetime.UTC)
    for subject in (x509.IPAddress(ipaddress.ip_address("10.1.0.2")),
                    x509.DNSName("dst.example")):
        verifier = (verification.PolicyBuilder().store(store).time(now)
                    .build_server_verifier(subject))
        verifier.verify(server, [])
    with pytest.raises(verification.VerificationError):
        (verification.PolicyBuilder().store(store).time(now)
         .build_server_verifier(x509.DNSName("elsewhere.example")).verify(server, []))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.0.2")]
    assert sans.get_values_for_type(x509.DNSName) == ["dst.example"]
    # What QEMU's load-time sanity check wants (crypto/tlscredsx509.c).
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert, purpose in ((server, ExtendedKeyUsageOID.SERVER_AUTH),
                          (client, ExtendedKeyUsageOID.CLIENT_AUTH)):
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
            x509.ExtendedKeyUsage([purpose])
        assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    # The keys belong to the certificates.
    for credentials, cert in ((made.server, server), (made.client, client)):
        key = serialization.load_pem_private_key(credentials.key, None)
        assert key.public_key() == cert.public_key()


def test_credentials_files_and_repr_hide_nothing_but_the_key() -> None:
    made = generate_credentials(["host-b"])
    assert set(made.server.files()) == {"ca-cert.pem", "server-cert.pem", "server-key.pem"}
    assert set(made.client.files()) == {"ca-cert.pem", "client-cert.pem", "client-key.pem"}
    assert b"PRIVATE KEY" in made.server.key
    assert "PRIVATE KEY" not in repr(made)
    record = certificate_record(made.server.cert)
    assert record["alt_names"] == ["host-b"]
    assert record["issuer"] == "CN=migrator throwaway CA,O=migrator"
    assert len(record["sha256"]) == 64


def test_each_run_gets_its_own_ca() -> None:
    one, two = generate_credentials(["a"]), generate_credentials(["a"])
    assert certificate_record(one.ca_cert)["sha256"] != certificate_record(two.ca_cert)["sha256"]


def test_tls_hint() -> None:
    hint = tls_hint("The certificate hasn't got a known issuer", "10.1.0.2")
    assert hint is not None
    assert hint.startswith("check migration.tls:")
    assert "must name 10.1.0.2" in hint
    for desc in ("TLS handshake failed: Error in the pull function.",
                 "Certificate does not match the hostname 10.1.0.2"):
        assert tls_hint(desc) is not None
    assert tls_hint("Unable to write to socket: Connection reset by peer") is None
    assert tls_hint("postcopy settings") is None  # "tls" only as a word


# -- the QEMU objects -----------------------------------------------------------------


@dataclass
class FakeMonitor:
    """Records object-add and what the QEMU could read from its directory at that moment."""

    host: FakeHost
    refuse: str | None = None
    added: list[dict[str, Any]] = field(default_factory=list)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      **_: object) -> Any:
        assert command == "object-add"
        assert arguments is not None
        if self.refuse:
            raise QmpCommandError("qemu", command, "GenericError", self.refuse)
        directory = Path(str(arguments["dir"]))
        seen = {path.name: data for path, data in self.host.files.items()
                if path.parent == directory}
        self.added.append({**arguments, "files": seen})


@dataclass
class FakeQemu:
    name: str
    host: FakeHost
    workdir: Path
    host_dir: Path
    monitor: FakeMonitor


def fake_qemu(tmp_path: Path, side: str, *, local: bool = False,
              refuse: str | None = None) -> FakeQemu:
    host = FakeHost(f"host-{side}")
    workdir = tmp_path / side
    workdir.mkdir()
    host.commands["mktemp"] = lambda argv: CommandResult(argv, 0, f"/tmp/migrator-tls-{side}\n",
                                                         "")
    return FakeQemu(side, host, workdir, workdir if local else Path(f"/w/run/{side}"),
                    FakeMonitor(host, refuse))


def enable(scenario: Scenario, src: FakeQemu, dst: FakeQemu) -> dict[str, Any]:
    return asyncio.run(enable_tls(scenario, cast(QemuProcess, src), cast(QemuProcess, dst)))


@pytest.mark.parametrize("local", [False, True], ids=["ssh", "local"])
def test_enable_tls_generated(tmp_path: Path, local: bool) -> None:
    scenario = tls_scenario(ssh=not local)
    src, dst = fake_qemu(tmp_path, "src", local=local), fake_qemu(tmp_path, "dst", local=local)
    record = enable(scenario, src, dst)
    hostname = "127.0.0.1" if local else "10.1.0.2"
    assert record["mode"] == "generated"
    assert record["hostname"] == hostname
    assert record["destination"]["certificate"]["alt_names"] == [hostname]
    [server] = dst.monitor.added
    [client] = src.monitor.added
    for added, endpoint, qemu in ((server, "server", dst), (client, "client", src)):
        assert {k: v for k, v in added.items() if k not in ("dir", "files")} == {
            "qom-type": "tls-creds-x509", "id": TLS_CREDS_ID, "endpoint": endpoint,
            "verify-peer": True}
        assert set(added["files"]) == {"ca-cert.pem", f"{endpoint}-cert.pem",
                                       f"{endpoint}-key.pem"}
        directory = Path(added["dir"])
        if local:
            # Never the local run directory: a private temp dir (mktemp -d makes it 0700).
            assert directory == Path(f"/tmp/migrator-tls-{qemu.name}")
            assert ("run", "mktemp", "-d", "-t", "migrator-tls-XXXXXXXX") in qemu.host.calls
        else:
            assert directory == qemu.host_dir / "tls"
            assert ("mkdir", str(directory)) in qemu.host.calls
        # Removed once QEMU has read it: no key stays on the host.
        assert ("rm", str(directory)) in qemu.host.calls
        assert qemu.host.files == {}
        # The public certificates are kept in the run directory, the key is not.
        kept = {p.name: p.read_bytes() for p in qemu.workdir.iterdir()}
        assert set(kept) == {"tls-ca-cert.pem", f"tls-{endpoint}-cert.pem"}
        assert kept[f"tls-{endpoint}-cert.pem"] == added["files"][f"{endpoint}-cert.pem"]
        # No key material anywhere in the record.
        key = added["files"][f"{endpoint}-key.pem"]
        text = json.dumps(record)
        assert "PRIVATE KEY" not in text
        # Every line of the key's body, not only its opening (a fixed PKCS#8 header).
        for line in key.splitlines()[1:-1]:
            assert line.decode() not in text
    # The client's CA issued the server's certificate and the other way round.
    assert server["files"]["ca-cert.pem"] == client["files"]["ca-cert.pem"]


def test_generated_server_certificate_names_hostname_and_address(tmp_path: Path) -> None:
    src, dst = fake_qemu(tmp_path, "src"), fake_qemu(tmp_path, "dst")
    record = enable(tls_scenario({"hostname": "b.example"}), src, dst)
    assert record["hostname"] == "b.example"
    assert record["destination"]["certificate"]["alt_names"] == ["b.example", "10.1.0.2"]
    assert record["destination"]["certificate"]["subject"] == "CN=b.example,O=migrator"


def test_enable_tls_provided(tmp_path: Path) -> None:
    made = generate_credentials(["dst.example"])
    scenario = tls_scenario({"source_dir": "/etc/pki/src", "destination_dir": "/etc/pki/dst",
                             "hostname": "dst.example"})
    src, dst = fake_qemu(tmp_path, "src"), fake_qemu(tmp_path, "dst")
    for qemu, credentials, where in ((src, made.client, "/etc/pki/src"),
                                     (dst, made.server, "/etc/pki/dst")):
        for name, data in credentials.files().items():
            qemu.host.files[Path(where) / name] = data
    record = enable(scenario, src, dst)
    assert record["mode"] == "provided"
    assert record["hostname"] == "dst.example"
    assert dst.monitor.added[0]["dir"] == "/etc/pki/dst"
    assert src.monitor.added[0]["dir"] == "/etc/pki/src"
    assert record["source"]["dir"] == "/etc/pki/src"
    assert record["destination"]["certificate"]["alt_names"] == ["dst.example"]
    assert record["source"]["ca"]["sha256"] == certificate_record(made.ca_cert)["sha256"]
    # The operator's files stay; only reads were made (never a write or removal).
    assert len(src.host.files) == 3
    assert not [call for call in src.host.calls if call[0] in ("write", "rm", "mkdir")]
    assert "PRIVATE KEY" not in json.dumps(record)


def test_enable_tls_provided_missing_certificate(tmp_path: Path) -> None:
    scenario = tls_scenario({"source_dir": "/pki/src", "destination_dir": "/pki/dst"})
    src, dst = fake_qemu(tmp_path, "src"), fake_qemu(tmp_path, "dst")
    with pytest.raises(MigrationError, match=r"migration.tls.destination_dir: "
                                             r"/pki/dst/ca-cert.pem does not exist on host-dst"):
        enable(scenario, src, dst)


def test_refused_credentials_name_the_field_and_qemu_reason(tmp_path: Path) -> None:
    src = fake_qemu(tmp_path, "src")
    dst = fake_qemu(tmp_path, "dst", refuse="TLS credentials support requires GNUTLS")
    with pytest.raises(MigrationError) as caught:
        enable(tls_scenario(), src, dst)
    message = str(caught.value)
    assert message.startswith("migration.tls: the dst QEMU refused its TLS credentials in "
                              "/w/run/dst/tls on host-dst: ")
    assert message.endswith("requires GNUTLS")
    # The error's own code is the generic one: the run's exit 4 comes from its outcome
    # (failed before switchover), which test_ssh_tls.py checks on a real refusal.
    assert caught.value.exit_code == ExitCode.FAILED
    # The key directory went even so.
    assert dst.host.files == {}


# -- plan, config, preflight ----------------------------------------------------------


def test_plan_parameters() -> None:
    plain = plan_migration(parse_scenario({"name": "x", "hosts": SSH_HOSTS}))
    assert "tls-creds" not in plain.source_parameters
    assert plain.destination_parameters == {}
    plan = plan_migration(tls_scenario())
    assert plan.source_parameters["tls-creds"] == TLS_CREDS_ID
    assert plan.source_parameters["tls-hostname"] == "10.1.0.2"  # the migration address
    assert plan.destination_parameters == {"tls-creds": TLS_CREDS_ID}
    assert plan_migration(tls_scenario({"hostname": "b.example"})).source_parameters[
        "tls-hostname"] == "b.example"
    assert tls_hostname(tls_scenario(ssh=False)) == "127.0.0.1"
    unix = parse_scenario({"name": "x", "migration": {"tls": {}, "transport": "unix"}})
    assert plan_migration(unix).source_parameters["tls-hostname"] == "127.0.0.1"
    # TLS adds no capability.
    assert plan.source_capabilities == plain.source_capabilities


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({"source_dir": "/pki"}, "migration.tls: source_dir is set but destination_dir is not"),
        ({"destination_dir": "/pki"},
         "migration.tls: destination_dir is set but source_dir is not"),
        ({"source_dir": "pki", "destination_dir": "/pki"},
         "migration.tls: source_dir='pki' must be an absolute path"),
        ({"hostname": "two words"}, "migration.tls.hostname: String should match"),
        ({"ca": "/pki"}, "migration.tls.ca: unknown key"),
    ],
)
def test_tls_config_is_validated(tls: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^s\.toml: ") as caught:
        parse_scenario({"name": "x", "migration": {"tls": tls}}, source="s.toml")
    assert expected in str(caught.value)


def test_tls_table_turns_tls_on_and_round_trips() -> None:
    assert parse_scenario({"name": "x"}).migration.tls is None
    for scenario in (tls_scenario(), tls_scenario({"source_dir": "/a", "destination_dir": "/b"})):
        assert scenario.migration.tls is not None
        text = dump_scenario(scenario)
        assert "[migration.tls]" in text
        assert parse_scenario(tomllib.loads(text)) == scenario


def tls_needs(scenario: Scenario, source: Host, destination: Host) -> dict[str, list[Need]]:
    """The TLS credential needs the preflight finds, by the roles of each host checked."""
    report = asyncio.run(check_hosts(scenario, source, destination))
    return {"+".join(host.roles): [n for n in host.needs if n.what.startswith("TLS credentials")]
            for host in report.hosts}


def test_preflight_names_missing_provided_files() -> None:
    scenario = tls_scenario({"source_dir": "/pki/src", "destination_dir": "/pki/dst"})
    host = FakeHost("b")
    host.set_text("/pki/dst/ca-cert.pem", "x")
    host.set_text("/pki/dst/server-cert.pem", "x")
    [need] = tls_needs(scenario, FakeHost("a"), host)["destination"]
    assert not need.met
    assert need.what == "TLS credentials in migration.tls.destination_dir /pki/dst"
    assert need.detail == "missing server-key.pem"
    host.set_text("/pki/dst/server-key.pem", "x")
    [need] = tls_needs(scenario, FakeHost("a"), host)["destination"]
    assert need.met
    # Generated credentials need nothing from the hosts.
    assert tls_needs(tls_scenario(), host, host) == {"source+destination": []}
