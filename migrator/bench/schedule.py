"""Which runs of a parallel suite may start now: slots, capacity and suite order.

Each run of ``migrator bench --parallel N`` is a task of one
:class:`asyncio.TaskGroup`; before it starts it waits in :meth:`Scheduler.slot`.
The scheduler admits waiting runs in suite order whenever something changes (a
run arrives or ends):

* at most ``slots`` runs are active;
* a run is admitted only if, on every kernel it uses, it fits beside the runs
  active there (:func:`migrator.bench.capacity.shortfall`), holds no
  exclusive resource an active run holds, and is not kept ``alone``;
* a run never overtakes an earlier waiting run that shares a kernel or an
  exclusive resource with it, so a large run is not starved by small ones
  behind it; runs on other host pairs go ahead meanwhile.

Decisions are made synchronously between awaits (one event loop, no lock), and
a waiting or active run that is cancelled leaves the books at once.  Once the
suite stops (:meth:`Scheduler.close`), nothing more is admitted.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from migrator.bench.capacity import KernelCapacity, RunNeeds, shortfall

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)


class Scheduler:
    """Admits runs (see the module docstring); ``kernels`` maps boot ids to capacities."""

    def __init__(self, slots: int, kernels: Mapping[str, KernelCapacity] | None = None,
                 vcpus_per_core: int = 1) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.kernels = dict(kernels or {})
        self.vcpus_per_core = vcpus_per_core
        self._needs: dict[int, RunNeeds] = {}
        self._waiting: list[int] = []
        self._admitted: dict[int, asyncio.Future[None]] = {}
        self.active: dict[int, RunNeeds] = {}
        #: The most runs that were active at once.
        self.peak = 0
        self._closed = False

    def close(self) -> None:
        """Admit nothing more (the suite is stopping); active runs keep their slots."""
        self._closed = True

    def why_not_alone(self, needs: RunNeeds) -> str | None:
        """Why a run could never start, even with nothing else active; None if it can."""
        for kernel, demand in needs.demands.items():
            reason = shortfall(self.kernels[kernel], [demand], self.vcpus_per_core)
            if reason is not None:
                return f"needs {reason} on {self.kernels[kernel].name}"
        return None

    @asynccontextmanager
    async def slot(self, order: int, needs: RunNeeds) -> AsyncIterator[None]:
        """Wait until run ``order`` (its place in the suite) may start; hold its slot meanwhile."""
        if order in self._needs:
            raise ValueError(f"run {order} is already scheduled")
        admitted = asyncio.get_running_loop().create_future()
        self._needs[order] = needs
        self._admitted[order] = admitted
        bisect.insort(self._waiting, order)
        try:
            self._dispatch()
            await admitted
            yield
        finally:
            # Admitted or not, and however the wait or the run ended.
            if order in self._waiting:
                self._waiting.remove(order)
            self.active.pop(order, None)
            del self._needs[order], self._admitted[order]
            self._dispatch()

    def _fits(self, needs: RunNeeds) -> bool:
        for other in self.active.values():
            shares_kernel = bool(needs.kernels & other.kernels)
            if needs.exclusive & other.exclusive or (shares_kernel
                                                     and (needs.alone or other.alone)):
                return False
        for kernel, demand in needs.demands.items():
            beside = [other.demands[kernel] for other in self.active.values()
                      if kernel in other.demands]
            if shortfall(self.kernels[kernel], [*beside, demand], self.vcpus_per_core):
                return False
        return True

    def _dispatch(self) -> None:
        """Admit, in suite order, every waiting run that may start now."""
        if self._closed:
            return
        held_kernels: set[str] = set()
        held_exclusive: set[str] = set()
        for order in list(self._waiting):
            if len(self.active) >= self.slots:
                break
            needs = self._needs[order]
            if (needs.kernels & held_kernels or needs.exclusive & held_exclusive
                    or not self._fits(needs)):
                # Later runs that share any of this one's kernels wait behind it.
                held_kernels |= needs.kernels
                held_exclusive |= needs.exclusive
                continue
            self._waiting.remove(order)
            self.active[order] = needs
            self.peak = max(self.peak, len(self.active))
            if not self._admitted[order].done():
                self._admitted[order].set_result(None)
            log.debug("run %d admitted (%d active, %d waiting)", order, len(self.active),
                      len(self._waiting))
