"""Gather a study from the MLflow tracking store: trial runs, validation curves and utilisation tables.

Everything comes from the tracking store (``search_runs``, metric histories, run artifacts), so the
report reads the same from a local SQLite store and from a shared server filled by many workers. The one
other input is each run's corpus, read for its training FLOPs per token (:func:`with_flops`).
"""
# Over 350 lines: everything read from the tracking store, and the study data the sections share.

from __future__ import annotations

import functools
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from harness.config import VARIANTS, DataConfig, DesignConfig, SpecError, TrialConfig, load_spec
from harness.data import load_corpus
from harness.flops import train_flops_per_token
from harness.health import UNTRAINED, is_result  # verdicts that keep a run out of rankings and tests
from harness.metric_names import VAL_PPL, VAL_SUBSET_PPL
from harness.speed import ARTIFACT as SPEED_ARTIFACT
from harness.study.rounds import StudyDesign
from harness.tags import (
    DESIGN,
    HEALTH,
    HEALTH_EVIDENCE,
    ROLE,
    ROLE_STUDY,
    ROLE_TRIAL,
    ROLE_TUNE,
    ROLE_TUNE_TRIAL,
)

VARIANT_ORDER = list(VARIANTS)
ARTIFACT_TABLES = {"utilisation": "utilisation.csv", "history": "utilisation_history.csv"}
GRAD_COMPONENTS = ["embedding", "backbone", "router", "experts", "ffn", "head", "total"]  # metrics grad_norm_<name>
HEALTH_OK, HEALTH_UNKNOWN = "ok", "unknown"  # unknown: a run from before health was judged (no tag)


@dataclass
class StudyData:
    """What the report needs, read once from the tracking store."""

    name: str
    experiment_id: str
    parent: Run | None  # the study's parent run (the tuning parent when there is no study run)
    runs: pd.DataFrame  # search_runs frame of every trial run (all states); tuning trials if there are no others
    tune_parent: Run | None = None  # ``harness tune``'s parent run (tags optuna.storage, optuna.study_name)
    tuning_only: bool = False
    # variant, backbone, seed, run_id, step, tokens, train_time_s, val_ppl
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    grad_norms: pd.DataFrame = field(default_factory=pd.DataFrame)  # + variant, ...: step, component, grad_norm
    configs: dict[str, TrialConfig] = field(default_factory=dict)  # run_id -> its config.yaml (finished runs)
    design: StudyDesign = None  # type: ignore[assignment]  # set by load_study: the recorded design (study_design)
    speed: dict | None = None  # the study run's paired speed measurement (harness.speed), when recorded
    utilisation: pd.DataFrame = field(default_factory=pd.DataFrame)  # + variant, backbone, seed: split, layer, ...
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # + variant, backbone, seed: step, tokens, layer, ...

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "FINISHED"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "FINISHED"]

    @property
    def flagged(self) -> pd.DataFrame:
        """Finished runs whose training-health verdict is not ok."""
        verdicts = self.finished[f"tags.{HEALTH}"].fillna(HEALTH_OK)
        return self.finished[verdicts != HEALTH_OK]

    @property
    def untrained(self) -> pd.DataFrame:
        """Flagged stalled or unstable: the optimisation failed, so the numbers say nothing of the design and the
        run ranks nowhere. (Collapsed routing alone is a property of the design: such runs stay in, with a note.)"""
        verdicts = self.flagged[f"tags.{HEALTH}"].fillna(HEALTH_OK).str.split(",")
        return self.flagged[verdicts.map(lambda flags: bool(set(flags) & UNTRAINED))]

    @property
    def judged(self) -> pd.DataFrame:
        """Runs that may be ranked and tested (:func:`harness.health.is_result`: finished, not untrained)."""
        health = self.runs.get(f"tags.{HEALTH}", pd.Series(None, index=self.runs.index, dtype=object))
        results = [is_result(status, tag) for status, tag in zip(self.runs["status"], health, strict=True)]
        return self.runs[results]

    @property
    def backbones(self) -> list[str]:
        return sorted(self.runs["tags.backbone"].dropna().unique()) if "tags.backbone" in self.runs else []

    @property
    def finished_backbones(self) -> list[str]:
        """The backbones with at least one finished trial: the ones the tables and tests cover."""
        return [b for b in self.backbones if not self.finished[self.finished["tags.backbone"] == b].empty]

    @property
    def commits(self) -> list[str]:
        """The commits the finished trials ran at (a committed result has exactly one, not ``-dirty``)."""
        return sorted(self.finished["tags.git_commit"].dropna().unique()) if "tags.git_commit" in self.runs else []

    @property
    def complete(self) -> bool:
        """Every cell the design needs has ended and the study run ended: nothing more will come."""
        status = None if self.parent is None else self.parent.info.status
        return status in ("FINISHED", "FAILED") and not self.runs["status"].isin(["RUNNING", "SCHEDULED"]).any()

    def tag(self, key: str) -> str | None:
        run = self.tune_parent if key.startswith("optuna.") else self.parent
        return None if run is None else run.data.tags.get(key)

    def per_variant(self, backbone: str) -> list[tuple[str, pd.DataFrame]]:
        """Finished runs of one backbone not flagged unhealthy, grouped by variant, in report order."""
        runs = self.judged[self.judged["tags.backbone"] == backbone]
        return [(v, runs[runs["tags.variant"] == v]) for v in sorted(runs["tags.variant"].unique(), key=variant_key)]


