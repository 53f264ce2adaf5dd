"""The nightly dashboard: run choice, verdicts, the site's files and links, the Prometheus file."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import stat
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from migrator.cli.dashboard import dashboard as dashboard_command
from migrator.dashboard import DashboardOptions, DashboardResult, build_dashboard, night_of
from migrator.dashboard.prometheus import (
    LatestSummary,
    prometheus_name,
    render_textfile,
    textfile_registry,
    write_textfile,
)
from migrator.dashboard.run_pages import render_run_page, site_environment
from migrator.dashboard.views import DEFAULT_NIGHT_START, DEFAULT_NIGHTS
from migrator.errors import ConfigError
from migrator.results.store import ResultsStore, RunRecord, load_run, parse_selector
from tests.nightly_runs import LAST_NIGHT, RUNS, nightly, record

CPU_OPTIONS = DashboardOptions(jobs=1)


@pytest.fixture(scope="module")
def template() -> RunRecord:
    """The recorded 2 MiB run: its dimensions and a valid report document."""
    return load_run(RUNS / "hugetlb-2m")


@pytest.fixture
def regressed(tmp_path: Path, template: RunRecord) -> Path:
    return nightly(tmp_path / "regressed.sqlite", template, 1.5)


@pytest.fixture
def unchanged(tmp_path: Path, template: RunRecord) -> Path:
    return nightly(tmp_path / "unchanged.sqlite", template, 1.0)


def build(db: Path, out: Path, options: DashboardOptions = CPU_OPTIONS) -> DashboardResult:
    with ResultsStore.open(db) as store:
        return build_dashboard(store, out, options)


class Page(HTMLParser):
    """Links, scripts and element classes of one HTML page."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.links: list[str] = []
        self.classes: list[str] = []
        self.scripts: list[str] = []
        self._json_id: str | None = None
        self.json: dict[str, str] = {}
        self.feed(path.read_text())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.classes += values.get("class", "").split()
        if "href" in values:
            self.links.append(values["href"])
        if tag == "script" and "src" in values:
            self.scripts.append(values["src"])
        if tag == "script" and values.get("type") == "application/json":
            self._json_id = values["id"]

    def handle_data(self, data: str) -> None:
        if self._json_id is not None:
            self.json[self._json_id] = self.json.get(self._json_id, "") + data

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._json_id = None

    def targets(self) -> list[str]:
        """Every local link of the page: hrefs, script sources and the charts' point links."""
        found = [*self.links, *self.scripts]
        if "links" in self.json:
            found += json.loads(self.json["links"])
        return [link for link in found if not link.startswith("#")]

    def badge_regressions(self) -> int:
        return self.classes.count("badge-regression")


def site_pages(out: Path) -> list[Path]:
    return sorted(out.rglob("*.html"))


# --- choosing runs ---------------------------------------------------------------------------

def test_nights_start_at_noon_utc() -> None:
    assert night_of(datetime(2026, 11, 24, 23, 0, tzinfo=UTC)) == \
        night_of(datetime(2026, 11, 25, 3, 0, tzinfo=UTC)) == datetime(2026, 11, 24).date()
    assert night_of(datetime(2026, 11, 25, 12, 0, tzinfo=UTC)) == datetime(2026, 11, 25).date()
    assert night_of(datetime(2026, 11, 25, 3, 0, tzinfo=UTC), 0) == datetime(2026, 11, 25).date()


def test_latest_night_against_the_nights_before(regressed: Path, tmp_path: Path) -> None:
    result = build(regressed, tmp_path / "site")
    [view] = result.scenarios
    assert sorted(r["run_id"] for r in view.candidate) == [f"cand-{i}" for i in range(6)]
    assert len(view.baseline) == 6
    assert view.candidate_label == "night of 2026-11-24"
    assert "3 nights, 2026-11-21 to 2026-11-23" in view.baseline_label
    verdicts = {v.metric: v.verdict.value for v in view.verdicts}
    assert verdicts["freeze_ms"] == "regression"
    assert verdicts["fetch.ram0.p50_ms"] == "no change"
    assert [v.metric for v in view.regressions] == ["freeze_ms"]
    assert view.verdicts[0].metric == "freeze_ms"  # regressions first
    assert view.block == "ram0"


