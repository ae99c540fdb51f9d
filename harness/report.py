"""``harness report``: gather a study from the MLflow tracking store and write report.md + report.pdf.

Everything comes from the tracking store (``search_runs``, metric histories, run artifacts), so the
report reads the same from a local SQLite store and from a shared server filled by many workers.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import SpecError

if TYPE_CHECKING:  # the CLI registers this command on every start: heavy imports wait until a report is made
    import pandas as pd
    from mlflow.tracking import MlflowClient

ROLE, PARENT = "harness.role", "mlflow.parentRunId"
BASELINE = "baseline"
VARIANT_ORDER = ["baseline", "switch", "lora", "hybrid", "dense"]


def _frame() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame()


@dataclass
class StudyData:
    """What the report needs, read once from the tracking store."""

    name: str
    experiment_id: str
    parent: Any | None  # the study's parent mlflow Run (the tuning parent when there is no study run)
    runs: pd.DataFrame  # search_runs frame of every trial run (all states); tuning trials if there are no others
    tune_parent: Any | None = None  # ``harness tune``'s parent run (tags optuna.storage, optuna.study_name)
    tuning_only: bool = False
    curves: pd.DataFrame = field(default_factory=_frame)  # variant, backbone, seed, step, tokens, val_ppl
    utilisation: pd.DataFrame = field(default_factory=_frame)  # + variant, backbone, seed: split, layer, expert, share
    history: pd.DataFrame = field(default_factory=_frame)  # + variant, backbone, seed: step, tokens, layer, ...

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


def study_name(target: str) -> str:
    """A study name, or the name inside a study spec file."""
    path = Path(target)
    if target.endswith((".yaml", ".yml")) or path.is_file():
        from harness.config import load_spec

        return load_spec(path).name
    return target


def variant_key(name: str) -> tuple[int, str]:
    return (VARIANT_ORDER.index(name) if name in VARIANT_ORDER else len(VARIANT_ORDER), name)


def _download_csv(client: MlflowClient, run_id: str, name: str, folder: Path) -> pd.DataFrame | None:
    import pandas as pd

    try:
        path = client.download_artifacts(run_id, name, str(folder))
    except Exception:  # missing artifact (old or failed run)
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None


def _curve(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """val_ppl per evaluation step, placed on the training-token axis via the ``tokens`` step metric."""
    import numpy as np
    import pandas as pd

    val = client.get_metric_history(run_id, "val_ppl")
    if not val:
        return pd.DataFrame(columns=["step", "tokens", "val_ppl"])
    seen = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "tokens"))
    steps = np.array([m.step for m in val], dtype=float)
    tokens = np.interp(steps, [s for s, _ in seen], [v for _, v in seen]) if seen else steps
    frame = pd.DataFrame({"step": steps, "tokens": tokens, "val_ppl": [m.value for m in val]})
    return frame.sort_values("step").drop_duplicates("step", keep="last")


def load_study(name: str, tracking_uri: str) -> StudyData:
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SpecError(f"study '{name}' has no experiment in the tracking store {tracking_uri}")
    eid = experiment.experiment_id
    study_parents = client.search_runs([eid], f"tags.`{ROLE}` = 'study'", order_by=["attributes.start_time ASC"])
    tune_parents = client.search_runs([eid], f"tags.`{ROLE}` = 'tune'", order_by=["attributes.start_time ASC"])
    runs = mlflow.search_runs([eid], filter_string=f"tags.`{ROLE}` = 'trial'", max_results=50000)
    tuning_only = runs.empty
    if tuning_only:  # a tuning study with no run-study: its tuning trials are the runs
        runs = mlflow.search_runs([eid], filter_string=f"tags.`{ROLE}` = 'tune-trial'", max_results=50000)
    if runs.empty:
        raise SpecError(f"study '{name}' has no trial runs in {tracking_uri}")
    for column in ("tags.variant", "tags.seed", "tags.backbone", "tags.harness.error", "tags.harness.cell"):
        if column not in runs:
            runs[column] = None
    runs = runs.sort_values(["tags.backbone", "tags.variant", "tags.seed"], key=_sort_key).reset_index(drop=True)
    parent = (study_parents or tune_parents or [None])[0]
    data = StudyData(name, eid, parent, runs, tune_parent=tune_parents[0] if tune_parents else None)
    data.tuning_only = tuning_only
    curves, utilisation, history = [], [], []
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
            table = _download_csv(client, row["run_id"], "utilisation.csv", target)
            if table is not None and not table.empty:
                utilisation.append(table.assign(**ident))
            table = _download_csv(client, row["run_id"], "utilisation_history.csv", target)
            if table is not None and not table.empty:
                history.append(table.assign(**ident))
    data.curves = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    data.utilisation = pd.concat(utilisation, ignore_index=True) if utilisation else pd.DataFrame()
    data.history = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
    return data


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name == "tags.variant":
        return column.map(lambda v: variant_key(str(v)))
    if column.name == "tags.seed":
        return column.map(lambda v: int(v) if str(v).lstrip("-").isdigit() else math.inf)
    return column.astype(str)


def tuning_study(data: StudyData, storage: str | None = None) -> Any | None:
    """The Optuna study behind a tuning parent run (tags ``optuna.storage`` and ``optuna.study_name``).

    The tag's storage URL has its password redacted: pass ``storage`` (``--optuna-storage``) to override it.
    """
    storage, name = storage or data.tag("optuna.storage"), data.tag("optuna.study_name")
    if not storage or not name:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as error:  # unreachable storage: the report says so rather than failing
        print(f"harness report: could not load Optuna study {name} from {storage}: {error}")
        return None


def write_report(
    target: str,
    tracking_uri: str,
    out: Path | None = None,
    log_artifacts: bool = True,
    optuna_storage: str | None = None,
) -> Path:
    """Gather, analyse, plot and render; returns the folder holding report.md and report.pdf."""
    from mlflow.tracking import MlflowClient

    from harness import plots, render

    name = study_name(target)
    data = load_study(name, tracking_uri)
    out = Path(out) if out is not None else Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    tuning = tuning_study(data, optuna_storage)
    figures = plots.make_figures(data, out, tuning)
    document = render.build_document(data, figures, generated=datetime.now(UTC), tuning=tuning)
    (out / "report.md").write_text(render.to_markdown(document))
    render.to_pdf(document, out / "report.pdf", base=out)
    if log_artifacts and data.parent is not None:
        client = MlflowClient(tracking_uri)
        run_id = data.parent.info.run_id
        client.log_artifact(run_id, str(out / "report.md"), "report")
        client.log_artifact(run_id, str(out / "report.pdf"), "report")
        for figure in figures:
            client.log_artifact(run_id, str(out / figure.file), "report")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from harness.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    out = write_report(
        args.study, uri, Path(args.out) if args.out else None, not args.no_log, optuna_storage=args.optuna_storage
    )
    print(f"wrote {out / 'report.md'} and {out / 'report.pdf'}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="Markdown + PDF report of a study, built from the MLflow store")
    report.add_argument("study", help="study name, or the study spec YAML")
    report.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"
    )
    report.add_argument("--out", help="output folder (default: reports/<study>/)")
    report.add_argument("--optuna-storage", help="Optuna storage URL of a tuning study (default: the parent run's tag)")
    report.add_argument("--no-log", action="store_true", help="do not log the report to the study's parent run")
    report.set_defaults(func=cmd_report)