def study_name(target: str) -> str:
    """A study name, or the name inside a study spec file."""
    path = Path(target)
    if target.endswith((".yaml", ".yml")) or path.is_file():
        return load_spec(path).name
    return target


def by_seed(runs: pd.DataFrame, metric: str) -> dict[str, float]:
    """{seed: value} of a summary metric; empty where the runs did not log it (an older store)."""
    column = f"metrics.{metric}"
    if column not in runs:
        return {}
    return {str(s): float(v) for s, v in zip(runs["tags.seed"], runs[column], strict=True) if pd.notna(v)}


def metric_values(rows: pd.DataFrame, name: str) -> list[float]:
    """The values of a summary metric over ``rows`` (runs), those that logged it."""
    column = f"metrics.{name}"
    return rows[column].dropna().astype(float).tolist() if column in rows else []


def load_cv(rows: pd.DataFrame) -> list[float]:
    """Per run: the validation load CV averaged over MoE layers (util_val_cv_l<layer>)."""
    columns = [c for c in rows.columns if re.fullmatch(r"metrics\.util_val_cv_l\d+", c)]
    if not columns:
        return []
    return rows[columns].mean(axis=1, skipna=True).dropna().tolist()


def peak_memory(data: StudyData) -> str:
    """The peak-memory metric to compare: the GPU's where any run measured it, else the process's RSS."""
    runs = data.finished
    if "metrics.gpu_mem_peak_nvml_mb" in runs and runs["metrics.gpu_mem_peak_nvml_mb"].notna().any():
        return "gpu_mem_peak_nvml_mb"
    return "peak_rss_mb"


def is_routed(runs: pd.DataFrame) -> bool:
    """Whether the variant's model has an MoE layer (its ``model.ffn`` param; older stores: not dense)."""
    if "params.model.ffn" in runs and runs["params.model.ffn"].notna().any():
        return bool((runs["params.model.ffn"] == "moe").any())
    return runs["tags.variant"].iloc[0] != "dense"


def health_of(run: pd.Series) -> str:
    """A trial's training-health verdict (``harness.health``'s tag); unknown for runs from before the checks."""
    value = run.get(f"tags.{HEALTH}")
    return str(value) if value is not None and pd.notna(value) else HEALTH_UNKNOWN


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
    columns = ("tags.variant", "tags.seed", "tags.backbone", "tags.harness.error", "tags.harness.cell")
    for column in (*columns, f"tags.{HEALTH}", f"tags.{HEALTH_EVIDENCE}"):
        if column not in runs:
            runs[column] = None
    runs = runs.sort_values(["tags.backbone", "tags.variant", "tags.seed"], key=_sort_key).reset_index(drop=True)
    parent = (study_parents or tune_parents or [None])[0]
    data = StudyData(name, eid, parent, runs, tune_parent=tune_parents[0] if tune_parents else None)
    data.tuning_only = tuning_only
    data.curves, data.grad_norms, data.utilisation, data.history, data.configs = _per_trial_tables(client, runs)
    data.design = study_design(parent, runs)
    data.speed = _speed(client, parent)
    return data


def study_design(parent: Run | None, runs: pd.DataFrame) -> StudyDesign:
    """The design run-study recorded on the study run; a study without one (trials logged by a script, a tuning
    study) is judged as a fixed design at the defaults over the seeds and variants it has."""
    recorded = None if parent is None else parent.data.tags.get(DESIGN)
    if recorded:
        return StudyDesign.from_tag(recorded)
    variants = sorted(runs["tags.variant"].dropna().unique(), key=variant_key)
    seeds = sorted({int(s) for s in runs["tags.seed"].dropna() if str(s).isdigit()})
    return StudyDesign.build(DesignConfig(), variants, seeds, None)


def _speed(client: MlflowClient, parent: Run | None) -> dict | None:
    if parent is None or not any(a.path == SPEED_ARTIFACT for a in client.list_artifacts(parent.info.run_id)):
        return None
    return mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/{SPEED_ARTIFACT}")


