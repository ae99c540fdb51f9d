"""Gather a study from the MLflow tracking store: trial runs, validation curves and utilisation tables.

Everything comes from the tracking store (``search_runs``, metric histories, run artifacts), so the
report reads the same from a local SQLite store and from a shared server filled by many workers.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from harness.config import VARIANTS, SpecError, load_spec
from harness.metric_names import VAL_PPL, VAL_SUBSET_PPL
from harness.tags import ROLE, ROLE_STUDY, ROLE_TRIAL, ROLE_TUNE, ROLE_TUNE_TRIAL

BASELINE = "baseline"
VARIANT_ORDER = list(VARIANTS)
ARTIFACT_TABLES = {"utilisation": "utilisation.csv", "history": "utilisation_history.csv"}


@dataclass
class StudyData:
    """What the report needs, read once from the tracking store."""

    name: str
    experiment_id: str
    parent: Run | None  # the study's parent run (the tuning parent when there is no study run)
    runs: pd.DataFrame  # search_runs frame of every trial run (all states); tuning trials if there are no others
    tune_parent: Run | None = None  # ``harness tune``'s parent run (tags optuna.storage, optuna.study_name)
    tuning_only: bool = False
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)  # variant, backbone, seed, step, tokens, val_ppl
    utilisation: pd.DataFrame = field(default_factory=pd.DataFrame)  # + variant, backbone, seed: split, layer, ...
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # + variant, backbone, seed: step, tokens, layer, ...

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "FINISHED"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "FINISHED"]

    @property
    def backbones(self) -> list[str]:
        return sorted(self.runs["tags.backbone"].dropna().unique()) if "tags.backbone" in self.runs else []

    def tag(self, key: str) -> str | None:
        run = self.tune_parent if key.startswith("optuna.") else self.parent
        return None if run is None else run.data.tags.get(key)

    def per_variant(self, backbone: str) -> list[tuple[str, pd.DataFrame]]:
        """Finished runs of one backbone grouped by variant, in report order."""
        runs = self.finished[self.finished["tags.backbone"] == backbone]
        return [(v, runs[runs["tags.variant"] == v]) for v in sorted(runs["tags.variant"].unique(), key=variant_key)]


def study_name(target: str) -> str:
    """A study name, or the name inside a study spec file."""
    path = Path(target)
    if target.endswith((".yaml", ".yml")) or path.is_file():
        return load_spec(path).name
    return target


def variant_key(name: str) -> tuple[int, str]:
    """Sort key: the known variants in their fixed order, then any other name alphabetically."""
    return (VARIANT_ORDER.index(name) if name in VARIANT_ORDER else len(VARIANT_ORDER), name)


def is_pruned(runs: pd.DataFrame) -> pd.Series:
    """Tuning trials the pruner stopped (``harness tune`` tags them ``optuna.state`` = PRUNED)."""
    if "tags.optuna.state" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["tags.optuna.state"] == "PRUNED"


def load_study(name: str, tracking_uri: str) -> StudyData:
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SpecError(f"study '{name}' has no experiment in the tracking store {tracking_uri}")
    eid = experiment.experiment_id
    study_parents = client.search_runs([eid], f"tags.`{ROLE}` = '{ROLE_STUDY}'", order_by=["attributes.start_time ASC"])
    tune_parents = client.search_runs([eid], f"tags.`{ROLE}` = '{ROLE_TUNE}'", order_by=["attributes.start_time ASC"])
    runs = mlflow.search_runs([eid], filter_string=f"tags.`{ROLE}` = '{ROLE_TRIAL}'", max_results=50000)
    tuning_only = runs.empty
    if tuning_only:  # a tuning study with no run-study: its tuning trials are the runs
        runs = mlflow.search_runs([eid], filter_string=f"tags.`{ROLE}` = '{ROLE_TUNE_TRIAL}'", max_results=50000)
    if runs.empty:
        raise SpecError(f"study '{name}' has no trial runs in {tracking_uri}")
    for column in ("tags.variant", "tags.seed", "tags.backbone", "tags.harness.error", "tags.harness.cell"):
        if column not in runs:
            runs[column] = None
    runs = runs.sort_values(["tags.backbone", "tags.variant", "tags.seed"], key=_sort_key).reset_index(drop=True)
    parent = (study_parents or tune_parents or [None])[0]
    data = StudyData(name, eid, parent, runs, tune_parent=tune_parents[0] if tune_parents else None)
    data.tuning_only = tuning_only
    data.curves, data.utilisation, data.history = _per_trial_tables(client, runs)
    return data


def _per_trial_tables(client: MlflowClient, runs: pd.DataFrame) -> tuple[pd.DataFrame, ...]:
    """Validation curves of every run, utilisation tables of finished runs; each row tagged with its trial."""
    curves: list[pd.DataFrame] = []
    tables: dict[str, list[pd.DataFrame]] = {kind: [] for kind in ARTIFACT_TABLES}
    with tempfile.TemporaryDirectory() as folder:
        for _, row in runs.iterrows():
            ident = {"variant": row["tags.variant"], "backbone": row["tags.backbone"], "seed": row["tags.seed"]}
            curve = _curve(client, row["run_id"])
            if not curve.empty:
                curves.append(curve.assign(**ident))
            if row["status"] != "FINISHED":
                continue
            target = Path(folder) / row["run_id"]
            target.mkdir()
            for kind, file in ARTIFACT_TABLES.items():
                table = _download_csv(client, row["run_id"], file, target)
                if table is not None and not table.empty:
                    tables[kind].append(table.assign(**ident))
    return _concat(curves), _concat(tables["utilisation"]), _concat(tables["history"])


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _download_csv(client: MlflowClient, run_id: str, name: str, folder: Path) -> pd.DataFrame | None:
    try:
        path = client.download_artifacts(run_id, name, str(folder))
    except Exception:  # missing artifact (old or failed run)
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None


def _curve(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """Validation PPL per mid-run evaluation, on the training-token axis via the ``tokens`` step metric.

    One measure per curve: the ``eval_tokens`` subset estimate, or the full split where a run evaluated that.
    """
    val = client.get_metric_history(run_id, VAL_SUBSET_PPL) or client.get_metric_history(run_id, VAL_PPL)
    if not val:
        return pd.DataFrame(columns=["step", "tokens", "val_ppl"])
    seen = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "tokens"))
    steps = np.array([m.step for m in val], dtype=float)
    tokens = np.interp(steps, [s for s, _ in seen], [v for _, v in seen]) if seen else steps
    frame = pd.DataFrame({"step": steps, "tokens": tokens, "val_ppl": [m.value for m in val]})
    return frame.sort_values("step").drop_duplicates("step", keep="last")


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name == "tags.variant":
        return column.map(lambda v: variant_key(str(v)))
    if column.name == "tags.seed":
        return column.map(lambda v: int(v) if str(v).lstrip("-").isdigit() else math.inf)
    return column.astype(str)


def tuning_study(data: StudyData, storage: str | None = None) -> optuna.Study | None:
    """The Optuna study behind a tuning parent run (tags ``optuna.storage`` and ``optuna.study_name``).

    The tag's storage URL has its password redacted: pass ``storage`` (``--optuna-storage``) to override it.
    """
    storage, name = storage or data.tag("optuna.storage"), data.tag("optuna.study_name")
    if not storage or not name:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as error:  # unreachable storage: the report says so rather than failing
        print(f"harness report: could not load Optuna study {name} from {storage}: {error}")
        return None
