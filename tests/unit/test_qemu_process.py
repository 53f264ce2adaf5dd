"""QemuProcess against a stand-in QEMU: QMP connected from either side, launch failures."""

from __future__ import annotations

import logging
import signal
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from migrator.config.models import Backing
from migrator.errors import HostError, QemuLaunchError
from migrator.hosts.base import HostProcess
from migrator.hosts.local import LocalHost
from migrator.qemu.cmdline import LaunchSpec
from migrator.qemu.launcher import QemuLauncher
from migrator.qemu.monitor import EventRecord
from migrator.qemu.process import QemuProcess

# Speaks QMP like QEMU.  "listen": listens, but drops the first connection before the
# greeting (what a QEMU not yet listening looks like through an SSH forward).
# "connect": connects to the socket migrator listens on, as a local QEMU does.
FAKE_QEMU = textwrap.dedent("""
    import json, socket, sys
    mode, path = sys.argv[1:3]
    if mode == "listen":
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen()
        server.accept()[0].close()
        conn, _ = server.accept()
    else:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(path)
    greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                    "package": ""}, "capabilities": []}}
    conn.sendall(json.dumps(greeting).encode() + b"\\n")
    decoder, pending = json.JSONDecoder(), ""
    while data := conn.recv(4096):
        pending += data.decode()
        while pending.strip():
            message, end = decoder.raw_decode(pending.lstrip())
            pending = pending.lstrip()[end:]
            reply = {"return": {"status": "running", "running": True}
                     if message["execute"] == "query-status" else {}}
            if "id" in message:
                reply["id"] = message["id"]
            conn.sendall(json.dumps(reply).encode() + b"\\n")
            if message["execute"] == "quit":
                sys.exit(0)
""")


class ForwardingHost(LocalHost):
    """Stands in for a remote host: its QEMU listens, migrator connects through a forward."""

    is_controller_machine = False


def fake_qemu(mode: str, socket: Path) -> list[str]:
    return [sys.executable, "-c", FAKE_QEMU, mode, str(socket)]


async def test_qmp_connect_retries_after_a_dropped_greeting(tmp_path: Path) -> None:
    socket = tmp_path / "qmp.sock"
    argv = fake_qemu("listen", socket)
    async with QemuProcess(ForwardingHost(), "flaky", argv, socket, tmp_path,
                           start_timeout=10) as qemu:
        assert (await qemu.monitor.query_status())["running"] is True
    assert qemu.returncode == 0


async def test_a_destination_left_in_postcopy_paused_is_killed_at_once(tmp_path: Path) -> None:
    # Its vCPUs wait on pages that will never come: quit would only run out its deadline.
    socket = tmp_path / "qmp.sock"
    argv = fake_qemu("connect", socket)
    async with QemuProcess(LocalHost(), "dst", argv, socket, tmp_path, start_timeout=10,
                           incoming=True) as qemu:
        qemu.monitor.record_event(EventRecord("MIGRATION", {"status": "postcopy-paused"}, 0, 0))
    assert qemu.returncode == -signal.SIGKILL  # the fake exits 0 on quit: it got none


async def test_a_source_left_in_postcopy_paused_is_asked_to_quit(tmp_path: Path) -> None:
    socket = tmp_path / "qmp.sock"
    argv = fake_qemu("connect", socket)
    async with QemuProcess(LocalHost(), "src", argv, socket, tmp_path,
                           start_timeout=10) as qemu:
        qemu.monitor.record_event(EventRecord("MIGRATION", {"status": "postcopy-paused"}, 0, 0))
    assert qemu.returncode == 0


async def test_a_local_qemu_connects_to_the_socket_migrator_listens_on(tmp_path: Path) -> None:
    socket = tmp_path / "qmp.sock"
    async with QemuProcess(LocalHost(), "local", fake_qemu("connect", socket), socket,
                           tmp_path, start_timeout=10) as qemu:
        assert (await qemu.monitor.query_status())["running"] is True
    assert qemu.returncode == 0
    assert not socket.exists()


@pytest.mark.parametrize("host", [LocalHost(), ForwardingHost()], ids=["local", "forwarded"])
async def test_qemu_exiting_before_qmp_fails_at_once_with_its_status_and_output(
    tmp_path: Path, host: LocalHost, caplog: pytest.LogCaptureFixture
) -> None:
    socket = tmp_path / "qmp.sock"
    argv = [sys.executable, "-c", "import sys; sys.exit('qemu: no such machine')"]
    began = time.monotonic()
    with pytest.raises(QemuLaunchError) as caught:
        async with QemuProcess(host, "early", argv, socket, tmp_path, start_timeout=30):
            pass
    assert time.monotonic() - began < 5
    assert caught.value.status == 1
    assert "exited during start-up" in str(caught.value)
    assert "qemu: no such machine" in str(caught.value)
    assert not socket.exists()
    # The launch error is the one message: no error logged beside it (a cancelled accept).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("host", [LocalHost(), ForwardingHost()], ids=["local", "forwarded"])
async def test_qemu_that_never_opens_qmp_is_stopped_after_the_start_timeout(
    tmp_path: Path, host: LocalHost
) -> None:
    socket = tmp_path / "qmp.sock"
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(QemuLaunchError, match=r"QMP socket .* not ready after 0.5 s") as caught:
        async with QemuProcess(host, "silent", argv, socket, tmp_path, start_timeout=0.5):
            pass
    assert caught.value.status is None
    assert not socket.exists()


class HostThatCannotStart(LocalHost):
    async def start(
        self, argv: Sequence[str], *, stdout: Path, stderr: Path, cwd: Path | None = None
    ) -> HostProcess:
        raise HostError(f"cannot start {argv[0]}")


async def test_a_qemu_that_cannot_start_leaves_no_socket(tmp_path: Path) -> None:
    socket = tmp_path / "qmp.sock"
    with pytest.raises(HostError, match="cannot start qemu"):
        async with QemuProcess(HostThatCannotStart(), "never", ["qemu"], socket, tmp_path,
                               start_timeout=10):
            pass
    assert not socket.exists()


@pytest.mark.parametrize(("host", "qmp"), [
    (LocalHost(), "unix:/r/qmp.sock,server=off"),
    (ForwardingHost(), "unix:/r/qmp.sock,server=on,wait=off"),
], ids=["local", "forwarded"])
def test_the_host_decides_who_listens_on_the_qmp_socket(
    tmp_path: Path, host: LocalHost, qmp: str
) -> None:
    spec = LaunchSpec(
        launcher=QemuLauncher("qemu-system-x86_64"), name="dst", memory_mib=64, vcpus=1,
        backing=Backing.ANON_4K, accel="tcg", machine="pc", kernel=Path("/k"),
        initrd=Path("/i"), append="", qmp_socket=Path("/r/qmp.sock"), serial_args=(),
    )
    argv = QemuProcess.from_spec(host, spec, tmp_path).argv
    assert argv[argv.index("-qmp") + 1] == qmp
