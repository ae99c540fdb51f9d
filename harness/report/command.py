"""The ``harness report`` command line."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    # Here, not at the top: the CLI registers this command on every start (see harness/report/__init__.py).
    from harness.report.pipeline import write_report
    from harness.tracking import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri, create=False)  # fails fast on a dead server; never creates a store to report on
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
