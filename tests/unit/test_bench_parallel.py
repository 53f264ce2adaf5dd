"""``bench --parallel``: the capacity rule, the scheduler, and parallel suites of fake runs.

The runs here are fakes (logic only); ``tests/integration/test_bench_parallel.py``
runs real QEMU migrations side by side.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from migrator.bench.capacity import (
    QEMU_OVERHEAD_MIB,
    Demand,
    KernelCapacity,
    RunNeeds,
    needs_of,
    pool_pages_needed,
    probe_host,
    shortfall,
)
from migrator.bench.runner import RunStatus, SuiteState, load_state, run_suite
from migrator.bench.schedule import Scheduler
from migrator.bench.suite import Suite, parse_suite
from migrator.cli.bench_progress import SuiteProgress
from migrator.cli.main import app
from migrator.config import parse_scenario
from migrator.config.models import HostSpec, LocalHostSpec, Scenario
from migrator.errors import PreflightError
from migrator.hosts.base import CommandResult
from migrator.hosts.hugepages import reserve_hugepages
from migrator.rundir import RunDir
from migrator.runner import Observer
from tests.unit.fake_kernel import FakeKernel

GIB_KIB = 1048576
LOCAL = LocalHostSpec()


def scenario(vm: dict[str, Any] | None = None, **sections: Any) -> Scenario:
    data: dict[str, Any] = {"name": "p", "vm": {"memory_mib": 512, "backing": "memfd-4k",
                                                 **(vm or {})},
                            "workload": {"working_set_mib": 128}, **sections}
    return parse_scenario(data)


def ssh(address: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "ssh", "address": address, **fields}


def kernel(name: str = "k", *, cpus: int = 2, mem: int = 100_000,
           free: Mapping[int, int] | None = None) -> KernelCapacity:
    return KernelCapacity(kernel=name, hosts=(name,), cpus=cpus, mem_available_mib=mem,
                          free_hugepages=dict(free or {}))


def budget_of(mib: int) -> int:
    """MemAvailable whose memory budget is ``mib``."""
    return int(mib / 0.9) + 1


# --- the capacity rule -------------------------------------------------------------------


def test_a_local_pair_takes_both_qemus_memory_and_one_sides_vcpus() -> None:
    needs = needs_of(scenario({"vcpus": 2}), {LOCAL: "k"})
    assert needs.demands == {"k": Demand(memory_mib=2 * (512 + QEMU_OVERHEAD_MIB), vcpus=2)}
    assert needs.exclusive == frozenset()
    assert not needs.alone


def test_a_hugetlb_pair_takes_pool_pages_instead_of_memory() -> None:
    needs = needs_of(scenario({"backing": "hugetlb-2m"}), {LOCAL: "k"})
    assert needs.demands == {"k": Demand(memory_mib=2 * QEMU_OVERHEAD_MIB, vcpus=1,
                                         hugepages={2048: 512})}


def test_hosts_on_two_kernels_each_take_one_qemu_and_namespaces_of_one_kernel_two() -> None:
    pair = scenario(hosts={"source": ssh("10.0.0.1"), "destination": ssh("10.0.0.2")})
    source, destination = pair.hosts.source, pair.hosts.destination
    apart = needs_of(pair, {source: "a", destination: "b"})
    one = Demand(memory_mib=512 + QEMU_OVERHEAD_MIB, vcpus=1)
    assert apart.demands == {"a": one, "b": one}
    together = needs_of(pair, {source: "a", destination: "a"})
    assert together.demands == {"a": Demand(memory_mib=2 * (512 + QEMU_OVERHEAD_MIB), vcpus=1)}


def test_a_fixed_migration_port_is_exclusive_and_host_wide_faults_run_alone() -> None:
    fixed = scenario(hosts={"source": ssh("10.0.0.1"),
                            "destination": ssh("10.0.0.2", migration_port=4444)})
    kernels: dict[HostSpec, str] = {fixed.hosts.source: "a", fixed.hosts.destination: "b"}
    assert needs_of(fixed, kernels).exclusive == {"port 10.0.0.2:4444"}
    exhausted = scenario({"backing": "hugetlb-2m"}, faults=[{"kind": "pool-exhausted"}])
    assert needs_of(exhausted, {LOCAL: "k"}).alone
    killed = scenario(faults=[{"kind": "kill", "side": "destination"}])
    assert not needs_of(killed, {LOCAL: "k"}).alone


@pytest.mark.parametrize(("pages", "needed"), [([], 0), ([4], 4), ([4, 4], 12), ([2, 6], 14)])
def test_open_reservations_may_need_twice_their_pages_but_the_smallest_once(
        pages: list[int], needed: int) -> None:
    assert pool_pages_needed(pages) == needed


def test_memory_beyond_the_budget_does_not_fit_and_says_how_much() -> None:
    run = Demand(memory_mib=1000, vcpus=1)
    roomy = kernel(cpus=4, mem=budget_of(2000))
    assert shortfall(roomy, [run, run]) is None
    reason = shortfall(roomy, [run, run, run])
    assert reason is not None
    assert reason.startswith("3000 MiB of memory, of 2000 MiB it can give (MemAvailable")


def test_cores_bound_runs_together_but_never_a_run_alone() -> None:
    two = Demand(memory_mib=10, vcpus=2)
    machine = kernel(cpus=2)
    assert shortfall(machine, [Demand(memory_mib=10, vcpus=4)]) is None
    assert shortfall(machine, [two, two]) == "4 vCPUs of 2 runs on 2 cores (1 vCPU per core)"
    assert shortfall(machine, [two, two], vcpus_per_core=2) is None


def test_hugepages_beyond_the_free_pages_are_grown_from_memory() -> None:
    run = Demand(memory_mib=0, vcpus=1, hugepages={GIB_KIB: 2})
    # 2 free pages: one run alone needs none grown; two need 2*4-2 = 6, so 4 grown (4 GiB).
    machine = kernel(cpus=8, mem=budget_of(4096), free={GIB_KIB: 2})
    assert shortfall(machine, [run]) is None
    assert shortfall(machine, [run, run]) is None
    reason = shortfall(machine, [run, run, run])
    assert reason is not None
    assert "(8 pages of 1048576 kB grown from memory)" in reason


async def test_the_probe_reads_the_kernel_memory_cores_and_unclaimed_free_pages() -> None:
    fake = FakeKernel(total=5, free=3, limit=8, boot_id="boot-1")
    host = fake.host("ns1")
    host.set_text("/proc/meminfo", "MemTotal: 9000000 kB\nMemAvailable: 4194304 kB\n")
    host.commands["nproc"] = lambda argv: CommandResult(argv, 0, "6\n", "")
    # Another migrator process claims 1 of the free pages.
    host.commands["sh"] = lambda argv: CommandResult(argv, 0, "1\n", "")
    capacity = await probe_host(host, [GIB_KIB])
    assert capacity == KernelCapacity(kernel="boot-1", hosts=("ns1",), cpus=6,
                                      mem_available_mib=4096, free_hugepages={GIB_KIB: 2})


# --- the scheduler -----------------------------------------------------------------------


class Held:
    """Runs that hold their slots until released, to look at what the scheduler admitted."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.release: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def add(self, order: int, needs: RunNeeds) -> None:
        self.release[order] = asyncio.Event()

        async def hold() -> None:
            async with self.scheduler.slot(order, needs):
                self.started.append(order)
                await self.release[order].wait()

        self.tasks[order] = asyncio.create_task(hold())

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def end(self, order: int) -> None:
        self.release[order].set()
        await self.tasks[order]
        await self.settle()


