"""The nightly dashboard opened in headless Chromium (the harness of tests/chromium.py).

Two stores of constructed runs (6 baseline, 6 latest; tests/nightly_runs.py):
one whose latest night freezes 50 % longer, one without a change.  Each page
must load with no console error and no network request, draw every plot, and
show the regression badge exactly when there is a regression; a click on a
history point must open that run's page.  Screenshots are kept in the test's
temporary directory (pytest keeps the last runs) and their paths printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from migrator.dashboard import DashboardOptions, DashboardResult, build_dashboard
from migrator.results.store import ResultsStore, load_run
from tests.chromium import DevTools, chromium, screenshot, wait_for_plots
from tests.nightly_runs import RUNS, nightly

WIDTH = 1400


def _build(tmp_path: Path, shift: float) -> DashboardResult:
    db = nightly(tmp_path / "results.sqlite", load_run(RUNS / "hugetlb-2m"), shift)
    with ResultsStore.open(db) as store:
        return build_dashboard(store, tmp_path / "site", DashboardOptions(jobs=1))


def _open(browser: DevTools, page: Path) -> None:
    browser.events.clear()
    browser.call("Page.navigate", {"url": page.as_uri()})
    browser.wait_event("Page.loadEventFired")


def _check_page(browser: DevTools, page: Path, shot: Path) -> int:
    """Open ``page``, check its plots and problems, keep a screenshot; the badge count."""
    _open(browser, page)
    ids = browser.evaluate(
        "[...document.querySelectorAll('.plotly-graph-div')].map(d => d.id)")
    assert ids, f"{page.name}: no plots"
    rendered = wait_for_plots(browser, ids)
    assert all(rendered.values()), f"plots without an SVG: {rendered}"
    # Non-empty: every plot drew points or lines, not only its axes.
    marks = browser.evaluate(
        "Object.fromEntries(" + json.dumps(ids) + ".map(id => [id, document.querySelectorAll("
        "'#' + id + ' .scatterlayer .trace path, #' + id + ' .scatterlayer .point').length]))")
    assert all(marks.values()), f"empty plots: {marks}"
    screenshot(browser, shot, WIDTH)
    assert shot.stat().st_size > 30_000
    badges: int = browser.evaluate("document.querySelectorAll('.badge-regression').length")
    visible = browser.evaluate(
        "[...document.querySelectorAll('.badge-regression')].every("
        "b => b.offsetWidth > 0 && b.offsetHeight > 0)")
    assert visible, "a regression badge is hidden"
    problems = browser.problems()
    assert problems == [], problems
    return badges


@pytest.mark.parametrize(("store", "shift"), [("regression", 1.5), ("no-change", 1.0)])
def test_dashboard_renders_in_chromium(store: str, shift: float, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    result = _build(tmp_path, shift)
    assert bool(result.regressed) == (store == "regression")
    started = time.monotonic()
    with DevTools(chromium(), tmp_path / "profile", tmp_path / "chromium.log") as browser:
        browser.open_page(WIDTH, 1800)
        shots = {"index": tmp_path / f"dashboard-{store}-index.png",
                 "scenario": tmp_path / f"dashboard-{store}-scenario.png"}
        index_badges = _check_page(browser, result.index, shots["index"])
        scenario_badges = _check_page(browser, result.scenario_pages[0], shots["scenario"])
        if store == "regression":
            assert index_badges >= 1
            assert scenario_badges >= 1
        else:
            assert index_badges == scenario_badges == 0

        # A click on a point of a history chart opens that run's report page.
        browser.events.clear()
        point = browser.evaluate(
            "(() => { const gd = document.getElementById('plot-0');"
            " const trace = gd.data[gd.data.length - 1];"
            " gd.emit('plotly_click', {points: [{customdata: trace.customdata[0]}]});"
            " return JSON.parse(document.getElementById('links').textContent)"
            "[trace.customdata[0]]; })()")
        browser.wait_event("Page.loadEventFired")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not browser.evaluate(
                "location.pathname.includes('/runs/')"):
            time.sleep(0.1)
        where = browser.evaluate("location.pathname")
        assert where.endswith(point.removeprefix("..")), (where, point)
        assert browser.evaluate("document.querySelectorAll('table').length") >= 5
        problems = browser.problems()
    assert problems == [], problems
    with capsys.disabled():
        for kind, shot in shots.items():
            print(f"\nscreenshot of the {store} dashboard {kind} page: {shot}")
    assert time.monotonic() - started < 60
