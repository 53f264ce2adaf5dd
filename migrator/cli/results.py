"""``migrator results import|list`` and ``migrator compare``: the results store on the command line.

Thin commands over :mod:`migrator.results`; heavy imports (SQLAlchemy, alembic,
scipy) happen inside the commands so the rest of the CLI starts fast.

Exit codes of ``compare`` are for CI: 0 no metric regressed, 1 at least one
regressed, 2 the comparison could not be made (bad selector or option, no
matching runs, store unreachable).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from migrator.cli.common import VerboseOption, err, fail, out, print_error, setup_logging
from migrator.errors import ArtifactError, ConfigError, ExitCode, MigratorError

if TYPE_CHECKING:
    from rich.console import JustifyMethod
    from rich.table import Table

    from migrator.results.compare import MetricRule, MetricVerdict
    from migrator.results.store import ResultsStore

__all__ = ["compare", "open_store", "results_app", "thresholds"]

results_app = typer.Typer(no_args_is_help=True,
                          help="The results store: import finished runs, list them.")

DbOption = Annotated[str | None, typer.Option(
    "--db", metavar="PATH|URL",
    help="SQLite file or database URL (postgresql+psycopg://user@host/db); "
         "default $MIGRATOR_RESULTS, else ./results.sqlite")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON, not a table")]
ThresholdOption = Annotated[list[str] | None, typer.Option(
    "--threshold", metavar="PATTERN=PERCENT",
    help="minimum relative effect for matching metrics, e.g. 'freeze_ms=30' "
         "(repeatable; overrides the defaults in docs/results.md)")]
AlphaOption = Annotated[float, typer.Option(
    help="significance level of the permutation test", min=1e-6, max=0.5)]

def open_store(db: str | None, *, create: bool = False) -> ResultsStore:
    """The store at ``--db``; a missing SQLite file is a ConfigError unless ``create``.

    Only ``results import`` creates a store: a command that reads one would otherwise
    turn a mistyped path into a new empty store (and say "no run matches").
    """
    from migrator.results.store import ResultsStore

    return ResultsStore.open(db, create=create)


@results_app.command("import")
def import_runs(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", help="run directories made by 'migrator run'")],
    db: DbOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Record finished runs in the store (re-importing a run updates it, never duplicates it).

    A run without report.json gets one built from its raw artifacts (the run
    directory is not written).  A directory that is not a finished run is
    refused with an error; the other directories are still imported.
    """
    setup_logging(verbose)
    try:
        store = open_store(db, create=True)
    except MigratorError as error:
        raise fail(error) from None
    status = 0
    with store:
        for run_dir in run_dirs:
            try:
                result = store.import_run(run_dir)
            except MigratorError as error:
                print_error(error)
                # A directory that is not a run is bad input, like a bad path.
                status = status or (ExitCode.BAD_INPUT if isinstance(error, ArtifactError)
                                    else error.exit_code)
                continue
            notes = f" ({'; '.join(result.notes)})" if result.notes else ""
            out.print(f"{result.status:9} {result.run_id}: {result.metrics} metrics{notes}",
                      highlight=False, soft_wrap=True)
    if status:
        raise typer.Exit(status)


@results_app.command("list")
def list_runs(
    where: Annotated[str | None, typer.Option(
        "--where", metavar="SELECTOR",
        help="key=value[,key=value] over dimensions (qemu=7.2.22,backing=hugetlb-2m), or run "
             "ids; default: every completed run")] = None,
    db: DbOption = None,
    json_out: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """List stored runs with their main dimensions, oldest first."""
    from rich.table import Table

    from migrator.results.store import parse_selector

    setup_logging(verbose)
    try:
        selector = parse_selector(where) if where else None
        with open_store(db) as store:
            rows = store.select(selector)
    except MigratorError as error:
        raise fail(error) from None
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=_iso))
        return
    table = Table(show_edge=False)
    # Run ids are what people copy into selectors: never cut them short.
    table.add_column("run", no_wrap=True, min_width=max((len(r["run_id"]) for r in rows),
                                                        default=3))
    for column in ("date (UTC)", "scenario", "backing", "preempt", "qemu", "accel", "outcome"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["run_id"], row["run_date"].strftime("%Y-%m-%d %H:%M"), row["scenario"],
                      row["backing"] or "-", _flag(row["preempt"]), row["qemu_version"] or "-",
                      row["accel"] or "-", row["outcome"])
    out.print(table)
    out.print(_runs(len(rows)), highlight=False)


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _iso(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("on" if value else "off")


def thresholds(specs: list[str]) -> list[MetricRule]:
    """``PATTERN=PERCENT`` overrides, each keeping the direction of the default rule."""
    from migrator.results.compare import DEFAULT_RULES, MetricRule, rule_for

    rules = []
    for spec in specs:
        pattern, sep, percent = spec.partition("=")
        try:
            threshold = float(percent.strip().rstrip("%")) / 100
        except ValueError:
            threshold = math.nan
        if not sep or not pattern or not math.isfinite(threshold) or threshold < 0:
            raise ConfigError(f"{spec!r}: expected PATTERN=PERCENT, e.g. 'fetch.*_ms=5'",
                              field="--threshold")
        base = rule_for(pattern, DEFAULT_RULES)
        rules.append(MetricRule(pattern, base.direction, threshold, "set on the command line"))
    return [*rules, *DEFAULT_RULES]


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 1048576:,.1f} MiB"
    text = f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:,.0f}"
    return f"{text} {unit}" if unit == "ms" else text