def test_baseline_is_the_last_n_nights(tmp_path: Path, template: RunRecord) -> None:
    with ResultsStore.open(tmp_path / "db.sqlite") as store:
        for night in range(10):
            record(store, template, f"n{night}", LAST_NIGHT - timedelta(days=night), 10, 5)
        result = build_dashboard(store, tmp_path / "site", DashboardOptions(nights=3, jobs=1))
    [view] = result.scenarios
    assert [r["run_id"] for r in view.candidate] == ["n0"]
    assert sorted(r["run_id"] for r in view.baseline) == ["n1", "n2", "n3"]
    assert {v.verdict.value for v in view.verdicts} == {"insufficient data"}


def test_selectors_and_scenario_name_fallback(tmp_path: Path, template: RunRecord) -> None:
    """Two QEMU builds give two scenario hashes; the baseline is matched by name then."""
    with ResultsStore.open(tmp_path / "db.sqlite") as store:
        for i in range(6):
            when = LAST_NIGHT - timedelta(hours=i)
            record(store, template, f"old-{i}", when, 10 + i * 0.1, 5, qemu_version="7.2.22",
                   scenario_hash="a" * 64)
            record(store, template, f"new-{i}", when, 20 + i * 0.1, 5, qemu_version="11.1.0",
                   scenario_hash="b" * 64)
        options = DashboardOptions(candidate=parse_selector("qemu=11.1.0"),
                                   baseline=parse_selector("qemu=7.2.22"), jobs=1)
        result = build_dashboard(store, tmp_path / "site", options)
        [view] = result.scenarios
        assert view.key == "b" * 64
        assert {r["run_id"] for r in view.baseline} == {f"old-{i}" for i in range(6)}
        assert "same scenario name 'rec-hugetlb-2m'" in view.baseline_label
        assert [v.metric for v in view.regressions] == ["freeze_ms"]
        with pytest.raises(ConfigError, match="matches no stored run"):
            build_dashboard(store, tmp_path / "site",
                            DashboardOptions(candidate=parse_selector("qemu=9.9"), jobs=1))


def test_an_empty_store_is_an_error(tmp_path: Path) -> None:
    with ResultsStore.open(tmp_path / "db.sqlite") as store, \
            pytest.raises(ConfigError, match="no completed run"):
        build_dashboard(store, tmp_path / "site", CPU_OPTIONS)


# --- the site --------------------------------------------------------------------------------

