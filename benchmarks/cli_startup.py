"""Start-up time of the ``migrator`` command: ``--help`` and ``--version``, against 0.3 s.

Runs ``python -m migrator --help`` and ``python -m migrator --version`` as child
processes, N times each (stdout and stderr discarded), and prints the minimum,
median and maximum wall time of each.  The wall time is the whole process, as
a user waits for it: interpreter start, imports, argument parsing and output.
The median is what the target applies to; the minimum is the best this machine
can do, the maximum what a busy moment costs.  Exit status 1 when a median
misses the target, or when a command fails.

Usage: python benchmarks/cli_startup.py [-n 10] [--python PATH]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_S = 0.3
COMMANDS = (("--help",), ("--version",))


def wall_times(python: str, args: tuple[str, ...], runs: int) -> list[float]:
    """Wall seconds of ``runs`` runs of ``python -m migrator ARGS``; raises if one fails."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([python, "-m", "migrator", *args], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    """Time each command and print one line per command; 1 when a median misses the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=10, help="runs per command")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that has migrator installed (default: this one)")
    options = parser.parse_args()
    if options.runs < 1:
        parser.error("--runs must be at least 1")
    missed = False
    print(f"{'command':<20} {'min s':>7} {'median s':>9} {'max s':>7}   target {TARGET_S} s",
          flush=True)
    for args in COMMANDS:
        try:
            times = wall_times(options.python, args, options.runs)
        except subprocess.CalledProcessError as error:
            print(f"migrator {' '.join(args)} failed with exit status {error.returncode}",
                  file=sys.stderr)
            return 1
        median = statistics.median(times)
        verdict = "ok" if median < TARGET_S else "MISSED"
        missed = missed or median >= TARGET_S
        command = "migrator " + " ".join(args)
        print(f"{command:<20} {min(times):7.3f} {median:9.3f} {max(times):7.3f}   {verdict}",
              flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
