"""How reliably migrator's scenarios complete with real post-copy: outcome counts per scenario.

Runs, each as a user would (``migrator run SCENARIO`` in a child process):

1. the README's main job, ``configs/local-demo.toml``, ``--runs`` times (30);
2. each row of ``benchmarks/page-size.toml``, ``--repeat`` times (10);
3. each other ``configs/*.toml``, ``--repeat`` times. A scenario with SSH hosts
   runs between two network-namespace hosts on this machine (the tests' testbed:
   real sshd, real keys), its ``[hosts.*]`` entries replaced by theirs and
   everything else as written.

Then prints, per scenario: how many runs, the outcomes with their exit codes, how
many completed with post-copy bytes > 0 and 0 bad pages (the target: all), the
source's final dirty-sync pass counts, post-copy bytes (min/median/max) and the
median wall time. Every run's facts are also written as JSON lines to
``OUT/runs.jsonl``, and every run directory is kept under ``OUT``. A row whose
first run is refused for HGM (exit 3 on a kernel without it) is reported as
not supported here and not repeated.

    .venv/bin/python benchmarks/main_job_reliability.py [--runs 30] [--repeat 10]
        [--only main|page-size|configs] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migrator.bench.suite import load_suite  # noqa: E402
from migrator.config import Scenario, dump_scenario, load_scenario, parse_scenario  # noqa: E402
from migrator.config.models import SSHHostSpec  # noqa: E402
from migrator.metrics.qemu_counters import load_counters  # noqa: E402
from migrator.rundir import artifact_path  # noqa: E402
from tests.integration.children import run_migrator  # noqa: E402
from tests.integration.ssh_scenarios import host_entry  # noqa: E402
from tests.integration.sshhosts import SSHTestbed, make_testbed  # noqa: E402

MAIN_JOB = ROOT / "configs" / "local-demo.toml"
PAGE_SIZE_SUITE = ROOT / "benchmarks" / "page-size.toml"
RUN_TIMEOUT_S = 900.0
MIB = 1 << 20


@dataclass
class Run:
    """What one ``migrator run`` ended as, read from its exit code and run directory."""

    scenario: str
    exit_code: int | None
    outcome: str | None
    passes: int | None
    postcopy_bytes: int | None
    bad_pages: int | None
    guest_crash: str | None
    seconds: float
    run_dir: str | None
    error: str | None

    @property
    def good(self) -> bool:
        """Completed, with real post-copy and every page verified."""
        return (self.outcome == "completed" and (self.postcopy_bytes or 0) > 0
                and self.bad_pages == 0)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_once(label: str, scenario_file: Path, runs: Path) -> Run:
    """``migrator run scenario_file`` once; the facts of the run it made."""
    runs.mkdir(parents=True, exist_ok=True)
    before = set(runs.iterdir())
    began = time.monotonic()
    error = None
    try:
        done = run_migrator(["run", str(scenario_file), "--runs-dir", str(runs)],
                            timeout=RUN_TIMEOUT_S, cwd=ROOT)
        code: int | None = done.returncode
        if code != 0:
            lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            error = lines[0] if lines else done.stderr.strip()[-300:]
    except (subprocess.TimeoutExpired, AssertionError) as failure:
        code, error = None, f"{type(failure).__name__}: {failure}"
    seconds = time.monotonic() - began
    made = sorted(set(runs.iterdir()) - before)
    run_dir = made[-1] if made else None
    meta = _read_json(run_dir / "run.json") if run_dir else {}
    passes = postcopy_bytes = None
    if run_dir is not None and artifact_path(run_dir / "samples.jsonl") is not None:
        # The report's own reader: the final reply, else the last samples of a run that died.
        counters = load_counters(run_dir)
        passes = counters.metric("src", "ram.dirty-sync-count", "passes").value
        postcopy_bytes = counters.metric("src", "ram.postcopy-bytes", "bytes").value
    crash = meta.get("guest_crash")
    return Run(
        scenario=label, exit_code=code, outcome=meta.get("outcome"),
        passes=None if passes is None else int(passes),
        postcopy_bytes=None if postcopy_bytes is None else int(postcopy_bytes),
        bad_pages=(meta.get("verify") or {}).get("bad_pages"),
        guest_crash=f"{crash['side']}: {crash['line']}" if crash else None,
        seconds=round(seconds, 2), run_dir=str(run_dir) if run_dir else None, error=error)


def _counts(values: list[Any]) -> str:
    counted = Counter(values)
    return ", ".join(f"{value} x{n}" for value, n in sorted(counted.items(), key=str))


def summary_row(label: str, runs: list[Run]) -> str:
    """One Markdown table row for a scenario's runs."""
    outcomes = _counts([f"{run.outcome or 'none'} ({run.exit_code})" for run in runs])
    good = sum(run.good for run in runs)
    sent = [run.postcopy_bytes / MIB for run in runs if run.postcopy_bytes is not None]
    sent_text = (f"{min(sent):.0f} / {statistics.median(sent):.0f} / {max(sent):.0f}"
                 if sent else "-")
    return (f"| {label} | {len(runs)} | {outcomes} | {good}/{len(runs)} | "
            f"{_counts([run.passes for run in runs])} | {sent_text} | "
            f"{statistics.median(run.seconds for run in runs):.1f} |")


