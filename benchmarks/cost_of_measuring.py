"""What measuring costs the migration it measures: paired runs with and without each instrument.

Runs a scenario (default: the README's main job) as is, and with one instrument
turned down at a time, in interleaved pairs so that both runs of a pair see the
same machine:

- ``no trace``: ``collect.trace = false`` (the destination QEMU's post-copy trace);
- ``no samplers``: ``collect.query_migrate_hz``, ``threads_hz`` and ``smaps_hz`` at
  0.1 Hz (QMP ``query-migrate`` on both sides, ``/proc/PID/task/*/stat`` on both
  sides, the destination's smaps);
- ``quiet probe``: ``workload.heartbeat_ms = 1000`` (the guest probe still measures
  every stall, but prints a heartbeat once a second instead of every 5 ms, so the
  serial console and the controller's reader are nearly idle).

For each pair it takes, from each run's ``report.json``: the migration's total time
(QEMU's ``query-migrate`` ``total-time``, ms), the guest stall p99 (the guest probe's
per-access histogram, ms: with stalls rare among millions of accesses it is the
access time itself), the worst stall and the total stalled time (guest probe, ms), and
prints the median, min and max of the with/without difference in percent.  Target (issue
13): under 5 % each; the figures say what was measured either way.

    .venv/bin/python benchmarks/cost_of_measuring.py [--pairs 3] [--scenario FILE]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migrator.config.loader import dump_scenario, load_scenario
from migrator.config.models import Scenario

ROOT = Path(__file__).resolve().parents[1]



def _collect(scenario: Scenario, **changes: object) -> Scenario:
    return scenario.model_copy(update={"collect": scenario.collect.model_copy(update=changes)})


VARIANTS: dict[str, Callable[[Scenario], Scenario]] = {
    "no trace": lambda s: _collect(s, trace=False),
    "no samplers": lambda s: _collect(s, query_migrate_hz=0.1, threads_hz=0.1, smaps_hz=0.1),
    "quiet probe": lambda s: s.model_copy(update={
        "workload": s.workload.model_copy(update={"heartbeat_ms": 1000})}),
}

# (label, how to read it from report.json)
FIGURES: tuple[tuple[str, Callable[[Any], float]], ...] = (
    ("migration total-time (QEMU, ms)",
     lambda r: float(r["timings"]["total-time"]["value"])),
    ("guest stall p99 (guest probe, ms)",
     lambda r: max(float(s["p99_ms"]["value"]) for s in r["guest_stalls"])),
    ("worst guest stall (guest probe, ms)",
     lambda r: max(float(s["max_ms"]["value"]) for s in r["guest_stalls"])),
    ("guest stalled in total (guest probe, ms)",
     lambda r: sum(float(s["total_stalled_ms"]["value"]) for s in r["guest_stalls"])),
)


def one_run(scenario_file: Path, runs: Path) -> Any:
    """Run ``migrator run`` once and return its report.json."""
    before = set(runs.iterdir()) if runs.exists() else set()
    done = subprocess.run(
        [sys.executable, "-m", "migrator", "run", str(scenario_file), "--runs-dir", str(runs),
         "--json"], capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"migrator run {scenario_file.name} failed ({done.returncode}): "
                 f"{done.stderr.strip()[-400:]}")
    (run_dir,) = set(runs.iterdir()) - before
    return json.loads((run_dir / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--scenario", type=Path, default=ROOT / "configs" / "local-demo.toml")
    parser.add_argument("--keep", type=Path, help="keep the run directories here")
    args = parser.parse_args()
    base = load_scenario(args.scenario)
    with tempfile.TemporaryDirectory(prefix="migrator-cost-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        files = {"all on": work / "all-on.toml"}
        files["all on"].write_text(dump_scenario(base))
        for name, change in VARIANTS.items():
            files[name] = work / (name.replace(" ", "-") + ".toml")
            files[name].write_text(dump_scenario(change(base)))
        # differences[variant][figure] = [percent, ...]: (all on - without) / without.
        differences: dict[str, dict[str, list[float]]] = {
            name: {label: [] for label, _ in FIGURES} for name in VARIANTS}
        for pair in range(args.pairs):
            for name in VARIANTS:
                # Alternate which run of a pair goes first, so drift cancels.
                order = ["all on", name] if pair % 2 == 0 else [name, "all on"]
                reports = {which: one_run(files[which], work / "runs") for which in order}
                for label, read in FIGURES:
                    with_it, without = read(reports["all on"]), read(reports[name])
                    if without > 0:
                        differences[name][label].append(100 * (with_it - without) / without)
                print(f"pair {pair + 1}/{args.pairs}: {name} done", file=sys.stderr)
    print(f"{'instrument':12} {'figure':42} {'median %':>9} {'min %':>8} {'max %':>8} {'n':>3}")
    for name, by_figure in differences.items():
        for label, values in by_figure.items():
            if not values:
                print(f"{name:12} {label:42} {'-':>9} {'-':>8} {'-':>8} {0:3}")
                continue
            print(f"{name:12} {label:42} {statistics.median(values):9.1f} "
                  f"{min(values):8.1f} {max(values):8.1f} {len(values):3}")
    print("% = (with the instrument - without) / without, per interleaved pair; target "
          "(issue 13): under 5 %")


if __name__ == "__main__":
    main()