_STYLE = {"regression": "bold red", "improvement": "bold green", "changed": "yellow",
          "no change": "", "insufficient data": "dim"}


def _table(verdicts: list[MetricVerdict], units: dict[str, str]) -> Table:
    from rich.table import Table

    from migrator.results.compare import Verdict

    table = Table(show_edge=False)
    # Metric names and verdicts are the point of the table: they get their full width.
    table.add_column("metric", no_wrap=True,
                     min_width=max((len(v.metric) for v in verdicts), default=6))
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("n", "right"), ("baseline", "right"), ("candidate", "right"), ("change", "right"),
        ("p", "right"), ("threshold", "right"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    table.add_column("verdict", no_wrap=True, min_width=len(Verdict.INSUFFICIENT.value))
    for v in verdicts:
        unit = units.get(v.metric, "")
        change = v.relative_change
        change_text = ("-" if change is None else f"{change:+.1%}" if math.isfinite(change)
                       else "from 0")
        style = _STYLE.get(v.verdict.value, "")
        table.add_row(
            v.metric, f"{v.baseline_n}/{v.candidate_n}", _number(v.baseline_mean, unit),
            _number(v.candidate_mean, unit), change_text,
            "-" if v.p_value is None else f"{v.p_value:.2g}", f"{v.threshold:.0%}",
            f"[{style}]{v.verdict.value}[/]" if style else v.verdict.value)
    return table


def compare(
    baseline: Annotated[str, typer.Argument(
        metavar="BASELINE", help="baseline runs: key=value[,key=value] filters over dimensions "
             "(qemu=7.2.22,backing=hugetlb-2m,since=2026-11-01) or RUN_ID[,RUN_ID]")],
    candidate: Annotated[str, typer.Argument(metavar="CANDIDATE",
                                             help="candidate runs, same syntax")],
    db: DbOption = None,
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", metavar="PATTERN", help="compare only metrics matching (repeatable)")] = None,
    threshold: ThresholdOption = None,
    alpha: AlphaOption = 0.01,
    json_out: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Compare two sets of stored runs metric by metric; exit 1 if any metric regressed.

    A metric regresses only when a two-sided permutation test of the difference
    of means gives p < alpha AND its relative change exceeds the metric's
    threshold in the worse direction.  Exit 0: no regression; 1: regression;
    2: bad input (selector, option, no matching runs, store unreachable).
    """
    from migrator.results.compare import compare as compare_runs
    from migrator.results.compare import has_regression
    from migrator.results.store import parse_selector

    setup_logging(verbose)
    try:
        rules = thresholds(threshold or [])
        selectors = parse_selector(baseline), parse_selector(candidate)
        with open_store(db) as store:
            chosen = [store.select(selector) for selector in selectors]
            for selector, rows in zip(selectors, chosen, strict=True):
                if not rows:
                    raise ConfigError(f"selector {str(selector)!r} matches no stored run")
            ids = [[row["run_id"] for row in rows] for rows in chosen]
            samples = [store.metric_samples(run_ids) for run_ids in ids]
            verdicts = compare_runs(list(samples[0].values()), list(samples[1].values()),
                                    rules=rules, alpha=alpha, metrics=metric or ())
            if metric and not verdicts:
                raise ConfigError(f"no stored metric matches {', '.join(metric)}",
                                  field="--metric")
            units = store.units([v.metric for v in verdicts])
    except MigratorError as error:
        # 1 means "regression" to CI; every failure to compare is bad input.
        raise fail(error, ExitCode.BAD_INPUT) from None
    overlap = set(ids[0]) & set(ids[1])
    regressed = has_regression(verdicts)
    if json_out:
        doc: dict[str, Any] = {
            "baseline": {"selector": str(selectors[0]), "runs": ids[0]},
            "candidate": {"selector": str(selectors[1]), "runs": ids[1]},
            "alpha": alpha, "test": "two-sided permutation test, difference of means",
            "regression": regressed,
            "metrics": [{**v.to_dict(), "unit": units.get(v.metric)} for v in verdicts],
        }
        typer.echo(json.dumps(doc, indent=2))
    else:
        for label, selector, run_ids in (("baseline: ", selectors[0], ids[0]),
                                         ("candidate:", selectors[1], ids[1])):
            out.print(f"{label} {selector} ({_runs(len(run_ids))})", highlight=False)
        out.print(_table(verdicts, units))
        counts: dict[str, int] = {}
        for v in verdicts:
            counts[v.verdict.value] = counts.get(v.verdict.value, 0) + 1
        out.print(", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no metrics",
                  highlight=False)
    if overlap:
        err.print(f"[yellow]warning:[/yellow] {len(overlap)} runs are in both sets",
                  highlight=False)
    if regressed:
        raise typer.Exit(ExitCode.FAILED)
