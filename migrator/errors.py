"""The one exception tree of migrator.

Every error migrator raises on purpose derives from :class:`MigratorError` and
carries the data an operator needs to act (argv, exit status, output tail, QMP
error class).  The CLI prints ``str(error)`` as one line and exits with
``error.exit_code``; anything else is a bug and shows a traceback.

::

    MigratorError                   (exit 1 unless a subclass says otherwise)
     +-- ConfigError                 scenario file or option invalid (exit 2)
     +-- StoreError                  the results store cannot be opened or written (exit 2)
     +-- PreflightError              the host cannot run the scenario (exit 3)
     |    +-- HugepageShortfall      not enough free hugepages of a size
     |    +-- MissingCapability      QEMU lacks a migration capability
     |    +-- MissingResource        binary, kernel or file not found
     +-- HostError                   a command on a host failed
     +-- GuestBuildError             the microguest could not be built
     +-- QemuError                   a QEMU process misbehaved
     |    +-- QemuLaunchError        QEMU exited or never opened its QMP socket
     |    +-- QemuExitedError        QEMU died while it was needed
     |    +-- QmpConnectionLost      the QMP connection dropped mid-command
     +-- QmpCommandError             a QMP command returned an error
     +-- QmpTimeout                  a QMP command got no reply in time
     +-- MigrationError              migration failed, was cancelled or stalled
     |    +-- MigrationTimeout       a phase did not finish in time
     +-- GuestError                  the guest probe reported a problem
     |    +-- IntegrityError         pages hold wrong content after the migration
     +-- ArtifactError               a raw artifact is missing or malformed
     +-- RunFailed                   a run failed after something booted: its outcome's
                                     exit code (4, 5 or 7, see migrator.outcome)

Once a run has booted anything, every error of it ends as :class:`RunFailed`, whose exit
code is its outcome's: so 4 and 5 mean an outcome, never an exception class.
:class:`ExitCode` is the one table of exit codes; the CLI, the outcomes and the docs
(``docs/operator.md``, checked by a test) use it.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from enum import IntEnum

__all__ = [
    "ArtifactError",
    "ConfigError",
    "ExitCode",
    "GuestBuildError",
    "GuestError",
    "HostError",
    "HugepageShortfall",
    "IntegrityError",
    "MigrationError",
    "MigrationTimeout",
    "MigratorError",
    "MissingCapability",
    "MissingResource",
    "PreflightError",
    "QemuError",
    "QemuExitedError",
    "QemuLaunchError",
    "QmpCommandError",
    "QmpConnectionLost",
    "QmpTimeout",
    "RunFailed",
    "StoreError",
]


class ExitCode(IntEnum):
    """Every exit status a migrator command gives: the one table.

    ``migrator run`` gives one per outcome (``migrator.outcome.EXIT_CODES``); the
    results commands use 0, 1 and 2 with the meanings below.
    """

    OK = 0
    """Done: a run completed with every page verified; a command did all it was asked."""
    FAILED = 1
    """A host could not be used; ``compare``/``dashboard``: a metric regressed;
    ``results import``: some directory is not a finished run; a suite had failed runs."""
    BAD_INPUT = 2
    """A scenario, option, selector or run directory is invalid, or the store unusable."""
    PREFLIGHT = 3
    """The hosts cannot run the scenario, or its QEMU is known bad for the plan."""
    FAILED_BEFORE_SWITCHOVER = 4
    """Outcome ``failed-before-switchover``: the guest never left the source."""
    FAILED_AFTER_SWITCHOVER = 5
    """Outcome ``failed-after-switchover``: the switch happened, then the run failed."""
    COMPLETED_AFTER_RECOVERY = 6
    """Outcome ``completed-after-recovery``: completed, after post-copy paused and recovered."""
    COMPLETED_WITHOUT_POSTCOPY = 7
    """Outcome ``completed-without-postcopy``: pre-copy completed before post-copy began."""
    INTERRUPTED_SIGINT = 130
    """Ctrl-C (128 + SIGINT, as a shell reports it); everything torn down."""
    INTERRUPTED_SIGTERM = 143
    """SIGTERM (128 + SIGTERM); everything torn down."""


def _exit_detail(status: int | None) -> str:
    """' (exit N)' or ' (killed by SIGNAME)' for a process status, '' when unknown."""
    if status is None:
        return ""
    if status < 0:
        try:
            return f" (killed by {signal.Signals(-status).name})"
        except ValueError:
            return f" (killed by signal {-status})"
    return f" (exit {status})"


def output_tail(text: str, lines: int = 5) -> str:
    """Return the last ``lines`` non-empty lines of ``text`` joined by `` | ``."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