def on(kernel_name: str, memory_mib: int, **more: Any) -> RunNeeds:
    return RunNeeds(demands={kernel_name: Demand(memory_mib=memory_mib, vcpus=1)}, **more)


async def test_slots_bound_the_active_runs_and_runs_start_in_suite_order() -> None:
    held = Held(Scheduler(2))
    for order in (3, 1, 2):
        held.add(order, RunNeeds())
    await held.settle()
    assert held.started == [3, 1]  # the first two to ask, before the third arrived
    assert set(held.scheduler.active) == {1, 3}
    await held.end(3)
    assert held.started == [3, 1, 2]
    await held.end(1)
    await held.end(2)
    assert held.scheduler.active == {}
    assert held.scheduler.peak == 2


async def test_a_run_that_does_not_fit_waits_and_blocks_its_kernel_not_the_others() -> None:
    held = Held(Scheduler(4, {"k": kernel("k", mem=budget_of(5000)), "j": kernel("j")}))
    held.add(1, on("k", 4000))
    held.add(2, on("k", 4000))   # does not fit beside 1
    held.add(3, on("k", 1000))   # would fit beside 1, but must not overtake 2
    held.add(4, on("j", 1000))   # another kernel: goes
    await held.settle()
    assert held.started == [1, 4]
    await held.end(1)
    assert held.started == [1, 4, 2, 3]  # 4000 + 1000 fit together
    for order in (2, 3, 4):
        await held.end(order)


