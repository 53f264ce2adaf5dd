"""What the CLI says after an interrupt: only what the run directory confirms."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from migrator.rundir import RunDir

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
        meta = RunDir(run_dir).read_json("run.json")
    except (OSError, ValueError):
        return None
    teardown = meta.get("teardown") if isinstance(meta, dict) else None
    if not isinstance(teardown, dict):
        return None
    clean, problems = teardown.get("clean"), teardown.get("problems", [])
    if not isinstance(clean, bool) or not isinstance(problems, list) \
            or not all(isinstance(problem, str) for problem in problems):
        return None
    return clean, problems
