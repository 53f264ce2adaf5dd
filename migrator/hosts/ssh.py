"""A machine reached over SSH (asyncssh), behind the same :class:`Host` interface.

Commands are argv lists.  The one string that crosses to the remote side is the
SSH ``exec`` request, which sshd hands to the user's login shell; it is built
by :func:`remote_command` with a single :func:`shlex.join`, so every argument
reaches the remote program byte for byte (the login shell must be a POSIX
shell: sh, dash, bash or zsh).

**No remote process outlives its channel.**  sshd does not signal a non-pty
session's processes when the connection drops: it closes their pipes and exits.
So every command (``run`` and ``start``) runs under :data:`SUPERVISOR`, a small
POSIX ``sh`` script that

- starts the command in a process group of its own (``setsid``), with
  ``setpriv --pdeathsig KILL`` so that it also dies if the supervisor itself is
  killed;
- reads its stdin, which is the SSH channel: each line names a signal to send
  to the command (how :meth:`SSHProcess.send_signal` works without a second
  channel or a pid race), and end-of-file means the controller is gone: the
  channel was closed, the connection dropped, or the controller died (the
  kernel closes its TCP socket, sshd reads EOF and exits, the pipe closes).  It
  then sends SIGTERM to the command's process group and SIGKILL after
  ``kill_grace`` seconds;
- after the command exits, kills whatever is left of its process group and
  exits with the command's status (``128 + N`` when signal ``N`` killed it,
  reported here as ``-N``, like :mod:`asyncio.subprocess`; sh cannot tell that
  from a command that itself exits with ``128 + N``, so such statuses read as
  signals too).

A dropped connection therefore kills remote processes within ``kill_grace``
plus the time sshd takes to notice: immediate when the controller's TCP
connection is closed or reset (controller killed, connection aborted).  A
silent network partition is only noticed by the server's own keepalive
(``ClientAliveInterval`` in sshd_config); set it on hosts where that matters.
Closing an :class:`SSHHost` ends every process it started the same way, and
waits for them.

``run`` feeds ``stdin`` data through the channel before the supervisor starts
watching it: the supervisor copies exactly that many bytes (``head -c``) into
an unlinked temporary file that becomes the command's stdin.

``exchange_lines`` runs the supervisor in ``talk`` mode: the lines arriving on
the channel are the command's input, passed on one by one through an unlinked
FIFO, and end-of-file still ends the command (it sees EOF on its stdin, then
SIGTERM and SIGKILL as above), so a dialogue keeps the same guarantee.

Files go over one SFTP session per connection; ``read_file`` reads until EOF
rather than trusting the size SFTP reports (0 for /proc, 4096 for sysfs).
Host keys are checked against ``known_hosts`` unless the target turns checking
off explicitly, which logs a warning on every connect.  ``~/.ssh/config`` is not
read: the :class:`SSHTarget` is the whole truth about how to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, cast

import asyncssh
from pydantic import SecretStr

from migrator.aio import finish_even_if_cancelled
from migrator.errors import ConfigError, HostError, MigratorError
from migrator.hosts.base import CommandResult, Host, HostProcess, LineExchange

__all__ = ["SUPERVISOR", "SSHHost", "SSHProcess", "SSHTarget", "remote_command"]

log = logging.getLogger(__name__)

# Bytes per SFTP read request when reading or copying a remote file.
COPY_BLOCK = 1 << 18

# Positional parameters: MODE (run|start|talk) NBYTES GRACE_TICKS CWD OUT ERR ARGV...
# GRACE_TICKS counts tenths of a second (sh has no fractions).  Exit 127 with the
# marker line below means "command not found".  Notes on the less obvious lines:
# - `exec 6<&0` before `watch <&6 &`: dash points a background job's stdin at
#   /dev/null before applying its redirections, so `watch <&0 &` would read /dev/null.
# - `kill ... -- "-$pid" || ... "$pid"`: until the child has run setsid, its group
#   does not exist yet; signalling the pid covers that window.
# - `exec 2>/dev/null` once the command runs: dash reports a killed child
#   ("Terminated") on stderr, which in run mode is the command's own stderr.
# - talk mode's FIFO is opened read-write first (fd 7), which never blocks on
#   Linux, so that opening its read end (fd 3, the command's stdin) and its write
#   end (fd 8, the watcher's) does not block either; then fd 7 goes, and the FIFO's
#   name with it.  Only the watcher keeps fd 8: when it closes it, the command
#   reads EOF.  The watcher ignores SIGPIPE so that a command which stopped reading
#   cannot kill it, and with it the end-of-channel watch.
SUPERVISOR = r"""
mode=$1 nbytes=$2 ticks=$3 cwd=$4 out=$5 err=$6
shift 6
for tool in "$1" setsid setpriv; do
    command -v "$tool" >/dev/null 2>&1 || {
        printf 'migrator-supervisor: %s: command not found\n' "$tool" >&2
        exit 127
    }