class MigratorError(Exception):
    """Base of every error migrator raises on purpose."""

    exit_code: int = ExitCode.FAILED


class ConfigError(MigratorError):
    """A scenario file, option or command-line value is invalid."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class PreflightError(MigratorError):
    """The host cannot run the scenario as asked; nothing was started."""

    exit_code = ExitCode.PREFLIGHT


class MissingResource(PreflightError):
    """A binary, kernel, device or file the scenario needs does not exist."""


class MissingCapability(PreflightError):
    """The QEMU binary lacks migration capabilities the scenario needs."""

    def __init__(self, binary: str, version: str, missing: Sequence[str]) -> None:
        super().__init__(
            f"{binary} (QEMU {version}) lacks migration capabilities: {', '.join(missing)}; "
            "use a newer QEMU or turn the option off in the scenario"
        )
        self.binary = binary
        self.version = version
        self.missing = list(missing)


class HugepageShortfall(PreflightError):
    """A hugepage pool cannot be grown to what the scenario needs."""

    def __init__(self, page_size_kib: int, needed: int, free: int, claimed: int = 0) -> None:
        size = f"{page_size_kib // 1024} MiB" if page_size_kib < 1048576 else "1 GiB"
        others = (f" ({claimed} more are claimed by this controller's other reservations on "
                  "the same kernel)") if claimed else ""
        super().__init__(
            f"hugepages-{page_size_kib}kB: need {needed} free {size} pages, only {free} "
            f"could be had{others}; free memory or raise "
            f"/sys/kernel/mm/hugepages/hugepages-{page_size_kib}kB/nr_hugepages (as root)"
        )
        self.page_size_kib = page_size_kib
        self.needed = needed
        self.free = free
        self.claimed = claimed


class HostError(MigratorError):
    """A command on a host failed; carries argv, status and output tail."""

    def __init__(
        self, message: str, *, argv: Sequence[str] = (), status: int | None = None, output: str = ""
    ) -> None:
        detail = f" (exit {status})" if status is not None else ""
        tail = output_tail(output)
        super().__init__(f"{message}{detail}" + (f": {tail}" if tail else ""))
        self.argv = list(argv)
        self.status = status
        self.output = output


class GuestBuildError(MigratorError):
    """The microguest (kernel + initramfs + probe) could not be built."""


class QemuError(MigratorError):
    """A QEMU process misbehaved."""

    def __init__(
        self,
        message: str,
        *,
        name: str = "qemu",
        argv: Sequence[str] = (),
        status: int | None = None,
        stderr: str = "",
    ) -> None:
        tail = output_tail(stderr)
        super().__init__(f"{name}: {message}{_exit_detail(status)}" + (f": {tail}" if tail else ""))
        self.name = name
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr


class QemuLaunchError(QemuError):
    """QEMU exited during start-up or never opened its QMP socket."""


class QemuExitedError(QemuError):
    """QEMU exited while migrator still needed it."""


class QmpConnectionLost(QemuError):
    """The QMP connection dropped while a command was pending (QEMU exited or crashed)."""


class QmpCommandError(MigratorError):
    """A QMP command returned an error reply."""

    def __init__(self, vm: str, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{vm}: QMP {command} failed: {error_class}: {desc}")
        self.vm = vm
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpTimeout(MigratorError):
    """A QMP command got no reply within its deadline (QEMU busy or hung)."""

    def __init__(self, vm: str, command: str, seconds: float) -> None:
        super().__init__(f"{vm}: QMP {command} got no reply within {seconds:g} s")
        self.vm = vm
        self.command = command
        self.seconds = seconds


class MigrationError(MigratorError):
    """The migration failed, was cancelled, or its state makes no sense."""


class MigrationTimeout(MigrationError):
    """A migration phase did not finish within its deadline."""


class GuestError(MigratorError):
    """The guest probe reported a problem (bad pages, no heartbeat, no boot)."""


class IntegrityError(GuestError):
    """The guest's check found pages whose content is not what it wrote."""


class ArtifactError(MigratorError):
    """A raw artifact in a run directory is missing or cannot be parsed."""


class StoreError(MigratorError):
    """The results store cannot be opened, migrated or written."""

    exit_code = ExitCode.BAD_INPUT


class RunFailed(MigratorError):
    """A run that failed after something booted: its outcome, exit code and statement.

    ``outcome`` is the outcome's name (``migrator.outcome.Outcome``), ``statement``
    says which side holds what.
    """

    def __init__(self, outcome: str, statement: str, exit_code: int) -> None:
        super().__init__(statement)
        self.outcome = outcome
        self.exit_code = exit_code
