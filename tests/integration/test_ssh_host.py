"""SSHHost against real sshd in two network namespaces (see tests/integration/sshhosts.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrator.errors import HostError
from migrator.hosts.ssh import SSHHost
from migrator.preflight import measure_clock_offset
from tests.integration.sshhosts import SSHTestbed
from tests.ssh_cases import ARG, NASTY, alive

T = TypeVar("T")

# Process deaths the tests measure, printed at the end of the run (-s) and kept in
# the junit properties: the design promise is "within seconds", the assertion 10 s.
DEATH_LIMIT_S = 10.0


@pytest.fixture
async def host_a(ssh_testbed: SSHTestbed) -> AsyncIterator[SSHHost]:
    async with SSHHost(ssh_testbed.target(ssh_testbed.a), kill_grace=1.0) as host:
        yield host


@pytest.fixture
def remote_dir(tmp_path: Path) -> Path:
    """A directory for the remote side (the namespaces share this filesystem)."""
    path = tmp_path / "remote"
    path.mkdir()
    return path


def wait_dead(pid: int, limit: float = DEATH_LIMIT_S) -> float:
    """Seconds until ``pid`` is gone (or a zombie); fails after ``limit``."""
    started = time.monotonic()
    while alive(pid):
        assert time.monotonic() - started < limit, f"pid {pid} still alive after {limit} s"
        time.sleep(0.02)
    return time.monotonic() - started


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll a remote condition (remote state has no events to wait on)."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def contains(host: SSHHost, path: Path, text: str) -> bool:
    return text in await host.read_text(path)


# Commands.


async def test_run_returns_status_and_both_outputs(host_a: SSHHost) -> None:
    result = await host_a.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert result.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")


async def test_run_feeds_stdin_bytes(host_a: SSHHost) -> None:
    data = os.urandom(300_000)
    result = await host_a.run(["sha256sum"], stdin=data)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


async def test_run_reports_a_signal_as_negative_status(host_a: SSHHost) -> None:
    result = await host_a.run(["sh", "-c", "kill -TERM $$"])
    assert result.status == -signal.SIGTERM
    assert result.stderr == ""  # no "Terminated" from the supervisor's shell


async def test_nasty_arguments_arrive_unchanged(host_a: SSHHost) -> None:
    result = await host_a.run(["printf", "%s\\0", *NASTY])
    assert result.stdout.split("\0")[:-1] == NASTY
    assert not await asyncio.to_thread(Path("/tmp/pwned").exists)


async def test_missing_remote_command_is_a_host_error(
    host_a: SSHHost, remote_dir: Path
) -> None:
    with pytest.raises(HostError, match=r"^no-such-binary-xyz: command not found on host-a$"):
        await host_a.run(["no-such-binary-xyz", "--version"])
    with pytest.raises(HostError, match=r"^/opt/none/qemu: command not found on host-a$"):
        await host_a.start(["/opt/none/qemu"], stdout=remote_dir / "o", stderr=remote_dir / "e")


async def test_run_timeout_kills_the_remote_command(
    host_a: SSHHost, record_property: Any
) -> None:
    started = time.monotonic()
    with pytest.raises(HostError, match=r"did not finish within 1 s and was killed"):
        await host_a.run(["sh", "-c", "echo $$ > /dev/null; exec sleep 1000.25"], timeout=1.0)
    elapsed = time.monotonic() - started
    record_property("run_timeout_return_s", round(elapsed, 3))
    assert elapsed < 1.0 + 3.0
    assert not pids_running("sleep 1000.25")


def pids_running(cmdline: str) -> list[int]:
    """Live processes whose command line is exactly ``cmdline``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if text == cmdline and alive(int(proc.name)):
                found.append(int(proc.name))
    return found


