"""Post-copy over TLS between the two SSH namespace hosts (sshhosts.py).

The proof that the stream really was TLS is taken on the wire: a packet
sniffer in the destination's namespace records the first payload bytes of
every TCP flow on the migration link ``mig0``.  A plaintext QEMU migration
stream starts with its file magic ``QEVM``; a TLS one with a handshake record
(``16 03``).  The failure cases show that each side really checks its peer:
certificates the other side's CA did not issue, or a server certificate for
another name, stop the migration with one clear error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.config import dump_scenario
from migrator.metrics.summary import build_report
from migrator.migration.tls import generate_credentials
from tests.integration.children import run_migrator
from tests.integration.conftest import one_error_line, run_migration
from tests.integration.ssh_scenarios import NOTHING, leftovers, ssh_scenario
from tests.integration.sshhosts import NamespaceHost, SSHTestbed

QEVM = b"QEVM".hex()  # QEMU_VM_FILE_MAGIC: the first bytes of a plaintext stream
TLS_HANDSHAKE = "1603"  # TLS record: content type handshake (22), version major 3

# Runs inside a host's namespace: the first payload bytes and the payload total of
# every TCP flow through one interface, as JSON on stdout once SIGTERM arrives.
SNIFFER = r"""
import json, signal, socket, struct, sys
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
sniff.bind((sys.argv[1], 0))
sniff.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
sniff.settimeout(0.2)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
flows = {}
frame = bytearray(1 << 17)
print("ready", flush=True)
while not stop:
    try:
        size = sniff.recv_into(frame)
    except OSError:
        continue
    if size < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
        continue
    tcp = 14 + (frame[14] & 15) * 4
    start = tcp + (frame[tcp + 12] >> 4) * 4
    end = min(size, 14 + struct.unpack_from("!H", frame, 16)[0])
    if end <= start:
        continue
    ports = struct.unpack_from("!HH", frame, tcp)
    key = "%s:%d>%s:%d" % (socket.inet_ntoa(frame[26:30]), ports[0],
                           socket.inet_ntoa(frame[30:34]), ports[1])
    flow = flows.setdefault(key, {"first": bytes(frame[start:start + 8]).hex(), "bytes": 0})
    flow["bytes"] += end - start
