"""Build the microguest: a distribution kernel plus a busybox initramfs with the probe.

The guest is the host's own kernel image (``/boot/vmlinuz-*``, e.g. Debian's
``linux-image-cloud-amd64``) and an initramfs made here from three inputs:
``guests/init`` (the ``/init`` script), ``guests/probe/migrator-probe.c``
(compiled with ``gcc -static``) and the host's static busybox.  The initramfs
is cached under a key hashed from those inputs and the compiler version, so
repeated runs reuse it, and is published atomically (built in a temporary
directory, then renamed) so concurrent runs never see half an artifact.

The cpio archive is written here rather than by ``cpio(1)``: that lets it hold
``/dev/console`` without ``mknod`` (the kernel opens it for PID 1 before
``/init`` can mount devtmpfs), and makes the archive byte-for-byte reproducible
(uid 0, mtime 0).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from migrator.errors import ConfigError, GuestBuildError, MissingResource, output_tail

__all__ = ["GuestArtifacts", "ensure_guest", "find_kernel", "kernel_cmdline", "kernel_release"]

log = logging.getLogger(__name__)

#: Bump when the build recipe changes in a way the hashed inputs do not show.
BUILD_FORMAT = 1
CFLAGS = ("-static", "-O2", "-pthread", "-Wall", "-Wextra")
DEFAULT_SOURCE_DIR = Path(__file__).resolve().parents[2] / "guests"
PROBE_SOURCE = Path("probe") / "migrator-probe.c"
INIT_SCRIPT = Path("init")
PROBE_PATH_IN_GUEST = "bin/migrator-probe"
INITRD_NAME = "initrd.img"
MANIFEST_NAME = "manifest.json"
KERNEL_FIX = "apt-get install linux-image-cloud-amd64"
# What /init and the serial protocol rely on; checked when /boot/config-<release> exists.
REQUIRED_KERNEL_CONFIG = (
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS",
    "CONFIG_SERIAL_8250",
    "CONFIG_SERIAL_8250_CONSOLE",
)
PATTERNS = ("sequential", "random")
MODES = ("run", "boot")


@dataclass(frozen=True)
class GuestArtifacts:
    """A bootable microguest: pass ``-kernel kernel -initrd initrd`` to QEMU."""

    kernel: Path
    initrd: Path
    #: sha256 of the probe's C source, to tie results to the workload that made them.
    probe_sha256: str
    #: ``uname -r`` of the guest kernel, read from the image's own header.
    kernel_release: str


async def ensure_guest(
    cache_dir: Path,
    kernel: Path | None = None,
    *,
    source_dir: Path = DEFAULT_SOURCE_DIR,
    busybox: Path = Path("/bin/busybox"),
    cc: str = "gcc",
) -> GuestArtifacts:
    """Return the microguest for ``kernel`` (default: newest ``/boot/vmlinuz-*``).

    Builds the initramfs into ``cache_dir`` unless an identical build is
    already there.  Raises :class:`MissingResource` when the kernel, busybox or
    the compiler is absent, :class:`ConfigError` (``guest.kernel``) when a
    ``kernel`` given exists but is not a regular file or not an x86 bzImage,
    :class:`GuestBuildError` when a build step fails.
    """
    kernel_path, release = await asyncio.to_thread(_locate_kernel, kernel)
    cc_path = await asyncio.to_thread(shutil.which, cc)
    if cc_path is None:
        raise MissingResource(f"C compiler {cc!r} not found; apt-get install gcc")
    cc_version = await _run([cc_path, "--version"])
    probe_source, init_script, busybox_image = await asyncio.to_thread(
        _read_inputs, source_dir, busybox
    )
    probe_sha = hashlib.sha256(probe_source).hexdigest()
    key = hashlib.sha256(
        json.dumps(
            {
                "format": BUILD_FORMAT,
                "cflags": CFLAGS,
                "cc": cc_version,
                "probe": probe_sha,
                "init": hashlib.sha256(init_script).hexdigest(),
                "busybox": hashlib.sha256(busybox_image).hexdigest(),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    out_dir = cache_dir / f"guest-{key[:24]}"
    initrd = out_dir / INITRD_NAME
    if await asyncio.to_thread((out_dir / MANIFEST_NAME).is_file):
        log.debug("reusing microguest initramfs %s", initrd)
    else:
        await _build(
            out_dir,
            probe_source=probe_source,
            init_script=init_script,
            busybox=busybox,
            busybox_image=busybox_image,
            cc=cc_path,
            manifest={"key": key, "probe_sha256": probe_sha, "cc": cc_version.splitlines()[0]},
        )
        log.info("built microguest initramfs %s", initrd)
    return GuestArtifacts(
        kernel=kernel_path, initrd=initrd, probe_sha256=probe_sha, kernel_release=release
    )


def kernel_cmdline(
    *,
    working_set_mib: int,
    write_pct: int,
    pattern: str,
    stall_threshold_us: int,
    heartbeat_ms: int,
    threads: int = 0,
    mode: str = "run",
) -> str:
    """Return the guest kernel command line (``-append``) for one probe run.

    ``threads=0`` runs one worker per online vCPU.  ``mode="boot"`` only
    prints the boot line and powers off (an accelerator smoke test).  Values
    the probe would reject raise :class:`ConfigError` here, before QEMU runs.
    """
    checks = (
        ("working_set_mib", working_set_mib, 1, 1 << 20),
        ("write_pct", write_pct, 0, 100),
        ("stall_threshold_us", stall_threshold_us, 1, 60_000_000),
        ("heartbeat_ms", heartbeat_ms, 1, 60_000),
        ("threads", threads, 0, 256),
    )
    for name, value, low, high in checks:
        if not low <= value <= high:
            raise ConfigError(f"{value} is outside {low}..{high}", field=name)
    if pattern not in PATTERNS:
        raise ConfigError(f"{pattern!r} is not one of {', '.join(PATTERNS)}", field="pattern")
    if mode not in MODES:
        raise ConfigError(f"{mode!r} is not one of {', '.join(MODES)}", field="mode")
    return " ".join(
        (
            # The probe's channel; quiet keeps kernel chatter (which may land in
            # the middle of a probe line) to warnings and worse.
            "console=ttyS0",
            "quiet",
            # A panic reboots at once, and QEMU's -no-reboot turns that into an exit;
            # oops=panic makes a kernel oops (e.g. guest memory corrupted by a broken
            # migration) end the VM too instead of leaving a half-dead guest.
            "panic=-1",
            "oops=panic",
            # Under TCG every vCPU reads QEMU's one tick counter, yet the guest's
            # TSC sync check fails and it falls back to the HPET: each
            # clock_gettime() then becomes a syscall plus an emulated MMIO read
            # under QEMU's big lock (measured: 6x fewer accesses/s and a 4 ms
            # gap every 8 ms on every vCPU).  With the TSC it stays in the vDSO.
            "tsc=reliable",
            f"migrator.ws_mib={working_set_mib}",
            f"migrator.write_pct={write_pct}",
            f"migrator.pattern={pattern}",
            f"migrator.stall_us={stall_threshold_us}",
            f"migrator.hb_ms={heartbeat_ms}",
            f"migrator.threads={threads}",
            f"migrator.mode={mode}",
        )
    )


# --------------------------------------------------------------------------
# Kernel


def find_kernel(boot_dir: Path = Path("/boot")) -> Path:
    """Return the newest ``vmlinuz-*`` in ``boot_dir`` by version order."""
    candidates = [p for p in boot_dir.glob("vmlinuz-*") if p.is_file()]
    if not candidates:
        raise MissingResource(f"no guest kernel: {boot_dir}/vmlinuz-* does not exist; {KERNEL_FIX}")
    return max(candidates, key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")))


def kernel_release(kernel: Path) -> str:
    """Return ``uname -r`` of an x86 bzImage, read from its setup header.

    The boot protocol's ``kernel_version`` field (offset 0x20E) points, relative
    to 0x200, at the kernel's version string; its first word is the release.
    """
    with kernel.open("rb") as f:
        head = f.read(0x10000)
    if head[0x202:0x206] != b"HdrS":
        raise GuestBuildError(f"{kernel} is not a Linux kernel image (no x86 bzImage header)")
    (pointer,) = struct.unpack_from("<H", head, 0x20E)
    start = 0x200 + pointer
    end = head.find(b"\0", start)
    words = head[start:end].decode("ascii", "replace").split() if pointer and end > 0 else []
    if not words:
        raise GuestBuildError(f"{kernel}: bzImage header has no version string")
    return words[0]


def _version_key(release: str) -> tuple[tuple[int, int | str], ...]:
    # Tag each part so numbers and words never get compared with each other.
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", release)
    )


# What a path that exists but is not a regular file is, by its stat mode.
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
               (stat.S_ISSOCK, "a socket"))


def _not_a_kernel(problem: str) -> ConfigError:
    """The scenario's ``guest.kernel`` names something that is not a kernel: bad input."""
    return ConfigError(f"{problem}; point it at an x86 bzImage such as /boot/vmlinuz-*, or "
                       "remove it for the newest one", field="guest.kernel")