class Portal:
    """An event loop in a thread with one connected host, for synchronous (hypothesis) tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def portal_host(ssh_testbed: SSHTestbed) -> Iterator[tuple[Portal, SSHHost]]:
    portal = Portal()
    host = SSHHost(ssh_testbed.target(ssh_testbed.a))
    portal.call(host.connect())
    try:
        yield portal, host
    finally:
        portal.call(host.close())
        portal.close()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(ARG, min_size=1, max_size=6))
def test_any_argv_round_trips_through_sshd(
    portal_host: tuple[Portal, SSHHost], argv: list[str]
) -> None:
    portal, host = portal_host
    result = portal.call(host.run(["printf", "%s\\0", *argv]))
    assert result.status == 0, result.stderr
    assert result.stdout.split("\0")[:-1] == argv


# Long-running processes.


async def test_start_wait_and_exit_status(host_a: SSHHost, remote_dir: Path) -> None:
    out, err = remote_dir / "out.log", remote_dir / "err.log"
    process = await host_a.start(["sh", "-c", "pwd; echo oops >&2; exit 5"],
                                 stdout=out, stderr=err, cwd=remote_dir)
    assert process.pid > 0
    assert await process.wait() == 5
    assert process.returncode == 5
    assert await host_a.read_text(out) == f"{remote_dir}\n"
    assert await host_a.read_text(err) == "oops\n"


async def test_start_failures_say_why(host_a: SSHHost, remote_dir: Path) -> None:
    with pytest.raises(HostError, match=r"^could not start true on host-a \(exit 2\): .*/nodir/o"):
        await host_a.start(["true"], stdout=remote_dir / "nodir" / "o", stderr=remote_dir / "e")
    with pytest.raises(HostError, match=r"^could not start true on host-a \(exit 126\): .*cd"):
        await host_a.start(["true"], stdout=remote_dir / "o", stderr=remote_dir / "e",
                           cwd=remote_dir / "nodir")


async def test_send_signal_by_name_then_terminate(host_a: SSHHost, remote_dir: Path) -> None:
    out = remote_dir / "out.log"
    script = 'trap "echo got-usr1" USR1; echo ready; while :; do sleep 0.05; done'
    process = await host_a.start(["sh", "-c", script], stdout=out, stderr=remote_dir / "e")
    await eventually(lambda: contains(host_a, out, "ready"))
    await process.send_signal(signal.SIGUSR1)
    await eventually(lambda: contains(host_a, out, "got-usr1"))
    assert process.returncode is None
    await process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGTERM
    await process.send_signal(signal.SIGKILL)  # already exited: not an error
    assert not alive(process.pid)


async def test_closing_the_host_ends_its_processes(
    ssh_testbed: SSHTestbed, remote_dir: Path
) -> None:
    async with SSHHost(ssh_testbed.target(ssh_testbed.b), kill_grace=1.0) as host:
        process = await host.start(["sleep", "1000.5"], stdout=remote_dir / "o",
                                   stderr=remote_dir / "e")
        assert alive(process.pid)
        assert ssh_testbed.b.exec("kill", "-0", str(process.pid)).returncode == 0
    assert not alive(process.pid)  # close() waited for it
    assert process.returncode == -signal.SIGTERM


async def test_dropped_connection_kills_the_remote_process(
    ssh_testbed: SSHTestbed, remote_dir: Path, record_property: Any
) -> None:
    host = SSHHost(ssh_testbed.target(ssh_testbed.a), kill_grace=1.0)
    await host.connect()
    # A process that ignores SIGTERM: it can only die of the SIGKILL after the grace.
    process = await host.start(["sh", "-c", 'trap "" TERM; exec sleep 1000.75'],
                               stdout=remote_dir / "o", stderr=remote_dir / "e")
    await asyncio.sleep(0.2)
    host.connection.abort()  # no SSH disconnect message: the socket just closes
    seconds = await asyncio.to_thread(wait_dead, process.pid)
    record_property("abort_to_death_s", round(seconds, 3))
    print(f"\nconnection abort -> remote process gone: {seconds:.3f} s (kill_grace 1 s)")
    with pytest.raises(HostError, match="SSH connection lost"):
        await process.wait()
    await host.close()


async def test_line_dialogue_over_one_channel(host_a: SSHHost) -> None:
    script = 'read -r q; echo $$; while IFS= read -r q; do echo "re: $q"; done'
    async with host_a.exchange_lines(["sh", "-c", script]) as dialogue:
        pid = int(await dialogue.ask("pid?"))
        assert alive(pid)
        for question in [q for q in NASTY if "\n" not in q and "\r" not in q]:
            assert await dialogue.ask(question) == f"re: {question}"
    assert not alive(pid)
    with pytest.raises(HostError, match="no-such-command-xyz: command not found on host-a"):
        async with host_a.exchange_lines(["no-such-command-xyz"]):
            pytest.fail("must not get here")


async def test_dropped_connection_ends_a_dialogue(
    ssh_testbed: SSHTestbed, record_property: Any
) -> None:
    host = SSHHost(ssh_testbed.target(ssh_testbed.b), kill_grace=1.0)
    await host.connect()
    # Keeps running after its input ends and ignores SIGTERM: only the SIGKILL ends it.
    script = ("trap '' TERM; read -r q; echo $$; while read -r q; do echo \"$q\"; done; "
              "sleep 1000.875")
    dialogue = host.exchange_lines(["sh", "-c", script])
    pid = int(await (await dialogue.__aenter__()).ask("pid?"))
    host.connection.abort()
    seconds = await asyncio.to_thread(wait_dead, pid)
    record_property("abort_to_dialogue_death_s", round(seconds, 3))
    await dialogue.__aexit__(None, None, None)
    await host.close()


async def test_clock_offset_over_one_channel_is_within_its_bound(
    ssh_testbed: SSHTestbed, record_property: Any
) -> None:
    # One machine clock on both sides: what remains is the measurement's own error,
    # at most half the round trip (plus the 1 ms the comparison allows for rounding).
    for host in ssh_testbed.hosts:
        async with SSHHost(ssh_testbed.target(host)) as remote:
            offset, rtt = await measure_clock_offset(remote)
        assert offset is not None
        assert rtt is not None
        record_property(f"clock_{host.label}_offset_rtt_ms", [offset, rtt])
        assert 0 < rtt < 50
        assert abs(offset) <= rtt / 2 + 1


async def test_killed_supervisor_takes_its_command_along(
    host_a: SSHHost, remote_dir: Path
) -> None:
    process = await host_a.start(["sleep", "1002.5"], stdout=remote_dir / "o",
                                 stderr=remote_dir / "e")
    stat_line = await host_a.read_text(Path(f"/proc/{process.pid}/stat"))
    supervisor = stat_line.rsplit(")", 1)[1].split()[1]  # the command's parent
    (await host_a.run(["kill", "-KILL", supervisor])).check("killing the supervisor")
    await asyncio.to_thread(wait_dead, process.pid, 5.0)  # --pdeathsig KILL
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL


CONTROLLER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from migrator.hosts.ssh import SSHHost, SSHTarget

    async def main() -> None:
        spec = json.loads(sys.argv[1])
        target = SSHTarget(spec["address"], identity_file=Path(spec["key"]),
                           known_hosts=Path(spec["known_hosts"]))
        async with SSHHost(target) as host:
            process = await host.start(["sleep", "1001.25"], stdout=Path(spec["out"]),
                                       stderr=Path(spec["out"]))
            print(process.pid, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


def test_killed_controller_leaves_no_remote_process(
    ssh_testbed: SSHTestbed, remote_dir: Path, record_property: Any
) -> None:
    spec = {"address": ssh_testbed.b.address, "key": str(ssh_testbed.client_key),
            "known_hosts": str(ssh_testbed.known_hosts), "out": str(remote_dir / "out")}
    with subprocess.Popen([sys.executable, "-c", CONTROLLER, json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True) as controller:
        assert controller.stdout is not None
        pid = int(controller.stdout.readline())
        assert alive(pid)
        assert str(pid) in ssh_testbed.b.exec("pgrep", "-x", "sleep").stdout.split()
        killed = time.monotonic()
        controller.kill()  # SIGKILL: no cleanup runs in the controller
        controller.wait()
        wait_dead(pid)
        seconds = time.monotonic() - killed
    record_property("controller_kill_to_death_s", round(seconds, 3))
    print(f"\ncontroller SIGKILL -> remote process gone: {seconds:.3f} s")


# Files.


async def test_file_operations(host_a: SSHHost, remote_dir: Path, tmp_path: Path) -> None:
    private = remote_dir / "a" / "b" / "private"
    await host_a.make_private_dir(private)
    await host_a.make_private_dir(private)  # exists already: fine
    assert (await host_a.run(["stat", "-c", "%a", str(private)])).stdout == "700\n"
    blob = bytes(range(256)) * 4096 + b"tail"
    await host_a.write_file(private / "blob", blob)
    assert await host_a.read_file(private / "blob") == blob
    await host_a.write_file(private / "blob", b"short")  # truncates
    assert await host_a.read_file(private / "blob") == b"short"
    assert await host_a.exists(private / "blob")
    assert not await host_a.exists(private / "nothing")
    with pytest.raises(FileNotFoundError):
        await host_a.read_file(private / "nothing")
    # /proc reports size 0 and sysfs 4096; the content must come back all the same.
    assert (await host_a.read_text(Path("/proc/self/status"))).startswith("Name:")
    assert "MemTotal:" in await host_a.read_text(Path("/proc/meminfo"))
    local = tmp_path / "fetched"
    await host_a.get(private / "blob", local)
    assert local.read_bytes() == b"short"
    with pytest.raises(FileNotFoundError):
        await host_a.get(private / "nothing", local)
    await host_a.remove_tree(remote_dir / "a")
    assert not await host_a.exists(remote_dir / "a")
    await host_a.remove_tree(remote_dir / "a")  # missing: not an error
    with pytest.raises(HostError, match="refusing"):
        await host_a.remove_tree(Path("/"))


ECHO_SERVER = textwrap.dedent("""
    import os, socket, sys
    path = sys.argv[1]
    server = socket.socket(socket.AF_UNIX)
    server.bind(path + ".tmp")
    os.rename(path + ".tmp", path)
    server.listen()
    while True:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