async def test_alone_runs_and_exclusive_resources_never_share() -> None:
    kernels = {"k": kernel("k"), "j": kernel("j")}
    held = Held(Scheduler(4, kernels, vcpus_per_core=4))
    held.add(1, on("k", 10))
    held.add(2, on("k", 10, alone=True))
    held.add(3, on("j", 10, exclusive=frozenset({"port 10.0.0.2:4444"})))
    held.add(4, on("j", 10, exclusive=frozenset({"port 10.0.0.2:4444"})))
    await held.settle()
    assert held.started == [1, 3]
    await held.end(1)
    await held.end(3)
    assert held.started == [1, 3, 2, 4]
    await held.end(2)
    await held.end(4)


async def test_a_cancelled_waiting_run_leaves_the_queue_and_a_closed_scheduler_admits_none(
) -> None:
    held = Held(Scheduler(1))
    for order in (1, 2, 3):
        held.add(order, RunNeeds())
    await held.settle()
    held.tasks[2].cancel()
    await held.settle()
    await held.end(1)
    assert held.started == [1, 3]
    held.scheduler.close()
    held.add(4, RunNeeds())
    await held.end(3)
    assert held.started == [1, 3]
    held.tasks[4].cancel()
    await held.settle()
    assert held.scheduler.active == {}


def test_a_run_too_big_for_its_kernel_alone_is_named() -> None:
    scheduler = Scheduler(2, {"k": kernel("k", mem=budget_of(1000))})
    assert scheduler.why_not_alone(on("k", 900)) is None
    assert scheduler.why_not_alone(on("k", 1200)) == (
        "needs 1200 MiB of memory, of 1000 MiB it can give (MemAvailable 1112 MiB less 10%) "
        "on k")


# --- parallel suites of fake runs ---------------------------------------------------------


def suite(runs: int, vm: dict[str, Any] | None = None) -> Suite:
    return parse_suite({
        "suite": {"name": "par", "repetitions": runs},
        "base": {"name": "par", "vm": {"memory_mib": 512, "backing": "memfd-4k", **(vm or {})},
                 "workload": {"working_set_mib": 128}},
    }, source="par.toml")


def probe_of(capacity: KernelCapacity) -> Callable[[Sequence[Scenario]], Any]:
    """A capacity probe that finds every run's hosts on one kernel of ``capacity``."""
    async def probe(scenarios: Sequence[Scenario]) -> dict[HostSpec, KernelCapacity]:
        return {LOCAL: capacity}
    return probe


class Timed:
    """A fake run that takes ``seconds[n]`` for the n-th call (default 0.02) and records when
    it ran."""

    def __init__(self, seconds: Mapping[int, float] | None = None) -> None:
        self.seconds = seconds or {}
        self.spans: dict[str, tuple[float, float]] = {}
        #: Call numbers (1 = the first run started) in the order the runs finished.
        self.finished: list[int] = []
        self.calls = 0
        self.running = 0
        self.peak = 0

    async def __call__(self, scenario: Scenario, runs_root: Path, observer: Observer,
                       on_rundir: Callable[[RunDir], None]) -> Path:
        run = RunDir.create(runs_root, scenario.name)
        on_rundir(run)
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.calls += 1
        call = self.calls
        seconds = self.seconds.get(call, 0.02)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.running -= 1
        self.spans[run.run_id] = (began, loop.time())
        self.finished.append(call)
        return run.path


