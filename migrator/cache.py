"""The controller's cache: a directory of JSON files of facts that rarely change.

What a run would otherwise find out again every time lives here: the built
microguest (``guest/``), the accelerator verdict (``accel.json``) and the host facts
that only a reboot or a new binary can change (``host-facts.json``: QEMU probes and
the HGM kernel probe, see :func:`host_key`).  ``MIGRATOR_CACHE`` moves the directory;
deleting it is always safe.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from migrator.rundir import atomic_write

__all__ = ["CACHE_DIR", "HOST_FACTS", "read_cache", "store_in_cache"]

CACHE_DIR = Path(os.environ.get("MIGRATOR_CACHE", Path.home() / ".cache" / "migrator"))
#: Host facts keyed on the host's boot id and the binaries' identities.
HOST_FACTS = CACHE_DIR / "host-facts.json"


def read_cache(path: Path) -> dict[str, Any]:
    """Every entry of a cache file; empty when it is missing or unreadable."""
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def store_in_cache(path: Path, key: str, entry: Any) -> None:
    """Add one entry to a cache file.

    Read, merged and written under a lock: two hosts probed at once (or two
    migrator processes) finish at the same moment, and no entry may be lost.
    Replaced atomically, as readers (the runs of a parallel suite) take no lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = read_cache(path)
        cache[key] = entry
        atomic_write(path, json.dumps(cache, indent=1) + "\n")
