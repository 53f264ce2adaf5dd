"""The results store on SQLite, with the recorded run directories."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import typer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from migrator.cli.results import compare as compare_command
from migrator.cli.results import results_app
from migrator.errors import ArtifactError, ConfigError, StoreError
from migrator.metrics.summary import build_report, write_report
from migrator.results.schema import METADATA, MetricValue, metrics, runs
from migrator.results.store import (
    ResultsStore,
    RunRecord,
    load_run,
    newest_revision,
    parse_selector,
    resolve_url,
    upgrade,
)
from migrator.rundir import RunMeta

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
RECORDED = ("hugetlb-1g", "hugetlb-2m", "crashed-memfd-4k")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "results.sqlite"


@pytest.fixture
def store(db: Path) -> Iterator[ResultsStore]:
    with ResultsStore.open(db) as opened:
        yield opened


@pytest.fixture
def run_copy(tmp_path: Path) -> Path:
    """A writable copy of the recorded 2 MiB run (which has no report.json)."""
    target = tmp_path / "run-2m"
    shutil.copytree(RUNS / "hugetlb-2m", target)
    return target


def count(store: ResultsStore, table: sa.Table) -> int:
    with store.engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


# --- round trip ------------------------------------------------------------------------------

def test_recorded_runs_round_trip(store: ResultsStore) -> None:
    results = [store.import_run(RUNS / name) for name in RECORDED]
    assert [r.status for r in results] == ["added"] * 3
    assert store.revision() == newest_revision()

    completed = store.select()
    assert {r["backing"] for r in completed} == {"hugetlb-1g", "hugetlb-2m"}
    crashed = store.select(parse_selector("outcome=failed-after-switchover"))
    assert [r["backing"] for r in crashed] == ["memfd-4k"]
    assert crashed[0]["error"].startswith("dst console no 'verify' line")

    [row] = store.select(parse_selector("backing=hugetlb-2m"))
    meta = json.loads((RUNS / "hugetlb-2m" / "run.json").read_text())
    assert row["run_id"] == meta["run_id"]
    assert row["scenario"] == "rec-hugetlb-2m"
    assert row["scenario_hash"] == hashlib.sha256(
        (RUNS / "hugetlb-2m" / "scenario.toml").read_bytes()).hexdigest()
    assert row["page_size"] == 2 << 20
    assert (row["preempt"], row["hgm"], row["postcopy"]) == (False, False, True)
    assert (row["qemu_version"], row["source_qemu_version"]) == ("7.2.22", "7.2.22")
    assert (row["accel"], row["host_kernel"]) == ("tcg", "6.18.44-fc-v669")
    assert (row["source_host"], row["destination_host"]) == ("vm", "vm")
    assert (row["migrator_version"], row["migrator_commit"]) == ("0.1.0", None)
    assert row["switchover"] == "after-seconds"
    # Recorded before [placement.*]: none.
    assert (row["tuning"], row["placement"]) == ("", "")
    assert row["run_date"] == datetime.fromtimestamp(meta["started_ns"] / 1e9, UTC)
    assert row["outcome"] == "completed"

    report = build_report(RUNS / "hugetlb-2m")
    assert store.report(row["run_id"]) == report.model_dump(mode="json")
    stored = {m["name"]: m for m in store.metric_rows(row["run_id"])}
    ram = next(b for b in report.fetch if b.ramblock == "ram0")
    assert stored["fetch.ram0.p50_ms"]["value"] == ram.latency_ms["p50"].value
    assert stored["fetch.ram0.p50_ms"]["unit"] == "ms"
    assert "postcopy_place_page" in stored["fetch.ram0.p50_ms"]["source"]
    assert stored["fetch.ram0.faults"]["value"] == ram.faults
    assert stored["fetch.ram0.backlog_p50"]["value"] == ram.backlog_placements["p50"].value
    assert stored["fetch.ram0.backlog_max"]["unit"] == "placements"
    assert report.freeze is not None
    assert stored["freeze_ms"]["value"] == report.freeze.freeze.value
    assert stored["qemu_downtime_ms"]["value"] == report.freeze.qemu_downtime.value
    assert report.outside_stalls is not None
    assert stored["outside.max_gap_ms"]["value"] == report.outside_stalls.max_gap.value
    assert stored["guest.max_stall_ms"]["value"] == report.guest_stalls[0].max_ms.value
    assert stored["blocktime_ms"]["value"] == 325
    assert stored["postcopy_requests"]["value"] == 15
    assert stored["integrity.bad_pages"]["value"] == 0
    samples = store.metric_samples([row["run_id"]])
    assert samples[row["run_id"]]["freeze_ms"] == stored["freeze_ms"]["value"]


def test_a_run_with_report_json_is_stored_as_it_is(store: ResultsStore, tmp_path: Path) -> None:
    run = tmp_path / "run-1g"
    shutil.copytree(RUNS / "hugetlb-1g", run)
    write_report(run, build_report(run))
    result = store.import_run(run)
    assert result.notes == []
    assert store.report(result.run_id) == json.loads((run / "report.json").read_text())
    [row] = store.select(parse_selector("page=1G"))
    assert row["run_id"] == result.run_id
    assert row["origin"] == str(run.resolve())


def test_import_is_idempotent_and_refreshes(store: ResultsStore, run_copy: Path) -> None:
    first = store.import_run(run_copy)
    again = store.import_run(run_copy)
    assert (first.status, again.status) == ("added", "unchanged")
    assert count(store, runs) == 1
    assert count(store, metrics) == first.metrics

    report = build_report(run_copy)
    assert report.freeze is not None
    changed = report.model_copy(update={"freeze": report.freeze.model_copy(update={
        "freeze": report.freeze.freeze.model_copy(update={"value": 99.5})})})
    write_report(run_copy, changed)
    updated = store.import_run(run_copy)
    assert updated.status == "updated"
    assert updated.notes == []
    assert count(store, runs) == 1
    assert count(store, metrics) == first.metrics
    assert store.metric_samples([updated.run_id])[updated.run_id]["freeze_ms"] == 99.5


def test_missing_report_is_built_but_not_written(store: ResultsStore, run_copy: Path) -> None:
    result = store.import_run(run_copy)
    assert result.notes == ["report.json missing: built from the raw artifacts"]
    assert not (run_copy / "report.json").exists()


@pytest.mark.parametrize(("content", "note"), [
    ('{"schema_version": 1}', "does not match the current report schema"),
    ("not json", "does not match the current report schema"),
])
def test_unreadable_report_is_rebuilt(run_copy: Path, content: str, note: str) -> None:
    (run_copy / "report.json").write_text(content)
    record = load_run(run_copy)
    assert note in record.notes[0]
    assert record.dimensions["backing"] == "hugetlb-2m"


def test_old_schema_report_is_rebuilt(run_copy: Path) -> None:
    document = build_report(run_copy).model_dump(mode="json")
    document["schema_version"] = 0
    (run_copy / "report.json").write_text(json.dumps(document))
    record = load_run(run_copy)
    assert record.notes == ["report.json is schema 0, current is 1: rebuilt"]
    assert record.report["schema_version"] == 1


def test_ssh_hosts_are_recorded_by_address() -> None:
    from migrator.results.schema import run_dimensions

    report = build_report(RUNS / "hugetlb-2m")
    meta = RunMeta.read(RUNS / "hugetlb-2m")
    scenario = {"hosts": {"source": {"kind": "local"},
                          "destination": {"kind": "ssh", "address": "10.0.0.2"}}}
    dims = run_dimensions(report, meta, scenario, b"")
    assert (dims["source_host"], dims["destination_host"]) == ("vm", "10.0.0.2")


# --- bad inputs ------------------------------------------------------------------------------

def one_line(error: pytest.ExceptionInfo[Exception]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_non_run_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as error:
        load_run(tmp_path)
    assert "not a migrator run directory" in one_line(error)
    with pytest.raises(ArtifactError) as error:
        load_run(tmp_path / "nope")
    assert "no such directory" in one_line(error)


def test_unfinished_run_is_refused(run_copy: Path) -> None:
    meta = json.loads((run_copy / "run.json").read_text())
    meta["outcome"] = "running"
    (run_copy / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError) as error:
        load_run(run_copy)
    assert "has not finished" in one_line(error)


def test_corrupt_run_json_is_refused(run_copy: Path) -> None:
    (run_copy / "run.json").write_text("{")
    with pytest.raises(ArtifactError) as error:
        load_run(run_copy)
    assert "run.json: not JSON" in one_line(error)


def test_refused_import_leaves_the_store_untouched(store: ResultsStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        store.import_run(tmp_path)
    assert count(store, runs) == 0


def test_database_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIGRATOR_RESULTS", raising=False)
    assert resolve_url().database == str(tmp_path / "results.sqlite")
    monkeypatch.setenv("MIGRATOR_RESULTS", str(tmp_path / "team.sqlite"))
    assert resolve_url().database == str(tmp_path / "team.sqlite")
    url = resolve_url("postgresql://bench:secret@db.example/results")
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "db.example"
    assert resolve_url("postgres://db/results").drivername == "postgresql+psycopg"
    with pytest.raises(ConfigError, match="not a database URL"):
        resolve_url("://nowhere")
    with pytest.raises(ConfigError):
        ResultsStore.open("nosuchdialect://host/db")


def test_unreachable_server_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as error:
        ResultsStore.open(f"postgresql+psycopg://nobody@/results?host={tmp_path}")
    assert "nobody" in one_line(error)


def test_store_in_a_new_directory(tmp_path: Path) -> None:
    with ResultsStore.open(tmp_path / "a" / "b" / "results.sqlite") as store:
        assert store.revision() == newest_revision()


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "results.sqlite"
    with pytest.raises(ConfigError) as error:
        ResultsStore.open(missing, create=False)
    assert one_line(error) == (f"--db: {missing}: no such results store; check the path (only "
                               "'migrator results import' creates a store)")
    assert list(tmp_path.iterdir()) == []
    # An existing store opens as usual (an empty file is an empty SQLite database).
    (tmp_path / "empty.sqlite").touch()
    with ResultsStore.open(tmp_path / "empty.sqlite", create=False) as store:
        assert store.select() == []


@pytest.mark.parametrize("args", [
    ["compare", "qemu=old", "qemu=new"],
    ["results", "list"],
    ["results", "list", "--json"],
])
def test_cli_commands_that_read_never_create_a_store(tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "typo" / "results.sqlite"
    result = CliRunner().invoke(cli(), [*args, "--db", str(missing)])
    assert result.exit_code == 2, result.output
    assert "--db: " in result.output
    assert "no such results store" in result.output
    assert list(tmp_path.iterdir()) == []
    # The default store (./results.sqlite, or $MIGRATOR_RESULTS) is not created either.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MIGRATOR_RESULTS", raising=False)
        patch.chdir(tmp_path)
        default = CliRunner().invoke(cli(), args)
    assert default.exit_code == 2, default.output
    assert "no such results store" in default.output
    assert list(tmp_path.iterdir()) == []


def test_cli_import_creates_the_store(tmp_path: Path) -> None:
    db = tmp_path / "new" / "results.sqlite"
    result = CliRunner().invoke(cli(), ["results", "import", "--db", str(db),
                                        str(RUNS / "hugetlb-2m")])
    assert result.exit_code == 0, result.output
    assert db.is_file()


# --- migrations ------------------------------------------------------------------------------

def test_first_schema_is_upgraded_in_place(db: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as connection:
        upgrade(connection, "0001")
        columns = {c["name"] for c in sa.inspect(connection).get_columns("runs")}
        assert "hgm" not in columns
        assert "reports" not in sa.inspect(connection).get_table_names()
        connection.execute(sa.text(
            "INSERT INTO runs (run_id, scenario, scenario_hash, backing, page_size, run_date, "
            "outcome, imported_at) VALUES ('old-run', 'old', 'abc', 'hugetlb-2m', 2097152, "
            "'2026-01-01 00:00:00', 'completed', '2026-01-02 00:00:00')"))
        connection.execute(sa.text(
            "INSERT INTO metrics VALUES ('old-run', 'freeze_ms', 12.5, 'ms', 'old migrator')"))
    engine.dispose()

    with ResultsStore.open(db) as store:
        assert store.revision() == newest_revision()
        [old] = store.select(parse_selector("old-run"))
        assert (old["hgm"], old["migrator_commit"], old["report_sha256"]) == (False, None, None)
        assert old["run_date"] == datetime(2026, 1, 1, tzinfo=UTC)
        assert store.metric_samples(["old-run"]) == {"old-run": {"freeze_ms": 12.5}}
        assert store.report("old-run") is None
        assert store.import_run(RUNS / "hugetlb-2m").status == "added"
        assert len(store.select()) == 2


def test_migrations_build_exactly_the_declared_schema(store: ResultsStore) -> None:
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), METADATA) == []


def test_downgrade_and_upgrade_again(db: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as connection:
        upgrade(connection)
    from alembic import command

    from migrator.results.store import alembic_config

    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
        assert sa.inspect(connection).get_table_names() == ["alembic_version"]
        upgrade(connection)
    engine.dispose()
    with ResultsStore.open(db) as store:
        assert store.import_run(RUNS / "hugetlb-1g").status == "added"


def test_threads_opening_a_new_store_at_once(db: Path) -> None:
    # alembic keeps its migration environment in process-wide proxies.
    from concurrent.futures import ThreadPoolExecutor

    def open_and_close(_: int) -> str | None:
        with ResultsStore.open(db) as store:
            return store.revision()

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(open_and_close, range(4))) == [newest_revision()] * 4


def _revision_from_a_new_process(db: Path) -> str | None:
    with ResultsStore.open(db) as store:
        return store.revision()


def test_processes_opening_a_new_store_at_once(db: Path) -> None:
    # Separate jobs on one SQLite file: BEGIN IMMEDIATE makes all but one wait for the
    # write lock, then find the schema at head.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.map(_revision_from_a_new_process, [db] * 4) == [newest_revision()] * 4


def test_newer_schema_is_refused(db: Path) -> None:
    ResultsStore.open(db).close()
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError) as error:
        ResultsStore.open(db)
    assert "'9999' is newer than this migrator knows" in one_line(error)


# --- selectors -------------------------------------------------------------------------------

def test_selector_syntax() -> None:
    selector = parse_selector("qemu=7.2.22, backing=hugetlb-2m,backing=hugetlb-1g")
    assert selector.filters == {"qemu_version": ("7.2.22",),
                                "backing": ("hugetlb-2m", "hugetlb-1g")}
    assert parse_selector("a,b").run_ids == ("a", "b")
    since = parse_selector("since=2026-11-01").since
    assert since == datetime(2026, 11, 1, tzinfo=UTC)
    for bad, message in (("a,qemu=1", "mixes run ids"), ("colour=red", "unknown selector key"),
                         ("", "empty selector"), ("since=yesterday", "not an ISO date")):
        with pytest.raises(ConfigError, match=message):
            parse_selector(bad)


def test_selector_values_are_typed(store: ResultsStore) -> None:
    for name in RECORDED:
        store.import_run(RUNS / name)

    def ids(text: str) -> int:
        return len(store.select(parse_selector(text)))

    assert ids("preempt=off") == 2
    assert ids("preempt=true") == 0
    assert ids("hgm=false,page=2MiB") == 1
    assert ids("page_size=1073741824") == 1
    assert ids("outcome=completed,outcome=failed-after-switchover") == 3
    assert ids("hash=" + hashlib.sha256(
        (RUNS / "hugetlb-1g" / "scenario.toml").read_bytes()).hexdigest()[:10]) == 1
    assert ids("since=2026-11-25T18:37:30Z") == 1
    assert ids("since=2026-11-25T20:37:30+02:00") == 1
    assert ids("until=2026-11-25") == 0
    assert ids("20261125T182722Z-rec-memfd-4k-4b1a") == 1
    with pytest.raises(ConfigError, match="not a boolean"):
        ids("preempt=maybe")
    with pytest.raises(ConfigError, match="not an integer"):
        ids("vcpus=two")


# --- command line ----------------------------------------------------------------------------

def cli() -> typer.Typer:
    """The commands as the lead registers them in migrator/cli/main.py."""
    app = typer.Typer()
    app.add_typer(results_app, name="results")
    app.command("compare")(compare_command)
    return app


def synthetic(store: ResultsStore, template: RunRecord, run_id: str, qemu: str,
              freeze_ms: float, p50_ms: float) -> None:
    """A run like ``template`` with chosen metric values (a constructed sample)."""
    store.record(dataclasses.replace(
        template, run_id=run_id, report_sha256=run_id,
        dimensions={**template.dimensions, "run_id": run_id, "qemu_version": qemu},
        metrics=[MetricValue("freeze_ms", freeze_ms, "ms", "test"),
                 MetricValue("fetch.ram0.p50_ms", p50_ms, "ms", "test")]))


@pytest.fixture
def two_qemus(db: Path) -> Path:
    """Six runs on 'old' QEMU, six on 'new' with a 50 % slower freeze."""
    template = load_run(RUNS / "hugetlb-2m")
    with ResultsStore.open(db) as store:
        for i in range(6):
            synthetic(store, template, f"old-{i}", "old", 10 + i * 0.1, 5 + i * 0.01)
            synthetic(store, template, f"new-{i}", "new", 15 + i * 0.1, 5 + i * 0.01)
    return db


def test_cli_import_and_list(db: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    dirs = [str(RUNS / "hugetlb-2m"), str(tmp_path), str(RUNS / "hugetlb-1g")]
    result = runner.invoke(cli(), ["results", "import", "--db", str(db), *dirs])
    # The good runs are imported; the directory that is not a run is bad input.
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert any(line.startswith("added") and "rec-hugetlb-2m" in line for line in lines)
    assert any(line.startswith("added") and "rec-hugetlb-1g" in line for line in lines)
    assert "not a migrator run directory" in result.output
    again = runner.invoke(cli(), ["results", "import", "--db", str(db), str(RUNS / "hugetlb-2m")])
    assert again.exit_code == 0
    assert again.output.startswith("unchanged")

    listed = runner.invoke(cli(), ["results", "list", "--db", str(db), "--json"])
    assert listed.exit_code == 0
    assert {row["backing"] for row in json.loads(listed.output)} == {"hugetlb-1g", "hugetlb-2m"}
    table = runner.invoke(cli(), ["results", "list", "--db", str(db), "--where", "page=2M"])
    assert table.exit_code == 0
    assert "rec-hugetlb-2m" in table.output
    assert "rec-hugetlb-1g" not in table.output
    assert "1 run\n" in table.output


def test_cli_compare_flags_a_regression(two_qemus: Path) -> None:
    result = CliRunner().invoke(cli(), ["compare", "--db", str(two_qemus), "--json",
                                        "qemu=old", "qemu=new"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.output)
    assert doc["regression"] is True
    assert doc["baseline"]["runs"] == [f"old-{i}" for i in range(6)]
    verdicts = {m["metric"]: m for m in doc["metrics"]}
    assert verdicts["freeze_ms"]["verdict"] == "regression"
    assert verdicts["freeze_ms"]["unit"] == "ms"
    assert verdicts["fetch.ram0.p50_ms"]["verdict"] == "no change"


def test_cli_compare_table_and_clean_exit(two_qemus: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli(), ["compare", "--db", str(two_qemus), "qemu=old", "qemu=new"])
    assert result.exit_code == 1
    assert "regression" in result.output
    same = runner.invoke(cli(), ["compare", "--db", str(two_qemus), "qemu=new",
                                 "new-0,new-1,new-2,new-3,new-4,new-5"])
    assert same.exit_code == 0, same.output
    assert "2 no change" in same.output
    loose = runner.invoke(cli(), ["compare", "--db", str(two_qemus), "--threshold",
                                  "freeze_ms=60", "qemu=old", "qemu=new"])
    assert loose.exit_code == 0, loose.output


@pytest.mark.parametrize("args", [
    ["qemu=old", "qemu=none"],
    ["colour=red", "qemu=new"],
    ["--threshold", "freeze_ms", "qemu=old", "qemu=new"],
    ["--metric", "no.such.*", "qemu=old", "qemu=new"],
])
def test_cli_compare_bad_input_exits_2(two_qemus: Path, args: list[str]) -> None:
    result = CliRunner().invoke(cli(), ["compare", "--db", str(two_qemus), *args])
    assert result.exit_code == 2, result.output


def test_metric_samples_of_many_runs_are_fetched_in_chunks(
    store: ResultsStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in RECORDED:
        store.import_run(RUNS / name)
    ids = [row["run_id"] for row in store.select(parse_selector("outcome=completed,outcome=error"))]
    whole = store.metric_samples(ids)
    monkeypatch.setattr("migrator.results.store._IN_CHUNK", 2)
    assert store.metric_samples(ids) == whole
    assert all(whole[run_id] for run_id in ids)
