"""A trial's MLflow run from open to end, used by the study runner and the tuner alike.

* Open: :func:`open_trial_run` creates the cell's run, or reopens the run that carries its cell key
  (tag ``harness.cell``), so an interrupted or retried trial goes on in the same run.
* End: every terminal status goes through :func:`end_run`; :class:`TrialRun` finishes, fails or
  prunes a run after flushing its metric sink, so what was logged before the end is kept.
* Why it ended: :func:`ending` is the one table from an exception to a status. Any ``Exception``
  raised inside a trial is the trial's own error (divergence, out of memory, which CPU torch reports
  as a plain ``RuntimeError``, bad data, a failing store) and fails it with its reason while the study
  goes on; only an interruption of the harness (Ctrl-C, SIGTERM: :mod:`harness.interrupt`) kills
  the run, so a rerun resumes it.
* Ending is idempotent: the summary metrics go in one batch with the :data:`~harness.tags.SUMMARY`
  tag, so a rerun after an interrupted save never logs them twice, and a run is marked ended even
  when flushing its metrics failed.
* Shared runs: a study's parent run is created by whichever worker comes first (under a lock on an
  embedded store); when workers race, :func:`oldest` wins (:func:`shared_run`). :func:`finish_study_run`
  ends it with study-level metrics.
* Every run the harness creates carries MLflow's standard system tags (:func:`system_tags`), which
  fill the UI's Source, Version and User columns.
"""

from __future__ import annotations

import contextlib
import getpass
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from harness.colours import colour
from harness.config import TrialConfig
from harness.data import Corpus
from harness.fingerprint import fingerprint, identity, run_params
from harness.health import is_result, reference_summary
from harness.matrix import Cell
from harness.tags import (
    CELL,
    ERROR,
    FINGERPRINT,
    HEALTH,
    HEALTH_SUMMARY,
    PARENT,
    PRUNED,
    ROLE,
    ROLE_SUPERSEDED,
    ROLE_TRIAL,
    RUN_COLOUR,
    SOURCE_COMMIT,
    SOURCE_NAME,
    SOURCE_TYPE,
    STUDY,
    SUMMARY,
    USER,
)
from harness.tracking import AttemptSuperseded, MlflowSink, TrackingStore, device_description, git_commit

FINISHED, FAILED, KILLED, RUNNING, SCHEDULED = (
    RunStatus.to_string(status)
    for status in (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED, RunStatus.RUNNING, RunStatus.SCHEDULED)
)  # SCHEDULED: a study cell's run the driver created, not yet opened by an attempt
TRIAL_ERRORS = (Exception,)  # the trial's own fault: the study goes on (interruptions are BaseExceptions)
REASON_CHARS = 500  # a reason is shown on one line of the CLI and in the report's table


@dataclass(frozen=True)
class Ending:
    status: str  # FAILED or KILLED
    reason: str  # the ``harness.error`` tag


def ending(error: BaseException) -> Ending:
    """How a run ends on ``error``: the trial's own error fails it, anything else is an interruption."""
    last_line = ("".join(traceback.format_exception_only(error)).strip().splitlines() or [type(error).__name__])[-1]
    if isinstance(error, TRIAL_ERRORS):
        first_line = (str(error).strip().splitlines() or [""])[0]
        return Ending(FAILED, f"{type(error).__name__}: {first_line}"[:REASON_CHARS])
    return Ending(KILLED, f"interrupted: {last_line}"[:REASON_CHARS])


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """The one place a trial's run ends: its terminal status and, for a failure or a kill, why."""
    if reason is not None:
        client.set_tag(run_id, ERROR, reason[:5000])
    client.set_terminated(run_id, status)


