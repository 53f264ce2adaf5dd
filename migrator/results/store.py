"""The results store: finished runs, their dimensions and metrics, in SQL.

SQLite file by default (``results.sqlite`` in the working directory, or
``$MIGRATOR_RESULTS``), PostgreSQL by URL (``postgresql+psycopg://...``) for a
team.  Opening a store applies every alembic migration it lacks (upgrade to
head), so an old file or server is brought up to date in place; a store newer
than this migrator is refused rather than guessed at.

Runs go in with :meth:`ResultsStore.import_run` (idempotent: a run id is one row,
re-importing refreshes it) and come out by :class:`Selector` (``key=value``
filters over the dimensions, or run ids) as rows and metric samples for
:func:`migrator.results.compare.compare`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from pydantic import ValidationError
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from migrator.errors import ArtifactError, ConfigError, StoreError
from migrator.metrics.summary import build_report
from migrator.model import SCHEMA_VERSION, Report
from migrator.results.schema import (
    DIMENSIONS,
    MetricValue,
    metrics,
    report_metrics,
    reports,
    run_dimensions,
    runs,
)
from migrator.rundir import RunMeta

__all__ = [
    "DEFAULT_PATH",
    "ENV_VAR",
    "ImportResult",
    "ResultsStore",
    "RunRecord",
    "Selector",
    "alembic_config",
    "load_run",
    "newest_revision",
    "parse_selector",
    "resolve_url",
    "upgrade",
]

log = logging.getLogger(__name__)

ENV_VAR = "MIGRATOR_RESULTS"
DEFAULT_PATH = Path("results.sqlite")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_IN_CHUNK = 5000
#: Report documents per query of :meth:`ResultsStore.stored_reports` (they are large).
_REPORT_CHUNK = 500
_ALEMBIC_LOCK = threading.RLock()
_UPGRADE_LOCK = 0x6D6967726174  # "migrat": any constant shared by every migrator


# --- where the store is ----------------------------------------------------------------------

def resolve_url(target: str | Path | None = None) -> URL:
    """The database URL of ``target``: a path (SQLite) or a URL; default from the environment.

    ``None`` means ``$MIGRATOR_RESULTS``, else ``results.sqlite`` in the working
    directory.  ``postgresql://`` and ``postgres://`` get the psycopg 3 driver
    (the one migrator installs).
    """
    if target is None:
        target = os.environ.get(ENV_VAR) or DEFAULT_PATH
    text = str(target)
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser().resolve()))
    for bare in ("postgresql://", "postgres://"):
        if text.startswith(bare):
            text = "postgresql+psycopg://" + text[len(bare):]
    try:
        return make_url(text)
    except (ArgumentError, ValueError) as error:
        raise ConfigError(f"{text!r} is not a database URL: {error}", field="--db") from None


def alembic_config() -> Config:
    """An alembic configuration pointing at migrator's migrations (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Migrate the schema behind ``connection`` to ``revision`` (default: the newest)."""
    # alembic's ``context`` and ``op`` are process-wide proxies: two threads migrating at
    # once overwrite each other's environment.
    with _ALEMBIC_LOCK:
        _upgrade(connection, revision)


