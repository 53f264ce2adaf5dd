"""Host CPU time of each QEMU thread, sampled from ``/proc/PID/task/*/stat`` on its host.

Where post-copy time goes is a question of threads: the vCPUs waiting on faults, the
source's migration thread sending, the destination's fault thread requesting and
placing pages.  A small shell loop on the QEMU's host (local or over SSH, through
:meth:`Host.exchange_lines`) prints every thread's stat line on request, so one
sample costs one round trip whatever the number of threads.

QEMU names its threads (``-name ...,debug-threads=on``): vCPU threads ``CPU N/KVM``
or ``CPU N/TCG``; the source's migration thread ``live_migration`` (QEMU 7.2) or
``mig/src/main`` (from 9.1) and its return path (``return path``,
``mig/src/return``), which takes the destination's page requests; the
destination's post-copy fault thread (``fault-default`` in 7.2, ``mig/dst/fault``),
which requests pages, and its listen thread (``postcopy/listen``,
``mig/dst/listen``), which loads the stream and places the pages; multifd
channels (``multifdsend_N``, ``mig/src/send_N``, ``mig/dst/recv_N``).
:func:`thread_kind` reads that.

Each sample is one record of ``SIDE/threads.jsonl``: ``{"host_ns", "threads": [[tid,
name, utime_ticks, stime_ticks, cpu], ...]}`` (``host_ns``: the controller's wall clock
when the sample was asked; ``cpu``: the host CPU the thread last ran on, stat field 39,
null where the line has none; runs before it was recorded have four fields), after a
first record ``{"host_ns", "clock_ticks_per_s"}``.
"""

from __future__ import annotations

import logging
import re
import time

from migrator.aio import paced
from migrator.errors import HostError
from migrator.hosts.base import Host
from migrator.rundir import JsonlWriter

__all__ = ["THREADS_FILE", "is_migration_thread", "parse_stat_line", "sample_threads",
           "thread_kind"]

log = logging.getLogger(__name__)

THREADS_FILE = "threads.jsonl"

# One answer line per request: every thread's stat line, tab-separated; an empty line
# once the process is gone.  $1 is the pid.  Shell builtins only (the glob, read,
# printf): a sample forks nothing, where `cat | tr` forked two processes per sample
# and side, 40 a second at 10 Hz, beside the QEMUs being measured.
_STAT_LOOP = ('while read -r _; do for f in /proc/"$1"/task/*/stat; do '
              '{ read -r l < "$f" && printf "%s\\t" "$l"; } 2>/dev/null; done; echo; done')


_VCPU = re.compile(r"^CPU (\d+)/")
MIGRATION_KINDS = frozenset({"migration", "return path", "post-copy fault", "post-copy listen",
                             "multifd"})


def thread_kind(name: str) -> str:
    """What a QEMU thread does, from its name (see module docstring).

    "vCPU N", "migration", "return path", "post-copy fault", "post-copy listen",
    "multifd", "main loop" or "other".
    """
    if match := _VCPU.match(name):
        return f"vCPU {match.group(1)}"
    if name in ("live_migration", "mig/src/main"):
        return "migration"
    if name in ("return path", "mig/src/return", "mig/src/rp-thr"):
        return "return path"
    if "fault" in name:
        return "post-copy fault"
    if "listen" in name:
        return "post-copy listen"
    if name.startswith(("multifd", "mig/src/send", "mig/dst/recv")):
        return "multifd"
    if name.startswith("qemu-system"):
        return "main loop"
    return "other"


def is_migration_thread(name: str) -> bool:
    """Whether a thread of this name works for the migration (any kind of it, both sides).

    Every thread QEMU's migration code starts from 9.1 is ``mig/...``; the older names
    are those :func:`thread_kind` knows.
    """
    return name.startswith("mig/") or thread_kind(name) in MIGRATION_KINDS


def parse_stat_line(line: str) -> tuple[int, str, int, int, int | None] | None:
    """(tid, name, utime, stime, last CPU) of one ``/proc/.../stat`` line; None if malformed.

    The name (field 2) is in parentheses and may hold spaces and parentheses
    itself ("CPU 0/KVM"), so the fields after it are found from its last ``)``.
    The last CPU (field 39) is None on a line too short to hold it.
    """
    head, _, tail = line.rpartition(")")
    tid_text, _, name = head.partition(" (")
    fields = tail.split()
    # After the name: state (field 3) ... utime (14), stime (15) ... processor (39).
    if not tid_text.strip().isdigit() or len(fields) < 13:
        return None
    try:
        cpu = int(fields[36]) if len(fields) > 36 else None
        return int(tid_text), name, int(fields[11]), int(fields[12]), cpu
    except ValueError:
        return None


async def _clock_ticks(host: Host) -> int:
    """The host's clock ticks per second (``getconf CLK_TCK``), 100 if it cannot say."""
    try:
        result = await host.run(["getconf", "CLK_TCK"])
    except HostError:
        return 100
    text = result.stdout.strip()
    return int(text) if result.status == 0 and text.isdigit() else 100


async def sample_threads(host: Host, pid: int, out: JsonlWriter, hz: float) -> None:
    """Sample every thread of process ``pid`` on ``host`` into ``out`` at ``hz``.

    Runs until cancelled or until the process is gone.
    """
    out.write({"host_ns": time.time_ns(), "clock_ticks_per_s": await _clock_ticks(host)})
    async with host.exchange_lines(["sh", "-c", _STAT_LOOP, "sh", str(pid)]) as stats:
        async for _ in paced(hz):
            host_ns = time.time_ns()
            try:
                answer = await stats.ask("sample", timeout=10.0)
            except HostError as error:
                log.warning("%s: thread sampler stops: %s", host.name, error)
                return
            threads = [parsed for line in answer.split("\t")
                       if line and (parsed := parse_stat_line(line)) is not None]
            if not threads:
                log.debug("%s: pid %d gone, thread sampler stops", host.name, pid)
                return
            out.write({"host_ns": host_ns, "threads": [list(thread) for thread in threads]})
