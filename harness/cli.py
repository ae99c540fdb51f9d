"""The ``harness`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from harness import interrupt
from harness.config import DEFAULT_DATA_PATH, HarnessError, StudySpec, load_spec
from harness.tune import command as tune
from models.config import ModelError

if TYPE_CHECKING:
    from harness.matrix import Cell

EXIT_BAD_INPUT = 2
EXIT_TRIALS_FAILED = 1
MESSAGE_CHARS = 400  # one line for the user, however long the offending value


def _quiet_libraries() -> None:
    # MLflow and Alembic log every migration and warn about optional extras; the user wants the study.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" line per cell
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")


def cmd_run_study(args: argparse.Namespace) -> int:
    from harness.matrix import expand

    spec = load_spec(args.spec)
    cells = expand(spec, where=args.spec)
    needed = None
    if args.list_cells and spec.matrix.sequential is not None:  # the current round's cells, from the store
        from harness.study.driver import needed_cells
        from harness.tracking import resolve_tracking_uri

        needed = {cell.key for cell in needed_cells(spec, resolve_tracking_uri(args.tracking_uri), cells)}
    if args.dry_run and len(spec.matrix.variants) > 1:
        from harness.study.rounds import describe_design

        print("\n".join(describe_design(spec)))
    if args.dry_run or args.list_cells:
        print_cells(spec, cells, numbered=args.list_cells, at_most=spec.matrix.sequential is not None, needed=needed)
        return 0
    from harness.study import parent_run as study_run
    from harness.study.driver import run_study
    from harness.tracking import check_tracking_uri, check_writable, resolve_tracking_uri
    from harness.urls import ui_link

    study_run.INVOCATION[:] = args.argv  # the study run records the command that made it
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri)  # everything that can refuse the command does so before anything is written
    check_writable(Path(args.checkpoint_dir), "--checkpoint-dir")
    outcome = run_study(
        spec,
        uri,
        ray=args.ray,
        workers=args.workers,
        cell=args.cell,
        progress=not args.no_progress,
        checkpoint_dir=Path(args.checkpoint_dir),
        retry_failed=args.retry_failed,
        supersede=args.supersede,
        where=args.spec,
    )
    if not outcome.needed:  # --cell N not needed by a sequential study's current round: said, done
        return 0
    print(
        f"study '{spec.name}': {len(outcome.finished)} finished, {len(outcome.skipped)} already done, "
        f"{len(outcome.failed)} failed; tracking {uri} (experiment {outcome.experiment_id})"
    )
    for key, reason in outcome.failed.items():
        print(f"  FAILED {key}: {reason}")
    print(ui_link(uri, outcome.experiment_id))
    if args.report:
        from harness.report import write_report

        print(f"report: {write_report(spec.name, uri) / 'report.pdf'}")
    for key, verdict in outcome.flagged.items():
        print(f"WARNING {key}: {verdict.label}: {verdict.evidence}")
    return EXIT_TRIALS_FAILED if outcome.failed else 0


def print_cells(
    spec: StudySpec, cells: list[Cell], *, numbered: bool, at_most: bool, needed: set[str] | None = None
) -> None:
    """``--list-cells`` (each cell with the index ``--cell`` takes; ``needed``: a sequential study's current round,
    marked ``*``) or ``--dry-run`` (each cell's setup)."""
    for index, cell in enumerate(cells):
        c = cell.config
        budget = f"{c.budget.tokens:,} tokens" if c.budget.tokens else f"{c.budget.epochs:g} epochs"
        moe = f"router={c.moe.router} expert={c.moe.expert}"
        block = {"dense": "dense FFN", "none": "no block"}.get(c.model.ffn, moe)
        after = f" after {cell.depends_on}" if cell.depends_on else ""
        mark = "" if needed is None else " *" if cell.key in needed else ""
        print(
            f"{index:3d} {cell.key}{mark}"
            if numbered
            else f"{cell.key:40s} backbone={c.model.backbone} {block} budget={budget}{after}"
        )
    round_note = f" ({len(needed)} needed by the current round, marked *)" if needed is not None else ""
    print(f"{'at most ' if at_most else ''}{len(cells)} trials in study '{spec.name}'{round_note}")


def cmd_data_download(args: argparse.Namespace) -> int:
    from harness.data import download

    for path in download(args.name, Path(args.dest)):
        print(f"verified {path}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from harness.config import DataConfig
    from harness.data import load_corpus

    corpus = load_corpus(DataConfig(path=args.path, name=args.name, min_freq=args.min_freq))
    for key, value in corpus.summary().items():
        print(f"{key:18s} {value:,}" if isinstance(value, int) else f"{key:18s} {value}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as the harness's other bad-input errors: one line on stderr (not the usage block
    first), exit code 2. Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        _bad_input(f"{message} (see: {self.prog} --help)")
        sys.exit(EXIT_BAD_INPUT)


def add_run_study(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run-study", help="train every variant x seed cell of a study spec, logged to MLflow")
    run.add_argument("spec", help="study spec YAML (see studies/)")
    run.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"
    )
    run.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run each cell as a Ray task: 'local' (start Ray here), 'auto' (the cluster of this node), HOST:PORT",
    )
    run.add_argument("--cell", type=int, metavar="N", help="run only cell N of --list-cells (e.g. a Slurm array index)")
    run.add_argument("--list-cells", action="store_true", help="print the cells with their index (for --cell) and exit")
    run.add_argument("--retry-failed", action="store_true", help="run cells that failed in an earlier attempt again")
    run.add_argument(
        "--supersede",
        action="store_true",
        help="run cells whose config or data changed since their recorded run as new runs (the old runs are kept, "
        "tagged superseded, and left out of reports); without it such a rerun is refused",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="cells at once on this machine (N > 1: a local Ray cluster, cores / N threads each); default: "
        "cores / train.threads when the spec pins threads and the study is long enough, else 1 (in this process)",
    )
    run.add_argument("--dry-run", action="store_true", help="print the expanded trial list and exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--checkpoint-dir", default="mlruns/checkpoints", help="where interrupted trials keep their checkpoints"
    )
    run.add_argument("--report", action="store_true", help="write reports/<study>/report.{md,pdf} at the end")
    run.set_defaults(func=cmd_run_study)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The command line; the bench subcommands only for ``harness bench ...`` (they import torch and the trainer at
    once: 3.5 s of a 4.3 s start, which ``--help`` and a refused spec need not pay)."""
    parser = OneLineParser(prog="harness", description="Benchmark MoE layers in small language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    add_run_study(commands)

    data = commands.add_parser("data", help="WikiText-2 files").add_subparsers(dest="data_command", required=True)
    download = data.add_parser("download", help="fetch the parquet files from the Hugging Face hub and verify them")
    download.add_argument("--name", default="wikitext-2-v1", choices=["wikitext-2-v1", "wikitext-2-raw-v1"])
    download.add_argument("--dest", default=DEFAULT_DATA_PATH)
    download.set_defaults(func=cmd_data_download)
    info = data.add_parser("info", help="tokenise (or read the cache) and print split sizes and vocabulary")
    info.add_argument("--path", default=DEFAULT_DATA_PATH)
    info.add_argument("--name", default="wikitext-2-v1", choices=["wikitext-2-v1", "wikitext-2-raw-v1"])
    info.add_argument("--min-freq", type=int, default=1)
    info.set_defaults(func=cmd_data_info)
    from harness.relocate import register as register_store
    from harness.report import register as register_report

    register_report(commands)
    register_store(commands)
    bench = commands.add_parser("bench", help="speed benchmarks").add_subparsers(dest="bench_command", required=True)
    if argv[:1] == ["bench"]:
        register_benches(bench)
    tune.register(commands)
    return parser


def register_benches(bench: argparse._SubParsersAction) -> None:
    from harness.bench import device, levers, moe, study, train

    for module in (train, levers, moe, device, study):
        module.register(bench)


def main(argv: list[str] | None = None) -> int:
    interrupt.install()  # first: Ctrl-C and SIGTERM set a flag the loops check (no traceback from the imports)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
    _quiet_libraries()
    try:
        return args.func(args)
    except (HarnessError, ModelError) as error:
        return _bad_input(str(error))
    except KeyboardInterrupt as stop:
        print("harness: interrupted; rerun the same command to resume", file=sys.stderr)
        return stop.exit_code if isinstance(stop, interrupt.Interrupted) else 130
    except Exception as error:
        if not _environment_error(error):
            raise  # a bug: its traceback is what a report needs
        return _bad_input(f"{type(error).__name__}: {error}")


def _bad_input(message: str) -> int:
    line = " ".join(message.split())
    cut = f"{line[:MESSAGE_CHARS]}... ({len(line):,} characters)" if len(line) > MESSAGE_CHARS else line
    print(f"harness: error: {cut}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _environment_error(error: Exception) -> bool:
    """A full disk, an unwritable or vanished file, a database that refuses: the user's machine, not a bug."""
    library = type(error).__module__.split(".")[0]
    return isinstance(error, OSError) or library in ("sqlite3", "sqlalchemy", "mlflow", "optuna", "alembic")


if __name__ == "__main__":
    sys.exit(main())