done
if [ -n "$cwd" ]; then cd "$cwd" || exit 126; fi
if [ "$mode" = talk ]; then
    tmp=$(mktemp -d) || exit 125
    mkfifo "$tmp/in" || exit 125
    exec 7<>"$tmp/in" 3<"$tmp/in" 8>"$tmp/in" 7>&-
    rm -rf "$tmp"
elif [ "$nbytes" -gt 0 ]; then
    tmp=$(mktemp) || exit 125
    head -c "$nbytes" >"$tmp" || exit 125
    exec 3<"$tmp"
    rm -f "$tmp"
else
    exec 3</dev/null
fi
if [ "$mode" = start ]; then exec 4>>"$out" 5>>"$err"; else exec 4>&1 5>&2; fi
setsid setpriv --pdeathsig KILL -- "$@" <&3 >&4 2>&5 3<&- 4>&- 5>&- 8>&- &
pid=$!
exec 3<&- 4>&- 5>&-
if [ "$mode" != run ]; then printf 'migrator-supervisor-pid %s\n' "$pid"; fi
exec 2>/dev/null
watch() {
    trap '' PIPE
    while IFS= read -r line; do
        if [ "$mode" = talk ]; then
            printf '%s\n' "$line" >&8
            continue
        fi
        case $line in
            '' | *[!A-Z0-9]*) ;;
            *) kill -s "$line" -- "$pid" ;;
        esac
    done
    exec 8>&-
    kill -s TERM -- "-$pid" || kill -s TERM -- "$pid" || exit 0
    t=0
    while [ "$t" -lt "$ticks" ] && kill -s 0 -- "$pid"; do
        sleep 0.1
        t=$((t + 1))
    done
    kill -s KILL -- "-$pid" "$pid"
}
exec 6<&0
watch <&6 6<&- >/dev/null &
watcher=$!
exec 6<&- 8>&-
wait "$pid"
status=$?
kill -s KILL -- "-$pid"
kill "$watcher"
exit "$status"
"""

_NOT_FOUND = b"migrator-supervisor: "
_PID_LINE = b"migrator-supervisor-pid "
_CONNECT_TIMEOUT_S = 10.0
# The supervisor prints the pid right after forking; only a wedged host takes longer.
_START_TIMEOUT_S = 30.0


def remote_command(
    argv: Sequence[str], *, mode: Literal["run", "start", "talk"] = "run", stdin_bytes: int = 0,
    kill_grace: float = 2.0, cwd: Path | None = None, stdout: Path | None = None,
    stderr: Path | None = None,
) -> str:
    """The SSH ``exec`` string running ``argv`` under :data:`SUPERVISOR`.

    The only quoting step: one :func:`shlex.join` for the remote login shell,
    which ``exec``\\ s ``sh`` so the supervisor is sshd's direct child.
    """
    if not argv:
        raise ValueError("empty argv")
    words = [
        "sh", "-c", SUPERVISOR, "migrator-supervisor", mode, str(stdin_bytes),
        str(max(1, round(kill_grace * 10))), str(cwd or ""), str(stdout or ""),
        str(stderr or ""), *argv,
    ]
    return "exec " + shlex.join(words)


def _status(raw: int) -> int:
    """The supervisor's exit status in :mod:`asyncio.subprocess` terms (signal -> -N)."""
    if 128 < raw <= 128 + signal.NSIG:
        return -(raw - 128)
    return raw


def _returncode(process: asyncssh.SSHClientProcess[bytes]) -> int | None:
    """How the remote command ended, None while it runs (or if the connection dropped).

    asyncssh gives the supervisor's exit status, or minus the signal that killed
    the supervisor itself (its command then died of ``--pdeathsig KILL``).
    """
    raw = process.returncode
    return _status(raw) if raw is not None and raw >= 0 else raw


def _close_channel(process: asyncssh.SSHClientProcess[bytes]) -> None:
    """EOF, then close: the remote supervisor reads the EOF and kills its command."""
    with contextlib.suppress(OSError, asyncssh.Error):
        if not process.is_closing():
            process.stdin.write_eof()
    process.close()


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


