"""The run directory: where a run's raw observations and derived reports live.

Layout (every file is written atomically, appended line by line, or compressed
as a stream or once complete, so a run killed at any moment leaves only whole,
parseable artifacts)::

    RUN/                      mode 0700 (holds the QMP sockets while running);
                              its files get the umask's mode, so a collector
                              given access to the directory can read them
      scenario.toml           the resolved scenario, every default explicit
      run.json                identity, host and QEMU facts, decisions, outcome
      timeline.jsonl          what the driver did and saw, host wall-clock ns
                              and the controller's own CPU ns so far
      samples.jsonl.zst       query-migrate sampled on both sides
      src/ dst/               per QEMU: argv.json, cmdline.sh, stderr.log,
                              events.jsonl, serial.log, console.jsonl.zst,
                              threads.jsonl.zst,
                              (dst) trace.log.zst, ramblocks.txt,
                              (dst, hugetlb backings) smaps.jsonl.zst
      report.json             derived; rebuilt by ``migrator report RUN``

Compressed artifacts.  The streams that grow with a run's length and sampling
rates are zstd streams, ``NAME.zst``, with ``collect.compress = "zstd"`` (the
default): the guest consoles, the query-migrate, thread and smaps samples as
they are recorded (:class:`JsonlWriter`), the destination trace once its QEMU
has stopped (:mod:`migrator.hosts.compress`); with ``"none"`` they are the plain ``NAME`` as before,
and so are they in runs recorded before compression existed.  The small
journal (run.json, the timeline, the QMP events) and QEMU's own logs stay
plain, for reading by hand.  Every reader opens an artifact by its plain name
through :func:`open_artifact` (bytes) or :func:`open_artifact_text` (lines),
which read whichever form exists, so a report is the same from either.  A
stream cut short (its writer killed) reads up to its last whole zstd block, as
a plain file cut short reads up to its last whole line.  ``zstdcat FILE``
shows one.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, TextIO

import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from migrator.errors import ArtifactError

__all__ = [
    "FLUSH_INTERVAL_S",
    "ZST",
    "ZSTD_LEVEL",
    "JsonlWriter",
    "RunDir",
    "RunMeta",
    "artifact_path",
    "atomic_write",
    "open_artifact",
    "open_artifact_text",
    "timeline_record",
]

SIDES = ("src", "dst")
# A scenario names sides by role (source, destination); a run directory by its folder.
SIDE_OF_ROLE: dict[str, Literal["src", "dst"]] = {"source": "src", "destination": "dst"}
ROLE_OF_SIDE: dict[str, Literal["source", "destination"]] = {"src": "source",
                                                             "dst": "destination"}


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the whole new one.

    The data goes to a new file in the same directory, which is then renamed over
    ``path``.  That file is created as any other file of the process (mode 0666
    less the umask: 0644 under umask 022), not 0600 as a ``mkstemp`` file would
    be: readers that run as their own users (a collector, a web server) must be
    able to read it after the rename.  Its name, ``.NAME.RANDOM.tmp``, is hidden
    and ends in ``.tmp``, so nothing that scans the directory for ``*.json`` or
    ``*.prom`` (node_exporter's textfile collector) reads it meanwhile.
    """
    raw = data.encode() if isinstance(data, str) else data
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # a name another writer holds: draw another
            continue
        break
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: A compressed artifact's name: its plain name and this suffix (``samples.jsonl.zst``).
ZST = ".zst"
#: The zstd level of every compressed artifact.  The fastest level, and on these texts no
#: larger than the default (3): a 4 KiB-page run's 42 MB trace gave 2.7 MB at 1 and 3.2 MB at 3
#: (``zstd -1`` and ``zstd -3`` of a ``dst/trace.log`` kept by ``benchmarks/run_disk.py --keep``).
ZSTD_LEVEL = 1
#: Longest a record written to a compressed JSONL artifact waits in the compressor before it
#: is in the file (flushed as a zstd block): a controller killed outright loses at most the
#: records of its last second.  A block per record would cost ratio and CPU for nothing.
FLUSH_INTERVAL_S = 1.0


def artifact_path(path: Path) -> Path | None:
    """The file that holds the artifact ``path`` names: ``path`` itself, or ``path.zst``.

    None when neither exists (an artifact the run never wrote).
    """
    if path.exists():
        return path
    compressed = path.with_name(path.name + ZST)
    return compressed if compressed.exists() else None


