"""``harness tune SPEC --ray ADDRESS --workers N``: N Optuna workers as Ray tasks (Ray places them; Optuna, not
Ray Tune, searches).

Optuna's RDB storage stays the engine for sampling and pruning; Ray only places the workers (one
GPU each by default, ``resources`` of the spec). A lost worker's running trial is failed by
Optuna's heartbeat and retried by the other workers, as without Ray; Ray does not retry the worker.
"""

from __future__ import annotations

import sys

import ray

from harness import interrupt
from harness.config import StudySpec
from harness.engine.ray_cluster import cancel_all, connect, disconnect, trial_resources
from harness.runs import KILLED, RUNNING, end_run, ending
from harness.tags import ROLE, ROLE_TUNE
from harness.tracking import TrackingStore
from harness.tune.search import run_tune


@ray.remote
def tune_worker(spec: StudySpec, tracking_uri: str, storage_url: str, n_trials: int | None) -> None:
    run_tune(spec, tracking_uri, storage_url, n_trials, progress=False)


def tune_on_ray(
    spec: StudySpec, tracking_uri: str, storage_url: str, address: str, workers: int, n_trials: int | None
) -> None:
    """Run ``workers`` tuning workers on the cluster until the study's budget is used up."""
    started = connect(address)
    try:
        options = {**trial_resources(spec.resources, address, "spec"), "max_retries": 0}
        worker = tune_worker.options(**options)
        refs = [worker.remote(spec, tracking_uri, storage_url, n_trials) for _ in range(workers)]
        try:
            wait_workers(refs)
        except BaseException as error:  # Ctrl-C, SIGTERM: stop the workers (each leaves its trial as an interruption)
            cancel_all(refs)
            end_parent_run(spec, tracking_uri, ending(error).reason)
            raise
    finally:
        if started:
            disconnect()


def end_parent_run(spec: StudySpec, tracking_uri: str, reason: str) -> None:
    """The tuning parent run KILLED, as a worker's own interruption leaves it: a cancelled task's result is ready
    before the worker has run its clean-up, and the cluster goes down with this driver, so the worker may not."""
    store = TrackingStore(tracking_uri)
    experiment = store.client.get_experiment_by_name(spec.name)
    if experiment is None:
        return
    query = f"tags.`{ROLE}` = '{ROLE_TUNE}' and attributes.status = '{RUNNING}'"
    for run in store.runs(experiment.experiment_id, query):
        end_run(store.client, run.info.run_id, KILLED, reason)


def wait_workers(refs: list[ray.ObjectRef]) -> None:
    """Until every worker ended; a signal's flag is checked each second (``ray.get`` would wait out the budget)."""
    waiting = refs
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
        interrupt.check()
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as error:  # its trial is retried through Optuna's heartbeat
                print(f"tuning worker lost: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
