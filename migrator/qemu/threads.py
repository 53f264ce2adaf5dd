"""Host CPU time of each QEMU thread, sampled from ``/proc/PID/task/*/stat`` on its host.

Where post-copy time goes is a question of threads: the vCPUs waiting on faults, the
source's migration thread sending, the destination's fault thread requesting and
placing pages.  A small shell loop on the QEMU's host (local or over SSH, through
:meth:`Host.exchange_lines`) prints every thread's stat line on request, so one
sample costs one round trip whatever the number of threads.

Each sample is one record of ``SIDE/threads.jsonl``: ``{"host_ns", "threads": [[tid,
name, utime_ticks, stime_ticks], ...]}`` (``host_ns``: the controller's wall clock when
the sample was asked), after a first record ``{"host_ns", "clock_ticks_per_s"}``.
"""

from __future__ import annotations

import logging
import time

from migrator.aio import paced
from migrator.errors import HostError
from migrator.hosts.base import Host
from migrator.rundir import JsonlWriter

__all__ = ["THREADS_FILE", "parse_stat_line", "sample_threads"]

log = logging.getLogger(__name__)

THREADS_FILE = "threads.jsonl"

# One answer line per request: every thread's stat line, tab-separated; an empty line
# once the process is gone.  $1 is the pid.  Shell builtins only (the glob, read,
# printf): a sample forks nothing, where `cat | tr` forked two processes per sample
# and side, 40 a second at 10 Hz, beside the QEMUs being measured.
_STAT_LOOP = ('while read -r _; do for f in /proc/"$1"/task/*/stat; do '
              '{ read -r l < "$f" && printf "%s\\t" "$l"; } 2>/dev/null; done; echo; done')


def parse_stat_line(line: str) -> tuple[int, str, int, int] | None:
    """(tid, name, utime, stime) of one ``/proc/.../stat`` line; None if malformed.

    The name (field 2) is in parentheses and may hold spaces and parentheses
    itself ("CPU 0/KVM"), so the fields after it are found from its last ``)``.
    """
    head, _, tail = line.rpartition(")")
    tid_text, _, name = head.partition(" (")
    fields = tail.split()
    # After the name: state (field 3) ... utime (14), stime (15).
    if not tid_text.strip().isdigit() or len(fields) < 13:
        return None
    try:
        return int(tid_text), name, int(fields[11]), int(fields[12])
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