def newest_revision() -> str:
    """The newest schema revision this migrator knows (what :func:`upgrade` migrates to)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrator/results/migrations has no revision"
    return head


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    current = MigrationContext.configure(connection).get_current_revision()
    scripts = ScriptDirectory.from_config(config)
    if current is not None:
        try:
            scripts.get_revision(current)
        except CommandError:
            raise StoreError(
                f"{_safe(connection.engine.url)}: schema revision {current!r} is newer than this "
                f"migrator knows (newest {newest_revision()!r}); upgrade migrator"
            ) from None
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


# Execution option naming how a transaction begins on SQLite (see _engine).
_BEGIN = "migrator_sqlite_begin"


def _migrate(engine: Engine) -> None:
    """Upgrade to head, once, whoever else opens the store at the same moment.

    PostgreSQL: an advisory lock held by the migrating transaction; the others
    wait, then find the schema done.  SQLite: ``BEGIN IMMEDIATE`` does the same
    with the database's write lock.  SQLite also gets its own recipe for
    altering tables (lang_altertable.html): alembic's batch mode copies a table
    and drops the old one, and with foreign keys on that drop would cascade and
    delete every metric of every run, so keys are off for the migrating
    connection (which is then discarded) and checked before commit.
    """
    sqlite = engine.dialect.name == "sqlite"
    migrating = engine.execution_options(**{_BEGIN: "migrate"}) if sqlite else engine
    with _ALEMBIC_LOCK, migrating.connect() as connection:
        try:
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    # alembic does not serialise upgrades; this lock ends with the transaction.
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_UPGRADE_LOCK})")
                upgrade(connection)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StoreError(f"migration left {len(broken)} rows with dangling keys "
                                         f"(first: {tuple(broken[0])}); rolled back")
        finally:
            if sqlite:
                # Foreign keys are off on this connection: never hand it out again.
                connection.invalidate()


def _safe(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _sqlite_file(url: URL) -> Path | None:
    """The file of a file-backed SQLite ``url`` (not in memory, not a ``file:`` URI)."""
    database = url.database
    if (url.get_backend_name() != "sqlite" or not database or database == ":memory:"
            or database.startswith("file:")):
        return None
    return Path(database)


def _require_existing(url: URL) -> None:
    """:class:`ConfigError` (``--db``) when ``url`` is a SQLite file that does not exist."""
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        raise ConfigError(f"{path}: no such results store; check the path (only "
                          "'migrator results import' creates a store)", field="--db")


def _engine(url: URL) -> Engine:
    try:
        engine = sa.create_engine(url)
    except (ArgumentError, NoSuchModuleError) as error:
        raise ConfigError(f"{_safe(url)}: {error}", field="--db") from None
    if engine.dialect.name == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite only BEGINs before INSERT/UPDATE/DELETE, so DDL (migrations) would run
            # outside any transaction; SQLAlchemy's documented fix: the driver does nothing,
            # the "begin" hook below emits BEGIN.
            dbapi_connection.isolation_level = None
            # SQLite leaves foreign keys (and so ON DELETE CASCADE) off unless asked.
            dbapi_connection.execute("PRAGMA foreign_keys=ON")

        @sa.event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            mode = connection.get_execution_options().get(_BEGIN, "deferred")
            if mode == "migrate":
                # Outside a transaction, or it is a no-op.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            # IMMEDIATE takes the write lock up front: a writer that first read and then
            # upgrades its lock can fail at once with "database is locked" instead of waiting.
            connection.exec_driver_sql("BEGIN" if mode == "deferred" else "BEGIN IMMEDIATE")
    return engine


# --- reading a run directory -----------------------------------------------------------------

@dataclass(frozen=True)
class RunRecord:
    """Everything the store keeps of one run, read from its run directory."""

    run_id: str
    dimensions: dict[str, Any]
    metrics: list[MetricValue]
    report: dict[str, Any]
    report_sha256: str
    notes: list[str] = field(default_factory=list)


def load_run(run_dir: Path) -> RunRecord:
    """Read a finished run directory into a :class:`RunRecord`; nothing is written.

    Uses the run's report.json when it is there and of the current schema;
    otherwise builds the report from the raw artifacts and says so in ``notes``.
    Raises :class:`ArtifactError` for a directory that is not a finished run.
    """
    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "no such directory"
        raise ArtifactError(f"{run_dir}: {what}")
    meta_path, scenario_path = run_dir / "run.json", run_dir / "scenario.toml"
    if not meta_path.is_file() or not scenario_path.is_file():
        raise ArtifactError(f"{run_dir}: not a migrator run directory "
                            "(needs run.json and scenario.toml)")
    meta = RunMeta.read(run_dir)
    outcome = meta.outcome
    if outcome in (None, "running"):
        raise ArtifactError(f"{run_dir}: run has not finished (outcome {outcome!r}): still "
                            "running, or killed before it could record its end")
    scenario_toml = scenario_path.read_bytes()
    try:
        scenario = tomllib.loads(scenario_toml.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ArtifactError(f"{scenario_path}: {error}") from None

    notes: list[str] = []
    report: Report | None = None
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        notes.append("report.json missing: built from the raw artifacts")
    else:
        try:
            report = Report.model_validate_json(report_path.read_bytes())
        except ValidationError:
            notes.append("report.json does not match the current report schema: rebuilt")
        else:
            if report.schema_version != SCHEMA_VERSION:
                notes.append(f"report.json is schema {report.schema_version}, current is "
                             f"{SCHEMA_VERSION}: rebuilt")
                report = None
    if report is None:
        report = build_report(run_dir)
    document = report.model_dump(mode="json")
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return RunRecord(
        run_id=report.run_id,
        dimensions=run_dimensions(report, meta, scenario, scenario_toml),
        metrics=report_metrics(report),
        report=document,
        report_sha256=hashlib.sha256(canonical).hexdigest(),
        notes=notes,
    )


@dataclass(frozen=True)
class ImportResult:
    """What :meth:`ResultsStore.import_run` did with one run directory."""

    run_id: str
    status: str  # "added" | "updated" | "unchanged"
    metrics: int
    notes: list[str]


# --- selecting runs --------------------------------------------------------------------------

# Short names people type, mapped onto ``runs`` columns.
ALIASES = {
    "qemu": "qemu_version", "kernel": "host_kernel", "commit": "migrator_commit",
    "version": "migrator_version", "hash": "scenario_hash", "page": "page_size",
    "src_host": "source_host", "dst_host": "destination_host", "id": "run_id",
}
RANGES = ("since", "until")
_SIZES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class Selector:
    """A set of stored runs: filters over dimensions (AND across keys, OR within one key).

    ``run_ids`` selects runs by id; ``since``/``until`` bound the run date.
    Unless ``outcome`` is given, only completed runs are selected by filters
    (a failed run's metrics are partial); runs named by id are taken as named.
    """

    filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    run_ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def __str__(self) -> str:
        if self.run_ids:
            return ",".join(self.run_ids)
        parts = [f"{k}={v}" for k, values in self.filters.items() for v in values]
        parts += [f"{k}={getattr(self, k).isoformat()}" for k in RANGES if getattr(self, k)]
        return ",".join(parts) or "all completed runs"


def _when(key: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{key}={value}: not an ISO date or date-time") from None
    # SQLite keeps datetimes as UTC text without offset: compare in UTC everywhere.
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_selector(text: str) -> Selector:
    """Parse ``key=value[,key=value...]`` or ``RUN_ID[,RUN_ID...]`` (see :class:`Selector`).

    Keys are ``runs`` columns (:data:`DIMENSIONS`), their aliases (``qemu``,
    ``kernel``, ``commit``, ``hash``, ``page``, ...), ``since`` and ``until``.
    Raises :class:`ConfigError` on an unknown key or a mix of ids and filters.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError("empty selector: give key=value filters or run ids")
    pairs = [item for item in items if "=" in item]
    if not pairs:
        return Selector(run_ids=tuple(items))
    if len(pairs) != len(items):
        raise ConfigError(f"{text!r}: mixes run ids and key=value filters; use one or the other")
    filters: dict[str, tuple[str, ...]] = {}
    bounds: dict[str, datetime] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        value = value.strip()
        if key in RANGES:
            bounds[key] = _when(key, value)
        elif key in DIMENSIONS:
            filters[key] = (*filters.get(key, ()), value)
        else:
            known = sorted({*DIMENSIONS, *ALIASES, *RANGES})
            raise ConfigError(f"unknown selector key {key!r}; known: {', '.join(known)}")
    return Selector(filters=filters, since=bounds.get("since"), until=bounds.get("until"))


def _typed(column: sa.Column[Any], value: str) -> Any:
    """A selector value as the column's Python type."""
    python_type = column.type.python_type
    if python_type is bool:
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{column.name}={value}: not a boolean (true/false)")
    if python_type is int:
        number, unit = value.lower().rstrip("ib"), 1
        if number and number[-1] in _SIZES:
            number, unit = number[:-1], _SIZES[number[-1]]
        try:
            return int(number) * unit
        except ValueError:
            raise ConfigError(f"{column.name}={value}: not an integer") from None
    if python_type in (datetime, date):
        return _when(column.name, value)
    return value


def _where(selector: Selector) -> list[sa.ColumnElement[bool]]:
    clauses: list[sa.ColumnElement[bool]] = []
    if selector.run_ids:
        clauses.append(runs.c.run_id.in_(selector.run_ids))
    for key, values in selector.filters.items():
        column = runs.c[key]
        if key == "scenario_hash":
            # Hashes are long; a prefix is what people paste.
            clauses.append(sa.or_(*(column.startswith(v, autoescape=True) for v in values)))
        else:
            clauses.append(column.in_([_typed(column, v) for v in values]))
    if not selector.run_ids and "outcome" not in selector.filters:
        clauses.append(runs.c.outcome == "completed")
    if selector.since is not None:
        clauses.append(runs.c.run_date >= selector.since)
    if selector.until is not None:
        clauses.append(runs.c.run_date <= selector.until)
    return clauses


# --- the store -------------------------------------------------------------------------------

def _utc(row: dict[str, Any]) -> dict[str, Any]:
    # SQLite keeps no time zone; every date migrator stores is UTC.
    for key in ("run_date", "imported_at"):
        value = row.get(key)
        if isinstance(value, datetime) and value.tzinfo is None:
            row[key] = value.replace(tzinfo=UTC)
    return row


class ResultsStore:
    """A results database, migrated to the newest schema when opened.

    Use as a context manager, or call :meth:`close`::

        with ResultsStore.open("results.sqlite") as store:
            store.import_run(Path("runs/20261125T183726Z-x-3cd3"))
            rows = store.select(parse_selector("backing=hugetlb-2m,qemu=7.2.22"))
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Same pool; on SQLite its transactions take the write lock when they begin.
        self._writer = engine.execution_options(**{_BEGIN: "immediate"})

    @classmethod
    def open(cls, target: str | Path | None = None, *, create: bool = True) -> Self:
        """Open (creating if needed) and migrate the store at ``target`` (:func:`resolve_url`).

        ``create=False`` is for commands that only read: a SQLite file that does not
        exist is then a :class:`ConfigError` naming ``--db`` (a mistyped path), and
        nothing is created, neither the file nor its directory.
        """
        url = resolve_url(target)
        if not create:
            _require_existing(url)
        engine = _engine(url)
        try:
            _migrate(engine)
        except SQLAlchemyError as error:
            engine.dispose()
            raise StoreError(f"{_safe(url)}: {_one_line(error)}") from error
        except BaseException:
            engine.dispose()
            raise
        log.debug("results store %s at schema head", _safe(url))
        return cls(engine)

    @classmethod
    def attach(cls, url: str) -> Self:
        """The store at ``url`` (:attr:`shared_url`) as it is, neither created nor migrated:
        how a worker process (``ProcessPoolExecutor``) reads the store its parent opened."""
        return cls(_engine(make_url(url)))

    @property
    def shared_url(self) -> str | None:
        """The URL another process opens this store with (:meth:`attach`), password
        included; None for an in-memory SQLite database, which no other process can open."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            return None
        return url.render_as_string(hide_password=False)

    @property
    def display_url(self) -> str:
        """The store's URL to show: the password masked."""
        return _safe(self.engine.url)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def revision(self) -> str | None:
        """The alembic revision the database is at."""
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def import_run(self, run_dir: Path) -> ImportResult:
        """Record one finished run directory (see :func:`load_run`); idempotent per run id."""
        record = load_run(run_dir)
        return self.record(record, origin=str(run_dir.resolve()))

    def record(self, record: RunRecord, origin: str | None = None) -> ImportResult:
        """Store ``record``, replacing an older copy of the same run id."""
        row = {**record.dimensions, "imported_at": datetime.now(UTC), "origin": origin,
               "report_sha256": record.report_sha256}
        try:
            with self._writer.begin() as connection:
                existing = connection.execute(
                    sa.select(runs.c.report_sha256).where(runs.c.run_id == record.run_id)
                ).one_or_none()
                if existing is not None and existing.report_sha256 == record.report_sha256:
                    return ImportResult(record.run_id, "unchanged", len(record.metrics),
                                        record.notes)
                if existing is not None:
                    # Delete-then-insert is one transaction and portable; CASCADE drops the
                    # old metrics and report with the row.
                    connection.execute(sa.delete(runs).where(runs.c.run_id == record.run_id))
                connection.execute(sa.insert(runs), [row])
                if record.metrics:
                    connection.execute(sa.insert(metrics), [
                        {"run_id": record.run_id, "name": m.name, "value": m.value,
                         "unit": m.unit, "source": m.source} for m in record.metrics])
                connection.execute(sa.insert(reports), [{
                    "run_id": record.run_id, "schema_version": record.report["schema_version"],
                    "document": record.report}])
        except SQLAlchemyError as error:
            raise StoreError(f"storing {record.run_id}: {_one_line(error)}") from error
        return ImportResult(record.run_id, "added" if existing is None else "updated",
                            len(record.metrics), record.notes)

    def select(self, selector: Selector | None = None) -> list[dict[str, Any]]:
        """``runs`` rows matching ``selector`` (default: every completed run), oldest first."""
        query = sa.select(runs).order_by(runs.c.run_date, runs.c.run_id)
        for clause in _where(selector or Selector()):
            query = query.where(clause)
        with self.engine.connect() as connection:
            return [_utc(dict(row._mapping)) for row in connection.execute(query)]

    def metric_samples(self, run_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        """Metrics of each run: ``{run_id: {metric name: value}}`` (one sample per run)."""
        out: dict[str, dict[str, float]] = {run_id: {} for run_id in run_ids}
        ids = list(out)
        with self.engine.connect() as connection:
            for chunk in _chunks(ids, _IN_CHUNK):
                query = sa.select(metrics.c.run_id, metrics.c.name, metrics.c.value).where(
                    metrics.c.run_id.in_(chunk))
                for run_id, name, value in connection.execute(query):
                    out[run_id][name] = value
        return out

    def stored_reports(self, run_ids: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(run_id, report document)`` of the stored runs among ``run_ids``, a chunk of
        ids per query, so memory stays bounded however many runs there are."""
        ids = list(run_ids)
        with self.engine.connect() as connection:
            for chunk in _chunks(ids, _REPORT_CHUNK):
                query = sa.select(reports.c.run_id, reports.c.document).where(
                    reports.c.run_id.in_(chunk))
                for run_id, document in connection.execute(query):
                    yield run_id, dict(document)

    def metric_rows(self, run_id: str) -> list[dict[str, Any]]:
        """Every stored metric of one run, with unit and source, by name."""
        query = sa.select(metrics).where(metrics.c.run_id == run_id).order_by(metrics.c.name)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def units(self, names: Sequence[str]) -> dict[str, str]:
        """The unit stored with each metric name (any run's; units do not vary by run)."""
        query = sa.select(metrics.c.name, sa.func.min(metrics.c.unit)).where(
            metrics.c.name.in_(list(names))).group_by(metrics.c.name)
        with self.engine.connect() as connection:
            return {name: unit for name, unit in connection.execute(query)}

    def report(self, run_id: str) -> dict[str, Any] | None:
        """The stored report.json of ``run_id``, or None."""
        query = sa.select(reports.c.document).where(reports.c.run_id == run_id)
        with self.engine.connect() as connection:
            document = connection.execute(query).scalar_one_or_none()
        return None if document is None else dict(document)


def _chunks(ids: list[str], size: int) -> Iterator[list[str]]:
    """``ids`` in slices of at most ``size``: bound parameters per statement are limited
    (SQLite 32766, PostgreSQL 65535)."""
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


def _one_line(error: BaseException) -> str:
    # SQLAlchemy appends SQL and a help link on further lines; the first says what failed.
    text = str(getattr(error, "orig", None) or error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