HEADER = ("| scenario | runs | outcome (exit code) | completed with post-copy, 0 bad pages | "
          "dirty-sync passes | post-copy MiB min / median / max | median wall, s |\n"
          "|---|---|---|---|---|---|---|")


def _with_testbed_hosts(scenario: Scenario, bed: SSHTestbed, work_root: Path) -> Scenario:
    """``scenario`` with its SSH hosts replaced by the two namespace hosts."""
    data = scenario.model_dump(mode="json")
    data["hosts"] = {
        "source": host_entry(bed, bed.a, work_root),
        "destination": host_entry(bed, bed.b, work_root, migration_address=bed.b.peer_address),
    }
    return parse_scenario(data)


@contextlib.contextmanager
def _testbed(out: Path) -> Iterator[tuple[SSHTestbed, Path]]:
    work_root = Path(tempfile.mkdtemp(prefix="mig-", dir="/var/tmp"))
    keys = out / "ssh-testbed"
    keys.mkdir(exist_ok=True)
    try:
        with make_testbed(keys) as bed:
            yield bed, work_root
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


def scenarios(only: str | None, runs: int, repeat: int) -> Iterator[tuple[str, Scenario, int]]:
    """(label, scenario, how many runs) in the order they run."""
    if only in (None, "main"):
        yield "main job: configs/local-demo.toml", load_scenario(MAIN_JOB), runs
    if only in (None, "page-size"):
        for planned in load_suite(PAGE_SIZE_SUITE).runs:
            if planned.repetition == 1:  # each row once; --repeat says how often
                yield f"page-size.toml {planned.combination}", planned.scenario, repeat
    if only in (None, "configs"):
        for path in sorted((ROOT / "configs").glob("*.toml")):
            yield f"configs/{path.name}", load_scenario(path), repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of the main job")
    parser.add_argument("--repeat", type=int, default=10,
                        help="runs of each page-size row and each configs/*.toml")
    parser.add_argument("--only", choices=("main", "page-size", "configs"))
    parser.add_argument("--out", type=Path, help="where run directories and runs.jsonl go")
    args = parser.parse_args()
    if args.runs < 1 or args.repeat < 1:
        parser.error("--runs and --repeat must be at least 1")
    out = (args.out or Path(tempfile.mkdtemp(prefix="reliability-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    with contextlib.ExitStack() as stack:
        log = stack.enter_context((out / "runs.jsonl").open("a"))
        testbed: tuple[SSHTestbed, Path] | None = None
        for index, (label, scenario, count) in enumerate(
                scenarios(args.only, args.runs, args.repeat)):
            if isinstance(scenario.hosts.source, SSHHostSpec):
                if testbed is None:
                    testbed = stack.enter_context(_testbed(out))
                scenario = _with_testbed_hosts(scenario, *testbed)
                label += " (namespace hosts)"
            scenario_file = out / f"scenario-{index}.toml"
            scenario_file.write_text(dump_scenario(scenario))
            runs: list[Run] = []
            for number in range(count):
                run = run_once(label, scenario_file, out / f"runs-{index}")
                runs.append(run)
                log.write(json.dumps(asdict(run)) + "\n")
                log.flush()
                print(f"{label} [{number + 1}/{count}]: {run.outcome} ({run.exit_code}), "
                      f"{run.passes} passes, post-copy {run.postcopy_bytes} bytes, "
                      f"{run.bad_pages} bad pages, {run.seconds:.1f} s"
                      + (f"; {run.error}" if run.error else ""), flush=True)
                if number == 0 and run.exit_code == 3 and "hgm" in (run.error or "").lower():
                    print(f"{label}: HGM not supported here, not repeated", flush=True)
                    break
            rows.append(summary_row(label, runs))
    print()
    print(f"Run directories and runs.jsonl: {out}")
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
