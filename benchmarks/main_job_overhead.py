"""Wall time of the README's main job and how much of it is migrator itself.

Runs ``migrator run configs/local-demo.toml`` (after set-up) in a subprocess a
few times, then splits each run's wall time using the run's own timeline
(host wall clock marks) into what QEMU and the guest spend (boot to ready,
warm-up, migration, settle, verify) and what is migrator's (start-up and
imports, preflight, guest build or cache check, accelerator decision,
hugepage reservation, QEMU launch, teardown, report).  Target: under 3 s of
migrator overhead per run.  It also prints the controller's own CPU time (the
migrator process's user + system time, its threads included, QEMU and other child
processes not): issue 13's target is 0.3 s per run.

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

# Stretches of the timeline that are the VM's, not migrator's (start mark, end mark).
VM_TIME = (
    ("source-started", "guest-ready", "guest boot to ready"),
    ("guest-ready", "capabilities-set", "warm-up (scenario)"),
    ("migrate", "destination-finished", "migration"),
    ("settling", "verifying", "settle (scenario)"),
    ("verifying", "verified", "guest verify"),
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


def one_run(scenario: Path, runs: Path) -> dict[str, float]:
    """Run the main job once; returns seconds per stretch plus total and overhead."""
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
    cpu = json.loads(cpu_file.read_text())
    marks: dict[str, int] = {}
    for line in (run_dir / "timeline.jsonl").read_text().splitlines():
        record = json.loads(line)
        marks.setdefault(record["what"], record["host_ns"])
    out = {"total": (ended - began) / 1e9}
    vm = 0.0
    for start, end, label in VM_TIME:
        seconds = (marks[end] - marks[start]) / 1e9
        out[label] = seconds
        vm += seconds
    out["startup (process start -> preflight)"] = (marks["preflight"] - began) / 1e9
    out["preflight + guest build/cache + accel"] = (marks["source-started"]
                                                    - marks["preflight"]) / 1e9
    out["teardown (shutdown -> cleaned up)"] = (marks["cleaned-up"] - marks["shutdown"]) / 1e9
    out["report (cleaned up -> exit)"] = (ended - marks["cleaned-up"]) / 1e9
    out["migrator overhead (total - VM time)"] = out["total"] - vm
    out["controller CPU, user + system (migrator process)"] = cpu["user"] + cpu["system"]
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
            print(f"run {index + 1}/{args.runs}: {results[-1]['total']:.2f} s", file=sys.stderr)
    print(f"{'stretch':45} {'median s':>9} {'min s':>7} {'max s':>7}")
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"{key:45} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
