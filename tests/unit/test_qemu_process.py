"""QemuProcess against a stand-in QMP server: the connect retry after a failed greeting."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

from migrator.hosts.local import LocalHost
from migrator.qemu.monitor import EventRecord
from migrator.qemu.process import QemuProcess

# Listens like QEMU, but drops the first connection before the greeting (what a
# QEMU not yet listening looks like through an SSH forward), then speaks QMP.
FLAKY_QMP = textwrap.dedent("""
    import json, socket, sys
    server = socket.socket(socket.AF_UNIX)
    server.bind(sys.argv[1])
    server.listen()
    server.accept()[0].close()
    conn, _ = server.accept()
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


async def test_qmp_connect_retries_after_a_dropped_greeting(tmp_path: Path) -> None:
    socket = tmp_path / "qmp.sock"
    argv = [sys.executable, "-c", FLAKY_QMP, str(socket)]
    async with QemuProcess(LocalHost(), "flaky", argv, socket, tmp_path,
                           start_timeout=10) as qemu:
        assert (await qemu.monitor.query_status())["running"] is True
    assert qemu.returncode == 0


async def test_a_destination_left_in_postcopy_paused_is_killed_at_once(tmp_path: Path) -> None:
    # Its vCPUs wait on pages that will never come: quit would only run out its deadline.
    socket = tmp_path / "qmp.sock"
    argv = [sys.executable, "-c", FLAKY_QMP, str(socket)]
    async with QemuProcess(LocalHost(), "dst", argv, socket, tmp_path, start_timeout=10,
                           incoming=True) as qemu:
        qemu.monitor.record_event(EventRecord("MIGRATION", {"status": "postcopy-paused"}, 0, 0))
    assert qemu.returncode == -signal.SIGKILL  # the fake exits 0 on quit: it got none


async def test_a_source_left_in_postcopy_paused_is_asked_to_quit(tmp_path: Path) -> None:
    socket = tmp_path / "qmp.sock"
    argv = [sys.executable, "-c", FLAKY_QMP, str(socket)]
    async with QemuProcess(LocalHost(), "src", argv, socket, tmp_path,
                           start_timeout=10) as qemu:
        qemu.monitor.record_event(EventRecord("MIGRATION", {"status": "postcopy-paused"}, 0, 0))
    assert qemu.returncode == 0
