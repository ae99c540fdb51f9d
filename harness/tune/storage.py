"""The Optuna storage of a tuning study: an RDB database with heartbeats, shared by every worker.

By default an embedded SQLite file beside the MLflow store (``mlruns/optuna/<study>.db``), created
before the first trial; ``--storage`` takes any SQLAlchemy URL (PostgreSQL for several workers or
machines). A worker that dies stops beating; after the grace period the next worker to look marks
its trial failed and :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` re-queues it with
the same parameters (:class:`StaleTrial`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from harness.config import SpecError, StudySpec, TuneConfig
from harness.retry import created_tables_concurrently, retry_race
from harness.runs import FAILED, end_run
from harness.tags import OPTUNA_STATE
from harness.tracking import TrackingStore, check_sqlite_file, check_writable, create_atomically
from harness.tune.attrs import RUN_ID_ATTR
from harness.urls import redact, sqlite_path


def default_storage(spec: StudySpec, tracking_uri: str) -> str:
    """An SQLite file in the study's output folder: beside an embedded MLflow store, else ``mlruns/``."""
    database = sqlite_path(tracking_uri)
    folder = Path("mlruns") if database is None else database.parent
    return f"sqlite:///{(folder / 'optuna' / f'{spec.name}.db').resolve()}"


def export_folder(url: str) -> Path:
    """Where the best config's spec goes: beside an SQLite storage, else ``mlruns/optuna``."""
    database = sqlite_path(url)
    return Path("mlruns") / "optuna" if database is None else database.parent


class StaleTrial:
    """Heartbeat-stale trial (its worker died): re-queue it and mark its MLflow run failed."""

    def __init__(self, max_retry: int) -> None:
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.store: TrackingStore | None = None  # set once the tracking store is open

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if self.store is not None and run_id:
            self.store.client.set_tag(run_id, OPTUNA_STATE, "FAIL")
            reason = "worker stopped beating (killed or lost); the trial was re-queued"
            end_run(self.store.client, run_id, FAILED, reason)
        print(f"  trial {trial.number}: its worker stopped beating; marked failed and re-queued", file=sys.stderr)


@retry_race(created_tables_concurrently, wait_s=0.5)  # workers starting together: the loser uses the winner's
def _rdb_storage(url: str, engine_kwargs: dict[str, Any], tune: TuneConfig) -> RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=tune.heartbeat_interval_s,
            grace_period=tune.grace_period_s,
            heartbeat_stale_trial_callback=StaleTrial(tune.max_retry),
        )


def build_optuna_storage(url: str) -> None:
    """Optuna's tables in a fresh SQLite file (see :func:`harness.tracking.create_atomically`)."""
    RDBStorage(url).engine.dispose()


def open_storage(url: str, tune: TuneConfig) -> RDBStorage:
    """The RDB storage with heartbeats and retries; tables are created here, before any trial."""
    engine_kwargs: dict[str, Any] = {}
    if (database := sqlite_path(url)) is not None:
        check_sqlite_file(database, "--storage")
        check_writable(database.parent, "--storage folder")
        engine_kwargs = {"connect_args": {"timeout": 60}}
        create_atomically(database, build_optuna_storage)  # an interrupted first run leaves none or a whole one
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"pool_pre_ping": True}
    elif "://" not in url:
        raise SpecError(f"--storage {url!r} is not a database URL (sqlite:///path.db, postgresql://user@host/db)")
    try:
        return _rdb_storage(url, engine_kwargs, tune)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecError(f"Optuna storage {redact(url)} is unusable: {reason}") from None
