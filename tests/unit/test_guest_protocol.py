"""The probe's serial protocol, on serial output recorded from the real probe.

Recordings in tests/data/guest/ (see its README): QEMU 7.2 TCG, Debian
6.1 cloud kernel, 2 vCPUs.  The console JSONL files are what GuestConsole
wrote; the *.qemu-serial.log files are QEMU's own chardev logfile of the same
bytes, which under back-pressure repeats bytes (so it holds real garbled lines).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path

import pytest

from migrator.errors import ArtifactError, ConfigError, GuestBuildError, GuestError, MissingResource
from migrator.guest.build import ensure_guest, find_kernel, kernel_cmdline, kernel_release
from migrator.guest.console import (
    ConsoleLine,
    GuestConsole,
    read_console_log,
    serial_chardev_args,
)
from migrator.guest.protocol import (
    Boot,
    GuestEvent,
    Heartbeat,
    Hist,
    Malformed,
    ProbeError,
    Ready,
    Stall,
    Stats,
    Verify,
    parse_line,
)
from migrator.rundir import artifact_path

DATA = Path(__file__).resolve().parents[1] / "data" / "guest"
RUN = DATA / "run-2vcpu-stop.console.jsonl"


def received(path: Path) -> list[ConsoleLine[GuestEvent | None]]:
    return [line for line in read_console_log(path) if not line.sent]


def events(path: Path) -> list[GuestEvent]:
    return [line.event for line in received(path) if line.event is not None]


# ------------------------------------------------------------------ recorded run


def test_recorded_run_parses_completely() -> None:
    parsed = events(RUN)
    assert not [e for e in parsed if isinstance(e, Malformed)]
    kinds = [e.kind for e in parsed]
    assert kinds[:2] == ["boot", "ready"]
    assert {"hb", "stall", "stats", "hist", "verify", "error"} <= set(kinds)
    # The kernel's own power-down message is on the console too, and ignored.
    assert any(line.event is None and "Power down" in line.line for line in received(RUN))


def test_recorded_boot_and_ready() -> None:
    parsed = events(RUN)
    boot, ready = parsed[0], parsed[1]
    assert isinstance(boot, Boot)
    assert boot.kernel.startswith("6.1.0-")
    assert boot.nproc == 2
    assert boot.mode == "run"
    assert 0 < boot.uptime_s < 60
    assert isinstance(ready, Ready)
    assert ready.pages == ready.ws_mib * 256
    assert ready.cpus == (0, 1)
    assert ready.threads == len(ready.cpus)
    assert ready.pattern == "random"
    assert 0 < ready.fill_ns < ready.guest_ns


def test_recorded_heartbeats_are_consecutive_and_periodic() -> None:
    beats = [e for e in events(RUN) if isinstance(e, Heartbeat)]
    assert [b.seq for b in beats] == list(range(len(beats)))
    gaps = sorted(b.guest_ns - a.guest_ns for a, b in itertools.pairwise(beats))
    assert 95e6 < gaps[len(gaps) // 2] < 105e6


def test_recorded_stop_shows_on_host_clock_only() -> None:
    # The run was stopped for 1.5 s over QMP: the host saw the pause, the
    # guest clock (which QEMU stops with the VM) did not.
    beats = [(line.host_ns, e) for line in received(RUN) if isinstance(e := line.event, Heartbeat)]
    host_gap, guest_gap = max(
        (host_b - host_a, b.guest_ns - a.guest_ns)
        for (host_a, a), (host_b, b) in itertools.pairwise(beats)
    )
    assert host_gap >= 1.4e9
    assert guest_gap < 0.5e9


def test_recorded_stalls_stats_hist_verify_agree() -> None:
    parsed = events(RUN)
    ready = next(e for e in parsed if isinstance(e, Ready))
    stalls = [e for e in parsed if isinstance(e, Stall)]
    assert all(s.cpu in ready.cpus and s.gap_ns > ready.stall_us * 1000 for s in stalls)
    assert all(s.end_ns == s.start_ns + s.gap_ns for s in stalls)

    stats = [e for e in parsed if isinstance(e, Stats)]
    for earlier, later in itertools.pairwise(stats):
        assert all(b >= a for a, b in zip(earlier.ops, later.ops, strict=True))
        assert later.stalls >= earlier.stalls
    assert stats[-1].stalls == len(stalls)
    assert stats[-1].dropped == 0

    hists = [e for e in parsed if isinstance(e, Hist)]
    assert sorted(h.cpu for h in hists) == sorted(ready.cpus)
    for hist in hists:
        # Every access adds exactly one gap; the largest gap is in the last bucket.
        assert sum(hist.buckets) == hist.ops
        low, high = Hist.bucket_bounds(len(hist.buckets) - 1)
        assert low <= hist.max_gap_ns < high
    assert Hist.bucket_bounds(0) == (0, 2)

    verify = next(e for e in parsed if isinstance(e, Verify))
    assert verify.pages == ready.pages
    assert verify.bad_pages == 0
    assert verify.first_bad == ()
    assert verify.ok


def test_recorded_unknown_command_roundtrips_quotes() -> None:
    lines = list(read_console_log(RUN))
    sent = [line for line in lines if line.sent]
    assert [line.line for line in sent] == ['bogus cmd "x"', "verify", "poweroff"]
    assert all(line.event is None for line in sent)
    error = next(e for e in events(RUN) if isinstance(e, ProbeError))
    assert error.msg == "unknown command"
    assert error.cmd == 'bogus cmd "x"'


def test_recorded_mode_boot_and_bad_parameter() -> None:
    boot_only = events(DATA / "mode-boot.console.jsonl")
    assert len(boot_only) == 1
    assert isinstance(boot_only[0], Boot)
    assert boot_only[0].mode == "boot"

    bad = events(DATA / "bad-param.console.jsonl")
    assert isinstance(bad[0], Boot)
    assert isinstance(bad[1], ProbeError)
    assert bad[1].msg == "bad value for migrator.pattern: zigzag"
    assert bad[1].guest_ns is not None


def test_qemu_logfile_repeats_bytes_under_backpressure() -> None:
    # Same run, QEMU's chardev logfile: CRLF endings, and bytes the UART had
    # to retry (socket EAGAIN) are logged twice.  Such lines must come out as
    # Malformed when the JSON breaks, never as an exception.
    log_lines = (DATA / "run-2vcpu-stop.qemu-serial.log").read_bytes().decode().splitlines()
    console_lines = [line.line for line in received(RUN)]
    assert len(log_lines) == len(console_lines)
    differing = [(a, b) for a, b in zip(log_lines, console_lines, strict=True) if a != b]
    assert 0 < len(differing) <= 5
    results = [parse_line(a) for a, _ in differing]
    assert any(isinstance(r, Malformed) for r in results)
    assert all(r is not None for r in results)


def test_stall_flood_log_with_garbled_and_truncated_lines() -> None:
    lines = (DATA / "stall-flood.qemu-serial.log").read_bytes().decode().split("\n")
    parsed = [parse_line(line) for line in lines]
    malformed = [p for p in parsed if isinstance(p, Malformed)]
    # '{"tt":...}' (a doubled byte) and the cut-off last line.
    assert len(malformed) == 2
    assert '"tt"' in malformed[0].text
    assert malformed[1].text == lines[-1]
    good = [p for p in parsed if p is not None and not isinstance(p, Malformed)]
    assert len(good) == len(lines) - 2
    assert isinstance(good[1], Ready)
    assert good[1].stall_us == 1


# ------------------------------------------------------------------ parse_line edges


def test_every_truncation_of_real_lines_is_malformed_or_ignored() -> None:
    samples = {type(e): line.line for line in received(RUN) if (e := line.event) is not None}
    assert len(samples) >= 7
    for text in samples.values():
        assert not isinstance(parse_line(text), Malformed)
        for cut in range(len(text)):
            result = parse_line(text[:cut])
            if cut < len("@MIG "):
                assert result is None
            else:
                assert isinstance(result, Malformed), text[:cut]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[    2.129767] reboot: Power down",
        "@MIG",
        "MIG {}",
        '{"t":"hb","seq":1,"g":2}',
    ],
)
def test_non_probe_lines_are_ignored(text: str) -> None:
    assert parse_line(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "@MIG ",
        "@MIG [1,2]",
        '@MIG {"t":"hb","seq":1,"g":2',
        '@MIG {"t":"nope","seq":1}',
        '@MIG {"seq":1,"g":2}',
        '@MIG {"t":"hb","seq":"1","g":2}',
        '@MIG {"t":"hb","seq":1,"g":2.5}',
        '@MIG {"t":"hb","seq":true,"g":2}',
        '@MIG {"t":"hb","seq":1}',
        '@MIG {"t":"ready","pages":1}',
        '@MIG {"t":"hb","seq":1,[   3.1] kernel says hi',
        '@MIG {"t":"hb","seq":1,"g":2}}',
        '@MIG {"t":"boot","kernel":"k","nproc":1,"mem_kib":1,"mode":"walk","uptime_s":1}',
    ],
)
def test_garbled_probe_lines_are_malformed(text: str) -> None:
    result = parse_line(text)
    assert isinstance(result, Malformed)
    assert result.text == text
    assert result.reason


def test_line_endings_prefixes_and_extra_members() -> None:
    beat = parse_line('@MIG {"t":"hb","seq":7,"g":123,"future":"ignored"}\r')
    assert beat == Heartbeat(seq=7, guest_ns=123)
    # Kernel text before the marker (printk landing mid-line) does not matter.
    assert parse_line('[  1.0] x@MIG {"t":"hb","seq":7,"g":123}') == beat
    # A torn line that lost its newline: the complete line after it wins.
    assert parse_line('@MIG {"t":"stall","cpu"@MIG {"t":"hb","seq":7,"g":123}') == beat


def test_error_lines_from_init_have_no_guest_time() -> None:
    error = parse_line('@MIG {"t":"error","msg":"probe exited with status 139"}')
    assert isinstance(error, ProbeError)
    assert error.guest_ns is None
    assert error.cmd is None


# ------------------------------------------------------------------ log files


def test_read_console_log_skips_torn_tail_and_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "console.jsonl"
    good = json.dumps({"host_ns": 1, "side": "dst", "line": '@MIG {"t":"hb","seq":0,"g":5}'})
    path.write_text(good + "\n" + '{"host_ns": 2, "si')
    (only,) = read_console_log(path)
    assert only.side == "dst"
    assert only.event == Heartbeat(seq=0, guest_ns=5)

    path.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(ArtifactError, match=":2:"):
        list(read_console_log(path))


# ------------------------------------------------------------------ QEMU-facing pure helpers


def test_serial_chardev_args_escape_commas() -> None:
    args = serial_chardev_args(Path("/run/a,b/s.sock"), Path("/run/serial.log"))
    assert args == [
        "-chardev",
        "socket,id=ser0,path=/run/a,,b/s.sock,server=on,wait=off,logfile=/run/serial.log",
        "-serial",
        "chardev:ser0",
    ]


def test_kernel_cmdline() -> None:
    line = kernel_cmdline(
        working_set_mib=256,
        write_pct=30,
        pattern="sequential",
        stall_threshold_us=5000,
        heartbeat_ms=50,
    )
    words = line.split()
    assert "console=ttyS0" in words
    assert "panic=-1" in words
    assert {
        "migrator.ws_mib=256",
        "migrator.write_pct=30",
        "migrator.pattern=sequential",
        "migrator.stall_us=5000",
        "migrator.hb_ms=50",
        "migrator.threads=0",
        "migrator.mode=run",
    } <= set(words)


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("working_set_mib", {"working_set_mib": 0}),
        ("write_pct", {"write_pct": 101}),
        ("pattern", {"pattern": "zigzag"}),
        ("stall_threshold_us", {"stall_threshold_us": 0}),
        ("heartbeat_ms", {"heartbeat_ms": 0}),
        ("threads", {"threads": -1}),
        ("mode", {"mode": "walk"}),
    ],
)
def test_kernel_cmdline_rejects_what_the_probe_would(
    field: str, overrides: dict[str, object]
) -> None:
    args: dict[str, object] = {
        "working_set_mib": 64,
        "write_pct": 50,
        "pattern": "random",
        "stall_threshold_us": 1000,
        "heartbeat_ms": 100,
    }
    args.update(overrides)
    with pytest.raises(ConfigError) as info:
        kernel_cmdline(**args)  # type: ignore[arg-type]
    assert info.value.field == field


# ------------------------------------------------------------------ console on a fake QEMU socket


class FakeSerial:
    """A Unix socket server standing in for QEMU's serial chardev."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.connected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.connected.set()

    async def say(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
async def test_console_waits_sends_records_and_survives_eof(tmp_path: Path,
                                                           compress: bool) -> None:
    sock, jsonl = tmp_path / "serial.sock", tmp_path / "console.jsonl"
    fake = FakeSerial()
    lines = [line.line + "\r\n" for line in received(RUN)]

    # The console starts before the socket exists, as it does against a QEMU being launched.
    async def serve_later() -> asyncio.Server:
        await asyncio.sleep(0.2)
        return await asyncio.start_unix_server(fake.handle, path=str(sock))

    server_task = asyncio.create_task(serve_later())
    async with GuestConsole(sock, jsonl, side="src", connect_timeout=5,
                            compress=compress) as console:
        server = await server_task
        await fake.connected.wait()
        # Split mid-line: arrival is stamped when the newline arrives.
        blob = "".join(lines[:3]).encode()
        await fake.say(blob[:50])
        await fake.say(blob[50:])
        boot = await console.wait_for("boot", 5)
        ready = await console.wait_for(Ready, 5)
        assert isinstance(boot.event, Boot)
        assert ready.event.cpus == (0, 1)
        assert ready.host_ns >= boot.host_ns

        mark = await console.send("verify")
        assert fake.reader is not None
        assert await fake.reader.readline() == b"verify\n"
        verify_lines = [text for text in lines if '"t":"verify"' in text]
        await fake.say("".join(lines[3:]).encode())
        verify = await console.wait_for(Verify, 5, since=mark)
        assert verify.event.bad_pages == 0
        assert verify.line + "\r\n" == verify_lines[0]
        # A second wait for the same kind does not return the same event.
        with pytest.raises(GuestError, match="no 'verify' line within"):
            await console.wait_for("verify", 0.2)
        assert console.last("hb") is not None
        beats = console.received("hb")
        assert [b.event for b in beats][:2] == [
            Heartbeat(seq=0, guest_ns=2821544743),
            Heartbeat(seq=1, guest_ns=2891868546),
        ]

        # QEMU exits: EOF.  Waits fail at once instead of timing out.
        assert fake.writer is not None
        fake.writer.close()
        await fake.writer.wait_closed()
        with pytest.raises(GuestError, match="closed before a 'ready' line") as info:
            await console.wait_for("ready", 30, since=console.mark())
        assert "Power down" in str(info.value)
        assert console.closed
        with pytest.raises(GuestError, match="cannot send"):
            await console.send("verify")
    server.close()
    await server.wait_closed()

    # The record is in the form asked for, and read back by its plain name either way.
    assert artifact_path(jsonl) == tmp_path / ("console.jsonl.zst" if compress
                                               else "console.jsonl")
    recorded = list(read_console_log(jsonl))
    assert [r.line for r in recorded if not r.sent] == [text.rstrip("\r\n") for text in lines]
    assert [r.line for r in recorded if r.sent] == ["verify"]
    assert all(r.side == "src" for r in recorded)


async def test_console_gives_up_when_no_socket_appears(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="not accepting connections"):
        async with GuestConsole(
            tmp_path / "none.sock", tmp_path / "c.jsonl", side="dst", connect_timeout=0.3
        ):
            pass


# ------------------------------------------------------------------ build preflight


def fake_bzimage(path: Path, version: bytes) -> Path:
    image = bytearray(0x4000)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x1000).to_bytes(2, "little")
    image[0x1200 : 0x1200 + len(version) + 1] = version + b"\0"
    path.write_bytes(bytes(image))
    return path