class _Decompressed(io.RawIOBase):
    """The bytes of a zstd file, frame after frame; a cut final frame reads up to its last
    whole block (python-zstandard's reader stops there), corrupt data is an ArtifactError."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True)  # noqa: SIM115

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return int(self._reader.readinto(buffer))
        except zstandard.ZstdError as error:
            raise ArtifactError(f"{self._path}: not a readable zstd stream: {error}") from None

    def close(self) -> None:
        if not self.closed:
            self._reader.close()  # type: ignore[no-untyped-call]  # untyped in its stubs
        super().close()


def open_artifact(path: Path) -> BinaryIO:
    """The bytes of the artifact ``path`` names, plain or compressed (see module docstring).

    ``path`` is the plain name (``trace.log``), or a ``.zst`` file's own.
    FileNotFoundError when neither form exists.
    """
    found = artifact_path(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no such artifact (nor {path.name}{ZST})")
    if found.name.endswith(ZST):
        return io.BufferedReader(_Decompressed(found), buffer_size=1 << 20)
    return open(found, "rb")


def open_artifact_text(path: Path) -> TextIO:
    """The artifact ``path`` names as UTF-8 text (see :func:`open_artifact`)."""
    return io.TextIOWrapper(open_artifact(path), encoding="utf-8")


class JsonlWriter:
    """Appends one JSON object per line to a raw artifact being recorded.

    Plain (``path``), each line is flushed at once.  With ``compress``, the lines
    go into the zstd stream ``path.zst`` (:attr:`path`): a record reaches the file
    within :data:`FLUSH_INTERVAL_S` (a block is flushed then, by the running event
    loop; without one, after each record), and :meth:`close` ends the frame.
    """

    def __init__(self, path: Path, *, compress: bool = False) -> None:
        self.path = path.with_name(path.name + ZST) if compress else path
        self._file: IO[str] | None = None
        self._zstd: zstandard.ZstdCompressionWriter | None = None
        self._flush: asyncio.TimerHandle | None = None
        if compress:
            self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(
                open(self.path, "ab", buffering=0), closefd=True)  # noqa: SIM115
        else:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line."""
        self.append(json.dumps(record, separators=(",", ":")) + "\n")

    def append(self, line: str) -> None:
        """Append one line, already encoded as JSON and ending in a newline."""
        if self._zstd is None:
            assert self._file is not None
            self._file.write(line)
            self._file.flush()
            return
        self._zstd.write(line.encode())
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._flush_block()
                return
            self._flush = loop.call_later(FLUSH_INTERVAL_S, self._flush_block)

    def _flush_block(self) -> None:
        self._flush = None
        if self._zstd is not None and not self._zstd.closed:
            self._zstd.flush(zstandard.FLUSH_BLOCK)

    def close(self) -> None:
        """Close the file (a compressed stream's frame is ended first)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._zstd is not None:
            self._zstd.close()  # type: ignore[no-untyped-call]  # untyped in its stubs
        if self._file is not None:
            self._file.close()


class _Record(BaseModel):
    """A part of ``run.json``: the fields migrator reads, typed; any other field kept as is."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, strict=True)


class ControllerFacts(_Record):
    """The machine migrator ran on."""

    hostname: str | None = None
    kernel: str | None = None
    python: str | None = None


class QemuFacts(_Record):
    """One side's QEMU: binary, version, distribution package, capabilities."""

    binary: str | None = None
    version: str | None = None
    package: str | None = None
    root: str | None = None


class QemuPair(_Record):
    """Both sides' QEMU facts."""

    source: QemuFacts = QemuFacts()
    destination: QemuFacts = QemuFacts()


class AccelRecord(_Record):
    """The accelerator decision: what was asked, what was chosen, how, and why."""

    requested: str | None = None
    accel: str | None = None
    method: str | None = None
    reason: str | None = None


class PlanRecord(_Record):
    """The capabilities and parameters each side was given."""

    source_capabilities: dict[str, bool] = {}
    destination_capabilities: dict[str, bool] = {}
    source_parameters: dict[str, Any] = {}
    destination_parameters: dict[str, Any] = {}


class GuestRecord(_Record):
    """The guest that ran: kernel, initrd, probe."""

    kernel: str | None = None
    initrd: str | None = None
    kernel_release: str | None = None


class MigrationRecord(_Record):
    """How the migration ended on each side, and when post-copy was asked for."""

    source_status: str | None = None
    destination_status: str | None = None
    postcopy_requested_ns: int | None = None
    postcopy_skipped_reason: str | None = None


class ErrorRecord(_Record):
    """The error a failed run stopped with."""

    type: str | None = None
    message: str | None = None


class TeardownRecord(_Record):
    """How the teardown went: clean, or the releases that failed."""

    clean: bool
    problems: list[str] = []


class PlacedThread(_Record):
    """One QEMU thread as the placement saw it: the CPUs it should have and those it had."""

    tid: int
    name: str
    role: str
    """``vcpu``, ``migration``, ``main loop`` or ``other`` (``qemu.affinity.thread_role``)."""
    wanted: str
    """The CPU list it should have (the host's default where nothing was asked for it)."""
    cpus: str
    """Its ``Cpus_allowed_list`` as last read back from ``/proc/TID/status``."""
    pinned: bool = False
    """migrator set its affinity (False: it had the wanted CPUs already, e.g. inherited)."""
    first_seen_ns: int | None = None


class RamPlacement(_Record):
    """The guest RAM's NUMA binding as read back from ``/proc/PID/numa_maps``."""

    node: int
    policy: str | None = None
    """``bind:N`` when bound (None: the mapping was not found, see ``error``)."""
    pages: dict[str, int] = {}
    """Pages of the mapping present on each node, by node number."""
    page_kib: int | None = None
    error: str | None = None


