"""MLflow: where runs go (a store made ready for a study) and how metrics are logged.

Layout: one experiment per study; one parent run per study (role ``study``); one nested run per
matrix cell (role ``trial``, tag ``harness.cell``). How a trial's run is opened and ended is
:mod:`harness.runs`. Step metrics are logged asynchronously in batches.
"""

from __future__ import annotations

import os
import platform
import queue
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Run
from mlflow.tracking import MlflowClient

from harness.config import SpecError
from harness.data import Corpus
from harness.retry import retry_race
from harness.urls import sqlite_path

DEFAULT_STORE_DIR = Path("mlruns")


def default_tracking_uri(store_dir: Path = DEFAULT_STORE_DIR) -> str:
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cli_value: str | None) -> str:
    """``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > the embedded store under ``mlruns/``."""
    return cli_value or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


class TrackingStore:
    """A tracking URI made ready for a study: reachable, migrated, experiment created."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if (database := sqlite_path(uri)) is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        elif uri.startswith(("http://", "https://")):
            self._check_server(uri)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)

    @staticmethod
    def _check_server(uri: str) -> None:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
                if response.status != 200:
                    raise SpecError(f"tracking server {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise SpecError(f"tracking server {uri} is unreachable ({reason})") from None

    def artifact_location(self, name: str) -> str | None:
        database = sqlite_path(self.uri)
        return None if database is None else (database.parent / "artifacts" / name).resolve().as_uri()

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location(name))
        except mlflow.exceptions.MlflowException:
            experiment = self.client.get_experiment_by_name(name)  # another worker created it first
            if experiment is None:
                raise
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