""")


async def test_forward_unix_socket_reaches_a_remote_server(
    host_a: SSHHost, remote_dir: Path
) -> None:
    sock = remote_dir / "echo.sock"
    await host_a.start(["python3", "-c", ECHO_SERVER, str(sock)],
                       stdout=remote_dir / "o", stderr=remote_dir / "e")
    await eventually(lambda: host_a.exists(sock))
    async with host_a.forward_unix_socket(sock) as local:
        assert local != sock
        assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700
        for _ in range(2):  # a connection each time, as QMP reconnects would
            reader, writer = await asyncio.open_unix_connection(str(local))
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
            writer.close()
            await writer.wait_closed()
    assert not local.parent.exists()


# Connection failures: each a clear one-line HostError.


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


async def test_changed_host_key_is_refused(ssh_testbed: SSHTestbed, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{ssh_testbed.a.address} {ssh_testbed.b.host_key_line}\n")
    with pytest.raises(HostError) as caught:
        async with SSHHost(ssh_testbed.target(ssh_testbed.a, known_hosts=wrong)):
            pass
    text = one_line(caught.value)
    assert text.startswith("host-a: ")
    assert "CHANGED" in text
    assert str(wrong) in text
    assert f"ssh-keygen -R '{ssh_testbed.a.address}' -f {wrong}" in text


async def test_unknown_host_key_is_refused(ssh_testbed: SSHTestbed, tmp_path: Path) -> None:
    other = tmp_path / "known_hosts"
    other.write_text(f"{ssh_testbed.b.address} {ssh_testbed.b.host_key_line}\n")
    with pytest.raises(HostError) as caught:
        async with SSHHost(ssh_testbed.target(ssh_testbed.a, known_hosts=other)):
            pass
    text = one_line(caught.value)
    assert "unknown" in text
    assert str(other) in text
    assert "ssh-keyscan" in text
    missing = tmp_path / "absent"
    with pytest.raises(HostError, match=f"known_hosts file {missing} does not exist"):
        async with SSHHost(ssh_testbed.target(ssh_testbed.a, known_hosts=missing)):
            pass


async def test_disabled_host_key_check_connects_and_warns(
    ssh_testbed: SSHTestbed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{ssh_testbed.a.address} {ssh_testbed.b.host_key_line}\n")
    target = ssh_testbed.target(ssh_testbed.a, known_hosts=wrong, check_host_key=False)
    with caplog.at_level(logging.WARNING, logger="migrator.hosts.ssh"):
        async with SSHHost(target) as host:
            assert (await host.run(["true"])).status == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("host key checking is OFF" in r.getMessage() for r in warnings)


async def test_wrong_user_is_refused(ssh_testbed: SSHTestbed) -> None:
    with pytest.raises(HostError) as caught:
        async with SSHHost(ssh_testbed.target(ssh_testbed.a, user="nobody")):
            pass
    text = one_line(caught.value)
    assert text.startswith("host-a: ")
    assert "refused authentication for user 'nobody'" in text


async def test_unreachable_host_fails_within_the_timeout(ssh_testbed: SSHTestbed) -> None:
    target = ssh_testbed.target(ssh_testbed.a, address=ssh_testbed.unused_address,
                                connect_timeout=2.0, name="ghost")
    started = time.monotonic()
    with pytest.raises(HostError) as caught:
        async with SSHHost(target):
            pass
    assert time.monotonic() - started < 2.0 + 1.5
    text = one_line(caught.value)
    assert text.startswith("ghost: ")
    assert ssh_testbed.unused_address in text


async def test_nothing_listening_is_refused_at_once(ssh_testbed: SSHTestbed) -> None:
    target = ssh_testbed.target(ssh_testbed.a, port=2222)
    started = time.monotonic()
    with pytest.raises(HostError, match=r"cannot connect to .*:2222: .*[Rr]efused"):
        async with SSHHost(target):
            pass
    assert time.monotonic() - started < 2.0


async def test_unconnected_or_closed_host_is_a_host_error(
    ssh_testbed: SSHTestbed,
) -> None:
    host = SSHHost(ssh_testbed.target(ssh_testbed.a))
    with pytest.raises(HostError, match="not connected"):
        await host.run(["true"])
    async with host:
        pass
    with pytest.raises(HostError, match="not connected"):
        await host.exists(Path("/"))


async def test_a_cancelled_read_leaves_no_request_behind(
    host_a: SSHHost, tmp_path: Path,
) -> None:
    # A QEMU's stderr is read as the run fails, and that read is often cancelled: asyncssh
    # splits a read into parallel requests, and abandoned ones used to end in "Task
    # exception was never retrieved" tracebacks at exit.
    # Small, like a QEMU's stderr: the requests past its end are the ones that fail.
    big = tmp_path / "small"
    big.write_bytes(os.urandom(200))
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        for step in range(40):
            reading = asyncio.create_task(host_a.read_file(big))
            for _ in range(step % 8):  # cancelled at each point of the read in turn
                await asyncio.sleep(0)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        assert await host_a.read_file(big) == big.read_bytes()  # still works afterwards
        await asyncio.sleep(0.2)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []
