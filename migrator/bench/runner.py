"""Runs a suite's matrix one run at a time: resumable, filterable, every outcome recorded.

Output directory layout::

    DIR/
      suite.toml        the suite file as last run
      suite.json        state: per run id its status, run directory, error, timings
      bench.log         debug log of the whole suite (written by the CLI)
      runs/             one run directory per run (made by migrator.runner.run_scenario)

``suite.json`` is rewritten atomically before the first run and after every
run, so it is always whole and says what is finished even if the suite was
killed (with parallel runs, also as each starts and ends).  A run's status
is one of :class:`RunStatus`: ``pending`` (not yet tried), ``running`` (in
progress, or the suite died during it), ``done``, ``failed`` (its error message
is kept), ``skipped`` (left out by ``--only`` and never done) or
``unsupported`` (an HGM run the hosts cannot do; its reason is kept).  A
failed run never stops the rest.  ``resume`` re-runs every run of the
selection that is not ``done``, and a ``done`` run whose scenario changed
since (its resolved scenario's hash differs).

**Parallel runs.**  With ``parallel`` above 1 the runs are tasks of one
:class:`asyncio.TaskGroup` in this process, each waiting for its turn in a
:class:`~migrator.bench.schedule.Scheduler`: at most ``parallel`` at once, and
only as many on one kernel as its memory, hugepages and cores hold
(:mod:`migrator.bench.capacity`, read before the first run; a run that could
not run even alone is refused before anything starts).  Records stay in suite
order in ``suite.json`` whatever order runs finish in.  A run that is
interrupted stops the suite: every active run is cancelled (and tears down),
waiting ones stay ``pending``.  With ``parallel`` 1 nothing is probed: runs go
one at a time, as they always did.  Log records name their run
(:mod:`migrator.logcontext`).

The run function, the HGM check and the capacity probe are parameters so that
the resume, failure and scheduling logic is tested without QEMU;
:func:`run_and_report`, :func:`hgm_blocker` and
:func:`~migrator.bench.capacity.probe_capacity` are the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from migrator.bench.capacity import KernelCapacity, RunNeeds, needs_of, probe_capacity
from migrator.bench.schedule import Scheduler
from migrator.bench.suite import PlannedRun, Selection, Suite
from migrator.config.models import HostSpec, Scenario
from migrator.errors import ArtifactError, ConfigError, MigratorError, PreflightError
from migrator.hgm import detect_hgm
from migrator.logcontext import run_label
from migrator.metrics.run_artifacts import load_run_artifacts
from migrator.metrics.summary import build_report, derive_report, write_report
from migrator.qemu.probe import QemuFacts, probe_qemu
from migrator.rundir import RunDir, atomic_write
from migrator.runner import Observer, run_scenario, scenario_hosts

__all__ = [
    "STATE_FILE",
    "STATE_SCHEMA",
    "CapacityProbe",
    "HgmCheck",
    "RunFunction",
    "RunRecord",
    "RunStatus",
    "SuiteObserver",
    "SuiteState",
    "hgm_blocker",
    "load_state",
    "run_and_report",
    "run_suite",
]

log = logging.getLogger(__name__)

STATE_FILE = "suite.json"
STATE_SCHEMA = 1
RUNS_DIR = "runs"
UNSUPPORTED_PREFIX = "not supported on these hosts: "

# run_fn(scenario, runs_root, observer, on_rundir) -> the run directory.  It raises
# on failure; a MigratorError may carry the run directory as ``run_dir``.
RunFunction = Callable[[Scenario, Path, Observer, Callable[[RunDir], None]], Awaitable[Path]]
# hgm_check(scenario) -> None when HGM can be used, else why not.
HgmCheck = Callable[[Scenario], Awaitable[str | None]]
# capacity_probe(scenarios) -> each host entry's kernel capacity (see bench.capacity).
CapacityProbe = Callable[[Sequence[Scenario]], Awaitable[Mapping[HostSpec, KernelCapacity]]]


class RunStatus(StrEnum):
    """Where one run of the matrix stands (see the module docstring)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNSUPPORTED = "unsupported"


