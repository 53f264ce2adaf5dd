"""How to reach an SSH host: the target, the connection, and its failures as one clear error.

Host keys are checked against ``known_hosts`` unless the target turns checking
off explicitly, which logs a warning on every connect.  ``~/.ssh/config`` is not
read: the :class:`SSHTarget` is the whole truth about how to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
from pydantic import SecretStr

from migrator.errors import ConfigError, HostError, MigratorError

__all__ = ["SSHTarget", "open_connection", "translate_errors"]

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to connect: one host entry of a scenario."""

    address: str
    port: int = 22
    user: str = "root"
    identity_file: Path | None = None
    """Private key to authenticate with; None: the SSH agent and ~/.ssh/id_*."""
    known_hosts: Path | None = None
    """Trusted host keys; None: ~/.ssh/known_hosts."""
    check_host_key: bool = True
    """False trusts any host key (anyone on the path can impersonate the host)."""
    name: str | None = None
    """Name in logs and errors; defaults to the address."""
    connect_timeout: float = _CONNECT_TIMEOUT_S
    """Seconds to reach the host and finish the SSH handshake."""
    passphrase: SecretStr | None = field(default=None, repr=False, compare=False)
    """Passphrase of an encrypted ``identity_file``.  Never shown: not in repr(), and a
    SecretStr, so str(), asdict() and logs hold ``**********`` and json.dumps() refuses it."""
    passphrase_env: str | None = None
    """Name of the environment variable the passphrase came from (for error messages)."""

    @property
    def label(self) -> str:
        """The name errors and logs use for this host."""
        return self.name or self.address

    @property
    def endpoint(self) -> str:
        """``user@address:port``."""
        return f"{self.user}@{self.address}:{self.port}"

    @property
    def known_hosts_path(self) -> Path:
        """The known_hosts file host keys are checked against."""
        return self.known_hosts or Path.home() / ".ssh" / "known_hosts"