def ids(state: SuiteState) -> list[str]:
    return list(state.runs)


def test_results_stay_in_suite_order_whatever_order_runs_finish_in(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The first run is the slowest: the others finish before it.
    fake = Timed({1: 0.3})
    state = asyncio.run(run_suite(suite(4), out, run_fn=fake, parallel=3,
                                  capacity_probe=probe_of(kernel(cpus=4))))
    planned = [f"rep={n}" for n in range(1, 5)]
    assert ids(state) == planned
    saved = json.loads((out / "suite.json").read_text())
    assert list(saved["runs"]) == planned
    assert {record["status"] for record in saved["runs"].values()} == {"done"}
    assert fake.peak == 3
    # Runs start in suite order, and the first really finished last: the order kept above
    # is not just the order they happened to end in.
    assert fake.finished[-1] == 1
    assert fake.finished != sorted(fake.finished)


def test_cores_limit_a_parallel_suite_unless_vcpus_may_share_them(tmp_path: Path) -> None:
    capacity = kernel(cpus=2)
    for per_core, peak in ((1, 2), (2, 4)):
        fake = Timed()
        asyncio.run(run_suite(suite(6), tmp_path / f"out{per_core}", run_fn=fake, parallel=8,
                              vcpus_per_core=per_core, capacity_probe=probe_of(capacity)))
        assert fake.peak == peak


def test_with_one_at_a_time_nothing_is_probed(tmp_path: Path) -> None:
    async def probe(scenarios: Sequence[Scenario]) -> dict[HostSpec, KernelCapacity]:
        raise AssertionError("probed")

    fake = Timed()
    asyncio.run(run_suite(suite(3), tmp_path / "out", run_fn=fake, capacity_probe=probe))
    assert fake.peak == 1
    assert len(fake.spans) == 3


def test_a_run_that_never_fits_is_refused_before_anything_starts(tmp_path: Path) -> None:
    fake = Timed()
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as refused:
        asyncio.run(run_suite(suite(2), out, run_fn=fake, parallel=2,
                              capacity_probe=probe_of(kernel(mem=budget_of(1000)))))
    assert str(refused.value) == (
        "run rep=1 cannot run on its hosts even alone: needs 1280 MiB of memory, of 1000 MiB "
        "it can give (MemAvailable 1112 MiB less 10%) on k (and 1 more runs); fix: shrink "
        "vm.memory_mib or free memory there")
    assert fake.spans == {}
    assert not (out / "suite.json").exists()


def test_an_interrupt_stops_every_active_run_and_resume_finishes_the_suite(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    started: list[str] = []
    both = asyncio.Event()

    async def forever(scenario: Scenario, runs_root: Path, observer: Observer,
                      on_rundir: Callable[[RunDir], None]) -> Path:
        run = RunDir.create(runs_root, scenario.name)
        on_rundir(run)
        started.append(run.run_id)
        if len(started) == 2:
            both.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def interrupted() -> None:
        task = asyncio.create_task(run_suite(suite(4), out, run_fn=forever, parallel=2,
                                             capacity_probe=probe_of(kernel())))
        await both.wait()
        task.cancel()  # as SIGTERM or Ctrl-C cancels the suite
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(interrupted())
    assert len(started) == 2
    state = load_state(out)
    assert {run_id: (r.status.value, r.error) for run_id, r in state.runs.items()} == {
        "rep=1": ("failed", "interrupted"), "rep=2": ("failed", "interrupted"),
        "rep=3": ("pending", None), "rep=4": ("pending", None)}
    fake = Timed()
    again = asyncio.run(run_suite(suite(4), out, run_fn=fake, parallel=2, resume=True,
                                  capacity_probe=probe_of(kernel())))
    assert {record.status for record in again.runs.values()} == {RunStatus.DONE}
    assert len(fake.spans) == 4


def test_concurrent_hugetlb_runs_never_take_the_same_pages(tmp_path: Path) -> None:
    """A pool just big enough for 2 runs at once, --parallel 3: the third waits its turn.

    Each fake run reserves its 2 pages of 1 GiB as a real run does, then its
    "QEMUs" map them.  The kernel's pool grows to 6 pages at most: two runs
    need 2 + 2 * 2 (the second counts the first's mapped pages as claimed, as
    reserve_hugepages does).  A third run beside them would need 10 and fail
    with a shortfall: it must wait instead.
    """
    fake = FakeKernel(total=0, free=0, limit=6, boot_id="pool-for-two")
    host = fake.host("local")
    # Memory to grow the pool for 2 runs (6 pages, 6656 MiB with their QEMUs) and for 3 if
    # each counted its pages once (6912), not for 3 as reservations count them (11008).
    host.set_text("/proc/meminfo", f"MemAvailable: {budget_of(8000) * 1024} kB\n")
    host.commands["nproc"] = lambda argv: CommandResult(argv, 0, "8\n", "")
    mapped_at_once: list[int] = []
    running: list[str] = []

    async def hugetlb_run(scenario: Scenario, runs_root: Path, observer: Observer,
                          on_rundir: Callable[[RunDir], None]) -> Path:
        run = RunDir.create(runs_root, scenario.name)
        on_rundir(run)
        async with reserve_hugepages(host, GIB_KIB, 2):
            fake.map_pages(2)
            running.append(run.run_id)
            mapped_at_once.append(fake.used)
            assert fake.used <= fake.total  # no page is in two runs' hands
            await asyncio.sleep(0.05)
            running.remove(run.run_id)
            fake.unmap_pages(2)
        return run.path

    async def main() -> SuiteState:
        capacity = await probe_host(host, [GIB_KIB])
        return await run_suite(suite(3, {"backing": "hugetlb-1g", "memory_mib": 1024}),
                               tmp_path / "out", run_fn=hugetlb_run, parallel=3,
                               capacity_probe=probe_of(capacity))

    state = asyncio.run(main())
    assert {run_id: r.status.value for run_id, r in state.runs.items()} == {
        "rep=1": "done", "rep=2": "done", "rep=3": "done"}
    assert max(mapped_at_once) == 4  # two runs at once, never three
    assert mapped_at_once[:2] == [2, 4]
    assert (fake.total, fake.used) == (0, 0)  # every page given back


# --- the CLI ------------------------------------------------------------------------------


def test_bench_refuses_a_run_too_big_for_its_host_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("migrator.bench.runner.probe_capacity",
                        probe_of(kernel(mem=budget_of(1000))))
    suite_file = tmp_path / "suite.toml"
    # The default backing: 1 GiB hugepages, none free on this kernel.
    suite_file.write_text('[suite]\nname = "big"\n[base]\nvm = { memory_mib = 4096 }\n'
                          "workload = { working_set_mib = 128 }\n")
    result = CliRunner().invoke(app, ["bench", str(suite_file), "--out", str(tmp_path / "o"),
                                      "--parallel", "2"])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: run rep=1 cannot run on its hosts even alone: needs 8448 MiB of memory (8 pages "
        "of 1048576 kB grown from memory), of 1000 MiB it can give (MemAvailable 1112 MiB less "
        "10%) on k; fix: shrink vm.memory_mib or free memory there"]
    assert "Traceback" not in result.output


def test_progress_shows_one_line_per_active_run() -> None:
    console = Console(record=True, width=200)
    progress = SuiteProgress(console, parallel=2)
    runs = suite(3).runs
    progress.suite_started(runs, SuiteState(suite="par", source="s", repetitions=3,
                                            created="c", updated="u"))
    for index, run in enumerate(runs[:2], 1):
        progress.run_started(index, run)
    progress.run_observer(2, runs[1]).sample(
        "src", {"status": "active", "ram": {"transferred": 3 << 20, "remaining": 1 << 20,
                                            "postcopy-requests": 0}})
    progress.run_observer(1, runs[0]).phase("migrating")
    console.print(progress.live.get_renderable())
    lines = console.export_text().splitlines()
    drawn = lines[lines.index(next(line for line in lines if line.startswith("suite "))):]
    assert drawn[0].startswith("suite 2/3   running 2   ETA after the first run")
    assert drawn[1].startswith("[1/3] rep=1  migrating")
    assert drawn[2].startswith("[2/3] rep=2  starting")
    assert drawn[2].endswith("src active 3.0 MiB sent, 1.0 MiB left, 0 post-copy requests")