class RunRecord(BaseModel):
    """One run's entry in ``suite.json``."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    labels: dict[str, str]
    repetition: int
    hgm: bool = False
    scenario_sha256: str
    status: RunStatus = RunStatus.PENDING
    run_dir: str | None = None
    error: str | None = None
    error_type: str | None = None
    reason: str | None = None
    started: str | None = None
    finished: str | None = None
    duration_s: float | None = None
    attempts: int = 0

    def path(self, out_dir: Path) -> Path | None:
        """The run directory (stored relative to the suite directory when inside it)."""
        return None if self.run_dir is None else out_dir / self.run_dir


class SuiteState(BaseModel):
    """Everything ``suite.json`` holds."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = STATE_SCHEMA
    suite: str
    description: str = ""
    source: str
    repetitions: int
    created: str
    updated: str
    only: list[str] = []
    runs: dict[str, RunRecord] = {}

    def save(self, out_dir: Path) -> Path:
        """Write ``DIR/suite.json`` atomically."""
        self.updated = _now()
        target = out_dir / STATE_FILE
        atomic_write(target, self.model_dump_json(indent=2) + "\n")
        return target

    def count(self, status: RunStatus, ids: Sequence[str] | None = None) -> int:
        """How many runs (of ``ids``, default all) have ``status``."""
        chosen = self.runs.values() if ids is None else (self.runs[i] for i in ids)
        return sum(1 for record in chosen if record.status is status)


class SuiteObserver(Observer):
    """Progress of a suite; the run's own phases arrive through :class:`Observer`."""

    def suite_started(self, todo: Sequence[PlannedRun], state: SuiteState) -> None:
        """The runs about to be tried, in order (finished ones already left out)."""

    def run_started(self, index: int, run: PlannedRun) -> None:
        """Run ``index`` (1-based, of the ``todo`` list) starts."""

    def run_observer(self, index: int, run: PlannedRun) -> Observer:
        """What receives run ``index``'s own progress (phases, samples); default: this one."""
        return self

    def run_directory(self, index: int, run: PlannedRun, path: Path) -> None:
        """Run ``index`` has its run directory at ``path``."""

    def run_finished(self, index: int, run: PlannedRun, record: RunRecord) -> None:
        """Run ``index`` ended: ``record`` says how (not called when it was interrupted)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def load_state(out_dir: Path) -> SuiteState:
    """Read ``DIR/suite.json``; :class:`ArtifactError` if it is missing or malformed."""
    path = out_dir / STATE_FILE
    try:
        return SuiteState.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; is this a 'migrator bench' directory?") from None
    except ValueError as error:
        raise ArtifactError(f"{path}: not a suite state file: {error}") from None


def _suite_dir(out_dir: Path) -> Path:
    """``out_dir`` made and resolved the way RunDir resolves run directories.

    Run directories are recorded relative to it, so both must name the same path.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir.resolve()


def _open_state(suite: Suite, out_dir: Path, resume: bool, only: Sequence[str]) -> SuiteState:
    """The state to continue (``resume``) or a new one; records for every planned run."""
    if (out_dir / STATE_FILE).exists():
        if not resume:
            raise ConfigError(f"{out_dir} already holds a suite ({STATE_FILE}); pass --resume "
                              "to continue it or choose another --out", field="--out")
        state = load_state(out_dir)
        if state.suite != suite.name:
            raise ConfigError(f"{out_dir} holds suite {state.suite!r}, not {suite.name!r}; "
                              "choose another --out", field="--out")
        state.description, state.source = suite.description, suite.source
        state.repetitions = suite.repetitions
    else:
        now = _now()
        state = SuiteState(suite=suite.name, description=suite.description, source=suite.source,
                           repetitions=suite.repetitions, created=now, updated=now)
    state.only = list(only)
    for run in suite.runs:
        record = state.runs.get(run.run_id)
        if record is None:
            state.runs[run.run_id] = RunRecord(
                run_id=run.run_id, labels=dict(run.labels), repetition=run.repetition,
                hgm=run.hgm, scenario_sha256=run.scenario_sha256)
        elif record.scenario_sha256 != run.scenario_sha256:
            # The suite changed under a run: what it recorded no longer answers for it.
            if record.status is RunStatus.DONE:
                log.warning("%s: scenario changed since it ran (%s); running it again",
                            run.run_id, record.run_dir)
            record.status = RunStatus.PENDING
            record.scenario_sha256 = run.scenario_sha256
            record.hgm = run.hgm
    return state


async def run_and_report(
    scenario: Scenario, runs_root: Path, observer: Observer,
    on_rundir: Callable[[RunDir], None], *, html: bool = False,
) -> Path:
    """The real run: :func:`run_scenario`, then ``report.json`` (and ``report.html``).

    After a failed run the report is still derived as far as the raw artifacts
    allow (as ``migrator run`` does); a run that cannot be reported is logged.
    The reports are derived in a worker thread: runs of a parallel suite go on
    sampling meanwhile, which a report blocking the event loop would stall.
    """
    holder: list[Path] = []

    def remember(run: RunDir) -> None:
        holder.append(run.path)
        on_rundir(run)

    try:
        run = await run_scenario(scenario, runs_root, observer, on_rundir=remember)
    except MigratorError:
        if holder:
            try:
                await asyncio.to_thread(_write_partial_report, holder[0])
            except MigratorError as error:
                log.warning("%s: no partial report: %s", holder[0], error)
        raise
    await asyncio.to_thread(_write_reports, run.path, html)
    return run.path