class SSHProcess(HostProcess):
    """A process started by :meth:`SSHHost.start`, alive as long as its channel."""

    def __init__(
        self, host: str, process: asyncssh.SSHClientProcess[bytes], argv: Sequence[str],
        pid: int,
    ) -> None:
        self._host = host
        self._process = process
        self._pid = pid
        self.argv = tuple(argv)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return _returncode(self._process)

    async def wait(self) -> int:
        """Wait for exit; :class:`HostError` if the connection dropped first.

        (The process then dies on the host by itself: see the module docstring.)
        """
        await self._process.wait_closed()
        status = self.returncode
        if status is None:
            raise HostError(
                f"{self._host}: SSH connection lost while {self.argv[0]} (pid {self.pid}) ran",
                argv=self.argv,
            )
        return status

    async def send_signal(self, sig: signal.Signals) -> None:
        if self.returncode is not None or self._process.is_closing():
            return
        # The supervisor reads signal names, one a line, from the channel.
        with contextlib.suppress(OSError, asyncssh.Error):
            self._process.stdin.write(sig.name.removeprefix("SIG").encode() + b"\n")

    def detach(self) -> None:
        """Close the channel: the supervisor ends the process (SIGTERM, then SIGKILL)."""
        _close_channel(self._process)

    async def wait_closed(self) -> None:
        """Wait until the channel has closed (the process has exited or was abandoned)."""
        await self._process.wait_closed()


