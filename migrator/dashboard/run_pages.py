"""The dashboard's run pages: links to each run's report, and pages for runs without one.

A run whose ``report.html`` is under ``runs_root`` is linked where it is; every
other linked run gets ``runs/<run_id>.html``, drawn from its stored report.json
with the run report's own tables (:mod:`migrator.report.run_tables`).  Pages
are kept between builds and rewritten only when the stored report (its sha256)
or the page layout changed; worker processes render them (:func:`render_run_pages`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment
from pydantic import ValidationError

import migrator
from migrator import tables, units
from migrator.dashboard.views import slug
from migrator.model import SCHEMA_VERSION, Report
from migrator.outcome import severity
from migrator.report.html import TEMPLATES as REPORT_TEMPLATES
from migrator.report.html import environment
from migrator.report.run_tables import (
    comparison_table,
    environment_line,
    fetch_table,
    headline_tables,
)
from migrator.report.sources import Sources
from migrator.results.schema import DIMENSIONS
from migrator.results.store import ResultsStore
from migrator.rundir import atomic_write
from migrator.tables import Cell, Table
from migrator.units import format_value

__all__ = ["MANIFEST", "TEMPLATES", "RunLinks", "RunPageJob", "RunPagePlan", "plan_run_pages",
           "render_run_page", "render_run_pages", "site_environment"]

TEMPLATES = Path(__file__).parent / "templates"
MANIFEST = ".manifest.json"


class RunLinks:
    """Where each run's report is, as a link from a page of the site.

    A run's own ``report.html`` under ``runs_root/<run_id>/`` is linked where it
    is (a relative path, so the site and the runs can move together); every
    other run gets a page ``runs/<run_id>.html`` generated from its stored report.
    """

    def __init__(self, out: Path, runs_root: Path | None) -> None:
        self.out = out.resolve()
        self.runs_root = runs_root.resolve() if runs_root is not None else None
        self._site: dict[str, tuple[str, bool]] = {}

    def _find(self, run_id: str) -> tuple[str, bool]:
        # A run id is a directory name; anything else must not become a path outside the root.
        if self.runs_root is not None and run_id not in {".", ".."} and "/" not in run_id:
            report = self.runs_root / run_id / "report.html"
            if report.is_file():
                return os.path.relpath(report, self.out), False
        return f"runs/{slug(run_id)}.html", True

    def site_path(self, run_id: str) -> str:
        """The report of ``run_id`` relative to the site's root directory."""
        found = self._site.get(run_id)
        if found is None:
            found = self._site[run_id] = self._find(run_id)
        return found[0]

    def generated(self, run_id: str) -> bool:
        """True when ``run_id`` needs a page generated from its stored report."""
        self.site_path(run_id)
        return self._site[run_id][1]

    def href(self, run_id: str, depth: int) -> str:
        """Link to the report of ``run_id`` from a page ``depth`` directories below the root."""
        return "../" * depth + quote(self.site_path(run_id))


def site_environment() -> Environment:
    """The Jinja environment of the dashboard's pages: the report's, with the dashboard's
    templates first, so that the report's macros (tables, style) are shared."""
    return environment(TEMPLATES)


