"""Two ``harness run-study`` processes started together on one fresh store, same spec (three cells).

Counted clean (the issue's criterion): both exit 0, one FINISHED trial run per cell, nothing left RUNNING, no
traceback in either output. The README documents that the study lock refuses a second invocation of the same
study (one line, exit 2, naming the holder); each round also says whether it is clean under that reading
(``alt_passed``): one exits 0, the other 0 or refused by the lock, and the store is as above.
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
LOCK_REFUSAL = "the study is already running in process"


def refused_by_lock(code: int | None, output: str) -> bool:
    lines = [line for line in output.strip().splitlines() if line.startswith("harness: error: ")]
    return code == 2 and len(lines) == 1 and LOCK_REFUSAL in lines[0] and not has_traceback(output)


def start_pair(probe: Probe, folder: Path) -> list[tuple[int | None, str]]:
    spec = interrupts.study_spec(folder, STUDY, VARIANTS)
    args = interrupts.study_args(folder, spec, progress=False)
    pair = [Watched(args, folder, probe.env(), folder / f"worker{i}.log") for i in range(2)]
    return [(w.wait(RUN_TIMEOUT_S), w.text()) for w in pair]


def round_result(probe: Probe, index: int) -> CaseResult:
    started = time.monotonic()
    name = f"round-{index}"
    folder = probe.folder("workers", name)
    ended = start_pair(probe, folder)
    cells = [f"{v}/seed=0" for v in VARIANTS]
    store = store_checks.study_problems(folder / "mlruns" / "mlflow.db", STUDY, cells, None)
    problems = [f"worker {i} exit code {code}" for i, (code, _) in enumerate(ended) if code != 0]
    problems += [f"worker {i}: traceback in its output" for i, (_, out) in enumerate(ended) if has_traceback(out)]
    problems += store
    codes = [code for code, _ in ended]
    refusals = [one_line(out, 160) for code, out in ended if refused_by_lock(code, out)]
    alt = not store and 0 in codes and all(c == 0 or refused_by_lock(c, o) for c, o in ended)
    detail = f"exit codes {codes}" + (f"; lock refusal: {refusals[0]}" if refusals else "")
    result = CaseResult("workers", name, not problems, "; ".join(problems), detail, folder=folder)
    result.alt_passed = alt
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