async def open_connection(
    target: SSHTarget, *, keepalive_interval: float, keepalive_count_max: int
) -> asyncssh.SSHClientConnection:
    """Connect and authenticate; every failure is one clear :class:`HostError`.

    A key that cannot be decrypted with the passphrase given is a :class:`ConfigError`.
    """
    if target.check_host_key:
        known_hosts: str | None = str(target.known_hosts_path)
        if not await asyncio.to_thread(target.known_hosts_path.is_file):
            raise HostError(
                f"{target.label}: known_hosts file {target.known_hosts_path} does not exist;"
                f" create it with the host's verified key, e.g. `ssh-keyscan -p "
                f"{target.port} {target.address} >> {target.known_hosts_path}` after "
                "checking the fingerprint"
            )
    else:
        known_hosts = None
        log.warning(
            "%s: host key checking is OFF (check_host_key=false): anyone on the path to "
            "%s can impersonate this host", target.label, target.endpoint,
        )
    identity = target.identity_file
    try:
        connection = await asyncssh.connect(
            target.address, port=target.port, username=target.user,
            known_hosts=known_hosts,
            client_keys=[str(identity)] if identity else (),
            passphrase=target.passphrase.get_secret_value() if target.passphrase else None,
            # With an explicit key, use only that key: no agent, no ~/.ssh/id_*.
            agent_path=None if identity else (),
            # The target is the whole truth; a laptop's ~/.ssh/config must not
            # silently change the user, port or key.
            config=None,
            connect_timeout=target.connect_timeout,
            keepalive_interval=keepalive_interval, keepalive_count_max=keepalive_count_max,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise HostError(_host_key_message(target)) from None
    except asyncssh.PermissionDenied:
        raise HostError(
            f"{target.label}: {target.endpoint} refused authentication for user "
            f"{target.user!r} with {identity or 'the default keys and agent'}; check the "
            "user name and that the public key is in that user's authorized_keys"
        ) from None
    except TimeoutError:
        raise HostError(
            f"{target.label}: no SSH answer from {target.address}:{target.port} within "
            f"{target.connect_timeout:g} s; is the host up and reachable?"
        ) from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
        raise _key_error(target, error) from None
    except OSError as error:
        if identity is not None and error.filename == str(identity):
            raise HostError(
                f"{target.label}: identity file {identity}: {error.strerror}"
            ) from None
        # asyncio words a failed connect as "Connect call failed (addr)": name the errno.
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise HostError(
            f"{target.label}: cannot connect to {target.address}:{target.port}: {reason}"
        ) from None
    except asyncssh.Error as error:
        raise HostError(
            f"{target.label}: SSH to {target.endpoint} failed: {error.reason}"
        ) from None
    log.info("%s: connected to %s", target.label, target.endpoint)
    return connection


def _key_error(target: SSHTarget, error: ValueError) -> MigratorError:
    """An identity file asyncssh could not load, as one line without the passphrase.

    A wrong or missing passphrase is bad input (:class:`ConfigError`); anything else
    about the key stays a :class:`HostError`.
    """
    where = f"{target.label}: identity file {target.identity_file}"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if target.passphrase is None:
        if "passphrase must be specified" in reason.lower():
            return ConfigError(
                f"{where} is encrypted: set identity_passphrase_env in its hosts entry to "
                "the name of an environment variable that holds its passphrase")
        return HostError(f"{where}: {reason}")
    secret = target.passphrase.get_secret_value()
    if secret:
        # asyncssh's reasons never quote it; make sure.
        reason = reason.replace(secret, str(target.passphrase))
    given = (f"the passphrase in environment variable {target.passphrase_env} "
             "(identity_passphrase_env)" if target.passphrase_env else "the passphrase given")
    if "incorrect passphrase" in reason.lower():
        fix = (f"; set {target.passphrase_env} to this key's passphrase"
               if target.passphrase_env else "")
        return ConfigError(f"{where}: {given} does not decrypt it{fix}")
    return ConfigError(f"{where}: cannot decrypt it with {given}: {reason}")


def _host_key_message(target: SSHTarget) -> str:
    """Why the host key was refused (changed, or unknown) and what to do about it."""
    path = target.known_hosts_path
    entry = target.address if target.port == 22 else f"[{target.address}]:{target.port}"
    try:
        known = asyncssh.read_known_hosts(str(path)).match(
            target.address, target.address, None if target.port == 22 else target.port
        )
    except (OSError, ValueError):
        known = ([],)  # type: ignore[assignment]
    if known[0]:
        return (
            f"{target.label}: host key of {target.address}:{target.port} CHANGED: it does "
            f"not match the one in {path}; someone may be intercepting the connection. "
            f"If the host was reinstalled, verify its new key, then "
            f"`ssh-keygen -R '{entry}' -f {path}` and add the new key"
        )
    return (
        f"{target.label}: host key of {target.address}:{target.port} is unknown: no entry "
        f"for {entry} in {path}; verify the host's fingerprint, then add it, e.g. "
        f"`ssh-keyscan -p {target.port} {target.address} >> {path}` "
        "(or set check_host_key=false, which trusts anyone on the path)"
    )


@contextlib.contextmanager
def translate_errors(host: str, what: str) -> Iterator[None]:
    """asyncssh failures as migrator errors (SFTP "no such file" as FileNotFoundError)."""
    try:
        yield
    except asyncssh.SFTPNoSuchFile as error:
        raise FileNotFoundError(f"{host}: {what}: {error.reason}") from None
    except asyncssh.SFTPError as error:
        raise HostError(f"{host}: {what}: {error.reason}") from None
    except asyncssh.Error as error:
        raise HostError(f"{host}: {what}: SSH: {error.reason}") from None
    except ConnectionError as error:
        raise HostError(f"{host}: {what}: SSH connection lost ({error})") from None
