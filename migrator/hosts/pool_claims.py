"""Hugepage claims that every migrator process on one kernel sees: a lock and claim files.

A reservation's pages are promised before any QEMU maps them, so the pool's free
count alone lets two reservations take the same free pages.  Within one process
:mod:`migrator.hosts.hugepages` keeps a table of claims; this module makes the
claims of *other* migrator processes on the same kernel visible too (another
``migrator run`` or ``bench`` started beside this one, a second controller
driving the same host):

* **The pool lock**: ``flock`` on :data:`LOCK_FILE`, held by a small process on
  the host for as long as a reservation reads the pool, grows it and records its
  claim (or shrinks the pool on release).  A second process waits for it.
* **Claim files**: one file per open reservation in :data:`CLAIMS_DIR`, named
  ``SIZEkB.PROCESS.N`` and holding the number of pages claimed, each kept
  ``flock``-ed by a holder process for as long as the reservation is open.  A
  claim whose holder is gone (its controller was killed, its SSH connection
  dropped) is no longer locked: the next reservation sees that, removes the file
  and does not count it.

Both holders are ordinary commands run through :meth:`Host.exchange_lines`, so
they work on a local host and over SSH alike, and die with the controller (or
its connection), which releases their locks.  The files live under ``/run``
(tmpfs: gone at reboot, as the claims are).  Hosts that share a kernel but not a
``/run`` (two containers with their own filesystems) do not see each other's
claim files; the hosts migrator's tests make (network namespaces) share it.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from secrets import token_hex

from migrator.errors import HostError
from migrator.hosts.base import Host

__all__ = ["CLAIMS_DIR", "LOCK_FILE", "hold_claim", "hold_pool_lock", "other_processes_claims"]

STATE_DIR = Path("/run/migrator/hugepages")
LOCK_FILE = STATE_DIR / "pool.lock"
CLAIMS_DIR = STATE_DIR / "claims"

#: How long a reservation waits for another process's pool lock: growing a pool with
#: compaction retries takes seconds; nothing holds it across a migration.
LOCK_WAIT_S = 300.0

# This process's part of every claim file name, so that its own claims (counted in
# its in-process table) are not counted twice.
_PROCESS = token_hex(6)
_serials = itertools.count(1)

# A holder: flock takes the lock, then a shell echoes each line back; closing its
# stdin ends it and so releases the lock.
_ECHO = 'while IFS= read -r line; do printf "%s\\n" "$line"; done'

# Sum the pages of the live claim files of one page size that are not this process's;
# a file no holder locks any more is stale and removed.  Arguments: dir size process.
_SUM_LIVE_CLAIMS = r"""
dir=$1 size=$2 mine=$3 total=0
for f in "$dir/${size}kB."*; do
    [ -e "$f" ] || continue
    case "$f" in *".$mine."*) continue ;; esac
    if flock -n "$f" true; then
        rm -f "$f"
    else
        pages=$(cat "$f")
        total=$((total + ${pages:-0}))
    fi
done
echo "$total"
"""


@asynccontextmanager
async def _held(host: Host, path: Path, what: str) -> AsyncIterator[None]:
    """``flock`` on ``path`` held by a process on ``host`` for the block."""
    async with host.exchange_lines(["flock", str(path), "sh", "-c", _ECHO]) as holder:
        # The shell answers only once flock has the lock.
        answer = await holder.ask("held", timeout=LOCK_WAIT_S)
        if answer != "held":
            raise HostError(f"{what} on {host.name}: unexpected answer {answer!r}",
                            argv=holder.argv)
        yield


@asynccontextmanager
async def hold_pool_lock(host: Host) -> AsyncIterator[None]:
    """The host-wide lock over reading, resizing and claiming hugepage pools (all sizes)."""
    await host.make_private_dir(CLAIMS_DIR)
    async with _held(host, LOCK_FILE, "the hugepage pool lock"):
        yield


async def other_processes_claims(host: Host, page_size_kib: int) -> int:
    """Pages of this size that other migrator processes' open reservations claim.

    Call it under :func:`hold_pool_lock`; it removes the claim files of holders
    that are gone.
    """
    result = await host.run(["sh", "-c", _SUM_LIVE_CLAIMS, "sh", str(CLAIMS_DIR),
                             str(page_size_kib), _PROCESS])
    result.check("summing the hugepage claims of other migrator processes")
    text = result.stdout.strip()
    return int(text) if text.isdigit() else 0


@asynccontextmanager
async def hold_claim(host: Host, page_size_kib: int, pages: int) -> AsyncIterator[None]:
    """A claim file of ``pages`` pages, locked by a holder for the block, removed after.

    Made under :func:`hold_pool_lock`, so no other process sums claims meanwhile.
    """
    claim = CLAIMS_DIR / f"{page_size_kib}kB.{_PROCESS}.{next(_serials)}"
    await host.write_file(claim, f"{pages}\n".encode())
    try:
        async with _held(host, claim, "a hugepage claim"):
            yield
    finally:
        await host.remove_tree(claim)
