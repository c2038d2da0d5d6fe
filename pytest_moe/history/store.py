"""The history database: schema, versioned migrations, writes that survive concurrency, the reads.

Why SQLAlchemy Core (not the ORM): the rows are flat facts written once and read in bulk, and the same
statements must run on SQLite (embedded default) and PostgreSQL (runners sharing one history).

Why a small ``schema_version`` table instead of Alembic: the package ships no migration directory or
``alembic.ini`` that an installed wheel could find, the schema is two tables, and migrations must run
unattended from any pytest process — so ``MIGRATIONS`` is an ordered list of functions, applied under a
lock (a PostgreSQL advisory lock, a file lock next to a SQLite file) and stamped with their number. A
database newer than this code is refused with one sentence rather than written wrongly.

Concurrency: each config's rows are one transaction. SQLite runs in WAL mode with a long busy timeout
(xdist workers queue instead of failing); PostgreSQL serialises nothing but the run row, inserted with
ON CONFLICT DO NOTHING because every worker of a run tries to create it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from filelock import FileLock
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from pytest_moe.history.rows import OUTCOME_CHECK, ConfigProvenance, Row

ENV_VAR = "PYTEST_MOE_HISTORY"
INI_NAME = "moe_history"
#: Value of ``--moe-history`` / env / ini that turns the history off.
OFF = "off"
SQLITE_BUSY_TIMEOUT_S = 60


class HistoryError(Exception):
    """Opening or migrating the history failed; the message is the one sentence a user sees."""


def default_url() -> str:
    """SQLite in the user cache dir: outside the workspace that ``actions/checkout`` cleans every night."""
    from platformdirs import user_cache_dir

    return f"sqlite:///{Path(user_cache_dir('pytest-moe')) / 'history.sqlite'}"


def resolve_url(option: str | None, env: str | None, ini: str | None) -> str | None:
    """Command line > environment > ini > default; ``off`` anywhere (first found) disables the history."""
    chosen = next((v for v in (option, env, ini) if v), None) or default_url()
    if chosen.strip().lower() == OFF:
        return None
    return chosen if "://" in chosen else f"sqlite:///{Path(chosen).expanduser().resolve()}"


metadata = sa.MetaData()

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("started_at", sa.DateTime, nullable=False, index=True),
    sa.Column("pytest_moe_version", sa.String(64)),
    sa.Column("suite_commit", sa.String(64)),
    sa.Column("host", sa.String(255)),
    sa.Column("gpu_driver", sa.String(64)),
    sa.Column("cuda_version", sa.String(64)),
    sa.Column("source", sa.String(32), nullable=False),
)

results = sa.Table(
    "results", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(128), sa.ForeignKey("runs.run_id"), nullable=False, index=True),
    sa.Column("config_id", sa.String(512), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("config", sa.String(255), nullable=False),
    sa.Column("check_name", sa.String(64), nullable=False),
    sa.Column("metric", sa.String(64), nullable=False),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_type", sa.String(64)),
    sa.Column("engine", sa.String(64)),
    sa.Column("engine_version", sa.String(64)),
    sa.Column("engine_commit", sa.String(64)),
    sa.Column("gpu_name", sa.String(255)),
    sa.Column("gpu_count", sa.Integer),
    sa.Column("moe_backend", sa.String(64)),
    sa.Column("moe_kernel", sa.String(128)),
    sa.Column("server_command", sa.Text),
    sa.Column("config_hash", sa.String(64)),
    sa.Column("repro_command", sa.Text),
    sa.Column("log_path", sa.Text),
    sa.Column("recorded_at", sa.DateTime, nullable=False),
    sa.Index("ix_results_series", "config_id", "check_name", "metric", "batch_size"),
)


#: What judging a metric row needs (``regress.series_key`` and the verdict); the rest is provenance.
_SLIM_COLUMNS = frozenset({"id", "run_id", "config_id", "model", "config", "check_name", "metric", "batch_size", "value",
                           "status", "error_type", "engine", "gpu_name"})


def _v1_create_tables(conn: Connection) -> None:
    runs.create(conn, checkfirst=True)
    results.create(conn, checkfirst=True)


#: Version N is reached by applying ``MIGRATIONS[N-1]``; append, never edit a released one.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1_create_tables]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    started_at: datetime
    pytest_moe_version: str | None = None
    suite_commit: str | None = None
    host: str | None = None
    gpu_driver: str | None = None
    cuda_version: str | None = None
    source: str = "pytest"


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so both backends store the same thing."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def host_name() -> str:
    return socket.gethostname()


class HistoryStore:
    def __init__(self, url: str):
        self.url = url
        self.engine = _create_engine(url)
        self._migrate()

    # -- schema ------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            lock = FileLock(f"{database}.migrate.lock") if database and database != ":memory:" else None
            if lock is None:
                self._migrate_locked()
                return
            with lock:
                self._migrate_locked()
        else:
            self._migrate_locked()

    def _migrate_locked(self) -> None:
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7300310)"))  # released at commit
                schema_version.create(conn, checkfirst=True)
                current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
                if current > SCHEMA_VERSION:
                    raise HistoryError(
                        f"history database {self.display_url} has schema version {current}, newer than this "
                        f"pytest-moe understands ({SCHEMA_VERSION}); upgrade pytest-moe"
                    )
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[version - 1](conn)
                    conn.execute(schema_version.delete())
                    conn.execute(schema_version.insert().values(version=version))
        except sa.exc.SQLAlchemyError as exc:
            raise HistoryError(f"cannot open history database {self.display_url}: {_first_line(exc)}") from None

    @property
    def display_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0

    # -- writes ------------------------------------------------------------------------------------
    def ensure_run(self, run: RunInfo, conn: Connection | None = None) -> None:
        """Every writer of a run calls this; the first one creates the row, the others change nothing."""
        insert = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(runs)
        stmt = insert.values(**asdict(run)).on_conflict_do_nothing(index_elements=["run_id"])
        if conn is not None:
            conn.execute(stmt)
            return
        with self.engine.begin() as own:
            own.execute(stmt)

    def record(self, run: RunInfo, prov: ConfigProvenance, rows: Iterable[Row]) -> int:
        """One config's rows in one transaction: all of them are in the history, or none."""
        now = utcnow()
        common = asdict(prov)
        values = [
            {
                **common, "run_id": run.run_id, "check_name": r.check, "metric": r.metric, "batch_size": r.batch_size,
                "value": r.value, "status": r.status.value, "error_type": r.error_type, "recorded_at": now,
            }
            for r in rows
        ]
        if not values:
            return 0
        with self.engine.begin() as conn:
            self.ensure_run(run, conn)
            conn.execute(results.insert(), values)
        return len(values)

    def has_run(self, run_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id)).first() is not None

    # -- reads -------------------------------------------------------------------------------------
    def runs(self, since: datetime | None = None) -> list[dict[str, Any]]:
        query = sa.select(runs).order_by(runs.c.started_at, runs.c.run_id)
        if since is not None:
            query = query.where(runs.c.started_at >= since)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def rows(self, run_ids: Iterable[str] | None = None, config_ids: Iterable[str] | None = None,
             slim: bool = False, metrics: Iterable[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Result rows with their run's start time, oldest run first.

        Why not a join: the report reads ~10^5 rows, and converting each row's start time (and ``Row``
        objects to dicts) dominated; start times come from the small runs table, rows as plain tuples.
        ``slim``: the per-config provenance columns (the same on every row of one config and run) are read
        only for the outcome rows; the other rows hold just the columns that judging needs.
        ``metrics``: only these (check, metric) pairs.
        """
        all_runs = self.runs()  # oldest first
        started = {r["run_id"]: r["started_at"] for r in all_runs}
        order = {r["run_id"]: i for i, r in enumerate(all_runs)}
        wanted = [c for c in results.c if c.name != "recorded_at"]
        parts = [(wanted, None)]
        if slim:
            lean = [c for c in wanted if c.name in _SLIM_COLUMNS]
            parts = [(wanted, results.c.check_name == OUTCOME_CHECK), (lean, results.c.check_name != OUTCOME_CHECK)]
        rows: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            for columns, where in parts:
                query = sa.select(*columns).order_by(results.c.id)
                if where is not None:
                    query = query.where(where)
                if run_ids is not None:
                    query = query.where(results.c.run_id.in_(list(run_ids)))
                if config_ids is not None:
                    query = query.where(results.c.config_id.in_(list(config_ids)))
                if metrics is not None:
                    query = query.where(sa.tuple_(results.c.check_name, results.c.metric).in_(list(metrics)))
                result = conn.execute(query)
                keys = list(result.keys())
                rows += [dict(zip(keys, r)) for r in result.fetchall()]
        for row in rows:
            row["started_at"] = started[row["run_id"]]
        rows.sort(key=lambda r: (order[r["run_id"]], r["id"]))
        return rows

    def dispose(self) -> None:
        self.engine.dispose()


def parse_url(url: str) -> sa.engine.URL:
    """Checked when pytest starts, so a typo is a usage error and not a lost night of history."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise HistoryError(f"history URL {url!r} is not a database URL (e.g. sqlite:///path or postgresql://host/db)") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise HistoryError(f"history URL {parsed.render_as_string(hide_password=True)}: only sqlite and postgresql are supported")
    return parsed


def _create_engine(url: str) -> Engine:
    parsed = parse_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return sa.create_engine(parsed, pool_pre_ping=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise HistoryError(f"cannot use history URL {parsed.render_as_string(hide_password=True)}: {_first_line(exc)}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run beside the one writer; the busy timeout makes concurrent writers wait."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def env_url() -> str | None:
    return os.environ.get(ENV_VAR)
