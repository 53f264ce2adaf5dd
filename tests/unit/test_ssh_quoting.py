"""The SSH exec string: quoted exactly once, and the supervisor script it carries.

The supervisor is plain POSIX sh, so its behaviour (status mapping, stdin
bytes, signals by name, death on EOF) is checked here with the local /bin/sh
standing in for the remote login shell; tests/integration/test_ssh_host.py
runs it through a real sshd.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.hosts.ssh.supervisor import SUPERVISOR, remote_command, returncode_from_exit_status
from tests.ssh_cases import ARG, NASTY, alive


@given(st.lists(ARG, min_size=1, max_size=8))
def test_command_is_one_shlex_join(argv: list[str]) -> None:
    words = shlex.split(remote_command(argv))
    assert words[0] == "exec"
    assert words[1:4] == ["sh", "-c", SUPERVISOR]
    assert words[4:11] == ["migrator-supervisor", "run", "0", "20", "", "", ""]
    assert words[11:] == argv


def test_start_mode_carries_paths_and_grace() -> None:
    words = shlex.split(remote_command(
        ["qemu", "-name", "x y"], mode="start", kill_grace=1.5, cwd=Path("/run dir"),
        stdout=Path("/o ut"), stderr=Path("/e'rr"), stdin_bytes=3,
    ))
    assert words[4:] == ["migrator-supervisor", "start", "3", "15", "/run dir", "/o ut",
                         "/e'rr", "qemu", "-name", "x y"]


def test_empty_argv_is_refused() -> None:
    with pytest.raises(ValueError, match="empty argv"):
        remote_command([])


@pytest.mark.parametrize(("raw", "expected"), [(0, 0), (1, 1), (127, 127), (128, 128),
                                               (143, -15), (137, -9), (255, 255)])
def test_status_maps_signals_to_negative(raw: int, expected: int) -> None:
    assert returncode_from_exit_status(raw) == expected


def local(
    command: str, stdin: bytes = b"", timeout: float = 10.0
) -> subprocess.CompletedProcess[bytes]:
    """Run an exec string as sshd would: through a login shell's ``-c``.

    Like the SSH channel, stdin stays open until the command has exited: its EOF
    would tell the supervisor that the controller is gone.
    """
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as channel:

        def feed() -> None:
            channel.write(stdin)
            channel.flush()

        writer = threading.Thread(target=feed)
        try:
            proc = subprocess.Popen(["sh", "-c", command], stdin=read_end,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finally:
            os.close(read_end)
        writer.start()
        out, err = proc.communicate(timeout=timeout)
        writer.join()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_nasty_arguments_arrive_unchanged() -> None:
    result = local(remote_command(["printf", "%s\\0", *NASTY]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\0")[:-1] == NASTY


def test_exit_status_output_and_stdin_bytes() -> None:
    data = bytes(range(256)) * 1000
    result = local(remote_command(["sh", "-c", "cat; echo err >&2; exit 7"],
                                  stdin_bytes=len(data)), stdin=data)
    assert (result.returncode, result.stdout, result.stderr) == (7, data, b"err\n")


def test_start_mode_reports_the_pid_and_writes_files(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    out.write_text("earlier\n")  # appended to, never truncated
    command = remote_command(["sh", "-c", "echo $$; echo e >&2; exit 4"], mode="start",
                             cwd=tmp_path, stdout=out, stderr=err)
    result = local(command)
    assert result.returncode == 4
    assert result.stdout.startswith(b"migrator-supervisor-pid ")
    pid = int(result.stdout.split()[1])
    assert out.read_text() == f"earlier\n{pid}\n"
    assert err.read_text() == "e\n"


def test_missing_command_has_the_marker() -> None:
    result = local(remote_command(["no-such-command-xyz"]))
    assert result.returncode == 127
    assert result.stderr == b"migrator-supervisor: no-such-command-xyz: command not found\n"


def test_signal_lines_reach_the_command() -> None:
    script = 'trap "echo usr1; exit 3" USR1; while :; do sleep 0.05; done'
    command = remote_command(["sh", "-c", script])
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        time.sleep(0.3)  # let the trap be installed
        proc.stdin.write(b"USR1\n")
        proc.stdin.flush()
        assert proc.wait(10) == 3
        assert proc.stdout.read() == b"usr1\n"
        proc.stdin.close()


def test_stdin_eof_kills_the_command_and_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = f'sleep 1000 & echo $! > {pidfile}; echo $$ >> {pidfile}; wait'
    command = remote_command(["sh", "-c", script], kill_grace=0.5)
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        deadline = time.monotonic() + 10
        while len(pidfile.read_text().split() if pidfile.exists() else []) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.stdin.close()  # what sshd does when the connection drops
        assert proc.wait(10) == 128 + signal.SIGTERM
    for pid in map(int, pidfile.read_text().split()):
        assert not alive(pid), f"{pid} survived"


def test_a_command_ignoring_sigterm_gets_sigkill_after_the_grace() -> None:
    command = remote_command(["sh", "-c", 'trap "" TERM; sleep 1000'], kill_grace=0.5)
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        time.sleep(0.2)
        started = time.monotonic()
        proc.stdin.close()
        assert proc.wait(10) == 128 + signal.SIGKILL
        assert 0.4 < time.monotonic() - started < 3


def test_talk_mode_passes_lines_one_by_one_and_eof_ends_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    # Answers each line at once; "sleep" outlives the input unless the supervisor acts.
    script = (f"trap '' TERM; echo $$ > {pidfile}; "
              'while IFS= read -r q; do echo "re: $q"; done; sleep 1000')
    command = remote_command(["sh", "-c", script], mode="talk", kill_grace=0.5)
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"migrator-supervisor-pid ")
        for question in ("one", "two words", "KILL", "$(id) `id` 'q'"):
            # Signal names are plain lines in talk mode, like anything else.
            proc.stdin.write(question.encode() + b"\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == f"re: {question}\n".encode()
        pid = int(pidfile.read_text())
        assert alive(pid)
        proc.stdin.close()  # what sshd does when the channel closes
        assert proc.wait(10) == 128 + signal.SIGKILL
    assert not alive(pid)


def test_talk_mode_survives_a_command_that_stopped_reading() -> None:
    # Lines written after the command closed its stdin must not end the watcher (SIGPIPE):
    # it still has to see the end of the channel and end the command.
    command = remote_command(["sh", "-c", "exec 0<&-; sleep 1000"], mode="talk",
                             kill_grace=0.5)
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.2)
        for _ in range(3):
            proc.stdin.write(b"nobody reads this\n")
            proc.stdin.flush()
        time.sleep(0.2)
        assert proc.poll() is None
        proc.stdin.close()
        assert proc.wait(10) == 128 + signal.SIGTERM


@settings(max_examples=25, deadline=None)
@given(st.lists(ARG, min_size=1, max_size=5))
def test_any_argv_round_trips_through_a_shell(argv: list[str]) -> None:
    result = local(remote_command(["printf", "%s\\0", *argv]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\0")[:-1] == argv


def test_alive_helper_sees_this_process() -> None:
    assert alive(os.getpid())
