"""The run directory: where a run's raw observations and derived reports live.

Layout (every file is written atomically or appended line by line, so a run
killed at any moment leaves only whole, parseable artifacts)::

    RUN/                      mode 0700 (holds the QMP sockets while running);
                              its files get the umask's mode, so a collector
                              given access to the directory can read them
      scenario.toml           the resolved scenario, every default explicit
      run.json                identity, host and QEMU facts, decisions, outcome
      timeline.jsonl          what the driver did and saw, host wall-clock ns
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

__all__ = ["JsonlWriter", "RunDir", "atomic_write"]

SIDES = ("src", "dst")
# A scenario names sides by role (source, destination); a run directory by its folder.
SIDE_OF_ROLE: dict[str, Literal["src", "dst"]] = {"source": "src", "destination": "dst"}


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


@dataclass(frozen=True)
class RunDir:
    """One run's directory (see module docstring for the layout)."""

    path: Path

    @classmethod
    def create(cls, root: Path, scenario_name: str) -> RunDir:
        """A new, empty, private run directory under ``root``."""
        root.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = root / f"{stamp}-{scenario_name}-{secrets.token_hex(2)}"
        path.mkdir(mode=0o700)
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