class SidePlacementRecord(_Record):
    """One side's ``[placement.*]``: what was asked, and what its QEMU's threads had."""

    host: str | None = None
    asked: dict[str, Any] = {}
    launched_under: str | None = None
    """The CPU list QEMU was started under (``taskset -c``), None when it was not."""
    default_cpus: str | None = None
    """The CPUs a new process on the host gets: what "nothing asked" means there."""
    threads: list[PlacedThread] = []
    errors: list[str] = []
    memory: RamPlacement | None = None


class PlacementRecord(_Record):
    """Both sides' placement (a side without one is None)."""

    source: SidePlacementRecord | None = None
    destination: SidePlacementRecord | None = None


class RunMeta(_Record):
    """``run.json``: identity, host and QEMU facts, the decisions taken, and the outcome.

    The runner writes it as the run goes (``outcome`` is ``running`` until the
    end); every reader goes through this model.  Fields a run had no occasion to
    write (an older run, a run refused early) are None.
    """

    schema_version: int = Field(1, alias="schema")
    run_id: str
    scenario: str
    migrator_version: str | None = None
    migrator_commit: str | None = None
    started_ns: int | None = None
    finished_ns: int | None = None
    controller: ControllerFacts = ControllerFacts()
    outcome: str | None = None
    statement: str | None = None
    recoveries: int | None = None
    qemu: QemuPair = QemuPair()
    plan: PlanRecord = PlanRecord()
    hgm: dict[str, Any] | None = None
    accel: AccelRecord = AccelRecord()
    accel_by_host: dict[str, AccelRecord] | None = None
    host_dirs: dict[str, dict[str, Any]] | None = None
    guest: GuestRecord = GuestRecord()
    tls: dict[str, Any] | None = None
    placement: PlacementRecord | None = None
    migration: MigrationRecord = MigrationRecord()
    verify: dict[str, Any] | None = None
    guest_crash: dict[str, Any] | None = None
    error: ErrorRecord | None = None
    teardown: TeardownRecord | None = None

    @classmethod
    def read(cls, run_path: Path) -> RunMeta:
        """The ``run.json`` of a run directory; ArtifactError when missing or malformed."""
        return cls.read_with_document(run_path)[0]

    @classmethod
    def read_with_document(cls, run_path: Path) -> tuple[RunMeta, dict[str, Any]]:
        """``run.json`` validated, and as written (its keys in file order)."""
        path = run_path / "run.json"
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{path}: missing; is this a migrator run directory?") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{path}: not JSON: {error}") from None
        if not isinstance(document, dict):
            raise ArtifactError(f"{path}: not a JSON object")
        try:
            return cls.model_validate(document), document
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ArtifactError(f"{path}: {where}: {first['msg']}") from None

    def document(self) -> dict[str, Any]:
        """The JSON document, as ``run.json`` holds it (field names as written)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


@dataclass(frozen=True)
class RunDir:
    """One run's directory (see module docstring for the layout)."""

    path: Path

    @classmethod
    def create(cls, root: Path, scenario_name: str) -> RunDir:
        """A new, empty, private run directory under ``root``.

        Runs of one scenario started in the same second (repetitions of a parallel
        suite, or another migrator process) differ in the random suffix; a name
        already taken draws another, so no run ever shares a directory.
        """
        root.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        while True:
            path = root / f"{stamp}-{scenario_name}-{secrets.token_hex(2)}"
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                continue
            break
        for side in SIDES:
            (path / side).mkdir(mode=0o700)
        return cls(path.resolve())

    @property
    def run_id(self) -> str:
        """The directory's name, unique per run."""
        return self.path.name

    def side(self, side: str) -> Path:
        """Directory of one QEMU's artifacts (``src`` or ``dst``)."""
        return self.path / side

    def file(self, name: str) -> Path:
        """A top-level file of the run directory."""
        return self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        """Atomically write a JSON document at the top level."""
        target = self.path / name
        atomic_write(target, json.dumps(data, indent=2, sort_keys=False) + "\n")
        return target

    def read_json(self, name: str) -> Any:
        """Read a top-level JSON document."""
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def jsonl(self, name: str, *, compress: bool = False) -> JsonlWriter:
        """An appending JSONL writer for a top-level artifact (``name.zst`` if ``compress``)."""
        return JsonlWriter(self.path / name, compress=compress)


def now_ns() -> int:
    """Host wall clock in ns: the one timeline shared by QMP events, traces and the console."""
    return time.time_ns()


def timeline_record(what: str, details: dict[str, Any]) -> dict[str, Any]:
    """One ``timeline.jsonl`` record: the host wall clock, the step, its details.

    ``controller_cpu_ns`` is the controller process's own CPU time so far (user +
    system, every thread; QEMU and other child processes not), so what migrator
    itself costs per stretch of a run can be recomputed from the run directory.
    """
    return {"host_ns": now_ns(), "controller_cpu_ns": time.process_time_ns(), "what": what,
            **details}
