"""The ``harness report`` command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.config import SpecError


def cmd_report(args: argparse.Namespace) -> int:
    # Here, not at the top: the CLI registers this command on every start (see harness/report/__init__.py).
    from harness.report.gather import study_name
    from harness.report.pipeline import write_report
    from harness.tracking import check_tracking_uri, resolve_tracking_uri

    out = Path(args.out) if args.out else Path("reports") / study_name(args.study)
    check_out_folder(out, "--out" if args.out else "report folder")  # before anything is read or written
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri, create=False)  # fails fast on a dead server; never creates a store to report on
    out = write_report(args.study, uri, out, not args.no_log, optuna_storage=args.optuna_storage)
    print(f"wrote {out / 'report.md'} and {out / 'report.pdf'}")
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
