"""``harness report``: a study's Markdown + PDF report and its ``verdicts.json``, built only from the MLflow store.

Modules, each depending only on those above it:

- ``gather``: the study's runs, curves and utilisation tables read from MLflow (``StudyData``).
- ``statistics``: every figure the report states, computed once: summaries over seeds, the tests against the
  reference (t-tests, TOST, Holm), compute-matched points, the verdict's answers.
- ``blocks``: the document model's blocks (heading, paragraph, bullets, table, figure) and how numbers read.
- ``figures``: the PNG figures (matplotlib, seaborn heatmaps, Optuna's views).
- ``overview``, ``findings``: the sections, each a function returning blocks.
- ``document``: which sections the report has, in order.
- ``render``: the Markdown and PDF writers; both lay out the same blocks.

This module is the entry point: the ``harness report`` command and :func:`write_report`. The CLI imports it on
every start to register the command, so it imports the modules above (mlflow, matplotlib, reportlab) only when a
report is made.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.config import SpecError

__all__ = ["register", "write_report"]

VERDICTS = "verdicts.json"  # the report's decisions, for a program to compare (statistics.verdicts)
RULE = "---"  # a horizontal rule in the study run's description, between the answers, the spec's words and the table


# MLflow's artifact preview shows a Markdown file's relative image links as text (MLflow 3.17): say where they are.
MARKDOWN_FIRST_LINE = (
    "*Open report.pdf for the figures: this Markdown links them as PNG files beside it, which MLflow's artifact "
    "preview shows as plain links.*\n\n"
)


def write_report(
    target: str,
    tracking_uri: str,
    out: Path | None = None,
    *,
    log_artifacts: bool = True,
    optuna_storage: str | None = None,
) -> Path:
    """Gather, analyse, plot and render; returns the folder holding report.md, report.pdf and verdicts.json.

    ``target``: a study name, or its spec file (its name is read; the design is the one the study run recorded).
    """
    from mlflow.tracking import MlflowClient

    from harness.report.document import build_document
    from harness.report.figures import make_figures
    from harness.report.gather import load_study, study_name, tuning_study
    from harness.report.render import to_markdown, to_pdf
    from harness.report.statistics import analyse, verdicts

    name = study_name(target)
    data = load_study(name, tracking_uri)  # the design the study run recorded decides, not a spec edited since
    out = Path(out) if out is not None else Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    tuning = tuning_study(data, optuna_storage)
    tests = analyse(data)
    figures = make_figures(data, out, tuning, tests)
    document = build_document(data, tests, figures, generated=datetime.now(UTC), tuning=tuning)
    (out / "report.md").write_text(MARKDOWN_FIRST_LINE + to_markdown(document))
    (out / VERDICTS).write_text(json.dumps(verdicts(data, tests), indent=2, sort_keys=True) + "\n")
    to_pdf(document, out / "report.pdf", base=out)
    if log_artifacts and data.parent is not None and data.parent.info.status != "RUNNING":
        # A RUNNING study run belongs to a driver still at work (or killed before it could end the run): its
        # report would be overwritten or stale, so it stays on disk only.
        summary = answer_summary(tests)
        log_to_study_run(MlflowClient(tracking_uri), data.parent.info.run_id, out, figures, document, summary)
    return out


def answer_summary(tests: dict) -> str:
    """One line per variant with its answer, for the top of the study run's description (the run page shows its
    first lines and folds the rest under "Show more")."""
    from harness.report.blocks import fmt

    lines = []
    for found in tests.values():
        for a in found.against.values():
            time = f"{fmt(a.time.ratio, 3)}× the time" if a.time else "time not measured"
            lines.append(
                f"- **{a.variant}: {a.answer}** ({fmt(a.params_ratio, 3)}× the parameters; {a.words}; {time}; "
                f"vs {found.reference})"
            )
    return "\n".join(lines)


def log_to_study_run(client: Any, run_id: str, out: Path, figures: list, document: list, summary: str) -> None:
    """The report under ``report/``, the headline figure at the artifact root, and the answer as the run's
    description (the MLflow run page renders it as Markdown), so the answer is seen without the PDF: a line per
    variant first, then the spec's description, the verdict table and where the full report is."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    from harness.report.blocks import Heading, Image
    from harness.report.figures import VERDICT_FIGURE
    from harness.report.findings import VERDICT_HEADING
    from harness.report.render import to_markdown
    from harness.tags import NOTE

    for file in ["report.md", "report.pdf", VERDICTS, *(figure.file for figure in figures)]:
        client.log_artifact(run_id, str(out / file), "report")
    if (out / VERDICT_FIGURE).is_file():
        client.log_artifact(run_id, str(out / VERDICT_FIGURE))
    headings = [i for i, block in enumerate(document) if isinstance(block, Heading)]
    start = next((i for i in headings if document[i].text == VERDICT_HEADING), None)
    if start is None:
        return
    end = next((i for i in headings if i > start), len(document))
    verdict = [block for block in document[start:end] if not isinstance(block, Image)]
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    description = experiment.tags.get(NOTE, "")  # the spec's description (run-study gives it to the experiment)
    answer = to_markdown(verdict).replace("](", "](report/")  # any link points into the report folder
    pointer = f"Full report: `report/report.pdf` (artifacts); headline figure: `{VERDICT_FIGURE}`."
    parts = [summary, RULE, description, RULE, answer, pointer]
    text = "\n\n".join(part for part in parts if part)
    if len(text) > MAX_TAG_VAL_LENGTH:  # a tag holds 8,000 characters: many variants keep their lines, not the table
        text = "\n\n".join(part for part in (summary, pointer) if part)[:MAX_TAG_VAL_LENGTH]
    client.set_tag(run_id, NOTE, text)


def cmd_report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from harness.report.gather import study_name  # here, not at the top: see the module docstring
    from harness.tracking import check_tracking_uri, resolve_tracking_uri
    from harness.urls import ui_link

    out = Path(args.out) if args.out else Path("reports") / study_name(args.study)
    check_out_folder(out, "--out" if args.out else "report folder")  # before anything is read or written
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri, create=False)  # fails fast on a dead server; never creates a store to report on
    out = write_report(args.study, uri, out, log_artifacts=not args.no_log, optuna_storage=args.optuna_storage)
    print(f"wrote {out / 'report.md'} and {out / 'report.pdf'}")
    experiment = MlflowClient(uri).get_experiment_by_name(study_name(args.study))
    if experiment is not None:
        print(ui_link(uri, experiment.experiment_id))
    return 0


def check_out_folder(out: Path, what: str) -> None:
    """SpecError unless the report's files can go into ``out``: a folder, or one that can be created."""
    from harness.tracking import check_writable

    if out.exists() and not out.is_dir():
        raise SpecError(f"{what} {out}: is a file, not a folder")
    check_writable(out, what)


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
