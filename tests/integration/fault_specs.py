"""Faults for scenarios' ``[[faults]]`` tables, and the migration settings they are tested with."""

from __future__ import annotations

__all__ = ["SLOW_POSTCOPY", "STALL_TIMEOUT_S", "link_down", "strike"]

# Post-copy throttled so that it is still running when a fault strikes, and a stalled
# stream is noticed after 1 s (the default, 10 s, is for 1 GiB pages on busy hosts).
STALL_TIMEOUT_S = 1.0
SLOW_POSTCOPY: dict[str, object] = {"max_postcopy_bandwidth_mib_s": 32,
                                    "recovery": {"stall_timeout_s": STALL_TIMEOUT_S}}


def link_down(at: str, after_ms: int = 300, seconds: float = 3.0) -> dict[str, object]:
    """The destination's migration link down for ``seconds``."""
    return {"kind": "link-down", "host": "destination", "interface": "mig0",
            "duration_s": seconds, "at": at, "after_ms": after_ms}


def strike(kind: str, side: str, at: str, after_ms: int = 300,
           **more: object) -> dict[str, object]:
    """A fault aimed at one side's QEMU (or its host's connection)."""
    return {"kind": kind, "side": side, "at": at, "after_ms": after_ms, **more}
