"""The engine behind ``harness tune`` (CLI in :mod:`harness.tune`): Optuna search, every trial in MLflow.

Storage: an Optuna RDB storage with heartbeats. By default an embedded SQLite file beside the
MLflow store (``mlruns/optuna/<study>.db``), created before the first trial; ``--storage`` takes
any SQLAlchemy URL (PostgreSQL for several workers or machines). Every worker runs the same
command; together they run ``n_trials`` trials, not each:

* a trial only trains if fewer than ``n_trials`` counted trials (complete, pruned, running,
  waiting, or failed and not retried) have lower numbers; a surplus trial that a race let
  through fails at once (user attr ``harness.surplus``) and is not counted;
* a worker that dies stops beating; after the grace period the next worker to look marks its
  trial failed and :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` re-queues it with
  the same parameters. A worker that has run out of new trials waits for other workers' running
  trials, so a trial orphaned near the end is still retried.

MLflow: one parent run per tuning study (``harness.role`` = ``tune``, tags ``optuna.storage``
with the password redacted and ``optuna.study_name``) and one nested run per Optuna trial
(``harness.role`` = ``tune-trial``; tags ``optuna.trial_number``, ``optuna.state`` and
``optuna.param.<key>``). The run id is the trial's user attr ``mlflow_run_id``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import sqlalchemy
import torch
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from harness.config import SpecError, StudySpec, TuneConfig, TuneParam, resolve_trial, set_dotted
from harness.data import Corpus, DataError, load_corpus
from harness.matrix import Cell
from harness.metrics import perplexity
from harness.tracking import PARENT, ROLE, STUDY, MlflowSink, TrackingStore, device_description
from harness.trainer import NonFiniteLoss, resolve_device, total_steps, train

RUN_ID_ATTR = "mlflow_run_id"
SURPLUS_ATTR = "harness.surplus"
INTERRUPTED_ATTR = "harness.interrupted"
PARENT_ATTR = "mlflow_parent_run_id"
OBJECTIVE_METRICS = {"val_ppl": "final_val_ppl", "time_per_mtok": "time_per_mtok_s"}
WORKER = f"{socket.gethostname()}:{os.getpid()}"
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)


class SurplusTrial(Exception):
    """The study already has its trials; this one was created by a race between workers."""


# --- storage -------------------------------------------------------------------------------


def default_storage(spec: StudySpec, tracking_uri: str) -> str:
    """An SQLite file in the study's output folder: beside an embedded MLflow store, else ``mlruns/``."""
    folder = Path("mlruns")
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    return f"sqlite:///{(folder / 'optuna' / f'{spec.name}.db').resolve()}"


