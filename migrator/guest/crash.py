"""Recognising a guest kernel that crashed, from its serial console text."""

from __future__ import annotations

import re

from migrator.errors import GuestError, MigratorError
from migrator.rundir import RunDir

__all__ = ["attribute_to_guest_crash", "first_guest_crash", "kernel_crash"]

# Lines the Linux kernel prints first when it oopses or panics.
_CRASH = re.compile(
    r"(Kernel panic - not syncing.*|BUG: .*|Oops: .*|general protection fault.*|"
    r"kernel BUG at .*|Unable to handle kernel .*)"
)
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s*")


def kernel_crash(console_text: str) -> str | None:
    """The first crash line of a guest console, without its timestamp; None if it did not crash."""
    for line in console_text.splitlines():
        if "@MIG " in line:
            continue
        match = _CRASH.search(line)
        if match:
            return _TIMESTAMP.sub("", match.group(1)).strip()
    return None


def first_guest_crash(run: RunDir) -> dict[str, str] | None:
    """The first guest kernel crash on a console, ``{"side", "line"}``; None if none crashed."""
    for side in ("dst", "src"):
        try:
            text = (run.side(side) / "serial.log").read_text(errors="replace")
        except FileNotFoundError:
            continue
        crash = kernel_crash(text)
        if crash:
            return {"side": side, "line": crash}
    return None


def attribute_to_guest_crash(error: MigratorError, crash: dict[str, str] | None) -> MigratorError:
    """Name a guest kernel crash behind a QEMU that exited or a console that went quiet."""
    if crash is None:
        return error
    side = crash["side"]
    diagnosed = GuestError(
        f"the guest kernel crashed on {side} ({crash['line']}); see {side}/serial.log"
    )
    diagnosed.__cause__ = error
    return diagnosed
