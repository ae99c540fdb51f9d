"""Names the tuner stores on Optuna trials and studies (user attributes)."""

RUN_ID_ATTR = "mlflow_run_id"  # the trial's MLflow run
PARENT_ATTR = "mlflow_parent_run_id"  # the study's tuning parent run
SURPLUS_ATTR = "harness.surplus"  # a trial that a race between workers let past the budget
INTERRUPTED_ATTR = "harness.interrupted"  # a trial stopped by Ctrl-C or a bug: it does not use up the budget
WORKER_ATTR = "worker"
RETRY_HISTORY = "retry_history"  # system attr of optuna's RetryHeartbeatStaleTrialCallback: the retried numbers
