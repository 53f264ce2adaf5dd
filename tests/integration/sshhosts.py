"""Two SSH test hosts: network namespaces, each running a real sshd (root only).

Topology (``N`` is a free block of 10.77.0.0/16, picked per session so two
sessions on one machine do not collide)::

    root namespace (the controller)
      mgc<a><pid> 10.77.N.1/24   ----veth----  ctl0 10.77.N.2/24    namespace A: sshd :22
      mgc<b><pid> 10.77.N+1.1/24 ----veth----  ctl0 10.77.N+1.2/24  namespace B: sshd :22
                                  namespace A mig0 10.77.N+2.1/24 --veth-- mig0 10.77.N+2.2/24 B

The control links carry SSH from the controller; the migration link joins the
two hosts directly (the migration stream goes host to host, and shaping it with
``tc`` never slows the control connection: see :func:`shaped_migration_link`).
Every address is on a link this module created, so no packet for it can leave
the machine (the root namespace's default route is never used:
:func:`_assert_on_link` checks before sshd starts).

The namespaces share the root filesystem.  sshd gets its own config, host key
and authorized_keys in a temporary directory; nothing under /etc or ~/.ssh is
touched.  Teardown kills every process left in a namespace and deletes it.
Namespaces of earlier sessions that died without teardown (their pid is gone)
are removed first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from migrator.hosts.ssh import SSHTarget

__all__ = ["NamespaceHost", "SSHTestbed", "make_testbed", "shaped_migration_link"]

SSHD = Path("/usr/sbin/sshd")
_PREFIX = "migssh"
_LOCK = Path("/tmp/migrator-ssh-testbed.lock")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a set-up command; failures raise with the command's stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class NamespaceHost:
    """One test host: a namespace, its addresses and its sshd."""

    label: str
    netns: str
    address: str
    """Control address, where sshd listens (reached from the root namespace)."""
    peer_address: str
    """Address on the migration link to the other host."""
    controller_address: str
    """The root namespace's end of the control link."""
    host_key_line: str
    """``ssh-ed25519 AAAA...`` as a known_hosts entry needs it."""
    sshd_log: Path
    sshd: subprocess.Popen[bytes] | None = None

    def exec(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host's namespace (test-side inspection)."""
        return sh("ip", "netns", "exec", self.netns, *argv, check=check)

    def pids(self) -> set[int]:
        """Pids of every process attached to this namespace."""
        out = sh("ip", "netns", "pids", self.netns, check=False).stdout
        return {int(p) for p in out.split()}


@dataclass
class SSHTestbed:
    """Two hosts with sshd, a client key and a known_hosts file that trusts both."""

    workdir: Path
    client_key: Path
    known_hosts: Path
    hosts: list[NamespaceHost] = field(default_factory=list)
    unused_address: str = ""
    """An address on A's control link where nothing exists (for unreachable-host tests)."""

    @property
    def a(self) -> NamespaceHost:
        """The first host (the migration source in later tests)."""
        return self.hosts[0]

    @property
    def b(self) -> NamespaceHost:
        """The second host."""
        return self.hosts[1]

    def target(self, host: NamespaceHost, **overrides: object) -> SSHTarget:
        """An :class:`SSHTarget` for ``host`` with the testbed's key and known_hosts."""
        base = SSHTarget(
            address=host.address, identity_file=self.client_key,
            known_hosts=self.known_hosts, name=f"host-{host.label}", connect_timeout=5.0,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


# tbf's bucket: big enough that its timer does not limit the rate (a few GSO-sized
# packets), small against a 2 MiB page, so a page fetch really waits for the rate.
TBF_BURST = "64kb"
# tbf's queue, as time at the rate: TCP keeps it full, so it adds this much delay at most.
TBF_LATENCY = "50ms"


@dataclass(frozen=True)
class ShapedLink:
    """The tbf on each end of ``mig0`` while :func:`shaped_migration_link` holds it."""

    bed: SSHTestbed
    rate: str

    def sent_bytes(self) -> dict[str, int]:
        """Bytes each host's tbf let out so far (its egress on the migration link)."""
        sent = {}
        for host in self.bed.hosts:
            shown = json.loads(host.exec("tc", "-s", "-j", "qdisc", "show", "dev", "mig0",
                                         check=True).stdout)
            [tbf] = [q for q in shown if q["kind"] == "tbf"]
            sent[host.label] = int(tbf["bytes"])
        return sent


@contextlib.contextmanager
def shaped_migration_link(bed: SSHTestbed, rate: str) -> Iterator[ShapedLink]:
    """Rate-limit ``mig0`` to ``rate`` (tc syntax, e.g. ``400mbit``) in both directions.

    A tbf as the root qdisc on each end shapes that host's egress, so the stream
    from a to b and the page requests from b to a both see the rate.  The
    control links (SSH) are untouched.  On exit the qdiscs are deleted and
    ``mig0`` is back to the kernel's default, whatever happened.
    """
    try:
        for host in bed.hosts:
            host.exec("tc", "qdisc", "replace", "dev", "mig0", "root", "tbf", "rate", rate,
                      "burst", TBF_BURST, "latency", TBF_LATENCY, check=True)
        yield ShapedLink(bed, rate)
    finally:
        for host in bed.hosts:
            host.exec("tc", "qdisc", "del", "dev", "mig0", "root")


def _stale_namespaces() -> list[str]:
    """Namespaces this module made in sessions whose process no longer exists."""
    stale = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{_PREFIX}-[a-z]-(\d+)", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            stale.append(name)
    return stale


def _delete_namespace(netns: str) -> None:
    for pid in sh("ip", "netns", "pids", netns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "delete", netns, check=False)


def _free_block() -> int:
    """Third octet N such that 10.77.N..N+2 appear in no address or route here."""
    used = sh("ip", "-4", "-o", "addr", "show").stdout + sh("ip", "-4", "route", "show").stdout
    for netns in sh("ip", "netns", "list", check=False).stdout.splitlines():
        if netns.split():
            used += sh("ip", "-n", netns.split()[0], "-4", "-o", "addr", "show",
                       check=False).stdout
    taken = {int(m) for m in re.findall(r"\b10\.77\.(\d+)\.", used)}
    for block in range(0, 252, 4):
        if not taken & {block, block + 1, block + 2}:
            return block
    raise RuntimeError("no free 10.77.N.0/24 block for the SSH testbed")


def _assert_on_link(address: str, device: str) -> None:
    # A typo in set-up must never send a test connection out of the default route.
    route = sh("ip", "-o", "route", "get", address).stdout
    if f"dev {device} " not in route or " via " in route:
        raise RuntimeError(f"{address} is not on link {device}: {route.strip()}")


def _keygen(path: Path, comment: str) -> str:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _sshd_config(host: NamespaceHost, key: Path, authorized_keys: Path) -> str:
    return "\n".join([
        f"ListenAddress {host.address}",
        "Port 22",
        f"HostKey {key}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # The key files live under /tmp (world-writable), which StrictModes refuses.
        "StrictModes no",
        "PidFile none",
        "AllowStreamLocalForwarding yes",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        # Deliberately no ClientAliveInterval: the tests prove remote processes die on
        # a dropped connection without any help from the server's keepalive.
        "",
    ])


def _wait_listening(host: NamespaceHost, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert host.sshd is not None
        if host.sshd.poll() is not None:
            raise RuntimeError(f"sshd in {host.netns} exited: {host.sshd_log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((host.address, 22), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd in {host.netns} not listening after {deadline_s} s")


@contextlib.contextmanager
def make_testbed(workdir: Path) -> Iterator[SSHTestbed]:
    """Build the two hosts, yield them, and tear everything down whatever happened."""
    if not SSHD.exists():
        raise RuntimeError("sshd missing: apt-get install openssh-server (scripts/setup does)")
    pid = os.getpid()
    bed = SSHTestbed(workdir, workdir / "id_ed25519", workdir / "known_hosts")
    client_pub = _keygen(bed.client_key, "migrator-test-client")
    (workdir / "authorized_keys").write_text(client_pub + "\n")
    # sshd refuses to start without its privilege-separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    try:
        with _LOCK.open("w") as lock:
            # Two sessions picking a block at the same moment would pick the same one.
            fcntl.flock(lock, fcntl.LOCK_EX)
            for netns in _stale_namespaces():
                _delete_namespace(netns)
            block = _free_block()
            for index, label in enumerate("ab"):
                netns = f"{_PREFIX}-{label}-{pid}"
                hostdir = workdir / label
                hostdir.mkdir()
                key = hostdir / "ssh_host_ed25519_key"
                host = NamespaceHost(
                    label=label, netns=netns, address=f"10.77.{block + index}.2",
                    peer_address=f"10.77.{block + 2}.{index + 1}",
                    controller_address=f"10.77.{block + index}.1",
                    host_key_line=_keygen(key, f"host-{label}"), sshd_log=hostdir / "sshd.log",
                )
                bed.hosts.append(host)
                sh("ip", "netns", "add", netns)
                sh("ip", "-n", netns, "link", "set", "lo", "up")
                root_end = f"mgc{label}{pid}"
                sh("ip", "link", "add", root_end, "type", "veth", "peer", "name", "ctl0",
                   "netns", netns)
                sh("ip", "addr", "add", f"{host.controller_address}/24", "dev", root_end)
                sh("ip", "link", "set", root_end, "up")
                sh("ip", "-n", netns, "addr", "add", f"{host.address}/24", "dev", "ctl0")
                sh("ip", "-n", netns, "link", "set", "ctl0", "up")
                _assert_on_link(host.address, root_end)
                (hostdir / "sshd_config").write_text(
                    _sshd_config(host, key, workdir / "authorized_keys"))
            bed.unused_address = f"10.77.{block}.3"
            _assert_on_link(bed.unused_address, f"mgca{pid}")
            side_a, side_b = f"mgma{pid}", f"mgmb{pid}"
            sh("ip", "link", "add", side_a, "type", "veth", "peer", "name", side_b)
            for host, side in zip(bed.hosts, (side_a, side_b), strict=True):
                sh("ip", "link", "set", side, "netns", host.netns, "name", "mig0")
                sh("ip", "-n", host.netns, "addr", "add", f"{host.peer_address}/24",
                   "dev", "mig0")
                sh("ip", "-n", host.netns, "link", "set", "mig0", "up")
        bed.known_hosts.write_text(
            "".join(f"{h.address} {h.host_key_line}\n" for h in bed.hosts))
        for host in bed.hosts:
            with host.sshd_log.open("wb") as log:
                host.sshd = subprocess.Popen(
                    ["ip", "netns", "exec", host.netns, str(SSHD), "-D", "-e",
                     "-f", str(workdir / host.label / "sshd_config")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )
        for host in bed.hosts:
            _wait_listening(host)
        yield bed
    finally:
        for host in bed.hosts:
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.terminate()
                try:
                    host.sshd.wait(5)
                except subprocess.TimeoutExpired:
                    host.sshd.kill()
                    host.sshd.wait()
            _delete_namespace(host.netns)
        # Deleting namespace A removed both control veths' peers and the migration link;
        # the root ends go with their peers, this only catches a half-built set-up.
        for label in "ab":
            sh("ip", "link", "delete", f"mgc{label}{pid}", check=False)
