"""Regenerate the committed study results and fail when a verdict changed (``make results``).

Each folder ``docs/results/<study>/`` holds a report of ``studies/<study>.yaml`` and its ``verdicts.json``
(every trial's health and each variant's answers, ``harness.report.statistics.verdicts``). For each, this runs the
study through the CLI into a fresh store in a temporary folder, writes its report there and compares the
new verdicts with the committed ones: exit 1 naming every decision that changed, 0 when all hold. With
``--update`` it copies the new report over the committed one instead (how a result is committed).

    python scripts/check_results.py                 # every committed study
    python scripts/check_results.py claim --update  # rerun one and commit its new report
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


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Every leaf that differs between two JSON values, as 'key.path: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(old.keys() | new.keys())
            for line in differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        ]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def regenerate(study: str, folder: Path) -> Path:
    """Run ``studies/<study>.yaml`` into a fresh store under ``folder`` and write its report; the report folder."""
    spec, store = REPO / "studies" / f"{study}.yaml", f"sqlite:///{folder / 'mlflow.db'}"
    started = time.monotonic()
    subprocess.run([*HARNESS, "run-study", str(spec), "--tracking-uri", store, "--no-progress"], check=True, cwd=folder)
    out = folder / "report"
    subprocess.run([*HARNESS, "report", str(spec), "--tracking-uri", store, "--out", str(out)], check=True, cwd=folder)
    print(f"{study}: ran and reported in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", help="study names (default: every folder under docs/results)")
    parser.add_argument("--update", action="store_true", help="replace the committed report with the new one")
    args = parser.parse_args()
    studies = args.studies or sorted(p.name for p in RESULTS.iterdir() if (p / "verdicts.json").is_file())
    changed = []
    for study in studies:
        with tempfile.TemporaryDirectory(prefix=f"results-{study}-") as folder:
            report, committed = regenerate(study, Path(folder)), RESULTS / study
            if args.update:
                shutil.rmtree(committed, ignore_errors=True)
                committed.mkdir(parents=True)
                for pattern in KEPT:
                    for file in report.glob(pattern):
                        shutil.copy2(file, committed / file.name)
                print(f"{study}: committed report replaced ({committed.relative_to(REPO)})")
                continue
            old = json.loads((committed / "verdicts.json").read_text())
            found = differences(old, json.loads((report / "verdicts.json").read_text()))
            changed += [f"{study}: {line}" for line in found]
            print(f"{study}: {'verdicts changed' if found else 'every verdict holds'}")
    for line in changed:
        print(line, file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