def test_find_kernel_picks_newest_by_version(tmp_path: Path) -> None:
    for release in ("6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "5.10.0-30-amd64"):
        fake_bzimage(tmp_path / f"vmlinuz-{release}", release.encode())
    newest = find_kernel(tmp_path)
    assert newest.name == "vmlinuz-6.1.0-56-cloud-amd64"
    assert kernel_release(newest) == "6.1.0-56-cloud-amd64"


def test_kernel_release_reads_the_setup_header(tmp_path: Path) -> None:
    image = fake_bzimage(tmp_path / "bzImage", b"6.18.0-test (builder@host) #1 SMP")
    assert kernel_release(image) == "6.18.0-test"
    (tmp_path / "not-a-kernel").write_bytes(b"\0" * 0x1000)
    with pytest.raises(GuestBuildError, match="not a Linux kernel image"):
        kernel_release(tmp_path / "not-a-kernel")


def test_given_kernel_that_is_not_a_kernel_is_bad_input(tmp_path: Path) -> None:
    # The scenario's guest.kernel is what to fix: a ConfigError (exit 2) naming it, raised
    # before the compiler or busybox is looked at.
    text = tmp_path / "os-release"
    text.write_text("PRETTY_NAME=Debian\n")
    with pytest.raises(ConfigError) as caught:
        asyncio.run(ensure_guest(tmp_path / "cache", text, cc="no-such-cc"))
    message = str(caught.value)
    assert message.startswith(f"guest.kernel: {text} is not a Linux kernel image (no x86 "
                              "bzImage header)")
    assert "/boot/vmlinuz-*" in message
    assert caught.value.exit_code == 2
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("kernel", "says"), [
    ("/dev/zero", "/dev/zero is not a regular file (it is a character device)"),
    ("{tmp}", "{tmp} is not a regular file (it is a directory)"),
])
def test_given_kernel_that_is_not_a_file_is_bad_input(tmp_path: Path, kernel: str,
                                                      says: str) -> None:
    # It exists, so "does not exist" would send the user looking for the wrong problem.
    path = Path(kernel.format(tmp=tmp_path))
    with pytest.raises(ConfigError) as caught:
        asyncio.run(ensure_guest(tmp_path / "cache", path, cc="no-such-cc"))
    message = str(caught.value)
    assert message.startswith(f"guest.kernel: {says.format(tmp=tmp_path)}; point it at")
    assert "does not exist" not in message
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_missing_kernel_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(
        MissingResource, match=r"vmlinuz-\* does not exist.*linux-image-cloud-amd64"
    ):
        find_kernel(tmp_path)
    with pytest.raises(MissingResource, match=r"nope does not exist.*linux-image-cloud-amd64"):
        asyncio.run(ensure_guest(tmp_path, tmp_path / "nope"))


def test_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    kernel = fake_bzimage(tmp_path / "vmlinuz-6.1.0-1-amd64", b"6.1.0-1-amd64")
    dynamic = Path(sys.executable).resolve()
    with pytest.raises(MissingResource, match="busybox-static"):
        asyncio.run(ensure_guest(tmp_path / "cache", kernel, busybox=dynamic))
