"""What the CLI says after an interrupt: only what the run directory confirms."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from migrator.errors import ArtifactError
from migrator.rundir import RunMeta

__all__ = ["interrupted_statement"]

_INTERRUPTED = "[bold red]interrupted[/bold red]"


def interrupted_statement(run_dir: Path | None) -> str:
    """How an interrupted run's clean-up went, as rich markup, from its ``run.json``.

    However a run ends, the runner records ``"teardown": {"clean": bool,
    "problems": [str, ...]}`` in ``run.json``.  Only ``clean: true`` is called a
    clean teardown; ``clean: false`` lists what was left, one problem a line.
    Without a run directory, or without a readable, well-formed ``teardown``
    (the run was stopped before writing it, or ran before migrator recorded it),
    nothing is claimed: the timeline says what the teardown did.
    """
    if run_dir is None:
        return f"{_INTERRUPTED} before the run had a run directory"
    timeline = escape(str(run_dir / "timeline.jsonl"))
    teardown = _read_teardown(run_dir)
    if teardown is None:
        return f"{_INTERRUPTED}; clean-up not confirmed, see {timeline}"
    clean, problems = teardown
    if clean:
        return (f"{_INTERRUPTED}: torn down cleanly (every QEMU stopped, hugepages given "
                "back)")
    if not problems:
        return f"{_INTERRUPTED}: clean-up incomplete, see {timeline}"
    left = "".join(f"\n  {escape(problem)}" for problem in problems)
    return f"{_INTERRUPTED}: clean-up incomplete, left behind (see {timeline}):{left}"


def _read_teardown(run_dir: Path) -> tuple[bool, list[str]] | None:
    """``run.json``'s ``teardown`` as (clean, problems); None when absent or malformed."""
    try:
        teardown = RunMeta.read(run_dir).teardown
    except ArtifactError:
        return None
    return None if teardown is None else (teardown.clean, teardown.problems)
