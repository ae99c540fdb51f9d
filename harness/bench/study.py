"""``harness bench study SPEC``: where a study's wall time goes, cell by cell.

It runs the study as a user would (``harness run-study`` in a new process, into a fresh store), times the whole
command, and reads back what each trial run recorded of its own time: set-up inside the trainer (data to the
device, model build, checkpoint restore), training (``train_time_s``), mid-run evaluations, checkpoint saves, the
final full-split evaluations, and the rest of the run's duration (opening the run and logging its params and
dataset, the health verdict, the summary and artifacts). Beside the cells: the command's start-up (process start
to the first cell's start: imports, data loading and hashing, preflight, the study run) and its tail (last cell's
end to exit; the report with ``--report``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tabulate import tabulate

PHASES = ("setup", "train", "eval", "checkpoint", "final_eval")
PHASE_METRICS = {phase: "train_time_s" if phase == "train" else f"time_{phase}_s" for phase in PHASES}


def cell_rows(store: str, study: str) -> list[dict[str, Any]]:
    """One row per trial run, in start order: its duration split into the phases it recorded, and the rest."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'", order_by=["start_time"])
    rows = []
    for run in runs:
        wall = (run.info.end_time - run.info.start_time) / 1000
        phases = {phase: run.data.metrics.get(metric, 0.0) for phase, metric in PHASE_METRICS.items()}
        row = {"cell": run.data.tags["harness.cell"], "start": run.info.start_time / 1000, "wall": wall}
        rows.append(row | phases | {"other": wall - sum(phases.values())})
    return rows


def breakdown(rows: list[dict[str, Any]], started: float, ended: float) -> dict[str, float]:
    """The command's wall time: start-up, the cells (summed; they overlap when several run at once), the tail."""
    first, last = min(r["start"] for r in rows), max(r["start"] + r["wall"] for r in rows)
    totals = {key: sum(r[key] for r in rows) for key in ("wall", *PHASES, "other")}
    return {"command": ended - started, "startup": first - started, "tail": ended - last, "cells": totals["wall"]} | {
        f"cells_{key}": value for key, value in totals.items() if key != "wall"
    }


def format_tables(rows: list[dict[str, Any]], study: dict[str, float]) -> str:
    table = [{k: v for k, v in row.items() if k != "start"} for row in rows]
    share = {k: v for k, v in study.items() if k.startswith("cells_")}
    lines = [tabulate(table, headers="keys", floatfmt=".1f"), ""]
    lines.append(
        f"command {study['command']:.1f} s: start-up {study['startup']:.1f} s, cells {study['cells']:.1f} s "
        f"(summed), tail {study['tail']:.1f} s"
    )
    lines.append(
        "cells: "
        + ", ".join(f"{k.removeprefix('cells_')} {v:.1f} s ({v / study['cells']:.0%})" for k, v in share.items())
    )
    return "\n".join(lines)


def cmd_bench_study(args: argparse.Namespace) -> int:
    from harness.config import load_spec

    spec = load_spec(args.spec)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-study-"))
    store = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    command = [sys.executable, "-m", "harness", "run-study", args.spec, "--tracking-uri", store, "--no-progress"]
    command += ["--checkpoint-dir", str(folder / "ck"), *(["--ray", args.ray] if args.ray else [])]
    command += ["--workers", str(args.workers)] if args.workers else []
    command += ["--report"] if args.report else []
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    ended = time.time()
    if done.returncode not in (0, 1):  # 1: a trial failed, which the table shows
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    rows = cell_rows(store, spec.name)
    study = breakdown(rows, started, ended)
    print(format_tables(rows, study))
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": rows, "study": study}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def register(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("study", help="run a study into a fresh store and print where its wall time went")
    parser.add_argument("spec", help="study spec YAML")
    parser.add_argument("--ray", metavar="ADDRESS", help="run it with --ray ADDRESS (e.g. local)")
    parser.add_argument("--workers", type=int, metavar="N", help="run it with --workers N (default: run-study's)")
    parser.add_argument("--report", action="store_true", help="include the report in the command (its tail)")
    parser.add_argument("--keep", metavar="DIR", help="the store's folder (default: a new temporary one)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the totals as JSON")
    parser.set_defaults(func=cmd_bench_study)
