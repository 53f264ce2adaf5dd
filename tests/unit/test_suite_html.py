"""The HTML suite page, rendered over a suite state pointing at the recorded runs."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from migrator.bench.runner import RunRecord, RunStatus, SuiteState
from migrator.bench.suite import load_suite
from migrator.bench.suite_html import SUITE_HTML, render_suite_html, write_suite_html
from migrator.metrics.summary import build_report, write_report
from tests.unit.html_pages import EXTERNAL, figures

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
SUITE_TOML = """\
[suite]
name = "demo"

[base]
name = "t"
vm = { memory_mib = 256, backing = "memfd-4k" }
workload = { working_set_mib = 64, warmup_s = 0.5 }

[[axes]]
name = "page-size"
[axes.values]
4k = { "vm.backing" = "memfd-4k" }
2m = { "vm.backing" = "hugetlb-2m" }
1g = { "vm.backing" = "hugetlb-1g", "vm.memory_mib" = 1024 }
1g-hgm = { "vm.backing" = "hugetlb-1g", "vm.memory_mib" = 1024, "vm.hgm" = "require" }
"""

# label -> (status, recorded run copied under runs/, error or reason)
OUTCOMES: dict[str, tuple[str, str | None, str | None]] = {
    "4k": ("failed", "crashed-memfd-4k", "dst: guest kernel crashed"),
    "2m": ("done", "hugetlb-2m", None),
    "1g": ("done", "hugetlb-1g", None),
    "1g-hgm": ("unsupported", None, "not supported on these hosts: kernel lacks MADV_SPLIT"),
}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished suite directory: suite.toml, suite.json, copies of the recorded runs."""
    out = tmp_path_factory.mktemp("suite")
    (out / "suite.toml").write_text(SUITE_TOML)
    suite = load_suite(out / "suite.toml")
    state = SuiteState(suite=suite.name, source=str(out / "suite.toml"), repetitions=1,
                       created="2026-11-26T00:00:00Z", updated="2026-11-26T00:00:00Z")
    for planned in suite.runs:
        label = dict(planned.labels)["page-size"]
        status, recorded, message = OUTCOMES[label]
        run_dir = None
        if recorded is not None:
            run_dir = f"runs/{recorded}"
            shutil.copytree(RUNS / recorded, out / run_dir)
            if status == "done":
                # Cached once here (as run_and_report does), so each rendering only reads it.
                write_report(out / run_dir, build_report(out / run_dir))
        state.runs[planned.run_id] = RunRecord(
            run_id=planned.run_id, labels=dict(planned.labels), repetition=planned.repetition,
            hgm=planned.hgm, scenario_sha256=planned.scenario_sha256, status=RunStatus(status),
            run_dir=run_dir, duration_s=12.5 if recorded else 0.0,
            error=message if status == "failed" else None,
            reason=message if status == "unsupported" else None)
    # Only the 2 MiB run has a run page: the table links it and no other.
    (out / "runs" / "hugetlb-2m" / "report.html").write_text("<!DOCTYPE html>")
    state.save(out)
    return out


@pytest.fixture(scope="module")
def page(suite_dir: Path) -> str:
    return render_suite_html(suite_dir)


def test_page_is_self_contained_with_both_plots(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<script>window.PlotlyConfig") == 1
    assert page.count("plotly.js v") >= 1
    assert not EXTERNAL.search(page)
    assert 'id="plot-suite-p50"' in page
    assert 'id="plot-suite-cdf"' in page
    assert set(figures(page)) == {"plot-suite-p50", "plot-suite-cdf"}


def test_runs_table_and_links_resolve(page: str, suite_dir: Path) -> None:
    for run_id in ("page-size=4k,rep=1", "page-size=2m,rep=1", "page-size=1g,rep=1",
                   "page-size=1g-hgm,rep=1"):
        assert run_id in page
    assert "dst: guest kernel crashed" in page
    assert "kernel lacks MADV_SPLIT" in page
    assert "12.5 s" in page
    parser = _Links()
    parser.feed(page)
    reports = [h for h in parser.hrefs if not h.startswith("#")]
    assert reports == ["runs/hugetlb-2m/report.html"]
    assert all((suite_dir / h).is_file() for h in reports)
    assert all(h[1:] and f'id="{h[1:]}"' in page for h in parser.hrefs if h.startswith("#"))


def test_page_size_table_and_plot_contents(page: str) -> None:
    assert 'id="page-size"' in page
    for label in ("4 KiB", "2 MiB", "1 GiB", "1 GiB+HGM"):
        assert f"<td>{label}</td>" in page
    plots = figures(page)
    p50 = plots["plot-suite-p50"]
    assert [t["name"] for t in p50["data"]] == ["page-size=2m", "page-size=1g"]
    assert p50["layout"]["yaxis"]["type"] == "log"
    cdf = plots["plot-suite-cdf"]
    names = [t["name"] for t in cdf["data"]]
    assert len(names) == 2
    assert names[0].startswith("page-size=2m,rep=1 · 2 MiB pages · ")
    assert names[1].startswith("page-size=1g,rep=1 · 1 GiB pages · 1 faults")
    assert cdf["layout"]["xaxis"]["type"] == "log"


def test_write_suite_html(suite_dir: Path, page: str) -> None:
    target = write_suite_html(suite_dir)
    assert target == suite_dir / SUITE_HTML
    # Only the generation time of the page-size table may differ between two renderings.
    assert len(target.read_text()) == len(page)


def test_without_a_readable_suite_file_the_table_is_left_out(tmp_path: Path,
                                                              suite_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(suite_dir, copy)
    (copy / "suite.toml").unlink()
    html = render_suite_html(copy)
    assert 'id="page-size"' not in html
    assert "no page-size table" in html
    assert len(figures(html)["plot-suite-cdf"]["data"]) == 2
