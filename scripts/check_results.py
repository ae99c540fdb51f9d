"""Check the committed study results (``make results``): one commit each, cells that rerun to the same figures, and
decisions that hold.

Each folder ``docs/results/<study>/`` holds a report of ``studies/<study>.yaml`` and its ``verdicts.json`` (the
design, the commit and command that made it, every trial's health and test loss, and each variant's decisions:
``harness.report.statistics.verdicts``). For each study this

1. refuses a result whose trials ran at more than one commit, or at a commit with uncommitted changes;
2. reruns ``--sample`` of its first round's cells alone into a fresh store and compares their test loss with the
   committed one: exactly where the commit and the device (CPU model and thread count) are the same, else it
   prints the relative difference and why it cannot be exact;
3. unless ``--sample-only``, reruns the whole study into a fresh store from its one command and compares every
   decision (``--update`` then copies the new report over the committed one: how a result is committed).

Exit 1 names every refusal, differing cell and changed decision; 0 when all hold.

    python scripts/check_results.py                    # every committed study, in full (about 2.5 h on 2 cores)
    python scripts/check_results.py claim --sample-only
    python scripts/check_results.py claim --update     # rerun one and commit its new report
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
HARNESS = [sys.executable, "-m", "harness.cli"]
KEPT = ("report.md", "verdicts.json", "*.png")  # the PDF is left out: the Markdown and figures are the record
COMPARED = ("design", "health", "answers")  # what a full rerun must reproduce (figures move with the machine)


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Every leaf that differs between two JSON values, as 'key.path: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(old.keys() | new.keys())
            for line in differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        ]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def provenance(verdicts: dict[str, Any]) -> list[str]:
    """Why a committed result is not the result of one clean commit (empty: it is)."""
    commits = verdicts.get("commits") or []
    if len(commits) != 1:
        return [f"its trials ran at {len(commits)} commits ({', '.join(commits) or 'none recorded'}), not one"]
    if commits[0].endswith("-dirty"):
        return [f"its trials ran at {commits[0]}: uncommitted changes, so no commit reproduces it"]
    return []


def harness(*args: str, cwd: Path) -> None:
    subprocess.run([*HARNESS, *args], check=True, cwd=cwd)


def current_commit() -> str:
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()  # noqa: E731
    commit = run("rev-parse", "--short", "HEAD")
    return f"{commit}-dirty" if run("status", "--porcelain", "--untracked-files=no") else commit


def store(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def sampled_cells(spec_path: Path, uri: str, committed: dict[str, Any], count: int) -> list[tuple[int, Any, str]]:
    """(``--cell`` index, cell, committed trial name) of ``count`` cells of a fresh store's first round that start
    from no other cell, spread over the round."""
    from harness.config import load_spec
    from harness.study.driver import needed_cells, select_cells

    spec = load_spec(spec_path)
    every = select_cells(spec, None, str(spec_path))  # --cell's numbering
    first_round = {c.key for c in needed_cells(spec, uri, every)} if spec.matrix.sequential else None
    cells = []
    for index, cell in enumerate(every):
        names = [name for name in committed["trials"] if name.startswith(f"{cell.variant} seed {cell.seed} (")]
        if names and cell.depends_on is None and (first_round is None or cell.key in first_round):
            cells.append((index, cell, names[0]))
    return cells[:: max(1, len(cells) // count + 1)][:count]  # seed-major: different variants and seeds


def rerun_sample(study: str, committed: dict[str, Any], count: int) -> list[str]:
    """Rerun ``count`` committed cells alone and compare their test loss (module docstring, step 2)."""
    from mlflow.tracking import MlflowClient

    from harness.runs import cell_run
    from harness.tracking import TrackingStore

    problems, spec = [], REPO / "studies" / f"{study}.yaml"
    same_commit = current_commit() in committed["commits"]
    with tempfile.TemporaryDirectory(prefix=f"sample-{study}-") as name:
        for index, cell, trial in sampled_cells(spec, store(Path(name) / "listing"), committed, count):
            uri = store(Path(name) / f"cell-{index}")  # a fresh store per cell: --cell numbers the store's round
            harness("run-study", str(spec), "--cell", str(index), "--tracking-uri", uri, "--no-progress", cwd=REPO)
            run = cell_run(TrackingStore(uri), MlflowClient(uri).get_experiment_by_name(study).experiment_id, cell)
            new, old = run.data.metrics["test_loss"], committed["trials"][trial]["test_loss"]
            device, old_device = run.data.tags.get("device"), committed["trials"][trial]["device"]
            if same_commit and device == old_device:
                verdict = "identical" if new == old else "DIFFERS"
                print(f"{study} {cell.key}: test loss {new!r}, committed {old!r}: {verdict}", flush=True)
                problems += [] if new == old else [f"{study} {cell.key}: test loss {old!r} -> {new!r}"]
                continue
            why = "another commit" if not same_commit else f"another device ({device}; committed on {old_device})"
            print(
                f"{study} {cell.key}: test loss {new!r}, committed {old!r} ({new / old - 1:+.1e}); not compared "
                f"exactly: {why}",
                flush=True,
            )
    return problems


def regenerate(study: str, folder: Path) -> Path:
    """Run ``studies/<study>.yaml`` into a fresh store under ``folder`` and write its report; the report folder."""
    spec, uri = REPO / "studies" / f"{study}.yaml", store(folder)
    started = time.monotonic()
    harness("run-study", str(spec), "--tracking-uri", uri, "--no-progress", cwd=folder)
    out = folder / "report"
    harness("report", str(spec), "--tracking-uri", uri, "--out", str(out), cwd=folder)
    print(f"{study}: ran and reported in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return out


def full_rerun(study: str, committed: dict[str, Any], update: bool) -> list[str]:
    """Rerun the whole study and compare its design, health and decisions (module docstring, step 3)."""
    with tempfile.TemporaryDirectory(prefix=f"results-{study}-") as folder:
        report, target = regenerate(study, Path(folder)), RESULTS / study
        if update:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for pattern in KEPT:
                for file in report.glob(pattern):
                    shutil.copy2(file, target / file.name)
            print(f"{study}: committed report replaced ({target.relative_to(REPO)})")
            return []
        new = json.loads((report / "verdicts.json").read_text())
        found = [line for key in COMPARED for line in differences(committed.get(key), new.get(key), key)]
        print(f"{study}: {'decisions changed' if found else 'every decision holds'}", flush=True)
        return [f"{study}: {line}" for line in found]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", help="study names (default: every folder under docs/results)")
    parser.add_argument("--update", action="store_true", help="rerun in full and replace the committed report")
    parser.add_argument("--sample", type=int, default=2, help="committed cells rerun alone and compared (default 2)")
    parser.add_argument("--sample-only", action="store_true", help="steps 1 and 2 only: no full rerun")
    args = parser.parse_args()
    studies = args.studies or sorted(p.name for p in RESULTS.iterdir() if (p / "verdicts.json").is_file())
    problems = []
    for study in studies:
        committed = json.loads((RESULTS / study / "verdicts.json").read_text()) if not args.update else {}
        if not args.update:
            refused = [f"{study}: not a result: {why}" for why in provenance(committed)]
            problems += refused
            if refused:
                continue
            problems += rerun_sample(study, committed, args.sample) if args.sample else []
        if not args.sample_only:
            problems += full_rerun(study, committed, args.update)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
