"""Migration over TLS: each QEMU's x509 credentials, from files on its host to a QOM object.

QEMU encrypts the migration stream (and post-copy preempt's second channel)
when the ``tls-creds`` migration parameter names a ``tls-creds-x509`` object
(docs/system/tls.rst and qapi/migration.json in QEMU).  Such an object loads,
from one directory on its QEMU's host, ``ca-cert.pem`` plus ``server-cert.pem``
and ``server-key.pem`` (endpoint ``server``: the destination, which listens) or
``client-cert.pem`` and ``client-key.pem`` (endpoint ``client``: the source).
With ``verify-peer`` each side refuses a peer whose certificate its own CA did
not issue, and the source also checks the server certificate against
``tls-hostname`` (see :func:`migrator.migration.plan.tls_hostname`).

:func:`enable_tls` adds the object ``migrator-tls`` to both QEMUs before the
migration parameters are set.  With ``migration.tls`` directories given it
points QEMU at them.  Without, it makes a throwaway CA and a certificate for
each side (:func:`generate_credentials`), writes each side's files into a
private (0700) directory on that side's host, and removes that directory as
soon as QEMU has loaded it: QEMU reads the files once, when the object is
created, and keeps the credentials in memory.  Private keys exist only in
memory here and in those directories: they are never logged, never written to
the local run directory, never part of the returned record.  The public
certificates are kept in the run directory (``SIDE/tls-*.pem``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from migrator.config.models import Scenario
from migrator.errors import MigrationError, QmpCommandError
from migrator.migration.plan import TLS_CREDS_ID, destination_address, tls_hostname
from migrator.qemu.process import QemuProcess

if TYPE_CHECKING:
    # cryptography is imported by the functions that make or read certificates: a
    # tenth of a second's worth of start-up (with its x509 parts), paid by TLS runs only.
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CA_CERT",
    "Credentials",
    "Endpoint",
    "GeneratedCredentials",
    "certificate_record",
    "enable_tls",
    "generate_credentials",
    "tls_hint",
]

log = logging.getLogger(__name__)

Endpoint = Literal["client", "server"]
CA_CERT = "ca-cert.pem"
# QEMU's fixed file names per endpoint (crypto/tlscredsx509.h): (certificate, key).
ENDPOINT_FILES: dict[Endpoint, tuple[str, str]] = {
    "client": ("client-cert.pem", "client-key.pem"),
    "server": ("server-cert.pem", "server-key.pem"),
}
# Backdated so a destination whose clock runs behind ours still finds the certificates
# valid (QEMU refuses a certificate "not yet active" when it loads it); valid long enough
# for the longest run a scenario allows (migration.timeout_s <= 1 day, plus boot and settle).
BACKDATE = datetime.timedelta(hours=1)
LIFETIME = datetime.timedelta(days=7)

_TLS_TROUBLE = re.compile(r"\btls\b|certificat|handshake|gnutls|x\.?509|issuer", re.IGNORECASE)


@dataclass(frozen=True)
class Credentials:
    """One endpoint's files, PEM-encoded: what QEMU loads from its directory."""

    endpoint: Endpoint
    ca_cert: bytes
    cert: bytes
    key: bytes = field(repr=False)  # secret: not in repr, logs or records

    def files(self) -> dict[str, bytes]:
        """File name in the credentials directory -> content."""
        cert_name, key_name = ENDPOINT_FILES[self.endpoint]
        return {CA_CERT: self.ca_cert, cert_name: self.cert, key_name: self.key}


