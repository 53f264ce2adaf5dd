"""The guides (docs/*.md) and the commands they show, for unit and integration tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["GUIDES", "ROOT", "documented_commands"]

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs").glob("*.md"))


def documented_commands() -> list[tuple[str, str]]:
    """(guide, command) for every ``$ `` line in the guides."""
    found = []
    for guide in GUIDES:
        for line in guide.read_text().splitlines():
            if line.strip().startswith("$ "):
                found.append((guide.name, line.strip()[2:]))
    return found
