"""Recognising a guest kernel that crashed, from its serial console text."""

from __future__ import annotations

import re

__all__ = ["kernel_crash"]

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
