"""Disk a 4 KiB-page post-copy run keeps, with its raw artifacts plain and compressed.

Runs the main job (``configs/local-demo.toml``) with its guest on 4 KiB pages
(``vm.backing = "memfd-4k"``) through ``migrator run``, once with
``collect.compress = "none"`` and once with ``"zstd"`` (the default), and prints
the bytes of every file each run directory keeps, side by side, with the totals.
The destination trace is nearly all of it: a 4 KiB-page guest faults and places
each page on its own.  Issue 13's target: at most 5 MB per 4 KiB-page run.  Each
run's fault count and fetch p50 are printed too, to show that compressing does not
change what is measured; the runs are separate migrations, so those vary from run to
run (``--runs 3`` or more to compare them).

    .venv/bin/python benchmarks/run_disk.py [--runs 1] [--keep DIR]

Run it as root, alone on the machine (it boots QEMUs and reserves memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from migrator.config import dump_scenario, parse_scenario
from migrator.rundir import ZST

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "configs" / "local-demo.toml"
MODES = ("none", "zstd")
MB = 1_000_000


def scenario_file(where: Path, compress: str) -> Path:
    """The main job on 4 KiB pages, with ``collect.compress`` set."""
    data: dict[str, Any] = tomllib.loads(MAIN_JOB.read_text())
    data["name"] = f"run-disk-4k-{compress}"
    data["vm"]["backing"] = "memfd-4k"
    data.setdefault("collect", {})["compress"] = compress
    path = where / f"{compress}.toml"
    path.write_text(dump_scenario(parse_scenario(data)))
    return path


def one_run(scenario: Path, runs: Path) -> Path:
    """``migrator run`` the scenario; its run directory."""
    before = set(runs.iterdir()) if runs.exists() else set()
    done = subprocess.run(
        [sys.executable, "-m", "migrator", "run", str(scenario), "--runs-dir", str(runs),
         "--json"], capture_output=True, text=True, check=False, cwd=ROOT)
    made = sorted(set(runs.iterdir()) - before)
    if done.returncode != 0 or not made:
        raise SystemExit(f"migrator run {scenario.name} failed ({done.returncode}): "
                         f"{done.stderr.strip()[-500:]}")
    return made[-1]


def sizes(run_dir: Path) -> dict[str, int]:
    """Bytes of each file the run directory keeps, by path (a compressed file by its own)."""
    return {str(path.relative_to(run_dir)): path.stat().st_size
            for path in sorted(run_dir.rglob("*")) if path.is_file()}


def fetch(run_dir: Path) -> tuple[int, float | None]:
    """The guest RAM block's fault count and fetch p50 (ms), from the run's report."""
    report = json.loads((run_dir / "report.json").read_text())
    ram = next(block for block in report["fetch"] if block["ramblock"] == "ram0")
    return ram["faults"], ram["latency_ms"]["p50"]["value"]


def main() -> int:
    """Run both modes, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs per mode (medians printed)")
    parser.add_argument("--keep", type=Path, help="keep the run directories here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="run-disk-") as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        measured: dict[str, list[dict[str, int]]] = {mode: [] for mode in MODES}
        fetches: dict[str, list[tuple[int, float | None]]] = {mode: [] for mode in MODES}
        for rep in range(args.runs):
            # Alternating which goes first, so that neither always runs on a warmer machine.
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                run_dir = one_run(scenario_file(where, mode), where / "runs")
                measured[mode].append(sizes(run_dir))
                fetches[mode].append(fetch(run_dir))
        # One row per artifact, by its plain name; medians across runs.
        names = sorted({name.removesuffix(ZST) for runs in measured.values()
                        for one in runs for name in one})

        def median(mode: str, name: str) -> int | None:
            found = [one.get(name, one.get(name + ZST)) for one in measured[mode]]
            values = [v for v in found if v is not None]
            return int(statistics.median(values)) if values else None

        print(f"{'file (plain name)':<28} {'none bytes':>12} {'zstd bytes':>12} {'zstd form':>18}")
        for name in names:
            plain, packed = median("none", name), median("zstd", name)
            form = (name + ZST if any(name + ZST in one for one in measured["zstd"])
                    else "plain")
            print(f"{name:<28} {plain if plain is not None else '-':>12} "
                  f"{packed if packed is not None else '-':>12} {form:>18}")
        totals = {mode: statistics.median(sum(one.values()) for one in measured[mode])
                  for mode in MODES}
        print(f"{'total':<28} {int(totals['none']):>12} {int(totals['zstd']):>12}")
        print(f"\ntotal per run: none {totals['none'] / MB:.2f} MB, zstd "
              f"{totals['zstd'] / MB:.2f} MB ({totals['none'] / totals['zstd']:.1f}x smaller; "
              f"target <= 5 MB)")
        for mode in MODES:
            described = ", ".join(f"{faults} faults, p50 {p50} ms" for faults, p50 in fetches[mode])
            print(f"{mode}: {described}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