def _locate_kernel(kernel: Path | None) -> tuple[Path, str]:
    given = kernel is not None
    if kernel is None:
        kernel = find_kernel()
    elif not kernel.exists():
        raise MissingResource(f"guest kernel {kernel} does not exist; {KERNEL_FIX}")
    elif not kernel.is_file():
        mode = kernel.stat().st_mode
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "another kind of file")
        raise _not_a_kernel(f"{kernel} is not a regular file (it is {kind})")
    try:
        release = kernel_release(kernel)
    except OSError as exc:
        raise GuestBuildError(f"cannot read guest kernel {kernel}: {exc}") from exc
    except GuestBuildError as exc:
        if not given:
            raise
        # The scenario named a file that is not a kernel: its value is what to fix.
        raise _not_a_kernel(str(exc)) from None
    config = kernel.parent / f"config-{release}"
    if config.is_file():
        text = config.read_text(errors="replace")
        missing = [opt for opt in REQUIRED_KERNEL_CONFIG if f"\n{opt}=y" not in f"\n{text}"]
        if missing:
            raise GuestBuildError(
                f"guest kernel {kernel} lacks built-in {', '.join(missing)} "
                f"(per {config}); {KERNEL_FIX}"
            )
    return kernel.resolve(), release


# --------------------------------------------------------------------------
# Inputs and build


