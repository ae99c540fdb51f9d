"""``write_report``: gather the study, make the figures, build the document, write report.md and report.pdf."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.config import load_spec
from harness.report.document import build_document
from harness.report.figures import make_figures
from harness.report.gather import load_study, study_name, tuning_study
from harness.report.markdown import to_markdown
from harness.report.pdf import to_pdf
from harness.report.verdict import verdicts

VERDICTS = "verdicts.json"  # the report's decisions, for a program to compare (harness/report/verdict.py)


def write_report(
    target: str,
    tracking_uri: str,
    out: Path | None = None,
    log_artifacts: bool = True,
    optuna_storage: str | None = None,
) -> Path:
    """Gather, analyse, plot and render; returns the folder holding report.md, report.pdf and verdicts.json."""
    name = study_name(target)
    data = load_study(name, tracking_uri)
    if target.endswith((".yaml", ".yml")):  # the spec at hand states the margin, whatever the study run recorded
        report = load_spec(target).report
        data.equivalence_margin, data.reference = report.equivalence_margin, report.reference
    out = Path(out) if out is not None else Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    tuning = tuning_study(data, optuna_storage)
    figures = make_figures(data, out, tuning)
    document = build_document(data, figures, generated=datetime.now(UTC), tuning=tuning)
    (out / "report.md").write_text(to_markdown(document))
    (out / VERDICTS).write_text(json.dumps(verdicts(data), indent=2, sort_keys=True) + "\n")
    to_pdf(document, out / "report.pdf", base=out)
    if log_artifacts and data.parent is not None:
        client = MlflowClient(tracking_uri)
        for file in ["report.md", "report.pdf", VERDICTS, *(figure.file for figure in figures)]:
            client.log_artifact(data.parent.info.run_id, str(out / file), "report")
    return out