def _write_partial_report(run_dir: Path) -> None:
    write_report(run_dir, build_report(run_dir))


def _write_reports(run_dir: Path, html: bool) -> None:
    """``report.json`` of a finished run, and ``report.html`` with ``html``."""
    artifacts = load_run_artifacts(run_dir)
    report = derive_report(artifacts)
    write_report(run_dir, report)
    if html:
        from migrator.metrics.run_page import load_run_page_data
        from migrator.report.html import write_run_html

        try:
            write_run_html(run_dir, load_run_page_data(artifacts, report))
        except MigratorError as error:
            # The run itself is fine; a missing page must not turn it into a failure.
            log.warning("%s: no HTML report: %s", run_dir, error)


async def hgm_blocker(scenario: Scenario) -> str | None:
    """Why ``scenario`` cannot run with HGM on its hosts, or None when it can.

    Each host is checked with :func:`detect_hgm` (kernel MADV_SPLIT probe and
    the QEMU's ``hugetlb-doublemap`` capability, from :func:`probe_qemu`); a
    scenario model without ``vm.hgm`` is a reason too, as migrator then cannot
    turn HGM on.
    """
    reasons: list[str] = []
    async with scenario_hosts(scenario) as (source, destination):
        hosts = [source] if destination is source else [source, destination]
        for host in hosts:
            qemu: QemuFacts | None = None
            qemu_error = ""
            try:
                qemu = await probe_qemu(host, scenario.vm.qemu, scenario.vm.qemu_root)
            except MigratorError as error:
                qemu_error = f"QEMU not probed: {error}"
            support = await detect_hgm(host, qemu)
            if support.supported:
                continue
            why = "; ".join(part for part in (support.reason, qemu_error) if part)
            # One machine playing both roles needs no name; two hosts do.
            reasons.append(why if len(hosts) == 1 else f"{host.name}: {why}")
    return "; ".join(reasons) or None


class _HgmCache:
    """One HGM verdict per (hosts, QEMU): the probe reserves a hugepage and takes seconds."""

    def __init__(self, check: HgmCheck) -> None:
        self._check = check
        self._verdicts: dict[str, str | None] = {}
        # Parallel runs asking at once wait for the first one's answer.
        self._locks: dict[str, asyncio.Lock] = {}

    async def blocker(self, scenario: Scenario) -> str | None:
        key = scenario.hosts.model_dump_json() + scenario.vm.qemu + str(scenario.vm.qemu_root)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._verdicts:
                self._verdicts[key] = await self._check(scenario)
        return self._verdicts[key]


async def _attempt(
    run: PlannedRun, record: RunRecord, out_dir: Path, run_fn: RunFunction, hgm: _HgmCache,
    observer: Observer, save: Callable[[], None], on_path: Callable[[Path], None],
) -> None:
    """Try one run and record its outcome in ``record`` (never raises for a run's failure)."""
    record.status = RunStatus.RUNNING
    record.attempts += 1
    record.started, record.finished, record.duration_s = _now(), None, None
    record.run_dir = record.error = record.error_type = record.reason = None
    save()
    started = time.monotonic()

    def on_rundir(rundir: RunDir) -> None:
        # Recorded before anything runs, so even a killed suite points at the artifacts.
        try:
            record.run_dir = str(rundir.path.relative_to(out_dir))
        except ValueError:
            record.run_dir = str(rundir.path)
        save()
        on_path(rundir.path)

    try:
        reason = await hgm.blocker(run.scenario) if run.hgm else None
        if reason is not None:
            record.status = RunStatus.UNSUPPORTED
            record.reason = UNSUPPORTED_PREFIX + reason
        else:
            await run_fn(run.scenario, out_dir / RUNS_DIR, observer, on_rundir)
            record.status = RunStatus.DONE
    except MigratorError as error:
        record.status = RunStatus.FAILED
        record.error, record.error_type = str(error), type(error).__name__
        log.warning("%s failed: %s", run.run_id, error)
    except (asyncio.CancelledError, KeyboardInterrupt):
        record.status = RunStatus.FAILED
        record.error, record.error_type = "interrupted", "Interrupted"
        raise
    except Exception as error:
        # A bug hit by one combination must not cost the rest of the suite; the
        # traceback goes to the log.
        log.exception("%s: unexpected error", run.run_id)
        record.status = RunStatus.FAILED
        record.error, record.error_type = f"{type(error).__name__}: {error}", type(error).__name__
    finally:
        record.finished = _now()
        record.duration_s = round(time.monotonic() - started, 3)
        save()


class _Interrupted(Exception):
    """A run was interrupted by itself (not by the suite's cancellation): stop the suite."""