@pytest.mark.usefixtures("umask_022")
def test_site_files_exist_and_links_resolve(regressed: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = build(regressed, out)
    assert result.index == out / "index.html"
    assert (out / "assets" / "plotly.min.js").stat().st_size > 3_000_000
    assert [p.name for p in result.scenario_pages] == \
        [f"rec-hugetlb-2m-{result.scenarios[0].key[:8]}.html"]
    assert len(list((out / "runs").glob("*.html"))) == 12
    assert result.run_pages_written == 12
    pages = site_pages(out)
    assert len(pages) == 1 + 1 + 12
    for path in pages:
        page = Page(path)
        # plotly.js is shared, never inlined: pages stay small.
        assert path.stat().st_size < 300_000, path
        if path.parent.name != "runs":
            assert page.scripts == [("../" if path.parent != out else "")
                                    + "assets/plotly.min.js"], path
        for link in page.targets():
            parts = urlsplit(link)
            assert not parts.scheme, f"{path}: {link}"
            assert not parts.netloc, f"{path}: {link}"
            target = (path.parent / unquote(parts.path)).resolve()
            assert target.is_file(), f"{path}: {link} -> {target}"
            assert out.resolve() in target.parents, f"{path}: {link} leaves the site"
    index = Page(out / "index.html")
    assert "scenarios/" + result.scenario_pages[0].name in index.targets()
    scenario = Page(result.scenario_pages[0])
    # Every run is a point of the history charts, each linked to its page.
    linked = {Path(unquote(link)).stem for link in json.loads(scenario.json["links"])}
    assert linked == {f"base-{n}-{r}" for n in range(1, 4) for r in range(2)} | \
        {f"cand-{i}" for i in range(6)}
    for mode in (os.stat(p).st_mode for p in [*pages, out / "metrics.prom"]):
        # 0666 less the umask: a web server or the collector reads them.
        assert stat.S_IMODE(mode) == 0o644


def test_regression_badge_present_for_a_regression(regressed: Path, tmp_path: Path) -> None:
    result = build(regressed, tmp_path / "site")
    index = Page(result.index)
    scenario = Page(result.scenario_pages[0])
    assert index.badge_regressions() >= 1
    assert scenario.badge_regressions() >= 1
    text = result.index.read_text()
    assert re.search(r"<tr class=\"row-regression\">.*?freeze_ms", text, re.S)


def test_no_badge_without_a_regression(unchanged: Path, tmp_path: Path) -> None:
    result = build(unchanged, tmp_path / "site")
    assert not result.regressed
    for path in site_pages(tmp_path / "site"):
        assert Page(path).badge_regressions() == 0, path
    assert "No metric of any scenario regressed" in result.index.read_text()


def test_run_pages_come_from_the_stored_report(regressed: Path, tmp_path: Path) -> None:
    result = build(regressed, tmp_path / "site")
    text = (result.out / "runs" / "cand-0.html").read_text()
    # The run report's own tables (migrator.report.html), from the stored report.json.
    assert "Per-page fetch latency per RAMBlock, ms" in text
    assert "Where two sources measure the same thing" in text
    assert "QEMU 7.2.22" in text
    assert "Dimensions (results store)" in text


def test_runs_under_runs_root_link_to_their_report(regressed: Path, tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    (runs_root / "cand-3").mkdir(parents=True)
    (runs_root / "cand-3" / "report.html").write_text("<html>report</html>")
    (runs_root / "cand-4").mkdir()  # a run directory without report.html: page generated
    out = tmp_path / "site"
    result = build(regressed, out, DashboardOptions(runs_root=runs_root, jobs=1))
    assert not (out / "runs" / "cand-3.html").exists()
    assert (out / "runs" / "cand-4.html").exists()
    scenario = Page(result.scenario_pages[0])
    assert "../../runs/cand-3/report.html" in scenario.targets()
    assert "../runs/cand-4.html" in scenario.targets()


def test_rebuilds_rewrite_only_changed_run_pages(regressed: Path, tmp_path: Path,
                                                 template: RunRecord) -> None:
    out = tmp_path / "site"
    build(regressed, out)
    again = build(regressed, out)
    assert (again.run_pages_written, again.run_pages_kept) == (0, 12)
    with ResultsStore.open(regressed) as store:
        # A re-imported run whose report changed: only its page is written again.
        record(store, template, "cand-0", LAST_NIGHT, 99.0, 5.0)
    third = build(regressed, out)
    assert (third.run_pages_written, third.run_pages_kept) == (1, 11)
    (out / "runs" / "base-1-0.html").unlink()
    fourth = build(regressed, out)
    assert fourth.run_pages_written == 1
    assert (out / "runs" / "base-1-0.html").exists()


def test_unlinked_run_pages_are_removed(regressed: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    build(regressed, out)
    stranger = out / "runs" / "not-mine.html"
    stranger.write_text("kept: this builder did not write it")
    runs_root = tmp_path / "runs"
    (runs_root / "cand-5").mkdir(parents=True)
    (runs_root / "cand-5" / "report.html").write_text("<html></html>")
    build(regressed, out, DashboardOptions(runs_root=runs_root, jobs=1))
    assert not (out / "runs" / "cand-5.html").exists()
    assert stranger.exists()


def test_worker_processes_give_the_same_site(regressed: Path, tmp_path: Path) -> None:
    one = build(regressed, tmp_path / "one")
    two = build(regressed, tmp_path / "two", DashboardOptions(jobs=2))
    assert [v.to_dict() for v in one.scenarios[0].verdicts] == \
        [v.to_dict() for v in two.scenarios[0].verdicts]
    assert two.run_pages_written == 12
    for page in (tmp_path / "one" / "runs").glob("*.html"):
        assert page.read_bytes() == (tmp_path / "two" / "runs" / page.name).read_bytes()


def test_recorded_runs(tmp_path: Path) -> None:
    """The real recorded runs: one run per scenario, so every verdict lacks data."""
    with ResultsStore.open(tmp_path / "db.sqlite") as store:
        for name in ("hugetlb-2m", "hugetlb-1g", "crashed-memfd-4k"):
            store.import_run(RUNS / name)
        result = build_dashboard(store, tmp_path / "site", CPU_OPTIONS)
    assert sorted(v.name for v in result.scenarios) == ["rec-hugetlb-1g", "rec-hugetlb-2m"]
    assert not result.regressed
    assert {v.verdict.value for s in result.scenarios for v in s.verdicts} == \
        {"insufficient data"}
    assert result.run_pages_written == 2
    index = Page(result.index)
    assert "badge-insufficient" in index.classes  # not a reassuring "no change"
    assert "badge-ok" not in index.classes
    assert "badge-no-change" not in index.classes


# --- Prometheus ------------------------------------------------------------------------------

def families(path: Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The parsed textfile: family name -> (labels, value) per sample."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "gauge"
        assert family.documentation
        out[family.name] = [(dict(s.labels), s.value) for s in family.samples]
    return out


def test_prometheus_textfile_parses(regressed: Path, tmp_path: Path) -> None:
    result = build(regressed, tmp_path / "site")
    parsed = families(result.textfile)
    labels = {"scenario": "rec-hugetlb-2m", "backing": "hugetlb-2m", "qemu_version": "7.2.22",
              "host": "vm"}
    view = result.scenarios[0]
    freeze = next(v for v in view.verdicts if v.metric == "freeze_ms")
    assert freeze.candidate_mean is not None
    [(freeze_labels, freeze_s)] = parsed["migrator_freeze_seconds"]
    assert freeze_labels == labels
    assert freeze_s == pytest.approx(freeze.candidate_mean / 1000)
    assert parsed["migrator_fetch_p50_seconds"][0][0] == {**labels, "ramblock": "ram0"}
    assert parsed["migrator_fetch_faults"] == [({**labels, "ramblock": "ram0"}, 15.0)]
    assert parsed["migrator_transfer_ram_bytes"] == [(labels, 2e8)]
    assert parsed["migrator_runs"] == [(labels, 6.0)]
    assert parsed["migrator_regressions"] == [(labels, 1.0)]
    assert parsed["migrator_last_run_timestamp_seconds"] == [
        (labels, (LAST_NIGHT + timedelta(minutes=150)).timestamp())]
    text = result.textfile.read_text()
    assert "# TYPE migrator_freeze_seconds gauge" in text
    assert not [line for line in text.splitlines()
                if not line.startswith("#") and len(line.split()) != 2]  # no timestamps


def test_unchanged_store_exports_no_regression(unchanged: Path, tmp_path: Path) -> None:
    parsed = families(build(unchanged, tmp_path / "site").textfile)
    assert [value for _, value in parsed["migrator_regressions"]] == [0.0]


@pytest.mark.parametrize(("metric", "unit", "expected"), [
    ("fetch.ram0.p50_ms", "ms", ("migrator_fetch_p50_seconds", {"ramblock": "ram0"}, 1e-3)),
    ("fetch.0000:00:02.0/vga.vram.faults", "faults",
     ("migrator_fetch_faults", {"ramblock": "0000:00:02.0/vga.vram"}, 1.0)),
    ("fetch./rom@etc/acpi/tables.p999_ms", "ms",
     ("migrator_fetch_p999_seconds", {"ramblock": "/rom@etc/acpi/tables"}, 1e-3)),
    ("freeze_ms", "ms", ("migrator_freeze_seconds", {}, 1e-3)),
    ("outside.max_gap_ms", "ms", ("migrator_outside_max_gap_seconds", {}, 1e-3)),
    ("transfer.ram_bytes", "bytes", ("migrator_transfer_ram_bytes", {}, 1.0)),
    ("transfer.dirty_sync_count", "passes", ("migrator_transfer_dirty_syncs", {}, 1.0)),
    ("postcopy_requests", "requests", ("migrator_postcopy_requests", {}, 1.0)),
    ("integrity.bad_pages", "pages", ("migrator_integrity_bad_pages", {}, 1.0)),
    ("odd.count", "things", ("migrator_odd_count_value", {}, 1.0)),
])
def test_prometheus_names(metric: str, unit: str,
                          expected: tuple[str, dict[str, str], float]) -> None:
    assert prometheus_name(metric, unit) == expected


def test_label_values_are_escaped(tmp_path: Path) -> None:
    odd = 'say "hi"\\\nnext line'
    summary = LatestSummary(
        labels={"scenario": odd, "backing": "hugetlb-2m", "qemu_version": "", "host": "h"},
        means={"freeze_ms": 12.5}, units={"freeze_ms": "ms"}, runs=2,
        last_run=LAST_NIGHT, regressions=0)
    path = tmp_path / "metrics.prom"
    write_textfile(path, render_textfile([summary, summary]))
    parsed = families(path)
    assert parsed["migrator_freeze_seconds"] == [
        ({"scenario": odd, "backing": "hugetlb-2m", "qemu_version": "unknown", "host": "h"},
         0.0125)]


def test_the_textfile_is_the_client_librarys_registry() -> None:
    labels = {"scenario": "s", "backing": "hugetlb-2m", "qemu_version": "10.0.0", "host": "h"}
    summary = LatestSummary(
        labels=labels, means={"freeze_ms": 6.8977, "fetch.ram0.p50_ms": 0.25},
        units={"freeze_ms": "ms", "fetch.ram0.p50_ms": "ms"}, runs=3, last_run=LAST_NIGHT,
        regressions=1)
    registry = textfile_registry([summary])
    assert registry.get_sample_value("migrator_runs", labels) == 3
    assert registry.get_sample_value("migrator_regressions", labels) == 1
    assert registry.get_sample_value("migrator_fetch_p50_seconds",
                                     {**labels, "ramblock": "ram0"}) == 0.00025
    text = render_textfile([summary])
    # The ms -> s scaling leaves no binary noise (6.8977 * 1e-3 is 0.0068977000000000005).
    assert re.search(r"^migrator_freeze_seconds\{[^}]*\} 0\.0068977$", text, re.MULTILINE)
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names == sorted(names)


@pytest.mark.usefixtures("umask_022")
def test_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "metrics.prom"
    path.write_text("old\n")
    path.chmod(0o600)
    inode = path.stat().st_ino
    write_textfile(path, "# HELP x y\n# TYPE x gauge\nx 1\n")
    assert path.read_text().endswith("x 1\n")
    assert path.stat().st_ino != inode  # renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.prom"]


# --- command line ----------------------------------------------------------------------------

def cli() -> typer.Typer:
    """The command as the lead registers it in migrator/cli/main.py."""
    app = typer.Typer()
    app.command("dashboard")(dashboard_command)
    app.command("unused")(lambda: None)  # more than one command: typer keeps the name
    return app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_builds_and_fails_on_regression(regressed: Path, tmp_path: Path,
                                            runner: CliRunner) -> None:
    out = tmp_path / "site"
    args = ["dashboard", "--db", str(regressed), "--out", str(out), "--jobs", "1"]
    built = runner.invoke(cli(), args)
    assert built.exit_code == 0, built.output
    assert "regression rec-hugetlb-2m" in built.output
    assert (out / "index.html").is_file()
    failed = runner.invoke(cli(), [*args, "--fail-on-regression"])
    assert failed.exit_code == 1, failed.output
    loose = runner.invoke(cli(), [*args, "--fail-on-regression", "--threshold", "freeze_ms=60"])
    assert loose.exit_code == 0, loose.output


def test_cli_defaults_are_the_builders() -> None:
    parameters = inspect.signature(dashboard_command).parameters
    assert parameters["nights"].default == DEFAULT_NIGHTS
    assert parameters["night_start"].default == DEFAULT_NIGHT_START


@pytest.mark.parametrize("extra", [["--candidate", "qemu=9.9"], ["--baseline", "colour=red"],
                                   ["--threshold", "freeze_ms"]])
def test_cli_bad_input_exits_2(regressed: Path, tmp_path: Path, runner: CliRunner,
                               extra: list[str]) -> None:
    result = runner.invoke(cli(), ["dashboard", "--db", str(regressed), "--out",
                                   str(tmp_path / "site"), "--jobs", "1", *extra])
    assert result.exit_code == 2, result.output


def test_cli_missing_store_is_bad_input_and_not_created(tmp_path: Path,
                                                        runner: CliRunner) -> None:
    missing = tmp_path / "typo" / "results.sqlite"
    result = runner.invoke(cli(), ["dashboard", "--db", str(missing), "--out",
                                   str(tmp_path / "site"), "--jobs", "1"])
    assert result.exit_code == 2, result.output
    assert "--db: " in result.output
    assert "no such results store" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_on_the_recorded_runs(tmp_path: Path, runner: CliRunner) -> None:
    db = tmp_path / "db.sqlite"
    with ResultsStore.open(db) as store:
        store.import_run(RUNS / "hugetlb-2m")
    shutil.copytree(RUNS / "hugetlb-2m", tmp_path / "runs" / "x")
    result = runner.invoke(cli(), ["dashboard", "--db", str(db), "--out",
                                   str(tmp_path / "site"), "--runs-root",
                                   str(tmp_path / "runs"), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert "1 run pages written" in result.output


@pytest.mark.parametrize(("outcome", "badge"), [
    ("completed", "ok"), ("completed-after-recovery", "warn"),
    ("failed-after-switchover", "bad"), ("error", "bad")])
def test_run_page_badge_follows_the_outcome_severity(outcome: str, badge: str) -> None:
    row = {"scenario": "s", "run_id": "r", "outcome": outcome, "origin": None, "error": None}
    page = render_run_page(site_environment(), row, {}, {"freeze_ms": 1.0}, {"freeze_ms": "ms"},
                           "../s.html")
    assert f'<span class="badge {badge}">{outcome}</span>' in page
