"""Remote commands under a supervisor that ends them when their SSH channel closes.

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

``run`` feeds ``stdin`` data through the channel before the supervisor starts
watching it: the supervisor copies exactly that many bytes (``head -c``) into
an unlinked temporary file that becomes the command's stdin.

``exchange_lines`` runs the supervisor in ``talk`` mode: the lines arriving on
the channel are the command's input, passed on one by one through an unlinked
FIFO, and end-of-file still ends the command (it sees EOF on its stdin, then
SIGTERM and SIGKILL as above), so a dialogue keeps the same guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import asyncssh

from migrator.errors import HostError
from migrator.hosts.base import HostProcess
from migrator.hosts.ssh.connection import translate_errors

__all__ = [
    "SUPERVISOR",
    "SSHProcess",
    "channel_returncode",
    "close_channel",
    "end_channel",
    "not_found_error",
    "remote_command",
    "returncode_from_exit_status",
    "started_pid",
]

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


def returncode_from_exit_status(raw: int) -> int:
    """The supervisor's exit status in :mod:`asyncio.subprocess` terms (signal -> -N)."""
    if 128 < raw <= 128 + signal.NSIG:
        return -(raw - 128)
    return raw


def channel_returncode(process: asyncssh.SSHClientProcess[bytes]) -> int | None:
    """How the remote command ended, None while it runs (or if the connection dropped).

    asyncssh gives the supervisor's exit status, or minus the signal that killed
    the supervisor itself (its command then died of ``--pdeathsig KILL``).
    """
    raw = process.returncode
    return returncode_from_exit_status(raw) if raw is not None and raw >= 0 else raw


def close_channel(process: asyncssh.SSHClientProcess[bytes]) -> None:
    """EOF, then close: the remote supervisor reads the EOF and kills its command."""
    with contextlib.suppress(OSError, asyncssh.Error):
        if not process.is_closing():
            process.stdin.write_eof()
    process.close()


async def end_channel(process: asyncssh.SSHClientProcess[bytes], kill_grace: float) -> None:
    """Close a channel and wait (bounded) until the supervisor has killed its command."""
    close_channel(process)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(kill_grace + 3.0):
            await process.wait_closed()


def not_found_error(
    host: str, argv: Sequence[str], status: int, stderr: bytes
) -> HostError | None:
    """The error for a command (or a tool the supervisor needs) missing on ``host``, if so."""
    if status != 127 or not stderr.startswith(_NOT_FOUND):
        return None
    missing = stderr[len(_NOT_FOUND):].split(b":", 1)[0].decode(errors="replace")
    return HostError(f"{missing}: command not found on {host}", argv=argv)


async def started_pid(
    host: str, process: asyncssh.SSHClientProcess[bytes], argv: Sequence[str]
) -> int:
    """The pid the supervisor reports once ``argv`` runs; :class:`HostError` if it never does.

    Closes the channel on any failure.
    """
    err = b""
    try:
        with translate_errors(host, f"starting {argv[0]}"):
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
        close_channel(process)
        raise HostError(
            f"{argv[0]} on {host}: not started within {_START_TIMEOUT_S:g} s", argv=argv
        ) from None
    except BaseException:
        close_channel(process)
        raise
    if not line:
        status = channel_returncode(process)
        missing = not_found_error(host, argv, -1 if status is None else status, err)
        if missing is not None:
            raise missing
        raise HostError(
            f"could not start {argv[0]} on {host}", argv=argv, status=status,
            output=err.decode("utf-8", errors="replace"),
        )
    return int(line[len(_PID_LINE):])


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
        return channel_returncode(self._process)

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
        close_channel(self._process)

    async def wait_closed(self) -> None:
        """Wait until the channel has closed (the process has exited or was abandoned)."""
        await self._process.wait_closed()