def layout_version() -> str:
    """Changes whenever a generated run page would look different."""
    digest = hashlib.sha256(migrator.__version__.encode())
    # This module, the report's tables (the model, report/run_tables.py, the source
    # citations and the number formatting) and the templates the page uses.
    for path in (Path(__file__), Path(tables.__file__), Path(units.__file__),
                 REPORT_TEMPLATES.parent / "run_tables.py", REPORT_TEMPLATES.parent / "sources.py",
                 TEMPLATES / "run_page.html.j2", TEMPLATES / "_dash.html.j2",
                 REPORT_TEMPLATES / "_macros.html.j2"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _dimension_table(row: Mapping[str, Any]) -> Table:
    cells = [[Cell(key), Cell(format_value(row.get(key)))] for key in DIMENSIONS if key != "run_id"]
    for key in ("origin", "imported_at"):
        if row.get(key) is not None:
            cells.append([Cell(key), Cell(format_value(row[key]))])
    return Table("Dimensions (results store)", ["dimension", "value"], cells)


def _metric_table(sample: Mapping[str, float], units: Mapping[str, str]) -> Table:
    return Table("Stored metrics (what the verdicts compare)", ["metric", "value", "unit"],
                 [[Cell(name), Cell(format_value(sample[name], units.get(name, "")), numeric=True),
                   Cell(units.get(name, ""))] for name in sorted(sample)])


def render_run_page(env: Environment, row: Mapping[str, Any], document: Mapping[str, Any],
                    sample: Mapping[str, float], units: Mapping[str, str],
                    scenario_href: str) -> str:
    """A run's page from its stored report.json: the report's own tables, no plots."""
    report: Report | None = None
    problem = ""
    if document.get("schema_version") != SCHEMA_VERSION:
        problem = (f"stored report is schema {document.get('schema_version')}, this migrator "
                   f"reads {SCHEMA_VERSION}: only the stored metrics are shown")
    else:
        try:
            report = Report.model_validate(document)
        except ValidationError as error:
            problem = f"stored report does not validate ({error.error_count()} errors)"
    sources = Sources()
    tables: list[Table] = []
    if report is not None:
        tables = [*headline_tables(report, sources), fetch_table(report, sources),
                  comparison_table(report, sources)]
    return env.get_template("run_page.html.j2").render(
        row=row, report=report, problem=problem, tables=tables,
        badge=severity(str(row["outcome"])),
        dimensions=_dimension_table(row),
        # The report's tables show the same numbers; only without them are these needed.
        metrics=_metric_table(sample, units) if report is None else None,
        env_line=environment_line(report) if report is not None else "",
        sources=sorted((n, s) for s, n in sources.numbers.items()),
        scenario_href=scenario_href, prefix="../",
        raw=json.dumps(document, indent=1, sort_keys=True) if report is None else "",
        generator=migrator.__version__,
    )


@dataclass(frozen=True)
class RunPageJob:
    """Run pages to write: per run its row, file name, metrics and scenario page link."""

    url: str | None
    folder: Path
    pages: list[tuple[dict[str, Any], str, dict[str, float], str]]
    units: dict[str, str]


def render_run_pages(job: RunPageJob,
                     store: ResultsStore | None = None) -> list[tuple[str, str]]:
    """Write the pages of ``job``, reading reports from ``store`` (else one it attaches
    to at ``job.url``, :meth:`ResultsStore.attach`).

    Runs in a worker process of :func:`build_dashboard`, hence the picklable
    job and a store per call.  Returns ``(run_id, report_sha256)`` per page written.
    """
    own = store is None
    if store is None:
        if job.url is None:
            raise ValueError("a run page job without a store URL needs the store")
        store = ResultsStore.attach(job.url)
    env = site_environment()
    by_id = {row["run_id"]: (row, name, sample, href) for row, name, sample, href in job.pages}
    done = []
    try:
        for run_id, document in store.stored_reports(list(by_id)):
            row, name, sample, href = by_id[run_id]
            atomic_write(job.folder / name,
                         render_run_page(env, row, document, sample, job.units, href))
            done.append((run_id, str(row["report_sha256"])))
    finally:
        if own:
            store.close()
    return done


@dataclass
class RunPagePlan:
    """Which run pages a build writes, and the manifest of those it keeps."""

    folder: Path
    manifest: dict[str, Any]
    todo: list[tuple[dict[str, Any], str, dict[str, float], str]]
    kept: int

    def jobs(self, url: str | None, units: dict[str, str], parts: int) -> list[RunPageJob]:
        """The pages to write in ``parts`` jobs of about equal size."""
        size = max(1, -(-len(self.todo) // max(parts, 1)))
        return [RunPageJob(url, self.folder, self.todo[i:i + size], units)
                for i in range(0, len(self.todo), size)]

    def finish(self, done: Iterable[tuple[str, str]]) -> None:
        """Record the pages written in the manifest (written last: a build that dies
        before it leaves pages the next build rewrites, never a manifest that lies)."""
        self.manifest["pages"].update(done)
        atomic_write(self.folder / MANIFEST, json.dumps(self.manifest, indent=0, sort_keys=True))


def plan_run_pages(out: Path, rows: Mapping[str, dict[str, Any]], links: RunLinks,
                   scenario_of: Mapping[str, str],
                   samples: Mapping[str, Mapping[str, float]]) -> RunPagePlan:
    """The run pages missing or stale (report or layout changed); removes unlinked ones."""
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    version = layout_version()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("layout") != version:
            manifest = {"layout": version, "pages": {}}
    except (OSError, ValueError):
        manifest = {"layout": version, "pages": {}}
    built: dict[str, str] = manifest["pages"]
    wanted = {run_id: slug(run_id) + ".html" for run_id in rows if links.generated(run_id)}
    for run_id in set(built) - set(wanted):
        # Only pages this builder wrote (listed in its manifest) are ever removed.
        (folder / (slug(run_id) + ".html")).unlink(missing_ok=True)
        del built[run_id]
    todo = []
    for run_id, name in wanted.items():
        if built.get(run_id) == rows[run_id]["report_sha256"] and (folder / name).is_file():
            continue
        built.pop(run_id, None)
        todo.append((rows[run_id], name, dict(samples.get(run_id, {})),
                     f"../scenarios/{quote(scenario_of[run_id])}.html"))
    return RunPagePlan(folder, manifest, todo, len(wanted) - len(todo))
