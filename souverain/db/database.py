"""Open a database (SQLite file by default, PostgreSQL by URL) and bring its schema to the newest migration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _sqlite_begin_read(conn: Any) -> None:
    # Readers take no lock up front: in WAL mode they run beside the writer and never wait for it.
    conn.exec_driver_sql("BEGIN")


def _sqlite_begin(conn: Any) -> None:
    # Python's sqlite3 starts transactions only before DML, so DDL would commit on its own; we start them
    # ourselves (SQLAlchemy's documented recipe) and migrations become all-or-nothing. IMMEDIATE takes the
    # write lock up front: a deferred transaction that reads, then writes after another writer committed,
    # fails at once with "database is locked" (SQLite cannot wait there), whereas IMMEDIATE waits its turn.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # no implicit transactions: _sqlite_begin opens them
    # WAL lets readers run beside one writer; busy_timeout makes several processes wait instead of failing;
    # synchronous=FULL makes every committed usage row survive a kill or a power cut.
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=15000", "synchronous=FULL", "foreign_keys=ON"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


@dataclass
class Database:
    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    readers: sessionmaker[Session] | None = None  # SQLite: sessions that only read (no write lock)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work commits on success and rolls back on any error."""
        with self.sessions() as s, s.begin():
            yield s

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only. On SQLite it does not take the write lock, so reads never queue behind
        a writer (every `session()` does: BEGIN IMMEDIATE). Writing in it is a bug: it may fail as locked."""
        with (self.readers or self.sessions)() as s, s.begin():
            yield s

    def migrate(self, revision: str = "head") -> None:
        """Upgrade the schema, all migrations in one transaction (a failure leaves the old schema intact)."""
        from alembic import command

        with self.engine.begin() as conn:
            if not self.is_sqlite:  # several servers may start at once: one migrates, the others wait
                conn.execute(text("SELECT pg_advisory_xact_lock(727217)"))
            command.upgrade(alembic_config(conn), revision)

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def integrity_check(self) -> list[str]:
        """Problems the database reports about itself (empty when sound)."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check")]
                rows += [str(tuple(r)) for r in conn.exec_driver_sql("PRAGMA foreign_key_check")]
                return [r for r in rows if r != "ok"]
            return []

    def close(self) -> None:
        self.engine.dispose()
        if self.readers is not None:
            bind = self.readers.kw.get("bind")
            if bind is not None:
                bind.dispose()


def alembic_config(conn: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def open_database(url: str, migrate: bool = True) -> Database:
    """Connect; by default run pending migrations before anything else touches the tables."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Password hashes, key hashes and conversations: readable by the owner only (SQLite gives its -wal
        # and -shm files the database file's mode).
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        engine = create_engine(url, connect_args={"timeout": 15, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        read_engine = create_engine(url, connect_args={"timeout": 15, "check_same_thread": False})
        event.listen(read_engine, "connect", _sqlite_pragmas)
        event.listen(read_engine, "begin", _sqlite_begin_read)
        readers: sessionmaker[Session] | None = sessionmaker(read_engine, expire_on_commit=False)
    else:
        engine = create_engine(url, pool_pre_ping=True)
        readers = None
    db = Database(url, engine, sessionmaker(engine, expire_on_commit=False), readers)
    if migrate:
        db.migrate()
    return db