def redact(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


class StaleTrial:
    """Heartbeat-stale trial (its worker died): re-queue it and mark its MLflow run failed."""

    def __init__(self, max_retry: int) -> None:
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.store: TrackingStore | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if self.store is not None and run_id:
            self.store.client.set_tag(run_id, "optuna.state", "FAIL")
            self.store.fail_trial(run_id, "worker stopped beating (killed or lost); the trial was re-queued")
        print(f"  trial {trial.number}: its worker stopped beating; marked failed and re-queued", file=sys.stderr)


def open_storage(url: str, tune: TuneConfig) -> RDBStorage:
    """The RDB storage with heartbeats and retries; tables are created here, before any trial."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"pool_pre_ping": True}
    elif "://" not in url:
        raise SpecError(f"--storage {url!r} is not a database URL (sqlite:///path.db, postgresql://user@host/db)")
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=tune.heartbeat_interval_s,
                    grace_period=tune.grace_period_s,
                    heartbeat_stale_trial_callback=StaleTrial(tune.max_retry),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)  # workers starting together raced to create the tables: use theirs
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SpecError(f"Optuna storage {redact(url)} is unusable: {reason}") from None
    raise AssertionError("unreachable")


def make_sampler(tune: TuneConfig, offset: int) -> optuna.samplers.BaseSampler:
    seed = tune.sampler_seed + offset
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(5, tune.n_trials or 5))


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner == "none" or len(tune.objectives) > 1:
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.pruner_warmup_steps))
    return optuna.pruners.MedianPruner(
        n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_steps
    )


# --- the trial budget shared by all workers ------------------------------------------------------


def _retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    retried: set[int] = set()
    for trial in trials:
        retried.update(trial.system_attrs.get("retry_history", []))  # see RetryHeartbeatStaleTrialCallback
    return retried


def counted(trials: list[FrozenTrial], below: int | None = None) -> int:
    """Trials that use up the budget: all but surplus or interrupted ones and failures that were re-queued."""
    retried = _retried_numbers(trials)
    return sum(
        1
        for t in trials
        if (below is None or t.number < below)
        and t.state in _COUNTED
        and not (t.state == TrialState.FAIL and (t.number in retried or _uncounted(t)))
    )


def _uncounted(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(SURPLUS_ATTR) or trial.user_attrs.get(INTERRUPTED_ATTR))


class Budget:
    """Stops the study once ``n_trials`` counted trials exist (across every worker)."""

    def __init__(self, n_trials: int | None) -> None:
        self.n_trials = n_trials

    def admits(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        if self.n_trials is None:
            return True
        return counted(study.get_trials(deepcopy=False), below=trial.number) < self.n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.n_trials is not None and counted(study.get_trials(deepcopy=False)) >= self.n_trials:
            study.stop()


# --- MLflow ------------------------------------------------------------------------------------


def tune_parent_run(store: TrackingStore, experiment_id: str, study: optuna.Study, tags: dict[str, str]) -> str:
    """The tuning study's parent run, shared by every worker: the oldest one wins a creation race."""
    known = study.user_attrs.get(PARENT_ATTR)
    try:
        if known and store.client.get_run(known).info.lifecycle_stage == "active":
            store.client.update_run(known, "RUNNING")  # resumed, or extended with a larger --n-trials
            return known
    except mlflow.exceptions.MlflowException:
        pass  # another tracking store than last time: make a parent run there
    study_name, storage = study.study_name, tags["optuna.storage"].replace("'", "")
    query = f"tags.`{ROLE}` = 'tune' and tags.`optuna.study_name` = '{study_name}'"
    query += f" and tags.`optuna.storage` = '{storage}'"
    existing = store.runs(experiment_id, query)
    if not existing:
        own = store.client.create_run(
            experiment_id, run_name=f"tune-{study_name}", tags={ROLE: "tune", "optuna.study_name": study_name, **tags}
        )
        existing = store.runs(experiment_id, query)
        keep = min(existing, key=lambda r: (r.info.start_time, r.info.run_id))
        if keep.info.run_id != own.info.run_id:
            store.client.delete_run(own.info.run_id)
        return keep.info.run_id
    keep = min(existing, key=lambda r: (r.info.start_time, r.info.run_id))
    if keep.info.status != "RUNNING":
        store.client.update_run(keep.info.run_id, "RUNNING")
    return keep.info.run_id


def _tag_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


# --- the objective -------------------------------------------------------------------------------


def suggest(trial: optuna.Trial, key: str, param: TuneParam) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    assert param.low is not None and param.high is not None
    if param.type == "int":
        step = int(param.step or 1)
        return trial.suggest_int(key, int(param.low), int(param.high), step=step, log=param.log)
    return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)


@dataclass
class Context:
    spec: StudySpec
    store: TrackingStore
    experiment_id: str
    parent_id: str
    corpus: Corpus
    budget: Budget
    progress: bool