def system_tags() -> dict[str, str]:
    """MLflow's standard tags for a run the harness creates (what ``mlflow.start_run`` sets by itself)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry or $USER
        user = "unknown"
    return {SOURCE_NAME: "harness", SOURCE_TYPE: "LOCAL", SOURCE_COMMIT: git_commit(full=True), USER: user}


def is_finished(run: Run) -> bool:
    return run.info.status == FINISHED


def oldest(runs: list[Run]) -> Run | None:
    """Of runs that workers racing each other created for one purpose, the one they all keep."""
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)


def shared_run(store: TrackingStore, experiment_id: str, query: str, run_name: str, tags: dict[str, str]) -> str:
    """The run matching ``query``, created if there is none, RUNNING; shared by every worker and invocation.

    On one embedded store the processes take turns (:meth:`TrackingStore.shared_run_lock`); clients of a
    tracking server that raced to create it all keep the oldest, and the extras (childless) are deleted.
    """
    with store.shared_run_lock():
        existing = store.runs(experiment_id, query)
        if not existing:
            store.client.create_run(experiment_id, run_name=run_name, tags=system_tags() | tags)
            existing = store.runs(experiment_id, query)
        keep = oldest(existing)
        assert keep is not None
        for extra in existing:
            extra_id = extra.info.run_id
            if extra_id != keep.info.run_id and not store.runs(experiment_id, f"tags.`{PARENT}` = '{extra_id}'"):
                store.client.delete_run(extra_id)
    resume(store.client, keep.info.run_id)  # resumed, or extended with more trials
    return keep.info.run_id


def resume(client: MlflowClient, run_id: str) -> None:
    """A run that ended and is being worked on again: RUNNING (its old end time stays until it ends again)."""
    if client.get_run(run_id).info.status != RUNNING:
        client.update_run(run_id, RUNNING)


def finish_study_run(store: TrackingStore, run_id: str, status: str) -> None:
    """End a study's parent run with what its trials say: per variant, the mean test PPL over its results
    (:func:`harness.health.is_result`, the report's rule) and how many there are; the health verdicts as a tag.

    Summary metrics first at step 0 (the UI shows them as values, not as one-point charts), logged again only when a
    value changed (a study extended with more cells, a superseded cell, the last of several array tasks to end), at
    the step after its previous value: one value per step, the latest the current one."""
    client = store.client
    parent = client.get_run(run_id)
    trials = store.runs(parent.info.experiment_id, f"tags.`{PARENT}` = '{run_id}' and tags.`{ROLE}` = '{ROLE_TRIAL}'")
    results: dict[str, list[float]] = {}
    for trial in trials:
        variant = trial.data.tags.get("variant", "?")
        results.setdefault(variant, [])
        if is_result(trial.info.status, trial.data.tags.get(HEALTH)) and "test_ppl" in trial.data.metrics:
            results[variant].append(trial.data.metrics["test_ppl"])
    figures = {"trials_finished": float(sum(trial.info.status == FINISHED for trial in trials))}
    for variant, values in results.items():
        figures[f"seeds_counted_{variant}"] = float(len(values))
        if values:
            figures[f"mean_test_ppl_{variant}"] = sum(values) / len(values)
    now = int(time.time() * 1000)
    changed = [
        Metric(k, v, now, next_step(client, run_id, k)) for k, v in figures.items() if parent.data.metrics.get(k) != v
    ]
    client.log_batch(run_id, metrics=changed, tags=[RunTag(HEALTH_SUMMARY, health_summary(trials))])
    end_run(client, run_id, status)


def next_step(client: MlflowClient, run_id: str, key: str) -> int:
    """The step after the last one ``key`` was logged at in the run; 0 for a new metric."""
    return max((metric.step + 1 for metric in client.get_metric_history(run_id, key)), default=0)


def health_summary(trials: list[Run]) -> str:
    """``10 ok; hybrid/seed=2 collapsed,stalled; plain/seed=1 stalled``: the finished trials' verdicts."""
    finished = [trial for trial in trials if trial.info.status == FINISHED]
    flagged = sorted(
        f"{trial.data.tags.get(CELL, trial.info.run_id)} {trial.data.tags[HEALTH]}"
        for trial in finished
        if trial.data.tags.get(HEALTH, "ok") != "ok"
    )
    return "; ".join([f"{len(finished) - len(flagged)} ok", *flagged])


def cell_run(store: TrackingStore, experiment_id: str, cell: Cell) -> Run | None:
    """The cell's current run (not one it superseded), or None."""
    return oldest(store.runs(experiment_id, f"tags.`{CELL}` = '{cell.key}' and tags.`{ROLE}` != '{ROLE_SUPERSEDED}'"))


def cell_runs(store: TrackingStore, experiment_id: str) -> dict[str, Run]:
    """Cell key -> the cell's current run, for every cell of the study that has one: the store read once (a round's
    plan and clean-up read every cell's run)."""
    found: dict[str, list[Run]] = {}
    for run in store.runs(experiment_id, f"tags.`{ROLE}` = '{ROLE_TRIAL}'"):
        found.setdefault(run.data.tags[CELL], []).append(run)
    return {key: run for key, runs in found.items() if (run := oldest(runs)) is not None}


def end_unfinished(store: TrackingStore, experiment_id: str, cells: list[Cell], reason: str) -> None:
    """Mark the runs of ``cells`` that are still RUNNING or SCHEDULED as KILLED (idempotent): nothing stays open."""
    runs = cell_runs(store, experiment_id)
    for cell in cells:
        run = runs.get(cell.key)
        if run is not None and run.info.status in (RUNNING, SCHEDULED):
            end_run(store.client, run.info.run_id, KILLED, reason)


def open_trial_run(
    store: TrackingStore,
    cell: Cell,
    *,
    experiment_id: str,
    parent_id: str,
    study: str,
    corpus: Corpus,
    device: str,
    run_name: str | None = None,
) -> str:
    """Create the cell's run with its tags, params and inputs (its start: now, when the cell starts), or reopen it
    (RUNNING, old error cleared)."""
    with store.shared_run_lock():  # two attempts at one cell (a Ray retry, two array tasks) make one run
        existing = cell_run(store, experiment_id, cell)
        if existing is None:
            tags = trial_tags(cell, study=study, parent_id=parent_id, corpus=corpus, device=device)
            run_id = store.client.create_run(experiment_id, run_name=run_name or cell.name, tags=tags).info.run_id
            existing = cell_run(store, experiment_id, cell)  # a tracking server's racing client may have been first
            assert existing is not None
            if existing.info.run_id == run_id:
                log_trial_inputs(store, run_id, cell.config, corpus)
                return run_id
            store.client.delete_run(run_id)
    store.client.update_run(existing.info.run_id, status=RUNNING)
    if ERROR in existing.data.tags:  # a retried failure: the old reason no longer holds
        store.client.delete_tag(existing.info.run_id, ERROR)
    return existing.info.run_id


def trial_tags(cell: Cell, *, study: str, parent_id: str, corpus: Corpus, device: str) -> dict[str, str]:
    config = cell.config
    return system_tags() | {
        ROLE: ROLE_TRIAL,
        CELL: cell.key,
        STUDY: study,
        PARENT: parent_id,
        "variant": cell.variant,
        "seed": str(cell.seed),
        "backbone": config.model.backbone,
        "git_commit": git_commit(),
        "device": device_description(device),
        RUN_COLOUR: colour(cell.variant),
        FINGERPRINT: fingerprint(identity(config, corpus)),
        **{f"data.{k}": str(v) for k, v in corpus.summary().items() if k not in ("name", "digest")},
    }


def log_trial_inputs(store: TrackingStore, run_id: str, config: TrialConfig, corpus: Corpus) -> None:
    """The run's params (its config, data hashes and data constants), its dataset input and its config.yaml."""
    constants = {key: f"{value:.6g}" for key, value in reference_summary(corpus, grad_clip=None).items()}
    params = [Param(key, value) for key, value in (run_params(config, corpus) | constants).items()]
    for start in range(0, len(params), 100):
        store.client.log_batch(run_id, params=params[start : start + 100])
    store.log_dataset(run_id, corpus)
    store.client.log_text(run_id, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")


class TrialRun:
    """An open trial run and its metric sink; each way it can end flushes the sink first."""

    def __init__(self, sink: MlflowSink, started: float | None = None) -> None:
        """``started``: ``time.monotonic()`` when the cell started, for the run's ``wall_time_s``."""
        self.sink, self.client, self.run_id, self.started = sink, sink.client, sink.run_id, started

    def finish(
        self, summary: dict[str, float], tables: dict[str, pd.DataFrame], tags: dict[str, str] | None = None
    ) -> None:
        """Log the summary metrics and ``tags`` (once, whatever interrupted an earlier save) and the tables
        (as CSV artifacts), then end FINISHED. A sink whose run another attempt took over raises first
        (``check_owner``): the run is the newer attempt's to end."""
        self.sink.flush()
        self.sink.check_owner()
        if SUMMARY not in self.client.get_run(self.run_id).data.tags:
            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, 0) for k, v in summary.items()]
            run_tags = [RunTag(k, v) for k, v in (tags or {}).items()] + [RunTag(SUMMARY, "true")]
            self.client.log_batch(self.run_id, metrics=metrics, tags=run_tags)  # one transaction
        with tempfile.TemporaryDirectory() as folder:
            for name, table in tables.items():
                path = Path(folder) / f"{name}.csv"
                table.to_csv(path, index=False)
                self.client.log_artifact(self.run_id, str(path))  # overwrites the file of an interrupted save
        if self.started is not None:  # this attempt's time from its cell's start to here, just before the run ends
            self.client.log_metric(self.run_id, "wall_time_s", time.monotonic() - self.started, step=0)
        end_run(self.client, self.run_id, FINISHED)

    def fail(self, error: BaseException) -> Ending:
        """End the run as :func:`ending` says for ``error``; the caller decides whether to re-raise."""
        how = ending(error)
        with contextlib.suppress(Exception):  # the sink's own logging error (a full disk): the run ends all the same
            self.sink.flush()
        try:
            self.sink.check_owner()
        except AttemptSuperseded:
            return how  # the run is a newer attempt's now: not this one's to end
        except Exception:  # the store unreachable: end_run below tries all the same
            pass
        end_run(self.client, self.run_id, how.status, how.reason)
        return how

    def prune(self, reason: str) -> None:
        """The tuner's pruner stopped the trial: KILLED, with the reason in ``harness.pruned``."""
        try:
            self.sink.flush()
        finally:
            self.client.set_tag(self.run_id, PRUNED, reason)
            end_run(self.client, self.run_id, KILLED)
