"""Wall time of the README's main job and how much of it is migrator itself.

Runs ``migrator run configs/local-demo.toml`` (after set-up) in a subprocess a
few times, then splits each run's wall time using the run's own timeline
(host wall clock marks) into what QEMU and the guest spend (boot to ready,
warm-up, migration, settle, verify) and what is migrator's (start-up and
imports, preflight, guest build or cache check, accelerator decision,
hugepage reservation, QEMU launch, teardown, report).  It also prints the controller's
own CPU time per stretch (the migrator process's user + system time, its threads
included, QEMU and other child processes not).  Targets (issue 13): 0.5 s of wall
overhead and 0.3 s of controller CPU per run.

    .venv/bin/python benchmarks/main_job_overhead.py [--runs 3] [--scenario FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stretches of the timeline: (start mark, end mark, label, whose time).  None for the
# start is the process start; None for the end is the process exit.
STRETCHES = (
    (None, "preflight", "start-up and imports", "migrator"),
    ("preflight", "source-started", "preflight + guest build/cache + accel + launch", "migrator"),
    ("source-started", "guest-ready", "guest boot to ready", "vm"),
    ("guest-ready", "capabilities-set", "warm-up (scenario)", "vm"),
    ("capabilities-set", "migrate", "migration set-up", "migrator"),
    ("migrate", "destination-finished", "migration", "vm"),
    ("destination-finished", "settling", "after migration", "migrator"),
    ("settling", "verifying", "settle (scenario)", "vm"),
    ("verifying", "verified", "guest verify", "vm"),
    ("verified", "shutdown", "before shutdown", "migrator"),
    ("shutdown", "cleaned-up", "teardown (shutdown -> cleaned up)", "migrator"),
    ("cleaned-up", None, "report (cleaned up -> exit)", "migrator"),
)


# ``python -m migrator ARGS`` that writes its own CPU time (RUSAGE_SELF) to a file on exit.
_MEASURED = (
    "import atexit, json, resource, runpy, sys\n"
    "out = sys.argv[1]\n"
    "def report():\n"
    "    usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "    with open(out, 'w') as f:\n"
    "        json.dump({'user': usage.ru_utime, 'system': usage.ru_stime}, f)\n"
    "atexit.register(report)\n"
    "sys.argv = ['migrator', *sys.argv[2:]]\n"
    "runpy.run_module('migrator', run_name='__main__')\n"
)


def one_run(scenario: Path, runs: Path) -> dict[str, tuple[float, float]]:
    """Run the main job once: (wall s, controller CPU s) per stretch, plus totals.

    Wall times come from the timeline's host clock marks; the controller's CPU at
    each mark from the same records (``controller_cpu_ns``), at the ends from the
    process start (0) and its exit (``getrusage``).
    """
    cpu_file = runs / "cpu.json"
    began = time.time_ns()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, str(cpu_file), "run", str(scenario),
         "--runs-dir", str(runs / "runs"), "--json"],
        capture_output=True, text=True, check=False,
    )
    ended = time.time_ns()
    if done.returncode != 0:
        sys.exit(f"migrator run failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    run_dir = max((runs / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    usage = json.loads(cpu_file.read_text())
    exit_cpu = usage["user"] + usage["system"]
    wall: dict[str | None, int] = {None: began}
    cpu: dict[str | None, float] = {None: 0.0}
    for line in (run_dir / "timeline.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["what"] not in wall:
            wall[record["what"]] = record["host_ns"]
            cpu[record["what"]] = record["controller_cpu_ns"] / 1e9
    out: dict[str, tuple[float, float]] = {}
    vm_wall = vm_cpu = 0.0
    for start, end, label, whose in STRETCHES:
        seconds = ((wall[end] if end else ended) - wall[start]) / 1e9
        cpu_s = (cpu[end] if end else exit_cpu) - cpu[start]
        out[f"{label} [{whose}]"] = (seconds, cpu_s)
        if whose == "vm":
            vm_wall += seconds
            vm_cpu += cpu_s
    total = (ended - began) / 1e9
    out["total"] = (total, exit_cpu)
    out["migrator overhead (total - VM stretches)"] = (total - vm_wall, exit_cpu - vm_cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenario", type=Path, default=ROOT / "configs" / "local-demo.toml")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="migrator-bench-") as scratch:
        for index in range(args.runs):
            results.append(one_run(args.scenario, Path(scratch)))
            print(f"run {index + 1}/{args.runs}: {results[-1]['total'][0]:.2f} s", file=sys.stderr)
    print(f"{'stretch':62} {'wall median s':>13} {'min':>6} {'max':>6} "
          f"{'controller CPU median s':>23} {'min':>6} {'max':>6}")
    for key in results[0]:
        walls = [r[key][0] for r in results]
        cpus = [r[key][1] for r in results]
        print(f"{key:62} {statistics.median(walls):13.3f} {min(walls):6.3f} {max(walls):6.3f} "
              f"{statistics.median(cpus):23.3f} {min(cpus):6.3f} {max(cpus):6.3f}")
    print("controller CPU: the migrator process's user + system time (its threads, not QEMU "
          "or other children); targets (issue 13): 0.3 s CPU and 0.5 s wall overhead per run")


if __name__ == "__main__":
    main()