def objective(ctx: Context, trial: optuna.Trial) -> float | tuple[float, float]:
    tune = ctx.spec.tune
    assert tune is not None
    if not ctx.budget.admits(trial.study, trial):
        trial.set_user_attr(SURPLUS_ATTR, True)
        trial.study.stop()
        raise SurplusTrial(f"trial {trial.number}: the study already has its {ctx.budget.n_trials} trials")
    assignment = {key: suggest(trial, key, param) for key, param in tune.space.items()}
    seed = tune.seeds[0]
    config = resolve_trial(ctx.spec, tune.variant, seed, assignment)
    cell = Cell(f"tune/{ctx.parent_id}/trial={trial.number}", tune.variant, seed, assignment, config)
    device = resolve_device(config.train.device)
    run_id = ctx.store.open_trial_run(ctx.experiment_id, ctx.parent_id, cell, ctx.spec.name, ctx.corpus, device.type)
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    history = frozen.system_attrs.get("retry_history", [])  # set by RetryHeartbeatStaleTrialCallback
    retried_from = history[0] if history else None
    tags = {
        ROLE: "tune-trial",
        PARENT: ctx.parent_id,
        "optuna.study_name": trial.study.study_name,
        "optuna.trial_number": str(trial.number),
        "mlflow.runName": f"trial-{trial.number}",
        "harness.worker": WORKER,
        "optuna.state": "RUNNING",
        **{f"optuna.param.{k}": _tag_value(v) for k, v in assignment.items()},
        **({"optuna.retried_from": str(retried_from)} if retried_from is not None else {}),
    }
    for key, value in tags.items():
        ctx.store.client.set_tag(run_id, key, value)
    trial.set_user_attr(RUN_ID_ATTR, run_id)  # overwrites the attr a retried trial inherits
    trial.set_user_attr("worker", WORKER)

    pruning = len(tune.objectives) == 1 and tune.pruner != "none"
    last_step = total_steps(config, len(ctx.corpus.train) // config.train.batch_size)

    def on_eval(step: int, tokens: int, val_loss: float) -> None:
        if len(tune.objectives) > 1:
            return  # Optuna cannot report or prune multi-objective trials
        trial.report(perplexity(val_loss), step)
        if pruning and step < last_step and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (val ppl {perplexity(val_loss):.1f})")

    sink = MlflowSink(ctx.store.client, run_id)
    label = f"trial {trial.number} " + " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in assignment.items())
    try:
        result = train(config, ctx.corpus, sink, on_eval=on_eval, progress=ctx.progress, label=label)
    except optuna.TrialPruned as pruned:
        sink.flush()
        ctx.store.client.set_tag(run_id, "optuna.state", "PRUNED")
        ctx.store.client.set_tag(run_id, "harness.pruned", str(pruned))
        ctx.store.client.set_terminated(run_id, "KILLED")
        print(f"  trial {trial.number} {pruned}", file=sys.stderr, flush=True)
        raise
    except (NonFiniteLoss, DataError, torch.OutOfMemoryError) as error:
        sink.flush()
        ctx.store.client.set_tag(run_id, "optuna.state", "FAIL")
        ctx.store.fail_trial(run_id, f"{type(error).__name__}: {error}")
        raise
    except BaseException:  # Ctrl-C or a bug: this trial does not use up the budget; a rerun resumes
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        sink.flush()
        ctx.store.client.set_tag(run_id, "optuna.state", "FAIL")
        reason = traceback.format_exc(limit=1).strip().splitlines()[-1]
        ctx.store.fail_trial(run_id, "interrupted: " + reason, "KILLED")
        raise
    sink.flush()
    tables = {"utilisation": result.utilisation, "utilisation_history": result.utilisation_history}
    ctx.store.finish_trial(run_id, result.summary, tables)
    ctx.store.client.set_tag(run_id, "optuna.state", "COMPLETE")
    values = tuple(result.summary[OBJECTIVE_METRICS[name]] for name in tune.objectives)
    print(
        f"  trial {trial.number}: " + ", ".join(f"{n}={v:.4g}" for n, v in zip(tune.objectives, values, strict=True)),
        file=sys.stderr,
        flush=True,
    )
    return values[0] if len(values) == 1 else values


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --- results ----------------------------------------------------------------------------------


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial, or the Pareto front sorted by validation perplexity."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[0])


def export_spec(spec: StudySpec, trial: FrozenTrial, path: Path) -> Path:
    """A study spec that runs the trial's parameters with every seed of ``tune.seeds``."""
    tune = spec.tune
    assert tune is not None
    overrides = {k: dict(v) for k, v in spec.overrides.items()}
    variant_tree: dict[str, Any] = overrides.get(tune.variant, {})
    for key, value in trial.params.items():
        variant_tree = set_dotted(variant_tree, key, value)
    overrides[tune.variant] = variant_tree
    values = ", ".join(f"{n}={v:.4g}" for n, v in zip(tune.objectives, trial.values, strict=True))
    exported = {
        "name": f"{spec.name}-best",
        "description": f"Best config of tuning study '{spec.name}' (trial {trial.number}: {values}), across seeds.",
        "base": spec.base,
        "matrix": {"variants": [tune.variant], "seeds": list(tune.seeds)},
        "overrides": overrides,
    }
    # The exported spec must load exactly as run-study will load it.
    StudySpec.model_validate(exported)
    resolve_trial(StudySpec.model_validate(exported), tune.variant, tune.seeds[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by 'harness tune' from study '{spec.name}'. Confirm with: harness run-study {path}\n"
    path.write_text(header + yaml.safe_dump(exported, sort_keys=False))
    return path


def _wait_for_others(study: optuna.Study, storage: RDBStorage, poll_s: float) -> bool:
    """Wait while other workers' trials run; True when a retried trial is waiting to be run."""
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.WAITING in states:
            return True
        if TrialState.RUNNING not in states:
            return False
        time.sleep(poll_s)


def run_tune(
    spec: StudySpec,
    tracking_uri: str,
    storage_url: str,
    n_trials: int | None = None,
    progress: bool = False,
    out: Path | None = None,
) -> tuple[optuna.Study, list[FrozenTrial], Path | None]:
    tune = spec.tune
    assert tune is not None
    n_trials = n_trials if n_trials is not None else tune.n_trials
    storage = open_storage(storage_url, tune)
    directions = ["minimize"] * len(tune.objectives)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            directions=directions,
            load_if_exists=True,
        )
    except ValueError as error:
        raise SpecError(f"Optuna study '{spec.name}' in {redact(storage_url)}: {error}") from None
    if len(study.directions) != len(directions):
        raise SpecError(
            f"Optuna study '{spec.name}' in {redact(storage_url)} has {len(study.directions)} objective(s), "
            f"the spec asks for {len(directions)}: use another --storage or study name"
        )
    study.sampler = make_sampler(tune, len(study.trials) + (os.getpid() if not storage_url.startswith("sqlite") else 0))
    study.pruner = make_pruner(tune)
    study.set_user_attr("objectives", list(tune.objectives))

    store = TrackingStore(tracking_uri)
    storage.heartbeat_stale_trial_callback.store = store  # type: ignore[union-attr]
    experiment_id = store.experiment_id(spec.name)
    device = resolve_trial(spec, tune.variant, tune.seeds[0]).train.device
    parent_id = tune_parent_run(
        store,
        experiment_id,
        study,
        {
            STUDY: spec.name,
            "optuna.storage": redact(storage_url),
            "optuna.objectives": ",".join(tune.objectives),
            "optuna.sampler": tune.sampler,
            "optuna.pruner": make_pruner(tune).__class__.__name__,
            "variant": tune.variant,
            "device": device_description(device),
        },
    )
    study.set_user_attr(PARENT_ATTR, parent_id)
    corpus = load_corpus(resolve_trial(spec, tune.variant, tune.seeds[0]).data)
    budget = Budget(n_trials)
    ctx = Context(spec, store, experiment_id, parent_id, corpus, budget, progress)
    if n_trials is not None and counted(study.get_trials(deepcopy=False)) >= n_trials:
        print(f"study '{spec.name}' already has {n_trials} trials", file=sys.stderr)
    started = time.monotonic()
    poll_s = min(5.0, max(0.5, tune.heartbeat_interval_s / 2))
    while True:
        remaining = None if tune.timeout_s is None else tune.timeout_s - (time.monotonic() - started)
        if remaining is not None and remaining <= 0:
            break
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)  # retries are counted already: run them
        if n_trials is None or waiting or counted(trials) < n_trials:
            study.optimize(
                lambda trial: objective(ctx, trial),
                n_trials=n_trials,
                timeout=remaining,
                callbacks=[budget],
                catch=(SurplusTrial, NonFiniteLoss, DataError, torch.OutOfMemoryError),
                gc_after_trial=True,
            )
        if (remaining is not None and time.monotonic() - started >= tune.timeout_s) or n_trials is None:
            break
        if not _wait_for_others(study, storage, poll_s):
            break

    best = best_trials(study)
    exported = None
    if best:
        exported = export_spec(spec, best[0], out or Path(storage_url_folder(storage_url)) / f"{spec.name}-best.yaml")
        tags = {"best_trial": str(best[0].number), "best_params": json.dumps(best[0].params)}
        for name, value in zip(tune.objectives, best[0].values, strict=True):
            store.client.log_metric(parent_id, f"best_{name}", value)
        for key, value in tags.items():
            store.client.set_tag(parent_id, key, value)
        store.client.log_artifact(parent_id, str(exported))
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        store.client.set_terminated(parent_id, "FINISHED")
    return study, best, exported


def storage_url_folder(url: str) -> str:
    """Where the exported spec goes: beside an SQLite storage, else ``mlruns/optuna``."""
    if url.startswith("sqlite:///"):
        return str(Path(url.removeprefix("sqlite:///")).parent)
    return str(Path("mlruns") / "optuna")


def summary_lines(spec: StudySpec, study: optuna.Study, best: list[FrozenTrial], exported: Path | None) -> list[str]:
    tune = spec.tune
    assert tune is not None
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if s in states)
    lines = [f"tuning study '{study.study_name}': {len(states)} trials ({counts})"]
    if not best:
        return [*lines, "no trial completed: nothing to export"]
    lines.append("Pareto front (val_ppl, time_per_mtok):" if len(best) > 1 else "best config:")
    for trial in best:
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(tune.objectives, trial.values, strict=True))
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        lines.append(f"  trial {trial.number}: {values}  {params}  (mlflow run {trial.user_attrs.get(RUN_ID_ATTR)})")
    if exported is not None:
        lines.append(f"wrote {exported}: confirm across seeds {tune.seeds} with 'harness run-study {exported}'")
    return lines
