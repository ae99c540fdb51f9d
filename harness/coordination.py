"""Exactly-once execution of a study's matrix cells by any number of workers, through a database.

Every worker registers the cells of its spec in a claims table and then repeatedly claims one:
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL (``BEGIN IMMEDIATE`` serialises SQLite),
followed by a compare-and-set update on the claim's attempt number, so two workers never hold
the same cell. A holder heartbeats; a claim whose heartbeat is older than the timeout (or whose
worker process is gone from this host) becomes claimable again, and the new holder resumes the
cell into the same MLflow run (its id is kept on the claim). Times are the database's clock, so
workers on machines with skewed clocks agree. This deliberately does not use Optuna's
GridSampler, which repeats grid points under concurrency.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

from harness.config import SpecError
from harness.retry import created_tables_concurrently, retry_race
from harness.urls import sqlite_path

STORAGE_ENV = "HARNESS_STORAGE"
WORKER_ENV = "HARNESS_WORKER_NAME"  # host part of the worker id (default: the hostname)
PENDING, RUNNING, FINISHED, FAILED = "pending", "running", "finished", "failed"

metadata = sa.MetaData()
claims = sa.Table(
    "harness_claims",
    metadata,
    sa.Column("study", sa.String(300), primary_key=True),
    sa.Column("cell", sa.String(500), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("worker", sa.String(200)),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("heartbeat", sa.Float),
    sa.Column("run_id", sa.String(64)),
    sa.Column("error", sa.Text),
)
studies = sa.Table(
    "harness_studies",
    metadata,
    sa.Column("study", sa.String(300), primary_key=True),
    sa.Column("parent_run_id", sa.String(64)),
)


def resolve_storage(cli_value: str | None, tracking_uri: str, checkpoint_dir: Path) -> str:
    """``--storage`` > ``$HARNESS_STORAGE`` > a SQLite file beside the embedded MLflow store (one machine)."""
    if cli_value or os.environ.get(STORAGE_ENV):
        return cli_value or os.environ[STORAGE_ENV]
    database = sqlite_path(tracking_uri)
    folder = checkpoint_dir if database is None else database.parent
    return f"sqlite:///{(folder / 'coordination.db').resolve()}"


def _host() -> str:
    return os.environ.get(WORKER_ENV) or socket.gethostname()


_LIVE_WORKERS: set[str] = set()  # coordinators alive in this process


def worker_id() -> str:
    worker = f"{_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _LIVE_WORKERS.add(worker)
    return worker


def _process_gone(worker: str | None) -> bool:
    """True when ``worker`` ran on this host and its process no longer exists (a kill -9, a reboot)."""
    if not worker:
        return False
    host, _, rest = worker.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _host() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():  # ours, or an earlier incarnation with our pid (a restarted container)
        return worker not in _LIVE_WORKERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Claim:
    study: str
    cell: str
    attempt: int
    run_id: str | None
    previous_worker: str | None


class ClaimLost(RuntimeError):
    """Another worker took this cell over (our heartbeat went stale); stop without touching it."""


class Coordinator:
    """Claims on a study's cells in a SQL database (PostgreSQL across machines, SQLite on one)."""

    def __init__(self, url: str, heartbeat_timeout: float = 60.0) -> None:
        self.url, self.heartbeat_timeout = url, heartbeat_timeout
        self.worker = worker_id()
        shown = url
        try:
            parsed = sa.engine.make_url(url)
            shown = parsed.render_as_string(hide_password=True)
            if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
                parsed = parsed.set(drivername="postgresql+psycopg2")  # SQLAlchemy 2.1 defaults to psycopg 3
            if parsed.get_backend_name() == "sqlite":
                if parsed.database and parsed.database != ":memory:":
                    self._sqlite_folder = Path(parsed.database).parent  # created once every check has passed
                self.engine = sa.create_engine(url, connect_args={"timeout": 60})
                self._serialise_sqlite()
            else:
                self.engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=self._connect_args(parsed))
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as error:
            raise SpecError(f"storage '{shown}' is not a usable database URL ({error})") from None
        self.shown = shown
        self.dialect = self.engine.dialect.name
        if self.dialect == "postgresql":
            self._now = sa.literal_column("extract(epoch from clock_timestamp())", sa.Float)
        elif self.dialect == "sqlite":
            self._now = sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)
        else:
            raise SpecError(f"storage '{shown}': only PostgreSQL and SQLite are supported")

    _sqlite_folder: Path | None = None

    @staticmethod
    def _connect_args(parsed: sa.engine.URL) -> dict[str, object]:
        return {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}

    def _serialise_sqlite(self) -> None:
        # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead,
        # so a claim's read and update are one serialised step (SQLite's FOR UPDATE).
        @event.listens_for(self.engine, "connect")
        def _no_implicit_begin(dbapi_connection, _record) -> None:  # noqa: ANN001
            dbapi_connection.isolation_level = None

        @event.listens_for(self.engine, "begin")
        def _begin_immediate(connection) -> None:  # noqa: ANN001
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    def check(self) -> None:
        """Fail with one line if the database cannot be reached; writes nothing."""
        if self.dialect == "sqlite":
            return  # a local file: nothing to reach, and connecting would create it
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError as error:
            lines = str(getattr(error, "orig", error)).strip().splitlines()
            reason = lines[0] if lines else type(error).__name__
            raise SpecError(f"storage {self.shown} is unreachable ({reason})") from None

    def setup(self) -> None:
        if self._sqlite_folder is not None:
            self._sqlite_folder.mkdir(parents=True, exist_ok=True)
        retry_race(created_tables_concurrently)(metadata.create_all)(self.engine, checkfirst=True)

    def _insert_ignore(self, table: sa.Table) -> sa.Insert:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table).on_conflict_do_nothing()

    def register(self, study: str, cells: list[str]) -> None:
        rows = [{"study": study, "cell": c, "position": i, "state": PENDING, "attempt": 0} for i, c in enumerate(cells)]
        with self.engine.begin() as conn:
            conn.execute(self._insert_ignore(claims), rows)

    def requeue_failed(self, study: str, cells: list[str]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                claims.update()
                .where(claims.c.study == study, claims.c.cell.in_(cells), claims.c.state == FAILED)
                .values(state=PENDING, error=None)
            )

    def study_run(self, study: str, create: Callable[[], str]) -> str:
        """The study's parent MLflow run id: created by exactly one worker, under a row lock."""
        with self.engine.begin() as conn:
            conn.execute(self._insert_ignore(studies), [{"study": study, "parent_run_id": None}])
            row = conn.execute(sa.select(studies).where(studies.c.study == study).with_for_update()).one()
            if row.parent_run_id:
                return row.parent_run_id
            run_id = create()
            conn.execute(studies.update().where(studies.c.study == study).values(parent_run_id=run_id))
            return run_id

    def claim(self, study: str, cells: list[str]) -> Claim | None:
        """Take one claimable cell: pending, or running under a stale heartbeat or a dead local process."""
        mine = (claims.c.study == study) & claims.c.cell.in_(cells)
        with self.engine.begin() as conn:
            now = conn.execute(sa.select(self._now)).scalar_one()
            stale = (claims.c.state == RUNNING) & (claims.c.heartbeat < now - self.heartbeat_timeout)
            query = (
                sa.select(claims)
                .where(mine & ((claims.c.state == PENDING) | stale))
                .order_by(claims.c.position)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            row = conn.execute(query).first()
            if row is None:  # a holder on this host that died (kill -9) need not wait for the timeout
                running = conn.execute(sa.select(claims).where(mine & (claims.c.state == RUNNING))).all()
                row = next((r for r in running if _process_gone(r.worker)), None)
            if row is None:
                return None
            taken = conn.execute(
                claims.update()
                .where(claims.c.study == study, claims.c.cell == row.cell, claims.c.attempt == row.attempt)
                .values(state=RUNNING, worker=self.worker, attempt=row.attempt + 1, heartbeat=now, error=None)
            )
            if taken.rowcount != 1:
                return None
            return Claim(study, row.cell, row.attempt + 1, row.run_id, row.worker)

    def _held(self, claim: Claim) -> sa.ColumnElement[bool]:
        return (
            (claims.c.study == claim.study)
            & (claims.c.cell == claim.cell)
            & (claims.c.worker == self.worker)
            & (claims.c.attempt == claim.attempt)
        )

    def _update_held(self, claim: Claim, **values: object) -> bool:
        with self.engine.begin() as conn:
            if "heartbeat" in values:
                values["heartbeat"] = self._now
            return conn.execute(claims.update().where(self._held(claim)).values(**values)).rowcount == 1

    def set_run(self, claim: Claim, run_id: str) -> bool:
        claim.run_id = run_id
        return self._update_held(claim, run_id=run_id, heartbeat=True)

    def beat(self, claim: Claim) -> bool:
        return self._update_held(claim, heartbeat=True)

    def complete(self, claim: Claim, state: str, error: str | None = None) -> bool:
        return self._update_held(claim, state=state, error=error, heartbeat=True)

    def release(self, claim: Claim) -> bool:
        """Hand the cell back at once (Ctrl-C, SIGTERM): the next worker need not wait for the timeout."""
        return self._update_held(claim, state=PENDING, worker=None)

    def states(self, study: str, cells: list[str]) -> dict[str, tuple[str, str | None]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(claims.c.cell, claims.c.state, claims.c.error).where(
                    claims.c.study == study, claims.c.cell.in_(cells)
                )
            ).all()
        return {r.cell: (r.state, r.error) for r in rows}

    @contextmanager
    def heartbeat(self, claim: Claim) -> Iterator[threading.Event]:
        """Beat every third of the timeout in a thread; the event is set once the claim is lost."""
        lost, stop = threading.Event(), threading.Event()

        def loop() -> None:
            while not stop.wait(self.heartbeat_timeout / 3):
                try:
                    if not self.beat(claim):
                        lost.set()
                        return
                except sa.exc.DBAPIError:  # a blip: the next beat may still be in time
                    continue

        thread = threading.Thread(target=loop, name="claim-heartbeat", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join()

    def dispose(self) -> None:
        _LIVE_WORKERS.discard(self.worker)
        self.engine.dispose()
