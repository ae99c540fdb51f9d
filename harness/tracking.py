"""MLflow: where runs go (a store made ready for a study) and how metrics are logged.

Layout: one experiment per study; one parent run per study (role ``study``); one nested run per
matrix cell (role ``trial``, tag ``harness.cell``). How a trial's run is opened and ended is
:mod:`harness.runs`. Step metrics are logged asynchronously in batches.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import mlflow
import pandas as pd
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Run
from mlflow.tracking import MlflowClient

from harness.config import SpecError
from harness.data import Corpus, cache_dir
from harness.retry import retry_race
from harness.tags import NOTE
from harness.urls import sqlite_path

DEFAULT_STORE_DIR = Path("mlruns")


def default_tracking_uri(store_dir: Path = DEFAULT_STORE_DIR) -> str:
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cli_value: str | None) -> str:
    """``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > the embedded store under ``mlruns/``."""
    return cli_value or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def git_commit(full: bool = False) -> str:
    """The harness checkout's HEAD commit (abbreviated unless ``full``: MLflow's ``mlflow.source.git.commit`` wants
    it whole): the code that ran, wherever the command was started; "unknown" for an installed copy. The short form
    ends in ``-dirty`` when tracked files differ from that commit: such a run is not reproducible from it."""
    here = Path(__file__).parent
    try:
        command = ["git", "rev-parse", *([] if full else ["--short"]), "HEAD"]
        commit = subprocess.run(command, capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        if not commit or full:
            return commit or "unknown"
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: str, threads: int | None = None) -> str:
    """The device and its model (CPU numerics differ between CPU models: a result reruns bit-identically only on
    the same model, at the same commit and thread count); ``threads``: a cell's, else this process's."""
    if device != "cpu" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{cpu_model()} x{threads or torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's processor or machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # MLflow's database/server stores
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def check_writable(folder: Path, what: str) -> None:
    """SpecError unless files can be created in ``folder`` (or, before it exists, in its nearest ancestor).

    Checked up front by creating a throwaway file, since permission bits say nothing for root and
    nothing about a read-only mount; nothing is left behind.
    """
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise SpecError(f"{what} {folder}: not writable ({error.strerror or error})") from None


def check_sqlite_file(database: Path, what: str) -> None:
    """SpecError when ``database`` exists but is not an SQLite database (a directory, a text file, ...)."""
    if not database.exists():
        return
    try:
        with database.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        raise SpecError(f"{what} {database}: unreadable ({error.strerror or error})") from None
    if header != SQLITE_HEADER and database.stat().st_size > 0:
        raise SpecError(f"{what} {database}: not an SQLite database")


def check_tracking_uri(uri: str, create: bool = True) -> None:
    """Reject a URI MLflow could only fail on later: unknown scheme, a non-database file, an unwritable
    folder (``create``), a missing store when reading (not ``create``), an unreachable server."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in SCHEMES:
        raise SpecError(f"tracking URI {uri[:200]!r}: expected one of {', '.join(f'{s}://' for s in SCHEMES)}")
    if (database := sqlite_path(uri)) is not None:
        check_sqlite_file(database, "tracking store")
        if create:
            check_writable(database.parent, "tracking store folder")
        elif not database.is_file():
            raise SpecError(f"tracking store {database}: no such database (nothing has been tracked there yet)")
    elif scheme in ("http", "https"):
        check_server(uri)


def check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
            if response.status != 200:
                raise SpecError(f"tracking server {uri} answered /health with HTTP {response.status}")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SpecError(f"tracking server {uri} is unreachable ({reason})") from None


def create_atomically(database: Path, build: Callable[[str], None]) -> None:
    """Create the SQLite file ``database`` whole or not at all, once, however many processes start together.

    Creating MLflow's (or Optuna's) tables is many statements; an interruption halfway left a file every
    later run rejected ("table ... already exists"), and two processes on a fresh file raced in the
    migration. So under a lock beside it, ``build`` gets the URL of a file aside in the same folder and
    fills it completely; ``os.replace`` then moves it into place in one step.
    """
    if database.is_file() and database.stat().st_size > 0:
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(database.with_name(f"{database.name}.lock")):
        if database.is_file() and database.stat().st_size > 0:
            return  # another process built it while this one waited
        for leftover in database.parent.glob(f".{database.name}.*.partial"):  # an interrupted build's
            leftover.unlink(missing_ok=True)
        partial = database.with_name(f".{database.name}.{os.getpid()}.partial")
        try:
            build(f"sqlite:///{partial}")
            os.replace(partial, database)
        except BaseException as error:  # a full disk, a signal: no half-built file left behind (nor its journal)
            for leftover in database.parent.glob(f"{partial.name}*"):
                leftover.unlink(missing_ok=True)
            if _disk_full(error):
                free = shutil.disk_usage(database.parent).free
                raise SpecError(
                    f"{database}: the disk is full ({free:,} bytes free): no room to create the store"
                ) from None
            raise


def _disk_full(error: BaseException) -> bool:
    """ENOSPC, or SQLite's own word for it (wrapped by SQLAlchemy, MLflow or Optuna)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "database or disk is full" in str(error)


def migrate_mlflow_store(url: str) -> None:
    """Every MLflow table and the default experiment, as MLflow itself creates them on first use."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(url, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH).engine.dispose()  # closed before the move