async def run_suite(
    suite: Suite, out_dir: Path, *, resume: bool = False, selection: Selection | None = None,
    only: Sequence[str] = (), observer: SuiteObserver | None = None,
    run_fn: RunFunction | None = None, hgm_check: HgmCheck | None = None,
    parallel: int = 1, vcpus_per_core: int = 1, capacity_probe: CapacityProbe | None = None,
) -> SuiteState:
    """Run the selected part of ``suite`` into ``out_dir`` (see the module docstring).

    ``only`` is the ``--only`` text, kept in the state for the record.
    ``parallel`` runs at most that many at once, as the hosts' capacity allows
    (``vcpus_per_core``: see :mod:`migrator.bench.capacity`); a run that could
    never fit is a :class:`PreflightError` before anything runs.  Returns the
    final state; the caller decides the exit status from it.
    """
    if parallel < 1 or vcpus_per_core < 1:
        raise ConfigError("must be at least 1",
                          field="--parallel" if parallel < 1 else "--vcpus-per-core")
    observer = observer or SuiteObserver()
    run_fn = run_fn or run_and_report
    hgm = _HgmCache(hgm_check or hgm_blocker)
    out_dir = _suite_dir(out_dir)
    state = _open_state(suite, out_dir, resume, only)
    chosen = {run.run_id for run in suite.select(selection)}
    todo: list[PlannedRun] = []
    for run in suite.runs:
        record = state.runs[run.run_id]
        if record.status is RunStatus.DONE:
            continue
        if run.run_id in chosen:
            record.status = RunStatus.PENDING
            todo.append(run)
        else:
            record.status = RunStatus.SKIPPED
    scheduler, needs = await _schedule(todo, parallel, vcpus_per_core,
                                       capacity_probe or probe_capacity)
    atomic_write(out_dir / "suite.toml", _suite_text(suite))
    state.save(out_dir)
    observer.suite_started(todo, state)

    def save() -> None:
        state.save(out_dir)

    async def one(index: int, run: PlannedRun) -> None:
        record = state.runs[run.run_id]
        with run_label(run.run_id):
            async with scheduler.slot(index, needs[index - 1]):
                observer.run_started(index, run)
                try:
                    await _attempt(run, record, out_dir, run_fn, hgm,
                                   observer.run_observer(index, run), save,
                                   lambda path: observer.run_directory(index, run, path))
                except asyncio.CancelledError:
                    # The suite stops: no waiting run may take the slot this one leaves.
                    scheduler.close()
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    raise _Interrupted(run.run_id) from None
                observer.run_finished(index, run, record)

    try:
        async with asyncio.TaskGroup() as group:
            for index, run in enumerate(todo, 1):
                group.create_task(one(index, run))
    except BaseExceptionGroup as errors:
        interrupted, rest = errors.split(_Interrupted)
        if rest is not None:
            raise rest from None
        assert interrupted is not None
        raise asyncio.CancelledError from None
    return state


async def _schedule(
    todo: Sequence[PlannedRun], parallel: int, vcpus_per_core: int, probe: CapacityProbe,
) -> tuple[Scheduler, list[RunNeeds]]:
    """The scheduler and each run's needs; with ``parallel`` above 1, the hosts are probed.

    :class:`PreflightError` names the first run that could never fit its hosts.
    """
    if parallel == 1 or not todo:
        return Scheduler(1), [RunNeeds() for _ in todo]
    capacity = await probe([run.scenario for run in todo])
    kernel_of = {spec: kernel.kernel for spec, kernel in capacity.items()}
    scheduler = Scheduler(parallel, {kernel.kernel: kernel for kernel in capacity.values()},
                          vcpus_per_core)
    needs = [needs_of(run.scenario, kernel_of) for run in todo]
    refused = [(run, reason) for run, run_needs in zip(todo, needs, strict=True)
               if (reason := scheduler.why_not_alone(run_needs)) is not None]
    if refused:
        run, reason = refused[0]
        more = f" (and {len(refused) - 1} more runs)" if len(refused) > 1 else ""
        raise PreflightError(f"run {run.run_id} cannot run on its hosts even alone: {reason}"
                             f"{more}; fix: shrink vm.memory_mib or free memory there")
    for kernel in scheduler.kernels.values():
        log.info("capacity of %s: %d cores, MemAvailable %d MiB, free hugepages %s",
                 kernel.name, kernel.cpus, kernel.mem_available_mib,
                 dict(kernel.free_hugepages) or "-")
    return scheduler, needs


def _suite_text(suite: Suite) -> str:
    """The suite file's text (kept beside the results), or a note when it has no file."""
    path = Path(suite.source)
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return f"# suite {suite.name} was not read from a file ({suite.source})\n"
