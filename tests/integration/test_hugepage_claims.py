"""Two migrator processes on one kernel never count the same free hugepages.

A child process reserves 2 MiB pages and holds them (as a run does before its QEMU
maps them); this test's own reservation must then find the pool grown for both, not
only for the first.  When the child is killed, its claim goes with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from migrator.hosts.hugepages import read_pool, reserve_hugepages
from migrator.hosts.local import LocalHost
from migrator.hosts.pool_claims import CLAIMS_DIR, hold_pool_lock, other_processes_claims
from tests.integration.qemu_leftovers import POOL

PAGE_KIB = 2048
HELD = 3

# A second migrator process: reserves HELD pages, says so, and holds them until stdin ends.
_HOLDER = f"""
import asyncio, sys
from migrator.hosts.hugepages import reserve_hugepages
from migrator.hosts.local import LocalHost

async def main():
    async with reserve_hugepages(LocalHost(), {PAGE_KIB}, {HELD}) as added:
        print("reserved", added, flush=True)
        await asyncio.to_thread(sys.stdin.read)

asyncio.run(main())
"""


@contextmanager
def holding_process() -> Iterator[subprocess.Popen[str]]:
    """A child process holding a reservation of HELD pages; the pool is put back after."""
    before = POOL.read_text()
    child = subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("reserved"), "the holder did not reserve"
        yield child
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        # A killed holder cannot give its growth back: this test does.
        POOL.write_text(before)


async def claims_of_others() -> int:
    async with hold_pool_lock(LocalHost()):
        return await other_processes_claims(LocalHost(), PAGE_KIB)


def test_a_reservation_counts_another_process_claim() -> None:
    with holding_process():
        assert asyncio.run(claims_of_others()) == HELD

        async def reserve_beside_it() -> tuple[int, int]:
            async with reserve_hugepages(LocalHost(), PAGE_KIB, 2):
                pool = await read_pool(LocalHost(), PAGE_KIB)
                return pool.available, await claims_of_others()

        available, others = asyncio.run(reserve_beside_it())
        # Room for both reservations: the child's 3 unmapped pages and this one's 2.
        assert available >= HELD + 2
        assert others == HELD


def test_a_killed_process_claim_is_dropped() -> None:
    with holding_process() as child:
        claims = sorted(CLAIMS_DIR.glob(f"{PAGE_KIB}kB.*"))
        assert claims, "the holder left no claim file"
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        # Its holders die with it (they are bound to their parent), so nothing locks the file.
        assert asyncio.run(claims_of_others()) == 0
        assert not [claim for claim in claims if claim.exists()]