def _read_inputs(source_dir: Path, busybox: Path) -> tuple[bytes, bytes, bytes]:
    for path in (source_dir / PROBE_SOURCE, source_dir / INIT_SCRIPT):
        if not path.is_file():
            raise MissingResource(f"microguest source {path} does not exist")
    if not busybox.is_file():
        raise MissingResource(f"{busybox} does not exist; apt-get install busybox-static")
    if not _is_static_elf(busybox):
        # Debian's plain "busybox" package is dynamic and cannot run in an
        # initramfs without a libc.
        raise MissingResource(
            f"{busybox} is not a static executable; apt-get install busybox-static"
        )
    return (
        (source_dir / PROBE_SOURCE).read_bytes(),
        (source_dir / INIT_SCRIPT).read_bytes(),
        busybox.read_bytes(),
    )


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP (dynamic loader)."""
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return False
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


async def _build(
    out_dir: Path,
    *,
    probe_source: bytes,
    init_script: bytes,
    busybox: Path,
    busybox_image: bytes,
    cc: str,
    manifest: dict[str, str],
) -> None:
    await asyncio.to_thread(out_dir.parent.mkdir, parents=True, exist_ok=True)
    tmp = Path(
        await asyncio.to_thread(tempfile.mkdtemp, prefix=f".{out_dir.name}-", dir=out_dir.parent)
    )
    try:
        # Build from the bytes that were hashed, not whatever the files hold now.
        source = tmp / "migrator-probe.c"
        probe = tmp / "migrator-probe"
        await asyncio.to_thread(source.write_bytes, probe_source)
        warnings = await _run([cc, *CFLAGS, "-o", str(probe), str(source)])
        if warnings.strip():
            log.warning("probe compiled with diagnostics: %s", output_tail(warnings))
        if not await asyncio.to_thread(_is_static_elf, probe):
            raise GuestBuildError(f"{cc} -static produced a dynamically linked probe")
        applets = (await _run([str(busybox), "--list-full"])).split()
        if not any(a.endswith("/sh") for a in applets):
            raise GuestBuildError(f"{busybox} --list-full has no sh applet")
        await asyncio.to_thread(
            _write_initramfs,
            tmp / INITRD_NAME,
            init_script=init_script,
            busybox=busybox_image,
            probe=probe,
            applets=applets,
        )
        await asyncio.to_thread(
            (tmp / MANIFEST_NAME).write_text, json.dumps(manifest, indent=2) + "\n"
        )
        # mkdtemp made it 0700; QEMU may run as another user.
        await asyncio.to_thread(tmp.chmod, 0o755)
        await asyncio.to_thread(_publish, tmp, out_dir)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def _publish(tmp: Path, out_dir: Path) -> None:
    try:
        tmp.rename(out_dir)
    except OSError:
        # Another run published the same key first; its content is identical.
        if not (out_dir / MANIFEST_NAME).is_file():
            raise


async def _run(argv: Sequence[str]) -> str:
    """Run ``argv``, return stdout+stderr; raise GuestBuildError on failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        raise GuestBuildError(f"cannot run {shlex.join(argv)}: {exc}") from exc
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = output_tail(text)
        raise GuestBuildError(
            f"{shlex.join(argv)} failed (exit {proc.returncode})" + (f": {tail}" if tail else "")
        )
    return text


