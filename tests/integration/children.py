"""``migrator`` as a child process of a test, gone with everything it held when the test ends.

A test that starts ``python -m migrator`` must not leave it behind when the test
fails half-way (a timeout, a failed assertion, Ctrl-C): a migrator still running
keeps its QEMUs, hugepages and hugetlbfs mount.  :func:`migrator_child` starts it
in a session of its own and, on the way out, asks it to tear down in order
(SIGTERM), then kills the whole session; whatever it left anyway (hugepages it
added, hugetlbfs mounts it made) is put back.  When the test itself passed,
such a leftover fails it: migrator must not leave anything, so a leak is a bug.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["migrator", "migrator_child", "run_migrator"]

HUGEPAGES = Path("/sys/kernel/mm/hugepages")
# ``python -m migrator ARGS`` with SIGINT at its default, as a user at a terminal has it. A
# test run started in the background (a CI job, `cmd &` in a script without job control)
# has SIGINT ignored, every child inherits that across exec, and Python then never raises
# KeyboardInterrupt: a Ctrl-C test would see its run complete instead of being interrupted.
_AS_AT_A_TERMINAL = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'migrator', *sys.argv[1:]])\n"
)
# How long a child that is still running gets to tear down after SIGTERM.
TEARDOWN_S = 30.0


def _pools() -> dict[Path, int]:
    return {path: int(path.read_text())
            for path in HUGEPAGES.glob("hugepages-*/nr_hugepages")}


def _migrator_mounts() -> set[str]:
    """hugetlbfs mount points that migrator makes (under /run/migrator)."""
    return {fields[1] for line in Path("/proc/mounts").read_text().splitlines()
            if (fields := line.split())[2] == "hugetlbfs" and fields[1].startswith("/run/migrator")}


def _stop(child: subprocess.Popen[Any]) -> list[str]:
    """End ``child`` and its session; what had to be forced, one line each."""
    forced = []
    if child.poll() is None:
        forced.append(f"migrator (pid {child.pid}) still running at the end of the test")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=TEARDOWN_S)
        except subprocess.TimeoutExpired:
            forced.append(f"migrator ignored SIGTERM for {TEARDOWN_S:g} s")
    # Anything left in its session (a QEMU whose death signal was lost, a helper).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
        forced.append("processes left in migrator's session")
    child.wait()
    return forced


def _other_migrators() -> bool:
    """Whether another ``migrator`` runs on this machine (whose pool and mounts are its own)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"migrator" in argv[1:3] or any(arg.endswith(b"/bin/migrator") for arg in argv[:2]):
            return True
    return False


def _restore(pools: dict[Path, int], mounts: set[str]) -> list[str]:
    """Give back hugepages and unmount hugetlbfs mounts made since; what was left.

    Only when no other migrator runs here (a benchmark beside the tests): what
    changed may then be that one's, and is not touched.
    """
    if _other_migrators():
        return []
    left = []
    for mount in sorted(_migrator_mounts() - mounts):
        left.append(f"hugetlbfs mount {mount}")
        subprocess.run(["umount", "-l", mount], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(mount)
    for path, before in pools.items():
        now = int(path.read_text())
        if now != before:
            left.append(f"{path.parent.name}: {now} pages instead of {before}")
            path.write_text(str(before))
    return left


@contextlib.contextmanager
def migrator_child(args: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """``python -m migrator ARGS``; on exit nothing it started or reserved is left.

    ``popen`` goes to :class:`subprocess.Popen` (``stdout``, ``stderr``...).
    """
    pools, mounts = _pools(), _migrator_mounts()
    child = subprocess.Popen([sys.executable, "-c", _AS_AT_A_TERMINAL, *args], text=True,
                             start_new_session=True, **popen)
    failed = False
    try:
        yield child
    except BaseException:
        failed = True
        raise
    finally:
        forced = _stop(child)
        left = _restore(pools, mounts)
        # A child that ended by itself and left something behind is a migrator bug.
        if not failed and (forced or left):
            raise AssertionError("migrator left behind: " + "; ".join(forced + left))


def run_migrator(args: Sequence[str], *, timeout: float,
                 **popen: Any) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run`` of ``python -m migrator ARGS`` with output captured,
    through :func:`migrator_child` (a timeout tears the child down and raises)."""
    with migrator_child(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        **popen) as child:
        stdout, stderr = child.communicate(timeout=timeout)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def migrator(*args: str) -> subprocess.CompletedProcess[str]:
    """:func:`run_migrator` of a command that ends within two minutes (a check, a refusal)."""
    return run_migrator(args, timeout=120)