def build_mlflow_store(url: str) -> None:
    """A new embedded store: a copy of this MLflow version's empty store in the cache, migrated there once. MLflow's
    migrations take seconds for every new store; the copy, milliseconds, and it is the same file (nothing in an empty
    store depends on where it lies: the default experiment's artifact location is relative). Migrated in place when
    the cache cannot be written."""
    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        create_atomically(template, migrate_mlflow_store)
    except (OSError, SpecError):  # an unwritable or full cache folder: the store is still made, more slowly
        migrate_mlflow_store(url)
        return
    database = sqlite_path(url)
    assert database is not None  # create_atomically hands a sqlite:/// URL
    shutil.copyfile(template, database)


class TrackingStore:
    """A tracking URI made ready for a study: checked, created whole (SQLite), migrated, reachable."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        check_tracking_uri(uri)
        if (database := sqlite_path(uri)) is not None:
            create_atomically(database, build_mlflow_store)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)

    def shared_run_lock(self) -> contextlib.AbstractContextManager:
        """Held while a process finds or creates a run several processes share (a study's or a tune's parent).

        Without it, two array tasks on one embedded store could each see only their own new parent run, and the
        one keeping the older deleted the other's. A tracking server's clients on other machines share no
        folder; they rely on :func:`harness.runs.shared_run` keeping the oldest.
        """
        database = sqlite_path(self.uri)
        return contextlib.nullcontext() if database is None else filelock.FileLock(f"{database}.runs.lock")

    def artifact_location(self, name: str) -> str | None:
        database = sqlite_path(self.uri)
        return None if database is None else (database.parent / "artifacts" / name).resolve().as_uri()

    def experiment_id(self, name: str, description: str = "") -> str:
        """The study's experiment, created if needed, with ``description`` as its note (the UI's description)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                tags = {NOTE: description} if description else None
                return self.client.create_experiment(name, self.artifact_location(name), tags)
            except mlflow.exceptions.MlflowException:
                experiment = self.client.get_experiment_by_name(name)  # another worker created it first
                if experiment is None:
                    raise
        if description and experiment.tags.get(NOTE) != description:  # the spec's description has changed
            self.client.set_experiment_tag(experiment.experiment_id, NOTE, description)
        return experiment.experiment_id

    def runs(self, experiment_id: str, filter_string: str) -> list[Run]:
        found, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """Metric name -> last step already logged to a run (what a resumed attempt must not repeat)."""
        run = self.client.get_run(run_id)
        return {key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in run.data.metrics}

    def log_dataset(self, run_id: str, corpus: Corpus) -> None:
        summary = corpus.summary()
        frame = pd.DataFrame([{"split": s, "tokens": summary[f"{s}_tokens"]} for s in ("train", "validation", "test")])
        with warnings.catch_warnings():  # MLflow warns about its own source registry and int columns
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_pandas(frame, source=corpus.name, name=corpus.name, digest=corpus.digest)
        inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])]
        retry_race(_dataset_inserted_concurrently, attempts=3)(self.client.log_inputs)(run_id, inputs)

    def log_weights(self, run_id: str, state_dict: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.pt"
            torch.save(state_dict, path)
            self.client.log_artifact(run_id, str(path))

    def load_weights(self, run_id: str) -> dict[str, Any]:
        """The final weights a run logged with :meth:`log_weights` (on the CPU), fetched from any artifact store."""
        with tempfile.TemporaryDirectory() as folder:
            path = self.client.download_artifacts(run_id, "model.pt", folder)
            return torch.load(path, map_location="cpu", weights_only=True)


def _dataset_inserted_concurrently(error: BaseException) -> bool:
    # Workers logging the same dataset at once race on MLflow's insert of the dataset row; the
    # loser's retry finds the row and only links it to its run.
    message = str(error)
    return isinstance(error, mlflow.exceptions.MlflowException) and (
        "dataset_pk" in message or "UNIQUE constraint failed: datasets" in message
    )


class AttemptSuperseded(RuntimeError):
    """Another attempt at this cell has taken its run over: this one must stop writing (``harness/attempt.py``)."""


class MlflowSink:
    """Step metrics to MLflow off the training thread: ``log_metrics`` queues and returns at once.

    A daemon thread drains the queue with batched ``log_batch`` calls; ``sync`` waits until what
    is queued has landed (the trainer calls it before each checkpoint, so a resumed trial never
    misses a metric), ``flush`` also stops the thread. ``logged`` maps metric name -> last step
    already in the run (from an interrupted attempt): those steps are not logged twice.
    (MLflow's own async mode costs about a second per run at shutdown; this costs nothing.)
    """

    def __init__(self, client: MlflowClient, run_id: str, logged: dict[str, int] | None = None) -> None:
        self.client, self.run_id, self.logged = client, run_id, logged or {}
        self._queue: queue.Queue[list[Metric] | threading.Event | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="mlflow-sink", daemon=True)
        self._thread.start()

    def check_owner(self) -> None:
        """Raise when another writer has taken the run over; every writer owns its run here (see ``AttemptSink``)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if batch:
            self._queue.put(batch)

    def _send(self, batch: list[Metric]) -> None:
        try:
            for start in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        except Exception as error:  # surfaced by sync()/flush(); training is not interrupted
            self._error = error

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            while len(item) < 900:  # coalesce what is already queued into one request
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(more, list):  # a sync marker or the stop: after this batch
                    self._queue.put(more)
                    break
                item.extend(more)
            self._send(item)

    def sync(self) -> None:
        """Wait until every metric queued so far is in the run."""
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait()
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
