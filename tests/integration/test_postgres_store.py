"""The results store on a real PostgreSQL server (Debian's postgresql, a throwaway cluster).

The fixture installs the ``postgresql`` package when its binaries are missing
(we are root with apt, as on CI), makes a cluster in a temporary directory owned
by the postgres user, serves it on a unix socket only (no TCP port to collide
with), and removes it afterwards.  Not skipped: PostgreSQL is a supported store.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import typer
from typer.testing import CliRunner

from migrator.cli.results import compare as compare_command
from migrator.cli.results import results_app
from migrator.results.store import ResultsStore, newest_revision, parse_selector, upgrade

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
RECORDED = ("hugetlb-1g", "hugetlb-2m", "crashed-memfd-4k")
PG_ROOT = Path("/usr/lib/postgresql")


def _bindir() -> Path | None:
    """Newest installed PostgreSQL server's bin directory (Debian layout)."""
    found = sorted(PG_ROOT.glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def _install_postgresql() -> Path:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    bindir = _bindir()
    assert bindir is not None, "apt-get installed postgresql but no pg_ctl appeared"
    return bindir


def _as_postgres(*argv: str | Path) -> None:
    result = subprocess.run(["runuser", "-u", "postgres", "--", *map(str, argv)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A database URL on a private PostgreSQL cluster (one per test module)."""
    assert os.geteuid() == 0, "the PostgreSQL fixture installs and runs a server: needs root"
    bindir = _bindir() or _install_postgresql()
    # Not pytest's tmp_path: its parents are 0700 root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="migrator-pg-"))
    shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    _as_postgres(bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync",
                 "-E", "UTF8")
    # Unix socket in our own directory, no TCP; fsync off: nothing here needs to survive.
    options = f"-k {base} -c listen_addresses='' -F"
    _as_postgres(bindir / "pg_ctl", "-D", data, "-o", options, "-l", base / "server.log",
                 "-w", "-t", "30", "start")
    try:
        _as_postgres(bindir / "createdb", "-h", base, "-U", "postgres", "migrator")
        yield f"postgresql+psycopg://postgres@/migrator?host={base}"
    finally:
        _as_postgres(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_db(postgres: str) -> Iterator[str]:
    """A new empty database on the cluster for one test."""
    name = f"t{os.urandom(4).hex()}"
    admin = sa.create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield postgres.replace("/migrator?", f"/{name}?")
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


def test_round_trip_on_postgresql(fresh_db: str) -> None:
    with ResultsStore.open(fresh_db) as store:
        assert store.engine.dialect.name == "postgresql"
        assert store.revision() == newest_revision()
        results = [store.import_run(RUNS / name) for name in RECORDED]
        assert [r.status for r in results] == ["added"] * 3
        assert store.import_run(RUNS / "hugetlb-2m").status == "unchanged"
        [row] = store.select(parse_selector("page=2M,preempt=false,qemu=7.2.22"))
        assert row["run_date"].tzinfo is not None
        assert row["hgm"] is False
        samples = store.metric_samples([row["run_id"]])[row["run_id"]]
        assert samples["postcopy_requests"] == 15
        report = store.report(row["run_id"])
        assert report is not None
        assert report["environment"]["backing"] == "hugetlb-2m"
        # Reports are JSONB: a team can query inside them in SQL.
        with store.engine.connect() as connection:
            backings = connection.exec_driver_sql(
                "SELECT document->'environment'->>'backing' FROM reports ORDER BY 1").scalars()
            assert list(backings) == ["hugetlb-1g", "hugetlb-2m", "memfd-4k"]


def test_first_schema_is_upgraded_on_postgresql(fresh_db: str) -> None:
    engine = sa.create_engine(fresh_db)
    with engine.begin() as connection:
        upgrade(connection, "0001")
        connection.execute(sa.text(
            "INSERT INTO runs (run_id, scenario, scenario_hash, run_date, outcome, imported_at) "
            "VALUES ('old-run', 'old', 'abc', now(), 'completed', now())"))
        connection.execute(sa.text(
            "INSERT INTO metrics VALUES ('old-run', 'freeze_ms', 12.5, 'ms', 'old migrator')"))
    engine.dispose()
    with ResultsStore.open(fresh_db) as store:
        assert store.revision() == newest_revision()
        [old] = store.select(parse_selector("old-run"))
        assert old["hgm"] is False
        assert store.metric_samples(["old-run"]) == {"old-run": {"freeze_ms": 12.5}}


def test_cli_against_postgresql(fresh_db: str) -> None:
    app = typer.Typer()
    app.add_typer(results_app, name="results")
    app.command("compare")(compare_command)
    runner = CliRunner()
    imported = runner.invoke(app, ["results", "import", "--db", fresh_db,
                                   *(str(RUNS / name) for name in RECORDED)])
    assert imported.exit_code == 0, imported.output
    listed = runner.invoke(app, ["results", "list", "--db", fresh_db, "--json"])
    assert len(json.loads(listed.output)) == 2
    compared = runner.invoke(app, ["compare", "--db", fresh_db, "--json",
                                   "backing=hugetlb-2m", "backing=hugetlb-1g"])
    assert compared.exit_code == 0, compared.output
    verdicts = json.loads(compared.output)["metrics"]
    assert {v["verdict"] for v in verdicts} == {"insufficient data"}


def _open_and_close(url: str) -> str | None:
    """Open the store from a child process (top level: spawn pickles it by name)."""
    with ResultsStore.open(url) as store:
        return store.revision()


def test_concurrent_first_opens_migrate_once(fresh_db: str) -> None:
    # Parallel nightly jobs on a new server: one upgrades, the others wait on the advisory
    # lock and find the schema done. Processes, not threads: that is how jobs share a server.
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.map(_open_and_close, [fresh_db] * 4) == [newest_revision()] * 4
