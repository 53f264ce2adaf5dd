"""A run whose guest kernel crashed says so: in its error, and in run.json for tools."""

from __future__ import annotations

from pathlib import Path

from migrator.errors import GuestError
from migrator.guest.crash import attribute_to_guest_crash, first_guest_crash
from migrator.rundir import RunDir

RUNS = Path(__file__).parents[1] / "data" / "runs"
OOPS = "BUG: kernel NULL pointer dereference, address: 0000000000000000"


def test_the_crash_is_found_on_the_side_that_printed_it() -> None:
    assert first_guest_crash(RunDir(RUNS / "crashed-memfd-4k")) == {"side": "dst", "line": OOPS}
    assert first_guest_crash(RunDir(RUNS / "hugetlb-2m")) is None


def test_a_quiet_console_is_named_as_the_crash_behind_it() -> None:
    quiet = GuestError("dst console no 'verify' line within 600s")
    diagnosed = attribute_to_guest_crash(quiet, {"side": "dst", "line": OOPS})
    assert isinstance(diagnosed, GuestError)
    assert str(diagnosed) == f"the guest kernel crashed on dst ({OOPS}); see dst/serial.log"
    assert diagnosed.__cause__ is quiet
    assert attribute_to_guest_crash(quiet, None) is quiet
