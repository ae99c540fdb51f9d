"""One tuning trial: suggest a config, train it into a nested MLflow run, return the objective(s).

The run is a ``tune-trial`` under the tuning parent run, with tags ``optuna.trial_number``,
``optuna.state`` and ``optuna.param.<key>``; its id is the trial's user attr ``mlflow_run_id``.
Pruned trials end KILLED (``optuna.state`` PRUNED); how any other error ends the run is
:func:`harness.runs.ending`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from harness.config import StudySpec, TrialConfig, TuneConfig, TuneParam, resolve_trial
from harness.data import Corpus
from harness.fingerprint import param_value
from harness.health import assess
from harness.matrix import Cell
from harness.metrics import perplexity
from harness.runs import KILLED, TrialRun, open_trial_run
from harness.tags import (
    OPTUNA_PARAM,
    OPTUNA_RETRIED_FROM,
    OPTUNA_STATE,
    OPTUNA_STUDY,
    OPTUNA_TRIAL,
    ROLE,
    ROLE_TUNE_TRIAL,
    WORKER,
)
from harness.tracking import MlflowSink, TrackingStore
from harness.trainer import resolve_device, total_steps, train
from harness.tune.attrs import INTERRUPTED_ATTR, RETRY_HISTORY, RUN_ID_ATTR, SURPLUS_ATTR, WORKER_ATTR
from harness.tune.budget import Budget, SurplusTrial

OBJECTIVE_METRICS = {"val_ppl": "final_val_ppl", "time_per_mtok": "time_per_mtok_s"}
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(kw_only=True)
class Context:
    spec: StudySpec
    store: TrackingStore
    experiment_id: str
    parent_id: str
    corpus: Corpus
    budget: Budget
    progress: bool


def suggest(trial: optuna.Trial, key: str, param: TuneParam) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    assert param.low is not None and param.high is not None
    if param.type == "int":
        step = int(param.step or 1)
        return trial.suggest_int(key, int(param.low), int(param.high), step=step, log=param.log)
    return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def open_trial(ctx: Context, trial: optuna.Trial, cell: Cell) -> str:
    """The trial's nested MLflow run, tagged with its Optuna trial; its id goes on the trial."""
    device = resolve_device(cell.config.train.device).type
    run_name = f"trial-{trial.number}"
    run_id = open_trial_run(
        ctx.store,
        cell,
        experiment_id=ctx.experiment_id,
        parent_id=ctx.parent_id,
        study=ctx.spec.name,
        corpus=ctx.corpus,
        device=device,
        run_name=run_name,
    )
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    history = frozen.system_attrs.get(RETRY_HISTORY, [])
    tags = {
        ROLE: ROLE_TUNE_TRIAL,
        OPTUNA_STUDY: trial.study.study_name,
        OPTUNA_TRIAL: str(trial.number),
        WORKER: WORKER_ID,
        OPTUNA_STATE: "RUNNING",
        **{f"{OPTUNA_PARAM}{k}": param_value(v) for k, v in cell.assignment.items()},
        **({OPTUNA_RETRIED_FROM: str(history[0])} if history else {}),
    }
    for key, value in tags.items():
        ctx.store.client.set_tag(run_id, key, value)
    trial.set_user_attr(RUN_ID_ATTR, run_id)  # overwrites the attr a retried trial inherits
    trial.set_user_attr(WORKER_ATTR, WORKER_ID)
    return run_id


def pruning_hook(tune: TuneConfig, config: TrialConfig, corpus: Corpus, trial: optuna.Trial) -> Callable[..., None]:
    """The trainer's ``on_eval``: report validation perplexity to Optuna and stop a trial it prunes."""
    pruning = len(tune.objectives) == 1 and tune.pruner != "none"
    last_step = total_steps(config, len(corpus.train) // config.train.batch_size)

    def on_eval(step: int, tokens: int, val_loss: float) -> None:
        if len(tune.objectives) > 1:
            return  # Optuna cannot report or prune multi-objective trials
        trial.report(perplexity(val_loss), step)
        if pruning and step < last_step and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (val ppl {perplexity(val_loss):.1f})")

    return on_eval


def objective(ctx: Context, trial: optuna.Trial) -> float | tuple[float, float]:
    tune = ctx.spec.tune
    assert tune is not None
    if not ctx.budget.admits(trial.study, trial):
        trial.set_user_attr(SURPLUS_ATTR, True)
        trial.study.stop()
        raise SurplusTrial(f"trial {trial.number}: the study already has its {ctx.budget.n_trials} trials")
    assignment = {key: suggest(trial, key, param) for key, param in tune.space.items()}
    config = resolve_trial(ctx.spec, tune.variant, tune.seeds[0], assignment)
    cell = Cell(f"tune/{ctx.parent_id}/trial={trial.number}", tune.variant, tune.seeds[0], assignment, config)
    started = time.monotonic()
    run = TrialRun(MlflowSink(ctx.store.client, open_trial(ctx, trial, cell)), started)
    label = f"trial {trial.number} " + " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in assignment.items())
    on_eval = pruning_hook(tune, config, ctx.corpus, trial)
    try:
        result = train(config, ctx.corpus, run.sink, on_eval=on_eval, progress=ctx.progress, label=label)
    except optuna.TrialPruned as pruned:
        run.client.set_tag(run.run_id, OPTUNA_STATE, "PRUNED")
        run.prune(str(pruned))
        print(f"  trial {trial.number} {pruned}", file=sys.stderr, flush=True)
        raise
    except BaseException as error:
        run.client.set_tag(run.run_id, OPTUNA_STATE, "FAIL")
        if run.fail(error).status == KILLED:  # Ctrl-C/SIGTERM: not the trial's fault, so not counted...
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            trial.study.enqueue_trial(trial.params)  # ...and its parameters are tried again, first thing
        raise
    run.sink.flush()  # the verdict reads the run's whole metric history
    health_metrics, verdict = assess(
        run.client,
        run.run_id,
        result.summary,
        result.utilisation,
        ctx.corpus,
        config.optim.grad_clip,
        config.moe.routed_top_k,
    )
    tables = {"utilisation": result.utilisation, "utilisation_history": result.utilisation_history}
    run.finish(result.summary | health_metrics, tables, verdict.tags())
    run.client.set_tag(run.run_id, OPTUNA_STATE, "COMPLETE")
    values = tuple(result.summary[OBJECTIVE_METRICS[name]] for name in tune.objectives)
    scores = ", ".join(f"{n}={v:.4g}" for n, v in zip(tune.objectives, values, strict=True))
    print(f"  trial {trial.number}: {scores}", file=sys.stderr, flush=True)
    return values[0] if len(values) == 1 else values
