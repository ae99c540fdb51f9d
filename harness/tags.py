"""The names the harness writes on MLflow runs (and the report reads back), defined once; MLflow's own tags are
MLflow's constants."""

from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

ROLE = "harness.role"  # one of the ROLE_* values below
ROLE_STUDY, ROLE_TRIAL = "study", "trial"  # ``harness run-study``: the study's parent run, one run per cell
ROLE_TUNE, ROLE_TUNE_TRIAL = "tune", "tune-trial"  # ``harness tune``: the tuning parent run, one run per trial
ROLE_SUPERSEDED = "superseded"  # a cell's run replaced by a new one after its config or data changed (--supersede)
CELL = "harness.cell"  # the matrix cell's key: how an interrupted trial finds its run again
FINGERPRINT = "harness.fingerprint"  # hash of what the cell computes (harness/fingerprint.py)
SUPERSEDED = "harness.superseded"  # on a superseded run: what changed (key old -> new)
STUDY = "harness.study"
ERROR = "harness.error"  # why a run ended FAILED or KILLED
SUMMARY = "harness.summary_logged"  # set with the summary metrics, in one batch: a rerun does not log them again
PRUNED = "harness.pruned"  # why the tuner's pruner stopped a trial
WORKER = "harness.worker"
INIT_SOURCE_RUN = "harness.init.source_run"  # an upcycled cell's source: the run whose final weights it started from
ATTEMPT = "harness.attempt"  # the attempt now allowed to write a trial run; an older one stops

PARENT = MLFLOW_PARENT_RUN_ID
RUN_NAME = MLFLOW_RUN_NAME

OPTUNA_STUDY = "optuna.study_name"
OPTUNA_STORAGE = "optuna.storage"
OPTUNA_STATE = "optuna.state"  # the Optuna state of the trial behind a tune-trial run
OPTUNA_TRIAL = "optuna.trial_number"
OPTUNA_RETRIED_FROM = "optuna.retried_from"
OPTUNA_PARAM = "optuna.param."  # prefix of one tag per tuned parameter

DESIGN = "harness.design"  # on a study's run: its design (questions, seeds, alpha, spending, margin; JSON)
DECISION = "harness.decision"  # e.g. switch:undecided@5/non-inferior@2,hybrid:worse@3/non-inferior@2,lora:open/open
COMMAND = "harness.command"  # on a study's run: the command that drives it (the last invocation)
TRIALS_SAVED = "harness.sequential.trials_saved"  # a sequential study: against running max seeds for every variant
HEALTH = "harness.health"  # "ok" or comma-joined collapsed,saturated,stalled,unstable (harness/health.py)
RUN_COLOUR = "mlflow.runColor"  # the MLflow UI's colour for a run (read from this tag, MLflow 3.17)
HEALTH_SUMMARY = "harness.health_summary"  # on a study run: "10 ok; <cell> <verdict>; ..." (runs.health_summary)
HEALTH_EVIDENCE = "harness.health.evidence"  # one sentence with the numbers behind the verdict
# MLflow's standard system tags: the UI's Source, Version and User columns, and the description fields
SOURCE_NAME = MLFLOW_SOURCE_NAME
SOURCE_TYPE = MLFLOW_SOURCE_TYPE
SOURCE_COMMIT = MLFLOW_GIT_COMMIT
USER = MLFLOW_USER
NOTE = MLFLOW_RUN_NOTE  # a run's or an experiment's description
