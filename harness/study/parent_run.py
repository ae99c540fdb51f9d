"""A study's parent run: created once (shared by every worker and invocation), described with the resolved matrix,
the spec, its design and the command, RUNNING again on each rerun until its cells are done."""

from __future__ import annotations

import json
import shlex

import yaml
from mlflow.entities import Param

from harness import runs
from harness.config import StudySpec
from harness.matrix import Cell, expand
from harness.runs import shared_run
from harness.study.rounds import StudyDesign
from harness.tags import COMMAND, DESIGN, NOTE, ROLE, ROLE_STUDY, STUDY
from harness.tracking import TrackingStore, device_description


def study_parent_run(spec: StudySpec, store: TrackingStore, experiment_id: str, *, relog_spec: bool = False) -> str:
    """The study's parent run, RUNNING (again, on a rerun), with its description, matrix, spec, design and command
    (``relog_spec``: the spec artifact replaced by this one, whose changed cells supersede their old runs)."""
    every_cell = expand(spec)
    tags = {ROLE: ROLE_STUDY, STUDY: spec.name, "n_trials": str(len(every_cell))}
    first = every_cell[0].config.train
    tags["device"] = device_description(first.device, first.threads)  # the cells' threads, not the driver's
    tags |= {NOTE: spec.description} if spec.description else {}
    parent_id = shared_run(store, experiment_id, f"tags.`{ROLE}` = '{ROLE_STUDY}'", spec.name, tags)
    describe_study_run(store, parent_id, spec, every_cell, relog_spec)
    # Tags, not params: a rerun with a changed spec (--supersede) replaces them (MLflow params cannot change).
    store.client.set_tag(parent_id, DESIGN, StudyDesign.of(spec).tag())
    store.client.set_tag(parent_id, COMMAND, command_line())
    runs.resume(store.client, parent_id)  # a rerun: RUNNING again until its cells are done
    return parent_id


INVOCATION: list[str] = []  # the command line's arguments, set by ``harness.cli.main``; empty: called from Python


def command_line() -> str:
    """The command that drives the study, as a user would type it (``harness run-study ...``)."""
    return shlex.join(["harness", *INVOCATION]) if INVOCATION else "harness.run_study (called from Python)"


def describe_study_run(store: TrackingStore, run_id: str, spec: StudySpec, trials: list[Cell], relog: bool) -> str:
    """Give a new parent run the resolved matrix as params and the spec as an artifact (a rerun keeps the first,
    unless ``relog``: the spec artifact is then this one; params cannot change)."""
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    if store.client.get_run(run_id).data.params:
        if relog:
            store.client.log_text(run_id, spec_yaml, "spec.yaml")
        return run_id
    matrix = spec.matrix
    params = {
        "matrix.variants": ",".join(matrix.variants),
        "matrix.seeds": ",".join(map(str, matrix.seeds)) if isinstance(matrix.seeds, list) else str(matrix.seeds),
        "n_trials": str(len(trials)),
        **{f"matrix.sweep.{key}": json.dumps(values) for key, values in matrix.sweep.items()},
    }
    store.client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    store.client.log_text(run_id, spec_yaml, "spec.yaml")
    return run_id
