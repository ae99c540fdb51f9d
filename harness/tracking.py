"""MLflow: where runs go, how a study and its trials are laid out, and how metrics are logged.

Layout: one experiment per study; one parent run per study (role ``study``); one nested run per
matrix cell (role ``trial``, tag ``harness.cell``), found again by its cell key so an
interrupted trial resumes into the same run. Step metrics are logged asynchronously in batches.
"""

from __future__ import annotations

import json
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
import yaml
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run
from mlflow.entities import RunStatus as MlflowRunStatus
from mlflow.tracking import MlflowClient

from harness.config import SpecError
from harness.data import Corpus
from harness.matrix import Cell

DEFAULT_STORE_DIR = Path("mlruns")
ROLE, CELL, STUDY = "harness.role", "harness.cell", "harness.study"
PARENT = "mlflow.parentRunId"


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
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
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
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts" / name).resolve().as_uri()
        return None

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

    def study_run(self, experiment_id: str, study: str, tags: dict[str, str]) -> str:
        """The study's parent run; created once, shared by every invocation and worker."""
        query = f"tags.`{ROLE}` = 'study'"
        existing = self.runs(experiment_id, query)
        if not existing:
            self.client.create_run(experiment_id, run_name=study, tags={ROLE: "study", STUDY: study, **tags})
            existing = self.runs(experiment_id, query)
        keep = min(existing, key=lambda r: (r.info.start_time, r.info.run_id))
        for extra in existing:  # workers raced to create it: the oldest wins, childless extras go
            extra_id = extra.info.run_id
            if extra_id != keep.info.run_id and not self.runs(experiment_id, f"tags.`{PARENT}` = '{extra_id}'"):
                self.client.delete_run(extra_id)
        return keep.info.run_id

    def trial_run(self, experiment_id: str, trial: Cell) -> Run | None:
        matches = self.runs(experiment_id, f"tags.`{CELL}` = '{trial.key}'")
        return min(matches, key=lambda r: r.info.start_time) if matches else None

    def open_trial_run(
        self, experiment_id: str, parent_id: str, trial: Cell, study: str, corpus: Corpus, device: str
    ) -> str:
        """Create the trial's run (or reopen it after an interruption) and log its inputs."""
        existing = self.trial_run(experiment_id, trial)
        if existing is not None:
            self.client.update_run(existing.info.run_id, status="RUNNING")
            if "harness.error" in existing.data.tags:  # a retried failure: the old reason no longer holds
                self.client.delete_tag(existing.info.run_id, "harness.error")
            return existing.info.run_id
        config = trial.config
        tags = {
            ROLE: "trial",
            CELL: trial.key,
            STUDY: study,
            PARENT: parent_id,
            "variant": trial.variant,
            "seed": str(trial.seed),
            "backbone": config.model.backbone,
            "git_commit": git_commit(),
            "device": device_description(device),
            **{f"data.{k}": str(v) for k, v in corpus.summary().items() if k not in ("name", "digest")},
        }
        run_id = self.client.create_run(experiment_id, run_name=trial.name, tags=tags).info.run_id
        params = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in config.flat().items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start : start + 100])
        self.log_dataset(run_id, corpus)
        self.client.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")
        return run_id

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
        for attempt in range(3):
            try:
                self.client.log_inputs(run_id, inputs)
                return
            except mlflow.exceptions.MlflowException as error:
                # Workers logging the same dataset at once race on MLflow's insert of the dataset
                # row; the loser's retry finds the row and only links it to its run.
                duplicate = "dataset_pk" in str(error) or "UNIQUE constraint failed: datasets" in str(error)
                if not duplicate or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def finish_trial(self, run_id: str, summary: dict[str, float], tables: dict[str, pd.DataFrame]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in summary.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
        with tempfile.TemporaryDirectory() as folder:
            for name, table in tables.items():
                path = Path(folder) / f"{name}.csv"
                table.to_csv(path, index=False)
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, "FINISHED")

    def log_weights(self, run_id: str, state_dict: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.pt"
            torch.save(state_dict, path)
            self.client.log_artifact(run_id, str(path))

    def fail_trial(self, run_id: str, reason: str, status: str = "FAILED") -> None:
        self.client.set_tag(run_id, "harness.error", reason[:5000])
        self.client.set_terminated(run_id, status)

    @staticmethod
    def is_finished(run: Run) -> bool:
        return run.info.status == MlflowRunStatus.to_string(MlflowRunStatus.FINISHED)


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