@dataclass(frozen=True)
class GeneratedCredentials:
    """A throwaway CA and the two certificates it issued for one run."""

    ca_cert: bytes
    server: Credentials
    client: Credentials


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migrator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(name: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN for anything else."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name.split("%", 1)[0]))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def generate_credentials(
    server_names: Sequence[str], *, now: datetime.datetime | None = None,
) -> GeneratedCredentials:
    """A new CA, a server certificate naming ``server_names`` and a client certificate.

    The extensions are those QEMU's load-time sanity check and gnutls expect
    (crypto/tlscredsx509.c): the CA is a CA allowed to sign certificates; the
    others are not CAs, may sign and encipher, and carry the TLS server or
    client purpose.  Each name is an IP address SAN when it parses as one (the
    usual ``tls-hostname``: the destination's migration address), else a DNS SAN.
    ECDSA P-256 keys: generated in microseconds, and supported by every gnutls
    QEMU links against.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names = list(dict.fromkeys(server_names))
    if not names:
        raise ValueError("the server certificate needs at least one name")
    start = (now or datetime.datetime.now(datetime.UTC)) - BACKDATE
    end = start + BACKDATE + LIFETIME
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("migrator throwaway CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(endpoint: Endpoint, common_name: str,
              alt_names: Sequence[x509.GeneralName]) -> Credentials:
        key = ec.generate_private_key(ec.SECP256R1())
        purpose = (ExtendedKeyUsageOID.SERVER_AUTH if endpoint == "server"
                   else ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False)
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(alt_names)),
                                            critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Credentials(endpoint, _pem_cert(ca), _pem_cert(cert), _pem_key(key))

    return GeneratedCredentials(
        ca_cert=_pem_cert(ca),
        server=issue("server", names[0], [_alt_name(name) for name in names]),
        client=issue("client", "migrator migration source", []),
    )


def certificate_record(pem: bytes) -> dict[str, Any]:
    """What run.json keeps of a certificate: subject, issuer, validity, SANs, fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt_names = [str(value) for value in sans.get_values_for_type(x509.DNSName)] + [
            str(value) for value in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        alt_names = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "alt_names": alt_names,
        "sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    }


def tls_hint(error_desc: str, hostname: str | None = None) -> str | None:
    """A hint for a migration error that reads like a TLS failure, else None.

    ``error_desc`` is QEMU's text (``query-migrate`` ``error-desc``), e.g. "The
    certificate hasn't got a known issuer", "Certificate does not match the
    hostname 10.0.0.2", "TLS handshake failed: ...".  ``hostname`` is the
    ``tls-hostname`` the source checked, when known.
    """
    if not _TLS_TROUBLE.search(error_desc):
        return None
    name = hostname or "migration.tls.hostname (default: the destination's migration address)"
    return ("check migration.tls: each side's ca-cert.pem must be the CA that issued the other "
            f"side's certificate, and the server certificate must name {name} and be valid "
            "now by both hosts' clocks")


async def _read_certificate(qemu: QemuProcess, path: Path, where: str) -> bytes:
    try:
        return await qemu.host.read_file(path)
    except FileNotFoundError:
        raise MigrationError(f"{where}: {path} does not exist on {qemu.host.name}") from None


@contextlib.asynccontextmanager
async def _private_dir(qemu: QemuProcess) -> AsyncIterator[Path]:
    """A 0700 directory on the QEMU's host for its credentials, removed with its content.

    On an SSH host it is under the run's directory there (its janitor removes it
    even if migrator dies in between).  A host sharing the controller's
    filesystem has the local run directory as its ``host_dir``, and that is kept:
    keys never go there, but into a private temporary directory.
    """
    host = qemu.host
    if qemu.host_dir == qemu.workdir:
        async with host.temp_dir("migrator-tls-") as path:
            yield path
        return
    path = qemu.host_dir / "tls"
    await host.make_private_dir(path)
    try:
        yield path
    finally:
        await host.remove_tree(path)


async def _add_credentials(qemu: QemuProcess, endpoint: Endpoint, directory: Path,
                           where: str) -> None:
    """``object-add`` the ``tls-creds-x509`` object; QEMU reads ``directory`` right then."""
    try:
        await qemu.monitor.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": TLS_CREDS_ID, "dir": str(directory),
            "endpoint": endpoint, "verify-peer": True,
        })
    except QmpCommandError as error:
        raise MigrationError(
            f"{where}: the {qemu.name} QEMU refused its TLS credentials in {directory} on "
            f"{qemu.host.name}: {error.desc}"
        ) from error


def _keep_certificates(qemu: QemuProcess, credentials: dict[str, bytes]) -> None:
    """The public certificates into the local run directory (never a key)."""
    for name, pem in credentials.items():
        if name.endswith("-cert.pem"):
            (qemu.workdir / f"tls-{name}").write_bytes(pem)


async def enable_tls(
    scenario: Scenario, source: QemuProcess, destination: QemuProcess,
) -> dict[str, Any]:
    """Add the ``migrator-tls`` credentials object to both QEMUs; the record for run.json.

    Call it before the migration parameters are set (the plan's ``tls-creds``
    names the object).  ``source`` gets the client endpoint, ``destination`` the
    server endpoint, both with ``verify-peer``.  A generated server certificate
    names ``tls-hostname`` and the destination's address.  The record holds
    the mode (``generated`` or ``provided``), the ``tls-hostname`` and, per
    side, the directory (provided) and the certificates' subjects, SANs and
    SHA-256 fingerprints; no key material.  A QEMU that refuses its credentials (a
    missing file, an expired or inconsistent certificate, no gnutls) is a
    :class:`MigrationError` with QEMU's reason.
    """
    spec = scenario.migration.tls
    if spec is None:
        raise ValueError("enable_tls called for a scenario without migration.tls")
    hostname = tls_hostname(scenario)
    sides: tuple[tuple[str, QemuProcess, Endpoint, Path | None], ...] = (
        ("destination", destination, "server", spec.destination_dir),
        ("source", source, "client", spec.source_dir),
    )
    record: dict[str, Any] = {"creds_id": TLS_CREDS_ID, "hostname": hostname,
                              "verify_peer": True}
    if spec.source_dir is None:
        # The name checked and the address dialled (the same unless hostname is set).
        generated = generate_credentials([hostname, destination_address(scenario)])
        record |= {"mode": "generated", "ca": certificate_record(generated.ca_cert)}
        for role, qemu, endpoint, _ in sides:
            credentials = generated.server if endpoint == "server" else generated.client
            files = credentials.files()
            async with _private_dir(qemu) as private:
                for name, content in files.items():
                    await qemu.host.write_file(private / name, content)
                await _add_credentials(qemu, endpoint, private, "migration.tls")
            _keep_certificates(qemu, files)
            record[role] = {"endpoint": endpoint,
                            "certificate": certificate_record(credentials.cert)}
    else:
        record["mode"] = "provided"
        for role, qemu, endpoint, directory in sides:
            assert directory is not None  # TlsSpec: both directories or neither
            where = f"migration.tls.{role}_dir"
            cert_name = ENDPOINT_FILES[endpoint][0]
            public = {name: await _read_certificate(qemu, directory / name, where)
                      for name in (CA_CERT, cert_name)}
            await _add_credentials(qemu, endpoint, directory, where)
            _keep_certificates(qemu, public)
            side: dict[str, Any] = {"endpoint": endpoint, "dir": str(directory)}
            for key, name in (("ca", CA_CERT), ("certificate", cert_name)):
                try:
                    side[key] = certificate_record(public[name])
                except ValueError as error:
                    side[key] = {"unparsed": str(error)}
            record[role] = side
    log.info("TLS on both sides: %s credentials, tls-hostname %s", record["mode"], hostname)
    return record
