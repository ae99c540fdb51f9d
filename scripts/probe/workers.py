"""Workers started together on one fresh store, the two ways the README offers (three cells, tiny spec).

* The same ``run-study`` twice: the study lock lets one run the study and refuses the other in one line (exit 2,
  naming the holder), as the README documents; both exiting 0 counts too.
* Three Slurm-array tasks, ``run-study --cell 0|1|2``: every task exits 0, all share one parent run.

A round is clean when both are, neither printed a traceback, and each store holds one FINISHED trial run per cell,
nothing open, no step logged twice, and exactly one study parent run (deleted ones counted too), FINISHED.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import interrupts
import store_checks
from common import RUN_TIMEOUT_S, CaseResult, Probe, Watched, has_traceback, one_line

ROUNDS = 3
STUDY = "pair"
VARIANTS = ["baseline", "switch", "dense"]
CELLS = [f"{v}/seed=0" for v in VARIANTS]
LOCK_REFUSAL = "the study is already running in process"


def refused_by_lock(code: int | None, output: str) -> bool:
    lines = [line for line in output.strip().splitlines() if line.startswith("harness: error: ")]
    return code == 2 and len(lines) == 1 and LOCK_REFUSAL in lines[0] and not has_traceback(output)


def start_together(probe: Probe, folder: Path, extra: list[list[str]]) -> list[tuple[int | None, str]]:
    """One ``run-study`` per entry of ``extra`` (its extra arguments), all started at once on ``folder``'s store."""
    spec = interrupts.study_spec(folder, STUDY, VARIANTS)
    args = interrupts.study_args(folder, spec, progress=False)
    started = [Watched([*args, *more], folder, probe.env(), folder / f"worker{i}.log") for i, more in enumerate(extra)]
    return [(w.wait(RUN_TIMEOUT_S), w.text()) for w in started]


def store_problems(folder: Path) -> list[str]:
    database = folder / "mlruns" / "mlflow.db"
    problems = store_checks.study_problems(database, STUDY, CELLS, None)
    runs = store_checks.study_runs(database, STUDY, deleted=True)
    parents = [(r.info.lifecycle_stage, r.info.status) for r in runs if r.data.tags.get("harness.role") == "study"]
    if parents != [("active", "FINISHED")]:
        problems.append(f"study parent runs {parents}, expected one active FINISHED")
    return problems


def problems_of(label: str, ended: list[tuple[int | None, str]], ok: Callable[[int | None, str], bool]) -> list[str]:
    problems = [f"{label} worker {i}: exit code {code}" for i, (code, out) in enumerate(ended) if not ok(code, out)]
    return problems + [f"{label} worker {i}: traceback" for i, (_, out) in enumerate(ended) if has_traceback(out)]


def round_result(probe: Probe, index: int) -> CaseResult:
    started = time.monotonic()
    name = f"round-{index}"
    folder = probe.folder("workers", name)
    same, array_folder = folder / "same-study", folder / "array"
    same.mkdir(), array_folder.mkdir()
    pair = start_together(probe, same, [[], []])
    array = start_together(probe, array_folder, [["--cell", str(i)] for i in range(len(CELLS))])
    problems = problems_of("same-study", pair, lambda c, o: c == 0 or refused_by_lock(c, o))
    problems += ["same-study: neither worker ran the study"] if 0 not in [c for c, _ in pair] else []
    problems += [f"same-study: {p}" for p in store_problems(same)]
    problems += problems_of("array", array, lambda c, o: c == 0)
    problems += [f"array: {p}" for p in store_problems(array_folder)]
    refusals = [one_line(out, 120) for code, out in pair if refused_by_lock(code, out)]
    detail = f"same study: exit codes {[c for c, _ in pair]}" + (f" ({refusals[0]})" if refusals else "")
    detail += f"; array tasks: exit codes {[c for c, _ in array]}"
    result = CaseResult("workers", name, not problems, "; ".join(problems), detail, folder=folder)
    result.seconds = time.monotonic() - started
    return result


def run_workers(probe: Probe, report: Callable[[CaseResult], None]) -> list[CaseResult]:
    results = []
    for index in range(ROUNDS):
        if not probe.wants(f"round-{index}"):
            continue
        results.append(round_result(probe, index))
        report(results[-1])
    return results