def _per_trial_tables(client: MlflowClient, runs: pd.DataFrame) -> tuple[Any, ...]:
    """Validation curves of every run; gradient norms, utilisation tables and configs of finished runs.

    Each table's rows carry their trial (variant, backbone, seed, run_id).
    """
    tables: dict[str, list[pd.DataFrame]] = {kind: [] for kind in ("curves", "grad_norms", *ARTIFACT_TABLES)}
    configs: dict[str, TrialConfig] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _, row in runs.iterrows():
            run_id = row["run_id"]
            ident = {"variant": row["tags.variant"], "backbone": row["tags.backbone"], "seed": row["tags.seed"]}
            found = {"curves": _curve(client, run_id)}
            if row["status"] == "FINISHED":
                target = Path(folder) / run_id
                target.mkdir()
                found["grad_norms"] = _grad_norms(client, run_id)
                found |= {kind: _download_csv(client, run_id, file, target) for kind, file in ARTIFACT_TABLES.items()}
                if (config := _download_config(client, run_id, target)) is not None:
                    configs[run_id] = config
            for kind, table in found.items():
                if table is not None and not table.empty:
                    tables[kind].append(table.assign(**ident, run_id=run_id))
    return (*(_concat(tables[k]) for k in ("curves", "grad_norms", *ARTIFACT_TABLES)), configs)


def _download_config(client: MlflowClient, run_id: str, folder: Path) -> TrialConfig | None:
    try:
        path = client.download_artifacts(run_id, "config.yaml", str(folder))
        return TrialConfig.model_validate(yaml.safe_load(Path(path).read_text()))
    except Exception:  # missing (old run) or from another version of the config: no FLOP count for it
        return None


def _grad_norms(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """Per-component gradient norms before clipping, long format (step, component, grad_norm)."""
    rows = [
        (m.step, component, m.value)
        for component in GRAD_COMPONENTS
        for m in client.get_metric_history(run_id, f"grad_norm_{component}")
    ]
    return pd.DataFrame(rows, columns=["step", "component", "grad_norm"])


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


def _history(client: MlflowClient, run_id: str, name: str) -> pd.Series:
    """A step metric's history as a Series indexed by step (the last value where a step repeats)."""
    seen = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, name))
    return pd.Series({step: value for step, _, value in seen}, dtype=float)


def _curve(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """Validation PPL per mid-run evaluation, on the training-token and training-time axes.

    One measure per curve: the ``eval_tokens`` subset estimate, or the full split where a run evaluated that.

    Tokens come from the ``tokens`` step metric; training time at a logging step is the sum over the logging
    windows so far of window tokens / ``tokens_per_s`` (evaluation excluded, as the trainer times it).
    """
    val = _history(client, run_id, VAL_SUBSET_PPL)
    if val.empty:
        val = _history(client, run_id, VAL_PPL)
    if val.empty:
        return pd.DataFrame(columns=["step", "tokens", "train_time_s", "val_ppl"])
    tokens, speed = _history(client, run_id, "tokens"), _history(client, run_id, "tokens_per_s")
    steps = val.index.to_numpy(dtype=float)
    frame = pd.DataFrame({"step": steps, "tokens": steps, "train_time_s": np.nan, "val_ppl": val.to_numpy()})
    if not tokens.empty:
        frame["tokens"] = np.interp(steps, tokens.index, tokens.to_numpy())
        speed = speed.reindex(tokens.index)
        if speed.notna().all():
            elapsed = np.cumsum(np.diff(tokens.to_numpy(), prepend=0.0) / speed.to_numpy())
            frame["train_time_s"] = np.interp(frame["tokens"], tokens.to_numpy(), elapsed)
    return frame


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


@functools.cache
def _unigram(data_json: str) -> tuple[int, torch.Tensor]:
    """Vocabulary size and training-split unigram of a data config (the adaptive head's FLOPs depend on it)."""
    corpus = load_corpus(DataConfig.model_validate_json(data_json))
    counts = torch.bincount(corpus.train, minlength=corpus.vocab_size).double()
    return corpus.vocab_size, counts / counts.sum()


def flops_per_token(config: TrialConfig) -> float:
    """Training FLOPs per token of a run's config; nan when its data cannot be read here."""
    try:
        vocab_size, unigram = _unigram(config.data.model_dump_json())
    except (OSError, ValueError) as error:  # DataError is a ValueError: data moved or absent on this machine
        print(f"harness report: no FLOP count for {config.variant} seed {config.seed} ({error})")
        return math.nan
    return train_flops_per_token(config, vocab_size, unigram)


def with_flops(data: StudyData, curves: pd.DataFrame) -> pd.DataFrame:
    """``curves`` plus a ``flops`` column (training FLOPs so far); nan for runs without a readable config.

    FLOPs are ``harness.flops``' analytic count per token x tokens.
    """
    per_token = {run_id: flops_per_token(config) for run_id, config in data.configs.items()}
    return curves.assign(flops=curves["tokens"] * curves["run_id"].map(per_token).astype(float))
