"""Footnoted metric sources: each distinct source gets one number that tables cite."""

from __future__ import annotations

from migrator.model import Metric

__all__ = ["Sources"]


class Sources:
    """Numbers each distinct metric source once, so tables cite ``[n]`` instead of prose."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def number(self, source: str) -> int:
        """The footnote number of ``source`` (a new one the first time it is seen)."""
        return self.numbers.setdefault(source, len(self.numbers) + 1)

    def cite(self, metric: Metric) -> str:
        """The footnote mark of this metric's source (then of what contradicts it)."""
        number = self.number(metric.source)
        against = "" if metric.contradicted_by is None else self.cite(metric.contradicted_by)
        return f"[{number}]{against}"

    def legend(self) -> str:
        """All cited sources, one per line."""
        return "\n".join(f"[{n}] {source}" for source, n in self.numbers.items())