# --------------------------------------------------------------------------
# newc cpio


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _write_initramfs(
    dest: Path, *, init_script: bytes, busybox: bytes, probe: Path, applets: Iterable[str]
) -> None:
    ours = {"init", "bin/busybox", PROBE_PATH_IN_GUEST}
    links = sorted({a.strip("/") for a in applets} - ours)
    dirs = {"dev", "proc", "sys", "tmp", "root", "etc", "bin", "sbin", "usr/bin", "usr/sbin"}
    for path in (*links, PROBE_PATH_IN_GUEST):
        parent = Path(path).parent
        while parent != Path("."):
            dirs.add(str(parent))
            parent = parent.parent
    entries = [_Entry(d, stat.S_IFDIR | 0o755) for d in sorted(dirs)]
    entries += [
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("init", stat.S_IFREG | 0o755, init_script),
        _Entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        _Entry(PROBE_PATH_IN_GUEST, stat.S_IFREG | 0o755, probe.read_bytes()),
    ]
    entries += [_Entry(link, stat.S_IFLNK | 0o777, b"/bin/busybox") for link in links]
    raw = io.BytesIO()
    for ino, entry in enumerate(entries, start=1):
        _write_cpio_entry(raw, ino, entry)
    _write_cpio_entry(raw, 0, _Entry("TRAILER!!!", 0))
    # mtime=0 keeps the archive reproducible; level 6 is gzip's default trade-off.
    with dest.open("wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=6) as gz:
            gz.write(raw.getvalue())
        # The directory is renamed into place next: its content must be on disk first.
        f.flush()
        os.fsync(f.fileno())


def _write_cpio_entry(out: io.BytesIO, ino: int, entry: _Entry) -> None:
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check (newc, not crc)
    )
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out.write(header + name)
    out.write(b"\0" * (-(len(header) + len(name)) % 4))
    out.write(entry.data)
    out.write(b"\0" * (-len(entry.data) % 4))
