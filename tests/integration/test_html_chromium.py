"""The HTML run report and the overlay page of several runs opened in a real browser:
Debian's headless Chromium.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe``
(NUL-terminated JSON on file descriptors 3 and 4), which needs no websocket
client and no TCP port.  The protocol reports console messages with their
level (``--enable-logging=stderr`` prints every level alike), uncaught
exceptions and every request the page makes, so the test can assert that the
page logs no error and fetches nothing from the network.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrator.metrics.run_artifacts import load_run_artifacts
from migrator.metrics.run_page import load_run_page_data
from migrator.report.html import write_run_html
from tests.chromium import DevTools, screenshot, wait_for_plots
from tests.chromium import chromium as _chromium

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
PLOT_IDS = ("plot-fetch-cdf", "plot-stall-timeline", "plot-transfer", "plot-blocktime",
            "plot-threads")


# The crashed run has no destination trace: its fetch plot is empty on purpose. The runs
# of tests/data/runs were recorded before thread sampling: their thread plots are empty.
EMPTY_PLOTS = {"runs/crashed-memfd-4k": {"plot-fetch-cdf", "plot-threads"},
               "runs/hugetlb-2m": {"plot-threads"}, "runs/hugetlb-1g": {"plot-threads"}}


@pytest.mark.parametrize("run", ["runs/hugetlb-2m", "runs/hugetlb-1g", "runs/crashed-memfd-4k",
                                 "threads/rec-threads-2m"])
def test_run_report_renders_in_chromium(run: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / run
    shutil.copytree(DATA / run, run_dir)
    page = write_run_html(run_dir, load_run_page_data(load_run_artifacts(run_dir)))
    chromium = _chromium()
    started = time.monotonic()
    with DevTools(chromium, tmp_path / "profile", tmp_path / "chromium.log") as browser:
        browser.open_page(1400, 2400)
        browser.call("Page.navigate", {"url": page.as_uri()})
        browser.wait_event("Page.loadEventFired")
        # Plotly.newPlot draws asynchronously after the load event on some paths; wait
        # until every figure has its SVG.
        rendered: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rendered = browser.evaluate(
                "Object.fromEntries(" + json.dumps(list(PLOT_IDS)) + ".map(id => [id, "
                "document.querySelectorAll('#' + id + ' .main-svg').length]))")
            if all(rendered.values()):
                break
            time.sleep(0.2)
        assert all(rendered.values()), f"plots without an SVG: {rendered}"
        # Non-empty: the plots drew data, not only axes.
        marks = browser.evaluate(
            "Object.fromEntries(" + json.dumps(list(PLOT_IDS)) + ".map(id => [id, "
            "document.querySelectorAll('#' + id + ' .scatterlayer .trace path, #' + id + "
            "' .barlayer .point path').length]))")
        drew = {plot for plot, count in marks.items() if count}
        assert drew == set(PLOT_IDS) - EMPTY_PLOTS.get(run, set()), marks
        assert browser.evaluate("document.querySelectorAll('table').length") >= 8

        metrics = browser.call("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = browser.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1400, "height": min(size["height"], 16000),
                     "scale": 1},
        })
        screenshot = tmp_path / f"{run_dir.name}-report.png"
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        with capsys.disabled():
            print(f"\nscreenshot of the {run} report: {screenshot}")
        problems = browser.problems()
    assert problems == [], problems
    assert screenshot.stat().st_size > 50_000
    assert time.monotonic() - started < 60


def test_overlay_page_renders_in_chromium(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    runs = [shutil.copytree(DATA / run, tmp_path / run)
            for run in ("runs/hugetlb-2m", "runs/hugetlb-1g", "runs/crashed-memfd-4k",
                        "threads/rec-threads-2m")]
    page = tmp_path / "compare.html"
    done = subprocess.run(
        [sys.executable, "-m", "migrator", "report", *map(str, runs), "--html", "--out",
         str(page)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    plot_ids = ("plot-fetch-cdf-2097152", "plot-fetch-cdf-1073741824", "plot-stall-overlay",
                "plot-transfer-overlay", "plot-threads-overlay")
    with DevTools(_chromium(), tmp_path / "profile", tmp_path / "chromium.log") as browser:
        browser.open_page(1400, 2400)
        browser.call("Page.navigate", {"url": page.as_uri()})
        browser.wait_event("Page.loadEventFired")
        rendered = wait_for_plots(browser, plot_ids)
        assert all(rendered.values()), f"plots without an SVG: {rendered}"
        marks = browser.evaluate(
            "Object.fromEntries(" + json.dumps(list(plot_ids)) + ".map(id => [id, "
            "document.querySelectorAll('#' + id + ' .scatterlayer .trace path').length]))")
        assert all(marks.values()), marks
        # One legend group per run on the stall overlay, titled with its label.
        texts = browser.evaluate(
            "[...document.querySelectorAll('#plot-stall-overlay .legendtext')]"
            ".map(e => e.textContent)")
        titles = [text for text in texts if "Z-rec-" in text]
        assert len(titles) == 4, texts
        # The run links open each run's own page.
        links = browser.evaluate("[...document.querySelectorAll('a')].map(a => a.href)"
                                 ".filter(h => h.endsWith('/report.html'))")
        assert sorted(links) == sorted((run / "report.html").as_uri() for run in runs)
        shot = screenshot(browser, tmp_path / "compare.png", 1400)
        with capsys.disabled():
            print(f"\nscreenshot of the overlay page: {shot}")
        problems = browser.problems()
    assert problems == [], problems