class SSHHost(Host):
    """Commands and files on a machine reached over SSH (see module docstring).

    Use as ``async with SSHHost(target) as host``; leaving the block ends every
    process this host started and closes the connection.
    """

    def __init__(
        self, target: SSHTarget, *, kill_grace: float = 2.0, keepalive_interval: float = 5.0,
        keepalive_count_max: int = 3,
    ) -> None:
        self.target = target
        self.name = target.label
        self.kill_grace = kill_grace
        self._keepalive = (keepalive_interval, keepalive_count_max)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()
        self._started: list[SSHProcess] = []

    # Connection life cycle.

    async def __aenter__(self) -> SSHHost:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connection(self) -> asyncssh.SSHClientConnection:
        """The live asyncssh connection; :class:`HostError` when not connected."""
        if self._conn is None:
            raise HostError(f"{self.name}: not connected (use `async with SSHHost(...)`)")
        return self._conn

    async def connect(self) -> None:
        """Open the SSH connection; every failure is one clear :class:`HostError`."""
        target = self.target
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
            self._conn = await asyncssh.connect(
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
                keepalive_interval=self._keepalive[0], keepalive_count_max=self._keepalive[1],
            )
        except asyncssh.HostKeyNotVerifiable:
            raise HostError(self._host_key_message()) from None
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
            raise self._key_error(error) from None
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

    def _key_error(self, error: ValueError) -> MigratorError:
        """An identity file asyncssh could not load, as one line without the passphrase.

        A wrong or missing passphrase is bad input (:class:`ConfigError`); anything else
        about the key stays a :class:`HostError`.
        """
        target = self.target
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

    def _host_key_message(self) -> str:
        target = self.target
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

    async def close(self) -> None:
        """End every process started here, then close SFTP and the connection."""
        live = [p for p in self._started if p.returncode is None]
        for process in live:
            log.warning("%s: ending %s (pid %d) as the host closes",
                        self.name, process.argv[0], process.pid)
            process.detach()
        if live:
            # The supervisors escalate to SIGKILL after kill_grace; their channels close
            # once the processes are gone, so this wait confirms nothing is left.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.kill_grace + 3.0):
                    await asyncio.gather(*(p.wait_closed() for p in live))
        self._started.clear()
        if self._sftp is not None:
            self._sftp.exit()
            with contextlib.suppress(Exception):
                await self._sftp.wait_closed()
            self._sftp = None
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
            self._conn = None

    async def sever(self) -> None:
        """Drop the connection abruptly, as a network failure would, then connect afresh.

        For fault injection.  Every process started here ends with the old
        connection (its supervisor sees the channel close); the new one serves
        whatever comes next, such as the clean-up.
        """
        connection = self.connection
        log.warning("%s: dropping the SSH connection (fault injection)", self.name)
        connection.abort()
        with contextlib.suppress(Exception):
            await connection.wait_closed()
        self._started.clear()
        self._sftp = None
        self._conn = None
        # Finished even if the caller is cancelled meanwhile (the run failing because the
        # QEMU here just ended): the clean-up that follows needs the connection.
        await finish_even_if_cancelled(self.connect())

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """asyncssh failures as migrator errors (SFTP "no such file" as FileNotFoundError)."""
        try:
            yield
        except asyncssh.SFTPNoSuchFile as error:
            raise FileNotFoundError(f"{self.name}: {what}: {error.reason}") from None
        except asyncssh.SFTPError as error:
            raise HostError(f"{self.name}: {what}: {error.reason}") from None
        except asyncssh.Error as error:
            raise HostError(f"{self.name}: {what}: SSH: {error.reason}") from None
        except ConnectionError as error:
            raise HostError(f"{self.name}: {what}: SSH connection lost ({error})") from None

    # Commands.

    async def _open(self, command: str) -> asyncssh.SSHClientProcess[bytes]:
        with self._translate("opening an SSH session"):
            process: asyncssh.SSHClientProcess[bytes] = await self.connection.create_process(
                command, encoding=None
            )
            return process

    def _not_found(self, argv: Sequence[str], status: int, stderr: bytes) -> HostError | None:
        if status != 127 or not stderr.startswith(_NOT_FOUND):
            return None
        missing = stderr[len(_NOT_FOUND):].split(b":", 1)[0].decode(errors="replace")
        return HostError(f"{missing}: command not found on {self.name}", argv=argv)

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: bytes | None = None
    ) -> CommandResult:
        """Run ``argv`` remotely; a timeout kills it there and raises :class:`HostError`."""
        data = stdin or b""
        command = remote_command(argv, stdin_bytes=len(data), kill_grace=self.kill_grace)
        process = await self._open(command)
        try:
            with self._translate(f"running {argv[0]}"):
                async with asyncio.timeout(timeout):
                    if data:
                        # No EOF afterwards: the open channel is the supervisor's lifeline.
                        process.stdin.write(data)
                    out, err = await asyncio.gather(process.stdout.read(), process.stderr.read())
                    await process.wait_closed()
        except TimeoutError:
            await self._end(process)
            raise HostError(
                f"{argv[0]} on {self.name} did not finish within {timeout:g} s and was killed",
                argv=argv,
            ) from None
        except BaseException:
            # Cancelled: no waiting here; closing the channel is what kills the command.
            _close_channel(process)
            raise
        status = _returncode(process)
        if status is None:
            raise HostError(f"{self.name}: SSH connection lost while running {argv[0]}", argv=argv)
        missing = self._not_found(argv, status, err)
        if missing is not None:
            raise missing
        return CommandResult(
            tuple(argv), status, out.decode("utf-8", errors="replace"),
            err.decode("utf-8", errors="replace"),
        )

    async def _end(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        """Close a run channel and wait (bounded) until the supervisor has killed its command."""
        _close_channel(process)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.kill_grace + 3.0):
                await process.wait_closed()

    async def _started_pid(
        self, process: asyncssh.SSHClientProcess[bytes], argv: Sequence[str]
    ) -> int:
        """The pid the supervisor reports once ``argv`` runs; :class:`HostError` if it never does.

        Closes the channel on any failure.
        """
        err = b""
        try:
            with self._translate(f"starting {argv[0]}"):
                async with asyncio.timeout(_START_TIMEOUT_S):
                    # Skip whatever the login shell's rc files may have printed first.
                    line = b"-"
                    while line and not line.startswith(_PID_LINE):
                        line = await process.stdout.readline()
                    if not line:
                        # The supervisor exited before starting anything: say why.
                        err = await process.stderr.read()
                        await process.wait_closed()
        except TimeoutError:
            _close_channel(process)
            raise HostError(
                f"{argv[0]} on {self.name}: not started within {_START_TIMEOUT_S:g} s", argv=argv
            ) from None
        except BaseException:
            _close_channel(process)
            raise
        if not line:
            status = _returncode(process)
            missing = self._not_found(argv, -1 if status is None else status, err)
            if missing is not None:
                raise missing
            raise HostError(
                f"could not start {argv[0]} on {self.name}", argv=argv, status=status,
                output=err.decode("utf-8", errors="replace"),
            )
        return int(line[len(_PID_LINE):])

    async def start(
        self, argv: Sequence[str], *, stdout: Path, stderr: Path, cwd: Path | None = None
    ) -> HostProcess:
        """Start ``argv`` with output appended to remote files; it dies with the channel."""
        command = remote_command(
            argv, mode="start", kill_grace=self.kill_grace, cwd=cwd, stdout=stdout, stderr=stderr
        )
        process = await self._open(command)
        pid = await self._started_pid(process, argv)
        started = SSHProcess(self.name, process, argv, pid)
        self._started = [p for p in self._started if p.returncode is None] + [started]
        log.debug("%s: started %s as pid %d", self.name, shlex.join(argv), started.pid)
        return started

    @contextlib.asynccontextmanager
    async def exchange_lines(self, argv: Sequence[str]) -> AsyncIterator[LineExchange]:
        """A dialogue with ``argv`` over one channel; closing it ends the command there."""
        process = await self._open(remote_command(argv, mode="talk", kill_grace=self.kill_grace))
        await self._started_pid(process, argv)

        async def ended() -> HostError:
            output = b""
            with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
                async with asyncio.timeout(self.kill_grace + 3.0):
                    output = await process.stderr.read()
                    await process.wait_closed()
            status = _returncode(process)
            return HostError(f"{argv[0]} on {self.name} stopped answering", argv=argv,
                             status=status, output=output.decode("utf-8", errors="replace"))

        try:
            yield LineExchange(self.name, argv, process.stdin, process.stdout, ended)
        finally:
            await self._end(process)

    # Files.

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is None:
                # Finished (and kept) even if the caller is cancelled meanwhile: a session
                # started and then dropped would hold one of sshd's few channels.
                await finish_even_if_cancelled(self._start_sftp())
            assert self._sftp is not None
            return self._sftp

    async def _start_sftp(self) -> None:
        with self._translate("starting SFTP"):
            self._sftp = await self.connection.start_sftp_client()

    async def _chunks(self, path: Path, what: str) -> AsyncGenerator[bytes, None]:
        """A remote file's bytes, block by block, until EOF.

        Until EOF rather than a stat'ed size: /proc and sysfs files report a size
        (0, 4096) that is not theirs.  One plain request per block (``block_size=0``):
        asyncssh otherwise splits each read into parallel request tasks, which it
        abandons when the read is cancelled (a QEMU's stderr is often being read as a
        run fails), and the abandoned ones end in "Task exception was never
        retrieved" tracebacks at exit.
        """
        sftp = await self._sftp_client()
        with self._translate(what):
            async with sftp.open(str(path), "rb", block_size=0) as remote:
                offset = 0
                # Opened in binary mode ("rb"): reads return bytes; b"" at EOF.
                while chunk := cast(bytes, await remote.read(COPY_BLOCK, offset)):
                    yield chunk
                    offset += len(chunk)

    async def read_file(self, path: Path) -> bytes:
        return b"".join([chunk async for chunk in self._chunks(path, f"reading {path}")])

    async def write_file(self, path: Path, data: bytes) -> None:
        sftp = await self._sftp_client()
        with self._translate(f"writing {path}"):
            async with sftp.open(str(path), "wb") as remote:
                # Finished even if cancelled: asyncssh writes in parallel requests (see _chunks).
                await finish_even_if_cancelled(remote.write(data, 0))

    async def exists(self, path: Path) -> bool:
        sftp = await self._sftp_client()
        with self._translate(f"checking {path}"):
            return await sftp.exists(str(path))

    async def make_private_dir(self, path: Path) -> None:
        sftp = await self._sftp_client()
        with self._translate(f"creating {path}"):
            await sftp.makedirs(str(path), exist_ok=True)
            await sftp.chmod(str(path), 0o700)

    async def remove_tree(self, path: Path) -> None:
        if not path.is_absolute() or path == Path("/"):
            raise HostError(f"{self.name}: refusing to remove {str(path)!r}: not a subtree")
        (await self.run(["rm", "-rf", "--", str(path)])).check(f"removing {path} on {self.name}")

    async def get(self, remote: Path, local: Path) -> None:
        async with contextlib.aclosing(self._chunks(remote, f"copying {remote}")) as chunks:
            # The remote file is opened first: a missing one leaves no empty local copy.
            first = await anext(chunks, b"")
            with local.open("wb") as out:
                await asyncio.to_thread(out.write, first)
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)

    async def put(self, local: Path, remote: Path) -> None:
        sftp = await self._sftp_client()
        with self._translate(f"copying {local} to {remote}"):
            await sftp.put(str(local), str(remote))

    @contextlib.asynccontextmanager
    async def forward_unix_socket(self, path: Path) -> AsyncIterator[Path]:
        """Forward a local socket in a fresh 0700 directory to ``path`` on the host."""
        local_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="migrator-fwd-"))
        # sun_path holds 108 bytes; the remote name is only a hint for humans.
        local = local_dir / (path.name[:48] or "socket")
        try:
            with self._translate(f"forwarding {path}"):
                listener = await self.connection.forward_local_path(str(local), str(path))
            try:
                yield local
            finally:
                listener.close()
                await listener.wait_closed()
        finally:
            await asyncio.to_thread(shutil.rmtree, local_dir, True)
