"""Engines, sessions and schema migrations of the clinic database (SQLite by default, PostgreSQL by URL).

    from retina_core.clinic import db
    db.upgrade("sqlite:///var/retina.db")            # Alembic, programmatically: to the newest revision
    clinic = db.open_clinic()                         # from the environment (config.load_config); upgrades first
    with clinic.session() as s: ...                   # reads
    with clinic.writing() as s: ...                   # one write transaction (committed on exit)

SQLite: WAL journal, foreign keys on, a 30 s busy timeout, and write transactions started with BEGIN IMMEDIATE, so
two writers queue instead of one failing half-way. PostgreSQL: psycopg 3, read committed; writers that race on a
unique key (two first reviews of one analysis) are retried by `records`, never lost.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

from .config import ClinicConfig, ClinicConfigError, load_config, normalise_url, safe_url
from .store import ContentStore

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD = "0003_accounts"
_UPGRADE_LOCK = threading.Lock()


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _prepare_sqlite_dir(url: str) -> None:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _migrate(url: str, fn: str, revision: str) -> None:
    from alembic import command

    url = normalise_url(url)
    _prepare_sqlite_dir(url)
    # A plain engine (no foreign-key pragma: SQLite batch migrations copy tables that others reference).
    engine = create_engine(url)
    try:
        with _UPGRADE_LOCK, engine.begin() as conn:
            getattr(command, fn)(_alembic_config(conn), revision)
    except Exception as exc:
        if "OperationalError" in type(exc).__name__:
            raise ClinicConfigError(f"The clinic database at {safe_url(url)} cannot be reached: "
                                    f"{str(exc).splitlines()[0]}") from exc
        raise
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (default: the newest), creating it if needed."""
    _migrate(url, "upgrade", revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base": no clinic tables left)."""
    _migrate(url, "downgrade", revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def make_engine(url: str) -> Engine:
    """An engine for the app: see the module docstring for the SQLite settings."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        _prepare_sqlite_dir(url)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None          # the driver's implicit BEGIN off: we emit our own below
            cur = dbapi_conn.cursor()
            for pragma in ("foreign_keys=ON", "journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("clinic_write")
                                 else "BEGIN")
        return engine
    return create_engine(url, pool_pre_ping=True)


@dataclass
class Clinic:
    """An open clinic: database engine, session factories and the content store."""

    config: ClinicConfig
    engine: Engine
    store: ContentStore

    def __post_init__(self) -> None:
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(self.engine.execution_options(clinic_write=True), expire_on_commit=False)

    def session(self) -> Session:
        """A session for reading (use as a context manager)."""
        return self._reads()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """One write transaction: committed when the block ends, rolled back on an exception."""
        with self._writes.begin() as s:
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


def open_clinic(config: ClinicConfig | None = None, migrate: bool = True) -> Clinic:
    """Open the clinic named by `config` (default: the environment), migrating its schema to the newest revision
    first (so a new install or an older database needs no set-up step). Demo mode has no clinic: ClinicConfigError."""
    config = config or load_config()
    if not config.persistent:
        raise ClinicConfigError("Demo mode (RETINA_MODE=demo): nothing is stored, so there is no worklist.")
    if migrate:
        upgrade(config.database_url)
    engine = make_engine(config.database_url)
    return Clinic(config=config, engine=engine, store=ContentStore(config.store_dir))


def table_names(url: str) -> set[str]:
    engine = create_engine(normalise_url(url))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
