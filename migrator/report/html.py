"""One run directory as one self-contained HTML page: interactive plots and the report's tables.

It draws what :func:`migrator.metrics.run_page.load_run_page_data` read from a
run directory (a :class:`~migrator.pagedata.RunPageData`; this module reads no
artifact): ``report.json`` (derived again from the raw artifacts with
``build_report`` when it is missing or of another schema) for the derived
numbers, and the raw artifacts for the series the report only summarises:

* fetch latency CDF per RAMBlock: ``report.fetch[*].histogram`` (the streaming
  histogram of the destination trace), plus QEMU's ``postcopy-latency-dist``
  when the destination QEMU reported one (>= 10.1);
* guest stall timeline per vCPU: every stall of ``src|dst/console.jsonl``
  (``load_guest``), the heartbeat gaps of the same files, the phases of
  ``report.phases``;
* bytes remaining and throughput: ``samples.jsonl`` (``query-migrate`` of both
  sides);
* per-vCPU blocktime: ``report.blocktime`` (QEMU's and the trace's);
* host CPU per QEMU thread over time: ``src|dst/threads.jsonl`` (each thread's
  utime + stime, sampled from ``/proc``), with the switchover marked;
* post-copy pauses (shaded on the stall and transfer plots) and injected
  faults: ``report.recoveries`` and ``report.faults``;
* tables: ``report.json``, ``scenario.toml`` verbatim and ``run.json``.

The page embeds plotly.js once, inline, so it opens without network access
(about 4.8 MB of the page is plotly.js).  The figures are
:mod:`migrator.report.figures`', the tables
:mod:`migrator.report.run_tables`' (those the terminal draws too, with every
column); this module lays them out on the page.
"""

from __future__ import annotations

import os
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

from migrator.outcome import severity
from migrator.pagedata import RunPageData
from migrator.report.figures import (
    blocktime_figure,
    fetch_cdf_figure,
    plot,
    stall_timeline_figure,
    thread_figure,
    transfer_figure,
)
from migrator.report.run_tables import (
    comparison_table,
    environment_line,
    facts_table,
    fault_table,
    fetch_table,
    headline_tables,
    latency_dist_table,
    pause_table,
    phase_table,
    stall_tables,
)
from migrator.report.sources import Sources
from migrator.rundir import atomic_write
from migrator.units import iso_time

__all__ = ["TEMPLATES", "environment", "render_run_html", "report_link", "write_run_html"]

TEMPLATES = Path(__file__).parent / "templates"


def environment(*template_dirs: Path) -> Environment:
    """The Jinja environment of the report pages; ``template_dirs`` come before
    :data:`TEMPLATES`, so a page elsewhere (the suite page) can import ``_macros.html.j2``."""
    return Environment(loader=FileSystemLoader([*template_dirs, TEMPLATES]), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                       keep_trailing_newline=True)


def render_run_html(data: RunPageData) -> str:
    """The HTML report of one run directory (see module docstring) from what
    :func:`migrator.metrics.run_page.load_run_page_data` read there; writes nothing."""
    report, clock, meta = data.report, data.clock, data.meta
    plots = [
        plot("plot-fetch-cdf", "Fetch latency",
              "Cumulative distribution of per-page fetch latency per RAMBlock (destination "
              "QEMU trace, report.fetch[*].histogram; steps are histogram bucket bounds).",
              fetch_cdf_figure(report, data.fetch_cdfs)),
        plot("plot-stall-timeline", "Guest stalls",
              "Each marker is one stall of one vCPU by the guest's clock (src/dst "
              "console.jsonl), placed on the host clock; crosses are gaps between heartbeat "
              "arrivals (host clock), which also count the time the VM was stopped. Bands are "
              "the phases of report.phases; the strip along the top marks pre-copy passes; purple "
              "bands are post-copy pauses (report.recoveries).",
              stall_timeline_figure(report, data.stalls, clock, data.threshold_ms)),
        plot("plot-transfer", "Transfer",
              "query-migrate sampled on both sides (samples.jsonl), at reply time; throughput "
              "is the mean between two consecutive samples. QEMU's own ram.mbps is in the "
              "legend, hidden by default.",
              transfer_figure(report, data.samples, clock)),
        plot("plot-blocktime", "Blocktime",
              "Time each vCPU spent blocked on post-copy faults: QEMU's postcopy-vcpu-blocktime "
              "(destination query-migrate) next to the trace's (report.blocktime). The guest "
              "probe's stalled time is in the legend, hidden by default.",
              blocktime_figure(report)),
        plot("plot-threads", "Host CPU per QEMU thread",
              "CPU time each kind of QEMU thread took between two consecutive samples of "
              "/proc/PID/task/*/stat (utime + stime, src|dst/threads.jsonl, on each QEMU's host), "
              "in % of one core; threads of one kind are summed. The dashed line is the "
              "switchover (the source's STOP); bands are the phases. The return path, listen "
              "thread and main loop are in the legend, hidden by default.",
              thread_figure(report, data.threads, clock, data.switchover_ns)),
    ]
    sources = Sources()
    recovery = [pause_table(report, sources)] if report.recoveries else []
    if report.faults:
        recovery.append(fault_table(report, sources))
    tables_main = headline_tables(report, sources)
    fetch = fetch_table(report, sources)
    stalls = stall_tables(report, sources, clock)
    comparisons = comparison_table(report, sources)
    buckets = latency_dist_table(report)
    template = environment().get_template("run.html.j2")
    return template.render(
        report=report, report_origin=data.report_origin, plots=plots, recovery=recovery,
        badge=severity(report.outcome),
        plotly_js=Markup(get_plotlyjs()), headline=tables_main, fetch=fetch, stalls=stalls,
        comparisons=comparisons, buckets=buckets, phases=phase_table(report, clock),
        facts=facts_table(meta), scenario_text=data.scenario_text,
        sources=sorted(((n, s) for s, n in sources.numbers.items())),
        t0=f"{iso_time(clock.t0_ns)} ({clock.what})", env_line=environment_line(report),
        migrator_version=str(report.environment.get("migrator_version") or ""),
    )


def write_run_html(run_path: Path, data: RunPageData) -> Path:
    """Write ``RUN/report.html`` atomically from ``data`` (what
    :func:`migrator.metrics.run_page.load_run_page_data` read in ``run_path``); returns its path."""
    target = run_path / "report.html"
    atomic_write(target, render_run_html(data))
    return target


def report_link(page_dir: Path, run_path: Path | None) -> str | None:
    """A run's ``report.html`` relative to a page in ``page_dir`` (None when it has none)."""
    if run_path is None or not (run_path / "report.html").is_file():
        return None
    return Path(os.path.relpath((run_path / "report.html").absolute(),
                                page_dir.absolute())).as_posix()
