"""``harness tune SPEC``: the command line face; the search itself is :mod:`harness.tune.search`.

This module only wires the command into the CLI (``register``), so ``harness --help`` and the other
commands don't pay for importing Optuna, MLflow and torch. See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from harness.config import SpecError, TrialConfig, TuneConfig, load_spec, resolve_trial


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna  # heavy (torch, MLflow, Optuna): only when the command runs
    from mlflow.tracking import MlflowClient

    from harness.preflight import check_host
    from harness.tracking import check_tracking_uri, resolve_tracking_uri
    from harness.tune.results import summary_lines
    from harness.tune.search import run_tune
    from harness.tune.storage import default_storage
    from harness.urls import redact, ui_link

    spec = load_spec(args.spec)
    if spec.tune is None:
        raise SpecError(f"{args.spec}: no 'tune' section to tune")
    if args.workers < 1:
        raise SpecError(f"--workers must be at least 1, got {args.workers}")
    if args.n_trials is not None and args.n_trials < 1:
        raise SpecError(f"--n-trials must be at least 1, got {args.n_trials}")
    trial = resolve_trial(spec, spec.tune.variant, spec.tune.seeds[0])
    check_space(spec.tune, trial, args.spec)
    check_host([trial], args.spec)  # CUDA, data: before writing
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri)
    storage = args.storage or os.environ.get("OPTUNA_STORAGE") or default_storage(spec, uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.ray:  # the workers tune on the cluster; this process then records the best trial(s)
        from harness.tune.ray_workers import tune_on_ray
        from harness.urls import absolute

        uri, storage = absolute(uri), absolute(storage)
        tune_on_ray(spec, uri, storage, args.ray, args.workers, args.n_trials)
    study, best, exported = run_tune(
        spec, uri, storage, args.n_trials, progress=not args.no_progress, out=Path(args.out) if args.out else None
    )
    for line in summary_lines(spec, study, best, exported):
        print(line)
    print(f"dashboard: optuna-dashboard {redact(storage)}; tracking {uri}")
    experiment = MlflowClient(uri).get_experiment_by_name(spec.name)
    if experiment is not None:
        print(ui_link(uri, experiment.experiment_id))
    if args.report:
        from harness.report import write_report

        print(f"report: {write_report(spec.name, uri, optuna_storage=storage) / 'report.pdf'}")
    return 0 if best else 1


def check_space(tune: TuneConfig, trial: TrialConfig, where: str) -> None:
    """Refuse a searched key the tuned variant never reads (a LoRA key on MLP experts): its trials would differ in
    nothing but the recorded value."""
    for key in tune.space:
        if key.startswith("moe.lora_") and trial.moe.expert != "lora":
            raise SpecError(
                f"{where}: tune.space.{key} has no effect on variant '{tune.variant}' (moe.expert = "
                f"{trial.moe.expert}, not lora): tune a LoRA variant or drop the key"
            )


def register(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser("tune", help="Optuna search over a spec's tune section (one or many workers)")
    tune.add_argument("spec", help="study spec YAML with a 'tune' section (see studies/tune.yaml)")
    tune.add_argument(
        "--storage",
        help="Optuna storage URL shared by all workers (default: $OPTUNA_STORAGE, else "
        "sqlite:///<MLflow store folder>/optuna/<study>.db)",
    )
    tune.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"
    )
    tune.add_argument("--n-trials", type=int, help="trials in total across all workers (default: tune.n_trials)")
    tune.add_argument("--ray", metavar="ADDRESS", help="start the workers as Ray tasks: local, auto or HOST:PORT")
    tune.add_argument("--workers", type=int, default=1, help="with --ray: Optuna workers to start (default 1)")
    tune.add_argument("--out", help="where to write the best-config study spec (default: beside the storage)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.add_argument("--report", action="store_true", help="write reports/<study>/report.{md,pdf} at the end")
    tune.set_defaults(func=cmd_tune)