json.dump(flows, sys.stdout)
"""


class Sniffer:
    """:data:`SNIFFER` on ``mig0`` of one namespace host, for a ``with`` block."""

    def __init__(self, host: NamespaceHost) -> None:
        self.child = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-I", "-c", SNIFFER, "mig0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.child.stdout is not None
        ready = self.child.stdout.readline()
        assert ready == "ready\n", self.child.stderr.read() if self.child.stderr else ""
        self.flows: dict[str, dict[str, object]] = {}

    def stop(self) -> dict[str, dict[str, object]]:
        if self.child.returncode is None:
            self.child.send_signal(signal.SIGTERM)
            out, err = self.child.communicate(timeout=30)
            assert self.child.returncode == 0, err
            self.flows = json.loads(out)
        return self.flows


@pytest.fixture
def sniffer(ssh_testbed: SSHTestbed) -> Iterator[Sniffer]:
    sniffing = Sniffer(ssh_testbed.b)
    try:
        yield sniffing
    finally:
        if sniffing.child.returncode is None:
            sniffing.child.kill()
            sniffing.child.communicate()


def no_key_in(run_dir: Path) -> list[str]:
    """Files of a run directory that hold private key material."""
    return sorted(str(path) for path in run_dir.rglob("*")
                  if path.is_file() and b"PRIVATE KEY" in path.read_bytes())


def test_postcopy_over_tls_between_ssh_hosts(
    ssh_testbed: SSHTestbed, work_root: Path, runs_root: Path, sniffer: Sniffer,
) -> None:
    bed = ssh_testbed
    spec = ssh_scenario(bed, work_root, "it-ssh-tls", migration={"tls": {}})
    run_dir = run_migration(spec, runs_root).path
    flows = sniffer.stop()
    report = build_report(run_dir)
    assert report.outcome == "completed"
    assert report.integrity["bad_pages"] == 0
    assert report.integrity["read_mismatches"] == 0
    assert any(p.name == "postcopy" for p in report.phases)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["verify"]["bad_pages"] == 0
    # What migrator set up: generated credentials naming b's migration address, and the
    # parameters that make QEMU use them on both sides.
    tls = meta["tls"]
    assert tls["mode"] == "generated"
    assert tls["hostname"] == bed.b.peer_address
    assert tls["destination"]["certificate"]["alt_names"] == [bed.b.peer_address]
    assert tls["destination"]["certificate"]["issuer"] == tls["ca"]["subject"]
    plan = meta["plan"]
    assert plan["source_parameters"]["tls-creds"] == "migrator-tls"
    assert plan["source_parameters"]["tls-hostname"] == bed.b.peer_address
    assert plan["destination_parameters"] == {"tls-creds": "migrator-tls"}
    # What went over the wire: every flow to the destination's port opened with a TLS
    # handshake, none with the plaintext stream's magic.
    marks = [json.loads(line) for line in (run_dir / "timeline.jsonl").open()]
    [migrate] = [m for m in marks if m["what"] == "migrate"]
    port = int(migrate["uri"].rsplit(":", 1)[1])
    to_destination = {key: flow for key, flow in flows.items()
                      if key.endswith(f">{bed.b.peer_address}:{port}")}
    assert to_destination, flows
    for key, flow in flows.items():
        assert not str(flow["first"]).startswith(QEVM), (key, flow)
    for key, flow in to_destination.items():
        assert str(flow["first"]).startswith(TLS_HANDSHAKE), (key, flow)
    assert sum(int(str(f["bytes"])) for f in to_destination.values()) > 16 << 20
    # Public certificates kept for the record; no private key anywhere in the run dir.
    assert (run_dir / "src" / "tls-ca-cert.pem").read_bytes() == \
        (run_dir / "dst" / "tls-ca-cert.pem").read_bytes()
    assert (run_dir / "dst" / "tls-server-cert.pem").exists()
    assert no_key_in(run_dir) == []
    assert "PRIVATE KEY" not in json.dumps(meta)
    # Nothing left on either host: no QEMU, no run directory, no key.
    assert leftovers(bed, work_root) == NOTHING


def write_credentials(directory: Path, files: dict[str, bytes]) -> Path:
    """A provided-credentials directory, private like an operator's would be."""
    directory.mkdir(mode=0o700)
    for name, data in files.items():
        (directory / name).write_bytes(data)
        os.chmod(directory / name, 0o600)
    return directory


@pytest.mark.parametrize("problem", ["wrong-ca", "wrong-name"])
def test_untrusted_peer_stops_the_migration(
    ssh_testbed: SSHTestbed, work_root: Path, tmp_path: Path, problem: str,
) -> None:
    bed = ssh_testbed
    first = generate_credentials([bed.b.peer_address])
    if problem == "wrong-ca":
        # The source trusts (and was issued by) a second CA: neither side trusts the other.
        source_files = generate_credentials(["unused"]).client.files()
        expected = "certificate"
    else:
        # One CA, but its server certificate names another host than the one dialled.
        first = generate_credentials(["elsewhere.example"])
        source_files = first.client.files()
        expected = f"does not match the hostname {bed.b.peer_address}"
    # The namespaces share this machine's filesystem: a local directory is on both hosts.
    pki = tmp_path / "pki"
    pki.mkdir()
    source_dir = write_credentials(pki / "src", source_files)
    destination_dir = write_credentials(pki / "dst", first.server.files())
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(ssh_scenario(
        bed, work_root, f"it-ssh-tls-{problem}",
        migration={"tls": {"source_dir": str(source_dir),
                           "destination_dir": str(destination_dir)}})))
    runs = tmp_path / "runs"
    done = run_migrator(["run", str(spec), "--runs-dir", str(runs)], timeout=900)
    assert done.returncode == 4, done.stderr
    error = one_error_line(done.stderr)
    assert "TLS" in error or "certificate" in error.lower(), error
    assert expected in error, error
    [run_dir] = runs.iterdir()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "failed-before-switchover", meta["outcome"]
    assert meta["tls"]["mode"] == "provided"
    assert meta["tls"]["source"]["dir"] == str(source_dir)
    assert "verify" not in meta  # the guest never ran on the destination
    assert no_key_in(run_dir) == []
    # The operator's credentials are left as they were; the hosts are clean.
    assert sorted(p.name for p in destination_dir.iterdir()) == [
        "ca-cert.pem", "server-cert.pem", "server-key.pem"]
    assert leftovers(bed, work_root) == NOTHING
