"""The run directory: where a run's raw observations and derived reports live.

Layout (every file is written atomically or appended line by line, so a run
killed at any moment leaves only whole, parseable artifacts)::

    RUN/                      mode 0700 (holds the QMP sockets while running);
                              its files get the umask's mode, so a collector
                              given access to the directory can read them
      scenario.toml           the resolved scenario, every default explicit
      run.json                identity, host and QEMU facts, decisions, outcome
      timeline.jsonl          what the driver did and saw, host wall-clock ns
                              and the controller's own CPU ns so far
      samples.jsonl           query-migrate sampled on both sides
      src/ dst/               per QEMU: argv.json, cmdline.sh, stderr.log,
                              events.jsonl, serial.log, console.jsonl,
                              (dst) trace.log, ramblocks.txt,
                              (dst, hugetlb backings) smaps.jsonl
      report.json             derived; rebuilt by ``migrator report RUN``
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from migrator.errors import ArtifactError

__all__ = ["JsonlWriter", "RunDir", "RunMeta", "atomic_write", "timeline_record"]

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


class JsonlWriter:
    """Appends one JSON object per line and flushes each (a raw artifact being recorded)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line."""
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
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

    def jsonl(self, name: str) -> JsonlWriter:
        """An appending JSONL writer for a top-level artifact."""
        return JsonlWriter(self.path / name)


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
